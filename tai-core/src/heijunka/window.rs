//! An exact sliding-window counter in memory.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{WindowCounter, WindowDecision};
use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;

/// Events per key over the last `window`, kept as timestamps so the count is exact.
///
/// One lock guards the map: recording is a few pointer moves, far cheaper than the I/O the
/// policies around it do, and it makes concurrent hits count exactly.
///
/// Kept small, because a flood of distinct keys (customers paying once each) fills it with as
/// many keys as arrive in a window: a key is held as a 64-bit hash of it (with a per-process
/// random seed; that two of a million keys in one window share a hash is a chance of about
/// three in a hundred million, and all it does is count their events together), and a key's one
/// event is held inline, without an allocation of its own.
#[derive(Debug)]
pub struct MemoryWindowCounter {
    window: Duration,
    limit: u64,
    clock: SharedClock,
    keys: Mutex<Keys>,
}

#[derive(Debug)]
struct Keys {
    events: HashMap<u64, Events>,
    hashes: RandomState,
    /// Sweep idle keys once the map grows past this; doubling it after each sweep keeps the
    /// cost of sweeping constant per hit, however many keys there are.
    sweep_at: usize,
}

/// A key's events in the window, oldest first.
#[derive(Debug)]
enum Events {
    None,
    One(Instant),
    Many(VecDeque<Instant>),
}

impl Events {
    fn len(&self) -> usize {
        match self {
            Events::None => 0,
            Events::One(_) => 1,
            Events::Many(q) => q.len(),
        }
    }

    fn get(&self, i: usize) -> Option<Instant> {
        match self {
            Events::None => None,
            Events::One(t) => (i == 0).then_some(*t),
            Events::Many(q) => q.get(i).copied(),
        }
    }

    fn last(&self) -> Option<Instant> {
        self.len().checked_sub(1).and_then(|i| self.get(i))
    }

    /// Drops the events that have left the window.
    fn forget_before(&mut self, now: Instant, window: Duration) {
        let gone = |t: &Instant| now.duration_since(*t) >= window;
        match self {
            Events::None => {}
            Events::One(t) => {
                if gone(t) {
                    *self = Events::None;
                }
            }
            Events::Many(q) => {
                while q.front().is_some_and(gone) {
                    q.pop_front();
                }
            }
        }
    }

    /// Adds an event (the newest), keeping at most [`MAX_EVENTS_PER_KEY`].
    fn push(&mut self, now: Instant) {
        match self {
            Events::None => *self = Events::One(now),
            Events::One(t) => *self = Events::Many(VecDeque::from([*t, now])),
            Events::Many(q) => {
                q.push_back(now);
                if q.len() > MAX_EVENTS_PER_KEY {
                    q.pop_front();
                }
            }
        }
    }
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
                hashes: RandomState::new(),
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
                q.last()
                    .is_some_and(|t| now.duration_since(t) < self.window)
            });
            keys.sweep_at = (keys.events.len() * 2).max(10_000);
        }
        let hash = keys.hashes.hash_one(key);
        let events = keys.events.entry(hash).or_insert(Events::None);
        events.forget_before(now, self.window);
        events.push(now);
        let count = events.len() as u64;
        let allowed = count <= self.limit;
        // the event that must leave for the count to drop back to the limit
        let retry_after = (!allowed)
            .then(|| {
                let idx = usize::try_from(count - self.limit).unwrap_or(usize::MAX) - 1;
                events
                    .get(idx)
                    .map(|t| (t + self.window).saturating_duration_since(now))
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
