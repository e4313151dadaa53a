//! The top-level members of a JSON object, found by a structural scan: strings and nesting are
//! followed byte by byte and nothing else is parsed, so a caller that wants a few members reads
//! only those and stops when it has them. Search results are tested on their stored JSON this way
//! (`search::all_match_json`), where parsing every member of every result was a sixth of a
//! search's time.
//!
//! Members not read are not checked: a defect after the last member a caller reads goes unnoticed
//! (the members read are parsed by serde_json, so what a caller gets is checked JSON). The stored
//! JSON this is used on is Valv's own serialization of a parsed object, authenticated before it
//! is read.

use std::borrow::Cow;

/// A member's name and the raw bytes of its value.
pub type Member<'a> = (Cow<'a, str>, &'a [u8]);

/// The members of the object `json`, in order; `None` if it does not start as an object. Each
/// item is `None` where the JSON is malformed (and the iteration then ends).
pub fn of(json: &[u8]) -> Option<Members<'_>> {
    let mut scan = Members { json, at: 0, state: State::First };
    scan.skip_ws();
    (scan.byte() == Some(b'{')).then(|| {
        scan.at += 1;
        scan
    })
}

/// An iterator over an object's members (see [`of`]).
pub struct Members<'a> {
    json: &'a [u8],
    at: usize,
    state: State,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    First,
    Next,
    Ended,
}

impl<'a> Iterator for Members<'a> {
    type Item = Option<Member<'a>>;

    fn next(&mut self) -> Option<Option<Member<'a>>> {
        if self.state == State::Ended {
            return None;
        }
        let member = self.member();
        if !matches!(member, Some(Some(_))) {
            self.state = State::Ended;
        }
        member
    }
}

impl<'a> Members<'a> {
    /// The next member; `None` at the object's end, `Some(None)` where the JSON is malformed.
    fn member(&mut self) -> Option<Option<Member<'a>>> {
        self.skip_ws();
        match (self.state, self.byte()) {
            (State::First, Some(b'}')) => return None,
            (State::First, _) => {}
            (State::Next, Some(b',')) => {
                self.at += 1;
                self.skip_ws();
            }
            (State::Next, Some(b'}')) => return None,
            _ => return Some(None),
        }
        self.state = State::Next;
        Some(self.name_and_value())
    }

    fn name_and_value(&mut self) -> Option<Member<'a>> {
        let start = self.at;
        self.skip_string()?;
        let quoted = &self.json[start..self.at];
        let name = match std::str::from_utf8(&quoted[1..quoted.len() - 1]) {
            Ok(plain) if !plain.contains('\\') => Cow::Borrowed(plain),
            _ => Cow::Owned(serde_json::from_slice::<String>(quoted).ok()?),
        };
        self.skip_ws();
        if self.byte()? != b':' {
            return None;
        }
        self.at += 1;
        self.skip_ws();
        let start = self.at;
        self.skip_value()?;
        Some((name, &self.json[start..self.at]))
    }

    fn byte(&self) -> Option<u8> {
        self.json.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.byte(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// Past the string starting at the current byte (a `"`).
    fn skip_string(&mut self) -> Option<()> {
        if self.byte()? != b'"' {
            return None;
        }
        self.at += 1;
        loop {
            let rest = self.json.get(self.at..)?;
            let special = rest.iter().position(|b| matches!(b, b'"' | b'\\'))?;
            self.at += special;
            if self.json[self.at] == b'"' {
                self.at += 1;
                return Some(());
            }
            self.at += 2; // a backslash and the character it escapes
        }
    }

    /// Past the value starting at the current byte: a string, an object or array with everything
    /// nested in it, or a number or literal (its bytes up to the next delimiter).
    fn skip_value(&mut self) -> Option<()> {
        match self.byte()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.byte()? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                let start = self.at;
                while !matches!(self.byte(), None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')) {
                    self.at += 1;
                }
                (self.at > start).then_some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// What the scan gives, each value parsed; `None` if any item is malformed or a value does
    /// not parse.
    fn scanned(json: &[u8]) -> Option<Vec<(String, Value)>> {
        of(json)?.map(|m| m.and_then(|(n, raw)| Some((n.into_owned(), serde_json::from_slice(raw).ok()?)))).collect()
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\"\\\\/{}\\[\\],: é\u{1F600}\n]{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                prop::collection::btree_map(name(), inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn name() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["id", "meta", "value", "valueQuantity", "a\"b", "back\\slash", "", "é", "subject", "{", "]"]).prop_map(String::from)
    }

    proptest! {
        /// Every member of an object, compact or pretty, is found with the value serde_json reads.
        #[test]
        fn members_are_those_serde_json_reads(members in prop::collection::btree_map(name(), value(), 0..8), pretty in any::<bool>()) {
            let object = Value::Object(members.clone().into_iter().collect());
            let bytes = if pretty { serde_json::to_vec_pretty(&object) } else { serde_json::to_vec(&object) }.expect("serializes");
            let expected: Vec<(String, Value)> = object.as_object().expect("object").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            prop_assert_eq!(scanned(&bytes), Some(expected));
        }

        /// Any bytes: no panic, and whatever serde_json reads as an object is scanned the same.
        #[test]
        fn any_bytes_scan_without_panic(bytes in prop::collection::vec(prop::sample::select(b"{}[]\",:\\ ab1.-tn\x00\xff".to_vec()), 0..40)) {
            let got = scanned(&bytes);
            if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&bytes) {
                // (serde_json keeps the last of a repeated name; the scan gives each.)
                let mut names: Vec<String> = got.expect("a valid object scans").into_iter().map(|(n, _)| n).collect();
                names.sort();
                names.dedup();
                prop_assert_eq!(names, map.keys().cloned().collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn not_objects_and_malformed_objects() {
        assert!(of(b"[1]").is_none() && of(b"").is_none() && of(b"  \"x\"").is_none());
        assert_eq!(scanned(b" { } "), Some(vec![]));
        assert_eq!(scanned(br#"{"a":1,"b":{"c":[1,"]}"]},"d":"x\"y"}"#), Some(vec![("a".into(), json!(1)), ("b".into(), json!({"c": [1, "]}"]})), ("d".into(), json!("x\"y"))]));
        for malformed in [&br#"{"a" 1}"#[..], br#"{"a":}"#, br#"{"a":1 "b":2}"#, br#"{"a":"open"#, br#"{"a":[1,2"#, br#"{a:1}"#, br#"{"a":1,}"#] {
            assert_eq!(scanned(malformed), None, "{}", String::from_utf8_lossy(malformed));
        }
        // A caller that stops early never reads what follows.
        let mut m = of(br#"{"a":1,"b":"#).expect("object");
        assert_eq!(m.next().flatten().map(|(n, raw)| (n.into_owned(), raw.to_vec())), Some(("a".into(), b"1".to_vec())));
    }
}
