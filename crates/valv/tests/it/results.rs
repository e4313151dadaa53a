//! Shaping search results: `_sort` on any parameter, `_include`/`_revinclude` (decided per
//! included resource), `_elements`, `_summary`, `_total`, and `POST [type]/_search`.

use crate::access::{create, ward, Ward};
use crate::harness::Server;
use serde_json::{json, Value};

fn observation(patient: &str, code: &str, status: &str, when: &str) -> Value {
    json!({"resourceType": "Observation", "status": status, "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]}, "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": when})
}

fn codes(r: &crate::harness::Resp) -> Vec<String> {
    r.json["entry"].as_array().map(|es| es.iter().filter(|e| e["search"]["mode"] == "match").map(|e| e["resource"]["code"]["coding"][0]["code"].as_str().unwrap_or("").to_string()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn sort_shape_total_and_post_search() {
    let s = Server::start("results");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Sortsson"}]})).await.id();
    for (code, status, when) in [("c", "final", "2021-03-01"), ("a", "amended", "2023-01-01"), ("d", "final", "2019-07-07"), ("b", "final", "2022-12-31T23:00:00Z")] {
        assert_eq!(s.post("/fhir/Observation", &observation(&p, code, status, when)).await.status, 201);
    }
    let q = |extra: &str| format!("/fhir/Observation?patient={p}&{extra}");
    assert_eq!(codes(&s.get(&q("_sort=-date")).await), ["a", "b", "c", "d"]);
    assert_eq!(codes(&s.get(&q("_sort=date")).await), ["d", "c", "b", "a"]);
    assert_eq!(codes(&s.get(&q("_sort=status,-date")).await), ["a", "b", "c", "d"], "amended before final, then newest first");
    assert_eq!(codes(&s.get(&q("_sort=code&_count=2&_offset=1")).await), ["b", "c"], "paged after sorting");
    s.get(&q("_sort=nonsense")).await.outcome(400);
    // Prefer: handling=lenient leaves out what is not supported, and the self link says what was
    // searched; a malformed value of a supported parameter still fails.
    let url = q("shoesize=9&code:below=x&_sort=-date");
    s.get(&url).await.outcome(400);
    let lenient = s.request("GET", &url, Some(&s.data_key), None, &[("prefer", "handling=lenient")]).await;
    assert_eq!((lenient.status, codes(&lenient)), (200, vec!["a".to_string(), "b".into(), "c".into(), "d".into()]), "{}", lenient.text);
    let own = lenient.json["link"][0]["url"].as_str().unwrap_or("").to_string();
    assert!(own.contains("_sort=-date") && !own.contains("shoesize") && !own.contains("below"), "{own}");
    s.request("GET", &q("date=notadate"), Some(&s.data_key), None, &[("prefer", "handling=lenient")]).await.outcome(400);
    // Modifiers decided after decryption.
    assert_eq!(codes(&s.get(&q("status:not=final")).await), ["a"]);
    assert_eq!(s.get("/fhir/Patient?family:contains=RTSS").await.entry_ids(), vec![p.clone()]);
    assert_eq!(s.get(&q("encounter:missing=true&_summary=count")).await.total(), 4);

    // _elements and _summary return subsets, marked as such.
    let subset = s.get(&q("_elements=status")).await;
    let first = &subset.json["entry"][0]["resource"];
    assert!(first.get("status").is_some() && first.get("code").is_none() && first.get("text").is_none(), "{first}");
    assert_eq!(first["meta"]["tag"][0]["code"], "SUBSETTED");
    let data = s.get(&q("_summary=data")).await;
    assert!(data.json["entry"][0]["resource"].get("text").is_none() && data.json["entry"][0]["resource"].get("code").is_some());
    let text = s.get(&q("_summary=text")).await;
    let r = &text.json["entry"][0]["resource"];
    assert!(r.get("text").is_some() && r.get("status").is_some() && r.get("code").is_some() && r.get("effectiveDateTime").is_none(), "text, and the required status and code: {r}");

    let summary = s.get(&q("_summary=true")).await;
    let r = &summary.json["entry"][0]["resource"];
    assert!(r.get("text").is_none() && r.get("code").is_some() && r.get("effectiveDateTime").is_some(), "summary elements only: {r}");
    assert_eq!(r["meta"]["tag"][0]["code"], "SUBSETTED");
    // _total=none leaves the total out; _totalMethod=count (as fhirpy's count() sends) keeps it.
    assert!(s.get(&q("_total=none")).await.json.get("total").is_none());
    assert_eq!(s.get(&q("_count=0&_totalMethod=count")).await.total(), 4);

    // POST [type]/_search: the form's parameters and the URL's together.
    let form = format!("patient={p}&_sort=-date");
    let posted = s.request_raw("POST", "/fhir/Observation/_search?_count=2", Some(&s.data_key), Some(form.into_bytes()), &[("content-type", "application/x-www-form-urlencoded")]).await;
    assert_eq!((posted.status, codes(&posted)), (200, vec!["a".to_string(), "b".to_string()]), "{}", posted.text);
    let wrong = s.request_raw("POST", "/fhir/Observation/_search", Some(&s.data_key), Some(b"{}".to_vec()), &[("content-type", "application/fhir+json")]).await;
    wrong.outcome(415);
}

#[tokio::test]
async fn includes_bring_only_what_the_caller_may_read_and_are_audited() {
    let Ward { s, token: t, mine, other, .. } = ward("includes", "Mine", "Other").await;
    let enc = create(&s, &json!({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}, "subject": {"reference": format!("Patient/{mine}")}})).await["id"].as_str().expect("id").to_string();
    // My patient's Observation names the other patient as performer; the other's names mine.
    let mut o = observation(&mine, "m", "final", "2024-01-01");
    o["performer"] = json!([{"reference": format!("Patient/{other}")}]);
    o["encounter"] = json!({"reference": format!("Encounter/{enc}")});
    let mine_obs = create(&s, &o).await["id"].as_str().expect("id").to_string();
    let mut theirs = observation(&other, "t", "final", "2024-01-01");
    theirs["performer"] = json!([{"reference": format!("Patient/{mine}")}]);
    create(&s, &theirs).await;

    let mode_ids = |r: &crate::harness::Resp, mode: &str| -> Vec<String> {
        let mut v: Vec<String> = r.json["entry"].as_array().map(|es| es.iter().filter(|e| e["search"]["mode"] == mode).map(|e| format!("{}/{}", e["resource"]["resourceType"].as_str().unwrap_or(""), e["resource"]["id"].as_str().unwrap_or(""))).collect()).unwrap_or_default();
        v.sort();
        v
    };
    // The loader (a service with every scope) gets everything the includes name.
    let all = s.get(&format!("/fhir/Observation?_id={mine_obs}&_include=Observation:subject&_include=Observation:performer")).await;
    let mut both = vec![format!("Patient/{mine}"), format!("Patient/{other}")];
    both.sort();
    assert_eq!(mode_ids(&all, "include"), both, "{}", all.text);
    let iterated = s.get(&format!("/fhir/Observation?_id={mine_obs}&_include=Observation:encounter&_include:iterate=Encounter:subject")).await;
    let mut chain = vec![format!("Encounter/{enc}"), format!("Patient/{mine}")];
    chain.sort();
    assert_eq!(mode_ids(&iterated, "include"), chain, "{}", iterated.text);
    let rev = s.get(&format!("/fhir/Patient?_id={mine}&_revinclude=Observation:performer")).await;
    assert_eq!(mode_ids(&rev, "include").len(), 1, "the other patient's Observation naming mine: {}", rev.text);

    // The physician: the other patient and their Observation are left out, never disclosed.
    let before = s.request("GET", &format!("/fhir/AuditEvent?patient={mine}&outcome=0"), Some(&s.auditor_key), None, &[]).await.total();
    let theirs_too = s.request("GET", &format!("/fhir/Observation?_id={mine_obs}&_include=Observation:subject&_include=Observation:performer"), Some(&t), None, &[]).await;
    assert_eq!(theirs_too.status, 200, "{}", theirs_too.text);
    assert_eq!(mode_ids(&theirs_too, "include"), vec![format!("Patient/{mine}")], "{}", theirs_too.text);
    assert!(!theirs_too.text.contains("Other"), "nothing of the other patient's record: {}", theirs_too.text);
    let rev = s.request("GET", &format!("/fhir/Patient?_id={mine}&_revinclude=Observation:performer"), Some(&t), None, &[]).await;
    assert!(mode_ids(&rev, "include").is_empty(), "{}", rev.text);
    // The search and the included Patient are both in my patient's log.
    let after = s.request("GET", &format!("/fhir/AuditEvent?patient={mine}&outcome=0"), Some(&s.auditor_key), None, &[]).await.total();
    assert!(after >= before + 3, "search entries and the include's read: {before} -> {after}");
    s.request("GET", "/fhir/Observation?_include=Observation:code", Some(&t), None, &[]).await.outcome(400);
    // _include=* follows every reference parameter, each target still decided on its own.
    let star = s.request("GET", &format!("/fhir/Observation?_id={mine_obs}&_include=*"), Some(&t), None, &[]).await;
    assert_eq!(mode_ids(&star, "include"), { let mut v = vec![format!("Encounter/{enc}"), format!("Patient/{mine}")]; v.sort(); v }, "{}", star.text);
    s.request("GET", "/fhir/Observation?_revinclude=*", Some(&t), None, &[]).await.outcome(400);
}

#[tokio::test]
async fn everything_returns_the_patients_record_paged_and_decided() {
    let Ward { s, token: t, mine, other, now } = ward("everything", "Whole", "Other").await;
    for (p, code) in [(&mine, "a"), (&mine, "b"), (&other, "x")] {
        create(&s, &observation(p, code, "final", "2024-01-01")).await;
    }
    s.set_clock(now + 60_000);
    let late = create(&s, &observation(&mine, "c", "final", "2024-02-01")).await;
    let since = late["meta"]["lastUpdated"].as_str().expect("lastUpdated").to_string();

    let all = s.get(&format!("/fhir/Patient/{mine}/$everything")).await;
    assert_eq!(all.status, 200, "{}", all.text);
    // The Patient, the care team and three Observations; nothing of the other patient.
    assert_eq!(all.total(), 5, "{}", all.text);
    assert!(!all.text.contains(&other), "{}", all.text);
    assert_eq!(s.get(&format!("/fhir/Patient/{mine}/$everything?_type=Observation")).await.total(), 3);
    assert_eq!(s.get(&format!("/fhir/Patient/{mine}/$everything?_since={since}")).await.entry_ids(), vec![late["id"].as_str().expect("id").to_string()]);
    let first = s.get(&format!("/fhir/Patient/{mine}/$everything?_count=2")).await;
    let next = first.json["link"].as_array().expect("links").iter().find(|l| l["relation"] == "next").and_then(|l| l["url"].as_str()).expect("a next link").to_string();
    let second = s.get(&next[next.find("/fhir/").expect("path")..]).await;
    assert_eq!((first.entry_ids().len(), second.entry_ids().len()), (2, 2));
    assert!(first.entry_ids().iter().all(|id| !second.entry_ids().contains(id)), "pages do not overlap");
    s.get(&format!("/fhir/Patient/{mine}/$everything?start=2020")).await.outcome(400);
    s.get("/fhir/Patient/nobody/$everything").await.outcome(404);

    let theirs = s.request("GET", &format!("/fhir/Patient/{mine}/$everything"), Some(&t), None, &[]).await;
    assert_eq!((theirs.status, theirs.total()), (200, 5), "{}", theirs.text);
    s.request("GET", &format!("/fhir/Patient/{other}/$everything"), Some(&t), None, &[]).await.outcome(403);
    let denied = s.request("GET", &format!("/fhir/AuditEvent?patient={other}&outcome=4"), Some(&s.auditor_key), None, &[]).await;
    assert!(denied.total() >= 1, "the refusal is in the other patient's log");
}

#[tokio::test]
async fn chains_and_has_search_as_the_caller() {
    let Ward { s, token: t, mine, other, .. } = ward("chains", "Chainsson", "Otherberg").await;
    for (p, code) in [(&mine, "m"), (&mine, "m2"), (&other, "t")] {
        create(&s, &observation(p, code, "final", "2024-01-01")).await;
    }
    // The other patient's Observation names mine as performer: a _has through it must not tell
    // anyone who may not see it that it exists.
    let mut theirs = observation(&other, "t2", "final", "2024-01-01");
    theirs["performer"] = json!([{"reference": format!("Patient/{mine}")}]);
    create(&s, &theirs).await;
    let ids = |r: &crate::harness::Resp| r.entry_ids().len();
    assert_eq!(ids(&s.get("/fhir/Observation?subject:Patient.name=Chainsson").await), 2);
    assert_eq!(ids(&s.get("/fhir/Observation?patient.name=Otherberg").await), 2, "patient points at Patients only: no type needed");
    assert_eq!(ids(&s.get("/fhir/Observation?patient.name=Nobody").await), 0);
    let has = s.get("/fhir/Patient?_has:Observation:patient:code=http://loinc.org|t").await;
    assert_eq!(has.entry_ids(), vec![other.clone()], "{}", has.text);
    assert_eq!(ids(&s.get("/fhir/Patient?_has:Observation:patient:code=http://loinc.org|none").await), 0);
    for (bad, says) in [("subject.name=x", "name the type"), ("code.name=x", "not a reference"), ("patient.shoesize=9", "unknown search parameter"), ("_has:Observation:code:status=final", "not a reference")] {
        let r = s.get(&format!("/fhir/Observation?{bad}")).await;
        assert!(r.outcome(400).contains(says), "{bad}: {}", r.text);
    }

    // The physician's chains only reach what they may search: the other patient's name finds
    // nothing, though that patient's Observation exists.
    let as_dr = |q: &str| {
        let (s, t, q) = (&s, t.clone(), q.to_string());
        async move { s.request("GET", &format!("/fhir/{q}"), Some(&t), None, &[]).await }
    };
    assert_eq!(ids(&as_dr("Observation?subject:Patient.name=Chainsson").await), 2);
    let probe = as_dr("Observation?subject:Patient.name=Otherberg").await;
    assert_eq!((probe.status, probe.total()), (200, 0), "{}", probe.text);
    let probe = as_dr("Patient?_has:Observation:patient:code=http://loinc.org|t").await;
    assert_eq!((probe.status, probe.total()), (200, 0), "{}", probe.text);
    assert_eq!(s.get("/fhir/Patient?_has:Observation:performer:code=http://loinc.org|t2").await.entry_ids(), vec![mine.clone()]);
    let probe = as_dr("Patient?_has:Observation:performer:code=http://loinc.org|t2").await;
    assert_eq!((probe.status, probe.total()), (200, 0), "their own patient, found only through the other's Observation: {}", probe.text);
}
