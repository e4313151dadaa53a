//! Any string as a signed erasure ledger checked against a fixed key: `Ledger::open` never
//! panics and never accepts (the input cannot carry a valid signature of a key the fuzzer does
//! not hold).
#![no_main]

use libfuzzer_sys::fuzz_target;
use valv_audit::ledger::Ledger;

fuzz_target!(|data: &[u8]| {
    let signer = valv_audit::Signer::new("valv.local/audit/fuzz", &[9; 32]).expect("signer");
    let s = String::from_utf8_lossy(data);
    assert!(Ledger::open(&s, &[signer.verifier()]).is_err(), "an unsigned ledger was accepted");
});
