use std::time::Duration;

use super::layer::{BreakerError, CircuitBreakerLayer, ErrorsAreFailures};
use super::*;
use crate::clock::ManualClock;

fn breaker(clock: &ManualClock) -> CircuitBreaker {
    CircuitBreaker::new("gw", BreakerConfig::default(), clock.shared())
}

fn record(b: &CircuitBreaker, outcome: Outcome) {
    b.try_acquire().expect("admitted").record(outcome);
}

#[test]
fn opens_on_the_fifth_consecutive_failure_not_the_fourth() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..4 {
        record(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), BreakerState::Open);
    let rejected = b.try_acquire().expect_err("open refuses");
    assert_eq!(rejected.retry_after, Duration::from_secs(30));
}

#[test]
fn a_success_resets_the_consecutive_count() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..4 {
        record(&b, Outcome::Failure);
    }
    record(&b, Outcome::Success);
    for _ in 0..4 {
        record(&b, Outcome::Failure);
    }
    // 8 failures of 9 calls, but fewer than 10 calls: the rate is not judged yet
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn failure_rate_opens_only_once_minimum_calls_were_seen() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    // F S F S ... never 5 in a row; 5 failures in 9 calls is over 50% but below 10 calls
    for i in 0..9 {
        record(
            &b,
            if i % 2 == 0 {
                Outcome::Failure
            } else {
                Outcome::Success
            },
        );
    }
    assert_eq!(b.snapshot().window_failures, 5);
    assert_eq!(b.state(), BreakerState::Closed);
    // 10th call: 5 of 10 = 50%, inclusive threshold
    record(&b, Outcome::Success);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn failure_rate_below_threshold_over_full_window_stays_closed() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    // 9 failures out of 20, spread so that no 5 are consecutive
    let pattern = [
        true, false, true, false, true, false, true, false, false, false, true, false, true, false,
        true, false, true, false, false, true,
    ];
    assert_eq!(pattern.iter().filter(|f| **f).count(), 9);
    for fail in pattern {
        record(
            &b,
            if fail {
                Outcome::Failure
            } else {
                Outcome::Success
            },
        );
    }
    assert_eq!(b.state(), BreakerState::Closed);
    // one more failure pushes the oldest (a failure) out: still 9 of 20
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), BreakerState::Closed);
    // and another: the oldest is now a success, so 10 of 20 = 50%
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn a_slow_success_counts_as_a_failure() {
    let clock = ManualClock::new();
    let cfg = BreakerConfig {
        consecutive_failures: 1,
        slow_call: Some(Duration::from_millis(200)),
        ..BreakerConfig::default()
    };
    let b = CircuitBreaker::new("gw", cfg, clock.shared());
    let p = b.try_acquire().expect("admitted");
    clock.advance(Duration::from_millis(199));
    p.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::Closed);
    let p = b.try_acquire().expect("admitted");
    clock.advance(Duration::from_millis(200));
    p.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn half_open_admits_exactly_the_configured_trials_and_closes_after_them() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..5 {
        record(&b, Outcome::Failure);
    }
    clock.advance(Duration::from_secs(29));
    assert!(b.try_acquire().is_err());
    clock.advance(Duration::from_secs(1));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let trials: Vec<Permit> = (0..3).map(|_| b.try_acquire().expect("trial")).collect();
    assert!(b.try_acquire().is_err(), "a fourth trial is refused");
    let mut trials = trials.into_iter();
    trials.next().expect("t").record(Outcome::Success);
    trials.next().expect("t").record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    trials.next().expect("t").record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::Closed);
    // the window starts fresh: four failures do not open it
    for _ in 0..4 {
        record(&b, Outcome::Failure);
    }
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn one_failed_trial_reopens_for_another_full_period() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..5 {
        record(&b, Outcome::Failure);
    }
    clock.advance(Duration::from_secs(30));
    let t1 = b.try_acquire().expect("trial");
    let t2 = b.try_acquire().expect("trial");
    t1.record(Outcome::Success);
    t2.record(Outcome::Failure);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        b.try_acquire().expect_err("open").retry_after,
        Duration::from_secs(30)
    );
}

#[test]
fn a_dropped_trial_frees_its_slot_and_stale_results_are_ignored() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    let straggler = b.try_acquire().expect("admitted while closed");
    for _ in 0..5 {
        record(&b, Outcome::Failure);
    }
    clock.advance(Duration::from_secs(30));
    // the call admitted before the breaker opened reports success late: ignored
    straggler.record(Outcome::Success);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let dropped = b.try_acquire().expect("trial");
    let _t2 = b.try_acquire().expect("trial");
    let _t3 = b.try_acquire().expect("trial");
    assert!(b.try_acquire().is_err());
    drop(dropped);
    assert!(
        b.try_acquire().is_ok(),
        "the dropped trial's slot is free again"
    );
}

#[test]
fn clones_share_state_and_events_and_gauge_follow_transitions() {
    let clock = ManualClock::new();
    let gauge = prometheus::IntGauge::new("g", "g").expect("gauge");
    let b = breaker(&clock).with_gauge(gauge.clone());
    let mut events = b.subscribe();
    let clone = b.clone();
    for _ in 0..5 {
        record(&clone, Outcome::Failure);
    }
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(gauge.get(), 1);
    let ev = events.try_recv().expect("event");
    assert_eq!((ev.from, ev.to), (BreakerState::Closed, BreakerState::Open));
    assert_eq!(ev.reason, "5 consecutive failures");
    clock.advance(Duration::from_secs(30));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(gauge.get(), 2);
}

#[test]
fn ignored_outcomes_do_not_count() {
    let clock = ManualClock::new();
    let b = breaker(&clock);
    for _ in 0..4 {
        record(&b, Outcome::Failure);
    }
    record(&b, Outcome::Ignored);
    record(&b, Outcome::Failure);
    assert_eq!(b.state(), BreakerState::Open);
}

#[tokio::test]
async fn as_a_tower_layer_it_refuses_without_calling_the_inner_service() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Layer, Service, ServiceExt};

    let clock = ManualClock::new();
    let b = breaker(&clock);
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = tower::service_fn(move |fail: bool| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { if fail { Err("boom") } else { Ok("ok") } }
    });
    let mut svc = CircuitBreakerLayer::new(b.clone(), ErrorsAreFailures).layer(inner);
    for _ in 0..5 {
        let r = svc.ready().await.expect("ready").call(true).await;
        assert!(matches!(r, Err(BreakerError::Inner("boom"))));
    }
    let r = svc.ready().await.expect("ready").call(false).await;
    assert!(matches!(r, Err(BreakerError::Open(_))));
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}
