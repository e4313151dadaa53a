//! A small pool of PostgreSQL connections, each with its own cache of prepared statements.
//!
//! Why not a pool crate: what Valv needs is a bounded number of connections made on demand, a
//! broken one dropped instead of reused, and statements prepared once per connection — some
//! thirty lines over `tokio-postgres`, where `deadpool-postgres` or `bb8` would add their
//! runtime abstractions and configuration surface. Connections are made lazily, so a server
//! started while the database is down starts answering 503 and serves again as soon as a
//! connection can be made, without a restart.
//!
//! Besides the pool, [`SHARED`] connections are read through by many requests at once
//! ([`Pool::shared`]): tokio-postgres pipelines the statements of concurrent callers on one
//! connection, so a backend takes several reads per wake-up instead of one round trip each.

use super::tls::Tls;
use super::pg;
use crate::StoreError;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

/// How long a request waits for a free connection before it is answered 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Statements cached per connection; search statements vary in shape, so the cache is bounded.
const STATEMENT_CACHE: usize = 256;
/// Connections shared by single-statement reads (outside the pool's count). Measured: reads by
/// id +14% with PostgreSQL's CPU per read -25%, searches by patient (a page's reads sent at
/// once) 1.69x (bench/README.md, "Reads pipelined on shared connections").
const SHARED: usize = 2;

pub(super) struct Pool {
    config: tokio_postgres::Config,
    tls: Tls,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    shared: [tokio::sync::Mutex<Option<Arc<SharedConn>>>; SHARED],
    turn: AtomicUsize,
}

/// A connection many requests read through at once, each with one statement outside a
/// transaction; replaced by a new one once it is found closed.
pub(super) struct SharedConn {
    client: Client,
    task: tokio::task::JoinHandle<()>,
    statements: Mutex<HashMap<String, Statement>>,
}

impl Drop for SharedConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection: the client, the task driving its socket, and its prepared statements.
pub(super) struct Conn {
    client: Client,
    task: tokio::task::JoinHandle<()>,
    statements: HashMap<String, Statement>,
    /// Inside `BEGIN` … `COMMIT`: a connection given back in this state (a cancelled request)
    /// is closed rather than reused.
    in_transaction: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection lent out of the pool; given back when dropped, unless it broke.
pub(super) struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
    _permit: SemaphorePermit<'a>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !conn.in_transaction && !conn.client.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(conn);
                }
            }
        }
    }
}

impl std::ops::Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("a lease holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a lease holds its connection until dropped")
    }
}

impl Pool {
    pub(super) fn new(config: tokio_postgres::Config, tls: Tls, size: usize) -> Pool {
        Pool { config, tls, idle: Mutex::new(Vec::new()), permits: Semaphore::new(size.max(1)), shared: Default::default(), turn: AtomicUsize::new(0) }
    }

    /// A connection shared with other readers (the next of [`SHARED`] in turn), made again if
    /// it closed: for one statement outside a transaction.
    pub(super) async fn shared(&self) -> Result<Arc<SharedConn>, StoreError> {
        let slot = &self.shared[self.turn.fetch_add(1, Ordering::Relaxed) % SHARED];
        let mut held = tokio::time::timeout(ACQUIRE_TIMEOUT, slot.lock())
            .await
            .map_err(|_| StoreError::Backend("PostgreSQL: a shared connection is still being made".into()))?;
        if let Some(conn) = held.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        let (client, task) = self.open().await?;
        let conn = Arc::new(SharedConn { client, task, statements: Mutex::new(HashMap::new()) });
        *held = Some(conn.clone());
        Ok(conn)
    }

    /// A connection: an idle one that is still open, or a new one.
    pub(super) async fn get(&self) -> Result<Lease<'_>, StoreError> {
        let permit = tokio::time::timeout(ACQUIRE_TIMEOUT, self.permits.acquire())
            .await
            .map_err(|_| StoreError::Backend("PostgreSQL: every connection of the pool is busy".into()))?
            .map_err(|_| StoreError::Backend("PostgreSQL: the pool is closed".into()))?;
        let reused = {
            let mut idle = self.idle.lock().map_err(|_| StoreError::Backend("PostgreSQL: pool lock poisoned".into()))?;
            idle.retain(|c| !c.client.is_closed());
            idle.pop()
        };
        let conn = match reused {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        Ok(Lease { pool: self, conn: Some(conn), _permit: permit })
    }

    /// A new connection; outside the pool's count when called directly (the holder of this
    /// server's duty locks keeps one of its own).
    pub(super) async fn connect(&self) -> Result<Conn, StoreError> {
        let (client, task) = self.open().await?;
        Ok(Conn { client, task, statements: HashMap::new(), in_transaction: false })
    }

    /// A new connection with the session settings every statement relies on.
    async fn open(&self) -> Result<(Client, tokio::task::JoinHandle<()>), StoreError> {
        let (client, task) = self.tls.connect(&self.config).await.map_err(pg("connecting"))?;
        // Nothing is acknowledged before it is flushed (and, with a synchronous standby named on
        // the primary, flushed there too): a role or database configured for less is overruled.
        let level: String = client.query_one("SELECT current_setting('synchronous_commit')", &[]).await.map_err(pg("reading synchronous_commit"))?.get(0);
        if level == "off" || level == "local" {
            client.batch_execute("SET synchronous_commit = on").await.map_err(pg("setting synchronous_commit"))?;
        }
        // Every statement is prepared once per connection and its shape alone picks the plan
        // (a key, an index range). With the default, statistics skewed by one large type (tens of
        // thousands of Observations) made PostgreSQL plan the read by id again on every call:
        // measured, 125 µs of planning for 20 µs of execution, reads 9.5k -> 6k/s.
        client.batch_execute("SET plan_cache_mode = force_generic_plan").await.map_err(pg("setting plan_cache_mode"))?;
        Ok((client, task))
    }
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl SharedConn {
    pub(super) async fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query_opt(&s, params).await
    }

    pub(super) async fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query(&s, params).await
    }

    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.statements.lock().ok().and_then(|m| m.get(sql).cloned());
        if let Some(s) = cached {
            return Ok(s);
        }
        // Prepared outside the lock: other readers go on meanwhile.
        let s = self.client.prepare(sql).await?;
        if let Ok(mut m) = self.statements.lock() {
            remember(&mut m, sql, &s);
        }
        Ok(s)
    }
}

/// Keeps a statement prepared for `sql` in a connection's cache, bounded by [`STATEMENT_CACHE`].
fn remember(statements: &mut HashMap<String, Statement>, sql: &str, s: &Statement) {
    if statements.len() >= STATEMENT_CACHE {
        statements.clear();
    }
    statements.insert(sql.to_string(), s.clone());
}

impl Conn {
    /// The statement prepared for `sql` on this connection (prepared on first use).
    async fn statement(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        remember(&mut self.statements, sql, &s);
        Ok(s)
    }

    pub(super) async fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query(&s, params).await
    }

    pub(super) async fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query_opt(&s, params).await
    }

    pub(super) async fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.query_one(&s, params).await
    }

    pub(super) async fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64, tokio_postgres::Error> {
        let s = self.statement(sql).await?;
        self.client.execute(&s, params).await
    }

    pub(super) async fn batch(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }

    pub(super) async fn begin(&mut self) -> Result<(), StoreError> {
        self.in_transaction = true;
        self.client.batch_execute("BEGIN").await.map_err(pg("starting a transaction"))
    }

    /// Commits after `outcome` succeeded (durably: `synchronous_commit` is on), rolls back after
    /// it failed; returns the outcome, or the commit's failure.
    pub(super) async fn finish<T>(&mut self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        let end = if outcome.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = self.client.batch_execute(end).await;
        self.in_transaction = ended.is_err();
        let value = outcome?;
        ended.map_err(pg("committing"))?;
        Ok(value)
    }
}
