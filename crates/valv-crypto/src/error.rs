//! The crate's one error type.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Authentication failed: wrong key, wrong context, or a tampered ciphertext.
    #[error("decryption failed: the ciphertext does not authenticate under this key and context")]
    Authentication,
    #[error("malformed ciphertext: {0}")]
    Malformed(&'static str),
    #[error("key-encryption key {provider}/{kek_id} version {version} is not available")]
    UnknownKek { provider: String, kek_id: String, version: u32 },
    #[error("key file: {0}")]
    KeyFile(String),
    /// A key provider outside the process (a token, a KMS) refused or did not answer.
    #[error("key provider: {0}")]
    Provider(String),
}
