//! What every pluggable backend (state store, rate limiter, queue, secrets) can fail with.
//!
//! The embedded defaults never fail for I/O reasons, but Redis, NATS and Vault can; callers
//! turn a [`BackendError`] into a 503 naming the backend, so a user sees which dependency is down.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future. Backends are chosen at start-up from configuration, so their traits
/// are used as `dyn Trait`; native `async fn` in traits is not object-safe, hence the box.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend could not do what was asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    /// The backend did not answer or refused the connection.
    #[error("{backend} is unavailable: {message}")]
    Unavailable {
        /// Which backend, e.g. `redis`.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The backend answered with something that could not be understood.
    #[error("{backend} returned unexpected data: {message}")]
    Protocol {
        /// Which backend.
        backend: &'static str,
        /// What was wrong with it.
        message: String,
    },
}

impl BackendError {
    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        match self {
            BackendError::Unavailable { backend, .. } | BackendError::Protocol { backend, .. } => {
                backend
            }
        }
    }
}
