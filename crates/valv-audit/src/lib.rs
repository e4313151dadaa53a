//! Valv's verifiable audit log, as pure functions: no I/O, no clock, no randomness. Keys, leaves,
//! sizes and texts come in as arguments.
//!
//! - [`merkle`]: the RFC 6962 / RFC 9162 Merkle tree over SHA-256, inclusion and consistency
//!   proofs (generation and strict verification), and their subtree variants.
//! - [`note`]: C2SP signed-note v1 with Ed25519 keys: signing, parsing, verifier keys
//!   (`<name>+<key id>+<base64 key>`), verification.
//! - [`checkpoint`]: C2SP tlog-checkpoint v1 (origin, tree size, root hash, signed as a note by
//!   the key named like the origin) and C2SP tlog-proof v1 inclusion receipts.
//! - [`entry`]: canonical audit-entry bytes (RFC 8785 JSON Canonicalization Scheme) and the
//!   entry's leaf hash.
//! - [`record`]: the audit entry itself (IHE BALP fields) and its leaf.
//! - [`frontier`]: the right edge of a growing tree, for O(log n) appends and roots.
//! - [`ledger`]: the signed erasure ledger (patients whose data key was destroyed).
//! - [`tiles`]: the tree's interior hashes as C2SP tlog-tiles (height 8): the tiles a growing
//!   tree writes, resuming it from its right-edge tiles, and proofs assembled from stored tiles.
//!
//! The wire formats are summarised in the shared FORMATS.md; the specifications are the
//! authority.

pub mod checkpoint;
pub mod entry;
pub mod frontier;
mod error;
pub mod ledger;
pub mod merkle;
pub mod note;
pub mod record;
pub mod tiles;

pub use checkpoint::{
    build_receipt, open_checkpoint, sign_checkpoint, verify_receipt, Checkpoint, Receipt,
};
pub use entry::{canonical_json, entry_leaf_hash};
pub use frontier::Frontier;
pub use error::AuditError;
pub use merkle::{Hash, EMPTY_ROOT};
pub use note::{Note, NoteSignature, Signer, Verifier};
pub use tiles::{Tile, TileKey, TiledTree};
pub use record::{query_commitment, AuditEvent, Outcome, SaltedQuery};
