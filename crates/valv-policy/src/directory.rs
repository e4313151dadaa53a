//! The relationships decisions depend on, kept from the FHIR resources that state them:
//! CareTeam (who cares for whom, when, in which role), Consent (privacy permits and denials),
//! Organization (`partOf`: which care provider a unit belongs to) and Patient
//! (`managingOrganization`). The server feeds every committed version in; a decision reads
//! only the entries of the one patient it is about, so its cost does not grow with the number
//! of relationships a user has.

use crate::classes;
use serde_json::Value;
use std::collections::HashMap;
use valv_fhir::{date, reference};

/// The resource types the directory follows.
pub const FOLLOWED: &[&str] = &["CareTeam", "Consent", "Organization", "Patient"];

/// A half-open time span in milliseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub end: i64,
}

impl Span {
    pub const ALWAYS: Span = Span { start: i64::MIN, end: i64::MAX };
    pub fn contains(&self, t: i64) -> bool {
        self.start <= t && t < self.end
    }
}

/// A FHIR Period as a span; `None` when a bound is not a valid dateTime.
fn period(v: Option<&Value>) -> Option<Span> {
    let Some(p) = v else { return Some(Span::ALWAYS) };
    let bound = |k: &str, end: bool| -> Option<i64> {
        match p.get(k).and_then(Value::as_str) {
            None => Some(if end { i64::MAX } else { i64::MIN }),
            Some(s) => date::parse(s).ok().map(|i| if end { i.end } else { i.start }.saturating_mul(1000)),
        }
    };
    Some(Span { start: bound("start", false)?, end: bound("end", true)? })
}

/// `Type/id` of a reference element, when it points at this server.
fn local_ref(v: Option<&Value>) -> Option<String> {
    v?.get("reference").and_then(Value::as_str).and_then(reference::parse).map(|r| r.key())
}

fn codes(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array).into_iter().flatten().flat_map(|cc| {
        let codings = cc.get("coding").and_then(Value::as_array).into_iter().flatten().filter_map(|c| c.get("code").and_then(Value::as_str));
        codings.chain(cc.get("text").and_then(Value::as_str))
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// `Practitioner/x` or `Organization/y`.
    pub reference: String,
    /// Taking part as a consultant (role code or text `consultant`).
    pub consultant: bool,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CareTeam {
    pub patient: String,
    /// `status` is `active` and every date in it parsed.
    pub active: bool,
    pub span: Span,
    pub members: Vec<Member>,
}

impl CareTeam {
    pub fn parse(body: &Value) -> Option<CareTeam> {
        let patient = local_ref(body.get("subject")).and_then(|r| r.strip_prefix("Patient/").map(str::to_string))?;
        let span = period(body.get("period"));
        let mut members = Vec::new();
        let mut dates_ok = span.is_some();
        for p in body.get("participant").and_then(Value::as_array).into_iter().flatten() {
            let Some(reference) = local_ref(p.get("member")) else { continue };
            let consultant = codes(p.get("role")).any(|c| c.eq_ignore_ascii_case("consultant"));
            match period(p.get("period")) {
                Some(span) => members.push(Member { reference, consultant, span }),
                None => dates_ok = false,
            }
        }
        let active = dates_ok && body.get("status").and_then(Value::as_str) == Some("active");
        Some(CareTeam { patient, active, span: span.unwrap_or(Span { start: 0, end: 0 }), members })
    }
}

/// One provision of a Consent: a rule with its exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provision {
    /// `Some(true)` permit, `Some(false)` deny, `None` no type (only its exceptions count).
    pub permit: Option<bool>,
    pub span: Span,
    pub actors: Vec<String>,
    /// Resource types or Valv resource classes.
    pub classes: Vec<String>,
    pub exceptions: Vec<Provision>,
}

impl Provision {
    fn parse(v: &Value) -> Provision {
        let permit = match v.get("type").and_then(Value::as_str) {
            Some("permit") => Some(true),
            Some("deny") => Some(false),
            _ => None,
        };
        // A period that cannot be read must not narrow a denial away: it applies always.
        let span = period(v.get("period")).unwrap_or(Span::ALWAYS);
        let actors = v.get("actor").and_then(Value::as_array).into_iter().flatten().filter_map(|a| local_ref(a.get("reference"))).collect();
        let classes = v.get("class").and_then(Value::as_array).into_iter().flatten().filter_map(|c| c.get("code").and_then(Value::as_str)).map(str::to_string).collect();
        let exceptions = v.get("provision").and_then(Value::as_array).into_iter().flatten().map(Provision::parse).collect();
        Provision { permit, span, actors, classes, exceptions }
    }

    fn applies(&self, actors: &[String], resource_type: &str, now: i64) -> bool {
        self.span.contains(now)
            && (self.actors.is_empty() || self.actors.iter().any(|a| actors.contains(a)))
            && (self.classes.is_empty() || self.classes.iter().any(|c| classes::is_in(resource_type, c)))
    }

    /// The rule's verdict for this request: the deepest applying provision with a type wins.
    fn verdict(&self, actors: &[String], resource_type: &str, now: i64) -> Option<bool> {
        if !self.applies(actors, resource_type, now) {
            return None;
        }
        let mut out = self.permit;
        for e in &self.exceptions {
            if let Some(v) = e.verdict(actors, resource_type, now) {
                out = Some(v);
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    pub patient: String,
    /// `status` is `active` and `scope` is `patient-privacy`.
    pub active: bool,
    pub provision: Option<Provision>,
}

impl Consent {
    pub fn parse(body: &Value) -> Option<Consent> {
        let patient = local_ref(body.get("patient")).and_then(|r| r.strip_prefix("Patient/").map(str::to_string))?;
        let privacy = body.get("scope").is_some_and(|s| codes(Some(&Value::Array(vec![s.clone()]))).any(|c| c == "patient-privacy"));
        let active = privacy && body.get("status").and_then(Value::as_str) == Some("active");
        Some(Consent { patient, active, provision: body.get("provision").map(Provision::parse) })
    }
}

/// What the directory knows about one followed resource (to undo it on the next version).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Team(CareTeam),
    Consent(Consent),
    Org(Option<String>),
    Patient(Option<String>),
    /// Deleted, or a version the directory cannot use.
    Gone,
}

/// The index of followed resources, by patient.
#[derive(Debug, Default, Clone)]
pub struct Directory {
    entries: HashMap<(String, String), (u64, Entry)>,
    teams: HashMap<String, Vec<(String, CareTeam)>>,
    consents: HashMap<String, Vec<(String, Consent)>>,
    parent: HashMap<String, String>,
    managing: HashMap<String, String>,
    /// Followed resources that failed to open when read, with their patient: until a newer
    /// version arrives, that patient's relationship facts are unverified.
    unreadable: HashMap<(String, String), String>,
}

/// The facts about one person (or unit) and one patient the decision needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relation {
    pub care_active: bool,
    pub consultant: bool,
    pub block: bool,
    pub consent_permit: bool,
    pub cross_org: bool,
    pub unverified: bool,
}

impl Directory {
    /// Takes in one committed version (`body` `None`: deleted). Older versions than the one held
    /// are ignored, so commits applied out of order end in the newest state.
    pub fn apply(&mut self, resource_type: &str, id: &str, version: u64, body: Option<&Value>) {
        if !FOLLOWED.contains(&resource_type) {
            return;
        }
        let key = (resource_type.to_string(), id.to_string());
        if self.entries.get(&key).is_some_and(|(v, _)| *v >= version) {
            return;
        }
        self.unreadable.remove(&key);
        if let Some((_, old)) = self.entries.remove(&key) {
            self.forget(id, old);
        }
        let entry = body.and_then(|b| match resource_type {
            "CareTeam" => CareTeam::parse(b).map(Entry::Team),
            "Consent" => Consent::parse(b).map(Entry::Consent),
            "Organization" => Some(Entry::Org(local_ref(b.get("partOf")).and_then(|r| r.strip_prefix("Organization/").map(str::to_string)))),
            "Patient" => Some(Entry::Patient(local_ref(b.get("managingOrganization")).and_then(|r| r.strip_prefix("Organization/").map(str::to_string)))),
            _ => None,
        });
        // A deletion still records its version, so an older version arriving late stays out.
        let entry = entry.unwrap_or(Entry::Gone);
        self.remember(id, &entry);
        self.entries.insert(key, (version, entry));
    }

    fn remember(&mut self, id: &str, entry: &Entry) {
        match entry {
            Entry::Team(t) => self.teams.entry(t.patient.clone()).or_default().push((id.to_string(), t.clone())),
            Entry::Consent(c) => self.consents.entry(c.patient.clone()).or_default().push((id.to_string(), c.clone())),
            Entry::Org(Some(p)) => {
                self.parent.insert(id.to_string(), p.clone());
            }
            Entry::Patient(Some(o)) => {
                self.managing.insert(id.to_string(), o.clone());
            }
            _ => {}
        }
    }

    fn forget(&mut self, id: &str, old: Entry) {
        match old {
            Entry::Team(t) => remove_from(&mut self.teams, &t.patient, id),
            Entry::Consent(c) => remove_from(&mut self.consents, &c.patient, id),
            Entry::Org(_) => {
                self.parent.remove(id);
            }
            Entry::Patient(_) => {
                self.managing.remove(id);
            }
            Entry::Gone => {}
        }
    }

    /// Records a followed resource of `patient` that could not be read intact.
    pub fn mark_unreadable(&mut self, resource_type: &str, id: &str, patient: &str) {
        self.unreadable.insert((resource_type.to_string(), id.to_string()), patient.to_string());
    }

    /// The top of an organisation's `partOf` chain (the care provider); cycles end the walk.
    pub fn provider_of(&self, org: &str) -> String {
        let mut at = org;
        for _ in 0..32 {
            match self.parent.get(at) {
                Some(p) if p != org => at = p,
                _ => break,
            }
        }
        at.to_string()
    }

    /// The care provider holding a patient's record (its managing organisation's top).
    pub fn managing_provider(&self, patient: &str) -> Option<String> {
        self.managing.get(patient).map(|o| self.provider_of(o))
    }

    /// The references that stand for this person in care teams and consents: their
    /// Practitioner, their units, and the organisations above those units.
    pub fn actors(&self, practitioner: Option<&str>, units: &[String]) -> Vec<String> {
        let mut out: Vec<String> = practitioner.map(|p| format!("Practitioner/{p}")).into_iter().collect();
        for u in units {
            let mut at = u.as_str();
            for _ in 0..32 {
                let r = format!("Organization/{at}");
                if out.contains(&r) {
                    break;
                }
                out.push(r);
                match self.parent.get(at) {
                    Some(p) => at = p,
                    None => break,
                }
            }
        }
        out
    }

    /// The facts relating `actors` (from [`Directory::actors`]) to `patient` at `now`.
    pub fn relation(&self, actors: &[String], units: &[String], patient: &str, resource_type: &str, now: i64) -> Relation {
        let mut r = Relation { unverified: self.unreadable.values().any(|p| p == patient), ..Relation::default() };
        for (_, t) in self.teams.get(patient).into_iter().flatten() {
            if !(t.active && t.span.contains(now)) {
                continue;
            }
            for m in t.members.iter().filter(|m| m.span.contains(now) && actors.contains(&m.reference)) {
                r.care_active = true;
                r.consultant |= m.consultant;
            }
        }
        for (_, c) in self.consents.get(patient).into_iter().flatten().filter(|(_, c)| c.active) {
            match c.provision.as_ref().and_then(|p| p.verdict(actors, resource_type, now)) {
                Some(true) => r.consent_permit = true,
                Some(false) => r.block = true,
                None => {}
            }
        }
        if let Some(org) = self.managing.get(patient) {
            let provider = self.provider_of(org);
            r.cross_org = !units.iter().any(|u| self.provider_of(u) == provider);
        }
        r
    }

    /// How many care teams are held (for `explain` and tests).
    pub fn care_team_count(&self) -> usize {
        self.teams.values().map(Vec::len).sum()
    }

    /// The patients whose facts a version of a followed resource bears on, as held now and as
    /// `body` would make them (`None`: deleted): a care team moved to another patient touches both.
    pub fn patients_of(&self, resource_type: &str, id: &str, body: Option<&Value>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |p: Option<String>| {
            if let Some(p) = p.filter(|p| !out.contains(p)) {
                out.push(p);
            }
        };
        match self.entries.get(&(resource_type.to_string(), id.to_string())).map(|(_, e)| e) {
            Some(Entry::Team(t)) => add(Some(t.patient.clone())),
            Some(Entry::Consent(c)) => add(Some(c.patient.clone())),
            _ => {}
        }
        match (resource_type, body) {
            ("CareTeam", Some(b)) => add(CareTeam::parse(b).map(|t| t.patient)),
            ("Consent", Some(b)) => add(Consent::parse(b).map(|c| c.patient)),
            ("Patient", _) => add(Some(id.to_string())),
            _ => {}
        }
        out
    }

    /// A directory holding what this one knows of `patients` (care teams, consents, managing
    /// organisation, integrity failures), of the resources `keys` name, and the organisation
    /// tree: enough to compute those patients' relations exactly, at a cost that grows with their
    /// own relationships and the number of organisations, not with the number of patients.
    pub fn scoped(&self, patients: &[String], keys: &[(&str, &str)]) -> Directory {
        let mut d = Directory::default();
        let mut copy = |t: &str, id: &str| {
            let key = (t.to_string(), id.to_string());
            if let (Some((v, e)), false) = (self.entries.get(&key), d.entries.contains_key(&key)) {
                d.remember(id, e);
                d.entries.insert(key, (*v, e.clone()));
            }
        };
        for org in self.parent.keys() {
            copy("Organization", org);
        }
        for p in patients {
            for (id, _) in self.teams.get(p).into_iter().flatten() {
                copy("CareTeam", id);
            }
            for (id, _) in self.consents.get(p).into_iter().flatten() {
                copy("Consent", id);
            }
            copy("Patient", p);
        }
        for (t, id) in keys {
            copy(t, id);
        }
        d.unreadable = self.unreadable.iter().filter(|(_, p)| patients.contains(p)).map(|(k, p)| (k.clone(), p.clone())).collect();
        d
    }

    /// Takes in `body` as the next version of a followed resource, whatever version is held:
    /// the state a write would leave (`None`: deleted).
    pub fn apply_next(&mut self, resource_type: &str, id: &str, body: Option<&Value>) {
        let next = self.entries.get(&(resource_type.to_string(), id.to_string())).map_or(1, |(v, _)| v + 1);
        self.apply(resource_type, id, next, body);
    }

    /// Whether what this directory derives from a followed resource is the same in `other` (a
    /// new telephone number on a Patient changes nothing; a new managing organisation does).
    pub fn same_entry(&self, other: &Directory, resource_type: &str, id: &str) -> bool {
        let key = (resource_type.to_string(), id.to_string());
        let entry = |d: &Directory| d.entries.get(&key).map_or(Entry::Gone, |(_, e)| e.clone());
        entry(self) == entry(other)
    }

    /// Every provision of `patient`'s consents, nested ones included.
    fn provisions(&self, patient: &str) -> Vec<&Provision> {
        let mut out = Vec::new();
        let mut todo: Vec<&Provision> = self.consents.get(patient).into_iter().flatten().filter_map(|(_, c)| c.provision.as_ref()).collect();
        while let Some(p) = todo.pop() {
            todo.extend(p.exceptions.iter());
            out.push(p);
        }
        out
    }

    /// Every actor reference named in `patient`'s care teams and consents.
    pub fn named_actors(&self, patient: &str) -> Vec<String> {
        let teams = self.teams.get(patient).into_iter().flatten().flat_map(|(_, t)| t.members.iter().map(|m| m.reference.clone()));
        let consents = self.provisions(patient).into_iter().flat_map(|p| p.actors.iter().cloned());
        let mut out: Vec<String> = teams.chain(consents).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every resource type or class a consent of `patient` names.
    pub fn named_classes(&self, patient: &str) -> Vec<String> {
        let mut out: Vec<String> = self.provisions(patient).into_iter().flat_map(|p| p.classes.iter().cloned()).collect();
        out.sort();
        out.dedup();
        out
    }

    /// The parent an organisation has in the tree.
    pub fn parent_of(&self, org: &str) -> Option<&str> {
        self.parent.get(org).map(String::as_str)
    }
}

fn remove_from<T>(map: &mut HashMap<String, Vec<(String, T)>>, patient: &str, id: &str) {
    if let Some(v) = map.get_mut(patient) {
        v.retain(|(i, _)| i != id);
        if v.is_empty() {
            map.remove(patient);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(y: i64) -> i64 {
        date::parse(&format!("{y}-06-01")).unwrap().start * 1000
    }

    fn team(patient: &str, member: &str, role: &str, end: &str) -> Value {
        json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")},
            "participant": [{"member": {"reference": member}, "role": [{"text": role}], "period": {"start": "2020-01-01", "end": end}}]})
    }

    #[test]
    fn care_relationships_follow_periods_roles_and_versions() {
        let mut d = Directory::default();
        d.apply("CareTeam", "t1", 1, Some(&team("p1", "Practitioner/dr", "attending", "2030-01-01")));
        let me = d.actors(Some("dr"), &[]);
        assert!(d.relation(&me, &[], "p1", "Observation", at(2025)).care_active);
        assert!(!d.relation(&me, &[], "p1", "Observation", at(2031)).care_active, "expired");
        assert!(!d.relation(&me, &[], "p2", "Observation", at(2025)).care_active, "other patient");
        d.apply("CareTeam", "t1", 3, Some(&team("p1", "Practitioner/dr", "consultant", "2030-01-01")));
        d.apply("CareTeam", "t1", 2, Some(&team("p1", "Practitioner/other", "attending", "2030-01-01")));
        let r = d.relation(&me, &[], "p1", "Observation", at(2025));
        assert!(r.care_active && r.consultant, "version 3 holds; the late version 2 is ignored");
        d.apply("CareTeam", "t1", 4, None);
        assert!(!d.relation(&me, &[], "p1", "Observation", at(2025)).care_active, "deleted");
        assert_eq!(d.care_team_count(), 0);
    }

    #[test]
    fn units_and_providers() {
        let mut d = Directory::default();
        d.apply("Organization", "ward", 1, Some(&json!({"resourceType": "Organization", "partOf": {"reference": "Organization/hospital"}})));
        d.apply("Patient", "p1", 1, Some(&json!({"resourceType": "Patient", "managingOrganization": {"reference": "Organization/hospital"}})));
        d.apply("CareTeam", "t1", 1, Some(&team("p1", "Organization/ward", "attending", "2030-01-01")));
        let units = vec!["ward".to_string()];
        let me = d.actors(None, &units);
        assert_eq!(me, vec!["Organization/ward", "Organization/hospital"]);
        let r = d.relation(&me, &units, "p1", "Observation", at(2025));
        assert!(r.care_active && !r.cross_org);
        let other = vec!["clinic".to_string()];
        assert!(d.relation(&d.actors(None, &other), &other, "p1", "Observation", at(2025)).cross_org);
    }

    #[test]
    fn consent_provisions_and_exceptions() {
        let mut d = Directory::default();
        let c = json!({"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/p1"},
            "scope": {"coding": [{"code": "patient-privacy"}]},
            "provision": {"type": "permit", "provision": [
                {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/dr"}}], "class": [{"code": "Clinical"}]}]}});
        d.apply("Consent", "c1", 1, Some(&c));
        let dr = d.actors(Some("dr"), &[]);
        let r = d.relation(&dr, &[], "p1", "Observation", at(2025));
        assert!(r.block && !r.consent_permit);
        let r = d.relation(&dr, &[], "p1", "Encounter", at(2025));
        assert!(!r.block && r.consent_permit, "the denial covers clinical data only");
        let other = d.actors(Some("x"), &[]);
        assert!(d.relation(&other, &[], "p1", "Observation", at(2025)).consent_permit);
        let mut withdrawn = c.clone();
        withdrawn["status"] = json!("inactive");
        d.apply("Consent", "c1", 2, Some(&withdrawn));
        let r = d.relation(&dr, &[], "p1", "Observation", at(2025));
        assert!(!r.block && !r.consent_permit, "withdrawn: neither");
    }
}
