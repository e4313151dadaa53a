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

use crate::entry::{write_string, MAX_SAFE_INTEGER};
use crate::{AuditError, Hash};
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

impl Outcome {
    /// The name an entry carries (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// An integer an ECMAScript number holds exactly (what RFC 8785 can write), else an error.
fn exact_integer(n: i64) -> Result<i64, AuditError> {
    if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&n) {
        Ok(n)
    } else {
        Err(AuditError::UnsupportedNumber(n.to_string()))
    }
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
    ///
    /// Written member by member in the canonical (sorted) order rather than through a
    /// `serde_json::Value` and [`crate::canonical_json`] — every audited request makes one, and
    /// the tree and its sort were 6% of a read's CPU. The same bytes: a property test compares
    /// the two.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, AuditError> {
        let mut out = String::with_capacity(512);
        out.push('{');
        let member = |name: &str, out: &mut String| {
            if out.len() > 1 {
                out.push(',');
            }
            out.push('"');
            out.push_str(name);
            out.push_str("\":");
        };
        let text = |out: &mut String, s: Option<&str>| match s {
            Some(s) => write_string(out, s),
            None => out.push_str("null"),
        };
        member("action", &mut out);
        write_string(&mut out, self.action);
        member("agent_id", &mut out);
        write_string(&mut out, &self.agent_id);
        member("agent_name", &mut out);
        write_string(&mut out, &self.agent_name);
        member("event_id", &mut out);
        write_string(&mut out, &self.event_id);
        member("interaction", &mut out);
        write_string(&mut out, self.interaction);
        member("outcome", &mut out);
        write_string(&mut out, self.outcome.as_str());
        member("patient", &mut out);
        text(&mut out, self.patient.as_deref());
        member("purpose_of_use", &mut out);
        text(&mut out, self.purpose_of_use.as_deref());
        member("query_sha256", &mut out);
        text(&mut out, self.query.as_ref().map(SaltedQuery::commitment).as_deref());
        member("reason", &mut out);
        write_string(&mut out, &self.reason);
        member("request_id", &mut out);
        write_string(&mut out, &self.request_id);
        member("resource_id", &mut out);
        text(&mut out, self.resource_id.as_deref());
        member("resource_type", &mut out);
        text(&mut out, self.resource_type.as_deref());
        member("roles", &mut out);
        out.push('[');
        for (i, role) in self.roles.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_string(&mut out, role);
        }
        out.push(']');
        member("source_address", &mut out);
        write_string(&mut out, &self.source_address);
        member("status", &mut out);
        out.push_str(&self.status.to_string());
        member("time", &mut out);
        out.push_str(&exact_integer(self.time)?.to_string());
        member("version", &mut out);
        match self.version {
            Some(v) => out.push_str(&exact_integer(i64::try_from(v).map_err(|_| AuditError::UnsupportedNumber(v.to_string()))?)?.to_string()),
            None => out.push_str("null"),
        }
        out.push('}');
        Ok(out.into_bytes())
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

    /// The bytes as the generic path writes them: the entry as a `serde_json::Value`, then
    /// RFC 8785 over it.
    fn through_a_tree(e: &AuditEvent) -> Result<Vec<u8>, AuditError> {
        let value = serde_json::to_value(e).map_err(|err| AuditError::Entry(err.to_string()))?;
        Ok(crate::canonical_json(&value)?.into_bytes())
    }

    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        // Any characters, controls and quotes among them: the escapes must agree too.
        proptest::string::string_regex("(.|[\\x00-\\x1f\"\\\\\u{7f}\u{2028}é😀]){0,12}").expect("regex")
    }

    proptest::proptest! {
        #[test]
        fn written_directly_the_bytes_are_those_of_the_generic_canonical_json(
            strings in proptest::collection::vec(text(), 7),
            optional in proptest::collection::vec(proptest::option::of(text()), 4),
            roles in proptest::collection::vec(text(), 0..3),
            time in proptest::prop_oneof![-MAX_SAFE_INTEGER - 2..=-MAX_SAFE_INTEGER + 2, 0..=MAX_SAFE_INTEGER + 2],
            version in proptest::option::of(proptest::prop_oneof![0..100u64, (MAX_SAFE_INTEGER as u64 - 2)..=(MAX_SAFE_INTEGER as u64 + 2), proptest::num::u64::ANY]),
            status: u16,
            outcome in proptest::sample::select(vec![Outcome::Success, Outcome::Denied, Outcome::Error]),
            action in proptest::sample::select(vec!["C", "R", "U", "D", "E"]),
            query in proptest::option::of((proptest::array::uniform16(proptest::num::u8::ANY), text())),
        ) {
            let e = AuditEvent {
                event_id: strings[0].clone(), time, request_id: strings[1].clone(), action, interaction: "search-type", outcome, status,
                agent_id: strings[2].clone(), agent_name: strings[3].clone(), roles, source_address: strings[4].clone(),
                purpose_of_use: optional[0].clone(), patient: optional[1].clone(), resource_type: optional[2].clone(), resource_id: optional[3].clone(),
                version, query: query.map(|(salt, q)| SaltedQuery::new(salt, q)), reason: strings[5].clone(),
            };
            match (e.canonical_bytes(), through_a_tree(&e)) {
                (Ok(direct), Ok(tree)) => proptest::prop_assert_eq!(String::from_utf8_lossy(&direct), String::from_utf8_lossy(&tree)),
                (Err(_), Err(_)) => {}
                (direct, tree) => proptest::prop_assert!(false, "one failed: {:?} / {:?}", direct.map(String::from_utf8), tree.map(String::from_utf8)),
            }
        }
    }
}
