//! The signal service: TAI's reference system on tai-core, as a team would write its own.
//!
//! `POST /signal` is a **Signal**; a **Policy** decides over it and the queue's state (a denied
//! kind is rejected; when the queue is over 80% full, priority-0 signals are shed); the
//! **Action** stores the record and puts its id on a Kanban queue, from which a pool of workers
//! pulls as each frees up (Heijunka: the load levels itself across workers, shown per worker on
//! `/status`). Each worker calls the downstream through a circuit breaker. Everything else
//! (configuration, backends, metrics, Andon, auth, shutdown) is the runtime's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tai_core::andon::{AndonRule, Level};
use tai_core::backend::BackendError;
use tai_core::jidoka::{BreakerConfig, CircuitBreaker, Outcome as Call};
use tai_core::kanban::{QueueConfig, SharedQueue, Worked};
use tai_core::pipeline::{Action, Decided, FactSource, Pipeline};
use tai_core::policy::{Decision, Policy, Reason, Verdict};
use tai_core::runtime::cli::Setting;
use tai_core::runtime::{ApiError, ApiJson, ConfigError, Runtime};
use tai_core::store::{StateStore, get_json, put_json};

/// The service's own settings (beside tai-core's).
pub const SETTINGS: &[Setting] = &[
    Setting::new("WORKERS", "4", "Workers pulling signals from the queue"),
    Setting::new("WORK_MS", "20", "How long the downstream takes per signal"),
    Setting::new(
        "QUEUE_CAPACITY",
        "1000",
        "Signals waiting at most (more: 429)",
    ),
    Setting::new(
        "DENY_KINDS",
        "spam",
        "Signal kinds the policy rejects, comma-separated",
    ),
];

/// What a caller sends. Unknown fields are the payload's (kept as sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// What happened: 1 to 64 of `a-z 0-9 _ . -`.
    pub kind: String,
    /// 0 (lowest) to 9.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Everything else sent. `fail_times: N` makes the downstream fail the first N attempts.
    #[serde(flatten)]
    pub payload: BTreeMap<String, Value>,
}

fn default_priority() -> u8 {
    5
}

/// Where a signal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// Refused by the policy.
    Rejected,
    /// In a worker's hands.
    Processing,
    /// Carried out.
    Done,
    /// The downstream failed; `POST /signal/{id}/retry` queues it again.
    Failed,
}

/// How the last attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The downstream took it.
    Done {
        /// How long it took.
        took_ms: u64,
    },
    /// It did not.
    Failed {
        /// Why.
        error: String,
    },
}

/// A signal as stored and shown: the request's fields inline beside the service's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalRecord {
    /// `sig_…`.
    pub id: String,
    /// Where it is.
    pub status: Status,
    /// Attempts so far.
    pub attempts: u32,
    /// The worker of the last attempt.
    pub worker: Option<usize>,
    /// What was sent.
    #[serde(flatten)]
    pub request: SignalRequest,
    /// The policy's verdict.
    pub verdict: Verdict,
    /// The last attempt's outcome.
    pub outcome: Option<Outcome>,
}

struct App {
    store: Arc<dyn StateStore>,
    queue: SharedQueue<String>,
    breaker: CircuitBreaker,
    work: Duration,
    workers: usize,
    deny: Vec<String>,
    capacity: usize,
    outcomes: prometheus::IntCounterVec,
    pipeline: Pipeline<Facts, Rules, Accept>,
}

type Shared = Arc<App>;

/// Builds the service on `runtime`: its routes and their OpenAPI document.
pub async fn build(
    runtime: &mut Runtime,
) -> Result<(Router, utoipa::openapi::OpenApi), ConfigError> {
    let cfg = runtime.config().clone();
    let capacity = cfg.setting_or("QUEUE_CAPACITY", 1000usize)?;
    let store = runtime.state_store().await?;
    let queue = runtime
        .work_queue(
            "queue",
            QueueConfig::new("signals", capacity),
            "SIGNALS",
            "signals.work",
            String::clone,
        )
        .await?;
    let breaker = CircuitBreaker::new("downstream", BreakerConfig::default(), runtime.clock());
    runtime.add_breaker(breaker.clone());
    let outcomes = runtime.kaizen().counter_vec(
        "signals_total",
        "Signals by outcome",
        "outcome",
        &["queued", "rejected", "done", "failed"],
    );
    let deny = cfg
        .list("DENY_KINDS")
        .unwrap_or_else(|| vec!["spam".into()]);
    let app: Shared = Arc::new(App {
        store: store.clone(),
        queue: queue.clone(),
        breaker,
        work: Duration::from_millis(cfg.setting_or("WORK_MS", 20u64)?),
        workers: cfg.setting_or("WORKERS", 4usize)?.max(1),
        deny: deny.clone(),
        capacity,
        outcomes: outcomes.clone(),
        pipeline: Pipeline::new(
            "signal",
            Facts {
                queue: queue.clone(),
            },
            Rules { deny, capacity },
            Accept {
                store,
                queue,
                outcomes,
            },
            runtime.kaizen().clone(),
        ),
    });
    // each worker pulls its next signal once it is free: the load levels itself
    let working = app.clone();
    runtime.worker_pool("worker_pool", app.queue.clone(), app.workers, move |job| {
        let app = working.clone();
        async move { work(&app, job.worker, &job.item).await }
    });
    let counted = app.clone();
    runtime.add_figures(move |f| {
        let (done, failed) = (
            counted.outcomes.with_label_values(&["done"]).get(),
            counted.outcomes.with_label_values(&["failed"]).get(),
        );
        f.insert(
            "signal_failure_share".into(),
            failed as f64 / (done + failed).max(1) as f64,
        );
    });
    runtime.add_andon_rule(AndonRule::new(
        "signals_failing",
        "signal_failure_share",
        0.1,
        Level::Yellow,
        "share of signals the downstream failed",
    ));
    let router = Router::new()
        .route("/signal", post(create))
        .route("/signal/{id}/status", get(status))
        .route("/signal/{id}/retry", post(retry))
        .route("/info", get(info))
        .with_state(app);
    Ok((router, <Doc as utoipa::OpenApi>::openapi()))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(create, status, retry, info))]
struct Doc;

struct Facts {
    queue: SharedQueue<String>,
}

impl FactSource<SignalRequest> for Facts {
    type Facts = usize;
    type Error = BackendError;
    async fn gather(&self, _: &SignalRequest) -> Result<usize, BackendError> {
        Ok(self.queue.depth().ready)
    }
}

struct Rules {
    deny: Vec<String>,
    capacity: usize,
}

impl Policy<SignalRequest, usize> for Rules {
    fn evaluate(&self, s: &SignalRequest, waiting: &usize) -> Verdict {
        let mut reasons = Vec::new();
        if self.deny.contains(&s.kind) {
            reasons.push(Reason::new(
                "kind_denied",
                s.kind.clone(),
                "DENY_KINDS",
                Decimal::ONE,
            ));
        }
        if s.priority == 0 && *waiting * 5 > self.capacity * 4 {
            reasons.push(Reason::new(
                "shed_low_priority",
                format!("{waiting} waiting"),
                "> 80% of QUEUE_CAPACITY",
                Decimal::ONE,
            ));
        }
        Verdict::scored(reasons, Decimal::ONE, Decimal::ONE, Decimal::ONE)
    }
}

struct Accept {
    store: Arc<dyn StateStore>,
    queue: SharedQueue<String>,
    outcomes: prometheus::IntCounterVec,
}

impl Action<SignalRequest, usize> for Accept {
    type Output = SignalRecord;
    type Error = ApiError;
    async fn act(&self, d: Decided<'_, SignalRequest, usize>) -> Result<SignalRecord, ApiError> {
        let (s, verdict) = (d.signal, d.verdict);
        let allowed = verdict.decision != Decision::Deny;
        let record = SignalRecord {
            id: format!("sig_{}", uuid::Uuid::new_v4().simple()),
            status: if allowed {
                Status::Queued
            } else {
                Status::Rejected
            },
            attempts: 0,
            worker: None,
            request: s.clone(),
            verdict: verdict.clone(),
            outcome: None,
        };
        save(self.store.as_ref(), &record).await?;
        if allowed {
            enqueue(self.store.as_ref(), &self.queue, &record.id).await?;
        }
        self.outcomes
            .with_label_values(&[if allowed { "queued" } else { "rejected" }])
            .inc();
        Ok(record)
    }
}

fn key(id: &str) -> String {
    format!("signal:{id}")
}

async fn save(store: &dyn StateStore, r: &SignalRecord) -> Result<(), ApiError> {
    Ok(put_json(store, &key(&r.id), r, None).await?)
}

async fn load(store: &dyn StateStore, id: &str) -> Result<Option<SignalRecord>, ApiError> {
    Ok(get_json(store, &key(id)).await?)
}

/// Puts `id` on the queue; a full queue is the caller's 429, and the record goes with it.
async fn enqueue(
    store: &dyn StateStore,
    queue: &SharedQueue<String>,
    id: &str,
) -> Result<(), ApiError> {
    let Err(e) = queue.push(id.to_owned()).await else {
        return Ok(());
    };
    let _ = store.delete(&key(id)).await;
    Err(e.into())
}

/// Works one signal for `worker`: an error (the store's) hands it back to the queue.
async fn work(app: &App, worker: usize, id: &str) -> Result<Worked, ApiError> {
    let store = app.store.as_ref();
    // gone, or a copy of one handled already
    let Some(mut r) = load(store, id)
        .await?
        .filter(|r| r.status == Status::Queued)
    else {
        return Ok(Worked::Done);
    };
    r.status = Status::Processing;
    r.attempts += 1;
    r.worker = Some(worker);
    save(store, &r).await?;
    let started = Instant::now();
    let fail_first = r
        .request
        .payload
        .get("fail_times")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let attempt = u64::from(r.attempts);
    let called = app
        .breaker
        .call(
            async {
                tokio::time::sleep(app.work).await;
                if attempt <= fail_first {
                    Err("the downstream refused the signal")
                } else {
                    Ok(())
                }
            },
            Call::of,
        )
        .await;
    let (status, outcome) = match called {
        Ok(Ok(())) => (
            Status::Done,
            Outcome::Done {
                took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
        ),
        Ok(Err(e)) => (Status::Failed, Outcome::Failed { error: e.into() }),
        Err(open) => (
            Status::Failed,
            Outcome::Failed {
                error: open.to_string(),
            },
        ),
    };
    app.outcomes
        .with_label_values(&[if status == Status::Done {
            "done"
        } else {
            "failed"
        }])
        .inc();
    r.status = status;
    r.outcome = Some(outcome);
    save(store, &r).await?;
    Ok(if status == Status::Done {
        Worked::Done
    } else {
        Worked::Failed
    })
}

fn valid(s: &SignalRequest) -> Result<(), ApiError> {
    let kind_ok = (1..=64).contains(&s.kind.len())
        && s.kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !kind_ok {
        return Err(ApiError::invalid(
            "parameter_invalid",
            "kind",
            "kind must be 1 to 64 of a-z 0-9 _ . -",
        ));
    }
    if s.priority > 9 {
        return Err(ApiError::invalid(
            "parameter_invalid",
            "priority",
            "priority must be 0 to 9",
        ));
    }
    Ok(())
}

fn answer(code: StatusCode, r: &SignalRecord) -> Response {
    (code, Json(r)).into_response()
}

/// Decides on a signal and queues it (202), or records its rejection (200).
#[utoipa::path(post, path = "/signal", request_body = Object, responses((status = 202, description = "queued"), (status = 200, description = "rejected by the policy"), (status = 429, description = "the queue is full")))]
async fn create(
    State(app): State<Shared>,
    ApiJson(s): ApiJson<SignalRequest>,
) -> Result<Response, ApiError> {
    valid(&s)?;
    let done = app.pipeline.run(&s).await?;
    let code = if done.output.status == Status::Queued {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(answer(code, &done.output))
}

/// A signal as stored.
#[utoipa::path(get, path = "/signal/{id}/status", params(("id" = String, Path)), responses((status = 200, description = "the signal")))]
async fn status(State(app): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let r = load(app.store.as_ref(), &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No such signal: {id}")))?;
    Ok(answer(StatusCode::OK, &r))
}

/// Queues a failed signal again (202); anything else is 409.
#[utoipa::path(post, path = "/signal/{id}/retry", params(("id" = String, Path)), responses((status = 202, description = "queued again"), (status = 409, description = "not failed")))]
async fn retry(State(app): State<Shared>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let store = app.store.as_ref();
    let mut r = load(store, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("No such signal: {id}")))?;
    if r.status != Status::Failed {
        return Err(ApiError::conflict(
            "signal_not_failed",
            format!(
                "Only a failed signal can be retried; this one is {:?}.",
                r.status
            ),
        ));
    }
    r.status = Status::Queued;
    save(store, &r).await?;
    if let Err(e) = app.queue.push(id.clone()).await {
        r.status = Status::Failed;
        save(store, &r).await?;
        return Err(e.into());
    }
    Ok(answer(StatusCode::ACCEPTED, &r))
}

/// What this service is and how it is set up.
#[utoipa::path(get, path = "/info", responses((status = 200, description = "the service")))]
async fn info(State(app): State<Shared>) -> Json<Value> {
    Json(json!({
        "service": "signal-service",
        "version": env!("CARGO_PKG_VERSION"),
        "workers": app.workers,
        "queue": {"backend": app.queue.backend(), "capacity": app.capacity},
        "policy": {"deny_kinds": app.deny, "shed_priority_0_above": 0.8},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_with_flattened_fields_and_a_tagged_outcome_round_trips() {
        let r = SignalRecord {
            id: "sig_1".into(),
            status: Status::Done,
            attempts: 2,
            worker: Some(3),
            request: SignalRequest {
                kind: "order.created".into(),
                priority: 7,
                payload: BTreeMap::from([
                    ("amount".into(), json!(12.5)),
                    ("items".into(), json!(3)),
                ]),
            },
            verdict: Verdict::scored(
                vec![Reason::new("r", "x", "y", Decimal::new(5, 1))],
                Decimal::ONE,
                Decimal::ONE,
                Decimal::TWO,
            ),
            outcome: Some(Outcome::Done { took_ms: 21 }),
        };
        let text = serde_json::to_string(&r).expect("serialize");
        assert!(
            text.contains(r#""priority":7"#) && text.contains(r#""result":"done""#),
            "{text}"
        );
        let back: SignalRecord =
            serde_json::from_str(&text).expect("a flattened, tagged record reads back");
        assert_eq!(back, r);
    }
}
