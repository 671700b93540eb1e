//! Unit and property tests of the model's transitions, the lanes and their invariants, on a
//! manual clock (every transition takes `now`; nothing sleeps).

mod histories;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::json;

use super::gate::{self, Counts};
use super::lanes;
use super::model::{Cause, Deployment, RegionStatus, Status};
use super::transitions::Note;
use crate::analysis::{Figures, Measurement};
use crate::fleet::TrafficState;
use crate::signal::{self, Defaults};

pub(super) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid time")
}

fn at(ms: i64) -> DateTime<Utc> {
    t0() + Duration::milliseconds(ms)
}

/// A deployment of `service` `version` to `regions`: stages 5/25/100 baking 1 s, measured every
/// 0.2 s, with `extra` merged into the request.
pub(super) fn dep(
    id: &str,
    seq: u64,
    service: &str,
    regions: &[&str],
    extra: serde_json::Value,
) -> Deployment {
    let mut body = json!({
        "service": service, "version": format!("v{seq}"), "regions": regions,
        "stages": [{"name": "canary", "weight": 5, "bake_secs": 1}, {"name": "staging", "weight": 25, "bake_secs": 1}, {"name": "prod", "weight": 100, "bake_secs": 1}],
        "analysis": {"interval_secs": 0.2},
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let req = signal::parse(&body, &Defaults::default()).expect("a valid request");
    let stables: Vec<(String, Option<String>)> = regions
        .iter()
        .map(|r| (r.to_string(), Some("v0".to_string())))
        .collect();
    Deployment::create(&req, id.into(), seq, &stables, t0())
}

pub(super) fn good() -> Measurement {
    Measurement::Figures(Figures {
        error_rate: Some(0.0),
        p99_ms: Some(10.0),
        samples: None,
    })
}

pub(super) fn bad() -> Measurement {
    Measurement::Figures(Figures {
        error_rate: Some(0.5),
        p99_ms: Some(10.0),
        samples: None,
    })
}

fn none_taken(_: &str) -> bool {
    false
}

/// Judges `m` for `d`'s running stage.
fn measure(d: &mut Deployment, m: &Measurement, now: DateTime<Utc>) -> Vec<Note> {
    let counts = d.regions[d.current_region].counts;
    let j = gate::judge(&d.analysis, counts, m);
    let figures = match m {
        Measurement::Figures(f) => Some(f.clone()),
        _ => None,
    };
    d.judged(&j, "sim", figures.as_ref(), &none_taken, now)
}

/// Observes the current region's desired traffic as applied.
fn observe(d: &mut Deployment, i: usize, now: DateTime<Utc>) -> Vec<Note> {
    assert!(
        d.desired(i).is_some(),
        "only a region with a desired state is observed"
    );
    d.observed(i, now)
}

#[test]
fn a_region_is_taken_its_stages_bake_from_the_observed_weight_and_it_succeeds() {
    let mut d = dep("a", 1, "api", &["r1"], json!({}));
    assert_eq!((d.status, d.waiting_for()), (Status::Pending, Some("r1")));
    assert_eq!(
        d.desired(0),
        None,
        "a pending region asks nothing of the platform"
    );
    d.take_region("v0", at(0));
    assert_eq!(d.status, Status::InProgress);
    assert!(d.owns(0));
    assert_eq!(d.desired(0), Some(TrafficState::split("v0", Some("v1"), 5)));
    assert!(
        !d.measurement_due(at(5000)),
        "nothing is measured before the weight is in place"
    );
    observe(&mut d, 0, at(100));
    assert_eq!(d.regions[0].stage_deadline, Some(at(1100)));
    assert!(!d.measurement_due(at(200)));
    assert!(d.measurement_due(at(300)));
    assert!(measure(&mut d, &good(), at(300)).is_empty());
    assert_eq!(d.regions[0].next_analysis_at, Some(at(500)));
    // at the deadline a passing measurement completes the stage and starts the next
    let notes = measure(&mut d, &good(), at(1100));
    assert!(matches!(&notes[..], [Note::StageCompleted { stage, .. }] if stage == "canary"));
    assert_eq!(d.regions[0].stage_index, 1);
    assert!(!d.regions[0].observed, "the new weight must be seen first");
    assert_eq!(d.regions[0].stages_completed, vec!["canary"]);
    for (stage, start) in [(1usize, 1200i64), (2, 2400)] {
        observe(&mut d, 0, at(start));
        assert_eq!(d.regions[0].stage_index, stage);
        measure(&mut d, &good(), at(start + 1000));
    }
    assert_eq!(d.status, Status::Success);
    assert_eq!(d.regions[0].status, RegionStatus::Success);
    assert!(
        !d.owns(0),
        "the 100% weight was already observed: the lane is free"
    );
    assert_eq!(d.desired(0), Some(TrafficState::only("v1")));
    assert_eq!(d.finished_at, Some(at(3400)));
}

#[test]
fn a_failed_gate_rolls_back_and_ends_only_once_stable_is_observed() {
    let mut d = dep("a", 1, "api", &["r1", "r2"], json!({}));
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    let notes = measure(&mut d, &bad(), at(200));
    assert!(notes.is_empty(), "nothing has ended yet: {notes:?}");
    assert_eq!(
        (d.status, d.regions[0].status, d.regions[1].status),
        (
            Status::RollingBack,
            RegionStatus::RollingBack,
            RegionStatus::Skipped
        )
    );
    assert_eq!(d.desired(0), Some(TrafficState::only("v0")));
    assert!(d.owns(0), "the lane stays held until the rollback is seen");
    assert!(!d.status.is_terminal());
    assert!(d.pause("operator", json!(null), at(300)).is_err());
    let notes = observe(&mut d, 0, at(2700));
    assert_eq!(
        notes,
        vec![
            Note::RolledBack {
                cause: Cause::Gate,
                secs: 2.5
            },
            Note::Ended(Status::RolledBack)
        ]
    );
    assert_eq!(d.regions[0].status, RegionStatus::RolledBack);
    assert!(!d.owns(0));
    let kinds: Vec<&str> = d.events.iter().map(|e| e.kind.as_str()).collect();
    let failed = kinds
        .iter()
        .position(|k| *k == "gate_failed")
        .expect("gate_failed");
    let back = kinds
        .iter()
        .position(|k| *k == "rolled_back")
        .expect("rolled_back");
    assert!(failed < back);
}

#[test]
fn holds_pause_and_resume_freeze_the_bake_and_promote_cuts_it() {
    let mut d = dep("a", 1, "api", &["r1"], json!({}));
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    // an error at the deadline holds the stage past it
    measure(&mut d, &Measurement::Error("503".into()), at(1000));
    assert_eq!(d.regions[0].stage_deadline, Some(at(1200)));
    assert_eq!(d.regions[0].stages_completed, Vec::<String>::new());
    assert!(d.regions[0].inconclusive_since.is_some());
    // pausing freezes what is left; nothing is due while paused
    d.pause("operator", json!(null), at(1100)).expect("pause");
    assert!(
        d.pause("operator", json!(null), at(1100)).is_err(),
        "already paused"
    );
    assert!(!d.measurement_due(at(60_000)));
    d.resume(at(60_000)).expect("resume");
    assert!(d.resume(at(60_000)).is_err(), "not paused");
    assert_eq!(d.regions[0].stage_deadline, Some(at(60_100)));
    d.promote(at(60_010)).expect("promote");
    assert_eq!(d.regions[0].stage_deadline, Some(at(60_010)));
    measure(&mut d, &good(), at(60_010));
    assert_eq!(d.regions[0].stages_completed, vec!["canary"]);
}

#[test]
fn the_gate_pauses_for_a_person_when_asked() {
    let mut d = dep(
        "a",
        1,
        "api",
        &["r1"],
        json!({"analysis": {"interval_secs": 0.2, "provider": "prometheus", "inconclusive_limit": 1, "on_inconclusive": "pause"}}),
    );
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    let few = Measurement::Figures(Figures {
        error_rate: None,
        p99_ms: None,
        samples: Some(0),
    });
    measure(&mut d, &few, at(200));
    assert!(!d.paused);
    measure(&mut d, &few, at(400));
    assert!(d.paused, "past the limit: paused, not rolled back");
    assert_eq!(d.status, Status::InProgress);
    let e = d.events.last().expect("event");
    assert_eq!(
        (e.kind.as_str(), e.detail["by"].as_str()),
        ("paused", Some("gate"))
    );
    assert_eq!(
        d.regions[0].counts.inconclusive, 0,
        "a resume starts counting afresh"
    );
}

#[test]
fn abort_rolls_back_what_it_owns_and_leaves_a_later_deployments_region_alone() {
    // r1 succeeded and a later deployment took it; r2 runs
    let mut d = dep(
        "a",
        1,
        "api",
        &["r1", "r2", "r3"],
        json!({"stages": [{"name": "all", "weight": 100, "bake_secs": 0}]}),
    );
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    measure(&mut d, &good(), at(0));
    assert_eq!(d.regions[0].status, RegionStatus::Success);
    d.take_region("v0", at(10));
    let taken = |r: &str| r == "r1";
    let notes = d.abort(&taken, at(20)).expect("abort");
    assert!(notes.is_empty());
    assert_eq!(d.status, Status::Aborting);
    assert_eq!(
        d.regions.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![
            RegionStatus::Success,
            RegionStatus::RollingBack,
            RegionStatus::Skipped
        ]
    );
    assert!(d.events.iter().any(|e| e.kind == "rollback_skipped"));
    assert!(d.abort(&taken, at(21)).is_err(), "already aborting");
    let notes = observe(&mut d, 1, at(520));
    assert_eq!(
        notes,
        vec![
            Note::RolledBack {
                cause: Cause::Abort,
                secs: 0.5
            },
            Note::Ended(Status::Aborted)
        ]
    );
    assert_eq!(d.regions[1].status, RegionStatus::Aborted);
    // a deployment that never started aborts at once
    let mut q = dep("b", 2, "api", &["r1"], json!({}));
    assert_eq!(
        q.abort(&none_taken, at(0)),
        Ok(vec![Note::Ended(Status::Aborted)])
    );
}

#[test]
fn continue_and_rollback_all_handle_a_failing_region_as_asked() {
    let mut d = dep(
        "a",
        1,
        "api",
        &["r1", "r2"],
        json!({"on_region_failure": "continue", "stages": [{"name": "all", "weight": 100, "bake_secs": 0}]}),
    );
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    measure(&mut d, &bad(), at(0));
    assert_eq!((d.status, d.current_region), (Status::InProgress, 1));
    assert_eq!(d.waiting_for(), Some("r2"));
    d.take_region("v0", at(1));
    observe(&mut d, 1, at(1));
    measure(&mut d, &good(), at(1));
    assert_eq!(
        d.status,
        Status::InProgress,
        "r1's rollback is not seen yet"
    );
    assert_eq!(
        observe(&mut d, 0, at(2)).last(),
        Some(&Note::Ended(Status::Failed))
    );

    let mut d = dep(
        "b",
        2,
        "api",
        &["r1", "r2"],
        json!({"on_region_failure": "rollback_all", "stages": [{"name": "all", "weight": 100, "bake_secs": 0}]}),
    );
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    measure(&mut d, &good(), at(0));
    d.take_region("v0", at(1));
    observe(&mut d, 1, at(1));
    measure(&mut d, &bad(), at(1));
    assert_eq!(
        d.regions
            .iter()
            .map(|r| (r.status, r.cause))
            .collect::<Vec<_>>(),
        vec![
            (RegionStatus::RollingBack, Some(Cause::RollbackAll)),
            (RegionStatus::RollingBack, Some(Cause::Gate))
        ]
    );
    observe(&mut d, 0, at(2));
    assert_eq!(
        observe(&mut d, 1, at(2)).last(),
        Some(&Note::Ended(Status::RolledBack))
    );
}

#[test]
fn lanes_grant_in_arrival_order_skip_the_paused_and_supersede_queued_deploys() {
    let mut a = dep("a", 1, "api", &["r1"], json!({}));
    let b = dep("b", 2, "api", &["r1"], json!({}));
    let other = dep("o", 3, "web", &["r1"], json!({}));
    let p = lanes::plan(&[b.clone(), a.clone(), other.clone()]);
    assert_eq!(
        p.grants,
        vec!["a".to_string(), "o".to_string()],
        "one per (region, service)"
    );
    assert!(p.positions.contains(&("b".into(), Some(1))));
    assert!(
        p.supersede.is_empty(),
        "nobody waits behind a busy lane yet"
    );
    a.take_region("v0", at(0));
    // c arrives: b is still queued and unstarted, so c supersedes it
    let c = dep("c", 4, "api", &["r1"], json!({}));
    let p = lanes::plan(&[a.clone(), b.clone(), c.clone()]);
    assert_eq!(p.supersede, vec![("b".to_string(), "c".to_string())]);
    assert!(p.grants.is_empty(), "a owns r1");
    assert!(p.positions.contains(&("c".into(), Some(1))));
    // a paused deployment waiting for a region steps out of line
    let mut q = dep("q", 5, "api", &["r2", "r1"], json!({}));
    q.take_region("v0", at(0));
    q.regions[0].status = RegionStatus::Success;
    q.regions[0].observed = true;
    q.current_region = 1;
    let r = dep("r", 6, "api", &["r1"], json!({}));
    let p = lanes::plan(&[a.clone(), q.clone(), r.clone()]);
    assert_eq!(
        p.supersede,
        Vec::<(String, String)>::new(),
        "q has started: never superseded"
    );
    assert!(
        p.positions.contains(&("q".into(), Some(1)))
            && p.positions.contains(&("r".into(), Some(2)))
    );
    q.pause("operator", json!(null), at(1)).expect("pause");
    let p = lanes::plan(&[a, q, r]);
    assert!(
        p.positions.contains(&("q".into(), None)) && p.positions.contains(&("r".into(), Some(1)))
    );
}

#[test]
fn counts_start_afresh_with_each_stage() {
    let mut d = dep("a", 1, "api", &["r1"], json!({}));
    d.take_region("v0", at(0));
    observe(&mut d, 0, at(0));
    measure(&mut d, &Measurement::Error("x".into()), at(200));
    assert_eq!(d.regions[0].counts.consecutive_errors, 1);
    measure(&mut d, &good(), at(1000));
    assert_eq!(d.regions[0].counts, Counts::default());
}
