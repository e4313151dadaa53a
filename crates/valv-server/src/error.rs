//! The server's one error type, mapped once to an HTTP status and a FHIR OperationOutcome.

use hyper::StatusCode;
use valv_fhir::outcome::{operation_outcome, Severity};
use valv_fhir::{FhirError, IssueCode};
use valv_store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// R4 IssueType code.
    pub code: &'static str,
    pub diagnostics: String,
    /// Whether an audit entry already records this failure (so it is recorded exactly once).
    pub audited: bool,
    /// Seconds for a Retry-After header (429, 503).
    pub retry_after: Option<u64>,
    /// The full length for a 416's `Content-Range: bytes */{length}`.
    pub range_of: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> Self {
        ApiError { status, code, diagnostics: diagnostics.into(), audited: false, retry_after: None, range_of: None }
    }
    pub fn bad_request(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", d)
    }
    pub fn unauthorized(d: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "login", d)
    }
    pub fn forbidden(d: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", d)
    }
    pub fn method_not_allowed(d: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", d)
    }
    pub fn unavailable(d: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "transient", d)
    }
    pub fn internal(d: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", d)
    }

    pub fn retry_after(self, seconds: u64) -> Self {
        ApiError { retry_after: Some(seconds), ..self }
    }

    pub fn recorded(self) -> Self {
        ApiError { audited: true, ..self }
    }

    pub fn outcome(&self) -> serde_json::Value {
        operation_outcome(Severity::Error, self.code, &self.diagnostics)
    }
}

impl From<FhirError> for ApiError {
    fn from(e: FhirError) -> Self {
        match e.code {
            IssueCode::Structure => ApiError::new(StatusCode::BAD_REQUEST, "structure", e.message),
            IssueCode::Invalid => ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.message),
            IssueCode::NotSupported => ApiError::new(StatusCode::BAD_REQUEST, "not-supported", e.message),
            IssueCode::Processing => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "processing", e.message),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} is not known")),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::PreconditionFailed(m) => ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", m),
            StoreError::Matched(m) => ApiError::new(StatusCode::PRECONDITION_FAILED, "duplicate", format!("a resource matching the condition was written meanwhile ({m}); nothing was created")),
            StoreError::NotAllowed(m) => ApiError::method_not_allowed(m),
            StoreError::Invalid(f) => f.into(),
            StoreError::Gone(m) => ApiError::new(StatusCode::GONE, "deleted", m),
            StoreError::Integrity(m) => {
                tracing::error!(error = %m, "integrity failure");
                ApiError::internal("stored data failed its integrity check; the incident has been logged")
            }
            StoreError::Key(k) => {
                tracing::error!(error = %k, "key provider failure");
                ApiError::unavailable("the key provider could not supply a key")
            }
            // Only after two fresh reads of the key each lost to another rotation: try again.
            StoreError::KeyChanged(_) => ApiError::unavailable("a data key was being rotated; try again"),
            StoreError::Backend(m) => {
                tracing::error!(error = %m, "storage failure");
                ApiError::unavailable("storage is unavailable")
            }
        }
    }
}
