//! The HTTP routes: `POST /deploy`, `GET /deploy/{id}`, the operator routes, `GET /deployments`
//! and `GET /fleet`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tai_core::runtime::{ApiError, ApiJson, ErrorType};

use crate::analysis::Target;
use crate::rollout::Op;
use crate::rollout::{Deployment, OpError, Status};
use crate::signal::{self, DeployRequest};
use crate::{App, Fleet};

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

const IDEMPOTENCY_PREFIX: &str = "dep:idem:";
const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a claim lasts before the deployment is stored: a request cut off in between (a
/// timeout, a crash) leaves the key free again after it.
const CLAIM_TTL: Duration = Duration::from_secs(60);

/// What an idempotency key is bound to: the request's body and the deployment it created.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyClaim {
    body: String,
    deployment_id: String,
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k.to_owned()))
        }
        _ => Err(ApiError::invalid(
            "idempotency_key_invalid",
            "Idempotency-Key",
            "Idempotency-Key is 1 to 255 visible ASCII characters.",
        )),
    }
}

/// The answer for a deployment as it stands: 422 with the reasons when rejected, else `status`.
fn answer(d: &Deployment, status: StatusCode) -> Response {
    if d.status == Status::Rejected {
        let codes: Vec<&str> = d
            .reasons
            .iter()
            .filter_map(|r| r["code"].as_str())
            .collect();
        let mut body = doc(d);
        body["error"] = json!({"type": "invalid_request_error", "code": codes.first().copied().unwrap_or("rejected"), "message": format!("Rejected by the safety checks: {}.", codes.join(", "))});
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
    }
    with_location(status, d)
}

/// Binds `key` to this request, or answers for the deployment an earlier request with the same
/// key and body created (`Err(response)`); another body under the key is a 422.
async fn claim_key(
    app: &App,
    key: &str,
    body: &str,
    id: &str,
) -> Result<Result<(), Response>, ApiError> {
    let store_key = format!("{IDEMPOTENCY_PREFIX}{key}");
    let claim = serde_json::to_vec(&KeyClaim {
        body: body.to_owned(),
        deployment_id: id.to_owned(),
    })
    .map_err(unavailable)?;
    if app
        .store
        .put_if_absent(&store_key, claim, Some(CLAIM_TTL))
        .await
        .map_err(unavailable)?
    {
        return Ok(Ok(()));
    }
    let earlier = app
        .store
        .get(&store_key)
        .await
        .map_err(unavailable)?
        .and_then(|b| serde_json::from_slice::<KeyClaim>(&b).ok())
        .ok_or_else(|| unavailable("the idempotency key changed hands; retry"))?;
    if earlier.body != body {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::InvalidRequestError,
            "idempotency_key_reused",
            "This Idempotency-Key was used with another request body.",
        )
        .with_param("Idempotency-Key"));
    }
    // the same request again: answer with its deployment once the first request stored it
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(d) = app.handle.get(&earlier.deployment_id) {
            return Ok(Err(answer(&d, StatusCode::OK)));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::conflict(
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still being processed; retry.",
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Start a deployment.
#[utoipa::path(post, path = "/deploy", tag = "deployments",
    request_body(content = inline(crate::signal::DeployRequestDoc), description = "What to deploy, where and how"),
    params(("wait" = Option<bool>, Query, description = "answer when the deployment ends"),
        ("Idempotency-Key" = Option<String>, Header, description = "the same key and body give the same deployment; another body is a 422")),
    responses(
        (status = 202, description = "Accepted: PENDING or IN_PROGRESS, with Location"),
        (status = 200, description = "dry_run plan, the ended deployment with ?wait=true, or a replay of an Idempotency-Key"),
        (status = 400, description = "Malformed request, naming the parameter"),
        (status = 409, description = "A request with the same Idempotency-Key is in flight"),
        (status = 422, description = "REJECTED by the safety checks, with every reason; a query Prometheus refuses; a reused Idempotency-Key"),
    ))]
pub(crate) async fn create(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let mut req = signal::parse(&body, &app.defaults)?;
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
    if let (Some(prom), Some(_)) = (&app.prometheus, &req.analysis.queries) {
        for region in &req.regions {
            let target = Target {
                service: req.service.clone(),
                version: req.version.clone(),
                region: region.clone(),
                queries: req.analysis.queries.clone(),
                window: Duration::from_secs_f64(req.analysis.interval_secs.max(0.1)),
            };
            if let Err((param, why)) = prom.validate(&target).await {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorType::InvalidRequestError,
                    "query_invalid",
                    why,
                )
                .with_param(&param));
            }
        }
    }
    req.deployment_id = new_id();
    let key = if req.dry_run {
        None
    } else {
        idempotency_key(&headers)?
    };
    if let Some(k) = &key
        && let Err(replay) = claim_key(&app, k, &body.to_string(), &req.deployment_id).await?
    {
        return Ok(replay);
    }
    let outcome = match app.safety.run(&req).await {
        Ok(o) => o,
        Err(e) => {
            // nothing was stored: free the key so a retry can go through
            if let Some(k) = &key {
                let _ = app.store.delete(&format!("{IDEMPOTENCY_PREFIX}{k}")).await;
            }
            return Err(unavailable(format!("{e}")));
        }
    };
    let d = outcome.output;
    if let Some(k) = &key {
        // stored: the key now holds for a day
        let claim = serde_json::to_vec(&KeyClaim {
            body: body.to_string(),
            deployment_id: d.deployment_id.clone(),
        })
        .unwrap_or_default();
        if let Err(e) = app
            .store
            .put(
                &format!("{IDEMPOTENCY_PREFIX}{k}"),
                claim,
                Some(IDEMPOTENCY_TTL),
            )
            .await
        {
            tracing::warn!(error = %e, "idempotency key kept for its claim time only");
        }
    }
    if d.status == Status::Rejected {
        return Ok(answer(&d, StatusCode::UNPROCESSABLE_ENTITY));
    }
    if req.dry_run {
        return Ok((StatusCode::OK, Json(json!({"dry_run": true, "valid": true, "checks": ["image_exists", "regions_known", "capacity", "rollback_target", "queries"], "plan": plan(&req)}))).into_response());
    }
    let wait = q.get("wait").is_some_and(|v| v == "true" || v == "1");
    if wait {
        // answer when it ends, or just before the request would time out
        let now = app
            .handle
            .wait_end(&d.deployment_id, app.wait_limit)
            .await
            .unwrap_or(d);
        let status = if now.status.is_terminal() {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        return Ok(with_location(status, &now));
    }
    Ok(with_location(StatusCode::ACCEPTED, &d))
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
        // an abort ends once the platform serves stable; answer with that if it comes quickly
        Ok(d) if op == Op::Abort && !d.status.is_terminal() => Ok(Json(doc(&app
            .handle
            .wait_end(id, Duration::from_millis(600))
            .await
            .unwrap_or(d)))),
        Ok(d) => Ok(Json(doc(&d))),
        Err(OpError::NotFound) => Err(lookup(app, id)
            .err()
            .unwrap_or_else(|| ApiError::not_found("No such deployment"))),
        Err(OpError::Conflict(message)) => {
            Err(ApiError::conflict("deployment_state_conflict", message))
        }
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

/// Per region and service: the traffic the controller asks for, and what the platform reports.
#[utoipa::path(get, path = "/fleet", tag = "deployments", responses((status = 200, description = "Per region and service: stable, canary and canary_weight asked for, and `observed`")))]
pub(crate) async fn fleet(State(app): State<Arc<App>>) -> Result<Json<Value>, ApiError> {
    // what is asked is the leader's to say: a standby's copy of the records may lag
    let leading = app
        .lease
        .read()
        .map(|l| l.role == tai_core::lease::Role::Leader)
        .unwrap_or(false);
    let desired = if leading {
        app.handle.desired()
    } else {
        Default::default()
    };
    let sim = match &app.fleet {
        Fleet::Sim(sim) => sim,
        Fleet::Proc(p) => {
            // the platform's own view (processes, HAProxy's weights), with what the controller asks
            let mut view = p.view();
            if let Some(regions) = view.get_mut("regions").and_then(Value::as_object_mut) {
                for (region, r) in regions.iter_mut() {
                    let Some(services) = r.get_mut("services").and_then(Value::as_object_mut)
                    else {
                        continue;
                    };
                    for (service, s) in services.iter_mut() {
                        let Some(obj) = s.as_object_mut() else {
                            continue;
                        };
                        let asked = desired
                            .get(&(region.clone(), service.clone()))
                            .map(|t| json!(t))
                            .or_else(|| obj.get("asked").cloned())
                            .unwrap_or(Value::Null);
                        for k in ["stable", "canary", "canary_weight"] {
                            obj.insert(k.into(), asked.get(k).cloned().unwrap_or(Value::Null));
                        }
                    }
                }
            }
            return Ok(Json(view));
        }
    };
    let observed = sim.snapshot().await.map_err(unavailable)?;
    let mut regions = serde_json::Map::new();
    for (region, services) in observed {
        let mut out = serde_json::Map::new();
        for (service, seen) in services {
            let asked = desired
                .get(&(region.clone(), service.clone()))
                .cloned()
                .unwrap_or_else(|| seen.clone());
            out.insert(
                service,
                json!({"stable": asked.stable, "canary": asked.canary, "canary_weight": asked.canary_weight, "observed": seen}),
            );
        }
        regions.insert(region, Value::Object(out));
    }
    let faults = sim.faults_until().await.map_err(unavailable)?;
    Ok(Json(
        json!({"platform": "sim", "fail_set_traffic_until": faults, "regions": regions}),
    ))
}

/// A drill: the simulated fleet's traffic changes fail for `fail_set_traffic_secs` seconds.
#[utoipa::path(post, path = "/fleet/faults", tag = "deployments",
    request_body(content = inline(crate::signal::FaultsDoc), description = "How long traffic changes fail"),
    responses((status = 200, description = "Until when traffic changes fail"), (status = 400, description = "Malformed"), (status = 409, description = "Not the simulated fleet (not_supported)")))]
pub(crate) async fn faults(
    State(app): State<Arc<App>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, ApiError> {
    let obj = body.as_object().ok_or_else(|| {
        ApiError::invalid("invalid_body", "body", "The body must be a JSON object.")
    })?;
    tai_core::runtime::error::refuse_unknown(obj, &["fail_set_traffic_secs"])?;
    let secs = obj
        .get("fail_set_traffic_secs")
        .and_then(Value::as_f64)
        .filter(|s| (0.0..=3600.0).contains(s))
        .ok_or_else(|| {
            ApiError::invalid(
                "parameter_invalid",
                "fail_set_traffic_secs",
                "fail_set_traffic_secs is a number of seconds from 0 to 3600.",
            )
        })?;
    let Fleet::Sim(sim) = &app.fleet else {
        return Err(ApiError::conflict(
            "not_supported",
            "The fault drill is the simulated fleet's; on proc, stop HAProxy or an instance instead.",
        ));
    };
    let until = sim.set_faults(secs).await.map_err(unavailable)?;
    tracing::warn!(
        secs,
        "fault drill: the simulated fleet's traffic changes fail until it lapses"
    );
    Ok(Json(json!({"fail_set_traffic_until": until})))
}
