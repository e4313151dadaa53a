//! Blind-index tokens: a keyed hash of (resource type, parameter, normalised value), so equal
//! search values can be found without the store holding them.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

#[derive(Clone)]
pub struct BlindIndexKey(crate::DataKey);

impl BlindIndexKey {
    pub fn new(key: crate::DataKey) -> Self {
        BlindIndexKey(key)
    }

    /// HMAC-SHA256 over length-prefixed (type, param, key), truncated to 128 bits: ample against
    /// collisions at any realistic index size, and half the index pages of a full tag.
    pub fn token(&self, resource_type: &str, param: &str, key: &str) -> [u8; 16] {
        let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(self.0.expose()) {
            Ok(m) => m,
            // HMAC accepts keys of any length; this arm cannot be reached with a 32-byte key.
            Err(_) => return [0; 16],
        };
        for field in [resource_type, param, key] {
            mac.update(&(field.len() as u32).to_be_bytes());
            mac.update(field.as_bytes());
        }
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag[..16]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataKey;

    #[test]
    fn deterministic_and_separated() {
        let k = BlindIndexKey::new(DataKey::from_bytes([3; 32]));
        assert_eq!(k.token("Patient", "family", "p:sm"), k.token("Patient", "family", "p:sm"));
        assert_ne!(k.token("Patient", "family", "p:sm"), k.token("Patient", "given", "p:sm"));
        assert_ne!(k.token("Patient", "family", "p:sm"), k.token("Practitioner", "family", "p:sm"));
        assert_ne!(k.token("Patient", "fa", "mily"), k.token("Patient", "fam", "ily"));
        let other = BlindIndexKey::new(DataKey::from_bytes([4; 32]));
        assert_ne!(k.token("Patient", "family", "p:sm"), other.token("Patient", "family", "p:sm"));
    }
}
