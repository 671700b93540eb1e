//! # deployment-system
//!
//! The deployment service on tai-core: a rollout controller in the spirit of Argo Rollouts and
//! Flagger. `POST /deploy` runs the Signal -> Policy -> Action flow:
//!
//! - [`signal`]: parse and validate the request (stages, gates and region order may be given);
//! - [`safety`]: gather facts (image, regions, capacity, rollback target), then decide purely,
//!   naming every failed check;
//! - [`rollout`]: the controller drives a persisted state machine per region, canary 5% ->
//!   staging 25% -> prod 100%, with health analysis ([`analysis`]) at every step, automatic
//!   rollback on a failed gate, and one rollout at a time per region (the Kanban queue);
//! - [`fleet`]: the platform trait and the simulated fleet, the embedded default;
//! - [`proc`]: the `proc` platform: real processes behind a real HAProxy per region;
//! - [`metrics`]: docs/API.md's metric names and the figures Andon watches.

#![warn(missing_docs)]

pub mod analysis;
mod api;
pub mod fleet;
pub mod metrics;
pub mod proc;
pub mod registry;
pub mod rollout;
pub mod safety;
pub mod settings;
pub mod signal;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tai_core::andon::{AndonRule, Level};
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::pipeline::{Action, Decided, Pipeline};
use tai_core::policy::Decision;
use tai_core::runtime::{ConfigError, Runtime};
use tai_core::store::StateStore;
use utoipa::OpenApi;

use crate::analysis::{AnalysisProvider, HttpProbe, PrometheusAnalysis, SimAnalysis};
use crate::fleet::{FleetFixture, SimFleet};
use crate::metrics::DeploymentMetrics;
use crate::proc::{ProcAnalysis, ProcConfig, ProcPlatform, ProcRegistry};
use crate::registry::{FixtureRegistry, OciRegistry};
use crate::rollout::measure::Measurer;
use crate::rollout::{Controller, ControllerHandle, Deployment, Parts};
use crate::safety::{SafetyFactSource, SafetyFacts, SafetyPolicy};
use crate::signal::{Defaults, DeployRequest, Provider};

/// The deploy pipeline's Action: builds the deployment from the checked request, `REJECTED`
/// with every reason when the safety policy denies it, and hands it to the controller, which
/// stores it (a dry run is built and not stored).
#[derive(Debug, Clone)]
pub struct Admit {
    handle: ControllerHandle,
    clock: SharedClock,
}

/// A deployment request the safety policy decided on.
type Admitted<'a> = Decided<'a, DeployRequest, SafetyFacts>;

impl Action<DeployRequest, SafetyFacts> for Admit {
    type Output = Deployment;
    type Error = BackendError;
    async fn act(&self, decided: Admitted<'_>) -> Result<Deployment, BackendError> {
        let (req, facts, verdict) = (decided.signal, decided.facts, decided.verdict);
        let now = self.clock.wall();
        let seq = if req.dry_run {
            0
        } else {
            self.handle.next_seq().await?
        };
        let stables: Vec<(String, Option<String>)> = facts
            .regions
            .iter()
            .map(|f| (f.region.clone(), f.stable.clone()))
            .collect();
        let mut d = Deployment::create(req, req.deployment_id.clone(), seq, &stables, now);
        if verdict.decision == Decision::Deny {
            let reasons: Vec<serde_json::Value> = verdict
                .reasons
                .iter()
                .map(|r| serde_json::json!({"code": r.rule, "message": r.observed, "expected": r.threshold}))
                .collect();
            let codes: Vec<&str> = verdict.reasons.iter().map(|r| r.rule.as_str()).collect();
            d.reject(reasons, &codes, now);
        }
        if req.dry_run {
            return Ok(d);
        }
        self.handle.create(d).await
    }
}

/// The platform behind `/fleet`: the simulated fleet or the `proc` platform.
#[derive(Debug, Clone)]
pub(crate) enum Fleet {
    /// `PLATFORM=sim`.
    Sim(SimFleet),
    /// `PLATFORM=proc`.
    Proc(ProcPlatform),
}

/// What the handlers share.
#[derive(Debug)]
pub(crate) struct App {
    defaults: Defaults,
    safety: Pipeline<SafetyFactSource, SafetyPolicy, Admit>,
    handle: ControllerHandle,
    providers: HashSet<Provider>,
    prometheus: Option<PrometheusAnalysis>,
    fleet: Fleet,
    store: Arc<dyn StateStore>,
    wait_limit: Duration,
    /// This replica's controller lease, as `/status` shows it.
    lease: Arc<std::sync::RwLock<tai_core::lease::LeaseStatus>>,
}

/// The service could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A setting was invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The fleet fixture was unreadable or invalid.
    #[error("fleet fixture {path}: {message}")]
    Fixture {
        /// The file.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// A backend failed at start.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An analysis provider could not be set up.
    #[error("analysis provider: {0}")]
    Provider(String),
    /// The platform could not be set up.
    #[error("platform: {0}")]
    Platform(String),
}

#[derive(OpenApi)]
#[openapi(paths(
    api::create,
    api::get,
    api::abort,
    api::promote,
    api::pause,
    api::resume,
    api::list,
    api::fleet,
    api::faults
))]
struct DeployApi;

/// Builds the deployment service on `runtime`: its controller, routes and OpenAPI.
pub async fn build(
    runtime: &mut Runtime,
) -> Result<(Router, utoipa::openapi::OpenApi), BuildError> {
    let (cfg, clock) = (runtime.config().clone(), runtime.clock());
    let store: Arc<dyn StateStore> = runtime.state_store().await?;
    let probe_timeout = Duration::from_millis(cfg.setting_or("ANALYSIS_TIMEOUT_MS", 2000u64)?);
    let mut providers: HashMap<Provider, Arc<dyn AnalysisProvider>> = HashMap::new();
    let mut defaults = Defaults::default();
    let (platform, fleet, platform_registry): (
        Arc<dyn fleet::Platform>,
        Fleet,
        Arc<dyn registry::ImageRegistry>,
    ) = match cfg.setting("PLATFORM").as_deref().unwrap_or("sim") {
        "sim" => {
            let fixture_text = cfg.file_or("FLEET_FIXTURE_PATH", fleet::DEFAULT_FLEET)?;
            let fixture =
                FleetFixture::from_toml(&fixture_text).map_err(|message| BuildError::Fixture {
                    path: "config/fleet.toml".into(),
                    message,
                })?;
            let sim = SimFleet::new(fixture.clone(), store.clone(), clock.clone());
            let health: Arc<dyn AnalysisProvider> = Arc::new(SimAnalysis::new(sim.clone()));
            providers.insert(Provider::Sim, health.clone());
            providers.insert(Provider::Platform, health);
            (
                Arc::new(sim.clone()),
                Fleet::Sim(sim),
                Arc::new(FixtureRegistry::new(&fixture)),
            )
        }
        "proc" => {
            let path = cfg.setting("PLATFORM_FILE").ok_or_else(|| {
                BuildError::Platform(
                    "PLATFORM=proc needs PLATFORM_FILE=<path of its TOML file>".into(),
                )
            })?;
            let file =
                ProcConfig::load(std::path::Path::new(&path)).map_err(BuildError::Platform)?;
            let stop_on_exit = cfg.setting_or("PLATFORM_STOP_ON_EXIT", false)?;
            let p = ProcPlatform::start(file, stop_on_exit)
                .await
                .map_err(BuildError::Platform)?;
            if let Some(dir) = cfg.setting("PROMETHEUS_FILE_SD_DIR") {
                p.write_file_sd(std::path::Path::new(&dir)).map_err(|e| {
                    BuildError::Platform(format!("PROMETHEUS_FILE_SD_DIR {dir}: {e}"))
                })?;
            }
            let platform = p.clone();
            runtime.supervise("platform", move |stop| platform.clone().run(stop));
            let ready = p.clone();
            runtime.add_readiness("platform", move || {
                let ready = ready.clone();
                Box::pin(async move { ready.serving().await })
            });
            let shown = p.clone();
            runtime.add_status_section("platform", move || shown.view());
            providers.insert(Provider::Platform, Arc::new(ProcAnalysis::new(p.clone())));
            defaults.analysis.provider = Provider::Platform;
            defaults.regions = p.config().regions.keys().take(1).cloned().collect();
            (
                Arc::new(p.clone()),
                Fleet::Proc(p.clone()),
                Arc::new(ProcRegistry::new(p)),
            )
        }
        other => {
            return Err(BuildError::Platform(format!(
                "PLATFORM={other}: sim (the default) or proc"
            )));
        }
    };
    runtime.set_backend("platform", platform.kind());

    if let Some(template) = cfg.setting("HEALTH_URL_TEMPLATE") {
        providers.insert(
            Provider::Http,
            Arc::new(HttpProbe::new(&template, probe_timeout).map_err(BuildError::Provider)?),
        );
    }
    let mut prometheus = None;
    if let Some(prom) = cfg.setting("PROMETHEUS_URL") {
        let error_q = cfg.text_or("PROMQL_ERROR_RATE", analysis::DEFAULT_ERROR_RATE_QUERY);
        let p99_q = cfg.text_or("PROMQL_P99_SECONDS", analysis::DEFAULT_P99_QUERY);
        let requests_q = cfg.text_or("PROMQL_REQUESTS", analysis::DEFAULT_REQUESTS_QUERY);
        let p = PrometheusAnalysis::new(&prom, &error_q, &p99_q, &requests_q, probe_timeout)
            .map_err(BuildError::Provider)?;
        prometheus = Some(p.clone());
        providers.insert(Provider::Prometheus, Arc::new(p));
    }

    let registry: Arc<dyn registry::ImageRegistry> = match cfg.setting("IMAGE_REGISTRY_URL") {
        Some(url) => {
            let oci = OciRegistry::new(&url, probe_timeout, clock.clone())
                .map_err(BuildError::Provider)?;
            defaults.registry = oci.host();
            runtime.add_breaker(oci.breaker());
            Arc::new(oci)
        }
        None => platform_registry,
    };
    runtime.set_backend("registry", registry.kind());
    if let Some(regions) = cfg.list("DEFAULT_REGIONS") {
        defaults.regions = regions;
    }
    if let Some(registry_host) = cfg.setting("IMAGE_REGISTRY") {
        defaults.registry = registry_host;
    }

    let metrics = Arc::new(DeploymentMetrics::new(runtime.kaizen(), clock.clone()));
    let provider_kinds: HashSet<Provider> = providers.keys().copied().collect();
    let stream = cfg.text_or("AUDIT_STREAM", "DEPLOY_EVENTS");
    let subject_prefix = cfg.text_or("AUDIT_SUBJECT_PREFIX", "deploy.events");
    let audit = runtime
        .audit_sink(&stream, &format!("{subject_prefix}.>"))
        .await?;
    let lease_ttl = Duration::from_millis(cfg.setting_or("CONTROLLER_LEASE_MS", 3000u64)?);
    let lease = runtime.lease("controller", store.clone(), "dep:controller:", lease_ttl);
    let lease_status = lease.status();
    // the providers' own clients give up after ANALYSIS_TIMEOUT_MS; this bounds anything else
    let (measurer, measured) = Measurer::new(
        providers,
        probe_timeout + Duration::from_secs(1),
        clock.clone(),
    );
    for breaker in measurer.breakers() {
        runtime.add_breaker(breaker);
    }
    let (controller, handle) = Controller::load(Parts {
        store: store.clone(),
        platform: platform.clone(),
        measurer,
        measured,
        clock: clock.clone(),
        metrics: metrics.clone(),
        audit,
        subject_prefix: subject_prefix.clone(),
        lease,
        shutdown: runtime.shutdown_signal(),
    })
    .await?;
    // the controller's state is in the store: a restarted loop loads it again, as a replica
    // taking the lease over does
    let controller = Arc::new(tokio::sync::Mutex::new(controller));
    runtime.supervise("rollout_controller", move |stop| {
        let controller = controller.clone();
        async move { controller.lock().await.run(stop).await }
    });

    let trouble = metrics.clone();
    let inconclusive = handle.clone();
    runtime.add_figures(move |f| {
        f.insert("recent_rollbacks".into(), trouble.recent_trouble());
        f.insert(
            "inconclusive_gates".into(),
            inconclusive.inconclusive_now() as f64,
        );
    });
    runtime.add_andon_rule(AndonRule::new(
        "rollback_recent",
        "recent_rollbacks",
        0.0,
        Level::Red,
        "rollbacks and failed deployments in the last 5 minutes",
    ));
    runtime.add_andon_rule(AndonRule::new(
        "gate_inconclusive",
        "inconclusive_gates",
        0.0,
        Level::Yellow,
        "stages held by the gate: inconclusive measurements or measurement errors",
    ));

    let safety = Pipeline::new(
        "deploy",
        SafetyFactSource { registry, platform },
        SafetyPolicy,
        Admit {
            handle: handle.clone(),
            clock: clock.clone(),
        },
        runtime.kaizen().clone(),
    );
    let wait_limit = cfg
        .request_timeout
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_millis(100));
    let app = Arc::new(App {
        defaults,
        safety,
        handle,
        providers: provider_kinds,
        prometheus,
        fleet,
        store,
        wait_limit,
        lease: lease_status,
    });
    let router = Router::new()
        .route("/deploy", post(api::create))
        .route("/deploy/{deployment_id}", get(api::get))
        .route("/deploy/{deployment_id}/abort", post(api::abort))
        .route("/deploy/{deployment_id}/promote", post(api::promote))
        .route("/deploy/{deployment_id}/pause", post(api::pause))
        .route("/deploy/{deployment_id}/resume", post(api::resume))
        .route("/deployments", get(api::list))
        .route("/fleet", get(api::fleet))
        .route("/fleet/faults", post(api::faults))
        .with_state(app);
    Ok((router, DeployApi::openapi()))
}
