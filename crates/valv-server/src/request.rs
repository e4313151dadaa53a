//! The shared request context: who is asking (`Ctx`, from [`authenticate`]), what each touch of
//! data records (`Touch` -> an audit entry), the access decision for it ([`authorize`],
//! [`Filter`] for searches), and the durable audit before anything leaves ([`audit`], fail closed).
//! The FHIR interactions (`fhir`), the audit log's API (`auditapi`) and the grant API
//! (`grantapi`) all stand on it.

use crate::audit::{AuditEvent, Outcome};
use crate::people::auth::{self, Principal};
use crate::error::ApiError;
use crate::App;
use hyper::StatusCode;
use valv_policy::{Action, Decision, Question};
use valv_store::vault;

/// Everything about the request that goes into audit entries.
pub struct Ctx {
    pub principal: Principal,
    pub request_id: String,
    pub source: String,
    pub now: i64,
    pub purpose_of_use: Option<String>,
    /// Return the resource after a write (`Prefer: return=representation`, the default).
    pub return_representation: bool,
    /// `Prefer: handling=lenient`: a search ignores parameters it does not support (and says
    /// which in its self link) instead of refusing them (strict, the default).
    pub lenient: bool,
}

/// One audit entry's varying part.
pub(crate) struct Touch<'a> {
    pub(crate) interaction: &'static str,
    pub(crate) action: Action,
    pub(crate) resource_type: &'a str,
    pub(crate) id: Option<&'a str>,
    pub(crate) version: Option<u64>,
    pub(crate) patient: Option<&'a str>,
    pub(crate) query: Option<String>,
}

/// A permitted access: the reason for its audit entry and the purpose of use it records
/// (`BTG` when it rests on a break-glass grant, whatever the request declared).
pub(crate) struct Permit {
    pub(crate) reason: String,
    pub(crate) purpose: Option<String>,
}

impl Ctx {
    /// The purpose of use the request declared, or its caller's roles' default.
    pub fn purpose(&self) -> &str {
        self.purpose_of_use.as_deref().unwrap_or_else(|| valv_policy::purpose::default_for(&self.principal.roles))
    }

    pub(crate) fn question<'a>(&'a self, t: &Touch<'a>) -> Question<'a> {
        Question { action: t.action, resource_type: t.resource_type, patient: t.patient, now: self.now, purpose: self.purpose(), file_scan: None }
    }

    /// The entry of a permitted access.
    pub(crate) fn permitted(&self, t: &Touch<'_>, status: u16, permit: &Permit) -> Result<AuditEvent, ApiError> {
        let mut e = self.event(t, Outcome::Success, status, &permit.reason)?;
        if permit.purpose.is_some() {
            e.purpose_of_use.clone_from(&permit.purpose);
        }
        Ok(e)
    }

    pub(crate) fn event(&self, t: &Touch<'_>, outcome: Outcome, status: u16, reason: &str) -> Result<AuditEvent, ApiError> {
        Ok(AuditEvent {
            event_id: vault::new_id()?,
            time: self.now,
            request_id: self.request_id.clone(),
            action: t.action.code(),
            interaction: t.interaction,
            outcome,
            status,
            agent_id: self.principal.id.clone(),
            agent_name: self.principal.name.clone(),
            roles: self.principal.roles.clone(),
            source_address: self.source.clone(),
            purpose_of_use: Some(self.purpose().to_string()),
            patient: t.patient.map(str::to_string),
            resource_type: Some(t.resource_type.to_string()),
            resource_id: t.id.map(str::to_string),
            version: t.version,
            // Only a salted commitment of the query enters the entry (it is shown to the patient
            // it names, and a query can name others); the query itself is sealed beside it.
            query: t.query.as_deref().map(crate::audit::salt_query).transpose().map_err(|e| ApiError::internal(e.to_string()))?,
            reason: reason.to_string(),
        })
    }
}

/// Makes entries durable, or fails the request with 503 (fail closed).
pub(crate) async fn audit(app: &App, events: Vec<AuditEvent>) -> Result<(), ApiError> {
    let n = events.len() as u64;
    match app.audit.record(events).await {
        Ok(()) => {
            app.metrics.audit_entries.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            app.metrics.audit_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = %e, "audit append failed; refusing the request");
            // Nothing more can be recorded: do not try again for this request.
            Err(ApiError::unavailable("the audit log cannot record this request, so it is refused").recorded())
        }
    }
}

/// Decides, and on a denial records it and returns 403.
pub(crate) async fn authorize(app: &App, ctx: &Ctx, touch: &Touch<'_>) -> Result<Permit, ApiError> {
    authorize_file(app, ctx, touch, None).await
}

/// As [`authorize`], for a stored file's bytes: the policy also sees its malware-scan status
/// (`context.file_scan`).
pub(crate) async fn authorize_file(app: &App, ctx: &Ctx, touch: &Touch<'_>, file_scan: Option<&str>) -> Result<Permit, ApiError> {
    let subject = app.access.subject(&ctx.principal);
    let d = app.access.decide(&subject, &Question { file_scan, ..ctx.question(touch) });
    enforce(app, ctx, touch, d).await
}

/// Turns a decision into a permit, or records the denial and returns 403. A permit under a
/// break-glass grant raises the alert (log event and metric; the grant waits for review).
pub(crate) async fn enforce(app: &App, ctx: &Ctx, touch: &Touch<'_>, d: Decision) -> Result<Permit, ApiError> {
    if let Some(e) = &d.error {
        tracing::error!(error = %e, "policy evaluation failed; the request is denied");
    }
    if d.permit {
        if d.break_glass {
            app.metrics.break_glass_accesses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(request_id = %ctx.request_id, agent = %ctx.principal.id, grant = d.grant.as_deref().unwrap_or(""), "break-glass access");
        }
        return Ok(Permit { reason: d.reason(), purpose: d.break_glass.then(|| "BTG".to_string()) });
    }
    app.metrics.access_denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let reason = d.reason();
    audit(app, vec![ctx.event(touch, Outcome::Denied, 403, &reason)?]).await?;
    Err(ApiError::forbidden(format!("access denied ({reason})")).recorded())
}

/// Decides a type-level search or history (may the caller see this type for some patient?)
/// and returns a cache deciding each patient's results one by one.
pub(crate) async fn authorize_filtered<'a>(app: &'a App, ctx: &'a Ctx, touch: &Touch<'_>) -> Result<Filter<'a>, ApiError> {
    let subject = app.access.subject(&ctx.principal);
    let d = app.access.may_search(&subject, &ctx.question(touch));
    enforce(app, ctx, touch, d.clone()).await?;
    Ok(Filter { app, ctx, subject, action: touch.action, resource_type: touch.resource_type.to_string(), type_level: d, seen: std::sync::Mutex::new(std::collections::HashMap::new()) })
}

impl<'a> Filter<'a> {
    /// Per-patient decisions for a request already permitted as a whole (an instance's history).
    pub(crate) fn new(app: &'a App, ctx: &'a Ctx, action: Action, resource_type: &str) -> Filter<'a> {
        let subject = app.access.subject(&ctx.principal);
        let type_level = Decision { permit: false, rules: Vec::new(), grant: None, break_glass: false, facts: Default::default(), error: None };
        Filter { app, ctx, subject, action, resource_type: resource_type.to_string(), type_level, seen: std::sync::Mutex::new(std::collections::HashMap::new()) }
    }
}

/// Per-patient decisions for the results of one search or history, each made once.
pub(crate) struct Filter<'a> {
    app: &'a App,
    ctx: &'a Ctx,
    subject: valv_policy::Subject,
    action: Action,
    resource_type: String,
    /// The decision that let the search run (it is the reason recorded for a search that found
    /// nothing the caller may see).
    type_level: Decision,
    seen: std::sync::Mutex<std::collections::HashMap<Option<String>, Decision>>,
}

impl Filter<'_> {
    pub(crate) fn decision(&self, patient: Option<&str>) -> Decision {
        if let Ok(seen) = self.seen.lock() {
            if let Some(d) = seen.get(&patient.map(str::to_string)) {
                return d.clone();
            }
        }
        let q = Question { action: self.action, resource_type: &self.resource_type, patient, now: self.ctx.now, purpose: self.ctx.purpose(), file_scan: None };
        let d = self.app.access.decide(&self.subject, &q);
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(patient.map(str::to_string), d.clone());
        }
        d
    }

    pub(crate) fn visible(&self, patient: Option<&str>) -> bool {
        self.decision(patient).permit
    }

    /// The permit behind the results of one patient (`None` with nothing outside a compartment
    /// shown: the search itself, which found nothing the caller may see).
    pub(crate) fn permit(&self, patient: Option<&str>) -> Permit {
        let d = match self.decision(patient) {
            d if patient.is_none() && !d.permit => self.type_level.clone(),
            d => d,
        };
        if d.break_glass {
            self.app.metrics.break_glass_accesses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(request_id = %self.ctx.request_id, agent = %self.ctx.principal.id, grant = d.grant.as_deref().unwrap_or(""), "break-glass access");
        }
        Permit { reason: d.reason(), purpose: d.break_glass.then(|| "BTG".to_string()) }
    }
}

/// Records a failed act after its attempt was recorded, then passes the error on.
pub(crate) async fn audit_failure(app: &App, ctx: &Ctx, touch: &Touch<'_>, err: ApiError) -> ApiError {
    if err.audited {
        return err;
    }
    let reason = format!("failed: {}", err.code);
    match ctx.event(touch, Outcome::Error, err.status.as_u16(), &reason) {
        Ok(ev) => match audit(app, vec![ev]).await {
            Ok(()) => err.recorded(),
            Err(audit_err) => audit_err,
        },
        Err(e) => e,
    }
}

/// Records a failure that happened before the request reached an interaction's own auditing
/// (unparseable URL or body, unknown type, invalid id), so every attempt leaves an entry.
pub async fn record_unaudited(app: &App, ctx: &Ctx, resource_type: Option<&str>, err: ApiError) -> ApiError {
    let touch = Touch {
        interaction: "request",
        action: Action::Search,
        resource_type: resource_type.unwrap_or(""),
        id: None,
        version: None,
        patient: None,
        query: None,
    };
    audit_failure(app, ctx, &touch, err).await
}

/// Authenticates a FHIR request, recording a failure as an audit entry.
/// The principal of a bearer credential (session token or API key), or why there is none.
async fn bearer_principal(app: &App, authorization: Option<&str>, now: i64) -> Result<Principal, (ApiError, &'static str)> {
    match auth::bearer(authorization) {
        Ok(token) if valv_identity::jwt::looks_like_jwt(token) => app.oidc.authenticate(token, now).await.map_err(|reason| match reason {
            "oidc-provider-unreachable" => (ApiError::unavailable("the identity provider's keys cannot be fetched").retry_after(5), reason),
            _ => (ApiError::unauthorized("the identity provider's token is not accepted (issuer, audience, expiry, signature or second factor)"), reason),
        }),
        Ok(token) if token.starts_with(valv_identity::codes::SESSION_PREFIX) => match app.identity.session(token, now).await {
            Ok(user) => Ok(auth::user_principal(&user)),
            // The session could not be checked: not the caller's fault, and not a verdict on it.
            Err(reason @ "storage") => Err((ApiError::unavailable("sessions cannot be checked right now"), reason)),
            Err(reason) => Err((ApiError::unauthorized("the access token is not valid or the session has ended; sign in again"), reason)),
        },
        Ok(token) => auth::authenticate(&**app.vault.store(), &app.records, token).await,
        Err(e) => Err((e, if authorization.is_some() { "malformed-credential" } else { "no-credential" })),
    }
}

/// Who is calling: the bearer credential when there is one (API key or session token), else the
/// service named by the connection's client certificate.
pub async fn authenticate(app: &App, authorization: Option<&str>, cert: &crate::ClientCert, request_id: &str, source: &str, now: i64) -> Result<Principal, ApiError> {
    let result = match (authorization, cert) {
        (None, crate::ClientCert::Service(s)) => {
            Ok(Principal::basic(auth::PrincipalKind::Service, format!("mtls:{}", s.name), s.name.clone(), vec![s.role.clone()], s.scopes.clone()))
        }
        (None, crate::ClientCert::Unmapped) => Err((ApiError::unauthorized("the client certificate names no configured service"), "certificate-not-mapped")),
        _ => bearer_principal(app, authorization, now).await,
    };
    match result {
        Ok(p) => Ok(p),
        Err((err, reason)) => {
            app.metrics.auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let event = anonymous_event("authenticate", now, request_id, source, err.status, reason)?;
            app.auth_failure_log.record(app, event).await?;
            Err(err)
        }
    }
}

/// The context of an `/admin/…` request: its caller authenticated (a failure audited and
/// answered 401), no purpose of use declared.
pub(crate) async fn admin_ctx(app: &App, req: &hyper::Request<hyper::body::Incoming>, rid: &str, peer: &crate::Peer) -> Result<Ctx, ApiError> {
    let now = app.clock.now_ms();
    let source = peer.source();
    let authz = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let principal = authenticate(app, authz, &peer.cert, rid, &source, now).await?;
    Ok(Ctx { principal, request_id: rid.to_string(), source, now, purpose_of_use: None, return_representation: true, lenient: false })
}

/// The entry of a request refused before anyone was identified (failed authentication, rate
/// limit): no agent, no patient, only where it came from and why.
pub(crate) fn anonymous_event(interaction: &'static str, now: i64, request_id: &str, source: &str, status: StatusCode, reason: &str) -> Result<AuditEvent, ApiError> {
    Ok(AuditEvent {
        event_id: vault::new_id()?,
        time: now,
        request_id: request_id.to_string(),
        action: "E",
        interaction,
        outcome: Outcome::Denied,
        status: status.as_u16(),
        agent_id: String::new(),
        agent_name: String::new(),
        roles: Vec::new(),
        source_address: source.to_string(),
        purpose_of_use: None,
        patient: None,
        resource_type: None,
        resource_id: None,
        version: None,
        query: None,
        reason: reason.to_string(),
    })
}
