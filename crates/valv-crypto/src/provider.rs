//! Key providers hold the key-encryption keys (KEKs) and wrap and unwrap data keys with them.
//!
//! This version has the local key-file provider; PKCS#11, cloud KMS and Vault transit providers
//! implement the same trait. Rotation adds a KEK version: new wraps use the newest version, old
//! wrapped keys stay readable until they are re-wrapped, and a version is retired (destroyed)
//! only once no wrapped key names it. Every wrapped key records provider, KEK id and version.

use crate::aead::{open_raw, seal_raw};
use crate::{CryptoError, DataKey, WrappedKey};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

pub trait KeyProvider: Send + Sync {
    /// The provider's name as stored beside wrapped keys (e.g. `file`).
    fn name(&self) -> &str;
    /// Which of the provider's KEKs this is, as stored beside wrapped keys.
    fn kek_id(&self) -> String;
    /// The KEK version new wraps use.
    fn current_version(&self) -> u32;
    /// Every KEK version the provider holds, oldest first.
    fn versions(&self) -> Vec<u32>;
    /// Takes in KEK versions added or retired outside this process since it last looked (a
    /// provider that cannot change under it has nothing to do).
    fn refresh(&self) {}
    /// How many wraps and unwraps may usefully be in flight at once: one for a provider in this
    /// process or on a local token, more for one across a network (a rewrap then runs that many).
    fn concurrency(&self) -> usize {
        1
    }
    /// Whether `wrapped` is under this provider's current KEK version (else a rewrap moves it).
    fn is_current(&self, wrapped: &WrappedKey) -> bool {
        wrapped.provider == self.name() && wrapped.kek_id == self.kek_id() && wrapped.kek_version == self.current_version()
    }
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
    /// Fixed when the file is created (a `valv-kek-id` line; files from before it have none and
    /// take their fingerprint), kept when versions are added or retired.
    id: String,
}

const LINE_TAG: &str = "valv-kek-v1";
const ID_TAG: &str = "valv-kek-id";

/// The additional data every provider binds a wrapped key to: its name and the KEK version (so
/// a wrapped key opens only under its own name and version, whichever provider holds the KEK).
pub fn wrap_aad(context: &str, version: u32) -> Vec<u8> {
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
        let mut p = LocalKeyProvider { versions, id: String::new() };
        p.id = p.fingerprint();
        p
    }

    /// Parses the key file's text.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let mut versions = BTreeMap::new();
        let mut id = None;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
            let bad = |why: &str| CryptoError::KeyFile(format!("line {}: {why}", n + 1));
            let mut f = line.split_whitespace();
            match f.next() {
                Some(LINE_TAG) => {}
                Some(ID_TAG) => {
                    let value = f.next().filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
                    if id.replace(value.ok_or_else(|| bad("bad KEK id"))?.to_string()).is_some() {
                        return Err(bad("duplicate KEK id"));
                    }
                    continue;
                }
                _ => return Err(bad("expected 'valv-kek-v1 <version> <hex key>'")),
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
        let mut p = LocalKeyProvider { versions, id: String::new() };
        p.id = id.unwrap_or_else(|| p.fingerprint());
        Ok(p)
    }

    /// The KEK id: a fingerprint of the file's oldest version (domain-separated SHA-256, 8 bytes),
    /// so keys wrapped under another key file are told apart; it stays the same across
    /// rotations, and once the oldest version is retired the id lives on in the file.
    fn fingerprint(&self) -> String {
        use sha2::Digest;
        let oldest = self.versions.values().next().map(|k| &k[..]).unwrap_or(&[]);
        let digest = sha2::Sha256::new().chain_update(b"valv kek id\x00").chain_update(oldest).finalize();
        format!("file-{}", crate::hex::encode(&digest[..8]))
    }

    /// The key file's text (secret: the caller writes it with mode 0600).
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let mut s = String::from("# Valv key-encryption keys. Secret: keep mode 0600, back up separately from the data.\n");
        s.push_str(&format!("{ID_TAG} {}\n", self.id));
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

    /// Destroys a KEK version. The current version cannot be retired; whether a wrapped key
    /// still needs `version` is the caller's check (this type sees no wrapped keys).
    pub fn retire(&mut self, version: u32) -> Result<(), CryptoError> {
        if version == self.current_version() {
            return Err(CryptoError::KeyFile(format!("version {version} is the current KEK version; rotate first")));
        }
        self.versions.remove(&version).map(|_| ()).ok_or_else(|| CryptoError::KeyFile(format!("there is no KEK version {version}")))
    }
}

impl KeyProvider for LocalKeyProvider {
    fn name(&self) -> &str {
        "file"
    }

    fn kek_id(&self) -> String {
        self.id.clone()
    }

    fn current_version(&self) -> u32 {
        self.versions.keys().next_back().copied().unwrap_or(0)
    }

    fn versions(&self) -> Vec<u32> {
        self.versions.keys().copied().collect()
    }

    fn wrap(&self, key: &DataKey, context: &str, nonce: [u8; 12]) -> Result<WrappedKey, CryptoError> {
        let version = self.current_version();
        let kek = self.versions.get(&version).ok_or_else(|| CryptoError::UnknownKek { provider: "file".into(), kek_id: self.id.clone(), version })?;
        Ok(WrappedKey {
            provider: self.name().to_string(),
            kek_id: self.id.clone(),
            kek_version: version,
            ciphertext: seal_raw(kek, nonce, &wrap_aad(context, version), key.expose()),
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, CryptoError> {
        let unknown = || CryptoError::UnknownKek { provider: wrapped.provider.clone(), kek_id: wrapped.kek_id.clone(), version: wrapped.kek_version };
        if wrapped.provider != self.name() || !(wrapped.kek_id == self.id || wrapped.kek_id.is_empty()) {
            return Err(unknown());
        }
        let kek = self.versions.get(&wrapped.kek_version).ok_or_else(unknown)?;
        let plain = Zeroizing::new(open_raw(kek, &wrap_aad(context, wrapped.kek_version), &wrapped.ciphertext)?);
        DataKey::from_slice(&plain)
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
        assert!(p.is_current(&w2) && !p.is_current(&w1));
    }

    #[test]
    fn the_kek_id_survives_rotation_and_retirement_and_tells_files_apart() {
        let mut p = LocalKeyProvider::generate([9; 32]);
        let id = p.kek_id();
        assert!(id.starts_with("file-") && id.len() == 21, "{id}");
        assert_ne!(LocalKeyProvider::generate([7; 32]).kek_id(), id);
        p.rotate([8; 32]);
        let w2 = p.wrap(&DataKey::from_bytes([5; 32]), "k", [3; 12]).expect("wrap");
        assert!(p.retire(2).is_err(), "the current version stays");
        p.retire(1).expect("retire");
        assert!(p.retire(1).is_err(), "already gone");
        let reparsed = LocalKeyProvider::parse(&p.to_file_text()).expect("parse");
        assert_eq!((reparsed.kek_id(), reparsed.versions()), (id, vec![2]));
        assert!(reparsed.unwrap(&w2, "k").is_ok());
        // A key wrapped under another file's KEK (same version number) is not this one's.
        let other = LocalKeyProvider::generate([7; 32]);
        let foreign = other.wrap(&DataKey::from_bytes([5; 32]), "k", [4; 12]).expect("wrap");
        assert!(matches!(reparsed.unwrap(&WrappedKey { kek_version: 2, ..foreign }, "k"), Err(CryptoError::UnknownKek { .. })));
    }

    #[test]
    fn keys_wrapped_before_kek_ids_read_as_the_files_own() {
        let p = LocalKeyProvider::generate([9; 32]);
        let w = p.wrap(&DataKey::from_bytes([5; 32]), "k", [3; 12]).expect("wrap");
        let legacy = WrappedKey { kek_id: String::new(), ..w };
        assert!(p.unwrap(&legacy, "k").is_ok());
        assert!(!p.is_current(&legacy), "a rewrap records the id");
        // A file from before the id line takes its fingerprint.
        let text = p.to_file_text().lines().filter(|l| !l.starts_with("valv-kek-id")).collect::<Vec<_>>().join("\n");
        assert_eq!(LocalKeyProvider::parse(&text).expect("parse").kek_id(), p.kek_id());
    }

    #[test]
    fn bad_files() {
        for t in ["", "valv-kek-v1 1 abcd", "nope 1 00", "valv-kek-v1 x 00", "valv-kek-id\nvalv-kek-v1 1 0000000000000000000000000000000000000000000000000000000000000000", "valv-kek-id a/b"] {
            assert!(LocalKeyProvider::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn debug_redacts() {
        assert_eq!(format!("{:?}", DataKey::from_bytes([1; 32])), "DataKey(<redacted>)");
    }
}
