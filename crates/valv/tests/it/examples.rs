//! The official R4 examples (`hl7.fhir.r4.examples@4.0.1`, 5,306 resources from the npm
//! registry, unpacked by `.ci/run`): every one that is valid R4 loads with its own id (PUT) and
//! reads back equal as a JSON value, decimals included; the ones Valv refuses are exactly those
//! of [`REFUSED`], each with the rule it breaks (docs/EXAMPLES.md lists them).

use crate::harness::Server;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The unpacked package: `VALV_R4_EXAMPLES`, or `target/ci-r4examples/package` (where `.ci/run`
/// puts it).
fn package() -> PathBuf {
    let dir = std::env::var_os("VALV_R4_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/ci-r4examples/package"));
    assert!(
        dir.join("Patient-example.json").exists(),
        "{} is missing: (cd target && npm pack hl7.fhir.r4.examples@4.0.1 && mkdir -p ci-r4examples && tar xzf hl7.fhir.r4.examples-4.0.1.tgz -C ci-r4examples) (.ci/run does)",
        dir.display()
    );
    dir
}

/// Examples Valv refuses: file, status, and words of the diagnostics naming the rule.
const REFUSED: &[(&str, u16, &str)] = &[
    // Invalid R4: a required element is missing (cardinality 1..1 or 1..*).
    ("ImplementationGuide-fhir.json", 400, "ImplementationGuide.name: missing required element"),
    ("ig-r4.json", 400, "ImplementationGuide.name: missing required element"),
    ("Questionnaire-qs1.json", 400, "linkId: missing required element"),
    ("SearchParameter-codesystem-extensions-CodeSystem-author.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-codesystem-extensions-CodeSystem-effective.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-codesystem-extensions-CodeSystem-end.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-codesystem-extensions-CodeSystem-keyword.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-codesystem-extensions-CodeSystem-workflow.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-valueset-extensions-ValueSet-author.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-valueset-extensions-ValueSet-effective.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-valueset-extensions-ValueSet-end.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-valueset-extensions-ValueSet-keyword.json", 400, "SearchParameter.base: missing required element"),
    ("SearchParameter-valueset-extensions-ValueSet-workflow.json", 400, "SearchParameter.base: missing required element"),
    // Invalid R4: an id longer than 64 characters.
    ("SearchParameter-questionnaireresponse-extensions-QuestionnaireResponse-item-subject.json", 400, "is not a valid FHIR id"),
    // Invalid R4: a code ending in U+00A0 (the `code` pattern allows no trailing whitespace).
    ("CodeSystem-v2-0550.json", 400, "is not a valid FHIR code"),
    ("Bundle-v2-valuesets.json", 400, "is not a valid FHIR code"),
    // Valv's rule, not R4's: AuditEvents come only from Valv's own audit log, and
    // OperationOutcomes are answers, never stored.
    ("AuditEvent-example-disclosure.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-error.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-login.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-logout.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-media.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-pixQuery.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-rest.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example-search.json", 405, "AuditEvent resources cannot be stored"),
    ("AuditEvent-example.json", 405, "AuditEvent resources cannot be stored"),
    ("OperationOutcome-101.json", 405, "OperationOutcome resources cannot be stored"),
    ("OperationOutcome-allok.json", 405, "OperationOutcome resources cannot be stored"),
    ("OperationOutcome-break-the-glass.json", 405, "OperationOutcome resources cannot be stored"),
    ("OperationOutcome-exception.json", 405, "OperationOutcome resources cannot be stored"),
    ("OperationOutcome-searchfail.json", 405, "OperationOutcome resources cannot be stored"),
    ("OperationOutcome-validationfail.json", 405, "OperationOutcome resources cannot be stored"),
];

/// A resource as compared: the server's `meta.versionId` and `meta.lastUpdated` left out.
fn comparable(mut v: Value) -> Value {
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            v.as_object_mut().map(|o| o.remove("meta"));
        }
    }
    v
}

/// The patient a 422 says is missing (`… refers to Patient/X, which does not exist …`).
fn missing_patient(diagnostics: &str) -> Option<String> {
    let rest = diagnostics.split("refers to Patient/").nth(1)?;
    rest.split(',').next().map(str::to_string).filter(|_| diagnostics.contains("does not exist"))
}

#[tokio::test]
async fn official_r4_examples_load_and_read_back_equal() {
    let dir = package();
    // The largest example (Bundle-resources.json) is 35 MB.
    let s = Server::start_with("r4examples", &[("VALV_MAX_BODY_BYTES", "67108864"), ("VALV_LIMITS_BODY_MEMORY_BYTES", "1073741824")]);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("package")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| p.file_name().is_some_and(|n| n != "package.json" && !n.to_string_lossy().starts_with('.')))
        .collect();
    // Patients first: other examples point at them.
    files.sort_by_key(|p| (!p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("Patient-")), p.clone()));
    assert!(files.len() > 5000, "{} examples", files.len());
    let mut refused: BTreeMap<String, (u16, String)> = BTreeMap::new();
    let mut loaded: Vec<(String, Value)> = Vec::new();
    let mut placeholders = Vec::new();
    for path in &files {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let raw = std::fs::read(path).expect("read");
        let body: Value = serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (rt, id) = (body["resourceType"].as_str().expect("resourceType"), body["id"].as_str().expect("id"));
        let url = format!("/fhir/{rt}/{id}");
        let mut r = s.request_raw("PUT", &url, Some(&s.data_key), Some(raw.clone()), &[]).await;
        // Valv keeps a patient's resources under their patient, who must exist: examples that
        // point at a Patient the package does not have get a bare one first.
        if r.status == 422 {
            if let Some(p) = missing_patient(&r.outcome(422)) {
                let stub = serde_json::json!({"resourceType": "Patient", "id": p});
                assert_eq!(s.put(&format!("/fhir/Patient/{p}"), &stub, &[]).await.status, 201, "placeholder Patient/{p}");
                placeholders.push(p);
                r = s.request_raw("PUT", &url, Some(&s.data_key), Some(raw), &[]).await;
            }
        }
        match r.status {
            200 | 201 => loaded.push((url, body)),
            status => {
                refused.insert(name, (status, r.json["issue"][0]["diagnostics"].as_str().unwrap_or(&r.text).to_string()));
            }
        }
    }
    let expected: BTreeMap<String, (u16, String)> = REFUSED.iter().map(|(f, st, why)| (f.to_string(), (*st, why.to_string()))).collect();
    let unexpected: Vec<_> = refused.iter().filter(|(f, _)| !expected.contains_key(*f)).collect();
    assert!(unexpected.is_empty(), "refused though not expected: {unexpected:#?}");
    for (file, (status, why)) in &expected {
        let (got, diagnostics) = refused.get(file).unwrap_or_else(|| panic!("{file} loaded, but REFUSED says it breaks: {why}"));
        assert!(got == status && diagnostics.contains(why.as_str()), "{file}: {got} {diagnostics} (expected {status} {why})");
    }
    let mut differ = Vec::new();
    for (url, body) in &loaded {
        let back = s.get(url).await;
        assert_eq!(back.status, 200, "{url}: {}", back.text);
        let stored: Value = serde_json::from_slice(&back.bytes).expect("JSON");
        if comparable(stored) != comparable(body.clone()) {
            differ.push(url.clone());
        }
    }
    assert!(differ.is_empty(), "read back different: {differ:?}");
    assert_eq!(loaded.len() + refused.len(), files.len());
    eprintln!("{} examples loaded and read back equal, {} refused, {} placeholder Patients", loaded.len(), refused.len(), placeholders.len());
}
