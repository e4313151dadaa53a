//! Webhook signatures as the Standard Webhooks specification defines them
//! (<https://www.standardwebhooks.com>): HMAC-SHA256 over `{id}.{timestamp}.{body}` with a secret
//! written `whsec_<base64>`, sent as `webhook-signature: v1,<base64>`. Receivers verify it with
//! any of that specification's libraries or a few lines of their own.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// The specification's bounds on the secret's length (bytes, after base64).
const MIN_SECRET: usize = 24;
const MAX_SECRET: usize = 64;

/// A webhook signing secret.
pub struct WebhookSecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// Reads `whsec_<base64 of 24 to 64 bytes>`.
    pub fn parse(text: &str) -> Result<Self, crate::CryptoError> {
        let b64 = text.trim().strip_prefix("whsec_").ok_or(crate::CryptoError::Malformed("a webhook secret is written whsec_<base64>"))?;
        let key = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| crate::CryptoError::Malformed("a webhook secret is written whsec_<base64>"))?);
        if !(MIN_SECRET..=MAX_SECRET).contains(&key.len()) {
            return Err(crate::CryptoError::Malformed("a webhook secret holds 24 to 64 bytes"));
        }
        Ok(WebhookSecret(key))
    }

    /// The `webhook-signature` header's value for one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // Any key length is accepted by HMAC; `parse` bounds it.
        let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0) else { return String::new() };
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector of the specification's own reference libraries.
    #[test]
    fn signs_as_the_specification_does() {
        let secret = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("a valid secret");
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(secret.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body), "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
        assert_ne!(secret.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367554, body), "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn refuses_secrets_of_the_wrong_form() {
        for bad in ["C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "whsec_not base64!", "whsec_c2hvcnQ=", &format!("whsec_{}", "A".repeat(100))] {
            assert!(WebhookSecret::parse(bad).is_err(), "{bad}");
        }
    }
}
