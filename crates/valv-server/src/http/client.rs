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
    let uri: hyper::Uri = url.parse().map_err(|_| format!("'{url}' is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("'{url}' is not https"));
    }
    let host = uri.host().ok_or_else(|| format!("'{url}' has no host"))?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| format!("TLS with {host}: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let mut req = hyper::Request::builder().method(method).uri(path).header("host", authority).header("accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), 1 << 20).collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes();
        Ok::<_, String>((status, bytes.to_vec()))
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| format!("{url}: no answer in 10 s"))?
}
