//! The malware scanner (issue 13): files recorded `pending` are decrypted a run of segments at
//! a time and streamed to ClamAV's daemon (`valv_files::clamd`, on this machine only); the
//! verdict becomes the file's scan status — `clean`, `infected` (never served), `unscannable`
//! (beyond `files.scan_max_bytes` or clamd's own limit: marked, not passed) or `failed`. A file
//! stays `pending`, and is not served, while clamd cannot be reached. Woken by each upload, and
//! every few seconds for files another server recorded.

use crate::App;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use valv_files::clamd::{Clamd, Verdict};
use valv_files::sealed::{SealedReader, READ_RUN};
use valv_store::FileRow;

/// Where the scanner is and the largest file it is given.
pub struct Scanner {
    pub clamd: Clamd,
    pub max_bytes: u64,
}

/// Files scanned per look at the store.
const BATCH: usize = 8;
/// How long clamd may take to accept a piece, and to answer once the file is sent.
const CLAMD_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at one file before it is marked `failed` (clamd keeps failing on it).
const ATTEMPTS: u32 = 3;

/// Scans pending files for as long as the server runs (nothing when no scanner is configured).
pub async fn run(app: Arc<App>) {
    let Some(scanner) = app.files.scanner.as_ref() else { return };
    let mut unreachable_logged = false;
    let mut attempts = std::collections::HashMap::new();
    loop {
        match scan_pending(&app, scanner, &mut attempts).await {
            Ok(n) => {
                unreachable_logged = false;
                if n == BATCH {
                    continue;
                }
            }
            Err(e) => {
                if !unreachable_logged {
                    tracing::warn!(error = %e, "the malware scanner cannot be reached: new files stay pending (not served)");
                    unreachable_logged = true;
                }
            }
        }
        tokio::select! {
            _ = app.files.scan_wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Scans up to [`BATCH`] pending files; how many were looked at. A file clamd or the storage
/// fails on stays pending for the next round, up to [`ATTEMPTS`] times, then is `failed`: one
/// file cannot hold up the others.
async fn scan_pending(app: &App, scanner: &Scanner, attempts: &mut std::collections::HashMap<String, u32>) -> Result<usize, String> {
    let files = app.vault.store().files_to_scan(BATCH).await.map_err(|e| e.to_string())?;
    let mut last_error = None;
    for f in &files {
        let status = match scan(app, scanner, f).await {
            Ok(s) => s,
            // clamd is down: no file's fault, so none is counted; all stay pending.
            Err(Failure::Unreachable(e)) => return Err(e),
            Err(Failure::File(e)) => {
                let n = attempts.entry(f.object.clone()).or_insert(0);
                *n += 1;
                if *n < ATTEMPTS {
                    last_error = Some(e);
                    continue;
                }
                tracing::warn!(error = %e, binary = %f.binary_id, "the malware scanner failed on a file {ATTEMPTS} times: marked failed");
                "failed"
            }
        };
        attempts.remove(&f.object);
        app.vault.store().set_file_scan(&f.object, status).await.map_err(|e| e.to_string())?;
        let counter = match status {
            "infected" => &app.metrics.files_infected,
            "clean" => &app.metrics.files_clean,
            _ => &app.metrics.files_not_scanned,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if status == "infected" {
            // Ids only: the Binary and the object, never the patient's data.
            tracing::warn!(binary = %f.binary_id, "a file was found infected by the malware scanner; it is never served");
        }
    }
    match last_error {
        Some(e) if files.len() < BATCH => Err(e),
        _ => Ok(files.len()),
    }
}

/// A storage error that will not pass by trying again (the object does not authenticate, is
/// missing or short), against one that may (I/O).
fn lasting(e: &valv_files::FilesError) -> bool {
    !matches!(e, valv_files::FilesError::Io(_))
}

/// Why a file could not be scanned this time.
enum Failure {
    /// clamd could not be reached: try again later, the file is not to blame.
    Unreachable(String),
    /// Scanning this file failed (counted towards marking it `failed`).
    File(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::File(e)
    }
}

/// The scan status a file earns.
async fn scan(app: &App, scanner: &Scanner, f: &FileRow) -> Result<&'static str, Failure> {
    if f.size > scanner.max_bytes {
        return Ok("unscannable");
    }
    let key = match app.vault.file_key(f, app.clock.now_ms()).await {
        Ok(k) => k,
        // Erased meanwhile (its record goes with the erasure) or unreadable: nothing to serve.
        Err(valv_store::StoreError::Gone(_)) => return Ok("failed"),
        Err(e) => return Err(Failure::File(e.to_string())),
    };
    let broken = |e: valv_files::FilesError| {
        if lasting(&e) {
            tracing::error!(error = %e, binary = %f.binary_id, "a stored file failed its integrity check while being scanned");
            Ok("failed")
        } else {
            Err(Failure::File(format!("reading the file to scan: {e}")))
        }
    };
    let reader = match SealedReader::open(app.files.store.clone(), &f.object, &key, &super::binary::file_aad(&f.binary_id, &f.patient)).await {
        Ok(r) => r,
        Err(e) => return broken(e),
    };
    let timed = |what: &'static str| move |_| format!("clamd: no answer in {} s while {what}", CLAMD_TIMEOUT.as_secs());
    let mut session = tokio::time::timeout(CLAMD_TIMEOUT, scanner.clamd.start())
        .await
        .map_err(|e| Failure::Unreachable(timed("connecting")(e)))?
        .map_err(|e| Failure::Unreachable(format!("clamd: {e}")))?;
    for at in (0..reader.segments()).step_by(READ_RUN as usize) {
        let run = match reader.segment_run(at, READ_RUN).await {
            Ok(r) => r,
            Err(e) => return broken(e),
        };
        tokio::time::timeout(CLAMD_TIMEOUT, session.send(&run)).await.map_err(timed("taking the file"))?.map_err(|e| format!("clamd: {e}"))?;
    }
    let verdict = tokio::time::timeout(CLAMD_TIMEOUT, session.finish()).await.map_err(timed("answering"))?.map_err(|e| format!("clamd: {e}"))?;
    Ok(match verdict {
        Verdict::Clean => "clean",
        Verdict::Infected(_) => "infected",
        Verdict::TooLarge => "unscannable",
        Verdict::Failed(why) => {
            tracing::warn!(error = %why, binary = %f.binary_id, "the malware scanner failed on a file");
            "failed"
        }
    })
}
