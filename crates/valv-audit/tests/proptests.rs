//! Property tests: generated proofs verify, and any change to a proof hash, the index or the sizes
//! is caught; signed notes and checkpoints round-trip.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use valv_audit::checkpoint::{open_checkpoint, sign_checkpoint, Checkpoint};
use valv_audit::merkle::{
    consistency_proof, inclusion_proof, leaf_hash, root, root_from_inclusion_proof,
    verify_consistency, verify_inclusion, Hash,
};
use valv_audit::note::{open, sign, Note, Signer};

fn leaves(n: usize) -> Vec<Hash> {
    (0..n as u64).map(|i| leaf_hash(&i.to_be_bytes())).collect()
}

/// The largest power of two smaller than n (n >= 2).
fn split(n: u64) -> u64 {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The shape of PATH(m, D_n) per RFC 9162 §2.1.3.1: the side of each sibling, root first.
/// Two (index, size) pairs with the same shape take the same proof to the same root, so no
/// inclusion proof can tell them apart; every other change must be rejected.
fn inclusion_shape(mut m: u64, mut n: u64) -> Vec<char> {
    let mut shape = Vec::new();
    while n > 1 {
        let k = split(n);
        if m < k {
            shape.push('R');
            n = k;
        } else {
            shape.push('L');
            m -= k;
            n -= k;
        }
    }
    shape
}

/// The shape of PROOF(m, D_n) per RFC 9162 §2.1.4.1 (SUBPROOF with its flag b).
fn consistency_shape(mut m: u64, mut n: u64) -> Vec<char> {
    let mut shape = Vec::new();
    let mut b = true;
    while m != n {
        let k = split(n);
        if m <= k {
            shape.push('R');
            n = k;
        } else {
            shape.push('L');
            m -= k;
            n -= k;
            b = false;
        }
    }
    shape.push(if b { 'K' } else { 'C' });
    shape
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn inclusion_proofs_verify_and_tampering_fails(
        n in 1usize..300,
        i in any::<prop::sample::Index>(),
        pick in any::<prop::sample::Index>(),
        bit in 0usize..256,
        other in any::<prop::sample::Index>(),
        other_size in 1u64..600,
    ) {
        let l = leaves(n);
        let r = root(&l);
        let index = i.index(n) as u64;
        let size = n as u64;
        let proof = inclusion_proof(&l, index).unwrap();
        prop_assert_eq!(verify_inclusion(index, size, &l[index as usize], &proof, &r), Ok(()));
        prop_assert_eq!(root_from_inclusion_proof(index, size, &l[index as usize], &proof), Ok(r));

        // Flipping any bit of any proof hash.
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let k = pick.index(bad.len());
            bad[k][bit / 8] ^= 1 << (bit % 8);
            prop_assert!(verify_inclusion(index, size, &l[index as usize], &bad, &r).is_err());
        }
        // Every bit of every proof hash, for the smaller trees.
        if n <= 40 {
            for k in 0..proof.len() {
                for b in 0..256 {
                    let mut bad = proof.clone();
                    bad[k][b / 8] ^= 1 << (b % 8);
                    prop_assert!(verify_inclusion(index, size, &l[index as usize], &bad, &r).is_err());
                }
            }
        }
        // Another index in the same tree.
        let j = other.index(n) as u64;
        if j != index {
            prop_assert!(verify_inclusion(j, size, &l[index as usize], &proof, &r).is_err());
        }
        // The wrong leaf.
        let wrong_leaf = leaf_hash(b"not in the tree");
        prop_assert!(verify_inclusion(index, size, &wrong_leaf, &proof, &r).is_err());
        // Another tree size: rejected unless the proof has the very same shape there (then no
        // inclusion proof could tell the sizes apart; the signed checkpoint fixes the size).
        if other_size != size {
            let accepted = verify_inclusion(index, other_size, &l[index as usize], &proof, &r).is_ok();
            let same_shape = index < other_size
                && inclusion_shape(index, other_size) == inclusion_shape(index, size);
            prop_assert_eq!(accepted, same_shape);
        }
        prop_assert!(verify_inclusion(index, size * 2, &l[index as usize], &proof, &r).is_err()
            || inclusion_shape(index, size * 2) == inclusion_shape(index, size));
        // A proof one hash too long or too short.
        let mut longer = proof.clone();
        longer.push(r);
        prop_assert!(verify_inclusion(index, size, &l[index as usize], &longer, &r).is_err());
        if !proof.is_empty() {
            prop_assert!(verify_inclusion(index, size, &l[index as usize], &proof[1..], &r).is_err());
        }
    }

    #[test]
    fn consistency_proofs_verify_and_tampering_fails(
        n in 1usize..300,
        m_pick in any::<prop::sample::Index>(),
        pick in any::<prop::sample::Index>(),
        bit in 0usize..256,
        other_m in 1u64..300,
        other_n in 1u64..600,
    ) {
        let l = leaves(n);
        let m = m_pick.index(n) as u64 + 1; // 1..=n
        let size = n as u64;
        let root_m = root(&l[..m as usize]);
        let root_n = root(&l);
        let proof = consistency_proof(&l, m).unwrap();
        prop_assert_eq!(verify_consistency(m, size, &root_m, &root_n, &proof), Ok(()));

        if !proof.is_empty() {
            let mut bad = proof.clone();
            let k = pick.index(bad.len());
            bad[k][bit / 8] ^= 1 << (bit % 8);
            prop_assert!(verify_consistency(m, size, &root_m, &root_n, &bad).is_err());
        }
        if n <= 40 {
            for k in 0..proof.len() {
                for b in 0..256 {
                    let mut bad = proof.clone();
                    bad[k][b / 8] ^= 1 << (b % 8);
                    prop_assert!(verify_consistency(m, size, &root_m, &root_n, &bad).is_err());
                }
            }
        }
        // Other sizes: rejected unless the proof has exactly the same shape there.
        if other_m != m {
            let accepted = verify_consistency(other_m, size, &root_m, &root_n, &proof).is_ok();
            let same = other_m <= size && consistency_shape(other_m, size) == consistency_shape(m, size);
            prop_assert_eq!(accepted, same);
        }
        if other_n != size {
            let accepted = verify_consistency(m, other_n, &root_m, &root_n, &proof).is_ok();
            let same = m <= other_n && consistency_shape(m, other_n) == consistency_shape(m, size);
            prop_assert_eq!(accepted, same);
        }
        // Swapped or wrong roots.
        if m != size {
            prop_assert!(verify_consistency(m, size, &root_n, &root_m, &proof).is_err());
        }
        let wrong = leaf_hash(b"wrong root");
        prop_assert!(verify_consistency(m, size, &wrong, &root_n, &proof).is_err());
        prop_assert!(verify_consistency(m, size, &root_m, &wrong, &proof).is_err());
        let mut longer = proof.clone();
        longer.push(root_n);
        prop_assert!(verify_consistency(m, size, &root_m, &root_n, &longer).is_err());
        if !proof.is_empty() {
            prop_assert!(verify_consistency(m, size, &root_m, &root_n, &proof[1..]).is_err());
        }
    }

    #[test]
    fn note_sign_parse_verify_round_trip(
        lines in prop::collection::vec("[^\\x00-\\x1f]{1,40}", 1..6),
        seed in any::<[u8; 32]>(),
        name in "[a-z0-9./_-]{1,30}",
    ) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let signer = Signer::new(&name, &seed).unwrap();
        let signed = sign(&text, &[&signer]).unwrap();
        let note = Note::parse(&signed).unwrap();
        prop_assert_eq!(note.text(), text.as_str());
        prop_assert_eq!(note.to_string(), signed.clone());
        prop_assert!(open(&signed, &[signer.verifier()]).is_ok());
        let vkey = signer.verifier().to_vkey();
        let verifier = valv_audit::note::Verifier::from_vkey(&vkey).unwrap();
        prop_assert!(open(&signed, &[verifier]).is_ok());
    }

    #[test]
    fn checkpoint_format_parse_round_trip(
        origin in "[a-zA-Z0-9./_:-]{1,60}",
        size in any::<u64>(),
        root_hash in any::<[u8; 32]>(),
        seed in any::<[u8; 32]>(),
    ) {
        let root = if size == 0 { valv_audit::EMPTY_ROOT } else { root_hash };
        let cp = Checkpoint { origin: origin.clone(), size, root };
        let text = cp.to_note_text().unwrap();
        prop_assert_eq!(Checkpoint::parse(&text).unwrap(), cp.clone());
        let signer = Signer::new(&origin, &seed).unwrap();
        let signed = sign_checkpoint(&cp, &signer).unwrap();
        prop_assert_eq!(open_checkpoint(&signed, &[signer.verifier()]).unwrap(), cp);
    }
}
