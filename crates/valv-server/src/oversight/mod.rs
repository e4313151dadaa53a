//! Oversight: the systematic log reviews ([`reviews`]), incidents ([`incidents`]) and the
//! addresses incidents block ([`blocks`]). The rules are pure (`valv-oversight`); this module
//! stores their records sealed (store table `cases`, AEAD with the audit key, the AAD naming
//! kind, id and version, so a row altered or moved between records does not open), reads the
//! audit log for them, executes containment, and audits every step.
//!
//! The HTTP API (`/admin/reviews`, `/admin/incidents`) and the console (`valv review`,
//! `valv incident`) call the same functions with an [`Actor`].

pub mod blocks;
pub mod compliance;
pub mod incidents;
pub mod reviews;

use crate::audit::{AuditEvent, Outcome};
use crate::error::ApiError;
use crate::request::Ctx;
use crate::App;
use serde::de::DeserializeOwned;
use serde::Serialize;
use valv_crypto::{Aad, Cipher};
use valv_detect::Entry;
use valv_store::CaseRow;

/// Who acts: a signed-in person over the API, or the operator at the console.
#[derive(Debug, Clone)]
pub struct Actor {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub source: String,
    pub request_id: String,
    pub purpose: Option<String>,
}

impl Actor {
    pub fn of(ctx: &Ctx) -> Actor {
        Actor {
            id: ctx.principal.id.clone(),
            name: ctx.principal.name.clone(),
            roles: ctx.principal.roles.clone(),
            source: ctx.source.clone(),
            request_id: ctx.request_id.clone(),
            purpose: Some(ctx.purpose().to_string()),
        }
    }

    /// The machine's operator (`valv review`, `valv incident`), recorded as in `valv user`.
    pub fn console() -> Result<Actor, ApiError> {
        Ok(Actor {
            id: "local-operator".into(),
            name: format!("console:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into())),
            roles: vec!["admin".into(), "auditor".into()],
            source: "console".into(),
            request_id: valv_store::vault::new_id()?,
            purpose: None,
        })
    }

    fn event(&self, now: i64, interaction: &'static str, outcome: Outcome, status: u16, record: (&str, &str), reason: &str) -> Result<AuditEvent, ApiError> {
        Ok(AuditEvent {
            event_id: valv_store::vault::new_id()?,
            time: now,
            request_id: self.request_id.clone(),
            action: if interaction.ends_with("-read") { "R" } else { "E" },
            interaction,
            outcome,
            status,
            agent_id: self.id.clone(),
            agent_name: self.name.clone(),
            roles: self.roles.clone(),
            source_address: self.source.clone(),
            purpose_of_use: self.purpose.clone(),
            patient: None,
            resource_type: (!record.0.is_empty()).then(|| record.0.to_string()),
            resource_id: (!record.1.is_empty()).then(|| record.1.to_string()),
            version: None,
            query: None,
            reason: reason.to_string(),
        })
    }

    /// Audits that `patients` were disclosed to this actor (one entry each, naming the patient,
    /// so each patient's `$access-log` shows it).
    pub async fn disclosed(&self, app: &App, interaction: &'static str, record: (&str, &str), patients: &[String], reason: &str) -> Result<(), ApiError> {
        let now = app.clock.now_ms();
        let mut events = Vec::with_capacity(patients.len());
        for p in patients {
            let mut e = self.event(now, interaction, Outcome::Success, 200, record, reason)?;
            e.patient = Some(p.clone());
            events.push(e);
        }
        if events.is_empty() {
            return Ok(());
        }
        crate::request::audit(app, events).await
    }

    /// Audits the outcome of one piece of work (`record`: the kind and id it concerns, when
    /// known) and passes it on; a failure is marked recorded.
    pub async fn audited<T>(&self, app: &App, interaction: &'static str, record: (&str, &str), result: Result<(T, String), ApiError>) -> Result<T, ApiError> {
        let now = app.clock.now_ms();
        match result {
            Ok((value, reason)) => {
                crate::request::audit(app, vec![self.event(now, interaction, Outcome::Success, 200, record, &reason)?]).await?;
                Ok(value)
            }
            Err(e) if e.audited => Err(e),
            Err(e) => {
                let outcome = if e.status.is_server_error() { Outcome::Error } else { Outcome::Denied };
                crate::request::audit(app, vec![self.event(now, interaction, outcome, e.status.as_u16(), record, &e.diagnostics)?]).await?;
                Err(e.recorded())
            }
        }
    }
}

/// A new record's id: made before the work so that its audit entry names it.
pub fn new_record_id() -> Result<String, ApiError> {
    Ok(valv_store::vault::new_id()?)
}

/// The record a request concerns: the first path segment, or a new id for a creating POST.
fn record_id(method: &hyper::Method, segs: &[String]) -> Result<String, ApiError> {
    match segs.first() {
        Some(id) => check_id(id, "a record").map(|()| id.clone()),
        None if method == hyper::Method::POST => new_record_id(),
        None => Ok(String::new()),
    }
}

/// A record id as Valv makes them (and as a path segment must be).
fn check_id(id: &str, what: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::bad_request(format!("'{id}' is not {what} id")));
    }
    Ok(())
}

async fn cipher(app: &App) -> Result<Cipher, ApiError> {
    Ok(Cipher::new(&app.vault.named_key("audit", app.clock.now_ms()).await?))
}

fn aad<'a>(kind: &'a str, id: &'a str, version: u64) -> Aad<'a> {
    Aad { purpose: "case", resource_type: kind, id, version, patient: "" }
}

fn open<T: DeserializeOwned>(cipher: &Cipher, row: &CaseRow) -> Result<T, ApiError> {
    let altered = || ApiError::from(valv_store::StoreError::Integrity(format!("{} {} does not open (altered outside Valv)", row.kind, row.id)));
    let json = cipher.open(&aad(&row.kind, &row.id, row.version), &row.sealed).map_err(|_| altered())?;
    serde_json::from_slice(&json).map_err(|_| altered())
}

/// One record and its version.
async fn load<T: DeserializeOwned>(app: &App, kind: &str, id: &str) -> Result<Option<(T, u64)>, ApiError> {
    load_with(app, &cipher(app).await?, kind, id).await
}

/// [`load`] with the audit key's cipher at hand.
pub(crate) async fn load_with<T: DeserializeOwned>(app: &App, cipher: &Cipher, kind: &str, id: &str) -> Result<Option<(T, u64)>, ApiError> {
    let Some(row) = app.vault.store().case(kind, id).await? else { return Ok(None) };
    Ok(Some((open(cipher, &row)?, row.version)))
}

/// Every record of a kind, by id.
async fn load_all<T: DeserializeOwned>(app: &App, kind: &str) -> Result<Vec<T>, ApiError> {
    let cipher = cipher(app).await?;
    app.vault.store().cases(kind).await?.iter().map(|r| open(&cipher, r)).collect()
}

/// Stores `value` as `version` of the record (1 creates it): a concurrent change is a 409.
async fn save<T: Serialize>(app: &App, kind: &str, id: &str, version: u64, value: &T) -> Result<(), ApiError> {
    save_with(app, &cipher(app).await?, kind, id, version, value).await
}

/// [`save`] with the audit key's cipher at hand.
pub(crate) async fn save_with<T: Serialize>(app: &App, cipher: &Cipher, kind: &str, id: &str, version: u64, value: &T) -> Result<(), ApiError> {
    let json = serde_json::to_vec(value).map_err(|e| ApiError::internal(format!("encoding {kind} {id}: {e}")))?;
    let sealed = cipher.seal(crate::detect::random_nonce().map_err(ApiError::internal)?, &aad(kind, id, version), &json);
    app.vault.store().put_case(&CaseRow { kind: kind.into(), id: id.into(), version, sealed }).await?;
    Ok(())
}

/// Entries read per request to the store while scanning.
const SCAN_BATCH: u64 = 4096;
/// Entries are appended in about the order of their times; a scan starts this much earlier.
const SCAN_MARGIN_MS: i64 = 60_000;

/// Shows `see` every audit entry with a time in `[from, to)` (and a few either side: callers
/// filter by time). Finds the start by bisecting on entry times, then reads forward until
/// entries are past `to`. An entry that does not open stops the scan: an integrity failure.
async fn scan(app: &App, from: i64, to: i64, see: &mut (dyn FnMut(&Entry) + Send)) -> Result<(), ApiError> {
    let store = app.vault.store().clone();
    let cipher = cipher(app).await?;
    let size = store.audit_size().await?;
    let entry = |index: u64, row: &valv_store::AuditRow| -> Result<Entry, ApiError> {
        let bytes = crate::audit::open_entry(&cipher, row).map_err(|e| ApiError::from(valv_store::StoreError::Integrity(format!("audit entry {index} does not open: {e}"))))?;
        Entry::parse(index, &bytes).map_err(ApiError::internal)
    };
    // The first entry at or after `from - margin`.
    let (mut lo, mut hi) = (0u64, size);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let rows = store.audit_entries(mid, mid + 1).await?;
        let Some((i, row)) = rows.first() else { return Err(ApiError::internal(format!("audit entry {mid} is missing"))) };
        if entry(*i, row)?.time < from - SCAN_MARGIN_MS {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut at = lo;
    while at < size {
        let rows = store.audit_entries(at, size.min(at + SCAN_BATCH)).await?;
        if rows.is_empty() {
            return Err(ApiError::internal(format!("audit entries from {at} are missing")));
        }
        for (i, row) in &rows {
            let e = entry(*i, row)?;
            if e.time >= to.saturating_add(SCAN_MARGIN_MS) {
                return Ok(());
            }
            see(&e);
            at = i + 1;
        }
    }
    Ok(())
}

impl From<valv_oversight::Error> for ApiError {
    fn from(e: valv_oversight::Error) -> Self {
        match e {
            valv_oversight::Error::Invalid(m) => ApiError::bad_request(m),
            valv_oversight::Error::State(m) => ApiError::new(hyper::StatusCode::CONFLICT, "business-rule", m),
        }
    }
}

/// The path segments after `prefix`.
fn segments(path: &str, prefix: &str) -> Vec<String> {
    path.strip_prefix(prefix).unwrap_or(path).split('/').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// A body's string field, when present.
fn text<'a>(body: &'a serde_json::Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("'{name}' must be a string"))),
    }
}

fn required<'a>(body: &'a serde_json::Value, name: &str) -> Result<&'a str, ApiError> {
    text(body, name)?.ok_or_else(|| ApiError::bad_request(format!("'{name}' is required")))
}

/// The start of a FHIR date, dateTime or instant, in ms (`2026-11-01` is its midnight UTC).
pub fn instant(s: &str, name: &str) -> Result<i64, ApiError> {
    valv_fhir::date::parse(s).map(|i| i.start.saturating_mul(1000)).map_err(|_| ApiError::bad_request(format!("'{name}' is not a date or instant: '{s}'")))
}
