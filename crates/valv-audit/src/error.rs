//! The crate's one error type.

/// Everything that can go wrong in this crate: malformed input, a proof that does not verify, a
/// signature that does not check out. Verification failures are errors, never panics.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    // --- Merkle tree ---
    /// A hash was not 32 bytes long.
    #[error("hash must be 32 bytes, got {0}")]
    HashLength(usize),
    /// A leaf index at or past the end of the tree.
    #[error("index {index} out of range for tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    /// A proof was asked of, or about, a tree with no leaves.
    #[error("the empty tree has no leaves to prove")]
    EmptyTree,
    /// `[start, end)` is not a valid subtree (start > end, or start not a multiple of the smallest
    /// power of two >= end - start).
    #[error("[{start}, {end}) is not a valid subtree")]
    InvalidSubtree { start: u64, end: u64 },
    /// A smaller tree or subtree that ends past the larger tree.
    #[error("size {smaller} is larger than tree size {larger}")]
    SizeOrder { smaller: u64, larger: u64 },
    /// A proof with too many or too few hashes for its position.
    #[error("proof has {got} hashes, expected {want}")]
    ProofLength { got: usize, want: usize },
    /// The hashes recomputed from a proof do not match the expected root.
    #[error("root hash mismatch")]
    RootMismatch,
    /// A stored tile of interior hashes that a proof or a resumed tree needs is absent, or
    /// shorter than the tree it must cover.
    #[error("tile {index} of tile level {level} is missing or too short")]
    MissingTile { level: u8, index: u64 },

    // --- signed notes ---
    /// A note or signature line that breaks the C2SP signed-note syntax.
    #[error("malformed note: {0}")]
    MalformedNote(&'static str),
    /// A key name that is empty or contains a space, a plus or a control character.
    #[error("invalid key name")]
    InvalidKeyName,
    /// A verifier key string that is not `<name>+<8 hex key id>+<base64(0x01 || key)>`, or whose
    /// key id does not match its name and key.
    #[error("malformed verifier key: {0}")]
    MalformedVerifierKey(&'static str),
    /// A signature from a known key that does not verify.
    #[error("invalid signature by {0}")]
    BadSignature(String),
    /// The signing operation failed (not expected with Ed25519).
    #[error("signing failed")]
    SigningFailed,
    /// No signature on the note came from a key the verifier knows.
    #[error("no signature by a known key")]
    NoKnownSignature,

    // --- checkpoints and receipts ---
    /// A checkpoint body that breaks the C2SP tlog-checkpoint syntax.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    /// The checkpoint's origin differs from the key name that must sign it.
    #[error("checkpoint origin does not match the log's key name")]
    OriginMismatch,
    /// A receipt that breaks the C2SP tlog-proof syntax.
    #[error("malformed inclusion receipt: {0}")]
    MalformedReceipt(&'static str),

    // --- canonical JSON ---
    /// A JSON number Valv does not canonicalise: not an integer, or outside the range that
    /// ECMAScript represents exactly (|n| > 2^53 - 1).
    #[error("number {0} is not an exactly representable integer")]
    UnsupportedNumber(String),
    /// An audit entry could not be turned into JSON.
    #[error("audit entry: {0}")]
    Entry(String),
}
