//! Storage for Valv: the backend-neutral [`Store`] trait, its SQLite implementation, and the
//! [`vault::Vault`] that encrypts, indexes and versions resources on top of any `Store`.
//!
//! Backends see only sealed bytes, blind-index tokens, wrapped keys and plain ids and times; no
//! backend type crosses the trait, and nothing above this crate branches on the backend.

pub mod disk;
pub mod dump;
mod error;
mod keycache;
pub mod rewrap;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod testkit;
pub mod vault;

pub use error::StoreError;

use async_trait::async_trait;
pub use valv_crypto::WrappedKey;

/// A blind-index token (truncated HMAC-SHA256).
pub type Token = [u8; 16];

/// One stored version of a resource, as the backend holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    /// The owning patient (whose data key sealed `body`), or `None` for tenant data.
    pub patient: Option<String>,
    pub deleted: bool,
    /// Milliseconds since the Unix epoch.
    pub last_updated: i64,
    /// The sealed resource; empty for a deletion.
    pub body: Vec<u8>,
}

/// What the current state of a resource must be for a write to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The resource must not exist yet (create).
    Absent,
    /// The current version must be exactly this one (update, delete).
    Version(u64),
}

/// One write of a commit: a new version and the search tokens of the new current state.
#[derive(Debug, Clone)]
pub struct Write {
    pub expect: Expect,
    pub version: StoredVersion,
    pub tokens: Vec<Token>,
    /// The wrapped form of the patient data key the body was sealed with, as this process last
    /// read it (None: the tenant key, or no body): the commit fails with
    /// [`StoreError::KeyChanged`] unless the version's patient's key is still stored so.
    pub sealed_with: Option<std::sync::Arc<[u8]>>,
    /// For a create (`Expect::Absent`): applies only if no current resource matches this filter
    /// — a conditional create — else the commit fails with [`StoreError::Matched`]. Checked in the
    /// commit's transaction, serialised with every other conditional create of the same filter,
    /// so that concurrent ones make one resource.
    pub unless: Option<Filter>,
}

/// A resource's place without its content: enough to locate the patient and decide on access
/// before anything is decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub id: String,
    pub version: u64,
    pub patient: Option<String>,
    pub deleted: bool,
    pub last_updated: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    Created,
    LastUpdatedAsc,
    LastUpdatedDesc,
}

/// Candidate selection for a search: every group must match (AND), a group matches when the
/// resource has any of its tokens (OR).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub resource_type: String,
    pub token_groups: Vec<Vec<Token>>,
    pub ids: Option<Vec<String>>,
    /// Each inner list is ORed ranges `[from, to)` of last-updated milliseconds; lists are ANDed.
    pub last_updated: Vec<Vec<(i64, i64)>>,
    pub order: Order,
    /// At most this many candidates, the first in `order` (None: all).
    pub limit: Option<usize>,
}

/// A service account's API key, stored by hash only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub hash: [u8; 32],
    pub created: i64,
    pub revoked: Option<i64>,
    /// MAC over the fields above under the server's record key: a row inserted or edited
    /// directly in the database does not verify.
    pub mac: Vec<u8>,
    /// SMART scopes, space-separated ('' = none); part of the MAC when not empty.
    pub scopes: String,
}

/// A break-glass or remote-support grant as stored: sealed whole, versioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub id: String,
    /// 1 when made; each change adds one (a stale writer gets a conflict).
    pub version: u64,
    pub sealed: Vec<u8>,
}

/// One audit entry as the backend holds it: its Merkle leaf hash (over the canonical plaintext)
/// and the entry sealed with the audit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub leaf_hash: [u8; 32],
    pub sealed: Vec<u8>,
    /// Blind-index token of the patient the entry concerns, so a patient's access log is found
    /// without decrypting the whole log.
    pub patient_token: Option<Token>,
    /// The entry's search query and salt, sealed apart from the entry (the entry holds only
    /// their hash, `query_sha256`), so showing an entry never shows the query; `None` when the
    /// entry has no query or predates this record.
    pub query_sealed: Option<Vec<u8>>,
}

/// A tile of the audit tree's interior hashes (C2SP tlog-tiles, height 8; docs/AUDIT.md): up to
/// 256 consecutive node hashes of tree level `8 * level`, starting at node `256 * index` (level
/// 0: leaf hashes). Full with 256 hashes; the last tile of a level may be partial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditTile {
    pub level: u8,
    pub index: u64,
    pub hashes: Vec<[u8; 32]>,
}

/// A signed checkpoint of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub size: u64,
    pub root: [u8; 32],
    /// The C2SP signed note.
    pub note: String,
}

/// A user account as the backend holds it: sealed (the server decides its content), found by a
/// blind token of the user name or by the hash of a pending enrollment token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub username_token: Token,
    /// Grows by one with every update; updates name the version they replace.
    pub version: u64,
    pub sealed: Vec<u8>,
    pub enrollment_hash: Option<[u8; 32]>,
}

/// What erasing a patient removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedPatient {
    pub seq: u64,
    /// Resources they owned and versions of them, left as unreadable ciphertext.
    pub resources: u64,
    pub versions: u64,
    /// Search-token rows deleted.
    pub tokens: u64,
    /// Whether a data key was destroyed (a patient with no resource may have none).
    pub key_destroyed: bool,
    /// The objects of the patient's files, whose rows were deleted: the caller deletes them
    /// from the file store (they are unreadable already: their keys were sealed under the
    /// destroyed data key).
    pub objects: Vec<String>,
}

/// The stored content of a file-backed `Binary` (issue 13): where its sealed object is, the
/// file's own key sealed under the patient's data key (so a rotation re-seals it and an erasure
/// leaves it unreadable), and what it holds. Files never change: one row per Binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    /// The Binary whose content this is.
    pub binary_id: String,
    /// The object's name in the file store: random, unrelated to patient or Binary.
    pub object: String,
    pub patient: String,
    /// The file key, sealed under the patient's data key and bound to the Binary and patient.
    pub sealed_key: Vec<u8>,
    /// Plaintext bytes.
    pub size: u64,
    pub sha256: [u8; 32],
    /// `pending`, `clean`, `infected`, `unscannable` (over the scanner's limits) or `failed`.
    pub scan: String,
    pub created: i64,
}

/// A resumable upload in progress (issue 13): the parts received so far are objects of their
/// own (`<object>-<part>`), sealed under the file's key, which is sealed under the patient's data
/// key as a file's is. Ephemeral: not in backups; a rotation of the patient's key ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub id: String,
    pub binary_id: String,
    pub object: String,
    pub patient: String,
    /// The person or service that started it (only they may continue it).
    pub agent: String,
    pub sealed_key: Vec<u8>,
    pub content_type: String,
    /// The declared length, and the bytes received in whole parts so far.
    pub length: u64,
    pub received: u64,
    pub parts: u32,
    pub created: i64,
    pub expires: i64,
}

/// An alert of the detection engine (issue 15): the alert itself sealed with the audit key
/// (rule, subject, explanation, evidence), with what lists need beside it. Alerts are only ever
/// added; they are in backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    /// `<leaf index>-<rule>`: raising the same alert again stores nothing new.
    pub id: String,
    pub time: i64,
    pub rule: String,
    pub severity: String,
    pub sealed: Vec<u8>,
}

/// A case file of the detection work (issue 15): a systematic review (`kind` `review`), an
/// incident (`incident`) or a blocked address (`block`), sealed with the audit key (the AAD
/// names kind, id and version). Changed only by naming the version replaced, like grants; never
/// removed; in backups. Each change is also an audit entry, which is where its history lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseRow {
    pub kind: String,
    pub id: String,
    /// 1 when created; grows by one with every change.
    pub version: u64,
    pub sealed: Vec<u8>,
}

/// How far the detection engine has read the audit log: `next` is the first leaf index it has
/// not seen; `state` its rules' state (sealed) as of leaf index `state_at` (≤ `next`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectionRow {
    pub next: u64,
    pub state_at: u64,
    pub state: Vec<u8>,
}

/// A short-lived ticket to a file (issue 13): only the SHA-256 of its secret is kept. Tickets
/// are ephemeral, like sessions: they are not in backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketRow {
    pub hash: [u8; 32],
    /// A public handle (audit entries name it; the secret is never logged).
    pub id: String,
    pub binary_id: String,
    pub version: u64,
    /// The person it was issued to (a user id).
    pub agent: String,
    pub purpose: String,
    pub expires: i64,
    /// Requests it allows, and those made so far.
    pub uses: u32,
    pub used: u32,
    pub revoked: bool,
    pub created: i64,
    /// MAC over the fields that never change (rows forged in the database are refused).
    pub mac: Vec<u8>,
}

/// A request to erase a patient, waiting for a second person (or decided). `sealed` holds the
/// legal basis and who asked, sealed and bound to the id and patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRequestRow {
    pub id: String,
    pub patient: String,
    pub sealed: Vec<u8>,
    pub requested_at: i64,
    pub state: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
}

/// One erasure as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureRow {
    pub seq: u64,
    pub patient: String,
    pub erased_at: i64,
}

/// The wrapped keys under one KEK version (`valv keys status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCensus {
    pub provider: String,
    pub kek_id: String,
    pub kek_version: u32,
    pub keys: u64,
    /// When the oldest of them was wrapped (ms since the epoch).
    pub oldest_wrap: i64,
}

/// A login session: only the hash of its bearer token is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub token_hash: [u8; 32],
    pub user_id: String,
    pub created: i64,
    pub last_seen: i64,
    /// MAC over token hash, user id and creation time (rows forged in the database are refused).
    pub mac: Vec<u8>,
}

/// The background duties that exactly one of the servers sharing a store carries out
/// ([`Store::lead`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Duty {
    /// Folding audit entries into the tree and signing checkpoints.
    Integration,
    /// Reading the audit log through the detection rules.
    Detection,
    /// Forwarding the audit log to the SIEM collector.
    Forwarding,
}

/// The persistence contract every backend implements (SQLite here, PostgreSQL later).
#[async_trait]
pub trait Store: Send + Sync {
    /// A wrapped key by name (`tenant`, `blind-index`, `patient:<id>`).
    async fn get_key(&self, name: &str) -> Result<Option<WrappedKey>, StoreError>;
    /// Stores a wrapped key unless one exists under the name; returns the one that is stored.
    async fn put_key_if_absent(&self, name: &str, key: &WrappedKey, now: i64) -> Result<WrappedKey, StoreError>;
    /// Up to `limit` wrapped keys not under this provider, KEK id and version (what a rotation
    /// still has to rewrap), by name.
    async fn keys_not_under(&self, provider: &str, kek_id: &str, kek_version: u32, limit: usize) -> Result<Vec<(String, WrappedKey)>, StoreError>;
    /// Replaces wrapped keys, each only if it is still stored as the old one (a key rewrapped by
    /// another process meanwhile is left alone), durably and in one transaction; returns how
    /// many were replaced.
    async fn rewrap_keys(&self, changes: &[(String, WrappedKey, WrappedKey)], now: i64) -> Result<usize, StoreError>;
    /// Every version sealed under a patient's data key (the versions whose patient is them, not
    /// deletions), with a handle for [`Store::replace_patient_key`].
    async fn patient_versions(&self, patient: &str) -> Result<Vec<(i64, StoredVersion)>, StoreError>;
    /// Rotates a patient's data key in one durable transaction: the key stored as `old` is
    /// replaced by `new` (created now) and each of the patient's versions gets its body re-sealed
    /// under it. [`StoreError::KeyChanged`] if the key is no longer stored as `old`;
    /// [`StoreError::Conflict`] if `bodies` is not exactly the patient's versions (one was
    /// written meanwhile). Nothing changes on failure.
    /// Each of their file keys (by object) is re-sealed too: `file_keys` must be exactly the
    /// patient's files, else [`StoreError::Conflict`].
    async fn replace_patient_key(&self, patient: &str, old: &WrappedKey, new: &WrappedKey, bodies: &[(i64, Vec<u8>)], file_keys: &[(String, Vec<u8>)], now: i64) -> Result<(), StoreError>;
    /// Records a file, only if the patient's data key is still stored as `sealed_with` (the key
    /// its file key was sealed under), else [`StoreError::KeyChanged`]; a conflict if the Binary
    /// has a file already.
    async fn put_file(&self, file: &FileRow, sealed_with: &[u8]) -> Result<(), StoreError>;
    /// The file of a Binary, if it has one.
    async fn file(&self, binary_id: &str) -> Result<Option<FileRow>, StoreError>;
    /// Every file of a patient (what a key rotation re-seals), by object.
    async fn patient_files(&self, patient: &str) -> Result<Vec<FileRow>, StoreError>;
    /// Sets a file's scan status; false if no such file.
    async fn set_file_scan(&self, object: &str, scan: &str) -> Result<bool, StoreError>;
    /// Up to `limit` files whose scan status is `pending`, oldest first.
    async fn files_to_scan(&self, limit: usize) -> Result<Vec<FileRow>, StoreError>;
    /// Forgets a file whose Binary was never committed (a failed upload); false if none.
    async fn delete_file(&self, object: &str) -> Result<bool, StoreError>;
    /// How many wrapped keys each (provider, KEK id, version) holds, and the oldest wrap.
    async fn key_census(&self) -> Result<Vec<KeyCensus>, StoreError>;
    /// When a named key was created, if it exists.
    async fn key_created(&self, name: &str) -> Result<Option<i64>, StoreError>;
    /// Erases a patient in one durable transaction: records the erasure (next sequence number),
    /// destroys their data key, deletes the search tokens of the resources they own and their
    /// file rows (the objects are the caller's to delete); their sealed versions stay, unreadable. From then on no key is ever created under their name
    /// ([`Store::put_key_if_absent`] refuses it). A conflict if they were erased already.
    async fn erase_patient(&self, patient: &str, erased_at: i64) -> Result<ErasedPatient, StoreError>;
    /// The resources a patient owns that are not deleted, as (type, id), by type then id.
    async fn resources_of(&self, patient: &str) -> Result<Vec<(String, String)>, StoreError>;
    /// Records a request to erase a patient (the first of the two people); a conflict if the id exists.
    async fn insert_erasure_request(&self, request: &ErasureRequestRow) -> Result<(), StoreError>;
    /// Every erasure request, newest first.
    async fn erasure_requests(&self) -> Result<Vec<ErasureRequestRow>, StoreError>;
    /// Moves a pending request to `state` (decided by `by` at `at`); false if it was not pending.
    async fn decide_erasure_request(&self, id: &str, state: &str, by: &str, at: i64) -> Result<bool, StoreError>;
    /// Puts an approved request back to pending (its erasure was refused); false if not approved.
    async fn reopen_erasure_request(&self, id: &str) -> Result<bool, StoreError>;
    /// The erasures with a sequence number above `after` (0: all of them), in order.
    async fn erasures(&self, after: u64) -> Result<Vec<ErasureRow>, StoreError>;
    /// How many resources a patient owns (deleted ones included) and the newest change among
    /// them, if any.
    async fn patient_footprint(&self, patient: &str) -> Result<(u64, Option<i64>), StoreError>;
    /// Current state of a resource without its body.
    async fn locate(&self, resource_type: &str, id: &str) -> Result<Option<Located>, StoreError>;
    /// The current version (a deletion has an empty body).
    async fn read_current(&self, resource_type: &str, id: &str) -> Result<Option<StoredVersion>, StoreError>;
    async fn read_version(&self, resource_type: &str, id: &str, version: u64) -> Result<Option<StoredVersion>, StoreError>;
    /// Current versions of many resources of one type, in the order of `ids` (missing ones skipped).
    async fn read_many(&self, resource_type: &str, ids: &[String]) -> Result<Vec<StoredVersion>, StoreError>;
    /// Versions newest first: of one resource when `id` is given, else of a whole type.
    /// Returns the page and the total number of versions.
    async fn history(&self, resource_type: &str, id: Option<&str>, offset: usize, count: usize)
        -> Result<(Vec<StoredVersion>, usize), StoreError>;
    /// How many versions of `resource_type` are stored (what `history` counts), asked every
    /// second for the access-relevant types: a backend makes it cheap where those types are few
    /// beside the rest.
    async fn version_count(&self, resource_type: &str) -> Result<usize, StoreError> {
        Ok(self.history(resource_type, None, 0, 0).await?.1)
    }
    /// Applies all writes atomically and durably (fsync) or none of them.
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Candidates for a search, in the filter's order, deleted resources excluded.
    async fn search(&self, filter: &Filter) -> Result<Vec<Located>, StoreError>;
    /// A search's candidates and the current versions of those `page` picks from them (ids of
    /// `filter`'s type), read in one snapshot where the backend has it cheaply (SQLite: one read
    /// transaction); by default the search and then the reads.
    async fn search_and_read(&self, filter: &Filter, page: &(dyn for<'c> Fn(&'c [Located]) -> Vec<String> + Sync))
        -> Result<(Vec<Located>, Vec<StoredVersion>), StoreError> {
        let candidates = self.search(filter).await?;
        let ids = page(&candidates);
        let read = self.read_many(&filter.resource_type, &ids).await?;
        Ok((candidates, read))
    }
    async fn insert_api_key(&self, record: &ApiKeyRecord) -> Result<(), StoreError>;
    async fn find_api_key(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError>;
    async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Marks a key revoked (with the record's new MAC); false if no active key has that id.
    async fn revoke_api_key(&self, id: &str, revoked: i64, mac: &[u8]) -> Result<bool, StoreError>;
    /// Adds a grant (version 1) or replaces the one at `version - 1`; a conflict otherwise.
    async fn put_grant(&self, grant: &GrantRow) -> Result<(), StoreError>;
    async fn grants(&self) -> Result<Vec<GrantRow>, StoreError>;
    /// Adds a user; a conflict if the id or user name token exists.
    async fn insert_user(&self, user: &UserRow) -> Result<(), StoreError>;
    /// Replaces a user whose stored version is `user.version - 1`; a conflict otherwise.
    async fn update_user(&self, user: &UserRow) -> Result<(), StoreError>;
    async fn user(&self, id: &str) -> Result<Option<UserRow>, StoreError>;
    async fn user_by_name(&self, username_token: &Token) -> Result<Option<UserRow>, StoreError>;
    async fn user_by_enrollment(&self, hash: &[u8; 32]) -> Result<Option<UserRow>, StoreError>;
    async fn users(&self) -> Result<Vec<UserRow>, StoreError>;
    async fn insert_session(&self, session: &SessionRow) -> Result<(), StoreError>;
    async fn session(&self, token_hash: &[u8; 32]) -> Result<Option<SessionRow>, StoreError>;
    /// Records activity on a session (idle timeout).
    async fn touch_session(&self, token_hash: &[u8; 32], last_seen: i64) -> Result<(), StoreError>;
    /// Ends one session; false if there was none.
    async fn delete_session(&self, token_hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// Removes sessions created before `created_before` (past their absolute lifetime).
    async fn delete_sessions_before(&self, created_before: i64) -> Result<usize, StoreError>;
    /// Ends every session of a user; returns how many there were.
    async fn delete_sessions_of(&self, user_id: &str) -> Result<usize, StoreError>;
    /// Stores a new upload session.
    async fn put_upload(&self, upload: &UploadRow) -> Result<(), StoreError>;
    async fn upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError>;
    /// Records a part: `received` and `parts` move on only if `received` is still `from`
    /// (another request did not store a part meanwhile); whether it did.
    async fn advance_upload(&self, id: &str, from: u64, received: u64, parts: u32) -> Result<bool, StoreError>;
    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError>;
    /// Up to `limit` sessions that expired before `now`.
    async fn expired_uploads(&self, now: i64, limit: usize) -> Result<Vec<UploadRow>, StoreError>;
    /// The detection engine's progress, if it has saved any.
    async fn detection(&self) -> Result<Option<DetectionRow>, StoreError>;
    /// Adds `alerts` (an id already stored is left as it is) and saves the progress, in one
    /// transaction, if the stored progress is still at `from` (`None`: none saved yet); false,
    /// changing nothing, if another detector moved it meanwhile.
    async fn save_detection(&self, from: Option<u64>, progress: &DetectionRow, alerts: &[AlertRow]) -> Result<bool, StoreError>;
    /// Up to `limit` alerts, newest first (by time, then id), after the alert `before` names
    /// (its time and id: the last of the previous page) or from the newest.
    async fn alerts(&self, before: Option<(i64, &str)>, limit: usize) -> Result<Vec<AlertRow>, StoreError>;
    async fn alert(&self, id: &str) -> Result<Option<AlertRow>, StoreError>;
    /// Stores a case: version 1 creates it, version n replaces n − 1 (`Conflict` otherwise).
    async fn put_case(&self, case: &CaseRow) -> Result<(), StoreError>;
    async fn case(&self, kind: &str, id: &str) -> Result<Option<CaseRow>, StoreError>;
    /// Every case of a kind, by id.
    async fn cases(&self, kind: &str) -> Result<Vec<CaseRow>, StoreError>;
    /// Stores a new ticket.
    async fn put_ticket(&self, ticket: &TicketRow) -> Result<(), StoreError>;
    /// Spends one use of the ticket with this hash if it is unexpired at `now`, not revoked and
    /// not used up (atomically: concurrent uses never exceed `uses`); `Ok((row, true))` with the
    /// row after the use, `Ok((row, false))` for a ticket that may not be used, `None` if unknown.
    async fn use_ticket(&self, hash: &[u8; 32], now: i64) -> Result<Option<(TicketRow, bool)>, StoreError>;
    /// Revokes one ticket by its hash; false if unknown or revoked already.
    async fn revoke_ticket(&self, hash: &[u8; 32]) -> Result<bool, StoreError>;
    /// Revokes every live ticket of a Binary issued to `agent`; how many.
    async fn revoke_tickets(&self, binary_id: &str, agent: &str) -> Result<usize, StoreError>;
    /// Deletes tickets that expired before `before`; how many.
    async fn delete_tickets_before(&self, before: i64) -> Result<usize, StoreError>;
    /// Appends audit entries durably (fsync) in order; returns the leaf index of the first.
    /// There is no call that edits or removes entries.
    async fn append_audit(&self, rows: Vec<AuditRow>) -> Result<u64, StoreError>;
    /// Entries with leaf index in `[from, to)`, in order, each with its index (a gap left by a
    /// deleted row shows as a skipped index; callers decide what that means).
    async fn audit_entries(&self, from: u64, to: u64) -> Result<Vec<(u64, AuditRow)>, StoreError>;
    /// The size of the log: one more than the highest leaf index (0 when empty).
    async fn audit_size(&self) -> Result<u64, StoreError>;
    /// The leaf indices and rows of up to `limit` entries carrying this patient token with index
    /// in `range`, in index order, or newest first when `newest_first` (a patient's entries page
    /// by page: the by-patient index is ordered by leaf index in both backends).
    async fn audit_entries_for(&self, patient_token: &Token, range: std::ops::Range<u64>, limit: usize, newest_first: bool)
        -> Result<Vec<(u64, AuditRow)>, StoreError>;
    /// Up to `limit` leaf indices of entries carrying a patient token that `audit_entries_for`
    /// would not find: SQLite keeps its by-patient lookup in a table of its own, where a removed
    /// pair would hide an entry from the patient's access log while the log itself still
    /// verifies; `valv audit verify` reports these. PostgreSQL's lookup is an index of the
    /// entries themselves and finds none.
    async fn patient_entries_unfound(&self, _limit: usize) -> Result<Vec<u64>, StoreError> {
        Ok(Vec::new())
    }
    /// Leaf hashes with index in `[from, to)`, in order; an error if any index in the range is
    /// missing (so a tree is never built over a log with a hole in it).
    async fn audit_leaves(&self, from: u64, to: u64) -> Result<Vec<[u8; 32]>, StoreError>;
    /// Stores tiles of the audit tree durably (fsync), all or none, each replacing the one
    /// stored under its (level, index) (a partial tile grows until it is full). Only the
    /// integrator writes tiles.
    async fn put_audit_tiles(&self, tiles: Vec<AuditTile>) -> Result<(), StoreError>;
    /// The stored tiles among `keys` ((level, index) pairs), in the order asked; absent ones are
    /// left out. One point read per key.
    async fn audit_tiles(&self, keys: &[(u8, u64)]) -> Result<Vec<AuditTile>, StoreError>;
    /// Records a signed checkpoint (durably); sizes only grow.
    async fn save_checkpoint(&self, checkpoint: &StoredCheckpoint) -> Result<(), StoreError>;
    /// The checkpoint of the largest size, if any.
    async fn latest_checkpoint(&self) -> Result<Option<StoredCheckpoint>, StoreError>;
    /// The checkpoint signed for exactly this size, if any.
    async fn checkpoint_at(&self, size: u64) -> Result<Option<StoredCheckpoint>, StoreError>;
    /// Every stored checkpoint, smallest size first.
    async fn checkpoints(&self) -> Result<Vec<StoredCheckpoint>, StoreError>;
    /// Whether this process carries out `duty` now — of the servers sharing the store, the only
    /// one that does. SQLite: always (one serving process per file). PostgreSQL: the servers
    /// sharing a database elect one per duty by a session advisory lock held on a connection of
    /// their own; when that process dies its connection closes, the lock is free, and the next
    /// server to ask takes over.
    async fn lead(&self, duty: Duty) -> Result<bool, StoreError> {
        let _ = duty;
        Ok(true)
    }
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The backend's name (`sqlite`), for manifests and messages.
    fn backend(&self) -> &'static str;
    /// Sends every table (sessions excepted, see [`dump`]) as one consistent snapshot, in
    /// batches, while the store keeps serving: data keys, each resource followed by its versions,
    /// API keys, users, grants, erasures, erasure requests, audit entries, tiles, checkpoints.
    /// A restore loads the rows into a new store with the backend's own bulk loader (SQLite:
    /// [`sqlite::FreshLoad`]), before any store is opened on it.
    async fn snapshot(&self, out: tokio::sync::mpsc::Sender<Vec<dump::Row>>) -> Result<(), StoreError>;
}
