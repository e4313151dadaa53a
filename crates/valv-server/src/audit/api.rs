//! The audit log over HTTP for the people who review it: one entry's canonical bytes
//! (`/audit/entries/{index}`), entries as FHIR AuditEvent resources (`/fhir/AuditEvent?…`), and a
//! patient's access log with everything an independent verifier needs
//! (`/fhir/Patient/{id}/$access-log`). Every read of the log is itself audited.
//!
//! Searches answer newest first. Without a patient they read the log backwards from the latest
//! entry their dates allow and stop once the page is full, at the dates' start, or after a fixed
//! budget of entries (then a `next` link continues): no search reads the whole log. A patient's
//! entries are found through their blind-index token.
//!
//! What a viewer is shown ([`View`]): a search's query can name other patients, so entries
//! carry only its salted commitment `query_sha256`; auditors are also shown the query and salt
//! (sealed beside the entry) to check against it, everyone else — a patient reading their own
//! log above all — the commitment only. Entries written before that change carry `query`
//! inside: non-auditors are shown such an entry without the query and without its canonical
//! bytes (which would contain it); its leaf hash and inclusion proof are still given.

use crate::audit::{open_entry, open_query, SaltedQuery};
use crate::error::ApiError;
use crate::request::{audit, audit_failure, authorize, Ctx, Touch};
use valv_policy::Action;
use crate::{App, Reply};
use base64::Engine as _;
use hyper::StatusCode;
use serde_json::{json, Value};
use valv_fhir::date::{self, Prefix};
use valv_store::AuditRow;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn audit_cipher(app: &App, now: i64) -> Result<valv_crypto::Cipher, ApiError> {
    Ok(valv_crypto::Cipher::new(&app.vault.named_key("audit", now).await?))
}

/// What the caller may see of entries' queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Auditors: the query and its salt, beside the commitment.
    Auditor,
    /// Everyone else (patients reading their own log): the commitment only, and no legacy query.
    Restricted,
}

impl View {
    pub fn of(ctx: &Ctx) -> View {
        if ctx.principal.roles.iter().any(|r| r == "auditor") {
            View::Auditor
        } else {
            View::Restricted
        }
    }
}

/// The query a legacy entry (written before queries were kept apart) carries inside it.
fn legacy_query(e: &Value) -> Option<&str> {
    e.get("query").and_then(Value::as_str).filter(|q| !q.is_empty())
}

/// The query an auditor is shown: the sealed record beside an entry, checked against the entry's
/// commitment (a record that does not open or does not match is an integrity failure).
fn revealed_query(cipher: &valv_crypto::Cipher, index: u64, row: &AuditRow, e: &Value, view: View) -> Result<Option<SaltedQuery>, ApiError> {
    if view != View::Auditor {
        return Ok(None);
    }
    let commitment = e.get("query_sha256").and_then(Value::as_str);
    let query = open_query(cipher, row).map_err(|err| ApiError::internal(format!("audit entry {index}: {err}")))?;
    match (commitment, query) {
        (Some(c), Some(q)) if q.matches(c) => Ok(Some(q)),
        (Some(_), Some(_)) => Err(ApiError::internal(format!("audit entry {index}: its sealed query does not match the entry's query_sha256"))),
        (Some(_), None) => Err(ApiError::internal(format!("audit entry {index}: the sealed query its query_sha256 commits to is missing"))),
        (None, Some(_)) => Err(ApiError::internal(format!("audit entry {index}: a sealed query beside an entry that commits to none"))),
        (None, None) => Ok(None),
    }
}

/// Opens a stored entry into its canonical bytes and parsed JSON.
fn open(cipher: &valv_crypto::Cipher, index: u64, row: &AuditRow) -> Result<(Vec<u8>, Value), ApiError> {
    let bytes = open_entry(cipher, row).map_err(|e| ApiError::internal(format!("audit entry {index} failed its integrity check: {e}")))?;
    let value = serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(format!("audit entry {index} is unreadable: {e}")))?;
    Ok((bytes, value))
}

pub async fn entry(app: &App, ctx: &Ctx, index: &str) -> Result<Reply, ApiError> {
    let index: u64 = index.parse().map_err(|_| ApiError::bad_request(format!("'{index}' is not a leaf index")))?;
    let id = index.to_string();
    let touch = Touch { interaction: "audit-read", action: Action::Read, resource_type: "AuditEvent", id: Some(&id), version: None, patient: None, query: None };
    let permit = authorize(app, ctx, &touch).await?;
    let cipher = audit_cipher(app, ctx.now).await?;
    let row = app.vault.store().audit_entries(index, index + 1).await?.pop().map(|(_, r)| r);
    let Some(row) = row else {
        return Err(audit_failure(app, ctx, &touch, ApiError::not_found(format!("there is no audit entry {index}"))).await);
    };
    let (bytes, e) = match open(&cipher, index, &row) {
        Ok(v) => v,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    // A legacy entry's bytes hold its query, which may name other patients: only auditors get them.
    if View::of(ctx) != View::Auditor && legacy_query(&e).is_some() {
        let refused = ApiError::forbidden(format!("audit entry {index} predates query commitments and holds a query; only auditors are shown it"));
        return Err(audit_failure(app, ctx, &touch, refused).await);
    }
    audit(app, vec![ctx.permitted(&touch, 200, &permit)?]).await?;
    let mut reply = Reply::text("application/json", String::from_utf8_lossy(&bytes).into_owned());
    reply.status = StatusCode::OK;
    Ok(reply)
}

/// One entry as an R4 AuditEvent shaped after IHE BALP; its id is the leaf index. `query` is the
/// query revealed to an auditor (checked against the entry's commitment); with
/// [`View::Restricted`] a legacy entry's query is withheld.
pub fn to_audit_event(index: u64, e: &Value, query: Option<&SaltedQuery>, view: View) -> Value {
    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
    let outcome = match s("outcome") {
        "success" => "0",
        "denied" => "4",
        _ => "8",
    };
    let mut entities = Vec::new();
    if let Some(p) = e.get("patient").and_then(Value::as_str) {
        entities.push(json!({"what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}}));
    }
    if let (Some(t), Some(id)) = (e.get("resource_type").and_then(Value::as_str), e.get("resource_id").and_then(Value::as_str)) {
        let what = match e.get("version").and_then(Value::as_u64) {
            Some(v) => format!("{t}/{id}/_history/{v}"),
            None => format!("{t}/{id}"),
        };
        entities.push(json!({"what": {"reference": what}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"}}));
    }
    let query_type = json!({"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"});
    if let Some(c) = e.get("query_sha256").and_then(Value::as_str) {
        let mut entity = json!({"type": query_type, "detail": [{"type": "query_sha256", "valueString": c}]});
        if let Some(q) = query {
            entity["query"] = json!(b64(q.text.as_bytes()));
            entity["detail"] = json!([{"type": "query_sha256", "valueString": c}, {"type": "query_salt", "valueBase64Binary": b64(&q.salt)}]);
        }
        entities.push(entity);
    } else if let Some(q) = legacy_query(e) {
        entities.push(match view {
            View::Auditor => json!({"type": query_type, "query": b64(q.as_bytes())}),
            View::Restricted => json!({"type": query_type, "detail": [{"type": "query", "valueString": WITHHELD}]}),
        });
    }
    let roles: Vec<Value> = e.get("roles").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).map(|r| json!({"text": r})).collect()).unwrap_or_default();
    let mut agent = json!({"who": {"display": s("agent_name")}, "requestor": true});
    if !s("agent_id").is_empty() {
        agent["who"]["identifier"] = json!({"system": "urn:valv:principal", "value": s("agent_id")});
    }
    if !roles.is_empty() {
        agent["role"] = Value::Array(roles);
    }
    if !s("source_address").is_empty() {
        agent["network"] = json!({"address": s("source_address"), "type": "2"});
    }
    if agent["who"]["display"] == "" {
        agent["who"]["display"] = json!("unauthenticated caller");
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": index.to_string(),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "urn:valv:interaction", "code": s("interaction")}],
        "action": s("action"),
        "recorded": date::format_instant(e.get("time").and_then(Value::as_i64).unwrap_or(0)),
        "outcome": outcome,
        "outcomeDesc": s("reason"),
        "agent": [agent],
        "source": {"observer": {"display": "Valv"}, "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]},
    });
    if let Some(p) = e.get("purpose_of_use").and_then(Value::as_str) {
        event["purposeOfEvent"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}]);
    }
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}

/// What a non-auditor is told in place of a legacy entry's query.
const WITHHELD: &str = "withheld: this entry was recorded before queries were kept out of entries, and its query may name other patients";

/// `patient`, `agent`, `date`, `outcome`, `action` filters over decrypted entries.
struct Filters {
    patient: Option<String>,
    agent: Option<String>,
    dates: Vec<(Prefix, date::Interval)>,
    outcome: Option<String>,
    action: Option<String>,
    count: usize,
    offset: usize,
    /// Only entries with a leaf index below this (the `next` link's cursor).
    before: Option<u64>,
}

fn parse_filters(pairs: &[(String, String)]) -> Result<Filters, ApiError> {
    let mut f = Filters { patient: None, agent: None, dates: Vec::new(), outcome: None, action: None, count: 50, offset: 0, before: None };
    for (k, v) in pairs {
        match k.as_str() {
            "patient" => f.patient = Some(v.strip_prefix("Patient/").unwrap_or(v).to_string()),
            "agent" => f.agent = Some(v.clone()),
            "date" => {
                let (p, rest) = Prefix::split(v)?;
                f.dates.push((p, date::parse(rest)?));
            }
            "outcome" => f.outcome = Some(v.clone()),
            "action" => f.action = Some(v.clone()),
            "_count" => f.count = v.parse::<usize>().map_err(|_| ApiError::bad_request("'_count' must be a number"))?.min(1000),
            "_offset" => f.offset = v.parse().map_err(|_| ApiError::bad_request("'_offset' must be a number"))?,
            "_before" => f.before = Some(v.parse().map_err(|_| ApiError::bad_request("'_before' must be a leaf index"))?),
            "_format" | "_pretty" => {}
            other => return Err(ApiError::bad_request(format!("unknown search parameter '{other}' for AuditEvent (patient, agent, date, outcome, action)"))),
        }
    }
    Ok(f)
}

impl Filters {
    /// The earliest and latest entry time (ms) the date filters allow, where they bound it.
    fn time_bounds(&self) -> (Option<i64>, Option<i64>) {
        let (mut lower, mut upper): (Option<i64>, Option<i64>) = (None, None);
        for (p, d) in &self.dates {
            let all = valv_fhir::date::Interval::ALL;
            let (lo, hi) = match p.candidate_interval(d) {
                Some(i) => ((i.start > all.start).then_some(i.start), (i.end < all.end).then_some(i.end)),
                None => (None, None),
            };
            if let Some(lo) = lo {
                lower = Some(lower.map_or(lo * 1000, |l| l.max(lo * 1000)));
            }
            if let Some(hi) = hi {
                upper = Some(upper.map_or(hi * 1000, |u| u.min(hi * 1000)));
            }
        }
        (lower, upper)
    }

    fn matches(&self, e: &Value) -> bool {
        let s = |k: &str| e.get(k).and_then(Value::as_str);
        let outcome_code = match s("outcome") {
            Some("success") => "0",
            Some("denied") => "4",
            _ => "8",
        };
        let time = e.get("time").and_then(Value::as_i64).unwrap_or(0).div_euclid(1000);
        let t = date::Interval { start: time, end: time + 1 };
        self.patient.as_deref().is_none_or(|p| s("patient") == Some(p))
            && self.agent.as_deref().is_none_or(|a| s("agent_id") == Some(a) || s("agent_name") == Some(a))
            && self.outcome.as_deref().is_none_or(|o| o == outcome_code || s("outcome") == Some(o))
            && self.action.as_deref().is_none_or(|a| s("action") == Some(a))
            && self.dates.iter().all(|(p, d)| p.matches(d, &t))
    }
}

/// Entries read per store query while scanning backwards.
const SCAN_CHUNK: u64 = 1_000;
/// Entries opened at most by one search without a patient: a search costs at most this much
/// whatever the log's size; beyond it the answer carries a `next` link to continue from.
const SCAN_BUDGET: usize = 50_000;
/// Entries reach the log in the order their requests finished, stamped with the time their
/// requests started: one may follow a later-stamped one by up to a request's length.
const TIME_SLACK_MS: i64 = 300_000;

fn entry_time(e: &Value) -> i64 {
    e.get("time").and_then(Value::as_i64).unwrap_or(0)
}

/// The first leaf index below `end` whose entry (or a later one) is stamped after `upper`:
/// entries from there on can be skipped by a search whose dates end at `upper`. Binary search
/// over the log, opening O(log n) entries.
async fn end_for_upper_bound(app: &App, cipher: &valv_crypto::Cipher, end: u64, upper: i64) -> Result<u64, ApiError> {
    let store = app.vault.store();
    let (mut lo, mut hi) = (0u64, end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // A deleted row leaves a hole: take the first row at or after `mid`.
        let Some((index, row)) = store.audit_entries(mid, hi.min(mid + 16)).await?.into_iter().next() else {
            hi = mid;
            continue;
        };
        let (_, e) = open(cipher, index, &row)?;
        if entry_time(&e) > upper + TIME_SLACK_MS {
            hi = mid;
        } else {
            lo = index + 1;
        }
    }
    Ok(lo)
}

/// One search's matches, newest first, and where it stopped.
struct Scan {
    matched: Vec<(u64, Value)>,
    /// Every entry the filters could match was looked at (so `total` is exact).
    complete: bool,
    /// Where a `next` page continues (`_before`), when there is more to look at.
    resume: Option<u64>,
}

/// Collects up to `want` matches, newest first: a patient's entries through their index, others
/// by reading the log backwards from the latest entry the dates allow, stopping at the dates'
/// start or after [`SCAN_BUDGET`] entries, so that no search reads the whole log.
async fn scan(app: &App, cipher: &valv_crypto::Cipher, filters: &Filters, want: usize) -> Result<Scan, ApiError> {
    let store = app.vault.store();
    let (lower, upper) = filters.time_bounds();
    if let Some(p) = filters.patient.as_deref() {
        // Every entry of the patient is looked at (so `total` is exact), newest first through
        // the patient index, up to the same budget as any other search.
        let token = app.vault.audit_patient_token(p);
        let (mut end, mut matched, mut opened) = (filters.before.unwrap_or(u64::MAX), Vec::new(), 0usize);
        loop {
            if opened >= SCAN_BUDGET {
                return Ok(Scan { matched, complete: false, resume: Some(end) });
            }
            let rows = store.audit_entries_for(&token, 0..end, SCAN_CHUNK as usize, true).await?;
            for (index, row) in &rows {
                let (_, e) = open(cipher, *index, row)?;
                opened += 1;
                end = *index;
                if filters.matches(&e) {
                    matched.push((*index, e));
                }
            }
            if rows.len() < SCAN_CHUNK as usize {
                return Ok(Scan { matched, complete: true, resume: None });
            }
        }
    }
    let mut end = filters.before.unwrap_or(u64::MAX).min(store.audit_size().await?);
    if let Some(upper) = upper {
        end = end_for_upper_bound(app, cipher, end, upper).await?;
    }
    let (mut matched, mut opened) = (Vec::new(), 0usize);
    while end > 0 {
        if opened >= SCAN_BUDGET {
            return Ok(Scan { matched, complete: false, resume: Some(end) });
        }
        let from = end.saturating_sub(SCAN_CHUNK);
        let rows = store.audit_entries(from, end).await?;
        for (index, row) in rows.iter().rev() {
            let (_, e) = open(cipher, *index, row)?;
            opened += 1;
            if lower.is_some_and(|l| entry_time(&e) < l - TIME_SLACK_MS) {
                return Ok(Scan { matched, complete: true, resume: None });
            }
            if filters.matches(&e) {
                matched.push((*index, e));
                if matched.len() >= want {
                    return Ok(Scan { matched, complete: false, resume: Some(*index) });
                }
            }
        }
        end = from;
    }
    Ok(Scan { matched, complete: true, resume: None })
}

pub async fn search(app: &App, ctx: &Ctx, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    let query = crate::http::query::encode(pairs);
    let touch = Touch { interaction: "search-type", action: Action::Search, resource_type: "AuditEvent", id: None, version: None, patient: None, query: Some(query.clone()) };
    let filters = match parse_filters(pairs) {
        Ok(f) => f,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    // A search for one patient's entries is about that patient (a patient may search their own).
    let touch = Touch { patient: filters.patient.as_deref(), ..touch };
    let permit = authorize(app, ctx, &touch).await?;
    let cipher = audit_cipher(app, ctx.now).await?;
    let view = View::of(ctx);
    // One more than the page, to know whether a next page exists.
    let want = filters.offset.saturating_add(filters.count).saturating_add(1);
    let found = match scan(app, &cipher, &filters, want).await {
        Ok(f) => f,
        Err(err) => return Err(audit_failure(app, ctx, &touch, err).await),
    };
    let mut page = Vec::new();
    for (index, e) in found.matched.iter().skip(filters.offset).take(filters.count) {
        let revealed = match revealed_query(&cipher, *index, &app_row(app, *index).await?, e, view) {
            Ok(q) => q,
            Err(err) => return Err(audit_failure(app, ctx, &touch, err).await),
        };
        page.push(to_audit_event(*index, e, revealed.as_ref(), view));
    }
    audit(app, vec![ctx.permitted(&touch, 200, &permit)?]).await?;
    // Exact only when every entry the filters could match was looked at (FHIR leaves `total`
    // out otherwise); the next page continues below the last entry shown or looked at.
    let total = found.complete.then_some(found.matched.len());
    let next = match (found.matched.get(filters.offset + filters.count), found.resume) {
        (Some((index, _)), _) => Some(index + 1),
        (None, resume) => resume,
    };
    let mut links = vec![valv_fhir::bundle::link("self", &format!("{}/AuditEvent?{query}", app.base_url))];
    if let Some(before) = next {
        let mut rest: Vec<(String, String)> = pairs.iter().filter(|(k, _)| k != "_before" && k != "_offset").cloned().collect();
        rest.push(("_before".into(), before.to_string()));
        links.push(valv_fhir::bundle::link("next", &format!("{}/AuditEvent?{}", app.base_url, crate::http::query::encode(&rest))));
    }
    let entries = page
        .into_iter()
        .map(|r| json!({"fullUrl": format!("{}/AuditEvent/{}", app.base_url, r["id"].as_str().unwrap_or("")), "resource": r, "search": {"mode": "match"}}))
        .collect();
    Ok(Reply::json(StatusCode::OK, valv_fhir::bundle::collection("searchset", &valv_store::vault::new_id()?, total, links, entries)))
}

/// One stored entry's row (a page's few entries are read again for their sealed query records).
async fn app_row(app: &App, index: u64) -> Result<AuditRow, ApiError> {
    app.vault.store().audit_entries(index, index + 1).await?.pop().map(|(_, r)| r).ok_or_else(|| ApiError::internal(format!("audit entry {index} vanished")))
}

/// Entries of a patient's access log per answer at most (and when `_count` is not given).
pub const ACCESS_LOG_PAGE: usize = 1_000;

/// Which part of a patient's access log to show: the entries after a leaf index, at most a
/// number of them (`None`: all, for the console's and `$export-record`'s files).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogPage {
    pub after: Option<u64>,
    pub count: Option<usize>,
}

impl LogPage {
    /// `_count` (1 to [`ACCESS_LOG_PAGE`]) and `_after` (a leaf index); other parameters are
    /// ignored, as before paging.
    fn parse(pairs: &[(String, String)]) -> Result<LogPage, ApiError> {
        let mut page = LogPage { after: None, count: Some(ACCESS_LOG_PAGE) };
        for (k, v) in pairs {
            match k.as_str() {
                "_count" => match v.parse::<usize>() {
                    Ok(n) if (1..=ACCESS_LOG_PAGE).contains(&n) => page.count = Some(n),
                    _ => return Err(ApiError::bad_request(format!("'_count' must be a number from 1 to {ACCESS_LOG_PAGE}"))),
                },
                "_after" => page.after = Some(v.parse().map_err(|_| ApiError::bad_request("'_after' must be a leaf index"))?),
                _ => {}
            }
        }
        Ok(page)
    }
}

/// Who accessed this patient's record, each entry with its canonical bytes and an inclusion
/// proof against the latest signed checkpoint, plus that checkpoint and the log's key; a page at
/// a time, with a `next` link while there is more.
pub async fn access_log(app: &App, ctx: &Ctx, patient: &str, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    crate::fhir::check_id(patient)?;
    let touch = Touch { interaction: "access-log", action: Action::Read, resource_type: "AuditEvent", id: None, version: None, patient: Some(patient), query: None };
    let page = match LogPage::parse(pairs) {
        Ok(p) => p,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let permit = authorize(app, ctx, &touch).await?;
    let params = match access_log_parameters(app, patient, View::of(ctx), ctx.now, page).await {
        Ok(p) => p,
        Err(AccessLogError::Entry(err)) => return Err(audit_failure(app, ctx, &touch, err).await),
        Err(AccessLogError::Api(e)) => return Err(e),
    };
    audit(app, vec![ctx.permitted(&touch, 200, &permit)?]).await?;
    Ok(Reply::json(StatusCode::OK, params))
}

/// Why a patient's access log could not be assembled: an entry that does not open (an integrity
/// failure, audited as such by the caller) or anything else.
pub enum AccessLogError {
    Entry(ApiError),
    Api(ApiError),
}

impl From<ApiError> for AccessLogError {
    fn from(e: ApiError) -> Self {
        AccessLogError::Api(e)
    }
}

impl From<valv_store::StoreError> for AccessLogError {
    fn from(e: valv_store::StoreError) -> Self {
        AccessLogError::Api(e.into())
    }
}

/// The `Parameters` of [`access_log`], for whoever has been allowed to see it (the request path
/// above, or `valv export` at the console, which shows the patient the restricted view).
pub async fn access_log_parameters(app: &App, patient: &str, view: View, now: i64, page: LogPage) -> Result<Value, AccessLogError> {
    let cipher = audit_cipher(app, now).await?;
    let store = app.vault.store();
    let checkpoint = store.latest_checkpoint().await?.ok_or_else(|| ApiError::unavailable("no checkpoint has been signed yet"))?;
    // The key that signed this checkpoint (after a signing-key rotation, not always the newest).
    let log_key = app.log_keys().vkey_of(&checkpoint.note).map_err(ApiError::internal)?;
    let mut params = vec![json!({"name": "checkpoint", "valueString": checkpoint.note}), json!({"name": "logKey", "valueString": log_key})];
    let shown = LogView { cipher: &cipher, store: &**store, checkpoint: &checkpoint, view };
    let token = app.vault.audit_patient_token(patient);
    let (mut from, limit) = (page.after.map_or(0, |a| a.saturating_add(1)), page.count.unwrap_or(usize::MAX));
    let (mut listed, mut last) = (0usize, None);
    // The page and one more (to know whether a next page exists), at most a page per read.
    let chunk = limit.saturating_add(1).min(ACCESS_LOG_PAGE);
    'pages: loop {
        let rows = store.audit_entries_for(&token, from..u64::MAX, chunk, false).await?;
        let more = rows.len() == chunk;
        for (index, row) in rows {
            from = index + 1;
            let (bytes, e) = open(&cipher, index, &row).map_err(AccessLogError::Entry)?;
            // The index is not authenticated: only entries that name this patient belong here.
            if e.get("patient").and_then(Value::as_str) != Some(patient) {
                continue;
            }
            if listed == limit {
                // One more is there: the next page starts after the last one shown.
                let after = last.unwrap_or(index.saturating_sub(1));
                let url = format!("{}/Patient/{patient}/$access-log?_count={limit}&_after={after}", app.base_url);
                params.push(json!({"name": "next", "valueUri": url}));
                break 'pages;
            }
            listed += 1;
            last = Some(index);
            params.push(access_log_entry(&shown, index, &row, &bytes, &e).await?);
        }
        if !more {
            break;
        }
    }
    Ok(json!({"resourceType": "Parameters", "parameter": params}))
}

/// What every entry of one access-log answer is shown against.
struct LogView<'a> {
    cipher: &'a valv_crypto::Cipher,
    store: &'a dyn valv_store::Store,
    checkpoint: &'a valv_store::StoredCheckpoint,
    view: View,
}

/// One entry of a patient's access log: its index, canonical bytes (or why they are withheld),
/// leaf hash, inclusion proof (or that it is newer than the checkpoint) and AuditEvent.
async fn access_log_entry(v: &LogView<'_>, index: u64, row: &AuditRow, bytes: &[u8], e: &Value) -> Result<Value, AccessLogError> {
    let query = revealed_query(v.cipher, index, row, e, v.view).map_err(AccessLogError::Entry)?;
    let mut parts = vec![json!({"name": "index", "valueString": index.to_string()})];
    // A legacy entry's bytes hold its query: a non-auditor gets its leaf hash and proof only.
    if v.view == View::Restricted && legacy_query(e).is_some() {
        parts.push(json!({"name": "canonicalWithheld", "valueString": WITHHELD}));
    } else {
        parts.push(json!({"name": "canonical", "valueString": String::from_utf8_lossy(bytes)}));
    }
    parts.push(json!({"name": "leafHash", "valueBase64Binary": b64(&row.leaf_hash)}));
    if index < v.checkpoint.size {
        // From the stored tiles: O(log n) reads whatever the log's size.
        let proof = crate::audit::log::inclusion(v.store, index, v.checkpoint.size).await.map_err(|e| match e {
            crate::audit::log::ProofError::Invalid(m) => ApiError::internal(m),
            crate::audit::log::ProofError::Store(s) => s.into(),
        })?;
        parts.extend(proof.iter().map(|h| json!({"name": "proof", "valueBase64Binary": b64(h)})));
    } else {
        parts.push(json!({"name": "pending", "valueString": "recorded after the latest checkpoint; ask again in a second"}));
    }
    parts.push(json!({"name": "event", "resource": to_audit_event(index, e, query.as_ref(), v.view)}));
    Ok(json!({"name": "entry", "part": parts}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_events_are_valid_r4() {
        let e = json!({"event_id":"ab","time":1700000000000i64,"request_id":"r","action":"R","interaction":"read","outcome":"denied",
            "status":403,"agent_id":"k","agent_name":"svc","roles":["service"],"source_address":"127.0.0.1","purpose_of_use":"TREAT",
            "patient":"p1","resource_type":"Observation","resource_id":"o1","version":2,"query":"code=x","reason":"no-role-permits"});
        let ev = to_audit_event(7, &e, None, View::Auditor);
        valv_fhir::r4::validate(&ev).unwrap_or_else(|err| panic!("{err}: {ev}"));
        assert_eq!(ev["outcome"], "4");
        assert_eq!(ev["entity"][0]["what"]["reference"], "Patient/p1");
        let bare = json!({"event_id":"ab","time":0,"request_id":"r","action":"E","interaction":"authenticate","outcome":"denied","status":401,
            "agent_id":"","agent_name":"","roles":[],"source_address":"","reason":"no-credential"});
        valv_fhir::r4::validate(&to_audit_event(0, &bare, None, View::Restricted)).unwrap_or_else(|err| panic!("{err}"));
    }

    #[test]
    fn queries_are_shown_to_auditors_and_withheld_from_everyone_else() {
        let q = SaltedQuery::new([3; 16], "identifier=x|194511239917");
        let new = json!({"event_id":"ab","time":0,"request_id":"r","action":"E","interaction":"search-type","outcome":"success","status":200,
            "agent_id":"k","agent_name":"svc","roles":["service"],"source_address":"127.0.0.1","patient":"p1","resource_type":"Patient",
            "query_sha256": q.commitment(),"reason":"r"});
        let shown = to_audit_event(1, &new, Some(&q), View::Auditor);
        valv_fhir::r4::validate(&shown).unwrap_or_else(|err| panic!("{err}: {shown}"));
        let text = shown.to_string();
        assert!(text.contains(&b64(q.text.as_bytes())) && text.contains(&b64(&q.salt)) && text.contains(&q.commitment()), "{text}");
        let hidden = to_audit_event(1, &new, None, View::Restricted);
        valv_fhir::r4::validate(&hidden).unwrap_or_else(|err| panic!("{err}: {hidden}"));
        assert!(hidden.to_string().contains(&q.commitment()) && !hidden.to_string().contains("\"query\""), "{hidden}");
        let mut legacy = new.clone();
        if let Some(o) = legacy.as_object_mut() {
            o.remove("query_sha256");
        }
        legacy["query"] = json!(q.text);
        let hidden = to_audit_event(1, &legacy, None, View::Restricted);
        valv_fhir::r4::validate(&hidden).unwrap_or_else(|err| panic!("{err}: {hidden}"));
        assert!(!hidden.to_string().contains(&b64(q.text.as_bytes())) && hidden.to_string().contains("withheld"), "{hidden}");
        assert!(to_audit_event(1, &legacy, None, View::Auditor).to_string().contains(&b64(q.text.as_bytes())));
    }
}
