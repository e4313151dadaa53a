//! Accounts: the roles a person or service may hold and the states an account can be in.

use serde::{Deserialize, Serialize};

/// Every role Valv knows. The policy gives them meaning; identity only records them.
pub const ROLES: &[&str] = &["physician", "nurse", "assistant", "external_specialist", "registrar", "patient", "support", "admin", "auditor", "service"];

/// Roles whose holders can see patient data: their logins always need a second factor.
pub const PATIENT_DATA_ROLES: &[&str] = &["physician", "nurse", "assistant", "external_specialist", "registrar", "patient", "support"];

pub type Role = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserState {
    /// Created, password and second factor not yet set (holds an enrollment token).
    Pending,
    Active,
    /// Disabled by an admin: no login, sessions revoked.
    Disabled,
}

impl UserState {
    pub fn as_str(self) -> &'static str {
        match self {
            UserState::Pending => "pending",
            UserState::Active => "active",
            UserState::Disabled => "disabled",
        }
    }
}

/// Checks a role list: known roles, at least one, no repeats.
pub fn check_roles(roles: &[String]) -> Result<(), String> {
    if roles.is_empty() {
        return Err("a user needs at least one role".into());
    }
    for (i, r) in roles.iter().enumerate() {
        if !ROLES.contains(&r.as_str()) {
            return Err(format!("'{r}' is not a role (one of: {})", ROLES.join(", ")));
        }
        if roles[..i].contains(r) {
            return Err(format!("role '{r}' is given twice"));
        }
    }
    Ok(())
}

/// Whether a login with these roles must present a second factor.
pub fn mfa_required(roles: &[String], mfa_for_all: bool) -> bool {
    mfa_for_all || roles.iter().any(|r| PATIENT_DATA_ROLES.contains(&r.as_str()))
}

/// A user name: 3 to 64 characters of lower-case letters, digits, `.`, `-`, `_` and `@`,
/// starting with a letter or digit. Lower case only, so two accounts never differ by case.
pub fn check_username(name: &str) -> Result<(), String> {
    let ok_len = (3..=64).contains(&name.len());
    let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-@".contains(&b));
    let ok_start = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok_len && ok_chars && ok_start {
        Ok(())
    } else {
        Err("a user name is 3 to 64 characters of lower-case letters, digits, '.', '-', '_' and '@', starting with a letter or digit".into())
    }
}

/// A care unit name: 1 to 64 characters of letters, digits, `.`, `-`, `_` and `:`.
pub fn check_unit(unit: &str) -> Result<(), String> {
    if (1..=64).contains(&unit.len()) && unit.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b)) {
        Ok(())
    } else {
        Err(format!("'{unit}' is not a care unit name (1 to 64 letters, digits, '.', '-', '_', ':')"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["anna.berg", "nurse-12", "a_b", "x@clinic.se", "007"] {
            assert!(check_username(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "Anna", ".anna", "anna berg", "anna;drop", &"a".repeat(65), "ännа"] {
            assert!(check_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles() {
        assert!(check_roles(&["physician".into()]).is_ok());
        assert!(check_roles(&[]).is_err());
        assert!(check_roles(&["root".into()]).expect_err("unknown role").contains("not a role"));
        assert!(check_roles(&["nurse".into(), "nurse".into()]).expect_err("repeated role").contains("twice"));
    }

    #[test]
    fn mfa_for_patient_data_roles() {
        assert!(mfa_required(&["nurse".into()], false));
        assert!(mfa_required(&["patient".into()], false));
        assert!(!mfa_required(&["admin".into()], false));
        assert!(mfa_required(&["admin".into()], true));
    }
}
