//! The routes every TAI service serves (docs/API.md, "Both services").

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use super::Common;
use super::page::ANDON_PAGE;
use crate::andon::AndonReport;
use crate::jidoka::BreakerSnapshot;
use crate::kaizen::WindowStats;
use crate::kanban::QueueDepth;

/// Liveness: 200 while the process serves.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is alive", example = json!({"status":"ok"}))))]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: 200 when every configured backend answers, 503 naming those that do not.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, description = "Every backend answers"),
              (status = 503, description = "A backend does not answer; the body names it")))]
pub(crate) async fn ready(State(common): State<Arc<Common>>) -> Response {
    let mut checks = BTreeMap::new();
    let mut failing = Vec::new();
    for check in &common.readiness {
        match (check.probe)().await {
            Ok(()) => {
                checks.insert(check.name.clone(), "ok".to_owned());
            }
            Err(e) => {
                checks.insert(check.name.clone(), e.to_string());
                failing.push(check.name.clone());
            }
        }
    }
    if failing.is_empty() {
        (
            StatusCode::OK,
            Json(json!({"status": "ready", "checks": checks})),
        )
            .into_response()
    } else {
        let body = json!({
            "status": "not_ready",
            "checks": checks,
            "error": {"type": "api_error", "code": "backend_unavailable",
                      "message": format!("not ready: {} does not answer", failing.join(", "))}
        });
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        r
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics(State(common): State<Arc<Common>>) -> Response {
    // refresh gauges that are computed, not pushed
    common.evaluate_andon();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        common.kaizen.encode(),
    )
        .into_response()
}

#[derive(Serialize)]
struct QueueView {
    name: String,
    backend: &'static str,
    depth: QueueDepth,
}

#[derive(Serialize)]
struct StatusView {
    service: String,
    version: &'static str,
    profile: &'static str,
    started_at: chrono::DateTime<chrono::Utc>,
    uptime_secs: f64,
    backends: BTreeMap<String, String>,
    kaizen: WindowStats,
    figures: crate::andon::Figures,
    andon: AndonSummary,
    breakers: Vec<BreakerSnapshot>,
    queues: Vec<QueueView>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    leases: BTreeMap<String, crate::lease::LeaseStatus>,
    #[serde(flatten)]
    sections: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize)]
struct AndonSummary {
    level: crate::andon::Level,
    reasons: Vec<String>,
}

/// Service, version, profile, uptime, backends, Kaizen summary, Andon level, breakers, queues,
/// leases.
#[utoipa::path(get, path = "/status", tag = "operations",
    responses((status = 200, description = "The service's state at a glance")))]
pub(crate) async fn status(State(common): State<Arc<Common>>) -> Json<serde_json::Value> {
    let figures = common.figures();
    let report = common.andon.evaluate(&figures);
    let view = StatusView {
        service: common.service.clone(),
        version: common.version,
        profile: common.profile.as_str(),
        started_at: common.started_wall,
        uptime_secs: common.started.elapsed().as_secs_f64(),
        backends: common.backends.clone(),
        kaizen: common.kaizen.http_window().stats(),
        figures,
        andon: AndonSummary {
            level: report.level,
            reasons: report.reasons.into_iter().map(|r| r.message).collect(),
        },
        breakers: common.breakers.iter().map(|b| b.snapshot()).collect(),
        queues: common
            .queues
            .iter()
            .map(|q| QueueView {
                name: q.name().to_owned(),
                backend: q.backend(),
                depth: q.depth(),
            })
            .collect(),
        leases: common
            .leases
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    s.read().unwrap_or_else(|p| p.into_inner()).clone(),
                )
            })
            .collect(),
        sections: common
            .status_sections
            .iter()
            .map(|(name, source)| (name.clone(), source()))
            .collect(),
    };
    Json(serde_json::to_value(view).unwrap_or_default())
}

/// The Andon level with its reasons, since when, and recent history.
#[utoipa::path(get, path = "/andon", tag = "operations",
    responses((status = 200, description = "GREEN, YELLOW or RED with reasons",
        example = json!({"level":"GREEN","reasons":[],"since":"2026-01-25T10:30:00Z","history":[]}))))]
pub(crate) async fn andon(State(common): State<Arc<Common>>) -> Json<AndonReport> {
    Json(common.evaluate_andon())
}

/// The HTML Andon board.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The Andon board for people", content_type = "text/html")))]
pub(crate) async fn index() -> Html<&'static str> {
    Html(ANDON_PAGE)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 description of the service")))]
pub(crate) async fn openapi(State(common): State<Arc<Common>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        common.openapi_json.clone(),
    )
        .into_response()
}

/// The common routes' OpenAPI paths.
#[derive(utoipa::OpenApi)]
#[openapi(paths(health, ready, metrics, status, andon, index, openapi))]
pub(crate) struct CommonApi;
