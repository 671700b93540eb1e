//! The operator's transitions (pause, resume, promote, abort) and supersede, as pure methods
//! on the model like the rest of [`super::transitions`].

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::model::{Cause, Deployment, RegionStatus, Status};
use super::transitions::{Note, ms};

impl Deployment {
    fn operable(&self, what: &str) -> Result<(), String> {
        if self.status.is_terminal() {
            return Err(format!(
                "deployment {} already ended as {:?}; cannot {what}",
                self.deployment_id, self.status
            ));
        }
        if matches!(self.status, Status::RollingBack | Status::Aborting) {
            return Err(format!(
                "deployment {} is going back to stable ({:?}); cannot {what}",
                self.deployment_id, self.status
            ));
        }
        Ok(())
    }

    /// Freezes the timers (`by`: `operator` or `gate`, with `why`).
    pub fn pause(&mut self, by: &str, why: Value, now: DateTime<Utc>) -> Result<(), String> {
        self.operable("pause")?;
        if self.paused {
            return Err(format!(
                "deployment {} is already paused",
                self.deployment_id
            ));
        }
        self.paused = true;
        let ci = self.current_region;
        if let Some(r) = self.regions.get_mut(ci)
            && r.status == RegionStatus::InProgress
            && let Some(dl) = r.stage_deadline.take()
        {
            r.paused_remaining_ms = Some((dl - now).num_milliseconds().max(0) as u64);
            r.next_analysis_at = None;
        }
        self.set_queue_position(None);
        self.event(now, "paused", None, None, json!({"by": by, "why": why}));
        Ok(())
    }

    /// Unfreezes the timers.
    pub fn resume(&mut self, now: DateTime<Utc>) -> Result<(), String> {
        self.operable("resume")?;
        if !self.paused {
            return Err(format!("deployment {} is not paused", self.deployment_id));
        }
        self.paused = false;
        let interval = self.analysis.interval_secs;
        let ci = self.current_region;
        if let Some(r) = self.regions.get_mut(ci)
            && r.status == RegionStatus::InProgress
            && r.observed
        {
            let left = r.paused_remaining_ms.take().unwrap_or(0);
            r.stage_deadline = Some(now + chrono::Duration::milliseconds(left as i64));
            r.next_analysis_at = Some(now + ms(interval.min(left as f64 / 1000.0)));
        }
        self.event(now, "resumed", None, None, json!({"by": "operator"}));
        Ok(())
    }

    /// Skips the rest of the running stage's bake (and unpauses).
    pub fn promote(&mut self, now: DateTime<Utc>) -> Result<(), String> {
        self.operable("promote")?;
        let ci = self.current_region;
        let id = self.deployment_id.clone();
        let Some(r) = self
            .regions
            .get_mut(ci)
            .filter(|r| r.status == RegionStatus::InProgress)
        else {
            return Err(format!("deployment {id} has no stage running to promote"));
        };
        if r.observed {
            r.stage_deadline = Some(now);
            r.next_analysis_at = Some(now);
            r.paused_remaining_ms = None;
        } else {
            // the weight is not in place yet: its bake will be zero once it is
            r.paused_remaining_ms = Some(0);
        }
        let stage = self.stages.get(r.stage_index).map(|s| s.name.clone());
        let region = r.region.clone();
        self.paused = false;
        self.event(
            now,
            "promoted",
            Some(&region),
            stage.as_deref(),
            json!({"by": "operator", "skipped": "the rest of the bake"}),
        );
        Ok(())
    }

    /// Stops the deployment: every region it runs in, or finished in and still owns, goes
    /// back to stable; `ABORTED` once the platform is seen serving stable everywhere.
    pub fn abort(
        &mut self,
        taken: &dyn Fn(&str) -> bool,
        now: DateTime<Utc>,
    ) -> Result<Vec<Note>, String> {
        self.operable("abort")?;
        for i in 0..self.regions.len() {
            self.roll_back_region_if_ours(i, Cause::Abort, "aborted by an operator", taken, now);
        }
        self.skip_pending();
        self.status = Status::Aborting;
        self.paused = false;
        self.event(now, "aborted", None, None, json!({"by": "operator"}));
        Ok(self.settle(now))
    }

    /// Replaced, before it started, by the later deployment `by`.
    pub fn supersede(&mut self, by: &str, now: DateTime<Utc>) -> Result<Vec<Note>, String> {
        if self.status.is_terminal() || self.started() {
            return Err(format!(
                "deployment {} has started or ended; it cannot be superseded",
                self.deployment_id
            ));
        }
        self.skip_pending();
        self.superseded_by = Some(by.to_owned());
        self.finish(Status::Superseded, now);
        self.event(now, "superseded", None, None, json!({"by": by}));
        Ok(vec![Note::Ended(Status::Superseded)])
    }
}
