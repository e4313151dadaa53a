//! Failed authentications recorded compactly: a flood of requests without a valid credential
//! must stay on record, attempt by attempt, without growing the audit log at the attacker's pace.
//!
//! The first failure from a source address with a given reason is recorded at once, in full, and
//! opens a window of [`WINDOW`]: the same source's further failures of that reason within it share
//! one summary entry (the first of them, with the count and the span in its reason), written when
//! the window closes, and each of them is answered only once that entry is durable. So every
//! attempt is on record before its answer leaves, as before, at no more than two entries per
//! source, reason and second; a lone failure costs no wait. Rate-limit refusals (429) are
//! recorded the same way with a window of [`REFUSAL_WINDOW`].

use crate::audit::AuditEvent;
use crate::error::ApiError;
use crate::App;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a window of failed authentications stays open for more of its source and reason.
pub const WINDOW: Duration = Duration::from_secs(1);
/// The same for rate-limit refusals (429), whose requests may wait longer.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// Windows open at most; beyond, failures are recorded one entry each (memory stays bounded).
const MAX_WINDOWS: usize = 10_000;

struct Window {
    /// Failures after the first, and the first of them (the summary's template).
    more: AtomicU64,
    template: Mutex<Option<AuditEvent>>,
    last_time: AtomicU64,
    /// `Some(true)` once the summary is durable, `Some(false)` if it could not be written.
    done: tokio::sync::watch::Sender<Option<bool>>,
}

type Windows = Arc<Mutex<HashMap<(String, String), Arc<Window>>>>;

pub struct Compactor {
    open: Windows,
    window: Duration,
}

impl Default for Compactor {
    fn default() -> Self {
        Compactor::new(WINDOW)
    }
}

/// What a failure does: opens a window (and is recorded alone), joins one, or — with too many
/// windows open — is recorded alone without one.
enum Turn {
    Opened,
    Joined { rx: tokio::sync::watch::Receiver<Option<bool>>, first: bool },
    Alone,
}

impl Compactor {
    pub fn new(window: Duration) -> Self {
        Compactor { open: Windows::default(), window }
    }

    /// Records a failed authentication (`event` names no agent). Returns once an entry that
    /// covers it is durable (or with 503 if none could be made so).
    pub async fn record(&self, app: &App, event: AuditEvent) -> Result<(), ApiError> {
        let key = (event.source_address.clone(), event.reason.clone());
        let time = u64::try_from(event.time).unwrap_or(0);
        let turn = {
            let mut open = self.open.lock().map_err(|_| ApiError::internal("the failure windows' lock is poisoned"))?;
            match open.get(&key) {
                Some(w) => {
                    let first = w.more.fetch_add(1, Ordering::AcqRel) == 0;
                    w.last_time.fetch_max(time, Ordering::AcqRel);
                    if first {
                        if let Ok(mut t) = w.template.lock() {
                            *t = Some(event.clone());
                        }
                    }
                    Turn::Joined { rx: w.done.subscribe(), first }
                }
                None if open.len() >= MAX_WINDOWS => Turn::Alone,
                None => {
                    let (done, _) = tokio::sync::watch::channel(None);
                    let w = Arc::new(Window { more: AtomicU64::new(0), template: Mutex::new(None), last_time: AtomicU64::new(time), done });
                    open.insert(key.clone(), w.clone());
                    // Detached: the window closes and its summary is written even if this
                    // request's client goes away, so no request of the window waits for nothing.
                    tokio::spawn(close_after_window(self.open.clone(), app.audit.clone(), key, w, self.window));
                    Turn::Opened
                }
            }
        };
        match turn {
            Turn::Opened | Turn::Alone => crate::request::audit(app, vec![event]).await,
            Turn::Joined { mut rx, first } => {
                let written = matches!(rx.wait_for(Option::is_some).await.map(|v| *v), Ok(Some(true)));
                if first {
                    let counter = if written { &app.metrics.audit_entries } else { &app.metrics.audit_failures };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                if written { Ok(()) } else { Err(ApiError::unavailable("the audit log cannot record this request, so it is refused").recorded()) }
            }
        }
    }
}

/// Waits the window out, closes it (later failures open a new one) and writes its summary.
async fn close_after_window(open: Windows, sink: Arc<dyn crate::audit::AuditSink>, key: (String, String), window: Arc<Window>, length: Duration) {
    tokio::time::sleep(length).await;
    if let Ok(mut open) = open.lock() {
        open.remove(&key);
    }
    let more = window.more.load(Ordering::Acquire);
    let template = window.template.lock().ok().and_then(|mut t| t.take());
    let Some(mut summary) = template.filter(|_| more > 0) else {
        let _ = window.done.send(Some(true));
        return;
    };
    let last = window.last_time.load(Ordering::Acquire);
    summary.reason = format!("{} (x{more} from this address, {} to {last} ms; compacted)", summary.reason, summary.time);
    let written = sink.record(vec![summary]).await;
    if let Err(e) = &written {
        tracing::error!(error = %e, "audit append failed; refusing the requests of a failure window");
    }
    let _ = window.done.send(Some(written.is_ok()));
}
