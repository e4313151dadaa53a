//! A bounded cache of unwrapped data keys: entries expire after a time-to-live and the oldest
//! goes when the cache is full; a dropped key is zeroized by [`valv_crypto::DataKey`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use valv_crypto::DataKey;

/// An unwrapped data key and the wrapped form it was read as (which a write names, so that a
/// key replaced by another process meanwhile is noticed: [`crate::Write::sealed_with`]).
#[derive(Clone)]
pub struct CachedKey {
    pub key: DataKey,
    /// Shared, so that handing it out with every use costs no copy.
    pub wrapped: std::sync::Arc<[u8]>,
}

pub struct KeyCache {
    entries: Mutex<HashMap<String, (CachedKey, Instant)>>,
    capacity: usize,
    ttl: Duration,
}

impl KeyCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        KeyCache { entries: Mutex::new(HashMap::new()), capacity, ttl }
    }

    pub fn get(&self, name: &str) -> Option<CachedKey> {
        let mut map = self.entries.lock().ok()?;
        match map.get(name) {
            Some((k, at)) if at.elapsed() < self.ttl => Some(k.clone()),
            Some(_) => {
                map.remove(name);
                None
            }
            None => None,
        }
    }

    /// Drops a key now (its bytes are zeroized with it).
    pub fn remove(&self, name: &str) {
        if let Ok(mut map) = self.entries.lock() {
            map.remove(name);
        }
    }

    pub fn insert(&self, name: &str, key: CachedKey) {
        let Ok(mut map) = self.entries.lock() else { return };
        if map.len() >= self.capacity && !map.contains_key(name) {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= self.capacity {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(n, _)| n.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(name.to_string(), (key, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        let c = KeyCache::new(2, Duration::from_secs(60));
        for n in ["a", "b", "c"] {
            c.insert(n, CachedKey { key: DataKey::from_bytes([1; 32]), wrapped: vec![1].into() });
        }
        assert!(c.get("a").is_none(), "oldest evicted");
        assert!(c.get("c").is_some());
        let short = KeyCache::new(2, Duration::from_millis(0));
        short.insert("x", CachedKey { key: DataKey::from_bytes([1; 32]), wrapped: vec![1].into() });
        assert!(short.get("x").is_none(), "expired");
    }
}
