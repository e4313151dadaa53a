//! The audit entry: IHE Basic Audit Log Patterns fields for one access attempt to one patient's
//! data (or to no patient's, for searches that matched none and for authentication), and its
//! canonical bytes. Entries never hold resource content: ids, codes, the reason, and of a search
//! query only a salted hash of it ([`SaltedQuery`]).
//!
//! Why the query is not in the entry: an entry is shown to the patient it names (their access
//! log), and a search's query can name other patients (`identifier=…|194511239917,…`,
//! `family=…`). The entry therefore commits to the query by `query_sha256` = SHA-256(salt ||
//! query) with a random 128-bit salt (so a guessed personnummer cannot be confirmed against the
//! hash), and the query with its salt is kept beside the entry for auditors, who can check it
//! against the commitment. Entries written before this change carry the query itself under
//! `query`; their bytes are what their leaf hash covers, so they stay as they are.

use crate::{canonical_json, AuditError, Hash};
use serde::{Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A search query and the random salt its commitment is made with. Only the commitment is part
/// of an entry's canonical bytes; the text and salt are sealed separately by the caller.
#[derive(Clone, PartialEq, Eq)]
pub struct SaltedQuery {
    pub salt: [u8; 16],
    pub text: String,
}

impl std::fmt::Debug for SaltedQuery {
    /// The text can name patients: it stays out of debug output (and so out of logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaltedQuery").field("commitment", &self.commitment()).finish_non_exhaustive()
    }
}

impl SaltedQuery {
    /// The salt comes from the caller (this crate draws no randomness).
    pub fn new(salt: [u8; 16], text: impl Into<String>) -> Self {
        SaltedQuery { salt, text: text.into() }
    }

    /// `query_sha256`: lowercase hex of SHA-256(salt || query bytes).
    pub fn commitment(&self) -> String {
        query_commitment(&self.salt, &self.text)
    }

    /// Whether this query and salt are the ones an entry's `query_sha256` commits to.
    pub fn matches(&self, commitment: &str) -> bool {
        self.commitment() == commitment
    }
}

/// Lowercase hex of SHA-256(salt || query): what an entry's `query_sha256` holds.
pub fn query_commitment(salt: &[u8], query: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(query.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn serialize_commitment<S: Serializer>(q: &Option<SaltedQuery>, s: S) -> Result<S::Ok, S::Error> {
    match q {
        Some(q) => s.serialize_str(&q.commitment()),
        None => s.serialize_none(),
    }
}

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
    /// A search's query, written into the entry only as its commitment `query_sha256` (the field
    /// keeps the name `query` so that entries without one are still built with `query: None`).
    #[serde(rename = "query_sha256", serialize_with = "serialize_commitment")]
    pub query: Option<SaltedQuery>,
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
    fn the_query_is_committed_to_not_written() {
        let mut e = event();
        let q = SaltedQuery::new([7; 16], "identifier=urn:oid:1.2.752.129.2.1.3.1|194511239917&family=Canary");
        e.query = Some(q.clone());
        let text = String::from_utf8(e.canonical_bytes().expect("canonical")).expect("utf-8");
        assert!(!text.contains("194511239917") && !text.contains("Canary") && !text.contains("\"query\""), "{text}");
        let commitment = q.commitment();
        assert!(text.contains(&format!("\"query_sha256\":\"{commitment}\"")), "{text}");
        assert_eq!(commitment.len(), 64);
        // SHA-256 of the 16 salt bytes followed by the query, computed independently.
        let mut input = vec![7u8; 16];
        input.extend_from_slice(q.text.as_bytes());
        let want: String = Sha256::digest(&input).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(commitment, want);
        assert!(q.matches(&commitment));
        assert!(!SaltedQuery::new([8; 16], q.text.clone()).matches(&commitment), "another salt, another commitment");
        assert!(!SaltedQuery::new([7; 16], "family=Other").matches(&commitment), "another query, another commitment");
        assert!(!format!("{q:?}").contains("Canary"), "debug output leaves the query out");
        let bare = String::from_utf8(event().canonical_bytes().expect("canonical")).expect("utf-8");
        assert!(bare.contains("\"query_sha256\":null"), "{bare}");
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
