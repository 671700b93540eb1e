//! The Signal -> Policy -> Action flow, as one reusable pipeline.
//!
//! A request becomes a validated **signal** at the edge (parsing is the signal's job: bad input
//! never gets this far). The pipeline then runs three steps, each in its own tracing span and
//! each timed into `tai_pipeline_step_duration_seconds{pipeline,step}`:
//!
//! 1. **facts** — [`FactSource::gather`] does the I/O a decision needs (counters, lists, state);
//! 2. **policy** — [`Policy::evaluate`] decides over signal and facts, purely; the verdict is
//!    counted in `tai_policy_verdicts_total{pipeline,decision}` and its score and reasons are
//!    recorded on the span;
//! 3. **action** — [`Action::act`] carries the verdict out (charge, roll out, or record the
//!    refusal), since a deny is an outcome to store and answer too.
//!
//! The steps are generic and statically dispatched: a service wires its own three parts once.

use std::future::Future;
use std::time::Instant;

use tracing::Instrument;

use crate::kaizen::Kaizen;
use crate::policy::{Decision, Policy, Verdict};

/// Gathers the facts a policy needs; this is where the I/O before a decision lives.
pub trait FactSource<S>: Send + Sync {
    /// The facts.
    type Facts: Send;
    /// What gathering can fail with.
    type Error: Send;
    /// Gathers facts for `signal`.
    fn gather(&self, signal: &S) -> impl Future<Output = Result<Self::Facts, Self::Error>> + Send;
}

/// What an action acts on: the signal, the facts gathered for it, and the policy's verdict.
#[derive(Debug)]
pub struct Decided<'a, S, F> {
    /// The request.
    pub signal: &'a S,
    /// The facts the policy decided on.
    pub facts: &'a F,
    /// The policy's verdict.
    pub verdict: &'a Verdict,
}

impl<S, F> Clone for Decided<'_, S, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S, F> Copy for Decided<'_, S, F> {}

/// Carries a verdict out.
pub trait Action<S, F>: Send + Sync {
    /// What the action produces (e.g. the stored record).
    type Output: Send;
    /// What it can fail with.
    type Error: Send;
    /// Acts on a decided signal.
    fn act(
        &self,
        decided: Decided<'_, S, F>,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;
}

/// Which step failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError<G, A> {
    /// Gathering facts failed; nothing was decided or done.
    #[error("gathering facts failed: {0}")]
    Facts(G),
    /// The action failed after a verdict was reached.
    #[error("action failed: {0}")]
    Action(A),
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome<O> {
    /// The policy's verdict.
    pub verdict: Verdict,
    /// The action's output.
    pub output: O,
}

/// A named pipeline: facts, policy, action.
#[derive(Debug, Clone)]
pub struct Pipeline<G, P, A> {
    name: &'static str,
    facts: G,
    policy: P,
    action: A,
    kaizen: Kaizen,
}

impl<G, P, A> Pipeline<G, P, A> {
    /// Wires the three steps; `name` labels spans and metrics.
    pub fn new(name: &'static str, facts: G, policy: P, action: A, kaizen: Kaizen) -> Self {
        // every decision's counter exists from the start, so a dashboard shows 0, not no data
        for decision in [Decision::Allow, Decision::Review, Decision::Deny] {
            kaizen.count_verdicts(name, decision.as_str(), 0);
        }
        Self {
            name,
            facts,
            policy,
            action,
            kaizen,
        }
    }

    /// The policy, e.g. to explain a decision without acting on it.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Runs the three steps for `signal`.
    pub async fn run<S>(
        &self,
        signal: &S,
    ) -> Result<Outcome<A::Output>, PipelineError<G::Error, A::Error>>
    where
        S: Sync,
        G: FactSource<S>,
        P: Policy<S, G::Facts>,
        A: Action<S, G::Facts>,
    {
        let started = Instant::now();
        let facts = self
            .facts
            .gather(signal)
            .instrument(tracing::info_span!("facts", pipeline = self.name))
            .await
            .map_err(PipelineError::Facts)?;
        self.kaizen
            .record_step(self.name, "facts", started.elapsed());

        let started = Instant::now();
        let verdict = {
            let span = tracing::info_span!(
                "policy",
                pipeline = self.name,
                decision = tracing::field::Empty,
                score = tracing::field::Empty,
                reasons = tracing::field::Empty,
            );
            let _guard = span.enter();
            let verdict = self.policy.evaluate(signal, &facts);
            span.record("decision", verdict.decision.as_str());
            span.record("score", verdict.score.to_string().as_str());
            let reasons: Vec<String> = verdict
                .reasons
                .iter()
                .map(|r| format!("{}: {} ({})", r.rule, r.observed, r.threshold))
                .collect();
            span.record("reasons", reasons.join("; ").as_str());
            verdict
        };
        self.kaizen
            .record_step(self.name, "policy", started.elapsed());
        self.kaizen
            .record_verdict(self.name, verdict.decision.as_str());

        let started = Instant::now();
        let output = self
            .action
            .act(Decided {
                signal,
                facts: &facts,
                verdict: &verdict,
            })
            .instrument(tracing::info_span!("action", pipeline = self.name))
            .await
            .map_err(PipelineError::Action)?;
        self.kaizen
            .record_step(self.name, "action", started.elapsed());
        Ok(Outcome { verdict, output })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rust_decimal::Decimal;

    use super::*;
    use crate::clock::ManualClock;
    use crate::policy::Reason;

    struct Limit(u32);
    struct CountFacts;
    impl FactSource<u32> for CountFacts {
        type Facts = u32;
        type Error = String;
        async fn gather(&self, s: &u32) -> Result<u32, String> {
            if *s == 13 {
                Err("unlucky".into())
            } else {
                Ok(s * 2)
            }
        }
    }
    impl Policy<u32, u32> for Limit {
        fn evaluate(&self, _s: &u32, doubled: &u32) -> Verdict {
            if *doubled > self.0 {
                Verdict {
                    decision: Decision::Deny,
                    score: Decimal::ONE,
                    reasons: vec![Reason::new(
                        "limit",
                        doubled.to_string(),
                        format!("> {}", self.0),
                        Decimal::ONE,
                    )],
                }
            } else {
                Verdict::allow()
            }
        }
    }
    struct Record(Mutex<Vec<(u32, Decision)>>);
    impl Action<u32, u32> for Record {
        type Output = usize;
        type Error = String;
        async fn act(&self, d: Decided<'_, u32, u32>) -> Result<usize, String> {
            let mut log = self.0.lock().map_err(|e| e.to_string())?;
            log.push((*d.signal, d.verdict.decision));
            Ok(log.len())
        }
    }

    #[tokio::test]
    async fn runs_facts_then_policy_then_action_and_counts_verdicts() {
        let kaizen = Kaizen::new("t", ManualClock::new().shared());
        let p = Pipeline::new(
            "demo",
            CountFacts,
            Limit(10),
            Record(Mutex::new(Vec::new())),
            kaizen.clone(),
        );
        let out = p.run(&3).await.expect("ok");
        assert_eq!(out.verdict.decision, Decision::Allow);
        let out = p.run(&6).await.expect("ok");
        assert_eq!(out.verdict.decision, Decision::Deny);
        assert_eq!(out.verdict.reasons[0].observed, "12");
        assert_eq!(out.output, 2, "the action ran for the deny too");
        assert!(matches!(p.run(&13).await, Err(PipelineError::Facts(_))));
        let text = kaizen.encode();
        assert!(text.contains(r#"tai_policy_verdicts_total{decision="deny",pipeline="demo"} 1"#));
        assert!(text.contains(
            r#"tai_pipeline_step_duration_seconds_count{pipeline="demo",step="action"} 2"#
        ));
    }
}
