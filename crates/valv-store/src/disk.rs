//! Headroom on the database's filesystem, so that a full disk is something the SQLite backend
//! gets out of by itself.
//!
//! In WAL mode SQLite needs free space to get out of a full disk: a checkpoint copies the WAL's
//! pages into the database file, which grows by the pages that are new, and only after that can
//! the WAL be truncated. When the WAL itself filled the disk (say the database file could not be
//! written for a while, so checkpoints failed and the WAL kept growing), no checkpoint can run,
//! every write fails, and a restart does not help.
//!
//! The [`Reserve`] is a preallocated file beside the database. When a write fails for lack of
//! space, the writer deletes it, which gives a checkpoint the room it needs; writes stay refused
//! (fail closed: no audit entry, no answer) until a checkpoint has truncated the WAL and the
//! reserve has been made again, so the freed space is spent on the checkpoint and nothing else.
//!
//! Free space is read with `statvfs` (through `rustix`, already in the dependency tree: `std` has
//! no safe call for it and this workspace forbids `unsafe`); the reserve is allocated with
//! `fallocate` so its blocks really exist (a sparse file would free nothing when deleted).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Room a running server needs beyond the reserve: the WAL between checkpoints (copied every
/// 0.25 s while writes come in, see `sqlite::CHECKPOINT_EVERY`), its shared-memory index and the
/// checkpoint's own growth. Start is refused below this, before SQLite maps anything.
pub const WORKING_BYTES: u64 = 8 << 20;

const MIB: u64 = 1 << 20;

/// A file of `bytes` preallocated bytes beside the database, deleted to make room for a checkpoint.
#[derive(Debug, Clone)]
pub struct Reserve {
    path: PathBuf,
    bytes: u64,
}

impl Reserve {
    /// The reserve of the database at `db`: `<db>.reserve`, on the same filesystem (space freed
    /// anywhere else would not help a checkpoint).
    pub fn beside(db: &Path, bytes: u64) -> Reserve {
        let mut name = db.as_os_str().to_owned();
        name.push(".reserve");
        Reserve { path: PathBuf::from(name), bytes }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size the reserve should have.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes of the reserve that are really allocated on disk now (0 when it is missing).
    pub fn held(&self) -> u64 {
        // Allocated blocks, not the length: a truncated or sparse file holds nothing back.
        std::fs::metadata(&self.path).map(|m| (m.blocks() * 512).min(m.len())).unwrap_or(0)
    }

    /// Whether the whole reserve is in place.
    pub fn is_held(&self) -> bool {
        self.held() >= self.bytes
    }

    /// Bytes an unprivileged writer can still use on the reserve's filesystem.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let st = rustix::fs::statvfs(dir)?;
        // f_bavail, not f_bfree: the blocks ext4 keeps for root are not ours to count on.
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Deletes the reserve; returns the bytes it held.
    pub fn release(&self) -> u64 {
        let held = self.held();
        match std::fs::remove_file(&self.path) {
            Ok(()) => held,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot delete the disk reserve");
                0
            }
        }
    }

    /// (Re)makes the reserve at its full size, durably. On failure nothing partial is left
    /// behind, so a failed attempt never eats the space it was meant to keep.
    pub fn make(&self) -> Result<(), String> {
        if self.is_held() {
            return Ok(());
        }
        let made = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .and_then(|f| allocate(&f, self.bytes).and_then(|()| f.sync_all()));
        match made {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                Err(format!("cannot make the disk reserve {} ({} MiB): {e}", self.path.display(), self.bytes / MIB))
            }
        }
    }
}

/// Allocates `len` bytes of real blocks: `fallocate` where the filesystem has it, else zeros.
fn allocate(f: &File, len: u64) -> std::io::Result<()> {
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => return Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; MIB as usize];
    let mut w = f;
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        w.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The one-line refusal when the disk is too full to start.
pub fn too_full(dir: &Path, free: u64, needed: u64, reserve: u64) -> String {
    format!(
        "disk full: {} MiB free on the filesystem of {}, at least {} MiB needed to start (a {} MiB reserve that lets Valv recover from a full disk, and {} MiB to work in); free some space or enlarge the volume",
        free / MIB,
        dir.display(),
        needed.div_ceil(MIB),
        reserve / MIB,
        WORKING_BYTES / MIB,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_holds_real_blocks_and_frees_them() {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("random");
        let db = std::env::temp_dir().join(format!("valv-reserve-test-{}.db", u64::from_le_bytes(r)));
        let reserve = Reserve::beside(&db, 2 * MIB);
        assert_eq!(reserve.held(), 0);
        reserve.make().expect("make");
        assert!(reserve.is_held(), "allocated, not sparse: {}", reserve.held());
        assert!(reserve.free_bytes().expect("statvfs") > 0);
        assert_eq!(reserve.release(), 2 * MIB);
        assert!(!reserve.path().exists());
        assert_eq!(reserve.release(), 0, "releasing twice frees nothing and fails nothing");
    }
}
