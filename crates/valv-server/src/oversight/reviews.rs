//! Systematic log reviews (HSLF-FS 2016:40 4 kap. 9 §, HIPAA §164.308(a)(1)(ii)(D)): a
//! reproducible sample of a unit's patient accesses in a period plus every access an alert
//! flagged, an outcome per item, and a finish that writes an audit entry carrying the review's
//! SHA-256 digest (the evidence that this review, with these outcomes, was done).
//!
//! `GET /admin/reviews`, `POST /admin/reviews` `{unit, from, to, size[, seed]}`,
//! `GET /admin/reviews/{id}`, `POST /admin/reviews/{id}/items/{audit entry index}`
//! `{verdict, note}`, `POST /admin/reviews/{id}/finish` (policy area `reviews`).

use super::{load, load_all, save, scan, Actor};
use crate::error::ApiError;
use crate::{App, Peer, Reply};
use hyper::body::Incoming;
use hyper::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use sha2::Digest;
use std::collections::{BTreeMap, HashSet};
use valv_oversight::review::{self, Review, Scope};

pub const KIND: &str = "review";
const RECORD: &str = "Review";

/// Alerts read per page while looking for the flagged accesses of a period.
const ALERT_PAGE: usize = 500;

/// What a new review covers; `seed` is drawn at random when not given (and recorded).
pub struct NewReview {
    pub unit: String,
    pub from: i64,
    pub to: i64,
    pub size: usize,
    pub seed: Option<u64>,
}

/// Draws and stores review `id` (a new id: [`super::new_record_id`]).
pub async fn create(app: &App, actor: &Actor, id: &str, r: NewReview) -> Result<(Review, String), ApiError> {
    let seed = match r.seed {
        Some(s) => s,
        None => u64::from_le_bytes(valv_store::vault::random_bytes::<8>()?),
    };
    let scope = Scope { unit: r.unit, from: r.from, to: r.to, size: r.size, seed };
    review::check_scope(&scope)?;
    if scope.to > app.clock.now_ms() {
        return Err(ApiError::bad_request("a review covers a period that has ended ('to' is not in the future): its sample could not be drawn again"));
    }
    let members: HashSet<String> = app.identity.list().await?.into_iter().filter(|u| u.units.contains(&scope.unit)).map(|u| u.id).collect();
    let mut population = Vec::new();
    let mut too_many = false;
    scan(app, scope.from, scope.to, &mut |e| {
        if e.time >= scope.from && e.time < scope.to && e.is_patient_access() && members.contains(&e.agent_id) {
            if population.len() >= review::MAX_POPULATION {
                too_many = true;
                return;
            }
            population.push(review::Access { index: e.index, time: e.time, agent: e.agent_id.clone(), patient: e.patient.clone().unwrap_or_default(), interaction: e.interaction.clone() });
        }
    })
    .await?;
    if too_many {
        return Err(ApiError::bad_request(format!("the unit made over {} accesses in the period: review a shorter one", review::MAX_POPULATION)));
    }
    let flagged = flagged(app, &population, scope.from).await?;
    let review = review::draw(id.to_string(), scope, &population, &flagged, actor.id.clone(), app.clock.now_ms())?;
    save(app, KIND, id, 1, &review).await?;
    let s = &review.scope;
    let drawn = review.items.iter().filter(|i| i.drawn).count();
    let why = format!(
        "review {id} of unit {} from {} to {}: {drawn} of {} accesses drawn with seed {}, {} items in all with the flagged ones",
        s.unit,
        valv_fhir::date::format_instant(s.from),
        valv_fhir::date::format_instant(s.to),
        review.population,
        s.seed,
        review.items.len()
    );
    Ok((review, why))
}

/// Leaf index → the alerts whose evidence names it, for the accesses in `population`.
async fn flagged(app: &App, population: &[review::Access], from: i64) -> Result<BTreeMap<u64, Vec<String>>, ApiError> {
    let wanted: HashSet<u64> = population.iter().map(|a| a.index).collect();
    let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    if wanted.is_empty() {
        return Ok(out);
    }
    let cipher = super::cipher(app).await?;
    let mut before: Option<(i64, String)> = None;
    loop {
        let rows = app.vault.store().alerts(before.as_ref().map(|(t, id)| (*t, id.as_str())), ALERT_PAGE).await?;
        for row in &rows {
            let alert = crate::detect::api::open_alert(&cipher, row)?;
            for index in alert.evidence.iter().filter(|i| wanted.contains(i)) {
                out.entry(*index).or_default().push(alert.id.clone());
            }
        }
        // Alerts come newest first and none is older than the access it flags.
        match rows.last() {
            Some(last) if rows.len() == ALERT_PAGE && last.time >= from => before = Some((last.time, last.id.clone())),
            _ => return Ok(out),
        }
    }
}

pub async fn get(app: &App, id: &str) -> Result<(Review, u64), ApiError> {
    super::check_id(id, "a review")?;
    load(app, KIND, id).await?.ok_or_else(|| ApiError::not_found(format!("no review {id}")))
}

pub async fn list(app: &App) -> Result<Vec<Review>, ApiError> {
    load_all(app, KIND).await
}

/// Records the outcome of one item.
pub async fn record(app: &App, actor: &Actor, id: &str, index: u64, verdict: &str, note: &str) -> Result<(Review, String), ApiError> {
    let (mut review, version) = get(app, id).await?;
    review.record(index, verdict, note, &actor.id, app.clock.now_ms())?;
    save(app, KIND, id, version + 1, &review).await?;
    Ok((review, format!("review {id}: audit entry {index} judged {verdict}")))
}

/// Finishes a review whose every item is judged; the audit entry carries its digest.
pub async fn finish(app: &App, actor: &Actor, id: &str) -> Result<(Review, String), ApiError> {
    let (mut review, version) = get(app, id).await?;
    let tally = review.finish(&actor.id, app.clock.now_ms())?;
    save(app, KIND, id, version + 1, &review).await?;
    let why = format!("review {id} of unit {} finished: {} items ({tally}); sha256 {}", review.scope.unit, review.items.len(), digest(&review));
    Ok((review, why))
}

/// The SHA-256 of the review's JSON as [`to_json`] shows it under `review`: anyone holding the
/// review can recompute it and compare with the finishing audit entry.
pub fn digest(review: &Review) -> String {
    let bytes = serde_json::to_vec(review).unwrap_or_default();
    valv_crypto::hex::encode(&sha2::Sha256::digest(&bytes))
}

pub fn to_json(r: &Review) -> Value {
    let t = r.tally();
    let mut v = json!({
        "review": r,
        "tally": {"justified": t.justified, "notJustified": t.not_justified, "needsFollowUp": t.follow_up, "open": t.open},
    });
    if r.finished.is_some() {
        v["sha256"] = json!(digest(r));
    }
    v
}

fn summary(r: &Review) -> Value {
    let t = r.tally();
    json!({
        "id": r.id,
        "unit": r.scope.unit,
        "from": valv_fhir::date::format_instant(r.scope.from),
        "to": valv_fhir::date::format_instant(r.scope.to),
        "seed": r.scope.seed,
        "population": r.population,
        "items": r.items.len(),
        "open": t.open,
        "createdBy": r.created_by,
        "created": valv_fhir::date::format_instant(r.created_at),
        "finished": r.finished.as_ref().map(|f| valv_fhir::date::format_instant(f.at)),
    })
}

pub async fn admin_route(app: &App, req: Request<Incoming>, rid: &str, peer: &Peer) -> Result<Reply, ApiError> {
    let ctx = crate::request::admin_ctx(app, &req, rid, peer).await?;
    let actor = Actor::of(&ctx);
    let segs = super::segments(req.uri().path(), "/admin/reviews");
    let method = req.method().clone();
    let interaction = interaction(&method, &segs);
    // A malformed id is refused like any other request of a known caller: audited.
    let id = match super::record_id(&method, &segs) {
        Ok(id) => id,
        Err(e) => return actor.audited(app, interaction, (RECORD, ""), Err(e)).await,
    };
    let d = app.access.decide_admin(&ctx.principal, "reviews", ctx.now);
    if !d.permit {
        let refused = Err(ApiError::forbidden(format!("access denied ({})", d.reason())));
        return actor.audited(app, interaction, (RECORD, &id), refused).await;
    }
    let body = if method == Method::POST && req.headers().contains_key(header::CONTENT_TYPE) { Some(crate::read_json_body(app, req).await) } else { None };
    let result = act(app, &actor, &method, &segs, &id, body).await.map(|(status, value, why)| ((status, value), format!("{}; {why}", d.reason())));
    let (status, value) = actor.audited(app, interaction, (RECORD, &id), result).await?;
    Ok(Reply::json(status, value))
}

fn interaction(method: &Method, segs: &[String]) -> &'static str {
    match (method.as_str(), segs.len()) {
        ("POST", 0) => "review-create",
        ("POST", 3) => "review-record",
        ("POST", 2) => "review-finish",
        _ => "review-read",
    }
}

async fn act(app: &App, actor: &Actor, method: &Method, segs: &[String], new_id: &str, body: Option<Result<Value, ApiError>>) -> Result<(StatusCode, Value, String), ApiError> {
    let body = body.transpose()?.unwrap_or(Value::Null);
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method.as_str(), segs.as_slice()) {
        ("GET", []) => {
            let all = list(app).await?;
            let n = all.len();
            Ok((StatusCode::OK, json!({"reviews": all.iter().map(summary).collect::<Vec<_>>()}), format!("{n} reviews listed")))
        }
        ("POST", []) => {
            let seed = match body.get("seed") {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| ApiError::bad_request("'seed' must be a whole number 0 to 2^64-1"))?),
            };
            let size = body.get("size").and_then(Value::as_u64).ok_or_else(|| ApiError::bad_request("'size' (a whole number) is required"))?;
            let r = NewReview {
                unit: super::required(&body, "unit")?.to_string(),
                from: super::instant(super::required(&body, "from")?, "from")?,
                to: super::instant(super::required(&body, "to")?, "to")?,
                size: usize::try_from(size).unwrap_or(usize::MAX),
                seed,
            };
            let (review, why) = create(app, actor, new_id, r).await?;
            Ok((StatusCode::CREATED, to_json(&review), why))
        }
        ("GET", [id]) => {
            let (review, _) = get(app, id).await?;
            Ok((StatusCode::OK, to_json(&review), format!("review {id} read")))
        }
        ("POST", [id, "items", index]) => {
            let index = index.parse().map_err(|_| ApiError::bad_request(format!("'{index}' is not an audit entry index")))?;
            let (review, why) = record(app, actor, id, index, super::required(&body, "verdict")?, super::text(&body, "note")?.unwrap_or("")).await?;
            Ok((StatusCode::OK, to_json(&review), why))
        }
        ("POST", [id, "finish"]) => {
            let (review, why) = finish(app, actor, id).await?;
            Ok((StatusCode::OK, to_json(&review), why))
        }
        _ => Err(ApiError::method_not_allowed(
            "use GET /admin/reviews[/{id}], POST /admin/reviews {unit, from, to, size[, seed]}, POST /admin/reviews/{id}/items/{index} {verdict, note}, POST /admin/reviews/{id}/finish",
        )),
    }
}
