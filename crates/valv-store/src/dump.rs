//! Every table as backend-neutral rows: what a backup streams out of one store
//! ([`crate::Store::snapshot`]) and a restore loads into another with that backend's bulk loader
//! ([`BulkLoad`]), whatever the backends, and the rows' encoding as backup frames
//! ([`valv_backup::fields`]).
//!
//! Sessions are left out on purpose: a restored server has everyone sign in again, so a session
//! ended after the backup (a logout, a revocation) cannot come back with it. Search tokens are
//! not rows either: each resource carries its current tokens and the load indexes them again.

use crate::{AlertRow, ApiKeyRecord, CaseRow, AuditRow, AuditTile, ErasureRequestRow, ErasureRow, FileRow, GrantRow, StoredCheckpoint, Token, UserRow, WrappedKey};
use std::collections::BTreeMap;
use valv_audit::ledger::Erasure;
use valv_audit::Frontier;
use valv_backup::fields::{Dec, Enc};
use valv_backup::frame::Digest32;
use valv_backup::manifest::{ledger_head, KekCount, Tally};
use valv_backup::{BackupError, Manifest};

/// A resource's current state; its versions follow it as [`Row::Version`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRow {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub deleted: bool,
    pub patient: Option<String>,
    pub last_updated: i64,
    pub tokens: Vec<Token>,
}

/// One version of the resource of the [`Row::Resource`] before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub version: u64,
    pub deleted: bool,
    pub patient: Option<String>,
    pub last_updated: i64,
    pub body: Vec<u8>,
}

/// One row of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    DataKey { name: String, key: WrappedKey, created: i64, wrapped_at: Option<i64> },
    Resource(ResourceRow),
    Version(VersionRow),
    ApiKey(ApiKeyRecord),
    User(UserRow),
    Grant(GrantRow),
    Erasure(ErasureRow),
    ErasureRequest(ErasureRequestRow),
    AuditEntry { index: u64, row: AuditRow },
    AuditTile(AuditTile),
    Checkpoint(StoredCheckpoint),
    /// A file-backed Binary's content record (its object travels separately).
    File(FileRow),
    Alert(AlertRow),
    Case(CaseRow),
}

impl Row {
    /// The table it belongs to (the manifest counts rows by these names).
    pub fn table(&self) -> &'static str {
        match self {
            Row::DataKey { .. } => "data_keys",
            Row::Resource(_) => "resources",
            Row::Version(_) => "versions",
            Row::ApiKey(_) => "api_keys",
            Row::User(_) => "users",
            Row::Grant(_) => "grants",
            Row::Erasure(_) => "erasures",
            Row::ErasureRequest(_) => "erasure_requests",
            Row::AuditEntry { .. } => "audit_entries",
            Row::AuditTile(_) => "audit_tiles",
            Row::Checkpoint(_) => "audit_checkpoints",
            Row::File(_) => "files",
            Row::Alert(_) => "alerts",
            Row::Case(_) => "cases",
        }
    }

    /// Encodes the row into `buf` (emptied first) as a frame payload; returns the frame kind.
    pub fn encode_into(&self, buf: &mut Vec<u8>) -> u8 {
        let mut e = Enc::reusing(std::mem::take(buf));
        let kind = match self {
            Row::DataKey { name, key, created, wrapped_at } => {
                e.str(name).str(&key.provider).str(&key.kek_id).u64(key.kek_version.into()).bytes(&key.ciphertext).i64(*created).opt(*wrapped_at, Enc::i64);
                1
            }
            Row::Resource(r) => {
                e.str(&r.resource_type).str(&r.id).u64(r.version).bool(r.deleted).opt(r.patient.as_deref(), Enc::str).i64(r.last_updated).bytes(&r.tokens.concat());
                2
            }
            Row::Version(v) => {
                e.u64(v.version).bool(v.deleted).opt(v.patient.as_deref(), Enc::str).i64(v.last_updated).bytes(&v.body);
                3
            }
            Row::ApiKey(k) => {
                e.str(&k.id).str(&k.name).str(&k.role).bytes(&k.hash).i64(k.created).opt(k.revoked, Enc::i64).bytes(&k.mac).str(&k.scopes);
                4
            }
            Row::User(u) => {
                e.str(&u.id).bytes(&u.username_token).u64(u.version).bytes(&u.sealed).opt(u.enrollment_hash.as_ref(), |e, h| e.bytes(h));
                5
            }
            Row::Grant(g) => {
                e.str(&g.id).u64(g.version).bytes(&g.sealed);
                6
            }
            Row::Alert(a) => {
                e.str(&a.id).i64(a.time).str(&a.rule).str(&a.severity).bytes(&a.sealed);
                13
            }
            Row::Case(k) => {
                e.str(&k.kind).str(&k.id).u64(k.version).bytes(&k.sealed);
                14
            }
            Row::Erasure(r) => {
                e.u64(r.seq).str(&r.patient).i64(r.erased_at);
                7
            }
            Row::ErasureRequest(r) => {
                e.str(&r.id).str(&r.patient).bytes(&r.sealed).i64(r.requested_at).str(&r.state).opt(r.decided_by.as_deref(), Enc::str).opt(r.decided_at, Enc::i64);
                8
            }
            Row::AuditEntry { index, row } => {
                e.u64(*index).bytes(&row.leaf_hash).bytes(&row.sealed).opt(row.patient_token.as_ref(), |e, t| e.bytes(t)).opt(row.query_sealed.as_deref(), |e, q| e.bytes(q));
                9
            }
            Row::AuditTile(t) => {
                e.u64(t.level.into()).u64(t.index).bytes(&t.hashes.concat());
                10
            }
            Row::Checkpoint(c) => {
                e.u64(c.size).bytes(&c.root).str(&c.note);
                11
            }
            Row::File(f) => {
                e.str(&f.binary_id).str(&f.object).str(&f.patient).bytes(&f.sealed_key).u64(f.size).bytes(&f.sha256).str(&f.scan).i64(f.created);
                12
            }
        };
        *buf = e.finish();
        kind
    }

    /// Reads a frame; `None` for a kind that is not a table row.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Option<Row>, BackupError> {
        let mut d = Dec::new(payload);
        let row = match kind {
            1 => Row::DataKey {
                name: d.string()?,
                key: WrappedKey { provider: d.string()?, kek_id: d.string()?, kek_version: d.u32()?, ciphertext: d.bytes()?.to_vec() },
                created: d.i64()?,
                wrapped_at: d.opt(Dec::i64)?,
            },
            2 => Row::Resource(ResourceRow {
                resource_type: d.string()?,
                id: d.string()?,
                version: d.u64()?,
                deleted: d.bool()?,
                patient: d.opt(Dec::string)?,
                last_updated: d.i64()?,
                tokens: tokens(d.bytes()?)?,
            }),
            3 => Row::Version(VersionRow { version: d.u64()?, deleted: d.bool()?, patient: d.opt(Dec::string)?, last_updated: d.i64()?, body: d.bytes()?.to_vec() }),
            4 => Row::ApiKey(ApiKeyRecord {
                id: d.string()?,
                name: d.string()?,
                role: d.string()?,
                hash: d.array()?,
                created: d.i64()?,
                revoked: d.opt(Dec::i64)?,
                mac: d.bytes()?.to_vec(),
                scopes: d.string()?,
            }),
            5 => Row::User(UserRow { id: d.string()?, username_token: d.array()?, version: d.u64()?, sealed: d.bytes()?.to_vec(), enrollment_hash: d.opt(Dec::array)? }),
            6 => Row::Grant(GrantRow { id: d.string()?, version: d.u64()?, sealed: d.bytes()?.to_vec() }),
            7 => Row::Erasure(ErasureRow { seq: d.u64()?, patient: d.string()?, erased_at: d.i64()? }),
            8 => Row::ErasureRequest(ErasureRequestRow {
                id: d.string()?,
                patient: d.string()?,
                sealed: d.bytes()?.to_vec(),
                requested_at: d.i64()?,
                state: d.string()?,
                decided_by: d.opt(Dec::string)?,
                decided_at: d.opt(Dec::i64)?,
            }),
            9 => Row::AuditEntry {
                index: d.u64()?,
                row: AuditRow { leaf_hash: d.array()?, sealed: d.bytes()?.to_vec(), patient_token: d.opt(Dec::array)?, query_sealed: d.opt(|d| d.bytes().map(<[u8]>::to_vec))? },
            },
            10 => Row::AuditTile(AuditTile {
                level: u8::try_from(d.u64()?).map_err(|_| BackupError::Malformed("a tile level is out of range".into()))?,
                index: d.u64()?,
                hashes: d.bytes()?.chunks(32).map(<[u8; 32]>::try_from).collect::<Result<_, _>>().map_err(|_| BackupError::Malformed("a tile is not whole hashes".into()))?,
            }),
            11 => Row::Checkpoint(StoredCheckpoint { size: d.u64()?, root: d.array()?, note: d.string()? }),
            12 => Row::File(FileRow {
                binary_id: d.string()?,
                object: d.string()?,
                patient: d.string()?,
                sealed_key: d.bytes()?.to_vec(),
                size: d.u64()?,
                sha256: d.array()?,
                scan: d.string()?,
                created: d.i64()?,
            }),
            13 => Row::Alert(AlertRow { id: d.string()?, time: d.i64()?, rule: d.string()?, severity: d.string()?, sealed: d.bytes()?.to_vec() }),
            14 => Row::Case(CaseRow { kind: d.string()?, id: d.string()?, version: d.u64()?, sealed: d.bytes()?.to_vec() }),
            _ => return Ok(None),
        };
        d.finish()?;
        Ok(Some(row))
    }
}

/// A restore's bulk loader, for whichever backend the new data directory names: a new SQLite
/// file ([`crate::sqlite::FreshLoad`]) or an empty PostgreSQL database ([`crate::postgres::PgLoad`]).
pub enum BulkLoad {
    Sqlite(crate::sqlite::FreshLoad),
    Postgres(crate::postgres::PgLoad),
}

impl BulkLoad {
    /// Loads a batch of rows.
    pub async fn load(&mut self, rows: &[Row]) -> Result<(), crate::StoreError> {
        match self {
            BulkLoad::Sqlite(l) => l.load(rows),
            BulkLoad::Postgres(l) => l.load(rows).await,
        }
    }

    /// Makes what was loaded complete and durable.
    pub async fn finish(self) -> Result<(), crate::StoreError> {
        match self {
            BulkLoad::Sqlite(l) => l.finish(),
            BulkLoad::Postgres(l) => l.finish().await,
        }
    }
}

/// What a stream of rows holds, as a manifest states it: counted while a backup is written, and
/// again while a restore reads it, to be compared.
#[derive(Debug, Default)]
pub struct Census {
    pub tally: Tally,
    audit: Frontier,
    keks: BTreeMap<(String, String, u32), u64>,
    erasures: Vec<Erasure>,
    checkpoint: Option<(u64, [u8; 32])>,
    /// The first out-of-order audit index seen (a backup must hold the log whole, in order).
    gap: Option<u64>,
}

impl Census {
    pub fn add(&mut self, row: &Row) {
        self.tally.row(row.table());
        match row {
            Row::DataKey { key, .. } => *self.keks.entry((key.provider.clone(), key.kek_id.clone(), key.kek_version)).or_default() += 1,
            Row::Resource(r) => self.tally.resource(&r.resource_type),
            Row::Erasure(e) => self.erasures.push(Erasure { seq: e.seq, patient: e.patient.clone(), erased_at: e.erased_at }),
            Row::AuditEntry { index, row } => {
                if *index != self.audit.size() && self.gap.is_none() {
                    self.gap = Some(*index);
                }
                self.audit.push(row.leaf_hash);
            }
            Row::Checkpoint(c) if self.checkpoint.is_none_or(|(size, _)| c.size >= size) => self.checkpoint = Some((c.size, c.root)),
            _ => {}
        }
    }

    /// The erasures seen, in order.
    pub fn erasures(&self) -> &[Erasure] {
        &self.erasures
    }

    /// The manifest of what was counted.
    pub fn manifest(&self, origin: &str, created: i64, source: &str, payload: Digest32) -> Manifest {
        Manifest {
            origin: origin.to_string(),
            created,
            source: source.to_string(),
            payload,
            audit_size: self.audit.size(),
            audit_root: self.audit.root(),
            checkpoint: self.checkpoint,
            ledger: ledger_head(&self.erasures),
            tally: self.tally.clone(),
            keks: self.keks.iter().map(|((provider, kek_id, version), keys)| KekCount { provider: provider.clone(), kek_id: kek_id.clone(), version: *version, keys: *keys }).collect(),
        }
    }

    /// How what was counted differs from `stated`, in words (empty: it is what the manifest says).
    pub fn differences(&self, stated: &Manifest, payload: Digest32) -> Vec<String> {
        let found = self.manifest(&stated.origin, stated.created, &stated.source, payload);
        let mut out = stated.differences(&self.tally);
        if let Some(index) = self.gap {
            out.push(format!("the audit log is not whole: entry {index} comes out of order"));
        }
        let mut differ = |what: &str, same: bool| {
            if !same {
                out.push(format!("{what} differs from the manifest's"));
            }
        };
        differ("the content's SHA-256", found.payload == stated.payload);
        differ("the audit tree (size and root)", (found.audit_size, found.audit_root) == (stated.audit_size, stated.audit_root));
        differ("the latest checkpoint", found.checkpoint == stated.checkpoint);
        differ("the erasure ledger's head", found.ledger == stated.ledger);
        differ("the data keys per KEK version", found.keks == stated.keks);
        out
    }
}

fn tokens(bytes: &[u8]) -> Result<Vec<Token>, BackupError> {
    bytes.chunks(16).map(Token::try_from).collect::<Result<_, _>>().map_err(|_| BackupError::Malformed("search tokens are not whole tokens".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rows() -> impl Strategy<Value = Row> {
        let text = "[a-zA-Z0-9:/-]{0,12}";
        let blob = proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (text, text, any::<u32>(), blob.clone(), any::<i64>(), any::<Option<i64>>()).prop_map(|(name, id, v, c, created, wrapped_at)| Row::DataKey {
                name: name.clone(),
                key: WrappedKey { provider: "file".into(), kek_id: id, kek_version: v, ciphertext: c },
                created,
                wrapped_at
            }),
            (text, text, any::<u64>(), any::<bool>(), proptest::option::of(text), any::<i64>(), proptest::collection::vec(any::<[u8; 16]>(), 0..5)).prop_map(
                |(t, id, version, deleted, patient, last_updated, tokens)| Row::Resource(ResourceRow { resource_type: t, id, version, deleted, patient, last_updated, tokens })
            ),
            (any::<u64>(), any::<bool>(), proptest::option::of(text), any::<i64>(), blob.clone())
                .prop_map(|(version, deleted, patient, last_updated, body)| Row::Version(VersionRow { version, deleted, patient, last_updated, body })),
            (any::<u64>(), any::<[u8; 32]>(), blob.clone(), any::<Option<[u8; 16]>>(), proptest::option::of(blob.clone()))
                .prop_map(|(index, leaf_hash, sealed, patient_token, query_sealed)| Row::AuditEntry { index, row: AuditRow { leaf_hash, sealed, patient_token, query_sealed } }),
            (any::<u8>(), any::<u64>(), proptest::collection::vec(any::<[u8; 32]>(), 0..4)).prop_map(|(level, index, hashes)| Row::AuditTile(AuditTile { level, index, hashes })),
            (text, text, blob, any::<i64>(), proptest::option::of(text), proptest::option::of(any::<i64>())).prop_map(|(id, patient, sealed, requested_at, decided_by, decided_at)| {
                Row::ErasureRequest(ErasureRequestRow { id, patient, sealed, requested_at, state: "pending".into(), decided_by, decided_at })
            }),
        ]
    }

    proptest! {
        #[test]
        fn rows_round_trip_through_frames(row in rows()) {
            let mut payload = Vec::new();
            let kind = row.encode_into(&mut payload);
            prop_assert_eq!(Row::decode(kind, &payload).expect("test"), Some(row));
            prop_assert!(Row::decode(kind, &[payload.as_slice(), &[0]].concat()).is_err());
        }
    }

    fn audit(index: u64, leaf: u8) -> Row {
        Row::AuditEntry { index, row: AuditRow { leaf_hash: [leaf; 32], sealed: vec![leaf], patient_token: None, query_sealed: None } }
    }

    #[test]
    fn a_census_names_every_way_the_rows_differ_from_their_manifest() {
        let payload = Digest32 { sha256: [1; 32], bytes: 10 };
        let rows = vec![
            Row::DataKey { name: "patient:p".into(), key: WrappedKey { provider: "file".into(), kek_id: "k".into(), kek_version: 1, ciphertext: vec![1] }, created: 0, wrapped_at: None },
            Row::Erasure(ErasureRow { seq: 1, patient: "q".into(), erased_at: 5 }),
            audit(0, 1),
            audit(1, 2),
        ];
        let count = |rows: &[Row]| {
            let mut c = Census::default();
            rows.iter().for_each(|r| c.add(r));
            c
        };
        let stated = count(&rows).manifest("o", 1, "sqlite", payload);
        assert!(count(&rows).differences(&stated, payload).is_empty(), "the same rows match");
        let other_payload = Digest32 { bytes: 11, ..payload };
        assert!(count(&rows).differences(&stated, other_payload).iter().any(|d| d.contains("SHA-256")));
        let without_entry = count(&rows[..3]).differences(&stated, payload);
        assert!(without_entry.iter().any(|d| d.contains("audit_entries")) && without_entry.iter().any(|d| d.contains("audit tree")), "{without_entry:?}");
        let without_erasure = count(&[rows[0].clone(), rows[2].clone(), rows[3].clone()]).differences(&stated, payload);
        assert!(without_erasure.iter().any(|d| d.contains("ledger")), "{without_erasure:?}");
        let without_key = count(&rows[1..]).differences(&stated, payload);
        assert!(without_key.iter().any(|d| d.contains("KEK")), "{without_key:?}");
        let gap = count(&[rows[0].clone(), rows[1].clone(), audit(0, 1), audit(2, 2)]).differences(&stated, payload);
        assert!(gap.iter().any(|d| d.contains("entry 2 comes out of order")), "{gap:?}");
    }

    #[test]
    fn other_kinds_are_not_rows() {
        assert_eq!(Row::decode(0x80, b"whatever").expect("test"), None);
    }
}
