//! `valv erase`: a patient erased by destroying their data key (crypto-shredding), by the
//! operator at this console. Their sealed versions stay in the database, unreadable; their search
//! tokens go; the audit trail stays (a legal duty). The erasure is an audit entry and a line in
//! the signed erasure ledger (`erasure-ledger` in the data directory), which a restore re-applies.

use crate::datadir::Opened;
use std::path::PathBuf;
use valv_audit::ledger::{Erasure, Ledger};

pub struct Request {
    pub patient: String,
    pub reason: String,
    pub override_retention: Option<String>,
}

/// The ledger's file in the data directory.
pub const LEDGER_FILE: &str = "erasure-ledger";

/// Checks the request, erases, audits, writes the ledger; returns what to print.
pub async fn run(opened: &Opened, req: Request) -> Result<String, String> {
    let (vault, now) = (&opened.app.vault, valv_server::now_ms());
    if !valv_fhir::id::is_valid_id(&req.patient) {
        return Err(format!("'{}' is not a FHIR id", req.patient));
    }
    let reason = req.reason.trim();
    if reason.is_empty() {
        return Err("--reason must state the legal basis (e.g. the patient's GDPR Art. 17 request and its reference)".into());
    }
    if vault.is_erased(&req.patient) {
        return Err(format!("patient {} was erased already", req.patient));
    }
    let (resources, newest) = vault.store().patient_footprint(&req.patient).await.map_err(|e| e.to_string())?;
    let Some(newest) = newest.filter(|_| resources > 0) else {
        return Err(format!("there is no patient {} here: nothing to erase", req.patient));
    };
    let override_reason = retention_check(opened.config.retention.years, newest, now, &req)?;
    let erased = vault.erase_patient(&req.patient, now).await.map_err(|e| e.to_string())?;
    let summary = format!(
        "patient {}: data key {}, {} resources ({} versions) left unreadable, {} search tokens deleted; erasure #{}",
        req.patient,
        if erased.key_destroyed { "destroyed" } else { "absent" },
        erased.resources,
        erased.versions,
        erased.tokens,
        erased.seq
    );
    let audit_reason = match &override_reason {
        Some(o) => format!("{summary}; legal basis: {reason}; retention duty overridden: {o}"),
        None => format!("{summary}; legal basis: {reason}"),
    };
    // The erasure is done: an audit failure now must not hide it, so it is reported, not undone.
    if let Err(e) = valv_server::people::api::audit_local(&opened.app, "erase", None, audit_reason, now).await {
        return Err(format!("{summary} — but its audit entry failed: {}; record it by hand", e.diagnostics));
    }
    let written = write_ledger(opened).await?;
    let places = written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Ok(format!("erased {summary}\nerasure ledger: {places}"))
}

/// `Ok(Some(reason))` when an override was needed and given; an error when it was needed and not.
fn retention_check(years: u32, newest: i64, now: i64, req: &Request) -> Result<Option<String>, String> {
    const YEAR_MS: i64 = 365 * 86_400_000 + 86_400_000 / 4;
    let within = years > 0 && now - newest < i64::from(years) * YEAR_MS;
    match (within, req.override_retention.as_deref().map(str::trim)) {
        (false, _) => Ok(None),
        (true, Some(o)) if !o.is_empty() => Ok(Some(o.to_string())),
        (true, _) => Err(format!(
            "patient {} has records changed {} (newest), within the retention duty of {years} years (retention.years): erasing needs --override-retention REASON",
            req.patient,
            valv_fhir::date::format_instant(newest)
        )),
    }
}

/// Writes the whole ledger, signed by the log's checkpoint key, to the data directory and, when
/// `[backup] dir` is set, to the backup folder (each through a temporary file and a rename);
/// returns where it went.
pub async fn write_ledger(opened: &Opened) -> Result<Vec<PathBuf>, String> {
    let rows = opened.app.vault.store().erasures(0).await.map_err(|e| e.to_string())?;
    let seed = opened.checkpoint_seed.expose();
    let origin = valv_server::audit::integrator::origin_for(seed)?;
    let signer = valv_audit::Signer::new(&origin, seed).map_err(|e| e.to_string())?;
    let ledger = Ledger { origin, erasures: rows.into_iter().map(|r| Erasure { seq: r.seq, patient: r.patient, erased_at: r.erased_at }).collect() };
    let text = ledger.sign(&signer).map_err(|e| e.to_string())?;
    let mut dirs = vec![opened.data_dir.clone()];
    dirs.extend(opened.config.backup.dir.as_ref().map(|d| opened.data_dir.join(d)));
    let mut written = Vec::new();
    for dir in dirs {
        let (path, tmp) = (dir.join(LEDGER_FILE), dir.join(format!("{LEDGER_FILE}.new")));
        std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| format!("writing the erasure ledger {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(o: Option<&str>) -> Request {
        Request { patient: "p".into(), reason: "r".into(), override_retention: o.map(str::to_string) }
    }

    #[test]
    fn retention() {
        let year = 365 * 86_400_000i64;
        let now = 100 * year;
        assert_eq!(retention_check(0, now, now, &req(None)), Ok(None), "off by default");
        assert!(retention_check(10, now - 3 * year, now, &req(None)).is_err_and(|e| e.contains("--override-retention")));
        assert!(retention_check(10, now - 3 * year, now, &req(Some("  "))).is_err(), "an empty override is none");
        assert_eq!(retention_check(10, now - 3 * year, now, &req(Some("court order 12"))), Ok(Some("court order 12".into())));
        assert_eq!(retention_check(10, now - 11 * year, now, &req(None)), Ok(None), "past the duty");
    }
}
