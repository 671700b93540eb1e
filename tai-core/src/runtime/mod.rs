//! The runtime: one way to start any TAI service.
//!
//! [`Runtime::from_env`] reads the configuration ([`config`]), starts logging, and prints the
//! effective configuration with secrets masked. The service then builds its parts on the
//! runtime's clock and [`Kaizen`], registers what `/status` and `/ready` should show (breakers,
//! queues, backends, readiness probes, Andon figures and rules) and its background workers, and
//! hands its domain router to [`Runtime::serve`], which adds:
//!
//! - the common routes: `/health`, `/ready`, `/metrics`, `/status`, `/andon`, `/` and
//!   `/openapi.json` (the service's OpenAPI document merged with the common one);
//! - `x-request-id` (kept from the request or generated) and W3C `traceparent` on every response;
//! - a body limit (64 KiB by default), a request timeout, Stripe-shaped JSON errors for every
//!   rejection including the router's 404 and 405, RED metrics per matched route, and bearer-key
//!   authentication on mutating routes when keys are configured;
//! - graceful shutdown on SIGINT/SIGTERM: stop accepting, finish in-flight requests, signal the
//!   workers, and drain every registered queue within the grace time.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
mod middleware;
pub mod openapi;
mod page;
pub mod ratelimit;
mod roles;
mod routes;
pub mod telemetry;
pub mod trace;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa::OpenApi;

pub use auth::{ApiKey, Principal};
pub use config::{ConfigError, LogFormat, Profile, RuntimeConfig};
pub use error::{ApiError, ApiJson, ErrorType};
pub use roles::Leadership;
pub use trace::TraceContext;

use crate::andon::{Andon, AndonReport, AndonRule, Figures, Level};
use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;
use crate::jidoka::{BreakerState, CircuitBreaker};
use crate::kaizen::Kaizen;
use crate::kanban::QueueStatus;

/// A readiness probe for `/ready`.
type Probe = Arc<dyn Fn() -> BoxFuture<'static, Result<(), BackendError>> + Send + Sync>;

/// Adds service figures for Andon.
type FigureSource = Arc<dyn Fn(&mut Figures) + Send + Sync>;
type StatusSection = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub(crate) struct Readiness {
    name: String,
    probe: Probe,
}

/// What the common routes and middleware share.
pub(crate) struct Common {
    service: String,
    version: &'static str,
    profile: Profile,
    started: Instant,
    started_wall: chrono::DateTime<chrono::Utc>,
    kaizen: Kaizen,
    andon: Andon,
    breakers: Vec<CircuitBreaker>,
    queues: Vec<Arc<dyn QueueStatus>>,
    readiness: Vec<Readiness>,
    backends: BTreeMap<String, String>,
    figure_sources: Vec<FigureSource>,
    status_sections: BTreeMap<String, StatusSection>,
    leases: BTreeMap<String, Arc<std::sync::RwLock<crate::lease::LeaseStatus>>>,
    api_keys: Vec<ApiKey>,
    request_timeout: std::time::Duration,
    openapi_json: String,
}

impl Common {
    /// The figures Andon judges: recent HTTP traffic, breakers, and the service's own.
    fn figures(&self) -> Figures {
        let stats = self.kaizen.http_window().stats();
        let mut f = Figures::new();
        f.insert("request_count".into(), stats.count as f64);
        f.insert("rate_per_sec".into(), stats.rate_per_sec);
        f.insert("error_rate".into(), stats.error_rate);
        f.insert("p95_ms".into(), stats.p95_ms);
        f.insert("p99_ms".into(), stats.p99_ms);
        let open = self
            .breakers
            .iter()
            .filter(|b| b.state() == BreakerState::Open)
            .count();
        f.insert("breakers_open".into(), open as f64);
        for source in &self.figure_sources {
            source(&mut f);
        }
        f
    }

    fn evaluate_andon(&self) -> AndonReport {
        self.andon.evaluate(&self.figures())
    }
}

/// The Andon rules every service starts with: 5xx share over 5% is RED, p99 over 5 s is
/// YELLOW, an open circuit breaker is RED.
pub fn default_andon_rules() -> Vec<AndonRule> {
    vec![
        AndonRule::new(
            "error_rate_high",
            "error_rate",
            0.05,
            Level::Red,
            "5xx share of recent requests",
        ),
        AndonRule::new(
            "latency_p99_high",
            "p99_ms",
            5000.0,
            Level::Yellow,
            "p99 latency of recent requests (ms)",
        ),
        AndonRule::new(
            "breaker_open",
            "breakers_open",
            0.0,
            Level::Red,
            "circuit breakers open",
        ),
        AndonRule::new(
            "worker_restarting",
            "worker_restarts_5m",
            2.0,
            Level::Yellow,
            "restarts of one background worker in the last 5 minutes",
        ),
    ]
}

fn queue_backend(e: crate::kanban::QueueError) -> BackendError {
    match e {
        crate::kanban::QueueError::Backend(b) => b,
        other => BackendError::Unavailable {
            backend: "queue",
            message: other.to_string(),
        },
    }
}

/// A service being assembled, then served.
pub struct Runtime {
    config: RuntimeConfig,
    version: &'static str,
    clock: SharedClock,
    kaizen: Kaizen,
    breakers: Vec<CircuitBreaker>,
    queues: Vec<Arc<dyn QueueStatus>>,
    readiness: Vec<Readiness>,
    backends: BTreeMap<String, String>,
    figure_sources: Vec<FigureSource>,
    status_sections: BTreeMap<String, StatusSection>,
    andon_rules: Vec<AndonRule>,
    shutdown_tx: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    supervisor: crate::supervisor::Supervisor,
    redis: Option<crate::store::RedisStore>,
    database: Option<crate::db::Database>,
    state: Option<Arc<dyn crate::store::StateStore>>,
    leases: BTreeMap<String, Arc<std::sync::RwLock<crate::lease::LeaseStatus>>>,
    /// `kanban_fallback_total`, registered with the first fallback queue and shared by all.
    fallback_counters: Option<prometheus::IntCounterVec>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("service", &self.config.service)
            .field("version", &self.version)
            .field("backends", &self.backends)
            .finish_non_exhaustive()
    }
}

pub use telemetry::{init_tracing, shutdown_tracing};

/// What a service binary is: its name, version, one line on what it does, where it listens by
/// default, and its own settings (beside [`cli::CORE_SETTINGS`]).
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    /// The service's name (`payment-system`).
    pub name: &'static str,
    /// Its version (`env!("CARGO_PKG_VERSION")`).
    pub version: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// `LISTEN_ADDR` when unset.
    pub default_listen: &'static str,
    /// The service's own settings, table by table.
    pub settings: &'static [&'static [cli::Setting]],
}

impl Runtime {
    /// Reads the configuration of `service` from the environment, starts logging, and prints
    /// the effective configuration.
    pub fn from_env(
        service: &str,
        version: &'static str,
        default_listen: &str,
    ) -> Result<Self, ConfigError> {
        Self::from_env_and(service, version, default_listen, Vec::new())
    }

    fn from_env_and(
        service: &str,
        version: &'static str,
        default_listen: &str,
        flags: Vec<(String, String)>,
    ) -> Result<Self, ConfigError> {
        let sources = config::Sources::from_process_with(flags)?;
        let config = RuntimeConfig::from_sources(service, default_listen, sources)?;
        init_tracing(&config);
        Ok(Self::new(config, version, crate::clock::system()))
    }

    /// Parses the command line of `binary` (`--help`, `--version`, each setting as a flag over
    /// its environment variable), then [`Runtime::from_env`], then the secrets: with
    /// `VAULT_ADDR` and `VAULT_TOKEN` set, the API keys are the comma-separated field
    /// `api_keys` of the KV v2 secret `VAULT_MOUNT` (`secret`) / `VAULT_PATH`
    /// (`tai/<service>`). The `prod` profile refuses to start without keys from one source or
    /// the other.
    pub async fn start(binary: &Binary) -> Result<Self, ConfigError> {
        let flags = cli::parse(
            binary.name,
            binary.version,
            binary.about,
            binary.default_listen,
            &std::iter::once(cli::CORE_SETTINGS)
                .chain(binary.settings.iter().copied())
                .collect::<Vec<_>>(),
        );
        let mut runtime =
            Self::from_env_and(binary.name, binary.version, binary.default_listen, flags)?;
        runtime.load_secrets().await?;
        Ok(runtime)
    }

    async fn load_secrets(&mut self) -> Result<(), ConfigError> {
        use crate::secrets::SecretSource;
        let Some(addr) = self.config.vault_addr.clone() else {
            self.set_backend("secrets", "env");
            return Ok(());
        };
        let token = self.config.vault_token.clone().ok_or_else(|| {
            ConfigError::Refused("VAULT_ADDR is set but VAULT_TOKEN is not".into())
        })?;
        let mount = self
            .config
            .setting("VAULT_MOUNT")
            .unwrap_or_else(|| "secret".into());
        let path = self
            .config
            .setting("VAULT_PATH")
            .unwrap_or_else(|| format!("tai/{}", self.config.service));
        let vault = crate::secrets::VaultSecrets::new(&addr, &token, &mount, &path)
            .map_err(|e| ConfigError::Refused(e.to_string()))?;
        let keys = vault
            .get("api_keys")
            .await
            .map_err(|e| ConfigError::Refused(format!("cannot read secrets from Vault: {e}")))?;
        if let Some(keys) = keys {
            self.config.api_keys = auth::parse_api_keys(keys.expose());
        }
        tracing::info!(mount = %mount, path = %path, keys = self.config.api_keys.len(), "API keys read from Vault");
        if self.config.profile == Profile::Prod && self.config.api_keys.is_empty() {
            return Err(ConfigError::Refused(format!(
                "the prod profile refuses to start without API keys: Vault {mount}/{path} has no api_keys"
            )));
        }
        let vault = Arc::new(vault);
        self.add_readiness("vault", move || {
            let vault = vault.clone();
            Box::pin(async move { vault.get("api_keys").await.map(|_| ()) })
        });
        self.set_backend("secrets", "vault");
        Ok(())
    }

    /// A runtime over an explicit configuration and clock (tests).
    pub fn new(config: RuntimeConfig, version: &'static str, clock: SharedClock) -> Self {
        let described: Vec<String> = config
            .describe()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        tracing::info!(service = %config.service, version, "effective configuration: {}", described.join(" "));
        let kaizen = Kaizen::new(&config.service, clock.clone());
        let supervisor = crate::supervisor::Supervisor::new(kaizen.registry());
        let (shutdown_tx, _) = watch::channel(false);
        let mut status_sections: BTreeMap<String, StatusSection> = BTreeMap::new();
        let workers = supervisor.clone();
        status_sections.insert(
            "workers".into(),
            Arc::new(move || serde_json::to_value(workers.snapshot()).unwrap_or_default()),
        );
        let workers = supervisor.clone();
        let figure_sources: Vec<FigureSource> = vec![Arc::new(move |f: &mut Figures| {
            f.insert(
                "worker_restarts_5m".into(),
                workers.most_recent_restarts() as f64,
            );
        })];
        Self {
            config,
            version,
            clock,
            kaizen,
            breakers: Vec::new(),
            queues: Vec::new(),
            readiness: Vec::new(),
            backends: BTreeMap::new(),
            figure_sources,
            status_sections,
            andon_rules: default_andon_rules(),
            shutdown_tx,
            workers: Vec::new(),
            supervisor,
            redis: None,
            database: None,
            state: None,
            fallback_counters: None,
            leases: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The clock every part should read.
    pub fn clock(&self) -> SharedClock {
        self.clock.clone()
    }

    /// The service's metrics.
    pub fn kaizen(&self) -> &Kaizen {
        &self.kaizen
    }

    /// Shows `breaker` on `/status` and in the `breakers_open` Andon figure.
    pub fn add_breaker(&mut self, breaker: CircuitBreaker) {
        self.breakers.push(breaker);
    }

    /// A lease named `name` for a singleton worker, kept in `store` under `prefix`, shown on
    /// `/status` (`leases.<name>`: role, holder, token, takeovers) and counting takeovers in
    /// `lease_takeovers_total{lease}`.
    pub fn lease(
        &mut self,
        name: &str,
        store: Arc<dyn crate::store::StateStore>,
        prefix: &str,
        ttl: std::time::Duration,
    ) -> crate::lease::Lease {
        let mut lease = crate::lease::Lease::new(store, name, prefix, ttl);
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "lease_takeovers_total",
                "Times this replica took a lease over from another holder",
            ),
            &["lease"],
        )
        .ok()
        .filter(|c| self.kaizen.registry().register(Box::new(c.clone())).is_ok());
        if let Some(c) = counter {
            lease = lease.with_takeover_counter(c.with_label_values(&[name]));
        }
        self.leases.insert(name.to_owned(), lease.status());
        lease
    }

    /// Shows `queue` on `/status` and drains it on shutdown.
    pub fn add_queue(&mut self, queue: Arc<dyn QueueStatus>) {
        self.queues.push(queue);
    }

    /// Names the backend serving `role` (e.g. `state` -> `memory`) on `/status`.
    pub fn set_backend(&mut self, role: &str, backend: &str) {
        self.backends.insert(role.to_owned(), backend.to_owned());
    }

    /// Adds a probe `/ready` runs.
    pub fn add_readiness<F>(&mut self, name: &str, probe: F)
    where
        F: Fn() -> BoxFuture<'static, Result<(), BackendError>> + Send + Sync + 'static,
    {
        self.readiness.push(Readiness {
            name: name.to_owned(),
            probe: Arc::new(probe),
        });
    }

    /// Adds service figures for Andon to judge.
    pub fn add_figures<F: Fn(&mut Figures) + Send + Sync + 'static>(&mut self, source: F) {
        self.figure_sources.push(Arc::new(source));
    }

    /// Adds a section `name` to `/status`, its content read from `source` on each request
    /// (keep it cheap: a snapshot, not a backend call).
    pub fn add_status_section<F>(&mut self, name: &str, source: F)
    where
        F: Fn() -> serde_json::Value + Send + Sync + 'static,
    {
        self.status_sections
            .insert(name.to_owned(), Arc::new(source));
    }

    /// Adds an Andon rule.
    pub fn add_andon_rule(&mut self, rule: AndonRule) {
        self.andon_rules.push(rule);
    }

    /// The system of record (`DATABASE_URL`; a SQLite file under `TAI_DATA_DIR` by default),
    /// connected once with tai-core's tables in place. Registers it on `/status` and `/ready`.
    pub async fn database(&mut self) -> Result<crate::db::Database, BackendError> {
        if let Some(db) = &self.database {
            return Ok(db.clone());
        }
        let max = self
            .config
            .setting("DATABASE_MAX_CONNECTIONS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(10u32);
        let db = crate::db::Database::connect(self.config.database_url.expose(), max).await?;
        db.migrate_core().await?;
        tracing::info!(database = %db.location(), engine = db.dialect().as_str(), "system of record ready");
        let probe = db.clone();
        self.add_readiness("database", move || {
            let probe = probe.clone();
            Box::pin(async move { probe.ping().await })
        });
        self.set_backend("database", db.dialect().as_str());
        self.database = Some(db.clone());
        Ok(db)
    }

    /// Whether `DATABASE_URL` asks for the memory store (fast tests; nothing survives).
    pub fn memory_store(&self) -> bool {
        matches!(
            self.config.database_url.expose(),
            "memory" | "sqlite::memory:"
        )
    }

    /// The state store for records: the system of record's `tai_kv` table, or memory when
    /// `DATABASE_URL=memory`. Connects Redis too when `REDIS_URL` is set, for the hot shared
    /// state ([`Runtime::redis`]). Registers both on `/status` and `/ready`. Built once; later calls
    /// answer the same store.
    pub async fn state_store(&mut self) -> Result<Arc<dyn crate::store::StateStore>, BackendError> {
        self.connect_redis().await?;
        if let Some(store) = &self.state {
            return Ok(store.clone());
        }
        let store: Arc<dyn crate::store::StateStore> = if self.memory_store() {
            Arc::new(crate::store::MemoryStore::new(self.clock.clone()))
        } else {
            let db = self.database().await?;
            let sql = crate::store::SqlStore::new(db, self.clock.clone());
            let sweeper = sql.clone();
            self.supervise("state_sweep", move |stop| {
                sweeper
                    .clone()
                    .sweep_every(std::time::Duration::from_secs(30), stop)
            });
            Arc::new(sql)
        };
        self.set_backend("state", store.backend());
        self.state = Some(store.clone());
        Ok(store)
    }

    /// Connects Redis when `REDIS_URL` is set (keys prefixed with `REDIS_KEY_PREFIX`, default
    /// `tai:<service>:`), once.
    async fn connect_redis(&mut self) -> Result<(), BackendError> {
        let Some(url) = self.config.redis_url.clone() else {
            self.set_backend("hot_state", "memory");
            return Ok(());
        };
        if self.redis.is_some() {
            return Ok(());
        }
        let prefix = self
            .config
            .setting("REDIS_KEY_PREFIX")
            .unwrap_or_else(|| format!("tai:{}:", self.config.service));
        let redis = crate::store::RedisStore::connect(url.expose(), &prefix).await?;
        self.redis = Some(redis.clone());
        self.add_readiness("redis", move || {
            let probe = redis.clone();
            Box::pin(async move { crate::store::StateStore::ping(&probe).await })
        });
        self.set_backend("hot_state", "redis");
        Ok(())
    }

    /// Relays the outbox of the system of record to the JetStream stream `stream` (capturing
    /// `subjects`) when `NATS_URL` is set; answers the relay, or `None` when events stay in the
    /// database only. Registers it on `/status` (`events`) and `/ready`.
    pub async fn outbox_relay(
        &mut self,
        stream: &str,
        subjects: &str,
        store: Arc<dyn crate::store::StateStore>,
    ) -> Result<Option<crate::outbox::OutboxRelay>, BackendError> {
        let Some(url) = self.config.nats_url.clone() else {
            self.set_backend("events", "database");
            return Ok(None);
        };
        let db = self.database().await?;
        let sink = crate::audit::JetStreamSink::connect(&url, stream, subjects).await?;
        let probe = sink.clone();
        self.add_readiness("nats", move || {
            let probe = probe.clone();
            Box::pin(async move { crate::audit::AuditSink::ping(&probe).await })
        });
        let relay = crate::outbox::OutboxRelay::new(db, Arc::new(sink), self.clock.clone());
        let every = std::time::Duration::from_millis(
            self.config
                .setting("OUTBOX_POLL_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100u64),
        );
        // one replica publishes at a time, so events go out in order
        let leadership = self.singleton(
            "outbox_relay",
            store,
            &format!("outbox:{stream}:"),
            std::time::Duration::from_secs(10),
        );
        let worker = relay.clone();
        self.supervise("outbox_relay", move |stop| {
            worker.clone().run(every, leadership.clone(), stop)
        });
        self.set_backend("events", "jetstream");
        Ok(Some(relay))
    }

    /// The Kanban queue `config.name` for the role `role`, on the backend the configuration
    /// names, registered on `/status` (depth, and `backends.<role>`), drained on shutdown, and
    /// probed on `/ready`:
    ///
    /// - `NATS_URL`: a JetStream work-queue stream `stream` on subject `subject`;
    /// - `AMQP_URL`: a RabbitMQ queue named `stream`;
    /// - both: JetStream first and RabbitMQ while NATS cannot take work ([`FallbackQueue`]);
    /// - neither: in process (gone with the process; the `prod` profile refuses it).
    ///
    /// `id_of` names an item: the message id both brokers carry, by which a copy that reached
    /// both is handled once.
    ///
    /// [`FallbackQueue`]: crate::kanban::FallbackQueue
    pub async fn work_queue<T>(
        &mut self,
        role: &str,
        config: crate::kanban::QueueConfig,
        stream: &str,
        subject: &str,
        id_of: fn(&T) -> String,
    ) -> Result<crate::kanban::SharedQueue<T>, ConfigError>
    where
        T: serde::Serialize
            + serde::de::DeserializeOwned
            + Clone
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        use crate::kanban::{
            FallbackQueue, JetStreamQueue, MemoryQueue, RabbitMqQueue, SharedQueue,
        };
        self.config.refuse_in_prod(
            self.config.nats_url.is_none() && self.config.amqp_url.is_none(),
            &format!("the in-process queue {}", config.name),
            "set NATS_URL (JetStream) or AMQP_URL (RabbitMQ) so queued work survives a restart",
        )?;
        let gauges = self.kaizen.queue_depth().clone();
        let jetstream: Option<SharedQueue<T>> = match self.config.nats_url.clone() {
            Some(url) => Some(Arc::new(
                JetStreamQueue::<T>::connect(&url, stream, subject, config.clone())
                    .await
                    .map_err(queue_backend)?
                    .with_ids(id_of)
                    .with_gauges(&gauges),
            )),
            None => None,
        };
        let rabbitmq: Option<SharedQueue<T>> = match self.config.amqp_url.clone() {
            Some(url) => {
                let queue = Arc::new(
                    RabbitMqQueue::<T>::connect(url.expose(), stream, config.clone())
                        .await
                        .map_err(queue_backend)?
                        .with_ids(id_of)
                        .with_gauges(&gauges),
                );
                let probe = queue.clone();
                self.add_readiness("rabbitmq", move || {
                    let probe = probe.clone();
                    Box::pin(async move { probe.ping().await.map_err(queue_backend) })
                });
                Some(queue)
            }
            None => None,
        };
        let queue: SharedQueue<T> = match (jetstream, rabbitmq) {
            (Some(primary), Some(fallback)) => {
                // once NATS fails, pushes skip it for a while instead of each waiting for it
                let breaker = crate::jidoka::CircuitBreaker::new(
                    format!("queue-{}", config.name),
                    crate::jidoka::BreakerConfig {
                        open_for: std::time::Duration::from_secs(5),
                        ..crate::jidoka::BreakerConfig::default()
                    },
                    self.clock.clone(),
                );
                self.add_breaker(breaker.clone());
                let kaizen = self.kaizen.clone();
                let counters = self.fallback_counters.get_or_insert_with(|| {
                    kaizen.counter_family(
                        "kanban_fallback_total",
                        "Items pushed to the fallback queue backend, and copies dropped",
                        &["queue", "event"],
                    )
                });
                Arc::new(
                    FallbackQueue::new(primary, fallback, id_of)
                        .with_breaker(breaker)
                        .with_counters(counters),
                )
            }
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => {
                Arc::new(MemoryQueue::<T>::new(config, self.clock.clone()).with_gauges(&gauges))
            }
        };
        self.add_queue(queue.clone());
        self.set_backend(role, queue.backend());
        Ok(queue)
    }

    /// The Redis store, once [`Runtime::state_store`] connected one: for the hot parts that must
    /// be shared across replicas (rate limits, counters) to use the same connection and prefix.
    pub fn redis(&self) -> Option<&crate::store::RedisStore> {
        self.redis.as_ref()
    }

    /// The audit sink the configuration asks for: JetStream stream `stream` capturing `subjects`
    /// when `NATS_URL` is set, logs otherwise. Registers it on `/status` and `/ready`.
    pub async fn audit_sink(
        &mut self,
        stream: &str,
        subjects: &str,
    ) -> Result<Arc<dyn crate::audit::AuditSink>, BackendError> {
        let sink: Arc<dyn crate::audit::AuditSink> = match &self.config.nats_url {
            Some(url) => {
                let js = crate::audit::JetStreamSink::connect(url, stream, subjects).await?;
                let probe = js.clone();
                self.add_readiness("nats", move || {
                    let probe = probe.clone();
                    Box::pin(async move { crate::audit::AuditSink::ping(&probe).await })
                });
                Arc::new(js)
            }
            None => Arc::new(crate::audit::LogSink),
        };
        self.set_backend("audit", sink.backend());
        Ok(sink)
    }

    /// A receiver that turns `true` when shutdown begins; workers stop taking new work then.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Runs the background worker `make` builds, under the supervisor: started again (with
    /// backoff) when it panics or returns before shutdown, shown on `/status` (`workers`) and
    /// in the metrics. `make` gets the shutdown signal: the worker stops taking work when it
    /// turns `true`, and shutdown waits for it (within the grace time).
    pub fn supervise<F, Fut>(&mut self, name: &str, make: F)
    where
        F: Fn(watch::Receiver<bool>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = self.supervisor.spawn(
            name,
            crate::supervisor::Backoff::default(),
            self.shutdown_signal(),
            make,
        );
        self.workers.push(handle);
    }

    fn into_parts(
        self,
        domain: Router,
        api: utoipa::openapi::OpenApi,
    ) -> (Router, Arc<Common>, Shutdown) {
        let mut workers = self.workers;
        workers.push(
            self.supervisor.spawn(
                "backend_probe",
                crate::supervisor::Backoff::default(),
                self.shutdown_tx.subscribe(),
                backend_probe(
                    self.readiness
                        .iter()
                        .map(|r| (r.name.clone(), r.probe.clone()))
                        .collect(),
                    self.kaizen.registry(),
                ),
            ),
        );
        let andon = Andon::new(self.andon_rules, self.clock.clone(), self.kaizen.registry());
        let mut doc = routes::CommonApi::openapi();
        doc.merge(api);
        doc.info.title = self.config.service.clone();
        doc.info.version = self.version.to_owned();
        openapi::complete(&mut doc, !self.config.api_keys.is_empty(), auth::is_public);
        let openapi_json = doc.to_json().unwrap_or_else(|_| "{}".into());
        let common = Arc::new(Common {
            service: self.config.service.clone(),
            version: self.version,
            profile: self.config.profile,
            started: Instant::now(),
            started_wall: self.clock.wall(),
            kaizen: self.kaizen,
            andon,
            breakers: self.breakers,
            queues: self.queues,
            readiness: self.readiness,
            backends: self.backends,
            figure_sources: self.figure_sources,
            status_sections: self.status_sections,
            leases: self.leases,
            api_keys: self.config.api_keys.clone(),
            request_timeout: self.config.request_timeout,
            openapi_json,
        });
        let common_routes = Router::new()
            .route("/health", get(routes::health))
            .route("/ready", get(routes::ready))
            .route("/metrics", get(routes::metrics))
            .route("/status", get(routes::status))
            .route("/andon", get(routes::andon))
            .route("/", get(routes::index))
            .route("/openapi.json", get(routes::openapi))
            .with_state(common.clone());
        let mut domain = domain;
        if self.config.setting("TAI_TEST_HOOKS").as_deref() == Some("true") {
            tracing::warn!(
                "TAI_TEST_HOOKS=true: POST /debug/workers/{{name}}/panic and POST /debug/panic are open"
            );
            let supervisor = self.supervisor.clone();
            domain = domain.merge(
                Router::new()
                    .route(
                        "/debug/workers/{name}/panic",
                        axum::routing::post(
                            move |axum::extract::Path(name): axum::extract::Path<String>| {
                                let supervisor = supervisor.clone();
                                async move {
                                    if supervisor.poison(&name) {
                                        http::StatusCode::ACCEPTED
                                    } else {
                                        http::StatusCode::NOT_FOUND
                                    }
                                }
                            },
                        ),
                    )
                    .route(
                        "/debug/panic",
                        axum::routing::post(|| async {
                            if true {
                                panic!("a handler panicked through the test hook");
                            }
                        }),
                    ),
            );
        }
        let router = common_routes
            .merge(domain)
            .fallback(middleware::not_found)
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                middleware::panic_response,
            ))
            .layer(axum::middleware::from_fn_with_state(
                common.clone(),
                middleware::authenticate,
            ))
            .layer(DefaultBodyLimit::max(self.config.body_limit))
            .layer(axum::middleware::from_fn_with_state(
                common.clone(),
                middleware::observe,
            ))
            .layer(axum::middleware::from_fn(trace::trace_context))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
            // a panic in the middleware itself: still a JSON 500, not a dropped connection
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                middleware::panic_response,
            ));
        let shutdown = Shutdown {
            tx: self.shutdown_tx,
            workers,
            grace: self.config.shutdown_grace,
        };
        (router, common, shutdown)
    }

    /// The full router without serving it (for in-process tests with `oneshot`).
    pub fn into_router(self, domain: Router, api: utoipa::openapi::OpenApi) -> Router {
        self.into_parts(domain, api).0
    }

    /// Serves `domain` with the common routes until SIGINT or SIGTERM, then shuts down
    /// gracefully: in-flight requests finish, workers are told to stop, queues drain.
    pub async fn serve(self, domain: Router, api: utoipa::openapi::OpenApi) -> std::io::Result<()> {
        let addr = self.config.listen_addr;
        let service = self.config.service.clone();
        let (router, common, shutdown) = self.into_parts(domain, api);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        tracing::info!(%service, addr = %listener.local_addr()?, "listening");

        // Andon is judged every second, so the gauge and history move even when nobody looks.
        let ticker = {
            let common = common.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    every.tick().await;
                    common.evaluate_andon();
                }
            })
        };

        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_requested())
            .await?;
        tracing::info!(%service, "stopped accepting; draining");
        ticker.abort();
        shutdown.run(&common).await;
        tracing::info!(%service, "shut down");
        shutdown_tracing();
        Ok(())
    }
}

/// The worker behind `tai_backend_up{backend}`: every readiness probe (the ones `/ready` runs),
/// every 5 s, each given 3 s.
fn backend_probe(
    probes: Vec<(String, Probe)>,
    registry: &prometheus::Registry,
) -> impl Fn(watch::Receiver<bool>) -> BoxFuture<'static, ()> + Send + Sync + 'static {
    let up = crate::kaizen::register(
        registry,
        prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "tai_backend_up",
                "1 while the backend's readiness probe answers, 0 while it fails",
            ),
            &["backend"],
        )
        .expect("constant metric definition"),
    );
    let probes = Arc::new(probes);
    move |mut stop| {
        let (probes, up) = (probes.clone(), up.clone());
        Box::pin(async move {
            loop {
                for (name, probe) in probes.iter() {
                    let ok = matches!(
                        tokio::time::timeout(std::time::Duration::from_secs(3), probe()).await,
                        Ok(Ok(()))
                    );
                    up.with_label_values(&[name]).set(i64::from(ok));
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }
}

struct Shutdown {
    tx: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    grace: std::time::Duration,
}

impl Shutdown {
    async fn run(self, common: &Common) {
        let _ = self.tx.send(true);
        for queue in &common.queues {
            let left = crate::kanban::drain(queue.as_ref(), self.grace).await;
            tracing::info!(queue = queue.name(), ?left, "queue drained");
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        for worker in self.workers {
            if tokio::time::timeout_at(deadline, worker).await.is_err() {
                tracing::warn!("a worker did not stop within the grace time");
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (`docker stop`, `kill`): for command-line tools
/// that must stop cleanly, as the services do.
pub async fn stop_requested() {
    shutdown_requested().await
}

async fn shutdown_requested() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests;
