//! URL query strings: percent-decoding into pairs, and encoding pairs back for paging links.

/// Decodes `a=1&b=x%20y` into pairs; `+` is a space. Malformed escapes are an error.
pub fn parse(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3).ok_or("truncated percent-escape in query")?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent-escape '%{hex}' in query"))?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8".to_string())
}

/// Encodes pairs as a query string, escaping everything but unreserved characters.
pub fn encode(pairs: &[(String, String)]) -> String {
    pairs.iter().map(|(k, v)| format!("{}={}", escape(k), escape(v))).collect::<Vec<_>>().join("&")
}

fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' | b'|' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let pairs = parse("family=%C3%96berg&given=a+b&identifier=urn:x|1").expect("parses");
        assert_eq!(pairs[0], ("family".into(), "Öberg".into()));
        assert_eq!(pairs[1].1, "a b");
        assert_eq!(parse(&encode(&pairs)).expect("again"), pairs);
        assert!(parse("a=%zz").is_err());
        assert!(parse("a=%c3").is_err());
    }
}
