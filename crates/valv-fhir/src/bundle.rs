//! Bundles: parsing transaction and batch requests (with `urn:uuid:` reference resolution, as
//! Synthea writes them), and building searchset, history and response bundles.

use crate::FhirError;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Transaction,
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Patch,
}

/// One request entry of a transaction or batch.
#[derive(Debug, Clone)]
pub struct Entry {
    pub full_url: Option<String>,
    pub method: Method,
    pub resource_type: String,
    /// The logical id for PUT, DELETE, PATCH and GET; assigned by [`resolve_references`] for a
    /// POST (unless set before, as for a conditional create that matched); none for a
    /// conditional PUT or DELETE until its condition is resolved.
    pub id: Option<String>,
    /// The query part of a GET search (`Observation?code=x`).
    pub query: Option<String>,
    /// Search criteria of a conditional interaction: `request.ifNoneExist` of a POST, the query
    /// of a PUT's or DELETE's `request.url` (`Patient?identifier=x`).
    pub condition: Option<String>,
    pub resource: Option<Value>,
    /// A PATCH's document: a JSON Patch array (sent as a Binary with base64 `data`, R4 http
    /// §3.1.0.6) or a FHIRPath Patch `Parameters`.
    pub patch: Option<Value>,
    /// `request.ifMatch` as a version number.
    pub if_match: Option<u64>,
}

/// Parses and checks a transaction or batch Bundle. Every check that can fail does so here,
/// before anything is written.
pub fn parse(bundle: Value) -> Result<(BundleKind, Vec<Entry>), FhirError> {
    let Value::Object(mut map) = bundle else {
        return Err(FhirError::structure("a Bundle must be a JSON object"));
    };
    let kind = match map.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        Some(other) => {
            return Err(FhirError::processing(format!(
                "Bundle.type '{other}' cannot be processed: POST /fhir takes 'transaction' or 'batch'"
            )))
        }
        None => return Err(FhirError::structure("Bundle.type is required")),
    };
    let entries = match map.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(FhirError::structure("Bundle.entry must be an array")),
    };
    let parsed = entries.into_iter().enumerate().map(|(i, e)| parse_entry(i, e, kind)).collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashSet::new();
    for (i, e) in parsed.iter().enumerate() {
        if let Some(u) = &e.full_url {
            if !seen.insert(u.as_str()) {
                return Err(FhirError::processing(format!("Bundle.entry[{i}].fullUrl '{u}' appears more than once")));
            }
        }
    }
    Ok((kind, parsed))
}

fn parse_entry(i: usize, entry: Value, kind: BundleKind) -> Result<Entry, FhirError> {
    let at = |m: &str| FhirError::structure(format!("Bundle.entry[{i}]: {m}"));
    let Value::Object(mut e) = entry else { return Err(at("an entry must be an object")) };
    let full_url = match e.remove("fullUrl") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(at("fullUrl must be a string")),
    };
    let request = e.remove("request").ok_or_else(|| at("request is required in a transaction or batch"))?;
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("PATCH") => Method::Patch,
        Some(m) => return Err(FhirError::not_supported(format!("Bundle.entry[{i}]: request.method '{m}' is not supported"))),
        None => return Err(at("request.method is required")),
    };
    if method == Method::Get && kind == BundleKind::Transaction {
        return Err(FhirError::not_supported(format!(
            "Bundle.entry[{i}]: GET inside a transaction is not supported; use a batch for reads"
        )));
    }
    if request.get("ifNoneMatch").is_some() || request.get("ifModifiedSince").is_some() {
        return Err(FhirError::not_supported(format!("Bundle.entry[{i}]: ifNoneMatch and ifModifiedSince are not supported")));
    }
    let if_none_exist = match request.get("ifNoneExist") {
        None => None,
        // The criteria, bare or after a relative URL's '?' as some clients send them.
        Some(Value::String(c)) if method == Method::Post => Some(c.split_once('?').map_or(c.as_str(), |(_, q)| q).to_string()),
        Some(_) => return Err(FhirError::processing(format!("Bundle.entry[{i}]: ifNoneExist is a string of search parameters, on POST entries only"))),
    };
    let url = request.get("url").and_then(Value::as_str).ok_or_else(|| at("request.url is required"))?;
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (resource_type, id, condition, query) = match (method, segments.as_slice()) {
        (Method::Post, [t]) if query.is_none() => ((*t).to_string(), None, if_none_exist, None),
        (Method::Get, [t]) => ((*t).to_string(), None, None, query),
        (Method::Put | Method::Delete, [t]) if query.as_deref().is_some_and(|q| !q.is_empty()) => ((*t).to_string(), None, query, None),
        (Method::Put | Method::Delete | Method::Get | Method::Patch, [t, id]) if query.is_none() => ((*t).to_string(), Some((*id).to_string()), None, None),
        _ => return Err(FhirError::processing(format!("Bundle.entry[{i}]: request.url '{url}' does not fit method {method:?}"))),
    };
    if !crate::r4::is_resource_type(&resource_type) {
        return Err(FhirError::processing(format!("Bundle.entry[{i}]: '{resource_type}' is not an R4 resource type")));
    }
    if let Some(id) = &id {
        if !crate::id::is_valid_id(id) {
            return Err(FhirError::processing(format!("Bundle.entry[{i}]: '{id}' is not a valid id")));
        }
    }
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        Some(tag) => Some(parse_etag(tag).ok_or_else(|| at(&format!("ifMatch '{tag}' is not a version ETag")))?),
        None => None,
    };
    let mut resource = e.remove("resource");
    let patch = match method {
        Method::Patch => Some(patch_document(i, resource.take())?),
        _ => None,
    };
    match (method, &resource) {
        (Method::Post | Method::Put, None) => return Err(at("resource is required for POST and PUT")),
        (Method::Post | Method::Put, Some(r)) => {
            let rt = r.get("resourceType").and_then(Value::as_str);
            if rt != Some(resource_type.as_str()) {
                return Err(FhirError::processing(format!(
                    "Bundle.entry[{i}]: resource.resourceType '{}' does not match request.url '{url}'",
                    rt.unwrap_or("(missing)")
                )));
            }
            if method == Method::Put && id.is_some() && r.get("id").and_then(Value::as_str).is_some_and(|rid| Some(rid) != id.as_deref()) {
                return Err(FhirError::processing(format!("Bundle.entry[{i}]: resource.id does not match request.url '{url}'")));
            }
        }
        _ => {}
    }
    Ok(Entry { full_url, method, resource_type, id, query, condition, resource, if_match, patch })
}

/// A PATCH entry's document: a Binary holding a JSON Patch, base64 in `data`, or a Parameters
/// resource (a FHIRPath Patch), as is.
fn patch_document(i: usize, resource: Option<Value>) -> Result<Value, FhirError> {
    use base64::Engine;
    let at = |m: &str| FhirError::processing(format!("Bundle.entry[{i}]: {m}"));
    let r = resource.ok_or_else(|| at("a PATCH entry carries its patch as a Binary resource"))?;
    match r.get("resourceType").and_then(Value::as_str) {
        Some("Binary") => {}
        // A FHIRPath Patch: the Parameters resource itself.
        Some("Parameters") => return Ok(r),
        _ => return Err(at("a PATCH entry carries its patch as a Binary (JSON Patch) or a Parameters (FHIRPath Patch) resource")),
    }
    if r.get("contentType").and_then(Value::as_str) != Some("application/json-patch+json") {
        return Err(at("the Binary of a PATCH entry must have contentType application/json-patch+json"));
    }
    let data = r.get("data").and_then(Value::as_str).ok_or_else(|| at("the Binary of a PATCH entry needs its data"))?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| at("the Binary's data is not base64"))?;
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| at(&format!("the Binary's data is not JSON: {e}")))?;
    if !doc.is_array() {
        return Err(at("a JSON Patch document is an array of operations"));
    }
    Ok(doc)
}

/// Parses a weak or strong ETag (`W/"3"`, `"3"`, `3`) into a version number.
pub fn parse_etag(tag: &str) -> Option<u64> {
    let t = tag.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.trim_matches('"').parse().ok()
}

/// Assigns ids to POST entries (through `new_id`) and rewrites every reference to an entry's
/// fullUrl into `Type/id`. A `urn:uuid:` or `urn:oid:` reference that names no entry is an error:
/// a transaction must not store a dangling placeholder.
pub fn resolve_references(entries: &mut [Entry], mut new_id: impl FnMut() -> String) -> Result<(), FhirError> {
    let mut map: HashMap<String, String> = HashMap::new();
    for e in entries.iter_mut() {
        if e.method == Method::Post && e.id.is_none() {
            e.id = Some(new_id());
        }
        if let (Some(full), Some(id)) = (&e.full_url, &e.id) {
            if matches!(e.method, Method::Post | Method::Put) {
                map.insert(full.clone(), format!("{}/{id}", e.resource_type));
            }
        }
    }
    for (i, e) in entries.iter_mut().enumerate() {
        if let Some(r) = e.resource.as_mut() {
            rewrite(r, &map).map_err(|bad| {
                FhirError::processing(format!("Bundle.entry[{i}]: reference '{bad}' does not resolve to an entry of this Bundle"))
            })?;
        }
    }
    Ok(())
}

fn rewrite(value: &mut Value, map: &HashMap<String, String>) -> Result<(), String> {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                if let ("reference", Value::String(s)) = (k.as_str(), &mut *v) {
                    if let Some(target) = map.get(s.as_str()) {
                        *s = target.clone();
                    } else if s.starts_with("urn:uuid:") || s.starts_with("urn:oid:") {
                        return Err(s.clone());
                    }
                } else if let ("url", Value::String(s)) = (k.as_str(), &mut *v) {
                    // A `url` naming an entry (an Attachment's: R4 §3.1.0.11.2 rewrites url and
                    // uri elements too); other urn: URLs are left as they are.
                    if let Some(target) = map.get(s.as_str()) {
                        *s = target.clone();
                    }
                } else {
                    rewrite(v, map)?;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(|v| rewrite(v, map)),
        _ => Ok(()),
    }
}

/// One `Bundle.link`.
pub fn link(relation: &str, url: &str) -> Value {
    json!({"relation": relation, "url": url})
}

/// A `searchset` or `history` Bundle.
pub fn collection(kind: &str, id: &str, total: Option<usize>, links: Vec<Value>, entries: Vec<Value>) -> Value {
    let mut b = Map::new();
    b.insert("resourceType".into(), json!("Bundle"));
    b.insert("id".into(), json!(id));
    b.insert("type".into(), json!(kind));
    if let Some(t) = total {
        b.insert("total".into(), json!(t));
    }
    if !links.is_empty() {
        b.insert("link".into(), Value::Array(links));
    }
    if !entries.is_empty() {
        b.insert("entry".into(), Value::Array(entries));
    }
    Value::Object(b)
}

/// What a searchset entry holds: a resource's JSON as stored (written into the Bundle as it is,
/// as a read sends it), or a tree built for the answer (a shaped resource, an OperationOutcome).
pub enum EntryResource<'a> {
    Json(&'a [u8]),
    Tree(&'a Value),
}

/// One searchset entry: `fullUrl` (none for an outcome), the resource and its search mode.
pub struct SearchEntry<'a> {
    pub full_url: Option<String>,
    pub resource: EntryResource<'a>,
    pub mode: &'static str,
}

/// A `searchset` Bundle written straight to bytes, member for member what [`collection`] would
/// give for the same entries: stored resources are copied in, not parsed and re-serialised.
/// `json` of an entry must be one JSON value (a stored, authenticated resource is).
pub fn searchset_bytes(id: &str, total: Option<usize>, links: &[Value], entries: &[SearchEntry<'_>]) -> Vec<u8> {
    let size: usize = entries.iter().map(|e| if let EntryResource::Json(j) = e.resource { j.len() + 128 } else { 512 }).sum();
    let mut out = Vec::with_capacity(size + 256 * (links.len() + 1));
    out.extend_from_slice(br#"{"resourceType":"Bundle","id":"#);
    write_json(&mut out, &id);
    out.extend_from_slice(br#","type":"searchset""#);
    if let Some(t) = total {
        out.extend_from_slice(format!(r#","total":{t}"#).as_bytes());
    }
    if !links.is_empty() {
        out.extend_from_slice(br#","link":"#);
        write_json(&mut out, &links);
    }
    if !entries.is_empty() {
        out.extend_from_slice(br#","entry":["#);
        for (n, e) in entries.iter().enumerate() {
            out.extend_from_slice(if n == 0 { b"{" } else { b",{" });
            if let Some(url) = &e.full_url {
                out.extend_from_slice(br#""fullUrl":"#);
                write_json(&mut out, url);
                out.push(b',');
            }
            out.extend_from_slice(br#""resource":"#);
            match e.resource {
                EntryResource::Json(json) => out.extend_from_slice(json),
                EntryResource::Tree(tree) => write_json(&mut out, tree),
            }
            out.extend_from_slice(br#","search":{"mode":"#);
            write_json(&mut out, &e.mode);
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
    out.push(b'}');
    out
}

/// Appends a value's JSON; serialising strings and trees into memory cannot fail.
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    if let Err(e) = serde_json::to_writer(&mut *out, value) {
        debug_assert!(false, "serialising into memory failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searchset_bytes_are_the_collection_bundle_with_stored_json_copied_in() {
        let stored = br#"{"resourceType":"Observation","id":"o1","valueQuantity":{"value":1.50}}"#;
        let shaped = json!({"resourceType": "Patient", "id": "p\"1", "meta": {"tag": [{"code": "SUBSETTED"}]}});
        let outcome = json!({"resourceType": "OperationOutcome", "issue": []});
        let links = vec![link("self", "https://h/fhir/Observation?a=\"b\""), link("next", "https://h/fhir/x")];
        let entries = [
            SearchEntry { full_url: Some("https://h/fhir/Observation/o1".into()), resource: EntryResource::Json(stored), mode: "match" },
            SearchEntry { full_url: Some("https://h/fhir/Patient/p\"1".into()), resource: EntryResource::Tree(&shaped), mode: "include" },
            SearchEntry { full_url: None, resource: EntryResource::Tree(&outcome), mode: "outcome" },
        ];
        let bytes = searchset_bytes("b\u{e9}", Some(7), &links, &entries);
        let stored_tree: Value = serde_json::from_slice(stored).expect("stored");
        let expected = collection("searchset", "b\u{e9}", Some(7), links.clone(), vec![
            json!({"fullUrl": "https://h/fhir/Observation/o1", "resource": stored_tree, "search": {"mode": "match"}}),
            json!({"fullUrl": "https://h/fhir/Patient/p\"1", "resource": shaped, "search": {"mode": "include"}}),
            json!({"resource": outcome, "search": {"mode": "outcome"}}),
        ]);
        assert_eq!(String::from_utf8(bytes).expect("utf-8"), serde_json::to_string(&expected).expect("json"), "same members, same order");
        // The stored bytes go in untouched (1.50 keeps its trailing zero).
        assert!(searchset_bytes("x", None, &[], &entries[..1]).windows(4).any(|w| w == b"1.50"));
        let empty = searchset_bytes("x", None, &[], &[]);
        assert_eq!(serde_json::from_slice::<Value>(&empty).expect("json"), collection("searchset", "x", None, vec![], vec![]));
    }

    fn tx(entries: Value) -> Value {
        json!({"resourceType":"Bundle","type":"transaction","entry":entries})
    }

    #[test]
    fn resolves_urn_uuid() {
        let b = tx(json!([
            {"fullUrl":"urn:uuid:a","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
            {"fullUrl":"urn:uuid:b","resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:a"}},
             "request":{"method":"POST","url":"Observation"}}
        ]));
        let (kind, mut entries) = parse(b).expect("parses");
        assert_eq!(kind, BundleKind::Transaction);
        let mut n = 0;
        resolve_references(&mut entries, || {
            n += 1;
            format!("id{n}")
        })
        .expect("resolves");
        assert_eq!(entries[1].resource.as_ref().map(|r| r["subject"]["reference"].clone()), Some(json!("Patient/id1")));
        // An Attachment's url naming an entry is rewritten too; an extension's url is not.
        let (_, mut entries) = parse(tx(json!([{"fullUrl":"urn:uuid:bin","resource":{"resourceType":"Binary","contentType":"text/plain"},"request":{"method":"POST","url":"Binary"}},
            {"resource":{"resourceType":"DocumentReference","content":[{"attachment":{"url":"urn:uuid:bin"}}],"extension":[{"url":"http://x/y"}]},"request":{"method":"POST","url":"DocumentReference"}}]))).expect("parses");
        let mut n = 0;
        resolve_references(&mut entries, || { n += 1; format!("b{n}") }).expect("resolves");
        let doc = entries[1].resource.as_ref().expect("resource");
        assert_eq!(doc["content"][0]["attachment"]["url"], json!("Binary/b1"));
        assert_eq!(doc["extension"][0]["url"], json!("http://x/y"));
    }

    #[test]
    fn dangling_urn_is_rejected() {
        let b = tx(json!([{"fullUrl":"urn:uuid:b","resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:zz"}},
             "request":{"method":"POST","url":"Observation"}}]));
        let (_, mut entries) = parse(b).expect("parses");
        assert!(resolve_references(&mut entries, || "x".into()).is_err());
    }

    #[test]
    fn rejects_bad_entries() {
        for e in [
            json!([{"resource":{"resourceType":"Patient"}}]),
            json!([{"resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Observation"}}]),
            json!([{"request":{"method":"PATCH","url":"Patient/1"}}]),
            json!([{"resource":{"resourceType":"Binary","contentType":"application/json-patch+json","data":"e30="},"request":{"method":"PATCH","url":"Patient/1"}}]),
            json!([{"resource":{"resourceType":"Patient"},"request":{"method":"PUT","url":"Patient?"}}]),
            json!([{"resource":{"resourceType":"Patient"},"request":{"method":"PUT","url":"Patient","ifNoneExist":"identifier=a|b"}}]),
            json!([{"request":{"method":"GET","url":"Patient/1"}}]),
            json!([{"request":{"method":"DELETE","url":"Patient"}}]),
            json!([{"resource":{"resourceType":"Patient","id":"2"},"request":{"method":"PUT","url":"Patient/1"}}]),
            json!([{"fullUrl":"x","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
                   {"fullUrl":"x","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}}]),
        ] {
            assert!(parse(tx(e.clone())).is_err(), "{e}");
        }
        assert!(parse(json!({"resourceType":"Bundle","type":"collection"})).is_err());
    }

    #[test]
    fn conditional_and_patch_entries() {
        let b = tx(json!([
            {"fullUrl":"urn:uuid:a","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient","ifNoneExist":"Patient?identifier=s|1"}},
            {"resource":{"resourceType":"Patient","id":"kept"},"request":{"method":"PUT","url":"Patient?identifier=s|2"}},
            {"request":{"method":"DELETE","url":"Patient?identifier=s|3"}},
            {"resource":{"resourceType":"Binary","contentType":"application/json-patch+json","data":"W3sib3AiOiJyZW1vdmUiLCJwYXRoIjoiL2FjdGl2ZSJ9XQ=="},
             "request":{"method":"PATCH","url":"Patient/p1"}}
        ]));
        let (_, entries) = parse(b).expect("parses");
        let conditions: Vec<Option<&str>> = entries.iter().map(|e| e.condition.as_deref()).collect();
        assert_eq!(conditions, vec![Some("identifier=s|1"), Some("identifier=s|2"), Some("identifier=s|3"), None]);
        assert!(entries[..3].iter().all(|e| e.id.is_none() && e.query.is_none()));
        assert_eq!((entries[3].id.as_deref(), entries[3].patch.clone(), entries[3].resource.is_none()), (Some("p1"), Some(json!([{"op": "remove", "path": "/active"}])), true));
    }

    #[test]
    fn etags() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag("W/\"x\""), None);
    }
}
