//! Round trips (proptest over sizes around the chunk boundaries), refusals of altered files, and
//! interoperability with Debian's `age` and `age-keygen` (the reference implementation's CLI).

use super::*;
use proptest::prelude::*;
use std::process::{Command, Stdio};

fn random(n_recipients: usize, seed: u8) -> Randomness {
    Randomness { file_key: [seed; 16], ephemeral: (0..n_recipients).map(|i| [seed.wrapping_add(i as u8 + 1); 32]).collect(), nonce: [seed ^ 0x5a; 16] }
}

fn seal(data: &[u8], recipients: &[Recipient], seed: u8) -> Vec<u8> {
    let mut w = encrypt(Vec::new(), recipients, random(recipients.len(), seed)).expect("header");
    w.write_all(data).expect("write");
    w.finish().expect("finish")
}

fn open(file: &[u8], ids: &[Identity]) -> Result<Vec<u8>, AgeError> {
    let mut r = decrypt(file, ids)?;
    let mut out = Vec::new();
    r.read_to_end(&mut out).map_err(|e| AgeError::Io(e.to_string()))?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn round_trip(len in prop_oneof![0usize..300, (CHUNK - 3)..(CHUNK + 3), (2 * CHUNK - 2)..(2 * CHUNK + 2)], seed: u8) {
        let id = Identity::from_bytes([seed.wrapping_add(9); 32]);
        let other = Identity::from_bytes([seed.wrapping_add(77); 32]);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let file = seal(&data, &[other.recipient(), id.recipient()], seed);
        prop_assert_eq!(open(&file, &[id]).expect("open"), data.clone());
        prop_assert_eq!(open(&file, &[other]).expect("open"), data);
    }
}

#[test]
fn altered_files_are_refused() {
    let id = Identity::from_bytes([1; 32]);
    let data = vec![7u8; CHUNK + 100];
    let file = seal(&data, &[id.recipient()], 3);
    assert_eq!(open(&file, &[Identity::from_bytes([2; 32])]), Err(AgeError::NoMatch));
    // Truncated at the end, at a chunk boundary, or inside the header.
    let header_len = file.windows(4).position(|w| w == b"--- ").expect("mac line") + 48;
    for cut in [file.len() - 1, file.len() - 100 - TAG, header_len + 16 + CHUNK + TAG, header_len + 3, 20] {
        assert!(open(&file[..cut], &[Identity::from_bytes([1; 32])]).is_err(), "truncated at {cut}");
    }
    // One flipped bit anywhere: header, nonce, payload.
    for at in [10, header_len - 5, header_len + 2, file.len() / 2, file.len() - 1] {
        let mut bad = file.clone();
        bad[at] ^= 1;
        assert!(open(&bad, &[Identity::from_bytes([1; 32])]).is_err(), "bit flipped at {at}");
    }
    // Extended after the last chunk.
    let mut longer = file.clone();
    longer.extend_from_slice(&[0; 20]);
    assert!(open(&longer, &[Identity::from_bytes([1; 32])]).is_err());
}

#[test]
fn keys_round_trip_as_text() {
    let id = Identity::from_bytes([42; 32]);
    let text = id.to_bech32();
    assert!(text.starts_with("AGE-SECRET-KEY-1"), "{}", *text);
    assert_eq!(Identity::parse(&text).expect("parse").recipient(), id.recipient());
    let r = id.recipient().to_bech32();
    assert!(r.starts_with("age1") && r.len() == 62, "{r}");
    assert_eq!(Recipient::parse(&r).expect("parse"), id.recipient());
    assert!(Recipient::parse(&r.to_uppercase()).is_err());
    assert!(Recipient::parse("age1qqqq").is_err());
    assert!(Identity::from_file_text("# created: now\n# public key: x\n\n").is_err());
}

fn age_cli() -> bool {
    let found = Command::new("age").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found || std::env::var_os("CI").is_none(), "Debian's age is needed (apt-get install age; .ci/run does)");
    found
}

/// Runs `cmd` with `input` on its standard input (written from another thread, so that neither
/// side blocks on a full pipe) and returns what it printed.
fn pipe_through(cmd: &mut Command, input: Vec<u8>) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write");
    out
}

/// Our file opens with the reference `age -d`, and the reference's file opens with ours.
#[test]
fn interoperates_with_the_reference_age() {
    if !age_cli() {
        eprintln!("skipped: the age CLI is not installed here");
        return;
    }
    let dir = std::env::temp_dir().join(format!("valv-age-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let keyfile = dir.join("key.txt");
    let _ = std::fs::remove_file(&keyfile);
    let gen = Command::new("age-keygen").arg("-o").arg(&keyfile).output().expect("age-keygen");
    assert!(gen.status.success());
    let ids = Identity::from_file_text(&std::fs::read_to_string(&keyfile).expect("key")).expect("their identity parses");
    let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i * 7 % 256) as u8).collect();

    let ours = seal(&data, &[ids[0].recipient()], 11);
    let out = pipe_through(Command::new("age").arg("-d").arg("-i").arg(&keyfile), ours);
    assert!(out.status.success(), "age -d refused our file: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, data);

    let recipient = ids[0].recipient().to_bech32();
    let theirs = pipe_through(Command::new("age").args(["-r", &recipient]), data.clone());
    assert!(theirs.status.success());
    assert_eq!(open(&theirs.stdout, &ids).expect("we open the reference's file"), data);
    let _ = std::fs::remove_dir_all(&dir);
}
