//! Two queue backends as one: a primary (NATS JetStream) and a fallback (RabbitMQ).
//!
//! A push goes to the primary; when the primary cannot take it (unreachable, no answer in
//! time) it goes to the fallback instead, so producers keep working through an outage of
//! either. A full primary is not an outage: that refusal is the backpressure it means to be
//! and reaches the producer. Workers pull from both at once and see one stream of work.
//!
//! An item can reach both backends: a primary that stored it but whose answer was lost looks
//! like one that did not. Each item has an id (the caller says how to read it), and a copy
//! whose id was acked a moment ago, or is in a worker's hands now, is acked and dropped
//! instead of being handled twice. The ids are kept per process (the last
//! [`FallbackQueue::REMEMBER`] acked); across replicas the handler must be idempotent anyway.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Delivery, QueueDepth, QueueError, QueueStatus, SharedQueue, WorkQueue};
use crate::backend::BoxFuture;

/// Deliveries from the feeders, each with the index of the backend it came from.
type Fed<T> = mpsc::Receiver<(usize, Delivery<T>)>;

/// The primary and fallback queue as one [`WorkQueue`].
pub struct FallbackQueue<T> {
    name: String,
    backend: &'static str,
    primary: SharedQueue<T>,
    fallback: SharedQueue<T>,
    id_of: fn(&T) -> String,
    seen: Arc<Mutex<Seen>>,
    receiver: tokio::sync::Mutex<Option<Fed<T>>>,
    counters: Counters,
    breaker: Option<crate::jidoka::CircuitBreaker>,
    closing: tokio::sync::watch::Sender<bool>,
}

/// After the queue is closed, a backend whose pull gives nothing for this long while none of
/// its items is in a worker's hands here is taken to be unreachable (a reachable one ends its
/// pulls itself once drained), and its feeder stops: what it holds stays there for the next
/// process.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Resolves once the queue has been closed for [`DRAIN_GRACE`] with nothing from backend
/// `from` in hand (never, if it is dropped unclosed).
async fn closed_for_a_while(
    mut closing: tokio::sync::watch::Receiver<bool>,
    seen: Arc<Mutex<Seen>>,
    from: usize,
) {
    if closing.wait_for(|closed| *closed).await.is_err() {
        std::future::pending::<()>().await;
    }
    loop {
        tokio::time::sleep(DRAIN_GRACE).await;
        // an item in hand may be handed back to it yet: keep pulling while there is one
        if !lock(&seen).in_hand.values().any(|holder| *holder == from) {
            return;
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Counters {
    to_fallback: Arc<std::sync::atomic::AtomicU64>,
    duplicates: Arc<std::sync::atomic::AtomicU64>,
    metrics: Option<(prometheus::IntCounter, prometheus::IntCounter)>,
}

impl Counters {
    fn pushed_to_fallback(&self) {
        self.to_fallback
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((pushed, _)) = &self.metrics {
            pushed.inc();
        }
    }
    fn dropped_copy(&self) {
        self.duplicates
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, dropped)) = &self.metrics {
            dropped.inc();
        }
    }
}

impl<T> std::fmt::Debug for FallbackQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackQueue")
            .field("queue", &self.name)
            .field("primary", &self.primary.backend())
            .field("fallback", &self.fallback.backend())
            .finish_non_exhaustive()
    }
}

/// Ids in workers' hands (with the backend each came from) and the last ones acked.
#[derive(Debug, Default)]
struct Seen {
    in_hand: HashMap<String, usize>,
    acked: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    fn remember_acked(&mut self, id: String) {
        if self.acked.insert(id.clone()) {
            self.order.push_back(id);
            while self.order.len() > FallbackQueue::<()>::REMEMBER {
                if let Some(old) = self.order.pop_front() {
                    self.acked.remove(&old);
                }
            }
        }
    }
}

fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T> FallbackQueue<T> {
    /// How many acked ids each process remembers to drop copies of.
    pub const REMEMBER: usize = 100_000;
}

impl<T: Clone + Send + Sync + 'static> FallbackQueue<T> {
    /// `primary` first, `fallback` while the primary cannot take work; `id_of` names an item.
    pub fn new(primary: SharedQueue<T>, fallback: SharedQueue<T>, id_of: fn(&T) -> String) -> Self {
        // made once a queue, for `/status`
        let backend: &'static str =
            Box::leak(format!("{}+{}", primary.backend(), fallback.backend()).into_boxed_str());
        Self {
            name: primary.name().to_owned(),
            backend,
            primary,
            fallback,
            id_of,
            seen: Arc::new(Mutex::new(Seen::default())),
            receiver: tokio::sync::Mutex::new(None),
            counters: Counters::default(),
            breaker: None,
            closing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Guards the primary with `breaker`: once it opens, pushes go straight to the fallback
    /// instead of each waiting for the primary to fail, until a trial push gets through.
    pub fn with_breaker(mut self, breaker: crate::jidoka::CircuitBreaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Counts pushes to the fallback and dropped copies in `family`, labelled
    /// `{queue, event="to_fallback"|"copy_dropped"}`.
    pub fn with_counters(mut self, family: &prometheus::IntCounterVec) -> Self {
        self.counters.metrics = Some((
            family.with_label_values(&[self.name.as_str(), "to_fallback"]),
            family.with_label_values(&[self.name.as_str(), "copy_dropped"]),
        ));
        self
    }

    /// Items pushed to the fallback because the primary could not take them.
    pub fn pushed_to_fallback(&self) -> u64 {
        self.counters
            .to_fallback
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Copies dropped because their id was acked or in hand already.
    pub fn duplicates_dropped(&self) -> u64 {
        self.counters
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn push_one(&self, item: T) -> Result<(), QueueError> {
        use crate::jidoka::Outcome;
        let permit = match self.breaker.as_ref().map(|b| b.try_acquire()) {
            Some(Err(_open)) => return self.push_to_fallback(item).await,
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let pushed = self.primary.push(item.clone()).await;
        if let Some(permit) = permit {
            permit.record(match &pushed {
                Err(QueueError::Backend(_)) => Outcome::Failure,
                Ok(()) => Outcome::Success,
                Err(_) => Outcome::Ignored,
            });
        }
        match pushed {
            Err(QueueError::Backend(e)) => {
                tracing::warn!(queue = %self.name, error = %e, fallback = self.fallback.backend(), "the primary queue cannot take work; pushing to the fallback");
                self.push_to_fallback(item).await
            }
            other => other,
        }
    }

    async fn push_to_fallback(&self, item: T) -> Result<(), QueueError> {
        self.fallback.push(item).await?;
        self.counters.pushed_to_fallback();
        Ok(())
    }

    /// Starts one feeder a backend: each pulls on its own and hands deliveries over one at a
    /// time, so a slow or unreachable backend never holds up the other.
    fn feeders(&self) -> Fed<T> {
        let (tx, rx) = mpsc::channel(1);
        for (from, queue) in [self.primary.clone(), self.fallback.clone()]
            .into_iter()
            .enumerate()
        {
            let tx = tx.clone();
            let closing = self.closing.subscribe();
            let seen = self.seen.clone();
            tokio::spawn(async move {
                loop {
                    let delivery = tokio::select! {
                        pulled = queue.pull() => pulled,
                        _ = tx.closed() => return,
                        _ = closed_for_a_while(closing.clone(), seen.clone(), from) => {
                            tracing::warn!(queue = queue.name(), backend = queue.backend(), "closed, and this backend gives nothing: taken to be unreachable; its items wait there");
                            return;
                        }
                    };
                    match delivery {
                        Ok(Some(d)) => {
                            if tx.send((from, d)).await.is_err() {
                                return; // nobody pulls any more: unacked, it comes back
                            }
                        }
                        Ok(None) => return, // closed and drained
                        // closed, and this backend cannot be reached to drain it: what it holds
                        // stays with it and comes to the next process, and the pulls end
                        Err(e) if *closing.borrow() => {
                            tracing::warn!(queue = queue.name(), backend = queue.backend(), error = %e, "closed while unreachable; its items wait there");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(queue = queue.name(), backend = queue.backend(), error = %e, "pulling failed; trying again");
                            tokio::select! {
                                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                                _ = tx.closed() => return,
                            }
                        }
                    }
                }
            });
        }
        rx
    }

    async fn pull_one(&self) -> Result<Option<Delivery<T>>, QueueError> {
        let mut receiver = self.receiver.lock().await;
        let rx = receiver.get_or_insert_with(|| self.feeders());
        loop {
            let Some((from, delivery)) = rx.recv().await else {
                return Ok(None); // both closed and drained
            };
            let id = (self.id_of)(&delivery.item);
            let copy = {
                let mut seen = lock(&self.seen);
                // handled already; or the other backend's copy is in a worker's hands, and
                // that backend hands it out again if the worker fails. (The same backend
                // handing out the same item again is a redelivery, not a copy.)
                let copy = seen.acked.contains(&id)
                    || seen.in_hand.get(&id).is_some_and(|holder| *holder != from);
                if !copy {
                    seen.in_hand.insert(id.clone(), from);
                }
                copy
            };
            if copy {
                self.counters.dropped_copy();
                tracing::info!(queue = %self.name, id = %id, "dropped a copy of an item already handled");
                // acked on the side: the other pullers wait on this receiver meanwhile
                let name = self.name.clone();
                tokio::spawn(async move {
                    if let Err(e) = delivery.ack().await {
                        // it comes again, and is dropped again
                        tracing::warn!(queue = %name, error = %e, "could not ack a dropped copy");
                    }
                });
                continue;
            }
            let Delivery {
                item,
                attempt,
                acker,
            } = delivery;
            return Ok(Some(Delivery::new(
                item,
                attempt,
                Box::new(Remembering {
                    inner: Some(acker),
                    id,
                    seen: self.seen.clone(),
                }),
            )));
        }
    }
}

/// Passes the settlement on, and remembers what was acked.
struct Remembering {
    inner: Option<Box<dyn super::Acker>>,
    id: String,
    seen: Arc<Mutex<Seen>>,
}

impl Drop for Remembering {
    /// Settled or dropped by a failing worker: out of its hands either way.
    fn drop(&mut self) {
        lock(&self.seen).in_hand.remove(&self.id);
    }
}

impl super::Acker for Remembering {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            let mut this = self;
            // handled: remembered before it leaves the hands, so a copy is never let through in
            // between, and even if the ack does not reach the backend (it hands the item out
            // again, and that is a copy too)
            let id = this.id.clone();
            lock(&this.seen).remember_acked(id);
            match this.inner.take() {
                Some(inner) => inner.ack().await,
                None => Ok(()),
            }
        })
    }
    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            let mut this = self;
            match this.inner.take() {
                Some(inner) => inner.nack().await,
                None => Ok(()),
            }
        })
    }
}

impl<T: Clone + Send + Sync + 'static> QueueStatus for FallbackQueue<T> {
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> &'static str {
        self.backend
    }
    fn depth(&self) -> QueueDepth {
        let (a, b) = (self.primary.depth(), self.fallback.depth());
        QueueDepth {
            ready: a.ready + b.ready,
            in_flight: a.in_flight + b.in_flight,
            dead: a.dead + b.dead,
        }
    }
    fn close(&self) {
        self.closing.send_replace(true);
        self.primary.close();
        self.fallback.close();
    }
}

impl<T: Clone + Send + Sync + 'static> WorkQueue<T> for FallbackQueue<T> {
    fn push(&self, item: T) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(self.push_one(item))
    }
    fn pull(&self) -> BoxFuture<'_, Result<Option<Delivery<T>>, QueueError>> {
        Box::pin(self.pull_one())
    }
}
