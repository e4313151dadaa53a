//! `valv import FILES…`: FHIR transaction or batch Bundles (Synthea's, for one) loaded through
//! the same request path as `POST /fhir` — validation, policy and audit included — as the local
//! operator. Each file is one atomic transaction; a rejected file changes nothing.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use valv_server::fhir::{self, Ctx, Interaction};
use valv_server::App;

pub struct Summary {
    pub files_ok: usize,
    pub resources: usize,
    pub rejected: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

/// A context for work done at the console: the operator named by `$USER`, acting as a service
/// that may create, read, update and delete any resource (`system/*.cruds`) and change access
/// facts (explicit scopes for CareTeam, Consent, Patient and Organization).
pub fn local_ctx(purpose: &str) -> Ctx {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let mut rid = [0u8; 12];
    let _ = getrandom::fill(&mut rid);
    Ctx {
        principal: valv_server::people::auth::Principal::basic(
            valv_server::people::auth::PrincipalKind::Local,
            format!("local:{user}"),
            user,
            vec!["service".into()],
            valv_policy::Scopes::parse(&format!("system/*.cruds {}", valv_policy::change::FACT_SCOPES)).ok(),
        ),
        request_id: valv_crypto::hex::encode(&rid),
        source: "local".into(),
        now: valv_server::now_ms(),
        purpose_of_use: Some(purpose.into()),
        return_representation: false,
        lenient: false,
    }
}

/// Imports one bundle; returns how many resources it wrote.
pub async fn import_bundle(app: &App, body: serde_json::Value) -> Result<usize, String> {
    let ctx = local_ctx("HOPERAT");
    let reply = fhir::execute(app, &ctx, Interaction::Bundle { body }).await.map_err(|e| format!("{} {}", e.status.as_u16(), e.diagnostics))?;
    let entries = reply.body.as_ref().and_then(|b| b.get("entry")).and_then(|e| e.as_array()).map_or(0, Vec::len);
    // In a batch, failed entries come back as outcomes rather than failing the file.
    let failed = reply
        .body
        .as_ref()
        .and_then(|b| b.get("entry"))
        .and_then(|e| e.as_array())
        .map_or(0, |a| a.iter().filter(|e| e.pointer("/response/outcome").is_some()).count());
    if failed > 0 {
        return Err(format!("{failed} of {entries} batch entries failed (the other entries of this batch were stored)"));
    }
    Ok(entries)
}

fn read_bundle(path: &Path) -> Result<serde_json::Value, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("malformed JSON: {e}"))
}

/// Bundles in flight at once: concurrent transactions share the store's and the audit log's
/// group commits (one fsync for many), which is where import throughput comes from — the more
/// bundles a commit takes, the fewer times the randomly placed search tokens' pages are written
/// (1,000 synthetic patients: 32 in flight 3,800 resources/s, 128 in flight 5,700/s).
const IN_FLIGHT: usize = 128;
/// …and at most this many bytes of bundle files among them (a parsed bundle takes several times
/// its file's size in memory), so a directory of large bundles does not take the memory of 128.
const IN_FLIGHT_BYTES: u64 = 48 << 20;

pub async fn run(app: Arc<App>, files: &[PathBuf]) -> Summary {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut s = Summary { files_ok: 0, resources: 0, rejected: Vec::new(), seconds: 0.0 };
    let mut pending = files.iter().cloned();
    let mut tasks = tokio::task::JoinSet::new();
    let mut done = 0;
    let mut bytes_in_flight = 0;
    loop {
        while tasks.len() < IN_FLIGHT && (tasks.is_empty() || bytes_in_flight < IN_FLIGHT_BYTES) {
            let Some(path) = pending.next() else { break };
            let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
            bytes_in_flight += bytes;
            let app = app.clone();
            tasks.spawn(async move {
                let result = match read_bundle(&path) {
                    Ok(body) => import_bundle(&app, body).await,
                    Err(e) => Err(e),
                };
                (path, bytes, result)
            });
        }
        let Some(joined) = tasks.join_next().await else { break };
        done += 1;
        if let Ok((_, bytes, _)) = &joined {
            bytes_in_flight -= bytes;
        }
        match joined {
            Ok((_, _, Ok(n))) => {
                s.files_ok += 1;
                s.resources += n;
            }
            Ok((path, _, Err(why))) => s.rejected.push((path, why)),
            Err(e) => s.rejected.push((PathBuf::from("?"), format!("import task failed: {e}"))),
        }
        let rate = s.resources as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let line = format!("importing [{done}/{}] {} resources, {rate:.0}/s", files.len(), s.resources);
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if done % 10 == 0 || done == files.len() {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
    s.rejected.sort();
    s.seconds = started.elapsed().as_secs_f64();
    s
}
