//! Files as Binary content (issue 13): raw upload with `X-Security-Context`, raw download with
//! Range, FHIR JSON with base64 data for small files; decided on the patient, audited with the
//! SHA-256; sealed at rest (no planted byte on disk); tampered, truncated and swapped objects
//! fail loudly; an erased patient's files are gone.

use crate::access::{ward, Ward};
use crate::harness::{run_ok, Resp, Server};
use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const CANARY: &[u8] = b"CANARY-XRAY-Lindqvist-19640312-4455-";
const SEGMENT: usize = 64 * 1024;

/// Three full segments and a part of a fourth, the canary planted all through it.
fn xray() -> Vec<u8> {
    CANARY.iter().copied().cycle().take(3 * SEGMENT + 1234).collect()
}

async fn upload(s: &Server, token: &str, patient: &str, content_type: &str, bytes: &[u8]) -> Resp {
    let context = format!("Patient/{patient}");
    s.request_raw("POST", "/fhir/Binary", Some(token), Some(bytes.to_vec()), &[("content-type", content_type), ("x-security-context", &context)]).await
}

async fn raw(s: &Server, token: &str, id: &str, range: Option<&str>) -> Resp {
    let mut headers = vec![("accept", "image/png")];
    if let Some(r) = range {
        headers.push(("range", r));
    }
    s.request("GET", &format!("/fhir/Binary/{id}"), Some(token), None, &headers).await
}

/// Every object file under the data directory's `files/`.
fn objects(data: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(data.join("files")) else { return out };
    for d in dirs.flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

fn audit_log(data: &Path) -> Vec<Value> {
    run_ok(data, &["audit", "export"]).lines().map(|l| serde_json::from_str::<Value>(l).expect("jsonl")["entry"].clone()).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stream_in_and_out_by_range_sealed_decided_and_audited() {
    let Ward { s, token, mine, other, .. } = ward("files", "Lindqvist", "Grannlund").await;
    let content = xray();
    let sha = Sha256::digest(&content);

    // Refusals that store nothing.
    let no_context = s.request_raw("POST", "/fhir/Binary", Some(&token), Some(content.clone()), &[("content-type", "image/png")]).await;
    assert!(no_context.outcome(400).contains("X-Security-Context"));
    let bad_context = s.request_raw("POST", "/fhir/Binary", Some(&token), Some(b"x".to_vec()), &[("content-type", "image/png"), ("x-security-context", "Patient/../../etc")]).await;
    bad_context.outcome(400);
    let no_type = s.request_raw("POST", "/fhir/Binary", Some(&token), Some(b"x".to_vec()), &[("content-type", ""), ("x-security-context", &format!("Patient/{mine}"))]).await;
    assert!(no_type.status == 415 || no_type.status == 400, "{}", no_type.text);
    upload(&s, &token, &other, "image/png", &content).await.outcome(403);
    upload(&s, &s.data_key, "no-such-patient", "image/png", b"x").await.outcome(422);
    assert!(objects(&s.data).is_empty(), "nothing stored by a refused upload");

    // The physician of the care team uploads; the answer is the Binary with the file's facts.
    let up = upload(&s, &token, &mine, "image/png", &content).await;
    assert_eq!(up.status, 201, "{}", up.text);
    let id = up.id();
    assert!(up.header("location").is_some_and(|l| l.ends_with(&format!("/Binary/{id}/_history/1"))));
    assert_eq!(up.json["contentType"], "image/png");
    assert_eq!(up.json["securityContext"]["reference"], format!("Patient/{mine}"));
    let facts = &up.json["meta"]["extension"][0]["extension"];
    valv_fhir::r4::validate(&up.json).unwrap_or_else(|e| panic!("the answer is valid R4: {e:?}"));
    assert_eq!(facts[0]["valueDecimal"], content.len() as u64);
    assert_eq!(facts[1]["valueBase64Binary"], base64::engine::general_purpose::STANDARD.encode(sha));
    assert_eq!(objects(&s.data).len(), 1);

    // Raw bytes back, whole and by range.
    let whole = raw(&s, &token, &id, None).await;
    assert_eq!(whole.status, 200, "{}", whole.text);
    assert_eq!(whole.bytes, content);
    assert_eq!(whole.header("content-type"), Some("image/png"));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(whole.header("content-length"), Some(content.len().to_string().as_str()));
    assert_eq!(whole.header("repr-digest"), Some(format!("sha-256=:{}:", base64::engine::general_purpose::STANDARD.encode(sha)).as_str()));
    let len = content.len();
    for (range, a, b) in [
        ("bytes=0-0", 0, 1),
        ("bytes=65535-65536", SEGMENT - 1, SEGMENT + 1),
        ("bytes=65536-131071", SEGMENT, 2 * SEGMENT),
        ("bytes=100-70000", 100, 70_001),
        (&format!("bytes={}-", len - 1), len - 1, len),
        ("bytes=-100", len - 100, len),
        ("bytes=196000-999999999", 196_000, len),
    ] {
        let r = raw(&s, &token, &id, Some(range)).await;
        assert_eq!(r.status, 206, "{range}: {}", r.text);
        assert_eq!(r.bytes, content[a..b], "{range}");
        assert_eq!(r.header("content-range"), Some(format!("bytes {a}-{}/{len}", b - 1).as_str()), "{range}");
    }
    for range in [format!("bytes={len}-"), "bytes=5-4".to_string(), "bytes=-0".to_string(), "bytes=x-1".to_string()] {
        let r = raw(&s, &token, &id, Some(&range)).await;
        r.outcome(416);
        assert_eq!(r.header("content-range"), Some(format!("bytes */{len}").as_str()), "{range}");
    }
    let head = s.request("HEAD", &format!("/fhir/Binary/{id}"), Some(&token), None, &[("accept", "image/png")]).await;
    assert_eq!((head.status, head.bytes.len()), (200, 0));
    assert_eq!(head.header("content-length"), Some(len.to_string().as_str()));

    // As FHIR JSON: the Binary with its bytes as base64 (it is under the inline limit).
    let json = s.request("GET", &format!("/fhir/Binary/{id}"), Some(&token), None, &[("accept", "application/fhir+json")]).await;
    assert_eq!(json.status, 200, "{}", json.text);
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(json.json["data"].as_str().expect("data")).expect("base64"), content);
    valv_fhir::r4::validate(&json.json).unwrap_or_else(|e| panic!("the JSON read is valid R4: {e:?}"));
    // Files never change.
    let update = serde_json::json!({"resourceType": "Binary", "id": id, "contentType": "text/plain"});
    s.request("PUT", &format!("/fhir/Binary/{id}"), Some(&s.data_key), Some(&update), &[]).await.outcome(405);

    // Another patient's file: refused to the physician outside that care team, both ways.
    let theirs = upload(&s, &s.data_key, &other, "application/pdf", b"%PDF-1.7 referral").await;
    assert_eq!(theirs.status, 201, "{}", theirs.text);
    raw(&s, &token, &theirs.id(), None).await.outcome(403);
    raw(&s, &token, &theirs.id(), Some("bytes=0-3")).await.outcome(403);
    s.request("GET", &format!("/fhir/Binary/{}", theirs.id()), Some(&token), None, &[]).await.outcome(403);
    // An unknown id is refused the same way to a person (403 tells nothing).
    raw(&s, &token, "no-such-binary", None).await.outcome(403);

    // A document of the patient as the security context: the file is that patient's.
    let doc = |binary: &str, patient: &str| serde_json::json!({"resourceType": "DocumentReference", "status": "current",
        "subject": {"reference": format!("Patient/{patient}")}, "content": [{"attachment": {"contentType": "image/png", "url": format!("Binary/{binary}")}}]});
    let docref = s.post("/fhir/DocumentReference", &doc(&id, &mine)).await;
    assert_eq!(docref.status, 201, "a document of the patient pointing at their file: {}", docref.text);
    let context = format!("DocumentReference/{}", docref.id());
    let via = s.request_raw("POST", "/fhir/Binary", Some(&token), Some(b"page 2".to_vec()), &[("content-type", "image/png"), ("x-security-context", &context)]).await;
    assert_eq!(via.status, 201, "{}", via.text);
    assert_eq!(via.json["securityContext"]["reference"], format!("Patient/{mine}"), "resolved to the patient it belongs to");
    // A document cannot point at another patient's file, nor at none.
    assert!(s.post("/fhir/DocumentReference", &doc(&theirs.id(), &mine)).await.outcome(422).contains("another patient"));
    assert!(s.post("/fhir/DocumentReference", &doc("no-such-binary", &mine)).await.outcome(422).contains("not on this server"));
    // Media the same (its content is one attachment).
    let media = |binary: &str| serde_json::json!({"resourceType": "Media", "status": "completed", "subject": {"reference": format!("Patient/{mine}")},
        "content": {"contentType": "image/png", "url": format!("Binary/{binary}")}});
    assert!(s.post("/fhir/Media", &media(&theirs.id())).await.outcome(422).contains("another patient"));
    assert_eq!(s.post("/fhir/Media", &media(&via.id())).await.status, 201);
    // In one transaction: a Binary and the document pointing at it by its urn:uuid.
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:7c5a6b0e-1f0e-4d7a-9d55-000000000001", "request": {"method": "POST", "url": "Binary"},
         "resource": {"resourceType": "Binary", "contentType": "text/plain", "securityContext": {"reference": format!("Patient/{mine}")}, "data": "aGVsbG8="}},
        {"request": {"method": "POST", "url": "DocumentReference"}, "resource": {"resourceType": "DocumentReference", "status": "current",
         "subject": {"reference": format!("Patient/{mine}")}, "content": [{"attachment": {"url": "urn:uuid:7c5a6b0e-1f0e-4d7a-9d55-000000000001"}}]}}]});
    let tx = s.post("/fhir", &bundle).await;
    assert_eq!(tx.status, 200, "{}", tx.text);
    let doc_at = tx.json["entry"][1]["response"]["location"].as_str().expect("location");
    let stored = s.get(&doc_at[doc_at.find("/fhir/").expect("path")..]).await;
    assert!(stored.json["content"][0]["attachment"]["url"].as_str().is_some_and(|u| u.starts_with("Binary/")), "resolved, so checked: {}", stored.text);
    // A context naming nothing: refused to a person as another patient's would be, 422 to a service.
    let nothing = [("content-type", "image/png"), ("x-security-context", "DocumentReference/no-such-doc")];
    s.request_raw("POST", "/fhir/Binary", Some(&token), Some(b"x".to_vec()), &nothing).await.outcome(403);
    s.request_raw("POST", "/fhir/Binary", Some(&s.data_key), Some(b"x".to_vec()), &nothing).await.outcome(422);

    // Audited: the upload with its hash and size, each read and range read with the hash, the
    // refusals as denials.
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let log = audit_log(&s.data);
    let of = |interaction: &str, status: u64| log.iter().filter(|e| e["resource_id"] == id.as_str() && e["interaction"] == interaction && e["status"] == status).collect::<Vec<_>>();
    assert!(of("create", 201).iter().any(|e| e["reason"].as_str().is_some_and(|r| r.contains(&format!("sha256={hex} bytes={len}")))), "{log:?}");
    assert!(of("read", 200).iter().all(|e| e["reason"].as_str().is_some_and(|r| r.contains(&hex))) && !of("read", 200).is_empty());
    assert!(of("read", 206).iter().any(|e| e["reason"].as_str().is_some_and(|r| r.contains("bytes 65535-65536/"))));
    assert!(log.iter().any(|e| e["resource_id"] == theirs.id().as_str() && e["outcome"] == "denied" || e["resource_id"] == theirs.id().as_str() && e["status"] == 403), "{log:?}");

    // Sealed at rest: no 12 bytes of the canary in any file under the test's folder (database,
    // WAL, objects, the server's log).
    for f in walk(&s.dir) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(!CANARY.windows(12).any(|w| contains(&bytes, w)), "canary bytes in {}", f.display());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_truncated_and_swapped_files_fail_loudly_and_erasure_removes_them() {
    let s = Server::start("files-tamper");
    let key = s.data_key.clone();
    let patient = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Tamper"}]})).await.id();
    let a_bytes: Vec<u8> = (0..2 * SEGMENT + 10).map(|i| (i % 251) as u8).collect();
    let b_bytes: Vec<u8> = (0..2 * SEGMENT + 10).map(|i| (i % 241) as u8).collect();
    // An upload cut off half way (the connection dropped) leaves nothing behind.
    {
        use tokio::io::AsyncWriteExt;
        let mut conn = crate::exhaustion::connect(&s, "127.0.0.1".parse().expect("ip"), &[b"http/1.1"]).await.expect("connect");
        let head = format!("POST /fhir/Binary HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\ncontent-type: application/dicom\r\nx-security-context: Patient/{patient}\r\ncontent-length: 10000000\r\n\r\n");
        conn.write_all(head.as_bytes()).await.expect("headers");
        conn.write_all(&vec![7u8; 300_000]).await.expect("a part of the body");
        conn.flush().await.expect("flush");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(conn);
        let start = std::time::Instant::now();
        while !objects(&s.data).is_empty() || walk(&s.data.join("files")).iter().any(|p| p.extension().is_some_and(|e| e == "partial")) {
            assert!(start.elapsed() < std::time::Duration::from_secs(5), "a cut-off upload left {:?}", walk(&s.data.join("files")));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let a = upload(&s, &key, &patient, "application/dicom", &a_bytes).await.id();
    let paths_a = objects(&s.data);
    let b = upload(&s, &key, &patient, "application/dicom", &b_bytes).await.id();
    let path_b = objects(&s.data).into_iter().find(|p| !paths_a.contains(p)).expect("b's object");
    let path_a = paths_a[0].clone();
    assert_eq!(raw(&s, &key, &a, None).await.bytes, a_bytes);
    let (orig_a, orig_b) = (std::fs::read(&path_a).expect("a"), std::fs::read(&path_b).expect("b"));

    // Never the wrong bytes: a failure is an error status or a broken transfer.
    let fails = |r: Result<Resp, String>, want: &[u8], what: &str| match r {
        Err(_) => {}
        Ok(r) => assert!(r.status >= 400 || (r.status < 300 && r.bytes != want && r.bytes.len() < want.len()), "{what}: {} with {} bytes", r.status, r.bytes.len()),
    };
    let get = |id: String| {
        let c = s.client();
        let key = key.clone();
        async move { c.try_request("GET", &format!("/fhir/Binary/{id}"), Some(&key), None, &[("accept", "application/octet-stream")]).await }
    };

    let mut flipped = orig_a.clone();
    flipped[31 + SEGMENT + 16 + 7] ^= 1; // a byte of the second segment
    std::fs::write(&path_a, &flipped).expect("tamper");
    fails(get(a.clone()).await, &a_bytes, "a flipped bit");
    let first = raw(&s, &key, &a, Some("bytes=0-99")).await;
    assert_eq!((first.status, &first.bytes[..]), (206, &a_bytes[..100]), "the untouched first segment still reads");
    std::fs::write(&path_a, &orig_a[..orig_a.len() - 1]).expect("truncate");
    fails(get(a.clone()).await, &a_bytes, "truncated");
    std::fs::write(&path_a, &orig_a[..31 + SEGMENT + 16]).expect("truncate at a boundary");
    fails(get(a.clone()).await, &a_bytes, "truncated at a segment boundary");
    std::fs::write(&path_a, &orig_b).expect("swap");
    std::fs::write(&path_b, &orig_a).expect("swap");
    fails(get(a.clone()).await, &a_bytes, "another file's object");
    fails(get(b.clone()).await, &b_bytes, "another file's object");
    std::fs::write(&path_a, &orig_a).expect("restore");
    std::fs::write(&path_b, &orig_b).expect("restore");
    assert_eq!(raw(&s, &key, &b, None).await.bytes, b_bytes, "restored objects read again");

    // A record whose SHA-256 was changed in the database: a whole read fails at its last piece
    // (the segments all authenticate, the content is not the one recorded); ranges still read.
    let db = s.db();
    let hex_of = if db.is_postgres() { "encode(sha256, 'hex')" } else { "hex(sha256)" };
    let original = db.query(&format!("SELECT {hex_of} FROM files WHERE binary_id = '{b}'"));
    let zeros = if db.is_postgres() { "decode(repeat('00', 32), 'hex')" } else { "zeroblob(32)" };
    assert_eq!(db.execute(&format!("UPDATE files SET sha256 = {zeros} WHERE binary_id = '{b}'")), 1);
    fails(get(b.clone()).await, &b_bytes, "a changed SHA-256");
    assert_eq!(raw(&s, &key, &b, Some("bytes=0-9")).await.bytes, b_bytes[..10], "a range is not the whole file");
    let hex_back = if db.is_postgres() { format!("decode('{}', 'hex')", original[0][0].to_lowercase()) } else { format!("x'{}'", original[0][0]) };
    assert_eq!(db.execute(&format!("UPDATE files SET sha256 = {hex_back} WHERE binary_id = '{b}'")), 1);
    assert_eq!(raw(&s, &key, &b, None).await.bytes, b_bytes, "the record restored");

    // Another patient's object in this file's place fails too.
    let other = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Other"}]})).await.id();
    let before = objects(&s.data);
    let c = upload(&s, &key, &other, "application/dicom", &a_bytes).await.id();
    let path_c = objects(&s.data).into_iter().find(|p| !before.contains(p)).expect("c's object");
    let orig_c = std::fs::read(&path_c).expect("c");
    std::fs::write(&path_a, &orig_c).expect("swap across patients");
    fails(get(a.clone()).await, &a_bytes, "another patient's object");
    std::fs::write(&path_a, &orig_a).expect("restore");
    assert_eq!(raw(&s, &key, &c, None).await.bytes, a_bytes);

    // Erased: the objects are deleted, the Binaries are gone, and no data key the server holds
    // opens the file keys any more (they were sealed under the destroyed one).
    let sealed = sealed_file_keys(&s.data, &patient);
    let on_sqlite = std::env::var("VALV_TEST_STORE").map_or(true, |v| v != "postgres");
    assert_eq!(sealed.len(), if on_sqlite { 2 } else { 0 }, "both file keys read from the SQLite file");
    assert!(sealed.iter().all(|k| opens_with_any_key(&s.data, k)), "the check opens them before");
    let out = run_ok(&s.data, &["erase", "--patient", &patient, "--reason", "GDPR Art. 17 request 2026-301"]);
    assert!(out.contains("2 files deleted"), "{out}");
    assert_eq!(objects(&s.data), vec![path_c], "the other patient's object only");
    assert!(!sealed.iter().any(|k| opens_with_any_key(&s.data, k)), "a file key still opens after the erasure");
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(raw(&s, &key, &a, None).await.status, 410);
}

/// On SQLite: the patient's file keys as stored (Binary id, sealed key); empty on PostgreSQL.
fn sealed_file_keys(data: &Path, patient: &str) -> Vec<(String, String, Vec<u8>)> {
    let Ok(db) = rusqlite::Connection::open_with_flags(data.join("valv.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else { return Vec::new() };
    let Ok(mut q) = db.prepare("SELECT binary_id, patient, sealed_key FROM files WHERE patient = ?1") else { return Vec::new() };
    q.query_map([patient], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).expect("query").map(|r| r.expect("row")).collect()
}

/// Whether any data key stored in the directory (unwrapped with its key file) opens a file key.
fn opens_with_any_key(data: &Path, (binary, patient, sealed): &(String, String, Vec<u8>)) -> bool {
    use valv_crypto::KeyProvider as _;
    let kek = valv_crypto::LocalKeyProvider::parse(&std::fs::read_to_string(data.join("keys/kek.key")).expect("key file")).expect("kek");
    let db = rusqlite::Connection::open_with_flags(data.join("valv.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).expect("db");
    let mut q = db.prepare("SELECT name, provider, kek_id, kek_version, wrapped FROM data_keys").expect("keys");
    let keys: Vec<valv_crypto::DataKey> = q
        .query_map([], |r| Ok((r.get::<_, String>(0)?, valv_crypto::WrappedKey { provider: r.get(1)?, kek_id: r.get(2)?, kek_version: r.get(3)?, ciphertext: r.get(4)? })))
        .expect("query")
        .map(|r| r.expect("row"))
        .map(|(name, w)| kek.unwrap(&w, &name).expect("every stored key unwraps"))
        .collect();
    let aad = valv_crypto::Aad { purpose: "file-key", resource_type: "Binary", id: binary, version: 1, patient };
    keys.iter().any(|k| valv_crypto::open(k, &aad, sealed).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_on_s3_hold_nothing_planted_and_are_erased_there() {
    let g = valv_testgarage::Garage::start();
    let toml = format!("[files]\nbackend = \"s3\"\ns3_bucket = \"{}\"\ns3_region = \"{}\"\ns3_endpoint = \"{}\"\ns3_prefix = \"valv/\"\n", g.bucket, g.region, g.endpoint);
    let env = [("AWS_ACCESS_KEY_ID", g.key_id.as_str()), ("AWS_SECRET_ACCESS_KEY", g.secret.as_str())];
    let s = Server::start_configured_everywhere("files-s3", &env, &toml);
    let key = s.data_key.clone();
    let patient = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Lindqvist"}]})).await.id();
    let content = xray();
    let up = upload(&s, &key, &patient, "image/png", &content).await;
    assert_eq!(up.status, 201, "{}", up.text);
    let id = up.id();
    assert_eq!(raw(&s, &key, &id, None).await.bytes, content);
    let r = raw(&s, &key, &id, Some("bytes=65530-65545")).await;
    assert_eq!((r.status, &r.bytes[..]), (206, &content[65_530..65_546]));
    assert!(objects(&s.data).is_empty(), "nothing in the local folder");

    // What the bucket holds, read back through the S3 API: sealed bytes only, no metadata, and
    // a random name under the prefix.
    let object = s.db().query("SELECT object FROM files")[0][0].clone();
    assert!(!object.contains(&patient) && !object.contains(&id));
    let settings = valv_files::s3::S3Settings { bucket: g.bucket.clone(), region: g.region.clone(), endpoint: Some(g.endpoint.clone()), ca_file: None, prefix: "valv/".into() };
    let bucket = valv_files::s3::S3::connect(&settings, g.key_id.clone(), g.secret.clone(), None).expect("client");
    use valv_files::ObjectStore as _;
    let size = bucket.size(&object).await.expect("size").expect("in the bucket");
    assert_eq!(size, valv_crypto::stream::sealed_len(content.len() as u64));
    let stored = bucket.read_range(&object, 0, size).await.expect("read back");
    assert!(!CANARY.windows(12).any(|w| contains(&stored, w)), "canary bytes in the bucket");
    // The bucket's folders on Garage's disk, and everything of the server's (its log included).
    for f in walk(g.files()).into_iter().chain(walk(&s.dir)) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(!CANARY.windows(12).any(|w| contains(&bytes, w)), "canary bytes in {}", f.display());
    }

    let out = crate::harness::run_ok_env(&s.data, &["erase", "--patient", &patient, "--reason", "GDPR Art. 17 request 2026-302"], &env);
    assert!(out.contains("1 files deleted"), "{out}");
    assert_eq!(bucket.size(&object).await.expect("size"), None, "deleted from the bucket");
}

/// A real clamd (Debian's clamav-daemon) on a free loopback port, with a database of one
/// signature: the EICAR test file's MD5 (`sigtool --md5`), since freshclam cannot reach its
/// mirrors here. Its stream limit is 1 MiB, as the server's `files.scan_max_bytes`.
struct Clamd {
    dir: PathBuf,
    child: std::process::Child,
    port: u16,
    scratch: PathBuf,
}

const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

impl Clamd {
    fn start() -> Clamd {
        Clamd::start_on(free_port())
    }

    fn start_on(port: u16) -> Clamd {
        let dir = std::env::temp_dir().join(format!("valv-clamd-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(dir.join("db")).expect("clamd dir");
        std::fs::write(dir.join("eicar.com"), EICAR).expect("eicar");
        let sig = std::process::Command::new("sigtool").arg("--md5").arg(dir.join("eicar.com")).output().expect("sigtool (apt-get install clamav-daemon; .ci/run does)");
        assert!(sig.status.success(), "sigtool: {}", String::from_utf8_lossy(&sig.stderr));
        std::fs::write(dir.join("db/eicar.hdb"), &sig.stdout).expect("signature");
        std::fs::remove_file(dir.join("eicar.com")).expect("remove eicar");
        let root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
        // clamd keeps each stream in a temporary file while it scans: on a tmpfs, never a disk
        // (docs/FILES.md).
        let scratch = if Path::new("/dev/shm").is_dir() { PathBuf::from(format!("/dev/shm/valv-clamd-{port}")) } else { dir.join("tmp") };
        std::fs::create_dir_all(&scratch).expect("clamd scratch");
        let conf = format!(
            "Foreground yes\nDatabaseDirectory {d}/db\nTemporaryDirectory {t}\nTCPSocket {port}\nTCPAddr 127.0.0.1\nStreamMaxLength 1M\nLogFile {d}/clamd.log\nPidFile {d}/clamd.pid\n{user}",
            d = dir.display(),
            t = scratch.display(),
            user = if root { "User root\n" } else { "" }
        );
        std::fs::write(dir.join("clamd.conf"), conf).expect("clamd.conf");
        let program = if Path::new("/usr/sbin/clamd").exists() { "/usr/sbin/clamd" } else { "clamd" };
        let child = std::process::Command::new(program)
            .arg("-c")
            .arg(dir.join("clamd.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("clamd (apt-get install clamav-daemon; .ci/run does)");
        let c = Clamd { dir, child, port, scratch };
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < std::time::Duration::from_secs(60), "clamd did not start: {}", std::fs::read_to_string(c.dir.join("clamd.log")).unwrap_or_default());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        c
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// The file's status as a read shows it, once it is no longer pending.
async fn scanned(s: &Server, key: &str, id: &str) -> Resp {
    for _ in 0..200 {
        let r = raw(s, key, id, None).await;
        if r.status != 409 {
            return r;
        }
        assert!(r.header("retry-after").is_some(), "409 without Retry-After");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("Binary/{id} stayed pending for 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_clamd_marks_eicar_infected_and_it_is_never_served() {
    let clamd = Clamd::start();
    // The site serves files beyond the scanner's limits, and its policy only for treatment.
    let policies = clamd.dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("site.cedar"),
        "@id(\"site-unscannable-for-treatment\")\n@reason(\"files the scanner could not pass are opened for treatment only\")\n\
         forbid (principal, action, resource == Valv::ResourceType::\"Binary\") when { context.file_scan == \"unscannable\" && context.purpose != \"TREAT\" };\n",
    )
    .expect("policy");
    let toml = format!(
        "[files]\nclamd = \"127.0.0.1:{}\"\nscan_max_bytes = 1048576\nserve_unscannable = true\n[policy]\ndir = \"{}\"\n",
        clamd.port,
        policies.display()
    );
    let s = Server::start_configured("files-scan", &[], &toml);
    let key = s.data_key.clone();
    let patient = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Scan"}]})).await.id();

    // Sent as FHIR JSON (never scanned), with a forged file extension claiming a clean scan: the
    // extension is dropped, and the bytes are not served raw while a scanner is configured.
    let forged = serde_json::json!({"resourceType": "Binary", "contentType": "application/octet-stream",
        "securityContext": {"reference": format!("Patient/{patient}")}, "data": base64::engine::general_purpose::STANDARD.encode(EICAR),
        "meta": {"extension": [{"url": "https://valv.dev/fhir/StructureDefinition/file", "extension": [{"url": "scan", "valueCode": "clean"}]}]}});
    let json_binary = s.post("/fhir/Binary", &forged).await;
    assert_eq!(json_binary.status, 201, "{}", json_binary.text);
    assert!(json_binary.json["meta"].get("extension").is_none(), "the forged extension is not kept: {}", json_binary.text);
    assert!(raw(&s, &key, &json_binary.id(), None).await.outcome(403).contains("never scanned"));

    let infected = upload(&s, &key, &patient, "application/octet-stream", EICAR).await;
    assert_eq!(infected.status, 201, "{}", infected.text);
    assert_eq!(infected.json["meta"]["extension"][0]["extension"][2]["valueCode"], "pending");
    let clean = upload(&s, &key, &patient, "text/plain", b"an ordinary referral letter").await.id();
    // Over the scanner's limit: marked, not passed.
    let big: Vec<u8> = (0..(1 << 20) + 10).map(|i| (i % 249) as u8).collect();
    let large = upload(&s, &key, &patient, "application/dicom", &big).await.id();

    let r = scanned(&s, &key, &infected.id()).await;
    assert!(r.outcome(403).contains("deny: file-infected"), "the policy names the refusal: {}", r.text);
    assert_eq!(scanned(&s, &key, &clean).await.bytes, b"an ordinary referral letter");
    // The scan status is a fact of the site's policy: the loader's operations purpose is refused
    // the unscannable file (and the refusal audited under the site's rule), treatment is not.
    assert!(scanned(&s, &key, &large).await.outcome(403).contains("site-unscannable-for-treatment"));
    let treat = s.request("GET", &format!("/fhir/Binary/{large}"), Some(&key), None, &[("accept", "application/dicom"), ("x-purpose-of-use", "TREAT")]).await;
    assert_eq!((treat.status, treat.header("x-scan-status")), (200, Some("unscannable")), "{}", treat.text);
    assert!(treat.bytes == big, "the unscannable file's bytes, for treatment");
    let denials: Vec<String> = audit_log(&s.data)
        .iter()
        .filter(|e| e["outcome"] == "denied" && e["resource_id"] == large.as_str())
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(!denials.is_empty() && denials.iter().all(|r| r == "deny: site-unscannable-for-treatment"), "{denials:?}");
    // Never served by any road: not as a range, not inline in FHIR JSON.
    raw(&s, &key, &infected.id(), Some("bytes=0-10")).await.outcome(403);
    let json = s.request("GET", &format!("/fhir/Binary/{}", infected.id()), Some(&key), None, &[("accept", "application/fhir+json")]).await;
    assert_eq!(json.status, 200, "{}", json.text);
    assert!(json.json.get("data").is_none(), "no data for an infected file: {}", json.text);
    assert_eq!(json.json["meta"]["extension"][0]["extension"][2]["valueCode"], "infected");
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.lines().any(|l| l == "valv_files_infected_total 1"), "{metrics}");
    assert!(walk(&clamd.scratch).is_empty(), "clamd left decrypted files in its temporary folder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_stay_pending_while_clamd_is_down_and_are_scanned_when_it_returns() {
    let port = free_port();
    let toml = format!("[files]\nclamd = \"127.0.0.1:{port}\"\nscan_max_bytes = 1048576\n");
    let s = Server::start_configured("files-scan-outage", &[], &toml);
    let key = s.data_key.clone();
    let patient = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Outage"}]})).await.id();
    let id = upload(&s, &key, &patient, "text/plain", b"scanned later").await.id();
    // The scanner tries every 2 s and gives up on a file after 3 failures of its own: clamd
    // being away is none, so the file waits.
    tokio::time::sleep(std::time::Duration::from_secs(9)).await;
    let waiting = raw(&s, &key, &id, None).await;
    assert!(waiting.outcome(409).contains("waiting for its malware scan"), "{}", waiting.text);
    let _clamd = Clamd::start_on(port);
    let r = scanned(&s, &key, &id).await;
    assert_eq!((r.status, r.header("x-scan-status"), &r.bytes[..]), (200, Some("clean"), &b"scanned later"[..]), "{}", r.text);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// The path of an absolute URL the server gave.
fn path_of(url: &str) -> String {
    url[url.find("/files/").unwrap_or_else(|| panic!("not a ticket URL: {url}"))..].to_string()
}

fn param<'a>(r: &'a Resp, name: &str) -> &'a Value {
    r.json["parameter"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == name)).unwrap_or_else(|| panic!("no {name} in {}", r.text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_open_one_file_for_one_person_briefly_a_bounded_number_of_times() {
    let Ward { s, token, mine, other, now } = ward("files-tickets", "Lindqvist", "Grannlund").await;
    let content = xray();
    let id = upload(&s, &token, &mine, "image/png", &content).await.id();
    let theirs = upload(&s, &s.data_key, &other, "image/png", b"not yours").await.id();

    // Asked for by the physician: two uses, a minute.
    let t = s.request("POST", &format!("/fhir/Binary/{id}/$ticket?uses=2&seconds=60"), Some(&token), None, &[]).await;
    assert_eq!(t.status, 200, "{}", t.text);
    let url = path_of(param(&t, "url")["valueUrl"].as_str().expect("url"));
    let handle = param(&t, "id")["valueString"].as_str().expect("id").to_string();
    assert_eq!(param(&t, "uses")["valueInteger"], 2);
    assert!(!url.contains(&id) && !url.contains(&mine), "the URL names neither file nor patient");
    // No bearer token: the ticket is the credential; a viewer on another origin may embed it.
    let first = s.request("GET", &url, None, None, &[]).await;
    assert_eq!((first.status, first.bytes.len()), (200, content.len()), "{}", first.text);
    assert_eq!(first.header("cross-origin-resource-policy"), Some("cross-origin"));
    let part = s.request("GET", &url, None, None, &[("range", "bytes=10-19")]).await;
    assert_eq!((part.status, &part.bytes[..]), (206, &content[10..20]));
    assert!(s.request("GET", &url, None, None, &[]).await.outcome(403).contains("used up"), "a third use");
    // A changed character is no ticket.
    let mut forged = url.clone();
    let last = forged.pop().expect("char");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    s.request("GET", &forged, None, None, &[]).await.outcome(404);

    // A ticket whose row was altered in the database (more uses granted) no longer opens.
    let t = s.request("POST", &format!("/fhir/Binary/{id}/$ticket"), Some(&token), None, &[]).await;
    let altered = path_of(param(&t, "url")["valueUrl"].as_str().expect("url"));
    let altered_id = param(&t, "id")["valueString"].as_str().expect("id").to_string();
    assert_eq!(s.db().execute(&format!("UPDATE file_tickets SET uses = 100 WHERE id = '{altered_id}'")), 1);
    s.request("GET", &altered, None, None, &[]).await.outcome(404);

    // Refused: another patient's file (outside the care team), a service, bad limits.
    s.request("POST", &format!("/fhir/Binary/{theirs}/$ticket"), Some(&token), None, &[]).await.outcome(403);
    s.request("POST", &format!("/fhir/Binary/{id}/$ticket"), Some(&s.data_key), None, &[]).await.outcome(403);
    for bad in ["uses=0", "uses=101", "seconds=0", "seconds=301", "other=1"] {
        s.request("POST", &format!("/fhir/Binary/{id}/$ticket?{bad}"), Some(&token), None, &[]).await.outcome(400);
    }

    // Expired after its lifetime (the server's clock moved on).
    let t = s.request("POST", &format!("/fhir/Binary/{id}/$ticket?seconds=5"), Some(&token), None, &[]).await;
    let short = path_of(param(&t, "url")["valueUrl"].as_str().expect("url"));
    s.set_clock(now + 6_000);
    assert!(s.request("GET", &short, None, None, &[]).await.outcome(403).contains("expired"));
    // Revoked by its holder, and all of the person's by the person.
    let t = s.request("POST", &format!("/fhir/Binary/{id}/$ticket?uses=5"), Some(&token), None, &[]).await;
    let held = path_of(param(&t, "url")["valueUrl"].as_str().expect("url"));
    assert_eq!(s.request("DELETE", &held, None, None, &[]).await.status, 200);
    assert!(s.request("GET", &held, None, None, &[]).await.outcome(403).contains("revoked"));
    let t = s.request("POST", &format!("/fhir/Binary/{id}/$ticket?uses=5"), Some(&token), None, &[]).await;
    let later = path_of(param(&t, "url")["valueUrl"].as_str().expect("url"));
    assert_eq!(s.request("DELETE", &format!("/fhir/Binary/{id}/$ticket"), Some(&token), None, &[]).await.status, 200);
    assert!(s.request("GET", &later, None, None, &[]).await.outcome(403).contains("revoked"));

    // Each use audited as the physician, with the ticket's handle and the file's hash.
    let log = audit_log(&s.data);
    let uses: Vec<&Value> = log.iter().filter(|e| e["reason"].as_str().is_some_and(|r| r.contains(&format!("ticket {handle} use ")))).collect();
    assert_eq!(uses.len(), 2, "{uses:?}");
    assert!(uses.iter().all(|e| e["agent_id"] != "" && e["resource_id"] == id.as_str() && e["reason"].as_str().is_some_and(|r| r.contains("sha256="))));
    assert!(log.iter().any(|e| e["reason"].as_str().is_some_and(|r| r == format!("ticket {handle} used up"))), "the refused third use");

    // A deleted Binary's bytes are gone from every road: its current id, its earlier version,
    // and a ticket issued before the deletion.
    let t = s.request("POST", &format!("/fhir/Binary/{id}/$ticket?uses=5"), Some(&token), None, &[]).await;
    let before = path_of(param(&t, "url")["valueUrl"].as_str().expect("url"));
    assert_eq!(s.request("DELETE", &format!("/fhir/Binary/{id}"), Some(&token), None, &[]).await.status, 200);
    raw(&s, &token, &id, None).await.outcome(410);
    s.request("GET", &format!("/fhir/Binary/{id}/_history/1"), Some(&token), None, &[("accept", "image/png")]).await.outcome(410);
    s.request("GET", &before, None, None, &[]).await.outcome(410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_carry_the_files_and_an_erasure_after_the_backup_removes_them_on_restore() {
    let mut s = Server::start("files-backup");
    let key = s.data_key.clone();
    let kept = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Kept"}]})).await.id();
    let gone = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Gone"}]})).await.id();
    // Over a backup piece (1 MiB) so that an object travels in several.
    let big: Vec<u8> = CANARY.iter().copied().cycle().take((5 << 20) / 2).collect();
    let a = upload(&s, &key, &kept, "application/dicom", &big).await.id();
    let b = upload(&s, &key, &gone, "application/pdf", b"%PDF-1.7 a referral").await.id();
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("random");
    let identity = valv_age::Identity::from_bytes(secret);
    let id_file = s.dir.join("identity.txt");
    std::fs::write(&id_file, format!("{}\n", identity.to_bech32().as_str())).expect("identity");
    let out = s.dir.join("backups").join("one.age");
    std::fs::create_dir_all(out.parent().expect("folder")).expect("folder");
    run_ok(&s.data, &["backup", "--out", out.to_str().expect("path"), "--recipient", &identity.recipient().to_bech32()]);
    let backup = std::fs::read(&out).expect("backup");
    assert!(!CANARY.windows(12).any(|w| contains(&backup, w)), "the backup holds no plaintext of the file");
    // Erased after the backup: the ledger beside the backup erases it again on restore.
    run_ok(&s.data, &["erase", "--patient", &gone, "--reason", "GDPR Art. 17 request 2026-303"]);

    s.kill9();
    std::fs::remove_dir_all(&s.data).expect("wipe");
    let restored = run_ok(&s.data, &["restore", out.to_str().expect("path"), "--identity", id_file.to_str().expect("path")]);
    assert!(restored.contains("1 more re-applied from the ledger"), "{restored}");
    assert_eq!(objects(&s.data).len(), 1, "the kept file's object only");
    s.restart();
    let back = raw(&s, &key, &a, None).await;
    assert_eq!((back.status, back.bytes.len()), (200, big.len()));
    assert!(back.bytes == big, "byte-identical after the restore");
    assert_eq!(raw(&s, &key, &b, None).await.status, 410, "the erased patient's file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patients_export_holds_their_files_opened_by_the_reference_age() {
    let s = Server::start("files-export");
    let key = s.data_key.clone();
    let p = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Exported"}]})).await.id();
    let scan: Vec<u8> = (0..200_000).map(|i| (i % 253) as u8).collect();
    let id = upload(&s, &key, &p, "image/jpeg", &scan).await.id();
    let work = s.dir.join("export-work");
    std::fs::create_dir_all(&work).expect("work");
    let keyfile = work.join("patient.key");
    assert!(std::process::Command::new("age-keygen").arg("-o").arg(&keyfile).output().expect("age-keygen (apt-get install age)").status.success());
    let recipient = std::fs::read_to_string(&keyfile).expect("key").lines().find_map(|l| l.strip_prefix("# public key: ")).expect("public key").to_string();
    let out = work.join("record.age");
    run_ok(&s.data, &["export", "--patient", &p, "--recipient", &recipient, "--out", out.to_str().expect("path")]);
    let tar = std::process::Command::new("age").arg("-d").arg("-i").arg(&keyfile).arg(&out).output().expect("age");
    assert!(tar.status.success(), "{}", String::from_utf8_lossy(&tar.stderr));
    std::fs::write(work.join("x.tar"), &tar.stdout).expect("tar");
    assert!(std::process::Command::new("tar").arg("-xf").arg("x.tar").current_dir(&work).status().expect("tar").success());
    assert_eq!(std::fs::read(work.join(format!("files/Binary-{id}"))).expect("the file in the archive"), scan);
    let listed: Value = serde_json::from_slice(&std::fs::read(work.join("files.json")).expect("files.json")).expect("JSON");
    assert_eq!(listed[0]["binary"], format!("Binary/{id}"));
    assert_eq!(listed[0]["contentType"], "image/jpeg");
    assert_eq!(listed[0]["sha256"], Sha256::digest(&scan).iter().map(|b| format!("{b:02x}")).collect::<String>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumable_upload_survives_a_cut_off_part_and_becomes_one_file() {
    let s = Server::start("files-resumable");
    let key = s.data_key.clone();
    let p = s.post("/fhir/Patient", &serde_json::json!({"resourceType": "Patient", "name": [{"family": "Resumed"}]})).await.id();
    let content: Vec<u8> = (0..3 * SEGMENT + 777).map(|i| (i * 7 % 251) as u8).collect();
    let context = format!("Patient/{p}");
    let total = content.len().to_string();
    let start = |length: &str| {
        let (s, key, context, length) = (&s, key.clone(), context.clone(), length.to_string());
        async move { s.request_raw("POST", "/fhir/Binary/$upload", Some(&key), None, &[("content-type", "image/png"), ("x-security-context", &context), ("upload-length", &length)]).await }
    };
    start("").await.outcome(400);
    // A patient that does not exist: refused, and no data key is made for the invented id.
    let ghost = s.request_raw("POST", "/fhir/Binary/$upload", Some(&key), None, &[("content-type", "image/png"), ("x-security-context", "Patient/no-such-patient"), ("upload-length", "10")]).await;
    assert!(ghost.outcome(422).contains("does not exist"));
    assert_eq!(s.db().query("SELECT count(*) FROM data_keys WHERE name = 'patient:no-such-patient'")[0][0], "0");
    start(&(9u64 << 30).to_string()).await.outcome(413);
    let started = start(&total).await;
    assert_eq!(started.status, 201, "{}", started.text);
    let location = started.header("location").expect("Location");
    let session = location[location.find("/fhir/").expect("path")..].to_string();
    assert_eq!(started.header("upload-offset"), Some("0"));
    let part = |from: usize, to: usize, offset: usize| {
        let (s, key, session, body) = (&s, key.clone(), session.clone(), content[from..to].to_vec());
        async move { s.request_raw("PATCH", &session, Some(&key), Some(body), &[("content-type", "application/offset+octet-stream"), ("upload-offset", &offset.to_string())]).await }
    };
    // A refused part may be refused before its body is read; the server then closes the
    // connection while the client is still writing: a send error is that refusal (409) too.
    let try_part = |from: usize, to: usize, offset: usize| {
        let (s, key, session, body) = (&s, key.clone(), session.clone(), content[from..to].to_vec());
        async move { s.try_request("PATCH", &session, Some(&key), Some(body), &[("content-type", "application/offset+octet-stream"), ("upload-offset", &offset.to_string())]).await }
    };
    let status = |r: &Result<crate::harness::Resp, String>| r.as_ref().map_or(409, |r| r.status);
    let text = |r: &Result<crate::harness::Resp, String>| r.as_ref().map_or_else(|e| e.clone(), |r| r.text.clone());
    let first = part(0, 100_000, 0).await;
    assert_eq!((first.status, first.header("upload-offset")), (204, Some("100000")), "{}", first.text);
    let again = try_part(0, 100_000, 0).await;
    assert_eq!(status(&again), 409, "{}", text(&again));
    // Another client cannot continue it.
    let auditor = s.auditor_key.clone();
    let foreign = s.try_request("PATCH", &session, Some(&auditor), Some(content[100_000..].to_vec()), &[("content-type", "application/offset+octet-stream"), ("upload-offset", "100000")]).await;
    // Refused before its body is read, the answer may be cut off by the closed connection.
    assert!(foreign.as_ref().map_or(true, |r| r.status == 404), "{}", text(&foreign));

    // A part cut off half way counts for nothing.
    {
        use tokio::io::AsyncWriteExt;
        let mut conn = crate::exhaustion::connect(&s, "127.0.0.1".parse().expect("ip"), &[b"http/1.1"]).await.expect("connect");
        let head = format!("PATCH {session} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\ncontent-type: application/offset+octet-stream\r\nupload-offset: 100000\r\ncontent-length: 97385\r\n\r\n");
        conn.write_all(head.as_bytes()).await.expect("headers");
        conn.write_all(&content[100_000..150_000]).await.expect("half a part");
        conn.flush().await.expect("flush");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let head = s.request("HEAD", &session, Some(&key), None, &[]).await;
    assert_eq!((head.status, head.header("upload-offset"), head.header("upload-length")), (200, Some("100000"), Some(total.as_str())));
    assert_eq!(objects(&s.data).len(), 1, "the first part only: {:?}", objects(&s.data));

    // A client's retry racing its first try: one part is stored, the other refused, and the
    // refused one removes nothing of it.
    let (a, b) = tokio::join!(try_part(100_000, 150_000, 100_000), try_part(100_000, 150_000, 100_000));
    let mut statuses = [status(&a), status(&b)];
    statuses.sort();
    assert_eq!(statuses, [204, 409], "{} / {}", text(&a), text(&b));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(s.request("HEAD", &session, Some(&key), None, &[]).await.header("upload-offset"), Some("150000"));
    assert_eq!(objects(&s.data).len(), 2, "two parts: {:?}", objects(&s.data));

    let last = part(150_000, content.len(), 150_000).await;
    assert_eq!(last.status, 201, "{}", last.text);
    let id = last.id();
    assert_eq!(last.json["meta"]["extension"][0]["extension"][1]["valueBase64Binary"], base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&content)));
    assert_eq!(raw(&s, &key, &id, None).await.bytes, content, "the parts became one file");
    assert_eq!(objects(&s.data).len(), 1, "the parts are gone, the file's object stays");
    assert_eq!(s.request("HEAD", &session, Some(&key), None, &[]).await.status, 404, "the session is over");

    // Abandoned: nothing stays.
    let other = start(&total).await;
    let loc = other.header("location").expect("Location");
    let abandoned = loc[loc.find("/fhir/").expect("path")..].to_string();
    let r = s.request_raw("PATCH", &abandoned, Some(&key), Some(content[..5000].to_vec()), &[("content-type", "application/offset+octet-stream"), ("upload-offset", "0")]).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(s.request("DELETE", &abandoned, Some(&key), None, &[]).await.status, 204);
    assert_eq!(s.request("HEAD", &abandoned, Some(&key), None, &[]).await.status, 404);
    assert_eq!(objects(&s.data).len(), 1, "the abandoned part is gone");
    let log = audit_log(&s.data);
    assert!(log.iter().any(|e| e["interaction"] == "upload-part" && e["reason"].as_str().is_some_and(|r| r.contains("bytes 0-99999/"))), "each part audited");
    assert!(log.iter().any(|e| e["status"] == 201 && e["reason"].as_str().is_some_and(|r| r.contains("resumable upload in 3 parts; file sha256="))));
}
