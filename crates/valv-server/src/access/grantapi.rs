//! Grants over HTTP: emergency access (`POST /fhir/Patient/{id}/$break-glass`) and its review
//! (`/admin/break-glass`), and remote-support grants (`/admin/support-grants`): requested by
//! support staff, approved by an admin, expiring by themselves, revocable. Every step is audited.

use crate::access::{GrantRecord, Review, DEFAULT_BREAK_GLASS_MINUTES, MAX_BREAK_GLASS_MINUTES, MAX_SUPPORT_MINUTES};
use crate::audit::{AuditEvent, Outcome};
use crate::people::auth::{Principal, PrincipalKind};
use crate::error::ApiError;
use crate::request::{audit, Ctx};
use crate::{App, Peer, Reply};
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use valv_store::vault;

const MAX_REASON: usize = 1000;

/// One grant audit entry.
fn grant_event(ctx: &Ctx, interaction: &'static str, outcome: Outcome, status: StatusCode, grant: Option<&str>, patient: Option<&str>, reason: &str) -> Result<AuditEvent, ApiError> {
    Ok(AuditEvent {
        event_id: vault::new_id()?,
        time: ctx.now,
        request_id: ctx.request_id.clone(),
        action: if interaction == "break-glass" || interaction == "support-request" { "C" } else { "U" },
        interaction,
        outcome,
        status: status.as_u16(),
        agent_id: ctx.principal.id.clone(),
        agent_name: ctx.principal.name.clone(),
        roles: ctx.principal.roles.clone(),
        source_address: ctx.source.clone(),
        purpose_of_use: Some(if interaction == "break-glass" { "BTG".into() } else { ctx.purpose().to_string() }),
        patient: patient.map(str::to_string),
        resource_type: grant.map(|_| "Grant".to_string()),
        resource_id: grant.map(str::to_string),
        version: None,
        query: None,
        reason: reason.to_string(),
    })
}

/// Records a refusal and returns it.
async fn refuse(app: &App, ctx: &Ctx, interaction: &'static str, patient: Option<&str>, err: ApiError) -> ApiError {
    let outcome = if err.status.is_server_error() { Outcome::Error } else { Outcome::Denied };
    match grant_event(ctx, interaction, outcome, err.status, None, patient, &err.diagnostics) {
        Ok(e) => match audit(app, vec![e]).await {
            Ok(()) => err.recorded(),
            Err(a) => a,
        },
        Err(e) => e,
    }
}

/// A reason: required, not blank, bounded.
fn reason_text(v: Option<&str>) -> Result<String, ApiError> {
    let r = v.map(str::trim).unwrap_or("");
    if r.is_empty() {
        return Err(ApiError::bad_request("a reason is required"));
    }
    if r.chars().count() > MAX_REASON {
        return Err(ApiError::bad_request(format!("the reason is longer than {MAX_REASON} characters")));
    }
    Ok(r.to_string())
}

/// `reason` and `duration` from a FHIR Parameters body.
fn break_glass_params(body: &Value) -> Result<(String, i64), ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request("the body must be a FHIR Parameters resource with 'reason' and optionally 'duration' (minutes)"));
    }
    let params = body.get("parameter").and_then(Value::as_array).cloned().unwrap_or_default();
    let find = |name: &str| params.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(name));
    let reason = match find("reason") {
        Some(p) => reason_text(Some(p.get("valueString").and_then(Value::as_str).ok_or_else(|| ApiError::bad_request("'reason' must be a valueString"))?))?,
        None => return Err(ApiError::bad_request("a reason is required (Parameters.parameter 'reason', valueString)")),
    };
    let minutes = match find("duration") {
        None => DEFAULT_BREAK_GLASS_MINUTES,
        Some(p) => p
            .get("valueInteger")
            .or_else(|| p.get("valuePositiveInt"))
            .and_then(Value::as_i64)
            .ok_or_else(|| ApiError::bad_request("'duration' must be a valueInteger (minutes)"))?,
    };
    if !(1..=MAX_BREAK_GLASS_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!("'duration' must be 1 to {MAX_BREAK_GLASS_MINUTES} minutes")));
    }
    Ok((reason, minutes))
}

/// `POST /fhir/Patient/{id}/$break-glass`
pub async fn break_glass(app: &App, ctx: &Ctx, patient: &str, body: Value) -> Result<Reply, ApiError> {
    crate::fhir::check_id(patient)?;
    let clinical = ctx.principal.roles.iter().any(|r| r == "physician" || r == "nurse");
    if ctx.principal.kind != PrincipalKind::User || !clinical {
        return Err(refuse(app, ctx, "break-glass", Some(patient), ApiError::forbidden("break-glass is for signed-in physicians and nurses")).await);
    }
    let (reason, minutes) = match break_glass_params(&body) {
        Ok(v) => v,
        Err(e) => return Err(refuse(app, ctx, "break-glass", Some(patient), e).await),
    };
    // Whether the patient exists is not looked up: answering 404 for an unknown id would tell a
    // caller without access which ids exist. A grant for an unknown id opens nothing, and is
    // reviewed like any other.
    let g = app.access.create(&ctx.principal, "break-glass", vec![patient.to_string()], reason, minutes, ctx.now).await?;
    audit(app, vec![grant_event(ctx, "break-glass", Outcome::Success, StatusCode::CREATED, Some(&g.id), Some(patient), &format!("break-glass granted for {minutes} min, pending review"))?]).await?;
    app.metrics.break_glass_grants.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(request_id = %ctx.request_id, agent = %ctx.principal.id, grant = %g.id, minutes, "break-glass grant made; queued for review");
    let expires = valv_fhir::date::format_instant(g.end.unwrap_or(ctx.now));
    Ok(Reply::json(
        StatusCode::CREATED,
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "grant", "valueString": g.id},
            {"name": "expires", "valueInstant": expires},
            {"name": "overridesBlock", "valueBoolean": app.access.settings.break_glass_overrides_block},
        ]}),
    ))
}

/// `/admin/break-glass…` and `/admin/support-grants…`.
pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let ctx = crate::request::admin_ctx(app, &req, rid, peer).await?;
    let now = ctx.now;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let has_body = req.headers().contains_key(header::CONTENT_TYPE);
    let body = if method == Method::POST && has_body { crate::read_json_body(app, req).await? } else { json!({}) };
    let segs: Vec<&str> = path.trim_start_matches("/admin/").split('/').filter(|s| !s.is_empty()).collect();
    let status_filter = crate::http::query::parse(&query).map_err(ApiError::bad_request)?.into_iter().find(|(k, _)| k == "status").map(|(_, v)| v);
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["break-glass"]) => {
            allow(app, &ctx, "break-glass-review", "break-glass-list").await?;
            let want = status_filter.unwrap_or_else(|| "pending".into());
            let list = app.access.grants(|g| g.kind == "break-glass" && matches_review(g, &want));
            Ok(list_reply(&list, now))
        }
        ("POST", ["break-glass", id, "review"]) => {
            allow(app, &ctx, "break-glass-review", "break-glass-review").await?;
            let outcome = body.get("outcome").and_then(Value::as_str).unwrap_or("").to_string();
            if outcome != "justified" && outcome != "unjustified" {
                return Err(refuse(app, &ctx, "break-glass-review", None, ApiError::bad_request("'outcome' must be 'justified' or 'unjustified'")).await);
            }
            let note = body.get("note").and_then(Value::as_str).unwrap_or("").chars().take(MAX_REASON).collect::<String>();
            let by = ctx.principal.id.clone();
            let result = app
                .access
                .change(id, |g| {
                    if g.kind != "break-glass" {
                        return Err(ApiError::not_found(format!("{id} is not a break-glass grant")));
                    }
                    if g.review.is_some() {
                        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "this grant has been reviewed already"));
                    }
                    if g.user_id == by {
                        return Err(ApiError::forbidden("nobody reviews their own break-glass use"));
                    }
                    g.review = Some(Review { by: by.clone(), at: now, outcome: outcome.clone(), note });
                    Ok(())
                })
                .await;
            done(app, &ctx, "break-glass-review", result, &format!("reviewed: {outcome}")).await
        }
        ("GET", ["support-grants"]) => {
            let admin = app.access.decide_admin(&ctx.principal, "support-grants", now).permit;
            if !admin {
                allow(app, &ctx, "support-request", "support-list").await?;
            }
            let me = ctx.principal.id.clone();
            let list = app.access.grants(|g| g.kind == "support" && (admin || g.user_id == me) && status_filter.as_deref().is_none_or(|s| g.status(now) == s));
            Ok(list_reply(&list, now))
        }
        ("POST", ["support-grants"]) => {
            allow(app, &ctx, "support-request", "support-request").await?;
            let (patients, reason, minutes) = match support_request(&body) {
                Ok(v) => v,
                Err(e) => return Err(refuse(app, &ctx, "support-request", None, e).await),
            };
            let g = app.access.create(&ctx.principal, "support", patients, reason, minutes, now).await?;
            audit(app, vec![grant_event(&ctx, "support-request", Outcome::Success, StatusCode::CREATED, Some(&g.id), None, "support access requested, pending approval")?]).await?;
            Ok(Reply::json(StatusCode::CREATED, g.to_json(now)))
        }
        ("POST", ["support-grants", id, "approve"]) => {
            allow(app, &ctx, "support-grants", "support-approve").await?;
            let by = ctx.principal.id.clone();
            let admin_units = ctx.principal.units.clone();
            let directory = app.access.directory();
            let result = app
                .access
                .change(id, |g| {
                    if g.kind != "support" {
                        return Err(ApiError::not_found(format!("{id} is not a support grant")));
                    }
                    if g.status(now) != "pending" {
                        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("this grant is {}, not pending", g.status(now))));
                    }
                    if g.user_id == by {
                        return Err(ApiError::forbidden("nobody approves their own grant"));
                    }
                    // An admin of a care provider approves access to that provider's patients only.
                    if !admin_units.is_empty() {
                        let mine: Vec<String> = admin_units.iter().map(|u| directory.provider_of(u)).collect();
                        if let Some(p) = g.patients.iter().find(|p| directory.managing_provider(p).is_some_and(|prov| !mine.contains(&prov))) {
                            return Err(ApiError::forbidden(format!("Patient/{p} belongs to another care provider than this admin's")));
                        }
                    }
                    g.approved_by = Some(by.clone());
                    g.start = Some(now);
                    g.end = Some(now + g.minutes * 60_000);
                    Ok(())
                })
                .await;
            done(app, &ctx, "support-approve", result, "support access approved").await
        }
        ("POST", ["support-grants", id, "revoke"]) => {
            let admin = app.access.decide_admin(&ctx.principal, "support-grants", now).permit;
            let by = ctx.principal.id.clone();
            let result = app
                .access
                .change(id, |g| {
                    if g.kind != "support" {
                        return Err(ApiError::not_found(format!("{id} is not a support grant")));
                    }
                    if !admin && g.user_id != by {
                        return Err(ApiError::forbidden("only an admin or the grant's holder revokes it"));
                    }
                    if g.revoked_at.is_some() {
                        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "this grant is revoked already"));
                    }
                    g.revoked_by = Some(by.clone());
                    g.revoked_at = Some(now);
                    Ok(())
                })
                .await;
            done(app, &ctx, "support-revoke", result, "support access revoked").await
        }
        _ => Err(ApiError::not_found(format!("{method} {path} is not an admin endpoint"))),
    }
}

fn matches_review(g: &GrantRecord, want: &str) -> bool {
    match want {
        "pending" => g.review.is_none(),
        "reviewed" => g.review.is_some(),
        _ => true,
    }
}

fn list_reply(list: &[GrantRecord], now: i64) -> Reply {
    Reply::json(StatusCode::OK, json!({"total": list.len(), "grants": list.iter().map(|g| g.to_json(now)).collect::<Vec<_>>()}))
}

/// Decides an admin area for the caller; a denial is audited and answered 403.
async fn allow(app: &App, ctx: &Ctx, area: &str, interaction: &'static str) -> Result<(), ApiError> {
    let d = app.access.decide_admin(&ctx.principal, area, ctx.now);
    if d.permit {
        return Ok(());
    }
    Err(refuse(app, ctx, interaction, None, ApiError::forbidden(format!("access denied ({})", d.reason()))).await)
}

async fn done(app: &App, ctx: &Ctx, interaction: &'static str, result: Result<GrantRecord, ApiError>, what: &str) -> Result<Reply, ApiError> {
    match result {
        Ok(g) => {
            audit(app, vec![grant_event(ctx, interaction, Outcome::Success, StatusCode::OK, Some(&g.id), None, what)?]).await?;
            Ok(Reply::json(StatusCode::OK, g.to_json(ctx.now)))
        }
        Err(e) => Err(refuse(app, ctx, interaction, None, e).await),
    }
}

/// The patients (or administration), reason and length of a support request.
fn support_request(body: &Value) -> Result<(Vec<String>, String, i64), ApiError> {
    let reason = reason_text(body.get("reason").and_then(Value::as_str))?;
    let minutes = body.get("minutes").map_or(Some(MAX_SUPPORT_MINUTES), Value::as_i64).ok_or_else(|| ApiError::bad_request("'minutes' must be an integer"))?;
    if !(1..=MAX_SUPPORT_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!("'minutes' must be 1 to {MAX_SUPPORT_MINUTES}")));
    }
    let patients = match (body.get("scope").and_then(Value::as_str), body.get("patients")) {
        (Some("administration"), None) => Vec::new(),
        (Some("patients") | None, Some(Value::Array(ps))) if !ps.is_empty() && ps.len() <= 20 => {
            let mut out = Vec::new();
            for p in ps {
                let id = p.as_str().ok_or_else(|| ApiError::bad_request("'patients' must be a list of Patient ids"))?;
                crate::fhir::check_id(id)?;
                // Existence is not checked (it would tell which ids exist); an unknown id opens nothing.
                if !out.iter().any(|o| o == id) {
                    out.push(id.to_string());
                }
            }
            out
        }
        _ => return Err(ApiError::bad_request("give 'scope': 'administration', or 'patients': 1 to 20 Patient ids")),
    };
    Ok((patients, reason, minutes))
}

/// Whether `p` may act on `/admin/users` (admins; support staff under an administration grant).
pub fn users_decision(app: &App, p: &Principal, now: i64) -> valv_policy::Decision {
    app.access.decide_admin(p, "users", now)
}
