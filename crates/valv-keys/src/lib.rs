//! Key providers with their I/O, chosen by configuration: the local key file as a provider that
//! follows the file (so a server sees a version `valv keys rotate` added, and stops wrapping under
//! the old one, without a restart), a PKCS#11 token ([`pkcs11`]) or AWS KMS ([`awskms`]). The pure parts (the key
//! file's format, wrapping) are in `valv-crypto`; what the stored keys need is the caller's.
//!
//! Rotating and retiring change the file under an exclusive lock on a lock file beside it, write
//! it whole to a temporary file and rename it over the old one, so no process ever reads half a
//! key file and two rotations cannot both create "the next" version.

pub mod awskms;
pub mod pkcs11;

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use valv_crypto::{CryptoError, DataKey, KeyProvider, LocalKeyProvider, WrappedKey};

fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| format!("the operating system's random generator failed: {e}"))?;
    Ok(b)
}

/// The configured provider, with what only the CLI needs (rotation, retirement).
#[derive(Clone)]
pub enum Keys {
    File(Arc<FileKeys>),
    Token(Arc<pkcs11::TokenKeys>),
    Kms(Arc<awskms::KmsKeys>),
}

impl Keys {
    /// Opens `keys.provider`: `file` reads `key_file`; a `pkcs11:` URI logs in to the token, an
    /// `aws-kms:` URI reaches KMS, and with `create` (first start) either makes KEK version 1
    /// there if it holds none.
    pub fn open(provider: &str, key_file: &Path, dir: &Path, create: bool) -> Result<Self, String> {
        if provider == "file" {
            Ok(Keys::File(Arc::new(FileKeys::open(key_file)?)))
        } else if provider.starts_with("pkcs11:") {
            let uri = pkcs11::Pkcs11Uri::parse(provider, dir)?;
            Ok(Keys::Token(Arc::new(pkcs11::TokenKeys::open(uri, create)?)))
        } else if provider.starts_with("aws-kms:") {
            let region = std::env::var("AWS_REGION").or_else(|_| std::env::var("AWS_DEFAULT_REGION")).ok();
            let uri = awskms::KmsUri::parse(provider, dir, region)?;
            Ok(Keys::Kms(Arc::new(awskms::KmsKeys::open(uri, create)?)))
        } else {
            Err(format!("key provider '{provider}' is not available (file, a pkcs11: or an aws-kms: URI)"))
        }
    }

    pub fn provider(&self) -> Arc<dyn KeyProvider> {
        match self {
            Keys::File(k) => k.clone(),
            Keys::Token(k) => k.clone(),
            Keys::Kms(k) => k.clone(),
        }
    }

    pub fn rotate(&self) -> Result<u32, String> {
        match self {
            Keys::File(k) => k.rotate(),
            Keys::Token(k) => k.rotate(),
            Keys::Kms(k) => k.rotate(),
        }
    }

    pub fn retire(&self, version: u32) -> Result<(), String> {
        match self {
            Keys::File(k) => k.retire(version),
            Keys::Token(k) => k.retire(version),
            Keys::Kms(k) => k.retire(version),
        }
    }

    /// Where the KEKs are, for people.
    pub fn describe(&self) -> String {
        match self {
            Keys::File(k) => format!("key file {}", k.path().display()),
            Keys::Token(k) => k.describe(),
            Keys::Kms(k) => k.describe(),
        }
    }
}

/// The key file, re-read when it changes on disk.
pub struct FileKeys {
    path: PathBuf,
    state: RwLock<(LocalKeyProvider, Stamp)>,
}

/// What identifies one content of the file: a rename gives a new inode.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    mtime_ns: i128,
    len: u64,
}

fn stamp(path: &Path) -> Result<Stamp, String> {
    let m = fs::metadata(path).map_err(|e| format!("key file {}: {e}", path.display()))?;
    if m.permissions().mode() & 0o077 != 0 {
        return Err(format!("key file {} is open to group or others; run chmod 600 on it", path.display()));
    }
    Ok(Stamp { inode: m.ino(), mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()), len: m.len() })
}

/// Reads and parses the key file, refusing one that others can read (as ssh does for keys).
fn read(path: &Path) -> Result<(LocalKeyProvider, Stamp), String> {
    let before = stamp(path)?;
    let text = zeroize::Zeroizing::new(fs::read_to_string(path).map_err(|e| format!("key file {}: {e}", path.display()))?);
    let provider = LocalKeyProvider::parse(&text).map_err(|e| format!("key file {}: {e}", path.display()))?;
    Ok((provider, before))
}

impl FileKeys {
    pub fn open(path: &Path) -> Result<Self, String> {
        Ok(FileKeys { path: path.to_path_buf(), state: RwLock::new(read(path)?) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes in the file's current content if it changed since it was read. A file that cannot
    /// be read now leaves the versions in memory in use (and says so): the next call tries again.
    fn reread(&self) {
        let Ok(now) = stamp(&self.path) else {
            tracing::warn!(path = %self.path.display(), "the key file cannot be read; using the KEK versions read before");
            return;
        };
        if self.state.read().is_ok_and(|s| s.1 == now) {
            return;
        }
        match read(&self.path) {
            Ok(fresh) => {
                if let Ok(mut s) = self.state.write() {
                    if fresh.0.kek_id() == s.0.kek_id() {
                        *s = fresh;
                    } else {
                        tracing::error!(path = %self.path.display(), "the key file now holds another KEK id; keeping the one read at start");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "the key file changed but cannot be read; using the KEK versions read before"),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&LocalKeyProvider) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s.0),
            Err(poisoned) => f(&poisoned.into_inner().0),
        }
    }

    /// Changes the file under the lock: `change` gets the file's current content and returns
    /// what to say; the result is written atomically and taken in.
    fn change<T>(&self, change: impl FnOnce(&mut LocalKeyProvider) -> Result<T, String>) -> Result<T, String> {
        let lock_path = self.path.with_extension("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
        lock.lock().map_err(|e| format!("locking {}: {e}", lock_path.display()))?;
        let (mut provider, _) = read(&self.path)?;
        let said = change(&mut provider)?;
        write_atomically(&self.path, provider.to_file_text().as_bytes())?;
        let fresh = read(&self.path)?;
        if let Ok(mut s) = self.state.write() {
            *s = fresh;
        }
        drop(lock);
        Ok(said)
    }

    /// Adds a KEK version (fresh randomness) and makes it current; returns its number.
    pub fn rotate(&self) -> Result<u32, String> {
        let random = random_bytes()?;
        self.change(|p| Ok(p.rotate(random)))
    }

    /// Destroys a KEK version in the file (the caller has checked that no key needs it).
    pub fn retire(&self, version: u32) -> Result<(), String> {
        self.change(|p| p.retire(version).map_err(|e| e.to_string()))
    }
}

impl KeyProvider for FileKeys {
    fn name(&self) -> &str {
        "file"
    }

    fn kek_id(&self) -> String {
        self.with(|p| p.kek_id())
    }

    fn current_version(&self) -> u32 {
        self.with(|p| p.current_version())
    }

    fn versions(&self) -> Vec<u32> {
        self.with(|p| p.versions())
    }

    fn refresh(&self) {
        self.reread();
    }

    /// New data keys are rare (one per patient): each looks at the file first, so a server
    /// never wraps under a version a rotation has replaced.
    fn wrap(&self, key: &DataKey, context: &str, nonce: [u8; 12]) -> Result<WrappedKey, CryptoError> {
        self.reread();
        self.with(|p| p.wrap(key, context, nonce))
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, CryptoError> {
        match self.with(|p| p.unwrap(wrapped, context)) {
            Err(CryptoError::UnknownKek { .. }) => {
                self.reread();
                self.with(|p| p.unwrap(wrapped, context))
            }
            other => other,
        }
    }
}

/// Writes `bytes` to `path` (mode 0600) through a temporary file, fsynced, renamed over it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("replacing {}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("syncing {}: {e}", dir.display()))?;
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::*;

    /// A key file with one version in a fresh temporary folder.
    fn key_file() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("valv-keys-test-{}", u64::from_le_bytes(random_bytes().expect("random"))));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("kek.key");
        let p = LocalKeyProvider::generate(random_bytes().expect("random"));
        write_atomically(&path, p.to_file_text().as_bytes()).expect("write");
        path
    }

    #[test]
    fn a_rotation_by_another_process_is_followed_before_the_next_wrap() {
        let path = key_file();
        let server = FileKeys::open(&path).expect("open");
        let cli = FileKeys::open(&path).expect("open");
        let old = server.wrap(&DataKey::from_bytes([3; 32]), "patient:1", [1; 12]).expect("wrap");
        assert_eq!(cli.rotate().expect("rotate"), 2);
        // The server has not looked yet, but its next wrap does, and it unwraps both versions.
        let new = server.wrap(&DataKey::from_bytes([4; 32]), "patient:2", [2; 12]).expect("wrap");
        assert_eq!((old.kek_version, new.kek_version), (1, 2));
        assert_eq!(server.unwrap(&old, "patient:1").expect("v1").expose(), &[3; 32]);
        cli.retire(1).expect("retire");
        let fresh = FileKeys::open(&path).expect("reopen");
        assert!(fresh.unwrap(&old, "patient:1").is_err(), "version 1 is gone from the file");
        assert_eq!(fresh.unwrap(&new, "patient:2").expect("v2").expose(), &[4; 32]);
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        let _ = fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let path = key_file();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = FileKeys::open(&path).err().expect("refused");
        assert!(err.contains("chmod 600"), "{err}");
        let _ = fs::remove_dir_all(path.parent().expect("dir"));
    }
}
