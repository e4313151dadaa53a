//! Snapshots and loads of the SQLite backend ([`crate::dump`]). A snapshot reads on its own
//! connection, in one read transaction (WAL: a consistent view while the writer goes on), so it
//! takes no reader from the server's pool. A restore loads into a new file through a connection
//! of its own without a journal ([`FreshLoad`]), one transaction per batch; search tokens are
//! collected (in memory, or spilled sorted to a temporary table past a limit) and inserted once,
//! sorted, at the end, and the secondary indexes (and the audit log's by-patient table) are
//! built then too: sorting once beats inserting at random places row by row.

use super::{insert_tokens, row_to_audit, SqliteStore};
use crate::dump::{ResourceRow, Row, VersionRow};
use crate::{ApiKeyRecord, AuditTile, ErasureRequestRow, ErasureRow, GrantRow, StoreError, StoredCheckpoint, UserRow, WrappedKey};
use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::mpsc::Sender;

/// The page cache of a loading connection (KiB, negative as SQLite takes it).
const LOAD_CACHE_KIB: i64 = -262_144;

/// Indexes a load drops and builds again at its end, exactly as the migrations create them
/// (a test compares them with the schema).
const SECONDARY_INDEXES: &[(&str, &str)] = &[
    ("resources_type_updated", "CREATE INDEX IF NOT EXISTS resources_type_updated ON resources (type, last_updated)"),
    ("resources_patient", "CREATE INDEX IF NOT EXISTS resources_patient ON resources (patient)"),
];

/// Rows per batch sent (or bytes, for large bodies), whichever fills first.
const BATCH_ROWS: usize = 2_048;
const BATCH_BYTES: usize = 4 << 20;

/// Collects rows into batches and sends them, blocking while the consumer is behind.
struct Batcher {
    out: Sender<Vec<Row>>,
    rows: Vec<Row>,
    bytes: usize,
}

impl Batcher {
    fn push(&mut self, row: Row, bytes: usize) -> Result<(), StoreError> {
        self.rows.push(row);
        self.bytes += bytes;
        if self.rows.len() >= BATCH_ROWS || self.bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        self.bytes = 0;
        let rows = std::mem::take(&mut self.rows);
        if rows.is_empty() {
            return Ok(());
        }
        self.out.blocking_send(rows).map_err(|_| StoreError::Backend("the snapshot's reader stopped".into()))
    }
}

fn blob<const N: usize>(v: &[u8], what: &str) -> Result<[u8; N], StoreError> {
    <[u8; N]>::try_from(v).map_err(|_| StoreError::Integrity(format!("{what} is not {N} bytes")))
}

/// Reads every table in one read transaction.
fn snapshot(path: &std::path::Path, out: Sender<Vec<Row>>) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    // Read-only too (an attached file takes the connection's flags). The read transaction is one
    // snapshot per file: the audit log's is taken when it is first read, after the resources'.
    super::attach_audit(&conn, path)?;
    let tx = conn.unchecked_transaction()?;
    let mut b = Batcher { out, rows: Vec::with_capacity(BATCH_ROWS), bytes: 0 };
    {
        let mut stmt = tx.prepare("SELECT name, provider, kek_id, kek_version, wrapped, created, wrapped_at FROM data_keys ORDER BY name")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let key = WrappedKey { provider: r.get(1)?, kek_id: r.get(2)?, kek_version: r.get(3)?, ciphertext: r.get(4)? };
            b.push(Row::DataKey { name: r.get(0)?, key, created: r.get(5)?, wrapped_at: r.get(6)? }, 64)?;
        }
    }
    resources(&tx, &mut b)?;
    {
        let mut stmt = tx.prepare("SELECT id, name, role, hash, created, revoked, mac, scopes FROM api_keys ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let k = ApiKeyRecord { id: r.get(0)?, name: r.get(1)?, role: r.get(2)?, hash: blob(&r.get::<_, Vec<u8>>(3)?, "an API key hash")?, created: r.get(4)?, revoked: r.get(5)?, mac: r.get(6)?, scopes: r.get(7)? };
            b.push(Row::ApiKey(k), 128)?;
        }
    }
    {
        let mut stmt = tx.prepare("SELECT id, username_token, version, sealed, enrollment_hash FROM users ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let enrollment_hash = r.get::<_, Option<Vec<u8>>>(4)?.map(|h| blob(&h, "an enrollment hash")).transpose()?;
            let u = UserRow { id: r.get(0)?, username_token: blob(&r.get::<_, Vec<u8>>(1)?, "a user name token")?, version: r.get(2)?, sealed: r.get(3)?, enrollment_hash };
            b.push(Row::User(u), 512)?;
        }
    }
    for_each(&tx, "SELECT id, version, sealed FROM grants ORDER BY id", &mut b, |r| Ok(Row::Grant(GrantRow { id: r.get(0)?, version: r.get(1)?, sealed: r.get(2)? })))?;
    for_each(&tx, &format!("SELECT {} FROM files ORDER BY binary_id", super::FILE_COLUMNS), &mut b, |r| Ok(Row::File(super::row_to_file(r)?)))?;
    for_each(&tx, "SELECT id, time, rule, severity, sealed FROM alerts ORDER BY id", &mut b, |r| Ok(Row::Alert(super::row_to_alert(r)?)))?;
    for_each(&tx, "SELECT kind, id, version, sealed FROM cases ORDER BY kind, id", &mut b, |r| Ok(Row::Case(super::row_to_case(r)?)))?;
    for_each(&tx, "SELECT seq, patient, erased_at FROM erasures ORDER BY seq", &mut b, |r| Ok(Row::Erasure(ErasureRow { seq: r.get(0)?, patient: r.get(1)?, erased_at: r.get(2)? })))?;
    for_each(&tx, "SELECT id, patient, sealed, requested_at, state, decided_by, decided_at FROM erasure_requests ORDER BY id", &mut b, |r| {
        Ok(Row::ErasureRequest(ErasureRequestRow { id: r.get(0)?, patient: r.get(1)?, sealed: r.get(2)?, requested_at: r.get(3)?, state: r.get(4)?, decided_by: r.get(5)?, decided_at: r.get(6)? }))
    })?;
    for_each(&tx, "SELECT idx, leaf_hash, sealed, patient_token, query_sealed FROM audit_entries ORDER BY idx", &mut b, |r| {
        let (index, row) = row_to_audit(r)?;
        Ok(Row::AuditEntry { index, row })
    })?;
    {
        let mut stmt = tx.prepare("SELECT level, idx, hashes FROM audit_tiles ORDER BY level, idx")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let hashes = r.get::<_, Vec<u8>>(2)?.chunks(32).map(|h| blob(h, "a tile hash")).collect::<Result<_, _>>()?;
            b.push(Row::AuditTile(AuditTile { level: r.get(0)?, index: r.get(1)?, hashes }), 8192)?;
        }
    }
    {
        let mut stmt = tx.prepare("SELECT size, root, note FROM audit_checkpoints ORDER BY size")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            b.push(Row::Checkpoint(StoredCheckpoint { size: r.get(0)?, root: blob(&r.get::<_, Vec<u8>>(1)?, "a checkpoint root")?, note: r.get(2)? }), 512)?;
        }
    }
    b.flush()
}

/// Rows of a small table whose columns convert directly.
fn for_each(tx: &Connection, sql: &str, b: &mut Batcher, f: impl Fn(&rusqlite::Row<'_>) -> rusqlite::Result<Row>) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let row = f(r)?;
        let bytes = match &row {
            Row::AuditEntry { row, .. } => row.sealed.len() + 64,
            _ => 256,
        };
        b.push(row, bytes)?;
    }
    Ok(())
}

/// Each resource, then its versions: two cursors in rid order, merged.
fn resources(tx: &Connection, b: &mut Batcher) -> Result<(), StoreError> {
    let mut rs = tx.prepare("SELECT rid, type, id, version, deleted, patient, last_updated, tokens FROM resources ORDER BY rid")?;
    let mut vs = tx.prepare("SELECT rid, version, deleted, patient, last_updated, body FROM versions ORDER BY rid, version")?;
    let mut resources = rs.query([])?;
    let mut versions = vs.query([])?;
    let mut next_version = versions.next()?;
    while let Some(r) = resources.next()? {
        let rid: i64 = r.get(0)?;
        let tokens = r.get::<_, Vec<u8>>(7)?.chunks(16).map(|t| blob(t, "a search token")).collect::<Result<_, _>>()?;
        let row = ResourceRow { resource_type: r.get(1)?, id: r.get(2)?, version: r.get(3)?, deleted: r.get(4)?, patient: r.get(5)?, last_updated: r.get(6)?, tokens };
        b.push(Row::Resource(row), 128)?;
        while let Some(v) = next_version {
            let vrid: i64 = v.get(0)?;
            if vrid > rid {
                break;
            }
            if vrid < rid {
                return Err(StoreError::Integrity(format!("versions of row {vrid} belong to no resource")));
            }
            let body: Vec<u8> = v.get(5)?;
            let size = body.len() + 64;
            b.push(Row::Version(VersionRow { version: v.get(1)?, deleted: v.get(2)?, patient: v.get(3)?, last_updated: v.get(4)?, body }), size)?;
            next_version = versions.next()?;
        }
    }
    if next_version.is_some() {
        return Err(StoreError::Integrity("versions belong to no resource".into()));
    }
    Ok(())
}

/// Search tokens a load keeps in memory (24 bytes each: 96 MiB) before it spills them, sorted, to
/// a temporary table.
const TOKENS_IN_MEMORY: usize = 4 << 20;

/// The search tokens of a load, inserted once, sorted, at its end: sorting once beats inserting
/// at random places of the token table row by row. Kept in memory up to [`TOKENS_IN_MEMORY`];
/// beyond it every run is spilled to a temporary table, which SQLite sorts on disk at the end.
struct Tokens {
    pending: Vec<([u8; 16], i64)>,
    /// How many are kept in memory before a spill ([`TOKENS_IN_MEMORY`]; tests take fewer).
    limit: usize,
    spilled: bool,
}

impl Tokens {
    fn add(&mut self, conn: &Connection, tokens: &[[u8; 16]], rid: i64) -> Result<(), StoreError> {
        self.pending.extend(tokens.iter().map(|t| (*t, rid)));
        if self.pending.len() >= self.limit {
            self.spill(conn)?;
        }
        Ok(())
    }

    fn spill(&mut self, conn: &Connection) -> Result<(), StoreError> {
        conn.execute_batch("CREATE TEMP TABLE IF NOT EXISTS load_tokens (token BLOB NOT NULL, rid INTEGER NOT NULL)")?;
        insert_tokens(conn, "temp.load_tokens", &mut self.pending)?;
        self.spilled = true;
        Ok(())
    }

    fn finish(mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.spilled {
            self.spill(conn)?;
            conn.execute_batch("INSERT INTO search_tokens (token, rid) SELECT token, rid FROM temp.load_tokens ORDER BY token, rid; DROP TABLE temp.load_tokens;")?;
        } else {
            insert_tokens(conn, "search_tokens", &mut self.pending)?;
        }
        Ok(())
    }
}


/// A restore's new database file, loaded on a connection of its own without a journal and without
/// an fsync per batch (a failed restore is removed whole), with a 256 MiB page cache; the search
/// tokens and the secondary indexes go in at [`FreshLoad::finish`], which also switches the file
/// to WAL (as every connection opens it) and syncs it once.
pub struct FreshLoad {
    conn: Connection,
    path: std::path::PathBuf,
    tokens: Tokens,
}

impl FreshLoad {
    /// Creates the database (the file must be new or empty) with the schema of the migrations.
    pub fn create(path: &std::path::Path) -> Result<Self, StoreError> {
        Self::with_token_limit(path, TOKENS_IN_MEMORY)
    }

    fn with_token_limit(path: &std::path::Path, limit: usize) -> Result<Self, StoreError> {
        for file in [path.to_path_buf(), super::audit_path(path)] {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
                return Err(StoreError::Backend(format!("{} is not empty", file.display())));
            }
        }
        let mut conn = Connection::open(path)?;
        super::attach_audit(&conn, path)?;
        for schema in super::SCHEMAS {
            conn.pragma_update(Some(schema), "journal_mode", "OFF")?;
            conn.pragma_update(Some(schema), "locking_mode", "EXCLUSIVE")?;
            conn.pragma_update(Some(schema), "synchronous", "OFF")?;
            conn.pragma_update(Some(schema), "cache_size", LOAD_CACHE_KIB)?;
        }
        super::migrate(&mut conn)?;
        for (name, _) in SECONDARY_INDEXES {
            conn.execute_batch(&format!("DROP INDEX {name}"))?;
        }
        Ok(FreshLoad { conn, path: path.to_path_buf(), tokens: Tokens { pending: Vec::new(), limit, spilled: false } })
    }

    /// Inserts a batch in one transaction.
    pub fn load(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        load(&self.conn, &mut self.tokens, rows)
    }

    /// Tokens and indexes in, the file switched to WAL, the file and its folder synced.
    pub fn finish(self) -> Result<(), StoreError> {
        let FreshLoad { conn, path, tokens } = self;
        let tx = rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)?;
        tokens.finish(&tx)?;
        for (_, create) in SECONDARY_INDEXES {
            tx.execute_batch(create)?;
        }
        super::index_by_patient(&tx)?;
        tx.commit()?;
        for schema in super::SCHEMAS {
            conn.pragma_update(Some(schema), "locking_mode", "NORMAL")?;
            conn.pragma_update(Some(schema), "journal_mode", "WAL")?;
        }
        conn.close().map_err(|(_, e)| StoreError::from(e))?;
        let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all()).map_err(|e| StoreError::Backend(format!("syncing {}: {e}", p.display())));
        sync(&path)?;
        sync(&super::audit_path(&path))?;
        match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => sync(dir),
            None => Ok(()),
        }
    }
}

/// Inserts a batch of rows in one transaction (search tokens go to `tokens`).
fn load(conn: &Connection, tokens: &mut Tokens, rows: &[Row]) -> Result<(), StoreError> {
    let tx = conn.unchecked_transaction()?;
    // The resource the next versions belong to: the last one inserted (rids only grow).
    let mut current: Option<i64> = None;
    for row in rows {
        match row {
            Row::DataKey { name, key, created, wrapped_at } => {
                tx.prepare_cached("INSERT INTO data_keys (name, provider, kek_id, kek_version, wrapped, created, wrapped_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                    .execute(params![name, key.provider, key.kek_id, key.kek_version, key.ciphertext, created, wrapped_at])?;
            }
            Row::Resource(r) => {
                tx.prepare_cached("INSERT INTO resources (type, id, version, deleted, patient, last_updated, tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                    .execute(params![r.resource_type, r.id, r.version, r.deleted, r.patient, r.last_updated, r.tokens.concat()])?;
                let rid = tx.last_insert_rowid();
                tokens.add(&tx, &r.tokens, rid)?;
                current = Some(rid);
            }
            Row::Version(v) => {
                let rid = match current {
                    Some(rid) => rid,
                    None => tx
                        .prepare_cached("SELECT max(rid) FROM resources")?
                        .query_row([], |r| r.get::<_, Option<i64>>(0))?
                        .ok_or_else(|| StoreError::Integrity("a version before any resource".into()))?,
                };
                current = Some(rid);
                tx.prepare_cached("INSERT INTO versions (rid, version, deleted, patient, last_updated, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
                    .execute(params![rid, v.version, v.deleted, v.patient, v.last_updated, v.body])?;
            }
            Row::ApiKey(k) => {
                tx.prepare_cached("INSERT INTO api_keys (id, name, role, hash, created, revoked, mac, scopes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?
                    .execute(params![k.id, k.name, k.role, &k.hash[..], k.created, k.revoked, k.mac, k.scopes])?;
            }
            Row::User(u) => {
                tx.prepare_cached("INSERT INTO users (id, username_token, version, sealed, enrollment_hash) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![u.id, &u.username_token[..], u.version, u.sealed, u.enrollment_hash.as_ref().map(|h| &h[..])])?;
            }
            Row::Grant(g) => {
                tx.prepare_cached("INSERT INTO grants (id, version, sealed) VALUES (?1, ?2, ?3)")?.execute(params![g.id, g.version, g.sealed])?;
            }
            Row::Erasure(e) => {
                tx.prepare_cached("INSERT INTO erasures (patient, seq, erased_at) VALUES (?1, ?2, ?3)")?.execute(params![e.patient, e.seq, e.erased_at])?;
            }
            Row::ErasureRequest(r) => {
                tx.prepare_cached("INSERT INTO erasure_requests (id, patient, sealed, requested_at, state, decided_by, decided_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                    .execute(params![r.id, r.patient, r.sealed, r.requested_at, r.state, r.decided_by, r.decided_at])?;
            }
            Row::AuditEntry { index, row } => {
                tx.prepare_cached("INSERT INTO audit_entries (idx, leaf_hash, sealed, patient_token, query_sealed) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![index, &row.leaf_hash[..], row.sealed, row.patient_token.as_ref().map(|t| &t[..]), row.query_sealed])?;
            }
            Row::AuditTile(t) => {
                tx.prepare_cached("INSERT INTO audit_tiles (level, idx, hashes) VALUES (?1, ?2, ?3)")?.execute(params![t.level, t.index, t.hashes.concat()])?;
            }
            Row::File(f) => {
                tx.prepare_cached(&format!("INSERT INTO files ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)", super::FILE_COLUMNS))?
                    .execute(params![f.binary_id, f.object, f.patient, f.sealed_key, f.size, &f.sha256[..], f.scan, f.created])?;
            }
            Row::Checkpoint(c) => {
                tx.prepare_cached("INSERT INTO audit_checkpoints (size, root, note) VALUES (?1, ?2, ?3)")?.execute(params![c.size, &c.root[..], c.note])?;
            }
            Row::Alert(a) => {
                tx.prepare_cached("INSERT INTO alerts (id, time, rule, severity, sealed) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![a.id, a.time, a.rule, a.severity, a.sealed])?;
            }
            Row::Case(k) => {
                tx.prepare_cached("INSERT INTO cases (kind, id, version, sealed) VALUES (?1, ?2, ?3, ?4)")?.execute(params![k.kind, k.id, k.version, k.sealed])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    pub(super) async fn snapshot_rows(&self, out: Sender<Vec<Row>>) -> Result<(), StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || snapshot(&path, out)).await.map_err(|e| StoreError::Backend(format!("the snapshot thread failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::{FreshLoad, TOKENS_IN_MEMORY};
    use crate::dump::Row;
    use crate::sqlite::SqliteStore;
    use crate::{AuditRow, Expect, Filter, Store, StoredVersion, UserRow, WrappedKey, Write};

    fn temp_db(name: &str) -> std::path::PathBuf {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("random");
        std::env::temp_dir().join(format!("valv-dump-{name}-{}.db", u64::from_le_bytes(r)))
    }

    async fn rows_of(store: &SqliteStore) -> Vec<Row> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let (done, mut all) = tokio::join!(store.snapshot(tx), async move {
            let mut all = Vec::new();
            while let Some(batch) = rx.recv().await {
                all.extend(batch);
            }
            all
        });
        done.expect("snapshot");
        all.sort_by_key(|r| r.table());
        all
    }

    #[tokio::test]
    async fn a_snapshot_loads_into_an_empty_store_as_it_was() {
        let (a, b, spilled) = (temp_db("a"), temp_db("b"), temp_db("s"));
        let src = SqliteStore::open(&a).expect("open");
        let key = WrappedKey { provider: "file".into(), kek_id: "k".into(), kek_version: 2, ciphertext: vec![7; 61] };
        src.put_key_if_absent("patient:p1", &key, 1).await.expect("key");
        for (id, versions) in [("p1", 3u64), ("p2", 1)] {
            for v in 1..=versions {
                let version = StoredVersion { resource_type: "Patient".into(), id: id.into(), version: v, patient: Some(id.into()), deleted: false, last_updated: v as i64, body: vec![v as u8; 40] };
                let expect = if v == 1 { Expect::Absent } else { Expect::Version(v - 1) };
                src.commit(vec![Write { expect, version, tokens: vec![[v as u8; 16], [9; 16]], sealed_with: None, unless: None }]).await.expect("commit");
            }
        }
        src.insert_user(&UserRow { id: "u1".into(), username_token: [1; 16], version: 1, sealed: vec![1, 2], enrollment_hash: None }).await.expect("user");
        src.append_audit((0..5u8).map(|i| AuditRow { leaf_hash: [i; 32], sealed: vec![i; 20], patient_token: (i % 2 == 0).then_some([i; 16]), query_sealed: None }).collect()).await.expect("audit");
        src.erase_patient("p9", 3).await.expect("erase");
        let before = rows_of(&src).await;
        assert_eq!(before.iter().filter(|r| matches!(r, Row::Version(_))).count(), 4);

        // Loaded as sent, in batches of three: a batch may split a resource from its versions.
        // Search tokens sorted in memory, and spilled to disk after every two.
        for (c, limit) in [(&b, TOKENS_IN_MEMORY), (&spilled, 2)] {
            let mut load = FreshLoad::with_token_limit(c, limit).expect("create");
            let (tx, mut rx) = tokio::sync::mpsc::channel(2);
            let (done, ()) = tokio::join!(src.snapshot(tx), async {
                while let Some(batch) = rx.recv().await {
                    for chunk in batch.chunks(3) {
                        load.load(chunk).expect("load");
                    }
                }
            });
            done.expect("snapshot");
            load.finish().expect("durable");
        }
        let dst = SqliteStore::open(&b).expect("open");
        assert_eq!(rows_of(&dst).await, before, "every row as it was");
        assert_eq!(rows_of(&SqliteStore::open(&spilled).expect("open")).await, before, "every row as it was, tokens spilled");
        let journal: String = rusqlite::Connection::open(&b).expect("open").pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("mode");
        assert_eq!(journal, "wal");
        assert_eq!(dst.read_current("Patient", "p1").await.expect("read").map(|v| v.version), Some(3));
        let found = dst.search(&Filter { resource_type: "Patient".into(), token_groups: vec![vec![[9; 16]]], ..Default::default() }).await.expect("search");
        assert_eq!(found.len(), 2, "search tokens indexed again");
        let old_token = dst.search(&Filter { resource_type: "Patient".into(), token_groups: vec![vec![[1; 16]]], ..Default::default() }).await.expect("search");
        assert!(old_token.iter().all(|l| l.id == "p2"), "only current tokens: {old_token:?}");
        // The indexes a load dropped are back as the migrations made them.
        let schema = |path: &std::path::Path| -> Vec<(String, String)> {
            let c = rusqlite::Connection::open(path).expect("open");
            super::super::attach_audit(&c, path).expect("attach");
            let mut stmt = c
                .prepare("SELECT name, sql FROM (SELECT * FROM main.sqlite_master UNION ALL SELECT * FROM audit.sqlite_master) WHERE type = 'index' AND sql IS NOT NULL ORDER BY name")
                .expect("schema");
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).expect("query").map(|r| r.expect("row")).collect()
        };
        let normal = |v: Vec<(String, String)>| v.into_iter().map(|(n, sql)| (n, sql.replace("IF NOT EXISTS ", ""))).collect::<Vec<_>>();
        assert_eq!(normal(schema(&b)), normal(schema(&a)));
        let c = temp_db("c");
        let mut twice = FreshLoad::create(&c).expect("create");
        twice.load(&before[..1]).expect("load");
        assert!(twice.load(&before[..1]).is_err(), "a row loaded twice conflicts");
        assert!(FreshLoad::create(&b).is_err(), "only into a new file");
        drop(twice);
        for p in [a, b, spilled, c] {
            super::super::remove_files(&p);
        }
    }
}
