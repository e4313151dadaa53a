//! The access decision seam. Every FHIR request asks [`decide`] before anything is read or
//! written, and the decision (with its reason) goes into the audit entry.
//!
//! This version's rule is role-based only: `admin` and `service` API keys may use the whole FHIR
//! API; every other role is denied. The need-to-know policy (care relationships, consent, blocks,
//! break-glass) replaces this function's body with the `valv-policy` crate; callers do not change.

use crate::auth::Principal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Search,
    History,
}

impl Action {
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read | Action::History => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Search => "E",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub permit: bool,
    /// Which rule decided.
    pub reason: String,
}

/// Decides whether `principal` may perform `action` on a resource of `resource_type` in
/// `patient`'s compartment (`None`: outside any compartment, or a type-level search).
pub fn decide(principal: &Principal, action: Action, resource_type: &str, patient: Option<&str>) -> Decision {
    let _ = (action, patient);
    // The audit log is read by auditors and admins only, and never written through the API.
    if resource_type == "AuditEvent" {
        return match principal.roles.iter().find(|r| r.as_str() == "admin" || r.as_str() == "auditor") {
            Some(role) if matches!(action, Action::Read | Action::Search) => Decision { permit: true, reason: format!("role-{role}-audit-reader") },
            _ => Decision { permit: false, reason: "audit-log-needs-auditor-or-admin".into() },
        };
    }
    if let Some(role) = principal.roles.iter().find(|r| r.as_str() == "admin" || r.as_str() == "service") {
        Decision { permit: true, reason: format!("role-{role}-full-access") }
    } else {
        Decision { permit: false, reason: "no-role-permits".into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::PrincipalKind;

    fn p(role: &str) -> Principal {
        Principal { kind: PrincipalKind::Service, id: "k".into(), name: "k".into(), roles: vec![role.into()], units: vec![], mfa: false }
    }

    #[test]
    fn only_admin_and_service() {
        assert!(decide(&p("service"), Action::Read, "Patient", Some("x")).permit);
        assert!(decide(&p("admin"), Action::Delete, "Observation", None).permit);
        let d = decide(&p("nurse"), Action::Read, "Patient", Some("x"));
        assert!(!d.permit);
        assert_eq!(d.reason, "no-role-permits");
        assert!(!decide(&p("auditor"), Action::Read, "Patient", Some("x")).permit, "auditors see no clinical data");
    }

    #[test]
    fn audit_log_is_for_auditors_and_admins() {
        assert!(decide(&p("auditor"), Action::Search, "AuditEvent", None).permit);
        assert!(decide(&p("admin"), Action::Read, "AuditEvent", None).permit);
        assert!(!decide(&p("service"), Action::Search, "AuditEvent", None).permit);
        assert!(!decide(&p("auditor"), Action::Delete, "AuditEvent", None).permit);
    }
}
