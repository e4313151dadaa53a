//! A patient's export (`valv export`): Debian's `age -d -i` opens it, the NDJSON holds exactly the
//! patient's resources and each is valid R4, and the access log's proofs verify with Go's sumdb
//! checker against the checkpoint inside; bad requests are refused with one line, no file made.

use crate::harness::{run_refused, run_ok, temp_dir, Server};
use crate::independent::{build_checker, check, settled_checkpoint};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Decrypts with the reference age and unpacks with Python's tarfile: file name -> bytes.
fn open_export(file: &Path, keyfile: &Path) -> BTreeMap<String, Vec<u8>> {
    let tar = Command::new("age").arg("-d").arg("-i").arg(keyfile).arg(file).output().expect("age (apt-get install age)");
    assert!(tar.status.success(), "age -d refused the export: {}", String::from_utf8_lossy(&tar.stderr));
    let dir = file.with_extension("unpacked");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("x.tar"), &tar.stdout).expect("tar");
    let untar = Command::new("tar").arg("-xf").arg("x.tar").current_dir(&dir).output().expect("tar");
    assert!(untar.status.success(), "tar refused the archive: {}", String::from_utf8_lossy(&untar.stderr));
    std::fs::remove_file(dir.join("x.tar")).expect("rm");
    std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry")).map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read"))).collect()
}

fn refused(s: &Server, args: &[&str]) -> String {
    run_refused(&s.data, &[&["export"], args].concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_opens_with_age_parses_as_r4_and_its_access_log_verifies_with_go() {
    let s = Server::start("export");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Exportsson"}]})).await.id();
    let other = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Otherberg"}]})).await.id();
    let mut mine = vec![format!("Patient/{p}")];
    for i in 0..3 {
        let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("obs {i}")}, "subject": {"reference": format!("Patient/{p}")}})).await;
        mine.push(format!("Observation/{}", o.id()));
    }
    s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "theirs"}, "subject": {"reference": format!("Patient/{other}")}})).await;
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200, "an access for the log");
    settled_checkpoint(&s).await;

    let work = temp_dir("export-work");
    let keyfile = work.join("patient.key");
    assert!(Command::new("age-keygen").arg("-o").arg(&keyfile).output().expect("age-keygen").status.success());
    let recipient = std::fs::read_to_string(&keyfile).expect("key").lines().find_map(|l| l.strip_prefix("# public key: ")).expect("public key line").to_string();
    let out = work.join("record.age");
    let printed = run_ok(&s.data, &["export", "--patient", &p, "--recipient", &recipient, "--out", out.to_str().expect("path")]);
    assert!(printed.contains("4 resources"), "{printed}");

    let files = open_export(&out, &keyfile);
    for name in ["README.txt", "access-log.json", "checkpoint.txt", "log-key.vkey", "Patient.ndjson", "Observation.ndjson"] {
        assert!(files.contains_key(name), "{name} in {:?}", files.keys());
    }
    let mut found = Vec::new();
    for (name, bytes) in files.iter().filter(|(n, _)| n.ends_with(".ndjson")) {
        for line in std::str::from_utf8(bytes).expect("utf-8").lines() {
            let r: Value = serde_json::from_str(line).expect("one JSON resource per line");
            valv_fhir::r4::validate(&r).unwrap_or_else(|e| panic!("{name}: not valid R4: {e}"));
            found.push(format!("{}/{}", r["resourceType"].as_str().expect("type"), r["id"].as_str().expect("id")));
        }
    }
    found.sort();
    mine.sort();
    assert_eq!(found, mine, "exactly the patient's resources");
    let all = files.values().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<String>();
    assert!(!all.contains(&other) && !all.contains("Otherberg"), "nothing of another patient");

    // The access log: every proven entry verifies with Go's sumdb against the checkpoint inside.
    let log: Value = serde_json::from_slice(&files["access-log.json"]).expect("json");
    let params = log["parameter"].as_array().expect("parameters");
    let gocheck = work.join("gocheck");
    std::fs::create_dir_all(&gocheck).expect("dir");
    std::fs::write(gocheck.join("checkpoint"), &files["checkpoint.txt"]).expect("write");
    let vkey = String::from_utf8(files["log-key.vkey"].clone()).expect("vkey");
    let mut spec = vec![format!("vkey {}", vkey.trim()), "checkpoint checkpoint".to_string()];
    for entry in params.iter().filter(|x| x["name"] == "entry") {
        let parts = entry["part"].as_array().expect("parts");
        let part = |n: &str| parts.iter().find(|x| x["name"] == n);
        if part("pending").is_some() {
            continue;
        }
        let canonical = part("canonical").and_then(|x| x["valueString"].as_str()).expect("canonical");
        let leaf = B64.encode(valv_audit::merkle::leaf_hash(canonical.as_bytes()));
        let index = part("index").and_then(|x| x["valueString"].as_str()).expect("index");
        let proof = parts.iter().filter(|x| x["name"] == "proof").map(|x| x["valueBase64Binary"].as_str().expect("b64").to_string());
        spec.push(std::iter::once(format!("inclusion {index} {leaf}")).chain(proof).collect::<Vec<_>>().join(" "));
    }
    assert!(spec.len() >= 2 + 5, "the creates and the read are proven: {spec:?}");
    let bin = build_checker(&gocheck);
    let (code, report) = check(&bin, &gocheck, "export", &spec);
    assert_eq!(code, 0, "Go's sumdb rejects the export's access log:\n{report}");

    // The export itself is audited.
    assert!(run_ok(&s.data, &["audit", "export"]).contains("\"export\""), "the export is an audit entry");

    // Refusals: one line each, no file left.
    let again = work.join("again.age");
    let again_s = again.to_str().expect("path");
    assert!(refused(&s, &["--patient", &p, "--recipient", &recipient, "--out", out.to_str().expect("path")]).contains("exists"));
    assert!(refused(&s, &["--patient", &p, "--recipient", "age1notakey", "--out", again_s]).contains("--recipient"));
    assert!(refused(&s, &["--patient", "nobody-here", "--recipient", &recipient, "--out", again_s]).contains("no patient"));
    assert!(refused(&s, &["--patient", "../etc", "--recipient", &recipient, "--out", again_s]).contains("not a FHIR id"));
    assert!(!again.exists(), "a refused export writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_record_over_http_answers_an_age_file_to_those_who_may_read_the_record() {
    let s = Server::start_configured("export-http", &[], crate::identity::FAST);
    let mut now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64;
    s.set_clock(now);
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Httpexport"}]})).await.id();
    let people = crate::access::people(&s, &mut now, &[("httpexport".to_string(), "patient", vec![], None, Some(p.clone()))]).await;
    let patient_token = people["httpexport"].token.clone();
    let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}})).await.id();
    let work = temp_dir("export-http-work");
    let keyfile = work.join("patient.key");
    assert!(Command::new("age-keygen").arg("-o").arg(&keyfile).output().expect("age-keygen").status.success());
    let recipient = std::fs::read_to_string(&keyfile).expect("key").lines().find_map(|l| l.strip_prefix("# public key: ")).expect("public key").to_string();
    let params = |r: &str| json!({"resourceType": "Parameters", "parameter": [{"name": "recipient", "valueString": r}]});
    let path = format!("/fhir/Patient/{p}/$export-record");

    // The patient themself: their resources and who accessed them.
    let r = s.request("POST", &path, Some(&patient_token), Some(&params(&recipient)), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let file = work.join("record.age");
    std::fs::write(&file, &r.bytes).expect("write");
    let files = open_export(&file, &keyfile);
    let obs = String::from_utf8(files["Observation.ndjson"].clone()).expect("utf-8");
    assert!(obs.contains(&o), "{obs}");
    assert!(files.contains_key("access-log.json"), "the patient may see their access log: {:?}", files.keys());

    // A service that may read the record but not the audit log gets the record without the log.
    let r = s.request("POST", &path, Some(&s.data_key), Some(&params(&recipient)), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let file = work.join("record-service.age");
    std::fs::write(&file, &r.bytes).expect("write");
    let files = open_export(&file, &keyfile);
    assert!(files.contains_key("Observation.ndjson") && !files.contains_key("access-log.json"), "no access log for a service: {:?}", files.keys());

    // Bad requests: 400 with an OperationOutcome; no access: 403; unknown: 404.
    let bad = s.request("POST", &path, Some(&s.data_key), Some(&params("age1nope")), &[]).await;
    assert_eq!((bad.status, bad.json["resourceType"].as_str()), (400, Some("OperationOutcome")), "{}", bad.text);
    let none = s.request("POST", &path, Some(&s.data_key), Some(&json!({"resourceType": "Parameters"})), &[]).await;
    assert_eq!(none.status, 400, "{}", none.text);
    let auditor = s.request("POST", &path, Some(&s.auditor_key), Some(&params(&recipient)), &[]).await;
    assert_eq!(auditor.status, 403, "an auditor does not read patient records: {}", auditor.text);
    let unknown = s.request("POST", "/fhir/Patient/nobody/$export-record", Some(&s.data_key), Some(&params(&recipient)), &[]).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
}
