//! `valv alerts`: the detection engine's alerts at the console (newest first), as lines or JSON
//! Lines. Audited like `/admin/alerts` (`alerts-read`).

use crate::datadir;
use std::path::Path;

pub async fn list(data_dir: &Path, limit: usize, json: bool) -> Result<(), String> {
    if !(1..=10_000).contains(&limit) {
        return Err(format!("--limit must be 1 to 10000, got {limit}"));
    }
    let opened = datadir::open_existing(data_dir, valv_store::sqlite::Access::Serve).await?;
    let app = &opened.app;
    let now = app.clock.now_ms();
    let cipher = valv_crypto::Cipher::new(&app.vault.named_key("audit", now).await.map_err(|e| e.to_string())?);
    let rows = app.vault.store().alerts(None, limit).await.map_err(|e| e.to_string())?;
    for row in &rows {
        let a = valv_server::detect::api::open_alert(&cipher, row).map_err(|e| e.diagnostics)?;
        if json {
            println!("{}", serde_json::to_string(&a).map_err(|e| e.to_string())?);
        } else {
            println!("{}  {:<6}  {:<26}  {:<28}  {}", valv_fhir::date::format_instant(a.time), a.severity.as_str(), a.rule, a.subject, a.explanation);
        }
    }
    if rows.is_empty() && !json {
        println!("no alerts");
    }
    valv_server::people::api::audit_local(app, "alerts-read", None, format!("{} alerts listed at the console", rows.len()), now).await.map_err(|e| e.diagnostics)
}
