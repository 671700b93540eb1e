//! The controller: one loop that owns every active deployment.
//!
//! Operator commands and new deployments arrive on a channel, so the loop is the only writer
//! and no transition races another. Each tick it reconciles every active deployment in arrival
//! order against the clock:
//!
//! - a deployment whose next region is free, and which is first in that region's line, takes
//!   the region; others wait `PENDING` with their queue position;
//! - a running stage is measured every `interval_secs`; a failed gate rolls the region back at
//!   once; an inconclusive measurement holds the stage, failing it only after
//!   `max_inconclusive_secs`; at the stage's deadline a last measurement decides promotion.
//!
//! Every transition is written to the store before its effect on the platform, and deadlines
//! are absolute times, so a restarted controller loads the active deployments, re-applies the
//! traffic each one should have, and carries on where it stood.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tai_core::audit::AuditSink;
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::store::StateStore;
use tokio::sync::{mpsc, oneshot, watch};

use super::model::{AnalysisRecord, Deployment, RegionStatus, Status};
use crate::analysis::AnalysisProvider;
use crate::fleet::Platform;
use crate::metrics::DeploymentMetrics;
use crate::signal::{OnRegionFailure, Provider};

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

/// The handle the API uses: send commands, read deployments.
#[derive(Debug, Clone)]
pub struct ControllerHandle {
    tx: mpsc::Sender<Command>,
    view: Arc<RwLock<BTreeMap<String, Deployment>>>,
    seq: Arc<std::sync::atomic::AtomicU64>,
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

    /// The next arrival number.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
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

    /// How many regions are holding a stage on inconclusive measurements right now.
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
}

const LEASE_KEY: &str = "dep:controller:lease";
const CMD_PREFIX: &str = "dep:cmd:";
const CMD_SEQ: &str = "dep:cmdseq";
const CHANGE_SEQ: &str = "dep:changeseq";
const CREATE_SEQ: &str = "dep:createseq";
const RESULT_PREFIX: &str = "dep:cmdresult:";

#[derive(serde::Serialize, serde::Deserialize)]
struct Forwarded {
    id: String,
    op: Op,
}

#[derive(serde::Serialize, serde::Deserialize)]
enum ForwardedAnswer {
    Done(Box<Deployment>),
    NotFound,
    Conflict(String),
    Failed(String),
}

/// Hands `op` on deployment `id` to the lease holder and waits (up to 5 s) for its answer.
async fn forward(store: Arc<dyn StateStore>, id: &str, op: Op) -> Result<Deployment, OpError> {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let cmd = serde_json::to_vec(&Forwarded {
        id: id.to_owned(),
        op,
    })
    .unwrap_or_default();
    store
        .put(
            &format!("{CMD_PREFIX}{nonce}"),
            cmd,
            Some(Duration::from_secs(30)),
        )
        .await?;
    if let Err(e) = store.incr(CMD_SEQ).await {
        let _ = store.delete(&format!("{CMD_PREFIX}{nonce}")).await;
        return Err(e.into());
    }
    let result_key = format!("{RESULT_PREFIX}{nonce}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if let Some(bytes) = store.get(&result_key).await? {
            let _ = store.delete(&result_key).await;
            return match serde_json::from_slice::<ForwardedAnswer>(&bytes) {
                Ok(ForwardedAnswer::Done(d)) => Ok(*d),
                Ok(ForwardedAnswer::NotFound) => Err(OpError::NotFound),
                Ok(ForwardedAnswer::Conflict(m)) => Err(OpError::Conflict(m)),
                Ok(ForwardedAnswer::Failed(m)) => {
                    Err(OpError::Backend(BackendError::Unavailable {
                        backend: "controller",
                        message: m,
                    }))
                }
                Err(e) => Err(OpError::Backend(BackendError::Protocol {
                    backend: "controller",
                    message: e.to_string(),
                })),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // nobody took it: take it back, so it does not run later by surprise
    let _ = store.delete(&format!("{CMD_PREFIX}{nonce}")).await;
    Err(OpError::NotLeader)
}
const FENCE_KEY: &str = "dep:controller:fence";

fn not_leader() -> BackendError {
    BackendError::Unavailable {
        backend: "lease",
        message: "this replica does not hold the controller lease".into(),
    }
}

fn stopped() -> BackendError {
    BackendError::Unavailable {
        backend: "controller",
        message: "the controller is shutting down".into(),
    }
}

/// Where deployments are stored.
pub fn key(id: &str) -> String {
    format!("dep:dpl:{id}")
}

/// The controller loop's state.
pub struct Controller {
    store: Arc<dyn StateStore>,
    platform: Arc<dyn Platform>,
    providers: HashMap<Provider, Arc<dyn AnalysisProvider>>,
    clock: SharedClock,
    metrics: Arc<DeploymentMetrics>,
    view: Arc<RwLock<BTreeMap<String, Deployment>>>,
    rx: mpsc::Receiver<Command>,
    /// Deployments whose platform traffic must be (re)applied from their stored state.
    needs_apply: HashSet<String>,
    /// This replica's id in the lease.
    instance: String,
    /// The fencing token while this replica holds the controller lease.
    leader_token: Option<u64>,
    lease_ttl: Duration,
    last_lease: std::time::Instant,
    last_sync: std::time::Instant,
    last_commands: std::time::Instant,
    commands_seen: Vec<u8>,
    synced_seq: Vec<u8>,
    /// Where every event is published, and how many of each deployment's events were.
    audit: Arc<dyn AuditSink>,
    subject_prefix: String,
    published: HashMap<String, usize>,
    tick: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("platform", &self.platform.kind())
            .finish_non_exhaustive()
    }
}

fn ms(d: f64) -> chrono::Duration {
    chrono::Duration::milliseconds((d * 1000.0).round() as i64)
}

impl Controller {
    /// Loads every stored deployment and returns the controller and its handle.
    pub async fn load(
        store: Arc<dyn StateStore>,
        platform: Arc<dyn Platform>,
        providers: HashMap<Provider, Arc<dyn AnalysisProvider>>,
        clock: SharedClock,
        metrics: Arc<DeploymentMetrics>,
        audit: Arc<dyn AuditSink>,
        subject_prefix: &str,
    ) -> Result<(Self, ControllerHandle), BackendError> {
        let mut view = BTreeMap::new();
        let mut needs_apply = HashSet::new();
        let mut max_seq = 0;
        let mut published = HashMap::new();
        for k in store.keys("dep:dpl:").await? {
            let Some(bytes) = store.get(&k).await? else {
                continue;
            };
            match serde_json::from_slice::<Deployment>(&bytes) {
                Ok(d) => {
                    max_seq = max_seq.max(d.seq);
                    if d.status.is_terminal() {
                        published.insert(d.deployment_id.clone(), d.events.len());
                    } else {
                        // republished from the start: the stream's duplicate window drops repeats
                        tracing::info!(deployment_id = %d.deployment_id, status = ?d.status, "resuming deployment");
                        needs_apply.insert(d.deployment_id.clone());
                    }
                    view.insert(d.deployment_id.clone(), d);
                }
                Err(e) => {
                    tracing::error!(key = %k, error = %e, "unreadable deployment record; skipped")
                }
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let view = Arc::new(RwLock::new(view));
        let handle = ControllerHandle {
            tx,
            view: view.clone(),
            seq: Arc::new(std::sync::atomic::AtomicU64::new(max_seq)),
        };
        let lease_ttl = Duration::from_millis(3000);
        let long_ago = std::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap_or_else(std::time::Instant::now);
        let controller = Self {
            instance: format!("ctl_{}", uuid::Uuid::new_v4().simple()),
            leader_token: None,
            lease_ttl,
            last_lease: long_ago,
            last_sync: long_ago,
            last_commands: long_ago,
            commands_seen: Vec::new(),
            synced_seq: Vec::new(),
            audit,
            subject_prefix: subject_prefix.to_owned(),
            published,
            store,
            platform,
            providers,
            clock,
            metrics,
            view,
            rx,
            needs_apply,
            tick: Duration::from_millis(25),
        };
        Ok((controller, handle))
    }

    /// Sets how long the controller lease lasts without renewal (a standby takes over after it).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Takes or renews the controller lease. Only the holder drives rollouts; every write it
    /// makes carries its fencing token, so a replica that lost the lease (paused, partitioned)
    /// cannot overwrite what the new holder wrote.
    async fn hold_lease(&mut self) {
        // the holder renews three times per lease; a standby asks four times a second
        let every = if self.leader_token.is_some() {
            self.lease_ttl / 3
        } else {
            Duration::from_millis(250)
        };
        if self.last_lease.elapsed() < every {
            return;
        }
        self.last_lease = std::time::Instant::now();
        let me = self.instance.as_bytes().to_vec();
        match self.leader_token {
            Some(token) => match self
                .store
                .compare_and_swap(LEASE_KEY, &me, me.clone(), Some(self.lease_ttl))
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(instance = %self.instance, token, "lost the controller lease; standing by");
                    self.leader_token = None;
                }
                Err(e) => {
                    // unable to renew: stop driving before the lease could pass to another replica
                    tracing::warn!(instance = %self.instance, error = %e, "cannot renew the controller lease; standing by");
                    self.leader_token = None;
                }
            },
            None => {
                if let Ok(true) = self
                    .store
                    .put_if_absent(LEASE_KEY, me, Some(self.lease_ttl))
                    .await
                {
                    match self.store.incr(FENCE_KEY).await {
                        Ok(token) => {
                            tracing::info!(instance = %self.instance, token, "took the controller lease");
                            self.leader_token = Some(token);
                            self.sync(true).await;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "took the lease but could not get a fencing token")
                        }
                    }
                }
            }
        }
    }

    /// Reloads deployments from the store: all of them on a standby (to answer reads), and on
    /// the leader the ones it does not know yet (accepted by standbys) or, on `takeover`, all.
    async fn sync(&mut self, takeover: bool) {
        self.last_sync = std::time::Instant::now();
        // a standby reloads when the leader changed anything, the leader when a standby
        // accepted a deployment: one read decides, the key scan only follows a change
        let watched = if self.leader_token.is_some() {
            CREATE_SEQ
        } else {
            CHANGE_SEQ
        };
        if !takeover {
            match self.store.get(watched).await {
                Ok(seq) if seq.clone().unwrap_or_default() == self.synced_seq => return,
                Ok(seq) => self.synced_seq = seq.unwrap_or_default(),
                Err(_) => return,
            }
        }
        let keys = match self.store.keys("dep:dpl:").await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list deployments");
                return;
            }
        };
        let leader = self.leader_token.is_some();
        for k in keys {
            let id = k.trim_start_matches("dep:dpl:").to_owned();
            let known = self.snapshot(&id).is_some();
            if leader && known && !takeover {
                continue;
            }
            let Ok(Some(bytes)) = self.store.get(&k).await else {
                continue;
            };
            let Ok(d) = serde_json::from_slice::<Deployment>(&bytes) else {
                continue;
            };
            if leader && !d.status.is_terminal() {
                self.needs_apply.insert(d.deployment_id.clone());
            }
            if d.status.is_terminal() {
                self.published
                    .entry(d.deployment_id.clone())
                    .or_insert(d.events.len());
            }
            self.update_view(&d);
        }
        let active = self
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|d| !d.status.is_terminal())
            .count();
        self.metrics.set_in_progress(active);
    }

    /// Runs the operator commands standbys forwarded, and leaves each answer where its standby
    /// waits for it.
    async fn take_forwarded(&mut self) {
        self.last_commands = std::time::Instant::now();
        // one read tells whether anything was forwarded since the last look; only then list
        // the commands (a key scan is far dearer than a read in a shared Redis)
        let seq = match self.store.get(CMD_SEQ).await {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => return,
        };
        if seq == self.commands_seen {
            return;
        }
        self.commands_seen = seq;
        let Ok(keys) = self.store.keys(CMD_PREFIX).await else {
            return;
        };
        for k in keys {
            let Ok(Some(bytes)) = self.store.get(&k).await else {
                continue;
            };
            // delete first: if another leader raced us, only one of us runs it
            if !matches!(self.store.delete(&k).await, Ok(true)) {
                continue;
            }
            let Ok(cmd) = serde_json::from_slice::<Forwarded>(&bytes) else {
                continue;
            };
            let answer = match self.operate(&cmd.id, cmd.op).await {
                Ok(d) => ForwardedAnswer::Done(Box::new(d)),
                Err(OpError::NotFound) => ForwardedAnswer::NotFound,
                Err(OpError::Conflict(m)) => ForwardedAnswer::Conflict(m),
                Err(e) => ForwardedAnswer::Failed(e.to_string()),
            };
            let nonce = &k[CMD_PREFIX.len()..];
            let _ = self
                .store
                .put(
                    &format!("{RESULT_PREFIX}{nonce}"),
                    serde_json::to_vec(&answer).unwrap_or_default(),
                    Some(Duration::from_secs(30)),
                )
                .await;
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => return,
                },
                _ = tokio::time::sleep(self.tick) => {}
                _ = shutdown.changed() => {
                    tracing::info!("controller stopping; active rollouts resume from the store on the next start");
                    return;
                }
            }
            self.hold_lease().await;
            if self.last_sync.elapsed() >= Duration::from_millis(500) {
                self.sync(false).await;
            }
            if self.leader_token.is_some() {
                if self.last_commands.elapsed() >= Duration::from_millis(100) {
                    self.take_forwarded().await;
                }
                self.reconcile().await;
            }
        }
    }

    fn snapshot(&self, id: &str) -> Option<Deployment> {
        self.view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn update_view(&self, d: &Deployment) {
        self.view
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d.deployment_id.clone(), d.clone());
    }

    async fn persist(&mut self, d: &mut Deployment) -> Result<(), BackendError> {
        d.refresh(self.clock.wall());
        let token = self.leader_token.ok_or_else(not_leader)?;
        let bytes = serde_json::to_vec(&d).unwrap_or_default();
        if !self
            .store
            .put_fenced(&key(&d.deployment_id), bytes, FENCE_KEY, token)
            .await?
        {
            tracing::warn!(instance = %self.instance, token, "a newer controller holds the fence; standing by");
            self.leader_token = None;
            return Err(not_leader());
        }
        // standbys reload their view when this moves
        let _ = self.store.incr(CHANGE_SEQ).await;
        self.update_view(d);
        self.publish_events(d).await;
        Ok(())
    }

    /// Publishes the events not yet published, in order; stops at the first failure and tries
    /// again after the next transition.
    async fn publish_events(&mut self, d: &Deployment) {
        let done = self.published.get(&d.deployment_id).copied().unwrap_or(0);
        let subject = format!("{}.{}", self.subject_prefix, d.deployment_id);
        for (i, event) in d.events.iter().enumerate().skip(done) {
            let payload = json!({"deployment_id": d.deployment_id, "service": d.service, "version": d.version, "seq": i, "event": event});
            let id = format!("{}:{i}", d.deployment_id);
            if let Err(e) = self
                .audit
                .publish(&subject, &id, payload.to_string().into_bytes())
                .await
            {
                tracing::warn!(deployment_id = %d.deployment_id, error = %e, "audit event not published; will retry");
                return;
            }
            self.published.insert(d.deployment_id.clone(), i + 1);
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Create(d, reply) => {
                let mut d = *d;
                let result = if self.leader_token.is_some() {
                    self.persist(&mut d).await.map(|()| d.clone())
                } else {
                    // a standby stores it as accepted; the leader picks it up on its next sync
                    d.refresh(self.clock.wall());
                    let bytes = serde_json::to_vec(&d).unwrap_or_default();
                    match self
                        .store
                        .put_if_absent(&key(&d.deployment_id), bytes, None)
                        .await
                    {
                        Ok(_) => {
                            let _ = self.store.incr(CREATE_SEQ).await;
                            self.update_view(&d);
                            Ok(d.clone())
                        }
                        Err(e) => Err(e),
                    }
                };
                if result.is_ok() {
                    tracing::info!(deployment_id = %d.deployment_id, service = %d.service, version = %d.version, regions = ?d.regions.iter().map(|r| r.region.as_str()).collect::<Vec<_>>(), "deployment accepted");
                }
                let _ = reply.send(result);
            }
            Command::Operate(id, op, reply) if self.leader_token.is_some() => {
                let result = self.operate(&id, op).await;
                let _ = reply.send(result);
            }
            Command::Operate(id, op, reply) => {
                // a standby hands the command to the lease holder through the store, and waits
                // for its answer without holding up this loop
                let store = self.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(forward(store, &id, op).await);
                });
            }
        }
    }

    async fn operate(&mut self, id: &str, op: Op) -> Result<Deployment, OpError> {
        let mut d = self.snapshot(id).ok_or(OpError::NotFound)?;
        if self.leader_token.is_none() {
            return Err(OpError::NotLeader);
        }
        if d.status.is_terminal() {
            return Err(OpError::Conflict(format!(
                "deployment {id} already ended as {:?}",
                d.status
            )));
        }
        let now = self.clock.wall();
        let ci = d.current_region;
        match op {
            Op::Abort => {
                self.roll_back_all(&mut d, now, "aborted by an operator")
                    .await?;
                for r in &mut d.regions {
                    if r.status == RegionStatus::Pending {
                        r.status = RegionStatus::Skipped;
                    }
                }
                self.finish(&mut d, Status::Aborted, now);
                d.event(now, "aborted", None, None, json!({"by": "operator"}));
                self.persist(&mut d).await?;
                self.apply(&d).await;
                self.metrics.ended(Status::Aborted, &d);
            }
            Op::Pause => {
                if d.paused {
                    return Err(OpError::Conflict(format!(
                        "deployment {id} is already paused"
                    )));
                }
                d.paused = true;
                if let Some(r) = d.regions.get_mut(ci)
                    && r.status == RegionStatus::InProgress
                {
                    let left = r
                        .stage_deadline
                        .map(|dl| (dl - now).num_milliseconds().max(0) as u64);
                    r.paused_remaining_ms = left;
                    r.stage_deadline = None;
                    r.next_analysis_at = None;
                }
                d.event(now, "paused", None, None, json!({"by": "operator"}));
                self.persist(&mut d).await?;
            }
            Op::Resume => {
                if !d.paused {
                    return Err(OpError::Conflict(format!("deployment {id} is not paused")));
                }
                d.paused = false;
                let interval = d.analysis.interval_secs;
                if let Some(r) = d.regions.get_mut(ci)
                    && r.status == RegionStatus::InProgress
                {
                    let left = r.paused_remaining_ms.take().unwrap_or(0);
                    r.stage_deadline = Some(now + chrono::Duration::milliseconds(left as i64));
                    r.next_analysis_at = Some(now + ms(interval));
                }
                d.event(now, "resumed", None, None, json!({"by": "operator"}));
                self.persist(&mut d).await?;
            }
            Op::Promote => {
                let Some(r) = d
                    .regions
                    .get_mut(ci)
                    .filter(|r| r.status == RegionStatus::InProgress)
                else {
                    return Err(OpError::Conflict(format!(
                        "deployment {id} has no stage running to promote"
                    )));
                };
                let stage = d.stages.get(r.stage_index).map(|s| s.name.clone());
                r.stage_deadline = Some(now);
                r.next_analysis_at = Some(now);
                if d.paused {
                    d.paused = false;
                    r.paused_remaining_ms = None;
                }
                let region = r.region.clone();
                d.event(
                    now,
                    "promoted",
                    Some(&region),
                    stage.as_deref(),
                    json!({"by": "operator", "skipped": "the rest of the bake"}),
                );
                self.persist(&mut d).await?;
            }
        }
        Ok(d)
    }

    /// Sets every region's traffic to what the deployment's state says it should be.
    async fn apply(&self, d: &Deployment) {
        for r in &d.regions {
            let result = match r.status {
                RegionStatus::InProgress => {
                    let weight = d.stages.get(r.stage_index).map(|s| s.weight).unwrap_or(0);
                    self.platform
                        .set_traffic(
                            &r.region,
                            &d.service,
                            &r.stable_version,
                            Some(&d.version),
                            weight,
                        )
                        .await
                }
                RegionStatus::Success => {
                    self.platform
                        .set_traffic(
                            &r.region,
                            &d.service,
                            &r.stable_version,
                            Some(&d.version),
                            100,
                        )
                        .await
                }
                RegionStatus::RolledBack | RegionStatus::Aborted => {
                    self.platform
                        .set_traffic(&r.region, &d.service, &r.stable_version, None, 0)
                        .await
                }
                RegionStatus::Pending | RegionStatus::Skipped => Ok(()),
            };
            if let Err(e) = result {
                tracing::error!(deployment_id = %d.deployment_id, region = %r.region, error = %e, "could not set traffic; will retry");
            }
        }
    }

    fn finish(&self, d: &mut Deployment, status: Status, now: DateTime<Utc>) {
        d.status = status;
        d.finished_at = Some(now);
        d.paused = false;
    }

    /// Rolls back every region of `d` that is running or done.
    async fn roll_back_all(
        &self,
        d: &mut Deployment,
        now: DateTime<Utc>,
        why: &str,
    ) -> Result<(), BackendError> {
        for i in 0..d.regions.len() {
            let r = &mut d.regions[i];
            if matches!(r.status, RegionStatus::InProgress | RegionStatus::Success) {
                r.status = if why.starts_with("aborted") {
                    RegionStatus::Aborted
                } else {
                    RegionStatus::RolledBack
                };
                r.finished_at = Some(now);
                r.stage_deadline = None;
                r.next_analysis_at = None;
                let (region, stable) = (r.region.clone(), r.stable_version.clone());
                d.event(
                    now,
                    "rollback_started",
                    Some(&region),
                    None,
                    json!({"to": stable, "why": why}),
                );
            }
        }
        Ok(())
    }

    async fn reconcile(&mut self) {
        let now = self.clock.wall();
        let active: Vec<Deployment> = {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            let mut v: Vec<Deployment> = view
                .values()
                .filter(|d| !d.status.is_terminal())
                .cloned()
                .collect();
            v.sort_by_key(|d| d.seq);
            v
        };
        // which region each running deployment holds, and who waits for which region, in order
        let mut owner: HashMap<String, String> = HashMap::new();
        let mut waiting: HashMap<String, Vec<String>> = HashMap::new();
        for d in &active {
            if let Some(r) = d.regions.get(d.current_region) {
                match r.status {
                    RegionStatus::InProgress => {
                        owner.insert(r.region.clone(), d.deployment_id.clone());
                    }
                    RegionStatus::Pending => waiting
                        .entry(r.region.clone())
                        .or_default()
                        .push(d.deployment_id.clone()),
                    _ => {}
                }
            }
        }
        for mut d in active {
            if self.needs_apply.remove(&d.deployment_id) {
                self.apply(&d).await;
            }
            if self.leader_token.is_none() {
                return;
            }
            if let Err(e) = self.step(&mut d, &mut owner, &mut waiting, now).await {
                tracing::error!(deployment_id = %d.deployment_id, error = %e, "could not persist a transition; retrying");
                self.needs_apply.insert(d.deployment_id.clone());
            }
        }
    }

    async fn step(
        &mut self,
        d: &mut Deployment,
        owner: &mut HashMap<String, String>,
        waiting: &mut HashMap<String, Vec<String>>,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        if d.paused {
            return Ok(());
        }
        let ci = d.current_region;
        let Some(region) = d.regions.get(ci).map(|r| r.region.clone()) else {
            return Ok(());
        };
        match d.regions[ci].status {
            RegionStatus::Pending => {
                let line = waiting.get(&region).cloned().unwrap_or_default();
                let ahead = line
                    .iter()
                    .position(|id| *id == d.deployment_id)
                    .unwrap_or(0);
                let busy = owner.contains_key(&region);
                if busy || ahead > 0 {
                    // 1 = next to take the region once it is free
                    let position = ahead + 1;
                    if d.regions[ci].queue_position != Some(position) {
                        d.regions[ci].queue_position = Some(position);
                        if ci == 0 {
                            d.status = Status::Pending;
                        }
                        d.refresh(now);
                        self.update_view(d);
                    }
                    return Ok(());
                }
                // the region is free and we are first in line: take it
                if let Some(line) = waiting.get_mut(&region) {
                    line.retain(|id| *id != d.deployment_id);
                }
                owner.insert(region.clone(), d.deployment_id.clone());
                let stable = self
                    .platform
                    .traffic(&region, &d.service)
                    .await?
                    .map(|t| t.stable)
                    .unwrap_or_else(|| d.regions[ci].stable_version.clone());
                let r = &mut d.regions[ci];
                r.status = RegionStatus::InProgress;
                r.stable_version = stable.clone();
                r.queue_position = None;
                r.started_at = Some(now);
                d.status = Status::InProgress;
                d.event(
                    now,
                    "region_started",
                    Some(&region),
                    None,
                    json!({"stable_version": stable, "new_version": d.version}),
                );
                self.start_stage(d, 0, now).await?;
            }
            RegionStatus::InProgress => {
                let r = &d.regions[ci];
                let deadline = r.stage_deadline.unwrap_or(now);
                let due = r.next_analysis_at.is_none_or(|t| now >= t) || now >= deadline;
                if !due {
                    return Ok(());
                }
                let stage = d.stages[r.stage_index].clone();
                let provider = self.providers.get(&d.analysis.provider).cloned();
                let measured = match &provider {
                    Some(p) => p.measure(&d.service, &d.version, &region).await,
                    None => Err(format!(
                        "analysis provider {:?} is not configured",
                        d.analysis.provider
                    )),
                };
                let a = d.analysis.clone();
                let (result, detail, sample) = match measured {
                    Ok(s) if s.error_rate > a.max_error_rate => (
                        "fail",
                        format!("error rate {:.4} > {}", s.error_rate, a.max_error_rate),
                        Some(s),
                    ),
                    Ok(s) if s.p99_ms > a.max_p99_ms => (
                        "fail",
                        format!("p99 {:.1} ms > {} ms", s.p99_ms, a.max_p99_ms),
                        Some(s),
                    ),
                    Ok(s) => (
                        "pass",
                        format!(
                            "error rate {:.4} <= {}, p99 {:.1} ms <= {} ms",
                            s.error_rate, a.max_error_rate, s.p99_ms, a.max_p99_ms
                        ),
                        Some(s),
                    ),
                    Err(why) => ("inconclusive", why, None),
                };
                let record = AnalysisRecord {
                    at: now,
                    stage: stage.name.clone(),
                    provider: provider
                        .as_ref()
                        .map(|p| p.name())
                        .unwrap_or("none")
                        .to_owned(),
                    error_rate: sample.map(|s| s.error_rate),
                    p99_ms: sample.map(|s| s.p99_ms),
                    max_error_rate: a.max_error_rate,
                    max_p99_ms: a.max_p99_ms,
                    result: result.to_owned(),
                    detail: detail.clone(),
                };
                d.regions[ci].analysis.push(record.clone());
                let gate = json!({"error_rate": record.error_rate, "max_error_rate": a.max_error_rate, "p99_ms": record.p99_ms, "max_p99_ms": a.max_p99_ms, "provider": record.provider, "detail": detail});
                match result {
                    "pass" => {
                        d.regions[ci].inconclusive_since = None;
                        if now >= deadline {
                            self.complete_stage(d, owner, now, gate).await?;
                        } else {
                            d.regions[ci].next_analysis_at = Some(now + ms(a.interval_secs));
                            self.persist(d).await?;
                        }
                    }
                    "inconclusive" => {
                        let since = *d.regions[ci].inconclusive_since.get_or_insert(now);
                        if since == now {
                            d.event(now, "analysis_inconclusive", Some(&region), Some(&stage.name), json!({"detail": detail, "holding_for_at_most_secs": a.max_inconclusive_secs}));
                        }
                        if (now - since) >= ms(a.max_inconclusive_secs) {
                            let gate = json!({"decision": "rollback", "detail": format!("inconclusive for {:.1} s: {detail}", (now - since).num_milliseconds() as f64 / 1000.0)});
                            self.fail_region(d, owner, now, gate).await?;
                        } else {
                            // hold the stage: its bake does not end while the gate cannot tell
                            let r = &mut d.regions[ci];
                            r.next_analysis_at = Some(now + ms(a.interval_secs));
                            if r.stage_deadline.is_some_and(|dl| dl <= now) {
                                r.stage_deadline = Some(now + ms(a.interval_secs));
                            }
                            self.persist(d).await?;
                        }
                    }
                    _ => {
                        let mut gate = gate;
                        gate["decision"] = json!("rollback");
                        self.fail_region(d, owner, now, gate).await?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Starts stage `idx` in the current region: its bake and first measurement are timed from
    /// `now`; the transition is stored, then the traffic moves.
    async fn start_stage(
        &mut self,
        d: &mut Deployment,
        idx: usize,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let stage = d.stages[idx].clone();
        let interval = d.analysis.interval_secs;
        let ci = d.current_region;
        let r = &mut d.regions[ci];
        r.stage_index = idx;
        r.stage_started_at = Some(now);
        r.stage_deadline = Some(now + ms(stage.bake_secs));
        r.next_analysis_at = Some(now + ms(interval.min(stage.bake_secs)));
        let region = r.region.clone();
        d.event(
            now,
            "stage_started",
            Some(&region),
            Some(&stage.name),
            json!({"weight": stage.weight, "bake_secs": stage.bake_secs}),
        );
        self.persist(d).await?;
        self.apply(d).await;
        Ok(())
    }

    async fn complete_stage(
        &mut self,
        d: &mut Deployment,
        owner: &mut HashMap<String, String>,
        now: DateTime<Utc>,
        gate: serde_json::Value,
    ) -> Result<(), BackendError> {
        let ci = d.current_region;
        let region = d.regions[ci].region.clone();
        let idx = d.regions[ci].stage_index;
        let stage = d.stages[idx].clone();
        let took = d.regions[ci]
            .stage_started_at
            .map(|s| (now - s).num_milliseconds() as f64 / 1000.0)
            .unwrap_or(0.0);
        d.regions[ci].stages_completed.push(stage.name.clone());
        d.event(
            now,
            "stage_completed",
            Some(&region),
            Some(&stage.name),
            json!({"weight": stage.weight, "duration_secs": took, "gate": gate}),
        );
        self.metrics.stage(&stage.name, took);
        if idx + 1 < d.stages.len() {
            return self.start_stage(d, idx + 1, now).await;
        }
        let r = &mut d.regions[ci];
        r.status = RegionStatus::Success;
        r.finished_at = Some(now);
        r.stage_deadline = None;
        r.next_analysis_at = None;
        d.event(
            now,
            "region_succeeded",
            Some(&region),
            None,
            json!({"version": d.version, "weight": 100}),
        );
        owner.remove(&region);
        self.advance(d, now);
        self.persist(d).await?;
        self.apply(d).await;
        if d.status.is_terminal() {
            self.metrics.ended(d.status, d);
        }
        Ok(())
    }

    /// Moves to the next region, or ends the deployment.
    fn advance(&self, d: &mut Deployment, now: DateTime<Utc>) {
        if d.current_region + 1 < d.regions.len() {
            d.current_region += 1;
            return;
        }
        let any_rolled_back = d
            .regions
            .iter()
            .any(|r| r.status == RegionStatus::RolledBack);
        let status = if any_rolled_back {
            Status::Failed
        } else {
            Status::Success
        };
        self.finish(d, status, now);
        d.event(now, if status == Status::Success { "succeeded" } else { "failed" }, None, None, json!({"regions": d.regions.iter().map(|r| json!({"region": r.region, "status": r.status})).collect::<Vec<_>>()}));
    }

    async fn fail_region(
        &mut self,
        d: &mut Deployment,
        owner: &mut HashMap<String, String>,
        now: DateTime<Utc>,
        gate: serde_json::Value,
    ) -> Result<(), BackendError> {
        let ci = d.current_region;
        let region = d.regions[ci].region.clone();
        let stage = d.stages[d.regions[ci].stage_index].name.clone();
        let stable = d.regions[ci].stable_version.clone();
        d.event(
            now,
            "gate_failed",
            Some(&region),
            Some(&stage),
            gate.clone(),
        );
        let r = &mut d.regions[ci];
        r.status = RegionStatus::RolledBack;
        r.finished_at = Some(now);
        r.stage_deadline = None;
        r.next_analysis_at = None;
        owner.remove(&region);
        match d.on_region_failure {
            OnRegionFailure::Halt => {
                for r in &mut d.regions {
                    if r.status == RegionStatus::Pending {
                        r.status = RegionStatus::Skipped;
                    }
                }
                self.finish(d, Status::RolledBack, now);
            }
            OnRegionFailure::Continue => self.advance(d, now),
            OnRegionFailure::RollbackAll => {
                self.roll_back_all(d, now, "another region failed its gate")
                    .await?;
                for r in &mut d.regions {
                    if r.status == RegionStatus::Pending {
                        r.status = RegionStatus::Skipped;
                    }
                }
                self.finish(d, Status::RolledBack, now);
            }
        }
        // stored first, then the traffic goes back
        self.persist(d).await?;
        let started = std::time::Instant::now();
        self.apply(d).await;
        let rollback_secs = (now - gate_time(d, &region)).num_milliseconds().max(0) as f64 / 1000.0
            + started.elapsed().as_secs_f64();
        d.event(
            self.clock.wall(),
            "rolled_back",
            Some(&region),
            Some(&stage),
            json!({"to": stable, "seconds_from_failed_gate": rollback_secs}),
        );
        self.metrics.rolled_back(rollback_secs);
        self.persist(d).await?;
        if d.status.is_terminal() {
            self.metrics.ended(d.status, d);
        }
        Ok(())
    }
}

fn gate_time(d: &Deployment, region: &str) -> DateTime<Utc> {
    d.events
        .iter()
        .rev()
        .find(|e| e.kind == "gate_failed" && e.region.as_deref() == Some(region))
        .map(|e| e.at)
        .unwrap_or_else(Utc::now)
}
