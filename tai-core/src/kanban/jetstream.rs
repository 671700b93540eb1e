//! The Kanban queue on NATS JetStream: the same contract as the in-process queue, across
//! processes and restarts.
//!
//! Items are JSON messages on a work-queue stream (a message leaves the stream when it is
//! acknowledged) bounded to `capacity` messages with new messages refused when full, so a full
//! queue pushes back on producers. Workers pull through one durable consumer with explicit
//! acks: an item not acked within `ack_wait` (the worker died) or nacked is delivered again, up
//! to `max_deliver` times. Nothing pushed is lost when a process crashes.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Acker, Delivery, QueueConfig, QueueDepth, QueueError, QueueStatus, WorkQueue};
use crate::backend::{BackendError, BoxFuture};

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(BackendError::Unavailable {
        backend: "nats",
        message: e.to_string(),
    })
}

/// A bounded work queue on a JetStream stream with a durable pull consumer.
pub struct JetStreamQueue<T> {
    config: QueueConfig,
    js: jetstream::Context,
    subject: String,
    consumer: consumer::PullConsumer,
    closed: Arc<AtomicBool>,
    ready: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    gauges: Option<super::DepthGauges>,
    id_of: Option<fn(&T) -> String>,
    _item: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for JetStreamQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamQueue")
            .field("queue", &self.config.name)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> JetStreamQueue<T> {
    /// Connects to `url` and makes sure stream `stream_name` (subject `subject`) and its durable
    /// consumer exist with `config`'s bound, ack wait and delivery limit.
    pub async fn connect(
        url: &str,
        stream_name: &str,
        subject: &str,
        config: QueueConfig,
    ) -> Result<Self, QueueError> {
        let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
            .await
            .map_err(|_| unavailable("connecting timed out after 5 s"))?
            .map_err(unavailable)?;
        let js = jetstream::new(client);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: stream_name.to_owned(),
                subjects: vec![subject.to_owned()],
                retention: stream::RetentionPolicy::WorkQueue,
                discard: stream::DiscardPolicy::New,
                max_messages: i64::try_from(config.capacity).unwrap_or(i64::MAX),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let durable = format!("{}-workers", config.name);
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &durable,
                consumer::pull::Config {
                    durable_name: Some(durable.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: i64::from(config.max_deliver),
                    ..Default::default()
                },
            )
            .await
            .map_err(unavailable)?;
        let queue = Self {
            config,
            js,
            subject: subject.to_owned(),
            consumer,
            closed: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            gauges: None,
            id_of: None,
            _item: PhantomData,
        };
        queue.refresh_depth().await;
        Ok(queue)
    }

    /// Gives every message the id `id_of` makes of its item (`Nats-Msg-Id`): the stream drops a
    /// second publish of one id within its duplicate window.
    pub fn with_ids(mut self, id_of: fn(&T) -> String) -> Self {
        self.id_of = Some(id_of);
        self
    }

    /// Exports depth through `family` (see [`crate::kaizen::Kaizen::queue_depth`]).
    pub fn with_gauges(mut self, family: &prometheus::IntGaugeVec) -> Self {
        self.gauges = Some(super::DepthGauges::new(family, &self.config.name, false));
        self
    }

    /// Reads the depth from the server (the sync `depth()` answers from this cache).
    pub async fn refresh_depth(&self) {
        let mut consumer = self.consumer.clone();
        if let Ok(info) = consumer.info().await {
            let ready = usize::try_from(info.num_pending).unwrap_or(usize::MAX);
            self.ready.store(ready, Ordering::Relaxed);
            self.in_flight
                .store(info.num_ack_pending, Ordering::Relaxed);
            if let Some(g) = &self.gauges {
                g.set(ready, info.num_ack_pending);
            }
        }
    }

    async fn pull_one(&self) -> Result<Option<Delivery<T>>, QueueError> {
        loop {
            let mut batch = self
                .consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .map_err(unavailable)?;
            let next = batch.next().await;
            self.refresh_depth().await;
            match next {
                Some(Ok(message)) => {
                    let attempt = message
                        .info()
                        .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
                        .unwrap_or(1);
                    match serde_json::from_slice::<T>(&message.payload) {
                        Ok(item) => {
                            return Ok(Some(Delivery::new(
                                item,
                                attempt,
                                Box::new(JetStreamAcker { message }),
                            )));
                        }
                        Err(e) => {
                            // a message no worker can read would loop forever: terminate it
                            tracing::error!(queue = %self.config.name, error = %e, "unreadable queue item; terminated");
                            let _ = message.ack_with(AckKind::Term).await;
                        }
                    }
                }
                Some(Err(e)) => return Err(unavailable(e)),
                None if self.closed.load(Ordering::SeqCst) => return Ok(None),
                None => {}
            }
        }
    }
}

struct JetStreamAcker {
    message: jetstream::Message,
}

impl Acker for JetStreamAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        // double ack: wait for the server to confirm, so an acked item is really gone
        Box::pin(async move { self.message.double_ack().await.map_err(unavailable) })
    }
    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            self.message
                .ack_with(AckKind::Nak(None))
                .await
                .map_err(unavailable)
        })
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> QueueStatus for JetStreamQueue<T> {
    fn name(&self) -> &str {
        &self.config.name
    }
    fn backend(&self) -> &'static str {
        "jetstream"
    }
    fn depth(&self) -> QueueDepth {
        QueueDepth {
            ready: self.ready.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            dead: 0,
        }
    }
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> WorkQueue<T> for JetStreamQueue<T> {
    fn push(&self, item: T) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(async move {
            if self.closed.load(Ordering::SeqCst) {
                return Err(QueueError::Closed(self.config.name.clone()));
            }
            let payload = serde_json::to_vec(&item)
                .map_err(|e| unavailable(format!("cannot encode the item: {e}")))?;
            // while NATS is unreachable a publish waits for the reconnect: a producer is told
            // within 2 s instead, and keeps the item for later itself
            let acked = tokio::time::timeout(Duration::from_secs(2), async {
                let mut publish =
                    jetstream::message::PublishMessage::build().payload(payload.into());
                if let Some(id_of) = self.id_of {
                    publish = publish.message_id(id_of(&item));
                }
                let ack = self
                    .js
                    .send_publish(self.subject.clone(), publish)
                    .await
                    .map_err(unavailable)?;
                Ok::<_, QueueError>(ack.await)
            })
            .await
            .map_err(|_| unavailable("no publish ack within 2 s"))??;
            match acked {
                Ok(_) => {
                    self.ready.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) if e.to_string().contains("maximum messages") => Err(QueueError::Full {
                    queue: self.config.name.clone(),
                    capacity: self.config.capacity,
                }),
                Err(e) => Err(unavailable(e)),
            }
        })
    }
    fn pull(&self) -> BoxFuture<'_, Result<Option<Delivery<T>>, QueueError>> {
        Box::pin(self.pull_one())
    }
}
