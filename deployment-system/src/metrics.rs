//! Kaizen for rollouts: docs/API.md's metric names, per-stage durations, time to roll back, and the
//! recent rollbacks Andon turns RED on.

use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge};
use tai_core::clock::SharedClock;
use tai_core::kaizen::{Kaizen, RollingWindow};

use crate::rollout::model::{Cause, Deployment, Status};

const DURATION_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// The deployment metrics.
#[derive(Debug)]
pub struct DeploymentMetrics {
    success: IntCounter,
    rollback: IntCounterVec,
    failed: IntCounter,
    duration: Histogram,
    stage: HistogramVec,
    rollback_seconds: Histogram,
    in_progress: IntGauge,
    recent: RollingWindow,
}

impl DeploymentMetrics {
    /// Registers the metrics in `kaizen`'s registry.
    pub fn new(kaizen: &Kaizen, clock: SharedClock) -> Self {
        let causes: Vec<&str> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        Self {
            success: kaizen.counter(
                "deployment_success_total",
                "Deployments that reached every region",
            ),
            // every cause exported at 0 from the start: a dashboard shows 0, not no data
            rollback: kaizen.counter_vec(
                "deployment_rollback_total",
                "Regions seen back on their stable version, by cause (gate, rollback_all, abort)",
                "cause",
                &causes,
            ),
            failed: kaizen.counter(
                "deployment_failed_total",
                "Deployments that ended FAILED or ABORTED",
            ),
            duration: kaizen.histogram(
                "deployment_duration_seconds",
                "Time from acceptance to the end of a deployment",
                DURATION_BUCKETS,
            ),
            stage: kaizen.histogram_vec(
                "deployment_stage_duration_seconds",
                "Time a stage took, bake and analysis",
                DURATION_BUCKETS,
                "stage",
            ),
            rollback_seconds: kaizen.histogram(
                "deployment_rollback_duration_seconds",
                "Time from the failing measurement (or the abort) to the platform seen serving stable",
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0],
            ),
            in_progress: kaizen.gauge("deployments_in_progress", "Deployments not yet ended"),
            recent: RollingWindow::new(Duration::from_secs(300), 30, clock),
        }
    }

    /// How many deployments have not ended.
    pub fn set_in_progress(&self, n: usize) {
        self.in_progress.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A stage completed.
    pub fn stage(&self, stage: &str, secs: f64) {
        self.stage.with_label_values(&[stage]).observe(secs);
    }

    /// A region is seen back on stable, `secs` after the decision.
    pub fn rolled_back(&self, cause: Cause, secs: f64) {
        self.rollback.with_label_values(&[cause.as_str()]).inc();
        self.rollback_seconds.observe(secs);
        self.recent.tag("rollback");
    }

    /// A deployment ended.
    pub fn ended(&self, status: Status, d: &Deployment) {
        self.duration.observe(d.duration_secs);
        match status {
            Status::Success => self.success.inc(),
            Status::Failed | Status::Aborted => {
                self.failed.inc();
                self.recent.tag("failed");
            }
            _ => {}
        }
    }

    /// Rollbacks and failures in the last five minutes.
    pub fn recent_trouble(&self) -> f64 {
        let s = self.recent.stats();
        (s.tags.get("rollback").copied().unwrap_or(0) + s.tags.get("failed").copied().unwrap_or(0))
            as f64
    }
}
