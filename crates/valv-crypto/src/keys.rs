//! Data keys and their wrapped form.

use zeroize::Zeroizing;

/// A 256-bit symmetric data key. Its bytes are zeroized when it is dropped and never printed.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// A data key from 32 bytes of fresh randomness supplied by the caller.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DataKey(Zeroizing::new(bytes))
    }
    /// A data key from unwrapped bytes, which must be exactly 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, crate::CryptoError> {
        let key: [u8; 32] = bytes.try_into().map_err(|_| crate::CryptoError::Malformed("a data key is 32 bytes"))?;
        Ok(DataKey::from_bytes(key))
    }
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A data key encrypted under a key-encryption key of a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Which provider wrapped it (e.g. `file`).
    pub provider: String,
    /// Which KEK of the provider (for `file`, a fingerprint of the key file's first version);
    /// empty for keys wrapped before KEK ids were recorded (read as the provider's own KEK).
    pub kek_id: String,
    /// Which version of that KEK: a rewrap moves a key to the current version, and a version is
    /// retired only once no key names it.
    pub kek_version: u32,
    /// nonce || ciphertext || tag.
    pub ciphertext: Vec<u8>,
}
