//! Backups and restores against a running server: a backup taken while it serves, the data
//! directory wiped, the backup restored — every resource byte-identical, the audit log verifying
//! against a checkpoint saved before the backup, search, keys and API keys working, sessions not
//! restored — and a patient erased after the backup staying erased (their canaries unreadable
//! under every key the restored server holds). Then a table of bad inputs, each refused with one
//! line and changing nothing, and drills recorded in the audit log.

use crate::harness::{metric, run_ok, run_refused, temp_dir, wait_metric, Server};
use std::time::Duration;
use serde_json::json;
use std::path::{Path, PathBuf};
use valv_crypto::{Aad, KeyProvider, LocalKeyProvider, WrappedKey};

/// An age identity file and its recipient.
pub(crate) fn identity(dir: &Path, name: &str) -> (PathBuf, String) {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("random");
    let id = valv_age::Identity::from_bytes(secret);
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", id.to_bech32().as_str())).expect("identity file");
    (path, id.recipient().to_bech32())
}

async fn patient(s: &Server, family: &str) -> (String, String) {
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": family, "given": [format!("{family}-given")]}]})).await;
    assert_eq!(p.status, 201, "{}", p.text);
    let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("{family}-note")}, "subject": {"reference": format!("Patient/{}", p.id())}})).await;
    assert_eq!(o.status, 201, "{}", o.text);
    (p.id(), o.id())
}

/// Every file under `dir`, read whole.
fn all_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).expect("read")));
        }
    }
    out
}

/// How many stored versions of `patient` open under any data key of the restored directory.
fn versions_readable(data: &Path, patient: &str) -> (usize, usize) {
    let kek = LocalKeyProvider::parse(&std::fs::read_to_string(data.join("keys/kek.key")).expect("key file")).expect("kek");
    let db = rusqlite::Connection::open(data.join("valv.db")).expect("db");
    let mut keys = db.prepare("SELECT name, provider, kek_id, kek_version, wrapped FROM data_keys").expect("keys");
    let keys: Vec<_> = keys
        .query_map([], |r| Ok((r.get::<_, String>(0)?, WrappedKey { provider: r.get(1)?, kek_id: r.get(2)?, kek_version: r.get(3)?, ciphertext: r.get(4)? })))
        .expect("query")
        .map(|r| r.expect("row"))
        .map(|(name, w)| kek.unwrap(&w, &name).expect("every stored key unwraps"))
        .collect();
    let mut versions = db.prepare("SELECT r.type, r.id, v.version, v.body FROM versions v JOIN resources r ON r.rid = v.rid WHERE v.patient = ?1").expect("versions");
    let rows: Vec<(String, String, u64, Vec<u8>)> = versions.query_map([patient], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).expect("query").map(|r| r.expect("row")).collect();
    let opened = rows
        .iter()
        .filter(|(t, id, v, body)| keys.iter().any(|k| valv_crypto::open(k, &Aad { purpose: "resource", resource_type: t, id, version: *v, patient }, body).is_ok()))
        .count();
    (rows.len(), opened)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_is_the_server_as_it_was_and_erasures_after_it_hold() {
    let mut s = Server::start("backup");
    let folder = s.dir.join("backups");
    std::fs::create_dir_all(&folder).expect("folder");
    let (id_file, recipient) = identity(&s.dir, "backup-identity.txt");
    let (erased, erased_obs) = patient(&s, "Canaryerased").await;
    let (kept, kept_obs) = patient(&s, "Canarykept").await;
    let upd = s.put(&format!("/fhir/Patient/{kept}"), &json!({"resourceType": "Patient", "id": kept, "name": [{"family": "Canarykept", "given": ["second"]}]}), &[]).await;
    assert_eq!(upd.status, 200, "{}", upd.text);
    let mut before = Vec::new();
    for path in [format!("/fhir/Patient/{kept}"), format!("/fhir/Patient/{kept}/_history/1"), format!("/fhir/Observation/{kept_obs}"), format!("/fhir/Patient/{erased}")] {
        let r = s.get(&path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        before.push((path, r.bytes));
    }
    // A checkpoint an auditor saved before the backup.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let checkpoint = s.dir.join("checkpoint-before.txt");
    std::fs::write(&checkpoint, s.request("GET", "/audit/checkpoint", None, None, &[]).await.text).expect("checkpoint");

    // The backup is taken while the server serves reads.
    let out = folder.join("one.age");
    let reads = {
        let (port, data, key) = (s.port, s.data.clone(), s.data_key.clone());
        let path = format!("/fhir/Observation/{kept_obs}");
        tokio::spawn(async move {
            let client = Server::client_for(&data, port, &key);
            let mut ok = 0;
            for _ in 0..50 {
                if client.get(&path, Some(&key)).await.map(|r| r.status) == Ok(200) {
                    ok += 1;
                }
            }
            ok
        })
    };
    let report = run_ok(&s.data, &["backup", "--out", out.to_str().expect("path"), "--recipient", &recipient]);
    assert!(report.contains("backup") && report.contains("written"), "{report}");
    assert_eq!(reads.await.expect("reads"), 50, "every read during the backup answered");
    assert!(folder.join("erasure-ledger").exists(), "the ledger is written beside the backup");

    // After the backup: a new resource, and an erasure (its ledger goes beside the backups).
    let (late, _) = patient(&s, "Canarylate").await;
    run_ok(&s.data, &["erase", "--patient", &erased, "--reason", "GDPR Art. 17 request 2026-201"]);
    let ledger = std::fs::read_to_string(folder.join("erasure-ledger")).expect("ledger");
    assert!(ledger.contains(&erased), "the erasure reached the backup folder's ledger: {ledger}");

    // Wipe, restore, serve.
    s.kill9();
    std::fs::remove_dir_all(&s.data).expect("wipe");
    let restored = run_ok(&s.data, &["restore", out.to_str().expect("path"), "--identity", id_file.to_str().expect("path")]);
    assert!(restored.contains("1 more re-applied from the ledger"), "{restored}");

    // The erased patient: no canary in any byte, and no key the server holds opens their rows.
    for (path, bytes) in all_bytes(&s.data) {
        for canary in ["Canaryerased", "Canarykept"] {
            assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()), "{canary} in plaintext in {}", path.display());
        }
    }
    let (rows, readable) = versions_readable(&s.data, &erased);
    assert!(rows >= 2, "the erased patient's rows are there, as ciphertext ({rows})");
    assert_eq!(readable, 0, "no key of the restored server opens them");
    assert_eq!(versions_readable(&s.data, &kept), (3, 3), "the same scan opens a kept patient's rows");
    let db = rusqlite::Connection::open(s.data.join("valv.db")).expect("db");
    let sessions: i64 = db.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0)).expect("sessions");
    assert_eq!(sessions, 0, "sessions are not restored");
    drop(db);

    s.restart();
    for (path, bytes) in &before[..3] {
        let r = s.get(path).await;
        assert_eq!((r.status, &r.bytes), (200, bytes), "{path} byte-identical");
    }
    assert_eq!(s.get(&format!("/fhir/Patient/{erased}")).await.status, 410);
    assert_eq!(s.get(&format!("/fhir/Observation/{erased_obs}")).await.status, 410);
    assert_eq!(s.get(&format!("/fhir/Patient/{late}")).await.status, 404, "made after the backup");
    assert_eq!(s.get("/fhir/Patient?family=Canarykept").await.total(), 1, "search works");
    assert_eq!(s.get("/fhir/Patient?family=Canaryerased").await.total(), 0);
    let created = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Afterwards"}]})).await;
    assert_eq!(created.status, 201, "writing works: {}", created.text);
    let verify = run_ok(&s.data, &["audit", "verify", "--checkpoint", checkpoint.to_str().expect("path")]);
    assert!(verify.contains("the log verifies") && verify.contains("1 given checkpoints"), "{verify}");
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("\"restore\""), "the restore is in the restored log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backups_and_restores_are_refused_and_change_nothing() {
    let s = Server::start("backup-bad");
    let (id_file, recipient) = identity(&s.dir, "id.txt");
    let (other_id, _) = identity(&s.dir, "other.txt");
    patient(&s, "Badinput").await;
    let work = temp_dir("backup-bad-files");
    let good = work.join("good.age");
    let p = |p: &Path| p.to_str().expect("path").to_string();

    // Backup refusals.
    assert!(run_refused(&s.data, &["backup", "--out", &p(&good)]).contains("recipient"), "no recipient configured");
    assert!(run_refused(&s.data, &["backup", "--out", &p(&good), "--recipient", "age1nope"]).contains("recipient"));
    assert!(!good.exists());
    run_ok(&s.data, &["backup", "--out", &p(&good), "--recipient", &recipient]);
    let original = std::fs::read(&good).expect("backup");
    assert!(run_refused(&s.data, &["backup", "--out", &p(&good), "--recipient", &recipient]).contains("exists"));
    assert_eq!(std::fs::read(&good).expect("backup"), original, "never overwritten");

    // Restore refusals: each leaves the target absent (or as it was).
    let bytes = |name: &str, b: &[u8]| {
        let path = work.join(name);
        std::fs::write(&path, b).expect("write");
        std::fs::copy(work.join("erasure-ledger"), work.join(format!("{name}.ledger"))).expect("ledger");
        path
    };
    let truncated = bytes("truncated.age", &original[..original.len() - 100]);
    let mut flipped_bytes = original.clone();
    let at = flipped_bytes.len() / 2;
    flipped_bytes[at] ^= 0x01;
    let flipped = bytes("flipped.age", &flipped_bytes);
    let ledger = |f: &Path| format!("{}.ledger", p(f));
    let target = work.join("restored");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![p(&truncated), "--identity".into(), p(&id_file), "--ledger".into(), ledger(&truncated)], "does not authenticate"),
        (vec![p(&flipped), "--identity".into(), p(&id_file), "--ledger".into(), ledger(&flipped)], "does not authenticate"),
        (vec![p(&good), "--identity".into(), p(&other_id)], "no identity given opens"),
        (vec![p(&good), "--identity".into(), p(&work.join("absent.txt"))], "identity"),
        (vec![p(&good), "--identity".into(), p(&id_file), "--ledger".into(), p(&work.join("absent-ledger"))], "erasure ledger"),
        (vec![p(&good), "--identity".into(), p(&id_file), "--ledger".into(), p(&id_file)], "not a signed ledger"),
    ];
    for (args, why) in &cases {
        let args: Vec<&str> = ["restore"].into_iter().chain(args.iter().map(String::as_str)).collect();
        let err = run_refused(&target, &args);
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!target.exists(), "{args:?} left {} behind", target.display());
    }
    // An altered ledger does not verify; a ledger older than the backup is refused.
    let altered = work.join("altered-ledger");
    let text = std::fs::read_to_string(work.join("erasure-ledger")).expect("ledger");
    std::fs::write(&altered, text.replacen("\n0\n", "\n1\n1 someone 5\n", 1)).expect("write");
    let err = run_refused(&target, &["restore", &p(&good), "--identity", &p(&id_file), "--ledger", &p(&altered)]);
    assert!(err.contains("does not verify"), "{err}");
    assert!(!target.exists());
    // Over a non-empty directory: refused, the directory untouched.
    std::fs::create_dir_all(&target).expect("dir");
    std::fs::write(target.join("precious"), b"keep me").expect("write");
    assert!(run_refused(&target, &["restore", &p(&good), "--identity", &p(&id_file)]).contains("not empty"));
    assert_eq!(std::fs::read(target.join("precious")).expect("kept"), b"keep me");
    assert_eq!(std::fs::read_dir(&target).expect("dir").count(), 1);

    // Drills: a good one passes, a bad one fails; both are in the live audit log.
    let ok = run_ok(&s.data, &["backup", "verify", &p(&good), "--identity", &p(&id_file)]);
    assert!(ok.contains("drill passed") && ok.contains("sample decryptions"), "{ok}");
    let bad = run_refused(&s.data, &["restore", &p(&flipped), "--identity", &p(&id_file), "--ledger", &ledger(&flipped), "--drill"]);
    assert!(bad.contains("does not authenticate"), "{bad}");
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("restore drill of") && log.contains("passed"), "the passed drill is recorded");
    assert!(log.contains("FAILED"), "the failed drill is recorded");
    let _ = std::fs::remove_dir_all(&work);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_backs_up_on_its_schedule_and_keeps_only_the_newest() {
    let dir = temp_dir("backup-schedule");
    let (id_file, recipient) = identity(&dir, "identity.txt");
    // A schedule that cannot run is refused before the server starts, in one line.
    let data = dir.join("refused");
    run_ok(&data, &["init"]);
    let out = crate::harness::valv().arg("--data-dir").arg(&data).arg("serve").env("VALV_BACKUP_EVERY_SECS", "60").output().expect("run valv");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success() && err.lines().count() == 1 && err.contains("[backup] dir"), "{err}");

    let toml = format!("[backup]\ndir = \"scheduled\"\nrecipients = [\"{recipient}\"]\nevery_secs = 2\nkeep = 2\n");
    let s = Server::start_configured("backup-schedule", &[], &toml);
    let folder = s.data.join("scheduled");
    wait_metric(&s, "valv_backups_written_total", Duration::from_secs(60), |n| n >= 3).await;
    let mut names: Vec<String> = std::fs::read_dir(&folder).expect("folder").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let backups: Vec<&String> = names.iter().filter(|n| n.ends_with(".age")).collect();
    assert_eq!(backups.len(), 2, "only the newest two are kept: {names:?}");
    assert!(names.contains(&"erasure-ledger".to_string()), "the ledger is beside them: {names:?}");
    for b in backups {
        let ok = run_ok(&s.data, &["backup", "verify", folder.join(b).to_str().expect("path"), "--identity", id_file.to_str().expect("path")]);
        assert!(ok.contains("drill passed"), "{ok}");
    }
    assert_eq!(metric(&s, "valv_backup_failures_total").await, 0);
    assert!(metric(&s, "valv_backup_last_success_seconds").await > 0);
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.matches("\"interaction\":\"backup\"").count() >= 3, "each scheduled backup is in the audit log");

    // A backup that cannot be written is counted, recorded as failed, and tried again.
    std::fs::remove_dir_all(&folder).expect("remove");
    std::fs::write(&folder, b"not a folder").expect("file");
    wait_metric(&s, "valv_backup_failures_total", Duration::from_secs(30), |n| n >= 2).await;
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("scheduled backup FAILED"), "the failure is in the audit log");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_with_absolute_paths_in_the_configuration_writes_nothing_outside_its_directory() {
    let dir = temp_dir("backup-absolute");
    let (id_file, recipient) = identity(&dir, "identity.txt");
    let data = dir.join("live");
    run_ok(&data, &["init"]);
    // The live configuration names its database and key file by absolute paths.
    let config = data.join("valv.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let (db, kek) = (data.join("valv.db"), data.join("keys/kek.key"));
    let text = text.replace("sqlite = \"valv.db\"", &format!("sqlite = \"{}\"", db.display())).replace("key_file = \"keys/kek.key\"", &format!("key_file = \"{}\"", kek.display()));
    assert!(text.contains(&db.display().to_string()) && text.contains(&kek.display().to_string()), "{text}");
    std::fs::write(&config, text).expect("config");
    let backup = dir.join("b.age");
    run_ok(&data, &["backup", "--out", backup.to_str().expect("path"), "--recipient", &recipient]);
    // Before drills rebased it, the restore reached for the live database file (and refused).
    let ok = run_ok(&data, &["backup", "verify", backup.to_str().expect("path"), "--identity", id_file.to_str().expect("path")]);
    assert!(ok.contains("drill passed"), "{ok}");
    let verified = run_ok(&data, &["audit", "verify"]);
    assert!(verified.contains("the log verifies"), "the live log, with the drill's entry, still verifies: {verified}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backend-neutral backup is also the move to PostgreSQL: restored with `VALV_STORE=postgres`
/// and `VALV_DATABASE_URL` naming an empty database, the server serves from there as it was. On
/// the suite's SQLite pass this is the SQLite → PostgreSQL move (on a cluster of its own); on the
/// PostgreSQL pass, PostgreSQL → PostgreSQL. A database already holding Valv is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restores_into_an_empty_postgresql_database() {
    let own_cluster;
    let pg = match crate::harness::postgres() {
        Some(pg) => pg,
        None => {
            own_cluster = valv_testpg::Cluster::start();
            &own_cluster
        }
    };
    let mut s = Server::start("topg");
    let (id_file, recipient) = identity(&s.dir, "identity.txt");
    let (p, obs) = patient(&s, "Canarymoved").await;
    let mut before = Vec::new();
    for path in [format!("/fhir/Patient/{p}"), format!("/fhir/Observation/{obs}")] {
        let r = s.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text);
        before.push((path, r.bytes));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let checkpoint = s.dir.join("checkpoint.txt");
    std::fs::write(&checkpoint, s.request("GET", "/audit/checkpoint", None, None, &[]).await.text).expect("checkpoint");
    let out = s.dir.join("move.age");
    run_ok(&s.data, &["backup", "--out", out.to_str().expect("path"), "--recipient", &recipient]);
    s.kill9();
    std::fs::remove_dir_all(&s.data).expect("wipe");

    let url = pg.url_of("valv_owner", &pg.create_database());
    let env = [("VALV_STORE", "postgres"), ("VALV_DATABASE_URL", url.as_str())];
    let restore = ["restore", out.to_str().expect("path"), "--identity", id_file.to_str().expect("path")];
    // A backup cut short fails mid-load: its one transaction leaves the database empty.
    let bytes = std::fs::read(&out).expect("backup");
    let cut = s.dir.join("cut.age");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).expect("cut");
    let failed = crate::harness::valv()
        .arg("--data-dir")
        .arg(s.dir.join("cut-target"))
        .args(["restore", cut.to_str().expect("path"), "--identity", id_file.to_str().expect("path")])
        .envs(env)
        .output()
        .expect("run");
    assert!(!failed.status.success(), "a cut backup is refused");
    let restored = crate::harness::run_ok_env(&s.data, &restore, &env);
    assert!(restored.contains("restored"), "{restored}");
    let config = std::fs::read_to_string(s.data.join("valv.toml")).expect("config");
    assert!(config.contains("backend = \"postgres\"") && config.contains(&url), "the restored configuration names the database: {config}");
    assert!(!s.data.join("valv.db").exists(), "nothing went into SQLite");

    s.restart();
    for (path, bytes) in &before {
        let r = s.get(path).await;
        assert_eq!((r.status, &r.bytes), (200, bytes), "{path} byte-identical from PostgreSQL");
    }
    assert_eq!(s.get("/fhir/Patient?family=Canarymoved").await.total(), 1, "search works");
    let created = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Afterwards"}]})).await;
    assert_eq!(created.status, 201, "writing works: {}", created.text);
    let verify = run_ok(&s.data, &["audit", "verify", "--checkpoint", checkpoint.to_str().expect("path")]);
    assert!(verify.contains("the log verifies"), "{verify}");
    assert!(run_ok(&s.data, &["audit", "export"]).contains("\"restore\""), "the restore is in the log");

    // Never over a database that holds Valv: one line, nothing changed.
    s.kill9();
    let again = s.dir.join("again");
    let out = crate::harness::valv().arg("--data-dir").arg(&again).args(restore).envs(env).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success() && err.lines().count() == 1 && err.contains("already holds a Valv schema"), "{err}");
    s.restart();
    assert_eq!(s.get(&before[0].0).await.status, 200, "the database in use is untouched");
}
