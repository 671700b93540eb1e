//! Audit: every decision and transition, published where other systems can read it.
//!
//! Services keep their audit trail in their own records (a deployment's `events`); an
//! [`AuditSink`] also publishes each event. The embedded default only logs; with `NATS_URL` set,
//! [`JetStreamSink`] publishes to a durable JetStream stream, each message carrying a
//! `Nats-Msg-Id` made from the event's identity, so a republish after a restart is dropped by
//! the stream's duplicate window instead of appearing twice.

use std::time::Duration;

use async_nats::jetstream;

use crate::backend::{BackendError, BoxFuture};

/// Where audit events go.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// `log` or `jetstream`.
    fn backend(&self) -> &'static str;
    /// Publishes `payload` under `subject`; `id` identifies the event for deduplication.
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        id: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Answers whether the sink is reachable (`/ready`).
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// Logs events at debug level; the records themselves hold the trail.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSink;

impl AuditSink for LogSink {
    fn backend(&self) -> &'static str {
        "log"
    }
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        id: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        tracing::debug!(%subject, %id, bytes = payload.len(), "audit event");
        Box::pin(std::future::ready(Ok(())))
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: "nats",
        message: e.to_string(),
    }
}

/// Publishes to a JetStream stream with acknowledgement.
#[derive(Debug, Clone)]
pub struct JetStreamSink {
    client: async_nats::Client,
    js: jetstream::Context,
    timeout: Duration,
}

impl JetStreamSink {
    /// Connects to `url` and makes sure stream `stream` exists, capturing `subjects` (e.g.
    /// `deploy.events.>`), on file storage.
    pub async fn connect(url: &str, stream: &str, subjects: &str) -> Result<Self, BackendError> {
        let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
            .await
            .map_err(|_| unavailable("connecting timed out after 5 s"))?
            .map_err(unavailable)?;
        let js = jetstream::new(client.clone());
        js.get_or_create_stream(jetstream::stream::Config {
            name: stream.to_owned(),
            subjects: vec![subjects.to_owned()],
            storage: jetstream::stream::StorageType::File,
            // a publisher that lost its ack (a NATS outage, a crash before it recorded the
            // publish) sends again later: ten minutes of ids catches those repeats
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
        Ok(Self {
            client,
            js,
            timeout: Duration::from_secs(2),
        })
    }
}

impl AuditSink for JetStreamSink {
    fn backend(&self) -> &'static str {
        "jetstream"
    }
    fn publish<'a>(
        &'a self,
        subject: &'a str,
        id: &'a str,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            let publish = async {
                let ack = self
                    .js
                    .publish_with_headers(subject.to_owned(), headers, payload.into())
                    .await
                    .map_err(unavailable)?;
                ack.await.map_err(unavailable)?;
                Ok::<(), BackendError>(())
            };
            tokio::time::timeout(self.timeout, publish)
                .await
                .map_err(|_| unavailable("no publish ack within 2 s"))?
        })
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        let state = self.client.connection_state();
        Box::pin(std::future::ready(match state {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(unavailable(format!("connection is {other:?}"))),
        }))
    }
}
