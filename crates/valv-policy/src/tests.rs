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
    decide(e, d, s, &Question { action, resource_type: t, patient, now: NOW, purpose }, Settings::default())
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
    let q = Question { action: Action::Read, resource_type: "Observation", patient: Some("p1"), now: NOW, purpose: "TREAT" };
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
    let q = Question { action: Action::Read, resource_type: "Observation", patient: Some("p1"), now: NOW, purpose: "HMARKT" };
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
fn type_level_search_is_allowed_when_some_patient_could_be_seen() {
    let e = Engine::with_defaults().unwrap();
    let q = |t| Question { action: Action::Search, resource_type: t, patient: None, now: NOW, purpose: "TREAT" };
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
        let d_ = decide(e, &d, &s, &Question { action: Action::ALL[action], resource_type: types[ty], patient: Some(&target), now: NOW, purpose: "TREAT" }, Settings::default());
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
