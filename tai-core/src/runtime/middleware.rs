//! The middleware every route runs through: timeouts, JSON errors, RED metrics, API-key auth.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Common;
use super::error::{ApiError, ErrorType};

/// Times the request out, rewrites any non-JSON error into a Stripe-shaped one, and records
/// the RED metrics under the matched route (never the raw path, which would let clients create
/// unbounded label values).
pub(crate) async fn observe(
    State(common): State<Arc<Common>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = match tokio::time::timeout(common.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable(
            "request_timeout",
            format!(
                "The request did not finish within {} ms.",
                common.request_timeout.as_millis()
            ),
            None,
        )
        .into_response(),
    };
    let response = jsonify_errors(response);
    common.kaizen.record_http(
        &route,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// Replaces the body of an error response that is not JSON (axum's own 404, 405, 413 and
/// extractor rejections, tower's) with the Stripe-shaped error for its status.
fn jsonify_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut fresh = ApiError::for_status(status).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}

/// Requires `Authorization: Bearer <key>` on mutating methods when keys are configured.
/// Every configured key is compared in constant time; the key itself is never logged.
pub(crate) async fn authenticate(
    State(common): State<Arc<Common>>,
    mut req: Request,
    next: Next,
) -> Response {
    if common.api_keys.is_empty() || super::auth::is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    if let Some(key) = presented.and_then(|p| super::auth::find(&common.api_keys, p)) {
        if !key.scope.allows(req.method()) {
            tracing::warn!(method = %req.method(), "refused a read-only API key's change");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorType::AuthenticationError,
                "insufficient_scope",
                "This API key may only read (GET, HEAD).",
            )
            .into_response();
        }
        let principal = super::auth::Principal {
            merchant: key.merchant.clone(),
            scope: key.scope,
        };
        req.extensions_mut().insert(principal);
        return next.run(req).await;
    }
    let (code, message) = if presented.is_none() {
        (
            "missing_api_key",
            "This route needs an API key: send Authorization: Bearer <key>.",
        )
    } else {
        ("invalid_api_key", "The API key is not valid.")
    };
    tracing::warn!(code, "refused a request without a valid API key");
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorType::AuthenticationError,
        code,
        message,
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The fallback for unknown routes: a JSON 404.
pub(crate) async fn not_found() -> Response {
    ApiError::for_status(StatusCode::NOT_FOUND).into_response()
}

/// A handler that panicked: a JSON 500 instead of a dropped connection, and the panic logged.
pub(crate) fn panic_response(payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = crate::supervisor::panic_message(payload);
    tracing::error!(panic = %message, "a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorType::ApiError,
        "internal_error",
        "The server failed while handling this request; its outcome is unknown. Look it up, or retry with the same Idempotency-Key.",
    )
    .into_response()
}
