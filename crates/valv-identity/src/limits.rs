//! Time limits on signing in: session timeouts, escalating account lockout, and per-address rate
//! limits (a token bucket). All arithmetic on times passed in, in ms since the epoch.

/// Session timeouts (HIPAA §164.312(a)(2)(iii) automatic logoff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimes {
    /// Ended after this long without a request (default 15 min).
    pub idle_ms: i64,
    /// Ended this long after login whatever the activity (default 8 h).
    pub absolute_ms: i64,
}

impl Default for SessionTimes {
    fn default() -> Self {
        SessionTimes { idle_ms: 15 * 60_000, absolute_ms: 8 * 3_600_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Active,
    /// No request within the idle timeout.
    Idle,
    /// Past its absolute lifetime.
    Expired,
}

impl SessionTimes {
    pub fn state(&self, created: i64, last_seen: i64, now: i64) -> SessionState {
        if now >= created.saturating_add(self.absolute_ms) {
            SessionState::Expired
        } else if now >= last_seen.saturating_add(self.idle_ms) {
            SessionState::Idle
        } else {
            SessionState::Active
        }
    }

    /// Seconds until the session ends if idle from `now` (the `expires_in` of a login).
    pub fn expires_in_secs(&self, created: i64, now: i64) -> i64 {
        (created.saturating_add(self.absolute_ms).min(now.saturating_add(self.idle_ms)) - now).max(0) / 1000
    }
}

/// Account lockout after consecutive failures; each lockout lasts twice the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    /// Consecutive failures that lock the account (default 5).
    pub threshold: u32,
    /// First lockout (default 15 min).
    pub base_ms: i64,
    /// Longest lockout (default 24 h).
    pub max_ms: i64,
}

impl Default for Lockout {
    fn default() -> Self {
        Lockout { threshold: 5, base_ms: 15 * 60_000, max_ms: 24 * 3_600_000 }
    }
}

/// An account's failure record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Failures {
    /// Consecutive failures since the last success or lockout.
    pub consecutive: u32,
    /// Lockouts since the last successful login.
    pub lockouts: u32,
    /// Locked until then (ms since the epoch), if locked.
    pub locked_until: Option<i64>,
}

impl Failures {
    pub fn locked(&self, now: i64) -> bool {
        self.locked_until.is_some_and(|t| now < t)
    }
}

impl Lockout {
    /// The record after a failed attempt at `now`; `true` when this failure locked the account.
    pub fn after_failure(&self, f: Failures, now: i64) -> (Failures, bool) {
        let consecutive = f.consecutive + 1;
        if consecutive < self.threshold {
            return (Failures { consecutive, ..f }, false);
        }
        let factor = 1i64.checked_shl(f.lockouts.min(40)).unwrap_or(i64::MAX);
        let length = self.base_ms.saturating_mul(factor).min(self.max_ms);
        (Failures { consecutive: 0, lockouts: f.lockouts + 1, locked_until: Some(now.saturating_add(length)) }, true)
    }
}

/// A token bucket: `per_minute` requests a minute on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Default for Rate {
    fn default() -> Self {
        Rate { per_minute: 10, burst: 10 }
    }
}

impl Bucket {
    pub fn full(rate: Rate, now: i64) -> Self {
        Bucket { tokens: f64::from(rate.burst), at: now }
    }

    /// Takes one token, or says in how many whole seconds one will be there.
    pub fn take(&mut self, rate: Rate, now: i64) -> Result<(), u64> {
        let per_ms = f64::from(rate.per_minute) / 60_000.0;
        let elapsed = (now - self.at).max(0) as f64;
        self.tokens = (self.tokens + elapsed * per_ms).min(f64::from(rate.burst));
        self.at = now.max(self.at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if per_ms <= 0.0 {
            Err(60)
        } else {
            Err(((1.0 - self.tokens) / per_ms / 1000.0).ceil().max(1.0) as u64)
        }
    }

    /// Whether the bucket has refilled completely by `now` (so it can be forgotten).
    pub fn is_full(&self, rate: Rate, now: i64) -> bool {
        self.tokens + (now - self.at).max(0) as f64 * f64::from(rate.per_minute) / 60_000.0 >= f64::from(rate.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_timeouts() {
        let t = SessionTimes::default();
        assert_eq!(t.state(0, 0, 14 * 60_000), SessionState::Active);
        assert_eq!(t.state(0, 0, 15 * 60_000), SessionState::Idle);
        assert_eq!(t.state(0, 8 * 3_600_000 - 1000, 8 * 3_600_000), SessionState::Expired, "activity does not extend the absolute lifetime");
        assert_eq!(t.expires_in_secs(0, 0), 900);
        assert_eq!(t.expires_in_secs(0, 8 * 3_600_000 - 60_000), 60);
    }

    #[test]
    fn lockout_escalates() {
        let l = Lockout::default();
        let mut f = Failures::default();
        for i in 1..5 {
            let (next, locked) = l.after_failure(f, 0);
            assert!(!locked, "failure {i}");
            f = next;
        }
        let (f, locked) = l.after_failure(f, 1000);
        assert!(locked);
        assert_eq!(f.locked_until, Some(1000 + 15 * 60_000));
        assert!(f.locked(1000) && !f.locked(1000 + 15 * 60_000));
        let mut g = f;
        for _ in 0..5 {
            g = l.after_failure(g, 2_000_000).0;
        }
        assert_eq!(g.locked_until, Some(2_000_000 + 30 * 60_000), "the second lockout is twice as long");
        let mut h = Failures { lockouts: 60, ..Failures::default() };
        for _ in 0..5 {
            h = l.after_failure(h, 0).0;
        }
        assert_eq!(h.locked_until, Some(24 * 3_600_000), "capped");
    }

    #[test]
    fn bucket() {
        let rate = Rate { per_minute: 6, burst: 2 };
        let mut b = Bucket::full(rate, 0);
        assert!(b.take(rate, 0).is_ok());
        assert!(b.take(rate, 0).is_ok());
        assert_eq!(b.take(rate, 0), Err(10), "one token every 10 s");
        assert_eq!(b.take(rate, 5_000), Err(5));
        assert!(b.take(rate, 10_000).is_ok());
        assert!(!b.is_full(rate, 10_000));
        assert!(b.is_full(rate, 30_000));
    }
}
