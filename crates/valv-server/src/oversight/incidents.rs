//! Incidents (GDPR Art. 33–34, HIPAA §164.308(a)(6)): opened from alerts or by hand, walked
//! detect → contain → recover → notify → closed, containment executed from the incident, the
//! affected patients computed from the audit log, the 72-hour clock shown (and alerted by the
//! detection engine, rule `incident-notification-due`/`-overdue`).
//!
//! `GET /admin/incidents`, `POST /admin/incidents` `{title, severity, note, alerts?, subjects?,
//! from?}`, `GET /admin/incidents/{id}`, `GET /admin/incidents/{id}/patients`,
//! `POST /admin/incidents/{id}/stage` `{stage, note, lessons?}`,
//! `POST /admin/incidents/{id}/actions` `{action, target}` (policy area `incidents`).
//!
//! Audit interactions: `incident-open`, `incident-stage`, `incident-notify` (the clock stops),
//! `incident-close`, `incident-action`, `incident-read`; the detection engine reads the first,
//! third and fourth.

use super::{load, load_all, save, scan, Actor};
use crate::error::ApiError;
use crate::{App, Peer, Reply};
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use valv_oversight::incident::{ActionKind, Affected, Incident, Opening, Stage, Subject};

pub const KIND: &str = "incident";
const RECORD: &str = "Incident";

/// What opening an incident takes: with alerts, their subjects join it and the affected
/// period starts at their earliest evidence unless `from` says otherwise.
pub struct NewIncident {
    pub title: String,
    pub severity: String,
    pub note: String,
    pub alerts: Vec<String>,
    pub subjects: Vec<String>,
    pub from: Option<i64>,
}

/// Opens incident `id` (a new id: [`super::new_record_id`]).
pub async fn open(app: &App, actor: &Actor, id: &str, n: NewIncident) -> Result<(Incident, String), ApiError> {
    let now = app.clock.now_ms();
    let cipher = super::cipher(app).await?;
    let mut subjects = n.subjects;
    let mut earliest: Option<i64> = None;
    for id in &n.alerts {
        let row = app.vault.store().alert(id).await?.ok_or_else(|| ApiError::bad_request(format!("no alert {id}")))?;
        let alert = crate::detect::api::open_alert(&cipher, &row)?;
        if Subject::parse(&alert.subject).is_ok() {
            subjects.push(alert.subject.clone());
        }
        let first = match alert.evidence.first() {
            Some(&index) => entry_time(app, &cipher, index).await?,
            None => alert.time,
        };
        earliest = Some(earliest.map_or(first, |e: i64| e.min(first)));
    }
    let window_from = n.from.or(earliest).ok_or_else(|| ApiError::bad_request("give 'from' (when the incident began) or the alerts it comes from"))?;
    let o = Opening { title: n.title, severity: n.severity, alerts: n.alerts, subjects, window_from, note: n.note };
    let incident = Incident::open(id.to_string(), o, &actor.id, now)?;
    refuse_subject(actor, &incident.subjects)?;
    save(app, KIND, id, 1, &incident).await?;
    let why = format!("incident {id} opened ({}; subjects {}; alerts {})", incident.severity, incident.subjects.join(","), incident.alerts.join(","));
    Ok((incident, why))
}

async fn entry_time(app: &App, cipher: &valv_crypto::Cipher, index: u64) -> Result<i64, ApiError> {
    let rows = app.vault.store().audit_entries(index, index + 1).await?;
    let (_, row) = rows.first().ok_or_else(|| ApiError::internal(format!("audit entry {index} is missing")))?;
    let bytes = crate::audit::open_entry(cipher, row).map_err(|e| ApiError::from(valv_store::StoreError::Integrity(format!("audit entry {index} does not open: {e}"))))?;
    Ok(valv_detect::Entry::parse(index, &bytes).map_err(ApiError::internal)?.time)
}

pub async fn get(app: &App, id: &str) -> Result<(Incident, u64), ApiError> {
    super::check_id(id, "an incident")?;
    load(app, KIND, id).await?.ok_or_else(|| ApiError::not_found(format!("no incident {id}")))
}

/// The incident, unless the actor is one of its subjects: a suspect neither reads nor steers
/// the incident about them.
pub async fn get_as(app: &App, actor: &Actor, id: &str) -> Result<(Incident, u64), ApiError> {
    let (incident, version) = get(app, id).await?;
    refuse_subject(actor, &incident.subjects)?;
    Ok((incident, version))
}

fn refuse_subject(actor: &Actor, subjects: &[String]) -> Result<(), ApiError> {
    if subjects.iter().any(|s| *s == format!("account:{}", actor.id) || *s == format!("key:{}", actor.id)) {
        return Err(ApiError::forbidden("you are a subject of this incident"));
    }
    Ok(())
}

pub async fn list(app: &App) -> Result<Vec<Incident>, ApiError> {
    load_all(app, KIND).await
}

/// The patients the incident's subjects reached in its period, from the audit log.
pub async fn affected(app: &App, incident: &Incident) -> Result<BTreeSet<String>, ApiError> {
    let to = incident.window_to.unwrap_or_else(|| app.clock.now_ms() + 1);
    let mut a = Affected::new(&incident.subjects(), incident.window_from, Some(to));
    scan(app, incident.window_from, to, &mut |e| a.observe(e)).await?;
    Ok(a.patients)
}

/// The affected patients, each disclosure audited with the patient named (interaction
/// `incident-patients`), so each patient's access log shows who learned of it.
pub async fn list_patients(app: &App, actor: &Actor, id: &str) -> Result<Vec<String>, ApiError> {
    let patients: Vec<String> = affected(app, &get_as(app, actor, id).await?.0).await?.into_iter().collect();
    actor.disclosed(app, "incident-patients", (RECORD, id), &patients, &format!("incident {id}: listed among the patients its subjects reached")).await?;
    Ok(patients)
}

/// The audit interaction that records entering `stage`.
pub fn stage_interaction(stage: Stage) -> &'static str {
    match stage {
        Stage::Notify => "incident-notify",
        Stage::Closed => "incident-close",
        _ => "incident-stage",
    }
}

/// Enters the next stage; at notify the affected patients are counted and recorded.
pub async fn advance(app: &App, actor: &Actor, id: &str, stage: Stage, note: &str, lessons: Option<&str>) -> Result<(Incident, String), ApiError> {
    let (mut incident, version) = get_as(app, actor, id).await?;
    let affected = if stage == Stage::Notify { Some(affected(app, &incident).await?.len() as u64) } else { None };
    incident.advance(stage, note, lessons, affected, &actor.id, app.clock.now_ms())?;
    save(app, KIND, id, version + 1, &incident).await?;
    let counted = affected.map(|n| format!("; {n} affected patients")).unwrap_or_default();
    Ok((incident, format!("incident {id} entered stage {}{counted}", stage.as_str())))
}

/// Executes a containment action and records it in the incident.
pub async fn act(app: &App, actor: &Actor, id: &str, action: ActionKind, target: &str) -> Result<(Incident, String), ApiError> {
    let (incident, _) = get_as(app, actor, id).await?;
    let subject = incident.check_action(action, target)?;
    let own_address = actor.source.parse::<std::net::IpAddr>().ok().map(|ip| Subject::Address(ip.to_canonical()));
    if subject == Subject::Account(actor.id.clone()) || Some(&subject) == own_address.as_ref() {
        return Err(ApiError::forbidden(format!("{} on {subject} would act on yourself", action.as_str())));
    }
    let now = app.clock.now_ms();
    let result = match (&subject, action) {
        (Subject::Account(user_id), ActionKind::LockAccount | ActionKind::EndSessions) => {
            let user = app.identity.by_id(user_id).await?.ok_or_else(|| ApiError::not_found(format!("no account {user_id}")))?;
            use crate::people::identity::AdminChange;
            // Disabling ends the sessions too (the identity store's rule for a narrowing change).
            let change = if action == ActionKind::LockAccount { AdminChange::Disable } else { AdminChange::RevokeSessions };
            app.identity.admin(&user.username, change, now, Some(&actor.id)).await?;
            if action == ActionKind::LockAccount { format!("account {user_id} disabled and its sessions ended") } else { format!("sessions of account {user_id} ended") }
        }
        (Subject::Key(key_id), ActionKind::RevokeKey) => revoke_key(app, key_id, now).await?,
        (Subject::Address(ip), ActionKind::BlockAddress) => super::blocks::block(app, actor, *ip, id).await?,
        _ => return Err(ApiError::bad_request(format!("{} does not apply to {target}", action.as_str()))),
    };
    // The action is done: record it on the incident as it is now (read again, retried against
    // concurrent changes; recorded even if the incident was closed meanwhile — it happened).
    let why = format!("incident {id}: {} {subject}: {result}", action.as_str());
    for _ in 0..5 {
        let (mut incident, version) = get(app, id).await?;
        incident.record_action(action, &subject, result.clone(), &actor.id, now);
        match save(app, KIND, id, version + 1, &incident).await {
            Ok(()) => return Ok((incident, why)),
            Err(e) if e.status == StatusCode::CONFLICT => continue,
            Err(e) => return Err(ApiError::new(e.status, e.code, format!("{why}; but recording it on the incident failed: {}", e.diagnostics))),
        }
    }
    Err(ApiError::unavailable(format!("{why}; but the incident was busy and does not record it yet: take the action again to record it")))
}

async fn revoke_key(app: &App, key_id: &str, now: i64) -> Result<String, ApiError> {
    let store = app.vault.store();
    let keys = store.list_api_keys().await?;
    let key = keys.iter().find(|k| k.id == key_id).ok_or_else(|| ApiError::not_found(format!("no API key {key_id}")))?;
    if key.revoked.is_some() {
        return Ok(format!("API key {key_id} was revoked already"));
    }
    let r = crate::people::auth::revoked(&app.records, key, now);
    if !store.revoke_api_key(&r.id, now, &r.mac).await? {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("API key {key_id} changed while revoking it; try again")));
    }
    Ok(format!("API key {key_id} revoked"))
}

pub fn to_json(i: &Incident, now: i64) -> Value {
    let c = i.clock(now);
    json!({
        "incident": i,
        "clock": {
            "notifyBy": valv_fhir::date::format_instant(c.notify_by),
            "stopped": c.stopped_at.map(valv_fhir::date::format_instant),
            "hoursLeft": c.remaining_ms as f64 / 3_600_000.0,
            "overdue": c.overdue(),
        },
    })
}

fn summary(i: &Incident, now: i64) -> Value {
    let c = i.clock(now);
    json!({
        "id": i.id,
        "title": i.title,
        "severity": i.severity,
        "stage": i.stage,
        "opened": valv_fhir::date::format_instant(i.opened_at()),
        "notifyBy": valv_fhir::date::format_instant(c.notify_by),
        "overdue": c.overdue(),
    })
}

pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let ctx = crate::request::admin_ctx(app, &req, rid, peer).await?;
    let actor = Actor::of(&ctx);
    let segs = super::segments(req.uri().path(), "/admin/incidents");
    let method = req.method().clone();
    // A malformed id is refused like any other request of a known caller: audited.
    let id = match super::record_id(&method, &segs) {
        Ok(id) => id,
        Err(e) => return actor.audited(app, interaction(&method, &segs, None), (RECORD, ""), Err(e)).await,
    };
    let d = app.access.decide_admin(&ctx.principal, "incidents", ctx.now);
    if !d.permit {
        let refused = Err(ApiError::forbidden(format!("access denied ({})", d.reason())));
        return actor.audited(app, interaction(&method, &segs, None), (RECORD, &id), refused).await;
    }
    let body = if method == Method::POST && req.headers().contains_key(header::CONTENT_TYPE) { Some(crate::read_json_body(app, req).await) } else { None };
    let interaction = interaction(&method, &segs, body.as_ref().and_then(|b| b.as_ref().ok()));
    // Who an account reached is audit-log content: auditors only (policy `incident-patients`).
    let may_list = app.access.decide_admin(&ctx.principal, "incident-patients", ctx.now).permit;
    let result = route(app, &actor, &method, &segs, &id, may_list, body).await.map(|(status, value, why)| ((status, value), format!("{}; {why}", d.reason())));
    let (status, value) = actor.audited(app, interaction, (RECORD, &id), result).await?;
    Ok(Reply::json(status, value))
}

fn interaction(method: &Method, segs: &[String], body: Option<&Value>) -> &'static str {
    match (method.as_str(), segs.get(1).map(String::as_str)) {
        ("POST", None) => "incident-open",
        ("POST", Some("actions")) => "incident-action",
        ("POST", Some("stage")) => match body.and_then(|b| b.get("stage")).and_then(Value::as_str).map(Stage::parse) {
            Some(Ok(stage)) => stage_interaction(stage),
            _ => "incident-stage",
        },
        _ => "incident-read",
    }
}

fn strings(body: &Value, name: &str) -> Result<Vec<String>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request(format!("'{name}' must be a list of strings")))).collect(),
        Some(_) => Err(ApiError::bad_request(format!("'{name}' must be a list of strings"))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn route(app: &App, actor: &Actor, method: &Method, segs: &[String], new_id: &str, may_list: bool, body: Option<Result<Value, ApiError>>) -> Result<(StatusCode, Value, String), ApiError> {
    let body = body.transpose()?.unwrap_or(Value::Null);
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let now = app.clock.now_ms();
    match (method.as_str(), segs.as_slice()) {
        ("GET", []) => {
            let all = list(app).await?;
            Ok((StatusCode::OK, json!({"incidents": all.iter().map(|i| summary(i, now)).collect::<Vec<_>>()}), format!("{} incidents listed", all.len())))
        }
        ("POST", []) => {
            let n = NewIncident {
                title: super::required(&body, "title")?.to_string(),
                severity: super::required(&body, "severity")?.to_string(),
                note: super::required(&body, "note")?.to_string(),
                alerts: strings(&body, "alerts")?,
                subjects: strings(&body, "subjects")?,
                from: super::text(&body, "from")?.map(|f| super::instant(f, "from")).transpose()?,
            };
            for a in &n.alerts {
                crate::detect::api::check_id(a)?;
            }
            let (incident, why) = open(app, actor, new_id, n).await?;
            Ok((StatusCode::CREATED, to_json(&incident, now), why))
        }
        ("GET", [id]) => Ok((StatusCode::OK, to_json(&get_as(app, actor, id).await?.0, now), format!("incident {id} read"))),
        ("GET", [id, "patients"]) => {
            if !may_list {
                return Err(ApiError::forbidden("only auditors list the patients an incident reached (policy incident-patients)"));
            }
            let patients = list_patients(app, actor, id).await?;
            let n = patients.len();
            Ok((StatusCode::OK, json!({"incident": id, "patients": patients}), format!("incident {id}: {n} affected patients listed")))
        }
        ("POST", [id, "stage"]) => {
            let stage = Stage::parse(super::required(&body, "stage")?)?;
            let (incident, why) = advance(app, actor, id, stage, super::required(&body, "note")?, super::text(&body, "lessons")?).await?;
            Ok((StatusCode::OK, to_json(&incident, now), why))
        }
        ("POST", [id, "actions"]) => {
            let action = ActionKind::parse(super::required(&body, "action")?)?;
            let (incident, why) = act(app, actor, id, action, super::required(&body, "target")?).await?;
            Ok((StatusCode::OK, to_json(&incident, now), why))
        }
        _ => Err(ApiError::method_not_allowed(
            "use GET /admin/incidents[/{id}[/patients]], POST /admin/incidents {title, severity, note, alerts?, subjects?, from?}, POST /admin/incidents/{id}/stage {stage, note, lessons?}, POST /admin/incidents/{id}/actions {action, target}",
        )),
    }
}
