//! Who may sign in and how, as pure rules: no I/O, no clock (times are passed in as ms since the
//! epoch), no randomness (random bytes are passed in).
//!
//! - [`password`]: the password policy after NIST SP 800-63B (length, strength estimate, common
//!   passwords, not the username, not a recent one) and Argon2id hashing.
//! - [`totp`]: RFC 6238 one-time codes (authenticator-app compatible), a code used at most once.
//! - [`codes`]: single-use recovery codes and the opaque bearer secrets (session and enrollment
//!   tokens), stored only as hashes.
//! - [`jwt`]: tokens from an OpenID provider: signature against its keys, issuer, audience,
//!   expiry, nonce, second-factor claims.
//! - [`limits`]: session timeouts, escalating account lockout and per-address rate limits.
//! - [`account`]: user names, roles and states.

pub mod account;
pub mod codes;
pub mod jwt;
pub mod limits;
pub mod password;
pub mod totp;

pub use account::{Role, UserState, ROLES};
