//! Every change of a deployment, as a method taking `now` and doing no I/O.
//!
//! The controller decides when to call them (a lane granted, traffic observed, a measurement
//! judged, an operator command) and stores the result before acting on it. Traffic follows the
//! state ([`Deployment::desired`]); a region that goes back to stable stays `ROLLING_BACK`, and
//! the deployment `ROLLING_BACK` or `ABORTING`, until the platform is seen serving the stable
//! version ([`Deployment::observed`]), so the record never claims a rollback the traffic has not
//! made.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::gate::{Action, Counts, Judgement};
use super::model::{AnalysisRecord, Cause, Deployment, RegionStatus, Status};
use crate::analysis::Figures;
use crate::fleet::TrafficState;
use crate::signal::OnRegionFailure;

/// What a transition did that the controller reports (metrics, Andon).
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A stage completed in `secs`.
    StageCompleted {
        /// The stage.
        stage: String,
        /// How long it took.
        secs: f64,
    },
    /// A region is back on stable, `secs` after the failing measurement or the abort.
    RolledBack {
        /// Why.
        cause: Cause,
        /// From the decision to the observed rollback.
        secs: f64,
    },
    /// The deployment ended.
    Ended(Status),
}

pub(super) fn ms(secs: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((secs * 1000.0).round() as i64)
}

fn secs_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

impl Deployment {
    /// Whether any region has started.
    pub fn started(&self) -> bool {
        self.regions.iter().any(|r| r.started_at.is_some())
    }

    /// The region this deployment waits to take, if it waits for one.
    pub fn waiting_for(&self) -> Option<&str> {
        if self.status.is_terminal()
            || matches!(self.status, Status::RollingBack | Status::Aborting)
        {
            return None;
        }
        self.regions
            .get(self.current_region)
            .filter(|r| r.status == RegionStatus::Pending)
            .map(|r| r.region.as_str())
    }

    /// Whether region `idx` holds its (region, service) lane: running, going back, or done but
    /// not yet seen done on the platform.
    pub fn owns(&self, idx: usize) -> bool {
        self.regions.get(idx).is_some_and(|r| match r.status {
            RegionStatus::InProgress | RegionStatus::RollingBack => true,
            RegionStatus::Success => !r.observed,
            _ => false,
        })
    }

    /// What region `idx`'s traffic should be, by its state (`None`: not this deployment's to
    /// set).
    pub fn desired(&self, idx: usize) -> Option<TrafficState> {
        let r = self.regions.get(idx)?;
        match r.status {
            RegionStatus::InProgress => {
                let weight = self.stages.get(r.stage_index).map(|s| s.weight)?;
                Some(TrafficState::split(
                    &r.stable_version,
                    Some(&self.version),
                    weight,
                ))
            }
            RegionStatus::Success => Some(TrafficState::only(&self.version)),
            RegionStatus::RollingBack | RegionStatus::RolledBack | RegionStatus::Aborted => {
                Some(TrafficState::only(&r.stable_version))
            }
            RegionStatus::Pending | RegionStatus::Skipped => None,
        }
    }

    /// Sets the waiting region's place in its lane (`None`: not in line); says if it changed.
    pub fn set_queue_position(&mut self, position: Option<usize>) -> bool {
        let ci = self.current_region;
        match self.regions.get_mut(ci) {
            Some(r) if r.queue_position != position => {
                r.queue_position = position;
                true
            }
            _ => false,
        }
    }

    /// Takes the waiting region, whose stable version is `stable`, and starts its first stage.
    pub fn take_region(&mut self, stable: &str, now: DateTime<Utc>) {
        let ci = self.current_region;
        let Some(r) = self.regions.get_mut(ci) else {
            return;
        };
        if r.status != RegionStatus::Pending {
            return;
        }
        r.status = RegionStatus::InProgress;
        r.stable_version = stable.to_owned();
        r.queue_position = None;
        r.started_at = Some(now);
        let region = r.region.clone();
        self.status = Status::InProgress;
        self.event(
            now,
            "region_started",
            Some(&region),
            None,
            json!({"stable_version": stable, "new_version": self.version}),
        );
        self.start_stage(0, now);
    }

    /// Starts stage `idx` in the current region. Its bake is timed from when the platform is
    /// seen serving the stage's weight ([`Deployment::observed`]).
    fn start_stage(&mut self, idx: usize, now: DateTime<Utc>) {
        let ci = self.current_region;
        let Some(stage) = self.stages.get(idx).cloned() else {
            return;
        };
        let r = &mut self.regions[ci];
        r.stage_index = idx;
        r.stage_started_at = Some(now);
        r.stage_deadline = None;
        r.next_analysis_at = None;
        r.inconclusive_since = None;
        r.observed = false;
        r.counts = Counts::default();
        let region = r.region.clone();
        self.event(
            now,
            "stage_started",
            Some(&region),
            Some(&stage.name),
            json!({"weight": stage.weight, "bake_secs": stage.bake_secs}),
        );
    }

    /// The platform was seen serving what region `idx` asks for.
    pub fn observed(&mut self, idx: usize, now: DateTime<Utc>) -> Vec<Note> {
        let mut notes = Vec::new();
        let paused = self.paused;
        let interval = self.analysis.interval_secs;
        let Some(bake) = self
            .regions
            .get(idx)
            .and_then(|r| self.stages.get(r.stage_index))
            .map(|s| s.bake_secs)
        else {
            return notes;
        };
        let r = &mut self.regions[idx];
        if r.observed {
            return notes;
        }
        r.observed = true;
        match r.status {
            RegionStatus::InProgress => {
                // the bake starts now that the weight is in place (a promote may have cut it)
                let left = r
                    .paused_remaining_ms
                    .take()
                    .unwrap_or((bake * 1000.0) as u64);
                if paused {
                    r.paused_remaining_ms = Some(left);
                } else {
                    r.stage_deadline = Some(now + chrono::Duration::milliseconds(left as i64));
                    r.next_analysis_at = Some(now + ms(interval.min(left as f64 / 1000.0)));
                }
            }
            RegionStatus::RollingBack => {
                let cause = r.cause.unwrap_or(Cause::Gate);
                r.status = if cause == Cause::Abort {
                    RegionStatus::Aborted
                } else {
                    RegionStatus::RolledBack
                };
                r.finished_at = Some(now);
                let secs = secs_between(r.failed_at.unwrap_or(now), now);
                let (region, stable) = (r.region.clone(), r.stable_version.clone());
                let stage = self.stages.get(r.stage_index).map(|s| s.name.clone());
                self.event(
                    now,
                    "rolled_back",
                    Some(&region),
                    stage.as_deref(),
                    json!({"to": stable, "cause": cause.as_str(), "seconds_from_failed_gate": secs}),
                );
                notes.push(Note::RolledBack { cause, secs });
            }
            _ => {}
        }
        notes.extend(self.settle(now));
        notes
    }

    /// Whether the running stage is due a measurement.
    pub fn measurement_due(&self, now: DateTime<Utc>) -> bool {
        if self.paused || self.status != Status::InProgress {
            return false;
        }
        self.regions.get(self.current_region).is_some_and(|r| {
            r.status == RegionStatus::InProgress
                && r.observed
                && r.stage_deadline
                    .is_some_and(|dl| now >= dl || r.next_analysis_at.is_none_or(|t| now >= t))
        })
    }

    /// Records the gate's judgement of a measurement of the running stage and acts on it:
    /// pass (complete the stage at its deadline), hold, pause, or fail the region. `taken`
    /// says whether a region's lane now belongs to a later deployment (left alone by a
    /// `rollback_all`).
    pub fn judged(
        &mut self,
        j: &Judgement,
        provider: &str,
        figures: Option<&Figures>,
        taken: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Vec<Note> {
        let ci = self.current_region;
        let a = self.analysis.clone();
        let Some(r) = self.regions.get_mut(ci) else {
            return Vec::new();
        };
        let Some(stage) = self.stages.get(r.stage_index).cloned() else {
            return Vec::new();
        };
        r.analysis.push(AnalysisRecord {
            at: now,
            stage: stage.name.clone(),
            provider: provider.to_owned(),
            error_rate: figures.and_then(|f| f.error_rate),
            p99_ms: figures.and_then(|f| f.p99_ms),
            samples: figures.and_then(|f| f.samples),
            max_error_rate: a.max_error_rate,
            max_p99_ms: a.max_p99_ms,
            result: j.class,
            detail: j.detail.clone(),
        });
        r.counts = j.counts;
        let region = r.region.clone();
        let gate = json!({
            "result": j.class, "decision": j.verdict.decision.as_str(), "detail": j.detail,
            "reasons": j.verdict.reasons.iter().map(|x| x.rule.clone()).collect::<Vec<_>>(),
            "error_rate": figures.and_then(|f| f.error_rate), "max_error_rate": a.max_error_rate,
            "p99_ms": figures.and_then(|f| f.p99_ms), "max_p99_ms": a.max_p99_ms,
            "samples": figures.and_then(|f| f.samples), "provider": provider,
        });
        match j.action {
            Action::Pass => {
                r.inconclusive_since = None;
                if r.stage_deadline.is_some_and(|dl| now >= dl) {
                    return self.complete_stage(gate, now);
                }
                r.next_analysis_at = Some(now + ms(a.interval_secs));
                Vec::new()
            }
            Action::Hold => {
                if r.inconclusive_since.is_none() {
                    r.inconclusive_since = Some(now);
                    self.event(
                        now,
                        "analysis_inconclusive",
                        Some(&region),
                        Some(&stage.name),
                        gate,
                    );
                }
                let r = &mut self.regions[ci];
                // hold the stage: its bake does not end while the gate cannot pass it
                r.next_analysis_at = Some(now + ms(a.interval_secs));
                if r.stage_deadline.is_some_and(|dl| dl <= now) {
                    r.stage_deadline = Some(now + ms(a.interval_secs));
                }
                Vec::new()
            }
            Action::Pause => {
                r.counts.inconclusive = 0;
                r.inconclusive_since = None;
                let _ = self.pause("gate", gate, now);
                Vec::new()
            }
            Action::Fail => self.fail_region(Cause::Gate, gate, taken, now),
        }
    }

    fn complete_stage(&mut self, gate: Value, now: DateTime<Utc>) -> Vec<Note> {
        let ci = self.current_region;
        let r = &mut self.regions[ci];
        let idx = r.stage_index;
        let stage = self.stages[idx].clone();
        let secs = r
            .stage_started_at
            .map(|s| secs_between(s, now))
            .unwrap_or(0.0);
        r.stages_completed.push(stage.name.clone());
        let region = r.region.clone();
        self.event(
            now,
            "stage_completed",
            Some(&region),
            Some(&stage.name),
            json!({"weight": stage.weight, "duration_secs": secs, "gate": gate}),
        );
        let mut notes = vec![Note::StageCompleted {
            stage: stage.name.clone(),
            secs,
        }];
        if idx + 1 < self.stages.len() {
            self.start_stage(idx + 1, now);
            return notes;
        }
        let r = &mut self.regions[ci];
        r.status = RegionStatus::Success;
        r.finished_at = Some(now);
        r.stage_deadline = None;
        r.next_analysis_at = None;
        // the region holds its lane until the platform is seen serving the new version alone;
        // the last stage's weight was 100, so that is normally already so
        let at_full = stage.weight >= 100 && r.observed;
        r.observed = at_full;
        self.event(
            now,
            "region_succeeded",
            Some(&region),
            None,
            json!({"version": self.version, "weight": 100}),
        );
        notes.extend(self.advance(now));
        notes
    }

    /// Moves to the next region, or settles the deployment once every region is done.
    fn advance(&mut self, now: DateTime<Utc>) -> Vec<Note> {
        if self.current_region + 1 < self.regions.len() {
            self.current_region += 1;
            return Vec::new();
        }
        self.settle(now)
    }

    /// Sends region `current_region` back to stable (`cause`), then does what
    /// `on_region_failure` asks for the others.
    fn fail_region(
        &mut self,
        cause: Cause,
        gate: Value,
        taken: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Vec<Note> {
        let ci = self.current_region;
        let region = self.regions[ci].region.clone();
        let stage = self.stages[self.regions[ci].stage_index].name.clone();
        self.event(now, "gate_failed", Some(&region), Some(&stage), gate);
        self.roll_back(ci, cause, "its gate failed", now);
        match self.on_region_failure {
            OnRegionFailure::Halt => {
                self.skip_pending();
                self.status = Status::RollingBack;
            }
            OnRegionFailure::Continue => return self.advance(now),
            OnRegionFailure::RollbackAll => {
                for i in 0..self.regions.len() {
                    if i != ci {
                        self.roll_back_region_if_ours(
                            i,
                            Cause::RollbackAll,
                            "another region failed its gate",
                            taken,
                            now,
                        );
                    }
                }
                self.skip_pending();
                self.status = Status::RollingBack;
            }
        }
        self.paused = false;
        self.settle(now)
    }

    pub(super) fn skip_pending(&mut self) {
        for r in &mut self.regions {
            if r.status == RegionStatus::Pending {
                r.status = RegionStatus::Skipped;
                r.queue_position = None;
            }
        }
    }

    /// Region `i`, running or done, goes back to stable unless a later deployment owns its lane.
    pub(super) fn roll_back_region_if_ours(
        &mut self,
        i: usize,
        cause: Cause,
        why: &str,
        taken: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) {
        let r = &self.regions[i];
        match r.status {
            RegionStatus::InProgress => self.roll_back(i, cause, why, now),
            RegionStatus::Success if r.observed && taken(&r.region) => {
                let region = r.region.clone();
                self.event(
                    now,
                    "rollback_skipped",
                    Some(&region),
                    None,
                    json!({"why": "a later deployment of this service now owns the region"}),
                );
            }
            RegionStatus::Success => self.roll_back(i, cause, why, now),
            _ => {}
        }
    }

    fn roll_back(&mut self, i: usize, cause: Cause, why: &str, now: DateTime<Utc>) {
        let r = &mut self.regions[i];
        r.status = RegionStatus::RollingBack;
        r.cause = Some(cause);
        r.failed_at = Some(now);
        r.observed = false;
        r.stage_deadline = None;
        r.next_analysis_at = None;
        r.queue_position = None;
        let (region, stable) = (r.region.clone(), r.stable_version.clone());
        self.event(
            now,
            "rollback_started",
            Some(&region),
            None,
            json!({"to": stable, "why": why, "cause": cause.as_str()}),
        );
    }

    /// Ends the deployment once nothing is left to do or to observe.
    pub(super) fn settle(&mut self, now: DateTime<Utc>) -> Vec<Note> {
        if self.status.is_terminal() {
            return Vec::new();
        }
        let busy = self.regions.iter().any(|r| {
            matches!(
                r.status,
                RegionStatus::Pending | RegionStatus::InProgress | RegionStatus::RollingBack
            ) || (r.status == RegionStatus::Success && !r.observed)
        });
        if busy {
            return Vec::new();
        }
        let status = match self.status {
            Status::Aborting => Status::Aborted,
            Status::RollingBack => Status::RolledBack,
            _ if self
                .regions
                .iter()
                .any(|r| r.status == RegionStatus::RolledBack) =>
            {
                Status::Failed
            }
            _ => Status::Success,
        };
        self.finish(status, now);
        let kind = match status {
            Status::Success => "succeeded",
            Status::Failed => "failed",
            Status::Aborted => "abort_completed",
            _ => "ended",
        };
        let regions: Vec<Value> = self
            .regions
            .iter()
            .map(|r| json!({"region": r.region, "status": r.status}))
            .collect();
        self.event(
            now,
            kind,
            None,
            None,
            json!({"status": status, "regions": regions}),
        );
        vec![Note::Ended(status)]
    }

    pub(super) fn finish(&mut self, status: Status, now: DateTime<Utc>) {
        self.status = status;
        self.finished_at = Some(now);
        self.paused = false;
        for r in &mut self.regions {
            r.queue_position = None;
        }
        self.refresh(now);
    }
}
