//! Opaque secrets handed to people — session tokens, enrollment tokens, recovery codes — and
//! the hashes that are all the database keeps of them. They carry 256 bits (tokens) or 80 bits
//! (recovery codes, also single-use) of randomness from the caller, so a fast hash suffices.

use sha2::{Digest, Sha256};

/// Prefix of session (access) tokens.
pub const SESSION_PREFIX: &str = "valvs_";
/// Prefix of one-time enrollment tokens.
pub const ENROLLMENT_PREFIX: &str = "valve_";
pub const RECOVERY_CODES: usize = 10;

/// A bearer secret: `prefix` + 64 hex digits of `random`.
pub fn token(prefix: &str, random: &[u8; 32]) -> String {
    format!("{prefix}{}", valv_crypto::hex::encode(random))
}

/// Whether `s` has the shape of a token with `prefix` (before any lookup).
pub fn is_token(prefix: &str, s: &str) -> bool {
    s.len() == prefix.len() + 64 && s.starts_with(prefix) && s[prefix.len()..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What is stored of a token or code.
pub fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Recovery codes shown to the user once: 16 base32 characters (80 bits) in groups of four.
pub fn recovery_codes(random: &[[u8; 10]; RECOVERY_CODES]) -> Vec<String> {
    random
        .iter()
        .map(|r| {
            let b32 = crate::totp::base32(r);
            b32.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
        })
        .collect()
}

/// The hash of a recovery code as typed (case, dashes and spaces do not matter), or `None` if it
/// cannot be one.
pub fn recovery_hash(typed: &str) -> Option<[u8; 32]> {
    let normal: String = typed.chars().filter(|c| !matches!(c, '-' | ' ')).map(|c| c.to_ascii_uppercase()).collect();
    let ok = normal.len() == 16 && normal.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
    ok.then(|| secret_hash(&normal))
}

/// The hash under which a freshly generated recovery code is stored.
pub fn stored_recovery_hash(code: &str) -> [u8; 32] {
    recovery_hash(code).unwrap_or_else(|| secret_hash(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = token(SESSION_PREFIX, &[0xab; 32]);
        assert!(is_token(SESSION_PREFIX, &t));
        assert!(!is_token(ENROLLMENT_PREFIX, &t));
        assert!(!is_token(SESSION_PREFIX, &t[..t.len() - 1]));
        assert!(!is_token(SESSION_PREFIX, &t.to_uppercase()));
        assert_ne!(secret_hash(&t), secret_hash(&token(SESSION_PREFIX, &[0xac; 32])));
    }

    #[test]
    fn recovery_codes_normalise() {
        let codes = recovery_codes(&[[7; 10]; RECOVERY_CODES]);
        assert_eq!(codes.len(), 10);
        let c = &codes[0];
        assert_eq!(c.len(), 19);
        assert_eq!(c.matches('-').count(), 3);
        let h = stored_recovery_hash(c);
        assert_eq!(recovery_hash(&c.to_lowercase()), Some(h));
        assert_eq!(recovery_hash(&c.replace('-', " ")), Some(h));
        assert_eq!(recovery_hash("not-a-code"), None);
        assert_eq!(recovery_hash("1111-1111-1111-1111"), None, "0, 1, 8, 9 are not base32");
    }
}
