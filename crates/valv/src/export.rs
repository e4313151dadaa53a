//! `valv export --patient ID --recipient age1… --out FILE`: the patient's record as the operator
//! at this console exports it, every resource included (see `valv_server::fhir::export`).

use crate::datadir::Opened;
use std::io::Write as _;
use std::path::Path;
use valv_server::fhir::export;

pub struct Request<'a> {
    pub patient: &'a str,
    pub recipients: &'a [String],
    pub out: &'a Path,
}

/// Writes the export; returns what to print.
pub async fn run(opened: &Opened, req: Request<'_>) -> Result<String, String> {
    let (app, now) = (&opened.app, valv_server::now_ms());
    if !valv_fhir::id::is_valid_id(req.patient) {
        return Err(format!("'{}' is not a FHIR id", req.patient));
    }
    let recipients = export::recipients(req.recipients).map_err(|e| e.diagnostics.replace("recipient '", "--recipient '"))?;
    if app.vault.is_erased(req.patient) {
        return Err(format!("the data of patient {} was erased: there is nothing to export", req.patient));
    }
    if app.vault.store().resources_of(req.patient).await.map_err(|e| e.to_string())?.is_empty() {
        return Err(format!("there is no patient {} here", req.patient));
    }
    let mut memory = app.limits.reserve(0).map_err(|e| e.diagnostics)?;
    let (files, resources, entries) = export::record_files(app, req.patient, &|_, _| true, now, &mut memory).await.map_err(|e| e.diagnostics)?;
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(req.out).map_err(|e| format!("{}: {e}", req.out.display()))?;
    if let Err(e) = export::seal(std::io::BufWriter::new(file), &recipients, &files, now).and_then(|mut w| w.flush().map_err(|e| valv_server::error::ApiError::internal(e.to_string()))) {
        let _ = std::fs::remove_file(req.out);
        return Err(e.diagnostics);
    }
    let reason = format!("record of patient {} ({resources} resources, {entries} access-log entries) exported, age-encrypted to {}", req.patient, req.recipients.join(", "));
    valv_server::people::api::audit_local(app, "export", None, reason, now).await.map_err(|e| format!("the export was written but its audit entry failed: {}", e.diagnostics))?;
    Ok(format!("exported patient {}: {resources} resources in {} files, {entries} access-log entries, to {} (age, {} recipient(s))", req.patient, files.len(), req.out.display(), recipients.len()))
}
