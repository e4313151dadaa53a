//! The key providers a data directory can use — the local key file as a provider that follows the
//! file (so a server sees a version `valv keys rotate` added, and stops wrapping under the old one,
//! without a restart), or a PKCS#11 token ([`crate::pkcs11`]) — and the `valv keys` commands:
//! status, rotate, rewrap, retire.
//!
//! Rotating and retiring change the file under an exclusive lock on a lock file beside it, write
//! it whole to a temporary file and rename it over the old one, so no process ever reads half a
//! key file and two rotations cannot both create "the next" version.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use valv_crypto::{CryptoError, DataKey, KeyProvider, LocalKeyProvider, WrappedKey};
use valv_store::vault::random_bytes;
use valv_store::Store;

/// The configured provider, with what only the CLI needs (rotation, retirement).
#[derive(Clone)]
pub enum Keys {
    File(Arc<FileKeys>),
    Token(Arc<crate::pkcs11::TokenKeys>),
}

impl Keys {
    /// Opens `keys.provider`: `file` reads `key_file`; a `pkcs11:` URI logs in to the token and,
    /// with `create` (first start), makes KEK version 1 there if it holds none.
    pub fn open(provider: &str, key_file: &Path, dir: &Path, create: bool) -> Result<Self, String> {
        if provider == "file" {
            Ok(Keys::File(Arc::new(FileKeys::open(key_file)?)))
        } else if provider.starts_with("pkcs11:") {
            let uri = crate::pkcs11::Pkcs11Uri::parse(provider, dir)?;
            Ok(Keys::Token(Arc::new(crate::pkcs11::TokenKeys::open(uri, create)?)))
        } else {
            Err(format!("key provider '{provider}' is not available (file, or a pkcs11: URI)"))
        }
    }

    pub fn provider(&self) -> Arc<dyn KeyProvider> {
        match self {
            Keys::File(k) => k.clone(),
            Keys::Token(k) => k.clone(),
        }
    }

    pub fn rotate(&self) -> Result<u32, String> {
        match self {
            Keys::File(k) => k.rotate(),
            Keys::Token(k) => k.rotate(),
        }
    }

    pub fn retire(&self, version: u32) -> Result<(), String> {
        match self {
            Keys::File(k) => k.retire(version),
            Keys::Token(k) => k.retire(version),
        }
    }

    /// Where the KEKs are, for people.
    pub fn describe(&self) -> String {
        match self {
            Keys::File(k) => format!("key file {}", k.path().display()),
            Keys::Token(k) => k.describe(),
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
        let random = random_bytes().map_err(|e| e.to_string())?;
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

/// `valv keys status`: what the provider holds and what the stored keys need.
pub struct Status {
    pub provider: String,
    pub kek_id: String,
    /// Where the KEKs are (the key file, or the token).
    pub location: String,
    pub current_version: u32,
    /// Each version the provider holds: (version, data keys under it, oldest wrap).
    pub versions: Vec<(u32, u64, Option<i64>)>,
    /// Keys under a KEK this provider does not hold (another provider, KEK id or a retired
    /// version): (provider, KEK id, version, keys).
    pub unreadable: Vec<(String, String, u32, u64)>,
    pub to_rewrap: u64,
    pub blind_index_created: Option<i64>,
    pub signing_key_created: Option<i64>,
}

pub async fn status(keys: &Keys, store: &dyn Store) -> Result<Status, String> {
    let provider = keys.provider();
    provider.refresh();
    let census = store.key_census().await.map_err(|e| e.to_string())?;
    let (name, id, current, held) = (provider.name().to_string(), provider.kek_id(), provider.current_version(), provider.versions());
    // Keys wrapped before KEK ids were recorded (id '') are read as the key file's own.
    let ours = |c: &valv_store::KeyCensus| c.provider == name && (c.kek_id == id || (c.kek_id.is_empty() && name == "file"));
    let versions = held
        .iter()
        .map(|&v| {
            let under: Vec<_> = census.iter().filter(|c| ours(c) && c.kek_version == v).collect();
            (v, under.iter().map(|c| c.keys).sum(), under.iter().map(|c| c.oldest_wrap).min())
        })
        .collect();
    let unreadable = census
        .iter()
        .filter(|c| !(ours(c) && held.contains(&c.kek_version)))
        .map(|c| (c.provider.clone(), c.kek_id.clone(), c.kek_version, c.keys))
        .collect();
    Ok(Status {
        provider: name.clone(),
        kek_id: id,
        location: keys.describe(),
        current_version: current,
        versions,
        unreadable,
        to_rewrap: valv_store::rewrap::remaining(store, &*provider).await.map_err(|e| e.to_string())?,
        blind_index_created: store.key_created("blind-index").await.map_err(|e| e.to_string())?,
        signing_key_created: store.key_created("checkpoint-signing").await.map_err(|e| e.to_string())?,
    })
}

impl Status {
    pub fn to_json(&self, now: i64) -> serde_json::Value {
        let at = |t: Option<i64>| t.map(valv_fhir::date::format_instant);
        serde_json::json!({
            "provider": self.provider,
            "kek_id": self.kek_id,
            "location": self.location,
            "current_version": self.current_version,
            "versions": self.versions.iter().map(|(v, n, oldest)| serde_json::json!({
                "version": v, "current": *v == self.current_version, "data_keys": n, "oldest_wrap": at(*oldest),
            })).collect::<Vec<_>>(),
            "unreadable": self.unreadable.iter().map(|(p, id, v, n)| serde_json::json!({"provider": p, "kek_id": id, "version": v, "data_keys": n})).collect::<Vec<_>>(),
            "to_rewrap": self.to_rewrap,
            "blind_index_key": {"created": at(self.blind_index_created), "age_days": self.blind_index_created.map(|t| (now - t) / 86_400_000)},
            "checkpoint_signing_key": {"created": at(self.signing_key_created), "age_days": self.signing_key_created.map(|t| (now - t) / 86_400_000)},
        })
    }

    pub fn to_text(&self, now: i64) -> String {
        let at = |t: Option<i64>| t.map_or("-".to_string(), |t| format!("{} ({} days ago)", valv_fhir::date::format_instant(t), (now - t) / 86_400_000));
        let mut out = format!("provider {}, KEK {} ({}), current version {}\n", self.provider, self.kek_id, self.location, self.current_version);
        for (v, n, oldest) in &self.versions {
            let mark = if *v == self.current_version { " (current)" } else { "" };
            out.push_str(&format!("  version {v}{mark}: {n} data keys, oldest wrap {}\n", at(*oldest)));
        }
        for (p, id, v, n) in &self.unreadable {
            out.push_str(&format!("  NOT HELD: {n} data keys under {p}/{id} version {v}\n"));
        }
        out.push_str(&format!("data keys still to rewrap under version {}: {}\n", self.current_version, self.to_rewrap));
        out.push_str(&format!("blind-index key created {}\n", at(self.blind_index_created)));
        out.push_str(&format!("checkpoint signing key created {}", at(self.signing_key_created)));
        out
    }
}

/// Rewraps every key not under the current version, batch by batch, with progress on stderr.
pub async fn rewrap_until_done(keys: &dyn KeyProvider, store: &dyn Store) -> Result<u64, String> {
    const BATCH: usize = 2000;
    keys.refresh();
    let total = valv_store::rewrap::remaining(store, keys).await.map_err(|e| e.to_string())?;
    let (mut done, started) = (0u64, std::time::Instant::now());
    loop {
        let batch = valv_store::rewrap::rewrap_batch(store, keys, BATCH, valv_server::now_ms()).await.map_err(|e| e.to_string())?;
        done += batch.found as u64;
        if total > 0 {
            eprint!("\rrewrapping data keys: {done}/{total} ({:.0}/s)   ", done as f64 / started.elapsed().as_secs_f64().max(1e-9));
        }
        if batch.done(BATCH) {
            break;
        }
    }
    if total > 0 {
        eprintln!();
    }
    Ok(done)
}

/// The version `retire` may destroy: not the current one, and no stored key under it.
pub async fn check_retirable(keys: &Keys, store: &dyn Store, version: u32) -> Result<(), String> {
    let provider = keys.provider();
    provider.refresh();
    if !provider.versions().contains(&version) {
        return Err(format!("there is no KEK version {version} (versions: {:?})", provider.versions()));
    }
    if version == provider.current_version() {
        return Err(format!("version {version} is the current KEK version; run 'valv keys rotate' first"));
    }
    let s = status(keys, store).await?;
    let under = s.versions.iter().find(|(v, _, _)| *v == version).map_or(0, |(_, n, _)| *n);
    if under > 0 {
        return Err(format!("{under} data keys are still wrapped under version {version}; wait for the rewrap ('valv keys status'), or run 'valv keys rotate --wait'"));
    }
    Ok(())
}
