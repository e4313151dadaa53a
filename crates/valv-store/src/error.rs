//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// A concurrent writer changed the resource, or it exists already.
    #[error("version conflict: {0}")]
    Conflict(String),
    /// A conditional create found a resource matching its condition when it committed.
    #[error("a resource matching the condition exists: {0}")]
    Matched(String),
    /// An If-Match version check failed.
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// The resource exists and update-as-create or a duplicate create was asked for.
    #[error("{0}")]
    NotAllowed(String),
    /// The patient's data was erased (their data key destroyed): nothing of theirs can be read
    /// or written again under their id.
    #[error("{0}")]
    Gone(String),
    /// Stored data failed to authenticate or parse: tampering or corruption.
    #[error("integrity failure: {0}")]
    Integrity(String),
    /// The patient data key a body was sealed with is no longer the stored one (another
    /// process rotated, rewrapped or destroyed it meanwhile): seal again with the stored key.
    #[error("the data key changed meanwhile: {0}")]
    KeyChanged(String),
    #[error("key provider: {0}")]
    Key(#[from] valv_crypto::CryptoError),
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("invalid: {0}")]
    Invalid(#[from] valv_fhir::FhirError),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}
