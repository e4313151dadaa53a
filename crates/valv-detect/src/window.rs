//! A sliding window of recent events for one key (an account, an address): their count (with
//! weights, so a compacted audit entry standing for N attempts counts N) and the entry indices
//! that are the evidence, bounded in memory.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Events kept per window; beyond, the oldest are dropped (the count can then only be lower:
/// a window never fires on events it no longer holds).
pub const MAX_EVENTS: usize = 512;
/// Evidence indices an alert carries at most (the most recent ones).
pub const MAX_EVIDENCE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub time: i64,
    pub index: u64,
    pub weight: u64,
    /// What the event was about, for counting distinct ones (`None`: unknown, each distinct).
    pub key: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    events: VecDeque<Event>,
    /// No alert again from this window before this time (one alert per window's span).
    quiet_until: i64,
}

impl Window {
    /// Adds an event at `time` and forgets those older than `span` ms before it.
    pub fn push(&mut self, event: Event, span: i64) {
        let now = event.time;
        self.events.push_back(event);
        while self.events.front().is_some_and(|e| e.time <= now - span) || self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// The weighted count of events in the window.
    pub fn count(&self) -> u64 {
        self.events.iter().map(|e| e.weight).sum()
    }

    /// How many distinct keys the events name (each event without a key counts as one).
    pub fn distinct(&self) -> usize {
        let mut seen: Vec<&str> = Vec::new();
        let mut unknown = 0;
        for e in &self.events {
            match e.key.as_deref() {
                Some(k) if !seen.contains(&k) => seen.push(k),
                Some(_) => {}
                None => unknown += 1,
            }
        }
        seen.len() + unknown
    }

    /// The distinct keys named, in order of first appearance.
    pub fn keys(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for k in self.events.iter().filter_map(|e| e.key.as_deref()) {
            if !seen.contains(&k) {
                seen.push(k);
            }
        }
        seen
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
        assert_eq!(w.count(), 3, "events at 2000, 3000, 4000 are within 3 s of 4000");
        assert_eq!(w.evidence(), vec![2, 3, 4]);
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
        assert_eq!((w.count(), w.distinct(), w.keys()), (43, 3, vec!["a", "b"]));
        for i in 0..2 * MAX_EVENTS as u64 {
            w.push(ev(10, i, 1, None), 60_000);
        }
        assert_eq!(w.count(), MAX_EVENTS as u64);
        assert_eq!(w.evidence().len(), MAX_EVIDENCE);
        assert!(!w.stale(10, 60_000) && w.stale(60_010, 60_000));
    }
}
