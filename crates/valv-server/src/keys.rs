//! The server's side of KEK rotation: a background task that rewraps data keys not under the
//! provider's current KEK version, in small batches with pauses so requests keep being served.
//! `valv keys rotate` adds the version; the provider (re)reads it; this task does the rest, also
//! after a restart, since what remains is read from the store each time.

use crate::App;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Keys per batch (one transaction) and the pause between batches while work remains.
const BATCH: usize = 1000;
const PAUSE: Duration = Duration::from_millis(20);

/// Checks every `interval` for keys to rewrap and rewraps them all, batch by batch. Once every
/// key is under the current version, the census (a scan of the key table) is taken again only
/// when the provider's current KEK changes: every process wraps new keys under the version it
/// has just looked up, so none falls behind meanwhile.
pub fn spawn_rewrap(app: Arc<App>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut settled: Option<(String, u32)> = None;
        loop {
            let provider = app.vault.provider();
            provider.refresh();
            let current = (provider.kek_id(), provider.current_version());
            if settled.as_ref() != Some(&current) {
                match rewrap_all(&app).await {
                    Ok(()) => settled = Some(current),
                    Err(e) => tracing::error!(error = %e, "rewrapping data keys under the current KEK version failed; retrying"),
                }
            }
            tokio::time::sleep(interval).await;
        }
    })
}

async fn rewrap_all(app: &App) -> Result<(), valv_store::StoreError> {
    let (store, provider) = (app.vault.store(), app.vault.provider());
    let remaining = valv_store::rewrap::remaining(&**store, &**provider).await?;
    app.metrics.keys_to_rewrap.store(remaining, Ordering::Relaxed);
    if remaining == 0 {
        return Ok(());
    }
    tracing::info!(remaining, kek_version = provider.current_version(), "rewrapping data keys under the current KEK version");
    loop {
        let batch = valv_store::rewrap::rewrap_batch(&**store, &**provider, BATCH, app.clock.now_ms()).await?;
        app.metrics.keys_rewrapped.fetch_add(batch.rewrapped as u64, Ordering::Relaxed);
        let left = app.metrics.keys_to_rewrap.load(Ordering::Relaxed).saturating_sub(batch.found as u64);
        app.metrics.keys_to_rewrap.store(left, Ordering::Relaxed);
        if batch.done(BATCH) {
            break;
        }
        tokio::time::sleep(PAUSE).await;
    }
    app.metrics.keys_to_rewrap.store(valv_store::rewrap::remaining(&**store, &**provider).await?, Ordering::Relaxed);
    tracing::info!(kek_version = provider.current_version(), "every data key is under the current KEK version");
    Ok(())
}
