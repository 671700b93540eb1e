//! Property tests: random histories of lanes, observations, measurements and operator
//! commands never reach an impossible state.

use std::collections::BTreeMap;

use chrono::Duration;
use proptest::prelude::*;
use serde_json::json;

use super::{bad, dep, good, t0};
use crate::analysis::{Figures, Measurement};
use crate::fleet::TrafficState;
use crate::rollout::gate;
use crate::rollout::lanes::{self, Lane};
use crate::rollout::model::{Deployment, RegionStatus};

/// One step of a random history.
#[derive(Debug, Clone)]
enum Step {
    Plan,
    Observe(usize),
    Measure(usize, u8),
    Pause(usize),
    Resume(usize),
    Promote(usize),
    Abort(usize),
    Wait(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Plan),
        4 => (0usize..5).prop_map(Step::Observe),
        4 => ((0usize..5), 0u8..4).prop_map(|(d, m)| Step::Measure(d, m)),
        1 => (0usize..5).prop_map(Step::Pause),
        1 => (0usize..5).prop_map(Step::Resume),
        1 => (0usize..5).prop_map(Step::Promote),
        1 => (0usize..5).prop_map(Step::Abort),
        2 => (0u16..1500).prop_map(Step::Wait),
    ]
}

/// Runs a history the way the controller would (lanes planned, traffic applied only for lane
/// owners, measurements only when due) and checks the invariants after every step.
fn run(history: &[Step]) -> Result<(), TestCaseError> {
    let failures = ["halt", "continue", "rollback_all"];
    let mut ds: Vec<Deployment> = (0..5)
        .map(|i| {
            let service = if i % 2 == 0 { "api" } else { "web" };
            let regions: &[&str] = if i % 3 == 0 {
                &["r1", "r2"]
            } else {
                &["r2", "r1"]
            };
            dep(
                &format!("d{i}"),
                i as u64 + 1,
                service,
                regions,
                json!({"on_region_failure": failures[i % 3]}),
            )
        })
        .collect();
    let mut platform: BTreeMap<Lane, TrafficState> = BTreeMap::new();
    let mut now = t0();
    for s in history {
        let owners = lanes::owners(ds.iter().filter(|d| !d.status.is_terminal()));
        match s.clone() {
            Step::Plan => {
                let active: Vec<Deployment> = ds
                    .iter()
                    .filter(|d| !d.status.is_terminal())
                    .cloned()
                    .collect();
                let p = lanes::plan(&active);
                for (id, by) in p.supersede {
                    if let Some(d) = ds.iter_mut().find(|d| d.deployment_id == id) {
                        d.supersede(&by, now).map_err(TestCaseError::fail)?;
                    }
                }
                for id in p.grants {
                    if let Some(d) = ds.iter_mut().find(|d| d.deployment_id == id) {
                        let region = d
                            .waiting_for()
                            .map(str::to_owned)
                            .ok_or_else(|| TestCaseError::fail("granted but not waiting"))?;
                        let stable = platform
                            .get(&(region, d.service.clone()))
                            .map(|t| t.stable.clone())
                            .unwrap_or_else(|| "v0".into());
                        d.take_region(&stable, now);
                    }
                }
            }
            Step::Observe(i) => {
                // the platform serves what the owner asked; the owner then sees it
                let d = &mut ds[i];
                for r in 0..d.regions.len() {
                    let lane = (d.regions[r].region.clone(), d.service.clone());
                    if owners.get(&lane) == Some(&d.deployment_id)
                        && let Some(want) = d.desired(r)
                    {
                        platform.insert(lane, want);
                        d.observed(r, now);
                    }
                }
            }
            Step::Measure(i, kind) => {
                let d = &mut ds[i];
                if d.measurement_due(now) {
                    let m = match kind {
                        0 => good(),
                        1 => bad(),
                        2 => Measurement::Error("down".into()),
                        _ => Measurement::Figures(Figures {
                            error_rate: None,
                            p99_ms: None,
                            samples: Some(0),
                        }),
                    };
                    let others: Vec<String> = owners
                        .iter()
                        .filter(|(l, o)| l.1 == d.service && **o != d.deployment_id)
                        .map(|(l, _)| l.0.clone())
                        .collect();
                    let counts = d.regions[d.current_region].counts;
                    let j = gate::judge(&d.analysis, counts, &m);
                    let figures = match &m {
                        Measurement::Figures(f) => Some(f.clone()),
                        _ => None,
                    };
                    d.judged(
                        &j,
                        "sim",
                        figures.as_ref(),
                        &|r: &str| others.iter().any(|o| o == r),
                        now,
                    );
                }
            }
            Step::Pause(i) => {
                let _ = ds[i].pause("operator", json!(null), now);
            }
            Step::Resume(i) => {
                let _ = ds[i].resume(now);
            }
            Step::Promote(i) => {
                let _ = ds[i].promote(now);
            }
            Step::Abort(i) => {
                let d = &ds[i];
                let others: Vec<String> = owners
                    .iter()
                    .filter(|(l, o)| l.1 == d.service && **o != d.deployment_id)
                    .map(|(l, _)| l.0.clone())
                    .collect();
                let _ = ds[i].abort(&|r: &str| others.iter().any(|o| o == r), now);
            }
            Step::Wait(ms) => now += Duration::milliseconds(i64::from(ms)),
        }
        // invariants
        let mut seen: BTreeMap<Lane, &str> = BTreeMap::new();
        for d in &ds {
            for (i, r) in d.regions.iter().enumerate() {
                if d.owns(i)
                    && let Some(prev) =
                        seen.insert((r.region.clone(), d.service.clone()), &d.deployment_id)
                {
                    prop_assert!(
                        false,
                        "two owners of {}/{}: {prev} and {}",
                        r.region,
                        d.service,
                        d.deployment_id
                    );
                }
                let names: Vec<&str> = d.stages.iter().map(|s| s.name.as_str()).collect();
                let done: Vec<&str> = r.stages_completed.iter().map(String::as_str).collect();
                prop_assert!(
                    names.starts_with(&done),
                    "stages skipped or repeated: {done:?}"
                );
                if d.status.is_terminal() {
                    prop_assert!(!d.owns(i), "{} ended owning {}", d.deployment_id, r.region);
                    prop_assert!(!matches!(
                        r.status,
                        RegionStatus::InProgress
                            | RegionStatus::RollingBack
                            | RegionStatus::Pending
                    ));
                }
                if matches!(r.status, RegionStatus::RolledBack | RegionStatus::Aborted) {
                    prop_assert!(r.observed, "a rollback is only final once seen");
                }
            }
        }
        for (lane, state) in &platform {
            if !seen.contains_key(lane) {
                prop_assert!(
                    state.canary.is_none(),
                    "{lane:?} has no owner but a live canary: {state:?}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn no_history_reaches_an_impossible_state(history in proptest::collection::vec(step(), 1..120)) {
        run(&history)?;
    }
}
