//! `/auth/*` (sign-in, enrollment, logout, password change) and `/admin/users` (admins manage
//! people). Every attempt, successful or not, is an audit entry with its reason; the caller of
//! a failed login only ever learns that it failed.
//!
//! All of `/auth/*` is rate-limited per client address (429 with Retry-After); the first refusal
//! of a burst is audited and every refusal is counted in the metrics.

use crate::audit::{AuditEvent, Outcome};
use crate::people::auth::{self, Principal, PrincipalKind};
use crate::error::ApiError;
use crate::people::identity::{AdminChange, Login, LoginOutcome, NewUser, User, LOGIN_FAILED};
use crate::{App, ClientCert, Peer, Reply};
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use valv_store::vault;

/// Who an event is about and who did it.
struct Who<'a> {
    agent_id: &'a str,
    agent_name: &'a str,
    roles: &'a [String],
}

const NOBODY: Who<'static> = Who { agent_id: "", agent_name: "", roles: &[] };

fn who(p: &Principal) -> Who<'_> {
    Who { agent_id: &p.id, agent_name: &p.name, roles: &p.roles }
}

fn user_who(u: &User) -> Who<'_> {
    Who { agent_id: &u.id, agent_name: &u.username, roles: &u.roles }
}

/// One identity audit entry (action E; the entity is the user concerned).
#[allow(clippy::too_many_arguments)]
fn event(rid: &str, source: &str, now: i64, interaction: &'static str, outcome: Outcome, status: StatusCode, agent: &Who<'_>, target: Option<&User>, reason: &str) -> Result<AuditEvent, ApiError> {
    Ok(AuditEvent {
        event_id: vault::new_id()?,
        time: now,
        request_id: rid.to_string(),
        action: "E",
        interaction,
        outcome,
        status: status.as_u16(),
        agent_id: agent.agent_id.to_string(),
        agent_name: agent.agent_name.to_string(),
        roles: agent.roles.to_vec(),
        source_address: source.to_string(),
        purpose_of_use: None,
        patient: None,
        resource_type: target.map(|_| "User".to_string()),
        resource_id: target.map(|u| u.id.clone()),
        version: None,
        query: None,
        reason: reason.to_string(),
    })
}

/// Records an action of the operator at the server's console (`valv user …`).
pub async fn audit_local(app: &App, interaction: &'static str, target: Option<&User>, reason: String, now: i64) -> Result<(), ApiError> {
    audit_local_outcome(app, interaction, target, Outcome::Success, reason, now).await
}

/// As [`audit_local`], for work of the machine's operator (or the server's own schedule) that
/// failed: recorded with outcome `error`.
pub async fn audit_local_failure(app: &App, interaction: &'static str, reason: String, now: i64) -> Result<(), ApiError> {
    audit_local_outcome(app, interaction, None, Outcome::Error, reason, now).await
}

async fn audit_local_outcome(app: &App, interaction: &'static str, target: Option<&User>, outcome: Outcome, reason: String, now: i64) -> Result<(), ApiError> {
    let name = format!("console:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
    let roles = vec!["admin".to_string()];
    let agent = Who { agent_id: "local-operator", agent_name: &name, roles: &roles };
    let rid = vault::new_id()?;
    let status = if outcome == Outcome::Success { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR };
    record(app, vec![event(&rid, "console", now, interaction, outcome, status, &agent, target, &reason)?]).await
}

async fn record(app: &App, events: Vec<AuditEvent>) -> Result<(), ApiError> {
    crate::request::audit(app, events).await
}

fn body_field<'a>(body: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    body.get(name).and_then(Value::as_str).ok_or_else(|| ApiError::bad_request(format!("'{name}' (a string) is required")))
}

fn opt_field<'a>(body: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("'{name}' must be a string"))),
    }
}

fn string_list(body: &Value, name: &str) -> Result<Vec<String>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            items.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(|| ApiError::bad_request(format!("'{name}' must be a list of strings")))).collect()
        }
        Some(_) => Err(ApiError::bad_request(format!("'{name}' must be a list of strings"))),
    }
}

fn json_reply(status: StatusCode, body: Value) -> Reply {
    Reply::text_with_status(status, "application/json", serde_json::to_string(&body).unwrap_or_default())
}

/// `POST /auth/login|logout|enroll|enroll/confirm|password`, `GET /auth/me`.
pub async fn auth_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> (&'static str, Result<Reply, ApiError>) {
    let now = app.clock.now_ms();
    let source = peer.source();
    let path = req.uri().path().to_string();
    let route = match path.as_str() {
        "/auth/login" => "auth_login",
        "/auth/logout" => "auth_logout",
        "/auth/enroll" => "auth_enroll",
        "/auth/enroll/confirm" => "auth_enroll",
        "/auth/password" => "auth_password",
        "/auth/me" => "auth_me",
        p if p.starts_with("/auth/oidc/") => "auth_oidc",
        _ => return ("unknown", Err(ApiError::not_found("no such endpoint under /auth"))),
    };
    if let Err((wait, first)) = app.identity.rate_limit(&source, now) {
        app.metrics.auth_rate_limited.fetch_add(1, Ordering::Relaxed);
        if first {
            let audited = match event(rid, &source, now, "rate-limit", Outcome::Denied, StatusCode::TOO_MANY_REQUESTS, &NOBODY, None, "too-many-requests-from-address") {
                Ok(ev) => record(app, vec![ev]).await,
                Err(e) => Err(e),
            };
            if let Err(e) = audited {
                return (route, Err(e));
            }
        }
        return (route, Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", format!("too many requests from this address; retry in {wait} s")).retry_after(wait)));
    }
    if route == "auth_oidc" {
        let query = req.uri().query().unwrap_or("").to_string();
        let browser = sso_cookie(req.headers());
        let result = match req.method() == Method::GET {
            true => oidc_route(app, path.trim_start_matches("/auth/oidc/"), &query, browser.as_deref(), rid, &source, now).await,
            false => Err(ApiError::method_not_allowed("use GET")),
        };
        return (route, result);
    }
    let started = std::time::Instant::now();
    let result = match (route, req.method().clone()) {
        ("auth_me", Method::GET) => me(app, &req, &peer.cert, rid, &source, now).await,
        ("auth_me", _) => Err(ApiError::method_not_allowed("use GET")),
        ("auth_logout", Method::POST) => {
            let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            logout(app, authz.as_deref(), rid, &source, now).await
        }
        (_, Method::POST) => {
            let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            match crate::read_json_body(app, req).await {
                // A sign-in attempt with a body that is not JSON (or too large) is an attempt too.
                Err(e) if path == "/auth/login" => {
                    app.metrics.login_failures.fetch_add(1, Ordering::Relaxed);
                    match event(rid, &source, now, "login", Outcome::Denied, e.status, &NOBODY, None, &e.diagnostics) {
                        Ok(ev) => record(app, vec![ev]).await.and(Err(e.recorded())),
                        Err(err) => Err(err),
                    }
                }
                Err(e) => Err(e),
                Ok(body) => {
                    let r = match path.as_str() {
                        "/auth/login" => login(app, &body, rid, &source, now).await,
                        "/auth/enroll" => enroll(app, &body, rid, &source, now).await,
                        "/auth/enroll/confirm" => confirm(app, &body, rid, &source, now).await,
                        _ => change_password(app, authz.as_deref(), &body, rid, &source, now).await,
                    };
                    // Answers that check a password take at least the floor, so timing tells nothing.
                    if matches!(path.as_str(), "/auth/login" | "/auth/password") {
                        let floor = std::time::Duration::from_millis(app.identity.settings.login_floor_ms);
                        if let Some(rest) = floor.checked_sub(started.elapsed()) {
                            tokio::time::sleep(rest).await;
                        }
                    }
                    r
                }
            }
        }
        _ => Err(ApiError::method_not_allowed("use POST")),
    };
    (route, result)
}

async fn login(app: &App, body: &Value, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    // Every attempt leaves an entry, including those that fail before a password is checked.
    let outcome = match serde_json::from_value::<Login>(body.clone()) {
        Err(e) => Err(ApiError::bad_request(format!("a login is {{username, password, totp}} or {{username, password, recovery_code}}: {e}"))),
        Ok(attempt) => match app.identity.login(&attempt, now).await {
            Ok(o) => Ok((attempt, o)),
            Err(e) => Err(e),
        },
    };
    let (attempt, outcome) = match outcome {
        Ok(x) => x,
        Err(err) => {
            app.metrics.login_failures.fetch_add(1, Ordering::Relaxed);
            let result = if err.status.is_server_error() { Outcome::Error } else { Outcome::Denied };
            record(app, vec![event(rid, source, now, "login", result, err.status, &NOBODY, None, &err.diagnostics)?]).await?;
            return Err(err.recorded());
        }
    };
    match outcome {
        LoginOutcome::Ok { user, token, expires_in, used_recovery } => {
            let how = match (used_recovery, attempt.totp.is_some()) {
                (true, _) => "password-and-recovery-code",
                (false, true) => "password-and-totp",
                (false, false) => "password-only",
            };
            let mut events = vec![event(rid, source, now, "login", Outcome::Success, StatusCode::OK, &user_who(&user), Some(&user), how)?];
            if used_recovery {
                events.push(event(rid, source, now, "recovery-code-use", Outcome::Success, StatusCode::OK, &user_who(&user), Some(&user), &format!("{} recovery codes left", user.recovery.len()))?);
            }
            record(app, events).await?;
            app.metrics.logins.fetch_add(1, Ordering::Relaxed);
            Ok(json_reply(StatusCode::OK, json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in})))
        }
        LoginOutcome::Failed { user: Some(user), reason: "password-expired", .. } => {
            // Only someone who gave the password and the second factor learns this.
            record(app, vec![event(rid, source, now, "login", Outcome::Denied, StatusCode::FORBIDDEN, &user_who(&user), Some(&user), "password-expired")?]).await?;
            Err(ApiError::forbidden("the password has expired: change it with POST /auth/password {username, current_password, new_password, totp}").recorded())
        }
        LoginOutcome::Failed { user, reason, locked_now } => {
            app.metrics.login_failures.fetch_add(1, Ordering::Relaxed);
            let agent = user.as_ref().map_or(NOBODY, user_who);
            let mut refused = event(rid, source, now, "login", Outcome::Denied, StatusCode::UNAUTHORIZED, &agent, user.as_ref(), reason)?;
            if user.is_none() {
                refused.resource_type = Some("User".into());
                refused.resource_id = Some(app.identity.unknown_name_token(&attempt.username));
            }
            let mut events = vec![refused];
            if locked_now {
                app.metrics.lockouts.fetch_add(1, Ordering::Relaxed);
                let until = user.as_ref().and_then(|u| u.failures.locked_until).map(valv_fhir::date::format_instant).unwrap_or_default();
                tracing::warn!(user_id = %agent.agent_id, "account locked after repeated failed logins");
                events.push(event(rid, source, now, "lockout", Outcome::Denied, StatusCode::UNAUTHORIZED, &agent, user.as_ref(), &format!("locked until {until}"))?);
            }
            record(app, events).await?;
            Err(ApiError::unauthorized(LOGIN_FAILED).recorded())
        }
    }
}

/// `GET /auth/oidc/{provider}/login` redirects to the provider; `GET /auth/oidc/{provider}/callback`
/// finishes the sign-in and answers the provider's access token for this API.
async fn oidc_route(app: &App, rest: &str, query: &str, browser: Option<&str>, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    let (name, step) = rest.split_once('/').ok_or_else(|| ApiError::not_found("use /auth/oidc/{provider}/login"))?;
    match step {
        "login" => match app.oidc.start(name, now).await {
            Ok((url, secret)) => {
                let mut reply = Reply::redirect(url);
                // Ties the callback to this browser; sent back only to the sign-in endpoints.
                reply.set_cookie = Some(format!("{SSO_COOKIE}={secret}; Path=/auth/oidc/; Secure; HttpOnly; SameSite=Lax; Max-Age=600"));
                Ok(reply)
            }
            Err(crate::people::oidc::StartError::Unknown(m)) => Err(ApiError::not_found(m)),
            Err(crate::people::oidc::StartError::Unavailable(m)) => Err(ApiError::unavailable(m).retry_after(5)),
        },
        "callback" => {
            let pairs = crate::http::query::parse(query).map_err(ApiError::bad_request)?;
            let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if let Some(err) = get("error") {
                let ev = event(rid, source, now, "login-sso", Outcome::Denied, StatusCode::UNAUTHORIZED, &NOBODY, None, &format!("provider-error: {}", err.chars().take(64).collect::<String>()))?;
                record(app, vec![ev]).await?;
                return Err(ApiError::unauthorized("the identity provider did not sign the person in").recorded());
            }
            let (Some(code), Some(state)) = (get("code"), get("state")) else {
                return Err(ApiError::bad_request("the callback needs 'code' and 'state'"));
            };
            let iss = get("iss");
            let callback = crate::people::oidc::Callback { code: &code, state: &state, iss: iss.as_deref(), browser };
            match app.oidc.finish(name, &callback, now).await {
                Ok(signed) => {
                    let p = &signed.principal;
                    let agent = Who { agent_id: &p.id, agent_name: &p.name, roles: &p.roles };
                    record(app, vec![event(rid, source, now, "login-sso", Outcome::Success, StatusCode::OK, &agent, None, &format!("oidc:{name}"))?]).await?;
                    app.metrics.logins.fetch_add(1, Ordering::Relaxed);
                    Ok(json_reply(StatusCode::OK, json!({"access_token": signed.access_token, "token_type": "Bearer", "expires_in": signed.expires_in, "id": p.id, "roles": p.roles})))
                }
                Err(reason) => {
                    app.metrics.login_failures.fetch_add(1, Ordering::Relaxed);
                    record(app, vec![event(rid, source, now, "login-sso", Outcome::Denied, StatusCode::UNAUTHORIZED, &NOBODY, None, reason)?]).await?;
                    Err(ApiError::unauthorized("single sign-on failed; start again").recorded())
                }
            }
        }
        _ => Err(ApiError::not_found("use /auth/oidc/{provider}/login")),
    }
}

const SSO_COOKIE: &str = "valv_sso";

/// The browser's sign-in cookie, if it sent one.
fn sso_cookie(headers: &hyper::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SSO_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The signed-in person behind an `Authorization` header (sessions only).
async fn session_user(app: &App, authorization: Option<&str>, rid: &str, source: &str, now: i64) -> Result<(User, String), ApiError> {
    let token = auth::bearer(authorization)?.to_string();
    if !token.starts_with(valv_identity::codes::SESSION_PREFIX) {
        return Err(ApiError::unauthorized("this needs a person's access token (from POST /auth/login)"));
    }
    let principal = crate::request::authenticate(app, authorization, &ClientCert::None, rid, source, now).await?;
    let user = app.identity.by_id(&principal.id).await?.ok_or_else(|| ApiError::unauthorized("the session's user is unknown"))?;
    Ok((user, token))
}

async fn logout(app: &App, authorization: Option<&str>, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    let (user, token) = session_user(app, authorization, rid, source, now).await?;
    app.identity.logout(&token).await?;
    record(app, vec![event(rid, source, now, "logout", Outcome::Success, StatusCode::NO_CONTENT, &user_who(&user), Some(&user), "logout")?]).await?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

async fn me(app: &App, req: &Request<Incoming>, cert: &ClientCert, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = crate::request::authenticate(app, authz, cert, rid, source, now).await?;
    let mut body = json!({"id": principal.id, "name": principal.name, "roles": principal.roles, "units": principal.units, "mfa": principal.mfa,
        "kind": match principal.kind { PrincipalKind::User => "user", PrincipalKind::Service => "service", PrincipalKind::Local => "local" }});
    if principal.kind == PrincipalKind::User {
        if let Some(u) = app.identity.by_id(&principal.id).await? {
            body["user"] = u.summary(now);
        }
    }
    Ok(json_reply(StatusCode::OK, body))
}

async fn enroll(app: &App, body: &Value, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    let token = body_field(body, "token")?;
    let password = body_field(body, "password")?;
    let approval = opt_field(body, "approval_code")?;
    match app.identity.enroll(token, approval, password, now).await {
        Ok(e) => {
            record(app, vec![event(rid, source, now, "enroll", Outcome::Success, StatusCode::OK, &user_who(&e.user), Some(&e.user), "password-set-totp-issued")?]).await?;
            Ok(json_reply(
                StatusCode::OK,
                json!({"otpauth_uri": e.otpauth_uri, "secret": e.secret_base32, "next": "POST /auth/enroll/confirm with {token, totp}: a code from the authenticator app"}),
            ))
        }
        Err(err) => fail(app, rid, source, now, "enroll", err).await,
    }
}

async fn confirm(app: &App, body: &Value, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    let token = body_field(body, "token")?;
    let code = body_field(body, "totp")?;
    match app.identity.confirm(token, code, now).await {
        Ok((user, codes)) => {
            record(app, vec![event(rid, source, now, "enroll-confirm", Outcome::Success, StatusCode::OK, &user_who(&user), Some(&user), "totp-confirmed-account-active")?]).await?;
            Ok(json_reply(StatusCode::OK, json!({"recovery_codes": codes, "note": "each recovery code works once; keep them somewhere safe"})))
        }
        Err(err) => fail(app, rid, source, now, "enroll-confirm", err).await,
    }
}

/// `POST /auth/password`: with a session, or (an expired password) with the user name; either
/// way the current password and a TOTP code are asked again. Without a session, a wrong answer
/// counts towards lockout like a failed login.
async fn change_password(app: &App, authorization: Option<&str>, body: &Value, rid: &str, source: &str, now: i64) -> Result<Reply, ApiError> {
    let signed_in = authorization.is_some();
    let user = if signed_in {
        session_user(app, authorization, rid, source, now).await?.0
    } else {
        // Only for a password that has expired: anything else signs in first.
        let username = body_field(body, "username")?;
        let found = match valv_identity::account::check_username(username) {
            Ok(()) => app.identity.find(username).await?,
            Err(_) => None,
        };
        let usable = found.filter(|u| u.state == valv_identity::UserState::Active && !u.failures.locked(now) && app.identity.password_expired(u, now));
        match usable {
            Some(u) => u,
            None => {
                app.identity.decoy_check(body.get("current_password").and_then(Value::as_str).unwrap_or("")).await?;
                record(app, vec![event(rid, source, now, "password-change", Outcome::Denied, StatusCode::UNAUTHORIZED, &NOBODY, None, "no-expired-password-for-that-user")?]).await?;
                return Err(ApiError::unauthorized(LOGIN_FAILED).recorded());
            }
        }
    };
    let current = body_field(body, "current_password")?;
    let new = body_field(body, "new_password")?;
    let code = opt_field(body, "totp")?;
    match app.identity.change_password(&user, current, new, code, now).await {
        Ok(()) => {
            record(
                app,
                vec![
                    event(rid, source, now, "password-change", Outcome::Success, StatusCode::NO_CONTENT, &user_who(&user), Some(&user), "password-changed")?,
                    event(rid, source, now, "session-revoke", Outcome::Success, StatusCode::NO_CONTENT, &user_who(&user), Some(&user), "all-sessions-after-password-change")?,
                ],
            )
            .await?;
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        Err(err) => {
            let mut events = vec![event(rid, source, now, "password-change", Outcome::Denied, err.status, &user_who(&user), Some(&user), &err.diagnostics)?];
            if !signed_in && err.status == StatusCode::FORBIDDEN {
                if app.identity.count_failure(user.clone(), now).await? {
                    app.metrics.lockouts.fetch_add(1, Ordering::Relaxed);
                    events.push(event(rid, source, now, "lockout", Outcome::Denied, StatusCode::UNAUTHORIZED, &user_who(&user), Some(&user), "locked after failed password changes")?);
                }
                record(app, events).await?;
                return Err(ApiError::unauthorized(LOGIN_FAILED).recorded());
            }
            record(app, events).await?;
            Err(err.recorded())
        }
    }
}

/// Records a failed enrollment step (the person is not known by a session, only by a token).
async fn fail(app: &App, rid: &str, source: &str, now: i64, interaction: &'static str, err: ApiError) -> Result<Reply, ApiError> {
    let outcome = if err.status.is_server_error() { Outcome::Error } else { Outcome::Denied };
    record(app, vec![event(rid, source, now, interaction, outcome, err.status, &NOBODY, None, &err.diagnostics)?]).await?;
    Err(err.recorded())
}

/// `/admin/users…`: admins (API key or session) manage people. Every call is audited with the
/// admin as agent and the user as entity.
pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let now = app.clock.now_ms();
    let source = peer.source();
    let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let principal = crate::request::authenticate(app, authz.as_deref(), &peer.cert, rid, &source, now).await?;
    let path = req.uri().path().trim_start_matches("/admin/users").trim_start_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let interaction = admin_interaction(req.method(), &segs);
    let decision = crate::access::grantapi::users_decision(app, &principal, now);
    if !decision.permit {
        record(app, vec![event(rid, &source, now, interaction, Outcome::Denied, StatusCode::FORBIDDEN, &who(&principal), None, &decision.reason())?]).await?;
        return Err(ApiError::forbidden(format!("only admins manage users ({})", decision.reason())).recorded());
    }
    let permit_reason = decision.reason();
    let method = req.method().clone();
    // Actions (disable, unlock…) need no body; a body, when sent, must be JSON.
    let has_body = req.headers().contains_key(header::CONTENT_TYPE);
    let body = if (method == Method::POST || method == Method::PUT) && has_body { Some(crate::read_json_body(app, req).await) } else { None };
    let result = admin_act(app, &method, &segs, body, &principal.id, now).await;
    match result {
        Ok((reply, target)) => {
            record(app, vec![event(rid, &source, now, interaction, Outcome::Success, reply.status, &who(&principal), target.as_ref(), &permit_reason)?]).await?;
            Ok(reply)
        }
        Err(err) => {
            let outcome = if err.status.is_server_error() { Outcome::Error } else { Outcome::Denied };
            record(app, vec![event(rid, &source, now, interaction, outcome, err.status, &who(&principal), None, &err.diagnostics)?]).await?;
            Err(err.recorded())
        }
    }
}

/// What an enrollment issued over the admin API still needs.
const NEEDS_APPROVAL: &str = "another admin approves with POST /admin/users/{name}/approve and receives an approval code; the person enrolls with the enrollment token and the approval code (POST /auth/enroll)";

fn admin_interaction(method: &Method, segs: &[&str]) -> &'static str {
    match (method.as_str(), segs) {
        ("GET", [] | [_]) => "user-read",
        ("POST", []) => "user-create",
        ("PUT", [_, "roles"]) => "user-set-roles",
        ("POST", [_, "approve"]) => "user-approve",
        ("POST", [_, action]) => admin_change(action).map_or("user-admin", |c| c.interaction()),
        _ => "user-admin",
    }
}

fn admin_change(action: &str) -> Option<AdminChange> {
    Some(match action {
        "disable" => AdminChange::Disable,
        "enable" => AdminChange::Enable,
        "unlock" => AdminChange::Unlock,
        "reset-mfa" => AdminChange::ResetMfa,
        "revoke-sessions" => AdminChange::RevokeSessions,
        _ => return None,
    })
}

/// `by`: the admin's principal id (two-person rule: see [`crate::people::identity::Identity::approve`]).
async fn admin_act(app: &App, method: &Method, segs: &[&str], body: Option<Result<Value, ApiError>>, by: &str, now: i64) -> Result<(Reply, Option<User>), ApiError> {
    let body = body.transpose()?;
    let ident = &app.identity;
    match (method.as_str(), segs, body) {
        ("GET", [], None) => {
            let users = ident.list().await?;
            let list: Vec<Value> = users.iter().map(|u| u.summary(now)).collect();
            Ok((json_reply(StatusCode::OK, json!({"users": list})), None))
        }
        ("GET", [name], None) => {
            let user = ident.get(name).await?;
            Ok((json_reply(StatusCode::OK, user.summary(now)), Some(user)))
        }
        ("POST", [], Some(body)) => {
            let spec = NewUser {
                username: body_field(&body, "username")?.to_string(),
                display_name: opt_field(&body, "display_name")?.unwrap_or_default().to_string(),
                roles: string_list(&body, "roles")?,
                units: string_list(&body, "units")?,
                practitioner: opt_field(&body, "practitioner")?.map(str::to_string),
                patient: opt_field(&body, "patient")?.map(str::to_string),
            };
            let (user, token) = ident.create(spec, now, Some(by)).await?;
            let expires = user.enrollment_expires.map(valv_fhir::date::format_instant);
            let body = json!({"user": user.summary(now), "enrollment_token": token, "enrollment_expires": expires, "next": NEEDS_APPROVAL});
            Ok((json_reply(StatusCode::CREATED, body), Some(user)))
        }
        ("PUT", [name, "roles"], Some(body)) => {
            let change = AdminChange::SetRoles { roles: string_list(&body, "roles")?, units: string_list(&body, "units")? };
            let (user, _) = ident.admin(name, change, now, Some(by)).await?;
            // A widening change waits for a second admin: 202, the account unchanged.
            let status = if user.pending_roles.is_some() { StatusCode::ACCEPTED } else { StatusCode::OK };
            Ok((json_reply(status, user.summary(now)), Some(user)))
        }
        ("POST", [name, "approve"], _) => {
            let (user, code) = ident.approve(name, by, now).await?;
            let mut out = json!({"user": user.summary(now)});
            if let Some(c) = code {
                out["approval_code"] = json!(c);
                out["next"] = json!("hand the approval code to the person (not to the admin who issued the enrollment token): they enroll with both");
            }
            Ok((json_reply(StatusCode::OK, out), Some(user)))
        }
        ("POST", [name, action], _) => {
            let change = admin_change(action).ok_or_else(|| ApiError::not_found(format!("'{action}' is not a user action (approve, disable, enable, unlock, reset-mfa, revoke-sessions)")))?;
            let (user, token) = ident.admin(name, change, now, Some(by)).await?;
            let mut out = json!({"user": user.summary(now)});
            if let Some(t) = token {
                out["enrollment_token"] = json!(t);
                out["next"] = json!(NEEDS_APPROVAL);
            }
            Ok((json_reply(StatusCode::OK, out), Some(user)))
        }
        _ => Err(ApiError::method_not_allowed(
            "use GET /admin/users[/{name}], POST /admin/users, PUT /admin/users/{name}/roles, POST /admin/users/{name}/{approve|disable|enable|unlock|reset-mfa|revoke-sessions}",
        )),
    }
}
