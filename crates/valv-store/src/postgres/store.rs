//! [`Store`] on PostgreSQL: each call one pooled connection and, where it writes more than one
//! row, one transaction. Concurrency that SQLite gets from its single writer is made explicit
//! here: rows a write depends on are locked (`FOR UPDATE`, `FOR SHARE`), and an erasure and the
//! creation of that patient's key take turns on an advisory lock.

use super::pool::Conn;
use super::{int, is_unique_violation, pg, uint, PgStore, CONDITION_LOCK_SPACE, ERASURE_LOCK_SPACE, ERASURE_SEQ_LOCK};
use crate::{
    ApiKeyRecord, AuditRow, AuditTile, ErasedPatient, ErasureRequestRow, ErasureRow, Expect, FileRow, Filter, TicketRow, UploadRow, GrantRow, KeyCensus, Located, Order, SessionRow, Store, StoreError, StoredCheckpoint,
    StoredVersion, Token, UserRow, WrappedKey, Write,
};
use async_trait::async_trait;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

const WRAPPED_COLUMNS: &str = "provider, kek_id, kek_version, wrapped";
const VERSION_COLUMNS: &str = "r.type, r.id, v.version, v.deleted, v.patient, v.last_updated, v.body";
/// The current version is the newest stored version, and the resource's pointer must agree with
/// it (see the SQLite backend: a pointer set back by someone writing the database is caught).
const CURRENT: &str = "SELECT r.type, r.id, v.version, v.deleted, v.patient, v.last_updated, v.body, r.version \
    FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = $1 AND r.id = $2 ORDER BY v.version DESC LIMIT 1";
const USER_COLUMNS: &str = "SELECT id, username_token, version, sealed, enrollment_hash FROM users";
const API_KEY_COLUMNS: &str = "SELECT id, name, role, hash, created, revoked, mac, scopes FROM api_keys";
const AUDIT_COLUMNS: &str = "SELECT idx, leaf_hash, sealed, patient_token, query_sealed FROM audit_entries";
const TOKEN: usize = std::mem::size_of::<Token>();

/// KEK versions are `INTEGER` columns.
pub(super) fn kek_version(version: u32) -> Result<i32, StoreError> {
    i32::try_from(version).map_err(|_| StoreError::Backend(format!("KEK version {version} is out of range")))
}

fn wrapped_at(r: &Row, at: usize) -> Result<WrappedKey, StoreError> {
    let version: i32 = r.get(at + 2);
    Ok(WrappedKey { provider: r.get(at), kek_id: r.get(at + 1), kek_version: u32::try_from(version).map_err(|_| StoreError::Integrity(format!("KEK version {version}")))?, ciphertext: r.get(at + 3) })
}

/// A fixed-length value; a stored value of the wrong length (only by tampering) reads as zeros,
/// which nothing hashes or blinds to, so verification reports it instead of the read failing.
fn fixed<const N: usize>(v: &[u8]) -> [u8; N] {
    <[u8; N]>::try_from(v).unwrap_or([0; N])
}

fn version_at(r: &Row, at: usize) -> Result<StoredVersion, StoreError> {
    Ok(StoredVersion {
        resource_type: r.get(at),
        id: r.get(at + 1),
        version: uint(r.get(at + 2))?,
        deleted: r.get(at + 3),
        patient: r.get(at + 4),
        last_updated: r.get(at + 5),
        body: r.get(at + 6),
    })
}

fn current_checked(row: Option<Row>) -> Result<Option<StoredVersion>, StoreError> {
    current_checked_at(row, 0)
}

/// [`current_checked`] for a row whose version columns start at column `at`.
pub(super) fn current_checked_at(row: Option<Row>, at: usize) -> Result<Option<StoredVersion>, StoreError> {
    let Some(r) = row else { return Ok(None) };
    let v = version_at(&r, at)?;
    let pointer: i64 = r.get(at + 7);
    if uint(pointer)? != v.version {
        return Err(StoreError::Integrity(format!(
            "{}/{}: the current-version pointer ({pointer}) disagrees with the newest stored version ({}): altered outside Valv",
            v.resource_type, v.id, v.version
        )));
    }
    Ok(Some(v))
}

fn located(r: &Row) -> Result<Located, StoreError> {
    Ok(Located { id: r.get(0), version: uint(r.get(1))?, patient: r.get(2), deleted: r.get(3), last_updated: r.get(4) })
}

fn user(r: &Row) -> Result<UserRow, StoreError> {
    let token: Vec<u8> = r.get(1);
    let enrollment: Option<Vec<u8>> = r.get(4);
    Ok(UserRow { id: r.get(0), username_token: fixed(&token), version: uint(r.get(2))?, sealed: r.get(3), enrollment_hash: enrollment.and_then(|h| <[u8; 32]>::try_from(h).ok()) })
}

fn api_key(r: &Row) -> ApiKeyRecord {
    let hash: Vec<u8> = r.get(3);
    ApiKeyRecord { id: r.get(0), name: r.get(1), role: r.get(2), hash: fixed(&hash), created: r.get(4), revoked: r.get(5), mac: r.get(6), scopes: r.get(7) }
}

pub(super) fn audit_row(r: &Row) -> Result<(u64, AuditRow), StoreError> {
    let leaf: Vec<u8> = r.get(1);
    let token: Option<Vec<u8>> = r.get(3);
    let row = AuditRow { leaf_hash: fixed(&leaf), sealed: r.get(2), patient_token: token.and_then(|t| Token::try_from(t).ok()), query_sealed: r.get(4) };
    Ok((uint(r.get(0))?, row))
}

fn checkpoint(r: &Row) -> Result<StoredCheckpoint, StoreError> {
    let root: Vec<u8> = r.get(1);
    let root = <[u8; 32]>::try_from(root).map_err(|_| StoreError::Integrity("a checkpoint root is not 32 bytes".into()))?;
    Ok(StoredCheckpoint { size: uint(r.get(0))?, root, note: r.get(2) })
}

fn session(r: &Row) -> SessionRow {
    let hash: Vec<u8> = r.get(0);
    SessionRow { token_hash: fixed(&hash), user_id: r.get(1), created: r.get(2), last_seen: r.get(3), mac: r.get(4) }
}

/// Applies one request's writes inside the caller's transaction.
async fn apply_writes(c: &mut Conn, writes: &[Write]) -> Result<(), StoreError> {
    for w in writes {
        let v = &w.version;
        if let (Some(sealed_with), Some(patient)) = (&w.sealed_with, &v.patient) {
            // FOR SHARE: a rotation or erasure of the key waits for this commit, and then sees
            // the version written here.
            let same = c
                .query_opt("SELECT 1 FROM data_keys WHERE name = 'patient:' || $1 AND wrapped = $2 FOR SHARE", &[patient, &&sealed_with[..]])
                .await
                .map_err(pg("checking a data key"))?;
            if same.is_none() {
                return Err(StoreError::KeyChanged(format!("the data key of patient {patient}")));
            }
        }
        let (version, tokens) = (int(v.version)?, w.tokens.concat());
        let current = c
            .query_opt("SELECT rid, version FROM resources WHERE type = $1 AND id = $2 FOR UPDATE", &[&v.resource_type, &v.id])
            .await
            .map_err(pg("reading a resource"))?;
        let rid: i64 = match (w.expect, current) {
            (Expect::Absent, None) => {
                if let Some(unless) = &w.unless {
                    check_unmatched(c, unless).await?;
                }
                let inserted = c
                    .query_one(
                        "INSERT INTO resources (type, id, version, deleted, patient, last_updated, tokens) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING rid",
                        &[&v.resource_type, &v.id, &version, &v.deleted, &v.patient, &v.last_updated, &tokens],
                    )
                    .await;
                match inserted {
                    Ok(row) => row.get(0),
                    Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict(format!("{}/{} already exists", v.resource_type, v.id))),
                    Err(e) => return Err(pg("creating a resource")(e)),
                }
            }
            (Expect::Absent, Some(_)) => return Err(StoreError::Conflict(format!("{}/{} already exists", v.resource_type, v.id))),
            (Expect::Version(want), Some(row)) => {
                let (rid, have): (i64, i64) = (row.get(0), row.get(1));
                if uint(have)? != want {
                    return Err(StoreError::Conflict(format!("{}/{} is at version {have}, not {want}", v.resource_type, v.id)));
                }
                c.execute(
                    "UPDATE resources SET version = $1, deleted = $2, patient = $3, last_updated = $4, tokens = $5 WHERE rid = $6",
                    &[&version, &v.deleted, &v.patient, &v.last_updated, &tokens, &rid],
                )
                .await
                .map_err(pg("updating a resource"))?;
                rid
            }
            (Expect::Version(_), None) => return Err(StoreError::NotFound(format!("{}/{}", v.resource_type, v.id))),
        };
        c.execute(
            "INSERT INTO versions (rid, version, deleted, patient, last_updated, body) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&rid, &version, &v.deleted, &v.patient, &v.last_updated, &v.body],
        )
        .await
        .map_err(pg("storing a version"))?;
    }
    Ok(())
}

/// Writes that only create, in one statement of its own transaction (`valv_create`, schema
/// migration 2): a create and an imported bundle cost one round trip.
pub(super) async fn create_all(c: &mut Conn, writes: &[&Write]) -> Result<(), StoreError> {
    let mut keys: Vec<(String, &[u8])> = Vec::new();
    let (mut types, mut ids, mut versions, mut deleted, mut patients, mut updated, mut tokens, mut bodies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for w in writes {
        let v = &w.version;
        if let (Some(sealed_with), Some(patient)) = (&w.sealed_with, &v.patient) {
            let name = format!("patient:{patient}");
            // Each distinct pair is checked: two bodies of one patient sealed under different
            // wrappings cannot both be current.
            if !keys.iter().any(|(k, with)| *k == name && *with == &sealed_with[..]) {
                keys.push((name, &sealed_with[..]));
            }
        }
        types.push(v.resource_type.as_str());
        ids.push(v.id.as_str());
        versions.push(int(v.version)?);
        deleted.push(v.deleted);
        patients.push(v.patient.as_deref());
        updated.push(v.last_updated);
        tokens.push(w.tokens.concat());
        bodies.push(&v.body[..]);
    }
    let (key_names, key_wrapped): (Vec<&str>, Vec<&[u8]>) = keys.iter().map(|(n, w)| (n.as_str(), *w)).unzip();
    let done = c
        .execute(
            "SELECT valv_create($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[&key_names, &key_wrapped, &types, &ids, &versions, &deleted, &patients, &updated, &tokens, &bodies],
        )
        .await;
    match done {
        Ok(_) => Ok(()),
        Err(e) => {
            let raised = e.as_db_error().map(|d| (d.code().code().to_string(), d.message().to_string()));
            match raised {
                Some((code, what)) if code == "VALV1" => Err(StoreError::Conflict(format!("{what} already exists"))),
                Some((code, what)) if code == "VALV2" => Err(StoreError::KeyChanged(format!("the data key of patient {}", what.trim_start_matches("patient:")))),
                _ => Err(pg("creating resources")(e)),
            }
        }
    }
}

async fn erase_in(c: &mut Conn, patient: &str, erased_at: i64) -> Result<ErasedPatient, StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&ERASURE_LOCK_SPACE, &patient]).await.map_err(pg("waiting for the patient's key"))?;
    if c.query_opt("SELECT 1 FROM erasures WHERE patient = $1", &[&patient]).await.map_err(pg("reading erasures"))?.is_some() {
        return Err(StoreError::Conflict(format!("patient {patient} was erased already")));
    }
    // Erasures are numbered in order across servers: they take turns until commit.
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&ERASURE_SEQ_LOCK]).await.map_err(pg("waiting for another erasure"))?;
    let seq: i64 = c.query_one("SELECT coalesce(max(seq), 0) + 1 FROM erasures", &[]).await.map_err(pg("numbering the erasure"))?.get(0);
    c.execute("INSERT INTO erasures (patient, seq, erased_at) VALUES ($1, $2, $3)", &[&patient, &seq, &erased_at]).await.map_err(pg("recording the erasure"))?;
    let key_destroyed = c.execute("DELETE FROM data_keys WHERE name = 'patient:' || $1", &[&patient]).await.map_err(pg("destroying the data key"))? > 0;
    let owned = c.query("SELECT tokens FROM resources WHERE patient = $1 FOR UPDATE", &[&patient]).await.map_err(pg("listing the patient's resources"))?;
    let removed = owned.iter().map(|r| r.get::<_, &[u8]>(0).len() / TOKEN).sum::<usize>() as u64;
    c.execute("UPDATE resources SET tokens = '\\x'::bytea WHERE patient = $1", &[&patient]).await.map_err(pg("clearing token lists"))?;
    let versions: i64 = c.query_one("SELECT count(*) FROM versions WHERE patient = $1", &[&patient]).await.map_err(pg("counting versions"))?.get(0);
    let objects = c.query("DELETE FROM files WHERE patient = $1 RETURNING object", &[&patient]).await.map_err(pg("forgetting the patient's files"))?;
    let objects = objects.iter().map(|r| r.get(0)).collect();
    Ok(ErasedPatient { seq: uint(seq)?, resources: owned.len() as u64, versions: uint(versions)?, tokens: removed, key_destroyed, objects })
}

async fn replace_key_in(c: &mut Conn, patient: &str, old: &WrappedKey, new: &WrappedKey, bodies: &[(i64, Vec<u8>)], file_keys: &[(String, Vec<u8>)], now: i64) -> Result<(), StoreError> {
    let replaced = c
        .execute(
            "UPDATE data_keys SET provider = $2, kek_id = $3, kek_version = $4, wrapped = $5, created = $6, wrapped_at = $6 \
             WHERE name = 'patient:' || $1 AND provider = $7 AND kek_id = $8 AND kek_version = $9 AND wrapped = $10",
            &[&patient, &new.provider, &new.kek_id, &kek_version(new.kek_version)?, &new.ciphertext, &now, &old.provider, &old.kek_id, &kek_version(old.kek_version)?, &old.ciphertext],
        )
        .await
        .map_err(pg("replacing a data key"))?;
    if replaced != 1 {
        return Err(StoreError::KeyChanged(format!("the data key of patient {patient}")));
    }
    let stored: i64 = c.query_one("SELECT count(*) FROM versions WHERE patient = $1 AND NOT deleted", &[&patient]).await.map_err(pg("counting versions"))?.get(0);
    let (vids, sealed): (Vec<i64>, Vec<&[u8]>) = bodies.iter().map(|(vid, body)| (*vid, &body[..])).unzip();
    let updated = c
        .execute(
            "UPDATE versions v SET body = u.body FROM unnest($1::bigint[], $2::bytea[]) AS u(vid, body) WHERE v.vid = u.vid AND v.patient = $3 AND NOT v.deleted",
            &[&vids, &sealed, &patient],
        )
        .await
        .map_err(pg("re-sealing versions"))?;
    if updated != bodies.len() as u64 || uint(stored)? != bodies.len() as u64 {
        return Err(StoreError::Conflict(format!("patient {patient} has {stored} versions, {} were re-sealed: written meanwhile", bodies.len())));
    }
    let files: i64 = c.query_one("SELECT count(*) FROM files WHERE patient = $1", &[&patient]).await.map_err(pg("counting files"))?.get(0);
    let (objects, keys): (Vec<&str>, Vec<&[u8]>) = file_keys.iter().map(|(o, k)| (o.as_str(), &k[..])).unzip();
    let resealed = c
        .execute(
            "UPDATE files f SET sealed_key = u.key FROM unnest($1::text[], $2::bytea[]) AS u(object, key) WHERE f.object = u.object AND f.patient = $3",
            &[&objects, &keys, &patient],
        )
        .await
        .map_err(pg("re-sealing file keys"))?;
    if resealed != file_keys.len() as u64 || uint(files)? != file_keys.len() as u64 {
        return Err(StoreError::Conflict(format!("patient {patient} has {files} files, {} keys were re-sealed: written meanwhile", file_keys.len())));
    }
    Ok(())
}

const UPLOAD_COLUMNS: &str = "id, binary_id, object, patient, agent, sealed_key, content_type, length, received, parts, created, expires";

fn row_to_upload(r: &Row) -> Result<UploadRow, StoreError> {
    Ok(UploadRow {
        id: r.get(0),
        binary_id: r.get(1),
        object: r.get(2),
        patient: r.get(3),
        agent: r.get(4),
        sealed_key: r.get(5),
        content_type: r.get(6),
        length: uint(r.get(7))?,
        received: uint(r.get(8))?,
        parts: u32::try_from(r.get::<_, i32>(9)).map_err(|_| StoreError::Integrity("a negative part count".into()))?,
        created: r.get(10),
        expires: r.get(11),
    })
}

const TICKET_COLUMNS: &str = "hash, id, binary_id, version, agent, purpose, expires, uses, used, revoked, created, mac";

fn row_to_ticket(r: &Row) -> Result<TicketRow, StoreError> {
    let hash: &[u8] = r.get(0);
    let count = |i: usize| u32::try_from(r.get::<_, i32>(i)).map_err(|_| StoreError::Integrity("a negative ticket count".into()));
    Ok(TicketRow {
        hash: hash.try_into().map_err(|_| StoreError::Integrity("a ticket hash is not 32 bytes".into()))?,
        id: r.get(1),
        binary_id: r.get(2),
        version: uint(r.get(3))?,
        agent: r.get(4),
        purpose: r.get(5),
        expires: r.get(6),
        uses: count(7)?,
        used: count(8)?,
        revoked: r.get(9),
        created: r.get(10),
        mac: r.get(11),
    })
}

pub(super) const FILE_COLUMNS: &str = "binary_id, object, patient, sealed_key, size, sha256, scan, created";

pub(super) fn row_to_file(r: &Row) -> Result<FileRow, StoreError> {
    let hash: &[u8] = r.get(5);
    Ok(FileRow {
        binary_id: r.get(0),
        object: r.get(1),
        patient: r.get(2),
        sealed_key: r.get(3),
        size: uint(r.get(4))?,
        sha256: hash.try_into().map_err(|_| StoreError::Integrity("a file's SHA-256 is not 32 bytes".into()))?,
        scan: r.get(6),
        created: r.get(7),
    })
}

pub(super) fn row_to_case(r: &Row) -> Result<crate::CaseRow, StoreError> {
    Ok(crate::CaseRow { kind: r.get(0), id: r.get(1), version: uint(r.get(2))?, sealed: r.get(3) })
}

pub(super) fn row_to_alert(r: &Row) -> crate::AlertRow {
    crate::AlertRow { id: r.get(0), time: r.get(1), rule: r.get(2), severity: r.get(3), sealed: r.get(4) }
}

/// [`Store::save_detection`] inside a transaction: a `Conflict` when the progress moved.
async fn save_detection_in(c: &mut Conn, from: Option<u64>, p: &crate::DetectionRow, alerts: &[crate::AlertRow]) -> Result<(), StoreError> {
    let (next, state_at) = (int(p.next)?, int(p.state_at)?);
    let moved = match from {
        None => c.execute("INSERT INTO detection (id, next, state_at, state) VALUES (1, $1, $2, $3) ON CONFLICT DO NOTHING", &[&next, &state_at, &p.state]).await,
        Some(f) => c.execute("UPDATE detection SET next = $1, state_at = $2, state = $3 WHERE id = 1 AND next = $4", &[&next, &state_at, &p.state, &int(f)?]).await,
    }
    .map_err(pg("saving the detection progress"))?;
    if moved == 0 {
        return Err(StoreError::Conflict("another detector moved the detection progress".into()));
    }
    for a in alerts {
        c.execute("INSERT INTO alerts (id, time, rule, severity, sealed) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING", &[&a.id, &a.time, &a.rule, &a.severity, &a.sealed])
            .await
            .map_err(pg("adding an alert"))?;
    }
    Ok(())
}

async fn put_file_in(c: &mut Conn, f: &FileRow, sealed_with: &[u8]) -> Result<(), StoreError> {
    let same = c
        .query_opt("SELECT 1 FROM data_keys WHERE name = 'patient:' || $1 AND wrapped = $2 FOR SHARE", &[&f.patient, &sealed_with])
        .await
        .map_err(pg("checking the data key"))?;
    if same.is_none() {
        return Err(StoreError::KeyChanged(format!("the data key of patient {}", f.patient)));
    }
    let n = c
        .execute(
            &format!("INSERT INTO files ({FILE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING"),
            &[&f.binary_id, &f.object, &f.patient, &f.sealed_key, &int(f.size)?, &&f.sha256[..], &f.scan, &f.created],
        )
        .await
        .map_err(pg("recording a file"))?;
    if n == 0 {
        return Err(StoreError::Conflict(format!("Binary/{} has its file already", f.binary_id)));
    }
    Ok(())
}

async fn rewrap_in(c: &mut Conn, changes: &[(String, WrappedKey, WrappedKey)], now: i64) -> Result<usize, StoreError> {
    let mut replaced = 0;
    for (name, old, new) in changes {
        replaced += c
            .execute(
                "UPDATE data_keys SET provider = $2, kek_id = $3, kek_version = $4, wrapped = $5, wrapped_at = $6 \
                 WHERE name = $1 AND provider = $7 AND kek_id = $8 AND kek_version = $9 AND wrapped = $10",
                &[name, &new.provider, &new.kek_id, &kek_version(new.kek_version)?, &new.ciphertext, &now, &old.provider, &old.kek_id, &kek_version(old.kek_version)?, &old.ciphertext],
            )
            .await
            .map_err(pg("rewrapping a key"))?;
    }
    Ok(replaced as usize)
}

async fn put_tiles_in(c: &mut Conn, tiles: &[AuditTile]) -> Result<(), StoreError> {
    for t in tiles {
        c.execute(
            // A partial tile grows; it never shrinks (an integrator that lost its lock and is
            // behind the next one must not cut a tile back).
            "INSERT INTO audit_tiles (level, idx, hashes) VALUES ($1, $2, $3) \
             ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes WHERE length(excluded.hashes) >= length(audit_tiles.hashes)",
            &[&i16::from(t.level), &int(t.index)?, &t.hashes.concat()],
        )
        .await
        .map_err(pg("storing audit tiles"))?;
    }
    Ok(())
}

async fn put_key_in(c: &mut Conn, name: &str, key: &WrappedKey, now: i64) -> Result<WrappedKey, StoreError> {
    if let Some(patient) = name.strip_prefix("patient:") {
        c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&ERASURE_LOCK_SPACE, &patient]).await.map_err(pg("waiting for the patient's key"))?;
    }
    // Never a key for an erased patient, checked in the same statement as the insert.
    c.execute(
        "INSERT INTO data_keys (name, provider, kek_id, kek_version, wrapped, created, wrapped_at) \
         SELECT $1, $2, $3, $4, $5, $6, $6 WHERE NOT EXISTS (SELECT 1 FROM erasures WHERE 'patient:' || patient = $1) ON CONFLICT (name) DO NOTHING",
        &[&name, &key.provider, &key.kek_id, &kek_version(key.kek_version)?, &key.ciphertext, &now],
    )
    .await
    .map_err(pg("storing a key"))?;
    let row = c.query_opt(&format!("SELECT {WRAPPED_COLUMNS} FROM data_keys WHERE name = $1"), &[&name]).await.map_err(pg("reading a key"))?;
    match row {
        Some(r) => wrapped_at(&r, 0),
        None => Err(StoreError::Gone(format!("no key is made for {name}: the patient's data was erased"))),
    }
}

/// Fails a conditional create if a current resource matches its condition. The transaction
/// first takes an advisory lock on the condition (held to its end), so conditional creates of
/// the same condition run one after another on every server, and this check — a new snapshot
/// under READ COMMITTED — sees what the one before committed.
async fn check_unmatched(c: &mut Conn, filter: &Filter) -> Result<(), StoreError> {
    let mut key = filter.resource_type.clone();
    for group in &filter.token_groups {
        key.push('&');
        let mut hex: Vec<String> = group.iter().map(|t| t.iter().map(|b| format!("{b:02x}")).collect()).collect();
        hex.sort();
        key.push_str(&hex.join("|"));
    }
    for id in filter.ids.iter().flatten() {
        key.push_str("&id=");
        key.push_str(id);
    }
    c.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&CONDITION_LOCK_SPACE, &key]).await.map_err(pg("waiting for a conditional create"))?;
    let (sql, args) = search_sql(&Filter { limit: Some(1), ..filter.clone() });
    let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
    match c.query_opt(&sql, &params).await.map_err(pg("checking a condition"))? {
        Some(row) => Err(StoreError::Matched(format!("{}/{}", filter.resource_type, row.get::<_, String>(0)))),
        None => Ok(()),
    }
}

pub(super) type Param = Box<dyn ToSql + Sync + Send>;

/// The search's SQL and its parameters.
pub(super) fn search_sql(filter: &Filter) -> (String, Vec<Param>) {
    let mut sql = String::from("SELECT r.id, r.version, r.patient, r.deleted, r.last_updated FROM resources r WHERE r.type = $1 AND NOT r.deleted");
    let mut args: Vec<Param> = vec![Box::new(filter.resource_type.clone())];
    for group in &filter.token_groups {
        args.push(Box::new(group.iter().map(|t| t.to_vec()).collect::<Vec<Vec<u8>>>()));
        // The expression of the GIN index resources_tokens (schema migration 3), verbatim.
        sql.push_str(&format!(" AND valv_tokens(r.tokens) && ${}::bytea[]", args.len()));
    }
    if let Some(ids) = &filter.ids {
        args.push(Box::new(ids.clone()));
        sql.push_str(&format!(" AND r.id = ANY(${})", args.len()));
    }
    for ranges in &filter.last_updated {
        let mut parts = Vec::new();
        for (from, to) in ranges {
            args.push(Box::new(*from));
            args.push(Box::new(*to));
            parts.push(format!("(r.last_updated >= ${} AND r.last_updated < ${})", args.len() - 1, args.len()));
        }
        sql.push_str(&format!(" AND ({})", parts.join(" OR ")));
    }
    sql.push_str(match filter.order {
        Order::Created => " ORDER BY r.rid",
        Order::LastUpdatedAsc => " ORDER BY r.last_updated, r.rid",
        Order::LastUpdatedDesc => " ORDER BY r.last_updated DESC, r.rid DESC",
    });
    if let Some(limit) = filter.limit {
        args.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
        sql.push_str(&format!(" LIMIT ${}", args.len()));
    }
    (sql, args)
}

impl PgStore {
    async fn checkpoints_where(&self, tail: &str, args: &[&(dyn ToSql + Sync)]) -> Result<Vec<StoredCheckpoint>, StoreError> {
        let rows = self.pool.get().await?.query(&format!("SELECT size, root, note FROM audit_checkpoints {tail}"), args).await.map_err(pg("reading checkpoints"))?;
        rows.iter().map(checkpoint).collect()
    }
}

#[async_trait]
impl Store for PgStore {
    async fn get_key(&self, name: &str) -> Result<Option<WrappedKey>, StoreError> {
        let row = self.pool.get().await?.query_opt(&format!("SELECT {WRAPPED_COLUMNS} FROM data_keys WHERE name = $1"), &[&name]).await.map_err(pg("reading a key"))?;
        row.map(|r| wrapped_at(&r, 0)).transpose()
    }

    async fn put_key_if_absent(&self, name: &str, key: &WrappedKey, now: i64) -> Result<WrappedKey, StoreError> {
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = put_key_in(&mut c, name, key, now).await;
        c.finish(outcome).await
    }

    async fn keys_not_under(&self, provider: &str, kek_id: &str, version: u32, limit: usize) -> Result<Vec<(String, WrappedKey)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .pool
            .get()
            .await?
            .query(
                &format!("SELECT {WRAPPED_COLUMNS}, name FROM data_keys WHERE NOT (provider = $1 AND kek_id = $2 AND kek_version = $3) ORDER BY name LIMIT $4"),
                &[&provider, &kek_id, &kek_version(version)?, &limit],
            )
            .await
            .map_err(pg("listing keys to rewrap"))?;
        rows.iter().map(|r| Ok((r.get(4), wrapped_at(r, 0)?))).collect()
    }

    async fn rewrap_keys(&self, changes: &[(String, WrappedKey, WrappedKey)], now: i64) -> Result<usize, StoreError> {
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = rewrap_in(&mut c, changes, now).await;
        c.finish(outcome).await
    }

    async fn patient_versions(&self, patient: &str) -> Result<Vec<(i64, StoredVersion)>, StoreError> {
        let sql = format!("SELECT v.vid, {VERSION_COLUMNS} FROM versions v JOIN resources r ON r.rid = v.rid WHERE v.patient = $1 AND NOT v.deleted ORDER BY v.vid");
        let rows = self.pool.get().await?.query(&sql, &[&patient]).await.map_err(pg("reading a patient's versions"))?;
        rows.iter().map(|r| Ok((r.get(0), version_at(r, 1)?))).collect()
    }

    async fn replace_patient_key(&self, patient: &str, old: &WrappedKey, new: &WrappedKey, bodies: &[(i64, Vec<u8>)], file_keys: &[(String, Vec<u8>)], now: i64) -> Result<(), StoreError> {
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = replace_key_in(&mut c, patient, old, new, bodies, file_keys, now).await;
        c.finish(outcome).await
    }

    async fn put_file(&self, file: &FileRow, sealed_with: &[u8]) -> Result<(), StoreError> {
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = put_file_in(&mut c, file, sealed_with).await;
        c.finish(outcome).await
    }

    async fn file(&self, binary_id: &str) -> Result<Option<FileRow>, StoreError> {
        let row = self.pool.get().await?.query_opt(&format!("SELECT {FILE_COLUMNS} FROM files WHERE binary_id = $1"), &[&binary_id]).await.map_err(pg("reading a file"))?;
        row.as_ref().map(row_to_file).transpose()
    }

    async fn patient_files(&self, patient: &str) -> Result<Vec<FileRow>, StoreError> {
        let rows = self.pool.get().await?.query(&format!("SELECT {FILE_COLUMNS} FROM files WHERE patient = $1 ORDER BY object"), &[&patient]).await.map_err(pg("listing files"))?;
        rows.iter().map(row_to_file).collect()
    }

    async fn set_file_scan(&self, object: &str, scan: &str) -> Result<bool, StoreError> {
        let n = self.pool.get().await?.execute("UPDATE files SET scan = $2 WHERE object = $1", &[&object, &scan]).await.map_err(pg("recording a scan"))?;
        Ok(n > 0)
    }

    async fn files_to_scan(&self, limit: usize) -> Result<Vec<FileRow>, StoreError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(&format!("SELECT {FILE_COLUMNS} FROM files WHERE scan = 'pending' ORDER BY created LIMIT $1"), &[&(limit as i64)])
            .await
            .map_err(pg("listing files to scan"))?;
        rows.iter().map(row_to_file).collect()
    }

    async fn put_upload(&self, u: &UploadRow) -> Result<(), StoreError> {
        let parts = i32::try_from(u.parts).map_err(|_| StoreError::Backend("upload parts".into()))?;
        self.pool
            .get()
            .await?
            .execute(
                &format!("INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
                &[&u.id, &u.binary_id, &u.object, &u.patient, &u.agent, &u.sealed_key, &u.content_type, &int(u.length)?, &int(u.received)?, &parts, &u.created, &u.expires],
            )
            .await
            .map_err(pg("storing an upload"))?;
        Ok(())
    }

    async fn upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        let row = self.pool.get().await?.query_opt(&format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = $1"), &[&id]).await.map_err(pg("reading an upload"))?;
        row.as_ref().map(row_to_upload).transpose()
    }

    async fn advance_upload(&self, id: &str, from: u64, received: u64, parts: u32) -> Result<bool, StoreError> {
        let parts = i32::try_from(parts).map_err(|_| StoreError::Backend("upload parts".into()))?;
        let n = self
            .pool
            .get()
            .await?
            .execute("UPDATE uploads SET received = $3, parts = $4 WHERE id = $1 AND received = $2", &[&id, &int(from)?, &int(received)?, &parts])
            .await
            .map_err(pg("recording an upload's part"))?;
        Ok(n > 0)
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.pool.get().await?.execute("DELETE FROM uploads WHERE id = $1", &[&id]).await.map_err(pg("ending an upload"))?;
        Ok(n > 0)
    }

    async fn expired_uploads(&self, now: i64, limit: usize) -> Result<Vec<UploadRow>, StoreError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(&format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE expires < $1 ORDER BY expires LIMIT $2"), &[&now, &(limit as i64)])
            .await
            .map_err(pg("listing expired uploads"))?;
        rows.iter().map(row_to_upload).collect()
    }

    async fn detection(&self) -> Result<Option<crate::DetectionRow>, StoreError> {
        let row = self.pool.get().await?.query_opt("SELECT next, state_at, state FROM detection WHERE id = 1", &[]).await.map_err(pg("reading the detection progress"))?;
        row.map(|r| Ok(crate::DetectionRow { next: uint(r.get(0))?, state_at: uint(r.get(1))?, state: r.get(2) })).transpose()
    }

    async fn save_detection(&self, from: Option<u64>, progress: &crate::DetectionRow, alerts: &[crate::AlertRow]) -> Result<bool, StoreError> {
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = save_detection_in(&mut c, from, progress, alerts).await;
        match c.finish(outcome).await {
            Err(StoreError::Conflict(_)) => Ok(false),
            other => other.map(|()| true),
        }
    }

    async fn alerts(&self, before: Option<(i64, &str)>, limit: usize) -> Result<Vec<crate::AlertRow>, StoreError> {
        let (time, id) = before.unwrap_or((i64::MAX, ""));
        let rows = self
            .pool
            .get()
            .await?
            .query("SELECT id, time, rule, severity, sealed FROM alerts WHERE (time, id) < ($1, $2) ORDER BY time DESC, id DESC LIMIT $3", &[&time, &id, &(limit as i64)])
            .await
            .map_err(pg("listing alerts"))?;
        Ok(rows.iter().map(row_to_alert).collect())
    }

    async fn alert(&self, id: &str) -> Result<Option<crate::AlertRow>, StoreError> {
        let row = self.pool.get().await?.query_opt("SELECT id, time, rule, severity, sealed FROM alerts WHERE id = $1", &[&id]).await.map_err(pg("reading an alert"))?;
        Ok(row.as_ref().map(row_to_alert))
    }

    async fn put_ticket(&self, t: &TicketRow) -> Result<(), StoreError> {
        let (uses, used) = (i32::try_from(t.uses).map_err(|_| StoreError::Backend("ticket uses".into()))?, i32::try_from(t.used).map_err(|_| StoreError::Backend("ticket uses".into()))?);
        self.pool
            .get()
            .await?
            .execute(
                &format!("INSERT INTO file_tickets ({TICKET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"),
                &[&&t.hash[..], &t.id, &t.binary_id, &int(t.version)?, &t.agent, &t.purpose, &t.expires, &uses, &used, &t.revoked, &t.created, &t.mac],
            )
            .await
            .map_err(pg("storing a ticket"))?;
        Ok(())
    }

    async fn use_ticket(&self, hash: &[u8; 32], now: i64) -> Result<Option<(TicketRow, bool)>, StoreError> {
        let mut c = self.pool.get().await?;
        let spent = c
            .query_opt(
                &format!("UPDATE file_tickets SET used = used + 1 WHERE hash = $1 AND NOT revoked AND used < uses AND expires > $2 RETURNING {TICKET_COLUMNS}"),
                &[&&hash[..], &now],
            )
            .await
            .map_err(pg("using a ticket"))?;
        if let Some(r) = spent {
            return Ok(Some((row_to_ticket(&r)?, true)));
        }
        let refused = c.query_opt(&format!("SELECT {TICKET_COLUMNS} FROM file_tickets WHERE hash = $1"), &[&&hash[..]]).await.map_err(pg("reading a ticket"))?;
        refused.as_ref().map(|r| row_to_ticket(r).map(|t| (t, false))).transpose()
    }

    async fn revoke_ticket(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        let n = self.pool.get().await?.execute("UPDATE file_tickets SET revoked = true WHERE hash = $1 AND NOT revoked", &[&&hash[..]]).await.map_err(pg("revoking a ticket"))?;
        Ok(n > 0)
    }

    async fn revoke_tickets(&self, binary_id: &str, agent: &str) -> Result<usize, StoreError> {
        let n = self
            .pool
            .get()
            .await?
            .execute("UPDATE file_tickets SET revoked = true WHERE binary_id = $1 AND agent = $2 AND NOT revoked", &[&binary_id, &agent])
            .await
            .map_err(pg("revoking tickets"))?;
        Ok(n as usize)
    }

    async fn delete_tickets_before(&self, before: i64) -> Result<usize, StoreError> {
        let n = self.pool.get().await?.execute("DELETE FROM file_tickets WHERE expires < $1", &[&before]).await.map_err(pg("deleting expired tickets"))?;
        Ok(n as usize)
    }

    async fn delete_file(&self, object: &str) -> Result<bool, StoreError> {
        let n = self.pool.get().await?.execute("DELETE FROM files WHERE object = $1", &[&object]).await.map_err(pg("forgetting a file"))?;
        Ok(n > 0)
    }

    async fn key_census(&self) -> Result<Vec<KeyCensus>, StoreError> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT provider, kek_id, kek_version, count(*), min(coalesce(wrapped_at, created)) FROM data_keys \
                 GROUP BY provider, kek_id, kek_version ORDER BY provider, kek_id, kek_version",
                &[],
            )
            .await
            .map_err(pg("counting keys"))?;
        rows.iter()
            .map(|r| {
                let version: i32 = r.get(2);
                Ok(KeyCensus {
                    provider: r.get(0),
                    kek_id: r.get(1),
                    kek_version: u32::try_from(version).map_err(|_| StoreError::Integrity(format!("KEK version {version}")))?,
                    keys: uint(r.get(3))?,
                    oldest_wrap: r.get(4),
                })
            })
            .collect()
    }

    async fn key_created(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let row = self.pool.get().await?.query_opt("SELECT created FROM data_keys WHERE name = $1", &[&name]).await.map_err(pg("reading a key"))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn erase_patient(&self, patient: &str, erased_at: i64) -> Result<ErasedPatient, StoreError> {
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = erase_in(&mut c, patient, erased_at).await;
        c.finish(outcome).await
    }

    async fn resources_of(&self, patient: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows = self.pool.get().await?.query("SELECT type, id FROM resources WHERE patient = $1 AND NOT deleted ORDER BY type, id", &[&patient]).await.map_err(pg("listing resources"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn insert_erasure_request(&self, r: &ErasureRequestRow) -> Result<(), StoreError> {
        let n = self
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO erasure_requests (id, patient, sealed, requested_at, state) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
                &[&r.id, &r.patient, &r.sealed, &r.requested_at, &r.state],
            )
            .await
            .map_err(pg("recording an erasure request"))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("erasure request {} exists", r.id)));
        }
        Ok(())
    }

    async fn erasure_requests(&self) -> Result<Vec<ErasureRequestRow>, StoreError> {
        let rows = self
            .pool
            .get()
            .await?
            .query("SELECT id, patient, sealed, requested_at, state, decided_by, decided_at FROM erasure_requests ORDER BY requested_at DESC, id", &[])
            .await
            .map_err(pg("reading erasure requests"))?;
        Ok(rows
            .iter()
            .map(|r| ErasureRequestRow { id: r.get(0), patient: r.get(1), sealed: r.get(2), requested_at: r.get(3), state: r.get(4), decided_by: r.get(5), decided_at: r.get(6) })
            .collect())
    }

    async fn decide_erasure_request(&self, id: &str, state: &str, by: &str, at: i64) -> Result<bool, StoreError> {
        let n = self
            .pool
            .get()
            .await?
            .execute("UPDATE erasure_requests SET state = $2, decided_by = $3, decided_at = $4 WHERE id = $1 AND state = 'pending'", &[&id, &state, &by, &at])
            .await
            .map_err(pg("deciding an erasure request"))?;
        Ok(n > 0)
    }

    async fn reopen_erasure_request(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .pool
            .get()
            .await?
            .execute("UPDATE erasure_requests SET state = 'pending', decided_by = NULL, decided_at = NULL WHERE id = $1 AND state = 'approved'", &[&id])
            .await
            .map_err(pg("reopening an erasure request"))?;
        Ok(n > 0)
    }

    async fn erasures(&self, after: u64) -> Result<Vec<ErasureRow>, StoreError> {
        let rows = self.pool.get().await?.query("SELECT seq, patient, erased_at FROM erasures WHERE seq > $1 ORDER BY seq", &[&int(after)?]).await.map_err(pg("reading erasures"))?;
        rows.iter().map(|r| Ok(ErasureRow { seq: uint(r.get(0))?, patient: r.get(1), erased_at: r.get(2) })).collect()
    }

    async fn patient_footprint(&self, patient: &str) -> Result<(u64, Option<i64>), StoreError> {
        let r = self.pool.get().await?.query_one("SELECT count(*), max(last_updated) FROM resources WHERE patient = $1", &[&patient]).await.map_err(pg("reading a patient's footprint"))?;
        Ok((uint(r.get(0))?, r.get(1)))
    }

    async fn locate(&self, resource_type: &str, id: &str) -> Result<Option<Located>, StoreError> {
        let row = self
            .pool
            .get()
            .await?
            .query_opt("SELECT id, version, patient, deleted, last_updated FROM resources WHERE type = $1 AND id = $2", &[&resource_type, &id])
            .await
            .map_err(pg("locating a resource"))?;
        row.as_ref().map(located).transpose()
    }

    async fn read_current(&self, resource_type: &str, id: &str) -> Result<Option<StoredVersion>, StoreError> {
        self.reads.read(resource_type, id).await
    }

    async fn read_version(&self, resource_type: &str, id: &str, version: u64) -> Result<Option<StoredVersion>, StoreError> {
        let sql = format!("SELECT {VERSION_COLUMNS} FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = $1 AND r.id = $2 AND v.version = $3");
        let row = self.pool.get().await?.query_opt(&sql, &[&resource_type, &id, &int(version)?]).await.map_err(pg("reading a version"))?;
        row.map(|r| version_at(&r, 0)).transpose()
    }

    async fn read_many(&self, resource_type: &str, ids: &[String]) -> Result<Vec<StoredVersion>, StoreError> {
        // All at once on a shared connection: the reads are pipelined, one round trip for a page
        // instead of one per resource.
        let c = self.pool.shared().await?;
        let params: Vec<[&(dyn ToSql + Sync); 2]> = ids.iter().map(|id| [&resource_type as &(dyn ToSql + Sync), id]).collect();
        let reads = params.iter().map(|p| c.query_opt(CURRENT, p));
        let found = futures_util::future::try_join_all(reads).await.map_err(pg("reading a resource"))?;
        let mut out = Vec::with_capacity(ids.len());
        for row in found {
            out.extend(current_checked(row)?);
        }
        Ok(out)
    }

    async fn history(&self, resource_type: &str, id: Option<&str>, offset: usize, count: usize) -> Result<(Vec<StoredVersion>, usize), StoreError> {
        let mut c = self.pool.get().await?;
        let (offset, count) = (int(offset as u64)?, int(count as u64)?);
        let (total, rows) = match id {
            Some(id) => {
                let total: i64 = c.query_one("SELECT count(*) FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = $1 AND r.id = $2", &[&resource_type, &id]).await.map_err(pg("counting history"))?.get(0);
                let sql = format!("SELECT {VERSION_COLUMNS} FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = $1 AND r.id = $2 ORDER BY v.last_updated DESC, v.version DESC LIMIT $3 OFFSET $4");
                (total, c.query(&sql, &[&resource_type, &id, &count, &offset]).await.map_err(pg("reading history"))?)
            }
            None => {
                let total: i64 = c.query_one("SELECT count(*) FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = $1", &[&resource_type]).await.map_err(pg("counting history"))?.get(0);
                let sql = format!("SELECT {VERSION_COLUMNS} FROM resources r JOIN versions v ON v.rid = r.rid WHERE r.type = $1 ORDER BY v.last_updated DESC, v.version DESC LIMIT $2 OFFSET $3");
                (total, c.query(&sql, &[&resource_type, &count, &offset]).await.map_err(pg("reading history"))?)
            }
        };
        let versions = rows.iter().map(|r| version_at(r, 0)).collect::<Result<Vec<_>, _>>()?;
        Ok((versions, uint(total)? as usize))
    }

    async fn version_count(&self, resource_type: &str) -> Result<usize, StoreError> {
        // Counted per resource of the type: a prepared statement's generic plan for the join
        // that `history` counts with hashes every version of every type (a cost growing with the
        // Observations, asked every second for the few CareTeams and Consents).
        let sql = "SELECT coalesce(sum((SELECT count(*) FROM versions v WHERE v.rid = r.rid)), 0)::BIGINT FROM resources r WHERE r.type = $1";
        let total: i64 = self.pool.get().await?.query_one(sql, &[&resource_type]).await.map_err(pg("counting versions"))?.get(0);
        Ok(uint(total)? as usize)
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.iter().all(|w| w.expect == Expect::Absent && w.unless.is_none()) {
            return self.creates.create(writes).await;
        }
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = apply_writes(&mut c, &writes).await;
        c.finish(outcome).await
    }

    async fn search(&self, filter: &Filter) -> Result<Vec<Located>, StoreError> {
        let (sql, args) = search_sql(filter);
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)).collect();
        let rows = self.pool.get().await?.query(&sql, &params).await.map_err(pg("searching"))?;
        rows.iter().map(located).collect()
    }

    async fn insert_api_key(&self, k: &ApiKeyRecord) -> Result<(), StoreError> {
        let done = self
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO api_keys (id, name, role, hash, created, revoked, mac, scopes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&k.id, &k.name, &k.role, &&k.hash[..], &k.created, &k.revoked, &k.mac, &k.scopes],
            )
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!("an API key named '{}' already exists", k.name))),
            Err(e) => Err(pg("storing an API key")(e)),
        }
    }

    async fn find_api_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError> {
        if let Some(record) = self.credentials.get(hash) {
            return Ok(Some(record));
        }
        let generation = self.credentials.generation();
        let row = self.pool.get().await?.query_opt(&format!("{API_KEY_COLUMNS} WHERE hash = $1"), &[&&hash[..]]).await.map_err(pg("reading an API key"))?;
        let record = row.as_ref().map(api_key);
        if let (Some(g), Some(r)) = (generation, &record) {
            self.credentials.put(g, r.clone());
        }
        Ok(record)
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows = self.pool.get().await?.query(&format!("{API_KEY_COLUMNS} ORDER BY created, name"), &[]).await.map_err(pg("listing API keys"))?;
        Ok(rows.iter().map(api_key).collect())
    }

    async fn revoke_api_key(&self, id: &str, revoked: i64, mac: &[u8]) -> Result<bool, StoreError> {
        let n = self
            .pool
            .get()
            .await?
            .execute("UPDATE api_keys SET revoked = $1, mac = $2 WHERE id = $3 AND revoked IS NULL", &[&revoked, &mac, &id])
            .await
            .map_err(pg("revoking an API key"))?;
        // The trigger tells every server; this one need not wait for its own notification.
        self.credentials.invalidate();
        Ok(n > 0)
    }

    async fn put_case(&self, k: &crate::CaseRow) -> Result<(), StoreError> {
        let mut c = self.pool.get().await?;
        let version = int(k.version)?;
        let n = if k.version == 1 {
            c.execute("INSERT INTO cases (kind, id, version, sealed) VALUES ($1, $2, $3, $4) ON CONFLICT (kind, id) DO NOTHING", &[&k.kind, &k.id, &version, &k.sealed]).await
        } else {
            c.execute("UPDATE cases SET version = $1, sealed = $2 WHERE kind = $3 AND id = $4 AND version = $5", &[&version, &k.sealed, &k.kind, &k.id, &(version - 1)]).await
        }
        .map_err(pg("storing a case"))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(format!("{} {} was changed concurrently", k.kind, k.id)))
        }
    }

    async fn case(&self, kind: &str, id: &str) -> Result<Option<crate::CaseRow>, StoreError> {
        let row = self.pool.get().await?.query_opt("SELECT kind, id, version, sealed FROM cases WHERE kind = $1 AND id = $2", &[&kind, &id]).await.map_err(pg("reading a case"))?;
        row.map(|r| row_to_case(&r)).transpose()
    }

    async fn cases(&self, kind: &str) -> Result<Vec<crate::CaseRow>, StoreError> {
        let rows = self.pool.get().await?.query("SELECT kind, id, version, sealed FROM cases WHERE kind = $1 ORDER BY id", &[&kind]).await.map_err(pg("reading cases"))?;
        rows.iter().map(row_to_case).collect()
    }

    async fn put_grant(&self, g: &GrantRow) -> Result<(), StoreError> {
        let mut c = self.pool.get().await?;
        let version = int(g.version)?;
        let n = if g.version == 1 {
            c.execute("INSERT INTO grants (id, version, sealed) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING", &[&g.id, &version, &g.sealed]).await
        } else {
            c.execute("UPDATE grants SET version = $1, sealed = $2 WHERE id = $3 AND version = $4", &[&version, &g.sealed, &g.id, &(version - 1)]).await
        }
        .map_err(pg("storing a grant"))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(format!("grant {} was changed concurrently", g.id)))
        }
    }

    async fn grants(&self) -> Result<Vec<GrantRow>, StoreError> {
        let rows = self.pool.get().await?.query("SELECT id, version, sealed FROM grants ORDER BY id", &[]).await.map_err(pg("reading grants"))?;
        rows.iter().map(|r| Ok(GrantRow { id: r.get(0), version: uint(r.get(1))?, sealed: r.get(2) })).collect()
    }

    async fn insert_user(&self, u: &UserRow) -> Result<(), StoreError> {
        let done = self
            .pool
            .get()
            .await?
            .execute(
                "INSERT INTO users (id, username_token, version, sealed, enrollment_hash) VALUES ($1, $2, $3, $4, $5)",
                &[&u.id, &&u.username_token[..], &int(u.version)?, &u.sealed, &u.enrollment_hash.as_ref().map(|h| &h[..])],
            )
            .await;
        match done {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict("a user with that name exists already".into())),
            Err(e) => Err(pg("storing a user")(e)),
        }
    }

    async fn update_user(&self, u: &UserRow) -> Result<(), StoreError> {
        let version = int(u.version)?;
        let n = self
            .pool
            .get()
            .await?
            .execute(
                "UPDATE users SET version = $1, sealed = $2, enrollment_hash = $3 WHERE id = $4 AND version = $5",
                &[&version, &u.sealed, &u.enrollment_hash.as_ref().map(|h| &h[..]), &u.id, &(version - 1)],
            )
            .await
            .map_err(pg("updating a user"))?;
        if n == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(format!("user {} was changed concurrently", u.id)))
        }
    }

    async fn user(&self, id: &str) -> Result<Option<UserRow>, StoreError> {
        let row = self.pool.get().await?.query_opt(&format!("{USER_COLUMNS} WHERE id = $1"), &[&id]).await.map_err(pg("reading a user"))?;
        row.as_ref().map(user).transpose()
    }

    async fn user_by_name(&self, token: &Token) -> Result<Option<UserRow>, StoreError> {
        let row = self.pool.get().await?.query_opt(&format!("{USER_COLUMNS} WHERE username_token = $1"), &[&&token[..]]).await.map_err(pg("reading a user"))?;
        row.as_ref().map(user).transpose()
    }

    async fn user_by_enrollment(&self, hash: &[u8; 32]) -> Result<Option<UserRow>, StoreError> {
        let row = self.pool.get().await?.query_opt(&format!("{USER_COLUMNS} WHERE enrollment_hash = $1"), &[&&hash[..]]).await.map_err(pg("reading a user"))?;
        row.as_ref().map(user).transpose()
    }

    async fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        let rows = self.pool.get().await?.query(&format!("{USER_COLUMNS} ORDER BY id"), &[]).await.map_err(pg("listing users"))?;
        rows.iter().map(user).collect()
    }

    async fn insert_session(&self, s: &SessionRow) -> Result<(), StoreError> {
        self.pool
            .get()
            .await?
            .execute(
                "INSERT INTO sessions (token_hash, user_id, created, last_seen, mac) VALUES ($1, $2, $3, $4, $5)",
                &[&&s.token_hash[..], &s.user_id, &s.created, &s.last_seen, &s.mac],
            )
            .await
            .map_err(pg("storing a session"))?;
        Ok(())
    }

    async fn session(&self, token_hash: &[u8; 32]) -> Result<Option<SessionRow>, StoreError> {
        let row = self
            .pool
            .get()
            .await?
            .query_opt("SELECT token_hash, user_id, created, last_seen, mac FROM sessions WHERE token_hash = $1", &[&&token_hash[..]])
            .await
            .map_err(pg("reading a session"))?;
        Ok(row.as_ref().map(session))
    }

    async fn touch_session(&self, token_hash: &[u8; 32], last_seen: i64) -> Result<(), StoreError> {
        self.pool
            .get()
            .await?
            .execute("UPDATE sessions SET last_seen = greatest(last_seen, $1) WHERE token_hash = $2", &[&last_seen, &&token_hash[..]])
            .await
            .map_err(pg("touching a session"))?;
        Ok(())
    }

    async fn delete_session(&self, token_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let n = self.pool.get().await?.execute("DELETE FROM sessions WHERE token_hash = $1", &[&&token_hash[..]]).await.map_err(pg("ending a session"))?;
        Ok(n > 0)
    }

    async fn delete_sessions_before(&self, created_before: i64) -> Result<usize, StoreError> {
        let n = self.pool.get().await?.execute("DELETE FROM sessions WHERE created < $1", &[&created_before]).await.map_err(pg("ending sessions"))?;
        Ok(n as usize)
    }

    async fn delete_sessions_of(&self, user_id: &str) -> Result<usize, StoreError> {
        let n = self.pool.get().await?.execute("DELETE FROM sessions WHERE user_id = $1", &[&user_id]).await.map_err(pg("ending sessions"))?;
        Ok(n as usize)
    }

    async fn append_audit(&self, rows: Vec<AuditRow>) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return self.audit_size().await;
        }
        self.audit.append(rows).await
    }

    async fn audit_entries(&self, from: u64, to: u64) -> Result<Vec<(u64, AuditRow)>, StoreError> {
        let (from, to) = (i64::try_from(from).unwrap_or(i64::MAX), i64::try_from(to).unwrap_or(i64::MAX));
        let rows = self.pool.get().await?.query(&format!("{AUDIT_COLUMNS} WHERE idx >= $1 AND idx < $2 ORDER BY idx"), &[&from, &to]).await.map_err(pg("reading the audit log"))?;
        rows.iter().map(audit_row).collect()
    }

    async fn audit_size(&self) -> Result<u64, StoreError> {
        let size: i64 = self.pool.get().await?.query_one("SELECT coalesce(max(idx) + 1, 0) FROM audit_entries", &[]).await.map_err(pg("reading the log's size"))?.get(0);
        uint(size)
    }

    async fn audit_entries_for(&self, patient_token: &Token, range: std::ops::Range<u64>, limit: usize, newest_first: bool) -> Result<Vec<(u64, AuditRow)>, StoreError> {
        // Migration 9's index on (patient_token, idx) reads a page in order and stops.
        let order = if newest_first { "DESC" } else { "ASC" };
        let sql = format!("{AUDIT_COLUMNS} WHERE patient_token = $1 AND idx >= $2 AND idx < $3 ORDER BY idx {order} LIMIT $4");
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (from, to, limit) = (clamp(range.start), clamp(range.end), clamp(limit as u64));
        let rows = self.pool.get().await?.query(&sql, &[&&patient_token[..], &from, &to, &limit]).await.map_err(pg("reading the audit log"))?;
        rows.iter().map(audit_row).collect()
    }

    async fn audit_leaves(&self, from: u64, to: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        let (start, end) = (int(from)?, i64::try_from(to).unwrap_or(i64::MAX));
        let rows = self.pool.get().await?.query("SELECT idx, leaf_hash FROM audit_entries WHERE idx >= $1 AND idx < $2 ORDER BY idx", &[&start, &end]).await.map_err(pg("reading audit leaves"))?;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                let (idx, hash): (i64, Vec<u8>) = (r.get(0), r.get(1));
                if uint(idx)? != from + i as u64 {
                    return Err(StoreError::Integrity(format!("audit entry {} is missing", from + i as u64)));
                }
                <[u8; 32]>::try_from(hash).map_err(|_| StoreError::Integrity(format!("audit leaf hash {idx} is not 32 bytes")))
            })
            .collect()
    }

    async fn put_audit_tiles(&self, tiles: Vec<AuditTile>) -> Result<(), StoreError> {
        if tiles.is_empty() {
            return Ok(());
        }
        let mut c = self.pool.get().await?;
        c.begin().await?;
        let outcome = put_tiles_in(&mut c, &tiles).await;
        c.finish(outcome).await
    }

    async fn audit_tiles(&self, keys: &[(u8, u64)]) -> Result<Vec<AuditTile>, StoreError> {
        let mut c = self.pool.get().await?;
        let mut out = Vec::with_capacity(keys.len());
        for &(level, index) in keys {
            let row = c.query_opt("SELECT hashes FROM audit_tiles WHERE level = $1 AND idx = $2", &[&i16::from(level), &int(index)?]).await.map_err(pg("reading audit tiles"))?;
            if let Some(r) = row {
                let blob: Vec<u8> = r.get(0);
                out.push(AuditTile { level, index, hashes: blob.chunks_exact(32).map(fixed).collect() });
            }
        }
        Ok(out)
    }

    async fn save_checkpoint(&self, cp: &StoredCheckpoint) -> Result<(), StoreError> {
        // An integrator that lost its lock mid-step (the next one already took over) signs the
        // same bytes for the same size (Ed25519 is deterministic): that is no conflict.
        let mut c = self.pool.get().await?;
        let size = int(cp.size)?;
        let added = c
            .execute("INSERT INTO audit_checkpoints (size, root, note) VALUES ($1, $2, $3) ON CONFLICT (size) DO NOTHING", &[&size, &&cp.root[..], &cp.note])
            .await
            .map_err(pg("saving a checkpoint"))?;
        if added == 0 {
            let stored: String = c.query_one("SELECT note FROM audit_checkpoints WHERE size = $1", &[&size]).await.map_err(pg("reading a checkpoint"))?.get(0);
            if stored != cp.note {
                return Err(StoreError::Conflict(format!("a different checkpoint is stored for size {}", cp.size)));
            }
        }
        Ok(())
    }

    async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError> {
        Ok(self.checkpoints_where("ORDER BY size DESC LIMIT 1", &[]).await?.pop())
    }

    async fn checkpoint_at(&self, size: u64) -> Result<Option<StoredCheckpoint>, StoreError> {
        Ok(self.checkpoints_where("WHERE size = $1", &[&int(size)?]).await?.pop())
    }

    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, StoreError> {
        self.checkpoints_where("ORDER BY size", &[]).await
    }

    async fn lead(&self, duty: crate::Duty) -> Result<bool, StoreError> {
        self.hold_duty(duty).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.pool.get().await?.query_one("SELECT 1", &[]).await.map_err(pg("ping"))?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn snapshot(&self, out: tokio::sync::mpsc::Sender<Vec<crate::dump::Row>>) -> Result<(), StoreError> {
        super::snapshot::send_all(&self.pool, out).await
    }
}
