//! `GET /fhir/Patient/{id}/$everything` (R4 Patient-everything): the patient's current
//! resources — the Patient and everything it owns (the first patient of its compartment) — as a
//! searchset, paged, with `_type`, `_since`, `_count` and `_offset`.
//!
//! Decided as a read of the Patient first (403, audited, for someone who may not read it), then
//! type by type: types the caller may not read for this patient are left out. Audited as reads,
//! one entry per type on the page. Bodies are decrypted for the page only; what is counted and
//! filtered (`_since`) comes from the store's plaintext place and time columns.

use super::check_id;
use crate::error::ApiError;
use crate::request::{audit, audit_failure, authorize, Ctx, Touch};
use crate::{App, Reply};
use hyper::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use valv_fhir::{bundle, date, search};
use valv_policy::Action;
use valv_store::vault;

/// The page size without `_count`; at most [`search::MAX_COUNT`].
const DEFAULT_PAGE: usize = search::MAX_COUNT;

struct Params {
    types: Option<Vec<String>>,
    since: Option<i64>,
    count: usize,
    offset: usize,
}

fn parse(pairs: &[(String, String)]) -> Result<Params, ApiError> {
    let mut p = Params { types: None, since: None, count: DEFAULT_PAGE, offset: 0 };
    for (k, v) in pairs {
        let n = || v.parse::<usize>().map_err(|_| ApiError::bad_request(format!("'{k}' must be a non-negative integer")));
        match k.as_str() {
            "_count" => p.count = n()?.clamp(1, search::MAX_COUNT),
            "_offset" => p.offset = n()?,
            "_type" => {
                let types: Vec<String> = v.split(',').map(str::trim).map(str::to_string).collect();
                if let Some(bad) = types.iter().find(|t| !valv_fhir::r4::is_resource_type(t)) {
                    return Err(ApiError::bad_request(format!("_type: '{bad}' is not a resource type")));
                }
                p.types = Some(types);
            }
            "_since" => {
                let at = date::parse(v).map_err(|e| ApiError::bad_request(format!("_since: {e}")))?;
                // Milliseconds, as lastUpdated is kept.
                p.since = Some(at.start.saturating_mul(1000));
            }
            "_format" | "_pretty" => {}
            other => return Err(ApiError::new(StatusCode::BAD_REQUEST, "not-supported", format!("$everything parameter '{other}' is not supported (_type, _since, _count, _offset)"))),
        }
    }
    Ok(p)
}

pub(super) async fn everything(app: &App, ctx: &Ctx, patient: &str, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    check_id(patient)?;
    let params = parse(pairs)?;
    let query = format!("$everything?{}", crate::http::query::encode(pairs));
    let touch = Touch { interaction: "read", action: Action::Read, resource_type: "Patient", id: Some(patient), version: None, patient: Some(patient), query: Some(query.clone()) };
    let located = app.vault.store().locate("Patient", patient).await?;
    if located.is_none() {
        return Err(super::unknown_id(app, ctx, &touch, ApiError::not_found(format!("Patient/{patient} is not known"))).await);
    }
    authorize(app, ctx, &touch).await?;
    let page = match gather(app, ctx, patient, &params).await {
        Ok(p) => p,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    // One read entry per type shown (the Patient's own when nothing is).
    let mut types = page.types_shown();
    if types.is_empty() {
        types.push("Patient".to_string());
    }
    let mut events = Vec::new();
    for resource_type in &types {
        let t = Touch { resource_type, id: None, query: Some(query.clone()), ..touch };
        let f = crate::request::Filter::new(app, ctx, Action::Read, resource_type);
        events.push(ctx.permitted(&t, 200, &f.permit(Some(patient)))?);
    }
    audit(app, events).await?;
    let base = format!("{}/Patient/{patient}/$everything", app.base_url);
    let mut links = vec![bundle::link("self", &format!("{base}?{}", crate::http::query::encode(pairs)))];
    if params.offset + params.count < page.total {
        let mut next: Vec<(String, String)> = pairs.iter().filter(|(k, _)| k != "_offset").cloned().collect();
        next.push(("_offset".into(), (params.offset + params.count).to_string()));
        links.push(bundle::link("next", &format!("{base}?{}", crate::http::query::encode(&next))));
    }
    let entries: Vec<Value> = page
        .resources
        .into_iter()
        .map(|r| json!({"fullUrl": format!("{}/{}/{}", app.base_url, r.resource_type, r.id), "resource": r.body, "search": {"mode": "match"}}))
        .collect();
    Ok(Reply::json(StatusCode::OK, bundle::collection("searchset", &vault::new_id()?, Some(page.total), links, entries)))
}

/// One page of the patient's resources, and how many there are in all.
struct Page {
    total: usize,
    resources: Vec<vault::Resource>,
}

impl Page {
    fn types_shown(&self) -> Vec<String> {
        let mut types: Vec<String> = self.resources.iter().map(|r| r.resource_type.clone()).collect();
        types.dedup();
        types
    }
}

async fn gather(app: &App, ctx: &Ctx, patient: &str, params: &Params) -> Result<Page, ApiError> {
    if app.vault.is_erased(patient) {
        return Err(ApiError::new(StatusCode::GONE, "deleted", format!("the data of patient {patient} was erased")));
    }
    // (type, id) of what the patient owns, by type then id: the order of the whole list.
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, id) in app.vault.store().resources_of(patient).await? {
        by_type.entry(t).or_default().push(id);
    }
    let subject = app.access.subject(&ctx.principal);
    let readable = |resource_type: &str| {
        let q = valv_policy::Question { action: Action::Read, resource_type, patient: Some(patient), now: ctx.now, purpose: ctx.purpose(), file_scan: None };
        app.access.decide(&subject, &q).permit
    };
    // Sealed rows carry their last-updated time in the clear: `_since` and the total need no
    // decryption; only the page is opened.
    let mut selected: Vec<valv_store::StoredVersion> = Vec::new();
    for (resource_type, ids) in &by_type {
        if params.types.as_ref().is_some_and(|ts| !ts.contains(resource_type)) || !readable(resource_type) {
            continue;
        }
        for chunk in ids.chunks(500) {
            let rows = app.vault.store().read_many(resource_type, chunk).await?;
            selected.extend(rows.into_iter().filter(|v| !v.deleted && params.since.is_none_or(|s| v.last_updated >= s)));
        }
    }
    let total = selected.len();
    let mut resources = Vec::new();
    for v in selected.into_iter().skip(params.offset).take(params.count) {
        resources.push(app.vault.open_version(v, ctx.now).await?);
    }
    Ok(Page { total, resources })
}
