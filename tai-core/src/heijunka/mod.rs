//! Heijunka: level the load.
//!
//! Two keyed limiters guard the Signal side of the flow, before any policy or action runs:
//!
//! - [`RateLimiter`]: GCRA (the generic cell rate algorithm), a token bucket without timers. A key
//!   may send `burst` requests at once, then one per `interval`. [`GcraLimiter`] keeps the state in
//!   memory through `governor`; [`RedisGcra`] runs the same algorithm in one Lua script so that
//!   every replica shares a key's budget.
//! - [`WindowCounter`]: counts events per key over a sliding window (a log of timestamps, exact,
//!   not an approximation), answering with the count including the event just recorded. The fraud
//!   policy's velocity rule reads it. [`RedisWindowCounter`] keeps it in a sorted set.
//!
//! Both answer with what a client needs to behave: allowed or not, how much is left, and when to
//! retry, which the HTTP layer ([`crate::runtime::ratelimit::enforce`], on any route) turns into
//! `429`, `Retry-After` and `RateLimit-*` headers.
//!
//! ```
//! use std::time::Duration;
//! use tai_core::clock::ManualClock;
//! use tai_core::heijunka::{GcraLimiter, Quota};
//!
//! let clock = ManualClock::new();
//! let limiter = GcraLimiter::new(Quota { burst: 2, interval: Duration::from_secs(1) }, clock.shared());
//! assert!(limiter.check_now("merchant-1").allowed);
//! assert!(limiter.check_now("merchant-1").allowed);
//! let refused = limiter.check_now("merchant-1");
//! assert!(!refused.allowed);
//! assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
//! assert!(limiter.check_now("merchant-2").allowed, "every key has its own budget");
//! ```

mod gcra;
mod redis;
mod window;

use std::time::Duration;

use serde::Serialize;

pub use self::redis::{RedisGcra, RedisWindowCounter};
pub use gcra::GcraLimiter;
pub use window::MemoryWindowCounter;

use crate::backend::{BackendError, BoxFuture};

/// The answer of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateDecision {
    /// Whether this request may go ahead (it has been counted if so).
    pub allowed: bool,
    /// The burst size: requests a key may make at once.
    pub limit: u32,
    /// Requests that could still go ahead right now.
    pub remaining: u32,
    /// When refused: how long until one request would be allowed.
    pub retry_after: Option<Duration>,
    /// How long until the full burst is available again.
    pub reset_after: Duration,
}

/// A GCRA quota: `burst` at once, then one every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests allowed at once (at least 1).
    pub burst: u32,
    /// The time one request's allowance takes to come back.
    pub interval: Duration,
}

impl Quota {
    /// `per_second` requests a second with a burst of the same size.
    pub fn per_second(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        Self {
            burst: per_second,
            interval: Duration::from_secs(1) / per_second,
        }
    }
}

/// A keyed rate limiter.
pub trait RateLimiter: Send + Sync + std::fmt::Debug {
    /// Checks (and, if allowed, counts) one request for `key`.
    fn check<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<RateDecision, BackendError>>;
    /// The quota every key gets.
    fn quota(&self) -> Quota;
}

/// The answer of a window count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowDecision {
    /// Events for the key inside the window, the one just recorded included.
    pub count: u64,
    /// Whether `count` is within the limit.
    pub allowed: bool,
    /// How many more events the window admits.
    pub remaining: u64,
    /// When over the limit: how long until the oldest event leaves the window.
    pub retry_after: Option<Duration>,
}

/// A keyed sliding-window event counter.
pub trait WindowCounter: Send + Sync + std::fmt::Debug {
    /// Records one event for `key` now and returns the count in the window ending now.
    fn hit<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<WindowDecision, BackendError>>;
    /// The window's length.
    fn window(&self) -> Duration;
    /// The largest count that is still allowed.
    fn limit(&self) -> u64;
}

#[cfg(test)]
mod props {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::{GcraLimiter, MemoryWindowCounter, Quota};
    use crate::clock::ManualClock;

    proptest! {
        /// Whatever the arrival pattern, no span of time admits more than the burst plus one
        /// request per interval that passed, and a refused request's retry-after is honest.
        #[test]
        fn gcra_never_admits_more_than_burst_plus_elapsed_intervals(
            burst in 1u32..8,
            interval_ms in 1u64..200,
            gaps in prop::collection::vec(0u64..300, 1..200),
        ) {
            let clock = ManualClock::new();
            let interval = Duration::from_millis(interval_ms);
            let limiter = GcraLimiter::new(Quota { burst, interval }, clock.shared());
            let mut admitted_at: Vec<u64> = Vec::new();
            let mut now = 0u64;
            for gap in gaps {
                clock.advance(Duration::from_millis(gap));
                now += gap;
                let d = limiter.check_now("k");
                if d.allowed {
                    admitted_at.push(now);
                } else {
                    let wait = d.retry_after.expect("a refusal says when");
                    prop_assert!(wait > Duration::ZERO && wait <= interval * burst);
                }
            }
            for (i, start) in admitted_at.iter().enumerate() {
                for (j, end) in admitted_at.iter().enumerate().skip(i) {
                    let allowed = u64::from(burst) + (end - start) / interval_ms;
                    prop_assert!((j - i + 1) as u64 <= allowed, "{} admitted in {} ms", j - i + 1, end - start);
                }
            }
        }

        /// The sliding window's count is exactly the number of events in the last window.
        #[test]
        fn the_window_count_matches_a_model(
            window_ms in 1u64..500,
            gaps in prop::collection::vec(0u64..200, 1..200),
        ) {
            let clock = ManualClock::new();
            let counter = MemoryWindowCounter::new(Duration::from_millis(window_ms), 5, clock.shared());
            let mut events: Vec<u64> = Vec::new();
            let mut now = 0u64;
            for gap in gaps {
                clock.advance(Duration::from_millis(gap));
                now += gap;
                events.push(now);
                let expected = events.iter().filter(|t| now - **t < window_ms).count() as u64;
                let d = counter.hit_now("k");
                prop_assert_eq!(d.count, expected);
                prop_assert_eq!(d.allowed, expected <= 5);
            }
        }
    }
}
