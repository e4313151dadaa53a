//! Bulk Data `$export` (FHIR Bulk Data Access IG v2): `GET|POST /fhir/$export`,
//! `/fhir/Patient/$export` and `/fhir/Group/{id}/$export` with `Prefer: respond-async` answer
//! 202 and a status URL; the status answers 202 with `X-Progress` and `Retry-After` until the
//! manifest (200); the files are NDJSON, one per type (several past [`LINES_PER_FILE`]),
//! downloaded with the same credential (`requiresAccessToken: true`); `DELETE` on the status
//! URL cancels a job or deletes its files.
//!
//! Never a side door: the export runs as the caller. Each type is decided as a search at the
//! kick-off and again when the job runs, and each resource as a read of its own patient when it
//! is read (decided once per type and patient, as a search's results are); what the caller may
//! not read then is left out. When the files are written, one audit entry per type and patient
//! exported is made durable BEFORE the manifest exists; every download of a file is decided
//! again (the type, at that time) and recorded. A file holding a patient erased since is gone.
//!
//! At rest the files are age-encrypted (X25519, ChaCha20-Poly1305 in 64 KiB chunks) to a key
//! made for the job and held only in this process's memory: a restart leaves them unreadable,
//! and they are deleted then, or when the job expires (`[fhir] export_expiry_seconds`), is
//! cancelled or fails. Jobs run one at a time, in the background, off the request path.

use crate::error::ApiError;
use crate::http::body::Body;
use crate::request::{audit, authorize, enforce, Ctx, Filter, Permit, Touch};
use crate::{App, Reply};
use bytes::Bytes;
use hyper::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use valv_fhir::search::{self, SearchRequest, Test};
use valv_fhir::{date, r4};
use valv_policy::Action;
use zeroize::Zeroizing;

pub const NDJSON: &str = "application/fhir+ndjson";

/// Resources per file at most (a new file is started before a piece would pass it).
const LINES_PER_FILE: usize = 100_000;

/// Resources read, decrypted and handed to the file writer at a time.
const PIECE: usize = 500;

/// Jobs kept at once (queued, running, or waiting to be downloaded); 429 beyond.
const MAX_JOBS: usize = 16;

/// Jobs one caller may keep at once (one of them queued or running).
const MAX_JOBS_PER_CALLER: usize = 3;

/// Downloads streaming at once, server-wide (each holds an open file and a decryption); 429
/// beyond.
const MAX_DOWNLOADS: usize = 8;

/// How long a download waits for a client that does not read before it gives up.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a client polling a job that is not finished is asked to wait, in seconds.
const RETRY_AFTER: u64 = 2;

/// Audit entries appended at a time when a job finishes.
const AUDIT_BATCH: usize = 1000;

/// Which resources an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Level {
    /// `/$export`: every resource the caller may read.
    System,
    /// `/Patient/$export`: the resources of every patient (each decided on its own).
    Patient,
    /// `/Group/{id}/$export`: the resources of the Group's (active) member Patients.
    Group(String),
}

impl Level {
    fn audited_type(&self) -> &'static str {
        match self {
            Level::System => "",
            Level::Patient => "Patient",
            Level::Group(_) => "Group",
        }
    }

    fn path(&self) -> String {
        match self {
            Level::System => "$export".into(),
            Level::Patient => "Patient/$export".into(),
            Level::Group(id) => format!("Group/{id}/$export"),
        }
    }
}

/// The export jobs of this server, and the folder their files are written to.
pub struct Exports {
    dir: PathBuf,
    expiry_ms: i64,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    queue: mpsc::UnboundedSender<Arc<Job>>,
    /// Taken by [`run`] when the server starts.
    pending: Mutex<Option<mpsc::UnboundedReceiver<Arc<Job>>>>,
    downloads: Arc<tokio::sync::Semaphore>,
}

struct Job {
    id: String,
    owner: String,
    /// The kick-off request's URL (the manifest's `request`).
    request: String,
    /// The caller, as at the kick-off: decisions are made with its roles, purpose and time.
    ctx: Ctx,
    plan: Plan,
    /// The job's file key pair: only the public half is used to write.
    secret: Zeroizing<[u8; 32]>,
    cancelled: AtomicBool,
    written: AtomicU64,
    state: Mutex<State>,
}

/// What to export, settled at the kick-off.
struct Plan {
    level: Level,
    types: Vec<String>,
    /// Milliseconds; resources last updated before are left out.
    since: Option<i64>,
    /// The Group's member patients.
    members: HashSet<String>,
    /// `_typeFilter` queries by type: a resource of a type with some must match one of them.
    type_filters: HashMap<String, Vec<Vec<(String, String)>>>,
}

#[derive(Clone)]
enum State {
    Queued,
    Running,
    /// `patients`: whose data the files hold (a job is dropped when one of them is erased).
    Done { files: Vec<OutFile>, transaction_time: i64, expires: i64, patients: Arc<HashSet<String>> },
    Failed { message: String, expires: i64 },
}

#[derive(Clone, Debug)]
struct OutFile {
    resource_type: String,
    count: usize,
}

impl Exports {
    /// Jobs whose files go under `dir`, kept `expiry_secs` after they finish.
    pub fn new(dir: PathBuf, expiry_secs: u64) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        Exports {
            dir,
            expiry_ms: i64::try_from(expiry_secs).unwrap_or(i64::MAX / 2_000).saturating_mul(1000),
            jobs: Mutex::new(HashMap::new()),
            queue,
            pending: Mutex::new(Some(pending)),
            downloads: Arc::new(tokio::sync::Semaphore::new(MAX_DOWNLOADS)),
        }
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets expired jobs and deletes their files.
    fn sweep(&self, now: i64) {
        let expired: Vec<String> = self
            .jobs()
            .iter()
            .filter(|(_, j)| matches!(j.state(), State::Done { expires, .. } | State::Failed { expires, .. } if expires <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }

    fn remove(&self, id: &str) -> Option<Arc<Job>> {
        let job = self.jobs().remove(id);
        if let Some(j) = &job {
            j.cancelled.store(true, Ordering::Release);
            delete_files(&self.job_dir(id));
        }
        job
    }

    /// The caller's job: another's is as unknown as one that never was. A finished job holding
    /// data of a patient erased since is deleted first.
    fn owned(&self, app: &App, id: &str, ctx: &Ctx, now: i64) -> Result<Arc<Job>, ApiError> {
        self.sweep(now);
        let job = self.jobs().get(id).filter(|j| j.owner == ctx.principal.id).cloned();
        if let Some(j) = &job {
            if let State::Done { patients, .. } = j.state() {
                if patients.iter().any(|p| app.vault.is_erased(p)) {
                    self.remove(id);
                    return Err(ApiError::not_found(format!("export job '{id}' was deleted: a patient whose data it held has been erased")));
                }
            }
        }
        job.ok_or_else(|| ApiError::not_found(format!("no export job '{id}' of yours (it may have expired, been cancelled, or belong to another server)")))
    }
}

impl Job {
    fn state(&self) -> State {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set(&self, s: State) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = s;
    }
}

/// The caller as at the kick-off, at another time (decisions and audit entries are made when
/// the job reads and records, not when it was asked for).
fn at(ctx: &Ctx, now: i64) -> Ctx {
    Ctx {
        principal: ctx.principal.clone(),
        request_id: ctx.request_id.clone(),
        source: ctx.source.clone(),
        now,
        purpose_of_use: ctx.purpose_of_use.clone(),
        return_representation: true,
        lenient: false,
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

fn delete_files(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(error = %e, "cannot delete an export's files");
        }
    }
}

/// Runs queued jobs one after another, and deletes expired ones each minute. Started once, by
/// the server.
pub async fn run(app: Arc<App>) {
    let pending = app.exports.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    let Some(mut queue) = pending else { return };
    // Files left by an earlier process cannot be read any more (their keys were only in its
    // memory): they go.
    delete_files(&app.exports.dir);
    let sweeper = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            sweeper.exports.sweep(sweeper.clock.now_ms());
        }
    });
    while let Some(job) = queue.recv().await {
        if job.cancelled.load(Ordering::Acquire) {
            continue;
        }
        job.set(State::Running);
        let outcome = export(&app, &job).await;
        let now = app.clock.now_ms();
        let expires = now.saturating_add(app.exports.expiry_ms);
        match outcome {
            Ok((files, transaction_time, patients)) => job.set(State::Done { files, transaction_time, expires, patients: Arc::new(patients) }),
            Err(e) => {
                delete_files(&app.exports.job_dir(&job.id));
                if !job.cancelled.load(Ordering::Acquire) {
                    // The reason goes to the job's owner (its status), not to the log: it can echo a query.
                    tracing::error!(job = %job.id, "an export failed; its files are deleted");
                }
                job.set(State::Failed { message: e.diagnostics, expires });
            }
        }
    }
}

/// The parameters of a kick-off: from the URL, or from a `Parameters` body (POST).
pub fn pairs_from_parameters(body: &Value) -> Result<Vec<(String, String)>, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request("a POST $export takes a Parameters resource"));
    }
    let mut pairs = Vec::new();
    for p in body.get("parameter").and_then(Value::as_array).into_iter().flatten() {
        let name = p.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::bad_request("each parameter needs a name"))?;
        let value = p
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")))
            .and_then(|(_, v)| v.as_str())
            .ok_or_else(|| ApiError::bad_request(format!("parameter '{name}' needs a value (valueString, valueInstant, valueCode)")))?;
        pairs.push((name.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// The kick-off: checks, decides the types, records the request, queues the job: 202 with the
/// status URL in Content-Location.
pub async fn kick_off(app: &App, ctx: &Ctx, level: Level, pairs: &[(String, String)], respond_async: bool) -> Result<Reply, ApiError> {
    let query = crate::http::query::encode(pairs);
    let touch = Touch { interaction: "export", action: Action::Search, resource_type: level.audited_type(), id: None, version: None, patient: None, query: Some(query.clone()) };
    if !respond_async {
        return Err(ApiError::bad_request("$export runs asynchronously: send 'Prefer: respond-async'"));
    }
    let asked = parse(pairs)?;
    let members = match &level {
        Level::Group(id) => group_members(app, ctx, id).await?,
        _ => HashSet::new(),
    };
    let subject = app.access.subject(&ctx.principal);
    let mut types = Vec::new();
    let mut permit: Option<Permit> = None;
    for t in asked.types.clone().unwrap_or_else(|| r4::resource_types().iter().map(|t| t.to_string()).collect()) {
        let t_touch = Touch { resource_type: &t, query: Some(query.clone()), ..touch };
        let d = app.access.may_search(&subject, &ctx.question(&t_touch));
        // A type asked for by name must be allowed; without `_type`, what is not is left out.
        if d.permit || asked.types.is_some() {
            let p = enforce(app, ctx, &t_touch, d).await?;
            permit.get_or_insert(p);
            types.push(t);
        }
    }
    let Some(permit) = permit else {
        let d = app.access.may_search(&subject, &ctx.question(&Touch { resource_type: "Patient", query: None, ..touch }));
        enforce(app, ctx, &touch, d).await?;
        return Err(ApiError::forbidden("nothing here may be exported by you"));
    };
    app.exports.sweep(app.clock.now_ms());
    let id = valv_store::vault::new_id()?;
    let request = format!("{}/{}{}{query}", app.base_url, level.path(), if query.is_empty() { "" } else { "?" });
    let job = Arc::new(Job {
        id: id.clone(),
        owner: ctx.principal.id.clone(),
        request,
        ctx: Ctx {
            principal: ctx.principal.clone(),
            request_id: ctx.request_id.clone(),
            source: ctx.source.clone(),
            now: ctx.now,
            purpose_of_use: ctx.purpose_of_use.clone(),
            return_representation: true,
            lenient: false,
        },
        plan: Plan { level, types, since: asked.since, members, type_filters: asked.type_filters },
        secret: Zeroizing::new(valv_store::vault::random_bytes()?),
        cancelled: AtomicBool::new(false),
        written: AtomicU64::new(0),
        state: Mutex::new(State::Queued),
    });
    // The limits are checked and the slot taken under one lock: concurrent kick-offs cannot all
    // pass the checks.
    {
        let mut jobs = app.exports.jobs();
        let mine: Vec<&Arc<Job>> = jobs.values().filter(|j| j.owner == ctx.principal.id).collect();
        if mine.iter().any(|j| matches!(j.state(), State::Queued | State::Running)) {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", "you have an export running: wait for it, or cancel it (DELETE its status URL)").retry_after(RETRY_AFTER));
        }
        if mine.len() >= MAX_JOBS_PER_CALLER {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", format!("you keep {MAX_JOBS_PER_CALLER} exports already: delete one (DELETE its status URL) or let it expire")).retry_after(60));
        }
        if jobs.len() >= MAX_JOBS {
            return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", format!("this server keeps {MAX_JOBS} exports at a time; retry when one is downloaded or deleted")).retry_after(60));
        }
        jobs.insert(id.clone(), job.clone());
    }
    let mut event = ctx.permitted(&touch, 202, &permit)?;
    event.reason = format!("{}; export {id} of {} type(s) accepted", permit.reason, job.plan.types.len());
    if let Err(e) = audit(app, vec![event]).await {
        app.exports.remove(&id);
        return Err(e);
    }
    if app.exports.queue.send(job).is_err() {
        app.exports.remove(&id);
        return Err(ApiError::unavailable("exports are not running on this server"));
    }
    let mut reply = Reply::empty(StatusCode::ACCEPTED);
    reply.headers.push(("content-location", format!("{}/$export-status/{id}", app.base_url)));
    Ok(reply)
}

/// What the kick-off's parameters ask for.
struct Asked {
    types: Option<Vec<String>>,
    since: Option<i64>,
    type_filters: HashMap<String, Vec<Vec<(String, String)>>>,
}

/// Result parameters and the like have no place in a `_typeFilter`.
const NOT_IN_TYPE_FILTER: &[&str] = &["_include", "_revinclude", "_sort", "_count", "_offset", "_elements", "_summary", "_total", "_totalMethod", "_contained", "_format", "_pretty"];

fn parse(pairs: &[(String, String)]) -> Result<Asked, ApiError> {
    let mut asked = Asked { types: None, since: None, type_filters: HashMap::new() };
    let mut filters: Vec<String> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "_outputFormat" => {
                if !matches!(v.as_str(), "application/fhir+ndjson" | "application/ndjson" | "ndjson") {
                    return Err(ApiError::bad_request(format!("_outputFormat '{v}' is not supported: Valv writes application/fhir+ndjson")));
                }
            }
            "_type" => {
                let types = asked.types.get_or_insert_with(Vec::new);
                for t in v.split(',').map(str::trim) {
                    if !r4::is_resource_type(t) {
                        return Err(ApiError::bad_request(format!("_type: '{t}' is not a resource type")));
                    }
                    if !types.iter().any(|x| x == t) {
                        types.push(t.to_string());
                    }
                }
            }
            "_since" => {
                let at = date::parse(v).map_err(|e| ApiError::bad_request(format!("_since: {e}")))?;
                asked.since = Some(at.start.saturating_mul(1000));
            }
            "_typeFilter" => filters.extend(v.split(',').map(str::to_string)),
            "_format" | "_pretty" => {}
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!("$export parameter '{other}' is not supported (_outputFormat, _type, _since, _typeFilter)"),
                ))
            }
        }
    }
    for f in filters {
        let (t, q) = f.split_once('?').ok_or_else(|| ApiError::bad_request(format!("_typeFilter '{f}' must be a type and a search, such as Observation?code=…")))?;
        if !r4::is_resource_type(t) {
            return Err(ApiError::bad_request(format!("_typeFilter: '{t}' is not a resource type")));
        }
        if asked.types.as_ref().is_some_and(|ts| !ts.iter().any(|x| x == t)) {
            return Err(ApiError::bad_request(format!("_typeFilter on {t}, which _type does not ask for")));
        }
        let inner = crate::http::query::parse(q).map_err(ApiError::bad_request)?;
        if let Some((k, _)) = inner.iter().find(|(k, _)| NOT_IN_TYPE_FILTER.contains(&k.as_str())) {
            return Err(ApiError::bad_request(format!("_typeFilter: '{k}' is not a filter")));
        }
        let req = search::parse_request(t, &inner)?;
        if req.conditions.iter().any(|c| matches!(c.test, Test::Chain { .. } | Test::Has { .. })) {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "not-supported", "_typeFilter: chained parameters and _has are not supported in an export"));
        }
        asked.type_filters.entry(t.to_string()).or_default().push(inner);
    }
    Ok(asked)
}

/// The active members of a Group the caller may read (as a read of the Group).
async fn group_members(app: &App, ctx: &Ctx, id: &str) -> Result<HashSet<String>, ApiError> {
    super::check_id(id)?;
    let touch = Touch { interaction: "read", action: Action::Read, resource_type: "Group", id: Some(id), version: None, patient: None, query: None };
    let stored = app.vault.fetch("Group", id, None).await?;
    let Some(v) = stored.filter(|v| !v.deleted) else {
        return Err(super::unknown_id(app, ctx, &touch, ApiError::not_found(format!("Group/{id} is not known"))).await);
    };
    let touch = Touch { patient: v.patient.as_deref(), ..touch };
    let permit = authorize(app, ctx, &touch).await?;
    let group = app.vault.open_version(v.clone(), ctx.now).await?;
    audit(app, vec![ctx.permitted(&Touch { version: Some(v.version), ..touch }, 200, &permit)?]).await?;
    let members = group
        .body
        .as_ref()
        .and_then(|b| b.get("member"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m.get("inactive").and_then(Value::as_bool) != Some(true))
        .filter_map(|m| m.pointer("/entity/reference").and_then(Value::as_str))
        .filter_map(|r| r.rsplit_once("Patient/").map(|(_, id)| id.to_string()))
        .collect();
    Ok(members)
}

/// A piece of NDJSON for the file writer.
struct Piece {
    resource_type: String,
    lines: Vec<u8>,
    count: usize,
}

/// Writes the job's files; returns them, and the transaction time (resources changed after it
/// are left for the next export with `_since`).
async fn export(app: &App, job: &Job) -> Result<(Vec<OutFile>, i64, HashSet<String>), ApiError> {
    let transaction_time = app.clock.now_ms();
    let dir = app.exports.job_dir(&job.id);
    create_private_dir(&dir).map_err(|e| ApiError::internal(format!("cannot create the export's folder: {e}")))?;
    let recipient = valv_age::Identity::from_bytes(*job.secret).recipient();
    let (tx, rx) = mpsc::channel::<Piece>(2);
    let writer = tokio::task::spawn_blocking(move || write_files(&dir, &recipient, rx));
    let read = read_resources(app, job, transaction_time, &tx).await;
    drop(tx);
    let files = writer.await.map_err(|e| ApiError::internal(format!("the export's writer stopped: {e}")))??;
    let exported = read?;
    record(app, job, &exported).await?;
    let patients = exported.keys().filter_map(|(_, p)| p.clone()).collect();
    Ok((files, transaction_time, patients))
}

/// Reads, decides, decrypts and filters every resource of the plan into pieces for the writer;
/// returns how many resources of each type and patient went out.
async fn read_resources(app: &App, job: &Job, transaction_time: i64, tx: &mpsc::Sender<Piece>) -> Result<BTreeMap<(String, Option<String>), usize>, ApiError> {
    let plan = &job.plan;
    let mut exported: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
    for resource_type in &plan.types {
        // Decided now, not at the kick-off: a grant or care relationship that ended meanwhile
        // no longer counts. A type the caller may no longer search at all is left out.
        let ctx = at(&job.ctx, app.clock.now_ms());
        let subject = app.access.subject(&ctx.principal);
        let type_touch = Touch { interaction: "export", action: Action::Search, resource_type, id: None, version: None, patient: None, query: None };
        if !app.access.may_search(&subject, &ctx.question(&type_touch)).permit {
            continue;
        }
        let filter = Filter::new(app, &ctx, Action::Read, resource_type);
        let type_filters: Vec<SearchRequest> =
            plan.type_filters.get(resource_type).into_iter().flatten().map(|q| search::parse_request(resource_type, q)).collect::<Result<_, _>>()?;
        let all = app.vault.store().search(&valv_store::Filter { resource_type: resource_type.clone(), ..Default::default() }).await?;
        let in_scope = |l: &valv_store::Located| match (&plan.level, l.patient.as_deref()) {
            (Level::System, _) => true,
            (Level::Patient, p) => p.is_some(),
            (Level::Group(_), p) => p.is_some_and(|p| plan.members.contains(p)),
        };
        let ids: Vec<String> = all
            .into_iter()
            .filter(|l| {
                l.last_updated <= transaction_time
                    && plan.since.is_none_or(|s| l.last_updated >= s)
                    && in_scope(l)
                    && !l.patient.as_deref().is_some_and(|p| app.vault.is_erased(p))
                    && filter.visible(l.patient.as_deref())
            })
            .map(|l| l.id)
            .collect();
        for chunk in ids.chunks(PIECE) {
            if job.cancelled.load(Ordering::Acquire) {
                return Err(ApiError::new(StatusCode::GONE, "deleted", "the export was cancelled"));
            }
            let mut piece = Piece { resource_type: resource_type.clone(), lines: Vec::new(), count: 0 };
            for v in app.vault.store().read_many(resource_type, chunk).await? {
                // Changed since it was listed: its place may have changed too; the next export
                // with `_since` has it.
                if v.deleted || v.last_updated > transaction_time || !filter.visible(v.patient.as_deref()) {
                    continue;
                }
                let bytes = app.vault.open_bytes(&v, ctx.now).await?;
                if !type_filters.is_empty() || bytes.contains(&b'\n') {
                    let body: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(format!("stored JSON is unreadable: {e}")))?;
                    if !type_filters.is_empty() && !type_filters.iter().any(|f| f.conditions.iter().all(|c| c.matches(resource_type, &body))) {
                        continue;
                    }
                    serde_json::to_writer(&mut piece.lines, &body).map_err(|e| ApiError::internal(e.to_string()))?;
                } else {
                    piece.lines.extend_from_slice(&bytes);
                }
                piece.lines.push(b'\n');
                piece.count += 1;
                *exported.entry((resource_type.clone(), v.patient.clone())).or_default() += 1;
            }
            job.written.fetch_add(piece.count as u64, Ordering::Relaxed);
            if piece.count > 0 && tx.send(piece).await.is_err() {
                return Err(ApiError::internal("the export's writer stopped"));
            }
        }
    }
    Ok(exported)
}

/// Seals the pieces into files `0.ndjson.age`, `1.ndjson.age`, …: one type per file.
fn write_files(dir: &Path, recipient: &valv_age::Recipient, mut rx: mpsc::Receiver<Piece>) -> Result<Vec<OutFile>, ApiError> {
    let failed = |e: &dyn std::fmt::Display| ApiError::internal(format!("writing an export file: {e}"));
    let mut files: Vec<OutFile> = Vec::new();
    let mut open: Option<valv_age::Writer<std::io::BufWriter<std::fs::File>>> = None;
    while let Some(piece) = rx.blocking_recv() {
        let continues = files.last().is_some_and(|f| f.resource_type == piece.resource_type && f.count + piece.count <= LINES_PER_FILE);
        if !continues || open.is_none() {
            if let Some(w) = open.take() {
                finish(w).map_err(|e| failed(&e))?;
            }
            let file = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join(file_name(files.len()))).map_err(|e| failed(&e))?
            };
            let random = valv_age::Randomness { file_key: valv_store::vault::random_bytes()?, ephemeral: vec![valv_store::vault::random_bytes()?], nonce: valv_store::vault::random_bytes()? };
            open = Some(valv_age::encrypt(std::io::BufWriter::new(file), std::slice::from_ref(recipient), random).map_err(|e| failed(&e))?);
            files.push(OutFile { resource_type: piece.resource_type.clone(), count: 0 });
        }
        if let (Some(w), Some(f)) = (open.as_mut(), files.last_mut()) {
            w.write_all(&piece.lines).map_err(|e| failed(&e))?;
            f.count += piece.count;
        }
    }
    if let Some(w) = open {
        finish(w).map_err(|e| failed(&e))?;
    }
    Ok(files)
}

fn finish(w: valv_age::Writer<std::io::BufWriter<std::fs::File>>) -> Result<(), Box<dyn std::error::Error>> {
    let file = w.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

fn file_name(n: usize) -> String {
    format!("{n}.ndjson.age")
}

/// One read entry per type and patient exported, durable before the manifest exists.
async fn record(app: &App, job: &Job, exported: &BTreeMap<(String, Option<String>), usize>) -> Result<(), ApiError> {
    let query = crate::http::query::encode(&[("job".to_string(), job.id.clone())]);
    // Stamped when recorded (the log's time order), the kick-off's time in the reason.
    let ctx = at(&job.ctx, app.clock.now_ms());
    let asked = date::format_instant(job.ctx.now);
    let mut filters: HashMap<&str, Filter<'_>> = HashMap::new();
    let mut events = Vec::new();
    for ((resource_type, patient), count) in exported {
        let filter = filters.entry(resource_type).or_insert_with(|| Filter::new(app, &ctx, Action::Read, resource_type));
        let touch = Touch { interaction: "export", action: Action::Read, resource_type, id: None, version: None, patient: patient.as_deref(), query: Some(query.clone()) };
        let permit = filter.permit(patient.as_deref());
        let mut e = ctx.permitted(&touch, 200, &permit)?;
        e.reason = format!("{}; {count} resource(s) exported (asked for at {asked})", permit.reason);
        events.push(e);
        if events.len() == AUDIT_BATCH {
            audit(app, std::mem::take(&mut events)).await?;
        }
    }
    if !events.is_empty() {
        audit(app, events).await?;
    }
    Ok(())
}

/// `GET /fhir/$export-status/{id}`: 202 with progress while the job runs, the manifest when it
/// is done, its error when it failed.
pub async fn status(app: &App, ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let job = app.exports.owned(app, id, ctx, app.clock.now_ms())?;
    match job.state() {
        state @ (State::Queued | State::Running) => {
            let mut reply = Reply::empty(StatusCode::ACCEPTED);
            let progress = match state {
                State::Queued => "queued".to_string(),
                _ => format!("{} resources written", job.written.load(Ordering::Relaxed)),
            };
            reply.headers.push(("x-progress", progress));
            reply.headers.push(("retry-after", RETRY_AFTER.to_string()));
            Ok(reply)
        }
        State::Failed { message, .. } => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", format!("the export failed: {message}"))),
        State::Done { files, transaction_time, expires, .. } => {
            let output: Vec<Value> = files
                .iter()
                .enumerate()
                .map(|(n, f)| json!({"type": f.resource_type, "url": format!("{}/$export-file/{id}/{n}", app.base_url), "count": f.count}))
                .collect();
            let mut reply = Reply::json(
                StatusCode::OK,
                json!({
                    "transactionTime": date::format_instant(transaction_time),
                    "request": job.request,
                    "requiresAccessToken": true,
                    "output": output,
                    "error": [],
                    "extension": {"https://valv.dev/export/expires": date::format_instant(expires)},
                }),
            );
            reply.headers.push(("expires", crate::http_date(expires)));
            Ok(reply)
        }
    }
}

/// `DELETE /fhir/$export-status/{id}`: cancels a job that runs, deletes the files of one done.
pub async fn cancel(app: &App, ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    app.exports.owned(app, id, ctx, app.clock.now_ms())?;
    app.exports.remove(id);
    Ok(Reply::empty(StatusCode::ACCEPTED))
}

/// `GET /fhir/$export-file/{id}/{n}`: one file, decrypted as it is sent. Recorded first.
pub async fn file(app: &App, ctx: &Ctx, id: &str, n: &str) -> Result<Reply, ApiError> {
    let job = app.exports.owned(app, id, ctx, app.clock.now_ms())?;
    let State::Done { files, .. } = job.state() else {
        return Err(ApiError::not_found(format!("export {id} has no files yet")));
    };
    let index: usize = n.parse().map_err(|_| ApiError::not_found(format!("export {id} has no file '{n}'")))?;
    let out = files.get(index).ok_or_else(|| ApiError::not_found(format!("export {id} has no file '{n}'")))?;
    let query = crate::http::query::encode(&[("job".to_string(), id.to_string()), ("file".to_string(), n.to_string())]);
    let touch = Touch { interaction: "export-file", action: Action::Read, resource_type: &out.resource_type, id: None, version: None, patient: None, query: Some(query) };
    // Decided again: a caller who may no longer search the type gets nothing (403, recorded).
    let subject = app.access.subject(&ctx.principal);
    let asked = Touch { interaction: "export-file", action: Action::Search, resource_type: &out.resource_type, id: None, version: None, patient: None, query: None };
    let decision = app.access.may_search(&subject, &ctx.question(&asked));
    let permit = enforce(app, ctx, &touch, decision).await?;
    let Ok(slot) = app.exports.downloads.clone().try_acquire_owned() else {
        return Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", format!("{MAX_DOWNLOADS} export files are being downloaded; retry shortly")).retry_after(5));
    };
    let path = app.exports.job_dir(id).join(file_name(index));
    let identity = valv_age::Identity::from_bytes(*job.secret);
    // The header is checked before anything is answered; the body streams after.
    let reader = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let f = std::fs::File::open(&path).map_err(|e| e.to_string())?;
        valv_age::decrypt(std::io::BufReader::new(f), &[identity]).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("export file {id}/{n} cannot be opened: {e}")))?;
    let mut event = ctx.permitted(&touch, 200, &permit)?;
    event.reason = format!("{}; export {id} file {n}: {} resource(s), each decided and recorded when exported", permit.reason, out.count);
    audit(app, vec![event]).await?;
    let (tx, body) = Body::channel();
    tokio::spawn(stream_out(reader, tx, slot));
    Ok(Reply { stream: Some((NDJSON.into(), body)), ..Reply::empty(StatusCode::OK) })
}

/// Decrypts into the response in 64 KiB pieces, each on a blocking thread only while it is
/// decrypted (a client that reads slowly holds no thread); gives up on a client that stops
/// reading for [`SEND_TIMEOUT`] or goes away. `_slot` is the download's place in
/// [`MAX_DOWNLOADS`].
async fn stream_out<R: Read + Send + 'static>(reader: R, tx: mpsc::Sender<Result<Bytes, std::io::Error>>, _slot: tokio::sync::OwnedSemaphorePermit) {
    let mut reader = Some(reader);
    while let Some(mut r) = reader.take() {
        let piece = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let read = r.read(&mut buf).map(|n| {
                buf.truncate(n);
                buf
            });
            (r, read)
        })
        .await;
        let Ok((r, read)) = piece else { return };
        match read {
            Ok(buf) if buf.is_empty() => return,
            Ok(buf) => {
                if tx.send_timeout(Ok(Bytes::from(buf)), SEND_TIMEOUT).await.is_err() {
                    return;
                }
                reader = Some(r);
            }
            Err(e) => {
                tracing::error!(error = %e, "an export file failed to decrypt while being sent");
                let _ = tx.send_timeout(Err(e), SEND_TIMEOUT).await;
                return;
            }
        }
    }
}
