//! The audit integrator: folds durable entries into the Merkle tree, in leaf-index order, writes
//! the tree's interior hashes as tiles (C2SP tlog-tiles, height 8; `valv_audit::tiles`), and
//! signs a C2SP checkpoint for every new tree size, at most about one interval after the entries
//! became durable. Only one integrator signs: the serving process. Tiles are written (durably)
//! before the checkpoint that covers them is saved, so the stored tiles always cover the last
//! checkpoint.
//!
//! On start it does not rehash the log: it loads the right-edge tiles of the last stored
//! checkpoint's size (one partial tile per tile level, at most 8) and checks that they hash to
//! the checkpoint's signed root; tiles that do not are refused (the server does not start). A log
//! shorter than its checkpoint is refused too, so the server never signs a checkpoint
//! inconsistent with one it signed before. A log written before tiles existed (or whose tiles
//! were deleted) has its tiles built once, from every leaf, checked against the checkpoint like
//! the full rebuild it replaces. A log with entries and no checkpoint at all (they were deleted)
//! is refused, until an operator re-anchors it to a checkpoint kept outside Valv
//! ([`Integrator::re_anchor`]). What start no longer checks — that every entry before the
//! checkpoint still hashes to it — is `valv audit verify`'s (docs/AUDIT.md).

use std::sync::Arc;
use std::time::{Duration, Instant};
use valv_audit::tiles::edge_tiles;
use crate::audit::signing::LogKeys;
use valv_audit::{AuditError, Checkpoint, Signer, TiledTree, Verifier};
use valv_store::{AuditTile, Store, StoreError, StoredCheckpoint};

/// Leaves read from the store per query while catching up.
const CHUNK: u64 = 10_000;

/// How often building tiles for a whole log reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub struct Integrator {
    store: Arc<dyn Store>,
    signer: Signer,
    /// The key before `signer` while the last stored checkpoint is not yet signed by `signer`
    /// (the first after a rotation): it co-signs that one checkpoint, then is dropped.
    handover: Option<Signer>,
    /// Every key of the log, for checking what was signed before.
    verifiers: Vec<Verifier>,
    tree: TiledTree,
    /// Tiles taken from the tree whose write failed (a full disk): written with the next ones, so
    /// a failed write loses none (a partial tile is followed by its longer self, which wins).
    unwritten: Vec<AuditTile>,
    /// The size of the last checkpoint signed (or found at start): a step whose signing failed is
    /// retried by the next one even when no entry came in between.
    signed: u64,
}

/// The log's name: stable for the installation because it derives from its first signing key.
pub fn origin_for(seed: &[u8; 32]) -> Result<String, String> {
    use sha2::Digest;
    let public = Signer::new("valv", seed).map_err(|e| e.to_string())?.verifier().public_key();
    let digest = sha2::Sha256::digest(public);
    Ok(format!("valv.local/audit/{}", valv_crypto::hex::encode(&digest[..8])))
}

impl Integrator {
    /// Resumes the tree from its stored tiles and checks them against the last checkpoint (or
    /// builds them once from every leaf); signs the empty tree on a new log.
    pub async fn start(store: Arc<dyn Store>, keys: &LogKeys) -> Result<Self, String> {
        let mut it = Self::new(store, keys)?;
        let last = it.store.latest_checkpoint().await.map_err(|e| e.to_string())?;
        let size = it.store.audit_size().await.map_err(|e| e.to_string())?;
        if let Some(stored) = &last {
            // The columns beside the note are a convenience; only the signed note is trusted.
            let cp = valv_audit::open_checkpoint(&stored.note, &it.verifiers)
                .map_err(|e| format!("the last stored checkpoint (size {}) is not validly signed by this log's keys: {e}", stored.size))?;
            if valv_audit::open_checkpoint(&stored.note, &[it.signer.verifier()]).is_ok() {
                it.handover = None;
            }
            if cp.size != stored.size || cp.root != stored.root {
                return Err(format!("the last stored checkpoint's columns (size {}) disagree with its signed note (size {})", stored.size, cp.size));
            }
            if cp.size > size {
                return Err(format!(
                    "the audit log holds {size} entries but its last signed checkpoint covers {}: it was truncated or rolled back",
                    cp.size
                ));
            }
            it.signed = cp.size;
            match resume(&*it.store, cp.size).await? {
                Some(tree) => {
                    if tree.root() != cp.root {
                        return Err(format!(
                            "the stored audit tiles at size {} do not hash to the root signed for that size: the tree's interior hashes (table audit_tiles) were changed. \
                             Run 'valv audit verify' to see which; tiles are derived data, so once the entries verify, deleting the rows of audit_tiles makes the next start rebuild them from the entries",
                            cp.size
                        ));
                    }
                    it.tree = tree;
                    spot_check(&*it.store, cp.size).await?;
                }
                None => {
                    // A log from before tiles (or whose tiles were deleted): build them once, from
                    // every leaf, and check the result against the checkpoint as before tiles.
                    tracing::info!(entries = cp.size, "building the audit log's tiles from every entry (once; a log written before tiles)");
                    it.catch_up(cp.size).await?;
                    if it.tree.root() != cp.root {
                        return Err(format!("the audit log's first {} entries no longer hash to the root signed for them: entries were changed", cp.size));
                    }
                    tracing::info!(entries = cp.size, "the audit log's tiles are built");
                }
            }
        } else if size > 0 {
            // Every log is signed at size 0 when it is created, so entries without any checkpoint
            // mean the checkpoints were deleted: signing now would vouch for whatever the rows say.
            return Err(format!(
                "the audit log holds {size} entries but no signed checkpoint: its checkpoints were deleted. \
                 Re-anchor it to a checkpoint kept outside Valv: valv audit re-anchor --checkpoint FILE"
            ));
        } else {
            it.sign_current().await?;
        }
        Ok(it)
    }

    /// Re-anchors a log whose stored checkpoints are gone to `note`, a checkpoint this log signed
    /// and someone kept outside Valv: it must verify under the log's key, and the log's first
    /// `size` entries must still hash to its root. The checkpoint is stored again; the server may
    /// then start and sign the entries after it.
    pub async fn re_anchor(store: Arc<dyn Store>, keys: &LogKeys, note: &str) -> Result<StoredCheckpoint, String> {
        let mut it = Self::new(store, keys)?;
        if it.store.latest_checkpoint().await.map_err(|e| e.to_string())?.is_some() {
            return Err("the audit log has stored checkpoints: there is nothing to re-anchor (run 'valv audit verify')".into());
        }
        let cp = valv_audit::open_checkpoint(note, &it.verifiers).map_err(|e| format!("the checkpoint is not validly signed by this log's keys: {e}"))?;
        let size = it.store.audit_size().await.map_err(|e| e.to_string())?;
        if cp.size > size {
            return Err(format!("the checkpoint covers {} entries but the log holds {size}: entries were removed", cp.size));
        }
        it.catch_up(cp.size).await?;
        if it.tree.root() != cp.root {
            return Err(format!("the log's first {} entries do not hash to the checkpoint's root: entries were changed", cp.size));
        }
        let stored = StoredCheckpoint { size: cp.size, root: cp.root, note: note.to_string() };
        it.store.save_checkpoint(&stored).await.map_err(|e| e.to_string())?;
        Ok(stored)
    }

    fn new(store: Arc<dyn Store>, keys: &LogKeys) -> Result<Self, String> {
        Ok(Integrator {
            store,
            signer: keys.signer()?,
            handover: keys.previous_signer().transpose()?,
            verifiers: keys.verifiers()?,
            tree: TiledTree::new(),
            unwritten: Vec::new(),
            signed: 0,
        })
    }

    pub fn verifier(&self) -> Verifier {
        self.signer.verifier()
    }

    /// Signs with the newest of `keys` from the next checkpoint on, which the key before it
    /// co-signs.
    pub fn adopt(&mut self, keys: &LogKeys) -> Result<(), String> {
        self.signer = keys.signer()?;
        self.handover = keys.previous_signer().transpose()?;
        self.verifiers = keys.verifiers()?;
        Ok(())
    }

    /// Folds the leaves up to `to` into the tree and writes the tiles they changed, chunk by
    /// chunk (durably, before any checkpoint covering them is signed).
    async fn catch_up(&mut self, to: u64) -> Result<(), String> {
        let (started, mut reported) = (Instant::now(), Instant::now());
        while self.tree.size() < to {
            let from = self.tree.size();
            let leaves = self.store.audit_leaves(from, to.min(from + CHUNK)).await.map_err(|e| e.to_string())?;
            if leaves.is_empty() {
                return Err(format!("audit entries from {from} are missing"));
            }
            leaves.into_iter().for_each(|l| self.tree.push(l));
            self.write_tiles().await?;
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                tracing::info!(done = self.tree.size(), of = to, seconds = started.elapsed().as_secs(), "integrating audit entries into the tree and its tiles");
            }
        }
        Ok(())
    }

    async fn write_tiles(&mut self) -> Result<(), String> {
        self.unwritten.extend(self.tree.take_changed().into_iter().map(|t| AuditTile { level: t.key.level, index: t.key.index, hashes: t.hashes }));
        self.store.put_audit_tiles(self.unwritten.clone()).await.map_err(|e| format!("writing audit tiles: {e}"))?;
        self.unwritten.clear();
        Ok(())
    }

    async fn sign_current(&mut self) -> Result<StoredCheckpoint, String> {
        let cp = Checkpoint { origin: self.signer.name().to_string(), size: self.tree.size(), root: self.tree.root() };
        let signers: Vec<&Signer> = std::iter::once(&self.signer).chain(self.handover.as_ref()).collect();
        let note = valv_audit::note::sign(&cp.to_note_text().map_err(|e| e.to_string())?, &signers).map_err(|e| e.to_string())?;
        let stored = StoredCheckpoint { size: cp.size, root: cp.root, note };
        self.store.save_checkpoint(&stored).await.map_err(|e| e.to_string())?;
        self.handover = None;
        Ok(stored)
    }

    /// Integrates what became durable since the last step and signs it; `None` if nothing new.
    pub async fn step(&mut self) -> Result<Option<StoredCheckpoint>, String> {
        let size = self.store.audit_size().await.map_err(|e| e.to_string())?;
        if size <= self.tree.size() && self.unwritten.is_empty() && self.signed == self.tree.size() {
            return Ok(None);
        }
        self.catch_up(size).await?;
        if !self.unwritten.is_empty() {
            // Tiles a failed write left behind: no checkpoint before they are stored.
            self.write_tiles().await?;
        }
        let cp = self.sign_current().await?;
        self.signed = cp.size;
        Ok(Some(cp))
    }
}

/// The tree of `size` leaves resumed from its stored right-edge tiles, or `None` when one of them
/// is absent or too short (tiles never built, or deleted). Reads at most 8 tiles.
async fn resume(store: &dyn Store, size: u64) -> Result<Option<TiledTree>, String> {
    let keys: Vec<(u8, u64)> = edge_tiles(size).iter().map(|(k, _)| (k.level, k.index)).collect();
    let stored = store.audit_tiles(&keys).await.map_err(|e: StoreError| e.to_string())?;
    let found = |k: valv_audit::TileKey| stored.iter().find(|t| (t.level, t.index) == (k.level, k.index)).map(|t| t.hashes.clone());
    match TiledTree::resume(size, found) {
        Ok(tree) => Ok(Some(tree)),
        Err(AuditError::MissingTile { level, index }) => {
            tracing::warn!(level, index, size, "an audit tile on the tree's right edge is missing or short: the tiles are built from the entries");
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Full level-0 tiles compared with their entries' leaf hashes, and followed up to the right
/// edge, at each start.
const SAMPLED_TILES: usize = 4;

/// What start checks beyond the right edge, in a bounded number of reads whatever the log's size:
/// the newest entries (those of the partial level-0 tile at `size`, up to 255) against that
/// tile, and [`SAMPLED_TILES`] full level-0 tiles chosen at random against their 256 entries
/// and, through the tiles above them, against the edge (which hashes to the signed root). An
/// edit elsewhere is `valv audit verify`'s to find.
async fn spot_check(store: &dyn Store, size: u64) -> Result<(), String> {
    use std::collections::HashMap;
    use valv_audit::tiles::{ancestors, check_ancestry, TileKey, TILE_WIDTH};
    let full = size / TILE_WIDTH;
    let mut picks: Vec<u64> = Vec::new();
    for _ in 0..SAMPLED_TILES.min(full as usize) {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| format!("random: {e}"))?;
        picks.push(u64::from_le_bytes(r) % full);
    }
    let edge = (!size.is_multiple_of(TILE_WIDTH)).then_some(full);
    let mut keys: Vec<TileKey> = picks.iter().chain(edge.iter()).map(|&index| TileKey { level: 0, index }).collect();
    for &index in &picks {
        keys.extend(ancestors(TileKey { level: 0, index }, size).into_iter().map(|(k, _)| k));
    }
    keys.sort();
    keys.dedup();
    let wanted: Vec<(u8, u64)> = keys.iter().map(|k| (k.level, k.index)).collect();
    let tiles: HashMap<TileKey, Vec<[u8; 32]>> =
        store.audit_tiles(&wanted).await.map_err(|e| e.to_string())?.into_iter().map(|t| (TileKey { level: t.level, index: t.index }, t.hashes)).collect();
    for index in picks.iter().chain(edge.iter()).copied() {
        let (from, to) = (index * TILE_WIDTH, size.min((index + 1) * TILE_WIDTH));
        let leaves = store.audit_leaves(from, to).await.map_err(|e| format!("the audit log is damaged before its last signed checkpoint (size {size}): {e}"))?;
        let tile = tiles.get(&TileKey { level: 0, index }).map(|h| &h[..h.len().min(leaves.len())]);
        if tile != Some(&leaves[..]) {
            return Err(format!(
                "the audit log's entries {from}..{to} no longer hash to the root signed for them (size {size}): entries were changed (run 'valv audit verify')"
            ));
        }
        if Some(index) != edge {
            check_ancestry(TileKey { level: 0, index }, size, &tiles).map_err(|e| {
                format!("the stored audit tiles above tile {index} do not hash to the root signed for size {size} ({e}): the tree's interior hashes (table audit_tiles) were changed (run 'valv audit verify')")
            })?;
        }
    }
    Ok(())
}

/// Runs the integrator every `interval` until the process ends, while this process leads
/// ([`Store::lead`]: several servers on one PostgreSQL database elect one); failures
/// are logged and retried. A server that takes over starts its integrator afresh from the stored
/// tiles and checkpoint, so it continues the one tree the last leader left.
pub fn spawn(integrator: Integrator, app: Arc<crate::App>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut keys_checked = Instant::now();
        let mut current = Some(integrator);
        let mut leading = false;
        loop {
            tokio::time::sleep(interval).await;
            match app.vault.store().lead(valv_store::Duty::Integration).await {
                Ok(true) if !leading => {
                    leading = true;
                    tracing::info!("this server integrates the audit log and signs its checkpoints");
                }
                Ok(true) => {}
                Ok(false) => {
                    if leading {
                        tracing::warn!("another server integrates the audit log now");
                    }
                    (leading, current) = (false, None);
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot tell whether this server integrates the audit log; retrying");
                    (leading, current) = (false, None);
                    continue;
                }
            }
            let integrator = match current.as_mut() {
                Some(i) => i,
                None => match Integrator::start(app.vault.store().clone(), &app.log_keys()).await {
                    Ok(i) => current.insert(i),
                    Err(e) => {
                        tracing::error!(error = %e, "taking over the audit log failed; retrying");
                        continue;
                    }
                },
            };
            if keys_checked.elapsed() >= KEY_CHECK {
                keys_checked = Instant::now();
                if let Err(e) = adopt_new_key(integrator, &app).await {
                    tracing::error!(error = %e, "reading a new checkpoint-signing key failed; retrying");
                }
            }
            if let Err(e) = integrator.step().await {
                tracing::error!(error = %e, "audit integration failed; retrying");
            }
        }
    })
}

/// How often the integrator looks for a signing key added by `valv keys rotate --signing-key`.
const KEY_CHECK: Duration = Duration::from_secs(10);

/// Signs with a signing key another process added (its first checkpoint co-signed by the key
/// before it), and publishes it.
async fn adopt_new_key(integrator: &mut Integrator, app: &crate::App) -> Result<(), String> {
    if !app.log_keys().newer_in(&**app.vault.store()).await? {
        return Ok(());
    }
    let keys = LogKeys::load(&app.vault, crate::now_ms()).await?;
    integrator.adopt(&keys)?;
    tracing::info!(key = keys.count(), "signing checkpoints with a new key");
    app.set_log_keys(keys);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::audit::{AuditSink, StoreAuditLog};
    use crate::audit::log::{self as auditlog, ProofError};
    use valv_audit::{merkle, AuditEvent, Outcome};
    use valv_crypto::{BlindIndexKey, DataKey};
    use valv_store::sqlite::SqliteStore;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            event_id: format!("{i:032x}"),
            time: 1_700_000_000_000 + i as i64,
            request_id: format!("{i:024x}"),
            action: "R",
            interaction: "read",
            outcome: Outcome::Success,
            status: 200,
            agent_id: "a".into(),
            agent_name: "a".into(),
            roles: vec![],
            source_address: "127.0.0.1".into(),
            purpose_of_use: None,
            patient: None,
            resource_type: Some("Observation".into()),
            resource_id: Some(format!("o{i}")),
            version: Some(1),
            query: None,
            reason: "r".into(),
        }
    }

    async fn tile(store: &dyn Store, level: u8, index: u64) -> AuditTile {
        store.audit_tiles(&[(level, index)]).await.unwrap().remove(0)
    }

    #[tokio::test]
    async fn tiles_resume_start_serve_proofs_and_edits_are_caught() {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        let path = std::env::temp_dir().join(format!("valv-tiles-test-{}.db", u64::from_le_bytes(r)));
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).unwrap());
        let key = DataKey::from_bytes([7; 32]);
        let log = StoreAuditLog::new(store.clone(), key.clone(), BlindIndexKey::new(DataKey::from_bytes([8; 32])), false);
        let seed = LogKeys::new(vec![DataKey::from_bytes([9; 32])]).unwrap();
        let mut it = Integrator::start(store.clone(), &seed).await.unwrap();
        for b in 0..3 {
            log.record((b * 1000..(b + 1) * 1000).map(event).collect()).await.unwrap();
        }
        assert_eq!(it.step().await.unwrap().unwrap().size, 3000);
        // Entries no checkpoint covers yet: proofs take their leaves as they are.
        log.record((3000..3100).map(event).collect()).await.unwrap();
        let leaves = store.audit_leaves(0, 3100).await.unwrap();
        for (i, n) in [(0, 3000), (2999, 3000), (1234, 3050), (3099, 3100), (5, 6)] {
            assert_eq!(auditlog::inclusion(&*store, i, n).await.unwrap(), merkle::inclusion_proof(&leaves[..n as usize], i).unwrap(), "{i} in {n}");
        }
        for (m, n) in [(0, 3000), (1, 3000), (257, 3000), (3000, 3100), (100, 3100), (2048, 2900)] {
            assert_eq!(auditlog::consistency(&*store, m, n).await.unwrap(), merkle::consistency_proof(&leaves[..n as usize], m).unwrap(), "{m} -> {n}");
        }

        // A restart resumes from the tiles and signs the rest.
        drop(it);
        let mut it = Integrator::start(store.clone(), &seed).await.unwrap();
        assert_eq!(it.tree.size(), 3000);
        let cp = it.step().await.unwrap().unwrap();
        assert_eq!((cp.size, cp.root), (3100, merkle::root(&leaves)));
        let verifier = [it.verifier()];
        drop(it);
        let report = auditlog::verify(&store, &key, &verifier, &[]).await.unwrap();
        assert!(report.problems.is_empty() && !report.tiles_absent && report.tiles >= 13, "{report:?}");

        // A DBA edits an interior tile: proofs through it fail closed (500), verify names it.
        let mut edited = tile(&*store, 0, 2).await;
        edited.hashes[7][0] ^= 1;
        store.put_audit_tiles(vec![edited]).await.unwrap();
        let err = auditlog::inclusion(&*store, 2 * 256 + 6, 3100).await;
        assert!(matches!(err, Err(ProofError::Store(StoreError::Integrity(_)))), "{err:?}");
        let report = auditlog::verify(&store, &key, &verifier, &[]).await.unwrap();
        assert!(report.problems.iter().any(|p| p.contains("audit tile 2 of tile level 0 differs")), "{:?}", report.problems);

        // An edited edge tile (3100 = 12 * 256 + 28) disagrees with the signed root: start refuses.
        let mut edge = tile(&*store, 0, 12).await;
        edge.hashes[0][0] ^= 1;
        store.put_audit_tiles(vec![edge.clone()]).await.unwrap();
        let err = Integrator::start(store.clone(), &seed).await.err().unwrap();
        assert!(err.contains("do not hash to the root signed"), "{err}");

        // Cut short (as good as deleted): start builds every tile again from the entries, checked
        // against the checkpoint; the log then verifies again.
        edge.hashes.truncate(5);
        store.put_audit_tiles(vec![edge]).await.unwrap();
        let it = Integrator::start(store.clone(), &seed).await.unwrap();
        assert_eq!((it.tree.size(), it.tree.root()), (3100, cp.root));
        assert_eq!(tile(&*store, 0, 12).await.hashes.len(), 28);
        let report = auditlog::verify(&store, &key, &verifier, &[]).await.unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);

        // A signing-key rotation: the next checkpoint is signed by the new key and co-signed by
        // the old one, the ones after by the new key alone; the log verifies under both keys, and
        // not under the new one alone (the checkpoints before it are the old key's).
        let rotated = LogKeys::new(vec![DataKey::from_bytes([9; 32]), DataKey::from_bytes([10; 32])]).unwrap();
        let mut it = Integrator::start(store.clone(), &rotated).await.unwrap();
        let both = rotated.verifiers().unwrap();
        for (from, signatures) in [(3100, 2), (3110, 1)] {
            log.record((from..from + 10).map(event).collect()).await.unwrap();
            let cp = it.step().await.unwrap().unwrap();
            assert_eq!(valv_audit::note::Note::parse(&cp.note).unwrap().verify(&both).unwrap().len(), signatures, "at {}", cp.size);
        }
        drop(it);
        assert!(auditlog::verify(&store, &key, &both, &[]).await.unwrap().problems.is_empty());
        let report = auditlog::verify(&store, &key, &both[1..], &[]).await.unwrap();
        assert!(report.problems.iter().any(|p| p.contains("signature or format invalid")), "{:?}", report.problems);
        let it = Integrator::start(store.clone(), &rotated).await.unwrap();
        assert!(it.handover.is_none(), "the handover is signed once");

        // (An edited entry among the newest ones, the edge tile's, is found at start: tests/it/audit.rs.)
        drop(store);
        valv_store::sqlite::remove_files(&path);
    }
}
