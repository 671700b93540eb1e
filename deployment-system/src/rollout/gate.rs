//! The gate: a tai-core [`Policy`] over one measurement and the counts of the stage so far.
//!
//! Each measurement is classed as Argo Rollouts classes them: successful, failed (a figure over
//! its threshold), inconclusive (no data, or fewer requests than `min_samples`), or an error
//! (the provider could not measure). The decision is `allow` (pass), `review` (hold the stage;
//! or pause it for a person once inconclusive measurements pass `inconclusive_limit` with
//! `on_inconclusive: pause`) or `deny` (fail the stage): failed measurements past
//! `failure_limit`, errors in a row past `consecutive_error_limit`, inconclusive ones past
//! `inconclusive_limit` with `on_inconclusive: rollback`, or a configuration that can never
//! measure. Every reason is typed ([`Rule`]) and says what was seen against what limit.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tai_core::policy::{Decision, Policy, Reason, Verdict};

use crate::analysis::{Figures, Measurement};
use crate::signal::{AnalysisSpec, OnInconclusive};

/// The counts of one stage's measurements (reset when a stage starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Failed measurements.
    pub failures: u32,
    /// Measurement errors since the last measurement that was not one.
    pub consecutive_errors: u32,
    /// Inconclusive measurements.
    pub inconclusive: u32,
}

/// How one measurement is classed (the `result` of an analysis record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Within every threshold.
    Pass,
    /// Over a threshold.
    Fail,
    /// No data or too few samples.
    Inconclusive,
    /// The provider could not measure.
    Error,
}

/// What the stage does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Carry on; the stage may complete at its deadline.
    Pass,
    /// Hold the stage: its bake does not end on this measurement.
    Hold,
    /// Pause the deployment for a person.
    Pause,
    /// Fail the stage: roll the region back.
    Fail,
}

/// The rules a reason names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The error rate is over `max_error_rate`.
    ErrorRate,
    /// The p99 latency is over `max_p99_ms`.
    P99,
    /// Fewer requests than `min_samples`.
    TooFewSamples,
    /// A figure had no data.
    NoData,
    /// The provider could not measure.
    MeasurementError,
    /// The provider can never measure as configured.
    ConfigurationError,
    /// Failed measurements past `failure_limit`.
    FailureLimit,
    /// Errors in a row past `consecutive_error_limit`.
    ConsecutiveErrorLimit,
    /// Inconclusive measurements past `inconclusive_limit`.
    InconclusiveLimit,
}

impl Rule {
    /// The rule's id in verdicts and events.
    pub fn id(self) -> &'static str {
        match self {
            Rule::ErrorRate => "error_rate",
            Rule::P99 => "p99",
            Rule::TooFewSamples => "too_few_samples",
            Rule::NoData => "no_data",
            Rule::MeasurementError => "measurement_error",
            Rule::ConfigurationError => "configuration_error",
            Rule::FailureLimit => "failure_limit",
            Rule::ConsecutiveErrorLimit => "consecutive_error_limit",
            Rule::InconclusiveLimit => "inconclusive_limit",
        }
    }
}

/// The gate's judgement of one measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// How the measurement is classed.
    pub class: Class,
    /// What the stage does.
    pub action: Action,
    /// The stage's counts including this measurement.
    pub counts: Counts,
    /// The verdict: allow = pass, review = hold or pause, deny = fail.
    pub verdict: Verdict,
    /// The reasons in words, joined.
    pub detail: String,
}

/// The facts the gate decides over.
#[derive(Debug, Clone, PartialEq)]
pub struct GateFacts {
    /// This measurement.
    pub measurement: Measurement,
    /// The stage's counts before it.
    pub counts: Counts,
}

/// The gate policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gate;

impl Policy<AnalysisSpec, GateFacts> for Gate {
    fn evaluate(&self, spec: &AnalysisSpec, facts: &GateFacts) -> Verdict {
        judge(spec, facts.counts, &facts.measurement).verdict
    }
}

fn reason(rule: Rule, observed: String, threshold: String) -> Reason {
    Reason::new(rule.id(), observed, threshold, Decimal::ONE)
}

/// Judges `m` under `spec`, given the stage's `counts` so far.
pub fn judge(spec: &AnalysisSpec, counts: Counts, m: &Measurement) -> Judgement {
    let mut counts = counts;
    let mut reasons = Vec::new();
    let (class, action) = match m {
        Measurement::Misconfigured(why) => {
            reasons.push(reason(
                Rule::ConfigurationError,
                why.clone(),
                "a measurable configuration".into(),
            ));
            (Class::Error, Action::Fail)
        }
        Measurement::Error(why) | Measurement::BadAnswer(why) => {
            counts.consecutive_errors += 1;
            reasons.push(reason(
                Rule::MeasurementError,
                why.clone(),
                "an answer".into(),
            ));
            if counts.consecutive_errors > spec.consecutive_error_limit {
                reasons.push(reason(
                    Rule::ConsecutiveErrorLimit,
                    format!("{} measurement errors in a row", counts.consecutive_errors),
                    format!("<= {}", spec.consecutive_error_limit),
                ));
                (Class::Error, Action::Fail)
            } else {
                (Class::Error, Action::Hold)
            }
        }
        Measurement::Figures(f) => {
            counts.consecutive_errors = 0;
            judge_figures(spec, &mut counts, f, &mut reasons)
        }
    };
    let decision = match action {
        Action::Pass => Decision::Allow,
        Action::Hold | Action::Pause => Decision::Review,
        Action::Fail => Decision::Deny,
    };
    let detail = if reasons.is_empty() {
        match m {
            Measurement::Figures(f) => format!(
                "error rate {:.4} <= {}, p99 {:.1} ms <= {} ms",
                f.error_rate.unwrap_or(0.0),
                spec.max_error_rate,
                f.p99_ms.unwrap_or(0.0),
                spec.max_p99_ms
            ),
            _ => String::new(),
        }
    } else {
        reasons
            .iter()
            .map(|r| format!("{} ({})", r.observed, r.threshold))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Judgement {
        class,
        action,
        counts,
        verdict: Verdict {
            decision,
            score: Decimal::from(reasons.len()),
            reasons,
        },
        detail,
    }
}

fn judge_figures(
    spec: &AnalysisSpec,
    counts: &mut Counts,
    f: &Figures,
    reasons: &mut Vec<Reason>,
) -> (Class, Action) {
    let inconclusive = match (f.samples, f.error_rate, f.p99_ms) {
        (Some(n), _, _) if n < spec.min_samples => Some(reason(
            Rule::TooFewSamples,
            format!("too few samples ({n} < {})", spec.min_samples),
            format!(">= {} requests", spec.min_samples),
        )),
        (_, None, _) => Some(reason(
            Rule::NoData,
            "no data for the error rate".into(),
            "a value".into(),
        )),
        (_, _, None) => Some(reason(
            Rule::NoData,
            "no data for the p99 latency".into(),
            "a value".into(),
        )),
        _ => None,
    };
    if let Some(r) = inconclusive {
        reasons.push(r);
        counts.inconclusive += 1;
        if counts.inconclusive > spec.inconclusive_limit {
            reasons.push(reason(
                Rule::InconclusiveLimit,
                format!("{} inconclusive measurements", counts.inconclusive),
                format!("<= {}", spec.inconclusive_limit),
            ));
            let action = match spec.on_inconclusive {
                OnInconclusive::Rollback => Action::Fail,
                OnInconclusive::Pause => Action::Pause,
            };
            return (Class::Inconclusive, action);
        }
        return (Class::Inconclusive, Action::Hold);
    }
    let (e, p) = (f.error_rate.unwrap_or(0.0), f.p99_ms.unwrap_or(0.0));
    if e > spec.max_error_rate {
        reasons.push(reason(
            Rule::ErrorRate,
            format!("error rate {e:.4}"),
            format!("<= {}", spec.max_error_rate),
        ));
    }
    if p > spec.max_p99_ms {
        reasons.push(reason(
            Rule::P99,
            format!("p99 {p:.1} ms"),
            format!("<= {} ms", spec.max_p99_ms),
        ));
    }
    if reasons.is_empty() {
        return (Class::Pass, Action::Pass);
    }
    counts.failures += 1;
    if counts.failures > spec.failure_limit {
        reasons.push(reason(
            Rule::FailureLimit,
            format!("{} failed measurements", counts.failures),
            format!("<= {}", spec.failure_limit),
        ));
        (Class::Fail, Action::Fail)
    } else {
        (Class::Fail, Action::Hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Defaults;

    fn spec() -> AnalysisSpec {
        Defaults::default().analysis
    }

    fn figures(e: f64, p: f64, n: Option<u64>) -> Measurement {
        Measurement::Figures(Figures {
            error_rate: Some(e),
            p99_ms: Some(p),
            samples: n,
        })
    }

    #[test]
    fn within_thresholds_passes_and_over_them_fails_at_once_by_default() {
        let s = spec();
        let j = judge(&s, Counts::default(), &figures(0.01, 100.0, Some(500)));
        assert_eq!((j.class, j.action), (Class::Pass, Action::Pass));
        assert_eq!(j.verdict.decision, Decision::Allow);
        let j = judge(&s, Counts::default(), &figures(0.2, 100.0, Some(500)));
        assert_eq!((j.class, j.action), (Class::Fail, Action::Fail));
        assert_eq!(j.verdict.decision, Decision::Deny);
        assert!(j.verdict.fired("error_rate") && j.verdict.fired("failure_limit"));
        let j = judge(&s, Counts::default(), &figures(0.0, 5000.0, None));
        assert!(j.verdict.fired("p99"), "{}", j.detail);
    }

    #[test]
    fn a_failure_limit_tolerates_that_many_failures() {
        let s = AnalysisSpec {
            failure_limit: 2,
            ..spec()
        };
        let mut c = Counts::default();
        for _ in 0..2 {
            let j = judge(&s, c, &figures(0.2, 1.0, None));
            assert_eq!((j.class, j.action), (Class::Fail, Action::Hold));
            c = j.counts;
        }
        assert_eq!(judge(&s, c, &figures(0.2, 1.0, None)).action, Action::Fail);
    }

    #[test]
    fn errors_count_in_a_row_and_a_good_measurement_resets_them() {
        let s = spec();
        let err = Measurement::Error("probe answered 503".into());
        let mut c = Counts::default();
        for i in 1..=4 {
            let j = judge(&s, c, &err);
            assert_eq!(
                (j.class, j.action, j.verdict.decision),
                (Class::Error, Action::Hold, Decision::Review),
                "error {i} is within the default limit of 4"
            );
            c = j.counts;
        }
        let recovered = judge(&s, c, &figures(0.0, 10.0, None));
        assert_eq!(recovered.action, Action::Pass);
        assert_eq!(recovered.counts.consecutive_errors, 0);
        for _ in 0..4 {
            c = judge(&s, c, &err).counts;
        }
        let j = judge(&s, c, &err);
        assert_eq!(j.action, Action::Fail, "the fifth error in a row fails");
        assert!(j.verdict.fired("consecutive_error_limit"));
    }

    #[test]
    fn too_few_samples_or_no_data_is_inconclusive_never_a_pass_or_a_failure() {
        let s = spec();
        let j = judge(&s, Counts::default(), &figures(0.0, 10.0, Some(3)));
        assert_eq!((j.class, j.action), (Class::Inconclusive, Action::Hold));
        assert!(
            j.detail.contains("too few samples (3 < 50)"),
            "{}",
            j.detail
        );
        let none = Measurement::Figures(Figures {
            error_rate: None,
            p99_ms: Some(1.0),
            samples: Some(100),
        });
        let j = judge(&s, Counts::default(), &none);
        assert_eq!(j.class, Class::Inconclusive);
        assert!(j.verdict.fired("no_data"));
        // a probe's figures carry no sample count: min_samples does not apply
        assert_eq!(
            judge(&s, Counts::default(), &figures(0.0, 1.0, None)).class,
            Class::Pass
        );
    }

    #[test]
    fn past_the_inconclusive_limit_the_stage_fails_or_pauses_as_asked() {
        for (on, expected) in [
            (OnInconclusive::Rollback, Action::Fail),
            (OnInconclusive::Pause, Action::Pause),
        ] {
            let s = AnalysisSpec {
                inconclusive_limit: 2,
                on_inconclusive: on,
                ..spec()
            };
            let mut c = Counts::default();
            for _ in 0..2 {
                let j = judge(&s, c, &figures(0.0, 1.0, Some(0)));
                assert_eq!(j.action, Action::Hold);
                c = j.counts;
            }
            let j = judge(&s, c, &figures(0.0, 1.0, Some(0)));
            assert_eq!(j.action, expected);
            assert!(j.detail.contains("too few samples (0 < 50)"));
            assert!(j.verdict.fired("inconclusive_limit"));
        }
    }

    #[test]
    fn a_configuration_error_fails_and_says_so() {
        let j = judge(
            &spec(),
            Counts::default(),
            &Measurement::Misconfigured("Prometheus refused the query: parse error".into()),
        );
        assert_eq!(j.action, Action::Fail);
        assert!(j.verdict.fired("configuration_error"));
        assert_eq!(
            Gate.evaluate(
                &spec(),
                &GateFacts {
                    measurement: Measurement::Misconfigured("x".into()),
                    counts: Counts::default()
                }
            )
            .decision,
            Decision::Deny
        );
    }
}
