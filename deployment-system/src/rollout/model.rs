//! The persisted shape of a deployment: what `GET /deploy/{id}` returns and what is stored
//! before every transition takes effect. Its transitions are in [`super::transitions`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use serde_json::{Value, json};

use super::gate::{Class, Counts};
use crate::signal::{AnalysisSpec, DeployRequest, OnRegionFailure, StageSpec};

/// A deployment's status (docs/API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Queued behind another rollout in a region.
    Pending,
    /// Rolling out.
    InProgress,
    /// A gate failed; traffic is going back to stable (not yet observed on the platform).
    RollingBack,
    /// An operator aborted; traffic is going back to stable (not yet observed).
    Aborting,
    /// Every region on the new version.
    Success,
    /// A gate failed and the failing region (or every region) went back to stable.
    RolledBack,
    /// Ended with some regions rolled back (`on_region_failure: continue`).
    Failed,
    /// Stopped by an operator; touched regions went back to stable.
    Aborted,
    /// Refused by the safety checks.
    Rejected,
    /// Queued, never started, and replaced by a later deploy of the same service.
    Superseded,
}

impl Status {
    /// Whether the deployment is over.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Success
                | Status::RolledBack
                | Status::Failed
                | Status::Aborted
                | Status::Rejected
                | Status::Superseded
        )
    }
}

/// One region's rollout status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RegionStatus {
    /// Not started: waiting for its turn or for the region.
    Pending,
    /// Stages running.
    InProgress,
    /// Going back to the stable version (not yet observed on the platform).
    RollingBack,
    /// On the new version at 100%.
    Success,
    /// Back on the stable version.
    RolledBack,
    /// Never started because the deployment stopped.
    Skipped,
    /// Stopped by an operator.
    Aborted,
}

/// Why a region went back to its stable version (the `cause` label of the rollback counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Its own gate failed.
    Gate,
    /// Another region failed with `on_region_failure: rollback_all`.
    RollbackAll,
    /// An operator aborted.
    Abort,
}

impl Cause {
    /// Every cause, for labels exported at zero.
    pub const ALL: [Cause; 3] = [Cause::Gate, Cause::RollbackAll, Cause::Abort];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Gate => "gate",
            Cause::RollbackAll => "rollback_all",
            Cause::Abort => "abort",
        }
    }
}

/// One health measurement and the gate's verdict on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisRecord {
    /// When.
    pub at: DateTime<Utc>,
    /// During which stage.
    pub stage: String,
    /// `sim`, `http` or `prometheus`.
    pub provider: String,
    /// Measured error rate, when measured.
    pub error_rate: Option<f64>,
    /// Measured p99 latency (ms), when measured.
    pub p99_ms: Option<f64>,
    /// Requests the figures cover, for traffic-derived metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    /// The error-rate gate.
    pub max_error_rate: f64,
    /// The latency gate.
    pub max_p99_ms: f64,
    /// `pass`, `fail`, `inconclusive` or `error`.
    pub result: Class,
    /// Why, in words.
    pub detail: String,
}

/// An audit event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub at: DateTime<Utc>,
    /// e.g. `stage_started`, `gate_failed`, `rolled_back`.
    pub kind: String,
    /// The region, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The stage, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The figures and decision behind it.
    pub detail: serde_json::Value,
}

/// One region's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionRollout {
    /// The region.
    pub region: String,
    /// Its status.
    pub status: RegionStatus,
    /// The version to go back to.
    pub stable_version: String,
    /// Stages done here.
    pub stages_completed: Vec<String>,
    /// The stage running now (index into the deployment's stages).
    pub stage_index: usize,
    /// When this region started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the running stage started.
    pub stage_started_at: Option<DateTime<Utc>>,
    /// When the running stage's bake ends (absolute, so a restart resumes it).
    pub stage_deadline: Option<DateTime<Utc>>,
    /// When the next measurement is due.
    pub next_analysis_at: Option<DateTime<Utc>>,
    /// Since when the gate has held the stage (inconclusive, errors, tolerated failures).
    pub inconclusive_since: Option<DateTime<Utc>>,
    /// Whether the platform has been seen serving what this region's state asks for.
    #[serde(default)]
    pub observed: bool,
    /// The running stage's measurement counts.
    #[serde(default)]
    pub counts: Counts,
    /// Why it is going or went back to stable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// When the failing measurement (or the abort) decided the rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<DateTime<Utc>>,
    /// Bake left when paused, in milliseconds.
    pub paused_remaining_ms: Option<u64>,
    /// Place in this region's queue while waiting (1 = next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// Measurements and verdicts.
    pub analysis: Vec<AnalysisRecord>,
}

/// A deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// `dpl_…`.
    pub deployment_id: String,
    /// The service.
    pub service: String,
    /// The new version.
    pub version: String,
    /// The image.
    pub image: String,
    /// Always `canary` for now.
    pub rollout_strategy: String,
    /// The status.
    pub status: Status,
    /// Arrival order, issued by the store (each region's lane is granted in this order).
    pub seq: u64,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds from acceptance to end (or to now, while running).
    pub duration_secs: f64,
    /// `validation` and every stage completed in every region that ran.
    pub stages_completed: Vec<String>,
    /// The stages.
    pub stages: Vec<StageSpec>,
    /// The gates.
    pub analysis: AnalysisSpec,
    /// On a failed region.
    pub on_region_failure: OnRegionFailure,
    /// Index of the region being worked on.
    pub current_region: usize,
    /// Paused by an operator.
    pub paused: bool,
    /// Per region, in rollout order.
    pub regions: Vec<RegionRollout>,
    /// The later deployment that replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
    /// Why it was rejected or how it ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<serde_json::Value>,
    /// The audit trail.
    pub events: Vec<Event>,
}

impl Deployment {
    /// A new deployment of `req`, `PENDING` in every region; `stables` gives the version each
    /// region runs today (the rollback target; refreshed when the region is taken).
    pub fn create(
        req: &DeployRequest,
        id: String,
        seq: u64,
        stables: &[(String, Option<String>)],
        now: DateTime<Utc>,
    ) -> Self {
        let regions = req
            .regions
            .iter()
            .map(|region| RegionRollout {
                region: region.clone(),
                status: RegionStatus::Pending,
                stable_version: stables
                    .iter()
                    .find(|(r, _)| r == region)
                    .and_then(|(_, s)| s.clone())
                    .unwrap_or_default(),
                stages_completed: Vec::new(),
                stage_index: 0,
                started_at: None,
                finished_at: None,
                stage_started_at: None,
                stage_deadline: None,
                next_analysis_at: None,
                inconclusive_since: None,
                observed: false,
                counts: Counts::default(),
                cause: None,
                failed_at: None,
                paused_remaining_ms: None,
                queue_position: None,
                analysis: Vec::new(),
            })
            .collect();
        let mut d = Deployment {
            deployment_id: id,
            service: req.service.clone(),
            version: req.version.clone(),
            image: req.image.clone(),
            rollout_strategy: "canary".into(),
            status: Status::Pending,
            seq,
            created_at: now,
            finished_at: None,
            duration_secs: 0.0,
            stages_completed: Vec::new(),
            stages: req.stages.clone(),
            analysis: req.analysis.clone(),
            on_region_failure: req.on_region_failure,
            current_region: 0,
            paused: false,
            regions,
            superseded_by: None,
            reasons: Vec::new(),
            events: Vec::new(),
        };
        d.event(
            now,
            "validated",
            None,
            None,
            json!({"image": req.image, "checks": "passed"}),
        );
        d.refresh(now);
        d
    }

    /// Refused by the safety checks: `REJECTED`, every region skipped.
    pub fn reject(&mut self, reasons: Vec<Value>, codes: &[&str], now: DateTime<Utc>) {
        self.events.clear();
        self.status = Status::Rejected;
        self.finished_at = Some(now);
        self.reasons = reasons;
        for r in &mut self.regions {
            r.status = RegionStatus::Skipped;
        }
        self.event(now, "rejected", None, None, json!({"reasons": codes}));
        self.refresh(now);
    }

    /// Appends an event.
    pub fn event(
        &mut self,
        at: DateTime<Utc>,
        kind: &str,
        region: Option<&str>,
        stage: Option<&str>,
        detail: serde_json::Value,
    ) {
        self.events.push(Event {
            at,
            kind: kind.to_owned(),
            region: region.map(str::to_owned),
            stage: stage.map(str::to_owned),
            detail,
        });
    }

    /// Recomputes the overall `stages_completed` and duration.
    pub fn refresh(&mut self, now: DateTime<Utc>) {
        let mut done = vec!["validation".to_owned()];
        let ran: Vec<&RegionRollout> = self
            .regions
            .iter()
            .filter(|r| r.started_at.is_some())
            .collect();
        if !ran.is_empty() {
            for stage in &self.stages {
                if ran.iter().all(|r| r.stages_completed.contains(&stage.name)) {
                    done.push(stage.name.clone());
                }
            }
        }
        if self.status == Status::Rejected {
            done.clear();
        }
        self.stages_completed = done;
        let end = self.finished_at.unwrap_or(now);
        self.duration_secs =
            ((end - self.created_at).num_milliseconds().max(0) as f64 / 1000.0 * 10.0).round()
                / 10.0;
    }
}
