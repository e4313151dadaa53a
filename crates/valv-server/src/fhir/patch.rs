//! `PATCH /fhir/{type}/{id}` (FHIR R4 http §3.1.0.6): a JSON Patch (RFC 6902), JSON Merge
//! Patch (RFC 7386) or FHIRPath Patch applied to the current version, which is then written as an update —
//! validated, decided, audited and versioned like a PUT of the result. The caller is decided
//! on first, before the current version is opened: whoever may not change the resource learns
//! nothing of it from a patch (not even whether a `test` operation holds).

use super::{check_id, check_type, unknown_id, update, write_touch};
use crate::error::ApiError;
use crate::request::{audit_failure, authorize, Ctx};
use crate::{App, Reply};
use hyper::StatusCode;
use serde_json::Value;
use valv_policy::Action;

/// Which kind of patch document a PATCH carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// RFC 6902: an array of operations.
    Json,
    /// RFC 7386: an object merged into the resource.
    Merge,
    /// FHIR R4 FHIRPath Patch: a `Parameters` resource of operations.
    FhirPath,
}

impl PatchKind {
    /// The kind from the media type and the body's shape: `application/json-patch+json` and
    /// `application/merge-patch+json` say it; with FHIR JSON or plain JSON an array is a JSON
    /// Patch and an object a merge patch (as fhirpy sends one) — except a `Parameters` resource,
    /// a FHIRPath Patch.
    pub fn of(media: &str, body: &Value) -> Result<PatchKind, ApiError> {
        match (media, body) {
            ("application/json-patch+json", Value::Array(_)) => Ok(PatchKind::Json),
            ("application/json-patch+json", _) => Err(ApiError::bad_request("a JSON Patch document is an array of operations")),
            ("application/merge-patch+json", Value::Object(_)) => Ok(PatchKind::Merge),
            ("application/merge-patch+json", _) => Err(ApiError::bad_request("a JSON Merge Patch for a resource is a JSON object")),
            (_, Value::Array(_)) => Ok(PatchKind::Json),
            (_, Value::Object(m)) if m.get("resourceType").and_then(Value::as_str) == Some("Parameters") => Ok(PatchKind::FhirPath),
            (_, Value::Object(_)) => Ok(PatchKind::Merge),
            _ => Err(ApiError::bad_request("a PATCH body is a JSON Patch array or a JSON Merge Patch object")),
        }
    }
}

pub(super) async fn patch(app: &App, ctx: &Ctx, resource_type: &str, id: &str, patch: &Value, kind: PatchKind, if_match: Option<u64>) -> Result<Reply, ApiError> {
    check_type(resource_type)?;
    check_id(id)?;
    let (next, version) = patched(app, ctx, resource_type, id, patch, kind, if_match).await?;
    // Written against the version the patch was applied to: a write in between makes it 412,
    // never a silent overwrite of that write.
    update(app, ctx, resource_type, id, next, Some(version)).await
}

/// The resource as the patch leaves it, and the version it was applied to; the caller writes it
/// as an update of that version. Decided (as an update on the current patient) before anything
/// is opened; failures after that are audited.
pub(super) async fn patched(app: &App, ctx: &Ctx, resource_type: &str, id: &str, patch: &Value, kind: PatchKind, if_match: Option<u64>) -> Result<(Value, u64), ApiError> {
    let Some(stored) = app.vault.fetch(resource_type, id, None).await? else {
        let touch = write_touch("update", Action::Update, resource_type, id, None);
        return Err(unknown_id(app, ctx, &touch, ApiError::not_found(format!("{resource_type}/{id} is not known"))).await);
    };
    let touch = write_touch("update", Action::Update, resource_type, id, stored.patient.as_deref());
    authorize(app, ctx, &touch).await?;
    if stored.deleted {
        return Err(ApiError::new(StatusCode::GONE, "deleted", format!("{resource_type}/{id} has been deleted: a patch needs a current version")));
    }
    if let Some(v) = if_match.filter(|v| *v != stored.version) {
        return Err(ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", format!("If-Match names version {v} but {resource_type}/{id} is at version {}", stored.version)));
    }
    let current = match app.vault.open_bytes(&stored, ctx.now).await.map_err(ApiError::from).and_then(|b| {
        serde_json::from_slice::<Value>(&b).map_err(|_| ApiError::internal("the stored resource is not JSON"))
    }) {
        Ok(v) => v,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e).await),
    };
    let next = match kind {
        PatchKind::Json => valv_fhir::patch::json_patch(&current, patch, app.max_body_bytes),
        PatchKind::Merge => valv_fhir::patch::merge_patch(&current, patch),
        PatchKind::FhirPath => valv_fhir::fhirpatch::apply(&current, patch),
    };
    let next = match next {
        Ok(v) => v,
        Err(e) => return Err(audit_failure(app, ctx, &touch, e.into()).await),
    };
    if next.get("resourceType") != current.get("resourceType") || next.get("id") != current.get("id") {
        let e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "processing", "a patch may not change the resource's resourceType or id");
        return Err(audit_failure(app, ctx, &touch, e).await);
    }
    Ok((next, stored.version))
}
