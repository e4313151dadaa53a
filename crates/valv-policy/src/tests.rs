//! Decisions over a small world: one provider with a ward, another provider, patients with care
//! teams, consents and grants.

use super::*;
use proptest::prelude::*;
use serde_json::{json, Value};

const NOW: i64 = 1_780_000_000_000; // 2026-05-28

fn world() -> Directory {
    let mut d = Directory::default();
    let mut put = |t: &str, id: &str, body: Value| d.apply(t, id, 1, Some(&body));
    put("Organization", "ward", json!({"resourceType": "Organization", "partOf": {"reference": "Organization/hospital"}}));
    put("Organization", "hospital", json!({"resourceType": "Organization"}));
    put("Organization", "clinic", json!({"resourceType": "Organization"}));
    for p in ["p1", "p2", "p3"] {
        put("Patient", p, json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/hospital"}}));
    }
    put("Patient", "far", json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/clinic"}}));
    let team = |p: &str, member: &str, role: &str| {
        json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{p}")},
               "participant": [{"member": {"reference": member}, "role": [{"coding": [{"code": role}]}]}]})
    };
    put("CareTeam", "t1", team("p1", "Practitioner/dr", "attending"));
    put("CareTeam", "t2", team("p1", "Practitioner/spec", "consultant"));
    put("CareTeam", "t3", team("far", "Practitioner/dr", "attending"));
    put("CareTeam", "t4", team("p3", "Organization/ward", "attending"));
    d
}

fn person(role: &str, practitioner: Option<&str>) -> Subject {
    Subject { roles: vec![role.into()], practitioner: practitioner.map(Into::into), units: vec!["ward".into()], ..Subject::default() }
}

fn ask(e: &Engine, d: &Directory, s: &Subject, action: Action, t: &str, patient: Option<&str>) -> Decision {
    let purpose = purpose::default_for(&s.roles);
    decide(e, d, s, &Question { action, resource_type: t, patient, now: NOW, purpose, file_scan: None }, Settings::default())
}

#[test]
fn defaults_validate_and_every_policy_has_a_reason() {
    let e = Engine::with_defaults().unwrap();
    assert!(e.policies().len() >= 20);
    for p in e.policies() {
        assert!(!p.reason.is_empty(), "{} has no @reason", p.id);
    }
    for a in Action::ALL {
        e.check_context(a, &Facts { purpose: "TREAT".into(), ..Facts::default() }).unwrap();
    }
}

#[test]
fn clinicians_need_a_care_relationship() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let dr = person("physician", Some("dr"));
    let ok = ask(&e, &d, &dr, Action::Read, "Observation", Some("p1"));
    assert!(ok.permit && ok.rules == ["clinical-read"], "{ok:?}");
    assert_eq!(ok.reason(), "permit: clinical-read");
    let no = ask(&e, &d, &dr, Action::Read, "Observation", Some("p2"));
    assert!(!no.permit && no.rules.is_empty() && no.reason() == "deny: no-policy-permits");
    // The unit's care team counts for everyone in the unit.
    assert!(ask(&e, &d, &person("nurse", None), Action::Read, "Condition", Some("p3")).permit);
    // Nurses write, but not orders.
    let nurse = person("nurse", None);
    assert!(ask(&e, &d, &nurse, Action::Create, "Observation", Some("p3")).permit);
    assert!(!ask(&e, &d, &nurse, Action::Create, "MedicationRequest", Some("p3")).permit);
    assert!(ask(&e, &d, &person("physician", None), Action::Create, "MedicationRequest", Some("p3")).permit);
}

#[test]
fn an_unreadable_care_team_or_consent_denies_staff_until_rewritten() {
    let (e, mut d) = (Engine::with_defaults().unwrap(), world());
    let dr = person("physician", Some("dr"));
    d.mark_unreadable("Consent", "c9", "p1");
    let no = ask(&e, &d, &dr, Action::Read, "Observation", Some("p1"));
    assert!(!no.permit && no.rules == ["unverifiable-relationships"], "{no:?}");
    assert!(ask(&e, &d, &dr, Action::Read, "Observation", Some("p3")).permit, "other patients are unaffected");
    let svc = Subject { roles: vec!["service".into()], scopes: Some(Scopes::parse("system/*.rs").unwrap()), is_service: true, ..Subject::default() };
    assert!(ask(&e, &d, &svc, Action::Read, "Observation", Some("p1")).permit, "services do not rest on relationships");
    d.apply("Consent", "c9", 2, None);
    assert!(ask(&e, &d, &dr, Action::Read, "Observation", Some("p1")).permit, "a newer version replaces the unreadable one");
}

#[test]
fn assistants_see_administrative_data_only() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let a = person("assistant", None);
    assert!(ask(&e, &d, &a, Action::Read, "Encounter", Some("p3")).permit);
    assert!(ask(&e, &d, &a, Action::Update, "Patient", Some("p3")).permit);
    assert!(!ask(&e, &d, &a, Action::Read, "Observation", Some("p3")).permit);
}

#[test]
fn external_specialists_only_as_consultants_and_read_only() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let outside = Subject { roles: vec!["external_specialist".into()], practitioner: Some("spec".into()), ..Subject::default() };
    let r = ask(&e, &d, &outside, Action::Read, "Observation", Some("p1"));
    assert!(r.permit && r.rules == ["consultant-read"], "a consultant of no known provider, named on the care team: {r:?}");
    let elsewhere = Subject { units: vec!["clinic".into()], ..outside.clone() };
    let r = ask(&e, &d, &elsewhere, Action::Read, "Observation", Some("p1"));
    assert!(!r.permit && r.rules == ["cross-provider-consent"], "staff of another provider need the patient's consent: {r:?}");
    let s = Subject { units: vec!["ward".into()], ..outside };
    let r = ask(&e, &d, &s, Action::Read, "Observation", Some("p1"));
    assert!(r.permit, "{r:?}");
    assert!(!ask(&e, &d, &s, Action::Update, "Observation", Some("p1")).permit);
    // A physician who is only a consultant still has a care relationship.
    assert!(ask(&e, &d, &person("physician", Some("spec")), Action::Read, "Observation", Some("p1")).permit);
    // As attending (not consultant), an external specialist sees nothing.
    let s2 = Subject { practitioner: Some("dr".into()), ..s };
    assert!(!ask(&e, &d, &s2, Action::Read, "Observation", Some("p1")).permit);
}

#[test]
fn patients_admins_auditors_support() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let me = Subject { roles: vec!["patient".into()], patient: Some("p1".into()), ..Subject::default() };
    assert!(ask(&e, &d, &me, Action::Read, "Observation", Some("p1")).permit);
    assert!(!ask(&e, &d, &me, Action::Read, "Observation", Some("p2")).permit);
    assert!(!ask(&e, &d, &me, Action::Update, "Observation", Some("p1")).permit);
    assert!(ask(&e, &d, &me, Action::Create, "Consent", Some("p1")).permit);
    assert!(ask(&e, &d, &me, Action::Search, "AuditEvent", Some("p1")).permit);
    let admin = Subject { roles: vec!["admin".into()], ..Subject::default() };
    assert!(!ask(&e, &d, &admin, Action::Read, "Patient", Some("p1")).permit, "admins see no patient data");
    assert!(ask(&e, &d, &admin, Action::Create, "Organization", None).permit);
    assert!(decide_admin(&e, &admin, "users", NOW, "HSYSADMIN").permit);
    let auditor = Subject { roles: vec!["auditor".into()], ..Subject::default() };
    assert!(ask(&e, &d, &auditor, Action::Search, "AuditEvent", None).permit);
    assert!(!ask(&e, &d, &auditor, Action::Read, "Observation", Some("p1")).permit);
    let support = Subject { roles: vec!["support".into()], ..Subject::default() };
    assert!(!ask(&e, &d, &support, Action::Read, "Patient", Some("p1")).permit);
    assert!(!decide_admin(&e, &support, "users", NOW, "HSYSADMIN").permit);
}

#[test]
fn blocks_consent_and_break_glass() {
    let (e, mut d) = (Engine::with_defaults().unwrap(), world());
    let block = json!({"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/p1"},
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "provision": {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/dr"}}]}});
    d.apply("Consent", "c1", 1, Some(&block));
    let mut dr = person("physician", Some("dr"));
    let r = ask(&e, &d, &dr, Action::Read, "Observation", Some("p1"));
    assert!(!r.permit && r.rules == ["patient-block"], "{r:?}");
    dr.grants.push(Grant { id: "g1".into(), kind: GrantKind::BreakGlass { patient: "p1".into() }, approved: true, revoked: false, start: NOW - 1, end: NOW + 60_000 });
    let r = ask(&e, &d, &dr, Action::Read, "Observation", Some("p1"));
    assert!(r.permit && r.break_glass && r.grant.as_deref() == Some("g1"), "{r:?}");
    let q = Question { action: Action::Read, resource_type: "Observation", patient: Some("p1"), now: NOW, purpose: "TREAT", file_scan: None };
    let strict = decide(&e, &d, &dr, &q, Settings { break_glass_overrides_block: false });
    assert!(!strict.permit && strict.rules == ["patient-block"]);
    // Expired.
    let later = decide(&e, &d, &dr, &Question { now: NOW + 60_000, ..q }, Settings::default());
    assert!(!later.permit);
    // Cross-provider: the clinic's patient needs a permit Consent, even with a care team.
    let dr = person("physician", Some("dr"));
    let r = ask(&e, &d, &dr, Action::Read, "Observation", Some("far"));
    assert!(!r.permit && r.rules == ["cross-provider-consent"], "{r:?}");
    let permit = json!({"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/far"},
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "provision": {"type": "permit", "actor": [{"reference": {"reference": "Organization/hospital"}}]}});
    d.apply("Consent", "c2", 1, Some(&permit));
    assert!(ask(&e, &d, &dr, Action::Read, "Observation", Some("far")).permit);
    let mut withdrawn = permit;
    withdrawn["status"] = json!("inactive");
    d.apply("Consent", "c2", 2, Some(&withdrawn));
    assert!(!ask(&e, &d, &dr, Action::Read, "Observation", Some("far")).permit, "withdrawal takes effect at once");
}

#[test]
fn scopes_narrow_and_grant_services() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let importer = Subject { roles: vec!["service".into()], scopes: Some(Scopes::parse("system/*.c").unwrap()), is_service: true, ..Subject::default() };
    assert!(ask(&e, &d, &importer, Action::Create, "Observation", Some("p1")).permit);
    assert!(!ask(&e, &d, &importer, Action::Read, "Observation", Some("p1")).permit);
    let human = Subject { roles: vec!["service".into()], scopes: Some(Scopes::parse("user/*.rs").unwrap()), ..Subject::default() };
    assert!(!ask(&e, &d, &human, Action::Read, "Observation", Some("p1")).permit, "a person given role service is no service");
    let bare = Subject { scopes: None, ..importer };
    assert!(!ask(&e, &d, &bare, Action::Create, "Observation", Some("p1")).permit, "a service without scopes may do nothing");
    let mut dr = person("physician", Some("dr"));
    dr.scopes = Some(Scopes::parse("user/Observation.rs").unwrap());
    assert!(ask(&e, &d, &dr, Action::Read, "Observation", Some("p1")).permit);
    let r = ask(&e, &d, &dr, Action::Read, "Condition", Some("p1"));
    assert!(!r.permit && r.rules == ["smart-scopes"]);
    dr.scopes = Some(Scopes::parse("user/*.cruds").unwrap());
    assert!(!ask(&e, &d, &dr, Action::Read, "Observation", Some("p2")).permit, "a wide scope does not widen the role");
}

#[test]
fn purpose_of_use_is_required_for_clinical_access() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let dr = person("physician", Some("dr"));
    let q = Question { action: Action::Read, resource_type: "Observation", patient: Some("p1"), now: NOW, purpose: "HMARKT", file_scan: None };
    assert!(!decide(&e, &d, &dr, &q, Settings::default()).permit);
}

#[test]
fn custom_policies_add_replace_and_must_validate() {
    let forbid_nurse_notes = PolicyFile {
        name: "local.cedar".into(),
        text: r#"@id("no-nurse-documents") @reason("nurses do not read documents here")
            forbid (principal in Valv::Role::"nurse", action, resource == Valv::ResourceType::"DocumentReference");"#.into(),
    };
    let e = Engine::new(&[forbid_nurse_notes], false).unwrap();
    let d = world();
    let r = ask(&e, &d, &person("nurse", None), Action::Read, "DocumentReference", Some("p3"));
    assert!(!r.permit && r.rules == ["no-nurse-documents"]);
    let replace = PolicyFile { name: "r.cedar".into(), text: r#"@id("clinical-read") @reason("none") permit (principal, action, resource) when { false };"#.into() };
    let e = Engine::new(&[replace], false).unwrap();
    assert!(!ask(&e, &d, &person("physician", Some("dr")), Action::Read, "Observation", Some("p1")).permit);
    assert_eq!(e.policy("clinical-read").unwrap().origin, "r.cedar");
    for bad in [
        r#"permit (principal, action, resource);"#,
        r#"@id("x") permit (principal, action, resource) when { context.no_such_fact };"#,
        r#"@id("x") permit (principal, action, resource"#,
        r#"@id("x") permit (principal, action, resource); @id("x") forbid (principal, action, resource);"#,
    ] {
        assert!(Engine::new(&[PolicyFile { name: "bad.cedar".into(), text: bad.into() }], false).is_err(), "{bad}");
    }
}

#[test]
fn a_files_scan_status_is_a_fact_policies_decide_on() {
    let d = world();
    let dr = person("physician", Some("dr"));
    let file = |e: &Engine, s: &Subject, scan: Option<&str>, purpose: &str| {
        decide(e, &d, s, &Question { action: Action::Read, resource_type: "Binary", patient: Some("p1"), now: NOW, purpose, file_scan: scan }, Settings::default())
    };
    let e = Engine::with_defaults().unwrap();
    assert!(file(&e, &dr, Some("clean"), "TREAT").permit);
    assert!(file(&e, &dr, None, "TREAT").permit, "the Binary's FHIR JSON is not its bytes");
    let infected = file(&e, &dr, Some("infected"), "TREAT");
    assert!(!infected.permit && infected.rules == ["file-infected"], "{infected:?}");
    assert!(infected.facts.describe().contains(&"file_scan=infected".to_string()));
    let svc = Subject { roles: vec!["service".into()], scopes: Some(Scopes::parse("system/*.rs").unwrap()), is_service: true, ..Subject::default() };
    assert!(!file(&e, &svc, Some("infected"), "HOPERAT").permit, "no permit outweighs it");
    // A site's rule: files beyond the scanner's limits only for treatment.
    let site = PolicyFile {
        name: "site.cedar".into(),
        text: r#"@id("unscannable-for-treatment") @reason("unscanned large files only for treatment")
            forbid (principal, action, resource == Valv::ResourceType::"Binary") when { context.file_scan == "unscannable" && context.purpose != "TREAT" };"#
            .into(),
    };
    let e = Engine::new(&[site], false).unwrap();
    let ops = file(&e, &svc, Some("unscannable"), "HOPERAT");
    assert!(!ops.permit && ops.rules == ["unscannable-for-treatment"], "{ops:?}");
    assert!(file(&e, &svc, Some("unscannable"), "TREAT").permit);
    assert!(file(&e, &svc, Some("clean"), "HOPERAT").permit);
    assert!(file(&e, &dr, Some("unscannable"), "TREAT").permit);
}

#[test]
fn type_level_search_is_allowed_when_some_patient_could_be_seen() {
    let e = Engine::with_defaults().unwrap();
    let q = |t| Question { action: Action::Search, resource_type: t, patient: None, now: NOW, purpose: "TREAT", file_scan: None };
    assert!(may_search(&e, &person("physician", None), &q("Observation"), Settings::default()).permit);
    assert!(!may_search(&e, &person("assistant", None), &q("Observation"), Settings::default()).permit);
    let admin = Subject { roles: vec!["admin".into()], ..Subject::default() };
    assert!(!may_search(&e, &admin, &Question { purpose: "HSYSADMIN", ..q("Observation") }, Settings::default()).permit);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// With random care teams, consents and grants, a permitted access to a patient's data by a
    /// person always rests on an active relation, self access or an in-force grant.
    #[test]
    fn no_access_without_relation_or_grant(
        teams in proptest::collection::vec((0usize..6, 0usize..4, any::<bool>(), any::<bool>(), -2i64..3), 0..12),
        grants in proptest::collection::vec((0usize..6, 0usize..4, any::<bool>(), -2i64..3), 0..4),
        role in 0usize..6, me in 0usize..4, patient in 0usize..6, action in 0usize..7, ty in 0usize..5,
    ) {
        let roles = ["physician", "nurse", "assistant", "external_specialist", "support", "admin"];
        let types = ["Observation", "Patient", "Encounter", "MedicationRequest", "Consent"];
        let mut d = Directory::default();
        for (i, (p, m, consultant, active, years)) in teams.iter().enumerate() {
            let end = format!("{}-01-01", 2026 + years);
            d.apply("CareTeam", &format!("t{i}"), 1, Some(&json!({"resourceType": "CareTeam",
                "status": if *active { "active" } else { "inactive" }, "subject": {"reference": format!("Patient/p{p}")},
                "participant": [{"member": {"reference": format!("Practitioner/u{m}")},
                    "role": [{"text": if *consultant { "consultant" } else { "attending" }}], "period": {"end": end}}]})));
        }
        let subject_grants: Vec<Grant> = grants.iter().enumerate().filter(|(_, (_, u, _, _))| *u == me).map(|(i, (p, _, bg, mins))| Grant {
            id: format!("g{i}"),
            kind: if *bg { GrantKind::BreakGlass { patient: format!("p{p}") } } else { GrantKind::Support { patients: vec![format!("p{p}")] } },
            approved: true, revoked: false, start: NOW - 1, end: NOW + mins * 60_000,
        }).collect();
        let s = Subject { roles: vec![roles[role].into()], practitioner: Some(format!("u{me}")), grants: subject_grants.clone(), ..Subject::default() };
        let e = engine();
        let target = format!("p{patient}");
        let d_ = decide(e, &d, &s, &Question { action: Action::ALL[action], resource_type: types[ty], patient: Some(&target), now: NOW, purpose: "TREAT", file_scan: None }, Settings::default());
        if d_.permit {
            let related = teams.iter().any(|(p, m, _, active, years)| *p == patient && *m == me && *active && NOW < end_ms(*years));
            let granted = subject_grants.iter().any(|g| g.in_force(NOW) && match &g.kind {
                GrantKind::BreakGlass { patient: p } => *p == target,
                GrantKind::Support { patients } => patients.contains(&target),
            });
            prop_assert!(related || granted, "permitted without relation or grant: {:?}", d_);
            prop_assert_eq!(d_.grant.is_some(), !related, "an access resting on a grant names it: {:?}", d_);
        }
    }
}

fn end_ms(years: i64) -> i64 {
    valv_fhir::date::parse(&format!("{}-01-01", 2026 + years)).map(|i| i.start * 1000).unwrap_or(0)
}

fn engine() -> &'static Engine {
    static E: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    E.get_or_init(|| Engine::with_defaults().expect("default policies"))
}

/// Decides a write of `body` (`None`: delete) to `t/id` as a change of access facts.
fn change(e: &Engine, d: &Directory, s: &Subject, action: Action, t: &str, id: &str, body: Option<Value>) -> Option<Decision> {
    let c = change::assess(d, t, id, body.as_ref(), NOW)?;
    Some(change::decide_change(e, s, &c, action, NOW, purpose::default_for(&s.roles), Settings::default()))
}

fn block_of(patient: &str, actor: &str, status: &str) -> Value {
    json!({"resourceType": "Consent", "status": status, "patient": {"reference": format!("Patient/{patient}")},
        "scope": {"coding": [{"code": "patient-privacy"}]},
        "provision": {"type": "deny", "actor": [{"reference": {"reference": actor}}], "class": [{"code": "ClinicalData"}]}})
}

#[test]
fn a_physician_cannot_lift_a_block_against_themself_but_may_record_one_against_another() {
    let (e, mut d) = (Engine::with_defaults().unwrap(), world());
    d.apply("Consent", "c1", 1, Some(&block_of("p1", "Practitioner/dr", "active")));
    let dr = person("physician", Some("dr"));
    for (action, body) in [(Action::Update, Some(block_of("p1", "Practitioner/dr", "inactive"))), (Action::Delete, None)] {
        let r = change(&e, &d, &dr, action, "Consent", "c1", body).expect("a fact change");
        assert!(!r.permit && r.rules == ["fact-self-widening"], "{r:?}");
    }
    let c = change::assess(&d, "Consent", "c1", None, NOW).unwrap();
    assert!(c.describe(Some("p1")).contains("block lifted Practitioner/dr"), "{}", c.describe(Some("p1")));
    let r = change(&e, &d, &dr, Action::Create, "Consent", "c2", Some(block_of("p1", "Practitioner/spec", "active"))).expect("a fact change");
    assert!(r.permit && r.rules == ["fact-clinician-narrows"], "{r:?}");
    // Another physician in care may not lift it either: lifting widens, which only registrars do.
    let other = person("physician", Some("spec"));
    assert!(!change(&e, &d, &other, Action::Delete, "Consent", "c1", None).unwrap().permit);
    let registrar = person("registrar", None);
    let r = change(&e, &d, &registrar, Action::Delete, "Consent", "c1", None).unwrap();
    assert!(r.permit && r.rules == ["fact-registrar"], "{r:?}");
    // A write that changes no fact is no fact change.
    assert!(change(&e, &d, &dr, Action::Update, "Consent", "c1", Some(block_of("p1", "Practitioner/dr", "active"))).is_none());
}

#[test]
fn care_teams_and_providers_are_changed_by_registrars_not_by_clinical_writers() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let team = json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/p2"},
        "participant": [{"member": {"reference": "Practitioner/dr"}}]});
    for role in ["assistant", "nurse", "physician"] {
        let r = change(&e, &d, &person(role, Some("x")), Action::Create, "CareTeam", "t9", Some(team.clone())).unwrap();
        assert!(!r.permit, "{role}: {r:?}");
    }
    let r = change(&e, &d, &person("physician", Some("dr")), Action::Create, "CareTeam", "t9", Some(team.clone())).unwrap();
    assert!(!r.permit && r.rules == ["fact-self-widening"], "joining a care team oneself: {r:?}");
    assert!(change(&e, &d, &person("registrar", None), Action::Create, "CareTeam", "t9", Some(team.clone())).unwrap().permit);
    let elsewhere = Subject { units: vec!["clinic".into()], ..person("registrar", None) };
    assert!(!change(&e, &d, &elsewhere, Action::Create, "CareTeam", "t9", Some(team)).unwrap().permit, "another provider's registrar");
    // Moving p1 away from the hospital (or leaving it with none) widens access for other providers.
    let moved = json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/clinic"}});
    let none = json!({"resourceType": "Patient"});
    for body in [moved, none] {
        let c = change::assess(&d, "Patient", "p1", Some(&body), NOW).unwrap();
        assert!(c.widening(), "{}", c.describe(Some("p1")));
        for role in ["assistant", "nurse"] {
            assert!(!change(&e, &d, &person(role, None), Action::Update, "Patient", "p1", Some(body.clone())).unwrap().permit);
        }
        assert!(change(&e, &d, &person("registrar", None), Action::Update, "Patient", "p1", Some(body.clone())).unwrap().permit);
    }
    // A new patient is registered into the registrar's own provider only.
    let at_clinic = json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/clinic"}});
    assert!(!change(&e, &d, &person("registrar", None), Action::Create, "Patient", "new", Some(at_clinic)).unwrap().permit);
    let at_hospital = json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/hospital"}});
    assert!(change(&e, &d, &person("registrar", None), Action::Create, "Patient", "new", Some(at_hospital)).unwrap().permit);
    // Telecom changes are no fact change.
    let same = json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/hospital"}, "telecom": [{"value": "1"}]});
    assert!(change::assess(&d, "Patient", "p1", Some(&same), NOW).is_none());
}

#[test]
fn services_need_an_explicit_scope_and_admins_keep_the_provider_tree() {
    let (e, d) = (Engine::with_defaults().unwrap(), world());
    let svc = |scopes: &str| Subject { roles: vec!["service".into()], scopes: Some(Scopes::parse(scopes).unwrap()), is_service: true, ..Subject::default() };
    let body = Some(block_of("p2", "Practitioner/dr", "active"));
    assert!(!change(&e, &d, &svc("system/*.cruds"), Action::Create, "Consent", "c5", body.clone()).unwrap().permit);
    assert!(!change(&e, &d, &svc("system/Consent.r"), Action::Create, "Consent", "c5", body.clone()).unwrap().permit);
    let r = change(&e, &d, &svc("system/*.cruds system/Consent.c"), Action::Create, "Consent", "c5", body).unwrap();
    assert!(r.permit && r.rules == ["fact-service-explicit-scope"], "{r:?}");
    let moved = Some(json!({"resourceType": "Organization", "partOf": {"reference": "Organization/clinic"}}));
    let admin = Subject { roles: vec!["admin".into()], ..Subject::default() };
    let r = change(&e, &d, &admin, Action::Update, "Organization", "ward", moved.clone()).unwrap();
    assert!(r.permit && r.rules == ["fact-admin-organizations"], "{r:?}");
    // An admin who is staff of the ward would move themself: refused.
    let admin_on_ward = Subject { units: vec!["ward".into()], ..admin };
    assert!(!change(&e, &d, &admin_on_ward, Action::Update, "Organization", "ward", moved).unwrap().permit);
    let c = change::assess(&d, "Organization", "ward", None, NOW).unwrap();
    assert!(c.narrowing() && !c.widening(), "{}", c.describe(None));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Whatever change of a care team, consent or provider a person of any role is permitted to
    /// make, they can do nothing afterwards on that patient that they could not do before, on any
    /// type of the compartment.
    #[test]
    fn a_permitted_fact_change_never_widens_the_writer(
        role in 0usize..7, kind in 0usize..4, who in 0usize..3, status in any::<bool>(), deny in any::<bool>(), class in 0usize..4, patient in 0usize..3,
    ) {
        let roles = ["physician", "nurse", "assistant", "registrar", "patient", "admin", "external_specialist"];
        let actors = ["Practitioner/dr", "Practitioner/spec", "Organization/ward"];
        let classes = ["ClinicalData", "Observation", "PatientData", "Administrative"];
        let p = ["p1", "p2", "far"][patient];
        let e = engine();
        let mut d = world();
        d.apply("Consent", "c1", 1, Some(&block_of("p1", "Practitioner/dr", "active")));
        let mut s = person(roles[role], Some("dr"));
        if roles[role] == "patient" {
            s.patient = Some(p.to_string());
        }
        let (t, id, body) = match kind {
            0 => ("Consent", "c1", Some(json!({"resourceType": "Consent", "status": if status { "active" } else { "inactive" },
                "patient": {"reference": format!("Patient/{p}")}, "scope": {"coding": [{"code": "patient-privacy"}]},
                "provision": {"type": if deny { "deny" } else { "permit" }, "actor": [{"reference": {"reference": actors[who]}}], "class": [{"code": classes[class]}]}}))),
            1 => ("CareTeam", "t1", Some(json!({"resourceType": "CareTeam", "status": if status { "active" } else { "inactive" },
                "subject": {"reference": format!("Patient/{p}")}, "participant": [{"member": {"reference": actors[who]}}]}))),
            2 => ("Patient", p, Some(json!({"resourceType": "Patient", "managingOrganization": {"reference": if deny { "Organization/clinic" } else { "Organization/hospital" }}}))),
            _ => ("CareTeam", "t1", None),
        };
        if let Some(c) = change::assess(&d, t, id, body.as_ref(), NOW) {
            let r = change::decide_change(e, &s, &c, Action::Update, NOW, purpose::default_for(&s.roles), Settings::default());
            if r.permit {
                for pt in &c.patients {
                    for ty in valv_fhir::r4::resource_types().iter().copied().filter(|t| valv_fhir::compartment::is_compartment_type(t) || *t == "Patient") {
                        for a in Action::ALL {
                            let q = Question { action: a, resource_type: ty, patient: Some(pt), now: NOW, purpose: purpose::default_for(&s.roles), file_scan: None };
                            let before = decide(e, &c.before, &s, &q, Settings::default()).permit;
                            let after = decide(e, &c.after, &s, &q, Settings::default()).permit;
                            prop_assert!(before || !after, "{} may now {:?} {} of {} after {}", roles[role], a, ty, pt, c.describe(Some(pt)));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_patient_is_shown_only_their_share_of_a_change_and_no_other_patients_id() {
    let mut d = world();
    // A care team moved from p1 to p2, naming p3 (a relative who is a patient) as a member.
    let team = |p: &str| json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{p}")},
        "participant": [{"member": {"reference": "Practitioner/locum"}}, {"member": {"reference": "Patient/p3"}}]});
    d.apply("CareTeam", "t9", 1, Some(&team("p1")));
    let c = change::assess(&d, "CareTeam", "t9", Some(&team("p2")), NOW).unwrap();
    let (one, two) = (c.describe(Some("p1")), c.describe(Some("p2")));
    assert!(one.starts_with("care-team widens [] narrows [") && one.contains("care team -Practitioner/locum"), "{one}");
    assert!(two.contains("care team +Practitioner/locum") && two.ends_with("narrows []"), "{two}");
    for text in [&one, &two] {
        assert!(!text.contains("Patient/p3") && text.contains("Patient/(another)"), "{text}");
    }
}

#[test]
fn a_scoped_directory_decides_its_patients_as_the_whole_one_does() {
    let mut d = world();
    d.apply("Consent", "c1", 1, Some(&block_of("p1", "Practitioner/dr", "active")));
    let scoped = d.scoped(&["p1".to_string(), "far".to_string()], &[]);
    for s in [person("physician", Some("dr")), person("nurse", None), person("registrar", None), person("external_specialist", Some("spec"))] {
        for p in ["p1", "far"] {
            for t in ["Observation", "Patient", "Consent", "MedicationRequest"] {
                for a in Action::ALL {
                    assert_eq!(ask(engine(), &d, &s, a, t, Some(p)).permit, ask(engine(), &scoped, &s, a, t, Some(p)).permit, "{:?} {a:?} {t} {p}", s.roles);
                }
            }
        }
    }
    assert_eq!(scoped.care_team_count(), 3, "p1's two teams and far's one, not p3's");
}
