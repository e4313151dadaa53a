//! The right edge of a growing Merkle tree: the roots of its perfect subtrees, largest first.
//! Appending a leaf is O(log n) and so is the root, so a log can be integrated entry by entry
//! without keeping or rehashing the whole tree.

use crate::merkle::{node_hash, Hash, EMPTY_ROOT};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (number of leaves, root) of each perfect subtree on the right edge, largest first.
    nodes: Vec<(u64, Hash)>,
}

impl Frontier {
    pub fn new() -> Self {
        Frontier::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (1u64, leaf);
        // Two perfect subtrees of equal size merge into one twice as large.
        while let Some(&(n, left)) = self.nodes.last() {
            if n != node.0 {
                break;
            }
            self.nodes.pop();
            node = (n * 2, node_hash(&left, &node.1));
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// The RFC 6962 root of the leaves pushed so far: the perfect subtrees folded right to left.
    pub fn root(&self) -> Hash {
        let mut nodes = self.nodes.iter().rev();
        let Some(&(_, mut acc)) = nodes.next() else { return EMPTY_ROOT };
        for (_, left) in nodes {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{leaf_hash, root};

    #[test]
    fn matches_the_tree_root_at_every_size() {
        let leaves: Vec<Hash> = (0..300u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::new();
        assert_eq!(f.root(), EMPTY_ROOT);
        for (i, leaf) in leaves.iter().enumerate() {
            f.push(*leaf);
            assert_eq!(f.size(), i as u64 + 1);
            assert_eq!(f.root(), root(&leaves[..=i]), "size {}", i + 1);
        }
        assert!(f.nodes.len() <= 9, "one node per set bit of the size");
    }
}
