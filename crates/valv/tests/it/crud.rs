//! Create, read, vread, update with If-Match, delete, history, metadata and credentials.

use crate::harness::Server;
use serde_json::json;

#[tokio::test]
async fn metadata_is_open_and_fhir_needs_a_credential() {
    let s = Server::start("meta");
    let m = s.request("GET", "/fhir/metadata", None, None, &[]).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.json["resourceType"], "CapabilityStatement");
    assert_eq!(m.json["fhirVersion"], "4.0.1");
    assert_eq!(m.header("strict-transport-security"), Some("max-age=63072000; includeSubDomains"));
    assert_eq!(m.header("x-content-type-options"), Some("nosniff"));
    let none = s.request("GET", "/fhir/Patient", None, None, &[]).await;
    none.outcome(401);
    let bad = s.request("GET", "/fhir/Patient", Some("valv_0000000000000000000000000000000000000000000000000000000000000000"), None, &[]).await;
    bad.outcome(401);
    assert_eq!(s.request("GET", "/healthz", None, None, &[]).await.status, 200);
    assert_eq!(s.request("GET", "/readyz", None, None, &[]).await.status, 200);
}

#[tokio::test]
async fn api_keys_can_be_created_used_and_revoked() {
    let s = Server::start("apikey");
    let unscoped = crate::harness::valv().arg("--data-dir").arg(&s.data).args(["apikey", "create", "--name", "x", "--role", "service"]).output().expect("run");
    assert!(!unscoped.status.success() && String::from_utf8_lossy(&unscoped.stderr).contains("--scope"), "a service key needs scopes");
    let bad = crate::harness::valv().arg("--data-dir").arg(&s.data).args(["apikey", "create", "--name", "x", "--role", "service", "--scope", "system/Patient.zz"]).output().expect("run");
    assert!(!bad.status.success(), "malformed scopes are refused");
    let out = crate::harness::run_ok(&s.data, &["apikey", "create", "--name", "importer", "--role", "service", "--scope", "system/Patient.rs"]);
    let key = crate::harness::last_line(&out);
    assert_eq!(s.request("GET", "/fhir/Patient", Some(&key), None, &[]).await.status, 200);
    let write = s.request("POST", "/fhir/Patient", Some(&key), Some(&json!({"resourceType":"Patient"})), &[]).await;
    assert!(write.outcome(403).contains("smart-scopes") || write.text.contains("no-policy-permits"), "the key's scopes allow no create: {}", write.text);
    let listed = crate::harness::run_ok(&s.data, &["apikey", "list"]);
    assert!(listed.contains("importer") && !listed.contains(&key), "list shows names, never keys");
    crate::harness::run_ok(&s.data, &["apikey", "revoke", "importer"]);
    // On PostgreSQL the server's credential cache hears of the revocation by a notification
    // that arrives after the command's commit (milliseconds later: docs/OPERATIONS.md); give it
    // one second, then it must be refused for good.
    let start = std::time::Instant::now();
    while s.request("GET", "/fhir/Patient", Some(&key), None, &[]).await.status == 200 && start.elapsed() < std::time::Duration::from_secs(1) {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for _ in 0..3 {
        s.request("GET", "/fhir/Patient", Some(&key), None, &[]).await.outcome(401);
    }
}

#[tokio::test]
async fn crud_versions_if_match_and_history() {
    let s = Server::start("crud");
    let created = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Berg"}],"gender":"female"})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.id();
    assert_eq!(created.header("etag"), Some("W/\"1\""));
    assert!(created.header("location").is_some_and(|l| l.ends_with(&format!("/fhir/Patient/{id}/_history/1"))));
    assert!(created.header("last-modified").is_some());
    assert_eq!(created.json["meta"]["versionId"], "1");

    let read = s.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.json["name"][0]["family"], "Berg");

    let mut body = read.json.clone();
    body["name"][0]["family"] = json!("Lind");
    let updated = s.put(&format!("/fhir/Patient/{id}"), &body, &[("if-match", "W/\"1\"")]).await;
    assert_eq!(updated.status, 200, "{}", updated.text);
    assert_eq!(updated.json["meta"]["versionId"], "2");

    // A stale If-Match loses, and changes nothing.
    body["name"][0]["family"] = json!("Stale");
    let stale = s.put(&format!("/fhir/Patient/{id}"), &body, &[("if-match", "W/\"1\"")]).await;
    stale.outcome(412);
    assert_eq!(s.get(&format!("/fhir/Patient/{id}")).await.json["name"][0]["family"], "Lind");

    let v1 = s.get(&format!("/fhir/Patient/{id}/_history/1")).await;
    assert_eq!(v1.json["name"][0]["family"], "Berg");
    s.get(&format!("/fhir/Patient/{id}/_history/9")).await.outcome(404);

    let del = s.delete(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(del.status, 200, "{}", del.text);
    s.get(&format!("/fhir/Patient/{id}")).await.outcome(410);
    assert_eq!(s.get(&format!("/fhir/Patient/{id}/_history/2")).await.json["name"][0]["family"], "Lind");

    let hist = s.get(&format!("/fhir/Patient/{id}/_history")).await;
    assert_eq!(hist.status, 200);
    assert_eq!(hist.json["type"], "history");
    assert_eq!(hist.total(), 3);
    let methods: Vec<&str> = hist.json["entry"].as_array().expect("entries").iter().filter_map(|e| e["request"]["method"].as_str()).collect();
    assert_eq!(methods, vec!["DELETE", "PUT", "POST"], "newest first");

    let type_hist = s.get("/fhir/Patient/_history").await;
    assert_eq!(type_hist.total(), 3);
    // Update after delete brings the resource back as a new version.
    body["name"][0]["family"] = json!("Back");
    let back = s.put(&format!("/fhir/Patient/{id}"), &body, &[]).await;
    assert_eq!(back.status, 200, "{}", back.text);
    assert_eq!(back.json["meta"]["versionId"], "4");
}

#[tokio::test]
async fn concurrent_updates_never_lose_one_silently() {
    let s = Server::start("race");
    let id = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (client, id) = (s.client(), id.clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!({"resourceType":"Patient","id":id,"name":[{"family":format!("W{i}")}]})).expect("json");
            client.try_request("PUT", &format!("/fhir/Patient/{id}"), Some(&client.data_key), Some(body), &[]).await.expect("response")
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            200 => ok += 1,
            409 => assert_eq!(r.json["issue"][0]["code"], "conflict", "{}", r.text),
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    // Every acknowledged update is a version of its own: none overwrote another unseen.
    let now = s.get(&format!("/fhir/Patient/{id}")).await;
    assert_eq!(now.json["meta"]["versionId"], (1 + ok).to_string());
    assert_eq!(s.get(&format!("/fhir/Patient/{id}/_history")).await.total(), 1 + ok as u64);
}

#[tokio::test]
async fn first_start_initialises_prints_the_key_once_and_serves_demo_data() {
    use std::io::{BufRead, BufReader};
    let dir = crate::harness::temp_dir("firststart");
    let data = dir.join("valv-data");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut child = crate::harness::valv()
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--demo", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut key = String::new();
    let mut serving = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if line.starts_with("valv_") {
            key = line.trim().to_string();
        }
        if line.contains("serving HTTPS") {
            serving = true;
            break;
        }
    }
    assert!(serving && key.len() == 69, "first start prints the admin key, then serves");
    let mode = |p: &str| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data.join(p)).expect("file").permissions()) & 0o777;
    assert_eq!(mode("keys/kek.key"), 0o600);
    assert_eq!(mode("valv.db"), 0o600);
    assert_eq!(mode("valv-audit.db"), 0o600);
    assert_eq!(mode("valv-audit.db-wal"), 0o600, "SQLite's files take the mode of the file they belong to");
    assert_eq!(mode("tls/key.pem"), 0o600);
    assert_eq!(mode("."), 0o700);
    // A server handle for requests; the process is ours, so the harness must not kill another.
    let reader = crate::harness::last_line(&crate::harness::run_ok(&data, &["apikey", "create", "--name", "counter", "--role", "service", "--scope", "system/Patient.s"]));
    let tls = crate::harness::Server::client_for(&data, port, &reader);
    let meta = tls.try_request("GET", "/fhir/metadata", None, None, &[]).await.expect("metadata");
    assert_eq!(meta.status, 200);
    let by_admin = tls.try_request("GET", "/fhir/Patient?_summary=count", Some(&key), None, &[]).await.expect("count");
    assert_eq!(by_admin.status, 403, "the admin key manages users and configuration, never patient data: {}", by_admin.text);
    let patients = tls.try_request("GET", "/fhir/Patient?_summary=count", Some(&reader), None, &[]).await.expect("count");
    assert_eq!(patients.json["total"], 20, "--demo loads 20 synthetic patients");
    let _ = child.kill();
    let _ = child.wait();
    // A second start prints no key: it is shown once.
    let again = crate::harness::valv().arg("--data-dir").arg(&data).args(["apikey", "list"]).output().expect("list");
    assert!(!String::from_utf8_lossy(&again.stdout).contains("valv_"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn decimals_keep_their_precision_and_form() {
    let s = Server::start("decimals");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    // Sent as text so that no JSON library on this side rounds or reformats them.
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final","code":{{"text":"precise"}},"subject":{{"reference":"Patient/{p}"}},
            "valueQuantity":{{"value":1.50,"unit":"mg"}},
            "component":[{{"code":{{"text":"a"}},"valueQuantity":{{"value":0.123456789012345678}}}},
                         {{"code":{{"text":"b"}},"valueQuantity":{{"value":12345678901234567890.10}}}},
                         {{"code":{{"text":"c"}},"valueQuantity":{{"value":1.0e-7}}}},
                         {{"code":{{"text":"d"}},"valueInteger":3}}]}}"#
    );
    let created = s.request_raw("POST", "/fhir/Observation", Some(&s.data_key), Some(body.into_bytes()), &[("content-type", "application/fhir+json")]).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.id();
    for text in [s.get(&format!("/fhir/Observation/{id}")).await.text, s.get(&format!("/fhir/Observation/{id}/_history/1")).await.text, s.get(&format!("/fhir/Observation?_id={id}")).await.text, created.text] {
        for written in ["\"value\":1.50", "0.123456789012345678", "12345678901234567890.10", "1.0e-7", "\"valueInteger\":3"] {
            assert!(text.contains(written), "{written} kept as sent: {text}");
        }
    }
    // _pretty=true indents, and changes no value.
    let pretty = s.get(&format!("/fhir/Observation/{id}?_pretty=true")).await;
    assert!(pretty.text.contains("\n  \"resourceType\": \"Observation\"") && pretty.text.contains("\"value\": 1.50"), "{}", pretty.text);
    // Not a decimal where R4 wants an integer.
    let bad = format!(r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"subject":{{"reference":"Patient/{p}"}},"valueInteger":3.0}}"#);
    s.request_raw("POST", "/fhir/Observation", Some(&s.data_key), Some(bad.into_bytes()), &[("content-type", "application/fhir+json")]).await.outcome(400);
}
