//! The PostgreSQL backend: the same [`crate::Store`] contract as SQLite, for installations that
//! outgrow one machine (several Valv servers on one database, a streaming-replication standby).
//!
//! - Connections: a small pool of `tokio-postgres` connections made on demand ([`pool`]), TLS
//!   with rustls ([`tls`]); a multi-host connection string with `target_session_attrs=read-write`
//!   finds the primary after a failover. While no connection can be made, calls fail (503) and
//!   the next call tries again: no restart is needed.
//! - Durability: every commit waits for `synchronous_commit` (a session asking for less is set
//!   to `on`), so nothing is acknowledged before it is flushed — on two machines when the
//!   primary names a synchronous standby. Audit entries are committed in groups by one task per
//!   server ([`audit`]).
//! - Least privilege, enforced by PostgreSQL itself: migrations run as the owner role; the
//!   serving role is granted only what serving needs ([`schema::SERVING_GRANTS`]) — on
//!   `audit_entries` that is `SELECT` and `INSERT`, never `UPDATE`, `DELETE` or `TRUNCATE` — and
//!   cannot change the schema. Triggers refuse changing or removing audit rows to every role,
//!   the owner included: an owner must first disable them (visible in the catalog), and what it
//!   then changes is caught by `valv audit verify`.

mod audit;
mod creates;
mod reads;
mod credentials;
mod load;
mod pool;
mod schema;
mod snapshot;
mod store;
#[cfg(test)]
mod tests;
pub mod tls;

pub use load::PgLoad;

use crate::StoreError;
use pool::Pool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The advisory lock keys ("valv" in ASCII, then a number): migrations, audit appends, the
/// numbering of erasures, the duties ([`crate::Duty`]), and an erasure against the creation
/// of that patient's key (with the patient's hash as the second half).
const MIGRATION_LOCK: i64 = 0x7661_6c76_0000_0001;
const AUDIT_APPEND_LOCK: i64 = 0x7661_6c76_0000_0002;
const ERASURE_SEQ_LOCK: i64 = 0x7661_6c76_0000_0003;
const INTEGRATOR_LOCK: i64 = 0x7661_6c76_0000_0004;
const DETECTOR_LOCK: i64 = 0x7661_6c76_0000_0005;
const FORWARDER_LOCK: i64 = 0x7661_6c76_0000_0006;
const ERASURE_LOCK_SPACE: i32 = 0x7661_6c76;
/// Advisory locks `(CONDITION_LOCK_SPACE, hashtext(condition))` serialise conditional creates of
/// one condition across servers.
const CONDITION_LOCK_SPACE: i32 = 0x7661_6c77;

/// Maps a driver error to the store's: the server's own message (e.g. "permission denied for
/// table audit_entries"), never the query or its values.
pub(crate) fn pg(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError {
    move |e| {
        let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| {
            // "error connecting to server: Connection refused (os error 111)" and the like.
            let mut s = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                s = format!("{s}: {source}");
            }
            s
        });
        StoreError::Backend(format!("PostgreSQL: {what}: {detail}"))
    }
}

/// Whether the error is a unique-key violation (a concurrent writer took the key first).
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// How to reach the database (`[store]` in valv.toml).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// A libpq connection string or URL; several hosts may be listed.
    pub url: String,
    /// The password, read from a file (never written in the configuration).
    pub password: Option<String>,
    /// The CA certificates (PEM) the server's certificate must chain to: TLS is required then.
    pub ca_file: Option<PathBuf>,
    /// Plaintext to a host that is not on this machine (only on an isolated network).
    pub allow_plaintext: bool,
    /// Most connections this server holds.
    pub pool_size: usize,
}

/// A connection string, with what Valv always sets: timeouts, the application name, and — for a
/// list of hosts — that only the writable primary is taken.
fn connection_config(settings: &Settings) -> Result<(tokio_postgres::Config, tls::Tls), StoreError> {
    let mut config: tokio_postgres::Config = settings.url.parse().map_err(|e| StoreError::Backend(format!("the PostgreSQL connection string: {e}")))?;
    if config.get_password().is_some() && settings.password.is_some() {
        return Err(StoreError::Backend("the PostgreSQL password is given twice (in the connection string and a file)".into()));
    }
    if let Some(p) = &settings.password {
        config.password(p.trim_end_matches(['\r', '\n']));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives_idle(Duration::from_secs(30));
    config.application_name("valv");
    config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    let tls = match &settings.ca_file {
        Some(ca) => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            tls::Tls::Rustls(tls::MakeRustls(tls::client_config(ca).map_err(|e| StoreError::Backend(format!("PostgreSQL TLS: {e}")))?))
        }
        None => {
            let remote: Vec<String> = config
                .get_hosts()
                .iter()
                .filter_map(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) if !is_loopback(name) => Some(name.clone()),
                    _ => None,
                })
                .collect();
            if !remote.is_empty() && !settings.allow_plaintext {
                return Err(StoreError::Backend(format!(
                    "PostgreSQL at {} would be reached without TLS: set store.ca_file (or store.allow_plaintext = true on an isolated network)",
                    remote.join(",")
                )));
            }
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            tls::Tls::Plain
        }
    };
    Ok((config, tls))
}

/// Whether a connection string carries a password (which belongs in a file, not the configuration).
pub fn has_password(url: &str) -> bool {
    url.parse::<tokio_postgres::Config>().is_ok_and(|c| c.get_password().is_some())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// The PostgreSQL store: a pool, and the task committing audit entries in groups.
pub struct PgStore {
    pool: Arc<Pool>,
    audit: audit::Appender,
    creates: creates::Creator,
    reads: reads::Reader,
    /// The connection holding the advisory locks of the duties this process leads.
    leader: tokio::sync::Mutex<Leader>,
    /// API-key records, while a connection listens for their changes.
    credentials: Arc<credentials::KeyCache>,
}

/// A connection made to hold duty locks, and the duties it holds them for.
#[derive(Default)]
struct Leader {
    conn: Option<pool::Conn>,
    held: Vec<crate::Duty>,
}

fn duty_lock(duty: crate::Duty) -> i64 {
    match duty {
        crate::Duty::Integration => INTEGRATOR_LOCK,
        crate::Duty::Detection => DETECTOR_LOCK,
        crate::Duty::Forwarding => FORWARDER_LOCK,
    }
}

impl PgStore {
    /// Connects (at least once, so a wrong address or password is reported at start) and
    /// checks the schema: a database behind this build is migrated when the role may (it owns
    /// the database: a first try), else start is refused with what to run.
    pub async fn open(settings: &Settings) -> Result<PgStore, StoreError> {
        let (config, tls) = connection_config(settings)?;
        let pool = Arc::new(Pool::new(config.clone(), tls.clone(), settings.pool_size));
        let credentials = Arc::new(credentials::KeyCache::default());
        let store = PgStore { audit: audit::Appender::start(pool.clone()), creates: creates::Creator::start(pool.clone()), reads: reads::Reader::start(pool.clone()), pool, leader: Default::default(), credentials };
        let version = store.schema_version().await?;
        let newest = newest_version();
        if version > newest {
            return Err(StoreError::Backend(format!("the database's schema is version {version}, newer than this Valv's ({newest}): upgrade Valv")));
        }
        if version < newest {
            store.migrate(None).await.map_err(|e| match e {
                StoreError::Backend(m) if m.contains("permission denied") || m.contains("must be owner") => StoreError::Backend(format!(
                    "the database's schema is at version {version} of {newest} and this role may not change it: run 'valv migrate' with the owner role ({m})"
                )),
                other => other,
            })?;
        }
        credentials::spawn_listener(config, tls, &store.credentials);
        Ok(store)
    }

    /// See [`crate::Store::lead`]: the connection holding this server's duty locks is checked
    /// each time (a half-open connection is found by the query failing; every lock on it went
    /// with it), and a lock not held is tried for.
    async fn hold_duty(&self, duty: crate::Duty) -> Result<bool, StoreError> {
        let mut leader = self.leader.lock().await;
        if let Some(conn) = leader.conn.as_mut() {
            match conn.query_one("SELECT 1", &[]).await {
                Ok(_) if leader.held.contains(&duty) => return Ok(true),
                Ok(_) => {}
                Err(e) => {
                    for lost in std::mem::take(&mut leader.held) {
                        tracing::warn!(error = %e, duty = ?lost, "the connection holding a duty's lock was lost");
                    }
                    leader.conn = None;
                }
            }
        }
        let conn = match leader.conn.as_mut() {
            Some(c) => c,
            None => leader.conn.insert(self.pool.connect().await?),
        };
        let taken: bool = conn.query_one("SELECT pg_try_advisory_lock($1)", &[&duty_lock(duty)]).await.map_err(pg("asking for a duty's lock"))?.get(0);
        if taken {
            leader.held.push(duty);
        }
        Ok(taken)
    }

    async fn schema_version(&self) -> Result<i32, StoreError> {
        let mut c = self.pool.get().await?;
        let exists = c.query_one("SELECT to_regclass('valv_schema') IS NOT NULL", &[]).await.map_err(pg("reading the schema version"))?;
        if !exists.get::<_, bool>(0) {
            return Ok(0);
        }
        Ok(c.query_one("SELECT coalesce(max(version), 0) FROM valv_schema", &[]).await.map_err(pg("reading the schema version"))?.get(0))
    }

    /// Brings the schema to the newest version (as the owner role) and grants `serving_role`
    /// what serving needs; two servers migrating at once take turns. Returns the version.
    pub async fn migrate(&self, serving_role: Option<&str>) -> Result<i32, StoreError> {
        let serving = serving_role.map(role_identifier).transpose()?;
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = migrate_in(&mut c, serving.as_deref()).await;
        c.finish(outcome).await
    }
}

/// A group for a group commit: the next job (waiting for one), then every job already queued
/// while the group's `size` stays under `max`. `None` once the queue is closed.
async fn gather<J>(jobs: &mut tokio::sync::mpsc::Receiver<J>, max: usize, size: impl Fn(&J) -> usize) -> Option<Vec<J>> {
    let first = jobs.recv().await?;
    let mut total = size(&first);
    let mut group = vec![first];
    while total < max {
        match jobs.try_recv() {
            Ok(job) => {
                total += size(&job);
                group.push(job);
            }
            Err(_) => break,
        }
    }
    Some(group)
}

fn newest_version() -> i32 {
    schema::MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

async fn migrate_in(c: &mut pool::Conn, serving: Option<&str>) -> Result<i32, StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg("waiting for another migration"))?;
    c.batch("CREATE TABLE IF NOT EXISTS valv_schema (version INTEGER NOT NULL)").await.map_err(pg("creating valv_schema"))?;
    let current: i32 = c.query_one("SELECT coalesce(max(version), 0) FROM valv_schema", &[]).await.map_err(pg("reading the schema version"))?.get(0);
    for (version, sql) in schema::MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        c.batch(sql).await.map_err(pg("applying a migration"))?;
        c.execute("INSERT INTO valv_schema (version) VALUES ($1)", &[version]).await.map_err(pg("recording the schema version"))?;
    }
    for (table, privileges) in schema::SERVING_GRANTS {
        c.batch(&format!("REVOKE ALL ON {table} FROM PUBLIC")).await.map_err(pg("revoking"))?;
        if let Some(role) = serving {
            c.batch(&format!("REVOKE ALL ON {table} FROM {role}; GRANT {privileges} ON {table} TO {role}")).await.map_err(pg("granting"))?;
        }
    }
    Ok(newest_version().max(current))
}

/// A role name is written into GRANT statements: only plain lower-case identifiers are taken.
fn role_identifier(role: &str) -> Result<String, StoreError> {
    let plain = !role.is_empty()
        && role.len() <= 63
        && role.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && role.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        Ok(format!("\"{role}\""))
    } else {
        Err(StoreError::Backend(format!("'{role}' is not a plain role name (a-z, 0-9, _)")))
    }
}

/// Integer columns are BIGINT: values above i64::MAX are refused, not wrapped.
fn int(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{v} is out of range for the database")))
}

/// A BIGINT read back as a count or index; negative only by tampering.
fn uint(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Integrity(format!("a negative value ({v}) where a count or index belongs")))
}
