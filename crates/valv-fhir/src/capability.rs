//! The CapabilityStatement served at `GET /fhir/metadata`: it states exactly what Valv does.

use crate::search::{params_for, ParamKind};
use serde_json::{json, Value};

/// Resource types that are never stored through the REST API: they are operation payloads, or
/// produced by the server itself (AuditEvent comes from the audit log).
pub fn is_storable(resource_type: &str) -> bool {
    !matches!(resource_type, "Parameters" | "OperationOutcome" | "AuditEvent")
}

fn resource_entry(t: &str, update_create: bool) -> Value {
    let mut params = vec![
        json!({"name":"_id","type":"token"}),
        json!({"name":"_lastUpdated","type":"date"}),
    ];
    params.extend(params_for(t).iter().map(|p| json!({"name": p.name, "type": p.kind.code()})));
    let interactions: Vec<Value> = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
        .iter()
        .map(|c| json!({ "code": c }))
        .collect();
    let mut entry = json!({
        "type": t,
        "interaction": interactions,
        "versioning": "versioned-update",
        "readHistory": true,
        "updateCreate": update_create,
        "conditionalCreate": true,
        "conditionalUpdate": true,
        "conditionalDelete": "single",
        "searchParam": params,
    });
    let includes: Vec<String> = params_for(t).iter().filter(|p| p.kind == ParamKind::Reference).map(|p| format!("{t}:{}", p.name)).collect();
    if !includes.is_empty() {
        entry["searchInclude"] = json!(includes);
    }
    entry
}

/// The CapabilityStatement. `date` is the server's start time (an R4 dateTime), `base` the
/// FHIR base URL, `update_create` whether a PUT to an unknown id creates it.
pub fn capability_statement(software_version: &str, date: &str, base: &str, update_create: bool) -> Value {
    let mut resources: Vec<Value> =
        crate::r4::resource_types().iter().copied().filter(|t| is_storable(t)).map(|t| resource_entry(t, update_create)).collect();
    // AuditEvents come from the audit log: searchable by auditors, never written through the API.
    let audit_params: Vec<Value> = [("patient", "reference"), ("agent", "token"), ("date", "date"), ("outcome", "token"), ("action", "token")]
        .iter()
        .map(|(name, kind)| json!({"name": name, "type": kind}))
        .collect();
    resources.push(json!({"type": "AuditEvent", "interaction": [{"code": "search-type"}], "searchParam": audit_params}));
    if let Some(patient) = resources.iter_mut().find(|r| r["type"] == "Patient") {
        patient["operation"] = json!([{"name": "access-log", "definition": "urn:valv:operation:access-log",
            "documentation": "Who accessed this patient's record, each entry with its inclusion proof, the signed checkpoint and the log key"},
            {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            "documentation": "The Patient and the resources it owns, paged (_type, _since, _count, _offset); each type decided on its own"},
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
            "documentation": "Bulk Data export of every patient's resources the caller may read (Prefer: respond-async; _type, _since, _typeFilter)"}]);
    }
    if let Some(group) = resources.iter_mut().find(|r| r["type"] == "Group") {
        group["operation"] = json!([{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
            "documentation": "Bulk Data export of the Group's active member Patients' resources the caller may read"}]);
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "kind": "instance",
        "publisher": "Valv",
        "software": {"name": "Valv", "version": software_version},
        "implementation": {"description": "Valv patient-record server", "url": base},
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "cors": false,
                "description": "HTTPS only. Every request except GET /metadata needs a bearer credential. Access is need-to-know (roles, care teams, Consent, break-glass: POST Patient/{id}/$break-glass; X-Purpose-Of-Use header; SMART system/ scopes for services). Resources are encrypted at rest with per-patient keys.",
                "service": [{"text": "Bearer credentials: API keys (service accounts), session tokens from POST /auth/login (password + TOTP), or JWT access tokens from a configured OpenID Connect provider; or a client certificate (mutual TLS) mapped to a service"}]
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                "documentation": "Bulk Data export (IG v2) of every resource the caller may read, each decided on its patient; NDJSON files sealed at rest, downloaded with the same credential"}],
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_search_params_truthfully() {
        let cs = capability_statement("0.1.0", "2026-01-01", "https://localhost/fhir", true);
        let obs = cs["rest"][0]["resource"].as_array().and_then(|r| r.iter().find(|e| e["type"] == "Observation")).cloned();
        let obs = obs.expect("Observation listed");
        let names: Vec<&str> = obs["searchParam"].as_array().map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect()).unwrap_or_default();
        for n in ["_id", "patient", "code", "date", "status"] {
            assert!(names.contains(&n), "{n}");
        }
        let audit = cs["rest"][0]["resource"].as_array().and_then(|r| r.iter().find(|e| e["type"] == "AuditEvent")).cloned().expect("AuditEvent listed");
        assert_eq!(audit["interaction"], serde_json::json!([{"code": "search-type"}]), "search only, never written");
        assert_eq!((obs["conditionalCreate"].clone(), obs["conditionalDelete"].clone(), obs["updateCreate"].clone()), (json!(true), json!("single"), json!(true)));
        let off = capability_statement("0.1.0", "2026-01-01", "https://localhost/fhir", false);
        assert!(off["rest"][0]["resource"].as_array().expect("resources").iter().filter(|r| r["type"] != "AuditEvent").all(|r| r["updateCreate"] == false));
        let op = |r: &Value| r["operation"].as_array().map(|ops| ops.iter().filter_map(|o| o["name"].as_str().map(str::to_string)).collect::<Vec<_>>()).unwrap_or_default();
        assert_eq!(op(&cs["rest"][0]), ["export"], "system-level $export");
        let group = cs["rest"][0]["resource"].as_array().and_then(|r| r.iter().find(|e| e["type"] == "Group")).cloned().expect("Group listed");
        assert_eq!(op(&group), ["export"]);
        crate::r4::validate(&cs).expect("the CapabilityStatement is valid R4");
    }
}
