//! # payment-system
//!
//! The payment service on tai-core. `POST /payment` runs the Signal -> Policy -> Action flow:
//!
//! - [`signal`]: parse and validate the request ([`money`] for exact amounts, [`card`] for cards);
//! - Heijunka at the edge: a per-merchant GCRA rate limit and a global concurrency limit that
//!   sheds load with 503;
//! - [`idempotency`]: replay, 422 and 409 per the IETF draft;
//! - [`fraud`]: gather facts, then the pure fraud policy gives an explained verdict;
//! - [`action`]: charge through the gateway circuit breaker ([`gateway`]), store the
//!   [`record`], queue the confirmation (Kanban) that a worker carries out;
//! - [`ledger`]: the system of record (SQLite by default, PostgreSQL for replicas): payments,
//!   idempotency keys and events written together, relayed to the event stream by the outbox;
//! - [`reconcile`]: finishes payments left `PROCESSING` by a crash or a gateway timeout;
//! - [`lifecycle`]: capture and void of authorizations, [`refunds`], and the review of held
//!   payments; [`events`] of every change, readable at `GET /events` and delivered to merchants'
//!   [`webhooks`];
//! - [`metrics`]: docs/API.md's metric names, and the fraud-rate figure Andon watches.
//!
//! `main.rs` only reads the configuration and serves; `bin/sandbox-gateway.rs` is the
//! standalone sandbox gateway.

#![warn(missing_docs)]

pub mod action;
mod api;
pub mod card;
mod docs;
pub mod events;
pub mod fraud;
pub mod gateway;
pub mod idempotency;
pub mod ledger;
pub mod lifecycle;
pub mod metrics;
pub mod money;
pub mod reconcile;
pub mod record;
pub mod refunds;
mod routes;
pub mod settings;
pub mod signal;
pub mod webhooks;

#[cfg(test)]
mod props;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tai_core::andon::{AndonRule, Level};
use tai_core::clock::SharedClock;
use tai_core::heijunka::Quota;
use tai_core::jidoka::{BreakerConfig, CircuitBreaker};
use tai_core::kanban::{QueueConfig, QueueError, SharedQueue};
use tai_core::pipeline::Pipeline;
use tai_core::runtime::{ApiError, ConfigError, ErrorType, Runtime, ratelimit};
use tai_core::secrets::Secret;
use tai_core::store::StateStore;
use tower::ServiceBuilder;
use utoipa::OpenApi;

use crate::action::PaymentAction;
use crate::fraud::{FraudFactSource, FraudPolicy, FraudRules};
use crate::gateway::Gateway;
use crate::gateway::http::HttpGateway;
use crate::gateway::sandbox::Sandbox;
use crate::idempotency::Idempotency;
use crate::ledger::Ledger;
use crate::metrics::PaymentMetrics;
use crate::signal::{Limits, PaymentRequest};

/// One payment attempt on its way through the pipeline.
#[derive(Debug, Clone)]
pub struct PaymentAttempt {
    /// The validated request.
    pub request: PaymentRequest,
    /// `txn_` and 32 hex digits.
    pub transaction_id: String,
    /// The trace it belongs to.
    pub trace_id: String,
    /// The client's idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The fingerprint of the request body, when a key was sent.
    pub fingerprint: Option<String>,
    /// The token of the idempotency claim this request holds, when a key was sent.
    pub claim_token: Option<String>,
    /// When it arrived (monotonic, for the processing time).
    pub received: Instant,
    /// When it arrived (wall clock, for the record).
    pub received_at: DateTime<Utc>,
}

impl PaymentAttempt {
    /// A new attempt with a fresh transaction id.
    pub fn new(request: PaymentRequest, trace_id: String, idempotency_key: Option<String>) -> Self {
        Self {
            request,
            transaction_id: format!("txn_{}", uuid::Uuid::new_v4().simple()),
            trace_id,
            idempotency_key,
            fingerprint: None,
            claim_token: None,
            received: Instant::now(),
            received_at: Utc::now(),
        }
    }
}

/// Where things live in the state store (payments and idempotency keys have tables of their
/// own: [`ledger`]).
pub mod keys {
    /// A network-wide blocklist entry (every merchant refuses the customer).
    pub fn blocklist(customer: &str) -> String {
        format!("pay:blocklist:{customer}")
    }
    /// One merchant's blocklist entry.
    pub fn merchant_blocklist(merchant: &str, customer: &str) -> String {
        format!("pay:blocklist-m:{merchant}:{customer}")
    }
    /// The key idempotency fingerprints are made with, when not configured.
    pub const FINGERPRINT_KEY: &str = "pay:fingerprint-key";
    /// Currencies a merchant's customer paid in recently.
    pub fn currencies(merchant: &str, customer: &str) -> String {
        format!("pay:currencies:{merchant}:{customer}")
    }
}

type PaymentPipeline = Pipeline<FraudFactSource, FraudPolicy, PaymentAction>;

/// What the handlers share.
#[derive(Debug)]
pub(crate) struct App {
    pipeline: PaymentPipeline,
    ledger: Ledger,
    lifecycle: lifecycle::Lifecycle,
    webhooks: webhooks::Webhooks,
    fingerprints: idempotency::Fingerprinter,
    store: Arc<dyn StateStore>,
    clock: SharedClock,
    limits: Limits,
    /// A payment still in progress after this long is answered `PROCESSING` (below the request
    /// timeout, so the answer is never a bare timeout).
    answer_within: Duration,
    /// Whether API keys are configured (the admin routes need them).
    keys_configured: bool,
    /// Whether a merchant's blocklist entry applies to every merchant (the rules' switch).
    network_blocklist: bool,
}

/// The service could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A setting was invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The fraud rules file was unreadable or invalid.
    #[error("fraud rules {path}: {message}")]
    Rules {
        /// The file.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// The gateway client could not be built.
    #[error("gateway: {0}")]
    Gateway(#[from] gateway::GatewayError),
    /// The store failed while seeding.
    #[error(transparent)]
    Backend(#[from] tai_core::backend::BackendError),
    /// The confirmation queue could not be set up.
    #[error("confirmation queue: {0}")]
    Queue(#[from] QueueError),
}

#[derive(OpenApi)]
#[openapi(
    paths(
        api::create_payment,
        api::get_payment,
        api::add_blocklist,
        api::remove_blocklist,
        api::list_blocklist,
        routes::capture,
        routes::void,
        routes::refund,
        routes::approve,
        routes::reject,
        routes::list_payments,
        routes::list_reviews,
        routes::list_events,
        routes::create_endpoint,
        routes::list_endpoints,
        routes::get_endpoint,
        routes::delete_endpoint,
        routes::enable_endpoint,
        routes::list_deliveries
    ),
    components(schemas(
        record::PaymentRecord,
        record::PaymentStatus,
        record::FailureInfo,
        record::ReviewInfo,
        refunds::Refund,
        refunds::RefundStatus,
        webhooks::Endpoint,
        docs::PaymentRequestDoc,
        docs::CardDoc
    ))
)]
struct PaymentApi;

/// Builds the payment service on `runtime`: its parts, background worker, routes and OpenAPI.
pub async fn build(
    runtime: &mut Runtime,
) -> Result<(Router, utoipa::openapi::OpenApi), BuildError> {
    let cfg = runtime.config().clone();
    let clock = runtime.clock();

    let rules_text = cfg.file_or("FRAUD_RULES_PATH", fraud::DEFAULT_RULES)?;
    let rules = FraudRules::from_toml(&rules_text).map_err(|message| BuildError::Rules {
        path: cfg.text_or("FRAUD_RULES_PATH", "config/fraud_rules.toml (built in)"),
        message,
    })?;

    let store: Arc<dyn StateStore> = runtime.state_store().await?;
    for customer in &rules.blocklist {
        store
            .put(&keys::blocklist(customer), b"1".to_vec(), None)
            .await?;
    }

    cfg.refuse_in_prod(
        cfg.setting("GATEWAY_URL").is_none(),
        "the in-process sandbox gateway",
        "set GATEWAY_URL to the payment gateway",
    )?;
    let gateway_timeout = Duration::from_millis(cfg.setting_or("GATEWAY_TIMEOUT_MS", 5000u64)?);
    let gateway: Arc<dyn Gateway> = match cfg.setting("GATEWAY_URL") {
        Some(url) => {
            let http = HttpGateway::new(&url, gateway_timeout)?;
            let probe = http.clone();
            runtime.add_readiness("gateway", move || {
                let probe = probe.clone();
                Box::pin(async move {
                    probe
                        .ping()
                        .await
                        .map_err(|e| tai_core::backend::BackendError::Unavailable {
                            backend: "gateway",
                            message: e.to_string(),
                        })
                })
            });
            Arc::new(http)
        }
        None => Arc::new(Sandbox::with_config(gateway::sandbox::config_from(
            // in process, a smaller memory: its decisions die with the process anyway
            |name| {
                cfg.setting(name)
                    .or_else(|| (name == "SANDBOX_REMEMBER").then(|| "20000".into()))
            },
        )?)),
    };
    runtime.set_backend(
        "gateway",
        if gateway.kind() == "http" {
            "http gateway"
        } else {
            "sandbox"
        },
    );

    let metrics = Arc::new(PaymentMetrics::new(runtime.kaizen(), clock.clone()));
    let breaker_config = BreakerConfig {
        open_for: Duration::from_secs_f64(
            cfg.setting_or("GATEWAY_BREAKER_OPEN_SECS", 30.0f64)?
                .max(0.0),
        ),
        slow_call: Some(gateway_timeout),
        ..BreakerConfig::default()
    };
    let breaker = CircuitBreaker::new("payment-gateway", breaker_config, clock.clone())
        .with_gauge(metrics.breaker_state.clone());
    runtime.add_breaker(breaker.clone());

    let queue_capacity = cfg.setting_or("CONFIRM_QUEUE_CAPACITY", 100_000usize)?;
    let queue_config = QueueConfig::new("payment-confirmations", queue_capacity);
    let stream = cfg.text_or("CONFIRM_STREAM", "PAYMENT_CONFIRMATIONS");
    let subject = cfg.text_or("CONFIRM_SUBJECT", "payment.confirmations");
    // an item is a transaction id, and is its own message id
    let confirmations: SharedQueue<String> = runtime
        .work_queue("queue", queue_config, &stream, &subject, String::clone)
        .await?;

    // Idempotency fingerprints are keyed: FINGERPRINT_KEY, or a key made once and kept in the
    // system of record, so every replica and every restart uses the same one.
    let fingerprints = idempotency::Fingerprinter::new(match cfg.setting("FINGERPRINT_KEY") {
        Some(k) => Secret::new(k),
        None => {
            let made = hex::encode(rand::random::<[u8; 32]>());
            store
                .put_if_absent(keys::FINGERPRINT_KEY, made.into_bytes(), None)
                .await?;
            let kept = store.get(keys::FINGERPRINT_KEY).await?.unwrap_or_default();
            Secret::new(String::from_utf8_lossy(&kept).into_owned())
        }
    });

    // the system of record: payments, idempotency keys and events, in one database
    let db = runtime.database().await?;
    let idempotency = Idempotency::new(
        db.clone(),
        clock.clone(),
        // a claim on which nothing was sent lapses once a request could no longer be running
        gateway_timeout + Duration::from_secs(30),
        Duration::from_secs(cfg.setting_or("IDEMPOTENCY_TTL_SECS", 86_400u64)?),
    );
    let subject_prefix = cfg.text_or("EVENTS_SUBJECT_PREFIX", ledger::EVENT_SUBJECT_PREFIX);
    let ledger = Ledger::open(db.clone(), clock.clone(), idempotency, &subject_prefix)
        .await?
        .with_holds(
            Duration::from_secs(cfg.setting_or("AUTHORIZATION_TTL_SECS", 604_800u64)?),
            Duration::from_secs(cfg.setting_or("REVIEW_TTL_SECS", 259_200u64)?),
        );
    let webhooks = webhooks::Webhooks::new(
        db,
        clock.clone(),
        webhooks::WebhookConfig {
            retry_base: Duration::from_millis(cfg.setting_or("WEBHOOK_RETRY_BASE_MS", 60_000u64)?),
            retry_max: Duration::from_millis(cfg.setting_or("WEBHOOK_RETRY_MAX_MS", 3_600_000u64)?),
            retry_for: Duration::from_secs(cfg.setting_or("WEBHOOK_RETRY_FOR_SECS", 259_200u64)?),
            disable_after: Duration::from_secs(
                cfg.setting_or("WEBHOOK_DISABLE_AFTER_SECS", 259_200u64)?,
            ),
            timeout: Duration::from_millis(cfg.setting_or("WEBHOOK_TIMEOUT_MS", 10_000u64)?),
            poll: Duration::from_millis(cfg.setting_or("WEBHOOK_POLL_MS", 250u64)?.max(10)),
        },
    )?;
    let deliveries = webhooks.clone();
    runtime.supervise("webhook_deliveries", move |stop| {
        deliveries.clone().run(stop)
    });
    {
        let backlog = Arc::new(AtomicU64::new(0));
        let (figure, counter) = (backlog.clone(), webhooks.clone());
        runtime.every("webhook_backlog", Duration::from_secs(5), move || {
            let (counter, figure) = (counter.clone(), figure.clone());
            async move {
                if let Ok(n) = counter.backlog().await {
                    figure.store(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
                }
            }
        });
        runtime.add_figures(move |f| {
            f.insert(
                "webhook_deliveries_pending".into(),
                backlog.load(Ordering::Relaxed) as f64,
            );
        });
    }
    let stream = cfg.text_or("EVENTS_STREAM", "PAYMENTS_EVENTS");
    if let Some(relay) = runtime
        .outbox_relay(&stream, &format!("{subject_prefix}.>"), store.clone())
        .await?
    {
        // the outbox's backlog, for Andon and /status, counted once a second
        let pending = Arc::new(AtomicU64::new(0));
        let figure = pending.clone();
        runtime.every("outbox_backlog", Duration::from_secs(1), move || {
            let (relay, figure) = (relay.clone(), figure.clone());
            async move {
                if let Ok(n) = relay.pending().await {
                    figure.store(n, Ordering::Relaxed);
                }
            }
        });
        runtime.add_figures(move |f| {
            f.insert(
                "events_unpublished".into(),
                pending.load(Ordering::Relaxed) as f64,
            );
        });
    }
    let (confirmed, counted) = (ledger.clone(), metrics.clone());
    // several workers, so that their confirmations are written together (the ledger's groups)
    runtime.worker_pool("confirmations", confirmations.clone(), 8, move |job| {
        let (ledger, metrics) = (confirmed.clone(), counted.clone());
        async move { action::confirm(&ledger, &metrics, &job.item).await }
    });

    let velocity = runtime
        .window_counter(
            "velocity",
            rules.velocity_window(),
            rules.rules.velocity.max_attempts,
        )
        .await?;
    let recent = runtime.hot_store().await?;
    let facts = FraudFactSource::new(
        velocity,
        store.clone(),
        recent,
        clock.clone(),
        rules.currency_window(),
    );
    // a crash mid-charge or a gateway timeout leaves payments PROCESSING: the reconciler asks
    // the gateway how they ended once they are older than the gateway timeout
    let reconcile_after = Duration::from_millis(cfg.setting_or(
        "RECONCILE_AFTER_MS",
        u64::try_from(gateway_timeout.as_millis()).unwrap_or(5000) + 5000,
    )?);
    let reconcile_every = Duration::from_millis(cfg.setting_or("RECONCILE_EVERY_MS", 1000u64)?);
    let action = PaymentAction {
        gateway: gateway.clone(),
        breaker,
        ledger: ledger.clone(),
        confirmations: confirmations.clone(),
        metrics: metrics.clone(),
        facts: facts.clone(),
        clock: clock.clone(),
        gateway_timeout,
    };
    let lifecycle = lifecycle::Lifecycle {
        action: action.clone(),
    };
    let reconciler = reconcile::Reconciler {
        lifecycle: Some(lifecycle.clone()),
        ledger: ledger.clone(),
        gateway: gateway.clone(),
        confirmations: confirmations.clone(),
        metrics: metrics.clone(),
        clock: clock.clone(),
        after: reconcile_after,
        confirm_after: Duration::from_millis(
            cfg.setting_or("CONFIRM_REQUEUE_AFTER_MS", 60_000u64)?,
        ),
        not_found_grace: Duration::from_millis(
            cfg.setting_or("RECONCILE_NOT_FOUND_GRACE_MS", 120_000u64)?,
        ),
        recheck_for: Duration::from_secs(cfg.setting_or("RECONCILE_RECHECK_SECS", 86_400u64)?),
        look_again: reconcile_every,
        batch: 100,
        recheck_every: Duration::from_millis(
            cfg.setting_or("RECONCILE_RECHECK_EVERY_MS", 30_000u64)?,
        ),
    };
    let leadership = runtime.singleton(
        "reconciler",
        store.clone(),
        "pay:reconciler:",
        Duration::from_millis(cfg.setting_or("RECONCILER_LEASE_MS", 5000u64)?),
    );
    runtime.supervise("reconciler", move |stop| {
        reconciler
            .clone()
            .run(reconcile_every, leadership.clone(), stop)
    });
    let pipeline = Pipeline::new(
        "payment",
        facts,
        FraudPolicy::new(rules.clone()),
        action,
        runtime.kaizen().clone(),
    );

    let per_sec = cfg.setting_or("MERCHANT_RATE_PER_SEC", 200u32)?;
    let burst = cfg.setting_or("MERCHANT_BURST", per_sec)?;
    let quota = Quota {
        burst,
        interval: Duration::from_secs(1) / per_sec.max(1),
    };
    // per merchant: the key's own when it is bound to one, else the body's merchant_id
    let rate_limit = runtime
        .http_rate_limit("rate_limits", quota, "Merchant", |parts, body| {
            match parts.extensions.get::<tai_core::runtime::Principal>() {
                Some(tai_core::runtime::Principal {
                    merchant: Some(m), ..
                }) => Some(m.clone()),
                _ => signal::merchant_of(body),
            }
        })
        .await?;

    // the cap is in the rules' reference currency, converted with their rates
    let max_amount: Decimal = cfg.setting_or("MAX_AMOUNT", Decimal::from(1_000_000))?;
    let rates = rules.rates.clone();
    let app = Arc::new(App {
        pipeline,
        ledger,
        lifecycle,
        webhooks,
        fingerprints,
        store,
        clock,
        limits: Limits {
            max_amount,
            rates: Arc::new(rates),
        },
        answer_within: cfg
            .request_timeout
            .saturating_sub(Duration::from_secs(1))
            .max(Duration::from_millis(100)),
        keys_configured: !cfg.api_keys.is_empty(),
        network_blocklist: rules.network_blocklist,
    });

    // Andon: fraud over 2% of recent payments is RED (the breaker and error-rate rules are the
    // runtime's defaults).
    let fraud_metrics = metrics.clone();
    runtime.add_figures(move |f| {
        f.insert("fraud_rate".into(), fraud_metrics.fraud_rate());
        f.insert(
            "payments_p99_ms".into(),
            fraud_metrics.window().stats().p99_ms,
        );
    });
    runtime.add_andon_rule(AndonRule::new(
        "fraud_rate_high",
        "fraud_rate",
        0.02,
        Level::Red,
        "share of recent payments blocked for fraud",
    ));
    runtime.add_andon_rule(AndonRule::new(
        "payment_latency_high",
        "payments_p99_ms",
        5000.0,
        Level::Yellow,
        "p99 payment processing time (ms)",
    ));

    // Shed load instead of queueing without bound: past the limit, answer 503 at once.
    let max_in_flight = cfg.setting_or("PAYMENT_MAX_CONCURRENCY", 1024usize)?;
    let shed = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorType::ApiError,
                "overloaded",
                "Too many payments in flight; retry shortly.",
            )
            .with_retry_after(Duration::from_secs(1))
            .into_response()
        }))
        .load_shed()
        .concurrency_limit(max_in_flight);

    let router = Router::new()
        .route(
            "/payment",
            post(api::create_payment)
                .layer(shed)
                .layer(axum::middleware::from_fn_with_state(
                    rate_limit,
                    ratelimit::enforce,
                )),
        )
        .route("/payment/{transaction_id}", get(api::get_payment))
        .route("/payment/{transaction_id}/capture", post(routes::capture))
        .route("/payment/{transaction_id}/void", post(routes::void))
        .route("/payment/{transaction_id}/refunds", post(routes::refund))
        .route("/payment/{transaction_id}/approve", post(routes::approve))
        .route("/payment/{transaction_id}/reject", post(routes::reject))
        .route("/payments", get(routes::list_payments))
        .route("/reviews", get(routes::list_reviews))
        .route("/events", get(routes::list_events))
        .route(
            "/webhook_endpoints",
            post(routes::create_endpoint).get(routes::list_endpoints),
        )
        .route(
            "/webhook_endpoints/{endpoint_id}",
            get(routes::get_endpoint).delete(routes::delete_endpoint),
        )
        .route(
            "/webhook_endpoints/{endpoint_id}/enable",
            post(routes::enable_endpoint),
        )
        .route(
            "/webhook_endpoints/{endpoint_id}/deliveries",
            get(routes::list_deliveries),
        )
        .route(
            "/admin/blocklist",
            post(api::add_blocklist).get(api::list_blocklist),
        )
        .route(
            "/admin/blocklist/{customer_id}",
            delete(api::remove_blocklist),
        )
        .with_state(app);
    let mut doc = PaymentApi::openapi();
    docs::complete(&mut doc);
    Ok((router, doc))
}
