//! Need-to-know access against the real server: the authorization matrix from
//! `tests/data/access-matrix.csv`, a property test over random care teams and grants, break-glass
//! and remote support end to end, and `valv policy explain` with a custom policy.

use crate::harness::{last_line, run_ok, Resp, Server};
use crate::identity::{access_token, auth, login, secret_of, totp, FAST, PASSWORD};
use serde_json::{json, Value};
use std::collections::HashMap;

const MIN: i64 = 60_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

/// A FHIR R4 privacy Consent of `patient` with one provision.
fn consent(patient: &str, status: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision})
}

fn actor(reference: &str) -> Value {
    json!({"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]}, "reference": {"reference": reference}})
}

/// A CareTeam of `patient` naming each practitioner with `role`, from `start` to `end` (dates).
fn care_team(patient: &str, practitioners: &[String], role: &str, end: Option<&str>) -> Value {
    let period = match end {
        Some(e) => json!({"start": "2020-01-01", "end": e}),
        None => json!({"start": "2020-01-01"}),
    };
    let participants: Vec<Value> =
        practitioners.iter().map(|p| json!({"role": [{"text": role}], "member": {"reference": format!("Practitioner/{p}")}, "period": period})).collect();
    json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")}, "participant": participants})
}

/// A resource of `resource_type` in `patient`'s compartment.
fn body_for(resource_type: &str, patient: &str) -> Value {
    let subject = json!({"reference": format!("Patient/{patient}")});
    match resource_type {
        "Observation" => json!({"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}, "subject": subject}),
        "MedicationRequest" => json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order", "medicationCodeableConcept": {"text": "paracetamol"}, "subject": subject}),
        "Encounter" => json!({"resourceType": "Encounter", "status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": subject}),
        other => panic!("no body for {other}"),
    }
}

/// Creates with the loader's key; returns the stored resource.
async fn create(s: &Server, body: &Value) -> Value {
    let t = body["resourceType"].as_str().expect("type");
    let r = s.post(&format!("/fhir/{t}"), body).await;
    assert_eq!(r.status, 201, "create {t}: {}", r.text);
    r.json
}

async fn organization(s: &Server, name: &str, part_of: Option<&str>) -> String {
    let mut o = json!({"resourceType": "Organization", "name": name});
    if let Some(p) = part_of {
        o["partOf"] = json!({"reference": format!("Organization/{p}")});
    }
    create(s, &o).await["id"].as_str().expect("id").to_string()
}

/// A person with an account: created by the admin, enrolled with a TOTP secret.
struct Person {
    username: String,
    secret: Vec<u8>,
    token: String,
}

/// Creates and enrolls users (`spec`: username, role, units, practitioner, patient), then signs
/// them in half a minute later (a TOTP code works once). The clock file must be set.
async fn people(s: &Server, now: &mut i64, spec: &[(String, &str, Vec<String>, Option<String>, Option<String>)]) -> HashMap<String, Person> {
    let mut out = HashMap::new();
    for (username, role, units, practitioner, patient) in spec {
        let mut body = json!({"username": username, "display_name": "Test Person", "roles": [role], "units": units});
        if let Some(p) = practitioner {
            body["practitioner"] = json!(p);
        }
        if let Some(p) = patient {
            body["patient"] = json!(p);
        }
        let created = s.post("/admin/users", &body).await;
        assert_eq!(created.status, 201, "{}", created.text);
        let token = created.json["enrollment_token"].as_str().expect("token").to_string();
        let e = auth(s, "/auth/enroll", None, json!({"token": token, "password": PASSWORD})).await;
        assert_eq!(e.status, 200, "{}", e.text);
        let secret = secret_of(e.json["otpauth_uri"].as_str().expect("uri"));
        let c = auth(s, "/auth/enroll/confirm", None, json!({"token": token, "totp": totp(&secret, *now)})).await;
        assert_eq!(c.status, 200, "{}", c.text);
        out.insert(username.clone(), Person { username: username.clone(), secret, token: String::new() });
    }
    *now += 30_000;
    s.set_clock(*now);
    for p in out.values_mut() {
        p.token = access_token(&login(s, &p.username, PASSWORD, Some(&totp(&p.secret, *now))).await);
    }
    out
}

async fn break_glass(s: &Server, token: &str, patient: &str, reason: Option<&str>, minutes: Option<i64>) -> Resp {
    let mut params = Vec::new();
    if let Some(r) = reason {
        params.push(json!({"name": "reason", "valueString": r}));
    }
    if let Some(m) = minutes {
        params.push(json!({"name": "duration", "valueInteger": m}));
    }
    let body = json!({"resourceType": "Parameters", "parameter": params});
    s.request("POST", &format!("/fhir/Patient/{patient}/$break-glass"), Some(token), Some(&body), &[]).await
}

/// A patient's data in the matrix world.
struct Chart {
    patient: Value,
    resources: HashMap<&'static str, Value>,
}

impl Chart {
    fn id(&self) -> String {
        self.patient["id"].as_str().expect("id").to_string()
    }
    fn resource(&self, t: &str) -> &Value {
        if t == "Patient" { &self.patient } else { &self.resources[t] }
    }
}

async fn chart(s: &Server, managing: &str) -> Chart {
    let patient = create(s, &json!({"resourceType": "Patient", "name": [{"family": "Matrix"}], "managingOrganization": {"reference": format!("Organization/{managing}")}})).await;
    let id = patient["id"].as_str().expect("id").to_string();
    let mut resources = HashMap::new();
    for t in ["Observation", "MedicationRequest", "Encounter"] {
        resources.insert(t, create(s, &body_for(t, &id)).await);
    }
    Chart { patient, resources }
}

struct Case {
    fields: HashMap<String, String>,
}

impl Case {
    fn get(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }
}

fn matrix() -> Vec<Case> {
    let text = include_str!("../data/access-matrix.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| Case { fields: header.iter().zip(l.split(',')).map(|(k, v)| (k.to_string(), v.to_string())).collect() })
        .collect()
}

/// What one request answered: `permit`, `deny`, or a description of an unexpected answer.
fn verdict(action: &str, target: &str, r: &Resp) -> String {
    match (action, r.status) {
        (_, 403) => "deny".into(),
        ("search", 200) => {
            let ids = r.entry_ids();
            match (ids.iter().any(|i| i == target), r.json["total"].as_u64()) {
                (true, Some(1)) => "permit".into(),
                (false, Some(0)) if ids.is_empty() => "deny".into(),
                (_, total) => format!("search leaked or miscounted: total {total:?}, ids {ids:?}"),
            }
        }
        ("read" | "history" | "update" | "delete", 200) | ("create", 201) => "permit".into(),
        (_, status) => format!("status {status}: {}", r.text.chars().take(200).collect::<String>()),
    }
}

#[tokio::test]
async fn authorization_matrix_from_the_data_table() {
    let s = Server::start_configured("access-matrix", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    let prov_a = organization(&s, "Provider A", None).await;
    let unit_a = organization(&s, "Unit A", Some(&prov_a)).await;
    let prov_b = organization(&s, "Provider B", None).await;

    // Staff: each has a Practitioner; physicians and nurses have a twin who breaks the glass.
    let staff = ["physician", "physician-bg", "nurse", "nurse-bg", "assistant", "external_specialist"];
    let mut practitioner = HashMap::new();
    for u in staff {
        let p = create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": u}]})).await;
        practitioner.insert(u, p["id"].as_str().expect("id").to_string());
    }
    let all_practitioners: Vec<String> = staff.iter().map(|u| practitioner[u].clone()).collect();

    // One chart per scenario.
    let mut charts: HashMap<(String, String, String, String), Chart> = HashMap::new();
    for provider in ["same", "other"] {
        for relation in ["active", "expired", "none", "consultant"] {
            for consent_kind in ["none", "permit", "deny", "withdrawn"] {
                for block in ["no", "yes"] {
                    let c = chart(&s, if provider == "same" { &prov_a } else { &prov_b }).await;
                    let id = c.id();
                    match relation {
                        "active" => drop(create(&s, &care_team(&id, &all_practitioners, "attending", None)).await),
                        "consultant" => drop(create(&s, &care_team(&id, &all_practitioners, "consultant", None)).await),
                        "expired" => drop(create(&s, &care_team(&id, &all_practitioners, "attending", Some("2021-01-01"))).await),
                        _ => {}
                    }
                    let share = json!({"type": "permit", "actor": [actor(&format!("Organization/{prov_a}"))]});
                    match consent_kind {
                        "permit" => drop(create(&s, &consent(&id, "active", share)).await),
                        "deny" => drop(create(&s, &consent(&id, "active", json!({"type": "deny"}))).await),
                        "withdrawn" => {
                            let mut c = create(&s, &consent(&id, "active", share)).await;
                            c["status"] = json!("inactive");
                            let r = s.put(&format!("/fhir/Consent/{}", c["id"].as_str().expect("id")), &c, &[]).await;
                            assert_eq!(r.status, 200, "withdraw: {}", r.text);
                        }
                        _ => {}
                    }
                    if block == "yes" {
                        let actors: Vec<Value> = all_practitioners.iter().map(|p| actor(&format!("Practitioner/{p}"))).collect();
                        create(&s, &consent(&id, "active", json!({"type": "deny", "actor": actors}))).await;
                    }
                    charts.insert((provider.into(), relation.into(), consent_kind.into(), block.into()), c);
                }
            }
        }
    }
    let own = chart(&s, &prov_a).await;

    let mut spec: Vec<(String, &str, Vec<String>, Option<String>, Option<String>)> = Vec::new();
    for u in staff {
        let role = u.trim_end_matches("-bg");
        let units = if role == "external_specialist" { Vec::new() } else { vec![unit_a.clone()] };
        spec.push((u.replace('_', "-"), role, units, Some(practitioner[u].clone()), None));
    }
    spec.push(("support".into(), "support", Vec::new(), None, None));
    spec.push(("patient".into(), "patient", Vec::new(), None, Some(own.id())));
    let users = people(&s, &mut now, &spec).await;
    let service = last_line(&run_ok(&s.data, &["apikey", "create", "--name", "reporting", "--role", "service", "--scope", "system/Observation.rs"]));

    // The twins break the glass on every scenario patient; other roles cannot.
    for c in charts.values() {
        for twin in ["physician-bg", "nurse-bg"] {
            let r = break_glass(&s, &users[twin].token, &c.id(), Some("matrix: emergency"), Some(480)).await;
            assert_eq!(r.status, 201, "{twin}: {}", r.text);
        }
    }
    for u in ["assistant", "external-specialist", "support", "patient"] {
        let r = break_glass(&s, &users[u].token, &own.id(), Some("not mine to break"), None).await;
        assert_eq!(r.status, 403, "{u} may not break the glass: {}", r.text);
    }

    let cases = matrix();
    assert!(cases.len() >= 200, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    let mut checked: Vec<(String, String, String, String)> = Vec::new(); // request id, expected, patient, case
    for case in &cases {
        let (role, action, t) = (case.get("role"), case.get("action"), case.get("type"));
        let key = match role {
            "admin" => s.admin_key.clone(),
            "auditor" => s.auditor_key.clone(),
            "service" => service.clone(),
            "physician" | "nurse" if case.get("break_glass") == "yes" => users[&format!("{role}-bg")].token.clone(),
            other => users[&other.replace('_', "-")].token.clone(),
        };
        let target = match (role, case.get("relation")) {
            ("patient", "self") => &own,
            ("patient", _) => &charts[&("same".to_string(), "none".to_string(), "none".to_string(), "no".to_string())],
            _ => &charts[&(case.get("provider").to_string(), case.get("relation").to_string(), case.get("consent").to_string(), case.get("block").to_string())],
        };
        let pid = target.id();
        let resource = target.resource(t).clone();
        let rid = resource["id"].as_str().expect("id").to_string();
        let mut headers = Vec::new();
        if !case.get("purpose").is_empty() {
            headers.push(("x-purpose-of-use", case.get("purpose")));
        }
        let (r, target_id) = match action {
            "read" => (s.request("GET", &format!("/fhir/{t}/{rid}"), Some(&key), None, &headers).await, rid),
            "history" => (s.request("GET", &format!("/fhir/{t}/{rid}/_history"), Some(&key), None, &headers).await, rid),
            "search" => (s.request("GET", &format!("/fhir/{t}?_id={rid}"), Some(&key), None, &headers).await, rid),
            "update" => (s.request("PUT", &format!("/fhir/{t}/{rid}"), Some(&key), Some(&resource), &headers).await, rid),
            "create" => (s.request("POST", &format!("/fhir/{t}"), Some(&key), Some(&body_for(t, &pid)), &headers).await, String::new()),
            "delete" => {
                let doomed = create(&s, &body_for(t, &pid)).await["id"].as_str().expect("id").to_string();
                (s.request("DELETE", &format!("/fhir/{t}/{doomed}"), Some(&key), None, &headers).await, doomed)
            }
            other => panic!("unknown action {other}"),
        };
        let got = verdict(action, &target_id, &r);
        let expected = case.get("expected");
        if got != expected {
            failures.push(format!("case {}: {role} {action} {t} ({} {} consent {} block {} bg {} purpose {}): expected {expected}, got {got}: {}",
                case.get("case"), case.get("relation"), case.get("provider"), case.get("consent"), case.get("block"), case.get("break_glass"), case.get("purpose"),
                r.text.chars().take(160).collect::<String>()));
        }
        let request_id = r.header("x-request-id").expect("x-request-id").to_string();
        checked.push((request_id, got, pid, case.get("case").to_string()));
    }
    assert!(failures.is_empty(), "{} of {} cases disagree with the table:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // Every decision is in the audit log with its reason; a refusal names no data it kept back.
    let mut by_request: HashMap<String, Vec<Value>> = HashMap::new();
    for line in run_ok(&s.data, &["audit", "export"]).lines() {
        let v: Value = serde_json::from_str(line).expect("jsonl");
        let e = v["entry"].clone();
        by_request.entry(e["request_id"].as_str().unwrap_or("").to_string()).or_default().push(e);
    }
    for (request_id, got, pid, case) in &checked {
        let entries = by_request.get(request_id).unwrap_or_else(|| panic!("case {case}: no audit entry for request {request_id}"));
        let reasons: Vec<&str> = entries.iter().filter_map(|e| e["reason"].as_str()).collect();
        if got == "deny" {
            assert!(!entries.iter().any(|e| e["outcome"] == "success" && e["patient"] == pid.as_str()), "case {case}: a refused request is not audited as access to the patient: {entries:?}");
            assert!(reasons.iter().any(|r| r.starts_with("deny: ") || r.starts_with("permit: ")), "case {case}: {reasons:?}");
        } else {
            assert!(entries.iter().any(|e| e["patient"] == pid.as_str() && e["reason"].as_str().is_some_and(|r| r.starts_with("permit: "))), "case {case}: {entries:?}");
        }
    }
}
