//! Scheduled backups (`[backup] every_secs`, `keep`): `valv serve` runs `valv backup` every
//! interval into `[backup] dir` under the name `valv-YYYYMMDDTHHMMSSZ.age` (UTC) and then keeps
//! only the newest `keep` of the files so named. The backup runs as a child process — the very
//! command an operator runs, so the signed manifest, the ledger beside it and its audit entry
//! are the same — at nice 10, with its memory and CPU apart from the server's. The first backup
//! is due one interval after the newest one in the folder (at once when there is none), so
//! restarts neither skip nor repeat one. A failure is logged, counted in the metrics, recorded
//! in the audit log with outcome `error`, and retried after at most ten minutes.

use crate::config::resolve;
use crate::datadir::Opened;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const PREFIX: &str = "valv-";
const SUFFIX: &str = "Z.age";
/// The longest wait before a failed backup is tried again.
const RETRY: Duration = Duration::from_secs(600);
/// How much of a failed backup's message reaches the log and the audit entry.
const REASON_CHARS: usize = 400;

struct Schedule {
    exe: PathBuf,
    data_dir: PathBuf,
    dir: PathBuf,
    every: Duration,
    keep: usize,
    /// Environment variables the backup process is started without.
    scrub: Vec<String>,
}

/// Starts the schedule when `[backup] every_secs` is set; the folder is made if missing.
pub fn spawn(opened: &Opened) -> Result<(), String> {
    let cfg = &opened.config.backup;
    let Some(dir) = cfg.dir.as_ref().filter(|_| cfg.every_secs > 0) else { return Ok(()) };
    let dir = resolve(&opened.data_dir, dir);
    crate::datadir::create_private_dir(&dir)?;
    let schedule = Schedule {
        exe: std::env::current_exe().map_err(|e| format!("scheduled backups: cannot find the valv binary: {e}"))?,
        data_dir: std::fs::canonicalize(&opened.data_dir).map_err(|e| format!("{}: {e}", opened.data_dir.display()))?,
        dir,
        every: Duration::from_secs(cfg.every_secs),
        keep: cfg.keep,
        // The child needs no secret of the server's own (the webhook's signing secret).
        scrub: vec![opened.config.alert_webhook.secret_env.clone()],
    };
    tracing::info!(every_secs = cfg.every_secs, keep = cfg.keep, "scheduled backups on");
    tokio::spawn(schedule.run(opened.app.clone()));
    Ok(())
}

impl Schedule {
    async fn run(self, app: Arc<valv_server::App>) {
        remove_partials(&self.dir);
        let mut due = newest(&self.dir).map_or(SystemTime::now(), |(_, at)| at + self.every);
        loop {
            if let Ok(wait) = due.duration_since(SystemTime::now()) {
                tokio::time::sleep(wait).await;
            }
            let out = self.dir.join(file_name(valv_server::now_ms()));
            let (exe, data_dir, scrub) = (self.exe.clone(), self.data_dir.clone(), self.scrub.clone());
            let result = tokio::task::spawn_blocking(move || backup_once(&exe, &data_dir, &out, &scrub)).await.unwrap_or_else(|e| Err(format!("the backup task failed: {e}")));
            match result {
                Ok(()) => {
                    app.metrics.backups_written.fetch_add(1, Ordering::Relaxed);
                    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    app.metrics.backup_last_success.store(secs, Ordering::Relaxed);
                    if let Err(e) = prune(&self.dir, self.keep) {
                        tracing::error!(error = %e, "removing old scheduled backups failed");
                    }
                    due = SystemTime::now() + self.every;
                }
                Err(reason) => {
                    app.metrics.backup_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %reason, "scheduled backup failed");
                    let entry = valv_server::people::api::audit_local_failure(&app, "backup", format!("scheduled backup FAILED: {reason}"), valv_server::now_ms()).await;
                    if let Err(e) = entry {
                        tracing::error!(error = %e.diagnostics, "recording the failed backup failed");
                    }
                    due = SystemTime::now() + self.every.min(RETRY);
                }
            }
        }
    }
}

/// Runs `valv backup --out FILE` on the data directory; its last line of error when it fails.
fn backup_once(exe: &Path, data_dir: &Path, out: &Path, scrub: &[String]) -> Result<(), String> {
    let mut cmd = std::process::Command::new(exe);
    for name in scrub {
        cmd.env_remove(name);
    }
    let done = cmd
        .arg("--data-dir")
        .arg(data_dir)
        .arg("backup")
        .arg("--out")
        .arg(out)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    if done.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&done.stderr);
    let line = stderr.split(['\n', '\r']).map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("no message");
    Err(format!("{} ({})", line.chars().take(REASON_CHARS).collect::<String>(), done.status))
}

/// The name of a backup made at `ms`: `valv-20261206T104339Z.age` (sorts as it is timed).
fn file_name(ms: i64) -> String {
    let stamp: String = valv_fhir::date::format_instant(ms).chars().take(19).filter(|c| c.is_ascii_digit() || *c == 'T').collect();
    format!("{PREFIX}{stamp}{SUFFIX}")
}

/// Whether `name` is one [`file_name`] makes (only those are ever removed).
fn is_scheduled(name: &str) -> bool {
    name.strip_prefix(PREFIX).and_then(|n| n.strip_suffix(SUFFIX)).is_some_and(|stamp| {
        let b = stamp.as_bytes();
        b.len() == 15 && b[8] == b'T' && b.iter().enumerate().all(|(i, c)| i == 8 || c.is_ascii_digit())
    })
}

/// The scheduled backups in `dir`, oldest first.
fn scheduled(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| is_scheduled(n)).collect();
    names.sort();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// The newest scheduled backup and when it was written.
fn newest(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let path = scheduled(dir).ok()?.pop()?;
    let at = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    Some((path, at))
}

/// Removes the oldest scheduled backups beyond `keep`.
fn prune(dir: &Path, keep: usize) -> Result<(), String> {
    let all = scheduled(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for old in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_file(old).map_err(|e| format!("{}: {e}", old.display()))?;
        tracing::info!(file = %old.display(), "old scheduled backup removed");
    }
    Ok(())
}

/// Partial files a scheduled backup left when the machine stopped under it.
fn remove_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")).is_some_and(is_scheduled) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_as_they_are_timed_and_only_they_are_scheduled_ones() {
        let (a, b) = (file_name(1_796_553_819_123), file_name(1_796_553_820_000));
        assert_eq!(a, "valv-20261206T104339Z.age");
        assert!(a < b && is_scheduled(&a) && is_scheduled(&b));
        for other in ["valv-20261206T104339Z.age.partial", "valv-2026120XT104339Z.age", "mine.age", "valv-20261206104339Z.age", "erasure-ledger"] {
            assert!(!is_scheduled(other), "{other}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_touches_nothing_else() {
        let dir = std::env::temp_dir().join(format!("valv-prune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let names: Vec<String> = (0..5).map(|i| file_name(1_796_553_819_000 + i * 1000)).collect();
        for n in names.iter().map(String::as_str).chain(["erasure-ledger", "manual.age", ".valv-20261206T104339Z.age.partial"]) {
            std::fs::write(dir.join(n), b"x").expect("file");
        }
        prune(&dir, 2).expect("prune");
        remove_partials(&dir);
        let mut left: Vec<String> = std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, vec!["erasure-ledger".to_string(), "manual.age".into(), names[3].clone(), names[4].clone()]);
        assert_eq!(newest(&dir).map(|(p, _)| p), Some(dir.join(&names[4])));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
