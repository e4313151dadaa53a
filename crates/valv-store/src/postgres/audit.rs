//! Audit appends, committed in groups: one task per server takes every append waiting, gives the
//! entries the next leaf indices and commits them in one transaction (one WAL flush for the
//! group). Servers sharing the database take turns on an advisory lock held until commit, so
//! indices are assigned in commit order, consecutively, and never twice.

use super::pool::Pool;
use super::{pg, uint, AUDIT_APPEND_LOCK};
use crate::{AuditRow, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most entries one group commits.
const MAX_GROUP_ENTRIES: usize = 1024;
/// Appends waiting for the task at most (callers wait for room beyond that).
const QUEUE: usize = 4096;

type Job = (Vec<AuditRow>, oneshot::Sender<Result<u64, StoreError>>);

pub(super) struct Appender {
    queue: mpsc::Sender<Job>,
}

impl Appender {
    pub(super) fn start(pool: Arc<Pool>) -> Appender {
        let (queue, jobs) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, jobs));
        Appender { queue }
    }

    /// Appends durably; returns the first entry's leaf index.
    pub(super) async fn append(&self, rows: Vec<AuditRow>) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((rows, reply)).await.map_err(|_| StoreError::Backend("the audit appender has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("the audit appender dropped an append".into()))?
    }
}

async fn run(pool: Arc<Pool>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(group) = super::gather(&mut jobs, MAX_GROUP_ENTRIES, |(rows, _)| rows.len()).await {
        match commit_group(&pool, &group).await {
            Ok(first_index) => {
                let mut next = first_index;
                for (rows, reply) in group {
                    let _ = reply.send(Ok(next));
                    next += rows.len() as u64;
                }
            }
            Err(e) => {
                // Every append of the group fails alike (StoreError is not Clone); the message
                // stays as the store gave it, without a second "storage backend:" prefix.
                let message = match e {
                    StoreError::Backend(m) => m,
                    other => other.to_string(),
                };
                for (_, reply) in group {
                    let _ = reply.send(Err(StoreError::Backend(message.clone())));
                }
            }
        }
    }
}

async fn commit_group(pool: &Pool, group: &[Job]) -> Result<u64, StoreError> {
    let rows = group.iter().flat_map(|(rows, _)| rows);
    let (mut leaves, mut sealed, mut tokens, mut queries) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        leaves.push(&r.leaf_hash[..]);
        sealed.push(&r.sealed[..]);
        tokens.push(r.patient_token.as_ref().map(|t| &t[..]));
        queries.push(r.query_sealed.as_deref());
    }
    // One statement, its own transaction: the function takes the append lock, reads the next
    // index and inserts; the commit (flushed, synchronous_commit) releases the lock.
    let next: i64 = pool
        .get()
        .await?
        .query_one("SELECT valv_audit_append($1, $2, $3, $4, $5)", &[&AUDIT_APPEND_LOCK, &leaves, &sealed, &tokens, &queries])
        .await
        .map_err(pg("appending to the audit log"))?
        .get(0);
    uint(next)
}
