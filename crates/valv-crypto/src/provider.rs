//! Key providers hold the key-encryption keys (KEKs) and wrap and unwrap data keys with them.
//!
//! This version has the local key-file provider; PKCS#11, cloud KMS and Vault transit providers
//! implement the same trait. Rotation adds a KEK version: new wraps use the newest version, old
//! wrapped keys stay readable until they are re-wrapped.

use crate::aead::{open_raw, seal_raw};
use crate::{CryptoError, DataKey, WrappedKey};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

pub trait KeyProvider: Send + Sync {
    /// The provider's name as stored beside wrapped keys (e.g. `file`).
    fn name(&self) -> &str;
    /// The KEK version new wraps use.
    fn current_version(&self) -> u32;
    /// Wraps a data key under the current KEK, bound to `context` (the key's name).
    fn wrap(&self, key: &DataKey, context: &str, nonce: [u8; 12]) -> Result<WrappedKey, CryptoError>;
    /// Unwraps a data key; fails if the KEK version is unknown or the context differs.
    fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, CryptoError>;
}

/// KEKs kept in a local file (mode 0600), for a single machine. The file holds one line per
/// version: `valv-kek-v1 <version> <64 hex digits>`. Reading and writing the file is the
/// caller's job; this type only parses and formats it.
pub struct LocalKeyProvider {
    versions: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

const LINE_TAG: &str = "valv-kek-v1";

fn wrap_aad(context: &str, version: u32) -> Vec<u8> {
    let mut aad = b"valv kek-wrap\x00".to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(context.as_bytes());
    aad
}

impl LocalKeyProvider {
    /// A provider with one fresh KEK (version 1) from caller-supplied randomness.
    pub fn generate(random: [u8; 32]) -> Self {
        let mut versions = BTreeMap::new();
        versions.insert(1, Zeroizing::new(random));
        LocalKeyProvider { versions }
    }

    /// Parses the key file's text.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let mut versions = BTreeMap::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
            let bad = |why: &str| CryptoError::KeyFile(format!("line {}: {why}", n + 1));
            let mut f = line.split_whitespace();
            if f.next() != Some(LINE_TAG) {
                return Err(bad("expected 'valv-kek-v1 <version> <hex key>'"));
            }
            let version: u32 = f.next().and_then(|v| v.parse().ok()).ok_or_else(|| bad("bad version"))?;
            let bytes = f.next().and_then(crate::hex::decode).ok_or_else(|| bad("bad hex key"))?;
            let key: [u8; 32] = bytes.try_into().map_err(|_| bad("a KEK is 32 bytes"))?;
            if versions.insert(version, Zeroizing::new(key)).is_some() {
                return Err(bad("duplicate version"));
            }
        }
        if versions.is_empty() {
            return Err(CryptoError::KeyFile("no key in the key file".into()));
        }
        Ok(LocalKeyProvider { versions })
    }

    /// The key file's text (secret: the caller writes it with mode 0600).
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut s = String::from("# Valv key-encryption keys. Secret: keep mode 0600, back up separately from the data.\n");
        for (v, k) in &self.versions {
            s.push_str(&format!("{LINE_TAG} {v} {}\n", crate::hex::encode(&k[..])));
        }
        Zeroizing::new(s)
    }

    /// Adds a new KEK version (rotation) from caller-supplied randomness; returns its number.
    pub fn rotate(&mut self, random: [u8; 32]) -> u32 {
        let next = self.current_version() + 1;
        self.versions.insert(next, Zeroizing::new(random));
        next
    }

    pub fn versions(&self) -> Vec<u32> {
        self.versions.keys().copied().collect()
    }
}

impl KeyProvider for LocalKeyProvider {
    fn name(&self) -> &str {
        "file"
    }

    fn current_version(&self) -> u32 {
        self.versions.keys().next_back().copied().unwrap_or(0)
    }

    fn wrap(&self, key: &DataKey, context: &str, nonce: [u8; 12]) -> Result<WrappedKey, CryptoError> {
        let version = self.current_version();
        let kek = self.versions.get(&version).ok_or_else(|| CryptoError::UnknownKek { provider: "file".into(), version })?;
        Ok(WrappedKey {
            provider: self.name().to_string(),
            kek_version: version,
            ciphertext: seal_raw(kek, nonce, &wrap_aad(context, version), key.expose()),
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, CryptoError> {
        let unknown = || CryptoError::UnknownKek { provider: wrapped.provider.clone(), version: wrapped.kek_version };
        if wrapped.provider != self.name() {
            return Err(unknown());
        }
        let kek = self.versions.get(&wrapped.kek_version).ok_or_else(unknown)?;
        let plain = Zeroizing::new(open_raw(kek, &wrap_aad(context, wrapped.kek_version), &wrapped.ciphertext)?);
        let bytes: [u8; 32] = plain.as_slice().try_into().map_err(|_| CryptoError::Malformed("a data key is 32 bytes"))?;
        Ok(DataKey::from_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_rotation() {
        let mut p = LocalKeyProvider::generate([9; 32]);
        let dk = DataKey::from_bytes([5; 32]);
        let w1 = p.wrap(&dk, "patient:1", [1; 12]).expect("wrap");
        assert_eq!(w1.kek_version, 1);
        assert_eq!(p.rotate([8; 32]), 2);
        let w2 = p.wrap(&dk, "patient:1", [2; 12]).expect("wrap");
        assert_eq!(w2.kek_version, 2);
        for w in [&w1, &w2] {
            assert_eq!(p.unwrap(w, "patient:1").expect("unwrap").expose(), dk.expose());
            assert!(p.unwrap(w, "patient:2").is_err(), "context is bound");
        }
        let reparsed = LocalKeyProvider::parse(&p.to_file_text()).expect("parse");
        assert_eq!(reparsed.versions(), vec![1, 2]);
        assert!(reparsed.unwrap(&w1, "patient:1").is_ok());
    }

    #[test]
    fn bad_files() {
        for t in ["", "valv-kek-v1 1 abcd", "nope 1 00", "valv-kek-v1 x 00"] {
            assert!(LocalKeyProvider::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn debug_redacts() {
        assert_eq!(format!("{:?}", DataKey::from_bytes([1; 32])), "DataKey(<redacted>)");
    }
}
