//! A patient's record as one file (GDPR Art. 15 and 20, PdL's direct access): every current
//! resource they own that the caller may read, as FHIR NDJSON per type, their access log with
//! inclusion proofs, the signed checkpoint and the log's key, and a README — a tar archive
//! encrypted with age to recipients the caller names. Valv never holds the identity that opens
//! it. `POST /fhir/Patient/{id}/$export-record` here; `valv export` at the console.

use crate::error::ApiError;
use crate::request::{audit, audit_failure, authorize, Ctx, Touch};
use crate::{App, Reply};
use hyper::StatusCode;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use valv_age::Recipient;
use valv_policy::Action;

pub const README: &str = "This archive is a patient's record as Valv held it when it was exported.

<Type>.ndjson      every current resource of the patient, one FHIR R4 JSON resource per line
files/Binary-<id>  (when there are any) the patient's files: the bytes of file-backed Binaries
files.json         every file with its Binary, media type, size, SHA-256 (hex) and malware-scan
                   status, and why one was left out (not passed by the scan, or beyond the
                   archive's allowance for files: fetch it with GET /fhir/Binary/<id>)
access-log.json    (when the exporter may see it) who accessed the record: a FHIR Parameters resource with, for each entry of
                   the audit log naming the patient, its canonical bytes, its leaf hash and an
                   inclusion proof against the checkpoint below, and the entry as an AuditEvent
checkpoint.txt     the audit log's signed checkpoint (C2SP tlog-checkpoint, a signed note)
log-key.vkey       the key that signs the checkpoints (C2SP note verifier key)

To check the access log independently: verify checkpoint.txt with log-key.vkey (for example with
Go's golang.org/x/mod/sumdb/note), then each entry's leaf hash (SHA-256 of 0x00 and its canonical
bytes, RFC 6962) against the checkpoint's root with its proof (golang.org/x/mod/sumdb/tlog).
";

/// The archive's files (name -> bytes) for `patient`, with the resources of the types `include`
/// admits (asked with `None`), the access log when it admits `AuditEvent`, and each file's bytes
/// when it admits reading them (asked with the file's scan status); returns them and how many
/// resources and access-log entries they hold.
/// The files' bytes are paid for from `memory` (three times: the file, the tar, its sealed copy).
pub async fn record_files(app: &App, patient: &str, include: &Include<'_>, now: i64, memory: &mut crate::http::limits::Reservation) -> Result<(BTreeMap<String, Vec<u8>>, usize, usize), ApiError> {
    let owned = app.vault.store().resources_of(patient).await?;
    // Each type's file whole in memory: one type of one patient.
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut resources = 0;
    let mut media = BTreeMap::new();
    for (resource_type, id) in owned.iter().filter(|(t, _)| include(t, None)) {
        let stored = app.vault.fetch(resource_type, id, None).await?.ok_or_else(|| ApiError::internal(format!("{resource_type}/{id} vanished")))?;
        let bytes = app.vault.open_bytes(&stored, now).await?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(format!("{resource_type}/{id}: {e}")))?;
        if resource_type == "Binary" {
            media.insert(id.clone(), value.get("contentType").cloned().unwrap_or(Value::Null));
        }
        let file = files.entry(format!("{resource_type}.ndjson")).or_default();
        serde_json::to_writer(&mut *file, &value).map_err(|e| ApiError::internal(e.to_string()))?;
        file.push(b'\n');
        resources += 1;
    }
    if include("Binary", None) {
        add_files(app, &media, include, &mut files, now, memory).await?;
    }
    // The access log goes in only for a caller `$access-log` would show it to (a read of the
    // patient's AuditEvents): reading someone's record does not entitle one to see who else did.
    let mut entries = 0;
    if include("AuditEvent", None) {
        let log = crate::audit::api::access_log_parameters(app, patient, crate::audit::api::View::Restricted, now, crate::audit::api::LogPage::default()).await.map_err(|e| match e {
            crate::audit::api::AccessLogError::Entry(e) | crate::audit::api::AccessLogError::Api(e) => e,
        })?;
        let checkpoint = log["parameter"][0]["valueString"].as_str().unwrap_or_default().to_string();
        entries = log["parameter"].as_array().map_or(0, |p| p.len().saturating_sub(2));
        files.insert("access-log.json".into(), serde_json::to_vec_pretty(&log).map_err(|e| ApiError::internal(e.to_string()))?);
        files.insert("checkpoint.txt".into(), checkpoint.into_bytes());
        let key = log["parameter"][1]["valueString"].as_str().unwrap_or_default();
        files.insert("log-key.vkey".into(), format!("{key}\n").into_bytes());
    }
    files.insert("README.txt".into(), README.as_bytes().to_vec());
    Ok((files, resources, entries))
}

/// Whether the caller may read a type of the patient's data (with a file's scan status: that
/// file's bytes).
pub type Include<'a> = dyn Fn(&str, Option<&str>) -> bool + Sync + 'a;

/// The archive's allowance for files' bytes (it is built in memory); larger files are listed.
const FILES_BYTES: u64 = 64 << 20;

/// The patient's file-backed Binaries (`media`: id -> contentType) as `files/Binary-<id>`, up
/// to [`FILES_BYTES`] in all, and `files.json` listing each.
async fn add_files(app: &App, media: &BTreeMap<String, Value>, include: &Include<'_>, files: &mut BTreeMap<String, Vec<u8>>, now: i64, memory: &mut crate::http::limits::Reservation) -> Result<(), ApiError> {
    let mut listed = Vec::new();
    let mut total = 0;
    for (id, content_type) in media {
        let Some(f) = app.vault.store().file(id).await? else { continue };
        let mut entry = serde_json::json!({"binary": format!("Binary/{id}"), "contentType": content_type, "size": f.size, "sha256": valv_crypto::hex::encode(&f.sha256), "scan": f.scan});
        if super::binary::check_scan(&f, app.files.serve_unscannable).is_err() {
            entry["leftOut"] = Value::from("not passed by the malware scan");
        } else if !include("Binary", Some(&f.scan)) {
            entry["leftOut"] = Value::from(format!("the access policy does not let the exporter read a file whose scan is '{}'", f.scan));
        } else if total + f.size > FILES_BYTES {
            entry["leftOut"] = Value::from(format!("beyond the archive's allowance for files ({FILES_BYTES} bytes): fetch it with GET /fhir/Binary/{id}"));
        } else {
            let name = format!("files/Binary-{id}");
            app.limits.grow(memory, usize::try_from(f.size.saturating_mul(3)).unwrap_or(usize::MAX))?;
            files.insert(name.clone(), super::binary::read_whole(app, &f, now).await?);
            entry["file"] = Value::from(name);
            total += f.size;
        }
        listed.push(entry);
    }
    if !listed.is_empty() {
        files.insert("files.json".into(), serde_json::to_vec_pretty(&listed).map_err(|e| ApiError::internal(e.to_string()))?);
    }
    Ok(())
}

/// Parses `age1…` recipients, each one or a 400.
pub fn recipients(texts: &[String]) -> Result<Vec<Recipient>, ApiError> {
    if texts.is_empty() {
        return Err(ApiError::bad_request("give at least one recipient (an age X25519 public key, age1…)"));
    }
    texts.iter().map(|r| Recipient::parse(r.trim()).map_err(|e| ApiError::bad_request(format!("recipient '{r}': {e}")))).collect()
}

/// Writes the files as a tar archive encrypted with age to `recipients`.
pub fn seal<W: Write>(out: W, recipients: &[Recipient], files: &BTreeMap<String, Vec<u8>>, now: i64) -> Result<W, ApiError> {
    let failed = |e: &dyn std::fmt::Display| ApiError::internal(format!("writing the archive: {e}"));
    let random = valv_age::Randomness {
        file_key: valv_store::vault::random_bytes()?,
        ephemeral: recipients.iter().map(|_| valv_store::vault::random_bytes()).collect::<Result<_, _>>()?,
        nonce: valv_store::vault::random_bytes()?,
    };
    let mut w = valv_age::encrypt(out, recipients, random).map_err(|e| failed(&e))?;
    for (name, bytes) in files {
        w.write_all(&tar_header(name, bytes.len() as u64, now / 1000)).map_err(|e| failed(&e))?;
        w.write_all(bytes).map_err(|e| failed(&e))?;
        w.write_all(&vec![0u8; (512 - bytes.len() % 512) % 512]).map_err(|e| failed(&e))?;
    }
    // Two zero blocks end a tar archive.
    w.write_all(&[0u8; 1024]).map_err(|e| failed(&e))?;
    w.finish().map_err(|e| failed(&e))
}

/// `POST /fhir/Patient/{id}/$export-record` with `Parameters` naming one or more `recipient`s:
/// the patient themself, or anyone the policy lets read their record. Each resource type is
/// decided on its own (a type the caller may not read is left out, and the README's list of
/// files shows which are there); the Patient itself must be readable, else 403 as for a read.
pub async fn export_record(app: &App, ctx: &Ctx, patient: &str, body: Value) -> Result<Reply, ApiError> {
    crate::fhir::check_id(patient)?;
    let texts: Vec<String> = body
        .get("parameter")
        .and_then(Value::as_array)
        .filter(|_| body.get("resourceType").and_then(Value::as_str) == Some("Parameters"))
        .ok_or_else(|| ApiError::bad_request("the body must be a Parameters resource with one or more 'recipient' parameters (valueString age1…)"))?
        .iter()
        .filter(|p| p.get("name").and_then(Value::as_str) == Some("recipient"))
        .map(|p| p.get("valueString").and_then(Value::as_str).map(str::to_string).ok_or_else(|| ApiError::bad_request("a recipient is a valueString")))
        .collect::<Result<_, _>>()?;
    let recipients = recipients(&texts)?;
    let touch = Touch { interaction: "export-record", action: Action::Read, resource_type: "Patient", id: Some(patient), version: None, patient: Some(patient), query: None };
    let permit = authorize(app, ctx, &touch).await?;
    // Once permitted, a failure is audited like a success would have been.
    let built = archive(app, ctx, patient, &recipients).await;
    let (archive, resources, entries) = match built {
        Ok(b) => b,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let mut event = ctx.permitted(&touch, 200, &permit)?;
    event.reason = format!("{}; {resources} resources, {entries} access-log entries, to {} recipient(s)", permit.reason, recipients.len());
    audit(app, vec![event]).await?;
    Ok(Reply { status: StatusCode::OK, text: Some(("application/octet-stream", bytes::Bytes::from(archive))), ..Reply::empty(StatusCode::OK) })
}

/// The sealed archive for a permitted caller, each type (and the access log) decided on its own.
async fn archive(app: &App, ctx: &Ctx, patient: &str, recipients: &[Recipient]) -> Result<(Vec<u8>, usize, usize), ApiError> {
    if app.vault.is_erased(patient) {
        return Err(ApiError::new(StatusCode::GONE, "deleted", format!("the data of patient {patient} was erased")));
    }
    if app.vault.store().locate("Patient", patient).await?.is_none_or(|l| l.deleted) {
        return Err(ApiError::not_found(format!("Patient/{patient} is not known")));
    }
    let subject = app.access.subject(&ctx.principal);
    let include = |resource_type: &str, file_scan: Option<&str>| {
        let q = valv_policy::Question { action: Action::Read, resource_type, patient: Some(patient), now: ctx.now, purpose: ctx.purpose(), file_scan };
        app.access.decide(&subject, &q).permit
    };
    let mut memory = app.limits.reserve(0)?;
    let (files, resources, entries) = record_files(app, patient, &include, ctx.now, &mut memory).await?;
    // Encrypting up to 64 MiB is CPU work: off the request threads.
    let (recipients, now) = (recipients.to_vec(), ctx.now);
    let sealed = tokio::task::spawn_blocking(move || seal(Vec::new(), &recipients, &files, now)).await.map_err(|e| ApiError::internal(format!("sealing the archive: {e}")))??;
    Ok((sealed, resources, entries))
}

/// A POSIX ustar header for a regular file (names here are short and ASCII).
fn tar_header(name: &str, size: u64, mtime: i64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(&mut h, 0, &name.as_bytes()[..name.len().min(100)]);
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{size:011o}\0").as_bytes());
    put(&mut h, 136, format!("{:011o}\0", mtime.max(0)).as_bytes());
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_headers_have_a_valid_checksum() {
        let h = tar_header("Patient.ndjson", 1234, 1_700_000_000);
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).expect("octal"), 8).expect("number");
        let mut blank = h;
        blank[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, blank.iter().map(|&b| u32::from(b)).sum::<u32>());
        assert_eq!(&h[124..136], b"00000002322\0");
    }
}
