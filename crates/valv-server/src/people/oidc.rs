//! Single sign-on with OpenID Connect providers: bearer JWTs from a provider accepted on the API,
//! and browser sign-in by authorization code with PKCE (S256), state and nonce, where Valv is the
//! confidential client. Token rules are in `valv_identity::jwt`; this module fetches the
//! provider's discovery document and keys (HTTPS only, re-fetched when a token names a key not
//! yet seen, at most every 30 s: key rotation) and keeps sign-ins in progress (single use,
//! 10 minutes).

use crate::people::auth::{Principal, PrincipalKind};
use crate::http::client::{https, tls_for};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use valv_identity::jwt::{self, Expect, Jwk, JwtError};

/// One configured provider (`[[oidc.providers]]`).
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub name: String,
    /// `https://…`, exactly as the provider's tokens carry it in `iss`.
    pub issuer: String,
    /// The `aud` API access tokens must carry (this server's resource identifier).
    pub audience: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// This server's callback, registered at the provider: `…/auth/oidc/<name>/callback`.
    pub redirect_uri: Option<String>,
    pub algorithms: Vec<String>,
    /// Refuse tokens that show no second factor (`amr` in `mfa_amr`, or `acr` in `mfa_acr`).
    pub require_mfa: bool,
    pub mfa_amr: Vec<String>,
    pub mfa_acr: Vec<String>,
    pub roles_claim: String,
    pub units_claim: String,
    pub username_claim: String,
    /// Trusted CA certificates (PEM) for the provider's HTTPS.
    pub ca_pem: Vec<u8>,
}

struct Discovery {
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

struct Provider {
    settings: ProviderSettings,
    tls: Arc<rustls::ClientConfig>,
    discovery: tokio::sync::Mutex<Option<Arc<Discovery>>>,
    /// The provider's keys, when they were fetched and when a fetch was last tried (s since the
    /// epoch).
    keys: Mutex<(Vec<Jwk>, i64, i64)>,
}

/// A browser sign-in in progress, found by its `state`.
struct Pending {
    provider: usize,
    /// SHA-256 of the cookie set on the browser that started the sign-in.
    browser: [u8; 32],
    nonce: String,
    verifier: String,
    created: i64,
}

pub struct Oidc {
    providers: Vec<Provider>,
    pending: Mutex<HashMap<String, Pending>>,
}

const REFETCH_AFTER_S: i64 = 30;
/// Keys are fetched again once this old, whatever tokens arrive.
const KEYS_MAX_AGE_S: i64 = 600;
/// Least time between two attempts to fetch keys (after a failure, or while none are held).
const RETRY_FETCH_S: i64 = 5;
const PENDING_TTL_S: i64 = 600;
const MAX_PENDING: usize = 10_000;
const LEEWAY_S: i64 = 60;

/// A successful browser sign-in.
pub struct SignedIn {
    pub principal: Principal,
    pub access_token: String,
    pub expires_in: i64,
}

fn random_b64() -> Result<String, String> {
    use base64::Engine as _;
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("no randomness: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

async fn get_json(tls: &Arc<rustls::ClientConfig>, url: &str) -> Result<Value, String> {
    let (status, body) = https(tls, hyper::Method::GET, url, &[], None).await?;
    if status != 200 {
        return Err(format!("{url} answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))
}

fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { char::from(b).to_string() } else { format!("%{b:02X}") }).collect::<String>();
    pairs.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

impl Oidc {
    pub fn new(settings: Vec<ProviderSettings>) -> Result<Self, String> {
        let mut providers = Vec::new();
        for s in settings {
            if !s.issuer.starts_with("https://") {
                return Err(format!("OIDC provider '{}': the issuer must be an https URL", s.name));
            }
            if let Some(bad) = s.algorithms.iter().find(|a| !jwt::ALGORITHMS.contains(&a.as_str())) {
                return Err(format!("OIDC provider '{}': algorithm '{bad}' is not supported ({})", s.name, jwt::ALGORITHMS.join(", ")));
            }
            if s.audience == s.client_id {
                return Err(format!("OIDC provider '{}': audience must differ from client_id, or ID tokens would pass as API access tokens", s.name));
            }
            if providers.iter().any(|p: &Provider| p.settings.name == s.name || p.settings.issuer == s.issuer) {
                return Err(format!("OIDC provider '{}': another provider has the same name or issuer", s.name));
            }
            let tls = tls_for(&s.ca_pem).map_err(|e| format!("OIDC provider '{}': {e}", s.name))?;
            providers.push(Provider { settings: s, tls, discovery: tokio::sync::Mutex::new(None), keys: Mutex::new((Vec::new(), 0, 0)) });
        }
        Ok(Oidc { providers, pending: Mutex::new(HashMap::new()) })
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    fn provider(&self, name: &str) -> Option<(usize, &Provider)> {
        self.providers.iter().enumerate().find(|(_, p)| p.settings.name == name)
    }

    async fn discovery(&self, p: &Provider) -> Result<Arc<Discovery>, String> {
        let mut d = p.discovery.lock().await;
        if let Some(d) = d.as_ref() {
            return Ok(d.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", p.settings.issuer.trim_end_matches('/'));
        let doc = get_json(&p.tls, &url).await?;
        if doc.get("issuer").and_then(Value::as_str) != Some(p.settings.issuer.as_str()) {
            return Err(format!("{url}: the document names another issuer"));
        }
        let field = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| format!("{url}: no {k}"));
        let fresh = Arc::new(Discovery { authorization_endpoint: field("authorization_endpoint")?, token_endpoint: field("token_endpoint")?, jwks_uri: field("jwks_uri")? });
        *d = Some(fresh.clone());
        Ok(fresh)
    }

    /// The provider's keys, fetched when none are held or (on `refresh`) when the last fetch is
    /// older than 30 s, and in any case once they are 10 minutes old (so a key the provider
    /// withdraws stops being trusted within that time).
    async fn keys(&self, p: &Provider, now: i64, refresh: bool) -> Result<Vec<Jwk>, String> {
        let (held, fetched, tried) = p.keys.lock().map(|k| k.clone()).unwrap_or_default();
        let stale = (refresh && now - fetched >= REFETCH_AFTER_S) || now - fetched >= KEYS_MAX_AGE_S;
        if !held.is_empty() && !stale {
            return Ok(held);
        }
        // However many tokens arrive, the provider is asked at most every few seconds.
        if now - tried < RETRY_FETCH_S {
            return if held.is_empty() { Err("a recent fetch of the keys failed".into()) } else { Ok(held) };
        }
        if let Ok(mut k) = p.keys.lock() {
            k.2 = now;
        }
        let fetched_now = async {
            let d = self.discovery(p).await?;
            let doc = get_json(&p.tls, &d.jwks_uri).await?;
            serde_json::from_value::<jwt::Jwks>(doc).map_err(|e| format!("{}: not a JWKS: {e}", d.jwks_uri))
        };
        match fetched_now.await {
            Ok(jwks) => {
                if let Ok(mut k) = p.keys.lock() {
                    *k = (jwks.keys.clone(), now, now);
                }
                Ok(jwks.keys)
            }
            // The provider is down: the keys held keep working (tokens it issued stay usable)
            // until it answers again.
            Err(e) if !held.is_empty() => {
                tracing::warn!(provider = %p.settings.name, error = %e, "cannot refresh the provider's keys; using those held");
                Ok(held)
            }
            Err(e) => Err(e),
        }
    }

    /// Verifies with the provider's keys, fetching them again once if the token names an
    /// unknown key (the provider rotated).
    async fn verify(&self, p: &Provider, token: &str, expect: &Expect<'_>) -> Result<Map<String, Value>, &'static str> {
        let keys = self.keys(p, expect.now, false).await.map_err(|e| {
            tracing::warn!(provider = %p.settings.name, error = %e, "cannot fetch the provider's keys");
            "oidc-provider-unreachable"
        })?;
        match jwt::verify(token, &keys, expect) {
            Err(JwtError::UnknownKey(_)) => {
                let keys = self.keys(p, expect.now, true).await.map_err(|_| "oidc-provider-unreachable")?;
                jwt::verify(token, &keys, expect).map_err(|e| e.reason())
            }
            other => other.map_err(|e| e.reason()),
        }
    }

    fn principal(&self, p: &Provider, claims: &Map<String, Value>) -> Result<Principal, &'static str> {
        let s = &p.settings;
        let mfa = jwt::has_second_factor(claims, &s.mfa_amr, &s.mfa_acr);
        if s.require_mfa && !mfa {
            return Err("oidc-no-second-factor");
        }
        let roles: Vec<String> = jwt::strings(claims, &s.roles_claim).into_iter().filter(|r| valv_identity::ROLES.contains(&r.as_str())).collect();
        if roles.is_empty() {
            return Err("oidc-no-known-role");
        }
        let sub = claims.get("sub").and_then(Value::as_str).ok_or("jwt-no-subject")?;
        let name = claims.get(&s.username_claim).and_then(Value::as_str).unwrap_or(sub);
        // SMART's `fhirUser` names the Practitioner or Patient the person is.
        let fhir_user = claims.get("fhirUser").and_then(Value::as_str).and_then(valv_fhir::reference::parse);
        let as_type = |t: &str| fhir_user.as_ref().filter(|r| r.resource_type == t).map(|r| r.id.clone());
        let scopes = match claims.get("scope").and_then(Value::as_str) {
            Some(text) => Some(valv_policy::Scopes::parse(text).map_err(|_| "jwt-bad-scope")?).filter(|s| !s.is_empty()),
            None => None,
        };
        Ok(Principal {
            kind: PrincipalKind::User,
            id: format!("oidc:{}:{sub}", s.name),
            name: name.to_string(),
            roles,
            units: jwt::strings(claims, &s.units_claim),
            mfa,
            practitioner: as_type("Practitioner"),
            patient: as_type("Patient"),
            scopes,
        })
    }

    /// The principal of a bearer JWT from a configured provider (chosen by its `iss`, then
    /// fully verified), or why not.
    pub async fn authenticate(&self, token: &str, now_ms: i64) -> Result<Principal, &'static str> {
        let issuer = unverified_issuer(token).ok_or("jwt-malformed")?;
        let Some(p) = self.providers.iter().find(|p| p.settings.issuer == issuer) else { return Err("jwt-unknown-issuer") };
        let s = &p.settings;
        let expect = Expect { issuer: &s.issuer, audience: &s.audience, algorithms: &s.algorithms, now: now_ms / 1000, leeway: LEEWAY_S, nonce: None };
        let claims = self.verify(p, token, &expect).await?;
        self.principal(p, &claims)
    }

    /// Starts a browser sign-in: the provider's authorization URL to redirect to, and a secret for
    /// a cookie on the browser (the callback must come from the same browser).
    pub async fn start(&self, name: &str, now_ms: i64) -> Result<(String, String), StartError> {
        let (index, p) = self.provider(name).ok_or_else(|| StartError::Unknown(format!("no OIDC provider named '{name}'")))?;
        let redirect = p.settings.redirect_uri.clone().ok_or_else(|| StartError::Unknown(format!("OIDC provider '{name}' has no redirect_uri: browser sign-in is off")))?;
        let d = self.discovery(p).await.map_err(|e| {
            tracing::warn!(provider = %name, error = %e, "provider discovery failed");
            StartError::Unavailable("the identity provider cannot be reached".into())
        })?;
        let fresh = || random_b64().map_err(StartError::Unavailable);
        let (state, nonce, verifier, browser) = (fresh()?, fresh()?, fresh()?, fresh()?);
        let challenge = {
            use base64::Engine as _;
            use sha2::Digest as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
        };
        let now = now_ms / 1000;
        if let Ok(mut pending) = self.pending.lock() {
            pending.retain(|_, v| now - v.created < PENDING_TTL_S);
            if pending.len() >= MAX_PENDING {
                return Err(StartError::Unavailable("too many sign-ins in progress; try again shortly".into()));
            }
            pending.insert(state.clone(), Pending { provider: index, browser: sha256(&browser), nonce: nonce.clone(), verifier, created: now });
        }
        let query = form(&[
            ("response_type", "code"),
            ("client_id", &p.settings.client_id),
            ("redirect_uri", &redirect),
            ("scope", "openid profile email"),
            ("state", &state),
            ("nonce", &nonce),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            ("resource", &p.settings.audience),
        ]);
        let sep = if d.authorization_endpoint.contains('?') { '&' } else { '?' };
        Ok((format!("{}{sep}{query}", d.authorization_endpoint), browser))
    }

    /// Finishes a browser sign-in: the state must be one this server issued and not yet used; the
    /// code is exchanged (with the PKCE verifier and the client secret); the ID token must carry
    /// the nonce; the access token must be valid for this server's API.
    pub async fn finish(&self, name: &str, callback: &Callback<'_>, now_ms: i64) -> Result<SignedIn, &'static str> {
        let (index, p) = self.provider(name).ok_or("oidc-unknown-provider")?;
        let now = now_ms / 1000;
        let pending = self.pending.lock().ok().and_then(|mut m| m.remove(callback.state)).ok_or("oidc-unknown-or-used-state")?;
        if pending.provider != index || now - pending.created >= PENDING_TTL_S {
            return Err("oidc-unknown-or-used-state");
        }
        // The state is used up either way; only the browser that started may finish.
        if callback.browser.map(sha256) != Some(pending.browser) {
            return Err("oidc-other-browser");
        }
        let s = &p.settings;
        if callback.iss.is_some_and(|iss| iss != s.issuer) {
            return Err("oidc-callback-wrong-issuer");
        }
        let code = callback.code;
        let d = self.discovery(p).await.map_err(|_| "oidc-provider-unreachable")?;
        let redirect = s.redirect_uri.clone().unwrap_or_default();
        let mut pairs = vec![("grant_type", "authorization_code"), ("code", code), ("redirect_uri", redirect.as_str()), ("code_verifier", pending.verifier.as_str()), ("client_id", s.client_id.as_str())];
        let secret = s.client_secret.clone().unwrap_or_default();
        if s.client_secret.is_some() {
            pairs.push(("client_secret", secret.as_str()));
        }
        let headers = [("content-type", "application/x-www-form-urlencoded".to_string())];
        let (status, body) = https(&p.tls, hyper::Method::POST, &d.token_endpoint, &headers, Some(form(&pairs))).await.map_err(|e| {
            tracing::warn!(provider = %s.name, error = %e, "token endpoint failed");
            "oidc-provider-unreachable"
        })?;
        if status != 200 {
            return Err("oidc-code-refused");
        }
        let tokens: Value = serde_json::from_slice(&body).map_err(|_| "oidc-token-answer-malformed")?;
        let id_token = tokens.get("id_token").and_then(Value::as_str).ok_or("oidc-no-id-token")?;
        let access_token = tokens.get("access_token").and_then(Value::as_str).ok_or("oidc-no-access-token")?;
        let id_expect = Expect { issuer: &s.issuer, audience: &s.client_id, algorithms: &s.algorithms, now, leeway: LEEWAY_S, nonce: Some(&pending.nonce) };
        let id_claims = self.verify(p, id_token, &id_expect).await?;
        self.principal(p, &id_claims)?;
        let api_expect = Expect { issuer: &s.issuer, audience: &s.audience, algorithms: &s.algorithms, now, leeway: LEEWAY_S, nonce: None };
        let api_claims = self.verify(p, access_token, &api_expect).await.map_err(|_| "oidc-access-token-not-for-this-server")?;
        if api_claims.get("sub") != id_claims.get("sub") {
            return Err("oidc-tokens-disagree");
        }
        // What requests will be decided on: the access token's claims.
        let principal = self.principal(p, &api_claims)?;
        let expires_in = api_claims.get("exp").and_then(Value::as_i64).map_or(0, |e| (e - now).max(0));
        Ok(SignedIn { principal, access_token: access_token.to_string(), expires_in })
    }
}

/// Why a browser sign-in could not start.
#[derive(Debug)]
pub enum StartError {
    /// No such provider, or it has no browser sign-in.
    Unknown(String),
    /// The provider cannot be reached or too many sign-ins are in progress.
    Unavailable(String),
}

/// What the provider's redirect brought back.
pub struct Callback<'a> {
    pub code: &'a str,
    pub state: &'a str,
    /// RFC 9207's `iss` parameter, when the provider sends it.
    pub iss: Option<&'a str>,
    /// The sign-in cookie of the browser presenting the callback.
    pub browser: Option<&'a str>,
}

fn sha256(s: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.as_bytes()).into()
}

/// The `iss` of a token before verification (only to choose which provider verifies it).
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?.get("iss")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_are_encoded() {
        assert_eq!(form(&[("a", "b c"), ("redirect_uri", "https://x/cb?y=1")]), "a=b%20c&redirect_uri=https%3A%2F%2Fx%2Fcb%3Fy%3D1");
    }

    #[test]
    fn providers_must_use_https_and_known_algorithms() {
        let base = ProviderSettings {
            name: "p".into(),
            issuer: "http://idp.test".into(),
            audience: "a".into(),
            client_id: "c".into(),
            client_secret: None,
            redirect_uri: None,
            algorithms: vec!["RS256".into()],
            require_mfa: true,
            mfa_amr: vec![],
            mfa_acr: vec![],
            roles_claim: "roles".into(),
            units_claim: "units".into(),
            username_claim: "preferred_username".into(),
            ca_pem: Vec::new(),
        };
        assert!(Oidc::new(vec![base.clone()]).err().is_some_and(|e| e.contains("https")));
        let hs = ProviderSettings { issuer: "https://idp.test".into(), algorithms: vec!["HS256".into()], ..base };
        assert!(Oidc::new(vec![hs]).err().is_some_and(|e| e.contains("HS256")));
    }
}
