//! An incident record: detect → contain → recover → notify → closed.
//!
//! Each stage is entered in that order with who, when and a note; none can be skipped, so
//! the record shows that each was considered (a stage with nothing to do says so in its
//! note). The GDPR Art. 33 clock runs from the opening (when the organisation became aware)
//! for 72 hours and stops when the notify stage is entered; that stage's note says who was
//! told (the supervisory authority, the patients under Art. 34) or why no notification was
//! required. Closing needs the lessons learned. Containment actions are planned and recorded
//! here and executed by the server.

use crate::{note, Error};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use valv_detect::Entry;

pub use valv_detect::deadline::NOTIFY_WITHIN_MS;
/// The affected period starts at most this long before the opening (bounds the log read).
pub const MAX_WINDOW_MS: i64 = 400 * 86_400_000;
/// Most subjects (accounts, keys, addresses) one incident names.
pub const MAX_SUBJECTS: usize = 100;
pub const SEVERITIES: &[&str] = &["low", "medium", "high"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Detect,
    Contain,
    Recover,
    Notify,
    Closed,
}

impl Stage {
    pub const ALL: [Stage; 5] = [Stage::Detect, Stage::Contain, Stage::Recover, Stage::Notify, Stage::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Detect => "detect",
            Stage::Contain => "contain",
            Stage::Recover => "recover",
            Stage::Notify => "notify",
            Stage::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Result<Stage, Error> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| Error::Invalid(format!("'{s}' is not a stage (detect, contain, recover, notify, closed)")))
    }

    fn next(self) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| *s > self)
    }
}

/// Who or what the incident is about: `account:<user id>`, `key:<API key id>` or
/// `address:<IP address>` (an alert's subject names the same way).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Account(String),
    Key(String),
    Address(IpAddr),
}

impl Subject {
    pub fn parse(s: &str) -> Result<Subject, Error> {
        let bad = || Error::Invalid(format!("'{s}' is not a subject (account:<user id>, key:<API key id>, address:<IP address>)"));
        let (kind, value) = s.split_once(':').ok_or_else(bad)?;
        let id_ok = !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        match kind {
            "account" if id_ok => Ok(Subject::Account(value.to_string())),
            "key" if id_ok => Ok(Subject::Key(value.to_string())),
            "address" => value.parse().map(Subject::Address).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Account(id) => write!(f, "account:{id}"),
            Subject::Key(id) => write!(f, "key:{id}"),
            Subject::Address(ip) => write!(f, "address:{ip}"),
        }
    }
}

/// The containment actions the server can execute from an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// Disable the account: it cannot sign in, and its sessions end.
    LockAccount,
    /// End every session of the account (it may sign in again).
    EndSessions,
    /// Revoke an API key.
    RevokeKey,
    /// Refuse every request from an address.
    BlockAddress,
}

impl ActionKind {
    pub const ALL: [ActionKind; 4] = [ActionKind::LockAccount, ActionKind::EndSessions, ActionKind::RevokeKey, ActionKind::BlockAddress];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::LockAccount => "lock-account",
            ActionKind::EndSessions => "end-sessions",
            ActionKind::RevokeKey => "revoke-key",
            ActionKind::BlockAddress => "block-address",
        }
    }

    pub fn parse(s: &str) -> Result<ActionKind, Error> {
        ActionKind::ALL.into_iter().find(|a| a.as_str() == s).ok_or_else(|| Error::Invalid(format!("'{s}' is not a containment action (lock-account, end-sessions, revoke-key, block-address)")))
    }

    /// The subject kind the action takes.
    fn fits(self, target: &Subject) -> bool {
        matches!((self, target), (ActionKind::LockAccount | ActionKind::EndSessions, Subject::Account(_)) | (ActionKind::RevokeKey, Subject::Key(_)) | (ActionKind::BlockAddress, Subject::Address(_)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    pub stage: Stage,
    pub by: String,
    pub at: i64,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Action {
    pub action: ActionKind,
    pub target: String,
    pub by: String,
    pub at: i64,
    /// What the server did, in words.
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Incident {
    pub id: String,
    pub title: String,
    pub severity: String,
    /// The alerts it was opened from (none when opened by hand).
    #[serde(default)]
    pub alerts: Vec<String>,
    /// Accounts, keys and addresses it is about (strings as [`Subject`] writes them).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// The period whose accesses by the subjects count as affected: from, and to (open while
    /// the incident is not contained: `None`).
    pub window_from: i64,
    #[serde(default)]
    pub window_to: Option<i64>,
    pub stage: Stage,
    /// Every stage entered, the first being detect (the opening).
    pub steps: Vec<Step>,
    #[serde(default)]
    pub actions: Vec<Action>,
    /// The affected patients as counted when the notify stage was entered.
    #[serde(default)]
    pub notified_patients: Option<u64>,
    #[serde(default)]
    pub lessons: Option<String>,
}

/// What opening an incident needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opening {
    pub title: String,
    pub severity: String,
    pub alerts: Vec<String>,
    pub subjects: Vec<String>,
    pub window_from: i64,
    pub note: String,
}

/// The notification clock at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub notify_by: i64,
    /// When the notify stage was entered (the clock stopped).
    pub stopped_at: Option<i64>,
    /// Milliseconds left at `now` (or at the stop); negative when late.
    pub remaining_ms: i64,
}

impl Clock {
    pub fn overdue(&self) -> bool {
        self.remaining_ms < 0
    }
}

impl Incident {
    pub fn open(id: String, o: Opening, by: &str, at: i64) -> Result<Incident, Error> {
        let title = o.title.trim();
        if title.is_empty() || title.len() > 200 {
            return Err(Error::Invalid("an incident needs a title of 1 to 200 bytes".into()));
        }
        if !SEVERITIES.contains(&o.severity.as_str()) {
            return Err(Error::Invalid(format!("'{}' is not a severity (low, medium, high)", o.severity)));
        }
        if o.subjects.len() > MAX_SUBJECTS || o.alerts.len() > MAX_SUBJECTS {
            return Err(Error::Invalid(format!("an incident names at most {MAX_SUBJECTS} subjects and alerts")));
        }
        let mut subjects: Vec<String> = Vec::new();
        for s in &o.subjects {
            let s = Subject::parse(s)?.to_string();
            if !subjects.contains(&s) {
                subjects.push(s);
            }
        }
        if o.window_from > at {
            return Err(Error::Invalid("the affected period cannot start after the opening".into()));
        }
        if at - o.window_from > MAX_WINDOW_MS {
            return Err(Error::Invalid("the affected period starts at most 400 days before the opening".into()));
        }
        let step = Step { stage: Stage::Detect, by: by.to_string(), at, note: note(&o.note, "opening an incident")? };
        Ok(Incident {
            id,
            title: title.to_string(),
            severity: o.severity,
            alerts: o.alerts,
            subjects,
            window_from: o.window_from,
            window_to: None,
            stage: Stage::Detect,
            steps: vec![step],
            actions: Vec::new(),
            notified_patients: None,
            lessons: None,
        })
    }

    pub fn opened_at(&self) -> i64 {
        self.steps.first().map_or(0, |s| s.at)
    }

    /// Enters the next stage. Entering contain ends the affected period (nothing the subjects
    /// do afterwards is this incident's); notify stops the clock and records how many patients
    /// were counted affected (`affected`); closing needs `lessons`.
    pub fn advance(&mut self, to: Stage, text: &str, lessons: Option<&str>, affected: Option<u64>, by: &str, at: i64) -> Result<(), Error> {
        let expected = self.stage.next().ok_or_else(|| Error::State(format!("incident {} is closed", self.id)))?;
        if to != expected {
            return Err(Error::State(format!("incident {} is at stage {}; the next stage is {}, not {}", self.id, self.stage.as_str(), expected.as_str(), to.as_str())));
        }
        let note = note(text, &format!("entering stage {}", to.as_str()))?;
        let lessons = match (to, lessons) {
            (Stage::Closed, Some(l)) => Some(crate::note(l, "closing an incident (lessons learned)")?),
            (Stage::Closed, None) => return Err(Error::Invalid("closing an incident needs the lessons learned".into())),
            _ => None,
        };
        match to {
            Stage::Contain => self.window_to = Some(at),
            Stage::Notify => self.notified_patients = Some(affected.ok_or_else(|| Error::Invalid("the notify stage records the affected patients' count".into()))?),
            _ => {}
        }
        if lessons.is_some() {
            self.lessons = lessons;
        }
        self.stage = to;
        self.steps.push(Step { stage: to, by: by.to_string(), at, note });
        Ok(())
    }

    /// Checks that `action` on `target` may be taken now (before the server executes it).
    pub fn check_action(&self, action: ActionKind, target: &str) -> Result<Subject, Error> {
        if self.stage == Stage::Closed {
            return Err(Error::State(format!("incident {} is closed", self.id)));
        }
        let subject = Subject::parse(target)?;
        if !action.fits(&subject) {
            return Err(Error::Invalid(format!("{} does not apply to {target}", action.as_str())));
        }
        Ok(subject)
    }

    /// Records an action the server executed; its target becomes a subject of the incident.
    pub fn record_action(&mut self, action: ActionKind, target: &Subject, result: String, by: &str, at: i64) {
        let t = target.to_string();
        if !self.subjects.contains(&t) && self.subjects.len() < MAX_SUBJECTS {
            self.subjects.push(t.clone());
        }
        self.actions.push(Action { action, target: t, by: by.to_string(), at, result });
    }

    /// The GDPR clock at `now`.
    pub fn clock(&self, now: i64) -> Clock {
        let notify_by = self.opened_at() + NOTIFY_WITHIN_MS;
        let stopped_at = self.steps.iter().find(|s| s.stage == Stage::Notify).map(|s| s.at);
        Clock { notify_by, stopped_at, remaining_ms: notify_by - stopped_at.unwrap_or(now) }
    }

    pub fn subjects(&self) -> Vec<Subject> {
        self.subjects.iter().filter_map(|s| Subject::parse(s).ok()).collect()
    }
}

/// Who the audit entries show an incident's subjects reaching: collects the patients of
/// successful entries in `[from, to)` made by one of the accounts or keys, or from one of the
/// addresses. Feed it the log's entries in any order.
#[derive(Debug, Default)]
pub struct Affected {
    agents: HashSet<String>,
    addresses: HashSet<IpAddr>,
    from: i64,
    to: i64,
    pub patients: BTreeSet<String>,
}

impl Affected {
    pub fn new(subjects: &[Subject], from: i64, to: Option<i64>) -> Affected {
        let mut a = Affected { from, to: to.unwrap_or(i64::MAX), ..Affected::default() };
        for s in subjects {
            match s {
                Subject::Account(id) | Subject::Key(id) => {
                    a.agents.insert(id.clone());
                }
                Subject::Address(ip) => {
                    a.addresses.insert(ip.to_canonical());
                }
            }
        }
        a
    }

    pub fn observe(&mut self, e: &Entry) {
        let Some(patient) = &e.patient else { return };
        if e.outcome != "success" || e.time < self.from || e.time >= self.to {
            return;
        }
        let by_subject = self.agents.contains(&e.agent_id) || e.source_address.parse::<IpAddr>().is_ok_and(|ip| self.addresses.contains(&ip.to_canonical()));
        if by_subject && !patient.is_empty() {
            self.patients.insert(patient.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn opened() -> Incident {
        let o = Opening { title: "snooping on ward 4".into(), severity: "high".into(), alerts: vec!["12-snooping-relative".into()], subjects: vec!["account:u1".into(), "account:u1".into()], window_from: 0, note: "from alert".into() };
        Incident::open("i1".into(), o, "auditor", 10 * H).expect("open")
    }

    #[test]
    fn stages_go_in_order_each_with_a_note_and_closing_needs_lessons() {
        let mut i = opened();
        assert_eq!(i.subjects, ["account:u1"], "named once");
        assert!(matches!(i.advance(Stage::Recover, "skip", None, None, "a", 11 * H), Err(Error::State(_))));
        assert!(matches!(i.advance(Stage::Contain, " ", None, None, "a", 11 * H), Err(Error::Invalid(_))));
        i.advance(Stage::Contain, "account locked", None, None, "a", 11 * H).expect("contain");
        assert_eq!(i.window_to, Some(11 * H));
        i.advance(Stage::Recover, "nothing altered", None, None, "a", 12 * H).expect("recover");
        assert!(matches!(i.advance(Stage::Notify, "told IMY", None, None, "a", 13 * H), Err(Error::Invalid(_))), "the count is recorded");
        i.advance(Stage::Notify, "told IMY; letters to 3 patients", None, Some(3), "a", 13 * H).expect("notify");
        assert!(matches!(i.advance(Stage::Closed, "done", None, None, "a", 14 * H), Err(Error::Invalid(_))));
        i.advance(Stage::Closed, "done", Some("review access weekly"), None, "a", 14 * H).expect("close");
        assert!(matches!(i.advance(Stage::Closed, "again", Some("x"), None, "a", 15 * H), Err(Error::State(_))));
        assert_eq!(i.steps.iter().map(|s| s.stage).collect::<Vec<_>>(), Stage::ALL);
        assert!(matches!(i.check_action(ActionKind::LockAccount, "account:u1"), Err(Error::State(_))), "nothing is done from a closed incident");
    }

    #[test]
    fn the_clock_runs_72_hours_from_the_opening_and_stops_at_notify() {
        let mut i = opened();
        assert_eq!(i.clock(10 * H).remaining_ms, 72 * H);
        assert!(i.clock(83 * H).overdue());
        i.advance(Stage::Contain, "c", None, None, "a", 20 * H).expect("contain");
        i.advance(Stage::Recover, "r", None, None, "a", 30 * H).expect("recover");
        i.advance(Stage::Notify, "n", None, Some(0), "a", 40 * H).expect("notify");
        let c = i.clock(500 * H);
        assert_eq!((c.stopped_at, c.remaining_ms, c.overdue()), (Some(40 * H), 42 * H, false));
    }

    #[test]
    fn actions_fit_their_targets() {
        let i = opened();
        assert!(i.check_action(ActionKind::LockAccount, "account:u2").is_ok());
        assert!(i.check_action(ActionKind::BlockAddress, "address:2001:db8::1").is_ok());
        assert!(i.check_action(ActionKind::BlockAddress, "account:u2").is_err());
        assert!(i.check_action(ActionKind::RevokeKey, "key:../../etc").is_err());
        assert!(i.check_action(ActionKind::BlockAddress, "address:300.1.1.1").is_err());
        assert!(ActionKind::parse("delete-everything").is_err());
    }

    #[test]
    fn affected_patients_are_those_the_subjects_reached_in_the_window() {
        let entry = |time: i64, agent: &str, source: &str, patient: Option<&str>, outcome: &str| Entry {
            index: 0,
            time,
            interaction: "read".into(),
            outcome: outcome.into(),
            status: 200,
            agent_id: agent.into(),
            roles: vec![],
            source_address: source.into(),
            patient: patient.map(str::to_string),
            resource_type: Some("Patient".into()),
            resource_id: None,
            reason: String::new(),
        };
        let subjects = [Subject::parse("account:u1").expect("s"), Subject::parse("address:10.0.0.9").expect("s")];
        let mut a = Affected::new(&subjects, 100, Some(200));
        for e in [
            entry(150, "u1", "10.0.0.1", Some("p1"), "success"),
            entry(150, "u2", "10.0.0.9", Some("p2"), "success"),
            entry(150, "u1", "10.0.0.1", Some("p3"), "denied"),
            entry(50, "u1", "10.0.0.1", Some("p4"), "success"),
            entry(200, "u1", "10.0.0.1", Some("p5"), "success"),
            entry(150, "u3", "10.0.0.1", Some("p6"), "success"),
            entry(160, "u1", "10.0.0.1", Some("p1"), "success"),
            entry(160, "u1", "10.0.0.1", None, "success"),
        ] {
            a.observe(&e);
        }
        assert_eq!(a.patients.into_iter().collect::<Vec<_>>(), ["p1", "p2"]);
    }
}
