//! Passwords: the policy (NIST SP 800-63B §3.1.1.2) and Argon2id hashing.
//!
//! The policy asks for length, not composition: at least 12 characters (at most 256), a
//! zxcvbn strength estimate of at least 3 of 4 (about 10^8 guesses or more), not one of the
//! common passwords zxcvbn ships (a 30,000-entry list from password breaches), not containing
//! the user name or display name, and not one of the user's last five. Every rejection says why.
//!
//! zxcvbn measures its own running time with the system clock; Valv does not use that figure.

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use zxcvbn::matching::patterns::MatchPattern;

pub const MIN_LENGTH: usize = 12;
pub const MAX_LENGTH: usize = 256;
/// How many earlier passwords a new one may not repeat.
pub const HISTORY: usize = 5;

/// Why a password was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the password is too short: at least {MIN_LENGTH} characters are needed (it has {0})")]
    TooShort(usize),
    #[error("the password is too long: at most {MAX_LENGTH} characters")]
    TooLong,
    #[error("the password is one of the most common passwords; choose another")]
    Common,
    #[error("the password contains the user name")]
    ContainsUsername,
    #[error("the password contains the user's name")]
    ContainsName,
    #[error("the password is too easy to guess (strength {score} of 4, at least {min} needed){hint}")]
    Weak { score: u8, min: u8, hint: String },
    #[error("the password was used recently; the last {HISTORY} cannot be reused")]
    Reused,
}

/// Checks a new password against the policy (not against history: see [`Hasher::matches_any`]).
pub fn check(password: &str, username: &str, display_name: &str, min_score: u8) -> Result<(), Rejection> {
    let chars = password.chars().count();
    if chars < MIN_LENGTH {
        return Err(Rejection::TooShort(chars));
    }
    if chars > MAX_LENGTH {
        return Err(Rejection::TooLong);
    }
    let lower = password.to_lowercase();
    if !username.is_empty() && lower.contains(&username.to_lowercase()) {
        return Err(Rejection::ContainsUsername);
    }
    let name_parts: Vec<String> = display_name.split_whitespace().filter(|p| p.chars().count() >= 3).map(str::to_lowercase).collect();
    if name_parts.iter().any(|p| lower.contains(p.as_str())) {
        return Err(Rejection::ContainsName);
    }
    let inputs: Vec<&str> = std::iter::once(username).chain(display_name.split_whitespace()).filter(|s| !s.is_empty()).collect();
    let estimate = zxcvbn::zxcvbn(password, &inputs);
    let whole_is_common = estimate.sequence().iter().any(|m| {
        // zxcvbn does not export its dictionary type, only its Debug name.
        matches!(&m.pattern, MatchPattern::Dictionary(d) if format!("{:?}", d.dictionary_name) == "Passwords")
            && m.i == 0
            && m.j + 1 >= password.chars().count().min(100)
    });
    if whole_is_common {
        return Err(Rejection::Common);
    }
    let score = u8::from(estimate.score());
    if score < min_score {
        let hint = estimate
            .feedback()
            .and_then(|f| f.warning().map(|w| w.to_string()))
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        return Err(Rejection::Weak { score, min: min_score, hint });
    }
    Ok(())
}

/// Argon2id cost parameters. The default is OWASP's first recommendation: 19 MiB, 2 passes,
/// one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Cost {
    fn default() -> Self {
        Cost { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

/// Hashes and verifies passwords with Argon2id (PHC strings, so a hash records its own cost and
/// older hashes keep verifying after the cost is raised).
pub struct Hasher {
    argon: Argon2<'static>,
}

impl Hasher {
    pub fn new(cost: Cost) -> Result<Self, String> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None).map_err(|e| format!("Argon2 parameters: {e}"))?;
        Ok(Hasher { argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params) })
    }

    /// The PHC string of `password` with a 16-byte `salt` (fresh randomness from the caller).
    pub fn hash(&self, password: &str, salt: [u8; 16]) -> Result<String, String> {
        self.argon.hash_password_with_salt(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| format!("hashing: {e}"))
    }

    /// Whether `password` matches `phc`. A malformed stored hash never matches.
    pub fn verify(&self, phc: &str, password: &str) -> bool {
        PasswordVerifier::<str>::verify_password(&self.argon, password.as_bytes(), phc).is_ok()
    }

    /// Whether `password` matches any of `history` (the reuse rule).
    pub fn matches_any(&self, history: &[String], password: &str) -> bool {
        history.iter().any(|h| self.verify(h, password))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Hasher {
        Hasher::new(Cost { memory_kib: 64, iterations: 1, parallelism: 1 }).expect("valid")
    }

    #[test]
    fn rejections_say_why() {
        let cases: &[(&str, &str)] = &[
            ("short", "too short"),
            ("password1234", "most common"),
            ("anna.bergxyz-77-Q", "user name"),
            ("Lindqvist-horse-77", "user's name"),
            ("aaaaaaaaaaaaaaaa", "too easy"),
            ("qwertyuiopasdf", "too easy"),
            ("abcdefghijklmnop", "too easy"),
        ];
        for (pw, why) in cases {
            let e = check(pw, "anna.berg", "Anna Lindqvist", 3).expect_err(pw).to_string();
            assert!(e.contains(why), "{pw}: {e}");
        }
        assert!(check(&"x".repeat(257), "u", "", 3).expect_err("long").to_string().contains("too long"));
    }

    #[test]
    fn strong_passwords_pass() {
        for pw in ["correct horse battery staple", "Tr0mbone-Glacier-Quill", "vinter äpple kalas 1987"] {
            assert_eq!(check(pw, "anna.berg", "Anna Lindqvist", 3), Ok(()), "{pw}");
        }
    }

    #[test]
    fn hash_verify_and_history() {
        let h = cheap();
        let a = h.hash("correct horse battery staple", [1; 16]).expect("hash");
        assert!(a.starts_with("$argon2id$v=19$"));
        assert!(h.verify(&a, "correct horse battery staple"));
        assert!(!h.verify(&a, "correct horse battery stapl"));
        assert!(!h.verify("not a hash", "x"));
        let b = h.hash("another long passphrase", [2; 16]).expect("hash");
        assert!(h.matches_any(&[a.clone(), b], "another long passphrase"));
        assert!(!h.matches_any(&[a], "another long passphrase"));
    }

    #[test]
    fn hashes_keep_their_own_cost() {
        let old = cheap().hash("correct horse battery staple", [3; 16]).expect("hash");
        let stronger = Hasher::new(Cost { memory_kib: 128, iterations: 2, parallelism: 1 }).expect("valid");
        assert!(stronger.verify(&old, "correct horse battery staple"));
    }
}
