//! Files as `Binary` content (FHIR R4 §Binary; issue 13). `POST /fhir/Binary` with any
//! Content-Type but FHIR JSON takes the body as the file's bytes, for the patient named by
//! `X-Security-Context: Patient/{id}`; `GET /fhir/Binary/{id}` with an Accept other than FHIR
//! JSON answers the bytes (one `Range` honoured: 206/416). A Binary created as FHIR JSON keeps
//! its base64 `data` in its sealed body as before; both kinds are read raw the same way.
//!
//! A file never passes whole through memory: the body is sealed segment by segment
//! (`valv_files::sealed`, 64 KiB) into the file store as it arrives, its SHA-256 taken on the
//! way, and read back a run of segments at a time. Each file has its own random key, sealed
//! under the patient's data key in the store (`valv_store::FileRow`), so erasing the patient
//! leaves it unreadable and rotating their key re-seals only the small file key.
//!
//! Decisions and audit: an upload is decided as a create of the patient's data and recorded
//! before the first byte is stored, then again once committed with the file's SHA-256 and
//! size; a read or range read is decided as a read of the patient's data and recorded, with
//! the hash and the range, before the first byte is sent. Files never change: a new version
//! of the content is a new Binary.

use crate::error::ApiError;
use crate::request::{audit, audit_failure, authorize, authorize_file, Ctx, Permit, Touch};
use crate::{App, Reply};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use valv_crypto::stream::{Randomness, SEGMENT};
use valv_crypto::{Aad, DataKey};
use valv_files::sealed::{SealedReader, SealedWriter};
use valv_files::{FilesError, ObjectStore};
use valv_policy::Action;
use valv_store::vault::{self, random_bytes, WriteOp};
use valv_store::FileRow;

pub use valv_store::vault::FILE_EXTENSION;

/// Segments a download reads and decrypts per store read, and sends as one piece (64 KiB).
const RUN: u64 = 1;
/// What one streaming download holds at most: the pieces waiting in its channel, the run being
/// read (sealed and opened). Taken from the server's body-memory budget while it streams, so
/// that downloads in all hold a bounded amount (503 beyond).
const DOWNLOAD_MEMORY: usize = (crate::http::body::STREAM_DEPTH + 2) * RUN as usize * SEGMENT;
/// How long a download waits for a slow client to take the next piece before giving up.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The file store and its limits.
pub struct Files {
    pub store: Arc<dyn ObjectStore>,
    /// Largest file accepted (413 beyond).
    pub max_bytes: u64,
    /// Files up to this size are also answered as FHIR JSON with base64 `data`.
    pub inline_max_bytes: u64,
    /// The malware scanner, if one is configured: new files are `pending` until it has
    /// scanned them; without one they are recorded `unscanned`.
    pub scanner: Option<super::scan::Scanner>,
    /// Wakes the scanner when a file has been stored.
    pub scan_wake: tokio::sync::Notify,
    /// Whether files beyond the scanner's limits (`unscannable`) are served anyway.
    pub serve_unscannable: bool,
    /// Uploads in progress at once (each holds a segment buffer and a store writer).
    uploads: tokio::sync::Semaphore,
    /// Resumable uploads with a part being written by this server: one part at a time each.
    pub(super) sessions_writing: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Files {
    pub fn new(store: Arc<dyn ObjectStore>, max_bytes: u64, inline_max_bytes: u64, scanner: Option<super::scan::Scanner>, serve_unscannable: bool, max_uploads: usize) -> Self {
        Files { store, max_bytes, inline_max_bytes, scanner, scan_wake: tokio::sync::Notify::new(), serve_unscannable, uploads: tokio::sync::Semaphore::new(max_uploads.max(1)), sessions_writing: Default::default() }
    }
}

/// A FHIR request that is about a file's bytes rather than FHIR JSON.
pub enum FileRequest {
    Upload,
    Download { id: String, version: Option<u64> },
    /// A resumable upload: started, continued, asked about, abandoned (see `fhir::resumable`).
    UploadStart,
    UploadAppend { session: String },
    UploadStatus { session: String },
    UploadAbort { session: String },
    /// `POST /fhir/Binary/{id}/$ticket` and `DELETE` (see `fhir::ticket`).
    Ticket { id: String },
    RevokeTickets { id: String },
}

/// Whether the request uploads or downloads raw bytes (see the module doc); `None` leaves it to
/// the FHIR JSON interactions.
pub fn file_request(req: &Request<Incoming>) -> Option<FileRequest> {
    let rest = req.uri().path().strip_prefix("/fhir/Binary")?;
    let query = req.uri().query().unwrap_or("");
    let json_asked = query.split('&').any(|kv| kv.starts_with("_format="));
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method(), segs.as_slice()) {
        (&Method::POST, ["$upload"]) => Some(FileRequest::UploadStart),
        (&Method::PATCH, ["$upload", s]) => Some(FileRequest::UploadAppend { session: s.to_string() }),
        (&Method::HEAD, ["$upload", s]) => Some(FileRequest::UploadStatus { session: s.to_string() }),
        (&Method::DELETE, ["$upload", s]) => Some(FileRequest::UploadAbort { session: s.to_string() }),
        (&Method::POST, []) if !is_fhir_json(header_str(req.headers(), header::CONTENT_TYPE)) => Some(FileRequest::Upload),
        (&Method::POST, [id, "$ticket"]) => Some(FileRequest::Ticket { id: id.to_string() }),
        (&Method::DELETE, [id, "$ticket"]) => Some(FileRequest::RevokeTickets { id: id.to_string() }),
        (&Method::GET | &Method::HEAD, [id]) if wants_raw(req.headers()) && !json_asked => Some(FileRequest::Download { id: id.to_string(), version: None }),
        (&Method::GET | &Method::HEAD, [id, "_history", v]) if wants_raw(req.headers()) && !json_asked => {
            // An unparseable version is the FHIR read's 404 to give.
            v.parse().ok().map(|version| FileRequest::Download { id: id.to_string(), version: Some(version) })
        }
        _ => None,
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn is_fhir_json(content_type: Option<&str>) -> bool {
    let media = content_type.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    media == "application/fhir+json" || media == "application/json"
}

/// Raw bytes unless the client asks for JSON (or anything, or says nothing).
fn wants_raw(h: &HeaderMap) -> bool {
    match header_str(h, header::ACCEPT).map(str::trim) {
        None | Some("") | Some("*/*") => false,
        Some(a) => !a.to_ascii_lowercase().contains("json"),
    }
}

/// What a file's segments are bound to: its Binary and patient (version 1: files never change).
pub(super) fn file_aad<'a>(binary_id: &'a str, patient: &'a str) -> Aad<'a> {
    Aad { purpose: "file", resource_type: "Binary", id: binary_id, version: 1, patient }
}

/// What an upload names as its security context: `Patient/{id}`, or a resource of the patient
/// (`DocumentReference/{id}`, …), as (type, id).
pub(super) fn security_context(h: &HeaderMap) -> Result<(String, String), ApiError> {
    let value = h
        .get("x-security-context")
        .ok_or_else(|| ApiError::bad_request("a file upload needs X-Security-Context: Patient/{id}, the patient whose data the file is"))?
        .to_str()
        .map_err(|_| ApiError::bad_request("X-Security-Context must be visible ASCII"))?
        .trim();
    match value.split_once('/') {
        Some((t, id)) if valv_fhir::compartment::is_patient_data_type(t) && valv_fhir::id::is_valid_id(id) => Ok((t.to_string(), id.to_string())),
        _ => Err(ApiError::bad_request(format!(
            "X-Security-Context must name the patient (Patient/{{id}}) or a resource of theirs (e.g. DocumentReference/{{id}}), got '{}'",
            value.chars().take(80).collect::<String>()
        ))),
    }
}

/// The patient a security context belongs to (`None` when it names nothing on this server, or
/// a resource of no patient).
pub(super) async fn context_patient(app: &App, (resource_type, id): &(String, String)) -> Result<Option<String>, ApiError> {
    if resource_type == "Patient" {
        return Ok(Some(id.clone()));
    }
    Ok(app.vault.locate(resource_type, id).await?.filter(|l| !l.deleted).and_then(|l| l.patient))
}

/// The uploaded file's media type: required, and a FHIR code (no control characters).
pub(super) fn upload_content_type(h: &HeaderMap) -> Result<String, ApiError> {
    let ct = header_str(h, header::CONTENT_TYPE).map(str::trim).unwrap_or("");
    let valid = !ct.is_empty() && ct.len() <= 255 && ct.contains('/') && ct.chars().all(|c| c.is_ascii_graphic() || c == ' ') && !ct.contains("  ");
    if valid {
        Ok(ct.to_string())
    } else {
        Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-supported", "a file upload needs its media type as Content-Type (e.g. image/png, application/pdf)"))
    }
}

pub(super) fn file_error(e: FilesError) -> ApiError {
    match e {
        FilesError::Sealed(m) => {
            tracing::error!(error = %m, "a stored file failed its integrity check");
            vault_integrity()
        }
        FilesError::Missing(_) | FilesError::Range { .. } => {
            tracing::error!(error = %e, "a stored file is missing or shorter than recorded");
            vault_integrity()
        }
        other => {
            tracing::error!(error = %other, "file storage failure");
            ApiError::unavailable("file storage is unavailable")
        }
    }
}

fn vault_integrity() -> ApiError {
    ApiError::internal("stored data failed its integrity check; the incident has been logged")
}

pub(super) fn upload_touch<'a>(id: &'a str, patient: Option<&'a str>) -> Touch<'a> {
    Touch { interaction: "create", action: Action::Create, resource_type: "Binary", id: Some(id), version: None, patient, query: None }
}

/// `POST /fhir/Binary` with the file as the body.
pub async fn upload(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Reply, ApiError> {
    let content_type = upload_content_type(req.headers())?;
    let id = vault::new_id()?;
    let (patient, permit) = decide_upload(app, ctx, req.headers(), &id, "create").await?;
    let touch = upload_touch(&id, Some(&patient));
    let declared = header_str(req.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.files.max_bytes) {
        return Err(audit_failure(app, ctx, &touch, too_large(app)).await);
    }
    let Ok(_slot) = app.files.uploads.try_acquire() else {
        let e = ApiError::unavailable("too many uploads are in progress; try again shortly").retry_after(5);
        return Err(audit_failure(app, ctx, &touch, e).await);
    };
    audit(app, vec![ctx.permitted(&touch, 0, &permit)?]).await?;
    let object = valv_crypto::hex::encode(&random_bytes::<16>()?);
    // Removes the object and its record unless the Binary commits: also when the request is
    // dropped half way (a reset stream, the shutdown's grace running out).
    let mut guard = Unfinished { store: app.vault.store().clone(), files: app.files.store.clone(), object: Some(object.clone()) };
    let stored = match store(app, req.into_body(), &object, &id, &patient, ctx.now).await {
        Ok(s) => s,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    commit_upload(app, ctx, &touch, &mut guard, &content_type, &stored, &permit.reason).await
}

/// Decides an upload (in one request or resumable) for the patient its `X-Security-Context`
/// names, who must exist and not be erased (no key is ever made for an invented id): the
/// patient and the permit. A context that names nothing here is decided as no patient's —
/// people are refused as for another patient's, so existence is not told — then 422.
pub(super) async fn decide_upload(app: &App, ctx: &Ctx, headers: &HeaderMap, id: &str, interaction: &'static str) -> Result<(String, Permit), ApiError> {
    let context = security_context(headers)?;
    let owner = context_patient(app, &context).await?;
    let touch = Touch { interaction, ..upload_touch(id, owner.as_deref()) };
    let permit = authorize(app, ctx, &touch).await?;
    let refused = match owner.as_deref() {
        None => format!("{}/{} names no patient's data on this server", context.0, context.1),
        Some(p) => match app.vault.locate("Patient", p).await? {
            Some(l) if !l.deleted && !app.vault.is_erased(p) => return Ok((p.to_string(), permit)),
            _ => format!("Patient/{p} does not exist on this server"),
        },
    };
    Err(audit_failure(app, ctx, &touch, ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "processing", refused)).await)
}

/// Commits the Binary of a stored and recorded file (its guard disarmed then), wakes the
/// scanner, and records the upload's success with `note`, the SHA-256 and size: the 201 answer.
pub(super) async fn commit_upload(app: &App, ctx: &Ctx, touch: &Touch<'_>, guard: &mut Unfinished, content_type: &str, stored: &FileRow, note: &str) -> Result<Reply, ApiError> {
    let body = json!({"resourceType": "Binary", "contentType": content_type, "securityContext": {"reference": format!("Patient/{}", stored.patient)}});
    let op = WriteOp::Create { resource_type: "Binary".into(), id: stored.binary_id.clone(), body, unless: None };
    let committed = match super::commit(app, vec![op], ctx.now).await.map_err(ApiError::from).and_then(|mut c| c.pop().ok_or_else(|| ApiError::internal("the store returned no result"))) {
        Ok(c) => c,
        Err(e) => return Err(audit_failure(app, ctx, touch, e).await),
    };
    guard.object = None;
    app.files.scan_wake.notify_one();
    let reason = format!("{note}; file sha256={} bytes={}", valv_crypto::hex::encode(&stored.sha256), stored.size);
    let done = Touch { version: Some(1), query: None, ..*touch };
    audit(app, vec![ctx.event(&done, crate::audit::Outcome::Success, 201, &reason)?]).await?;
    let mut reply = super::write_reply(ctx, StatusCode::CREATED, committed.resource);
    if let Some(body) = reply.body.as_mut() {
        describe(body, stored);
    }
    Ok(reply)
}

pub(super) fn too_large(app: &App) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-costly", format!("the file exceeds this server's limit of {} bytes", app.files.max_bytes))
}

/// Streams the body into a new sealed object and records it; on any failure nothing is left.
async fn store(app: &App, body: Incoming, object: &str, id: &str, patient: &str, now: i64) -> Result<FileRow, ApiError> {
    let file_key = DataKey::from_bytes(random_bytes()?);
    let random = Randomness { salt: random_bytes()?, nonce_prefix: random_bytes()? };
    let mut writer = SealedWriter::create(&*app.files.store, object, &file_key, &file_aad(id, patient), &random).await.map_err(file_error)?;
    receive(app, body, &mut writer, app.files.max_bytes).await?;
    let written = writer.finish().await.map_err(file_error)?;
    record(app, id, object, patient, &written, &file_key, now).await
}

/// Records a finished file under its patient (its key sealed under theirs).
pub(super) async fn record(app: &App, id: &str, object: &str, patient: &str, written: &valv_files::sealed::Written, file_key: &DataKey, now: i64) -> Result<FileRow, ApiError> {
    let row = FileRow {
        binary_id: id.to_string(),
        object: object.to_string(),
        patient: patient.to_string(),
        sealed_key: Vec::new(),
        size: written.plaintext_len,
        sha256: written.sha256,
        scan: if app.files.scanner.is_some() { "pending" } else { "unscanned" }.to_string(),
        created: now,
    };
    app.vault.put_file(row.clone(), file_key, now).await?;
    Ok(row)
}

/// Streams a request body into `writer`, at most `limit` bytes, kept to the minimum rate (no
/// total time limit: a large file on a slow link is legitimate); how many bytes came.
pub(super) async fn receive(app: &App, mut body: Incoming, writer: &mut SealedWriter, limit: u64) -> Result<u64, ApiError> {
    let limits = &app.limits;
    let start = tokio::time::Instant::now();
    let mut received: u64 = 0;
    loop {
        let deadline = upload_deadline(app, start, received);
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = tokio::time::sleep_until(deadline) => {
                limits.counters.bodies_timed_out.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", format!(
                    "the file arrived too slowly ({received} bytes in {} s): after the first {} s it must arrive at {} bytes/s",
                    start.elapsed().as_secs(), limits.settings.body_grace.as_secs(), limits.settings.body_min_bytes_per_sec)));
            }
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|_| ApiError::bad_request("the file could not be read to its end (the upload was cut off)"))?.into_data() else { continue };
        received += data.len() as u64;
        if received > limit {
            limits.counters.bodies_too_large.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-costly", format!("the body exceeds the {limit} bytes it may have")));
        }
        writer.write(&data).await.map_err(file_error)?;
    }
    Ok(received)
}

/// A file's body has no total time limit (a large file on a slow link is legitimate), only
/// the minimum rate after the grace period.
fn upload_deadline(app: &App, start: tokio::time::Instant, received: u64) -> tokio::time::Instant {
    let s = &app.limits.settings;
    start + s.body_grace + std::time::Duration::from_secs_f64(received as f64 / s.body_min_bytes_per_sec.max(1) as f64)
}

/// An upload whose Binary has not committed: dropped while it still holds the object, it
/// removes the object and its record (on a task of its own: a drop cannot wait).
pub(super) struct Unfinished {
    pub(super) store: Arc<dyn valv_store::Store>,
    pub(super) files: Arc<dyn ObjectStore>,
    pub(super) object: Option<String>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, files) = (self.store.clone(), self.files.clone());
        runtime.spawn(async move {
            if let Err(e) = store.delete_file(&object).await {
                tracing::warn!(error = %e, "an unfinished upload's file record could not be removed");
            }
            if let Err(e) = files.delete(&object).await {
                tracing::warn!(error = %e, "an unfinished upload's object could not be removed");
            }
        });
    }
}

/// Adds the file's size, SHA-256 and scan status to a Binary's FHIR JSON (in `meta`: R4's
/// Binary is no DomainResource and has no `extension` of its own).
pub fn describe(body: &mut Value, file: &FileRow) {
    let sha = base64::engine::general_purpose::STANDARD.encode(file.sha256);
    let ext = json!({"url": FILE_EXTENSION, "extension": [
        {"url": "size", "valueDecimal": file.size},
        {"url": "sha256", "valueBase64Binary": sha},
        {"url": "scan", "valueCode": file.scan},
    ]});
    let Some(root) = body.as_object_mut() else { return };
    let meta = root.entry("meta").or_insert_with(|| json!({}));
    if let Some(o) = meta.as_object_mut() {
        match o.get_mut("extension").and_then(Value::as_array_mut) {
            Some(list) => list.push(ext),
            None => {
                o.insert("extension".into(), json!([ext]));
            }
        }
    }
}

/// A Binary's FHIR JSON as a read answers it: a file-backed one gains the file's extension
/// and, up to `inline_max_bytes` and if it may be served, its bytes as base64 `data`.
/// Also the note its audit entry carries (the file's SHA-256).
pub async fn json_view(app: &App, ctx: &Ctx, v: &valv_store::StoredVersion, plain: Vec<u8>) -> Result<(Vec<u8>, Option<String>), ApiError> {
    let Some(file) = app.vault.store().file(&v.id).await? else { return Ok((plain, None)) };
    let mut body: Value = serde_json::from_slice(&plain).map_err(|_| vault_integrity())?;
    describe(&mut body, &file);
    if file.size <= app.files.inline_max_bytes && may_serve(app, ctx, &file) {
        body["data"] = Value::String(base64::engine::general_purpose::STANDARD.encode(read_whole(app, &file, ctx.now).await?));
    }
    let note = format!("file sha256={}", valv_crypto::hex::encode(&file.sha256));
    Ok((serde_json::to_vec(&body).map_err(|e| ApiError::internal(format!("serialising: {e}")))?, Some(note)))
}

/// A requested byte range, resolved against the content's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Whole,
    /// Bytes `[start, end)`.
    Part(u64, u64),
    /// Nothing of it lies in the content (416).
    Unsatisfiable,
}

/// Reads a `Range` header for content of `len` bytes (RFC 9110 §14): one `bytes=` range is
/// honoured; another unit or several ranges are ignored (the whole content, as the RFC allows);
/// a malformed or reversed one, or one starting past the end, is unsatisfiable.
pub fn span(range: Option<&str>, len: u64) -> Span {
    let Some(r) = range.map(str::trim) else { return Span::Whole };
    let Some(spec) = r.strip_prefix("bytes=") else { return Span::Whole };
    if spec.contains(',') {
        return Span::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return Span::Unsatisfiable };
    let num = |s: &str| if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (a.trim(), b.trim()) {
        ("", suffix) => match num(suffix) {
            Some(n) if n > 0 && len > 0 => Span::Part(len - n.min(len), len),
            _ => Span::Unsatisfiable,
        },
        (first, "") => match num(first) {
            Some(f) if f < len => Span::Part(f, len),
            _ => Span::Unsatisfiable,
        },
        (first, last) => match (num(first), num(last)) {
            (Some(f), Some(l)) if f <= l && f < len => Span::Part(f, l.saturating_add(1).min(len)),
            _ => Span::Unsatisfiable,
        },
    }
}

/// Where a Binary's bytes come from.
enum Content {
    /// Base64 `data` in its sealed body (a Binary created as FHIR JSON).
    Inline(Bytes),
    File(FileRow, Box<SealedReader>),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Inline(b) => b.len() as u64,
            Content::File(f, _) => f.size,
        }
    }
}

/// `GET /fhir/Binary/{id}` (or a version) with a non-JSON Accept: the bytes, or the range asked.
/// `via` is added to the audit entry's reason (a ticket's use).
pub async fn download(app: &App, ctx: &Ctx, id: &str, version: Option<u64>, headers: &HeaderMap, head: bool, via: Option<&str>) -> Result<Reply, ApiError> {
    super::check_id(id)?;
    let stored = app.vault.fetch("Binary", id, version).await?;
    let patient = stored.as_ref().and_then(|v| v.patient.clone());
    let touch = Touch {
        interaction: if version.is_some() { "vread" } else { "read" },
        action: if version.is_some() { Action::VRead } else { Action::Read },
        resource_type: "Binary",
        id: Some(id),
        version,
        patient: patient.as_deref(),
        query: None,
    };
    // An earlier version of a deleted Binary stays in its history, but its bytes are not served
    // (nor through a ticket to that version).
    let deleted_since = version.is_some() && app.vault.store().locate("Binary", id).await?.is_some_and(|l| l.deleted);
    let file = match &stored {
        Some(v) if !v.deleted && !deleted_since => app.vault.store().file(id).await?,
        _ => None,
    };
    let permit = authorize_file(app, ctx, &touch, file.as_ref().map(|f| f.scan.as_str())).await?;
    let v = match stored {
        Some(v) if v.deleted || deleted_since => return Err(audit_failure(app, ctx, &touch, ApiError::new(StatusCode::GONE, "deleted", format!("Binary/{id} has been deleted"))).await),
        Some(v) => v,
        None => return Err(audit_failure(app, ctx, &touch, ApiError::not_found(format!("Binary/{id} is not known"))).await),
    };
    let (content_type, content) = match open_content(app, ctx, &v, file).await {
        Ok(c) => c,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let len = content.len();
    let range = span(header_str(headers, header::RANGE), len);
    let (status, start, end) = match range {
        Span::Whole => (StatusCode::OK, 0, len),
        Span::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
        Span::Unsatisfiable => {
            let e = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "invalid", format!("the range asked for is not within the {len} bytes of Binary/{id}"));
            let e = audit_failure(app, ctx, &touch, e).await;
            return Err(ApiError { range_of: Some(len), ..e });
        }
    };
    let touch = Touch { version: Some(v.version), ..touch };
    let memory = match (&content, head || start == end) {
        (Content::File(..), false) => match app.limits.reserve(DOWNLOAD_MEMORY) {
            Ok(r) => Some(r),
            Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
        },
        _ => None,
    };
    let mut reason = permit.reason.clone();
    if let Content::File(f, _) = &content {
        reason.push_str(&format!("; file sha256={}", valv_crypto::hex::encode(&f.sha256)));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        reason.push_str(&format!("; bytes {start}-{}/{len}", end - 1));
    }
    if let Some(via) = via {
        reason.push_str(&format!("; {via}"));
    }
    let mut permitted = ctx.permitted(&touch, status.as_u16(), &permit)?;
    permitted.reason = reason;
    audit(app, vec![permitted]).await?;

    let mut reply = Reply::empty(status);
    reply.resource = Some(("Binary".into(), id.to_string(), v.version, v.last_updated));
    reply.headers.push(("accept-ranges", "bytes".into()));
    reply.headers.push(("content-length", (end - start).to_string()));
    // The file is the client's content, not the API's: never rendered in this origin.
    reply.headers.push(("content-disposition", format!("attachment; filename=\"Binary-{id}\"")));
    reply.headers.push(("content-security-policy", "sandbox; default-src 'none'".into()));
    if status == StatusCode::PARTIAL_CONTENT {
        reply.headers.push(("content-range", format!("bytes {start}-{}/{len}", end - 1)));
    }
    if let Content::File(f, _) = &content {
        reply.headers.push(("repr-digest", format!("sha-256=:{}:", base64::engine::general_purpose::STANDARD.encode(f.sha256))));
        reply.headers.push(("x-scan-status", f.scan.clone()));
    }
    let body = if head || start == end {
        crate::http::body::Body::empty()
    } else {
        match content {
            Content::Inline(bytes) => crate::http::body::Body::full(bytes.slice(start as usize..end as usize)),
            Content::File(f, reader) => {
                let whole = start == 0 && end == f.size;
                stream_file(*reader, start, end, memory, whole.then_some(f.sha256))
            }
        }
    };
    reply.stream = Some((content_type.into(), body));
    Ok(reply)
}

/// The Binary's media type and content (`file`: its file record, if it is file-backed), if it
/// may be served: a file must have passed (or not need) its malware scan, belong to the
/// Binary's patient and open under its key.
async fn open_content(app: &App, ctx: &Ctx, v: &valv_store::StoredVersion, file: Option<FileRow>) -> Result<(String, Content), ApiError> {
    let plain = app.vault.open_bytes(v, ctx.now).await?;
    let body: Value = serde_json::from_slice(&plain).map_err(|_| vault_integrity())?;
    // A JSON Binary's contentType is only a FHIR code: one that is no valid header value is
    // answered as bytes.
    let content_type = body
        .get("contentType")
        .and_then(Value::as_str)
        .filter(|t| hyper::header::HeaderValue::from_str(t).is_ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let Some(file) = file else {
        if app.files.scanner.is_some() {
            // Sent as FHIR JSON, its data never went through the scanner: it is FHIR data to
            // API clients (in the JSON), never bytes handed to a viewer.
            return Err(ApiError::new(StatusCode::FORBIDDEN, "security", format!(
                "Binary/{} was created as FHIR JSON and its data was never scanned for malware: read it as FHIR JSON, or upload the file raw", v.id)));
        }
        let data = body.get("data").and_then(Value::as_str).ok_or_else(|| ApiError::not_found(format!("Binary/{} holds no data", v.id)))?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|_| vault_integrity())?;
        return Ok((content_type, Content::Inline(Bytes::from(bytes))));
    };
    if v.patient.as_deref() != Some(file.patient.as_str()) {
        tracing::error!("a file record names another patient than its Binary (tampering?)");
        return Err(vault_integrity());
    }
    check_scan(&file, app.files.serve_unscannable)?;
    let key = app.vault.file_key(&file, ctx.now).await?;
    let reader = SealedReader::open(app.files.store.clone(), &file.object, &key, &file_aad(&file.binary_id, &file.patient)).await.map_err(file_error)?;
    if reader.plaintext_len != file.size {
        tracing::error!("a stored file's length differs from its record (truncated or replaced?)");
        return Err(vault_integrity());
    }
    Ok((content_type, Content::File(file, Box::new(reader))))
}

/// A small file's bytes whole (inline `data`, patient exports), checked against its record.
pub(super) async fn read_whole(app: &App, file: &FileRow, now: i64) -> Result<Vec<u8>, ApiError> {
    let key = app.vault.file_key(file, now).await?;
    let reader = SealedReader::open(app.files.store.clone(), &file.object, &key, &file_aad(&file.binary_id, &file.patient)).await.map_err(file_error)?;
    if reader.plaintext_len != file.size {
        tracing::error!("a stored file's length differs from its record (truncated or replaced?)");
        return Err(vault_integrity());
    }
    let bytes = reader.range(0, file.size).await.map_err(file_error)?;
    if <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&bytes)) != file.sha256 {
        tracing::error!("a stored file's content does not match its recorded SHA-256 (record or object replaced?)");
        return Err(vault_integrity());
    }
    Ok(bytes)
}

/// Whether `file`'s bytes may go to the caller beside an access already decided and audited
/// (inline `data`): its scan passed and the policy, seeing the scan status,
/// permits reading it. A refusal here leaves the bytes out, quietly.
fn may_serve(app: &App, ctx: &Ctx, file: &FileRow) -> bool {
    if check_scan(file, app.files.serve_unscannable).is_err() {
        return false;
    }
    let q = valv_policy::Question {
        action: Action::Read,
        resource_type: "Binary",
        patient: Some(&file.patient),
        now: ctx.now,
        purpose: ctx.purpose(),
        file_scan: Some(&file.scan),
    };
    app.access.decide(&app.access.subject(&ctx.principal), &q).permit
}

/// Only files that passed the scan (or were stored without a scanner, or are beyond its limits
/// where the operator allows those) are served.
pub(super) fn check_scan(file: &FileRow, serve_unscannable: bool) -> Result<(), ApiError> {
    match file.scan.as_str() {
        "clean" | "unscanned" => Ok(()),
        "unscannable" if serve_unscannable => Ok(()),
        "pending" => Err(ApiError::new(StatusCode::CONFLICT, "transient", "the file is waiting for its malware scan; try again shortly").retry_after(2)),
        "infected" => Err(ApiError::new(StatusCode::FORBIDDEN, "security", "the file failed its malware scan (infected): it is never served")),
        "unscannable" => Err(ApiError::new(StatusCode::FORBIDDEN, "security", "the file is beyond the malware scanner's limits and was not passed: it is not served")),
        _ => Err(ApiError::new(StatusCode::FORBIDDEN, "security", "the file's malware scan failed: it is not served until scanned again")),
    }
}

/// Decrypts `[start, end)` a run of segments at a time into a streamed body; a segment that
/// fails to open ends the body early (the client sees a truncated transfer, never wrong bytes).
/// A whole file is also checked against its recorded SHA-256 (`expect`): its last piece is sent
/// only if the digest of everything before and it matches.
fn stream_file(reader: SealedReader, start: u64, end: u64, memory: Option<crate::http::limits::Reservation>, expect: Option<[u8; 32]>) -> crate::http::body::Body {
    let (tx, body) = crate::http::body::Body::channel();
    tokio::spawn(async move {
        use sha2::Digest as _;
        // Held until the last piece is handed over.
        let _memory = memory;
        let seg = SEGMENT as u64;
        let mut at = start;
        let mut digest = expect.map(|_| sha2::Sha256::new());
        while at < end {
            let first = at / seg;
            // Only the segments the range covers are read and opened.
            let needed = (end - 1) / seg - first + 1;
            let run = match reader.segment_run(first, needed.min(RUN)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "a stored file failed while being sent");
                    let _ = tx.send(Err(std::io::Error::other("the file failed its integrity check"))).await;
                    return;
                }
            };
            let base = first * seg;
            let a = (at - base) as usize;
            let b = ((end - base) as usize).min(run.len());
            if a >= b {
                return;
            }
            let piece = Bytes::from(run).slice(a..b);
            at = base + b as u64;
            if let Some(d) = digest.as_mut() {
                d.update(&piece);
            }
            if at >= end && digest.take().is_some_and(|d| Some(<[u8; 32]>::from(d.finalize())) != expect) {
                tracing::error!("a stored file's content does not match its recorded SHA-256 (record or object replaced?)");
                let _ = tx.send(Err(std::io::Error::other("the file does not match its recorded SHA-256"))).await;
                return;
            }
            match tokio::time::timeout(SEND_TIMEOUT, tx.send(Ok(piece))).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_as_rfc_9110_says() {
        let len = 1000;
        for (header, want) in [
            (None, Span::Whole),
            (Some("bytes=0-0"), Span::Part(0, 1)),
            (Some("bytes=0-999"), Span::Part(0, 1000)),
            (Some("bytes=10-2000"), Span::Part(10, 1000)),
            (Some("bytes=999-"), Span::Part(999, 1000)),
            (Some("bytes=-1"), Span::Part(999, 1000)),
            (Some("bytes=-5000"), Span::Part(0, 1000)),
            (Some("bytes=1000-"), Span::Unsatisfiable),
            (Some("bytes=1000-1001"), Span::Unsatisfiable),
            (Some("bytes=-0"), Span::Unsatisfiable),
            (Some("bytes=5-4"), Span::Unsatisfiable),
            (Some("bytes=a-b"), Span::Unsatisfiable),
            (Some("bytes=+1-2"), Span::Unsatisfiable),
            (Some("bytes=-"), Span::Unsatisfiable),
            (Some("bytes=0-1,5-6"), Span::Whole),
            (Some("items=0-1"), Span::Whole),
        ] {
            assert_eq!(span(header, len), want, "{header:?}");
        }
        assert_eq!(span(Some("bytes=0-"), 0), Span::Unsatisfiable, "nothing lies in empty content");
        assert_eq!(span(Some("bytes=-3"), 0), Span::Unsatisfiable);
    }
}
