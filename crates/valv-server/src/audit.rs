//! The audit seam: every FHIR request hands its entries to an [`AuditSink`] and waits until they
//! are durable before anything leaves the server. If the sink fails, the request fails with 503.
//!
//! This version's sink, [`FileAuditLog`], appends each entry sealed with the audit data key
//! (AES-256-GCM, bound to the entry's id) to `audit/audit.log`, one writer thread committing
//! concurrent requests' entries together with one fsync. The verifiable log (Merkle tree, signed
//! checkpoints, proofs) replaces it behind the same trait.

use async_trait::async_trait;
use base64::Engine as _;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::{mpsc, Mutex};
use tokio::sync::oneshot;
use valv_crypto::{Aad, DataKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Denied,
    Error,
}

/// One audit entry (IHE BALP fields). Never holds resource content: ids, codes and the query.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub event_id: String,
    /// Milliseconds since the Unix epoch.
    pub time: i64,
    pub request_id: String,
    /// C, R, U, D or E (BALP / AuditEvent.action).
    pub action: &'static str,
    /// read, vread, search-type, create, update, delete, history, transaction, batch, authenticate.
    pub interaction: &'static str,
    pub outcome: Outcome,
    pub status: u16,
    pub agent_id: String,
    pub agent_name: String,
    pub roles: Vec<String>,
    pub source_address: String,
    pub purpose_of_use: Option<String>,
    pub patient: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub version: Option<u64>,
    pub query: Option<String>,
    /// The policy rule that decided, or why it failed.
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
#[error("audit log unavailable: {0}")]
pub struct AuditError(pub String);

#[async_trait]
pub trait AuditSink: Send + Sync {
    /// Returns once every entry is durable, or fails (and then the request must fail).
    async fn record(&self, events: Vec<AuditEvent>) -> Result<(), AuditError>;
    /// Whether an append failed within `window_ms` before `now_ms` (for readiness).
    fn failed_within(&self, now_ms: i64, window_ms: i64) -> bool;
}

type Job = (Vec<Vec<u8>>, oneshot::Sender<Result<(), AuditError>>);

pub struct FileAuditLog {
    key: DataKey,
    tx: Mutex<mpsc::Sender<Job>>,
    /// When the last append failed (ms since the epoch), 0 if never.
    last_failure: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl FileAuditLog {
    pub fn open(path: &Path, key: DataKey) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AuditError(format!("creating {}: {e}", dir.display())))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AuditError(format!("opening {}: {e}", path.display())))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let last_failure = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let failures = last_failure.clone();
        std::thread::Builder::new()
            .name("valv-audit-writer".into())
            .spawn(move || writer_loop(file, rx, &failures))
            .map_err(|e| AuditError(format!("starting the audit writer: {e}")))?;
        Ok(FileAuditLog { key, tx: Mutex::new(tx), last_failure })
    }

    fn seal_line(&self, event: &AuditEvent) -> Result<Vec<u8>, AuditError> {
        let plain = serde_json::to_vec(event).map_err(|e| AuditError(e.to_string()))?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| AuditError(format!("no randomness: {e}")))?;
        let aad = Aad { purpose: "audit", resource_type: "", id: &event.event_id, version: 0, patient: "" };
        let sealed = valv_crypto::seal(&self.key, nonce, &aad, &plain);
        let mut line = format!("{} ", event.event_id).into_bytes();
        line.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(sealed).as_bytes());
        line.push(b'\n');
        Ok(line)
    }
}

fn writer_loop(mut file: File, rx: mpsc::Receiver<Job>, last_failure: &std::sync::atomic::AtomicI64) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(job) = rx.try_recv() {
            group.push(job);
        }
        let bytes: Vec<u8> = group.iter().flat_map(|(lines, _)| lines.iter().flatten().copied()).collect();
        let result = file.write_all(&bytes).and_then(|()| file.sync_data()).map_err(|e| AuditError(e.to_string()));
        if result.is_err() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            last_failure.store(now, std::sync::atomic::Ordering::Relaxed);
        }
        for (_, reply) in group {
            let _ = reply.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(AuditError(e.0.clone())),
            });
        }
    }
}

#[async_trait]
impl AuditSink for FileAuditLog {
    async fn record(&self, events: Vec<AuditEvent>) -> Result<(), AuditError> {
        if events.is_empty() {
            return Ok(());
        }
        let lines = events.iter().map(|e| self.seal_line(e)).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .lock()
            .map_err(|_| AuditError("audit writer lock poisoned".into()))?
            .send((lines, tx))
            .map_err(|_| AuditError("the audit writer has stopped".into()))?;
        rx.await.map_err(|_| AuditError("the audit writer dropped an entry".into()))?
    }

    fn failed_within(&self, now_ms: i64, window_ms: i64) -> bool {
        let last = self.last_failure.load(std::sync::atomic::Ordering::Relaxed);
        last != 0 && now_ms - last < window_ms
    }
}

/// Reads back and decrypts an audit file (for tests and, later, export).
pub fn read_all(path: &Path, key: &DataKey) -> Result<Vec<serde_json::Value>, AuditError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuditError(e.to_string()))?;
    text.lines()
        .map(|line| {
            let (id, b64) = line.split_once(' ').ok_or_else(|| AuditError("malformed line".into()))?;
            let sealed = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| AuditError(e.to_string()))?;
            let aad = Aad { purpose: "audit", resource_type: "", id, version: 0, patient: "" };
            let plain = valv_crypto::open(key, &aad, &sealed).map_err(|e| AuditError(e.to_string()))?;
            serde_json::from_slice(&plain).map_err(|e| AuditError(e.to_string()))
        })
        .collect()
}
