//! The search parameters Valv supports: their definitions, the index keys extracted from a
//! resource, the parsing of a search request, and the precise matching of a decrypted resource.
//!
//! Index keys are plain strings here; the store turns each into a blind-index token by keyed
//! hashing (`type | param | key`), so it never stores a searchable value in the clear. String
//! values get a fixed number of keys each (16 prefix slots plus one exact key) so that the number of
//! tokens does not reveal a name's length. Date values get calendar-bucket keys ([`crate::date`]).

use crate::date::{self, Interval, Prefix};
use crate::{reference, FhirError};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Token,
    String,
    Reference,
    Date,
    Number,
    Quantity,
    Uri,
    Composite,
}

impl ParamKind {
    /// The R4 name of the kind (`SearchParameter.type`).
    pub fn code(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::String => "string",
            ParamKind::Reference => "reference",
            ParamKind::Date => "date",
            ParamKind::Number => "number",
            ParamKind::Quantity => "quantity",
            ParamKind::Uri => "uri",
            ParamKind::Composite => "composite",
        }
    }

    fn parse(code: &str) -> Option<ParamKind> {
        [ParamKind::Token, ParamKind::String, ParamKind::Reference, ParamKind::Date, ParamKind::Number, ParamKind::Quantity, ParamKind::Uri, ParamKind::Composite]
            .into_iter()
            .find(|k| k.code() == code)
    }
}

#[derive(Debug, Clone)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// Element paths: names separated by `.`, `x[x]` for any choice-type element `x…`,
    /// `x[field=value]` for the elements `x` whose `field` is `value`; `""` is the resource.
    pub paths: &'static [&'static str],
    /// For references: the only target type that counts (e.g. `patient` -> Patient).
    pub target: Option<&'static str>,
    /// Whether the blind index holds keys for it. The parameters generated from the R4
    /// definitions beyond the hand-picked ones below are not indexed: they are decided after
    /// decryption, among the candidates the other conditions (and the caller's access) leave,
    /// and add no token to the store (docs/SECURITY.md §3.5).
    pub indexed: bool,
    /// A composite's parts, in the order of the value's `$`-separated parts, their paths relative
    /// to each element at `paths`.
    pub components: &'static [ParamDef],
}

const fn p(name: &'static str, kind: ParamKind, paths: &'static [&'static str]) -> ParamDef {
    ParamDef { name, kind, paths, target: None, indexed: true, components: &[] }
}
const fn patient(paths: &'static [&'static str]) -> ParamDef {
    ParamDef { name: "patient", kind: ParamKind::Reference, paths, target: Some("Patient"), indexed: true, components: &[] }
}

use ParamKind::{Date as D, Reference as R, String as S, Token as T};

const IDENT: ParamDef = p("identifier", T, &["identifier"]);
const SUBJECT: ParamDef = p("subject", R, &["subject"]);
const STATUS: ParamDef = p("status", T, &["status"]);
const CATEGORY: ParamDef = p("category", T, &["category"]);
const CODE: ParamDef = p("code", T, &["code"]);
const ENCOUNTER: ParamDef = p("encounter", R, &["encounter"]);
const NAME: ParamDef = p("name", S, &["name"]);
const FAMILY: ParamDef = p("family", S, &["name.family"]);
const GIVEN: ParamDef = p("given", S, &["name.given"]);

const PATIENT: &[ParamDef] = &[
    IDENT,
    NAME, FAMILY, GIVEN,
    p("birthdate", D, &["birthDate"]),
    p("gender", T, &["gender"]),
    p("active", T, &["active"]),
    p("address", S, &["address"]),
    p("organization", R, &["managingOrganization"]),
    p("general-practitioner", R, &["generalPractitioner"]),
];
const PRACTITIONER: &[ParamDef] =
    &[IDENT, NAME, FAMILY, GIVEN, p("gender", T, &["gender"]), p("active", T, &["active"])];
const ORGANIZATION: &[ParamDef] = &[
    IDENT,
    p("name", S, &["name", "alias"]),
    p("partof", R, &["partOf"]),
    p("type", T, &["type"]),
    p("active", T, &["active"]),
];
const OBSERVATION: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, CODE, CATEGORY, STATUS, ENCOUNTER,
    p("date", D, &["effective[x]"]),
    p("performer", R, &["performer"]),
];
const CONDITION: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, CODE, CATEGORY, ENCOUNTER,
    p("clinical-status", T, &["clinicalStatus"]),
    p("verification-status", T, &["verificationStatus"]),
    p("onset-date", D, &["onset[x]"]),
    p("recorded-date", D, &["recordedDate"]),
];
const ENCOUNTER_PARAMS: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, STATUS,
    p("date", D, &["period"]),
    p("class", T, &["class"]),
    p("type", T, &["type"]),
    p("participant", R, &["participant.individual"]),
    p("service-provider", R, &["serviceProvider"]),
];
const PROCEDURE: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, CODE, CATEGORY, STATUS, ENCOUNTER,
    p("date", D, &["performed[x]"]),
];
const MEDICATION_REQUEST: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, STATUS, CATEGORY, ENCOUNTER,
    p("code", T, &["medication[x]"]),
    p("intent", T, &["intent"]),
    p("authoredon", D, &["authoredOn"]),
    p("date", D, &["dosageInstruction.timing.event"]),
    p("requester", R, &["requester"]),
];
const ALLERGY: &[ParamDef] = &[
    IDENT, patient(&["patient"]),
    p("code", T, &["code", "reaction.substance"]),
    p("category", T, &["category"]),
    p("clinical-status", T, &["clinicalStatus"]),
    p("criticality", T, &["criticality"]),
    p("date", D, &["recordedDate"]),
];
const IMMUNIZATION: &[ParamDef] = &[
    IDENT, patient(&["patient"]), STATUS,
    p("date", D, &["occurrence[x]"]),
    p("vaccine-code", T, &["vaccineCode"]),
];
const DIAGNOSTIC_REPORT: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, CODE, CATEGORY, STATUS, ENCOUNTER,
    p("date", D, &["effective[x]"]),
    p("result", R, &["result"]),
];
const DOCUMENT_REFERENCE: &[ParamDef] = &[
    p("identifier", T, &["masterIdentifier", "identifier"]),
    patient(&["subject"]), SUBJECT, STATUS, CATEGORY,
    p("type", T, &["type"]),
    p("date", D, &["date"]),
    p("encounter", R, &["context.encounter"]),
    p("period", D, &["context.period"]),
];
const CARE_TEAM: &[ParamDef] = &[
    IDENT, patient(&["subject"]), SUBJECT, STATUS, CATEGORY,
    p("date", D, &["period"]),
    p("participant", R, &["participant.member"]),
];
const CONSENT: &[ParamDef] = &[
    IDENT, patient(&["patient"]), STATUS, CATEGORY,
    p("date", D, &["dateTime"]),
    p("scope", T, &["scope"]),
    p("actor", R, &["provision.actor.reference"]),
];

/// The search parameters of a resource type (beyond `_id` and `_lastUpdated`, which every type
/// has): the indexed ones below, then every other R4 parameter of the type from the generated
/// table (`r4/search-params.txt`, `tools/gen-search-params.py`), decided after decryption.
pub fn params_for(resource_type: &str) -> &'static [ParamDef] {
    static TABLE: std::sync::OnceLock<std::collections::HashMap<&'static str, &'static [ParamDef]>> = std::sync::OnceLock::new();
    TABLE.get_or_init(build_table).get(resource_type).copied().unwrap_or(&[])
}

/// The generated R4 parameters, one line each: type, name, kind, paths, target, components.
pub(crate) const GENERATED: &str = include_str!("r4/search-params.txt");

/// Built once per process; the definitions live as long as it (leaked on purpose: they are
/// `'static` like the hand-written ones, so search requests can hold them).
fn build_table() -> std::collections::HashMap<&'static str, &'static [ParamDef]> {
    let mut by_type: std::collections::HashMap<&'static str, Vec<ParamDef>> = std::collections::HashMap::new();
    for t in crate::r4::resource_types() {
        by_type.insert(t, indexed_params(t).to_vec());
    }
    for line in GENERATED.lines() {
        let Some((t, def)) = generated_def(line) else { continue };
        let Some(defs) = by_type.get_mut(t) else { continue };
        if !defs.iter().any(|d| d.name == def.name) {
            defs.push(def);
        }
    }
    by_type.into_iter().map(|(t, defs)| (t, &*Box::leak(defs.into_boxed_slice()))).collect()
}

fn leak_paths(text: &'static str, sep: char) -> &'static [&'static str] {
    Box::leak(text.split(sep).collect::<Vec<_>>().into_boxed_slice())
}

/// One line of the generated table; `None` for a line that does not parse (the unit test
/// `generated_table_parses` checks there are none).
pub(crate) fn generated_def(line: &'static str) -> Option<(&'static str, ParamDef)> {
    let f: Vec<&'static str> = line.split('\t').collect();
    let [t, name, kind, paths, target, components] = f[..] else { return None };
    let kind = ParamKind::parse(kind)?;
    let components: &'static [ParamDef] = if components == "-" {
        &[]
    } else {
        let parts = components
            .split(';')
            .map(|c| {
                let (k, paths) = c.split_once('=')?;
                Some(ParamDef { name, kind: ParamKind::parse(k)?, paths: leak_paths(paths, ','), target: None, indexed: false, components: &[] })
            })
            .collect::<Option<Vec<_>>>()?;
        Box::leak(parts.into_boxed_slice())
    };
    let target = (target != "-").then_some(target);
    Some((t, ParamDef { name, kind, paths: leak_paths(paths, '|'), target, indexed: false, components }))
}

/// The hand-picked parameters the blind index holds keys for.
fn indexed_params(resource_type: &str) -> &'static [ParamDef] {
    match resource_type {
        "Patient" => PATIENT,
        "Practitioner" => PRACTITIONER,
        "Organization" => ORGANIZATION,
        "Observation" => OBSERVATION,
        "Condition" => CONDITION,
        "Encounter" => ENCOUNTER_PARAMS,
        "Procedure" => PROCEDURE,
        "MedicationRequest" => MEDICATION_REQUEST,
        "AllergyIntolerance" => ALLERGY,
        "Immunization" => IMMUNIZATION,
        "DiagnosticReport" => DIAGNOSTIC_REPORT,
        "DocumentReference" => DOCUMENT_REFERENCE,
        "CareTeam" => CARE_TEAM,
        "Consent" => CONSENT,
        _ => &[],
    }
}

/// Every value at a path, arrays flattened (`name.given` on a Patient with two names gives every
/// given name of both).
pub fn values_at<'a>(resource: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![resource];
    for segment in segments(path) {
        // `name[field=value]`: only the elements whose `field` is `value`.
        let (segment, only) = match segment.split_once('[').filter(|_| !segment.ends_with("[x]")) {
            Some((name, filter)) => (name, filter.strip_suffix(']').and_then(|f| f.split_once('='))),
            None => (segment, None),
        };
        let mut next = Vec::new();
        for v in current {
            let Value::Object(map) = v else { continue };
            let matched: Vec<&Value> = match segment.strip_suffix("[x]") {
                Some(stem) => map
                    .iter()
                    .filter(|(k, _)| {
                        k.strip_prefix(stem).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                    })
                    .map(|(_, v)| v)
                    .collect(),
                None => map.get(segment).into_iter().collect(),
            };
            for m in matched {
                match m {
                    Value::Array(items) => next.extend(items.iter()),
                    other => next.push(other),
                }
            }
        }
        if let Some((field, value)) = only {
            next.retain(|v| v.get(field).and_then(Value::as_str) == Some(value));
        }
        current = next;
    }
    current
}

/// A path's segments: split at the dots outside `[...]` (a filter's value may hold dots); none
/// for `""`, the resource itself.
fn segments(path: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in path.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                out.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if !path.is_empty() {
        out.push(&path[start..]);
    }
    out
}

/// One index key of a resource: the parameter and the key string (hashed by the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexKey {
    pub param: &'static str,
    pub key: String,
}

/// String prefix slots per value: longer search strings are narrowed by their first 16
/// characters and then matched after decryption.
pub const PREFIX_SLOTS: usize = 16;

/// All index keys of a resource for its type's search parameters.
pub fn index_keys(resource_type: &str, resource: &Value) -> Vec<IndexKey> {
    let mut out = Vec::new();
    for def in params_for(resource_type).iter().filter(|d| d.indexed) {
        let mut keys: Vec<String> = Vec::new();
        for path in def.paths {
            for v in values_at(resource, path) {
                match def.kind {
                    ParamKind::Token => token_keys(v, &mut keys),
                    ParamKind::String => {
                        for s in string_values(v) {
                            string_keys(s, &mut keys);
                        }
                    }
                    ParamKind::Reference => reference_keys(v, def.target, &mut keys),
                    ParamKind::Date => {
                        if let Some(i) = date_value(v) {
                            keys.extend(date::index_keys(&i));
                        }
                    }
                    ParamKind::Number | ParamKind::Quantity | ParamKind::Uri | ParamKind::Composite => {}
                }
            }
        }
        keys.sort();
        keys.dedup();
        out.extend(keys.into_iter().map(|key| IndexKey { param: def.name, key }));
    }
    out
}

fn push_coding(system: Option<&str>, code: &str, out: &mut Vec<String>) {
    out.push(format!("v:{code}"));
    match system {
        Some(s) => {
            out.push(format!("s:{s}|{code}"));
            out.push(format!("s:{s}|"));
        }
        None => out.push(format!("n:{code}")),
    }
}

fn token_keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => push_coding(None, s, out),
        Value::Bool(b) => push_coding(None, if *b { "true" } else { "false" }, out),
        Value::Object(map) => {
            if let Some(Value::Array(codings)) = map.get("coding") {
                codings.iter().for_each(|c| token_keys(c, out));
            }
            let system = map.get("system").and_then(Value::as_str);
            let code = map.get("code").or_else(|| map.get("value")).and_then(Value::as_str);
            if let Some(code) = code {
                push_coding(system, code, out);
            }
        }
        _ => {}
    }
}

/// The searchable strings in a value: itself, or the parts of a HumanName or Address.
fn string_values(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Object(map) => {
            let mut out = Vec::new();
            for field in ["text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country"] {
                match map.get(field) {
                    Some(Value::String(s)) => out.push(s.as_str()),
                    Some(Value::Array(items)) => out.extend(items.iter().filter_map(Value::as_str)),
                    _ => {}
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Lower case, common Latin diacritics removed, whitespace collapsed: R4 string search is
/// case- and accent-insensitive.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if space {
            out.push(' ');
            space = false;
        }
        out.push(fold_diacritic(c));
    }
    out
}

fn fold_diacritic(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ą' => 'a',
        'ç' | 'ć' | 'č' => 'c',
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ę' | 'ě' => 'e',
        'ì' | 'í' | 'î' | 'ï' | 'ī' => 'i',
        'ñ' | 'ń' | 'ň' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => 'o',
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' => 'u',
        'ý' | 'ÿ' => 'y',
        'ś' | 'š' | 'ş' => 's',
        'ź' | 'ż' | 'ž' => 'z',
        'ł' => 'l',
        'ř' => 'r',
        'ť' => 't',
        'ď' => 'd',
        other => other,
    }
}

fn string_keys(s: &str, out: &mut Vec<String>) {
    let norm = normalize(s);
    let chars: Vec<char> = norm.chars().collect();
    for slot in 1..=PREFIX_SLOTS {
        if slot <= chars.len() {
            out.push(format!("p:{}", chars[..slot].iter().collect::<String>()));
        } else {
            // Filler keys keep the count of tokens per value constant; nobody searches for them.
            out.push(format!("f:{slot}:{norm}"));
        }
    }
    out.push(format!("e:{s}"));
}

fn reference_keys(v: &Value, target: Option<&str>, out: &mut Vec<String>) {
    let Some(r) = v.get("reference").and_then(Value::as_str).and_then(reference::parse) else { return };
    if target.is_some_and(|t| t != r.resource_type) {
        return;
    }
    out.push(format!("r:{}", r.key()));
    out.push(format!("i:{}", r.id));
}

/// Whether a Reference has one of the keys `ks` that [`reference_keys`] gives it, without
/// building them (tested on every search result).
fn reference_has_key(v: &Value, target: Option<&str>, ks: &[String]) -> bool {
    let Some(r) = v.get("reference").and_then(Value::as_str).and_then(reference::parse) else { return false };
    if target.is_some_and(|t| t != r.resource_type) {
        return false;
    }
    let is_key = |k: &String| match (k.strip_prefix("r:"), k.strip_prefix("i:")) {
        (Some(key), _) => key.strip_prefix(r.resource_type.as_str()).and_then(|rest| rest.strip_prefix('/')) == Some(r.id.as_str()),
        (None, Some(id)) => id == r.id,
        (None, None) => false,
    };
    ks.iter().any(is_key)
}

fn date_value(v: &Value) -> Option<Interval> {
    match v {
        Value::String(s) => date::parse(s).ok(),
        Value::Object(map) => {
            let start = map.get("start").and_then(Value::as_str).and_then(|s| date::parse(s).ok());
            let end = map.get("end").and_then(Value::as_str).and_then(|s| date::parse(s).ok());
            if start.is_none() && end.is_none() {
                return None;
            }
            Some(Interval {
                start: start.map_or(Interval::ALL.start, |i| i.start),
                end: end.map_or(Interval::ALL.end, |i| i.end),
            })
        }
        _ => None,
    }
}

/// How results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    /// The order resources were first created (stable under updates).
    #[default]
    Created,
    LastUpdatedAsc,
    LastUpdatedDesc,
}

/// A parsed search request for one resource type.
#[derive(Debug)]
pub struct SearchRequest {
    pub conditions: Vec<Condition>,
    pub count: usize,
    pub offset: usize,
    /// The order the store can give by itself (`_sort` by `_lastUpdated` alone, or none).
    pub sort: SortOrder,
    /// `_sort` keys beyond that, in order: results are ordered after decryption.
    pub sort_keys: Vec<SortKey>,
    /// `_summary=count` or `_count=0`: the total only.
    pub count_only: bool,
    /// `_total` (or `_totalMethod`): whether and how exactly `total` is given.
    pub total: TotalMode,
    /// `_include` and `_include:iterate`.
    pub includes: Vec<Include>,
    /// `_revinclude` and `_revinclude:iterate`.
    pub revincludes: Vec<Include>,
    /// `_elements` and `_summary` (other than `count`).
    pub shape: Shape,
}

/// One `_sort` key.
#[derive(Debug, Clone, Copy)]
pub struct SortKey {
    pub by: SortBy,
    pub descending: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum SortBy {
    Id,
    LastUpdated,
    Param(&'static ParamDef),
}

/// `_include=Source:param[:Target]` (or `_revinclude`): the resources the `param` references of
/// `Source` resources point at (or, reversed, the `Source` resources whose `param` points at a
/// result).
#[derive(Debug, Clone)]
pub struct Include {
    pub source: String,
    pub def: &'static ParamDef,
    pub target: Option<String>,
    pub iterate: bool,
}

/// How much of each result is returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Shape {
    #[default]
    Full,
    /// `_elements`: these top-level elements (and `id`, `meta`, `resourceType`).
    Elements(Vec<String>),
    /// `_summary=text`: `text`, `id`, `meta` and the top-level required elements.
    Text,
    /// `_summary=data`: everything but `text`.
    Data,
    /// `_summary=true`: the elements R4 marks as summary, and the required ones.
    Summary,
}

pub const DEFAULT_COUNT: usize = 20;
pub const MAX_COUNT: usize = 1000;
/// Up to how many matches a search counts exactly unless `_total=accurate` asks for the exact
/// number whatever it costs: listing every match of a patient with 50,000 Observations cost
/// more than 200 ordinary searches (bench/README "The comparison rerun").
pub const EXACT_TOTAL_UP_TO: usize = 1000;

/// How a search's `total` is given (`_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalMode {
    /// `none`: left out.
    None,
    /// The default, and `estimate`: exact when the caller may see at most [`EXACT_TOTAL_UP_TO`]
    /// matches, else left out (the `next` link says more follow).
    UpTo,
    /// `accurate` (and `count`, `exact`, which fhirpy sends as `_totalMethod`): always exact.
    Accurate,
}

/// One search parameter of the request; its alternatives (comma-separated values) are ORed, the
/// conditions of a request are ANDed.
#[derive(Debug)]
pub struct Condition {
    pub param: String,
    pub test: Test,
}

#[derive(Debug)]
pub enum Test {
    Id(Vec<String>),
    LastUpdated(Vec<(Prefix, Interval)>),
    Indexed { def: &'static ParamDef, alternatives: Vec<Alternative> },
    /// `:not`: none of the alternatives matches (decided after decryption).
    Not { def: &'static ParamDef, alternatives: Vec<Alternative> },
    /// `subject:Patient.name=x`: the reference `def` points at a `target` resource matching
    /// `inner` (a search of `target`, itself possibly chained). Resolved into an `Indexed` test
    /// by whoever runs the search, before the store is asked ([`Condition::resolved_references`]).
    Chain { def: &'static ParamDef, target: String, inner: Vec<(String, String)> },
    /// `_has:Observation:patient:code=x`: some `source` resource matching `inner` points at this
    /// one through its reference `def`. Resolved into an `Id` test ([`Condition::resolved_ids`]).
    Has { source: String, def: &'static ParamDef, inner: Vec<(String, String)> },
}

#[derive(Debug)]
pub enum Alternative {
    Token(String),
    String { value: String, exact: bool },
    Reference(Vec<String>),
    Date(Prefix, Interval),
    // Modifiers decided after decryption (no index key of their own; R4 search §3.1.1.5.5).
    /// `:missing=true|false`: the parameter has no value (or has one).
    Missing(bool),
    /// `:contains` (strings): the value anywhere in a string, accents and case ignored.
    Contains(String),
    /// `:text` (tokens): the start of a CodeableConcept's text or a Coding's display.
    Text(String),
    /// `:identifier` (references): the reference's `identifier`, as a token key.
    Identifier(String),
    /// `:of-type` (identifiers): `type` has the coding `system|code`, and `value` is the value.
    OfType { system: String, code: String, value: String },
    // Kinds decided after decryption.
    Number(Prefix, crate::number::SearchNumber),
    Quantity(Prefix, crate::number::SearchQuantity),
    /// A uri, exactly; `:below` — the value starts with it; `:above` — it starts with the value.
    Uri { value: String, relation: UriRelation },
    /// A composite's parts, matched together on one element.
    Composite(Vec<Alternative>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriRelation {
    Exact,
    Below,
    Above,
}

/// How deep chains and `_has` may nest (`a.b.c` is two).
pub const MAX_CHAIN_DEPTH: usize = 3;

impl Condition {
    /// A chain resolved to the resources it found: the reference must point at one of them
    /// (`Type/id` each); none matches nothing.
    pub fn resolved_references(def: &'static ParamDef, param: &str, targets: &[String]) -> Condition {
        let keys = targets.iter().map(|t| format!("r:{t}")).collect();
        Condition { param: param.to_string(), test: Test::Indexed { def, alternatives: vec![Alternative::Reference(keys)] } }
    }

    /// A `_has` resolved to the ids it found.
    pub fn resolved_ids(param: &str, ids: Vec<String>) -> Condition {
        Condition { param: param.to_string(), test: Test::Id(ids) }
    }

    /// The index keys a matching resource carries at least one of, or `None` when this
    /// condition cannot narrow the candidates (e.g. a `ne` date).
    pub fn candidate_keys(&self) -> Option<Vec<String>> {
        let Test::Indexed { def, alternatives } = &self.test else { return None };
        if !def.indexed {
            return None;
        }
        let mut keys = Vec::new();
        for alt in alternatives {
            match alt {
                Alternative::Missing(_)
                | Alternative::Contains(_)
                | Alternative::Text(_)
                | Alternative::Identifier(_)
                | Alternative::OfType { .. }
                | Alternative::Number(..)
                | Alternative::Quantity(..)
                | Alternative::Uri { .. }
                | Alternative::Composite(_) => return None,
                Alternative::Token(k) => keys.push(k.clone()),
                Alternative::String { value, exact: true } => keys.push(format!("e:{value}")),
                Alternative::String { value, exact: false } => {
                    let norm: String = normalize(value).chars().take(PREFIX_SLOTS).collect();
                    keys.push(format!("p:{norm}"));
                }
                Alternative::Reference(ks) => keys.extend(ks.iter().cloned()),
                Alternative::Date(prefix, search) => keys.extend(date::query_keys(&prefix.candidate_interval(search)?)),
            }
        }
        Some(keys)
    }

    /// True when a match on the candidate keys is already a precise match, so the store's
    /// count is exact without decrypting.
    pub fn keys_are_exact(&self) -> bool {
        match &self.test {
            Test::Id(_) | Test::LastUpdated(_) => true,
            Test::Chain { .. } | Test::Has { .. } | Test::Not { .. } => false,
            Test::Indexed { def, .. } if !def.indexed => false,
            Test::Indexed { alternatives, .. } => alternatives.iter().all(|a| match a {
                Alternative::Token(_) | Alternative::Reference(_) => true,
                Alternative::String { value, exact } => *exact || normalize(value).chars().count() <= PREFIX_SLOTS,
                _ => false,
            }),
        }
    }

    /// The precise test on a decrypted resource.
    pub fn matches(&self, resource_type: &str, resource: &Value) -> bool {
        match &self.test {
            Test::Id(ids) => resource.get("id").and_then(Value::as_str).is_some_and(|id| ids.iter().any(|i| i == id)),
            Test::LastUpdated(alts) => {
                let lu = resource.pointer("/meta/lastUpdated").and_then(Value::as_str).and_then(|s| date::parse(s).ok());
                lu.is_some_and(|t| alts.iter().any(|(p, s)| p.matches(s, &t)))
            }
            Test::Indexed { def, alternatives } => {
                let values: Vec<&Value> = def.paths.iter().flat_map(|path| values_at(resource, path)).collect();
                let _ = resource_type;
                alternatives.iter().any(|alt| alternative_matches(def, alt, &values))
            }
            Test::Not { def, alternatives } => {
                let values: Vec<&Value> = def.paths.iter().flat_map(|path| values_at(resource, path)).collect();
                !alternatives.iter().any(|alt| alternative_matches(def, alt, &values))
            }
            // Unresolved, it matches nothing: a search never widens by a condition it skipped.
            Test::Chain { .. } | Test::Has { .. } => false,
        }
    }
}

fn alternative_matches(def: &ParamDef, alt: &Alternative, values: &[&Value]) -> bool {
    match alt {
        Alternative::Token(k) => values.iter().any(|v| {
            let mut keys = Vec::new();
            token_keys(v, &mut keys);
            keys.contains(k)
        }),
        Alternative::String { value, exact } => {
            let wanted = normalize(value);
            values.iter().flat_map(|v| string_values(v)).any(|s| if *exact { s == value } else { normalize(s).starts_with(&wanted) })
        }
        Alternative::Reference(ks) => values.iter().any(|v| reference_has_key(v, def.target, ks)),
        Alternative::Date(prefix, search) => {
            values.iter().filter_map(|v| date_value(v)).any(|t| prefix.matches(search, &t))
        }
        Alternative::Missing(missing) => values.is_empty() == *missing,
        Alternative::Contains(part) => {
            let part = normalize(part);
            values.iter().flat_map(|v| string_values(v)).any(|s| normalize(s).contains(&part))
        }
        Alternative::Text(start) => {
            let start = normalize(start);
            values.iter().flat_map(|v| token_texts(v)).any(|t| normalize(t).starts_with(&start))
        }
        Alternative::Identifier(key) => values.iter().filter_map(|v| v.get("identifier")).any(|id| {
            let mut keys = Vec::new();
            token_keys(id, &mut keys);
            keys.contains(key)
        }),
        Alternative::OfType { system, code, value } => values.iter().any(|id| {
            let typed = id.pointer("/type/coding").and_then(Value::as_array).is_some_and(|cs| {
                cs.iter().any(|c| c.get("system").and_then(Value::as_str) == Some(system) && c.get("code").and_then(Value::as_str) == Some(code))
            });
            typed && id.get("value").and_then(Value::as_str) == Some(value)
        }),
        Alternative::Number(prefix, n) => values.iter().filter_map(|v| v.as_f64()).any(|x| crate::number::matches(*prefix, n, x)),
        Alternative::Quantity(prefix, q) => values.iter().any(|v| crate::number::quantity_matches(*prefix, q, v)),
        Alternative::Uri { value, relation } => values.iter().filter_map(|v| v.as_str()).any(|u| match relation {
            UriRelation::Exact => u == value,
            UriRelation::Below => u.starts_with(value.as_str()),
            UriRelation::Above => value.starts_with(u),
        }),
        // Every part on the same element (`code-value-quantity`: that code with that value).
        Alternative::Composite(parts) => values.iter().any(|element| {
            def.components.iter().zip(parts).all(|(component, part)| {
                let inner: Vec<&Value> = component.paths.iter().flat_map(|p| values_at(element, p)).collect();
                alternative_matches(component, part, &inner)
            })
        }),
    }
}

/// The human-readable texts of a token value: a CodeableConcept's `text`, each Coding's
/// `display` (what `:text` searches).
fn token_texts(v: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    if let Some(t) = v.get("text").and_then(Value::as_str) {
        out.push(t);
    }
    if let Some(d) = v.get("display").and_then(Value::as_str) {
        out.push(d);
    }
    if let Some(Value::Array(cs)) = v.get("coding") {
        out.extend(cs.iter().filter_map(|c| c.get("display").and_then(Value::as_str)));
    }
    out
}

/// Parameters that shape the result rather than select it, and are accepted and handled or
/// harmless.
const RESULT_PARAMS: &[&str] = &["_count", "_offset", "_sort", "_summary", "_total", "_totalMethod", "_elements", "_include", "_revinclude", "_format", "_pretty"];

/// Parses a search request. Unknown parameters and modifiers are rejected rather than ignored: a
/// silently ignored typo would widen a query and disclose more than was asked for.
pub fn parse_request(resource_type: &str, pairs: &[(String, String)]) -> Result<SearchRequest, FhirError> {
    let mut req = SearchRequest {
        conditions: Vec::new(),
        count: DEFAULT_COUNT,
        offset: 0,
        sort: SortOrder::Created,
        sort_keys: Vec::new(),
        count_only: false,
        total: TotalMode::UpTo,
        includes: Vec::new(),
        revincludes: Vec::new(),
        shape: Shape::Full,
    };
    for (raw_name, value) in pairs {
        let (name, modifier) = match raw_name.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (raw_name.as_str(), None),
        };
        if RESULT_PARAMS.contains(&name) {
            apply_result_param(&mut req, resource_type, name, modifier, value)?;
            continue;
        }
        if value.is_empty() {
            return Err(FhirError::invalid(format!("search parameter '{raw_name}' has an empty value")));
        }
        if let Some(rest) = raw_name.strip_prefix("_has:") {
            let test = parse_has(resource_type, rest, value, 1)?;
            req.conditions.push(Condition { param: raw_name.to_string(), test });
            continue;
        }
        if let Some((head, tail)) = raw_name.split_once('.') {
            let test = parse_chain(resource_type, head, tail, value, 1)?;
            req.conditions.push(Condition { param: raw_name.to_string(), test });
            continue;
        }
        let test = match name {
            "_id" => {
                no_modifier(raw_name, modifier)?;
                Test::Id(value.split(',').map(str::to_string).collect())
            }
            "_lastUpdated" => {
                no_modifier(raw_name, modifier)?;
                let alts = value.split(',').map(parse_date_alt).collect::<Result<_, _>>()?;
                Test::LastUpdated(alts)
            }
            _ => {
                let def = params_for(resource_type).iter().find(|d| d.name == name).ok_or_else(|| {
                    FhirError::invalid(format!("unknown search parameter '{name}' for {resource_type}"))
                })?;
                if modifier == Some("not") {
                    if def.kind != ParamKind::Token {
                        return Err(FhirError::not_supported(format!("':not' applies to token parameters; '{name}' is not one")));
                    }
                    let alternatives = value.split(',').map(|v| parse_alternative(def, None, v, raw_name)).collect::<Result<_, _>>()?;
                    Test::Not { def, alternatives }
                } else {
                    let alternatives = value.split(',').map(|v| parse_alternative(def, modifier, v, raw_name)).collect::<Result<_, _>>()?;
                    Test::Indexed { def, alternatives }
                }
            }
        };
        req.conditions.push(Condition { param: name.to_string(), test });
    }
    Ok(req)
}

/// `head.tail=value` on `resource_type`: `head` is `param` or `param:Target`, a reference
/// parameter; `tail` a parameter of the target (checked now, so a typo is a 400).
fn parse_chain(resource_type: &str, head: &str, tail: &str, value: &str, depth: usize) -> Result<Test, FhirError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(FhirError::not_supported(format!("chains and _has nest at most {MAX_CHAIN_DEPTH} deep")));
    }
    let (param, target) = match head.split_once(':') {
        Some((p, t)) => (p, Some(t)),
        None => (head, None),
    };
    let def = params_for(resource_type)
        .iter()
        .find(|d| d.name == param && d.kind == ParamKind::Reference)
        .ok_or_else(|| FhirError::invalid(format!("'{param}' is not a reference search parameter of {resource_type}, so it cannot be chained")))?;
    let target = match target.or(def.target) {
        Some(t) if crate::r4::is_resource_type(t) && def.target.is_none_or(|only| only == t) => t.to_string(),
        Some(t) => return Err(FhirError::invalid(format!("'{t}' is not a resource type '{param}' can point at"))),
        None => return Err(FhirError::invalid(format!("name the type '{param}' points at: {param}:Type.{tail}"))),
    };
    let inner = vec![(tail.to_string(), value.to_string())];
    check_inner(&target, &inner, depth)?;
    Ok(Test::Chain { def, target, inner })
}

/// `_has:Source:param:rest=value`: `rest` is a parameter of `Source` (or another `_has:`).
fn parse_has(resource_type: &str, spec: &str, value: &str, depth: usize) -> Result<Test, FhirError> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(FhirError::not_supported(format!("chains and _has nest at most {MAX_CHAIN_DEPTH} deep")));
    }
    let mut parts = spec.splitn(3, ':');
    let (Some(source), Some(param), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(FhirError::invalid(format!("_has:{spec}: expected _has:Type:reference-parameter:parameter")));
    };
    if !crate::r4::is_resource_type(source) {
        return Err(FhirError::invalid(format!("_has: '{source}' is not a resource type")));
    }
    let def = params_for(source)
        .iter()
        .find(|d| d.name == param && d.kind == ParamKind::Reference && d.target.is_none_or(|t| t == resource_type))
        .ok_or_else(|| FhirError::invalid(format!("_has: '{param}' is not a reference search parameter of {source} that can point at {resource_type}")))?;
    let inner = vec![(rest.to_string(), value.to_string())];
    check_inner(source, &inner, depth)?;
    Ok(Test::Has { source: source.to_string(), def, inner })
}

/// The inner search of a chain or `_has` parses (its own chains one level deeper).
fn check_inner(resource_type: &str, inner: &[(String, String)], depth: usize) -> Result<(), FhirError> {
    for (name, value) in inner {
        if RESULT_PARAMS.iter().any(|r| name == r || name.starts_with(&format!("{r}:"))) {
            return Err(FhirError::invalid(format!("'{name}' shapes results and cannot end a chain")));
        }
        if let Some(rest) = name.strip_prefix("_has:") {
            parse_has(resource_type, rest, value, depth + 1)?;
        } else if let Some((head, tail)) = name.split_once('.') {
            parse_chain(resource_type, head, tail, value, depth + 1)?;
        } else {
            parse_request(resource_type, &[(name.clone(), value.clone())])?;
        }
    }
    Ok(())
}

/// A search's parameters without those Valv does not support (unknown parameters, unsupported
/// modifiers or values), for `Prefer: handling=lenient`. A supported parameter with a malformed
/// value (a bad date) is kept, so that it still fails.
pub fn lenient_pairs(resource_type: &str, pairs: &[(String, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .filter(|pair| match parse_request(resource_type, std::slice::from_ref(*pair)) {
            Ok(_) => true,
            Err(e) => e.code != crate::IssueCode::NotSupported && !e.message.starts_with("unknown search parameter"),
        })
        .cloned()
        .collect()
}

fn no_modifier(raw: &str, modifier: Option<&str>) -> Result<(), FhirError> {
    match modifier {
        None => Ok(()),
        Some(m) => Err(FhirError::not_supported(format!("modifier ':{m}' is not supported on '{raw}'"))),
    }
}

fn parse_usize(name: &str, value: &str) -> Result<usize, FhirError> {
    value.parse().map_err(|_| FhirError::invalid(format!("'{name}' must be a non-negative integer, got '{value}'")))
}

fn apply_result_param(req: &mut SearchRequest, resource_type: &str, name: &str, modifier: Option<&str>, value: &str) -> Result<(), FhirError> {
    let iterate = match (name, modifier) {
        ("_include" | "_revinclude", Some("iterate" | "recurse")) => true,
        (_, None) => false,
        (_, Some(m)) => return Err(FhirError::not_supported(format!("modifier ':{m}' is not supported on '{name}'"))),
    };
    match name {
        "_count" => {
            let n = parse_usize(name, value)?;
            req.count_only |= n == 0;
            req.count = n.min(MAX_COUNT);
        }
        "_offset" => req.offset = parse_usize(name, value)?,
        "_sort" => parse_sort(req, resource_type, value)?,
        "_summary" => match value {
            "count" => req.count_only = true,
            "false" => {}
            "text" => req.shape = Shape::Text,
            "data" => req.shape = Shape::Data,
            "true" => req.shape = Shape::Summary,
            other => return Err(FhirError::invalid(format!("_summary={other}: use true, text, data, count or false"))),
        },
        // `_totalMethod` is what some clients (fhirpy's count()) send for `_total`.
        "_total" | "_totalMethod" => match value {
            "none" => req.total = TotalMode::None,
            "estimate" => req.total = TotalMode::UpTo,
            "accurate" | "count" | "exact" => req.total = TotalMode::Accurate,
            other => return Err(FhirError::invalid(format!("{name}={other}: use none, estimate or accurate"))),
        },
        "_elements" => {
            let names: Vec<String> = value.split(',').map(str::trim).filter(|n| !n.is_empty()).map(str::to_string).collect();
            if names.iter().any(|n| n.starts_with('-')) {
                return Err(FhirError::not_supported("_elements with '-' (leaving elements out) is not supported: name the elements to return"));
            }
            req.shape = Shape::Elements(names);
        }
        // `_include=*`: every reference parameter of the searched type.
        "_include" if value == "*" => req.includes.extend(
            params_for(resource_type)
                .iter()
                .filter(|d| d.kind == ParamKind::Reference)
                .map(|def| Include { source: resource_type.to_string(), def, target: None, iterate }),
        ),
        "_include" => req.includes.push(parse_include(name, value, iterate)?),
        "_revinclude" => req.revincludes.push(parse_include(name, value, iterate)?),
        "_format" if !value.contains("json") => {
            return Err(FhirError::not_supported(format!("_format={value} is not supported: Valv speaks JSON only")))
        }
        _ => {}
    }
    Ok(())
}

/// `_sort=a,-b`: `_lastUpdated` alone is ordered by the store; any other key after decryption.
fn parse_sort(req: &mut SearchRequest, resource_type: &str, value: &str) -> Result<(), FhirError> {
    req.sort_keys.clear();
    req.sort = SortOrder::Created;
    for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let (descending, name) = match key.strip_prefix('-') {
            Some(n) => (true, n),
            None => (false, key),
        };
        let by = match name {
            "_id" => SortBy::Id,
            "_lastUpdated" => SortBy::LastUpdated,
            _ => SortBy::Param(params_for(resource_type).iter().find(|d| d.name == name).ok_or_else(|| {
                FhirError::invalid(format!("_sort: unknown search parameter '{name}' for {resource_type}"))
            })?),
        };
        req.sort_keys.push(SortKey { by, descending });
    }
    if let [SortKey { by: SortBy::LastUpdated, descending }] = req.sort_keys[..] {
        req.sort = if descending { SortOrder::LastUpdatedDesc } else { SortOrder::LastUpdatedAsc };
        req.sort_keys.clear();
    }
    Ok(())
}

/// `Source:param` or `Source:param:Target`, `param` a reference parameter of `Source`.
fn parse_include(name: &str, value: &str, iterate: bool) -> Result<Include, FhirError> {
    let parts: Vec<&str> = value.split(':').collect();
    let (source, param, target) = match parts[..] {
        [s, p] => (s, p, None),
        [s, p, t] => (s, p, Some(t)),
        _ if value == "*" => return Err(FhirError::not_supported(format!("{name}=* is not supported: name the parameter (Type:param)"))),
        _ => return Err(FhirError::invalid(format!("{name}={value}: expected Type:parameter or Type:parameter:TargetType"))),
    };
    if !crate::r4::is_resource_type(source) {
        return Err(FhirError::invalid(format!("{name}: '{source}' is not a resource type")));
    }
    if let Some(t) = target.filter(|t| !crate::r4::is_resource_type(t)) {
        return Err(FhirError::invalid(format!("{name}: '{t}' is not a resource type")));
    }
    let def = params_for(source)
        .iter()
        .find(|d| d.name == param && d.kind == ParamKind::Reference)
        .ok_or_else(|| FhirError::invalid(format!("{name}: '{param}' is not a reference search parameter of {source}")))?;
    Ok(Include { source: source.to_string(), def, target: target.map(str::to_string), iterate })
}

/// What a resource is ordered by for one sort key: the lowest of its values ascending, the
/// highest descending (R4 search §3.1.1.4.10); `None` (no value) sorts last either way.
pub fn sort_value(key: &SortKey, resource: &Value) -> Option<SortValue> {
    let def = match key.by {
        SortBy::Id => return resource.get("id").and_then(Value::as_str).map(|s| SortValue::Text(s.to_string())),
        SortBy::LastUpdated => {
            let t = resource.pointer("/meta/lastUpdated").and_then(Value::as_str).and_then(|s| date::parse(s).ok())?;
            return Some(SortValue::Time(t.start));
        }
        SortBy::Param(def) => def,
    };
    let values = def.paths.iter().flat_map(|p| values_at(resource, p));
    let mut all: Vec<SortValue> = Vec::new();
    for v in values {
        match def.kind {
            ParamKind::Date => all.extend(date_value(v).map(|i| SortValue::Time(if key.descending { i.end } else { i.start }))),
            ParamKind::String => all.extend(string_values(v).into_iter().map(|s| SortValue::Text(normalize(s)))),
            ParamKind::Token => {
                let mut keys = Vec::new();
                token_keys(v, &mut keys);
                all.extend(keys.iter().filter_map(|k| k.strip_prefix("v:")).map(|c| SortValue::Text(c.to_string())));
            }
            ParamKind::Reference => {
                let mut keys = Vec::new();
                reference_keys(v, def.target, &mut keys);
                all.extend(keys.iter().filter_map(|k| k.strip_prefix("r:")).map(|r| SortValue::Text(r.to_string())));
            }
            ParamKind::Number => all.extend(v.as_f64().map(SortValue::number)),
            ParamKind::Quantity => all.extend(v.get("value").and_then(Value::as_f64).map(SortValue::number)),
            ParamKind::Uri => all.extend(v.as_str().map(|u| SortValue::Text(u.to_string()))),
            ParamKind::Composite => {}
        }
    }
    if key.descending { all.into_iter().max() } else { all.into_iter().min() }
}

/// The local resources a resource's reference parameter points at (`_include`), limited to
/// `target` when given, each once.
pub fn reference_targets(def: &ParamDef, resource: &Value, target: Option<&str>) -> Vec<reference::LocalRef> {
    let mut out: Vec<reference::LocalRef> = Vec::new();
    for v in def.paths.iter().flat_map(|p| values_at(resource, p)) {
        let Some(r) = v.get("reference").and_then(Value::as_str).and_then(reference::parse) else { continue };
        if def.target.is_some_and(|t| t != r.resource_type) || target.is_some_and(|t| t != r.resource_type) || out.contains(&r) {
            continue;
        }
        out.push(r);
    }
    out
}

/// A value results are ordered by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SortValue {
    Time(i64),
    Text(String),
    /// A number as an integer in the same order (IEEE 754 bits, negatives flipped).
    Number(i64),
}

impl SortValue {
    fn number(x: f64) -> SortValue {
        let bits = x.to_bits() as i64;
        SortValue::Number(bits ^ (((bits >> 63) as u64) >> 1) as i64)
    }
}

/// Orders resources by `_sort` keys (stable: ties keep the store's order).
pub fn sort_resources<T>(items: &mut [T], keys: &[SortKey], resource: impl Fn(&T) -> Option<&Value>) {
    if keys.is_empty() {
        return;
    }
    let mut decorated: Vec<(Vec<Option<SortValue>>, usize)> =
        items.iter().enumerate().map(|(i, t)| (keys.iter().map(|k| resource(t).and_then(|r| sort_value(k, r))).collect(), i)).collect();
    decorated.sort_by(|(a, ai), (b, bi)| compare_sort_values(keys, a, b).then(ai.cmp(bi)));
    let order: Vec<usize> = decorated.into_iter().map(|(_, i)| i).collect();
    permute(items, &order);
}

/// Orders items by sort values computed beforehand ([`sort_values_of`]), stably.
pub fn sort_by_values<T>(items: &mut [(Vec<Option<SortValue>>, T)], keys: &[SortKey]) {
    items.sort_by(|(a, _), (b, _)| compare_sort_values(keys, a, b));
}

fn compare_sort_values(keys: &[SortKey], a: &[Option<SortValue>], b: &[Option<SortValue>]) -> std::cmp::Ordering {
    for (k, (x, y)) in keys.iter().zip(a.iter().zip(b.iter())) {
        let o = match (x, y) {
            (Some(x), Some(y)) if k.descending => y.cmp(x),
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    std::cmp::Ordering::Equal
}

/// The sort values of a resource's JSON for `keys`, reading only the top-level elements the keys
/// need (the rest is skipped, never built): ordering a thousand resources costs a scan of each,
/// not a thousand trees. `None` for JSON that is not an object.
pub fn sort_values_of(keys: &[SortKey], json: &[u8]) -> Option<Vec<Option<SortValue>>> {
    let mut wanted: Vec<&str> = vec!["id", "meta"];
    for k in keys {
        if let SortBy::Param(def) = k.by {
            wanted.extend(def.paths.iter().filter_map(|p| top_member(p)));
        }
    }
    let partial = top_level(&wanted, json)?;
    Some(keys.iter().map(|k| sort_value(k, &partial)).collect())
}

/// Whether a resource's JSON meets every condition ([`Condition::matches`] on the whole
/// resource), reading only the top-level elements the conditions look at: checking a page of
/// search results costs a scan of each, not a tree of each. `None` for JSON that is not an object.
pub fn all_match_json(conditions: &[Condition], resource_type: &str, json: &[u8]) -> Option<bool> {
    let mut wanted: Vec<&str> = Vec::new();
    for c in conditions {
        match &c.test {
            Test::Id(_) => wanted.push("id"),
            Test::LastUpdated(_) => wanted.push("meta"),
            // A composite's empty path is the resource itself: its components may look anywhere.
            Test::Indexed { def, .. } | Test::Not { def, .. } if def.paths.iter().any(|p| p.is_empty()) => {
                let whole: Value = serde_json::from_slice(json).ok().filter(Value::is_object)?;
                return Some(conditions.iter().all(|c| c.matches(resource_type, &whole)));
            }
            Test::Indexed { def, .. } | Test::Not { def, .. } => wanted.extend(def.paths.iter().filter_map(|p| top_member(p))),
            Test::Chain { .. } | Test::Has { .. } => {}
        }
    }
    let partial = top_level(&wanted, json)?;
    Some(conditions.iter().all(|c| c.matches(resource_type, &partial)))
}

/// The top-level element a path starts at (`value` for `value[x].code`).
fn top_member(path: &str) -> Option<&str> {
    segments(path).first().map(|s| s.split('[').next().unwrap_or(s))
}

/// The JSON object with only the `wanted` top-level members (or, for a choice stem such as
/// `effective`, the members it starts, `effectiveDateTime`) parsed; `None` if not an object. The
/// scan stops once each wanted name has been met: stored JSON never repeats a name.
fn top_level(wanted: &[&str], json: &[u8]) -> Option<Value> {
    let mut out = serde_json::Map::new();
    let mut met = vec![false; wanted.len()];
    let mut members = crate::members::of(json)?;
    while !met.iter().all(|m| *m) {
        let Some(member) = members.next() else { break };
        let (name, raw) = member?;
        let mut keep = false;
        for (w, m) in wanted.iter().zip(met.iter_mut()) {
            if name == *w || choice_of(w, &name) {
                (keep, *m) = (true, true);
            }
        }
        if keep {
            out.insert(name.into_owned(), serde_json::from_slice(raw).ok()?);
        }
    }
    Some(Value::Object(out))
}

/// Rearranges `items` so that position `n` holds what was at `order[n]`.
fn permute<T>(items: &mut [T], order: &[usize]) {
    let mut placed = vec![false; items.len()];
    for start in 0..items.len() {
        if placed[start] {
            continue;
        }
        let mut at = start;
        loop {
            placed[at] = true;
            let from = order[at];
            if from == start {
                break;
            }
            items.swap(at, from);
            at = from;
        }
    }
}

/// The resource as `shape` asks: the whole of it, or a subset marked `SUBSETTED` in
/// `meta.tag` (R4 search §3.1.1.5.7–8).
pub fn shape_resource(resource: &Value, shape: &Shape) -> Value {
    let Value::Object(map) = resource else { return resource.clone() };
    let keep = |k: &str| -> bool {
        match shape {
            Shape::Full | Shape::Summary => true,
            Shape::Data => k != "text",
            Shape::Text => matches!(k, "resourceType" | "id" | "meta" | "text") || required_top_level(map, k),
            Shape::Elements(names) => matches!(k, "resourceType" | "id" | "meta") || names.iter().any(|n| n == k || (k.starts_with(n.as_str()) && choice_of(n, k))),
        }
    };
    let mut out = match shape {
        Shape::Full => return resource.clone(),
        Shape::Summary => match crate::r4::summary(resource) {
            Value::Object(m) => m,
            _ => return resource.clone(),
        },
        _ => map.iter().filter(|(k, _)| keep(k.trim_start_matches('_'))).map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    let tag = serde_json::json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED", "display": "subsetted"});
    let meta = out.entry("meta").or_insert_with(|| Value::Object(serde_json::Map::new()));
    if let Value::Object(meta) = meta {
        match meta.get_mut("tag") {
            Some(Value::Array(tags)) => tags.push(tag),
            _ => {
                meta.insert("tag".into(), Value::Array(vec![tag]));
            }
        }
    }
    Value::Object(out)
}

/// `valueQuantity` is an element `value` asks for.
fn choice_of(base: &str, key: &str) -> bool {
    key.strip_prefix(base).is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// Whether a top-level element is required for the resource's type (kept by `_summary=text`).
fn required_top_level(map: &serde_json::Map<String, Value>, key: &str) -> bool {
    map.get("resourceType").and_then(Value::as_str).is_some_and(|t| crate::r4::is_required(t, key))
}

fn parse_date_alt(v: &str) -> Result<(Prefix, Interval), FhirError> {
    let (prefix, rest) = Prefix::split(v)?;
    Ok((prefix, date::parse(rest)?))
}

fn parse_alternative(def: &ParamDef, modifier: Option<&str>, v: &str, raw: &str) -> Result<Alternative, FhirError> {
    match (def.kind, modifier) {
        (ParamKind::String, None) => Ok(Alternative::String { value: v.to_string(), exact: false }),
        (ParamKind::String, Some("exact")) => Ok(Alternative::String { value: v.to_string(), exact: true }),
        (ParamKind::Token, None) => Ok(Alternative::Token(token_query_key(v))),
        (ParamKind::Reference, None) => reference_query_keys(def, v).map(Alternative::Reference),
        (ParamKind::Reference, Some(t)) if crate::r4::is_resource_type(t) => {
            reference_query_keys(def, &format!("{t}/{v}")).map(Alternative::Reference)
        }
        (ParamKind::Date, None) => {
            let (prefix, interval) = parse_date_alt(v)?;
            Ok(Alternative::Date(prefix, interval))
        }
        (ParamKind::Number, None) => {
            let (prefix, rest) = Prefix::split(v)?;
            Ok(Alternative::Number(prefix, crate::number::parse(rest)?))
        }
        (ParamKind::Quantity, None) => {
            let (prefix, rest) = Prefix::split(v)?;
            Ok(Alternative::Quantity(prefix, crate::number::parse_quantity(rest)?))
        }
        (ParamKind::Uri, None) => Ok(Alternative::Uri { value: v.to_string(), relation: UriRelation::Exact }),
        (ParamKind::Uri, Some("below")) => Ok(Alternative::Uri { value: v.to_string(), relation: UriRelation::Below }),
        (ParamKind::Uri, Some("above")) => Ok(Alternative::Uri { value: v.to_string(), relation: UriRelation::Above }),
        (ParamKind::Composite, None) => {
            let parts: Vec<&str> = v.split('$').collect();
            if parts.len() != def.components.len() {
                return Err(FhirError::invalid(format!("'{raw}' is a composite of {} parts separated by '$'", def.components.len())));
            }
            let parts = def.components.iter().zip(parts).map(|(c, part)| parse_alternative(c, None, part, raw)).collect::<Result<_, _>>()?;
            Ok(Alternative::Composite(parts))
        }
        // A composite's elements are present whenever the resource is: `:missing` on one would
        // always say "present".
        (ParamKind::Composite, Some("missing")) => Err(FhirError::not_supported(format!("':missing' does not apply to a composite parameter: '{raw}'"))),
        (_, Some("missing")) => match v {
            "true" => Ok(Alternative::Missing(true)),
            "false" => Ok(Alternative::Missing(false)),
            _ => Err(FhirError::invalid(format!("'{raw}' takes true or false"))),
        },
        (ParamKind::String, Some("contains")) => Ok(Alternative::Contains(v.to_string())),
        (ParamKind::Token, Some("text")) => Ok(Alternative::Text(v.to_string())),
        (ParamKind::Reference, Some("identifier")) => Ok(Alternative::Identifier(token_query_key(v))),
        (ParamKind::Token, Some("of-type")) => match v.splitn(3, '|').collect::<Vec<_>>()[..] {
            [system, code, value] if !code.is_empty() && !value.is_empty() => {
                Ok(Alternative::OfType { system: system.to_string(), code: code.to_string(), value: value.to_string() })
            }
            _ => Err(FhirError::invalid(format!("'{raw}' takes system|code|value"))),
        },
        (_, Some(m @ ("above" | "below" | "in" | "not-in"))) => {
            Err(FhirError::not_supported(format!("':{m}' needs a terminology server, which Valv does not have: '{raw}'")))
        }
        (_, Some(m)) => Err(FhirError::not_supported(format!("modifier ':{m}' is not supported on '{raw}'"))),
    }
}

fn token_query_key(v: &str) -> String {
    match v.split_once('|') {
        None => format!("v:{v}"),
        Some(("", code)) => format!("n:{code}"),
        Some((system, "")) => format!("s:{system}|"),
        Some((system, code)) => format!("s:{system}|{code}"),
    }
}

fn reference_query_keys(def: &ParamDef, v: &str) -> Result<Vec<String>, FhirError> {
    if let Some(r) = reference::parse(v) {
        return Ok(vec![format!("r:{}", r.key())]);
    }
    if crate::id::is_valid_id(v) {
        return Ok(vec![match def.target {
            Some(t) => format!("r:{t}/{v}"),
            None => format!("i:{v}"),
        }]);
    }
    Err(FhirError::invalid(format!("'{v}' is not a valid reference for search parameter '{}'", def.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    proptest::proptest! {
        /// A reference has a key without building its keys exactly when building them finds it.
        #[test]
        fn reference_has_key_is_reference_keys_contains(
            reference in proptest::sample::select(vec!["Patient/p1", "Patient/p1/_history/2", "Group/p1", "Patient/p10", "Patient/p", "#p1", "https://x/Patient/p1", "Patient", "Patient/"]),
            target in proptest::sample::select(vec![None, Some("Patient"), Some("Group")]),
            ks in proptest::collection::vec(proptest::sample::select(vec!["r:Patient/p1", "i:p1", "r:Group/p1", "r:Patient/p", "i:p10", "r:Patient/p1/", "p1", "r:Patientp1", "i:"]), 0..4),
        ) {
            let ks: Vec<String> = ks.into_iter().map(String::from).collect();
            let v = json!({"reference": reference});
            let mut built = Vec::new();
            reference_keys(&v, target, &mut built);
            proptest::prop_assert_eq!(reference_has_key(&v, target, &ks), built.iter().any(|k| ks.contains(k)), "{} {:?} {:?}", reference, target, ks);
        }
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn hit(t: &str, r: &Value, q: &[(&str, &str)]) -> bool {
        let req = parse_request(t, &pairs(q)).expect("parses");
        let keys: Vec<String> = index_keys(t, r).into_iter().map(|k| format!("{}={}", k.param, k.key)).collect();
        req.conditions.iter().all(|c| {
            let by_keys = match c.candidate_keys() {
                Some(ks) => ks.iter().any(|k| keys.contains(&format!("{}={k}", c.param))),
                None => true,
            };
            let precise = c.matches(t, r);
            // The index never loses a true match.
            assert!(!precise || by_keys, "{c:?} matched precisely but not by keys");
            precise
        })
    }

    fn patient() -> Value {
        json!({"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2024-01-02T03:04:05.000Z"},
            "identifier":[{"system":"urn:mrn","value":"MRN-1"}],
            "name":[{"family":"Öberg","given":["Anna","Maria"]}],
            "birthDate":"1980-04-12","gender":"female","active":true,
            "address":[{"city":"Göteborg","line":["Storgatan 1"]}]})
    }

    #[test]
    fn modifiers_decided_after_decryption() {
        let mut p = patient();
        p["identifier"][0]["type"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]});
        p["generalPractitioner"] = json!([{"reference": "Practitioner/d1", "identifier": {"system": "urn:hsa", "value": "SE123"}}]);
        for (q, want) in [
            (("family:contains", "BER"), true),
            (("address:contains", "teborg"), true),
            (("family:contains", "xyz"), false),
            (("gender:not", "male"), true),
            (("gender:not", "male,female"), false),
            (("birthdate:missing", "false"), true),
            (("birthdate:missing", "true"), false),
            (("organization:missing", "true"), true),
            (("general-practitioner:identifier", "urn:hsa|SE123"), true),
            (("general-practitioner:identifier", "urn:hsa|SE999"), false),
            (("identifier:of-type", "http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-1"), true),
            (("identifier:of-type", "http://terminology.hl7.org/CodeSystem/v2-0203|MR|MRN-2"), false),
        ] {
            assert_eq!(hit("Patient", &p, &[q]), want, "{q:?}");
        }
        let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": "Blood pressure panel", "coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel with all children optional"}]}});
        assert!(hit("Observation", &o, &[("code:text", "blood pres")]));
        assert!(!hit("Observation", &o, &[("code:text", "pressure")]), "text matches from the start");
        for bad in [("code:above", "x"), ("status:not", ""), ("birthdate:missing", "maybe"), ("family:not", "x"), ("identifier:of-type", "a|b")] {
            assert!(parse_request("Patient", &pairs(&[bad])).is_err() || parse_request("Observation", &pairs(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn patient_params() {
        let p = patient();
        assert!(hit("Patient", &p, &[("family", "oberg")]));
        assert!(hit("Patient", &p, &[("family", "Öb")]));
        assert!(!hit("Patient", &p, &[("family", "berg")]));
        assert!(hit("Patient", &p, &[("family:exact", "Öberg")]));
        assert!(!hit("Patient", &p, &[("family:exact", "oberg")]));
        assert!(hit("Patient", &p, &[("given", "mar")]));
        assert!(hit("Patient", &p, &[("name", "anna")]));
        assert!(hit("Patient", &p, &[("identifier", "urn:mrn|MRN-1")]));
        assert!(hit("Patient", &p, &[("identifier", "MRN-1")]));
        assert!(!hit("Patient", &p, &[("identifier", "urn:other|MRN-1")]));
        assert!(hit("Patient", &p, &[("birthdate", "1980")]));
        assert!(hit("Patient", &p, &[("birthdate", "ge1980-04-12"), ("birthdate", "lt1980-04-13")]));
        assert!(!hit("Patient", &p, &[("birthdate", "gt1980-04-12")]));
        assert!(hit("Patient", &p, &[("gender", "female,male")]));
        assert!(hit("Patient", &p, &[("active", "true")]));
        assert!(hit("Patient", &p, &[("address", "goteborg")]));
        assert!(hit("Patient", &p, &[("_id", "p1")]));
        assert!(hit("Patient", &p, &[("_lastUpdated", "ge2024-01-01")]));
        assert!(!hit("Patient", &p, &[("_lastUpdated", "lt2024-01-01")]));
    }

    #[test]
    fn observation_params() {
        let o = json!({"resourceType":"Observation","status":"final",
            "subject":{"reference":"Patient/p1"},"encounter":{"reference":"Encounter/e1"},
            "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
            "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
            "effectiveDateTime":"2020-06-01T10:00:00+02:00"});
        assert!(hit("Observation", &o, &[("patient", "p1")]));
        assert!(hit("Observation", &o, &[("patient", "Patient/p1")]));
        assert!(hit("Observation", &o, &[("subject", "Patient/p1")]));
        assert!(hit("Observation", &o, &[("subject:Patient", "p1")]));
        assert!(!hit("Observation", &o, &[("patient", "p2")]));
        assert!(hit("Observation", &o, &[("code", "http://loinc.org|8867-4")]));
        assert!(hit("Observation", &o, &[("code", "http://loinc.org|")]));
        assert!(!hit("Observation", &o, &[("code", "|8867-4")]));
        assert!(hit("Observation", &o, &[("category", "vital-signs")]));
        assert!(hit("Observation", &o, &[("status", "final")]));
        assert!(hit("Observation", &o, &[("date", "2020-06")]));
        assert!(hit("Observation", &o, &[("date", "gt2020-05-31")]));
        assert!(!hit("Observation", &o, &[("date", "lt2020-06-01")]));
        assert!(hit("Observation", &o, &[("date", "le2020-06-01")]));
        assert!(hit("Observation", &o, &[("encounter", "Encounter/e1")]));
    }

    #[test]
    fn period_dates() {
        let e = json!({"resourceType":"Encounter","period":{"start":"2020-01-01T08:00:00Z","end":"2020-01-03T08:00:00Z"}});
        assert!(!hit("Encounter", &e, &[("date", "2020-01-02")]), "eq needs containment");
        assert!(hit("Encounter", &e, &[("date", "2020-01")]));
        assert!(hit("Encounter", &e, &[("date", "ge2020-01-02")]));
        let open = json!({"resourceType":"Encounter","period":{"start":"2020-01-01T08:00:00Z"}});
        assert!(hit("Encounter", &open, &[("date", "gt2100")]));
    }

    #[test]
    fn bad_requests() {
        for q in [
            vec![("nonsense", "1")],
            vec![("family:contains", "x")],
            vec![("birthdate", "1980-99")],
            vec![("_count", "-1")],
            vec![("_sort", "family")],
            vec![("family", "")],
            vec![("patient", "a b")],
            vec![("birthdate", "sa1980")],
        ] {
            assert!(parse_request("Patient", &pairs(&q)).is_err() || parse_request("Observation", &pairs(&q)).is_err(), "{q:?}");
        }
    }

    #[test]
    fn string_keys_are_fixed_in_number() {
        let a = index_keys("Organization", &json!({"name":"A"}));
        let b = index_keys("Organization", &json!({"name":"A much longer organisation name"}));
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len(), PREFIX_SLOTS + 1);
    }
}
