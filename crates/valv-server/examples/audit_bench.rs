//! Audit log benchmark: durable appends per second through the store's group-commit writer under
//! concurrency, full-log verification rate, and the detection engine's read path. Run with
//! `cargo run --release -p valv-server --example audit_bench -- [SECONDS] [CONCURRENCY] [VERIFY_ENTRIES]`
//! (defaults 10 256 200000); `bench/run-audit.sh` wraps it and prints the machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use valv_audit::{AuditEvent, Outcome};
use valv_crypto::{BlindIndexKey, DataKey};
use valv_server::audit::{AuditSink, StoreAuditLog};
use valv_store::sqlite::SqliteStore;
use valv_store::Store;

/// Part 3, the detection engine's read path over the same log: entries read 2,048 at a time, opened,
/// parsed and shown to the rules (the intrusion rules; these entries are a service's reads, so
/// no snooping facts are looked up), as `detect::Engine::step` does. Median of three runs.
async fn detection_read_path(store: &Arc<dyn Store>, key: &DataKey, entries: u64) -> Result<(), Box<dyn std::error::Error>> {
    let cipher = valv_crypto::Cipher::new(key);
    let mut rates = Vec::new();
    let mut alerts = 0;
    for _ in 0..3 {
        let mut detector = valv_detect::Detector::new(valv_detect::Config::default());
        let started = Instant::now();
        let mut at = 0;
        while at < entries {
            let rows = store.audit_entries(at, (at + 2048).min(entries)).await?;
            for (index, row) in &rows {
                let bytes = valv_server::audit::open_entry(&cipher, row)?;
                alerts += detector.observe(&valv_detect::Entry::parse(*index, &bytes)?).len();
            }
            at += rows.len().max(1) as u64;
        }
        rates.push(entries as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!("detection read path (read, open, parse, judge): {entries} entries: median {:.0} entries/s (runs: {}); alerts {alerts}", rates[1], rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "));
    Ok(())
}

fn event(i: u64) -> AuditEvent {
    AuditEvent {
        event_id: format!("{i:032x}"),
        time: 1_700_000_000_000 + i as i64,
        request_id: format!("{i:024x}"),
        action: "R",
        interaction: "read",
        outcome: Outcome::Success,
        status: 200,
        agent_id: "6f1c2a9e-0000-4000-8000-000000000001".into(),
        agent_name: "bench".into(),
        roles: vec!["service".into()],
        source_address: "127.0.0.1".into(),
        purpose_of_use: Some("TREAT".into()),
        patient: Some(format!("patient-{}", i % 1000)),
        resource_type: Some("Observation".into()),
        resource_id: Some(format!("obs-{i}")),
        version: Some(1),
        query: None,
        reason: "role-service-full-access".into(),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let seconds = args.first().copied().unwrap_or(10);
    let concurrency = args.get(1).copied().unwrap_or(256);
    let verify_entries = args.get(2).copied().unwrap_or(200_000);
    // AUDIT_BENCH_DIR keeps the database between runs (e.g. to profile verification alone).
    let keep = std::env::var_os("AUDIT_BENCH_DIR");
    let dir = keep.clone().map(std::path::PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join(format!("valv-audit-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.join("bench.db"))?);
    let key = DataKey::from_bytes([7; 32]);
    let log = Arc::new(StoreAuditLog::new(store.clone(), key.clone(), BlindIndexKey::new(DataKey::from_bytes([8; 32])), false));
    // The integrator signs the empty log (or resumes a kept one); it integrates below.
    let keys = valv_server::audit::signing::LogKeys::new(vec![DataKey::from_bytes([9; 32])])?;
    let mut integrator = valv_server::audit::integrator::Integrator::start(store.clone(), &keys).await?;

    // 1. Durable appends: `concurrency` tasks, each waiting for its entry to be fsynced.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (log, done) = (log.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = t * 1_000_000_000;
                while Instant::now() < deadline {
                    if log.record(vec![event(i)]).await.is_err() {
                        break;
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let n = done.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    println!("durable appends: {n} in {secs:.1} s with {concurrency} concurrent writers = {:.0} entries/s", n as f64 / secs);

    // 2. Full verification over at least `verify_entries` entries (appended in large batches).
    let mut size = store.audit_size().await?;
    let mut next = 1_000_000_000_000_000u64;
    while size < verify_entries {
        let batch: Vec<AuditEvent> = (0..1000).map(|k| event(next + k)).collect();
        next += 1000;
        log.record(batch).await?;
        size = store.audit_size().await?;
    }
    // Integration as the server does it: the tree, its tiles (written) and a signed checkpoint.
    let started = Instant::now();
    if let Some(cp) = integrator.step().await? {
        println!("integrate (tree, tiles written, checkpoint signed): {} entries in {:.2} s", cp.size, started.elapsed().as_secs_f64());
    }
    drop(integrator);
    // Verification runs in its own process (`valv audit verify`), which maps the file.
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_for(&dir.join("bench.db"), valv_store::sqlite::Access::Scan)?);
    let verifier = keys.verifiers()?;
    // The first run also pays for reading the pages in; the median of the next five is the
    // steady rate.
    let _ = valv_server::audit::log::verify(&store, &key, &verifier, &[]).await?;
    let mut rates = Vec::new();
    let mut report = None;
    for _ in 0..5 {
        let started = Instant::now();
        let r = valv_server::audit::log::verify(&store, &key, &verifier, &[]).await?;
        rates.push(r.entries as f64 / started.elapsed().as_secs_f64());
        report = Some(r);
    }
    rates.sort_by(f64::total_cmp);
    let report = report.ok_or("no verification ran")?;
    println!(
        "full verify: {} entries (decrypt, leaf check, tree, {} tiles): median {:.0} entries/s (runs: {}); problems: {}",
        report.entries,
        report.tiles,
        rates[rates.len() / 2],
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
        report.problems.len()
    );
    for p in report.problems.iter().take(3) {
        println!("  problem: {p}");
    }
    detection_read_path(&store, &key, report.entries).await?;
    drop(store);
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
