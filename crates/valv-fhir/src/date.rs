//! FHIR `date`, `dateTime` and `instant` values as half-open UTC intervals of seconds, and the
//! calendar bucket tokens that let date ranges be searched through a blind index.
//!
//! A value is its whole precision: `1980` is all of 1980, `1980-04-12` one day. Buckets form a
//! laminar family (millennium ⊃ century ⊃ decade ⊃ year ⊃ month ⊃ day). A target is indexed by the
//! buckets covering it (`c:`) and their strict ancestors (`a:`); a query interval asks for the
//! buckets covering it as `c:` or `a:` and their strict ancestors as `c:`. Two intervals share a
//! token exactly when their day-aligned spans intersect, so the store finds candidates without
//! learning dates, and the caller filters the decrypted candidates precisely.

use crate::FhirError;

const DAY: i64 = 86_400;
/// 0001-01-01 and 10000-01-01 as days since 1970-01-01.
const MIN_DAY: i64 = -719_162;
const MAX_DAY: i64 = 2_932_897;

/// A half-open interval `[start, end)` in seconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start: i64,
    pub end: i64,
}

impl Interval {
    pub fn intersects(&self, other: &Interval) -> bool {
        self.start < other.end && other.start < self.end
    }
    pub fn contains(&self, other: &Interval) -> bool {
        self.start <= other.start && other.end <= self.end
    }
    pub const ALL: Interval = Interval { start: MIN_DAY * DAY, end: MAX_DAY * DAY };
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The calendar date of a day number (inverse of [`days_from_civil`]).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Formats seconds since the epoch as an R4 `instant` with millisecond precision.
pub fn format_instant(millis: i64) -> String {
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(DAY));
    let sod = secs.rem_euclid(DAY);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

fn digits(s: &str, n: usize) -> Option<i64> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

/// Parses a FHIR date, dateTime or instant (or a search value of those forms, where seconds and
/// the zone may be left out; a missing zone means UTC) into the interval it denotes.
pub fn parse(value: &str) -> Result<Interval, FhirError> {
    let bad = || FhirError::invalid(format!("'{value}' is not a valid FHIR date, dateTime or instant"));
    let (date_part, time_part) = match value.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (value, None),
    };
    let mut parts = date_part.split('-');
    let year = parts.next().and_then(|y| digits(y, 4)).ok_or_else(bad)?;
    let month = parts.next().map(|m| digits(m, 2).ok_or_else(bad)).transpose()?;
    let day = parts.next().map(|d| digits(d, 2).ok_or_else(bad)).transpose()?;
    if parts.next().is_some() || year < 1 {
        return Err(bad());
    }
    let month = month.map(|m| u32::try_from(m).map_err(|_| bad())).transpose()?;
    if let Some(m) = month {
        if !(1..=12).contains(&m) {
            return Err(bad());
        }
    }
    let day = day.map(|d| u32::try_from(d).map_err(|_| bad())).transpose()?;
    if let (Some(m), Some(d)) = (month, day) {
        if d < 1 || d > days_in_month(year, m) {
            return Err(bad());
        }
    }
    match (month, day, time_part) {
        (None, None, None) => Ok(Interval {
            start: days_from_civil(year, 1, 1) * DAY,
            end: days_from_civil(year + 1, 1, 1) * DAY,
        }),
        (Some(m), None, None) => {
            let (ny, nm) = if m == 12 { (year + 1, 1) } else { (year, m + 1) };
            Ok(Interval { start: days_from_civil(year, m, 1) * DAY, end: days_from_civil(ny, nm, 1) * DAY })
        }
        (Some(m), Some(d), None) => {
            let start = days_from_civil(year, m, d) * DAY;
            Ok(Interval { start, end: start + DAY })
        }
        (Some(m), Some(d), Some(t)) => {
            let day_start = days_from_civil(year, m, d) * DAY;
            let (secs, precision) = parse_time_of_day(t).ok_or_else(bad)?;
            let start = day_start + secs;
            // A zone offset can push the first or last day of the calendar outside years 1-9999,
            // where nothing can be indexed or formatted.
            if start < Interval::ALL.start || start + precision > Interval::ALL.end {
                return Err(FhirError::invalid(format!("'{value}' lies outside years 0001-9999 in UTC")));
            }
            Ok(Interval { start, end: start + precision })
        }
        _ => Err(bad()),
    }
}

/// `hh:mm[:ss[.fff]][Z|±hh:mm]` -> (seconds from midnight UTC, width of the value in seconds).
fn parse_time_of_day(t: &str) -> Option<(i64, i64)> {
    let (clock, offset) = if let Some(c) = t.strip_suffix('Z') {
        (c, 0)
    } else if let Some(pos) = t.rfind(['+', '-']) {
        let (c, z) = t.split_at(pos);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (h, m) = z[1..].split_once(':')?;
        let (h, m) = (digits(h, 2)?, digits(m, 2)?);
        if h > 14 || m > 59 {
            return None;
        }
        (c, sign * (h * 3600 + m * 60))
    } else {
        (t, 0)
    };
    let mut fields = clock.split(':');
    let h = digits(fields.next()?, 2)?;
    let m = digits(fields.next()?, 2)?;
    let (s, width) = match fields.next() {
        Some(sec) => {
            let whole = sec.split('.').next()?;
            if let Some(frac) = sec.split_once('.').map(|(_, f)| f) {
                if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
            }
            (digits(whole, 2)?, 1)
        }
        None => (0, 60),
    };
    if fields.next().is_some() || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some((h * 3600 + m * 60 + s.min(59) - offset, width))
}

/// Search prefixes for ordered values (R4 search §3.1.1.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    /// Starts after the search value's range ends.
    Sa,
    /// Ends before the search value's range starts.
    Eb,
    /// Approximately: within 10% of the search value (for dates: its range widened by a tenth of
    /// its width, and at least a day, on each side — Valv has no "now" to take 10% of the gap to).
    Ap,
}

impl Prefix {
    /// Splits a leading prefix off a search value (`ge2020` -> (Ge, "2020")).
    pub fn split(value: &str) -> Result<(Prefix, &str), FhirError> {
        // `get` rather than slicing: the first two bytes need not end on a character boundary.
        let (Some(p), Some(rest)) = (value.get(..2), value.get(2..)) else {
            return Ok((Prefix::Eq, value));
        };
        let prefix = match p {
            "eq" => Prefix::Eq,
            "ne" => Prefix::Ne,
            "gt" => Prefix::Gt,
            "lt" => Prefix::Lt,
            "ge" => Prefix::Ge,
            "le" => Prefix::Le,
            "sa" => Prefix::Sa,
            "eb" => Prefix::Eb,
            "ap" => Prefix::Ap,
            _ => return Ok((Prefix::Eq, value)),
        };
        Ok((prefix, rest))
    }

    /// Does a target value match `self` applied to the search value?
    pub fn matches(self, search: &Interval, target: &Interval) -> bool {
        let eq = search.contains(target);
        let gt = target.end > search.end;
        let lt = target.start < search.start;
        match self {
            Prefix::Eq => eq,
            Prefix::Ne => !eq,
            Prefix::Gt => gt,
            Prefix::Lt => lt,
            Prefix::Ge => gt || eq,
            Prefix::Le => lt || eq,
            Prefix::Sa => target.start >= search.end,
            Prefix::Eb => target.end <= search.start,
            Prefix::Ap => {
                let near = approximately(search);
                target.start < near.end && near.start < target.end
            }
        }
    }

    /// The interval any matching target must intersect (for candidate selection), or `None` when
    /// any value may match (`ne`).
    pub fn candidate_interval(self, search: &Interval) -> Option<Interval> {
        let all = Interval::ALL;
        match self {
            Prefix::Eq => Some(*search),
            Prefix::Ne => None,
            Prefix::Gt => Some(Interval { start: search.end, end: all.end }),
            Prefix::Ge => Some(Interval { start: search.start, end: all.end }),
            Prefix::Lt => Some(Interval { start: all.start, end: search.start }),
            Prefix::Le => Some(Interval { start: all.start, end: search.end }),
            Prefix::Sa => Some(Interval { start: search.end, end: all.end }),
            Prefix::Eb => Some(Interval { start: all.start, end: search.start }),
            Prefix::Ap => Some(approximately(search)),
        }
    }
}

/// A date search value's range for `ap`: widened by a tenth of its width, at least a day, each side.
fn approximately(search: &Interval) -> Interval {
    let pad = ((search.end.saturating_sub(search.start)) / 10).max(86_400);
    Interval { start: search.start.saturating_sub(pad).max(Interval::ALL.start), end: search.end.saturating_add(pad).min(Interval::ALL.end) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Millennium,
    Century,
    Decade,
    Year,
    Month,
    Day,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    level: Level,
    /// Year-based number for the first four levels, months since year 0 for months, the day
    /// number for days.
    n: i64,
}

impl Bucket {
    fn label(&self) -> String {
        let l = match self.level {
            Level::Millennium => 'K',
            Level::Century => 'C',
            Level::Decade => 'X',
            Level::Year => 'Y',
            Level::Month => 'M',
            Level::Day => 'D',
        };
        format!("{l}{}", self.n)
    }

    fn parent(&self) -> Option<Bucket> {
        let (level, n) = match self.level {
            Level::Millennium => return None,
            Level::Century => (Level::Millennium, self.n.div_euclid(10)),
            Level::Decade => (Level::Century, self.n.div_euclid(10)),
            Level::Year => (Level::Decade, self.n.div_euclid(10)),
            Level::Month => (Level::Year, self.n.div_euclid(12)),
            Level::Day => {
                let (y, m, _) = civil_from_days(self.n);
                (Level::Month, y * 12 + i64::from(m) - 1)
            }
        };
        Some(Bucket { level, n })
    }
}

/// The largest bucket starting at `day` that ends no later than `end`, and its end.
fn largest_bucket_at(day: i64, end: i64) -> (Bucket, i64) {
    let (y, m, d) = civil_from_days(day);
    let year_start = |yy: i64| days_from_civil(yy, 1, 1);
    if m == 1 && d == 1 {
        for (level, span) in [(Level::Millennium, 1000), (Level::Century, 100), (Level::Decade, 10), (Level::Year, 1)] {
            if y.rem_euclid(span) == 0 && year_start(y + span) <= end {
                return (Bucket { level, n: y.div_euclid(span) }, year_start(y + span));
            }
        }
    }
    if d == 1 {
        let next = if m == 12 { days_from_civil(y + 1, 1, 1) } else { days_from_civil(y, m + 1, 1) };
        if next <= end {
            return (Bucket { level: Level::Month, n: y * 12 + i64::from(m) - 1 }, next);
        }
    }
    (Bucket { level: Level::Day, n: day }, day + 1)
}

/// The greedy cover of an interval by buckets, after widening it to whole days and clamping it
/// to years 1..=9999.
fn cover(interval: &Interval) -> Vec<Bucket> {
    let mut day = interval.start.div_euclid(DAY).max(MIN_DAY);
    let end = (interval.end + DAY - 1).div_euclid(DAY).min(MAX_DAY);
    let mut out = Vec::new();
    while day < end {
        let (bucket, next) = largest_bucket_at(day, end);
        out.push(bucket);
        day = next;
    }
    out
}

fn push_unique(out: &mut Vec<String>, s: String) {
    if !out.contains(&s) {
        out.push(s);
    }
}

/// The index keys of a stored value.
pub fn index_keys(target: &Interval) -> Vec<String> {
    let mut out = Vec::new();
    for b in cover(target) {
        push_unique(&mut out, format!("c:{}", b.label()));
        let mut p = b.parent();
        while let Some(a) = p {
            push_unique(&mut out, format!("a:{}", a.label()));
            p = a.parent();
        }
    }
    out
}

/// The keys any value intersecting `query` carries at least one of.
pub fn query_keys(query: &Interval) -> Vec<String> {
    let mut out = Vec::new();
    for b in cover(query) {
        push_unique(&mut out, format!("c:{}", b.label()));
        push_unique(&mut out, format!("a:{}", b.label()));
        let mut p = b.parent();
        while let Some(a) = p {
            push_unique(&mut out, format!("c:{}", a.label()));
            p = a.parent();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn civil_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1, 1, 1), MIN_DAY);
        assert_eq!(days_from_civil(10000, 1, 1), MAX_DAY);
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn precision_intervals() {
        let y = parse("1980").expect("year");
        let d = parse("1980-04-12").expect("day");
        let t = parse("1980-04-12T10:00:00+02:00").expect("time");
        assert!(y.contains(&d) && d.contains(&t));
        assert_eq!(t.start, days_from_civil(1980, 4, 12) * DAY + 8 * 3600);
        for bad in ["1980-13", "1980-02-30", "80", "1980-04-12T25:00:00Z", "1980-04-12T10:00:00+2", "abcd", ""] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn format_instant_known() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_instant(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }

    #[test]
    fn prefixes() {
        let s = parse("2020").expect("2020");
        let inside = parse("2020-05-05").expect("d");
        let after = parse("2021-01-01").expect("d");
        assert!(Prefix::Eq.matches(&s, &inside));
        assert!(!Prefix::Eq.matches(&s, &after));
        assert!(Prefix::Gt.matches(&s, &after));
        assert!(Prefix::Ge.matches(&s, &inside));
        assert!(!Prefix::Lt.matches(&s, &inside));
        assert_eq!(Prefix::split("le2020").expect("le"), (Prefix::Le, "2020"));
        assert_eq!(Prefix::split("2020").expect("plain"), (Prefix::Eq, "2020"));
        // Found by the search_params fuzz target: a multi-byte character across byte 2.
        assert_eq!(Prefix::split("a€").expect("no panic"), (Prefix::Eq, "a€"));
        assert!(parse("a€").is_err());
        assert!(parse("9999-12-31T23:59-14:00").is_err(), "past year 9999 in UTC");
        assert!(parse("0001-01-01T00:00+14:00").is_err(), "before year 1 in UTC");
    }

    fn day_interval() -> impl Strategy<Value = Interval> {
        (1800i64..2200, 1u32..=12, 1u32..=28, 0i64..4000).prop_map(|(y, m, d, len)| {
            let start = days_from_civil(y, m, d) * DAY;
            Interval { start, end: start + (len + 1) * DAY }
        })
    }

    proptest! {
        // The bucket tokens of two intervals meet exactly when the intervals do.
        #[test]
        fn tokens_meet_iff_intervals_meet(t in day_interval(), q in day_interval()) {
            let ti = index_keys(&t);
            let qk = query_keys(&q);
            let shared = qk.iter().any(|k| ti.contains(k));
            prop_assert_eq!(shared, t.intersects(&q));
        }

        #[test]
        fn instant_parses_back(ms in -30_000_000_000_000i64..200_000_000_000_000) {
            let s = format_instant(ms);
            let i = parse(&s).expect("own output parses");
            prop_assert_eq!(i.start, ms.div_euclid(1000));
        }
    }
}
