//! Need-to-know access at the server: the policy engine, the directory of care relationships
//! and consents it reads (kept current from every committed write), and the grants (break-glass,
//! remote support) people hold. Decisions themselves are `valv-policy`'s; this module supplies
//! their inputs and keeps grants sealed in the store. `grantapi`: `$break-glass`,
//! `/admin/break-glass` and `/admin/support-grants`.

pub mod grantapi;

use crate::people::auth::{Principal, PrincipalKind};
use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use valv_crypto::{Aad, Cipher};
use valv_policy::{Decision, Directory, Engine, Grant, GrantKind, Question, Settings, Subject};
use valv_store::vault::{Committed, Vault};
use valv_store::{GrantRow, Store};

/// Longest break-glass grant, in minutes.
pub const MAX_BREAK_GLASS_MINUTES: i64 = 480;
pub const DEFAULT_BREAK_GLASS_MINUTES: i64 = 60;
/// Longest remote-support grant, in minutes.
pub const MAX_SUPPORT_MINUTES: i64 = 60;

/// A grant as stored (sealed whole).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantRecord {
    pub id: String,
    #[serde(skip)]
    pub version: u64,
    /// `break-glass` or `support`.
    pub kind: String,
    pub user_id: String,
    pub user_name: String,
    /// Patients it covers; empty for a support grant of administration.
    pub patients: Vec<String>,
    pub reason: String,
    pub created: i64,
    /// Minutes it lasts once in force.
    pub minutes: i64,
    /// When it came into force (break-glass: at once; support: on approval).
    pub start: Option<i64>,
    pub end: Option<i64>,
    pub approved_by: Option<String>,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<i64>,
    /// Break-glass only: the auditor's review.
    pub review: Option<Review>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Review {
    pub by: String,
    pub at: i64,
    /// `justified` or `unjustified`.
    pub outcome: String,
    pub note: String,
}

impl GrantRecord {
    fn policy_grant(&self) -> Grant {
        Grant {
            id: self.id.clone(),
            kind: if self.kind == "break-glass" {
                GrantKind::BreakGlass { patient: self.patients.first().cloned().unwrap_or_default() }
            } else {
                GrantKind::Support { patients: self.patients.clone() }
            },
            approved: self.start.is_some(),
            revoked: self.revoked_at.is_some(),
            start: self.start.unwrap_or(i64::MAX),
            end: self.end.unwrap_or(i64::MIN),
        }
    }

    /// `pending` (support, awaiting approval), `active`, `expired` or `revoked`.
    pub fn status(&self, now: i64) -> &'static str {
        match (self.revoked_at, self.start, self.end) {
            (Some(_), _, _) => "revoked",
            (None, None, _) => "pending",
            (None, Some(_), Some(end)) if now >= end => "expired",
            _ => "active",
        }
    }

    pub fn to_json(&self, now: i64) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["status"] = serde_json::json!(self.status(now));
        v["review_status"] = serde_json::json!(match (&self.kind[..], &self.review) {
            ("break-glass", None) => "pending",
            ("break-glass", Some(_)) => "reviewed",
            _ => "n/a",
        });
        v
    }
}

/// One stored version of a followed type, opened: `Ok(None)` deleted, `Err(())` unreadable.
async fn open_followed(vault: &Vault, stored: &valv_store::StoredVersion, now: i64) -> Result<Option<serde_json::Value>, ()> {
    if stored.deleted {
        return Ok(None);
    }
    let bytes = vault.open_bytes(stored, now).await.map_err(|_| ())?;
    serde_json::from_slice(&bytes).map(Some).map_err(|_| ())
}

/// Applies an opened version; one that failed to authenticate leaves its patient unverified
/// rather than being skipped silently.
fn take_in(dir: &mut Directory, stored: &valv_store::StoredVersion, opened: Result<Option<serde_json::Value>, ()>) {
    let t = stored.resource_type.as_str();
    match (opened, stored.patient.as_deref()) {
        (Ok(body), _) => dir.apply(t, &stored.id, stored.version, body.as_ref()),
        (Err(()), Some(patient)) => dir.mark_unreadable(t, &stored.id, patient),
        (Err(()), None) => tracing::error!(resource_type = %t, "an organisation failed to open; its place in the provider tree is unknown"),
    }
}

/// Refreshes the directory from the store every `interval` (see [`Access::refresh`]).
pub fn spawn_refresh(app: Arc<crate::App>, interval: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = app.access.refresh(&app.vault, app.clock.now_ms()).await {
                tracing::error!(error = %e, "refreshing care relationships and consents failed; retrying");
            }
            // Erasures made by `valv erase` in another process: their keys leave the cache.
            if let Err(e) = app.vault.refresh_erasures().await {
                tracing::error!(error = %e, "reading erasures failed; retrying");
            }
        }
    })
}

pub struct Access {
    pub engine: Engine,
    pub settings: Settings,
    directory: RwLock<Directory>,
    /// Grants by (holder, grant id): every request reads its caller's grants, which are a range;
    /// grants are never deleted, so a scan of all of them would grow with the years.
    grants: RwLock<BTreeMap<(String, String), GrantRecord>>,
    store: Arc<dyn Store>,
    cipher: Cipher,
    /// Versions of each followed type taken in so far (see [`Access::refresh`]).
    seen: tokio::sync::Mutex<HashMap<&'static str, usize>>,
}

fn grant_aad(id: &str, version: u64) -> Aad<'_> {
    Aad { purpose: "grant", resource_type: "", id, version, patient: "" }
}

impl Access {
    pub fn new(engine: Engine, settings: Settings, store: Arc<dyn Store>, key: &valv_crypto::DataKey) -> Access {
        Access { engine, settings, directory: RwLock::new(Directory::default()), grants: RwLock::new(BTreeMap::new()), store, cipher: Cipher::new(key), seen: Default::default() }
    }

    /// Reads the followed resources and the grants from the store (at start). Resources are
    /// opened one by one: one that fails to authenticate leaves its patient's relationships
    /// unverified (staff are denied there) instead of keeping the whole server from starting.
    pub async fn load(&self, vault: &Vault, now: i64) -> Result<(), String> {
        let mut dir = Directory::default();
        // Counted before reading: what is committed meanwhile is taken in again by `refresh`.
        let mut seen = self.seen.lock().await;
        for t in valv_policy::directory::FOLLOWED {
            seen.insert(t, self.store.version_count(t).await.map_err(|e| e.to_string())?);
        }
        for t in valv_policy::directory::FOLLOWED {
            let filter = valv_store::Filter { resource_type: t.to_string(), ..Default::default() };
            for located in self.store.search(&filter).await.map_err(|e| e.to_string())? {
                let Some(stored) = vault.fetch(t, &located.id, None).await.map_err(|e| e.to_string())? else { continue };
                let opened = open_followed(vault, &stored, now).await;
                take_in(&mut dir, &stored, opened);
            }
        }
        let mut grants = BTreeMap::new();
        for row in self.store.grants().await.map_err(|e| e.to_string())? {
            let g = self.open(&row).map_err(|e| e.diagnostics)?;
            grants.insert((g.user_id.clone(), g.id.clone()), g);
        }
        *self.directory.write().map_err(|_| "directory lock poisoned")? = dir;
        *self.grants.write().map_err(|_| "grants lock poisoned")? = grants;
        Ok(())
    }

    /// Takes in versions of followed types committed by other processes (`valv import`, another
    /// server on the same database) since the last load or refresh. Cheap when nothing changed:
    /// one count per followed type.
    pub async fn refresh(&self, vault: &Vault, now: i64) -> Result<(), String> {
        let mut seen = self.seen.lock().await;
        for t in valv_policy::directory::FOLLOWED {
            let total = self.store.version_count(t).await.map_err(|e| e.to_string())?;
            let known = seen.get(t).copied().unwrap_or(0);
            if total == known {
                continue;
            }
            // Newest first by time; a little more than the difference covers clocks that differ
            // between processes. Versions held already are ignored by the directory.
            let (rows, _) = self.store.history(t, None, 0, total.saturating_sub(known) + 16).await.map_err(|e| e.to_string())?;
            let mut opened = Vec::with_capacity(rows.len());
            for stored in rows.iter().rev() {
                opened.push((stored, open_followed(vault, stored, now).await));
            }
            let mut dir = self.directory.write().map_err(|_| "directory lock poisoned")?;
            for (stored, o) in opened {
                take_in(&mut dir, stored, o);
            }
            drop(dir);
            seen.insert(t, total);
        }
        Ok(())
    }

    /// Takes in committed writes: a changed CareTeam or Consent counts from the next request.
    pub fn observe(&self, committed: &[Committed]) {
        if !committed.iter().any(|c| valv_policy::directory::FOLLOWED.contains(&c.resource.resource_type.as_str())) {
            return;
        }
        if let Ok(mut d) = self.directory.write() {
            for c in committed {
                let r = &c.resource;
                d.apply(&r.resource_type, &r.id, r.version, if r.deleted { None } else { r.body.as_ref() });
            }
        }
    }

    /// The policy's view of a caller, with their grants.
    pub fn subject(&self, p: &Principal) -> Subject {
        let grants = match self.grants.read() {
            Ok(g) => g.range((p.id.clone(), String::new())..).take_while(|((holder, _), _)| *holder == p.id).map(|(_, g)| g.policy_grant()).collect(),
            Err(_) => Vec::new(),
        };
        Subject {
            roles: p.roles.clone(),
            practitioner: p.practitioner.clone(),
            patient: p.patient.clone(),
            units: p.units.clone(),
            scopes: p.scopes.clone(),
            grants,
            is_service: matches!(p.kind, PrincipalKind::Service | PrincipalKind::Local),
        }
    }

    pub fn decide(&self, subject: &Subject, q: &Question<'_>) -> Decision {
        match self.directory.read() {
            Ok(d) => valv_policy::decide(&self.engine, &d, subject, q, self.settings),
            Err(_) => valv_policy::decide(&self.engine, &Directory::default(), subject, q, self.settings),
        }
    }

    pub fn may_search(&self, subject: &Subject, q: &Question<'_>) -> Decision {
        valv_policy::may_search(&self.engine, subject, q, self.settings)
    }

    pub fn decide_admin(&self, p: &Principal, area: &str, now: i64) -> Decision {
        let subject = self.subject(p);
        valv_policy::decide_admin(&self.engine, &subject, area, now, valv_policy::purpose::default_for(&p.roles))
    }

    /// A working copy of the directory holding what the given writes (type, id, new body or
    /// `None` for a deletion) bear on, for assessing their fact changes one after another; `None`
    /// when none of them is to a followed type.
    pub fn fact_scope(&self, writes: &[(&str, &str, Option<&serde_json::Value>)]) -> Result<Option<Directory>, ApiError> {
        let followed: Vec<_> = writes.iter().filter(|(t, _, _)| valv_policy::directory::FOLLOWED.contains(t)).collect();
        if followed.is_empty() {
            return Ok(None);
        }
        let d = self.directory.read().map_err(|_| ApiError::internal("the directory of care relationships is unavailable"))?;
        let mut patients: Vec<String> = Vec::new();
        for (t, id, body) in &followed {
            for p in d.patients_of(t, id, *body) {
                if !patients.contains(&p) {
                    patients.push(p);
                }
            }
        }
        let keys: Vec<(&str, &str)> = followed.iter().map(|(t, id, _)| (*t, *id)).collect();
        Ok(Some(d.scoped(&patients, &keys)))
    }

    pub fn decide_change(&self, subject: &Subject, change: &valv_policy::change::Change, action: valv_policy::Action, now: i64, purpose: &str) -> Decision {
        valv_policy::change::decide_change(&self.engine, subject, change, action, now, purpose, self.settings)
    }

    /// A copy of the directory (for `valv policy explain`).
    pub fn directory(&self) -> Directory {
        self.directory.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn seal(&self, g: &GrantRecord) -> Result<GrantRow, ApiError> {
        let json = serde_json::to_vec(g).map_err(|e| ApiError::internal(format!("grant record: {e}")))?;
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
        Ok(GrantRow { id: g.id.clone(), version: g.version, sealed: self.cipher.seal(nonce, &grant_aad(&g.id, g.version), &json) })
    }

    fn open(&self, row: &GrantRow) -> Result<GrantRecord, ApiError> {
        let altered = || ApiError::from(valv_store::StoreError::Integrity(format!("grant {} does not open (altered outside Valv)", row.id)));
        let json = self.cipher.open(&grant_aad(&row.id, row.version), &row.sealed).map_err(|_| altered())?;
        let mut g: GrantRecord = serde_json::from_slice(&json).map_err(|_| altered())?;
        if g.id != row.id {
            return Err(altered());
        }
        g.version = row.version;
        Ok(g)
    }

    /// Stores a new grant or a change to one (compare-and-set on its version), then holds it.
    async fn save(&self, mut g: GrantRecord) -> Result<GrantRecord, ApiError> {
        g.version += 1;
        self.store.put_grant(&self.seal(&g)?).await?;
        if let Ok(mut m) = self.grants.write() {
            m.insert((g.user_id.clone(), g.id.clone()), g.clone());
        }
        Ok(g)
    }

    pub fn grant(&self, id: &str) -> Option<GrantRecord> {
        self.grants.read().ok().and_then(|m| m.values().find(|g| g.id == id).cloned())
    }

    /// Grants, newest first, filtered.
    pub fn grants(&self, keep: impl Fn(&GrantRecord) -> bool) -> Vec<GrantRecord> {
        let mut out: Vec<GrantRecord> = self.grants.read().map(|m| m.values().filter(|g| keep(g)).cloned().collect()).unwrap_or_default();
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        out
    }

    /// Records a new grant for `p`, in force at once (break-glass) or once approved (support).
    pub async fn create(&self, p: &Principal, kind: &str, patients: Vec<String>, reason: String, minutes: i64, now: i64) -> Result<GrantRecord, ApiError> {
        let in_force = kind == "break-glass";
        let g = GrantRecord {
            id: valv_store::vault::new_id()?,
            version: 0,
            kind: kind.to_string(),
            user_id: p.id.clone(),
            user_name: p.name.clone(),
            patients,
            reason,
            created: now,
            minutes,
            start: in_force.then_some(now),
            end: in_force.then_some(now + minutes * 60_000),
            approved_by: None,
            revoked_by: None,
            revoked_at: None,
            review: None,
        };
        self.save(g).await
    }

    /// Applies `change` to grant `id` and stores it.
    pub async fn change(&self, id: &str, change: impl FnOnce(&mut GrantRecord) -> Result<(), ApiError>) -> Result<GrantRecord, ApiError> {
        let mut g = self.grant(id).ok_or_else(|| ApiError::not_found(format!("grant {id} is not known")))?;
        change(&mut g)?;
        self.save(g).await
    }
}
