//! Valv's HTTPS server. A request is read top to bottom in [`handle`] and [`fhir`]:
//!
//! ```text
//! connection limits, idle watchdog           serve() / http::limits
//! TLS (rustls, 1.3)                          serve()
//!   -> unauthenticated rate limit            handle() / http::limits::gate
//!   -> route and security headers            handle() / dispatch()
//!   -> authenticate (credential -> Principal) request::authenticate
//!   -> parse (URL, headers, body)            parse_interaction()
//!   -> locate / decide / audit / act         fhir::execute (on request::{authorize, audit})
//!   -> respond (FHIR JSON or OperationOutcome)
//! ```
//!
//! Folders by area: `http` (limits, TLS, metrics, query strings), `request` (the shared request
//! context: principal, decisions, durable audit), `fhir` (the FHIR interactions), `audit` (the
//! sink, tree integration, verification and proofs, the log's API, SIEM, compact flood records),
//! `people` (credentials, accounts, sign-in, SSO, `/auth` and `/admin/users`), `access` (the
//! policy's inputs, grants and their API).

pub mod access;
pub mod audit;
pub mod backup;
pub mod clock;
pub mod detect;
pub mod erasure;
pub mod error;
pub mod fhir;
pub mod http;
pub mod keys;
pub mod oversight;
pub mod people;
pub mod request;

use audit::{api as auditapi, compact, log as auditlog};
use http::{body::Body, limits, metrics, query, tls};
use people::{api as authapi, identity, oidc};
use access::grantapi;

use crate::error::ApiError;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use valv_fhir::date;
use valv_store::vault::{Resource, Vault};

/// Everything a request needs, shared by all connections.
pub struct App {
    pub vault: Vault,
    /// MACs over trusted records (API keys).
    pub records: valv_crypto::RecordMac,
    pub audit: Arc<dyn audit::AuditSink>,
    pub metrics: metrics::Metrics,
    /// The public FHIR base URL, e.g. `https://127.0.0.1:8443/fhir`.
    pub base_url: String,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Connections, timeouts, the memory budget for bodies, unauthenticated request rates.
    pub limits: limits::Limits,
    /// The CapabilityStatement, built on first use (it depends only on the start time and URL).
    pub capability: OnceLock<Bytes>,
    /// When the server started (the CapabilityStatement's date).
    pub started: String,
    /// The audit log's signing keys (checkpoints, erasure ledger, backup manifests); replaced
    /// when the integrator adopts a new one ([`App::log_keys`]).
    pub log_keys: std::sync::RwLock<Arc<audit::signing::LogKeys>>,
    /// People: accounts, logins, sessions.
    pub identity: identity::Identity,
    /// What time it is (the system clock; tests may set it).
    pub clock: Arc<dyn clock::Clock>,
    /// Single sign-on providers.
    pub oidc: oidc::Oidc,
    /// Services that authenticate with a client certificate (mutual TLS).
    pub cert_services: Vec<tls::ServiceCert>,
    /// Need-to-know access: policies, care relationships and consents, grants.
    pub access: access::Access,
    /// Failed authentications, one audit entry per source, reason and second…
    pub auth_failure_log: compact::Compactor,
    /// …and rate-limit refusals, per source and ten seconds.
    pub refusal_log: compact::Compactor,
    /// Erasure: the retention duty, the ledger's folders and signing key.
    pub erasure: erasure::ErasureSettings,
    /// Whether a PUT to an unknown id creates the resource with that id (`[fhir] update_create`).
    pub update_create: bool,
    /// Bulk Data export jobs and their (sealed) files.
    pub exports: fhir::Exports,
    /// Where files (Binary content) are stored, and their limits.
    pub files: fhir::binary::Files,
    /// Addresses an incident blocked: refused before routing.
    pub blocked: oversight::blocks::Blocked,
    /// What the configuration says, for the compliance report.
    pub deployment: valv_oversight::compliance::Deployment,
}

impl App {
    /// The audit log's signing keys as they are now.
    pub fn log_keys(&self) -> Arc<audit::signing::LogKeys> {
        match self.log_keys.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Takes in keys with a newer signing key (the integrator adopted it).
    pub fn set_log_keys(&self, keys: audit::signing::LogKeys) {
        let mut slot = match self.log_keys.write() {
            Ok(k) => k,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Arc::new(keys);
    }
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client certificate's standing, decided once per connection.
    pub cert: ClientCert,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    None,
    /// Verified against the client CA and mapped to a configured service.
    Service(tls::ServiceCert),
    /// Verified against the client CA but naming no configured service.
    Unmapped,
}

impl Peer {
    pub fn source(&self) -> String {
        self.addr.ip().to_string()
    }
}

/// A successful answer before it becomes an HTTP response (or a batch entry).
pub struct Reply {
    pub status: StatusCode,
    pub body: Option<Value>,
    /// Type, id, version and last-updated time of the resource concerned (ETag, Last-Modified).
    pub resource: Option<(String, String, u64, i64)>,
    /// Send a Location header (creates and updates).
    pub location: bool,
    /// A body sent as it is, with its content type (plain text, or stored FHIR JSON).
    pub text: Option<(&'static str, Bytes)>,
    /// A Location to redirect to (browser sign-in).
    pub redirect: Option<String>,
    /// A Set-Cookie header (browser sign-in).
    pub set_cookie: Option<String>,
    /// A body streamed as it is produced, with its content type (an export's file, a Binary's
    /// bytes in the type they were uploaded with).
    pub stream: Option<(std::borrow::Cow<'static, str>, Body)>,
    /// Further headers (an asynchronous request's Content-Location, X-Progress, Retry-After).
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: StatusCode, body: Value) -> Self {
        Reply { body: Some(body), ..Self::empty(status) }
    }
    pub fn text(content_type: &'static str, text: String) -> Self {
        Self::text_with_status(StatusCode::OK, content_type, text)
    }
    pub fn text_with_status(status: StatusCode, content_type: &'static str, text: String) -> Self {
        Reply { text: Some((content_type, Bytes::from(text))), ..Self::empty(status) }
    }
    /// 302 to `url`.
    pub fn redirect(url: String) -> Self {
        Reply { redirect: Some(url), ..Self::empty(StatusCode::FOUND) }
    }
    /// A status without a body (204).
    pub fn empty(status: StatusCode) -> Self {
        Reply { status, body: None, resource: None, location: false, text: None, redirect: None, set_cookie: None, stream: None, headers: Vec::new() }
    }
    /// A stored resource's JSON bytes as they are.
    pub fn raw_resource(status: StatusCode, v: &valv_store::StoredVersion, json: Vec<u8>) -> Self {
        Reply {
            resource: Some((v.resource_type.clone(), v.id.clone(), v.version, v.last_updated)),
            text: Some((FHIR_JSON, Bytes::from(json))),
            ..Self::empty(status)
        }
    }
    /// FHIR JSON already serialised (a searchset carrying stored resources as they are).
    pub fn raw_json(status: StatusCode, json: Vec<u8>) -> Self {
        Reply { text: Some((FHIR_JSON, Bytes::from(json))), ..Self::empty(status) }
    }
    pub fn resource(status: StatusCode, r: Resource) -> Self {
        Reply { body: r.body, resource: Some((r.resource_type, r.id, r.version, r.last_updated)), ..Self::empty(status) }
    }

    /// This reply as a batch-response entry.
    pub fn into_entry(self, base: &str) -> Value {
        let mut response = json!({"status": format!("{} {}", self.status.as_u16(), self.status.canonical_reason().unwrap_or(""))});
        if let Some((t, id, v, lu)) = &self.resource {
            response["etag"] = json!(format!("W/\"{v}\""));
            response["lastModified"] = json!(date::format_instant(*lu));
            if self.location {
                response["location"] = json!(format!("{base}/{t}/{id}/_history/{v}"));
            }
        }
        let mut e = json!({"response": response});
        if let Some(b) = self.body {
            e["resource"] = b;
        } else if let Some((FHIR_JSON, raw)) = &self.text {
            e["resource"] = serde_json::from_slice(raw).unwrap_or(Value::Null);
        }
        e
    }

    /// The HTTP response; `pretty` (`_pretty=true`) indents a JSON body, numbers and member order
    /// unchanged.
    fn into_response(self, base: &str, pretty: bool) -> Response<Body> {
        let mut builder = Response::builder().status(self.status);
        // Room for every header an answer gets (its own, the security headers, the request id):
        // grown one insert at a time, the map was rebuilt three times per response.
        if let Some(h) = builder.headers_mut() {
            h.reserve(RESPONSE_HEADERS);
        }
        if let Some(url) = &self.redirect {
            builder = builder.header(header::LOCATION, url);
        }
        if let Some(cookie) = &self.set_cookie {
            builder = builder.header(header::SET_COOKIE, cookie);
        }
        if let Some((t, id, v, lu)) = &self.resource {
            builder = builder.header(header::ETAG, format!("W/\"{v}\"")).header(header::LAST_MODIFIED, http_date(*lu));
            if self.location {
                builder = builder.header(header::LOCATION, format!("{base}/{t}/{id}/_history/{v}"));
            }
        }
        for (name, value) in &self.headers {
            builder = builder.header(*name, value);
        }
        if let Some((ct, body)) = self.stream {
            return builder.header(header::CONTENT_TYPE, &*ct).body(body).unwrap_or_default();
        }
        let (ct, bytes) = match (self.text, self.body) {
            (Some((ct, bytes)), _) => (ct, bytes),
            (None, Some(body)) => (FHIR_JSON, Bytes::from(serde_json::to_vec(&body).unwrap_or_default())),
            (None, None) => return builder.body(Body::empty()).unwrap_or_default(),
        };
        let bytes = match pretty && ct == FHIR_JSON {
            true => serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| serde_json::to_vec_pretty(&v).ok()).map_or(bytes, Bytes::from),
            false => bytes,
        };
        builder.header(header::CONTENT_TYPE, ct).body(Body::full(bytes)).unwrap_or_default()
    }
}

const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// RFC 9110 IMF-fixdate, for Last-Modified.
pub fn http_date(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let (y, m, d) = date::civil_from_days(days);
    let sod = secs.rem_euclid(86_400);
    const WD: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MO: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        WD[(days + 4).rem_euclid(7) as usize],
        MO[(m as usize).saturating_sub(1) % 12],
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

fn error_response(e: &ApiError) -> Response<Body> {
    let body = serde_json::to_vec(&e.outcome()).unwrap_or_default();
    let mut r = Response::builder().status(e.status).header(header::CONTENT_TYPE, FHIR_JSON);
    if e.status == StatusCode::UNAUTHORIZED {
        r = r.header(header::WWW_AUTHENTICATE, "Bearer realm=\"valv\"");
    }
    if let Some(seconds) = e.retry_after {
        r = r.header(header::RETRY_AFTER, seconds.to_string());
    }
    if let Some(length) = e.range_of {
        r = r.header(header::CONTENT_RANGE, format!("bytes */{length}"));
    }
    r.body(Body::full(Bytes::from(body))).unwrap_or_default()
}

/// Headers an answer usually carries, made room for at once.
const RESPONSE_HEADERS: usize = 20;

fn security_headers(h: &mut HeaderMap) {
    // Names as constants (not parsed per response) and room made once: on every answer.
    const HEADERS: [(header::HeaderName, &str); 7] = [
        (header::STRICT_TRANSPORT_SECURITY, "max-age=63072000; includeSubDomains"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "default-src 'none'; frame-ancestors 'none'"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::HeaderName::from_static("cross-origin-resource-policy"), "same-origin"),
    ];
    for (name, value) in HEADERS {
        h.insert(name, HeaderValue::from_static(value));
    }
}

fn request_id() -> String {
    valv_crypto::hex::encode(&valv_store::vault::id_bytes::<12>())
}

/// One request, start to finish: route, run, add headers, count, log.
pub async fn handle(app: Arc<App>, req: Request<Incoming>, peer: &Peer) -> Response<Body> {
    let started = Instant::now();
    let rid = request_id();
    let method = req.method().clone();
    let version = req.version();
    let pretty = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "_pretty=true"));
    // Everything but the liveness probe: sign-in included, the usual target of a blocked source.
    let blocked_by = (req.uri().path() != "/healthz").then(|| app.blocked.incident(peer.addr.ip())).flatten();
    let (route, result) = match throttle(&app, &req, peer) {
        _ if blocked_by.is_some() => ("blocked", Err(blocked(&app, &rid, peer, blocked_by.as_deref().unwrap_or_default()).await)),
        Ok(charge_on_401) => {
            let (route, result) = dispatch(&app, req, &rid, peer).await;
            if charge_on_401 && result.as_ref().is_err_and(|e| e.status == StatusCode::UNAUTHORIZED) {
                // A credential that failed costs a token; the next ones are refused unchecked.
                let _ = app.limits.take_unauthenticated(peer.addr.ip());
            }
            (route, result)
        }
        Err((wait, first)) => ("rate_limited", Err(rate_limited(&app, &rid, peer, wait, first).await)),
    };
    let mut resp = match result {
        Ok(r) => r.into_response(&app.base_url, pretty),
        Err(e) => error_response(&e),
    };
    if method == Method::HEAD {
        // Headers only: a body on a HEAD response is a protocol error in HTTP/2.
        *resp.body_mut() = Body::empty();
    }
    security_headers(resp.headers_mut());
    if route == "files_ticket" {
        // A ticket is for viewers on other origins (an <img> in a PACS viewer).
        resp.headers_mut().insert("cross-origin-resource-policy", HeaderValue::from_static("cross-origin"));
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    // A body refused part-way (too slow, too large) leaves the rest of it on an HTTP/1.1
    // connection: close it rather than read on (HTTP/2 resets just the stream). A rate-limited
    // source loses its connection too (`Activity::ask_to_close`; HTTP/2 gets a GOAWAY).
    if version < hyper::Version::HTTP_2 && matches!(resp.status(), StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS) {
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let status = resp.status().as_u16();
    app.metrics.observe(route, status, started.elapsed());
    // Route names and status only: paths and queries can carry patient data.
    tracing::info!(request_id = %rid, method = %method, route, status, micros = started.elapsed().as_micros() as u64, "request");
    resp
}

/// The per-address limit on requests without a valid credential (see [`limits::Gate`]):
/// `Ok(true)` when a 401 should take a token afterwards, `Err((seconds, first refusal))`.
fn throttle(app: &App, req: &Request<Incoming>, peer: &Peer) -> Result<bool, (u64, bool)> {
    let ip = peer.addr.ip();
    match limits::gate(req.uri().path()) {
        limits::Gate::Exempt => Ok(false),
        limits::Gate::Public => app.limits.take_unauthenticated(ip).map(|()| false),
        limits::Gate::Credentialed => {
            let credential = req.headers().contains_key(header::AUTHORIZATION) || peer.cert != ClientCert::None;
            if credential {
                app.limits.check_unauthenticated(ip).map(|()| true)
            } else {
                app.limits.take_unauthenticated(ip).map(|()| false)
            }
        }
    }
}

/// 403 for an address an incident blocked; audited like rate-limit refusals (one entry per
/// source and ten seconds), so a blocked flood cannot flood the log.
async fn blocked(app: &App, rid: &str, peer: &Peer, incident: &str) -> ApiError {
    let refusal = ApiError::forbidden(format!("requests from this address are blocked (incident {incident})"));
    let event = match crate::request::anonymous_event("blocked", app.clock.now_ms(), rid, &peer.source(), StatusCode::FORBIDDEN, &format!("address-blocked-by-incident {incident}")) {
        Ok(e) => e,
        Err(e) => return e,
    };
    match app.refusal_log.record(app, event).await {
        Ok(()) => refusal.recorded(),
        Err(e) => e,
    }
}

/// 429 for a source over its limit; the first refusal of a burst is audited, and those of one
/// source share an entry per ten seconds (`compact`), so the refusals cannot flood the audit log.
async fn rate_limited(app: &App, rid: &str, peer: &Peer, wait: u64, first: bool) -> ApiError {
    let refusal = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", format!("too many requests without a valid credential from this address; retry in {wait} s")).retry_after(wait);
    if !first {
        return refusal;
    }
    if app.limits.may_log() {
        tracing::warn!(source = %peer.source(), "unauthenticated requests over the per-address limit; refusing with 429");
    }
    let event = match crate::request::anonymous_event("rate-limit", app.clock.now_ms(), rid, &peer.source(), StatusCode::TOO_MANY_REQUESTS, "too-many-unauthenticated-requests-from-address") {
        Ok(e) => e,
        Err(e) => return e,
    };
    match app.refusal_log.record(app, event).await {
        Ok(()) => refusal.recorded(),
        Err(e) => e,
    }
}

async fn dispatch(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> (&'static str, Result<Reply, ApiError>) {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/healthz" => ("healthz", only_get(&req).map(|()| Reply::text("text/plain; charset=utf-8", "ok\n".into()))),
        "/readyz" => ("readyz", match only_get(&req) {
            Ok(()) => readiness(app).await,
            Err(e) => Err(e),
        }),
        "/audit/checkpoint" => ("audit_checkpoint", match only_get(&req) {
            Ok(()) => latest_checkpoint(app).await,
            Err(e) => Err(e),
        }),
        "/audit/proof/inclusion" => ("audit_proof", proof_route(app, &req, true).await),
        "/audit/proof/consistency" => ("audit_proof", proof_route(app, &req, false).await),
        "/audit/key" => ("audit_key", only_get(&req).map(|()| Reply::text("text/plain; charset=utf-8", format!("{}\n", app.log_keys().current_vkey())))),
        "/audit/keys" => ("audit_key", only_get(&req).map(|()| Reply::text("text/plain; charset=utf-8", app.log_keys().vkeys().iter().map(|k| format!("{k}\n")).collect::<String>()))),
        "/metrics" => ("metrics", only_get(&req).map(|()| Reply::text("text/plain; version=0.0.4; charset=utf-8", app.metrics.render() + &app.limits.render()))),
        p if p.starts_with("/auth/") => authapi::auth_route(app, req, rid, peer).await,
        p if p.starts_with("/admin/break-glass") || p.starts_with("/admin/support-grants") => ("admin_grants", grantapi::admin_route(app, req, rid, peer).await),
        p if p == "/admin/users" || p.starts_with("/admin/users/") => ("admin_users", authapi::admin_route(app, req, rid, peer).await),
        p if p == "/admin/erasures" || p.starts_with("/admin/erasures/") => ("admin_erasures", erasure::admin_route(app, req, rid, peer).await),
        p if p == "/admin/alerts" || p.starts_with("/admin/alerts/") => ("admin_alerts", detect::api::admin_route(app, req, rid, peer).await),
        p if p == "/admin/reviews" || p.starts_with("/admin/reviews/") => ("admin_reviews", oversight::reviews::admin_route(app, req, rid, peer).await),
        "/admin/compliance" => ("admin_compliance", oversight::compliance::admin_route(app, req, rid, peer).await),
        p if p == "/admin/incidents" || p.starts_with("/admin/incidents/") => ("admin_incidents", oversight::incidents::admin_route(app, req, rid, peer).await),
        "/fhir/metadata" => ("fhir_metadata", only_get(&req).map(|()| capability(app))),
        p if p == "/fhir" || p.starts_with("/fhir/") => fhir_route(app, req, rid, peer).await,
        p if p.starts_with("/audit/entries/") => ("audit_entry", audit_entry_route(app, req, rid, peer).await),
        p if p.starts_with("/files/") => ("files_ticket", fhir::ticket::route(app, req, rid, peer).await),
        _ => ("unknown", Err(ApiError::not_found("no such endpoint; the FHIR API is under /fhir"))),
    }
}

/// The CapabilityStatement, serialised once: building it walks every resource type and search
/// parameter (milliseconds of CPU), and it cannot change while the server runs.
fn capability(app: &App) -> Reply {
    let bytes = app.capability.get_or_init(|| {
        let statement = valv_fhir::capability::capability_statement(env!("CARGO_PKG_VERSION"), &app.started, &app.base_url, app.update_create);
        Bytes::from(serde_json::to_vec(&statement).unwrap_or_default())
    });
    Reply { text: Some((FHIR_JSON, bytes.clone())), ..Reply::empty(StatusCode::OK) }
}

/// Ready when storage answers and the audit log has not failed in the last ten seconds (a
/// server that cannot audit refuses every FHIR request, so it should not receive them).
async fn readiness(app: &App) -> Result<Reply, ApiError> {
    app.vault.store().ping().await.map_err(|_| ApiError::unavailable("storage is not ready"))?;
    if app.audit.failed_within(now_ms(), 10_000) {
        return Err(ApiError::unavailable("the audit log failed recently"));
    }
    Ok(Reply::text("text/plain; charset=utf-8", "ready\n".into()))
}

/// `GET /audit/proof/inclusion?index=I&size=N` (JSON, or a C2SP tlog-proof receipt with
/// `Accept: text/plain`) and `GET /audit/proof/consistency?from=M&to=N` (JSON).
async fn proof_route(app: &App, req: &Request<Incoming>, inclusion: bool) -> Result<Reply, ApiError> {
    use base64::Engine as _;
    only_get(req)?;
    let pairs = query::parse(req.uri().query().unwrap_or("")).map_err(ApiError::bad_request)?;
    let number = |name: &str| -> Result<u64, ApiError> {
        let v = pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).ok_or_else(|| ApiError::bad_request(format!("'{name}' is required")))?;
        v.parse().map_err(|_| ApiError::bad_request(format!("'{name}' must be a non-negative integer, got '{v}'")))
    };
    let store = &**app.vault.store();
    let b64 = |hs: Vec<[u8; 32]>| hs.iter().map(|h| base64::engine::general_purpose::STANDARD.encode(h)).collect::<Vec<_>>();
    let invalid = |e: auditlog::ProofError| match e {
        auditlog::ProofError::Invalid(m) => ApiError::bad_request(m),
        auditlog::ProofError::Store(s) => s.into(),
    };
    if inclusion {
        let (index, size) = (number("index")?, number("size")?);
        let wants_text = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/plain"));
        if wants_text {
            let text = auditlog::receipt(store, index, size).await.map_err(invalid)?;
            return Ok(Reply::text("text/plain; charset=utf-8", text));
        }
        let proof = auditlog::inclusion(store, index, size).await.map_err(invalid)?;
        Ok(Reply::json(StatusCode::OK, json!({"index": index, "tree_size": size, "proof": b64(proof)})))
    } else {
        let (from, to) = (number("from")?, number("to")?);
        let proof = auditlog::consistency(store, from, to).await.map_err(invalid)?;
        Ok(Reply::json(StatusCode::OK, json!({"from": from, "to": to, "proof": b64(proof)})))
    }
}

/// The latest signed checkpoint (C2SP tlog-checkpoint): public, like the log's key.
async fn latest_checkpoint(app: &App) -> Result<Reply, ApiError> {
    match app.vault.store().latest_checkpoint().await? {
        Some(cp) => Ok(Reply::text("text/plain; charset=utf-8", cp.note)),
        None => Err(ApiError::unavailable("no checkpoint has been signed yet")),
    }
}

pub(crate) fn only_get(req: &Request<Incoming>) -> Result<(), ApiError> {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(format!("{} is not allowed here; use GET", req.method())))
    }
}

async fn fhir_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> (&'static str, Result<Reply, ApiError>) {
    let now = app.clock.now_ms();
    let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let source = peer.source();
    let principal = match crate::request::authenticate(app, authz.as_deref(), &peer.cert, rid, &source, now).await {
        Ok(p) => p,
        Err(e) => return ("fhir_unauthenticated", Err(e)),
    };
    let prefer = req.headers().get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("");
    let return_representation = !prefer.contains("return=minimal");
    let lenient = prefer.contains("handling=lenient");
    let declared = req.headers().get("x-purpose-of-use").map(|v| v.to_str().unwrap_or("").trim().to_string());
    let known = declared.as_deref().is_none_or(valv_policy::purpose::is_known);
    let purpose_of_use = declared.filter(|_| known);
    let ctx = crate::request::Ctx { principal, request_id: rid.to_string(), source, now, purpose_of_use, return_representation, lenient };
    let url_type = req.uri().path().split('/').nth(2).filter(|t| valv_fhir::r4::is_resource_type(t)).map(str::to_string);
    if !known {
        let e = ApiError::bad_request("X-Purpose-Of-Use must be an HL7 PurposeOfUse code such as TREAT, ETREAT, HPAYMT, HOPERAT or PATRQT");
        return ("fhir_invalid", Err(crate::request::record_unaudited(app, &ctx, url_type.as_deref(), e).await));
    }
    if let Some(file) = fhir::binary::file_request(&req) {
        let (route, result) = match file {
            fhir::binary::FileRequest::Upload => ("fhir_binary_upload", fhir::binary::upload(app, &ctx, req).await),
            fhir::binary::FileRequest::Download { id, version } => {
                let head = req.method() == Method::HEAD;
                ("fhir_binary_download", fhir::binary::download(app, &ctx, &id, version, req.headers(), head, None).await)
            }
            fhir::binary::FileRequest::Ticket { id } => {
                let pairs = query::parse(req.uri().query().unwrap_or("")).map_err(ApiError::bad_request);
                ("fhir_binary_ticket", match pairs {
                    Ok(p) => fhir::ticket::issue(app, &ctx, &id, &p).await,
                    Err(e) => Err(e),
                })
            }
            fhir::binary::FileRequest::RevokeTickets { id } => ("fhir_binary_ticket", fhir::ticket::revoke_mine(app, &ctx, &id).await),
            fhir::binary::FileRequest::UploadStart => ("fhir_binary_upload", fhir::resumable::start(app, &ctx, req).await),
            fhir::binary::FileRequest::UploadAppend { session } => ("fhir_binary_upload", fhir::resumable::append(app, &ctx, &session, req).await),
            fhir::binary::FileRequest::UploadStatus { session } => ("fhir_binary_upload", fhir::resumable::status(app, &ctx, &session).await),
            fhir::binary::FileRequest::UploadAbort { session } => ("fhir_binary_upload", fhir::resumable::abort(app, &ctx, &session).await),
        };
        return match result {
            Ok(reply) => (route, Ok(reply)),
            Err(e) => (route, Err(crate::request::record_unaudited(app, &ctx, Some("Binary"), e).await)),
        };
    }
    if let Err(e) = check_accept(req.headers()) {
        return ("fhir_invalid", Err(crate::request::record_unaudited(app, &ctx, url_type.as_deref(), e).await));
    }
    // The body's share of the memory budget is held until the request is answered.
    let (interaction, _body_memory) = match parse_interaction(app, req).await {
        Ok(i) => i,
        Err(e) => return ("fhir_invalid", Err(crate::request::record_unaudited(app, &ctx, url_type.as_deref(), e).await)),
    };
    let route = interaction.route();
    let resource_type = interaction.resource_type().to_string();
    match fhir::execute(app, &ctx, interaction).await {
        Ok(reply) => (route, Ok(reply)),
        Err(e) => (route, Err(crate::request::record_unaudited(app, &ctx, Some(&resource_type), e).await)),
    }
}

/// `GET /audit/entries/{index}`: one entry's canonical bytes, for auditors.
async fn audit_entry_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    only_get(&req)?;
    let now = app.clock.now_ms();
    let authz = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let source = peer.source();
    let principal = crate::request::authenticate(app, authz.as_deref(), &peer.cert, rid, &source, now).await?;
    let ctx = crate::request::Ctx { principal, request_id: rid.to_string(), source, now, purpose_of_use: None, return_representation: true, lenient: false };
    let index = req.uri().path().trim_start_matches("/audit/entries/").to_string();
    match auditapi::entry(app, &ctx, &index).await {
        Ok(r) => Ok(r),
        Err(e) => Err(crate::request::record_unaudited(app, &ctx, Some("AuditEvent"), e).await),
    }
}

fn check_accept(h: &HeaderMap) -> Result<(), ApiError> {
    match h.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        Some(a) if !(a.contains("json") || a.contains("*/*") || a.contains("application/*")) => Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            format!("cannot answer in '{a}': Valv speaks application/fhir+json"),
        )),
        _ => Ok(()),
    }
}

/// URL, headers and body -> an interaction. Reads the body only for POST and PUT, bounded; the
/// reservation holds the body's (estimated) memory in the budget while it lives.
async fn parse_interaction(app: &App, req: Request<Incoming>) -> Result<(fhir::Interaction, Option<limits::Reservation>), ApiError> {
    use fhir::Interaction as I;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let pairs = query::parse(req.uri().query().unwrap_or("")).map_err(ApiError::bad_request)?;
    let if_match = match req.headers().get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        Some(tag) => Some(valv_fhir::bundle::parse_etag(tag).ok_or_else(|| ApiError::bad_request(format!("If-Match '{tag}' is not a version ETag such as W/\"1\"")))?),
        None => None,
    };
    // Conditional create: the search parameters, bare or (as some clients send them) after a
    // relative URL's '?'.
    let if_none_exist = match req.headers().get("if-none-exist") {
        None => None,
        Some(v) => {
            let text = v.to_str().map_err(|_| ApiError::bad_request("If-None-Exist must be search parameters in visible ASCII"))?;
            let text = text.split_once('?').map_or(text, |(_, q)| q);
            Some(query::parse(text).map_err(ApiError::bad_request)?)
        }
    };
    let conditional_create = if_none_exist.is_some();
    let prefer = req.headers().get("prefer").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let segs: Vec<String> = path["/fhir".len()..].split('/').filter(|s| !s.is_empty()).map(str::to_string).collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    // `POST [type]/_search`: the parameters in a form body, added to any in the URL.
    if method == Method::POST && segs.len() == 2 && segs[1] == "_search" {
        if conditional_create {
            return Err(ApiError::bad_request("If-None-Exist applies only to a create (POST /fhir/{type}); nothing was done"));
        }
        let resource_type = segs[0].to_string();
        let (form, reservation) = read_body_bytes(app, req, &["application/x-www-form-urlencoded"]).await?;
        let text = std::str::from_utf8(&form).map_err(|_| ApiError::bad_request("the form body is not UTF-8"))?;
        let mut pairs = pairs;
        pairs.extend(query::parse(text.trim()).map_err(ApiError::bad_request)?);
        return Ok((fhir::Interaction::Search { resource_type, pairs }, Some(reservation)));
    }
    let (body, reservation, patch_kind) = if method == Method::POST || method == Method::PUT {
        let (body, reservation) = read_json_body_reserved(app, req).await?;
        (Some(body), Some(reservation), None)
    } else if method == Method::PATCH {
        let media = media_type(&req);
        let (body, reservation) = read_body_json(app, req, PATCH_MEDIA).await?;
        let kind = fhir::PatchKind::of(&media, &body)?;
        (Some(body), Some(reservation), Some(kind))
    } else {
        (None, None, None)
    };
    let not_allowed = |allowed: &str| ApiError::method_not_allowed(format!("{method} is not allowed on {path}; allowed: {allowed}"));
    let t = |s: &str| s.to_string();
    let respond_async = prefer.contains("respond-async");
    let interaction = match (segs.as_slice(), body) {
        (["$export"] | ["Patient", "$export"] | ["Group", _, "$export"], body) if method == Method::GET || method == Method::POST => {
            let level = match segs.as_slice() {
                ["Group", id, _] => fhir::ExportLevel::Group(t(id)),
                ["Patient", _] => fhir::ExportLevel::Patient,
                _ => fhir::ExportLevel::System,
            };
            let mut pairs = pairs;
            if let Some(b) = &body {
                pairs.extend(fhir::export_pairs(b)?);
            }
            I::Export { level, pairs, respond_async }
        }
        (["$export-status", job], None) if method == Method::GET => I::ExportStatus { job: t(job) },
        (["$export-status", job], None) if method == Method::DELETE => I::ExportCancel { job: t(job) },
        (["$export-status", _], _) => return Err(not_allowed("GET (status), DELETE (cancel)")),
        (["$export-file", job, n], None) if method == Method::GET => I::ExportFile { job: t(job), n: t(n) },
        ([], Some(body)) if method == Method::POST => I::Bundle { body },
        ([], _) => return Err(not_allowed("POST (transaction or batch Bundle)")),
        ([rt], None) if method == Method::GET => I::Search { resource_type: t(rt), pairs },
        ([rt], Some(body)) if method == Method::POST => {
            // Search parameters in a create's URL are its condition, as If-None-Exist (what
            // fhirpy's get_or_create sends): never ignored, which would make a duplicate.
            let criteria: Vec<(String, String)> = pairs.into_iter().filter(|(k, _)| k != "_format" && k != "_pretty").collect();
            let if_none_exist = match (if_none_exist, criteria.is_empty()) {
                (header, true) => header,
                (None, false) => Some(criteria),
                (Some(_), false) => return Err(ApiError::bad_request("a create takes its condition from If-None-Exist or from the URL, not both")),
            };
            I::Create { resource_type: t(rt), body, if_none_exist }
        }
        ([rt], Some(body)) if method == Method::PUT && !pairs.is_empty() => I::ConditionalUpdate { resource_type: t(rt), pairs, body, if_match },
        ([rt], None) if method == Method::DELETE && !pairs.is_empty() => I::ConditionalDelete { resource_type: t(rt), pairs },
        ([_], _) => return Err(not_allowed("GET (search), POST (create), PUT and DELETE with search criteria (conditional update and delete)")),
        ([rt, "_history"], None) if method == Method::GET => I::HistoryType { resource_type: t(rt), pairs },
        ([rt, id], None) if method == Method::GET => I::Read { resource_type: t(rt), id: t(id) },
        ([rt, id], Some(body)) if method == Method::PUT => I::Update { resource_type: t(rt), id: t(id), body, if_match },
        ([rt, id], None) if method == Method::DELETE => I::Delete { resource_type: t(rt), id: t(id), if_match },
        ([rt, id], Some(patch)) if method == Method::PATCH => match patch_kind {
            Some(kind) => I::Patch { resource_type: t(rt), id: t(id), patch, kind, if_match },
            None => return Err(ApiError::internal("a PATCH body without its kind")),
        },
        ([_, _], _) => return Err(not_allowed("GET (read), PUT (update), PATCH, DELETE")),
        ([rt, id, "_history"], None) if method == Method::GET => I::HistoryInstance { resource_type: t(rt), id: t(id), pairs },
        (["Patient", id, "$access-log"], None) if method == Method::GET => I::AccessLog { id: t(id), pairs },
        (["Patient", id, "$everything"], None) if method == Method::GET => I::Everything { id: t(id), pairs },
        (["Patient", id, "$break-glass"], Some(body)) if method == Method::POST => I::BreakGlass { id: t(id), body },
        (["Patient", id, "$export-record"], Some(body)) if method == Method::POST => I::ExportRecord { id: t(id), body },
        ([rt, id, "_history", v], None) if method == Method::GET => {
            let version = v.parse().map_err(|_| ApiError::not_found(format!("'{v}' is not a version of {rt}/{id}")))?;
            I::VRead { resource_type: t(rt), id: t(id), version }
        }
        ([_, _, "_history", ..], _) => return Err(not_allowed("GET")),
        _ => return Err(ApiError::not_found(format!("no FHIR interaction at {path}"))),
    };
    // A client relying on If-None-Exist not to make a duplicate is never silently ignored.
    if conditional_create && !matches!(interaction, I::Create { .. }) {
        return Err(ApiError::bad_request("If-None-Exist applies only to a create (POST /fhir/{type}); nothing was done"));
    }
    Ok((interaction, reservation))
}

/// A JSON object from the request body, within the path's size limit (see [`limits::body_limit`]),
/// the body timeouts and the memory budget. For small bodies (`/auth/*`, `/admin/*`), whose
/// memory is given back as soon as the value is returned.
pub(crate) async fn read_json_body(app: &App, req: Request<Incoming>) -> Result<Value, ApiError> {
    read_json_body_reserved(app, req).await.map(|(value, _)| value)
}

/// [`read_json_body`], with the reservation that covers the parsed value: keep it while the
/// value lives. Nothing is parsed until the whole body is in, and the parse is paid for from the
/// budget first (at [`limits::json_tree_estimate`]), so no body can make a tree the budget has
/// not allowed for.
pub(crate) async fn read_json_body_reserved(app: &App, req: Request<Incoming>) -> Result<(Value, limits::Reservation), ApiError> {
    let (value, reservation) = read_body_json(app, req, &["application/fhir+json", "application/json"]).await?;
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "structure", "the body must be a JSON object (a FHIR resource)"));
    }
    Ok((value, reservation))
}

/// The media types a PATCH body may have: JSON Patch, JSON Merge Patch, or FHIR JSON (a JSON
/// Patch array, a merge-patch object, or — not yet supported — a FHIRPath Patch Parameters).
const PATCH_MEDIA: &[&str] = &["application/json-patch+json", "application/merge-patch+json", "application/fhir+json", "application/json"];

/// The request's media type, lower case, without parameters.
fn media_type(req: &Request<Incoming>) -> String {
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Any JSON value from the request body, if its media type is one of `media`, within the
/// limits of [`read_json_body_reserved`].
async fn read_body_json(app: &App, req: Request<Incoming>, media: &[&str]) -> Result<(Value, limits::Reservation), ApiError> {
    let (buf, mut reservation) = read_body_bytes(app, req, media).await?;
    let limits = &app.limits;
    let tree = limits::json_tree_estimate(&buf);
    limits.grow(&mut reservation, tree)?;
    let value: Value = serde_json::from_slice(&buf).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "structure", format!("malformed JSON: {e}")))?;
    drop(buf);
    reservation.shrink_to(tree);
    Ok((value, reservation))
}

/// The request body's bytes, if its media type is one of `media`: within the path's size limit
/// (see [`limits::body_limit`]), the body timeouts and the memory budget.
async fn read_body_bytes(app: &App, req: Request<Incoming>, media: &[&str]) -> Result<(Vec<u8>, limits::Reservation), ApiError> {
    if !media.contains(&media_type(&req).as_str()) {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            format!("Content-Type '{ct}' is not supported here: send {}", media.join(" or ")),
        ));
    }
    let limits = &app.limits;
    let limit = limits::body_limit(&limits.settings, req.uri().path());
    let too_large = || {
        limits.counters.bodies_too_large.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-costly", format!("the body exceeds this endpoint's limit of {limit} bytes"))
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // A declared length is reserved (and allocated) at once: a body that cannot fit is refused
    // before a byte of it is read.
    let mut reservation = limits.reserve(declared.unwrap_or(0))?;
    let mut buf: Vec<u8> = Vec::with_capacity(declared.unwrap_or(0));
    let mut body = req.into_body();
    let start = tokio::time::Instant::now();
    loop {
        let deadline = limits.body_deadline(start, buf.len());
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = tokio::time::sleep_until(deadline) => {
                limits.counters.bodies_timed_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", format!(
                    "the request body arrived too slowly ({} bytes in {} s): it must arrive at {} bytes/s after the first {} s and complete within {} s",
                    buf.len(), start.elapsed().as_secs(), limits.settings.body_min_bytes_per_sec, limits.settings.body_grace.as_secs(), limits.settings.body_timeout.as_secs())));
            }
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|_| ApiError::bad_request("the request body could not be read"))?.into_data() else { continue };
        let need = buf.len() + data.len();
        if need > limit {
            return Err(too_large());
        }
        if need > buf.capacity() {
            // Grow as Vec would (doubling), but through the budget, so it counts what is allocated.
            let cap = need.max(buf.capacity().saturating_mul(2)).min(limit).max(need);
            let more = cap.saturating_sub(reservation.bytes());
            limits.grow(&mut reservation, more)?;
            buf.reserve_exact(cap - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok((buf, reservation))
}

/// Accepts connections until `shutdown` resolves: at most `max_connections` in all and
/// `max_connections_per_address` per source (others are closed at once), TLS handshake bounded in
/// time, then HTTP/1.1 or HTTP/2 as negotiated; a connection idle for `idle_timeout` is closed.
///
/// When `shutdown` resolves the server drains: it stops accepting (the listener is closed), tells
/// every connection to finish what is in flight and close (HTTP/1.1 after the current response,
/// HTTP/2 with GOAWAY), and returns once all have closed or `shutdown_grace` has passed, so that
/// no request already being handled goes unanswered (a commit a client never hears of is one it
/// retries: a duplicate).
pub async fn serve(app: Arc<App>, listener: TcpListener, tls: Arc<rustls::ServerConfig>, shutdown: impl Future<Output = ()>) {
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(fhir::run_exports(app.clone()));
    tokio::spawn(fhir::scan::run(app.clone()));
    tokio::spawn(fhir::resumable::sweep(app.clone()));
    accept_until(app.clone(), listener, tls, shutdown, drain_rx).await;
    let open = app.limits.open_connections();
    tracing::info!(open, grace_secs = app.limits.settings.shutdown_grace.as_secs(), "shutting down: no new connections; finishing requests in flight");
    let _ = drain_tx.send(true);
    let deadline = tokio::time::Instant::now() + app.limits.settings.shutdown_grace;
    while app.limits.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if app.limits.open_connections() > 0 {
        tracing::warn!(open = app.limits.open_connections(), "shutdown grace over; closing the connections still open");
    }
}

/// On shutdown, how long a connection that has not begun a request may take to begin one.
const FIRST_REQUEST_ON_SHUTDOWN: Duration = Duration::from_secs(1);

/// The accept loop of [`serve`]; returns (dropping the listener) when `shutdown` resolves.
async fn accept_until(app: Arc<App>, listener: TcpListener, tls: Arc<rustls::ServerConfig>, shutdown: impl Future<Output = ()>, drain: tokio::sync::watch::Receiver<bool>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let builder = Arc::new(http_builder(&app.limits.settings));
    tokio::pin!(shutdown);
    // Accept errors (out of file descriptors, of memory) persist until connections close: retry
    // after a pause that doubles from 10 ms to 1 s instead of spinning on the error.
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                app.limits.counters.accept_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if app.limits.may_log() {
                    tracing::error!(error = %e, pause_ms = backoff.as_millis() as u64, open = app.limits.open_connections(), "cannot accept connections; pausing");
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let Some(permit) = app.limits.admit_connection(addr.ip()) else {
            // Closed with a reset: no handshake, nothing queued, no TIME_WAIT kept here; held a
            // few seconds first while the tarpit has room, so that a client reconnecting at once
            // waits instead of making the server accept and reset at its pace.
            let _ = tcp.set_zero_linger();
            if let Some(slot) = app.limits.tarpit_slot() {
                let hold = app.limits.settings.tarpit;
                tokio::spawn(async move {
                    let _slot = slot;
                    tokio::time::sleep(hold).await;
                    drop(tcp);
                });
            }
            app.limits.counters.connections_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if app.limits.may_log() {
                tracing::warn!(source = %addr.ip(), open = app.limits.open_connections(), "connection refused: too many open connections (in all or from this source)");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, builder, mut drain) = (app.clone(), acceptor.clone(), builder.clone(), drain.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(app.limits.settings.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                _ => {
                    app.limits.counters.handshake_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            };
            let cert = match stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                None => ClientCert::None,
                Some(c) => tls::service_for(c, &app.cert_services).map_or(ClientCert::Unmapped, ClientCert::Service),
            };
            let peer = Arc::new(Peer { addr, cert });
            let activity = Arc::new(limits::Activity::default());
            let svc = {
                let (app, activity) = (app.clone(), activity.clone());
                hyper::service::service_fn(move |req| {
                    let (app, peer, in_flight) = (app.clone(), peer.clone(), activity.begin());
                    async move {
                        let resp = handle(app, req, &peer).await;
                        // Asked once the refusal has been handed to the connection (its body
                        // dropped), so the GOAWAY follows the 429 instead of racing it.
                        let close = (resp.status() == StatusCode::TOO_MANY_REQUESTS).then(|| in_flight.activity());
                        drop(in_flight);
                        Ok::<_, Infallible>(resp.map(|body| limits::ClosingBody::new(body, close)))
                    }
                })
            };
            // The watchdog: once no request has been in flight for `idle_timeout`, the connection
            // is shut down gracefully (HTTP/2 GOAWAY; HTTP/1.1 closes between requests; one that
            // never sent a first byte is cancelled), and dropped if it has not ended `drain` later.
            // hyper has no idle timeout of its own for HTTP/2, nor for a TLS connection that sends nothing.
            let (idle, limits) = (app.limits.settings.idle_timeout, &app.limits);
            let drain_after = idle.min(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            // `closing`: the time by which a connection told to close must have ended. On a
            // shutdown, a connection that has not begun a request yet is given a moment to
            // (its client may be sending it): closing it at once would leave that request unanswered.
            let mut closing: Option<tokio::time::Instant> = None;
            let mut first_request_until: Option<tokio::time::Instant> = None;
            loop {
                let now = tokio::time::Instant::now();
                if closing.is_none() && *drain.borrow() {
                    let wait_until = *first_request_until.get_or_insert(now + FIRST_REQUEST_ON_SHUTDOWN);
                    if activity.has_begun() || now >= wait_until {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(now + limits.settings.shutdown_grace);
                    }
                }
                let wake = match (closing, first_request_until) {
                    (Some(until), _) => until,
                    (None, Some(_)) => now + Duration::from_millis(10),
                    (None, None) => activity.idle_deadline(idle),
                };
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = drain.changed(), if closing.is_none() => {}
                    _ = activity.close_asked(), if closing.is_none() => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(tokio::time::Instant::now() + drain_after);
                    }
                    _ = tokio::time::sleep_until(wake) => {
                        if closing.is_some_and(|until| tokio::time::Instant::now() >= until) {
                            break;
                        }
                        if closing.is_some() || first_request_until.is_some() {
                            continue;
                        }
                        if activity.is_idle(idle) {
                            limits.counters.idle_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            conn.as_mut().graceful_shutdown();
                            closing = Some(tokio::time::Instant::now() + drain_after);
                        }
                    }
                }
            }
        });
    }
}

/// HTTP/1.1 and HTTP/2 settings from the limits (hyper's own defaults are not relied on).
fn http_builder(s: &limits::Settings) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper 1 restarts the header timer before each request on a kept-alive connection, so this
    // also bounds the wait for the next request; the watchdog's idle timeout covers the rest.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout)
        .max_buf_size((2 * s.max_header_bytes).max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(s.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(s.h2_keep_alive_interval)
        .keep_alive_timeout(s.h2_keep_alive_timeout);
    builder
}
