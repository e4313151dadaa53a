//! Reads by id, gathered: concurrent reads of one resource each are sent as one statement over
//! arrays of types and ids, so PostgreSQL binds, plans and executes once for many requests
//! instead of once per request (as creates are gathered in `creates`). Every resource read is
//! checked against its current-version pointer as a single read is.

use super::pool::Pool;
use super::store::current_checked_at;
use super::pg;
use crate::{StoreError, StoredVersion};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Most reads one statement carries.
const MAX_GROUP: usize = 64;
/// Reads waiting at most (callers wait for room beyond that).
const QUEUE: usize = 1024;
/// Statements in flight at once: one runs while the next gathers.
const READERS: usize = 2;

const GROUPED: &str = "SELECT q.n, r.type, r.id, v.version, v.deleted, v.patient, v.last_updated, v.body, r.version \
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(type, id, n) \
    JOIN resources r ON r.type = q.type AND r.id = q.id \
    CROSS JOIN LATERAL (SELECT version, deleted, patient, last_updated, body FROM versions WHERE rid = r.rid ORDER BY version DESC LIMIT 1) v";

type Reply = oneshot::Sender<Result<Option<StoredVersion>, StoreError>>;
type Job = (String, String, Reply);

pub(super) struct Reader {
    queue: mpsc::Sender<Job>,
}

impl Reader {
    pub(super) fn start(pool: Arc<Pool>) -> Reader {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..READERS {
            tokio::spawn(run(pool.clone(), jobs.clone()));
        }
        Reader { queue }
    }

    /// The current version of one resource, read together with whatever other reads wait.
    pub(super) async fn read(&self, resource_type: &str, id: &str) -> Result<Option<StoredVersion>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((resource_type.to_string(), id.to_string(), reply)).await.map_err(|_| StoreError::Backend("the reader has stopped".into()))?;
        answer.await.map_err(|_| StoreError::Backend("the reader dropped a read".into()))?
    }
}

async fn run(pool: Arc<Pool>, jobs: Arc<Mutex<mpsc::Receiver<Job>>>) {
    loop {
        let gathered = super::gather(&mut *jobs.lock().await, MAX_GROUP, |_| 1).await;
        let Some(group) = gathered else { return };
        read_group(&pool, group).await;
    }
}

async fn read_group(pool: &Pool, group: Vec<Job>) {
    let types: Vec<&str> = group.iter().map(|(t, _, _)| t.as_str()).collect();
    let ids: Vec<&str> = group.iter().map(|(_, i, _)| i.as_str()).collect();
    let rows = async { pool.shared().await?.query(GROUPED, &[&types, &ids]).await.map_err(pg("reading resources")) };
    let rows = match rows.await {
        Ok(rows) => rows,
        Err(e) => {
            let message = e.to_string();
            for (_, _, reply) in group {
                let _ = reply.send(Err(StoreError::Backend(message.clone())));
            }
            return;
        }
    };
    let mut found: Vec<Option<tokio_postgres::Row>> = (0..group.len()).map(|_| None).collect();
    for row in rows {
        let n: i64 = row.get(0);
        if let Some(slot) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)).and_then(|i| found.get_mut(i)) {
            *slot = Some(row);
        }
    }
    for ((_, _, reply), row) in group.into_iter().zip(found) {
        let _ = reply.send(current_checked_at(row, 1));
    }
}
