//! Prometheus metrics: requests by route and status, latency histograms by route, audit
//! failures and SIEM forwarding. Labels are route names, never paths or queries, so no patient data reaches them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    pub audit_failures: AtomicU64,
    pub audit_entries: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Requests the access policy denied.
    pub access_denied: AtomicU64,
    /// Break-glass grants made, and accesses resting on one (each also an alert in the log).
    pub break_glass_grants: AtomicU64,
    pub break_glass_accesses: AtomicU64,
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    pub lockouts: AtomicU64,
    /// `/auth/*` requests refused by the per-address rate limit.
    pub auth_rate_limited: AtomicU64,
    /// Audit entries written to the SIEM collector (see [`crate::audit::siem`]).
    pub siem_forwarded: AtomicU64,
    pub siem_failures: AtomicU64,
    /// Stored audit entries not yet forwarded (a gauge).
    pub siem_lag: AtomicU64,
    /// Data keys moved to the current KEK version by this process, and those still to move (a gauge).
    pub keys_rewrapped: AtomicU64,
    pub keys_to_rewrap: AtomicU64,
    /// Scheduled backups written and failed, and when the last one was written (Unix seconds).
    pub backups_written: AtomicU64,
    pub backup_failures: AtomicU64,
    pub backup_last_success: AtomicU64,
    /// Files the malware scanner passed, found infected, or could not scan.
    pub files_clean: AtomicU64,
    pub files_infected: AtomicU64,
    pub files_not_scanned: AtomicU64,
    /// Alerts raised by this process's detection engine, by rule and severity.
    alerts: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Stored audit entries the detection engine has not read yet (a gauge).
    pub detection_lag: AtomicU64,
    /// Patient accesses the snooping rules judged (with the facts worked out from the store).
    pub detection_judged: AtomicU64,
    /// Alerts the webhook receiver accepted, failed attempts (each retried), and stored audit
    /// entries the webhook has not looked at yet (a gauge); see [`crate::detect::webhook`].
    pub webhook_delivered: AtomicU64,
    pub webhook_failures: AtomicU64,
    pub webhook_lag: AtomicU64,
}

impl Metrics {
    pub fn alert_raised(&self, rule: &str, severity: &'static str) {
        if let Ok(mut a) = self.alerts.lock() {
            *a.entry((rule.to_string(), severity)).or_default() += 1;
        }
    }

    pub fn observe(&self, route: &'static str, status: u16, elapsed: Duration) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((route, status)).or_default() += 1;
        }
        let secs = elapsed.as_secs_f64();
        if let Ok(mut l) = self.latency.lock() {
            let h = l.entry(route).or_default();
            h.count += 1;
            h.sum += secs;
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    h.buckets[i] += 1;
                }
            }
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP valv_http_requests_total HTTP requests by route and status.\n# TYPE valv_http_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for ((route, status), n) in r.iter() {
                let _ = writeln!(out, "valv_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
        }
        out.push_str("# HELP valv_http_request_duration_seconds Request latency by route.\n# TYPE valv_http_request_duration_seconds histogram\n");
        if let Ok(l) = self.latency.lock() {
            for (route, h) in l.iter() {
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(out, "valv_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{le}\"}} {}", h.buckets[i]);
                }
                let _ = writeln!(out, "valv_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "valv_http_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
                let _ = writeln!(out, "valv_http_request_duration_seconds_count{{route=\"{route}\"}} {}", h.count);
            }
        }
        out.push_str("# HELP valv_alerts_total Alerts raised by the detection engine, by rule and severity.\n# TYPE valv_alerts_total counter\n");
        if let Ok(a) = self.alerts.lock() {
            for ((rule, severity), n) in a.iter() {
                let _ = writeln!(out, "valv_alerts_total{{rule=\"{rule}\",severity=\"{severity}\"}} {n}");
            }
        }
        for (name, help, v) in [
            ("valv_audit_entries_total", "Audit entries made durable.", &self.audit_entries),
            ("valv_audit_failures_total", "Requests refused because their audit entry could not be made durable.", &self.audit_failures),
            ("valv_auth_failures_total", "Requests with a missing, unknown or revoked credential.", &self.auth_failures),
            ("valv_access_denied_total", "Requests the access policy denied.", &self.access_denied),
            ("valv_break_glass_grants_total", "Break-glass grants made (each waits for an auditor's review).", &self.break_glass_grants),
            ("valv_break_glass_accesses_total", "Accesses resting on a break-glass grant.", &self.break_glass_accesses),
            ("valv_logins_total", "Successful sign-ins.", &self.logins),
            ("valv_login_failures_total", "Failed sign-ins (any reason).", &self.login_failures),
            ("valv_lockouts_total", "Accounts locked after repeated failed sign-ins.", &self.lockouts),
            ("valv_auth_rate_limited_total", "Requests to /auth/* refused by the per-address rate limit (429).", &self.auth_rate_limited),
            ("valv_siem_forwarded_total", "Audit entries sent to the SIEM collector.", &self.siem_forwarded),
            ("valv_siem_failures_total", "Failed attempts to forward audit entries to the SIEM collector (each retried).", &self.siem_failures),
            ("valv_detection_judged_total", "Patient accesses the snooping rules judged with the facts worked out from the store.", &self.detection_judged),
            ("valv_alert_webhook_delivered_total", "Alerts the webhook receiver accepted (2xx).", &self.webhook_delivered),
            ("valv_alert_webhook_failures_total", "Failed attempts to deliver an alert to the webhook (each retried).", &self.webhook_failures),
            ("valv_keys_rewrapped_total", "Data keys this process rewrapped under the current KEK version (rotation).", &self.keys_rewrapped),
            ("valv_backups_written_total", "Scheduled backups written ([backup] every_secs).", &self.backups_written),
            ("valv_backup_failures_total", "Scheduled backups that failed (each retried, and recorded in the audit log).", &self.backup_failures),
            ("valv_files_clean_total", "Files the malware scanner passed.", &self.files_clean),
            ("valv_files_infected_total", "Files the malware scanner found infected (never served).", &self.files_infected),
            ("valv_files_not_scanned_total", "Files beyond the scanner's limits or that it failed on (not served unless files.serve_unscannable).", &self.files_not_scanned),
        ] {
            write_metric(&mut out, "counter", name, help, v.load(Ordering::Relaxed));
        }
        write_metric(&mut out, "counter", "valv_integrity_failures_total", "Stored records that failed to authenticate when opened.", valv_store::vault::integrity_failures());
        write_metric(&mut out, "counter", "valv_search_index_mismatches_total", "Search candidates dropped because their decrypted body does not match the query (index rows edited or copied in the database).", valv_store::vault::index_mismatches());
        write_metric(&mut out, "gauge", "valv_siem_lag_entries", "Stored audit entries not yet forwarded to the SIEM collector.", self.siem_lag.load(Ordering::Relaxed));
        write_metric(&mut out, "gauge", "valv_backup_last_success_seconds", "When the last scheduled backup was written (Unix time; 0: none yet).", self.backup_last_success.load(Ordering::Relaxed));
        write_metric(&mut out, "gauge", "valv_detection_lag_entries", "Stored audit entries the detection engine has not read yet.", self.detection_lag.load(Ordering::Relaxed));
        write_metric(&mut out, "gauge", "valv_alert_webhook_lag_entries", "Stored audit entries the alert webhook has not looked through yet.", self.webhook_lag.load(Ordering::Relaxed));
        write_metric(&mut out, "gauge", "valv_keys_to_rewrap", "Data keys not yet under the current KEK version, as last counted.", self.keys_to_rewrap.load(Ordering::Relaxed));
        out
    }
}

/// One unlabelled metric in the Prometheus text format: HELP, TYPE (`counter`, `gauge`), value.
pub fn write_metric(out: &mut String, kind: &str, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_buckets() {
        let m = Metrics::default();
        m.observe("fhir_read", 200, Duration::from_millis(2));
        m.observe("fhir_read", 200, Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains("valv_http_requests_total{route=\"fhir_read\",status=\"200\"} 2"));
        assert!(text.contains("valv_http_request_duration_seconds_bucket{route=\"fhir_read\",le=\"0.0025\"} 1"));
        assert!(text.contains("valv_http_request_duration_seconds_count{route=\"fhir_read\"} 2"));
    }
}
