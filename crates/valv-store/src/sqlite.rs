//! The embedded SQLite backend: WAL journal, `synchronous=FULL` (every commit is fsynced),
//! one writer thread that commits concurrent requests in groups (one fsync per group, each
//! request in its own savepoint so one conflict fails only its own request), and a small pool of
//! reader connections.
//!
//! A full disk is survived (see [`crate::disk`]): opened with a [`Reserve`], the writer keeps
//! headroom beside the database, spends it on a checkpoint when a write fails for lack of space,
//! refuses writes until the WAL is checkpointed and truncated and the reserve made again, and gets
//! there by itself once the fault is gone. An idle writer also truncates a WAL a burst left large.
//!
//! The audit log lives in a file of its own beside the database (`valv-audit.db` beside
//! `valv.db`, attached to every connection as `audit`), with its own WAL: every audited request
//! commits an entry, and a commit to the file a connection reads makes SQLite drop that
//! connection's page cache at its next read. With the log apart, the resource tables' pages stay
//! cached while only entries are written (reads by id and searches no longer re-read their pages
//! from the kernel after every group commit). A transaction over both files is atomic in each
//! file, not across them; no job writes both (a request's entry and its writes are separate jobs,
//! each answered only after the whole group committed).

mod dump;
pub use dump::FreshLoad;

use crate::disk::{self, Reserve};
use crate::{GrantRow, ApiKeyRecord, Expect, Filter, Located, Order, SessionRow, Store, StoreError, StoredVersion, UserRow, Write, WrappedKey};
use async_trait::async_trait;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE resources (
    rid INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    patient TEXT,
    last_updated INTEGER NOT NULL,
    -- The current version's search tokens, concatenated, so an update can remove exactly
    -- those rows without a second index on search_tokens.
    tokens BLOB NOT NULL,
    UNIQUE (type, id)
);
CREATE INDEX resources_type_updated ON resources (type, last_updated);
CREATE INDEX resources_patient ON resources (patient);
-- A rowid table: versions are appended in order, and large sealed bodies pack well.
CREATE TABLE versions (
    vid INTEGER PRIMARY KEY,
    rid INTEGER NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    patient TEXT,
    last_updated INTEGER NOT NULL,
    body BLOB NOT NULL,
    UNIQUE (rid, version)
);
CREATE TABLE search_tokens (
    token BLOB NOT NULL,
    rid INTEGER NOT NULL,
    PRIMARY KEY (token, rid)
) WITHOUT ROWID;
CREATE TABLE data_keys (
    name TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    kek_version INTEGER NOT NULL,
    wrapped BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    hash BLOB NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    revoked INTEGER,
    mac BLOB NOT NULL
);
"#, r#"
-- The audit log: append-only by contract (no code path updates or deletes a row). The leaf
-- index is idx; entries are sealed; the leaf hash is over the canonical plaintext entry.
CREATE TABLE audit_entries (
    idx INTEGER PRIMARY KEY,
    leaf_hash BLOB NOT NULL,
    sealed BLOB NOT NULL
);
"#, r#"
-- Signed checkpoints (C2SP signed notes), one per tree size the integrator signed.
CREATE TABLE audit_checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL
);
"#, r#"
-- A patient's access log without decrypting everyone's: the blind-index token of the entry's patient.
ALTER TABLE audit_entries ADD COLUMN patient_token BLOB;
CREATE INDEX audit_entries_patient ON audit_entries (patient_token) WHERE patient_token IS NOT NULL;
"#, r#"
-- People and service users. The record is sealed (name, roles, password hash, TOTP secret…);
-- the user name is only a blind token.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    username_token BLOB NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    enrollment_hash BLOB UNIQUE
);
-- Login sessions: the SHA-256 of the bearer token, never the token.
CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    created INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    mac BLOB NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
"#, r#"
-- SMART scopes of an API key (space-separated; '' = none). Covered by the key's MAC when set.
ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT '';
-- Break-glass and remote-support grants: the record is sealed (who, which patients, reason,
-- times, reviews); versioned like users.
CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
"#, r#"
-- A search's query is no longer inside the entry (which its patient is shown), only a salted
-- hash of it: the query and its salt are sealed here, in the entry's own row, for auditors.
-- NULL for entries without a query and for entries written before (their query is inside).
ALTER TABLE audit_entries ADD COLUMN query_sealed BLOB;
"#, r#"
-- The audit tree's interior hashes as C2SP tlog-tiles of height 8 (docs/AUDIT.md): tile idx of
-- tile level level lists up to 256 consecutive node hashes of tree level 8 * level, concatenated
-- (32 bytes each); level 0 holds leaf hashes. Written by the integrator only, a partial tile
-- replaced by a longer one; derived data: `valv audit verify` recomputes every tile.
CREATE TABLE audit_tiles (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hashes BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);
"#, r#"
-- Which KEK of the provider wrapped each data key ('' for keys wrapped before: read as the
-- provider's own, and given the id when a rotation rewraps them) and when it was last wrapped.
ALTER TABLE data_keys ADD COLUMN kek_id TEXT NOT NULL DEFAULT '';
ALTER TABLE data_keys ADD COLUMN wrapped_at INTEGER;
CREATE INDEX data_keys_kek ON data_keys (provider, kek_id, kek_version);
"#, r#"
-- Patients erased by destroying their data key (the erasure ledger's rows, in order).
CREATE TABLE erasures (
    patient TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    erased_at INTEGER NOT NULL
);
"#, r#"
-- Requests to erase a patient over the admin API, each waiting for a second admin.
CREATE TABLE erasure_requests (
    id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    sealed BLOB NOT NULL,
    requested_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT,
    decided_at INTEGER
);
"#, r#"
-- The content of file-backed Binaries (valv-files objects): each file's own key sealed under
-- its patient's data key, its size, SHA-256 and malware-scan status.
CREATE TABLE files (
    binary_id TEXT PRIMARY KEY,
    object TEXT NOT NULL UNIQUE,
    patient TEXT NOT NULL,
    sealed_key BLOB NOT NULL,
    size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    scan TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE INDEX files_patient ON files (patient);
CREATE INDEX files_scan ON files (scan, created) WHERE scan = 'pending';
"#, r#"
-- Short-lived tickets to files: the SHA-256 of each secret, uses spent atomically.
CREATE TABLE file_tickets (
    hash BLOB PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    binary_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    agent TEXT NOT NULL,
    purpose TEXT NOT NULL,
    expires INTEGER NOT NULL,
    uses INTEGER NOT NULL,
    used INTEGER NOT NULL,
    revoked INTEGER NOT NULL,
    created INTEGER NOT NULL,
    mac BLOB NOT NULL
);
CREATE INDEX file_tickets_binary ON file_tickets (binary_id, agent);
CREATE INDEX file_tickets_expires ON file_tickets (expires);
"#, r#"
-- Resumable uploads in progress: the file key sealed under the patient's, parts received.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    binary_id TEXT NOT NULL,
    object TEXT NOT NULL,
    patient TEXT NOT NULL,
    agent TEXT NOT NULL,
    sealed_key BLOB NOT NULL,
    content_type TEXT NOT NULL,
    length INTEGER NOT NULL,
    received INTEGER NOT NULL,
    parts INTEGER NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX uploads_expires ON uploads (expires);
"#, r#"
-- The detection engine (issue 15): its alerts, sealed, only ever added; and how far it read.
CREATE TABLE alerts (
    id TEXT PRIMARY KEY,
    time INTEGER NOT NULL,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    sealed BLOB NOT NULL
);
CREATE INDEX alerts_time ON alerts (time);
CREATE TRIGGER alerts_no_update BEFORE UPDATE ON alerts BEGIN SELECT RAISE(ABORT, 'alerts are append-only'); END;
CREATE TRIGGER alerts_no_delete BEFORE DELETE ON alerts BEGIN SELECT RAISE(ABORT, 'alerts are append-only'); END;
CREATE TABLE detection (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next INTEGER NOT NULL,
    state_at INTEGER NOT NULL,
    state BLOB NOT NULL
);
"#, r#"
-- Reviews, incidents and blocked addresses (issue 15), sealed; changed by version, never removed.
CREATE TABLE cases (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    sealed BLOB NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TRIGGER cases_no_delete BEFORE DELETE ON cases BEGIN SELECT RAISE(ABORT, 'cases are never removed'); END;
"#];

const READERS: usize = 4;
/// Each connection's page cache: 64 MiB (negative: KiB, as SQLite takes it).
const CACHE_KIB: i64 = -65_536;
/// Most requests one group commit takes.
const MAX_GROUP: usize = 256;
/// The writer counts as idle after this long without work, and then tidies the WAL.
const IDLE: Duration = Duration::from_secs(1);
/// How often the checkpointer thread copies the WAL into the database while writes come in.
/// Checkpoints run beside the writer, never inside a commit: SQLite's own (`wal_autocheckpoint`)
/// run in the commit that crosses 1,000 pages, and every request waiting on that group commit —
/// each audited read — waits for the copy and its fsync too.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A checkpoint beside the writer never catches up with the end of the WAL while commits keep
/// coming, and SQLite starts the WAL over only after one that did; past this size the writer
/// runs one itself between two commits (it copies little: the checkpointer did the rest). Kept
/// small, below `JOURNAL_SIZE_LIMIT`: a WAL started over is written over in place, while a WAL
/// that keeps growing makes each commit's fsync also commit the file's new blocks to the
/// filesystem's journal (measured with the WAL let grow to 64 MiB: audited reads' p99 7 -> 24-33 ms).
const WAL_RESTART_ABOVE: u64 = 8 << 20;
/// An idle writer truncates a WAL larger than this (what a burst left behind).
const IDLE_TRUNCATE_ABOVE: u64 = 4 << 20;
/// When SQLite starts the WAL over after a complete checkpoint, it truncates it to this, so a
/// WAL grown large under sustained load shrinks even if the writer is never idle.
const JOURNAL_SIZE_LIMIT: i64 = 16 << 20;
/// The writer adds the by-patient pairs of the audit log ([`index_by_patient`]) once it has
/// appended this many entries (and when idle): enough for most pages of the table to take many
/// pairs at once, few enough that the step (~1 µs an entry) holds up the next group little.
const INDEX_EVERY: u64 = 2_048;
/// A writer refusing writes for lack of headroom tries to get out at most this often.
const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// A truncating checkpoint waits this long at most for readers to move off the WAL: the writer
/// must not stall behind them (a busy checkpoint is simply tried again later).
const CHECKPOINT_WAIT: Duration = Duration::from_millis(200);
/// How often the writer compares the pages waiting in the WAL with the room a checkpoint has.
const GROWTH_CHECK: Duration = Duration::from_millis(100);
/// Slack for what commits can add between two such checks (writes run at tens of MB/s at most).
const GROWTH_MARGIN: u64 = 8 << 20;
/// The busy timeout of every connection (a writer in another process, a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Why writes are refused while the writer has no headroom (the callers answer 503).
const NO_HEADROOM: &str = "disk full: writes are refused until the WAL has been checkpointed and the disk reserve made again \
    (the disk is full, or the database file cannot be written)";

/// What the writer thread commits: resource writes, audit entries (answered with the first
/// leaf index), a new data key, or any other write ([`SqliteStore::write`]).
enum Work {
    Writes(Vec<Write>),
    Audit(Vec<crate::AuditRow>),
    Key { name: String, key: WrappedKey, now: i64 },
    Run(Run),
}

/// A write run inside a group commit; `Fn`, since a group runs again after a checkpoint made
/// room for it.
type Run = Box<dyn Fn(&Connection) -> Result<(), StoreError> + Send>;

type Job = (Work, oneshot::Sender<Result<u64, StoreError>>);

pub struct SqliteStore {
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    writer: Mutex<mpsc::Sender<Job>>,
    /// Erasure and key rewrapping (large, rare, and followed by a checkpoint of their own) go
    /// through their own connection; every other write through the writer thread.
    admin: Mutex<Connection>,
    /// Set while the writer refuses writes for lack of headroom; the admin connection refuses
    /// then too (its writes would eat the room kept for the checkpoint) and `ping` fails.
    refusing: Arc<AtomicBool>,
    /// The database file (snapshots open their own connection to it).
    path: PathBuf,
}

/// What a process opens the database for; it decides how reader connections read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The server: many short reads while the file keeps growing.
    Serve,
    /// A short-lived process scanning the audit log (`valv audit verify`, `export`, `proof`):
    /// readers memory-map the file, which saves a kernel copy of every page (+17% verify rate).
    Scan,
}

/// Up to this much of the file is memory-mapped by readers opened for [`Access::Scan`] (SQLite
/// clamps it to its compiled maximum, 2 GiB in the bundled build; the rest is read with pread).
const SCAN_MMAP_BYTES: i64 = 1 << 40;

/// The audit log's file beside the database file: `valv.db` -> `valv-audit.db`.
pub fn audit_path(db: &Path) -> PathBuf {
    let stem = db.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match db.extension() {
        Some(ext) => format!("{stem}-audit.{}", ext.to_string_lossy()),
        None => format!("{stem}-audit"),
    };
    db.with_file_name(name)
}

/// A database's files removed: the database file and the audit log's, each with its WAL and
/// shared-memory files (what a test or a measurement made in a temporary folder leaves).
pub fn remove_files(db: &Path) {
    for file in [db.to_path_buf(), audit_path(db)] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
    }
}

/// Attaches the audit log's file as schema `audit` (created empty when missing).
pub fn attach_audit(conn: &Connection, db: &Path) -> Result<(), StoreError> {
    let file = audit_path(db);
    let name = file.to_str().ok_or_else(|| StoreError::Backend(format!("{} is not a UTF-8 path", file.display())))?;
    conn.execute("ATTACH DATABASE ?1 AS audit", [name])?;
    Ok(())
}

/// Schemas every connection has: the database and the audit log's file.
const SCHEMAS: [&str; 2] = ["main", "audit"];

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    attach_audit(&conn, path)?;
    for schema in SCHEMAS {
        let schema = Some(schema);
        conn.pragma_update(schema, "journal_mode", "WAL")?;
        conn.pragma_update(schema, "synchronous", "FULL")?;
        conn.pragma_update(schema, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
        conn.pragma_update(schema, "cache_size", CACHE_KIB)?;
        conn.pragma_update(schema, "secure_delete", "ON")?;
    }
    // Checkpoints are the checkpointer thread's (see CHECKPOINT_EVERY), not any commit's.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // The writer runs each job of a group in a savepoint, and SQLite keeps a savepoint's
    // rollback copy of every page it changes in a sub-journal: in a temporary file by default,
    // two writes per page (measured: more pwrite calls than the WAL itself). In memory it is a
    // copy; it lasts one group commit.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Above, per file: index inserts land on random pages, so a larger page cache saves
    // re-reading them on every commit. No memory map for the server: with the audit log appended
    // constantly the file grows all the time, and SQLite's remapping then costs more (page
    // faults, TLB shootdowns) than pread saves. Scanning processes map it (see `Access::Scan`).
    // Deleted content is overwritten (`secure_delete`), so freed pages do not keep old
    // ciphertext around longer than needed (it is encrypted either way).
    // One plan per statement whatever the bound values: without this, the bundled build's STAT4
    // makes SQLite re-prepare cached statements on every new binding.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Search statements vary in shape (one per combination of parameters); keep many.
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    move_audit_log(conn)
}

/// The audit tables as the migrations leave them, made in the audit log's file.
const AUDIT_TABLES: &str = "
CREATE TABLE audit.audit_entries (idx INTEGER PRIMARY KEY, leaf_hash BLOB NOT NULL, sealed BLOB NOT NULL, patient_token BLOB, query_sealed BLOB);
CREATE TABLE audit.audit_checkpoints (size INTEGER PRIMARY KEY, root BLOB NOT NULL, note TEXT NOT NULL);
CREATE TABLE audit.audit_tiles (level INTEGER NOT NULL, idx INTEGER NOT NULL, hashes BLOB NOT NULL, PRIMARY KEY (level, idx));
";

/// The migrations create the audit tables in the database file (as the first versions kept
/// them); they live in the audit log's file. Moved in two transactions, one per file (a
/// transaction over both is not atomic across them): the tables are made and filled in the audit
/// file, then dropped from the database. Interrupted between the two, the next start finds them
/// in the database still and moves them again, replacing the partial copy. A database without
/// them next to an audit file without them is refused: the file was lost or left behind.
fn move_audit_log(conn: &mut Connection) -> Result<(), StoreError> {
    let has = |c: &Connection, schema: &str| -> rusqlite::Result<bool> {
        c.query_row(&format!("SELECT count(*) FROM {schema}.sqlite_master WHERE type = 'table' AND name = 'audit_entries'"), [], |r| r.get::<_, i64>(0)).map(|n| n > 0)
    };
    if has(conn, "main")? {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if !has(&tx, "main")? {
            // Another process moved it while this one waited for the lock.
            return check_audit_tables(&tx, has(&tx, "audit")?);
        }
        tx.execute_batch("DROP TABLE IF EXISTS audit.audit_entries; DROP TABLE IF EXISTS audit.audit_checkpoints; DROP TABLE IF EXISTS audit.audit_tiles;")?;
        tx.execute_batch(AUDIT_TABLES)?;
        tx.execute_batch(
            "INSERT INTO audit.audit_entries (idx, leaf_hash, sealed, patient_token, query_sealed) SELECT idx, leaf_hash, sealed, patient_token, query_sealed FROM main.audit_entries ORDER BY idx;
             INSERT INTO audit.audit_checkpoints (size, root, note) SELECT size, root, note FROM main.audit_checkpoints ORDER BY size;
             INSERT INTO audit.audit_tiles (level, idx, hashes) SELECT level, idx, hashes FROM main.audit_tiles ORDER BY level, idx;",
        )?;
        tx.execute_batch(BY_PATIENT_TABLES)?;
        index_by_patient(&tx)?;
        tx.commit()?;
        // Without zeroing the freed pages: what they hold is in the audit file now, and zeroing
        // a large log would write all of it again into the WAL. The pages are reused as the
        // database grows (`VACUUM`, with the server stopped, returns them to the filesystem).
        conn.pragma_update(Some("main"), "secure_delete", "OFF")?;
        let tx = conn.transaction()?;
        tx.execute_batch("DROP TABLE IF EXISTS main.audit_entries; DROP TABLE IF EXISTS main.audit_checkpoints; DROP TABLE IF EXISTS main.audit_tiles;")?;
        tx.commit()?;
        conn.pragma_update(Some("main"), "secure_delete", "ON")?;
    }
    let found = has(conn, "audit")?;
    check_audit_tables(conn, found)?;
    adopt_by_patient_table(conn)
}

fn check_audit_tables(conn: &Connection, found: bool) -> Result<(), StoreError> {
    if found {
        return Ok(());
    }
    let file = conn.path().map(|p| audit_path(Path::new(p)).display().to_string()).unwrap_or_default();
    Err(StoreError::Backend(format!("the audit log is missing: {file} holds no audit tables (it belongs beside the database file; restore both together)")))
}

/// A patient's access log without decrypting everyone's: (patient token, leaf index) pairs, and
/// `upto`, the first leaf index not looked at yet. The writer adds many entries' pairs at once
/// ([`index_by_patient`]), after its group commits rather than in them: an index on the entries
/// themselves put a page of it into nearly every group's WAL frames per entry, and the group
/// commit is what every audited read waits for (reads by id 1.19× without it, bench/README.md).
/// A patient's entries are read after adding what waits, so the deferral is never seen.
const BY_PATIENT_TABLES: &str = "
CREATE TABLE IF NOT EXISTS audit.audit_by_patient (patient_token BLOB NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (patient_token, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit.audit_by_patient_upto (id INTEGER PRIMARY KEY CHECK (id = 1), upto INTEGER NOT NULL);
";

/// Adds the by-patient pairs of the entries appended since the last call, sorted (each page of
/// the table written once per call); returns how many entries it looked at.
pub(crate) fn index_by_patient(conn: &Connection) -> rusqlite::Result<u64> {
    let (upto, end) = by_patient_bounds(conn)?;
    if end <= upto {
        return Ok(0);
    }
    conn.prepare_cached(
        "INSERT OR IGNORE INTO audit_by_patient (patient_token, idx) SELECT patient_token, idx FROM audit_entries \
         WHERE idx >= ?1 AND idx < ?2 AND patient_token IS NOT NULL ORDER BY patient_token, idx",
    )?
    .execute(params![upto, end])?;
    conn.prepare_cached("INSERT OR REPLACE INTO audit_by_patient_upto (id, upto) VALUES (1, ?1)")?.execute(params![end])?;
    Ok(end - upto)
}

/// The first leaf index without its by-patient pair yet, and the log's size.
fn by_patient_bounds(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let upto: u64 = conn.prepare_cached("SELECT coalesce((SELECT upto FROM audit_by_patient_upto WHERE id = 1), 0)")?.query_row([], |r| r.get(0))?;
    let end: u64 = conn.prepare_cached("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries")?.query_row([], |r| r.get(0))?;
    Ok((upto, end))
}

/// A log made before the by-patient table had an index on the entries (schema version 3 made
/// it) instead: the table is filled from the entries and the index dropped, in one transaction
/// at the first start (on a log of tens of millions of entries, minutes).
fn adopt_by_patient_table(conn: &mut Connection) -> Result<(), StoreError> {
    let has = |c: &Connection, name: &str| c.query_row("SELECT count(*) FROM audit.sqlite_master WHERE name = ?1", params![name], |r| r.get::<_, i64>(0)).map(|n| n > 0);
    if has(conn, "audit_by_patient_upto")? && !has(conn, "audit_entries_patient")? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(BY_PATIENT_TABLES)?;
    index_by_patient(&tx)?;
    tx.execute_batch("DROP INDEX IF EXISTS audit.audit_entries_patient")?;
    tx.commit()?;
    Ok(())
}

impl SqliteStore {
    fn query_checkpoints(&self, tail: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<crate::StoredCheckpoint>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT size, root, note FROM audit_checkpoints {tail}"))?;
            let rows = stmt
                .query_map(args, |r| Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get::<_, String>(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(size, root, note)| {
                    let root = <[u8; 32]>::try_from(root.as_slice()).map_err(|_| StoreError::Integrity("a checkpoint root is not 32 bytes".into()))?;
                    Ok(crate::StoredCheckpoint { size, root, note })
                })
                .collect()
        })
    }

    /// Hands work to the writer thread and waits for its group's commit.
    async fn submit(&self, work: Work) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .lock()
            .map_err(|_| StoreError::Backend("writer lock poisoned".into()))?
            .send((work, tx))
            .map_err(|_| StoreError::Backend("the writer thread has stopped".into()))?;
        rx.await.map_err(|_| StoreError::Backend("the writer thread dropped a commit".into()))?
    }

    /// Runs `f` on the writer thread, in a savepoint of the next group commit, and returns what
    /// it returned once that commit is durable. Every write but erasure and rewrapping goes this
    /// way: on a connection of its own it waited for the writer's lock in SQLite's busy handler,
    /// asleep on a runtime thread, stalling every request queued on that thread — the detection
    /// engine's progress alone put wrk's p99 at full load at 28–40 ms instead of 8–12 ms
    /// (bench/README.md), and a flood of failed sign-ins would have done the same.
    async fn write<T: Send + 'static>(&self, f: impl Fn(&Connection) -> Result<T, StoreError> + Send + 'static) -> Result<T, StoreError> {
        let slot = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let run: Run = Box::new(move |c| {
            let value = f(c)?;
            *out.lock().map_err(|_| StoreError::Backend("write result lock poisoned".into()))? = Some(value);
            Ok(())
        });
        self.submit(Work::Run(run)).await?;
        let value = slot.lock().map_err(|_| StoreError::Backend("write result lock poisoned".into()))?.take();
        value.ok_or_else(|| StoreError::Backend("the writer thread committed a write without running it".into()))
    }

    /// Has the writer add the by-patient pairs still waiting ([`index_by_patient`]) — only when
    /// some wait, so that reading a patient's entries page by page costs the writer one step at
    /// most, and nothing once the log is idle.
    async fn index_waiting_by_patient(&self) -> Result<(), StoreError> {
        let waiting = self.with_reader(|c| Ok(by_patient_bounds(c).map(|(upto, end)| end > upto)?))?;
        if waiting {
            self.write(|c| index_by_patient(c).map_err(StoreError::from)).await?;
        }
        Ok(())
    }

    /// Opens (creating if needed) the database file and runs pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        SqliteStore::open_for(path, Access::Serve)
    }

    /// Opens without a disk reserve (tools, tests); see [`SqliteStore::open_with_reserve`].
    pub fn open_for(path: &Path, access: Access) -> Result<Self, StoreError> {
        SqliteStore::open_with_reserve(path, access, None)
    }

    /// Opens with headroom kept in `reserve` (the server): start is refused with a one-line
    /// message, before SQLite maps anything, when the disk has no room for the reserve and some
    /// work; a WAL left filling the disk is checkpointed with the reserve's room first.
    pub fn open_with_reserve(path: &Path, access: Access, reserve: Option<Reserve>) -> Result<Self, StoreError> {
        if let Some(r) = &reserve {
            make_room(path, r)?;
        }
        let mut first = connect(path)?;
        migrate(&mut first)?;
        let reader = || -> Result<Connection, StoreError> {
            let conn = connect(path)?;
            if access == Access::Scan {
                for schema in SCHEMAS {
                    conn.pragma_update(Some(schema), "mmap_size", SCAN_MMAP_BYTES)?;
                }
            }
            Ok(conn)
        };
        let readers = (0..READERS).map(|_| reader().map(Mutex::new)).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel::<Job>();
        let refusing = Arc::new(AtomicBool::new(false));
        let (poke, pokes) = mpsc::sync_channel(1);
        let writer = Writer::new(connect(path)?, path, reserve, refusing.clone(), poke)?;
        let checkpointer = connect(path)?;
        std::thread::Builder::new()
            .name("valv-sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        std::thread::Builder::new()
            .name("valv-sqlite-ckpt".into())
            .spawn(move || run_checkpointer(&checkpointer, &pokes))
            .map_err(|e| StoreError::Backend(format!("cannot start checkpointer thread: {e}")))?;
        Ok(SqliteStore { readers, next_reader: AtomicUsize::new(0), writer: Mutex::new(tx), admin: Mutex::new(first), refusing, path: path.to_path_buf() })
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        let conn = self.readers[i].lock().map_err(|_| StoreError::Backend("reader lock poisoned".into()))?;
        f(&conn)
    }

    /// [`Self::with_reader`] for several statements in one read transaction: one snapshot, and
    /// one round of SQLite's file locks and WAL check instead of one per statement (each of which
    /// discards the connection's page cache when a commit came in between).
    fn with_snapshot<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with_reader(|c| {
            let tx = c.unchecked_transaction()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn with_admin<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        if self.refusing.load(Ordering::Acquire) {
            return Err(StoreError::Backend(NO_HEADROOM.into()));
        }
        let conn = self.admin.lock().map_err(|_| StoreError::Backend("admin lock poisoned".into()))?;
        f(&conn)
    }
}

/// The room the server needs at start, made before SQLite opens (and maps) anything: the reserve
/// and [`disk::WORKING_BYTES`]. A WAL left behind that fills the disk (say the server was
/// restarted while it refused writes) is checkpointed first, with the reserve's room if need be:
/// that is what the reserve is for.
fn make_room(db: &Path, reserve: &Reserve) -> Result<(), StoreError> {
    let free = || reserve.free_bytes().map_err(|e| StoreError::Backend(format!("cannot read the free space beside {}: {e}", db.display())));
    let needed = |held: u64| disk::WORKING_BYTES + reserve.bytes().saturating_sub(held);
    let (mut held, mut available) = (reserve.held(), free()?);
    if available < needed(held) && (file_len(&wal_path(db)) > 0 || file_len(&wal_path(&audit_path(db))) > 0) {
        let freed = reserve.release();
        if freed > 0 {
            tracing::warn!(freed_mib = freed >> 20, "disk full at start: the disk reserve is spent on checkpointing the WAL");
        }
        // SQLite is opened only with room for its shared-memory index to grow.
        if free()? >= OPEN_BYTES {
            let checkpointed = Connection::open(db).map_err(StoreError::from).and_then(|c| {
                c.busy_timeout(BUSY_TIMEOUT)?;
                attach_audit(&c, db)?;
                checkpoint_truncate(&c).map_err(StoreError::from)
            });
            if let Err(e) = checkpointed {
                tracing::error!(error = %e, "the WAL could not be checkpointed at start");
            }
        }
        (held, available) = (reserve.held(), free()?);
    }
    if available < needed(held) {
        return Err(StoreError::Backend(disk::too_full(db.parent().unwrap_or(Path::new(".")), available, needed(held), reserve.bytes())));
    }
    reserve.make().map_err(StoreError::Backend)
}

/// The least free space SQLite is opened with at start (the shared-memory index grows with the
/// WAL: 32 KiB per 4,096 frames).
const OPEN_BYTES: u64 = 1 << 20;

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// `PRAGMA wal_checkpoint(TRUNCATE)`: copies the whole WAL into the database, fsyncs it and
/// truncates the WAL to nothing. `Ok(false)` when readers kept it from finishing within
/// [`CHECKPOINT_WAIT`] (whatever it copied stays copied).
fn checkpoint_truncate(conn: &Connection) -> rusqlite::Result<bool> {
    conn.busy_timeout(CHECKPOINT_WAIT)?;
    let busy = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0));
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(busy? == 0)
}

fn is_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
}

/// The writer thread: group commits, and the headroom that keeps a full disk survivable.
struct Writer {
    conn: Connection,
    /// Each schema's file and WAL (the database, the audit log).
    files: [DbFile; 2],
    /// `None` (tools, tests): failures are only reported, and the writer never refuses.
    reserve: Option<Reserve>,
    refusing: Arc<AtomicBool>,
    last_recovery: Option<Instant>,
    last_growth_check: Option<Instant>,
    /// Told after each commit that the WAL has new pages.
    checkpoints: mpsc::SyncSender<()>,
    last_wal_check: Option<Instant>,
    /// Audit entries this writer appended since its last by-patient step.
    unindexed: u64,
}

/// One of the files the writer commits to.
struct DbFile {
    schema: &'static str,
    path: PathBuf,
    wal: PathBuf,
    page_size: u64,
}

impl Writer {
    fn new(conn: Connection, db: &Path, reserve: Option<Reserve>, refusing: Arc<AtomicBool>, checkpoints: mpsc::SyncSender<()>) -> Result<Writer, StoreError> {
        let file = |schema: &'static str, path: PathBuf| -> Result<DbFile, StoreError> {
            let page_size = conn.pragma_query_value(Some(schema), "page_size", |r| r.get(0))?;
            Ok(DbFile { schema, wal: wal_path(&path), path, page_size })
        };
        let files = [file("main", db.to_path_buf())?, file("audit", audit_path(db))?];
        Ok(Writer {
            conn,
            files,
            reserve,
            refusing,
            last_recovery: None,
            last_growth_check: None,
            checkpoints,
            last_wal_check: None,
            unindexed: 0,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            let first = match rx.recv_timeout(IDLE) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.idle();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            let results = self.commit(&group);
            let _ = self.checkpoints.try_send(());
            self.keep_wal_short();
            self.unindexed += group.iter().map(|(work, _)| if let Work::Audit(rows) = work { rows.len() as u64 } else { 0 }).sum::<u64>();
            for ((_, reply), result) in group.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            if self.unindexed >= INDEX_EVERY {
                self.index_waiting();
            }
        }
    }

    /// The by-patient step ([`index_by_patient`]) in a transaction of its own, after a group's
    /// replies. A failure is left for the next step (or the next read of a patient's entries,
    /// which runs one first).
    fn index_waiting(&mut self) {
        if self.refusing.load(Ordering::Acquire) {
            return;
        }
        let step = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).and_then(|tx| {
            index_by_patient(&tx)?;
            tx.commit()
        });
        match step {
            Ok(()) => self.unindexed = 0,
            Err(e) => tracing::debug!(error = %e, "the audit log's by-patient step failed; tried again later"),
        }
    }

    fn commit(&mut self, group: &[Job]) -> Vec<Result<u64, StoreError>> {
        if !self.has_headroom() {
            return fail_all(group, NO_HEADROOM);
        }
        let first = commit_group(&mut self.conn, group);
        let Some(reserve) = &self.reserve else { return first.results };
        let failed = first.results.iter().any(|r| matches!(r, Err(StoreError::Backend(_))));
        // SQLite reports ENOSPC as SQLITE_FULL; a failure with the disk (nearly) full is taken
        // for one too, whatever the error said.
        if !(first.full || failed && reserve.free_bytes().is_ok_and(|f| f < 1 << 20)) {
            return first.results;
        }
        self.refuse("a write failed for lack of disk space");
        if first.committed {
            // Only some jobs failed; the others are durable and answered as such.
            return first.results;
        }
        // Nothing of the group was committed (SQLite rolled it back), so it can run again once
        // a checkpoint has made room; if none can yet, its requests fail (503) as they would have.
        if self.recover(true) {
            let again = commit_group(&mut self.conn, group);
            if again.full {
                self.refuse("a write failed for lack of disk space right after a checkpoint");
            }
            return again.results;
        }
        fail_all(group, NO_HEADROOM)
    }

    /// Whether writes may go on: not while refusing (unless a recovery now succeeds), nor when
    /// the new pages waiting in the WAL would no longer fit in what a checkpoint could use
    /// (free space plus the reserve) — then the WAL must stop growing until one can run.
    fn has_headroom(&mut self) -> bool {
        let Some(reserve) = &self.reserve else { return true };
        if self.refusing.load(Ordering::Acquire) {
            return self.recover(false);
        }
        // Measured at most every GROWTH_CHECK (three calls into the kernel and one into SQLite
        // cost a few per cent of a group commit): the margin covers what can be written between.
        if self.last_growth_check.is_some_and(|t| t.elapsed() < GROWTH_CHECK) {
            return true;
        }
        self.last_growth_check = Some(Instant::now());
        let pending = self.pending_growth();
        if pending > GROWTH_MARGIN {
            let room = reserve.free_bytes().unwrap_or(0) + reserve.held();
            if pending + GROWTH_MARGIN > room {
                self.refuse("checkpoints are failing and a later one would no longer fit on the disk");
                return self.recover(true);
            }
        }
        true
    }

    /// See [`WAL_RESTART_ABOVE`]; looked at every [`GROWTH_CHECK`].
    fn keep_wal_short(&mut self) {
        if self.last_wal_check.is_some_and(|t| t.elapsed() < GROWTH_CHECK) {
            return;
        }
        self.last_wal_check = Some(Instant::now());
        if self.longest_wal() > WAL_RESTART_ABOVE {
            // Without a schema name the checkpoint covers both files.
            if let Err(e) = self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "checkpoint failed");
            }
        }
    }

    /// Bytes a checkpoint would add to the two files now: each one's size as of the newest
    /// commit in its WAL minus the file's size.
    fn pending_growth(&self) -> u64 {
        self.files
            .iter()
            .map(|f| {
                let pages: u64 = self
                    .conn
                    .prepare_cached(&format!("PRAGMA {}.page_count", f.schema))
                    .and_then(|mut s| s.query_row([], |r| r.get(0)))
                    .unwrap_or(0);
                (pages * f.page_size).saturating_sub(file_len(&f.path))
            })
            .sum()
    }

    fn longest_wal(&self) -> u64 {
        self.files.iter().map(|f| file_len(&f.wal)).max().unwrap_or(0)
    }

    fn refuse(&self, why: &str) {
        if !self.refusing.swap(true, Ordering::AcqRel) {
            tracing::error!(reason = why, "disk full: writes are refused (503) until a checkpoint has run and the disk reserve is made again");
        }
    }

    /// Tries to get out of a refusal: the reserve is released (room for the checkpoint), the
    /// WAL checkpointed and truncated, and the reserve made again; writes are accepted once all
    /// three have happened. At most every [`RECOVERY_INTERVAL`] unless `now`.
    fn recover(&mut self, now: bool) -> bool {
        let Some(reserve) = self.reserve.clone() else { return true };
        if !now && self.last_recovery.is_some_and(|t| t.elapsed() < RECOVERY_INTERVAL) {
            return false;
        }
        self.last_recovery = Some(Instant::now());
        let freed = reserve.release();
        if freed > 0 {
            tracing::warn!(freed_mib = freed >> 20, "the disk reserve is released to make room for a checkpoint");
        }
        match checkpoint_truncate(&self.conn) {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                // Expected while the fault lasts; tried again every RECOVERY_INTERVAL.
                tracing::debug!(error = %e, "checkpoint failed; writes stay refused");
                return false;
            }
        }
        let free = reserve.free_bytes().unwrap_or(0);
        if free < reserve.bytes() + disk::WORKING_BYTES {
            tracing::debug!(free_mib = free >> 20, "the WAL is checkpointed but the disk is still too full for the reserve");
            return false;
        }
        if let Err(e) = reserve.make() {
            tracing::warn!(error = %e, "the disk reserve could not be made again");
            return false;
        }
        self.refusing.store(false, Ordering::Release);
        tracing::warn!(free_mib = free >> 20, "disk space recovered: the WAL is checkpointed and truncated, the reserve made again; writes are accepted");
        true
    }

    /// Between bursts: get out of a refusal, truncate a WAL left large, and make a missing
    /// reserve again when there is room for it.
    fn idle(&mut self) {
        if self.refusing.load(Ordering::Acquire) {
            self.recover(false);
            return;
        }
        if self.unindexed > 0 {
            self.index_waiting();
        }
        let wal = self.longest_wal();
        if wal > IDLE_TRUNCATE_ABOVE {
            match checkpoint_truncate(&self.conn) {
                Ok(true) => tracing::debug!(wal_mib = wal >> 20, "idle: the WAL is checkpointed and truncated"),
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "idle checkpoint failed"),
            }
        }
        if let Some(reserve) = &self.reserve {
            if !reserve.is_held() && reserve.free_bytes().is_ok_and(|f| f >= reserve.bytes() + disk::WORKING_BYTES) {
                match reserve.make() {
                    Ok(()) => tracing::info!("the disk reserve is made again"),
                    Err(e) => tracing::warn!(error = %e, "the disk reserve could not be made"),
                }
            }
        }
    }
}

/// Copies new WAL pages into the database at most every [`CHECKPOINT_EVERY`] while commits come
/// in, on a connection of its own. PASSIVE: it never waits for readers or the writer, and SQLite
/// starts the WAL over at the next commit once a checkpoint has copied all of it. Ends with the
/// writer (its sender dropped).
fn run_checkpointer(conn: &Connection, pokes: &mpsc::Receiver<()>) {
    let mut last = Instant::now();
    let mut pending = false;
    loop {
        let wait = if pending { CHECKPOINT_EVERY.saturating_sub(last.elapsed()) } else { IDLE };
        match pokes.recv_timeout(wait) {
            Ok(()) => pending = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if pending && last.elapsed() >= CHECKPOINT_EVERY {
            // A failure (a full disk, an unwritable file) is the writer's to handle: it sees
            // the WAL grow and refuses writes before a checkpoint could no longer fit.
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "checkpoint failed");
            }
            last = Instant::now();
            pending = false;
        }
    }
}

fn fail_all(group: &[Job], why: &str) -> Vec<Result<u64, StoreError>> {
    group.iter().map(|_| Err(StoreError::Backend(why.to_string()))).collect()
}

/// What became of a group.
struct Outcome {
    results: Vec<Result<u64, StoreError>>,
    /// Whether the transaction was committed (else nothing of the group was).
    committed: bool,
    /// Whether SQLite said the disk is full.
    full: bool,
}

/// Applies each job in its own savepoint inside one transaction, then inserts the group's new
/// search tokens, sorted, and commits once.
///
/// Why the tokens wait: a token lands on a random page of the token index, and every page a job
/// changes inside its savepoint is first copied for a possible rollback — per job, so a page
/// changed by many jobs of a group was copied as many times. Inserted after the savepoints, in
/// key order, each page is changed once per group and nothing is copied (bench/README "Import").
/// Tokens are only added for jobs that succeeded; a job that reads the index (a conditional
/// create, an update removing its old tokens) first gets every waiting token inserted.
fn commit_group(conn: &mut Connection, group: &[Job]) -> Outcome {
    let fail = |what: &str, e: rusqlite::Error, full: bool| Outcome { results: fail_all(group, &format!("{what}: {e}")), committed: false, full: full || is_full(&e) };
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail("cannot begin", e, false),
    };
    let mut results = Vec::with_capacity(group.len());
    let mut full = false;
    let mut waiting: Vec<(crate::Token, i64)> = Vec::new();
    for (work, _) in group {
        if reads_index(work) {
            if let Err(e) = insert_tokens(&tx, "search_tokens", &mut waiting) {
                return fail("cannot index", e, full);
            }
        }
        let mut added = Vec::new();
        // Cached statements: preparing these two anew for every job was 3% of the writer's time.
        let outcome = tx.prepare_cached("SAVEPOINT job").and_then(|mut s| s.execute([])).map_err(StoreError::from).and_then(|_| match work {
            Work::Writes(writes) => apply_writes(&tx, writes, &mut added).map(|()| 0),
            Work::Audit(rows) => append_audit_rows(&tx, rows),
            Work::Key { name, key, now } => insert_key_if_absent(&tx, name, key, *now).map(|()| 0),
            Work::Run(run) => run(&tx).map(|()| 0),
        });
        // A statement can fail for lack of space too (a spilled cache page); the message is
        // all that is left of it here.
        full |= matches!(&outcome, Err(StoreError::Backend(m)) if m.contains("disk is full"));
        let closed = match &outcome {
            Ok(_) => tx.prepare_cached("RELEASE job").and_then(|mut s| s.execute([])).map(|_| ()),
            Err(_) => tx.execute_batch("ROLLBACK TO job; RELEASE job"),
        };
        if let Err(e) = closed {
            return fail("savepoint failed", e, full);
        }
        if outcome.is_ok() {
            waiting.append(&mut added);
        }
        results.push(outcome);
    }
    if let Err(e) = insert_tokens(&tx, "search_tokens", &mut waiting) {
        return fail("cannot index", e, full);
    }
    match tx.commit() {
        Ok(()) => Outcome { results, committed: true, full },
        Err(e) => fail("commit failed", e, full),
    }
}

/// Whether a job looks at the token index as it stands (so tokens waiting must be in it first).
fn reads_index(work: &Work) -> bool {
    matches!(work, Work::Writes(writes) if writes.iter().any(write_reads_index))
}

/// A conditional create checks the index; an update removes its old tokens from it.
fn write_reads_index(w: &Write) -> bool {
    w.unless.is_some() || matches!(w.expect, Expect::Version(_))
}

/// How many (token, rid) pairs one INSERT statement carries.
const TOKENS_PER_INSERT: usize = 64;

/// Inserts (token, rid) pairs into `table` in key order, many per statement, and empties
/// `tokens`; a pair already there is kept.
fn insert_tokens(conn: &Connection, table: &str, tokens: &mut Vec<(crate::Token, i64)>) -> rusqlite::Result<()> {
    tokens.sort_unstable();
    tokens.dedup();
    let many = format!("INSERT OR IGNORE INTO {table} (token, rid) VALUES {}", vec!["(?, ?)"; TOKENS_PER_INSERT].join(", "));
    let mut chunks = tokens.chunks_exact(TOKENS_PER_INSERT);
    let mut stmt = conn.prepare_cached(&many)?;
    for chunk in &mut chunks {
        let params: Vec<&dyn rusqlite::ToSql> = chunk.iter().flat_map(|(t, rid)| [t as &dyn rusqlite::ToSql, rid as &dyn rusqlite::ToSql]).collect();
        stmt.execute(params.as_slice())?;
    }
    let mut one = conn.prepare_cached(&format!("INSERT OR IGNORE INTO {table} (token, rid) VALUES (?1, ?2)"))?;
    for (t, rid) in chunks.remainder() {
        one.execute(params![t, rid])?;
    }
    tokens.clear();
    Ok(())
}

/// Stores a data key unless one of that name exists — and never one for an erased patient,
/// checked in the same statement as the insert.
fn insert_key_if_absent(conn: &Connection, name: &str, key: &WrappedKey, now: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO data_keys (name, provider, kek_id, kek_version, wrapped, created, wrapped_at) \
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?6 WHERE NOT EXISTS (SELECT 1 FROM erasures WHERE 'patient:' || patient = ?1)",
    )?
    .execute(params![name, key.provider, key.kek_id, key.kek_version, key.ciphertext, now])?;
    Ok(())
}

/// Appends entries at the end of the log; returns the first one's leaf index.
fn append_audit_rows(conn: &Connection, rows: &[crate::AuditRow]) -> Result<u64, StoreError> {
    let next: u64 = conn.prepare_cached("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries")?.query_row([], |r| r.get(0))?;
    let mut insert = conn.prepare_cached("INSERT INTO audit_entries (idx, leaf_hash, sealed, patient_token, query_sealed) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    for (i, row) in rows.iter().enumerate() {
        insert.execute(params![next + i as u64, &row.leaf_hash[..], row.sealed, row.patient_token.as_ref().map(|t| &t[..]), row.query_sealed])?;
    }
    Ok(next)
}

/// Applies `writes`; the search tokens of the versions written are added to `added`, not
/// inserted (see [`commit_group`]).
fn apply_writes(conn: &Connection, writes: &[Write], added: &mut Vec<(crate::Token, i64)>) -> Result<(), StoreError> {
    for w in writes {
        let v = &w.version;
        // An earlier write of this job may be what this one checks or replaces.
        if write_reads_index(w) {
            insert_tokens(conn, "search_tokens", added)?;
        }
        if let (Some(sealed_with), Some(patient)) = (&w.sealed_with, &v.patient) {
            check_sealed_with(conn, patient, sealed_with)?;
        }
        let current: Option<(i64, u64, Vec<u8>)> = conn
            .prepare_cached("SELECT rid, version, tokens FROM resources WHERE type = ?1 AND id = ?2")?
            .query_row(params![v.resource_type, v.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let tokens: Vec<u8> = w.tokens.concat();
        let rid = match (w.expect, current) {
            (Expect::Absent, None) => {
                if let Some(unless) = &w.unless {
                    check_unmatched(conn, unless)?;
                }
                conn.prepare_cached(
                    "INSERT INTO resources (type, id, version, deleted, patient, last_updated, tokens) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![v.resource_type, v.id, v.version, v.deleted, v.patient, v.last_updated, tokens])?;
                conn.last_insert_rowid()
            }
            (Expect::Absent, Some(_)) => {
                return Err(StoreError::Conflict(format!("{}/{} already exists", v.resource_type, v.id)))
            }
            (Expect::Version(want), Some((rid, have, old_tokens))) if want == have => {
                conn.prepare_cached(
                    "UPDATE resources SET version = ?1, deleted = ?2, patient = ?3, last_updated = ?4, tokens = ?5 WHERE rid = ?6",
                )?
                .execute(params![v.version, v.deleted, v.patient, v.last_updated, tokens, rid])?;
                let mut remove = conn.prepare_cached("DELETE FROM search_tokens WHERE token = ?1 AND rid = ?2")?;
                for old in old_tokens.chunks_exact(std::mem::size_of::<crate::Token>()) {
                    remove.execute(params![old, rid])?;
                }
                rid
            }
            (Expect::Version(want), Some((_, have, _))) => {
                return Err(StoreError::Conflict(format!(
                    "{}/{} is at version {have}, not {want}",
                    v.resource_type, v.id
                )))
            }
            (Expect::Version(_), None) => return Err(StoreError::NotFound(format!("{}/{}", v.resource_type, v.id))),
        };
        conn.prepare_cached(
            "INSERT INTO versions (rid, version, deleted, patient, last_updated, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![rid, v.version, v.deleted, v.patient, v.last_updated, v.body])?;
        added.extend(w.tokens.iter().map(|t| (*t, rid)));
    }
    Ok(())
}

/// A search's candidates (see [`Store::search`]).
fn search_in(c: &Connection, filter: &Filter) -> Result<Vec<Located>, StoreError> {
    Ok(search_rows_in(c, filter)?.0)
}

/// A search's candidates and, beside them, their resources' rowids.
fn search_rows_in(c: &Connection, filter: &Filter) -> Result<(Vec<Located>, Vec<i64>), StoreError> {
    let (sql, args) = search_sql(filter);
    // Same query shape, same SQL text: cached like every other statement.
    let mut stmt = c.prepare_cached(&sql)?;
    let mut rows = stmt.query(params_from_iter(args.iter()))?;
    let (mut located, mut rids) = (Vec::new(), Vec::new());
    while let Some(r) = rows.next()? {
        located.push(Located { id: r.get(0)?, version: r.get(1)?, patient: r.get(2)?, deleted: r.get(3)?, last_updated: r.get(4)? });
        rids.push(r.get(5)?);
    }
    Ok((located, rids))
}

/// The current versions of the `ids` among `listed` (found in the same read transaction, in
/// the same order): each straight from its newest row in `versions` by the rowid the search
/// gave — two B-tree descents instead of four through the (type, id) index — and checked
/// against the current-version pointer the search read, as [`read_many_in`] checks it.
fn read_listed_in(c: &Connection, resource_type: &str, listed: &[Located], rids: &[i64], ids: &[String]) -> Result<Vec<StoredVersion>, StoreError> {
    let mut stmt = c.prepare_cached("SELECT ?2, ?3, v.version, v.deleted, v.patient, v.last_updated, v.body, ?4 FROM versions v WHERE v.rid = ?1 ORDER BY v.version DESC LIMIT 1")?;
    let mut out = Vec::with_capacity(ids.len());
    let mut at = 0;
    for id in ids {
        let Some(offset) = listed[at..].iter().position(|l| l.id == *id) else {
            // Not in the listing's order: read it the long way.
            out.extend(read_many_in(c, resource_type, std::slice::from_ref(id))?);
            continue;
        };
        at += offset;
        let found = stmt.query_row(params![rids[at], resource_type, id, listed[at].version], row_to_current).optional()?;
        out.extend(current_checked(found)?);
        at += 1;
    }
    Ok(out)
}

/// Current versions of `ids` (see [`Store::read_many`]).
fn read_many_in(c: &Connection, resource_type: &str, ids: &[String]) -> Result<Vec<StoredVersion>, StoreError> {
    let mut stmt = c.prepare_cached(&format!("SELECT {CURRENT_COLUMNS} FROM {CURRENT_FROM}"))?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(v) = current_checked(stmt.query_row(params![resource_type, id], row_to_current).optional()?)? {
            out.push(v);
        }
    }
    Ok(out)
}

/// A search's SQL and its arguments (the same text for the same shape: cached statements).
fn search_sql(filter: &Filter) -> (String, Vec<rusqlite::types::Value>) {
    // With tokens, the rows come from the token lists (rowid lookups, already in rid order);
    // `+` keeps SQLite from walking every resource of the type through the type index instead
    // and testing each against the lists (11-14 ms instead of 0.5 ms for a patient's
    // Observations among 49k, bench/README "Searches among 100k resources").
    let columns = "r.id, r.version, r.patient, r.deleted, r.last_updated, r.rid";
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    // One token in creation order (`patient=…`, `code=…`): its rows of the token index are
    // already in rid order, so they drive the search and a LIMIT stops it early. As a list
    // (below), SQLite would collect every rid of the token before the first row (all 100,000
    // Observations of a patient for a page of 20).
    let one_token = match filter.token_groups.as_slice() {
        [only] if only.len() == 1 && filter.order == Order::Created => Some(only[0]),
        _ => None,
    };
    let (mut sql, groups) = match one_token {
        Some(token) => {
            args.push(rusqlite::types::Value::Blob(token.to_vec()));
            (format!("SELECT {columns} FROM search_tokens t CROSS JOIN resources r ON r.rid = t.rid WHERE t.token = ? AND r.type = ? AND r.deleted = 0"), &[][..])
        }
        None if filter.token_groups.is_empty() => (format!("SELECT {columns} FROM resources r WHERE r.type = ? AND r.deleted = 0"), &[][..]),
        None => (format!("SELECT {columns} FROM resources r WHERE +r.type = ? AND r.deleted = 0"), filter.token_groups.as_slice()),
    };
    args.push(filter.resource_type.clone().into());
    for group in groups {
        sql.push_str(" AND r.rid IN (SELECT rid FROM search_tokens WHERE token IN (");
        sql.push_str(&vec!["?"; group.len()].join(","));
        sql.push_str("))");
        args.extend(group.iter().map(|t| rusqlite::types::Value::Blob(t.to_vec())));
    }
    if let Some(ids) = &filter.ids {
        sql.push_str(" AND r.id IN (");
        sql.push_str(&vec!["?"; ids.len()].join(","));
        sql.push(')');
        args.extend(ids.iter().map(|i| rusqlite::types::Value::Text(i.clone())));
    }
    for ranges in &filter.last_updated {
        let parts: Vec<&str> = ranges.iter().map(|_| "(r.last_updated >= ? AND r.last_updated < ?)").collect();
        sql.push_str(&format!(" AND ({})", parts.join(" OR ")));
        for (from, to) in ranges {
            args.push((*from).into());
            args.push((*to).into());
        }
    }
    sql.push_str(match filter.order {
        // The same order as r.rid, named so that SQLite sees the token index gives it.
        Order::Created if one_token.is_some() => " ORDER BY t.rid",
        Order::Created => " ORDER BY r.rid",
        Order::LastUpdatedAsc => " ORDER BY r.last_updated, r.rid",
        Order::LastUpdatedDesc => " ORDER BY r.last_updated DESC, r.rid DESC",
    });
    if let Some(limit) = filter.limit {
        sql.push_str(" LIMIT ?");
        args.push(i64::try_from(limit).unwrap_or(i64::MAX).into());
    }
    (sql, args)
}

/// Fails a conditional create if a current resource matches its condition. Run by the one
/// writer inside its transaction (and under SQLite's write lock across processes), so no other
/// write comes between this check and the insert.
fn check_unmatched(conn: &Connection, filter: &Filter) -> Result<(), StoreError> {
    let (sql, args) = search_sql(&Filter { limit: Some(1), ..filter.clone() });
    let found: Option<String> = conn.prepare_cached(&sql)?.query_row(params_from_iter(args.iter()), |r| r.get(0)).optional()?;
    match found {
        Some(id) => Err(StoreError::Matched(format!("{}/{id}", filter.resource_type))),
        None => Ok(()),
    }
}

/// Refuses a body sealed under a patient key that is no longer the stored one (rotated,
/// rewrapped or destroyed by another process since this one read it).
fn check_sealed_with(conn: &Connection, patient: &str, sealed_with: &[u8]) -> Result<(), StoreError> {
    let same: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM data_keys WHERE name = 'patient:' || ?1 AND wrapped = ?2)")?
        .query_row(params![patient, sealed_with], |r| r.get(0))?;
    if same {
        Ok(())
    } else {
        Err(StoreError::KeyChanged(format!("the data key of patient {patient}")))
    }
}

/// (leaf index, row). A leaf hash or token of the wrong length (only by tampering) is carried
/// through zero-filled or dropped, so verification reports it instead of the read failing.
const USER_COLUMNS: &str = "SELECT id, username_token, version, sealed, enrollment_hash FROM users";

fn row_to_user(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        id: r.get(0)?,
        // A token of the wrong length reads as zeros, which no user name blinds to.
        username_token: <crate::Token>::try_from(r.get_ref(1)?.as_blob()?).unwrap_or_default(),
        version: r.get(2)?,
        sealed: r.get(3)?,
        enrollment_hash: r.get_ref(4)?.as_blob_or_null()?.and_then(|h| <[u8; 32]>::try_from(h).ok()),
    })
}

fn row_to_audit(r: &rusqlite::Row<'_>) -> rusqlite::Result<(u64, crate::AuditRow)> {
    // Borrowed, not copied: verification reads millions of rows. A hash of the wrong length
    // reads as zeros, which no entry hashes to, so verification reports the row.
    let leaf_hash = <[u8; 32]>::try_from(r.get_ref(1)?.as_blob()?).unwrap_or([0; 32]);
    let patient_token = r.get_ref(3)?.as_blob_or_null()?.and_then(|t| <crate::Token>::try_from(t).ok());
    Ok((r.get(0)?, crate::AuditRow { leaf_hash, sealed: r.get(2)?, patient_token, query_sealed: r.get(4)? }))
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredVersion> {
    row_to_version_at(r, 0)
}

/// A version from the [`VERSION_COLUMNS`] starting at column `at`.
fn row_to_version_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<StoredVersion> {
    Ok(StoredVersion {
        resource_type: r.get(at)?,
        id: r.get(at + 1)?,
        version: r.get(at + 2)?,
        deleted: r.get(at + 3)?,
        patient: r.get(at + 4)?,
        last_updated: r.get(at + 5)?,
        body: r.get(at + 6)?,
    })
}

const VERSION_COLUMNS: &str = "r.type, r.id, v.version, v.deleted, v.patient, v.last_updated, v.body";

/// The current version is the newest stored version (by the `(rid, version)` index), not what
/// the `resources.version` pointer says: a pointer set back to an older version by someone
/// writing the database would otherwise serve that version as current. The pointer is read too,
/// and a disagreement is an integrity failure.
const CURRENT_COLUMNS: &str = "r.type, r.id, v.version, v.deleted, v.patient, v.last_updated, v.body, r.version";
const CURRENT_FROM: &str = "resources r JOIN versions v ON v.rid = r.rid WHERE r.type = ?1 AND r.id = ?2 ORDER BY v.version DESC LIMIT 1";

fn row_to_current(r: &rusqlite::Row<'_>) -> rusqlite::Result<(StoredVersion, u64)> {
    Ok((row_to_version(r)?, r.get(7)?))
}

fn current_checked(found: Option<(StoredVersion, u64)>) -> Result<Option<StoredVersion>, StoreError> {
    match found {
        Some((v, pointer)) if v.version != pointer => Err(StoreError::Integrity(format!(
            "{}/{}: the current-version pointer ({pointer}) disagrees with the newest stored version ({}): altered outside Valv",
            v.resource_type, v.id, v.version
        ))),
        other => Ok(other.map(|(v, _)| v)),
    }
}

const WRAPPED_COLUMNS: &str = "provider, kek_id, kek_version, wrapped";

fn row_to_wrapped(r: &rusqlite::Row<'_>) -> rusqlite::Result<WrappedKey> {
    Ok(WrappedKey { provider: r.get(0)?, kek_id: r.get(1)?, kek_version: r.get(2)?, ciphertext: r.get(3)? })
}

const UPLOAD_COLUMNS: &str = "id, binary_id, object, patient, agent, sealed_key, content_type, length, received, parts, created, expires";

fn row_to_case(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::CaseRow> {
    Ok(crate::CaseRow { kind: r.get(0)?, id: r.get(1)?, version: r.get(2)?, sealed: r.get(3)? })
}

fn row_to_alert(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::AlertRow> {
    Ok(crate::AlertRow { id: r.get(0)?, time: r.get(1)?, rule: r.get(2)?, severity: r.get(3)?, sealed: r.get(4)? })
}

fn row_to_upload(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::UploadRow> {
    Ok(crate::UploadRow {
        id: r.get(0)?,
        binary_id: r.get(1)?,
        object: r.get(2)?,
        patient: r.get(3)?,
        agent: r.get(4)?,
        sealed_key: r.get(5)?,
        content_type: r.get(6)?,
        length: r.get(7)?,
        received: r.get(8)?,
        parts: r.get(9)?,
        created: r.get(10)?,
        expires: r.get(11)?,
    })
}

const TICKET_COLUMNS: &str = "hash, id, binary_id, version, agent, purpose, expires, uses, used, revoked, created, mac";

fn row_to_ticket(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::TicketRow> {
    let hash: Vec<u8> = r.get(0)?;
    let hash = hash.try_into().map_err(|_| rusqlite::Error::InvalidColumnType(0, "hash".into(), rusqlite::types::Type::Blob))?;
    Ok(crate::TicketRow {
        hash,
        id: r.get(1)?,
        binary_id: r.get(2)?,
        version: r.get(3)?,
        agent: r.get(4)?,
        purpose: r.get(5)?,
        expires: r.get(6)?,
        uses: r.get(7)?,
        used: r.get(8)?,
        revoked: r.get(9)?,
        created: r.get(10)?,
        mac: r.get(11)?,
    })
}

pub(crate) const FILE_COLUMNS: &str = "binary_id, object, patient, sealed_key, size, sha256, scan, created";

pub(crate) fn row_to_file(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::FileRow> {
    let hash: Vec<u8> = r.get(5)?;
    let sha256 = hash.try_into().map_err(|_| rusqlite::Error::InvalidColumnType(5, "sha256".into(), rusqlite::types::Type::Blob))?;
    Ok(crate::FileRow { binary_id: r.get(0)?, object: r.get(1)?, patient: r.get(2)?, sealed_key: r.get(3)?, size: r.get(4)?, sha256, scan: r.get(6)?, created: r.get(7)? })
}

fn row_to_api_key(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    let hash: Vec<u8> = r.get(3)?;
    let mut h = [0u8; 32];
    if hash.len() == 32 {
        h.copy_from_slice(&hash);
    }
    Ok(ApiKeyRecord { id: r.get(0)?, name: r.get(1)?, role: r.get(2)?, hash: h, created: r.get(4)?, revoked: r.get(5)?, mac: r.get(6)?, scopes: r.get(7)? })
}

#[async_trait]
impl Store for SqliteStore {
    async fn get_key(&self, name: &str) -> Result<Option<WrappedKey>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached(&format!("SELECT {WRAPPED_COLUMNS} FROM data_keys WHERE name = ?1"))?.query_row(params![name], row_to_wrapped).optional()?))
    }

    /// Through the writer thread, like every write on the request path: a second writing
    /// connection would wait for the writer's lock in SQLite's busy handler (sleeping on a
    /// runtime thread) and commit on its own instead of in the writer's group.
    async fn put_key_if_absent(&self, name: &str, key: &WrappedKey, now: i64) -> Result<WrappedKey, StoreError> {
        self.submit(Work::Key { name: name.to_string(), key: key.clone(), now }).await?;
        self.get_key(name).await?.ok_or_else(|| StoreError::Gone(format!("no key is made for {name}: the patient's data was erased")))
    }

    async fn erase_patient(&self, patient: &str, erased_at: i64) -> Result<crate::ErasedPatient, StoreError> {
        let erased = self.with_admin(|c| {
            // Immediate: the transaction reads, then writes; begun deferred, a server writing the
            // same file in between makes the upgrade fail at once (SQLITE_BUSY, which the busy
            // timeout does not wait out) and `valv erase` answered "storage is unavailable".
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let already: bool = tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM erasures WHERE patient = ?1)")?.query_row(params![patient], |r| r.get(0))?;
            if already {
                return Err(StoreError::Conflict(format!("patient {patient} was erased already")));
            }
            let seq: u64 = tx.prepare_cached("SELECT coalesce(max(seq), 0) + 1 FROM erasures")?.query_row([], |r| r.get(0))?;
            tx.prepare_cached("INSERT INTO erasures (patient, seq, erased_at) VALUES (?1, ?2, ?3)")?.execute(params![patient, seq, erased_at])?;
            let key_destroyed = tx.prepare_cached("DELETE FROM data_keys WHERE name = 'patient:' || ?1")?.execute(params![patient])? > 0;
            // Each resource row lists its current tokens: deleting those by primary key costs
            // what the patient has, not a scan of every token of the installation.
            let owned: Vec<(i64, Vec<u8>)> = {
                let mut stmt = tx.prepare_cached("SELECT rid, tokens FROM resources WHERE patient = ?1")?;
                let rows = stmt.query_map(params![patient], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut tokens = 0u64;
            {
                let mut remove = tx.prepare_cached("DELETE FROM search_tokens WHERE token = ?1 AND rid = ?2")?;
                for (rid, list) in &owned {
                    for token in list.chunks_exact(std::mem::size_of::<crate::Token>()) {
                        tokens += remove.execute(params![token, rid])? as u64;
                    }
                }
            }
            tx.prepare_cached("UPDATE resources SET tokens = x'' WHERE patient = ?1")?.execute(params![patient])?;
            let objects: Vec<String> = {
                let mut stmt = tx.prepare_cached("DELETE FROM files WHERE patient = ?1 RETURNING object")?;
                let rows = stmt.query_map(params![patient], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let resources: u64 = tx.prepare_cached("SELECT count(*) FROM resources WHERE patient = ?1")?.query_row(params![patient], |r| r.get(0))?;
            let versions: u64 = tx.prepare_cached("SELECT count(*) FROM versions WHERE patient = ?1")?.query_row(params![patient], |r| r.get(0))?;
            tx.commit()?;
            Ok(crate::ErasedPatient { seq, resources, versions, tokens, key_destroyed, objects })
        })?;
        // The destroyed key's pages are overwritten in the database (secure_delete) but may
        // still sit in the WAL: copy the WAL back and truncate it now, if no reader holds it
        // (else the next idle truncation does).
        let _ = self.with_admin(|c| Ok(c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?));
        Ok(erased)
    }

    async fn insert_erasure_request(&self, r: &crate::ErasureRequestRow) -> Result<(), StoreError> {
        let r = r.clone();
        self.write(move |c| {
            let n = c
                .prepare_cached("INSERT OR IGNORE INTO erasure_requests (id, patient, sealed, requested_at, state) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![r.id, r.patient, r.sealed, r.requested_at, r.state])?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("erasure request {} exists", r.id)));
            }
            Ok(())
        })
        .await
    }

    async fn erasure_requests(&self) -> Result<Vec<crate::ErasureRequestRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT id, patient, sealed, requested_at, state, decided_by, decided_at FROM erasure_requests ORDER BY requested_at DESC, id")?;
            let rows = stmt.query_map([], |r| {
                Ok(crate::ErasureRequestRow { id: r.get(0)?, patient: r.get(1)?, sealed: r.get(2)?, requested_at: r.get(3)?, state: r.get(4)?, decided_by: r.get(5)?, decided_at: r.get(6)? })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn decide_erasure_request(&self, id: &str, state: &str, by: &str, at: i64) -> Result<bool, StoreError> {
        let (id, state, by) = (id.to_string(), state.to_string(), by.to_string());
        self.write(move |c| {
            Ok(c.prepare_cached("UPDATE erasure_requests SET state = ?2, decided_by = ?3, decided_at = ?4 WHERE id = ?1 AND state = 'pending'")?
                .execute(params![id, state, by, at])?
                > 0)
        })
        .await
    }

    async fn reopen_erasure_request(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |c| {
            Ok(c.prepare_cached("UPDATE erasure_requests SET state = 'pending', decided_by = NULL, decided_at = NULL WHERE id = ?1 AND state = 'approved'")?
                .execute(params![id])?
                > 0)
        })
        .await
    }

    async fn resources_of(&self, patient: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT type, id FROM resources WHERE patient = ?1 AND deleted = 0 ORDER BY type, id")?;
            let rows = stmt.query_map(params![patient], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn erasures(&self, after: u64) -> Result<Vec<crate::ErasureRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT seq, patient, erased_at FROM erasures WHERE seq > ?1 ORDER BY seq")?;
            let rows = stmt.query_map(params![after], |r| Ok(crate::ErasureRow { seq: r.get(0)?, patient: r.get(1)?, erased_at: r.get(2)? }))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn patient_footprint(&self, patient: &str) -> Result<(u64, Option<i64>), StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached("SELECT count(*), max(last_updated) FROM resources WHERE patient = ?1")?.query_row(params![patient], |r| Ok((r.get(0)?, r.get(1)?)))?))
    }

    async fn keys_not_under(&self, provider: &str, kek_id: &str, kek_version: u32, limit: usize) -> Result<Vec<(String, WrappedKey)>, StoreError> {
        self.with_reader(|c| {
            let sql = format!("SELECT {WRAPPED_COLUMNS}, name FROM data_keys WHERE NOT (provider = ?1 AND kek_id = ?2 AND kek_version = ?3) ORDER BY name LIMIT ?4");
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![provider, kek_id, kek_version, limit as i64], |r| Ok((r.get(4)?, row_to_wrapped(r)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn rewrap_keys(&self, changes: &[(String, WrappedKey, WrappedKey)], now: i64) -> Result<usize, StoreError> {
        self.with_admin(|c| {
            let tx = c.unchecked_transaction()?;
            let mut replaced = 0;
            {
                let mut stmt = tx.prepare_cached(
                    "UPDATE data_keys SET provider = ?2, kek_id = ?3, kek_version = ?4, wrapped = ?5, wrapped_at = ?6 \
                     WHERE name = ?1 AND provider = ?7 AND kek_id = ?8 AND kek_version = ?9 AND wrapped = ?10",
                )?;
                for (name, old, new) in changes {
                    replaced += stmt.execute(params![name, new.provider, new.kek_id, new.kek_version, new.ciphertext, now, old.provider, old.kek_id, old.kek_version, old.ciphertext])?;
                }
            }
            tx.commit()?;
            Ok(replaced)
        })
    }

    async fn patient_versions(&self, patient: &str) -> Result<Vec<(i64, StoredVersion)>, StoreError> {
        self.with_reader(|c| {
            let sql = format!("SELECT v.vid, {VERSION_COLUMNS} FROM versions v JOIN resources r ON r.rid = v.rid WHERE v.patient = ?1 AND NOT v.deleted ORDER BY v.vid");
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![patient], |r| Ok((r.get(0)?, row_to_version_at(r, 1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn replace_patient_key(&self, patient: &str, old: &WrappedKey, new: &WrappedKey, bodies: &[(i64, Vec<u8>)], file_keys: &[(String, Vec<u8>)], now: i64) -> Result<(), StoreError> {
        self.with_admin(|c| {
            let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
            let replaced = tx
                .prepare_cached(
                    "UPDATE data_keys SET provider = ?2, kek_id = ?3, kek_version = ?4, wrapped = ?5, created = ?6, wrapped_at = ?6 \
                     WHERE name = 'patient:' || ?1 AND provider = ?7 AND kek_id = ?8 AND kek_version = ?9 AND wrapped = ?10",
                )?
                .execute(params![patient, new.provider, new.kek_id, new.kek_version, new.ciphertext, now, old.provider, old.kek_id, old.kek_version, old.ciphertext])?;
            if replaced != 1 {
                return Err(StoreError::KeyChanged(format!("the data key of patient {patient}")));
            }
            let stored: usize = tx.prepare_cached("SELECT count(*) FROM versions WHERE patient = ?1 AND NOT deleted")?.query_row(params![patient], |r| r.get(0))?;
            let mut updated = 0;
            {
                let mut put = tx.prepare_cached("UPDATE versions SET body = ?2 WHERE vid = ?1 AND patient = ?3 AND NOT deleted")?;
                for (vid, body) in bodies {
                    updated += put.execute(params![vid, body, patient])?;
                }
            }
            if updated != bodies.len() || stored != bodies.len() {
                return Err(StoreError::Conflict(format!("patient {patient} has {stored} versions, {} were re-sealed: written meanwhile", bodies.len())));
            }
            let files: usize = tx.prepare_cached("SELECT count(*) FROM files WHERE patient = ?1")?.query_row(params![patient], |r| r.get(0))?;
            let mut resealed = 0;
            {
                let mut put = tx.prepare_cached("UPDATE files SET sealed_key = ?2 WHERE object = ?1 AND patient = ?3")?;
                for (object, key) in file_keys {
                    resealed += put.execute(params![object, key, patient])?;
                }
            }
            if resealed != file_keys.len() || files != file_keys.len() {
                return Err(StoreError::Conflict(format!("patient {patient} has {files} files, {} keys were re-sealed: written meanwhile", file_keys.len())));
            }
            tx.commit()?;
            Ok(())
        })
    }

    async fn put_file(&self, f: &crate::FileRow, sealed_with: &[u8]) -> Result<(), StoreError> {
        let (f, sealed_with) = (f.clone(), sealed_with.to_vec());
        self.write(move |c| {
            check_sealed_with(c, &f.patient, &sealed_with)?;
            let n = c
                .prepare_cached(&format!("INSERT OR IGNORE INTO files ({FILE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"))?
                .execute(params![f.binary_id, f.object, f.patient, f.sealed_key, f.size, &f.sha256[..], f.scan, f.created])?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("Binary/{} has its file already", f.binary_id)));
            }
            Ok(())
        })
        .await
    }

    async fn file(&self, binary_id: &str) -> Result<Option<crate::FileRow>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM files WHERE binary_id = ?1"))?.query_row(params![binary_id], row_to_file).optional()?))
    }

    async fn patient_files(&self, patient: &str) -> Result<Vec<crate::FileRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM files WHERE patient = ?1 ORDER BY object"))?;
            let rows = stmt.query_map(params![patient], row_to_file)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn set_file_scan(&self, object: &str, scan: &str) -> Result<bool, StoreError> {
        let (object, scan) = (object.to_string(), scan.to_string());
        self.write(move |c| Ok(c.prepare_cached("UPDATE files SET scan = ?2 WHERE object = ?1")?.execute(params![object, scan])? > 0)).await
    }

    async fn files_to_scan(&self, limit: usize) -> Result<Vec<crate::FileRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM files WHERE scan = 'pending' ORDER BY created LIMIT ?1"))?;
            let rows = stmt.query_map(params![limit as i64], row_to_file)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn delete_file(&self, object: &str) -> Result<bool, StoreError> {
        let object = object.to_string();
        self.write(move |c| Ok(c.prepare_cached("DELETE FROM files WHERE object = ?1")?.execute(params![object])? > 0)).await
    }

    async fn put_upload(&self, u: &crate::UploadRow) -> Result<(), StoreError> {
        let u = u.clone();
        self.write(move |c| {
            c.prepare_cached(&format!("INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"))?
                .execute(params![u.id, u.binary_id, u.object, u.patient, u.agent, u.sealed_key, u.content_type, u.length, u.received, u.parts, u.created, u.expires])?;
            Ok(())
        })
        .await
    }

    async fn upload(&self, id: &str) -> Result<Option<crate::UploadRow>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached(&format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1"))?.query_row(params![id], row_to_upload).optional()?))
    }

    async fn advance_upload(&self, id: &str, from: u64, received: u64, parts: u32) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |c| Ok(c.prepare_cached("UPDATE uploads SET received = ?3, parts = ?4 WHERE id = ?1 AND received = ?2")?.execute(params![id, from, received, parts])? > 0)).await
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |c| Ok(c.prepare_cached("DELETE FROM uploads WHERE id = ?1")?.execute(params![id])? > 0)).await
    }

    async fn expired_uploads(&self, now: i64, limit: usize) -> Result<Vec<crate::UploadRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE expires < ?1 ORDER BY expires LIMIT ?2"))?;
            let rows = stmt.query_map(params![now, limit as i64], row_to_upload)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn detection(&self) -> Result<Option<crate::DetectionRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT next, state_at, state FROM detection WHERE id = 1")?;
            Ok(stmt.query_row([], |r| Ok(crate::DetectionRow { next: r.get(0)?, state_at: r.get(1)?, state: r.get(2)? })).optional()?)
        })
    }

    async fn save_detection(&self, from: Option<u64>, progress: &crate::DetectionRow, alerts: &[crate::AlertRow]) -> Result<bool, StoreError> {
        let (p, alerts) = (progress.clone(), alerts.to_vec());
        self.write(move |c| {
            let moved = match from {
                None => c.prepare_cached("INSERT OR IGNORE INTO detection (id, next, state_at, state) VALUES (1, ?1, ?2, ?3)")?.execute(params![p.next, p.state_at, p.state])?,
                Some(f) => c.prepare_cached("UPDATE detection SET next = ?1, state_at = ?2, state = ?3 WHERE id = 1 AND next = ?4")?.execute(params![p.next, p.state_at, p.state, f])?,
            };
            if moved == 0 {
                return Ok(false);
            }
            for a in &alerts {
                c.prepare_cached("INSERT OR IGNORE INTO alerts (id, time, rule, severity, sealed) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![a.id, a.time, a.rule, a.severity, a.sealed])?;
            }
            Ok(true)
        })
        .await
    }

    async fn alerts(&self, before: Option<(i64, &str)>, limit: usize) -> Result<Vec<crate::AlertRow>, StoreError> {
        let (time, id) = before.map_or((i64::MAX, String::new()), |(t, i)| (t, i.to_string()));
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT id, time, rule, severity, sealed FROM alerts WHERE time < ?1 OR (time = ?1 AND id < ?2) ORDER BY time DESC, id DESC LIMIT ?3")?;
            let rows = stmt.query_map(params![time, id, limit as i64], row_to_alert)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn alert(&self, id: &str) -> Result<Option<crate::AlertRow>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached("SELECT id, time, rule, severity, sealed FROM alerts WHERE id = ?1")?.query_row(params![id], row_to_alert).optional()?))
    }

    async fn put_ticket(&self, t: &crate::TicketRow) -> Result<(), StoreError> {
        let t = t.clone();
        self.write(move |c| {
            c.prepare_cached(&format!("INSERT INTO file_tickets ({TICKET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"))?
                .execute(params![&t.hash[..], t.id, t.binary_id, t.version, t.agent, t.purpose, t.expires, t.uses, t.used, t.revoked, t.created, t.mac])?;
            Ok(())
        })
        .await
    }

    async fn use_ticket(&self, hash: &[u8; 32], now: i64) -> Result<Option<(crate::TicketRow, bool)>, StoreError> {
        let hash = *hash;
        self.write(move |c| {
            let spent = c
                .prepare_cached(&format!("UPDATE file_tickets SET used = used + 1 WHERE hash = ?1 AND NOT revoked AND used < uses AND expires > ?2 RETURNING {TICKET_COLUMNS}"))?
                .query_row(params![&hash[..], now], row_to_ticket)
                .optional()?;
            if let Some(t) = spent {
                return Ok(Some((t, true)));
            }
            let refused = c.prepare_cached(&format!("SELECT {TICKET_COLUMNS} FROM file_tickets WHERE hash = ?1"))?.query_row(params![&hash[..]], row_to_ticket).optional()?;
            Ok(refused.map(|t| (t, false)))
        })
        .await
    }

    async fn revoke_ticket(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        let hash = *hash;
        self.write(move |c| Ok(c.prepare_cached("UPDATE file_tickets SET revoked = 1 WHERE hash = ?1 AND NOT revoked")?.execute(params![&hash[..]])? > 0)).await
    }

    async fn revoke_tickets(&self, binary_id: &str, agent: &str) -> Result<usize, StoreError> {
        let (binary_id, agent) = (binary_id.to_string(), agent.to_string());
        self.write(move |c| Ok(c.prepare_cached("UPDATE file_tickets SET revoked = 1 WHERE binary_id = ?1 AND agent = ?2 AND NOT revoked")?.execute(params![binary_id, agent])?)).await
    }

    async fn delete_tickets_before(&self, before: i64) -> Result<usize, StoreError> {
        self.write(move |c| Ok(c.prepare_cached("DELETE FROM file_tickets WHERE expires < ?1")?.execute(params![before])?)).await
    }

    async fn key_census(&self) -> Result<Vec<crate::KeyCensus>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT provider, kek_id, kek_version, count(*), min(coalesce(wrapped_at, created)) FROM data_keys GROUP BY provider, kek_id, kek_version ORDER BY provider, kek_id, kek_version",
            )?;
            let rows = stmt.query_map([], |r| Ok(crate::KeyCensus { provider: r.get(0)?, kek_id: r.get(1)?, kek_version: r.get(2)?, keys: r.get(3)?, oldest_wrap: r.get(4)? }))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn key_created(&self, name: &str) -> Result<Option<i64>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached("SELECT created FROM data_keys WHERE name = ?1")?.query_row(params![name], |r| r.get(0)).optional()?))
    }

    async fn locate(&self, resource_type: &str, id: &str) -> Result<Option<Located>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached("SELECT id, version, patient, deleted, last_updated FROM resources WHERE type = ?1 AND id = ?2")?
                .query_row(params![resource_type, id], |r| {
                    Ok(Located { id: r.get(0)?, version: r.get(1)?, patient: r.get(2)?, deleted: r.get(3)?, last_updated: r.get(4)? })
                })
                .optional()?)
        })
    }

    async fn read_current(&self, resource_type: &str, id: &str) -> Result<Option<StoredVersion>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {CURRENT_COLUMNS} FROM {CURRENT_FROM}"))?;
            current_checked(stmt.query_row(params![resource_type, id], row_to_current).optional()?)
        })
    }

    async fn read_version(&self, resource_type: &str, id: &str, version: u64) -> Result<Option<StoredVersion>, StoreError> {
        self.with_reader(|c| {
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = ?1 AND r.id = ?2 AND v.version = ?3"
            );
            Ok(c.prepare_cached(&sql)?.query_row(params![resource_type, id, version], row_to_version).optional()?)
        })
    }

    async fn read_many(&self, resource_type: &str, ids: &[String]) -> Result<Vec<StoredVersion>, StoreError> {
        self.with_snapshot(|c| read_many_in(c, resource_type, ids))
    }

    async fn history(&self, resource_type: &str, id: Option<&str>, offset: usize, count: usize)
        -> Result<(Vec<StoredVersion>, usize), StoreError> {
        self.with_snapshot(|c| {
            let (where_, args): (&str, Vec<&dyn rusqlite::ToSql>) = match &id {
                Some(id) => ("r.type = ?1 AND r.id = ?2", vec![&resource_type, id]),
                None => ("r.type = ?1", vec![&resource_type]),
            };
            let total: usize = c
                .prepare_cached(&format!("SELECT count(*) FROM resources r JOIN versions v ON v.rid = r.rid WHERE {where_}"))?
                .query_row(params_from_iter(args.iter()), |r| r.get(0))?;
            let sql = format!(
                "SELECT {VERSION_COLUMNS} FROM resources r JOIN versions v ON v.rid = r.rid WHERE {where_} \
                 ORDER BY v.last_updated DESC, v.version DESC LIMIT {count} OFFSET {offset}"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params_from_iter(args.iter()), row_to_version)?.collect::<Result<Vec<_>, _>>()?;
            Ok((rows, total))
        })
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.submit(Work::Writes(writes)).await.map(|_| ())
    }

    async fn append_audit(&self, rows: Vec<crate::AuditRow>) -> Result<u64, StoreError> {
        self.submit(Work::Audit(rows)).await
    }

    async fn audit_entries(&self, from: u64, to: u64) -> Result<Vec<(u64, crate::AuditRow)>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT idx, leaf_hash, sealed, patient_token, query_sealed FROM audit_entries WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
            let rows = stmt.query_map(params![from, to], row_to_audit)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    async fn audit_entries_for(&self, patient_token: &crate::Token, range: std::ops::Range<u64>, limit: usize, newest_first: bool)
        -> Result<Vec<(u64, crate::AuditRow)>, StoreError> {
        // The entries the writer has not added to the by-patient table yet are added first; an
        // entry is read only when its own token matches (a pair added in the database by hand
        // does not show a patient someone else's entry).
        self.index_waiting_by_patient().await?;
        let sql = if newest_first {
            "SELECT e.idx, e.leaf_hash, e.sealed, e.patient_token, e.query_sealed FROM audit_by_patient p JOIN audit_entries e ON e.idx = p.idx \
             WHERE p.patient_token = ?1 AND p.idx >= ?2 AND p.idx < ?3 AND e.patient_token = p.patient_token ORDER BY p.idx DESC LIMIT ?4"
        } else {
            "SELECT e.idx, e.leaf_hash, e.sealed, e.patient_token, e.query_sealed FROM audit_by_patient p JOIN audit_entries e ON e.idx = p.idx \
             WHERE p.patient_token = ?1 AND p.idx >= ?2 AND p.idx < ?3 AND e.patient_token = p.patient_token ORDER BY p.idx LIMIT ?4"
        };
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (from, to, limit) = (int(range.start), int(range.end), int(limit as u64));
        self.with_reader(|c| {
            let rows = c.prepare_cached(sql)?.query_map(params![&patient_token[..], from, to, limit], row_to_audit)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    async fn patient_entries_unfound(&self, limit: usize) -> Result<Vec<u64>, StoreError> {
        self.index_waiting_by_patient().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(|c| {
            let sql = "SELECT e.idx FROM audit_entries e WHERE e.patient_token IS NOT NULL \
                       AND NOT EXISTS (SELECT 1 FROM audit_by_patient p WHERE p.patient_token = e.patient_token AND p.idx = e.idx) ORDER BY e.idx LIMIT ?1";
            let rows = c.prepare(sql)?.query_map(params![limit], |r| r.get(0))?.collect::<Result<Vec<u64>, _>>()?;
            Ok(rows)
        })
    }

    async fn audit_leaves(&self, from: u64, to: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT idx, leaf_hash FROM audit_entries WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
            let rows = stmt
                .query_map(params![from, to], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, Vec<u8>>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .enumerate()
                .map(|(i, (idx, h))| {
                    if idx != from + i as u64 {
                        return Err(StoreError::Integrity(format!("audit entry {} is missing", from + i as u64)));
                    }
                    <[u8; 32]>::try_from(h.as_slice()).map_err(|_| StoreError::Integrity(format!("audit leaf hash {idx} is not 32 bytes")))
                })
                .collect()
        })
    }

    async fn put_audit_tiles(&self, tiles: Vec<crate::AuditTile>) -> Result<(), StoreError> {
        if tiles.is_empty() {
            return Ok(());
        }
        self.write(move |c| {
            let mut put = c.prepare_cached("INSERT OR REPLACE INTO audit_tiles (level, idx, hashes) VALUES (?1, ?2, ?3)")?;
            for t in &tiles {
                put.execute(params![t.level, t.index, t.hashes.concat()])?;
            }
            Ok(())
        })
        .await
    }

    async fn audit_tiles(&self, keys: &[(u8, u64)]) -> Result<Vec<crate::AuditTile>, StoreError> {
        self.with_snapshot(|c| {
            let mut get = c.prepare_cached("SELECT hashes FROM audit_tiles WHERE level = ?1 AND idx = ?2")?;
            let mut out = Vec::with_capacity(keys.len());
            for &(level, index) in keys {
                // A blob cut short (only by tampering) yields its whole hashes; callers compare
                // tiles with what they need and report the difference.
                let hashes = get
                    .query_row(params![level, index], |r| {
                        Ok(r.get_ref(0)?.as_blob()?.chunks_exact(32).map(|h| <[u8; 32]>::try_from(h).unwrap_or([0; 32])).collect::<Vec<_>>())
                    })
                    .optional()?;
                if let Some(hashes) = hashes {
                    out.push(crate::AuditTile { level, index, hashes });
                }
            }
            Ok(out)
        })
    }

    async fn save_checkpoint(&self, cp: &crate::StoredCheckpoint) -> Result<(), StoreError> {
        let cp = cp.clone();
        self.write(move |c| {
            c.prepare_cached("INSERT INTO audit_checkpoints (size, root, note) VALUES (?1, ?2, ?3)")?.execute(params![cp.size, &cp.root[..], cp.note])?;
            Ok(())
        })
        .await
    }

    async fn latest_checkpoint(&self) -> Result<Option<crate::StoredCheckpoint>, StoreError> {
        Ok(self.query_checkpoints("ORDER BY size DESC LIMIT 1", params![])?.pop())
    }

    async fn checkpoint_at(&self, size: u64) -> Result<Option<crate::StoredCheckpoint>, StoreError> {
        Ok(self.query_checkpoints("WHERE size = ?1", params![size])?.pop())
    }

    async fn checkpoints(&self) -> Result<Vec<crate::StoredCheckpoint>, StoreError> {
        self.query_checkpoints("ORDER BY size", params![])
    }

    async fn audit_size(&self) -> Result<u64, StoreError> {
        // The next leaf index, read off the primary key in O(log n); a deleted row shows up as a
        // gap when the entries are read, rather than shrinking the log.
        self.with_reader(|c| Ok(c.prepare_cached("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries")?.query_row([], |r| r.get(0))?))
    }

    async fn search(&self, filter: &Filter) -> Result<Vec<Located>, StoreError> {
        self.with_reader(|c| search_in(c, filter))
    }

    async fn search_and_read(&self, filter: &Filter, page: &(dyn for<'c> Fn(&'c [Located]) -> Vec<String> + Sync))
        -> Result<(Vec<Located>, Vec<StoredVersion>), StoreError> {
        self.with_snapshot(|c| {
            let (candidates, rids) = search_rows_in(c, filter)?;
            let read = read_listed_in(c, &filter.resource_type, &candidates, &rids, &page(&candidates))?;
            Ok((candidates, read))
        })
    }

    async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        let k = k.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO api_keys (id, name, role, hash, created, revoked, mac, scopes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![k.id, k.name, k.role, &k.hash[..], k.created, k.revoked, k.mac, k.scopes],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    StoreError::Conflict(format!("an API key named '{}' already exists", k.name))
                }
                other => other.into(),
            })?;
            Ok(())
        })
        .await
    }

    async fn find_api_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached("SELECT id, name, role, hash, created, revoked, mac, scopes FROM api_keys WHERE hash = ?1")?
                .query_row(params![&hash[..]], row_to_api_key)
                .optional()?)
        })
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT id, name, role, hash, created, revoked, mac, scopes FROM api_keys ORDER BY created, name")?;
            let rows = stmt.query_map([], row_to_api_key)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    async fn revoke_api_key(&self, id: &str, revoked: i64, mac: &[u8]) -> Result<bool, StoreError> {
        let (id, mac) = (id.to_string(), mac.to_vec());
        self.write(move |c| {
            let n = c.execute("UPDATE api_keys SET revoked = ?1, mac = ?2 WHERE id = ?3 AND revoked IS NULL", params![revoked, mac, id])?;
            Ok(n > 0)
        })
        .await
    }

    async fn put_case(&self, k: &crate::CaseRow) -> Result<(), StoreError> {
        let k = k.clone();
        self.write(move |c| {
            let n = if k.version == 1 {
                c.execute("INSERT OR IGNORE INTO cases (kind, id, version, sealed) VALUES (?1, ?2, ?3, ?4)", params![k.kind, k.id, k.version, k.sealed])?
            } else {
                c.execute("UPDATE cases SET version = ?1, sealed = ?2 WHERE kind = ?3 AND id = ?4 AND version = ?5", params![k.version, k.sealed, k.kind, k.id, k.version - 1])?
            };
            if n == 1 {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!("{} {} was changed concurrently", k.kind, k.id)))
            }
        })
        .await
    }

    async fn case(&self, kind: &str, id: &str) -> Result<Option<crate::CaseRow>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached("SELECT kind, id, version, sealed FROM cases WHERE kind = ?1 AND id = ?2")?.query_row(params![kind, id], row_to_case).optional()?))
    }

    async fn cases(&self, kind: &str) -> Result<Vec<crate::CaseRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT kind, id, version, sealed FROM cases WHERE kind = ?1 ORDER BY id")?;
            let rows = stmt.query_map(params![kind], row_to_case)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    async fn put_grant(&self, g: &GrantRow) -> Result<(), StoreError> {
        let g = g.clone();
        self.write(move |c| {
            let n = if g.version == 1 {
                c.execute("INSERT OR IGNORE INTO grants (id, version, sealed) VALUES (?1, ?2, ?3)", params![g.id, g.version, g.sealed])?
            } else {
                c.execute("UPDATE grants SET version = ?1, sealed = ?2 WHERE id = ?3 AND version = ?4", params![g.version, g.sealed, g.id, g.version - 1])?
            };
            if n == 1 {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!("grant {} was changed concurrently", g.id)))
            }
        })
        .await
    }

    async fn grants(&self) -> Result<Vec<GrantRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT id, version, sealed FROM grants ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok(GrantRow { id: r.get(0)?, version: r.get(1)?, sealed: r.get(2)? }))?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    async fn insert_user(&self, u: &UserRow) -> Result<(), StoreError> {
        let u = u.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO users (id, username_token, version, sealed, enrollment_hash) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![u.id, &u.username_token[..], u.version, u.sealed, u.enrollment_hash.as_ref().map(|h| &h[..])],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    StoreError::Conflict("a user with that name exists already".into())
                }
                other => other.into(),
            })?;
            Ok(())
        })
        .await
    }

    async fn update_user(&self, u: &UserRow) -> Result<(), StoreError> {
        let u = u.clone();
        self.write(move |c| {
            let n = c.execute(
                "UPDATE users SET version = ?1, sealed = ?2, enrollment_hash = ?3 WHERE id = ?4 AND version = ?5",
                params![u.version, u.sealed, u.enrollment_hash.as_ref().map(|h| &h[..]), u.id, u.version.saturating_sub(1)],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(StoreError::Conflict(format!("user {} was changed concurrently", u.id)))
            }
        })
        .await
    }

    async fn user(&self, id: &str) -> Result<Option<UserRow>, StoreError> {
        self.with_reader(|c| Ok(c.prepare_cached(&format!("{USER_COLUMNS} WHERE id = ?1"))?.query_row(params![id], row_to_user).optional()?))
    }

    async fn user_by_name(&self, token: &crate::Token) -> Result<Option<UserRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(&format!("{USER_COLUMNS} WHERE username_token = ?1"))?.query_row(params![&token[..]], row_to_user).optional()?)
        })
    }

    async fn user_by_enrollment(&self, hash: &[u8; 32]) -> Result<Option<UserRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached(&format!("{USER_COLUMNS} WHERE enrollment_hash = ?1"))?.query_row(params![&hash[..]], row_to_user).optional()?)
        })
    }

    async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached(&format!("{USER_COLUMNS} ORDER BY id"))?;
            let rows = stmt.query_map([], row_to_user)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    async fn insert_session(&self, s: &SessionRow) -> Result<(), StoreError> {
        let s = s.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO sessions (token_hash, user_id, created, last_seen, mac) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&s.token_hash[..], s.user_id, s.created, s.last_seen, s.mac],
            )?;
            Ok(())
        })
        .await
    }

    async fn session(&self, token_hash: &[u8; 32]) -> Result<Option<SessionRow>, StoreError> {
        self.with_reader(|c| {
            Ok(c.prepare_cached("SELECT token_hash, user_id, created, last_seen, mac FROM sessions WHERE token_hash = ?1")?
                .query_row(params![&token_hash[..]], |r| {
                    Ok(SessionRow {
                        token_hash: <[u8; 32]>::try_from(r.get_ref(0)?.as_blob()?).unwrap_or([0; 32]),
                        user_id: r.get(1)?,
                        created: r.get(2)?,
                        last_seen: r.get(3)?,
                        mac: r.get(4)?,
                    })
                })
                .optional()?)
        })
    }

    async fn touch_session(&self, token_hash: &[u8; 32], last_seen: i64) -> Result<(), StoreError> {
        let token_hash = *token_hash;
        self.write(move |c| {
            c.prepare_cached("UPDATE sessions SET last_seen = max(last_seen, ?1) WHERE token_hash = ?2")?.execute(params![last_seen, &token_hash[..]])?;
            Ok(())
        })
        .await
    }

    async fn delete_session(&self, token_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let token_hash = *token_hash;
        self.write(move |c| Ok(c.execute("DELETE FROM sessions WHERE token_hash = ?1", params![&token_hash[..]])? > 0)).await
    }

    async fn delete_sessions_before(&self, created_before: i64) -> Result<usize, StoreError> {
        self.write(move |c| Ok(c.execute("DELETE FROM sessions WHERE created < ?1", params![created_before])?)).await
    }

    async fn delete_sessions_of(&self, user_id: &str) -> Result<usize, StoreError> {
        let user_id = user_id.to_string();
        self.write(move |c| Ok(c.execute("DELETE FROM sessions WHERE user_id = ?1", params![user_id])?)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.refusing.load(Ordering::Acquire) {
            return Err(StoreError::Backend(NO_HEADROOM.into()));
        }
        self.with_reader(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn snapshot(&self, out: tokio::sync::mpsc::Sender<Vec<crate::dump::Row>>) -> Result<(), StoreError> {
        self.snapshot_rows(out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One SQLite file with its WAL and shared-memory files, removed.
    fn remove_sqlite_file(file: &std::path::Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
    }

    /// Runs a check every backend must pass (`crate::testkit`) on a fresh database.
    async fn run_kit<F: std::future::Future<Output = ()>>(kit: impl FnOnce(std::sync::Arc<dyn Store>) -> F) {
        let path = temp_db();
        kit(std::sync::Arc::new(SqliteStore::open(&path).expect("open"))).await;
        remove_files(&path);
    }

    fn temp_db() -> std::path::PathBuf {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("random");
        std::env::temp_dir().join(format!("valv-store-test-{}.db", u64::from_le_bytes(r)))
    }

    #[tokio::test]
    async fn no_key_is_ever_made_again_for_an_erased_patient() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        let key = |n: u8| WrappedKey { provider: "file".into(), kek_id: "k".into(), kek_version: 1, ciphertext: vec![n; 61] };
        store.put_key_if_absent("patient:p1", &key(1), 1).await.expect("put");
        let erased = store.erase_patient("p1", 2).await.expect("erase");
        assert_eq!((erased.seq, erased.key_destroyed), (1, true));
        assert_eq!(store.get_key("patient:p1").await.expect("get"), None, "destroyed");
        // Whoever asks (a process that has not heard of the erasure), the store refuses.
        assert!(matches!(store.put_key_if_absent("patient:p1", &key(2), 3).await, Err(StoreError::Gone(_))));
        assert_eq!(store.get_key("patient:p1").await.expect("get"), None);
        assert!(matches!(store.erase_patient("p1", 4).await, Err(StoreError::Conflict(_))), "once");
        store.put_key_if_absent("patient:p2", &key(3), 5).await.expect("others are not touched");
        assert_eq!(store.erasures(0).await.expect("erasures").len(), 1);
        assert!(store.erasures(1).await.expect("erasures").is_empty(), "only newer ones");
        drop(store);
        remove_files(&path);
    }

    /// The layout before the audit log had its own file: every table in the one file, with two
    /// entries, a checkpoint and a tile.
    fn old_layout(path: &Path) {
        let c = Connection::open(path).expect("open");
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            c.execute_batch(sql).expect("migration");
            c.pragma_update(None, "user_version", i + 1).expect("version");
        }
        c.execute_batch(
            "INSERT INTO audit_entries (idx, leaf_hash, sealed, patient_token) VALUES (0, zeroblob(32), x'01', x'03030303030303030303030303030303'), (1, zeroblob(32), x'02', NULL);
             INSERT INTO audit_checkpoints (size, root, note) VALUES (2, zeroblob(32), 'note');
             INSERT INTO audit_tiles (level, idx, hashes) VALUES (0, 0, zeroblob(64));",
        )
        .expect("entries");
    }

    #[tokio::test]
    async fn two_processes_starting_together_move_the_log_once() {
        let path = temp_db();
        old_layout(&path);
        let opened: Vec<_> = (0..2).map(|_| std::thread::spawn({ let p = path.clone(); move || SqliteStore::open(&p).map(|_| ()) })).collect();
        for o in opened {
            o.join().expect("thread").expect("both open");
        }
        let store = SqliteStore::open(&path).expect("open");
        assert_eq!(store.audit_entries(0, 10).await.expect("entries").len(), 2);
        drop(store);
        remove_files(&path);
    }

    #[tokio::test]
    async fn an_audit_log_kept_in_the_database_file_is_moved_to_its_own_once() {
        let path = temp_db();
        old_layout(&path);
        // A move interrupted after a partial copy into the audit file.
        Connection::open(audit_path(&path)).expect("open").execute_batch("CREATE TABLE audit_entries (idx INTEGER PRIMARY KEY, leaf_hash BLOB, sealed BLOB); INSERT INTO audit_entries VALUES (7, x'', x'');").expect("partial");
        let store = SqliteStore::open(&path).expect("open");
        let rows = store.audit_entries(0, 10).await.expect("entries");
        assert_eq!(rows.iter().map(|(i, r)| (*i, r.sealed.clone())).collect::<Vec<_>>(), [(0, vec![1]), (1, vec![2])], "copied whole, the partial copy replaced");
        assert_eq!(store.audit_entries_for(&[3; 16], 0..u64::MAX, 10, false).await.expect("by patient").len(), 1, "the patient index made again");
        assert_eq!(store.latest_checkpoint().await.expect("checkpoint").map(|c| c.size), Some(2));
        assert_eq!(store.audit_tiles(&[(0, 0)]).await.expect("tiles").len(), 1);
        assert_eq!(store.append_audit(vec![crate::AuditRow { leaf_hash: [1; 32], sealed: vec![3], patient_token: None, query_sealed: None }]).await.expect("append"), 2);
        let left: i64 = Connection::open(&path).expect("open").query_row("SELECT count(*) FROM sqlite_master WHERE name LIKE 'audit%'", [], |r| r.get(0)).expect("count");
        assert_eq!(left, 0, "the database file keeps no audit table");
        drop(store);
        assert_eq!(SqliteStore::open(&path).expect("again").audit_size().await.expect("size"), 3, "moved once");
        // The audit file lost (only the database file copied): refused, not started on an empty log.
        remove_sqlite_file(&audit_path(&path));
        let refused = SqliteStore::open(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("the audit log is missing") && refused.contains("-audit.db"), "{refused}");
        remove_files(&path);
    }

    #[tokio::test]
    async fn audit_tiles_grow_and_are_read_by_key() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        let tile = |level: u8, index: u64, n: u8| crate::AuditTile { level, index, hashes: (0..n).map(|i| [i; 32]).collect() };
        store.put_audit_tiles(vec![tile(0, 0, 3), tile(1, 0, 1)]).await.expect("put");
        store.put_audit_tiles(vec![]).await.expect("nothing to put");
        // A partial tile is replaced by its longer self.
        store.put_audit_tiles(vec![tile(0, 0, 255)]).await.expect("grow");
        let got = store.audit_tiles(&[(1, 0), (0, 7), (0, 0)]).await.expect("read");
        assert_eq!(got, vec![tile(1, 0, 1), tile(0, 0, 255)], "absent tiles are left out, the order is the one asked");
        drop(store);
        // Reopening runs no migration twice.
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.audit_tiles(&[(0, 0)]).await.expect("read")[0].hashes.len(), 255);
        remove_files(&path);
    }

    use crate::testkit::version;

    #[tokio::test]
    async fn users_update_only_from_the_version_read_and_sessions_end() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        let u = UserRow { id: "u1".into(), username_token: [1; 16], version: 1, sealed: vec![1], enrollment_hash: Some([9; 32]) };
        store.insert_user(&u).await.expect("insert");
        let same_name = UserRow { id: "u2".into(), ..u.clone() };
        assert!(matches!(store.insert_user(&same_name).await, Err(StoreError::Conflict(_))), "user names are unique");
        assert_eq!(store.user_by_enrollment(&[9; 32]).await.expect("read").map(|r| r.id), Some("u1".into()));
        let v2 = UserRow { version: 2, sealed: vec![2], enrollment_hash: None, ..u.clone() };
        store.update_user(&v2).await.expect("update from version 1");
        assert!(matches!(store.update_user(&v2).await, Err(StoreError::Conflict(_))), "a second writer that read version 1 loses");
        assert_eq!(store.user_by_name(&[1; 16]).await.expect("read"), Some(v2));
        assert_eq!(store.user_by_enrollment(&[9; 32]).await.expect("read"), None);

        let s = SessionRow { token_hash: [3; 32], user_id: "u1".into(), created: 10, last_seen: 10, mac: vec![7] };
        store.insert_session(&s).await.expect("session");
        store.insert_session(&SessionRow { token_hash: [4; 32], ..s.clone() }).await.expect("session");
        store.touch_session(&[3; 32], 50).await.expect("touch");
        store.touch_session(&[3; 32], 40).await.expect("touch");
        assert_eq!(store.session(&[3; 32]).await.expect("read").map(|r| r.last_seen), Some(50), "activity never moves back");
        assert!(store.delete_session(&[3; 32]).await.expect("delete"));
        assert!(!store.delete_session(&[3; 32]).await.expect("delete"));
        assert_eq!(store.delete_sessions_of("u1").await.expect("delete all"), 1);
        assert_eq!(store.session(&[4; 32]).await.expect("read"), None);
        drop(store);
        remove_files(&path);
    }

    #[tokio::test]
    async fn version_checks_and_atomic_groups() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        store.commit(vec![Write { expect: Expect::Absent, version: version("a", 1), tokens: vec![[1; 16]], sealed_with: None, unless: None }]).await.expect("create");
        // A second create of the same id, and an update from a stale version, conflict (409).
        let dup = store.commit(vec![Write { expect: Expect::Absent, version: version("a", 1), tokens: vec![], sealed_with: None, unless: None }]).await;
        assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
        store.commit(vec![Write { expect: Expect::Version(1), version: version("a", 2), tokens: vec![[2; 16]], sealed_with: None, unless: None }]).await.expect("update");
        let stale = store.commit(vec![Write { expect: Expect::Version(1), version: version("a", 2), tokens: vec![], sealed_with: None, unless: None }]).await;
        assert!(matches!(stale, Err(StoreError::Conflict(_))), "{stale:?}");
        // A request whose second write fails leaves its first write undone.
        let mixed = store
            .commit(vec![
                Write { expect: Expect::Absent, version: version("b", 1), tokens: vec![], sealed_with: None, unless: None },
                Write { expect: Expect::Version(7), version: version("a", 8), tokens: vec![], sealed_with: None, unless: None },
            ])
            .await;
        assert!(mixed.is_err());
        assert!(store.locate("Patient", "b").await.expect("locate").is_none(), "nothing of a failed request stays");
        // Tokens follow the current version only.
        let hits = store.search(&Filter { resource_type: "Patient".into(), token_groups: vec![vec![[2; 16]]], ..Filter::default() }).await.expect("search");
        assert_eq!(hits.len(), 1);
        let old = store.search(&Filter { resource_type: "Patient".into(), token_groups: vec![vec![[1; 16]]], ..Filter::default() }).await.expect("search");
        assert!(old.is_empty());
        let (hist, total) = store.history("Patient", Some("a"), 0, 10).await.expect("history");
        assert_eq!(total, 2);
        assert_eq!(hist[0].version, 2, "newest first");
        drop(store);
        remove_files(&path);
    }

    #[tokio::test]
    async fn tokens_are_indexed_for_committed_writes_only_and_follow_updates_within_a_request() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        let w = |id: &str, expect, v, token: u8| Write { expect, version: version(id, v), tokens: vec![[token; 16]], sealed_with: None, unless: None };
        let hits = |token: u8| Filter { resource_type: "Patient".into(), token_groups: vec![vec![[token; 16]]], ..Filter::default() };
        store.commit(vec![w("a", Expect::Absent, 1, 1)]).await.expect("create a");
        // A failed request's tokens are not indexed: not even under the rowid its rolled-back
        // create had, which the next create takes.
        let failed = store.commit(vec![w("d", Expect::Absent, 1, 7), w("a", Expect::Absent, 1, 8)]).await;
        assert!(matches!(failed, Err(StoreError::Conflict(_))), "{failed:?}");
        store.commit(vec![w("e", Expect::Absent, 1, 9)]).await.expect("create e");
        assert!(store.search(&hits(7)).await.expect("search").is_empty(), "a token of a failed request");
        assert_eq!(store.search(&hits(9)).await.expect("search").len(), 1);
        // Created and updated in one request: only the second version's token stays.
        store.commit(vec![w("c", Expect::Absent, 1, 5), w("c", Expect::Version(1), 2, 6)]).await.expect("create and update c");
        assert!(store.search(&hits(5)).await.expect("search").is_empty(), "the replaced version's token");
        let found = store.search(&hits(6)).await.expect("search");
        assert_eq!(found.iter().map(|l| (l.id.as_str(), l.version)).collect::<Vec<_>>(), [("c", 2)]);
        drop(store);
        remove_files(&path);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conditional_create_commits_only_while_nothing_matches() {
        run_kit(crate::testkit::concurrent_conditional_creates_make_one).await;
    }

    #[tokio::test]
    async fn uploads_advance_only_from_where_they_are() {
        run_kit(crate::testkit::uploads_advance_only_from_where_they_are).await;
    }

    #[tokio::test]
    async fn detection_progress_and_alerts() {
        run_kit(crate::testkit::detection_saves_alerts_with_its_progress_once).await;
    }

    #[tokio::test]
    async fn cases_change_by_version() {
        run_kit(crate::testkit::cases_change_by_version_only).await;
    }

    #[tokio::test]
    async fn a_patients_entries_page_by_page() {
        run_kit(crate::testkit::a_patients_entries_come_page_by_page).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tickets_are_spent_atomically() {
        run_kit(crate::testkit::tickets_are_spent_atomically).await;
    }

    #[tokio::test]
    async fn files_are_recorded_resealed_and_erased() {
        run_kit(crate::testkit::files_are_recorded_resealed_and_erased).await;
    }

    /// Audit appends per second from 64 concurrent tasks for `secs`, in bursts of `burst` s
    /// separated by `pause` s of idleness (so the idle writer truncates the WAL in between).
    async fn appends_per_second(reserve: bool, secs: f64, burst: f64, pause: f64) -> f64 {
        let path = temp_db();
        let reserve = reserve.then(|| Reserve::beside(&path, 32 << 20));
        let store = std::sync::Arc::new(SqliteStore::open_with_reserve(&path, Access::Serve, reserve.clone()).expect("open"));
        let (mut done, mut busy) = (0u64, 0f64);
        while busy < secs {
            let until = Instant::now() + Duration::from_secs_f64(burst);
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let s = store.clone();
                    tokio::spawn(async move {
                        let mut n = 0u64;
                        while Instant::now() < until {
                            let row = crate::AuditRow { leaf_hash: [7; 32], sealed: vec![9; 600], patient_token: Some([3; 16]), query_sealed: None };
                            s.append_audit(vec![row]).await.expect("append");
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            for t in tasks {
                done += t.await.expect("task");
            }
            busy += burst;
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        drop(store);
        remove_files(&path);
        let _ = std::fs::remove_file(format!("{}.reserve", path.display()));
        done as f64 / busy
    }

    /// Under unbroken writes the checkpointer never reaches the end of the WAL; the writer must
    /// start it over past WAL_RESTART_ABOVE, or the file grows with everything written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_short_under_unbroken_writes() {
        let path = temp_db();
        let store = std::sync::Arc::new(SqliteStore::open(&path).expect("open"));
        let wal = wal_path(&path);
        let watcher = {
            let wal = wal.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                for _ in 0..160 {
                    peak = peak.max(file_len(&wal));
                    std::thread::sleep(Duration::from_millis(25));
                }
                peak
            })
        };
        // 64 writers, 4 KiB entries, for 3 s: hundreds of MiB through the WAL, never a pause.
        let until = Instant::now() + Duration::from_secs(3);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let row = crate::AuditRow { leaf_hash: [7; 32], sealed: vec![9; 4096], patient_token: None, query_sealed: None };
                        s.append_audit(vec![row]).await.expect("append");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        let written = store.audit_size().await.expect("size") * 4096;
        let peak = watcher.join().expect("watcher");
        drop(store);
        remove_files(&path);
        assert!(written > 8 * JOURNAL_SIZE_LIMIT as u64, "enough was written to tell: {} MiB", written >> 20);
        // The restart is looked at every GROWTH_CHECK, so the WAL overshoots by what that long
        // writes (~12 MiB here) beyond the size SQLite truncates it back to.
        assert!(peak <= 4 * JOURNAL_SIZE_LIMIT as u64, "the WAL peaked at {} MiB of {} MiB written", peak >> 20, written >> 20);
    }

    /// `cargo test -p valv-store --release -- --ignored --nocapture write_throughput`: what the
    /// headroom checks (per group: page count, file size, statvfs) and the idle truncation cost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a check"]
    async fn write_throughput() {
        for round in 0..3 {
            let plain = appends_per_second(false, 6.0, 6.0, 0.0).await;
            let headroom = appends_per_second(true, 6.0, 6.0, 0.0).await;
            // Bursts of 1 s with 1.5 s idle: every burst starts on a WAL truncated to nothing.
            let bursts = appends_per_second(true, 6.0, 1.0, 1.5).await;
            println!("round {round}: sustained, no reserve {plain:.0}/s; sustained, with reserve {headroom:.0}/s; 1 s bursts after idle truncation {bursts:.0}/s");
        }
    }

    /// Twelve entries, patient A on even indices, B on odd ones, none on every third.
    fn patient_rows() -> Vec<crate::AuditRow> {
        (0..12u8)
            .map(|i| crate::AuditRow { leaf_hash: [i; 32], sealed: vec![i; 4], patient_token: (i % 3 != 2).then_some([if i % 2 == 0 { 0xA } else { 0xB }; 16]), query_sealed: None })
            .collect()
    }

    fn by_patient_upto(path: &std::path::Path) -> Option<u64> {
        let c = Connection::open(audit_path(path)).expect("open");
        c.query_row("SELECT upto FROM audit_by_patient_upto WHERE id = 1", [], |r| r.get(0)).optional().expect("upto")
    }

    #[tokio::test]
    async fn a_patients_entries_are_indexed_after_the_commit_and_read_whole() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        store.append_audit(patient_rows()).await.expect("append");
        assert_eq!(by_patient_upto(&path).unwrap_or(0), 0, "the group commit adds no by-patient pairs");
        let a = store.audit_entries_for(&[0xA; 16], 0..u64::MAX, 100, false).await.expect("read");
        assert_eq!(a.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 4, 6, 10], "what waited is added before the read");
        assert_eq!(by_patient_upto(&path), Some(12));
        // A pair added by hand does not show A an entry of B's.
        Connection::open(audit_path(&path)).expect("open").execute("INSERT INTO audit_by_patient (patient_token, idx) VALUES (?1, 1)", params![&[0xA_u8; 16][..]]).expect("forge");
        let a = store.audit_entries_for(&[0xA; 16], 0..u64::MAX, 100, false).await.expect("read");
        assert_eq!(a.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 4, 6, 10], "B's entry 1 stays B's");
        // A pair removed is what `valv audit verify` reports.
        assert_eq!(store.patient_entries_unfound(10).await.expect("check"), Vec::<u64>::new());
        Connection::open(audit_path(&path)).expect("open").execute("DELETE FROM audit_by_patient WHERE idx = 4", []).expect("hide");
        assert_eq!(store.patient_entries_unfound(10).await.expect("check"), vec![4]);
        drop(store);
        remove_files(&path);
    }

    #[tokio::test]
    async fn a_log_with_the_old_by_patient_index_is_converted_at_start() {
        let path = temp_db();
        let store = SqliteStore::open(&path).expect("open");
        store.append_audit(patient_rows()).await.expect("append");
        drop(store);
        Connection::open(audit_path(&path))
            .expect("open")
            .execute_batch("DROP TABLE audit_by_patient; DROP TABLE audit_by_patient_upto; CREATE INDEX audit_entries_patient ON audit_entries (patient_token) WHERE patient_token IS NOT NULL;")
            .expect("old layout");
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(by_patient_upto(&path), Some(12), "filled at start");
        let old: i64 = Connection::open(audit_path(&path)).expect("open").query_row("SELECT count(*) FROM sqlite_master WHERE name = 'audit_entries_patient'", [], |r| r.get(0)).expect("count");
        assert_eq!(old, 0, "the old index is dropped");
        let b = store.audit_entries_for(&[0xB; 16], 0..u64::MAX, 100, true).await.expect("read");
        assert_eq!(b.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![9, 7, 3, 1]);
        drop(store);
        remove_files(&path);
    }

    /// The writes a server makes all the time go through the writer thread: with the admin
    /// connection held elsewhere they still finish (on that connection they waited for the
    /// writer's lock in SQLite's busy handler, asleep on a runtime thread).
    #[test]
    fn background_writes_never_wait_for_the_admin_connection() {
        let path = temp_db();
        let store = std::sync::Arc::new(SqliteStore::open(&path).expect("open"));
        let held = store.admin.lock().expect("admin");
        let (done, finished) = std::sync::mpsc::channel();
        let s = store.clone();
        let writes = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(async {
                let progress = crate::DetectionRow { next: 3, state_at: 3, state: vec![1] };
                let alert = crate::AlertRow { id: "2-r".into(), time: 1, rule: "r".into(), severity: "high".into(), sealed: vec![2] };
                assert!(s.save_detection(None, &progress, &[alert]).await.expect("detection"));
                s.put_audit_tiles(vec![crate::AuditTile { level: 0, index: 0, hashes: vec![[7; 32]] }]).await.expect("tiles");
                s.save_checkpoint(&crate::StoredCheckpoint { size: 1, root: [7; 32], note: "n".into() }).await.expect("checkpoint");
                s.put_case(&crate::CaseRow { kind: "siem".into(), id: "cursor".into(), version: 1, sealed: vec![3] }).await.expect("case");
                s.touch_session(&[9; 32], 5).await.expect("session");
            });
            let _ = done.send(());
        });
        let outcome = finished.recv_timeout(Duration::from_secs(10));
        drop(held);
        writes.join().expect("writes");
        assert!(outcome.is_ok(), "a background write waited for the admin connection");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(async {
            assert_eq!(store.detection().await.expect("read").map(|d| d.next), Some(3));
            assert_eq!(store.latest_checkpoint().await.expect("read").map(|c| c.size), Some(1));
            assert_eq!(store.case("siem", "cursor").await.expect("read").map(|c| c.sealed), Some(vec![3]));
        });
        drop(store);
        remove_files(&path);
    }

    #[tokio::test]
    async fn concurrent_requests_share_group_commits_and_keep_their_own_outcomes() {
        let path = temp_db();
        let store = std::sync::Arc::new(SqliteStore::open(&path).expect("open"));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = store.clone();
            // Every fourth request conflicts with an id taken by another.
            let id = if i % 4 == 0 { "shared".to_string() } else { format!("p{i}") };
            tasks.push(tokio::spawn(async move { s.commit(vec![Write { expect: Expect::Absent, version: version(&id, 1), tokens: vec![], sealed_with: None, unless: None }]).await.is_ok() }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.expect("task"));
        }
        assert_eq!(ok, 48 + 1, "every distinct id once, the shared id once");
        drop(store);
        remove_files(&path);
    }
}
