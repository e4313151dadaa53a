//! Record MACs: HMAC-SHA256 over a record's fields, so rows the server trusts (API keys, and
//! later users and grants) cannot be inserted or altered by someone who can write to the
//! database but does not hold the keys.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub struct RecordMac(crate::DataKey);

impl RecordMac {
    pub fn new(key: crate::DataKey) -> Self {
        RecordMac(key)
    }

    fn mac(&self, purpose: &str, fields: &[&[u8]]) -> Option<Hmac<Sha256>> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.expose()).ok()?;
        for field in std::iter::once(purpose.as_bytes()).chain(fields.iter().copied()) {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        Some(mac)
    }

    /// The tag over length-prefixed `purpose` and `fields`.
    pub fn tag(&self, purpose: &str, fields: &[&[u8]]) -> Vec<u8> {
        self.mac(purpose, fields).map(|m| m.finalize().into_bytes().to_vec()).unwrap_or_default()
    }

    /// Constant-time check of a stored tag.
    pub fn verify(&self, purpose: &str, fields: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(purpose, fields).is_some_and(|m| m.verify_slice(tag).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataKey;

    #[test]
    fn tags_bind_every_field() {
        let m = RecordMac::new(DataKey::from_bytes([5; 32]));
        let t = m.tag("api-key", &[b"id", b"admin"]);
        assert!(m.verify("api-key", &[b"id", b"admin"], &t));
        assert!(!m.verify("api-key", &[b"id", b"service"], &t));
        assert!(!m.verify("user", &[b"id", b"admin"], &t));
        assert!(!m.verify("api-key", &[b"ida", b"dmin"], &t), "fields are length-prefixed");
        assert!(!RecordMac::new(DataKey::from_bytes([6; 32])).verify("api-key", &[b"id", b"admin"], &t));
    }
}
