//! `valv compliance`: each control of HIPAA §164.312 and §164.308, the GDPR and HSLF-FS
//! 2016:40 that Valv carries, judged against the facts of *this* deployment, with the evidence;
//! what Valv cannot know is listed as the operator's. Pure: the server gathers [`Facts`]
//! (configuration, accounts, keys, the audit log, reviews, incidents) and [`evaluate`] judges
//! them at `now`. docs/COMPLIANCE.md maps each control to its feature and test.

use serde::Serialize;

const DAY: i64 = 86_400_000;
/// A backup at least this recent (days).
pub const BACKUP_DAYS: i64 = 7;
/// A restore drill at least this recent.
pub const DRILL_DAYS: i64 = 90;
/// A finished systematic log review at least this recent (HSLF-FS: recurrently).
pub const REVIEW_DAYS: i64 = 30;
/// A full audit-log verification at least this recent.
pub const VERIFY_DAYS: i64 = 30;
/// Break-glass use reviewed within this many days.
pub const BREAK_GLASS_REVIEW_DAYS: i64 = 7;
/// Erasure requests decided within this many days (GDPR Art. 12(3): one month).
pub const ERASURE_DAYS: i64 = 30;
/// The key-encryption key rotated at least this often.
pub const KEK_ROTATION_DAYS: i64 = 365;
/// Longest idle time before a session ends that counts as automatic logoff.
pub const MAX_IDLE_MINUTES: u32 = 30;

/// What the configuration says (read when the data directory is opened).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub tls12_allowed: bool,
    pub session_idle_minutes: u32,
    pub session_absolute_hours: u32,
    pub lockout_threshold: u32,
    pub lockout_minutes: u32,
    pub mfa_for_all_roles: bool,
    pub sso_providers: usize,
    /// `file`, `pkcs11` or `aws-kms`.
    pub key_provider: String,
    pub detection: bool,
    pub siem: bool,
    pub backup_schedule: bool,
    pub retention_years: u32,
}

/// An audit entry that shows something was done: its leaf index and time.
pub type Done = Option<(u64, i64)>;

/// Everything the report rests on.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub deployment: Deployment,
    /// Active accounts of people, and how many of them have a confirmed second factor.
    pub people: usize,
    pub people_with_mfa: usize,
    /// Active API keys (services).
    pub api_keys: usize,
    /// Data keys in all, those under a KEK version other than the current one, the oldest wrap.
    pub data_keys: u64,
    pub keys_not_current: u64,
    pub oldest_wrap: Option<i64>,
    pub audit_size: u64,
    /// Entries covered by the latest signed checkpoint.
    pub checkpoint_size: Option<u64>,
    pub last_verify: Done,
    pub last_backup: Done,
    pub last_drill: Done,
    /// How far back the audit log was searched for the three above (entries, oldest time).
    pub searched: (u64, Option<i64>),
    /// Break-glass grants not yet reviewed: their creation times.
    pub break_glass_pending: Vec<i64>,
    /// Finished reviews that had items: their finishing times; reviews still open.
    pub reviews_finished: Vec<i64>,
    pub reviews_open: usize,
    /// Incidents not closed: id, opened, when the notify stage was entered.
    pub incidents_open: Vec<(String, i64, Option<i64>)>,
    pub incidents_closed: usize,
    /// Erasure requests pending: their times.
    pub erasures_pending: Vec<i64>,
    pub alerts_total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Outside what Valv can know: the operator's to show.
    Operator,
}

#[derive(Debug, Clone, Serialize)]
pub struct Control {
    pub id: &'static str,
    pub title: &'static str,
    pub status: Status,
    pub evidence: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub time: i64,
    pub passed: usize,
    pub failed: usize,
    pub controls: Vec<Control>,
}

fn days(ms: i64) -> i64 {
    ms.div_euclid(DAY)
}

fn ago(now: i64, t: i64) -> String {
    format!("{} days ago", days(now - t))
}

fn verdict(ok: bool) -> Status {
    if ok {
        Status::Pass
    } else {
        Status::Fail
    }
}

/// A recurring duty: passes when last done within `within` days.
fn recent(now: i64, done: Done, within: i64, what: &str, how: &str) -> (Status, String) {
    match done {
        Some((index, t)) if now - t <= within * DAY => (Status::Pass, format!("{what} {} (audit entry {index}; required every {within} days)", ago(now, t))),
        Some((index, t)) => (Status::Fail, format!("last {what} {} (audit entry {index}); required every {within} days: {how}", ago(now, t))),
        None => (Status::Fail, format!("no {what} found in the audit log; required every {within} days: {how}")),
    }
}

fn and(a: (Status, String), b: (Status, String)) -> (Status, String) {
    (verdict(a.0 == Status::Pass && b.0 == Status::Pass), format!("{}; {}", a.1, b.1))
}

pub fn evaluate(f: &Facts, now: i64) -> Report {
    let d = &f.deployment;
    let mut c: Vec<Control> = Vec::new();
    let mut add = |id: &'static str, title: &'static str, (status, evidence): (Status, String)| c.push(Control { id, title, status, evidence });

    let mfa = {
        let missing = f.people - f.people_with_mfa.min(f.people);
        (verdict(missing == 0), format!("{} of {} active people have a second factor ({}); {} SSO providers", f.people_with_mfa, f.people, if d.mfa_for_all_roles { "required of every role" } else { "required of roles that see patient data" }, d.sso_providers))
    };
    let tls = (Status::Pass, format!("HTTPS only; TLS 1.3{}, AEAD suites only; plain HTTP is not served", if d.tls12_allowed { " and 1.2" } else { " only" }));
    let logoff = (verdict(d.session_idle_minutes <= MAX_IDLE_MINUTES), format!("sessions end after {} idle minutes ({MAX_IDLE_MINUTES} or fewer passes) and {} hours in all", d.session_idle_minutes, d.session_absolute_hours));
    let lockout = (Status::Pass, format!("{} failed sign-ins lock an account for {} minutes, doubling", d.lockout_threshold, d.lockout_minutes));
    let keys = {
        let age = f.oldest_wrap.map(|t| days(now - t));
        let ok = f.keys_not_current == 0 && age.is_none_or(|a| a <= KEK_ROTATION_DAYS);
        let age_text = age.map_or("no data keys yet".to_string(), |a| format!("the oldest wrap is {a} days old (rotate within {KEK_ROTATION_DAYS}: valv keys rotate)"));
        (verdict(ok), format!("envelope encryption of every record and file; key provider {}; {} data keys, {} not under the current KEK version; {age_text}", d.key_provider, f.data_keys, f.keys_not_current))
    };
    let verify = recent(now, f.last_verify, VERIFY_DAYS, "full verification of the audit log", "run valv audit verify");
    let checkpoint = {
        let behind = f.checkpoint_size.map(|s| f.audit_size.saturating_sub(s));
        (verdict(f.checkpoint_size.is_some()), match behind {
            Some(b) => format!("{} entries, the latest signed checkpoint covers all but {b}", f.audit_size),
            None => "no signed checkpoint yet (the server signs one within a second of serving)".to_string(),
        })
    };
    let audit = and(checkpoint, verify.clone());
    let pending_bg = f.break_glass_pending.iter().filter(|t| now - **t > BREAK_GLASS_REVIEW_DAYS * DAY).count();
    let emergency = (verdict(pending_bg == 0), format!("break-glass with a reason, time-limited; {} uses await review, {pending_bg} of them over {BREAK_GLASS_REVIEW_DAYS} days", f.break_glass_pending.len()));
    let last_review = f.reviews_finished.iter().max().copied();
    let review = match last_review {
        Some(t) if now - t <= REVIEW_DAYS * DAY => (Status::Pass, format!("last systematic review finished {} ({} finished in all, {} open; required every {REVIEW_DAYS} days)", ago(now, t), f.reviews_finished.len(), f.reviews_open)),
        Some(t) => (Status::Fail, format!("last systematic review finished {}; required every {REVIEW_DAYS} days: valv review sample", ago(now, t))),
        None => (Status::Fail, format!("no systematic review done; required every {REVIEW_DAYS} days: valv review sample, then record and finish it")),
    };
    let detection = (verdict(d.detection), format!("detection engine {}; {} alerts raised; SIEM forwarding {}", if d.detection { "on" } else { "OFF ([detect] enabled = false)" }, f.alerts_total, if d.siem { "on" } else { "off" }));
    let backup = recent(now, f.last_backup, BACKUP_DAYS, "backup", "run valv backup (or set [backup] schedule)");
    let drill = recent(now, f.last_drill, DRILL_DAYS, "restore drill", "run valv backup verify FILE --identity KEY");
    let late: Vec<&str> = f.incidents_open.iter().filter(|(_, opened, notified)| notified.is_none() && now - opened > crate::incident::NOTIFY_WITHIN_MS).map(|(id, _, _)| id.as_str()).collect();
    let breach = (verdict(late.is_empty()), if late.is_empty() {
        format!("{} incidents open, none past 72 hours without notification; {} closed", f.incidents_open.len(), f.incidents_closed)
    } else {
        format!("incidents past 72 hours without notification: {}", late.join(", "))
    });
    let overdue_erasures = f.erasures_pending.iter().filter(|t| now - **t > ERASURE_DAYS * DAY).count();
    let erasure = (verdict(overdue_erasures == 0), format!("erasure destroys the patient's data key; {} requests pending, {overdue_erasures} over {ERASURE_DAYS} days", f.erasures_pending.len()));

    add("HIPAA 164.312(a)(1)", "Access control", (Status::Pass, "need-to-know policy (role, care relationship, consent, blocks), default deny; every decision audited".into()));
    add("HIPAA 164.312(a)(2)(i)", "Unique user identification", (Status::Pass, format!("{} individual accounts and {} named service keys; no shared logins", f.people, f.api_keys)));
    add("HIPAA 164.312(a)(2)(ii)", "Emergency access procedure", emergency.clone());
    add("HIPAA 164.312(a)(2)(iii)", "Automatic logoff", logoff.clone());
    add("HIPAA 164.312(a)(2)(iv)", "Encryption and decryption", keys.clone());
    add("HIPAA 164.312(b)", "Audit controls", audit.clone());
    add("HIPAA 164.312(c)(1)", "Integrity", and((Status::Pass, "records sealed with AEAD bound to type, id and version; audit log a signed Merkle tree".into()), verify.clone()));
    add("HIPAA 164.312(d)", "Person or entity authentication", mfa.clone());
    add("HIPAA 164.312(e)(1)", "Transmission security", tls.clone());
    add("HIPAA 164.308(a)(1)(ii)(D)", "Information system activity review", and(review.clone(), detection.clone()));
    add("HIPAA 164.308(a)(5)(ii)(C)", "Log-in monitoring", and(detection.clone(), lockout.clone()));
    add("HIPAA 164.308(a)(7)", "Contingency plan (backup, restore tested)", and(backup.clone(), drill.clone()));
    add("GDPR Art. 5(1)(f)", "Integrity and confidentiality", and(and(keys.clone(), tls.clone()), audit.clone()));
    add("GDPR Art. 15", "Right of access", (Status::Pass, "patients read their record and who accessed it (Patient/$access-log); exports to their key".into()));
    add("GDPR Art. 17", "Right to erasure", erasure);
    add("GDPR Art. 20", "Data portability", (Status::Pass, "FHIR export of a patient's record, encrypted to the recipient's age key".into()));
    add("GDPR Art. 25", "Data protection by design and by default", (Status::Pass, format!("default deny; audit entries and alerts carry ids, never content; records kept {} years then erasable", d.retention_years)));
    add("GDPR Art. 32", "Security of processing", and(and(mfa.clone(), keys.clone()), and(backup.clone(), drill.clone())));
    add("GDPR Art. 33", "Notification of a breach to the supervisory authority", breach.clone());
    add("GDPR Art. 34", "Communication of a breach to the patients", (breach.0, format!("affected patients computed from the audit log and recorded at the notify stage; {}", breach.1)));
    add("HSLF-FS 2016:40 3 kap.", "Authentication and access control", and(mfa, (Status::Pass, "access by role, care relationship, consent and blocks; break-glass reviewed".into())));
    add("HSLF-FS 2016:40 4 kap. 9 §", "Systematic and recurrent log review", review);
    let operator: [(&'static str, &'static str); 6] = [
        ("HIPAA 164.308(a)(1)(ii)(A)", "Risk analysis"),
        ("HIPAA 164.308(a)(5)(i)", "Security awareness and training"),
        ("HIPAA 164.308(b)(1)", "Business associate contracts"),
        ("HIPAA 164.310", "Physical safeguards (facility, workstations, media)"),
        ("GDPR Art. 30", "Records of processing activities"),
        ("GDPR Art. 35", "Data protection impact assessment"),
    ];
    for (id, title) in operator {
        add(id, title, (Status::Operator, "outside what Valv can know: the operator documents it".into()));
    }
    let passed = c.iter().filter(|x| x.status == Status::Pass).count();
    let failed = c.iter().filter(|x| x.status == Status::Fail).count();
    Report { time: now, passed, failed, controls: c }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn good() -> Facts {
        Facts {
            deployment: Deployment { session_idle_minutes: 15, session_absolute_hours: 12, lockout_threshold: 5, lockout_minutes: 15, key_provider: "file".into(), detection: true, retention_years: 10, ..Deployment::default() },
            people: 3,
            people_with_mfa: 3,
            data_keys: 10,
            oldest_wrap: Some(NOW - 10 * DAY),
            audit_size: 100,
            checkpoint_size: Some(99),
            last_verify: Some((50, NOW - DAY)),
            last_backup: Some((60, NOW - DAY)),
            last_drill: Some((61, NOW - DAY)),
            reviews_finished: vec![NOW - 2 * DAY],
            ..Facts::default()
        }
    }

    fn status(r: &Report, id: &str) -> Status {
        r.controls.iter().find(|c| c.id == id).map(|c| c.status).expect(id)
    }

    #[test]
    fn a_deployment_that_did_its_duties_passes_every_control_it_can_know() {
        let r = evaluate(&good(), NOW);
        assert_eq!(r.failed, 0, "{:#?}", r.controls.iter().filter(|c| c.status == Status::Fail).collect::<Vec<_>>());
        assert!(r.controls.iter().any(|c| c.status == Status::Operator));
    }

    #[test]
    fn each_missing_duty_fails_its_controls() {
        let fresh = Facts { last_verify: None, last_backup: None, last_drill: None, reviews_finished: vec![], ..good() };
        let r = evaluate(&fresh, NOW);
        for id in ["HIPAA 164.308(a)(7)", "HSLF-FS 2016:40 4 kap. 9 §", "HIPAA 164.308(a)(1)(ii)(D)", "HIPAA 164.312(b)", "GDPR Art. 32"] {
            assert_eq!(status(&r, id), Status::Fail, "{id}");
        }
        let stale = Facts { last_backup: Some((1, NOW - 8 * DAY)), ..good() };
        assert_eq!(status(&evaluate(&stale, NOW), "HIPAA 164.308(a)(7)"), Status::Fail);
        let no_mfa = Facts { people_with_mfa: 2, ..good() };
        assert_eq!(status(&evaluate(&no_mfa, NOW), "HIPAA 164.312(d)"), Status::Fail);
        let late = Facts { incidents_open: vec![("i1".into(), NOW - 73 * 3_600_000, None)], ..good() };
        assert_eq!(status(&evaluate(&late, NOW), "GDPR Art. 33"), Status::Fail);
        let notified = Facts { incidents_open: vec![("i1".into(), NOW - 100 * 3_600_000, Some(NOW - 90 * 3_600_000))], ..good() };
        assert_eq!(status(&evaluate(&notified, NOW), "GDPR Art. 33"), Status::Pass);
        let idle = Facts { deployment: Deployment { session_idle_minutes: 240, ..good().deployment }, ..good() };
        assert_eq!(status(&evaluate(&idle, NOW), "HIPAA 164.312(a)(2)(iii)"), Status::Fail);
        let unrotated = Facts { keys_not_current: 3, ..good() };
        assert_eq!(status(&evaluate(&unrotated, NOW), "HIPAA 164.312(a)(2)(iv)"), Status::Fail);
        let bg = Facts { break_glass_pending: vec![NOW - 8 * DAY], ..good() };
        assert_eq!(status(&evaluate(&bg, NOW), "HIPAA 164.312(a)(2)(ii)"), Status::Fail);
        let off = Facts { deployment: Deployment { detection: false, ..good().deployment }, ..good() };
        assert_eq!(status(&evaluate(&off, NOW), "HIPAA 164.308(a)(5)(ii)(C)"), Status::Fail);
    }
}
