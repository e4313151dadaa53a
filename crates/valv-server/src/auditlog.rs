//! Reading the audit log back: the full verification behind `valv audit verify`, and the
//! inclusion and consistency proofs served under `/audit/proof/…`.
//!
//! Proofs are computed from the stored leaf hashes (one pass over the first `size` leaves per
//! proof); they reveal hashes only, so they are public like the checkpoints they verify against.

use crate::audit::open_entry;
use valv_audit::{merkle, open_checkpoint, Frontier, Hash, Verifier};
use valv_crypto::DataKey;
use valv_store::{Store, StoreError, StoredCheckpoint};

const CHUNK: u64 = 10_000;

/// What `valv audit verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub entries: u64,
    pub checkpoints: usize,
    pub external: usize,
    pub problems: Vec<String>,
}

/// A checkpoint to check against the log, and where it came from (for messages).
pub struct Claim {
    pub source: String,
    pub note: String,
}

/// Recomputes the tree from every stored entry — each opened with the audit key and checked
/// against its leaf hash — then checks every stored checkpoint and every given one: signature by
/// this log's key, size within the log, root equal to the recomputed root at that size.
pub async fn verify(store: &dyn Store, audit_key: &DataKey, log_key: &Verifier, external: &[Claim]) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let stored = store.checkpoints().await?;
    let mut claims: Vec<(String, String)> = stored.iter().map(|c| (format!("stored checkpoint of size {}", c.size), c.note.clone())).collect();
    claims.extend(external.iter().map(|c| (c.source.clone(), c.note.clone())));
    report.checkpoints = stored.len();
    report.external = external.len();

    // Signed sizes and roots first: the roots to compare with are taken while the tree is rebuilt.
    let mut wanted: Vec<(String, u64, Hash)> = Vec::new();
    for (source, note) in &claims {
        match open_checkpoint(note, log_key) {
            Ok(cp) => wanted.push((source.clone(), cp.size, cp.root)),
            Err(e) => report.problems.push(format!("{source}: signature or format invalid ({e})")),
        }
    }
    let size = store.audit_size().await?;
    report.entries = size;
    let mut frontier = Frontier::new();
    // Event ids are random, so two equal leaf hashes mean an entry was copied.
    let mut seen: std::collections::HashMap<Hash, u64> = std::collections::HashMap::new();
    let mut roots_at = std::collections::BTreeMap::new();
    let wanted_sizes: std::collections::BTreeSet<u64> = wanted.iter().map(|w| w.1).collect();
    if wanted_sizes.contains(&0) {
        roots_at.insert(0, frontier.root());
    }
    while frontier.size() < size {
        let from = frontier.size();
        let to = size.min(from + CHUNK);
        let rows = store.audit_entries(from, to).await?;
        if rows.len() as u64 != to - from {
            report.problems.push(format!(
                "entries are missing: indices {from}..{to} should hold {} entries but hold {} (deleted rows or altered indices)",
                to - from,
                rows.len()
            ));
            if rows.is_empty() {
                break;
            }
        }
        for (stored_index, row) in rows {
            let index = frontier.size();
            if stored_index != index {
                report.problems.push(format!("entry {index} is missing: the next stored entry has index {stored_index}"));
            }
            if let Some(first) = seen.insert(row.leaf_hash, index) {
                report.problems.push(format!("entry {index} duplicates entry {first} (a copied row)"));
            }
            if open_entry(audit_key, &row).is_err() {
                report.problems.push(format!("entry {index}: its sealed content does not open or does not match its leaf hash (edited)"));
            }
            frontier.push(row.leaf_hash);
            if wanted_sizes.contains(&frontier.size()) {
                roots_at.insert(frontier.size(), frontier.root());
            }
        }
    }
    for (source, cp_size, cp_root) in wanted {
        match roots_at.get(&cp_size) {
            None => report.problems.push(format!(
                "{source}: covers {cp_size} entries but the log holds {}: entries were deleted or the database was rolled back",
                frontier.size()
            )),
            Some(root) if *root != cp_root => report.problems.push(format!(
                "{source}: the first {cp_size} entries no longer hash to its root: an entry before index {cp_size} was edited, deleted, inserted or reordered"
            )),
            Some(_) => {}
        }
    }
    Ok(report)
}

/// All leaf hashes of the first `size` entries.
async fn leaves(store: &dyn Store, size: u64) -> Result<Vec<Hash>, StoreError> {
    // Not `with_capacity(size)`: a size read from a tampered table must not reserve memory.
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let from = out.len() as u64;
        let chunk = store.audit_leaves(from, size.min(from + CHUNK)).await?;
        if chunk.is_empty() {
            return Err(StoreError::Integrity(format!("audit entries from {from} are missing")));
        }
        out.extend(chunk);
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves.
pub async fn inclusion(store: &dyn Store, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
    let have = store.audit_size().await?;
    if index >= size || size > have {
        return Err(ProofError::Invalid(format!("need index < size <= {have}; got index {index}, size {size}")));
    }
    merkle::inclusion_proof(&leaves(store, size).await?, index).map_err(|e| ProofError::Invalid(e.to_string()))
}

/// The consistency proof from the tree of `from` leaves to the tree of `to` leaves.
pub async fn consistency(store: &dyn Store, from: u64, to: u64) -> Result<Vec<Hash>, ProofError> {
    let have = store.audit_size().await?;
    if from > to || to > have {
        return Err(ProofError::Invalid(format!("need from <= to <= {have}; got from {from}, to {to}")));
    }
    merkle::consistency_proof(&leaves(store, to).await?, from).map_err(|e| ProofError::Invalid(e.to_string()))
}

/// A C2SP tlog-proof receipt for leaf `index` against the checkpoint signed for `size`.
pub async fn receipt(store: &dyn Store, index: u64, size: u64) -> Result<String, ProofError> {
    let cp: StoredCheckpoint = store
        .checkpoint_at(size)
        .await?
        .ok_or_else(|| ProofError::Invalid(format!("no checkpoint was signed for size {size}; ask for the latest checkpoint's size")))?;
    let proof = inclusion(store, index, size).await?;
    valv_audit::build_receipt(index, &proof, &cp.note).map_err(|e| ProofError::Invalid(e.to_string()))
}
