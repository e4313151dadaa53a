//! `valv backup --out FILE`: an encrypted backup of the data directory while the server serves
//! (see `valv_server::backup`), written under a temporary name and renamed when complete; the
//! signed erasure ledger is written beside it, and the backup recorded in the audit log.

use crate::config::{resolve, FILE_NAME};
use crate::datadir::Opened;
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use valv_server::backup::{DirFile, CONFIG_FILE, KEK_FILE, TLS_CERT_FILE, TLS_KEY_FILE};

/// Where the folder of the last backup is remembered (the ledger's copy goes there when
/// `[backup] dir` is not set).
pub const LAST_DIR_FILE: &str = "last-backup-dir";

/// Writes the backup; returns what to print.
pub async fn run(opened: &Opened, out: &Path, recipients: &[String]) -> Result<String, String> {
    let (app, started) = (&opened.app, Instant::now());
    let recipients = if recipients.is_empty() { &opened.config.backup.recipients } else { recipients };
    if recipients.is_empty() {
        return Err("no backup recipient: give --recipient age1… or set [backup] recipients (VALV_BACKUP_RECIPIENTS)".into());
    }
    let parsed = valv_server::fhir::export::recipients(recipients).map_err(|e| e.diagnostics.replace("recipient '", "backup recipient '"))?;
    if out.exists() {
        return Err(format!("{} exists already: a backup never overwrites a file", out.display()));
    }
    let folder = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let tmp = folder.join(format!(".{}.partial", out.file_name().and_then(|n| n.to_str()).unwrap_or("backup")));
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let files = dir_files(opened)?;
    let now = valv_server::now_ms();
    let written = valv_server::backup::write(app, files, parsed, BufWriter::with_capacity(1 << 20, file), now, progress()).await;
    let written = match written.and_then(|w| finish(w.out, &tmp, out).map(|()| w.manifest)) {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    eprintln!();
    let ledger = valv_server::erasure::write_ledger_to(app, std::slice::from_ref(&folder)).await.map_err(|e| format!("the backup was written, but not the ledger beside it: {e}"))?;
    std::fs::write(opened.data_dir.join(LAST_DIR_FILE), std::fs::canonicalize(&folder).unwrap_or(folder).as_os_str().as_encoded_bytes())
        .map_err(|e| format!("remembering the backup folder: {e}"))?;
    let resources = written.tally.tables.get("resources").copied().unwrap_or(0);
    let secs = started.elapsed().as_secs_f64();
    let summary = format!(
        "backup {} written: {resources} resources, {} rows, audit log of {} entries, {} erasures; content SHA-256 {}; encrypted to {} recipient(s); erasure ledger at {}",
        out.display(),
        written.tally.tables.values().sum::<u64>(),
        written.audit_size,
        written.ledger.0,
        valv_crypto::hex::encode(&written.payload.sha256),
        recipients.len(),
        ledger.join(", ")
    );
    valv_server::people::api::audit_local(app, "backup", None, summary.clone(), valv_server::now_ms())
        .await
        .map_err(|e| format!("{summary} — but its audit entry failed: {}", e.diagnostics))?;
    Ok(format!("{summary}\n{:.1} s, {:.0} resources/s", secs, resources as f64 / secs.max(1e-9)))
}

/// The data directory's files a restore needs beside the store: the configuration, a file KEK
/// unless `[backup] include_key_file = false`, and the TLS certificate and key when they are
/// the data directory's own (an operator's certificate elsewhere is the operator's to keep).
fn dir_files(opened: &Opened) -> Result<Vec<DirFile>, String> {
    let (dir, cfg) = (&opened.data_dir, &opened.config);
    let file = |name: &str, path: &Path| std::fs::read(path).map(|bytes| DirFile { name: name.into(), bytes }).map_err(|e| format!("{}: {e}", path.display()));
    let mut files = vec![file(CONFIG_FILE, &dir.join(FILE_NAME))?];
    if cfg.keys.provider == "file" && cfg.backup.include_key_file {
        files.push(file(KEK_FILE, &resolve(dir, &cfg.keys.key_file))?);
    }
    for (name, path) in [(TLS_CERT_FILE, &cfg.server.tls_cert), (TLS_KEY_FILE, &cfg.server.tls_key)] {
        let path = resolve(dir, path);
        if path.starts_with(dir) && path.exists() {
            files.push(file(name, &path)?);
        }
    }
    Ok(files)
}

/// Flushes and syncs the file, then gives it its name (a crash leaves only the partial file).
fn finish(out: BufWriter<std::fs::File>, tmp: &Path, dest: &Path) -> Result<(), String> {
    let file = out.into_inner().map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    file.sync_all().map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
    std::fs::hard_link(tmp, dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    std::fs::remove_file(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    if let Some(dir) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("syncing {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Rows written so far, on standard error, at most once a second.
fn progress() -> impl Fn(u64) + Send + 'static {
    let last = std::sync::Mutex::new(Instant::now());
    move |rows| {
        if let Ok(mut at) = last.lock() {
            if at.elapsed().as_secs() >= 1 {
                *at = Instant::now();
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\rbackup: {rows} rows written");
                let _ = err.flush();
            }
        }
    }
}

/// The folder erasures copy the ledger to when `[backup] dir` is not set: the last backup's.
pub fn last_dir(data_dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(data_dir.join(LAST_DIR_FILE)).ok()?;
    Some(PathBuf::from(text.trim_end_matches('\n'))).filter(|p| p.is_dir())
}
