//! SMART App Launch scopes (v2 `patient/Observation.rs`, `system/*.cruds`; v1 `user/*.read`).
//! A token's scopes narrow what the role allows; for service accounts they are the whole grant.
//! Scopes with a query (`?category=…`) cannot be checked from the resource type alone and grant
//! nothing; `openid`, `launch`, `offline_access` and the like carry no resource access.

use crate::Action;

/// Whose data a scope speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `patient/`: the record of the patient the token is for.
    Patient,
    /// `user/`: whatever the signed-in person may see.
    User,
    /// `system/`: a service acting for itself.
    System,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    context: Context,
    /// `None` for `*`.
    resource_type: Option<String>,
    /// Subset of `cruds`.
    perms: String,
}

/// The resource scopes of one token or API key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// Parses a space-separated scope string. Resource scopes that are malformed are an error
    /// (an operator typing `system/*.crud` should hear of it); non-resource scopes are skipped.
    pub fn parse(text: &str) -> Result<Scopes, String> {
        let mut out = Vec::new();
        for word in text.split_whitespace() {
            let Some((ctx, rest)) = word.split_once('/') else { continue };
            let context = match ctx {
                "patient" => Context::Patient,
                "user" => Context::User,
                "system" => Context::System,
                _ => continue,
            };
            let (ty, perms) = rest.rsplit_once('.').ok_or_else(|| format!("scope '{word}' has no permissions after a '.'"))?;
            if perms.contains('?') {
                continue;
            }
            let perms = match perms {
                "read" => "rs".to_string(),
                "write" => "cud".to_string(),
                "*" => "cruds".to_string(),
                p if !p.is_empty() && is_ordered_subset(p) => p.to_string(),
                p => return Err(format!("scope '{word}': '{p}' is not a subset of 'cruds' in that order")),
            };
            let resource_type = match ty {
                "*" => None,
                t if valv_fhir::r4::is_resource_type(t) => Some(t.to_string()),
                t => return Err(format!("scope '{word}': '{t}' is not a FHIR R4 resource type")),
            };
            out.push(Scope { context, resource_type, perms });
        }
        Ok(Scopes(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a scope in one of `contexts` covers `action` on `resource_type`.
    pub fn allows(&self, contexts: &[Context], resource_type: &str, action: Action) -> bool {
        let letter = action.scope_letter();
        self.0.iter().any(|s| {
            contexts.contains(&s.context) && s.resource_type.as_deref().is_none_or(|t| t == resource_type) && s.perms.contains(letter)
        })
    }

    /// As [`Scopes::allows`], counting only scopes that name `resource_type` itself (not `*`):
    /// what changing an access fact asks of a service.
    pub fn allows_explicitly(&self, contexts: &[Context], resource_type: &str, action: Action) -> bool {
        let letter = action.scope_letter();
        self.0.iter().any(|s| contexts.contains(&s.context) && s.resource_type.as_deref() == Some(resource_type) && s.perms.contains(letter))
    }

    /// The scopes written back in canonical v2 form.
    pub fn to_text(&self) -> String {
        let words: Vec<String> = self
            .0
            .iter()
            .map(|s| {
                let ctx = match s.context {
                    Context::Patient => "patient",
                    Context::User => "user",
                    Context::System => "system",
                };
                format!("{ctx}/{}.{}", s.resource_type.as_deref().unwrap_or("*"), s.perms)
            })
            .collect();
        words.join(" ")
    }
}

fn is_ordered_subset(p: &str) -> bool {
    let mut rest = "cruds";
    for c in p.chars() {
        match rest.find(c) {
            Some(i) => rest = &rest[i + 1..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_and_v1_forms() {
        let s = Scopes::parse("openid fhirUser system/*.c user/Observation.rs patient/*.read").unwrap();
        assert!(s.allows(&[Context::System], "Patient", Action::Create));
        assert!(!s.allows(&[Context::System], "Patient", Action::Read));
        assert!(s.allows(&[Context::User], "Observation", Action::Search));
        assert!(!s.allows(&[Context::User], "Condition", Action::Read));
        assert!(s.allows(&[Context::Patient], "Condition", Action::History));
        assert!(!s.allows(&[Context::Patient], "Condition", Action::Update));
        assert_eq!(s.to_text(), "system/*.c user/Observation.rs patient/*.rs");
    }

    #[test]
    fn malformed_resource_scopes_are_errors() {
        for bad in ["system/*.dc", "system/*.sc", "system/*.x", "user/Bogus.r", "system/Patient"] {
            assert!(Scopes::parse(bad).is_err(), "{bad}");
        }
        assert!(Scopes::parse("user/Observation.rs?category=laboratory").unwrap().is_empty());
    }
}
