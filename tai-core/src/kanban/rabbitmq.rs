//! The Kanban queue on RabbitMQ: the same contract as the in-process and JetStream queues.
//!
//! Items are persistent JSON messages on a durable classic queue named after the queue:
//!
//! - **bounded**: `x-max-length` = capacity with `x-overflow: reject-publish`, and publisher
//!   confirms on, so a push to a full queue is refused ([`QueueError::Full`]) and a push that
//!   returns `Ok` is on the broker's disk;
//! - **acknowledged by hand**: a delivery not acked within `ack_wait` is handed back to the broker
//!   (and so to the next pull) with its attempt count raised; a process that dies holding
//!   deliveries loses its connection, and the broker hands them out again;
//! - **dead letters**: after `max_deliver` attempts an item is rejected and the broker moves it
//!   to `<name>.dead` instead of letting it loop forever. Attempts are counted in a header: a
//!   nacked item goes back as a copy carrying its count, and so does a copy the broker hands
//!   out again because its worker's connection closed (the broker marks a redelivery with a
//!   flag, not a count), so an item that kills every process holding it still ends dead;
//! - **message ids**: each message carries the id [`RabbitMqQueue::with_ids`] gives it, so a
//!   consumer reading it beside another backend can drop a copy ([`super::FallbackQueue`]).
//!
//! Workers pull with `basic.get`, one item a pull, so nothing waits in this process before a
//! worker asks for it (an empty queue is asked again every 100 ms). The bound counts the items
//! waiting in the queue; items in workers' hands are bounded by the workers. A lost connection
//! is made again on the next push or pull; what was in flight on the old one comes back from
//! the broker.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;

use super::{Acker, Delivery, QueueConfig, QueueDepth, QueueError, QueueStatus, WorkQueue};
use crate::backend::{BackendError, BoxFuture};

fn unavailable(e: impl std::fmt::Display) -> QueueError {
    QueueError::Backend(BackendError::Unavailable {
        backend: "rabbitmq",
        message: e.to_string(),
    })
}

/// How long connecting, declaring or a publish confirm may take before the caller is told.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
/// How long a pull waits before asking an empty queue again.
const IDLE_POLL: Duration = Duration::from_millis(100);

struct Link {
    connection: Connection,
    channel: Channel,
}

/// A bounded work queue on a durable RabbitMQ queue.
pub struct RabbitMqQueue<T> {
    config: QueueConfig,
    /// The broker's queue (its dead letters: `<queue>.dead`).
    queue: String,
    url: String,
    link: Mutex<Option<Arc<Link>>>,
    closed: Arc<AtomicBool>,
    ready: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    dead: Arc<AtomicUsize>,
    id_of: Option<fn(&T) -> String>,
    gauges: Option<super::DepthGauges>,
    _item: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for RabbitMqQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqQueue")
            .field("queue", &self.config.name)
            .finish_non_exhaustive()
    }
}

impl<T> Drop for RabbitMqQueue<T> {
    /// Closes the connection, so that what this process held goes back to the broker now.
    fn drop(&mut self) {
        if let Some(link) = self.link.get_mut().take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = link.connection.close(200, "closing".into()).await;
            });
        }
    }
}

fn queue_arguments(queue: &str, config: &QueueConfig) -> FieldTable {
    // A classic queue: its length limit is exact (a quorum queue's is enforced a moment late,
    // so it lets a publish or two past its bound). Attempts are counted in a header of ours.
    let mut args = FieldTable::default();
    args.insert(
        "x-max-length".into(),
        AMQPValue::LongLongInt(i64::try_from(config.capacity).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead_queue(queue))),
    );
    args
}

/// The header counting the attempts an item had before this copy was published.
const ATTEMPTS: &str = "x-tai-attempts";

/// A nack that puts the item back (`requeue`) or rejects it into the dead-letter queue.
fn nack_options(requeue: bool) -> BasicNackOptions {
    BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    }
}

fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> RabbitMqQueue<T> {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`) and makes sure the broker queue
    /// `queue` and its dead-letter queue exist with `config`'s bound.
    pub async fn connect(url: &str, queue: &str, config: QueueConfig) -> Result<Self, QueueError> {
        let queue = Self {
            config,
            queue: queue.to_owned(),
            url: url.to_owned(),
            link: Mutex::new(None),
            closed: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(AtomicUsize::new(0)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            dead: Arc::new(AtomicUsize::new(0)),
            id_of: None,
            gauges: None,
            _item: PhantomData,
        };
        queue.link().await?;
        Ok(queue)
    }

    /// Gives every message the id `id_of` makes of its item (AMQP `message-id`).
    pub fn with_ids(mut self, id_of: fn(&T) -> String) -> Self {
        self.id_of = Some(id_of);
        self
    }

    /// Exports depth through `family` (see [`crate::kaizen::Kaizen::queue_depth`]).
    pub fn with_gauges(mut self, family: &prometheus::IntGaugeVec) -> Self {
        self.gauges = Some(super::DepthGauges::new(family, &self.config.name, false));
        self
    }

    /// The live connection, made again when the last one broke.
    async fn link(&self) -> Result<Arc<Link>, QueueError> {
        let mut slot = self.link.lock().await;
        if let Some(link) = slot.as_ref()
            && link.connection.status().connected()
            && link.channel.status().connected()
        {
            return Ok(link.clone());
        }
        // what the old connection held comes back from the broker; a connection still up
        // under a broken channel is closed, not left open beside the new one
        if let Some(old) = slot.take()
            && old.connection.status().connected()
        {
            tokio::spawn(async move {
                let _ = old.connection.close(200, "replaced".into()).await;
            });
        }
        let link = tokio::time::timeout(ANSWER_WITHIN, self.open())
            .await
            .map_err(|_| unavailable(format!("no answer within {ANSWER_WITHIN:?}")))??;
        let link = Arc::new(link);
        *slot = Some(link.clone());
        Ok(link)
    }

    async fn open(&self) -> Result<Link, QueueError> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(unavailable)?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable)?;
        channel
            .queue_declare(
                ShortString::from(dead_queue(&self.queue)),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let declared = channel
            .queue_declare(
                ShortString::from(self.queue.clone()),
                QueueDeclareOptions::durable(),
                queue_arguments(&self.queue, &self.config),
            )
            .await
            .map_err(unavailable)?;
        self.ready.store(
            usize::try_from(declared.message_count()).unwrap_or(usize::MAX),
            Ordering::Relaxed,
        );
        Ok(Link {
            connection,
            channel,
        })
    }

    /// Answers whether the broker answers (connecting again if the connection broke), and
    /// refreshes the depth on the way (`/ready`).
    pub async fn ping(&self) -> Result<(), QueueError> {
        self.link().await?;
        self.refresh_depth().await;
        Ok(())
    }

    /// Reads the depth from the broker (the sync `depth()` answers from this cache).
    pub async fn refresh_depth(&self) {
        let Ok(link) = self.link().await else { return };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let (main, dead) = (
            link.channel
                .queue_declare(
                    ShortString::from(self.queue.clone()),
                    passive,
                    FieldTable::default(),
                )
                .await,
            link.channel
                .queue_declare(
                    ShortString::from(dead_queue(&self.queue)),
                    passive,
                    FieldTable::default(),
                )
                .await,
        );
        if let Ok(q) = main {
            self.ready.store(
                usize::try_from(q.message_count()).unwrap_or(usize::MAX),
                Ordering::Relaxed,
            );
        }
        if let Ok(q) = dead {
            self.dead.store(
                usize::try_from(q.message_count()).unwrap_or(usize::MAX),
                Ordering::Relaxed,
            );
        }
        self.show();
    }

    fn show(&self) {
        if let Some(g) = &self.gauges {
            g.set(
                self.ready.load(Ordering::Relaxed),
                self.in_flight.load(Ordering::Relaxed),
            );
        }
    }

    async fn push_one(&self, item: T) -> Result<(), QueueError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(QueueError::Closed(self.config.name.clone()));
        }
        let payload = serde_json::to_vec(&item)
            .map_err(|e| unavailable(format!("cannot encode the item: {e}")))?;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if let Some(id_of) = self.id_of {
            properties = properties.with_message_id(ShortString::from(id_of(&item)));
        }
        let link = self.link().await?;
        if publish(&link.channel, &self.queue, &payload, properties).await? {
            self.ready.fetch_add(1, Ordering::Relaxed);
            self.show();
            Ok(())
        } else {
            // reject-publish: the queue is at its bound
            Err(QueueError::Full {
                queue: self.config.name.clone(),
                capacity: self.config.capacity,
            })
        }
    }

    async fn pull_one(&self) -> Result<Option<Delivery<T>>, QueueError> {
        loop {
            let link = self.link().await?;
            let got = tokio::time::timeout(
                ANSWER_WITHIN,
                link.channel.basic_get(
                    ShortString::from(self.queue.clone()),
                    BasicGetOptions::default(),
                ),
            )
            .await
            .map_err(|_| unavailable(format!("no answer within {ANSWER_WITHIN:?}")))?
            .map_err(unavailable)?;
            let Some(got) = got else {
                self.ready.store(0, Ordering::Relaxed);
                // closed: done once nothing is waiting and nothing in hand can come back
                if self.closed.load(Ordering::SeqCst) && self.in_flight.load(Ordering::Relaxed) == 0
                {
                    self.refresh_depth().await;
                    return Ok(None);
                }
                // an empty queue is asked again after a short wait: a get is a pull, and no
                // delivery sits in this process before a worker asks for it
                tokio::time::sleep(IDLE_POLL.min(self.config.ack_wait)).await;
                continue;
            };
            self.ready.store(
                usize::try_from(got.message_count).unwrap_or(usize::MAX),
                Ordering::Relaxed,
            );
            let message = got.delivery;
            // attempts before this copy (a header of ours, written on each copy)
            let counted = message
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(ATTEMPTS).cloned())
                .and_then(|v| match v {
                    AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
                    AMQPValue::LongInt(n) => u32::try_from(n).ok(),
                    AMQPValue::LongUInt(n) => Some(n),
                    _ => None,
                })
                .unwrap_or(0);
            let mut before = counted;
            if message.redelivered {
                // The broker handed this copy out before and its holder's connection closed
                // (a process that died holding it): that was an attempt. The broker says so
                // with a flag, not a count, so the count goes into a fresh copy, and an item
                // that kills its worker every time still ends as a dead letter.
                before = counted + 1;
                if before >= self.config.max_deliver {
                    tracing::error!(queue = %self.config.name, attempts = before, "a queue item's holders died with it every time; dead-lettered");
                    // Ok(false): the channel is gone and nothing was sent; it comes again
                    let sent = message.acker.nack(nack_options(false)).await;
                    if matches!(sent, Ok(true)) {
                        self.dead.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                let mut headers = message.properties.headers().clone().unwrap_or_default();
                headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(before)));
                let copy = message.properties.clone().with_headers(headers);
                match publish(&link.channel, &self.queue, &message.data, copy).await {
                    Ok(true) => {
                        // the copy is stored: this one goes. Should the ack not reach the
                        // broker, it comes again beside the copy (at least once, as always).
                        let _ = message.acker.ack(BasicAckOptions::default()).await;
                        continue;
                    }
                    Err(e) => {
                        // the channel may be broken: not handed out from it. Put back (or
                        // back anyway when the channel closes), and the next pull connects
                        // again if it must.
                        tracing::warn!(queue = %self.config.name, error = %e, "could not count a redelivery; put back");
                        let _ = message.acker.nack(nack_options(true)).await;
                        tokio::time::sleep(IDLE_POLL).await;
                        continue;
                    }
                    // The queue is full: handed out as it is, its count right this once (it
                    // must not wait for room, or a full queue whose head is this item would
                    // never move). Should its holder die again, it counts from here again.
                    Ok(false) => {}
                }
            }
            let attempt = before + 1;
            match serde_json::from_slice::<T>(&message.data) {
                Ok(item) => {
                    self.in_flight.fetch_add(1, Ordering::Relaxed);
                    self.show();
                    let acker = RabbitAcker::start(
                        Held {
                            link,
                            acker: message.acker,
                            queue: self.queue.clone(),
                            payload: message.data,
                            properties: message.properties,
                            attempt,
                            max_deliver: self.config.max_deliver,
                        },
                        Counts {
                            in_flight: self.in_flight.clone(),
                            ready: self.ready.clone(),
                            dead: self.dead.clone(),
                        },
                        self.config.ack_wait,
                    );
                    return Ok(Some(Delivery::new(item, attempt, Box::new(acker))));
                }
                Err(e) => {
                    // a message no worker can read would loop forever: dead-letter it
                    tracing::error!(queue = %self.config.name, error = %e, "unreadable queue item; dead-lettered");
                    let _ = message.acker.nack(nack_options(false)).await;
                }
            }
        }
    }
}

/// Publishes one persistent message to `queue` and waits for the broker's confirm: `true` when
/// it is stored, `false` when the queue refused it (full).
async fn publish(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<bool, QueueError> {
    let confirmation = tokio::time::timeout(ANSWER_WITHIN, async {
        channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue.to_owned()),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)
    })
    .await
    .map_err(|_| unavailable(format!("no publish confirm within {ANSWER_WITHIN:?}")))??;
    match confirmation {
        Confirmation::Ack(_) => Ok(true),
        Confirmation::Nack(_) => Ok(false),
        Confirmation::NotRequested => Err(unavailable("publisher confirms are off")),
    }
}

/// One delivery in a worker's hands, with what it takes to hand it back.
struct Held {
    link: Arc<Link>,
    acker: lapin::Acker,
    queue: String,
    payload: Vec<u8>,
    properties: BasicProperties,
    attempt: u32,
    max_deliver: u32,
}

#[derive(Clone)]
struct Counts {
    in_flight: Arc<AtomicUsize>,
    ready: Arc<AtomicUsize>,
    dead: Arc<AtomicUsize>,
}

impl Held {
    /// The item was not handled: a dead letter after its last attempt; otherwise a copy
    /// counting this attempt goes to the back of the queue and this one is acked (when the
    /// queue cannot take the copy, the broker puts this one back as it was).
    async fn hand_back(&self, counts: &Counts) -> Result<(), QueueError> {
        if self.attempt >= self.max_deliver {
            tracing::error!(queue = %self.queue, attempts = self.attempt, "giving up on a queue item; dead-lettered");
            let sent = self
                .acker
                .nack(nack_options(false))
                .await
                .map_err(unavailable)?;
            // false: the channel is gone and nothing was sent; the broker hands it out again
            if sent {
                counts.dead.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(self.attempt)),
        );
        let copy = self.properties.clone().with_headers(headers);
        let published = publish(&self.link.channel, &self.queue, &self.payload, copy).await;
        if let Ok(true) = published {
            counts.ready.fetch_add(1, Ordering::Relaxed);
            return self
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(unavailable);
        }
        // refused (full) or not confirmed: the broker puts the original back as it was, so it
        // is never left unacked on a live channel
        let back = self
            .acker
            .nack(nack_options(true))
            .await
            .map(|_| ())
            .map_err(unavailable);
        if back.is_ok() {
            counts.ready.fetch_add(1, Ordering::Relaxed);
        }
        published.and(back)
    }
}

/// Settles one delivery once: by the worker (ack or nack), or by the ack-wait timer handing it
/// back.
struct RabbitAcker {
    held: Arc<Held>,
    settled: Arc<AtomicBool>,
    counts: Counts,
}

impl RabbitAcker {
    fn start(held: Held, counts: Counts, ack_wait: Duration) -> Self {
        let acker = Self {
            held: Arc::new(held),
            settled: Arc::new(AtomicBool::new(false)),
            counts,
        };
        let timer = Self {
            held: acker.held.clone(),
            settled: acker.settled.clone(),
            counts: acker.counts.clone(),
        };
        tokio::spawn(async move {
            tokio::time::sleep(ack_wait).await;
            if timer.settle() {
                tracing::warn!(queue = %timer.held.queue, "a queue item was not acked within its ack wait; handed back");
                if let Err(e) = timer.held.hand_back(&timer.counts).await {
                    // the connection is gone: the broker hands it out again itself
                    tracing::warn!(queue = %timer.held.queue, error = %e, "could not hand an item back");
                }
            }
        });
        acker
    }

    /// Whether this call settled it (and not an earlier one).
    fn settle(&self) -> bool {
        let first = !self.settled.swap(true, Ordering::SeqCst);
        if first {
            self.counts.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        first
    }
}

impl Acker for RabbitAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            if !self.settle() {
                // too late: the item went back after its ack wait and comes again
                return Ok(());
            }
            self.held
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }
    fn nack(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async move {
            if !self.settle() {
                return Ok(());
            }
            self.held.hand_back(&self.counts).await
        })
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> QueueStatus for RabbitMqQueue<T> {
    fn name(&self) -> &str {
        &self.config.name
    }
    fn backend(&self) -> &'static str {
        "rabbitmq"
    }
    fn depth(&self) -> QueueDepth {
        QueueDepth {
            ready: self.ready.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
        }
    }
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> WorkQueue<T> for RabbitMqQueue<T> {
    fn push(&self, item: T) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(self.push_one(item))
    }
    fn pull(&self) -> BoxFuture<'_, Result<Option<Delivery<T>>, QueueError>> {
        Box::pin(self.pull_one())
    }
}
