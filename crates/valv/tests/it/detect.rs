//! The detection engine through the real server (issue 15): each intrusion rule fires on a
//! constructed attack and stays silent on its legitimate twin; alerts are read by auditors only,
//! with evidence that checks against the signed checkpoint; a restart neither repeats nor skips.

use crate::access::{people, Spec, LONG_SESSIONS};
use crate::harness::{run_ok, Server};
use crate::identity::{login, totp, PASSWORD};
use base64::Engine as _;
use serde_json::Value;

async fn alerts(s: &Server) -> Vec<Value> {
    let r = s.request("GET", "/admin/alerts?limit=500", Some(&s.auditor_key), None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["alerts"].as_array().cloned().unwrap_or_default()
}

pub(crate) fn count(list: &[Value], rule: &str) -> usize {
    list.iter().filter(|a| a["rule"] == rule).count()
}

/// The alerts once `done` holds for them (the engine reads the log a moment after the fact).
pub(crate) async fn until(s: &Server, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..100 {
        let list = alerts(s).await;
        if done(&list) {
            return list;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let list = alerts(s).await;
    panic!("the expected alerts did not come within 20 s: {list:#?}");
}

fn b64(text: &str) -> [u8; 32] {
    base64::engine::general_purpose::STANDARD.decode(text).expect("base64").try_into().expect("32 bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intrusion_rules_fire_on_attacks_stay_quiet_on_their_twins_and_survive_a_restart() {
    let mut s = Server::start_configured("detect", &[], LONG_SESSIONS);
    let mut now = crate::access::now_ms();
    s.set_clock(now);
    let spec: Vec<Spec> = ["eva.guessed", "olle.typo", "mia.mfa"].iter().map(|u| (u.to_string(), "nurse", vec![], None, None)).collect();
    let people = people(&s, &mut now, &spec).await;
    now += 30_000;
    s.set_clock(now);

    // The twin: one mistyped password, then the right one.
    assert_eq!(login(&s, "olle.typo", "correct horse battery stapel", Some(&totp(&people["olle.typo"].secret, now))).await.status, 401);
    assert_eq!(login(&s, "olle.typo", PASSWORD, Some(&totp(&people["olle.typo"].secret, now))).await.status, 200);
    // Password guessing on one account.
    for i in 0..6 {
        assert_eq!(login(&s, "eva.guessed", &format!("guess number {i}"), Some("123456")).await.status, 401);
    }
    // Second factors guessed with the right password.
    for code in ["000000", "111111", "222222"] {
        assert_eq!(login(&s, "mia.mfa", PASSWORD, Some(code)).await.status, 401);
    }
    // A revoked API key presented again.
    let key = run_ok(&s.data, &["apikey", "create", "--name", "old-lab", "--role", "service", "--scope", "system/Observation.r"]).lines().last().expect("key").trim().to_string();
    run_ok(&s.data, &["apikey", "revoke", "old-lab"]);
    assert_eq!(s.request("GET", "/fhir/Observation", Some(&key), None, &[]).await.status, 401);
    let list = until(&s, |l| count(l, "password-guessing-account") == 1 && count(l, "mfa-failures") == 1 && count(l, "revoked-credential") == 1).await;
    assert_eq!(list.len(), 3, "nothing else (no alert for the mistyped password): {list:#?}");
    let mfa = list.iter().find(|a| a["rule"] == "mfa-failures").expect("mfa");
    assert!(mfa["severity"] == "high" && mfa["explanation"].as_str().is_some_and(|t| t.contains("3 wrong second factors")), "{mfa}");

    // Credential stuffing: the same address tries names it does not know.
    for i in 0..5 {
        assert_eq!(login(&s, &format!("someone.{i}"), "Summer2026!", None).await.status, 401);
    }
    // A flood of requests without credentials from one address (many at once: refusals within a
    // second share one compacted audit entry, answered when it is durable).
    let client = std::sync::Arc::new(Server::client_for(&s.data, s.port, ""));
    // Waves near the server's connections per address (one it resets is no audited refusal, so
    // waves go on until 320 were answered).
    let mut refused = 0;
    for _ in 0..20 {
        let mut wave = tokio::task::JoinSet::new();
        for _ in 0..40 {
            let client = client.clone();
            wave.spawn(async move { client.get("/fhir/Patient", None).await.map(|r| r.status) });
        }
        while let Some(answer) = wave.join_next().await {
            match answer.expect("task") {
                Ok(401 | 429) => refused += 1,
                Ok(other) => panic!("a request without credentials answered {other}"),
                Err(_) => {}
            }
        }
        if refused >= 320 {
            break;
        }
    }
    assert!(refused >= 320, "only {refused} refusals answered");
    let list = until(&s, |l| count(l, "credential-stuffing") == 1 && count(l, "unauthenticated-flood") == 1).await;
    let stuffing = list.iter().find(|a| a["rule"] == "credential-stuffing").expect("stuffing");
    assert!(stuffing["subject"].as_str().is_some_and(|t| t.starts_with("address:")), "{stuffing}");

    // Evidence: each entry's inclusion proof checks against the signed checkpoint.
    let guess = list.iter().find(|a| a["rule"] == "password-guessing-account").expect("guessing");
    let id = guess["id"].as_str().expect("id").to_string();
    assert_eq!(guess["evidence"].as_array().map(Vec::len), Some(5), "the five wrong passwords that reached the threshold: {guess}");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let one = s.request("GET", &format!("/admin/alerts/{id}"), Some(&s.auditor_key), None, &[]).await;
    assert_eq!(one.status, 200, "{}", one.text);
    let verifier = valv_audit::Verifier::from_vkey(one.json["logKey"].as_str().expect("key").trim()).expect("vkey");
    let checkpoint = valv_audit::open_checkpoint(one.json["checkpoint"].as_str().expect("note"), std::slice::from_ref(&verifier)).expect("signed");
    for e in one.json["evidence"].as_array().expect("evidence") {
        let proof: Vec<[u8; 32]> = e["proof"].as_array().expect("proof").iter().map(|h| b64(h.as_str().expect("hash"))).collect();
        let index = e["index"].as_u64().expect("index");
        valv_audit::merkle::verify_inclusion(index, checkpoint.size, &b64(e["leafHash"].as_str().expect("leaf")), &proof, &checkpoint.root).expect("the evidence is in the log");
    }
    // Auditors only; nothing else, and never a change.
    assert_eq!(s.request("GET", "/admin/alerts", Some(&s.data_key), None, &[]).await.status, 403);
    assert_eq!(s.request("GET", "/admin/alerts", None, None, &[]).await.status, 401);
    assert_eq!(s.request("DELETE", &format!("/admin/alerts/{id}"), Some(&s.auditor_key), None, &[]).await.status, 405);
    assert_eq!(s.request("GET", &format!("/admin/alerts/{id}"), Some(&s.auditor_key), None, &[]).await.status, 200, "still there");
    s.request("GET", "/admin/alerts?limit=0", Some(&s.auditor_key), None, &[]).await.outcome(400);
    s.request("GET", "/admin/alerts?before=99999-nothing", Some(&s.auditor_key), None, &[]).await.outcome(400);
    // Paged: each page links the next, and the pages together are the list.
    let mut paged = Vec::new();
    let mut next = Some("/admin/alerts?limit=2".to_string());
    while let Some(url) = next {
        let page = s.request("GET", &url, Some(&s.auditor_key), None, &[]).await;
        paged.extend(page.json["alerts"].as_array().cloned().unwrap_or_default());
        next = page.json["next"].as_str().map(str::to_string);
    }
    assert_eq!(paged, list, "pages of two give the whole list, in order");
    s.request("GET", "/admin/alerts/x'%20OR%201=1", Some(&s.auditor_key), None, &[]).await.outcome(400);

    // Carried to the audit log (and so to the SIEM), counted, and on the console.
    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.lines().any(|l| l.contains("\"interaction\":\"alert\"") && l.contains(&id)), "the alert is an audit entry");
    assert!(log.lines().any(|l| l.contains("\"interaction\":\"alerts-read\"") && l.contains("\"status\":405")), "the refused DELETE is audited");
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.contains("valv_alerts_total{rule=\"mfa-failures\",severity=\"high\"} 1"), "{metrics}");
    let console = run_ok(&s.data, &["alerts", "--json"]);
    assert_eq!(console.lines().count(), list.len(), "{console}");

    // Restart: nothing raised again, nothing skipped (a new attack after it is seen).
    let before: Vec<String> = list.iter().map(|a| a["id"].as_str().expect("id").to_string()).collect();
    s.restart();
    now += 11 * 60_000;
    s.set_clock(now);
    assert_eq!(s.request("GET", "/fhir/Observation", Some(&key), None, &[]).await.status, 401);
    let after = until(&s, |l| count(l, "revoked-credential") == 2).await;
    let ids: Vec<&str> = after.iter().map(|a| a["id"].as_str().expect("id")).collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "no alert twice: {ids:?}");
    assert!(before.iter().all(|b| ids.contains(&b.as_str())), "the earlier alerts are kept");
    assert_eq!(after.len(), before.len() + 1, "exactly the new one: {after:#?}");

    // After a restart the rules' state is saved again with the next progress, even without an
    // alert: a server restarted again soon after does not read the same stretch again.
    let progress = |s: &Server| s.db().query("SELECT next, state_at FROM detection").first().map(|r| (r[0].parse::<u64>().expect("next"), r[1].parse::<u64>().expect("state_at")));
    let saved = progress(&s).expect("progress stored");
    s.restart();
    assert_eq!(s.get("/fhir/Observation?_count=1").await.status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !progress(&s).is_some_and(|(next, at)| next > saved.0 && at == next) {
        assert!(std::time::Instant::now() < deadline, "the state was not saved again after the restart: {:?} then {:?}", saved, progress(&s));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A CareTeam of `patient` with the unit as its member: the permission to look, not a reason.
pub(crate) fn unit_team(patient: &str, unit: &str) -> Value {
    serde_json::json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")},
        "participant": [{"member": {"reference": format!("Organization/{unit}")}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snooping_rules_flag_unexplained_looks_at_a_relative_and_a_vip_and_not_the_explained_one() {
    use crate::access::{create, organization};
    use serde_json::json;
    let s = Server::start_configured("snoop", &[], &format!("{LONG_SESSIONS}[detect]\nexplain_delay_minutes = 0\n"));
    let mut now = crate::access::now_ms();
    s.set_clock(now);
    let id = |v: Value| v["id"].as_str().expect("id").to_string();
    let ward = organization(&s, "Ward 4", None).await;
    let home = json!([{"line": ["Storgatan 12"], "city": "Mölndal", "postalCode": "43130"}]);
    let dr = id(create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": "Lindqvist"}], "address": home})).await);
    let sister = id(create(&s, &json!({"resourceType": "Patient", "name": [{"family": "Lindqvist", "given": ["Karin"]}], "address": home})).await);
    let vip = id(create(&s, &json!({"resourceType": "Patient", "name": [{"family": "Berg"}],
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "V"}]}})).await);
    let seen = id(create(&s, &json!({"resourceType": "Patient", "name": [{"family": "Holm"}], "address": home,
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMP"}]}})).await);
    for p in [&sister, &vip, &seen] {
        create(&s, &unit_team(p, &ward)).await;
    }
    // The ward's encounter with `seen` today explains looking at their record (though they are
    // staff and live at the same address).
    let today = valv_fhir::date::format_instant(now - 3_600_000);
    create(&s, &json!({"resourceType": "Encounter", "status": "in-progress", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": format!("Patient/{seen}")}, "period": {"start": today}, "serviceProvider": {"reference": format!("Organization/{ward}")}})).await;
    let spec: Vec<Spec> = vec![("anna.lindqvist".into(), "physician", vec![ward.clone()], Some(dr.clone()), None)];
    let token = people(&s, &mut now, &spec).await["anna.lindqvist"].token.clone();
    for p in [&seen, &sister, &vip] {
        let r = s.request("GET", &format!("/fhir/Patient/{p}"), Some(&token), None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let list = until(&s, |l| count(l, "snooping-relative") == 1 && count(l, "snooping-sensitive") == 1).await;
    let snooping: Vec<&Value> = list.iter().filter(|a| a["rule"].as_str().is_some_and(|r| r.starts_with("snooping"))).collect();
    assert_eq!(snooping.len(), 2, "nothing about the explained look: {list:#?}");
    let relative = snooping.iter().find(|a| a["rule"] == "snooping-relative").expect("relative");
    let text = relative["explanation"].as_str().unwrap_or_default();
    assert!(text.contains(&format!("Patient/{sister}")) && text.contains("family name and address") && relative["severity"] == "high", "{relative}");
    assert!(!text.contains("Karin") && !text.contains("Storgatan"), "alerts name ids, never content: {text}");
    let sensitive = snooping.iter().find(|a| a["rule"] == "snooping-sensitive").expect("sensitive");
    assert!(sensitive["explanation"].as_str().is_some_and(|t| t.contains(&format!("Patient/{vip}")) && t.contains("restricted")), "{sensitive}");
    assert!(!list.iter().any(|a| a["explanation"].as_str().is_some_and(|t| t.contains(&format!("Patient/{seen}")))), "{list:#?}");
    // The evidence is the access's own audit entry.
    let detail = s.request("GET", &format!("/admin/alerts/{}", relative["id"].as_str().expect("id")), Some(&s.auditor_key), None, &[]).await;
    assert_eq!(detail.status, 200, "{}", detail.text);
    let index = detail.json["evidence"][0]["index"].as_u64().expect("an evidence index");
    let entry = s.request("GET", &format!("/audit/entries/{index}"), Some(&s.auditor_key), None, &[]).await;
    assert!(entry.status == 200 && entry.text.contains(&sister) && entry.text.contains("\"read\""), "{}", entry.text);
}
