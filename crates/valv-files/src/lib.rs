//! Where sealed medical files live: behind one trait ([`ObjectStore`]), a local directory (the
//! default, [`LocalDir`]) and, later, S3-compatible object storage. Objects are opaque: named by
//! a random id the caller chooses, holding sealed bytes only (`valv_crypto::stream`), with no
//! patient data in their names or metadata. Writes are streamed in pieces and become visible
//! only when finished (written to a temporary name, synced, renamed); reads are by byte range, so
//! a Range request reads only the segments it covers.
//!
//! Which key seals a file is the caller's choice ([`sealed`] takes any data key). It must not be
//! the patient's data key itself: `valv keys rotate --patient` replaces that key and re-seals
//! the patient's resources, which would leave files sealed under the old one unreadable. The plan
//! for the `Binary` API: a random key per file, kept sealed under the patient's key in the store
//! (re-sealed by rotation like a resource body, destroyed with the patient's key by erasure).

pub mod clamd;
pub mod s3;
pub mod sealed;

use async_trait::async_trait;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("object name '{0}' is not an object id")]
    Name(String),
    #[error("object {0} does not exist")]
    Missing(String),
    #[error("object {0} exists already")]
    Exists(String),
    #[error("range {start}..{end} is outside object {name} of {size} bytes")]
    Range { name: String, start: u64, end: u64, size: u64 },
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    /// The object does not open: tampered, truncated, or another object's.
    #[error("sealed object: {0}")]
    Sealed(String),
}

/// A new object being written: pieces in order, then [`ObjectWriter::finish`]; dropped without
/// finishing, nothing is left visible.
#[async_trait]
pub trait ObjectWriter: Send {
    async fn write(&mut self, piece: &[u8]) -> Result<(), FilesError>;
    /// Makes the object durable and visible; returns its size.
    async fn finish(self: Box<Self>) -> Result<u64, FilesError>;
}

#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Starts a new object `name` (refused if it exists).
    async fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, FilesError>;
    /// The object's size, or `None` if there is none.
    async fn size(&self, name: &str) -> Result<Option<u64>, FilesError>;
    /// Bytes `[start, end)` of the object.
    async fn read_range(&self, name: &str, start: u64, end: u64) -> Result<Vec<u8>, FilesError>;
    /// Removes the object (absent is not an error).
    async fn delete(&self, name: &str) -> Result<(), FilesError>;
}

/// Object names: what `valv_store::vault::new_id` makes (UUIDs), nothing that could climb out of
/// the directory or carry other data.
pub fn check_name(name: &str) -> Result<(), FilesError> {
    let ok = (16..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FilesError::Name(name.chars().take(80).collect()))
    }
}

/// Objects as files under a directory: `<dir>/<first two characters>/<name>`, mode 0600 in 0700
/// folders; a write goes to `<name>.partial` and is renamed once synced.
pub struct LocalDir {
    dir: PathBuf,
}

impl LocalDir {
    pub fn new(dir: PathBuf) -> Self {
        LocalDir { dir }
    }

    fn path(&self, name: &str) -> Result<PathBuf, FilesError> {
        check_name(name)?;
        Ok(self.dir.join(&name[..2]).join(name))
    }
}

fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Bytes a local write gathers before handing them to the disk (one blocking-thread hop each).
const WRITE_BATCH: usize = 1 << 20;

struct LocalWriter {
    file: tokio::fs::File,
    partial: PathBuf,
    path: PathBuf,
    size: u64,
    held: Vec<u8>,
    finished: bool,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, piece: &[u8]) -> Result<(), FilesError> {
        self.held.extend_from_slice(piece);
        self.size += piece.len() as u64;
        if self.held.len() >= WRITE_BATCH {
            self.file.write_all(&self.held).await?;
            self.held.clear();
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<u64, FilesError> {
        let held = std::mem::take(&mut self.held);
        self.file.write_all(&held).await?;
        self.file.flush().await?;
        self.file.sync_all().await?;
        if tokio::fs::try_exists(&self.path).await? {
            return Err(FilesError::Exists(self.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()));
        }
        tokio::fs::rename(&self.partial, &self.path).await?;
        // The rename is durable once the folder is synced.
        if let Some(parent) = self.path.parent() {
            tokio::fs::File::open(parent).await?.sync_all().await?;
        }
        self.finished = true;
        Ok(self.size)
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[async_trait]
impl ObjectStore for LocalDir {
    async fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>, FilesError> {
        let path = self.path(name)?;
        if let Some(parent) = path.parent() {
            private_dir(parent)?;
        }
        if tokio::fs::try_exists(&path).await? {
            return Err(FilesError::Exists(name.to_string()));
        }
        let partial = path.with_extension("partial");
        let file = tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => FilesError::Exists(name.to_string()),
            _ => FilesError::Io(e),
        })?;
        Ok(Box::new(LocalWriter { file, partial, path, size: 0, held: Vec::with_capacity(WRITE_BATCH + 65_600), finished: false }))
    }

    async fn size(&self, name: &str) -> Result<Option<u64>, FilesError> {
        match tokio::fs::metadata(self.path(name)?).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// One blocking-thread hop per read (open, size, positioned read), not one per call.
    async fn read_range(&self, name: &str, start: u64, end: u64) -> Result<Vec<u8>, FilesError> {
        use std::os::unix::fs::FileExt;
        let path = self.path(name)?;
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FilesError::Missing(name)),
                Err(e) => return Err(e.into()),
            };
            let size = file.metadata()?.len();
            if start > end || end > size {
                return Err(FilesError::Range { name, start, end, size });
            }
            let mut buf = vec![0u8; usize::try_from(end - start).map_err(|_| FilesError::Range { name: name.clone(), start, end, size })?];
            file.read_exact_at(&mut buf, start)?;
            Ok(buf)
        })
        .await
        .map_err(|e| FilesError::Io(std::io::Error::other(format!("a file read was cancelled: {e}"))))?
    }

    async fn delete(&self, name: &str) -> Result<(), FilesError> {
        match tokio::fs::remove_file(self.path(name)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The behaviour every backend must have, run by each backend's tests.
pub mod testkit {
    use super::*;

    pub async fn behaves_as_an_object_store(store: &dyn ObjectStore) {
        let name = "0123456789abcdef-0123-4567-89ab-cdef01234567";
        assert_eq!(store.size(name).await.expect("size"), None);
        let mut w = store.create(name).await.expect("create");
        w.write(b"hello ").await.expect("write");
        // Not visible before it is finished.
        assert_eq!(store.size(name).await.expect("size"), None);
        w.write(b"world").await.expect("write");
        assert_eq!(w.finish().await.expect("finish"), 11);
        assert_eq!(store.size(name).await.expect("size"), Some(11));
        assert_eq!(store.read_range(name, 0, 11).await.expect("all"), b"hello world");
        assert_eq!(store.read_range(name, 6, 11).await.expect("tail"), b"world");
        assert_eq!(store.read_range(name, 3, 3).await.expect("empty"), b"");
        assert!(matches!(store.read_range(name, 5, 12).await, Err(FilesError::Range { .. })));
        assert!(matches!(store.create(name).await, Err(FilesError::Exists(_))));
        // A writer dropped unfinished leaves nothing.
        let other = "fedcba9876543210-0123-4567-89ab-cdef01234567";
        let mut w = store.create(other).await.expect("create");
        w.write(b"half").await.expect("write");
        drop(w);
        assert_eq!(store.size(other).await.expect("size"), None);
        assert!(matches!(store.read_range(other, 0, 1).await, Err(FilesError::Missing(_))));
        store.delete(name).await.expect("delete");
        store.delete(name).await.expect("deleting twice is fine");
        assert_eq!(store.size(name).await.expect("size"), None);
        for bad in ["../../etc/passwd", "a", "0123456789abcdef/../x", "Patient-Svensson-0123456789"] {
            assert!(matches!(store.create(bad).await, Err(FilesError::Name(_))), "{bad}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_directory_behaves_as_an_object_store() {
        let dir = std::env::temp_dir().join(format!("valv-files-{}", std::process::id()));
        let store = LocalDir::new(dir.clone());
        testkit::behaves_as_an_object_store(&store).await;
        use std::os::unix::fs::PermissionsExt;
        let name = "00aa11bb22cc33dd-0123-4567-89ab-cdef01234567";
        let mut w = store.create(name).await.expect("create");
        w.write(b"x").await.expect("write");
        w.finish().await.expect("finish");
        let mode = std::fs::metadata(dir.join("00").join(name)).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join("00")).expect("folder").permissions().mode() & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
