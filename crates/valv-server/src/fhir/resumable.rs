//! Resumable uploads of large files (issue 13; docs/FILES.md "Resumable uploads"), after tus
//! 1.0's core protocol:
//!
//! ```text
//! POST   /fhir/Binary/$upload            Upload-Length, Content-Type (the file's), X-Security-Context
//!        -> 201, Location: /fhir/Binary/$upload/{session}, Upload-Offset: 0
//! PATCH  /fhir/Binary/$upload/{session}  Upload-Offset (= bytes received), application/offset+octet-stream
//!        -> 204 Upload-Offset (more to come) | 201 the Binary (the last byte arrived)
//! HEAD   /fhir/Binary/$upload/{session}  -> Upload-Offset, Upload-Length
//! DELETE /fhir/Binary/$upload/{session}  -> 204 (abandoned)
//! ```
//!
//! Each PATCH body is stored as one part: an object of its own (`<object>-<part>`), sealed
//! under the file's key with the part's number bound in, and counted only once the whole body
//! has arrived — a PATCH cut off counts for nothing and its part is removed, so the client
//! resumes from the offset HEAD reports and no plaintext tail is ever kept. When the last byte
//! arrives the parts are streamed through into the file's object (its SHA-256 taken on the way),
//! recorded and committed as a one-request upload's, and removed. Every step is decided on the
//! patient for the person or service that started the session (nobody else may continue it)
//! and audited. Sessions last a day; `sweep` removes expired ones with their parts.

use super::binary::{commit_upload, decide_upload, file_aad, file_error, receive, record, too_large, upload_content_type, upload_touch, Unfinished};
use crate::error::ApiError;
use crate::request::{audit, audit_failure, authorize, Ctx, Touch};
use crate::{App, Reply};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Request, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use valv_crypto::stream::Randomness;
use valv_crypto::{Aad, DataKey};
use valv_files::sealed::{SealedReader, SealedWriter, READ_RUN};
use valv_store::vault::{self, random_bytes};
use valv_store::UploadRow;

/// How long a session may take from its start.
const LIFETIME_MS: i64 = 24 * 3600 * 1000;
/// The most parts one file may come in.
const MAX_PARTS: u32 = 10_000;

fn part_name(object: &str, n: u32) -> String {
    format!("{object}-{n:08x}")
}

fn part_aad<'a>(u: &'a UploadRow, n: u32) -> Aad<'a> {
    Aad { purpose: "upload-part", resource_type: "Binary", id: &u.binary_id, version: u64::from(n), patient: &u.patient }
}

fn header_u64(h: &HeaderMap, name: &str) -> Result<u64, ApiError> {
    let v = h.get(name).and_then(|v| v.to_str().ok()).ok_or_else(|| ApiError::bad_request(format!("{name} is required")))?;
    v.trim().parse().map_err(|_| ApiError::bad_request(format!("{name} must be a number of bytes, got '{v}'")))
}

fn progress(reply: &mut Reply, u: &UploadRow) {
    reply.headers.push(("upload-offset", u.received.to_string()));
    reply.headers.push(("upload-length", u.length.to_string()));
    reply.headers.push(("tus-resumable", "1.0.0".into()));
}

/// `POST /fhir/Binary/$upload`: starts a session.
pub async fn start(app: &App, ctx: &Ctx, req: Request<Incoming>) -> Result<Reply, ApiError> {
    let content_type = upload_content_type(req.headers())?;
    let length = header_u64(req.headers(), "upload-length")?;
    let id = vault::new_id()?;
    let (patient, permit) = decide_upload(app, ctx, req.headers(), &id, "upload-start").await?;
    let touch = Touch { interaction: "upload-start", ..upload_touch(&id, Some(&patient)) };
    if length == 0 || length > app.files.max_bytes {
        let e = if length == 0 { ApiError::bad_request("Upload-Length must be at least 1 byte (send an empty file in one request)") } else { too_large(app) };
        return Err(audit_failure(app, ctx, &touch, e).await);
    }
    let file_key = DataKey::from_bytes(random_bytes()?);
    let session = UploadRow {
        id: valv_crypto::hex::encode(&random_bytes::<16>()?),
        binary_id: id.clone(),
        object: valv_crypto::hex::encode(&random_bytes::<16>()?),
        sealed_key: app.vault.seal_file_key(&patient, &id, &file_key, ctx.now).await?,
        patient: patient.clone(),
        agent: ctx.principal.id.clone(),
        content_type,
        length,
        received: 0,
        parts: 0,
        created: ctx.now,
        expires: ctx.now + LIFETIME_MS,
    };
    if let Err(e) = app.vault.store().put_upload(&session).await {
        return Err(audit_failure(app, ctx, &touch, e.into()).await);
    }
    let mut entry = ctx.permitted(&touch, 201, &permit)?;
    entry.reason = format!("{}; resumable upload of {length} bytes", entry.reason);
    audit(app, vec![entry]).await?;
    let mut reply = Reply::empty(StatusCode::CREATED);
    reply.headers.push(("location", format!("{}/Binary/$upload/{}", app.base_url, session.id)));
    progress(&mut reply, &session);
    Ok(reply)
}

/// The caller's live session (another's, or an unknown or expired one, is 404 alike).
async fn session_of(app: &App, ctx: &Ctx, session: &str) -> Result<UploadRow, ApiError> {
    let unknown = || ApiError::not_found("no such upload (it may have expired: sessions last a day)");
    if !valv_files::check_name(session).is_ok_and(|()| session.len() == 32) {
        return Err(unknown());
    }
    match app.vault.store().upload(session).await? {
        Some(u) if u.agent == ctx.principal.id && u.expires > ctx.now => Ok(u),
        _ => Err(unknown()),
    }
}

/// `HEAD /fhir/Binary/$upload/{session}`: how far it is.
pub async fn status(app: &App, ctx: &Ctx, session: &str) -> Result<Reply, ApiError> {
    let u = session_of(app, ctx, session).await?;
    let mut reply = Reply::empty(StatusCode::OK);
    progress(&mut reply, &u);
    Ok(reply)
}

/// `DELETE /fhir/Binary/$upload/{session}`: abandons it.
pub async fn abort(app: &App, ctx: &Ctx, session: &str) -> Result<Reply, ApiError> {
    let u = session_of(app, ctx, session).await?;
    discard(app, &u).await;
    let touch = Touch { interaction: "upload-abort", ..upload_touch(&u.binary_id, Some(&u.patient)) };
    audit(app, vec![ctx.event(&touch, crate::audit::Outcome::Success, 204, "resumable upload abandoned")?]).await?;
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

/// Removes a session and its parts.
async fn discard(app: &App, u: &UploadRow) {
    for n in 0..u.parts {
        if let Err(e) = app.files.store.delete(&part_name(&u.object, n)).await {
            tracing::warn!(error = %e, "a part of an abandoned upload could not be removed");
        }
    }
    if let Err(e) = app.vault.store().delete_upload(&u.id).await {
        tracing::warn!(error = %e, "an abandoned upload could not be removed");
    }
}

/// `PATCH /fhir/Binary/$upload/{session}`: the next part.
pub async fn append(app: &App, ctx: &Ctx, session: &str, req: Request<Incoming>) -> Result<Reply, ApiError> {
    let u = session_of(app, ctx, session).await?;
    let media = req.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if media.split(';').next().unwrap_or("").trim() != "application/offset+octet-stream" {
        return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not-supported", "a part is sent as application/offset+octet-stream"));
    }
    let offset = header_u64(req.headers(), "upload-offset")?;
    let touch = Touch { interaction: "upload-part", ..upload_touch(&u.binary_id, Some(&u.patient)) };
    let permit = authorize(app, ctx, &touch).await?;
    let Some(_writing) = Writing::claim(app, &u.id) else {
        let e = ApiError::new(StatusCode::CONFLICT, "conflict", "a part of this upload is being written by another request: HEAD tells where the upload is; retry from there").retry_after(1);
        return Err(audit_failure(app, ctx, &touch, e).await);
    };
    // Read again under the claim: a request that held it may have moved the upload on.
    let u = session_of(app, ctx, session).await?;
    if offset == u.length && u.received == u.length {
        // Every byte arrived but the join failed (a 5xx answered the last part): an empty PATCH
        // at the end tries it again.
        let file_key = app.vault.open_sealed_file_key(&u.binary_id, &u.patient, &u.sealed_key, ctx.now).await?;
        return complete(app, ctx, u, &file_key).await;
    }
    if offset != u.received {
        let mut e = ApiError::new(StatusCode::CONFLICT, "conflict", format!("Upload-Offset {offset} is not where the upload is ({} bytes received): HEAD tells, send from there", u.received));
        e = audit_failure(app, ctx, &touch, e).await;
        return Err(e);
    }
    if u.parts >= MAX_PARTS {
        return Err(audit_failure(app, ctx, &touch, ApiError::new(StatusCode::CONFLICT, "too-costly", format!("an upload comes in at most {MAX_PARTS} parts"))).await);
    }
    let file_key = app.vault.open_sealed_file_key(&u.binary_id, &u.patient, &u.sealed_key, ctx.now).await?;
    let n = u.parts;
    let name = part_name(&u.object, n);
    let mut guard = Unfinished { store: app.vault.store().clone(), files: app.files.store.clone(), object: None };
    let random = Randomness { salt: random_bytes()?, nonce_prefix: random_bytes()? };
    let stored = async {
        let mut writer = match SealedWriter::create(&*app.files.store, &name, &file_key, &part_aad(&u, n), &random).await {
            Ok(w) => w,
            // Another request is writing this part (a client's retry), or a failed one's part
            // is still being removed: the part is not this request's to remove.
            Err(valv_files::FilesError::Exists(_)) => {
                return Err(ApiError::new(StatusCode::CONFLICT, "conflict", "this part is being written by another request (or a failed one is being removed): HEAD tells where the upload is; retry from there").retry_after(1))
            }
            Err(e) => return Err(file_error(e)),
        };
        // From here the part is this request's: removed if it does not become part of the upload.
        guard.object = Some(name.clone());
        let got = receive(app, req.into_body(), &mut writer, u.length - u.received).await?;
        writer.finish().await.map_err(file_error)?;
        Ok::<u64, ApiError>(got)
    };
    let got = match stored.await {
        Ok(g) => g,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let received = u.received + got;
    if got == 0 || !app.vault.store().advance_upload(&u.id, u.received, received, n + 1).await? {
        let e = ApiError::new(StatusCode::CONFLICT, "conflict", if got == 0 { "an empty part".to_string() } else { "another part was stored meanwhile: HEAD tells where the upload is".to_string() });
        return Err(audit_failure(app, ctx, &touch, e).await);
    }
    guard.object = None;
    let mut entry = ctx.permitted(&touch, 204, &permit)?;
    entry.reason = format!("{}; part {} bytes {}-{}/{}", entry.reason, n + 1, u.received, received - 1, u.length);
    audit(app, vec![entry]).await?;
    let u = UploadRow { received, parts: n + 1, ..u };
    if received < u.length {
        let mut reply = Reply::empty(StatusCode::NO_CONTENT);
        progress(&mut reply, &u);
        return Ok(reply);
    }
    complete(app, ctx, u, &file_key).await
}

/// A session's claim to write its next part on this server, released when dropped.
struct Writing<'a> {
    app: &'a App,
    session: String,
}

impl<'a> Writing<'a> {
    fn claim(app: &'a App, session: &str) -> Option<Writing<'a>> {
        let mut writing = app.files.sessions_writing.lock().ok()?;
        writing.insert(session.to_string()).then(|| Writing { app, session: session.to_string() })
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if let Ok(mut writing) = self.app.files.sessions_writing.lock() {
            writing.remove(&self.session);
        }
    }
}

/// The last byte arrived: the parts become the file, recorded and committed.
async fn complete(app: &App, ctx: &Ctx, u: UploadRow, file_key: &DataKey) -> Result<Reply, ApiError> {
    let touch = upload_touch(&u.binary_id, Some(&u.patient));
    let mut guard = Unfinished { store: app.vault.store().clone(), files: app.files.store.clone(), object: None };
    let random = Randomness { salt: random_bytes()?, nonce_prefix: random_bytes()? };
    let joined = async {
        let mut writer = SealedWriter::create(&*app.files.store, &u.object, file_key, &file_aad(&u.binary_id, &u.patient), &random).await.map_err(file_error)?;
        // From here the object is this request's: removed unless its Binary commits.
        guard.object = Some(u.object.clone());
        for n in 0..u.parts {
            let part = SealedReader::open(app.files.store.clone(), &part_name(&u.object, n), file_key, &part_aad(&u, n)).await.map_err(file_error)?;
            for at in (0..part.segments()).step_by(READ_RUN as usize) {
                writer.write(&part.segment_run(at, READ_RUN).await.map_err(file_error)?).await.map_err(file_error)?;
            }
        }
        let written = writer.finish().await.map_err(file_error)?;
        if written.plaintext_len != u.length {
            return Err(ApiError::internal("the parts do not add up to the upload's length"));
        }
        Ok(written)
    };
    let written = match joined.await {
        Ok(w) => w,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let stored = match record(app, &u.binary_id, &u.object, &u.patient, &written, file_key, ctx.now).await {
        Ok(s) => s,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let mut reply = commit_upload(app, ctx, &touch, &mut guard, &u.content_type, &stored, &format!("resumable upload in {} parts", u.parts)).await?;
    discard(app, &u).await;
    progress(&mut reply, &u);
    Ok(reply)
}

/// Removes expired sessions and their parts, every ten minutes, for as long as the server runs.
pub async fn sweep(app: Arc<App>) {
    loop {
        tokio::time::sleep(Duration::from_secs(600)).await;
        match app.vault.store().expired_uploads(app.clock.now_ms(), 100).await {
            Ok(expired) => {
                for u in &expired {
                    discard(&app, u).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "expired uploads could not be listed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_are_object_names() {
        let object = "0123456789abcdef0123456789abcdef";
        for n in [0, 1, MAX_PARTS] {
            assert!(valv_files::check_name(&part_name(object, n)).is_ok(), "{n}");
        }
        assert_ne!(part_name(object, 1), part_name(object, 16));
    }
}
