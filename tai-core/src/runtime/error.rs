//! Stripe-shaped JSON errors, and a JSON extractor whose rejections are such errors.
//!
//! Every rejection a client can meet, from a handler, an extractor, the router (404, 405) or a
//! middleware (413, 401, 429, 503), reaches the client as
//! `{"error":{"type":"...","code":"...","message":"...","param":"..."}}` with a fitting status.
//! Bad input is always 4xx: a client must be able to tell its own mistakes from ours.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The `type` of an error, as Stripe names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request was wrong.
    InvalidRequestError,
    /// No or a wrong API key.
    AuthenticationError,
    /// Too many requests.
    RateLimitError,
    /// An idempotency key was misused.
    IdempotencyError,
    /// A card was declined.
    CardError,
    /// Something on our side or a dependency failed.
    ApiError,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Error type.
    pub kind: ErrorType,
    /// Machine-readable code, e.g. `parameter_invalid`.
    pub code: String,
    /// A sentence for the developer reading it.
    pub message: String,
    /// The offending parameter, if one.
    pub param: Option<String>,
    /// Sets `Retry-After` (whole seconds, rounded up).
    pub retry_after: Option<Duration>,
    /// Extra headers (e.g. `RateLimit-*`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    #[serde(rename = "type")]
    kind: ErrorType,
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'a str>,
}

/// A backend that failed is the service's trouble, not the caller's: 503 `store_unavailable`,
/// its message naming the backend, with `Retry-After: 1` when it did not
/// answer (it may well answer in a moment) and none when it answered with something that could
/// not be understood (retrying will not help until someone looks).
impl From<crate::backend::BackendError> for ApiError {
    fn from(e: crate::backend::BackendError) -> Self {
        let retry = matches!(e, crate::backend::BackendError::Unavailable { .. })
            .then_some(Duration::from_secs(1));
        ApiError::unavailable("store_unavailable", e.to_string(), retry)
    }
}

/// A failed pipeline run: its fact source's or its action's error, each as it maps.
impl<G: Into<ApiError>, A: Into<ApiError>> From<crate::pipeline::PipelineError<G, A>> for ApiError {
    fn from(e: crate::pipeline::PipelineError<G, A>) -> Self {
        match e {
            crate::pipeline::PipelineError::Facts(g) => g.into(),
            crate::pipeline::PipelineError::Action(a) => a.into(),
        }
    }
}

/// A refused push: 429 `queue_full` with `Retry-After: 1` (the queue is the service's bound on
/// work in hand), 503 `shutting_down` once the queue is closed, and the backend's error as
/// [`BackendError`](crate::backend::BackendError) maps it.
impl From<crate::kanban::QueueError> for ApiError {
    fn from(e: crate::kanban::QueueError) -> Self {
        match e {
            crate::kanban::QueueError::Full { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorType::RateLimitError,
                "queue_full",
                "The queue is full; try again shortly.",
            )
            .with_retry_after(Duration::from_secs(1)),
            crate::kanban::QueueError::Closed(_) => Self::unavailable(
                "shutting_down",
                "The service is stopping.",
                Some(Duration::from_secs(1)),
            ),
            crate::kanban::QueueError::Backend(b) => b.into(),
        }
    }
}

impl ApiError {
    /// An error with every field given.
    pub fn new(
        status: StatusCode,
        kind: ErrorType,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            param: None,
            retry_after: None,
            headers: Vec::new(),
        }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(
        code: impl Into<String>,
        param: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            code,
            message,
        )
        .with_param(param)
    }

    /// 404 `resource_missing`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequestError,
            "resource_missing",
            message,
        )
    }

    /// 409 `code`: the request does not fit the resource's state now.
    pub fn conflict(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequestError,
            code,
            message,
        )
    }

    /// 503 naming a dependency, with `Retry-After` when known.
    pub fn unavailable(
        code: impl Into<String>,
        message: impl Into<String>,
        retry_after: Option<Duration>,
    ) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::ApiError,
            code,
            message,
        );
        e.retry_after = retry_after;
        e
    }

    /// Sets the parameter.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets `Retry-After`.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The JSON body alone.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                kind: self.kind,
                code: &self.code,
                message: &self.message,
                param: self.param.as_deref(),
            },
        })
        .unwrap_or(serde_json::Value::Null)
    }

    /// The error that fits a bare status some layer produced without a body we control.
    pub fn for_status(status: StatusCode) -> Self {
        let (kind, code, message) = match status.as_u16() {
            400 => (
                ErrorType::InvalidRequestError,
                "invalid_request",
                "The request could not be understood.",
            ),
            401 => (
                ErrorType::AuthenticationError,
                "unauthorized",
                "A valid API key is required.",
            ),
            404 => (
                ErrorType::InvalidRequestError,
                "route_not_found",
                "No such route.",
            ),
            405 => (
                ErrorType::InvalidRequestError,
                "method_not_allowed",
                "This route does not accept that method.",
            ),
            408 => (
                ErrorType::InvalidRequestError,
                "request_timeout",
                "The request took too long to arrive.",
            ),
            413 => (
                ErrorType::InvalidRequestError,
                "body_too_large",
                "The request body is over the size limit.",
            ),
            415 => (
                ErrorType::InvalidRequestError,
                "unsupported_media_type",
                "The body must be JSON (Content-Type: application/json).",
            ),
            429 => (
                ErrorType::RateLimitError,
                "rate_limited",
                "Too many requests.",
            ),
            s if s < 500 => (
                ErrorType::InvalidRequestError,
                "invalid_request",
                "The request was refused.",
            ),
            503 => (
                ErrorType::ApiError,
                "service_unavailable",
                "The service is unavailable; try again shortly.",
            ),
            _ => (
                ErrorType::ApiError,
                "internal_error",
                "Something went wrong on our side.",
            ),
        };
        Self::new(status, kind, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// A JSON body extractor whose every rejection is an [`ApiError`]:
/// 415 without a JSON content type, 413 over the body limit, 400 for malformed JSON or a value
/// of the wrong shape (with the offending field as `param`).
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let status = rejection.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::for_status(status)
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorType::InvalidRequestError,
                    "invalid_body",
                    rejection.body_text(),
                )
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON into `T`, turning every failure into a 400 that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            "empty_body",
            "The request body is empty; send a JSON object.",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorType::InvalidRequestError,
                "invalid_json",
                format!("The body is not valid JSON: {inner}"),
            )
        } else {
            let message = inner.to_string();
            let code = if message.starts_with("missing field") {
                "parameter_missing"
            } else {
                "parameter_invalid"
            };
            let mut e = ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorType::InvalidRequestError,
                code,
                message.clone(),
            );
            let param = if path == "." {
                // a missing field is reported at the parent; name it from the message
                message.split('`').nth(1).map(str::to_owned)
            } else {
                Some(path)
            };
            e.param = param;
            e
        }
    })
}

/// What kind of JSON value `v` is, for a message: "a string", "null".
pub fn describe(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// 400 `parameter_unknown` naming the first field of `obj` that is not in `known` (cut to 64
/// characters), so that a misspelt field is an error rather than silently ignored.
pub fn refuse_unknown(
    obj: &serde_json::Map<String, serde_json::Value>,
    known: &[&str],
) -> Result<(), ApiError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => {
            let shown: String = unknown.chars().take(64).collect();
            Err(ApiError::invalid(
                "parameter_unknown",
                &shown,
                format!("Received unknown parameter: {shown}."),
            ))
        }
        None => Ok(()),
    }
}

/// The optional boolean field `name` of a JSON object: `default` when absent or null, 400
/// `parameter_invalid` naming it when it is anything but `true` or `false`.
pub fn optional_bool(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    default: bool,
) -> Result<bool, ApiError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(
            "parameter_invalid",
            name,
            format!("{name} must be true or false, got {}.", describe(other)),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Req {
        amount: u32,
        name: String,
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<Req>(br#"{"amount":"x","name":"a"}"#).expect_err("bad");
        assert_eq!(
            (e.status.as_u16(), e.code.as_str(), e.param.as_deref()),
            (400, "parameter_invalid", Some("amount"))
        );
        let e = parse_json::<Req>(br#"{"amount":1}"#).expect_err("bad");
        assert_eq!(
            (e.code.as_str(), e.param.as_deref()),
            ("parameter_missing", Some("name"))
        );
        let e = parse_json::<Req>(br#"{"amount":1,"#).expect_err("bad");
        assert_eq!(e.code, "invalid_json");
        let e = parse_json::<Req>(b"  ").expect_err("bad");
        assert_eq!(e.code, "empty_body");
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}
