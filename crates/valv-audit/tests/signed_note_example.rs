//! The C2SP signed-note example in the shared testdata: the verifier key must accept the note,
//! and any change to its text or signature must be rejected.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use valv_audit::note::{open, Note, Verifier};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/signed-note")
}

fn example() -> (String, Verifier) {
    let note = fs::read_to_string(dir().join("example.note")).unwrap();
    let vkey = fs::read_to_string(dir().join("example.vkey")).unwrap();
    (
        note,
        Verifier::from_vkey(vkey.trim_end_matches('\n')).unwrap(),
    )
}

#[test]
fn example_verifies() {
    let (msg, v) = example();
    assert_eq!(v.name(), "example.com/foo");
    assert_eq!(v.key_id(), 0x530d903a);
    assert_eq!(
        v.to_vkey(),
        fs::read_to_string(dir().join("example.vkey"))
            .unwrap()
            .trim_end()
    );
    let note = open(&msg, &[v]).unwrap();
    assert_eq!(note.text(), "This is an example message.\n");
    assert_eq!(note.to_string(), msg);
}

#[test]
fn every_change_to_the_text_is_rejected() {
    let (msg, v) = example();
    let note = Note::parse(&msg).unwrap();
    let text = note.text();
    let sigs = &msg[text.len()..];
    let chars: Vec<char> = text.chars().collect();
    let mut tried = 0;
    for i in 0..chars.len() {
        // Replace, delete and insert at every position.
        for replacement in ['x', 'T', '.', ' ', '\u{e9}'] {
            if chars[i] == replacement {
                continue;
            }
            let mut changed = chars.clone();
            changed[i] = replacement;
            let changed: String = changed.into_iter().collect();
            assert!(
                open(&format!("{changed}{sigs}"), std::slice::from_ref(&v)).is_err(),
                "{changed:?}"
            );
            tried += 1;
        }
        let mut deleted = chars.clone();
        deleted.remove(i);
        let deleted: String = deleted.into_iter().collect();
        assert!(
            open(&format!("{deleted}{sigs}"), std::slice::from_ref(&v)).is_err(),
            "{deleted:?}"
        );
        let mut inserted = chars.clone();
        inserted.insert(i, 'a');
        let inserted: String = inserted.into_iter().collect();
        assert!(
            open(&format!("{inserted}{sigs}"), std::slice::from_ref(&v)).is_err(),
            "{inserted:?}"
        );
        tried += 2;
    }
    assert!(tried > 100);
}

#[test]
fn every_bit_flip_in_the_signature_is_rejected() {
    let (msg, v) = example();
    let note = Note::parse(&msg).unwrap();
    let line = msg[note.text().len() + 1..].trim_end_matches('\n');
    let (prefix, b64) = line.rsplit_once(' ').unwrap();
    let blob = STANDARD.decode(b64).unwrap();
    assert_eq!(blob.len(), 4 + 64);
    for byte in 0..blob.len() {
        for bit in 0..8 {
            let mut flipped = blob.clone();
            flipped[byte] ^= 1 << bit;
            let forged = format!("{}\n{prefix} {}\n", note.text(), STANDARD.encode(&flipped));
            assert!(
                open(&forged, std::slice::from_ref(&v)).is_err(),
                "byte {byte} bit {bit}"
            );
        }
    }
    // Truncated or extended signatures, a renamed key, a missing signature line.
    let short = format!(
        "{}\n{prefix} {}\n",
        note.text(),
        STANDARD.encode(&blob[..blob.len() - 1])
    );
    assert!(open(&short, std::slice::from_ref(&v)).is_err());
    let long = format!(
        "{}\n{prefix} {}\n",
        note.text(),
        STANDARD.encode([blob.as_slice(), &[0]].concat())
    );
    assert!(open(&long, std::slice::from_ref(&v)).is_err());
    let renamed = format!("{}\n\u{2014} example.com/bar {b64}\n", note.text());
    assert!(open(&renamed, std::slice::from_ref(&v)).is_err());
    assert!(open(&format!("{}\n", note.text()), std::slice::from_ref(&v)).is_err());
    assert!(open(note.text(), std::slice::from_ref(&v)).is_err());
}
