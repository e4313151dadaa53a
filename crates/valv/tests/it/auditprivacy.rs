//! What the audit log shows reveals nothing about another patient (issue 10, part 3): a service
//! searches for two patients at once (by personnummer, name and id), and the first of them,
//! signed in as a patient, reads their access log and their AuditEvents. Nothing of the second
//! patient may appear — not in the entries' canonical bytes, not in the AuditEvents, not base64
//! encoded — and every entry shown must still verify against the signed checkpoint with Go's
//! sumdb checker. An auditor is shown the queries and checks each against the entry's commitment
//! `query_sha256` = SHA-256(salt || query).

use crate::harness::Server;
use crate::independent::{build_checker, check, settled_checkpoint};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The Swedish personnummer system (OID 1.2.752.129.2.1.3.1).
const PNR: &str = "urn:oid:1.2.752.129.2.1.3.1";
const P1_PNR: &str = "194511239917";
/// Canaries: the second patient's personnummer and names, which the first must never be shown.
const P2_PNR: &str = "197001018831";
const P2_FAMILY: &str = "Kanarieblom";
const P2_GIVEN: &str = "Fjolina";

struct World {
    s: Server,
    p1: String,
    p2: String,
    now: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

/// Two patients, and a service's searches that each return both of them (so each leaves an
/// entry for the first patient whose query names the second).
async fn world(tag: &str) -> World {
    let s = Server::start_configured(tag, &[], crate::identity::FAST);
    let now = now_ms();
    s.set_clock(now);
    let patient = |pnr: &str, family: &str, given: &str| {
        json!({"resourceType": "Patient", "identifier": [{"system": PNR, "value": pnr}], "name": [{"family": family, "given": [given]}]})
    };
    let p1 = s.post("/fhir/Patient", &patient(P1_PNR, "Tolvansson", "Tolvan")).await.id();
    let p2 = s.post("/fhir/Patient", &patient(P2_PNR, P2_FAMILY, P2_GIVEN)).await.id();
    for (i, q) in searches(&p1, &p2).iter().enumerate() {
        let r = s.get(&format!("/fhir/Patient?{q}")).await;
        assert_eq!(r.status, 200, "search {i}: {}", r.text);
        assert_eq!(r.total(), 2, "search {i} finds both patients: {}", r.text);
    }
    // The same kind of search inside a batch.
    let batch = json!({"resourceType": "Bundle", "type": "batch",
        "entry": [{"request": {"method": "GET", "url": format!("Patient?given=Tolvan,{P2_GIVEN}")}}]});
    let r = s.post("/fhir", &batch).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["entry"][0]["resource"]["total"], 2, "{}", r.text);
    World { s, p1, p2, now }
}

fn searches(p1: &str, p2: &str) -> Vec<String> {
    vec![
        format!("identifier={PNR}%7C{P1_PNR},{PNR}%7C{P2_PNR}"),
        format!("family=Tolvansson,{P2_FAMILY}"),
        format!("_id={p1},{p2}"),
    ]
}

/// Every string in a JSON value, and what each decodes to when it is base64 (the AuditEvent's
/// `entity.query` is base64, so a leak could hide there).
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            out.push(s.clone());
            if let Ok(bytes) = B64.decode(s) {
                out.push(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push(k.clone());
            strings(x, out);
        }),
        _ => {}
    }
}

/// Fails if anything of the second patient, or any raw query of the searches, is in `body`.
fn assert_nothing_of(what: &str, body: &Value, text: &str, p2: &str) {
    let mut all = vec![text.to_string()];
    strings(body, &mut all);
    for canary in [P2_PNR, P2_FAMILY, P2_GIVEN, p2, "identifier=", "family=", "given=", "_id="] {
        if let Some(hit) = all.iter().find(|s| s.contains(canary)) {
            panic!("{what} shows '{canary}' (in {hit:.300})");
        }
    }
}

/// The commitments of the search entries an AuditEvent list shows.
fn commitments(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["subtype"][0]["code"] == "search-type")
        .flat_map(|e| e["entity"].as_array().cloned().unwrap_or_default())
        .flat_map(|en| en["detail"].as_array().cloned().unwrap_or_default())
        .filter(|d| d["type"] == "query_sha256")
        .filter_map(|d| d["valueString"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_patients_access_log_shows_nothing_of_another_patient_and_every_entry_verifies() {
    let World { s, p1, p2, mut now } = world("auditprivacy-patient").await;
    let users = crate::access::people(&s, &mut now, &[("tolvan".into(), "patient", vec![], None, Some(p1.clone()))]).await;
    let token = users["tolvan"].token.clone();
    settled_checkpoint(&s).await;

    // The AuditEvents of their own record: the searches are there, by commitment only.
    let events = s.request("GET", &format!("/fhir/AuditEvent?patient={p1}&_count=1000"), Some(&token), None, &[]).await;
    assert_eq!(events.status, 200, "{}", events.text);
    assert_nothing_of("AuditEvent?patient=<own id>", &events.json, &events.text, &p2);
    let listed: Vec<Value> = events.json["entry"].as_array().expect("entries").iter().map(|e| e["resource"].clone()).collect();
    assert!(commitments(&listed).len() >= 4, "the four searches are in the patient's AuditEvents, committed to: {}", events.text);
    // A patient reads only their own.
    s.request("GET", &format!("/fhir/AuditEvent?patient={p2}"), Some(&token), None, &[]).await.outcome(403);

    // The access log: the same, with what an independent verifier needs.
    let log = s.request("GET", &format!("/fhir/Patient/{p1}/$access-log"), Some(&token), None, &[]).await;
    assert_eq!(log.status, 200, "{}", log.text);
    assert_nothing_of("$access-log", &log.json, &log.text, &p2);
    let params = log.json["parameter"].as_array().expect("parameters");
    let get = |name: &str| params.iter().find(|x| x["name"] == name).and_then(|x| x["valueString"].as_str()).expect(name).to_string();
    let work = s.dir.join("gocheck");
    std::fs::create_dir_all(&work).expect("work dir");
    std::fs::write(work.join("checkpoint"), get("checkpoint")).expect("write");
    let mut spec = vec![format!("vkey {}", get("logKey")), "checkpoint checkpoint".to_string()];
    let (mut searches_shown, mut searches_proven, mut shown) = (0, 0, Vec::new());
    for entry in params.iter().filter(|x| x["name"] == "entry") {
        let parts = entry["part"].as_array().expect("parts");
        let part = |n: &str| parts.iter().find(|x| x["name"] == n);
        let canonical = part("canonical").and_then(|x| x["valueString"].as_str()).unwrap_or_else(|| panic!("every entry is shown whole: {entry}"));
        assert!(canonical.contains(&format!("\"patient\":\"{p1}\"")), "only this patient's entries: {canonical}");
        let leaf = B64.encode(valv_audit::merkle::leaf_hash(canonical.as_bytes()));
        assert_eq!(part("leafHash").and_then(|x| x["valueBase64Binary"].as_str()), Some(leaf.as_str()), "the shown bytes are the leaf's");
        shown.push(part("event").expect("event")["resource"].clone());
        let search = canonical.contains("\"interaction\":\"search-type\"") && canonical.contains("\"query_sha256\":\"");
        searches_shown += usize::from(search);
        if part("pending").is_some() {
            continue;
        }
        let index = part("index").and_then(|x| x["valueString"].as_str()).expect("index");
        let proof = parts.iter().filter(|x| x["name"] == "proof").map(|x| x["valueBase64Binary"].as_str().expect("b64").to_string());
        spec.push(std::iter::once(format!("inclusion {index} {leaf}")).chain(proof).collect::<Vec<_>>().join(" "));
        searches_proven += usize::from(search);
    }
    assert!(searches_proven >= 4, "the four searches are in the access log and proven: {}", log.text);
    assert_eq!(commitments(&shown).len(), searches_shown, "the events show the commitments the entries hold");
    let bin = build_checker(&work);
    let (code, out) = check(&bin, &work, "access-log", &spec);
    assert_eq!(code, 0, "Go's sumdb rejects an entry of the patient's access log:\n{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok inclusion")).count(), spec.len() - 2, "{out}");
}

#[tokio::test]
async fn an_auditor_is_shown_each_query_and_checks_it_against_the_entrys_commitment() {
    let World { s, p1, p2, .. } = world("auditprivacy-auditor").await;
    let auditor = s.auditor_key.clone();
    let events = s.request("GET", &format!("/fhir/AuditEvent?patient={p2}&_count=1000"), Some(&auditor), None, &[]).await;
    assert_eq!(events.status, 200, "{}", events.text);
    let rows = s.audit_rows();
    let mut seen = Vec::new();
    for e in events.json["entry"].as_array().expect("entries").iter().map(|e| &e["resource"]) {
        if e["subtype"][0]["code"] != "search-type" {
            continue;
        }
        let entity = e["entity"].as_array().expect("entities").iter().find(|en| en.get("query").is_some()).unwrap_or_else(|| panic!("the auditor is shown the query: {e}"));
        let query = String::from_utf8(B64.decode(entity["query"].as_str().expect("query")).expect("base64")).expect("utf-8");
        let detail = |t: &str| entity["detail"].as_array().and_then(|d| d.iter().find(|x| x["type"] == t)).cloned().unwrap_or_else(|| panic!("no {t}: {entity}"));
        let salt = B64.decode(detail("query_salt")["valueBase64Binary"].as_str().expect("salt")).expect("base64");
        let commitment = detail("query_sha256")["valueString"].as_str().expect("commitment").to_string();
        assert_eq!(salt.len(), 16, "a 128-bit salt");
        // The auditor's check, by hand: SHA-256(salt || query) is what the entry commits to ...
        let mut h = Sha256::new();
        h.update(&salt);
        h.update(query.as_bytes());
        let recomputed: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(recomputed, commitment, "the query and salt shown are the ones committed to ({query})");
        // ... and the entry, whose bytes hash to the stored leaf, holds that commitment and not the query.
        let index = e["id"].as_str().expect("id");
        let one = s.request("GET", &format!("/audit/entries/{index}"), Some(&auditor), None, &[]).await;
        assert_eq!(one.status, 200, "{}", one.text);
        assert_eq!(valv_audit::merkle::leaf_hash(one.text.as_bytes()).to_vec(), rows[index.parse::<usize>().expect("index")].0, "the bytes are the leaf's");
        assert!(one.text.contains(&format!("\"query_sha256\":\"{commitment}\"")), "{}", one.text);
        assert!(!one.text.contains(P2_PNR) && !one.text.contains(P2_FAMILY), "the entry itself holds no query: {}", one.text);
        seen.push(query);
    }
    for (want, what) in [(P2_PNR, "personnummer"), (P2_FAMILY, "family name"), (p1.as_str(), "id"), (P2_GIVEN, "given name (batch)")] {
        assert!(seen.iter().any(|q| q.contains(want)), "the auditor sees the {what} search: {seen:?}");
    }
    // The queries are sealed at rest: not in the audit log's file in the clear.
    let (db, wal) = if s.db().is_postgres() {
        // The rows as PostgreSQL stores them (the cluster's files are scanned by the canary test).
        let rows = s.db().query("SELECT sealed, coalesce(query_sealed, ''::bytea) FROM audit_entries");
        (rows.iter().flat_map(|r| r.iter().flat_map(|c| crate::harness::unhex(c))).collect(), Vec::new())
    } else {
        let read = |name: &str| std::fs::read(s.data.join(name)).unwrap_or_default();
        (read("valv-audit.db"), read("valv-audit.db-wal"))
    };
    for canary in [P2_PNR, P2_FAMILY] {
        assert!(![&db, &wal].iter().any(|b| b.windows(canary.len()).any(|w| w == canary.as_bytes())), "{canary} in the clear at rest");
    }
}
