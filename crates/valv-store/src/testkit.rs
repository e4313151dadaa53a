//! What the backends' tests share: a stored version to write, and checks every `Store` must pass
//! the same way.

use crate::{Expect, Filter, Store, StoreError, StoredVersion, Write};
use std::sync::Arc;

/// Version `v` of Patient `id`, owned by itself, with a body of `v` bytes repeated.
pub fn version(id: &str, v: u64) -> StoredVersion {
    StoredVersion { resource_type: "Patient".into(), id: id.into(), version: v, patient: Some(id.into()), deleted: false, last_updated: v as i64, body: vec![v as u8; 40] }
}

/// Sixteen concurrent creates of different ids under one condition, each create's tokens meeting
/// it: exactly one commits, the others fail with [`StoreError::Matched`]; a condition nothing
/// meets lets a create through.
pub async fn concurrent_conditional_creates_make_one(store: Arc<dyn Store>) {
    let unless = Filter { resource_type: "Patient".into(), token_groups: vec![vec![[6; 16]]], ..Filter::default() };
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (s, unless) = (store.clone(), unless.clone());
            tokio::spawn(async move {
                s.commit(vec![Write { expect: Expect::Absent, version: version(&format!("c{i}"), 1), tokens: vec![[6; 16]], sealed_with: None, unless: Some(unless) }]).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.is_ok() || matches!(o, Err(StoreError::Matched(_)))), "{outcomes:?}");
    assert_eq!(store.search(&unless).await.expect("search").len(), 1);
    let other = Filter { token_groups: vec![vec![[7; 16]]], ..unless.clone() };
    store.commit(vec![Write { expect: Expect::Absent, version: version("d", 1), tokens: vec![[6; 16]], sealed_with: None, unless: Some(other) }]).await.expect("create");
}
