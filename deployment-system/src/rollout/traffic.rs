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
    /// The platform serves `state` in `lane`, as asked.
    Observed {
        /// The lane.
        lane: Lane,
        /// What it serves.
        state: TrafficState,
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

/// One lane's pass: read, write if different, read back.
async fn converge(
    platform: &dyn Platform,
    lane: &Lane,
    want: &TrafficState,
    token: u64,
) -> Result<Option<Report>, String> {
    let (region, service) = (lane.0.as_str(), lane.1.as_str());
    let read = || async {
        match tokio::time::timeout(CALL_TIMEOUT, platform.traffic(region, service)).await {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the platform did not answer in time".to_owned()),
        }
    };
    if read().await?.as_ref() == Some(want) {
        return Ok(Some(Report::Observed {
            lane: lane.clone(),
            state: want.clone(),
        }));
    }
    match tokio::time::timeout(
        CALL_TIMEOUT,
        platform.set_traffic(region, service, want, token),
    )
    .await
    {
        Ok(Ok(Applied::Done)) => {}
        Ok(Ok(Applied::Refused { newer })) => return Ok(Some(Report::Fenced { newer })),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("the platform did not answer in time".to_owned()),
    }
    Ok(
        (read().await?.as_ref() == Some(want)).then(|| Report::Observed {
            lane: lane.clone(),
            state: want.clone(),
        }),
    )
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
                    .map(|(lane, w)| converge(platform.as_ref(), lane, &w.state, token)),
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
