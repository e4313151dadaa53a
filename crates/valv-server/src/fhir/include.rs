//! `_include` and `_revinclude` (with `:iterate`): resources a search's results point at, or
//! that point at them, added to the searchset with `search.mode = include`.
//!
//! Never a side door: each included resource is decided as a read of its own patient (a
//! physician's `Observation?_include=Observation:subject` brings only the Patients they may
//! read), the ones the caller may not read are left out exactly as search results are, and
//! what is included is audited as reads, one entry per type and patient.

use crate::audit::AuditEvent;
use crate::error::ApiError;
use crate::request::{Ctx, Filter, Touch};
use crate::App;
use std::collections::{HashMap, HashSet};
use valv_fhir::search::{self, Include, SearchRequest};
use valv_policy::Action;
use valv_store::vault::{Found, Resource};

/// Most resources one search includes; beyond, the rest are left out (and the count says so).
pub(super) const MAX_INCLUDED: usize = 1000;

/// Rounds of `:iterate` after the first.
const MAX_ITERATIONS: usize = 3;

/// What the includes add to a page: the resources, and the audit entries for them.
pub(super) struct Included {
    pub resources: Vec<Resource>,
    pub events: Vec<AuditEvent>,
    /// Whether [`MAX_INCLUDED`] cut the list short.
    pub truncated: bool,
}

pub(super) async fn included(app: &App, ctx: &Ctx, resource_type: &str, req: &SearchRequest, page: &[Found], query: &str) -> Result<Included, ApiError> {
    let mut out = Included { resources: Vec::new(), events: Vec::new(), truncated: false };
    if req.includes.is_empty() && req.revincludes.is_empty() {
        return Ok(out);
    }
    let mut seen: HashSet<(String, String)> = page.iter().map(|r| (r.resource_type.clone(), r.id.clone())).collect();
    let mut filters: HashMap<String, Filter<'_>> = HashMap::new();
    let mut frontier: Vec<Resource> = page.iter().map(Found::to_resource).collect::<Result<_, _>>()?;
    for round in 0..=MAX_ITERATIONS {
        // The first round applies every include to the matches (an `_include` only where its
        // source is the searched type); later ones only `:iterate` ones, to what the round
        // before added.
        let applies = |i: &&Include| if round == 0 { i.iterate || i.source == resource_type } else { i.iterate };
        let applies_rev = |i: &&Include| round == 0 || i.iterate;
        let mut found: Vec<Resource> = Vec::new();
        for inc in req.includes.iter().filter(applies) {
            for r in frontier.iter().filter(|r| r.resource_type == inc.source) {
                let Some(body) = &r.body else { continue };
                for target in search::reference_targets(inc.def, body, inc.target.as_deref()) {
                    if seen.contains(&(target.resource_type.clone(), target.id.clone())) {
                        continue;
                    }
                    if let Some(v) = app.vault.fetch(&target.resource_type, &target.id, None).await? {
                        if !v.deleted && !v.patient.as_deref().is_some_and(|p| app.vault.is_erased(p)) && visible(app, ctx, &mut filters, &v.resource_type, v.patient.as_deref()) {
                            seen.insert((target.resource_type.clone(), target.id.clone()));
                            found.push(app.vault.open_version(v, ctx.now).await?);
                        }
                    }
                }
            }
        }
        for inc in req.revincludes.iter().filter(applies_rev) {
            let targets: Vec<String> = frontier
                .iter()
                .filter(|r| inc.def.target.is_none_or(|t| t == r.resource_type) && inc.target.as_deref().is_none_or(|t| t == r.resource_type))
                .map(|r| format!("{}/{}", r.resource_type, r.id))
                .collect();
            if targets.is_empty() {
                continue;
            }
            let pairs = vec![(inc.def.name.to_string(), targets.join(",")), ("_count".to_string(), search::MAX_COUNT.to_string())];
            let rev = search::parse_request(&inc.source, &pairs)?;
            filters.entry(inc.source.clone()).or_insert_with(|| Filter::new(app, ctx, Action::Read, &inc.source));
            let filter = &filters[&inc.source];
            let hits = app.vault.search(&inc.source, &rev, &|l: &valv_store::Located| filter.visible(l.patient.as_deref()), ctx.now).await?;
            for r in hits.resources {
                if seen.insert((r.resource_type.clone(), r.id.clone())) {
                    found.push(r);
                }
            }
        }
        if out.resources.len() + found.len() > MAX_INCLUDED {
            found.truncate(MAX_INCLUDED - out.resources.len());
            out.truncated = true;
        }
        out.resources.extend(found.iter().cloned());
        if found.is_empty() || out.truncated || !req.includes.iter().chain(&req.revincludes).any(|i| i.iterate) {
            break;
        }
        frontier = found;
    }
    // One read entry per type and patient whose data is included.
    let mut recorded: HashSet<(String, Option<String>)> = HashSet::new();
    for r in &out.resources {
        if recorded.insert((r.resource_type.clone(), r.patient.clone())) {
            let filter = filters.entry(r.resource_type.clone()).or_insert_with(|| Filter::new(app, ctx, Action::Read, &r.resource_type));
            let touch = Touch { interaction: "read", action: Action::Read, resource_type: &r.resource_type, id: None, version: None, patient: r.patient.as_deref(), query: Some(query.to_string()) };
            out.events.push(ctx.permitted(&touch, 200, &filter.permit(r.patient.as_deref()))?);
        }
    }
    Ok(out)
}

/// Whether the caller may read a resource of this type and patient (decided once per pair).
fn visible<'a>(app: &'a App, ctx: &'a Ctx, filters: &mut HashMap<String, Filter<'a>>, resource_type: &str, patient: Option<&str>) -> bool {
    filters.entry(resource_type.to_string()).or_insert_with(|| Filter::new(app, ctx, Action::Read, resource_type)).visible(patient)
}
