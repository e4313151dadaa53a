//! Changes of the facts decisions rest on: a write to a CareTeam, a Consent, a Patient's
//! managing organisation or an Organization's place in the provider tree. Such a write is an
//! access decision of its own (action `changeFact` on `Valv::AccessFact::"<kind>"`), taken on
//! what the change *does*: whose access it widens or narrows, computed by comparing the
//! directory before and after it, and whether it widens the writer's own access — which no
//! policy can permit (`fact-self-widening`).
//!
//! Pure: the directory, the body and the time come in as arguments.

use crate::directory::{Directory, FOLLOWED};
use crate::{decide, Action, Decision, Facts, Question, Settings, Subject};
use serde_json::Value;

/// The kinds of access fact, as the policies name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FactKind {
    /// A privacy Consent: blocks and permits.
    Consent,
    /// A CareTeam: who cares for a patient.
    CareTeam,
    /// `Patient.managingOrganization`: which care provider holds the record.
    Provider,
    /// `Organization.partOf`: the provider tree units belong to.
    Organization,
}

impl FactKind {
    pub const ALL: [FactKind; 4] = [FactKind::Consent, FactKind::CareTeam, FactKind::Provider, FactKind::Organization];

    pub fn of(resource_type: &str) -> Option<FactKind> {
        Some(match resource_type {
            "Consent" => FactKind::Consent,
            "CareTeam" => FactKind::CareTeam,
            "Patient" => FactKind::Provider,
            "Organization" => FactKind::Organization,
            _ => return None,
        })
    }

    /// The `Valv::AccessFact` entity id.
    pub fn name(self) -> &'static str {
        match self {
            FactKind::Consent => "consent",
            FactKind::CareTeam => "care-team",
            FactKind::Provider => "provider",
            FactKind::Organization => "organization",
        }
    }
}

/// The scopes a loader (`valv import`, an integration engine) needs besides `system/*.cruds` to
/// write care teams, consents, patients' providers and organisations: a wildcard is not enough.
pub const FACT_SCOPES: &str = "system/CareTeam.cud system/Consent.cud system/Patient.cud system/Organization.cud";

/// Probed as "anyone not named": provisions without actors apply to it.
const ANYONE: &str = "Practitioner/*";
/// One type of each class a consent or policy can tell apart.
const PROBE_TYPES: &[&str] = &["Patient", "Observation", "MedicationRequest", "Consent", "CareTeam"];

/// Whose access a change widens and narrows, one short phrase each (`block lifted
/// Practitioner/x [Observation]`, `care team +Organization/ward`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    pub widens: Vec<String>,
    pub narrows: Vec<String>,
}

impl Effect {
    pub fn is_empty(&self) -> bool {
        self.widens.is_empty() && self.narrows.is_empty()
    }
}

/// One write to an access fact, assessed.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: FactKind,
    pub resource_type: String,
    pub id: String,
    /// The patients whose facts it changes (none for the organisation tree).
    pub patients: Vec<String>,
    /// The directory as it is and as the write would leave it, scoped to those patients.
    pub before: Directory,
    pub after: Directory,
    /// The whole change's effect (what the decision rests on)…
    pub effect: Effect,
    /// …and each patient's share of it (what that patient's audit entry shows).
    pub per_patient: Vec<(String, Effect)>,
}

impl Change {
    /// One line for the audit entry of `patient` (`None`: the whole change, e.g. the provider
    /// tree): `consent widens [block lifted Practitioner/x [Observation]] narrows []`. Only that
    /// patient's share of the change is shown, and a reference to any other patient (a consent
    /// may name a relative who is a patient too) is shown as `Patient/(another)`: what one
    /// patient is shown of the log reveals nothing about another.
    pub fn describe(&self, patient: Option<&str>) -> String {
        let effect = match patient {
            Some(p) => self.per_patient.iter().find(|(q, _)| q == p).map(|(_, e)| e.clone()).unwrap_or_default(),
            None => self.effect.clone(),
        };
        let shown = |phrases: &[String]| phrases.iter().map(|ph| redact_patients(ph, patient)).collect::<Vec<_>>().join("; ");
        format!("{} widens [{}] narrows [{}]", self.kind.name(), shown(&effect.widens), shown(&effect.narrows))
    }

    pub fn widening(&self) -> bool {
        !self.effect.widens.is_empty()
    }

    pub fn narrowing(&self) -> bool {
        !self.effect.narrows.is_empty()
    }
}

/// What writing `body` (`None`: deleting) as `resource_type/id` would change in the facts;
/// `None` when it changes no fact (not a followed type, or no fact derived from it differs).
pub fn assess(dir: &Directory, resource_type: &str, id: &str, body: Option<&Value>, now: i64) -> Option<Change> {
    if !FOLLOWED.contains(&resource_type) {
        return None;
    }
    let kind = FactKind::of(resource_type)?;
    let patients = if kind == FactKind::Organization { Vec::new() } else { dir.patients_of(resource_type, id, body) };
    let before = dir.scoped(&patients, &[(resource_type, id)]);
    let mut after = before.clone();
    after.apply_next(resource_type, id, body);
    if before.same_entry(&after, resource_type, id) {
        return None;
    }
    let mut effect = Effect::default();
    let mut per_patient = Vec::with_capacity(patients.len());
    for p in &patients {
        let mut mine = Effect::default();
        patient_effect(&before, &after, p, now, &mut mine);
        effect.widens.extend(mine.widens.iter().cloned());
        effect.narrows.extend(mine.narrows.iter().cloned());
        per_patient.push((p.clone(), mine));
    }
    if kind == FactKind::Organization {
        org_effect(&before, &after, id, &mut effect);
    }
    Some(Change { kind, resource_type: resource_type.to_string(), id: id.to_string(), patients, before, after, effect, per_patient })
}

/// `phrase` with every `Patient/<id>` other than `own` replaced by `Patient/(another)`.
fn redact_patients(phrase: &str, own: Option<&str>) -> String {
    let mut out = String::with_capacity(phrase.len());
    let mut rest = phrase;
    while let Some(i) = rest.find("Patient/") {
        let (head, tail) = rest.split_at(i + "Patient/".len());
        out.push_str(head);
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.')).unwrap_or(tail.len());
        if Some(&tail[..end]) == own {
            out.push_str(&tail[..end]);
        } else {
            out.push_str("(another)");
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn patient_effect(before: &Directory, after: &Directory, patient: &str, now: i64, out: &mut Effect) {
    let mut actors = before.named_actors(patient);
    actors.extend(after.named_actors(patient));
    actors.sort();
    actors.dedup();
    actors.push(ANYONE.to_string());
    let mut types: Vec<String> = PROBE_TYPES.iter().map(|t| t.to_string()).collect();
    for c in before.named_classes(patient).into_iter().chain(after.named_classes(patient)) {
        if valv_fhir::r4::is_resource_type(&c) && !types.contains(&c) {
            types.push(c);
        }
    }
    for a in &actors {
        let one = std::slice::from_ref(a);
        let (b, f) = (before.relation(one, &[], patient, "Observation", now), after.relation(one, &[], patient, "Observation", now));
        flip(out, b.care_active, f.care_active, format!("care team +{a}"), format!("care team -{a}"));
        flip(out, b.consultant, f.consultant, format!("consultant +{a}"), format!("consultant -{a}"));
        let (mut lifted, mut blocked, mut permitted, mut unpermitted) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in &types {
            let (b, f) = (before.relation(one, &[], patient, t, now), after.relation(one, &[], patient, t, now));
            if b.block && !f.block {
                lifted.push(t.as_str());
            }
            if !b.block && f.block {
                blocked.push(t.as_str());
            }
            if !b.consent_permit && f.consent_permit {
                permitted.push(t.as_str());
            }
            if b.consent_permit && !f.consent_permit {
                unpermitted.push(t.as_str());
            }
        }
        let mut note = |list: Vec<&str>, widens: bool, what: &str| {
            if !list.is_empty() {
                let phrase = format!("{what} {a} [{}]", list.join(","));
                if widens { out.widens.push(phrase) } else { out.narrows.push(phrase) }
            }
        };
        note(lifted, true, "block lifted");
        note(permitted, true, "consent permits");
        note(blocked, false, "block");
        note(unpermitted, false, "consent permit withdrawn");
    }
    let (b, f) = (before.relation(&[], &[], patient, "Observation", now), after.relation(&[], &[], patient, "Observation", now));
    flip(out, f.unverified, b.unverified, "integrity hold lifted".into(), "integrity hold".into());
    let (mb, ma) = (before.managing_provider(patient), after.managing_provider(patient));
    if mb != ma {
        let name = |p: &Option<String>| p.clone().map_or("none".to_string(), |p| format!("Organization/{p}"));
        let phrase = format!("provider {} -> {}", name(&mb), name(&ma));
        // Staff outside the old provider gain (everyone, when the record is left with none);
        // staff outside the new one lose.
        if mb.is_some() {
            out.widens.push(phrase.clone());
        }
        if ma.is_some() {
            out.narrows.push(phrase);
        }
    }
}

/// An organisation moved in the tree: its staff (and its units' staff) now count as the new
/// provider's, and care teams or consents naming the new ancestors reach them.
fn org_effect(before: &Directory, after: &Directory, id: &str, out: &mut Effect) {
    let (b, f) = (before.parent_of(id).map(str::to_string), after.parent_of(id).map(str::to_string));
    if b == f {
        return;
    }
    if let Some(p) = &f {
        out.widens.push(format!("Organization/{id} part of Organization/{p}"));
    }
    if let Some(p) = &b {
        out.narrows.push(format!("Organization/{id} no longer part of Organization/{p}"));
    }
}

fn flip(out: &mut Effect, before: bool, after: bool, widen: String, narrow: String) {
    match (before, after) {
        (false, true) => out.widens.push(widen),
        (true, false) => out.narrows.push(narrow),
        _ => {}
    }
}

/// The facts a `changeFact` decision is evaluated on (the schema's `Valv::Change`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ChangeFacts {
    /// The change widens someone's access / narrows someone's access.
    pub widening: bool,
    pub narrowing: bool,
    /// The change widens the writer's own access.
    pub self_widening: bool,
    /// The writer is in the patient's care (before the change).
    pub care_active: bool,
    /// The writer is the patient.
    pub self_access: bool,
    /// The writer has a unit under the patient's care provider, before the change and after
    /// it unless it moves an assigned record elsewhere (registering a new patient is into the
    /// writer's own provider; a transfer moves one of the writer's own patients away).
    pub same_provider: bool,
    /// A SMART scope names this resource type explicitly (not `*`) with the write's letter.
    pub explicit_scope: bool,
    pub has_scopes: bool,
    pub token_allows: bool,
    pub purpose: String,
}

/// Whether the writer can do anything after the change on `patient` that they could not
/// before (every action on a type of each class and every type a consent names).
fn widens_own(engine: &crate::Engine, subject: &Subject, change: &Change, patient: &str, now: i64, purpose: &str, settings: Settings) -> bool {
    let mut types: Vec<String> = PROBE_TYPES.iter().map(|t| t.to_string()).collect();
    types.extend(change.before.named_classes(patient).into_iter().chain(change.after.named_classes(patient)).filter(|c| valv_fhir::r4::is_resource_type(c)));
    types.iter().any(|t| {
        Action::ALL.iter().any(|&action| {
            let q = Question { action, resource_type: t, patient: Some(patient), now, purpose, file_scan: None };
            !decide(engine, &change.before, subject, &q, settings).permit && decide(engine, &change.after, subject, &q, settings).permit
        })
    })
}

/// Whether moving an organisation gives the writer new actors (ancestors their care teams or
/// consents may name) or puts one of their units under another provider.
fn org_widens_own(subject: &Subject, change: &Change) -> bool {
    let (b, f) = (change.before.actors(subject.practitioner.as_deref(), &subject.units), change.after.actors(subject.practitioner.as_deref(), &subject.units));
    let providers = |d: &Directory| subject.units.iter().map(|u| d.provider_of(u)).collect::<Vec<_>>();
    f.iter().any(|a| !b.contains(a)) || providers(&change.before) != providers(&change.after)
}

/// Decides whether `subject` may make `change` by `action` (create, update, delete): once per
/// patient it touches (all must permit), once for an organisation move.
pub fn decide_change(engine: &crate::Engine, subject: &Subject, change: &Change, action: Action, now: i64, purpose: &str, settings: Settings) -> Decision {
    let base = ChangeFacts {
        widening: change.widening(),
        narrowing: change.narrowing(),
        explicit_scope: subject.is_service && subject.scopes.as_ref().is_some_and(|s| s.allows_explicitly(&[crate::scope::Context::System], &change.resource_type, action)),
        purpose: purpose.to_string(),
        ..ChangeFacts::default()
    };
    let targets: Vec<Option<&str>> = if change.patients.is_empty() { vec![None] } else { change.patients.iter().map(|p| Some(p.as_str())).collect() };
    let mut last = None;
    for patient in targets {
        let q = Question { action, resource_type: &change.resource_type, patient, now, purpose, file_scan: None };
        let before: Facts = crate::facts(&change.before, subject, &q, settings);
        let after: Facts = crate::facts(&change.after, subject, &q, settings);
        let had_provider = patient.is_some_and(|p| change.before.managing_provider(p).is_some());
        let f = ChangeFacts {
            self_widening: match patient {
                Some(p) => widens_own(engine, subject, change, p, now, purpose, settings),
                None => org_widens_own(subject, change),
            },
            care_active: before.care_active,
            self_access: before.self_access,
            same_provider: before.same_provider && (after.same_provider || had_provider),
            has_scopes: before.has_scopes,
            token_allows: before.token_allows,
            ..base.clone()
        };
        let verdict = engine.evaluate_change(&subject.roles, change.kind, &f);
        let d = Decision { permit: verdict.permit, rules: verdict.rules, grant: None, break_glass: false, facts: before, error: verdict.error };
        if !d.permit {
            return d;
        }
        last = Some(d);
    }
    last.unwrap_or(Decision { permit: false, rules: vec![], grant: None, break_glass: false, facts: Facts::default(), error: None })
}
