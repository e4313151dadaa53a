//! The detection engine in the server: a background task (started by `valv serve`) that reads
//! the audit log after its entries are durable, in leaf order, shows each entry to the pure rules
//! of `valv-detect`, and keeps what they raise. Never on a request's path.
//!
//! One engine per store: of several servers on one PostgreSQL database, the one leading the
//! detection duty ([`valv_store::Store::lead`]) reads; the others wait to take over. Two engines
//! reading at once would each read every entry and lose every other save to the other.
//!
//! Exactly once across restarts: the alerts of a batch are stored together with the new
//! progress (the next leaf index) in one transaction, and only if the stored progress is still
//! where this task left it (another server's detector may have moved it). The rules' state is
//! saved with it (sealed with the audit key) every [`STATE_EVERY`], whenever an alert is
//! raised and after a restart; a restarted task restores it and reads again, without raising
//! anything, the entries between that state and the saved progress, so it ends where it stopped
//! with the same state.
//! An alert raised twice has the same id, and the store keeps the first.
//!
//! Each alert is also written to the audit log (interaction `alert`, before the alert row: at
//! least once, so a crash in between may write that entry twice, never lose it), which carries
//! it to the SIEM forwarder and the alert webhook ([`webhook`]); it is counted in
//! `valv_alerts_total` and logged with ids only.

pub mod api;
mod facts;
pub mod webhook;

use crate::audit::{AuditEvent, Outcome};
use crate::App;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use valv_crypto::{Aad, Cipher};
use valv_detect::{Alert, Detector, Entry};
use valv_store::{AlertRow, DetectionRow};

/// How often the log is looked at once the task has caught up.
const POLL: Duration = Duration::from_millis(250);
/// Entries judged per step (and per saved progress).
const BATCH: u64 = 2048;
/// Entries read from the store at once, between which the task yields: a read and its
/// decryption hold a runtime thread (and, on SQLite, one of the readers' connections) that
/// requests are waiting for.
const READ_CHUNK: u64 = 128;
/// The rules' state is saved at least this often (and with every alert).
const STATE_EVERY: Duration = Duration::from_secs(10);
/// Waits after a failure: doubling up to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts the task.
pub fn spawn(app: Arc<App>, config: valv_detect::Config) -> tokio::task::JoinHandle<()> {
    tokio::spawn(Engine { app, config, cipher: None, detector: None, stored: None, state: None, facts: facts::Facts::default() }.run())
}

struct Engine {
    app: Arc<App>,
    config: valv_detect::Config,
    cipher: Option<Cipher>,
    /// The rules, once loaded from the store (or new).
    detector: Option<Detector>,
    /// The progress as stored (`None`: nothing stored yet).
    stored: Option<u64>,
    /// The saved state: where it stands, the sealed bytes, when it was saved.
    state: Option<(u64, Vec<u8>, Instant)>,
    /// What the snooping rules are told about each access.
    facts: facts::Facts,
}

enum Step {
    More,
    CaughtUp,
}

impl Engine {
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
                    tracing::warn!(error = %e, "the detection engine could not read or save; retrying");
                    // Start again from what is stored.
                    self.detector = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn cipher(&mut self) -> Result<Cipher, String> {
        if let Some(c) = &self.cipher {
            return Ok(c.clone());
        }
        let key = self.app.vault.named_key("audit", crate::now_ms()).await.map_err(|e| format!("loading the audit key: {e}"))?;
        let c = Cipher::new(&key);
        self.cipher = Some(c.clone());
        Ok(c)
    }

    /// Reads and judges one batch of new entries; stores what it raised with the progress.
    async fn step(&mut self) -> Result<Step, String> {
        let store = self.app.vault.store().clone();
        if !store.lead(valv_store::Duty::Detection).await.map_err(|e| format!("asking whether this server detects: {e}"))? {
            // Another server reads the log; should this one take over, it starts from what is
            // stored then.
            if self.detector.take().is_some() {
                tracing::warn!("another server runs the detection engine now");
            }
            self.app.metrics.detection_lag.store(0, Ordering::Relaxed);
            return Ok(Step::CaughtUp);
        }
        let cipher = self.cipher().await?;
        let mut detector = match self.detector.take() {
            Some(d) => d,
            None => {
                let d = self.load(&cipher).await?;
                tracing::info!(from = d.next_index(), "this server runs the detection engine");
                d
            }
        };
        // Read after the progress: the log only grows, so it is at least as long as any progress
        // read before it.
        let size = store.audit_size().await.map_err(|e| format!("reading the audit log size: {e}"))?;
        let from = detector.next_index();
        self.app.metrics.detection_lag.store(size.saturating_sub(from), Ordering::Relaxed);
        let mut alerts = Vec::new();
        if from < size {
            read(&store, &cipher, from, size.min(from + BATCH), &mut |e| alerts.extend(detector.observe(e))).await?;
        }
        // Accesses whose time to be explained has passed (also while the log is quiet).
        let due = detector.due(self.app.clock.now_ms());
        alerts.extend(self.facts.judge(&self.app, &mut detector, due).await);
        // The clock rule judges open incidents against now only once every entry is read: while
        // catching up, a notification further on in the log would not have been seen yet.
        if detector.next_index() >= size {
            alerts.extend(detector.deadlines(self.app.clock.now_ms()));
        }
        if from >= size && alerts.is_empty() {
            self.detector = Some(detector);
            return Ok(Step::CaughtUp);
        }
        let next = detector.next_index();
        let state_due = self.state.as_ref().is_none_or(|(_, _, at)| at.elapsed() >= STATE_EVERY);
        if state_due || !alerts.is_empty() {
            self.state = Some((next, seal_state(&cipher, &detector.state())?, Instant::now()));
        }
        let (state_at, state) = self.state.as_ref().map(|(at, s, _)| (*at, s.clone())).unwrap_or_default();
        let rows = alerts.iter().map(|a| seal_alert(&cipher, a)).collect::<Result<Vec<_>, _>>()?;
        // Alerts already stored (raised again by a detector that lost a race, or judging a
        // restored log again) are not written to the audit log again.
        let mut new = Vec::new();
        for a in &alerts {
            if store.alert(&a.id).await.map_err(|e| format!("reading an alert: {e}"))?.is_none() {
                new.push(a.clone());
            }
        }
        if !new.is_empty() {
            record(&self.app, &new).await?;
        }
        let progress = DetectionRow { next, state_at, state };
        if !store.save_detection(self.stored, &progress, &rows).await.map_err(|e| format!("saving the detection progress: {e}"))? {
            // Another server's detector is ahead: take up from what it stored.
            tracing::info!("another detector moved the detection progress; continuing from it");
            return Ok(Step::More);
        }
        self.stored = Some(next);
        for a in &new {
            self.app.metrics.alert_raised(&a.rule, a.severity.as_str());
            tracing::warn!(alert = %a.id, rule = %a.rule, severity = a.severity.as_str(), "alert raised");
        }
        self.app.metrics.detection_lag.store(size.saturating_sub(next), Ordering::Relaxed);
        self.detector = Some(detector);
        Ok(if next < size { Step::More } else { Step::CaughtUp })
    }

    /// The detector as stored: its saved state, brought up to the saved progress by reading the
    /// entries in between again (what they raised is stored already).
    async fn load(&mut self, cipher: &Cipher) -> Result<Detector, String> {
        let store = self.app.vault.store().clone();
        let Some(saved) = store.detection().await.map_err(|e| format!("reading the detection progress: {e}"))? else {
            self.stored = None;
            self.state = None;
            return Ok(Detector::new(self.config.clone()));
        };
        self.stored = Some(saved.next);
        // Read after the progress (which another server may move on at any time), so a log
        // shorter than it is one that really shrank.
        let size = store.audit_size().await.map_err(|e| format!("reading the audit log size: {e}"))?;
        if saved.next > size {
            // The log is shorter than what was read (restored from a backup): what follows is
            // new, so judge it from the log's end with fresh rules.
            tracing::warn!(position = saved.next, size, "the audit log is shorter than the detection progress; detection continues from its end");
            self.state = None;
            return Ok(Detector::starting_at(self.config.clone(), size));
        }
        let plain = cipher.open(&state_aad(), &saved.state).map_err(|_| "the detection state does not open (altered outside Valv?)".to_string())?;
        let mut detector = Detector::restore(self.config.clone(), &plain)?;
        read(&store, cipher, saved.state_at, saved.next, &mut |e| {
            detector.observe(e);
        })
        .await?;
        // Accesses judged since the state was saved are still waiting in it: the next step judges
        // them again, raising their alerts again under the same ids (stored once; a lost one is
        // stored now). The state is saved anew with the next progress, so a server restarted
        // again soon after does not read the same stretch again, and more each time.
        self.state = None;
        Ok(detector)
    }
}

/// Opens entries `[from, to)` and shows each, in order, to `judge`, [`READ_CHUNK`] at a time,
/// yielding to requests in between.
async fn read(store: &Arc<dyn valv_store::Store>, cipher: &Cipher, from: u64, to: u64, judge: &mut (dyn FnMut(&Entry) + Send)) -> Result<(), String> {
    let mut at = from;
    while at < to {
        if at > from {
            tokio::task::yield_now().await;
        }
        let end = to.min(at + READ_CHUNK);
        let rows = store.audit_entries(at, end).await.map_err(|e| format!("reading audit entries from {at}: {e}"))?;
        for (index, row) in &rows {
            if *index != at {
                return Err(format!("audit entry {at} is missing; detection stops until the log is repaired (run valv audit verify)"));
            }
            let bytes = crate::audit::open_entry(cipher, row).map_err(|e| format!("audit entry {at} does not open: {e}"))?;
            judge(&Entry::parse(at, &bytes)?);
            at += 1;
        }
        if rows.is_empty() {
            return Err(format!("audit entries from {at} are missing"));
        }
    }
    Ok(())
}

fn state_aad() -> Aad<'static> {
    Aad { purpose: "detection-state", resource_type: "", id: "", version: 0, patient: "" }
}

pub(crate) fn alert_aad(id: &str) -> Aad<'_> {
    Aad { purpose: "alert", resource_type: "", id, version: 0, patient: "" }
}

fn seal_state(cipher: &Cipher, state: &[u8]) -> Result<Vec<u8>, String> {
    Ok(cipher.seal(random_nonce()?, &state_aad(), state))
}

fn seal_alert(cipher: &Cipher, a: &Alert) -> Result<AlertRow, String> {
    let json = serde_json::to_vec(a).map_err(|e| format!("an alert: {e}"))?;
    Ok(AlertRow { id: a.id.clone(), time: a.time, rule: a.rule.clone(), severity: a.severity.as_str().to_string(), sealed: cipher.seal(random_nonce()?, &alert_aad(&a.id), &json) })
}

pub(crate) fn random_nonce() -> Result<[u8; 12], String> {
    let mut n = [0u8; 12];
    getrandom::fill(&mut n).map_err(|e| format!("no randomness: {e}"))?;
    Ok(n)
}

/// Writes each alert to the audit log (the SIEM forwarder sends it on from there).
async fn record(app: &App, alerts: &[Alert]) -> Result<(), String> {
    let now = app.clock.now_ms();
    let events = alerts.iter().map(|a| alert_event(a, now)).collect::<Result<Vec<_>, _>>()?;
    crate::request::audit(app, events).await.map_err(|e| format!("recording alerts: {}", e.diagnostics))
}

fn alert_event(a: &Alert, now: i64) -> Result<AuditEvent, String> {
    let evidence: Vec<String> = a.evidence.iter().map(u64::to_string).collect();
    Ok(AuditEvent {
        event_id: valv_store::vault::new_id().map_err(|e| e.to_string())?,
        time: now,
        request_id: format!("detect-{}", a.id),
        action: "E",
        interaction: "alert",
        outcome: Outcome::Success,
        status: 0,
        agent_id: "valv-detect".into(),
        agent_name: "detection engine".into(),
        roles: Vec::new(),
        source_address: String::new(),
        purpose_of_use: None,
        patient: None,
        resource_type: None,
        resource_id: Some(a.id.clone()),
        version: None,
        query: None,
        reason: format!("{} {}: {} (evidence: audit entries {})", a.severity.as_str(), a.rule, a.explanation, evidence.join(",")),
    })
}
