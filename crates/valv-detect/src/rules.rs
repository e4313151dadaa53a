//! The intrusion rules and their state: which entries each rule counts, per what key, and when
//! it raises an alert.

use crate::window::{Event, Window};
use crate::{Alert, Entry, Severity};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// Thresholds; the defaults are what docs/DETECTION.md explains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The server runs the detection engine (`[detect] enabled`).
    pub enabled: bool,
    /// The span of the sign-in rules, in seconds.
    pub window_seconds: i64,
    /// Wrong passwords for one account within the span.
    pub guesses_per_account: u64,
    /// Failed sign-ins of any kind from one address within the span.
    pub failures_per_address: u64,
    /// Distinct accounts with failed sign-ins from one address within the span.
    pub accounts_per_address: u64,
    /// Wrong second factors for one account within the span.
    pub mfa_failures: u64,
    /// Expired or unknown session tokens presented from one address within the span.
    pub stale_credentials_per_address: u64,
    /// The span of the flood rules, in seconds.
    pub flood_window_seconds: i64,
    /// Requests refused before anyone was identified, from one address within the flood span.
    pub flood_per_address: u64,
    /// The same from all addresses together.
    pub flood_total: u64,
    /// Raise `new-address` for a sign-in from an address the account has not used before.
    pub new_address: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            window_seconds: 600,
            guesses_per_account: 5,
            failures_per_address: 20,
            accounts_per_address: 5,
            mfa_failures: 3,
            stale_credentials_per_address: 20,
            flood_window_seconds: 60,
            flood_per_address: 300,
            flood_total: 3000,
            new_address: true,
        }
    }
}

/// Keys (accounts, addresses) followed per rule at most; beyond, new keys wait until stale ones
/// are forgotten (the `distributed-flood` rule still counts everything).
pub const MAX_KEYS: usize = 20_000;
/// Addresses remembered per account for `new-address` (the most recently used).
const ADDRESSES_PER_ACCOUNT: usize = 16;
/// Accounts remembered for `new-address`.
const MAX_ACCOUNTS: usize = 100_000;
/// Entries between sweeps of stale windows.
const SWEEP_EVERY: u64 = 4096;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The leaf index expected next.
    pub next: u64,
    windows: HashMap<String, HashMap<String, Window>>,
    total_flood: Window,
    /// Per account, the addresses it signed in from, most recent last.
    addresses: HashMap<String, VecDeque<String>>,
}

/// Second-factor failures: the password was right.
const MFA_REASONS: &[&str] = &["wrong-or-reused-totp", "wrong-recovery-code"];
/// Wrong passwords (a locked account's attempts go on counting).
const PASSWORD_REASONS: &[&str] = &["wrong-password", "wrong-credentials", "locked"];
/// Credentials that were revoked: never presented by an honest client after revocation.
const REVOKED_REASONS: &[&str] = &["session-revoked", "revoked-key"];
/// Credentials past their time, or no longer known: a client that missed a timeout presents one
/// once; one that keeps presenting them is replaying old tokens.
const STALE_REASONS: &[&str] = &["session-expired", "idle-timeout", "unknown-session", "jwt-expired"];

pub fn observe(config: &Config, state: &mut State, e: &Entry) -> Vec<Alert> {
    state.next = e.index + 1;
    let mut alerts = Vec::new();
    let span = config.window_seconds.saturating_mul(1000);
    let flood_span = config.flood_window_seconds.saturating_mul(1000);
    if e.index.is_multiple_of(SWEEP_EVERY) {
        sweep(state, e.time, span.max(flood_span));
    }
    let account = (!e.agent_id.is_empty()).then_some(e.agent_id.as_str());
    let reason = e.base_reason();
    let event = |key: Option<&str>| Event { time: e.time, index: e.index, weight: e.weight(), key: key.map(str::to_string) };
    let mut alert = |rule: &str, severity: Severity, subject: String, explanation: String, evidence: Vec<u64>| {
        alerts.push(Alert { id: format!("{}-{rule}", e.index), rule: rule.to_string(), severity, subject, time: e.time, explanation, evidence });
    };

    if e.interaction == "login" && e.denied() {
        let minutes = span / 60_000;
        if let Some(acc) = account.filter(|_| PASSWORD_REASONS.contains(&reason)) {
            if let Some(w) = window(state, "password-guessing-account", acc) {
                w.push(event(None), span);
                if w.fire(w.count() >= config.guesses_per_account, e.time, span) {
                    let text = format!("{} failed sign-ins with a wrong password for account {acc} within {minutes} min", w.count());
                    alert("password-guessing-account", Severity::Medium, format!("account:{acc}"), text, w.evidence());
                }
            }
        }
        if let Some(acc) = account.filter(|_| MFA_REASONS.contains(&reason)) {
            if let Some(w) = window(state, "mfa-failures", acc) {
                w.push(event(None), span);
                if w.fire(w.count() >= config.mfa_failures, e.time, span) {
                    let text = format!("{} wrong second factors for account {acc} within {minutes} min: its password was given correctly each time", w.count());
                    alert("mfa-failures", Severity::High, format!("account:{acc}"), text, w.evidence());
                }
            }
        }
        let source = e.source_address.as_str();
        if let Some(w) = window(state, "password-guessing-address", source) {
            w.push(event(account), span);
            if w.fire(w.count() >= config.failures_per_address, e.time, span) {
                let text = format!("{} failed sign-ins from address {source} within {minutes} min", w.count());
                alert("password-guessing-address", Severity::Medium, format!("address:{source}"), text, w.evidence());
            }
            // Counted in the address's window (each unknown user name as one more account); the
            // rule's own window only keeps it to one alert per span.
            let (distinct, evidence, named) = (w.distinct() as u64, w.evidence(), w.keys().join(", "));
            if let Some(s) = window(state, "credential-stuffing", source) {
                if s.fire(distinct >= config.accounts_per_address, e.time, span) {
                    let text = format!("failed sign-ins against {distinct} accounts from address {source} within {minutes} min (known accounts: {named})");
                    alert("credential-stuffing", Severity::High, format!("address:{source}"), text, evidence);
                }
            }
        }
    }

    if matches!(e.interaction.as_str(), "login" | "login-sso") && e.outcome == "success" && config.new_address {
        if let Some(acc) = account {
            if let Some(text) = note_address(state, acc, &e.source_address) {
                alert("new-address", Severity::Low, format!("account:{acc}"), text, vec![e.index]);
            }
        }
    }

    if e.interaction == "authenticate" && e.denied() {
        let source = e.source_address.as_str();
        if REVOKED_REASONS.contains(&reason) {
            if let Some(w) = window(state, "revoked-credential", source) {
                w.push(event(None), span);
                if w.fire(true, e.time, span) {
                    let what = if reason == "revoked-key" { "a revoked API key" } else { "a session ended by an administrator or an account change" };
                    let text = format!("{what} presented from address {source}{}", account.map(|a| format!(" (account {a})")).unwrap_or_default());
                    alert("revoked-credential", Severity::Medium, format!("address:{source}"), text, w.evidence());
                }
            }
        }
        if STALE_REASONS.contains(&reason) {
            if let Some(w) = window(state, "stale-credentials", source) {
                w.push(event(None), span);
                if w.fire(w.count() >= config.stale_credentials_per_address, e.time, span) {
                    let text = format!("{} expired or unknown session tokens presented from address {source} within {} min", w.count(), span / 60_000);
                    alert("revoked-credential", Severity::Medium, format!("address:{source}"), text, w.evidence());
                }
            }
        }
    }

    if e.agent_id.is_empty() && e.denied() && matches!(e.interaction.as_str(), "authenticate" | "rate-limit" | "ticket") {
        let source = e.source_address.as_str();
        let seconds = flood_span / 1000;
        if let Some(w) = window(state, "unauthenticated-flood", source) {
            w.push(event(None), flood_span);
            if w.fire(w.count() >= config.flood_per_address, e.time, flood_span) {
                let text = format!("{} requests refused before anyone was identified from address {source} within {seconds} s", w.count());
                alert("unauthenticated-flood", Severity::High, format!("address:{source}"), text, w.evidence());
            }
        }
        let w = &mut state.total_flood;
        w.push(event(Some(source)), flood_span);
        if w.fire(w.count() >= config.flood_total, e.time, flood_span) {
            let text = format!("{} requests refused before anyone was identified from {} addresses within {seconds} s", w.count(), w.distinct());
            alert("distributed-flood", Severity::High, "all".to_string(), text, w.evidence());
        }
    }
    alerts
}

/// The window of `rule` for `key`, made if there is room for it.
fn window<'a>(state: &'a mut State, rule: &str, key: &str) -> Option<&'a mut Window> {
    let of_rule = state.windows.entry(rule.to_string()).or_default();
    if !of_rule.contains_key(key) && of_rule.len() >= MAX_KEYS {
        return None;
    }
    Some(of_rule.entry(key.to_string()).or_default())
}

/// Remembers that `account` signed in from `address`; words for an alert when the account has
/// signed in before, never from there.
fn note_address(state: &mut State, account: &str, address: &str) -> Option<String> {
    if !state.addresses.contains_key(account) && state.addresses.len() >= MAX_ACCOUNTS {
        return None;
    }
    let seen = state.addresses.entry(account.to_string()).or_default();
    let known = seen.iter().position(|a| a == address);
    let first_sign_in = seen.is_empty();
    if let Some(i) = known {
        seen.remove(i);
    }
    seen.push_back(address.to_string());
    if seen.len() > ADDRESSES_PER_ACCOUNT {
        seen.pop_front();
    }
    (known.is_none() && !first_sign_in).then(|| format!("account {account} signed in from address {address}, not among the {} it used before", seen.len() - 1))
}

/// Forgets windows with nothing left in them.
fn sweep(state: &mut State, now: i64, span: i64) {
    for of_rule in state.windows.values_mut() {
        of_rule.retain(|_, w| !w.stale(now, span));
    }
}
