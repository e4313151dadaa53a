//! The `valv keys` commands: status, rotate, rewrap, retire — what the provider holds against what
//! the stored keys need.

use valv_crypto::KeyProvider;
use valv_keys::Keys;
use valv_store::Store;

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
    /// When each checkpoint-signing key was created, key 1 first (the last one signs).
    pub signing_keys_created: Vec<i64>,
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
        signing_keys_created: signing_keys_created(store).await?,
    })
}

async fn signing_keys_created(store: &dyn Store) -> Result<Vec<i64>, String> {
    let mut created = Vec::new();
    while let Some(t) = store.key_created(&valv_server::audit::signing::key_name(created.len() + 1)).await.map_err(|e| e.to_string())? {
        created.push(t);
    }
    Ok(created)
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
            "checkpoint_signing_key": {"version": self.signing_keys_created.len(), "created": at(self.signing_keys_created.last().copied()), "age_days": self.signing_keys_created.last().map(|t| (now - t) / 86_400_000)},
            "checkpoint_signing_keys": self.signing_keys_created.iter().enumerate().map(|(i, t)| serde_json::json!({"version": i + 1, "created": at(Some(*t)), "signs": i + 1 == self.signing_keys_created.len()})).collect::<Vec<_>>(),
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
        let n = self.signing_keys_created.len();
        out.push_str(&format!("checkpoint signing key {n} (of {n}, every one published at /audit/keys) created {}", at(self.signing_keys_created.last().copied())));
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
