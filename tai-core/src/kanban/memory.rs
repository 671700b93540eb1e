//! The in-process queue.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{Acker, Delivery, QueueConfig, QueueDepth, QueueError, QueueStatus, WorkQueue};
use crate::backend::BoxFuture;
use crate::clock::SharedClock;

/// A bounded in-process queue with acks and redelivery, on the injectable clock.
#[derive(Debug, Clone)]
pub struct MemoryQueue<T> {
    inner: Arc<Inner<T>>,
}

#[derive(Debug)]
struct Inner<T> {
    config: QueueConfig,
    clock: SharedClock,
    state: Mutex<State<T>>,
    notify: Notify,
    gauges: Option<super::DepthGauges>,
}

#[derive(Debug)]
struct Entry<T> {
    id: u64,
    item: T,
    attempt: u32,
}

#[derive(Debug)]
struct State<T> {
    ready: VecDeque<Entry<T>>,
    in_flight: HashMap<u64, (Entry<T>, Instant)>,
    dead: Vec<Entry<T>>,
    next_id: u64,
    closed: bool,
}

impl<T: Clone + Send + Sync + 'static> MemoryQueue<T> {
    /// A queue with `config`, reading time from `clock`.
    pub fn new(config: QueueConfig, clock: SharedClock) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                clock,
                state: Mutex::new(State {
                    ready: VecDeque::new(),
                    in_flight: HashMap::new(),
                    dead: Vec::new(),
                    next_id: 0,
                    closed: false,
                }),
                notify: Notify::new(),
                gauges: None,
            }),
        }
    }

    /// Exports depth through `family`, labelled `{queue, state}` (see
    /// [`crate::kaizen::Kaizen::queue_depth`]). Call before cloning.
    pub fn with_gauges(mut self, family: &prometheus::IntGaugeVec) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.gauges = Some(super::DepthGauges::new(family, &inner.config.name, true));
        }
        self
    }

    /// Items given up on after `max_deliver` attempts.
    pub fn dead_letters(&self) -> Vec<T> {
        self.lock().dead.iter().map(|e| e.item.clone()).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Moves expired in-flight items back to the front of the line (or to the dead letters).
    fn requeue_expired(&self, state: &mut State<T>) {
        let now = self.inner.clock.now();
        let mut expired: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        // oldest first, so redeliveries keep their order
        expired.sort_unstable_by(|a, b| b.cmp(a));
        for id in expired {
            if let Some((entry, _)) = state.in_flight.remove(&id) {
                self.requeue(state, entry);
            }
        }
    }

    fn requeue(&self, state: &mut State<T>, entry: Entry<T>) {
        if entry.attempt >= self.inner.config.max_deliver {
            tracing::error!(
                queue = %self.inner.config.name,
                attempts = entry.attempt,
                "giving up on a queue item; kept as a dead letter"
            );
            state.dead.push(entry);
        } else {
            state.ready.push_front(entry);
        }
    }

    fn update_gauges(&self, state: &State<T>) {
        if let Some(g) = &self.inner.gauges {
            g.set(state.ready.len(), state.in_flight.len());
            g.set_dead(state.dead.len());
        }
    }

    fn settle(&self, id: u64, redeliver: bool) {
        let mut state = self.lock();
        if let Some((entry, _)) = state.in_flight.remove(&id)
            && redeliver
        {
            self.requeue(&mut state, entry);
        }
        self.update_gauges(&state);
        drop(state);
        self.inner.notify.notify_waiters();
    }

    /// Hands out the next item if one is ready (after redelivering expired ones).
    pub fn try_pull(&self) -> Option<Delivery<T>> {
        let mut state = self.lock();
        self.requeue_expired(&mut state);
        let mut entry = state.ready.pop_front()?;
        entry.attempt += 1;
        let id = entry.id;
        let attempt = entry.attempt;
        let item = entry.item.clone();
        let deadline = self.inner.clock.now() + self.inner.config.ack_wait;
        state.in_flight.insert(id, (entry, deadline));
        self.update_gauges(&state);
        Some(Delivery::new(
            item,
            attempt,
            Box::new(MemoryAcker {
                queue: self.clone(),
                id,
            }),
        ))
    }

    /// Adds an item unless the queue is full or closed.
    pub fn try_push(&self, item: T) -> Result<(), QueueError> {
        let mut state = self.lock();
        if state.closed {
            return Err(QueueError::Closed(self.inner.config.name.clone()));
        }
        if state.ready.len() + state.in_flight.len() >= self.inner.config.capacity {
            return Err(QueueError::Full {
                queue: self.inner.config.name.clone(),
                capacity: self.inner.config.capacity,
            });
        }
        let id = state.next_id;
        state.next_id += 1;
        state.ready.push_back(Entry {
            id,
            item,
            attempt: 0,
        });
        self.update_gauges(&state);
        drop(state);
        self.inner.notify.notify_waiters();
        Ok(())
    }

    async fn pull_wait(&self) -> Option<Delivery<T>> {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(d) = self.try_pull() {
                return Some(d);
            }
            {
                let state = self.lock();
                if state.closed && state.ready.is_empty() && state.in_flight.is_empty() {
                    return None;
                }
            }
            // Wake on new work, or now and then to notice in-flight items whose ack time ran out.
            let recheck = self.inner.config.ack_wait.min(Duration::from_millis(250));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(recheck) => {}
            }
        }
    }
}

struct MemoryAcker<T> {
    queue: MemoryQueue<T>,
    id: u64,
}

impl<T: Clone + Send + Sync + 'static> Acker for MemoryAcker<T> {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        self.queue.settle(self.id, false);
        Box::pin(std::future::ready(Ok(())))
    }
    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        self.queue.settle(self.id, true);
        Box::pin(std::future::ready(Ok(())))
    }
}

impl<T: Clone + Send + Sync + std::fmt::Debug + 'static> QueueStatus for MemoryQueue<T> {
    fn name(&self) -> &str {
        &self.inner.config.name
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn depth(&self) -> QueueDepth {
        let state = self.lock();
        QueueDepth {
            ready: state.ready.len(),
            in_flight: state.in_flight.len(),
            dead: state.dead.len(),
        }
    }
    fn close(&self) {
        self.lock().closed = true;
        self.inner.notify.notify_waiters();
    }
}

impl<T: Clone + Send + Sync + std::fmt::Debug + 'static> WorkQueue<T> for MemoryQueue<T> {
    fn push(&self, item: T) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(std::future::ready(self.try_push(item)))
    }
    fn pull(&self) -> BoxFuture<'_, Result<Option<Delivery<T>>, QueueError>> {
        Box::pin(async move { Ok(self.pull_wait().await) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::kanban::drain;

    fn queue(clock: &ManualClock, capacity: usize) -> MemoryQueue<String> {
        let mut cfg = QueueConfig::new("confirmations", capacity);
        cfg.ack_wait = Duration::from_secs(10);
        cfg.max_deliver = 3;
        MemoryQueue::new(cfg, clock.shared())
    }

    #[tokio::test]
    async fn refuses_past_its_bound_counting_in_flight_items() {
        let clock = ManualClock::new();
        let q = queue(&clock, 2);
        q.try_push("a".into()).expect("room");
        q.try_push("b".into()).expect("room");
        assert!(matches!(
            q.try_push("c".into()),
            Err(QueueError::Full { capacity: 2, .. })
        ));
        let d = q.try_pull().expect("item");
        // pulled but not acked still takes room
        assert!(q.try_push("c".into()).is_err());
        d.ack().await.expect("ack");
        q.try_push("c".into()).expect("room after ack");
    }

    #[tokio::test]
    async fn redelivers_an_unacknowledged_item_after_ack_wait() {
        let clock = ManualClock::new();
        let q = queue(&clock, 10);
        q.try_push("a".into()).expect("room");
        q.try_push("b".into()).expect("room");
        let first = q.try_pull().expect("a");
        assert_eq!((first.item.as_str(), first.attempt), ("a", 1));
        std::mem::forget(first); // the worker died without acking
        let b = q.try_pull().expect("b");
        b.ack().await.expect("ack");
        assert!(
            q.try_pull().is_none(),
            "a is in flight until its ack time ends"
        );
        clock.advance(Duration::from_secs(10));
        let again = q.try_pull().expect("a again");
        assert_eq!((again.item.as_str(), again.attempt), ("a", 2));
        again.ack().await.expect("ack");
        assert_eq!(q.depth(), QueueDepth::default());
    }

    #[tokio::test]
    async fn nack_redelivers_at_once_and_max_deliver_dead_letters() {
        let clock = ManualClock::new();
        let q = queue(&clock, 10);
        q.try_push("poison".into()).expect("room");
        for attempt in 1..=3 {
            let d = q.pull().await.expect("pull").expect("item");
            assert_eq!(d.attempt, attempt);
            d.nack().await.expect("nack");
        }
        assert!(q.try_pull().is_none());
        assert_eq!(q.depth().dead, 1);
        assert_eq!(q.dead_letters(), vec!["poison".to_string()]);
    }

    #[tokio::test]
    async fn pull_waits_for_work_and_close_drains() {
        let clock = ManualClock::new();
        let q = queue(&clock, 10);
        let worker = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while let Some(d) = q.pull().await.expect("pull") {
                    seen.push(d.item.clone());
                    d.ack().await.expect("ack");
                }
                seen
            })
        };
        q.try_push("1".into()).expect("room");
        q.try_push("2".into()).expect("room");
        let left = drain(&q, Duration::from_secs(5)).await;
        assert_eq!(left, QueueDepth::default());
        assert!(matches!(q.try_push("3".into()), Err(QueueError::Closed(_))));
        let seen = worker.await.expect("worker");
        assert_eq!(seen, vec!["1".to_string(), "2".to_string()]);
    }

    #[test]
    fn depth_gauges_follow_the_queue() {
        let clock = ManualClock::new();
        let kaizen = crate::kaizen::Kaizen::new("test", clock.shared());
        let q = queue(&clock, 10).with_gauges(kaizen.queue_depth());
        q.try_push("a".into()).expect("room");
        q.try_push("b".into()).expect("room");
        let _d = q.try_pull().expect("a");
        let text = kaizen.encode();
        assert!(text.contains(r#"kanban_queue_depth{queue="confirmations",state="ready"} 1"#));
        assert!(text.contains(r#"kanban_queue_depth{queue="confirmations",state="in_flight"} 1"#));
    }
}
