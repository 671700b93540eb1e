//! The `proc` platform: every version of a service runs as real supervised OS processes, and
//! each region's traffic enters through a real HAProxy whose server weights the rollout sets.
//!
//! - [`config`]: the platform file (`PLATFORM_FILE`);
//! - `haproxy`: one HAProxy per region, started or adopted, driven through its admin socket;
//! - `process`: pid files naming a process by pid and start time, spawn, signals;
//! - `split`: a traffic split as server weights and back;
//! - `stats`: HAProxy's counters sampled over time, for the `platform` analysis provider.
//!
//! The workloads belong to the platform, not to the controller: they run in process groups of
//! their own, HAProxy runs as a daemon, and a restarted service adopts both through their pid
//! files. A supervisor ticks twice a second: it restarts instances that died (with backoff),
//! probes their health path, gives weight only to healthy instances, drains a version that
//! takes no traffic and stops it once the scale-down delay has passed, and samples HAProxy's
//! counters. Traffic changes are fenced by the controller's token, kept in a lane file.

pub mod config;
mod haproxy;
mod process;
mod split;
mod stats;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tai_core::backend::{BackendError, BoxFuture};
use tokio::sync::watch;

pub use config::ProcConfig;
use haproxy::{Router, ServerState, parse_server_name, server_name};
use process::{FileLock, PidRecord};

use crate::analysis::{AnalysisProvider, Figures, Measurement, Target};
use crate::fleet::{Applied, Capacity, Platform, TrafficState};
use crate::registry::ImageRegistry;

/// How often the supervisor looks.
const TICK: Duration = Duration::from_millis(500);
/// How long a stopped instance gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);
/// A health probe gives up after this.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// The longest wait before restarting an instance that keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

type Lane = (String, String);
type GroupKey = (String, String, String);

/// What the platform keeps per (region, service): the traffic asked for, the newest fencing
/// token applied, and since when each version no longer asked for has taken no traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LaneFile {
    desired: TrafficState,
    token: u64,
    #[serde(default)]
    retiring: BTreeMap<String, DateTime<Utc>>,
}

/// One supervised process slot.
#[derive(Debug)]
struct Instance {
    idx: u32,
    port: u16,
    /// The running process, spawned or adopted.
    running: Option<PidRecord>,
    /// Set when this process spawned it, to reap it.
    child: Option<Child>,
    healthy: bool,
    failed_probes: u8,
    /// Exits in a row before it became healthy.
    crashes: u32,
    restarts: u32,
    started_once: bool,
    next_start: Instant,
    /// SIGTERM sent; SIGKILL follows at this instant.
    stopping: Option<Instant>,
}

impl Instance {
    fn new(idx: u32, port: u16) -> Self {
        Self {
            idx,
            port,
            running: None,
            child: None,
            healthy: false,
            failed_probes: 0,
            crashes: 0,
            restarts: 0,
            started_once: false,
            next_start: Instant::now(),
            stopping: None,
        }
    }
}

#[derive(Debug, Default)]
struct World {
    groups: BTreeMap<GroupKey, Vec<Instance>>,
    /// The servers HAProxy reported at the last look, per lane.
    servers: BTreeMap<Lane, Vec<ServerState>>,
}

#[derive(Debug)]
struct Inner {
    cfg: ProcConfig,
    dir: PathBuf,
    routers: BTreeMap<String, Router>,
    services: Vec<(String, String)>,
    world: tokio::sync::Mutex<World>,
    /// The lane files, apart from the world: reads and fenced writes never wait for a tick
    /// that is talking to a slow HAProxy.
    lanes: Mutex<BTreeMap<Lane, LaneFile>>,
    view: RwLock<Value>,
    counts: RwLock<BTreeMap<String, u32>>,
    samples: Mutex<BTreeMap<String, stats::Samples>>,
    http: reqwest::Client,
    stop_on_exit: bool,
    /// Prometheus `file_sd` files this platform wrote, removed when it stops everything.
    sd_files: Mutex<Vec<PathBuf>>,
    _lock: FileLock,
}

/// The `proc` platform.
#[derive(Debug, Clone)]
pub struct ProcPlatform {
    inner: Arc<Inner>,
}

fn unavailable(message: String) -> BackendError {
    BackendError::Unavailable {
        backend: "platform",
        message,
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl ProcPlatform {
    /// Takes the platform's state folder (one service at a time), starts or adopts each
    /// region's HAProxy, and adopts the instances earlier runs left running. The supervisor
    /// runs in [`ProcPlatform::run`].
    pub async fn start(cfg: ProcConfig, stop_on_exit: bool) -> Result<Self, String> {
        let dir = cfg.state_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let lock_path = dir.join("platform.lock");
        let lock = FileLock::try_take(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?
            .ok_or_else(|| {
                format!(
                    "another deployment service runs the platform in {}",
                    dir.display()
                )
            })?;
        let services: Vec<(String, String)> = cfg
            .services
            .iter()
            .map(|(n, s)| (n.clone(), s.health_path.clone()))
            .collect();
        let mut routers = BTreeMap::new();
        for (region, r) in &cfg.regions {
            let router = Router::new(region, &cfg.haproxy, &dir.join(region), r.listen, r.metrics)
                .map_err(|e| format!("region {region}: {e}"))?;
            router.ensure_running(&services).await?;
            routers.insert(region.clone(), router);
        }
        let mut world = World::default();
        let mut lanes = BTreeMap::new();
        for region in cfg.regions.keys() {
            for (service, s) in &cfg.services {
                let lane_dir = dir.join(region).join(service);
                std::fs::create_dir_all(&lane_dir)
                    .map_err(|e| format!("{}: {e}", lane_dir.display()))?;
                let lane_path = lane_dir.join("lane.json");
                // a missing lane starts on the stable version; an unreadable one stops the
                // start (starting over would reset the fence a deposed writer must not pass)
                let mut lane = match std::fs::read(&lane_path) {
                    Ok(b) => serde_json::from_slice::<LaneFile>(&b).map_err(|e| {
                        format!(
                            "{}: {e} (remove it to start the lane over)",
                            lane_path.display()
                        )
                    })?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => LaneFile {
                        desired: TrafficState::only(&s.stable),
                        token: 0,
                        retiring: BTreeMap::new(),
                    },
                    Err(e) => return Err(format!("{}: {e}", lane_path.display())),
                };
                let listed = |v: &String| s.versions.contains_key(v);
                if !listed(&lane.desired.stable)
                    || lane.desired.canary.as_ref().is_some_and(|c| !listed(c))
                {
                    tracing::warn!(%region, %service, asked = ?lane.desired, "the platform file no longer lists a version this lane ran; back to its stable version");
                    lane.desired = TrafficState::only(&s.stable);
                }
                lanes.insert((region.clone(), service.clone()), lane);
                adopt(&mut world, &lane_dir, region, service);
            }
        }
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let platform = Self {
            inner: Arc::new(Inner {
                cfg,
                dir,
                routers,
                services,
                world: tokio::sync::Mutex::new(world),
                lanes: Mutex::new(lanes),
                view: RwLock::new(Value::Null),
                counts: RwLock::new(BTreeMap::new()),
                samples: Mutex::new(BTreeMap::new()),
                http,
                stop_on_exit,
                sd_files: Mutex::new(Vec::new()),
                _lock: lock,
            }),
        };
        platform.tick().await;
        Ok(platform)
    }

    /// The platform file.
    pub fn config(&self) -> &ProcConfig {
        &self.inner.cfg
    }

    /// The supervisor: a tick every half second until shutdown; then, with
    /// `PLATFORM_STOP_ON_EXIT`, everything the platform started is stopped.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            self.tick().await;
        }
        if self.inner.stop_on_exit {
            self.stop_everything().await;
        } else {
            tracing::info!(dir = %self.inner.dir.display(), "the platform's HAProxy and instances keep serving; a restarted service adopts them");
        }
    }

    /// What `/fleet` and `/status` show: per region, HAProxy and per service the versions
    /// running, their processes and the weights HAProxy reports.
    pub fn view(&self) -> Value {
        self.inner
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether every lane's traffic is served (for `/ready`).
    pub async fn serving(&self) -> Result<(), BackendError> {
        for (region, service) in self.lanes() {
            if self.traffic(&region, &service).await?.is_none() {
                return Err(unavailable(format!(
                    "{service} in {region}: no healthy instance takes traffic yet"
                )));
            }
        }
        Ok(())
    }

    fn lanes(&self) -> Vec<Lane> {
        let cfg = &self.inner.cfg;
        cfg.regions
            .keys()
            .flat_map(|r| cfg.services.keys().map(move |s| (r.clone(), s.clone())))
            .collect()
    }

    /// What `version` of `service` did in `region` over the last `window`, from HAProxy's
    /// counters.
    pub fn measure(
        &self,
        region: &str,
        service: &str,
        version: &str,
        window: Duration,
    ) -> Measurement {
        let samples = self.inner.samples.lock().unwrap_or_else(|p| p.into_inner());
        let region_samples = samples.get(region);
        if let Some(age) = region_samples.and_then(stats::Samples::age)
            && age > TICK * 6
        {
            return Measurement::Error(format!(
                "HAProxy's statistics for region {region} are {:.1} s old",
                age.as_secs_f64()
            ));
        }
        match region_samples.and_then(|s| s.window(service, version, window)) {
            Some(w) => Measurement::Figures(Figures {
                error_rate: (w.responses > 0).then(|| w.errors as f64 / w.responses as f64),
                p99_ms: w.rtime_ms,
                samples: Some(w.responses),
            }),
            None => Measurement::Error(format!("no HAProxy statistics for region {region} yet")),
        }
    }

    async fn tick(&self) {
        let inner = &self.inner;
        for (region, router) in &inner.routers {
            if router.pid().is_none() {
                tracing::warn!(%region, "HAProxy is not running; starting it");
                if let Err(e) = router.ensure_running(&inner.services).await {
                    tracing::error!(%region, error = %e, "HAProxy did not start");
                }
            }
        }
        // probe health without holding the world
        let probes: Vec<(GroupKey, u32, u16)> = {
            let w = inner.world.lock().await;
            w.groups
                .iter()
                .flat_map(|(k, insts)| {
                    insts
                        .iter()
                        .filter(|i| i.running.is_some() && i.stopping.is_none())
                        .map(move |i| (k.clone(), i.idx, i.port))
                })
                .collect()
        };
        let results = futures_util::future::join_all(probes.iter().map(|(k, _, port)| {
            let path = inner
                .cfg
                .services
                .get(&k.1)
                .map(|s| s.health_path.clone())
                .unwrap_or_else(|| "/health".into());
            let url = format!("http://127.0.0.1:{port}{path}");
            let http = inner.http.clone();
            async move {
                http.get(url)
                    .header("traceparent", tai_core::runtime::trace::outbound())
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        }))
        .await;
        {
            let mut w = inner.world.lock().await;
            for ((key, idx, port), ok) in probes.into_iter().zip(results) {
                let Some(inst) = w
                    .groups
                    .get_mut(&key)
                    .and_then(|g| g.iter_mut().find(|i| i.idx == idx && i.port == port))
                else {
                    continue;
                };
                if ok {
                    if !inst.healthy {
                        tracing::info!(region = %key.0, service = %key.1, version = %key.2, instance = idx, port, "instance healthy");
                    }
                    inst.healthy = true;
                    inst.failed_probes = 0;
                    inst.crashes = 0;
                } else {
                    inst.failed_probes = inst.failed_probes.saturating_add(1);
                    if inst.healthy && inst.failed_probes >= 2 {
                        tracing::warn!(region = %key.0, service = %key.1, version = %key.2, instance = idx, port, "instance failed its health checks");
                        inst.healthy = false;
                    }
                }
            }
            for lane in self.lanes() {
                self.reconcile(&mut w, &lane).await;
            }
            let mut counts = BTreeMap::new();
            for ((region, _, _), insts) in &w.groups {
                *counts.entry(region.clone()).or_insert(0u32) += insts.len() as u32;
            }
            *inner.counts.write().unwrap_or_else(|p| p.into_inner()) = counts;
            let view = self.describe(&w);
            *inner.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        }
        for (region, router) in &inner.routers {
            match router.stats().await {
                Ok(stats) => inner
                    .samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(region.clone())
                    .or_default()
                    .push(Instant::now(), stats),
                Err(e) => tracing::debug!(%region, error = %e, "no HAProxy statistics this tick"),
            }
        }
    }

    /// Brings one lane's processes and HAProxy servers to what its lane file asks.
    async fn reconcile(&self, w: &mut World, lane: &Lane) {
        let inner = &self.inner;
        let (region, service) = (&lane.0, &lane.1);
        let (Some(svc), Some(router)) =
            (inner.cfg.services.get(service), inner.routers.get(region))
        else {
            return;
        };
        let Some(mut file) = self.lane(lane) else {
            return;
        };
        let wanted: Vec<String> = std::iter::once(file.desired.stable.clone())
            .chain(file.desired.canary.clone())
            .collect();
        let present: BTreeSet<String> = w
            .groups
            .iter()
            .filter(|((r, s, _), insts)| r == region && s == service && !insts.is_empty())
            .map(|((_, _, v), _)| v.clone())
            .collect();
        let now = Utc::now();
        for v in present.iter().filter(|v| !wanted.contains(v)) {
            file.retiring.entry(v.clone()).or_insert(now);
        }
        file.retiring
            .retain(|v, _| !wanted.contains(v) && present.contains(v));
        {
            // only the retiring marks are this function's to change: a fenced write may have
            // changed the rest since it was read
            let mut lanes = inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(current) = lanes.get_mut(lane)
                && current.desired == file.desired
                && current.retiring != file.retiring
            {
                current.retiring = file.retiring.clone();
                self.save_lane(lane, current);
            }
        }
        let delay = chrono::Duration::milliseconds((svc.scale_down_delay_secs * 1000.0) as i64);
        for v in &wanted {
            self.keep_running(
                w,
                (region.clone(), service.clone(), v.clone()),
                svc.instances,
            );
        }
        for (v, since) in &file.retiring {
            let key = (region.clone(), service.clone(), v.clone());
            if now - *since >= delay {
                self.stop_group(w, &key);
            } else {
                // still draining: keep it alive (a retiring version may be asked for again)
                self.keep_running(w, key, svc.instances);
            }
        }
        w.groups.retain(|_, insts| !insts.is_empty());

        // HAProxy: one server per instance, weighted by the split among the healthy ones
        let servers = match router.servers(service).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%region, %service, error = %e, "cannot read HAProxy's servers");
                return;
            }
        };
        let serving = |v: &str| {
            w.groups
                .get(&(region.clone(), service.clone(), v.to_owned()))
                .map(|g| g.iter().filter(|i| serves(i)).count())
                .unwrap_or(0)
        };
        let (ws, wc) = match &file.desired.canary {
            Some(c) => split::server_weights(
                file.desired.canary_weight,
                serving(&file.desired.stable),
                serving(c),
            ),
            None => (100, 0),
        };
        // until every side the split gives traffic to has a serving instance, weights stay
        // as they are: a new canary gets nothing before it is healthy, and a rollback to a
        // version still starting leaves the traffic where it was rather than nowhere
        let possible = serving(&file.desired.stable) > 0
            && file
                .desired
                .canary
                .as_deref()
                .filter(|_| file.desired.canary_weight > 0)
                .is_none_or(|c| serving(c) > 0);
        let mut commands = Vec::new();
        let mut known = BTreeSet::new();
        for ((r, s, v), insts) in &w.groups {
            if r != region || s != service {
                continue;
            }
            let weight = if *v == file.desired.stable {
                ws
            } else if Some(v) == file.desired.canary.as_ref() {
                wc
            } else {
                0
            };
            for inst in insts {
                let name = server_name(v, inst.idx);
                known.insert(name.clone());
                let srv = format!("{service}/{name}");
                let current = servers.iter().find(|s| s.name == name);
                match current {
                    None if inst.running.is_some() => {
                        commands.push(format!(
                            "add server {srv} 127.0.0.1:{} weight 0 check inter 500 fall 2 rise 1",
                            inst.port
                        ));
                        commands.push(format!("enable health {srv}"));
                    }
                    None => continue,
                    Some(cur) if cur.port != inst.port => {
                        commands.push(format!(
                            "set server {srv} addr 127.0.0.1 port {}",
                            inst.port
                        ));
                    }
                    Some(_) => {}
                }
                let (cur_weight, cur_ready) =
                    current.map(|c| (c.weight, c.ready)).unwrap_or((0, false));
                if serves(inst) {
                    if possible && cur_weight != weight {
                        commands.push(format!("set server {srv} weight {weight}"));
                    }
                    if !cur_ready {
                        commands.push(format!("set server {srv} state ready"));
                    }
                } else if cur_ready || current.is_none() {
                    commands.push(format!("set server {srv} state maint"));
                }
            }
        }
        for s in servers.iter().filter(|s| !known.contains(&s.name)) {
            let srv = format!("{service}/{}", s.name);
            commands.push(format!("set server {srv} state maint"));
            commands.push(format!("shutdown sessions server {srv}"));
            commands.push(format!("del server {srv}"));
        }
        let mut seen = servers;
        if !commands.is_empty() {
            match router.cli(&commands.join("; ")).await {
                Ok(out) => {
                    let out = out.trim();
                    if out.contains("No such") || out.contains("failed") || out.contains("Require")
                    {
                        tracing::warn!(%region, %service, answer = %out, "HAProxy refused a change");
                    }
                }
                Err(e) => tracing::warn!(%region, %service, error = %e, "HAProxy change failed"),
            }
            if let Ok(s) = router.servers(service).await {
                seen = s;
            }
        }
        w.servers.insert(lane.clone(), seen);
    }

    /// Keeps `n` processes of a group running: reaps the dead, restarts with backoff.
    fn keep_running(&self, w: &mut World, key: GroupKey, n: u32) {
        let insts = w.groups.entry(key.clone()).or_default();
        for idx in 0..n {
            if !insts.iter().any(|i| i.idx == idx) {
                match free_port() {
                    Ok(port) => insts.push(Instance::new(idx, port)),
                    Err(e) => tracing::error!(error = %e, "no free port for an instance"),
                }
            }
        }
        insts.sort_by_key(|i| i.idx);
        let now = Instant::now();
        for inst in insts.iter_mut() {
            let exit = exited(inst);
            if inst.idx >= n || (inst.stopping.is_some() && exit.is_none()) {
                // beyond the configured count, or still being stopped (a retiring version
                // asked for again): finish the stop, SIGKILL after the grace; the slot starts
                // again once the process is gone
                stop(inst, now);
                continue;
            }
            if let Some(status) = exit {
                let was_healthy = inst.healthy;
                let was_stopped = inst.stopping.is_some();
                inst.healthy = false;
                inst.failed_probes = 0;
                if !was_healthy && !was_stopped {
                    inst.crashes += 1;
                }
                let backoff = (Duration::from_millis(200)
                    * 2u32.saturating_pow(inst.crashes.min(6)))
                .min(MAX_BACKOFF);
                inst.next_start = now + backoff;
                inst.stopping = None;
                tracing::warn!(region = %key.0, service = %key.1, version = %key.2, instance = inst.idx, %status, restart_in_ms = backoff.as_millis() as u64, "instance exited; restarting it");
            }
            if inst.running.is_none() && inst.stopping.is_none() && now >= inst.next_start {
                if inst.crashes >= 3 {
                    // it may not get its port: try another
                    if let Ok(p) = free_port() {
                        inst.port = p;
                    }
                }
                self.spawn(&key, inst);
            }
        }
        let dir = self.group_dir(&key);
        insts.retain(|i| {
            let keep = i.idx < n || i.running.is_some();
            if !keep {
                let _ = std::fs::remove_file(dir.join(format!("{}.pid", i.idx)));
            }
            keep
        });
    }

    fn spawn(&self, key: &GroupKey, inst: &mut Instance) {
        let (region, service, version) = key;
        let inner = &self.inner;
        let Some(config::Launch { argv, env }) =
            inner.cfg.command(region, service, version, inst.port)
        else {
            return;
        };
        let dir = self.group_dir(key);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(dir = %dir.display(), error = %e, "cannot create the instance folder");
            return;
        }
        let log = dir.join(format!("{}.log", inst.idx));
        match process::spawn(&argv, &env, &inner.cfg.base_dir, &log) {
            Ok(mut child) => {
                let pid = child.id();
                let rec = PidRecord {
                    pid,
                    port: inst.port,
                    start_ticks: process::start_ticks(pid).unwrap_or(0),
                };
                let path = dir.join(format!("{}.pid", inst.idx));
                if let Err(e) =
                    process::write_atomic(&path, &serde_json::to_vec(&rec).unwrap_or_default())
                {
                    // a process no pid file names would outlive a restart unseen: not started
                    tracing::error!(path = %path.display(), error = %e, "cannot write the pid file; stopping the instance again");
                    let _ = child.kill();
                    let _ = child.wait();
                    inst.crashes += 1;
                    inst.next_start = Instant::now() + MAX_BACKOFF;
                    return;
                }
                if inst.started_once {
                    inst.restarts += 1;
                }
                inst.started_once = true;
                inst.running = Some(rec);
                inst.child = Some(child);
                tracing::info!(%region, %service, %version, instance = inst.idx, pid, port = inst.port, "instance started");
            }
            Err(e) => {
                inst.crashes += 1;
                inst.next_start = Instant::now() + MAX_BACKOFF;
                tracing::error!(%region, %service, %version, command = ?argv, error = %e, "instance did not start");
            }
        }
    }

    /// Stops a group: SIGTERM, SIGKILL after the grace; forgets instances once gone.
    fn stop_group(&self, w: &mut World, key: &GroupKey) {
        let Some(insts) = w.groups.get_mut(key) else {
            return;
        };
        let now = Instant::now();
        for inst in insts.iter_mut() {
            if inst.stopping.is_none() && inst.running.is_some() {
                tracing::info!(region = %key.0, service = %key.1, version = %key.2, instance = inst.idx, "scale-down delay passed: stopping the instance");
            }
            stop(inst, now);
            exited(inst);
        }
        insts.retain(|i| i.running.is_some());
        if insts.is_empty() {
            let dir = self.group_dir(key);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    fn group_dir(&self, (region, service, version): &GroupKey) -> PathBuf {
        self.inner.dir.join(region).join(service).join(version)
    }

    fn lane(&self, lane: &Lane) -> Option<LaneFile> {
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(lane)
            .cloned()
    }

    fn save_lane(&self, (region, service): &Lane, file: &LaneFile) {
        let path = self.inner.dir.join(region).join(service).join("lane.json");
        let bytes = serde_json::to_vec_pretty(file).unwrap_or_default();
        if let Err(e) = process::write_atomic(&path, &bytes) {
            tracing::error!(path = %path.display(), error = %e, "cannot save the lane");
        }
    }

    /// Stops every instance and HAProxy this platform runs.
    pub async fn stop_everything(&self) {
        let mut w = self.inner.world.lock().await;
        let now = Instant::now();
        for insts in w.groups.values_mut() {
            for inst in insts.iter_mut() {
                stop(inst, now);
            }
        }
        let deadline = tokio::time::Instant::now() + GRACE;
        loop {
            let mut left = 0;
            for insts in w.groups.values_mut() {
                for inst in insts.iter_mut() {
                    exited(inst);
                    left += usize::from(inst.running.is_some());
                }
            }
            if left == 0 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                for inst in w.groups.values_mut().flatten() {
                    if let Some(rec) = inst.running {
                        process::signal_group(rec.pid, libc::SIGKILL);
                    }
                    if let Some(child) = inst.child.as_mut() {
                        let _ = child.wait();
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let keys: Vec<GroupKey> = w.groups.keys().cloned().collect();
        for key in keys {
            let _ = std::fs::remove_dir_all(self.group_dir(&key));
        }
        w.groups.clear();
        for router in self.inner.routers.values() {
            router.stop(Duration::from_secs(2)).await;
        }
        for path in self
            .inner
            .sd_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("the platform stopped every process it started");
    }

    fn describe(&self, w: &World) -> Value {
        let inner = &self.inner;
        let counts = inner
            .counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut regions = serde_json::Map::new();
        for (region, router) in &inner.routers {
            let mut services = serde_json::Map::new();
            for service in inner.cfg.services.keys() {
                let lane = (region.clone(), service.clone());
                let Some(file) = self.lane(&lane) else {
                    continue;
                };
                let file = &file;
                let servers = w.servers.get(&lane).cloned().unwrap_or_default();
                let mut versions = serde_json::Map::new();
                for ((r, s, v), insts) in &w.groups {
                    if r != region || s != service {
                        continue;
                    }
                    let role = if *v == file.desired.stable {
                        "stable"
                    } else if Some(v) == file.desired.canary.as_ref() {
                        "canary"
                    } else {
                        "retiring"
                    };
                    let processes: Vec<Value> = insts
                        .iter()
                        .map(|i| {
                            let srv = servers.iter().find(|s| s.name == server_name(v, i.idx));
                            json!({
                                "index": i.idx, "pid": i.running.map(|r| r.pid), "port": i.port,
                                "healthy": i.healthy, "restarts": i.restarts, "stopping": i.stopping.is_some(),
                                "haproxy": srv.map(|s| json!({"weight": s.weight, "up": s.running, "ready": s.ready})),
                            })
                        })
                        .collect();
                    versions.insert(
                        v.clone(),
                        json!({"role": role, "retiring_since": file.retiring.get(v), "processes": processes}),
                    );
                }
                let weights = weights_by_version(&servers);
                services.insert(
                    service.clone(),
                    json!({
                        "asked": file.desired, "token": file.token,
                        "observed": observe(&servers, &file.desired),
                        "weights": weights,
                        "versions": versions,
                    }),
                );
            }
            regions.insert(
                region.clone(),
                json!({
                    "haproxy": {"pid": router.pid(), "listen": router.listen.to_string(), "metrics": format!("http://{}/metrics", router.metrics)},
                    "instances": counts.get(region).copied().unwrap_or(0),
                    "max_instances": inner.cfg.regions.get(region).and_then(|r| r.max_instances),
                    "services": services,
                }),
            );
        }
        json!({"platform": "proc", "state_dir": inner.dir.display().to_string(), "regions": regions})
    }

    /// Writes a Prometheus `file_sd` target per region (HAProxy's exporter, labelled with the
    /// region) into `dir`, named after the exporter's port so platforms sharing a Prometheus
    /// do not overwrite each other's.
    pub fn write_file_sd(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for (region, router) in &self.inner.routers {
            let body = json!([{"targets": [router.metrics.to_string()], "labels": {"region": region, "platform": "proc"}}]);
            let path = dir.join(format!("haproxy-{region}-{}.json", router.metrics.port()));
            process::write_atomic(&path, body.to_string().as_bytes())?;
            self.inner
                .sd_files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(path);
        }
        Ok(())
    }
}

/// Whether an instance should take traffic: running, healthy, not being stopped.
fn serves(i: &Instance) -> bool {
    i.running.is_some() && i.healthy && i.stopping.is_none()
}

/// Sends SIGTERM once, and SIGKILL once the grace has passed.
fn stop(inst: &mut Instance, now: Instant) {
    let Some(rec) = inst.running else { return };
    // never signal a pid that no longer names this process (it may be someone else's now)
    if !process::alive(&rec) {
        return;
    }
    match inst.stopping {
        None => {
            process::signal_group(rec.pid, libc::SIGTERM);
            inst.stopping = Some(now + GRACE);
        }
        Some(deadline) if now >= deadline => {
            process::signal_group(rec.pid, libc::SIGKILL);
        }
        Some(_) => {}
    }
}

/// If the instance's process has exited since the last look: how, and the slot is cleared.
fn exited(inst: &mut Instance) -> Option<String> {
    let rec = inst.running?;
    let status = match inst.child.as_mut() {
        Some(child) => match child.try_wait() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => return None,
            Err(e) => e.to_string(),
        },
        None if process::alive(&rec) => return None,
        None => "gone".to_owned(),
    };
    inst.running = None;
    inst.child = None;
    Some(format!("pid {} {status}", rec.pid))
}

/// Takes over the instances whose pid files an earlier run left in `lane_dir`.
fn adopt(world: &mut World, lane_dir: &std::path::Path, region: &str, service: &str) {
    let Ok(entries) = std::fs::read_dir(lane_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.path().is_dir() {
            continue;
        }
        let version = entry.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(entry.path()) else {
            continue;
        };
        let mut insts = Vec::new();
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let idx: Option<u32> = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            let rec: Option<PidRecord> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let (Some(idx), Some(rec)) = (idx, rec) else {
                continue;
            };
            let mut inst = Instance::new(idx, rec.port);
            inst.started_once = true;
            if process::alive(&rec) {
                inst.running = Some(rec);
                // it was serving: two failed probes take it out, as for any healthy instance
                inst.healthy = true;
                tracing::info!(%region, %service, %version, instance = idx, pid = rec.pid, port = rec.port, "adopted a running instance");
            }
            insts.push(inst);
        }
        if !insts.is_empty() {
            world
                .groups
                .insert((region.to_owned(), service.to_owned(), version), insts);
        }
    }
}

/// Total weight of running, ready servers per version.
fn weights_by_version(servers: &[ServerState]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for s in servers {
        if let Some((v, _)) = parse_server_name(&s.name) {
            let w = if s.running && s.ready {
                u64::from(s.weight)
            } else {
                0
            };
            *out.entry(v.to_owned()).or_insert(0) += w;
        }
    }
    out
}

/// The split HAProxy's servers carry: `asked` itself when every serving server has exactly
/// the weight `asked` gives it, else the shares the weights amount to.
fn observe(servers: &[ServerState], asked: &TrafficState) -> Option<TrafficState> {
    let serving: Vec<(&str, u32)> = servers
        .iter()
        .filter(|s| s.running && s.ready)
        .filter_map(|s| parse_server_name(&s.name).map(|(v, _)| (v, s.weight)))
        .collect();
    let count = |v: &str| serving.iter().filter(|(sv, _)| *sv == v).count();
    let (ws, wc) = match &asked.canary {
        Some(c) => split::server_weights(asked.canary_weight, count(&asked.stable), count(c)),
        None => (100, 0),
    };
    // the asked split needs a serving server on each side it gives traffic to
    let canary_side = asked.canary.as_deref().filter(|_| asked.canary_weight > 0);
    let possible = count(&asked.stable) > 0 && canary_side.is_none_or(|c| count(c) > 0);
    let exact = serving.iter().all(|(v, w)| {
        let expected = if *v == asked.stable {
            ws
        } else if Some(*v) == asked.canary.as_deref() {
            wc
        } else {
            0
        };
        *w == expected
    });
    if possible && exact {
        return Some(asked.clone());
    }
    split::observed(&weights_by_version(servers), asked)
}

impl Platform for ProcPlatform {
    fn kind(&self) -> &'static str {
        "proc"
    }
    fn regions(&self) -> Vec<String> {
        self.inner.cfg.regions.keys().cloned().collect()
    }
    fn traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Option<TrafficState>, BackendError>> {
        Box::pin(async move {
            let (Some(router), true) = (
                self.inner.routers.get(region),
                self.inner.cfg.services.contains_key(service),
            ) else {
                return Ok(None);
            };
            let servers = router.servers(service).await.map_err(unavailable)?;
            let asked = self
                .lane(&(region.to_owned(), service.to_owned()))
                .map(|l| l.desired);
            Ok(asked.and_then(|a| observe(&servers, &a)))
        })
    }
    fn set_traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
        desired: &'a TrafficState,
        token: u64,
    ) -> BoxFuture<'a, Result<Applied, BackendError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let svc = inner
                .cfg
                .services
                .get(service)
                .ok_or_else(|| unavailable(format!("{service} is not in the platform file")))?;
            for v in std::iter::once(&desired.stable).chain(desired.canary.as_ref()) {
                if !svc.versions.contains_key(v) {
                    return Err(unavailable(format!(
                        "version {v} of {service} is not in the platform file"
                    )));
                }
            }
            let lane = (region.to_owned(), service.to_owned());
            {
                let mut lanes = inner.lanes.lock().unwrap_or_else(|p| p.into_inner());
                let Some(current) = lanes.get_mut(&lane) else {
                    return Err(unavailable(format!("{region} is not in the platform file")));
                };
                if current.token > token {
                    return Ok(Applied::Refused {
                        newer: current.token,
                    });
                }
                if current.desired != *desired || current.token != token {
                    let next = LaneFile {
                        desired: desired.clone(),
                        token,
                        retiring: current.retiring.clone(),
                    };
                    let path = inner.dir.join(region).join(service).join("lane.json");
                    // on disk first: a fenced write the platform forgot would undo the fence
                    process::write_atomic(
                        &path,
                        &serde_json::to_vec_pretty(&next).unwrap_or_default(),
                    )
                    .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
                    if current.desired != *desired {
                        tracing::info!(%region, %service, stable = %desired.stable, canary = ?desired.canary, weight = desired.canary_weight, token, "traffic asked");
                    }
                    *current = next;
                }
            }
            // apply it now if no tick is under way; otherwise the tick (or the next) does
            if let Ok(mut w) = inner.world.try_lock() {
                self.reconcile(&mut w, &lane).await;
                let view = self.describe(&w);
                *inner.view.write().unwrap_or_else(|p| p.into_inner()) = view;
            }
            Ok(Applied::Done)
        })
    }
    fn applied_token<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        let token = self
            .lane(&(region.to_owned(), service.to_owned()))
            .map(|l| l.token)
            .unwrap_or(0);
        Box::pin(std::future::ready(Ok(token)))
    }
    fn capacity(&self, region: &str, service: &str) -> Option<Capacity> {
        let r = self.inner.cfg.regions.get(region)?;
        let needed = self
            .inner
            .cfg
            .services
            .get(service)
            .map(|s| s.instances)
            .unwrap_or(0);
        let running = self
            .inner
            .counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(region)
            .copied()
            .unwrap_or(0);
        Some(Capacity {
            free: r
                .max_instances
                .map(|m| m.saturating_sub(running))
                .unwrap_or(u32::MAX),
            needed,
        })
    }
}

/// The versions the platform file lists, as the image registry of `proc`.
#[derive(Debug, Clone)]
pub struct ProcRegistry {
    platform: ProcPlatform,
}

impl ProcRegistry {
    /// The versions of `platform`'s file.
    pub fn new(platform: ProcPlatform) -> Self {
        Self { platform }
    }
}

impl ImageRegistry for ProcRegistry {
    fn kind(&self) -> &'static str {
        "platform-file"
    }
    fn exists<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        _image: &'a str,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        let listed = self
            .platform
            .config()
            .services
            .get(service)
            .is_some_and(|s| s.versions.contains_key(version));
        Box::pin(std::future::ready(Ok(listed)))
    }
}

/// The `platform` analysis provider on `proc`: each version's requests, 5xx and response time
/// from HAProxy's per-server counters over the measurement interval.
#[derive(Debug, Clone)]
pub struct ProcAnalysis {
    platform: ProcPlatform,
}

impl ProcAnalysis {
    /// Figures from `platform`'s HAProxy.
    pub fn new(platform: ProcPlatform) -> Self {
        Self { platform }
    }
}

impl AnalysisProvider for ProcAnalysis {
    fn name(&self) -> &'static str {
        "platform"
    }
    fn measure<'a>(&'a self, t: &'a Target) -> BoxFuture<'a, Measurement> {
        let m = self
            .platform
            .measure(&t.region, &t.service, &t.version, t.window);
        Box::pin(std::future::ready(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, weight: u32, up: bool) -> ServerState {
        ServerState {
            name: name.into(),
            port: 1,
            running: up,
            ready: true,
            weight,
        }
    }

    #[test]
    fn a_split_is_observed_only_when_both_sides_serve_with_its_weights() {
        let asked = TrafficState::split("v1", Some("v2"), 25);
        // the canary's servers are not up yet: all traffic is the stable version's
        let stable_only = [server("v1-i0", 100, true), server("v1-i1", 100, true)];
        assert_eq!(
            observe(&stable_only, &asked),
            Some(TrafficState::only("v1"))
        );
        let (ws, wc) = split::server_weights(25, 2, 2);
        let both = [
            server("v1-i0", ws, true),
            server("v1-i1", ws, true),
            server("v2-i0", wc, true),
            server("v2-i1", wc, true),
        ];
        assert_eq!(observe(&both, &asked), Some(asked.clone()));
        // one canary server down: the weights no longer carry 25%
        let mut one_down = both.clone();
        one_down[3].running = false;
        assert_ne!(observe(&one_down, &asked), Some(asked.clone()));
        assert_eq!(observe(&[server("v1-i0", 100, false)], &asked), None);
    }
}
