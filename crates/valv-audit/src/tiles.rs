//! The tree's interior hashes kept as tiles, so a proof needs O(log n) stored hashes instead of
//! every leaf, and a restarted integrator resumes from a handful of tiles instead of rehashing
//! the log.
//!
//! The layout is C2SP tlog-tiles with height 8 (as in `golang.org/x/mod/sumdb/tlog`, Trillian
//! Tessera and Sunlight): tree level `h` holds the hashes of the perfect subtrees of `2^h`
//! leaves, node `k` of it covering leaves `[k·2^h, (k+1)·2^h)` (level 0 holds the leaf hashes).
//! Tile `(L, N)` lists the nodes `256·N ..` of level `8·L`, at most 256 of them: it is *full*
//! with 256, *partial* (only ever the last tile of its level) with fewer. The nodes of the
//! levels in between (`8·L + r`, `0 < r < 8`) are not stored: node `k` of level `8·L + r` is the
//! perfect-tree hash of the `2^r` level-`8·L` nodes `k·2^r ..` of one tile. A full tile at level
//! `L` hashes (8 levels up) to one node of tile level `L + 1`.
//!
//! Stored tiles are only ever appended to (a partial tile is replaced by a longer one of the
//! same prefix), because a perfect subtree's hash never changes once the log has grown past it.
//!
//! Everything here is pure: [`TiledTree`] folds leaves and reports the tiles they changed (what
//! the integrator writes), and is rebuilt from the right-edge tiles alone ([`TiledTree::resume`]);
//! [`inclusion_tiles`] / [`consistency_tiles`] say which tiles a proof needs, and
//! [`inclusion_proof_from_tiles`] / [`consistency_proof_from_tiles`] assemble it from them (plus
//! the leaf hashes past the part of the tree the tiles cover).

use std::collections::{BTreeSet, HashMap};

use crate::merkle::{self, node_hash, Hash, EMPTY_ROOT};
use crate::AuditError;

/// Tree levels per tile.
pub const TILE_HEIGHT: u32 = 8;
/// Hashes in a full tile.
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;

/// A tile's place: tile level `level` (tree level `8·level`), tile index `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileKey {
    pub level: u8,
    pub index: u64,
}

/// A tile and its hashes (1 to 256 of them; 256 for a full tile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tile {
    pub key: TileKey,
    pub hashes: Vec<Hash>,
}

/// Complete nodes at tree level `h` in a tree of `size` leaves.
fn nodes_at(size: u64, h: u32) -> u64 {
    size.checked_shr(h).unwrap_or(0)
}

/// How many hashes tile `key` holds in a tree of `size` leaves: 256 once full, 0 before it
/// begins.
pub fn tile_width(key: TileKey, size: u64) -> u64 {
    let nodes = nodes_at(size, u32::from(key.level) * TILE_HEIGHT);
    if key.index > nodes >> TILE_HEIGHT {
        return 0;
    }
    (nodes - (key.index << TILE_HEIGHT)).min(TILE_WIDTH)
}

/// The partial tiles on the right edge of a tree of `size` leaves, with their widths (1..=255),
/// lowest level first: what [`TiledTree::resume`] needs.
pub fn edge_tiles(size: u64) -> Vec<(TileKey, u64)> {
    let mut out = Vec::new();
    let mut level = 0u8;
    loop {
        let nodes = nodes_at(size, u32::from(level) * TILE_HEIGHT);
        if nodes == 0 {
            return out;
        }
        let width = nodes & (TILE_WIDTH - 1);
        if width > 0 {
            out.push((TileKey { level, index: nodes >> TILE_HEIGHT }, width));
        }
        level += 1;
    }
}

/// The perfect-tree hash of a power-of-two run of hashes.
fn perfect_root(hashes: &[Hash]) -> Hash {
    merkle::root(hashes)
}

/// The RFC 6962 root of perfect subtrees listed left to right, largest first (a frontier).
fn fold_frontier(nodes: &[Hash]) -> Hash {
    let mut it = nodes.iter().rev();
    let Some(&last) = it.next() else { return EMPTY_ROOT };
    it.fold(last, |acc, left| node_hash(left, &acc))
}

/// A growing tree kept as its right edge of partial tiles (at most 255 hashes per tile level),
/// which reports the tiles each append changed, so they can be written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TiledTree {
    size: u64,
    /// The partial tile of each tile level (fewer than 256 hashes; empty when the level's last
    /// tile is full).
    edge: Vec<Vec<Hash>>,
    /// Tiles that became full since the last [`TiledTree::take_changed`].
    full: Vec<Tile>,
    /// Tile levels whose partial tile changed since then.
    dirty: BTreeSet<u8>,
}

impl TiledTree {
    pub fn new() -> Self {
        TiledTree::default()
    }

    /// The tree of `size` leaves rebuilt from its right-edge tiles ([`edge_tiles`]): `tile`
    /// returns the stored tile of a key (a stored tile may be longer than the edge needs; only
    /// its prefix is used). A missing or short tile is [`AuditError::MissingTile`]. Nothing is
    /// checked here: compare [`TiledTree::root`] with a signed root.
    pub fn resume(size: u64, mut tile: impl FnMut(TileKey) -> Option<Vec<Hash>>) -> Result<Self, AuditError> {
        let mut tree = TiledTree { size, ..TiledTree::default() };
        let mut levels = 0usize;
        while nodes_at(size, levels as u32 * TILE_HEIGHT) > 0 {
            levels += 1;
        }
        tree.edge = vec![Vec::new(); levels];
        for (key, width) in edge_tiles(size) {
            let mut hashes = tile(key).ok_or(AuditError::MissingTile { level: key.level, index: key.index })?;
            if (hashes.len() as u64) < width {
                return Err(AuditError::MissingTile { level: key.level, index: key.index });
            }
            hashes.truncate(width as usize);
            tree.edge[usize::from(key.level)] = hashes;
        }
        Ok(tree)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends one leaf hash: O(1) amortised (a full tile is hashed once, 255 hashes).
    pub fn push(&mut self, leaf: Hash) {
        self.size += 1;
        let mut hash = leaf;
        let mut level = 0usize;
        loop {
            if self.edge.len() == level {
                self.edge.push(Vec::with_capacity(TILE_WIDTH as usize));
            }
            let tile = &mut self.edge[level];
            tile.push(hash);
            self.dirty.insert(level as u8);
            if (tile.len() as u64) < TILE_WIDTH {
                return;
            }
            let hashes = std::mem::take(tile);
            let index = (nodes_at(self.size, level as u32 * TILE_HEIGHT) >> TILE_HEIGHT) - 1;
            hash = perfect_root(&hashes);
            self.full.push(Tile { key: TileKey { level: level as u8, index }, hashes });
            level += 1;
        }
    }

    /// The tiles changed since the last call: every tile that became full, then the current
    /// partial tile of every level that changed. Writing them all keeps the stored tiles
    /// covering this tree.
    pub fn take_changed(&mut self) -> Vec<Tile> {
        let mut out = std::mem::take(&mut self.full);
        for level in std::mem::take(&mut self.dirty) {
            let hashes = &self.edge[usize::from(level)];
            if !hashes.is_empty() {
                let index = nodes_at(self.size, u32::from(level) * TILE_HEIGHT) >> TILE_HEIGHT;
                out.push(Tile { key: TileKey { level, index }, hashes: hashes.clone() });
            }
        }
        out
    }

    /// The RFC 6962 root: the right edge split into perfect subtrees (by the bits of each
    /// partial tile's width), folded right to left. At most 8 × 255 hashes.
    pub fn root(&self) -> Hash {
        let mut nodes = Vec::new();
        for hashes in self.edge.iter().rev() {
            let mut at = 0usize;
            for bit in (0..TILE_HEIGHT).rev() {
                let run = 1usize << bit;
                if hashes.len() & run != 0 {
                    nodes.push(perfect_root(&hashes[at..at + run]));
                    at += run;
                }
            }
        }
        fold_frontier(&nodes)
    }
}

/// The tiles above full tile `key` in a tree of `size` leaves, each with the position in it of
/// the hash of the tile below: up to and including the first partial one (a right-edge tile,
/// which [`TiledTree::resume`] and a signed root check). Empty when `key` is not full.
pub fn ancestors(key: TileKey, size: u64) -> Vec<(TileKey, usize)> {
    let mut out = Vec::new();
    let mut k = key;
    while tile_width(k, size) == TILE_WIDTH && u32::from(k.level) < 64 / TILE_HEIGHT - 1 {
        let parent = TileKey { level: k.level + 1, index: k.index >> TILE_HEIGHT };
        out.push((parent, (k.index & (TILE_WIDTH - 1)) as usize));
        k = parent;
    }
    out
}

/// Checks that full tile `key` hashes to its entry in the tile above, and so on up to the right
/// edge ([`ancestors`]), with the tiles in `tiles`: together with a right edge that hashes to a
/// signed root, this binds the tile's hashes to that root.
pub fn check_ancestry(key: TileKey, size: u64, tiles: &HashMap<TileKey, Vec<Hash>>) -> Result<(), AuditError> {
    let missing = |k: TileKey| AuditError::MissingTile { level: k.level, index: k.index };
    let mut child = key;
    for (parent, at) in ancestors(key, size) {
        let below = tiles.get(&child).filter(|h| h.len() as u64 >= TILE_WIDTH).ok_or_else(|| missing(child))?;
        let above = tiles.get(&parent).and_then(|h| h.get(at)).ok_or_else(|| missing(parent))?;
        if perfect_root(&below[..TILE_WIDTH as usize]) != *above {
            return Err(AuditError::RootMismatch);
        }
        child = parent;
    }
    Ok(())
}

/// Where a proof's hashes come from: stored tiles for the first `covered` leaves of the tree,
/// and the leaf hashes after them (`tail` = leaves `covered ..`).
#[derive(Debug, Clone, Copy)]
pub struct TileSource<'a> {
    pub covered: u64,
    pub tiles: &'a HashMap<TileKey, Vec<Hash>>,
    pub tail: &'a [Hash],
}

/// How node hashes are looked up: the real source, or a recorder of the tiles it would read.
trait Lookup {
    /// The perfect-tree hash of hashes `at .. at + count` of tile `key`.
    fn tile(&mut self, key: TileKey, at: u64, count: u64) -> Result<Hash, AuditError>;
    /// The root of leaves `[a, b)`, all at or past `covered`.
    fn tail(&mut self, a: u64, b: u64) -> Result<Hash, AuditError>;
    fn covered(&self) -> u64;
}

impl Lookup for TileSource<'_> {
    fn tile(&mut self, key: TileKey, at: u64, count: u64) -> Result<Hash, AuditError> {
        let missing = || AuditError::MissingTile { level: key.level, index: key.index };
        let hashes = self.tiles.get(&key).ok_or_else(missing)?;
        let run = hashes.get(at as usize..(at + count) as usize).ok_or_else(missing)?;
        Ok(perfect_root(run))
    }

    fn tail(&mut self, a: u64, b: u64) -> Result<Hash, AuditError> {
        let (from, to) = ((a - self.covered) as usize, (b - self.covered) as usize);
        let leaves = self.tail.get(from..to).ok_or(AuditError::SizeOrder { smaller: b, larger: self.covered + self.tail.len() as u64 })?;
        Ok(merkle::root(leaves))
    }

    fn covered(&self) -> u64 {
        self.covered
    }
}

/// Records the tiles a proof reads.
struct Recorder {
    covered: u64,
    keys: BTreeSet<TileKey>,
}

impl Lookup for Recorder {
    fn tile(&mut self, key: TileKey, _: u64, _: u64) -> Result<Hash, AuditError> {
        self.keys.insert(key);
        Ok(EMPTY_ROOT)
    }

    fn tail(&mut self, _: u64, _: u64) -> Result<Hash, AuditError> {
        Ok(EMPTY_ROOT)
    }

    fn covered(&self) -> u64 {
        self.covered
    }
}

/// Node `k` of tree level `h`: from its tile when the tiles cover it, from the tail when it lies
/// past them, else (it straddles `covered`) from its two children.
fn node(src: &mut impl Lookup, h: u32, k: u64) -> Result<Hash, AuditError> {
    let (a, b) = (k << h, (k + 1) << h);
    let covered = src.covered();
    if b <= covered {
        let (level, r) = (h / TILE_HEIGHT, h % TILE_HEIGHT);
        let first = k << r;
        let key = TileKey { level: level as u8, index: first >> TILE_HEIGHT };
        src.tile(key, first & (TILE_WIDTH - 1), 1 << r)
    } else if a >= covered {
        src.tail(a, b)
    } else {
        // h > 0 here: a leaf is either covered or not.
        Ok(node_hash(&node(src, h - 1, 2 * k)?, &node(src, h - 1, 2 * k + 1)?))
    }
}

/// The hash of valid subtree `[a, b)`: its perfect parts, largest first, folded right to left.
fn subtree(src: &mut impl Lookup, mut a: u64, b: u64) -> Result<Hash, AuditError> {
    let mut parts = Vec::new();
    while a < b {
        // The largest perfect subtree starting at a (aligned) that fits before b.
        let fit = 63 - (b - a).leading_zeros();
        let h = if a == 0 { fit } else { fit.min(a.trailing_zeros()) };
        parts.push(node(src, h, a >> h)?);
        a += 1 << h;
    }
    Ok(fold_frontier(&parts))
}

fn assemble(src: &mut impl Lookup, ranges: Vec<(u64, u64)>) -> Result<Vec<Hash>, AuditError> {
    ranges.into_iter().map(|(a, b)| subtree(src, a, b)).collect()
}

fn recorded(covered: u64, ranges: Vec<(u64, u64)>) -> Result<Vec<TileKey>, AuditError> {
    let mut rec = Recorder { covered, keys: BTreeSet::new() };
    assemble(&mut rec, ranges)?;
    Ok(rec.keys.into_iter().collect())
}

/// The tiles the inclusion proof of leaf `index` in the tree of `size` leaves reads when tiles
/// cover the first `covered` leaves (at most two per tile level, plus the edge).
pub fn inclusion_tiles(index: u64, size: u64, covered: u64) -> Result<Vec<TileKey>, AuditError> {
    recorded(covered.min(size), merkle::inclusion_proof_ranges(index, size)?)
}

/// The tiles the consistency proof from `m` to `n` leaves reads when tiles cover the first
/// `covered` leaves.
pub fn consistency_tiles(m: u64, n: u64, covered: u64) -> Result<Vec<TileKey>, AuditError> {
    recorded(covered.min(n), merkle::consistency_proof_ranges(m, n)?)
}

/// The inclusion proof of leaf `index` in the tree of `size` leaves, from tiles (the ones
/// [`inclusion_tiles`] names) and the leaves after `src.covered` up to `size`. Equal to
/// [`merkle::inclusion_proof`] over all leaves when the tiles are the tree's.
pub fn inclusion_proof_from_tiles(index: u64, size: u64, src: &TileSource<'_>) -> Result<Vec<Hash>, AuditError> {
    let mut src = TileSource { covered: src.covered.min(size), ..*src };
    assemble(&mut src, merkle::inclusion_proof_ranges(index, size)?)
}

/// The consistency proof from `m` to `n` leaves, from tiles and the leaves after `src.covered`
/// up to `n`. Equal to [`merkle::consistency_proof`] over all leaves when the tiles are the
/// tree's.
pub fn consistency_proof_from_tiles(m: u64, n: u64, src: &TileSource<'_>) -> Result<Vec<Hash>, AuditError> {
    let mut src = TileSource { covered: src.covered.min(n), ..*src };
    assemble(&mut src, merkle::consistency_proof_ranges(m, n)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::merkle::{consistency_proof, inclusion_proof, leaf_hash, root};
    use proptest::prelude::*;

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
    }

    /// Every tile of a tree of these leaves, as a store would hold them after integrating them
    /// in the given chunks.
    fn store_of(leaves: &[Hash], chunk: usize) -> HashMap<TileKey, Vec<Hash>> {
        let mut tree = TiledTree::new();
        let mut stored = HashMap::new();
        for part in leaves.chunks(chunk.max(1)) {
            part.iter().for_each(|l| tree.push(*l));
            for t in tree.take_changed() {
                stored.insert(t.key, t.hashes);
            }
        }
        stored
    }

    #[test]
    fn layout() {
        assert_eq!(tile_width(TileKey { level: 0, index: 0 }, 0), 0);
        assert_eq!(tile_width(TileKey { level: 0, index: 0 }, 5), 5);
        assert_eq!(tile_width(TileKey { level: 0, index: 0 }, 300), 256);
        assert_eq!(tile_width(TileKey { level: 0, index: 1 }, 300), 44);
        assert_eq!(tile_width(TileKey { level: 0, index: 2 }, 300), 0);
        assert_eq!(tile_width(TileKey { level: 1, index: 0 }, 300), 1);
        assert_eq!(tile_width(TileKey { level: 1, index: 0 }, 1 << 16), 256);
        assert_eq!(tile_width(TileKey { level: 7, index: 0 }, u64::MAX), 255);
        assert_eq!(edge_tiles(0), vec![]);
        assert_eq!(edge_tiles(256), vec![(TileKey { level: 1, index: 0 }, 1)]);
        assert_eq!(
            edge_tiles(70_000),
            vec![(TileKey { level: 0, index: 273 }, 112), (TileKey { level: 1, index: 1 }, 17), (TileKey { level: 2, index: 0 }, 1)]
        );
        assert_eq!(edge_tiles(u64::MAX).len(), 8);
    }

    #[test]
    fn roots_and_tiles_at_every_size() {
        let all = leaves(70_000);
        let mut tree = TiledTree::new();
        let mut stored: HashMap<TileKey, Vec<Hash>> = HashMap::new();
        let mut frontier = crate::Frontier::new();
        assert_eq!(tree.root(), EMPTY_ROOT);
        for (i, l) in all.iter().enumerate() {
            tree.push(*l);
            frontier.push(*l);
            for t in tree.take_changed() {
                stored.insert(t.key, t.hashes);
            }
            let size = i as u64 + 1;
            if size < 600 || size.is_multiple_of(997) || size == 65_536 {
                assert_eq!(tree.root(), frontier.root(), "size {size}");
                // Resuming from the stored edge gives the same tree.
                let resumed = TiledTree::resume(size, |k| stored.get(&k).cloned()).unwrap();
                assert_eq!(resumed.root(), frontier.root(), "resumed at {size}");
                assert_eq!(resumed.edge, tree.edge);
            }
        }
        // Every stored tile holds the nodes it should, and has the width the layout says.
        for (key, hashes) in &stored {
            assert_eq!(hashes.len() as u64, tile_width(*key, 70_000), "{key:?}");
            let span = 1u64 << (u32::from(key.level) * TILE_HEIGHT);
            for (j, h) in hashes.iter().enumerate() {
                let first = (key.index * TILE_WIDTH + j as u64) * span;
                assert_eq!(*h, root(&all[first as usize..(first + span) as usize]));
            }
        }
        // 273 full and one partial at level 0, one full and one partial at level 1, one partial at 2.
        assert_eq!(stored.len(), 274 + 2 + 1);
    }

    #[test]
    fn resume_needs_the_edge() {
        let all = leaves(1000);
        let stored = store_of(&all, 7);
        assert_eq!(
            TiledTree::resume(1000, |k| if k.level == 0 { None } else { stored.get(&k).cloned() }),
            Err(AuditError::MissingTile { level: 0, index: 3 })
        );
        // A tile shorter than the size needs is as good as missing.
        assert!(TiledTree::resume(1000, |k| stored.get(&k).map(|h| h[..h.len() - 1].to_vec())).is_err());
        // A longer (later) tile is cut to the size: the tree at 900 from tiles written at 1000.
        let at_900 = TiledTree::resume(900, |k| stored.get(&k).cloned()).unwrap();
        assert_eq!(at_900.root(), root(&all[..900]));
        // Resuming and pushing the rest writes the same tiles as never stopping.
        let mut resumed = at_900;
        all[900..].iter().for_each(|l| resumed.push(*l));
        for t in resumed.take_changed() {
            assert_eq!(stored.get(&t.key), Some(&t.hashes), "{:?}", t.key);
        }
    }

    #[test]
    fn an_edited_tile_changes_the_root() {
        let all = leaves(5000);
        let mut stored = store_of(&all, 100);
        let edge = TileKey { level: 0, index: 19 };
        stored.get_mut(&edge).unwrap()[3][0] ^= 1;
        let resumed = TiledTree::resume(5000, |k| stored.get(&k).cloned()).unwrap();
        assert_ne!(resumed.root(), root(&all));
    }

    #[test]
    fn ancestry_binds_a_full_tile_to_the_edge() {
        let all = leaves(70_000);
        let mut stored = store_of(&all, 4096);
        let key = TileKey { level: 0, index: 3 };
        assert_eq!(
            ancestors(key, 70_000),
            vec![(TileKey { level: 1, index: 0 }, 3), (TileKey { level: 2, index: 0 }, 0)]
        );
        assert_eq!(ancestors(TileKey { level: 0, index: 273 }, 70_000), vec![], "the partial edge tile");
        assert_eq!(ancestors(TileKey { level: 0, index: 260 }, 70_000), vec![(TileKey { level: 1, index: 1 }, 4)]);
        check_ancestry(key, 70_000, &stored).unwrap();
        stored.get_mut(&key).unwrap()[9][3] ^= 1;
        assert_eq!(check_ancestry(key, 70_000, &stored), Err(AuditError::RootMismatch));
        stored.remove(&TileKey { level: 1, index: 0 });
        assert!(matches!(check_ancestry(key, 70_000, &stored), Err(AuditError::MissingTile { level: 1, .. })));
    }

    #[test]
    fn tiles_a_proof_reads() {
        // At 1M leaves with tiles covering it all: at most a few tiles per level, none of the
        // tail.
        let keys = consistency_tiles(123_457, 1_000_000, 1_000_000).unwrap();
        assert!(keys.len() <= 8, "{keys:?}");
        let keys = inclusion_tiles(777_777, 1_000_000, 1_000_000).unwrap();
        assert!(keys.len() <= 6, "{keys:?}");
        assert!(keys.iter().all(|k| k.level <= 2));
        // Nothing is covered: nothing to read but leaves.
        assert_eq!(inclusion_tiles(5, 1000, 0).unwrap(), vec![]);
        assert!(inclusion_tiles(1000, 1000, 1000).is_err());
    }

    #[test]
    fn a_missing_tile_is_an_error() {
        let all = leaves(3000);
        let mut stored = store_of(&all, 3000);
        stored.remove(&TileKey { level: 0, index: 0 });
        let src = TileSource { covered: 3000, tiles: &stored, tail: &[] };
        assert_eq!(inclusion_proof_from_tiles(1, 3000, &src), Err(AuditError::MissingTile { level: 0, index: 0 }));
        // The tail must reach the size.
        let src = TileSource { covered: 2000, tiles: &stored, tail: &all[2000..2500] };
        assert!(inclusion_proof_from_tiles(2999, 3000, &src).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Proofs assembled from tiles (written in random chunks, covering a random prefix, the
        /// rest from leaves) equal the proofs computed from all leaves, for random sizes.
        #[test]
        fn proofs_from_tiles_equal_proofs_from_leaves(
            size in 1u64..140_000,
            covered_frac in 0.0f64..=1.0,
            picks in proptest::collection::vec(0.0f64..1.0, 6),
            chunk in 1usize..5000,
        ) {
            let all = leaves(size);
            let covered = ((size as f64 * covered_frac) as u64).min(size);
            let stored = store_of(&all[..covered as usize], chunk);
            let src = TileSource { covered, tiles: &stored, tail: &all[covered as usize..] };
            for p in &picks {
                let index = ((size as f64 * p) as u64).min(size - 1);
                let want = inclusion_proof(&all, index).unwrap();
                prop_assert_eq!(&inclusion_proof_from_tiles(index, size, &src).unwrap(), &want, "inclusion {} in {}", index, size);
                // Only tiles the stored set holds are named.
                for k in inclusion_tiles(index, size, covered).unwrap() {
                    prop_assert!(stored.contains_key(&k));
                }
                let m = ((size as f64 * p) as u64).max(1);
                let want = consistency_proof(&all, m).unwrap();
                prop_assert_eq!(&consistency_proof_from_tiles(m, size, &src).unwrap(), &want, "consistency {} -> {}", m, size);
                // And for a smaller tree than the tiles were written for.
                let n = m + ((size - m) as f64 * p) as u64;
                let want = consistency_proof(&all[..n as usize], m).unwrap();
                let small = TileSource { covered, tiles: &stored, tail: &all[covered.min(n) as usize..n as usize] };
                prop_assert_eq!(&consistency_proof_from_tiles(m, n, &small).unwrap(), &want, "consistency {} -> {}", m, n);
            }
        }
    }
}
