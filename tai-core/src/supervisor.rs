//! Supervision: every background worker (confirmation worker, reconciler, rollout loop, outbox
//! relay, webhook deliveries...) runs under a supervisor that starts it again when it panics
//! or returns before shutdown, with exponential backoff (Erlang/OTP's one-for-one strategy).
//!
//! Each worker's state and restart count are on `/status` (`workers`) and in the metrics
//! (`tai_worker_up{worker}`, `tai_worker_restarts_total{worker}`, both exported from the
//! start), and the figure `worker_restarts_5m` (the most restarts of any one worker in the last
//! five minutes) turns Andon YELLOW when a worker restarts too often.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// How long a worker waits before it is started again: `first`, doubling up to `max`; a run
/// that lasted `healthy_after` starts the doubling over.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A run this long counts as healthy: the next failure waits `first` again.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(100),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Running.
    Running,
    /// Ended (panicked or returned) and waiting for its restart.
    Restarting,
    /// Stopped for shutdown.
    Stopped,
}

/// One worker, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// What it is doing.
    pub state: WorkerState,
    /// How many times it was started again.
    pub restarts: u64,
    /// Restarts in the last five minutes.
    pub restarts_5m: u64,
    /// How its last run ended (`panicked: ...` or `returned`), if it ended.
    pub last_exit: Option<String>,
}

#[derive(Debug)]
struct Worker {
    state: WorkerState,
    restarts: u64,
    recent: VecDeque<Instant>,
    last_exit: Option<String>,
    poison: Arc<Notify>,
}

const RECENT: Duration = Duration::from_secs(300);

/// Runs workers and starts them again; clone it freely.
#[derive(Debug, Clone)]
pub struct Supervisor {
    workers: Arc<Mutex<BTreeMap<String, Worker>>>,
    up: IntGaugeVec,
    restarts: IntCounterVec,
}

/// The message a panic carried (`panic!("...")`), for logs and answers.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

impl Supervisor {
    /// A supervisor registering its metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let up = IntGaugeVec::new(
            Opts::new("tai_worker_up", "1 while a background worker runs, 0 while it waits for its restart or after it stopped"),
            &["worker"],
        )
        .expect("constant metric definition");
        let restarts = IntCounterVec::new(
            Opts::new(
                "tai_worker_restarts_total",
                "Background workers started again after they panicked or returned",
            ),
            &["worker"],
        )
        .expect("constant metric definition");
        Self {
            workers: Arc::default(),
            up: crate::kaizen::register(registry, up),
            restarts: crate::kaizen::register(registry, restarts),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Worker>) -> R) -> R {
        let mut workers = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut workers)
    }

    /// Runs the worker `make` builds under `name` until `shutdown` turns `true`: when it panics
    /// or returns before that, it is built and started again after the backoff. The returned
    /// task ends once the worker has stopped for shutdown.
    pub fn spawn<F, Fut>(
        &self,
        name: &str,
        backoff: Backoff,
        shutdown: watch::Receiver<bool>,
        make: F,
    ) -> JoinHandle<()>
    where
        F: Fn(watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let poison = Arc::new(Notify::new());
        self.with(|w| {
            w.insert(
                name.to_owned(),
                Worker {
                    state: WorkerState::Running,
                    restarts: 0,
                    recent: VecDeque::new(),
                    last_exit: None,
                    poison: poison.clone(),
                },
            )
        });
        self.up.with_label_values(&[name]).set(1);
        self.restarts.with_label_values(&[name]).inc_by(0);
        let (this, name) = (self.clone(), name.to_owned());
        let mut shutdown = shutdown;
        tokio::spawn(async move {
            let mut delay = backoff.first;
            loop {
                let started = Instant::now();
                let run = make(shutdown.clone());
                let poison = poison.clone();
                let task = tokio::spawn(async move {
                    tokio::select! {
                        () = run => {}
                        () = poison.notified() => panic!("poisoned through the test hook"),
                    }
                });
                let exit = match task.await {
                    Ok(()) => "returned".to_owned(),
                    Err(e) if e.is_panic() => {
                        format!("panicked: {}", panic_message(e.into_panic()))
                    }
                    Err(e) => format!("cancelled: {e}"),
                };
                // shutdown asked for, or no longer possible to ask for (the service is gone,
                // e.g. it could not start): a stop, not a crash
                if *shutdown.borrow() || shutdown.has_changed().is_err() {
                    this.set_state(&name, WorkerState::Stopped, None);
                    return;
                }
                if started.elapsed() >= backoff.healthy_after {
                    delay = backoff.first;
                }
                tracing::error!(worker = %name, exit = %exit, restart_in_ms = delay.as_millis() as u64, "a background worker ended; starting it again");
                this.set_state(&name, WorkerState::Restarting, Some(exit));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {
                        this.set_state(&name, WorkerState::Stopped, None);
                        return;
                    }
                }
                delay = (delay * 2).min(backoff.max);
                this.restarts.with_label_values(&[&name]).inc();
                this.with(|w| {
                    if let Some(w) = w.get_mut(&name) {
                        w.restarts += 1;
                        w.recent.push_back(Instant::now());
                    }
                });
                this.set_state(&name, WorkerState::Running, None);
            }
        })
    }

    fn set_state(&self, name: &str, state: WorkerState, exit: Option<String>) {
        self.up
            .with_label_values(&[name])
            .set(i64::from(state == WorkerState::Running));
        self.with(|w| {
            if let Some(w) = w.get_mut(name) {
                w.state = state;
                if exit.is_some() {
                    w.last_exit = exit;
                }
            }
        });
    }

    /// Every worker, by name.
    pub fn snapshot(&self) -> BTreeMap<String, WorkerStatus> {
        let now = Instant::now();
        self.with(|workers| {
            workers
                .iter_mut()
                .map(|(name, w)| {
                    while w
                        .recent
                        .front()
                        .is_some_and(|t| now.duration_since(*t) > RECENT)
                    {
                        w.recent.pop_front();
                    }
                    let status = WorkerStatus {
                        state: w.state,
                        restarts: w.restarts,
                        restarts_5m: w.recent.len() as u64,
                        last_exit: w.last_exit.clone(),
                    };
                    (name.clone(), status)
                })
                .collect()
        })
    }

    /// The most restarts of any one worker in the last five minutes (Andon's figure).
    pub fn most_recent_restarts(&self) -> u64 {
        self.snapshot()
            .values()
            .map(|w| w.restarts_5m)
            .max()
            .unwrap_or(0)
    }

    /// Makes the running worker `name` panic (the test hook, `TAI_TEST_HOOKS=true`): `false`
    /// when there is no such worker.
    pub fn poison(&self, name: &str) -> bool {
        self.with(|w| w.get(name).map(|w| w.poison.clone()))
            .map(|p| p.notify_one())
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn quick() -> Backoff {
        Backoff {
            first: Duration::from_millis(5),
            max: Duration::from_millis(20),
            healthy_after: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn a_worker_that_panics_or_returns_is_started_again_until_shutdown() {
        let sup = Supervisor::new(&Registry::new());
        let (tx, rx) = watch::channel(false);
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let task = sup.spawn("flaky", quick(), rx, move |mut stop| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => panic!("boom"),
                    1 => {}
                    _ => {
                        let _ = stop.wait_for(|s| *s).await;
                    }
                }
            }
        });
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let w = sup.snapshot()["flaky"].clone();
        assert_eq!(w.restarts, 2);
        assert_eq!(w.state, WorkerState::Running);
        assert_eq!(w.last_exit.as_deref(), Some("returned"));
        assert_eq!(sup.most_recent_restarts(), 2);
        tx.send(true).expect("send");
        task.await.expect("supervisor ends");
        assert_eq!(sup.snapshot()["flaky"].state, WorkerState::Stopped);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not started again after shutdown"
        );
    }

    #[tokio::test]
    async fn a_worker_whose_shutdown_signal_is_gone_is_stopped_not_restarted() {
        // a service that fails to start (its port taken) drops its shutdown sender: its workers
        // end, and that is a stop, not a crash to restart and report
        let sup = Supervisor::new(&Registry::new());
        let (tx, rx) = watch::channel(false);
        let task = sup.spawn("steady", quick(), rx, |mut stop| async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        drop(tx);
        task.await.expect("supervisor ends");
        let w = sup.snapshot()["steady"].clone();
        assert_eq!(w.state, WorkerState::Stopped, "{w:?}");
        assert_eq!(w.restarts, 0);
        assert_eq!(w.last_exit, None, "not reported as an unexpected exit");
    }

    #[tokio::test]
    async fn a_poisoned_worker_panics_and_comes_back() {
        let sup = Supervisor::new(&Registry::new());
        let (tx, rx) = watch::channel(false);
        let task = sup.spawn("steady", quick(), rx, |mut stop| async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        assert!(!sup.poison("nobody"));
        assert!(sup.poison("steady"));
        while sup.snapshot()["steady"].restarts == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let w = sup.snapshot()["steady"].clone();
        assert!(
            w.last_exit
                .as_deref()
                .is_some_and(|e| e.starts_with("panicked: poisoned")),
            "{w:?}"
        );
        tx.send(true).expect("send");
        task.await.expect("supervisor ends");
    }
}
