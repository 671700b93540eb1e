//! An exact sliding-window counter in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{WindowCounter, WindowDecision};
use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;

/// Events per key over the last `window`, kept as timestamps so the count is exact.
///
/// One lock guards the map: recording is a few pointer moves, far cheaper than the I/O the
/// policies around it do, and it makes concurrent hits count exactly.
#[derive(Debug)]
pub struct MemoryWindowCounter {
    window: Duration,
    limit: u64,
    clock: SharedClock,
    keys: Mutex<Keys>,
}

#[derive(Debug)]
struct Keys {
    events: HashMap<String, VecDeque<Instant>>,
    /// Sweep idle keys once the map grows past this; doubling it after each sweep keeps the
    /// cost of sweeping constant per hit, however many keys there are.
    sweep_at: usize,
}

/// Timestamps kept per key at most; counts beyond it are reported as this cap. Bounded so that
/// one hot key cannot grow memory without limit.
const MAX_EVENTS_PER_KEY: usize = 100_000;

impl MemoryWindowCounter {
    /// Counts events over `window`, allowing up to `limit` of them.
    pub fn new(window: Duration, limit: u64, clock: SharedClock) -> Self {
        Self {
            window,
            limit,
            clock,
            keys: Mutex::new(Keys {
                events: HashMap::new(),
                sweep_at: 10_000,
            }),
        }
    }

    /// Keys currently held (idle ones are swept as the map grows).
    pub fn tracked_keys(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .events
            .len()
    }

    /// Records one event for `key` now.
    pub fn hit_now(&self, key: &str) -> WindowDecision {
        let now = self.clock.now();
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if keys.events.len() > keys.sweep_at {
            // sweep keys whose every event has left the window
            keys.events.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
            keys.sweep_at = (keys.events.len() * 2).max(10_000);
        }
        let events = keys.events.entry(key.to_owned()).or_default();
        while events
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            events.pop_front();
        }
        events.push_back(now);
        if events.len() > MAX_EVENTS_PER_KEY {
            events.pop_front();
        }
        let count = events.len() as u64;
        let allowed = count <= self.limit;
        // the event that must leave for the count to drop back to the limit
        let retry_after = (!allowed)
            .then(|| {
                let idx = usize::try_from(count - self.limit).unwrap_or(usize::MAX) - 1;
                events
                    .get(idx)
                    .map(|t| (*t + self.window).saturating_duration_since(now))
            })
            .flatten();
        WindowDecision {
            count,
            allowed,
            remaining: self.limit.saturating_sub(count),
            retry_after,
        }
    }
}

impl WindowCounter for MemoryWindowCounter {
    fn hit<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<WindowDecision, BackendError>> {
        Box::pin(std::future::ready(Ok(self.hit_now(key))))
    }
    fn window(&self) -> Duration {
        self.window
    }
    fn limit(&self) -> u64 {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn counts_within_the_window_and_forgets_after_it() {
        let clock = ManualClock::new();
        let c = MemoryWindowCounter::new(Duration::from_secs(60), 5, clock.shared());
        for i in 1..=5 {
            let d = c.hit_now("cust");
            assert_eq!((d.count, d.allowed), (i, true));
            clock.advance(Duration::from_secs(1));
        }
        let d = c.hit_now("cust");
        assert_eq!((d.count, d.allowed, d.remaining), (6, false, 0));
        // the first event (at t=0) leaves the window at t=60; now is t=5
        assert_eq!(d.retry_after, Some(Duration::from_secs(55)));
        assert_eq!(c.hit_now("other").count, 1);
        clock.advance(Duration::from_secs(55));
        // t=60: the event at t=0 has left; t=1..4, the 6th at t=5, and this one
        assert_eq!(c.hit_now("cust").count, 6);
        clock.advance(Duration::from_secs(60));
        assert_eq!(c.hit_now("cust").count, 1);
    }

    #[test]
    fn idle_keys_are_swept_as_the_map_grows() {
        let clock = ManualClock::new();
        let c = MemoryWindowCounter::new(Duration::from_secs(60), 5, clock.shared());
        for i in 0..10_001 {
            c.hit_now(&format!("k{i}"));
        }
        assert_eq!(c.tracked_keys(), 10_001, "all still inside the window");
        clock.advance(Duration::from_secs(60));
        c.hit_now("fresh");
        assert_eq!(c.tracked_keys(), 1, "every idle key swept");
    }
}
