//! Conditional interactions (FHIR R4 http §3.1.0.8–3.1.0.9): create with `If-None-Exist`,
//! update and delete by search criteria.
//!
//! A condition is looked up among every current resource of the type, not only those the caller
//! may see: otherwise a caller who may not see a match would make a duplicate of it. What the
//! caller may do with the match is then decided on the match's own patient and recorded in that
//! patient's access log like any other access (a probe through a condition is a recorded,
//! refused access, never a silent one). Conditions are limited to what the blind index answers
//! exactly, because a conditional create's "nothing matches" is checked by the store inside the
//! commit — under one writer (SQLite) or an advisory lock per condition (PostgreSQL) — so that
//! concurrent conditional creates of one condition make one resource.

use super::{check_body, check_type, create_as, delete, read, update, unknown_id};
use crate::audit::AuditEvent;
use crate::error::ApiError;
use crate::request::{audit_failure, authorize, Ctx, Touch};
use crate::{App, Reply};
use hyper::StatusCode;
use serde_json::Value;
use valv_fhir::bundle::{self, Method};
use valv_fhir::search::{self, SearchRequest};
use valv_policy::Action;
use valv_store::vault;

/// Parameters that shape results and select nothing.
const NOT_CRITERIA: &[&str] = &["_count", "_offset", "_sort", "_summary", "_total", "_elements", "_include", "_revinclude", "_format", "_pretty", "_contained", "_containedType"];

/// How often a conditional write starts over when a concurrent one wrote a match first.
pub(super) const ATTEMPTS: usize = 3;

/// Search criteria naming at most one resource.
struct Condition {
    request: SearchRequest,
    filter: valv_store::Filter,
    query: String,
}

fn parse(app: &App, resource_type: &str, pairs: &[(String, String)]) -> Result<Condition, ApiError> {
    if pairs.is_empty() {
        return Err(ApiError::bad_request("a condition needs at least one search parameter"));
    }
    if let Some((k, _)) = pairs.iter().find(|(k, _)| NOT_CRITERIA.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!("'{k}' shapes search results and selects nothing: it cannot be part of a condition")));
    }
    let request = search::parse_request(resource_type, pairs)?;
    let filter = app.vault.condition(resource_type, &request)?;
    Ok(Condition { request, filter, query: crate::http::query::encode(pairs) })
}

/// The current resources the condition names (at most two: more are as good as two), each
/// checked against its decrypted body — the index is not authenticated, and a token copied in
/// the database must not make a conditional write act on another resource.
async fn matches(app: &App, resource_type: &str, cond: &Condition, now: i64) -> Result<Vec<vault::Resource>, ApiError> {
    let mut found = Vec::new();
    for located in app.vault.store().search(&cond.filter).await? {
        if located.patient.as_deref().is_some_and(|p| app.vault.is_erased(p)) {
            continue;
        }
        let Some(stored) = app.vault.fetch(resource_type, &located.id, None).await? else { continue };
        let resource = app.vault.open_version(stored, now).await?;
        if resource.body.as_ref().is_some_and(|b| cond.request.conditions.iter().all(|c| c.matches(resource_type, b))) {
            found.push(resource);
            if found.len() == 2 {
                break;
            }
        }
    }
    Ok(found)
}

/// 412 for criteria that name several resources, recorded (without naming them).
async fn not_selective(app: &App, ctx: &Ctx, interaction: &'static str, action: Action, resource_type: &str, cond: &Condition) -> ApiError {
    let touch = Touch { interaction, action, resource_type, id: None, version: None, patient: None, query: Some(cond.query.clone()) };
    let err = ApiError::new(StatusCode::PRECONDITION_FAILED, "multiple-matches", format!("the criteria match more than one {resource_type}: make them select one"));
    audit_failure(app, ctx, &touch, err).await
}

/// `POST /fhir/{type}` with `If-None-Exist`: no match -> created (201); one match -> that
/// resource, read as the caller (200; 403 if they may not see it); several -> 412.
pub(super) async fn create(app: &App, ctx: &Ctx, resource_type: &str, body: Value, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_body(resource_type, &body)?;
    let cond = parse(app, resource_type, pairs)?;
    for _ in 0..ATTEMPTS {
        match matches(app, resource_type, &cond, ctx.now).await?.as_slice() {
            [] => {
                if let Some(reply) = create_as(app, ctx, resource_type, &vault::new_id()?, body.clone(), Some(cond.filter.clone())).await? {
                    return Ok(reply);
                }
            }
            [one] => return read(app, ctx, resource_type, &one.id, None).await,
            _ => return Err(not_selective(app, ctx, "create", Action::Create, resource_type, &cond).await),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", "concurrent writes kept changing what the condition matches; try again"))
}

/// `PUT /fhir/{type}?{criteria}`: no match -> created (with the body's id if it has one and
/// update-as-create is on); one match -> that resource updated (the body's id, if any, must be
/// its id); several -> 412.
pub(super) async fn update_matching(app: &App, ctx: &Ctx, resource_type: &str, pairs: &[(String, String)], mut body: Value, if_match: Option<u64>) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_body(resource_type, &body)?;
    let cond = parse(app, resource_type, pairs)?;
    let body_id = body.get("id").and_then(Value::as_str).map(str::to_string);
    for _ in 0..ATTEMPTS {
        match matches(app, resource_type, &cond, ctx.now).await?.as_slice() {
            [] => {
                if body_id.is_some() && !app.update_create {
                    return Err(ApiError::bad_request("nothing matches the criteria and the body names an id, but this server assigns ids itself (update_create is off): leave out the id"));
                }
                if let Some(v) = if_match {
                    return Err(ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", format!("If-Match names version {v} but nothing matches the criteria")));
                }
                let id = match &body_id {
                    Some(id) => id.clone(),
                    None => vault::new_id()?,
                };
                if let Some(reply) = create_as(app, ctx, resource_type, &id, body.clone(), Some(cond.filter.clone())).await? {
                    return Ok(reply);
                }
            }
            [one] => {
                if body_id.as_deref().is_some_and(|id| id != one.id) {
                    return Err(ApiError::bad_request(format!("the body's id '{}' is not the id of the {resource_type} the criteria match", body_id.unwrap_or_default())));
                }
                if let Value::Object(m) = &mut body {
                    m.insert("id".into(), Value::String(one.id.clone()));
                }
                return update(app, ctx, resource_type, &one.id, body, if_match).await;
            }
            _ => return Err(not_selective(app, ctx, "update", Action::Update, resource_type, &cond).await),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", "concurrent writes kept changing what the criteria match; try again"))
}

/// `DELETE /fhir/{type}?{criteria}` (single: R4 `conditionalDelete = single`): no match -> as for
/// an unknown id; one match -> deleted; several -> 412.
pub(super) async fn delete_matching(app: &App, ctx: &Ctx, resource_type: &str, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    let cond = parse(app, resource_type, pairs)?;
    match matches(app, resource_type, &cond, ctx.now).await?.as_slice() {
        [] => {
            let touch = Touch { interaction: "delete", action: Action::Delete, resource_type, id: None, version: None, patient: None, query: Some(cond.query.clone()) };
            Err(unknown_id(app, ctx, &touch, ApiError::not_found(format!("no {resource_type} matches the criteria"))).await)
        }
        [one] => delete(app, ctx, resource_type, &one.id, None).await,
        _ => Err(not_selective(app, ctx, "delete", Action::Delete, resource_type, &cond).await),
    }
}

/// How a transaction entry is carried out once its condition is resolved.
pub(super) enum EntryPlan {
    /// As the entry says.
    AsSent,
    /// A create that commits only while nothing matches the condition (a conditional create, or
    /// a conditional update that matched nothing).
    CreateUnless(valv_store::Filter),
    /// A conditional create whose condition matched: nothing is written, the entry answers with
    /// the match (read by the caller: decided and audited as a read).
    Existing(vault::Committed),
}

/// Resolves a transaction entry's condition before anything of the transaction is written,
/// setting the entry's id to what it will act on: as in [`create`], [`update_matching`] and
/// [`delete_matching`], except that no match for a DELETE fails the transaction (404, or 403 to
/// people). Events for reads of matches go to `events`, audited with the transaction's.
pub(super) async fn plan_entry(app: &App, ctx: &Ctx, e: &mut bundle::Entry, events: &mut Vec<AuditEvent>) -> Result<EntryPlan, ApiError> {
    let Some(criteria) = e.condition.clone() else { return Ok(EntryPlan::AsSent) };
    check_type(&e.resource_type)?;
    let pairs = crate::http::query::parse(&criteria).map_err(ApiError::bad_request)?;
    let cond = parse(app, &e.resource_type, &pairs)?;
    let found = matches(app, &e.resource_type, &cond, ctx.now).await?;
    let body_id = e.resource.as_ref().and_then(|r| r.get("id")).and_then(Value::as_str).map(str::to_string);
    let rt = e.resource_type.as_str();
    match (e.method, found.as_slice()) {
        (Method::Post, [_, _, ..]) => Err(not_selective(app, ctx, "create", Action::Create, rt, &cond).await),
        (Method::Put, [_, _, ..]) => Err(not_selective(app, ctx, "update", Action::Update, rt, &cond).await),
        (Method::Delete, [_, _, ..]) => Err(not_selective(app, ctx, "delete", Action::Delete, rt, &cond).await),
        (Method::Post, []) => Ok(EntryPlan::CreateUnless(cond.filter)),
        (Method::Post, [one]) => {
            let touch = Touch { interaction: "read", action: Action::Read, resource_type: rt, id: Some(&one.id), version: Some(one.version), patient: one.patient.as_deref(), query: None };
            let permit = authorize(app, ctx, &touch).await?;
            events.push(ctx.permitted(&touch, 200, &permit)?);
            e.id = Some(one.id.clone());
            Ok(EntryPlan::Existing(vault::Committed { resource: one.clone(), created: false, changed: false }))
        }
        (Method::Put, []) => {
            if body_id.is_some() && !app.update_create {
                return Err(ApiError::bad_request("nothing matches the criteria and the body names an id, but this server assigns ids itself (update_create is off): leave out the id"));
            }
            if let Some(v) = e.if_match {
                return Err(ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", format!("ifMatch names version {v} but nothing matches the criteria")));
            }
            e.id = Some(match body_id {
                Some(id) => id,
                None => vault::new_id()?,
            });
            Ok(EntryPlan::CreateUnless(cond.filter))
        }
        (Method::Put | Method::Delete, [one]) => {
            if e.method == Method::Put && body_id.as_deref().is_some_and(|id| id != one.id) {
                return Err(ApiError::bad_request(format!("the resource's id is not the id of the {rt} the criteria match")));
            }
            e.id = Some(one.id.clone());
            Ok(EntryPlan::AsSent)
        }
        (Method::Delete, []) => {
            let touch = Touch { interaction: "delete", action: Action::Delete, resource_type: rt, id: None, version: None, patient: None, query: Some(cond.query.clone()) };
            Err(unknown_id(app, ctx, &touch, ApiError::not_found(format!("no {rt} matches the criteria"))).await)
        }
        _ => Err(ApiError::bad_request("only POST (ifNoneExist), PUT and DELETE entries take a condition")),
    }
}
