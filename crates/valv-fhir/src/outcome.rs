//! OperationOutcome: the body of every error Valv returns over HTTP.

use serde_json::{json, Value};

/// R4 `IssueSeverity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// An OperationOutcome with one issue. `code` is an R4 `IssueType` code (`structure`, `invalid`,
/// `not-found`, `conflict`, `security`, `login`, `too-costly`, `exception`, …).
pub fn operation_outcome(severity: Severity, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity.as_str(), "code": code, "diagnostics": diagnostics }]
    })
}

/// An outcome reporting success (for deletes and batch entries).
pub fn success(diagnostics: &str) -> Value {
    operation_outcome(Severity::Information, "informational", diagnostics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let o = operation_outcome(Severity::Error, "not-found", "Patient/x is not known");
        assert_eq!(o["resourceType"], "OperationOutcome");
        assert_eq!(o["issue"][0]["code"], "not-found");
        assert_eq!(o["issue"][0]["severity"], "error");
        assert_eq!(o["issue"][0]["diagnostics"], "Patient/x is not known");
    }
}
