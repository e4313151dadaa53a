//! The audit seam: every attempt leaves an entry before the answer, and no entry means no answer.

use crate::harness::Server;
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
        let r = s.request_raw(method, &path, Some(&s.admin_key), body.map(|b| b.as_bytes().to_vec()), &[]).await;
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
