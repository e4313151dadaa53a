//! Erasure by key destruction (`valv erase`), against a running server: the patient's data key is
//! gone, every read of theirs is 410, searches no longer find them, nothing can be written under
//! their id again, other patients are untouched, the erasure is audited and in the signed ledger,
//! and bad requests are refused with one line and change nothing.

use crate::harness::{run_refused, run_ok, Server};
use serde_json::json;
use std::time::{Duration, Instant};

fn refused(s: &Server, args: &[&str]) -> String {
    run_refused(&s.data, &[&["erase"], args].concat())
}

fn key_rows(s: &Server, patient: &str) -> i64 {
    let rows = s.db().query(&format!("SELECT count(*) FROM data_keys WHERE name = {}", crate::harness::quoted(&format!("patient:{patient}"))));
    rows[0][0].parse().expect("count")
}

async fn patient_with_observation(s: &Server, family: &str) -> (String, String) {
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": family}]})).await;
    assert_eq!(p.status, 201, "{}", p.text);
    let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "canary"}, "subject": {"reference": format!("Patient/{}", p.id())}})).await;
    assert_eq!(o.status, 201, "{}", o.text);
    (p.id(), o.id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_patient_is_gone_for_good_and_the_rest_stays() {
    let mut s = Server::start("erase");
    let (p, obs) = patient_with_observation(&s, "Eraseberg").await;
    let (q, q_obs) = patient_with_observation(&s, "Keepholm").await;
    // Read once so the server holds the patient's key in its cache.
    assert_eq!(s.get(&format!("/fhir/Observation/{obs}")).await.status, 200);
    assert_eq!(key_rows(&s, &p), 1);

    // Refusals first: each changes nothing.
    assert!(refused(&s, &["--patient", &p, "--reason", "  "]).contains("legal basis"));
    assert!(refused(&s, &["--patient", "no-such-patient", "--reason", "x"]).contains("no patient"));
    assert!(refused(&s, &["--patient", "bad/../id", "--reason", "x"]).contains("not a FHIR id"));
    assert_eq!(key_rows(&s, &p), 1);

    let out = run_ok(&s.data, &["erase", "--patient", &p, "--reason", "GDPR Art. 17 request 2026-117"]);
    assert!(out.contains("data key destroyed") && out.contains("erasure #1"), "{out}");
    assert_eq!(key_rows(&s, &p), 0, "the data key is destroyed");

    // The running server takes the erasure in within its refresh (2 s), cached key included.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get(&format!("/fhir/Observation/{obs}")).await.status != 410 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = s.get(&format!("/fhir/Observation/{obs}")).await;
    assert_eq!(gone.status, 410, "{}", gone.text);
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 410);
    assert_eq!(s.get(&format!("/fhir/Patient/{p}/_history")).await.status, 410);
    // Searches do not find them; a type's history leaves them out.
    assert_eq!(s.get("/fhir/Patient?family=Eraseberg").await.total(), 0);
    assert_eq!(s.get(&format!("/fhir/Observation?subject=Patient/{p}")).await.total(), 0);
    let all = s.get("/fhir/Observation").await;
    assert!(!all.text.contains(&obs), "{}", all.text);
    // Nothing is written under the erased id again.
    let again = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}})).await;
    assert_eq!(again.status, 410, "{}", again.text);
    assert_eq!(key_rows(&s, &p), 0, "no new key for an erased patient");
    // Everyone else is untouched.
    assert_eq!(s.get(&format!("/fhir/Observation/{q_obs}")).await.status, 200);
    assert_eq!(s.get("/fhir/Patient?family=Keepholm").await.total(), 1);
    assert_eq!(s.get(&format!("/fhir/Patient/{q}")).await.status, 200);

    // Twice is refused; the erasure is audited and in the ledger, signed by the log's key.
    assert!(refused(&s, &["--patient", &p, "--reason", "again"]).contains("erased already"));
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("GDPR Art. 17 request 2026-117") && log.contains("\"erase\""), "the erasure is an audit entry");
    let vkey = s.request("GET", "/audit/key", None, None, &[]).await.text;
    let verifier = valv_audit::Verifier::from_vkey(vkey.trim()).expect("vkey");
    let ledger_text = std::fs::read_to_string(s.data.join("erasure-ledger")).expect("ledger file");
    let ledger = valv_audit::ledger::Ledger::open(&ledger_text, std::slice::from_ref(&verifier)).expect("the ledger verifies under the log's key");
    assert_eq!(ledger.erasures.iter().map(|e| e.patient.as_str()).collect::<Vec<_>>(), [p.as_str()]);

    // After a restart, still gone.
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Observation/{obs}")).await.status, 410);
    assert_eq!(s.get(&format!("/fhir/Observation/{q_obs}")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_duty_refuses_erasure_unless_overridden_with_a_reason() {
    let s = Server::start_configured("erase-retention", &[], "[retention]\nyears = 10\n[backup]\ndir = \"../backups\"\n");
    std::fs::create_dir_all(s.dir.join("backups")).expect("backup dir");
    let (p, obs) = patient_with_observation(&s, "Retainsson").await;
    let reason = refused(&s, &["--patient", &p, "--reason", "patient request"]);
    assert!(reason.contains("retention duty of 10 years") && reason.contains("--override-retention"), "{reason}");
    assert_eq!(s.get(&format!("/fhir/Observation/{obs}")).await.status, 200, "nothing changed");
    let out = run_ok(&s.data, &["erase", "--patient", &p, "--reason", "patient request", "--override-retention", "IMY decision 2026-44"]);
    assert!(out.contains("erasure #1"), "{out}");
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("retention duty overridden: IMY decision 2026-44"), "the override is audited");
    // The ledger is also beside the backups, identical.
    let copy = std::fs::read(s.dir.join("backups/erasure-ledger")).expect("the ledger's copy in [backup] dir");
    assert_eq!(copy, std::fs::read(s.data.join("erasure-ledger")).expect("ledger"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_an_erasure_takes_two_admins() {
    let s = Server::start("erase-http");
    let (p, obs) = patient_with_observation(&s, "Twopersson").await;
    let (q, _) = patient_with_observation(&s, "Rejectsson").await;
    let ask = |key: String, body: serde_json::Value| {
        let s = &s;
        async move { s.request("POST", "/admin/erasures", Some(&key), Some(&body), &[]).await }
    };
    // Refusals first.
    assert_eq!(ask(s.data_key.clone(), json!({"patient": p, "reason": "x"})).await.status, 403, "only admins");
    assert_eq!(ask(s.admin_key.clone(), json!({"patient": p})).await.status, 400, "a legal basis is required");
    assert_eq!(ask(s.admin_key.clone(), json!({"patient": "nobody", "reason": "x"})).await.status, 404);

    let req = ask(s.admin_key.clone(), json!({"patient": p, "reason": "GDPR Art. 17 request 2026-200"})).await;
    assert_eq!(req.status, 202, "{}", req.text);
    let id = req.json["id"].as_str().expect("id").to_string();
    let approve = format!("/admin/erasures/{id}/approve");
    let same = s.request("POST", &approve, Some(&s.admin_key), None, &[]).await;
    assert_eq!(same.status, 403, "the requester cannot approve: {}", same.text);
    assert_eq!(s.get(&format!("/fhir/Observation/{obs}")).await.status, 200, "nothing erased yet");

    let second = s.approver_key().to_string();
    let done = s.request("POST", &approve, Some(&second), None, &[]).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert!(done.json["summary"].as_str().is_some_and(|t| t.contains("data key destroyed")), "{}", done.text);
    assert_eq!(s.get(&format!("/fhir/Observation/{obs}")).await.status, 410);
    assert_eq!(s.request("POST", &approve, Some(&second), None, &[]).await.status, 409, "decided already");
    assert!(std::fs::read_to_string(s.data.join("erasure-ledger")).expect("ledger").contains(&p));

    // A rejected request erases nothing.
    let r = ask(s.admin_key.clone(), json!({"patient": q, "reason": "request 2026-201"})).await;
    let rid = r.json["id"].as_str().expect("id").to_string();
    assert_eq!(s.request("POST", &format!("/admin/erasures/{rid}/reject"), Some(&second), None, &[]).await.status, 200);
    assert_eq!(s.get(&format!("/fhir/Patient/{q}")).await.status, 200);
    let list = s.request("GET", "/admin/erasures", Some(&s.admin_key), None, &[]).await;
    let states: Vec<&str> = list.json["requests"].as_array().expect("requests").iter().filter_map(|r| r["state"].as_str()).collect();
    assert!(states.contains(&"approved") && states.contains(&"rejected"), "{}", list.text);
    // Both steps are audited, naming the patient.
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("\"erase-request\"") && log.contains("GDPR Art. 17 request 2026-200") && log.contains("\"erase-reject\""));
}
