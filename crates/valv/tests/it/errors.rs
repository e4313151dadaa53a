//! Bad input gets a precise OperationOutcome with the right status, and changes nothing.

use crate::harness::Server;
use serde_json::json;

struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    /// A fragment the diagnostics must contain.
    says: &'static str,
}

fn case(what: &'static str, method: &'static str, path: &str, body: Option<&str>, status: u16, says: &'static str) -> Case {
    Case { what, method, path: path.to_string(), body: body.map(|b| b.as_bytes().to_vec()), headers: vec![], status, says }
}

#[tokio::test]
async fn bad_inputs_table() {
    let s = Server::start_with("errors", &[("VALV_MAX_BODY_BYTES", "65536")]);
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Stable"}]})).await.id();
    let pp = format!("/fhir/Patient/{p}");
    let huge = format!("{{\"resourceType\":\"Patient\",\"name\":[{{\"family\":\"{}\"}}]}}", "x".repeat(70_000));
    let mut cases = vec![
        case("malformed JSON", "POST", "/fhir/Patient", Some("{\"resourceType\": \"Patient\","), 400, "malformed JSON"),
        case("not an object", "POST", "/fhir/Patient", Some("[1,2]"), 400, "JSON object"),
        case("unknown resourceType in body", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Spaceship\"}"), 400, "Spaceship"),
        case("a code outside a required binding", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"gender\":\"xyz\"}"), 400, "required binding"),
        case("missing resourceType", "POST", "/fhir/Patient", Some("{\"name\":[]}"), 400, "resourceType"),
        case("body type differs from URL", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Observation\",\"status\":\"final\",\"code\":{\"text\":\"x\"}}"), 400, "URL names Patient"),
        case("wrong JSON type for birthDate", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"birthDate\":19800412}"), 400, "birthDate"),
        case("wrong JSON type for active", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"active\":\"yes\"}"), 400, "active"),
        case("invalid date", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"birthDate\":\"1980-02-31\"}"), 400, "birthDate"),
        case("unknown element", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"favouriteColour\":\"red\"}"), 400, "favouriteColour"),
        case("single value where an array belongs", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"name\":{\"family\":\"x\"}}"), 400, "name"),
        case("bad id in URL", "GET", "/fhir/Patient/bad$id", None, 400, "not a valid FHIR id"),
        case("id too long", "GET", &format!("/fhir/Patient/{}", "a".repeat(65)), None, 400, "not a valid FHIR id"),
        case("path injection", "GET", "/fhir/Patient/..%2F..%2Fetc%2Fpasswd", None, 400, "not a valid FHIR id"),
        case("unknown id", "GET", "/fhir/Patient/no-such-patient", None, 404, "not known"),
        case("unknown type in URL", "GET", "/fhir/Spaceship/1", None, 404, "Spaceship"),
        case("unknown endpoint", "GET", "/admin/secret", None, 404, "no such endpoint"),
        case("method not allowed", "OPTIONS", &pp, None, 405, "not allowed"),
        case("DELETE on a type", "DELETE", "/fhir/Patient", None, 405, "not allowed"),
        case("AuditEvent cannot be written", "POST", "/fhir/AuditEvent", Some("{\"resourceType\":\"AuditEvent\"}"), 405, "AuditEvent"),
        case("update without id in body", "PUT", &pp, Some("{\"resourceType\":\"Patient\"}"), 400, "id"),
        case("update with another id", "PUT", &pp, Some("{\"resourceType\":\"Patient\",\"id\":\"other\"}"), 400, "does not match"),
        case("body over the size limit", "POST", "/fhir/Patient", Some(&huge), 413, "exceeds"),
        case("unknown search parameter", "GET", "/fhir/Patient?colour=red", None, 400, "colour"),
        case("unsupported modifier", "GET", "/fhir/Patient?gender:below=x", None, 400, "terminology"),
        case("bad date in search", "GET", "/fhir/Patient?birthdate=19800412", None, 400, "19800412"),
        case("multi-byte characters in a date (fuzz finding)", "GET", "/fhir/Patient?_lastUpdated=a%E2%82%AC", None, 400, "not a valid FHIR date"),
        case("bad _count", "GET", "/fhir/Patient?_count=many", None, 400, "_count"),
        case("SQL injection in a search value", "GET", "/fhir/Patient?family=x%27%3B%20DROP%20TABLE%20resources%3B--", None, 200, ""),
        case("SQL injection as parameter name", "GET", "/fhir/Patient?1%3D1%3B--=x", None, 400, "unknown search parameter"),
        case("transaction with dangling urn:uuid", "POST", "/fhir", Some("{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[{\"fullUrl\":\"urn:uuid:a\",\"resource\":{\"resourceType\":\"Observation\",\"status\":\"final\",\"code\":{\"text\":\"x\"},\"subject\":{\"reference\":\"urn:uuid:nowhere\"}},\"request\":{\"method\":\"POST\",\"url\":\"Observation\"}}]}"), 422, "does not resolve"),
        case("reference to a patient that does not exist", "POST", "/fhir/Observation", Some("{\"resourceType\":\"Observation\",\"status\":\"final\",\"code\":{\"text\":\"x\"},\"subject\":{\"reference\":\"Patient/ghost\"}}"), 422, "does not exist"),
        case("collection bundle posted to base", "POST", "/fhir", Some("{\"resourceType\":\"Bundle\",\"type\":\"collection\"}"), 422, "collection"),
        case("same resource twice in a transaction", "POST", "/fhir", Some(&format!("{{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[{{\"resource\":{{\"resourceType\":\"Patient\",\"id\":\"{p}\"}},\"request\":{{\"method\":\"PUT\",\"url\":\"Patient/{p}\"}}}},{{\"request\":{{\"method\":\"DELETE\",\"url\":\"Patient/{p}\"}}}}]}}")), 422, "more than once"),
    ];
    let mut wrong_ct = case("wrong Content-Type", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\"}"), 415, "Content-Type");
    wrong_ct.headers = vec![("content-type", "text/plain")];
    cases.push(wrong_ct);
    let mut bad_accept = case("unacceptable Accept", "GET", &pp, None, 406, "application/fhir+json");
    bad_accept.headers = vec![("accept", "application/xml")];
    cases.push(bad_accept);
    let mut bad_if_match = case("malformed If-Match", "PUT", &pp, Some(&format!("{{\"resourceType\":\"Patient\",\"id\":\"{p}\"}}")), 400, "If-Match");
    bad_if_match.headers = vec![("if-match", "banana")];
    cases.push(bad_if_match);
    // A client relies on If-None-Exist not to make a duplicate: where it means nothing, or with
    // criteria the index cannot decide exactly, it is refused, never ignored.
    let mut misplaced = case("If-None-Exist on an update", "PUT", &pp, Some(&format!("{{\"resourceType\":\"Patient\",\"id\":\"{p}\"}}")), 400, "If-None-Exist");
    misplaced.headers = vec![("if-none-exist", "family=Twice")];
    cases.push(misplaced);
    let mut inexact = case("If-None-Exist by a date", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"Twice\"}]}"), 400, "condition must name");
    inexact.headers = vec![("if-none-exist", "birthdate=1970")];
    cases.push(inexact);
    let mut shaping = case("If-None-Exist with _count", "POST", "/fhir/Patient", Some("{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"Twice\"}]}"), 400, "_count");
    shaping.headers = vec![("if-none-exist", "family=Twice&_count=1")];
    cases.push(shaping);
    cases.push(case("conditional delete without a selective criterion", "DELETE", "/fhir/Patient?_lastUpdated=gt2000", None, 400, "condition must name"));
    let mut stale = case("stale If-Match", "PUT", &pp, Some(&format!("{{\"resourceType\":\"Patient\",\"id\":\"{p}\"}}")), 412, "version");
    stale.headers = vec![("if-match", "W/\"5\"")];
    cases.push(stale);

    for c in &cases {
        let r = s.request_raw(c.method, &c.path, Some(&s.data_key), c.body.clone(), &c.headers).await;
        if c.status == 200 {
            assert_eq!(r.status, 200, "{}: {}", c.what, r.text);
            continue;
        }
        let d = r.outcome(c.status);
        assert!(d.contains(c.says), "{}: diagnostics '{d}' should mention '{}'", c.what, c.says);
        // Nothing changed: one patient, still at version 1 and unchanged.
        let now = s.get(&pp).await;
        assert_eq!(now.json["meta"]["versionId"], "1", "{} changed the patient", c.what);
        assert_eq!(now.json["name"][0]["family"], "Stable");
        assert_eq!(s.get("/fhir/Patient?_summary=count").await.total(), 1, "{} created something", c.what);
        assert_eq!(s.get("/fhir/Observation?_summary=count").await.total(), 0, "{} created something", c.what);
    }
}
