//! A sliding window of recent events for one key (an account, an address): their count (with
//! weights, so a compacted audit entry standing for N attempts counts N), the distinct things
//! they were about, and the entry indices that are the evidence — each bounded in memory, and
//! each kept up to date as events come and go (nothing is recounted per event).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Events kept per window for evidence and distinct keys; beyond, the oldest are dropped (the
/// distinct count can then only be lower). The weighted count does not depend on it.
pub const MAX_EVENTS: usize = 512;
/// Per-second counts kept per window; beyond, the two oldest are merged (the count stays whole,
/// only its expiry gets coarser). A window of up to 17 minutes is exact to the second.
pub const MAX_SECONDS: usize = 1024;
/// Evidence indices an alert carries at most (the most recent ones).
pub const MAX_EVIDENCE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub time: i64,
    pub index: u64,
    pub weight: u64,
    /// What the event was about, for counting distinct ones (`None`: nothing to tell apart).
    pub key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    events: VecDeque<Event>,
    /// Weighted counts per second (`time` in whole seconds), oldest first.
    seconds: VecDeque<(i64, u64)>,
    total: u64,
    /// How many of the kept events name each key.
    keys: BTreeMap<String, u32>,
    /// No alert again from this window before this time (one alert per window's span).
    quiet_until: i64,
}

impl Window {
    /// Adds an event at `time` and forgets what is `span` ms or more before it.
    pub fn push(&mut self, event: Event, span: i64) {
        let now = event.time;
        let second = now.div_euclid(1000);
        match self.seconds.back_mut() {
            Some((s, n)) if *s == second => *n += event.weight,
            _ => self.seconds.push_back((second, event.weight)),
        }
        self.total += event.weight;
        if let Some(k) = &event.key {
            *self.keys.entry(k.clone()).or_default() += 1;
        }
        self.events.push_back(event);
        // A second is forgotten once all of it is out of the span.
        while self.seconds.front().is_some_and(|(s, _)| s * 1000 + 999 <= now - span) {
            if let Some((_, n)) = self.seconds.pop_front() {
                self.total -= n;
            }
        }
        if self.seconds.len() > MAX_SECONDS {
            if let (Some((_, a)), Some((_, b))) = (self.seconds.pop_front(), self.seconds.front_mut()) {
                *b += a;
            }
        }
        while self.events.front().is_some_and(|e| e.time <= now - span) || self.events.len() > MAX_EVENTS {
            if let Some(old) = self.events.pop_front() {
                self.forget_key(old.key);
            }
        }
    }

    fn forget_key(&mut self, key: Option<String>) {
        let Some(k) = key else { return };
        if let Some(n) = self.keys.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(&k);
            }
        }
    }

    /// The weighted count of events in the span.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// How many distinct keys the kept events name.
    pub fn distinct(&self) -> usize {
        self.keys.len()
    }

    /// The distinct keys named, in order.
    pub fn keys(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    /// True (once per `span`) when `reached` holds: the caller then raises an alert.
    pub fn fire(&mut self, reached: bool, now: i64, span: i64) -> bool {
        if !reached || now < self.quiet_until {
            return false;
        }
        self.quiet_until = now + span;
        true
    }

    /// The indices of the most recent events, oldest first.
    pub fn evidence(&self) -> Vec<u64> {
        let skip = self.events.len().saturating_sub(MAX_EVIDENCE);
        self.events.iter().skip(skip).map(|e| e.index).collect()
    }

    /// Whether the window holds nothing that matters at `now` any more.
    pub fn stale(&self, now: i64, span: i64) -> bool {
        self.quiet_until <= now && self.events.back().is_none_or(|e| e.time <= now - span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(time: i64, index: u64, weight: u64, key: Option<&str>) -> Event {
        Event { time, index, weight, key: key.map(str::to_string) }
    }

    #[test]
    fn counts_within_the_span_and_fires_once_per_span() {
        let mut w = Window::default();
        for i in 0..5 {
            w.push(ev(i * 1000, i as u64, 1, None), 3000);
        }
        // Counted to the second: a second counts until all of it is out of the span, so the
        // event at 1000 (second 1, which ends at 1999) still counts at 4000; the kept events
        // (the evidence) are exact.
        assert_eq!(w.count(), 4);
        assert_eq!(w.evidence(), vec![2, 3, 4]);
        w.push(ev(5000, 5, 1, None), 3000);
        assert_eq!(w.count(), 4, "seconds 2 to 5");
        assert!(w.fire(true, 4000, 3000));
        assert!(!w.fire(true, 5000, 3000), "quiet for a span after firing");
        assert!(w.fire(true, 7000, 3000));
        assert!(!w.fire(false, 20_000, 3000));
    }

    #[test]
    fn weights_distinct_keys_and_bounds() {
        let mut w = Window::default();
        w.push(ev(0, 1, 40, Some("a")), 60_000);
        w.push(ev(1, 2, 1, Some("b")), 60_000);
        w.push(ev(2, 3, 1, Some("a")), 60_000);
        w.push(ev(3, 4, 1, None), 60_000);
        assert_eq!((w.count(), w.distinct(), w.keys()), (43, 2, vec!["a", "b"]));
        // Far more events than are kept: the count stays whole, the evidence bounded.
        for i in 0..2 * MAX_EVENTS as u64 {
            w.push(ev(10 + i as i64, 100 + i, 1, None), 60_000);
        }
        assert_eq!(w.count(), 43 + 2 * MAX_EVENTS as u64);
        assert_eq!(w.evidence().len(), MAX_EVIDENCE);
        assert_eq!(w.distinct(), 0, "the keyed events were dropped from the kept ones");
        assert!(!w.stale(1100, 60_000) && w.stale(62_100, 60_000));
    }

    #[test]
    fn a_long_span_keeps_its_count_in_bounded_memory() {
        let mut w = Window::default();
        for s in 0..3 * MAX_SECONDS as i64 {
            w.push(ev(s * 1000, s as u64, 2, None), 86_400_000);
        }
        assert_eq!(w.count(), 6 * MAX_SECONDS as u64);
        assert!(w.seconds.len() <= MAX_SECONDS);
    }
}
