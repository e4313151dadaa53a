//! Structural validation of FHIR R4 JSON resources.
//!
//! [`validate`] checks a resource against the shape of FHIR R4 (4.0.1): which elements each type
//! has, single versus array, the JSON kind and lexical form of every primitive, required elements,
//! one variant per choice element (`value[x]`), `_x` primitive extensions, and resources nested in
//! `contained`, `Bundle.entry.resource`, `Bundle.entry.response.outcome` and
//! `Parameters.parameter.resource`, the codes of required bindings (`Patient.gender` is one of
//! `male female other unknown`), and that contained resources carry an `id`. It does not check
//! other terminology bindings, invariants (FHIRPath constraints), reference targets or profiles.
//!
//! The rules come from `elements.txt`, generated from the R4 JSON schema by
//! `tools/gen-fhir-elements.py` and parsed once on first use. Its format, one item per line:
//!
//! ```text
//! # comment
//! $ date string ^([0-9]...)$     a primitive type: name, JSON kind, the schema's regex pattern
//! @Patient R                     a type: R = resource, C = complex datatype or backbone element
//! name * HumanName               an element: name, cardinality, type
//! subject 1! Reference           `1` single or `*` array; `!` = required (min 1)
//! valueQuantity 1 Quantity value then, when present, the choice base (`value[x]`)
//! gender 1s code =male|female|other|unknown  last, when present: the codes of a required binding
//!                                (an `s` after the cardinality: in the summary, `_summary=true`)
//! ```
//!
//! Element types are primitives, types declared with `@`, or `Resource` (any resource, dispatched
//! on its own `resourceType`). `resourceType` and the `_x` siblings are not listed: `resourceType`
//! belongs to every resource, and `_x` exists for every primitive element except `id` and
//! `xhtml`. (The R4 schema also leaves it out for `canonical` elements; canonical is a primitive
//! like uri, so that looks like an omission and `_x` is accepted there.) A backbone element may
//! have an element named `resourceType` (`ExampleScenario.instance`): it is listed like any other.
//! Required elements come from the schema (complex ones) and from the R4 StructureDefinitions
//! (primitive ones such as `Observation.status`, `Extension.url`); a required primitive is
//! satisfied by `_x` alone, as FHIR allows an extension in place of a primitive value.
//!
//! The regex patterns are informative: each primitive is checked by hand-written code below (the
//! workspace has no regex engine), and the table parser refuses a primitive it has no checker for.
//! Error paths are FHIRPath-like (`Patient.name[0].given[1]`), continuing through nested resources
//! (`Bundle.entry[0].resource.status`); a root without a usable `resourceType` gives the path
//! `resourceType`, and a root that is not an object `$`.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use serde_json::{Map, Number, Value};

/// Objects nested deeper than this are rejected, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 64;
/// FHIR: "strings SHALL NOT exceed 1MB in size".
const MAX_STRING_BYTES: usize = 1024 * 1024;
/// The most choice elements (`value[x]`, ...) one type may have.
const CHOICE_GROUPS_MAX: usize = 8;
/// User values quoted in error messages are cut to this many characters.
const QUOTE_CHARS: usize = 48;

/// Why a resource is not structurally valid FHIR R4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructureError {
    /// Where, FHIRPath-like: `Patient.name[0].given[1]`; `$` when the input is not an object.
    pub path: String,
    /// What is wrong there.
    pub message: String,
}

impl fmt::Display for StructureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for StructureError {}

/// True if `name` is an R4 resource type (e.g. "Patient"), false for datatypes and unknown names.
pub fn is_resource_type(name: &str) -> bool {
    table().is_ok_and(|t| t.lookup(name).is_some_and(|ty| ty.is_resource))
}

/// The resource with only its summary elements (R4 search `_summary=true`): those the R4
/// definitions mark `isSummary` and the required ones, into backbone elements (complex
/// datatypes are kept whole); `resourceType` always. A resource of a type the table does not know
/// is returned as it is.
pub fn summary(resource: &Value) -> Value {
    let Ok(t) = table() else { return resource.clone() };
    match resource.get("resourceType").and_then(Value::as_str).and_then(|n| t.lookup(n)) {
        Some(ty) => summarize(t, ty, resource),
        None => resource.clone(),
    }
}

fn summarize(t: &Table, ty: &TypeDef, value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(|v| summarize(t, ty, v)).collect()),
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, v) in map {
                if key == "resourceType" {
                    out.insert(key.clone(), v.clone());
                    continue;
                }
                let base = key.trim_start_matches('_');
                let Some(elem) = ty.elems.get(base) else { continue };
                if !elem.summary && !ty.required.iter().any(|r| r.name == base) {
                    continue;
                }
                let kept = match elem.target {
                    // Backbone elements (named Type_Part in the table) are summarised in turn.
                    Target::Complex(i) if t.types[i].name.contains('_') && !key.starts_with('_') => summarize(t, &t.types[i], v),
                    _ => v.clone(),
                };
                out.insert(key.clone(), kept);
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Whether the element reached from a resource of `resource_type` through the element names
/// `path` (indices left out: `["name", "given"]`) repeats (an array in JSON); `None` when the
/// path names no element, or passes through a resource (`contained`).
pub fn repeats(resource_type: &str, path: &[&str]) -> Option<bool> {
    let t = table().ok()?;
    let mut ty = t.lookup(resource_type)?;
    let (last, through) = path.split_last()?;
    for name in through {
        match ty.elems.get(name)?.target {
            Target::Complex(i) => ty = &t.types[i],
            _ => return None,
        }
    }
    ty.elems.get(last).map(|e| e.array)
}

/// Whether `element` is a required top-level element of the resource type.
pub fn is_required(resource_type: &str, element: &str) -> bool {
    table().is_ok_and(|t| t.lookup(resource_type).is_some_and(|ty| ty.required.iter().any(|r| r.name == element)))
}

/// All R4 resource type names, sorted.
pub fn resource_types() -> &'static [&'static str] {
    table().map(|t| t.resources.as_slice()).unwrap_or(&[])
}

/// Validate a resource (the whole JSON object including `resourceType`) structurally.
///
/// Returns the first problem found.
pub fn validate(resource: &Value) -> Result<(), StructureError> {
    let table = table().map_err(|e| StructureError {
        path: "$".to_owned(),
        message: format!("the FHIR R4 element table is unusable: {e}"),
    })?;
    let root = match resource {
        Value::Object(map) => map
            .get("resourceType")
            .and_then(Value::as_str)
            .filter(|name| table.lookup(name).is_some_and(|ty| ty.is_resource))
            .unwrap_or(""),
        _ => "$",
    };
    Checker { table }
        .resource(resource, 0)
        .map_err(|fail| fail.into_error(root))
}

// ---------------------------------------------------------------------------------------------
// The table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prim {
    Base64Binary,
    Boolean,
    Canonical,
    Code,
    Date,
    DateTime,
    Decimal,
    Id,
    Instant,
    Integer,
    Markdown,
    Oid,
    PositiveInt,
    String,
    Time,
    UnsignedInt,
    Uri,
    Url,
    Uuid,
    Xhtml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonKind {
    String,
    Boolean,
    Number,
}

impl Prim {
    const ALL: [Prim; 20] = [
        Prim::Base64Binary,
        Prim::Boolean,
        Prim::Canonical,
        Prim::Code,
        Prim::Date,
        Prim::DateTime,
        Prim::Decimal,
        Prim::Id,
        Prim::Instant,
        Prim::Integer,
        Prim::Markdown,
        Prim::Oid,
        Prim::PositiveInt,
        Prim::String,
        Prim::Time,
        Prim::UnsignedInt,
        Prim::Uri,
        Prim::Url,
        Prim::Uuid,
        Prim::Xhtml,
    ];

    fn name(self) -> &'static str {
        match self {
            Prim::Base64Binary => "base64Binary",
            Prim::Boolean => "boolean",
            Prim::Canonical => "canonical",
            Prim::Code => "code",
            Prim::Date => "date",
            Prim::DateTime => "dateTime",
            Prim::Decimal => "decimal",
            Prim::Id => "id",
            Prim::Instant => "instant",
            Prim::Integer => "integer",
            Prim::Markdown => "markdown",
            Prim::Oid => "oid",
            Prim::PositiveInt => "positiveInt",
            Prim::String => "string",
            Prim::Time => "time",
            Prim::UnsignedInt => "unsignedInt",
            Prim::Uri => "uri",
            Prim::Url => "url",
            Prim::Uuid => "uuid",
            Prim::Xhtml => "xhtml",
        }
    }

    fn from_name(name: &str) -> Option<Prim> {
        Prim::ALL.into_iter().find(|p| p.name() == name)
    }

    fn json_kind(self) -> JsonKind {
        match self {
            Prim::Boolean => JsonKind::Boolean,
            Prim::Decimal | Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt => {
                JsonKind::Number
            }
            _ => JsonKind::String,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Prim(Prim),
    /// Index into `Table::types`.
    Complex(usize),
    /// Any resource, typed by its own `resourceType`.
    Resource,
}

#[derive(Debug)]
struct Elem {
    array: bool,
    target: Target,
    /// Choice base (`value` for `valueQuantity`).
    choice: Option<&'static str>,
    /// Whether a `_name` sibling may carry the primitive's id and extensions.
    extensible: bool,
    /// The codes a required binding allows (`code` elements only).
    codes: Option<Vec<&'static str>>,
    /// Whether R4 marks it `isSummary` (resources and backbone elements).
    summary: bool,
}

#[derive(Debug)]
struct Required {
    name: &'static str,
    /// `_name`, which satisfies the requirement on its own for a primitive (FHIR allows an
    /// extension, e.g. data-absent-reason, in place of a value).
    ext_name: Option<String>,
}

#[derive(Debug)]
struct TypeDef {
    name: &'static str,
    is_resource: bool,
    elems: FastMap<&'static str, Elem>,
    required: Vec<Required>,
}

#[derive(Debug)]
struct Table {
    types: Vec<TypeDef>,
    by_name: FastMap<&'static str, usize>,
    resources: Vec<&'static str>,
    /// The `Element` type, the shape of every `_x` value.
    element: usize,
}

/// FNV-1a. Keys are fixed at build time and untrusted input only looks them up, so SipHash's
/// flooding protection buys nothing here and costs most of the validation time.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

static TABLE: OnceLock<Result<Table, String>> = OnceLock::new();

fn table() -> Result<&'static Table, &'static str> {
    TABLE
        .get_or_init(|| Table::parse(include_str!("elements.txt")))
        .as_ref()
        .map_err(String::as_str)
}

struct RawElem {
    name: &'static str,
    array: bool,
    required: bool,
    target: &'static str,
    choice: Option<&'static str>,
    codes: Option<Vec<&'static str>>,
    summary: bool,
}

impl Table {
    fn lookup(&self, name: &str) -> Option<&TypeDef> {
        self.by_name.get(name).map(|&i| &self.types[i])
    }

    fn parse(src: &'static str) -> Result<Table, String> {
        let mut prims = Vec::new();
        let mut raw: Vec<(&'static str, bool, Vec<RawElem>)> = Vec::new();
        for (i, line) in src.lines().enumerate() {
            let bad = |what: &str| format!("elements.txt line {}: {what}: {line:?}", i + 1);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(rest) = line.strip_prefix("$ ") {
                let mut fields = rest.splitn(3, ' ');
                let (Some(name), Some(kind)) = (fields.next(), fields.next()) else {
                    return Err(bad("malformed primitive"));
                };
                let prim = Prim::from_name(name).ok_or_else(|| bad("primitive without checker"))?;
                let want = match prim.json_kind() {
                    JsonKind::String => "string",
                    JsonKind::Boolean => "boolean",
                    JsonKind::Number => "number",
                };
                if kind != want {
                    return Err(bad("JSON kind disagrees with the checker"));
                }
                prims.push(prim);
            } else if let Some(rest) = line.strip_prefix('@') {
                let (name, is_resource) = match rest.split(' ').collect::<Vec<_>>()[..] {
                    [name, "R"] => (name, true),
                    [name, "C"] => (name, false),
                    _ => return Err(bad("malformed type header")),
                };
                raw.push((name, is_resource, Vec::new()));
            } else {
                let mut fields: Vec<&'static str> = line.split(' ').collect();
                let codes = match fields.last().and_then(|f| f.strip_prefix('=')) {
                    Some(list) => {
                        fields.pop();
                        Some(list.split('|').collect::<Vec<_>>())
                    }
                    None => None,
                };
                let (name, card, target, choice) = match fields[..] {
                    [name, card, target] => (name, card, target, None),
                    [name, card, target, choice] => (name, card, target, Some(choice)),
                    _ => return Err(bad("malformed element")),
                };
                if codes.is_some() && target != "code" {
                    return Err(bad("codes on an element that is not a code"));
                }
                let (card, summary) = match card.strip_suffix('s') {
                    Some(c) => (c, true),
                    None => (card, false),
                };
                let (array, required) = match card {
                    "1" => (false, false),
                    "1!" => (false, true),
                    "*" => (true, false),
                    "*!" => (true, true),
                    _ => return Err(bad("bad cardinality")),
                };
                let Some((_, _, elems)) = raw.last_mut() else {
                    return Err(bad("element before any type"));
                };
                elems.push(RawElem {
                    name,
                    array,
                    required,
                    target,
                    choice,
                    codes,
                    summary,
                });
            }
        }
        if let Some(p) = Prim::ALL.into_iter().find(|p| !prims.contains(p)) {
            return Err(format!("primitive {} is not declared", p.name()));
        }

        let mut by_name = FastMap::default();
        for (i, (name, _, _)) in raw.iter().enumerate() {
            if Prim::from_name(name).is_some() || *name == "Resource" {
                return Err(format!("type {name} shadows a built-in type"));
            }
            if by_name.insert(*name, i).is_some() {
                return Err(format!("type {name} is declared twice"));
            }
        }
        let mut types = Vec::with_capacity(raw.len());
        for (name, is_resource, raw_elems) in raw {
            let mut elems = FastMap::default();
            let mut required = Vec::new();
            for e in raw_elems {
                let target = match (Prim::from_name(e.target), by_name.get(e.target)) {
                    (Some(p), _) => Target::Prim(p),
                    (None, Some(&i)) => Target::Complex(i),
                    (None, None) if e.target == "Resource" => Target::Resource,
                    (None, None) => {
                        return Err(format!("{name}.{}: unknown type {}", e.name, e.target))
                    }
                };
                // Element.id and Resource.id are plain strings in JSON, and xhtml has no
                // extension form; every other primitive may have a `_x` sibling.
                let extensible =
                    matches!(target, Target::Prim(p) if p != Prim::Xhtml) && e.name != "id";
                if e.required {
                    let ext_name = extensible.then(|| format!("_{}", e.name));
                    required.push(Required {
                        name: e.name,
                        ext_name,
                    });
                }
                let elem = Elem {
                    array: e.array,
                    target,
                    choice: e.choice,
                    extensible,
                    codes: e.codes,
                    summary: e.summary,
                };
                if e.name.starts_with('_') || (e.name == "resourceType" && is_resource) {
                    return Err(format!("{name}.{}: reserved element name", e.name));
                }
                if elems.insert(e.name, elem).is_some() {
                    return Err(format!("{name}.{} is declared twice", e.name));
                }
            }
            let mut bases: Vec<&str> = elems.values().filter_map(|e| e.choice).collect();
            bases.sort_unstable();
            bases.dedup();
            if bases.len() > CHOICE_GROUPS_MAX {
                return Err(format!(
                    "{name} has more than {CHOICE_GROUPS_MAX} choice elements"
                ));
            }
            types.push(TypeDef {
                name,
                is_resource,
                elems,
                required,
            });
        }
        let element = *by_name.get("Element").ok_or("type Element is missing")?;
        let mut resources: Vec<&'static str> = types
            .iter()
            .filter(|t| t.is_resource)
            .map(|t| t.name)
            .collect();
        resources.sort_unstable();
        if resources.is_empty() {
            return Err("no resource types".to_owned());
        }
        Ok(Table {
            types,
            by_name,
            resources,
            element,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// A failure on its way up: segments are collected innermost first while unwinding, so the
/// success path never builds a path.
struct Fail<'a> {
    rev_path: Vec<Seg<'a>>,
    message: String,
}

impl<'a> Fail<'a> {
    fn new(message: impl Into<String>) -> Self {
        Fail {
            rev_path: Vec::new(),
            message: message.into(),
        }
    }

    fn key(mut self, key: &'a str) -> Self {
        self.rev_path.push(Seg::Key(key));
        self
    }

    fn index(mut self, index: usize) -> Self {
        self.rev_path.push(Seg::Index(index));
        self
    }

    fn into_error(self, root: &str) -> StructureError {
        let mut path = root.to_owned();
        for seg in self.rev_path.iter().rev() {
            match seg {
                Seg::Key(k) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Seg::Index(i) => {
                    let _ = write!(path, "[{i}]");
                }
            }
        }
        StructureError {
            path,
            message: self.message,
        }
    }
}

type Check<'a> = Result<(), Fail<'a>>;

/// Choice variants seen in one object, in an inline array to avoid allocating: R4 types have at
/// most five choice elements (ElementDefinition), and the table parser enforces the bound.
#[derive(Default)]
struct Choices<'a> {
    seen: [(&'static str, &'a str); CHOICE_GROUPS_MAX],
    len: usize,
}

impl<'a> Choices<'a> {
    fn see(&mut self, base: &'static str, variant: &'a str) -> Check<'a> {
        for &(b, v) in &self.seen[..self.len] {
            if b == base {
                if v == variant {
                    return Ok(());
                }
                return Err(Fail::new(format!(
                    "only one of {base}[x] may be present, found '{v}' and '{variant}'"
                )));
            }
        }
        // In bounds: an object has no more distinct bases than its type (checked at parse time).
        if let Some(slot) = self.seen.get_mut(self.len) {
            *slot = (base, variant);
            self.len += 1;
        }
        Ok(())
    }
}

struct Checker {
    table: &'static Table,
}

impl Checker {
    fn resource<'a>(&self, value: &'a Value, depth: usize) -> Check<'a> {
        let Value::Object(map) = value else {
            return Err(Fail::new(format!(
                "expected an object (a FHIR resource), found {}",
                kind(value)
            )));
        };
        let ty = match map.get("resourceType") {
            None => return Err(Fail::new("missing resourceType").key("resourceType")),
            Some(Value::String(name)) => match self.table.lookup(name) {
                Some(ty) if ty.is_resource => ty,
                Some(_) => {
                    return Err(
                        Fail::new(format!("'{name}' is a datatype, not a resource type"))
                            .key("resourceType"),
                    )
                }
                None => {
                    return Err(
                        Fail::new(format!("unknown resource type '{}'", quote(name)))
                            .key("resourceType"),
                    )
                }
            },
            Some(other) => {
                return Err(Fail::new(format!(
                    "expected a string (resource type name), found {}",
                    kind(other)
                ))
                .key("resourceType"))
            }
        };
        self.object(map, ty, depth)
    }

    fn object<'a>(
        &self,
        map: &'a Map<String, Value>,
        ty: &'static TypeDef,
        depth: usize,
    ) -> Check<'a> {
        if depth >= MAX_DEPTH {
            return Err(Fail::new(format!("nested deeper than {MAX_DEPTH} objects")));
        }
        if map.is_empty() {
            return Err(Fail::new("empty object is not allowed"));
        }
        let mut choices = Choices::default();
        for (key, value) in map {
            let key = key.as_str();
            if key == "resourceType" && !ty.elems.contains_key(key) {
                if ty.is_resource {
                    continue; // checked by `resource`, which chose `ty` from it
                }
                return Err(Fail::new(format!(
                    "'resourceType' is not allowed here: {} is not a resource",
                    ty.name
                ))
                .key(key));
            }
            if let Some(base) = key.strip_prefix('_') {
                let elem = match ty.elems.get(base) {
                    Some(elem) if elem.extensible => elem,
                    Some(_) => {
                        return Err(Fail::new(format!(
                            "unknown element '{key}' ('{base}' cannot have extensions)"
                        ))
                        .key(key))
                    }
                    None => {
                        return Err(Fail::new(format!("unknown element '{}'", quote(key))).key(key))
                    }
                };
                if let Some(choice) = elem.choice {
                    choices.see(choice, base).map_err(|f| f.key(key))?;
                }
                self.primitive_ext(map, base, elem, value, depth)
                    .map_err(|f| f.key(key))?;
                continue;
            }
            let Some(elem) = ty.elems.get(key) else {
                return Err(Fail::new(format!("unknown element '{}'", quote(key))).key(key));
            };
            if let Some(choice) = elem.choice {
                choices.see(choice, key).map_err(|f| f.key(key))?;
            }
            self.element(map, key, elem, value, depth)
                .map_err(|f| f.key(key))?;
        }
        for req in &ty.required {
            let present = map.contains_key(req.name)
                || req
                    .ext_name
                    .as_deref()
                    .is_some_and(|ext| map.contains_key(ext));
            if !present {
                return Err(
                    Fail::new(format!("missing required element '{}'", req.name)).key(req.name),
                );
            }
        }
        Ok(())
    }

    fn element<'a>(
        &self,
        map: &'a Map<String, Value>,
        key: &str,
        elem: &Elem,
        value: &'a Value,
        depth: usize,
    ) -> Check<'a> {
        if !elem.array {
            if value.is_array() {
                return Err(Fail::new("expected a single value, found an array"));
            }
            self.value(elem.target, value, depth)?;
            return Self::allowed_code(elem, value);
        }
        let Value::Array(items) = value else {
            return Err(Fail::new(format!(
                "expected an array, found {}",
                kind(value)
            )));
        };
        if items.is_empty() {
            return Err(Fail::new("empty array is not allowed"));
        }
        for (i, item) in items.iter().enumerate() {
            if item.is_null() {
                // A null keeps positions aligned with `_key` when only that item has extensions.
                let ext = if elem.extensible {
                    map.get(&format!("_{key}"))
                } else {
                    None
                };
                let placeholder = matches!(ext, Some(Value::Array(exts))
                    if exts.get(i).is_some_and(Value::is_object));
                if placeholder {
                    continue;
                }
                return Err(Fail::new(format!(
                    "null is not allowed (only as a placeholder where '_{key}' has extensions)"
                ))
                .index(i));
            }
            self.value(elem.target, item, depth)
                .map_err(|f| f.index(i))?;
            Self::allowed_code(elem, item).map_err(|f| f.index(i))?;
            if key == "contained" && !item.get("id").is_some_and(Value::is_string) {
                return Err(Fail::new("a contained resource must have an id (it is referenced by it)").index(i));
            }
        }
        Ok(())
    }

    /// A code of a required binding must be one of its codes.
    fn allowed_code<'a>(elem: &Elem, value: &'a Value) -> Check<'a> {
        match (&elem.codes, value.as_str()) {
            (Some(codes), Some(code)) if !codes.contains(&code) => Err(Fail::new(format!(
                "'{}' is not a code R4 allows here (required binding): {}",
                quote(code),
                codes.join(", ")
            ))),
            _ => Ok(()),
        }
    }

    /// The `_key` sibling of a primitive element: its id and extensions.
    fn primitive_ext<'a>(
        &self,
        map: &'a Map<String, Value>,
        base: &str,
        elem: &Elem,
        value: &'a Value,
        depth: usize,
    ) -> Check<'a> {
        let element = &self.table.types[self.table.element];
        if !elem.array {
            return match value {
                Value::Object(ext) => self.object(ext, element, depth + 1),
                Value::Array(_) => Err(Fail::new("expected a single value, found an array")),
                Value::Null => Err(Fail::new("null is not allowed")),
                other => Err(Fail::new(format!(
                    "expected an object (FHIR Element), found {}",
                    kind(other)
                ))),
            };
        }
        let Value::Array(exts) = value else {
            return Err(Fail::new(format!(
                "expected an array, found {}",
                kind(value)
            )));
        };
        if exts.is_empty() {
            return Err(Fail::new("empty array is not allowed"));
        }
        let values = match map.get(base) {
            None => None,
            Some(Value::Array(values)) => Some(values),
            // The value element itself is malformed; checking it reports that.
            Some(_) => return Ok(()),
        };
        if let Some(values) = values {
            if values.len() != exts.len() {
                return Err(Fail::new(format!(
                    "has {} items but '{base}' has {}: they must line up",
                    exts.len(),
                    values.len()
                )));
            }
        }
        for (i, ext) in exts.iter().enumerate() {
            match ext {
                Value::Object(ext) => self
                    .object(ext, element, depth + 1)
                    .map_err(|f| f.index(i))?,
                Value::Null => {
                    if values.is_none_or(|v| v.get(i).is_none_or(Value::is_null)) {
                        return Err(Fail::new(format!(
                            "null is not allowed ('{base}' has no value at this position either)"
                        ))
                        .index(i));
                    }
                }
                other => {
                    return Err(Fail::new(format!(
                        "expected an object (FHIR Element) or null, found {}",
                        kind(other)
                    ))
                    .index(i))
                }
            }
        }
        Ok(())
    }

    fn value<'a>(&self, target: Target, value: &'a Value, depth: usize) -> Check<'a> {
        if value.is_null() {
            return Err(Fail::new("null is not allowed"));
        }
        match target {
            Target::Prim(prim) => check_primitive(prim, value).map_err(Fail::new),
            Target::Complex(i) => {
                let ty = &self.table.types[i];
                match value {
                    Value::Object(map) => self.object(map, ty, depth + 1),
                    other => Err(Fail::new(format!(
                        "expected an object (FHIR {}), found {}",
                        ty.name,
                        kind(other)
                    ))),
                }
            }
            Target::Resource => self.resource(value, depth + 1),
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `s`, cut short so that error messages stay small whatever the input.
fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Primitives

fn check_primitive(prim: Prim, value: &Value) -> Result<(), String> {
    let expected = |what: &str| {
        format!(
            "expected {what} (FHIR {}), found {}",
            prim.name(),
            kind(value)
        )
    };
    match (prim.json_kind(), value) {
        (JsonKind::Boolean, Value::Bool(_)) => Ok(()),
        (JsonKind::Boolean, _) => Err(expected("a boolean")),
        (JsonKind::Number, Value::Number(n)) => check_number(prim, n),
        (JsonKind::Number, _) if prim == Prim::Decimal => Err(expected("a number")),
        (JsonKind::Number, _) => Err(expected("an integer")),
        (JsonKind::String, Value::String(s)) => check_lexical(prim, s),
        (JsonKind::String, _) => Err(expected("a string")),
    }
}

fn check_number(prim: Prim, n: &Number) -> Result<(), String> {
    let (min, max) = match prim {
        Prim::Integer => (i64::from(i32::MIN), i64::from(i32::MAX)),
        Prim::PositiveInt => (1, i64::from(i32::MAX)),
        Prim::UnsignedInt => (0, i64::from(i32::MAX)),
        // Any JSON number is a valid decimal; serde_json has already rejected NaN and infinities.
        _ => return Ok(()),
    };
    match n.as_i64() {
        Some(i) if (min..=max).contains(&i) => Ok(()),
        Some(_) => Err(format!(
            "{n} is out of range for FHIR {} ({min} to {max})",
            prim.name()
        )),
        None if n.is_u64() => Err(format!(
            "{n} is out of range for FHIR {} ({min} to {max})",
            prim.name()
        )),
        None => Err(format!(
            "{n} is not a valid FHIR {} (not a whole number)",
            prim.name()
        )),
    }
}

fn check_lexical(prim: Prim, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!(
            "empty string is not allowed (FHIR {})",
            prim.name()
        ));
    }
    let valid = match prim {
        Prim::String | Prim::Markdown => return check_text(prim, s),
        Prim::Code => is_code(s),
        Prim::Id => is_id(s),
        Prim::Uri | Prim::Url | Prim::Canonical => !s.chars().any(char::is_whitespace),
        Prim::Oid => is_oid(s),
        Prim::Uuid => is_uuid(s),
        Prim::Base64Binary => is_base64(s),
        Prim::Date => is_date(s),
        Prim::DateTime => is_date_time(s),
        Prim::Instant => is_instant(s),
        Prim::Time => is_time(s),
        Prim::Xhtml => is_xhtml(s),
        Prim::Boolean | Prim::Decimal | Prim::Integer | Prim::PositiveInt | Prim::UnsignedInt => {
            true
        }
    };
    if valid {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not a valid FHIR {}",
            quote(s),
            prim.name()
        ))
    }
}

/// string and markdown. FHIR says control characters other than tab, CR and LF SHOULD NOT
/// appear, and XML cannot carry them at all, so all of them are refused to keep resources
/// convertible. The schema's pattern (`[ \r\n\t\S]+`, JavaScript's `\S`) would also refuse
/// no-break and other Unicode spaces, which ordinary text contains; those are accepted.
fn check_text(prim: Prim, s: &str) -> Result<(), String> {
    if s.len() > MAX_STRING_BYTES {
        return Err(format!(
            "FHIR {} longer than 1 MiB ({} bytes)",
            prim.name(),
            s.len()
        ));
    }
    match s
        .bytes()
        .find(|&b| b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
    {
        Some(b) => Err(format!(
            "control character U+{b:04X} is not allowed in a FHIR {}",
            prim.name()
        )),
        None => Ok(()),
    }
}

/// No leading or trailing whitespace, and single whitespace characters between tokens.
fn is_code(s: &str) -> bool {
    let mut prev_space = true; // rejects leading whitespace
    for c in s.chars() {
        let space = c.is_whitespace();
        if space && prev_space {
            return false;
        }
        prev_space = space;
    }
    !prev_space
}

fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// `urn:oid:[0-2](\.(0|[1-9][0-9]*))+`
fn is_oid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:oid:") else {
        return false;
    };
    let mut arcs = rest.split('.');
    if !matches!(arcs.next(), Some("0" | "1" | "2")) {
        return false;
    }
    let mut count = 0;
    for arc in arcs {
        let canonical = arc == "0" || (!arc.starts_with('0') && !arc.is_empty());
        if !canonical || !arc.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        count += 1;
    }
    count > 0
}

/// `urn:uuid:` and a lower-case 8-4-4-4-12 hex UUID.
fn is_uuid(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("urn:uuid:") else {
        return false;
    };
    rest.len() == 36
        && rest.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// Base64 with padding only at the end; whitespace (line breaks) is ignored as the schema does.
fn is_base64(s: &str) -> bool {
    let mut seen = false;
    let mut position = 0u8; // within the current group of four
    let mut padding = 0;
    for b in s.bytes() {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            b'=' => {
                padding += 1;
                if padding > 2 {
                    return false;
                }
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' if padding == 0 => {}
            _ => return false,
        }
        seen = true;
        position = (position + 1) & 3;
    }
    seen && position == 0
}

/// Narrative.div: FHIR requires a single XHTML `<div>` root.
fn is_xhtml(s: &str) -> bool {
    s.trim_start().strip_prefix("<div").is_some_and(|rest| {
        rest.starts_with(|c: char| c == '>' || c == '/' || c.is_ascii_whitespace())
    })
}

fn digits(b: &[u8], at: usize, len: usize) -> Option<u32> {
    let part = b.get(at..at + len)?;
    part.iter().try_fold(0u32, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    // Signed, as in crate::date: clippy's is_multiple_of suggestion for unsigned types needs
    // Rust 1.87, newer than the workspace's declared 1.85.
    let year = i64::from(year);
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` at the start of `b` (a real calendar date, year not 0000):
/// the bytes used and whether the day is there.
fn date_prefix(b: &[u8]) -> Option<(usize, bool)> {
    let year = digits(b, 0, 4).filter(|&y| y > 0)?;
    if b.get(4) != Some(&b'-') {
        return Some((4, false));
    }
    let month = digits(b, 5, 2).filter(|m| (1..=12).contains(m))?;
    if b.get(7) != Some(&b'-') {
        return Some((7, false));
    }
    digits(b, 8, 2).filter(|&d| d >= 1 && d <= days_in_month(year, month))?;
    Some((10, true))
}

/// `hh:mm:ss` with optional fraction (`ss` may be 60, a leap second): the bytes used.
fn time_prefix(b: &[u8]) -> Option<usize> {
    digits(b, 0, 2).filter(|&h| h <= 23)?;
    (b.get(2) == Some(&b':')).then_some(())?;
    digits(b, 3, 2).filter(|&m| m <= 59)?;
    (b.get(5) == Some(&b':')).then_some(())?;
    digits(b, 6, 2).filter(|&s| s <= 60)?;
    if b.get(8) != Some(&b'.') {
        return Some(8);
    }
    let fraction = b[9..].iter().take_while(|c| c.is_ascii_digit()).count();
    (fraction > 0).then_some(9 + fraction)
}

/// `Z` or `+hh:mm` / `-hh:mm` from -14:00 to +14:00, and nothing after it.
fn is_zone(b: &[u8]) -> bool {
    match b {
        [b'Z'] => true,
        [b'+' | b'-', rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
            match (digits(rest, 0, 2), digits(rest, 3, 2)) {
                (Some(h), Some(m)) => (h <= 13 && m <= 59) || (h == 14 && m == 0),
                _ => false,
            }
        }
        _ => false,
    }
}

fn is_date(s: &str) -> bool {
    date_prefix(s.as_bytes()).is_some_and(|(used, _)| used == s.len())
}

/// A date to any precision, or a full date with time, which then needs a zone.
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    match date_prefix(b) {
        Some((used, _)) if used == b.len() => true,
        Some((used, true)) => is_time_and_zone(&b[used..]),
        _ => false,
    }
}

fn is_instant(s: &str) -> bool {
    let b = s.as_bytes();
    matches!(date_prefix(b), Some((used, true)) if is_time_and_zone(&b[used..]))
}

/// `Thh:mm:ss[.f]` and a zone.
fn is_time_and_zone(b: &[u8]) -> bool {
    match b.split_first() {
        Some((b'T', rest)) => time_prefix(rest).is_some_and(|used| is_zone(&rest[used..])),
        _ => false,
    }
}

fn is_time(s: &str) -> bool {
    time_prefix(s.as_bytes()) == Some(s.len())
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: &Value) -> StructureError {
        validate(v).expect_err("expected a validation error")
    }

    fn assert_err(v: Value, path: &str, message_part: &str) {
        let e = err(&v);
        assert_eq!(e.path, path, "{e}");
        assert!(
            e.message.contains(message_part),
            "message {:?} lacks {message_part:?}",
            e.message
        );
    }

    fn remove(v: &mut Value, key: &str) {
        if let Some(map) = v.as_object_mut() {
            map.remove(key);
        }
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "example",
            "meta": {"versionId": "1", "lastUpdated": "2024-01-02T03:04:05.678+01:00",
                     "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Peter</div>"},
            "extension": [{"url": "http://example.org/ext", "valueCodeableConcept": {"text": "x"}}],
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
                            "period": {"start": "2001-05-06"}}],
            "active": true,
            "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
            "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1}],
            "gender": "male",
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                          "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
            "deceasedBoolean": false,
            "address": [{"line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999"}],
            "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
                         "name": {"family": "du Marché", "_family": {"extension": [{"url": "http://example.org/own-prefix", "valueString": "VV"}]}}}],
            "managingOrganization": {"reference": "Organization/1"}
        })
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "f001",
            "meta": {"lastUpdated": "2023-03-04T05:06:07Z"},
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}],
                     "text": "Heart rate"},
            "subject": {"reference": "Patient/example"},
            "encounter": {"reference": "urn:uuid:5f1b8d8e-3c2a-4a8b-9d6e-0a1b2c3d4e5f"},
            "effectiveDateTime": "2023-03-04T05:06:07+02:00",
            "issued": "2023-03-04T05:06:07.123Z",
            "valueQuantity": {"value": 72.5, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"},
            "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "N"}]}],
            "referenceRange": [{"low": {"value": 60}, "high": {"value": 100}}]
        })
    }

    #[test]
    fn table_parses() {
        let t = table().expect("table");
        assert_eq!(t.resources.len(), 146);
        assert!(t.types.len() > 600);
    }

    #[test]
    fn resource_type_queries() {
        assert!(is_resource_type("Patient"));
        assert!(is_resource_type("MedicinalProduct"));
        assert!(is_resource_type("EffectEvidenceSynthesis"));
        assert!(!is_resource_type("HumanName"));
        assert!(!is_resource_type("Patient_Contact"));
        assert!(!is_resource_type("Resource"));
        assert!(!is_resource_type("Project")); // Medplum's, not R4
        assert!(!is_resource_type("SubstanceDefinition")); // R5
        assert!(!is_resource_type("patient"));
        let all = resource_types();
        assert_eq!(all.len(), 146);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert!(all.iter().all(|t| is_resource_type(t)));
    }

    #[test]
    fn valid_resources_pass() {
        validate(&patient()).expect("patient");
        validate(&observation()).expect("observation");
        let bundle = json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [
                {"fullUrl": "urn:uuid:5f1b8d8e-3c2a-4a8b-9d6e-0a1b2c3d4e5f", "resource": patient(),
                 "request": {"method": "POST", "url": "Patient"}},
                {"resource": observation(), "request": {"method": "PUT", "url": "Observation/f001"}}
            ]
        });
        validate(&bundle).expect("bundle");
        let params = json!({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": patient()},
            {"name": "count", "valueInteger": 3},
            {"name": "part", "part": [{"name": "x", "valueString": "y"}]}
        ]});
        validate(&params).expect("parameters");
    }

    #[test]
    fn root_must_be_a_known_resource() {
        assert_err(
            json!([1]),
            "$",
            "expected an object (a FHIR resource), found array",
        );
        assert_err(json!({"id": "x"}), "resourceType", "missing resourceType");
        assert_err(json!({"resourceType": 3}), "resourceType", "found number");
        assert_err(
            json!({"resourceType": "Foo"}),
            "resourceType",
            "unknown resource type 'Foo'",
        );
        assert_err(
            json!({"resourceType": "HumanName"}),
            "resourceType",
            "datatype, not a resource",
        );
        assert_err(
            json!({"resourceType": "Project", "name": "x"}),
            "resourceType",
            "unknown resource type",
        );
    }

    #[test]
    fn unknown_elements() {
        let mut p = patient();
        p["foo"] = json!(1);
        assert_err(p, "Patient.foo", "unknown element 'foo'");
        let mut p = patient();
        p["name"][0]["nickname"] = json!("Pete");
        assert_err(p, "Patient.name[0].nickname", "unknown element 'nickname'");
        let mut p = patient();
        p["meta"]["project"] = json!("p1"); // Medplum's extension of Meta, not R4
        assert_err(p, "Patient.meta.project", "unknown element 'project'");
        let mut p = patient();
        p["_name"] = json!({"extension": [{"url": "http://x", "valueString": "y"}]});
        assert_err(p, "Patient._name", "cannot have extensions");
        let mut p = patient();
        p["_id"] = json!({"extension": [{"url": "http://x", "valueString": "y"}]});
        assert_err(p, "Patient._id", "cannot have extensions");
        let mut p = patient();
        p["_nope"] = json!({"extension": [{"url": "http://x", "valueString": "y"}]});
        assert_err(p, "Patient._nope", "unknown element '_nope'");
        let mut p = patient();
        p["name"][0]["resourceType"] = json!("HumanName");
        assert_err(p, "Patient.name[0].resourceType", "not a resource");
    }

    #[test]
    fn arrays_and_singles() {
        let mut p = patient();
        p["name"] = json!({"family": "X"});
        assert_err(p, "Patient.name", "expected an array, found object");
        let mut p = patient();
        p["gender"] = json!(["male"]);
        assert_err(
            p,
            "Patient.gender",
            "expected a single value, found an array",
        );
        let mut p = patient();
        p["name"][0]["given"] = json!("Peter");
        assert_err(p, "Patient.name[0].given", "expected an array");
        let mut p = patient();
        p["managingOrganization"] = json!([{"reference": "Organization/1"}]);
        assert_err(p, "Patient.managingOrganization", "expected a single value");
    }

    #[test]
    fn empty_and_null_are_refused() {
        let mut p = patient();
        p["name"] = json!([]);
        assert_err(p, "Patient.name", "empty array is not allowed");
        let mut p = patient();
        p["managingOrganization"] = json!({});
        assert_err(
            p,
            "Patient.managingOrganization",
            "empty object is not allowed",
        );
        let mut p = patient();
        p["gender"] = Value::Null;
        assert_err(p, "Patient.gender", "null is not allowed");
        let mut p = patient();
        p["name"][0]["given"][1] = Value::Null;
        assert_err(p, "Patient.name[0].given[1]", "null is not allowed");
        let mut p = patient();
        p["name"][0]["family"] = json!("");
        assert_err(p, "Patient.name[0].family", "empty string is not allowed");
        let mut p = patient();
        if let Some(names) = p["name"].as_array_mut() {
            names.push(json!({}));
        }
        assert_err(p, "Patient.name[1]", "empty object");
    }

    #[test]
    fn primitive_json_kinds() {
        let mut p = patient();
        p["birthDate"] = json!(1974);
        assert_err(
            p,
            "Patient.birthDate",
            "expected a string (FHIR date), found number",
        );
        let mut p = patient();
        p["active"] = json!("true");
        assert_err(
            p,
            "Patient.active",
            "expected a boolean (FHIR boolean), found string",
        );
        let mut p = patient();
        p["telecom"][0]["rank"] = json!(0);
        assert_err(
            p,
            "Patient.telecom[0].rank",
            "out of range for FHIR positiveInt",
        );
        let mut p = patient();
        p["telecom"][0]["rank"] = json!(1.5);
        assert_err(p, "Patient.telecom[0].rank", "not a whole number");
        let mut p = patient();
        p["telecom"][0]["rank"] = json!("1");
        assert_err(
            p,
            "Patient.telecom[0].rank",
            "expected an integer (FHIR positiveInt), found string",
        );
        let mut p = patient();
        p["multipleBirthInteger"] = json!(2_147_483_648u64);
        remove(&mut p, "deceasedBoolean");
        assert_err(
            p,
            "Patient.multipleBirthInteger",
            "out of range for FHIR integer",
        );
        let mut p = patient();
        p["multipleBirthInteger"] = json!(-3);
        validate(&p).expect("negative integer is fine");
        let mut o = observation();
        o["valueQuantity"]["value"] = json!("72.5");
        assert_err(
            o,
            "Observation.valueQuantity.value",
            "expected a number (FHIR decimal), found string",
        );
        let mut o = observation();
        o["valueQuantity"]["value"] = json!(1e300);
        validate(&o).expect("decimal exponent");
        let mut o = observation();
        remove(&mut o, "valueQuantity");
        o["valueInteger"] = json!(-1);
        validate(&o).expect("negative integer");
        let mut s = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                           "component": [{"code": {"text": "c"}, "valueSampledData":
                               {"origin": {"value": 0}, "period": 1, "dimensions": 1, "data": "1 2 3"}}]});
        validate(&s).expect("sampled data");
        s["component"][0]["valueSampledData"]["dimensions"] = json!(-1);
        assert_err(
            s,
            "Observation.component[0].valueSampledData.dimensions",
            "positiveInt",
        );
    }

    #[test]
    fn complex_must_be_objects() {
        let mut p = patient();
        p["maritalStatus"] = json!("married");
        assert_err(
            p,
            "Patient.maritalStatus",
            "expected an object (FHIR CodeableConcept), found string",
        );
    }

    #[test]
    fn lexical_forms() {
        let cases: &[(&str, Value, &str)] = &[
            (
                "birthDate",
                json!("2020-13-01"),
                "'2020-13-01' is not a valid FHIR date",
            ),
            ("birthDate", json!("2021-02-29"), "not a valid FHIR date"),
            ("birthDate", json!("0000"), "not a valid FHIR date"),
            ("birthDate", json!("2020-1-01"), "not a valid FHIR date"),
            (
                "birthDate",
                json!("2020-01-01T00:00:00Z"),
                "not a valid FHIR date",
            ),
            (
                "deceasedDateTime",
                json!("2020-01-01T10:00:00"),
                "not a valid FHIR dateTime",
            ),
            (
                "deceasedDateTime",
                json!("2020-01-01T10:00Z"),
                "not a valid FHIR dateTime",
            ),
            (
                "deceasedDateTime",
                json!("2020-01T10:00:00Z"),
                "not a valid FHIR dateTime",
            ),
            (
                "deceasedDateTime",
                json!("2020-01-01T24:00:00Z"),
                "not a valid FHIR dateTime",
            ),
            (
                "deceasedDateTime",
                json!("2020-01-01T10:00:00+14:30"),
                "not a valid FHIR dateTime",
            ),
            (
                "deceasedDateTime",
                json!("2020-01-01T10:00:00."),
                "not a valid FHIR dateTime",
            ),
            ("id", json!("has space"), "not a valid FHIR id"),
            ("id", json!("a".repeat(65)), "not a valid FHIR id"),
            ("id", json!("ok_not"), "not a valid FHIR id"),
            ("gender", json!(" male"), "not a valid FHIR code"),
            ("gender", json!("ma  le"), "not a valid FHIR code"),
            ("gender", json!("male\n"), "not a valid FHIR code"),
            ("implicitRules", json!("http://x y"), "not a valid FHIR uri"),
            (
                "language",
                json!(""),
                "empty string is not allowed (FHIR code)",
            ),
        ];
        for (field, value, message) in cases {
            let mut p = patient();
            if field.starts_with("deceased") {
                remove(&mut p, "deceasedBoolean");
            }
            p[*field] = value.clone();
            assert_err(p, &format!("Patient.{field}"), message);
        }
        let mut p = patient();
        p["meta"]["lastUpdated"] = json!("2024-01-02");
        assert_err(p, "Patient.meta.lastUpdated", "not a valid FHIR instant");
        let mut p = patient();
        p["name"][0]["family"] = json!("bad\u{0007}bell");
        assert_err(p, "Patient.name[0].family", "control character U+0007");
        let mut p = patient();
        p["photo"] = json!([{"contentType": "image/png", "data": "not base64!"}]);
        assert_err(p, "Patient.photo[0].data", "not a valid FHIR base64Binary");
        let mut p = patient();
        p["photo"] = json!([{"contentType": "image/png", "data": "AAA=A==="}]);
        assert_err(p, "Patient.photo[0].data", "base64Binary");
        let mut p = patient();
        p["text"]["div"] = json!("plain text");
        assert_err(p, "Patient.text.div", "not a valid FHIR xhtml");
        let mut p = patient();
        p["identifier"][0]["system"] = json!("urn:oid:1.02");
        validate(&p).expect("system is a uri, not an oid");
    }

    #[test]
    fn lexical_checkers_accept_valid_forms() {
        for s in ["2020", "2020-02", "2020-02-29", "1900-12-31", "0001-01-01"] {
            assert!(is_date(s), "{s}");
            assert!(is_date_time(s), "{s}");
        }
        for s in [
            "2015-02-07T13:28:17-05:00",
            "2017-01-01T00:00:00.000Z",
            "2016-12-31T23:59:60Z",
            "2020-06-30T12:00:00.123456789+14:00",
            "2020-06-30T12:00:00-13:59",
        ] {
            assert!(is_date_time(s), "{s}");
            assert!(is_instant(s), "{s}");
        }
        for s in ["2020", "2020-01-01", "2020-01-01T10:00:00"] {
            assert!(!is_instant(s), "{s}");
        }
        for s in ["00:00:00", "23:59:59.5", "12:00:60"] {
            assert!(is_time(s), "{s}");
        }
        for s in ["24:00:00", "12:00", "12:00:00Z", "1:00:00"] {
            assert!(!is_time(s), "{s}");
        }
        assert!(
            is_code("a b c")
                && is_code("x")
                && !is_code("a  b")
                && !is_code("a\tb ")
                && !is_code(" ")
        );
        assert!(is_id("A-z.09") && !is_id("") && !is_id("a/b"));
        assert!(
            is_oid("urn:oid:2.16.840.1.113883")
                && !is_oid("urn:oid:3.1")
                && !is_oid("urn:oid:1")
                && !is_oid("urn:oid:1.01")
                && !is_oid("urn:oid:1..2")
                && !is_oid("1.2.3")
        );
        assert!(is_uuid("urn:uuid:c757873d-ec9a-4326-a141-556f43239520"));
        assert!(!is_uuid("urn:uuid:C757873D-EC9A-4326-A141-556F43239520"));
        assert!(!is_uuid("c757873d-ec9a-4326-a141-556f43239520"));
        assert!(is_base64("SGVsbG8=") && is_base64("SGVs\nbG8h") && is_base64("SA=="));
        assert!(
            !is_base64("SGVsbG8") && !is_base64("S===") && !is_base64("SG=s") && !is_base64("  ")
        );
        assert!(
            is_xhtml("<div>x</div>")
                && is_xhtml("\n <div xmlns=\"http://www.w3.org/1999/xhtml\"/>")
        );
        assert!(!is_xhtml("<divx>") && !is_xhtml("<p>x</p>"));
    }

    #[test]
    fn primitive_extensions() {
        // _given parallel to given, with a null placeholder on either side.
        let mut p = patient();
        p["name"][0]["given"] = json!(["Peter", null]);
        p["name"][0]["_given"] =
            json!([null, {"extension": [{"url": "http://x", "valueString": "y"}]}]);
        validate(&p).expect("null placeholders");
        // Extension only, no value.
        let mut p = patient();
        remove(&mut p, "birthDate");
        validate(&p).expect("_birthDate alone");
        let mut p = patient();
        p["name"][0]["_given"] = json!([null]);
        assert_err(p, "Patient.name[0]._given", "must line up");
        let mut p = patient();
        p["name"][0]["given"] = json!(["Peter", null]);
        p["name"][0]["_given"] = json!([null, null]);
        // Errors are reported in document order (serde_json keeps it).
        assert_err(p, "Patient.name[0].given[1]", "null is not allowed");
        let mut p = patient();
        p["name"][0]["_given"] = json!([{"id": "a"}, "b"]);
        assert_err(
            p,
            "Patient.name[0]._given[1]",
            "expected an object (FHIR Element) or null, found string",
        );
        let mut p = patient();
        p["_birthDate"] = json!({"extension": [{"url": "http://x", "valueDate": "1999-02-30"}]});
        assert_err(
            p,
            "Patient._birthDate.extension[0].valueDate",
            "not a valid FHIR date",
        );
        let mut p = patient();
        p["_birthDate"] = json!({"foo": 1});
        assert_err(p, "Patient._birthDate.foo", "unknown element 'foo'");
        let mut p = patient();
        p["_birthDate"] = json!("x");
        assert_err(
            p,
            "Patient._birthDate",
            "expected an object (FHIR Element), found string",
        );
        let mut p = patient();
        p["_active"] = json!([{"id": "a"}]);
        assert_err(
            p,
            "Patient._active",
            "expected a single value, found an array",
        );
    }

    #[test]
    fn choice_elements() {
        let mut p = patient();
        p["deceasedDateTime"] = json!("2020-01-01");
        assert_err(p, "Patient.deceasedDateTime", "only one of deceased[x]");
        let mut o = observation();
        o["_valueString"] = json!({"extension": [{"url": "http://x", "valueCode": "y"}]});
        assert_err(o, "Observation._valueString", "only one of value[x]");
        let mut o = observation();
        remove(&mut o, "valueQuantity");
        o["valueString"] = json!("x");
        o["_valueString"] = json!({"id": "v"});
        validate(&o).expect("value and its extension are one variant");
    }

    #[test]
    fn required_elements() {
        let mut o = observation();
        remove(&mut o, "code");
        assert_err(o, "Observation.code", "missing required element 'code'");
        let mut p = patient();
        p["link"] = json!([{"type": "seealso"}]);
        assert_err(
            p,
            "Patient.link[0].other",
            "missing required element 'other'",
        );
    }

    #[test]
    fn contained_and_nested_resources() {
        let mut p = patient();
        p["contained"] = json!([{"resourceType": "Organization", "id": "org1", "name": "Acme"}]);
        validate(&p).expect("contained organization");
        let mut p = patient();
        p["contained"] = json!([{"resourceType": "Organization", "id": "org1", "nmae": "Acme"}]);
        assert_err(p, "Patient.contained[0].nmae", "unknown element 'nmae'");
        let mut p = patient();
        p["contained"] = json!([{"id": "org1"}]);
        assert_err(
            p,
            "Patient.contained[0].resourceType",
            "missing resourceType",
        );
        let mut p = patient();
        p["contained"] = json!([{"resourceType": "Quantity", "value": 1}]);
        assert_err(
            p,
            "Patient.contained[0].resourceType",
            "datatype, not a resource",
        );
        let mut o = observation();
        o["status"] = json!("final ");
        let bundle = json!({"resourceType": "Bundle", "type": "collection",
                            "entry": [{"resource": patient()}, {"resource": o}]});
        assert_err(
            bundle,
            "Bundle.entry[1].resource.status",
            "not a valid FHIR code",
        );
        let params = json!({"resourceType": "Parameters", "parameter": [{"name": "r", "resource": {"resourceType": "Patient", "birthDate": 2}}]});
        assert_err(
            params,
            "Parameters.parameter[0].resource.birthDate",
            "FHIR date",
        );
        let outcome = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "400", "outcome": {"resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "x"}]}}}]});
        validate(&outcome).expect("bundle response outcome");
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        // Deep enough to pass the limit, shallow enough that building and dropping the Value
        // (recursive in serde_json) stays within a test thread's stack in debug builds.
        let mut ext = json!({"url": "http://x", "valueString": "leaf"});
        for _ in 0..150 {
            ext = json!({"url": "http://x", "extension": [ext]});
        }
        let p = json!({"resourceType": "Patient", "extension": [ext]});
        let e = err(&p);
        assert!(e.message.contains("nested deeper than"), "{e}");
        assert!(
            e.path.starts_with("Patient.extension[0].extension[0]"),
            "{e}"
        );

        let mut bundle = json!({"resourceType": "Basic", "code": {"text": "x"}});
        for _ in 0..40 {
            bundle = json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": bundle}]});
        }
        assert!(err(&bundle).message.contains("nested deeper than"));
    }

    #[test]
    fn display_format() {
        let e = StructureError {
            path: "Patient.gender".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "Patient.gender: bad");
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let mut p = patient();
        p["birthDate"] = json!("x".repeat(10_000));
        assert!(err(&p).message.len() < 200);
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn random_leaf(rng: &mut Rng) -> Value {
        const KEYS: [&str; 12] = [
            "resourceType",
            "id",
            "extension",
            "url",
            "value",
            "_given",
            "given",
            "valueString",
            "contained",
            "text",
            "div",
            "foo",
        ];
        match rng.below(14) {
            0 => Value::Null,
            1 => json!(rng.below(2) == 0),
            2 => json!(rng.next() as i64),
            3 => json!((rng.next() as f64) / 7.0),
            4 => json!([]),
            5 => json!({}),
            6 => json!(""),
            7 => json!("2020-02-30T25:61:61+15:00"),
            8 => json!("\u{0}\u{1F600} \u{a0}x"),
            9 => json!("Patient"),
            10 => json!({"resourceType": "Patient"}),
            11 => json!([null, {"extension": [null]}]),
            12 => json!({ KEYS[rng.below(KEYS.len())]: "x" }),
            _ => json!("<div>"),
        }
    }

    fn mutate(v: &mut Value, rng: &mut Rng, depth: usize) {
        let descend = depth < 12 && rng.below(3) != 0;
        match v {
            Value::Object(map) if !map.is_empty() && descend => {
                let i = rng.below(map.len());
                if let Some((_, child)) = map.iter_mut().nth(i) {
                    mutate(child, rng, depth + 1);
                }
            }
            Value::Array(items) if !items.is_empty() && descend => {
                let i = rng.below(items.len());
                mutate(&mut items[i], rng, depth + 1);
            }
            Value::Object(map) => match rng.below(4) {
                0 if !map.is_empty() => {
                    let key = map
                        .keys()
                        .nth(rng.below(map.len()))
                        .cloned()
                        .unwrap_or_default();
                    map.remove(&key);
                }
                1 => {
                    let key = [
                        "_birthDate",
                        "_given",
                        "valueBoolean",
                        "resourceType",
                        "bogus",
                        "_id",
                    ][rng.below(6)];
                    map.insert(key.to_owned(), random_leaf(rng));
                }
                _ => *v = random_leaf(rng),
            },
            Value::Array(items) => match rng.below(3) {
                0 => items.push(random_leaf(rng)),
                1 => *v = Value::Array(vec![v.clone(), v.clone()]),
                _ => *v = random_leaf(rng),
            },
            other => {
                *other = if rng.below(3) == 0 {
                    json!([other.clone()])
                } else {
                    random_leaf(rng)
                };
            }
        }
    }

    #[test]
    fn required_bindings_required_primitives_and_contained_ids() {
        let path_of = |v: Value| validate(&v).map(|()| String::new()).unwrap_or_else(|e| format!("{}: {}", e.path, e.message));
        let obs = |extra: Value| {
            let mut o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
            if let (Value::Object(o), Value::Object(extra)) = (&mut o, extra) {
                o.extend(extra);
            }
            o
        };
        for (bad, says) in [
            (json!({"resourceType": "Patient", "gender": "xyz"}), "Patient.gender: 'xyz' is not a code R4 allows here (required binding): male, female, other, unknown"),
            (obs(json!({"status": "bogus"})), "Observation.status: 'bogus'"),
            (json!({"resourceType": "Observation", "code": {"text": "x"}}), "Observation.status: missing required element"),
            (obs(json!({"extension": [{"valueString": "no url"}]})), "Observation.extension[0].url: missing required element"),
            (obs(json!({"contained": [{"resourceType": "Patient"}]})), "Observation.contained[0]: a contained resource must have an id"),
            (json!({"resourceType": "CapabilityStatement", "status": "active", "date": "2020", "kind": "instance", "fhirVersion": "4.0.1", "format": ["json", "yaml"]}), ""),
        ] {
            let got = path_of(bad.clone());
            assert!(if says.is_empty() { got.is_empty() } else { got.starts_with(says) }, "{bad}: {got}");
        }
        // The extension form of a required primitive stands in for it.
        assert_eq!(path_of(json!({"resourceType": "Observation", "_status": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}, "code": {"text": "x"}})), "");
        // A backbone element may have its own element named resourceType (R4 ExampleScenario).
        let scenario = json!({"resourceType": "ExampleScenario", "status": "draft",
            "instance": [{"resourceId": "p1", "resourceType": "Patient", "name": "A patient"}]});
        assert_eq!(path_of(scenario), "");
        assert!(path_of(obs(json!({"code": {"text": "x", "resourceType": "Patient"}}))).contains("'resourceType' is not allowed here"));
    }

    #[test]
    fn summaries_keep_what_r4_marks_summary_and_what_is_required() {
        let p = json!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "1"}, "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},
            "name": [{"family": "Kort"}], "photo": [{"contentType": "image/png"}], "contact": [{"name": {"family": "Nära"}}], "gender": "other",
            "link": [{"other": {"reference": "Patient/q"}, "type": "seealso"}]});
        let s = summary(&p);
        let keys: Vec<&str> = s.as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
        assert_eq!(keys, vec!["resourceType", "id", "meta", "name", "gender", "link"], "{s}");
        // Into backbone elements: Observation.component is summary, and so are its code and value.
        let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "bp"}, "note": [{"text": "n"}],
            "component": [{"code": {"text": "sys"}, "valueQuantity": {"value": 120}, "interpretation": [{"text": "high"}]}]});
        let s = summary(&o);
        assert!(s.get("note").is_none() && s["component"][0].get("valueQuantity").is_some(), "{s}");
        assert_eq!(s["component"][0].get("interpretation"), None, "{s}");
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let base = json!({"resourceType": "Bundle", "type": "collection",
                          "entry": [{"resource": patient()}, {"resource": observation()}]});
        let mut rejected = 0;
        for _ in 0..20_000 {
            let mut v = if rng.below(2) == 0 {
                patient()
            } else {
                base.clone()
            };
            for _ in 0..=rng.below(4) {
                mutate(&mut v, &mut rng, 0);
            }
            if let Err(e) = validate(&v) {
                assert!(!e.path.is_empty() && !e.message.is_empty());
                rejected += 1;
            }
        }
        assert!(
            rejected > 10_000,
            "mutations should mostly break the resource ({rejected})"
        );
    }

    #[test]
    fn synthea_bundles_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/testdata/synthea");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            eprintln!("note: {} not found, Synthea check skipped", dir.display());
            return;
        };
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        let mut checked = 0;
        let mut failures = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read synthea file");
            let bundle: Value = serde_json::from_str(&text).expect("parse synthea file");
            let entries = bundle["entry"].as_array().expect("bundle entries");
            for (i, entry) in entries.iter().enumerate() {
                checked += 1;
                if let Err(e) = validate(&entry["resource"]) {
                    failures.push(format!("{} entry {i}: {e}", file.display()));
                }
            }
            if let Err(e) = validate(&bundle) {
                failures.push(format!("{} (whole bundle): {e}", file.display()));
            }
        }
        eprintln!(
            "validated {checked} Synthea resources from {} files",
            files.len()
        );
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    #[ignore = "timing, run with --ignored --nocapture in release mode"]
    fn timing_typical_observation() {
        let start = std::time::Instant::now();
        Table::parse(include_str!("elements.txt")).expect("table");
        eprintln!("table parse: {:?}", start.elapsed());
        let o = observation();
        validate(&o).expect("warm up");
        let n = 200_000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            validate(std::hint::black_box(&o)).expect("valid");
        }
        let per = start.elapsed() / n;
        eprintln!("typical Observation: {per:?} per validate()");
    }
}
