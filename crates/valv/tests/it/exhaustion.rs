//! Resource exhaustion without credentials (issue 10): idle and slow connections are closed
//! within the configured bounds, a source cannot hold more than its share of connections, large
//! bodies are refused before they are read or parsed, unauthenticated requests are rate-limited
//! per source, and a legitimate client from another address is served throughout.
//!
//! The attacker's sockets are bound to 127.0.0.2 so per-address limits fall on it and not on
//! the harness's client (127.0.0.1). Every wait has an upper bound; nothing asserts speed.

use crate::harness::Server;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 §3.4, §6.5).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn tls_config(s: &Server, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(s.data.join("tls/cert.pem")).expect("cert file") {
        roots.add(c.expect("cert")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A TLS connection from `source` (ALPN `alpn`; none: the server detects the protocol).
pub(crate) async fn connect(s: &Server, source: IpAddr, alpn: &[&[u8]]) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let tcp = sock.connect(SocketAddr::new(LEGIT, s.port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    let tls = tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsConnector::from(tls_config(s, alpn)).connect(name, tcp)).await;
    tls.map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// Reads until the server closes the connection; everything read, or `None` if it was still
/// open after `bound`.
async fn read_until_closed<R: tokio::io::AsyncRead + Unpin>(r: &mut R, bound: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut all = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(all),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
    }
}

/// The HTTP/2 frame types in `bytes` (after the server's part of the preface).
fn h2_frame_types(bytes: &[u8]) -> Vec<u8> {
    let (mut types, mut at) = (Vec::new(), 0);
    while at + 9 <= bytes.len() {
        let len = (usize::from(bytes[at]) << 16) | (usize::from(bytes[at + 1]) << 8) | usize::from(bytes[at + 2]);
        types.push(bytes[at + 3]);
        at += 9 + len;
    }
    types
}

/// One HTTP/1.1 request from `source` on its own connection: (status, Retry-After, body).
async fn request_from(s: &Server, source: IpAddr, method: &str, path: &str, key: Option<&str>) -> (u16, Option<String>, serde_json::Value) {
    let tls = connect(s, source, &[b"http/1.1"]).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", "localhost");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = send.send_request(req.body(Full::new(Bytes::new())).expect("request")).await.expect("send");
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, retry, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

/// Sends `bytes` on a new HTTP/1.1 connection from `source` and returns all the server sends
/// until it closes. Nothing is left unread at the server, so its answer is not lost to a reset.
async fn exchange(s: &Server, source: IpAddr, bytes: &[u8]) -> String {
    let mut tls = connect(s, source, &[b"http/1.1"]).await.expect("connect");
    tls.write_all(bytes).await.expect("write");
    let answer = read_until_closed(&mut tls, Duration::from_secs(20)).await.expect("the server closes after answering");
    String::from_utf8_lossy(&answer).to_string()
}

/// The server process's peak resident memory (VmHWM), in KiB: found by its data directory.
fn server_peak_rss_kib(s: &Server) -> u64 {
    let data = s.data.display().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.contains(&data) && args.iter().any(|a| a == "serve") {
            let status = std::fs::read_to_string(entry.path().join("status")).expect("status");
            let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
            return line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number");
        }
    }
    panic!("no running server for {data}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_within_the_bound() {
    let s = Server::start_configured("idle", &[], "[limits]\nidle_timeout_secs = 2\n");
    let bound = Duration::from_secs(12);
    // TLS, then nothing at all (the server cannot even tell which HTTP it will be).
    let mut silent = connect(&s, ATTACKER, &[]).await.expect("connect");
    // HTTP/2: the preface and SETTINGS, then no stream.
    let mut h2 = connect(&s, ATTACKER, &[b"h2"]).await.expect("connect");
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2.write_all(H2_PREFACE).await.expect("preface");
    // HTTP/1.1 kept alive after one request.
    let mut h1 = connect(&s, ATTACKER, &[b"http/1.1"]).await.expect("connect");
    h1.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n").await.expect("request");
    let started = Instant::now();
    let (a, b, c) = tokio::join!(read_until_closed(&mut silent, bound), read_until_closed(&mut h2, bound), read_until_closed(&mut h1, bound));
    assert!(a.is_some(), "a silent TLS connection was still open after {bound:?}");
    let h2_bytes = b.unwrap_or_else(|| panic!("an idle HTTP/2 connection was still open after {bound:?}"));
    assert!(h2_frame_types(&h2_bytes).contains(&7), "HTTP/2 is closed with GOAWAY: frames {:?}", h2_frame_types(&h2_bytes));
    let h1_bytes = c.unwrap_or_else(|| panic!("an idle HTTP/1.1 connection was still open after {bound:?}"));
    assert!(String::from_utf8_lossy(&h1_bytes).starts_with("HTTP/1.1 200"), "the request itself was answered");
    assert!(started.elapsed() >= Duration::from_millis(1500), "not closed before the idle timeout ({:?})", started.elapsed());
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.contains("valv_connections_idle_closed_total 3"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_are_cut_off() {
    let s = Server::start_configured("slowbody", &[], "[limits]\nidle_timeout_secs = 2\nbody_grace_secs = 2\nbody_timeout_secs = 4\nbody_min_bytes_per_sec = 1000\n");
    // A body the endpoint would take (1,000 bytes to /auth/login), one byte every 500 ms.
    let slow = |path: &'static str, length: usize| {
        let s = &s;
        async move {
            let tls = connect(s, ATTACKER, &[b"http/1.1"]).await.expect("connect");
            let (mut r, mut w) = tokio::io::split(tls);
            let head = format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n");
            w.write_all(head.as_bytes()).await.expect("head");
            let writer = tokio::spawn(async move {
                for _ in 0..length.min(120) {
                    if w.write_all(b" ").await.is_err() || w.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
            let read = read_until_closed(&mut r, Duration::from_secs(20)).await;
            writer.abort();
            String::from_utf8_lossy(&read.unwrap_or_else(|| panic!("a slow body to {path} held its connection for 20 s"))).to_string()
        }
    };
    let (login, fhir) = tokio::join!(slow("/auth/login", 1000), slow("/fhir/Patient", 100_000));
    assert!(login.starts_with("HTTP/1.1 408"), "the slow sign-in body timed out: {login}");
    assert!(login.contains("too slowly") && login.contains("OperationOutcome"), "{login}");
    // Without a credential the body is never read: 401 at once, and the connection goes.
    assert!(fhir.starts_with("HTTP/1.1 401"), "{fhir}");
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.contains("valv_request_bodies_timed_out_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_holds_at_most_its_connections_while_others_are_served() {
    let s = Server::start_configured("conncap", &[], "[limits]\nmax_connections_per_address = 6\n");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "gender": "female"})).await.id();
    // The attacker fills its share: idle TLS, idle HTTP/2 and slow bodies.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect(&s, ATTACKER, &[]).await.expect("idle connection within the cap"));
    }
    for _ in 0..2 {
        let mut h2 = connect(&s, ATTACKER, &[b"h2"]).await.expect("HTTP/2 connection within the cap");
        h2.write_all(H2_PREFACE).await.expect("preface");
        held.push(h2);
    }
    for _ in 0..2 {
        let mut slow = connect(&s, ATTACKER, &[b"http/1.1"]).await.expect("slow connection within the cap");
        slow.write_all(b"POST /auth/login HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{").await.expect("head");
        held.push(slow);
    }
    // One more from the same source is closed at once.
    let refused = connect(&s, ATTACKER, &[]).await;
    match refused {
        Err(_) => {}
        Ok(mut tls) => assert!(read_until_closed(&mut tls, Duration::from_secs(5)).await.is_some(), "a seventh connection from the attacker was kept"),
    }
    // Meanwhile a client from another address reads as usual.
    for _ in 0..20 {
        let r = s.get(&format!("/fhir/Patient/{p}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let (status, _, _) = request_from(&s, LEGIT, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(!metrics.contains("valv_connections_refused_total 0\n"), "{metrics}");
    // A slot comes back when a connection closes.
    held.truncate(5);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut tls) = connect(&s, ATTACKER, &[b"http/1.1"]).await {
            if tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").await.is_ok() {
                if let Some(answer) = read_until_closed(&mut tls, Duration::from_secs(5)).await {
                    if answer.starts_with(b"HTTP/1.1 200") {
                        break;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "the attacker's freed slot was not given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_sign_in_bodies_are_refused_unread() {
    let s = Server::start_configured("bigbody", &[], "[auth]\nrate_burst = 100\n");
    s.request("GET", "/fhir/metadata", None, None, &[]).await;
    let before = server_peak_rss_kib(&s);
    // 8 bodies of 28.6 MiB at once with Content-Length, and 8 chunked (no length declared).
    let flood = |chunked: bool| {
        let s = &s;
        async move {
            let tls = connect(s, ATTACKER, &[b"http/1.1"]).await.expect("connect");
            let (mut r, mut w) = tokio::io::split(tls);
            let size = 30_000_000usize;
            let framing = if chunked { "transfer-encoding: chunked".to_string() } else { format!("content-length: {size}") };
            let head = format!("POST /auth/login HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n{framing}\r\n\r\n");
            let writer = tokio::spawn(async move {
                if w.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b' '; 64 * 1024];
                let chunk = [format!("{:x}\r\n", block.len()).into_bytes(), block.clone(), b"\r\n".to_vec()].concat();
                for _ in 0..size / block.len() {
                    let sent = if chunked { w.write_all(&chunk).await } else { w.write_all(&block).await };
                    if sent.is_err() {
                        return;
                    }
                }
            });
            let answer = read_until_closed(&mut r, Duration::from_secs(30)).await.expect("an answer within 30 s");
            writer.abort();
            String::from_utf8_lossy(&answer).to_string()
        }
    };
    let answers = futures_join_all((0..16).map(|i| flood(i % 2 == 1))).await;
    // The server closes as soon as it has answered, with body bytes still arriving: the client
    // may then see a reset instead of the answer. Whatever arrived is a 413.
    for a in answers.iter().filter(|a| !a.is_empty()) {
        assert!(a.starts_with("HTTP/1.1 413"), "{}", a.lines().next().unwrap_or(""));
    }
    let grown = server_peak_rss_kib(&s).saturating_sub(before);
    assert!(grown < 64 * 1024, "the server's peak memory grew by {grown} KiB for bodies it refused");
    // The answers themselves: a declared length over the limit is refused before any byte is
    // read; a chunked body as soon as it passes the limit.
    let declared = exchange(&s, ATTACKER, b"POST /auth/login HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 30000000\r\n\r\n").await;
    assert!(declared.starts_with("HTTP/1.1 413") && declared.contains("8192 bytes") && declared.contains("OperationOutcome"), "{declared}");
    let mut chunked = b"POST /auth/login HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2001\r\n".to_vec();
    chunked.extend_from_slice(&[b' '; 0x2001]);
    chunked.extend_from_slice(b"\r\n");
    let chunked = exchange(&s, ATTACKER, &chunked).await;
    assert!(chunked.starts_with("HTTP/1.1 413") && chunked.contains("8192 bytes"), "{chunked}");
    // The server still answers.
    assert_eq!(s.request("GET", "/healthz", None, None, &[]).await.status, 200);
}

/// Awaits every future (the test crate has no `futures` dependency).
async fn futures_join_all<F: std::future::Future<Output = String>>(fs: impl Iterator<Item = F>) -> Vec<String> {
    let mut set = Vec::new();
    for f in fs {
        set.push(f);
    }
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = set.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<String>> = vec![None; pinned.len()];
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(Option::unwrap_or_default).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_budget_answers_503_and_large_trees_413() {
    let s = Server::start_configured("budget", &[], "[server]\nmax_body_bytes = 262144\n[limits]\nbody_memory_bytes = 300000\n");
    // An authenticated body being sent slowly holds 200,000 bytes of the budget.
    let mut slow = connect(&s, LEGIT, &[b"http/1.1"]).await.expect("connect");
    let head = format!("POST /fhir/Patient HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-type: application/fhir+json\r\ncontent-length: 200000\r\n\r\n{{", s.data_key);
    slow.write_all(head.as_bytes()).await.expect("head");
    // Wait until the server holds its reservation (under load it may not have read the head yet:
    // a request sent before then would be let in, and wait out the body timeout).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
        let used: u64 = metrics.lines().find_map(|l| l.strip_prefix("valv_request_body_memory_bytes ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        if used >= 200_000 {
            break;
        }
        assert!(Instant::now() < deadline, "the slow body never reserved its memory: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another body that does not fit beside it: 503 with Retry-After, before it is sent
    // (`Expect: 100-continue`: the server never asks for it).
    let head = format!("POST /fhir/Patient HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {}\r\ncontent-type: application/fhir+json\r\ncontent-length: 150000\r\nexpect: 100-continue\r\n\r\n", s.data_key);
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let answer = exchange(&s, LEGIT, head.as_bytes()).await;
        if answer.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(busy.starts_with("HTTP/1.1 503") && busy.contains("too many request bodies") && busy.contains("OperationOutcome"), "{busy}");
    assert!(busy.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{busy}");
    drop(slow);
    // A body whose parsed tree could not fit in the whole budget: 413 before it is parsed.
    let many = serde_json::to_vec(&json!({"resourceType": "Patient", "extension": vec![json!(1); 20_000]})).expect("json");
    let deadline = Instant::now() + Duration::from_secs(10);
    let costly = loop {
        let r = s.request_raw("POST", "/fhir/Patient", Some(&s.data_key), Some(many.clone()), &[]).await;
        if r.status != 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(costly.outcome(413).contains("budget"), "{}", costly.text);
    // And the budget is whole again: an ordinary create goes through.
    assert_eq!(s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_requests_are_rate_limited_per_source() {
    let s = Server::start_configured("unauth", &[], "[limits]\nunauthenticated_per_minute = 1\nunauthenticated_burst = 5\n");
    let before = s.audit_lines();
    for i in 0..5 {
        let (status, _, _) = request_from(&s, ATTACKER, "GET", "/fhir/Patient", None).await;
        assert_eq!(status, 401, "request {i}");
    }
    let (status, retry, body) = request_from(&s, ATTACKER, "GET", "/fhir/Patient", None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(retry.and_then(|r| r.parse::<u64>().ok()).is_some_and(|r| r >= 1), "Retry-After");
    // Bogus credentials, public endpoints and unknown paths are refused too, unchecked.
    assert_eq!(request_from(&s, ATTACKER, "GET", "/fhir/Patient", Some("valv_bogus")).await.0, 429);
    assert_eq!(request_from(&s, ATTACKER, "GET", "/fhir/metadata", None).await.0, 429);
    assert_eq!(request_from(&s, ATTACKER, "GET", "/nowhere", None).await.0, 429);
    // Probes are not limited, nor is anyone else.
    assert_eq!(request_from(&s, ATTACKER, "GET", "/healthz", None).await.0, 200);
    assert_eq!(request_from(&s, LEGIT, "GET", "/fhir/metadata", None).await.0, 200);
    assert_eq!(request_from(&s, LEGIT, "GET", "/fhir/Patient?_count=1", Some(&s.data_key)).await.0, 200);
    // Five 401s audited, and the burst's first refusal; not each refusal.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.audit_lines() < before + 7 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.audit_lines(), before + 5 + 1 + 1, "five failed authentications, one refusal, the legitimate search");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_source_loses_its_connection() {
    // One token: the first request is answered, the next refused, and the connection ends with
    // the refusal, so a flood pays a (rate-limited, tarpitted) new connection per refusal.
    let s = Server::start_configured("closes", &[], "[limits]\nunauthenticated_per_minute = 1\nunauthenticated_burst = 1\n");
    let get = "GET /fhir/metadata HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let answer = exchange(&s, ATTACKER, get.repeat(3).as_bytes()).await;
    let statuses: Vec<&str> = answer.match_indices("HTTP/1.1 ").map(|(i, _)| &answer[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["200", "429"], "the third pipelined request is not answered: {answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");

    // HTTP/2: the refusal comes with a GOAWAY and the connection ends.
    let tls = connect(&s, ATTACKER, &[b"h2"]).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls)).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = hyper::Request::builder().uri("https://localhost/fhir/metadata").body(Full::new(Bytes::new())).expect("request");
    // The 429, or — seen once in CI under load, hyper surfacing the server's GOAWAY before the
    // answer (left to investigate: the refusal is audited either way) — never a served request.
    match send.send_request(req).await {
        Ok(answer) => assert_eq!(answer.status(), 429),
        Err(e) => assert!(format!("{e:?}").contains("GoAway"), "neither a 429 nor a GOAWAY: {e:?}"),
    }
    let ended = tokio::time::timeout(Duration::from_secs(15), conn).await;
    assert!(ended.is_ok(), "the HTTP/2 connection is still open after its 429");
    // Another source is not touched.
    assert_eq!(request_from(&s, LEGIT, "GET", "/fhir/metadata", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failed_authentications_is_recorded_compactly_and_completely() {
    // Limits wide enough that every request of the flood reaches authentication.
    let s = Server::start_configured("auth-flood", &[], "[limits]\nunauthenticated_per_minute = 100000\nunauthenticated_burst = 100000\nmax_connections_per_address = 1000\n");
    let before = s.audit_lines();
    let started = Instant::now();
    let client = s.client();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move { client.try_request("GET", "/fhir/Patient", None, None, &[]).await.map(|r| r.status) }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("answered"), 401);
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    let added = s.audit_lines() - before;
    // Every attempt is on record: one entry each, or counted in a summary.
    let log = crate::harness::run_ok(&s.data, &["audit", "export"]);
    let mut attempts = 0;
    for line in log.lines().skip(before) {
        let e: serde_json::Value = serde_json::from_str(line).expect("jsonl");
        let reason = e["entry"]["reason"].as_str().unwrap_or("");
        if e["entry"]["interaction"] == "authenticate" && reason.starts_with("no-credential") {
            attempts += match reason.split_once("(x") {
                Some((_, rest)) => rest.split(' ').next().and_then(|n| n.parse::<u64>().ok()).expect("count"),
                None => 1,
            };
        }
    }
    assert_eq!(attempts, 300, "every attempt is counted");
    assert!(added <= 2 * seconds + 2, "{added} entries for 300 failures in {seconds} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_opening_connections_too_fast_is_held_in_the_tarpit_then_reset() {
    let env = [("VALV_LIMITS_NEW_CONNECTIONS_PER_MINUTE", "60"), ("VALV_LIMITS_NEW_CONNECTIONS_BURST", "5")];
    let s = Server::start_configured("tarpit", &env, "[limits]\ntarpit_secs = 2\n");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect(&s, ATTACKER, &[]).await.expect("within the burst"));
    }
    // The sixth new connection in a second: held (no handshake answered) for the tarpit's time,
    // then reset; not answered at once, so a client reconnecting at once gains nothing.
    let started = Instant::now();
    assert!(connect(&s, ATTACKER, &[]).await.is_err(), "refused");
    assert!(started.elapsed() >= Duration::from_millis(1500), "held in the tarpit first: {:?}", started.elapsed());
    // Another source is not affected.
    assert_eq!(request_from(&s, LEGIT, "GET", "/healthz", None).await.0, 200);
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(!metrics.contains("valv_connections_tarpitted_total 0\n") && metrics.contains("valv_connections_tarpitted_total"), "{metrics}");
}
