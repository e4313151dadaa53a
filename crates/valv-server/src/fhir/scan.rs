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
use valv_files::sealed::SealedReader;
use valv_store::FileRow;

/// Where the scanner is and the largest file it is given.
pub struct Scanner {
    pub clamd: Clamd,
    pub max_bytes: u64,
}

/// Files scanned per look at the store.
const BATCH: usize = 8;
/// Segments decrypted and sent per piece (1 MiB).
const RUN: u64 = 16;

/// Scans pending files for as long as the server runs (nothing when no scanner is configured).
pub async fn run(app: Arc<App>) {
    let Some(scanner) = app.files.scanner.as_ref() else { return };
    let mut unreachable_logged = false;
    loop {
        match scan_pending(&app, scanner).await {
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

/// Scans up to [`BATCH`] pending files; how many were looked at.
async fn scan_pending(app: &App, scanner: &Scanner) -> Result<usize, String> {
    let files = app.vault.store().files_to_scan(BATCH).await.map_err(|e| e.to_string())?;
    for f in &files {
        let status = match scan(app, scanner, f).await {
            Ok(s) => s,
            // The store or clamd failed: leave it pending, try again later.
            Err(e) => return Err(e),
        };
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
    Ok(files.len())
}

/// The scan status a file earns.
async fn scan(app: &App, scanner: &Scanner, f: &FileRow) -> Result<&'static str, String> {
    if f.size > scanner.max_bytes {
        return Ok("unscannable");
    }
    let key = match app.vault.file_key(f, app.clock.now_ms()).await {
        Ok(k) => k,
        // Erased meanwhile (its record goes with the erasure) or unreadable: nothing to serve.
        Err(valv_store::StoreError::Gone(_)) => return Ok("failed"),
        Err(e) => return Err(e.to_string()),
    };
    let reader = match SealedReader::open(app.files.store.clone(), &f.object, &key, &super::binary::file_aad(&f.binary_id, &f.patient)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, binary = %f.binary_id, "a stored file failed its integrity check while being scanned");
            return Ok("failed");
        }
    };
    let mut session = scanner.clamd.start().await.map_err(|e| format!("clamd: {e}"))?;
    let mut at = 0;
    while at < reader.segments() {
        let run = match reader.segment_run(at, RUN).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, binary = %f.binary_id, "a stored file failed its integrity check while being scanned");
                return Ok("failed");
            }
        };
        session.send(&run).await.map_err(|e| format!("clamd: {e}"))?;
        at += RUN;
    }
    Ok(match session.finish().await.map_err(|e| format!("clamd: {e}"))? {
        Verdict::Clean => "clean",
        Verdict::Infected(_) => "infected",
        Verdict::TooLarge => "unscannable",
        Verdict::Failed(why) => {
            tracing::warn!(error = %why, binary = %f.binary_id, "the malware scanner failed on a file");
            "failed"
        }
    })
}
