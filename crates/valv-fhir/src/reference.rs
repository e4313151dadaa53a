//! FHIR references: parsing `Type/id`, `Type/id/_history/v` and absolute URLs into a local form.

/// A reference to a resource held by this server: type and logical id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalRef {
    pub resource_type: String,
    pub id: String,
}

impl LocalRef {
    pub fn key(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}

/// Parses the `reference` string of a Reference into a local `Type/id`, accepting relative and
/// version-specific references. Absolute URLs, contained (`#x`) and `urn:` references give
/// `None`: a resource on another server must not decide whose key seals this one or match a
/// local patient's searches.
pub fn parse(reference: &str) -> Option<LocalRef> {
    if reference.starts_with('#') || reference.contains(':') {
        return None;
    }
    let path = reference.split(['?', '#']).next().unwrap_or(reference);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Strip a trailing `_history/{vid}`.
    let segments = match segments.as_slice() {
        [rest @ .., "_history", _] => rest,
        all => all,
    };
    match segments {
        [.., t, id] if crate::r4::is_resource_type(t) && crate::id::is_valid_id(id) => {
            Some(LocalRef { resource_type: (*t).to_string(), id: (*id).to_string() })
        }
        _ => None,
    }
}

/// Every `reference` string inside a JSON value, in document order (used to find compartments
/// and to rewrite `urn:uuid:` references in transactions).
pub fn collect_references<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("reference", serde_json::Value::String(s)) => out.push(s),
                    _ => collect_references(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let p = parse("Patient/123").expect("relative");
        assert_eq!(p.key(), "Patient/123");
        assert_eq!(parse("Patient/1/_history/2").map(|r| r.key()), Some("Patient/1".into()));
        assert_eq!(parse("https://other.example/fhir/Patient/1"), None, "another server's patient is not ours");
        assert_eq!(parse("#contained"), None);
        assert_eq!(parse("urn:uuid:1234"), None);
        assert_eq!(parse("NotAType/1"), None);
        assert_eq!(parse("Patient/bad id"), None);
    }
}
