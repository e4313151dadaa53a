//! AuditEvent search reads the log newest first and only as far as the page and the dates need:
//! pages continue through `_before`, and a search bounded by dates opens only their part.

use crate::harness::Server;
use serde_json::{json, Value};

fn ids(r: &Value) -> Vec<u64> {
    r["entry"].as_array().into_iter().flatten().map(|e| e["resource"]["id"].as_str().expect("id").parse().expect("index")).collect()
}

fn next_link(r: &Value) -> Option<String> {
    r["link"].as_array()?.iter().find(|l| l["relation"] == "next").and_then(|l| l["url"].as_str()).map(str::to_string)
}

#[tokio::test]
async fn audit_event_search_pages_newest_first_without_reading_the_whole_log() {
    let s = Server::start("audit-search");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    for _ in 0..40 {
        assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    }
    let auditor = s.auditor_key.clone();
    let first = s.request("GET", "/fhir/AuditEvent?_count=10", Some(&auditor), None, &[]).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let page1 = ids(&first.json);
    assert_eq!(page1.len(), 10);
    assert!(page1.windows(2).all(|w| w[0] > w[1]), "newest first: {page1:?}");
    assert!(first.json.get("total").is_none(), "not counted: the search stopped once the page was full");
    let next = next_link(&first.json).expect("a next page");
    assert!(next.contains(&format!("_before={}", page1[9])), "{next}");
    let path = next.split_once("/fhir/").map(|(_, rest)| format!("/fhir/{rest}")).expect("path");
    let second = s.request("GET", &path, Some(&auditor), None, &[]).await;
    let page2 = ids(&second.json);
    assert_eq!(page2.len(), 10);
    assert!(page2[0] < page1[9], "the next page continues below: {page1:?} {page2:?}");
    // A filter narrows what is shown, not the order; a whole small log is counted exactly.
    let reads = s.request("GET", "/fhir/AuditEvent?action=R&_count=1000", Some(&auditor), None, &[]).await;
    assert!(reads.total() >= 40, "{}", reads.text);
    // Dates before the log began: nothing is opened past the binary search, and nothing found.
    let none = s.request("GET", "/fhir/AuditEvent?date=lt2000-01-01", Some(&auditor), None, &[]).await;
    assert_eq!((none.status, none.total()), (200, 0), "{}", none.text);
    let recent = s.request("GET", "/fhir/AuditEvent?date=ge2000-01-01&_count=5", Some(&auditor), None, &[]).await;
    assert_eq!(ids(&recent.json).len(), 5);
}
