//! The audit integrator: folds durable entries into the Merkle tree, in leaf-index order, and
//! signs a C2SP checkpoint for every new tree size, at most about one interval after the entries
//! became durable. Only one integrator signs: the serving process.
//!
//! On start it rebuilds the tree from every stored leaf and checks the last stored checkpoint
//! against it; a log shorter than its checkpoint, or one whose root differs, is refused, so the
//! server never signs a checkpoint inconsistent with one it signed before. A log with entries and
//! no checkpoint at all (they were deleted) is refused too, until an operator re-anchors it to a
//! checkpoint kept outside Valv ([`Integrator::re_anchor`]).

use std::sync::Arc;
use std::time::Duration;
use valv_audit::{sign_checkpoint, Checkpoint, Frontier, Signer, Verifier};
use valv_store::{Store, StoredCheckpoint};

/// Leaves read from the store per query while catching up.
const CHUNK: u64 = 10_000;

pub struct Integrator {
    store: Arc<dyn Store>,
    signer: Signer,
    frontier: Frontier,
}

/// The log's name: stable for the installation because it derives from its signing key.
pub fn origin_for(seed: &[u8; 32]) -> Result<String, String> {
    use sha2::Digest;
    let public = Signer::new("valv", seed).map_err(|e| e.to_string())?.verifier().public_key();
    let digest = sha2::Sha256::digest(public);
    Ok(format!("valv.local/audit/{}", valv_crypto::hex::encode(&digest[..8])))
}

impl Integrator {
    /// Rebuilds the tree and checks it against the last checkpoint; signs the empty tree on a new log.
    pub async fn start(store: Arc<dyn Store>, seed: &[u8; 32]) -> Result<Self, String> {
        let origin = origin_for(seed)?;
        let signer = Signer::new(&origin, seed).map_err(|e| e.to_string())?;
        let mut it = Integrator { store, signer, frontier: Frontier::new() };
        let last = it.store.latest_checkpoint().await.map_err(|e| e.to_string())?;
        let size = it.store.audit_size().await.map_err(|e| e.to_string())?;
        if let Some(stored) = &last {
            // The columns beside the note are a convenience; only the signed note is trusted.
            let cp = valv_audit::open_checkpoint(&stored.note, &it.signer.verifier())
                .map_err(|e| format!("the last stored checkpoint (size {}) is not validly signed by this log's key: {e}", stored.size))?;
            if cp.size != stored.size || cp.root != stored.root {
                return Err(format!("the last stored checkpoint's columns (size {}) disagree with its signed note (size {})", stored.size, cp.size));
            }
            if cp.size > size {
                return Err(format!(
                    "the audit log holds {size} entries but its last signed checkpoint covers {}: it was truncated or rolled back",
                    cp.size
                ));
            }
            it.catch_up(cp.size).await?;
            if it.frontier.root() != cp.root {
                return Err(format!("the audit log's first {} entries no longer hash to the root signed for them: entries were changed", cp.size));
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
    pub async fn re_anchor(store: Arc<dyn Store>, seed: &[u8; 32], note: &str) -> Result<StoredCheckpoint, String> {
        let origin = origin_for(seed)?;
        let signer = Signer::new(&origin, seed).map_err(|e| e.to_string())?;
        if store.latest_checkpoint().await.map_err(|e| e.to_string())?.is_some() {
            return Err("the audit log has stored checkpoints: there is nothing to re-anchor (run 'valv audit verify')".into());
        }
        let cp = valv_audit::open_checkpoint(note, &signer.verifier()).map_err(|e| format!("the checkpoint is not validly signed by this log's key: {e}"))?;
        let size = store.audit_size().await.map_err(|e| e.to_string())?;
        if cp.size > size {
            return Err(format!("the checkpoint covers {} entries but the log holds {size}: entries were removed", cp.size));
        }
        let mut it = Integrator { store, signer, frontier: Frontier::new() };
        it.catch_up(cp.size).await?;
        if it.frontier.root() != cp.root {
            return Err(format!("the log's first {} entries do not hash to the checkpoint's root: entries were changed", cp.size));
        }
        let stored = StoredCheckpoint { size: cp.size, root: cp.root, note: note.to_string() };
        it.store.save_checkpoint(&stored).await.map_err(|e| e.to_string())?;
        Ok(stored)
    }

    pub fn verifier(&self) -> Verifier {
        self.signer.verifier()
    }

    async fn catch_up(&mut self, to: u64) -> Result<(), String> {
        while self.frontier.size() < to {
            let from = self.frontier.size();
            let leaves = self.store.audit_leaves(from, to.min(from + CHUNK)).await.map_err(|e| e.to_string())?;
            if leaves.is_empty() {
                return Err(format!("audit entries from {from} are missing"));
            }
            leaves.into_iter().for_each(|l| self.frontier.push(l));
        }
        Ok(())
    }

    async fn sign_current(&self) -> Result<StoredCheckpoint, String> {
        let cp = Checkpoint { origin: self.signer.name().to_string(), size: self.frontier.size(), root: self.frontier.root() };
        let note = sign_checkpoint(&cp, &self.signer).map_err(|e| e.to_string())?;
        let stored = StoredCheckpoint { size: cp.size, root: cp.root, note };
        self.store.save_checkpoint(&stored).await.map_err(|e| e.to_string())?;
        Ok(stored)
    }

    /// Integrates what became durable since the last step and signs it; `None` if nothing new.
    pub async fn step(&mut self) -> Result<Option<StoredCheckpoint>, String> {
        let size = self.store.audit_size().await.map_err(|e| e.to_string())?;
        if size <= self.frontier.size() {
            return Ok(None);
        }
        self.catch_up(size).await?;
        self.sign_current().await.map(Some)
    }
}

/// Runs the integrator every `interval` until the process ends; failures are logged and retried.
pub fn spawn(mut integrator: Integrator, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = integrator.step().await {
                tracing::error!(error = %e, "audit integration failed; retrying");
            }
        }
    })
}
