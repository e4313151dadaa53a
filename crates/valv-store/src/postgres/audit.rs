//! Audit appends, committed in groups: one task per server takes every append waiting, gives the
//! entries the next leaf indices and commits them in one transaction (one WAL flush for the
//! group). Servers sharing the database take turns on an advisory lock held until commit, so
//! indices are assigned in commit order, consecutively, and never twice.

use super::pool::{Conn, Pool};
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
    while let Some(first) = jobs.recv().await {
        let mut entries = first.0.len();
        let mut group = vec![first];
        while entries < MAX_GROUP_ENTRIES {
            match jobs.try_recv() {
                Ok(job) => {
                    entries += job.0.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
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
    let mut c = pool.get().await?;
    c.begin().await?;
    let outcome = insert_group(&mut c, group).await;
    c.finish(outcome).await
}

async fn insert_group(c: &mut Conn, group: &[Job]) -> Result<u64, StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_APPEND_LOCK]).await.map_err(pg("waiting to append to the audit log"))?;
    let next: i64 = c.query_one("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries", &[]).await.map_err(pg("reading the log's size"))?.get(0);
    let rows = group.iter().flat_map(|(rows, _)| rows);
    let (mut leaves, mut sealed, mut tokens, mut queries) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        leaves.push(&r.leaf_hash[..]);
        sealed.push(&r.sealed[..]);
        tokens.push(r.patient_token.as_ref().map(|t| &t[..]));
        queries.push(r.query_sealed.as_deref());
    }
    c.execute(
        "INSERT INTO audit_entries (idx, leaf_hash, sealed, patient_token, query_sealed) \
         SELECT $1 + n - 1, l, s, p, q FROM unnest($2::bytea[], $3::bytea[], $4::bytea[], $5::bytea[]) WITH ORDINALITY AS u(l, s, p, q, n)",
        &[&next, &leaves, &sealed, &tokens, &queries],
    )
    .await
    .map_err(pg("appending to the audit log"))?;
    uint(next)
}
