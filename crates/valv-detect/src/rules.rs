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

impl Config {
    /// Refuses spans and thresholds that make no sense (one line for the operator).
    pub fn check(&self) -> Result<(), String> {
        for (name, seconds) in [("window_seconds", self.window_seconds), ("flood_window_seconds", self.flood_window_seconds)] {
            if !(1..=86_400).contains(&seconds) {
                return Err(format!("[detect] {name} must be 1 to 86400, got {seconds}"));
            }
        }
        let thresholds = [
            ("guesses_per_account", self.guesses_per_account),
            ("failures_per_address", self.failures_per_address),
            ("accounts_per_address", self.accounts_per_address),
            ("mfa_failures", self.mfa_failures),
            ("stale_credentials_per_address", self.stale_credentials_per_address),
            ("flood_per_address", self.flood_per_address),
            ("flood_total", self.flood_total),
        ];
        if let Some((name, _)) = thresholds.iter().find(|(_, n)| *n == 0) {
            return Err(format!("[detect] {name} must be at least 1"));
        }
        if self.accounts_per_address > crate::window::MAX_EVENTS as u64 {
            return Err(format!("[detect] accounts_per_address must be at most {}", crate::window::MAX_EVENTS));
        }
        Ok(())
    }
}

/// Keys (accounts, addresses) followed per rule at most; beyond, further keys are counted
/// together in one window ([`OVERFLOW`]) until stale ones are forgotten.
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
    let span = config.window_seconds.saturating_mul(1000);
    if e.index.is_multiple_of(SWEEP_EVERY) {
        sweep(state, e.time, span.max(config.flood_window_seconds.saturating_mul(1000)));
    }
    let mut raised = Raised { entry: e, alerts: Vec::new() };
    let j = Judged { e, account: (!e.agent_id.is_empty()).then_some(e.agent_id.as_str()), reason: e.base_reason(), source: address_key(&e.source_address) };
    password_guessing(config, state, &j, &mut raised);
    refused_sign_ins(config, state, &j, &mut raised);
    new_address(config, state, &j, &mut raised);
    presented_credentials(config, state, &j, &mut raised);
    floods(config, state, &j, &mut raised);
    raised.alerts
}

/// What the rules read of an entry, worked out once.
struct Judged<'a> {
    e: &'a Entry,
    account: Option<&'a str>,
    reason: &'a str,
    /// The address as the per-address rules count it ([`address_key`]).
    source: String,
}

impl Judged<'_> {
    fn event(&self, key: Option<&str>) -> Event {
        Event { time: self.e.time, index: self.e.index, weight: self.e.weight(), key: key.map(str::to_string) }
    }
}

/// The alerts one entry raises, each named `<index>-<rule>`.
struct Raised<'a> {
    entry: &'a Entry,
    alerts: Vec<Alert>,
}

impl Raised<'_> {
    fn alert(&mut self, rule: &str, severity: Severity, subject: String, explanation: String, evidence: Vec<u64>) {
        let e = self.entry;
        self.alerts.push(Alert { id: format!("{}-{rule}", e.index), rule: rule.to_string(), severity, subject, time: e.time, explanation, evidence });
    }
}

/// `password-guessing-account`: wrong passwords for one account, at sign-in or when changing
/// the password.
fn password_guessing(config: &Config, state: &mut State, j: &Judged<'_>, out: &mut Raised<'_>) {
    let e = j.e;
    let wrong = (e.interaction == "login" && PASSWORD_REASONS.contains(&j.reason)) || (e.interaction == "password-change" && e.status == 403);
    let (Some(acc), true) = (j.account, e.denied() && wrong) else { return };
    let span = config.window_seconds.saturating_mul(1000);
    let w = window(state, "password-guessing-account", acc);
    w.push(j.event(None), span);
    if w.fire(w.count() >= config.guesses_per_account, e.time, span) {
        let text = format!("{} failed sign-ins with a wrong password for account {acc} within {} min", w.count(), span / 60_000);
        out.alert("password-guessing-account", Severity::Medium, format!("account:{acc}"), text, w.evidence());
    }
}

/// Refused sign-ins (401; not malformed requests nor the server's own failures):
/// `mfa-failures` per account, `password-guessing-address` and `credential-stuffing` per address.
fn refused_sign_ins(config: &Config, state: &mut State, j: &Judged<'_>, out: &mut Raised<'_>) {
    let e = j.e;
    if !(e.interaction == "login" && e.denied() && e.status == 401) {
        return;
    }
    let span = config.window_seconds.saturating_mul(1000);
    let minutes = span / 60_000;
    if let Some(acc) = j.account.filter(|_| MFA_REASONS.contains(&j.reason)) {
        let w = window(state, "mfa-failures", acc);
        w.push(j.event(None), span);
        if w.fire(w.count() >= config.mfa_failures, e.time, span) {
            let text = format!("{} wrong second factors for account {acc} within {minutes} min: its password was given correctly each time", w.count());
            out.alert("mfa-failures", Severity::High, format!("account:{acc}"), text, w.evidence());
        }
    }
    let source = j.source.as_str();
    // The account tried: a known one's id, or an unknown name's keyed token (`unknown:…`).
    let tried = j.account.or(e.resource_id.as_deref());
    let w = window(state, "password-guessing-address", source);
    w.push(j.event(tried), span);
    if w.fire(w.count() >= config.failures_per_address, e.time, span) {
        let text = format!("{} failed sign-ins from address {source} within {minutes} min", w.count());
        out.alert("password-guessing-address", Severity::Medium, format!("address:{source}"), text, w.evidence());
    }
    // Counted in the address's window; the rule's own window keeps it to one alert per span.
    let distinct = w.distinct() as u64;
    if distinct < config.accounts_per_address {
        return;
    }
    let (evidence, named) = (w.evidence(), w.keys().join(", "));
    if window(state, "credential-stuffing", source).fire(true, e.time, span) {
        let text = format!("failed sign-ins against {distinct} accounts from address {source} within {minutes} min ({named})");
        out.alert("credential-stuffing", Severity::High, format!("address:{source}"), text, evidence);
    }
}

/// `new-address`: a sign-in from an address the account has not signed in from before.
fn new_address(config: &Config, state: &mut State, j: &Judged<'_>, out: &mut Raised<'_>) {
    let e = j.e;
    if !(config.new_address && matches!(e.interaction.as_str(), "login" | "login-sso") && e.outcome == "success") {
        return;
    }
    let Some(acc) = j.account else { return };
    if let Some(text) = note_address(state, acc, &j.source) {
        out.alert("new-address", Severity::Low, format!("account:{acc}"), text, vec![e.index]);
    }
}

/// `revoked-credential`: a revoked credential presented, or stale ones again and again.
fn presented_credentials(config: &Config, state: &mut State, j: &Judged<'_>, out: &mut Raised<'_>) {
    let e = j.e;
    if !(e.interaction == "authenticate" && e.denied()) {
        return;
    }
    let span = config.window_seconds.saturating_mul(1000);
    let source = j.source.as_str();
    if REVOKED_REASONS.contains(&j.reason) {
        let w = window(state, "revoked-credential", source);
        w.push(j.event(None), span);
        if w.fire(true, e.time, span) {
            let what = if j.reason == "revoked-key" { "a revoked API key" } else { "a session ended by an administrator or an account change" };
            let text = format!("{what} presented from address {source}{}", j.account.map(|a| format!(" (account {a})")).unwrap_or_default());
            out.alert("revoked-credential", Severity::Medium, format!("address:{source}"), text, w.evidence());
        }
    }
    if STALE_REASONS.contains(&j.reason) {
        let w = window(state, "stale-credentials", source);
        w.push(j.event(None), span);
        if w.fire(w.count() >= config.stale_credentials_per_address, e.time, span) {
            let text = format!("{} expired or unknown session tokens presented from address {source} within {} min", w.count(), span / 60_000);
            out.alert("revoked-credential", Severity::Medium, format!("address:{source}"), text, w.evidence());
        }
    }
}

/// `unauthenticated-flood` per address and `distributed-flood` from all: requests refused before
/// anyone was identified. The server's own failures (a database or identity provider away, 5xx)
/// are not the callers'.
fn floods(config: &Config, state: &mut State, j: &Judged<'_>, out: &mut Raised<'_>) {
    let e = j.e;
    if !(e.agent_id.is_empty() && e.denied() && e.status < 500 && matches!(e.interaction.as_str(), "authenticate" | "rate-limit" | "ticket")) {
        return;
    }
    let span = config.flood_window_seconds.saturating_mul(1000);
    let seconds = span / 1000;
    let source = j.source.as_str();
    let w = window(state, "unauthenticated-flood", source);
    w.push(j.event(None), span);
    if w.fire(w.count() >= config.flood_per_address, e.time, span) {
        let text = format!("{} requests refused before anyone was identified from address {source} within {seconds} s", w.count());
        out.alert("unauthenticated-flood", Severity::High, format!("address:{source}"), text, w.evidence());
    }
    let w = &mut state.total_flood;
    w.push(j.event(Some(source)), span);
    if w.fire(w.count() >= config.flood_total, e.time, span) {
        let text = format!("{} requests refused before anyone was identified from {} or more addresses within {seconds} s", w.count(), w.distinct());
        out.alert("distributed-flood", Severity::High, "all".to_string(), text, w.evidence());
    }
}

/// Where windows go once a rule follows [`MAX_KEYS`] keys: all further ones counted together.
pub const OVERFLOW: &str = "(more keys than followed)";

/// The window of `rule` for `key` (or, with no room for another key, the overflow window).
fn window<'a>(state: &'a mut State, rule: &str, key: &str) -> &'a mut Window {
    let of_rule = state.windows.entry(rule.to_string()).or_default();
    let key = if !of_rule.contains_key(key) && of_rule.len() >= MAX_KEYS { OVERFLOW } else { key };
    of_rule.entry(key.to_string()).or_default()
}

/// What a per-address rule counts by: an IPv4 address, or the /64 of an IPv6 address (one host
/// is usually given a whole /64; the server's rate limits count the same way). Anything else
/// (the console's `local`) as it is.
pub fn address_key(address: &str) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("{}/64", std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        Ok(ip) => ip.to_string(),
        Err(_) => address.to_string(),
    }
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
