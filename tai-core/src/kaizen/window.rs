//! A rolling window of recent events: counts, error share, latency percentiles.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::clock::SharedClock;

/// Figures over the window, as Andon and `/status` read them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowStats {
    /// Events in the window.
    pub count: u64,
    /// Of which errors.
    pub errors: u64,
    /// `errors / count` (0 when empty).
    pub error_rate: f64,
    /// Events per second over the window.
    pub rate_per_sec: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile latency in milliseconds.
    pub p95_ms: f64,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: f64,
    /// Counts of tagged events (e.g. `fraud_blocked`).
    pub tags: BTreeMap<String, u64>,
}

impl WindowStats {
    /// A tag's share of all events (0 when empty).
    pub fn tag_rate(&self, tag: &str) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.tags.get(tag).copied().unwrap_or(0) as f64 / self.count as f64
    }
}

/// Events over the last `window`, kept in `buckets` slices that expire one at a time.
#[derive(Debug)]
pub struct RollingWindow {
    window: Duration,
    slice: Duration,
    clock: SharedClock,
    origin: std::time::Instant,
    slices: Mutex<Vec<Slice>>,
}

#[derive(Debug)]
struct Slice {
    /// Which slice of time (since origin) this holds; stale when older than the window.
    epoch: u64,
    count: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    tags: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits; the bounds are constant and valid
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

impl RollingWindow {
    /// A window of length `window` kept in `buckets` slices (more slices, smoother expiry).
    pub fn new(window: Duration, buckets: u32, clock: SharedClock) -> Self {
        let buckets = buckets.max(1);
        let slices = (0..buckets)
            .map(|_| Slice {
                epoch: u64::MAX,
                count: 0,
                errors: 0,
                latency_us: histogram(),
                tags: BTreeMap::new(),
            })
            .collect();
        Self {
            window,
            slice: window / buckets,
            origin: clock.now(),
            clock,
            slices: Mutex::new(slices),
        }
    }

    fn epoch_now(&self) -> u64 {
        let since = self.clock.now().saturating_duration_since(self.origin);
        (since.as_nanos() / self.slice.as_nanos().max(1)) as u64
    }

    fn with_slice(&self, f: impl FnOnce(&mut Slice)) {
        let epoch = self.epoch_now();
        let mut slices = self
            .slices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = slices.len() as u64;
        let slice = &mut slices[(epoch % n) as usize];
        if slice.epoch != epoch {
            slice.epoch = epoch;
            slice.count = 0;
            slice.errors = 0;
            slice.latency_us.reset();
            slice.tags.clear();
        }
        f(slice);
    }

    /// Records one event with its latency.
    pub fn record(&self, latency: Duration, error: bool) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.with_slice(|s| {
            s.count += 1;
            s.errors += u64::from(error);
            s.latency_us.saturating_record(us);
        });
    }

    /// Counts a tagged event (not counted as a request; use alongside [`RollingWindow::record`]).
    pub fn tag(&self, tag: &str) {
        self.with_slice(|s| *s.tags.entry(tag.to_owned()).or_insert(0) += 1);
    }

    /// The figures over the window ending now.
    pub fn stats(&self) -> WindowStats {
        let epoch = self.epoch_now();
        let slices = self
            .slices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = slices.len() as u64;
        let mut merged = histogram();
        let (mut count, mut errors) = (0, 0);
        let mut tags = BTreeMap::new();
        for s in slices.iter() {
            if s.epoch == u64::MAX || s.epoch > epoch || epoch - s.epoch >= n {
                continue;
            }
            count += s.count;
            errors += s.errors;
            let _ = merged.add(&s.latency_us);
            for (k, v) in &s.tags {
                *tags.entry(k.clone()).or_insert(0) += v;
            }
        }
        let ms = |q: f64| {
            if merged.is_empty() {
                0.0
            } else {
                merged.value_at_quantile(q) as f64 / 1000.0
            }
        };
        WindowStats {
            count,
            errors,
            error_rate: if count == 0 {
                0.0
            } else {
                errors as f64 / count as f64
            },
            rate_per_sec: count as f64 / self.window.as_secs_f64().max(f64::EPSILON),
            p50_ms: ms(0.50),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            tags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn percentiles_rates_and_expiry() {
        let clock = ManualClock::new();
        let w = RollingWindow::new(Duration::from_secs(60), 12, clock.shared());
        for i in 1..=100u64 {
            w.record(Duration::from_millis(i), i > 95);
        }
        w.tag("fraud_blocked");
        let s = w.stats();
        assert_eq!((s.count, s.errors), (100, 5));
        assert!((s.error_rate - 0.05).abs() < 1e-12);
        assert!((s.p99_ms - 99.0).abs() < 0.1, "p99 {}", s.p99_ms);
        assert!((s.p95_ms - 95.0).abs() < 0.1, "p95 {}", s.p95_ms);
        assert!((s.tag_rate("fraud_blocked") - 0.01).abs() < 1e-12);
        clock.advance(Duration::from_secs(30));
        w.record(Duration::from_millis(1), false);
        assert_eq!(w.stats().count, 101);
        clock.advance(Duration::from_secs(31));
        // the first hundred are older than 60 s now; the one at t=30 is not
        assert_eq!(w.stats().count, 1);
        clock.advance(Duration::from_secs(60));
        assert_eq!(w.stats().count, 0);
        assert_eq!(w.stats().p99_ms, 0.0);
    }
}
