//! The first-start TLS certificate: self-signed, short-lived (90 days), naming this host, and
//! renewed at start once within 30 days of its end. A certificate an operator puts in its place
//! (any file without the marker below) is never touched; production deployments should use one
//! from their own CA (API.md §1).

use std::fs;
use std::path::Path;

/// How long a generated certificate is valid, and how close to its end it is renewed.
pub const VALID_DAYS: i64 = 90;
pub const RENEW_WITHIN_DAYS: i64 = 30;
/// Beside the certificate: marks it as Valv's own, with its end (seconds since the epoch).
pub const MARKER: &str = "generated-by-valv";

/// The names the certificate is for: loopback, and this host's name where it has one.
fn host_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    if !host.is_empty() && host.len() <= 253 && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') && !names.iter().any(|n| n == host) {
        names.push(host.to_string());
    }
    names
}

/// Year, month and day of an instant (seconds since the epoch).
fn ymd(secs: i64) -> (i32, u8, u8) {
    let (y, m, d) = valv_fhir::date::civil_from_days(secs.div_euclid(86_400));
    (y as i32, m as u8, d as u8)
}

/// Writes a new self-signed certificate and key valid from yesterday for [`VALID_DAYS`].
pub fn generate(cert: &Path, key: &Path, now_secs: i64, write_secret: impl Fn(&Path, &[u8]) -> Result<(), String>) -> Result<(), String> {
    let e = |e: rcgen::Error| format!("generating a TLS certificate: {e}");
    let mut params = rcgen::CertificateParams::new(host_names()).map_err(e)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, "Valv self-signed (first start)");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "Valv");
    let end = now_secs + VALID_DAYS * 86_400;
    let ((y0, m0, d0), (y1, m1, d1)) = (ymd(now_secs - 86_400), ymd(end));
    params.not_before = rcgen::date_time_ymd(y0, m0, d0);
    params.not_after = rcgen::date_time_ymd(y1, m1, d1);
    let key_pair = rcgen::KeyPair::generate().map_err(e)?;
    let generated = params.self_signed(&key_pair).map_err(e)?;
    // Written beside and renamed over, so a crash leaves the old pair or the new one.
    let (key_new, cert_new) = (key.with_extension("pem.new"), cert.with_extension("pem.new"));
    let _ = fs::remove_file(&key_new);
    write_secret(&key_new, key_pair.serialize_pem().as_bytes())?;
    fs::write(&cert_new, generated.pem()).map_err(|e| format!("writing {}: {e}", cert_new.display()))?;
    fs::rename(&key_new, key).map_err(|e| format!("replacing {}: {e}", key.display()))?;
    fs::rename(&cert_new, cert).map_err(|e| format!("replacing {}: {e}", cert.display()))?;
    fs::write(marker(cert), format!("{end}\n")).map_err(|e| format!("writing the certificate marker: {e}"))
}

fn marker(cert: &Path) -> std::path::PathBuf {
    cert.with_file_name(MARKER)
}

/// At start: renews Valv's own certificate when it ends within [`RENEW_WITHIN_DAYS`]. Returns
/// whether it did.
pub fn renew_if_due(cert: &Path, key: &Path, now_secs: i64, write_secret: impl Fn(&Path, &[u8]) -> Result<(), String>) -> Result<bool, String> {
    let Ok(text) = fs::read_to_string(marker(cert)) else { return Ok(false) };
    let end: i64 = text.trim().parse().unwrap_or(0);
    if end - now_secs > RENEW_WITHIN_DAYS * 86_400 {
        return Ok(false);
    }
    generate(cert, key, now_secs, write_secret)?;
    Ok(true)
}
