//! Valv's key hierarchy, free of I/O and of the clock: randomness comes in as arguments.
//!
//! - [`provider`]: the [`KeyProvider`] trait that holds key-encryption keys (KEKs) and wraps data
//!   keys, and the local key-file provider.
//! - [`keys`]: data keys (256-bit, zeroized on drop) and their wrapped form.
//! - [`aead`]: AES-256-GCM sealing whose additional data binds purpose, type, id, version and
//!   patient, so a ciphertext moved elsewhere fails to open.
//! - [`blind`]: blind-index tokens, HMAC-SHA256 over a search parameter and a normalised value.
//! - [`mac`]: MACs over records the server trusts, so database writes without the keys are caught.
//! - [`stream`]: files sealed in 64 KiB segments (a streaming AEAD), any byte range opened alone.
//! - [`webhook`]: Standard Webhooks signatures (HMAC-SHA256) for the alert webhook.

pub mod aead;
pub mod blind;
mod error;
pub mod hex;
pub mod keys;
pub mod mac;
pub mod provider;
pub mod stream;
pub mod webhook;

pub use aead::{open, seal, Aad, BulkOpener, Cipher, OpenInPlace};
pub use blind::BlindIndexKey;
pub use error::CryptoError;
pub use keys::{DataKey, WrappedKey};
pub use mac::RecordMac;
pub use provider::{KeyProvider, LocalKeyProvider};
pub use webhook::WebhookSecret;
