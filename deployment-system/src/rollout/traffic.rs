//! The platform, driven level-triggered.
//!
//! The controller hands this task the traffic every owned (region, service) lane should have,
//! with the lease's fencing token. The task reads what the platform observes, writes the
//! difference with the token, reads back, and repeats until they match; it reports each match
//! to the controller (which only then counts the change as done) and checks matched lanes
//! again now and then, so drift and lost writes are repaired, after restarts too. A lane no
//! deployment owns is never written. Each platform call has a timeout, so a hung platform stops
//! only this task's progress, never the controller's loop.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};

use super::lanes::Lane;
use crate::fleet::{Applied, Platform, TrafficState};

/// What the task tells the controller.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The platform serves `state` in `lane`, as asked at `generation`.
    Observed {
        /// The lane.
        lane: Lane,
        /// What it serves.
        state: TrafficState,
        /// The generation of the desired state it matched: the controller accepts the report
        /// only while that is still the lane's generation.
        generation: u64,
    },
    /// The platform refused a write: a newer token was applied there (this replica was
    /// deposed).
    Fenced {
        /// The newest token the platform applied.
        newer: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Want {
    state: TrafficState,
    generation: u64,
}

#[derive(Debug, Default)]
struct Desired {
    token: Option<u64>,
    lanes: BTreeMap<Lane, Want>,
    generation: u64,
}

/// The controller's side: sets what is desired.
#[derive(Debug, Clone)]
pub struct TrafficHandle {
    desired: Arc<Mutex<Desired>>,
    notify: Arc<Notify>,
}

impl TrafficHandle {
    /// Asks for `lanes` under fencing `token` (`None`: this replica does not lead; write
    /// nothing). A lane whose state changed gets a new generation and is worked on at once.
    pub fn set(&self, token: Option<u64>, lanes: BTreeMap<Lane, TrafficState>) {
        let mut d = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = d.token != token;
        d.token = token;
        let mut next = BTreeMap::new();
        for (lane, state) in lanes {
            let want = match d.lanes.remove(&lane) {
                Some(w) if w.state == state => w,
                _ => {
                    changed = true;
                    d.generation += 1;
                    Want {
                        state,
                        generation: d.generation,
                    }
                }
            };
            next.insert(lane, want);
        }
        changed |= !d.lanes.is_empty();
        d.lanes = next;
        drop(d);
        if changed {
            self.notify.notify_one();
        }
    }

    /// The generation of what is asked of `lane` now.
    pub fn generation(&self, lane: &Lane) -> Option<u64> {
        let d = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        d.lanes.get(lane).map(|w| w.generation)
    }

    /// What is asked now, per lane.
    pub fn desired(&self) -> BTreeMap<Lane, TrafficState> {
        let d = self.desired.lock().unwrap_or_else(|p| p.into_inner());
        d.lanes
            .iter()
            .map(|(k, w)| (k.clone(), w.state.clone()))
            .collect()
    }
}

/// How long one platform call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a matched lane is checked again.
const RECHECK: Duration = Duration::from_secs(2);

/// Starts the task; it reports on the returned receiver and stops on `shutdown`.
pub fn start(
    platform: Arc<dyn Platform>,
    shutdown: watch::Receiver<bool>,
) -> (TrafficHandle, mpsc::Receiver<Report>) {
    let handle = TrafficHandle {
        desired: Arc::new(Mutex::new(Desired::default())),
        notify: Arc::new(Notify::new()),
    };
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(run(handle.clone(), platform, tx, shutdown));
    (handle, rx)
}

/// One lane's pass: read what the platform serves and the newest token it applied; write when
/// either differs from what this controller asks (so a new leader stamps its token on every
/// lane it owns, and a deposed leader's late write is refused there); read back.
async fn converge(
    platform: &dyn Platform,
    lane: &Lane,
    want: &Want,
    token: u64,
) -> Result<Option<Report>, String> {
    let (region, service) = (lane.0.as_str(), lane.1.as_str());
    let timed = |what: &'static str| move |_| format!("the platform did not answer {what} in time");
    let read = || async {
        tokio::time::timeout(CALL_TIMEOUT, platform.traffic(region, service))
            .await
            .map_err(timed("a read"))?
            .map_err(|e| e.to_string())
    };
    let applied = tokio::time::timeout(CALL_TIMEOUT, platform.applied_token(region, service))
        .await
        .map_err(timed("a read"))?
        .map_err(|e| e.to_string())?;
    if applied > token {
        return Ok(Some(Report::Fenced { newer: applied }));
    }
    let observed = |state: Option<TrafficState>| {
        (state.as_ref() == Some(&want.state)).then(|| Report::Observed {
            lane: lane.clone(),
            state: want.state.clone(),
            generation: want.generation,
        })
    };
    if applied == token
        && let Some(report) = observed(read().await?)
    {
        return Ok(Some(report));
    }
    match tokio::time::timeout(
        CALL_TIMEOUT,
        platform.set_traffic(region, service, &want.state, token),
    )
    .await
    .map_err(timed("a write"))?
    {
        Ok(Applied::Done) => {}
        Ok(Applied::Refused { newer }) => return Ok(Some(Report::Fenced { newer })),
        Err(e) => return Err(e.to_string()),
    }
    Ok(observed(read().await?))
}

async fn run(
    handle: TrafficHandle,
    platform: Arc<dyn Platform>,
    tx: mpsc::Sender<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    // per lane: the generation last seen matching, and when
    let mut matched: HashMap<Lane, (u64, Instant)> = HashMap::new();
    let mut failing: HashMap<Lane, String> = HashMap::new();
    loop {
        let (token, lanes) = {
            let d = handle.desired.lock().unwrap_or_else(|p| p.into_inner());
            (d.token, d.lanes.clone())
        };
        matched.retain(|lane, _| lanes.contains_key(lane));
        let mut pending = false;
        if let Some(token) = token {
            let work: Vec<(&Lane, &Want)> = lanes
                .iter()
                .filter(|(lane, w)| {
                    matched
                        .get(*lane)
                        .is_none_or(|(g, at)| *g != w.generation || at.elapsed() >= RECHECK)
                })
                .collect();
            let results = futures_util::future::join_all(
                work.iter()
                    .map(|(lane, w)| converge(platform.as_ref(), lane, w, token)),
            )
            .await;
            for ((lane, w), result) in work.into_iter().zip(results) {
                match result {
                    Ok(Some(report)) => {
                        if matches!(report, Report::Observed { .. }) {
                            matched.insert(lane.clone(), (w.generation, Instant::now()));
                            if failing.remove(lane).is_some() {
                                tracing::info!(region = %lane.0, service = %lane.1, "traffic change went through");
                            }
                        }
                        if tx.send(report).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => pending = true,
                    Err(why) => {
                        pending = true;
                        matched.remove(lane);
                        if failing.get(lane) != Some(&why) {
                            tracing::warn!(region = %lane.0, service = %lane.1, error = %why, "traffic change failed; retrying until the platform takes it");
                        }
                        failing.insert(lane.clone(), why);
                    }
                }
            }
        }
        let wait = if pending {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            _ = handle.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use tai_core::clock::ManualClock;
    use tai_core::store::MemoryStore;

    use super::*;
    use crate::fleet::{DEFAULT_FLEET, FleetFixture, SimFleet};

    fn lane() -> Lane {
        ("us-west-2".to_owned(), "api-service".to_owned())
    }

    #[test]
    fn a_desired_state_asked_again_gets_a_new_generation() {
        let h = TrafficHandle {
            desired: Arc::new(Mutex::new(Desired::default())),
            notify: Arc::new(Notify::new()),
        };
        let stable = TrafficState::only("v1");
        let canary = TrafficState::split("v1", Some("v2"), 5);
        h.set(Some(1), BTreeMap::from([(lane(), stable.clone())]));
        let first = h.generation(&lane()).expect("asked");
        h.set(Some(1), BTreeMap::from([(lane(), stable.clone())]));
        assert_eq!(
            h.generation(&lane()),
            Some(first),
            "unchanged: same generation"
        );
        h.set(Some(1), BTreeMap::from([(lane(), canary)]));
        h.set(Some(1), BTreeMap::from([(lane(), stable)]));
        let again = h.generation(&lane()).expect("asked");
        assert!(
            again > first,
            "a report about the first ask must not count for the same state asked again"
        );
        h.set(Some(1), BTreeMap::new());
        assert_eq!(
            h.generation(&lane()),
            None,
            "a released lane is asked nothing"
        );
    }

    #[tokio::test]
    async fn a_new_leader_stamps_its_token_even_where_the_state_already_matches() {
        let clock = ManualClock::new();
        let fleet = SimFleet::new(
            FleetFixture::from_toml(DEFAULT_FLEET).expect("fixture"),
            Arc::new(MemoryStore::new(clock.shared())),
            clock.shared(),
        );
        let stable = TrafficState::only("v1.9.0");
        let canary = TrafficState::split("v1.9.0", Some("v2.0.0"), 5);
        // the old leader (token 5) set the canary; the new leader (token 6) wants stable
        fleet
            .set_traffic("us-west-2", "api-service", &stable, 5)
            .await
            .expect("mem");
        let want = Want {
            state: stable.clone(),
            generation: 1,
        };
        let r = converge(&fleet, &lane(), &want, 6).await.expect("converge");
        assert!(matches!(r, Some(Report::Observed { generation: 1, .. })));
        assert_eq!(
            fleet
                .applied_token("us-west-2", "api-service")
                .await
                .expect("mem"),
            6,
            "stamped although the traffic already matched"
        );
        // so the deposed leader's late write is refused
        assert_eq!(
            fleet
                .set_traffic("us-west-2", "api-service", &canary, 5)
                .await
                .expect("mem"),
            Applied::Refused { newer: 6 }
        );
        // and the deposed leader's own task learns it was fenced out
        let old = Want {
            state: canary,
            generation: 9,
        };
        assert_eq!(
            converge(&fleet, &lane(), &old, 5).await.expect("converge"),
            Some(Report::Fenced { newer: 6 })
        );
    }
}
