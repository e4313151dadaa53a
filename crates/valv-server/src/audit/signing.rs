//! The keys the audit log signs with: checkpoints, and the erasure ledger and backup manifests
//! that carry the log's name. Key 1 is `checkpoint-signing`, later ones `checkpoint-signing:2`, …
//! (`valv keys rotate --signing-key`), each a data key wrapped by the KEK like the others. The
//! newest signs (a running server's integrator takes a new one up within 10 s); every earlier one stays published (`/audit/keys`) and accepted, so whatever the
//! log ever signed still verifies. All carry the log's name — the origin, derived from key 1 once
//! and for good — so a rotation does not make a new log. The first checkpoint after a switch is
//! signed by the new key and the one before it (see [`crate::audit::integrator`]): a verifier
//! that trusts the old key can learn the new one from the log itself.

use valv_audit::{Signer, Verifier};
use valv_crypto::DataKey;

/// The name of the first signing key; key `n > 1` is `checkpoint-signing:n`.
pub const FIRST_KEY: &str = "checkpoint-signing";

/// The stored name of signing key `n` (from 1).
pub fn key_name(n: usize) -> String {
    if n <= 1 {
        FIRST_KEY.to_string()
    } else {
        format!("{FIRST_KEY}:{n}")
    }
}

/// Every signing key of the log, oldest first.
#[derive(Clone)]
pub struct LogKeys {
    origin: String,
    seeds: Vec<DataKey>,
    /// Every key's vkey, oldest first (what `/audit/keys` serves).
    vkeys: Vec<String>,
}

impl LogKeys {
    /// The keys, oldest first (at least one).
    pub fn new(seeds: Vec<DataKey>) -> Result<Self, String> {
        let first = seeds.first().ok_or("the audit log has no signing key")?;
        let mut keys = LogKeys { origin: crate::audit::integrator::origin_for(first.expose())?, seeds, vkeys: Vec::new() };
        keys.vkeys = keys.verifiers()?.iter().map(Verifier::to_vkey).collect();
        Ok(keys)
    }

    /// Whether the store holds a key newer than these (`valv keys rotate --signing-key` ran).
    pub async fn newer_in(&self, store: &dyn valv_store::Store) -> Result<bool, String> {
        Ok(store.get_key(&key_name(self.seeds.len() + 1)).await.map_err(|e| e.to_string())?.is_some())
    }

    /// Reads every signing key of the vault's store (creating key 1 on first use).
    pub async fn load(vault: &valv_store::vault::Vault, now: i64) -> Result<Self, String> {
        let mut seeds = vec![vault.named_key(FIRST_KEY, now).await.map_err(|e| e.to_string())?];
        while let Some(next) = vault.existing_named_key(&key_name(seeds.len() + 1)).await.map_err(|e| e.to_string())? {
            seeds.push(next);
        }
        Self::new(seeds)
    }

    /// The log's name (its checkpoints' origin).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How many keys the log has had.
    pub fn count(&self) -> usize {
        self.seeds.len()
    }

    /// The newest key, which signs from now on.
    pub fn signer(&self) -> Result<Signer, String> {
        self.signer_at(self.seeds.len() - 1)
    }

    /// The key before the newest, if any (it co-signs the first checkpoint after a switch).
    pub fn previous_signer(&self) -> Option<Result<Signer, String>> {
        (self.seeds.len() > 1).then(|| self.signer_at(self.seeds.len() - 2))
    }

    /// Every key, oldest first (what signs the erasure ledger: see `valv_audit::ledger`).
    pub fn signers(&self) -> Result<Vec<Signer>, String> {
        (0..self.seeds.len()).map(|i| self.signer_at(i)).collect()
    }

    fn signer_at(&self, i: usize) -> Result<Signer, String> {
        Signer::new(&self.origin, self.seeds[i].expose()).map_err(|e| e.to_string())
    }

    /// Verifiers of every key, oldest first: what checks anything the log ever signed.
    pub fn verifiers(&self) -> Result<Vec<Verifier>, String> {
        (0..self.seeds.len()).map(|i| self.signer_at(i).map(|s| s.verifier())).collect()
    }

    /// The verifier keys (C2SP vkeys) of every key, oldest first.
    pub fn vkeys(&self) -> &[String] {
        &self.vkeys
    }

    /// The newest key's vkey (`/audit/key`).
    pub fn current_vkey(&self) -> &str {
        self.vkeys.last().map_or("", String::as_str)
    }

    /// The vkey of the key that signed `note` (the newest if none of them did): what to hand
    /// out with a checkpoint so that one key checks it.
    pub fn vkey_of(&self, note: &str) -> Result<String, String> {
        let verifiers = self.verifiers()?;
        let parsed = valv_audit::note::Note::parse(note).ok();
        let signed = verifiers.iter().rev().find(|v| parsed.as_ref().is_some_and(|n| n.verify(std::slice::from_ref(v)).is_ok()));
        Ok(signed.or(verifiers.last()).map(Verifier::to_vkey).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_first_keys_origin_and_every_signature_verifies() {
        let one = LogKeys::new(vec![DataKey::from_bytes([1; 32])]).expect("keys");
        let two = LogKeys::new(vec![DataKey::from_bytes([1; 32]), DataKey::from_bytes([2; 32])]).expect("keys");
        assert_eq!(one.origin(), two.origin(), "a rotation keeps the log's name");
        assert!(two.previous_signer().is_some() && one.previous_signer().is_none());
        let old_note = valv_audit::note::sign("text\n", &[&one.signer().expect("signer")]).expect("sign");
        let new_note = valv_audit::note::sign("text\n", &[&two.signer().expect("signer")]).expect("sign");
        let verifiers = two.verifiers().expect("verifiers");
        assert!(valv_audit::note::open(&old_note, &verifiers).is_ok() && valv_audit::note::open(&new_note, &verifiers).is_ok());
        assert!(valv_audit::note::open(&new_note, &one.verifiers().expect("verifiers")).is_err(), "the old key alone does not check the new");
        let vkeys = two.vkeys();
        assert_eq!(two.vkey_of(&old_note).expect("vkey"), vkeys[0]);
        assert_eq!(two.vkey_of(&new_note).expect("vkey"), vkeys[1]);
        assert_eq!(key_name(1), "checkpoint-signing");
        assert_eq!(key_name(3), "checkpoint-signing:3");
    }
}
