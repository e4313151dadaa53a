//! `/admin/compliance` and `valv compliance`: gathers the facts of this deployment and judges
//! them with `valv_oversight::compliance` (policy area `compliance`; audited `compliance-read`).

use super::{incidents, reviews, Actor};
use crate::error::ApiError;
use crate::{App, Peer, Reply};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use valv_oversight::compliance::{Done, Facts, Report};
use valv_oversight::incident::Stage;

/// Entries read backwards at most when looking for the last backup, drill and verification:
/// a few seconds of reading; older duties count as not found (and say how far was read).
const SEARCH_ENTRIES: u64 = 2_000_000;
const SEARCH_BATCH: u64 = 4096;
/// Alerts counted at most.
const ALERTS_COUNTED: usize = 10_000;

/// The facts, gathered now.
pub async fn gather(app: &App) -> Result<Facts, ApiError> {
    let store = app.vault.store();
    let now = app.clock.now_ms();
    let mut f = Facts { deployment: app.deployment.clone(), ..Facts::default() };
    for u in app.identity.list().await? {
        if u.state == valv_identity::UserState::Active {
            f.people += 1;
            f.people_with_mfa += usize::from(u.totp_confirmed);
        }
    }
    f.api_keys = store.list_api_keys().await?.iter().filter(|k| k.revoked.is_none()).count();
    let census = store.key_census().await?;
    f.data_keys = census.iter().map(|c| c.keys).sum();
    f.keys_not_current = valv_store::rewrap::remaining(&**store, &**app.vault.provider()).await?;
    f.oldest_wrap = census.iter().map(|c| c.oldest_wrap).min();
    f.audit_size = store.audit_size().await?;
    f.checkpoint_size = store.latest_checkpoint().await?.map(|c| c.size);
    (f.last_verify, f.last_backup, f.last_drill, f.searched) = last_duties(app, f.audit_size).await?;
    f.break_glass_pending = app.access.grants(|g| g.kind == "break-glass" && g.review.is_none()).iter().map(|g| g.created).collect();
    for r in reviews::list(app).await? {
        match r.finished {
            // A review of nothing documents nothing: it does not count.
            Some(done) if !r.items.is_empty() => f.reviews_finished.push(done.at),
            Some(_) => {}
            None => f.reviews_open += 1,
        }
    }
    for i in incidents::list(app).await? {
        if i.stage == Stage::Closed {
            f.incidents_closed += 1;
        } else {
            f.incidents_open.push((i.id.clone(), i.opened_at(), i.clock(now).stopped_at));
        }
    }
    f.erasures_pending = store.erasure_requests().await?.iter().filter(|r| r.state == "pending").map(|r| r.requested_at).collect();
    f.alerts_total = store.alerts(None, ALERTS_COUNTED).await?.len();
    Ok(f)
}

/// The newest successful `audit-verify`, `backup` and `restore-drill` entries, read backwards
/// from the end of the log.
async fn last_duties(app: &App, size: u64) -> Result<(Done, Done, Done, (u64, Option<i64>)), ApiError> {
    let store = app.vault.store();
    let cipher = super::cipher(app).await?;
    let (mut verify, mut backup, mut drill): (Done, Done, Done) = (None, None, None);
    let (mut end, mut read, mut oldest) = (size, 0u64, None);
    while end > 0 && read < SEARCH_ENTRIES && (verify.is_none() || backup.is_none() || drill.is_none()) {
        let start = end.saturating_sub(SEARCH_BATCH);
        for (index, row) in store.audit_entries(start, end).await?.iter().rev() {
            let bytes = crate::audit::open_entry(&cipher, row).map_err(|e| ApiError::from(valv_store::StoreError::Integrity(format!("audit entry {index} does not open: {e}"))))?;
            let e = valv_detect::Entry::parse(*index, &bytes).map_err(ApiError::internal)?;
            oldest = Some(e.time);
            if e.outcome != "success" {
                continue;
            }
            let slot = match e.interaction.as_str() {
                "audit-verify" => &mut verify,
                "backup" => &mut backup,
                "restore-drill" => &mut drill,
                _ => continue,
            };
            slot.get_or_insert((*index, e.time));
        }
        read += end - start;
        end = start;
    }
    Ok((verify, backup, drill, (read, oldest)))
}

pub async fn report(app: &App) -> Result<Report, ApiError> {
    Ok(valv_oversight::compliance::evaluate(&gather(app).await?, app.clock.now_ms()))
}

/// The report as text, one control a line.
pub fn to_text(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.controls {
        let mark = match c.status {
            valv_oversight::compliance::Status::Pass => "PASS",
            valv_oversight::compliance::Status::Fail => "FAIL",
            valv_oversight::compliance::Status::Operator => "OPERATOR",
        };
        out.push_str(&format!("{mark:<8} {:<28} {}: {}\n", c.id, c.title, c.evidence));
    }
    out.push_str(&format!("{} passed, {} failed, {} the operator's", r.passed, r.failed, r.controls.len() - r.passed - r.failed));
    out
}

pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let ctx = crate::request::admin_ctx(app, &req, rid, peer).await?;
    let actor = Actor::of(&ctx);
    let d = app.access.decide_admin(&ctx.principal, "compliance", ctx.now);
    let result = if !d.permit {
        Err(ApiError::forbidden(format!("access denied ({})", d.reason())))
    } else if req.method() != Method::GET || req.uri().path() != "/admin/compliance" {
        Err(ApiError::method_not_allowed("use GET /admin/compliance"))
    } else {
        report(app).await.map(|r| {
            let why = format!("{}; compliance report: {} passed, {} failed", d.reason(), r.passed, r.failed);
            (r, why)
        })
    };
    let r = actor.audited(app, "compliance-read", ("", ""), result).await?;
    let body = serde_json::to_value(&r).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Reply::json(StatusCode::OK, body))
}
