//! The transactional outbox: events written with the state change that caused them, then
//! relayed to the event stream.
//!
//! A service that changes a record and announces it must not do one without the other: a
//! crash between "stored" and "published" would lose the event, and the reverse would announce
//! something that never happened. So the event is a row of `tai_outbox`, inserted by
//! [`enqueue`] in the same database transaction as the change. The [`OutboxRelay`] then
//! publishes unpublished rows in order to the stream (JetStream, with `Nats-Msg-Id` = the event
//! id, so a repeat is dropped by the stream's duplicate window) and marks them published.
//!
//! Every replica may run a relay: a lease in the state store lets one publish at a time, and
//! should two overlap (a lease that lapsed mid-batch), the message ids still deduplicate. While
//! the stream is unreachable events wait in the table and go out, in order, once it returns.
//! With no stream configured, the table itself is the readable log of events.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;

use crate::audit::AuditSink;
use crate::backend::BackendError;
use crate::clock::SharedClock;
use crate::db::{Database, db_error};

/// Adds an event to the outbox inside the caller's transaction (`conn` is the transaction).
pub async fn enqueue(
    conn: &mut sqlx::AnyConnection,
    event_id: &str,
    subject: &str,
    payload: &[u8],
    now_ms: i64,
) -> Result<(), BackendError> {
    enqueue_many(
        conn,
        &[Outgoing {
            event_id,
            subject,
            payload,
            created_at: now_ms,
        }],
    )
    .await
}

/// An event for [`enqueue_many`].
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Unique: the stream deduplicates by it.
    pub event_id: &'a str,
    /// The stream subject.
    pub subject: &'a str,
    /// The event body.
    pub payload: &'a [u8],
    /// When it was written (unix ms).
    pub created_at: i64,
}

/// Adds several events inside the caller's transaction in one statement (one round trip),
/// in the order given.
pub async fn enqueue_many(
    conn: &mut sqlx::AnyConnection,
    events: &[Outgoing<'_>],
) -> Result<(), BackendError> {
    if events.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO tai_outbox (event_id, subject, payload, created_at) VALUES {}",
        crate::db::values_rows(events.len(), 4)
    );
    let mut q = sqlx::query(&sql);
    for e in events {
        q = q
            .bind(e.event_id)
            .bind(e.subject)
            .bind(e.payload.to_vec())
            .bind(e.created_at);
    }
    // a statement whose length varies with the batch is not worth a cached prepared statement
    q.persistent(events.len() == 1)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(db_error)
}

/// One event as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredEvent {
    /// Position in the outbox: increasing in insertion order, with gaps; on PostgreSQL a
    /// transaction can commit a lower one after a higher one is visible, so a reader that must
    /// see everything reads unpublished rows, not "after the last seq".
    pub seq: i64,
    /// The event's id, unique.
    pub event_id: String,
    /// The stream subject.
    pub subject: String,
    /// The event body.
    pub payload: Vec<u8>,
    /// When it was written (unix ms).
    pub created_at: i64,
    /// When the relay published it (unix ms), if it did.
    pub published_at: Option<i64>,
}

/// Reads events after `after_seq`, oldest first, at most `limit`.
pub async fn read(
    db: &Database,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, BackendError> {
    sqlx::query_as(
        "SELECT seq, event_id, subject, payload, created_at, published_at FROM tai_outbox \
         WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after_seq)
    .bind(limit)
    .fetch_all(db.pool())
    .await
    .map_err(db_error)
}

/// Publishes the outbox to a sink.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    /// The system of record holding the outbox.
    db: Database,
    /// Where events go.
    sink: Arc<dyn AuditSink>,
    /// Stamps `published_at`.
    clock: SharedClock,
    /// Events published per round.
    batch: i64,
}

impl OutboxRelay {
    /// A relay from `db`'s outbox to `sink`.
    pub fn new(db: Database, sink: Arc<dyn AuditSink>, clock: SharedClock) -> Self {
        Self {
            db,
            sink,
            clock,
            batch: 256,
        }
    }

    /// Events not yet published.
    pub async fn pending(&self) -> Result<u64, BackendError> {
        let row = sqlx::query("SELECT COUNT(*) FROM tai_outbox WHERE published_at IS NULL")
            .fetch_one(self.db.pool())
            .await
            .map_err(db_error)?;
        let n: i64 = row.try_get(0).map_err(db_error)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Publishes one batch of unpublished events in order and marks those the sink
    /// acknowledged; answers how many were published. Stops at the first failure, so a later
    /// event is never marked before an earlier one went out.
    pub async fn pass(&self) -> Result<usize, BackendError> {
        let events: Vec<StoredEvent> = sqlx::query_as(
            "SELECT seq, event_id, subject, payload, created_at, published_at FROM tai_outbox \
             WHERE published_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(self.batch)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        if events.is_empty() {
            return Ok(0);
        }
        // send them all before awaiting any ack: one round trip's wait per batch
        let acks = futures_util::future::join_all(events.iter().map(|e| {
            self.sink
                .publish(&e.subject, &e.event_id, e.payload.clone())
        }))
        .await;
        let mut published = Vec::new();
        let mut failure = None;
        for (event, ack) in events.iter().zip(acks) {
            match ack {
                Ok(()) => published.push(event.seq),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if !published.is_empty() {
            let marks: Vec<String> = (0..published.len())
                .map(|i| format!("${}", i + 2))
                .collect();
            let sql = format!(
                "UPDATE tai_outbox SET published_at = $1 WHERE seq IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(self.clock.wall().timestamp_millis());
            for seq in &published {
                q = q.bind(*seq);
            }
            q.execute(self.db.pool()).await.map_err(db_error)?;
        }
        match failure {
            Some(e) if published.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, published = published.len(), "outbox relay stopped at a failed publish");
                Ok(published.len())
            }
            None => Ok(published.len()),
        }
    }

    /// Relays until `shutdown`: while this replica leads (one relay publishes at a time),
    /// publishes batches until the outbox is empty, then looks again every `every`; backs off
    /// after failures.
    pub async fn run(
        self,
        every: Duration,
        leadership: crate::runtime::Leadership,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut backoff = every;
        loop {
            let wait = if leadership.is_leader() {
                match self.pass().await {
                    Ok(n) if n as i64 >= self.batch => Duration::ZERO,
                    Ok(_) => {
                        backoff = every;
                        every
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay could not publish; will retry");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        backoff
                    }
                }
            } else {
                every.max(Duration::from_millis(250))
            };
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {
                    // one last pass, so events written before the stop go out now
                    if leadership.is_leader() {
                        let _ = self.pass().await;
                    }
                    return;
                }
            }
        }
    }
}
