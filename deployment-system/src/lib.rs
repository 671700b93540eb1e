//! # deployment-system
//!
//! The deployment service on tai-core: `POST /deploy` turns a deployment request (the Signal)
//! into safety checks (the Policy) and a progressive rollout (the Action). This crate is the
//! library; `main.rs` only reads the configuration and serves.

#![warn(missing_docs)]

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tai_core::runtime::{ApiError, ApiJson, ErrorType, Runtime};

/// Builds the service's routes and OpenAPI document on `runtime`.
pub fn build(runtime: &mut Runtime) -> (Router, utoipa::openapi::OpenApi) {
    runtime.set_backend("state", "memory");
    runtime.set_backend("platform", "sim");
    let router = Router::new().route("/deploy", post(create_deployment));
    (router, utoipa::openapi::OpenApiBuilder::new().build())
}

async fn create_deployment(
    ApiJson(body): ApiJson<serde_json::Map<String, serde_json::Value>>,
) -> Response {
    let _ = body;
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        ErrorType::ApiError,
        "not_implemented",
        "deployments are not carried out yet",
    )
    .into_response()
}
