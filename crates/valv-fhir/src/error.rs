//! The crate's one error type: a precise diagnostic plus the FHIR issue code it maps to.

/// The OperationOutcome issue code (and with it the HTTP status) a failure maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    /// Malformed or structurally invalid content (400).
    Structure,
    /// Content that is well formed but violates a rule (422).
    Processing,
    /// A feature Valv does not support (400 with `not-supported`).
    NotSupported,
    /// An invalid search or request parameter (400).
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FhirError {
    pub code: IssueCode,
    pub message: String,
}

impl FhirError {
    pub fn structure(message: impl Into<String>) -> Self {
        FhirError { code: IssueCode::Structure, message: message.into() }
    }
    pub fn processing(message: impl Into<String>) -> Self {
        FhirError { code: IssueCode::Processing, message: message.into() }
    }
    pub fn not_supported(message: impl Into<String>) -> Self {
        FhirError { code: IssueCode::NotSupported, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        FhirError { code: IssueCode::Invalid, message: message.into() }
    }
}
