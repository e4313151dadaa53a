//! The RFC 6962 / RFC 9162 §2.1 Merkle tree over SHA-256, its inclusion and consistency proofs,
//! and the subtree variants (a subtree `[start, end)` as defined by the Merkle Tree Certificates
//! draft and implemented by transparency-dev/merkle).
//!
//! - Leaf hash = SHA-256(0x00 || data); interior node = SHA-256(0x01 || left || right); the empty
//!   tree's root is SHA-256 of the empty string ([`EMPTY_ROOT`]).
//! - A tree of n > 1 leaves splits at k, the largest power of two smaller than n.
//! - A *subtree* `[start, end)` is valid when `start <= end` and `start` is a multiple of the
//!   smallest power of two >= `end - start`. Its hash is the Merkle tree hash of leaves
//!   `start..end` on their own. Such a range sits under a single node of every tree that contains
//!   it; when it is not a perfect subtree that node exists only in trees that end at `end`.
//! - A subtree inclusion proof is an ordinary inclusion proof of leaf `index - start` in the tree
//!   formed by the subtree's leaves. A subtree consistency proof shows that a subtree hash is the
//!   hash of leaves `start..end` of a tree of a given size; the RFC 9162 consistency proof from
//!   `m` to `n` is the special case `[0, m)`.
//!
//! Hashes are `[u8; 32]`, so a hash of any other length cannot reach the verifiers: convert
//! untrusted bytes with [`hash_from_slice`], which rejects them. Verifiers check the exact proof
//! length for the position, and every index and size bound, before hashing anything.
//!
//! Proof generation works from a slice of leaf hashes (the whole tree); it recomputes the sibling
//! subtree hashes, O(n) hashing per proof.

use sha2::{Digest, Sha256};

use crate::AuditError;

/// Length of every hash in the tree.
pub const HASH_LEN: usize = 32;

/// A SHA-256 hash: a leaf hash, an interior node hash or a root.
pub type Hash = [u8; HASH_LEN];

/// Root of the empty tree: SHA-256("").
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Converts untrusted bytes into a [`Hash`](type@Hash), rejecting any length but 32.
pub fn hash_from_slice(bytes: &[u8]) -> Result<Hash, AuditError> {
    Hash::try_from(bytes).map_err(|_| AuditError::HashLength(bytes.len()))
}

/// Leaf hash: SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// Interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The Merkle tree hash (root) of a list of leaf hashes; [`EMPTY_ROOT`] for no leaves.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves {
        [] => EMPTY_ROOT,
        [only] => *only,
        _ => {
            let (left, right) = leaves.split_at(split_point(leaves.len()));
            node_hash(&root(left), &root(right))
        }
    }
}

/// Whether `[start, end)` is a valid subtree: `start <= end` and `start` is a multiple of the
/// smallest power of two >= `end - start`. The empty range `[s, s)` counts as valid.
pub fn is_valid_subtree(start: u64, end: u64) -> bool {
    if start > end {
        return false;
    }
    if start == 0 || start == end {
        return true;
    }
    // No power of two >= end - start fits in a u64 only when end - start > 2^63, and then no
    // non-zero start can be a multiple of it.
    match (end - start).checked_next_power_of_two() {
        Some(width) => start & (width - 1) == 0,
        None => false,
    }
}

/// The hash of subtree `[start, end)` of the tree whose leaves are `leaves`.
pub fn subtree_root(leaves: &[Hash], start: u64, end: u64) -> Result<Hash, AuditError> {
    check_subtree_in_tree(start, end, len_u64(leaves))?;
    Ok(root(slice(leaves, start, end)?))
}

/// Inclusion proof (RFC 9162 §2.1.3.1) for leaf `index` of the tree whose leaves are `leaves`:
/// sibling hashes from the leaf up.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, AuditError> {
    let size = len_u64(leaves);
    if index >= size {
        return Err(AuditError::IndexOutOfRange { index, size });
    }
    prove(leaves, &Plan::new(index, index + 1, size)?)
}

/// Inclusion proof for leaf `index` in subtree `[start, end)` of the tree whose leaves are
/// `leaves` (the ordinary inclusion proof within the subtree's own leaves).
pub fn subtree_inclusion_proof(
    leaves: &[Hash],
    index: u64,
    start: u64,
    end: u64,
) -> Result<Vec<Hash>, AuditError> {
    check_subtree_in_tree(start, end, len_u64(leaves))?;
    check_index_in_subtree(index, start, end)?;
    inclusion_proof(slice(leaves, start, end)?, index - start)
}

/// Consistency proof (RFC 9162 §2.1.4.1) from the tree of the first `m` leaves to the tree of
/// all `leaves`. From `m == 0` or to `m == leaves.len()` the proof is empty.
pub fn consistency_proof(leaves: &[Hash], m: u64) -> Result<Vec<Hash>, AuditError> {
    subtree_consistency_proof(leaves, 0, m)
}

/// Subtree consistency proof: shows that the hash of subtree `[start, end)` is the hash of those
/// leaves of the tree whose leaves are `leaves`. Empty for an empty subtree, and for `[0, n)`.
pub fn subtree_consistency_proof(
    leaves: &[Hash],
    start: u64,
    end: u64,
) -> Result<Vec<Hash>, AuditError> {
    let size = len_u64(leaves);
    check_subtree_in_tree(start, end, size)?;
    if start == end {
        return Ok(Vec::new());
    }
    prove(leaves, &Plan::new(start, end, size)?)
}

/// The root of a tree of `size` leaves recomputed from leaf `index`'s hash and its inclusion
/// proof. Strict: `index < size` and the proof has exactly the length for that position.
pub fn root_from_inclusion_proof(
    index: u64,
    size: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
) -> Result<Hash, AuditError> {
    if index >= size {
        return Err(AuditError::IndexOutOfRange { index, size });
    }
    let (_, root) = Plan::new(index, index + 1, size)?.fold(leaf_hash, proof)?;
    Ok(root)
}

/// Verifies that `leaf_hash` is leaf `index` of the tree of `size` leaves whose root is `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), AuditError> {
    expect_equal(
        &root_from_inclusion_proof(index, size, leaf_hash, proof)?,
        root,
    )
}

/// The hash of subtree `[start, end)` recomputed from leaf `index`'s hash and its subtree
/// inclusion proof. Requires a valid, non-empty subtree with `start <= index < end`.
pub fn root_from_subtree_inclusion_proof(
    index: u64,
    start: u64,
    end: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
) -> Result<Hash, AuditError> {
    if !is_valid_subtree(start, end) {
        return Err(AuditError::InvalidSubtree { start, end });
    }
    check_index_in_subtree(index, start, end)?;
    root_from_inclusion_proof(index - start, end - start, leaf_hash, proof)
}

/// Verifies that `leaf_hash` is leaf `index` of subtree `[start, end)` whose hash is
/// `subtree_root`.
pub fn verify_subtree_inclusion(
    index: u64,
    start: u64,
    end: u64,
    leaf_hash: &Hash,
    proof: &[Hash],
    subtree_root: &Hash,
) -> Result<(), AuditError> {
    expect_equal(
        &root_from_subtree_inclusion_proof(index, start, end, leaf_hash, proof)?,
        subtree_root,
    )
}

/// The root of the tree of `n` leaves recomputed from the root of its first `m` leaves and a
/// consistency proof, after checking that the proof reproduces `root_m`. Requires
/// `0 < m <= n`: nothing about a larger tree follows from the empty tree.
pub fn root_from_consistency_proof(
    m: u64,
    n: u64,
    root_m: &Hash,
    proof: &[Hash],
) -> Result<Hash, AuditError> {
    if m > n {
        return Err(AuditError::SizeOrder {
            smaller: m,
            larger: n,
        });
    }
    if m == 0 {
        return Err(AuditError::EmptyTree);
    }
    root_from_subtree_consistency_proof(0, m, n, root_m, proof)
}

/// Verifies that the tree of `m` leaves with root `root_m` is a prefix of the tree of `n` leaves
/// with root `root_n` (RFC 9162 §2.1.4.2).
///
/// - `m > n` is rejected.
/// - `m == n` needs an empty proof and `root_m == root_n`.
/// - `m == 0 < n` needs an empty proof and `root_m` equal to [`EMPTY_ROOT`]: the empty tree is a
///   prefix of every tree, so `root_n` is not constrained.
pub fn verify_consistency(
    m: u64,
    n: u64,
    root_m: &Hash,
    root_n: &Hash,
    proof: &[Hash],
) -> Result<(), AuditError> {
    if m > n {
        return Err(AuditError::SizeOrder {
            smaller: m,
            larger: n,
        });
    }
    if m == 0 {
        expect_empty(proof)?;
        expect_equal(root_m, &EMPTY_ROOT)?;
        return if n == 0 {
            expect_equal(root_m, root_n)
        } else {
            Ok(())
        };
    }
    expect_equal(
        &root_from_subtree_consistency_proof(0, m, n, root_m, proof)?,
        root_n,
    )
}

/// The root of the tree of `size` leaves recomputed from the hash of its subtree `[start, end)`
/// and a subtree consistency proof, after checking that the proof reproduces `subtree_root`.
/// Requires a valid, non-empty subtree with `end <= size`.
pub fn root_from_subtree_consistency_proof(
    start: u64,
    end: u64,
    size: u64,
    subtree_root: &Hash,
    proof: &[Hash],
) -> Result<Hash, AuditError> {
    check_subtree_in_tree(start, end, size)?;
    if start == end {
        return Err(AuditError::EmptyTree);
    }
    let (sub, root) = Plan::new(start, end, size)?.fold(subtree_root, proof)?;
    expect_equal(&sub, subtree_root)?;
    Ok(root)
}

/// Verifies that `subtree_root` is the hash of leaves `[start, end)` of the tree of `size` leaves
/// with root `root`. An empty subtree needs an empty proof and `subtree_root` equal to
/// [`EMPTY_ROOT`], and then holds in every tree, so `root` is not constrained.
pub fn verify_subtree_consistency(
    start: u64,
    end: u64,
    size: u64,
    subtree_root: &Hash,
    root: &Hash,
    proof: &[Hash],
) -> Result<(), AuditError> {
    check_subtree_in_tree(start, end, size)?;
    if start == end {
        expect_empty(proof)?;
        return expect_equal(subtree_root, &EMPTY_ROOT);
    }
    expect_equal(
        &root_from_subtree_consistency_proof(start, end, size, subtree_root, proof)?,
        root,
    )
}

// --- the shared proof shape ---------------------------------------------------------------

/// One level of the descent from the root of a tree towards a subtree, and the sibling whose
/// hash the proof carries for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The subtree lies in the left child; the proof carries the right child.
    Right,
    /// The subtree lies in the right child; the proof carries the left child.
    Left,
    /// The subtree starts at this node and covers its left child and part of its right child; the
    /// proof carries the left child, which is also the subtree's own left part.
    LeftOfSubtree,
}

/// Where the descent ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    /// At the node whose hash is the value being proven (the leaf, or the subtree's hash).
    Known,
    /// At the node covering leaves `[a, b)`, the rightmost part of a subtree that is not a node
    /// of the larger tree; the proof carries its hash first.
    Carried(u64, u64),
}

/// The shape of a proof for subtree `[start, end)` in a tree of `size` leaves, following the
/// recursive definition of RFC 9162 §2.1.3.1 (PATH) and §2.1.4.1 (SUBPROOF), generalised to a
/// subtree as the MTC draft does. An inclusion proof for leaf `i` is the shape of `[i, i + 1)`.
///
/// The proof lists the carried terminal hash (if any) and then one hash per step, from the
/// deepest step up to the root.
#[derive(Debug)]
struct Plan {
    /// From the root down, with the global leaf range `[a, b)` of each step's sibling.
    steps: Vec<(Step, u64, u64)>,
    terminal: Terminal,
}

impl Plan {
    /// Requires `start < end <= size` and a valid subtree.
    fn new(start: u64, end: u64, size: u64) -> Result<Self, AuditError> {
        if !(start < end && end <= size && is_valid_subtree(start, end)) {
            return Err(AuditError::InvalidSubtree { start, end });
        }
        let mut steps = Vec::new();
        // The current node covers global leaves [offset, offset + n); (s, e) is the subtree
        // relative to it.
        let (mut offset, mut s, mut e, mut n) = (0u64, start, end, size);
        let mut known = true;
        while !(s == 0 && e == n) {
            // Here n >= 2: s < e <= n and [s, e) is not all of [0, n).
            let k = split_point_u64(n);
            if e <= k {
                steps.push((Step::Right, offset + k, offset + n));
                n = k;
            } else if s >= k {
                steps.push((Step::Left, offset, offset + k));
                offset += k;
                s -= k;
                e -= k;
                n -= k;
            } else if s == 0 {
                steps.push((Step::LeftOfSubtree, offset, offset + k));
                offset += k;
                e -= k;
                n -= k;
                known = false;
            } else {
                // Straddling the split without starting at the node cannot happen for a valid
                // subtree; refuse rather than prove something else.
                return Err(AuditError::InvalidSubtree { start, end });
            }
        }
        let terminal = if known {
            Terminal::Known
        } else {
            Terminal::Carried(offset, offset + n)
        };
        Ok(Plan { steps, terminal })
    }

    fn proof_len(&self) -> usize {
        self.steps.len() + usize::from(self.terminal != Terminal::Known)
    }

    /// Recomputes, bottom-up, the subtree's hash and the tree's root from a proof. `known` is the
    /// hash the proof starts from when the terminal is [`Terminal::Known`].
    fn fold(&self, known: &Hash, proof: &[Hash]) -> Result<(Hash, Hash), AuditError> {
        let want = self.proof_len();
        if proof.len() != want {
            return Err(AuditError::ProofLength {
                got: proof.len(),
                want,
            });
        }
        let (mut node, siblings) = match (self.terminal, proof) {
            (Terminal::Known, _) => (*known, proof),
            (Terminal::Carried(..), [first, rest @ ..]) => (*first, rest),
            (Terminal::Carried(..), []) => return Err(AuditError::ProofLength { got: 0, want }),
        };
        let mut sub = node;
        for (&(step, _, _), sibling) in self.steps.iter().rev().zip(siblings) {
            match step {
                Step::Right => node = node_hash(&node, sibling),
                Step::Left => node = node_hash(sibling, &node),
                Step::LeftOfSubtree => {
                    node = node_hash(sibling, &node);
                    sub = node_hash(sibling, &sub);
                }
            }
        }
        Ok((sub, node))
    }
}

impl Plan {
    /// The subtrees `[a, b)` whose hashes the proof carries, in proof order.
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(self.proof_len());
        if let Terminal::Carried(a, b) = self.terminal {
            out.push((a, b));
        }
        out.extend(self.steps.iter().rev().map(|&(_, a, b)| (a, b)));
        out
    }
}

/// Builds the proof for `plan` from the tree's leaves.
fn prove(leaves: &[Hash], plan: &Plan) -> Result<Vec<Hash>, AuditError> {
    plan.ranges().into_iter().map(|(a, b)| Ok(root(slice(leaves, a, b)?))).collect()
}

/// The subtrees `[a, b)` whose hashes make up the inclusion proof of leaf `index` in a tree of
/// `size` leaves, in proof order (each one a valid subtree, see [`is_valid_subtree`]). The proof
/// is their hashes, however they are obtained (from all leaves, or from stored tiles).
pub fn inclusion_proof_ranges(index: u64, size: u64) -> Result<Vec<(u64, u64)>, AuditError> {
    if index >= size {
        return Err(AuditError::IndexOutOfRange { index, size });
    }
    Ok(Plan::new(index, index + 1, size)?.ranges())
}

/// The subtrees `[a, b)` whose hashes make up the consistency proof from the tree of `m` leaves
/// to the tree of `n` leaves, in proof order; none for `m == 0` or `m == n`.
pub fn consistency_proof_ranges(m: u64, n: u64) -> Result<Vec<(u64, u64)>, AuditError> {
    check_subtree_in_tree(0, m, n)?;
    if m == 0 {
        return Ok(Vec::new());
    }
    Ok(Plan::new(0, m, n)?.ranges())
}

// --- small helpers ------------------------------------------------------------------------

/// The largest power of two smaller than `n` (n >= 2).
fn split_point(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The largest power of two smaller than `n` (n >= 2).
fn split_point_u64(n: u64) -> u64 {
    1 << (u64::BITS - 1 - (n - 1).leading_zeros())
}

fn len_u64(leaves: &[Hash]) -> u64 {
    // usize is at most 64 bits on every supported target.
    leaves.len() as u64
}

fn slice(leaves: &[Hash], a: u64, b: u64) -> Result<&[Hash], AuditError> {
    let size = len_u64(leaves);
    match (usize::try_from(a), usize::try_from(b)) {
        (Ok(a), Ok(b)) if a <= b => leaves.get(a..b).ok_or(AuditError::SizeOrder {
            smaller: b as u64,
            larger: size,
        }),
        _ => Err(AuditError::InvalidSubtree { start: a, end: b }),
    }
}

fn check_subtree_in_tree(start: u64, end: u64, size: u64) -> Result<(), AuditError> {
    if !is_valid_subtree(start, end) {
        return Err(AuditError::InvalidSubtree { start, end });
    }
    if end > size {
        return Err(AuditError::SizeOrder {
            smaller: end,
            larger: size,
        });
    }
    Ok(())
}

fn check_index_in_subtree(index: u64, start: u64, end: u64) -> Result<(), AuditError> {
    if index < start || index >= end {
        return Err(AuditError::IndexOutOfRange { index, size: end });
    }
    Ok(())
}

fn expect_empty(proof: &[Hash]) -> Result<(), AuditError> {
    if proof.is_empty() {
        Ok(())
    } else {
        Err(AuditError::ProofLength {
            got: proof.len(),
            want: 0,
        })
    }
}

fn expect_equal(computed: &Hash, expected: &Hash) -> Result<(), AuditError> {
    if computed == expected {
        Ok(())
    } else {
        Err(AuditError::RootMismatch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(h: &Hash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The leaves of the RFC 6962 test tree used by transparency-dev/merkle and Trillian.
    fn test_leaves() -> Vec<Hash> {
        let data: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ];
        data.iter().map(|d| leaf_hash(d)).collect()
    }

    // RFC 9162 reference definitions, written as directly as possible, to check the planner.

    fn ref_path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n == 1 {
            return vec![];
        }
        let k = split_point(n);
        if m < k {
            let mut p = ref_path(m, &d[..k]);
            p.push(root(&d[k..]));
            p
        } else {
            let mut p = ref_path(m - k, &d[k..]);
            p.push(root(&d[..k]));
            p
        }
    }

    fn ref_subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![root(d)] };
        }
        let k = split_point(n);
        if m <= k {
            let mut p = ref_subproof(m, &d[..k], b);
            p.push(root(&d[k..]));
            p
        } else {
            let mut p = ref_subproof(m - k, &d[k..], false);
            p.push(root(&d[..k]));
            p
        }
    }

    #[test]
    fn known_roots() {
        // Roots of the first 1..=8 leaves of the test tree (RFC 6962 test vectors).
        let want = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let leaves = test_leaves();
        for (i, w) in want.iter().enumerate() {
            assert_eq!(hex(&root(&leaves[..=i])), *w, "root of {} leaves", i + 1);
        }
        assert_eq!(root(&[]), EMPTY_ROOT);
        let empty: Hash = Sha256::digest(b"").into();
        assert_eq!(EMPTY_ROOT, empty);
    }

    #[test]
    fn generation_matches_rfc_definitions() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for n in 1..=leaves.len() {
            let d = &leaves[..n];
            for m in 0..n {
                assert_eq!(
                    inclusion_proof(d, m as u64).unwrap(),
                    ref_path(m, d),
                    "PATH({m}, {n})"
                );
            }
            for m in 1..=n {
                assert_eq!(
                    consistency_proof(d, m as u64).unwrap(),
                    ref_subproof(m, d, true),
                    "PROOF({m}, {n})"
                );
            }
        }
    }

    #[test]
    fn rfc_example_shapes() {
        // RFC 9162 §2.1.5 examples on the 7-leaf tree a..g, leaves d0..d6.
        let l: Vec<Hash> = (0u8..7).map(|i| leaf_hash(&[i])).collect();
        let h = |a: usize, b: usize| root(&l[a..b]);
        assert_eq!(
            inclusion_proof(&l, 0).unwrap(),
            vec![l[1], h(2, 4), h(4, 7)]
        );
        assert_eq!(
            inclusion_proof(&l, 3).unwrap(),
            vec![l[2], h(0, 2), h(4, 7)]
        );
        assert_eq!(inclusion_proof(&l, 4).unwrap(), vec![l[5], l[6], h(0, 4)]);
        assert_eq!(inclusion_proof(&l, 6).unwrap(), vec![h(4, 6), h(0, 4)]);
        assert_eq!(
            consistency_proof(&l, 3).unwrap(),
            vec![l[2], l[3], h(0, 2), h(4, 7)]
        );
        assert_eq!(consistency_proof(&l, 4).unwrap(), vec![h(4, 7)]);
        assert_eq!(
            consistency_proof(&l, 6).unwrap(),
            vec![h(4, 6), l[6], h(0, 4)]
        );
    }

    #[test]
    fn subtree_proofs_round_trip_exhaustively() {
        let leaves: Vec<Hash> = (0u32..40).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for size in 1..=leaves.len() as u64 {
            let tree = &leaves[..size as usize];
            let tree_root = root(tree);
            for start in 0..size {
                for end in start + 1..=size {
                    if !is_valid_subtree(start, end) {
                        assert!(subtree_consistency_proof(tree, start, end).is_err());
                        continue;
                    }
                    let sub = subtree_root(tree, start, end).unwrap();
                    let proof = subtree_consistency_proof(tree, start, end).unwrap();
                    verify_subtree_consistency(start, end, size, &sub, &tree_root, &proof)
                        .unwrap_or_else(|e| panic!("[{start}, {end}) in {size}: {e}"));
                    let wrong = node_hash(&sub, &sub);
                    assert!(verify_subtree_consistency(
                        start, end, size, &wrong, &tree_root, &proof
                    )
                    .is_err());
                    for index in start..end {
                        let p = subtree_inclusion_proof(tree, index, start, end).unwrap();
                        verify_subtree_inclusion(
                            index,
                            start,
                            end,
                            &tree[index as usize],
                            &p,
                            &sub,
                        )
                        .unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn subtree_validity() {
        assert!(is_valid_subtree(0, 0));
        assert!(is_valid_subtree(0, 7));
        assert!(is_valid_subtree(4, 7));
        assert!(is_valid_subtree(8, 14));
        assert!(is_valid_subtree(5, 5));
        assert!(!is_valid_subtree(2, 1));
        assert!(!is_valid_subtree(3, 5));
        assert!(!is_valid_subtree(2, 6));
        assert!(!is_valid_subtree(1, (1 << 63) + 2));
        assert!(is_valid_subtree(1 << 63, u64::MAX));
        assert!(is_valid_subtree(0, u64::MAX));
    }

    #[test]
    fn strict_rejections() {
        let leaves = test_leaves();
        let r = root(&leaves);
        let p = inclusion_proof(&leaves, 2).unwrap();
        assert_eq!(
            verify_inclusion(8, 8, &leaves[0], &[], &r),
            Err(AuditError::IndexOutOfRange { index: 8, size: 8 })
        );
        assert_eq!(
            verify_inclusion(0, 0, &leaves[0], &[], &EMPTY_ROOT),
            Err(AuditError::IndexOutOfRange { index: 0, size: 0 })
        );
        assert!(matches!(
            verify_inclusion(2, 8, &leaves[2], &p[..2], &r),
            Err(AuditError::ProofLength { got: 2, want: 3 })
        ));
        let mut longer = p.clone();
        longer.push(r);
        assert!(matches!(
            verify_inclusion(2, 8, &leaves[2], &longer, &r),
            Err(AuditError::ProofLength { .. })
        ));
        verify_inclusion(2, 8, &leaves[2], &p, &r).unwrap();

        // Consistency edge cases.
        let r3 = root(&leaves[..3]);
        assert!(matches!(
            verify_consistency(4, 3, &r, &r3, &[]),
            Err(AuditError::SizeOrder { .. })
        ));
        assert!(verify_consistency(0, 8, &EMPTY_ROOT, &r, &[]).is_ok());
        assert!(verify_consistency(0, 8, &EMPTY_ROOT, &r, &[r]).is_err());
        assert!(verify_consistency(0, 8, &r3, &r, &[]).is_err());
        assert!(verify_consistency(0, 0, &EMPTY_ROOT, &EMPTY_ROOT, &[]).is_ok());
        assert!(verify_consistency(0, 0, &EMPTY_ROOT, &r, &[]).is_err());
        assert!(verify_consistency(3, 3, &r3, &r3, &[]).is_ok());
        assert!(verify_consistency(3, 3, &r3, &r3, &[r3]).is_err());
        assert!(verify_consistency(3, 3, &r3, &r, &[]).is_err());
        assert!(verify_consistency(3, 8, &r3, &r, &[]).is_err());
        let c = consistency_proof(&leaves, 3).unwrap();
        verify_consistency(3, 8, &r3, &r, &c).unwrap();
        assert_eq!(root_from_consistency_proof(3, 8, &r3, &c).unwrap(), r);
        assert_eq!(
            root_from_consistency_proof(0, 8, &EMPTY_ROOT, &[]),
            Err(AuditError::EmptyTree)
        );

        assert_eq!(hash_from_slice(&[0u8; 31]), Err(AuditError::HashLength(31)));
        assert_eq!(hash_from_slice(&[7u8; 32]).unwrap(), [7u8; 32]);
        assert!(inclusion_proof(&[], 0).is_err());
        assert!(consistency_proof(&leaves, 9).is_err());
        assert_eq!(consistency_proof(&leaves, 0).unwrap(), Vec::<Hash>::new());
        assert_eq!(consistency_proof(&leaves, 8).unwrap(), Vec::<Hash>::new());
    }
}
