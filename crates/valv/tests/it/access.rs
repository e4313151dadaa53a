//! Need-to-know access against the real server: the authorization matrix from
//! `tests/data/access-matrix.csv`, a property test over random care teams and grants, break-glass
//! and remote support end to end, and `valv policy explain` with a custom policy.

use crate::harness::{last_line, run_ok, Resp, Server};
use crate::identity::{access_token, auth, login, secret_of, totp, FAST, PASSWORD};
use serde_json::{json, Value};
use std::collections::HashMap;

const MIN: i64 = 60_000;
/// FAST, with sessions that survive the test clock's jumps.
pub(crate) const LONG_SESSIONS: &str = "[auth]\nrate_per_minute = 10000\nrate_burst = 10000\nlogin_floor_ms = 0\nsession_idle_minutes = 240\n";

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

/// A FHIR R4 privacy Consent of `patient` with one provision.
pub(crate) fn consent(patient: &str, status: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision})
}

pub(crate) fn actor(reference: &str) -> Value {
    json!({"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]}, "reference": {"reference": reference}})
}

/// A CareTeam of `patient` naming each practitioner with `role`, from `start` to `end` (dates).
pub(crate) fn care_team(patient: &str, practitioners: &[String], role: &str, end: Option<&str>) -> Value {
    let period = match end {
        Some(e) => json!({"start": "2020-01-01", "end": e}),
        None => json!({"start": "2020-01-01"}),
    };
    let participants: Vec<Value> =
        practitioners.iter().map(|p| json!({"role": [{"text": role}], "member": {"reference": format!("Practitioner/{p}")}, "period": period})).collect();
    json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")}, "participant": participants})
}

/// A resource of `resource_type` in `patient`'s compartment.
pub(crate) fn body_for(resource_type: &str, patient: &str) -> Value {
    let subject = json!({"reference": format!("Patient/{patient}")});
    match resource_type {
        "Observation" => json!({"resourceType": "Observation", "status": "final", "code": {"text": "heart rate"}, "subject": subject}),
        "MedicationRequest" => json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order", "medicationCodeableConcept": {"text": "paracetamol"}, "subject": subject}),
        "Encounter" => json!({"resourceType": "Encounter", "status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}, "subject": subject}),
        other => panic!("no body for {other}"),
    }
}

/// Creates with the loader's key; returns the stored resource.
pub(crate) async fn create(s: &Server, body: &Value) -> Value {
    let t = body["resourceType"].as_str().expect("type");
    let r = s.post(&format!("/fhir/{t}"), body).await;
    assert_eq!(r.status, 201, "create {t}: {}", r.text);
    r.json
}

pub(crate) async fn organization(s: &Server, name: &str, part_of: Option<&str>) -> String {
    let mut o = json!({"resourceType": "Organization", "name": name});
    if let Some(p) = part_of {
        o["partOf"] = json!({"reference": format!("Organization/{p}")});
    }
    create(s, &o).await["id"].as_str().expect("id").to_string()
}

/// An account to make: user name, role, units, Practitioner id, Patient id.
pub(crate) type Spec<'a> = (String, &'a str, Vec<String>, Option<String>, Option<String>);

/// A server with one physician on the care team of one patient (`mine`) and another patient
/// they have no relationship with (`other`): the setup of the tests that something never reaches
/// past need-to-know.
pub(crate) struct Ward {
    pub(crate) s: Server,
    /// The physician's session token.
    pub(crate) token: String,
    pub(crate) mine: String,
    pub(crate) other: String,
    /// The server's clock (set by the test).
    pub(crate) now: i64,
}

/// [`Ward`], the two Patients named with the family names given.
pub(crate) async fn ward(tag: &str, mine_family: &str, other_family: &str) -> Ward {
    let s = Server::start_configured(tag, &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let id = |v: Value| v["id"].as_str().expect("id").to_string();
    let dr = id(create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": "Ward"}]})).await);
    let mine = id(create(&s, &json!({"resourceType": "Patient", "name": [{"family": mine_family}]})).await);
    let other = id(create(&s, &json!({"resourceType": "Patient", "name": [{"family": other_family}]})).await);
    create(&s, &care_team(&mine, std::slice::from_ref(&dr), "attending", None)).await;
    let spec: Vec<Spec> = vec![("dr.ward".into(), "physician", vec![], Some(dr), None)];
    let token = people(&s, &mut now, &spec).await["dr.ward"].token.clone();
    Ward { s, token, mine, other, now }
}

/// A person with an account: created by the admin, enrolled with a TOTP secret.
pub(crate) struct Person {
    pub(crate) username: String,
    pub(crate) practitioner: String,
    pub(crate) secret: Vec<u8>,
    pub(crate) token: String,
}

/// Creates and enrolls users (`spec`: username, role, units, practitioner, patient), then signs
/// them in half a minute later (a TOTP code works once). The clock file must be set.
pub(crate) async fn people(s: &Server, now: &mut i64, spec: &[Spec<'_>]) -> HashMap<String, Person> {
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
        let approval = s.approve(username).await.expect("approval code");
        let e = auth(s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": PASSWORD})).await;
        assert_eq!(e.status, 200, "{}", e.text);
        let secret = secret_of(e.json["otpauth_uri"].as_str().expect("uri"));
        let c = auth(s, "/auth/enroll/confirm", None, json!({"token": token, "totp": totp(&secret, *now)})).await;
        assert_eq!(c.status, 200, "{}", c.text);
        out.insert(username.clone(), Person { username: username.clone(), practitioner: practitioner.clone().unwrap_or_default(), secret, token: String::new() });
    }
    *now += 30_000;
    s.set_clock(*now);
    for p in out.values_mut() {
        p.token = access_token(&login(s, &p.username, PASSWORD, Some(&totp(&p.secret, *now))).await);
    }
    out
}

pub(crate) async fn break_glass(s: &Server, token: &str, patient: &str, reason: Option<&str>, minutes: Option<i64>) -> Resp {
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

    let mut spec: Vec<Spec> = Vec::new();
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

fn metric(text: &str, name: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

fn audit_entries(s: &Server) -> Vec<Value> {
    run_ok(&s.data, &["audit", "export"]).lines().map(|l| serde_json::from_str::<Value>(l).expect("jsonl")["entry"].clone()).collect()
}

/// A unit of a provider, one patient of that provider with an Observation, and nothing else.
async fn small_world(s: &Server) -> (String, String, String, String) {
    let prov = organization(s, "Provider A", None).await;
    let unit = organization(s, "Unit A", Some(&prov)).await;
    let c = chart(s, &prov).await;
    let obs = c.resources["Observation"]["id"].as_str().expect("id").to_string();
    (prov, unit, c.id(), obs)
}

#[tokio::test]
async fn break_glass_is_reasoned_time_limited_audited_alerted_and_reviewed() {
    let s = Server::start_configured("break-glass", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let (_, unit, patient, obs) = small_world(&s).await;
    let users = people(&s, &mut now, &[("er.doc".into(), "physician", vec![unit.clone()], None, None), ("assistant".into(), "assistant", vec![unit], None, None)]).await;
    let doc = users["er.doc"].token.clone();
    let read = |t: String| {
        let s = &s;
        let path = format!("/fhir/Observation/{obs}");
        async move { s.request("GET", &path, Some(&t), None, &[]).await }
    };
    assert_eq!(read(doc.clone()).await.status, 403, "no care relationship: no access");

    // Refused without a reason, with a blank one, or with a duration out of bounds; nothing granted.
    assert!(break_glass(&s, &doc, &patient, None, None).await.outcome(400).contains("reason"));
    assert!(break_glass(&s, &doc, &patient, Some("   "), None).await.outcome(400).contains("reason"));
    assert!(break_glass(&s, &doc, &patient, Some("x"), Some(0)).await.outcome(400).contains("duration"));
    assert!(break_glass(&s, &doc, &patient, Some("x"), Some(481)).await.outcome(400).contains("duration"));
    let not_params = s.request("POST", &format!("/fhir/Patient/{patient}/$break-glass"), Some(&doc), Some(&json!({"reason": "x"})), &[]).await;
    assert!(not_params.outcome(400).contains("Parameters"));
    break_glass(&s, &users["assistant"].token, &patient, Some("x"), None).await.outcome(403);
    break_glass(&s, &s.data_key, &patient, Some("x"), None).await.outcome(403);
    assert_eq!(read(doc.clone()).await.status, 403);

    // Granted for 30 minutes.
    let granted = break_glass(&s, &doc, &patient, Some("unconscious in the emergency room"), Some(30)).await;
    assert_eq!(granted.status, 201, "{}", granted.text);
    let param = |name: &str| granted.json["parameter"].as_array().and_then(|a| a.iter().find(|p| p["name"] == name)).cloned().expect(name);
    let grant = param("grant")["valueString"].as_str().expect("grant id").to_string();
    assert_eq!(param("overridesBlock")["valueBoolean"], true);
    let r = read(doc.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let request_id = r.header("x-request-id").expect("request id").to_string();

    // Audited with purpose BTG and the grant id; the alert: a log event, metrics, the review queue.
    let entries = audit_entries(&s);
    let access = entries.iter().find(|e| e["request_id"] == request_id.as_str()).expect("the read is audited");
    assert_eq!(access["purpose_of_use"], "BTG", "{access}");
    assert!(access["reason"].as_str().is_some_and(|r| r.contains("break-glass-read") && r.contains(&grant)), "{access}");
    let made = entries.iter().find(|e| e["interaction"] == "break-glass" && e["outcome"] == "success").expect("the grant is audited");
    assert_eq!((made["purpose_of_use"].as_str(), made["resource_id"].as_str()), (Some("BTG"), Some(grant.as_str())));
    assert!(entries.iter().filter(|e| e["interaction"] == "break-glass" && e["outcome"] == "denied").count() >= 7, "refusals are audited");
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert_eq!(metric(&metrics, "valv_break_glass_grants_total"), 1, "{metrics}");
    assert!(metric(&metrics, "valv_break_glass_accesses_total") >= 1, "{metrics}");
    let log = std::fs::read_to_string(s.dir.join("server.log")).expect("server log");
    assert!(log.contains("break-glass access") && log.contains(&grant), "the alert is logged");
    assert!(!log.contains("heart rate"), "no clinical content in the log");

    // The review queue: auditors only; nobody reviews twice.
    s.request("GET", "/admin/break-glass?status=pending", Some(&doc), None, &[]).await.outcome(403);
    let pending = s.request("GET", "/admin/break-glass?status=pending", Some(&s.auditor_key), None, &[]).await;
    assert_eq!(pending.status, 200, "{}", pending.text);
    let listed = &pending.json["grants"][0];
    assert_eq!((listed["id"].as_str(), listed["reason"].as_str(), listed["status"].as_str()), (Some(grant.as_str()), Some("unconscious in the emergency room"), Some("active")));
    let review_path = format!("/admin/break-glass/{grant}/review");
    let review = |body: Value| {
        let (s, path) = (&s, &review_path);
        async move { s.request("POST", path, Some(&s.auditor_key), Some(&body), &[("content-type", "application/json")]).await }
    };
    review(json!({"outcome": "fine"})).await.outcome(400);
    let done = review(json!({"outcome": "justified", "note": "trauma call confirmed"})).await;
    assert_eq!(done.status, 200, "{}", done.text);
    review(json!({"outcome": "unjustified"})).await.outcome(409);
    assert_eq!(s.request("GET", "/admin/break-glass?status=pending", Some(&s.auditor_key), None, &[]).await.json["total"], 0);
    assert_eq!(s.request("GET", "/admin/break-glass?status=reviewed", Some(&s.auditor_key), None, &[]).await.json["total"], 1);

    // Access ends when the grant does (the server's clock, set by the test).
    for _ in 0..2 {
        now += 14 * MIN;
        s.set_clock(now);
        assert_eq!(read(doc.clone()).await.status, 200, "still within 30 minutes");
    }
    now += 2 * MIN + 1;
    s.set_clock(now);
    assert!(read(doc.clone()).await.outcome(403).contains("deny"), "expired after 30 minutes");
    let search = s.request("GET", "/fhir/Observation", Some(&doc), None, &[]).await;
    assert_eq!((search.status, search.json["total"].as_u64()), (200, Some(0)), "no counts either: {}", search.text);
}

#[tokio::test]
async fn remote_support_needs_approval_by_the_patients_provider_and_ends() {
    let s = Server::start_configured("support", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let (_, unit, patient, obs) = small_world(&s).await;
    let other_unit = organization(&s, "Provider B", None).await;
    let users = people(
        &s,
        &mut now,
        &[
            ("helpdesk".into(), "support", Vec::new(), None, None),
            ("admin.a".into(), "admin", vec![unit], None, None),
            ("admin.b".into(), "admin", vec![other_unit], None, None),
        ],
    )
    .await;
    let support = users["helpdesk"].token.clone();
    let json_ct = [("content-type", "application/json")];
    let post = |path: String, token: String, body: Value| {
        let s = &s;
        async move { s.request("POST", &path, Some(&token), Some(&body), &json_ct).await }
    };
    let read = |token: String| {
        let s = &s;
        let path = format!("/fhir/Observation/{obs}");
        async move { s.request("GET", &path, Some(&token), None, &[]).await.status }
    };
    assert_eq!(read(support.clone()).await, 403, "support staff see no patient data");
    s.request("GET", "/admin/users", Some(&support), None, &[]).await.outcome(403);

    // Requests are bounded and need a reason.
    post("/admin/support-grants".into(), support.clone(), json!({"patients": [patient], "minutes": 61, "reason": "x"})).await.outcome(400);
    post("/admin/support-grants".into(), support.clone(), json!({"patients": [patient]})).await.outcome(400);
    post("/admin/support-grants".into(), s.data_key.clone(), json!({"patients": [patient], "reason": "x"})).await.outcome(403);
    let asked = post("/admin/support-grants".into(), support.clone(), json!({"patients": [patient], "minutes": 30, "reason": "ticket 4711: chart does not load"})).await;
    assert_eq!((asked.status, asked.json["status"].as_str()), (201, Some("pending")), "{}", asked.text);
    let grant = asked.json["id"].as_str().expect("id").to_string();
    assert_eq!(read(support.clone()).await, 403, "no access before approval");

    // Only an admin of the patient's provider approves; the requester cannot.
    post(format!("/admin/support-grants/{grant}/approve"), support.clone(), json!({})).await.outcome(403);
    assert!(post(format!("/admin/support-grants/{grant}/approve"), users["admin.b"].token.clone(), json!({})).await.outcome(403).contains("another care provider"));
    let approved = post(format!("/admin/support-grants/{grant}/approve"), users["admin.a"].token.clone(), json!({})).await;
    assert_eq!((approved.status, approved.json["status"].as_str()), (200, Some("active")), "{}", approved.text);
    assert_eq!(read(support.clone()).await, 200, "access after approval");
    assert_eq!(s.request("DELETE", &format!("/fhir/Observation/{obs}"), Some(&support), None, &[]).await.status, 403, "read only");
    let audited = audit_entries(&s);
    assert!(audited.iter().any(|e| e["agent_name"] == "helpdesk" && e["outcome"] == "success" && e["reason"].as_str().is_some_and(|r| r.contains(&grant))), "every action names the grant");

    // It expires by itself.
    now += 31 * MIN;
    s.set_clock(now);
    assert_eq!(read(support.clone()).await, 403, "none after expiry");

    // Administration, approved, then revoked by its holder.
    let admin_grant = post("/admin/support-grants".into(), support.clone(), json!({"scope": "administration", "minutes": 20, "reason": "reset a locked account"})).await;
    let id = admin_grant.json["id"].as_str().expect("id").to_string();
    assert_eq!(post(format!("/admin/support-grants/{id}/approve"), s.admin_key.clone(), json!({})).await.status, 200);
    assert_eq!(s.request("GET", "/admin/users", Some(&support), None, &[]).await.status, 200, "administration under the grant");
    assert_eq!(read(support.clone()).await, 403, "an administration grant shows no patient data");
    assert_eq!(post(format!("/admin/support-grants/{id}/revoke"), support.clone(), json!({})).await.status, 200);
    s.request("GET", "/admin/users", Some(&support), None, &[]).await.outcome(403);
    post(format!("/admin/support-grants/{id}/approve"), s.admin_key.clone(), json!({})).await.outcome(409);
    let listed = s.request("GET", "/admin/support-grants", Some(&s.admin_key), None, &[]).await;
    let states: Vec<&str> = listed.json["grants"].as_array().expect("grants").iter().filter_map(|g| g["status"].as_str()).collect();
    assert_eq!(states, ["revoked", "expired"], "{}", listed.text);
}

#[tokio::test]
async fn policy_explain_names_the_rule_and_a_custom_policy_changes_the_decision() {
    let mut s = Server::start_configured("explain", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    let (prov, unit, patient, _) = small_world(&s).await;
    let pr = create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": "Nurse"}]})).await["id"].as_str().expect("id").to_string();
    create(&s, &care_team(&patient, std::slice::from_ref(&pr), "attending", None)).await;
    let mr = create(&s, &body_for("MedicationRequest", &patient)).await["id"].as_str().expect("id").to_string();
    let users = people(&s, &mut now, &[("sara.nurse".into(), "nurse", vec![unit], Some(pr), None)]).await;
    let nurse = users["sara.nurse"].token.clone();
    let data = s.data.clone();
    let explain = |extra: &[&str]| {
        let mut args = vec!["policy", "explain", "--user", "sara.nurse", "--patient", &patient, "--action", "read", "--type", "MedicationRequest"];
        args.extend_from_slice(extra);
        run_ok(&data, &args)
    };
    let out = explain(&[]);
    assert!(out.contains("decision: PERMIT") && out.contains("clinical-read") && out.contains("read the records of patients in their care"), "{out}");
    assert!(out.contains("care_active=true"), "the facts are shown: {out}");
    let out = explain(&["--purpose", "HMARKT"]);
    assert!(out.contains("decision: DENY") && out.contains("no policy permits"), "{out}");
    let bad = crate::harness::valv().arg("--data-dir").arg(&s.data).args(["policy", "explain", "--user", "sara.nurse", "--patient", &patient, "--type", "Spaceship"]).output().expect("run");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a FHIR R4 resource type"));
    // A file's bytes: the scan status is a fact (an infected file is refused whatever else permits).
    let file = |scan: &str| run_ok(&data, &["policy", "explain", "--user", "sara.nurse", "--patient", &patient, "--type", "Binary", "--file-scan", scan]);
    let out = file("infected");
    assert!(out.contains("decision: DENY") && out.contains("file-infected") && out.contains("file_scan=infected"), "{out}");
    assert!(file("clean").contains("decision: PERMIT"));
    let bad = crate::harness::valv().arg("--data-dir").arg(&s.data).args(["policy", "explain", "--user", "sara.nurse", "--patient", &patient, "--type", "Binary", "--file-scan", "dirty"]).output().expect("run");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("not a file scan status"));
    assert_eq!(s.request("GET", &format!("/fhir/MedicationRequest/{mr}"), Some(&nurse), None, &[]).await.status, 200);

    // Moving another patient's Observation into her patient's record is a write to both records.
    let theirs = chart(&s, &prov).await.resources["Observation"].clone();
    let their_id = theirs["id"].as_str().expect("id").to_string();
    let mut moved = theirs.clone();
    moved["subject"] = json!({"reference": format!("Patient/{patient}")});
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": moved, "request": {"method": "PUT", "url": format!("Observation/{their_id}")}}]});
    assert!(s.request("POST", "/fhir", Some(&nurse), Some(&tx), &[]).await.outcome(403).contains("deny"), "not in a transaction");
    s.request("PUT", &format!("/fhir/Observation/{their_id}"), Some(&nurse), Some(&moved), &[]).await.outcome(403);
    assert_eq!(s.get(&format!("/fhir/Observation/{their_id}")).await.json["subject"], theirs["subject"], "nothing moved");

    // An operator's policy: nurses on this site do not read medication orders.
    let dir = s.data.join("policies");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("broken.cedar"), "@id(\"x\")\npermit (principal, action, resource) when { context.no_such_fact };\n").expect("write");
    let invalid = crate::harness::valv().arg("--data-dir").arg(&s.data).args(["policy", "validate", "--dir"]).arg(&dir).output().expect("run");
    assert!(!invalid.status.success() && String::from_utf8_lossy(&invalid.stderr).contains("no_such_fact"), "{}", String::from_utf8_lossy(&invalid.stderr));
    std::fs::remove_file(dir.join("broken.cedar")).expect("rm");
    std::fs::write(
        dir.join("site.cedar"),
        "@id(\"site-nurses-no-orders\")\n@reason(\"on this site, medication orders are for physicians' eyes\")\n\
         forbid (principal in Valv::Role::\"nurse\", action, resource in Valv::ResourceClass::\"Orders\");\n",
    )
    .expect("write");
    let valid = run_ok(&s.data, &["policy", "validate", "--dir", dir.to_str().expect("path")]);
    assert!(valid.contains("(1 from files)") && valid.contains("site-nurses-no-orders"), "{valid}");
    let config = s.data.join("valv.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains("[policy]\n"), "init writes the policy section: {text}");
    std::fs::write(&config, text.replacen("[policy]\n", "[policy]\ndir = \"policies\"\n", 1)).expect("config");
    s.restart();
    let r = s.request("GET", &format!("/fhir/MedicationRequest/{mr}"), Some(&nurse), None, &[]).await;
    assert!(r.outcome(403).contains("site-nurses-no-orders"), "{}", r.text);
    let out = explain(&[]);
    assert!(out.contains("decision: DENY") && out.contains("site-nurses-no-orders") && out.contains("site.cedar"), "{out}");

    // A block imported by another process (valv import) counts within seconds, without a restart.
    let obs = create(&s, &body_for("Observation", &patient)).await["id"].as_str().expect("id").to_string();
    let obs_path = format!("/fhir/Observation/{obs}");
    let read_obs = || s.request("GET", &obs_path, Some(&nurse), None, &[]);
    assert_eq!(read_obs().await.status, 200);
    let nurse_pr = format!("Practitioner/{}", users["sara.nurse"].practitioner);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"fullUrl": "urn:uuid:6f1e1a43-8d2e-4d8c-9c57-0d3c2b1f4e5a",
        "resource": consent(&patient, "active", json!({"type": "deny", "actor": [actor(&nurse_pr)]})), "request": {"method": "POST", "url": "Consent"}}]});
    let file = s.dir.join("block.json");
    std::fs::write(&file, serde_json::to_vec(&bundle).expect("json")).expect("write");
    run_ok(&s.data, &["import", file.to_str().expect("path")]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = read_obs().await;
        if r.status == 403 {
            assert!(r.text.contains("patient-block"), "{}", r.text);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the imported block was not taken in: {}", r.text);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A small deterministic generator (xorshift64*), seeded from the clock unless VALV_PROP_SEED is set.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

#[tokio::test]
async fn no_request_without_relation_or_grant_returns_another_patients_data_or_count() {
    let seed = std::env::var("VALV_PROP_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| now_ms() as u64 | 1);
    let mut rng = Rng(seed);
    let s = Server::start_configured("access-prop", &[], LONG_SESSIONS);
    let mut now = now_ms();
    s.set_clock(now);
    let prov = organization(&s, "Provider", None).await;
    let unit = organization(&s, "Unit", Some(&prov)).await;
    const PATIENTS: usize = 10;
    const STAFF: usize = 6;
    let mut patients = Vec::new();
    let mut observations: HashMap<String, usize> = HashMap::new(); // observation id -> patient index
    for _ in 0..PATIENTS {
        let c = chart(&s, &prov).await;
        for _ in 0..rng.below(3) {
            let o = create(&s, &body_for("Observation", &c.id())).await;
            observations.insert(o["id"].as_str().expect("id").to_string(), patients.len());
        }
        observations.insert(c.resources["Observation"]["id"].as_str().expect("id").to_string(), patients.len());
        patients.push(c.id());
    }
    let mut practitioners = Vec::new();
    let mut spec = Vec::new();
    for i in 0..STAFF {
        let pr = create(&s, &json!({"resourceType": "Practitioner", "name": [{"family": format!("P{i}")}]})).await["id"].as_str().expect("id").to_string();
        // Half the staff have no unit, so only their own care teams reach patients.
        let units = if i % 2 == 0 { vec![unit.clone()] } else { Vec::new() };
        spec.push((format!("staff{i}"), ["physician", "nurse"][rng.below(2)], units, Some(pr.clone()), None));
        practitioners.push(pr);
    }
    // Random care teams: active, expired, or naming the unit (which reaches every unit member).
    let mut related = vec![vec![false; PATIENTS]; STAFF];
    for p in 0..PATIENTS {
        for (u, pr) in practitioners.iter().enumerate() {
            match rng.below(6) {
                0 => {
                    create(&s, &care_team(&patients[p], std::slice::from_ref(pr), "attending", None)).await;
                    related[u][p] = true;
                }
                1 => drop(create(&s, &care_team(&patients[p], std::slice::from_ref(pr), "attending", Some("2021-06-30"))).await),
                _ => {}
            }
        }
        if rng.below(5) == 0 {
            let team = json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{}", patients[p])},
                "participant": [{"member": {"reference": format!("Organization/{unit}")}, "period": {"start": "2020-01-01"}}]});
            create(&s, &team).await;
            for (u, row) in related.iter_mut().enumerate() {
                row[p] |= u % 2 == 0;
            }
        }
    }
    let users = people(&s, &mut now, &spec).await;
    // Random break-glass grants, some of which expire before the requests.
    let mut granted = vec![vec![false; PATIENTS]; STAFF];
    for (u, row) in granted.iter_mut().enumerate() {
        for (p, cell) in row.iter_mut().enumerate() {
            if rng.below(8) == 0 {
                let minutes = if rng.below(2) == 0 { 5 } else { 60 };
                let r = break_glass(&s, &users[&format!("staff{u}")].token, &patients[p], Some("property test"), Some(minutes)).await;
                assert_eq!(r.status, 201, "{}", r.text);
                *cell = minutes == 60;
            }
        }
    }
    now += 10 * MIN;
    s.set_clock(now);

    let may_see = |u: usize, p: usize| related[u][p] || granted[u][p];
    for _ in 0..60 {
        let u = rng.below(STAFF);
        let token = users[&format!("staff{u}")].token.clone();
        let p = rng.below(PATIENTS);
        let context = format!("seed {seed}: staff{u} on patient {p}");
        let visible: Vec<&String> = observations.iter().filter(|(_, q)| may_see(u, **q)).map(|(id, _)| id).collect();
        match rng.below(5) {
            0 => {
                let r = s.request("GET", "/fhir/Observation?_count=100", Some(&token), None, &[]).await;
                let ids = r.entry_ids();
                assert_eq!(r.json["total"].as_u64(), Some(visible.len() as u64), "{context}: the total counts only what may be seen: {}", r.text);
                assert!(ids.iter().all(|id| observations.get(id).is_some_and(|q| may_see(u, *q))), "{context}: {ids:?}");
            }
            1 => {
                let r = s.request("GET", &format!("/fhir/Observation?patient={}&_summary=count", patients[p]), Some(&token), None, &[]).await;
                let mine = observations.values().filter(|q| **q == p).count() as u64;
                let expected = if may_see(u, p) { mine } else { 0 };
                assert_eq!(r.json["total"].as_u64(), Some(expected), "{context}: {}", r.text);
            }
            2 => {
                let r = s.request("GET", "/fhir/Observation/_history?_count=100", Some(&token), None, &[]).await;
                let ids: Vec<String> = r.json["entry"].as_array().into_iter().flatten().filter_map(|e| e["resource"]["id"].as_str().map(str::to_string)).collect();
                assert!(ids.iter().all(|id| observations.get(id).is_some_and(|q| may_see(u, *q))), "{context}: history {ids:?}");
                assert_eq!(r.json["total"].as_u64(), Some(visible.len() as u64), "{context}: one version each: {}", r.text);
            }
            3 => {
                let r = s.request("GET", &format!("/fhir/Patient/{}", patients[p]), Some(&token), None, &[]).await;
                assert_eq!(r.status == 200, may_see(u, p), "{context}: read Patient answered {}", r.status);
            }
            _ => {
                let r = s.request("GET", &format!("/fhir/Patient/{}/_history", patients[p]), Some(&token), None, &[]).await;
                assert_eq!(r.status == 200, may_see(u, p), "{context}: Patient history answered {}", r.status);
            }
        }
    }
}
