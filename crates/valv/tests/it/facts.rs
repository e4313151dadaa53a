//! The facts access rests on (consents, care teams, a patient's provider, the provider tree,
//! accounts) cannot be rewritten by the roles they limit: the reproductions of the penetration
//! test of 40d3047, each now refused and audited, and the ways that remain open to the roles
//! that keep those facts in a clinic.

use crate::access::{actor, body_for, care_team, consent, create, organization, people, Spec, LONG_SESSIONS};
use crate::harness::{run_ok, Resp, Server};
use crate::identity::{auth, PASSWORD};
use serde_json::{json, Value};

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

/// The audit entries of the request that got `r`.
fn entries_of(s: &Server, r: &Resp) -> Vec<Value> {
    let rid = r.header("x-request-id").expect("request id").to_string();
    run_ok(&s.data, &["audit", "export"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("jsonl")["entry"].clone())
        .filter(|e| e["request_id"] == rid.as_str())
        .collect()
}

/// A refusal of a fact change: 403, and the request's entries record it as a denied
/// `fact-change` whose reason names `rule` and says what it would have widened.
fn refused_change(s: &Server, r: &Resp, rule: &str, widens: &str) {
    let d = r.outcome(403);
    assert!(d.contains(rule), "{d}");
    let entries = entries_of(s, r);
    let change = entries.iter().find(|e| e["interaction"] == "fact-change").unwrap_or_else(|| panic!("no fact-change entry: {entries:?}"));
    assert_eq!(change["outcome"], "denied", "{change}");
    let reason = change["reason"].as_str().expect("reason");
    assert!(reason.contains(rule) && reason.contains(widens), "{reason}");
    assert!(!entries.iter().any(|e| e["outcome"] == "success"), "nothing was done: {entries:?}");
}

#[tokio::test]
async fn the_roles_that_facts_limit_cannot_rewrite_them() {
    let s = Server::start_configured("facts", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let hospital_a = organization(&s, "Hospital A", None).await;
    let ward_a = organization(&s, "Ward A", Some(&hospital_a)).await;
    let hospital_b = organization(&s, "Hospital B", None).await;
    let ward_b = organization(&s, "Ward B", Some(&hospital_b)).await;
    let mut practitioner = std::collections::HashMap::new();
    for who in ["phys-a", "phys-b", "colleague", "asst"] {
        practitioner.insert(who, id_of(&create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": who}]})).await));
    }
    let p1 = create(&s, &json!({"resourceType": "Patient", "name": [{"family": "Facts"}], "managingOrganization": {"reference": format!("Organization/{hospital_a}")}})).await;
    let p1_id = id_of(&p1);
    let o1 = id_of(&create(&s, &body_for("Observation", &p1_id)).await);
    let team = care_team(&p1_id, &[practitioner["phys-a"].clone(), practitioner["phys-b"].clone()], "attending", None);
    let mut team = create(&s, &team).await;
    team["participant"].as_array_mut().expect("participants").push(json!({"member": {"reference": format!("Organization/{ward_a}")}}));
    assert_eq!(s.put(&format!("/fhir/CareTeam/{}", id_of(&team)), &team, &[]).await.status, 200);
    let block = consent(&p1_id, "active", json!({"type": "deny", "actor": [actor(&format!("Practitioner/{}", practitioner["phys-a"]))], "class": [{"code": "ClinicalData"}]}));
    let block = create(&s, &block).await;

    let spec: Vec<Spec> = vec![
        ("phys-a".into(), "physician", vec![ward_a.clone()], Some(practitioner["phys-a"].clone()), None),
        ("phys-b".into(), "physician", vec![ward_b.clone()], Some(practitioner["phys-b"].clone()), None),
        ("nurse-a".into(), "nurse", vec![ward_a.clone()], None, None),
        ("assistant-a".into(), "assistant", vec![ward_a.clone()], Some(practitioner["asst"].clone()), None),
        ("registrar-a".into(), "registrar", vec![ward_a.clone()], None, None),
        ("colleague".into(), "physician", vec![ward_a.clone()], Some(practitioner["colleague"].clone()), None),
    ];
    let users = people(&s, &mut now, &spec).await;
    let get = |who: &str, path: String| {
        let token = users[who].token.clone();
        let s = &s;
        async move { s.request("GET", &path, Some(&token), None, &[]).await }
    };
    let write = |who: &str, method: &'static str, path: String, body: Option<Value>| {
        let token = users[who].token.clone();
        let s = &s;
        async move { s.request(method, &path, Some(&token), body.as_ref(), &[]).await }
    };
    let observation = format!("/fhir/Observation/{o1}");

    // 1. A physician cannot lift a block against themself (withdraw or delete the Consent)…
    assert!(get("phys-a", observation.clone()).await.outcome(403).contains("patient-block"));
    let mut lifted = block.clone();
    lifted["status"] = json!("inactive");
    let consent_url = format!("/fhir/Consent/{}", id_of(&block));
    refused_change(&s, &write("phys-a", "PUT", consent_url.clone(), Some(lifted.clone())).await, "fact-self-widening", "block lifted");
    refused_change(&s, &write("phys-a", "DELETE", consent_url.clone(), None).await, "fact-self-widening", "block lifted");
    assert!(get("phys-a", observation.clone()).await.outcome(403).contains("patient-block"), "the block stands");
    // …nor can a colleague in the same care team lift it for them (lifting widens: registrars do it).
    refused_change(&s, &write("colleague", "PUT", consent_url.clone(), Some(lifted.clone())).await, "no-policy-permits", "block lifted");
    // A physician may still record a new block against someone else (it only narrows).
    let new_block = consent(&p1_id, "active", json!({"type": "deny", "actor": [actor(&format!("Practitioner/{}", practitioner["colleague"]))]}));
    let r = write("phys-a", "POST", "/fhir/Consent".into(), Some(new_block)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let recorded = entries_of(&s, &r).into_iter().find(|e| e["interaction"] == "fact-change").expect("fact-change entry");
    assert!(recorded["outcome"] == "success" && recorded["reason"].as_str().is_some_and(|r| r.contains("fact-clinician-narrows") && r.contains("narrows [block")), "{recorded}");
    assert!(get("colleague", observation.clone()).await.outcome(403).contains("patient-block"));

    // 2. Nurses and assistants cannot move the record away from its provider.
    assert!(get("phys-b", observation.clone()).await.outcome(403).contains("cross-provider-consent"));
    let mut unmanaged = p1.clone();
    unmanaged.as_object_mut().expect("object").remove("managingOrganization");
    let mut moved = p1.clone();
    moved["managingOrganization"] = json!({"reference": format!("Organization/{hospital_b}")});
    let patient_url = format!("/fhir/Patient/{p1_id}");
    refused_change(&s, &write("assistant-a", "PUT", patient_url.clone(), Some(unmanaged.clone())).await, "no-policy-permits", "provider Organization/");
    refused_change(&s, &write("nurse-a", "PUT", patient_url.clone(), Some(moved.clone())).await, "no-policy-permits", "provider Organization/");
    assert!(get("phys-b", observation.clone()).await.outcome(403).contains("cross-provider-consent"));
    assert_eq!(get("nurse-a", observation.clone()).await.status, 200, "hospital A's own nurse still reads");
    // Demographics are still theirs to keep: a change that touches no fact is no fact change.
    let mut phone = p1.clone();
    phone["telecom"] = json!([{"system": "phone", "value": "+46 8 123 456"}]);
    let r = write("assistant-a", "PUT", patient_url.clone(), Some(phone)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!entries_of(&s, &r).iter().any(|e| e["interaction"] == "fact-change"));

    // 3. An assistant (no clinical access) cannot grant clinical access through a care team.
    let p2 = id_of(&create(&s, &json!({"resourceType": "Patient", "managingOrganization": {"reference": format!("Organization/{hospital_a}")}})).await);
    let o2 = format!("/fhir/Observation/{}", id_of(&create(&s, &body_for("Observation", &p2)).await));
    create(&s, &json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{p2}")},
        "participant": [{"member": {"reference": format!("Practitioner/{}", practitioner["asst"])}}]})).await;
    assert_eq!(get("assistant-a", format!("/fhir/Patient/{p2}")).await.status, 200, "the assistant is in p2's care");
    get("colleague", o2.clone()).await.outcome(403);
    let naming = |member: String| json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{p2}")}, "participant": [{"member": {"reference": member}}]});
    refused_change(&s, &write("assistant-a", "POST", "/fhir/CareTeam".into(), Some(naming(format!("Practitioner/{}", practitioner["colleague"])))).await, "no-policy-permits", "care team +Practitioner/");
    refused_change(&s, &write("assistant-a", "POST", "/fhir/CareTeam".into(), Some(naming(format!("Organization/{hospital_a}")))).await, "no-policy-permits", "care team +Organization/");
    // The registrar of the patient's provider forms the care team.
    let r = write("registrar-a", "POST", "/fhir/CareTeam".into(), Some(naming(format!("Practitioner/{}", practitioner["colleague"])))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(get("colleague", o2.clone()).await.status, 200);
    // A transaction cannot hide a widening change behind another entry.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": body_for("Encounter", &p2), "request": {"method": "POST", "url": "Encounter"}},
        {"resource": naming(format!("Practitioner/{}", practitioner["phys-b"])), "request": {"method": "POST", "url": "CareTeam"}}]});
    refused_change(&s, &write("assistant-a", "POST", "/fhir".into(), Some(bundle)).await, "no-policy-permits", "care team +Practitioner/");

    // 4. An admin cannot become a clinician through an account they made.
    let created = s.post("/admin/users", &json!({"username": "shadow.doc", "roles": ["physician"], "units": [ward_a.clone()], "practitioner": practitioner["phys-b"]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.json["user"]["state"], "awaiting-approval");
    let token = created.json["enrollment_token"].as_str().expect("token").to_string();
    assert!(auth(&s, "/auth/enroll", None, json!({"token": token, "password": PASSWORD})).await.outcome(403).contains("approval"));
    let own = s.request("POST", "/admin/users/shadow.doc/approve", Some(&s.admin_key), None, &[]).await;
    assert!(own.outcome(403).contains("two-person"), "{}", own.text);
    // The second admin's approval code goes to the person; the token alone still enrolls nobody.
    let code = s.approve("shadow.doc").await.expect("approval code");
    assert!(auth(&s, "/auth/enroll", None, json!({"token": token, "password": PASSWORD})).await.outcome(401).contains("approval code"));
    assert_eq!(auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": code, "password": PASSWORD})).await.status, 200);
    // Roles added to an existing account wait for a second admin, who cannot be the asker.
    let r = s.request("PUT", "/admin/users/registrar-a/roles", Some(&s.admin_key), Some(&json!({"roles": ["registrar", "physician"], "units": [ward_a]})), &[]).await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["roles"], json!(["registrar"]));
    assert!(s.request("POST", "/admin/users/registrar-a/approve", Some(&s.admin_key), None, &[]).await.outcome(403).contains("two-person"));
    get("registrar-a", observation.clone()).await.outcome(403);

    let log = run_ok(&s.data, &["audit", "export"]);
    assert!(log.contains("\"interaction\":\"user-approve\""), "approvals are audited");
}

/// One row of `tests/data/fact-matrix.csv`.
struct Row {
    case: String,
    role: String,
    fact: String,
    widen: bool,
    own: bool,
    expected: String,
}

fn fact_matrix() -> Vec<Row> {
    let text = include_str!("../data/fact-matrix.csv");
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Row { case: f[0].into(), role: f[1].into(), fact: f[2].into(), widen: f[3] == "widen", own: f[4] == "self", expected: f[5].into() }
        })
        .collect()
}

/// The world of the matrix: two providers, and per writer their credential, Practitioner and
/// own unit.
struct World {
    hospital_a: String,
    hospital_b: String,
    po: String,
    token: std::collections::HashMap<String, String>,
    pw: std::collections::HashMap<String, String>,
    own_unit: std::collections::HashMap<String, String>,
    my_patient: String,
}

fn team_of(patient: &str, members: &[&str]) -> Value {
    let participants: Vec<Value> = members.iter().map(|m| json!({"member": {"reference": format!("Practitioner/{m}")}})).collect();
    json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")}, "participant": participants})
}

fn block_against(patient: &str, practitioner: &str) -> Value {
    consent(patient, "active", json!({"type": "deny", "actor": [actor(&format!("Practitioner/{practitioner}"))], "class": [{"code": "ClinicalData"}]}))
}

fn patient_at(provider: Option<&str>, id: Option<&str>) -> Value {
    let mut p = json!({"resourceType": "Patient", "name": [{"family": "Fact"}]});
    if let Some(o) = provider {
        p["managingOrganization"] = json!({"reference": format!("Organization/{o}")});
    }
    if let Some(id) = id {
        p["id"] = json!(id);
    }
    p
}

/// Sets the case's world up with the loader and returns the writer's request: method, path, body.
async fn fact_case(s: &Server, w: &World, row: &Row) -> (&'static str, String, Option<Value>) {
    let pw = w.pw[&row.role].as_str();
    let po = w.po.as_str();
    let who = if row.own { pw } else { po };
    let patient_role = row.role == "patient";
    let (a, b) = (w.hospital_a.as_str(), w.hospital_b.as_str());
    // The patient writer acts on their own record, which stays with provider A.
    let provider = match (row.fact.as_str(), row.widen, row.own) {
        _ if patient_role => Some(a),
        ("provider", true, true) => Some(b),
        ("provider", false, _) => None,
        _ => Some(a),
    };
    let p = if patient_role { w.my_patient.clone() } else { id_of(&create(s, &patient_at(provider, None)).await) };
    let team = match (row.fact.as_str(), row.widen, row.own) {
        ("care-team", true, true) => vec![po],
        ("care-team", true, false) => vec![pw],
        _ => vec![pw, po],
    };
    let t0 = create(s, &team_of(&p, &team)).await;
    match (row.fact.as_str(), row.widen) {
        ("consent", true) => {
            let mut c = create(s, &block_against(&p, who)).await;
            c["status"] = json!("inactive");
            ("PUT", format!("/fhir/Consent/{}", id_of(&c)), Some(c))
        }
        ("consent", false) => ("POST", "/fhir/Consent".into(), Some(block_against(&p, who))),
        ("care-team", true) => ("POST", "/fhir/CareTeam".into(), Some(team_of(&p, &[if row.own { pw } else { po }]))),
        ("care-team", false) => {
            let mut t = team_of(&p, &[if row.own { po } else { pw }]);
            t["id"] = t0["id"].clone();
            ("PUT", format!("/fhir/CareTeam/{}", id_of(&t0)), Some(t))
        }
        ("provider", _) => {
            let to = match (row.widen, row.own) {
                (true, true) => a,
                (true, false) | (false, true) => b,
                (false, false) => a,
            };
            ("PUT", format!("/fhir/Patient/{p}"), Some(patient_at(Some(to), Some(&p))))
        }
        _ => {
            let unit = match w.own_unit.get(&row.role) {
                Some(u) if row.own => u.clone(),
                _ => organization(s, "Fresh unit", if row.widen { None } else { Some(a) }).await,
            };
            let mut o = json!({"resourceType": "Organization", "id": unit, "name": "Moved unit"});
            if row.widen {
                o["partOf"] = json!({"reference": format!("Organization/{}", if w.own_unit.contains_key(&row.role) && row.own { b } else { a })});
            }
            ("PUT", format!("/fhir/Organization/{unit}"), Some(o))
        }
    }
}

#[tokio::test]
async fn write_matrix_over_access_facts_from_the_data_table() {
    let s = Server::start_configured("fact-matrix", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let hospital_a = organization(&s, "Hospital A", None).await;
    let ward_a = organization(&s, "Ward A", Some(&hospital_a)).await;
    let hospital_b = organization(&s, "Hospital B", None).await;
    let po = id_of(&create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": "Other"}]})).await);
    let my_patient = id_of(&create(&s, &patient_at(Some(&hospital_a), None)).await);
    let (mut pw, mut own_unit) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    let mut spec: Vec<Spec> = Vec::new();
    let roles = ["physician", "nurse", "assistant", "external_specialist", "registrar", "patient", "support"];
    for role in roles {
        pw.insert(role.to_string(), id_of(&create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": role}]})).await));
        let units = match role {
            "physician" | "nurse" | "assistant" | "registrar" => {
                let u = organization(&s, "Own unit", Some(&hospital_a)).await;
                own_unit.insert(role.to_string(), u.clone());
                vec![ward_a.clone(), u]
            }
            _ => Vec::new(),
        };
        let practitioner = (role != "patient" && role != "support").then(|| pw[role].clone());
        let patient = (role == "patient").then(|| my_patient.clone());
        spec.push((role.replace('_', "-"), role, units, practitioner, patient));
    }
    let users = people(&s, &mut now, &spec).await;
    let mut token: std::collections::HashMap<String, String> = roles.iter().map(|r| (r.to_string(), users[&r.replace('_', "-")].token.clone())).collect();
    let key = |scopes: &str, name: &str| crate::harness::last_line(&run_ok(&s.data, &["apikey", "create", "--name", name, "--role", "service", "--scope", scopes]));
    token.insert("service".into(), key(crate::harness::LOADER_SCOPES, "fact-service"));
    token.insert("service_wildcard".into(), key("system/*.cruds", "wildcard-service"));
    token.insert("admin".into(), s.admin_key.clone());
    token.insert("auditor".into(), s.auditor_key.clone());
    for role in ["admin", "auditor", "service", "service_wildcard"] {
        pw.insert(role.into(), po.clone());
    }
    let w = World { hospital_a, hospital_b, po, token, pw, own_unit, my_patient };

    let rows = fact_matrix();
    assert_eq!(rows.len(), 176, "every role x fact x widen/narrow x self/other");
    let (mut failures, mut refused) = (Vec::new(), Vec::new());
    for row in &rows {
        let (method, path, body) = fact_case(&s, &w, row).await;
        let r = s.request(method, &path, Some(&w.token[&row.role]), body.as_ref(), &[]).await;
        let got = match r.status {
            200 | 201 => "permit".to_string(),
            403 => "deny".to_string(),
            other => format!("status {other}: {}", r.text.chars().take(160).collect::<String>()),
        };
        if got != row.expected {
            failures.push(format!("case {}: {} {} {} {}: expected {}, got {got}: {}", row.case, row.role, row.fact, if row.widen { "widen" } else { "narrow" },
                if row.own { "self" } else { "other" }, row.expected, r.text.chars().take(200).collect::<String>()));
        }
        if got == "deny" {
            refused.push((row.case.clone(), r.header("x-request-id").expect("request id").to_string()));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases disagree with the table:\n{}", failures.len(), rows.len(), failures.join("\n"));
    // Every refusal is on record as a denial of that request.
    let log: Vec<Value> = run_ok(&s.data, &["audit", "export"]).lines().map(|l| serde_json::from_str::<Value>(l).expect("jsonl")["entry"].clone()).collect();
    for (case, rid) in &refused {
        assert!(log.iter().any(|e| e["request_id"] == rid.as_str() && e["outcome"] == "denied"), "case {case}: refusal not audited");
    }
}
