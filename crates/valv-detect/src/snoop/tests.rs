//! Each snooping rule on a constructed case and its legitimate twin; accesses wait for the
//! record before they are judged.

use super::record::{Episode, Kind};
use crate::{AccessFacts, Alert, Config, Detector, Entry};

const T0: i64 = 1_780_000_000_000; // a Thursday, 20:26 UTC
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

struct Log {
    d: Detector,
    next: u64,
    alerts: Vec<Alert>,
}

struct Who<'a> {
    refs: Vec<String>,
    unit: &'a str,
}

fn dr() -> Who<'static> {
    Who { refs: vec!["Practitioner/dr".into(), "Organization/ward".into()], unit: "Organization/ward" }
}

impl Log {
    fn new(config: Config) -> Log {
        Log { d: Detector::new(config), next: 0, alerts: Vec::new() }
    }

    fn entry(&mut self, at: i64, interaction: &str, outcome: &str, agent: &str, patient: Option<&str>, reason: &str) -> Entry {
        let e = Entry {
            index: self.next,
            time: at,
            interaction: interaction.into(),
            outcome: outcome.into(),
            status: 200,
            agent_id: agent.into(),
            roles: vec!["physician".into()],
            source_address: "10.0.0.1".into(),
            patient: patient.map(str::to_string),
            resource_type: Some("Observation".into()),
            resource_id: None,
            reason: reason.into(),
        };
        self.next += 1;
        self.alerts.extend(self.d.observe(&e));
        e
    }

    /// An access by `agent`, judged at once (the delay is 0 in these tests) with these facts.
    #[allow(clippy::too_many_arguments)]
    fn access(&mut self, at: i64, agent: &str, who: &Who<'_>, patient: &str, shares: &[&str], sensitive: Option<&str>, episodes: &[Episode]) {
        self.entry(at, "read", "success", agent, Some(patient), "permit");
        for due in self.d.due(at) {
            let facts = AccessFacts { person: &who.refs, unit: who.unit, shares, sensitive, episodes };
            self.alerts.extend(self.d.judge(&due, &facts));
        }
    }

    fn rules(&self) -> Vec<&str> {
        self.alerts.iter().map(|a| a.rule.as_str()).collect()
    }
}

fn now_config() -> Config {
    Config { explain_delay_minutes: 0, ..Config::default() }
}

fn visit(actor: &str, start: i64, end: i64) -> Episode {
    Episode { reference: "Encounter/e1".into(), kind: Kind::Visit, start, end, actors: vec![actor.into()] }
}

#[test]
fn an_access_waits_for_the_record_before_it_is_judged() {
    let mut log = Log::new(Config::default());
    log.entry(T0, "read", "success", "dr", Some("p1"), "permit");
    assert!(log.d.due(T0 + 59 * 60_000).is_empty(), "judged before the hour the record is given");
    let due = log.d.due(T0 + HOUR);
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].index, due[0].patient.as_str(), due[0].agent_id.as_str()), (0, "p1", "dr"));
    // A refused access, a write and a service without an agent wait for nothing.
    log.entry(T0, "read", "denied", "dr", Some("p1"), "deny");
    log.entry(T0, "create", "success", "dr", Some("p1"), "permit");
    assert!(log.d.due(i64::MAX).is_empty());
}

#[test]
fn a_relative_and_a_sensitive_patient_opened_without_a_reason() {
    let mut log = Log::new(now_config());
    log.access(T0, "dr", &dr(), "p-sister", &["address"], None, &[]);
    log.access(T0 + 1000, "dr", &dr(), "p-vip", &[], Some("VIP"), &[]);
    assert_eq!(log.rules(), ["snooping-relative", "snooping-sensitive"]);
    let a = &log.alerts[0];
    assert_eq!((a.id.as_str(), a.subject.as_str(), &a.evidence[..]), ("0-snooping-relative", "account:dr", &[0][..]));
    assert!(a.explanation.contains("Patient/p-sister") && a.explanation.contains("same address"), "{a:?}");
    // Again the same day: one alert per person, patient and rule.
    log.access(T0 + 2000, "dr", &dr(), "p-sister", &["address"], None, &[]);
    assert_eq!(log.alerts.len(), 2);
}

#[test]
fn the_same_accesses_explained_by_the_record_are_silent() {
    let mut log = Log::new(now_config());
    let own = [visit("Practitioner/dr", T0 - 2 * HOUR, T0 - HOUR)];
    let unit = [visit("Organization/ward", T0 + 3 * HOUR, T0 + 4 * HOUR)];
    log.access(T0, "dr", &dr(), "p-sister", &["address"], None, &own);
    log.access(T0, "dr", &dr(), "p-vip", &[], Some("VIP"), &unit);
    assert!(log.alerts.is_empty(), "{:?}", log.alerts);
    // An encounter of another unit, or three days earlier, explains nothing.
    let elsewhere = [visit("Organization/ed", T0, T0 + HOUR), visit("Practitioner/dr", T0 - 4 * DAY, T0 - 3 * DAY)];
    log.access(T0 + 1000, "dr", &dr(), "p-vip", &[], Some("VIP"), &elsewhere);
    assert_eq!(log.rules(), ["snooping-sensitive"]);
}

#[test]
fn a_first_look_long_after_the_last_visit() {
    let mut log = Log::new(now_config());
    let old = [visit("Organization/clinic", T0 - 800 * DAY, T0 - 799 * DAY)];
    let recent = [visit("Organization/clinic", T0 - 20 * DAY, T0 - 19 * DAY)];
    log.access(T0, "dr", &dr(), "p-recent", &[], None, &recent);
    assert!(log.alerts.is_empty());
    log.access(T0, "dr", &dr(), "p-old", &[], None, &old);
    assert_eq!(log.rules(), ["snooping-after-care"]);
    assert!(log.alerts[0].explanation.contains("more than 365 days"), "{:?}", log.alerts[0]);
    // Not a first look the next day.
    log.access(T0 + DAY, "dr", &dr(), "p-old", &[], None, &old);
    assert_eq!(log.alerts.len(), 1);
}

#[test]
fn many_unexplained_patients_measured_against_the_persons_usual() {
    let mut log = Log::new(now_config());
    // Two weeks of a registrar's work: 8 unexplained look-ups a day. Then 12: within their usual.
    let clerk = Who { refs: vec!["Practitioner/c".into()], unit: "Organization/desk" };
    for day in 0..14 {
        for k in 0..8 {
            log.access(T0 + day * DAY + k * 60_000, "clerk", &clerk, &format!("q{day}-{k}"), &[], None, &[]);
        }
    }
    for k in 0..12 {
        log.access(T0 + 14 * DAY + k * 60_000, "clerk", &clerk, &format!("r{k}"), &[], None, &[]);
    }
    assert!(log.alerts.is_empty(), "{:?}", log.rules());
    // A doctor whose accesses are all explained opens ten unexplained records in a day.
    let seen = [visit("Organization/ward", T0 - HOUR, T0 + 30 * DAY)];
    for day in 0..14 {
        log.access(T0 + day * DAY, "dr", &dr(), "p-ward", &[], None, &seen);
    }
    for k in 0..10 {
        log.access(T0 + 14 * DAY + HOUR + k * 60_000, "dr", &dr(), &format!("s{k}"), &[], None, &[]);
    }
    assert_eq!(log.rules(), ["snooping-volume"]);
    let a = &log.alerts[0];
    assert_eq!((a.evidence.len(), a.subject.as_str()), (10, "account:dr"));
}

#[test]
fn off_hours_for_a_day_unit_once_its_hours_are_known() {
    let mut log = Log::new(now_config());
    let seen = [visit("Organization/ward", T0 - 30 * DAY, T0 + 60 * DAY)];
    let day_start = T0 - T0.rem_euclid(DAY) + DAY; // midnight after T0
    // Three weeks of day shifts (08-16), explained.
    for day in 0..21 {
        for k in 0..40 {
            log.access(day_start + day * DAY + 8 * HOUR + k * 12 * 60_000, "dr", &dr(), "p-ward", &[], None, &seen);
        }
    }
    assert!(log.alerts.is_empty());
    // 03:00, unexplained: flagged. 03:00, explained: silent.
    log.access(day_start + 21 * DAY + 3 * HOUR, "dr", &dr(), "p-ward", &[], None, &seen);
    assert!(log.alerts.is_empty());
    log.access(day_start + 21 * DAY + 3 * HOUR, "dr", &dr(), "p-night", &[], None, &[]);
    assert_eq!(log.rules(), ["snooping-off-hours"]);
    // Unexplained in the day: nothing.
    log.access(day_start + 22 * DAY + 10 * HOUR, "dr", &dr(), "p-day", &[], None, &[]);
    assert_eq!(log.alerts.len(), 1);
}

#[test]
fn break_glass_widening_and_exports_counted_per_person() {
    let mut log = Log::new(now_config());
    for i in 0..2 {
        log.entry(T0 + i * 5 * DAY, "break-glass", "success", "nurse", Some(&format!("p{i}")), "granted");
    }
    assert!(log.alerts.is_empty(), "twice in a month is an emergency now and then");
    log.entry(T0 + 12 * DAY, "break-glass", "success", "nurse", Some("p3"), "granted");
    assert_eq!(log.rules(), ["break-glass-frequent"]);
    log.entry(T0, "fact-change", "denied", "dr", Some("p1"), "forbid fact-self-widening; care-team widens [Practitioner/dr] narrows []");
    log.entry(T0, "fact-change", "success", "dr", Some("p1"), "permit; care-team widens [] narrows [Practitioner/x]");
    assert_eq!(log.rules(), ["break-glass-frequent", "access-widening"]);
    for i in 0..99 {
        log.entry(T0 + i, "export", "success", "svc", Some(&format!("p{i}")), "permit; 3 resource(s) exported (asked for at x)");
    }
    assert_eq!(log.alerts.len(), 2, "99 patients is under the threshold");
    log.entry(T0 + 100, "export", "success", "svc", Some("p100"), "permit; 3 resource(s) exported (asked for at x)");
    assert_eq!(log.rules().last(), Some(&"large-export"));
    assert!(log.alerts.last().is_some_and(|a| a.explanation.contains("100 patients") && a.explanation.contains("300 resources")));
}

#[test]
fn snooping_can_be_turned_off() {
    let mut log = Log::new(Config { snooping: false, ..now_config() });
    log.access(T0, "dr", &dr(), "p-sister", &["address"], None, &[]);
    log.entry(T0, "fact-change", "denied", "dr", Some("p1"), "forbid fact-self-widening");
    assert!(log.alerts.is_empty());
}

mod restore {
    use super::*;
    use proptest::prelude::*;

    /// Runs `steps` (agent, patient, minutes since the last) through a detector, saving and
    /// restoring it before step `cut`; the alerts raised.
    fn run(steps: &[(usize, usize, i64)], cut: Option<usize>) -> Vec<Alert> {
        let config = Config { explain_delay_minutes: 30, volume_min_patients: 3, ..Config::default() };
        let mut d = Detector::new(config.clone());
        let (mut t, mut out) = (T0, Vec::new());
        let unit = [visit("Organization/ward", T0, T0 + 5 * DAY)];
        for (i, (agent, patient, gap)) in steps.iter().enumerate() {
            if Some(i) == cut {
                d = Detector::restore(config.clone(), &d.state()).expect("restores");
            }
            t += gap * 60_000;
            let e = Entry {
                index: i as u64,
                time: t,
                interaction: "read".into(),
                outcome: "success".into(),
                status: 200,
                agent_id: format!("u{agent}"),
                roles: vec!["nurse".into()],
                source_address: String::new(),
                patient: Some(format!("p{patient}")),
                resource_type: None,
                resource_id: None,
                reason: String::new(),
            };
            out.extend(d.observe(&e));
            for due in d.due(t) {
                let p: usize = due.patient[1..].parse().unwrap_or(0);
                let shares: &[&str] = if p == 0 { &["address"] } else { &[] };
                let episodes: &[Episode] = if p % 3 == 2 { &unit } else { &[] };
                let who = dr();
                let facts = AccessFacts { person: &who.refs, unit: who.unit, shares, sensitive: (p == 1).then_some("VIP"), episodes };
                out.extend(d.judge(&due, &facts));
            }
        }
        out
    }

    proptest! {
        #[test]
        fn a_restored_detector_judges_accesses_as_the_uninterrupted_one(steps in proptest::collection::vec((0usize..3, 0usize..12, 0i64..400), 1..150), cut in 0usize..150) {
            prop_assert_eq!(run(&steps, Some(cut)), run(&steps, None));
        }
    }
}
