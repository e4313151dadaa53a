//! PATCH documents applied to a resource's JSON: JSON Patch (RFC 6902, with JSON Pointer, RFC
//! 6901) and JSON Merge Patch (RFC 7386); FHIRPath Patch is [`crate::fhirpatch`]. Pure: the caller validates the result as a resource.
//!
//! A patch is applied to a copy, all of it or none. Its growth is bounded: `copy` can double a
//! document with each operation, so the bytes a patch may add are counted against `limit`.

use crate::FhirError;
use serde_json::{Map, Value};

/// Most operations in one JSON Patch document.
pub const MAX_OPERATIONS: usize = 10_000;

/// Applies a JSON Patch document (an array of operations) to `doc`, returning the result; `doc`
/// itself is untouched. A malformed document is `invalid` (400); an operation that cannot apply —
/// a missing target, a failed `test` — is `processing` (422); a result that would grow past
/// `limit` bytes (roughly, as JSON) is `processing` too.
pub fn json_patch(doc: &Value, patch: &Value, limit: usize) -> Result<Value, FhirError> {
    let ops = patch.as_array().ok_or_else(|| FhirError::invalid("a JSON Patch document is an array of operations"))?;
    if ops.len() > MAX_OPERATIONS {
        return Err(FhirError::invalid(format!("a JSON Patch document holds at most {MAX_OPERATIONS} operations")));
    }
    let mut out = doc.clone();
    let mut size = json_size(doc);
    for (i, op) in ops.iter().enumerate() {
        let at = |e: FhirError| FhirError { message: format!("operation {i}: {}", e.message), ..e };
        let added = apply_op(&mut out, op).map_err(at)?;
        size = size.saturating_add(added);
        if size > limit {
            return Err(at(FhirError::processing(format!("the patched resource would exceed {limit} bytes"))));
        }
    }
    Ok(out)
}

/// Applies a JSON Merge Patch (an object: members set, `null` members removed, objects merged
/// recursively, anything else replaced) to `doc`, returning the result.
pub fn merge_patch(doc: &Value, patch: &Value) -> Result<Value, FhirError> {
    if !patch.is_object() {
        return Err(FhirError::invalid("a JSON Merge Patch for a resource is a JSON object"));
    }
    let mut out = doc.clone();
    merge(&mut out, patch);
    Ok(out)
}

fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in members {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Applies one operation; returns roughly how many bytes it added.
fn apply_op(doc: &mut Value, op: &Value) -> Result<usize, FhirError> {
    let obj = op.as_object().ok_or_else(|| FhirError::invalid("an operation is a JSON object"))?;
    let field = |name: &str| obj.get(name).and_then(Value::as_str).ok_or_else(|| FhirError::invalid(format!("'{name}' is missing or not a string")));
    let value = || obj.get("value").ok_or_else(|| FhirError::invalid("'value' is missing"));
    let path = parse_pointer(field("path")?)?;
    match field("op")? {
        "add" => {
            let v = value()?.clone();
            let n = json_size(&v);
            add(doc, &path, v)?;
            Ok(n)
        }
        "remove" => remove(doc, &path).map(|_| 0),
        "replace" => {
            let v = value()?.clone();
            let n = json_size(&v);
            *get_mut(doc, &path)? = v;
            Ok(n)
        }
        "move" => {
            let from = parse_pointer(field("from")?)?;
            if path.len() > from.len() && path[..from.len()] == from[..] {
                return Err(FhirError::invalid("'move' cannot move a value into itself"));
            }
            let v = remove(doc, &from)?;
            add(doc, &path, v)?;
            Ok(0)
        }
        "copy" => {
            let from = parse_pointer(field("from")?)?;
            let v = get_mut(doc, &from)?.clone();
            let n = json_size(&v);
            add(doc, &path, v)?;
            Ok(n)
        }
        "test" => {
            if *get_mut(doc, &path)? == *value()? {
                Ok(0)
            } else {
                Err(FhirError::processing(format!("test failed: the value at '{}' differs", field("path")?)))
            }
        }
        other => Err(FhirError::invalid(format!("'{other}' is not a JSON Patch operation (add, remove, replace, move, copy, test)"))),
    }
}

/// RFC 6901: "" is the whole document; otherwise "/"-separated tokens with `~1` for "/" and `~0`
/// for "~".
fn parse_pointer(text: &str) -> Result<Vec<String>, FhirError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let rest = text.strip_prefix('/').ok_or_else(|| FhirError::invalid(format!("'{text}' is not a JSON Pointer (it must start with '/')")))?;
    rest.split('/')
        .map(|t| {
            if t.replace("~0", "").replace("~1", "").contains('~') {
                return Err(FhirError::invalid(format!("'{text}' has a '~' not followed by 0 or 1")));
            }
            Ok(t.replace("~1", "/").replace("~0", "~"))
        })
        .collect()
}

/// An array index token: digits without a leading zero (RFC 6901 §4), within the array (or,
/// where a value is added, its end, which `-` also names).
fn index(token: &str, len: usize, may_be_end: bool) -> Result<usize, FhirError> {
    if may_be_end && token == "-" {
        return Ok(len);
    }
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) && (token == "0" || !token.starts_with('0'));
    if !digits {
        return Err(FhirError::processing(format!("'{token}' is not an array index")));
    }
    let i = token.parse::<usize>().unwrap_or(usize::MAX);
    if i < len || (may_be_end && i == len) {
        Ok(i)
    } else {
        Err(FhirError::processing(format!("index {token} is out of range (the array has {len} items)")))
    }
}

fn get_mut<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, FhirError> {
    let mut cur = doc;
    for token in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(token).ok_or_else(|| FhirError::processing(format!("there is no member '{token}'")))?,
            Value::Array(a) => {
                let i = index(token, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(FhirError::processing(format!("'{token}' names a member of a value that has none"))),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &[String], v: Value) -> Result<(), FhirError> {
    let Some((last, parent)) = path.split_last() else {
        *doc = v;
        return Ok(());
    };
    match get_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), v);
        }
        Value::Array(a) => {
            let i = index(last, a.len(), true)?;
            a.insert(i, v);
        }
        _ => return Err(FhirError::processing(format!("cannot add '{last}' to a value that is neither object nor array"))),
    }
    Ok(())
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, FhirError> {
    let (last, parent) = path.split_last().ok_or_else(|| FhirError::processing("the whole resource cannot be removed"))?;
    match get_mut(doc, parent)? {
        Value::Object(m) => m.remove(last).ok_or_else(|| FhirError::processing(format!("there is no member '{last}' to remove"))),
        Value::Array(a) => {
            let i = index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(FhirError::processing(format!("cannot remove '{last}' from a value that is neither object nor array"))),
    }
}

/// Roughly the bytes of a value as JSON (strings and keys by length, every other node a few).
fn json_size(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(|x| json_size(x) + 1).sum::<usize>(),
        Value::Object(m) => 2 + m.iter().map(|(k, x)| k.len() + 4 + json_size(x)).sum::<usize>(),
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn patched(doc: Value, ops: Value) -> Result<Value, FhirError> {
        json_patch(&doc, &ops, 1 << 20)
    }

    #[test]
    fn rfc6902_appendix_a_examples() {
        // A.1, A.2, A.3, A.4, A.5, A.6, A.7, A.10, A.16 of RFC 6902.
        assert_eq!(patched(json!({"foo": "bar"}), json!([{"op": "add", "path": "/baz", "value": "qux"}])).expect("applies"), json!({"baz": "qux", "foo": "bar"}));
        assert_eq!(patched(json!({"foo": ["bar", "baz"]}), json!([{"op": "add", "path": "/foo/1", "value": "qux"}])).expect("applies"), json!({"foo": ["bar", "qux", "baz"]}));
        assert_eq!(patched(json!({"baz": "qux", "foo": "bar"}), json!([{"op": "remove", "path": "/baz"}])).expect("applies"), json!({"foo": "bar"}));
        assert_eq!(patched(json!({"foo": ["bar", "qux", "baz"]}), json!([{"op": "remove", "path": "/foo/1"}])).expect("applies"), json!({"foo": ["bar", "baz"]}));
        assert_eq!(patched(json!({"baz": "qux", "foo": "bar"}), json!([{"op": "replace", "path": "/baz", "value": "boo"}])).expect("applies"), json!({"baz": "boo", "foo": "bar"}));
        assert_eq!(
            patched(json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}), json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}])).expect("applies"),
            json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}})
        );
        assert_eq!(patched(json!({"foo": ["all", "grass", "cows", "eat"]}), json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}])).expect("applies"), json!({"foo": ["all", "cows", "eat", "grass"]}));
        assert_eq!(patched(json!({"foo": "bar"}), json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}])).expect("applies"), json!({"foo": "bar", "child": {"grandchild": {}}}));
        assert_eq!(patched(json!({"foo": ["bar"]}), json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}])).expect("applies"), json!({"foo": ["bar", ["abc", "def"]]}));
        // A.8, A.9: tests; A.12: adding to a missing parent; A.15: escapes.
        let doc = json!({"baz": "qux", "foo": ["a", 2, "c"]});
        assert!(patched(doc.clone(), json!([{"op": "test", "path": "/baz", "value": "qux"}, {"op": "test", "path": "/foo/1", "value": 2}])).is_ok());
        let failed = patched(json!({"baz": "qux"}), json!([{"op": "test", "path": "/baz", "value": "bar"}])).expect_err("refused");
        assert_eq!(failed.code, crate::IssueCode::Processing);
        assert!(patched(json!({"foo": "bar"}), json!([{"op": "add", "path": "/baz/bat", "value": "qux"}])).is_err());
        assert!(patched(json!({"/": 9, "~1": 10}), json!([{"op": "test", "path": "/~01", "value": 10}, {"op": "test", "path": "/~1", "value": 9}])).is_ok());
    }

    #[test]
    fn a_failing_operation_leaves_the_document_alone_and_names_itself() {
        let doc = json!({"a": 1});
        let err = json_patch(&doc, &json!([{"op": "replace", "path": "/a", "value": 2}, {"op": "remove", "path": "/missing"}]), 1 << 20).expect_err("refused");
        assert!(err.message.starts_with("operation 1:"), "{}", err.message);
        assert_eq!(doc, json!({"a": 1}));
        for (bad, says) in [
            (json!([{"op": "add"}]), "'path'"),
            (json!([{"op": "frobnicate", "path": "/a"}]), "not a JSON Patch operation"),
            (json!([{"op": "add", "path": "a", "value": 1}]), "JSON Pointer"),
            (json!([{"op": "add", "path": "/a"}]), "'value'"),
            (json!([{"op": "move", "from": "/a", "path": "/a/b"}]), "into itself"),
            (json!([{"op": "remove", "path": "/a/01"}]), "not an array index"),
        ] {
            let e = json_patch(&json!({"a": [1, 2]}), &bad, 1 << 20).expect_err("refused");
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
        assert!(json_patch(&json!({"a": [1]}), &json!([{"op": "remove", "path": "/a/1"}]), 1 << 20).is_err(), "past the end");
        assert!(json_patch(&json!({"a": [1]}), &json!([{"op": "replace", "path": "/a/-", "value": 0}]), 1 << 20).is_err(), "'-' only adds");
    }

    #[test]
    fn copies_cannot_grow_a_document_without_bound() {
        // Each copy doubles the document: 40 of them would make a terabyte.
        let ops: Vec<Value> = (0..40).map(|i| json!({"op": "copy", "from": "", "path": format!("/c{i}")})).collect();
        let err = json_patch(&json!({"x": "y".repeat(100)}), &Value::Array(ops), 1 << 20).expect_err("refused");
        assert!(err.message.contains("would exceed"), "{}", err.message);
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        // RFC 7386 appendix A, a selection.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": {"b": "c"}}), json!({"a": {"b": "d", "c": null}}), json!({"a": {"b": "d"}})),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
        ];
        for (doc, patch, want) in cases {
            assert_eq!(merge_patch(&doc, &patch).expect("applies"), want, "{doc} + {patch}");
        }
        assert!(merge_patch(&json!({}), &json!([1])).is_err());
    }
}
