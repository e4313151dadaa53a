//! PATCH with JSON Patch (RFC 6902) and JSON Merge Patch (RFC 7386): applied to the current
//! version and written as an update, decided before anything is opened.

use crate::access::{body_for, create, ward, Ward};
use crate::harness::Server;
use serde_json::{json, Value};

const JSON_PATCH: (&str, &str) = ("content-type", "application/json-patch+json");
const MERGE_PATCH: (&str, &str) = ("content-type", "application/merge-patch+json");

async fn patch(s: &Server, path: &str, body: &Value, headers: &[(&str, &str)]) -> crate::harness::Resp {
    s.request_raw("PATCH", path, Some(&s.data_key), Some(serde_json::to_vec(body).expect("json")), headers).await
}

#[tokio::test]
async fn json_and_merge_patches_write_new_versions_and_bad_ones_change_nothing() {
    let s = Server::start("patch");
    let id = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "active": false, "name": [{"family": "Berg", "given": ["Ann"]}]})).await.id();
    let path = format!("/fhir/Patient/{id}");
    let ops = json!([
        {"op": "test", "path": "/name/0/family", "value": "Berg"},
        {"op": "replace", "path": "/active", "value": true},
        {"op": "add", "path": "/name/0/given/-", "value": "Maria"},
        {"op": "add", "path": "/gender", "value": "female"}
    ]);
    let r = patch(&s, &path, &ops, &[JSON_PATCH]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let now = s.get(&path).await.json;
    assert_eq!((now["active"].clone(), now["name"][0]["given"].clone(), now["gender"].clone(), now["meta"]["versionId"].clone()), (json!(true), json!(["Ann", "Maria"]), json!("female"), json!("2")));

    // A merge patch, as its media type says, and as fhirpy sends one (an object as FHIR JSON).
    assert_eq!(patch(&s, &path, &json!({"gender": null, "birthDate": "1970-01-02"}), &[MERGE_PATCH]).await.status, 200);
    assert_eq!(patch(&s, &path, &json!({"active": false}), &[("content-type", "application/fhir+json")]).await.status, 200);
    let now = s.get(&path).await.json;
    assert_eq!((now.get("gender"), now["birthDate"].clone(), now["active"].clone(), now["meta"]["versionId"].clone()), (None, json!("1970-01-02"), json!(false), json!("4")));
    // A FHIRPath Patch (a Parameters body).
    let fhirpath = json!({"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [{"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.name.where(family = 'Berg').given.first()"}, {"name": "value", "valueString": "Annika"}]},
        {"name": "operation", "part": [{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"}, {"name": "name", "valueString": "telecom"},
            {"name": "value", "part": [{"name": "system", "valueCode": "email"}, {"name": "value", "valueString": "a@example.org"}]}]}]});
    let r = patch(&s, &path, &fhirpath, &[("content-type", "application/fhir+json")]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let now = s.get(&path).await.json;
    assert_eq!((now["name"][0]["given"].clone(), now["telecom"].clone(), now["meta"]["versionId"].clone()), (json!(["Annika", "Maria"]), json!([{"system": "email", "value": "a@example.org"}]), json!("5")));

    // Each refused patch changes nothing.
    type Case<'a> = (Value, (&'a str, &'a str), Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (json!([{"op": "test", "path": "/name/0/family", "value": "Lund"}, {"op": "replace", "path": "/active", "value": true}]), JSON_PATCH, vec![], 422, "test failed"),
        (json!([{"op": "remove", "path": "/photo/0"}]), JSON_PATCH, vec![], 422, "no member 'photo'"),
        (json!([{"op": "jump", "path": "/active"}]), JSON_PATCH, vec![], 400, "not a JSON Patch operation"),
        (json!({"op": "replace"}), JSON_PATCH, vec![], 400, "array of operations"),
        (json!([{"op": "replace", "path": "/id", "value": "other"}]), JSON_PATCH, vec![], 422, "resourceType or id"),
        (json!([{"op": "add", "path": "/gender", "value": 12}]), JSON_PATCH, vec![], 400, "gender"),
        (json!([{"op": "replace", "path": "/active", "value": true}]), JSON_PATCH, vec![("if-match", "W/\"1\"")], 412, "version 1"),
        (json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.name.resolve()"}]}]}), ("content-type", "application/fhir+json"), vec![], 400, "more than Valv evaluates"),
        (json!({"active": true}), ("content-type", "text/plain"), vec![], 415, "Content-Type"),
        (json!((0..30).map(|i| json!({"op": "copy", "from": "", "path": format!("/extension{i}")})).collect::<Vec<_>>()), JSON_PATCH, vec![], 422, "would exceed"),
    ];
    for (body, ct, extra, status, says) in cases {
        let mut headers = vec![ct];
        headers.extend(extra);
        let r = patch(&s, &path, &body, &headers).await;
        assert!(r.outcome(status).contains(says), "{body}: {}", r.text);
        assert_eq!(s.get(&path).await.json["meta"]["versionId"], "5", "{body} changed nothing");
    }
    patch(&s, "/fhir/Patient/no-such-one", &json!([]), &[JSON_PATCH]).await.outcome(404);
    s.delete(&path).await;
    patch(&s, &path, &json!([{"op": "replace", "path": "/active", "value": true}]), &[JSON_PATCH]).await.outcome(410);
}

#[tokio::test]
async fn a_patch_is_decided_before_the_resource_is_opened() {
    let Ward { s, token: t, mine, other, .. } = ward("patch-policy", "Mine", "Other").await;
    let theirs = create(&s, &body_for("Observation", &other)).await["id"].as_str().expect("id").to_string();
    let own = create(&s, &body_for("Observation", &mine)).await["id"].as_str().expect("id").to_string();
    let send = |id: String, ops: Value| {
        let (s, t) = (&s, t.clone());
        async move { s.request_raw("PATCH", &format!("/fhir/Observation/{id}"), Some(&t), Some(serde_json::to_vec(&ops).expect("json")), &[JSON_PATCH]).await }
    };
    // A `test` that holds and one that fails answer alike: 403, before anything is opened.
    for value in ["final", "preliminary"] {
        send(theirs.clone(), json!([{"op": "test", "path": "/status", "value": value}])).await.outcome(403);
    }
    assert_eq!(s.get(&format!("/fhir/Observation/{theirs}")).await.json["meta"]["versionId"], "1");
    let r = send(own.clone(), json!([{"op": "replace", "path": "/status", "value": "amended"}])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Moving their own patient's Observation to another patient is decided on that one too.
    send(own.clone(), json!([{"op": "replace", "path": "/subject/reference", "value": format!("Patient/{other}")}])).await.outcome(403);
    assert_eq!(s.get(&format!("/fhir/Observation/{own}")).await.json["subject"]["reference"], format!("Patient/{mine}"));
}
