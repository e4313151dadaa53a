//! Lower-case hex, for key files and token display.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// The hex of a 32-byte value without allocating (for hot paths such as opening audit entries).
pub fn encode_32(bytes: &[u8; 32]) -> Hex32 {
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    Hex32(out)
}

/// 64 lower-case hex digits.
pub struct Hex32([u8; 64]);

impl Hex32 {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written, so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

pub fn decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        assert_eq!(super::encode(&[0x0a, 0xf0, 0x5c]), "0af05c");
        let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        assert_eq!(super::encode_32(&bytes).as_str(), super::encode(&bytes));
        assert_eq!(super::decode(&super::encode(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(super::decode("0g"), None);
        assert_eq!(super::decode("abc"), None);
    }
}
