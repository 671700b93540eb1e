//! The controller: one loop that owns every active deployment while this replica holds the
//! controller lease.
//!
//! New deployments and operator commands arrive on a channel, measurements from their own
//! tasks ([`super::measure`]), and platform observations from the traffic task
//! ([`super::traffic`]), so the loop is the only writer of deployments and never waits on a
//! provider or the platform. Each turn it plans the lanes ([`super::lanes`]), starts measurements
//! that are due, applies the gate's judgement ([`super::gate`]) through the model's transitions
//! ([`super::transitions`]), stores every change fenced by the lease's token before anything
//! acts on it, and hands the traffic every owned lane should have to the traffic task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::json;
use tai_core::audit::AuditSink;
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::jidoka::{BreakerConfig, CircuitBreaker};
use tai_core::lease::{Change, Lease};
use tai_core::store::StateStore;
use tokio::sync::{mpsc, watch};

use super::gate;
use super::handle::{Command, ControllerHandle, Op, OpError, desired_of};
use super::lanes;
use super::measure::{Done, Job, Measurer};
use super::model::{Deployment, RegionStatus, Status};
use super::replica::{CHANGE_SEQ, ReplicaState, forward, read_record};
use super::traffic::{self, Report, TrafficHandle};
use super::transitions::Note;
use crate::analysis::{Measurement, Target};
use crate::fleet::Platform;
use crate::metrics::DeploymentMetrics;

fn not_leader() -> BackendError {
    BackendError::Unavailable {
        backend: "lease",
        message: "this replica does not hold the controller lease".into(),
    }
}

/// Where deployments are stored.
pub fn key(id: &str) -> String {
    format!("dep:dpl:{id}")
}

/// What the controller is built from.
#[derive(Debug)]
pub struct Parts {
    /// The store of deployments, lanes, lease and forwarded commands.
    pub store: Arc<dyn StateStore>,
    /// The platform whose traffic it drives.
    pub platform: Arc<dyn Platform>,
    /// Measurements.
    pub measurer: Measurer,
    /// Their results.
    pub measured: mpsc::Receiver<Done>,
    /// The clock.
    pub clock: SharedClock,
    /// Kaizen.
    pub metrics: Arc<DeploymentMetrics>,
    /// Where events are published.
    pub audit: Arc<dyn AuditSink>,
    /// Their subject prefix.
    pub subject_prefix: String,
    /// The controller lease.
    pub lease: Lease,
    /// Stops the traffic task.
    pub shutdown: watch::Receiver<bool>,
}

/// The controller loop's state.
pub struct Controller {
    pub(super) store: Arc<dyn StateStore>,
    pub(super) handle: ControllerHandle,
    pub(super) metrics: Arc<DeploymentMetrics>,
    pub(super) lease: Lease,
    pub(super) replica: ReplicaState,
    /// How many of each deployment's events were published.
    pub(super) published: HashMap<String, usize>,
    platform: Arc<dyn Platform>,
    clock: SharedClock,
    pub(super) view: Arc<RwLock<BTreeMap<String, Deployment>>>,
    rx: mpsc::Receiver<Command>,
    measurer: Measurer,
    measured: mpsc::Receiver<Done>,
    in_flight: HashSet<(String, usize, usize)>,
    /// Whether this leader has reloaded every deployment since it took the lease; until then
    /// it drives nothing (a standby's view may be stale).
    pub(super) loaded: bool,
    /// Arrival numbers missing from the view (accepted by a standby, not yet synced), and
    /// since when: a lane's grant waits a little for an earlier arrival.
    pub(super) gaps: HashMap<u64, std::time::Instant>,
    traffic: TrafficHandle,
    reports: mpsc::Receiver<Report>,
    pub(super) audit: Arc<dyn AuditSink>,
    /// Opens after a failed publish, so an unreachable stream costs the loop one timeout per
    /// few seconds, not one per transition; the events wait in the record meanwhile.
    pub(super) audit_breaker: CircuitBreaker,
    pub(super) subject_prefix: String,
    tick: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("platform", &self.platform.kind())
            .field("instance", &self.lease.instance())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Loads every stored deployment and returns the controller and its handle.
    pub async fn load(parts: Parts) -> Result<(Self, ControllerHandle), BackendError> {
        let Parts {
            store,
            platform,
            measurer,
            measured,
            clock,
            metrics,
            audit,
            subject_prefix,
            lease,
            shutdown,
        } = parts;
        let mut view = BTreeMap::new();
        let mut published = HashMap::new();
        for k in store.keys("dep:dpl:").await? {
            let Some(d) = read_record(store.as_ref(), &k).await? else {
                continue;
            };
            if d.status.is_terminal() {
                published.insert(d.deployment_id.clone(), d.events.len());
            } else {
                // republished from the start: the stream's duplicate window drops repeats
                tracing::info!(deployment_id = %d.deployment_id, status = ?d.status, "resuming deployment");
            }
            view.insert(d.deployment_id.clone(), d);
        }
        let (tx, rx) = mpsc::channel(1024);
        let view = Arc::new(RwLock::new(view));
        let handle = ControllerHandle {
            tx,
            view: view.clone(),
            store: store.clone(),
        };
        let (traffic, reports) = traffic::start(platform.clone(), shutdown);
        let controller = Self {
            store,
            handle: handle.clone(),
            metrics,
            lease,
            replica: ReplicaState::new(),
            published,
            platform,
            clock: clock.clone(),
            view,
            rx,
            measurer,
            measured,
            in_flight: HashSet::new(),
            loaded: false,
            gaps: HashMap::new(),
            traffic,
            reports,
            audit,
            audit_breaker: CircuitBreaker::new(
                "audit_stream",
                BreakerConfig {
                    consecutive_failures: 1,
                    slow_call: None,
                    open_for: Duration::from_secs(5),
                    half_open_trials: 1,
                    ..BreakerConfig::default()
                },
                clock.clone(),
            ),
            subject_prefix,
            tick: Duration::from_millis(25),
        };
        controller
            .metrics
            .set_in_progress(controller.handle.in_progress());
        Ok((controller, handle))
    }

    /// Runs until `shutdown` turns true. Loads the store first, so a loop started again after
    /// a panic picks up where the records say.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) {
        // measurements started before a panic are their own tasks and still report here, so
        // in_flight is kept (clearing it would start a second measurement of the same window)
        self.loaded = false;
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.handle_command(cmd).await,
                    None => return,
                },
                Some(done) = self.measured.recv() => self.on_measured(done).await,
                Some(report) = self.reports.recv() => self.on_report(report).await,
                _ = tokio::time::sleep(self.tick) => {}
                _ = shutdown.changed() => {
                    tracing::info!("controller stopping; active rollouts resume from the store on the next start");
                    // a standby takes the rollouts over now, not after the lease lapses
                    self.traffic.set(None, BTreeMap::new());
                    self.lease.release().await;
                    return;
                }
            }
            match self.lease.tick().await {
                Change::Took { .. } => {
                    self.loaded = false;
                    self.in_flight.clear();
                }
                Change::Lost => self.stand_by(),
                Change::None => {}
            }
            if self.lease.token().is_some() && !self.loaded {
                self.loaded = self.sync(true).await;
            }
            if self.replica.last_sync.elapsed() >= Duration::from_millis(500) {
                self.sync(false).await;
            }
            if self.lease.token().is_some() && self.loaded {
                if self.replica.last_commands.elapsed() >= Duration::from_millis(100) {
                    self.take_forwarded().await;
                }
                self.reconcile().await;
            }
        }
    }

    fn stand_by(&mut self) {
        self.lease.lost();
        self.traffic.set(None, BTreeMap::new());
        self.in_flight.clear();
        self.replica.resync_now();
    }

    pub(super) fn update_view(&self, d: &Deployment) {
        self.view
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(d.deployment_id.clone(), d.clone());
    }

    /// Runs `f` over the deployments not yet ended, in arrival order, under the view's read
    /// lock (no copies: this runs on every turn of the loop).
    pub(super) fn with_active<R>(&self, f: impl FnOnce(Vec<&Deployment>) -> R) -> R {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        let mut active: Vec<&Deployment> =
            view.values().filter(|d| !d.status.is_terminal()).collect();
        active.sort_by_key(|d| d.seq);
        f(active)
    }

    /// Stores `d` fenced by the lease's token, then shows and publishes it.
    async fn persist(&mut self, d: &mut Deployment) -> Result<(), BackendError> {
        d.refresh(self.clock.wall());
        let token = self.lease.token().ok_or_else(not_leader)?;
        let bytes = serde_json::to_vec(&d).map_err(|e| BackendError::Protocol {
            backend: "controller",
            message: e.to_string(),
        })?;
        if !self
            .store
            .put_fenced(&key(&d.deployment_id), bytes, self.lease.fence_key(), token)
            .await?
        {
            self.stand_by();
            return Err(not_leader());
        }
        // standbys reload their view when this moves
        let _ = self.store.incr(CHANGE_SEQ).await;
        self.update_view(d);
        self.publish_events(d).await;
        Ok(())
    }

    /// Turns what transitions did into figures.
    fn report(&self, d: &Deployment, notes: &[Note]) {
        for note in notes {
            match note {
                Note::StageCompleted { stage, secs } => self.metrics.stage(stage, *secs),
                Note::RolledBack { cause, secs } => self.metrics.rolled_back(*cause, *secs),
                Note::Ended(status) => self.metrics.ended(*status, d),
            }
        }
        self.metrics.set_in_progress(self.handle.in_progress());
    }

    async fn handle_command(&mut self, cmd: Command) {
        match cmd {
            Command::Create(d, reply) => {
                let mut d = *d;
                let result = if self.lease.token().is_some() {
                    self.persist(&mut d).await
                } else {
                    d.refresh(self.clock.wall());
                    self.accept_on_standby(&d).await
                };
                if result.is_ok() {
                    tracing::info!(deployment_id = %d.deployment_id, service = %d.service, version = %d.version, seq = d.seq, regions = ?d.regions.iter().map(|r| r.region.as_str()).collect::<Vec<_>>(), "deployment accepted");
                }
                let _ = reply.send(result.map(|()| d));
            }
            Command::Operate(id, op, reply) if self.lease.token().is_some() => {
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

    pub(super) async fn operate(&mut self, id: &str, op: Op) -> Result<Deployment, OpError> {
        if self.lease.token().is_none() || !self.loaded {
            return Err(OpError::NotLeader);
        }
        let mut d = self.handle.get(id).ok_or(OpError::NotFound)?;
        let now = self.clock.wall();
        let notes = match op {
            Op::Abort => {
                let taken = self.taken_by_other(&d);
                d.abort(&taken, now).map_err(OpError::Conflict)?
            }
            Op::Pause => {
                d.pause("operator", json!(null), now)
                    .map_err(OpError::Conflict)?;
                Vec::new()
            }
            Op::Resume => {
                d.resume(now).map_err(OpError::Conflict)?;
                Vec::new()
            }
            Op::Promote => {
                d.promote(now).map_err(OpError::Conflict)?;
                Vec::new()
            }
        };
        self.persist(&mut d).await?;
        self.report(&d, &notes);
        // the traffic task hears of it now, not on the next turn
        self.push_desired();
        Ok(d)
    }

    /// Hands the traffic task what every owned lane should serve.
    fn push_desired(&self) {
        let desired = self.with_active(|active| desired_of(active.iter().copied()));
        self.traffic.set(self.lease.token(), desired);
    }

    async fn on_report(&mut self, report: Report) {
        let Some(token) = self.lease.token().filter(|_| self.loaded) else {
            return;
        };
        match report {
            Report::Fenced { newer } => {
                if newer > token {
                    tracing::warn!(
                        token,
                        newer,
                        "the platform applied a newer controller's change; standing by"
                    );
                    self.stand_by();
                }
            }
            Report::Observed {
                lane,
                state,
                generation,
            } => {
                // a report about an earlier desired state of the lane says nothing about now
                if self.traffic.generation(&lane) != Some(generation) {
                    return;
                }
                let owners = self.with_active(|active| lanes::owners(active));
                let Some(owner) = owners.get(&lane) else {
                    return;
                };
                let Some(mut d) = self.handle.get(owner) else {
                    return;
                };
                let Some(i) = d.regions.iter().position(|r| r.region == lane.0) else {
                    return;
                };
                if d.regions[i].observed || d.desired(i).as_ref() != Some(&state) {
                    return;
                }
                let notes = d.observed(i, self.clock.wall());
                match self.persist(&mut d).await {
                    Ok(()) => self.report(&d, &notes),
                    Err(e) => {
                        tracing::warn!(deployment_id = %d.deployment_id, error = %e, "could not store an observed traffic change; it will be seen again")
                    }
                }
            }
        }
    }

    async fn on_measured(&mut self, done: Done) {
        let job = &done.job;
        self.in_flight
            .remove(&(job.deployment_id.clone(), job.region_idx, job.stage_idx));
        if self.lease.token().is_none() {
            return;
        }
        let Some(mut d) = self.handle.get(&job.deployment_id) else {
            return;
        };
        // the answer is stale if the stage moved on, paused, or ended while it was measured
        let current = d.regions.get(job.region_idx).is_some_and(|r| {
            r.status == RegionStatus::InProgress && r.stage_index == job.stage_idx && r.observed
        });
        if d.status != Status::InProgress
            || d.paused
            || d.current_region != job.region_idx
            || !current
        {
            return;
        }
        let counts = d.regions[job.region_idx].counts;
        let judgement = gate::judge(&d.analysis, counts, &done.measurement);
        let figures = match &done.measurement {
            Measurement::Figures(f) => Some(f.clone()),
            _ => None,
        };
        let taken = self.taken_by_other(&d);
        let now = self.clock.wall();
        let notes = d.judged(&judgement, done.provider, figures.as_ref(), &taken, now);
        match self.persist(&mut d).await {
            Ok(()) => {
                self.report(&d, &notes);
                self.push_desired();
            }
            Err(e) => {
                tracing::warn!(deployment_id = %d.deployment_id, error = %e, "could not store a gate decision; measuring again")
            }
        }
    }

    async fn reconcile(&mut self) {
        let now = self.clock.wall();
        let plan = self.with_active(|active| lanes::plan(active));
        for (id, by) in &plan.supersede {
            let Some(mut d) = self.handle.get(id) else {
                continue;
            };
            if let Ok(notes) = d.supersede(by, now) {
                tracing::info!(deployment_id = %id, by = %by, "superseded by a later deploy of the service");
                if self.persist(&mut d).await.is_ok() {
                    self.report(&d, &notes);
                }
            }
        }
        let held = self.earliest_gap();
        for id in &plan.grants {
            let Some(mut d) = self.handle.get(id) else {
                continue;
            };
            if held.is_some_and(|gap| gap < d.seq) {
                // an earlier arrival was accepted by a standby and is not here yet
                continue;
            }
            let Some(region) = d.waiting_for().map(str::to_owned) else {
                continue;
            };
            // the version the region runs now is what a rollback returns to
            let stable = match tokio::time::timeout(
                Duration::from_secs(1),
                self.platform.traffic(&region, &d.service),
            )
            .await
            {
                Ok(Ok(Some(t))) => t.stable,
                Ok(Ok(None)) => d.regions[d.current_region].stable_version.clone(),
                Ok(Err(e)) => {
                    tracing::warn!(region = %region, error = %e, "cannot read the region's traffic; the grant waits");
                    continue;
                }
                Err(_) => continue,
            };
            d.take_region(&stable, now);
            if let Err(e) = self.persist(&mut d).await {
                tracing::warn!(deployment_id = %id, error = %e, "could not store a region start; retrying");
                return;
            }
        }
        for (id, position) in &plan.positions {
            if let Some(mut d) = self.handle.get(id)
                && d.set_queue_position(*position)
            {
                if d.current_region == 0 && d.status == Status::InProgress && !d.started() {
                    d.status = Status::Pending;
                }
                // stored, so standbys show it and a new leader starts from it
                if let Err(e) = self.persist(&mut d).await {
                    tracing::warn!(deployment_id = %id, error = %e, "could not store a queue position");
                    return;
                }
            }
        }
        let term = self.lease.token().unwrap_or(0);
        let due: Vec<Job> = self.with_active(|active| {
            active
                .into_iter()
                .filter(|d| d.measurement_due(now))
                .map(|d| {
                    let ci = d.current_region;
                    Job {
                        term,
                        deployment_id: d.deployment_id.clone(),
                        region_idx: ci,
                        stage_idx: d.regions[ci].stage_index,
                        provider: d.analysis.provider,
                        target: Target {
                            service: d.service.clone(),
                            version: d.version.clone(),
                            region: d.regions[ci].region.clone(),
                            queries: d.analysis.queries.clone(),
                            window: std::time::Duration::from_secs_f64(
                                d.analysis.interval_secs.max(0.1),
                            ),
                        },
                    }
                })
                .collect()
        });
        for job in due {
            // one measurement at a time per stage
            if self
                .in_flight
                .insert((job.deployment_id.clone(), job.region_idx, job.stage_idx))
            {
                self.measurer.spawn(job);
            }
        }
        self.push_desired();
    }
}
