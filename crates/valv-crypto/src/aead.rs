//! AES-256-GCM sealing with the context bound into the additional data.
//!
//! Sealed layout: `0x01 || nonce (12) || ciphertext || tag (16)`. The leading byte is the
//! format version so the layout can change without ambiguity.

use crate::{CryptoError, DataKey};
use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};

const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// What a ciphertext is bound to. Opening with any field different fails.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// What the bytes are: `resource`, `kek-wrap`, `audit`, …
    pub purpose: &'a str,
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version: u64,
    /// The owning patient, or "" for tenant data.
    pub patient: &'a str,
}

impl Aad<'_> {
    /// Length-prefixed fields, so no two different contexts encode to the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        for field in [self.purpose, self.resource_type, self.id, self.patient] {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out.extend_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// Encrypts `plaintext` under `key`, bound to `aad`. `nonce` must be fresh randomness.
pub fn seal(key: &DataKey, nonce: [u8; NONCE_LEN], aad: &Aad<'_>, plaintext: &[u8]) -> Vec<u8> {
    seal_raw(key.expose(), nonce, &aad.encode(), plaintext)
}

pub(crate) fn seal_raw(key: &[u8; 32], nonce: [u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(&(*key).into());
    let n: Nonce<_> = nonce.into();
    // Encryption with a valid key and in-memory buffers cannot fail; an empty result would be
    // rejected by `open` as malformed rather than passed off as data.
    let ct = cipher.encrypt(&n, Payload { msg: plaintext, aad }).unwrap_or_default();
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(FORMAT);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Decrypts a sealed value, failing unless key and context are exactly those it was sealed with.
pub fn open(key: &DataKey, aad: &Aad<'_>, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    open_raw(key.expose(), &aad.encode(), sealed)
}

pub(crate) fn open_raw(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
        return Err(CryptoError::Malformed("too short"));
    }
    if sealed[0] != FORMAT {
        return Err(CryptoError::Malformed("unknown format version"));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
    let cipher = Aes256Gcm::new(&(*key).into());
    let n: Nonce<_> = nonce.into();
    cipher.decrypt(&n, Payload { msg: &sealed[1 + NONCE_LEN..], aad }).map_err(|_| CryptoError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn aad<'a>(id: &'a str, version: u64, patient: &'a str) -> Aad<'a> {
        Aad { purpose: "resource", resource_type: "Observation", id, version, patient }
    }

    proptest! {
        #[test]
        fn round_trip(key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), msg in proptest::collection::vec(any::<u8>(), 0..512)) {
            let k = DataKey::from_bytes(key);
            let sealed = seal(&k, nonce, &aad("o1", 1, "p1"), &msg);
            prop_assert_eq!(open(&k, &aad("o1", 1, "p1"), &sealed).expect("opens"), msg);
        }

        #[test]
        fn any_context_change_fails(key in any::<[u8; 32]>(), nonce in any::<[u8; 12]>(), which in 0usize..4) {
            let k = DataKey::from_bytes(key);
            let sealed = seal(&k, nonce, &aad("o1", 1, "p1"), b"secret");
            let other = match which {
                0 => aad("o2", 1, "p1"),
                1 => aad("o1", 2, "p1"),
                2 => aad("o1", 1, "p2"),
                _ => Aad { purpose: "resource", resource_type: "Condition", id: "o1", version: 1, patient: "p1" },
            };
            prop_assert_eq!(open(&k, &other, &sealed), Err(CryptoError::Authentication));
        }

        #[test]
        fn any_bit_flip_fails(key in any::<[u8; 32]>(), pos in 0usize..40, bit in 0u8..8) {
            let k = DataKey::from_bytes(key);
            let mut sealed = seal(&k, [7; 12], &aad("o1", 1, "p1"), b"some clinical note");
            let pos = pos % sealed.len();
            sealed[pos] ^= 1 << bit;
            prop_assert!(open(&k, &aad("o1", 1, "p1"), &sealed).is_err());
        }
    }

    #[test]
    fn wrong_key_fails() {
        let sealed = seal(&DataKey::from_bytes([1; 32]), [0; 12], &aad("o", 1, ""), b"x");
        assert_eq!(open(&DataKey::from_bytes([2; 32]), &aad("o", 1, ""), &sealed), Err(CryptoError::Authentication));
    }

    #[test]
    fn aad_encoding_is_unambiguous() {
        let a = Aad { purpose: "ab", resource_type: "c", id: "", version: 0, patient: "" }.encode();
        let b = Aad { purpose: "a", resource_type: "bc", id: "", version: 0, patient: "" }.encode();
        assert_ne!(a, b);
    }
}
