//! The PostgreSQL backend (issue "postgres"), built in steps. This step holds the connection,
//! the schema's migrations with the least-privilege split between the role that owns the schema
//! and the role Valv serves with, and the first rows behind them: wrapped data keys and the audit
//! log. It does not implement [`crate::Store`] yet and cannot be chosen in the configuration.
//!
//! Least privilege, enforced by PostgreSQL itself: migrations run as the owner role; the serving
//! role is granted only what serving needs — on `audit_entries` that is `SELECT` and `INSERT`,
//! never `UPDATE`, `DELETE` or `TRUNCATE` — and, as PostgreSQL 15 no longer lets every role
//! create in `public`, it cannot change the schema. Triggers refuse changing or removing audit
//! rows to every role, the owner included: an owner must first disable the trigger (which is
//! itself visible in the catalog), and what it then changes is caught by `valv audit verify`.
//!
//! Not yet here (later steps of the issue): TLS to the database (rustls), a pool, the rest of the
//! `Store` methods, the integrator elected by advisory lock for several servers, failover.

#[cfg(test)]
mod testdb;

use crate::{AuditRow, StoreError, Token, WrappedKey};
use tokio_postgres::{Client, NoTls};

/// The schema, one migration per version, applied in order; a database records the highest it
/// has in `valv_schema`.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
    CREATE TABLE data_keys (
        name TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        kek_id TEXT NOT NULL,
        kek_version INTEGER NOT NULL,
        wrapped BYTEA NOT NULL,
        created BIGINT NOT NULL,
        wrapped_at BIGINT
    );
    CREATE INDEX data_keys_kek ON data_keys (provider, kek_id, kek_version);
    CREATE TABLE audit_entries (
        idx BIGINT PRIMARY KEY CHECK (idx >= 0),
        leaf_hash BYTEA NOT NULL CHECK (length(leaf_hash) = 32),
        sealed BYTEA NOT NULL,
        patient_token BYTEA,
        query_sealed BYTEA
    );
    CREATE INDEX audit_entries_patient ON audit_entries (patient_token) WHERE patient_token IS NOT NULL;
    CREATE FUNCTION valv_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
    END
    $$;
    CREATE TRIGGER audit_entries_no_change BEFORE UPDATE OR DELETE ON audit_entries
        FOR EACH ROW EXECUTE FUNCTION valv_audit_append_only();
    CREATE TRIGGER audit_entries_no_truncate BEFORE TRUNCATE ON audit_entries
        FOR EACH STATEMENT EXECUTE FUNCTION valv_audit_append_only();
    "#,
)];

/// What the serving role may do, table by table (granted again after every migration).
const SERVING_GRANTS: &[(&str, &str)] = &[("data_keys", "SELECT, INSERT, UPDATE, DELETE"), ("audit_entries", "SELECT, INSERT"), ("valv_schema", "SELECT")];

/// The advisory lock key migrations and audit appends serialise on ("valv" in ASCII, and 1 and 2).
const MIGRATION_LOCK: i64 = 0x7661_6c76_0000_0001;
const AUDIT_APPEND_LOCK: i64 = 0x7661_6c76_0000_0002;

fn db_error(what: &str, e: tokio_postgres::Error) -> StoreError {
    // The server's message (e.g. "permission denied for table audit_entries"), never the query.
    let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    StoreError::Backend(format!("PostgreSQL: {what}: {detail}"))
}

/// A role name is written into GRANT statements: only plain lower-case identifiers are taken.
fn role_identifier(role: &str) -> Result<String, StoreError> {
    let plain = !role.is_empty() && role.len() <= 63 && role.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_') && role.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        Ok(format!("\"{role}\""))
    } else {
        Err(StoreError::Backend(format!("'{role}' is not a plain role name (a-z, 0-9, _)")))
    }
}

/// One connection to the database.
pub struct PgStore {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PgStore {
    /// Connects with a libpq-style connection string or URL (`host=… port=… user=… dbname=…`).
    pub async fn connect(config: &str) -> Result<Self, StoreError> {
        let (client, connection) = tokio_postgres::connect(config, NoTls).await.map_err(|e| db_error("connecting", e))?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!(error = %e, "the PostgreSQL connection ended");
            }
        });
        Ok(PgStore { client, connection })
    }

    /// Brings the schema to the newest version (as the owner role) and grants `serving_role`
    /// what serving needs; two servers migrating at once take turns. Returns the version.
    pub async fn migrate(&mut self, serving_role: Option<&str>) -> Result<i32, StoreError> {
        let serving = serving_role.map(role_identifier).transpose()?;
        let tx = self.client.transaction().await.map_err(|e| db_error("starting the migration", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(|e| db_error("waiting for another migration", e))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS valv_schema (version INTEGER NOT NULL)").await.map_err(|e| db_error("creating valv_schema", e))?;
        let current: i32 = tx.query_one("SELECT coalesce(max(version), 0) FROM valv_schema", &[]).await.map_err(|e| db_error("reading the schema version", e))?.get(0);
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).await.map_err(|e| db_error(&format!("migration {version}"), e))?;
            tx.execute("INSERT INTO valv_schema (version) VALUES ($1)", &[version]).await.map_err(|e| db_error("recording the schema version", e))?;
        }
        for (table, _) in SERVING_GRANTS {
            tx.batch_execute(&format!("REVOKE ALL ON {table} FROM PUBLIC")).await.map_err(|e| db_error("revoking", e))?;
        }
        if let Some(role) = serving {
            for (table, privileges) in SERVING_GRANTS {
                tx.batch_execute(&format!("REVOKE ALL ON {table} FROM {role}; GRANT {privileges} ON {table} TO {role}")).await.map_err(|e| db_error(&format!("granting on {table}"), e))?;
            }
        }
        tx.commit().await.map_err(|e| db_error("committing the migration", e))?;
        Ok(MIGRATIONS.last().map_or(0, |(v, _)| *v).max(current))
    }

    /// A wrapped key by name.
    pub async fn get_key(&self, name: &str) -> Result<Option<WrappedKey>, StoreError> {
        let row = self.client.query_opt(&format!("SELECT {WRAPPED_COLUMNS} FROM data_keys WHERE name = $1"), &[&name]).await.map_err(|e| db_error("reading a key", e))?;
        row.map(|r| wrapped(&r, name)).transpose()
    }

    /// Up to `limit` wrapped keys not under this provider, KEK id and version, by name.
    pub async fn keys_not_under(&self, provider: &str, kek_id: &str, kek_version: u32, limit: usize) -> Result<Vec<(String, WrappedKey)>, StoreError> {
        let (version, limit) = (kek_version_column(kek_version)?, i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = self
            .client
            .query(
                &format!("SELECT {WRAPPED_COLUMNS}, name FROM data_keys WHERE NOT (provider = $1 AND kek_id = $2 AND kek_version = $3) ORDER BY name COLLATE \"C\" LIMIT $4"),
                &[&provider, &kek_id, &version, &limit],
            )
            .await
            .map_err(|e| db_error("listing keys to rewrap", e))?;
        rows.iter()
            .map(|r| {
                let name: String = r.get(4);
                wrapped(r, &name).map(|k| (name, k))
            })
            .collect()
    }

    /// Replaces wrapped keys, each only if still stored as the old one, in one transaction;
    /// returns how many were replaced.
    pub async fn rewrap_keys(&mut self, changes: &[(String, WrappedKey, WrappedKey)], now: i64) -> Result<usize, StoreError> {
        let tx = self.client.transaction().await.map_err(|e| db_error("starting a rewrap", e))?;
        let update = tx
            .prepare(
                "UPDATE data_keys SET provider = $2, kek_id = $3, kek_version = $4, wrapped = $5, wrapped_at = $6 \
                 WHERE name = $1 AND provider = $7 AND kek_id = $8 AND kek_version = $9 AND wrapped = $10",
            )
            .await
            .map_err(|e| db_error("rewrapping", e))?;
        let mut replaced = 0;
        for (name, old, new) in changes {
            let (old_version, new_version) = (kek_version_column(old.kek_version)?, kek_version_column(new.kek_version)?);
            replaced += tx
                .execute(&update, &[name, &new.provider, &new.kek_id, &new_version, &new.ciphertext, &now, &old.provider, &old.kek_id, &old_version, &old.ciphertext])
                .await
                .map_err(|e| db_error("rewrapping", e))?;
        }
        tx.commit().await.map_err(|e| db_error("committing a rewrap", e))?;
        usize::try_from(replaced).map_err(|_| StoreError::Backend("rewrap count out of range".into()))
    }

    /// How many wrapped keys each (provider, KEK id, version) holds, and the oldest wrap.
    pub async fn key_census(&self) -> Result<Vec<crate::KeyCensus>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT provider, kek_id, kek_version, count(*), min(coalesce(wrapped_at, created)) FROM data_keys \
                 GROUP BY provider, kek_id, kek_version ORDER BY provider COLLATE \"C\", kek_id COLLATE \"C\", kek_version",
                &[],
            )
            .await
            .map_err(|e| db_error("counting keys", e))?;
        rows.iter()
            .map(|r| {
                let (version, keys): (i32, i64) = (r.get(2), r.get(3));
                Ok(crate::KeyCensus {
                    provider: r.get(0),
                    kek_id: r.get(1),
                    kek_version: u32::try_from(version).map_err(|_| StoreError::Integrity(format!("KEK version {version}")))?,
                    keys: u64::try_from(keys).unwrap_or(0),
                    oldest_wrap: r.get(4),
                })
            })
            .collect()
    }

    /// When a named key was created, if it exists.
    pub async fn key_created(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let row = self.client.query_opt("SELECT created FROM data_keys WHERE name = $1", &[&name]).await.map_err(|e| db_error("reading a key", e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Stores a wrapped key unless one exists under the name; returns the one that is stored
    /// (two servers creating a patient's key at once both end up with the first).
    pub async fn put_key_if_absent(&self, name: &str, key: &WrappedKey, now: i64) -> Result<WrappedKey, StoreError> {
        let version = kek_version_column(key.kek_version)?;
        self.client
            .execute(
                "INSERT INTO data_keys (name, provider, kek_id, kek_version, wrapped, created, wrapped_at) VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (name) DO NOTHING",
                &[&name, &key.provider, &key.kek_id, &version, &key.ciphertext, &now],
            )
            .await
            .map_err(|e| db_error("storing a key", e))?;
        self.get_key(name).await?.ok_or_else(|| StoreError::Backend(format!("key {name} vanished after it was stored")))
    }

    /// Appends audit entries in order in one transaction; returns the leaf index of the first.
    /// Appends from every connection take turns on an advisory lock, so indices are consecutive
    /// and never assigned twice (one server's integrator assigning them is a later step).
    pub async fn append_audit(&mut self, rows: Vec<AuditRow>) -> Result<u64, StoreError> {
        let tx = self.client.transaction().await.map_err(|e| db_error("starting an audit append", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_APPEND_LOCK]).await.map_err(|e| db_error("waiting to append", e))?;
        let next: i64 = tx.query_one("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries", &[]).await.map_err(|e| db_error("reading the log's size", e))?.get(0);
        let insert = tx.prepare("INSERT INTO audit_entries (idx, leaf_hash, sealed, patient_token, query_sealed) VALUES ($1, $2, $3, $4, $5)").await.map_err(|e| db_error("appending", e))?;
        for (i, row) in rows.iter().enumerate() {
            let idx = next + i as i64;
            let token = row.patient_token.as_ref().map(|t| &t[..]);
            tx.execute(&insert, &[&idx, &&row.leaf_hash[..], &row.sealed, &token, &row.query_sealed]).await.map_err(|e| db_error("appending", e))?;
        }
        tx.commit().await.map_err(|e| db_error("committing an audit append", e))?;
        u64::try_from(next).map_err(|_| StoreError::Integrity(format!("audit index {next}")))
    }

    /// Entries with leaf index in `[from, to)`, in order, each with its index.
    pub async fn audit_entries(&self, from: u64, to: u64) -> Result<Vec<(u64, AuditRow)>, StoreError> {
        let (from, to) = (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(to).unwrap_or(i64::MAX));
        let rows = self
            .client
            .query("SELECT idx, leaf_hash, sealed, patient_token, query_sealed FROM audit_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx", &[&from, &to])
            .await
            .map_err(|e| db_error("reading the audit log", e))?;
        rows.iter().map(audit_row).collect()
    }

    /// The size of the log: one more than the highest leaf index (0 when empty).
    pub async fn audit_size(&self) -> Result<u64, StoreError> {
        let size: i64 = self.client.query_one("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries", &[]).await.map_err(|e| db_error("reading the log's size", e))?.get(0);
        u64::try_from(size).map_err(|_| StoreError::Integrity(format!("audit size {size}")))
    }
}

const WRAPPED_COLUMNS: &str = "provider, kek_id, kek_version, wrapped";

/// KEK versions are `INTEGER` columns.
fn kek_version_column(version: u32) -> Result<i32, StoreError> {
    i32::try_from(version).map_err(|_| StoreError::Backend(format!("KEK version {version} is out of range")))
}

/// A wrapped key from the first four columns ([`WRAPPED_COLUMNS`]).
fn wrapped(r: &tokio_postgres::Row, name: &str) -> Result<WrappedKey, StoreError> {
    let version: i32 = r.get(2);
    Ok(WrappedKey { provider: r.get(0), kek_id: r.get(1), kek_version: u32::try_from(version).map_err(|_| StoreError::Integrity(format!("key {name}: KEK version {version}")))?, ciphertext: r.get(3) })
}

fn audit_row(r: &tokio_postgres::Row) -> Result<(u64, AuditRow), StoreError> {
    let idx: i64 = r.get(0);
    let bad = |what: &str| StoreError::Integrity(format!("audit entry {idx}: {what}"));
    let leaf: Vec<u8> = r.get(1);
    let token: Option<Vec<u8>> = r.get(3);
    let row = AuditRow {
        leaf_hash: leaf.try_into().map_err(|_| bad("leaf hash is not 32 bytes"))?,
        sealed: r.get(2),
        patient_token: token.map(|t| Token::try_from(t).map_err(|_| bad("patient token has the wrong length"))).transpose()?,
        query_sealed: r.get(4),
    };
    Ok((u64::try_from(idx).map_err(|_| bad("negative index"))?, row))
}

#[cfg(test)]
mod tests {
    use super::testdb::Cluster;
    use super::*;

    fn entry(n: u8) -> AuditRow {
        AuditRow { leaf_hash: [n; 32], sealed: vec![n; 40], patient_token: None, query_sealed: None }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_serving_role_appends_and_reads_the_audit_log_but_can_never_change_it() {
        let pg = Cluster::start();
        let mut owner = PgStore::connect(&pg.url("valv_owner")).await.expect("owner");
        assert_eq!(owner.migrate(Some("valv_app")).await.expect("migrate"), 1);
        assert_eq!(owner.migrate(Some("valv_app")).await.expect("migrate again"), 1, "migrations run once");
        let mut app = PgStore::connect(&pg.url("valv_app")).await.expect("app");
        assert_eq!(app.append_audit(vec![entry(1), entry(2)]).await.expect("append"), 0);
        assert_eq!(app.append_audit(vec![entry(3)]).await.expect("append"), 2);
        assert_eq!(app.audit_size().await.expect("size"), 3);
        let read = app.audit_entries(1, 10).await.expect("read");
        assert_eq!(read.iter().map(|(i, r)| (*i, r.leaf_hash[0])).collect::<Vec<_>>(), [(1, 2), (2, 3)]);

        for (sql, refusal) in [
            ("UPDATE audit_entries SET sealed = '\\x00' WHERE idx = 0", "permission denied"),
            ("DELETE FROM audit_entries WHERE idx = 0", "permission denied"),
            ("TRUNCATE audit_entries", "permission denied"),
            ("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_no_change", "must be owner"),
            ("DROP TABLE audit_entries", "must be owner"),
            ("CREATE TABLE audit_shadow (idx BIGINT)", "permission denied"),
        ] {
            let err = app.client.batch_execute(sql).await.expect_err(sql);
            assert!(err.as_db_error().is_some_and(|d| d.message().contains(refusal)), "{sql}: {err:?}");
        }
        // The owner is refused too, by the triggers; only disabling them first (an act visible
        // in the catalog) lets a change through, and `valv audit verify` catches that.
        for sql in ["UPDATE audit_entries SET sealed = '\\x00' WHERE idx = 0", "DELETE FROM audit_entries", "TRUNCATE audit_entries"] {
            let err = owner.client.batch_execute(sql).await.expect_err(sql);
            assert!(err.as_db_error().is_some_and(|d| d.message().contains("append-only")), "{sql}: {err:?}");
        }
        assert_eq!(app.audit_entries(0, 3).await.expect("read")[0].1.sealed, vec![1; 40], "nothing changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_from_many_connections_get_consecutive_indices_each_once() {
        let pg = Cluster::start();
        PgStore::connect(&pg.url("valv_owner")).await.expect("owner").migrate(Some("valv_app")).await.expect("migrate");
        let mut tasks = Vec::new();
        for c in 0..4u8 {
            let url = pg.url("valv_app");
            tasks.push(tokio::spawn(async move {
                let mut store = PgStore::connect(&url).await.expect("connect");
                let mut firsts = Vec::new();
                for i in 0..10u8 {
                    firsts.push(store.append_audit(vec![entry(c * 10 + i), entry(c * 10 + i)]).await.expect("append"));
                }
                firsts
            }));
        }
        let mut firsts = Vec::new();
        for t in tasks {
            firsts.extend(t.await.expect("task"));
        }
        firsts.sort_unstable();
        assert_eq!(firsts, (0..40).map(|i| i * 2).collect::<Vec<u64>>(), "every append got its own two indices");
        let store = PgStore::connect(&pg.url("valv_app")).await.expect("connect");
        let all = store.audit_entries(0, 100).await.expect("read");
        assert_eq!(all.len(), 80);
        assert!(all.iter().enumerate().all(|(i, (idx, _))| *idx == i as u64), "no gap");
        assert!(all.chunks(2).all(|pair| pair[0].1.leaf_hash == pair[1].1.leaf_hash), "an append's entries are adjacent");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_stored_twice_keeps_the_first_and_bad_role_names_are_refused() {
        let pg = Cluster::start();
        let mut owner = PgStore::connect(&pg.url("valv_owner")).await.expect("owner");
        owner.migrate(Some("valv_app")).await.expect("migrate");
        let app = PgStore::connect(&pg.url("valv_app")).await.expect("app");
        let key = |b: u8| WrappedKey { provider: "file".into(), kek_id: "file-1".into(), kek_version: 2, ciphertext: vec![b; 60] };
        assert_eq!(app.get_key("patient:1").await.expect("get"), None);
        assert_eq!(app.put_key_if_absent("patient:1", &key(1), 5).await.expect("put"), key(1));
        assert_eq!(app.put_key_if_absent("patient:1", &key(2), 6).await.expect("put"), key(1), "the first one stays");
        assert_eq!(app.key_created("patient:1").await.expect("created"), Some(5));
        assert_eq!(app.key_created("patient:9").await.expect("created"), None);
        for bad in ["valv_app; DROP TABLE data_keys", "Valv", "", "a-b"] {
            assert!(owner.migrate(Some(bad)).await.is_err(), "{bad}");
        }
        assert_eq!(app.get_key("patient:1").await.expect("get"), Some(key(1)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rewrap_replaces_only_keys_still_stored_as_read_and_the_census_follows() {
        let pg = Cluster::start();
        PgStore::connect(&pg.url("valv_owner")).await.expect("owner").migrate(Some("valv_app")).await.expect("migrate");
        let mut app = PgStore::connect(&pg.url("valv_app")).await.expect("app");
        let key = |v: u32, b: u8| WrappedKey { provider: "file".into(), kek_id: "file-1".into(), kek_version: v, ciphertext: vec![b; 60] };
        for i in 0..5u8 {
            app.put_key_if_absent(&format!("patient:{i}"), &key(1, i), 10 + i64::from(i)).await.expect("put");
        }
        let stale = app.keys_not_under("file", "file-1", 2, 3).await.expect("stale");
        assert_eq!(stale.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["patient:0", "patient:1", "patient:2"]);
        // patient:1 was moved by someone else meanwhile: left alone.
        app.rewrap_keys(&[("patient:1".into(), key(1, 1), key(2, 101))], 50).await.expect("other");
        let changes: Vec<_> = stale.into_iter().map(|(n, old)| (n, old.clone(), key(2, old.ciphertext[0] + 200))).collect();
        assert_eq!(app.rewrap_keys(&changes, 60).await.expect("rewrap"), 2);
        assert_eq!(app.get_key("patient:1").await.expect("get"), Some(key(2, 101)));
        assert_eq!(app.get_key("patient:2").await.expect("get"), Some(key(2, 202)));
        let census = app.key_census().await.expect("census");
        let summary: Vec<_> = census.iter().map(|c| (c.kek_version, c.keys, c.oldest_wrap)).collect();
        assert_eq!(summary, [(1, 2, 13), (2, 3, 50)]);
        assert_eq!(app.keys_not_under("file", "file-1", 2, 10).await.expect("stale").len(), 2);
    }
}
