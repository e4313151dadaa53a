//! Detection over the audit stream. The server shows every durable audit entry, in leaf-index
//! order, to a [`Detector`]; its rules keep bounded sliding windows per account and address and
//! raise [`Alert`]s that name ids and addresses, never patient content, with the entry indices
//! that are the evidence. Pure: no I/O, and the only clocks are the entries' own times and the
//! time the caller passes to [`Detector::due`], so a detector restored from its
//! [`Detector::state`] and shown the same entries (and facts) raises the same alerts (the server
//! relies on this to resume after a restart without skipping or repeating).
//!
//! The intrusion rules (docs/DETECTION.md):
//! - `password-guessing-account`: wrong passwords for one account,
//! - `password-guessing-address`: failed sign-ins of any kind from one address,
//! - `credential-stuffing`: failed sign-ins from one address against many accounts,
//! - `mfa-failures`: wrong second factors for one account (its password was right),
//! - `new-address`: a sign-in to an account from an address it has not signed in from before,
//! - `revoked-credential`: a revoked API key or a session ended by an administrator presented,
//!   or expired credentials presented again and again from one address,
//! - `unauthenticated-flood` / `distributed-flood`: requests refused before anyone was
//!   identified, from one address or from all together.
//!
//! And the snooping rules ([`snoop`]): accesses by people allowed to make them that the record
//! does not explain, flagged by what makes them suspect.

pub mod rules;
pub mod simulate;
pub mod deadline;
pub mod snoop;
mod window;

pub use rules::Config;
pub use snoop::record::{Episode, EPISODE_TYPES};
pub use snoop::AccessFacts;
use serde::{Deserialize, Serialize};

/// What the rules read of an audit entry (its canonical JSON has more).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Entry {
    /// The entry's leaf index in the audit log.
    #[serde(skip)]
    pub index: u64,
    pub time: i64,
    pub interaction: String,
    pub outcome: String,
    #[serde(default)]
    pub status: u16,
    #[serde(default)]
    pub agent_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub source_address: String,
    #[serde(default)]
    pub patient: Option<String>,
    #[serde(default)]
    pub resource_type: Option<String>,
    #[serde(default)]
    pub resource_id: Option<String>,
    #[serde(default)]
    pub reason: String,
}

impl Entry {
    /// Reads an entry from its canonical JSON.
    pub fn parse(index: u64, json: &[u8]) -> Result<Entry, String> {
        let mut e: Entry = serde_json::from_slice(json).map_err(|e| format!("audit entry {index}: {e}"))?;
        e.index = index;
        Ok(e)
    }

    /// How many attempts the entry stands for: a compacted entry (`… (xN from this address, …;
    /// compacted)`) stands for the N attempts after the first of its window (which has an entry
    /// of its own).
    pub fn weight(&self) -> u64 {
        let Some(rest) = self.reason.strip_suffix("; compacted)") else { return 1 };
        rest.rsplit_once(" (x").and_then(|(_, tail)| tail.split_once(' ')).and_then(|(n, _)| n.parse::<u64>().ok()).map_or(1, |n| n.max(1))
    }

    /// The reason without a compaction note.
    pub fn base_reason(&self) -> &str {
        match self.reason.strip_suffix("; compacted)") {
            Some(rest) => rest.rsplit_once(" (x").map_or(self.reason.as_str(), |(r, _)| r),
            None => &self.reason,
        }
    }

    fn denied(&self) -> bool {
        self.outcome == "denied"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// One alert: which rule, about whom (`account:<user id>`, `address:<ip>`, `all`), when (the
/// time of the entry that raised it), in words, and the evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    /// `<leaf index of the entry that raised it>-<rule>`: the same alert raised again (after a
    /// restart) has the same id.
    pub id: String,
    pub rule: String,
    pub severity: Severity,
    pub subject: String,
    pub time: i64,
    pub explanation: String,
    /// Leaf indices of the audit entries behind the alert, oldest first (the most recent 64).
    pub evidence: Vec<u64>,
}

/// The rules with their state; see the crate's documentation.
#[derive(Debug, Clone)]
pub struct Detector {
    config: Config,
    state: rules::State,
}

impl Detector {
    pub fn new(config: Config) -> Detector {
        Detector { config, state: rules::State::default() }
    }

    /// A new detector that starts reading at leaf index `next`.
    pub fn starting_at(config: Config, next: u64) -> Detector {
        let mut d = Detector::new(config);
        d.state.next = next;
        d
    }

    /// A detector that continues from a saved [`Detector::state`].
    pub fn restore(config: Config, state: &[u8]) -> Result<Detector, String> {
        let state = serde_json::from_slice(state).map_err(|e| format!("the detector's saved state does not read: {e}"))?;
        Ok(Detector { config, state })
    }

    /// The state to save: windows, addresses seen, the next index expected.
    pub fn state(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).unwrap_or_default()
    }

    /// The leaf index the detector expects next.
    pub fn next_index(&self) -> u64 {
        self.state.next
    }

    /// Shows one entry to every rule; the alerts it raises. A patient access
    /// ([`Entry::is_patient_access`]) waits for the snooping rules: see [`Detector::due`].
    pub fn observe(&mut self, entry: &Entry) -> Vec<Alert> {
        rules::observe(&self.config, &mut self.state, entry)
    }

    /// The patient accesses due for judgment at `now` (`explain_delay_minutes` after they were
    /// made, or early when too many wait), oldest first: the caller works out each one's
    /// [`AccessFacts`] from the record as it is now and passes it to [`Detector::judge`].
    pub fn due(&mut self, now: i64) -> Vec<snoop::Access> {
        snoop::due(&mut self.state.snoop, now, self.config.explain_delay_minutes.saturating_mul(60_000))
    }

    /// Incidents whose GDPR notification clock is running out or has run out at `now`
    /// ([`deadline`]).
    pub fn deadlines(&mut self, now: i64) -> Vec<Alert> {
        let mut out = Vec::new();
        deadline::due(&mut self.state.deadline, self.config.incident_warn_hours.saturating_mul(3_600_000), now, &mut out);
        out
    }

    /// Judges one access that was due; the alerts it raises.
    pub fn judge(&mut self, access: &snoop::Access, facts: &AccessFacts<'_>) -> Vec<Alert> {
        let mut out = Vec::new();
        if self.config.snooping {
            snoop::judge(&self.config.snoop(), &mut self.state.snoop, access, facts, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests;
