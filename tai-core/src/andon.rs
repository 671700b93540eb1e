//! Andon: make trouble visible.
//!
//! Andon turns Kaizen's numbers into one level a person can read from across the room: GREEN,
//! YELLOW or RED. Each [`AndonRule`] compares one named figure (`error_rate`, `p99_ms`,
//! `fraud_rate`, `breaker_open`, ...) against a threshold; the level is the worst rule that fired,
//! and every fired rule is a reason with its observed value. A rule fires when the figure is
//! strictly **above** its threshold: an error rate of exactly 5% against a 5% line stays green.
//!
//! Every change of level is kept in a bounded history, broadcast as an event, logged, and set on
//! the `andon_level` gauge (0 green, 1 yellow, 2 red).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::clock::SharedClock;

/// The board's colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// All well.
    Green,
    /// Something needs attention.
    Yellow,
    /// Stop and look.
    Red,
}

impl Level {
    /// The gauge value: 0 green, 1 yellow, 2 red.
    pub fn as_gauge(self) -> i64 {
        match self {
            Level::Green => 0,
            Level::Yellow => 1,
            Level::Red => 2,
        }
    }
}

/// Named figures Andon reads, e.g. `{"error_rate": 0.01, "p99_ms": 120.0}`.
pub type Figures = BTreeMap<String, f64>;

/// One threshold rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AndonRule {
    /// The rule's id, e.g. `fraud_rate_high`.
    pub id: String,
    /// The figure it reads.
    pub figure: String,
    /// It fires when the figure is strictly above this.
    pub above: f64,
    /// The level it raises the board to.
    pub level: Level,
    /// What it means, for people.
    pub description: String,
}

impl AndonRule {
    /// A rule raising `level` when `figure` > `above`.
    pub fn new(
        id: impl Into<String>,
        figure: impl Into<String>,
        above: f64,
        level: Level,
        description: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            figure: figure.into(),
            above,
            level,
            description: description.into(),
        }
    }
}

/// A fired rule, with what was observed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AndonReason {
    /// The rule's id.
    pub rule: String,
    /// The level it raised.
    pub level: Level,
    /// The figure's name.
    pub figure: String,
    /// Its value.
    pub value: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// A sentence for the board.
    pub message: String,
}

/// A change of level.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    /// When.
    pub at: DateTime<Utc>,
    /// Before.
    pub from: Level,
    /// After.
    pub to: Level,
    /// The reasons in force after the change.
    pub reasons: Vec<AndonReason>,
}

/// What `/andon` returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AndonReport {
    /// The level now.
    pub level: Level,
    /// Why (empty when green).
    pub reasons: Vec<AndonReason>,
    /// Since when the level has been what it is.
    pub since: DateTime<Utc>,
    /// Recent changes, oldest first.
    pub history: Vec<Transition>,
}

/// The board; clones share it.
#[derive(Debug, Clone)]
pub struct Andon {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rules: Vec<AndonRule>,
    clock: SharedClock,
    history_len: usize,
    state: Mutex<State>,
    gauge: prometheus::IntGauge,
    events: broadcast::Sender<Transition>,
}

#[derive(Debug)]
struct State {
    level: Level,
    reasons: Vec<AndonReason>,
    since: DateTime<Utc>,
    history: VecDeque<Transition>,
}

impl Andon {
    /// A board with `rules`, keeping the last 100 transitions; the gauge is registered in
    /// `registry` as `andon_level`.
    pub fn new(rules: Vec<AndonRule>, clock: SharedClock, registry: &prometheus::Registry) -> Self {
        let gauge =
            prometheus::IntGauge::new("andon_level", "Andon level: 0 green, 1 yellow, 2 red")
                .unwrap_or_else(|_| unreachable!("constant metric definition is valid"));
        crate::kaizen::register(registry, gauge.clone());
        let (events, _) = broadcast::channel(64);
        let since = clock.wall();
        Self {
            inner: Arc::new(Inner {
                rules,
                clock,
                history_len: 100,
                state: Mutex::new(State {
                    level: Level::Green,
                    reasons: Vec::new(),
                    since,
                    history: VecDeque::new(),
                }),
                gauge,
                events,
            }),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> &[AndonRule] {
        &self.inner.rules
    }

    /// Subscribes to level changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.inner.events.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Judges `figures` against the rules, records a transition if the level changed, and
    /// returns the report.
    pub fn evaluate(&self, figures: &Figures) -> AndonReport {
        let reasons: Vec<AndonReason> = self
            .inner
            .rules
            .iter()
            .filter_map(|rule| {
                let value = *figures.get(&rule.figure)?;
                (value > rule.above).then(|| AndonReason {
                    rule: rule.id.clone(),
                    level: rule.level,
                    figure: rule.figure.clone(),
                    value,
                    threshold: rule.above,
                    message: format!(
                        "{}: {} = {} > {}",
                        rule.description,
                        rule.figure,
                        round(value),
                        round(rule.above)
                    ),
                })
            })
            .collect();
        let level = reasons
            .iter()
            .map(|r| r.level)
            .max()
            .unwrap_or(Level::Green);
        let mut state = self.lock();
        if level != state.level {
            let transition = Transition {
                at: self.inner.clock.wall(),
                from: state.level,
                to: level,
                reasons: reasons.clone(),
            };
            match level {
                Level::Green => tracing::info!(from = ?state.level, "andon back to GREEN"),
                _ => {
                    tracing::warn!(from = ?state.level, to = ?level, reasons = ?reasons.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(), "andon level changed")
                }
            }
            state.level = level;
            state.since = transition.at;
            state.history.push_back(transition.clone());
            while state.history.len() > self.inner.history_len {
                state.history.pop_front();
            }
            self.inner.gauge.set(level.as_gauge());
            let _ = self.inner.events.send(transition);
        }
        state.reasons = reasons;
        AndonReport {
            level: state.level,
            reasons: state.reasons.clone(),
            since: state.since,
            history: state.history.iter().cloned().collect(),
        }
    }

    /// The last evaluated report, without re-evaluating.
    pub fn report(&self) -> AndonReport {
        let state = self.lock();
        AndonReport {
            level: state.level,
            reasons: state.reasons.clone(),
            since: state.since,
            history: state.history.iter().cloned().collect(),
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn board() -> (Andon, prometheus::Registry) {
        let registry = prometheus::Registry::new();
        let rules = vec![
            AndonRule::new("errors", "error_rate", 0.05, Level::Red, "error rate"),
            AndonRule::new("slow", "p99_ms", 5000.0, Level::Yellow, "p99 latency"),
        ];
        (
            Andon::new(rules, ManualClock::new().shared(), &registry),
            registry,
        )
    }

    fn figures(error_rate: f64, p99: f64) -> Figures {
        Figures::from([("error_rate".into(), error_rate), ("p99_ms".into(), p99)])
    }

    #[test]
    fn changes_level_exactly_at_thresholds() {
        let (andon, registry) = board();
        assert_eq!(andon.evaluate(&figures(0.05, 5000.0)).level, Level::Green);
        let r = andon.evaluate(&figures(0.05, 5000.1));
        assert_eq!(r.level, Level::Yellow);
        assert_eq!(r.reasons[0].rule, "slow");
        let r = andon.evaluate(&figures(0.0501, 5000.1));
        assert_eq!(r.level, Level::Red, "the worst rule wins");
        assert_eq!(r.reasons.len(), 2);
        assert!(crate::kaizen::encode(&registry).contains("andon_level 2"));
        let r = andon.evaluate(&figures(0.0, 1.0));
        assert_eq!(r.level, Level::Green);
        assert!(r.reasons.is_empty());
        let levels: Vec<(Level, Level)> = r.history.iter().map(|t| (t.from, t.to)).collect();
        assert_eq!(
            levels,
            vec![
                (Level::Green, Level::Yellow),
                (Level::Yellow, Level::Red),
                (Level::Red, Level::Green)
            ]
        );
    }

    #[test]
    fn missing_figures_do_not_fire_and_history_is_bounded() {
        let (andon, _r) = board();
        assert_eq!(andon.evaluate(&Figures::new()).level, Level::Green);
        let mut events = andon.subscribe();
        andon.evaluate(&figures(1.0, 0.0));
        assert_eq!(events.try_recv().expect("event").to, Level::Red);
        for i in 0..150 {
            let e = if i % 2 == 0 { 1.0 } else { 0.0 };
            andon.evaluate(&figures(e, 0.0));
        }
        assert_eq!(andon.report().history.len(), 100);
    }
}
