//! The manifest: what a backup holds, signed by the log's checkpoint key as a C2SP note, so that
//! a restore can check it got everything, from this server, unchanged:
//!
//! ```text
//! valv backup v1
//! <origin>
//! created <ms since the epoch>
//! source <backend>
//! payload <sha256 hex of every byte before the manifest> <their length>
//! audit <tree size> <root hex>
//! checkpoint <size> <root hex>          (or: checkpoint none)
//! ledger <erasures> <sha256 hex of their lines>
//! table <name> <rows>                   (one per table, sorted)
//! type <resource type> <resources>      (one per type, sorted)
//! kek <provider> <kek id or -> <version> <data keys>
//! ```

use crate::frame::Digest32;
use crate::BackupError;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use valv_audit::ledger::Erasure;
use valv_audit::note::{self, Signer, Verifier};

const HEADER: &str = "valv backup v1";

/// The data keys wrapped under one KEK version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KekCount {
    pub provider: String,
    pub kek_id: String,
    pub version: u32,
    pub keys: u64,
}

/// Rows counted while a backup is written or read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub tables: BTreeMap<String, u64>,
    pub types: BTreeMap<String, u64>,
}

impl Tally {
    pub fn row(&mut self, table: &str) {
        *self.tables.entry(table.to_string()).or_default() += 1;
    }

    pub fn resource(&mut self, resource_type: &str) {
        *self.types.entry(resource_type.to_string()).or_default() += 1;
    }
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub origin: String,
    pub created: i64,
    pub source: String,
    pub payload: Digest32,
    pub audit_size: u64,
    pub audit_root: [u8; 32],
    /// The latest signed checkpoint in the backup (size, root).
    pub checkpoint: Option<(u64, [u8; 32])>,
    /// How many erasures the backup's ledger holds, and the hash of their lines.
    pub ledger: (u64, [u8; 32]),
    pub tally: Tally,
    pub keks: Vec<KekCount>,
}

/// The head of an erasure ledger: its length and the SHA-256 of its `seq patient time` lines.
pub fn ledger_head(erasures: &[Erasure]) -> (u64, [u8; 32]) {
    let mut h = Sha256::new();
    for e in erasures {
        h.update(format!("{} {} {}\n", e.seq, e.patient, e.erased_at).as_bytes());
    }
    (erasures.len() as u64, h.finalize().into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A word of the manifest: no white space, not empty.
fn word(s: &str) -> Result<&str, BackupError> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(BackupError::Manifest(format!("'{s}' cannot be written in a manifest")));
    }
    Ok(s)
}

impl Manifest {
    pub fn to_text(&self) -> Result<String, BackupError> {
        let mut t = format!("{HEADER}\n{}\ncreated {}\nsource {}\n", word(&self.origin)?, self.created, word(&self.source)?);
        t += &format!("payload {} {}\n", hex(&self.payload.sha256), self.payload.bytes);
        t += &format!("audit {} {}\n", self.audit_size, hex(&self.audit_root));
        match &self.checkpoint {
            Some((size, root)) => t += &format!("checkpoint {size} {}\n", hex(root)),
            None => t += "checkpoint none\n",
        }
        t += &format!("ledger {} {}\n", self.ledger.0, hex(&self.ledger.1));
        for (name, n) in &self.tally.tables {
            t += &format!("table {} {n}\n", word(name)?);
        }
        for (name, n) in &self.tally.types {
            t += &format!("type {} {n}\n", word(name)?);
        }
        for k in &self.keks {
            let id = if k.kek_id.is_empty() { "-" } else { word(&k.kek_id)? };
            t += &format!("kek {} {id} {} {}\n", word(&k.provider)?, k.version, k.keys);
        }
        Ok(t)
    }

    pub fn sign(&self, signer: &Signer) -> Result<String, BackupError> {
        note::sign(&self.to_text()?, &[signer]).map_err(|e| BackupError::Manifest(e.to_string()))
    }

    /// Checks the signature by one of `verifiers` (the log's checkpoint keys) and parses.
    pub fn open(signed: &str, verifiers: &[Verifier]) -> Result<Self, BackupError> {
        let note = note::open(signed, verifiers)
            .map_err(|e| BackupError::Manifest(format!("its signature does not verify with this server's checkpoint key ({e})")))?;
        Manifest::parse(note.text())
    }

    fn parse(text: &str) -> Result<Self, BackupError> {
        let bad = |why: &str| BackupError::Manifest(why.to_string());
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(bad("not a Valv backup manifest"));
        }
        let origin = lines.next().ok_or_else(|| bad("no origin"))?.to_string();
        let mut m = Manifest {
            origin,
            created: 0,
            source: String::new(),
            payload: Digest32 { sha256: [0; 32], bytes: 0 },
            audit_size: 0,
            audit_root: [0; 32],
            checkpoint: None,
            ledger: (0, [0; 32]),
            tally: Tally::default(),
            keks: Vec::new(),
        };
        let num = |s: Option<&str>| s.and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| bad("a number is missing or malformed"));
        let h32 = |s: Option<&str>| s.and_then(unhex32).ok_or_else(|| bad("a hash is missing or malformed"));
        let mut seen = std::collections::BTreeSet::new();
        for line in lines {
            let mut f = line.split(' ');
            let key = f.next().unwrap_or_default();
            if !matches!(key, "table" | "type" | "kek") && !seen.insert(key.to_string()) {
                return Err(bad("a line appears twice"));
            }
            match key {
                "created" => m.created = f.next().and_then(|s| s.parse().ok()).ok_or_else(|| bad("bad creation time"))?,
                "source" => m.source = f.next().ok_or_else(|| bad("no source"))?.to_string(),
                "payload" => m.payload = Digest32 { sha256: h32(f.next())?, bytes: num(f.next())? },
                "audit" => (m.audit_size, m.audit_root) = (num(f.next())?, h32(f.next())?),
                "checkpoint" => {
                    m.checkpoint = match f.next() {
                        Some("none") => None,
                        size => Some((num(size)?, h32(f.next())?)),
                    }
                }
                "ledger" => m.ledger = (num(f.next())?, h32(f.next())?),
                "table" | "type" => {
                    let name = f.next().ok_or_else(|| bad("a count without a name"))?.to_string();
                    let n = num(f.next())?;
                    let map = if key == "table" { &mut m.tally.tables } else { &mut m.tally.types };
                    if map.insert(name, n).is_some() {
                        return Err(bad("a count appears twice"));
                    }
                }
                "kek" => {
                    let provider = f.next().ok_or_else(|| bad("a KEK line without a provider"))?.to_string();
                    let kek_id = match f.next() {
                        Some("-") => String::new(),
                        Some(id) => id.to_string(),
                        None => return Err(bad("a KEK line without an id")),
                    };
                    let version = u32::try_from(num(f.next())?).map_err(|_| bad("a KEK version out of range"))?;
                    m.keks.push(KekCount { provider, kek_id, version, keys: num(f.next())? });
                }
                _ => return Err(bad("an unknown line")),
            }
            if f.next().is_some() {
                return Err(bad("a line has extra fields"));
            }
        }
        for required in ["created", "source", "payload", "audit", "checkpoint", "ledger"] {
            if !seen.contains(required) {
                return Err(BackupError::Manifest(format!("no '{required}' line")));
            }
        }
        Ok(m)
    }

    /// How `found` (what a restore read) differs from what the manifest states, in words.
    pub fn differences(&self, found: &Tally) -> Vec<String> {
        let mut out = Vec::new();
        for (what, stated, got) in [("table", &self.tally.tables, &found.tables), ("resource type", &self.tally.types, &found.types)] {
            for name in stated.keys().chain(got.keys()).collect::<std::collections::BTreeSet<_>>() {
                let (s, g) = (stated.get(name).copied().unwrap_or(0), got.get(name).copied().unwrap_or(0));
                if s != g {
                    out.push(format!("{what} {name}: the manifest states {s}, the backup holds {g}"));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut tally = Tally::default();
        tally.row("resources");
        tally.row("resources");
        tally.resource("Patient");
        tally.resource("Observation");
        Manifest {
            origin: "valv.example/audit/abc".into(),
            created: 1_700_000_000_000,
            source: "sqlite".into(),
            payload: Digest32 { sha256: [7; 32], bytes: 1234 },
            audit_size: 42,
            audit_root: [1; 32],
            checkpoint: Some((40, [2; 32])),
            ledger: ledger_head(&[Erasure { seq: 1, patient: "p1".into(), erased_at: 5 }]),
            tally,
            keks: vec![KekCount { provider: "file".into(), kek_id: "file-00".into(), version: 2, keys: 9 }, KekCount { provider: "file".into(), kek_id: String::new(), version: 1, keys: 1 }],
        }
    }

    fn signer() -> Signer {
        Signer::new("valv.example/audit/abc", &[9; 32]).expect("test")
    }

    #[test]
    fn a_signed_manifest_opens_to_itself() {
        let m = sample();
        let signed = m.sign(&signer()).expect("test");
        assert_eq!(Manifest::open(&signed, &[signer().verifier()]).expect("test"), m);
    }

    #[test]
    fn another_key_or_an_edit_is_refused() {
        let signed = sample().sign(&signer()).expect("test");
        let other = Signer::new("valv.example/audit/abc", &[8; 32]).expect("test");
        assert!(Manifest::open(&signed, &[other.verifier()]).is_err());
        let edited = signed.replace("audit 42", "audit 41");
        assert!(Manifest::open(&edited, &[signer().verifier()]).is_err());
    }

    #[test]
    fn differences_name_each_count() {
        let m = sample();
        let mut found = m.tally.clone();
        found.resource("Patient");
        found.tables.remove("resources");
        let d = m.differences(&found);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().any(|s| s.contains("table resources: the manifest states 2, the backup holds 0")));
        assert!(d.iter().any(|s| s.contains("resource type Patient: the manifest states 1, the backup holds 2")));
        assert!(m.differences(&m.tally).is_empty());
    }

    #[test]
    fn malformed_manifests_are_refused() {
        for text in ["valv backup v1\no\ncreated 1\n", "nope\n", "valv backup v1\no\ncreated 1\ncreated 2\n"] {
            assert!(Manifest::parse(text).is_err(), "{text}");
        }
        let t = sample().to_text().expect("test");
        assert!(Manifest::parse(&t.replace("source sqlite", "source sqlite extra")).is_err());
        assert_eq!(Manifest::parse(&t).expect("test"), sample());
    }
}
