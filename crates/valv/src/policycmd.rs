//! `valv policy validate` and `valv policy explain`: check operators' Cedar policies against the
//! schema, and show the decision for one question with the rules and facts behind it.

use crate::config::{self, Config};
use crate::datadir;
use std::path::Path;
use valv_policy::{Action, Question};

/// Validates the policy set the server would load (or the one `dir` would make) and lists it.
pub fn validate(data_dir: &Path, dir: Option<&Path>, replace_defaults: Option<bool>) -> Result<(), String> {
    let mut policy = if datadir::is_initialised(data_dir) { Config::load(data_dir)?.policy } else { config::PolicyConfig::default() };
    if let Some(d) = dir {
        policy.dir = Some(std::path::absolute(d).map_err(|e| format!("{}: {e}", d.display()))?);
    }
    if let Some(r) = replace_defaults {
        policy.replace_defaults = r;
    }
    let engine = policy.engine(data_dir)?;
    let from_files = engine.policies().iter().filter(|p| p.origin != "default").count();
    println!("valid: {} policies ({} from files), checked against the Valv schema", engine.policies().len(), from_files);
    for p in engine.policies() {
        let effect = if p.forbid { "forbid" } else { "permit" };
        println!("  {effect:<6} {:<32} {:<14} {}", p.id, p.origin, p.reason);
    }
    Ok(())
}

pub struct ExplainArgs {
    pub user: String,
    pub patient: Option<String>,
    pub action: String,
    pub resource_type: String,
    pub purpose: Option<String>,
    pub file_scan: Option<String>,
}

/// Prints the decision for `args` as the running configuration would make it now, with the
/// rules (and their `@reason`) and the facts it rested on. Audited: it reveals whether a person
/// is in a patient's care.
pub async fn explain(data_dir: &Path, args: ExplainArgs) -> Result<(), String> {
    let action = Action::parse(&args.action).ok_or_else(|| format!("unknown action '{}' (read, vread, search, history, create, update, delete)", args.action))?;
    if !valv_fhir::r4::is_resource_type(&args.resource_type) {
        return Err(format!("'{}' is not a FHIR R4 resource type", args.resource_type));
    }
    if let Some(scan) = args.file_scan.as_deref().filter(|s| !valv_policy::FILE_SCANS.contains(s)) {
        return Err(format!("'{scan}' is not a file scan status ({})", valv_policy::FILE_SCANS.join(", ")));
    }
    if args.file_scan.is_some() && args.resource_type != "Binary" {
        return Err("--file-scan asks about a file's bytes: give --type Binary".into());
    }
    let in_compartment = valv_fhir::compartment::is_patient_data_type(&args.resource_type);
    if in_compartment && args.patient.is_none() {
        return Err(format!("{} is patient data: give --patient", args.resource_type));
    }
    let opened = datadir::open_existing(data_dir, valv_store::sqlite::Access::Serve).await?;
    let app = &opened.app;
    let now = app.clock.now_ms();
    let user = app.identity.get(&args.user).await.map_err(|e| e.diagnostics)?;
    let principal = valv_server::people::auth::user_principal(&user);
    let purpose = match args.purpose {
        Some(p) if valv_policy::purpose::is_known(&p) => p,
        Some(p) => return Err(format!("'{p}' is not an HL7 PurposeOfUse code (e.g. TREAT, ETREAT, HOPERAT, PATRQT)")),
        None => valv_policy::purpose::default_for(&principal.roles).to_string(),
    };
    let patient = if in_compartment { args.patient.as_deref() } else { None };
    let question = Question { action, resource_type: &args.resource_type, patient, now, purpose: &purpose, file_scan: args.file_scan.as_deref() };
    let decision = app.access.decide(&app.access.subject(&principal), &question);
    let detail = format!("policy-explain {} {} patient {}: {}", action.cedar_name(), args.resource_type, patient.unwrap_or("-"), decision.reason());
    valv_server::people::api::audit_local(app, "policy-explain", Some(&user), detail, now).await.map_err(|e| e.diagnostics)?;

    println!("decision: {}", if decision.permit { "PERMIT" } else { "DENY" });
    println!("question: {} {} {} of patient {} (purpose {purpose})", user.username, action.cedar_name(), args.resource_type, patient.unwrap_or("-"));
    println!("reason:   {}", decision.reason());
    if let Some(err) = &decision.error {
        println!("error:    {err} (an evaluation error denies)");
    }
    println!("rules:");
    if decision.rules.is_empty() {
        println!("  (none: no policy permits this, so it is denied)");
    }
    for id in &decision.rules {
        match app.access.engine.policy(id) {
            Some(p) => println!("  {} {id} [{}]: {}", if p.forbid { "forbid" } else { "permit" }, p.origin, p.reason),
            None => println!("  {id}"),
        }
    }
    println!("facts:    {}", decision.facts.describe().join(" "));
    println!("subject:  roles {} units [{}] practitioner {}", principal.roles.join(","), principal.units.join(","), principal.practitioner.as_deref().unwrap_or("-"));
    Ok(())
}
