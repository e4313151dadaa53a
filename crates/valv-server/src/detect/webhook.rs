//! The alert webhook: each new alert POSTed as JSON over HTTPS to one receiver (a paging or
//! ticketing system, a SOAR), signed as the Standard Webhooks specification defines
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<HMAC-SHA256>`), in the order the
//! alerts were raised, retried until the receiver answers 2xx.
//!
//! The audit log is the outbox: the detection engine writes an `alert` entry for every alert
//! it raises, so this task reads the log in leaf order, and for each such entry loads the stored
//! alert and sends it. How far it got (the next leaf index, and the ids of the last alerts sent)
//! is kept sealed in the store as the case `cursor/alert-webhook`, saved after every delivery:
//! shared by every server on the database, it resumes after a restart and catches up after an
//! outage. Of several servers one delivers: the cursor names it and a lease it renews with every
//! save; the others watch and take over once the lease has run out. Delivery is at least once (a
//! crash between a delivery and saving the cursor, or a takeover during a slow delivery, sends an
//! alert again): `webhook-id` is the alert's id, the same on every attempt, for the receiver to
//! drop repeats.
//!
//! The payload carries what `GET /admin/alerts` shows (ids, the rule, severity, explanation and
//! evidence indices; never patient content) and the leaf index of the `alert` entry. It never
//! runs on a request's path: a receiver that is down or refuses only delays delivery (failures
//! logged without content, counted, retried with backoff up to 5 minutes) and shows as lag.

use crate::App;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use valv_crypto::{Cipher, WebhookSecret};

/// How often the log is looked at once caught up.
const POLL: Duration = Duration::from_millis(500);
/// Waits after a failure: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Entries read per step.
const BATCH: u64 = 4096;
/// Progress through entries that are not alerts is saved (and the lease renewed) this often.
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// One server delivers at a time: it holds a lease, renewed with every save; another takes over
/// when it has run out.
const LEASE_MS: i64 = 30_000;
/// An `alert` entry whose alert is still not stored this long after it was written is passed
/// over (its engine stopped between the two writes and never ran again).
const UNSTORED_GRACE_MS: i64 = 5 * 60 * 1000;
/// Ids of the latest alerts sent, kept with the cursor so an alert entry written twice (the
/// engine restarted between the entry and storing the alert) is sent once.
const RECENT: usize = 64;
/// Where the cursor is kept.
const CURSOR: (&str, &str) = ("cursor", "alert-webhook");

/// Where and how to deliver; built from `[alert_webhook]`.
#[derive(Debug)]
pub struct Settings {
    /// `https://…`
    pub url: String,
    /// CA certificates (PEM) trusted for the receiver.
    pub ca_pem: Vec<u8>,
    pub secret: WebhookSecret,
    /// This server as the lease holder: the same across its restarts (host and data
    /// directory), so a restarted server takes up its own lease at once.
    pub holder: String,
}

/// How far delivery got.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Cursor {
    next: u64,
    recent: VecDeque<String>,
    /// The server delivering ([`Settings::holder`]) and until when its lease runs.
    holder: String,
    until: i64,
}

/// Checks the settings and starts delivering in the background; errors are configuration errors.
pub fn spawn(app: Arc<App>, settings: Settings) -> Result<tokio::task::JoinHandle<()>, String> {
    if !settings.url.starts_with("https://") || settings.url.parse::<hyper::Uri>().is_err() {
        return Err(format!("[alert_webhook] url '{}' must be an https URL", settings.url));
    }
    let tls = crate::http::client::tls_for(&settings.ca_pem).map_err(|e| format!("[alert_webhook] ca_file: {e}"))?;
    tracing::info!(receiver = %settings.url, "delivering alerts to the webhook");
    let me = settings.holder.clone();
    let sender = Sender { app, settings, tls, me, cursor: None, saved_at: Instant::now() };
    Ok(tokio::spawn(sender.run()))
}

struct Sender {
    app: Arc<App>,
    settings: Settings,
    tls: Arc<rustls::ClientConfig>,
    /// This process, as the lease holder.
    me: String,
    /// The cursor and its stored version (0: not stored yet); `None` until loaded.
    cursor: Option<(Cursor, u64)>,
    saved_at: Instant,
}

enum Step {
    More,
    CaughtUp,
}

impl Sender {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.step().await {
                Ok(Step::More) => backoff = BACKOFF_MIN,
                Ok(Step::CaughtUp) => {
                    backoff = BACKOFF_MIN;
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    // Messages name the receiver and the failing step, never alert content.
                    self.app.metrics.webhook_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(receiver = %self.settings.url, error = %e, retry_in_ms = backoff.as_millis() as u64, "alert webhook delivery failed; retrying");
                    // Start again from what is stored (another server may have moved on).
                    self.cursor = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Looks through one batch of entries and sends the alerts among them, in order, unless
    /// another server holds the lease.
    async fn step(&mut self) -> Result<Step, String> {
        let (mut cursor, mut version) = match self.cursor.take() {
            Some(c) => c,
            None => crate::oversight::load::<Cursor>(&self.app, CURSOR.0, CURSOR.1).await.map_err(|e| e.diagnostics)?.unwrap_or_default(),
        };
        let store = self.app.vault.store().clone();
        let size = store.audit_size().await.map_err(|e| format!("reading the audit log size: {e}"))?;
        self.app.metrics.webhook_lag.store(size.saturating_sub(cursor.next), Ordering::Relaxed);
        if cursor.holder != self.me && cursor.until > self.app.clock.now_ms() {
            // Another server delivers; its cursor is read again next time.
            return Ok(Step::CaughtUp);
        }
        if cursor.next > size {
            tracing::warn!(position = cursor.next, size, "the audit log is shorter than the alert webhook's position (restored from a backup?); continuing from its end");
            cursor.next = size;
        }
        let to = size.min(cursor.next + BATCH);
        let cipher = Cipher::new(&self.app.vault.named_key("audit", self.app.clock.now_ms()).await.map_err(|e| format!("loading the audit key: {e}"))?);
        let mut raised = Vec::new();
        super::read(&store, &cipher, cursor.next, to, &mut |e| {
            if e.interaction == "alert" && e.agent_id == "valv-detect" {
                if let Some(id) = &e.resource_id {
                    raised.push((e.index, e.time, id.clone()));
                }
            }
        })
        .await?;
        for (index, time, id) in raised {
            if !cursor.recent.contains(&id) && self.deliver(&cipher, index, time, &id).await? {
                cursor.recent.push_back(id);
                if cursor.recent.len() > RECENT {
                    cursor.recent.pop_front();
                }
            }
            cursor.next = index + 1;
            let Some(v) = self.save(&mut cursor, version).await? else { return Ok(Step::CaughtUp) };
            version = v;
        }
        cursor.next = to;
        if self.saved_at.elapsed() >= SAVE_EVERY || cursor.holder != self.me {
            let Some(v) = self.save(&mut cursor, version).await? else { return Ok(Step::CaughtUp) };
            version = v;
        }
        self.app.metrics.webhook_lag.store(size - cursor.next, Ordering::Relaxed);
        self.cursor = Some((cursor, version));
        Ok(if to < size { Step::More } else { Step::CaughtUp })
    }

    /// Sends one alert; `false` when it is passed over (never stored).
    async fn deliver(&self, cipher: &Cipher, index: u64, time: i64, id: &str) -> Result<bool, String> {
        let Some(row) = self.app.vault.store().alert(id).await.map_err(|e| format!("reading alert {id}: {e}"))? else {
            if self.app.clock.now_ms() - time < UNSTORED_GRACE_MS {
                return Err(format!("alert {id} (audit entry {index}) is not stored yet"));
            }
            tracing::warn!(alert = %id, entry = index, "an alert entry names an alert that was never stored; not sent");
            return Ok(false);
        };
        let alert = super::api::open_alert(cipher, &row).map_err(|e| e.diagnostics)?;
        let now = self.app.clock.now_ms();
        let mut data = super::api::to_json(&alert);
        data["auditEntry"] = serde_json::json!(index);
        let body = serde_json::json!({"type": "valv.alert", "timestamp": valv_fhir::date::format_instant(now), "data": data}).to_string();
        let timestamp = now.div_euclid(1000);
        let headers = [
            ("content-type", "application/json".to_string()),
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.settings.secret.sign(id, timestamp, body.as_bytes())),
        ];
        let (status, _) = crate::http::client::https(&self.tls, hyper::Method::POST, &self.settings.url, &headers, Some(body)).await?;
        if !(200..300).contains(&status) {
            return Err(format!("the receiver answered {status} to alert {id}"));
        }
        self.app.metrics.webhook_delivered.fetch_add(1, Ordering::Relaxed);
        tracing::info!(alert = %id, "alert delivered to the webhook");
        Ok(true)
    }

    /// Stores the cursor as the next version, taking or renewing the lease: `None` when another
    /// server changed it first (it delivers; this one reads its cursor again next time).
    async fn save(&mut self, cursor: &mut Cursor, version: u64) -> Result<Option<u64>, String> {
        cursor.holder = self.me.clone();
        cursor.until = self.app.clock.now_ms() + LEASE_MS;
        match crate::oversight::save(&self.app, CURSOR.0, CURSOR.1, version + 1, &*cursor).await {
            Ok(()) => {
                self.saved_at = Instant::now();
                Ok(Some(version + 1))
            }
            Err(e) if e.status == hyper::StatusCode::CONFLICT => {
                tracing::info!("another server delivers alerts to the webhook now");
                Ok(None)
            }
            Err(e) => Err(format!("saving the webhook position: {}", e.diagnostics)),
        }
    }
}
