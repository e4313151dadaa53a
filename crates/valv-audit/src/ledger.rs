//! The erasure ledger: the signed list of patients whose data was erased by destroying their
//! data key. A restore re-applies every erasure in the newest ledger, so an older backup never
//! brings an erased patient back. It is a C2SP signed note by the log's checkpoint key:
//!
//! ```text
//! valv erasure ledger v1
//! <origin>
//! <number of erasures>
//! <seq> <patient id> <erased at, ms since the epoch>
//! ...
//! ```
//!
//! Patient ids are server-assigned random ids (no name, no identifier); the reason and who asked
//! and approved are in the (sealed) audit entry of the erasure, not here.

use crate::note::{self, Signer, Verifier};
use crate::AuditError;

const HEADER: &str = "valv erasure ledger v1";

/// One erasure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub seq: u64,
    pub patient: String,
    pub erased_at: i64,
}

/// The whole ledger of one log (named by its origin), erasures in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pub origin: String,
    pub erasures: Vec<Erasure>,
}

fn malformed(why: &'static str) -> AuditError {
    AuditError::MalformedNote(why)
}

impl Ledger {
    /// The signed note; the signers are the log's checkpoint keys (named like the origin) —
    /// every one the log has had, so that a restore of a backup older than the newest key
    /// still checks a ledger written after it.
    pub fn sign(&self, signers: &[&Signer]) -> Result<String, AuditError> {
        let mut text = format!("{HEADER}\n{}\n{}\n", self.origin, self.erasures.len());
        for e in &self.erasures {
            if e.patient.is_empty() || e.patient.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(malformed("a patient id in the ledger has spaces or control characters"));
            }
            text.push_str(&format!("{} {} {}\n", e.seq, e.patient, e.erased_at));
        }
        note::sign(&text, signers)
    }

    /// Parses a signed ledger and checks its signature by `verifier`, its count and its order
    /// (sequence numbers 1, 2, 3, …: an entry removed from the middle or the end of a copied
    /// list no longer verifies against the count and signature).
    pub fn open(signed: &str, verifiers: &[Verifier]) -> Result<Self, AuditError> {
        let note = note::open(signed, verifiers)?;
        let mut lines = note.text().lines();
        if lines.next() != Some(HEADER) {
            return Err(malformed("not an erasure ledger"));
        }
        let origin = lines.next().ok_or(malformed("no origin"))?.to_string();
        let count: usize = lines.next().and_then(|n| n.parse().ok()).ok_or(malformed("no count"))?;
        let mut erasures = Vec::with_capacity(count.min(1 << 20));
        for (i, line) in lines.enumerate() {
            let mut f = line.split(' ');
            let (seq, patient, at) = (f.next(), f.next(), f.next());
            let seq: u64 = seq.and_then(|s| s.parse().ok()).ok_or(malformed("bad sequence number"))?;
            let erased_at: i64 = at.and_then(|s| s.parse().ok()).ok_or(malformed("bad time"))?;
            if seq != i as u64 + 1 || f.next().is_some() {
                return Err(malformed("erasures out of order"));
            }
            erasures.push(Erasure { seq, patient: patient.unwrap_or_default().to_string(), erased_at });
        }
        if erasures.len() != count {
            return Err(malformed("the count does not match the erasures"));
        }
        Ok(Ledger { origin, erasures })
    }

    pub fn contains(&self, patient: &str) -> bool {
        self.erasures.iter().any(|e| e.patient == patient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(n: u64) -> Ledger {
        Ledger { origin: "valv.example/log".into(), erasures: (1..=n).map(|seq| Erasure { seq, patient: format!("p{seq}"), erased_at: 1_700_000_000_000 + seq as i64 }).collect() }
    }

    #[test]
    fn round_trip_and_tampering() {
        let signer = Signer::new("valv.example/log", &[7; 32]).expect("signer");
        let l = ledger(3);
        let signed = l.sign(&[&signer]).expect("sign");
        assert_eq!(Ledger::open(&signed, &[signer.verifier()]).expect("open"), l);
        assert!(l.contains("p2") && !l.contains("p4"));
        // An entry dropped, a signature by another key, an empty ledger: each refused or distinct.
        let dropped = signed.replace("2 p2 1700000000002\n", "");
        assert!(Ledger::open(&dropped, &[signer.verifier()]).is_err());
        let other = Signer::new("valv.example/log", &[8; 32]).expect("signer");
        assert!(Ledger::open(&signed, &[other.verifier()]).is_err());
        let empty = ledger(0).sign(&[&signer]).expect("sign");
        assert_eq!(Ledger::open(&empty, &[signer.verifier()]).expect("open").erasures.len(), 0);
        assert!(Ledger { origin: "o".into(), erasures: vec![Erasure { seq: 1, patient: "a b".into(), erased_at: 0 }] }.sign(&[&signer]).is_err());
    }
}
