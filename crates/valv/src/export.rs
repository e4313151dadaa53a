//! `valv export --patient ID --recipient age1… --out FILE`: a patient's record for them (GDPR
//! Art. 15 and 20, PdL's direct access): every current resource they own as FHIR NDJSON, one file
//! per type, their access log with inclusion proofs, the signed checkpoint and the log's key, and
//! a README — as a tar archive encrypted with age to the recipients. Valv never holds the
//! identity that opens it; Debian's `age -d -i KEYFILE` does.

use crate::datadir::Opened;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use valv_age::Recipient;

pub struct Request<'a> {
    pub patient: &'a str,
    pub recipients: &'a [String],
    pub out: &'a Path,
}

const README: &str = "This archive is a patient's record as Valv held it when it was exported.

<Type>.ndjson      every current resource of the patient, one FHIR R4 JSON resource per line
access-log.json    who accessed the record: a FHIR Parameters resource with, for each entry of
                   the audit log naming the patient, its canonical bytes, its leaf hash and an
                   inclusion proof against the checkpoint below, and the entry as an AuditEvent
checkpoint.txt     the audit log's signed checkpoint (C2SP tlog-checkpoint, a signed note)
log-key.vkey       the key that signs the checkpoints (C2SP note verifier key)

To check the access log independently: verify checkpoint.txt with log-key.vkey (for example with
Go's golang.org/x/mod/sumdb/note), then each entry's leaf hash (SHA-256 of 0x00 and its canonical
bytes, RFC 6962) against the checkpoint's root with its proof (golang.org/x/mod/sumdb/tlog).
";

/// Writes the export; returns what to print.
pub async fn run(opened: &Opened, req: Request<'_>) -> Result<String, String> {
    let (app, now) = (&opened.app, valv_server::now_ms());
    if !valv_fhir::id::is_valid_id(req.patient) {
        return Err(format!("'{}' is not a FHIR id", req.patient));
    }
    if req.recipients.is_empty() {
        return Err("give at least one --recipient age1… (the patient's or their agent's age public key)".into());
    }
    let recipients: Vec<Recipient> =
        req.recipients.iter().map(|r| Recipient::parse(r.trim()).map_err(|e| format!("--recipient '{r}': {e}"))).collect::<Result<_, _>>()?;
    if app.vault.is_erased(req.patient) {
        return Err(format!("the data of patient {} was erased: there is nothing to export", req.patient));
    }
    let owned = app.vault.store().resources_of(req.patient).await.map_err(|e| e.to_string())?;
    if owned.is_empty() {
        return Err(format!("there is no patient {} here", req.patient));
    }
    // Resources first, by type, each file whole in memory (one type of one patient).
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (resource_type, id) in &owned {
        let stored = app.vault.fetch(resource_type, id, None).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("{resource_type}/{id} vanished"))?;
        let bytes = app.vault.open_bytes(&stored, now).await.map_err(|e| format!("{resource_type}/{id}: {e}"))?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("{resource_type}/{id}: {e}"))?;
        let file = files.entry(format!("{resource_type}.ndjson")).or_default();
        serde_json::to_writer(&mut *file, &value).map_err(|e| e.to_string())?;
        file.push(b'\n');
    }
    let log = valv_server::audit::api::access_log_parameters(app, req.patient, valv_server::audit::api::View::Restricted, now).await.map_err(|e| match e {
        valv_server::audit::api::AccessLogError::Entry(e) | valv_server::audit::api::AccessLogError::Api(e) => e.diagnostics,
    })?;
    let checkpoint = log["parameter"][0]["valueString"].as_str().unwrap_or_default().to_string();
    let entries = log["parameter"].as_array().map_or(0, |p| p.len().saturating_sub(2));
    files.insert("access-log.json".into(), serde_json::to_vec_pretty(&log).map_err(|e| e.to_string())?);
    files.insert("checkpoint.txt".into(), checkpoint.into_bytes());
    files.insert("log-key.vkey".into(), format!("{}\n", app.audit_vkey).into_bytes());
    files.insert("README.txt".into(), README.as_bytes().to_vec());

    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(req.out).map_err(|e| format!("{}: {e}", req.out.display()))?;
    let written = write_archive(std::io::BufWriter::new(file), &recipients, &files, now);
    if let Err(e) = written {
        let _ = std::fs::remove_file(req.out);
        return Err(e);
    }
    let reason = format!("record of patient {} ({} resources, {entries} access-log entries) exported, age-encrypted to {}", req.patient, owned.len(), req.recipients.join(", "));
    let ctx_patient = req.patient.to_string();
    valv_server::people::api::audit_local(app, "export", None, reason, now).await.map_err(|e| format!("the export was written but its audit entry failed: {}", e.diagnostics))?;
    Ok(format!(
        "exported patient {ctx_patient}: {} resources in {} files, {entries} access-log entries, to {} (age, {} recipient(s))",
        owned.len(),
        files.len(),
        req.out.display(),
        recipients.len()
    ))
}

fn write_archive<W: Write>(out: W, recipients: &[Recipient], files: &BTreeMap<String, Vec<u8>>, now: i64) -> Result<(), String> {
    let random = valv_age::Randomness {
        file_key: random()?,
        ephemeral: recipients.iter().map(|_| random()).collect::<Result<_, _>>()?,
        nonce: random()?,
    };
    let mut w = valv_age::encrypt(out, recipients, random).map_err(|e| e.to_string())?;
    for (name, bytes) in files {
        w.write_all(&tar_header(name, bytes.len() as u64, now / 1000)).map_err(|e| e.to_string())?;
        w.write_all(bytes).map_err(|e| e.to_string())?;
        w.write_all(&vec![0u8; (512 - bytes.len() % 512) % 512]).map_err(|e| e.to_string())?;
    }
    // Two zero blocks end a tar archive.
    w.write_all(&[0u8; 1024]).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?.flush().map_err(|e| e.to_string())
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    valv_store::vault::random_bytes().map_err(|e| e.to_string())
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
