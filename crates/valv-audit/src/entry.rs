//! The canonical audit entry: RFC 8785 JSON Canonicalization Scheme (JCS) bytes of the entry
//! object, and its Merkle leaf hash SHA-256(0x00 || JCS bytes).
//!
//! The entry itself (to be defined by the lead) carries the IHE BALP fields — who, role, unit,
//! patient, resource, action, outcome, purpose of use, source address, request id, time — plus a
//! random 128-bit event id so that leaf hashes cannot be guessed. It is serialised to a
//! `serde_json::Value` and canonicalised here, so any independent verifier can recompute the
//! leaf hash from the entry it reads.
//!
//! JCS as implemented: no whitespace; object members sorted by their names' UTF-16 code units;
//! strings escaped as ECMAScript's JSON.stringify does (`\"`, `\\`, `\b`, `\t`, `\n`, `\f`, `\r`,
//! other controls as `\u00xx`, everything else literal); `null`, `true`, `false`. Numbers: Valv's
//! entries hold integers and strings only, so integers with |n| <= 2^53 - 1 (exact in ECMAScript)
//! are written in plain decimal, and any other number — a fraction, or an integer too large to be
//! exact — is an error rather than a possibly wrong rendering.

use serde_json::{Number, Value};

use crate::merkle::{leaf_hash, Hash};
use crate::AuditError;

/// The largest integer ECMAScript represents exactly (Number.MAX_SAFE_INTEGER).
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// The RFC 8785 canonical form of a JSON value.
pub fn canonical_json(value: &Value) -> Result<String, AuditError> {
    let mut out = String::new();
    write_value(&mut out, value)?;
    Ok(out)
}

/// The Merkle leaf hash of an entry: SHA-256(0x00 || canonical JSON bytes).
pub fn entry_leaf_hash(entry: &Value) -> Result<Hash, AuditError> {
    Ok(leaf_hash(canonical_json(entry)?.as_bytes()))
}

fn write_value(out: &mut String, value: &Value) -> Result<(), AuditError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n)?,
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, name);
                out.push(':');
                write_value(out, member)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_number(out: &mut String, n: &Number) -> Result<(), AuditError> {
    let unsupported = || AuditError::UnsupportedNumber(n.to_string());
    let int = if let Some(i) = n.as_i64() {
        i
    } else if n.is_u64() {
        // Only u64 values above i64::MAX land here: far beyond exact.
        return Err(unsupported());
    } else {
        let f = n.as_f64().ok_or_else(unsupported)?;
        // An integral float in the safe range is the same ECMAScript number as the integer
        // (and -0 is written "0").
        if f.fract() != 0.0 || f.abs() > MAX_SAFE_INTEGER as f64 {
            return Err(unsupported());
        }
        f as i64
    };
    if !(-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&int) {
        return Err(unsupported());
    }
    out.push_str(&int.to_string());
    Ok(())
}

pub(crate) fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c < ' ' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jcs(text: &str) -> Result<String, AuditError> {
        canonical_json(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn rfc8785_sorting_example() {
        // RFC 8785 §3.2.3 "Sorting of Object Properties".
        let input = r#"{
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\ud83d\ude00": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let want = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\
                    \"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\
                    \"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(jcs(input).unwrap(), want);
    }

    #[test]
    fn rfc8785_string_and_literal_example() {
        // RFC 8785 §3.2.2 input without the "numbers" member (Valv rejects fractions).
        let input = r#"{
            "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
            "literals": [null, true, false]
        }"#;
        let want = r#"{"literals":[null,true,false],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(jcs(input).unwrap(), want);
    }

    #[test]
    fn rfc8785_utf8_example() {
        // RFC 8785 §3.2.4: the canonical form is UTF-8.
        let out = jcs(r#"{"Unnormalized Unicode":"A\u030a"}"#).unwrap();
        assert_eq!(out.as_bytes(), b"{\"Unnormalized Unicode\":\"A\xcc\x8a\"}");
    }

    #[test]
    fn escapes_all_controls() {
        let s: String = (0u8..0x20)
            .map(char::from)
            .chain(['\u{7f}', '\u{2028}', '/'])
            .collect();
        let out = canonical_json(&Value::String(s)).unwrap();
        assert_eq!(
            out,
            "\"\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005\\u0006\\u0007\\b\\t\\n\\u000b\\f\\r\
             \\u000e\\u000f\\u0010\\u0011\\u0012\\u0013\\u0014\\u0015\\u0016\\u0017\\u0018\
             \\u0019\\u001a\\u001b\\u001c\\u001d\\u001e\\u001f\u{7f}\u{2028}/\""
        );
    }

    #[test]
    fn integers() {
        assert_eq!(
            jcs("[0, -0, 1, -1, 9007199254740991, -9007199254740991]").unwrap(),
            "[0,0,1,-1,9007199254740991,-9007199254740991]"
        );
        assert_eq!(jcs("[1.0, -0.0, 1e2, 4.50e1]").unwrap(), "[1,0,100,45]");
        for bad in [
            "4.5",
            "1e-3",
            "9007199254740992",
            "-9007199254740992",
            "18446744073709551615",
            "-9223372036854775808",
            "1e300",
        ] {
            assert!(
                matches!(jcs(bad), Err(AuditError::UnsupportedNumber(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn nested_and_whitespace_free() {
        let v = json!({"b": [1, {"z": null, "a": "x"}], "a": {}, "c": []});
        assert_eq!(
            canonical_json(&v).unwrap(),
            r#"{"a":{},"b":[1,{"a":"x","z":null}],"c":[]}"#
        );
    }

    #[test]
    fn leaf_hash_of_entry() {
        let v = json!({"b": 2, "a": "x"});
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(br#"{"a":"x","b":2}"#);
        let want: Hash = sha2::Digest::finalize(sha2::Digest::chain_update(
            <sha2::Sha256 as sha2::Digest>::new(),
            &bytes,
        ))
        .into();
        assert_eq!(entry_leaf_hash(&v).unwrap(), want);
        // Key order in the input does not matter.
        let w: Value = serde_json::from_str(r#"{"a":"x","b":2}"#).unwrap();
        assert_eq!(entry_leaf_hash(&w).unwrap(), want);
    }
}
