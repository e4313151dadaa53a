//! A standby that takes over (issue "postgres"): two Valv servers on a primary with a
//! synchronous streaming-replication standby, under a mixed load of creates, updates and reads;
//! the primary is killed, the standby promoted, and the servers — given both hosts in one
//! connection string — serve again without a restart. Every write they acknowledged is there,
//! with its audit entry, and the audit log verifies. Runs only on PostgreSQL.

use crate::harness::{run_ok, Client, Server};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A write a server answered with success: what must survive the failover.
struct Acked {
    path: String,
    version: u64,
    family: String,
    request_id: String,
}

#[derive(Default)]
struct Tally {
    acked: Vec<Acked>,
    /// Answers per status, over every request the worker made.
    statuses: std::collections::BTreeMap<u16, usize>,
    /// Reads of an acknowledged write that came back without it (404, or an older version).
    lost: Vec<String>,
    /// Requests that got no HTTP answer at all.
    dropped: Vec<String>,
}

fn version_of(r: &Value) -> u64 {
    r["meta"]["versionId"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Creates, updates and reads Patients through one server until told to stop; counts every
/// acknowledged write in `progress`.
async fn worker(client: Client, tag: String, stop: Arc<AtomicBool>, progress: Arc<AtomicUsize>) -> Tally {
    let key = client.data_key.clone();
    let mut t = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (method, path, body, headers) = match (i % 3, t.acked.last()) {
            (0, Some(last)) => {
                let family = format!("{}-updated", last.family);
                let body = json!({"resourceType": "Patient", "id": last.path.rsplit('/').next(), "name": [{"family": family}]});
                ("PUT", last.path.clone(), Some(body), vec![("if-match".to_string(), format!("W/\"{}\"", last.version))])
            }
            (1, Some(_)) => {
                let earlier = &t.acked[(i as usize * 7) % t.acked.len()];
                ("GET", earlier.path.clone(), None, Vec::new())
            }
            _ => ("POST", "/fhir/Patient".to_string(), Some(json!({"resourceType": "Patient", "name": [{"family": format!("{tag}-{i}")}]})), Vec::new()),
        };
        let read_of = (method == "GET").then(|| t.acked.iter().rev().find(|a| a.path == path).map(|a| a.version).unwrap_or(0));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let resp = match client.try_request(method, &path, Some(&key), body.map(|b| b.to_string().into_bytes()), &headers).await {
            Ok(r) => r,
            Err(e) => {
                t.dropped.push(format!("{method} {path}: {e}"));
                continue;
            }
        };
        *t.statuses.entry(resp.status).or_default() += 1;
        match (method, resp.status) {
            ("GET", 200) if version_of(&resp.json) >= read_of.unwrap_or(0) => {}
            ("GET", 503) => {}
            ("GET", _) => t.lost.push(format!("GET {path} -> {} {}", resp.status, resp.text)),
            (_, 200 | 201) => {
                let id = resp.json["id"].as_str().unwrap_or_default();
                t.acked.push(Acked {
                    path: format!("/fhir/Patient/{id}"),
                    version: version_of(&resp.json),
                    family: resp.json["name"][0]["family"].as_str().unwrap_or_default().to_string(),
                    request_id: resp.header("x-request-id").unwrap_or_default().to_string(),
                });
                progress.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    t
}

/// Waits until `counter` passes `from + by`, or panics after `within`.
async fn wait_for(counter: &AtomicUsize, from: usize, by: usize, within: Duration, what: &str) {
    let start = Instant::now();
    while counter.load(Ordering::Relaxed) < from + by {
        assert!(start.elapsed() < within, "{what}: fewer than {by} writes acknowledged within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn after_the_primary_dies_the_promoted_standby_serves_every_acknowledged_write() {
    if crate::harness::postgres().is_none() {
        println!("skipped: the standby test needs the PostgreSQL backend (VALV_TEST_STORE=postgres)");
        return;
    }
    let primary = valv_testpg::Cluster::start();
    let standby = primary.standby();
    // Both hosts, in order: libpq's multi-host form; Valv always asks for a read-write session,
    // so a standby still in recovery is skipped and the promoted one is taken.
    let url = format!("host=127.0.0.1,127.0.0.1 port={},{} user=valv_owner dbname=valv", primary.port, standby.port);
    let env = [("VALV_STORE", "postgres"), ("VALV_DATABASE_URL", url.as_str())];
    let a = Server::start_everywhere("failover-a", &env);
    let b = a.sibling("failover-b");

    let stop = Arc::new(AtomicBool::new(false));
    let progress: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut workers = Vec::new();
    for (n, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let counter = progress[n % 2].clone();
        workers.push(tokio::spawn(worker(server.client(), format!("w{n}"), stop.clone(), counter)));
    }
    for (counter, name) in progress.iter().zip(["server 1", "server 2"]) {
        wait_for(counter, 0, 30, Duration::from_secs(30), name).await;
    }
    let signed = Instant::now();
    let mut checkpoint_before = 0;
    while checkpoint_before == 0 {
        assert!(signed.elapsed() < Duration::from_secs(10), "no checkpoint covered the first writes");
        tokio::time::sleep(Duration::from_millis(50)).await;
        checkpoint_before = checkpoint_size(&b).await;
    }

    let before: usize = progress.iter().map(|c| c.load(Ordering::Relaxed)).sum();

    // The primary dies under load; a second later the standby is promoted.
    primary.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_promotion: Vec<usize> = progress.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    standby.promote();
    let promoted = Instant::now();
    let mut first_write = Vec::new();
    for ((counter, from), name) in progress.iter().zip(at_promotion.iter()).zip(["server 1", "server 2"]) {
        wait_for(counter, *from, 1, Duration::from_secs(30), name).await;
        first_write.push(promoted.elapsed().as_millis());
    }
    let mut checkpoint_after = checkpoint_size(&b).await;
    while checkpoint_after <= checkpoint_before {
        assert!(promoted.elapsed() < Duration::from_secs(10), "no checkpoint signed within 10 s of the promotion");
        tokio::time::sleep(Duration::from_millis(20)).await;
        checkpoint_after = checkpoint_size(&b).await;
    }
    let resigned = promoted.elapsed().as_millis();
    for ((counter, from), name) in progress.iter().zip(at_promotion.iter()).zip(["server 1", "server 2"]) {
        wait_for(counter, *from, 20, Duration::from_secs(30), name).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut tallies = Vec::new();
    for w in workers {
        tallies.push(w.await.expect("worker"));
    }

    // Nothing the servers acknowledged is lost: each version reads back with what was written.
    let mut statuses = std::collections::BTreeMap::new();
    for t in &tallies {
        assert!(t.lost.is_empty(), "reads during the failover missed acknowledged writes: {:?}", t.lost);
        assert!(t.dropped.is_empty(), "requests that got no answer: {:?}", t.dropped);
        for (s, n) in &t.statuses {
            *statuses.entry(*s).or_insert(0usize) += n;
        }
    }
    assert!(statuses.keys().all(|s| [200, 201, 503].contains(s)), "only successes and 503 while the database was away: {statuses:?}");
    let acked: Vec<&Acked> = tallies.iter().flat_map(|t| &t.acked).collect();
    for (i, w) in acked.iter().enumerate() {
        let server = if i % 2 == 0 { &a } else { &b };
        let r = server.get(&format!("{}/_history/{}", w.path, w.version)).await;
        assert_eq!((r.status, r.json["name"][0]["family"].as_str()), (200, Some(w.family.as_str())), "acknowledged {} v{}: {}", w.path, w.version, r.text);
    }
    // Reads of the current version go through the connections reads share: made again on the
    // promoted primary, each resource reads back at its newest acknowledged version.
    let mut newest: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for w in &acked {
        let v = newest.entry(w.path.as_str()).or_default();
        *v = (*v).max(w.version);
    }
    for (i, (path, version)) in newest.iter().enumerate() {
        let r = if i % 2 == 0 { &a } else { &b }.get(path).await;
        assert!(r.status == 200 && version_of(&r.json) >= *version, "current {path} after the failover: {} {}", r.status, r.text);
    }

    // Every acknowledged write has its audit entry; the integrator (re-elected on the new
    // primary) signs checkpoints again; the whole log verifies as one tree.
    let entries: Vec<Value> = run_ok(&a.data, &["audit", "export", "--format", "jsonl"]).lines().map(|l| serde_json::from_str(l).expect("jsonl")).collect();
    let recorded: std::collections::HashSet<&str> = entries.iter().filter_map(|e| e["entry"]["request_id"].as_str()).collect();
    let unrecorded: Vec<&str> = acked.iter().map(|w| w.request_id.as_str()).filter(|r| !recorded.contains(r)).collect();
    assert!(unrecorded.is_empty(), "acknowledged writes without an audit entry: {unrecorded:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut size = checkpoint_size(&b).await;
    while size < entries.len() {
        assert!(Instant::now() < deadline, "no checkpoint covered the {} entries after the failover (last {size})", entries.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
        size = checkpoint_size(&b).await;
    }
    assert!(size > checkpoint_before);
    let verified = run_ok(&b.data, &["audit", "verify"]);
    assert!(verified.contains("the log verifies"), "{verified}");
    println!(
        "failover: {} writes acknowledged ({before} before the primary died), answers {statuses:?}; first acknowledged write after the promotion: {first_write:?} ms (server 1, server 2), first checkpoint {resigned} ms after it; checkpoints {checkpoint_before} -> {size}",
        acked.len()
    );
}

/// The size line of the latest signed checkpoint (0 while none answers).
async fn checkpoint_size(s: &Server) -> usize {
    let r = s.request("GET", "/audit/checkpoint", None, None, &[]).await;
    if r.status != 200 {
        return 0;
    }
    r.text.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0)
}
