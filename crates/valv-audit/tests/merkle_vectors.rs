//! Every transparency-dev/merkle test vector in the shared testdata must get the verdict
//! `!wantErr` from this crate's verifiers, with one documented class of exceptions (see
//! [`STRICT_LENGTH_EXCEPTIONS`]).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::Value;
use valv_audit::merkle::{
    hash_from_slice, leaf_hash, verify_consistency, verify_inclusion, verify_subtree_consistency,
    verify_subtree_inclusion, Hash,
};
use valv_audit::AuditError;

/// Vectors that upstream accepts although a root in them is not 32 bytes (the 12-byte
/// placeholders "don't care 1"/"don't care 2"): the Go verifier only compares those roots for
/// equality (sizes equal) or ignores them (empty subtree). Valv's verifiers take `[u8; 32]`
/// hashes and reject any other length, as the project's FORMATS.md requires ("Verifiers must
/// reject a hash that is not 32 bytes"). For these files the test checks that the rejection is
/// exactly a hash-length error, and that with every non-32-byte value replaced by a distinct
/// 32-byte stand-in the verdict is upstream's.
const STRICT_LENGTH_EXCEPTIONS: &[&str] = &[
    "consistency/additional/sizes-are-equal-one-and-proof-is-empty.json",
    "subtreeconsistency/additional/sizes-are-equal-one-and-proof-is-empty.json",
    "subtreeconsistency/additional/subtree-is-empty-sizes-are-equal-one-subtree-root-valid-tree-root-random-proof-is-empty.json",
    "subtreeconsistency/additional/subtree-is-empty-sizes-are-equal-zero-subtree-root-valid-tree-root-random-proof-is-empty.json",
];

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testdata/merkle")
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            json_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "json") {
            out.push(path);
        }
    }
}

/// How the raw bytes of a vector's hashes become [`Hash`]es.
#[derive(Clone, Copy)]
enum Hashes {
    /// Strictly: any length but 32 is an error (the verifier's real behaviour).
    Strict,
    /// Non-32-byte values replaced by a distinct 32-byte stand-in (for the exceptions only).
    StandIn,
}

fn hash(v: &Value, mode: Hashes) -> Result<Hash, AuditError> {
    let raw = STANDARD
        .decode(v.as_str().expect("base64 string"))
        .expect("valid base64");
    match mode {
        Hashes::Strict => hash_from_slice(&raw),
        Hashes::StandIn if raw.len() == 32 => hash_from_slice(&raw),
        Hashes::StandIn => Ok(leaf_hash(&[b"stand-in for ".as_slice(), &raw].concat())),
    }
}

fn proof(v: &Value, mode: Hashes) -> Result<Vec<Hash>, AuditError> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items.iter().map(|h| hash(h, mode)).collect(),
        other => panic!("proof is {other}"),
    }
}

fn num(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a u64"))
}

/// The verifier's verdict on one vector: Ok if it accepts.
fn verdict(kind: &str, v: &Value, mode: Hashes) -> Result<(), AuditError> {
    match kind {
        "inclusion" => verify_inclusion(
            num(v, "leafIdx"),
            num(v, "treeSize"),
            &hash(&v["leafHash"], mode)?,
            &proof(&v["proof"], mode)?,
            &hash(&v["root"], mode)?,
        ),
        "consistency" => verify_consistency(
            num(v, "size1"),
            num(v, "size2"),
            &hash(&v["root1"], mode)?,
            &hash(&v["root2"], mode)?,
            &proof(&v["proof"], mode)?,
        ),
        "subtreeinclusion" => verify_subtree_inclusion(
            num(v, "leafIdx"),
            num(v, "start"),
            num(v, "end"),
            &hash(&v["leafHash"], mode)?,
            &proof(&v["proof"], mode)?,
            &hash(&v["root"], mode)?,
        ),
        "subtreeconsistency" => verify_subtree_consistency(
            num(v, "start"),
            num(v, "end"),
            num(v, "size"),
            &hash(&v["root1"], mode)?,
            &hash(&v["root2"], mode)?,
            &proof(&v["proof"], mode)?,
        ),
        other => panic!("unknown vector kind {other}"),
    }
}

#[test]
fn every_vector_agrees() {
    let root = testdata();
    let mut files = Vec::new();
    json_files(&root, &mut files);
    assert!(
        files.len() > 500,
        "expected the full vector set, found {} files",
        files.len()
    );

    // folder -> (files, agreeing, documented exceptions)
    let mut per_folder: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    let mut disagreements = Vec::new();
    let mut exceptions_seen = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let kind = rel.split('/').next().unwrap().to_owned();
        let folder = rel
            .rsplit_once('/')
            .map_or(rel.as_str(), |(d, _)| d)
            .to_owned();
        let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        let want_ok = !v["wantErr"].as_bool().expect("wantErr");
        let got = verdict(&kind, &v, Hashes::Strict);
        let stats = per_folder.entry(folder).or_default();
        stats.0 += 1;
        if STRICT_LENGTH_EXCEPTIONS.contains(&rel.as_str()) {
            exceptions_seen.push(rel.clone());
            assert!(
                want_ok,
                "{rel}: listed as an exception but upstream rejects it"
            );
            assert!(
                matches!(got, Err(AuditError::HashLength(_))),
                "{rel}: expected a hash-length rejection, got {got:?}"
            );
            let logic = verdict(&kind, &v, Hashes::StandIn);
            assert!(
                logic.is_ok(),
                "{rel}: with 32-byte stand-ins the verifier says {logic:?}"
            );
            stats.2 += 1;
            continue;
        }
        if got.is_ok() == want_ok {
            stats.1 += 1;
        } else {
            disagreements.push(format!("{rel}: want ok={want_ok}, got {got:?}"));
        }
    }

    println!(
        "{:<40} {:>6} {:>6} {:>10}",
        "folder", "files", "agree", "exception"
    );
    for (folder, (n, agree, exc)) in &per_folder {
        println!("{folder:<40} {n:>6} {agree:>6} {exc:>10}");
    }
    let total: usize = per_folder.values().map(|s| s.0).sum();
    let agree: usize = per_folder.values().map(|s| s.1).sum();
    println!(
        "total: {total} files, {agree} agree, {} documented exceptions",
        exceptions_seen.len()
    );

    assert!(
        disagreements.is_empty(),
        "disagreements:\n{}",
        disagreements.join("\n")
    );
    assert_eq!(
        exceptions_seen.len(),
        STRICT_LENGTH_EXCEPTIONS.len(),
        "an exception file is missing: saw {exceptions_seen:?}"
    );
}

/// Vectors that upstream rejects and that Valv rejects only because a hash in them is not 32
/// bytes: with 32-byte stand-ins Valv's logic would accept them.
///
/// - `empty-root-and-leaf`: root and leaf hash are both empty byte strings (equal, so a one-leaf
///   tree would match); upstream also rejects them for their length.
/// - `size1-is-zero-and-size2-is-not-zero`: a consistency proof from size 0 to size 1 with the
///   empty root, an empty proof and a 12-byte second root. Upstream rejects any consistency proof
///   from size 0; Valv accepts one from the empty tree (empty proof, `root_m` = the empty root,
///   as FORMATS.md describes), so here only the 12-byte root rejects it.
const LENGTH_DECIDES_REJECTION: &[&str] = &[
    "consistency/additional/size1-is-zero-and-size2-is-not-zero.json",
    "inclusion/single-entry/empty-root-and-leaf.json",
    "subtreeinclusion/single-entry/empty-root-and-leaf-subtree.json",
    "subtreeinclusion/single-entry/empty-root-and-leaf.json",
];

/// Pins down exactly where the strict hash-length rule, rather than the proof logic, decides a
/// verdict: the two lists above and nothing else.
#[test]
fn strict_length_rule_decides_only_the_listed_vectors() {
    let root = testdata();
    let mut files = Vec::new();
    json_files(&root, &mut files);
    let mut decided_by_length = Vec::new();
    for path in &files {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let kind = rel.split('/').next().unwrap().to_owned();
        let v: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        let strict = verdict(&kind, &v, Hashes::Strict).is_ok();
        let logic = verdict(&kind, &v, Hashes::StandIn).is_ok();
        if strict != logic {
            decided_by_length.push(rel);
        }
    }
    let mut want: Vec<String> = STRICT_LENGTH_EXCEPTIONS
        .iter()
        .chain(LENGTH_DECIDES_REJECTION)
        .map(|s| s.to_string())
        .collect();
    want.sort();
    decided_by_length.sort();
    assert_eq!(decided_by_length, want);
}
