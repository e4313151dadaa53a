//! Bech32 (BIP 173, the original checksum, as age uses it) without the 90-character limit.

const CHARSET: &[u8; 32] = b"qpzry9x8gf2tvdw0s3jn54khce6mua7l";
const GENERATORS: [u32; 5] = [0x3b6a_57b2, 0x2650_8e6d, 0x1ea1_19fa, 0x3d42_33dd, 0x2a14_62b3];

fn polymod(values: impl Iterator<Item = u8>) -> u32 {
    let mut chk: u32 = 1;
    for v in values {
        let top = chk >> 25;
        chk = ((chk & 0x01ff_ffff) << 5) ^ u32::from(v);
        for (i, g) in GENERATORS.iter().enumerate() {
            if (top >> i) & 1 == 1 {
                chk ^= g;
            }
        }
    }
    chk
}

fn hrp_expand(hrp: &str) -> Vec<u8> {
    let mut v: Vec<u8> = hrp.bytes().map(|b| b >> 5).collect();
    v.push(0);
    v.extend(hrp.bytes().map(|b| b & 31));
    v
}

/// Regroups bits; `pad` adds zero bits to the last group (encoding), otherwise leftover bits
/// must be zero padding of less than a group (decoding).
fn convert(data: &[u8], from: u32, to: u32, pad: bool) -> Option<Vec<u8>> {
    let (mut acc, mut bits, mut out) = (0u32, 0u32, Vec::new());
    let max = (1u32 << to) - 1;
    for &d in data {
        if u32::from(d) >> from != 0 {
            return None;
        }
        acc = (acc << from) | u32::from(d);
        bits += from;
        while bits >= to {
            bits -= to;
            out.push(((acc >> bits) & max) as u8);
        }
    }
    if pad {
        if bits > 0 {
            out.push(((acc << (to - bits)) & max) as u8);
        }
    } else if bits >= from || ((acc << (to - bits)) & max) != 0 {
        return None;
    }
    Some(out)
}

pub fn encode(hrp: &str, data: &[u8]) -> String {
    let values = convert(data, 8, 5, true).unwrap_or_default();
    let mut check_input = hrp_expand(hrp);
    check_input.extend(&values);
    check_input.extend([0u8; 6]);
    let pm = polymod(check_input.into_iter()) ^ 1;
    let mut s = format!("{hrp}1");
    for v in values.iter().copied().chain((0..6).map(|i| ((pm >> (5 * (5 - i))) & 31) as u8)) {
        s.push(char::from(CHARSET[usize::from(v)]));
    }
    s
}

/// The (lowercase) human-readable part and the data, if `s` is valid bech32 of one case.
pub fn decode(s: &str) -> Option<(String, Vec<u8>)> {
    if s.bytes().any(|b| b.is_ascii_lowercase()) && s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let lower = s.to_ascii_lowercase();
    let sep = lower.rfind('1')?;
    let (hrp, rest) = (&lower[..sep], &lower[sep + 1..]);
    if hrp.is_empty() || rest.len() < 6 || hrp.bytes().any(|b| !(33..=126).contains(&b)) {
        return None;
    }
    let values: Vec<u8> = rest.bytes().map(|c| CHARSET.iter().position(|&x| x == c).map(|p| p as u8)).collect::<Option<_>>()?;
    let mut check_input = hrp_expand(hrp);
    check_input.extend(&values);
    if polymod(check_input.into_iter()) != 1 {
        return None;
    }
    let data = convert(&values[..values.len() - 6], 5, 8, false)?;
    Some((hrp.to_string(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bip173_vectors_and_round_trip() {
        for valid in ["A12UEL5L", "a12uel5l", "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw", "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w"] {
            assert!(decode(valid).is_some(), "{valid}");
        }
        for invalid in ["A1G7SGD8", "a12UEL5L", "pzry9x0s0muk", "1pzry9x0s0muk", "x1b4n0q5v", "li1dgmt3", "abc1rzgt4"] {
            assert!(decode(invalid).is_none(), "{invalid}");
        }
        let data: Vec<u8> = (0..32).collect();
        let s = encode("age", &data);
        assert_eq!(decode(&s), Some(("age".to_string(), data)));
    }
}
