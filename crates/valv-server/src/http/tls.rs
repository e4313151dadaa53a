//! TLS: rustls with the ring provider, TLS 1.3 only unless 1.2 is explicitly allowed (then only
//! ECDHE AEAD suites, which is all rustls offers), ALPN for HTTP/2 and HTTP/1.1.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// A service that authenticates with a client certificate: a certificate chaining to the client
/// CA and valid for `dns_name` (a subjectAltName) acts as this service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCert {
    pub name: String,
    pub dns_name: String,
    pub role: String,
    /// SMART `system/` scopes the service acts by.
    pub scopes: Option<valv_policy::Scopes>,
}

/// The server's TLS settings. With `client_ca`, clients may present a certificate, which must
/// chain to that CA (else the handshake fails); clients without one still connect and
/// authenticate with a bearer credential.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8], allow_tls12: bool, client_ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key file: {e}"))?;
    let versions: &[&rustls::SupportedProtocolVersion] =
        if allow_tls12 { &[&rustls::version::TLS13, &rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions).map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                roots.add(c.map_err(|e| format!("client CA file: {e}"))?).map_err(|e| format!("client CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("client CA file holds no certificate".into());
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("client certificate verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The service a verified client certificate names, if any: the first configured service the
/// certificate is valid for (by DNS subjectAltName). The chain was checked in the handshake.
pub fn service_for(cert: &CertificateDer<'_>, services: &[ServiceCert]) -> Option<ServiceCert> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    services
        .iter()
        .find(|s| rustls::pki_types::ServerName::try_from(s.dns_name.as_str()).is_ok_and(|n| ee.verify_is_valid_for_subject_name(&n).is_ok()))
        .cloned()
}
