//! Real FHIR client libraries against the real binary: fhirpy's `count()`, `sort()`,
//! `include()`, `patch()` and `get_or_create()`, and a search through fhirclient (SMART on
//! FHIR's client-py), run by `tests/clients/check.py` in the venv `.ci/run` installs.

use crate::harness::Server;
use serde_json::json;
use std::path::PathBuf;
use std::process::Command;

/// The venv's Python: `VALV_TEST_PYTHON`, or `target/ci-fhirclients` (where `.ci/run` puts it).
fn python() -> PathBuf {
    let path = std::env::var_os("VALV_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/ci-fhirclients/bin/python"));
    assert!(path.exists(), "{} is missing: python3 -m venv target/ci-fhirclients && target/ci-fhirclients/bin/pip install fhirpy==2.3.1 fhirclient==4.4.0 (.ci/run does)", path.display());
    path
}

#[tokio::test]
async fn fhirpy_and_fhirclient_work_against_the_server() {
    let s = Server::start("clients");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Clients"}]})).await.id();
    for year in [2022, 2024, 2021, 2023] {
        let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "pulse"}, "subject": {"reference": format!("Patient/{p}")}, "effectiveDateTime": format!("{year}-05-01")});
        assert_eq!(s.post("/fhir/Observation", &o).await.status, 201);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/check.py");
    let out = Command::new(python())
        .arg(&script)
        .env("VALV_URL", format!("https://127.0.0.1:{}/fhir", s.port))
        .env("VALV_TOKEN", &s.data_key)
        .env("VALV_CA", s.data.join("tls/cert.pem"))
        // requests prefers these to a session's own `verify` when they are set (as on machines
        // with a system bundle configured): they name the server's certificate too.
        .env("REQUESTS_CA_BUNDLE", s.data.join("tls/cert.pem"))
        .env("CURL_CA_BUNDLE", s.data.join("tls/cert.pem"))
        .env("VALV_PATIENT", &p)
        .output()
        .expect("run python");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client checks failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok: ")).count(), 6, "{stdout}");
}
