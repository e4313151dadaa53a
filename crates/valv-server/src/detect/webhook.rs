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
//! outage. It starts at the log's end the first time (alerts raised before the webhook was
//! configured are in `/admin/alerts`).
//!
//! Of several servers one delivers: before sending anything a server takes the lease in the
//! cursor (compare-and-set on its version, so only one can), and renews it while it works; the
//! others watch and take over once it has run out (a restarted server is a new holder, so it
//! waits that long too). Delivery is at least once (a crash between a delivery and saving the
//! cursor sends an alert again): `webhook-id` is the same on every attempt, for the receiver to
//! drop repeats. It is the alert's id and a digest of its stored row, so an alert raised after a
//! restore at a leaf index an earlier alert had is not mistaken for that one.
//!
//! The payload names the alert (id, time, rule, severity, subject, evidence indices, the leaf
//! index of its `alert` entry, where auditors read it); the explanation, which may name a patient
//! and why the access looked wrong, only when the operator asks for it. It never runs on a
//! request's path: a receiver that is down or refuses only delays delivery (failures logged by
//! the receiver's origin, counted, retried with backoff up to 5 minutes) and shows as lag.

use crate::App;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use valv_crypto::{Cipher, WebhookSecret};

/// How often the log is looked at once caught up (and a waiting server looks at the lease).
const POLL: Duration = Duration::from_millis(500);
/// Waits after a failure: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Entries read per step.
const BATCH: u64 = 4096;
/// The lease, and how much of it must be left to start a delivery (more than a request's 10 s).
const LEASE_MS: i64 = 30_000;
const LEASE_LEFT_MS: i64 = 15_000;
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
    /// Send each alert's explanation too.
    pub include_explanation: bool,
}

/// How far delivery got.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Cursor {
    next: u64,
    recent: VecDeque<String>,
    /// The server delivering (a random id per process) and until when its lease runs.
    holder: String,
    until: i64,
}

/// Checks the settings and starts delivering in the background; errors are configuration errors.
pub fn spawn(app: Arc<App>, settings: Settings) -> Result<tokio::task::JoinHandle<()>, String> {
    crate::http::client::check_url(&settings.url).map_err(|e| format!("[alert_webhook] url: {e}"))?;
    let tls = crate::http::client::tls_for(&settings.ca_pem).map_err(|e| format!("[alert_webhook] ca_file: {e}"))?;
    let me = valv_store::vault::new_id().map_err(|e| e.to_string())?;
    let receiver = crate::http::client::origin(&settings.url);
    tracing::info!(receiver = %receiver, "delivering alerts to the webhook");
    Ok(tokio::spawn(Sender { app, settings, receiver, tls, me, cipher: None, cursor: None }.run()))
}

struct Sender {
    app: Arc<App>,
    settings: Settings,
    /// The receiver as logs name it.
    receiver: String,
    tls: Arc<rustls::ClientConfig>,
    /// This process, as the lease holder.
    me: String,
    cipher: Option<Cipher>,
    /// The cursor and its stored version (0: not stored yet), while this server holds the
    /// lease; `None`: read it from the store.
    cursor: Option<(Cursor, u64)>,
}

enum Step {
    More,
    /// Caught up, another server delivers, or an alert is not stored yet: look again soon.
    Wait,
}

/// What became of one alert.
enum Sent {
    Accepted,
    /// Its entry is there but the alert is not stored yet.
    NotYet,
    /// Never stored: passed over.
    Skipped,
}

impl Sender {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.step().await {
                Ok(Step::More) => backoff = BACKOFF_MIN,
                Ok(Step::Wait) => {
                    backoff = BACKOFF_MIN;
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => {
                    // Messages name the receiver's origin and the failing step, never content.
                    self.app.metrics.webhook_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(receiver = %self.receiver, error = %e, retry_in_ms = backoff.as_millis() as u64, "alert webhook delivery failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// The audit key's cipher, unwrapped once (a key provider outside the process is not asked
    /// on every poll).
    async fn cipher(&mut self) -> Result<Cipher, String> {
        if let Some(c) = &self.cipher {
            return Ok(c.clone());
        }
        let key = self.app.vault.named_key("audit", self.app.clock.now_ms()).await.map_err(|e| format!("loading the audit key: {e}"))?;
        let c = Cipher::new(&key);
        self.cipher = Some(c.clone());
        Ok(c)
    }

    /// Looks through one batch of entries and sends the alerts among them, in order, holding
    /// the lease throughout.
    async fn step(&mut self) -> Result<Step, String> {
        let cipher = self.cipher().await?;
        let store = self.app.vault.store().clone();
        let size = store.audit_size().await.map_err(|e| format!("reading the audit log size: {e}"))?;
        let Some((mut cursor, mut version)) = self.hold(&cipher, size).await? else { return Ok(Step::Wait) };
        if cursor.next > size {
            tracing::warn!(position = cursor.next, size, "the audit log is shorter than the alert webhook's position (restored from a backup?); continuing from its end");
            cursor.next = size;
            cursor.recent.clear();
        }
        self.app.metrics.webhook_lag.store(size - cursor.next, Ordering::Relaxed);
        let to = size.min(cursor.next + BATCH);
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
            if !cursor.recent.contains(&id) {
                // Never start a delivery the lease may not outlast.
                if cursor.until - self.app.clock.now_ms() < LEASE_LEFT_MS {
                    let Some(v) = self.save(&cipher, &mut cursor, version).await? else { return Ok(Step::Wait) };
                    version = v;
                }
                match self.deliver(&cipher, index, time, &id).await? {
                    Sent::NotYet => {
                        cursor.next = index;
                        self.cursor = Some((cursor, version));
                        return Ok(Step::Wait);
                    }
                    Sent::Skipped => {}
                    Sent::Accepted => {
                        cursor.recent.push_back(id);
                        if cursor.recent.len() > RECENT {
                            cursor.recent.pop_front();
                        }
                    }
                }
            }
            cursor.next = index + 1;
            let Some(v) = self.save(&cipher, &mut cursor, version).await? else { return Ok(Step::Wait) };
            version = v;
        }
        cursor.next = to;
        self.app.metrics.webhook_lag.store(size - to, Ordering::Relaxed);
        self.cursor = Some((cursor, version));
        Ok(if to < size { Step::More } else { Step::Wait })
    }

    /// The cursor with this server holding a lease with time left, taking or renewing it as
    /// needed; `None` while another server holds it.
    async fn hold(&mut self, cipher: &Cipher, size: u64) -> Result<Option<(Cursor, u64)>, String> {
        let (mut cursor, version) = match self.cursor.take() {
            Some(held) => held,
            None => match crate::oversight::load_with::<Cursor>(&self.app, cipher, CURSOR.0, CURSOR.1).await.map_err(|e| e.diagnostics)? {
                Some(stored) => stored,
                // The first time: from the log's end.
                None => (Cursor { next: size, ..Cursor::default() }, 0),
            },
        };
        let now = self.app.clock.now_ms();
        if cursor.holder != self.me && cursor.until > now {
            self.app.metrics.webhook_lag.store(size.saturating_sub(cursor.next), Ordering::Relaxed);
            return Ok(None);
        }
        if cursor.holder != self.me || cursor.until - now < LEASE_LEFT_MS {
            let Some(version) = self.save(cipher, &mut cursor, version).await? else { return Ok(None) };
            return Ok(Some((cursor, version)));
        }
        Ok(Some((cursor, version)))
    }

    /// Sends one alert.
    async fn deliver(&self, cipher: &Cipher, index: u64, time: i64, id: &str) -> Result<Sent, String> {
        let Some(row) = self.app.vault.store().alert(id).await.map_err(|e| format!("reading alert {id}: {e}"))? else {
            if self.app.clock.now_ms() - time < UNSTORED_GRACE_MS {
                return Ok(Sent::NotYet);
            }
            tracing::warn!(alert = %id, entry = index, "an alert entry names an alert that was never stored; not sent");
            return Ok(Sent::Skipped);
        };
        let alert = super::api::open_alert(cipher, &row).map_err(|e| e.diagnostics)?;
        let now = self.app.clock.now_ms();
        let mut data = super::api::to_json(&alert);
        if let Some(fields) = data.as_object_mut() {
            if !self.settings.include_explanation {
                fields.remove("explanation");
            }
            fields.insert("auditEntry".into(), index.into());
            fields.insert("url".into(), format!("{}/admin/alerts/{id}", self.app.base_url.trim_end_matches("/fhir")).into());
        }
        let body = serde_json::json!({"type": "valv.alert", "timestamp": valv_fhir::date::format_instant(now), "data": data}).to_string();
        let message_id = format!("{id}_{}", &valv_crypto::hex::encode(&sha2::Sha256::digest(&row.sealed))[..16]);
        let timestamp = now.div_euclid(1000);
        let headers = [
            ("content-type", "application/json".to_string()),
            ("webhook-id", message_id.clone()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.settings.secret.sign(&message_id, timestamp, body.as_bytes())),
        ];
        let status = crate::http::client::https_status(&self.tls, hyper::Method::POST, &self.settings.url, &headers, Some(body)).await?;
        if !(200..300).contains(&status) {
            return Err(format!("the receiver answered {status} to alert {id}"));
        }
        self.app.metrics.webhook_delivered.fetch_add(1, Ordering::Relaxed);
        tracing::info!(alert = %id, "alert delivered to the webhook");
        Ok(Sent::Accepted)
    }

    /// Stores the cursor as the next version with this server's lease renewed: `None` when
    /// another server changed it first (it delivers; this one watches).
    async fn save(&mut self, cipher: &Cipher, cursor: &mut Cursor, version: u64) -> Result<Option<u64>, String> {
        cursor.holder = self.me.clone();
        cursor.until = self.app.clock.now_ms() + LEASE_MS;
        match crate::oversight::save_with(&self.app, cipher, CURSOR.0, CURSOR.1, version + 1, &*cursor).await {
            Ok(()) => Ok(Some(version + 1)),
            Err(e) if e.status == hyper::StatusCode::CONFLICT => {
                tracing::info!("another server delivers alerts to the webhook");
                Ok(None)
            }
            Err(e) => Err(format!("saving the webhook position: {}", e.diagnostics)),
        }
    }
}
