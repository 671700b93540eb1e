//! The operator's handle on the controller: send it new deployments and commands, read what it
//! holds. Reads never wait for the controller's loop.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tai_core::backend::BackendError;
use tai_core::store::StateStore;
use tokio::sync::{mpsc, oneshot};

use super::lanes;
use super::model::{Deployment, RegionStatus};
use crate::fleet::TrafficState;

/// What an operator can ask of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Roll back and stop.
    Abort,
    /// Skip the rest of the current stage's bake.
    Promote,
    /// Freeze the timers.
    Pause,
    /// Unfreeze them.
    Resume,
}

/// Why an operator command was refused.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No such deployment.
    #[error("no such deployment")]
    NotFound,
    /// The deployment is in a state the command does not fit.
    #[error("{0}")]
    Conflict(String),
    /// No controller holds the lease, or the holder did not answer in time.
    #[error("no controller took the command within 5 s (the lease may be changing hands); retry")]
    NotLeader,
    /// The store failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A message to the controller.
#[derive(Debug)]
pub enum Command {
    /// Accept a new deployment.
    Create(
        Box<Deployment>,
        oneshot::Sender<Result<Deployment, BackendError>>,
    ),
    /// An operator command.
    Operate(String, Op, oneshot::Sender<Result<Deployment, OpError>>),
}

/// Where the arrival order is issued: one counter in the store for every replica.
pub const SEQ_KEY: &str = "dep:seq";

/// The handle the API uses: send commands, read deployments.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) view: Arc<RwLock<BTreeMap<String, Deployment>>>,
    pub(super) store: Arc<dyn StateStore>,
}

pub(super) fn stopped() -> BackendError {
    BackendError::Unavailable {
        backend: "controller",
        message: "the controller is shutting down".into(),
    }
}

impl ControllerHandle {
    /// A deployment as it stands.
    pub fn get(&self, id: &str) -> Option<Deployment> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every deployment, newest first.
    pub fn list(&self) -> Vec<Deployment> {
        let mut all: Vec<Deployment> = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|d| std::cmp::Reverse(d.seq));
        all
    }

    /// The next arrival number, issued by the store (the same order on every replica).
    pub async fn next_seq(&self) -> Result<u64, BackendError> {
        self.store.incr(SEQ_KEY).await
    }

    /// Hands a new deployment to the controller; answers once it is stored.
    pub async fn create(&self, d: Deployment) -> Result<Deployment, BackendError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Create(Box::new(d), tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs an operator command.
    pub async fn operate(&self, id: &str, op: Op) -> Result<Deployment, OpError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Operate(id.to_owned(), op, tx))
            .await
            .map_err(|_| OpError::Backend(stopped()))?;
        rx.await.map_err(|_| OpError::Backend(stopped()))?
    }

    /// Waits up to `within` for deployment `id` to end; answers it as it then stands.
    pub async fn wait_end(&self, id: &str, within: Duration) -> Option<Deployment> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let d = self.get(id)?;
            if d.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Some(d);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many regions hold a stage on the gate right now (inconclusive, errors).
    pub fn inconclusive_now(&self) -> usize {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|d| !d.status.is_terminal())
            .flat_map(|d| d.regions.iter())
            .filter(|r| r.status == RegionStatus::InProgress && r.inconclusive_since.is_some())
            .count()
    }

    /// How many deployments have not ended.
    pub fn in_progress(&self) -> usize {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|d| !d.status.is_terminal())
            .count()
    }

    /// What the deployments ask of each (region, service) they own.
    pub fn desired(&self) -> BTreeMap<lanes::Lane, TrafficState> {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        desired_of(view.values().filter(|d| !d.status.is_terminal()))
    }
}

/// The desired traffic of every owned lane.
pub fn desired_of<'a>(
    active: impl IntoIterator<Item = &'a Deployment> + Clone,
) -> BTreeMap<lanes::Lane, TrafficState> {
    let by_id: BTreeMap<&str, &Deployment> = active
        .clone()
        .into_iter()
        .map(|d| (d.deployment_id.as_str(), d))
        .collect();
    let mut out = BTreeMap::new();
    for (lane, owner) in lanes::owners(active) {
        if let Some(d) = by_id.get(owner.as_str())
            && let Some(i) = d.regions.iter().position(|r| r.region == lane.0)
            && let Some(t) = d.desired(i)
        {
            out.insert(lane, t);
        }
    }
    out
}
