//! The circuit breaker as a `tower::Layer`, for wrapping an HTTP client or any other service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{CircuitBreaker, Outcome, Rejected};

/// Decides what a service's result means for the breaker.
pub trait Classify<T, E>: Send + Sync {
    /// Classifies one result.
    fn classify(&self, result: &Result<T, E>) -> Outcome;
}

impl<T, E, F> Classify<T, E> for F
where
    F: Fn(&Result<T, E>) -> Outcome + Send + Sync,
{
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        self(result)
    }
}

/// Every `Err` is a failure, every `Ok` a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorsAreFailures;

impl<T, E> Classify<T, E> for ErrorsAreFailures {
    fn classify(&self, result: &Result<T, E>) -> Outcome {
        Outcome::of(result)
    }
}

/// The error of a wrapped service: refused by the breaker, or the inner service's own error.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker was open; the inner service was not called.
    #[error(transparent)]
    Open(#[from] Rejected),
    /// The inner service failed.
    #[error("{0}")]
    Inner(E),
}

/// Wraps services with a shared [`CircuitBreaker`].
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer<C> {
    breaker: CircuitBreaker,
    classify: Arc<C>,
}

impl<C> CircuitBreakerLayer<C> {
    /// A layer that feeds `breaker` with results classified by `classify`.
    pub fn new(breaker: CircuitBreaker, classify: C) -> Self {
        Self {
            breaker,
            classify: Arc::new(classify),
        }
    }
}

impl<S, C> tower::Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// A service behind a circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreakerService<S, C> {
    inner: S,
    breaker: CircuitBreaker,
    classify: Arc<C>,
}

impl<S, C, Req> tower::Service<Req> for CircuitBreakerService<S, C>
where
    S: tower::Service<Req>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
    C: Classify<S::Response, S::Error> + 'static,
{
    type Response = S::Response;
    type Error = BreakerError<S::Error>;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BreakerError::Inner)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(rejected) => return Box::pin(std::future::ready(Err(rejected.into()))),
        };
        let fut = self.inner.call(req);
        let classify = self.classify.clone();
        Box::pin(async move {
            let result = fut.await;
            permit.record(classify.classify(&result));
            result.map_err(BreakerError::Inner)
        })
    }
}
