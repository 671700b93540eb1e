//! Jidoka: stop the line when a dependency fails.
//!
//! A [`CircuitBreaker`] stands in front of a dependency (a payment gateway, a platform API) on the
//! Action side of the Signal -> Policy -> Action flow. It has three states:
//!
//! - **Closed**: calls go through. It opens when `consecutive_failures` calls in a row failed,
//!   or when at least `minimum_calls` of the last `window_size` calls were recorded and the share
//!   of failures among them reached `failure_rate` (inclusive: 10 failures out of 20 at 50% opens).
//! - **Open**: calls are refused at once, without touching the dependency, with the time left
//!   until the breaker will admit a trial (`retry_after`). After `open_for` it becomes half-open.
//! - **Half-open**: at most `half_open_trials` calls are admitted; when that many have succeeded
//!   it closes (with a fresh window), and one failure opens it again for another `open_for`.
//!
//! What counts as a failure is the caller's [`Outcome`]; a call that took `slow_call` or longer
//! is a failure even when it succeeded, because a dependency that answers too late is as good as
//! down. Results of calls admitted before the last state change are ignored, so a slow straggler
//! cannot close a breaker that opened after it started.
//!
//! Clones share one state. The state is exported as a gauge (0 closed, 1 open, 2 half-open) and
//! every transition is broadcast as a [`BreakerEvent`]. [`layer::CircuitBreakerLayer`] wraps any
//! `tower::Service` with a breaker.
//!
//! ```
//! use std::time::Duration;
//! use tai_core::clock::ManualClock;
//! use tai_core::jidoka::{BreakerConfig, BreakerState, CircuitBreaker, Outcome};
//!
//! let clock = ManualClock::new();
//! let breaker = CircuitBreaker::new("gateway", BreakerConfig::default(), clock.shared());
//! for _ in 0..5 {
//!     let permit = breaker.try_acquire().expect("closed: calls go through");
//!     // ... call the dependency, then say how it went
//!     permit.record(Outcome::Failure);
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! let refused = breaker.try_acquire().unwrap_err();
//! assert_eq!(refused.retry_after, Duration::from_secs(30));
//! clock.advance(Duration::from_secs(30));
//! assert_eq!(breaker.state(), BreakerState::HalfOpen);
//! ```

pub mod layer;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::clock::SharedClock;

/// Breaker settings; the defaults are docs/API.md's gateway defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// Share of failures in the window (0.0..=1.0) that opens the breaker.
    pub failure_rate: f64,
    /// How many of the most recent calls the failure rate is computed over.
    pub window_size: usize,
    /// The failure rate is only judged once this many calls are in the window.
    pub minimum_calls: usize,
    /// A call taking this long or longer counts as a failure; `None` disables the check.
    pub slow_call: Option<Duration>,
    /// How long the breaker stays open before admitting trials.
    pub open_for: Duration,
    /// Trial calls admitted while half-open; this many successes close the breaker.
    pub half_open_trials: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window_size: 20,
            minimum_calls: 10,
            slow_call: Some(Duration::from_secs(5)),
            open_for: Duration::from_secs(30),
            half_open_trials: 3,
        }
    }
}

/// The three states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are refused.
    Open,
    /// A bounded number of trial calls flow.
    HalfOpen,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 open, 2 half-open (docs/API.md).
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// How a call went, as the caller classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The dependency did its job (a card decline is a success of the gateway).
    Success,
    /// The dependency failed: an error, a 5xx, a timeout, a refused connection.
    Failure,
    /// Neither: the call says nothing about the dependency's health (e.g. cancelled).
    Ignored,
}

impl Outcome {
    /// `Success` for `Ok`, `Failure` for `Err`: what most calls mean
    /// (`breaker.call(fut, Outcome::of)`).
    pub fn of<T, E>(result: &Result<T, E>) -> Self {
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    }
}

/// A state change, broadcast to subscribers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakerEvent {
    /// The breaker's name.
    pub breaker: String,
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// Why, e.g. `5 consecutive failures`.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// The breaker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is open; retry after {retry_after:?}")]
pub struct Rejected {
    /// When a call may be admitted again, as well as the breaker can tell.
    pub retry_after: Duration,
}

/// A point-in-time view of a breaker, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Its state now.
    pub state: BreakerState,
    /// Failures in a row so far.
    pub consecutive_failures: u32,
    /// Calls in the rate window.
    pub window_calls: usize,
    /// Failures among them.
    pub window_failures: usize,
    /// Seconds until trials are admitted, while open.
    pub retry_after_secs: Option<f64>,
}

/// A circuit breaker; clones share one state.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    config: BreakerConfig,
    clock: SharedClock,
    machine: Mutex<Machine>,
    gauge: Option<prometheus::IntGauge>,
    events: broadcast::Sender<BreakerEvent>,
}

#[derive(Debug)]
struct Machine {
    state: BreakerState,
    /// Bumped at every transition; permits from an older generation are ignored.
    generation: u64,
    consecutive: u32,
    /// `true` for a failure, most recent last, at most `window_size` long.
    window: VecDeque<bool>,
    opened_at: Instant,
    trials_admitted: u32,
    trials_succeeded: u32,
}

impl CircuitBreaker {
    /// A breaker named `name` (used in metrics, events and `/status`).
    pub fn new(name: impl Into<String>, config: BreakerConfig, clock: SharedClock) -> Self {
        let (events, _) = broadcast::channel(64);
        let now = clock.now();
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                config,
                clock,
                machine: Mutex::new(Machine {
                    state: BreakerState::Closed,
                    generation: 0,
                    consecutive: 0,
                    window: VecDeque::new(),
                    opened_at: now,
                    trials_admitted: 0,
                    trials_succeeded: 0,
                }),
                gauge: None,
                events,
            }),
        }
    }

    /// Exports the state as `gauge` (0 closed, 1 open, 2 half-open). Call before cloning.
    pub fn with_gauge(mut self, gauge: prometheus::IntGauge) -> Self {
        gauge.set(0);
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.gauge = Some(gauge);
        }
        self
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Its configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// Subscribes to state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<BreakerEvent> {
        self.inner.events.subscribe()
    }

    /// The state now (an open breaker whose time is up reports half-open).
    pub fn state(&self) -> BreakerState {
        let mut m = self.lock();
        self.expire_open(&mut m);
        m.state
    }

    /// A view for `/status`.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let mut m = self.lock();
        self.expire_open(&mut m);
        let retry_after = (m.state == BreakerState::Open).then(|| self.remaining_open(&m));
        BreakerSnapshot {
            name: self.inner.name.clone(),
            state: m.state,
            consecutive_failures: m.consecutive,
            window_calls: m.window.len(),
            window_failures: m.window.iter().filter(|f| **f).count(),
            retry_after_secs: retry_after.map(|d| d.as_secs_f64()),
        }
    }

    /// Asks to make a call. On success, the returned [`Permit`] must be told how the call went;
    /// dropping it unrecorded counts as [`Outcome::Ignored`].
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let mut m = self.lock();
        self.expire_open(&mut m);
        match m.state {
            BreakerState::Closed => {}
            BreakerState::Open => {
                return Err(Rejected {
                    retry_after: self.remaining_open(&m),
                });
            }
            BreakerState::HalfOpen => {
                if m.trials_admitted >= self.inner.config.half_open_trials {
                    // every trial slot is taken; the verdict comes within one call's time
                    return Err(Rejected {
                        retry_after: Duration::from_secs(1),
                    });
                }
                m.trials_admitted += 1;
            }
        }
        Ok(Permit {
            breaker: self.clone(),
            generation: m.generation,
            started: self.inner.clock.now(),
            recorded: false,
        })
    }

    /// Runs `call` through the breaker, classifying its result with `classify`.
    pub async fn call<T, E, F>(
        &self,
        call: F,
        classify: impl FnOnce(&Result<T, E>) -> Outcome,
    ) -> Result<Result<T, E>, Rejected>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = call.await;
        permit.record(classify(&result));
        Ok(result)
    }

    fn lock(&self) -> MutexGuard<'_, Machine> {
        // A poisoned lock only means another thread panicked mid-update; the machine's fields
        // are each valid on their own, so keep serving rather than cascade the panic.
        self.inner
            .machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remaining_open(&self, m: &Machine) -> Duration {
        (m.opened_at + self.inner.config.open_for).saturating_duration_since(self.inner.clock.now())
    }

    fn expire_open(&self, m: &mut Machine) {
        if m.state == BreakerState::Open
            && self.inner.clock.now() >= m.opened_at + self.inner.config.open_for
        {
            self.transition(m, BreakerState::HalfOpen, "open duration elapsed".into());
        }
    }

    fn transition(&self, m: &mut Machine, to: BreakerState, reason: String) {
        let from = m.state;
        m.state = to;
        m.generation += 1;
        m.trials_admitted = 0;
        m.trials_succeeded = 0;
        match to {
            BreakerState::Open => m.opened_at = self.inner.clock.now(),
            BreakerState::Closed => {
                m.consecutive = 0;
                m.window.clear();
            }
            BreakerState::HalfOpen => {}
        }
        if let Some(g) = &self.inner.gauge {
            g.set(to.as_gauge());
        }
        tracing::warn!(breaker = %self.inner.name, ?from, ?to, %reason, "circuit breaker state change");
        // nobody listening is fine
        let _ = self.inner.events.send(BreakerEvent {
            breaker: self.inner.name.clone(),
            from,
            to,
            reason,
            at: self.inner.clock.wall(),
        });
    }

    fn record(&self, generation: u64, started: Instant, outcome: Outcome) {
        let cfg = &self.inner.config;
        let elapsed = self.inner.clock.now().saturating_duration_since(started);
        let outcome = match (outcome, cfg.slow_call) {
            (Outcome::Success, Some(slow)) if elapsed >= slow => Outcome::Failure,
            (o, _) => o,
        };
        let mut m = self.lock();
        if m.generation != generation {
            return;
        }
        match (m.state, outcome) {
            (_, Outcome::Ignored) => {
                if m.state == BreakerState::HalfOpen {
                    m.trials_admitted = m.trials_admitted.saturating_sub(1);
                }
            }
            (BreakerState::Closed, failed) => {
                let failed = failed == Outcome::Failure;
                m.consecutive = if failed { m.consecutive + 1 } else { 0 };
                m.window.push_back(failed);
                while m.window.len() > cfg.window_size {
                    m.window.pop_front();
                }
                let failures = m.window.iter().filter(|f| **f).count();
                if failed && m.consecutive >= cfg.consecutive_failures {
                    let reason = format!("{} consecutive failures", m.consecutive);
                    self.transition(&mut m, BreakerState::Open, reason);
                } else if m.window.len() >= cfg.minimum_calls
                    && failures as f64 >= cfg.failure_rate * m.window.len() as f64
                {
                    let reason = format!(
                        "failure rate {failures}/{} reached {:.0}%",
                        m.window.len(),
                        cfg.failure_rate * 100.0
                    );
                    self.transition(&mut m, BreakerState::Open, reason);
                }
            }
            (BreakerState::HalfOpen, Outcome::Success) => {
                m.trials_succeeded += 1;
                if m.trials_succeeded >= cfg.half_open_trials {
                    let reason = format!("{} trial calls succeeded", m.trials_succeeded);
                    self.transition(&mut m, BreakerState::Closed, reason);
                }
            }
            (BreakerState::HalfOpen, Outcome::Failure) => {
                self.transition(&mut m, BreakerState::Open, "trial call failed".into());
            }
            (BreakerState::Open, _) => {}
        }
    }
}

/// Leave to make one call; tell it how the call went with [`Permit::record`].
#[derive(Debug)]
#[must_use = "a permit must be recorded, or the breaker learns nothing from the call"]
pub struct Permit {
    breaker: CircuitBreaker,
    generation: u64,
    started: Instant,
    recorded: bool,
}

impl Permit {
    /// Records the call's outcome (a success slower than `slow_call` becomes a failure).
    pub fn record(mut self, outcome: Outcome) {
        self.recorded = true;
        self.breaker.record(self.generation, self.started, outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker
                .record(self.generation, self.started, Outcome::Ignored);
        }
    }
}

#[cfg(test)]
mod tests;
