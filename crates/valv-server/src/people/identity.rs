//! People: accounts, enrollment, password and TOTP login, sessions, lockout and admin changes.
//! The rules (policy, hashing, TOTP, timeouts) are in `valv-identity`; this module keeps the
//! state in the store and the clock-free decisions in order. Callers pass `now`.
//!
//! A user record is sealed as a whole with the `identity` key (AAD bound to the user id), so the
//! password hash, TOTP secret, recovery-code hashes and roles are encrypted and authenticated at
//! rest; the user name is stored only as a blind token. Updates are compare-and-swap on the
//! record's version, so two logins racing with the same TOTP code cannot both succeed.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use valv_crypto::{Aad, BlindIndexKey, Cipher, RecordMac};
use valv_identity::account::{self, UserState};
use valv_identity::codes::{self, ENROLLMENT_PREFIX, SESSION_PREFIX};
use valv_identity::limits::{Bucket, Failures, Lockout, Rate, SessionState, SessionTimes};
use valv_identity::password::{self, Cost, Hasher};
use valv_identity::totp;
use valv_store::{SessionRow, Store, StoreError, UserRow};

/// How identity behaves; `[auth]` in valv.toml.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cost: Cost,
    /// Least zxcvbn score (0-4) a new password needs.
    pub min_score: u8,
    pub session: SessionTimes,
    pub lockout: Lockout,
    /// Requests per address to `/auth/*`.
    pub rate: Rate,
    /// MFA for every role, not only those that see patient data.
    pub mfa_for_all: bool,
    /// Shown in authenticator apps.
    pub issuer: String,
    /// Passwords older than this must be changed before login (0: never).
    pub max_password_age_days: u32,
    /// Password hashes computed at once (0: half the cores); more wait (up to `hash_queue`),
    /// beyond that 503.
    pub hash_concurrency: usize,
    pub hash_queue: usize,
    /// Every login answer takes at least this long, so its timing tells nothing.
    pub login_floor_ms: u64,
    pub enrollment_ttl_ms: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cost: Cost::default(),
            min_score: 3,
            session: SessionTimes::default(),
            lockout: Lockout::default(),
            rate: Rate::default(),
            mfa_for_all: true,
            issuer: "Valv".into(),
            max_password_age_days: 0,
            hash_concurrency: 0,
            hash_queue: 64,
            login_floor_ms: 250,
            enrollment_ttl_ms: 24 * 3_600_000,
        }
    }
}

/// A user account (the sealed record).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    pub roles: Vec<String>,
    pub units: Vec<String>,
    /// The Practitioner this user is (care relationships).
    pub practitioner: Option<String>,
    /// The Patient this user is (role `patient`).
    pub patient: Option<String>,
    pub state: UserState,
    pub created: i64,
    /// Argon2id PHC string.
    pub password: Option<String>,
    /// The previous passwords' hashes, newest first: with the current one, the last five.
    pub password_history: Vec<String>,
    pub password_changed: Option<i64>,
    /// Hex of the TOTP secret (the whole record is sealed).
    pub totp_secret: Option<String>,
    pub totp_confirmed: bool,
    pub totp_last_step: Option<u64>,
    /// Hex SHA-256 of each unused recovery code.
    pub recovery: Vec<String>,
    pub enrollment_expires: Option<i64>,
    pub failures: Failures,
    /// Sessions created before this time are void (password change, admin action).
    pub sessions_valid_after: i64,
    #[serde(skip)]
    pub version: u64,
    /// Hash of the pending enrollment token. Sealed with the record; the row's column of the same
    /// value is only the index it is found by (a hash written into that column alone opens nothing).
    enrollment_hash: Option<[u8; 32]>,
    /// Who issued the pending enrollment token over the admin API (creation or MFA reset): such
    /// an enrollment also needs the approval code another admin receives (two-person rule).
    /// `None` for accounts made at the console.
    #[serde(default)]
    enrollment_by: Option<String>,
    /// Hash of the approval code for the pending enrollment, once another admin approved it.
    #[serde(default)]
    approval_hash: Option<[u8; 32]>,
    /// A change of roles or units that widens the account, awaiting another admin's approval.
    #[serde(default)]
    pub pending_roles: Option<PendingRoles>,
}

/// Roles and units an admin asked for, not yet in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingRoles {
    pub roles: Vec<String>,
    pub units: Vec<String>,
    pub requested_by: String,
    pub requested_at: i64,
}

/// Prefix of approval codes (the second half of an enrollment made over the admin API).
pub const APPROVAL_PREFIX: &str = "valva_";

impl User {
    /// Locked (by lockout) at `now`, or disabled or pending: the state an admin sees.
    pub fn state_at(&self, now: i64) -> &'static str {
        if self.state == UserState::Active && self.failures.locked(now) {
            "locked"
        } else if self.awaits_approval() {
            "awaiting-approval"
        } else {
            self.state.as_str()
        }
    }

    /// A pending enrollment issued over the admin API that no second admin has approved yet.
    pub fn awaits_approval(&self) -> bool {
        self.state == UserState::Pending && self.enrollment_by.is_some() && self.approval_hash.is_none()
    }

    /// What admins see (no secrets).
    pub fn summary(&self, now: i64) -> serde_json::Value {
        serde_json::json!({
            "pending_roles": self.pending_roles.as_ref().map(|p| serde_json::json!({"roles": p.roles, "units": p.units, "requested_by": p.requested_by})),
            "id": self.id,
            "username": self.username,
            "display_name": self.display_name,
            "roles": self.roles,
            "units": self.units,
            "practitioner": self.practitioner,
            "patient": self.patient,
            "state": self.state_at(now),
            "created": valv_fhir::date::format_instant(self.created),
            "mfa_enrolled": self.totp_confirmed,
            "recovery_codes_left": self.recovery.len(),
            "locked_until": self.failures.locked_until.filter(|t| *t > now).map(valv_fhir::date::format_instant),
            "password_changed": self.password_changed.map(valv_fhir::date::format_instant),
        })
    }
}

/// What to create.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    pub username: String,
    pub display_name: String,
    pub roles: Vec<String>,
    pub units: Vec<String>,
    pub practitioner: Option<String>,
    pub patient: Option<String>,
}

/// A login attempt.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    pub password: String,
    #[serde(default)]
    pub totp: Option<String>,
    #[serde(default)]
    pub recovery_code: Option<String>,
}

/// A login's result, with what the audit entry needs either way.
pub enum LoginOutcome {
    Ok { user: User, token: String, expires_in: i64, used_recovery: bool },
    /// `user` when the name was known; `reason` for the audit log only (never for the caller).
    Failed { user: Option<User>, reason: &'static str, locked_now: bool },
}

/// Enrollment step one: what the authenticator app needs.
pub struct Enrolled {
    pub user: User,
    pub otpauth_uri: String,
    pub secret_base32: String,
}

pub struct Identity {
    store: Arc<dyn Store>,
    cipher: Cipher,
    blind: BlindIndexKey,
    macs: RecordMac,
    hasher: Arc<Hasher>,
    hashing: Arc<tokio::sync::Semaphore>,
    waiting: AtomicUsize,
    /// A hash of nothing anyone knows, verified for unknown users so they cost the same time.
    decoy: String,
    pub settings: Settings,
    /// Session activity not yet written: token hash -> (last written, last seen).
    activity: Mutex<HashMap<[u8; 32], (i64, i64)>>,
    /// Per-address buckets for `/auth/*`, and whether the address is being refused.
    buckets: Mutex<HashMap<String, (Bucket, bool)>>,
}

/// Activity is written at most this often per session (the idle timeout's granularity).
const TOUCH_EVERY_MS: i64 = 60_000;
const MAX_BUCKETS: usize = 100_000;
/// The generic answer to every failed login.
pub const LOGIN_FAILED: &str = "the user name, password or code is not correct, or the account cannot sign in now";

fn random<const N: usize>() -> Result<[u8; N], ApiError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(b)
}

impl Identity {
    pub fn new(store: Arc<dyn Store>, key: &valv_crypto::DataKey, blind: BlindIndexKey, macs: RecordMac, mut settings: Settings) -> Result<Self, String> {
        if settings.hash_concurrency == 0 {
            settings.hash_concurrency = std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2));
        }
        let hasher = Hasher::new(settings.cost)?;
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| e.to_string())?;
        let decoy = hasher.hash(&valv_crypto::hex::encode(&secret), salt)?;
        Ok(Identity {
            store,
            cipher: Cipher::new(key),
            blind,
            macs,
            hasher: Arc::new(hasher),
            hashing: Arc::new(tokio::sync::Semaphore::new(settings.hash_concurrency.max(1))),
            waiting: AtomicUsize::new(0),
            decoy,
            settings,
            activity: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// What the audit entry of a sign-in under an unknown name records instead of the name: a
    /// keyed token (`unknown:<16 hex>`, under its own purpose, so it matches no stored user name
    /// token), telling the same mistyped name from many different ones (credential stuffing).
    pub fn unknown_name_token(&self, username: &str) -> String {
        let t = self.blind.token("User", "failed-sign-in-name", username);
        format!("unknown:{}", valv_crypto::hex::encode(&t[..8]))
    }

    fn name_token(&self, username: &str) -> [u8; 16] {
        self.blind.token("User", "username", username)
    }

    fn seal(&self, user: &User) -> Result<UserRow, ApiError> {
        let json = serde_json::to_vec(user).map_err(|e| ApiError::internal(format!("user record: {e}")))?;
        let aad = Aad { purpose: "user", resource_type: "", id: &user.id, version: user.version, patient: "" };
        Ok(UserRow {
            id: user.id.clone(),
            username_token: self.name_token(&user.username),
            version: user.version,
            sealed: self.cipher.seal(random()?, &aad, &json),
            enrollment_hash: user.enrollment_hash,
        })
    }

    fn open(&self, row: UserRow) -> Result<User, ApiError> {
        let aad = Aad { purpose: "user", resource_type: "", id: &row.id, version: row.version, patient: "" };
        let json = self.cipher.open(&aad, &row.sealed).map_err(|_| {
            ApiError::from(StoreError::Integrity(format!("user record {} does not open (altered outside Valv)", row.id)))
        })?;
        let mut user: User = serde_json::from_slice(&json).map_err(|e| ApiError::internal(format!("user record {}: {e}", row.id)))?;
        if user.id != row.id || self.name_token(&user.username) != row.username_token {
            return Err(StoreError::Integrity(format!("user record {} does not match its row", row.id)).into());
        }
        user.version = row.version;
        Ok(user)
    }

    /// Writes `user` over the version it was read at.
    async fn save(&self, user: &mut User) -> Result<(), ApiError> {
        user.version += 1;
        let row = self.seal(user)?;
        match self.store.update_user(&row).await {
            Ok(()) => Ok(()),
            Err(e) => {
                user.version -= 1;
                Err(e.into())
            }
        }
    }

    pub async fn find(&self, username: &str) -> Result<Option<User>, ApiError> {
        match self.store.user_by_name(&self.name_token(username)).await? {
            Some(row) => Ok(Some(self.open(row)?)),
            None => Ok(None),
        }
    }

    pub async fn get(&self, username: &str) -> Result<User, ApiError> {
        self.find(username).await?.ok_or_else(|| ApiError::not_found(format!("no user named '{username}'")))
    }

    pub async fn by_id(&self, id: &str) -> Result<Option<User>, ApiError> {
        match self.store.user(id).await? {
            Some(row) => Ok(Some(self.open(row)?)),
            None => Ok(None),
        }
    }

    pub async fn list(&self) -> Result<Vec<User>, ApiError> {
        let mut users = Vec::new();
        for row in self.store.users().await? {
            users.push(self.open(row)?);
        }
        users.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(users)
    }

    /// Creates a pending user and returns the one-time enrollment token (valid 24 h). `by`: the
    /// admin principal creating it over the API (its enrollment then needs another admin's
    /// approval); `None` at the console.
    pub async fn create(&self, spec: NewUser, now: i64, by: Option<&str>) -> Result<(User, String), ApiError> {
        account::check_username(&spec.username).map_err(ApiError::bad_request)?;
        account::check_roles(&spec.roles).map_err(ApiError::bad_request)?;
        for unit in &spec.units {
            account::check_unit(unit).map_err(ApiError::bad_request)?;
        }
        if spec.display_name.chars().count() > 128 || spec.display_name.chars().any(char::is_control) {
            return Err(ApiError::bad_request("a display name is at most 128 characters, without control characters"));
        }
        for (what, id) in [("practitioner", &spec.practitioner), ("patient", &spec.patient)] {
            if let Some(id) = id {
                if !valv_fhir::id::is_valid_id(id) {
                    return Err(ApiError::bad_request(format!("'{id}' is not a valid {what} id")));
                }
            }
        }
        if spec.roles.iter().any(|r| r == "patient") != spec.patient.is_some() {
            return Err(ApiError::bad_request("a user with role 'patient' must be linked to a Patient (--patient), and only such a user"));
        }
        let token = codes::token(ENROLLMENT_PREFIX, &random()?);
        let mut user = User {
            id: valv_fhir::id::uuid_from_bytes(random()?),
            display_name: if spec.display_name.is_empty() { spec.username.clone() } else { spec.display_name },
            username: spec.username,
            roles: spec.roles,
            units: spec.units,
            practitioner: spec.practitioner,
            patient: spec.patient,
            state: UserState::Pending,
            created: now,
            password: None,
            password_history: Vec::new(),
            password_changed: None,
            totp_secret: None,
            totp_confirmed: false,
            totp_last_step: None,
            recovery: Vec::new(),
            enrollment_expires: Some(now + self.settings.enrollment_ttl_ms),
            failures: Failures::default(),
            sessions_valid_after: now,
            version: 1,
            enrollment_hash: Some(codes::secret_hash(&token)),
            enrollment_by: by.map(str::to_string),
            approval_hash: None,
            pending_roles: None,
        };
        let row = self.seal(&user)?;
        self.store.insert_user(&row).await.map_err(|e| match e {
            StoreError::Conflict(_) => ApiError::new(hyper::StatusCode::CONFLICT, "duplicate", format!("a user named '{}' exists already", user.username)),
            other => other.into(),
        })?;
        user.version = 1;
        Ok((user, token))
    }

    /// Runs an Argon2 computation with bounded concurrency (a login flood waits here, or is
    /// turned away, instead of taking every core from clinical requests).
    async fn hashing<T: Send + 'static>(&self, f: impl FnOnce(&Hasher) -> T + Send + 'static) -> Result<T, ApiError> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.settings.hash_concurrency + self.settings.hash_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::unavailable("too many sign-ins at once; try again in a second"));
        }
        let permit = self.hashing.clone().acquire_owned().await;
        let hasher = self.hasher.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&hasher)
        })
        .await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        out.map_err(|e| ApiError::internal(format!("password hashing stopped: {e}")))
    }

    /// A new password for `user`: the policy, then not one of the last five.
    async fn new_password_hash(&self, user: &User, password: &str) -> Result<String, ApiError> {
        password::check(password, &user.username, &user.display_name, self.settings.min_score).map_err(|r| ApiError::new(hyper::StatusCode::UNPROCESSABLE_ENTITY, "business-rule", r.to_string()))?;
        let mut history = user.password_history.clone();
        history.extend(user.password.clone());
        let (pw, salt) = (password.to_string(), random::<16>()?);
        let (reused, hash) = self.hashing(move |h| (h.matches_any(&history, &pw), h.hash(&pw, salt))).await?;
        if reused {
            return Err(ApiError::new(hyper::StatusCode::UNPROCESSABLE_ENTITY, "business-rule", password::Rejection::Reused.to_string()));
        }
        hash.map_err(ApiError::internal)
    }

    fn set_password(user: &mut User, hash: String, now: i64) {
        if let Some(old) = user.password.take() {
            user.password_history.insert(0, old);
            user.password_history.truncate(password::HISTORY - 1);
        }
        user.password = Some(hash);
        user.password_changed = Some(now);
    }

    async fn pending(&self, token: &str, now: i64) -> Result<User, ApiError> {
        let invalid = || ApiError::unauthorized("the enrollment token is not valid or has expired; ask an admin for a new one");
        if !codes::is_token(ENROLLMENT_PREFIX, token) {
            return Err(invalid());
        }
        let hash = codes::secret_hash(token);
        let row = self.store.user_by_enrollment(&hash).await?.ok_or_else(invalid)?;
        let user = self.open(row)?;
        if user.enrollment_hash != Some(hash) {
            tracing::error!(user_id = %user.id, "enrollment index does not match the sealed record: altered outside Valv");
            return Err(invalid());
        }
        if user.state != UserState::Pending || user.enrollment_expires.is_none_or(|t| now >= t) {
            return Err(invalid());
        }
        Ok(user)
    }

    /// Enrollment step one: the person sets their password and gets a TOTP secret to scan. An
    /// enrollment issued over the admin API also needs the approval code of a second admin.
    pub async fn enroll(&self, token: &str, approval: Option<&str>, new_password: &str, now: i64) -> Result<Enrolled, ApiError> {
        let mut user = self.pending(token, now).await?;
        if user.enrollment_by.is_some() {
            let given = approval.filter(|a| codes::is_token(APPROVAL_PREFIX, a)).map(codes::secret_hash);
            match (user.approval_hash, given) {
                (Some(want), Some(got)) if want == got => {}
                (None, _) => return Err(ApiError::forbidden("this account awaits a second admin's approval (POST /admin/users/{name}/approve); enroll with the approval code that admin receives")),
                _ => return Err(ApiError::unauthorized("the approval code is missing or not valid; ask the approving admin for it")),
            }
        }
        // After an MFA reset the person may keep their password by giving it again.
        let current = user.password.clone();
        let pw = new_password.to_string();
        let keeps_current = match current {
            Some(phc) => self.hashing(move |h| h.verify(&phc, &pw)).await?,
            None => false,
        };
        if !keeps_current {
            let hash = self.new_password_hash(&user, new_password).await?;
            Self::set_password(&mut user, hash, now);
        }
        let secret = random::<{ totp::SECRET_LEN }>()?;
        user.totp_secret = Some(valv_crypto::hex::encode(&secret));
        user.totp_confirmed = false;
        self.save(&mut user).await?;
        let uri = totp::otpauth_uri(&self.settings.issuer, &user.username, &secret);
        Ok(Enrolled { user, otpauth_uri: uri, secret_base32: totp::base32(&secret) })
    }

    /// Enrollment step two: a first code proves the app holds the secret; the account becomes
    /// active and the person receives their recovery codes (shown once).
    pub async fn confirm(&self, token: &str, code: &str, now: i64) -> Result<(User, Vec<String>), ApiError> {
        let mut user = self.pending(token, now).await?;
        let secret = user.totp_secret.as_deref().and_then(valv_crypto::hex::decode).filter(|_| user.password.is_some());
        let Some(secret) = secret else {
            return Err(ApiError::bad_request("set a password first (POST /auth/enroll with the token and a password)"));
        };
        let step = totp::verify(&secret, code, now, user.totp_last_step).ok_or_else(|| ApiError::unauthorized("the code is not correct; check the authenticator app's clock"))?;
        let codes = self.activate(&mut user, step)?;
        self.save(&mut user).await?;
        Ok((user, codes))
    }

    fn activate(&self, user: &mut User, step: u64) -> Result<Vec<String>, ApiError> {
        let mut randoms = [[0u8; 10]; codes::RECOVERY_CODES];
        for r in &mut randoms {
            *r = random()?;
        }
        let recovery = codes::recovery_codes(&randoms);
        user.recovery = recovery.iter().map(|c| valv_crypto::hex::encode(&codes::stored_recovery_hash(c))).collect();
        user.totp_confirmed = true;
        user.totp_last_step = Some(step);
        user.state = UserState::Active;
        user.enrollment_expires = None;
        user.enrollment_hash = None;
        user.enrollment_by = None;
        user.approval_hash = None;
        Ok(recovery)
    }

    /// Scripted provisioning (`valv user add --password-stdin`): password set and TOTP enrolled
    /// at once. Returns the otpauth URI and the recovery codes.
    pub async fn provision(&self, username: &str, new_password: &str, now: i64) -> Result<(String, Vec<String>), ApiError> {
        let mut user = self.get(username).await?;
        if user.state != UserState::Pending {
            return Err(ApiError::bad_request(format!("'{username}' is already enrolled")));
        }
        let hash = self.new_password_hash(&user, new_password).await?;
        Self::set_password(&mut user, hash, now);
        let secret = random::<{ totp::SECRET_LEN }>()?;
        user.totp_secret = Some(valv_crypto::hex::encode(&secret));
        // No code has been used yet: the first login may use the current one.
        let codes = self.activate(&mut user, 0)?;
        user.totp_last_step = None;
        self.save(&mut user).await?;
        Ok((totp::otpauth_uri(&self.settings.issuer, &user.username, &secret), codes))
    }

    /// Signs a person in. Every failure takes the same path through a password hash and returns
    /// the same answer; only the audit entry says why.
    pub async fn login(&self, attempt: &Login, now: i64) -> Result<LoginOutcome, ApiError> {
        let user = if account::check_username(&attempt.username).is_ok() { self.find(&attempt.username).await? } else { None };
        let stored = user.as_ref().and_then(|u| u.password.clone()).unwrap_or_else(|| self.decoy.clone());
        // No password is longer than the policy allows; a huge one is hashed as a short wrong one.
        let pw = if attempt.password.len() > 4 * password::MAX_LENGTH { String::from("\u{0}") } else { attempt.password.clone() };
        let password_ok = self.hashing(move |h| h.verify(&stored, &pw)).await?;
        let Some(mut user) = user else {
            return Ok(LoginOutcome::Failed { user: None, reason: "unknown-user", locked_now: false });
        };
        let refuse = |reason| LoginOutcome::Failed { user: None, reason, locked_now: false };
        if user.state == UserState::Disabled {
            return Ok(with_user(refuse("disabled"), user));
        }
        if user.state == UserState::Pending {
            return Ok(with_user(refuse("not-enrolled"), user));
        }
        if user.failures.locked(now) {
            return Ok(with_user(refuse("locked"), user));
        }
        let (second_factor, used_recovery) = if !password_ok {
            (Err("wrong-password"), false)
        } else {
            self.second_factor(&mut user, attempt, now)
        };
        if let Err(reason) = second_factor {
            return self.failed(user, reason, now).await;
        }
        if self.password_expired(&user, now) {
            return Ok(with_user(refuse("password-expired"), user));
        }
        user.failures = Failures::default();
        match self.save(&mut user).await {
            Ok(()) => {}
            // Another sign-in changed the account meanwhile (it may have used this very code):
            // this one fails like any other, without telling why.
            Err(e) if e.status == hyper::StatusCode::CONFLICT => return Ok(with_user(refuse("concurrent-sign-in"), user)),
            Err(e) => return Err(e),
        }
        // Ended sessions are not kept: their rows would be a history of sign-in times.
        let _ = self.store.delete_sessions_before(now - self.settings.session.absolute_ms).await;
        let token = codes::token(SESSION_PREFIX, &random()?);
        let hash = codes::secret_hash(&token);
        let mac = self.session_mac(&hash, &user.id, now);
        self.store.insert_session(&SessionRow { token_hash: hash, user_id: user.id.clone(), created: now, last_seen: now, mac }).await?;
        let expires_in = self.settings.session.expires_in_secs(now, now);
        Ok(LoginOutcome::Ok { user, token, expires_in, used_recovery })
    }

    /// Checks the TOTP code or recovery code (and consumes it); `Err(reason)` if missing or wrong.
    fn second_factor(&self, user: &mut User, attempt: &Login, now: i64) -> (Result<(), &'static str>, bool) {
        if let Some(code) = attempt.recovery_code.as_deref() {
            let found = codes::recovery_hash(code).map(|h| valv_crypto::hex::encode(&h)).and_then(|h| user.recovery.iter().position(|r| *r == h));
            return match found {
                Some(i) => {
                    user.recovery.remove(i);
                    (Ok(()), true)
                }
                None => (Err("wrong-recovery-code"), false),
            };
        }
        let needs = account::mfa_required(&user.roles, self.settings.mfa_for_all) || user.totp_confirmed;
        let secret = user.totp_secret.as_deref().and_then(valv_crypto::hex::decode);
        match (attempt.totp.as_deref(), secret) {
            (None, _) if !needs => (Ok(()), false),
            (None, _) => (Err("totp-missing"), false),
            (Some(_), None) => (Err("totp-not-enrolled"), false),
            (Some(code), Some(secret)) => match totp::verify(&secret, code, now, user.totp_last_step) {
                Some(step) => {
                    user.totp_last_step = Some(step);
                    (Ok(()), false)
                }
                None => (Err("wrong-or-reused-totp"), false),
            },
        }
    }

    /// Whether `user`'s password is past the configured maximum age (never, when none is set).
    pub fn password_expired(&self, user: &User, now: i64) -> bool {
        self.settings.max_password_age_days > 0 && user.password_changed.is_some_and(|t| now - t > i64::from(self.settings.max_password_age_days) * 86_400_000)
    }

    /// Spends the time of a password check on nothing (answers about unknown accounts must take
    /// as long as answers about real ones).
    pub async fn decoy_check(&self, password: &str) -> Result<(), ApiError> {
        let (decoy, pw) = (self.decoy.clone(), password.chars().take(password::MAX_LENGTH).collect::<String>());
        self.hashing(move |h| h.verify(&decoy, &pw)).await.map(|_| ())
    }

    /// Counts a failed attempt by other means than login (a password change without a session);
    /// returns whether it locked the account.
    pub async fn count_failure(&self, user: User, now: i64) -> Result<bool, ApiError> {
        match self.failed(user, "wrong-credentials", now).await? {
            LoginOutcome::Failed { locked_now, .. } => Ok(locked_now),
            LoginOutcome::Ok { .. } => Ok(false),
        }
    }

    /// Counts a failure (locking the account at the threshold).
    async fn failed(&self, mut user: User, reason: &'static str, now: i64) -> Result<LoginOutcome, ApiError> {
        for _ in 0..5 {
            // An attempt that raced with the one that locked the account does not count again.
            if user.failures.locked(now) {
                return Ok(LoginOutcome::Failed { user: Some(user), reason: "locked", locked_now: false });
            }
            let (failures, locked_now) = self.settings.lockout.after_failure(user.failures, now);
            user.failures = failures;
            match self.save(&mut user).await {
                Ok(()) => return Ok(LoginOutcome::Failed { user: Some(user), reason, locked_now }),
                Err(e) if e.status == hyper::StatusCode::CONFLICT => {
                    // Another attempt updated the record first: count on top of it.
                    user = self.by_id(&user.id).await?.ok_or_else(|| ApiError::internal("user vanished"))?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::unavailable("the account is busy; try again"))
    }

    fn session_mac(&self, hash: &[u8; 32], user_id: &str, created: i64) -> Vec<u8> {
        self.macs.tag("session", &[hash, user_id.as_bytes(), &created.to_be_bytes()])
    }

    /// The user behind a session token, if the session is valid at `now`; records activity.
    pub async fn session(&self, token: &str, now: i64) -> Result<User, &'static str> {
        if !codes::is_token(SESSION_PREFIX, token) {
            return Err("malformed-token");
        }
        let hash = codes::secret_hash(token);
        let row = match self.store.session(&hash).await {
            Ok(Some(row)) => row,
            Ok(None) => return Err("unknown-session"),
            Err(_) => return Err("storage"),
        };
        if !self.macs.verify("session", &[&hash, row.user_id.as_bytes(), &row.created.to_be_bytes()], &row.mac) {
            tracing::error!(user_id = %row.user_id, "session row fails its MAC: inserted or altered outside Valv");
            return Err("forged-session");
        }
        let last_seen = self.activity.lock().map(|a| a.get(&hash).map_or(row.last_seen, |(_, seen)| (*seen).max(row.last_seen))).unwrap_or(row.last_seen);
        match self.settings.session.state(row.created, last_seen, now) {
            SessionState::Active => {}
            SessionState::Idle => return Err(self.end(&hash, "idle-timeout").await),
            SessionState::Expired => return Err(self.end(&hash, "session-expired").await),
        }
        let user = match self.by_id(&row.user_id).await {
            Ok(Some(u)) => u,
            Ok(None) => return Err("unknown-user"),
            Err(_) => return Err("storage"),
        };
        if user.state != UserState::Active || row.created < user.sessions_valid_after {
            return Err(self.end(&hash, "session-revoked").await);
        }
        self.note_activity(hash, row.last_seen, now).await;
        Ok(user)
    }

    async fn end(&self, hash: &[u8; 32], reason: &'static str) -> &'static str {
        let _ = self.store.delete_session(hash).await;
        if let Ok(mut a) = self.activity.lock() {
            a.remove(hash);
        }
        reason
    }

    async fn note_activity(&self, hash: [u8; 32], stored: i64, now: i64) {
        let write = match self.activity.lock() {
            Ok(mut a) => {
                let entry = a.entry(hash).or_insert((stored, stored));
                entry.1 = entry.1.max(now);
                let due = now - entry.0 >= TOUCH_EVERY_MS;
                if due {
                    entry.0 = now;
                }
                due
            }
            Err(_) => true,
        };
        if write {
            let _ = self.store.touch_session(&hash, now).await;
        }
    }

    /// Ends the session of `token`.
    pub async fn logout(&self, token: &str) -> Result<bool, ApiError> {
        let hash = codes::secret_hash(token);
        if let Ok(mut a) = self.activity.lock() {
            a.remove(&hash);
        }
        Ok(self.store.delete_session(&hash).await?)
    }

    /// A signed-in user changes their password (the current one and a TOTP code are asked
    /// again); every session of theirs ends.
    pub async fn change_password(&self, user: &User, current: &str, new: &str, code: Option<&str>, now: i64) -> Result<(), ApiError> {
        let mut user = self.by_id(&user.id).await?.ok_or_else(|| ApiError::unauthorized("no such user"))?;
        let stored = user.password.clone().unwrap_or_else(|| self.decoy.clone());
        let pw = current.to_string();
        if !self.hashing(move |h| h.verify(&stored, &pw)).await? {
            return Err(ApiError::forbidden("the current password is not correct"));
        }
        if user.totp_confirmed {
            let secret = user.totp_secret.as_deref().and_then(valv_crypto::hex::decode).unwrap_or_default();
            let step = code.and_then(|c| totp::verify(&secret, c, now, user.totp_last_step)).ok_or_else(|| ApiError::forbidden("a current TOTP code is needed to change the password"))?;
            user.totp_last_step = Some(step);
        }
        let hash = self.new_password_hash(&user, new).await?;
        Self::set_password(&mut user, hash, now);
        user.sessions_valid_after = now + 1;
        self.save(&mut user).await?;
        self.store.delete_sessions_of(&user.id).await?;
        Ok(())
    }

    /// An admin change to a user (`disable`, `enable`, `unlock`, `reset-mfa`,
    /// `revoke-sessions`). Returns the user after the change and, for `reset-mfa`, a new
    /// enrollment token.
    /// `by`: the admin principal making the change over the API (`None` at the console). Over
    /// the API an MFA reset's new enrollment needs another admin's approval, and roles or units
    /// that widen the account wait in `pending_roles` for it; narrowing takes effect at once.
    pub async fn admin(&self, username: &str, change: AdminChange, now: i64, by: Option<&str>) -> Result<(User, Option<String>), ApiError> {
        self.change_user(username, now, |user| {
            let mut token = None;
            match &change {
                AdminChange::Disable => {
                    user.state = UserState::Disabled;
                    user.sessions_valid_after = now + 1;
                }
                AdminChange::Enable => {
                    if user.state == UserState::Disabled {
                        user.state = if user.totp_confirmed { UserState::Active } else { UserState::Pending };
                    }
                }
                AdminChange::Unlock => user.failures = Failures::default(),
                AdminChange::ResetMfa => {
                    let t = codes::token(ENROLLMENT_PREFIX, &random()?);
                    user.totp_secret = None;
                    user.totp_confirmed = false;
                    user.totp_last_step = None;
                    user.recovery.clear();
                    user.state = UserState::Pending;
                    user.enrollment_expires = Some(now + self.settings.enrollment_ttl_ms);
                    user.enrollment_hash = Some(codes::secret_hash(&t));
                    user.enrollment_by = by.map(str::to_string);
                    user.approval_hash = None;
                    user.sessions_valid_after = now + 1;
                    token = Some(t);
                }
                AdminChange::RevokeSessions => user.sessions_valid_after = now + 1,
                AdminChange::SetRoles { roles, units } => {
                    account::check_roles(roles).map_err(ApiError::bad_request)?;
                    for unit in units {
                        account::check_unit(unit).map_err(ApiError::bad_request)?;
                    }
                    if roles.iter().any(|r| r == "patient") != user.patient.is_some() {
                        return Err(ApiError::bad_request("role 'patient' belongs only to a user linked to a Patient"));
                    }
                    let widens = roles.iter().any(|r| !user.roles.contains(r)) || units.iter().any(|u| !user.units.contains(u));
                    match by {
                        Some(admin) if widens => {
                            user.pending_roles = Some(PendingRoles { roles: roles.clone(), units: units.clone(), requested_by: admin.to_string(), requested_at: now });
                        }
                        _ => {
                            user.roles = roles.clone();
                            user.units = units.clone();
                            user.pending_roles = None;
                            user.sessions_valid_after = now + 1;
                        }
                    }
                }
            }
            Ok(token)
        })
        .await
    }

    /// Applies `change` to the stored account and saves it (compare-and-set on its version,
    /// retried against concurrent changes); ends the account's sessions when the change says so.
    async fn change_user<R>(&self, username: &str, now: i64, mut change: impl FnMut(&mut User) -> Result<R, ApiError>) -> Result<(User, R), ApiError> {
        for _ in 0..5 {
            let mut user = self.get(username).await?;
            let out = change(&mut user)?;
            match self.save(&mut user).await {
                Ok(()) => {
                    if user.sessions_valid_after > now {
                        self.store.delete_sessions_of(&user.id).await?;
                    }
                    return Ok((user, out));
                }
                Err(e) if e.status == hyper::StatusCode::CONFLICT => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::unavailable("the user record is busy; try again"))
    }

    /// A second admin's approval (`approver`: their principal id): of a pending enrollment
    /// issued over the API (returns the approval code the person enrolls with, shown once), or
    /// of a pending change of roles and units. No one approves what they asked for themselves,
    /// nor anything about their own account.
    pub async fn approve(&self, username: &str, approver: &str, now: i64) -> Result<(User, Option<String>), ApiError> {
        let refuse = |m: &str| ApiError::forbidden(m.to_string());
        self.change_user(username, now, |user| {
            if user.id == approver {
                return Err(refuse("no one approves their own account (two-person rule)"));
            }
            let mut code = None;
            if user.awaits_approval() {
                if user.enrollment_by.as_deref() == Some(approver) {
                    return Err(refuse("the admin who issued this enrollment cannot also approve it (two-person rule)"));
                }
                if user.enrollment_expires.is_none_or(|t| now >= t) {
                    return Err(ApiError::new(hyper::StatusCode::CONFLICT, "business-rule", "the enrollment has expired; reset the account's MFA to issue a new one"));
                }
                let c = codes::token(APPROVAL_PREFIX, &random()?);
                user.approval_hash = Some(codes::secret_hash(&c));
                code = Some(c);
            } else if let Some(p) = user.pending_roles.take() {
                if p.requested_by == approver {
                    return Err(refuse("the admin who asked for this change of roles cannot also approve it (two-person rule)"));
                }
                user.roles = p.roles;
                user.units = p.units;
                user.sessions_valid_after = now + 1;
            } else {
                return Err(ApiError::new(hyper::StatusCode::CONFLICT, "business-rule", format!("nothing about '{username}' awaits approval")));
            }
            Ok(code)
        })
        .await
    }

    /// Takes a token from `address`'s bucket: `Err(seconds)` when it must wait, and whether this
    /// is the first refusal since the address was last let through (to audit once per burst).
    pub fn rate_limit(&self, address: &str, now: i64) -> Result<(), (u64, bool)> {
        let rate = self.settings.rate;
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, (b, _)| !b.is_full(rate, now));
        }
        if buckets.len() >= MAX_BUCKETS {
            return Err((60, false));
        }
        let (bucket, refusing) = buckets.entry(address.to_string()).or_insert((Bucket::full(rate, now), false));
        match bucket.take(rate, now) {
            Ok(()) => {
                *refusing = false;
                Ok(())
            }
            Err(wait) => {
                let first = !*refusing;
                *refusing = true;
                Err((wait, first))
            }
        }
    }
}

fn with_user(outcome: LoginOutcome, user: User) -> LoginOutcome {
    match outcome {
        LoginOutcome::Failed { reason, locked_now, .. } => LoginOutcome::Failed { user: Some(user), reason, locked_now },
        ok => ok,
    }
}

/// What an admin may change.
#[derive(Debug, Clone)]
pub enum AdminChange {
    Disable,
    Enable,
    Unlock,
    ResetMfa,
    RevokeSessions,
    SetRoles { roles: Vec<String>, units: Vec<String> },
}

impl AdminChange {
    /// The audit interaction name.
    pub fn interaction(&self) -> &'static str {
        match self {
            AdminChange::Disable => "user-disable",
            AdminChange::Enable => "user-enable",
            AdminChange::Unlock => "user-unlock",
            AdminChange::ResetMfa => "user-reset-mfa",
            AdminChange::RevokeSessions => "user-revoke-sessions",
            AdminChange::SetRoles { .. } => "user-set-roles",
        }
    }
}
