//! Valv's access decision: may this person or service take this action on this patient's data
//! of this type, now, for this purpose? The answer is computed in two steps:
//!
//! 1. facts, in Rust, from the [`Directory`] (care teams, consents, organisations), the caller's
//!    grants (break-glass, remote support) and their SMART scopes — cheap lookups keyed by the
//!    one patient the request is about;
//! 2. the verdict, in Cedar, from the policies in force over those facts (`engine`).
//!
//! The decision names the policies behind it; the server writes them into the audit entry.
//! Pure: no I/O, no clock (the time is part of the question).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod change;
pub mod classes;
pub mod directory;
pub mod engine;
pub mod purpose;
pub mod scope;

pub use directory::Directory;
pub use engine::{Engine, Facts, PolicyFile, PolicyInfo, Target, Verdict};
pub use scope::Scopes;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy schema cannot be loaded: {0}")]
    Schema(String),
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("the policies do not validate against the schema: {0}")]
    Invalid(String),
    #[error("policy evaluation failed: {0}")]
    Evaluation(String),
}

/// What a request does to FHIR data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Read,
    VRead,
    Search,
    History,
    Create,
    Update,
    Delete,
}

impl Action {
    pub const ALL: [Action; 7] = [Action::Read, Action::VRead, Action::Search, Action::History, Action::Create, Action::Update, Action::Delete];

    pub fn cedar_name(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::VRead => "vread",
            Action::Search => "search",
            Action::History => "history",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.cedar_name() == s)
    }

    /// The SMART v2 permission letter.
    pub fn scope_letter(self) -> char {
        match self {
            Action::Read | Action::VRead | Action::History => 'r',
            Action::Search => 's',
            Action::Create => 'c',
            Action::Update => 'u',
            Action::Delete => 'd',
        }
    }

    /// The audit code (BALP/DICOM C R U D E).
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read | Action::VRead | Action::History => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Search => "E",
        }
    }
}

/// Roles whose people are staff of a care provider (care units, cross-provider rules).
pub const CARE_ROLES: &[&str] = &["physician", "nurse", "assistant", "external_specialist", "registrar"];

/// What the caller is, as far as policy cares.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub roles: Vec<String>,
    /// The Practitioner resource this person is.
    pub practitioner: Option<String>,
    /// The Patient resource this person is (the `patient` role).
    pub patient: Option<String>,
    /// Care units: Organization ids.
    pub units: Vec<String>,
    /// SMART scopes of the token or key; `None` when the credential carries none.
    pub scopes: Option<Scopes>,
    /// The caller's grants (any state; only approved, unexpired ones count).
    pub grants: Vec<Grant>,
    /// A service account (API key, client certificate): its scopes speak `system/`.
    pub is_service: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantKind {
    /// Emergency access to one patient.
    BreakGlass { patient: String },
    /// Remote support: named patients, or administration (`patients` empty).
    Support { patients: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub id: String,
    pub kind: GrantKind,
    /// Approved (break-glass grants are approved when made).
    pub approved: bool,
    pub revoked: bool,
    pub start: i64,
    pub end: i64,
}

impl Grant {
    pub fn in_force(&self, now: i64) -> bool {
        self.approved && !self.revoked && self.start <= now && now < self.end
    }
}

/// The malware-scan statuses a stored file has (`Question::file_scan`).
pub const FILE_SCANS: &[&str] = &["pending", "clean", "unscanned", "infected", "unscannable", "failed"];

/// One question to decide.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub action: Action,
    pub resource_type: &'a str,
    /// The patient whose compartment the resource is in; `None` outside any compartment.
    pub patient: Option<&'a str>,
    pub now: i64,
    pub purpose: &'a str,
    /// When the question is about a stored file's bytes (a raw read, range read, ticket or
    /// inline `data`): its malware-scan status (`pending`, `clean`, `unscanned`, `infected`,
    /// `unscannable`, `failed`). Policies see it as `context.file_scan` (`""` otherwise).
    pub file_scan: Option<&'a str>,
}

/// Settings that change facts, not rules.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Break-glass may override a patient's block (PdL allows it in emergencies only).
    pub break_glass_overrides_block: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { break_glass_overrides_block: true }
    }
}

/// The outcome, with everything the audit entry and an explanation need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub permit: bool,
    /// The policies behind the verdict (see [`Verdict::rules`]).
    pub rules: Vec<String>,
    /// The grant this access rests on, when it rests on one (break-glass or support).
    pub grant: Option<String>,
    /// True when the access rests on a break-glass grant (purpose of use `BTG` in the audit).
    pub break_glass: bool,
    pub facts: Facts,
    pub error: Option<String>,
}

impl Decision {
    /// One line for the audit entry: `permit: clinical-read` or `deny: patient-block`.
    pub fn reason(&self) -> String {
        let verb = if self.permit { "permit" } else { "deny" };
        let rules = if self.rules.is_empty() { "no-policy-permits".to_string() } else { self.rules.join(",") };
        match &self.grant {
            Some(g) => format!("{verb}: {rules} (grant {g})"),
            None => format!("{verb}: {rules}"),
        }
    }
}

fn covers(g: &Grant, patient: Option<&str>, now: i64) -> bool {
    g.in_force(now)
        && match (&g.kind, patient) {
            (GrantKind::BreakGlass { patient: p }, Some(q)) => p == q,
            (GrantKind::Support { patients }, Some(q)) => patients.iter().any(|p| p == q),
            (GrantKind::Support { patients }, None) => patients.is_empty(),
            (GrantKind::BreakGlass { .. }, None) => false,
        }
}

/// The facts of one question, from the directory and the caller.
pub fn facts(dir: &Directory, subject: &Subject, q: &Question<'_>, settings: Settings) -> Facts {
    let has = |r: &str| subject.roles.iter().any(|x| x == r);
    let mut f = Facts {
        patient_data: q.patient.is_some(),
        break_glass_overrides_block: settings.break_glass_overrides_block,
        purpose: q.purpose.to_string(),
        file_scan: q.file_scan.unwrap_or_default().to_string(),
        ..Facts::default()
    };
    if has("service") && !subject.is_service {
        // `service` is a role for machines (keys, certificates); a person holding it (from a
        // provider's roles claim) gets no service permissions through `user/` scopes.
        f.has_scopes = true;
        return f;
    }
    if let Some(scopes) = &subject.scopes {
        f.has_scopes = true;
        let contexts: &[scope::Context] = if subject.is_service {
            &[scope::Context::System]
        } else if has("patient") {
            &[scope::Context::Patient, scope::Context::User]
        } else {
            &[scope::Context::User]
        };
        f.token_allows = scopes.allows(contexts, q.resource_type, q.action);
    }
    let Some(patient) = q.patient else {
        f.support_grant = subject.grants.iter().any(|g| matches!(g.kind, GrantKind::Support { .. }) && covers(g, None, q.now));
        return f;
    };
    f.self_access = subject.patient.as_deref() == Some(patient);
    f.break_glass = subject.grants.iter().any(|g| matches!(g.kind, GrantKind::BreakGlass { .. }) && covers(g, Some(patient), q.now));
    f.support_grant = subject.grants.iter().any(|g| matches!(g.kind, GrantKind::Support { .. }) && covers(g, Some(patient), q.now));
    if subject.practitioner.is_some() || !subject.units.is_empty() {
        let actors = dir.actors(subject.practitioner.as_deref(), &subject.units);
        let r = dir.relation(&actors, &subject.units, patient, q.resource_type, q.now);
        f.care_active = r.care_active;
        f.consultant = r.consultant;
        f.block = r.block;
        f.consent_permit = r.consent_permit;
        f.unverified = r.unverified;
        f.same_provider = !subject.units.is_empty() && dir.managing_provider(patient).is_none_or(|p| subject.units.iter().any(|u| dir.provider_of(u) == p));
        f.cross_org = r.cross_org && !subject.units.is_empty() && subject.roles.iter().any(|r| CARE_ROLES.contains(&r.as_str())) && !f.self_access;
    } else if subject.roles.iter().any(|r| CARE_ROLES.contains(&r.as_str())) {
        // Staff with no unit belong to no known care provider, so the cross-provider rule has
        // nothing to compare; they reach a patient only through a care team naming them, which
        // the patient's own provider keeps (a referral, in effect).
        f.unverified = dir.relation(&[], &[], patient, q.resource_type, q.now).unverified;
    }
    f
}

/// The grant an access under `verdict` rests on, if it rests on one.
fn grant_used(engine: &Engine, subject: &Subject, q: &Question<'_>, verdict: &Verdict, f: &Facts) -> Option<(String, bool)> {
    if !verdict.permit {
        return None;
    }
    let by_grant = |kind: &str| verdict.rules.iter().all(|r| engine.policy(r).and_then(|p| p.grant.as_deref()) == Some(kind));
    let find = |bg: bool| {
        subject
            .grants
            .iter()
            .find(|g| matches!(g.kind, GrantKind::BreakGlass { .. }) == bg && covers(g, q.patient, q.now))
            .map(|g| g.id.clone())
    };
    // A block lifted by break-glass makes the access a break-glass access whatever else permits.
    if f.break_glass && (by_grant("break-glass") || f.block || f.cross_org) {
        return find(true).map(|g| (g, true));
    }
    if f.support_grant && by_grant("support") {
        return find(false).map(|g| (g, false));
    }
    None
}

/// Decides one question.
pub fn decide(engine: &Engine, dir: &Directory, subject: &Subject, q: &Question<'_>, settings: Settings) -> Decision {
    let f = facts(dir, subject, q, settings);
    let verdict = engine.evaluate(&subject.roles, Some(q.action), Target::Type(q.resource_type), &f);
    let used = grant_used(engine, subject, q, &verdict, &f);
    Decision {
        permit: verdict.permit,
        rules: verdict.rules,
        break_glass: used.as_ref().is_some_and(|(_, bg)| *bg),
        grant: used.map(|(g, _)| g),
        facts: f,
        error: verdict.error,
    }
}

/// Whether the caller could see data of this type for *some* patient: decides a type-level
/// search or history before its results are filtered one patient at a time. Relationship facts
/// are taken at their most favourable; scopes, roles and purpose are real.
pub fn may_search(engine: &Engine, subject: &Subject, q: &Question<'_>, settings: Settings) -> Decision {
    let mut f = facts(&Directory::default(), subject, &Question { patient: None, ..*q }, settings);
    if valv_fhir::compartment::is_patient_data_type(q.resource_type) {
        f.patient_data = true;
        f.care_active = true;
        f.consultant = true;
        f.self_access = subject.patient.is_some();
        f.consent_permit = true;
        f.break_glass = subject.grants.iter().any(|g| matches!(g.kind, GrantKind::BreakGlass { .. }) && g.in_force(q.now));
        f.support_grant = subject.grants.iter().any(|g| matches!(&g.kind, GrantKind::Support { patients } if !patients.is_empty()) && g.in_force(q.now));
    }
    let verdict = engine.evaluate(&subject.roles, Some(q.action), Target::Type(q.resource_type), &f);
    Decision { permit: verdict.permit, rules: verdict.rules, grant: None, break_glass: false, facts: f, error: verdict.error }
}

/// Decides an administrative request (`area`: `users`, `support-grants`, `support-request`,
/// `break-glass-review`).
pub fn decide_admin(engine: &Engine, subject: &Subject, area: &str, now: i64, purpose: &str) -> Decision {
    let mut f = Facts { purpose: purpose.to_string(), ..Facts::default() };
    f.support_grant = subject.grants.iter().any(|g| covers(g, None, now) && matches!(g.kind, GrantKind::Support { .. }));
    if subject.scopes.is_some() {
        f.has_scopes = true;
    }
    let verdict = engine.evaluate(&subject.roles, None, Target::Area(area), &f);
    let grant = (verdict.permit && verdict.rules.iter().all(|r| engine.policy(r).and_then(|p| p.grant.as_deref()) == Some("support")))
        .then(|| subject.grants.iter().find(|g| covers(g, None, now)).map(|g| g.id.clone()))
        .flatten();
    Decision { permit: verdict.permit, rules: verdict.rules, grant, break_glass: false, facts: f, error: verdict.error }
}

#[cfg(test)]
mod tests;
