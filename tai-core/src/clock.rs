//! Time, injectable.
//!
//! Every TPS primitive that reasons about time (breaker open durations, rate-limit intervals,
//! sliding windows, ack deadlines, Andon windows) reads it through a [`Clock`] instead of calling
//! `Instant::now()` itself. Production code uses [`SystemClock`]; tests use [`ManualClock`] and
//! move time forward explicitly, so every timing edge is pinned without sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// A source of monotonic and wall-clock time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Monotonic time, for measuring intervals and deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time, for timestamps people read.
    fn wall(&self) -> DateTime<Utc>;
}

/// A shared clock handle; clones read the same time.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The system clock as a [`SharedClock`].
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that only moves when told to: `advance` it in tests.
///
/// Monotonic and wall time move together, starting from the moment the clock was made.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    origin: Instant,
    wall_origin: DateTime<Utc>,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ManualInner {
                origin: Instant::now(),
                wall_origin: Utc::now(),
                offset_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.inner.offset_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// This clock as a [`SharedClock`].
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }

    fn offset(&self) -> Duration {
        Duration::from_nanos(self.inner.offset_nanos.load(Ordering::SeqCst))
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.origin + self.offset()
    }
    fn wall(&self) -> DateTime<Utc> {
        let offset = chrono::Duration::from_std(self.offset()).unwrap_or(chrono::Duration::MAX);
        self.inner.wall_origin + offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        let w0 = clock.wall();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1500));
        assert_eq!((clock.wall() - w0).num_milliseconds(), 1500);
        // clones share one time line
        let other = clock.clone();
        other.advance(Duration::from_secs(1));
        assert_eq!(clock.now() - t0, Duration::from_millis(2500));
    }
}
