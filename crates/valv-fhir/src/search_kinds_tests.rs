//! A table-driven test of search: every parameter kind (string, token, reference, date, number,
//! quantity, uri, composite), every modifier Valv supports and every prefix, on a handful of
//! resources, with the expected results written out by hand (not computed by Valv's code). For
//! the indexed parameters it also checks that every match carries one of the index keys the
//! search asks the store for, so the index can never hide a match.

use crate::search::{index_keys, params_for, parse_request, ParamKind};
use serde_json::{json, Value};

fn resources() -> Vec<Value> {
    vec![
        json!({"resourceType": "Observation", "id": "A", "status": "final",
            "identifier": [{"system": "urn:ids", "value": "A1", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}}],
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-03-01",
            "performer": [{"identifier": {"system": "urn:staff", "value": "S9"}}],
            "valueQuantity": {"value": 120, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
            "component": [{"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                "valueQuantity": {"value": 80, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]}),
        json!({"resourceType": "Observation", "id": "B", "status": "amended",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}], "text": "Glucose"},
            "subject": {"reference": "Patient/p2"}, "effectivePeriod": {"start": "2024-05-01", "end": "2024-05-03"},
            "valueQuantity": {"value": 6.3, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}),
        json!({"resourceType": "Observation", "id": "C", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}], "text": "Tobacco smoking status"},
            "subject": {"reference": "Group/g1"}, "effectiveDateTime": "2023-12-31",
            "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "266919005"}], "text": "Never smoked"}}),
        json!({"resourceType": "Patient", "id": "P1", "name": [{"family": "Ström", "given": ["Anna"]}],
            "telecom": [{"system": "phone", "value": "555-1234"}, {"system": "email", "value": "anna@example.org"}],
            "address": [{"city": "Göteborg", "postalCode": "41101"}], "birthDate": "1970-06-15", "gender": "female"}),
        json!({"resourceType": "Patient", "id": "P2", "name": [{"family": "Strand"}],
            "telecom": [{"system": "email", "value": "555-1234"}], "address": [{"city": "Malmö"}], "gender": "male"}),
        json!({"resourceType": "RiskAssessment", "id": "R1", "status": "final", "subject": {"reference": "Patient/p1"}, "prediction": [{"probabilityDecimal": 0.02}]}),
        json!({"resourceType": "RiskAssessment", "id": "R2", "status": "final", "subject": {"reference": "Patient/p2"}, "prediction": [{"probabilityDecimal": 0.5}]}),
        json!({"resourceType": "ValueSet", "id": "V1", "status": "active", "url": "http://example.org/fhir/ValueSet/a"}),
        json!({"resourceType": "ValueSet", "id": "V2", "status": "active", "url": "http://example.org/fhir/ValueSet/a/b"}),
        json!({"resourceType": "ValueSet", "id": "V3", "status": "active", "url": "http://other.org/vs"}),
        json!({"resourceType": "Claim", "id": "K1", "status": "active", "use": "claim", "patient": {"reference": "Patient/p1"}, "created": "2024-01-05"}),
        json!({"resourceType": "Claim", "id": "K2", "status": "active", "use": "claim", "patient": {"reference": "Patient/p2"}, "created": "2024-02-05"}),
    ]
}

/// (type, query, the ids that must match, in the order of `resources()`).
const CASES: &[(&str, &str, &[&str])] = &[
    // token (indexed): system|code, code, |code-without-system, system|, :not, :text, :of-type
    ("Observation", "code=http://loinc.org|8480-6", &["A"]),
    ("Observation", "code=8480-6,2339-0", &["A", "B"]),
    ("Observation", "code=http://loinc.org|", &["A", "B", "C"]),
    ("Observation", "status:not=final", &["B"]),
    ("Observation", "code:text=tobacco", &["C"]),
    ("Observation", "code:text=systolic", &["A"]),
    ("Observation", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|A1", &["A"]),
    ("Observation", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|A2", &[]),
    ("Patient", "gender=female", &["P1"]),
    // token (generated, decided after decryption), with a filtered path: phone is telecom[system=phone]
    ("Patient", "phone=555-1234", &["P1"]),
    ("Patient", "email=555-1234", &["P2"]),
    ("Observation", "value-concept=http://snomed.info/sct|266919005", &["C"]),
    ("Observation", "combo-code=8462-4", &["A"]),
    // :missing on any kind
    ("Observation", "value-quantity:missing=true", &["C"]),
    ("Observation", "value-quantity:missing=false", &["A", "B"]),
    ("Patient", "birthdate:missing=true", &["P2"]),
    // string: prefix, accents and case ignored; :exact; :contains; generated address-city
    ("Patient", "family=strom", &["P1"]),
    ("Patient", "family=str", &["P1", "P2"]),
    ("Patient", "family:exact=Ström", &["P1"]),
    ("Patient", "family:exact=ström", &[]),
    ("Patient", "family:contains=ran", &["P2"]),
    ("Patient", "address-city=goteborg", &["P1"]),
    ("Patient", "address-city:contains=alm", &["P2"]),
    ("Patient", "address-postalcode=411", &["P1"]),
    // reference: id, Type/id, :Type, target restriction (patient = subject pointing at a Patient), :identifier
    ("Observation", "subject=Patient/p1", &["A"]),
    ("Observation", "subject=g1", &["C"]),
    ("Observation", "subject:Group=g1", &["C"]),
    ("Observation", "patient=g1", &[]),
    ("Observation", "patient=p2", &["B"]),
    ("Observation", "performer:identifier=urn:staff|S9", &["A"]),
    ("Claim", "patient=p1", &["K1"]),
    ("Claim", "patient=Patient/p2", &["K2"]),
    ("RiskAssessment", "subject=p2", &["R2"]),
    // date: every prefix, a Period, partial dates
    ("Observation", "date=2024-03", &["A"]),
    ("Observation", "date=ge2024-01-01", &["A", "B"]),
    ("Observation", "date=lt2024", &["C"]),
    ("Observation", "date=gt2024-03-01", &["B"]),
    ("Observation", "date=le2024-03-01", &["A", "C"]),
    ("Observation", "date=ne2024-03-01", &["B", "C"]),
    ("Observation", "date=sa2024-04", &["B"]),
    ("Observation", "date=eb2024-01-01", &["C"]),
    ("Observation", "date=ap2024-03-01", &["A"]),
    ("Observation", "date=2024-05-02", &[]),
    ("Observation", "date=ge2024-05-02", &["B"]),
    ("Claim", "created=ge2024-02", &["K2"]),
    // number (generated): the precision of the search value makes its range
    ("RiskAssessment", "probability=0.02", &["R1"]),
    ("RiskAssessment", "probability=0.020", &["R1"]),
    ("RiskAssessment", "probability=0.03", &[]),
    ("RiskAssessment", "probability=gt0.1", &["R2"]),
    ("RiskAssessment", "probability=le0.02", &["R1"]),
    ("RiskAssessment", "probability=ap0.5", &["R2"]),
    // quantity (generated): number, number|system|code, number||code, prefixes
    ("Observation", "value-quantity=6.3|http://unitsofmeasure.org|mmol/L", &["B"]),
    ("Observation", "value-quantity=6.3|http://loinc.org|mmol/L", &[]),
    ("Observation", "value-quantity=gt100", &["A"]),
    ("Observation", "value-quantity=120||mm[Hg]", &["A"]),
    ("Observation", "value-quantity=ap6", &["B"]),
    ("Observation", "value-quantity=ne120", &["B"]),
    ("Observation", "value-quantity=lt7||mmol/L", &["B"]),
    ("Observation", "component-value-quantity=80", &["A"]),
    // uri (generated): exact, :below, :above
    ("ValueSet", "url=http://example.org/fhir/ValueSet/a", &["V1"]),
    ("ValueSet", "url:below=http://example.org/fhir/ValueSet/a", &["V1", "V2"]),
    ("ValueSet", "url:above=http://example.org/fhir/ValueSet/a/b/c", &["V1", "V2"]),
    ("ValueSet", "url:below=http://other.org", &["V3"]),
    // composite (generated): the parts on one element
    ("Observation", "code-value-quantity=http://loinc.org|8480-6$gt100", &["A"]),
    ("Observation", "code-value-quantity=http://loinc.org|8480-6$lt100", &[]),
    ("Observation", "code-value-quantity=2339-0$6.3||mmol/L", &["B"]),
    ("Observation", "component-code-value-quantity=http://loinc.org|8462-4$80", &["A"]),
    ("Observation", "component-code-value-quantity=http://loinc.org|8480-6$80", &[], ),
    ("Observation", "combo-code-value-quantity=8462-4$80||mm[Hg]", &["A"]),
    ("Observation", "combo-code-value-quantity=8480-6$80", &[]),
    ("Observation", "code-value-concept=72166-2$http://snomed.info/sct|266919005", &["C"]),
    // several conditions AND, a comma ORs
    ("Observation", "status=final&date=ge2024", &["A"]),
    ("Observation", "value-quantity=120,6.3", &["A", "B"]),
];

fn pairs(query: &str) -> Vec<(String, String)> {
    query.split('&').map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).expect("k=v")).collect()
}

#[test]
fn every_kind_modifier_and_prefix_finds_what_the_table_says() {
    let all = resources();
    for (resource_type, query, expected) in CASES {
        let req = parse_request(resource_type, &pairs(query)).unwrap_or_else(|e| panic!("{resource_type}?{query}: {e:?}"));
        let found: Vec<&str> = all
            .iter()
            .filter(|r| r["resourceType"] == *resource_type)
            .filter(|r| req.conditions.iter().all(|c| c.matches(resource_type, r)))
            .filter_map(|r| r["id"].as_str())
            .collect();
        assert_eq!(&found, expected, "{resource_type}?{query}");
        // What the index is asked for, every match carries.
        for r in all.iter().filter(|r| r["id"].as_str().is_some_and(|id| found.contains(&id))) {
            let keys = index_keys(resource_type, r);
            for c in &req.conditions {
                if let Some(wanted) = c.candidate_keys() {
                    assert!(keys.iter().any(|k| k.param == c.param && wanted.contains(&k.key)), "{resource_type}?{query}: {} lacks an index key of {}", r["id"], c.param);
                }
            }
        }
    }
}

#[test]
fn every_kind_is_covered_by_the_table() {
    for kind in [ParamKind::String, ParamKind::Token, ParamKind::Reference, ParamKind::Date, ParamKind::Number, ParamKind::Quantity, ParamKind::Uri, ParamKind::Composite] {
        let covered = CASES.iter().any(|(t, q, _)| {
            pairs(q).iter().any(|(k, _)| params_for(t).iter().any(|d| d.kind == kind && d.name == k.split(':').next().unwrap_or("")))
        });
        assert!(covered, "no case for {kind:?}");
    }
}

#[test]
fn malformed_values_of_the_new_kinds_are_refused() {
    for (t, q) in [
        ("RiskAssessment", "probability=abc"),
        ("Observation", "value-quantity=5|only-a-system"),
        ("Observation", "code-value-quantity=8480-6"),
        ("Observation", "code-value-quantity=a$b$c"),
        ("Observation", "value-quantity:contains=5"),
        ("ValueSet", "url:contains=x"),
        ("Observation", "code:below=x"),
        ("Observation", "code-value-quantity:missing=true"),
        ("RiskAssessment", "probability=1e-2147483648"),
    ] {
        assert!(parse_request(t, &pairs(q)).is_err(), "{t}?{q}");
    }
}

#[test]
fn generated_table_parses_and_covers_r4() {
    use crate::search::{generated_def, GENERATED};
    let lines: Vec<&str> = GENERATED.lines().collect();
    assert!(lines.len() >= 1600, "{} lines", lines.len());
    let unparsed: Vec<&&str> = lines.iter().filter(|l| generated_def(l).is_none()).collect();
    assert!(unparsed.is_empty(), "{unparsed:?}");
    // Every line is a parameter of its type: hand-picked and indexed, or generated.
    for l in &lines {
        let (t, def) = generated_def(l).expect("parsed");
        assert!(params_for(t).iter().any(|d| d.name == def.name && d.kind == def.kind), "{t}.{} missing or of another kind", def.name);
    }
    let claim: Vec<&str> = params_for("Claim").iter().map(|d| d.name).collect();
    assert!(claim.contains(&"patient") && claim.contains(&"created"), "{claim:?}");
}

#[test]
fn sort_values_from_the_partial_parse_equal_those_of_the_whole_resource() {
    use crate::search::{sort_value, sort_values_of};
    for r in resources() {
        let t = r["resourceType"].as_str().expect("type");
        let bytes = serde_json::to_vec(&r).expect("json");
        for sort in ["date", "-date", "value-quantity", "-value-quantity", "family", "_id", "-_lastUpdated", "code", "subject", "probability", "url", "status,-date", "phone"] {
            let Ok(req) = parse_request(t, &pairs(&format!("_sort={sort}"))) else { continue };
            let whole: Vec<_> = req.sort_keys.iter().map(|k| sort_value(k, &r)).collect();
            assert_eq!(sort_values_of(&req.sort_keys, &bytes), Some(whole), "{t} {} _sort={sort}", r["id"]);
        }
    }
    assert_eq!(sort_values_of(&[], b"[1]"), None, "not an object");
}

#[test]
fn conditions_on_the_partial_parse_decide_as_on_the_whole_resource() {
    use crate::search::{all_match_json, params_for};
    let mut compared = (0, 0);
    for r in resources() {
        let t = r["resourceType"].as_str().expect("type");
        let bytes = serde_json::to_vec(&r).expect("json");
        let mut queries: Vec<String> = [
            "_id=A", "_id=B,P1", "_lastUpdated=gt2020", "status=final", "status:not=final", "code=http://loinc.org|8480-6", "code=8480-6,72166-2",
            "subject=Patient/p1", "patient=p2", "date=ge2024-04", "value-quantity=gt100", "component-code=8462-4", "combo-code=8462-4",
            "family=str", "name=anna", "address-city=malmö", "phone=555-1234", "email=555-1234", "birthdate=1970", "gender=male",
            "identifier=urn:ids|A1", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|A1", "probability=gt0.1",
            "value-concept=266919005", "code:text=glucose", "status=final&subject=Patient/p1",
            "code-value-quantity=http://loinc.org|8480-6$gt100", "combo-code-value-quantity=8462-4$lt90", "code-value-concept=72166-2$266919005",
        ]
        .iter()
        .map(|q| q.to_string())
        .collect();
        // Every parameter of the type with :missing, so that every path is looked at.
        for def in params_for(t) {
            queries.push(format!("{}:missing=true", def.name));
            queries.push(format!("{}:missing=false", def.name));
        }
        for q in queries {
            let Ok(req) = parse_request(t, &pairs(&q)) else { continue };
            let whole = req.conditions.iter().all(|c| c.matches(t, &r));
            assert_eq!(all_match_json(&req.conditions, t, &bytes), Some(whole), "{t} {} ?{q}", r["id"]);
            compared.1 += 1;
            compared.0 += usize::from(whole);
        }
    }
    assert!(compared.0 > 20 && compared.1 - compared.0 > 20, "both outcomes compared: {compared:?}");
    assert_eq!(all_match_json(&[], "Patient", b"[1]"), None, "not an object");
}
