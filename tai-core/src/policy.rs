//! Policy: the pure decision in the Signal -> Policy -> Action flow.
//!
//! A [`Policy`] looks at a validated signal together with the facts gathered for it (velocity
//! counts, blocklist membership, fleet state...) and returns a [`Verdict`]: allow, review or deny,
//! with every [`Reason`] that contributed. It performs no I/O, so the same inputs always give the
//! same verdict; that is what makes decisions testable and explainable to the people they affect.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// What a policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Go ahead only after a person or a slower check looked at it.
    Review,
    /// Stop.
    Deny,
}

impl Decision {
    /// The lower-case name used in metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Review => "review",
            Decision::Deny => "deny",
        }
    }
}

/// One rule that fired, with the value it saw and the line it compared against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// The rule's id, e.g. `velocity`.
    pub rule: String,
    /// What was observed, as people read it, e.g. `6 attempts in 60s`.
    pub observed: String,
    /// The threshold that was crossed, e.g. `> 5`.
    pub threshold: String,
    /// How much this rule added to the score (zero for rules that decide without a score).
    #[serde(with = "rust_decimal::serde::float")]
    pub weight: Decimal,
}

impl Reason {
    /// A reason with a weight.
    pub fn new(
        rule: impl Into<String>,
        observed: impl Into<String>,
        threshold: impl Into<String>,
        weight: Decimal,
    ) -> Self {
        Self {
            rule: rule.into(),
            observed: observed.into(),
            threshold: threshold.into(),
            weight,
        }
    }
}

/// A decision with its score and the reasons behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// The summed weight of the reasons, capped by the policy (exact decimal, never a float sum).
    #[serde(with = "rust_decimal::serde::float")]
    pub score: Decimal,
    /// Every rule that fired, in evaluation order.
    pub reasons: Vec<Reason>,
}

impl Verdict {
    /// An allow verdict with no reasons.
    pub fn allow() -> Self {
        Self {
            decision: Decision::Allow,
            score: Decimal::ZERO,
            reasons: Vec::new(),
        }
    }

    /// Builds a verdict from reasons by summing their weights (capped at `cap`) and comparing the
    /// score with the review and deny thresholds (each inclusive: a score equal to the deny
    /// threshold denies).
    pub fn scored(
        reasons: Vec<Reason>,
        cap: Decimal,
        review_at: Decimal,
        deny_at: Decimal,
    ) -> Self {
        let sum: Decimal = reasons.iter().map(|r| r.weight).sum();
        let score = sum.min(cap);
        let decision = if score >= deny_at {
            Decision::Deny
        } else if score >= review_at {
            Decision::Review
        } else {
            Decision::Allow
        };
        Self {
            decision,
            score,
            reasons,
        }
    }

    /// Whether a rule with this id fired.
    pub fn fired(&self, rule: &str) -> bool {
        self.reasons.iter().any(|r| r.rule == rule)
    }
}

/// A pure decision over a signal and the facts gathered for it.
pub trait Policy<S, F>: Send + Sync {
    /// Decides. Must not perform I/O.
    fn evaluate(&self, signal: &S, facts: &F) -> Verdict;
}

impl<S, F, P: Policy<S, F> + ?Sized> Policy<S, F> for std::sync::Arc<P> {
    fn evaluate(&self, signal: &S, facts: &F) -> Verdict {
        (**self).evaluate(signal, facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(s: &str) -> Decimal {
        s.parse().expect("decimal literal")
    }

    #[test]
    fn scores_sum_exactly_and_cap() {
        let reasons = vec![
            Reason::new("a", "x", "y", dec("0.1")),
            Reason::new("b", "x", "y", dec("0.2")),
        ];
        let v = Verdict::scored(reasons, dec("1.0"), dec("0.3"), dec("0.5"));
        // 0.1 + 0.2 is exactly 0.3 here, unlike in f64, so the review threshold is met
        assert_eq!(v.score, dec("0.3"));
        assert_eq!(v.decision, Decision::Review);

        let reasons = vec![
            Reason::new("a", "x", "y", dec("1.0")),
            Reason::new("b", "x", "y", dec("0.5")),
        ];
        let v = Verdict::scored(reasons, dec("1.0"), dec("0.3"), dec("0.5"));
        assert_eq!(v.score, dec("1.0"));
        assert_eq!(v.decision, Decision::Deny);
        assert!(v.fired("b"));
        assert!(!v.fired("c"));
    }

    #[test]
    fn deny_threshold_is_inclusive() {
        let v = Verdict::scored(
            vec![Reason::new("velocity", "6", "> 5", dec("0.5"))],
            dec("1.0"),
            dec("0.5"),
            dec("0.5"),
        );
        assert_eq!(v.decision, Decision::Deny);
        let v = Verdict::scored(
            vec![Reason::new("amount", "6000", "> 5000", dec("0.3"))],
            dec("1.0"),
            dec("0.5"),
            dec("0.5"),
        );
        assert_eq!(v.decision, Decision::Allow);
    }
}
