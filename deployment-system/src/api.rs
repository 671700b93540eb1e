//! The HTTP routes: `POST /deploy`, `GET /deploy/{id}`, the operator routes, `GET /deployments`
//! and `GET /fleet`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tai_core::policy::Decision;
use tai_core::runtime::{ApiError, ApiJson, ErrorType};

use crate::App;
use crate::rollout::controller::Op;
use crate::rollout::{Deployment, OpError, RegionRollout, RegionStatus, Status};
use crate::signal::{self, DeployRequest};

fn new_id() -> String {
    format!("dpl_{}", uuid::Uuid::new_v4().simple())
}

fn doc(d: &Deployment) -> Value {
    serde_json::to_value(d).unwrap_or(Value::Null)
}

fn with_location(status: StatusCode, d: &Deployment) -> Response {
    let mut r = (status, Json(doc(d))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/deploy/{}", d.deployment_id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(
        "store_unavailable",
        e.to_string(),
        Some(Duration::from_secs(1)),
    )
}

/// The plan a dry run returns: every stage of every region with its expected start and end.
fn plan(req: &DeployRequest) -> Value {
    let mut t = 0.0;
    let mut timeline = Vec::new();
    for region in &req.regions {
        for s in &req.stages {
            timeline.push(json!({"region": region, "stage": s.name, "weight": s.weight, "starts_at_secs": t, "ends_at_secs": t + s.bake_secs}));
            t += s.bake_secs;
        }
    }
    json!({
        "service": req.service, "version": req.version, "image": req.image, "rollout_strategy": "canary",
        "regions": req.regions, "stages": req.stages, "analysis": req.analysis, "on_region_failure": req.on_region_failure,
        "timeline": timeline, "expected_duration_secs": t,
    })
}

/// Start a deployment.
#[utoipa::path(post, path = "/deploy", tag = "deployments",
    request_body(content = Object, description = "service, version, target_region or regions, rollout_strategy, image, stages, analysis, on_region_failure, dry_run"),
    params(("wait" = Option<bool>, Query, description = "answer when the deployment ends")),
    responses(
        (status = 202, description = "Accepted: PENDING or IN_PROGRESS, with Location"),
        (status = 200, description = "dry_run plan, or the ended deployment with ?wait=true"),
        (status = 400, description = "Malformed request, naming the parameter"),
        (status = 422, description = "REJECTED by the safety checks, with every reason"),
    ))]
pub(crate) async fn create(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let req = signal::parse(&body, &app.defaults)?;
    if !app.providers.contains(&req.analysis.provider) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::InvalidRequestError,
            "provider_not_configured",
            format!(
                "analysis provider {:?} is not configured on this service",
                req.analysis.provider
            ),
        )
        .with_param("analysis[provider]"));
    }
    let outcome = app
        .safety
        .run(&req)
        .await
        .map_err(|e| unavailable(format!("{e}")))?;
    let verdict = outcome.verdict;
    let facts = outcome.output;
    let now = app.clock.wall();
    if verdict.decision == Decision::Deny {
        let reasons: Vec<Value> = verdict
            .reasons
            .iter()
            .map(|r| json!({"code": r.rule, "message": r.observed, "expected": r.threshold}))
            .collect();
        let codes: Vec<&str> = verdict.reasons.iter().map(|r| r.rule.as_str()).collect();
        let mut d = base_deployment(&req, new_id(), app.handle.next_seq(), now, &facts);
        d.status = Status::Rejected;
        d.finished_at = Some(now);
        d.reasons = reasons.clone();
        for r in &mut d.regions {
            r.status = RegionStatus::Skipped;
        }
        d.event(now, "rejected", None, None, json!({"reasons": codes}));
        if !req.dry_run {
            d = app.handle.create(d).await.map_err(unavailable)?;
        }
        let mut body = doc(&d);
        body["error"] = json!({"type": "invalid_request_error", "code": codes.first().copied().unwrap_or("rejected"), "message": format!("Rejected by the safety checks: {}.", codes.join(", "))});
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response());
    }
    if req.dry_run {
        return Ok((StatusCode::OK, Json(json!({"dry_run": true, "valid": true, "checks": ["image_exists", "regions_known", "capacity", "rollback_target"], "plan": plan(&req)}))).into_response());
    }
    let mut d = base_deployment(&req, new_id(), app.handle.next_seq(), now, &facts);
    d.event(
        now,
        "validated",
        None,
        None,
        json!({"image": req.image, "checks": "passed"}),
    );
    let d = app.handle.create(d).await.map_err(unavailable)?;
    let wait = q.get("wait").is_some_and(|v| v == "true" || v == "1");
    if wait {
        // answer when it ends, or just before the request would time out
        let deadline = tokio::time::Instant::now() + app.wait_limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(now) = app.handle.get(&d.deployment_id)
                && now.status.is_terminal()
            {
                return Ok(with_location(StatusCode::OK, &now));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let current = app.handle.get(&d.deployment_id).unwrap_or(d);
        return Ok(with_location(StatusCode::ACCEPTED, &current));
    }
    Ok(with_location(StatusCode::ACCEPTED, &d))
}

fn base_deployment(
    req: &DeployRequest,
    id: String,
    seq: u64,
    now: chrono::DateTime<chrono::Utc>,
    facts: &crate::safety::SafetyFacts,
) -> Deployment {
    let regions = req
        .regions
        .iter()
        .map(|region| RegionRollout {
            region: region.clone(),
            status: RegionStatus::Pending,
            stable_version: facts
                .regions
                .iter()
                .find(|f| f.region == *region)
                .and_then(|f| f.stable.clone())
                .unwrap_or_default(),
            stages_completed: Vec::new(),
            stage_index: 0,
            started_at: None,
            finished_at: None,
            stage_started_at: None,
            stage_deadline: None,
            next_analysis_at: None,
            inconclusive_since: None,
            paused_remaining_ms: None,
            queue_position: None,
            analysis: Vec::new(),
        })
        .collect();
    let mut d = Deployment {
        deployment_id: id,
        service: req.service.clone(),
        version: req.version.clone(),
        image: req.image.clone(),
        rollout_strategy: "canary".into(),
        status: Status::Pending,
        seq,
        created_at: now,
        finished_at: None,
        duration_secs: 0.0,
        stages_completed: Vec::new(),
        stages: req.stages.clone(),
        analysis: req.analysis.clone(),
        on_region_failure: req.on_region_failure,
        current_region: 0,
        paused: false,
        regions,
        reasons: Vec::new(),
        events: Vec::new(),
    };
    d.refresh(now);
    d
}

fn lookup(app: &App, id: &str) -> Result<Deployment, ApiError> {
    app.handle.get(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "No such deployment: {}",
            id.chars().take(64).collect::<String>()
        ))
        .with_param("deployment_id")
    })
}

/// Read a deployment.
#[utoipa::path(get, path = "/deploy/{deployment_id}", tag = "deployments",
    params(("deployment_id" = String, Path)),
    responses((status = 200, description = "The deployment with its regions, analysis and events"), (status = 404, description = "Unknown id")))]
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(doc(&lookup(&app, &id)?)))
}

async fn operate(app: &App, id: &str, op: Op) -> Result<Json<Value>, ApiError> {
    lookup(app, id)?;
    match app.handle.operate(id, op).await {
        Ok(d) => Ok(Json(doc(&d))),
        Err(OpError::NotFound) => Err(lookup(app, id)
            .err()
            .unwrap_or_else(|| ApiError::not_found("No such deployment"))),
        Err(OpError::Conflict(message)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequestError,
            "deployment_state_conflict",
            message,
        )),
        Err(OpError::NotLeader) => Err(ApiError::unavailable(
            "controller_unavailable",
            OpError::NotLeader.to_string(),
            Some(Duration::from_secs(1)),
        )),
        Err(OpError::Backend(e)) => Err(unavailable(e)),
    }
}

/// Abort: roll back every region this deployment touched.
#[utoipa::path(post, path = "/deploy/{deployment_id}/abort", tag = "deployments", params(("deployment_id" = String, Path)),
    responses((status = 200, description = "ABORTED"), (status = 404, description = "Unknown id"), (status = 409, description = "Already ended")))]
pub(crate) async fn abort(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operate(&app, &id, Op::Abort).await
}

/// Promote: skip the rest of the current stage's bake.
#[utoipa::path(post, path = "/deploy/{deployment_id}/promote", tag = "deployments", params(("deployment_id" = String, Path)),
    responses((status = 200, description = "Promoted"), (status = 404, description = "Unknown id"), (status = 409, description = "Nothing to promote")))]
pub(crate) async fn promote(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operate(&app, &id, Op::Promote).await
}

/// Pause: freeze the timers.
#[utoipa::path(post, path = "/deploy/{deployment_id}/pause", tag = "deployments", params(("deployment_id" = String, Path)),
    responses((status = 200, description = "Paused"), (status = 404, description = "Unknown id"), (status = 409, description = "Already paused or ended")))]
pub(crate) async fn pause(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operate(&app, &id, Op::Pause).await
}

/// Resume a paused deployment.
#[utoipa::path(post, path = "/deploy/{deployment_id}/resume", tag = "deployments", params(("deployment_id" = String, Path)),
    responses((status = 200, description = "Resumed"), (status = 404, description = "Unknown id"), (status = 409, description = "Not paused or ended")))]
pub(crate) async fn resume(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    operate(&app, &id, Op::Resume).await
}

/// List deployments, newest first.
#[utoipa::path(get, path = "/deployments", tag = "deployments", responses((status = 200, description = "Summaries, newest first")))]
pub(crate) async fn list(State(app): State<Arc<App>>) -> Json<Value> {
    let items: Vec<Value> = app
        .handle
        .list()
        .iter()
        .map(|d| {
            json!({
                "deployment_id": d.deployment_id, "service": d.service, "version": d.version, "status": d.status,
                "created_at": d.created_at, "duration_secs": d.duration_secs, "stages_completed": d.stages_completed,
                "regions": d.regions.iter().map(|r| json!({"region": r.region, "status": r.status, "queue_position": r.queue_position})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({"deployments": items}))
}

/// What the simulated fleet runs, per region and service.
#[utoipa::path(get, path = "/fleet", tag = "deployments", responses((status = 200, description = "Traffic per region and service")))]
pub(crate) async fn fleet(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    let snapshot = app.fleet.snapshot().await.map_err(unavailable)?;
    Ok(Json(json!({"platform": "sim", "regions": snapshot})))
}
