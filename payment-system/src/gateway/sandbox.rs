//! The sandbox gateway: in process, and as the standalone `sandbox-gateway` HTTP server.
//!
//! It answers by card number, as a card network's test mode does: no card or `4242424242424242`
//! is approved, `4000000000000002` is declined, `4000000000000119` is a processing error (a
//! gateway failure: HTTP 500). `latency` slows every answer; `failure_rate` turns that share of
//! charges into processing errors. A repeated idempotency key returns the first decision and
//! charges nothing more; after a processing error a retry with the key is decided anew, and a
//! lookup of the key meanwhile answers `failed` (the gateway knows it charged nothing).
//!
//! Decisions are remembered for the last [`REMEMBERED`] keys only: the sandbox lives in process
//! memory under the embedded default, and memory must not grow with every payment ever made.
//! A lookup is asked within seconds of a charge, far inside that horizon.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;
use tai_core::backend::BoxFuture;

use super::{ChargeOutcome, ChargeRequest, Gateway, GatewayError};

/// Test card: approved.
pub const CARD_APPROVED: &str = "4242424242424242";
/// Test card: declined.
pub const CARD_DECLINED: &str = "4000000000000002";
/// Test card: processing error.
pub const CARD_PROCESSING_ERROR: &str = "4000000000000119";

/// What the sandbox decided for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxAnswer {
    /// Charged with this id.
    Approved(String),
    /// Declined.
    Declined,
    /// Processing error.
    Error,
}

/// How many decisions the sandbox remembers (the oldest are forgotten first).
pub const REMEMBERED: usize = 200_000;

/// Decisions by key, and the keys in the order they were decided.
#[derive(Debug, Default)]
struct Answers {
    by_key: HashMap<String, SandboxAnswer>,
    order: VecDeque<String>,
}

/// The sandbox's state; share it through an `Arc`.
#[derive(Debug)]
pub struct Sandbox {
    latency: Duration,
    failure_rate: f64,
    answers: Mutex<Answers>,
    charges: AtomicU64,
    requests: AtomicU64,
}

impl Sandbox {
    /// A sandbox with the given latency and random failure share (0.0..=1.0).
    pub fn new(latency: Duration, failure_rate: f64) -> Self {
        Self {
            latency,
            failure_rate: failure_rate.clamp(0.0, 1.0),
            answers: Mutex::new(Answers::default()),
            charges: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Decides a charge for `key` and `card_number`, once per key.
    pub async fn decide(&self, key: &str, card_number: Option<&str>) -> SandboxAnswer {
        self.requests.fetch_add(1, Ordering::SeqCst);
        // decide under the lock, so concurrent requests with one key charge once
        let answer = {
            let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(first) = answers
                .by_key
                .get(key)
                .filter(|a| **a != SandboxAnswer::Error)
            {
                first.clone()
            } else {
                let random_failure =
                    self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate;
                let answer = match card_number {
                    Some(CARD_PROCESSING_ERROR) => SandboxAnswer::Error,
                    _ if random_failure => SandboxAnswer::Error,
                    Some(CARD_DECLINED) => SandboxAnswer::Declined,
                    _ => {
                        self.charges.fetch_add(1, Ordering::SeqCst);
                        SandboxAnswer::Approved(format!("gw_{}", uuid::Uuid::new_v4().simple()))
                    }
                };
                if answers
                    .by_key
                    .insert(key.to_owned(), answer.clone())
                    .is_none()
                {
                    answers.order.push_back(key.to_owned());
                    if answers.order.len() > REMEMBERED
                        && let Some(oldest) = answers.order.pop_front()
                    {
                        answers.by_key.remove(&oldest);
                    }
                }
                answer
            }
        };
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        answer
    }

    /// The decision made for `key`, if any.
    pub fn decision(&self, key: &str) -> Option<SandboxAnswer> {
        self.answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .get(key)
            .cloned()
    }

    /// Distinct approved charges.
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }

    /// Charge requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Gateway for Sandbox {
    fn kind(&self) -> &'static str {
        "sandbox"
    }
    fn lookup<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, GatewayError>> {
        let found = match self.decision(idempotency_key) {
            Some(SandboxAnswer::Approved(id)) => Some(ChargeOutcome::Approved { gateway_id: id }),
            Some(SandboxAnswer::Declined) => Some(ChargeOutcome::Declined),
            Some(SandboxAnswer::Error) => Some(ChargeOutcome::NotCharged),
            None => None,
        };
        Box::pin(std::future::ready(Ok(found)))
    }
    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, GatewayError>> {
        Box::pin(async move {
            let card = request.card.as_ref().map(|c| c.number.expose());
            match self.decide(&request.idempotency_key, card).await {
                SandboxAnswer::Approved(id) => Ok(ChargeOutcome::Approved { gateway_id: id }),
                SandboxAnswer::Declined => Ok(ChargeOutcome::Declined),
                SandboxAnswer::Error => Err(GatewayError::Server {
                    status: 500,
                    message: "processing error".into(),
                }),
            }
        })
    }
}

/// The sandbox's HTTP form: `POST /v1/charges`, `GET /v1/charges/{idempotency_key}`,
/// `GET /v1/stats`, `GET /health`.
pub fn router(sandbox: Arc<Sandbox>) -> Router {
    Router::new()
        .route("/v1/charges", post(charge))
        .route("/v1/charges/{key}", get(lookup))
        .route("/v1/stats", get(stats))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(sandbox)
}

async fn charge(
    State(sandbox): State<Arc<Sandbox>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body must be JSON"})),
        )
            .into_response();
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| body["reference"].as_str().map(str::to_owned));
    let Some(key) = key else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Idempotency-Key header or reference required"})),
        )
            .into_response();
    };
    if body["amount"].is_null() || body["currency"].as_str().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "amount and currency are required"})),
        )
            .into_response();
    }
    let card = body["card"]["number"].as_str();
    match sandbox.decide(&key, card).await {
        SandboxAnswer::Approved(id) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "approved"})),
        )
            .into_response(),
        SandboxAnswer::Declined => (
            StatusCode::PAYMENT_REQUIRED,
            Json(json!({"status": "declined"})),
        )
            .into_response(),
        SandboxAnswer::Error => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "error", "error": "processing error"})),
        )
            .into_response(),
    }
}

async fn lookup(
    State(sandbox): State<Arc<Sandbox>>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    match sandbox.decision(&key) {
        Some(SandboxAnswer::Approved(id)) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "approved"})),
        )
            .into_response(),
        Some(SandboxAnswer::Declined) => {
            (StatusCode::OK, Json(json!({"status": "declined"}))).into_response()
        }
        Some(SandboxAnswer::Error) => {
            (StatusCode::OK, Json(json!({"status": "failed"}))).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no charge with this idempotency key"})),
        )
            .into_response(),
    }
}

async fn stats(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    Json(json!({"charges": sandbox.charges(), "requests": sandbox.requests()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_by_card_and_once_per_key() {
        let s = Sandbox::new(Duration::ZERO, 0.0);
        assert!(matches!(
            s.decide("k1", None).await,
            SandboxAnswer::Approved(_)
        ));
        let first = s.decide("k2", Some(CARD_APPROVED)).await;
        assert_eq!(s.decide("k2", Some(CARD_APPROVED)).await, first, "replayed");
        assert_eq!(
            s.decide("k3", Some(CARD_DECLINED)).await,
            SandboxAnswer::Declined
        );
        assert_eq!(
            s.decide("k4", Some(CARD_PROCESSING_ERROR)).await,
            SandboxAnswer::Error
        );
        assert_eq!((s.charges(), s.requests()), (2, 5));
        let always = Sandbox::new(Duration::ZERO, 1.0);
        assert_eq!(always.decide("k", None).await, SandboxAnswer::Error);
    }
}
