//! Every listed search parameter on every listed type, with a hit and a miss each; paging.

use crate::harness::Server;
use serde_json::{json, Value};

fn cc(system: &str, code: &str) -> Value {
    json!({"coding":[{"system":system,"code":code}]})
}

/// (type, resource, [(query, expected to match)]) — `{P}` is the patient id, `{O}` an Organization.
/// A resource type, a resource of it, and queries with whether each must match.
type Case = (&'static str, Value, Vec<(&'static str, bool)>);

fn cases() -> Vec<Case> {
    let subj = json!({"reference":"Patient/{P}"});
    let ident = json!([{"system":"urn:test","value":"ID-{T}"}]);
    vec![
        ("Practitioner", json!({"resourceType":"Practitioner","identifier":ident,"name":[{"family":"Åkesson","given":["Nils"]}],"gender":"male"}),
            vec![("name=akess", true), ("family=Akesson", true), ("given=nil", true), ("given=Olle", false), ("gender=male", true), ("gender=female", false), ("identifier=urn:test|ID-Practitioner", true)]),
        ("Organization", json!({"resourceType":"Organization","identifier":ident,"name":"Sjukhuset Norr","active":true}),
            vec![("name=sjukhuset", true), ("name=Norr", false), ("name:exact=Sjukhuset Norr", true), ("identifier=ID-Organization", true)]),
        ("Observation", json!({"resourceType":"Observation","identifier":ident,"status":"final","subject":subj,
            "code":cc("http://loinc.org","8867-4"),"category":[cc("http://terminology.hl7.org/CodeSystem/observation-category","vital-signs")],
            "effectiveDateTime":"2021-03-04T10:00:00Z"}),
            vec![("patient={P}", true), ("subject=Patient/{P}", true), ("patient=nobody", false), ("code=http://loinc.org|8867-4", true), ("code=8480-6", false),
                 ("category=vital-signs", true), ("status=final", true), ("status=preliminary", false), ("date=2021-03", true), ("date=gt2021-03-04", false),
                 ("date=ge2021-03-04", true), ("date=lt2022", true), ("date=le2020", false), ("identifier=ID-Observation", true), ("_lastUpdated=gt2020-01-01", true), ("_lastUpdated=lt2020-01-01", false)]),
        ("Condition", json!({"resourceType":"Condition","identifier":ident,"subject":subj,"code":cc("http://snomed.info/sct","44054006"),
            "category":[cc("http://terminology.hl7.org/CodeSystem/condition-category","encounter-diagnosis")],"onsetDateTime":"2015-06-01","recordedDate":"2015-06-02"}),
            vec![("patient={P}", true), ("subject={P}", true), ("code=44054006", true), ("code=38341003", false), ("category=encounter-diagnosis", true), ("onset-date=2015", true), ("recorded-date=2015-06-01", false)]),
        ("Encounter", json!({"resourceType":"Encounter","identifier":ident,"status":"finished","subject":subj,
            "class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"},"period":{"start":"2020-01-01T08:00:00Z","end":"2020-01-01T09:00:00Z"}}),
            vec![("patient={P}", true), ("status=finished", true), ("status=planned", false), ("date=2020-01-01", true), ("date=2019", false), ("identifier=urn:test|ID-Encounter", true)]),
        ("Procedure", json!({"resourceType":"Procedure","identifier":ident,"status":"completed","subject":subj,"code":cc("http://snomed.info/sct","80146002"),"performedDateTime":"2019-05-05"}),
            vec![("patient={P}", true), ("code=80146002", true), ("status=completed", true), ("date=2019-05-05", true), ("date=2019-05-06", false)]),
        ("MedicationRequest", json!({"resourceType":"MedicationRequest","identifier":ident,"status":"active","intent":"order","subject":subj,
            "medicationCodeableConcept":cc("http://www.nlm.nih.gov/research/umls/rxnorm","313782"),"authoredOn":"2022-02-02",
            "category":[cc("http://terminology.hl7.org/CodeSystem/medicationrequest-category","outpatient")]}),
            vec![("patient={P}", true), ("code=313782", true), ("status=active", true), ("status=stopped", false), ("category=outpatient", true), ("identifier=ID-MedicationRequest", true)]),
        ("AllergyIntolerance", json!({"resourceType":"AllergyIntolerance","identifier":ident,"patient":subj,"code":cc("http://snomed.info/sct","300916003"),
            "category":["food"],"recordedDate":"2018-01-01"}),
            vec![("patient={P}", true), ("code=300916003", true), ("category=food", true), ("category=medication", false), ("date=2018", true)]),
        ("Immunization", json!({"resourceType":"Immunization","identifier":ident,"status":"completed","patient":subj,
            "vaccineCode":cc("http://hl7.org/fhir/sid/cvx","140"),"occurrenceDateTime":"2020-10-10"}),
            vec![("patient={P}", true), ("status=completed", true), ("date=2020-10", true), ("date=2021", false), ("identifier=ID-Immunization", true)]),
        ("DiagnosticReport", json!({"resourceType":"DiagnosticReport","identifier":ident,"status":"final","subject":subj,"code":cc("http://loinc.org","58410-2"),
            "category":[cc("http://terminology.hl7.org/CodeSystem/v2-0074","LAB")],"effectiveDateTime":"2021-01-01T00:00:00Z"}),
            vec![("patient={P}", true), ("code=58410-2", true), ("category=LAB", true), ("status=final", true), ("date=2021-01-01", true), ("date=2021-01-02", false)]),
        ("DocumentReference", json!({"resourceType":"DocumentReference","identifier":ident,"status":"current","subject":subj,
            "category":[cc("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category","clinical-note")],"date":"2021-05-05T12:00:00Z",
            "content":[{"attachment":{"contentType":"text/plain","data":"bm90ZQ=="}}]}),
            vec![("patient={P}", true), ("status=current", true), ("category=clinical-note", true), ("date=2021-05-05", true), ("date=2021-05-06", false)]),
        ("CareTeam", json!({"resourceType":"CareTeam","identifier":ident,"status":"active","subject":subj,"period":{"start":"2020-01-01"},
            "category":[cc("http://loinc.org","LA27976-2")]}),
            vec![("patient={P}", true), ("status=active", true), ("category=LA27976-2", true), ("date=ge2030", true), ("date=2030", false), ("date=lt2019", false)]),
        ("Consent", json!({"resourceType":"Consent","identifier":ident,"status":"active","patient":subj,
            "scope":cc("http://terminology.hl7.org/CodeSystem/consentscope","patient-privacy"),
            "category":[cc("http://loinc.org","59284-0")],"dateTime":"2020-02-02"}),
            vec![("patient={P}", true), ("status=active", true), ("status=inactive", false), ("category=59284-0", true), ("date=2020-02-02", true)]),
    ]
}

#[tokio::test]
async fn every_listed_parameter_hits_and_misses() {
    let s = Server::start("search");
    let patient = s.post("/fhir/Patient", &json!({"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"MRN-77"}],
        "name":[{"family":"Öberg","given":["Anna","Maria"]}],"birthDate":"1980-04-12","gender":"female"})).await;
    assert_eq!(patient.status, 201, "{}", patient.text);
    let pid = patient.id();
    // A second patient that must never match the first one's queries.
    s.post("/fhir/Patient", &json!({"resourceType":"Patient","name":[{"family":"Other"}],"birthDate":"1999","gender":"male"})).await;
    for (q, hit) in [("family=oberg", true), ("family=Öb", true), ("family=berg", false), ("given=mar", true), ("name=anna", true),
        ("identifier=urn:mrn|MRN-77", true), ("identifier=urn:other|MRN-77", false), ("birthdate=1980-04-12", true), ("birthdate=ge1980-05", false),
        ("birthdate=lt1981", true), ("gender=female", true), ("_id={P}", true), ("family:exact=Öberg", true), ("family:exact=oberg", false)] {
        let q = q.replace("{P}", &pid);
        let r = s.get(&format!("/fhir/Patient?{}", encode_query(&q))).await;
        assert_eq!(r.status, 200, "{q}: {}", r.text);
        assert_eq!(r.entry_ids().contains(&pid), hit, "Patient?{q}: {}", r.text);
        if hit {
            assert_eq!(r.total(), 1, "Patient?{q} matches only Anna");
        }
    }
    for (t, body, queries) in cases() {
        let text = body.to_string().replace("{P}", &pid).replace("{T}", t);
        let created = s.post(&format!("/fhir/{t}"), &serde_json::from_str(&text).expect("json")).await;
        assert_eq!(created.status, 201, "{t}: {}", created.text);
        let id = created.id();
        for (q, hit) in queries {
            let q = q.replace("{P}", &pid);
            let r = s.get(&format!("/fhir/{t}?{}", encode_query(&q))).await;
            assert_eq!(r.status, 200, "{t}?{q}: {}", r.text);
            assert_eq!(r.entry_ids().contains(&id), hit, "{t}?{q}: {}", r.text);
        }
    }
}

/// Percent-encodes the characters of a test query that need it (`|`, space, non-ASCII).
fn encode_query(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'=' | b':' | b'/' | b'&' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn paging_follows_next_links_and_totals_are_exact() {
    let s = Server::start("paging");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","gender":"other"})).await.id();
    for i in 0..25 {
        let o = json!({"resourceType":"Observation","status":"final","code":{"text":format!("n{i}")},"subject":{"reference":format!("Patient/{p}")},
            "effectiveDateTime": format!("2020-01-{:02}", i + 1)});
        assert_eq!(s.post("/fhir/Observation", &o).await.status, 201);
    }
    let mut seen = Vec::new();
    let mut url = format!("/fhir/Observation?patient={p}&_count=10");
    loop {
        let page = s.get(&url).await;
        assert_eq!(page.status, 200, "{}", page.text);
        assert_eq!(page.total(), 25);
        seen.extend(page.entry_ids());
        let next = page.json["link"].as_array().and_then(|l| l.iter().find(|x| x["relation"] == "next")).and_then(|x| x["url"].as_str()).map(str::to_string);
        match next {
            Some(n) => url = n[n.find("/fhir/").expect("path")..].to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 25, "no duplicates across pages");
    // Date ranges need decryption to filter precisely; the total still counts only matches.
    let ranged = s.get(&format!("/fhir/Observation?patient={p}&date=ge2020-01-10&date=lt2020-01-20&_count=5")).await;
    assert_eq!(ranged.total(), 10, "{}", ranged.text);
    assert_eq!(ranged.entry_ids().len(), 5);
    let count_only = s.get(&format!("/fhir/Observation?patient={p}&_summary=count")).await;
    assert_eq!(count_only.total(), 25);
    assert!(count_only.json.get("entry").is_none());
    let sorted = s.get(&format!("/fhir/Observation?patient={p}&_sort=-_lastUpdated&_count=1")).await;
    assert_eq!(sorted.json["entry"][0]["resource"]["code"]["text"], "n24");
}

/// Past 1,000 matches a search leaves `total` out (unless asked for it) and still pages on.
#[tokio::test]
async fn totals_past_the_bound_are_left_out_unless_asked_for() {
    let s = Server::start("bigtotal");
    let p = s.post("/fhir/Patient", &json!({"resourceType":"Patient","gender":"other"})).await.id();
    for _ in 0..2 {
        let entries: Vec<serde_json::Value> = (0..501)
            .map(|_| json!({"resource": {"resourceType":"Observation","status":"final","code":{"text":"n"},"subject":{"reference":format!("Patient/{p}")}},
                "request": {"method": "POST", "url": "Observation"}}))
            .collect();
        let r = s.post("/fhir", &json!({"resourceType":"Bundle","type":"transaction","entry": entries})).await;
        assert_eq!(r.status, 200, "{}", &r.text[..r.text.len().min(500)]);
    }
    let next_of = |page: &serde_json::Value| page["link"].as_array().and_then(|l| l.iter().find(|x| x["relation"] == "next")).and_then(|x| x["url"].as_str()).map(str::to_string);
    let first = s.get(&format!("/fhir/Observation?patient={p}&_count=10")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert!(first.json.get("total").is_none(), "more than 1,000 matches: no total");
    assert_eq!(first.entry_ids().len(), 10);
    assert!(next_of(&first.json).is_some());
    let accurate = s.get(&format!("/fhir/Observation?patient={p}&_count=10&_total=accurate")).await;
    assert_eq!(accurate.total(), 1002);
    assert_eq!(s.get(&format!("/fhir/Observation?patient={p}&_summary=count")).await.total(), 1002);
    let last = s.get(&format!("/fhir/Observation?patient={p}&_count=10&_offset=995")).await;
    assert_eq!((last.total(), last.entry_ids().len()), (1002, 7), "a page past the bound counts to its end");
    assert!(next_of(&last.json).is_none());
}

/// Parameters generated from the R4 definitions (decided after decryption, no index keys):
/// through the server, under the policy, in every kind the generated table adds.
#[tokio::test]
async fn generated_parameters_search_through_the_server_under_the_policy() {
    use crate::access::{create, ward, Ward};
    let Ward { s, token: t, mine, other, .. } = ward("generated", "Gensson", "Othergen").await;
    let goal = |p: &str, status: &str| json!({"resourceType": "Goal", "lifecycleStatus": status, "description": {"text": "walk"}, "subject": {"reference": format!("Patient/{p}")}});
    let mine_goal = create(&s, &goal(&mine, "active")).await["id"].as_str().expect("id").to_string();
    create(&s, &goal(&other, "active")).await;
    let obs = |p: &str, value: u32| {
        let mut o = json!({"resourceType": "Observation", "status": "final", "code": cc("http://loinc.org", "8480-6"), "subject": {"reference": format!("Patient/{p}")}});
        o["valueQuantity"] = json!({"value": value, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"});
        o
    };
    let high = create(&s, &obs(&mine, 150)).await["id"].as_str().expect("id").to_string();
    let low = create(&s, &obs(&mine, 110)).await["id"].as_str().expect("id").to_string();
    create(&s, &obs(&other, 160)).await;
    let ids = |r: crate::harness::Resp| {
        assert_eq!(r.status, 200, "{}", r.text);
        r.entry_ids()
    };
    // Reference (Goal.patient), token, quantity, composite, sort by a quantity.
    assert_eq!(ids(s.get(&format!("/fhir/Goal?patient={mine}")).await), vec![mine_goal.clone()]);
    assert_eq!(ids(s.get("/fhir/Goal?lifecycle-status=active").await).len(), 2);
    assert_eq!(ids(s.get(&format!("/fhir/Observation?patient={mine}&value-quantity=gt120")).await), vec![high.clone()]);
    assert_eq!(ids(s.get(&format!("/fhir/Observation?patient={mine}&code-value-quantity=http://loinc.org|8480-6$lt120")).await), vec![low.clone()]);
    assert_eq!(ids(s.get(&format!("/fhir/Observation?patient={mine}&_sort=-value-quantity")).await), vec![high.clone(), low.clone()]);
    // The physician finds only their patient's, whichever patient the query names.
    assert_eq!(ids(s.request("GET", "/fhir/Goal?lifecycle-status=active", Some(&t), None, &[]).await), vec![mine_goal]);
    assert!(ids(s.request("GET", &format!("/fhir/Goal?patient={other}"), Some(&t), None, &[]).await).is_empty());
    let theirs = ids(s.request("GET", "/fhir/Observation?value-quantity=gt100", Some(&t), None, &[]).await);
    assert_eq!(theirs.len(), 2, "the other patient's 160 is not found");
    // Malformed values of the new kinds: 400.
    s.get("/fhir/Observation?value-quantity=high").await.outcome(400);
    s.get("/fhir/Observation?code-value-quantity=8480-6").await.outcome(400);
    // The CapabilityStatement lists them with their kinds.
    let cs = s.get("/fhir/metadata").await;
    let params = |t: &str| -> Vec<(String, String)> {
        cs.json["rest"][0]["resource"].as_array().expect("resources").iter().find(|r| r["type"] == t).expect("type")["searchParam"]
            .as_array().expect("params").iter().map(|p| (p["name"].as_str().unwrap_or("").to_string(), p["type"].as_str().unwrap_or("").to_string())).collect()
    };
    assert!(params("Goal").contains(&("patient".into(), "reference".into())));
    assert!(params("Observation").contains(&("code-value-quantity".into(), "composite".into())));
    assert!(params("RiskAssessment").contains(&("probability".into(), "number".into())));
}
