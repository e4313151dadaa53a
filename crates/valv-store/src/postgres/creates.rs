//! Creates, committed in groups: concurrent requests that only create (a POST, an imported
//! Bundle) are gathered by a few tasks and each group written by one `valv_create` call in its
//! own transaction, so PostgreSQL parses, plans, executes and flushes once for many requests.
//! `valv_create` is all or nothing; when a group fails (one request's resource exists, one's
//! data key changed), its requests are written one by one, so each gets its own outcome.

use super::pool::Pool;
use super::store::create_all;
use crate::{StoreError, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Most resources one group writes.
const MAX_GROUP_RESOURCES: usize = 512;
/// Requests waiting at most (callers wait for room beyond that).
const QUEUE: usize = 1024;
/// Groups written at once: one writes while the next gathers.
const WRITERS: usize = 2;

type Job = (Vec<Write>, oneshot::Sender<Result<(), StoreError>>);

pub(super) struct Creator {
    queue: mpsc::Sender<Job>,
    /// Requests written together with others in one call (a test's evidence that groups form).
    #[cfg_attr(not(test), allow(dead_code))]
    grouped: Arc<AtomicU64>,
}

impl Creator {
    pub(super) fn start(pool: Arc<Pool>) -> Creator {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        let grouped = Arc::new(AtomicU64::new(0));
        for _ in 0..WRITERS {
            tokio::spawn(run(pool.clone(), jobs.clone(), grouped.clone()));
        }
        Creator { queue, grouped }
    }

    #[cfg(test)]
    pub(super) fn grouped(&self) -> u64 {
        self.grouped.load(Ordering::Relaxed)
    }

    /// Creates durably, all of `writes` or nothing.
    pub(super) async fn create(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((writes, reply)).await.map_err(|_| StoreError::Backend("the create writer has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("the create writer dropped a request".into()))?
    }
}

async fn run(pool: Arc<Pool>, jobs: Arc<Mutex<mpsc::Receiver<Job>>>, grouped: Arc<AtomicU64>) {
    loop {
        let gathered = super::gather(&mut *jobs.lock().await, MAX_GROUP_RESOURCES, |(writes, _)| writes.len()).await;
        let Some(group) = gathered else { return };
        write_group(&pool, group, &grouped).await;
    }
}

async fn write_group(pool: &Pool, group: Vec<Job>, grouped: &AtomicU64) {
    if group.len() > 1 {
        let all: Vec<&Write> = group.iter().flat_map(|(writes, _)| writes).collect();
        if create_in_pool(pool, &all).await.is_ok() {
            grouped.fetch_add(group.len() as u64, Ordering::Relaxed);
            for (_, reply) in group {
                let _ = reply.send(Ok(()));
            }
            return;
        }
    }
    for (writes, reply) in group {
        let _ = reply.send(create_in_pool(pool, &writes.iter().collect::<Vec<_>>()).await);
    }
}

async fn create_in_pool(pool: &Pool, writes: &[&Write]) -> Result<(), StoreError> {
    let mut c = pool.get().await?;
    create_all(&mut c, writes).await
}
