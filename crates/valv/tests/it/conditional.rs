//! Conditional create, update and delete (If-None-Exist, `PUT`/`DELETE [type]?criteria`) and
//! update-as-create with client-chosen ids (FHIR R4 http §3.1.0.4, §3.1.0.8–9).

use crate::access::{body_for, create, ward, Ward};
use crate::harness::Server;
use serde_json::{json, Value};

fn patient(mrn: &str, family: &str) -> Value {
    json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}], "name": [{"family": family}]})
}

async fn count(s: &Server, query: &str) -> u64 {
    s.get(&format!("/fhir/{query}&_summary=count")).await.total()
}

#[tokio::test]
async fn concurrent_conditional_creates_of_one_identifier_make_one_resource() {
    let s = Server::start("cond-race");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let client = s.client();
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&patient("MRN-RACE", &format!("Racer{i}"))).expect("json");
            client.try_request("POST", "/fhir/Patient", Some(&client.data_key), Some(body), &[("if-none-exist", "identifier=urn:mrn|MRN-RACE")]).await.expect("response")
        }));
    }
    let (mut created, mut ids) = (0, Vec::new());
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            201 => created += 1,
            200 => {}
            other => panic!("unexpected {other}: {}", r.text),
        }
        ids.push(r.json["id"].as_str().expect("every answer names the resource").to_string());
    }
    assert_eq!(created, 1, "exactly one request created");
    assert!(ids.iter().all(|id| *id == ids[0]), "every client got the one resource: {ids:?}");
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-RACE").await, 1);
    assert_eq!(s.get("/fhir/Patient?_summary=count").await.total(), 1, "no other Patient was made");
}

#[tokio::test]
async fn conditional_create_update_and_delete_follow_r4() {
    let s = Server::start("cond-r4");
    let ine = |c: &'static str| [("if-none-exist", c)];
    // Create: none -> 201, one -> 200 with the stored resource (unchanged), several -> 412.
    let first = s.request("POST", "/fhir/Patient", Some(&s.data_key), Some(&patient("MRN-1", "First")), &ine("identifier=urn:mrn|MRN-1")).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = s.request("POST", "/fhir/Patient", Some(&s.data_key), Some(&patient("MRN-1", "Second")), &ine("identifier=urn:mrn|MRN-1")).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!((again.json["id"].clone(), again.json["name"][0]["family"].clone()), (first.json["id"].clone(), json!("First")), "the stored one, unchanged");
    // The header's criteria may come after a relative URL, as some clients send them.
    let url_form = s.request("POST", "/fhir/Patient", Some(&s.data_key), Some(&patient("MRN-1", "Third")), &ine("Patient?identifier=urn:mrn|MRN-1")).await;
    assert_eq!((url_form.status, url_form.json["id"].clone()), (200, first.json["id"].clone()), "{}", url_form.text);
    s.post("/fhir/Patient", &patient("MRN-2", "Twin")).await;
    s.post("/fhir/Patient", &patient("MRN-2", "Twin")).await;
    let two = s.request("POST", "/fhir/Patient", Some(&s.data_key), Some(&patient("MRN-2", "Third")), &ine("identifier=urn:mrn|MRN-2")).await;
    assert!(two.outcome(412).contains("more than one"));
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-2").await, 2, "nothing made by the refused one");
    // A short string is answered exactly by the index, so it may be a condition too.
    let by_name = s.request("POST", "/fhir/Patient", Some(&s.data_key), Some(&patient("MRN-9", "First")), &ine("family=First")).await;
    assert_eq!((by_name.status, by_name.json["id"].clone()), (200, first.json["id"].clone()), "{}", by_name.text);

    // Update by criteria: none -> created, one -> updated, another id in the body -> 400.
    let made = s.put("/fhir/Patient?identifier=urn:mrn|MRN-3", &patient("MRN-3", "Made"), &[]).await;
    assert_eq!(made.status, 201, "{}", made.text);
    let id3 = made.json["id"].as_str().expect("id").to_string();
    let changed = s.put("/fhir/Patient?identifier=urn:mrn|MRN-3", &patient("MRN-3", "Changed"), &[]).await;
    assert_eq!((changed.status, changed.json["id"].as_str(), changed.json["meta"]["versionId"].as_str()), (200, Some(id3.as_str()), Some("2")), "{}", changed.text);
    let mut wrong = patient("MRN-3", "Wrong");
    wrong["id"] = json!("some-other-id");
    assert!(s.put("/fhir/Patient?identifier=urn:mrn|MRN-3", &wrong, &[]).await.outcome(400).contains("not the id"));
    assert!(s.put("/fhir/Patient?identifier=urn:mrn|MRN-2", &patient("MRN-2", "Both"), &[]).await.outcome(412).contains("more than one"));
    assert_eq!(s.get(&format!("/fhir/Patient/{id3}")).await.json["name"][0]["family"], "Changed");

    // Delete by criteria: one -> deleted; then none -> 404 for a service; several -> 412.
    let gone = s.delete("/fhir/Patient?identifier=urn:mrn|MRN-3").await;
    assert_eq!(gone.status, 200, "{}", gone.text);
    s.get(&format!("/fhir/Patient/{id3}")).await.outcome(410);
    s.delete("/fhir/Patient?identifier=urn:mrn|MRN-3").await.outcome(404);
    s.delete("/fhir/Patient?identifier=urn:mrn|MRN-2").await.outcome(412);
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-2").await, 2);
}

#[tokio::test]
async fn a_put_to_a_new_id_creates_it_unless_switched_off() {
    let s = Server::start("upcreate");
    let r = s.put("/fhir/Patient/example", &json!({"resourceType": "Patient", "id": "example", "name": [{"family": "Chalmers"}]}), &[]).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let location = r.header("location").unwrap_or("").to_string();
    assert!(location.ends_with(&format!("127.0.0.1:{}/fhir/Patient/example/_history/1", s.port)), "{location}");
    let again = s.put("/fhir/Patient/example", &json!({"resourceType": "Patient", "id": "example", "name": [{"family": "Chalmers", "given": ["Peter"]}]}), &[]).await;
    assert_eq!((again.status, again.json["meta"]["versionId"].as_str()), (200, Some("2")), "{}", again.text);
    // In a transaction too, with references between the entries' own ids.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "tx-example"}, "request": {"method": "PUT", "url": "Patient/tx-example"}},
        {"resource": {"resourceType": "Observation", "id": "tx-obs", "status": "final", "code": {"text": "pulse"}, "subject": {"reference": "Patient/tx-example"}},
         "request": {"method": "PUT", "url": "Observation/tx-obs"}}]});
    let done = s.post("/fhir", &tx).await;
    assert_eq!(done.status, 200, "{}", done.text);
    let statuses: Vec<&str> = done.json["entry"].as_array().expect("entries").iter().map(|e| e["response"]["status"].as_str().unwrap_or("")).collect();
    assert_eq!(statuses, vec!["201 Created", "201 Created"]);
    assert_eq!(s.get("/fhir/Observation/tx-obs").await.json["subject"]["reference"], "Patient/tx-example");
    // If-Match on an id that does not exist expects a version: nothing is created.
    s.put("/fhir/Patient/never", &json!({"resourceType": "Patient", "id": "never"}), &[("if-match", "W/\"1\"")]).await.outcome(412);
    s.get("/fhir/Patient/never").await.outcome(404);

    let off = Server::start_with("upcreate-off", &[("VALV_FHIR_UPDATE_CREATE", "false")]);
    off.put("/fhir/Patient/client-chosen", &json!({"resourceType": "Patient", "id": "client-chosen"}), &[]).await.outcome(405);
    off.get("/fhir/Patient/client-chosen").await.outcome(404);
}

#[tokio::test]
async fn a_condition_matching_a_patient_the_caller_may_not_see_is_refused_and_recorded_there() {
    let Ward { s, token: t, mine, other, .. } = ward("cond-policy", "Mine", "Other").await;
    let mut hidden = body_for("Observation", &other);
    hidden["identifier"] = json!([{"system": "urn:lab", "value": "L-1"}]);
    create(&s, &hidden).await;
    let mut body = body_for("Observation", &mine);
    body["identifier"] = json!([{"system": "urn:lab", "value": "L-1"}]);
    let denied_before = s.request("GET", &format!("/fhir/AuditEvent?patient={other}&outcome=4"), Some(&s.auditor_key), None, &[]).await.total();
    let r = s.request("POST", "/fhir/Observation", Some(&t), Some(&body), &[("if-none-exist", "identifier=urn:lab|L-1")]).await;
    r.outcome(403);
    assert_eq!(count(&s, "Observation?identifier=urn:lab|L-1").await, 1, "no duplicate made, nothing changed");
    let denied = s.request("GET", &format!("/fhir/AuditEvent?patient={other}&outcome=4"), Some(&s.auditor_key), None, &[]).await;
    assert_eq!(denied.total(), denied_before + 1, "the probe is in the hidden patient's log: {}", denied.text);
    // The same condition on their own patient's data works for them.
    body["identifier"] = json!([{"system": "urn:lab", "value": "L-2"}]);
    let own = s.request("POST", "/fhir/Observation", Some(&t), Some(&body), &[("if-none-exist", "identifier=urn:lab|L-2")]).await;
    assert_eq!(own.status, 201, "{}", own.text);
    let own_again = s.request("POST", "/fhir/Observation", Some(&t), Some(&body), &[("if-none-exist", "identifier=urn:lab|L-2")]).await;
    assert_eq!((own_again.status, own_again.json["id"].clone()), (200, own.json["id"].clone()), "{}", own_again.text);
}

#[tokio::test]
async fn transactions_and_batches_carry_conditions_and_patches() {
    use base64::Engine;
    let s = Server::start("cond-bundles");
    let existing = s.post("/fhir/Patient", &patient("MRN-T1", "Known")).await.id();
    let gone = s.post("/fhir/Patient", &patient("MRN-T3", "Leaving")).await.id();
    let patched = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "active": false})).await.id();
    let ops = base64::engine::general_purpose::STANDARD.encode(br#"[{"op": "replace", "path": "/active", "value": true}]"#);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": patient("MRN-T1", "Again"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|MRN-T1"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"}, "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": patient("MRN-T2", "New"), "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|MRN-T2"}},
        {"request": {"method": "DELETE", "url": "Patient?identifier=urn:mrn|MRN-T3"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": ops},
         "request": {"method": "PATCH", "url": format!("Patient/{patched}")}}]});
    let r = s.post("/fhir", &tx).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = r.json["entry"].as_array().expect("entries");
    let statuses: Vec<&str> = entries.iter().map(|e| e["response"]["status"].as_str().unwrap_or("")).collect();
    assert_eq!(statuses, vec!["200 OK", "201 Created", "201 Created", "204 No Content", "200 OK"]);
    assert_eq!(entries[0]["resource"]["id"], existing.as_str(), "the match, not a new Patient");
    assert_eq!(entries[1]["resource"]["subject"]["reference"], format!("Patient/{existing}"), "the fullUrl stands for the match");
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-T1").await, 1);
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-T2").await, 1);
    s.get(&format!("/fhir/Patient/{gone}")).await.outcome(410);
    assert_eq!(s.get(&format!("/fhir/Patient/{patched}")).await.json["active"], true);

    // A failing condition fails the whole transaction: nothing of it stays.
    s.post("/fhir/Patient", &patient("MRN-T4", "One")).await;
    s.post("/fhir/Patient", &patient("MRN-T4", "Two")).await;
    let failing = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("MRN-T5", "Never"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient("MRN-T4", "Which"), "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|MRN-T4"}}]});
    assert!(s.post("/fhir", &failing).await.outcome(412).contains("Bundle.entry[1]"));
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-T5").await, 0);

    // A batch runs each entry as the request alone would.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("MRN-T1", "Batch"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|MRN-T1"}},
        {"resource": patient("MRN-T6", "Batch"), "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|MRN-T6"}},
        {"resource": patient("MRN-T4", "Batch"), "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|MRN-T4"}},
        {"request": {"method": "DELETE", "url": "Patient?identifier=urn:mrn|MRN-T6"}}]});
    let r = s.post("/fhir", &batch).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let statuses: Vec<String> = r.json["entry"].as_array().expect("entries").iter().map(|e| e["response"]["status"].as_str().unwrap_or("").chars().take(3).collect()).collect();
    assert_eq!(statuses, vec!["200", "201", "412", "200"]);
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-T1").await, 1);
}

#[tokio::test]
async fn concurrent_transactions_with_one_conditional_create_make_one_resource() {
    let s = Server::start("cond-tx-race");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = s.client();
        tasks.push(tokio::spawn(async move {
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222", "resource": patient("MRN-TXR", &format!("Racer{i}")),
                 "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|MRN-TXR"}},
                {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": format!("pulse {i}")}, "subject": {"reference": "urn:uuid:22222222-2222-4222-8222-222222222222"}},
                 "request": {"method": "POST", "url": "Observation"}}]});
            client.try_request("POST", "/fhir", Some(&client.data_key), Some(serde_json::to_vec(&tx).expect("json")), &[]).await.expect("response")
        }));
    }
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "{}", r.text);
    }
    assert_eq!(count(&s, "Patient?identifier=urn:mrn|MRN-TXR").await, 1);
    let p = s.get("/fhir/Patient?identifier=urn:mrn|MRN-TXR").await.entry_ids()[0].clone();
    assert_eq!(count(&s, &format!("Observation?subject=Patient/{p}")).await, 16, "every transaction's Observation is on the one Patient");
}
