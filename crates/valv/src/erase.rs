//! `valv erase`: a patient erased by destroying their data key (crypto-shredding), by the
//! operator at this console (over HTTP it takes two admins: `valv_server::erasure`). Their
//! sealed versions stay in the database, unreadable; their search tokens go; the audit trail
//! stays (a legal duty). The erasure is an audit entry and a line in the signed erasure ledger.

use crate::datadir::Opened;

pub struct Request {
    pub patient: String,
    pub reason: String,
    pub override_retention: Option<String>,
}

/// Checks the request, erases, audits; returns what to print.
pub async fn run(opened: &Opened, req: Request) -> Result<String, String> {
    let (app, now) = (&opened.app, valv_server::now_ms());
    if !valv_fhir::id::is_valid_id(&req.patient) {
        return Err(format!("'{}' is not a FHIR id", req.patient));
    }
    let reason = req.reason.trim();
    if reason.is_empty() {
        return Err("--reason must state the legal basis (e.g. the patient's GDPR Art. 17 request and its reference)".into());
    }
    let (summary, used) = valv_server::erasure::erase(app, &req.patient, req.override_retention.as_deref(), now).await.map_err(|e| {
        e.diagnostics.replace("erasing needs an override with a reason", "erasing needs --override-retention REASON")
    })?;
    let audit_reason = match &used {
        Some(o) => format!("erased {summary}; legal basis: {reason}; retention duty overridden: {o}"),
        None => format!("erased {summary}; legal basis: {reason}"),
    };
    // The erasure is done: an audit failure now must not hide it, so it is reported, not undone.
    if let Err(e) = valv_server::people::api::audit_local(app, "erase", None, audit_reason, now).await {
        return Err(format!("{summary} — but its audit entry failed: {}; record it by hand", e.diagnostics));
    }
    Ok(format!("erased {summary}"))
}
