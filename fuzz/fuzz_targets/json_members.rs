//! Any bytes as a stored JSON object scanned for its members: never a panic, and for every object
//! serde_json reads, the same member names (each value as serde_json reads it).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scanned: Option<Vec<(String, &[u8])>> = valv_fhir::members::of(data).and_then(|m| m.map(|m| m.map(|(n, raw)| (n.into_owned(), raw))).collect());
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(data) {
        let scanned = scanned.expect("an object serde_json reads scans");
        for (name, raw) in &scanned {
            let value: serde_json::Value = serde_json::from_slice(raw).expect("a member's value parses");
            // serde_json keeps the last of a repeated name.
            if scanned.iter().rev().find(|(n, _)| n == name).map(|(_, r)| r) == Some(raw) {
                assert_eq!(map.get(name), Some(&value), "{name}");
            }
        }
        assert!(map.keys().all(|k| scanned.iter().any(|(n, _)| n == k)));
    }
});
