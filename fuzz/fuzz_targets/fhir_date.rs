//! Any string as a FHIR date/dateTime/instant. If it parses:
//! - its index keys and query keys are computed (no panic), and both are non-empty when the
//!   interval is non-empty (an empty key set would make the value unfindable by date search);
//! - the start of the interval, formatted as an `instant`, parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use valv_fhir::date;

fuzz_target!(|data: &[u8]| {
    // Lossy: invalid bytes become U+FFFD, so multi-byte characters show up at odd offsets.
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    let Ok(i) = date::parse(s) else { return };
    let index = date::index_keys(&i);
    let query = date::query_keys(&i);
    if i.start < i.end {
        assert!(!index.is_empty(), "index_keys empty for {s:?} -> {i:?}");
        assert!(!query.is_empty(), "query_keys empty for {s:?} -> {i:?}");
    }
    let back = date::format_instant(i.start * 1000);
    assert!(date::parse(&back).is_ok(), "{s:?} -> {i:?} -> start formats as {back:?}, which does not parse");
});
