//! FHIRPath Patch (R4 fhirpatch.html): a `Parameters` resource of `operation`s (`add`, `insert`,
//! `delete`, `replace`, `move`) whose `path`s are FHIRPath expressions, applied all or nothing.
//!
//! Valv evaluates the subset of FHIRPath that patches use: the resource type, element names,
//! indexers `[n]`, `first()`, `last()` and `where(a.b = 'literal')` (strings, numbers, booleans).
//! Anything else is refused (`not-supported`), never guessed at.

use crate::FhirError;
use serde_json::{Map, Value};

/// One step of a location inside a resource.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// One step of a path expression.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Name(String),
    Index(usize),
    First,
    Last,
    Where(Vec<String>, Value),
}

/// Applies a FHIRPath Patch `Parameters` to `doc`, returning the result; `doc` is untouched.
pub fn apply(doc: &Value, patch: &Value) -> Result<Value, FhirError> {
    let params = patch.get("parameter").and_then(Value::as_array).ok_or_else(|| FhirError::invalid("a FHIRPath Patch is a Parameters resource with 'operation' parameters"))?;
    let resource_type = doc.get("resourceType").and_then(Value::as_str).unwrap_or_default().to_string();
    let mut out = doc.clone();
    for (i, p) in params.iter().enumerate() {
        let at = |e: FhirError| FhirError { message: format!("operation {i}: {}", e.message), ..e };
        if p.get("name").and_then(Value::as_str) != Some("operation") {
            return Err(at(FhirError::invalid("every parameter of a FHIRPath Patch is named 'operation'")));
        }
        operation(&mut out, &resource_type, p).map_err(at)?;
    }
    Ok(out)
}

fn part<'a>(op: &'a Value, name: &str) -> Option<&'a Value> {
    op.get("part")?.as_array()?.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

fn part_str<'a>(op: &'a Value, name: &str) -> Result<&'a str, FhirError> {
    part(op, name)
        .and_then(|p| p.as_object()?.iter().find(|(k, _)| k.starts_with("value")).and_then(|(_, v)| v.as_str()))
        .ok_or_else(|| FhirError::invalid(format!("'{name}' is missing")))
}

fn part_index(op: &Value, name: &str) -> Result<usize, FhirError> {
    part(op, name)
        .and_then(|p| p.get("valueInteger"))
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| FhirError::invalid(format!("'{name}' is missing or not a valueInteger")))
}

/// The `value` part: a `value[x]`, or nested parts naming the elements of a complex value.
fn part_value(op: &Value) -> Result<Value, FhirError> {
    let p = part(op, "value").ok_or_else(|| FhirError::invalid("'value' is missing"))?;
    value_of(p)
}

fn value_of(p: &Value) -> Result<Value, FhirError> {
    if let Some((_, v)) = p.as_object().and_then(|m| m.iter().find(|(k, _)| k.starts_with("value"))) {
        return Ok(v.clone());
    }
    let parts = p.get("part").and_then(Value::as_array).ok_or_else(|| FhirError::invalid("a value is a value[x] or parts"))?;
    let mut obj = Map::new();
    for sub in parts {
        let name = sub.get("name").and_then(Value::as_str).ok_or_else(|| FhirError::invalid("a part of a value needs a name"))?;
        let v = value_of(sub)?;
        match obj.get_mut(name) {
            Some(Value::Array(items)) => items.push(v),
            Some(single) => *single = Value::Array(vec![single.clone(), v]),
            None => {
                obj.insert(name.to_string(), v);
            }
        }
    }
    Ok(Value::Object(obj))
}

fn operation(doc: &mut Value, resource_type: &str, op: &Value) -> Result<(), FhirError> {
    let kind = part(op, "type").and_then(|p| p.get("valueCode")).and_then(Value::as_str).ok_or_else(|| FhirError::invalid("'type' (a valueCode) is missing"))?;
    let path = parse_path(part_str(op, "path")?, resource_type)?;
    match kind {
        "add" => {
            let name = part_str(op, "name")?.to_string();
            let value = part_value(op)?;
            let loc = single(&evaluate(doc, &path), "add")?;
            let mut names: Vec<&str> = key_names(&loc);
            names.push(&name);
            let repeats = crate::r4::repeats(resource_type, &names);
            let target = get_mut(doc, &loc)?.as_object_mut().ok_or_else(|| FhirError::processing("'add' needs its path to name an element with children"))?;
            match (target.get_mut(&name), repeats) {
                (Some(Value::Array(items)), _) => items.push(value),
                (Some(_), _) => return Err(FhirError::processing(format!("'{name}' has a value already: use replace"))),
                (None, Some(true)) => {
                    target.insert(name, Value::Array(vec![value]));
                }
                (None, _) => {
                    target.insert(name, value);
                }
            }
        }
        "insert" | "move" => {
            let (parent, name) = split_list(&path)?;
            let loc = single(&evaluate(doc, &parent), kind)?;
            let target = get_mut(doc, &loc)?.as_object_mut().ok_or_else(|| FhirError::processing(format!("'{kind}' needs a list")))?;
            let list = target.entry(name.clone()).or_insert_with(|| Value::Array(Vec::new()));
            let Value::Array(items) = list else { return Err(FhirError::processing(format!("'{name}' is not a list"))) };
            if kind == "insert" {
                let index = part_index(op, "index")?;
                if index > items.len() {
                    return Err(FhirError::processing(format!("index {index} is beyond the list of {} items", items.len())));
                }
                items.insert(index, part_value(op)?);
            } else {
                let (from, to) = (part_index(op, "source")?, part_index(op, "destination")?);
                if from >= items.len() || to >= items.len() {
                    return Err(FhirError::processing(format!("source {from} or destination {to} is beyond the list of {} items", items.len())));
                }
                let item = items.remove(from);
                items.insert(to, item);
            }
        }
        "delete" => {
            let locs = evaluate(doc, &path);
            match locs.len() {
                0 => {}
                1 => remove(doc, &locs[0])?,
                n => return Err(FhirError::processing(format!("the path names {n} elements; 'delete' takes one"))),
            }
        }
        "replace" => {
            let value = part_value(op)?;
            let loc = single(&evaluate(doc, &path), "replace")?;
            *get_mut(doc, &loc)? = value;
        }
        other => return Err(FhirError::invalid(format!("'{other}' is not a FHIRPath Patch operation (add, insert, delete, replace, move)"))),
    }
    Ok(())
}

fn single(locs: &[Vec<Seg>], op: &str) -> Result<Vec<Seg>, FhirError> {
    match locs {
        [one] => Ok(one.clone()),
        [] => Err(FhirError::processing(format!("the path names nothing; '{op}' needs one element"))),
        many => Err(FhirError::processing(format!("the path names {} elements; '{op}' needs one", many.len()))),
    }
}

fn key_names(loc: &[Seg]) -> Vec<&str> {
    loc.iter().filter_map(|s| if let Seg::Key(k) = s { Some(k.as_str()) } else { None }).collect()
}

/// For `insert` and `move`: the path up to the list, and the list's name (the last step).
fn split_list(path: &[Step]) -> Result<(Vec<Step>, String), FhirError> {
    match path.split_last() {
        Some((Step::Name(n), parent)) => Ok((parent.to_vec(), n.clone())),
        _ => Err(FhirError::invalid("the path of 'insert' and 'move' ends with the list's element name")),
    }
}

/// `Type.a.b[0].where(c = 'x').first()`: the steps after the resource type.
fn parse_path(text: &str, resource_type: &str) -> Result<Vec<Step>, FhirError> {
    let unsupported = || FhirError::not_supported(format!("the FHIRPath '{text}' uses more than Valv evaluates (names, [n], first(), last(), where(a.b = 'x'))"));
    let mut rest = text.trim();
    let head_len = rest.find(['.', '[']).unwrap_or(rest.len());
    if &rest[..head_len] != resource_type {
        return Err(FhirError::invalid(format!("a path starts with the resource type, {resource_type}: '{text}'")));
    }
    rest = &rest[head_len..];
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(unsupported)?;
            steps.push(Step::Index(r[..end].trim().parse().map_err(|_| unsupported())?));
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('.') {
            if let Some(r2) = r.strip_prefix("first()") {
                steps.push(Step::First);
                rest = r2;
            } else if let Some(r2) = r.strip_prefix("last()") {
                steps.push(Step::Last);
                rest = r2;
            } else if let Some(r2) = r.strip_prefix("where(") {
                let end = r2.find(')').ok_or_else(unsupported)?;
                let (lhs, rhs) = r2[..end].split_once('=').ok_or_else(unsupported)?;
                let names: Vec<String> = lhs.trim().split('.').map(str::to_string).collect();
                if names.iter().any(|n| !is_name(n)) {
                    return Err(unsupported());
                }
                steps.push(Step::Where(names, literal(rhs.trim()).ok_or_else(unsupported)?));
                rest = &r2[end + 1..];
            } else {
                let end = r.find(['.', '[']).unwrap_or(r.len());
                if !is_name(&r[..end]) {
                    return Err(unsupported());
                }
                steps.push(Step::Name(r[..end].to_string()));
                rest = &r[end..];
            }
        } else {
            return Err(unsupported());
        }
    }
    Ok(steps)
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && s.starts_with(|c: char| c.is_ascii_alphabetic())
}

fn literal(s: &str) -> Option<Value> {
    if let Some(inner) = s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return Some(Value::String(inner.replace("\\'", "'")));
    }
    match s {
        "true" => Some(Value::Bool(true)),
        "false" => Some(Value::Bool(false)),
        _ => serde_json::from_str::<serde_json::Number>(s).ok().map(Value::Number),
    }
}

/// The locations a path names, in document order (arrays flattened, as FHIRPath collections).
fn evaluate(doc: &Value, path: &[Step]) -> Vec<Vec<Seg>> {
    let mut current: Vec<Vec<Seg>> = vec![Vec::new()];
    for step in path {
        current = match step {
            Step::Name(name) => current
                .iter()
                .flat_map(|loc| {
                    let mut out = Vec::new();
                    if let Some(Value::Object(m)) = get(doc, loc) {
                        // A choice element is named by its base (`value` for `valueQuantity`).
                        let key = m.keys().find(|k| *k == name || (k.starts_with(name.as_str()) && k[name.len()..].starts_with(|c: char| c.is_ascii_uppercase())));
                        if let Some(key) = key {
                            let mut at = loc.clone();
                            at.push(Seg::Key(key.clone()));
                            match &m[key] {
                                Value::Array(items) => out.extend((0..items.len()).map(|i| {
                                    let mut item = at.clone();
                                    item.push(Seg::Index(i));
                                    item
                                })),
                                _ => out.push(at),
                            }
                        }
                    }
                    out
                })
                .collect(),
            Step::Index(n) => current.get(*n).cloned().into_iter().collect(),
            Step::First => current.first().cloned().into_iter().collect(),
            Step::Last => current.last().cloned().into_iter().collect(),
            Step::Where(names, want) => current
                .into_iter()
                .filter(|loc| {
                    let steps: Vec<Step> = names.iter().map(|n| Step::Name(n.clone())).collect();
                    let Some(item) = get(doc, loc) else { return false };
                    evaluate(item, &steps).iter().any(|l| get(item, l) == Some(want))
                })
                .collect(),
        };
    }
    current
}

fn get<'a>(doc: &'a Value, loc: &[Seg]) -> Option<&'a Value> {
    loc.iter().try_fold(doc, |v, s| match s {
        Seg::Key(k) => v.get(k),
        Seg::Index(i) => v.get(*i),
    })
}

fn get_mut<'a>(doc: &'a mut Value, loc: &[Seg]) -> Result<&'a mut Value, FhirError> {
    loc.iter()
        .try_fold(doc, |v, s| match s {
            Seg::Key(k) => v.get_mut(k),
            Seg::Index(i) => v.get_mut(*i),
        })
        .ok_or_else(|| FhirError::processing("the path names nothing"))
}

fn remove(doc: &mut Value, loc: &[Seg]) -> Result<(), FhirError> {
    let (last, parent) = loc.split_last().ok_or_else(|| FhirError::processing("the whole resource cannot be deleted"))?;
    match (get_mut(doc, parent)?, last) {
        (Value::Object(m), Seg::Key(k)) => {
            m.remove(k);
        }
        (Value::Array(items), Seg::Index(i)) => {
            items.remove(*i);
            if items.is_empty() {
                // An empty list is not valid FHIR JSON: the element goes.
                return remove(doc, parent);
            }
        }
        _ => return Err(FhirError::processing("the path names nothing")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(parts: Value) -> Value {
        json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": parts}]})
    }

    fn patient() -> Value {
        json!({"resourceType": "Patient", "id": "p", "identifier": [{"system": "urn:a", "value": "1"}, {"system": "urn:b", "value": "2"}],
            "name": [{"family": "Berg", "given": ["Anna"]}], "birthDate": "1970-01-01"})
    }

    #[test]
    fn operations_of_the_r4_examples() {
        let p = patient();
        let added = apply(&p, &op(json!([{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "female"}]))).expect("add");
        assert_eq!(added["gender"], "female");
        // Adding a repeating element makes a list (the definitions say it repeats).
        let telecom = apply(&p, &op(json!([{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"}, {"name": "name", "valueString": "telecom"},
            {"name": "value", "part": [{"name": "system", "valueCode": "phone"}, {"name": "value", "valueString": "555"}]}]))).expect("add complex");
        assert_eq!(telecom["telecom"], json!([{"system": "phone", "value": "555"}]));
        let given = apply(&p, &op(json!([{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient.name[0]"},
            {"name": "name", "valueString": "given"}, {"name": "value", "valueString": "Maria"}]))).expect("add to a list");
        assert_eq!(given["name"][0]["given"], json!(["Anna", "Maria"]));
        let inserted = apply(&p, &op(json!([{"name": "type", "valueCode": "insert"}, {"name": "path", "valueString": "Patient.identifier"},
            {"name": "index", "valueInteger": 0}, {"name": "value", "valueIdentifier": {"system": "urn:c", "value": "3"}}]))).expect("insert");
        assert_eq!(inserted["identifier"][0]["system"], "urn:c");
        let deleted = apply(&p, &op(json!([{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.identifier.where(system = 'urn:a')"}]))).expect("delete");
        assert_eq!(deleted["identifier"], json!([{"system": "urn:b", "value": "2"}]));
        let replaced = apply(&p, &op(json!([{"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.birthDate"}, {"name": "value", "valueDate": "1971-02-03"}]))).expect("replace");
        assert_eq!(replaced["birthDate"], "1971-02-03");
        let moved = apply(&p, &op(json!([{"name": "type", "valueCode": "move"}, {"name": "path", "valueString": "Patient.identifier"},
            {"name": "source", "valueInteger": 1}, {"name": "destination", "valueInteger": 0}]))).expect("move");
        assert_eq!(moved["identifier"][0]["system"], "urn:b");
        let last = apply(&p, &op(json!([{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.name.first().given"}]))).expect("delete the only given");
        assert!(last["name"][0].get("given").is_none(), "an emptied list goes: {last}");
        let nothing = apply(&p, &op(json!([{"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.telecom"}]))).expect("delete of nothing");
        assert_eq!(nothing, p);
    }

    #[test]
    fn what_cannot_apply_is_refused_and_names_itself() {
        let p = patient();
        for (parts, says) in [
            (json!([{"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.identifier"}, {"name": "value", "valueString": "x"}]), "2 elements"),
            (json!([{"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Observation.status"}, {"name": "value", "valueString": "x"}]), "starts with the resource type"),
            (json!([{"name": "type", "valueCode": "add"}, {"name": "path", "valueString": "Patient"}, {"name": "name", "valueString": "birthDate"}, {"name": "value", "valueDate": "2000"}]), "has a value already"),
            (json!([{"name": "type", "valueCode": "insert"}, {"name": "path", "valueString": "Patient.identifier"}, {"name": "index", "valueInteger": 5}, {"name": "value", "valueString": "x"}]), "beyond"),
            (json!([{"name": "type", "valueCode": "replace"}, {"name": "path", "valueString": "Patient.name.resolve()"}, {"name": "value", "valueString": "x"}]), "uses more than Valv evaluates"),
            (json!([{"name": "type", "valueCode": "frobnicate"}, {"name": "path", "valueString": "Patient"}]), "not a FHIRPath Patch operation"),
        ] {
            let e = apply(&p, &op(parts.clone())).expect_err("refused");
            assert!(e.message.starts_with("operation 0:") && e.message.contains(says), "{parts}: {}", e.message);
        }
    }
}
