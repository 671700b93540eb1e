//! The controller's upkeep: publishing events, whose lanes are taken, arrivals still on their
//! way from a standby.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tai_core::jidoka::Outcome;

use super::controller::Controller;
use super::lanes;
use super::model::Deployment;

impl Controller {
    /// Publishes the events not yet published, in order; stops at the first failure and tries
    /// again after the next transition.
    pub(super) async fn publish_events(&mut self, d: &Deployment) {
        let done = self.published.get(&d.deployment_id).copied().unwrap_or(0);
        let subject = format!("{}.{}", self.subject_prefix, d.deployment_id);
        for (i, event) in d.events.iter().enumerate().skip(done) {
            let payload = json!({"deployment_id": d.deployment_id, "service": d.service, "version": d.version, "seq": i, "event": event});
            let id = format!("{}:{i}", d.deployment_id);
            let Ok(permit) = self.audit_breaker.try_acquire() else {
                return;
            };
            let result = self
                .audit
                .publish(&subject, &id, payload.to_string().into_bytes())
                .await;
            permit.record(if result.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            });
            if let Err(e) = result {
                tracing::warn!(deployment_id = %d.deployment_id, error = %e, "audit event not published; will retry");
                return;
            }
            self.published.insert(d.deployment_id.clone(), i + 1);
        }
    }

    /// Whether `region`'s lane of `d`'s service belongs to another deployment: one that owns it
    /// now, or a later one that has started there (ended or not), whose version it then runs.
    pub(super) fn taken_by_other(&self, d: &Deployment) -> impl Fn(&str) -> bool + use<> {
        let owners = self.with_active(|active| lanes::owners(active));
        let later: HashSet<String> = {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            view.values()
                .filter(|e| e.service == d.service && e.seq > d.seq)
                .flat_map(|e| e.regions.iter())
                .filter(|r| r.started_at.is_some())
                .map(|r| r.region.clone())
                .collect()
        };
        let (id, service) = (d.deployment_id.clone(), d.service.clone());
        move |region: &str| {
            later.contains(region)
                || owners
                    .get(&(region.to_owned(), service.clone()))
                    .is_some_and(|o| *o != id)
        }
    }

    /// The earliest arrival number missing from the view for less than two seconds (a gap
    /// older than that is a deployment that was never stored, and no longer holds anyone up).
    pub(super) fn earliest_gap(&mut self) -> Option<u64> {
        let seqs: HashSet<u64> = {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            view.values().map(|d| d.seq).collect()
        };
        let max = seqs.iter().copied().max().unwrap_or(0);
        let floor = max.saturating_sub(1000);
        self.gaps.retain(|s, _| !seqs.contains(s) && *s > floor);
        for s in floor.max(1)..max {
            if !seqs.contains(&s) {
                self.gaps.entry(s).or_insert_with(std::time::Instant::now);
            }
        }
        self.gaps
            .iter()
            .filter(|(_, since)| since.elapsed() < Duration::from_secs(2))
            .map(|(s, _)| *s)
            .min()
    }
}
