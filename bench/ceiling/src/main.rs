//! The ceiling for Valv's read path: axum behind rustls (TLS 1.3 only, as Valv serves),
//! answering `GET /fhir/{type}/{id}` with a fixed 1 KiB FHIR Patient. No authentication, no
//! decision, no audit, no storage, no decryption: what any HTTPS server on this machine can at
//! best do. Prints `ceiling serving on https://ADDR` once listening.
//!
//!     valv-bench-ceiling [ADDR]   (default 127.0.0.1:0)

use axum::{extract::Path, http::header, response::IntoResponse, routing::get, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;

/// A Patient padded to 1 KiB with a narrative, like a small real one.
fn patient() -> &'static str {
    static BODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let head = r#"{"resourceType":"Patient","id":"ceiling","meta":{"versionId":"1","lastUpdated":"2026-01-01T00:00:00.000Z"},"identifier":[{"system":"urn:valv:synthetic:mrn","value":"MRN-000001"}],"name":[{"family":"Ceiling","given":["Fixed"]}],"gender":"female","birthDate":"1970-01-01","text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">"#;
        let tail = r#"</div>"}}"#;
        format!("{head}{}{tail}", "x".repeat(1024 - head.len() - tail.len()))
    })
}

async fn read(Path((_t, _id)): Path<(String, String)>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/fhir+json")], patient())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    // *ring*, the provider Valv serves with, so the ceiling measures the same cryptography.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = Router::new().route("/fhir/{t}/{id}", get(read));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("ceiling serving on https://{}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
        });
    }
}
