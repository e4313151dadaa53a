//! The audit seam: every FHIR request hands its entries to an [`AuditSink`] and waits until they
//! are durable before anything leaves the server. If the sink fails, the request fails with 503.
//!
//! [`StoreAuditLog`] seals each entry with the audit data key (AES-256-GCM, bound to the entry's
//! leaf hash) and appends it with its Merkle leaf hash to the store's append-only audit table,
//! through the store's group-commit writer (one fsync for many requests). The tree, signed
//! checkpoints and proofs are computed over those leaf hashes.
//!
//! A search's query is not part of the entry (the entry, shown to its patient, holds only the
//! salted hash `query_sha256`): the query and its salt are sealed apart, with the same key but
//! their own purpose and the entry's leaf hash bound as context, in the entry's row. Only
//! auditors are shown them ([`open_query`]); a record moved to another entry does not open.

pub mod api;
pub mod compact;
pub mod integrator;
pub mod log;
pub mod siem;
pub mod signing;

use async_trait::async_trait;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use valv_crypto::{Aad, Cipher, DataKey};
use valv_store::{AuditRow, Store};

pub use valv_audit::{AuditEvent, Outcome, SaltedQuery};

#[derive(Debug, thiserror::Error)]
#[error("audit log unavailable: {0}")]
pub struct AuditError(pub String);

#[async_trait]
pub trait AuditSink: Send + Sync {
    /// Returns once every entry is durable, or fails (and then the request must fail).
    async fn record(&self, events: Vec<AuditEvent>) -> Result<(), AuditError>;
    /// Whether an append failed within `window_ms` before `now_ms` (for readiness).
    fn failed_within(&self, now_ms: i64, window_ms: i64) -> bool;
}

pub struct StoreAuditLog {
    store: Arc<dyn Store>,
    cipher: Cipher,
    /// The blind-index key: entries carry their patient's token for the access-log index.
    blind: valv_crypto::BlindIndexKey,
    /// Fault injection for tests of the fail-closed path: every append fails.
    fail_appends: bool,
    /// When the last append failed (ms since the epoch), 0 if never.
    last_failure: AtomicI64,
}

fn aad_id(leaf: &[u8; 32]) -> valv_crypto::hex::Hex32 {
    valv_crypto::hex::encode_32(leaf)
}

/// The purpose bound into a sealed query record: distinct from the entry's, so neither opens as
/// the other.
const QUERY_PURPOSE: &str = "audit-query";

/// A query with a fresh random 128-bit salt, ready to be committed to in an entry.
pub fn salt_query(text: &str) -> Result<SaltedQuery, AuditError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AuditError(format!("no randomness: {e}")))?;
    Ok(SaltedQuery::new(salt, text))
}

/// Opens an entry's sealed query record: the salt and query its `query_sha256` commits to, or
/// `None` when the entry has none (no query, or written before queries were kept apart).
/// The caller checks the commitment against the entry; only auditors may be shown the result.
pub fn open_query(cipher: &Cipher, row: &AuditRow) -> Result<Option<SaltedQuery>, AuditError> {
    let Some(sealed) = &row.query_sealed else {
        return Ok(None);
    };
    let id = aad_id(&row.leaf_hash);
    let aad = Aad { purpose: QUERY_PURPOSE, resource_type: "", id: id.as_str(), version: 0, patient: "" };
    let mut bytes = sealed.clone();
    let plain = cipher.open_in_place(&aad, &mut bytes).map_err(|e| AuditError(format!("the query record does not open: {e}")))?;
    let (salt, text) = plain.split_first_chunk::<16>().ok_or_else(|| AuditError("the query record is too short".into()))?;
    let text = std::str::from_utf8(text).map_err(|_| AuditError("the query record is not UTF-8".into()))?;
    Ok(Some(SaltedQuery::new(*salt, text)))
}

impl StoreAuditLog {
    pub fn new(store: Arc<dyn Store>, key: DataKey, blind: valv_crypto::BlindIndexKey, fail_appends: bool) -> Self {
        StoreAuditLog { store, cipher: Cipher::new(&key), blind, fail_appends, last_failure: AtomicI64::new(0) }
    }

    fn seal(&self, event: &AuditEvent) -> Result<AuditRow, AuditError> {
        let (bytes, leaf_hash) = event.leaf().map_err(|e| AuditError(e.to_string()))?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| AuditError(format!("no randomness: {e}")))?;
        let id = aad_id(&leaf_hash);
        let aad = Aad { purpose: "audit", resource_type: "", id: id.as_str(), version: 0, patient: "" };
        let patient_token = event.patient.as_deref().map(|p| self.blind.token("AuditEvent", "patient", p));
        let query_sealed = match &event.query {
            Some(q) => Some(self.seal_query(q, &leaf_hash)?),
            None => None,
        };
        Ok(AuditRow { leaf_hash, sealed: self.cipher.seal(nonce, &aad, &bytes), patient_token, query_sealed })
    }

    /// salt || query, sealed under the audit key and bound to the entry's leaf hash.
    fn seal_query(&self, q: &SaltedQuery, leaf_hash: &[u8; 32]) -> Result<Vec<u8>, AuditError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| AuditError(format!("no randomness: {e}")))?;
        let id = aad_id(leaf_hash);
        let aad = Aad { purpose: QUERY_PURPOSE, resource_type: "", id: id.as_str(), version: 0, patient: "" };
        let mut plain = Vec::with_capacity(16 + q.text.len());
        plain.extend_from_slice(&q.salt);
        plain.extend_from_slice(q.text.as_bytes());
        Ok(self.cipher.seal(nonce, &aad, &plain))
    }

    fn note_failure(&self) {
        self.last_failure.store(crate::now_ms(), Ordering::Relaxed);
    }
}

#[async_trait]
impl AuditSink for StoreAuditLog {
    async fn record(&self, events: Vec<AuditEvent>) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let rows = events.iter().map(|e| self.seal(e)).collect::<Result<Vec<_>, _>>()?;
        if self.fail_appends {
            self.note_failure();
            return Err(AuditError("fault injection: audit appends are set to fail".into()));
        }
        match self.store.append_audit(rows).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.note_failure();
                Err(AuditError(e.to_string()))
            }
        }
    }

    fn failed_within(&self, now_ms: i64, window_ms: i64) -> bool {
        let last = self.last_failure.load(Ordering::Relaxed);
        last != 0 && now_ms - last < window_ms
    }
}

/// Opens a stored entry: its canonical JSON bytes, checked against the leaf hash it is bound to.
pub fn open_entry(cipher: &Cipher, row: &AuditRow) -> Result<Vec<u8>, AuditError> {
    let mut sealed = row.sealed.clone();
    Ok(open_entry_in_place(cipher, &row.leaf_hash, &mut sealed)?.to_vec())
}

/// [`open_entry`] without copying: the entry is opened inside its sealed bytes.
pub fn open_entry_in_place<'a>(cipher: &impl valv_crypto::OpenInPlace, leaf_hash: &[u8; 32], sealed: &'a mut [u8]) -> Result<&'a [u8], AuditError> {
    let id = aad_id(leaf_hash);
    let aad = Aad { purpose: "audit", resource_type: "", id: id.as_str(), version: 0, patient: "" };
    let bytes = cipher.open_in_place(&aad, sealed).map_err(|e| AuditError(e.to_string()))?;
    if valv_audit::merkle::leaf_hash(bytes) != *leaf_hash {
        return Err(AuditError("entry does not match its leaf hash".into()));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use valv_store::sqlite::SqliteStore;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            event_id: format!("{i:032x}"),
            time: 1,
            request_id: "r".into(),
            action: "R",
            interaction: "read",
            outcome: Outcome::Success,
            status: 200,
            agent_id: "k".into(),
            agent_name: "k".into(),
            roles: vec![],
            source_address: "127.0.0.1".into(),
            purpose_of_use: None,
            patient: Some(format!("patient-{i}")),
            resource_type: Some("Patient".into()),
            resource_id: None,
            version: None,
            query: None,
            reason: "test".into(),
        }
    }

    #[tokio::test]
    async fn entries_are_appended_in_order_sealed_and_bound_to_their_leaf() {
        let (path, store) = temp_store();
        let key = DataKey::from_bytes([9; 32]);
        let blind = || valv_crypto::BlindIndexKey::new(DataKey::from_bytes([4; 32]));
        let log = StoreAuditLog::new(store.clone(), key.clone(), blind(), false);
        log.record(vec![event(0), event(1)]).await.expect("append");
        log.record(vec![event(2)]).await.expect("append");
        assert_eq!(store.audit_size().await.expect("size"), 3);
        let rows = store.audit_entries(0, 3).await.expect("rows");
        for (i, (_, row)) in rows.iter().enumerate() {
            let bytes = open_entry(&Cipher::new(&key), row).expect("opens");
            assert_eq!(bytes, event(i as u64).canonical_bytes().expect("canonical"), "entry {i} in order");
            assert!(!row.sealed.windows(9).any(|w| w == b"patient-0"), "sealed at rest");
        }
        let mut moved = rows[1].1.clone();
        moved.leaf_hash = rows[0].1.leaf_hash;
        assert!(open_entry(&Cipher::new(&key), &moved).is_err(), "a body moved to another leaf does not open");
        let token = blind().token("AuditEvent", "patient", "patient-1");
        let mine = store.audit_entries_for(&token, 0..u64::MAX, 10, false).await.expect("by patient");
        assert_eq!(mine.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1], "the patient index finds exactly their entry");
        let failing = StoreAuditLog::new(store.clone(), key, blind(), true);
        assert!(failing.record(vec![event(3)]).await.is_err());
        assert!(failing.failed_within(crate::now_ms(), 10_000));
        assert_eq!(store.audit_size().await.expect("size"), 3, "a failed append adds nothing");
        drop(store);
        valv_store::sqlite::remove_files(&path);
    }

    /// A store in a fresh database in the temporary folder (remove it with `valv_store::sqlite::remove_files`).
    fn temp_store() -> (std::path::PathBuf, Arc<dyn Store>) {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("random");
        let path = std::env::temp_dir().join(format!("valv-audit-test-{}.db", u64::from_le_bytes(r)));
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
        (path, store)
    }


    /// A log holding entries of both forms — written before queries were kept apart (`query`
    /// inside the entry) and after (`query_sha256`, the query sealed beside it) — verifies; the
    /// sealed query opens only for its own entry and matches its commitment.
    #[tokio::test]
    async fn legacy_and_committed_entries_verify_together_and_queries_open_only_for_their_entry() {
        let (path, store) = temp_store();
        let key = DataKey::from_bytes([9; 32]);
        let cipher = Cipher::new(&key);
        let log = StoreAuditLog::new(store.clone(), key.clone(), valv_crypto::BlindIndexKey::new(DataKey::from_bytes([4; 32])), false);
        // A legacy entry, sealed as entries were before: its query in its canonical bytes.
        let legacy = br#"{"action":"E","agent_id":"k","agent_name":"k","event_id":"0f","interaction":"search-type","outcome":"success","patient":"p","purpose_of_use":null,"query":"family=Canary","reason":"r","request_id":"r","resource_id":null,"resource_type":"Patient","roles":[],"source_address":"","status":200,"time":1,"version":null}"#;
        let leaf_hash = valv_audit::merkle::leaf_hash(legacy);
        let id = aad_id(&leaf_hash);
        let aad = Aad { purpose: "audit", resource_type: "", id: id.as_str(), version: 0, patient: "" };
        store.append_audit(vec![AuditRow { leaf_hash, sealed: cipher.seal([1; 12], &aad, legacy), patient_token: None, query_sealed: None }]).await.expect("legacy");
        let mut searched = event(1);
        searched.query = Some(salt_query("identifier=x|194511239917").expect("salt"));
        log.record(vec![searched.clone(), event(2)]).await.expect("append");
        let rows = store.audit_entries(0, 3).await.expect("rows");
        assert_eq!(open_query(&cipher, &rows[0].1).expect("legacy"), None, "a legacy entry has no query record");
        assert_eq!(open_query(&cipher, &rows[2].1).expect("no query"), None);
        let q = open_query(&cipher, &rows[1].1).expect("opens").expect("a query record");
        assert_eq!(q.text, "identifier=x|194511239917");
        let bytes = String::from_utf8(open_entry(&cipher, &rows[1].1).expect("entry")).expect("utf-8");
        assert!(bytes.contains(&format!("\"query_sha256\":\"{}\"", q.commitment())) && !bytes.contains("194511239917"), "{bytes}");
        assert!(!rows[1].1.query_sealed.as_ref().expect("sealed").windows(12).any(|w| w == b"194511239917"), "sealed at rest");
        let mut moved = rows[2].1.clone();
        moved.query_sealed = rows[1].1.query_sealed.clone();
        assert!(open_query(&cipher, &moved).is_err(), "a query record moved to another entry does not open");

        let leaves = store.audit_leaves(0, 3).await.expect("leaves");
        let signer = valv_audit::Signer::new("valv.local/audit/test", &[5; 32]).expect("signer");
        let cp = valv_audit::Checkpoint { origin: "valv.local/audit/test".into(), size: 3, root: valv_audit::merkle::root(&leaves) };
        let note = valv_audit::sign_checkpoint(&cp, &signer).expect("sign");
        store.save_checkpoint(&valv_store::StoredCheckpoint { size: 3, root: cp.root, note }).await.expect("save");
        let report = crate::audit::log::verify(&store, &key, &[signer.verifier()], &[]).await.expect("verify");
        assert_eq!((report.entries, report.checkpoints), (3, 1));
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        drop(store);
        valv_store::sqlite::remove_files(&path);
    }
}
