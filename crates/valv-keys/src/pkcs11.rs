//! KEKs on a PKCS#11 token (an HSM, or SoftHSM2 in tests): every KEK version is an AES-256 secret
//! key object on the token, created there, sensitive and not extractable, so no KEK byte ever
//! leaves the token; data keys are wrapped and unwrapped by the token (AES-256-GCM, the same
//! layout and additional data as the key file's wraps).
//!
//! Configured by an RFC 7512 PKCS#11 URI in `keys.provider`:
//! `pkcs11:token=<label>;object=<label>?module-path=<library>&pin-source=<file:PATH|env:NAME>`.
//! The PIN is given only by reference. The object label is the KEK id; each version is an object
//! with that label and `CKA_ID` = `v<version>`.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use valv_crypto::provider::wrap_aad;
use valv_crypto::{CryptoError, DataKey, KeyProvider, WrappedKey};

/// What a `pkcs11:` URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    pub token: String,
    pub object: String,
    pub module: PathBuf,
    pub pin_source: PinSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    File(PathBuf),
    Env(String),
}

/// RFC 7512 percent-decoding of one attribute value.
fn decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(bytes.len()), 0);
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| format!("bad percent-encoding in '{value}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{value}' is not UTF-8"))
}

impl Pkcs11Uri {
    /// Parses `pkcs11:token=…;object=…?module-path=…&pin-source=…`; paths relative to `base`.
    pub fn parse(uri: &str, base: &Path) -> Result<Self, String> {
        let bad = |why: String| format!("keys.provider '{uri}': {why}");
        let rest = uri.strip_prefix("pkcs11:").ok_or_else(|| bad("not a pkcs11: URI".into()))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (mut token, mut object, mut module, mut pin) = (None, None, None, None);
        for (part, sep) in [(path, ';'), (query, '&')] {
            for attr in part.split(sep).filter(|a| !a.is_empty()) {
                let (k, v) = attr.split_once('=').ok_or_else(|| bad(format!("'{attr}' is not name=value")))?;
                let v = decode(v).map_err(bad)?;
                match k {
                    "token" => token = Some(v),
                    "object" => object = Some(v),
                    "module-path" => module = Some(base.join(v)),
                    "pin-source" => {
                        pin = Some(if let Some(p) = v.strip_prefix("file:") {
                            PinSource::File(base.join(p))
                        } else if let Some(n) = v.strip_prefix("env:") {
                            PinSource::Env(n.to_string())
                        } else {
                            return Err(bad("pin-source is file:PATH or env:NAME (the PIN itself is never written in the configuration)".into()));
                        })
                    }
                    "pin-value" => return Err(bad("pin-value would put the PIN in the configuration: use pin-source=file:PATH or env:NAME".into())),
                    other => return Err(bad(format!("unknown attribute '{other}'"))),
                }
            }
        }
        let need = |v: Option<String>, name: &str| v.filter(|s| !s.is_empty()).ok_or_else(|| bad(format!("{name} is required")));
        Ok(Pkcs11Uri {
            token: need(token, "token")?,
            object: need(object, "object")?,
            module: module.ok_or_else(|| bad("module-path is required".into()))?,
            pin_source: pin.ok_or_else(|| bad("pin-source is required".into()))?,
        })
    }

    fn pin(&self) -> Result<AuthPin, String> {
        let pin = match &self.pin_source {
            PinSource::File(p) => std::fs::read_to_string(p).map_err(|e| format!("PKCS#11 PIN file {}: {e}", p.display()))?,
            PinSource::Env(n) => std::env::var(n).map_err(|_| format!("PKCS#11 PIN: the environment variable {n} is not set"))?,
        };
        Ok(AuthPin::from(pin.trim_end_matches(['\n', '\r']).to_string()))
    }
}

/// A logged-in session on the token and the KEK versions found on it.
pub struct TokenKeys {
    uri: Pkcs11Uri,
    inner: Mutex<Inner>,
}

struct Inner {
    session: Session,
    versions: BTreeMap<u32, ObjectHandle>,
}

fn version_id(version: u32) -> Vec<u8> {
    format!("v{version}").into_bytes()
}

fn token_error(what: &str, e: impl std::fmt::Display) -> CryptoError {
    CryptoError::Provider(format!("PKCS#11 token: {what}: {e}"))
}

impl TokenKeys {
    /// Loads the module, finds the token, logs in and lists the KEK versions; with `create`, makes
    /// version 1 when there is none (first start). Fails with a one-line reason otherwise.
    pub fn open(uri: Pkcs11Uri, create: bool) -> Result<Self, String> {
        let pkcs11 = Pkcs11::new(&uri.module).map_err(|e| format!("PKCS#11 module {}: {e}", uri.module.display()))?;
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("PKCS#11 module {}: initialise: {e}", uri.module.display()))?;
        let slot = pkcs11
            .get_slots_with_token()
            .map_err(|e| format!("PKCS#11: listing slots: {e}"))?
            .into_iter()
            .find(|s| pkcs11.get_token_info(*s).is_ok_and(|t| t.label().trim_end() == uri.token))
            .ok_or_else(|| format!("PKCS#11: no token labelled '{}' in {}", uri.token, uri.module.display()))?;
        let session = pkcs11.open_rw_session(slot).map_err(|e| format!("PKCS#11: opening a session on '{}': {e}", uri.token))?;
        session.login(UserType::User, Some(&uri.pin()?)).map_err(|e| format!("PKCS#11: logging in to '{}': {e}", uri.token))?;
        let keys = TokenKeys { uri, inner: Mutex::new(Inner { session, versions: BTreeMap::new() }) };
        keys.reload().map_err(|e| e.to_string())?;
        if keys.versions().is_empty() {
            if !create {
                return Err(format!("PKCS#11: token '{}' holds no key labelled '{}'", keys.uri.token, keys.uri.object));
            }
            keys.generate(1).map_err(|e| e.to_string())?;
        }
        Ok(keys)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, CryptoError> {
        self.inner.lock().map_err(|_| token_error("session", "lock poisoned"))
    }

    /// Lists the KEK objects (label = the KEK id) and their versions from `CKA_ID`.
    fn reload(&self) -> Result<(), CryptoError> {
        let mut inner = self.lock()?;
        let template = [Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(self.uri.object.as_bytes().to_vec())];
        let mut handles = inner.session.find_objects(&template).map_err(|e| token_error("finding keys", e))?;
        // The same objects as last time (the common case: this runs before every wrap): no need
        // to read their ids again.
        handles.sort_unstable_by_key(|h| h.handle());
        let mut known: Vec<ObjectHandle> = inner.versions.values().copied().collect();
        known.sort_unstable_by_key(|h| h.handle());
        if !handles.is_empty() && handles == known {
            return Ok(());
        }
        let mut versions = BTreeMap::new();
        for h in handles {
            let attrs = inner.session.get_attributes(h, &[AttributeType::Id]).map_err(|e| token_error("reading a key's id", e))?;
            let version = attrs.iter().find_map(|a| match a {
                Attribute::Id(id) => std::str::from_utf8(id).ok().and_then(|s| s.strip_prefix('v')).and_then(|v| v.parse::<u32>().ok()),
                _ => None,
            });
            if let Some(v) = version {
                if versions.insert(v, h).is_some() {
                    return Err(token_error("keys", format!("two objects '{}' carry version {v}", self.uri.object)));
                }
            }
        }
        inner.versions = versions;
        Ok(())
    }

    /// Creates KEK `version` on the token: AES-256, sensitive, never extractable.
    fn generate(&self, version: u32) -> Result<(), CryptoError> {
        {
            let inner = self.lock()?;
            let template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(self.uri.object.as_bytes().to_vec()),
                Attribute::Id(version_id(version)),
            ];
            inner.session.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| token_error("generating a key", e))?;
        }
        // Another process rotating at the same moment would have made the same version: the
        // reload refuses two objects with one version rather than pick one.
        self.reload()
    }

    /// Adds the next KEK version on the token; returns its number.
    pub fn rotate(&self) -> Result<u32, String> {
        self.reload().map_err(|e| e.to_string())?;
        let next = self.current_version() + 1;
        self.generate(next).map_err(|e| e.to_string())?;
        Ok(next)
    }

    /// Destroys a KEK version's object on the token (the caller checked nothing needs it).
    pub fn retire(&self, version: u32) -> Result<(), String> {
        self.reload().map_err(|e| e.to_string())?;
        if version == self.current_version() {
            return Err(format!("version {version} is the current KEK version; rotate first"));
        }
        let mut inner = self.lock().map_err(|e| e.to_string())?;
        let handle = inner.versions.remove(&version).ok_or_else(|| format!("there is no KEK version {version}"))?;
        inner.session.destroy_object(handle).map_err(|e| format!("PKCS#11: destroying version {version}: {e}"))
    }

    pub fn describe(&self) -> String {
        format!("PKCS#11 token '{}' ({})", self.uri.token, self.uri.module.display())
    }

    fn handle(&self, version: u32) -> Result<Option<ObjectHandle>, CryptoError> {
        Ok(self.lock()?.versions.get(&version).copied())
    }

    fn unknown(&self, version: u32) -> CryptoError {
        CryptoError::UnknownKek { provider: "pkcs11".into(), kek_id: self.uri.object.clone(), version }
    }
}

impl KeyProvider for TokenKeys {
    fn name(&self) -> &str {
        "pkcs11"
    }

    fn kek_id(&self) -> String {
        self.uri.object.clone()
    }

    fn current_version(&self) -> u32 {
        self.lock().ok().and_then(|i| i.versions.keys().next_back().copied()).unwrap_or(0)
    }

    fn versions(&self) -> Vec<u32> {
        self.lock().map(|i| i.versions.keys().copied().collect()).unwrap_or_default()
    }

    fn refresh(&self) {
        if let Err(e) = self.reload() {
            tracing::warn!(error = %e, "listing the KEK versions on the PKCS#11 token failed; using those listed before");
        }
    }

    fn wrap(&self, key: &DataKey, context: &str, nonce: [u8; 12]) -> Result<WrappedKey, CryptoError> {
        self.refresh();
        let version = self.current_version();
        let handle = self.handle(version)?.ok_or_else(|| self.unknown(version))?;
        let aad = wrap_aad(context, version);
        let mut iv = nonce;
        let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|e| token_error("GCM parameters", e))?;
        let sealed = self.lock()?.session.encrypt(&Mechanism::AesGcm(params), handle, key.expose()).map_err(|e| token_error("wrapping", e))?;
        let mut ciphertext = nonce.to_vec();
        ciphertext.extend_from_slice(&sealed);
        Ok(WrappedKey { provider: "pkcs11".into(), kek_id: self.kek_id(), kek_version: version, ciphertext })
    }

    fn unwrap(&self, wrapped: &WrappedKey, context: &str) -> Result<DataKey, CryptoError> {
        if wrapped.provider != "pkcs11" || wrapped.kek_id != self.uri.object {
            return Err(CryptoError::UnknownKek { provider: wrapped.provider.clone(), kek_id: wrapped.kek_id.clone(), version: wrapped.kek_version });
        }
        let handle = match self.handle(wrapped.kek_version)? {
            Some(h) => h,
            None => {
                self.refresh();
                self.handle(wrapped.kek_version)?.ok_or_else(|| self.unknown(wrapped.kek_version))?
            }
        };
        let (nonce, sealed) = wrapped.ciphertext.split_at_checked(12).ok_or(CryptoError::Malformed("a wrapped key is nonce || ciphertext || tag"))?;
        let aad = wrap_aad(context, wrapped.kek_version);
        let mut iv: [u8; 12] = nonce.try_into().map_err(|_| CryptoError::Malformed("nonce"))?;
        let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|e| token_error("GCM parameters", e))?;
        // A wrong context, version or tampered bytes fail the tag check on the token.
        let plain = zeroize::Zeroizing::new(self.lock()?.session.decrypt(&Mechanism::AesGcm(params), handle, sealed).map_err(|_| CryptoError::Authentication)?);
        DataKey::from_slice(&plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let base = Path::new("/data");
        let u = Pkcs11Uri::parse("pkcs11:token=valv%20hsm;object=valv-kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:hsm.pin", base).expect("parse");
        assert_eq!(u.token, "valv hsm");
        assert_eq!(u.object, "valv-kek");
        assert_eq!(u.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.pin_source, PinSource::File(PathBuf::from("/data/hsm.pin")));
        let env = Pkcs11Uri::parse("pkcs11:token=t;object=o?module-path=m.so&pin-source=env:HSM_PIN", base).expect("parse");
        assert_eq!(env.pin_source, PinSource::Env("HSM_PIN".into()));
        for bad in [
            "pkcs11:token=t;object=o?module-path=m.so&pin-value=1234",
            "pkcs11:token=t;object=o?module-path=m.so",
            "pkcs11:object=o?module-path=m.so&pin-source=env:P",
            "pkcs11:token=t;object=o?pin-source=env:P",
            "pkcs11:token=t;object=o;colour=red?module-path=m.so&pin-source=env:P",
            "pkcs11:token=t%zz;object=o?module-path=m.so&pin-source=env:P",
            "pkcs11:token=t;object=o?module-path=m.so&pin-source=1234",
            "file:kek.key",
        ] {
            assert!(Pkcs11Uri::parse(bad, base).is_err(), "{bad}");
        }
    }
}
