//! Transactions (Synthea's, with urn:uuid references), atomic failure, batches and `valv import`.

use crate::harness::{run_ok, Server};
use serde_json::{json, Value};
use std::path::PathBuf;

fn synthea_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/synthea")
}

fn synthea_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(synthea_dir())
        .expect("shared/testdata/synthea is beside the repository")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 6);
    files
}

async fn count(s: &Server, t: &str) -> u64 {
    s.get(&format!("/fhir/{t}?_summary=count")).await.total()
}

#[tokio::test]
async fn synthea_transactions_import_whole_with_references_resolved() {
    let s = Server::start("synthea");
    for f in synthea_files() {
        let bundle: Value = serde_json::from_slice(&std::fs::read(&f).expect("read")).expect("json");
        let n = bundle["entry"].as_array().map_or(0, Vec::len);
        let r = s.post("/fhir", &bundle).await;
        assert_eq!(r.status, 200, "{}: {}", f.display(), &r.text[..r.text.len().min(500)]);
        assert_eq!(r.json["type"], "transaction-response");
        let entries = r.json["entry"].as_array().expect("entries");
        assert_eq!(entries.len(), n);
        assert!(entries.iter().all(|e| e["response"]["status"] == "201 Created"));
    }
    assert_eq!(count(&s, "Patient").await, 6);
    assert!(count(&s, "Claim").await > 100);
    assert!(count(&s, "ExplanationOfBenefit").await > 100);
    // urn:uuid references were rewritten to the new server ids.
    let patients = s.get("/fhir/Patient?_count=1").await;
    let pid = patients.entry_ids()[0].clone();
    let obs = s.get(&format!("/fhir/Observation?patient={pid}&_count=1")).await;
    assert!(obs.total() > 10, "{}", obs.text);
    assert_eq!(obs.json["entry"][0]["resource"]["subject"]["reference"], format!("Patient/{pid}"));
    let enc = s.get(&format!("/fhir/Encounter?patient={pid}")).await;
    assert!(enc.total() > 5);
}

#[tokio::test]
async fn a_transaction_failing_midway_leaves_nothing_behind() {
    let s = Server::start("atomic");
    let before = count(&s, "Patient").await;
    let bundle = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:a","resource":{"resourceType":"Patient","name":[{"family":"Kept"}]},"request":{"method":"POST","url":"Patient"}},
        {"fullUrl":"urn:uuid:b","resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:a"}},"request":{"method":"POST","url":"Observation"}},
        {"fullUrl":"urn:uuid:c","resource":{"resourceType":"Observation","status":42,"code":{"text":"bad"}},"request":{"method":"POST","url":"Observation"}}
    ]});
    let r = s.post("/fhir", &bundle).await;
    let d = r.outcome(400);
    assert!(d.contains("entry[2]"), "names the failing entry: {d}");
    assert_eq!(count(&s, "Patient").await, before);
    assert_eq!(count(&s, "Observation").await, 0);
    // A version conflict on the last entry also undoes the first.
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    let conflict = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:n","resource":{"resourceType":"Patient","name":[{"family":"New"}]},"request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Patient","id":p,"gender":"male"},"request":{"method":"PUT","url":format!("Patient/{p}"),"ifMatch":"W/\"7\""}}
    ]});
    s.post("/fhir", &conflict).await.outcome(412);
    assert_eq!(count(&s, "Patient").await, before + 1);
}

#[tokio::test]
async fn a_batch_runs_entries_independently() {
    let s = Server::start("batch");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    let bundle = json!({"resourceType":"Bundle","type":"batch","entry":[
        {"request":{"method":"GET","url":format!("Patient/{p}")}},
        {"request":{"method":"GET","url":"Patient/does-not-exist"}},
        {"resource":{"resourceType":"Patient","gender":"female"},"request":{"method":"POST","url":"Patient"}},
        {"request":{"method":"GET","url":"Patient?gender=female"}}
    ]});
    let r = s.post("/fhir", &bundle).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<&str> = r.json["entry"].as_array().expect("entries").iter().filter_map(|e| e["response"]["status"].as_str()).collect();
    assert_eq!(statuses, vec!["200 OK", "404 Not Found", "201 Created", "200 OK"]);
    assert_eq!(r.json["entry"][1]["response"]["outcome"]["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn import_command_reports_what_it_took_and_rejected() {
    let s = Server::start("import");
    let bad = s.dir.join("broken.json");
    std::fs::write(&bad, b"{ not json").expect("write");
    let mut args: Vec<String> = vec!["import".into()];
    args.extend(synthea_files().iter().take(2).map(|p| p.display().to_string()));
    args.push(bad.display().to_string());
    let out = crate::harness::valv().arg("--data-dir").arg(&s.data).args(&args).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "a rejected file makes the exit status non-zero");
    assert!(stdout.contains("from 2 of 3 files"), "{stdout}");
    assert!(stdout.contains("broken.json: malformed JSON"), "{stdout}");
    assert_eq!(count(&s, "Patient").await, 2);
    // synth writes bundles that import cleanly.
    let synth_dir = s.dir.join("synth");
    run_ok(&s.data, &["synth", "--patients", "3", "--out", synth_dir.to_str().expect("utf-8"), "--seed", "7"]);
    let files: Vec<String> = std::fs::read_dir(&synth_dir).expect("dir").map(|e| e.expect("entry").path().display().to_string()).collect();
    assert_eq!(files.len(), 3);
    let mut args = vec!["import".to_string()];
    args.extend(files);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&s.data, &args);
    assert_eq!(count(&s, "Patient").await, 5);
}

#[tokio::test]
async fn transaction_responses_line_up_with_requests() {
    let s = Server::start("txlineup");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    assert_eq!(s.delete(&format!("/fhir/Patient/{p}")).await.status, 200);
    let bundle = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"request":{"method":"DELETE","url":format!("Patient/{p}")}},
        {"fullUrl":"urn:uuid:x","resource":{"resourceType":"Patient","gender":"female"},"request":{"method":"POST","url":"Patient"}}
    ]});
    let r = s.post("/fhir", &bundle).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<&str> = r.json["entry"].as_array().expect("entries").iter().filter_map(|e| e["response"]["status"].as_str()).collect();
    assert_eq!(statuses, vec!["204 No Content", "201 Created"], "one response per request entry, in order");
}
