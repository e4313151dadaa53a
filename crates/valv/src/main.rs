//! The `valv` command: serve the API, initialise a data directory, manage API keys, generate
//! synthetic patients and import FHIR bundles.

mod alerts;
mod backup;
mod certificate;
mod config;
mod datadir;
mod erase;
mod export;
mod import;
mod oversight;
mod keys;
mod policycmd;
mod restore;
mod schedule;
mod synth;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "valv", version, about = "Valv: a FHIR R4 patient-record server with encryption at rest, audit and access control built in")]
struct Cli {
    /// The data directory (configuration, database, keys, certificates, audit log).
    #[arg(long, global = true, env = "VALV_DATA_DIR", default_value = "./valv-data")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTPS (initialising the data directory on first start).
    Serve {
        /// Also load synthetic demo patients if the store has none.
        #[arg(long)]
        demo: bool,
        /// Listen address (overrides the configuration).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Create the data directory as first start does, without serving.
    Init,
    /// Bring the database's schema to this version (PostgreSQL: run as the role that owns the
    /// schema; --serving-role names the role servers connect as, granted only what serving
    /// needs). SQLite is migrated whenever it is opened.
    Migrate {
        #[arg(long)]
        serving_role: Option<String>,
    },
    /// Manage API keys for service accounts.
    Apikey {
        #[command(subcommand)]
        action: ApikeyAction,
    },
    /// Manage people's accounts (only admins, or the operator at this console, can).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Write synthetic patients as FHIR transaction bundles (never real data).
    Synth {
        #[arg(long, default_value_t = 10)]
        patients: usize,
        #[arg(long)]
        out: PathBuf,
        /// Seed for reproducible output (random when left out).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Verify the audit log, or print an inclusion proof.
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// List the detection engine's alerts, newest first (docs/DETECTION.md).
    Alerts {
        /// How many (1 to 10000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Systematic review of the access log (HSLF-FS 2016:40 4 kap. 9 §; docs/DETECTION.md).
    Review {
        #[command(subcommand)]
        action: oversight::ReviewAction,
    },
    /// Incidents: open, contain, recover, notify, close (GDPR Art. 33–34; docs/DETECTION.md).
    Incident {
        #[command(subcommand)]
        action: oversight::IncidentAction,
    },
    /// Report each HIPAA, GDPR and HSLF-FS control's state in this deployment, with evidence;
    /// exits non-zero when a control fails (docs/COMPLIANCE.md).
    Compliance {
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Check access policies, or explain one decision.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Import FHIR transaction or batch bundles (e.g. Synthea output), each file atomically.
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Erase a patient by destroying their data key (crypto-shredding); recorded in the audit
    /// log and the signed erasure ledger.
    Erase {
        /// The Patient's id.
        #[arg(long)]
        patient: String,
        /// The legal basis (e.g. the patient's request under GDPR Art. 17 and its reference).
        #[arg(long)]
        reason: String,
        /// Erase although a configured retention duty still covers the records, for this reason.
        #[arg(long)]
        override_retention: Option<String>,
    },
    /// Export a patient's record (FHIR NDJSON, access log with proofs), age-encrypted to the
    /// recipients: for the patient's right of access and to data portability.
    Export {
        /// The Patient's id.
        #[arg(long)]
        patient: String,
        /// An age X25519 recipient (age1…); repeat for several.
        #[arg(long = "recipient", required = true)]
        recipients: Vec<String>,
        /// The file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write an encrypted backup of the data directory (while the server serves), or verify one.
    #[command(args_conflicts_with_subcommands = true)]
    Backup {
        #[command(subcommand)]
        action: Option<BackupAction>,
        /// The file to write (must not exist); the erasure ledger is written beside it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// An age X25519 recipient (age1…); repeat for several. Default: [backup] recipients.
        #[arg(long = "recipient")]
        recipients: Vec<String>,
        /// CPU niceness to run at (0–19): a backup is background work and yields to the server.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
        nice: i32,
    },
    /// Restore a backup into the (new or empty) data directory, checking it whole and
    /// re-applying every erasure of the ledger; with --drill, into a temporary place, recorded
    /// in the data directory's audit log.
    Restore {
        file: PathBuf,
        /// The age identity file (AGE-SECRET-KEY-1…) the backup is encrypted to.
        #[arg(long)]
        identity: PathBuf,
        /// The newest erasure ledger (default: erasure-ledger beside FILE).
        #[arg(long)]
        ledger: Option<PathBuf>,
        #[arg(long)]
        drill: bool,
    },
    /// Key-encryption keys: status, rotation, retirement of old versions.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
}

#[derive(Subcommand)]
enum BackupAction {
    /// A restore drill of FILE into a temporary place; the result is recorded in the audit log.
    Verify {
        file: PathBuf,
        #[arg(long)]
        identity: PathBuf,
        /// The newest erasure ledger (default: erasure-ledger beside FILE).
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// The provider, its KEK versions, how many data keys each wraps, key ages.
    Status {
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Adds a KEK version and makes it current; a running server rewraps every data key under
    /// it in the background (as does the next start).
    Rotate {
        /// Rewrap here and return once every data key is under the new version.
        #[arg(long)]
        wait: bool,
        /// Instead of a KEK version: give this patient a new data key and re-seal every version
        /// of their resources under it (one transaction; safe beside a running server).
        #[arg(long)]
        patient: Option<String>,
        /// Instead of a KEK version: add a checkpoint-signing key for the audit log (a running
        /// server signs with it within 10 s; every earlier key stays published and accepted).
        #[arg(long)]
        signing_key: bool,
    },
    /// Finishes an interrupted rewrap here: every data key not under the current KEK version is
    /// rewrapped under it (no new version).
    Rewrap,
    /// Destroys an old KEK version once no data key is wrapped under it.
    Retire { version: u32 },
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Validate the policy set against the schema: the configured one, or defaults plus --dir.
    Validate {
        /// A directory of *.cedar files (default: policy.dir of the configuration).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Use only the directory's policies, none of the defaults.
        #[arg(long)]
        replace_defaults: bool,
    },
    /// Print the decision for a user, patient, action and resource type now, with its rules and facts.
    Explain {
        #[arg(long)]
        user: String,
        #[arg(long)]
        patient: Option<String>,
        /// read, vread, search, history, create, update or delete.
        #[arg(long, default_value = "read")]
        action: String,
        #[arg(long = "type")]
        resource_type: String,
        /// HL7 PurposeOfUse code (default: the user's role's).
        #[arg(long)]
        purpose: Option<String>,
        /// Ask about a stored file's bytes with this malware-scan status (pending, clean,
        /// unscanned, infected, unscannable, failed): what policies see as `context.file_scan`.
        #[arg(long)]
        file_scan: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Recompute the tree from every stored entry and check every stored checkpoint, plus the
    /// given ones saved earlier (e.g. by an auditor); exit 1 naming each problem found.
    Verify {
        /// A signed checkpoint saved earlier (repeatable).
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
    },
    /// Print entries, decrypted, one per line: `{"index","leaf_hash","entry"}` (jsonl) or RFC 5424
    /// syslog messages as SIEM forwarding sends them (syslog).
    Export {
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// First leaf index to export.
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Re-anchor a log whose stored checkpoints were deleted to a checkpoint kept outside Valv
    /// (it must verify, and the log must still hold what it covers); recorded in the log.
    ReAnchor {
        #[arg(long)]
        checkpoint: PathBuf,
    },
    /// Print a C2SP tlog-proof inclusion receipt for one entry.
    Proof {
        #[arg(long)]
        index: u64,
        /// Tree size to prove against (must have a signed checkpoint); default: the latest.
        #[arg(long)]
        size: Option<u64>,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Create a user; prints a one-time enrollment token (valid 24 h) for the person to set their
    /// password and enroll TOTP. With --password-stdin the password is read from standard input
    /// and the TOTP otpauth:// URI is the last line of output (scripted provisioning).
    Add {
        #[arg(long)]
        username: String,
        /// A role (repeatable): physician, nurse, assistant, external_specialist, patient, support, admin, auditor, service.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// A care unit (repeatable).
        #[arg(long = "unit")]
        units: Vec<String>,
        /// Display name (default: the user name).
        #[arg(long)]
        name: Option<String>,
        /// The Practitioner resource this user is.
        #[arg(long)]
        practitioner: Option<String>,
        /// The Patient resource this user is (role patient).
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Show one user.
    Show { username: String },
    /// Disable a user (no login; sessions end). Users are never deleted.
    Disable { username: String },
    Enable { username: String },
    /// Lift a lockout.
    Unlock { username: String },
    /// Remove the user's TOTP and recovery codes; prints a new enrollment token.
    ResetMfa { username: String },
    /// Replace the user's roles and units (their sessions end).
    SetRoles {
        username: String,
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long = "unit")]
        units: Vec<String>,
    },
    /// End every session of the user.
    RevokeSessions { username: String },
}

#[derive(Subcommand)]
enum ApikeyAction {
    /// Create a key; the key itself is the last line of standard output, shown only once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "service")]
        role: String,
        /// SMART `system/` scopes, space-separated (e.g. 'system/*.cruds', 'system/Observation.rs').
        /// A service key acts only as its scopes say, so it needs them; on other roles they narrow.
        #[arg(long, default_value = "")]
        scope: String,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id or name.
    Revoke { id_or_name: String },
}

/// mimalloc rather than glibc's malloc: a request allocates and frees many small buffers on
/// several threads (bench/README.md, "mimalloc").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: threads inherit the niceness of the one that makes them.
    if let Command::Backup { action: None, nice, .. } = &cli.command {
        if let Err(e) = rustix::process::nice(*nice) {
            return fail(&format!("cannot lower the backup's CPU priority: {e}"));
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("valv: {message}");
    ExitCode::FAILURE
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).with_current_span(false).try_init();
}

fn random_u64() -> Result<u64, String> {
    valv_store::vault::random_bytes::<8>().map(u64::from_le_bytes).map_err(|e| e.to_string())
}

fn today() -> (i32, u32, u32) {
    let (y, m, d) = valv_fhir::date::civil_from_days(valv_server::now_ms().div_euclid(86_400_000));
    (y as i32, m, d)
}

async fn ensure_initialised(dir: &std::path::Path) -> Result<(), String> {
    if !datadir::is_initialised(dir) {
        let key = datadir::init(dir).await?;
        println!("Initialised a new Valv data directory at {}", dir.display());
        println!("Admin API key (shown once; store it in your secret manager now):");
        println!("{key}");
    }
    Ok(())
}

/// `valv migrate`: the schema made or brought up to date, and the serving role's grants.
async fn migrate(dir: &std::path::Path, serving_role: Option<&str>) -> Result<(), String> {
    let cfg = config::Config::load(dir)?;
    if cfg.store.backend != "postgres" {
        if serving_role.is_some() {
            return Err("--serving-role applies to PostgreSQL only (store.backend is sqlite)".into());
        }
        datadir::open_store(dir, &cfg, valv_store::sqlite::Access::Serve).await?;
        println!("SQLite schema is current");
        return Ok(());
    }
    let store = valv_store::postgres::PgStore::open(&cfg.store.postgres(dir)?).await.map_err(|e| e.to_string())?;
    let version = store.migrate(serving_role).await.map_err(|e| e.to_string())?;
    match serving_role {
        Some(role) => println!("PostgreSQL schema at version {version}; role {role} granted what serving needs"),
        None => println!("PostgreSQL schema at version {version}"),
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<(), String> {
    let dir = cli.data_dir;
    match cli.command {
        Command::Init => {
            let key = datadir::init(&dir).await?;
            println!("Initialised a new Valv data directory at {}", dir.display());
            println!("Admin API key (shown once; store it in your secret manager now):");
            println!("{key}");
            Ok(())
        }
        Command::Migrate { serving_role } => migrate(&dir, serving_role.as_deref()).await,
        Command::Serve { demo, listen } => {
            ensure_initialised(&dir).await?;
            // `--listen host:0`: the port the system picks is bound first, so that the public
            // URL (which follows the listen address while `public_url` is unset) names it.
            let picked = match listen.as_deref() {
                Some(addr) if addr.ends_with(":0") => Some(std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?),
                _ => None,
            };
            let listen = match &picked {
                Some(l) => Some(l.local_addr().map_err(|e| e.to_string())?.to_string()),
                None => listen,
            };
            let opened = datadir::open(&dir, listen.as_deref()).await?;
            init_logging(&opened.config.log.level);
            if demo {
                load_demo(&opened).await?;
            }
            serve(opened, picked).await
        }
        Command::Apikey { action } => apikey(&dir, action).await,
        Command::Keys { action } => keys_command(&dir, action).await,
        Command::Backup { action: Some(BackupAction::Verify { file, identity, ledger }), .. } => {
            println!("{}", restore::drill(&restore::Request { file: &file, identity: &identity, ledger: ledger.as_deref() }, &dir).await?);
            Ok(())
        }
        Command::Backup { action: None, out, recipients, .. } => {
            let out = out.ok_or("give --out FILE (or: valv backup verify FILE --identity KEYFILE)")?;
            let opened = datadir::open_existing(&dir, valv_store::sqlite::Access::Serve).await?;
            println!("{}", backup::run(&opened, &out, &recipients).await?);
            Ok(())
        }
        Command::Restore { file, identity, ledger, drill } => {
            let req = restore::Request { file: &file, identity: &identity, ledger: ledger.as_deref() };
            if drill {
                println!("{}", restore::drill(&req, &dir).await?);
            } else {
                let r = restore::restore(&req, &dir).await?;
                println!("{}\n{:.1} s, {:.0} resources/s; sessions were not restored: everyone signs in again", r.summary, r.seconds, r.resources as f64 / r.seconds.max(1e-9));
            }
            Ok(())
        }
        Command::Export { patient, recipients, out } => {
            let opened = datadir::open_existing(&dir, valv_store::sqlite::Access::Scan).await?;
            println!("{}", export::run(&opened, export::Request { patient: &patient, recipients: &recipients, out: &out }).await?);
            Ok(())
        }
        Command::Erase { patient, reason, override_retention } => {
            let opened = datadir::open_existing(&dir, valv_store::sqlite::Access::Serve).await?;
            println!("{}", erase::run(&opened, erase::Request { patient, reason, override_retention }).await?);
            Ok(())
        }
        Command::Audit { action } => audit(&dir, action).await,
        Command::Alerts { limit, json } => alerts::list(&dir, limit, json).await,
        Command::Compliance { format } => oversight::compliance(&dir, &format).await,
        Command::Review { action } => oversight::review(&dir, action).await,
        Command::Incident { action } => oversight::incident(&dir, action).await,
        Command::User { action } => user(&dir, action).await,
        Command::Policy { action: PolicyAction::Validate { dir: policy_dir, replace_defaults } } => {
            policycmd::validate(&dir, policy_dir.as_deref(), replace_defaults.then_some(true))
        }
        Command::Policy { action: PolicyAction::Explain { user, patient, action, resource_type, purpose, file_scan } } => {
            policycmd::explain(&dir, policycmd::ExplainArgs { user, patient, action, resource_type, purpose, file_scan }).await
        }
        Command::Synth { patients, out, seed } => {
            let seed = match seed {
                Some(s) => s,
                None => random_u64()?,
            };
            std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
            let mut rng = synth::SynthRng::new(seed);
            for i in 0..patients {
                let bundle = synth::patient_bundle(&mut rng, today());
                let path = out.join(format!("patient-{:06}.json", i + 1));
                let text = serde_json::to_vec(&bundle).map_err(|e| e.to_string())?;
                std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            println!("wrote {patients} synthetic patient bundles to {} (seed {seed})", out.display());
            Ok(())
        }
        Command::Import { files } => {
            let opened = datadir::open_existing(&dir, valv_store::sqlite::Access::Serve).await?;
            let s = import::run(opened.app.clone(), &files).await;
            println!(
                "imported {} resources from {} of {} files in {:.1} s ({:.0} resources/s); {} rejected",
                s.resources,
                s.files_ok,
                files.len(),
                s.seconds,
                s.resources as f64 / s.seconds.max(1e-9),
                s.rejected.len()
            );
            for (path, why) in &s.rejected {
                println!("rejected {}: {why}", path.display());
            }
            if s.rejected.is_empty() { Ok(()) } else { Err(format!("{} file(s) rejected; a rejected transaction stored nothing", s.rejected.len())) }
        }
    }
}

async fn load_demo(opened: &datadir::Opened) -> Result<(), String> {
    let store = opened.app.vault.store();
    let existing = store
        .search(&valv_store::Filter { resource_type: "Patient".into(), ..Default::default() })
        .await
        .map_err(|e| e.to_string())?;
    if !existing.is_empty() {
        println!("demo: {} patients already present; loading none", existing.len());
        return Ok(());
    }
    let mut rng = synth::SynthRng::new(random_u64()?);
    let mut total = 0;
    for _ in 0..20 {
        total += import::import_bundle(&opened.app, synth::patient_bundle(&mut rng, today())).await?;
    }
    println!("demo: loaded 20 synthetic patients ({total} resources)");
    Ok(())
}

async fn serve(opened: datadir::Opened, bound: Option<std::net::TcpListener>) -> Result<(), String> {
    opened.config.detect.check()?;
    let (cert, key) = datadir::tls_files(&opened)?;
    let cert_pem = std::fs::read(&cert).map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    let key_pem = zeroize::Zeroizing::new(std::fs::read(&key).map_err(|e| format!("TLS key {}: {e}", key.display()))?);
    let (client_ca, _) = opened.config.mtls.load(&opened.data_dir)?;
    let tls = valv_server::http::tls::server_config(&cert_pem, &key_pem, opened.config.server.allow_tls12, client_ca.as_deref())?;
    let addr = opened.config.server.listen.clone();
    let listener = match bound {
        Some(l) => {
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            TcpListener::from_std(l).map_err(|e| format!("cannot listen on {addr}: {e}"))?
        }
        None => TcpListener::bind(&addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?,
    };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let integrator = valv_server::audit::integrator::Integrator::start(opened.app.vault.store().clone(), &opened.app.log_keys()).await?;
    valv_server::audit::integrator::spawn(integrator, opened.app.clone(), std::time::Duration::from_millis(opened.config.audit.checkpoint_interval_ms));
    // Care teams and consents written by other processes (valv import, another server on the
    // same database) count within 2 s: refreshed every second (cheap when nothing changed).
    valv_server::access::spawn_refresh(opened.app.clone(), std::time::Duration::from_secs(1));
    // Data keys not under the current KEK version (after `valv keys rotate`) are rewrapped.
    valv_server::keys::spawn_rewrap(opened.app.clone(), std::time::Duration::from_secs(5));
    // Addresses blocked from an incident (here, on another server, at the console): within 2 s.
    valv_server::oversight::blocks::refresh(&opened.app).await.map_err(|e| e.diagnostics)?;
    valv_server::oversight::blocks::spawn(opened.app.clone());
    if opened.config.detect.enabled {
        valv_server::detect::spawn(opened.app.clone(), opened.config.detect.clone());
    }
    if let Some(siem) = opened.config.siem.settings(&opened.data_dir)? {
        valv_server::audit::siem::spawn(opened.app.clone(), siem)?;
    }
    if let Some(webhook) = opened.config.alert_webhook.settings(&opened.data_dir, |k| std::env::var(k).ok())? {
        valv_server::detect::webhook::spawn(opened.app.clone(), webhook)?;
    }
    schedule::spawn(&opened)?;
    println!("Valv serving HTTPS on https://{local}/fhir (metadata: https://{local}/fhir/metadata)");
    tracing::info!(address = %local, "listening");
    valv_server::serve(opened.app.clone(), listener, tls, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn keys_command(dir: &std::path::Path, action: KeysAction) -> Result<(), String> {
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Serve).await?;
    let (store, keys, now) = (opened.app.vault.store(), &opened.keys, valv_server::now_ms());
    let provider = keys.provider();
    let record = |interaction: &'static str, reason: String| {
        let app = opened.app.clone();
        async move { valv_server::people::api::audit_local(&app, interaction, None, reason, valv_server::now_ms()).await.map_err(|e| e.diagnostics) }
    };
    match action {
        KeysAction::Status { format } => {
            let status = keys::status(keys, &**store).await?;
            match format.as_str() {
                "text" => println!("{}", status.to_text(now)),
                "json" => println!("{}", status.to_json(now)),
                other => return Err(format!("format '{other}' is not supported (text, json)")),
            }
            Ok(())
        }
        KeysAction::Rotate { patient, wait, signing_key } if [patient.is_some(), wait, signing_key].iter().filter(|b| **b).count() > 1 => {
            Err("give one of --patient, --signing-key and --wait (--wait belongs to a KEK rotation; the others are done when the command returns)".into())
        }
        KeysAction::Rotate { signing_key: true, .. } => {
            use valv_server::audit::signing::{key_name, LogKeys};
            let n = opened.app.log_keys().count() + 1;
            opened.app.vault.create_named_key(&key_name(n), now).await.map_err(|e| format!("adding checkpoint-signing key {n}: {e}"))?;
            let vkey = LogKeys::load(&opened.app.vault, now).await?.current_vkey().to_string();
            record("key-rotate", format!("checkpoint-signing key {n} added ({vkey}); a running server signs with it within 10 s, its first checkpoint co-signed by key {}", n - 1)).await?;
            println!("checkpoint-signing key {n} added: {vkey}");
            println!("a running server signs with it within 10 s (or from its next start); every earlier key stays published at /audit/keys and checks what it signed");
            Ok(())
        }
        KeysAction::Rotate { patient: Some(patient), .. } => {
            let n = opened.app.vault.rotate_patient_key(&patient, now).await.map_err(|e| format!("rotating the data key of patient {patient}: {e}"))?;
            record("key-rotate", format!("the data key of patient {patient} replaced by a new one; {n} stored versions re-sealed under it")).await?;
            println!("patient {patient} has a new data key: {n} stored versions re-sealed under it, the old key destroyed (backups made before still hold it)");
            Ok(())
        }
        KeysAction::Rotate { wait, .. } => {
            let version = keys.rotate()?;
            record("key-rotate", format!("KEK {}/{} version {version} added and made current", provider.name(), provider.kek_id())).await?;
            println!("KEK {} version {version} is now current", provider.kek_id());
            if wait {
                let n = keys::rewrap_until_done(&*provider, &**store).await?;
                println!("{n} data keys rewrapped; every data key is under version {version}");
            } else {
                let left = valv_store::rewrap::remaining(&**store, &*provider).await.map_err(|e| e.to_string())?;
                println!("{left} data keys to rewrap: a running server does it in the background (or its next start); 'valv keys status' shows what is left");
            }
            Ok(())
        }
        KeysAction::Rewrap => {
            let n = keys::rewrap_until_done(&*provider, &**store).await?;
            println!("{n} data keys rewrapped; every data key is under version {}", provider.current_version());
            Ok(())
        }
        KeysAction::Retire { version } => {
            keys::check_retirable(keys, &**store, version).await?;
            keys.retire(version)?;
            record("key-retire", format!("KEK {}/{} version {version} destroyed (no data key was wrapped under it)", provider.name(), provider.kek_id())).await?;
            println!("KEK {} version {version} retired", provider.kek_id());
            Ok(())
        }
    }
}

async fn audit(dir: &std::path::Path, action: AuditAction) -> Result<(), String> {
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Scan).await?;
    let store = opened.app.vault.store();
    match action {
        AuditAction::Verify { checkpoints } => {
            let claims = checkpoints
                .iter()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .map(|note| valv_server::audit::log::Claim { source: format!("checkpoint {}", p.display()), note })
                        .map_err(|e| format!("{}: {e}", p.display()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let audit_key = opened.app.vault.named_key("audit", valv_server::now_ms()).await.map_err(|e| e.to_string())?;
            let verifiers = opened.app.log_keys().verifiers()?;
            let mut report = valv_server::audit::log::verify(store, &audit_key, &verifiers, &claims).await.map_err(|e| e.to_string())?;
            let vault = &opened.app.vault;
            report.problems.extend(valv_server::audit::log::check_patient_index(store, &audit_key, &|p| vault.audit_patient_token(p)).await.map_err(|e| e.to_string())?);
            for p in &report.problems {
                println!("PROBLEM {p}");
            }
            if report.tiles_absent {
                println!("no audit tiles are stored (a log written before tiles): 'valv serve' builds them at its next start");
            } else {
                println!("{} audit tiles compared with the tiles recomputed from the entries", report.tiles);
            }
            let summary = format!(
                "{} entries, {} stored checkpoints, {} given checkpoints: {}",
                report.entries,
                report.checkpoints,
                report.external,
                if report.problems.is_empty() { "the log verifies".to_string() } else { format!("{} problem(s)", report.problems.len()) }
            );
            println!("{summary}");
            // The compliance report reads the last full verification from the log itself.
            let now = valv_server::now_ms();
            if report.problems.is_empty() {
                valv_server::people::api::audit_local(&opened.app, "audit-verify", None, format!("full verification: {summary}"), now).await.map_err(|e| e.diagnostics)?;
                Ok(())
            } else {
                valv_server::people::api::audit_local_failure(&opened.app, "audit-verify", format!("full verification: {summary}"), now).await.map_err(|e| e.diagnostics)?;
                Err("the audit log does not verify".into())
            }
        }
        AuditAction::ReAnchor { checkpoint } => {
            let note = std::fs::read_to_string(&checkpoint).map_err(|e| format!("{}: {e}", checkpoint.display()))?;
            let cp = valv_server::audit::integrator::Integrator::re_anchor(store.clone(), &opened.app.log_keys(), &note).await?;
            let size = store.audit_size().await.map_err(|e| e.to_string())?;
            let reason = format!("the log's stored checkpoints were missing; re-anchored to an outside checkpoint of size {} (entries {}..{size} were covered by no checkpoint)", cp.size, cp.size);
            valv_server::people::api::audit_local(&opened.app, "audit-re-anchor", None, reason.clone(), valv_server::now_ms()).await.map_err(|e| e.diagnostics)?;
            println!("{reason}");
            Ok(())
        }
        AuditAction::Export { format, since } => {
            if format != "jsonl" && format != "syslog" {
                return Err(format!("export format '{format}' is not supported (jsonl, syslog)"));
            }
            let (host, procid) = (valv_server::audit::siem::hostname(), std::process::id());
            let audit_key = opened.app.vault.named_key("audit", valv_server::now_ms()).await.map_err(|e| e.to_string())?;
            let cipher = valv_crypto::Cipher::new(&audit_key);
            let size = store.audit_size().await.map_err(|e| e.to_string())?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut index = since;
            while index < size {
                let rows = store.audit_entries(index, size.min(index + 5_000)).await.map_err(|e| e.to_string())?;
                if rows.is_empty() {
                    return Err(format!("audit entries from {index} are missing; run 'valv audit verify'"));
                }
                for (stored_index, row) in rows {
                    if stored_index != index {
                        return Err(format!("audit entry {index} is missing; run 'valv audit verify'"));
                    }
                    let bytes = valv_server::audit::open_entry(&cipher, &row).map_err(|e| format!("entry {index}: {e}"))?;
                    use std::io::Write as _;
                    if format == "syslog" {
                        out.write_all(&valv_server::audit::siem::message(index, &row, &bytes, &host, procid)).map_err(|e| e.to_string())?;
                        out.write_all(b"\n").map_err(|e| e.to_string())?;
                    } else {
                        let entry = String::from_utf8(bytes).map_err(|e| format!("entry {index}: {e}"))?;
                        let leaf = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, row.leaf_hash);
                        writeln!(out, "{{\"index\":{index},\"leaf_hash\":\"{leaf}\",\"entry\":{entry}}}").map_err(|e| e.to_string())?;
                    }
                    index += 1;
                }
            }
            Ok(())
        }
        AuditAction::Proof { index, size } => {
            let size = match size {
                Some(s) => s,
                None => store.latest_checkpoint().await.map_err(|e| e.to_string())?.map(|c| c.size).ok_or("no checkpoint has been signed yet")?,
            };
            let text = valv_server::audit::log::receipt(&**store, index, size).await.map_err(|e| e.to_string())?;
            print!("{text}");
            Ok(())
        }
    }
}

async fn user(dir: &std::path::Path, action: UserAction) -> Result<(), String> {
    use valv_server::people::identity::{AdminChange, NewUser};
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Serve).await?;
    let app = &opened.app;
    let ident = &app.identity;
    let now = app.clock.now_ms();
    let e = |e: valv_server::error::ApiError| e.diagnostics;
    match action {
        UserAction::Add { username, roles, units, name, practitioner, patient, password_stdin } => {
            let spec = NewUser { username: username.clone(), display_name: name.unwrap_or_default(), roles, units, practitioner, patient };
            // The password is read and checked before the user exists, so a refused password
            // leaves nothing behind.
            let mut password = zeroize::Zeroizing::new(String::new());
            if password_stdin {
                std::io::stdin().read_line(&mut password).map_err(|err| format!("reading the password from standard input: {err}"))?;
                let pw = password.trim_end_matches(['\n', '\r']);
                valv_identity::password::check(pw, &spec.username, &spec.display_name, ident.settings.min_score).map_err(|r| r.to_string())?;
            }
            let (created, token) = ident.create(spec, now, None).await.map_err(e)?;
            valv_server::people::api::audit_local(app, "user-create", Some(&created), "console".into(), now).await.map_err(e)?;
            if password_stdin {
                let password = password.trim_end_matches(['\n', '\r']);
                let (uri, codes) = ident.provision(&username, password, now).await.map_err(e)?;
                valv_server::people::api::audit_local(app, "enroll", Some(&created), "console-provisioned".into(), now).await.map_err(e)?;
                println!("created user '{username}' (id {}), active; recovery codes (each works once):", created.id);
                for c in codes {
                    println!("  {c}");
                }
                println!("{uri}");
            } else {
                println!("created user '{username}' (id {}); enrollment token (valid 24 h, shown once):", created.id);
                println!("{token}");
            }
        }
        UserAction::List => {
            let users = ident.list().await.map_err(e)?;
            valv_server::people::api::audit_local(app, "user-read", None, "console-list".into(), now).await.map_err(e)?;
            for u in users {
                println!("{:<24} {:<9} {:<36} {}", u.username, u.state_at(now), u.id, u.roles.join(","));
            }
        }
        UserAction::Show { username } => {
            let u = ident.get(&username).await.map_err(e)?;
            valv_server::people::api::audit_local(app, "user-read", Some(&u), "console-show".into(), now).await.map_err(e)?;
            println!("{}", serde_json::to_string_pretty(&u.summary(now)).unwrap_or_default());
        }
        other => {
            let (username, change) = match other {
                UserAction::Disable { username } => (username, AdminChange::Disable),
                UserAction::Enable { username } => (username, AdminChange::Enable),
                UserAction::Unlock { username } => (username, AdminChange::Unlock),
                UserAction::ResetMfa { username } => (username, AdminChange::ResetMfa),
                UserAction::RevokeSessions { username } => (username, AdminChange::RevokeSessions),
                UserAction::SetRoles { username, roles, units } => (username, AdminChange::SetRoles { roles, units }),
                UserAction::Add { .. } | UserAction::List | UserAction::Show { .. } => return Err("unreachable user action".into()),
            };
            let interaction = change.interaction();
            let (u, token) = ident.admin(&username, change, now, None).await.map_err(e)?;
            valv_server::people::api::audit_local(app, interaction, Some(&u), "console".into(), now).await.map_err(e)?;
            println!("{username}: {} ({})", interaction.trim_start_matches("user-"), u.state_at(now));
            if let Some(t) = token {
                println!("new enrollment token (valid 24 h, shown once):");
                println!("{t}");
            }
        }
    }
    Ok(())
}

async fn apikey(dir: &std::path::Path, action: ApikeyAction) -> Result<(), String> {
    let opened = datadir::open_existing(dir, valv_store::sqlite::Access::Serve).await?;
    let store = opened.app.vault.store();
    let now = opened.app.clock.now_ms();
    match action {
        ApikeyAction::Create { name, role, scope } => {
            if role == "service" && valv_policy::Scopes::parse(&scope)?.is_empty() {
                return Err("a service key acts only as its scopes say: give --scope (e.g. --scope 'system/*.rs')".into());
            }
            let r32 = valv_store::vault::random_bytes().map_err(|e| e.to_string())?;
            let r16 = valv_store::vault::random_bytes().map_err(|e| e.to_string())?;
            let (key, record) = valv_server::people::auth::new_api_key(&opened.app.records, &name, &role, &scope, now, r32, r16)?;
            // Audited before it exists: a key is never created without its entry.
            valv_server::people::api::audit_local(&opened.app, "apikey-create", None, format!("key {} ({}, role {role}, scopes '{}')", record.id, name, record.scopes), now).await.map_err(|e| e.diagnostics)?;
            store.insert_api_key(&record).await.map_err(|e| e.to_string())?;
            println!("created API key '{name}' (id {}, role {role}, scopes '{}'); it is shown only once:", record.id, record.scopes);
            println!("{key}");
        }
        ApikeyAction::List => {
            for k in store.list_api_keys().await.map_err(|e| e.to_string())? {
                let state = match k.revoked {
                    Some(t) => format!("revoked {}", valv_fhir::date::format_instant(t)),
                    None => "active".into(),
                };
                println!("{}  {:<24} {:<8} created {}  {state}  scopes '{}'", k.id, k.name, k.role, valv_fhir::date::format_instant(k.created), k.scopes);
            }
        }
        ApikeyAction::Revoke { id_or_name } => {
            let keys = store.list_api_keys().await.map_err(|e| e.to_string())?;
            let found = keys.iter().find(|k| k.revoked.is_none() && (k.id == id_or_name || k.name == id_or_name));
            let Some(key) = found else {
                return Err(format!("no active API key with id or name '{id_or_name}'"));
            };
            let r = valv_server::people::auth::revoked(&opened.app.records, key, now);
            if !store.revoke_api_key(&r.id, now, &r.mac).await.map_err(|e| e.to_string())? {
                return Err(format!("API key '{id_or_name}' changed while revoking it; try again"));
            }
            valv_server::people::api::audit_local(&opened.app, "apikey-revoke", None, format!("key {} ({})", r.id, r.name), now).await.map_err(|e| e.diagnostics)?;
            println!("revoked API key '{id_or_name}'");
        }
    }
    Ok(())
}
