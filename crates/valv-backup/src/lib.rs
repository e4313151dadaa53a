//! The inner format of a Valv backup — what the age encryption wraps — and its signed manifest.
//!
//! ```text
//! "valv-backup/1\n"
//! frame*             kind (1 byte) || length (4 bytes, big-endian) || payload
//! manifest frame     kind 0xFF: the signed manifest (a C2SP note), always last
//! ```
//!
//! Payloads are built from [`fields`] (varints and length-prefixed bytes); what each kind holds
//! is the store's business (`valv_store::dump`). The manifest carries the SHA-256 of every byte
//! before it, the counts per table and resource type, the audit tree's size and root, the latest
//! checkpoint, the KEK versions and the erasure ledger's head, signed by the log's checkpoint
//! key. Pure: reads and writes only the `Read`/`Write` it is given, never the clock.

pub mod fields;
pub mod frame;
pub mod manifest;

pub use frame::{FrameReader, FrameWriter};
pub use manifest::Manifest;

/// What can go wrong reading or writing a backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the backup is malformed: {0}")]
    Malformed(String),
    #[error("the backup's manifest: {0}")]
    Manifest(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl BackupError {
    pub(crate) fn malformed(why: impl Into<String>) -> Self {
        BackupError::Malformed(why.into())
    }
}
