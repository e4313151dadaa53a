//! The snooping rules: accesses to patient data by people who were allowed to make them, judged
//! against the record's own reasons for them. An access the record explains (an encounter,
//! appointment, order, note, procedure or care-team membership involving the person or their
//! unit near that time, [`record::explain`]) raises nothing; an unexplained one is flagged when
//! the patient shares the person's family name or address, is staff or marked sensitive, was
//! last seen long ago, when it falls in the unit's off-hours, or when the person's unexplained
//! patients of the day rise far above their own and their unit's usual. Break-glass use, changes
//! to access facts and exports are counted per person as well.
//!
//! What the rules need beyond the entry comes in [`AccessFacts`], which the server works out from
//! the store (and the evaluation harness from its simulation).

pub mod record;

use crate::window::{Event, Window};
use crate::{Alert, Entry, Severity};
use record::{Episode, Margins};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

/// What the server knows about one access beyond its audit entry.
#[derive(Debug, Clone, Copy)]
pub struct AccessFacts<'a> {
    /// The person as the record names them: `Practitioner/x` and their units `Organization/u`.
    pub person: &'a [String],
    /// The unit whose hours and baseline the person is judged by (`Organization/u`; empty: none).
    pub unit: &'a str,
    /// What the patient shares with the person, found by comparing blind-index tokens
    /// (`family name`, `address`).
    pub shares: &'a [&'a str],
    /// Why the patient is sensitive (`staff member`, `VIP`, `restricted`), if they are.
    pub sensitive: Option<&'a str>,
    /// The patient's episodes (see [`record`]).
    pub episodes: &'a [Episode],
}

/// The settings of the snooping rules (part of [`crate::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub margins: Margins,
    pub after_care_ms: i64,
    pub volume_min: usize,
    pub volume_factor: u64,
    pub baseline_days: usize,
    pub off_hours_per_mille: u64,
    pub off_hours_learn: u64,
    pub utc_offset_ms: i64,
    pub break_glass_count: u64,
    pub break_glass_ms: i64,
    pub widening_patients: usize,
    pub export_patients: usize,
}

const DAY: i64 = 86_400_000;
/// People followed at most (a hospital's staff is far fewer; beyond, new people are not judged).
const MAX_PEOPLE: usize = 100_000;
/// Distinct unexplained patients counted per person and day (the threshold is far below).
const MAX_TODAY: usize = 1024;
/// Patients a person opened recently, for "first access".
const RECENT: usize = 256;
/// Days of history before a person's work counts as routinely unexplained.
const ROUTINE_DAYS: usize = 3;
/// (rule, patient) pairs already alerted per person and day.
const MAX_ALERTED: usize = 256;

/// The interactions that disclose a patient's data to the caller.
const ACCESS_INTERACTIONS: &[&str] = &["read", "vread", "search-type", "history", "ticket", "export-record"];
/// The roles whose accesses, break-glass use and fact changes are judged: care staff. Patients
/// reading their own record and services are not the snooping rules' subject (services are
/// counted by `large-export` only).
pub const JUDGED_ROLES: &[&str] = &["physician", "nurse", "assistant", "external_specialist", "registrar"];

impl Entry {
    /// An access to a patient's data by care staff, made and answered: the entries the snooping
    /// rules judge.
    pub fn is_patient_access(&self) -> bool {
        self.outcome == "success" && self.patient.is_some() && ACCESS_INTERACTIONS.contains(&self.interaction.as_str()) && self.by_care_staff()
    }

    fn by_care_staff(&self) -> bool {
        !self.agent_id.is_empty() && self.roles.iter().any(|r| JUDGED_ROLES.contains(&r.as_str()))
    }
}

/// An access waiting to be judged: the record is given time to show its reason (the encounter
/// is often registered after the first look at the chart) before the rules ask for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    pub index: u64,
    pub time: i64,
    pub interaction: String,
    pub agent_id: String,
    pub patient: String,
}

/// Accesses waiting at most; beyond, the oldest are judged early.
const MAX_PENDING: usize = 200_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    people: HashMap<String, Person>,
    units: HashMap<String, Unit>,
    pending: VecDeque<Access>,
}

/// The accesses due for judgment at `now` (`delay` ms after they were made), oldest first.
pub fn due(state: &mut State, now: i64, delay: i64) -> Vec<Access> {
    let mut out = Vec::new();
    while state.pending.front().is_some_and(|a| a.time <= now.saturating_sub(delay) || state.pending.len() > MAX_PENDING) {
        out.extend(state.pending.pop_front());
    }
    out
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Person {
    /// Local day number of the counts below (`None`: no access yet), and the time last seen.
    day: Option<i64>,
    last: i64,
    /// Distinct patients accessed unexplained today (hashed), with the entries.
    today: Vec<u64>,
    today_evidence: VecDeque<u64>,
    volume_fired: bool,
    /// (rule, patient hash) alerted today.
    alerted: Vec<(String, u64)>,
    /// The unexplained counts of earlier active days, newest last.
    history: VecDeque<u32>,
    /// Patients accessed lately, most recent last.
    recent: VecDeque<u64>,
    unit: String,
    break_glass: Window,
    widening: Window,
    exports: Window,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct Unit {
    /// Accesses by the unit's people per hour of the week (local time), and their total.
    hours: Vec<u64>,
    total: u64,
    /// When (local time) the unit was first seen at work: its hours are known after a week.
    since: Option<i64>,
    /// Per local day: the sum of people's unexplained counts and how many person-days.
    days: BTreeMap<i64, (u64, u64)>,
}

/// Shows one entry to the snooping rules: a patient access waits for judgment ([`due`],
/// [`judge`]); break-glass, fact changes and exports are counted at once.
pub fn observe(s: &Settings, state: &mut State, e: &Entry, out: &mut Vec<Alert>) {
    if e.agent_id.is_empty() || (!state.people.contains_key(&e.agent_id) && state.people.len() >= MAX_PEOPLE) {
        return;
    }
    if e.is_patient_access() {
        let patient = e.patient.clone().unwrap_or_default();
        state.pending.push_back(Access { index: e.index, time: e.time, interaction: e.interaction.clone(), agent_id: e.agent_id.clone(), patient });
        return;
    }
    match e.interaction.as_str() {
        "break-glass" if e.outcome == "success" && e.by_care_staff() => break_glass(s, state, e, out),
        "fact-change" if e.by_care_staff() => fact_change(s, state, e, out),
        "export" if e.outcome == "success" && e.patient.is_some() => export(s, state, e, out),
        _ => {}
    }
}

/// Forgets people not seen for longer than anything is remembered.
pub fn sweep(s: &Settings, state: &mut State, now: i64) {
    let keep = (s.baseline_days as i64 + 1).saturating_mul(DAY).max(s.break_glass_ms);
    state.people.retain(|_, p| now - p.last < keep);
}

/// Judges one access that was due, with what the record shows now.
pub fn judge(s: &Settings, state: &mut State, e: &Access, f: &AccessFacts<'_>, out: &mut Vec<Alert>) {
    if !state.people.contains_key(&e.agent_id) && state.people.len() >= MAX_PEOPLE {
        return;
    }
    let patient = e.patient.as_str();
    let key = hash(patient);
    let local = e.time.saturating_add(s.utc_offset_ms);
    let day = local.div_euclid(DAY);
    roll_day(s, state, &e.agent_id, f.unit, day, e.time);
    let unit = state.units.entry(f.unit.to_string()).or_default();
    let off_hours = !f.unit.is_empty() && off_hours(s, unit, local);
    note_hour(unit, local);
    let unit_usual = unit_mean(s, unit, day);
    let Some(person) = state.people.get_mut(&e.agent_id) else { return };
    let first = !person.recent.contains(&key);
    person.recent.retain(|k| *k != key);
    person.recent.push_back(key);
    if person.recent.len() > RECENT {
        person.recent.pop_front();
    }
    if record::explain(f.episodes, f.person, e.time, s.margins).is_some() {
        return;
    }
    let who = &e.agent_id;
    let own = mean(person.history.iter().map(|c| *c as u64).sum(), person.history.len() as u64);
    // Someone whose work routinely leaves no trace in the record (quality review, registration)
    // opens old records and works odd hours as a matter of course: for them the weak flags say
    // nothing, and the volume rule against their own usual is the check.
    let routine = person.history.len() >= ROUTINE_DAYS && own.saturating_mul(2) >= s.volume_min as u64;
    let unexplained = format!("user {who} opened Patient/{patient} ({}) with no encounter, appointment, order, note, procedure or care team linking them or their unit to the patient near that time", e.interaction);
    let mut flag = |rule: &str, severity, why: String, p: &mut Person| {
        if p.alerted.iter().any(|(r, k)| r == rule && *k == key) || p.alerted.len() >= MAX_ALERTED {
            return;
        }
        p.alerted.push((rule.to_string(), key));
        out.push(alert(e.index, e.time, &e.agent_id, rule, severity, format!("{unexplained}; {why}"), vec![e.index]));
    };
    if !f.shares.is_empty() {
        flag("snooping-relative", Severity::High, format!("the patient has the same {} as the user", f.shares.join(" and ")), person);
    }
    if let Some(what) = f.sensitive {
        flag("snooping-sensitive", Severity::High, format!("the patient is marked {what}"), person);
    }
    if record::last_visit_end(f.episodes, e.time).is_some_and(|end| !routine && first && e.time.saturating_sub(end) > s.after_care_ms) {
        let days = s.after_care_ms / DAY;
        flag("snooping-after-care", Severity::Medium, format!("the patient's last visit ended more than {days} days before, and the user had not opened the record lately"), person);
    }
    if off_hours && !routine {
        flag("snooping-off-hours", Severity::Low, format!("at an hour when the user's unit ({}) is almost never at work", f.unit), person);
    }
    if !person.today.contains(&key) && person.today.len() < MAX_TODAY {
        person.today.push(key);
    }
    person.today_evidence.push_back(e.index);
    if person.today_evidence.len() > crate::window::MAX_EVIDENCE {
        person.today_evidence.pop_front();
    }
    let usual = own.max(unit_usual);
    let threshold = (usual.saturating_mul(s.volume_factor) as usize).max(s.volume_min);
    if !person.volume_fired && person.today.len() >= threshold {
        person.volume_fired = true;
        let why = format!("user {who} opened {} patients' records today that nothing in the records explains; their usual is {usual} a day (the larger of their own and their unit's average)", person.today.len());
        out.push(alert(e.index, e.time, who, "snooping-volume", Severity::Medium, why, person.today_evidence.iter().copied().collect()));
    }
}

/// The person's counts, moved on to `day` (yesterday's count joins their history and their
/// unit's).
fn roll_day(s: &Settings, state: &mut State, agent: &str, unit: &str, day: i64, now: i64) {
    let person = state.people.entry(agent.to_string()).or_default();
    person.last = now;
    // Only forward: an entry of the day before written after one of today (entries are not
    // strictly in time order) counts into today.
    if person.day.is_none_or(|d| day > d) {
        if let Some(was) = person.day {
            let count = person.today.len() as u64;
            person.history.push_back(count as u32);
            while person.history.len() > s.baseline_days {
                person.history.pop_front();
            }
            let u = state.units.entry(person.unit.clone()).or_default();
            let (sum, n) = u.days.entry(was).or_default();
            *sum += count;
            *n += 1;
            u.days.retain(|d, _| *d >= day - s.baseline_days as i64);
        }
        person.day = Some(day);
        person.today.clear();
        person.today_evidence.clear();
        person.alerted.clear();
        person.volume_fired = false;
    }
    person.unit = unit.to_string();
}

/// The unit's average unexplained patients per person and day over the earlier days
/// remembered (rounded up; 0 while it has none). A person's usual is the larger of theirs and it.
fn unit_mean(s: &Settings, unit: &Unit, day: i64) -> u64 {
    let (sum, n) = unit.days.range(day - s.baseline_days as i64..day).fold((0, 0), |(a, b), (_, (s, n))| (a + s, b + n));
    mean(sum, n)
}

fn mean(sum: u64, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        sum.div_ceil(n)
    }
}

const WEEK_HOURS: usize = 168;

fn hour_of_week(local: i64) -> usize {
    // 1970-01-01 was a Thursday: day 0 is Thursday, so Monday is day 4.
    let weekday = (local.div_euclid(DAY) + 3).rem_euclid(7) as usize;
    weekday * 24 + (local.rem_euclid(DAY) / 3_600_000) as usize
}

/// Whether the unit, seen at work for a week and often enough to know its hours, almost never
/// works at this hour of the week.
fn off_hours(s: &Settings, unit: &Unit, local: i64) -> bool {
    let a_week = unit.since.is_some_and(|since| local - since >= 7 * DAY);
    a_week && unit.total >= s.off_hours_learn && unit.hours.get(hour_of_week(local)).is_some_and(|n| n.saturating_mul(1000) < unit.total.saturating_mul(s.off_hours_per_mille))
}

fn note_hour(unit: &mut Unit, local: i64) {
    if unit.hours.len() != WEEK_HOURS {
        unit.hours = vec![0; WEEK_HOURS];
    }
    unit.since.get_or_insert(local);
    unit.hours[hour_of_week(local)] += 1;
    unit.total += 1;
    // Halve now and then, so the hours follow a unit whose shifts change.
    if unit.total >= 1 << 20 {
        unit.hours.iter_mut().for_each(|n| *n /= 2);
        unit.total = unit.hours.iter().sum();
    }
}

fn event(e: &Entry, key: Option<String>, weight: u64) -> Event {
    Event { time: e.time, index: e.index, weight, key }
}

/// `break-glass-frequent`: one person using emergency access again and again.
fn break_glass(s: &Settings, state: &mut State, e: &Entry, out: &mut Vec<Alert>) {
    let p = state.people.entry(e.agent_id.clone()).or_default();
    p.last = e.time;
    p.break_glass.push(event(e, e.patient.clone(), 1), s.break_glass_ms);
    let n = p.break_glass.count();
    if p.break_glass.fire(n >= s.break_glass_count, e.time, s.break_glass_ms) {
        let days = s.break_glass_ms / DAY;
        let why = format!("user {} used break-glass {n} times within {days} days ({} patients)", e.agent_id, p.break_glass.distinct());
        out.push(alert(e.index, e.time, &e.agent_id, "break-glass-frequent", Severity::Medium, why, p.break_glass.evidence()));
    }
}

/// `access-widening`: an attempt to widen one's own access refused by policy, or changes that
/// widen someone's access to many patients in a day.
fn fact_change(s: &Settings, state: &mut State, e: &Entry, out: &mut Vec<Alert>) {
    let p = state.people.entry(e.agent_id.clone()).or_default();
    p.last = e.time;
    if e.outcome != "success" && e.reason.contains("fact-self-widening") {
        let why = format!("user {} tried to change the facts access rests on so as to widen their own access (refused by policy)", e.agent_id);
        out.push(alert(e.index, e.time, &e.agent_id, "access-widening", Severity::High, why, vec![e.index]));
        return;
    }
    if e.outcome != "success" || e.reason.contains("widens []") {
        return;
    }
    p.widening.push(event(e, e.patient.clone(), 1), DAY);
    let n = p.widening.distinct();
    if p.widening.fire(n >= s.widening_patients, e.time, DAY) {
        let why = format!("user {} widened access to {n} patients' records within a day", e.agent_id);
        out.push(alert(e.index, e.time, &e.agent_id, "access-widening", Severity::Medium, why, p.widening.evidence()));
    }
}

/// `large-export`: one caller exporting many patients' records within a day.
fn export(s: &Settings, state: &mut State, e: &Entry, out: &mut Vec<Alert>) {
    let p = state.people.entry(e.agent_id.clone()).or_default();
    p.last = e.time;
    let resources = e.reason.rsplit_once(" resource(s) exported").and_then(|(head, _)| head.rsplit(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(1);
    p.exports.push(event(e, e.patient.clone(), resources), DAY);
    let n = p.exports.distinct();
    if p.exports.fire(n >= s.export_patients, e.time, DAY) {
        let why = format!("{} exported {n} patients' records ({} resources) within a day", e.agent_id, p.exports.count());
        out.push(alert(e.index, e.time, &e.agent_id, "large-export", Severity::Medium, why, p.exports.evidence()));
    }
}

fn alert(index: u64, time: i64, agent: &str, rule: &str, severity: Severity, explanation: String, evidence: Vec<u64>) -> Alert {
    Alert { id: format!("{index}-{rule}"), rule: rule.to_string(), severity, subject: format!("account:{agent}"), time, explanation, evidence }
}

/// FNV-1a: patients are remembered by a 64-bit hash of their id (a collision merges two
/// patients' counts, no more).
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests;
