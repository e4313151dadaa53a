//! Addresses blocked from an incident: every request from one is refused (403) before it is
//! routed, on every server sharing the store. Each server holds the list in memory and reads
//! it again every [`REFRESH`] (and at once after blocking on this server), so a block made on
//! another server or at the console takes effect within that time.
//!
//! A block is a case of kind `block` (id: the address with `:` written `-`), sealed like the
//! others; lifting it is a new version marked lifted.

use super::{load, load_all, save, Actor};
use crate::error::ApiError;
use crate::App;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub const KIND: &str = "block";
/// How often each server reads the blocked addresses again.
pub const REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Block {
    pub address: IpAddr,
    pub incident: String,
    pub by: String,
    pub at: i64,
    #[serde(default)]
    pub lifted: Option<(String, i64)>,
}

/// The addresses refused now (address → the incident that blocked it).
#[derive(Debug, Default)]
pub struct Blocked(RwLock<HashMap<IpAddr, String>>);

impl Blocked {
    /// The incident blocking `ip`, if any.
    pub fn incident(&self, ip: IpAddr) -> Option<String> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(&canonical(ip)).cloned()
    }

    fn replace(&self, blocks: HashMap<IpAddr, String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = blocks;
    }
}

/// An IPv4 address reached over IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn id_of(ip: IpAddr) -> String {
    canonical(ip).to_string().replace(':', "-")
}

/// Reads the blocks from the store into `app.blocked`.
pub async fn refresh(app: &App) -> Result<(), ApiError> {
    let all: Vec<Block> = load_all(app, KIND).await?;
    app.blocked.replace(all.into_iter().filter(|b| b.lifted.is_none()).map(|b| (canonical(b.address), b.incident)).collect());
    Ok(())
}

/// Keeps `app.blocked` current.
pub fn spawn(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = refresh(&app).await {
                tracing::warn!(error = %e.diagnostics, "could not read the blocked addresses; keeping the last list");
            }
            tokio::time::sleep(REFRESH).await;
        }
    })
}

/// Blocks `ip` for `incident` (blocking it again changes nothing); what was done, in words.
pub async fn block(app: &App, actor: &Actor, ip: IpAddr, incident: &str) -> Result<String, ApiError> {
    let ip = canonical(ip);
    let id = id_of(ip);
    let now = app.clock.now_ms();
    let fresh = Block { address: ip, incident: incident.to_string(), by: actor.id.clone(), at: now, lifted: None };
    let result = match load::<Block>(app, KIND, &id).await? {
        None => save(app, KIND, &id, 1, &fresh).await.map(|()| format!("address {ip} blocked")),
        Some((b, _)) if b.lifted.is_none() => Ok(format!("address {ip} was blocked already (incident {})", b.incident)),
        Some((_, version)) => save(app, KIND, &id, version + 1, &fresh).await.map(|()| format!("address {ip} blocked again")),
    };
    // Saved: the block holds on every server within REFRESH whether or not this read succeeds.
    if let Err(e) = refresh(app).await {
        tracing::warn!(error = %e.diagnostics, "could not reread the blocked addresses after blocking one");
    }
    result
}

/// Lifts the block of `ip`.
pub async fn lift(app: &App, actor: &Actor, ip: IpAddr) -> Result<String, ApiError> {
    let ip = canonical(ip);
    let id = id_of(ip);
    let Some((mut b, version)) = load::<Block>(app, KIND, &id).await?.filter(|(b, _)| b.lifted.is_none()) else {
        return Err(ApiError::not_found(format!("address {ip} is not blocked")));
    };
    b.lifted = Some((actor.id.clone(), app.clock.now_ms()));
    save(app, KIND, &id, version + 1, &b).await?;
    refresh(app).await?;
    Ok(format!("block of address {ip} (incident {}) lifted", b.incident))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_ipv4_address_is_the_same_address() {
        let b = Blocked::default();
        b.replace(HashMap::from([(canonical("192.0.2.7".parse().expect("ip")), "i1".to_string())]));
        assert_eq!(b.incident("::ffff:192.0.2.7".parse().expect("ip")), Some("i1".into()));
        assert_eq!(b.incident("192.0.2.8".parse().expect("ip")), None);
        assert_eq!(id_of("2001:db8::1".parse().expect("ip")), "2001-db8--1");
    }
}
