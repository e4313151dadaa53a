//! Any JSON document as a transaction/batch Bundle: parse it and, if it parses, resolve its
//! `urn:uuid:` references with a counter for new ids. Neither step may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use valv_fhir::bundle;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok((_kind, mut entries)) = bundle::parse(v) else { return };
    let mut n: u64 = 0;
    let _ = bundle::resolve_references(&mut entries, || {
        n += 1;
        format!("fuzz-{n}")
    });
});
