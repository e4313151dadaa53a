//! Each rule on a constructed case and its legitimate twin; restoring a saved state changes
//! nothing (property).

use super::*;
use proptest::prelude::*;

const T0: i64 = 1_780_000_000_000;

struct Log {
    detector: Detector,
    next: u64,
    alerts: Vec<Alert>,
}

impl Log {
    fn new() -> Log {
        Log { detector: Detector::new(Config::default()), next: 0, alerts: Vec::new() }
    }

    /// One entry at `secs` after T0.
    fn entry(&mut self, secs: i64, interaction: &str, outcome: &str, agent: &str, source: &str, reason: &str) {
        self.entry_about(secs, interaction, outcome, agent, source, reason, None, None);
    }

    /// The same with a status (default: 200 or 401) and a `resource_id`.
    #[allow(clippy::too_many_arguments)]
    fn entry_about(&mut self, secs: i64, interaction: &str, outcome: &str, agent: &str, source: &str, reason: &str, status: Option<u16>, resource: Option<&str>) {
        let e = Entry {
            index: self.next,
            time: T0 + secs * 1000,
            interaction: interaction.into(),
            outcome: outcome.into(),
            status: status.unwrap_or(if outcome == "success" { 200 } else { 401 }),
            agent_id: agent.into(),
            roles: Vec::new(),
            source_address: source.into(),
            patient: None,
            resource_type: None,
            resource_id: resource.map(str::to_string),
            reason: reason.into(),
        };
        self.next += 1;
        self.alerts.extend(self.detector.observe(&e));
    }

    fn rules(&self) -> Vec<&str> {
        self.alerts.iter().map(|a| a.rule.as_str()).collect()
    }
}

#[test]
fn password_guessing_on_an_account_and_its_twin() {
    let mut log = Log::new();
    for i in 0..5 {
        log.entry(i * 30, "login", "denied", "u1", "10.0.0.9", "wrong-password");
    }
    assert_eq!(log.rules(), ["password-guessing-account"]);
    let a = &log.alerts[0];
    assert_eq!((a.subject.as_str(), a.severity, &a.evidence[..]), ("account:u1", Severity::Medium, &[0, 1, 2, 3, 4][..]));
    assert!(a.explanation.contains("5 failed sign-ins") && a.id == "4-password-guessing-account", "{a:?}");
    // More failures in the same span: no second alert.
    log.entry(200, "login", "denied", "u1", "10.0.0.9", "locked");
    assert_eq!(log.alerts.len(), 1);
    // Guessing through a password change (403 there) counts the same.
    let mut change = Log::new();
    for i in 0..5 {
        change.entry_about(i * 10, "password-change", "denied", "u3", "10.0.0.9", "the current password is not correct", Some(403), None);
    }
    assert_eq!(change.rules(), ["password-guessing-account"]);

    // The twin: a person who mistypes four times, spread out, then signs in.
    let mut twin = Log::new();
    for i in 0..4 {
        twin.entry(i * 400, "login", "denied", "u2", "10.0.0.7", "wrong-password");
    }
    twin.entry(1700, "login", "success", "u2", "10.0.0.7", "password-and-totp");
    twin.entry(2000, "login", "denied", "u2", "10.0.0.7", "wrong-password");
    assert!(twin.alerts.is_empty(), "{:?}", twin.alerts);
}

#[test]
fn failures_from_one_address_and_credential_stuffing() {
    let mut log = Log::new();
    for i in 0..5 {
        log.entry(i, "login", "denied", &format!("u{i}"), "203.0.113.5", "wrong-password");
    }
    assert_eq!(log.rules(), ["credential-stuffing"]);
    assert!(log.alerts[0].explanation.contains("5 accounts") && log.alerts[0].explanation.contains("u0, u1"), "{:?}", log.alerts);
    // Unknown user names count by their token; twenty failures from the address in all.
    for i in 5..20 {
        log.entry_about(i, "login", "denied", "", "203.0.113.5", "unknown-user", None, Some(&format!("unknown:{i:04x}")));
    }
    assert_eq!(log.rules(), ["credential-stuffing", "password-guessing-address"]);

    // One person mistyping their own user name five times is one name, not five accounts; a
    // broken client's malformed requests (400) are not sign-in failures at all.
    let mut typo = Log::new();
    for i in 0..5 {
        typo.entry_about(i * 20, "login", "denied", "", "10.2.2.2", "unknown-user", None, Some("unknown:00aa"));
    }
    for i in 0..30 {
        typo.entry_about(200 + i, "login", "denied", "", "10.2.2.2", "the body is not valid JSON", Some(400), None);
    }
    assert!(typo.alerts.is_empty(), "{:?}", typo.alerts);

    // IPv6: every address of one /64 is one source (as the server's rate limits count).
    let mut v6 = Log::new();
    for i in 0..5 {
        v6.entry(i, "login", "denied", &format!("u{i}"), &format!("2001:db8:5:6::{:x}", i + 1), "wrong-password");
    }
    assert_eq!(v6.rules(), ["credential-stuffing"]);
    assert_eq!(v6.alerts[0].subject, "address:2001:db8:5:6::/64");

    // The twin: a ward's shared terminal, three people mistyping once each.
    let mut twin = Log::new();
    for (i, u) in ["a", "b", "c"].iter().enumerate() {
        twin.entry(i as i64 * 60, "login", "denied", u, "10.1.1.1", "wrong-password");
        twin.entry(i as i64 * 60 + 5, "login", "success", u, "10.1.1.1", "password-and-totp");
    }
    assert!(twin.alerts.is_empty(), "{:?}", twin.alerts);
}

#[test]
fn second_factor_failures_are_high() {
    let mut log = Log::new();
    for i in 0..3 {
        log.entry(i * 10, "login", "denied", "u1", "198.51.100.2", if i == 1 { "wrong-recovery-code" } else { "wrong-or-reused-totp" });
    }
    assert_eq!(log.rules(), ["mfa-failures"]);
    assert_eq!(log.alerts[0].severity, Severity::High);
    // The twin: one mistyped code, then the right one.
    let mut twin = Log::new();
    twin.entry(0, "login", "denied", "u1", "10.0.0.1", "wrong-or-reused-totp");
    twin.entry(20, "login", "success", "u1", "10.0.0.1", "password-and-totp");
    twin.entry(30_000, "login", "denied", "u1", "10.0.0.1", "wrong-or-reused-totp");
    assert!(twin.alerts.is_empty());
}

#[test]
fn a_sign_in_from_a_new_address() {
    let mut log = Log::new();
    log.entry(0, "login", "success", "u1", "10.0.0.1", "password-and-totp");
    log.entry(3600, "login", "success", "u1", "10.0.0.1", "password-and-totp");
    log.entry(7200, "login-sso", "success", "u2", "10.0.0.2", "oidc:hospital");
    assert!(log.alerts.is_empty(), "a first sign-in and a known address are not news: {:?}", log.alerts);
    log.entry(9000, "login", "success", "u1", "192.0.2.77", "password-and-totp");
    assert_eq!(log.rules(), ["new-address"]);
    assert_eq!((log.alerts[0].severity, &log.alerts[0].evidence[..]), (Severity::Low, &[3][..]));
}

#[test]
fn revoked_and_stale_credentials() {
    let mut log = Log::new();
    log.entry(0, "authenticate", "denied", "", "10.9.9.9", "revoked-key");
    assert_eq!(log.rules(), ["revoked-credential"]);
    assert!(log.alerts[0].explanation.contains("revoked API key"));
    // One expired session after a weekend is a client that missed its timeout; twenty is replay.
    let mut twin = Log::new();
    twin.entry(0, "authenticate", "denied", "", "10.0.0.3", "session-expired");
    twin.entry(1, "authenticate", "denied", "", "10.0.0.3", "unknown-session");
    assert!(twin.alerts.is_empty());
    for i in 2..20 {
        twin.entry(i, "authenticate", "denied", "", "10.0.0.3", "unknown-session");
    }
    assert_eq!(twin.rules(), ["revoked-credential"]);
}

#[test]
fn floods_count_compacted_entries_by_what_they_stand_for() {
    let mut log = Log::new();
    log.entry(0, "authenticate", "denied", "", "192.0.2.1", "no-credential");
    log.entry(1, "authenticate", "denied", "", "192.0.2.1", "no-credential (x150 from this address, 1 to 999 ms; compacted)");
    log.entry(2, "rate-limit", "denied", "", "192.0.2.1", "too-many-unauthenticated-requests-from-address (x148 from this address, 0 to 9000 ms; compacted)");
    assert!(log.alerts.is_empty(), "1 + 150 + 148 = 299 requests");
    log.entry(3, "authenticate", "denied", "", "192.0.2.1", "no-credential");
    assert_eq!(log.rules(), ["unauthenticated-flood"]);
    // Many addresses, each below its own threshold, each request an entry of its own: counted
    // whole, however many (far beyond the events a window keeps).
    let mut spread = Log::new();
    for i in 0..3000 {
        spread.entry(i / 60, "authenticate", "denied", "", &format!("198.18.{}.{}", i / 250, i % 250), "invalid-credential");
    }
    assert_eq!(spread.rules(), ["distributed-flood"]);
    assert!(spread.alerts[0].explanation.starts_with("3000 requests"), "{:?}", spread.alerts);
    // The server's own failures (503: its identity provider away) are no flood.
    let mut outage = Log::new();
    for i in 0..400 {
        outage.entry_about(i / 10, "authenticate", "denied", "", "10.0.0.1", "oidc-provider-unreachable", Some(503), None);
    }
    assert!(outage.alerts.is_empty(), "{:?}", outage.alerts);
    // A busy hour of ordinary expired tokens from the clinic's NAT: no flood.
    let mut twin = Log::new();
    for i in 0..250 {
        twin.entry(i * 15, "authenticate", "denied", "", "10.0.0.1", "malformed-credential");
    }
    assert!(twin.alerts.is_empty(), "{:?}", twin.alerts);
}

#[test]
fn configuration_is_checked() {
    assert!(Config::default().check().is_ok());
    assert!(Config { window_seconds: 0, ..Config::default() }.check().expect_err("refused").contains("window_seconds"));
    assert!(Config { flood_total: 0, ..Config::default() }.check().expect_err("refused").contains("flood_total"));
    assert!(Config { accounts_per_address: 10_000, ..Config::default() }.check().is_err());
}

#[test]
fn addresses_are_counted_as_the_rate_limits_count_them() {
    assert_eq!(rules::address_key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
    assert_eq!(rules::address_key("::ffff:192.0.2.7"), "192.0.2.7");
    assert_eq!((rules::address_key("10.0.0.1"), rules::address_key("local")), ("10.0.0.1".to_string(), "local".to_string()));
}

#[test]
fn weight_and_reason_of_compacted_entries() {
    let e = |reason: &str| Entry::parse(7, format!(r#"{{"time":1,"interaction":"authenticate","outcome":"denied","reason":"{reason}"}}"#).as_bytes()).expect("parses");
    assert_eq!((e("no-credential").weight(), e("no-credential").base_reason()), (1, "no-credential"));
    let c = e("no-credential (x41 from this address, 10 to 990 ms; compacted)");
    assert_eq!((c.weight(), c.base_reason(), c.index), (41, "no-credential", 7));
    assert_eq!(e("odd (xZ from; compacted)").weight(), 1);
    assert!(Entry::parse(0, b"{\"time\":\"yesterday\"}").is_err());
}

fn arb_entry() -> impl Strategy<Value = (i64, usize, usize, usize, usize)> {
    (0i64..120, 0usize..6, 0usize..4, 0usize..3, 0usize..7)
}

proptest! {
    /// Saving the state at any point and restoring it gives the alerts an uninterrupted
    /// detector gives: a restart neither skips nor repeats one.
    #[test]
    fn a_restored_detector_raises_what_the_uninterrupted_one_does(steps in proptest::collection::vec(arb_entry(), 1..300), cut in 0usize..300) {
        let interactions = ["login", "login", "login-sso", "authenticate", "rate-limit", "ticket"];
        let outcomes = ["denied", "denied", "success", "error"];
        let reasons = ["wrong-password", "wrong-or-reused-totp", "unknown-user", "revoked-key", "unknown-session", "no-credential (x40 from this address, 1 to 2 ms; compacted)", "password-and-totp"];
        let mut time = T0;
        let entries: Vec<Entry> = steps.iter().enumerate().map(|(i, &(dt, inter, out, who, why))| {
            time += dt * 1000;
            let agent = if interactions[inter] == "authenticate" || who == 0 { String::new() } else { format!("u{who}") };
            Entry { index: i as u64, time, interaction: interactions[inter].into(), outcome: outcomes[out].into(), status: 401, agent_id: agent,
                roles: Vec::new(), source_address: format!("10.0.0.{}", who + inter % 2), patient: None, resource_type: None, resource_id: None, reason: reasons[why].into() }
        }).collect();
        let config = Config { guesses_per_account: 2, failures_per_address: 3, accounts_per_address: 2, mfa_failures: 2, stale_credentials_per_address: 2, flood_per_address: 100, flood_total: 200, ..Config::default() };
        let mut whole = Detector::new(config.clone());
        let expected: Vec<Alert> = entries.iter().flat_map(|e| whole.observe(e)).collect();
        let cut = cut.min(entries.len());
        let mut first = Detector::new(config.clone());
        let mut got: Vec<Alert> = entries[..cut].iter().flat_map(|e| first.observe(e)).collect();
        let mut resumed = Detector::restore(config, &first.state()).expect("restores");
        prop_assert_eq!(resumed.next_index(), cut as u64);
        got.extend(entries[cut..].iter().flat_map(|e| resumed.observe(e)));
        prop_assert_eq!(got, expected);
    }
}
