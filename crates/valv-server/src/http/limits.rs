//! What a client can make the server hold, bounded: connections (in all and per source address),
//! time (TLS handshake, header read, idle connections, request bodies), memory for request bodies
//! (one server-wide budget) and the rate of requests that carry no valid credential.
//!
//! None of these depends on who the client is: they hold before any credential is checked, so a
//! flood from an address without credentials costs a bounded amount of sockets, memory and CPU.
//! Authenticated traffic is never rate-limited here (it is accountable and audited).

use crate::error::ApiError;
use hyper::StatusCode;
use std::collections::HashMap;
use super::metrics::write_metric;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use valv_identity::limits::{Bucket, Rate};

/// The knobs (`[limits]` in `valv.toml`); the defaults are documented in docs/API.md.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Open connections in all; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// Open connections from one source (an IPv4 address or an IPv6 /64).
    pub max_connections_per_address: usize,
    pub handshake_timeout: Duration,
    /// HTTP/1.1: a request's headers must arrive within this (also between keep-alive requests).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/1.1 and HTTP/2).
    pub idle_timeout: Duration,
    /// A request body must be complete within this, however fast it arrives.
    pub body_timeout: Duration,
    /// After this grace, a body must have arrived at `body_min_bytes_per_sec` on average.
    pub body_grace: Duration,
    pub body_min_bytes_per_sec: u64,
    /// Memory for request bodies in all: bytes read plus the estimated size of their JSON tree.
    pub body_memory_bytes: usize,
    /// Largest FHIR body (`[server] max_body_bytes`).
    pub max_body_bytes: usize,
    /// Largest body of `/auth/*` (sign-in, enrollment, password change).
    pub auth_body_bytes: usize,
    /// Largest body of `/admin/*`.
    pub admin_body_bytes: usize,
    /// Largest header block (HTTP/2 header list; HTTP/1.1 read buffer is twice this).
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 pings this often; a peer that does not answer within `h2_keep_alive_timeout` is dropped.
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
    /// Requests without a valid credential, per source address.
    pub unauthenticated: Rate,
    /// On SIGTERM: how long requests in flight may take to finish before the process exits.
    pub shutdown_grace: Duration,
    /// New connections per source address (a bucket): beyond it they are refused like those
    /// beyond the caps, so a source cannot make the server do TLS handshakes at its own pace.
    pub new_connections: Rate,
    /// A refused connection is held this long before it is reset (a tarpit), so a client that
    /// reconnects at once cannot make the server and kernel accept and reset at its own pace…
    pub tarpit: Duration,
    /// …at most this many at once (beyond, refused connections are reset at once).
    pub max_tarpit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            new_connections: Rate { per_minute: 1_200, burst: 200 },
            tarpit: Duration::from_secs(5),
            max_tarpit: 1_024,
            shutdown_grace: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_address: 64,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            body_grace: Duration::from_secs(10),
            body_min_bytes_per_sec: 16 * 1024,
            body_memory_bytes: 512 * 1024 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
            auth_body_bytes: 8 * 1024,
            admin_body_bytes: 64 * 1024,
            max_header_bytes: 32 * 1024,
            h2_max_concurrent_streams: 100,
            h2_keep_alive_interval: Duration::from_secs(20),
            h2_keep_alive_timeout: Duration::from_secs(10),
            unauthenticated: Rate { per_minute: 600, burst: 300 },
        }
    }
}

/// The source a per-address limit counts: an IPv4 address, or the /64 of an IPv6 address (one
/// host is usually given a whole /64, so counting single IPv6 addresses would limit nothing).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Counters for `/metrics` (no labels: nothing here names a client).
#[derive(Default)]
pub struct Counters {
    pub connections_refused: AtomicU64,
    pub accept_errors: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub idle_closed: AtomicU64,
    pub bodies_timed_out: AtomicU64,
    pub bodies_too_large: AtomicU64,
    pub body_budget_refused: AtomicU64,
    pub unauthenticated_limited: AtomicU64,
    pub connections_tarpitted: AtomicU64,
}

/// Limits and their state, shared by every connection.
pub struct Limits {
    pub settings: Settings,
    conns: Arc<ConnTable>,
    budget: Arc<Budget>,
    buckets: Mutex<HashMap<IpAddr, (Bucket, bool)>>,
    /// New connections per source.
    conn_buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// Refused connections held in the tarpit now.
    tarpitted: Arc<AtomicUsize>,
    /// Rate limiting runs on its own monotonic clock: the app clock may be set by tests.
    epoch: Instant,
    pub counters: Counters,
    /// When a refusal or accept error was last logged (ms since `epoch`), to log at most every few seconds.
    last_log: AtomicU64,
}

/// Buckets kept at most; full ones are forgotten first (an attacker with many addresses cannot
/// grow this without bound).
const MAX_BUCKETS: usize = 100_000;
/// Logs about refusals at most this often.
const LOG_EVERY_MS: u64 = 5_000;

impl Limits {
    pub fn new(settings: Settings) -> Self {
        Limits {
            conns: Arc::new(ConnTable { open: Mutex::new(HashMap::new()), total: AtomicUsize::new(0) }),
            budget: Arc::new(Budget { cap: settings.body_memory_bytes, used: AtomicUsize::new(0) }),
            buckets: Mutex::new(HashMap::new()),
            conn_buckets: Mutex::new(HashMap::new()),
            tarpitted: Arc::new(AtomicUsize::new(0)),
            epoch: Instant::now(),
            counters: Counters::default(),
            last_log: AtomicU64::new(0),
            settings,
        }
    }

    fn now_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    /// Takes a token from the source's bucket of new connections.
    fn take_new_connection(&self, key: IpAddr) -> bool {
        let (rate, now) = (self.settings.new_connections, self.now_ms());
        let Ok(mut buckets) = self.conn_buckets.lock() else { return false };
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| !b.is_full(rate, now));
        }
        if buckets.len() >= MAX_BUCKETS {
            return false;
        }
        buckets.entry(key).or_insert_with(|| Bucket::full(rate, now)).take(rate, now).is_ok()
    }

    /// A place in the tarpit for a refused connection, while there is one.
    pub fn tarpit_slot(&self) -> Option<TarpitSlot> {
        let held = self.tarpitted.fetch_add(1, Ordering::AcqRel);
        if held >= self.settings.max_tarpit {
            self.tarpitted.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.counters.connections_tarpitted.fetch_add(1, Ordering::Relaxed);
        Some(TarpitSlot(self.tarpitted.clone()))
    }

    /// Whether to log now (true at most once per [`LOG_EVERY_MS`]), so a flood cannot flood the log.
    pub fn may_log(&self) -> bool {
        let now = (self.now_ms().max(0) as u64).max(1);
        let last = self.last_log.load(Ordering::Relaxed);
        if last != 0 && now < last + LOG_EVERY_MS {
            return false;
        }
        self.last_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    /// A slot for a new connection from `ip`, or `None` when the server or that source is full.
    pub fn admit_connection(&self, ip: IpAddr) -> Option<ConnPermit> {
        let key = source_key(ip);
        if !self.take_new_connection(key) {
            return None;
        }
        let Ok(mut open) = self.conns.open.lock() else { return None };
        if self.conns.total.load(Ordering::Relaxed) >= self.settings.max_connections {
            return None;
        }
        let n = open.entry(key).or_insert(0);
        if *n >= self.settings.max_connections_per_address {
            return None;
        }
        *n += 1;
        self.conns.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnPermit { table: self.conns.clone(), key })
    }

    /// Open connections now.
    pub fn open_connections(&self) -> usize {
        self.conns.total.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` of the body budget, or says the server is busy (503, retry in 1 s).
    pub fn reserve(&self, bytes: usize) -> Result<Reservation, ApiError> {
        let mut r = Reservation { budget: self.budget.clone(), bytes: 0 };
        self.grow(&mut r, bytes)?;
        Ok(r)
    }

    /// Adds `bytes` to a reservation.
    pub fn grow(&self, r: &mut Reservation, bytes: usize) -> Result<(), ApiError> {
        if bytes > self.budget.cap {
            self.counters.bodies_too_large.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-costly",
                format!("the body would need about {bytes} bytes of memory, more than this server's budget for request bodies ({} bytes)", self.budget.cap),
            ));
        }
        let ok = self.budget.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(bytes).filter(|n| *n <= self.budget.cap));
        if ok.is_err() {
            self.counters.body_budget_refused.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::unavailable("the server is reading too many request bodies at once; retry shortly").retry_after(1));
        }
        r.bytes += bytes;
        Ok(())
    }

    /// Bytes of the body budget in use now.
    pub fn budget_used(&self) -> usize {
        self.budget.used.load(Ordering::Relaxed)
    }

    /// When a body that started arriving at `start` and has `received` bytes so far must be
    /// complete: within the grace plus the time the minimum rate allows, never after the total.
    pub fn body_deadline(&self, start: tokio::time::Instant, received: usize) -> tokio::time::Instant {
        let s = &self.settings;
        let earned = Duration::from_secs_f64(received as f64 / s.body_min_bytes_per_sec.max(1) as f64);
        start + s.body_timeout.min(s.body_grace.saturating_add(earned))
    }

    /// Takes a token from `ip`'s bucket of unauthenticated requests: `Err((seconds, first))`
    /// when it is empty, `first` on the first refusal since the source was last let through.
    pub fn take_unauthenticated(&self, ip: IpAddr) -> Result<(), (u64, bool)> {
        self.bucket(ip, true)
    }

    /// As [`Limits::take_unauthenticated`] without taking: whether the bucket is empty now.
    pub fn check_unauthenticated(&self, ip: IpAddr) -> Result<(), (u64, bool)> {
        self.bucket(ip, false)
    }

    fn bucket(&self, ip: IpAddr, take: bool) -> Result<(), (u64, bool)> {
        let (rate, now, key) = (self.settings.unauthenticated, self.now_ms(), source_key(ip));
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        if !take && !buckets.contains_key(&key) {
            return Ok(());
        }
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, (b, _)| !b.is_full(rate, now));
        }
        if buckets.len() >= MAX_BUCKETS {
            return Err((60, false));
        }
        let (bucket, refusing) = buckets.entry(key).or_insert((Bucket::full(rate, now), false));
        let mut trial = *bucket;
        match trial.take(rate, now) {
            Ok(()) => {
                if take {
                    *bucket = trial;
                }
                *refusing = false;
                Ok(())
            }
            Err(wait) => {
                let first = !*refusing;
                *refusing = true;
                self.counters.unauthenticated_limited.fetch_add(1, Ordering::Relaxed);
                Err((wait, first))
            }
        }
    }

    /// Gauges and counters in the Prometheus text format, appended to the server's metrics.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, v) in [
            ("valv_connections_open", "Open client connections.", self.open_connections() as u64),
            ("valv_request_body_memory_bytes", "Memory reserved for request bodies (bytes read and their parsed JSON, estimated).", self.budget_used() as u64),
        ] {
            write_metric(&mut out, "gauge", name, help, v);
        }
        let c = &self.counters;
        for (name, help, v) in [
            ("valv_connections_refused_total", "Connections closed at once because the server or their source address had too many.", &c.connections_refused),
            ("valv_accept_errors_total", "Failures to accept a connection (e.g. out of file descriptors); the accept loop backs off.", &c.accept_errors),
            ("valv_tls_handshake_failures_total", "Connections closed because the TLS handshake failed or took too long.", &c.handshake_failures),
            ("valv_connections_idle_closed_total", "Connections closed after the idle timeout with no request in flight.", &c.idle_closed),
            ("valv_request_bodies_timed_out_total", "Requests refused (408) because their body arrived too slowly.", &c.bodies_timed_out),
            ("valv_request_bodies_too_large_total", "Requests refused (413) because their body exceeded the endpoint's limit or the memory budget.", &c.bodies_too_large),
            ("valv_request_body_budget_refused_total", "Requests refused (503) because the memory budget for request bodies was in use.", &c.body_budget_refused),
            ("valv_unauthenticated_rate_limited_total", "Requests without a valid credential refused by the per-address rate limit (429).", &c.unauthenticated_limited),
            ("valv_connections_tarpitted_total", "Refused connections held a few seconds before being reset, so a client reconnecting at once cannot churn.", &c.connections_tarpitted),
        ] {
            write_metric(&mut out, "counter", name, help, v.load(Ordering::Relaxed));
        }
        out
    }
}

/// A refused connection held in the tarpit; its place is given back when dropped.
pub struct TarpitSlot(Arc<AtomicUsize>);

impl Drop for TarpitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct ConnTable {
    open: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

/// One open connection's slot, given back when the connection ends.
pub struct ConnPermit {
    table: Arc<ConnTable>,
    key: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.table.total.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut open) = self.table.open.lock() {
            if let Some(n) = open.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&self.key);
                }
            }
        }
    }
}

/// The byte budget for request bodies: a counting semaphore that never waits (a request that
/// does not fit is answered 503 at once rather than queued with its connection held).
struct Budget {
    cap: usize,
    used: AtomicUsize,
}

/// Bytes of the body budget held by one request; given back when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives back all but `keep` bytes.
    pub fn shrink_to(&mut self, keep: usize) {
        if keep < self.bytes {
            self.budget.used.fetch_sub(self.bytes - keep, Ordering::AcqRel);
            self.bytes = keep;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Memory a parsed JSON value may need per node (object, array, or element), measured with
/// serde_json's `preserve_order` maps: 75 bytes per array element, about 220 per small object
/// member and up to 305 for nested one-member objects. 320 covers each measured shape.
pub const JSON_NODE_BYTES: usize = 320;

/// An upper estimate of the memory `serde_json::from_slice(bytes)` will allocate: the nodes (one
/// per `{`, `[` and `,` outside strings, plus one) times [`JSON_NODE_BYTES`], plus the text of
/// strings (at most the body's length). A linear scan, no allocation.
pub fn json_tree_estimate(bytes: &[u8]) -> usize {
    let (mut nodes, mut in_string, mut escaped) = (1usize, false, false);
    for &c in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else {
            match c {
                b'"' => in_string = true,
                b'{' | b'[' | b',' => nodes += 1,
                _ => {}
            }
        }
    }
    nodes.saturating_mul(JSON_NODE_BYTES).saturating_add(bytes.len())
}

/// Per-connection activity: requests in flight and when the last one started or ended, read by
/// the connection's watchdog to close idle connections (hyper has no idle timeout for HTTP/2,
/// nor for a connection that never sends a first byte after the handshake).
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Requests started on the connection so far.
    begun: AtomicU64,
    /// ms since `epoch` of the last request start or end.
    last: AtomicU64,
    /// Set when a response asks for the connection to end (see [`Activity::ask_to_close`]).
    close: tokio::sync::Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { epoch: Instant::now(), in_flight: AtomicUsize::new(0), begun: AtomicU64::new(0), last: AtomicU64::new(0), close: tokio::sync::Notify::new() }
    }
}

impl Activity {
    fn stamp(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A request starts; it ends when the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.begun.fetch_add(1, Ordering::AcqRel);
        self.stamp();
        InFlight(self.clone())
    }

    /// Whether a request has started on the connection (a connection accepted just before a
    /// shutdown may still be sending its first one).
    pub fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Acquire) > 0
    }

    /// When the connection will have been idle for `idle` if nothing happens (a request in
    /// flight pushes it `idle` ahead, to look again then).
    pub fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return now + idle;
        }
        let since = self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)));
        now + idle.saturating_sub(since)
    }

    /// A request was refused for its source's rate: the connection is to end (HTTP/2 GOAWAY;
    /// HTTP/1.1 also says `Connection: close`), so that a flood pays a new connection — itself
    /// rate-limited per source and tarpitted — for every refusal instead of pipelining
    /// thousands of them down one connection.
    pub fn ask_to_close(&self) {
        self.close.notify_one();
    }

    /// Resolves once [`Activity::ask_to_close`] has been called (at once if it already was).
    pub async fn close_asked(&self) {
        self.close.notified().await;
    }

    /// Whether no request is in flight and none started or ended within `idle`.
    pub fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed))) >= idle
    }
}

pub struct InFlight(Arc<Activity>);

impl InFlight {
    /// The connection's activity, to ask it to close later.
    pub fn activity(&self) -> Arc<Activity> {
        self.0.clone()
    }
}

/// A response body that, when it carries an activity, asks that connection to close once the
/// connection is done with it (hyper drops a body after queueing its last frame), so the close
/// never overtakes the response it follows.
pub struct ClosingBody {
    body: super::body::Body,
    close: Option<Arc<Activity>>,
}

impl ClosingBody {
    pub fn new(body: super::body::Body, close: Option<Arc<Activity>>) -> Self {
        ClosingBody { body, close }
    }
}

impl hyper::body::Body for ClosingBody {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ClosingBody {
    fn drop(&mut self) {
        if let Some(activity) = self.close.take() {
            activity.ask_to_close();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stamp();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a path is rate-limited for callers without a valid credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Not here: `/healthz` (kept as cheap as possible for probes) and `/auth/*` (its own,
    /// stricter limiter in `identity`).
    Exempt,
    /// Answered without a credential (metadata, checkpoints, proofs, metrics, unknown paths):
    /// every request takes a token.
    Public,
    /// Needs a credential: a request without one takes a token before anything else; one whose
    /// credential fails (401) takes one afterwards; while the bucket is empty, requests with a
    /// credential are refused before it is checked (so failed checks cannot flood the audit log).
    Credentialed,
}

pub fn gate(path: &str) -> Gate {
    match path {
        "/healthz" => Gate::Exempt,
        p if p.starts_with("/auth/") => Gate::Exempt,
        "/fhir/metadata" => Gate::Public,
        p if p == "/fhir" || p.starts_with("/fhir/") || p.starts_with("/admin/") || p.starts_with("/audit/entries/") => Gate::Credentialed,
        _ => Gate::Public,
    }
}

/// The largest body a path accepts.
pub fn body_limit(s: &Settings, path: &str) -> usize {
    if path.starts_with("/auth/") {
        s.auth_body_bytes
    } else if path.starts_with("/admin/") {
        s.admin_body_bytes
    } else {
        s.max_body_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_count_by_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn connections_per_source_and_in_all() {
        let l = Limits::new(Settings { max_connections: 3, max_connections_per_address: 2, ..Settings::default() });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let p1 = l.admit_connection(a).expect("first");
        let _p2 = l.admit_connection(a).expect("second");
        assert!(l.admit_connection(a).is_none(), "third from the same address");
        let _p3 = l.admit_connection(b).expect("another address");
        assert!(l.admit_connection("10.0.0.3".parse().expect("ip")).is_none(), "server full");
        drop(p1);
        assert_eq!(l.open_connections(), 2);
        assert!(l.admit_connection(a).is_some(), "a slot came back");
    }

    #[test]
    fn budget_refuses_then_recovers() {
        let l = Limits::new(Settings { body_memory_bytes: 1000, ..Settings::default() });
        let mut r = l.reserve(600).expect("fits");
        assert_eq!(l.reserve(500).err().map(|e| e.status), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(l.reserve(1001).err().map(|e| e.status), Some(StatusCode::PAYLOAD_TOO_LARGE));
        r.shrink_to(100);
        let r2 = l.reserve(900).expect("fits after shrinking");
        assert_eq!(l.budget_used(), 1000);
        drop((r, r2));
        assert_eq!(l.budget_used(), 0);
    }

    #[test]
    fn unauthenticated_bucket() {
        let l = Limits::new(Settings { unauthenticated: Rate { per_minute: 1, burst: 2 }, ..Settings::default() });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(l.check_unauthenticated(a).is_ok(), "no bucket yet");
        assert!(l.take_unauthenticated(a).is_ok());
        assert!(l.check_unauthenticated(a).is_ok(), "checking takes nothing");
        assert!(l.take_unauthenticated(a).is_ok());
        assert_eq!(l.take_unauthenticated(a).map_err(|(_, first)| first), Err(true));
        assert_eq!(l.check_unauthenticated(a).map_err(|(_, first)| first), Err(false));
        assert!(l.take_unauthenticated("10.0.0.2".parse().expect("ip")).is_ok(), "another address");
    }

    #[test]
    fn tree_estimate_counts_nodes_outside_strings() {
        assert_eq!(json_tree_estimate(b"{}"), 2 * JSON_NODE_BYTES + 2);
        assert_eq!(json_tree_estimate(br#"{"a,[{":"x"}"#), 2 * JSON_NODE_BYTES + 12);
        assert_eq!(json_tree_estimate(br#"["\"",1]"#), 3 * JSON_NODE_BYTES + 8);
    }

    #[test]
    fn body_deadline_grows_with_bytes_up_to_the_total() {
        let l = Limits::new(Settings { body_grace: Duration::from_secs(2), body_min_bytes_per_sec: 1000, body_timeout: Duration::from_secs(10), ..Settings::default() });
        let t = tokio::time::Instant::now();
        assert_eq!(l.body_deadline(t, 0), t + Duration::from_secs(2));
        assert_eq!(l.body_deadline(t, 3000), t + Duration::from_secs(5));
        assert_eq!(l.body_deadline(t, 1_000_000), t + Duration::from_secs(10));
    }
}
