//! The vault: resources in, sealed versions and blind-index tokens out, over any [`Store`].
//!
//! Each resource version is sealed with the data key of the patient whose compartment owns it
//! (or the tenant key), its additional data binding purpose, type, id, version and patient.
//! Search values become HMAC tokens under the blind-index key. Data keys are stored wrapped by the
//! key provider's KEK and cached unwrapped for a bounded time.

use crate::keycache::{CachedKey, KeyCache};
use crate::{Expect, Filter, Located, Order, Store, StoreError, StoredVersion, Token, Write};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use valv_crypto::{Aad, BlindIndexKey, DataKey, KeyProvider};
use valv_fhir::search::{SearchRequest, SortOrder, Test, TotalMode};
use valv_fhir::{compartment, date, r4, search};

const TENANT_KEY: &str = "tenant";

/// The extension a file-backed Binary's FHIR JSON carries in `meta` (size, SHA-256, scan status;
/// R4's Binary has no `extension` of its own): the server's to state, so a client's copy of it is
/// never stored.
pub const FILE_EXTENSION: &str = "https://valv.dev/fhir/StructureDefinition/file";

/// Stored versions that failed to authenticate, over the process's life (for metrics).
static INTEGRITY_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many stored versions have failed to authenticate since the process started.
pub fn integrity_failures() -> u64 {
    INTEGRITY_FAILURES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Search candidates whose decrypted body did not match the query (index rows edited or copied
/// in the database), over the process's life (for metrics).
static INDEX_MISMATCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many search candidates have failed their re-check against the query since the process started.
pub fn index_mismatches() -> u64 {
    INDEX_MISMATCHES.load(std::sync::atomic::Ordering::Relaxed)
}

const BLIND_KEY: &str = "blind-index";

/// A resource version as the vault hands it out: decrypted, with its place.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub last_updated: i64,
    pub deleted: bool,
    pub patient: Option<String>,
    /// `None` for a deletion.
    pub body: Option<Value>,
}

/// One change of a commit.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// A new resource (an id from [`new_id`], or the client's own for an update-as-create);
    /// with `unless`, only if nothing matches that condition when it commits (see
    /// [`Vault::condition`]), else [`StoreError::Matched`].
    Create { resource_type: String, id: String, body: Value, unless: Option<crate::Filter> },
    Update { resource_type: String, id: String, body: Value, if_match: Option<u64> },
    Delete { resource_type: String, id: String, if_match: Option<u64> },
}

impl WriteOp {
    fn target(&self) -> (&str, &str) {
        match self {
            WriteOp::Create { resource_type, id, .. }
            | WriteOp::Update { resource_type, id, .. }
            | WriteOp::Delete { resource_type, id, .. } => (resource_type, id),
        }
    }
}

/// What a committed change produced.
#[derive(Debug, Clone)]
pub struct Committed {
    pub resource: Resource,
    /// True if the operation created the resource.
    pub created: bool,
    /// False for a delete of something already deleted (nothing was written).
    pub changed: bool,
}

/// A page of search results.
#[derive(Debug)]
pub struct SearchPage {
    /// How many matches the caller may see, when they were counted (see [`FoundPage::total`]).
    pub total: Option<usize>,
    /// Whether matches follow this page.
    pub more: bool,
    pub resources: Vec<Resource>,
}

/// A page of search results as stored: each result's plaintext JSON exactly as it was written,
/// so that a searchset can carry the bytes as a read does, and only a caller that needs a
/// resource's tree (includes, `_elements`) builds it.
#[derive(Debug)]
pub struct FoundPage {
    /// How many matches the caller may see, not only this page: always for `_total=accurate`,
    /// a sort of the search's own and `_summary=count`; otherwise only when the caller may see at
    /// most [`search::EXACT_TOTAL_UP_TO`] matches (the rest were not listed).
    pub total: Option<usize>,
    /// Whether matches follow this page.
    pub more: bool,
    pub found: Vec<Found>,
}

impl FoundPage {
    /// A page of a search that cannot match anything.
    pub fn empty() -> Self {
        FoundPage { total: Some(0), more: false, found: Vec::new() }
    }

    fn counted(total: usize, req: &SearchRequest, found: Vec<Found>) -> Self {
        FoundPage { total: Some(total), more: !req.count_only && req.offset.saturating_add(req.count) < total, found }
    }
}

/// One search result (never a deletion) with its plaintext JSON.
#[derive(Debug)]
pub struct Found {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub last_updated: i64,
    pub patient: Option<String>,
    pub json: Vec<u8>,
}

impl Found {
    fn new(v: StoredVersion, json: Vec<u8>) -> Self {
        Found { resource_type: v.resource_type, id: v.id, version: v.version, last_updated: v.last_updated, patient: v.patient, json }
    }

    /// A copy of the result with its JSON parsed.
    pub fn to_resource(&self) -> Result<Resource, StoreError> {
        Ok(Resource {
            resource_type: self.resource_type.clone(),
            id: self.id.clone(),
            version: self.version,
            last_updated: self.last_updated,
            deleted: false,
            patient: self.patient.clone(),
            body: Some(self.body()?),
        })
    }

    /// The JSON parsed.
    pub fn body(&self) -> Result<Value, StoreError> {
        serde_json::from_slice(&self.json).map_err(|e| StoreError::Integrity(format!("stored JSON is unreadable: {e}")))
    }
}

/// Fresh randomness; the operating system's generator is the only source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| StoreError::Backend(format!("no randomness: {e}")))?;
    Ok(b)
}

/// Randomness for identifiers only (resource, audit-entry and request ids): rand's per-thread
/// ChaCha12 generator, seeded and regularly reseeded from the operating system's, so an id costs
/// no system call (two of them per audited read were measurable). Keys, nonces and salts come
/// from [`random_bytes`].
pub fn id_bytes<const N: usize>() -> [u8; N] {
    use rand::Rng;
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// A server-assigned logical id (a random UUID).
pub fn new_id() -> Result<String, StoreError> {
    Ok(valv_fhir::id::uuid_from_bytes(id_bytes()))
}

/// A candidate's sort values, with its row and plaintext.
type Keyed = (Vec<Option<valv_fhir::search::SortValue>>, (StoredVersion, Vec<u8>));

/// Counts and logs a search result the index selected but the resource does not match (the
/// index is not authenticated: a token row copied in the database).
fn index_mismatch(resource_type: &str) {
    INDEX_MISMATCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(resource_type, "search index entry does not match its resource; ignored (index tampering?)");
}

/// Where a version read back lies, to decide it as a listed candidate was decided.
fn located(v: &StoredVersion) -> Located {
    Located { id: v.id.clone(), version: v.version, patient: v.patient.clone(), deleted: v.deleted, last_updated: v.last_updated }
}

pub struct Vault {
    store: Arc<dyn Store>,
    provider: Arc<dyn KeyProvider>,
    blind: BlindIndexKey,
    tenant: DataKey,
    cache: KeyCache,
    /// Patients erased so far (as last read from the store): their keys are never used again,
    /// even from the cache, and nothing is written under their id.
    erased: std::sync::RwLock<HashSet<String>>,
    /// The highest erasure sequence number taken in (refreshes read only what is newer).
    erasures_seen: std::sync::atomic::AtomicU64,
}

/// What a file key is sealed to: its Binary and patient (a key moved to another row fails).
fn file_key_aad<'a>(binary_id: &'a str, patient: &'a str) -> Aad<'a> {
    Aad { purpose: "file-key", resource_type: "Binary", id: binary_id, version: 1, patient }
}

fn seal_file_key_with(patient_key: &DataKey, binary_id: &str, patient: &str, file_key: &DataKey) -> Result<Vec<u8>, StoreError> {
    Ok(valv_crypto::seal(patient_key, random_bytes()?, &file_key_aad(binary_id, patient), file_key.expose()))
}

fn open_file_key_with(patient_key: &DataKey, binary_id: &str, patient: &str, sealed: &[u8]) -> Result<DataKey, StoreError> {
    let plain = zeroize::Zeroizing::new(valv_crypto::open(patient_key, &file_key_aad(binary_id, patient), sealed).map_err(|e| file_key_failure(binary_id, OpenFailure::Crypto(e)))?);
    DataKey::from_slice(&plain).map_err(|e| StoreError::Integrity(format!("the key of the file of Binary/{binary_id}: {e}")))
}

/// Why [`Vault::open_under`] opened nothing: no key, or the sealed bytes do not authenticate.
enum OpenFailure {
    Store(StoreError),
    Crypto(valv_crypto::CryptoError),
}

/// A file key that does not open (counted as an integrity failure), or the store's error.
fn file_key_failure(binary_id: &str, e: OpenFailure) -> StoreError {
    match e {
        OpenFailure::Store(e) => e,
        OpenFailure::Crypto(e) => {
            INTEGRITY_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            StoreError::Integrity(format!("the key of the file of Binary/{binary_id} does not authenticate: {e}"))
        }
    }
}

/// Removes a client's copy of [`FILE_EXTENSION`] (it would claim a scan status it never had).
fn strip_file_extension(body: &mut Value) {
    let Some(obj) = body.get_mut("meta").and_then(Value::as_object_mut) else { return };
    let Some(list) = obj.get_mut("extension").and_then(Value::as_array_mut) else { return };
    list.retain(|e| e.get("url").and_then(Value::as_str) != Some(FILE_EXTENSION));
    if list.is_empty() {
        obj.remove("extension");
    }
}

/// What one commit writes, for the checks that must see it before it is stored: the Patients it
/// writes (others may be placed with them) and the Binaries, with the patient each will be of
/// (documents may point at them).
struct InCommit {
    patients: HashSet<String>,
    binaries: std::collections::HashMap<String, Option<String>>,
}

impl InCommit {
    fn of(ops: &[WriteOp]) -> Self {
        let mut written = InCommit { patients: HashSet::new(), binaries: Default::default() };
        for op in ops {
            if let WriteOp::Create { resource_type, id, body, .. } | WriteOp::Update { resource_type, id, body, .. } = op {
                match resource_type.as_str() {
                    "Patient" => {
                        written.patients.insert(id.clone());
                    }
                    "Binary" => {
                        written.binaries.insert(id.clone(), compartment::patients(resource_type, id, body).into_iter().next());
                    }
                    _ => {}
                }
            }
        }
        written
    }
}

fn erased(patient: &str) -> StoreError {
    StoreError::Gone(format!("the data of patient {patient} was erased"))
}

fn patient_key_name(patient: &str) -> String {
    format!("patient:{patient}")
}

impl Vault {
    /// Opens the vault, creating the tenant and blind-index keys on first use.
    pub async fn open(store: Arc<dyn Store>, provider: Arc<dyn KeyProvider>, now: i64) -> Result<Self, StoreError> {
        let tenant = load_or_create_key(&*store, &*provider, TENANT_KEY, now).await?;
        let blind = BlindIndexKey::new(load_or_create_key(&*store, &*provider, BLIND_KEY, now).await?);
        let vault = Vault { store, provider, blind, tenant, cache: KeyCache::new(100_000, Duration::from_secs(300)), erased: Default::default(), erasures_seen: Default::default() };
        vault.refresh_erasures().await?;
        Ok(vault)
    }

    /// Takes in erasures made by other processes (`valv erase`): their keys leave the cache.
    pub async fn refresh_erasures(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let rows = self.store.erasures(self.erasures_seen.load(Ordering::Acquire)).await?;
        let Some(last) = rows.last().map(|r| r.seq) else { return Ok(()) };
        let mut known = self.erased.write().map_err(|_| StoreError::Backend("erasure set lock poisoned".into()))?;
        for r in rows {
            self.cache.remove(&patient_key_name(&r.patient));
            known.insert(r.patient);
        }
        self.erasures_seen.fetch_max(last, Ordering::AcqRel);
        Ok(())
    }

    /// Whether a patient's data was erased (as last read; see [`Vault::refresh_erasures`]).
    pub fn is_erased(&self, patient: &str) -> bool {
        self.erased.read().is_ok_and(|e| e.contains(patient))
    }

    /// Erases a patient (see [`Store::erase_patient`]) and forgets their key in this process.
    pub async fn erase_patient(&self, patient: &str, now: i64) -> Result<crate::ErasedPatient, StoreError> {
        let erased = self.store.erase_patient(patient, now).await?;
        self.refresh_erasures().await?;
        Ok(erased)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key provider holding the KEKs that wrap the data keys.
    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    /// The blind-index token of a patient id in the audit log's patient index.
    pub fn audit_patient_token(&self, patient: &str) -> Token {
        self.blind.token("AuditEvent", "patient", patient)
    }

    /// A named non-patient data key (e.g. `audit`), created on first use.
    pub async fn named_key(&self, name: &str, now: i64) -> Result<DataKey, StoreError> {
        load_or_create_key(&*self.store, &*self.provider, name, now).await
    }

    /// A named non-patient data key, if it exists (never created here).
    pub async fn existing_named_key(&self, name: &str) -> Result<Option<DataKey>, StoreError> {
        match self.store.get_key(name).await? {
            Some(w) => Ok(Some(self.provider.unwrap(&w, name)?)),
            None => Ok(None),
        }
    }

    /// A new named data key; a conflict if the name is taken (by another process meanwhile).
    pub async fn create_named_key(&self, name: &str, now: i64) -> Result<DataKey, StoreError> {
        let fresh = DataKey::from_bytes(random_bytes()?);
        let wrapped = self.provider.wrap(&fresh, name, random_bytes()?)?;
        if self.store.put_key_if_absent(name, &wrapped, now).await? != wrapped {
            return Err(StoreError::Conflict(format!("a key named {name} exists already")));
        }
        Ok(fresh)
    }

    /// The data key sealing a patient's resources (created on first use) with its wrapped form,
    /// or the tenant key (no wrapped form: it never changes under a running server).
    async fn key_for(&self, patient: Option<&str>, now: i64) -> Result<(DataKey, Option<Arc<[u8]>>), StoreError> {
        let Some(p) = patient else { return Ok((self.tenant.clone(), None)) };
        if self.is_erased(p) {
            return Err(erased(p));
        }
        let name = patient_key_name(p);
        if let Some(k) = self.cache.get(&name) {
            return Ok((k.key, Some(k.wrapped)));
        }
        let (key, wrapped) = load_or_create_wrapped(&*self.store, &*self.provider, &name, now).await?;
        let wrapped: Arc<[u8]> = wrapped.ciphertext.into();
        self.cache.insert(&name, CachedKey { key: key.clone(), wrapped: wrapped.clone() });
        Ok((key, Some(wrapped)))
    }

    /// Forgets the cached keys of these patients: another process replaced one of them.
    fn forget_keys<'a>(&self, patients: impl Iterator<Item = &'a str>) {
        for p in patients {
            self.cache.remove(&patient_key_name(p));
        }
    }

    /// Gives a patient a new data key and re-seals every version of theirs under it, in one
    /// transaction (`valv keys rotate --patient`); returns how many versions were re-sealed.
    /// The old key is gone from the store once this returns (backups made before still hold
    /// it). A server with the old key cached notices at its next read or write of the patient
    /// and reads the new one ([`StoreError::KeyChanged`]); tried again if that server wrote
    /// meanwhile.
    pub async fn rotate_patient_key(&self, patient: &str, now: i64) -> Result<usize, StoreError> {
        if self.is_erased(patient) {
            return Err(erased(patient));
        }
        let name = patient_key_name(patient);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let old = self.store.get_key(&name).await?.ok_or_else(|| StoreError::NotFound(format!("a data key of patient {patient}")))?;
            let old_key = self.provider.unwrap(&old, &name)?;
            let new_key = DataKey::from_bytes(random_bytes()?);
            let new = self.provider.wrap(&new_key, &name, random_bytes()?)?;
            let mut bodies = Vec::new();
            for (handle, v) in self.store.patient_versions(patient).await? {
                let aad = resource_aad(&v);
                let plain = zeroize::Zeroizing::new(valv_crypto::open(&old_key, &aad, &v.body).map_err(|e| integrity_failure(&v, &e))?);
                bodies.push((handle, valv_crypto::seal(&new_key, random_bytes()?, &aad, &plain)));
            }
            let mut file_keys = Vec::new();
            for f in self.store.patient_files(patient).await? {
                let file_key = open_file_key_with(&old_key, &f.binary_id, &f.patient, &f.sealed_key)?;
                file_keys.push((f.object.clone(), seal_file_key_with(&new_key, &f.binary_id, &f.patient, &file_key)?));
            }
            match self.store.replace_patient_key(patient, &old, &new, &bodies, &file_keys, now).await {
                Ok(()) => {
                    self.cache.remove(&name);
                    return Ok(bodies.len());
                }
                Err(StoreError::KeyChanged(_) | StoreError::Conflict(_)) if attempt < 3 => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Records a file of `row.patient` (its `sealed_key` is filled in here): `file_key` sealed
    /// under the patient's current data key, bound to the Binary and patient. Sealed again if
    /// another process rotated the key meanwhile (twice at most).
    pub async fn put_file(&self, mut row: crate::FileRow, file_key: &DataKey, now: i64) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (key, wrapped) = self.key_for(Some(&row.patient), now).await?;
            let wrapped = wrapped.ok_or_else(|| StoreError::Backend("a patient key without its wrapped form".into()))?;
            row.sealed_key = seal_file_key_with(&key, &row.binary_id, &row.patient, file_key)?;
            match self.store.put_file(&row, &wrapped).await {
                Err(StoreError::KeyChanged(_)) if attempt < 3 => self.forget_keys(std::iter::once(row.patient.as_str())),
                other => return other,
            }
        }
    }

    /// A file's own key, opened with its patient's data key (read again from the store if the
    /// cached one was rotated meanwhile); fails loudly if it does not authenticate.
    pub async fn file_key(&self, row: &crate::FileRow, now: i64) -> Result<DataKey, StoreError> {
        self.open_sealed_file_key(&row.binary_id, &row.patient, &row.sealed_key, now).await
    }

    /// A file key for an upload in progress, sealed under the patient's current data key
    /// (bound to the Binary and patient as a stored file's is).
    pub async fn seal_file_key(&self, patient: &str, binary_id: &str, file_key: &DataKey, now: i64) -> Result<Vec<u8>, StoreError> {
        let (key, _) = self.key_for(Some(patient), now).await?;
        seal_file_key_with(&key, binary_id, patient, file_key)
    }

    /// Opens a file key sealed by [`Vault::seal_file_key`] or [`Vault::put_file`].
    pub async fn open_sealed_file_key(&self, binary_id: &str, patient: &str, sealed: &[u8], now: i64) -> Result<DataKey, StoreError> {
        let aad = file_key_aad(binary_id, patient);
        let plain = self.open_under(Some(patient), now, |key| valv_crypto::open(key, &aad, sealed)).await.map_err(|e| file_key_failure(binary_id, e))?;
        DataKey::from_slice(&zeroize::Zeroizing::new(plain)).map_err(|e| StoreError::Integrity(format!("the key of the file of Binary/{binary_id}: {e}")))
    }

    /// Opens what is sealed under a patient's data key (or the tenant key). The cached key may
    /// have been rotated by another process: on failure the stored one is read, and tried only
    /// if it is another key. The error is the last attempt's.
    async fn open_under(&self, patient: Option<&str>, now: i64, open: impl Fn(&DataKey) -> Result<Vec<u8>, valv_crypto::CryptoError>) -> Result<Vec<u8>, OpenFailure> {
        let (key, wrapped) = self.key_for(patient, now).await.map_err(OpenFailure::Store)?;
        match (open(&key), patient) {
            (Ok(plain), _) => Ok(plain),
            (Err(e), None) => Err(OpenFailure::Crypto(e)),
            (Err(e), Some(p)) => {
                self.forget_keys(std::iter::once(p));
                let (fresh, fresh_wrapped) = self.key_for(Some(p), now).await.map_err(OpenFailure::Store)?;
                if fresh_wrapped == wrapped {
                    return Err(OpenFailure::Crypto(e));
                }
                open(&fresh).map_err(OpenFailure::Crypto)
            }
        }
    }

    /// Where a resource is, without decrypting it.
    pub async fn locate(&self, resource_type: &str, id: &str) -> Result<Option<Located>, StoreError> {
        self.store.locate(resource_type, id).await
    }

    /// A stored version, still sealed: its place (patient, deleted) can be judged before it is
    /// opened. `version: None` gives the current one.
    pub async fn fetch(&self, resource_type: &str, id: &str, version: Option<u64>) -> Result<Option<StoredVersion>, StoreError> {
        match version {
            None => self.store.read_current(resource_type, id).await,
            Some(v) => self.store.read_version(resource_type, id, v).await,
        }
    }

    /// The plaintext JSON of a stored (not deleted) version; fails loudly if it does not
    /// authenticate under its patient's key and its own type, id and version.
    pub async fn open_bytes(&self, v: &StoredVersion, now: i64) -> Result<Vec<u8>, StoreError> {
        let aad = resource_aad(v);
        self.open_under(v.patient.as_deref(), now, |key| valv_crypto::open(key, &aad, &v.body)).await.map_err(|e| match e {
            OpenFailure::Store(e) => e,
            OpenFailure::Crypto(e) => integrity_failure(v, &e),
        })
    }

    /// Opens a stored version (a deletion has no body).
    pub async fn open_version(&self, v: StoredVersion, now: i64) -> Result<Resource, StoreError> {
        let body = if v.deleted {
            None
        } else {
            let plain = self.open_bytes(&v, now).await?;
            Some(serde_json::from_slice(&plain).map_err(|e| StoreError::Integrity(format!("stored JSON is unreadable: {e}")))?)
        };
        Ok(Resource {
            resource_type: v.resource_type,
            id: v.id,
            version: v.version,
            last_updated: v.last_updated,
            deleted: v.deleted,
            patient: v.patient,
            body,
        })
    }


    /// Versions newest first (of one resource, or of a type) and the total count.
    pub async fn history(&self, resource_type: &str, id: Option<&str>, offset: usize, count: usize, now: i64)
        -> Result<(Vec<Resource>, usize), StoreError> {
        let (rows, total) = self.store.history(resource_type, id, offset, count).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            // A type's history leaves out erased patients' versions (counted in `total` still:
            // the count comes from the rows); one resource's history of them is 410.
            if id.is_none() && r.patient.as_deref().is_some_and(|p| self.is_erased(p)) {
                continue;
            }
            out.push(self.open_version(r, now).await?);
        }
        Ok((out, total))
    }

    /// Applies every operation or none: validation, version checks, sealing and indexing all
    /// happen before the single atomic store commit.
    pub async fn commit(&self, ops: Vec<WriteOp>, now: i64) -> Result<Vec<Committed>, StoreError> {
        let mut seen = HashSet::new();
        for op in &ops {
            let (t, id) = op.target();
            if !seen.insert((t.to_string(), id.to_string())) {
                return Err(StoreError::Invalid(valv_fhir::FhirError::processing(format!(
                    "{t}/{id} is changed more than once in one request"
                ))));
            }
        }
        let mut writes = Vec::with_capacity(ops.len());
        let mut results = Vec::with_capacity(ops.len());
        let written = InCommit::of(&ops);
        for op in ops {
            let (write, committed) = self.prepare(op, &written, now).await?;
            writes.extend(write);
            results.push(committed);
        }
        if writes.is_empty() {
            return Ok(results);
        }
        // A patient key rotated or rewrapped by another process since it was cached: the
        // bodies are sealed again under the stored key (twice at most). The store takes the
        // writes by value, hence the copy kept for that case.
        let mut resealed = 0;
        loop {
            match self.store.commit(writes.clone()).await {
                Err(StoreError::KeyChanged(_)) if resealed < 2 => {
                    self.reseal(&mut writes, &results, now).await?;
                    resealed += 1;
                }
                other => return other.map(|()| results),
            }
        }
    }

    /// Seals each patient body of `writes` again with the patient's stored key.
    async fn reseal(&self, writes: &mut [Write], results: &[Committed], now: i64) -> Result<(), StoreError> {
        self.forget_keys(writes.iter().filter_map(|w| w.version.patient.as_deref()));
        for w in writes.iter_mut().filter(|w| w.sealed_with.is_some()) {
            let v = &mut w.version;
            let body = results
                .iter()
                .find(|c| c.resource.resource_type == v.resource_type && c.resource.id == v.id)
                .and_then(|c| c.resource.body.as_ref())
                .ok_or_else(|| StoreError::Backend(format!("{}/{}: no body to seal again", v.resource_type, v.id)))?;
            let plain = serde_json::to_vec(body).map_err(|e| StoreError::Backend(format!("serialising: {e}")))?;
            let (key, wrapped) = self.key_for(v.patient.as_deref(), now).await?;
            v.body = valv_crypto::seal(&key, random_bytes()?, &resource_aad(v), &plain);
            w.sealed_with = wrapped;
        }
        Ok(())
    }

    /// The write an operation needs (none for deleting what is already deleted) and its result.
    async fn prepare(&self, op: WriteOp, written: &InCommit, now: i64) -> Result<(Option<Write>, Committed), StoreError> {
        match op {
            WriteOp::Create { resource_type, id, body, unless } => {
                let w = self.seal_version(&resource_type, &id, 1, body, written, now).await?;
                Ok((Some(Write { expect: Expect::Absent, version: w.0, tokens: w.1, sealed_with: w.3, unless }), Committed { resource: w.2, created: true, changed: true }))
            }
            WriteOp::Update { resource_type, id, body, if_match } => {
                if resource_type == "Binary" && self.store.file(&id).await?.is_some() {
                    return Err(StoreError::NotAllowed(format!("Binary/{id} holds a file, and files never change: upload a new Binary instead")));
                }
                let current = self.store.locate(&resource_type, &id).await?.ok_or_else(|| {
                    StoreError::NotAllowed(format!(
                        "{resource_type}/{id} does not exist, and Valv assigns ids itself: create it with POST /fhir/{resource_type}"
                    ))
                })?;
                check_if_match(&resource_type, &id, if_match, current.version)?;
                let w = self.seal_version(&resource_type, &id, current.version + 1, body, written, now).await?;
                Ok((
                    Some(Write { expect: Expect::Version(current.version), version: w.0, tokens: w.1, sealed_with: w.3, unless: None }),
                    Committed { resource: w.2, created: false, changed: true },
                ))
            }
            WriteOp::Delete { resource_type, id, if_match } => {
                let current = self
                    .store
                    .locate(&resource_type, &id)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("{resource_type}/{id}")))?;
                check_if_match(&resource_type, &id, if_match, current.version)?;
                if current.deleted {
                    let resource = Resource {
                        resource_type,
                        id,
                        version: current.version,
                        last_updated: current.last_updated,
                        deleted: true,
                        patient: current.patient,
                        body: None,
                    };
                    return Ok((None, Committed { resource, created: false, changed: false }));
                }
                let version = StoredVersion {
                    resource_type: resource_type.clone(),
                    id: id.clone(),
                    version: current.version + 1,
                    patient: current.patient.clone(),
                    deleted: true,
                    last_updated: now,
                    body: Vec::new(),
                };
                let resource = Resource {
                    resource_type,
                    id,
                    version: version.version,
                    last_updated: now,
                    deleted: true,
                    patient: current.patient,
                    body: None,
                };
                Ok((
                    Some(Write { expect: Expect::Version(current.version), version, tokens: Vec::new(), sealed_with: None, unless: None }),
                    Committed { resource, created: false, changed: true },
                ))
            }
        }
    }

    /// A resource may only be placed in the compartment of a patient that exists (or is written in
    /// the same commit): otherwise any client could make the vault mint keys for invented ids and
    /// file data under them. Checked before any key is looked up or created.
    async fn check_owner_exists(&self, resource_type: &str, id: &str, patient: Option<&str>, written: &InCommit) -> Result<(), StoreError> {
        let Some(p) = patient else { return Ok(()) };
        if resource_type == "Patient" || written.patients.contains(p) {
            return Ok(());
        }
        match self.store.locate("Patient", p).await? {
            Some(l) if !l.deleted => Ok(()),
            _ => Err(StoreError::Invalid(valv_fhir::FhirError::processing(format!(
                "{resource_type}/{id} refers to Patient/{p}, which does not exist on this server"
            )))),
        }
    }

    /// A DocumentReference's or Media's attachment that names a Binary on this server (a
    /// relative reference, `Binary/{id}`) must name one of the same patient: a document cannot
    /// point a reader at another patient's file. Absolute URLs are not resolved.
    async fn check_attachments(&self, resource_type: &str, id: &str, body: &Value, patient: Option<&str>, written: &InCommit) -> Result<(), StoreError> {
        let path = match resource_type {
            "DocumentReference" => "content.attachment.url",
            "Media" => "content.url",
            _ => return Ok(()),
        };
        for url in search::values_at(body, path).into_iter().filter_map(Value::as_str) {
            let Some(target) = valv_fhir::reference::parse(url).filter(|r| r.resource_type == "Binary") else { continue };
            // A Binary written in the same commit (a transaction's `urn:uuid:` reference).
            if let Some(owner) = written.binaries.get(&target.id) {
                if owner.as_deref() == patient {
                    continue;
                }
                return Err(StoreError::Invalid(valv_fhir::FhirError::processing(format!(
                    "{resource_type}/{id}'s attachment names Binary/{}, which is another patient's data (or no patient's)",
                    target.id
                ))));
            }
            let problem = match self.store.locate("Binary", &target.id).await? {
                Some(l) if !l.deleted && l.patient.as_deref() == patient => continue,
                Some(l) if !l.deleted => "another patient's data (or no patient's)",
                _ => "not on this server",
            };
            return Err(StoreError::Invalid(valv_fhir::FhirError::processing(format!(
                "{resource_type}/{id}'s attachment names Binary/{}, which is {problem}",
                target.id
            ))));
        }
        Ok(())
    }

    /// Validates a body, stamps id and meta, seals it and computes its tokens; also the wrapped
    /// form of the patient key it was sealed with.
    async fn seal_version(&self, resource_type: &str, id: &str, version: u64, mut body: Value, written: &InCommit, now: i64)
        -> Result<(StoredVersion, Vec<Token>, Resource, Option<Arc<[u8]>>), StoreError> {
        stamp(&mut body, id, version, now)?;
        if resource_type == "Binary" {
            strip_file_extension(&mut body);
        }
        r4::validate(&body).map_err(|e| StoreError::Invalid(valv_fhir::FhirError::structure(e.to_string())))?;
        let patients = compartment::patients(resource_type, id, &body);
        let patient = patients.into_iter().next();
        self.check_owner_exists(resource_type, id, patient.as_deref(), written).await?;
        self.check_attachments(resource_type, id, &body, patient.as_deref(), written).await?;
        let (key, sealed_with) = self.key_for(patient.as_deref(), now).await?;
        let plain = serde_json::to_vec(&body).map_err(|e| StoreError::Backend(format!("serialising: {e}")))?;
        let aad = Aad { purpose: "resource", resource_type, id, version, patient: patient.as_deref().unwrap_or("") };
        let sealed = valv_crypto::seal(&key, random_bytes()?, &aad, &plain);
        let mut tokens: Vec<Token> = search::index_keys(resource_type, &body)
            .iter()
            .map(|k| self.blind.token(resource_type, k.param, &k.key))
            .collect();
        // Stored in token order, not extraction order: the order would otherwise tell which
        // tokens belong to which parameter and how the plaintext values sort.
        tokens.sort_unstable();
        tokens.dedup();
        let stored = StoredVersion {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version,
            patient: patient.clone(),
            deleted: false,
            last_updated: now,
            body: sealed,
        };
        let resource = Resource {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version,
            last_updated: now,
            deleted: false,
            patient,
            body: Some(body),
        };
        Ok((stored, tokens, resource, sealed_with))
    }

    /// Runs a search. `visible` decides, from a resource's place alone, whether the caller may
    /// see it; invisible resources are neither returned nor counted.
    pub async fn search(&self, resource_type: &str, req: &SearchRequest, visible: &(dyn Fn(&Located) -> bool + Sync), now: i64)
        -> Result<SearchPage, StoreError> {
        let page = self.search_found(resource_type, req, visible, now).await?;
        let resources = page.found.iter().map(Found::to_resource).collect::<Result<_, _>>()?;
        Ok(SearchPage { total: page.total, more: page.more, resources })
    }

    /// [`Vault::search`] with each result's plaintext JSON as stored, not parsed.
    pub async fn search_found(&self, resource_type: &str, req: &SearchRequest, visible: &(dyn Fn(&Located) -> bool + Sync), now: i64)
        -> Result<FoundPage, StoreError> {
        let (mut filter, exact) = self.filter_for(resource_type, req);
        // An erased patient's resources are gone from every result (their rows stay, unreadable).
        let shown = |l: &Located| visible(l) && !l.patient.as_deref().is_some_and(|p| self.is_erased(p));
        // Without a sort of its own, the page is known from the candidates alone: they and the
        // page's resources are read together.
        let in_store_order = exact && req.sort_keys.is_empty() && !req.count_only;
        let page_ids = |candidates: &[Located]| -> Vec<String> {
            if !in_store_order {
                return Vec::new();
            }
            candidates.iter().filter(|l| shown(l)).skip(req.offset).take(req.count).map(|l| l.id.clone()).collect()
        };
        let end = req.offset.saturating_add(req.count);
        // Listing every match costs what the matches number: unless an exact total is asked
        // for, the store lists the page, one more (are there more?) and enough to count up to
        // EXACT_TOTAL_UP_TO, and no further.
        filter.limit = match req.total {
            _ if !in_store_order => None,
            TotalMode::Accurate => None,
            TotalMode::UpTo => Some(end.max(search::EXACT_TOTAL_UP_TO).saturating_add(1)),
            TotalMode::None => Some(end.saturating_add(1)),
        };
        let (mut listed, mut page) = self.store.search_and_read(&filter, &page_ids).await?;
        let mut complete = filter.limit.is_none_or(|l| listed.len() < l);
        if !complete && !listed.iter().all(&shown) {
            // Matches the caller may not see are among those listed: all of them, so that the
            // page is filled and whether a total is given depends only on what the caller may
            // see (its absence must not tell of others' records).
            filter.limit = None;
            (listed, page) = self.store.search_and_read(&filter, &page_ids).await?;
            complete = true;
        }
        let candidates: Vec<Located> = listed.into_iter().filter(|l| shown(l)).collect();
        // The index is not authenticated: a token row copied in the database must not put a
        // resource into results it does not match, so every result is tested on its plaintext.
        let matches = |plain: &[u8]| {
            valv_fhir::search::all_match_json(&req.conditions, resource_type, plain)
                .ok_or_else(|| StoreError::Integrity(format!("stored JSON of a {resource_type} is not an object")))
        };
        // Sorting by anything but the store's order needs every match decrypted.
        if exact && req.sort_keys.is_empty() {
            let total = candidates.len();
            if req.count_only {
                return Ok(FoundPage::counted(total, req, Vec::new()));
            }
            let mut found = Vec::with_capacity(page.len());
            for v in page {
                // Deleted or moved to another patient since it was listed: not a result.
                if v.deleted || !visible(&located(&v)) {
                    continue;
                }
                let plain = self.open_bytes(&v, now).await?;
                if matches(&plain)? {
                    found.push(Found::new(v, plain));
                } else {
                    index_mismatch(resource_type);
                }
            }
            return Ok(if complete { FoundPage::counted(total, req, found) } else { FoundPage { total: None, more: true, found } });
        }
        // Every candidate decrypted: tested when some condition needs the plaintext, and its sort
        // values taken; what is kept is its plaintext bytes, not a parsed tree.
        let mut keyed: Vec<Keyed> = Vec::new();
        for chunk in candidates.chunks(500) {
            let ids: Vec<String> = chunk.iter().map(|l| l.id.clone()).collect();
            for v in self.store.read_many(resource_type, &ids).await? {
                if v.deleted || !visible(&located(&v)) {
                    continue;
                }
                let plain = self.open_bytes(&v, now).await?;
                if !exact && !matches(&plain)? {
                    continue;
                }
                let values = valv_fhir::search::sort_values_of(&req.sort_keys, &plain)
                    .ok_or_else(|| StoreError::Integrity(format!("stored JSON of {resource_type}/{} is not an object", v.id)))?;
                keyed.push((values, (v, plain)));
            }
        }
        valv_fhir::search::sort_by_values(&mut keyed, &req.sort_keys);
        let total = keyed.len();
        if req.count_only {
            return Ok(FoundPage::counted(total, req, Vec::new()));
        }
        let mut found = Vec::new();
        for (_, (v, plain)) in keyed.into_iter().skip(req.offset).take(req.count) {
            // As above: an index row copied in the database must not add a result.
            if exact && !matches(&plain)? {
                index_mismatch(resource_type);
                continue;
            }
            found.push(Found::new(v, plain));
        }
        Ok(FoundPage::counted(total, req, found))
    }

    /// The filter for resources whose string parameters hold exactly these values (as the
    /// `:exact` modifier matches), from the blind index alone: nothing is opened, and a value may
    /// hold a comma (which a search's query string would split).
    pub fn exact_strings(&self, resource_type: &str, criteria: &[(&str, &str)]) -> Filter {
        let token_groups = criteria.iter().map(|(param, value)| vec![self.blind.token(resource_type, param, &format!("e:{value}"))]).collect();
        Filter { resource_type: resource_type.to_string(), token_groups, order: Order::Created, ..Filter::default() }
    }

    /// The condition of a conditional create (`If-None-Exist`) as the store checks it: only
    /// criteria the blind index answers exactly (tokens, references, `_id`, strings up to the
    /// prefix length), since the store decides without decrypting; at least one criterion.
    pub fn condition(&self, resource_type: &str, req: &SearchRequest) -> Result<Filter, StoreError> {
        let (filter, exact) = self.filter_for(resource_type, req);
        let usable = exact && filter.last_updated.is_empty() && (filter.ids.is_some() || !filter.token_groups.is_empty());
        if !usable {
            return Err(StoreError::Invalid(valv_fhir::FhirError::not_supported(
                "the condition must name the resource exactly: use token, reference or _id parameters (such as identifier=system|value), or strings of at most 16 characters",
            )));
        }
        Ok(Filter { order: crate::Order::Created, ..filter })
    }

    fn filter_for(&self, resource_type: &str, req: &SearchRequest) -> (Filter, bool) {
        let mut filter = Filter {
            resource_type: resource_type.to_string(),
            order: match req.sort {
                SortOrder::Created => Order::Created,
                SortOrder::LastUpdatedAsc => Order::LastUpdatedAsc,
                SortOrder::LastUpdatedDesc => Order::LastUpdatedDesc,
            },
            ..Filter::default()
        };
        let mut exact = true;
        for c in &req.conditions {
            exact &= c.keys_are_exact();
            match &c.test {
                Test::Id(ids) => {
                    filter.ids = Some(match filter.ids.take() {
                        None => ids.clone(),
                        Some(prev) => prev.into_iter().filter(|i| ids.contains(i)).collect(),
                    });
                }
                Test::LastUpdated(alts) => {
                    let ranges: Option<Vec<(i64, i64)>> = alts
                        .iter()
                        .map(|(p, s)| p.candidate_interval(s).map(|i| (i.start.saturating_mul(1000), i.end.saturating_mul(1000))))
                        .collect();
                    match ranges {
                        Some(r) => filter.last_updated.push(r),
                        None => exact = false,
                    }
                }
                // Resolved by the caller before a search reaches the vault; left here, they
                // match nothing (`exact` is false, so every candidate is tested and fails).
                Test::Chain { .. } | Test::Has { .. } | Test::Not { .. } => {}
                Test::Indexed { def, .. } => {
                    if let Some(keys) = c.candidate_keys() {
                        filter.token_groups.push(keys.iter().map(|k| self.blind.token(resource_type, def.name, k)).collect());
                    }
                }
            }
        }
        (filter, exact)
    }
}

fn check_if_match(resource_type: &str, id: &str, if_match: Option<u64>, current: u64) -> Result<(), StoreError> {
    match if_match {
        Some(v) if v != current => Err(StoreError::PreconditionFailed(format!(
            "If-Match names version {v} but {resource_type}/{id} is at version {current}"
        ))),
        _ => Ok(()),
    }
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping the rest of `meta`.
fn stamp(body: &mut Value, id: &str, version: u64, now: i64) -> Result<(), StoreError> {
    let Value::Object(map) = body else {
        return Err(StoreError::Invalid(valv_fhir::FhirError::structure("a resource must be a JSON object")));
    };
    map.insert("id".into(), Value::String(id.to_string()));
    let meta = map.entry("meta").or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(meta) = meta else {
        return Err(StoreError::Invalid(valv_fhir::FhirError::structure("meta must be an object")));
    };
    meta.insert("versionId".into(), Value::String(version.to_string()));
    meta.insert("lastUpdated".into(), Value::String(date::format_instant(now)));
    Ok(())
}

async fn load_or_create_key(store: &dyn Store, provider: &dyn KeyProvider, name: &str, now: i64) -> Result<DataKey, StoreError> {
    load_or_create_wrapped(store, provider, name, now).await.map(|(key, _)| key)
}

/// A named data key and its wrapped form as stored, created on first use.
async fn load_or_create_wrapped(store: &dyn Store, provider: &dyn KeyProvider, name: &str, now: i64) -> Result<(DataKey, crate::WrappedKey), StoreError> {
    let wrapped = match store.get_key(name).await? {
        Some(w) => w,
        None => {
            let fresh = DataKey::from_bytes(random_bytes()?);
            let w = provider.wrap(&fresh, name, random_bytes()?)?;
            store.put_key_if_absent(name, &w, now).await?
        }
    };
    Ok((provider.unwrap(&wrapped, name)?, wrapped))
}

/// What a resource version's body is bound to besides its key.
fn resource_aad(v: &StoredVersion) -> Aad<'_> {
    Aad { purpose: "resource", resource_type: &v.resource_type, id: &v.id, version: v.version, patient: v.patient.as_deref().unwrap_or("") }
}

/// Counts and logs a stored version that did not open (without its patient or content).
fn integrity_failure(v: &StoredVersion, e: &valv_crypto::CryptoError) -> StoreError {
    INTEGRITY_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::error!(resource_type = %v.resource_type, version = v.version, error = %e, "stored resource failed to authenticate");
    StoreError::Integrity(format!("{}/{} version {} failed to decrypt: {e}", v.resource_type, v.id, v.version))
}

#[cfg(test)]
#[path = "vault_search_tests.rs"]
mod search_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;
    use serde_json::json;
    use valv_crypto::LocalKeyProvider;

    fn temp_db() -> std::path::PathBuf {
        let r: [u8; 8] = random_bytes().expect("random");
        std::env::temp_dir().join(format!("valv-vault-{}.db", u64::from_le_bytes(r)))
    }

    async fn create(v: &Vault, resource_type: &str, body: Value) -> String {
        let id = new_id().expect("id");
        v.commit(vec![WriteOp::Create { resource_type: resource_type.into(), id: id.clone(), body, unless: None }], 1).await.expect("create");
        id
    }

    async fn read(v: &Vault, resource_type: &str, id: &str) -> Value {
        let stored = v.fetch(resource_type, id, None).await.expect("fetch").expect("exists");
        serde_json::from_slice(&v.open_bytes(&stored, 1).await.expect("opens")).expect("json")
    }

    #[tokio::test]
    async fn a_rotated_patient_key_reseals_every_version_and_a_server_with_the_old_key_cached_follows() {
        let path = temp_db();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
        let provider: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::generate(random_bytes().expect("random")));
        let operator = Vault::open(store.clone(), provider.clone(), 1).await.expect("vault");
        let server = Vault::open(store.clone(), provider.clone(), 1).await.expect("vault");
        let p = create(&server, "Patient", json!({"resourceType": "Patient", "name": [{"family": "Rotated"}]})).await;
        let subject = json!({"reference": format!("Patient/{p}")});
        let o = create(&server, "Observation", json!({"resourceType": "Observation", "status": "final", "code": {"text": "one"}, "subject": subject})).await;
        server.commit(vec![WriteOp::Update { resource_type: "Observation".into(), id: o.clone(), body: json!({"resourceType": "Observation", "status": "amended", "code": {"text": "two"}, "subject": subject}), if_match: None }], 2).await.expect("update");
        let name = patient_key_name(&p);
        let old = provider.unwrap(&store.get_key(&name).await.expect("key").expect("stored"), &name).expect("unwrap");

        assert_eq!(operator.rotate_patient_key(&p, 3).await.expect("rotate"), 3, "the patient and two observation versions");
        let new = provider.unwrap(&store.get_key(&name).await.expect("key").expect("stored"), &name).expect("unwrap");
        for (_, v) in store.patient_versions(&p).await.expect("versions") {
            assert!(valv_crypto::open(&old, &resource_aad(&v), &v.body).is_err(), "the old key opens nothing");
            assert!(valv_crypto::open(&new, &resource_aad(&v), &v.body).is_ok(), "the new key opens every version");
        }
        // The server still has the old key cached: it reads the new one, and its write is sealed
        // again under the new key instead of being stored under the old.
        assert_eq!(read(&server, "Observation", &o).await["status"], "amended");
        let failures = integrity_failures();
        let q = create(&server, "Observation", json!({"resourceType": "Observation", "status": "final", "code": {"text": "three"}, "subject": subject})).await;
        operator.rotate_patient_key(&p, 4).await.expect("rotate again");
        server.commit(vec![WriteOp::Update { resource_type: "Observation".into(), id: q.clone(), body: json!({"resourceType": "Observation", "status": "amended", "code": {"text": "four"}, "subject": subject}), if_match: None }], 5).await.expect("an update with the key rotated under it");
        let newest = provider.unwrap(&store.get_key(&name).await.expect("key").expect("stored"), &name).expect("unwrap");
        let stored = store.read_current("Observation", &q).await.expect("read").expect("exists");
        assert!(valv_crypto::open(&newest, &resource_aad(&stored), &stored.body).is_ok(), "sealed under the stored key");
        assert_eq!(read(&operator, "Observation", &q).await["code"]["text"], "four");
        assert_eq!(integrity_failures(), failures, "a rotation is no integrity failure");

        // A body that does not open under the stored key is still one.
        let mut bad = store.read_current("Observation", &q).await.expect("read").expect("exists");
        bad.body[20] ^= 1;
        assert!(matches!(server.open_bytes(&bad, 6).await, Err(StoreError::Integrity(_))));
        assert!(matches!(operator.rotate_patient_key("nobody", 6).await, Err(StoreError::NotFound(_))));
        crate::sqlite::remove_files(&path);
    }

    #[tokio::test]
    async fn a_file_key_survives_rotation_is_bound_to_its_binary_and_dies_with_the_patient() {
        let path = temp_db();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
        let provider: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::generate(random_bytes().expect("random")));
        let operator = Vault::open(store.clone(), provider.clone(), 1).await.expect("vault");
        let server = Vault::open(store.clone(), provider.clone(), 1).await.expect("vault");
        let p = create(&server, "Patient", json!({"resourceType": "Patient"})).await;
        let binary = create(&server, "Binary", json!({"resourceType": "Binary", "contentType": "image/png", "securityContext": {"reference": format!("Patient/{p}")}})).await;
        let file_key = DataKey::from_bytes(random_bytes().expect("random"));
        let row = crate::FileRow { binary_id: binary.clone(), object: "0123456789abcdef0001".into(), patient: p.clone(), sealed_key: Vec::new(), size: 3, sha256: [1; 32], scan: "pending".into(), created: 1 };
        server.put_file(row, &file_key, 2).await.expect("put");
        let stored = store.file(&binary).await.expect("read").expect("recorded");
        assert_eq!(server.file_key(&stored, 3).await.expect("open").expose(), file_key.expose());

        // Rotated by another process: the server (old key cached) still opens it, and so does a
        // file put after the rotation with the old key cached.
        operator.rotate_patient_key(&p, 4).await.expect("rotate");
        let stored = store.file(&binary).await.expect("read").expect("recorded");
        let failures = integrity_failures();
        assert_eq!(server.file_key(&stored, 5).await.expect("open after rotation").expose(), file_key.expose());
        assert_eq!(integrity_failures(), failures, "a rotation is no integrity failure");

        // Bound to its Binary and patient: the same sealed key on another row does not open.
        let moved = crate::FileRow { binary_id: "another".into(), ..stored.clone() };
        assert!(matches!(server.file_key(&moved, 6).await, Err(StoreError::Integrity(_))));

        // A file-backed Binary never changes.
        let update = WriteOp::Update { resource_type: "Binary".into(), id: binary.clone(), body: json!({"resourceType": "Binary", "contentType": "text/plain"}), if_match: None };
        assert!(matches!(server.commit(vec![update], 7).await, Err(StoreError::NotAllowed(_))));

        let erased = operator.erase_patient(&p, 8).await.expect("erase");
        assert_eq!(erased.objects, ["0123456789abcdef0001"]);
        assert!(store.file(&binary).await.expect("read").is_none());
        server.refresh_erasures().await.expect("refresh");
        assert!(matches!(server.file_key(&stored, 9).await, Err(StoreError::Gone(_))), "no key opens it");
        crate::sqlite::remove_files(&path);
    }
}
