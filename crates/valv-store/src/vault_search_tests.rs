//! Property test of search: for random patients and observations and random searches, the
//! vault's results are exactly what decrypting everything and filtering with a straightforward
//! matcher written here — independent of `valv_fhir::search`'s index keys and matching — gives,
//! and none belongs to a patient the caller may not see. The searches mix indexed parameters
//! with a generated one (`value-quantity`, decided after decryption).

use super::*;
use crate::sqlite::SqliteStore;
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;
use valv_crypto::LocalKeyProvider;

const FAMILIES: &[&str] = &["Berg", "Berglund", "Öberg", "Lind", "Lindqvist", "Ek", "Åkesson"];
const GENDERS: &[&str] = &["male", "female", "other"];
const STATUSES: &[&str] = &["final", "amended", "preliminary"];
const CODES: &[&str] = &["8867-4", "8310-5", "2339-0"];

#[derive(Debug, Clone)]
struct World {
    /// (family, gender, birth year)
    patients: Vec<(usize, usize, i32)>,
    /// (patient index, status, code, day of January 2020, value in mg)
    observations: Vec<(usize, usize, usize, u32, u32)>,
}

fn world() -> impl Strategy<Value = World> {
    prop::collection::vec((0..FAMILIES.len(), 0..GENDERS.len(), 1950..1956i32), 2..7).prop_flat_map(|patients| {
        let n = patients.len();
        prop::collection::vec((0..n, 0..STATUSES.len(), 0..CODES.len(), 1..11u32, 0..20u32), 0..14)
            .prop_map(move |observations| World { patients: patients.clone(), observations })
    })
}

/// A search as (type, parameter, value); the value's `{p}` is replaced by a patient's id.
#[derive(Debug, Clone)]
struct Query {
    resource_type: &'static str,
    pairs: Vec<(String, String)>,
}

fn patient_condition() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        prop::sample::select(vec!["ber", "berg", "lind", "ob", "e", "åk", "BERGL"]).prop_map(|v| ("family".to_string(), v.to_string())),
        prop::sample::select(FAMILIES.to_vec()).prop_map(|v| ("family:exact".to_string(), v.to_string())),
        prop::sample::select(vec!["er", "ind", "qv", "kes", "zz"]).prop_map(|v| ("family:contains".to_string(), v.to_string())),
        prop::sample::select(GENDERS.to_vec()).prop_map(|v| ("gender".to_string(), v.to_string())),
        prop::sample::select(GENDERS.to_vec()).prop_map(|v| ("gender:not".to_string(), v.to_string())),
        (prop::sample::select(vec!["eq", "ge", "lt"]), 1950..1957i32).prop_map(|(p, y)| ("birthdate".to_string(), format!("{p}{y}"))),
    ]
}

fn observation_condition() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        prop::sample::select(STATUSES.to_vec()).prop_map(|v| ("status".to_string(), v.to_string())),
        prop::sample::select(STATUSES.to_vec()).prop_map(|v| ("status:not".to_string(), v.to_string())),
        prop::sample::select(CODES.to_vec()).prop_map(|v| ("code".to_string(), format!("http://loinc.org|{v}"))),
        prop::sample::select(CODES.to_vec()).prop_map(|v| ("code".to_string(), v.to_string())),
        (0..7usize).prop_map(|i| ("patient".to_string(), format!("{{p{i}}}"))),
        (prop::sample::select(vec!["ge", "lt", "eq"]), 1..12u32).prop_map(|(p, d)| ("date".to_string(), format!("{p}2020-01-{d:02}"))),
        // A generated parameter (no index keys): decided after decryption.
        (prop::sample::select(vec!["ge", "lt", "eq"]), 0..21u32).prop_map(|(p, v)| ("value-quantity".to_string(), format!("{p}{v}||mg"))),
    ]
}

fn query() -> impl Strategy<Value = Query> {
    prop_oneof![
        prop::collection::vec(patient_condition(), 1..3).prop_map(|pairs| Query { resource_type: "Patient", pairs }),
        prop::collection::vec(observation_condition(), 1..3).prop_map(|pairs| Query { resource_type: "Observation", pairs }),
    ]
}

/// Lower case, the few accented letters of [`FAMILIES`] folded: what R4 string search ignores.
fn fold(s: &str) -> String {
    s.to_lowercase().replace('ö', "o").replace('å', "a")
}

/// The straightforward matcher: one condition on one resource of the generated world.
fn holds(world: &World, ids: &[String], resource_type: &str, index: usize, (name, value): (&str, &str)) -> bool {
    let compare = |p: &str, have: i64, want: i64| match p {
        "eq" => have == want,
        "ge" => have >= want,
        "lt" => have < want,
        _ => unreachable!("generated prefixes only"),
    };
    if resource_type == "Patient" {
        let (f, g, year) = world.patients[index];
        let family = FAMILIES[f];
        return match name {
            "family" => fold(family).starts_with(&fold(value)),
            "family:exact" => family == value,
            "family:contains" => fold(family).contains(&fold(value)),
            "gender" => GENDERS[g] == value,
            "gender:not" => GENDERS[g] != value,
            "birthdate" => compare(&value[..2], i64::from(year), value[2..].parse().unwrap_or(0)),
            _ => unreachable!("generated parameters only"),
        };
    }
    let (p, s, c, day, mg) = world.observations[index];
    match name {
        "status" => STATUSES[s] == value,
        "status:not" => STATUSES[s] != value,
        "code" => value == CODES[c] || value == format!("http://loinc.org|{}", CODES[c]),
        "patient" => value == ids[p],
        "date" => compare(&value[..2], i64::from(day), value[10..].parse().unwrap_or(0)),
        "value-quantity" => compare(&value[..2], i64::from(mg), value[2..value.len() - 4].parse().unwrap_or(-1)),
        _ => unreachable!("generated parameters only"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn search_results_are_what_a_brute_force_filter_finds_among_visible_patients(world in world(), queries in prop::collection::vec(query(), 1..8), visible_mask in any::<u8>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let path = std::env::temp_dir().join(format!("valv-props-{}.db", u64::from_le_bytes(random_bytes().expect("random"))));
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
            let provider: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::generate(random_bytes().expect("random")));
            let vault = Vault::open(store, provider, 1).await.expect("vault");
            let mut ids = Vec::new();
            for &(f, g, year) in &world.patients {
                let id = new_id().expect("id");
                let body = json!({"resourceType": "Patient", "name": [{"family": FAMILIES[f]}], "gender": GENDERS[g], "birthDate": format!("{year}-06-15")});
                vault.commit(vec![WriteOp::Create { resource_type: "Patient".into(), id: id.clone(), body, unless: None }], 1).await.expect("patient");
                ids.push(id);
            }
            let mut obs_ids = Vec::new();
            for &(p, s, c, day, mg) in &world.observations {
                let id = new_id().expect("id");
                let body = json!({"resourceType": "Observation", "status": STATUSES[s], "code": {"coding": [{"system": "http://loinc.org", "code": CODES[c]}]},
                    "subject": {"reference": format!("Patient/{}", ids[p])}, "effectiveDateTime": format!("2020-01-{day:02}"),
                    "valueQuantity": {"value": mg, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}});
                vault.commit(vec![WriteOp::Create { resource_type: "Observation".into(), id: id.clone(), body, unless: None }], 1).await.expect("observation");
                obs_ids.push(id);
            }
            let visible_patients: BTreeSet<&String> = ids.iter().enumerate().filter(|(i, _)| visible_mask & (1 << i) != 0).map(|(_, id)| id).collect();
            let visible = |l: &Located| l.patient.as_ref().is_some_and(|p| visible_patients.contains(p));
            for q in &queries {
                let pairs: Vec<(String, String)> = q.pairs.iter().map(|(k, v)| {
                    let v = (0..7).fold(v.clone(), |v, i| v.replace(&format!("{{p{i}}}"), ids.get(i).map_or("nobody", String::as_str)));
                    (k.clone(), v)
                }).chain([("_count".to_string(), "1000".to_string())]).collect();
                let req = valv_fhir::search::parse_request(q.resource_type, &pairs).expect("generated searches parse");
                let page = vault.search(q.resource_type, &req, &visible, 1).await.expect("search");
                let found: BTreeSet<String> = page.resources.iter().map(|r| r.id.clone()).collect();
                let (all, owner): (&Vec<String>, Box<dyn Fn(usize) -> usize>) = if q.resource_type == "Patient" {
                    (&ids, Box::new(|i| i))
                } else {
                    (&obs_ids, Box::new(|i| world.observations[i].0))
                };
                let expected: BTreeSet<String> = (0..all.len())
                    .filter(|&i| visible_patients.contains(&ids[owner(i)]))
                    .filter(|&i| pairs.iter().filter(|(k, _)| k != "_count").all(|(k, v)| holds(&world, &ids, q.resource_type, i, (k, v))))
                    .map(|i| all[i].clone())
                    .collect();
                prop_assert_eq!(&found, &expected, "{} {:?}", q.resource_type, pairs);
                prop_assert_eq!(page.total, Some(expected.len()));
                prop_assert!(!page.more);
                prop_assert!(page.resources.iter().all(|r| r.patient.as_ref().is_some_and(|p| visible_patients.contains(p))));
                // A later page is that stretch of the whole list, with the same total.
                let paged_pairs: Vec<(String, String)> = pairs.iter().filter(|(k, _)| k != "_count").cloned()
                    .chain([("_count".to_string(), "2".to_string()), ("_offset".to_string(), "1".to_string())]).collect();
                let paged_req = valv_fhir::search::parse_request(q.resource_type, &paged_pairs).expect("paged search parses");
                let paged = vault.search(q.resource_type, &paged_req, &visible, 1).await.expect("paged search");
                let whole: Vec<&String> = page.resources.iter().map(|r| &r.id).skip(1).take(2).collect();
                prop_assert_eq!(paged.resources.iter().map(|r| &r.id).collect::<Vec<_>>(), whole, "{:?}", paged_pairs);
                prop_assert_eq!(paged.total, page.total);
                prop_assert_eq!(paged.more, 3 < expected.len());
                // Without a total the store lists only up to the page and one more — and all of
                // them when matches the caller may not see leave that short of the page.
                let uncounted_pairs: Vec<(String, String)> = paged_pairs.iter().cloned().chain([("_total".to_string(), "none".to_string())]).collect();
                let uncounted_req = valv_fhir::search::parse_request(q.resource_type, &uncounted_pairs).expect("uncounted search parses");
                let uncounted = vault.search(q.resource_type, &uncounted_req, &visible, 1).await.expect("uncounted search");
                prop_assert_eq!(uncounted.resources.iter().map(|r| &r.id).collect::<Vec<_>>(), paged.resources.iter().map(|r| &r.id).collect::<Vec<_>>());
                prop_assert_eq!(uncounted.more, paged.more, "{:?}", uncounted_pairs);
            }
            crate::sqlite::remove_files(&path);
            Ok(())
        })?;
    }
}

/// Past [`search::EXACT_TOTAL_UP_TO`] matches a search lists no further than it must unless an
/// exact total is asked for; `_summary=count` and `_total=accurate` count them all.
#[tokio::test]
async fn totals_are_exact_up_to_the_bound_or_when_asked_for() {
    let path = std::env::temp_dir().join(format!("valv-total-{}.db", u64::from_le_bytes(random_bytes().expect("random"))));
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
    let provider: Arc<dyn KeyProvider> = Arc::new(LocalKeyProvider::generate(random_bytes().expect("random")));
    let vault = Vault::open(store, provider, 1).await.expect("vault");
    let (patient, other) = (new_id().expect("id"), new_id().expect("id"));
    let many = search::EXACT_TOTAL_UP_TO + 2;
    let mut writes = Vec::new();
    // The other patient's twelve first: they come first in the store's order.
    for (who, n) in [(&other, 12), (&patient, many)] {
        writes.push(WriteOp::Create { resource_type: "Patient".into(), id: who.clone(), body: json!({"resourceType": "Patient"}), unless: None });
        for _ in 0..n {
            let body = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{who}")}});
            writes.push(WriteOp::Create { resource_type: "Observation".into(), id: new_id().expect("id"), body, unless: None });
        }
    }
    vault.commit(writes, 1).await.expect("commit");
    let all = |_: &Located| true;
    let search = |extra: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = [("patient", patient.as_str())].iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let req = valv_fhir::search::parse_request("Observation", &pairs).expect("parses");
        let vault = &vault;
        async move { vault.search("Observation", &req, &all, 1).await.expect("search") }
    };
    let first = search(&[("_count", "10")]).await;
    assert_eq!((first.total, first.more, first.resources.len()), (None, true, 10), "more than the bound: not counted");
    let accurate = search(&[("_count", "10"), ("_total", "accurate")]).await;
    assert_eq!((accurate.total, accurate.more), (Some(many), true));
    assert_eq!(accurate.resources.iter().map(|r| &r.id).collect::<Vec<_>>(), first.resources.iter().map(|r| &r.id).collect::<Vec<_>>());
    let counted = search(&[("_summary", "count")]).await;
    assert_eq!((counted.total, counted.more, counted.resources.len()), (Some(many), false, 0));
    // A page reaching past the bound lists to its end, one more, and so counts them all.
    let last = search(&[("_count", "10"), ("_offset", &(many - 3).to_string())]).await;
    assert_eq!((last.total, last.more, last.resources.len()), (Some(many), false, 3));
    // A caller who may see only the other patient's twelve, listed first among more than the
    // bound: the total is theirs, and its absence cannot tell them of the others' records.
    let only_other = |l: &Located| l.patient.as_deref() == Some(other.as_str());
    let pairs = [("status", "final"), ("_count", "10")].map(|(k, v)| (k.to_string(), v.to_string()));
    let req = valv_fhir::search::parse_request("Observation", &pairs).expect("parses");
    let theirs = vault.search("Observation", &req, &only_other, 1).await.expect("search");
    assert_eq!((theirs.total, theirs.more, theirs.resources.len()), (Some(12), true, 10));
    crate::sqlite::remove_files(&path);
}
