//! The audit entry: IHE Basic Audit Log Patterns fields for one access attempt to one patient's
//! data (or to no patient's, for searches that matched none and for authentication), and its
//! canonical bytes. Entries never hold resource content: ids, codes, the query and the reason.

use crate::{canonical_json, AuditError, Hash};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Denied,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEvent {
    /// Random 128-bit id (hex), so an entry's hash cannot be guessed from its other fields.
    pub event_id: String,
    /// Milliseconds since the Unix epoch.
    pub time: i64,
    pub request_id: String,
    /// C, R, U, D or E (BALP / AuditEvent.action).
    pub action: &'static str,
    /// read, vread, search-type, create, update, delete, history, request, authenticate.
    pub interaction: &'static str,
    pub outcome: Outcome,
    /// The HTTP status answered (0 when recorded before the act).
    pub status: u16,
    pub agent_id: String,
    pub agent_name: String,
    pub roles: Vec<String>,
    pub source_address: String,
    pub purpose_of_use: Option<String>,
    pub patient: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub version: Option<u64>,
    pub query: Option<String>,
    /// The policy rule that decided, or why the request failed.
    pub reason: String,
}

impl AuditEvent {
    /// RFC 8785 canonical JSON of the entry: the bytes its leaf hash is computed over.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, AuditError> {
        let value = serde_json::to_value(self).map_err(|e| AuditError::Entry(e.to_string()))?;
        Ok(canonical_json(&value)?.into_bytes())
    }

    /// The entry's canonical bytes and its Merkle leaf hash.
    pub fn leaf(&self) -> Result<(Vec<u8>, Hash), AuditError> {
        let bytes = self.canonical_bytes()?;
        let hash = crate::merkle::leaf_hash(&bytes);
        Ok((bytes, hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> AuditEvent {
        AuditEvent {
            event_id: "00112233445566778899aabbccddeeff".into(),
            time: 1_700_000_000_000,
            request_id: "r1".into(),
            action: "R",
            interaction: "read",
            outcome: Outcome::Success,
            status: 200,
            agent_id: "k1".into(),
            agent_name: "importer".into(),
            roles: vec!["service".into()],
            source_address: "127.0.0.1".into(),
            purpose_of_use: None,
            patient: Some("p1".into()),
            resource_type: Some("Observation".into()),
            resource_id: Some("o1".into()),
            version: Some(2),
            query: None,
            reason: "role-service-full-access".into(),
        }
    }

    #[test]
    fn canonical_bytes_are_sorted_and_compact() {
        let bytes = event().canonical_bytes().expect("canonical");
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.starts_with("{\"action\":\"R\",\"agent_id\":\"k1\","), "{text}");
        assert!(!text.contains(' '));
        assert!(text.contains("\"outcome\":\"success\""));
    }

    #[test]
    fn any_field_changes_the_leaf() {
        let (_, a) = event().leaf().expect("leaf");
        let mut e = event();
        e.patient = Some("p2".into());
        let (_, b) = e.leaf().expect("leaf");
        assert_ne!(a, b);
    }
}
