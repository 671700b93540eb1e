//! # payment-system
//!
//! The payment service on tai-core: `POST /payment` turns a payment request (the Signal) into a
//! fraud verdict (the Policy) and a gateway charge (the Action). This crate is the library;
//! `main.rs` only reads the configuration and serves.

#![warn(missing_docs)]

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tai_core::runtime::{ApiError, ApiJson, ErrorType, Runtime};

/// Builds the service's routes and OpenAPI document on `runtime`.
pub fn build(runtime: &mut Runtime) -> (Router, utoipa::openapi::OpenApi) {
    runtime.set_backend("state", "memory");
    let router = Router::new().route("/payment", post(create_payment));
    (router, utoipa::openapi::OpenApiBuilder::new().build())
}

async fn create_payment(
    ApiJson(body): ApiJson<serde_json::Map<String, serde_json::Value>>,
) -> Response {
    let _ = body;
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        ErrorType::ApiError,
        "not_implemented",
        "payments are not processed yet",
    )
    .into_response()
}
