//! Smaller holes the penetration test of 40d3047 found: history versions that belonged to
//! another patient, patient data outside the R4 Patient compartment, and ids whose existence a
//! caller without access could tell from the answer.

use crate::access::{body_for, care_team, create, people, Spec, LONG_SESSIONS};
use crate::harness::Server;
use serde_json::json;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

#[tokio::test]
async fn instance_history_shows_only_versions_of_patients_the_caller_may_see() {
    let s = Server::start_configured("holes-history", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let dr = create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": "Lind"}]})).await["id"].as_str().expect("id").to_string();
    let p1 = create(&s, &json!({"resourceType": "Patient"})).await["id"].as_str().expect("id").to_string();
    let p2 = create(&s, &json!({"resourceType": "Patient"})).await["id"].as_str().expect("id").to_string();
    create(&s, &care_team(&p1, std::slice::from_ref(&dr), "attending", None)).await;
    let mut o = create(&s, &body_for("Observation", &p2)).await;
    let oid = o["id"].as_str().expect("id").to_string();
    o["subject"] = json!({"reference": format!("Patient/{p1}")});
    assert_eq!(s.put(&format!("/fhir/Observation/{oid}"), &o, &[]).await.status, 200, "moved from P2 to P1");
    let spec: Vec<Spec> = vec![("dr.one".into(), "physician", vec![], Some(dr), None)];
    let users = people(&s, &mut now, &spec).await;
    let t = users["dr.one"].token.clone();
    let h = s.request("GET", &format!("/fhir/Observation/{oid}/_history"), Some(&t), None, &[]).await;
    assert_eq!(h.status, 200, "{}", h.text);
    assert_eq!(h.total(), 1, "only P1's version: {}", h.text);
    assert!(!h.text.contains(&p2), "nothing of P2: {}", h.text);
    s.request("GET", &format!("/fhir/Observation/{oid}/_history/1"), Some(&t), None, &[]).await.outcome(403);
    // The loader (a service, outside need-to-know) still sees both.
    assert_eq!(s.get(&format!("/fhir/Observation/{oid}/_history")).await.total(), 2);
}

#[tokio::test]
async fn an_id_the_caller_may_not_see_answers_as_an_unknown_one() {
    // With update-as-create on (the default), a PUT to an unknown id creates it, which tells a
    // caller who may create that the id was free; the refused PUT to the existing one is then
    // recorded in its patient's log (docs/SECURITY.md). Off, a PUT reveals nothing.
    let s = Server::start_configured("holes-oracle", &[("VALV_FHIR_UPDATE_CREATE", "false")], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let dr = create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": "Berg"}]})).await["id"].as_str().expect("id").to_string();
    let mine = create(&s, &json!({"resourceType": "Patient"})).await["id"].as_str().expect("id").to_string();
    let other = create(&s, &json!({"resourceType": "Patient"})).await["id"].as_str().expect("id").to_string();
    create(&s, &care_team(&mine, std::slice::from_ref(&dr), "attending", None)).await;
    let hidden = create(&s, &body_for("Observation", &other)).await["id"].as_str().expect("id").to_string();
    let users = people(&s, &mut now, &[("dr.one".into(), "physician", vec![], Some(dr), None)]).await;
    let t = users["dr.one"].token.clone();
    let unknown = "8d7c6b5a-0000-4000-8000-000000000000";
    // The body names the caller's own patient: only the id's existence differs.
    let body = |id: &str| {
        let mut b = body_for("Observation", &mine);
        b["id"] = json!(id);
        b
    };
    for (method, suffix) in [("GET", "/_history"), ("DELETE", ""), ("PUT", ""), ("GET", "")] {
        let answer = |id: String| {
            let (s, t) = (&s, t.clone());
            let b = (method == "PUT").then(|| body(&id));
            async move { s.request(method, &format!("/fhir/Observation/{id}{suffix}"), Some(&t), b.as_ref(), &[]).await }
        };
        let (a, b) = (answer(hidden.clone()).await, answer(unknown.to_string()).await);
        assert_eq!((a.status, b.status), (403, 403), "{method} {suffix}: {} / {}", a.text, b.text);
        assert_eq!(a.json["issue"][0]["diagnostics"], b.json["issue"][0]["diagnostics"], "{method} {suffix}");
    }
    // Break-glass and support requests do not look the patient up either.
    let bg = |id: &str| {
        let body = json!({"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "unconscious"}]});
        let (s, t, id) = (&s, t.clone(), id.to_string());
        async move { s.request("POST", &format!("/fhir/Patient/{id}/$break-glass"), Some(&t), Some(&body), &[]).await }
    };
    assert_eq!((bg(&other).await.status, bg(unknown).await.status), (201, 201));
}

#[tokio::test]
async fn patient_data_outside_the_r4_compartment_is_decided_on_its_patient() {
    let s = Server::start_configured("holes-beyond", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let p1 = create(&s, &json!({"resourceType": "Patient"})).await["id"].as_str().expect("id").to_string();
    let p2 = create(&s, &json!({"resourceType": "Patient"})).await["id"].as_str().expect("id").to_string();
    let task = create(&s, &json!({"resourceType": "Task", "status": "requested", "intent": "order", "for": {"reference": format!("Patient/{p2}")},
        "description": "call back about the biopsy"})).await["id"].as_str().expect("id").to_string();
    let device = create(&s, &json!({"resourceType": "Device", "patient": {"reference": format!("Patient/{p2}")}})).await["id"].as_str().expect("id").to_string();
    let users = people(&s, &mut now, &[("pat.one".into(), "patient", vec![], None, Some(p1)), ("pat.two".into(), "patient", vec![], None, Some(p2))]).await;
    let (one, two) = (users["pat.one"].token.clone(), users["pat.two"].token.clone());
    for path in [format!("/fhir/Task/{task}"), format!("/fhir/Device/{device}")] {
        s.request("GET", &path, Some(&one), None, &[]).await.outcome(403);
        assert_eq!(s.request("GET", &path, Some(&two), None, &[]).await.status, 200, "{path}: the patient's own");
    }
    let search = s.request("GET", "/fhir/Task", Some(&one), None, &[]).await;
    assert_eq!((search.status, search.total()), (200, 0), "{}", search.text);
    s.request("GET", "/fhir/Task", Some(&s.admin_key), None, &[]).await.outcome(403);
    assert!(!s.request("GET", &format!("/fhir/Task/{task}"), Some(&s.admin_key), None, &[]).await.text.contains("biopsy"));
}
