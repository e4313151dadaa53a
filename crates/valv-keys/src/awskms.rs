//! KEKs in AWS KMS (the official `aws-sdk-kms`): every KEK version is a KMS key of its own
//! (symmetric, created in KMS, its material never leaves it), named by the alias
//! `alias/<name>/v<version>`; data keys are wrapped by KMS `Encrypt` and unwrapped by `Decrypt`
//! under that key, bound to the key's name and version by the encryption context. A version is
//! retired by deleting its alias and scheduling the key's deletion (KMS's shortest window, 7
//! days, during which an operator can still cancel it in KMS).
//!
//! Configured in `keys.provider` as
//! `aws-kms:alias/<name>?region=<region>[&endpoint=<url>][&ca-file=<path>]`. Credentials come only
//! from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), never
//! from the configuration. `endpoint` (a VPC endpoint, or an emulator in tests) must be `https:`
//! unless it is a loopback address.
//!
//! `KeyProvider` is synchronous (it is called while a request holds no await point open for it);
//! the SDK is asynchronous, so calls run on this provider's own one-thread runtime and the caller
//! waits for the answer, at most [`CALL_LIMIT`]: an unreachable KMS fails closed, never hangs.

use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::{DisplayErrorContext, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use aws_sdk_kms::Client;
use aws_smithy_http_client::tls;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;
use valv_crypto::{CryptoError, DataKey, KeyProvider, WrappedKey};

/// The longest a caller waits for KMS (the SDK's own limit per operation is a little shorter).
pub const CALL_LIMIT: Duration = Duration::from_secs(15);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// KMS's shortest waiting period before a scheduled key deletion takes effect.
const DELETION_WINDOW_DAYS: i32 = 7;

/// What an `aws-kms:` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsUri {
    /// The KEK id: the alias name without `alias/`.
    pub name: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub ca_file: Option<PathBuf>,
}

fn is_loopback(url: &str) -> bool {
    let authority = url.split_once("://").map_or("", |(_, rest)| rest).split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    !authority.contains('@') && (host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback()))
}

impl KmsUri {
    /// Parses `aws-kms:alias/<name>?region=…&endpoint=…&ca-file=…`; `region` may instead come
    /// from `AWS_REGION` (passed in as `env_region`); paths are relative to `base`.
    pub fn parse(uri: &str, base: &Path, env_region: Option<String>) -> Result<Self, String> {
        let bad = |why: &str| format!("keys.provider '{uri}': {why}");
        let rest = uri.strip_prefix("aws-kms:").ok_or_else(|| bad("not an aws-kms: URI"))?;
        let (alias, query) = rest.split_once('?').unwrap_or((rest, ""));
        let name = alias.strip_prefix("alias/").ok_or_else(|| bad("name the KEK as alias/<name>"))?;
        if name.is_empty() || name.len() > 200 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) || name.starts_with("aws") {
            return Err(bad("the alias name is letters, digits, '-' and '_' (KMS reserves names starting with 'aws')"));
        }
        let (mut region, mut endpoint, mut ca_file) = (None, None, None);
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (k, v) = attr.split_once('=').ok_or_else(|| bad(&format!("'{attr}' is not name=value")))?;
            match k {
                "region" => region = Some(v.to_string()),
                "endpoint" => endpoint = Some(v.to_string()),
                "ca-file" => ca_file = Some(base.join(v)),
                "access-key-id" | "secret-access-key" | "session-token" => {
                    return Err(bad("credentials are never written in the configuration: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"))
                }
                other => return Err(bad(&format!("unknown attribute '{other}'"))),
            }
        }
        let region = region.or(env_region).filter(|r| !r.is_empty()).ok_or_else(|| bad("region is required (region=… or AWS_REGION)"))?;
        if !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("bad region"));
        }
        if let Some(e) = &endpoint {
            if !(e.starts_with("https://") || (e.starts_with("http://") && is_loopback(e))) {
                return Err(bad("endpoint must be https:// (plain http only to a loopback address)"));
            }
        }
        Ok(KmsUri { name: name.to_string(), region, endpoint, ca_file })
    }

    fn alias(&self, version: u32) -> String {
        format!("alias/{}/v{version}", self.name)
    }

    /// The version an alias names, if it is one of this KEK's.
    fn version_of(&self, alias: &str) -> Option<u32> {
        let v = alias.strip_prefix("alias/")?.strip_prefix(self.name.as_str())?.strip_prefix("/v")?;
        v.parse().ok().filter(|_| !v.starts_with('0'))
    }
}

/// The KEKs in KMS: a client, the runtime it runs on, and the versions last listed (version →
/// KMS key id).
pub struct KmsKeys {
    uri: KmsUri,
    client: Client,
    runtime: Option<tokio::runtime::Runtime>,
    versions: RwLock<BTreeMap<u32, String>>,
}

fn kms_error<E: std::error::Error + 'static, R: std::fmt::Debug>(what: &str, e: SdkError<E, R>) -> String {
    format!("AWS KMS: {what}: {}", DisplayErrorContext(&e))
}

/// The encryption context every wrap is bound to (as the additional data of the other providers).
fn context_pairs(context: &str, version: u32) -> [(&'static str, String); 2] {
    [("valv-key", context.to_string()), ("valv-kek-version", version.to_string())]
}

impl KmsKeys {
    /// Connects, lists the KEK versions and, with `create` (first start), makes version 1 when
    /// there is none. Fails with a one-line reason otherwise.
    pub fn open(uri: KmsUri, create: bool) -> Result<Self, String> {
        let id = std::env::var("AWS_ACCESS_KEY_ID").map_err(|_| "AWS KMS: AWS_ACCESS_KEY_ID is not set".to_string())?;
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").map_err(|_| "AWS KMS: AWS_SECRET_ACCESS_KEY is not set".to_string())?;
        let token = std::env::var("AWS_SESSION_TOKEN").ok().filter(|t| !t.is_empty());
        let mut trust = tls::TrustStore::default();
        if let Some(ca) = &uri.ca_file {
            trust = trust.with_pem_certificate(std::fs::read(ca).map_err(|e| format!("AWS KMS: CA file {}: {e}", ca.display()))?);
        }
        let tls_context = tls::TlsContext::builder().with_trust_store(trust).build().map_err(|e| format!("AWS KMS: TLS: {e}"))?;
        let http = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring)).tls_context(tls_context).build_https();
        let mut config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(uri.region.clone()))
            .credentials_provider(Credentials::new(id, secret, token, None, "environment"))
            .http_client(http)
            .timeout_config(TimeoutConfig::builder().connect_timeout(CONNECT_TIMEOUT).operation_timeout(OPERATION_TIMEOUT).build())
            .retry_config(RetryConfig::standard().with_max_attempts(2));
        if let Some(e) = &uri.endpoint {
            config = config.endpoint_url(e);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("valv-kms")
            .enable_all()
            .build()
            .map_err(|e| format!("AWS KMS: starting its runtime: {e}"))?;
        let keys = KmsKeys { uri, client: Client::from_conf(config.build()), runtime: Some(runtime), versions: RwLock::new(BTreeMap::new()) };
        keys.reload()?;
        if keys.versions().is_empty() {
            if !create {
                return Err(format!("AWS KMS: no key is aliased {} (in {})", keys.uri.alias(1), keys.uri.region));
            }
            keys.generate(1)?;
        }
        Ok(keys)
    }

    /// Runs `call` on the provider's runtime and waits for it, at most [`CALL_LIMIT`].
    fn run<T: Send + 'static>(&self, call: impl Future<Output = Result<T, String>> + Send + 'static) -> Result<T, String> {
        let runtime = self.runtime.as_ref().ok_or("AWS KMS: the provider is shut down")?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(call.await);
        });
        rx.recv_timeout(CALL_LIMIT).map_err(|_| format!("AWS KMS: no answer within {} s", CALL_LIMIT.as_secs()))?
    }

    /// Lists this KEK's aliases (every page) and takes them in as the versions.
    fn reload(&self) -> Result<(), String> {
        let client = self.client.clone();
        let aliases = self.run(async move {
            let mut found = Vec::new();
            let mut marker = None;
            loop {
                let page = client.list_aliases().set_marker(marker).limit(100).send().await.map_err(|e| kms_error("listing aliases", e))?;
                found.extend(page.aliases().iter().filter_map(|a| Some((a.alias_name()?.to_string(), a.target_key_id()?.to_string()))));
                match page.next_marker().filter(|_| page.truncated()) {
                    Some(m) => marker = Some(m.to_string()),
                    None => return Ok(found),
                }
            }
        })?;
        let versions: BTreeMap<u32, String> = aliases.into_iter().filter_map(|(alias, key)| Some((self.uri.version_of(&alias)?, key))).collect();
        if let Ok(mut v) = self.versions.write() {
            *v = versions;
        }
        Ok(())
    }

    /// Creates KEK `version`: a new symmetric KMS key and its alias. If another process made the
    /// same version first, the alias exists: the new key is scheduled for deletion and this fails.
    fn generate(&self, version: u32) -> Result<(), String> {
        let (client, alias, name) = (self.client.clone(), self.uri.alias(version), self.uri.name.clone());
        self.run(async move {
            let created = client
                .create_key()
                .key_spec(KeySpec::SymmetricDefault)
                .key_usage(KeyUsageType::EncryptDecrypt)
                .description(format!("Valv key-encryption key {name}, version {version}"))
                .send()
                .await
                .map_err(|e| kms_error("creating a key", e))?;
            let key_id = created.key_metadata().map(|m| m.key_id().to_string()).ok_or("AWS KMS: CreateKey answered without a key id")?;
            if let Err(e) = client.create_alias().alias_name(&alias).target_key_id(&key_id).send().await {
                let _ = client.schedule_key_deletion().key_id(&key_id).pending_window_in_days(DELETION_WINDOW_DAYS).send().await;
                return Err(kms_error(&format!("naming the new key {alias}"), e));
            }
            Ok(())
        })?;
        self.reload()
    }

    /// Adds the next KEK version in KMS; returns its number.
    pub fn rotate(&self) -> Result<u32, String> {
        self.reload()?;
        let next = self.current_version() + 1;
        self.generate(next)?;
        Ok(next)
    }

    /// Retires a KEK version (the caller checked nothing needs it): its alias is deleted and its
    /// key scheduled for deletion, unusable from now on.
    pub fn retire(&self, version: u32) -> Result<(), String> {
        self.reload()?;
        if version == self.current_version() {
            return Err(format!("version {version} is the current KEK version; rotate first"));
        }
        let key_id = self.key_id(version).ok_or_else(|| format!("there is no KEK version {version}"))?;
        let (client, alias) = (self.client.clone(), self.uri.alias(version));
        self.run(async move {
            client.schedule_key_deletion().key_id(&key_id).pending_window_in_days(DELETION_WINDOW_DAYS).send().await.map_err(|e| kms_error("scheduling the key's deletion", e))?;
            client.delete_alias().alias_name(&alias).send().await.map_err(|e| kms_error("deleting the alias", e))?;
            Ok(())
        })?;
        self.reload()
    }

    pub fn describe(&self) -> String {
        format!("AWS KMS keys alias/{}/v* in {}{}", self.uri.name, self.uri.region, self.uri.endpoint.as_ref().map(|e| format!(" at {e}")).unwrap_or_default())
    }

    fn key_id(&self, version: u32) -> Option<String> {
        self.versions.read().ok()?.get(&version).cloned()
    }

    fn unknown(&self, version: u32) -> CryptoError {
        CryptoError::UnknownKek { provider: "aws-kms".into(), kek_id: self.uri.name.clone(), version }
    }
}

impl Drop for KmsKeys {
    /// The runtime may be dropped inside another (a server shutting down): let it go in the
    /// background rather than block there.
    fn drop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl KeyProvider for KmsKeys {
    fn name(&self) -> &str {
        "aws-kms"
    }

    fn kek_id(&self) -> String {
        self.uri.name.clone()
    }

    fn current_version(&self) -> u32 {
        self.versions.read().ok().and_then(|v| v.keys().next_back().copied()).unwrap_or(0)
    }

    fn versions(&self) -> Vec<u32> {
        self.versions.read().map(|v| v.keys().copied().collect()).unwrap_or_default()
    }

    /// Each call waits on the network: a rewrap keeps this many in flight.
    fn concurrency(&self) -> usize {
        16
    }

    fn refresh(&self) {
        if let Err(e) = self.reload() {
            tracing::warn!(error = %e, "listing the KEK versions in AWS KMS failed; using those listed before");
        }
    }

    /// New data keys are rare (one per patient): each lists the versions first, so a server never
    /// wraps under a version a rotation elsewhere has replaced.
    fn wrap(&self, key: &DataKey, context: &str, _nonce: [u8; 12]) -> Result<WrappedKey, CryptoError> {
        self.reload().map_err(CryptoError::Provider)?;
        let version = self.current_version();
        let key_id = self.key_id(version).ok_or_else(|| self.unknown(version))?;
        let (client, plain) = (self.client.clone(), Blob::new(key.expose().to_vec()));
        let pairs = context_pairs(context, version);
        let ciphertext = self
            .run(async move {
                let mut call = client.encrypt().key_id(key_id).plaintext(plain);
                for (k, v) in pairs {
                    call = call.encryption_context(k, v);
                }
                let out = call.send().await.map_err(|e| kms_error("wrapping", e))?;
                out.ciphertext_blob().map(|b| b.clone().into_inner()).ok_or_else(|| "AWS KMS: Encrypt answered without a ciphertext".to_string())
            })
            .map_err(CryptoError::Provider)?;
        Ok(WrappedKey { provider: "aws-kms".into(), kek_id: self.kek_id(), kek_version: version, ciphertext })
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, CryptoError> {
        if wrapped.provider != "aws-kms" || wrapped.kek_id != self.uri.name {
            return Err(CryptoError::UnknownKek { provider: wrapped.provider.clone(), kek_id: wrapped.kek_id.clone(), version: wrapped.kek_version });
        }
        let key_id = match self.key_id(wrapped.kek_version) {
            Some(k) => k,
            None => {
                self.refresh();
                self.key_id(wrapped.kek_version).ok_or_else(|| self.unknown(wrapped.kek_version))?
            }
        };
        let (client, blob) = (self.client.clone(), Blob::new(wrapped.ciphertext.clone()));
        let pairs = context_pairs(context, wrapped.kek_version);
        let plain = self.run(async move {
            // Naming the key makes KMS refuse a blob made under another key.
            let mut call = client.decrypt().key_id(key_id).ciphertext_blob(blob);
            for (k, v) in pairs {
                call = call.encryption_context(k, v);
            }
            match call.send().await {
                Ok(out) => out.plaintext().map(|b| Ok(zeroize::Zeroizing::new(b.clone().into_inner()))).ok_or_else(|| "AWS KMS: Decrypt answered without a plaintext".to_string()),
                // A wrong context, version or tampered bytes: the blob does not authenticate.
                Err(e) if e.as_service_error().is_some_and(|s| s.is_invalid_ciphertext_exception() || s.is_incorrect_key_exception()) => Ok(Err(CryptoError::Authentication)),
                Err(e) => Err(kms_error("unwrapping", e)),
            }
        });
        let plain = plain.map_err(CryptoError::Provider)??;
        DataKey::from_slice(&plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let base = Path::new("/data");
        let u = KmsUri::parse("aws-kms:alias/valv-kek?region=eu-north-1", base, None).expect("parse");
        assert_eq!((u.name.as_str(), u.region.as_str(), u.endpoint.as_deref(), u.ca_file.as_deref()), ("valv-kek", "eu-north-1", None, None));
        let u = KmsUri::parse("aws-kms:alias/k_1?endpoint=http://127.0.0.1:4566&ca-file=ca.pem", base, Some("us-east-1".into())).expect("parse");
        assert_eq!((u.region.as_str(), u.endpoint.as_deref(), u.ca_file), ("us-east-1", Some("http://127.0.0.1:4566"), Some(PathBuf::from("/data/ca.pem"))));
        assert_eq!(KmsUri::parse("aws-kms:alias/k?region=r&endpoint=https://kms.example", base, None).expect("https").endpoint.as_deref(), Some("https://kms.example"));
        for bad in [
            "aws-kms:valv-kek?region=eu-north-1",
            "aws-kms:alias/?region=eu-north-1",
            "aws-kms:alias/aws-kek?region=eu-north-1",
            "aws-kms:alias/a/b?region=eu-north-1",
            "aws-kms:alias/k",
            "aws-kms:alias/k?region=eu north",
            "aws-kms:alias/k?region=r&endpoint=http://kms.example",
            "aws-kms:alias/k?region=r&endpoint=http://127.0.0.1.evil.example:80",
            "aws-kms:alias/k?region=r&secret-access-key=abc",
            "aws-kms:alias/k?region=r&colour=red",
            "pkcs11:token=t",
        ] {
            assert!(KmsUri::parse(bad, base, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_this_keks_aliases_are_versions() {
        let u = KmsUri::parse("aws-kms:alias/valv?region=r", Path::new("/"), None).expect("parse");
        assert_eq!(u.alias(3), "alias/valv/v3");
        assert_eq!(u.version_of("alias/valv/v3"), Some(3));
        for other in ["alias/valv/v", "alias/valv/v03", "alias/valv-2/v1", "alias/valv/vx", "alias/valv", "alias/valvx/v1"] {
            assert_eq!(u.version_of(other), None, "{other}");
        }
    }
}
