//! Erasure by key destruction: the checks and the act shared by the console (`valv erase`) and
//! the admin API, where it takes two people — one admin requests with a legal basis
//! (`POST /admin/erasures`), another credential approves (`POST /admin/erasures/{id}/approve`,
//! overriding a retention duty only with a reason of their own) — and the signed erasure ledger
//! both write (the data directory, and `[backup] dir`).

use crate::audit::{AuditEvent, Outcome};
use crate::error::ApiError;
use crate::people::auth::Principal;
use crate::{App, Peer, Reply};
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use std::path::PathBuf;
use valv_audit::ledger::{Erasure, Ledger};
use valv_crypto::{Aad, Cipher};
use valv_store::{ErasedPatient, ErasureRequestRow};

/// The ledger's file name, in the data directory and beside the backups.
pub const LEDGER_FILE: &str = "erasure-ledger";

/// What erasure needs beyond the store: the retention duty and where the ledger goes (signed by
/// the audit log's newest key, [`App::log_keys`]).
pub struct ErasureSettings {
    pub retention_years: u32,
    pub ledger_dirs: Vec<PathBuf>,
}

impl ErasureSettings {
    pub fn new(retention_years: u32, ledger_dirs: Vec<PathBuf>) -> Self {
        ErasureSettings { retention_years, ledger_dirs }
    }
}

/// `Ok(Some(reason))` when an override was needed and given; an error when needed and not.
pub fn retention_check(years: u32, newest: i64, now: i64, patient: &str, override_retention: Option<&str>) -> Result<Option<String>, ApiError> {
    const YEAR_MS: i64 = 365 * 86_400_000 + 86_400_000 / 4;
    let within = years > 0 && now - newest < i64::from(years) * YEAR_MS;
    match (within, override_retention.map(str::trim)) {
        (false, _) => Ok(None),
        (true, Some(o)) if !o.is_empty() => Ok(Some(o.to_string())),
        (true, _) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "business-rule",
            format!(
                "patient {patient} has records changed {} (newest), within the retention duty of {years} years (retention.years): erasing needs an override with a reason",
                valv_fhir::date::format_instant(newest)
            ),
        )),
    }
}

/// Checks that `patient` can be erased now, erases, writes the ledger; returns what was done and
/// the retention override used. The caller has decided who may, and audits.
pub async fn erase(app: &App, patient: &str, override_retention: Option<&str>, now: i64) -> Result<(String, Option<String>), ApiError> {
    crate::fhir::check_id(patient)?;
    if app.vault.is_erased(patient) {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("patient {patient} was erased already")));
    }
    let (resources, newest) = app.vault.store().patient_footprint(patient).await?;
    let Some(newest) = newest.filter(|_| resources > 0) else {
        return Err(ApiError::not_found(format!("there is no patient {patient} here: nothing to erase")));
    };
    let used = retention_check(app.erasure.retention_years, newest, now, patient, override_retention)?;
    let erased = app.vault.erase_patient(patient, now).await?;
    let mut summary = describe(patient, &erased);
    summary.push_str(&delete_objects(app, &erased.objects).await);
    match write_ledger(app).await {
        Ok(places) => summary.push_str(&format!("; ledger written to {}", places.join(", "))),
        // The erasure stands (the key is gone); the ledger is rewritten whole by the next one.
        Err(e) => summary.push_str(&format!("; the ledger could not be written ({e}): copy it by hand")),
    }
    Ok((summary, used))
}

/// Deletes an erased patient's file objects (already unreadable: their keys were sealed under
/// the destroyed data key); says how many, and how many could not be deleted.
async fn delete_objects(app: &App, objects: &[String]) -> String {
    let mut failed = 0;
    for object in objects {
        if let Err(e) = app.files.store.delete(object).await {
            tracing::warn!(error = %e, "an erased patient's file object could not be deleted (it is unreadable)");
            failed += 1;
        }
    }
    match failed {
        0 => format!("; {} files deleted", objects.len()),
        n => format!("; {} files deleted, {n} left in storage, unreadable", objects.len() - n),
    }
}

fn describe(patient: &str, e: &ErasedPatient) -> String {
    format!(
        "patient {patient}: data key {}, {} resources ({} versions) left unreadable, {} search tokens deleted; erasure #{}",
        if e.key_destroyed { "destroyed" } else { "absent" },
        e.resources,
        e.versions,
        e.tokens,
        e.seq
    )
}

/// Writes the whole ledger, signed, to each ledger folder (temporary file, then rename).
pub async fn write_ledger(app: &App) -> Result<Vec<String>, String> {
    write_ledger_to(app, &app.erasure.ledger_dirs).await
}

/// [`write_ledger`] to the given folders (a backup's).
pub async fn write_ledger_to(app: &App, dirs: &[PathBuf]) -> Result<Vec<String>, String> {
    let rows = app.vault.store().erasures(0).await.map_err(|e| e.to_string())?;
    let keys = app.log_keys();
    let signers = keys.signers()?;
    let ledger = Ledger { origin: keys.origin().to_string(), erasures: rows.into_iter().map(|r| Erasure { seq: r.seq, patient: r.patient, erased_at: r.erased_at }).collect() };
    let text = ledger.sign(&signers.iter().collect::<Vec<_>>()).map_err(|e| e.to_string())?;
    let mut written = Vec::new();
    for dir in dirs {
        let (path, tmp) = (dir.join(LEDGER_FILE), dir.join(format!("{LEDGER_FILE}.new")));
        std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| format!("writing {}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

// ---- the admin API: two people ----

fn request_aad<'a>(id: &'a str, patient: &'a str) -> Aad<'a> {
    Aad { purpose: "erasure-request", resource_type: "", id, version: 1, patient }
}

async fn cipher(app: &App, now: i64) -> Result<Cipher, ApiError> {
    Ok(Cipher::new(&app.vault.named_key("erasure-requests", now).await?))
}

/// The audit entry of one request to `/admin/erasures` (who, from where, when; the rest varies).
struct Entry<'a> {
    rid: &'a str,
    peer: &'a Peer,
    now: i64,
    by: &'a Principal,
    interaction: &'static str,
}

impl Entry<'_> {
    fn event(&self, outcome: Outcome, status: StatusCode, patient: Option<&str>, reason: &str) -> Result<AuditEvent, ApiError> {
        Ok(AuditEvent {
            event_id: valv_store::vault::new_id()?,
            time: self.now,
            request_id: self.rid.to_string(),
            action: "E",
            interaction: self.interaction,
            outcome,
            status: status.as_u16(),
            agent_id: self.by.id.clone(),
            agent_name: self.by.name.clone(),
            roles: self.by.roles.clone(),
            source_address: self.peer.source(),
            purpose_of_use: None,
            patient: patient.map(str::to_string),
            resource_type: patient.map(|_| "Patient".to_string()),
            resource_id: patient.map(str::to_string),
            version: None,
            query: None,
            reason: reason.to_string(),
        })
    }
}

/// `/admin/erasures…`: admins only (as for `/admin/users`); every request audited.
pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let now = app.clock.now_ms();
    let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let principal = crate::request::authenticate(app, authz.as_deref(), &peer.cert, rid, &peer.source(), now).await?;
    let segs: Vec<String> = req.uri().path().trim_start_matches("/admin/erasures").split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let method = req.method().clone();
    let interaction = match (method.as_str(), segs.len()) {
        ("POST", 0) => "erase-request",
        ("POST", 2) if segs[1] == "approve" => "erase",
        ("POST", 2) if segs[1] == "reject" => "erase-reject",
        _ => "erase-read",
    };
    let entry = Entry { rid, peer, now, by: &principal, interaction };
    let decision = crate::access::grantapi::users_decision(app, &principal, now);
    if !decision.permit {
        crate::request::audit(app, vec![entry.event(Outcome::Denied, StatusCode::FORBIDDEN, None, &decision.reason())?]).await?;
        return Err(ApiError::forbidden(format!("only admins request or approve erasures ({})", decision.reason())).recorded());
    }
    // An action without a body (reject, approve without an override) is fine; a body must be JSON.
    let has_body = req.headers().contains_key(header::CONTENT_TYPE);
    let body = if method == Method::POST && has_body { Some(crate::read_json_body(app, req).await?) } else { None };
    let (result, patient) = act(app, &method, &segs, body, &principal, now).await;
    let (outcome, status, reason) = match &result {
        Ok((reply, reason)) => (Outcome::Success, reply.status, reason.clone()),
        Err(e) => (if e.status.is_server_error() { Outcome::Error } else { Outcome::Denied }, e.status, e.diagnostics.clone()),
    };
    crate::request::audit(app, vec![entry.event(outcome, status, patient.as_deref(), &reason)?]).await?;
    result.map(|(reply, _)| reply).map_err(ApiError::recorded)
}

fn text_field(body: &Value, name: &str) -> Result<Option<String>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim().to_string())),
        Some(_) => Err(ApiError::bad_request(format!("'{name}' must be a non-empty string"))),
    }
}

/// The act and the patient it concerns (for the audit entry); `Ok((reply, audit reason))`.
async fn act(app: &App, method: &Method, segs: &[String], body: Option<Value>, by: &Principal, now: i64) -> (Result<(Reply, String), ApiError>, Option<String>) {
    let body = body.unwrap_or(Value::Null);
    match (method.as_str(), segs) {
        ("GET", []) => (list(app, now).await.map(|r| (r, "erasure requests listed".to_string())), None),
        ("POST", []) => {
            let patient = body.get("patient").and_then(Value::as_str).map(str::to_string);
            (request(app, &body, by, now).await, patient)
        }
        ("POST", [id, action]) if action == "approve" || action == "reject" => decide(app, id, action == "approve", &body, by, now).await,
        _ => (Err(ApiError::not_found("erasure requests: GET /admin/erasures, POST /admin/erasures, POST /admin/erasures/{id}/approve|reject")), None),
    }
}

async fn request(app: &App, body: &Value, by: &Principal, now: i64) -> Result<(Reply, String), ApiError> {
    let patient = text_field(body, "patient")?.ok_or_else(|| ApiError::bad_request("'patient' (the Patient's id) is required"))?;
    let reason = text_field(body, "reason")?.ok_or_else(|| ApiError::bad_request("'reason' must state the legal basis (e.g. the patient's GDPR Art. 17 request and its reference)"))?;
    crate::fhir::check_id(&patient)?;
    if app.vault.is_erased(&patient) {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("patient {patient} was erased already")));
    }
    if app.vault.store().patient_footprint(&patient).await?.0 == 0 {
        return Err(ApiError::not_found(format!("there is no patient {patient} here: nothing to erase")));
    }
    let id = valv_store::vault::new_id()?;
    let sealed = cipher(app, now).await?.seal(valv_store::vault::random_bytes()?, &request_aad(&id, &patient), json!({"reason": reason, "requested_by": by.id, "requested_by_name": by.name}).to_string().as_bytes());
    app.vault.store().insert_erasure_request(&ErasureRequestRow { id: id.clone(), patient: patient.clone(), sealed, requested_at: now, state: "pending".into(), decided_by: None, decided_at: None }).await?;
    let reply = Reply::json(StatusCode::ACCEPTED, json!({"id": id, "patient": patient, "state": "awaiting-approval", "next": "another admin approves with POST /admin/erasures/{id}/approve"}));
    Ok((reply, format!("erasure of patient {patient} requested (request {id}); legal basis: {reason}")))
}

/// The request's sealed part: (legal basis, requester's principal id, name).
async fn opened(app: &App, row: &ErasureRequestRow, now: i64) -> Result<(String, String, String), ApiError> {
    let plain = cipher(app, now).await?.open(&request_aad(&row.id, &row.patient), &row.sealed).map_err(|_| ApiError::internal(format!("erasure request {} does not authenticate: altered outside Valv", row.id)))?;
    let v: Value = serde_json::from_slice(&plain).map_err(|e| ApiError::internal(e.to_string()))?;
    let field = |n: &str| v.get(n).and_then(Value::as_str).unwrap_or_default().to_string();
    Ok((field("reason"), field("requested_by"), field("requested_by_name")))
}

async fn list(app: &App, now: i64) -> Result<Reply, ApiError> {
    let mut out = Vec::new();
    for row in app.vault.store().erasure_requests().await? {
        let (reason, _, by_name) = opened(app, &row, now).await?;
        out.push(json!({"id": row.id, "patient": row.patient, "state": row.state, "requested_at": valv_fhir::date::format_instant(row.requested_at),
            "requested_by": by_name, "reason": reason, "decided_at": row.decided_at.map(valv_fhir::date::format_instant)}));
    }
    Ok(Reply::json(StatusCode::OK, json!({"requests": out})))
}

async fn decide(app: &App, id: &str, approve: bool, body: &Value, by: &Principal, now: i64) -> (Result<(Reply, String), ApiError>, Option<String>) {
    let rows = match app.vault.store().erasure_requests().await {
        Ok(r) => r,
        Err(e) => return (Err(e.into()), None),
    };
    let Some(row) = rows.into_iter().find(|r| r.id == id) else {
        return (Err(ApiError::not_found(format!("no erasure request {id}"))), None);
    };
    let patient = Some(row.patient.clone());
    let result = async {
        // An approved request whose erasure never happened (the process stopped in between) may
        // be approved again; anything else decided stays decided.
        let unfinished = row.state == "approved" && !app.vault.is_erased(&row.patient);
        if row.state != "pending" && !(approve && unfinished) {
            return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("erasure request {id} is {} already", row.state)));
        }
        let (reason, requested_by, requested_by_name) = opened(app, &row, now).await?;
        if requested_by == by.id {
            return Err(ApiError::forbidden("a second person decides: the credential that requested this erasure cannot approve or reject it"));
        }
        let override_retention = text_field(body, "override_retention")?;
        if !approve {
            if !app.vault.store().decide_erasure_request(id, "rejected", &by.id, now).await? {
                return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("erasure request {id} was decided meanwhile")));
            }
            return Ok((Reply::json(StatusCode::OK, json!({"id": id, "state": "rejected"})), format!("erasure request {id} for patient {} rejected", row.patient)));
        }
        // Claim the request first, so two approvers racing cannot both erase.
        if !unfinished && !app.vault.store().decide_erasure_request(id, "approved", &by.id, now).await? {
            return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("erasure request {id} was decided meanwhile")));
        }
        match erase(app, &row.patient, override_retention.as_deref(), now).await {
            Ok((summary, used)) => {
                let mut audit = format!("erased {summary}; requested by {requested_by_name} (request {id}); legal basis: {reason}");
                if let Some(o) = &used {
                    audit.push_str(&format!("; retention duty overridden: {o}"));
                }
                Ok((Reply::json(StatusCode::OK, json!({"id": id, "state": "erased", "summary": summary})), audit))
            }
            Err(e) => {
                // Nothing was erased (e.g. a retention duty without an override): the request goes
                // back to waiting — unless another approver's erasure of the patient went through.
                let _ = app.vault.refresh_erasures().await;
                if !app.vault.is_erased(&row.patient) {
                    let _ = reopen(app, id).await;
                }
                Err(e)
            }
        }
    }
    .await;
    (result, patient)
}

/// Puts an approved request whose erasure was refused back to pending.
async fn reopen(app: &App, id: &str) -> Result<(), ApiError> {
    app.vault.store().reopen_erasure_request(id).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention() {
        let year = 365 * 86_400_000i64;
        let now = 100 * year;
        assert_eq!(retention_check(0, now, now, "p", None).ok(), Some(None), "off by default");
        assert!(retention_check(10, now - 3 * year, now, "p", None).is_err_and(|e| e.status == StatusCode::CONFLICT));
        assert!(retention_check(10, now - 3 * year, now, "p", Some("  ")).is_err(), "an empty override is none");
        assert_eq!(retention_check(10, now - 3 * year, now, "p", Some("court order 12")).ok(), Some(Some("court order 12".into())));
        assert_eq!(retention_check(10, now - 11 * year, now, "p", None).ok(), Some(None), "past the duty");
    }
}
