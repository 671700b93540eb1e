//! In-memory GCRA through `governor`, on the injectable clock.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as GovClock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;

use super::{Quota, RateDecision, RateLimiter};
use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;

/// Adapts a [`SharedClock`] to governor's clock: nanoseconds since the limiter was made.
#[derive(Debug, Clone)]
struct GovernorClock {
    clock: SharedClock,
    origin: std::time::Instant,
}

impl GovClock for GovernorClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.clock.now().saturating_duration_since(self.origin))
    }
}

type Keyed = governor::RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    GovernorClock,
    StateInformationMiddleware,
>;

/// A keyed GCRA limiter held in this process.
#[derive(Debug, Clone)]
pub struct GcraLimiter {
    quota: Quota,
    limiter: Arc<Keyed>,
    clock: GovernorClock,
}

impl GcraLimiter {
    /// A limiter giving every key `quota`.
    pub fn new(quota: Quota, clock: SharedClock) -> Self {
        let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
        let interval = quota.interval.max(Duration::from_nanos(1));
        let gov_quota = governor::Quota::with_period(interval)
            .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let gclock = GovernorClock {
            origin: clock.now(),
            clock,
        };
        let limiter = governor::RateLimiter::dashmap_with_clock(gov_quota, gclock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Self {
            quota: Quota {
                burst: burst.get(),
                interval,
            },
            limiter: Arc::new(limiter),
            clock: gclock,
        }
    }

    /// Checks one request for `key` without going through a future.
    pub fn check_now(&self, key: &str) -> RateDecision {
        let key = key.to_owned();
        match self.limiter.check_key(&key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                RateDecision {
                    allowed: true,
                    limit: self.quota.burst,
                    remaining,
                    retry_after: None,
                    reset_after: self.quota.interval * (self.quota.burst - remaining),
                }
            }
            Err(not_until) => {
                let now = self.clock.now();
                let wait = not_until.wait_time_from(now);
                RateDecision {
                    allowed: false,
                    limit: self.quota.burst,
                    remaining: 0,
                    retry_after: Some(wait),
                    reset_after: wait + self.quota.interval * (self.quota.burst - 1),
                }
            }
        }
    }

    /// Forgets keys whose allowance has fully come back, bounding memory under many keys.
    pub fn shrink(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Number of keys currently held.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

impl RateLimiter for GcraLimiter {
    fn check<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<RateDecision, BackendError>> {
        Box::pin(std::future::ready(Ok(self.check_now(key))))
    }
    fn quota(&self) -> Quota {
        self.quota
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn admits_exactly_the_burst_then_one_per_interval() {
        let clock = ManualClock::new();
        let quota = Quota {
            burst: 3,
            interval: Duration::from_millis(100),
        };
        let l = GcraLimiter::new(quota, clock.shared());
        let d: Vec<RateDecision> = (0..3).map(|_| l.check_now("m1")).collect();
        assert!(d.iter().all(|d| d.allowed));
        assert_eq!(
            d.iter().map(|d| d.remaining).collect::<Vec<_>>(),
            vec![2, 1, 0]
        );
        let refused = l.check_now("m1");
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Some(Duration::from_millis(100)));
        // other keys have their own budget
        assert!(l.check_now("m2").allowed);

        clock.advance(Duration::from_millis(99));
        assert!(!l.check_now("m1").allowed);
        clock.advance(Duration::from_millis(1));
        assert!(l.check_now("m1").allowed, "one more after one interval");
        assert!(!l.check_now("m1").allowed, "and only one");
        clock.advance(Duration::from_millis(300));
        let after_full_refill: Vec<bool> = (0..4).map(|_| l.check_now("m1").allowed).collect();
        assert_eq!(after_full_refill, vec![true, true, true, false]);
    }

    #[test]
    fn per_second_quota() {
        let q = Quota::per_second(100);
        assert_eq!(q.burst, 100);
        assert_eq!(q.interval, Duration::from_millis(10));
    }
}
