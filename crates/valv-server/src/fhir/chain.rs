//! Chained parameters (`subject:Patient.name=x`) and `_has` (`_has:Observation:patient:code=x`):
//! each is a search of another type, run first and as the caller — only resources they may
//! search count — whose results then narrow the search asked for. A chain can therefore never
//! tell anything about resources the caller could not have found by searching for them.

use crate::error::ApiError;
use crate::request::{Ctx, Filter};
use crate::App;
use hyper::StatusCode;
use valv_fhir::search::{self, Condition, SearchRequest, Test};
use valv_policy::Action;

/// Most resources one link of a chain may find; a broader one is refused (narrow it).
pub(super) const MAX_LINK_MATCHES: usize = 1000;

/// Replaces every chain and `_has` of `req` (on `resource_type`) with the references or ids they
/// resolve to, innermost first. `false` when one of them found nothing: nothing can match.
pub(super) async fn resolve(app: &App, ctx: &Ctx, req: &mut SearchRequest) -> Result<bool, ApiError> {
    for cond in &mut req.conditions {
        let resolved = match &cond.test {
            Test::Chain { def, target, inner } => {
                let found = inner_search(app, ctx, target, inner).await?;
                let targets: Vec<String> = found.iter().map(|r| format!("{}/{}", r.resource_type, r.id)).collect();
                if targets.is_empty() {
                    return Ok(false);
                }
                Condition::resolved_references(def, &cond.param, &targets)
            }
            Test::Has { source, def, inner } => {
                let found = inner_search(app, ctx, source, inner).await?;
                let mut ids: Vec<String> = Vec::new();
                for r in &found {
                    let Some(body) = &r.body else { continue };
                    for t in search::reference_targets(def, body, None) {
                        if !ids.contains(&t.id) {
                            ids.push(t.id);
                        }
                    }
                }
                if ids.is_empty() {
                    return Ok(false);
                }
                Condition::resolved_ids(&cond.param, ids)
            }
            _ => continue,
        };
        *cond = resolved;
    }
    Ok(true)
}

/// The resources of `resource_type` matching `pairs` that the caller may search, resolving
/// their own chains first.
async fn inner_search(app: &App, ctx: &Ctx, resource_type: &str, pairs: &[(String, String)]) -> Result<Vec<valv_store::vault::Resource>, ApiError> {
    let mut req = search::parse_request(resource_type, pairs)?;
    if !Box::pin(resolve(app, ctx, &mut req)).await? {
        return Ok(Vec::new());
    }
    req.count = MAX_LINK_MATCHES;
    let filter = Filter::new(app, ctx, Action::Search, resource_type);
    let page = app.vault.search(resource_type, &req, &|l: &valv_store::Located| filter.visible(l.patient.as_deref()), ctx.now).await?;
    if page.more {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too-costly",
            format!("a chained or _has search of {resource_type} matches more than {MAX_LINK_MATCHES} resources: narrow it"),
        ));
    }
    Ok(page.resources)
}
