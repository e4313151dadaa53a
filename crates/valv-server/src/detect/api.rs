//! `/admin/alerts`: the detection engine's alerts for auditors (the policy's admin area
//! `alerts`). `GET /admin/alerts[?before=<alert id>&limit=N]` lists them newest first (a full
//! page links the next);
//! `GET /admin/alerts/{id}` shows one with its evidence: each audit entry's leaf hash and
//! inclusion proof against the latest signed checkpoint, that checkpoint and the log's key, so
//! the evidence can be checked without trusting this server. Every request that names a caller
//! is audited (a method other than GET too: 405).

use crate::audit::{AuditEvent, Outcome};
use crate::error::ApiError;
use crate::request::{audit, Ctx};
use crate::{App, Peer, Reply};
use base64::Engine as _;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};
use valv_detect::Alert;
use valv_store::AlertRow;

/// Alerts listed at most per request.
const MAX_LIMIT: usize = 500;

pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let ctx = crate::request::admin_ctx(app, &req, rid, peer).await?;
    let segs: Vec<String> = req.uri().path().trim_start_matches("/admin/alerts").split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let query = req.uri().query().unwrap_or("").to_string();
    let d = app.access.decide_admin(&ctx.principal, "alerts", ctx.now);
    if !d.permit {
        let e = ApiError::forbidden(format!("access denied ({})", d.reason()));
        audit(app, vec![event(&ctx, "alerts-read", Outcome::Denied, 403, None, &d.reason())?]).await?;
        return Err(e.recorded());
    }
    let result = match segs.as_slice() {
        _ if req.method() != Method::GET => Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", "alerts are read with GET; they are never changed")),
        [] => list(app, &query).await.map(|(body, n)| (body, None, format!("{n} alerts listed"))),
        [id] => one(app, id).await.map(|body| (body, Some(id.clone()), "alert read with its evidence".to_string())),
        _ => Err(ApiError::not_found("no such alerts path")),
    };
    match result {
        Ok((body, id, what)) => {
            audit(app, vec![event(&ctx, "alerts-read", Outcome::Success, 200, id.as_deref(), &format!("{}; {what}", d.reason()))?]).await?;
            Ok(Reply::json(StatusCode::OK, body))
        }
        Err(e) => {
            let outcome = if e.status.is_server_error() { Outcome::Error } else { Outcome::Denied };
            audit(app, vec![event(&ctx, "alerts-read", outcome, e.status.as_u16(), None, &e.diagnostics)?]).await?;
            Err(e.recorded())
        }
    }
}

async fn list(app: &App, query: &str) -> Result<(Value, usize), ApiError> {
    let mut before = None;
    let mut limit = 100;
    for (k, v) in crate::http::query::parse(query).map_err(ApiError::bad_request)? {
        match k.as_str() {
            // The last alert of the previous page: the page after it.
            "before" => {
                check_id(&v)?;
                let row = app.vault.store().alert(&v).await?.ok_or_else(|| ApiError::bad_request(format!("'before' names no alert: '{v}'")))?;
                before = Some((row.time, row.id));
            }
            "limit" => limit = v.parse().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| ApiError::bad_request(format!("'limit' must be 1 to {MAX_LIMIT}, got '{v}'")))?,
            other => return Err(ApiError::bad_request(format!("/admin/alerts takes 'before' and 'limit', not '{other}'"))),
        }
    }
    let cipher = audit_cipher(app).await?;
    let rows = app.vault.store().alerts(before.as_ref().map(|(t, id)| (*t, id.as_str())), limit).await?;
    let alerts = rows.iter().map(|r| open_alert(&cipher, r).map(|a| to_json(&a))).collect::<Result<Vec<_>, _>>()?;
    let n = alerts.len();
    let mut body = json!({"alerts": alerts});
    if n == limit {
        if let Some(last) = rows.last() {
            body["next"] = json!(format!("/admin/alerts?before={}&limit={limit}", last.id));
        }
    }
    Ok((body, n))
}

/// An alert id is `<leaf index>-<rule>`.
pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::bad_request("an alert id is <leaf index>-<rule>"));
    }
    Ok(())
}

async fn one(app: &App, id: &str) -> Result<Value, ApiError> {
    check_id(id)?;
    let row = app.vault.store().alert(id).await?.ok_or_else(|| ApiError::not_found(format!("no alert {id}")))?;
    let alert = open_alert(&audit_cipher(app).await?, &row)?;
    let store = app.vault.store();
    let checkpoint = store.latest_checkpoint().await?.ok_or_else(|| ApiError::unavailable("no checkpoint has been signed yet"))?;
    let log_key = app.log_keys().vkey_of(&checkpoint.note).map_err(ApiError::internal)?;
    let mut evidence = Vec::new();
    for &index in &alert.evidence {
        let Some((_, row)) = store.audit_entries(index, index + 1).await?.into_iter().next() else {
            return Err(ApiError::internal(format!("audit entry {index}, evidence of alert {id}, is missing")));
        };
        let mut item = json!({"index": index, "leafHash": b64(&row.leaf_hash)});
        if index < checkpoint.size {
            let proof = crate::audit::log::inclusion(&**store, index, checkpoint.size).await.map_err(|e| match e {
                crate::audit::log::ProofError::Invalid(m) => ApiError::internal(m),
                crate::audit::log::ProofError::Store(s) => s.into(),
            })?;
            item["proof"] = json!(proof.iter().map(|h| b64(h)).collect::<Vec<_>>());
        } else {
            item["pending"] = json!("recorded after the latest checkpoint; ask again in a second");
        }
        evidence.push(item);
    }
    let mut body = to_json(&alert);
    body["evidence"] = Value::Array(evidence);
    body["checkpoint"] = json!(checkpoint.note);
    body["logKey"] = json!(log_key);
    Ok(body)
}

async fn audit_cipher(app: &App) -> Result<valv_crypto::Cipher, ApiError> {
    Ok(valv_crypto::Cipher::new(&app.vault.named_key("audit", app.clock.now_ms()).await?))
}

/// An alert from its row; a row that does not open, or names another id, is an integrity failure.
pub fn open_alert(cipher: &valv_crypto::Cipher, row: &AlertRow) -> Result<Alert, ApiError> {
    let altered = || ApiError::from(valv_store::StoreError::Integrity(format!("alert {} does not open (altered outside Valv)", row.id)));
    let json = cipher.open(&super::alert_aad(&row.id), &row.sealed).map_err(|_| altered())?;
    let alert: Alert = serde_json::from_slice(&json).map_err(|_| altered())?;
    if alert.id != row.id || alert.time != row.time || alert.rule != row.rule {
        return Err(altered());
    }
    Ok(alert)
}

pub(crate) fn to_json(a: &Alert) -> Value {
    json!({
        "id": a.id,
        "time": valv_fhir::date::format_instant(a.time),
        "rule": a.rule,
        "severity": a.severity.as_str(),
        "subject": a.subject,
        "explanation": a.explanation,
        "evidence": a.evidence,
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn event(ctx: &Ctx, interaction: &'static str, outcome: Outcome, status: u16, alert: Option<&str>, reason: &str) -> Result<AuditEvent, ApiError> {
    Ok(AuditEvent {
        event_id: valv_store::vault::new_id()?,
        time: ctx.now,
        request_id: ctx.request_id.clone(),
        action: "R",
        interaction,
        outcome,
        status,
        agent_id: ctx.principal.id.clone(),
        agent_name: ctx.principal.name.clone(),
        roles: ctx.principal.roles.clone(),
        source_address: ctx.source.clone(),
        purpose_of_use: Some(ctx.purpose().to_string()),
        patient: None,
        resource_type: None,
        resource_id: alert.map(str::to_string),
        version: None,
        query: None,
        reason: reason.to_string(),
    })
}
