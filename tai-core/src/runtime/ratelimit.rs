//! Rate limits on HTTP routes, with the headers clients read: `RateLimit-Limit`,
//! `RateLimit-Remaining` and `RateLimit-Reset` on every answer of a limited route (the IETF
//! draft's fields), and `Retry-After` on a 429.
//!
//! ```ignore
//! let limit = runtime.http_rate_limit("rate_limits", quota, "Merchant", |parts, body| {
//!     merchant_of(parts, body)
//! }).await?;
//! let route = post(create).layer(axum::middleware::from_fn_with_state(limit, ratelimit::enforce));
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, ErrorType, Runtime};
use crate::backend::BackendError;
use crate::heijunka::{Quota, RateDecision, RateLimiter};

/// Takes the key a request is limited by from its head and body; `None` lets it through
/// unlimited (for one the handler will refuse anyway, such as a body that does not parse).
pub type KeyOf = dyn Fn(&Parts, &[u8]) -> Option<String> + Send + Sync;

/// A rate limit for the routes [`enforce`] wraps.
#[derive(Clone)]
pub struct HttpRateLimit {
    limiter: Arc<dyn RateLimiter>,
    key: Arc<KeyOf>,
    what: Arc<str>,
}

impl std::fmt::Debug for HttpRateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRateLimit")
            .field("limiter", &self.limiter)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl HttpRateLimit {
    /// Limits each request by the key `key` takes from it, with `limiter`; `what` names the
    /// key in the 429's message (`"Merchant"`: "Merchant m_1 is over its rate limit…").
    pub fn new<K>(limiter: Arc<dyn RateLimiter>, what: &str, key: K) -> Self
    where
        K: Fn(&Parts, &[u8]) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            limiter,
            key: Arc::new(key),
            what: what.into(),
        }
    }
}

impl Runtime {
    /// An HTTP rate limit: the limiter for `role` ([`Runtime::rate_limiter`]) giving `quota`
    /// to each key `key` takes from a request.
    pub async fn http_rate_limit<K>(
        &mut self,
        role: &str,
        quota: Quota,
        what: &str,
        key: K,
    ) -> Result<HttpRateLimit, BackendError>
    where
        K: Fn(&Parts, &[u8]) -> Option<String> + Send + Sync + 'static,
    {
        Ok(HttpRateLimit::new(
            self.rate_limiter(role, quota).await?,
            what,
            key,
        ))
    }
}

/// The `RateLimit-*` headers for `decision`, and `Retry-After` (whole seconds, at least 1)
/// when it refused.
pub fn rate_headers(decision: &RateDecision) -> Vec<(HeaderName, HeaderValue)> {
    let mut headers = vec![
        (
            HeaderName::from_static("ratelimit-limit"),
            HeaderValue::from(decision.limit),
        ),
        (
            HeaderName::from_static("ratelimit-remaining"),
            HeaderValue::from(decision.remaining),
        ),
        (
            HeaderName::from_static("ratelimit-reset"),
            HeaderValue::from(whole_seconds(decision.reset_after)),
        ),
    ];
    if let Some(after) = decision.retry_after {
        headers.push((
            header::RETRY_AFTER,
            HeaderValue::from(whole_seconds(after).max(1)),
        ));
    }
    headers
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The middleware (`axum::middleware::from_fn_with_state(limit, enforce)`): checks the
/// request's key, answers 429 `rate_limited` over the quota and 503 `rate_limiter_unavailable`
/// (with `Retry-After: 1`) when the limiter's backend fails, and adds the `RateLimit-*`
/// headers to whatever the route answers. The body is read (within the body limit) only to
/// take the key, and handed on whole.
pub async fn enforce(State(limit): State<HttpRateLimit>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match Bytes::from_request(Request::from_parts(parts.clone(), body), &()).await {
        Ok(bytes) => bytes,
        Err(rejection) => {
            return ApiError::for_status(rejection.status()).into_response();
        }
    };
    let key = (limit.key)(&parts, &bytes);
    let req = Request::from_parts(parts, Body::from(bytes));
    let Some(key) = key else {
        return next.run(req).await;
    };
    let decision = match limit.limiter.check(&key).await {
        Ok(decision) => decision,
        Err(e) => {
            return ApiError::unavailable(
                "rate_limiter_unavailable",
                e.to_string(),
                Some(Duration::from_secs(1)),
            )
            .into_response();
        }
    };
    let mut response = if decision.allowed {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorType::RateLimitError,
            "rate_limited",
            format!(
                "{} {key} is over its rate limit of {} requests; retry later.",
                limit.what, decision.limit
            ),
        )
        .into_response()
    };
    let headers = response.headers_mut();
    for (name, value) in rate_headers(&decision) {
        // a route's own Retry-After (a 503 of its own, say) stands
        if !headers.contains_key(&name) {
            headers.insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;
    use crate::clock::ManualClock;
    use crate::heijunka::GcraLimiter;

    fn app(clock: &ManualClock) -> Router {
        let quota = Quota {
            burst: 2,
            interval: Duration::from_secs(10),
        };
        let limit = HttpRateLimit::new(
            Arc::new(GcraLimiter::new(quota, clock.shared())),
            "Merchant",
            |_, body| {
                let v: serde_json::Value = serde_json::from_slice(body).ok()?;
                v.get("merchant_id")?.as_str().map(str::to_owned)
            },
        );
        Router::new().route(
            "/pay",
            post(|body: Bytes| async move { body })
                .layer(axum::middleware::from_fn_with_state(limit, enforce)),
        )
    }

    async fn send(app: &Router, body: &str) -> Response {
        let req = Request::post("/pay")
            .body(Body::from(body.to_owned()))
            .expect("request");
        app.clone().oneshot(req).await.expect("infallible")
    }

    #[tokio::test]
    async fn limits_per_key_with_headers_and_hands_the_body_on_whole() {
        let clock = ManualClock::new();
        let app = app(&clock);
        let first = send(&app, r#"{"merchant_id":"m_a","n":1}"#).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(first.headers()["ratelimit-limit"], "2");
        assert_eq!(first.headers()["ratelimit-remaining"], "1");
        let echoed = axum::body::to_bytes(first.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&echoed[..], br#"{"merchant_id":"m_a","n":1}"#);

        assert_eq!(
            send(&app, r#"{"merchant_id":"m_a"}"#).await.status(),
            StatusCode::OK
        );
        let limited = send(&app, r#"{"merchant_id":"m_a"}"#).await;
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()["ratelimit-remaining"], "0");
        assert_eq!(limited.headers()[header::RETRY_AFTER], "10");
        let body = axum::body::to_bytes(limited.into_body(), 4096)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["error"]["code"], "rate_limited");

        // another key has its own quota; a body without a key is not limited
        assert_eq!(
            send(&app, r#"{"merchant_id":"m_b"}"#).await.status(),
            StatusCode::OK
        );
        let unkeyed = send(&app, "not json").await;
        assert_eq!(unkeyed.status(), StatusCode::OK);
        assert!(!unkeyed.headers().contains_key("ratelimit-limit"));

        clock.advance(Duration::from_secs(10));
        assert_eq!(
            send(&app, r#"{"merchant_id":"m_a"}"#).await.status(),
            StatusCode::OK
        );
    }
}
