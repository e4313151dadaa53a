//! Several Valv servers on one PostgreSQL database (issue "postgres"): any server answers any
//! request consistently, sessions and lockouts are shared, access facts written through one are
//! decided on by the other, and both append to one audit log that one elected integrator signs
//! and one elected detection engine reads — and that the other takes over when it dies. Runs only on PostgreSQL (`VALV_TEST_STORE=postgres`).

use crate::access::{care_team, consent, actor, create, people, LONG_SESSIONS};
use crate::harness::{postgres, run_ok, Server};
use crate::identity::{login, totp, PASSWORD};
use crate::independent::{build_checker, check, hashes, line, settled_checkpoint};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::json;
use std::time::{Duration, Instant};

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

#[tokio::test]
async fn two_servers_share_one_database_and_one_audit_log_and_the_integrator_and_detector_fail_over() {
    if postgres().is_none() {
        println!("skipped: several servers on one database need the PostgreSQL backend (VALV_TEST_STORE=postgres)");
        return;
    }
    let mut a = Server::start_configured("two-a", &[], LONG_SESSIONS);
    let b = a.sibling("two-b");
    let mut now = now_ms();
    a.set_clock(now);
    b.set_clock(now);

    // Written through one, read through the other — and the other way round.
    let patient = create(&a, &json!({"resourceType": "Patient", "name": [{"family": "Shared"}]})).await;
    let p = patient["id"].as_str().expect("id").to_string();
    let read = b.get(&format!("/fhir/Patient/{p}")).await;
    assert_eq!((read.status, read.json["name"][0]["family"].as_str()), (200, Some("Shared")), "{}", read.text);
    let mut changed = read.json.clone();
    changed["gender"] = json!("female");
    assert_eq!(b.put(&format!("/fhir/Patient/{p}"), &changed, &[("if-match", "W/\"1\"")]).await.status, 200);
    let stale = a.put(&format!("/fhir/Patient/{p}"), &patient, &[("if-match", "W/\"1\"")]).await;
    assert_eq!(stale.status, 412, "a stale write through the other server loses: {}", stale.text);
    assert_eq!(a.get(&format!("/fhir/Patient/{p}")).await.json["gender"], "female");

    // People made through one sign in through the other; a lockout on one holds on the other.
    let phys = create(&a, &json!({"resourceType": "Practitioner", "name": [{"family": "Doc"}]})).await["id"].as_str().expect("id").to_string();
    let spec = vec![("doc".to_string(), "physician", vec![], Some(phys.clone()), None), ("locky".to_string(), "assistant", vec![], None, None)];
    let users = people(&a, &mut now, &spec).await;
    b.set_clock(now);
    for _ in 0..5 {
        login(&a, "locky", "not the password at all", None).await.outcome(401);
    }
    now += 30_000;
    a.set_clock(now);
    b.set_clock(now);
    login(&b, "locky", PASSWORD, Some(&totp(&users["locky"].secret, now))).await.outcome(401);
    assert_eq!(b.get("/admin/users/locky").await.json["state"], "locked", "the lockout made on one server holds on the other");

    // A care relationship and a block written through one are decided on by the other.
    create(&a, &care_team(&p, std::slice::from_ref(&phys), "attending", None)).await;
    let doc = users["doc"].token.clone();
    let observation = create(&a, &json!({"resourceType": "Observation", "status": "final", "code": {"text": "pulse"}, "subject": {"reference": format!("Patient/{p}")}})).await;
    let path = format!("/fhir/Observation/{}", observation["id"].as_str().expect("id"));
    let until = Instant::now() + Duration::from_secs(3);
    while b.request("GET", &path, Some(&doc), None, &[]).await.status != 200 {
        assert!(Instant::now() < until, "the care team written through server 1 never counted on server 2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let block = consent(&p, "active", json!({"type": "deny", "actor": [actor(&format!("Practitioner/{phys}"))], "class": [{"code": "ClinicalData"}]}));
    create(&a, &block).await;
    let written = Instant::now();
    while b.request("GET", &path, Some(&doc), None, &[]).await.status == 200 {
        assert!(written.elapsed() < Duration::from_secs(2), "the block written through server 1 was not enforced on server 2 within 2 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("a block written through server 1 was enforced on server 2 after {} ms", written.elapsed().as_millis());

    // One audit log: both servers' entries, signed by the one integrator (server 1, first to ask).
    let (early, m) = settled_checkpoint(&a).await;
    let log = std::fs::read_to_string(a.dir.join("server.log")).expect("log");
    assert!(log.contains("this server integrates the audit log"), "server 1 leads");
    assert!(!std::fs::read_to_string(b.dir.join("server.log")).expect("log").contains("this server integrates the audit log"), "server 2 follows");
    // One detection engine too (two would each read every entry and undo each other's progress).
    assert!(log.contains("this server runs the detection engine"), "server 1 detects");
    assert!(!std::fs::read_to_string(b.dir.join("server.log")).expect("log").contains("this server runs the detection engine"), "server 2 waits");

    // Server 1 dies; server 2 takes over and signs what comes next within 5 s.
    a.kill9();
    let died = Instant::now();
    for _ in 0..5 {
        assert_eq!(b.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    let (late, n) = settled_checkpoint(&b).await;
    assert!(n > m, "{m} -> {n}");
    let took = died.elapsed();
    assert!(took < Duration::from_secs(5), "checkpoints resumed {} ms after the integrator died", took.as_millis());
    println!("checkpoints resumed {} ms after the integrator's server was killed", took.as_millis());
    assert!(std::fs::read_to_string(b.dir.join("server.log")).expect("log").contains("this server integrates the audit log"));
    // Detection goes on on server 2: second factors guessed through it raise their alert.
    for code in ["000000", "111111", "222222"] {
        login(&b, "doc", PASSWORD, Some(code)).await.outcome(401);
    }
    crate::detect::until(&b, |l| crate::detect::count(l, "mfa-failures") == 1).await;
    assert!(std::fs::read_to_string(b.dir.join("server.log")).expect("log").contains("this server runs the detection engine"));

    // The log verifies, as one tree from the first checkpoint to the last.
    let verified = run_ok(&b.data, &["audit", "verify"]);
    assert!(verified.contains("the log verifies"), "{verified}");
    let work = b.dir.join("gocheck");
    std::fs::create_dir_all(&work).expect("work dir");
    let bin = build_checker(&work);
    let leaves: Vec<String> = b.audit_rows()[..n].iter().map(|(l, _)| B64.encode(l)).collect();
    std::fs::write(work.join("checkpoint"), &late).expect("write");
    std::fs::write(work.join("early.checkpoint"), &early).expect("write");
    let vkey = b.request("GET", "/audit/key", None, None, &[]).await.text.trim().to_string();
    let mut spec = vec![format!("vkey {vkey}"), "checkpoint checkpoint".to_string()];
    spec.push(line(std::iter::once("leaves".to_string()).chain(leaves.iter().cloned())));
    for i in [0, m - 1, m, n - 1] {
        let r = b.request("GET", &format!("/audit/proof/inclusion?index={i}&size={n}"), None, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        spec.push(line(["inclusion".to_string(), i.to_string(), leaves[i].clone()].into_iter().chain(hashes(&r.json["proof"]))));
    }
    let r = b.request("GET", &format!("/audit/proof/consistency?from={m}&to={n}"), None, None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    spec.push(line(["consistency-note".to_string(), "early.checkpoint".to_string()].into_iter().chain(hashes(&r.json["proof"]))));
    let (code, out) = check(&bin, &work, "two-servers", &spec);
    assert_eq!(code, 0, "the Go checker verifies the shared log across the failover: {out}");
}
