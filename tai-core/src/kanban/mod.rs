//! Kanban: bounded, pull-based work queues.
//!
//! Work that may happen after the answer (confirming a charge, rolling out the next region) is
//! put on a [`WorkQueue`] by the Action and pulled by workers at their own pace. A queue:
//!
//! - is **bounded**: `push` refuses with [`QueueError::Full`] at its capacity (ready plus in
//!   flight), so producers feel backpressure instead of memory growing without limit;
//! - hands out a [`Delivery`] that must be **acknowledged**; one that is not acked within the
//!   queue's `ack_wait`, or is nacked, is **redelivered** with its attempt count raised, and after
//!   `max_deliver` attempts it is set aside as a dead letter instead of looping forever;
//! - reports its **depth** (ready, in flight, dead) as gauges;
//! - **drains** on shutdown: [`QueueStatus::close`] stops new work, `pull` keeps handing out what is
//!   left, and [`drain`] waits until every item was acked or the grace time ran out.
//!
//! [`MemoryQueue`] is the in-process default; [`JetStreamQueue`], a work-queue stream with a
//! durable pull consumer, and [`RabbitMqQueue`], a durable quorum queue, give the same contract
//! across processes and restarts. [`FallbackQueue`] joins two of them: work goes to the primary
//! and, while it is unreachable, to the fallback; workers drain both, and a copy that reached
//! both is handled once.

mod fallback;
mod jetstream;
mod memory;
mod pool;
mod rabbitmq;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use fallback::FallbackQueue;
pub use jetstream::JetStreamQueue;
pub use memory::MemoryQueue;
pub(crate) use pool::run_worker;
pub use pool::{Job, PoolLoad, Worked};
pub use rabbitmq::RabbitMqQueue;

use crate::backend::{BackendError, BoxFuture};

/// Why a queue refused work.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    /// The queue holds `capacity` items already.
    #[error("queue {queue} is full ({capacity} items)")]
    Full {
        /// The queue's name.
        queue: String,
        /// Its bound.
        capacity: usize,
    },
    /// The queue was closed for shutdown.
    #[error("queue {0} is closed")]
    Closed(String),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// How many items a queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueDepth {
    /// Waiting to be pulled.
    pub ready: usize,
    /// Pulled, not yet acknowledged.
    pub in_flight: usize,
    /// Given up on after `max_deliver` attempts.
    pub dead: usize,
}

/// What `/status` shows of a queue, whatever its item type.
pub trait QueueStatus: Send + Sync + std::fmt::Debug {
    /// The queue's name.
    fn name(&self) -> &str;
    /// Its backend, e.g. `local` or `jetstream`.
    fn backend(&self) -> &'static str;
    /// Its depth now.
    fn depth(&self) -> QueueDepth;
    /// Stops accepting new items.
    fn close(&self);
}

/// Settings shared by every queue backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue's name (metrics label, stream name).
    pub name: String,
    /// At most this many items, ready plus in flight.
    pub capacity: usize,
    /// A delivery not acked within this time is handed out again.
    pub ack_wait: Duration,
    /// After this many deliveries an item becomes a dead letter.
    pub max_deliver: u32,
}

impl QueueConfig {
    /// A queue named `name` with a capacity and 30 s ack wait, 5 attempts.
    pub fn new(name: impl Into<String>, capacity: usize) -> Self {
        Self {
            name: name.into(),
            capacity,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
        }
    }
}

/// Acknowledges one delivery; each backend has its own.
pub trait Acker: Send + Sync {
    /// The item was handled: forget it.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>>;
    /// The item was not handled: hand it out again.
    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>>;
}

/// One item handed to a worker.
#[must_use = "a delivery that is neither acked nor nacked is redelivered after ack_wait"]
pub struct Delivery<T> {
    /// The work.
    pub item: T,
    /// 1 on first delivery, more on redeliveries.
    pub attempt: u32,
    acker: Box<dyn Acker>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Delivery<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("item", &self.item)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<T> Delivery<T> {
    /// A delivery whose acknowledgement goes to `acker`.
    pub fn new(item: T, attempt: u32, acker: Box<dyn Acker>) -> Self {
        Self {
            item,
            attempt,
            acker,
        }
    }

    /// Marks the item done.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.acker.ack().await
    }

    /// Hands the item back for another attempt.
    pub async fn nack(self) -> Result<(), QueueError> {
        self.acker.nack().await
    }
}

/// A bounded work queue with explicit acknowledgement.
pub trait WorkQueue<T>: QueueStatus {
    /// Adds an item, or refuses when full or closed.
    fn push(&self, item: T) -> BoxFuture<'_, Result<(), QueueError>>;
    /// Waits for the next item; `None` once the queue is closed and empty.
    fn pull(&self) -> BoxFuture<'_, Result<Option<Delivery<T>>, QueueError>>;
}

/// Closes `queue` and waits up to `grace` until it holds nothing ready or in flight; returns
/// what was left (all zero on a clean drain).
pub async fn drain(queue: &dyn QueueStatus, grace: Duration) -> QueueDepth {
    queue.close();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let depth = queue.depth();
        if depth.ready == 0 && depth.in_flight == 0 {
            return depth;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                queue = queue.name(),
                ?depth,
                "queue not drained within grace time"
            );
            return depth;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A queue shared between producers, workers and `/status`.
pub type SharedQueue<T> = Arc<dyn WorkQueue<T>>;

/// A queue's depth gauges, labelled `{queue, state}` in
/// [`crate::kaizen::Kaizen::queue_depth`]'s family.
#[derive(Debug, Clone)]
pub(crate) struct DepthGauges {
    ready: prometheus::IntGauge,
    in_flight: prometheus::IntGauge,
    dead: Option<prometheus::IntGauge>,
}

impl DepthGauges {
    /// The gauges of `queue`; `dead` for a backend that counts its dead letters.
    pub(crate) fn new(family: &prometheus::IntGaugeVec, queue: &str, dead: bool) -> Self {
        Self {
            ready: family.with_label_values(&[queue, "ready"]),
            in_flight: family.with_label_values(&[queue, "in_flight"]),
            dead: dead.then(|| family.with_label_values(&[queue, "dead"])),
        }
    }

    /// Shows `ready` and `in_flight` items.
    pub(crate) fn set(&self, ready: usize, in_flight: usize) {
        self.ready.set(i64::try_from(ready).unwrap_or(i64::MAX));
        self.in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
    }

    /// Shows `dead` items, when the backend counts them.
    pub(crate) fn set_dead(&self, dead: usize) {
        if let Some(g) = &self.dead {
            g.set(i64::try_from(dead).unwrap_or(i64::MAX));
        }
    }
}
