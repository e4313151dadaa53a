//! Single sign-on against a real OpenID provider (`oidc-provider` from npm, started by the test
//! from `tests/oidc/provider.js` over HTTPS with a test CA): the browser code flow with PKCE,
//! state and nonce driven by plain HTTP; bearer JWTs on the API; and the refusals — wrong
//! audience, wrong issuer, expired, `alg: none`, HS256 keyed with the public key, a forged
//! signature, an unknown key, no second factor, a replayed state, a wrong nonce — each audited.

use crate::harness::{run_ok, temp_dir, Server};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

const AUDIENCE: &str = "https://valv.test/fhir";

struct Provider {
    issuer: String,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    child: Child,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate for localhost/127.0.0.1 signed by it: (CA PEM, cert PEM, key PEM).
pub(crate) fn test_pki() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "Valv OIDC test CA");
    let ca_key = KeyPair::generate().expect("key");
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("params");
    let leaf_key = KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key)).expect("sign");
    (ca_pem, cert.pem(), leaf_key.serialize_pem())
}

fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

fn start_provider(dir: &Path, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Provider {
    let here = provider_dir();
    assert!(here.join("node_modules/oidc-provider").exists(), "oidc-provider is not installed: npm ci --prefix {} --omit=dev (.ci/run does it)", here.display());
    std::fs::write(dir.join("op-cert.pem"), cert_pem).expect("write");
    std::fs::write(dir.join("op-key.pem"), key_pem).expect("write");
    let mut child = Command::new("node")
        .arg(here.join("provider.js"))
        .env("PORT", "0")
        .env("TLS_CERT", dir.join("op-cert.pem"))
        .env("TLS_KEY", dir.join("op-key.pem"))
        .env("CLIENT_ID", "valv")
        .env("CLIENT_SECRET", "test-client-secret")
        .env("REDIRECT_URI", "https://127.0.0.1:9/auth/oidc/corp/callback")
        .env("REDIRECT_URI_ANY_PORT", "1")
        .env("RESOURCE", AUDIENCE)
        .env("KEYS_FILE", dir.join("op-keys.json"))
        .env("EXIT_ON_STDIN_EOF", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("provider.log")).expect("log")))
        .spawn()
        .expect("node (the OpenID provider) must be installed");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("READY line");
    let issuer = line.trim().strip_prefix("READY ").unwrap_or_else(|| panic!("provider did not start: {line}; see {}", dir.join("provider.log").display())).to_string();
    let port: u16 = issuer.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in issuer");
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("cert")).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Provider { issuer, port, tls: Arc::new(tls), child }
}

struct Answer {
    status: u16,
    location: Option<String>,
    cookies: Vec<String>,
    body: Value,
}

impl Provider {
    /// One request to the provider (no redirects followed).
    async fn request(&self, method: &str, path_or_url: &str, cookie: Option<&str>, form: Option<&str>, json_body: Option<&Value>) -> Answer {
        let path = path_or_url.strip_prefix(&self.issuer).unwrap_or(path_or_url);
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.expect("TLS to the provider");
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("http");
        tokio::spawn(conn);
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", format!("localhost:{}", self.port));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let body = match (form, json_body) {
            (Some(f), _) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                f.as_bytes().to_vec()
            }
            (None, Some(j)) => {
                req = req.header("content-type", "application/json");
                serde_json::to_vec(j).expect("json")
            }
            _ => Vec::new(),
        };
        let resp = send.send_request(req.body(Full::new(Bytes::from(body))).expect("request")).await.expect("send");
        let status = resp.status().as_u16();
        let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
        let cookies = resp.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).map(|c| c.split(';').next().unwrap_or("").to_string()).collect();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        Answer { status, location, cookies, body: serde_json::from_slice(&bytes).unwrap_or(Value::Null) }
    }

    async fn mint(&self, options: Value) -> String {
        let a = self.request("POST", "/test/mint", None, None, Some(&options)).await;
        assert_eq!(a.status, 200, "mint {options}: {}", a.body);
        a.body["token"].as_str().expect("token").to_string()
    }

    /// Signs `login` in at the provider, starting from Valv's redirect; returns Valv's callback
    /// query (`code=…&state=…`).
    async fn sign_in(&self, authorize_url: &str, login: &str) -> String {
        let a = self.request("GET", authorize_url, None, None, None).await;
        assert_eq!(a.status, 303, "authorize: {}", a.body);
        let interaction = a.location.expect("to the interaction");
        let cookies = a.cookies.join("; ");
        let l = self.request("POST", &format!("{interaction}/login"), Some(&cookies), Some(&format!("login={login}")), None).await;
        assert_eq!(l.status, 303, "login: {}", l.body);
        let back = self.request("GET", &l.location.expect("resume"), Some(&cookies), None, None).await;
        assert_eq!(back.status, 303, "resume: {}", back.body);
        let to_valv = back.location.expect("back to Valv");
        assert!(to_valv.starts_with("https://127.0.0.1:9/auth/oidc/corp/callback?"), "{to_valv}");
        to_valv.split_once('?').map(|(_, q)| q.to_string()).expect("query")
    }
}

fn valv_config(issuer: &str, dir: &Path, ca_pem: &str) -> String {
    std::fs::write(dir.join("op-ca.pem"), ca_pem).expect("write");
    let secret = dir.join("client-secret");
    std::fs::write(&secret, "test-client-secret\n").expect("write");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    format!(
        "[auth]\nrate_per_minute = 10000\nrate_burst = 10000\n[[oidc.providers]]\nname = \"corp\"\nissuer = \"{issuer}\"\naudience = \"{AUDIENCE}\"\nclient_id = \"valv\"\nclient_secret_file = \"{}\"\nredirect_uri = \"https://127.0.0.1:9/auth/oidc/corp/callback\"\nca_file = \"{}\"\nmfa_acr = [\"urn:valv:mfa\"]\n",
        secret.display(),
        dir.join("op-ca.pem").display()
    )
}

/// Valv's redirect to the provider for a browser sign-in, and the browser's sign-in cookie.
async fn start_sso(s: &Server) -> (String, String) {
    let r = s.request("GET", "/auth/oidc/corp/login", None, None, &[]).await;
    assert_eq!(r.status, 302, "{}", r.text);
    let to = r.header("location").expect("location").to_string();
    for p in ["code_challenge_method=S256", "code_challenge=", "state=", "nonce=", "client_id=valv", "response_type=code"] {
        assert!(to.contains(p), "{p} in {to}");
    }
    let cookie = r.header("set-cookie").expect("a sign-in cookie").to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("Secure") && cookie.contains("SameSite=Lax"), "{cookie}");
    (to, cookie.split(';').next().unwrap_or("").to_string())
}

/// The browser (with its cookie) comes back to Valv's callback.
async fn callback(s: &Server, query: &str, cookie: &str) -> crate::harness::Resp {
    s.request("GET", &format!("/auth/oidc/corp/callback?{query}"), None, None, &[("cookie", cookie)]).await
}

#[tokio::test]
async fn single_sign_on_with_a_real_openid_provider() {
    let dir = temp_dir("oidc-op");
    let (ca_pem, cert_pem, key_pem) = test_pki();
    let op = start_provider(&dir, &ca_pem, &cert_pem, &key_pem);
    let s = Server::start_configured("oidc", &[], &valv_config(&op.issuer, &dir, &ca_pem));

    // Browser sign-in for alice (physician, second factor): code + PKCE + state + nonce.
    // A callback presented by another browser (without the sign-in cookie) gets nothing.
    let (to, _) = start_sso(&s).await;
    let stolen = op.sign_in(&to, "alice").await;
    s.request("GET", &format!("/auth/oidc/corp/callback?{stolen}"), None, None, &[]).await.outcome(401);

    let (to, cookie) = start_sso(&s).await;
    let query = op.sign_in(&to, "alice").await;
    let done = callback(&s, &query, &cookie).await;
    assert_eq!(done.status, 200, "{}", done.text);
    let token = done.json["access_token"].as_str().expect("access token").to_string();
    let me = s.request("GET", "/auth/me", Some(&token), None, &[]).await;
    assert_eq!((me.status, me.json["roles"][0].as_str(), me.json["units"][0].as_str(), me.json["mfa"].as_bool()), (200, Some("physician"), Some("cardiology"), Some(true)), "{}", me.text);
    assert_eq!(me.json["id"], "oidc:corp:alice");
    // The same callback again: the state was used up.
    callback(&s, &query, &cookie).await.outcome(401);

    // bob signs in with a password only: the provider is required to assert a second factor.
    let (to, cookie) = start_sso(&s).await;
    let query = op.sign_in(&to, "bob").await;
    callback(&s, &query, &cookie).await.outcome(401);
    // An ID token whose nonce is not the one this sign-in sent.
    let armed = op.request("POST", "/test/tamper", None, None, Some(&json!({"id_token": {"claims": {"nonce": "not-yours"}}}))).await;
    assert_eq!(armed.status, 200, "{}", armed.body);
    let (to, cookie) = start_sso(&s).await;
    let query = op.sign_in(&to, "alice").await;
    callback(&s, &query, &cookie).await.outcome(401);

    // Bearer tokens on the API: the good one, then every kind of bad one.
    let good = op.mint(json!({})).await;
    assert_eq!(s.request("GET", "/auth/me", Some(&good), None, &[]).await.status, 200);
    let refused = [
        ("wrong audience", json!({"claims": {"aud": "https://elsewhere.test"}}), "jwt-wrong-audience"),
        ("wrong issuer, signed with the provider's key", json!({"claims": {"iss": "https://evil.test"}}), "jwt-unknown-issuer"),
        ("expired", json!({"ttl": -600}), "jwt-expired"),
        ("alg none", json!({"alg": "none"}), "jwt-algorithm-not-allowed"),
        ("HS256 keyed with the public key", json!({"alg": "HS256"}), "jwt-algorithm-not-allowed"),
        ("forged signature", json!({"key": "foreign"}), "jwt-bad-signature"),
        ("unknown key", json!({"header": {"kid": "no-such-key"}}), "jwt-unknown-key"),
        ("no second factor", json!({"login": "bob"}), "oidc-no-second-factor"),
        ("no role Valv knows", json!({"login": "carol"}), "oidc-no-known-role"),
    ];
    for (what, options, _) in &refused {
        let t = op.mint(options.clone()).await;
        let r = s.request("GET", "/fhir/Patient", Some(&t), None, &[]).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
    }
    // A token from an issuer Valv does not know (a second provider with its own keys).
    let other_dir = temp_dir("oidc-op2");
    let other = start_provider(&other_dir, &ca_pem, &cert_pem, &key_pem);
    let foreign = other.mint(json!({"claims": {"iss": op.issuer}})).await;
    s.request("GET", "/auth/me", Some(&foreign), None, &[]).await.outcome(401);
    let unknown_issuer = other.mint(json!({})).await;
    s.request("GET", "/auth/me", Some(&unknown_issuer), None, &[]).await.outcome(401);

    // Key rotation: tokens signed with the new key are accepted once Valv fetches the new keys.
    let rotated = op.request("POST", "/test/rotate", None, None, Some(&json!({}))).await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    // Valv fetches keys again for an unknown kid at most every 30 s (so a flood of made-up kids
    // cannot make it hammer the provider): move its clock past that.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64;
    s.set_clock(now + 31_000);
    let after = op.mint(json!({})).await;
    assert_eq!(s.request("GET", "/auth/me", Some(&after), None, &[]).await.status, 200, "a rotated key is fetched");
    assert_eq!(s.request("GET", "/auth/me", Some(&good), None, &[]).await.status, 200, "the old key is still published");

    // A key the provider withdraws stops being trusted once Valv's keys are 10 minutes old.
    let long_lived = op.mint(json!({"ttl": 7200})).await;
    let dropped = op.request("POST", "/test/rotate?drop_old=1", None, None, Some(&json!({}))).await;
    assert_eq!(dropped.status, 200, "{}", dropped.body);
    assert_eq!(s.request("GET", "/auth/me", Some(&long_lived), None, &[]).await.status, 200, "still trusted: keys fetched under 10 minutes ago");
    s.set_clock(now + 12 * 60_000);
    s.request("GET", "/auth/me", Some(&long_lived), None, &[]).await.outcome(401);
    assert_eq!(s.request("GET", "/auth/me", Some(&op.mint(json!({"ttl": 7200})).await), None, &[]).await.status, 200);

    let log = run_ok(&s.data, &["audit", "export"]);
    for (_, _, reason) in &refused {
        assert!(log.contains(reason), "audited: {reason}");
    }
    for reason in ["oidc-unknown-or-used-state", "oidc-other-browser", "jwt-nonce-mismatch", "jwt-unknown-issuer", "\"interaction\":\"login-sso\""] {
        assert!(log.contains(reason), "audited: {reason}");
    }
    assert!(log.contains("oidc-no-second-factor"));
    drop(other);
    let _ = std::fs::remove_dir_all(&other_dir);
    drop(op);
    let _ = std::fs::remove_dir_all(&dir);
}
