//! What the snooping rules need to know about an access beyond its audit entry, worked out from
//! the store when the access is judged (an hour after it, by default): the person (their
//! Practitioner and units, from their account), the patient's episodes and sensitivity (their
//! encounters, appointments, orders, notes, procedures and care teams, and `meta.security` of
//! their Patient resource, opened by the server as it opens any resource), and what the two share
//! — the patients with the person's family name or address, found by blind-index token without
//! opening any patient's record. Cached briefly and bounded; held in memory only.

use crate::App;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use valv_detect::snoop::Access;
use valv_detect::{AccessFacts, Alert, Detector, Episode, EPISODE_TYPES};

/// How long a person's or patient's facts are reused: a burst of accesses to one record is
/// worked out once; a change shows within this time.
const FRESH: Duration = Duration::from_secs(60);
/// People and patients cached at most (beyond, the cache starts again).
const MAX_CACHED: usize = 10_000;
/// Resources of one type read per patient at most when looking for episodes (in id order, not
/// time order: beyond, a patient's episodes are incomplete), and per store read.
const MAX_EPISODE_RESOURCES: usize = 20_000;
const READ_CHUNK: usize = 1_000;
/// A family name (or an address) more patients share than this is too common to say anything.
const COMMON_NAME: usize = 20;

struct Person {
    refs: Vec<String>,
    unit: String,
    /// Patients sharing something with the person, and what.
    shares: HashMap<String, Vec<&'static str>>,
}

struct Patient {
    episodes: Vec<Episode>,
    sensitive: Option<&'static str>,
}

#[derive(Default)]
pub struct Facts {
    people: HashMap<String, (Instant, Option<Person>)>,
    patients: HashMap<String, (Instant, Option<Patient>)>,
}

impl Facts {
    /// Judges the accesses that are due with what the record shows now; the alerts raised. An
    /// access whose person or patient cannot be worked out (not a care professional's account,
    /// an erased patient, a record that does not read) is not judged: one bad record must not
    /// stop detection (it is logged, with ids only).
    pub async fn judge(&mut self, app: &App, detector: &mut Detector, due: Vec<Access>) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for access in due {
            if let Err(e) = self.person(app, &access.agent_id).await {
                tracing::warn!(error = %e, access = access.index, "the detection engine could not work out who made an access; not judged");
                continue;
            }
            if !self.people.get(&access.agent_id).is_some_and(|(_, p)| p.is_some()) {
                continue;
            }
            if let Err(e) = self.patient(app, &access.patient).await {
                tracing::warn!(error = %e, access = access.index, "the detection engine could not read a patient's episodes; not judged");
                continue;
            }
            let (Some((_, Some(person))), Some((_, Some(patient)))) = (self.people.get(&access.agent_id), self.patients.get(&access.patient)) else { continue };
            let shares = person.shares.get(&access.patient).map_or(&[][..], Vec::as_slice);
            let facts = AccessFacts { person: &person.refs, unit: &person.unit, shares, sensitive: patient.sensitive, episodes: &patient.episodes };
            alerts.extend(detector.judge(&access, &facts));
            app.metrics.detection_judged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        alerts
    }

    async fn person(&mut self, app: &App, agent: &str) -> Result<(), String> {
        if self.people.get(agent).is_some_and(|(at, _)| at.elapsed() < FRESH) {
            return Ok(());
        }
        if self.people.len() >= MAX_CACHED {
            self.people.clear();
        }
        let person = match app.identity.by_id(agent).await.map_err(|e| format!("reading account {agent}: {}", e.diagnostics))? {
            Some(u) if u.patient.is_none() && u.roles.iter().any(|r| valv_detect::snoop::JUDGED_ROLES.contains(&r.as_str())) => {
                let mut refs: Vec<String> = u.practitioner.iter().map(|p| format!("Practitioner/{p}")).collect();
                refs.extend(u.units.iter().map(|o| format!("Organization/{o}")));
                let unit = u.units.first().map(|o| format!("Organization/{o}")).unwrap_or_default();
                let shares = match &u.practitioner {
                    Some(p) => shared_with(app, p).await,
                    None => HashMap::new(),
                };
                Some(Person { refs, unit, shares })
            }
            _ => None,
        };
        self.people.insert(agent.to_string(), (Instant::now(), person));
        Ok(())
    }

    async fn patient(&mut self, app: &App, id: &str) -> Result<(), String> {
        if self.patients.get(id).is_some_and(|(at, _)| at.elapsed() < FRESH) {
            return Ok(());
        }
        if self.patients.len() >= MAX_CACHED {
            self.patients.clear();
        }
        let patient = if app.vault.is_erased(id) { None } else { Some(Patient { episodes: episodes(app, id).await?, sensitive: sensitivity(app, id).await? }) };
        self.patients.insert(id.to_string(), (Instant::now(), patient));
        Ok(())
    }
}

/// Opens one resource's current version (`None`: absent, deleted or unreadable).
async fn open(app: &App, resource_type: &str, id: &str) -> Result<Option<Value>, String> {
    let Some(v) = app.vault.fetch(resource_type, id, None).await.map_err(|e| format!("reading {resource_type}/{id}: {e}"))? else { return Ok(None) };
    Ok(app.vault.open_version(v, app.clock.now_ms()).await.ok().and_then(|r| r.body))
}

/// The patient's episodes: the explaining resources in their compartment, opened.
async fn episodes(app: &App, patient: &str) -> Result<Vec<Episode>, String> {
    let store = app.vault.store();
    let owned = store.resources_of(patient).await.map_err(|e| format!("listing a patient's resources: {e}"))?;
    let mut out = Vec::new();
    for resource_type in EPISODE_TYPES {
        let mut ids: Vec<String> = owned.iter().filter(|(t, _)| t == resource_type).map(|(_, id)| id.clone()).collect();
        ids.truncate(MAX_EPISODE_RESOURCES);
        for chunk in ids.chunks(READ_CHUNK) {
            let versions = store.read_many(resource_type, chunk).await.map_err(|e| format!("reading {resource_type}: {e}"))?;
            for v in versions {
                if let Ok(valv_store::vault::Resource { body: Some(body), .. }) = app.vault.open_version(v, app.clock.now_ms()).await {
                    out.extend(Episode::parse(resource_type, &body));
                }
            }
        }
    }
    Ok(out)
}

/// Why the patient is sensitive, from the security labels of their Patient resource: staff
/// (`EMP`), a public figure (`CELEB`, `VIP`), or restricted (confidentiality `R` or `V`).
async fn sensitivity(app: &App, patient: &str) -> Result<Option<&'static str>, String> {
    let Some(body) = open(app, "Patient", patient).await? else { return Ok(None) };
    let codes: Vec<&str> = body.pointer("/meta/security").and_then(Value::as_array).into_iter().flatten().filter_map(|c| c.get("code").and_then(Value::as_str)).collect();
    Ok(if codes.contains(&"EMP") {
        Some("staff member")
    } else if codes.iter().any(|c| matches!(*c, "CELEB" | "VIP")) {
        Some("VIP")
    } else if codes.iter().any(|c| matches!(*c, "R" | "V")) {
        Some("restricted")
    } else {
        None
    })
}

/// The patients with the practitioner's (uncommon) family name or their address (line and
/// postal code), found by blind-index token: no patient's record is opened. A search that fails
/// is logged and leaves its share out (the other rules still judge the person's accesses).
async fn shared_with(app: &App, practitioner: &str) -> HashMap<String, Vec<&'static str>> {
    let mut out: HashMap<String, Vec<&'static str>> = HashMap::new();
    let body = match open(app, "Practitioner", practitioner).await {
        Ok(Some(body)) => body,
        Ok(None) => return out,
        Err(e) => {
            tracing::warn!(error = %e, "the detection engine could not read a person's Practitioner record");
            return out;
        }
    };
    let family = body.pointer("/name/0/family").and_then(Value::as_str).map(|f| ("family name", vec![("family", f)]));
    let line = body.pointer("/address/0/line/0").and_then(Value::as_str);
    let postal = body.pointer("/address/0/postalCode").and_then(Value::as_str);
    // `address` indexes every part of an address: the line and the postal code both match.
    let address = line.zip(postal).map(|(l, p)| ("address", vec![("address", l), ("address", p)]));
    for (what, criteria) in family.into_iter().chain(address) {
        let filter = app.vault.exact_strings("Patient", &criteria);
        match app.vault.store().search(&filter).await {
            Ok(found) if found.len() <= COMMON_NAME => found.into_iter().for_each(|l| out.entry(l.id).or_default().push(what)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "the detection engine could not search for a person's relatives"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The detector judges the roles the policy treats as care staff: one list, kept in two
    /// crates (the pure rules do not depend on the policy crate).
    #[test]
    fn the_judged_roles_are_the_policys_care_roles() {
        assert_eq!(valv_detect::snoop::JUDGED_ROLES, valv_policy::CARE_ROLES);
    }
}
