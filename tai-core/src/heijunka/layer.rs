//! A keyed rate limit as a `tower::Layer`: put any [`RateLimiter`] in front of a service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{RateDecision, RateLimiter};
use crate::backend::BackendError;

/// Why a rate-limited service did not answer.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError<E> {
    /// The key is over its quota; the decision says when to retry.
    #[error("rate limited; retry after {:?}", .0.retry_after)]
    Limited(RateDecision),
    /// The limiter's backend failed.
    #[error(transparent)]
    Backend(BackendError),
    /// The inner service failed.
    #[error("{0}")]
    Inner(E),
}

/// Limits requests per key, the key taken from each request by `key`.
pub struct RateLimitLayer<K> {
    limiter: Arc<dyn RateLimiter>,
    key: Arc<K>,
}

impl<K> Clone for RateLimitLayer<K> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

impl<K> std::fmt::Debug for RateLimitLayer<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<K> RateLimitLayer<K> {
    /// A layer checking `limiter` with the key `key` gives each request.
    pub fn new(limiter: Arc<dyn RateLimiter>, key: K) -> Self {
        Self {
            limiter,
            key: Arc::new(key),
        }
    }
}

impl<S, K> tower::Layer<S> for RateLimitLayer<K> {
    type Service = RateLimitService<S, K>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

/// A service behind a keyed rate limit.
pub struct RateLimitService<S, K> {
    inner: S,
    limiter: Arc<dyn RateLimiter>,
    key: Arc<K>,
}

impl<S: Clone, K> Clone for RateLimitService<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            key: self.key.clone(),
        }
    }
}

impl<S, K> std::fmt::Debug for RateLimitService<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitService")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl<S, K, Req> tower::Service<Req> for RateLimitService<S, K>
where
    S: tower::Service<Req> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Req: Send + 'static,
    K: Fn(&Req) -> String + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = RateLimitError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(RateLimitError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        // the ready service goes into the future; a fresh clone takes its place (tower's idiom)
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        let key = (self.key)(&req);
        Box::pin(async move {
            let decision = limiter.check(&key).await.map_err(RateLimitError::Backend)?;
            if !decision.allowed {
                return Err(RateLimitError::Limited(decision));
            }
            inner.call(req).await.map_err(RateLimitError::Inner)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::clock::ManualClock;
    use crate::heijunka::{GcraLimiter, Quota};

    #[tokio::test]
    async fn refuses_over_quota_per_key_without_calling_the_inner_service() {
        let clock = ManualClock::new();
        let limiter: Arc<dyn RateLimiter> = Arc::new(GcraLimiter::new(
            Quota {
                burst: 2,
                interval: Duration::from_secs(1),
            },
            clock.shared(),
        ));
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = tower::service_fn(move |req: (String, u32)| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<u32, std::convert::Infallible>(req.1) }
        });
        let mut svc =
            RateLimitLayer::new(limiter, |req: &(String, u32)| req.0.clone()).layer(inner);
        for i in 0..2 {
            let answer = svc
                .ready()
                .await
                .expect("ready")
                .call(("alice".into(), i))
                .await;
            assert_eq!(answer.expect("within quota"), i);
        }
        match svc
            .ready()
            .await
            .expect("ready")
            .call(("alice".into(), 9))
            .await
        {
            Err(RateLimitError::Limited(d)) => {
                assert_eq!(d.retry_after, Some(Duration::from_secs(1)))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(
            svc.ready()
                .await
                .expect("ready")
                .call(("bob".into(), 1))
                .await
                .is_ok(),
            "bob has his own budget"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the refused call never reached the service"
        );
        clock.advance(Duration::from_secs(1));
        assert!(
            svc.ready()
                .await
                .expect("ready")
                .call(("alice".into(), 3))
                .await
                .is_ok()
        );
    }
}
