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
    /// Run the snooping rules (docs/DETECTION.md "The snooping rules").
    pub snooping: bool,
    /// An access is judged this many minutes after it was made (the record's reason for it,
    /// such as the encounter, is often registered after the first look).
    pub explain_delay_minutes: i64,
    /// An episode explains accesses this many hours before and after it.
    pub explain_hours: i64,
    /// An order explains accesses for this many days after it.
    pub order_days: i64,
    /// `snooping-after-care`: a first unexplained access this many days after the last visit.
    pub after_care_days: i64,
    /// `snooping-volume`: at least this many unexplained patients in a day…
    pub volume_min_patients: u64,
    /// …and this many times the person's usual (the larger of their and their unit's average).
    pub volume_factor: u64,
    /// Days of history the usual is the average of.
    pub baseline_days: u64,
    /// `snooping-off-hours`: an hour of the week holding less than this share (per mille) of
    /// the unit's accesses…
    pub off_hours_per_mille: u64,
    /// …once the unit has been seen making this many.
    pub off_hours_learn: u64,
    /// Local time for hours and days, as minutes east of UTC (Sweden: 60, in summer 120).
    pub utc_offset_minutes: i64,
    /// `break-glass-frequent`: this many break-glass grants…
    pub break_glass_count: u64,
    /// …within this many days.
    pub break_glass_days: i64,
    /// `access-widening`: changes widening access to this many patients in a day.
    pub widening_patients: u64,
    /// `large-export`: one caller exporting this many patients in a day.
    pub export_patients: u64,
    /// `incident-notification-due`: hours after an incident's opening without notification.
    pub incident_warn_hours: i64,
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
            snooping: true,
            explain_delay_minutes: 60,
            explain_hours: 24,
            order_days: 30,
            after_care_days: 365,
            volume_min_patients: 10,
            volume_factor: 3,
            baseline_days: 14,
            off_hours_per_mille: 2,
            off_hours_learn: 500,
            utc_offset_minutes: 0,
            break_glass_count: 3,
            break_glass_days: 30,
            widening_patients: 10,
            export_patients: 100,
            incident_warn_hours: 48,
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
        for (name, n) in [("accounts_per_address", self.accounts_per_address), ("widening_patients", self.widening_patients), ("export_patients", self.export_patients)] {
            if n > crate::window::MAX_EVENTS as u64 {
                return Err(format!("[detect] {name} must be at most {}", crate::window::MAX_EVENTS));
            }
        }
        let ranges = [
            ("explain_delay_minutes", self.explain_delay_minutes, 0, 24 * 60),
            ("explain_hours", self.explain_hours, 0, 24 * 30),
            ("order_days", self.order_days, 0, 365),
            ("after_care_days", self.after_care_days, 1, 3650),
            ("volume_min_patients", self.volume_min_patients as i64, 1, 1000),
            ("volume_factor", self.volume_factor as i64, 1, 100),
            ("baseline_days", self.baseline_days as i64, 1, 90),
            ("off_hours_per_mille", self.off_hours_per_mille as i64, 0, 1000),
            ("off_hours_learn", self.off_hours_learn as i64, 1, 1 << 19),
            ("utc_offset_minutes", self.utc_offset_minutes, -14 * 60, 14 * 60),
            ("break_glass_count", self.break_glass_count as i64, 1, 512),
            ("break_glass_days", self.break_glass_days, 1, 365),
            ("widening_patients", self.widening_patients as i64, 1, 512),
            ("export_patients", self.export_patients as i64, 1, 512),
            ("incident_warn_hours", self.incident_warn_hours, 1, 71),
        ];
        if let Some((name, v, lo, hi)) = ranges.iter().find(|(_, v, lo, hi)| v < lo || v > hi) {
            return Err(format!("[detect] {name} must be {lo} to {hi}, got {v}"));
        }
        Ok(())
    }

    /// The snooping rules' settings in the units they count in.
    pub fn snoop(&self) -> crate::snoop::Settings {
        const HOUR: i64 = 3_600_000;
        crate::snoop::Settings {
            margins: crate::snoop::record::Margins { visit_ms: self.explain_hours * HOUR, order_ms: self.order_days * 24 * HOUR },
            after_care_ms: self.after_care_days * 24 * HOUR,
            volume_min: self.volume_min_patients as usize,
            volume_factor: self.volume_factor,
            baseline_days: self.baseline_days as usize,
            off_hours_per_mille: self.off_hours_per_mille,
            off_hours_learn: self.off_hours_learn,
            utc_offset_ms: self.utc_offset_minutes * 60_000,
            break_glass_count: self.break_glass_count,
            break_glass_ms: self.break_glass_days * 24 * HOUR,
            widening_patients: self.widening_patients as usize,
            export_patients: self.export_patients as usize,
        }
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
    #[serde(default)]
    pub(crate) snoop: crate::snoop::State,
    #[serde(default)]
    pub(crate) deadline: crate::deadline::State,
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
    let snoop = config.snoop();
    if e.index.is_multiple_of(SWEEP_EVERY) {
        sweep(state, e.time, span.max(config.flood_window_seconds.saturating_mul(1000)));
        crate::snoop::sweep(&snoop, &mut state.snoop, e.time);
    }
    let mut raised = Raised { entry: e, alerts: Vec::new() };
    let j = Judged { e, account: (!e.agent_id.is_empty()).then_some(e.agent_id.as_str()), reason: e.base_reason(), source: address_key(&e.source_address) };
    password_guessing(config, state, &j, &mut raised);
    refused_sign_ins(config, state, &j, &mut raised);
    new_address(config, state, &j, &mut raised);
    presented_credentials(config, state, &j, &mut raised);
    floods(config, state, &j, &mut raised);
    crate::deadline::observe(&mut state.deadline, e);
    if config.snooping {
        crate::snoop::observe(&snoop, &mut state.snoop, e, &mut raised.alerts);
    }
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
