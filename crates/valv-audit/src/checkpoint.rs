//! C2SP tlog-checkpoint v1 (<https://c2sp.org/tlog-checkpoint>) and C2SP tlog-proof v1
//! inclusion receipts (<https://c2sp.org/tlog-proof>).
//!
//! A checkpoint is the note text
//!
//! ```text
//! <origin>
//! <tree size, decimal, no leading zeros>
//! <base64 of the 32-byte root hash>
//! ```
//!
//! signed as a [signed note](crate::note) by the key whose name equals the origin.
//!
//! A receipt proves offline that a leaf is in the log:
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! [extra <base64>]
//! index <leaf index>
//! <one base64 hash per line: the inclusion proof, from the leaf's sibling up>
//!
//! <the signed checkpoint, verbatim>
//! ```
//!
//! Choices stricter than the specifications: the origin must be a valid key name (it must sign
//! the checkpoint), extension lines are refused (Valv never writes them), a checkpoint of size 0
//! must carry the empty tree's root, and base64 must be canonical.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::merkle::{self, Hash, EMPTY_ROOT};
use crate::note::{self, is_valid_key_name, Note, Signer, Verifier};
use crate::AuditError;

/// First line of a tlog-proof receipt.
pub const RECEIPT_HEADER: &str = "c2sp.org/tlog-proof@v1";

/// A log's signed statement of its size and root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log's unique name, e.g. `valv.example.org/audit/<instance-id>`; also the name of the
    /// key that signs its checkpoints.
    pub origin: String,
    /// Number of leaves in the tree.
    pub size: u64,
    /// Merkle root of the tree's first `size` leaves.
    pub root: Hash,
}

impl Checkpoint {
    /// The checkpoint's note text (three lines, each ending in a newline).
    pub fn to_note_text(&self) -> Result<String, AuditError> {
        self.check()?;
        Ok(format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        ))
    }

    /// Parses a checkpoint note text strictly (exactly three lines).
    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let body = text
            .strip_suffix('\n')
            .ok_or(AuditError::MalformedCheckpoint(
                "text must end in a newline",
            ))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root)) = (lines.next(), lines.next(), lines.next())
        else {
            return Err(AuditError::MalformedCheckpoint(
                "expected origin, size and root lines",
            ));
        };
        if lines.next().is_some() {
            return Err(AuditError::MalformedCheckpoint(
                "extension lines are not supported",
            ));
        }
        let size = parse_decimal(size).ok_or(AuditError::MalformedCheckpoint(
            "tree size must be decimal, no leading zeros",
        ))?;
        let root = decode_hash(root).ok_or(AuditError::MalformedCheckpoint(
            "root must be base64 of 32 bytes",
        ))?;
        let checkpoint = Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        };
        checkpoint.check()?;
        Ok(checkpoint)
    }

    fn check(&self) -> Result<(), AuditError> {
        if !is_valid_key_name(&self.origin) {
            return Err(AuditError::MalformedCheckpoint(
                "origin must be non-empty, without spaces, plus signs or control characters",
            ));
        }
        if self.size == 0 && self.root != EMPTY_ROOT {
            return Err(AuditError::MalformedCheckpoint(
                "an empty tree has the empty root",
            ));
        }
        Ok(())
    }
}

/// Signs a checkpoint with the log's key, whose name must equal the origin. Returns the signed
/// note.
pub fn sign_checkpoint(checkpoint: &Checkpoint, signer: &Signer) -> Result<String, AuditError> {
    if signer.name() != checkpoint.origin {
        return Err(AuditError::OriginMismatch);
    }
    note::sign(&checkpoint.to_note_text()?, &[signer])
}

/// Parses and verifies a signed checkpoint with the log's verifier keys (every key the log has
/// signed with, each named as the origin; one valid signature by any of them suffices). Other
/// signatures (e.g. witness cosignatures) are ignored.
pub fn open_checkpoint(signed: &str, log_keys: &[Verifier]) -> Result<Checkpoint, AuditError> {
    let note = Note::parse(signed)?;
    let checkpoint = Checkpoint::parse(note.text())?;
    if log_keys.is_empty() || log_keys.iter().any(|k| k.name() != checkpoint.origin) {
        return Err(AuditError::OriginMismatch);
    }
    note.verify(log_keys)?;
    Ok(checkpoint)
}

/// A C2SP tlog-proof receipt: the inclusion proof of one leaf against a signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Optional opaque data; not authenticated.
    pub extra: Option<Vec<u8>>,
    /// The leaf's index in the log.
    pub index: u64,
    /// Inclusion proof of the leaf in the checkpoint's tree.
    pub proof: Vec<Hash>,
    /// The signed checkpoint, verbatim.
    pub checkpoint: String,
}

impl Receipt {
    /// The receipt's text. The checkpoint must parse as a signed note.
    pub fn to_text(&self) -> Result<String, AuditError> {
        Note::parse(&self.checkpoint)?;
        let mut out = String::with_capacity(64 + self.proof.len() * 45 + self.checkpoint.len());
        out.push_str(RECEIPT_HEADER);
        out.push('\n');
        if let Some(extra) = &self.extra {
            if extra.is_empty() {
                return Err(AuditError::MalformedReceipt("extra data must not be empty"));
            }
            out.push_str("extra ");
            out.push_str(&STANDARD.encode(extra));
            out.push('\n');
        }
        out.push_str(&format!("index {}\n", self.index));
        for hash in &self.proof {
            out.push_str(&STANDARD.encode(hash));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint);
        Ok(out)
    }

    /// Parses a receipt strictly. The checkpoint is checked to be a well-formed signed note,
    /// not verified.
    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let rest = text
            .strip_prefix(RECEIPT_HEADER)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or(AuditError::MalformedReceipt(
                "missing c2sp.org/tlog-proof@v1 header",
            ))?;
        let (mut line, mut rest) = next_line(rest)?;
        let mut extra = None;
        if let Some(b64) = line.strip_prefix("extra ") {
            let data = STANDARD
                .decode(b64)
                .map_err(|_| AuditError::MalformedReceipt("extra data is not canonical base64"))?;
            if data.is_empty() {
                return Err(AuditError::MalformedReceipt("extra data must not be empty"));
            }
            extra = Some(data);
            (line, rest) = next_line(rest)?;
        }
        let index = line.strip_prefix("index ").and_then(parse_decimal).ok_or(
            AuditError::MalformedReceipt("expected index <decimal, no leading zeros>"),
        )?;
        let mut proof = Vec::new();
        loop {
            (line, rest) = next_line(rest)?;
            if line.is_empty() {
                break;
            }
            proof.push(decode_hash(line).ok_or(AuditError::MalformedReceipt(
                "proof hash must be base64 of 32 bytes",
            ))?);
        }
        Note::parse(rest)?;
        Ok(Receipt {
            extra,
            index,
            proof,
            checkpoint: rest.to_owned(),
        })
    }
}

/// Builds a receipt's text for leaf `index` from its inclusion proof and the signed checkpoint it
/// verifies against.
pub fn build_receipt(
    index: u64,
    proof: &[Hash],
    signed_checkpoint: &str,
) -> Result<String, AuditError> {
    Receipt {
        extra: None,
        index,
        proof: proof.to_vec(),
        checkpoint: signed_checkpoint.to_owned(),
    }
    .to_text()
}

/// Verifies a receipt: parses it, checks the checkpoint's signature with the log's verifier key,
/// and checks that `leaf_hash` is at the receipt's index in the checkpoint's tree. Returns the
/// checkpoint and the leaf index.
pub fn verify_receipt(
    text: &str,
    log_keys: &[Verifier],
    leaf_hash: &Hash,
) -> Result<(Checkpoint, u64), AuditError> {
    let receipt = Receipt::parse(text)?;
    let checkpoint = open_checkpoint(&receipt.checkpoint, log_keys)?;
    merkle::verify_inclusion(
        receipt.index,
        checkpoint.size,
        leaf_hash,
        &receipt.proof,
        &checkpoint.root,
    )?;
    Ok((checkpoint, receipt.index))
}

/// Splits off the next newline-terminated line.
fn next_line(s: &str) -> Result<(&str, &str), AuditError> {
    s.split_once('\n')
        .ok_or(AuditError::MalformedReceipt("truncated"))
}

/// An ASCII decimal without sign or leading zeros ("0" alone is fine) that fits in a u64.
fn parse_decimal(s: &str) -> Option<u64> {
    let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// Canonical base64 of exactly 32 bytes.
fn decode_hash(s: &str) -> Option<Hash> {
    STANDARD
        .decode(s)
        .ok()
        .and_then(|b| merkle::hash_from_slice(&b).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::merkle::{inclusion_proof, leaf_hash, root};

    const ORIGIN: &str = "valv.example.org/audit/test";

    fn log_signer() -> Signer {
        Signer::new(ORIGIN, &[5; 32]).unwrap()
    }

    #[test]
    fn format_parse_round_trip() {
        for (size, root) in [
            (0, EMPTY_ROOT),
            (1, [1; 32]),
            (20852163, [0xab; 32]),
            (u64::MAX, [0; 32]),
        ] {
            let cp = Checkpoint {
                origin: ORIGIN.to_owned(),
                size,
                root,
            };
            let text = cp.to_note_text().unwrap();
            assert_eq!(text.lines().count(), 3);
            assert_eq!(Checkpoint::parse(&text).unwrap(), cp);
        }
    }

    #[test]
    fn spec_example_parses() {
        let text =
            "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
        let cp = Checkpoint::parse(text).unwrap();
        assert_eq!(cp.origin, "example.com/behind-the-sofa");
        assert_eq!(cp.size, 20852163);
        assert_eq!(cp.to_note_text().unwrap(), text);
    }

    #[test]
    fn malformed_checkpoints() {
        let root = STANDARD.encode([1u8; 32]);
        let empty = STANDARD.encode(EMPTY_ROOT);
        for text in [
            format!("{ORIGIN}\n5\n{root}"),
            format!("{ORIGIN}\n05\n{root}\n"),
            format!("{ORIGIN}\n+5\n{root}\n"),
            format!("{ORIGIN}\n-1\n{root}\n"),
            format!("{ORIGIN}\n 5\n{root}\n"),
            format!("{ORIGIN}\n18446744073709551616\n{root}\n"),
            format!("{ORIGIN}\n5\n{}\n", STANDARD.encode([1u8; 31])),
            format!("{ORIGIN}\n5\n{}\n", root.trim_end_matches('=')),
            format!("{ORIGIN}\n5\n{root}\nextension\n"),
            format!("{ORIGIN}\n5\n"),
            format!("\n5\n{root}\n"),
            format!("has space\n5\n{root}\n"),
            format!("{ORIGIN}\n0\n{root}\n"),
            format!("{ORIGIN}\n\n{root}\n"),
        ] {
            assert!(Checkpoint::parse(&text).is_err(), "parsed {text:?}");
        }
        assert!(Checkpoint::parse(&format!("{ORIGIN}\n0\n{empty}\n")).is_ok());
    }

    #[test]
    fn signed_checkpoint_round_trip() {
        let signer = log_signer();
        let cp = Checkpoint {
            origin: ORIGIN.to_owned(),
            size: 3,
            root: [9; 32],
        };
        let signed = sign_checkpoint(&cp, &signer).unwrap();
        assert_eq!(open_checkpoint(&signed, &[signer.verifier()]).unwrap(), cp);
        // The key name must equal the origin.
        let other = Signer::new("other.example/log", &[5; 32]).unwrap();
        assert_eq!(
            sign_checkpoint(&cp, &other),
            Err(AuditError::OriginMismatch)
        );
        assert_eq!(
            open_checkpoint(&signed, &[other.verifier()]),
            Err(AuditError::OriginMismatch)
        );
        // A changed size breaks the signature.
        let tampered = signed.replacen("\n3\n", "\n4\n", 1);
        assert!(open_checkpoint(&tampered, &[signer.verifier()]).is_err());
    }

    #[test]
    fn receipt_round_trip_and_tampering() {
        let signer = log_signer();
        let leaves: Vec<Hash> = (0u8..13).map(|i| leaf_hash(&[i])).collect();
        let cp = Checkpoint {
            origin: ORIGIN.to_owned(),
            size: 13,
            root: root(&leaves),
        };
        let signed = sign_checkpoint(&cp, &signer).unwrap();
        let v = signer.verifier();
        for index in 0..13u64 {
            let proof = inclusion_proof(&leaves, index).unwrap();
            let text = build_receipt(index, &proof, &signed).unwrap();
            assert!(text.starts_with("c2sp.org/tlog-proof@v1\nindex "));
            let (got, i) = verify_receipt(&text, std::slice::from_ref(&v), &leaves[index as usize]).unwrap();
            assert_eq!((got, i), (cp.clone(), index));
            let parsed = Receipt::parse(&text).unwrap();
            assert_eq!(parsed.to_text().unwrap(), text);
            // Wrong leaf, wrong index.
            let other = leaves[(index as usize + 1) % 13];
            assert!(verify_receipt(&text, std::slice::from_ref(&v), &other).is_err());
            let moved = text.replacen(
                &format!("index {index}\n"),
                &format!("index {}\n", index + 1),
                1,
            );
            assert!(verify_receipt(&moved, std::slice::from_ref(&v), &leaves[index as usize]).is_err());
        }
        // Extra data round-trips.
        let proof = inclusion_proof(&leaves, 4).unwrap();
        let r = Receipt {
            extra: Some(b"ctx".to_vec()),
            index: 4,
            proof,
            checkpoint: signed.clone(),
        };
        let text = r.to_text().unwrap();
        assert_eq!(Receipt::parse(&text).unwrap(), r);
        assert!(verify_receipt(&text, std::slice::from_ref(&v), &leaves[4]).is_ok());
    }

    #[test]
    fn single_leaf_receipt_has_empty_proof() {
        let signer = log_signer();
        let leaf = leaf_hash(b"only");
        let cp = Checkpoint {
            origin: ORIGIN.to_owned(),
            size: 1,
            root: leaf,
        };
        let signed = sign_checkpoint(&cp, &signer).unwrap();
        let text = build_receipt(0, &[], &signed).unwrap();
        assert!(text.starts_with("c2sp.org/tlog-proof@v1\nindex 0\n\n"));
        assert!(verify_receipt(&text, &[signer.verifier()], &leaf).is_ok());
    }

    #[test]
    fn malformed_receipts() {
        let signer = log_signer();
        let leaves: Vec<Hash> = (0u8..4).map(|i| leaf_hash(&[i])).collect();
        let cp = Checkpoint {
            origin: ORIGIN.to_owned(),
            size: 4,
            root: root(&leaves),
        };
        let signed = sign_checkpoint(&cp, &signer).unwrap();
        let proof = inclusion_proof(&leaves, 1).unwrap();
        let good = build_receipt(1, &proof, &signed).unwrap();
        let lines: Vec<String> = proof.iter().map(|h| STANDARD.encode(h)).collect();
        let hashes = lines.join("\n");
        for text in [
            good.replacen("c2sp.org/tlog-proof@v1", "c2sp.org/tlog-proof@v2", 1),
            good.replacen("index 1", "index 01", 1),
            good.replacen("index 1", "index  1", 1),
            good.replacen("index 1", "Index 1", 1),
            format!("{RECEIPT_HEADER}\nindex 1\n{hashes}\n{signed}"),
            format!("{RECEIPT_HEADER}\nindex 1\n{hashes}\n\n"),
            format!("{RECEIPT_HEADER}\nindex 1\n{}\n\n{signed}", lines[0]),
            format!("{RECEIPT_HEADER}\nindex 1\n{hashes}\nAAAA\n\n{signed}"),
            format!("{RECEIPT_HEADER}\nextra \nindex 1\n{hashes}\n\n{signed}"),
            format!("{RECEIPT_HEADER}\nindex 1"),
        ] {
            assert!(
                verify_receipt(&text, &[signer.verifier()], &leaves[1]).is_err(),
                "accepted {text:?}"
            );
        }
        assert!(verify_receipt(&good, &[signer.verifier()], &leaves[1]).is_ok());
    }
}
