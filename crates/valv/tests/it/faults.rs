//! Faults a reliability run found: a log whose checkpoints were deleted must not be signed anew
//! until an operator re-anchors it to a checkpoint kept outside Valv, and a current-version
//! pointer rolled back in the database is caught.

use crate::harness::{run_ok, valv, Server};
use crate::independent::settled_checkpoint;
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Runs `valv serve` on the data directory and expects it to refuse to start: returns its stderr.
fn serve_refused(s: &Server) -> String {
    let mut child = valv()
        .arg("--data-dir")
        .arg(&s.data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn valv serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(!status.success(), "serve must refuse");
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("valv serve started on a log it cannot vouch for");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sql(s: &Server, statement: &str) -> usize {
    s.db().execute(statement) as usize
}

#[tokio::test]
async fn a_log_whose_checkpoints_were_deleted_starts_only_after_re_anchoring() {
    let mut s = Server::start("faults-anchor");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    for _ in 0..3 {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    let (note, kept) = settled_checkpoint(&s).await;
    let outside = s.dir.join("kept-outside.checkpoint");
    std::fs::write(&outside, &note).expect("save checkpoint");
    for _ in 0..3 {
        s.get(&format!("/fhir/Patient/{p}")).await;
    }
    settled_checkpoint(&s).await;
    s.kill9();
    assert!(sql(&s, "DELETE FROM audit_checkpoints") > 1);
    let refused = serve_refused(&s);
    assert!(refused.contains("no signed checkpoint") && refused.contains("re-anchor"), "{refused}");

    // A checkpoint from another log, or a log cut below the checkpoint, cannot anchor it.
    let other = Server::start("faults-anchor-other");
    let (foreign, _) = settled_checkpoint(&other).await;
    let foreign_file = s.dir.join("foreign.checkpoint");
    std::fs::write(&foreign_file, foreign).expect("write");
    let out = valv().arg("--data-dir").arg(&s.data).args(["audit", "re-anchor", "--checkpoint"]).arg(&foreign_file).output().expect("run");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not validly signed"), "{}", String::from_utf8_lossy(&out.stderr));

    let said = run_ok(&s.data, &["audit", "re-anchor", "--checkpoint", outside.to_str().expect("path")]);
    assert!(said.contains(&format!("size {kept}")), "{said}");
    s.restart();
    let (_, now_size) = settled_checkpoint(&s).await;
    assert!(now_size > kept);
    let verified = run_ok(&s.data, &["audit", "verify", "--checkpoint", outside.to_str().expect("path")]);
    assert!(verified.contains("the log verifies"), "{verified}");
    assert!(run_ok(&s.data, &["audit", "export"]).contains("\"interaction\":\"audit-re-anchor\""), "the re-anchoring is on record");

    // Checkpoints deleted and the log cut below what the kept checkpoint covers: refused.
    s.kill9();
    sql(&s, "DELETE FROM audit_checkpoints");
    sql(&s, &format!("DELETE FROM audit_entries WHERE idx >= {}", kept - 1));
    let out = valv().arg("--data-dir").arg(&s.data).args(["audit", "re-anchor", "--checkpoint"]).arg(&outside).output().expect("run");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("entries were removed"), "{}", String::from_utf8_lossy(&out.stderr));
    serve_refused(&s);
}

#[tokio::test]
async fn a_current_version_pointer_set_back_in_the_database_is_caught() {
    let s = Server::start("faults-pointer");
    let mut p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "gender": "female"})).await.json;
    let id = p["id"].as_str().expect("id").to_string();
    for gender in ["male", "other"] {
        p["gender"] = json!(gender);
        assert_eq!(s.put(&format!("/fhir/Patient/{id}"), &p, &[]).await.status, 200);
    }
    assert_eq!(s.get(&format!("/fhir/Patient/{id}")).await.json["meta"]["versionId"], "3");
    assert_eq!(sql(&s, &format!("UPDATE resources SET version = 1 WHERE id = '{id}'")), 1);
    let r = s.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(r.status, 500, "{}", r.text);
    assert!(!r.text.contains("female"), "the old version is not served as current");
    let found = s.get(&format!("/fhir/Patient?_id={id}")).await;
    assert!(!found.text.contains("female"), "nor through search: {}", found.text);
    assert_eq!(found.status, 500, "the search fails as the read does: {}", found.text);
}

#[tokio::test]
async fn sigterm_under_load_answers_every_request_in_flight() {
    let mut s = Server::start_configured("faults-sigterm", &[], "[limits]\nshutdown_grace_secs = 20\n");
    let client = s.client();
    let key = s.data_key.clone();
    let before = s.audit_lines();
    let mut tasks = Vec::new();
    // Fewer than the per-source connection cap (64), so none is refused for that.
    for i in 0..60 {
        let (client, key) = (client.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"resourceType": "Patient", "identifier": [{"system": "urn:test:sigterm", "value": format!("req-{i}")}]});
            let r = client.try_request("POST", "/fhir/Patient", Some(&key), Some(serde_json::to_vec(&body).expect("json")), &[]).await;
            (i, r)
        }));
    }
    // SIGTERM once the server is busy with them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.audit_lines() < before + 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.signal_term();
    let mut answered = std::collections::HashMap::new();
    let mut unanswered = Vec::new();
    for t in tasks {
        let (i, r) = t.await.expect("task");
        match r {
            Ok(resp) => {
                answered.insert(i, resp.status);
            }
            Err(e) => unanswered.push((i, e)),
        }
    }
    let status = s.wait_exit(Duration::from_secs(30)).expect("the server exits within its grace period");
    assert!(status.success(), "a clean exit: {status:?}");
    eprintln!("sigterm: {} answered, {} without an answer: {:?}", answered.len(), unanswered.len(), unanswered.iter().map(|(_, e)| e.chars().take(40).collect::<String>()).collect::<std::collections::BTreeSet<_>>());
    assert!(answered.len() >= 5, "requests in flight were answered: {answered:?}");
    // A request left unanswered may only be one whose connection was never accepted (the
    // listener closed with it in the backlog): nothing of it reached the server.
    for (i, e) in &unanswered {
        assert!(e.starts_with("connect:") || e.starts_with("TLS:"), "request {i} was sent but not answered: {e}");
    }
    // Nothing was committed without its client hearing of it.
    s.restart();
    let found = s.get("/fhir/Patient?identifier=urn:test:sigterm|&_count=200").await;
    let stored: Vec<String> = found.json["entry"].as_array().into_iter().flatten()
        .filter_map(|e| e["resource"]["identifier"][0]["value"].as_str().map(str::to_string)).collect();
    for (i, e) in &unanswered {
        assert!(!stored.contains(&format!("req-{i}")), "request {i} was committed but never answered ({e})");
    }
    for (i, status) in &answered {
        assert_eq!(*status == 201, stored.contains(&format!("req-{i}")), "request {i}: answered {status}");
    }
}

#[tokio::test]
async fn a_cleared_patient_index_is_found_by_verify() {
    let s = Server::start("faults-index");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    for _ in 0..3 {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    settled_checkpoint(&s).await;
    assert!(run_ok(&s.data, &["audit", "verify"]).contains("the log verifies"));
    // A database writer hides the patient's entries from their access log.
    assert!(sql(&s, "UPDATE audit_entries SET patient_token = NULL WHERE patient_token IS NOT NULL") >= 4);
    let out = valv().arg("--data-dir").arg(&s.data).args(["audit", "verify"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("index token is missing"), "{text}");
}

/// SQLite keeps a patient's entries in a by-patient table the writer fills after its commits: a
/// pair deleted there would hide an entry from the patient's access log while the log itself
/// still verifies, so verify compares the table with the entries.
#[tokio::test]
async fn a_pair_deleted_from_the_by_patient_table_is_found_by_verify() {
    let s = Server::start("faults-by-patient");
    if s.db().is_postgres() {
        return; // PostgreSQL's lookup is an index of the entries themselves.
    }
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    for _ in 0..3 {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    settled_checkpoint(&s).await;
    assert!(run_ok(&s.data, &["audit", "verify"]).contains("the log verifies"));
    assert_eq!(sql(&s, "DELETE FROM audit_by_patient WHERE idx = (SELECT max(idx) FROM audit_by_patient)"), 1);
    let out = valv().arg("--data-dir").arg(&s.data).args(["audit", "verify"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("missing from the by-patient lookup"), "{text}");
}
