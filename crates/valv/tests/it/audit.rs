//! The audit seam: every attempt leaves an entry before the answer, and no entry means no answer.

use crate::harness::{Db, Server};
use serde_json::json;

#[tokio::test]
async fn every_attempt_leaves_an_entry_before_the_answer() {
    let s = Server::start("auditlines");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","gender":"male"})).await.id();
    let mut before = s.audit_lines();
    // Success, not found, bad body, unknown type, bad credential, denied-by-parse: one or more each.
    let attempts: Vec<(&str, String, Option<&str>)> = vec![
        ("GET", format!("/fhir/Patient/{p}"), None),
        ("GET", "/fhir/Patient/nobody".into(), None),
        ("POST", "/fhir/Patient".into(), Some("{\"resourceType\":\"Patient\",\"birthDate\":12}")),
        ("GET", "/fhir/Spaceship/1".into(), None),
        ("GET", "/fhir/Patient?colour=red".into(), None),
    ];
    for (method, path, body) in attempts {
        let r = s.request_raw(method, &path, Some(&s.data_key), body.map(|b| b.as_bytes().to_vec()), &[]).await;
        let after = s.audit_lines();
        assert!(after > before, "{method} {path} ({}) left no audit entry", r.status);
        before = after;
    }
    let r = s.request("GET", "/fhir/Patient", Some("valv_nonsense"), None, &[]).await;
    assert_eq!(r.status, 401);
    assert!(s.audit_lines() > before, "a failed authentication is audited");
    // Entries are sealed: the patient id is in them, but never in the clear.
    let rows = s.audit_rows();
    assert!(rows.iter().all(|(leaf, _)| leaf.len() == 32));
    assert!(!rows.iter().any(|(_, sealed)| sealed.windows(p.len()).any(|w| w == p.as_bytes())), "audit entries are encrypted at rest");
}

#[tokio::test]
async fn when_the_audit_log_cannot_write_no_patient_data_leaves() {
    let mut s = Server::start("auditfail");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Hidden"}]})).await.id();
    s.kill9();
    // Fault injection: every audit append fails, as with a full or failing disk.
    s.set_env("VALV_FAULT_AUDIT_APPENDS", "1");
    s.restart();
    for path in [format!("/fhir/Patient/{p}"), "/fhir/Patient?family=hidden".to_string()] {
        let r = s.get(&path).await;
        let d = r.outcome(503);
        assert!(d.contains("audit"), "{d}");
        assert!(!r.text.contains("Hidden") && !r.text.contains(&p), "nothing of the patient in the answer: {}", r.text);
    }
    let create = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Unrecorded"}]})).await;
    create.outcome(503);
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    let failures: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("valv_audit_failures_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("audit failure counter");
    assert!(failures >= 3, "{metrics}");
    assert_eq!(s.request("GET", "/readyz", None, None, &[]).await.status, 503, "not ready while audit fails");
    // Back on a working log: the refused create was never made.
    s.kill9();
    s.set_env("VALV_FAULT_AUDIT_APPENDS", "0");
    s.restart();
    assert_eq!(s.get("/fhir/Patient?family=unrecorded").await.total(), 0);
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
}

async fn signed_checkpoint(s: &Server) -> (valv_audit::Checkpoint, String) {
    let vkey = s.request("GET", "/audit/key", None, None, &[]).await.text;
    let verifier = valv_audit::Verifier::from_vkey(vkey.trim()).expect("a C2SP verifier key");
    let note = s.request("GET", "/audit/checkpoint", None, None, &[]).await.text;
    (valv_audit::open_checkpoint(&note, std::slice::from_ref(&verifier)).expect("checkpoint verifies under /audit/key"), note)
}

#[tokio::test]
async fn checkpoints_are_signed_soon_and_cover_exactly_the_stored_entries() {
    let mut s = Server::start("checkpoint");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    for _ in 0..5 {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    // Integrated within about a second of being durable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let (cp, _) = loop {
        let (cp, note) = signed_checkpoint(&s).await;
        if cp.size as usize >= s.audit_lines() || std::time::Instant::now() > deadline {
            break (cp, note);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let leaves: Vec<[u8; 32]> = s.audit_rows().iter().map(|(l, _)| l.as_slice().try_into().expect("32 bytes")).collect();
    assert_eq!(cp.size as usize, leaves.len(), "the checkpoint covers every stored entry");
    assert_eq!(cp.root, valv_audit::merkle::root(&leaves), "its root is the RFC 6962 root of the stored leaves");
    assert!(cp.origin.starts_with("valv.local/audit/"));

    // An entry changed in the database: the server refuses to sign on top of it.
    s.kill9();
    let db = s.db();
    assert_eq!(db.execute(&format!("UPDATE audit_entries SET leaf_hash = {} WHERE idx = 1", db.blob(&[0; 32]))), 1, "tamper");
    let out = crate::harness::valv()
        .arg("--data-dir")
        .arg(&s.data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success(), "serve must refuse a log that no longer matches its checkpoint");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no longer hash to the root"), "{err}");
}

/// Waits until the latest checkpoint covers every stored entry; returns its signed note.
pub(crate) async fn settled_checkpoint(s: &Server) -> String {
    for _ in 0..50 {
        let (cp, note) = signed_checkpoint(s).await;
        if cp.size as usize == s.audit_lines() {
            return note;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no checkpoint covered the log within 5 s");
}


/// Runs `valv audit verify` on a data directory; returns (success, stdout).
pub(crate) fn verify(data: &std::path::Path, checkpoints: &[&std::path::Path]) -> (bool, String) {
    let mut cmd = crate::harness::valv();
    cmd.arg("--data-dir").arg(data).args(["audit", "verify"]);
    for c in checkpoints {
        cmd.arg("--checkpoint").arg(c);
    }
    let out = cmd.output().expect("run verify");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
}

#[tokio::test]
async fn verify_detects_edit_delete_swap_insert_and_rollback() {
    let mut s = Server::start("tamper");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    for _ in 0..6 {
        s.get(&format!("/fhir/Patient/{p}")).await;
    }
    let early = s.dir.join("early.checkpoint");
    std::fs::write(&early, settled_checkpoint(&s).await).expect("save");
    s.kill9();
    let snapshot = s.dir.join("snapshot");
    Db::copy_data_dir(&s.data, &snapshot);
    s.restart();
    for _ in 0..6 {
        s.get(&format!("/fhir/Patient/{p}")).await;
    }
    let later = s.dir.join("later.checkpoint");
    std::fs::write(&later, settled_checkpoint(&s).await).expect("save");
    s.kill9();

    let (ok, out) = verify(&s.data, &[&early, &later]);
    assert!(ok, "an untouched log verifies: {out}");
    assert!(out.contains("the log verifies"), "{out}");

    let zeros = s.db().zeros_like("sealed");
    let edit = format!("UPDATE audit_entries SET sealed = {zeros} WHERE idx = 3");
    let scenarios: [(&str, &str, &str); 6] = [
        ("duplicate", "INSERT INTO audit_entries (idx, leaf_hash, sealed) SELECT (SELECT max(idx) + 1 FROM audit_entries), leaf_hash, sealed FROM audit_entries WHERE idx = 2", "duplicates entry 2"),
        ("edit", &edit, "entry 3"),
        ("edit leaf", "UPDATE audit_entries SET leaf_hash = (SELECT leaf_hash FROM audit_entries WHERE idx = 0) WHERE idx = 3", "no longer hash"),
        ("delete", "DELETE FROM audit_entries WHERE idx = 4", "missing"),
        ("swap", "UPDATE audit_entries SET idx = CASE idx WHEN 2 THEN 5 WHEN 5 THEN 2 END + 1000000 WHERE idx IN (2, 5); UPDATE audit_entries SET idx = idx - 1000000 WHERE idx >= 1000000", "no longer hash"),
        ("insert", "UPDATE audit_entries SET idx = idx + 1000000 WHERE idx >= 3; UPDATE audit_entries SET idx = idx - 999999 WHERE idx >= 1000000; INSERT INTO audit_entries (idx, leaf_hash, sealed) SELECT 3, leaf_hash, sealed FROM audit_entries WHERE idx = 1", "no longer hash"),
    ];
    for (name, sql, says) in scenarios {
        let copy = s.dir.join(format!("tampered-{}", name.replace(' ', "-")));
        Db::copy_data_dir(&s.data, &copy);
        Db::of(&copy).execute(sql);
        let (ok, out) = verify(&copy, &[&early, &later]);
        assert!(!ok, "{name}: verify must fail: {out}");
        assert!(out.contains(says), "{name}: verify must say '{says}': {out}");
    }
    // The database rolled back to an earlier copy: its own checkpoints agree with it, but the
    // auditor's later checkpoint does not.
    let (ok, out) = verify(&snapshot, &[&early]);
    assert!(ok, "the snapshot on its own is consistent: {out}");
    let (ok, out) = verify(&snapshot, &[&early, &later]);
    assert!(!ok && out.contains("rolled back"), "a rollback is caught by a later checkpoint: {out}");
}

#[tokio::test]
async fn proofs_verify_against_the_signed_checkpoint() {
    use base64::Engine as _;
    let s = Server::start("proofs");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    for _ in 0..9 {
        s.get(&format!("/fhir/Patient/{p}")).await;
    }
    let note = settled_checkpoint(&s).await;
    let vkey = s.request("GET", "/audit/key", None, None, &[]).await.text;
    let verifier = valv_audit::Verifier::from_vkey(vkey.trim()).expect("vkey");
    let cp = valv_audit::open_checkpoint(&note, std::slice::from_ref(&verifier)).expect("checkpoint");
    let leaves: Vec<[u8; 32]> = s.audit_rows().iter().map(|(l, _)| l.as_slice().try_into().expect("32")).collect();
    let decode = |v: &serde_json::Value| -> Vec<[u8; 32]> {
        v.as_array().expect("proof").iter().map(|h| {
            base64::engine::general_purpose::STANDARD.decode(h.as_str().expect("b64")).expect("b64").try_into().expect("32 bytes")
        }).collect()
    };
    for index in [0, 3, cp.size - 1] {
        let r = s.request("GET", &format!("/audit/proof/inclusion?index={index}&size={}", cp.size), None, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let proof = decode(&r.json["proof"]);
        valv_audit::merkle::verify_inclusion(index, cp.size, &leaves[index as usize], &proof, &cp.root).expect("inclusion verifies");
        let receipt = s.request("GET", &format!("/audit/proof/inclusion?index={index}&size={}", cp.size), None, None, &[("accept", "text/plain")]).await.text;
        let (rcp, ri) = valv_audit::verify_receipt(&receipt, std::slice::from_ref(&verifier), &leaves[index as usize]).expect("receipt verifies");
        assert_eq!((rcp.size, ri), (cp.size, index));
    }
    let r = s.request("GET", &format!("/audit/proof/consistency?from=2&to={}", cp.size), None, None, &[]).await;
    let proof = decode(&r.json["proof"]);
    let root2 = valv_audit::merkle::root(&leaves[..2]);
    valv_audit::merkle::verify_consistency(2, cp.size, &root2, &cp.root, &proof).expect("consistency verifies");
    // The same entries as RFC 5424 messages, as SIEM forwarding sends them.
    let syslog = crate::harness::run_ok(&s.data, &["audit", "export", "--format", "syslog"]);
    let lines: Vec<&str> = syslog.lines().collect();
    assert_eq!(lines.len(), s.audit_lines());
    assert!(lines.iter().enumerate().all(|(i, l)| l.starts_with("<10") && l.contains(&format!("index=\"{i}\""))), "{syslog}");
    s.request("GET", "/audit/proof/inclusion?index=5&size=3", None, None, &[]).await.outcome(400);
    // A row planted far beyond the end: proofs refuse the hole instead of reserving memory for it.
    let far: u64 = 1 << 40;
    assert_eq!(s.db().execute(&format!("INSERT INTO audit_entries (idx, leaf_hash, sealed) SELECT {far}, leaf_hash, sealed FROM audit_entries WHERE idx = 0")), 1, "plant");
    let r = s.request("GET", &format!("/audit/proof/inclusion?index=0&size={}", far + 1), None, None, &[]).await;
    assert!(r.status >= 400, "{}", r.text);
    assert_eq!(s.request("GET", "/healthz", None, None, &[]).await.status, 200, "the server is still up");
    s.request("GET", "/audit/proof/inclusion?index=x", None, None, &[]).await.outcome(400);
}

#[tokio::test]
async fn auditors_read_the_log_as_audit_events_and_a_patients_access_log_verifies() {
    use base64::Engine as _;
    let s = Server::start("auditapi");
    let auditor = s.auditor_key.clone();
    let service = crate::harness::last_line(&crate::harness::run_ok(&s.data, &["apikey", "create", "--name", "svc", "--role", "service", "--scope", "system/*.rs"]));
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    let other = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    s.request("GET", &format!("/fhir/Patient/{p}"), Some(&service), None, &[]).await;
    s.get(&format!("/fhir/Patient/{other}")).await;
    // Auditors see the log but no clinical data; services do not see the log.
    s.request("GET", &format!("/fhir/Patient/{p}"), Some(&auditor), None, &[]).await.outcome(403);
    s.request("GET", "/fhir/AuditEvent", Some(&service), None, &[]).await.outcome(403);
    let events = s.request("GET", &format!("/fhir/AuditEvent?patient={p}&outcome=0"), Some(&auditor), None, &[]).await;
    assert_eq!(events.status, 200, "{}", events.text);
    let entries = events.json["entry"].as_array().expect("entries").clone();
    assert!(entries.len() >= 2, "create and read of the patient: {}", events.text);
    assert!(entries.iter().all(|e| e["resource"]["entity"][0]["what"]["reference"] == format!("Patient/{p}")));
    assert!(entries.iter().any(|e| e["resource"]["agent"][0]["who"]["display"] == "svc"), "who accessed is named");
    let denied = s.request("GET", "/fhir/AuditEvent?outcome=4&action=R", Some(&auditor), None, &[]).await;
    assert!(denied.total() >= 1, "the auditor's own refused read is in the log: {}", denied.text);

    // The patient's access log carries everything an independent verifier needs.
    settled_checkpoint(&s).await;
    let log = s.request("GET", &format!("/fhir/Patient/{p}/$access-log"), Some(&auditor), None, &[]).await;
    assert_eq!(log.status, 200, "{}", log.text);
    let params = log.json["parameter"].as_array().expect("parameters");
    let get = |name: &str| params.iter().find(|x| x["name"] == name).and_then(|x| x["valueString"].as_str()).expect(name).to_string();
    let verifier = valv_audit::Verifier::from_vkey(&get("logKey")).expect("vkey");
    let cp = valv_audit::open_checkpoint(&get("checkpoint"), std::slice::from_ref(&verifier)).expect("checkpoint");
    let mut proven = 0;
    for entry in params.iter().filter(|x| x["name"] == "entry") {
        let parts = entry["part"].as_array().expect("parts");
        let part = |n: &str| parts.iter().find(|x| x["name"] == n);
        let canonical = part("canonical").and_then(|x| x["valueString"].as_str()).expect("canonical");
        assert!(canonical.contains(&format!("\"patient\":\"{p}\"")), "only this patient's entries");
        assert!(!canonical.contains(&other));
        let leaf = valv_audit::merkle::leaf_hash(canonical.as_bytes());
        let index: u64 = part("index").and_then(|x| x["valueString"].as_str()).and_then(|i| i.parse().ok()).expect("index");
        let proof: Vec<[u8; 32]> = parts
            .iter()
            .filter(|x| x["name"] == "proof")
            .map(|x| base64::engine::general_purpose::STANDARD.decode(x["valueBase64Binary"].as_str().expect("b64")).expect("b64").try_into().expect("32"))
            .collect();
        if part("pending").is_none() {
            valv_audit::merkle::verify_inclusion(index, cp.size, &leaf, &proof, &cp.root).expect("each entry is proven in the signed tree");
            proven += 1;
        }
    }
    assert!(proven >= 2, "{}", log.text);

    // Page by page (`_count`, then each answer's `next`): the same entries in the same order.
    // Every request for the log is itself an entry naming the patient, so the log grows as it
    // is paged: the first pages are compared with the whole answer above.
    let indices = |v: &serde_json::Value| -> Vec<String> {
        let params = v["parameter"].as_array().cloned().unwrap_or_default();
        params.iter().filter(|x| x["name"] == "entry").map(|e| e["part"][0]["valueString"].as_str().expect("index").to_string()).collect()
    };
    let all = indices(&log.json);
    let (mut paged, mut path) = (Vec::new(), format!("/fhir/Patient/{p}/$access-log?_count=1"));
    while paged.len() < all.len() {
        let page = s.request("GET", &path, Some(&auditor), None, &[]).await;
        assert_eq!(page.status, 200, "{}", page.text);
        let got = indices(&page.json);
        assert_eq!(got.len(), 1, "one entry a page: {}", page.text);
        paged.extend(got);
        let next = page.json["parameter"].as_array().and_then(|ps| ps.iter().find(|x| x["name"] == "next")).and_then(|x| x["valueUri"].as_str()).expect("a next link while there is more");
        path = next[next.find("/fhir/").expect("a Valv URL")..].to_string();
    }
    assert_eq!(paged, all, "the pages hold the whole log in order");
    for bad in ["_count=0", "_count=1001", "_count=x", "_after=-1", "_after=one"] {
        s.request("GET", &format!("/fhir/Patient/{p}/$access-log?{bad}"), Some(&auditor), None, &[]).await.outcome(400);
    }
    // One entry's canonical bytes, for auditors.
    let one = s.request("GET", "/audit/entries/0", Some(&auditor), None, &[]).await;
    assert_eq!(one.status, 200, "{}", one.text);
    assert_eq!(valv_audit::merkle::leaf_hash(one.text.as_bytes()).to_vec(), s.audit_rows()[0].0, "the bytes hash to the stored leaf");
    s.request("GET", "/audit/entries/0", Some(&service), None, &[]).await.outcome(403);
    s.request("GET", "/audit/entries/999999", Some(&auditor), None, &[]).await.outcome(404);
}

/// Every audit entry, decrypted, through `valv audit export`.
fn exported(data: &std::path::Path) -> Vec<serde_json::Value> {
    let out = crate::harness::run_ok(data, &["audit", "export", "--format", "jsonl"]);
    out.lines().map(|l| serde_json::from_str(l).expect("jsonl")).collect()
}

#[tokio::test]
async fn kill_9_under_concurrent_reads_never_loses_an_entry_for_data_sent() {
    use std::sync::{Arc, Mutex};
    let mut s = Server::start("crashaudit");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Crash"}]})).await.id();
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    for round in 0..3 {
        let mut readers = Vec::new();
        for _ in 0..6 {
            let (client, p, answered) = (s.client(), p.clone(), answered.clone());
            readers.push(tokio::spawn(async move {
                loop {
                    match client.try_request("GET", &format!("/fhir/Patient/{p}"), Some(&client.data_key), None, &[]).await {
                        Ok(r) if r.status == 200 => {
                            assert!(r.text.contains("Crash"));
                            let rid = r.header("x-request-id").expect("request id").to_string();
                            answered.lock().expect("lock").push(rid);
                        }
                        Ok(r) => panic!("unexpected {}: {}", r.status, r.text),
                        Err(_) => break,
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(400 + 300 * round)).await;
        s.kill9();
        for r in readers {
            r.await.expect("reader");
        }
        s.restart();
    }
    let answered = answered.lock().expect("lock").clone();
    assert!(answered.len() > 30, "only {} reads were answered", answered.len());
    let entries = exported(&s.data);
    let recorded: std::collections::HashSet<String> = entries
        .iter()
        .filter(|e| e["entry"]["outcome"] == "success" && e["entry"]["interaction"] == "read")
        .filter_map(|e| e["entry"]["request_id"].as_str().map(str::to_string))
        .collect();
    for rid in &answered {
        assert!(recorded.contains(rid), "request {rid} carried patient data but has no durable audit entry");
    }
    let _ = settled_checkpoint(&s).await;
    s.kill9();
    let (ok, out) = verify(&s.data, &[]);
    assert!(ok, "the log verifies after repeated kill -9: {out}");
}
