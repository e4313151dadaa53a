//! [`crate::Store::snapshot`] on PostgreSQL: every table read in one `REPEATABLE READ` read-only
//! transaction (one consistent view while the servers go on writing), the large tables in pages
//! by key so memory stays bounded, and sent in batches. Loading a backup into PostgreSQL
//! (restore onto this backend) is not built yet: a restore goes to SQLite (docs/OPERATIONS.md).

use super::pool::{Conn, Pool};
use super::store::audit_row;
use super::{pg, uint};
use crate::dump::{ResourceRow, Row, VersionRow};
use crate::{ApiKeyRecord, AuditTile, ErasureRequestRow, ErasureRow, GrantRow, StoreError, StoredCheckpoint, UserRow, WrappedKey};
use tokio::sync::mpsc::Sender;

/// Rows per page read and per batch sent.
const PAGE: i64 = 2_048;

pub(super) async fn send_all(pool: &Pool, out: Sender<Vec<Row>>) -> Result<(), StoreError> {
    let mut c = pool.get().await?;
    c.begin().await?;
    let outcome = read_all(&mut c, &out).await;
    // Read-only: ending it either way changes nothing.
    c.finish(outcome).await
}

async fn send(out: &Sender<Vec<Row>>, rows: Vec<Row>) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    out.send(rows).await.map_err(|_| StoreError::Backend("the snapshot's reader stopped".into()))
}

fn blob<const N: usize>(v: &[u8], what: &str) -> Result<[u8; N], StoreError> {
    <[u8; N]>::try_from(v).map_err(|_| StoreError::Integrity(format!("{what} is not {N} bytes")))
}

async fn read_all(c: &mut Conn, out: &Sender<Vec<Row>>) -> Result<(), StoreError> {
    c.batch("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.map_err(pg("starting the snapshot"))?;
    data_keys(c, out).await?;
    resources(c, out).await?;
    let rows = c.query("SELECT id, name, role, hash, created, revoked, mac, scopes FROM api_keys ORDER BY id", &[]).await.map_err(pg("reading API keys"))?;
    let keys = rows.iter().map(|r| {
        let hash: Vec<u8> = r.get(3);
        Ok(Row::ApiKey(ApiKeyRecord { id: r.get(0), name: r.get(1), role: r.get(2), hash: blob(&hash, "an API key hash")?, created: r.get(4), revoked: r.get(5), mac: r.get(6), scopes: r.get(7) }))
    });
    send(out, keys.collect::<Result<_, StoreError>>()?).await?;
    let rows = c.query("SELECT id, username_token, version, sealed, enrollment_hash FROM users ORDER BY id", &[]).await.map_err(pg("reading users"))?;
    let users = rows.iter().map(|r| {
        let (token, enrollment): (Vec<u8>, Option<Vec<u8>>) = (r.get(1), r.get(4));
        let enrollment_hash = enrollment.map(|h| blob(&h, "an enrollment hash")).transpose()?;
        Ok(Row::User(UserRow { id: r.get(0), username_token: blob(&token, "a user name token")?, version: uint(r.get(2))?, sealed: r.get(3), enrollment_hash }))
    });
    send(out, users.collect::<Result<_, StoreError>>()?).await?;
    let rows = c.query("SELECT id, version, sealed FROM grants ORDER BY id", &[]).await.map_err(pg("reading grants"))?;
    send(out, rows.iter().map(|r| Ok(Row::Grant(GrantRow { id: r.get(0), version: uint(r.get(1))?, sealed: r.get(2) }))).collect::<Result<_, StoreError>>()?).await?;
    let rows = c.query(&format!("SELECT {} FROM files ORDER BY binary_id", super::store::FILE_COLUMNS), &[]).await.map_err(pg("reading files"))?;
    send(out, rows.iter().map(|r| super::store::row_to_file(r).map(Row::File)).collect::<Result<_, StoreError>>()?).await?;
    let rows = c.query("SELECT id, time, rule, severity, sealed FROM alerts ORDER BY id", &[]).await.map_err(pg("reading alerts"))?;
    send(out, rows.iter().map(|r| Row::Alert(super::store::row_to_alert(r))).collect()).await?;
    let rows = c.query("SELECT kind, id, version, sealed FROM cases ORDER BY kind, id", &[]).await.map_err(pg("reading cases"))?;
    send(out, rows.iter().map(|r| super::store::row_to_case(r).map(Row::Case)).collect::<Result<_, StoreError>>()?).await?;
    let rows = c.query("SELECT seq, patient, erased_at FROM erasures ORDER BY seq", &[]).await.map_err(pg("reading erasures"))?;
    send(out, rows.iter().map(|r| Ok(Row::Erasure(ErasureRow { seq: uint(r.get(0))?, patient: r.get(1), erased_at: r.get(2) }))).collect::<Result<_, StoreError>>()?).await?;
    let rows = c.query("SELECT id, patient, sealed, requested_at, state, decided_by, decided_at FROM erasure_requests ORDER BY id", &[]).await.map_err(pg("reading erasure requests"))?;
    let requests = rows.iter().map(|r| {
        Row::ErasureRequest(ErasureRequestRow { id: r.get(0), patient: r.get(1), sealed: r.get(2), requested_at: r.get(3), state: r.get(4), decided_by: r.get(5), decided_at: r.get(6) })
    });
    send(out, requests.collect()).await?;
    audit_entries(c, out).await?;
    let rows = c.query("SELECT level, idx, hashes FROM audit_tiles ORDER BY level, idx", &[]).await.map_err(pg("reading audit tiles"))?;
    for page in rows.chunks(PAGE as usize) {
        let tiles = page.iter().map(|r| {
            let (level, hashes): (i16, Vec<u8>) = (r.get(0), r.get(2));
            let hashes = hashes.chunks(32).map(|h| blob(h, "a tile hash")).collect::<Result<_, _>>()?;
            Ok(Row::AuditTile(AuditTile { level: u8::try_from(level).map_err(|_| StoreError::Integrity(format!("tile level {level}")))?, index: uint(r.get(1))?, hashes }))
        });
        send(out, tiles.collect::<Result<_, StoreError>>()?).await?;
    }
    let rows = c.query("SELECT size, root, note FROM audit_checkpoints ORDER BY size", &[]).await.map_err(pg("reading checkpoints"))?;
    for page in rows.chunks(PAGE as usize) {
        let checkpoints = page.iter().map(|r| {
            let root: Vec<u8> = r.get(1);
            Ok(Row::Checkpoint(StoredCheckpoint { size: uint(r.get(0))?, root: blob(&root, "a checkpoint root")?, note: r.get(2) }))
        });
        send(out, checkpoints.collect::<Result<_, StoreError>>()?).await?;
    }
    Ok(())
}

async fn data_keys(c: &mut Conn, out: &Sender<Vec<Row>>) -> Result<(), StoreError> {
    let mut after = String::new();
    loop {
        let rows = c
            .query("SELECT name, provider, kek_id, kek_version, wrapped, created, wrapped_at FROM data_keys WHERE name > $1 ORDER BY name LIMIT $2", &[&after, &PAGE])
            .await
            .map_err(pg("reading data keys"))?;
        let Some(last) = rows.last() else { return Ok(()) };
        after = last.get(0);
        let keys = rows.iter().map(|r| {
            let version: i32 = r.get(3);
            let key = WrappedKey { provider: r.get(1), kek_id: r.get(2), kek_version: u32::try_from(version).map_err(|_| StoreError::Integrity(format!("KEK version {version}")))?, ciphertext: r.get(4) };
            Ok(Row::DataKey { name: r.get(0), key, created: r.get(5), wrapped_at: r.get(6) })
        });
        send(out, keys.collect::<Result<_, StoreError>>()?).await?;
    }
}

/// Each resource, followed by its versions, in the order they were made.
async fn resources(c: &mut Conn, out: &Sender<Vec<Row>>) -> Result<(), StoreError> {
    let (mut after_rid, mut after_version, mut current) = (-1i64, -1i64, None::<i64>);
    loop {
        let rows = c
            .query(
                "SELECT r.rid, r.type, r.id, r.version, r.deleted, r.patient, r.last_updated, r.tokens, v.version, v.deleted, v.patient, v.last_updated, v.body \
                 FROM resources r JOIN versions v ON v.rid = r.rid WHERE (r.rid, v.version) > ($1, $2) ORDER BY r.rid, v.version LIMIT $3",
                &[&after_rid, &after_version, &PAGE],
            )
            .await
            .map_err(pg("reading resources"))?;
        let Some(last) = rows.last() else { return Ok(()) };
        (after_rid, after_version) = (last.get(0), last.get(8));
        let mut batch = Vec::with_capacity(rows.len() + 16);
        for r in &rows {
            let rid: i64 = r.get(0);
            if current != Some(rid) {
                current = Some(rid);
                let tokens: Vec<u8> = r.get(7);
                let tokens = tokens.chunks(16).map(|t| blob(t, "a search token")).collect::<Result<_, _>>()?;
                batch.push(Row::Resource(ResourceRow { resource_type: r.get(1), id: r.get(2), version: uint(r.get(3))?, deleted: r.get(4), patient: r.get(5), last_updated: r.get(6), tokens }));
            }
            batch.push(Row::Version(VersionRow { version: uint(r.get(8))?, deleted: r.get(9), patient: r.get(10), last_updated: r.get(11), body: r.get(12) }));
        }
        send(out, batch).await?;
    }
}

async fn audit_entries(c: &mut Conn, out: &Sender<Vec<Row>>) -> Result<(), StoreError> {
    let mut from = 0i64;
    loop {
        let rows = c
            .query("SELECT idx, leaf_hash, sealed, patient_token, query_sealed FROM audit_entries WHERE idx >= $1 ORDER BY idx LIMIT $2", &[&from, &PAGE])
            .await
            .map_err(pg("reading the audit log"))?;
        let Some(last) = rows.last() else { return Ok(()) };
        from = last.get::<_, i64>(0) + 1;
        let entries = rows.iter().map(|r| audit_row(r).map(|(index, row)| Row::AuditEntry { index, row }));
        send(out, entries.collect::<Result<_, StoreError>>()?).await?;
    }
}
