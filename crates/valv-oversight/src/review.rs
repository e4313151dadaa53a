//! A systematic log review: which accesses are looked at, and what the auditor found.
//!
//! The sample is drawn from the accesses in scope (a unit's patient accesses in a period,
//! oldest first) by a partial Fisher–Yates shuffle driven by SplitMix64 from the recorded seed:
//! the same log, scope and seed draw the same sample, so anyone can check that the sample was
//! not chosen by hand. Every access an alert flagged is added to it whether drawn or not.

use crate::{note, Error};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The outcomes an auditor records for an item.
pub const VERDICTS: &[&str] = &["justified", "not-justified", "needs-follow-up"];

/// Most items drawn at random in one review (flagged accesses come on top).
pub const MAX_SIZE: usize = 10_000;
/// Longest period one review covers (a quarter): bounds the log read for it.
pub const MAX_PERIOD_MS: i64 = 92 * 86_400_000;
/// Most accesses in scope held while drawing; a larger population needs a shorter period.
pub const MAX_POPULATION: usize = 2_000_000;

/// One patient access in scope: the audit entry it is, and ids only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Access {
    /// Leaf index of the audit entry.
    pub index: u64,
    pub time: i64,
    pub agent: String,
    pub patient: String,
    pub interaction: String,
}

/// What the auditor found about one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Outcome {
    pub verdict: String,
    pub note: String,
    pub by: String,
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Item {
    #[serde(flatten)]
    pub access: Access,
    /// Drawn at random (false: in the review only because an alert flagged it).
    pub drawn: bool,
    /// The alerts that flagged it.
    #[serde(default)]
    pub alerts: Vec<String>,
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// The scope a review was drawn from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scope {
    pub unit: String,
    /// Period `[from, to)`, ms since the epoch.
    pub from: i64,
    pub to: i64,
    /// Items drawn at random.
    pub size: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Finished {
    pub by: String,
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Review {
    pub id: String,
    pub scope: Scope,
    /// Accesses in scope: what the sample was drawn from.
    pub population: u64,
    pub created_by: String,
    pub created_at: i64,
    pub items: Vec<Item>,
    #[serde(default)]
    pub finished: Option<Finished>,
}

/// How many items have each verdict, and how many wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub justified: usize,
    pub not_justified: usize,
    pub follow_up: usize,
    pub open: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} justified, {} not justified, {} need follow-up, {} open", self.justified, self.not_justified, self.follow_up, self.open)
    }
}

/// Checks a scope before anything is read.
pub fn check_scope(scope: &Scope) -> Result<(), Error> {
    if scope.unit.is_empty() || scope.unit.len() > 128 || !scope.unit.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return Err(Error::Invalid("a unit is an Organization id (letters, digits, '-', '.', '_')".into()));
    }
    if scope.from >= scope.to {
        return Err(Error::Invalid("the period must end after it starts".into()));
    }
    if scope.to - scope.from > MAX_PERIOD_MS {
        return Err(Error::Invalid("a review covers at most 92 days; draw one per period".into()));
    }
    if scope.size == 0 || scope.size > MAX_SIZE {
        return Err(Error::Invalid(format!("the sample size must be 1 to {MAX_SIZE}")));
    }
    Ok(())
}

/// Draws a review: `size` accesses of `population` (in scope, oldest first) chosen by `seed`,
/// plus every access in it that `flagged` names (leaf index → alert ids), by index.
pub fn draw(id: String, scope: Scope, population: &[Access], flagged: &BTreeMap<u64, Vec<String>>, created_by: String, created_at: i64) -> Result<Review, Error> {
    check_scope(&scope)?;
    let drawn = sample(population.len(), scope.size, scope.seed);
    let mut items: Vec<Item> = population
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let alerts = flagged.get(&a.index).cloned().unwrap_or_default();
            let is_drawn = drawn.binary_search(&i).is_ok();
            (is_drawn || !alerts.is_empty()).then(|| Item { access: a.clone(), drawn: is_drawn, alerts, outcome: None })
        })
        .collect();
    items.sort_by_key(|i| i.access.index);
    Ok(Review { id, scope, population: population.len() as u64, created_by, created_at, items, finished: None })
}

/// Positions `0..n` chosen: `k` of them (all when `k >= n`), sorted.
pub fn sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mut picks: Vec<usize> = (0..n).collect();
    let k = k.min(n);
    for i in 0..k {
        let j = i + (rng.next() % (n - i) as u64) as usize;
        picks.swap(i, j);
    }
    picks.truncate(k);
    picks.sort_unstable();
    picks
}

/// SplitMix64: tiny, fully specified, so another implementation can redraw the same sample.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Review {
    /// Records (or corrects, until the review is finished) the outcome of the item that is
    /// audit entry `index`. A verdict other than `justified` needs a note saying why.
    pub fn record(&mut self, index: u64, verdict: &str, text: &str, by: &str, at: i64) -> Result<(), Error> {
        if self.finished.is_some() {
            return Err(Error::State(format!("review {} is finished; its outcomes are final", self.id)));
        }
        if !VERDICTS.contains(&verdict) {
            return Err(Error::Invalid(format!("'{verdict}' is not an outcome ({})", VERDICTS.join(", "))));
        }
        let note = if verdict == "justified" && text.trim().is_empty() { String::new() } else { note(text, &format!("the outcome '{verdict}'"))? };
        let item = self.items.iter_mut().find(|i| i.access.index == index).ok_or_else(|| Error::Invalid(format!("audit entry {index} is not an item of review {}", self.id)))?;
        if item.access.agent == by {
            return Err(Error::State(format!("audit entry {index} is your own access: another auditor judges it")));
        }
        item.outcome = Some(Outcome { verdict: verdict.to_string(), note, by: by.to_string(), at });
        Ok(())
    }

    /// Finishes the review once every item has an outcome.
    pub fn finish(&mut self, by: &str, at: i64) -> Result<Tally, Error> {
        if self.finished.is_some() {
            return Err(Error::State(format!("review {} is finished already", self.id)));
        }
        let tally = self.tally();
        if tally.open > 0 {
            return Err(Error::State(format!("review {} has {} items without an outcome", self.id, tally.open)));
        }
        self.finished = Some(Finished { by: by.to_string(), at });
        Ok(tally)
    }

    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for item in &self.items {
            match item.outcome.as_ref().map(|o| o.verdict.as_str()) {
                Some("justified") => t.justified += 1,
                Some("not-justified") => t.not_justified += 1,
                Some(_) => t.follow_up += 1,
                None => t.open += 1,
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn access(index: u64) -> Access {
        Access { index, time: index as i64 * 1000, agent: format!("u{}", index % 3), patient: format!("p{}", index % 7), interaction: "read".into() }
    }

    fn scope(size: usize, seed: u64) -> Scope {
        Scope { unit: "ward-4".into(), from: 0, to: 1_000_000, size, seed }
    }

    #[test]
    fn the_same_seed_draws_the_same_sample_and_flagged_accesses_are_always_in() {
        let population: Vec<Access> = (10..110).map(access).collect();
        let flagged = BTreeMap::from([(57, vec!["57-snooping-relative".to_string()])]);
        let a = draw("r1".into(), scope(5, 42), &population, &flagged, "aud".into(), 1).expect("draw");
        let b = draw("r1".into(), scope(5, 42), &population, &flagged, "aud".into(), 1).expect("draw");
        assert_eq!(a, b);
        assert_eq!(a.items.iter().filter(|i| i.drawn).count(), 5);
        assert!(a.items.iter().any(|i| i.access.index == 57 && i.alerts == ["57-snooping-relative"]));
        let c = draw("r1".into(), scope(5, 43), &population, &flagged, "aud".into(), 1).expect("draw");
        assert_ne!(a.items, c.items, "another seed, another sample");
        assert!(a.items.windows(2).all(|w| w[0].access.index < w[1].access.index));
    }

    #[test]
    fn a_review_finishes_only_when_every_item_is_judged_and_then_stays() {
        let population: Vec<Access> = (0..4).map(access).collect();
        let mut r = draw("r".into(), scope(3, 1), &population, &BTreeMap::new(), "aud".into(), 1).expect("draw");
        let idx: Vec<u64> = r.items.iter().map(|i| i.access.index).collect();
        assert!(matches!(r.record(idx[0], "fine", "", "aud", 2), Err(Error::Invalid(_))));
        assert!(matches!(r.record(idx[0], "not-justified", "  ", "aud", 2), Err(Error::Invalid(_))), "a finding needs a note");
        assert!(matches!(r.record(999, "justified", "", "aud", 2), Err(Error::Invalid(_))));
        assert!(matches!(r.record(idx[0], "justified", "", &r.items[0].access.agent.clone(), 2), Err(Error::State(_))), "not one's own access");
        r.record(idx[0], "justified", "", "aud", 2).expect("record");
        r.record(idx[1], "not-justified", "no care relation", "aud", 2).expect("record");
        assert!(matches!(r.finish("aud", 3), Err(Error::State(_))));
        r.record(idx[2], "needs-follow-up", "ask the ward", "aud", 3).expect("record");
        let t = r.finish("aud", 4).expect("finish");
        assert_eq!((t.justified, t.not_justified, t.follow_up, t.open), (1, 1, 1, 0));
        assert!(matches!(r.record(idx[0], "not-justified", "changed my mind", "aud", 5), Err(Error::State(_))));
    }

    #[test]
    fn scopes_are_checked() {
        assert!(check_scope(&scope(0, 1)).is_err());
        assert!(check_scope(&scope(MAX_SIZE + 1, 1)).is_err());
        assert!(check_scope(&Scope { unit: "../x".into(), ..scope(1, 1) }).is_err());
        assert!(check_scope(&Scope { from: 5, to: 5, ..scope(1, 1) }).is_err());
        assert!(check_scope(&Scope { from: 0, to: MAX_PERIOD_MS + 1, ..scope(1, 1) }).is_err());
    }

    proptest! {
        #[test]
        fn a_sample_is_k_distinct_positions_in_range(n in 0usize..300, k in 0usize..400, seed in any::<u64>()) {
            let s = sample(n, k, seed);
            prop_assert_eq!(s.len(), k.min(n));
            prop_assert!(s.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(s.iter().all(|&i| i < n));
            prop_assert_eq!(s, sample(n, k, seed));
        }
    }
}
