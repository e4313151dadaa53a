//! Any bytes as a decrypted backup payload: the frame reader and the row decoder never panic,
//! never allocate beyond the frame limit, and a manifest frame ends the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use valv_backup::frame::{Frame, FrameReader};

fuzz_target!(|data: &[u8]| {
    let mut input = valv_backup::frame::MAGIC.to_vec();
    input.extend_from_slice(data);
    let Ok(mut frames) = FrameReader::new(input.as_slice()) else { return };
    for _ in 0..10_000 {
        match frames.next_frame() {
            Ok(Some(Frame::Row(_, payload))) => {
                let mut d = valv_backup::fields::Dec::new(payload);
                while d.bytes().is_ok() {}
            }
            Ok(Some(Frame::Manifest(text))) => {
                let signer = valv_audit::Signer::new("valv.local/audit/fuzz", &[9; 32]).expect("signer");
                assert!(valv_backup::Manifest::open(&text, &[signer.verifier()]).is_err(), "an unsigned manifest was accepted");
                assert!(matches!(frames.next_frame(), Ok(None)), "nothing after the manifest");
                return;
            }
            Ok(None) | Err(_) => return,
        }
    }
});
