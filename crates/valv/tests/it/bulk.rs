//! Bulk Data `$export` (IG v2): asynchronous kick-off, status, manifest, sealed NDJSON files
//! downloaded with the caller's credential, decided per patient, audited, cancelled, expired.

use crate::access::{create, ward, Ward};
use crate::harness::{Resp, Server};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const ASYNC: &[(&str, &str)] = &[("prefer", "respond-async"), ("accept", "application/fhir+json")];

fn observation(patient: &str, code: &str) -> Value {
    let mut o = json!({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{patient}")}});
    // Parsed, not a Rust literal: the trailing zero must reach the server.
    o["valueQuantity"] = serde_json::from_str(r#"{"value": 1.50, "unit": "mg"}"#).expect("JSON");
    o
}

/// The path of an absolute URL the server gave.
fn path_of(url: &str) -> String {
    url[url.find("/fhir/").unwrap_or_else(|| panic!("not a FHIR URL: {url}"))..].to_string()
}

/// Kicks off an export as `key` and returns its status path.
async fn kick_off(s: &Server, key: &str, path: &str) -> String {
    let r = s.request("GET", path, Some(key), None, ASYNC).await;
    assert_eq!(r.status, 202, "{path}: {}", r.text);
    path_of(r.header("content-location").expect("Content-Location"))
}

/// Polls until the job is no longer running; every 202 carries its progress and a wait.
async fn finished(s: &Server, key: &str, status: &str) -> Resp {
    for _ in 0..300 {
        let r = s.request("GET", status, Some(key), None, &[]).await;
        if r.status != 202 {
            return r;
        }
        assert!(r.header("retry-after").is_some() && r.header("x-progress").is_some(), "202 without Retry-After/X-Progress: {:?}", r.headers);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the export did not finish in 30 s");
}

/// Every resource of every file of a finished export, each line checked to be valid R4 JSON.
async fn download(s: &Server, key: &str, manifest: &Resp) -> Vec<Value> {
    assert_eq!(manifest.status, 200, "{}", manifest.text);
    assert_eq!(manifest.json["requiresAccessToken"], true);
    assert!(manifest.json["transactionTime"].as_str().is_some_and(|t| valv_fhir::date::parse(t).is_ok()), "{}", manifest.text);
    assert!(manifest.json["request"].as_str().is_some_and(|r| r.contains("$export")), "{}", manifest.text);
    let mut all = Vec::new();
    for out in manifest.json["output"].as_array().expect("output") {
        let r = s.request("GET", &path_of(out["url"].as_str().expect("url")), Some(key), None, &[("accept", "application/fhir+ndjson")]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("content-type"), Some("application/fhir+ndjson"));
        assert!(r.text.ends_with('\n'), "NDJSON ends each line");
        let lines: Vec<Value> = r.text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
        assert_eq!(lines.len() as u64, out["count"].as_u64().expect("count"), "the manifest's count");
        for res in &lines {
            assert_eq!(res["resourceType"], out["type"], "one type per file");
            valv_fhir::r4::validate(res).unwrap_or_else(|e| panic!("invalid R4 ({e:?}): {res}"));
        }
        all.extend(lines);
    }
    all
}

/// How many audit entries record an export of the patient's data.
async fn exports_recorded(s: &Server, patient: &str) -> usize {
    let r = s.request("GET", &format!("/fhir/AuditEvent?patient={patient}&_count=1000"), Some(&s.auditor_key), None, &[]).await;
    r.json["entry"].as_array().expect("entries").iter().filter(|e| e["resource"]["subtype"][0]["code"] == "export").count()
}

fn ids_of(resources: &[Value], resource_type: &str) -> BTreeSet<String> {
    resources.iter().filter(|r| r["resourceType"] == resource_type).filter_map(|r| r["id"].as_str().map(str::to_string)).collect()
}

#[tokio::test]
async fn bulk_export_holds_only_what_the_caller_may_read() {
    let Ward { s, token: t, mine, other, .. } = ward("bulk", "Bulkson", "Otherbulk").await;
    let mut mine_obs = BTreeSet::new();
    for code in ["a", "b", "c"] {
        mine_obs.insert(create(&s, &observation(&mine, code)).await["id"].as_str().expect("id").to_string());
    }
    for code in ["x", "y"] {
        create(&s, &observation(&other, code)).await;
    }

    // The physician's system-level export: their patient's data, none of the other's.
    let status = kick_off(&s, &t, "/fhir/$export").await;
    let manifest = finished(&s, &t, &status).await;
    let got = download(&s, &t, &manifest).await;
    assert_eq!(ids_of(&got, "Patient"), BTreeSet::from([mine.clone()]), "{}", manifest.text);
    assert_eq!(ids_of(&got, "Observation"), mine_obs);
    assert!(got.iter().all(|r| !r.to_string().contains(&other)), "nothing of the other patient");
    let exported = got.iter().find(|r| r["resourceType"] == "Observation").expect("an Observation");
    assert_eq!(exported["valueQuantity"]["value"].to_string(), "1.50", "decimals exactly as stored");
    // One entry per type exported: Patient, Observation and the care team.
    assert_eq!(exports_recorded(&s, &mine).await, 3, "the export is in the patient's access log");
    assert_eq!(exports_recorded(&s, &other).await, 0, "nothing was exported of the other patient");

    // The files are sealed at rest: the job's folder holds age files, not the record.
    let job = status.rsplit('/').next().expect("job id").to_string();
    let folder = s.data.join("exports").join(&job);
    let mut sealed = Vec::new();
    for entry in std::fs::read_dir(&folder).expect("the job's folder") {
        let path = entry.expect("entry").path();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777, 0o600, "{}", path.display());
        sealed.push(std::fs::read(&path).expect("read"));
    }
    assert!(!sealed.is_empty());
    for f in &sealed {
        assert!(f.starts_with(b"age-encryption.org/v1\n"), "an age file");
        assert!(!String::from_utf8_lossy(f).contains("Bulkson") && !String::from_utf8_lossy(f).contains(&mine), "nothing readable");
    }

    // Only the caller reaches the job: another credential gets 404, none gets 401.
    let file = path_of(manifest.json["output"][0]["url"].as_str().expect("url"));
    s.request("GET", &status, Some(&s.data_key), None, &[]).await.outcome(404);
    s.request("GET", &file, Some(&s.data_key), None, &[]).await.outcome(404);
    assert_eq!(s.request("GET", &file, None, None, &[]).await.status, 401);
    s.request("GET", &format!("{file}9"), Some(&t), None, &[]).await.outcome(404);

    // DELETE removes the files; the job is gone.
    assert_eq!(s.request("DELETE", &status, Some(&t), None, &[]).await.status, 202);
    s.request("GET", &status, Some(&t), None, &[]).await.outcome(404);
    s.request("GET", &file, Some(&t), None, &[]).await.outcome(404);
    assert!(!folder.exists(), "the files are deleted");

    // A Group's export holds its members the caller may read.
    let group = create(&s, &json!({"resourceType": "Group", "type": "person", "actual": true,
        "member": [{"entity": {"reference": format!("Patient/{mine}")}}, {"entity": {"reference": format!("Patient/{other}")}}]})).await;
    let gid = group["id"].as_str().expect("id");
    let all = download(&s, &s.data_key, &finished(&s, &s.data_key, &kick_off(&s, &s.data_key, &format!("/fhir/Group/{gid}/$export?_type=Patient,Observation")).await).await).await;
    assert_eq!(ids_of(&all, "Patient"), BTreeSet::from([mine.clone(), other.clone()]));
    assert_eq!(ids_of(&all, "Observation").len(), 5);
    let theirs = download(&s, &t, &finished(&s, &t, &kick_off(&s, &t, &format!("/fhir/Group/{gid}/$export?_type=Patient,Observation")).await).await).await;
    assert_eq!(ids_of(&theirs, "Patient"), BTreeSet::from([mine.clone()]));
    assert_eq!(ids_of(&theirs, "Observation"), mine_obs);
}

#[tokio::test]
async fn bulk_export_parameters_errors_and_expiry() {
    let s = Server::start("bulkparams");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Paramsson"}]})).await.id();
    for code in ["a", "b"] {
        assert_eq!(s.post("/fhir/Observation", &observation(&p, code)).await.status, 201);
    }
    let key = s.data_key.clone();
    // Each run deletes its job after the download (a caller keeps three at most).
    let run = |path: &'static str| {
        let (s, key) = (&s, key.clone());
        async move {
            let status = kick_off(s, &key, path).await;
            let got = download(s, &key, &finished(s, &key, &status).await).await;
            assert_eq!(s.request("DELETE", &status, Some(&key), None, &[]).await.status, 202);
            got
        }
    };
    let filtered = run("/fhir/Patient/$export?_type=Observation&_typeFilter=Observation%3Fcode%3Da").await;
    assert_eq!(filtered.len(), 1, "{filtered:?}");
    assert_eq!(filtered[0]["code"]["coding"][0]["code"], "a");
    assert!(run("/fhir/$export?_since=2999-01-01T00:00:00Z").await.is_empty(), "nothing changed since then");
    let both = run("/fhir/$export?_type=Patient,Observation&_outputFormat=application%2Ffhir%2Bndjson").await;
    assert_eq!(both.len(), 3);
    // POST with Parameters.
    let body = json!({"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Patient"}]});
    let r = s.request("POST", "/fhir/$export", Some(&key), Some(&body), ASYNC).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let posted_status = path_of(r.header("content-location").expect("location"));
    let posted = download(&s, &key, &finished(&s, &key, &posted_status).await).await;
    assert_eq!(ids_of(&posted, "Patient"), BTreeSet::from([p.clone()]));
    assert_eq!(s.request("DELETE", &posted_status, Some(&key), None, &[]).await.status, 202);

    // Eight kick-offs at once by one caller: the limits are checked and the slot taken under
    // one lock, so they cannot all pass. One job is accepted while it is queued or running; a
    // one-Patient job can end between two kick-offs and the next is then accepted too, but never
    // beyond the three a caller keeps. Every refusal says when to retry.
    let mut racing = Vec::new();
    for _ in 0..8 {
        let (c, key) = (s.client(), key.clone());
        racing.push(tokio::spawn(async move { c.try_request("GET", "/fhir/$export?_type=Patient", Some(&key), None, ASYNC).await.expect("request") }));
    }
    let mut accepted = Vec::new();
    for r in racing {
        let r = r.await.expect("task");
        match r.status {
            202 => accepted.push(path_of(r.header("content-location").expect("location"))),
            429 => assert!(r.header("retry-after").is_some()),
            other => panic!("{other}: {}", r.text),
        }
    }
    assert!((1..=3).contains(&accepted.len()), "one running job per caller, three kept at most: {} accepted", accepted.len());
    // A caller keeps three jobs at most.
    let mut kept = Vec::new();
    for status in accepted {
        assert_eq!(finished(&s, &key, &status).await.status, 200);
        kept.push(status);
    }
    while kept.len() < 3 {
        let status = kick_off(&s, &key, "/fhir/$export?_type=Patient").await;
        assert_eq!(finished(&s, &key, &status).await.status, 200);
        kept.push(status);
    }
    s.request("GET", "/fhir/$export?_type=Patient", Some(&key), None, ASYNC).await.outcome(429);
    for status in &kept {
        assert_eq!(s.request("DELETE", status, Some(&key), None, &[]).await.status, 202);
    }

    // Refused precisely, nothing started.
    s.request("GET", "/fhir/$export", Some(&key), None, &[]).await.outcome(400);
    for bad in ["_outputFormat=text%2Fcsv", "_type=Nope", "_elements=id", "_typeFilter=Observation%3F_sort%3Ddate", "_typeFilter=Observation", "_type=Patient&_typeFilter=Observation%3Fcode%3Da", "_since=yesterday"] {
        s.request("GET", &format!("/fhir/$export?{bad}"), Some(&key), None, ASYNC).await.outcome(400);
    }
    s.request("GET", "/fhir/Group/nobody/$export", Some(&key), None, ASYNC).await.outcome(404);
    s.request("GET", "/fhir/$export-status/nothing", Some(&key), None, &[]).await.outcome(404);
    assert_eq!(s.request("PUT", "/fhir/$export-status/nothing", Some(&key), Some(&json!({})), &[]).await.status, 405);

    // Files are deleted when the export expires (an hour by default).
    let status = kick_off(&s, &key, "/fhir/$export?_type=Patient").await;
    assert_eq!(finished(&s, &key, &status).await.status, 200);
    let folder = s.data.join("exports").join(status.rsplit('/').next().expect("job"));
    assert!(folder.exists());
    s.set_clock(valv_server::now_ms() + 2 * 3600 * 1000);
    s.request("GET", &status, Some(&key), None, &[]).await.outcome(404);
    assert!(!folder.exists(), "expired files are deleted");
}

#[tokio::test]
async fn an_export_holding_an_erased_patient_is_deleted() {
    let s = Server::start("bulkerase");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Goneberg"}]})).await.id();
    assert_eq!(s.post("/fhir/Observation", &observation(&p, "a")).await.status, 201);
    let key = s.data_key.clone();
    let status = kick_off(&s, &key, "/fhir/$export?_type=Observation").await;
    let manifest = finished(&s, &key, &status).await;
    assert_eq!(download(&s, &key, &manifest).await.len(), 1);
    let folder = s.data.join("exports").join(status.rsplit('/').next().expect("job"));
    crate::harness::run_ok(&s.data, &["erase", "--patient", &p, "--reason", "GDPR Art. 17 test"]);
    // The server takes the erasure in within its refresh; then the job and its files are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = 0;
    while std::time::Instant::now() < deadline {
        last = s.request("GET", &status, Some(&key), None, &[]).await.status;
        if last == 404 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(last, 404, "the job is deleted");
    assert!(!folder.exists(), "its files are deleted");
}
