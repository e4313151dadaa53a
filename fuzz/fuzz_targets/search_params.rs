//! Any string as a search request: the first line picks the resource type (by its first byte,
//! from a small list), the rest is `k=v` pairs separated by `&` (raw, not percent-decoded).
//! If the request parses, every condition's candidate keys, exactness and precise match against
//! a fixed sample resource of that type are computed. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::sync::OnceLock;
use valv_fhir::search;

const TYPES: [&str; 4] = ["Patient", "Observation", "Encounter", "Condition"];

fn samples() -> &'static [Value; 4] {
    static S: OnceLock<[Value; 4]> = OnceLock::new();
    S.get_or_init(|| {
        [
            json!({"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2024-01-02T03:04:05.000Z"},
                "identifier":[{"system":"urn:mrn","value":"MRN-1"}],
                "name":[{"family":"Öberg","given":["Anna","Maria"]}],
                "birthDate":"1980-04-12","gender":"female","active":true,
                "address":[{"city":"Göteborg","line":["Storgatan 1"]}],
                "managingOrganization":{"reference":"Organization/o1"},
                "generalPractitioner":[{"reference":"Practitioner/pr1"}]}),
            json!({"resourceType":"Observation","id":"o1","meta":{"lastUpdated":"2024-01-02T03:04:05.000Z"},
                "status":"final",
                "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
                "code":{"coding":[{"system":"http://loinc.org","code":"8302-2","display":"Body Height"}]},
                "subject":{"reference":"Patient/p1"},"encounter":{"reference":"Encounter/e1"},
                "effectiveDateTime":"2020-05-05T10:00:00+02:00",
                "performer":[{"reference":"Practitioner/pr1"}],
                "valueQuantity":{"value":170.2,"unit":"cm"}}),
            json!({"resourceType":"Encounter","id":"e1","meta":{"lastUpdated":"2024-01-02T03:04:05.000Z"},
                "status":"finished",
                "class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},
                "type":[{"coding":[{"system":"http://snomed.info/sct","code":"185349003"}]}],
                "subject":{"reference":"Patient/p1"},
                "participant":[{"individual":{"reference":"Practitioner/pr1"}}],
                "period":{"start":"2020-05-05T09:00:00Z","end":"2020-05-05T10:30:00Z"},
                "serviceProvider":{"reference":"Organization/o1"}}),
            json!({"resourceType":"Condition","id":"c1","meta":{"lastUpdated":"2024-01-02T03:04:05.000Z"},
                "clinicalStatus":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/condition-clinical","code":"active"}]},
                "verificationStatus":{"coding":[{"code":"confirmed"}]},
                "category":[{"coding":[{"code":"encounter-diagnosis"}]}],
                "code":{"coding":[{"system":"http://snomed.info/sct","code":"44054006"}],"text":"Diabetes"},
                "subject":{"reference":"Patient/p1"},"encounter":{"reference":"Encounter/e1"},
                "onsetDateTime":"2001-03-04","recordedDate":"2001-03-05T12:00:00Z"}),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    // Lossy, not strict: an invalid byte becomes U+FFFD (three bytes), which puts multi-byte
    // characters at odd byte offsets far more often than valid UTF-8 from the mutator would.
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    let (first, rest) = s.split_once('\n').unwrap_or((s, ""));
    let t = first.bytes().next().map_or(0, |b| usize::from(b) % TYPES.len());
    let resource_type = TYPES[t];
    let pairs: Vec<(String, String)> = rest
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect();
    let Ok(req) = search::parse_request(resource_type, &pairs) else { return };
    let sample = &samples()[t];
    for c in &req.conditions {
        let _ = c.candidate_keys();
        let _ = c.keys_are_exact();
        let _ = c.matches(resource_type, sample);
    }
});
