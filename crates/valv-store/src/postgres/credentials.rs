//! API-key records served from memory, for as long as this server is told of every change.
//!
//! Every request with an API key looked the key up in the database: one round trip of a read
//! that is otherwise two. Here a record read once is kept — but only while a connection of its
//! own is `LISTEN`ing on `valv_credentials`, which a trigger on `api_keys` notifies on every
//! UPDATE, DELETE or TRUNCATE (a revocation, through any server or `valv apikey revoke`, or an
//! edit by hand). A notification empties the cache; so does losing that connection, after which
//! every lookup goes to the database again until it is back. A revocation therefore takes effect
//! on every server as soon as its notification arrives (PostgreSQL delivers it at commit; on a
//! healthy connection, within milliseconds), on the revoking server at once. Unknown keys are
//! never cached: a flood of wrong keys costs what it did before. The record carries its MAC, which
//! the caller checks on every use, as on a database read.

use super::tls::Tls;
use crate::ApiKeyRecord;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The channel the `api_keys` trigger notifies (schema migration 2).
pub(super) const CHANNEL: &str = "valv_credentials";
/// Most records kept; beyond that the cache starts over (keys in use are few).
const CAPACITY: usize = 10_000;
/// How often the listening connection is checked, and how long to wait before reconnecting.
const CHECK_EVERY: Duration = Duration::from_secs(5);
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct KeyCache {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Whether a `LISTEN` is in place: nothing is served from or added to the cache otherwise.
    listening: bool,
    /// Bumped by every invalidation, so that a record read before one is not stored after it.
    generation: u64,
    records: HashMap<[u8; 32], ApiKeyRecord>,
}

impl KeyCache {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update: start the cache over.
        let mut state = self.state.lock().unwrap_or_else(|poisoned| {
            let mut s = poisoned.into_inner();
            s.records.clear();
            s.generation += 1;
            s
        });
        f(&mut state)
    }

    pub(super) fn get(&self, hash: &[u8; 32]) -> Option<ApiKeyRecord> {
        self.with(|s| if s.listening { s.records.get(hash).cloned() } else { None })
    }

    /// The generation to hand back to [`KeyCache::put`] with a record about to be read, or
    /// `None` when nothing may be cached.
    pub(super) fn generation(&self) -> Option<u64> {
        self.with(|s| s.listening.then_some(s.generation))
    }

    /// Keeps `record`, read during `generation`, unless something changed since.
    pub(super) fn put(&self, generation: u64, record: ApiKeyRecord) {
        self.with(|s| {
            if s.listening && s.generation == generation {
                if s.records.len() >= CAPACITY {
                    s.records.clear();
                }
                s.records.insert(record.hash, record);
            }
        });
    }

    pub(super) fn invalidate(&self) {
        self.with(|s| {
            s.records.clear();
            s.generation += 1;
        });
    }

    fn set_listening(&self, listening: bool) {
        self.with(|s| {
            s.records.clear();
            s.generation += 1;
            s.listening = listening;
        });
    }

    #[cfg(test)]
    pub(super) fn is_listening(&self) -> bool {
        self.with(|s| s.listening)
    }
}

/// Keeps a connection listening for credential changes while `cache` lives, reconnecting after
/// a loss.
pub(super) fn spawn_listener(config: tokio_postgres::Config, tls: Tls, cache: &Arc<KeyCache>) {
    let cache = Arc::downgrade(cache);
    tokio::spawn(async move {
        loop {
            let ended = listen(&config, &tls, &cache).await;
            let Some(live) = cache.upgrade() else { return };
            live.set_listening(false);
            if let Err(e) = ended {
                tracing::warn!(error = %e, "not listening for credential changes; API keys are read from the database until it is back");
            }
            drop(live);
            tokio::time::sleep(RETRY_AFTER).await;
        }
    });
}

/// One listening connection, until it fails or the cache is gone.
async fn listen(config: &tokio_postgres::Config, tls: &Tls, cache: &Weak<KeyCache>) -> Result<(), String> {
    let (client, mut notified) = tls.connect_listening(config).await.map_err(|e| e.to_string())?;
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| e.to_string())?;
    match cache.upgrade() {
        Some(c) => c.set_listening(true),
        None => return Ok(()),
    }
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            n = notified.recv() => match (n, cache.upgrade()) {
                (Some(()), Some(c)) => c.invalidate(),
                (None, _) => return Err("the listening connection ended".into()),
                (_, None) => return Ok(()),
            },
            _ = check.tick() => {
                if cache.strong_count() == 0 {
                    return Ok(());
                }
                // A connection that died without a word is found here, not by the next change.
                tokio::time::timeout(CHECK_EVERY, client.simple_query("SELECT 1"))
                    .await
                    .map_err(|_| "the listening connection stopped answering".to_string())?
                    .map_err(|e| e.to_string())?;
            }
        }
    }
}
