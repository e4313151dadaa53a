//! Any bytes as an age file opened with a fixed identity: `valv_age::decrypt` and reading the
//! plaintext never panic, and never yield a plaintext (the input cannot carry a file key wrapped
//! to an identity the fuzzer does not hold). Recipient and identity strings never panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Read;

fuzz_target!(|data: &[u8]| {
    let id = valv_age::Identity::from_bytes([7; 32]);
    if let Ok(mut r) = valv_age::decrypt(data, std::slice::from_ref(&id)) {
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err() || out.is_empty(), "a forged file opened");
    }
    let s = String::from_utf8_lossy(data);
    let _ = valv_age::Recipient::parse(&s);
    let _ = valv_age::Identity::parse(&s);
});
