//! The record's own reasons for an access (explanation-based auditing, Fabbri & LeFevre 2011):
//! a patient's encounters, appointments, orders, notes, procedures and care teams, each with
//! its time span and the people and units it involves. An access by someone the record links
//! to the patient near that time is explained; what is left is what the snooping rules score.

use serde_json::Value;
use valv_fhir::{date, reference};

/// The resource types that can explain an access.
pub const EPISODE_TYPES: &[&str] = &["Encounter", "Appointment", "ServiceRequest", "MedicationRequest", "DocumentReference", "Composition", "Procedure", "CareTeam"];

/// How an episode explains accesses around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A visit, appointment, note or procedure: accesses within a margin of its span.
    Visit,
    /// An order: accesses from a margin before it until it has had time to be carried out.
    Order,
    /// A person's care-team membership: accesses within its span only.
    Team,
}

/// One reason the record gives for people to look at a patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episode {
    /// `Encounter/e1`: named in the alert's explanation.
    pub reference: String,
    pub kind: Kind,
    /// Milliseconds since the epoch, half-open; `end` is `i64::MAX` while it goes on.
    pub start: i64,
    pub end: i64,
    /// `Practitioner/x`, `Organization/u`: who and which units it involves.
    pub actors: Vec<String>,
}

/// The margins [`explain`] allows around an episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Margins {
    /// Before and after a visit (charts are read ahead of a visit and completed after it).
    pub visit_ms: i64,
    /// After an order (results come in and are acted on later).
    pub order_ms: i64,
}

impl Episode {
    /// The episodes a committed resource states (a care team gives one per member); none for a
    /// resource without a usable time.
    pub fn parse(resource_type: &str, body: &Value) -> Vec<Episode> {
        // What did not happen (or was recorded in error) explains nothing: otherwise a record
        // naming oneself, then withdrawn, would explain any look.
        if matches!(str_at(body, "status"), Some("entered-in-error" | "cancelled" | "noshow" | "revoked" | "not-done")) {
            return Vec::new();
        }
        let id = body.get("id").and_then(Value::as_str).unwrap_or_default();
        let reference = format!("{resource_type}/{id}");
        let one = |kind, span: Option<(i64, i64)>, actors: Vec<String>| match span {
            Some((start, end)) => vec![Episode { reference: reference.clone(), kind, start, end, actors }],
            None => Vec::new(),
        };
        match resource_type {
            "Encounter" => {
                let ongoing = matches!(str_at(body, "status"), Some("in-progress" | "arrived" | "triaged" | "onleave"));
                let mut actors = refs(body.get("participant"), &["individual"]);
                actors.extend(local(body.get("serviceProvider")));
                let span = period(body.get("period"), ongoing);
                one(Kind::Visit, span, actors)
            }
            "Appointment" => {
                let span = instant(body.get("start")).map(|(s, e)| (s, instant(body.get("end")).map_or(e, |(_, end)| end)));
                one(Kind::Visit, span, refs(body.get("participant"), &["actor"]))
            }
            "ServiceRequest" | "MedicationRequest" => {
                let mut actors: Vec<String> = local(body.get("requester")).into_iter().collect();
                // ServiceRequest.performer is a list, MedicationRequest.performer one reference.
                actors.extend(refs(body.get("performer"), &[]));
                actors.extend(local(body.get("performer")));
                one(Kind::Order, instant(body.get("authoredOn")), actors)
            }
            "DocumentReference" => {
                let span = instant(body.get("date")).or_else(|| body.pointer("/context/period").and_then(|p| period(Some(p), false)));
                let mut actors = refs(body.get("author"), &[]);
                actors.extend(local(body.get("authenticator")));
                one(Kind::Visit, span, actors)
            }
            "Composition" => one(Kind::Visit, instant(body.get("date")), refs(body.get("author"), &[])),
            "Procedure" => {
                let span = instant(body.get("performedDateTime")).or_else(|| body.get("performedPeriod").and_then(|p| period(Some(p), false)));
                one(Kind::Visit, span, refs(body.get("performer"), &["actor"]))
            }
            "CareTeam" => care_team(body, &reference),
            _ => Vec::new(),
        }
    }

    /// Whether the episode involves one of `person` (references) and covers `at`.
    fn explains(&self, person: &[String], at: i64, m: Margins) -> bool {
        let (from, to) = match self.kind {
            Kind::Visit => (self.start.saturating_sub(m.visit_ms), self.end.saturating_add(m.visit_ms)),
            Kind::Order => (self.start.saturating_sub(m.visit_ms), self.end.saturating_add(m.order_ms)),
            Kind::Team => (self.start, self.end),
        };
        from <= at && at < to && self.actors.iter().any(|a| person.contains(a))
    }
}

/// The first episode that explains an access at `at` by `person` (their `Practitioner/x` and
/// `Organization/u` references).
pub fn explain<'a>(episodes: &'a [Episode], person: &[String], at: i64, margins: Margins) -> Option<&'a Episode> {
    episodes.iter().find(|e| e.explains(person, at, margins))
}

/// When the patient's last encounter before `at` ended (`None`: the record shows none, or the
/// patient is in an encounter at `at`: in care now). Appointments to come and notes do not count.
pub fn last_visit_end(episodes: &[Episode], at: i64) -> Option<i64> {
    let encounters = episodes.iter().filter(|e| e.reference.starts_with("Encounter/"));
    if encounters.clone().any(|e| e.start <= at && at < e.end) {
        return None;
    }
    encounters.filter(|e| e.end <= at).map(|e| e.end).max()
}

fn care_team(body: &Value, reference: &str) -> Vec<Episode> {
    if str_at(body, "status") != Some("active") {
        return Vec::new();
    }
    let Some((start, end)) = span_or_always(body.get("period")) else { return Vec::new() };
    let participants = body.get("participant").and_then(Value::as_array).into_iter().flatten();
    participants
        .filter_map(|p| {
            // A unit on the team is the permission to look, not a reason: only a person named on
            // it explains their own accesses.
            let member = local(p.get("member")).filter(|m| m.starts_with("Practitioner/"))?;
            let (s, e) = span_or_always(p.get("period"))?;
            (s.max(start) < e.min(end)).then(|| Episode { reference: reference.to_string(), kind: Kind::Team, start: s.max(start), end: e.min(end), actors: vec![member] })
        })
        .collect()
}

fn str_at<'a>(body: &'a Value, key: &str) -> Option<&'a str> {
    body.get(key).and_then(Value::as_str)
}

/// `Type/id` of a reference element to this server.
fn local(v: Option<&Value>) -> Option<String> {
    v?.get("reference").and_then(Value::as_str).and_then(reference::parse).map(|r| r.key())
}

/// The references in an array of elements, at `path` inside each (none: the element itself).
fn refs(v: Option<&Value>, path: &[&str]) -> Vec<String> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(|item| local(path.iter().try_fold(item, |at, k| at.get(*k)))).collect()
}

/// A dateTime as the span it names (a day for a date), in milliseconds.
fn instant(v: Option<&Value>) -> Option<(i64, i64)> {
    let i = date::parse(v?.as_str()?).ok()?;
    Some((i.start.saturating_mul(1000), i.end.saturating_mul(1000)))
}

/// A care team's or member's Period: absent, always; with no end, going on; `None` when
/// present and unusable.
fn span_or_always(v: Option<&Value>) -> Option<(i64, i64)> {
    match v {
        None => Some((i64::MIN, i64::MAX)),
        Some(p) => period(Some(p), true),
    }
}

/// A Period: a start is needed (an episode with no start explains nothing reliably); with no
/// end it lasts until the end of its start (`open`: goes on); an end that does not parse makes
/// it unusable.
fn period(v: Option<&Value>, open: bool) -> Option<(i64, i64)> {
    let p = v?;
    let (start, start_end) = instant(p.get("start"))?;
    let end = match p.get("end") {
        None if open => i64::MAX,
        None => start_end,
        Some(e) => instant(Some(e))?.1,
    };
    (start < end).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOUR: i64 = 3_600_000;
    const M: Margins = Margins { visit_ms: 24 * HOUR, order_ms: 30 * 24 * HOUR };

    fn ms(s: &str) -> i64 {
        date::parse(s).map(|i| i.start * 1000).unwrap_or_default()
    }

    #[test]
    fn encounters_explain_their_people_and_unit_near_their_time() {
        let body = json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
            "period": {"start": "2026-03-02T08:00:00Z", "end": "2026-03-02T09:00:00Z"},
            "participant": [{"individual": {"reference": "Practitioner/dr"}}], "serviceProvider": {"reference": "Organization/ward"}});
        let eps = Episode::parse("Encounter", &body);
        assert_eq!(eps.len(), 1);
        let dr = ["Practitioner/dr".to_string()];
        let ward_nurse = ["Practitioner/n".to_string(), "Organization/ward".to_string()];
        let other = ["Practitioner/x".to_string(), "Organization/other".to_string()];
        let at = ms("2026-03-02T20:00:00Z");
        assert_eq!(explain(&eps, &dr, at, M).map(|e| e.reference.as_str()), Some("Encounter/e1"));
        assert!(explain(&eps, &ward_nurse, at, M).is_some());
        assert!(explain(&eps, &other, at, M).is_none(), "someone the encounter does not involve");
        assert!(explain(&eps, &dr, ms("2026-03-05T08:00:00Z"), M).is_none(), "three days later");
        // The end is the end of the second it names.
        assert_eq!(last_visit_end(&eps, at), Some(ms("2026-03-02T09:00:00Z") + 1000));
        assert_eq!(last_visit_end(&eps, ms("2026-03-02T08:30:00Z")), None, "in care now");
        assert_eq!(last_visit_end(&eps, ms("2026-03-01")), None, "a visit to come is no last visit");
    }

    #[test]
    fn an_ongoing_stay_explains_until_it_ends_and_orders_for_a_month() {
        let stay = json!({"resourceType": "Encounter", "id": "e2", "status": "in-progress", "period": {"start": "2026-03-02"}, "serviceProvider": {"reference": "Organization/icu"}});
        let order = json!({"resourceType": "ServiceRequest", "id": "o1", "authoredOn": "2026-03-02T10:00:00Z", "requester": {"reference": "Practitioner/dr"}, "performer": [{"reference": "Organization/lab"}]});
        let mut eps = Episode::parse("Encounter", &stay);
        eps.extend(Episode::parse("ServiceRequest", &order));
        assert!(explain(&eps, &["Organization/icu".to_string()], ms("2026-06-01"), M).is_some());
        assert!(explain(&eps, &["Organization/lab".to_string()], ms("2026-03-20"), M).is_some());
        assert!(explain(&eps, &["Organization/lab".to_string()], ms("2026-04-20"), M).is_none());
        let med = json!({"resourceType": "MedicationRequest", "id": "m1", "authoredOn": "2026-03-02", "performer": {"reference": "Practitioner/pharm"}});
        assert!(explain(&Episode::parse("MedicationRequest", &med), &["Practitioner/pharm".to_string()], ms("2026-03-03"), M).is_some());
    }

    #[test]
    fn care_team_members_within_their_span_only() {
        let team = json!({"resourceType": "CareTeam", "id": "t1", "status": "active", "period": {"start": "2026-01-01"},
            "participant": [{"member": {"reference": "Practitioner/a"}, "period": {"start": "2026-02-01", "end": "2026-03-01"}},
                            {"member": {"reference": "Practitioner/b"}, "period": {"start": "2025-01-01"}}]});
        let eps = Episode::parse("CareTeam", &team);
        assert_eq!(eps.len(), 2);
        let a = ["Practitioner/a".to_string()];
        assert!(explain(&eps, &a, ms("2026-02-10"), M).is_some());
        assert!(explain(&eps, &a, ms("2026-03-02"), M).is_none());
        let inactive = json!({"resourceType": "CareTeam", "id": "t2", "status": "inactive", "period": {"start": "2026-01-01"}, "participant": [{"member": {"reference": "Practitioner/a"}}]});
        assert!(Episode::parse("CareTeam", &inactive).is_empty());
        let unit = json!({"resourceType": "CareTeam", "id": "t3", "status": "active", "participant": [{"member": {"reference": "Organization/ward"}}]});
        assert!(Episode::parse("CareTeam", &unit).is_empty(), "a unit on a team explains nothing");
    }

    #[test]
    fn unusable_times_give_no_episode() {
        for (t, body) in [
            ("Encounter", json!({"id": "e", "period": {"end": "2026-01-01"}})),
            ("Encounter", json!({"id": "e", "period": {"start": "yesterday"}})),
            ("Appointment", json!({"id": "a"})),
            ("Encounter", json!({"id": "e", "status": "entered-in-error", "period": {"start": "2026-01-01"}})),
            ("Appointment", json!({"id": "a", "status": "cancelled", "start": "2026-01-01T10:00:00Z"})),
            ("Observation", json!({"id": "o", "effectiveDateTime": "2026-01-01"})),
        ] {
            assert!(Episode::parse(t, &body).is_empty(), "{t} {body}");
        }
    }
}
