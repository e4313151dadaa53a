//! The FHIR request path, top to bottom: authenticate -> parse -> locate -> decide -> audit ->
//! act -> respond. Every interaction, whether it arrives on its own or inside a batch, runs
//! through [`execute`]; transactions run through [`transaction`] so they commit atomically.

mod bulk;
mod chain;
mod conditional;
mod everything;
pub mod binary;
pub mod export;
mod include;
mod patch;
pub mod resumable;
pub mod scan;
pub mod ticket;
pub use bulk::{pairs_from_parameters as export_pairs, run as run_exports, Exports, Level as ExportLevel, NDJSON};
pub use patch::PatchKind;
use crate::audit::{AuditEvent, Outcome};
pub use crate::request::{authenticate, record_unaudited, Ctx};
use crate::request::{audit, audit_failure, authorize, authorize_filtered, Filter, Permit, Touch};
use crate::error::ApiError;
use valv_policy::Action;
use crate::{App, Reply};
use hyper::StatusCode;
use serde_json::{json, Value};
use valv_fhir::bundle::{self, BundleKind, Method};
use valv_fhir::{capability, compartment, date, r4, search};
use valv_store::vault::{self, Committed, Resource, WriteOp};

/// What the caller asked for, parsed from the URL, headers and body.
#[derive(Debug)]
pub enum Interaction {
    Read { resource_type: String, id: String },
    VRead { resource_type: String, id: String, version: u64 },
    Search { resource_type: String, pairs: Vec<(String, String)> },
    HistoryInstance { resource_type: String, id: String, pairs: Vec<(String, String)> },
    HistoryType { resource_type: String, pairs: Vec<(String, String)> },
    /// With `if_none_exist`, a conditional create: the search parameters of `If-None-Exist`.
    Create { resource_type: String, body: Value, if_none_exist: Option<Vec<(String, String)>> },
    Update { resource_type: String, id: String, body: Value, if_match: Option<u64> },
    Delete { resource_type: String, id: String, if_match: Option<u64> },
    /// `PUT /fhir/{type}?{criteria}`
    ConditionalUpdate { resource_type: String, pairs: Vec<(String, String)>, body: Value, if_match: Option<u64> },
    /// `DELETE /fhir/{type}?{criteria}`
    ConditionalDelete { resource_type: String, pairs: Vec<(String, String)> },
    /// `PATCH /fhir/{type}/{id}`
    Patch { resource_type: String, id: String, patch: Value, kind: PatchKind, if_match: Option<u64> },
    Bundle { body: Value },
    /// `GET /fhir/Patient/{id}/$access-log`
    AccessLog { id: String, pairs: Vec<(String, String)> },
    /// `POST /fhir/Patient/{id}/$break-glass`
    BreakGlass { id: String, body: Value },
    /// `POST /fhir/Patient/{id}/$export-record`
    ExportRecord { id: String, body: Value },
    /// `GET /fhir/Patient/{id}/$everything`
    Everything { id: String, pairs: Vec<(String, String)> },
    /// `GET|POST /fhir/$export`, `/fhir/Patient/$export`, `/fhir/Group/{id}/$export`
    Export { level: ExportLevel, pairs: Vec<(String, String)>, respond_async: bool },
    /// `GET /fhir/$export-status/{job}`
    ExportStatus { job: String },
    /// `DELETE /fhir/$export-status/{job}`
    ExportCancel { job: String },
    /// `GET /fhir/$export-file/{job}/{n}`
    ExportFile { job: String, n: String },
}

impl Interaction {
    /// The resource type named by the URL (`Bundle` for transactions and batches).
    pub fn resource_type(&self) -> &str {
        match self {
            Interaction::Read { resource_type, .. }
            | Interaction::VRead { resource_type, .. }
            | Interaction::Search { resource_type, .. }
            | Interaction::HistoryInstance { resource_type, .. }
            | Interaction::HistoryType { resource_type, .. }
            | Interaction::Create { resource_type, .. }
            | Interaction::Update { resource_type, .. }
            | Interaction::Delete { resource_type, .. }
            | Interaction::ConditionalUpdate { resource_type, .. }
            | Interaction::ConditionalDelete { resource_type, .. }
            | Interaction::Patch { resource_type, .. } => resource_type,
            Interaction::Bundle { .. } => "Bundle",
            Interaction::AccessLog { .. } | Interaction::BreakGlass { .. } | Interaction::ExportRecord { .. } | Interaction::Everything { .. } => "Patient",
            Interaction::Export { level: ExportLevel::Patient, .. } => "Patient",
            Interaction::Export { level: ExportLevel::Group(_), .. } => "Group",
            Interaction::Export { .. } | Interaction::ExportStatus { .. } | Interaction::ExportCancel { .. } | Interaction::ExportFile { .. } => "",
        }
    }

    pub fn route(&self) -> &'static str {
        match self {
            Interaction::Read { .. } => "fhir_read",
            Interaction::VRead { .. } => "fhir_vread",
            Interaction::Search { .. } => "fhir_search",
            Interaction::HistoryInstance { .. } | Interaction::HistoryType { .. } => "fhir_history",
            Interaction::Create { .. } => "fhir_create",
            Interaction::Update { .. } | Interaction::ConditionalUpdate { .. } => "fhir_update",
            Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => "fhir_delete",
            Interaction::Patch { .. } => "fhir_patch",
            Interaction::Bundle { .. } => "fhir_bundle",
            Interaction::AccessLog { .. } => "fhir_access_log",
            Interaction::BreakGlass { .. } => "fhir_break_glass",
            Interaction::ExportRecord { .. } => "fhir_export_record",
            Interaction::Everything { .. } => "fhir_everything",
            Interaction::Export { .. } => "fhir_export",
            Interaction::ExportStatus { .. } | Interaction::ExportCancel { .. } => "fhir_export_status",
            Interaction::ExportFile { .. } => "fhir_export_file",
        }
    }
}

/// The answer for an id that does not exist: a caller who could not see it if it did (people,
/// who reach patient data only through a patient they are related to) gets the refusal they would
/// get for an existing one of a patient they may not see — decided and audited the same way — so
/// 403 and 404 tell them nothing; anyone else gets `not_found`.
async fn unknown_id(app: &App, ctx: &Ctx, touch: &Touch<'_>, not_found: ApiError) -> ApiError {
    match refuse_unless_visible(app, ctx, touch).await {
        Err(refused) => refused,
        Ok(()) => not_found,
    }
}

/// Decides `touch` as if its resource belonged to no patient (people are refused, and audited).
async fn refuse_unless_visible(app: &App, ctx: &Ctx, touch: &Touch<'_>) -> Result<(), ApiError> {
    let nobody = Touch {
        interaction: touch.interaction,
        action: touch.action,
        resource_type: touch.resource_type,
        id: touch.id,
        version: touch.version,
        patient: None,
        query: touch.query.clone(),
    };
    authorize(app, ctx, &nobody).await.map(|_| ())
}

/// Checks the type in a URL: known to R4 (else 404) and storable (else 405).
pub fn check_type(resource_type: &str) -> Result<(), ApiError> {
    if !r4::is_resource_type(resource_type) {
        return Err(ApiError::not_found(format!("'{resource_type}' is not a FHIR R4 resource type")));
    }
    if !capability::is_storable(resource_type) {
        return Err(ApiError::method_not_allowed(format!("{resource_type} resources cannot be stored or read through this endpoint")));
    }
    Ok(())
}

pub fn check_id(id: &str) -> Result<(), ApiError> {
    if valv_fhir::id::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("'{id}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")))
    }
}

/// The body of a create or update: a JSON object of the URL's type.
pub fn check_body(resource_type: &str, body: &Value) -> Result<(), ApiError> {
    let rt = body
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "structure", "the body must be a JSON object with a string resourceType"))?;
    if !r4::is_resource_type(rt) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "structure", format!("'{rt}' is not a FHIR R4 resource type")));
    }
    if rt != resource_type {
        return Err(ApiError::bad_request(format!("the body is a {rt} but the URL names {resource_type}")));
    }
    r4::validate(body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "structure", e.to_string()))
}

/// Runs one interaction for an authenticated caller.
pub async fn execute(app: &App, ctx: &Ctx, interaction: Interaction) -> Result<Reply, ApiError> {
    match interaction {
        Interaction::Read { resource_type, id } => read(app, ctx, &resource_type, &id, None).await,
        Interaction::VRead { resource_type, id, version } => read(app, ctx, &resource_type, &id, Some(version)).await,
        Interaction::Search { resource_type, pairs } if resource_type == "AuditEvent" => crate::audit::api::search(app, ctx, &pairs).await,
        Interaction::Search { resource_type, pairs } => search_type(app, ctx, &resource_type, &pairs).await,
        Interaction::AccessLog { id, pairs } => crate::audit::api::access_log(app, ctx, &id, &pairs).await,
        Interaction::BreakGlass { id, body } => crate::access::grantapi::break_glass(app, ctx, &id, body).await,
        Interaction::ExportRecord { id, body } => export::export_record(app, ctx, &id, body).await,
        Interaction::Everything { id, pairs } => everything::everything(app, ctx, &id, &pairs).await,
        Interaction::Export { level, pairs, respond_async } => bulk::kick_off(app, ctx, level, &pairs, respond_async).await,
        Interaction::ExportStatus { job } => bulk::status(app, ctx, &job).await,
        Interaction::ExportCancel { job } => bulk::cancel(app, ctx, &job).await,
        Interaction::ExportFile { job, n } => bulk::file(app, ctx, &job, &n).await,
        Interaction::HistoryInstance { resource_type, id, pairs } => history(app, ctx, &resource_type, Some(&id), &pairs).await,
        Interaction::HistoryType { resource_type, pairs } => history(app, ctx, &resource_type, None, &pairs).await,
        Interaction::Create { resource_type, body, if_none_exist: None } => create(app, ctx, &resource_type, body).await,
        Interaction::Create { resource_type, body, if_none_exist: Some(pairs) } => conditional::create(app, ctx, &resource_type, body, &pairs).await,
        Interaction::ConditionalUpdate { resource_type, pairs, body, if_match } => conditional::update_matching(app, ctx, &resource_type, &pairs, body, if_match).await,
        Interaction::ConditionalDelete { resource_type, pairs } => conditional::delete_matching(app, ctx, &resource_type, &pairs).await,
        Interaction::Patch { resource_type, id, patch, kind, if_match } => patch::patch(app, ctx, &resource_type, &id, &patch, kind, if_match).await,
        Interaction::Update { resource_type, id, body, if_match } => update(app, ctx, &resource_type, &id, body, if_match).await,
        Interaction::Delete { resource_type, id, if_match } => delete(app, ctx, &resource_type, &id, if_match).await,
        Interaction::Bundle { body } => process_bundle(app, ctx, body).await,
    }
}

async fn read(app: &App, ctx: &Ctx, resource_type: &str, id: &str, version: Option<u64>) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_id(id)?;
    // Fetched sealed: the patient it belongs to is known before anything is decrypted.
    let stored = app.vault.fetch(resource_type, id, version).await?;
    let patient = stored.as_ref().and_then(|v| v.patient.clone());
    let touch = Touch {
        interaction: if version.is_some() { "vread" } else { "read" },
        action: if version.is_some() { Action::VRead } else { Action::Read },
        resource_type,
        id: Some(id),
        version,
        patient: patient.as_deref(),
        query: None,
    };
    let permit = authorize(app, ctx, &touch).await?;
    let opened = match &stored {
        Some(v) if v.deleted => Err(ApiError::new(StatusCode::GONE, "deleted", format!("{resource_type}/{id} has been deleted"))),
        Some(v) if resource_type == "Binary" => match app.vault.open_bytes(v, ctx.now).await {
            Ok(bytes) => binary::json_view(app, ctx, v, bytes).await,
            Err(e) => Err(e.into()),
        },
        Some(v) => app.vault.open_bytes(v, ctx.now).await.map(|b| (b, None)).map_err(ApiError::from),
        None => Err(ApiError::not_found(match version {
            None => format!("{resource_type}/{id} is not known"),
            Some(v) => format!("{resource_type}/{id} has no version {v}"),
        })),
    };
    match (opened, stored) {
        (Ok((bytes, note)), Some(v)) => {
            let touch = Touch { version: Some(v.version), ..touch };
            let mut entry = ctx.permitted(&touch, 200, &permit)?;
            if let Some(note) = note {
                entry.reason = format!("{}; {note}", entry.reason);
            }
            audit(app, vec![entry]).await?;
            // The stored JSON is exactly the representation: sent as it is, not re-serialised.
            Ok(Reply::raw_resource(StatusCode::OK, &v, bytes))
        }
        (Err(err), _) => Err(audit_failure(app, ctx, &touch, err).await),
        (Ok(_), None) => Err(ApiError::internal("opened a resource that was not fetched")),
    }
}

async fn search_type(app: &App, ctx: &Ctx, resource_type: &str, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    // Lenient: what is not supported is left out, and the self link shows what was searched.
    let pairs: std::borrow::Cow<[(String, String)]> = if ctx.lenient { search::lenient_pairs(resource_type, pairs).into() } else { pairs.into() };
    let pairs = &pairs[..];
    let query = crate::http::query::encode(pairs);
    let touch = Touch { interaction: "search-type", action: Action::Search, resource_type, id: None, version: None, patient: None, query: Some(query) };
    let mut req = match search::parse_request(resource_type, pairs) {
        Ok(r) => r,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e.into()).await),
    };
    let filter = authorize_filtered(app, ctx, &touch).await?;
    let visible = |l: &valv_store::Located| filter.visible(l.patient.as_deref());
    let may_match = match chain::resolve(app, ctx, &mut req).await {
        Ok(m) => m,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let page = if may_match {
        match app.vault.search_found(resource_type, &req, &visible, ctx.now).await {
            Ok(p) => p,
            Err(e) => return Err(audit_failure(app, ctx, &touch, e.into()).await),
        }
    } else {
        vault::FoundPage::empty()
    };
    // One entry per patient whose data is in the response; one for the search itself otherwise.
    let mut patients: Vec<Option<&str>> = Vec::new();
    for r in &page.found {
        let p = r.patient.as_deref();
        if !patients.contains(&p) {
            patients.push(p);
        }
    }
    if patients.is_empty() {
        patients.push(None);
    }
    let mut events = patients
        .iter()
        .map(|p| ctx.permitted(&Touch { patient: *p, query: touch.query.clone(), ..touch }, 200, &filter.permit(*p)))
        .collect::<Result<Vec<_>, _>>()?;
    let included = match include::included(app, ctx, resource_type, &req, &page.found, touch.query.as_deref().unwrap_or("")).await {
        Ok(i) => i,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    events.extend(included.events);
    audit(app, events).await?;
    let mut links = vec![bundle::link("self", &format!("{}/{resource_type}?{}", app.base_url, touch.query.as_deref().unwrap_or("")))];
    if page.more {
        let mut next: Vec<(String, String)> = pairs.iter().filter(|(k, _)| k != "_offset").cloned().collect();
        next.push(("_offset".into(), (req.offset + req.count).to_string()));
        links.push(bundle::link("next", &format!("{}/{resource_type}?{}", app.base_url, crate::http::query::encode(&next))));
    }
    // Whole matches go into the Bundle as the JSON they were stored as (as a read sends it);
    // only a shaped one is parsed and rebuilt.
    let shaped: Vec<Value> = match req.shape {
        search::Shape::Full => Vec::new(),
        _ => page.found.iter().map(|f| f.body().map(|b| search::shape_resource(&b, &req.shape))).collect::<Result<_, _>>()?,
    };
    let full_url = |t: &str, id: &str| format!("{}/{t}/{id}", app.base_url);
    let mut entries: Vec<bundle::SearchEntry> = page
        .found
        .iter()
        .enumerate()
        .map(|(n, f)| bundle::SearchEntry {
            full_url: Some(full_url(&f.resource_type, &f.id)),
            resource: shaped.get(n).map_or(bundle::EntryResource::Json(&f.json), bundle::EntryResource::Tree),
            mode: "match",
        })
        .collect();
    // Included resources were opened as trees (their references had to be read).
    let truncated = included.truncated;
    let included: Vec<(String, Value)> = included
        .resources
        .into_iter()
        .map(|r| {
            let body = r.body.unwrap_or(Value::Null);
            let body = if req.shape == search::Shape::Full { body } else { search::shape_resource(&body, &req.shape) };
            (full_url(&r.resource_type, &r.id), body)
        })
        .collect();
    entries.extend(included.iter().map(|(url, body)| bundle::SearchEntry { full_url: Some(url.clone()), resource: bundle::EntryResource::Tree(body), mode: "include" }));
    let note = truncated.then(|| {
        let note = format!("more than {} resources were to be included; the rest are left out", include::MAX_INCLUDED);
        valv_fhir::outcome::operation_outcome(valv_fhir::outcome::Severity::Warning, "too-costly", &note)
    });
    entries.extend(note.iter().map(|n| bundle::SearchEntry { full_url: None, resource: bundle::EntryResource::Tree(n), mode: "outcome" }));
    let total = if req.total == search::TotalMode::None { None } else { page.total };
    Ok(Reply::raw_json(StatusCode::OK, bundle::searchset_bytes(&vault::new_id()?, total, &links, &entries)))
}

async fn history(app: &App, ctx: &Ctx, resource_type: &str, id: Option<&str>, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    let mut count = search::DEFAULT_COUNT;
    let mut offset = 0;
    for (k, v) in pairs {
        let n = || v.parse::<usize>().map_err(|_| ApiError::bad_request(format!("'{k}' must be a non-negative integer")));
        match k.as_str() {
            "_count" => count = n()?.min(search::MAX_COUNT),
            "_offset" => offset = n()?,
            "_format" | "_pretty" => {}
            other => return Err(ApiError::new(StatusCode::BAD_REQUEST, "not-supported", format!("history parameter '{other}' is not supported"))),
        }
    }
    if let Some(id) = id {
        check_id(id)?;
    }
    let located = match id {
        Some(id) => app.vault.locate(resource_type, id).await?,
        None => None,
    };
    let patient = located.as_ref().and_then(|l| l.patient.clone());
    let touch = Touch { interaction: "history", action: Action::History, resource_type, id, version: None, patient: patient.as_deref(), query: None };
    if let (Some(id), None) = (id, &located) {
        return Err(unknown_id(app, ctx, &touch, ApiError::not_found(format!("{resource_type}/{id} is not known"))).await);
    }
    // An instance's history belongs to one patient; a type's history is filtered patient by
    // patient, and paged after filtering so totals never count what the caller may not see.
    let (versions, total, permits) = if id.is_some() {
        // Decided on the current owner first; then every version on the patient it belonged to
        // (a resource moved from P2 to P1 does not show P2's versions to P1's physician).
        let permit = authorize(app, ctx, &touch).await?;
        let all = match app.vault.history(resource_type, id, 0, i64::MAX as usize, ctx.now).await {
            Ok((v, _)) => v,
            Err(e) => return Err(audit_failure(app, ctx, &touch, e.into()).await),
        };
        let filter = Filter::new(app, ctx, touch.action, resource_type);
        let visible: Vec<Resource> = all.into_iter().filter(|r| r.patient == patient || filter.visible(r.patient.as_deref())).collect();
        let total = visible.len();
        let page: Vec<Resource> = visible.into_iter().skip(offset).take(count).collect();
        let mut permits = vec![(patient.clone(), permit)];
        for p in page.iter().map(|r| r.patient.clone()) {
            if !permits.iter().any(|(q, _)| *q == p) {
                let permit = filter.permit(p.as_deref());
                permits.push((p, permit));
            }
        }
        (page, total, permits)
    } else {
        let filter = authorize_filtered(app, ctx, &touch).await?;
        let all = match app.vault.history(resource_type, None, 0, i64::MAX as usize, ctx.now).await {
            Ok((v, _)) => v,
            Err(e) => return Err(audit_failure(app, ctx, &touch, e.into()).await),
        };
        let visible: Vec<Resource> = all.into_iter().filter(|r| filter.visible(r.patient.as_deref())).collect();
        let total = visible.len();
        let page: Vec<Resource> = visible.into_iter().skip(offset).take(count).collect();
        let mut permits: Vec<(Option<String>, Permit)> = Vec::new();
        for p in page.iter().map(|r| r.patient.clone()) {
            if !permits.iter().any(|(q, _)| *q == p) {
                let permit = filter.permit(p.as_deref());
                permits.push((p, permit));
            }
        }
        if permits.is_empty() {
            permits.push((None, filter.permit(None)));
        }
        (page, total, permits)
    };
    let mut events = Vec::new();
    for (p, permit) in &permits {
        if id.is_none() || versions.iter().any(|r| r.patient == *p) || versions.is_empty() {
            events.push(ctx.permitted(&Touch { patient: p.as_deref(), query: None, ..touch }, 200, permit)?);
        }
    }
    audit(app, events).await?;
    let base = match id {
        Some(id) => format!("{}/{resource_type}/{id}/_history", app.base_url),
        None => format!("{}/{resource_type}/_history", app.base_url),
    };
    let mut links = vec![bundle::link("self", &base)];
    if offset + count < total {
        links.push(bundle::link("next", &format!("{base}?_count={count}&_offset={}", offset + count)));
    }
    let entries = versions.into_iter().map(|r| history_entry(&app.base_url, r)).collect();
    Ok(Reply::json(StatusCode::OK, bundle::collection("history", &vault::new_id()?, Some(total), links, entries)))
}

fn history_entry(base: &str, r: Resource) -> Value {
    let url = format!("{}/{}", r.resource_type, r.id);
    let (method, status) = match (r.deleted, r.version) {
        (true, _) => ("DELETE", "204"),
        (false, 1) => ("POST", "201"),
        (false, _) => ("PUT", "200"),
    };
    let mut e = json!({
        "fullUrl": format!("{base}/{url}"),
        "request": {"method": method, "url": if method == "POST" { r.resource_type.clone() } else { url }},
        "response": {"status": status, "etag": format!("W/\"{}\"", r.version), "lastModified": date::format_instant(r.last_updated)},
    });
    if let (Some(body), Value::Object(map)) = (r.body, &mut e) {
        map.insert("resource".into(), body);
    }
    e
}

/// The patients a new body places the resource with (owner first) or `[None]`.
fn body_patients(resource_type: &str, id: &str, body: &Value) -> Vec<Option<String>> {
    let ps: Vec<Option<String>> = compartment::patients(resource_type, id, body).into_iter().map(Some).collect();
    if ps.is_empty() { vec![None] } else { ps }
}

/// Decides and records the attempt for every patient a write touches; all must be permitted.
async fn authorize_write(app: &App, ctx: &Ctx, interaction: &'static str, action: Action, resource_type: &str, id: &str, patients: &[Option<String>]) -> Result<Vec<AuditEvent>, ApiError> {
    let mut events = Vec::new();
    for p in patients {
        let touch = write_touch(interaction, action, resource_type, id, p.as_deref());
        let permit = authorize(app, ctx, &touch).await?;
        events.push(ctx.permitted(&touch, 0, &permit)?);
    }
    Ok(events)
}

/// Decides the change a write makes to the facts access rests on (a Consent, CareTeam,
/// `Patient.managingOrganization` or `Organization.partOf`), on top of the permission to write
/// the resource, and returns the entries recording it (`fact-change`: what changed, whose access
/// it widens and narrows). A refusal is recorded and answered 403. `work` is the directory as the
/// writes before this one in the same request leave it; the change is applied to it.
async fn authorize_fact_change(app: &App, ctx: &Ctx, work: &mut Option<valv_policy::Directory>, action: Action, resource_type: &str, id: &str, body: Option<&Value>) -> Result<Vec<AuditEvent>, ApiError> {
    let Some(dir) = work.as_mut() else { return Ok(Vec::new()) };
    let Some(change) = valv_policy::change::assess(dir, resource_type, id, body, ctx.now) else { return Ok(Vec::new()) };
    let subject = app.access.subject(&ctx.principal);
    let d = app.access.decide_change(&subject, &change, action, ctx.now, ctx.purpose());
    let patients: Vec<Option<&str>> = if change.patients.is_empty() { vec![None] } else { change.patients.iter().map(|p| Some(p.as_str())).collect() };
    let events = patients
        .iter()
        .map(|p| {
            let t = Touch { interaction: "fact-change", action, resource_type, id: Some(id), version: None, patient: *p, query: None };
            let reason = format!("{}; {}", d.reason(), change.describe(*p));
            ctx.event(&t, if d.permit { Outcome::Success } else { Outcome::Denied }, if d.permit { 0 } else { 403 }, &reason)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !d.permit {
        app.metrics.access_denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        audit(app, events).await?;
        return Err(ApiError::forbidden(format!("access denied ({})", d.reason())).recorded());
    }
    dir.apply_next(resource_type, id, body);
    Ok(events)
}

/// Adds the patient a stored resource belongs to now: an update touches both the patient it
/// belonged to and the one it will belong to, and must be allowed on both.
async fn add_current_owner(app: &App, resource_type: &str, id: &str, patients: &mut Vec<Option<String>>) -> Result<(), ApiError> {
    if let Some(old) = app.vault.locate(resource_type, id).await?.and_then(|l| l.patient) {
        if !patients.contains(&Some(old.clone())) {
            patients.push(Some(old));
        }
    }
    Ok(())
}

/// Commits writes and lets the access directory see them: a new care team or a withdrawn
/// Consent counts from the next request.
async fn commit(app: &App, ops: Vec<WriteOp>, now: i64) -> Result<Vec<Committed>, valv_store::StoreError> {
    let committed = app.vault.commit(ops, now).await?;
    app.access.observe(&committed);
    Ok(committed)
}

/// Commits one write whose attempt is already audited; a failure is audited as well.
async fn commit_one(app: &App, ctx: &Ctx, op: WriteOp, touch: &Touch<'_>) -> Result<Committed, ApiError> {
    match commit(app, vec![op], ctx.now).await {
        Ok(mut c) => c.pop().ok_or_else(|| ApiError::internal("the store returned no result")),
        Err(e) => Err(audit_failure(app, ctx, touch, e.into()).await),
    }
}

fn write_touch<'a>(interaction: &'static str, action: Action, resource_type: &'a str, id: &'a str, patient: Option<&'a str>) -> Touch<'a> {
    Touch { interaction, action, resource_type, id: Some(id), version: None, patient, query: None }
}

async fn create(app: &App, ctx: &Ctx, resource_type: &str, body: Value) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_body(resource_type, &body)?;
    create_unconditional(app, ctx, resource_type, &vault::new_id()?, body).await
}

/// [`create_as`] without a condition, which therefore always creates.
async fn create_unconditional(app: &App, ctx: &Ctx, resource_type: &str, id: &str, body: Value) -> Result<Reply, ApiError> {
    create_as(app, ctx, resource_type, id, body, None).await?.ok_or_else(|| ApiError::internal("a create without a condition matched one"))
}

/// Creates `body` (checked) under `id`, decided and audited; with `unless`, only if nothing
/// matches that condition when it commits — `None` when something did (another request wrote a
/// match first): nothing was created, and the failure is audited.
async fn create_as(app: &App, ctx: &Ctx, resource_type: &str, id: &str, body: Value, unless: Option<valv_store::Filter>) -> Result<Option<Reply>, ApiError> {
    let patients = body_patients(resource_type, id, &body);
    let mut events = authorize_write(app, ctx, "create", Action::Create, resource_type, id, &patients).await?;
    let mut work = app.access.fact_scope(&[(resource_type, id, Some(&body))])?;
    events.extend(authorize_fact_change(app, ctx, &mut work, Action::Create, resource_type, id, Some(&body)).await?);
    audit(app, events).await?;
    let op = WriteOp::Create { resource_type: resource_type.to_string(), id: id.to_string(), body, unless };
    let touch = write_touch("create", Action::Create, resource_type, id, patients[0].as_deref());
    match commit(app, vec![op], ctx.now).await {
        Ok(mut c) => {
            let c = c.pop().ok_or_else(|| ApiError::internal("the store returned no result"))?;
            Ok(Some(write_reply(ctx, StatusCode::CREATED, c.resource)))
        }
        Err(e @ valv_store::StoreError::Matched(_)) => {
            audit_failure(app, ctx, &touch, e.into()).await;
            Ok(None)
        }
        Err(e) => Err(audit_failure(app, ctx, &touch, e.into()).await),
    }
}

async fn update(app: &App, ctx: &Ctx, resource_type: &str, id: &str, body: Value, if_match: Option<u64>) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_id(id)?;
    check_body(resource_type, &body)?;
    if let Some(body_id) = body.get("id") {
        if body_id.as_str() != Some(id) {
            return Err(ApiError::bad_request(format!("the body's id {body_id} does not match the URL's id '{id}'")));
        }
    } else {
        return Err(ApiError::bad_request("an update body must carry the resource id"));
    }
    if app.vault.locate(resource_type, id).await?.is_none() {
        if app.update_create && if_match.is_none() {
            // Update-as-create: the client's id. Decided as a create on the body's patients.
            return create_unconditional(app, ctx, resource_type, id, body).await;
        }
        // Refused as an existing one of a patient the caller may not see would be, so that a
        // PUT cannot probe ids.
        let touch = write_touch("update", Action::Update, resource_type, id, None);
        refuse_unless_visible(app, ctx, &touch).await?;
        if let Some(v) = if_match {
            return Err(ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", format!("If-Match names version {v} but {resource_type}/{id} does not exist")));
        }
    }
    // Both the patient the resource belonged to and the one it will belong to are touched.
    let mut patients = body_patients(resource_type, id, &body);
    add_current_owner(app, resource_type, id, &mut patients).await?;
    let mut events = authorize_write(app, ctx, "update", Action::Update, resource_type, id, &patients).await?;
    let mut work = app.access.fact_scope(&[(resource_type, id, Some(&body))])?;
    events.extend(authorize_fact_change(app, ctx, &mut work, Action::Update, resource_type, id, Some(&body)).await?);
    audit(app, events).await?;
    let op = WriteOp::Update { resource_type: resource_type.to_string(), id: id.to_string(), body, if_match };
    let c = commit_one(app, ctx, op, &write_touch("update", Action::Update, resource_type, id, patients[0].as_deref())).await?;
    Ok(write_reply(ctx, StatusCode::OK, c.resource))
}

async fn delete(app: &App, ctx: &Ctx, resource_type: &str, id: &str, if_match: Option<u64>) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_id(id)?;
    let Some(located) = app.vault.locate(resource_type, id).await? else {
        let touch = write_touch("delete", Action::Delete, resource_type, id, None);
        return Err(unknown_id(app, ctx, &touch, ApiError::not_found(format!("{resource_type}/{id} is not known"))).await);
    };
    let patients = vec![located.patient.clone()];
    let mut events = authorize_write(app, ctx, "delete", Action::Delete, resource_type, id, &patients).await?;
    let mut work = app.access.fact_scope(&[(resource_type, id, None)])?;
    events.extend(authorize_fact_change(app, ctx, &mut work, Action::Delete, resource_type, id, None).await?);
    audit(app, events).await?;
    let op = WriteOp::Delete { resource_type: resource_type.to_string(), id: id.to_string(), if_match };
    let touch = write_touch("delete", Action::Delete, resource_type, id, located.patient.as_deref());
    match commit(app, vec![op], ctx.now).await {
        Ok(_) => Ok(Reply::json(StatusCode::OK, valv_fhir::outcome::success(&format!("{resource_type}/{id} deleted")))),
        Err(e) => Err(audit_failure(app, ctx, &touch, e.into()).await),
    }
}

fn write_reply(ctx: &Ctx, status: StatusCode, r: Resource) -> Reply {
    let mut reply = Reply::resource(status, r);
    reply.location = true;
    if !ctx.return_representation {
        reply.body = None;
    }
    reply
}

async fn process_bundle(app: &App, ctx: &Ctx, body: Value) -> Result<Reply, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::bad_request("POST /fhir takes a Bundle of type transaction or batch"));
    }
    let (kind, entries) = bundle::parse(body)?;
    match kind {
        BundleKind::Transaction => transaction(app, ctx, entries).await,
        BundleKind::Batch => batch(app, ctx, entries).await,
    }
}

/// All or nothing: every entry is checked, decided and audited before one atomic commit. When a
/// conditional create finds its condition met at commit (another request wrote a match first),
/// nothing is written and the whole transaction starts over, its entry then resolving to that
/// match.
async fn transaction(app: &App, ctx: &Ctx, entries: Vec<bundle::Entry>) -> Result<Reply, ApiError> {
    // Without a condition nothing can be met at commit: the entries are not copied for a retry
    // (an import's Bundles are large).
    if entries.iter().all(|e| e.condition.is_none()) {
        return transaction_once(app, ctx, entries).await?.ok_or_else(|| ApiError::internal("a transaction without conditions had one met"));
    }
    for _ in 0..conditional::ATTEMPTS {
        if let Some(reply) = transaction_once(app, ctx, entries.clone()).await? {
            return Ok(reply);
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", "concurrent writes kept changing what the transaction's conditions match; try again"))
}

/// One attempt of [`transaction`]; `None` when a condition was met at commit.
async fn transaction_once(app: &App, ctx: &Ctx, mut entries: Vec<bundle::Entry>) -> Result<Option<Reply>, ApiError> {
    let mut events = Vec::new();
    // Conditions and patches first: they decide which ids the entries act on (and so what
    // their fullUrls stand for) and what a patched resource will be.
    let mut plans = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter_mut().enumerate() {
        let at = |err: ApiError| ApiError { diagnostics: format!("Bundle.entry[{i}]: {}", err.diagnostics), ..err };
        if let (Method::Patch, Some(doc), Some(id)) = (e.method, e.patch.take(), e.id.clone()) {
            check_type(&e.resource_type).map_err(at)?;
            let kind = if doc.is_array() { PatchKind::Json } else { PatchKind::FhirPath };
            let (body, version) = patch::patched(app, ctx, &e.resource_type, &id, &doc, kind, e.if_match).await.map_err(at)?;
            (e.resource, e.if_match) = (Some(body), Some(version));
        }
        plans.push(conditional::plan_entry(app, ctx, e, &mut events).await.map_err(at)?);
    }
    let mut id_error = None;
    bundle::resolve_references(&mut entries, || {
        vault::new_id().unwrap_or_else(|e| {
            id_error = Some(e);
            String::new()
        })
    })?;
    if let Some(e) = id_error {
        return Err(e.into());
    }
    let mut ops = Vec::with_capacity(entries.len());
    // Per entry, in order: the index of its write in `ops`, or the match it answers with.
    let mut slots: Vec<Result<usize, Committed>> = Vec::with_capacity(entries.len());
    let writes: Vec<(&str, &str, Option<&Value>)> = entries
        .iter()
        .zip(&plans)
        .filter(|(e, plan)| e.method != Method::Get && !matches!(plan, conditional::EntryPlan::Existing(_)))
        .map(|(e, _)| (e.resource_type.as_str(), e.id.as_deref().unwrap_or(""), e.resource.as_ref().filter(|_| e.method != Method::Delete)))
        .collect();
    let mut work = app.access.fact_scope(&writes)?;
    for ((i, e), plan) in entries.into_iter().enumerate().zip(plans) {
        let at = |err: ApiError| ApiError { diagnostics: format!("Bundle.entry[{i}]: {}", err.diagnostics), ..err };
        let unless = match plan {
            conditional::EntryPlan::Existing(c) => {
                slots.push(Err(c));
                continue;
            }
            conditional::EntryPlan::CreateUnless(filter) => Some(filter),
            conditional::EntryPlan::AsSent => None,
        };
        check_type(&e.resource_type).map_err(at)?;
        let id = e.id.clone().unwrap_or_default();
        let (op, interaction, action, patients) = match e.method {
            Method::Post | Method::Put | Method::Patch => {
                let mut body = e.resource.unwrap_or(Value::Null);
                if let (Method::Put, Value::Object(m)) = (e.method, &mut body) {
                    m.entry("id").or_insert_with(|| Value::String(id.clone()));
                }
                check_body(&e.resource_type, &body).map_err(at)?;
                let mut patients = body_patients(&e.resource_type, &id, &body);
                // A PUT to an id that does not exist creates it (update-as-create, when on).
                let creates = e.method == Method::Post
                    || unless.is_some()
                    || (e.method == Method::Put && app.update_create && e.if_match.is_none() && app.vault.locate(&e.resource_type, &id).await?.is_none());
                if !creates {
                    add_current_owner(app, &e.resource_type, &id, &mut patients).await?;
                }
                if creates {
                    (WriteOp::Create { resource_type: e.resource_type.clone(), id: id.clone(), body, unless }, "create", Action::Create, patients)
                } else {
                    let op = WriteOp::Update { resource_type: e.resource_type.clone(), id: id.clone(), body, if_match: e.if_match };
                    (op, "update", Action::Update, patients)
                }
            }
            Method::Delete => {
                let patient = app.vault.locate(&e.resource_type, &id).await?.and_then(|l| l.patient);
                (WriteOp::Delete { resource_type: e.resource_type.clone(), id: id.clone(), if_match: e.if_match }, "delete", Action::Delete, vec![patient])
            }
            Method::Get => return Err(ApiError::bad_request("GET is not supported inside a transaction")),
        };
        events.extend(authorize_write(app, ctx, interaction, action, &e.resource_type, &id, &patients).await?);
        let body = match &op {
            WriteOp::Create { body, .. } | WriteOp::Update { body, .. } => Some(body),
            WriteOp::Delete { .. } => None,
        };
        events.extend(authorize_fact_change(app, ctx, &mut work, action, &e.resource_type, &id, body).await?);
        slots.push(Ok(ops.len()));
        ops.push(op);
    }
    audit(app, events).await?;
    let committed = if ops.is_empty() {
        Vec::new()
    } else {
        match commit(app, ops, ctx.now).await {
            Ok(c) => c,
            Err(e) => {
                let matched = matches!(e, valv_store::StoreError::Matched(_));
                let touch = Touch { interaction: "transaction", action: Action::Update, resource_type: "Bundle", id: None, version: None, patient: None, query: None };
                let err = audit_failure(app, ctx, &touch, e.into()).await;
                return if matched { Ok(None) } else { Err(err) };
            }
        }
    };
    let entries = slots
        .iter()
        .map(|slot| match slot {
            Ok(i) => committed.get(*i).map(|c| response_entry(&app.base_url, c)).ok_or_else(|| ApiError::internal("the store returned fewer results than writes")),
            Err(existing) => Ok(response_entry(&app.base_url, existing)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Reply::json(StatusCode::OK, bundle::collection("transaction-response", &vault::new_id()?, None, vec![], entries))))
}

fn response_entry(base: &str, c: &Committed) -> Value {
    let r = &c.resource;
    let status = match (c.created, r.deleted) {
        (_, true) => "204 No Content",
        (true, _) => "201 Created",
        _ => "200 OK",
    };
    let mut response = json!({"status": status, "etag": format!("W/\"{}\"", r.version), "lastModified": date::format_instant(r.last_updated)});
    if !r.deleted {
        response["location"] = json!(format!("{base}/{}/{}/_history/{}", r.resource_type, r.id, r.version));
    }
    let mut e = json!({"response": response});
    if let Some(b) = &r.body {
        e["fullUrl"] = json!(format!("{base}/{}/{}", r.resource_type, r.id));
        e["resource"] = b.clone();
    }
    e
}

/// Each entry on its own, as if sent alone; one failure does not stop the others.
async fn batch(app: &App, ctx: &Ctx, entries: Vec<bundle::Entry>) -> Result<Reply, ApiError> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let resource_type = e.resource_type.clone();
        let interaction = match batch_interaction(e) {
            Ok(i) => i,
            Err(err) => {
                let err = record_unaudited(app, ctx, Some(&resource_type), err).await;
                if err.status == StatusCode::SERVICE_UNAVAILABLE {
                    return Err(err);
                }
                out.push(error_entry(&err));
                continue;
            }
        };
        let resource_type = interaction.resource_type().to_string();
        match Box::pin(execute(app, ctx, interaction)).await {
            Ok(reply) => out.push(reply.into_entry(&app.base_url)),
            Err(err) if err.status == StatusCode::SERVICE_UNAVAILABLE => return Err(err),
            Err(err) => {
                let err = record_unaudited(app, ctx, Some(&resource_type), err).await;
                if err.status == StatusCode::SERVICE_UNAVAILABLE {
                    return Err(err);
                }
                out.push(error_entry(&err));
            }
        }
    }
    Ok(Reply::json(StatusCode::OK, bundle::collection("batch-response", &vault::new_id()?, None, vec![], out)))
}

fn batch_interaction(e: bundle::Entry) -> Result<Interaction, ApiError> {
    let resource_type = e.resource_type;
    let condition = match &e.condition {
        Some(c) => Some(crate::http::query::parse(c).map_err(ApiError::bad_request)?),
        None => None,
    };
    Ok(match (e.method, e.id) {
        (Method::Post, None) if condition.is_some() => Interaction::Create { resource_type, body: e.resource.unwrap_or(Value::Null), if_none_exist: condition },
        (Method::Put, None) => match condition {
            Some(pairs) => Interaction::ConditionalUpdate { resource_type, pairs, body: e.resource.unwrap_or(Value::Null), if_match: e.if_match },
            None => return Err(ApiError::bad_request("a PUT entry needs an id or search criteria in request.url")),
        },
        (Method::Delete, None) => match condition {
            Some(pairs) => Interaction::ConditionalDelete { resource_type, pairs },
            None => return Err(ApiError::bad_request("a DELETE entry needs an id or search criteria in request.url")),
        },
        (Method::Patch, Some(id)) => {
            let patch = e.patch.unwrap_or(Value::Null);
            let kind = if patch.is_array() { PatchKind::Json } else { PatchKind::FhirPath };
            Interaction::Patch { resource_type, id, patch, kind, if_match: e.if_match }
        }

        (Method::Get, Some(id)) => Interaction::Read { resource_type, id },
        (Method::Get, None) => {
            let pairs = crate::http::query::parse(e.query.as_deref().unwrap_or("")).map_err(ApiError::bad_request)?;
            Interaction::Search { resource_type, pairs }
        }
        (Method::Post, _) => Interaction::Create { resource_type, body: e.resource.unwrap_or(Value::Null), if_none_exist: None },
        (Method::Put, Some(id)) => {
            let mut body = e.resource.unwrap_or(Value::Null);
            if let Value::Object(m) = &mut body {
                m.entry("id").or_insert_with(|| Value::String(id.clone()));
            }
            Interaction::Update { resource_type, id, body, if_match: e.if_match }
        }
        (Method::Delete, Some(id)) => Interaction::Delete { resource_type, id, if_match: e.if_match },
        _ => return Err(ApiError::bad_request("this batch entry's request is not supported")),
    })
}

fn error_entry(err: &ApiError) -> Value {
    json!({"response": {"status": format!("{} {}", err.status.as_u16(), err.status.canonical_reason().unwrap_or("")), "outcome": err.outcome()}})
}
