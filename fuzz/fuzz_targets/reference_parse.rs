//! Any string as a FHIR `reference`: `Some(LocalRef)` or `None`, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Lossy: invalid bytes become U+FFFD, so multi-byte characters show up at odd offsets.
    let s = String::from_utf8_lossy(data);
    if let Some(r) = valv_fhir::reference::parse(&s) {
        // A parsed reference names a resource type and a non-empty id.
        assert!(valv_fhir::r4::is_resource_type(&r.resource_type), "{s:?} -> {r:?}");
        assert!(!r.id.is_empty(), "{s:?} -> {r:?}");
        let _ = r.key();
    }
});
