//! C2SP signed-note v1 (<https://c2sp.org/signed-note>) with Ed25519 keys.
//!
//! A signed note is a text ending in a newline, one blank line, then one or more signature lines
//! `— <key name> <base64(4-byte key id || signature)>\n`. The signed message is the text with its
//! final newline. A key is identified by its name and its key id, the first four bytes of
//! SHA-256(name || 0x0A || 0x01 || public key). Verifier keys are written
//! `<name>+<key id as 8 lowercase hex digits>+<base64(0x01 || public key)>`.
//!
//! Verification ignores signatures by unknown keys (a key is known when both name and id match),
//! rejects the whole note if a known key's signature fails (the spec's SHOULD, taken as a
//! MUST), and requires at least one valid signature by a known key.
//!
//! Choices stricter than the specification, so that every note Valv accepts reads the same to
//! any parser: every line of the text must be non-empty (the text may therefore never contain
//! the blank-line separator), a note carries at most [`MAX_SIGNATURES`] signatures, verifier key
//! ids are lowercase hex, base64 must be canonical (padded, no stray bits), Ed25519 signatures
//! are checked with `verify_strict`, and weak (small-order) public keys are refused.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::AuditError;

/// Signature type byte for Ed25519 in key ids and verifier keys.
pub const ALG_ED25519: u8 = 0x01;

/// The most signature lines a note may carry (the spec requires accepting at least 16).
pub const MAX_SIGNATURES: usize = 100;

/// Prefix of a signature line: U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";

const ED25519_SIG_LEN: usize = 64;

/// Whether `name` may name a key: non-empty, no Unicode white space, no `+`, no control
/// characters.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c.is_control())
}

/// The key id of an Ed25519 key: the first four bytes, big-endian, of
/// SHA-256(name || 0x0A || 0x01 || public key).
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0x0a, ALG_ED25519]);
    h.update(public_key);
    let digest = h.finalize();
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// An Ed25519 signing key with its name. The secret is zeroized on drop and never printed.
pub struct Signer {
    name: String,
    key: SigningKey,
    id: u32,
}

impl Signer {
    /// A signer from a key name and a 32-byte Ed25519 secret seed (RFC 8032 private key).
    pub fn new(name: &str, seed: &[u8; 32]) -> Result<Self, AuditError> {
        if !is_valid_key_name(name) {
            return Err(AuditError::InvalidKeyName);
        }
        let key = SigningKey::from_bytes(seed);
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(Signer {
            name: name.to_owned(),
            key,
            id,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_id(&self) -> u32 {
        self.id
    }

    /// The matching verifier.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            name: self.name.clone(),
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// The signature line for `text` (which must already be valid note text).
    fn signature_line(&self, text: &str) -> Result<String, AuditError> {
        let sig = self
            .key
            .try_sign(text.as_bytes())
            .map_err(|_| AuditError::SigningFailed)?;
        let mut blob = Vec::with_capacity(4 + ED25519_SIG_LEN);
        blob.extend_from_slice(&self.id.to_be_bytes());
        blob.extend_from_slice(&sig.to_bytes());
        Ok(format!(
            "{SIG_PREFIX}{} {}\n",
            self.name,
            STANDARD.encode(blob)
        ))
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.id))
            .finish_non_exhaustive()
    }
}

/// An Ed25519 verifier key with its name and key id.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl Verifier {
    /// A verifier from a key name and a 32-byte Ed25519 public key.
    pub fn new(name: &str, public_key: &[u8; 32]) -> Result<Self, AuditError> {
        if !is_valid_key_name(name) {
            return Err(AuditError::InvalidKeyName);
        }
        let key = VerifyingKey::from_bytes(public_key)
            .map_err(|_| AuditError::MalformedVerifierKey("not an Ed25519 public key"))?;
        if key.is_weak() {
            return Err(AuditError::MalformedVerifierKey("weak Ed25519 public key"));
        }
        Ok(Verifier {
            name: name.to_owned(),
            id: key_id(name, public_key),
            key,
        })
    }

    /// Parses a verifier key string `<name>+<8 lowercase hex key id>+<base64(0x01 || key)>`,
    /// checking that the key id matches the name and key.
    pub fn from_vkey(vkey: &str) -> Result<Self, AuditError> {
        // Names and key ids never contain '+', but base64 may: split at the first two only.
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id_hex), Some(key_b64)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(AuditError::MalformedVerifierKey("expected name+id+key"));
        };
        if !is_valid_key_name(name) {
            return Err(AuditError::InvalidKeyName);
        }
        if id_hex.len() != 8
            || !id_hex
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(AuditError::MalformedVerifierKey(
                "key id must be 8 lowercase hex digits",
            ));
        }
        let id = u32::from_str_radix(id_hex, 16).map_err(|_| {
            AuditError::MalformedVerifierKey("key id must be 8 lowercase hex digits")
        })?;
        let raw = STANDARD
            .decode(key_b64)
            .map_err(|_| AuditError::MalformedVerifierKey("key is not canonical base64"))?;
        let Some((&ALG_ED25519, public)) = raw.split_first() else {
            return Err(AuditError::MalformedVerifierKey(
                "not an Ed25519 key (type 0x01)",
            ));
        };
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| AuditError::MalformedVerifierKey("Ed25519 key must be 32 bytes"))?;
        let verifier = Verifier::new(name, &public)?;
        if verifier.id != id {
            return Err(AuditError::MalformedVerifierKey(
                "key id does not match name and key",
            ));
        }
        Ok(verifier)
    }

    /// The verifier key string `<name>+<key id>+<base64(0x01 || key)>`.
    pub fn to_vkey(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, STANDARD.encode(raw))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_id(&self) -> u32 {
        self.id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    fn matches(&self, sig: &NoteSignature) -> bool {
        self.name == sig.name && self.id == sig.key_id
    }

    fn check(&self, text: &str, sig: &NoteSignature) -> Result<(), AuditError> {
        let bad = || AuditError::BadSignature(sig.name.clone());
        let bytes: [u8; ED25519_SIG_LEN] =
            sig.signature.as_slice().try_into().map_err(|_| bad())?;
        self.key
            .verify_strict(text.as_bytes(), &Signature::from_bytes(&bytes))
            .map_err(|_| bad())
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_vkey())
    }
}

impl fmt::Display for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_vkey())
    }
}

/// One signature line of a note, not necessarily verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    /// The signing key's name.
    pub name: String,
    /// The key id (the first four bytes of the decoded signature, big-endian).
    pub key_id: u32,
    /// The signature proper, after the key id.
    pub signature: Vec<u8>,
}

impl NoteSignature {
    fn to_line(&self) -> String {
        let mut blob = Vec::with_capacity(4 + self.signature.len());
        blob.extend_from_slice(&self.key_id.to_be_bytes());
        blob.extend_from_slice(&self.signature);
        format!("{SIG_PREFIX}{} {}\n", self.name, STANDARD.encode(blob))
    }

    fn parse_line(line: &str) -> Result<Self, AuditError> {
        let rest = line
            .strip_prefix(SIG_PREFIX)
            .ok_or(AuditError::MalformedNote(
                "signature line must start with an em dash and a space",
            ))?;
        let (name, b64) = rest.split_once(' ').ok_or(AuditError::MalformedNote(
            "signature line needs a key name and a signature",
        ))?;
        if !is_valid_key_name(name) {
            return Err(AuditError::InvalidKeyName);
        }
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| AuditError::MalformedNote("signature is not canonical base64"))?;
        match blob.split_first_chunk::<4>() {
            Some((id, sig)) if !sig.is_empty() => Ok(NoteSignature {
                name: name.to_owned(),
                key_id: u32::from_be_bytes(*id),
                signature: sig.to_vec(),
            }),
            _ => Err(AuditError::MalformedNote(
                "signature shorter than a key id and one byte",
            )),
        }
    }
}

/// A parsed signed note: its text and signatures. Parsing checks syntax only; use
/// [`Note::verify`] or [`open`] before trusting the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    text: String,
    signatures: Vec<NoteSignature>,
}

impl Note {
    /// Parses a signed note strictly. The text is everything up to and including the newline
    /// before the last blank line.
    pub fn parse(msg: &str) -> Result<Self, AuditError> {
        if msg.chars().any(|c| c < ' ' && c != '\n') {
            return Err(AuditError::MalformedNote("control character"));
        }
        let split = msg.rfind("\n\n").ok_or(AuditError::MalformedNote(
            "no blank line before the signatures",
        ))?;
        let (text, sigs) = (&msg[..split + 1], &msg[split + 2..]);
        check_text(text)?;
        let body = sigs.strip_suffix('\n').ok_or(AuditError::MalformedNote(
            "signatures must end in a newline",
        ))?;
        if body.is_empty() {
            return Err(AuditError::MalformedNote("no signature lines"));
        }
        let signatures = body
            .split('\n')
            .map(NoteSignature::parse_line)
            .collect::<Result<Vec<_>, _>>()?;
        if signatures.len() > MAX_SIGNATURES {
            return Err(AuditError::MalformedNote("too many signatures"));
        }
        Ok(Note {
            text: text.to_owned(),
            signatures,
        })
    }

    /// The note text, including its final newline.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn signatures(&self) -> &[NoteSignature] {
        &self.signatures
    }

    /// Verifies the note against known keys. Signatures by unknown keys are ignored; a failing
    /// signature by a known key rejects the note; at least one known key must have signed.
    /// Returns the signatures that verified.
    pub fn verify(&self, known: &[Verifier]) -> Result<Vec<&NoteSignature>, AuditError> {
        let mut verified = Vec::new();
        for sig in &self.signatures {
            let mut matching = known.iter().filter(|v| v.matches(sig)).peekable();
            if matching.peek().is_none() {
                continue;
            }
            for verifier in matching {
                verifier.check(&self.text, sig)?;
            }
            verified.push(sig);
        }
        if verified.is_empty() {
            return Err(AuditError::NoKnownSignature);
        }
        Ok(verified)
    }
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        f.write_str("\n")?;
        for sig in &self.signatures {
            f.write_str(&sig.to_line())?;
        }
        Ok(())
    }
}

/// Signs `text` (non-empty lines, each ending in a newline) with each signer, returning the
/// signed note.
pub fn sign(text: &str, signers: &[&Signer]) -> Result<String, AuditError> {
    check_text(text)?;
    if text.chars().any(|c| c < ' ' && c != '\n') {
        return Err(AuditError::MalformedNote("control character"));
    }
    if signers.is_empty() {
        return Err(AuditError::MalformedNote("no signers"));
    }
    if signers.len() > MAX_SIGNATURES {
        return Err(AuditError::MalformedNote("too many signatures"));
    }
    let mut out = String::with_capacity(text.len() + 1 + signers.len() * 110);
    out.push_str(text);
    out.push('\n');
    for signer in signers {
        out.push_str(&signer.signature_line(text)?);
    }
    Ok(out)
}

/// Parses and verifies a signed note against known keys (see [`Note::verify`]).
pub fn open(msg: &str, known: &[Verifier]) -> Result<Note, AuditError> {
    let note = Note::parse(msg)?;
    note.verify(known)?;
    Ok(note)
}

/// The text must be non-empty, end in a newline, and have no empty line.
fn check_text(text: &str) -> Result<(), AuditError> {
    let body = text
        .strip_suffix('\n')
        .ok_or(AuditError::MalformedNote("text must end in a newline"))?;
    if body.is_empty() || body.split('\n').any(str::is_empty) {
        return Err(AuditError::MalformedNote(
            "text must not contain empty lines",
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn signer(name: &str, byte: u8) -> Signer {
        Signer::new(name, &[byte; 32]).unwrap()
    }

    #[test]
    fn sign_parse_verify_round_trip() {
        let a = signer("log.example/a", 1);
        let b = signer("witness.example", 2);
        let text = "hello\nworld\n";
        let signed = sign(text, &[&a, &b]).unwrap();
        let note = Note::parse(&signed).unwrap();
        assert_eq!(note.text(), text);
        assert_eq!(note.signatures().len(), 2);
        assert_eq!(note.to_string(), signed);
        assert_eq!(note.verify(&[a.verifier()]).unwrap().len(), 1);
        assert_eq!(note.verify(&[a.verifier(), b.verifier()]).unwrap().len(), 2);
        assert_eq!(open(&signed, &[b.verifier()]).unwrap().text(), text);
        // Unknown keys alone are not enough.
        let c = signer("other.example", 3);
        assert_eq!(
            open(&signed, &[c.verifier()]),
            Err(AuditError::NoKnownSignature)
        );
        assert_eq!(open(&signed, &[]), Err(AuditError::NoKnownSignature));
    }

    #[test]
    fn vkey_with_plus_in_base64() {
        // Find a key whose base64 contains '+', as a quarter of keys' do somewhere.
        let signer = (0u8..=255)
            .map(|b| signer("log.example/a", b))
            .find(|s| s.verifier().to_vkey().matches('+').count() > 2)
            .unwrap();
        let vkey = signer.verifier().to_vkey();
        assert_eq!(Verifier::from_vkey(&vkey).unwrap(), signer.verifier());
    }

    #[test]
    fn vkey_round_trip() {
        let a = signer("log.example/a", 9);
        let vkey = a.verifier().to_vkey();
        let v = Verifier::from_vkey(&vkey).unwrap();
        assert_eq!(v, a.verifier());
        assert_eq!(v.key_id(), a.key_id());
        assert!(vkey.starts_with("log.example/a+"));
    }

    #[test]
    fn malformed_vkeys() {
        let good = signer("log.example/a", 9).verifier().to_vkey();
        let parts: Vec<&str> = good.split('+').collect();
        let bad_id = format!("{}+{}+{}", parts[0], "00000000", parts[2]);
        let upper = format!("{}+{}+{}", parts[0], parts[1].to_uppercase(), parts[2]);
        let other_name = format!("{}+{}+{}", "log.example/b", parts[1], parts[2]);
        let short_id = format!("{}+{}+{}", parts[0], &parts[1][..7], parts[2]);
        // 33 bytes encode to 44 characters without padding; extra padding is not canonical.
        let padded = format!("{}+{}+{}=", parts[0], parts[1], parts[2]);
        let spaced = format!("{}+{}+ {}", parts[0], parts[1], parts[2]);
        for bad in [
            "",
            "name",
            "name+00000000",
            &format!("{good}+extra"),
            &bad_id,
            &other_name,
            &short_id,
            &padded,
            &spaced,
            &format!("a b+{}+{}", parts[1], parts[2]),
        ] {
            assert!(Verifier::from_vkey(bad).is_err(), "accepted {bad:?}");
        }
        if upper != good {
            assert!(Verifier::from_vkey(&upper).is_err());
        }
        // Wrong algorithm byte.
        let mut raw = STANDARD.decode(parts[2]).unwrap();
        raw[0] = 0x02;
        let wrong_alg = format!("{}+{}+{}", parts[0], parts[1], STANDARD.encode(&raw));
        assert!(Verifier::from_vkey(&wrong_alg).is_err());
    }

    #[test]
    fn malformed_notes() {
        let a = signer("log.example/a", 1);
        let signed = sign("hello\n", &[&a]).unwrap();
        let sig_line = signed.strip_prefix("hello\n\n").unwrap();
        let b64 = sig_line.trim_end().rsplit(' ').next().unwrap();
        let cases = [
            // No trailing newline.
            signed.trim_end().to_owned(),
            // No blank line.
            format!("hello\n{sig_line}"),
            // No signatures.
            "hello\n\n".to_owned(),
            // Hyphen instead of em dash.
            format!("hello\n\n- log.example/a {b64}\n"),
            // Bad base64.
            format!("hello\n\n\u{2014} log.example/a {}!\n", &b64[1..]),
            // Key id only.
            format!(
                "hello\n\n\u{2014} log.example/a {}\n",
                STANDARD.encode([1, 2, 3, 4])
            ),
            // Key name with a plus.
            format!("hello\n\n\u{2014} log.example+a {b64}\n"),
            // Key name with a tab.
            format!("hello\n\n\u{2014} log\texample {b64}\n"),
            // Empty key name.
            format!("hello\n\n\u{2014}  {b64}\n"),
            // Control character in the text.
            format!("hel\rlo\n\n{sig_line}"),
            // Empty text line (text containing the separator).
            format!("hello\n\nworld\n\n{sig_line}"),
            // Empty text.
            format!("\n\n{sig_line}"),
            // Empty line among the signatures.
            format!("hello\n\n{sig_line}\n{sig_line}"),
            // Trailing space.
            format!("hello\n\n{} \n", sig_line.trim_end()),
        ];
        for case in &cases {
            assert!(Note::parse(case).is_err(), "parsed {case:?}");
            assert!(open(case, &[a.verifier()]).is_err(), "opened {case:?}");
        }
        // Too many signatures.
        let many = format!("hello\n\n{}", sig_line.repeat(MAX_SIGNATURES + 1));
        assert!(Note::parse(&many).is_err());
        let enough = format!("hello\n\n{}", sig_line.repeat(MAX_SIGNATURES));
        assert!(open(&enough, &[a.verifier()]).is_ok());
    }

    #[test]
    fn sign_rejects_bad_text_and_names() {
        let a = signer("log.example/a", 1);
        for text in [
            "",
            "no newline",
            "a\n\nb\n",
            "\n",
            "a\n\n",
            "tab\there\n",
            "\nx\n",
        ] {
            assert!(sign(text, &[&a]).is_err(), "signed {text:?}");
        }
        assert!(sign("ok\n", &[]).is_err());
        for name in ["", "a b", "a+b", "a\u{a0}b", "a\nb", "a\u{2003}b"] {
            assert!(Signer::new(name, &[1; 32]).is_err(), "named {name:?}");
        }
    }

    #[test]
    fn tampering_is_rejected() {
        let a = signer("log.example/a", 1);
        let b = signer("witness.example", 2);
        let signed = sign("hello\n", &[&a, &b]).unwrap();
        // A changed text.
        let changed = signed.replacen("hello", "hellp", 1);
        assert!(matches!(
            open(&changed, &[a.verifier()]),
            Err(AuditError::BadSignature(_))
        ));
        // A bad signature by one known key rejects the note even if the other is good.
        let note = Note::parse(&signed).unwrap();
        let mut forged = note.clone();
        forged.signatures[1].signature[0] ^= 1;
        let forged = forged.to_string();
        assert!(open(&forged, &[a.verifier()]).is_ok());
        assert!(open(&forged, &[a.verifier(), b.verifier()]).is_err());
        // Same name, different key: not a known key, ignored.
        let impostor = signer("log.example/a", 7);
        assert_eq!(
            open(&signed, &[impostor.verifier()]),
            Err(AuditError::NoKnownSignature)
        );
        // A known key whose signature has the wrong length.
        let mut short = note.clone();
        short.signatures[0].signature.pop();
        assert!(open(&short.to_string(), &[a.verifier()]).is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let a = signer("log.example/a", 0x42);
        let shown = format!("{a:?}");
        assert!(shown.contains("log.example/a"));
        assert!(!shown.contains("42, 42"));
    }
}
