//! The data directory: created on first start (configuration, key file, self-signed TLS
//! certificate, database, first admin API key) and opened into a running [`App`].

use crate::config::{self, Config};
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use valv_crypto::LocalKeyProvider;
use valv_server::audit::StoreAuditLog;
use valv_server::App;
use valv_store::postgres::PgStore;
use valv_store::sqlite::{Access, SqliteStore};
use valv_store::vault::{random_bytes, Vault};
use valv_store::Store;

pub struct Opened {
    pub app: Arc<App>,
    pub config: Config,
    pub data_dir: PathBuf,
    /// The key provider (the vault holds it too, as a `KeyProvider`).
    pub keys: valv_keys::Keys,
}

pub fn is_initialised(dir: &Path) -> bool {
    dir.join(config::FILE_NAME).exists()
}

use config::resolve;

/// Writes a file only the owner can read, refusing to overwrite one that exists.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Creates a directory only its owner can enter; one that exists already keeps its mode (it may
/// be shared, like /tmp, and is the operator's to secure).
pub fn create_private_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| format!("securing {}: {e}", dir.display()))
}

/// Creates the data directory as first start does. Returns the first admin API key, which is
/// shown once and stored only as a hash.
pub async fn init(dir: &Path) -> Result<String, String> {
    if is_initialised(dir) {
        return Err(format!("{} is already initialised", dir.display()));
    }
    create_private_dir(dir)?;
    let cfg = Config::load(dir)?;
    let key_file = resolve(dir, &cfg.keys.key_file);
    if cfg.keys.provider == "file" && !key_file.exists() {
        let provider = LocalKeyProvider::generate(random_bytes().map_err(|e| e.to_string())?);
        write_secret(&key_file, provider.to_file_text().as_bytes())?;
    }
    let cert = resolve(dir, &cfg.server.tls_cert);
    let key = resolve(dir, &cfg.server.tls_key);
    if !cert.exists() && !key.exists() {
        crate::certificate::generate(&cert, &key, valv_server::now_ms() / 1000, write_secret)?;
    }
    let opened = open(dir, None).await?;
    // The empty log is signed at once: from now on a log with entries and no checkpoint can only
    // be one whose checkpoints were deleted (the server refuses to start on it).
    valv_server::audit::integrator::Integrator::start(opened.app.vault.store().clone(), &opened.app.log_keys()).await?;
    let (api_key, record) = valv_server::people::auth::new_api_key(
        &opened.app.records,
        "admin",
        "admin",
        "",
        valv_server::now_ms(),
        random_bytes().map_err(|e| e.to_string())?,
        random_bytes().map_err(|e| e.to_string())?,
    )?;
    opened.app.vault.store().insert_api_key(&record).await.map_err(|e| e.to_string())?;
    // The configuration goes last: its presence marks a complete initialisation.
    fs::write(dir.join(config::FILE_NAME), header() + &cfg.to_toml()).map_err(|e| format!("writing configuration: {e}"))?;
    Ok(api_key)
}

fn header() -> String {
    "# Valv configuration. Secrets are referenced by path, never written here.\n\
     # Every value can be overridden by a VALV_* environment variable (see docs/API.md).\n\n"
        .to_string()
}

/// Opens an initialised data directory into an [`App`] (storage, keys, audit log).
pub async fn open(dir: &Path, listen: Option<&str>) -> Result<Opened, String> {
    open_for(dir, listen, Access::Serve).await
}

/// [`open_for`] a data directory that must exist already (commands other than `serve` and `init`).
pub async fn open_existing(dir: &Path, access: Access) -> Result<Opened, String> {
    if !is_initialised(dir) {
        return Err(format!("{} is not initialised: run 'valv init' first", dir.display()));
    }
    open_for(dir, None, access).await
}

/// [`open`] for a given use of the database (see [`Access`]).
pub async fn open_for(dir: &Path, listen: Option<&str>, access: Access) -> Result<Opened, String> {
    let mut cfg = Config::load(dir)?;
    if let Some(addr) = listen {
        cfg.server.listen = addr.to_string();
    }
    let store = open_store(dir, &cfg, access).await?;
    // A token's first KEK version is made only for a database that has no wrapped key yet: an
    // empty token under an existing database is an error, never a fresh start.
    let fresh = store.key_census().await.map_err(|e| e.to_string())?.is_empty();
    let keys = valv_keys::Keys::open(&cfg.keys.provider, &resolve(dir, &cfg.keys.key_file), dir, fresh)?;
    let now = valv_server::now_ms();
    let vault = Vault::open(store, keys.provider(), now).await.map_err(|e| e.to_string())?;
    let audit_key = vault.named_key("audit", now).await.map_err(|e| e.to_string())?;
    let records = valv_crypto::RecordMac::new(vault.named_key("record-mac", now).await.map_err(|e| e.to_string())?);
    let log_keys = valv_server::audit::signing::LogKeys::load(&vault, now).await?;
    let blind = valv_crypto::BlindIndexKey::new(vault.named_key("blind-index", now).await.map_err(|e| e.to_string())?);
    let identity_key = vault.named_key("identity", now).await.map_err(|e| e.to_string())?;
    let identity_macs = valv_crypto::RecordMac::new(vault.named_key("record-mac", now).await.map_err(|e| e.to_string())?);
    let identity = valv_server::people::identity::Identity::new(vault.store().clone(), &identity_key, blind.clone(), identity_macs, cfg.auth.settings()?)?;
    let audit = Arc::new(StoreAuditLog::new(vault.store().clone(), audit_key, blind, cfg.storage.fail_audit_appends));
    let grants_key = vault.named_key("grants", now).await.map_err(|e| e.to_string())?;
    let access = valv_server::access::Access::new(cfg.policy.engine(dir)?, cfg.policy.settings(), vault.store().clone(), &grants_key);
    let app = App {
        vault,
        records,
        audit,
        metrics: Default::default(),
        base_url: cfg.fhir_base(),
        max_body_bytes: cfg.server.max_body_bytes,
        limits: valv_server::http::limits::Limits::new(cfg.limits.settings(cfg.server.max_body_bytes)?),
        capability: Default::default(),
        started: valv_fhir::date::format_instant(now),
        log_keys: std::sync::RwLock::new(Arc::new(log_keys)),
        identity,
        clock: valv_server::clock::from_env()?,
        cert_services: cfg.mtls.load(dir)?.1,
        oidc: valv_server::people::oidc::Oidc::new(cfg.oidc.settings(dir)?)?,
        access,
        auth_failure_log: Default::default(),
        refusal_log: valv_server::audit::compact::Compactor::new(valv_server::audit::compact::REFUSAL_WINDOW),
        update_create: cfg.fhir.update_create,
        exports: valv_server::fhir::Exports::new(dir.join("exports"), cfg.fhir.export_expiry_seconds),
        files: valv_server::fhir::binary::Files::new(
            cfg.files.store(dir)?,
            cfg.files.max_bytes,
            cfg.files.inline_max_bytes,
            cfg.files.scanner()?,
            cfg.files.serve_unscannable,
            cfg.files.max_uploads,
        ),
        blocked: Default::default(),
        deployment: deployment(&cfg),
        erasure: valv_server::erasure::ErasureSettings::new(
            cfg.retention.years,
            std::iter::once(dir.to_path_buf()).chain(cfg.backup.dir.as_ref().map(|d| dir.join(d)).or_else(|| crate::backup::last_dir(dir))).collect(),
        ),
    };
    // Care teams, consents and grants are read once here; committed writes keep them current.
    app.access.load(&app.vault, now).await?;
    Ok(Opened { app: Arc::new(app), config: cfg, data_dir: dir.to_path_buf(), keys })
}

/// What the compliance report reads of the configuration.
fn deployment(cfg: &Config) -> valv_oversight::compliance::Deployment {
    valv_oversight::compliance::Deployment {
        tls12_allowed: cfg.server.allow_tls12,
        session_idle_minutes: cfg.auth.session_idle_minutes,
        session_absolute_hours: cfg.auth.session_absolute_hours,
        lockout_threshold: cfg.auth.lockout_threshold,
        lockout_minutes: cfg.auth.lockout_minutes,
        mfa_for_all_roles: cfg.auth.mfa_for_all_roles,
        sso_providers: cfg.oidc.providers.len(),
        key_provider: cfg.keys.provider.split(':').next().unwrap_or_default().to_string(),
        detection: cfg.detect.enabled,
        siem: cfg.siem.address.is_some(),
        backup_schedule: cfg.backup.every_secs > 0,
        retention_years: cfg.retention.years,
    }
}

/// The store the configuration names: the embedded SQLite file, or PostgreSQL.
pub async fn open_store(dir: &Path, cfg: &Config, access: Access) -> Result<Arc<dyn Store>, String> {
    if cfg.store.backend == "postgres" {
        let store = PgStore::open(&cfg.store.postgres(dir)?).await.map_err(|e| e.to_string())?;
        return Ok(Arc::new(store));
    }
    let db = resolve(dir, &cfg.storage.sqlite);
    // SQLite gives its WAL and shared-memory files the database file's mode: create it 0600, and
    // the audit log's file beside it (an empty one where the log went missing is refused by the
    // store: it looks for the tables, not the file).
    for file in [db.clone(), valv_store::sqlite::audit_path(&db)] {
        if !file.exists() {
            write_secret(&file, b"")?;
        }
    }
    // Processes that write keep headroom for a full disk (valv_store::disk); a scan only reads.
    let reserve = (access == Access::Serve && cfg.storage.disk_reserve_mb > 0)
        .then(|| valv_store::disk::Reserve::beside(&db, cfg.storage.disk_reserve_mb << 20));
    Ok(Arc::new(SqliteStore::open_with_reserve(&db, access, reserve).map_err(|e| e.to_string())?))
}

/// A restore's loader into the store the configuration names (a new SQLite file, 0600; or an
/// empty PostgreSQL database).
pub async fn open_bulk_load(dir: &Path, cfg: &Config) -> Result<valv_store::dump::BulkLoad, String> {
    if cfg.store.backend == "postgres" {
        let load = valv_store::postgres::PgLoad::create(&cfg.store.postgres(dir)?).await.map_err(|e| e.to_string())?;
        return Ok(valv_store::dump::BulkLoad::Postgres(load));
    }
    let db = resolve(dir, &cfg.storage.sqlite);
    write_secret(&db, b"")?;
    write_secret(&valv_store::sqlite::audit_path(&db), b"")?;
    Ok(valv_store::dump::BulkLoad::Sqlite(valv_store::sqlite::FreshLoad::create(&db).map_err(|e| e.to_string())?))
}

/// The TLS certificate and key; Valv's own first-start certificate is renewed first when it ends
/// within 30 days (an operator's certificate is never touched).
pub fn tls_files(opened: &Opened) -> Result<(PathBuf, PathBuf), String> {
    let (cert, key) = (resolve(&opened.data_dir, &opened.config.server.tls_cert), resolve(&opened.data_dir, &opened.config.server.tls_key));
    if crate::certificate::renew_if_due(&cert, &key, valv_server::now_ms() / 1000, write_secret)? {
        tracing::info!("the self-signed TLS certificate was near its end and has been renewed");
    }
    Ok((cert, key))
}
