//! The GDPR Art. 33 notification clock as a rule: an incident opened (audit interaction
//! `incident-open`) must reach its notify stage (`incident-notify`, or `incident-close`)
//! within 72 hours. `incident-notification-due` (high) is raised `incident_warn_hours` after
//! the opening, `incident-notification-overdue` (high) at 72 hours; each once per incident.
//! Checked against the caller's clock ([`crate::Detector::deadlines`]), so it fires while the
//! log is quiet too.

use crate::{Alert, Entry, Severity};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// GDPR Art. 33(1): notify the supervisory authority within 72 hours of becoming aware.
pub const NOTIFY_WITHIN_MS: i64 = 72 * 3_600_000;
/// Open incidents followed at most (more are a deployment problem, not an attack to absorb).
const MAX_OPEN: usize = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Incident id → its opening entry and whether the warning was raised.
    open: BTreeMap<String, Open>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Open {
    index: u64,
    opened: i64,
    warned: bool,
}

pub fn observe(state: &mut State, e: &Entry) {
    let Some(id) = e.resource_id.as_deref().filter(|_| e.outcome == "success") else { return };
    match e.interaction.as_str() {
        "incident-open" if state.open.len() < MAX_OPEN => {
            state.open.entry(id.to_string()).or_insert(Open { index: e.index, opened: e.time, warned: false });
        }
        "incident-notify" | "incident-close" => {
            state.open.remove(id);
        }
        _ => {}
    }
}

pub fn due(state: &mut State, warn_ms: i64, now: i64, out: &mut Vec<Alert>) {
    let mut overdue = Vec::new();
    for (id, o) in state.open.iter_mut() {
        let alert = |rule: &str, words: String| Alert { id: format!("{}-{rule}", o.index), rule: rule.into(), severity: Severity::High, subject: format!("incident:{id}"), time: now, explanation: words, evidence: vec![o.index] };
        if now >= o.opened + NOTIFY_WITHIN_MS {
            out.push(alert("incident-notification-overdue", format!("incident {id} was opened over 72 hours ago and has not reached its notify stage (GDPR Art. 33)")));
            overdue.push(id.clone());
        } else if !o.warned && now >= o.opened + warn_ms {
            let left = (o.opened + NOTIFY_WITHIN_MS - now) / 3_600_000;
            out.push(alert("incident-notification-due", format!("incident {id} must reach its notify stage within {left} hours (GDPR Art. 33: 72 hours from the opening)")));
            o.warned = true;
        }
    }
    for id in overdue {
        state.open.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn entry(index: u64, time: i64, interaction: &str, id: &str) -> Entry {
        Entry { index, time, interaction: interaction.into(), outcome: "success".into(), resource_id: Some(id.into()), ..Entry::default() }
    }

    #[test]
    fn warns_then_flags_an_incident_not_notified_and_stays_silent_once_notified() {
        let mut s = State::default();
        observe(&mut s, &entry(5, 0, "incident-open", "late"));
        observe(&mut s, &entry(6, 0, "incident-open", "prompt"));
        let mut out = Vec::new();
        due(&mut s, 48 * H, 47 * H, &mut out);
        assert!(out.is_empty());
        observe(&mut s, &entry(7, 47 * H, "incident-notify", "prompt"));
        due(&mut s, 48 * H, 48 * H, &mut out);
        due(&mut s, 48 * H, 49 * H, &mut out);
        assert_eq!(out.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["5-incident-notification-due"], "once, and not for the notified one");
        due(&mut s, 48 * H, 72 * H, &mut out);
        due(&mut s, 48 * H, 80 * H, &mut out);
        assert_eq!(out.last().map(|a| (a.id.as_str(), a.evidence.clone())), Some(("5-incident-notification-overdue", vec![5])));
        assert_eq!(out.len(), 2);
    }
}
