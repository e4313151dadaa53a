//! Outbound HTTPS for the few places Valv calls out (OpenID providers, the alert webhook): one
//! request per connection, HTTP/1.1, the peer's certificate checked against a configured CA only
//! (never the system's roots), bounded in time and in the size of the answer.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;

/// A TLS client configuration that trusts only the certificates in `ca_pem`.
pub fn tls_for(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        let _ = roots.add(c.map_err(|e| format!("CA file: {e}"))?);
    }
    if roots.is_empty() {
        return Err("no CA certificate in the CA file".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// One HTTPS request (HTTP/1.1, 10 s, answers up to 1 MiB): (status, body).
pub async fn https(tls: &Arc<rustls::ClientConfig>, method: hyper::Method, url: &str, headers: &[(&str, String)], body: Option<String>) -> Result<(u16, Vec<u8>), String> {
    exchange(tls, method, url, headers, body, true).await
}

/// As [`https`], for the status alone: the answer's body is not read (a receiver's large or
/// slow answer does not turn its 2xx into a failure).
pub async fn https_status(tls: &Arc<rustls::ClientConfig>, method: hyper::Method, url: &str, headers: &[(&str, String)], body: Option<String>) -> Result<u16, String> {
    exchange(tls, method, url, headers, body, false).await.map(|(status, _)| status)
}

/// `https://host:port` of a URL: what logs and errors name, never its path or query (which may
/// carry a token).
pub fn origin(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) => format!("https://{}:{}", u.host().unwrap_or("?"), u.port_u16().unwrap_or(443)),
        Err(_) => "an invalid URL".into(),
    }
}

/// Checks that `url` is an https URL with a host and without credentials in it.
pub fn check_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url.parse().map_err(|_| "the URL is not valid".to_string())?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{} is not https", origin(url)));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("the URL carries credentials (user:password@); they are not sent".into());
    }
    Ok(uri)
}

async fn exchange(tls: &Arc<rustls::ClientConfig>, method: hyper::Method, url: &str, headers: &[(&str, String)], body: Option<String>, read_body: bool) -> Result<(u16, Vec<u8>), String> {
    let uri = check_url(url)?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut connection = None;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| format!("TLS with {host}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        connection = Some(tokio::spawn(conn));
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", authority).header("accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        if !read_body {
            return Ok((status, Vec::new()));
        }
        let bytes = Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes();
        Ok::<_, String>((status, bytes.to_vec()))
    };
    let result = tokio::time::timeout(Duration::from_secs(10), work).await;
    // The connection is not kept: a peer that stalls must not hold a task after the timeout.
    if let Some(c) = connection {
        c.abort();
    }
    result.map_err(|_| format!("{}: no answer in 10 s", origin(url)))?
}
