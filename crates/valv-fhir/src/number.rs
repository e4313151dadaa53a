//! Number and quantity search values (R4 search §3.1.1.4.2 and §3.1.1.4.8). A search number
//! stands for the range its precision implies — `100` is [99.5, 100.5), `1.50` is
//! [1.495, 1.505), `1e2` is [50, 150) — and `eq`/`ne` test a resource's value against that
//! range; the other prefixes compare with the number itself. Decided after decryption only:
//! numbers and quantities have no index keys.

use crate::date::Prefix;
use crate::FhirError;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct SearchNumber {
    pub value: f64,
    /// Half a unit in the last significant place.
    pub half_unit: f64,
}

/// `[prefix]number|system|code`, `[prefix]number||code` or `[prefix]number`.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuantity {
    pub number: SearchNumber,
    pub system: Option<String>,
    pub code: Option<String>,
}

/// A FHIR decimal's text (`-12.50`, `1e-3`) as a search number.
pub fn parse(text: &str) -> Result<SearchNumber, FhirError> {
    let bad = || FhirError::invalid(format!("'{text}' is not a number"));
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().map_err(|_| bad())?),
        None => (text, 0),
    };
    let digits = mantissa.strip_prefix('-').unwrap_or(mantissa);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) || (digits.contains('.') && fraction.is_empty()) {
        return Err(bad());
    }
    let value: f64 = text.parse().map_err(|_| bad())?;
    // Beyond what a double holds (1e±308), a search number means nothing: refused, not wrapped.
    let places = i32::try_from(fraction.len()).ok().and_then(|f| f.checked_sub(exponent)).filter(|p| p.abs() <= 330).ok_or_else(bad)?;
    let half_unit = 0.5 * 10f64.powi(-places);
    if !value.is_finite() || !half_unit.is_finite() || half_unit == 0.0 {
        return Err(bad());
    }
    Ok(SearchNumber { value, half_unit })
}

pub fn parse_quantity(text: &str) -> Result<SearchQuantity, FhirError> {
    let mut parts = text.splitn(3, '|');
    let number = parse(parts.next().unwrap_or(""))?;
    let (system, code) = match (parts.next(), parts.next()) {
        (None, _) => (None, None),
        (Some(s), Some(c)) if !c.is_empty() => ((!s.is_empty()).then(|| s.to_string()), Some(c.to_string())),
        _ => return Err(FhirError::invalid(format!("'{text}' is not a quantity: number, number|system|code or number||code"))),
    };
    Ok(SearchQuantity { number, system, code })
}

/// Does a resource's value `x` match `prefix` applied to the search number?
pub fn matches(prefix: Prefix, search: &SearchNumber, x: f64) -> bool {
    let (v, h) = (search.value, search.half_unit);
    let eq = v - h <= x && x < v + h;
    match prefix {
        Prefix::Eq => eq,
        Prefix::Ne => !eq,
        Prefix::Gt | Prefix::Sa => x > v,
        Prefix::Lt | Prefix::Eb => x < v,
        Prefix::Ge => x >= v,
        Prefix::Le => x <= v,
        Prefix::Ap => eq || (x - v).abs() <= 0.1 * v.abs(),
    }
}

/// Does a Quantity (or a bare number) match? With a system, the system and code must both be the
/// Quantity's; with a code alone, its code or its unit.
pub fn quantity_matches(prefix: Prefix, search: &SearchQuantity, value: &Value) -> bool {
    let (x, system, code, unit) = match value {
        Value::Number(n) => (n.as_f64(), None, None, None),
        Value::Object(q) => (
            q.get("value").and_then(Value::as_f64),
            q.get("system").and_then(Value::as_str),
            q.get("code").and_then(Value::as_str),
            q.get("unit").and_then(Value::as_str),
        ),
        _ => return false,
    };
    let Some(x) = x else { return false };
    let unit_ok = match (&search.system, &search.code) {
        (Some(s), Some(c)) => system == Some(s.as_str()) && code == Some(c.as_str()),
        (None, Some(c)) => code == Some(c.as_str()) || unit == Some(c.as_str()),
        _ => true,
    };
    unit_ok && matches(prefix, &search.number, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn precision_makes_the_range() {
        let n = parse("100").expect("number");
        assert!(matches(Prefix::Eq, &n, 99.5) && matches(Prefix::Eq, &n, 100.4) && !matches(Prefix::Eq, &n, 100.5));
        let n = parse("1.50").expect("number");
        assert!(matches(Prefix::Eq, &n, 1.5) && matches(Prefix::Eq, &n, 1.504) && !matches(Prefix::Eq, &n, 1.51));
        let n = parse("1e2").expect("number");
        assert!(matches(Prefix::Eq, &n, 140.0) && !matches(Prefix::Eq, &n, 150.0));
        assert!(matches(Prefix::Gt, &parse("5").expect("n"), 5.1) && !matches(Prefix::Gt, &parse("5").expect("n"), 5.0));
        assert!(matches(Prefix::Ap, &parse("100").expect("n"), 109.0) && !matches(Prefix::Ap, &parse("100").expect("n"), 111.0));
        for bad in ["", "x", "1.", ".5", "1e", "--1", "1,5", "1e-2147483648", "0.00e-2147483647", "1e400", "1e-400"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities_match_on_unit_and_value() {
        let q = json!({"value": 6.3, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"});
        let m = |s: &str| quantity_matches(Prefix::split(s).expect("prefix").0, &parse_quantity(Prefix::split(s).expect("prefix").1).expect("q"), &q);
        assert!(m("6.3|http://unitsofmeasure.org|mmol/L") && m("gt6|http://unitsofmeasure.org|mmol/L") && m("6.3||mmol/L") && m("6.3"));
        assert!(!m("6.3|http://loinc.org|mmol/L") && !m("6.3||mg") && !m("lt6"));
        assert!(parse_quantity("5|only-system").is_err());
    }
}
