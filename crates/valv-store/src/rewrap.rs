//! KEK rotation's second half: moving every wrapped data key to the provider's current KEK
//! version. The data keys themselves do not change, so nothing sealed under them is touched and
//! cached keys stay valid. Progress is what is stored: each batch replaces a key only if it is
//! still stored as it was read, so a crashed or interrupted rewrap resumes by running again, and
//! a server and `valv keys rotate --wait` can rewrap side by side without harm.

use crate::vault::random_bytes;
use crate::{Store, StoreError};
use valv_crypto::{KeyProvider, WrappedKey};

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batch {
    /// Keys read that were not under the current version.
    pub found: usize,
    /// Of those, how many this batch replaced (the rest another process had moved meanwhile).
    pub rewrapped: usize,
}

impl Batch {
    /// Whether nothing was left to rewrap when the batch looked.
    pub fn done(&self, limit: usize) -> bool {
        self.found < limit
    }
}

/// Rewraps up to `limit` keys not under the provider's current KEK version. A key the provider
/// cannot unwrap (another provider, a KEK id or version it does not hold) is an error naming it:
/// rotation never skips a key silently.
pub async fn rewrap_batch(store: &dyn Store, provider: &dyn KeyProvider, limit: usize, now: i64) -> Result<Batch, StoreError> {
    let stale = store.keys_not_under(provider.name(), &provider.kek_id(), provider.current_version(), limit).await?;
    let changes = if provider.concurrency() <= 1 {
        stale.iter().map(|(name, old)| rewrap_one(provider, name, old)).collect::<Result<Vec<_>, _>>()?
    } else {
        rewrap_concurrently(provider, &stale)?
    };
    let rewrapped = if changes.is_empty() { 0 } else { store.rewrap_keys(&changes, now).await? };
    Ok(Batch { found: changes.len(), rewrapped })
}

fn rewrap_one(provider: &dyn KeyProvider, name: &str, old: &WrappedKey) -> Result<(String, WrappedKey, WrappedKey), StoreError> {
    let key = provider.unwrap(old, name).map_err(|e| StoreError::Backend(format!("cannot rewrap data key {name}: {e}")))?;
    let new = provider.wrap(&key, name, random_bytes()?)?;
    Ok((name.to_string(), old.clone(), new))
}

/// Rewraps on `provider.concurrency()` threads (a network provider spends its time waiting for
/// answers), keeping the keys' order.
fn rewrap_concurrently(provider: &dyn KeyProvider, stale: &[(String, WrappedKey)]) -> Result<Vec<(String, WrappedKey, WrappedKey)>, StoreError> {
    let per_thread = stale.len().div_ceil(provider.concurrency()).max(1);
    std::thread::scope(|scope| {
        let threads: Vec<_> = stale.chunks(per_thread).map(|chunk| scope.spawn(move || chunk.iter().map(|(n, old)| rewrap_one(provider, n, old)).collect::<Result<Vec<_>, _>>())).collect();
        let mut changes = Vec::with_capacity(stale.len());
        for t in threads {
            changes.extend(t.join().map_err(|_| StoreError::Backend("a rewrap thread panicked".into()))??);
        }
        Ok(changes)
    })
}

/// How many wrapped keys are not under the provider's current KEK version.
pub async fn remaining(store: &dyn Store, provider: &dyn KeyProvider) -> Result<u64, StoreError> {
    Ok(store
        .key_census()
        .await?
        .iter()
        .filter(|c| !(c.provider == provider.name() && c.kek_id == provider.kek_id() && c.kek_version == provider.current_version()))
        .map(|c| c.keys)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use valv_crypto::{DataKey, LocalKeyProvider};

    /// A database in the temporary folder (removed with its WAL when dropped).
    struct TempDb(std::path::PathBuf);

    impl Drop for TempDb {
        fn drop(&mut self) {
            crate::sqlite::remove_files(&self.0);
        }
    }

    async fn store_with_keys(provider: &LocalKeyProvider, n: usize) -> (TempDb, SqliteStore) {
        let path = std::env::temp_dir().join(format!("valv-rewrap-test-{}.db", u64::from_le_bytes(random_bytes().expect("random"))));
        let store = SqliteStore::open(&path).expect("open");
        let dir = TempDb(path);
        for i in 0..n {
            let name = format!("patient:{i}");
            let w = provider.wrap(&DataKey::from_bytes([i as u8; 32]), &name, random_bytes().expect("random")).expect("wrap");
            store.put_key_if_absent(&name, &w, 1).await.expect("put");
        }
        (dir, store)
    }

    #[tokio::test]
    async fn rotation_moves_every_key_and_keeps_it() {
        let mut provider = LocalKeyProvider::generate([1; 32]);
        let (_dir, store) = store_with_keys(&provider, 25).await;
        assert_eq!(remaining(&store, &provider).await.expect("census"), 0);
        provider.rotate([2; 32]);
        assert_eq!(remaining(&store, &provider).await.expect("census"), 25);
        // Batches of 10: three of them, the last one short.
        let mut batches = Vec::new();
        loop {
            let b = rewrap_batch(&store, &provider, 10, 2).await.expect("batch");
            batches.push(b.rewrapped);
            if b.done(10) {
                break;
            }
        }
        assert_eq!(batches, [10, 10, 5]);
        assert_eq!(remaining(&store, &provider).await.expect("census"), 0);
        // The data keys are the same; only version 2 is needed to read them.
        provider.retire(1).expect("retire");
        for i in 0..25 {
            let w = store.get_key(&format!("patient:{i}")).await.expect("get").expect("stored");
            assert_eq!(w.kek_version, 2);
            assert_eq!(provider.unwrap(&w, &format!("patient:{i}")).expect("unwrap").expose(), &[i as u8; 32]);
        }
        let census = store.key_census().await.expect("census");
        assert_eq!((census.len(), census[0].keys, census[0].oldest_wrap), (1, 25, 2));
    }

    /// The local provider, claiming to be a network one that wants calls in flight side by side.
    struct Concurrent(LocalKeyProvider);

    impl KeyProvider for Concurrent {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn kek_id(&self) -> String {
            self.0.kek_id()
        }
        fn current_version(&self) -> u32 {
            self.0.current_version()
        }
        fn versions(&self) -> Vec<u32> {
            self.0.versions()
        }
        fn concurrency(&self) -> usize {
            4
        }
        fn wrap(&self, key: &DataKey, context: &str, nonce: [u8; 12]) -> Result<WrappedKey, valv_crypto::CryptoError> {
            self.0.wrap(key, context, nonce)
        }
        fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, valv_crypto::CryptoError> {
            self.0.unwrap(wrapped, context)
        }
    }

    #[tokio::test]
    async fn a_concurrent_provider_rewraps_every_key_under_its_own_name() {
        let mut local = LocalKeyProvider::generate([1; 32]);
        let (_dir, store) = store_with_keys(&local, 23).await;
        local.rotate([2; 32]);
        let provider = Concurrent(local);
        let b = rewrap_batch(&store, &provider, 100, 2).await.expect("batch");
        assert_eq!((b.found, b.rewrapped), (23, 23));
        assert_eq!(remaining(&store, &provider).await.expect("census"), 0);
        for i in 0..23 {
            let w = store.get_key(&format!("patient:{i}")).await.expect("get").expect("stored");
            assert_eq!(provider.unwrap(&w, &format!("patient:{i}")).expect("unwrap").expose(), &[i as u8; 32], "patient:{i}");
        }
    }

    #[tokio::test]
    async fn a_key_moved_by_someone_else_meanwhile_is_left_alone() {
        let mut provider = LocalKeyProvider::generate([1; 32]);
        let (_dir, store) = store_with_keys(&provider, 1).await;
        provider.rotate([2; 32]);
        let old = store.get_key("patient:0").await.expect("get").expect("stored");
        let key = provider.unwrap(&old, "patient:0").expect("unwrap");
        let first = provider.wrap(&key, "patient:0", [7; 12]).expect("wrap");
        let second = provider.wrap(&key, "patient:0", [8; 12]).expect("wrap");
        assert_eq!(store.rewrap_keys(&[("patient:0".into(), old.clone(), first.clone())], 3).await.expect("rewrap"), 1);
        assert_eq!(store.rewrap_keys(&[("patient:0".into(), old, second)], 4).await.expect("rewrap"), 0, "compare-and-swap");
        assert_eq!(store.get_key("patient:0").await.expect("get"), Some(first));
    }

    #[tokio::test]
    async fn a_key_the_provider_cannot_open_stops_the_rewrap_with_its_name() {
        let provider = LocalKeyProvider::generate([1; 32]);
        let other = LocalKeyProvider::generate([3; 32]);
        let (_dir, store) = store_with_keys(&other, 1).await;
        let err = rewrap_batch(&store, &provider, 10, 2).await.expect_err("foreign key");
        assert!(err.to_string().contains("patient:0"), "{err}");
        assert_eq!(store.get_key("patient:0").await.expect("get").map(|w| w.kek_id), Some(other.kek_id()), "unchanged");
    }
}
