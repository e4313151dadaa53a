//! Reading the audit log back: the full verification behind `valv audit verify`, and the
//! inclusion and consistency proofs served under `/audit/proof/…`.
//!
//! Proofs are assembled from the stored tiles of the tree's interior hashes (`audit_tiles`, which
//! the integrator writes): a handful of point reads whatever the log's size, plus the leaf hashes
//! of entries not yet covered by a checkpoint (about one interval's worth). They reveal hashes
//! only, so they are public like the checkpoints they verify against. A proof for a size with a
//! signed checkpoint is checked against that checkpoint's root before it is answered: a tile
//! edited in the database gives a 500, never a proof that does not verify.

use crate::audit::open_entry_in_place;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::collections::HashMap;
use valv_audit::tiles::{self, tile_width, TileKey, TileSource, TiledTree};
use valv_audit::{merkle, open_checkpoint, AuditError, Frontier, Hash, Verifier};
use valv_crypto::{BulkOpener, DataKey};
use valv_store::{Store, StoreError, StoredCheckpoint};

const CHUNK: u64 = 10_000;
/// Entries missing from the by-patient lookup named at most (the first of them).
const UNFOUND_SHOWN: usize = 20;

/// What `valv audit verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub entries: u64,
    pub checkpoints: usize,
    pub external: usize,
    /// Stored tiles compared with the tiles recomputed from the entries.
    pub tiles: u64,
    /// No tile is stored at all: a log written before tiles, not yet served by a version that
    /// builds them (not a problem: `valv serve` builds them at its next start).
    pub tiles_absent: bool,
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
///
/// Reading and opening entries is the costly part, so chunks are read and opened by concurrent
/// tasks (a bounded window of them, on every core) while this task folds the results into the
/// tree in log order.
pub async fn verify(store: &Arc<dyn Store>, audit_key: &DataKey, log_keys: &[Verifier], external: &[Claim]) -> Result<Report, StoreError> {
    let mut report = Report::default();
    let stored = store.checkpoints().await?;
    let mut claims: Vec<(String, String)> = stored.iter().map(|c| (format!("stored checkpoint of size {}", c.size), c.note.clone())).collect();
    claims.extend(external.iter().map(|c| (c.source.clone(), c.note.clone())));
    report.checkpoints = stored.len();
    report.external = external.len();

    // Signed sizes and roots first: the roots to compare with are taken while the tree is rebuilt.
    let mut wanted: Vec<(String, u64, Hash)> = Vec::new();
    for (source, note) in &claims {
        match open_checkpoint(note, log_keys) {
            Ok(cp) => wanted.push((source.clone(), cp.size, cp.root)),
            Err(e) => report.problems.push(format!("{source}: signature or format invalid ({e})")),
        }
    }
    let size = store.audit_size().await?;
    report.entries = size;
    let mut rebuild = Rebuild::new(wanted.iter().map(|w| w.1).collect());
    // Tiles must cover the largest stored checkpoint (the integrator writes them before it saves
    // one); beyond it they may lag behind the entries.
    let signed = stored.iter().map(|c| c.size).max().unwrap_or(0);
    report.tiles_absent = size > 0 && store.audit_tiles(&[(0, 0)]).await?.is_empty();
    let mut tree = TiledTree::new();
    let opener = Arc::new(BulkOpener::new(audit_key).map_err(|e| StoreError::Backend(format!("audit key: {e}")))?);
    let window = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut inflight = std::collections::VecDeque::new();
    let mut from = 0;
    while from < size || !inflight.is_empty() {
        if from < size && inflight.len() < window {
            let to = size.min(from + CHUNK);
            inflight.push_back(tokio::spawn(check_chunk(store.clone(), opener.clone(), from, to)));
            from = to;
            continue;
        }
        if let Some(next) = inflight.pop_front() {
            let checked = next.await.map_err(|e| StoreError::Backend(format!("entry check stopped: {e}")))??;
            rebuild.take(&checked, &mut report.problems);
            if !report.tiles_absent {
                checked.iter().for_each(|&(_, leaf, _)| tree.push(leaf));
                report.tiles += check_tiles(&**store, tree.take_changed(), signed, &mut report.problems).await?;
            }
        }
    }
    for (first, copy) in rebuild.copies(&**store).await? {
        report.problems.push(format!("entry {copy} duplicates entry {first} (a copied row)"));
    }
    for idx in store.patient_entries_unfound(UNFOUND_SHOWN).await? {
        report.problems.push(format!("entry {idx} is missing from the by-patient lookup: the patient's access log would not show it (the by-patient table was edited)"));
    }
    let frontier_size = rebuild.frontier.size();
    for (source, cp_size, cp_root) in wanted {
        match rebuild.roots_at.get(&cp_size) {
            None => report.problems.push(format!(
                "{source}: covers {cp_size} entries but the log holds {frontier_size}: entries were deleted or the database was rolled back"
            )),
            Some(root) if *root != cp_root => report.problems.push(format!(
                "{source}: the first {cp_size} entries no longer hash to its root: an entry before index {cp_size} was edited, deleted, inserted or reordered"
            )),
            Some(_) => {}
        }
    }
    Ok(report)
}

/// Compares tiles recomputed from the entries with the stored ones: a stored tile must hold
/// exactly the recomputed hashes (it may be shorter than the recomputed one only past the largest
/// signed size, where the integrator may not have reached yet, and longer only when the log grew
/// while verifying). Returns how many were compared.
async fn check_tiles(store: &dyn Store, computed: Vec<tiles::Tile>, signed: u64, problems: &mut Vec<String>) -> Result<u64, StoreError> {
    let keys: Vec<(u8, u64)> = computed.iter().map(|t| (t.key.level, t.key.index)).collect();
    let stored: HashMap<(u8, u64), Vec<Hash>> = store.audit_tiles(&keys).await?.into_iter().map(|t| ((t.level, t.index), t.hashes)).collect();
    for t in &computed {
        let (level, index) = (t.key.level, t.key.index);
        let required = tile_width(t.key, signed) as usize;
        match stored.get(&(level, index)) {
            None if required > 0 => problems.push(format!("audit tile {index} of tile level {level} is missing (the tree's interior hashes were deleted)")),
            None => {}
            Some(h) => {
                let common = h.len().min(t.hashes.len());
                if h[..common] != t.hashes[..common] {
                    let first = (0..common).find(|&i| h[i] != t.hashes[i]).unwrap_or(0);
                    problems.push(format!(
                        "audit tile {index} of tile level {level} differs from the hashes recomputed from the entries (hash {first} of it; the tile was edited)"
                    ));
                } else if h.len() < required {
                    problems.push(format!(
                        "audit tile {index} of tile level {level} holds {} hashes, the signed tree needs {required} (the tile was cut short)",
                        h.len()
                    ));
                }
            }
        }
    }
    Ok(computed.len() as u64)
}

/// One chunk of stored entries, read and opened: (stored index, leaf hash, whether it opened
/// and matched its leaf hash) per row.
/// The patient an entry names, read from its canonical (RFC 8785) bytes without parsing them
/// whole: in canonical JSON the byte sequence `"patient":` can only be that key (a quote inside a
/// string value is always escaped), and a FHIR id needs no escaping.
fn entry_patient(bytes: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"patient\":\"";
    let at = bytes.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = bytes[at..].iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&bytes[at..at + len]).ok()
}

/// Checks the patient index that `$access-log` and patient searches read: every entry that names
/// a patient must carry that patient's token (`token_of`), and no other entry a token. A cleared,
/// moved or invented token would hide entries from a patient's access log, or show them another's.
/// Returns one problem per entry found wrong (the first 100, then a count).
pub async fn check_patient_index(store: &Arc<dyn Store>, audit_key: &DataKey, token_of: &(dyn Fn(&str) -> valv_store::Token + Sync)) -> Result<Vec<String>, StoreError> {
    let opener = BulkOpener::new(audit_key).map_err(|e| StoreError::Backend(format!("audit key: {e}")))?;
    let (size, mut problems, mut wrong) = (store.audit_size().await?, Vec::new(), 0u64);
    let mut from = 0;
    while from < size {
        let to = size.min(from + CHUNK);
        for (index, mut row) in store.audit_entries(from, to).await? {
            // An entry that does not open is reported by `verify` already.
            let Ok(bytes) = open_entry_in_place(&opener, &row.leaf_hash, &mut row.sealed) else { continue };
            let expected = entry_patient(bytes).map(token_of);
            if expected != row.patient_token {
                wrong += 1;
                if problems.len() < 100 {
                    let what = match (expected.is_some(), row.patient_token.is_some()) {
                        (true, false) => "its patient's index token is missing (hidden from the patient's access log)",
                        (false, true) => "it names no patient but carries an index token",
                        _ => "its patient index token is another patient's",
                    };
                    problems.push(format!("entry {index}: {what}: the patient index was altered"));
                }
            }
        }
        from = to;
    }
    if wrong > problems.len() as u64 {
        problems.push(format!("{} more entries with a wrong patient index token", wrong - problems.len() as u64));
    }
    Ok(problems)
}

async fn check_chunk(store: Arc<dyn Store>, opener: Arc<BulkOpener>, from: u64, to: u64) -> Result<Vec<(u64, Hash, bool)>, StoreError> {
    let rows = store.audit_entries(from, to).await?;
    Ok(rows.into_iter().map(|(index, mut row)| (index, row.leaf_hash, open_entry_in_place(&*opener, &row.leaf_hash, &mut row.sealed).is_ok())).collect())
}

/// The tree rebuilt entry by entry, noting holes, copies and edits, and the roots at the sizes
/// some checkpoint claims.
struct Rebuild {
    frontier: Frontier,
    /// (first 8 bytes of the leaf hash, stored index) of every entry. Event ids are random, so two equal
    /// leaf hashes mean an entry was copied; sorting these finds them without a hash map.
    prefixes: Vec<(u64, u64)>,
    wanted_sizes: BTreeSet<u64>,
    roots_at: BTreeMap<u64, Hash>,
    /// The stored index the next row should carry.
    expected: u64,
}

impl Rebuild {
    fn new(wanted_sizes: BTreeSet<u64>) -> Self {
        let frontier = Frontier::new();
        let mut roots_at = BTreeMap::new();
        if wanted_sizes.contains(&0) {
            roots_at.insert(0, frontier.root());
        }
        Rebuild { frontier, prefixes: Vec::new(), wanted_sizes, roots_at, expected: 0 }
    }

    fn take(&mut self, rows: &[(u64, Hash, bool)], problems: &mut Vec<String>) {
        for &(stored_index, leaf_hash, opened) in rows {
            let index = self.frontier.size();
            if stored_index != self.expected {
                problems.push(format!(
                    "entries are missing before index {index}: the next stored entry has index {stored_index}, expected {} (deleted rows or altered indices)",
                    self.expected
                ));
            }
            self.expected = stored_index + 1;
            self.prefixes.push((prefix(&leaf_hash), stored_index));
            if !opened {
                problems.push(format!("entry {index}: its sealed content does not open or does not match its leaf hash (edited)"));
            }
            self.frontier.push(leaf_hash);
            if self.wanted_sizes.contains(&self.frontier.size()) {
                self.roots_at.insert(self.frontier.size(), self.frontier.root());
            }
        }
    }

    /// (first stored index, later stored index) of every pair of entries with the same leaf hash,
    /// in order of the later one. Entries whose hashes share only their first 8 bytes are told apart by
    /// reading their full hashes back.
    async fn copies(&mut self, store: &dyn Store) -> Result<Vec<(u64, u64)>, StoreError> {
        self.prefixes.sort_unstable();
        let mut copies = Vec::new();
        for group in self.prefixes.chunk_by(|a, b| a.0 == b.0).filter(|g| g.len() > 1) {
            let mut firsts: Vec<(Hash, u64)> = Vec::new();
            for &(_, index) in group {
                let leaf = store.audit_leaves(index, index + 1).await?.into_iter().next();
                match (leaf, firsts.iter().find(|(h, _)| Some(*h) == leaf)) {
                    (Some(_), Some(&(_, first))) => copies.push((first, index)),
                    (Some(h), None) => firsts.push((h, index)),
                    (None, _) => {}
                }
            }
        }
        copies.sort_by_key(|c| c.1);
        Ok(copies)
    }
}

fn prefix(hash: &Hash) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(b)
}

/// All leaf hashes of the first `size` entries.
async fn leaves(store: &dyn Store, size: u64) -> Result<Vec<Hash>, StoreError> {
    leaves_between(store, 0, size).await
}

/// The leaf hashes of entries `start..end`.
async fn leaves_between(store: &dyn Store, start: u64, end: u64) -> Result<Vec<Hash>, StoreError> {
    // Not `with_capacity(size)`: a size read from a tampered table must not reserve memory.
    let mut out = Vec::new();
    while start + (out.len() as u64) < end {
        let from = start + out.len() as u64;
        let chunk = store.audit_leaves(from, end.min(from + CHUNK)).await?;
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

/// What the tiles cover for a proof in the tree of `size` leaves: the first `covered` leaves
/// (the largest signed size, the integrator having written their tiles before signing), the
/// tiles `keys` names, and the leaf hashes from `covered` to `size`.
async fn source(store: &dyn Store, size: u64, keys: impl FnOnce(u64) -> Result<Vec<TileKey>, AuditError>) -> Result<(u64, HashMap<TileKey, Vec<Hash>>, Vec<Hash>), ProofError> {
    let signed = store.latest_checkpoint().await?.map_or(0, |c| c.size);
    let covered = signed.min(size);
    let keys = keys(covered).map_err(|e| ProofError::Invalid(e.to_string()))?;
    let wanted: Vec<(u8, u64)> = keys.iter().map(|k| (k.level, k.index)).collect();
    let tiles = store.audit_tiles(&wanted).await?.into_iter().map(|t| (TileKey { level: t.level, index: t.index }, t.hashes)).collect();
    let tail = leaves_between(store, covered, size).await?;
    Ok((covered, tiles, tail))
}

/// A proof from tiles; from every leaf when a tile it needs is absent (a log whose tiles `valv
/// serve` has not built yet, or deleted ones), which costs a pass over the log.
async fn or_from_leaves(
    store: &dyn Store,
    size: u64,
    from_tiles: Result<Vec<Hash>, AuditError>,
    from_leaves: impl FnOnce(&[Hash]) -> Result<Vec<Hash>, AuditError>,
) -> Result<Vec<Hash>, ProofError> {
    match from_tiles {
        Ok(proof) => Ok(proof),
        Err(AuditError::MissingTile { level, index }) => {
            tracing::warn!(level, index, "an audit tile is missing: this proof is computed from every leaf");
            from_leaves(&leaves(store, size).await?).map_err(|e| ProofError::Invalid(e.to_string()))
        }
        Err(e) => Err(ProofError::Invalid(e.to_string())),
    }
}

fn disagrees(what: &str, size: u64) -> ProofError {
    ProofError::Store(StoreError::Integrity(format!(
        "the {what} proof assembled from the stored audit tiles does not verify against the checkpoint signed for size {size}: a tile was changed (run 'valv audit verify')"
    )))
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves.
pub async fn inclusion(store: &dyn Store, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
    let have = store.audit_size().await?;
    if index >= size || size > have {
        return Err(ProofError::Invalid(format!("need index < size <= {have}; got index {index}, size {size}")));
    }
    let (covered, tiles, tail) = source(store, size, |covered| tiles::inclusion_tiles(index, size, covered)).await?;
    let assembled = tiles::inclusion_proof_from_tiles(index, size, &TileSource { covered, tiles: &tiles, tail: &tail });
    let proof = or_from_leaves(store, size, assembled, |all| merkle::inclusion_proof(all, index)).await?;
    if let Some(cp) = store.checkpoint_at(size).await? {
        let leaf = store.audit_leaves(index, index + 1).await?;
        let leaf = leaf.first().ok_or_else(|| StoreError::Integrity(format!("audit entry {index} is missing")))?;
        merkle::verify_inclusion(index, size, leaf, &proof, &cp.root).map_err(|_| disagrees("inclusion", size))?;
    }
    Ok(proof)
}

/// The consistency proof from the tree of `from` leaves to the tree of `to` leaves.
pub async fn consistency(store: &dyn Store, from: u64, to: u64) -> Result<Vec<Hash>, ProofError> {
    let have = store.audit_size().await?;
    if from > to || to > have {
        return Err(ProofError::Invalid(format!("need from <= to <= {have}; got from {from}, to {to}")));
    }
    let (covered, tiles, tail) = source(store, to, |covered| tiles::consistency_tiles(from, to, covered)).await?;
    let assembled = tiles::consistency_proof_from_tiles(from, to, &TileSource { covered, tiles: &tiles, tail: &tail });
    let proof = or_from_leaves(store, to, assembled, |all| merkle::consistency_proof(all, from)).await?;
    if let (Some(old), Some(new)) = (store.checkpoint_at(from).await?, store.checkpoint_at(to).await?) {
        merkle::verify_consistency(from, to, &old.root, &new.root, &proof).map_err(|_| disagrees("consistency", to))?;
    }
    Ok(proof)
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

#[cfg(test)]
mod index_tests {
    #[test]
    fn the_patient_is_read_from_canonical_bytes() {
        assert_eq!(super::entry_patient(br#"{"agent_id":"k","patient":"p-1.2","reason":"x"}"#), Some("p-1.2"));
        assert_eq!(super::entry_patient(br#"{"patient":null,"reason":"the \"patient\":\"x\" text"}"#), None);
    }
}
