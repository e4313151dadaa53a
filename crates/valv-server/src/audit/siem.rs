//! Live SIEM forwarding: every audit entry, in leaf-index order, as an RFC 5424 syslog message
//! over TLS with RFC 5425 octet-counted framing (`MSG-LEN SP SYSLOG-MSG`), to one collector.
//!
//! This is a deliberate export of the audit log to the customer's SIEM: MSG is the entry's
//! canonical JSON, which names patients, agents and queries. The channel is therefore TLS only
//! (1.2 or 1.3, the collector's certificate checked against a configured CA and name).
//!
//! The local log stays the source of truth. A background task started by `valv serve` polls the
//! store for new entries, sends them in order and records how far it got in `siem.position` in the
//! data directory (written atomically after each batch), so it resumes after a restart and catches
//! up after a collector outage; without that file it starts from the first entry of the log. It
//! never runs in the request path: a collector that is down or slow only delays forwarding
//! (failures are logged without patient data, counted and retried with backoff) and shows as lag
//! in the metrics.
//!
//! Of several servers on one database one forwards: the one leading the forwarding duty
//! ([`valv_store::Store::lead`]); the others wait. The forwarder also keeps its position in the
//! store (sealed, as the case `cursor/siem`, at most every [`SHARE_EVERY`]), and a server that
//! takes over from another starts there (or at its own file's position, if that is further), so
//! a takeover re-sends about a second of entries instead of the log from its start. At start a
//! server goes by its own file, as a single server always does (delete it to re-send everything).
//!
//! Delivery is at least once: a crash between sending a batch and writing the position re-sends
//! it. Each message carries its leaf index (and leaf hash) in structured data, so duplicates and
//! gaps are recognisable. Syslog over TLS has no acknowledgements: an entry written to the
//! connection but lost by a collector that dies before processing it is not re-sent (the index
//! sequence shows the gap; delete `siem.position` to re-send from the start).
//!
//! Message: `<PRI>1 TIMESTAMP HOSTNAME valv PROCID audit [valv@32473 index="N" leaf="B64"] BOM JSON`
//! with facility 13 (log audit), severity notice for successes and warning otherwise, TIMESTAMP
//! the entry's time. 32473 is the IANA example enterprise number (RFC 5612), a placeholder for the
//! SD-ID until Valv has its own.

use crate::App;
use base64::Engine as _;
use rustls::pki_types::ServerName;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use valv_store::AuditRow;

/// How often the store is polled for new entries once caught up.
const POLL: Duration = Duration::from_millis(500);
/// Retry delays after a failure: doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Bounds on connecting (TCP + TLS handshake) and on writing one batch, so a stalled collector
/// becomes a retried failure instead of a task stuck forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// Entries read, framed and sent per batch (and per position write).
const BATCH: u64 = 256;
/// Facility 13 = log audit (RFC 5424 table 1); severities 5 = notice, 4 = warning.
const FACILITY: u8 = 13;
/// The SD-ID's enterprise number: IANA's example PEN (RFC 5612), a placeholder.
const SD_ID: &str = "valv@32473";
/// The file in the data directory that holds the next leaf index to forward.
pub const POSITION_FILE: &str = "siem.position";
/// The position shared with the other servers on the database, for one that takes over.
const SHARED: (&str, &str) = ("cursor", "siem");
/// The shared position is saved at most this often: what a takeover may send again.
const SHARE_EVERY: Duration = Duration::from_secs(1);

/// What [`SHARED`] holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedPosition {
    next: u64,
}

/// Where and how to forward; built from the `[siem]` configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The collector, `host:port`.
    pub address: String,
    /// The name the collector's certificate must carry.
    pub server_name: String,
    /// CA certificates (PEM) trusted for the collector.
    pub ca_file: PathBuf,
    /// Where the forwarding position is kept (normally `<data dir>/siem.position`).
    pub position_file: PathBuf,
}

/// Checks the settings (CA file, server name, position file) and starts forwarding in the
/// background. Errors are configuration errors, reported before the server starts serving.
pub fn spawn(app: Arc<App>, settings: Settings) -> Result<tokio::task::JoinHandle<()>, String> {
    let tls = valv_store::postgres::tls::client_config(&settings.ca_file).map_err(|e| format!("siem: {e}"))?;
    let server_name = ServerName::try_from(settings.server_name.clone())
        .map_err(|_| format!("siem: '{}' is not a valid server name", settings.server_name))?;
    let next = read_position(&settings.position_file)?;
    let forwarder = Forwarder {
        app,
        connector: tokio_rustls::TlsConnector::from(tls),
        server_name,
        address: settings.address.clone(),
        position_file: settings.position_file,
        header_host: hostname(),
        procid: std::process::id(),
        conn: None,
        next,
        position_saved: true,
        cipher: None,
        leading: false,
        followed: false,
        shared: None,
    };
    tracing::info!(collector = %settings.address, from_index = next, "forwarding audit entries to the SIEM collector");
    Ok(tokio::spawn(forwarder.run()))
}

/// The next index to forward: 0 when no position was saved yet (the whole log is sent).
fn read_position(path: &Path) -> Result<u64, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| format!("siem: {} does not hold a leaf index; fix or delete it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("siem: {}: {e}", path.display())),
    }
}

/// Write to a temporary file, fsync, rename over the old one, fsync the directory: a crash
/// leaves either the old position or the new one, never a torn file.
fn write_position(path: &Path, next: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("position.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{next}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// RFC 5424 HOSTNAME: printable US-ASCII without spaces, at most 255 characters, `-` if unknown.
pub fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").or_else(|_| std::fs::read_to_string("/etc/hostname")).unwrap_or_default();
    let clean: String = raw.trim().chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    if clean.is_empty() { "-".into() } else { clean }
}

/// One framed message: `MSG-LEN SP SYSLOG-MSG` (RFC 5425 section 4.3).
pub fn frame(index: u64, row: &AuditRow, entry: &[u8], host: &str, procid: u32) -> Vec<u8> {
    let msg = message(index, row, entry, host, procid);
    let mut framed = format!("{} ", msg.len()).into_bytes();
    framed.extend_from_slice(&msg);
    framed
}

/// One RFC 5424 SYSLOG-MSG for an entry (also what `valv audit export --format syslog` prints).
pub fn message(index: u64, row: &AuditRow, entry: &[u8], host: &str, procid: u32) -> Vec<u8> {
    // Only the timestamp and outcome are read from the entry; MSG is its bytes unchanged, so a
    // receiver can recompute the leaf hash from them.
    let parsed: serde_json::Value = serde_json::from_slice(entry).unwrap_or_default();
    let severity = if parsed["outcome"] == "success" { 5 } else { 4 };
    let timestamp = parsed["time"].as_i64().map(valv_fhir::date::format_instant).unwrap_or_else(|| "-".into());
    let leaf = base64::engine::general_purpose::STANDARD.encode(row.leaf_hash);
    let mut msg = format!("<{}>1 {timestamp} {host} valv {procid} audit [{SD_ID} index=\"{index}\" leaf=\"{leaf}\"] ", FACILITY * 8 + severity)
        .into_bytes();
    // MSG is UTF-8, which RFC 5424 section 6.4 marks with a BOM.
    msg.extend_from_slice(b"\xEF\xBB\xBF");
    msg.extend_from_slice(entry);
    msg
}

struct Forwarder {
    app: Arc<App>,
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    address: String,
    position_file: PathBuf,
    header_host: String,
    procid: u32,
    conn: Option<TlsStream<TcpStream>>,
    /// The next leaf index to send.
    next: u64,
    /// Whether `next` is on disk (a failed position write is retried before the next batch).
    position_saved: bool,
    cipher: Option<valv_crypto::Cipher>,
    /// Whether this server forwards now, and whether another one did since it started.
    leading: bool,
    followed: bool,
    /// The version of the shared position and when it was saved, once known.
    shared: Option<(u64, Instant)>,
}

/// What one step achieved.
enum Step {
    CaughtUp,
    More,
}

impl Forwarder {
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
                    // Messages name the collector and the failing step, never entry content.
                    self.app.metrics.siem_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(collector = %self.address, error = %e, retry_in_ms = backoff.as_millis() as u64, "SIEM forwarding failed; retrying");
                    self.conn = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Sends at most one batch of new entries, if this server forwards.
    async fn step(&mut self) -> Result<Step, String> {
        let store = self.app.vault.store().clone();
        if !store.lead(valv_store::Duty::Forwarding).await.map_err(|e| format!("asking whether this server forwards: {e}"))? {
            if self.leading {
                tracing::warn!(collector = %self.address, "another server forwards audit entries to the SIEM collector now");
            }
            (self.leading, self.followed, self.conn) = (false, true, None);
            self.app.metrics.siem_lag.store(0, Ordering::Relaxed);
            return Ok(Step::CaughtUp);
        }
        let cipher = self.cipher().await?;
        if !self.leading {
            if self.followed {
                self.take_over(&cipher).await?;
            }
            self.leading = true;
            tracing::info!(collector = %self.address, from_index = self.next, "this server forwards audit entries to the SIEM collector");
        }
        if !self.position_saved {
            self.save_position().await?;
        }
        let size = store.audit_size().await.map_err(|e| format!("reading the audit log size: {e}"))?;
        if self.next > size {
            // The log is shorter than what was forwarded (e.g. restored from a backup): what
            // follows now is new to the collector, so forward from the log's end.
            tracing::warn!(position = self.next, size, "the audit log is shorter than the SIEM position; forwarding from its end");
            self.next = size;
            self.save_position().await?;
        }
        self.app.metrics.siem_lag.store(size - self.next, Ordering::Relaxed);
        if size == self.next {
            return Ok(Step::CaughtUp);
        }
        let to = size.min(self.next + BATCH);
        let rows = store.audit_entries(self.next, to).await.map_err(|e| format!("reading audit entries from {}: {e}", self.next))?;
        if rows.is_empty() {
            return Err(format!("audit entries from {} are missing", self.next));
        }
        let mut buf = Vec::new();
        for (i, (stored_index, row)) in rows.iter().enumerate() {
            let index = self.next + i as u64;
            if *stored_index != index {
                return Err(format!("audit entry {index} is missing; forwarding stops until the log is repaired (run valv audit verify)"));
            }
            // A corrupt entry stops forwarding here (counted and retried) rather than being
            // skipped: the collector's sequence must not silently lose an entry.
            let entry = crate::audit::open_entry(&cipher, row).map_err(|e| format!("audit entry {index} does not open: {e}"))?;
            buf.extend_from_slice(&frame(index, row, &entry, &self.header_host, self.procid));
        }
        let conn = self.connection().await?;
        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
            conn.write_all(&buf).await?;
            conn.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("sending to the collector: {e}")),
            Err(_) => return Err(format!("sending to the collector timed out after {} s", WRITE_TIMEOUT.as_secs())),
        }
        let sent = rows.len() as u64;
        self.next += sent;
        self.position_saved = false;
        self.app.metrics.siem_forwarded.fetch_add(sent, Ordering::Relaxed);
        self.app.metrics.siem_lag.store(size - self.next, Ordering::Relaxed);
        self.save_position().await?;
        self.share_position(&cipher).await;
        Ok(if self.next < size { Step::More } else { Step::CaughtUp })
    }

    async fn cipher(&mut self) -> Result<valv_crypto::Cipher, String> {
        if let Some(c) = &self.cipher {
            return Ok(c.clone());
        }
        let k = self.app.vault.named_key("audit", crate::now_ms()).await.map_err(|e| format!("loading the audit key: {e}"))?;
        let c = valv_crypto::Cipher::new(&k);
        self.cipher = Some(c.clone());
        Ok(c)
    }

    /// Taking over from another server: its shared position, if further than this server's.
    async fn take_over(&mut self, cipher: &valv_crypto::Cipher) -> Result<(), String> {
        let stored = crate::oversight::load_with::<SharedPosition>(&self.app, cipher, SHARED.0, SHARED.1).await.map_err(|e| format!("reading the shared SIEM position: {}", e.diagnostics))?;
        if let Some((shared, version)) = stored {
            self.shared = Some((version, Instant::now()));
            if shared.next > self.next {
                (self.next, self.position_saved) = (shared.next, false);
            }
        }
        Ok(())
    }

    /// Shares the position with the other servers, at most every [`SHARE_EVERY`]. A failure
    /// only means a takeover would re-send more: logged, not fatal (the file is this server's
    /// own record).
    async fn share_position(&mut self, cipher: &valv_crypto::Cipher) {
        if self.shared.is_some_and(|(_, at)| at.elapsed() < SHARE_EVERY) {
            return;
        }
        let version = match self.shared {
            Some((v, _)) => v,
            None => match self.app.vault.store().case(SHARED.0, SHARED.1).await {
                Ok(row) => row.map_or(0, |r| r.version),
                Err(e) => {
                    tracing::warn!(error = %e, "reading the shared SIEM position failed");
                    return;
                }
            },
        };
        match crate::oversight::save_with(&self.app, cipher, SHARED.0, SHARED.1, version + 1, &SharedPosition { next: self.next }).await {
            Ok(()) => self.shared = Some((version + 1, Instant::now())),
            Err(e) => {
                // Another server wrote it (a handover under way): read its version next time.
                self.shared = None;
                tracing::warn!(error = %e.diagnostics, "saving the shared SIEM position failed");
            }
        }
    }

    async fn save_position(&mut self) -> Result<(), String> {
        let (path, next) = (self.position_file.clone(), self.next);
        // fsync is blocking I/O: keep it off the runtime's worker threads.
        tokio::task::spawn_blocking(move || write_position(&path, next))
            .await
            .map_err(|e| format!("writing the SIEM position: {e}"))?
            .map_err(|e| format!("writing the SIEM position to {}: {e}", self.position_file.display()))?;
        self.position_saved = true;
        Ok(())
    }

    /// The open connection if the collector has not closed it, else a new one.
    async fn connection(&mut self) -> Result<&mut TlsStream<TcpStream>, String> {
        if let Some(conn) = &mut self.conn {
            if peer_closed(conn).await {
                tracing::info!(collector = %self.address, "the SIEM collector closed the connection; reconnecting");
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            let connect = async {
                let tcp = TcpStream::connect(&self.address).await.map_err(|e| format!("connecting to {}: {e}", self.address))?;
                let _ = tcp.set_nodelay(true);
                self.connector.connect(self.server_name.clone(), tcp).await.map_err(|e| format!("TLS with {}: {e}", self.address))
            };
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| format!("connecting to {} timed out after {} s", self.address, CONNECT_TIMEOUT.as_secs()))??;
            tracing::info!(collector = %self.address, "connected to the SIEM collector");
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or_else(|| "no connection".to_string())
    }
}

/// A syslog collector never sends anything, so a readable connection means it was closed (or
/// reset). Checking before each batch keeps entries from being written into a dead connection
/// after a collector restart, where the kernel would accept them and they would be lost.
async fn peer_closed(conn: &mut TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 512];
    // A zero timeout still polls the read once: it answers only what is already known.
    match tokio::time::timeout(Duration::ZERO, conn.read(&mut buf)).await {
        Err(_) => false,
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_an_entry_as_rfc5424_with_octet_counting() {
        let entry = br#"{"action":"R","outcome":"success","time":1700000000123}"#;
        let row = AuditRow { leaf_hash: [7; 32], sealed: vec![], patient_token: None, query_sealed: None };
        let framed = frame(42, &row, entry, "host1", 99);
        let text = String::from_utf8(framed).expect("utf-8");
        let (len, msg) = text.split_once(' ').expect("length prefix");
        assert_eq!(len.parse::<usize>().expect("number"), msg.len());
        let leaf = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let expected = format!("<109>1 2023-11-14T22:13:20.123Z host1 valv 99 audit [valv@32473 index=\"42\" leaf=\"{leaf}\"] \u{feff}");
        assert!(msg.starts_with(&expected), "{msg}");
        assert!(msg.ends_with(std::str::from_utf8(entry).expect("utf-8")));
        let denied = String::from_utf8(frame(0, &row, br#"{"outcome":"denied"}"#, "h", 1)).expect("utf-8");
        assert!(denied.contains(" <108>1 - h valv 1 audit "), "{denied}");
    }

    #[test]
    fn position_round_trips_atomically() {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("random");
        let dir = std::env::temp_dir().join(format!("valv-siem-test-{}", u64::from_le_bytes(r)));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(POSITION_FILE);
        assert_eq!(read_position(&path).expect("absent"), 0);
        write_position(&path, 17).expect("write");
        write_position(&path, 18).expect("overwrite");
        assert_eq!(read_position(&path).expect("read"), 18);
        std::fs::write(&path, "garbage").expect("write");
        assert!(read_position(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
