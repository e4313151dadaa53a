//! TOTP (RFC 6238): HMAC-SHA1, 6 digits, 30-second steps — what authenticator apps use by
//! default. A code is accepted in a window of one step either side of now, and only for a step
//! later than the last one accepted for the account, so each code works at most once.

use ring::hmac;

pub const STEP_MS: i64 = 30_000;
pub const DIGITS: u32 = 6;
/// Bytes of a TOTP secret (160 bits, RFC 4226's recommendation).
pub const SECRET_LEN: usize = 20;

/// The HOTP value (RFC 4226) of `counter` with `digits` digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &counter.to_be_bytes());
    let h = mac.as_ref();
    let offset = usize::from(h[h.len() - 1] & 0x0f);
    let bin = (u32::from(h[offset] & 0x7f) << 24) | (u32::from(h[offset + 1]) << 16) | (u32::from(h[offset + 2]) << 8) | u32::from(h[offset + 3]);
    bin % 10u32.pow(digits)
}

/// The time step of `now_ms` (ms since the epoch). Times before the epoch are step 0.
pub fn step_at(now_ms: i64) -> u64 {
    u64::try_from(now_ms.div_euclid(STEP_MS)).unwrap_or(0)
}

/// The code for `step`, zero-padded.
pub fn code(secret: &[u8], step: u64) -> String {
    format!("{:0width$}", hotp(secret, step, DIGITS), width = DIGITS as usize)
}

/// The step `code` belongs to, if it is valid at `now_ms` (±1 step) and later than
/// `last_used_step`. The caller must store the returned step as the new last used one.
pub fn verify(secret: &[u8], code: &str, now_ms: i64, last_used_step: Option<u64>) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_at(now_ms);
    let mut found = None;
    // Every candidate is computed and compared, so timing does not tell which step matched.
    for step in [now.saturating_sub(1), now, now + 1] {
        let fresh = last_used_step.is_none_or(|last| step > last);
        if same(self::code(secret, step).as_bytes(), code.as_bytes()) && fresh && found.is_none() {
            found = Some(step);
        }
    }
    found
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// RFC 4648 base32 without padding (what `otpauth://` URIs carry).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(char::from(ALPHABET[((buffer >> (bits - 5)) & 31) as usize]));
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The `otpauth://totp/…` URI an authenticator app scans (Key Uri Format).
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let (issuer, account) = (percent(issuer), percent(account));
    format!("otpauth://totp/{issuer}:{account}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={}", base32(secret), STEP_MS / 1000)
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 6238 Appendix B, SHA-1 rows (8 digits, the 20-byte ASCII secret).
    #[test]
    fn rfc6238_vectors() {
        let secret = b"12345678901234567890";
        for (t, want) in [(59i64, 94287082u32), (1111111109, 7081804), (1111111111, 14050471), (1234567890, 89005924), (2000000000, 69279037), (20000000000, 65353130)] {
            assert_eq!(hotp(secret, step_at(t * 1000), 8), want, "T = {t}");
        }
    }

    /// RFC 4226 Appendix D (HOTP, 6 digits).
    #[test]
    fn rfc4226_vectors() {
        let want = [755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489];
        for (counter, w) in want.iter().enumerate() {
            assert_eq!(hotp(b"12345678901234567890", counter as u64, 6), *w);
        }
    }

    #[test]
    fn window_and_single_use() {
        let s = [9u8; 20];
        let now = 1_700_000_000_000i64;
        let step = step_at(now);
        assert_eq!(verify(&s, &code(&s, step), now, None), Some(step));
        assert_eq!(verify(&s, &code(&s, step - 1), now, None), Some(step - 1), "one step late is accepted");
        assert_eq!(verify(&s, &code(&s, step + 1), now, None), Some(step + 1), "one step early is accepted");
        assert_eq!(verify(&s, &code(&s, step - 2), now, None), None, "two steps late is not");
        assert_eq!(verify(&s, &code(&s, step), now, Some(step)), None, "a used code is refused");
        assert_eq!(verify(&s, &code(&s, step - 1), now, Some(step)), None, "an older code after a newer one is refused");
        assert_eq!(verify(&s, "12345", now, None), None);
        assert_eq!(verify(&s, "abcdef", now, None), None);
    }

    #[test]
    fn base32_and_uri() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        let uri = otpauth_uri("Valv Clinic", "anna.berg", b"12345678901234567890");
        assert_eq!(uri, "otpauth://totp/Valv%20Clinic:anna.berg?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Valv%20Clinic&algorithm=SHA1&digits=6&period=30");
    }

    proptest! {
        #[test]
        fn a_code_verifies_once(secret in any::<[u8; 20]>(), now in 0i64..4_000_000_000_000) {
            let step = step_at(now);
            let c = code(&secret, step);
            prop_assert_eq!(c.len(), 6);
            let used = verify(&secret, &c, now, None);
            prop_assert!(used.is_some());
            prop_assert_eq!(verify(&secret, &c, now, used), None);
        }
    }
}
