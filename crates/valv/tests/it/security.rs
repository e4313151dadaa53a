//! The invariants at rest: no plaintext PHI on disk, ciphertexts bound to their row, and nothing
//! acknowledged lost to `kill -9`.

use crate::harness::{quoted, unhex, Server};
use serde_json::json;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn all_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn canaries_never_reach_the_disk_in_plaintext() {
    let began = std::time::SystemTime::now();
    let mut s = Server::start("canary");
    let canaries = ["Quokkafamily", "CANARY-7781-ID", "1937-08-19", "canary clinical note about a wombat", "Wombatstreet 12", "quokkalogin"];
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":canaries[0],"given":["Zebedee"]}],
        "identifier":[{"system":"urn:mrn","value":canaries[1]}],"birthDate":canaries[2],"address":[{"line":[canaries[4]],"city":"Umeå"}]})).await;
    assert_eq!(p.status, 201, "{}", p.text);
    let pid = p.id();
    let o = s.post("/fhir/Observation", &json!({"resourceType":"Observation","status":"final","code":{"text":"note"},
        "subject":{"reference":format!("Patient/{pid}")},"note":[{"text":canaries[3]}]})).await;
    assert_eq!(o.status, 201);
    // Searches put the values into queries, and the queries into the audit log.
    for q in ["family=Quokkafamily", "identifier=CANARY-7781-ID", "birthdate=1937-08-19"] {
        assert_eq!(s.get(&format!("/fhir/Patient?{q}")).await.total(), 1, "{q}");
    }
    // The patient's own account: user name and display name are sealed (the name only as a token).
    let u = s.post("/admin/users", &json!({"username": canaries[5], "display_name": "Zebedee Quokkafamily", "roles": ["patient"], "patient": pid})).await;
    assert_eq!(u.status, 201, "{}", u.text);
    // An update leaves an old version behind; it must be sealed too.
    let mut body = s.get(&format!("/fhir/Patient/{pid}")).await.json;
    body["gender"] = json!("female");
    assert_eq!(s.put(&format!("/fhir/Patient/{pid}"), &body, &[]).await.status, 200);
    s.kill9();
    let mut files = Vec::new();
    all_files(&s.data, &mut files);
    // On PostgreSQL the database's files are the cluster's (tables, WAL, server log).
    let db = s.db();
    if db.is_postgres() {
        // This database's tables and indexes, the WAL written since the test began, the log.
        let cluster = db.files(&s.data);
        let oid = &db.query("SELECT oid FROM pg_database WHERE datname = current_database()")[0][0];
        all_files(&cluster.join("data/base").join(oid), &mut files);
        let mut wal = Vec::new();
        all_files(&cluster.join("data/pg_wal"), &mut wal);
        files.extend(wal.into_iter().filter(|f| std::fs::metadata(f).and_then(|m| m.modified()).is_ok_and(|t| t >= began)));
        files.push(cluster.join("log"));
        assert!(files.iter().any(|f| f.to_string_lossy().contains("pg_wal")), "the database is there");
    } else {
        assert!(files.iter().any(|f| f.ends_with("valv.db-wal") || f.ends_with("valv.db")), "the database is there");
        assert!(files.iter().any(|f| f.ends_with("valv-audit.db-wal") || f.ends_with("valv-audit.db")), "the audit log's file is there");
    }
    let mut scanned = 0;
    for f in &files {
        // A file PostgreSQL removed meanwhile (a recycled WAL segment) held nothing of this test's.
        let Ok(bytes) = std::fs::read(f) else { continue };
        scanned += bytes.len();
        for c in canaries {
            for form in [c.to_string(), c.to_lowercase(), c.to_uppercase()] {
                assert!(!contains(&bytes, form.as_bytes()), "{} holds '{form}' in plaintext", f.display());
            }
        }
    }
    assert!(scanned > 10_000, "scanned {scanned} bytes");
    // And the data is all still readable through the API.
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Patient/{pid}")).await.json["name"][0]["family"], canaries[0]);
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_row_fails_loudly() {
    let mut s = Server::start("swap");
    let p1 = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"One"}]})).await.id();
    let p2 = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Two"}]})).await.id();
    let obs = |p: &str, t: &str| json!({"resourceType":"Observation","status":"final","code":{"text":t},"subject":{"reference":format!("Patient/{p}")}});
    let a = s.post("/fhir/Observation", &obs(&p1, "a")).await.id();
    let b = s.post("/fhir/Observation", &obs(&p1, "b")).await.id();
    let c = s.post("/fhir/Observation", &obs(&p2, "c")).await.id();
    s.kill9();
    {
        let db = s.db();
        let body_of = |id: &str| -> Vec<u8> {
            let rows = db.query(&format!("SELECT v.body FROM versions v JOIN resources r ON r.rid = v.rid WHERE r.id = {}", quoted(id)));
            unhex(&rows.first().expect("row")[0])
        };
        let put = |id: &str, body: &[u8]| {
            assert_eq!(db.execute(&format!("UPDATE versions SET body = {} WHERE rid = (SELECT rid FROM resources WHERE id = {})", db.blob(body), quoted(id))), 1, "update");
        };
        let (body_a, body_c) = (body_of(&a), body_of(&c));
        put(&b, &body_a); // same patient, same key: only the bound id tells them apart
        put(&p2, &body_c); // another type and patient
    }
    s.restart();
    for id in [format!("/fhir/Observation/{b}"), format!("/fhir/Patient/{p2}")] {
        let r = s.get(&id).await;
        let d = r.outcome(500);
        assert!(d.contains("integrity"), "{d}");
        assert!(!r.text.contains("\"a\""), "no content of the moved row leaks");
    }
    assert_eq!(s.get(&format!("/fhir/Observation/{a}")).await.status, 200, "the source row still reads");
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    // Three: the moved Patient row when the access directory read it at start, then each read.
    assert!(metrics.contains("valv_integrity_failures_total 3"), "{metrics}");
}

#[tokio::test]
async fn every_acknowledged_create_survives_kill_9() {
    let mut s = Server::start("kill9");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient"})).await.id();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..8 {
        let (acked, client, p) = (acked.clone(), s.client(), p.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let body = serde_json::to_vec(&json!({"resourceType":"Observation","status":"final","code":{"text":format!("w{w}-{i}")},
                    "subject":{"reference":format!("Patient/{p}")}})).expect("json");
                match client.try_request("POST", "/fhir/Observation", Some(&client.data_key), Some(body), &[]).await {
                    Ok(r) if r.status == 201 => acked.lock().expect("lock").push(r.id()),
                    Ok(r) => panic!("unexpected {}: {}", r.status, r.text),
                    // The server died under us: whatever was not acknowledged may be lost.
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill9();
    for w in workers {
        w.await.expect("worker");
    }
    let ids = acked.lock().expect("lock").clone();
    assert!(ids.len() > 20, "only {} creates were acknowledged before the kill", ids.len());
    s.restart();
    for id in &ids {
        let r = s.get(&format!("/fhir/Observation/{id}")).await;
        assert_eq!(r.status, 200, "acknowledged Observation/{id} was lost: {}", r.text);
    }
}

#[tokio::test]
async fn api_keys_written_into_the_database_directly_do_not_work() {
    use sha2::Digest;
    let mut s = Server::start("forgekey");
    let key = crate::harness::last_line(&crate::harness::run_ok(&s.data, &["apikey", "create", "--name", "reporter", "--role", "service", "--scope", "system/Patient.s"]));
    let narrow = crate::harness::last_line(&crate::harness::run_ok(&s.data, &["apikey", "create", "--name", "narrow", "--role", "service", "--scope", "system/Patient.s"]));
    assert_eq!(s.request("GET", "/fhir/Patient", Some(&narrow), None, &[]).await.status, 200);
    assert_eq!(s.get("/fhir/Patient").await.status, 200);
    s.kill9();
    let forged = format!("valv_{}", "ab".repeat(32));
    {
        let db = s.db();
        // A DBA mints an admin key of their own, copying a real row's MAC...
        let hash = db.blob(&sha2::Sha256::digest(forged.as_bytes()));
        let insert = format!("INSERT INTO api_keys (id, name, role, hash, created, revoked, mac) SELECT 'forged', 'forged', 'admin', {hash}, created, NULL, mac FROM api_keys WHERE name = 'admin'");
        assert_eq!(db.execute(&insert), 1, "insert");
        // ... and promotes the service key to admin.
        assert_eq!(db.execute("UPDATE api_keys SET role = 'admin' WHERE name = 'reporter'"), 1);
        // ... and widens another key's scopes.
        assert_eq!(db.execute("UPDATE api_keys SET scopes = 'system/*.cruds' WHERE name = 'narrow'"), 1);
    }
    s.restart();
    s.request("GET", "/fhir/Patient", Some(&forged), None, &[]).await.outcome(401);
    s.request("GET", "/fhir/Patient", Some(&key), None, &[]).await.outcome(401);
    s.request("GET", "/fhir/Patient", Some(&narrow), None, &[]).await.outcome(401);
    assert_eq!(s.get("/fhir/Patient").await.status, 200, "untouched keys still work");
}

#[tokio::test]
async fn search_tokens_copied_in_the_database_do_not_leak_other_resources() {
    let mut s = Server::start("forgetoken");
    let a = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Target"}]})).await.id();
    let b = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Bystander"}]})).await.id();
    s.kill9();
    {
        let db = s.db();
        // Give the bystander every search token of the target (on PostgreSQL the index is built
        // from each resource's token list).
        let copy = if db.is_postgres() {
            format!("UPDATE resources SET tokens = tokens || (SELECT tokens FROM resources WHERE id = {}) WHERE id = {}", quoted(&a), quoted(&b))
        } else {
            format!(
                "INSERT OR IGNORE INTO search_tokens (token, rid) SELECT t.token, (SELECT rid FROM resources WHERE id = {}) FROM search_tokens t JOIN resources r ON r.rid = t.rid WHERE r.id = {}",
                quoted(&b),
                quoted(&a)
            )
        };
        assert!(db.execute(&copy) > 0, "copy tokens");
    }
    s.restart();
    let r = s.get("/fhir/Patient?family=target").await;
    assert_eq!(r.entry_ids(), vec![a.clone()], "only the real match is returned: {}", r.text);
}

#[tokio::test]
async fn only_tls_1_3_and_no_plain_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Server::start("tls");
    // Plain HTTP on the port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await.expect("connect");
    tcp.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!buf.starts_with(b"HTTP/"), "plain HTTP must not be served");
    // A client that offers only TLS 1.2 is refused by default.
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(s.data.join("tls/cert.pem")).expect("cert") {
        roots.add(c.expect("cert")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let result = tokio_rustls::TlsConnector::from(Arc::new(tls12)).connect(name, tcp).await;
    assert!(result.is_err(), "TLS 1.2 handshake must fail unless allow_tls12 is set");
}

/// `openssl x509` on the data directory's certificate: subject, dates and names as text.
fn certificate_text(s: &Server) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-startdate", "-enddate", "-ext", "subjectAltName", "-dateopt", "iso_8601", "-in"])
        .arg(s.data.join("tls/cert.pem"))
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test]
async fn the_first_start_certificate_is_short_lived_names_the_host_and_is_renewed() {
    let mut s = Server::start("cert");
    let text = certificate_text(&s);
    assert!(text.contains("Valv self-signed") && text.contains("DNS:localhost") && text.contains("IP Address:127.0.0.1"), "{text}");
    assert!(!text.contains("rcgen self signed cert"), "{text}");
    let day = |prefix: &str| -> i64 {
        let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} in {text}"));
        let date = &line[prefix.len()..prefix.len() + 10];
        valv_fhir::date::parse(date).expect("date").start / 86_400
    };
    let today = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() as i64 / 86_400;
    assert!((today - 2..=today).contains(&day("notBefore=")), "{text}");
    assert!((today + 89..=today + 91).contains(&day("notAfter=")), "valid 90 days: {text}");

    // Within 30 days of its end, a restart renews it; the server then serves the new one.
    let marker = s.data.join("tls/generated-by-valv");
    let old = std::fs::read(s.data.join("tls/cert.pem")).expect("cert");
    std::fs::write(&marker, format!("{}\n", (today + 10) * 86_400)).expect("marker");
    s.kill9();
    s.restart();
    let new = std::fs::read(s.data.join("tls/cert.pem")).expect("cert");
    assert_ne!(old, new, "renewed");
    let r = Server::client_for(&s.data, s.port, &s.data_key).get("/healthz", None).await.expect("served with the new certificate");
    assert_eq!(r.status, 200);
    // An operator's certificate (no marker) is never touched.
    std::fs::remove_file(&marker).expect("remove marker");
    s.kill9();
    s.restart();
    assert_eq!(std::fs::read(s.data.join("tls/cert.pem")).expect("cert"), new);
}

/// A database administrator — the role owning the PostgreSQL database, or whoever can write the
/// SQLite file — edits an audit row, a resource's ciphertext and a search token behind Valv's
/// back. On PostgreSQL the append-only trigger stops even the owner's UPDATE until the owner
/// disables it (as such an administrator can); each edit is then detected: by `valv audit
/// verify` against the auditor's saved checkpoint, by the read (500, integrity), and by the
/// search's re-check of every candidate against its decrypted body.
#[tokio::test]
async fn a_database_administrators_edits_are_each_detected() {
    let mut s = Server::start("dba");
    let target = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Target"}]})).await.id();
    let bystander = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Bystander"}]})).await.id();
    let sealed = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Sealed"}]})).await.id();
    for id in [&target, &bystander, &sealed] {
        assert_eq!(s.get(&format!("/fhir/Patient/{id}")).await.status, 200);
    }
    let checkpoint = s.dir.join("auditor.checkpoint");
    std::fs::write(&checkpoint, crate::audit::settled_checkpoint(&s).await).expect("save");
    s.kill9();

    let db = s.db();
    if let crate::harness::Db::Postgres(pg, name) = &db {
        let refused = pg.try_execute("valv_owner", name, "UPDATE audit_entries SET sealed = sealed WHERE idx = 3");
        assert!(refused.as_ref().is_err_and(|e| e.contains("append-only")), "the trigger stops the owner too: {refused:?}");
    }
    let rid = |id: &str| db.query(&format!("SELECT rid FROM resources WHERE id = {}", quoted(id)))[0][0].clone();
    // 1. An audit row.
    assert_eq!(db.execute(&format!("UPDATE audit_entries SET sealed = {} WHERE idx = 3", db.zeros_like("sealed"))), 1);
    // 2. A resource's ciphertext: one bit of the sealed body.
    let body = unhex(&db.query(&format!("SELECT body FROM versions WHERE rid = {}", rid(&sealed)))[0][0]);
    let mut flipped = body.clone();
    flipped[body.len() / 2] ^= 0x01;
    assert_eq!(db.execute(&format!("UPDATE versions SET body = {} WHERE rid = {}", db.blob(&flipped), rid(&sealed))), 1);
    // 3. Search tokens: the target's moved onto the bystander (those the bystander lacks).
    let (b, t) = (rid(&bystander), rid(&target));
    let moved = if db.is_postgres() {
        db.execute(&format!("UPDATE resources SET tokens = tokens || (SELECT tokens FROM resources WHERE rid = {t}) WHERE rid = {b}"))
            + db.execute(&format!("UPDATE resources SET tokens = '\\x'::bytea WHERE rid = {t}"))
    } else {
        db.execute(&format!("UPDATE search_tokens SET rid = {b} WHERE rid = {t} AND token NOT IN (SELECT token FROM search_tokens WHERE rid = {b})"))
    };
    assert!(moved > 0, "tokens moved");

    let (ok, out) = crate::audit::verify(&s.data, &[&checkpoint]);
    assert!(!ok && out.contains("entry 3"), "verify names the edited entry: {out}");
    s.restart();
    let read = s.get(&format!("/fhir/Patient/{sealed}")).await;
    assert!(read.outcome(500).contains("integrity"), "{}", read.text);
    assert!(!read.text.contains("Sealed"));
    let found = s.get("/fhir/Patient?family=target").await;
    assert_eq!(found.status, 200, "{}", found.text);
    assert!(!found.entry_ids().contains(&bystander), "the bystander is never returned for the target's name: {}", found.text);
    assert_eq!(crate::harness::metric(&s, "valv_search_index_mismatches_total").await, 1, "the moved token is counted");
    assert!(crate::harness::metric(&s, "valv_integrity_failures_total").await >= 1, "the edited body is counted");
    let log = std::fs::read_to_string(s.dir.join("server.log")).expect("log");
    assert!(log.contains("index tampering"), "and logged");
}
