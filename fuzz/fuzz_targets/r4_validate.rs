//! Any JSON document through the structural R4 validator: it must return Ok or Err, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = valv_fhir::r4::validate(&v);
    }
});
