//! Short-lived tickets to a file (issue 13), for clients that cannot send a bearer token (an
//! image viewer, a browser `<img>`): `POST /fhir/Binary/{id}/$ticket?uses=N&seconds=S` gives a
//! signed-in person a URL `…/files/valvt_…` that opens that one file version, for at most
//! 300 s and `uses` requests (Range requests each count), then nothing.
//!
//! The secret is 256 random bits; only its SHA-256 is stored, with a MAC over the fields that
//! never change (a row inserted in the database is refused). Uses are spent atomically in the
//! store, so concurrent requests on any number of servers never exceed the count. Every use is a
//! read as that person: decided again on the current facts (a care relationship ended since
//! the ticket was issued ends it too), audited with the ticket's handle, the file's SHA-256 and
//! the range. Refused uses — expired, used up, revoked, unknown — are audited too (unknown ones
//! compactly, as other unauthenticated refusals). The holder may end a ticket with
//! `DELETE /files/{ticket}`; its person ends all of theirs to a Binary with
//! `DELETE /fhir/Binary/{id}/$ticket`.

use crate::audit::Outcome;
use crate::error::ApiError;
use crate::people::auth::{user_principal, PrincipalKind};
use crate::request::{audit, audit_failure, authorize_file, Ctx, Touch};
use crate::{App, Peer, Reply};
use base64::Engine as _;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use valv_policy::Action;
use valv_store::vault::random_bytes;
use valv_store::TicketRow;

const PREFIX: &str = "valvt_";
/// The longest a ticket lives.
pub const MAX_SECONDS: i64 = 300;
/// The most requests one ticket allows.
pub const MAX_USES: u32 = 100;

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The fields a ticket's MAC covers: all but the uses spent and the revocation, which change.
fn mac_fields(t: &TicketRow) -> [Vec<u8>; 9] {
    [
        t.hash.to_vec(),
        t.id.as_bytes().to_vec(),
        t.binary_id.as_bytes().to_vec(),
        t.version.to_be_bytes().to_vec(),
        t.agent.as_bytes().to_vec(),
        t.purpose.as_bytes().to_vec(),
        t.expires.to_be_bytes().to_vec(),
        t.uses.to_be_bytes().to_vec(),
        t.created.to_be_bytes().to_vec(),
    ]
}

fn mac(app: &App, t: &TicketRow) -> Vec<u8> {
    let fields = mac_fields(t);
    app.records.tag("file-ticket", &fields.each_ref().map(Vec::as_slice))
}

fn mac_ok(app: &App, t: &TicketRow) -> bool {
    let fields = mac_fields(t);
    app.records.verify("file-ticket", &fields.each_ref().map(Vec::as_slice), &t.mac)
}

/// `uses` and `seconds` from the query (1 and 300 when absent).
fn limits(pairs: &[(String, String)]) -> Result<(u32, i64), ApiError> {
    let mut uses = 1;
    let mut seconds = MAX_SECONDS;
    for (k, v) in pairs {
        match k.as_str() {
            "uses" => uses = v.parse().ok().filter(|n| (1..=MAX_USES).contains(n)).ok_or_else(|| ApiError::bad_request(format!("'uses' must be 1 to {MAX_USES}, got '{v}'")))?,
            "seconds" => seconds = v.parse().ok().filter(|n| (1..=MAX_SECONDS).contains(n)).ok_or_else(|| ApiError::bad_request(format!("'seconds' must be 1 to {MAX_SECONDS}, got '{v}'")))?,
            "_format" | "_pretty" => {}
            other => return Err(ApiError::bad_request(format!("$ticket takes 'uses' and 'seconds', not '{other}'"))),
        }
    }
    Ok((uses, seconds))
}

/// Decided as its uses are: a read of that version of the Binary.
fn ticket_touch<'a>(id: &'a str, patient: Option<&'a str>) -> Touch<'a> {
    Touch { interaction: "ticket", action: Action::VRead, resource_type: "Binary", id: Some(id), version: None, patient, query: None }
}

/// `POST /fhir/Binary/{id}/$ticket`: a ticket to the Binary's current version for the caller.
pub async fn issue(app: &App, ctx: &Ctx, id: &str, pairs: &[(String, String)]) -> Result<Reply, ApiError> {
    super::check_id(id)?;
    let (uses, seconds) = limits(pairs)?;
    if ctx.principal.kind != PrincipalKind::User || app.identity.by_id(&ctx.principal.id).await?.is_none() {
        return Err(ApiError::forbidden("tickets are issued to people signed in with a Valv account; a service sends its key"));
    }
    let stored = app.vault.fetch("Binary", id, None).await?;
    let patient = stored.as_ref().and_then(|v| v.patient.clone());
    let touch = ticket_touch(id, patient.as_deref());
    let file = match &stored {
        Some(v) if !v.deleted => app.vault.store().file(id).await?,
        _ => None,
    };
    let permit = authorize_file(app, ctx, &touch, file.as_ref().map(|f| f.scan.as_str())).await?;
    let v = match stored {
        Some(v) if !v.deleted => v,
        Some(_) => return Err(audit_failure(app, ctx, &touch, ApiError::new(StatusCode::GONE, "deleted", format!("Binary/{id} has been deleted"))).await),
        None => return Err(audit_failure(app, ctx, &touch, ApiError::not_found(format!("Binary/{id} is not known"))).await),
    };
    if let Some(file) = &file {
        if let Err(e) = super::binary::check_scan(file, app.files.serve_unscannable) {
            return Err(audit_failure(app, ctx, &touch, e).await);
        }
    }
    let token = format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?));
    let mut row = TicketRow {
        hash: hash(&token),
        id: valv_crypto::hex::encode(&random_bytes::<8>()?),
        binary_id: id.to_string(),
        version: v.version,
        agent: ctx.principal.id.clone(),
        purpose: ctx.purpose().to_string(),
        expires: ctx.now + seconds * 1000,
        uses,
        used: 0,
        revoked: false,
        created: ctx.now,
        mac: Vec::new(),
    };
    row.mac = mac(app, &row);
    let mut entry = ctx.permitted(&Touch { version: Some(v.version), ..touch }, 200, &permit)?;
    entry.reason = format!("{}; ticket {} for {uses} uses until {}", entry.reason, row.id, valv_fhir::date::format_instant(row.expires));
    audit(app, vec![entry]).await?;
    app.vault.store().put_ticket(&row).await?;
    // Expired tickets are kept a day (their refusals are answered precisely), then dropped.
    let _ = app.vault.store().delete_tickets_before(ctx.now - 86_400_000).await;
    let base = app.base_url.trim_end_matches("/fhir");
    Ok(Reply::json(
        StatusCode::OK,
        json!({"resourceType": "Parameters", "parameter": [
            {"name": "url", "valueUrl": format!("{base}/files/{token}")},
            {"name": "id", "valueString": row.id},
            {"name": "expires", "valueInstant": valv_fhir::date::format_instant(row.expires)},
            {"name": "uses", "valueInteger": uses},
        ]}),
    ))
}

/// `DELETE /fhir/Binary/{id}/$ticket`: ends every ticket of the caller's to the Binary.
pub async fn revoke_mine(app: &App, ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    super::check_id(id)?;
    let patient = app.vault.locate("Binary", id).await?.and_then(|l| l.patient);
    let n = app.vault.store().revoke_tickets(id, &ctx.principal.id).await?;
    let touch = Touch { interaction: "ticket-revoke", ..ticket_touch(id, patient.as_deref()) };
    audit(app, vec![ctx.event(&touch, Outcome::Success, 200, &format!("{n} tickets revoked"))?]).await?;
    Ok(Reply::json(StatusCode::OK, valv_fhir::outcome::success(&format!("{n} tickets to Binary/{id} revoked"))))
}

/// `GET`, `HEAD` or `DELETE /files/{ticket}`: the ticket is the credential.
pub async fn route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let token = req.uri().path().trim_start_matches("/files/");
    let now = app.clock.now_ms();
    let well_formed = token.len() == PREFIX.len() + 43 && token.starts_with(PREFIX) && token[PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(unknown(app, rid, peer, now).await);
    }
    let secret = hash(token);
    match *req.method() {
        Method::DELETE => {
            if !app.vault.store().revoke_ticket(&secret).await? {
                return Err(unknown(app, rid, peer, now).await);
            }
            // The holder is not identified (the ticket is all they show): recorded by source.
            let event = crate::request::anonymous_event("ticket-revoke", now, rid, &peer.source(), StatusCode::OK, "a file ticket revoked by its holder")?;
            audit(app, vec![crate::audit::AuditEvent { outcome: Outcome::Success, ..event }]).await?;
            Ok(Reply::json(StatusCode::OK, valv_fhir::outcome::success("the ticket is revoked")))
        }
        Method::GET | Method::HEAD => redeem(app, &req, &secret, rid, peer, now).await,
        ref m => Err(ApiError::method_not_allowed(format!("{m} is not allowed on a ticket; use GET, HEAD or DELETE"))),
    }
}

/// Spends a use of the ticket and reads the file as its person, or says why not.
async fn redeem(app: &App, req: &Request<Incoming>, secret: &[u8; 32], rid: &str, peer: &Peer, now: i64) -> Result<Reply, ApiError> {
    let Some((t, usable)) = app.vault.store().use_ticket(secret, now).await? else {
        return Err(unknown(app, rid, peer, now).await);
    };
    if !mac_ok(app, &t) {
        tracing::error!(ticket = %t.id, "a file ticket fails its MAC: inserted or altered outside Valv");
        return Err(unknown(app, rid, peer, now).await);
    }
    let Some(user) = app.identity.by_id(&t.agent).await? else {
        return Err(unknown(app, rid, peer, now).await);
    };
    let ctx = Ctx { principal: user_principal(&user), request_id: rid.to_string(), source: peer.source(), now, purpose_of_use: Some(t.purpose.clone()), return_representation: true, lenient: false };
    let refusal = if !usable {
        Some(if t.revoked {
            "revoked"
        } else if t.expires <= now {
            "expired"
        } else {
            "used up"
        })
    } else if user.state_at(now) != "active" {
        Some("issued to an account that is no longer active")
    } else {
        None
    };
    if let Some(why) = refusal {
        let patient = app.vault.locate("Binary", &t.binary_id).await?.and_then(|l| l.patient);
        let touch = Touch { version: Some(t.version), ..ticket_touch(&t.binary_id, patient.as_deref()) };
        audit(app, vec![ctx.event(&touch, Outcome::Denied, 403, &format!("ticket {} {why}", t.id))?]).await?;
        return Err(ApiError::forbidden(format!("the ticket is {why}: ask for a new one")).recorded());
    }
    let via = format!("ticket {} use {}/{}", t.id, t.used, t.uses);
    super::binary::download(app, &ctx, &t.binary_id, Some(t.version), req.headers(), req.method() == Method::HEAD, Some(&via)).await
}

/// An unknown, malformed or forged ticket: 404, recorded compactly (one entry per source and
/// ten seconds), since anyone can send one.
async fn unknown(app: &App, rid: &str, peer: &Peer, now: i64) -> ApiError {
    let e = ApiError::not_found("no such ticket");
    match crate::request::anonymous_event("ticket", now, rid, &peer.source(), StatusCode::NOT_FOUND, "unknown-ticket") {
        Ok(event) => match app.refusal_log.record(app, event).await {
            Ok(()) => e.recorded(),
            Err(audit_err) => audit_err,
        },
        Err(err) => err,
    }
}
