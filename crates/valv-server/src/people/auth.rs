//! Authentication: who is calling. This version knows service accounts holding API keys; the
//! identity work adds people (passwords, TOTP, OIDC) and mutual TLS, all producing a [`Principal`].
//!
//! API keys are `valv_` + 64 hex digits (256 random bits). Only their SHA-256 is stored: the key
//! has full entropy, so a slow hash would add nothing.

use crate::error::ApiError;
use sha2::{Digest, Sha256};
use valv_crypto::RecordMac;
use valv_store::{ApiKeyRecord, Store};

/// Roles an API key (or a client certificate) may hold: keys are for machines, people sign in.
pub const API_KEY_ROLES: &[&str] = &["admin", "service", "auditor"];

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// Stable id (the API key's id).
    pub id: String,
    /// Display name (the API key's name).
    pub name: String,
    pub roles: Vec<String>,
    /// Care units the caller belongs to.
    pub units: Vec<String>,
    /// Whether the caller proved a second factor.
    pub mfa: bool,
    /// The Practitioner resource this person is (care teams name practitioners).
    pub practitioner: Option<String>,
    /// The Patient resource this person is (the `patient` role).
    pub patient: Option<String>,
    /// SMART scopes of the credential: they narrow a person's role and are a service's grant.
    pub scopes: Option<valv_policy::Scopes>,
}

impl Principal {
    /// A caller with only an id, a name and roles (services, console work).
    pub fn basic(kind: PrincipalKind, id: String, name: String, roles: Vec<String>, scopes: Option<valv_policy::Scopes>) -> Principal {
        Principal { kind, id, name, roles, units: Vec::new(), mfa: false, practitioner: None, patient: None, scopes }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A service account holding an API key.
    Service,
    /// A person signed in with a session token.
    User,
    /// An operator at the server's console running the `valv` command (imports, demo data).
    Local,
}

pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn record_fields(r: &ApiKeyRecord) -> Vec<Vec<u8>> {
    // Scopes join the MAC only when set, so keys made before scopes existed still verify, and
    // scopes stripped in the database change the MAC's input.
    let mut fields = vec![
        r.id.clone().into_bytes(),
        r.name.clone().into_bytes(),
        r.role.clone().into_bytes(),
        r.hash.to_vec(),
        r.created.to_string().into_bytes(),
        r.revoked.map_or_else(|| b"active".to_vec(), |t| t.to_string().into_bytes()),
    ];
    if !r.scopes.is_empty() {
        fields.push(r.scopes.clone().into_bytes());
    }
    fields
}

/// The MAC an API-key record must carry.
pub fn api_key_mac(macs: &RecordMac, r: &ApiKeyRecord) -> Vec<u8> {
    let fields = record_fields(r);
    macs.tag("api-key", &fields.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

fn api_key_mac_ok(macs: &RecordMac, r: &ApiKeyRecord) -> bool {
    let fields = record_fields(r);
    macs.verify("api-key", &fields.iter().map(Vec::as_slice).collect::<Vec<_>>(), &r.mac)
}

/// The same record, revoked at `now`, with its new MAC.
pub fn revoked(macs: &RecordMac, r: &ApiKeyRecord, now: i64) -> ApiKeyRecord {
    let mut out = ApiKeyRecord { revoked: Some(now), ..r.clone() };
    out.mac = api_key_mac(macs, &out);
    out
}

/// A new API key and the record that stores it (hash only, MAC'd).
pub fn new_api_key(macs: &RecordMac, name: &str, role: &str, scopes: &str, now: i64, random: [u8; 32], id_random: [u8; 16]) -> Result<(String, ApiKeyRecord), String> {
    let scopes = valv_policy::Scopes::parse(scopes)?.to_text();
    if !API_KEY_ROLES.contains(&role) {
        return Err(format!("role '{role}' is not an API-key role (one of: {})", API_KEY_ROLES.join(", ")));
    }
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err("a key name is 1 to 64 characters of letters, digits, '-', '_' and '.'".into());
    }
    let key = format!("valv_{}", valv_crypto::hex::encode(&random));
    let mut record = ApiKeyRecord {
        id: valv_fhir::id::uuid_from_bytes(id_random),
        name: name.to_string(),
        role: role.to_string(),
        hash: hash_api_key(&key),
        created: now,
        revoked: None,
        mac: Vec::new(),
        scopes,
    };
    record.mac = api_key_mac(macs, &record);
    Ok((key, record))
}

/// The bearer credential of an `Authorization` header.
pub fn bearer(authorization: Option<&str>) -> Result<&str, ApiError> {
    let header = authorization.ok_or_else(|| ApiError::unauthorized("this request needs a credential: Authorization: Bearer <key or access token>"))?;
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    match header.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => Ok(rest.trim()),
        _ => Err(ApiError::unauthorized("the Authorization header must use the Bearer scheme")),
    }
}

/// The principal of a signed-in person.
pub fn user_principal(user: &crate::people::identity::User) -> Principal {
    Principal {
        kind: PrincipalKind::User,
        id: user.id.clone(),
        name: user.username.clone(),
        roles: user.roles.clone(),
        units: user.units.clone(),
        mfa: user.totp_confirmed,
        practitioner: user.practitioner.clone(),
        patient: user.patient.clone(),
        scopes: None,
    }
}

/// Resolves an API key to a principal; a refusal comes with the reason its audit entry records
/// (`invalid-credential`, or `revoked-key` for a key that was revoked: the answer is the same).
pub async fn authenticate(store: &dyn Store, macs: &RecordMac, token: &str) -> Result<Principal, (ApiError, &'static str)> {
    let invalid = |reason| (ApiError::unauthorized("the bearer credential is not valid"), reason);
    if !token.starts_with("valv_") || token.len() != 69 {
        return Err(invalid("invalid-credential"));
    }
    let record = store.find_api_key(&hash_api_key(token)).await.map_err(|e| (ApiError::from(e), "storage"))?;
    if let Some(r) = record.as_ref().filter(|r| !api_key_mac_ok(macs, r)) {
        tracing::error!(key_id = %r.id, "API key record fails its MAC: inserted or altered outside Valv");
        return Err(invalid("invalid-credential"));
    }
    match record {
        Some(r) if r.revoked.is_none() => {
            let scopes = valv_policy::Scopes::parse(&r.scopes).map_err(|_| invalid("invalid-credential"))?;
            Ok(Principal::basic(PrincipalKind::Service, r.id, r.name, vec![r.role], (!scopes.is_empty()).then_some(scopes)))
        }
        // Unknown and revoked keys get the same answer; only the audit entry tells them apart.
        Some(_) => Err(invalid("revoked-key")),
        None => Err(invalid("invalid-credential")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn macs() -> RecordMac {
        RecordMac::new(valv_crypto::DataKey::from_bytes([3; 32]))
    }

    #[test]
    fn key_shape_and_hash() {
        let (key, rec) = new_api_key(&macs(), "importer", "service", "system/*.c", 1, [7; 32], [1; 16]).expect("valid");
        assert_eq!(key.len(), 69);
        assert_eq!(rec.hash, hash_api_key(&key));
        assert!(new_api_key(&macs(), "x", "superuser", "", 1, [7; 32], [1; 16]).is_err());
        assert!(new_api_key(&macs(), "bad name", "service", "", 1, [7; 32], [1; 16]).is_err());
    }

    #[test]
    fn records_are_bound_by_their_mac() {
        let (_, rec) = new_api_key(&macs(), "importer", "service", "system/*.c", 1, [7; 32], [1; 16]).expect("valid");
        assert!(api_key_mac_ok(&macs(), &rec));
        let promoted = ApiKeyRecord { role: "admin".into(), ..rec.clone() };
        assert!(!api_key_mac_ok(&macs(), &promoted), "a role edited in the database does not verify");
        let r = revoked(&macs(), &rec, 5);
        assert!(api_key_mac_ok(&macs(), &r));
        let widened = ApiKeyRecord { scopes: "system/*.cruds".into(), ..r.clone() };
        assert!(!api_key_mac_ok(&macs(), &widened), "scopes edited in the database do not verify");
        let stripped = ApiKeyRecord { scopes: String::new(), ..r.clone() };
        assert!(!api_key_mac_ok(&macs(), &stripped), "scopes stripped in the database do not verify");
        let unrevoked = ApiKeyRecord { revoked: None, ..r };
        assert!(!api_key_mac_ok(&macs(), &unrevoked), "un-revoking in the database does not verify");
    }
}
