//! KEK rotation with the local key file (issue "lifecycle"): `valv keys rotate` while the server
//! serves, the server's background rewrap, `--wait`, retiring an old version only once nothing
//! needs it, and data still readable after a restart with only the new version.

use crate::harness::{run_ok, run_ok_env, run_refused, valv, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn status(s: &Server) -> Value {
    status_env(s, &[])
}

/// `valv keys status --format json`, with the environment the provider needs.
pub(crate) fn status_env(s: &Server, env: &[(&str, &str)]) -> Value {
    serde_json::from_str(&run_ok_env(&s.data, &["keys", "status", "--format", "json"], env)).expect("status is JSON")
}

/// Waits (30 s at most) until the running server has rewrapped every key; returns the status.
pub(crate) async fn wait_rewrapped(s: &Server, env: &[(&str, &str)]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status_env(s, env);
        if st["to_rewrap"] == 0 || Instant::now() > deadline {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn keys_under(status: &Value, version: u64) -> u64 {
    status["versions"].as_array().expect("versions").iter().find(|v| v["version"] == version).map_or(0, |v| v["data_keys"].as_u64().expect("count"))
}

fn refused(s: &Server, args: &[&str]) -> String {
    run_refused(&s.data, &[&["keys"], args].concat())
}

fn key_file(s: &Server) -> String {
    std::fs::read_to_string(s.data.join("keys/kek.key")).expect("key file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewraps_in_the_background_and_old_versions_retire_only_when_unused() {
    let mut s = Server::start("keys");
    let mut patients = Vec::new();
    for i in 0..5 {
        let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": format!("Rotation{i}")}]})).await;
        assert_eq!(p.status, 201, "{}", p.text);
        let id = p.id();
        let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{id}")}})).await;
        assert_eq!(o.status, 201, "{}", o.text);
        patients.push((id, o.id()));
    }
    let before = status(&s);
    assert_eq!(before["current_version"], 1);
    let total = keys_under(&before, 1);
    assert!(total >= 5 + 5, "patients' keys and the named keys: {before}");
    assert_eq!(before["to_rewrap"], 0);
    let kek_id = before["kek_id"].as_str().expect("kek id").to_string();
    assert!(kek_id.starts_with("file-"), "{kek_id}");

    // The version in use cannot be retired.
    assert!(refused(&s, &["retire", "1"]).contains("current"));

    // Rotate without waiting: the running server notices and rewraps everything.
    let out = run_ok(&s.data, &["keys", "rotate"]);
    assert!(out.contains("version 2 is now current"), "{out}");
    let after = wait_rewrapped(&s, &[]).await;
    assert_eq!(after["to_rewrap"], 0, "the server rewrapped every key: {after}");
    assert_eq!((keys_under(&after, 1), keys_under(&after, 2)), (0, total), "{after}");
    assert_eq!(after["kek_id"], kek_id.as_str(), "the KEK id stays across rotations");
    let metrics = s.get("/metrics").await.text;
    assert!(metrics.lines().any(|l| l.starts_with("valv_keys_rewrapped_total ") && !l.ends_with(" 0")), "{metrics}");

    // A patient created now gets a key under version 2 at once.
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await;
    assert_eq!(p.status, 201);
    assert_eq!(keys_under(&status(&s), 2), total + 1);

    // Version 1 is unused: retire it; the key file no longer holds it.
    run_ok(&s.data, &["keys", "retire", "1"]);
    assert!(!key_file(&s).contains("valv-kek-v1 1 "), "version 1 destroyed");
    assert!(refused(&s, &["retire", "1"]).contains("no KEK version 1"));

    // After a restart (nothing cached) every record reads with version 2 alone.
    s.restart();
    for (patient, observation) in &patients {
        assert_eq!(s.get(&format!("/fhir/Patient/{patient}")).await.status, 200);
        assert_eq!(s.get(&format!("/fhir/Observation/{observation}")).await.status, 200);
    }

    // Both are in the audit log, by the console operator.
    let log = run_ok(&s.data, &["audit", "export", "--format", "jsonl"]);
    assert!(log.contains("key-rotate") && log.contains("key-retire"), "rotation and retirement are audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_wait_rewraps_without_a_server_and_a_version_still_in_use_is_kept() {
    let mut s = Server::start("keys-wait");
    for _ in 0..3 {
        assert_eq!(s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.status, 201);
    }
    s.kill9();
    // Rotate twice without a server: nothing is rewrapped yet, so version 1 must stay.
    run_ok(&s.data, &["keys", "rotate"]);
    let st = status(&s);
    let total = keys_under(&st, 1);
    assert_eq!(st["to_rewrap"], total, "{st}");
    let reason = refused(&s, &["retire", "1"]);
    assert!(reason.contains("still wrapped under version 1"), "{reason}");
    assert!(key_file(&s).contains("valv-kek-v1 1 "), "a refused retirement changes nothing");

    // `rewrap` finishes what is left without adding a version.
    let out = run_ok(&s.data, &["keys", "rewrap"]);
    assert!(out.contains(&format!("{total} data keys rewrapped; every data key is under version 2")), "{out}");
    assert_eq!(status(&s)["current_version"], 2);
    let out = run_ok(&s.data, &["keys", "rotate", "--wait"]);
    assert!(out.contains(&format!("{total} data keys rewrapped")), "{out}");
    let st = status(&s);
    assert_eq!((st["to_rewrap"].as_u64(), keys_under(&st, 3)), (Some(0), total), "{st}");
    run_ok(&s.data, &["keys", "retire", "1"]);
    run_ok(&s.data, &["keys", "retire", "2"]);
    assert!(refused(&s, &["retire", "3"]).contains("current"));
    // A malformed argument is a usage error (clap: exit 2, the reason and a hint).
    let usage = valv().arg("--data-dir").arg(&s.data).args(["keys", "retire", "x"]).output().expect("run valv");
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("invalid value 'x'"));
    s.restart();
    let found = s.get("/fhir/Patient").await;
    assert_eq!((found.status, found.total()), (200, 3));
}

/// The patient's data key as stored, unwrapped with the key file.
fn patient_key(s: &Server, patient: &str) -> valv_crypto::DataKey {
    use valv_crypto::KeyProvider;
    let kek = valv_crypto::LocalKeyProvider::parse(&key_file(s)).expect("kek");
    let name = format!("patient:{patient}");
    let rows = s.db().query(&format!("SELECT provider, kek_id, kek_version, wrapped FROM data_keys WHERE name = {}", crate::harness::quoted(&name)));
    let r = rows.first().expect("the patient's key");
    let w = valv_crypto::WrappedKey { provider: r[0].clone(), kek_id: r[1].clone(), kek_version: r[2].parse().expect("version"), ciphertext: crate::harness::unhex(&r[3]) };
    kek.unwrap(&w, &name).expect("unwraps")
}

/// How many of the patient's stored versions open under `key`, of how many.
fn versions_opening(s: &Server, patient: &str, key: &valv_crypto::DataKey) -> (usize, usize) {
    let sql = format!("SELECT r.type, r.id, v.version, v.body FROM versions v JOIN resources r ON r.rid = v.rid WHERE v.patient = {} AND NOT v.deleted", crate::harness::quoted(patient));
    let rows: Vec<(String, String, u64, Vec<u8>)> = s.db().query(&sql).into_iter().map(|r| (r[0].clone(), r[1].clone(), r[2].parse().expect("version"), crate::harness::unhex(&r[3]))).collect();
    let opened = rows.iter().filter(|(t, id, v, body)| valv_crypto::open(key, &valv_crypto::Aad { purpose: "resource", resource_type: t, id, version: *v, patient }, body).is_ok()).count();
    (opened, rows.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patients_data_key_rotates_while_the_server_serves_them() {
    let s = Server::start("keys-patient");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Rekeyed"}]})).await.id();
    let other = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Untouched"}]})).await.id();
    let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{p}")}})).await.id();
    let before = s.get(&format!("/fhir/Observation/{o}")).await;
    assert_eq!(before.status, 200, "{}", before.text);
    let (old, other_key) = (patient_key(&s, &p), patient_key(&s, &other));

    let out = run_ok(&s.data, &["keys", "rotate", "--patient", &p]);
    assert!(out.contains("2 stored versions re-sealed"), "{out}");
    let new = patient_key(&s, &p);
    assert_eq!(versions_opening(&s, &p, &old), (0, 2), "nothing of theirs opens under the old key");
    assert_eq!(versions_opening(&s, &p, &new), (2, 2));
    assert_eq!(versions_opening(&s, &other, &other_key), (1, 1), "another patient's key is kept");

    // The server had the old key cached: it reads and writes under the new one at once.
    let after = s.get(&format!("/fhir/Observation/{o}")).await;
    assert_eq!((after.status, after.bytes.clone()), (200, before.bytes), "the same bytes: {}", after.text);
    let upd = s.put(&format!("/fhir/Observation/{o}"), &json!({"resourceType": "Observation", "id": o, "status": "amended", "code": {"text": "y"}, "subject": {"reference": format!("Patient/{p}")}}), &[]).await;
    assert_eq!(upd.status, 200, "{}", upd.text);
    assert_eq!(versions_opening(&s, &p, &new), (3, 3), "the update is sealed under the new key");
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.contains("valv_integrity_failures_total 0"), "a rotation is no integrity failure");

    // Refused, each in one line: no such patient, and --patient with --wait.
    assert!(refused(&s, &["rotate", "--patient", "nobody"]).contains("not found"));
    assert!(refused(&s, &["rotate", "--patient", &p, "--wait"]).contains("give one of --patient, --signing-key and --wait"));
    assert!(run_ok(&s.data, &["audit", "export"]).contains(&format!("the data key of patient {p} replaced")));
}

/// The newest stored checkpoint whose size is above `above` (waits for the integrator).
async fn checkpoint_above(s: &Server, above: u64) -> (u64, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let note = s.request("GET", "/audit/checkpoint", None, None, &[]).await.text;
        let size = note.lines().nth(1).and_then(|l| l.parse::<u64>().ok()).expect("a checkpoint's size line");
        if size > above || Instant::now() > deadline {
            return (size, note);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signed_by(note: &str, vkey: &str) -> bool {
    let v = valv_audit::Verifier::from_vkey(vkey).expect("vkey");
    valv_audit::open_checkpoint(note, std::slice::from_ref(&v)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_signing_key_is_taken_up_by_the_running_server_and_every_earlier_checkpoint_still_verifies() {
    let s = Server::start("keys-signing");
    s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Signed"}]})).await;
    let (size_before, before) = checkpoint_above(&s, 1).await;
    let key1 = s.request("GET", "/audit/key", None, None, &[]).await.text.trim().to_string();
    assert!(signed_by(&before, &key1));
    let saved = s.dir.join("checkpoint-before.txt");
    std::fs::write(&saved, &before).expect("save");

    let out = run_ok(&s.data, &["keys", "rotate", "--signing-key"]);
    assert!(out.contains("checkpoint-signing key 2 added"), "{out}");
    // The running server takes the new key up within its check interval (10 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    let keys = loop {
        let keys = s.request("GET", "/audit/keys", None, None, &[]).await.text;
        if keys.lines().count() == 2 || Instant::now() > deadline {
            break keys;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let keys: Vec<&str> = keys.lines().collect();
    let key2 = s.request("GET", "/audit/key", None, None, &[]).await.text.trim().to_string();
    assert_eq!(keys, vec![key1.as_str(), key2.as_str()], "every key published, oldest first");
    assert_ne!(key1, key2);

    // The first checkpoint after the switch is signed by both keys, the next by the new one alone
    // (the one signed for the rotation's own audit entry may still be the old key's).
    let (latest, note) = checkpoint_above(&s, size_before).await;
    let (size, handover) = if signed_by(&note, &key2) {
        (latest, note)
    } else {
        s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Signed"}]})).await;
        checkpoint_above(&s, latest).await
    };
    assert!(signed_by(&handover, &key2) && signed_by(&handover, &key1), "the handover carries both: {handover}");
    s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Signed"}]})).await;
    let (_, after) = checkpoint_above(&s, size).await;
    assert!(signed_by(&after, &key2) && !signed_by(&after, &key1), "{after}");

    // The log (and a checkpoint saved before the rotation) verifies; so does a backup made after.
    let verified = run_ok(&s.data, &["audit", "verify", "--checkpoint", saved.to_str().expect("path")]);
    assert!(!verified.contains("PROBLEM"), "{verified}");
    let st = status(&s);
    assert_eq!(st["checkpoint_signing_keys"].as_array().map(Vec::len), Some(2), "{st}");
    assert_eq!(st["checkpoint_signing_key"]["version"], 2);
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("random");
    let id = valv_age::Identity::from_bytes(secret);
    let id_file = s.dir.join("id.txt");
    std::fs::write(&id_file, format!("{}\n", id.to_bech32().as_str())).expect("identity");
    let backup = s.dir.join("after-rotation.age");
    run_ok(&s.data, &["backup", "--out", backup.to_str().expect("path"), "--recipient", &id.recipient().to_bech32()]);
    let drill = run_ok(&s.data, &["backup", "verify", backup.to_str().expect("path"), "--identity", id_file.to_str().expect("path")]);
    assert!(drill.contains("drill passed"), "{drill}");
}
