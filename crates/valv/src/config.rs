//! Configuration: `valv.toml` in the data directory, then `VALV_*` environment overrides.
//! Secrets are referenced by path (key file, TLS key), never written inline.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub keys: KeysConfig,
    pub storage: StorageConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub siem: SiemConfig,
    pub alert_webhook: AlertWebhookConfig,
    pub audit: AuditConfig,
    pub auth: AuthConfig,
    pub mtls: MtlsConfig,
    pub oidc: OidcConfig,
    pub policy: PolicyConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    pub backup: BackupConfig,
    pub fhir: FhirConfig,
    pub files: FilesConfig,
    /// The detection engine's rules and thresholds (docs/DETECTION.md).
    pub detect: valv_detect::Config,
}

/// Files: Binary content kept as sealed objects (`[files]`; docs/FILES.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// The folder objects are kept in, relative to the data directory.
    pub dir: PathBuf,
    /// The largest file accepted (bytes).
    pub max_bytes: u64,
    /// Files up to this size are also answered inline (base64 `data`) in a Binary's FHIR JSON.
    pub inline_max_bytes: u64,
    /// Uploads in progress at once (more are answered 503 with Retry-After).
    pub max_uploads: usize,
    /// `local` (the folder `dir`) or `s3` (an S3-compatible bucket; credentials from the
    /// environment only: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    pub backend: String,
    pub s3_bucket: String,
    pub s3_region: String,
    /// An endpoint other than AWS's (Garage, MinIO, a VPC endpoint): https unless on loopback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// A CA certificate (PEM) for the endpoint, relative to the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_ca_file: Option<PathBuf>,
    /// Prepended to every object name.
    pub s3_prefix: String,
    /// ClamAV's daemon on this machine (`unix:/run/clamav/clamd.ctl` or `127.0.0.1:3310`): new
    /// files are `pending`, and not served, until it has scanned them. Unset: no scanning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clamd: Option<String>,
    /// The largest file given to the scanner; larger ones are marked `unscannable`. Keep it at
    /// or below clamd's `StreamMaxLength` (at most 4 GiB).
    pub scan_max_bytes: u64,
    /// Serve files marked `unscannable` (beyond the scanner's limits). Off: they are refused.
    pub serve_unscannable: bool,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            dir: "files".into(),
            max_bytes: 8 << 30,
            inline_max_bytes: 1 << 20,
            max_uploads: 16,
            backend: "local".into(),
            s3_bucket: String::new(),
            s3_region: "us-east-1".into(),
            s3_endpoint: None,
            s3_ca_file: None,
            s3_prefix: String::new(),
            clamd: None,
            scan_max_bytes: 25 << 20,
            serve_unscannable: false,
        }
    }
}

impl FilesConfig {
    /// The malware scanner, if one is configured.
    pub fn scanner(&self) -> Result<Option<valv_server::fhir::scan::Scanner>, String> {
        match &self.clamd {
            None => Ok(None),
            Some(a) => Ok(Some(valv_server::fhir::scan::Scanner { clamd: valv_files::clamd::Clamd::parse(a)?, max_bytes: self.scan_max_bytes })),
        }
    }

    /// The object store this names.
    pub fn store(&self, data_dir: &Path) -> Result<std::sync::Arc<dyn valv_files::ObjectStore>, String> {
        match self.backend.as_str() {
            "local" => Ok(std::sync::Arc::new(valv_files::LocalDir::new(resolve(data_dir, &self.dir)))),
            "s3" => {
                let settings = valv_files::s3::S3Settings {
                    bucket: self.s3_bucket.clone(),
                    region: self.s3_region.clone(),
                    endpoint: self.s3_endpoint.clone(),
                    ca_file: self.s3_ca_file.as_ref().map(|f| resolve(data_dir, f)),
                    prefix: self.s3_prefix.clone(),
                };
                Ok(std::sync::Arc::new(valv_files::s3::S3::from_env(&settings)?))
            }
            other => Err(format!("[files] backend must be \"local\" or \"s3\", got \"{other}\"")),
        }
    }
}

/// Choices in the FHIR interactions (`[fhir]`; docs/API.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirConfig {
    /// Update-as-create: a PUT to an id that does not exist creates the resource with the
    /// client's id (R4 `updateCreate`; on, as in HAPI). Off: such a PUT is refused and every id
    /// is the server's.
    pub update_create: bool,
    /// How long a Bulk Data export's files are kept after the export finishes (then deleted).
    pub export_expiry_seconds: u64,
}

impl Default for FhirConfig {
    fn default() -> Self {
        FhirConfig { update_create: true, export_expiry_seconds: 3600 }
    }
}

/// Backups (`valv backup`, docs/OPERATIONS.md) and where the erasure ledger's copy goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// The folder backups are written to; every erasure also rewrites `erasure-ledger` there, so
    /// that a restore of an older backup re-applies it. Relative to the data directory. Unset:
    /// the folder the last backup was written to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// age X25519 recipients (`age1…`) every backup is encrypted to; their identities are kept
    /// away from this machine.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Whether a file KEK travels inside the (age-encrypted) backup, so that the backup alone
    /// restores after the machine is lost. Off: keep the key file elsewhere yourself.
    pub include_key_file: bool,
    /// Scheduled backups: `valv serve` writes one into `dir` this often (seconds; 0, the
    /// default: none — run `valv backup` from a timer instead).
    pub every_secs: u64,
    /// How many scheduled backups to keep in `dir`: after each one, the oldest beyond this
    /// number are removed (only files named as the schedule names them).
    pub keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig { dir: None, recipients: Vec::new(), include_key_file: true, every_secs: 0, keep: 7 }
    }
}

impl BackupConfig {
    /// Refuses a schedule that cannot run: no folder, no recipient, nothing kept.
    pub fn check(&self) -> Result<(), String> {
        if self.every_secs == 0 {
            return Ok(());
        }
        if self.dir.is_none() {
            return Err("[backup] every_secs needs [backup] dir, the folder scheduled backups go to".into());
        }
        if self.recipients.is_empty() {
            return Err("[backup] every_secs needs [backup] recipients (age1…), the keys backups are encrypted to".into());
        }
        if self.keep == 0 {
            return Err("[backup] keep must be at least 1".into());
        }
        Ok(())
    }
}

/// A retention duty (e.g. PdL 3 kap. 17 §: ten years after the last entry): a patient with
/// records changed within it is not erased unless the approver overrides it with a reason.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Years after a patient's newest change during which erasure is refused; 0: no duty (off).
    pub years: u32,
}

/// What one client can make the server hold, before any credential is checked: connections,
/// time, memory for request bodies, unauthenticated request rates. Each key has a
/// `VALV_LIMITS_<KEY>` override (e.g. `VALV_LIMITS_IDLE_TIMEOUT_SECS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections in all; new ones beyond it are closed at once.
    pub max_connections: u64,
    /// Open connections per source (IPv4 address or IPv6 /64).
    pub max_connections_per_address: u64,
    pub handshake_timeout_secs: u64,
    /// HTTP/1.1 request headers (and the next request on a kept-alive connection).
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout_secs: u64,
    /// A request body must be complete within this...
    pub body_timeout_secs: u64,
    /// ...and, after this grace, arrive at no less than `body_min_bytes_per_sec` on average.
    pub body_grace_secs: u64,
    pub body_min_bytes_per_sec: u64,
    /// Memory for request bodies in all (bytes read and their parsed JSON, estimated); a body
    /// that does not fit is answered 503 with Retry-After. At least `server.max_body_bytes`.
    pub body_memory_bytes: u64,
    /// Largest body of `/auth/*` and of `/admin/*` (FHIR bodies: `server.max_body_bytes`).
    pub auth_body_bytes: u64,
    pub admin_body_bytes: u64,
    /// Largest header block (HTTP/2 header list; twice this is HTTP/1.1's read buffer).
    pub max_header_bytes: u64,
    pub h2_max_concurrent_streams: u64,
    pub h2_keep_alive_secs: u64,
    /// Requests without a valid credential per source: a minute's worth and a burst.
    pub unauthenticated_per_minute: u64,
    pub unauthenticated_burst: u64,
    /// On SIGTERM, requests in flight get this long to finish (new connections are refused).
    pub shutdown_grace_secs: u64,
    /// New connections per source: a minute's worth and a burst (beyond: refused).
    pub new_connections_per_minute: u64,
    pub new_connections_burst: u64,
    /// A refused connection is held this long before it is reset, at most `max_tarpit` at once.
    pub tarpit_secs: u64,
    pub max_tarpit: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = valv_server::http::limits::Settings::default();
        LimitsConfig {
            max_connections: d.max_connections as u64,
            max_connections_per_address: d.max_connections_per_address as u64,
            handshake_timeout_secs: d.handshake_timeout.as_secs(),
            header_read_timeout_secs: d.header_read_timeout.as_secs(),
            idle_timeout_secs: d.idle_timeout.as_secs(),
            body_timeout_secs: d.body_timeout.as_secs(),
            body_grace_secs: d.body_grace.as_secs(),
            body_min_bytes_per_sec: d.body_min_bytes_per_sec,
            body_memory_bytes: d.body_memory_bytes as u64,
            auth_body_bytes: d.auth_body_bytes as u64,
            admin_body_bytes: d.admin_body_bytes as u64,
            max_header_bytes: d.max_header_bytes as u64,
            h2_max_concurrent_streams: u64::from(d.h2_max_concurrent_streams),
            h2_keep_alive_secs: d.h2_keep_alive_interval.as_secs(),
            unauthenticated_per_minute: u64::from(d.unauthenticated.per_minute),
            unauthenticated_burst: u64::from(d.unauthenticated.burst),
            shutdown_grace_secs: d.shutdown_grace.as_secs(),
            new_connections_per_minute: u64::from(d.new_connections.per_minute),
            new_connections_burst: u64::from(d.new_connections.burst),
            tarpit_secs: d.tarpit.as_secs(),
            max_tarpit: d.max_tarpit as u64,
        }
    }
}

impl LimitsConfig {
    fn fields(&mut self) -> [(&'static str, &mut u64); 21] {
        [
            ("max_connections", &mut self.max_connections),
            ("max_connections_per_address", &mut self.max_connections_per_address),
            ("handshake_timeout_secs", &mut self.handshake_timeout_secs),
            ("header_read_timeout_secs", &mut self.header_read_timeout_secs),
            ("idle_timeout_secs", &mut self.idle_timeout_secs),
            ("body_timeout_secs", &mut self.body_timeout_secs),
            ("body_grace_secs", &mut self.body_grace_secs),
            ("body_min_bytes_per_sec", &mut self.body_min_bytes_per_sec),
            ("body_memory_bytes", &mut self.body_memory_bytes),
            ("auth_body_bytes", &mut self.auth_body_bytes),
            ("admin_body_bytes", &mut self.admin_body_bytes),
            ("max_header_bytes", &mut self.max_header_bytes),
            ("h2_max_concurrent_streams", &mut self.h2_max_concurrent_streams),
            ("h2_keep_alive_secs", &mut self.h2_keep_alive_secs),
            ("unauthenticated_per_minute", &mut self.unauthenticated_per_minute),
            ("unauthenticated_burst", &mut self.unauthenticated_burst),
            ("shutdown_grace_secs", &mut self.shutdown_grace_secs),
            ("new_connections_per_minute", &mut self.new_connections_per_minute),
            ("new_connections_burst", &mut self.new_connections_burst),
            ("tarpit_secs", &mut self.tarpit_secs),
            ("max_tarpit", &mut self.max_tarpit),
        ]
    }

    /// `VALV_LIMITS_<KEY>` for each key.
    fn apply_env(&mut self, get: &impl Fn(&str) -> Option<String>) -> Result<(), String> {
        for (key, field) in self.fields() {
            let name = format!("VALV_LIMITS_{}", key.to_ascii_uppercase());
            if let Some(v) = get(&name) {
                *field = v.trim().parse().map_err(|_| format!("{name} must be a whole number, got '{v}'"))?;
            }
        }
        Ok(())
    }

    /// The server's limits; every value must be at least 1 (a zero would refuse everything or
    /// disable a bound silently).
    pub fn settings(&self, max_body_bytes: usize) -> Result<valv_server::http::limits::Settings, String> {
        use std::time::Duration;
        let mut copy = self.clone();
        for (key, v) in copy.fields() {
            if *v == 0 {
                return Err(format!("limits.{key} must be at least 1"));
            }
        }
        let size = |key: &str, v: u64| usize::try_from(v).map_err(|_| format!("limits.{key} is too large"));
        let small = |key: &str, v: u64| u32::try_from(v).map_err(|_| format!("limits.{key} is too large"));
        let body_memory_bytes = size("body_memory_bytes", self.body_memory_bytes)?;
        if body_memory_bytes < max_body_bytes {
            return Err(format!("limits.body_memory_bytes ({body_memory_bytes}) must be at least server.max_body_bytes ({max_body_bytes})"));
        }
        if self.max_header_bytes < 1024 {
            return Err("limits.max_header_bytes must be at least 1024".into());
        }
        Ok(valv_server::http::limits::Settings {
            max_connections: size("max_connections", self.max_connections)?,
            max_connections_per_address: size("max_connections_per_address", self.max_connections_per_address)?,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            body_timeout: Duration::from_secs(self.body_timeout_secs),
            body_grace: Duration::from_secs(self.body_grace_secs),
            body_min_bytes_per_sec: self.body_min_bytes_per_sec,
            body_memory_bytes,
            max_body_bytes,
            auth_body_bytes: size("auth_body_bytes", self.auth_body_bytes)?,
            admin_body_bytes: size("admin_body_bytes", self.admin_body_bytes)?,
            max_header_bytes: size("max_header_bytes", self.max_header_bytes)?,
            h2_max_concurrent_streams: small("h2_max_concurrent_streams", self.h2_max_concurrent_streams)?,
            h2_keep_alive_interval: Duration::from_secs(self.h2_keep_alive_secs),
            // An unanswered ping means a dead peer: half the interval, at least a second, to answer.
            h2_keep_alive_timeout: Duration::from_secs((self.h2_keep_alive_secs / 2).max(1)),
            unauthenticated: valv_identity::limits::Rate {
                per_minute: small("unauthenticated_per_minute", self.unauthenticated_per_minute)?,
                burst: small("unauthenticated_burst", self.unauthenticated_burst)?,
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            new_connections: valv_identity::limits::Rate {
                per_minute: small("new_connections_per_minute", self.new_connections_per_minute)?,
                burst: small("new_connections_burst", self.new_connections_burst)?,
            },
            tarpit: Duration::from_secs(self.tarpit_secs),
            max_tarpit: size("max_tarpit", self.max_tarpit)?,
        })
    }
}

/// Need-to-know access: where operators' Cedar policies live and the settings that change facts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// A directory of `*.cedar` files, relative to the data directory; unset: the defaults only.
    /// A policy whose `@id` names a default replaces it; others are added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Use only the directory's policies, none of the defaults.
    pub replace_defaults: bool,
    /// Break-glass may override a patient's block (PdL: emergencies only). Flagged in the audit
    /// entry and the review queue either way.
    pub break_glass_overrides_block: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { dir: None, replace_defaults: false, break_glass_overrides_block: true }
    }
}

impl PolicyConfig {
    /// The policy engine: defaults plus the configured directory, validated against the schema.
    pub fn engine(&self, data_dir: &Path) -> Result<valv_policy::Engine, String> {
        let files = match &self.dir {
            Some(dir) => policy_files(&resolve(data_dir, dir))?,
            None if self.replace_defaults => return Err("policy.replace_defaults needs policy.dir".into()),
            None => Vec::new(),
        };
        valv_policy::Engine::new(&files, self.replace_defaults).map_err(|e| e.to_string())
    }

    pub fn settings(&self) -> valv_policy::Settings {
        valv_policy::Settings { break_glass_overrides_block: self.break_glass_overrides_block }
    }
}

/// The `*.cedar` files of a directory, in name order (a missing directory is an error: the
/// operator meant policies to be there).
pub fn policy_files(dir: &Path) -> Result<Vec<valv_policy::PolicyFile>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("policy directory {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cedar")).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok(valv_policy::PolicyFile { name, text })
        })
        .collect()
}

/// Single sign-on: OpenID Connect providers whose tokens Valv accepts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OidcConfig {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<OidcProvider>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcProvider {
    /// Used in URLs: `/auth/oidc/<name>/login`.
    pub name: String,
    /// `https://…`, exactly as in the provider's tokens.
    pub issuer: String,
    /// The audience API access tokens must carry (this server's resource identifier).
    pub audience: String,
    pub client_id: String,
    /// A file holding the client secret (mode 0600), relative to the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// This server's callback URL as registered at the provider; unset: no browser sign-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    #[serde(default = "oidc_algorithms")]
    pub algorithms: Vec<String>,
    /// Refuse tokens that show no second factor.
    #[serde(default = "yes")]
    pub require_mfa: bool,
    #[serde(default = "oidc_amr")]
    pub mfa_amr: Vec<String>,
    #[serde(default)]
    pub mfa_acr: Vec<String>,
    #[serde(default = "oidc_roles_claim")]
    pub roles_claim: String,
    #[serde(default = "oidc_units_claim")]
    pub units_claim: String,
    #[serde(default = "oidc_username_claim")]
    pub username_claim: String,
    /// CA certificates (PEM) for the provider's HTTPS; default: the system's bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn oidc_algorithms() -> Vec<String> {
    ["RS256", "PS256", "ES256", "EdDSA"].map(String::from).to_vec()
}
fn yes() -> bool {
    true
}
fn oidc_amr() -> Vec<String> {
    ["mfa", "otp", "hwk", "swk", "sc", "fpt", "face", "iris", "retina"].map(String::from).to_vec()
}
fn oidc_roles_claim() -> String {
    "roles".into()
}
fn oidc_units_claim() -> String {
    "units".into()
}
fn oidc_username_claim() -> String {
    "preferred_username".into()
}

const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl OidcConfig {
    pub fn settings(&self, data_dir: &Path) -> Result<Vec<valv_server::people::oidc::ProviderSettings>, String> {
        let mut out = Vec::new();
        for p in &self.providers {
            let client_secret = match &p.client_secret_file {
                Some(f) => {
                    let path = resolve(data_dir, f);
                    let meta = std::fs::metadata(&path).map_err(|e| format!("[oidc] {}: client secret {}: {e}", p.name, path.display()))?;
                    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
                        return Err(format!("[oidc] {}: client secret {} is open to group or others; chmod 600 it", p.name, path.display()));
                    }
                    Some(std::fs::read_to_string(&path).map_err(|e| format!("[oidc] {}: {e}", p.name))?.trim().to_string())
                }
                None => None,
            };
            let ca = p.ca_file.as_ref().map_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE), |f| resolve(data_dir, f));
            let ca_pem = std::fs::read(&ca).map_err(|e| format!("[oidc] {}: CA file {}: {e}", p.name, ca.display()))?;
            out.push(valv_server::people::oidc::ProviderSettings {
                name: p.name.clone(),
                issuer: p.issuer.clone(),
                audience: p.audience.clone(),
                client_id: p.client_id.clone(),
                client_secret,
                redirect_uri: p.redirect_uri.clone(),
                algorithms: p.algorithms.clone(),
                require_mfa: p.require_mfa,
                mfa_amr: p.mfa_amr.clone(),
                mfa_acr: p.mfa_acr.clone(),
                roles_claim: p.roles_claim.clone(),
                units_claim: p.units_claim.clone(),
                username_claim: p.username_claim.clone(),
                ca_pem,
            });
        }
        Ok(out)
    }
}

/// Mutual TLS for services: a client CA, and which certificates act as which service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtlsConfig {
    /// CA certificates (PEM) client certificates must chain to, relative to the data directory.
    /// Unset: no client certificates are asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<MtlsService>,
}

/// A certificate valid for `dns_name` (subjectAltName) acts as service `name` with `role`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsService {
    pub name: String,
    pub dns_name: String,
    #[serde(default = "service_role")]
    pub role: String,
    /// SMART `system/` scopes the service acts by (e.g. `system/Observation.rs`).
    #[serde(default)]
    pub scopes: String,
}

fn service_role() -> String {
    "service".into()
}

impl MtlsConfig {
    /// The client CA's PEM (None when mutual TLS is off) and the services, checked.
    pub fn load(&self, data_dir: &Path) -> Result<(Option<Vec<u8>>, Vec<valv_server::http::tls::ServiceCert>), String> {
        let Some(ca) = &self.client_ca else {
            if !self.services.is_empty() {
                return Err("[mtls] lists services but no client_ca to verify their certificates".into());
            }
            return Ok((None, Vec::new()));
        };
        let path = resolve(data_dir, ca);
        let pem = std::fs::read(&path).map_err(|e| format!("[mtls] client_ca {}: {e}", path.display()))?;
        let mut services = Vec::new();
        for s in &self.services {
            if !valv_server::people::auth::API_KEY_ROLES.contains(&s.role.as_str()) {
                return Err(format!("[mtls] service '{}': role '{}' is not a service role ({})", s.name, s.role, valv_server::people::auth::API_KEY_ROLES.join(", ")));
            }
            let scopes = valv_policy::Scopes::parse(&s.scopes).map_err(|e| format!("[mtls] service '{}': {e}", s.name))?;
            if s.role == "service" && scopes.is_empty() {
                return Err(format!("[mtls] service '{}': role service acts only as its scopes say; set scopes (e.g. \"system/Observation.rs\")", s.name));
            }
            if rustls_dns_ok(&s.dns_name) {
                let scopes = (!scopes.is_empty()).then_some(scopes);
                services.push(valv_server::http::tls::ServiceCert { name: s.name.clone(), dns_name: s.dns_name.clone(), role: s.role.clone(), scopes });
            } else {
                return Err(format!("[mtls] service '{}': '{}' is not a DNS name", s.name, s.dns_name));
            }
        }
        Ok((Some(pem), services))
    }
}

fn rustls_dns_ok(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Sign-in: password hashing, policy, MFA, sessions, lockout and rate limits (docs/SECURITY.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Argon2id memory (KiB), passes and lanes; OWASP's first recommendation by default.
    pub argon2_memory_kib: u32,
    pub argon2_iterations: u32,
    pub argon2_parallelism: u32,
    /// Least zxcvbn strength (0-4) of a new password.
    pub min_password_score: u8,
    /// Days before a password must be changed; 0 (the default, as NIST SP 800-63B advises): never.
    pub max_password_age_days: u32,
    /// Require a second factor of every role, not only of those that see patient data.
    pub mfa_for_all_roles: bool,
    /// The issuer authenticator apps show.
    pub totp_issuer: String,
    pub session_idle_minutes: u32,
    pub session_absolute_hours: u32,
    /// Consecutive failures that lock an account, and the first lockout (doubling each time).
    pub lockout_threshold: u32,
    pub lockout_minutes: u32,
    pub lockout_max_hours: u32,
    /// Requests a minute per client address to /auth/*, and the burst allowed at once.
    pub rate_per_minute: u32,
    pub rate_burst: u32,
    /// Password hashes at once (0, the default: half the cores) and how many more may wait.
    pub hash_concurrency: usize,
    pub hash_queue: usize,
    /// Every login answer takes at least this long (ms), so its timing tells nothing.
    pub login_floor_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        let d = valv_server::people::identity::Settings::default();
        AuthConfig {
            argon2_memory_kib: d.cost.memory_kib,
            argon2_iterations: d.cost.iterations,
            argon2_parallelism: d.cost.parallelism,
            min_password_score: d.min_score,
            max_password_age_days: d.max_password_age_days,
            mfa_for_all_roles: d.mfa_for_all,
            totp_issuer: d.issuer,
            session_idle_minutes: (d.session.idle_ms / 60_000) as u32,
            session_absolute_hours: (d.session.absolute_ms / 3_600_000) as u32,
            lockout_threshold: d.lockout.threshold,
            lockout_minutes: (d.lockout.base_ms / 60_000) as u32,
            lockout_max_hours: (d.lockout.max_ms / 3_600_000) as u32,
            rate_per_minute: d.rate.per_minute,
            rate_burst: d.rate.burst,
            hash_concurrency: d.hash_concurrency,
            hash_queue: d.hash_queue,
            login_floor_ms: d.login_floor_ms,
        }
    }
}

impl AuthConfig {
    pub fn settings(&self) -> Result<valv_server::people::identity::Settings, String> {
        let positive = |name: &str, v: u64| if v == 0 { Err(format!("auth.{name} must be at least 1")) } else { Ok(()) };
        positive("session_idle_minutes", self.session_idle_minutes.into())?;
        positive("session_absolute_hours", self.session_absolute_hours.into())?;
        positive("lockout_threshold", self.lockout_threshold.into())?;
        positive("lockout_minutes", self.lockout_minutes.into())?;
        positive("rate_per_minute", self.rate_per_minute.into())?;
        positive("rate_burst", self.rate_burst.into())?;
        if self.min_password_score > 4 {
            return Err(format!("auth.min_password_score is 0 to 4, got {}", self.min_password_score));
        }
        Ok(valv_server::people::identity::Settings {
            cost: valv_identity::password::Cost { memory_kib: self.argon2_memory_kib, iterations: self.argon2_iterations, parallelism: self.argon2_parallelism },
            min_score: self.min_password_score,
            session: valv_identity::limits::SessionTimes { idle_ms: i64::from(self.session_idle_minutes) * 60_000, absolute_ms: i64::from(self.session_absolute_hours) * 3_600_000 },
            lockout: valv_identity::limits::Lockout {
                threshold: self.lockout_threshold,
                base_ms: i64::from(self.lockout_minutes) * 60_000,
                max_ms: i64::from(self.lockout_max_hours.max(1)) * 3_600_000,
            },
            rate: valv_identity::limits::Rate { per_minute: self.rate_per_minute, burst: self.rate_burst },
            mfa_for_all: self.mfa_for_all_roles,
            issuer: self.totp_issuer.clone(),
            max_password_age_days: self.max_password_age_days,
            hash_concurrency: self.hash_concurrency,
            hash_queue: self.hash_queue,
            login_floor_ms: self.login_floor_ms,
            enrollment_ttl_ms: 24 * 3_600_000,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How often new audit entries are folded into the tree and a checkpoint signed.
    pub checkpoint_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { checkpoint_interval_ms: 1000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (HTTPS only).
    pub listen: String,
    /// Public base URL used in links and Location headers (`<public_url>/fhir`); when unset,
    /// `https://<listen>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// TLS certificate chain and private key (PEM), relative to the data directory.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Allow TLS 1.2 (AEAD suites only) besides TLS 1.3.
    pub allow_tls12: bool,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Key provider: `file` (the local key file below), or a PKCS#11 token by RFC 7512 URI,
    /// `pkcs11:token=…;object=…?module-path=…&pin-source=file:…|env:…` (the PIN by reference only),
    /// or AWS KMS, `aws-kms:alias/<name>?region=…[&endpoint=…]` (credentials from the environment).
    pub provider: String,
    /// The key-encryption key file (mode 0600), relative to the data directory.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// SQLite database file, relative to the data directory (it holds the audit log too).
    pub sqlite: PathBuf,
    /// Space kept free beside the database (a preallocated file, `<database>.reserve`), spent on
    /// checkpointing the WAL when the disk fills so that the server gets out of a full disk by
    /// itself; 0 turns it off. Start needs this plus 8 MiB free (docs/OPERATIONS.md).
    pub disk_reserve_mb: u64,
    /// Fault injection for testing the fail-closed path: every audit append fails, so every FHIR
    /// request is refused with 503. Never set it in production.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fail_audit_appends: bool,
}

/// Which database holds the data (`[store]`; docs/OPERATIONS.md "Deploying on PostgreSQL").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, the default: `storage.sqlite` in the data directory) or `postgres`.
    pub backend: String,
    /// PostgreSQL: a libpq connection string or URL, several hosts allowed
    /// (`host=db1,db2 port=5432 user=valv dbname=valv`). No password here: `password_file`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// PostgreSQL: a file holding the password (relative to the data directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: the CA certificate(s), PEM, the server's certificate must chain to; TLS is
    /// required when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PostgreSQL: plaintext to a host that is not this machine (an isolated network only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
    /// PostgreSQL: most connections this server holds.
    pub pool_size: usize,
    /// Set when the URL came from `VALV_DATABASE_URL` with a password in it: it is then never
    /// written to `valv.toml`.
    #[serde(skip)]
    url_is_secret: bool,
}

impl StoreConfig {
    /// The section as `valv.toml` holds it (a URL with a password in it left out).
    pub fn to_toml_value(&self) -> Result<toml::Value, String> {
        let mut written = self.clone();
        if written.url_is_secret {
            written.url.clear();
        }
        toml::Value::try_from(&written).map_err(|e| format!("the [store] section: {e}"))
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { backend: "sqlite".into(), url: String::new(), password_file: None, ca_file: None, allow_plaintext: false, pool_size: 16, url_is_secret: false }
    }
}

impl StoreConfig {
    /// What `valv.toml` itself may not hold: a password in the URL (the environment may).
    fn check_file(&self) -> Result<(), String> {
        if valv_store::postgres::has_password(&self.url) {
            return Err("store.url in valv.toml holds a password: put it in a file named by store.password_file".into());
        }
        Ok(())
    }

    /// The settings as they stand after the environment's overrides.
    fn check(&self) -> Result<(), String> {
        match self.backend.as_str() {
            "sqlite" => Ok(()),
            "postgres" if self.url.is_empty() => Err("store.backend is postgres but no store.url (or VALV_DATABASE_URL) is set".into()),
            "postgres" if !(1..=1024).contains(&self.pool_size) => Err(format!("store.pool_size must be 1 to 1024, got {}", self.pool_size)),
            "postgres" => Ok(()),
            other => Err(format!("store.backend must be sqlite or postgres, got '{other}'")),
        }
    }

    /// The PostgreSQL settings, the password read from its file.
    pub fn postgres(&self, data_dir: &Path) -> Result<valv_store::postgres::Settings, String> {
        let password = match &self.password_file {
            Some(p) => {
                let path = resolve(data_dir, p);
                Some(std::fs::read_to_string(&path).map_err(|e| format!("store.password_file {}: {e}", path.display()))?)
            }
            None => None,
        };
        Ok(valv_store::postgres::Settings {
            url: self.url.clone(),
            password,
            ca_file: self.ca_file.as_ref().map(|p| resolve(data_dir, p)),
            allow_plaintext: self.allow_plaintext,
            pool_size: self.pool_size,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` (an EnvFilter directive).
    pub level: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8443".into(),
            public_url: None,
            tls_cert: "tls/cert.pem".into(),
            tls_key: "tls/key.pem".into(),
            allow_tls12: false,
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig { provider: "file".into(), key_file: "keys/kek.key".into() }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { sqlite: "valv.db".into(), disk_reserve_mb: 32, fail_audit_appends: false }
    }
}

/// Live forwarding of audit entries to a SIEM collector as RFC 5424 syslog over TLS (RFC 5425).
/// Off unless `address` is set. The messages carry the full audit entries (patient ids, queries):
/// TLS only, and the collector's certificate must chain to `ca_file` and name `server_name`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiemConfig {
    /// The collector, `host:port` (e.g. rsyslog's imtcp with the gtls driver, usually port 6514).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The name the collector's certificate must carry; default: the host part of `address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// CA certificates (PEM) trusted for the collector, relative to the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl SiemConfig {
    /// The forwarder's settings, `None` when forwarding is off.
    pub fn settings(&self, data_dir: &Path) -> Result<Option<valv_server::audit::siem::Settings>, String> {
        let Some(address) = self.address.as_deref().filter(|a| !a.trim().is_empty()) else { return Ok(None) };
        let Some(ca_file) = &self.ca_file else {
            return Err("[siem] address is set but ca_file is not: the collector's certificate must be checked against a CA".into());
        };
        let server_name = match &self.server_name {
            Some(n) => n.clone(),
            None => {
                let host = address.rsplit_once(':').map(|(h, _)| h).ok_or_else(|| format!("[siem] address '{address}' must be host:port"))?;
                host.trim_start_matches('[').trim_end_matches(']').to_string()
            }
        };
        let ca_file = resolve(data_dir, ca_file);
        Ok(Some(valv_server::audit::siem::Settings {
            address: address.to_string(),
            server_name,
            ca_file,
            position_file: data_dir.join(valv_server::audit::siem::POSITION_FILE),
        }))
    }
}

/// The alert webhook: each new alert POSTed over HTTPS, signed as Standard Webhooks define
/// (docs/DETECTION.md). Off unless `url` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertWebhookConfig {
    /// The receiver, `https://…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// CA certificates (PEM) trusted for the receiver, relative to the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The environment variable that holds the signing secret, `whsec_<base64 of 24–64 bytes>`.
    pub secret_env: String,
    /// Also send each alert's explanation, which may name a patient and why the access looked
    /// wrong: only for a receiver trusted with that. Off: ids, rule, severity and evidence only.
    pub include_explanation: bool,
}

impl Default for AlertWebhookConfig {
    fn default() -> Self {
        AlertWebhookConfig { url: None, ca_file: None, secret_env: "VALV_ALERT_WEBHOOK_SECRET".into(), include_explanation: false }
    }
}

impl AlertWebhookConfig {
    /// The webhook's settings, `None` when it is off; `env` reads the environment.
    pub fn settings(&self, data_dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Option<valv_server::detect::webhook::Settings>, String> {
        let Some(url) = self.url.as_deref().filter(|u| !u.trim().is_empty()) else { return Ok(None) };
        let Some(ca_file) = &self.ca_file else {
            return Err("[alert_webhook] url is set but ca_file is not: the receiver's certificate must be checked against a CA".into());
        };
        let ca = resolve(data_dir, ca_file);
        let ca_pem = std::fs::read(&ca).map_err(|e| format!("[alert_webhook] CA file {}: {e}", ca.display()))?;
        let secret = zeroize::Zeroizing::new(env(&self.secret_env).ok_or_else(|| format!("[alert_webhook] the signing secret is read from the environment variable {}, which is not set", self.secret_env))?);
        let secret = valv_crypto::WebhookSecret::parse(&secret).map_err(|e| format!("[alert_webhook] {}: {e}", self.secret_env))?;
        Ok(Some(valv_server::detect::webhook::Settings { url: url.to_string(), ca_pem, secret, include_explanation: self.include_explanation }))
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into() }
    }
}

pub const FILE_NAME: &str = "valv.toml";

/// A path from the configuration: relative ones are relative to the data directory.
pub fn resolve(data_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { data_dir.join(p) }
}

impl Config {
    /// The FHIR base URL links and Location headers use.
    pub fn fhir_base(&self) -> String {
        let public = self.server.public_url.clone().unwrap_or_else(|| format!("https://{}", self.server.listen));
        format!("{}/fhir", public.trim_end_matches('/'))
    }

    /// Reads `valv.toml` from the data directory (defaults if absent), then applies overrides.
    pub fn load(data_dir: &Path) -> Result<Config, String> {
        let path = data_dir.join(FILE_NAME);
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        cfg.store.check_file()?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.store.check()?;
        if !(10..=3_600_000).contains(&cfg.audit.checkpoint_interval_ms) {
            return Err(format!("audit.checkpoint_interval_ms must be 10 to 3600000, got {}", cfg.audit.checkpoint_interval_ms));
        }
        cfg.backup.check()?;
        Ok(cfg)
    }

    /// `VALV_LISTEN`, `VALV_PUBLIC_URL`, `VALV_TLS_CERT`, `VALV_TLS_KEY`, `VALV_ALLOW_TLS12`,
    /// `VALV_MAX_BODY_BYTES`, `VALV_KEY_FILE`, `VALV_LOG`, `VALV_SIEM_ADDRESS`,
    /// `VALV_SIEM_SERVER_NAME`, `VALV_SIEM_CA_FILE`, `VALV_STORE`, `VALV_DATABASE_URL`,
    /// `VALV_DATABASE_PASSWORD_FILE`, `VALV_DATABASE_CA_FILE`, `VALV_LIMITS_<KEY>` for each `[limits]` key,
    /// `VALV_FHIR_UPDATE_CREATE`,
    /// and `VALV_FAULT_AUDIT_APPENDS` (tests only).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        if let Some(v) = get("VALV_LISTEN") {
            self.server.listen = v;
        }
        if let Some(v) = get("VALV_PUBLIC_URL") {
            self.server.public_url = Some(v);
        }
        if let Some(v) = get("VALV_TLS_CERT") {
            self.server.tls_cert = v.into();
        }
        if let Some(v) = get("VALV_TLS_KEY") {
            self.server.tls_key = v.into();
        }
        if let Some(v) = get("VALV_ALLOW_TLS12") {
            self.server.allow_tls12 = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = get("VALV_FHIR_UPDATE_CREATE") {
            self.fhir.update_create = match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => return Err(format!("VALV_FHIR_UPDATE_CREATE must be true or false, got '{v}'")),
            };
        }
        if let Some(v) = get("VALV_FHIR_EXPORT_EXPIRY_SECONDS") {
            self.fhir.export_expiry_seconds = v.parse().map_err(|_| format!("VALV_FHIR_EXPORT_EXPIRY_SECONDS must be a number of seconds, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_FILES_BACKEND") {
            self.files.backend = v;
        }
        if let Some(v) = get("VALV_FILES_S3_BUCKET") {
            self.files.s3_bucket = v;
        }
        if let Some(v) = get("VALV_FILES_S3_REGION") {
            self.files.s3_region = v;
        }
        if let Some(v) = get("VALV_FILES_S3_ENDPOINT") {
            self.files.s3_endpoint = Some(v);
        }
        if let Some(v) = get("VALV_FILES_CLAMD") {
            self.files.clamd = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("VALV_FILES_MAX_BYTES") {
            self.files.max_bytes = v.parse().map_err(|_| format!("VALV_FILES_MAX_BYTES must be a number of bytes, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_MAX_BODY_BYTES") {
            self.server.max_body_bytes = v.parse().map_err(|_| format!("VALV_MAX_BODY_BYTES must be a number of bytes, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_DISK_RESERVE_MB") {
            self.storage.disk_reserve_mb = v.parse().map_err(|_| format!("VALV_DISK_RESERVE_MB must be a number of MiB, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_FAULT_AUDIT_APPENDS") {
            self.storage.fail_audit_appends = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Some(v) = get("VALV_CHECKPOINT_INTERVAL_MS") {
            self.audit.checkpoint_interval_ms = v
                .parse()
                .ok()
                .filter(|ms| (10..=3_600_000).contains(ms))
                .ok_or_else(|| format!("VALV_CHECKPOINT_INTERVAL_MS must be 10 to 3600000 milliseconds, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_STORE") {
            self.store.backend = v;
        }
        if let Some(v) = get("VALV_DATABASE_URL") {
            self.store.url_is_secret = valv_store::postgres::has_password(&v);
            self.store.url = v;
        }
        if let Some(v) = get("VALV_DATABASE_PASSWORD_FILE") {
            self.store.password_file = Some(v.into());
        }
        if let Some(v) = get("VALV_DATABASE_CA_FILE") {
            self.store.ca_file = Some(v.into());
        }
        if let Some(v) = get("VALV_KEY_FILE") {
            self.keys.key_file = v.into();
        }
        if let Some(v) = get("VALV_BACKUP_DIR") {
            self.backup.dir = Some(v.into());
        }
        if let Some(v) = get("VALV_BACKUP_RECIPIENTS") {
            self.backup.recipients = v.split([',', ' ']).filter(|r| !r.is_empty()).map(str::to_string).collect();
        }
        if let Some(v) = get("VALV_BACKUP_EVERY_SECS") {
            self.backup.every_secs = v.parse().map_err(|_| format!("VALV_BACKUP_EVERY_SECS must be a number of seconds, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_BACKUP_KEEP") {
            self.backup.keep = v.parse().map_err(|_| format!("VALV_BACKUP_KEEP must be a number of backups, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_RETENTION_YEARS") {
            self.retention.years = v.parse().map_err(|_| format!("VALV_RETENTION_YEARS must be a number of years, got '{v}'"))?;
        }
        if let Some(v) = get("VALV_KEY_PROVIDER") {
            self.keys.provider = v;
        }
        if let Some(v) = get("VALV_LOG") {
            self.log.level = v;
        }
        if let Some(v) = get("VALV_SIEM_ADDRESS") {
            self.siem.address = Some(v);
        }
        if let Some(v) = get("VALV_SIEM_SERVER_NAME") {
            self.siem.server_name = Some(v);
        }
        if let Some(v) = get("VALV_SIEM_CA_FILE") {
            self.siem.ca_file = Some(v.into());
        }
        if let Some(v) = get("VALV_ALERT_WEBHOOK_URL") {
            self.alert_webhook.url = Some(v);
        }
        if let Some(v) = get("VALV_ALERT_WEBHOOK_CA_FILE") {
            self.alert_webhook.ca_file = Some(v.into());
        }
        self.limits.apply_env(&get)?;
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        let mut written = self.clone();
        if written.store.url_is_secret {
            written.store.url.clear();
        }
        toml::to_string_pretty(&written).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_round_trip() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "VALV_LISTEN" => Some("127.0.0.1:9999".into()),
            "VALV_ALLOW_TLS12" => Some("true".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.server.listen, "127.0.0.1:9999");
        assert!(c.server.allow_tls12);
        let back: Config = toml::from_str(&c.to_toml()).expect("round trip");
        assert_eq!(back.server.listen, "127.0.0.1:9999");
        assert!(c.apply_env(|k| (k == "VALV_MAX_BODY_BYTES").then(|| "lots".to_string())).is_err());
        assert!(toml::from_str::<Config>("[server]\nnonsense = 1\n").is_err(), "unknown keys are rejected");
    }

    #[test]
    fn the_store_is_chosen_by_env_and_a_password_never_reaches_the_file() {
        let mut c = Config::default();
        assert_eq!(c.store.backend, "sqlite");
        c.apply_env(|k| match k {
            "VALV_STORE" => Some("postgres".into()),
            "VALV_DATABASE_URL" => Some("postgresql://valv:s3cret@127.0.0.1:5432/valv".into()),
            _ => None,
        })
        .expect("valid");
        c.store.check().expect("a password from the environment is taken");
        let written = c.to_toml();
        assert!(written.contains("backend = \"postgres\"") && !written.contains("s3cret"), "{written}");
        // What init wrote then (no URL) starts again with the URL from the environment.
        let mut again: Config = toml::from_str(&written).expect("parse");
        again.store.check_file().expect("nothing secret in the file");
        assert!(again.store.check().is_err(), "a URL is needed");
        again.apply_env(|k| (k == "VALV_DATABASE_URL").then(|| "postgresql://valv:s3cret@127.0.0.1/valv".to_string())).expect("valid");
        again.store.check().expect("the URL from the environment");
        let mut from_file: Config = toml::from_str("[store]\nbackend = \"postgres\"\nurl = \"postgresql://valv:pw@db/valv\"\n").expect("parse");
        assert!(from_file.store.check_file().expect_err("refused").contains("password_file"));
        from_file.store.url = "host=db user=valv dbname=valv".into();
        from_file.store.check_file().expect("no password");
        from_file.store.check().expect("complete");
        assert!(toml::from_str::<Config>("[store]\nbackend = \"mysql\"\n").expect("parse").store.check().is_err());
    }

    #[test]
    fn siem_is_off_without_an_address_and_needs_a_ca() {
        let dir = Path::new("/data");
        let mut c = Config::default();
        assert!(c.siem.settings(dir).expect("valid").is_none());
        c.apply_env(|k| (k == "VALV_SIEM_ADDRESS").then(|| "siem.example:6514".to_string())).expect("valid");
        assert!(c.siem.settings(dir).is_err(), "no CA file");
        c.apply_env(|k| (k == "VALV_SIEM_CA_FILE").then(|| "siem-ca.pem".to_string())).expect("valid");
        let s = c.siem.settings(dir).expect("valid").expect("on");
        assert_eq!((s.server_name.as_str(), s.ca_file.as_path()), ("siem.example", Path::new("/data/siem-ca.pem")));
        assert_eq!(s.position_file, Path::new("/data/siem.position"));
        let back: Config = toml::from_str(&c.to_toml()).expect("round trip");
        assert_eq!(back.siem.address.as_deref(), Some("siem.example:6514"));
        assert!(toml::from_str::<Config>("[siem]\nport = 1\n").is_err(), "unknown keys are rejected");
    }

    /// A directory removed when the test ends.
    struct TempDir(PathBuf);
    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_alert_webhook_is_off_without_a_url_and_needs_a_ca_and_a_secret() {
        let dir = TempDir(std::env::temp_dir().join(format!("valv-webhook-config-{}", std::process::id())));
        std::fs::create_dir_all(dir.path()).expect("temp dir");
        std::fs::write(dir.path().join("hook-ca.pem"), "not checked here").expect("write");
        let secret = |v: &'static str| move |k: &str| (k == "VALV_ALERT_WEBHOOK_SECRET").then(|| v.to_string());
        let good = secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        let mut c = Config::default();
        assert!(c.alert_webhook.settings(dir.path(), good).expect("valid").is_none());
        c.apply_env(|k| (k == "VALV_ALERT_WEBHOOK_URL").then(|| "https://hooks.example/valv".to_string())).expect("valid");
        assert!(c.alert_webhook.settings(dir.path(), good).expect_err("refused").contains("ca_file"));
        c.apply_env(|k| (k == "VALV_ALERT_WEBHOOK_CA_FILE").then(|| "hook-ca.pem".to_string())).expect("valid");
        assert!(c.alert_webhook.settings(dir.path(), |_| None).expect_err("refused").contains("VALV_ALERT_WEBHOOK_SECRET"));
        assert!(c.alert_webhook.settings(dir.path(), secret("hunter2")).expect_err("refused").contains("whsec_"));
        let s = c.alert_webhook.settings(dir.path(), good).expect("valid").expect("on");
        assert_eq!((s.url.as_str(), s.ca_pem.as_slice()), ("https://hooks.example/valv", b"not checked here".as_slice()));
        let back: Config = toml::from_str(&c.to_toml()).expect("round trip");
        assert_eq!(back.alert_webhook.url.as_deref(), Some("https://hooks.example/valv"));
        assert!(!c.to_toml().contains("whsec_"), "the secret is never written to the configuration");
        assert!(toml::from_str::<Config>("[alert_webhook]\nsecret = \"whsec_x\"\n").is_err(), "an inline secret is refused");
    }

    #[test]
    fn limits_from_toml_and_env() {
        let mut c: Config = toml::from_str("[limits]\nidle_timeout_secs = 2\nmax_connections_per_address = 8\n").expect("toml");
        c.apply_env(|k| (k == "VALV_LIMITS_BODY_GRACE_SECS").then(|| "3".to_string())).expect("valid");
        let s = c.limits.settings(c.server.max_body_bytes).expect("valid");
        assert_eq!((s.idle_timeout.as_secs(), s.max_connections_per_address, s.body_grace.as_secs()), (2, 8, 3));
        assert_eq!(s, valv_server::http::limits::Settings { idle_timeout: s.idle_timeout, max_connections_per_address: 8, body_grace: s.body_grace, ..Default::default() }, "the rest are the defaults");
        assert!(c.apply_env(|k| (k == "VALV_LIMITS_MAX_CONNECTIONS").then(|| "many".to_string())).is_err());
        c.limits.unauthenticated_burst = 0;
        assert!(c.limits.settings(c.server.max_body_bytes).is_err(), "zero is refused");
        c.limits.unauthenticated_burst = 1;
        c.limits.body_memory_bytes = 1024;
        assert!(c.limits.settings(c.server.max_body_bytes).is_err(), "the budget must hold the largest body");
        let back: Config = toml::from_str(&c.to_toml()).expect("round trip");
        assert_eq!(back.limits.idle_timeout_secs, 2);
    }
}
