//! A restore's load into an empty PostgreSQL database: the schema and every row of the backup in
//! one transaction, so that a restore that fails — a bad row, a lost connection — leaves the
//! database as empty as it found it. The large tables go in set-wise (`unnest` of arrays, one
//! statement per table and batch); resource ids (`rid`) are assigned here, in the backup's order,
//! and the identity moved past them at the end.

use super::pool::{Conn, Pool};
use super::store::kek_version;
use super::{connection_config, int, migrate_in, pg, Settings};
use crate::dump::Row;
use crate::StoreError;

pub struct PgLoad {
    conn: Conn,
    /// The rid of the last resource loaded: the next versions belong to it.
    rid: i64,
}

impl PgLoad {
    /// Connects, begins the transaction and makes the schema; the database must hold no Valv
    /// schema yet (a restore never writes over a database in use).
    pub async fn create(settings: &Settings) -> Result<PgLoad, StoreError> {
        let (config, tls) = connection_config(settings)?;
        let mut conn = Pool::new(config, tls, 1).connect().await?;
        conn.begin().await?;
        let taken: bool = conn.query_one("SELECT to_regclass('valv_schema') IS NOT NULL", &[]).await.map_err(pg("reading the schema"))?.get(0);
        if taken {
            return Err(StoreError::Backend("the PostgreSQL database already holds a Valv schema: a restore goes into a new, empty database".into()));
        }
        migrate_in(&mut conn, None).await?;
        Ok(PgLoad { conn, rid: 0 })
    }

    /// Inserts a batch of rows (inside the one transaction).
    pub async fn load(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        let mut t = Tables::default();
        for row in rows {
            self.collect(row, &mut t)?;
        }
        t.insert(&mut self.conn).await
    }

    /// Moves the rid identity past the loaded resources and commits.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        if self.rid > 0 {
            self.conn.query_one("SELECT setval(pg_get_serial_sequence('resources', 'rid'), $1)", &[&self.rid]).await.map_err(pg("moving the resource identity"))?;
        }
        self.conn.finish(Ok(())).await
    }

    fn collect<'r>(&mut self, row: &'r Row, t: &mut Tables<'r>) -> Result<(), StoreError> {
        match row {
            Row::Resource(r) => {
                self.rid += 1;
                let patient = r.patient.as_deref();
                t.resources.push((self.rid, &r.resource_type, &r.id, int(r.version)?, r.deleted, patient, r.last_updated, r.tokens.concat()));
            }
            Row::Version(v) => {
                if self.rid == 0 {
                    return Err(StoreError::Integrity("a version before any resource".into()));
                }
                t.versions.push((self.rid, int(v.version)?, v.deleted, v.patient.as_deref(), v.last_updated, &v.body[..]));
            }
            Row::AuditEntry { index, row } => {
                t.audit.push((int(*index)?, &row.leaf_hash[..], &row.sealed[..], row.patient_token.as_ref().map(|p| &p[..]), row.query_sealed.as_deref()));
            }
            other => t.small.push(other),
        }
        Ok(())
    }
}

type ResourceCols<'r> = (i64, &'r str, &'r str, i64, bool, Option<&'r str>, i64, Vec<u8>);
type VersionCols<'r> = (i64, i64, bool, Option<&'r str>, i64, &'r [u8]);
type AuditCols<'r> = (i64, &'r [u8], &'r [u8], Option<&'r [u8]>, Option<&'r [u8]>);

/// One batch, by table.
#[derive(Default)]
struct Tables<'r> {
    resources: Vec<ResourceCols<'r>>,
    versions: Vec<VersionCols<'r>>,
    audit: Vec<AuditCols<'r>>,
    /// Rows of the small tables, inserted one by one.
    small: Vec<&'r Row>,
}

impl Tables<'_> {
    async fn insert(&self, c: &mut Conn) -> Result<(), StoreError> {
        if !self.resources.is_empty() {
            let r = &self.resources;
            c.execute(
                "INSERT INTO resources (rid, type, id, version, deleted, patient, last_updated, tokens) \
                 SELECT * FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BOOLEAN[], $6::TEXT[], $7::BIGINT[], $8::BYTEA[])",
                &[
                    &r.iter().map(|x| x.0).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.1).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.2).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.3).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.4).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.5).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.6).collect::<Vec<_>>(),
                    &r.iter().map(|x| &x.7[..]).collect::<Vec<_>>(),
                ],
            )
            .await
            .map_err(pg("loading resources"))?;
        }
        if !self.versions.is_empty() {
            let v = &self.versions;
            c.execute(
                "INSERT INTO versions (rid, version, deleted, patient, last_updated, body) \
                 SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BOOLEAN[], $4::TEXT[], $5::BIGINT[], $6::BYTEA[])",
                &[
                    &v.iter().map(|x| x.0).collect::<Vec<_>>(),
                    &v.iter().map(|x| x.1).collect::<Vec<_>>(),
                    &v.iter().map(|x| x.2).collect::<Vec<_>>(),
                    &v.iter().map(|x| x.3).collect::<Vec<_>>(),
                    &v.iter().map(|x| x.4).collect::<Vec<_>>(),
                    &v.iter().map(|x| x.5).collect::<Vec<_>>(),
                ],
            )
            .await
            .map_err(pg("loading versions"))?;
        }
        if !self.audit.is_empty() {
            let a = &self.audit;
            c.execute(
                "INSERT INTO audit_entries (idx, leaf_hash, sealed, patient_token, query_sealed) \
                 SELECT * FROM unnest($1::BIGINT[], $2::BYTEA[], $3::BYTEA[], $4::BYTEA[], $5::BYTEA[])",
                &[
                    &a.iter().map(|x| x.0).collect::<Vec<_>>(),
                    &a.iter().map(|x| x.1).collect::<Vec<_>>(),
                    &a.iter().map(|x| x.2).collect::<Vec<_>>(),
                    &a.iter().map(|x| x.3).collect::<Vec<_>>(),
                    &a.iter().map(|x| x.4).collect::<Vec<_>>(),
                ],
            )
            .await
            .map_err(pg("loading audit entries"))?;
        }
        for row in &self.small {
            insert_small(c, row).await?;
        }
        Ok(())
    }
}

async fn insert_small(c: &mut Conn, row: &Row) -> Result<(), StoreError> {
    let done = match row {
        Row::DataKey { name, key, created, wrapped_at } => {
            c.execute(
                "INSERT INTO data_keys (name, provider, kek_id, kek_version, wrapped, created, wrapped_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[name, &key.provider, &key.kek_id, &kek_version(key.kek_version)?, &key.ciphertext, created, wrapped_at],
            )
            .await
        }
        Row::ApiKey(k) => {
            c.execute(
                "INSERT INTO api_keys (id, name, role, hash, created, revoked, mac, scopes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&k.id, &k.name, &k.role, &&k.hash[..], &k.created, &k.revoked, &k.mac, &k.scopes],
            )
            .await
        }
        Row::User(u) => {
            c.execute(
                "INSERT INTO users (id, username_token, version, sealed, enrollment_hash) VALUES ($1, $2, $3, $4, $5)",
                &[&u.id, &&u.username_token[..], &int(u.version)?, &u.sealed, &u.enrollment_hash.as_ref().map(|h| &h[..])],
            )
            .await
        }
        Row::Grant(g) => c.execute("INSERT INTO grants (id, version, sealed) VALUES ($1, $2, $3)", &[&g.id, &int(g.version)?, &g.sealed]).await,
        Row::Erasure(e) => c.execute("INSERT INTO erasures (patient, seq, erased_at) VALUES ($1, $2, $3)", &[&e.patient, &int(e.seq)?, &e.erased_at]).await,
        Row::ErasureRequest(r) => {
            c.execute(
                "INSERT INTO erasure_requests (id, patient, sealed, requested_at, state, decided_by, decided_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&r.id, &r.patient, &r.sealed, &r.requested_at, &r.state, &r.decided_by, &r.decided_at],
            )
            .await
        }
        Row::AuditTile(t) => {
            c.execute("INSERT INTO audit_tiles (level, idx, hashes) VALUES ($1, $2, $3)", &[&i16::from(t.level), &int(t.index)?, &t.hashes.concat()]).await
        }
        Row::File(f) => {
            c.execute(
                &format!("INSERT INTO files ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", super::store::FILE_COLUMNS),
                &[&f.binary_id, &f.object, &f.patient, &f.sealed_key, &int(f.size)?, &&f.sha256[..], &f.scan, &f.created],
            )
            .await
        }
        Row::Checkpoint(k) => c.execute("INSERT INTO audit_checkpoints (size, root, note) VALUES ($1, $2, $3)", &[&int(k.size)?, &&k.root[..], &k.note]).await,
        Row::Alert(a) => c.execute("INSERT INTO alerts (id, time, rule, severity, sealed) VALUES ($1, $2, $3, $4, $5)", &[&a.id, &a.time, &a.rule, &a.severity, &a.sealed]).await,
        Row::Case(k) => c.execute("INSERT INTO cases (kind, id, version, sealed) VALUES ($1, $2, $3, $4)", &[&k.kind, &k.id, &int(k.version)?, &k.sealed]).await,
        Row::Resource(_) | Row::Version(_) | Row::AuditEntry { .. } => return Err(StoreError::Backend("a large-table row among the small ones".into())),
    };
    done.map(|_| ()).map_err(pg("loading a row"))
}
