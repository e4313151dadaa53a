//! `valv review …` and `valv incident …`: the systematic log review and incident handling at
//! the console, as the operator (agent `local-operator`, audited like the API's
//! `/admin/reviews` and `/admin/incidents`, which run the same code).

use crate::datadir;
use clap::Subcommand;
use std::path::Path;
use valv_server::error::ApiError;
use valv_server::oversight::{incidents, instant, reviews, Actor};

#[derive(Subcommand)]
pub enum ReviewAction {
    /// Draw a new review: a seeded random sample of the unit's patient accesses in [from, to)
    /// plus every access an alert flagged.
    Sample {
        /// The unit (Organization id) whose staff's accesses are reviewed.
        #[arg(long)]
        unit: String,
        /// Start of the period (a FHIR date or instant, e.g. 2026-11-01).
        #[arg(long)]
        from: String,
        /// End of the period (exclusive).
        #[arg(long)]
        to: String,
        /// Accesses drawn at random (1 to 10000).
        #[arg(long)]
        size: usize,
        /// The seed, to draw a recorded sample again (random when left out; always recorded).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// List reviews.
    List,
    /// Show a review with its items (JSON).
    Show { id: String },
    /// Record the outcome of one item (the access's audit entry index).
    Record {
        id: String,
        #[arg(long)]
        entry: u64,
        /// justified, not-justified or needs-follow-up.
        #[arg(long)]
        verdict: String,
        /// Why (required unless justified).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Finish a review whose every item has an outcome.
    Finish { id: String },
}

#[derive(Subcommand)]
pub enum IncidentAction {
    /// Open an incident, from alerts or by hand.
    Open {
        #[arg(long)]
        title: String,
        /// low, medium or high.
        #[arg(long)]
        severity: String,
        /// What is known so far.
        #[arg(long)]
        note: String,
        /// An alert it comes from (repeat for more): its subject joins the incident.
        #[arg(long = "alert")]
        alerts: Vec<String>,
        /// account:<user id>, key:<API key id> or address:<IP> (repeat for more).
        #[arg(long = "subject")]
        subjects: Vec<String>,
        /// When it began (default: the alerts' earliest evidence).
        #[arg(long)]
        from: Option<String>,
    },
    /// List incidents with their stage and notification deadline.
    List,
    /// Show an incident (JSON).
    Show { id: String },
    /// The patients the incident's subjects reached in its period (from the audit log).
    Patients { id: String },
    /// Enter the next stage: contain, recover, notify, closed.
    Stage {
        id: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        note: String,
        /// Lessons learned (required to close).
        #[arg(long)]
        lessons: Option<String>,
    },
    /// Take a containment action: lock-account, end-sessions, revoke-key, block-address.
    Act {
        id: String,
        #[arg(long)]
        action: String,
        /// account:<user id>, key:<API key id> or address:<IP>.
        #[arg(long)]
        target: String,
    },
    /// Lift the block of an address (taken from an incident).
    Unblock { address: String },
}

/// `valv compliance`: the report, and an error (exit code 1) when a control fails.
pub async fn compliance(dir: &Path, format: &str) -> Result<(), String> {
    if format != "text" && format != "json" {
        return Err(format!("--format is text or json, not '{format}'"));
    }
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Serve).await?;
    let app = &opened.app;
    let actor = Actor::console().map_err(|e| e.diagnostics)?;
    let found = valv_server::oversight::compliance::report(app).await.map(|r| {
        let why = format!("compliance report at the console: {} passed, {} failed", r.passed, r.failed);
        (r, why)
    });
    let report = actor.audited(app, "compliance-read", ("", ""), found).await.map_err(|e| e.diagnostics)?;
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        println!("{}", valv_server::oversight::compliance::to_text(&report));
    }
    if report.failed > 0 {
        return Err(format!("{} controls fail", report.failed));
    }
    Ok(())
}

fn pretty(v: &serde_json::Value) -> Result<String, String> {
    serde_json::to_string_pretty(v).map_err(|e| e.to_string())
}

pub async fn review(dir: &Path, action: ReviewAction) -> Result<(), String> {
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Serve).await?;
    let app = &opened.app;
    let actor = Actor::console().map_err(|e| e.diagnostics)?;
    let out = review_act(app, &actor, action).await;
    println!("{}", out.map_err(|e| e.diagnostics)?);
    Ok(())
}

async fn review_act(app: &valv_server::App, actor: &Actor, action: ReviewAction) -> Result<String, ApiError> {
    const R: &str = "Review";
    match action {
        ReviewAction::Sample { unit, from, to, size, seed } => {
            let new = reviews::NewReview { unit, from: instant(&from, "--from")?, to: instant(&to, "--to")?, size, seed };
            let id = valv_server::oversight::new_record_id()?;
            let done = reviews::create(app, actor, &id, new).await;
            Ok(actor.audited(app, "review-create", (R, &id), done.map(|(_, why)| (why.clone(), why))).await?)
        }
        ReviewAction::List => {
            let all = actor.audited(app, "review-read", (R, ""), reviews::list(app).await.map(|l| { let n = l.len(); (l, format!("{n} reviews listed at the console")) })).await?;
            let lines: Vec<String> = all.iter().map(|r| {
                let state = r.finished.as_ref().map_or_else(|| format!("{} open", r.tally().open), |f| format!("finished {}", valv_fhir::date::format_instant(f.at)));
                format!("{}  unit {:<16} {} .. {}  {} items of {} accesses  seed {}  {state}", r.id, r.scope.unit, valv_fhir::date::format_instant(r.scope.from), valv_fhir::date::format_instant(r.scope.to), r.items.len(), r.population, r.scope.seed)
            }).collect();
            Ok(if lines.is_empty() { "no reviews".into() } else { lines.join("\n") })
        }
        ReviewAction::Show { id } => {
            let (review, _) = actor.audited(app, "review-read", (R, &id), reviews::get(app, &id).await.map(|r| (r, format!("review {id} read at the console")))).await?;
            pretty(&reviews::to_json(&review)).map_err(ApiError::internal)
        }
        ReviewAction::Record { id, entry, verdict, note } => {
            let done = reviews::record(app, actor, &id, entry, &verdict, &note).await;
            let (review, why) = actor.audited(app, "review-record", (R, &id), done.map(|(r, why)| ((r, why.clone()), why))).await?;
            Ok(format!("{why} ({})", review.tally()))
        }
        ReviewAction::Finish { id } => {
            let done = reviews::finish(app, actor, &id).await;
            Ok(actor.audited(app, "review-finish", (R, &id), done.map(|(_, why)| (why.clone(), why))).await?)
        }
    }
}

pub async fn incident(dir: &Path, action: IncidentAction) -> Result<(), String> {
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Serve).await?;
    let app = &opened.app;
    let actor = Actor::console().map_err(|e| e.diagnostics)?;
    let out = incident_act(app, &actor, action).await;
    println!("{}", out.map_err(|e| e.diagnostics)?);
    Ok(())
}

async fn incident_act(app: &valv_server::App, actor: &Actor, action: IncidentAction) -> Result<String, ApiError> {
    const I: &str = "Incident";
    let now = app.clock.now_ms();
    match action {
        IncidentAction::Open { title, severity, note, alerts, subjects, from } => {
            let from = from.map(|f| instant(&f, "--from")).transpose()?;
            let id = valv_server::oversight::new_record_id()?;
            let done = incidents::open(app, actor, &id, incidents::NewIncident { title, severity, note, alerts, subjects, from }).await;
            let incident = actor.audited(app, "incident-open", (I, &id), done).await?;
            let c = incident.clock(now);
            Ok(format!("incident {} opened; notify by {} (GDPR Art. 33)", incident.id, valv_fhir::date::format_instant(c.notify_by)))
        }
        IncidentAction::List => {
            let all = actor.audited(app, "incident-read", (I, ""), incidents::list(app).await.map(|l| { let n = l.len(); (l, format!("{n} incidents listed at the console")) })).await?;
            let lines: Vec<String> = all.iter().map(|i| {
                let c = i.clock(now);
                let clock = if c.stopped_at.is_some() { "notified".to_string() } else if c.overdue() { "NOTIFICATION OVERDUE".into() } else { format!("{:.1} h to notify", c.remaining_ms as f64 / 3.6e6) };
                format!("{}  {:<6} {:<8} opened {}  {clock}  {}", i.id, i.severity, i.stage.as_str(), valv_fhir::date::format_instant(i.opened_at()), i.title)
            }).collect();
            Ok(if lines.is_empty() { "no incidents".into() } else { lines.join("\n") })
        }
        IncidentAction::Show { id } => {
            let (incident, _) = actor.audited(app, "incident-read", (I, &id), incidents::get(app, &id).await.map(|i| (i, format!("incident {id} read at the console")))).await?;
            pretty(&incidents::to_json(&incident, now)).map_err(ApiError::internal)
        }
        IncidentAction::Patients { id } => {
            let found = incidents::list_patients(app, actor, &id).await;
            let patients = actor.audited(app, "incident-read", (I, &id), found.map(|p| { let n = p.len(); (p, format!("incident {id}: {n} affected patients listed at the console")) })).await?;
            Ok(patients.into_iter().collect::<Vec<_>>().join("\n"))
        }
        IncidentAction::Stage { id, to, note, lessons } => {
            let stage = valv_oversight::incident::Stage::parse(&to)?;
            let done = incidents::advance(app, actor, &id, stage, &note, lessons.as_deref()).await;
            Ok(actor.audited(app, incidents::stage_interaction(stage), (I, &id), done.map(|(_, why)| (why.clone(), why))).await?)
        }
        IncidentAction::Act { id, action, target } => {
            let kind = valv_oversight::incident::ActionKind::parse(&action)?;
            let done = incidents::act(app, actor, &id, kind, &target).await;
            Ok(actor.audited(app, "incident-action", (I, &id), done.map(|(_, why)| (why.clone(), why))).await?)
        }
        IncidentAction::Unblock { address } => {
            let ip = address.parse().map_err(|_| ApiError::bad_request(format!("'{address}' is not an IP address")))?;
            let done = valv_server::oversight::blocks::lift(app, actor, ip).await;
            Ok(actor.audited(app, "incident-action", (I, ""), done.map(|why| (why.clone(), why))).await?)
        }
    }
}
