//! Webhooks: merchants' endpoints, and the delivery of their events, signed, in order, retried.
//!
//! A delivery is a row written with its event ([`crate::events::emit`]), so nothing committed is
//! ever missed and a restart loses nothing: the worker of any replica picks up what is due.
//! Per endpoint only the oldest undelivered event is attempted, so a receiver sees a payment's
//! events in the order they happened; a failed attempt is retried after `WEBHOOK_RETRY_BASE_MS`
//! doubling up to `WEBHOOK_RETRY_MAX_MS`, for `WEBHOOK_RETRY_FOR_SECS` (three days) before the
//! delivery is given up and the next one goes. An endpoint failing for
//! `WEBHOOK_DISABLE_AFTER_SECS` is disabled, with the reason, until re-enabled.
//!
//! Each attempt claims its delivery for the request's time (a compare-and-swap on
//! `locked_until`), so two replicas never send the same delivery at once; a replica that dies
//! mid-request leaves the claim to lapse and the delivery is sent again: receivers dedupe by the
//! event id, which a repeat keeps.
//!
//! Every request is signed the way Stripe signs: `TAI-Signature: t=<unix seconds>,v1=<hex
//! HMAC-SHA256 of "<t>.<body>" with the endpoint's secret>`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::Row;
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::db::{Database, db_error};
use tokio::sync::watch;

/// How deliveries are retried.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The first retry's wait (`WEBHOOK_RETRY_BASE_MS`, one minute).
    pub retry_base: Duration,
    /// The longest wait (`WEBHOOK_RETRY_MAX_MS`, one hour).
    pub retry_max: Duration,
    /// How long a delivery is retried (`WEBHOOK_RETRY_FOR_SECS`, three days).
    pub retry_for: Duration,
    /// How long an endpoint may fail before it is disabled (`WEBHOOK_DISABLE_AFTER_SECS`,
    /// three days).
    pub disable_after: Duration,
    /// One request's time limit (`WEBHOOK_TIMEOUT_MS`, ten seconds).
    pub timeout: Duration,
    /// How often the worker looks for due deliveries (`WEBHOOK_POLL_MS`).
    pub poll: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            retry_for: Duration::from_secs(3 * 86_400),
            disable_after: Duration::from_secs(3 * 86_400),
            timeout: Duration::from_secs(10),
            poll: Duration::from_millis(250),
        }
    }
}

impl WebhookConfig {
    /// The wait after the `failures`-th failed attempt.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
        self.retry_base
            .checked_mul(factor)
            .unwrap_or(self.retry_max)
            .min(self.retry_max)
    }
}

/// An endpoint, as shown (never its secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Endpoint {
    /// `we_…`.
    pub id: String,
    /// Whose events it receives.
    pub merchant_id: String,
    /// Where they are POSTed.
    pub url: String,
    /// The event types it receives (`["*"]` for all).
    pub enabled_events: Vec<String>,
    /// `enabled` or `disabled`.
    pub status: String,
    /// Why it was disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Since when its deliveries fail, while they do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was registered.
    pub created: DateTime<Utc>,
}

/// Signs `body` at `t` (unix seconds) with `secret`: the `TAI-Signature` header's value.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn ms_to_time(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Endpoints and deliveries of one database.
#[derive(Debug, Clone)]
pub struct Webhooks {
    db: Database,
    clock: SharedClock,
    config: WebhookConfig,
    client: reqwest::Client,
}

const ENDPOINT_COLUMNS: &str = "endpoint_id, merchant_id, url, event_types, status, disabled_reason, failing_since, created_at";

fn endpoint(r: &sqlx::any::AnyRow) -> Result<Endpoint, BackendError> {
    let types: String = r.try_get(3).map_err(db_error)?;
    Ok(Endpoint {
        id: r.try_get(0).map_err(db_error)?,
        merchant_id: r.try_get(1).map_err(db_error)?,
        url: r.try_get(2).map_err(db_error)?,
        enabled_events: serde_json::from_str(&types).unwrap_or_default(),
        status: r.try_get(4).map_err(db_error)?,
        disabled_reason: r.try_get(5).map_err(db_error)?,
        failing_since: ms_to_time(r.try_get(6).map_err(db_error)?),
        created: ms_to_time(Some(r.try_get(7).map_err(db_error)?)).unwrap_or_default(),
    })
}

/// One due delivery, as the worker sends it.
#[derive(Debug, sqlx::FromRow)]
struct Due {
    seq: i64,
    endpoint_id: String,
    event_id: String,
    attempts: i64,
    created_at: i64,
    url: String,
    secret: String,
    payload: String,
}

impl Webhooks {
    /// Webhooks in `db`, retried as `config` says.
    pub fn new(
        db: Database,
        clock: SharedClock,
        config: WebhookConfig,
    ) -> Result<Self, BackendError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| BackendError::Unavailable {
                backend: "webhooks",
                message: e.to_string(),
            })?;
        Ok(Self {
            db,
            clock,
            config,
            client,
        })
    }

    fn now(&self) -> i64 {
        self.clock.wall().timestamp_millis()
    }

    /// Registers an endpoint; answers it and its signing secret (shown this once).
    pub async fn create(
        &self,
        merchant: &str,
        url: &str,
        types: &[String],
    ) -> Result<(Endpoint, String), BackendError> {
        let id = format!("we_{}", uuid::Uuid::new_v4().simple());
        let secret = format!("whsec_{}", hex::encode(rand::random::<[u8; 24]>()));
        let all = types.iter().any(|t| t == "*");
        let now = self.now();
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (endpoint_id, merchant_id, url, event_types, all_events, secret, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'enabled', $7, $7)",
        )
        .bind(&id)
        .bind(merchant)
        .bind(url)
        .bind(serde_json::to_string(types).unwrap_or_else(|_| "[]".into()))
        .bind(i64::from(all))
        .bind(&secret)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if !all {
            for t in types {
                sqlx::query(
                    "INSERT INTO webhook_endpoint_events (endpoint_id, event_type) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                )
                .bind(&id)
                .bind(t)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)?;
        let shown = self.get(&id).await?.ok_or_else(|| BackendError::Protocol {
            backend: "database",
            message: "endpoint vanished after it was written".into(),
        })?;
        Ok((shown, secret))
    }

    /// An endpoint by id.
    pub async fn get(&self, id: &str) -> Result<Option<Endpoint>, BackendError> {
        let row = sqlx::query(&format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE endpoint_id = $1"
        ))
        .bind(id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)?;
        row.as_ref().map(endpoint).transpose()
    }

    /// A merchant's endpoints (every merchant's when `None`), oldest first.
    pub async fn list(&self, merchant: Option<&str>) -> Result<Vec<Endpoint>, BackendError> {
        let rows = match merchant {
            Some(m) => sqlx::query(&format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE merchant_id = $1 ORDER BY created_at, endpoint_id"
            ))
            .bind(m)
            .fetch_all(self.db.pool())
            .await,
            None => sqlx::query(&format!(
                "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY created_at, endpoint_id LIMIT 1000"
            ))
            .fetch_all(self.db.pool())
            .await,
        }
        .map_err(db_error)?;
        rows.iter().map(endpoint).collect()
    }

    /// Removes an endpoint and its deliveries; answers whether it existed.
    pub async fn delete(&self, id: &str) -> Result<bool, BackendError> {
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        let gone = sqlx::query("DELETE FROM webhook_endpoints WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected()
            == 1;
        for sql in [
            "DELETE FROM webhook_endpoint_events WHERE endpoint_id = $1",
            "DELETE FROM webhook_attempts WHERE delivery_seq IN (SELECT seq FROM webhook_deliveries WHERE endpoint_id = $1)",
            "DELETE FROM webhook_deliveries WHERE endpoint_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(gone)
    }

    /// Enables an endpoint again (its pending deliveries resume at once).
    pub async fn enable(&self, id: &str) -> Result<(), BackendError> {
        let now = self.now();
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        sqlx::query(
            "UPDATE webhook_endpoints SET status = 'enabled', disabled_reason = NULL, failing_since = NULL, updated_at = $1 WHERE endpoint_id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = $1 WHERE endpoint_id = $2 AND status = 'pending'",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    /// One page of an endpoint's deliveries, oldest first, after delivery `after` (its
    /// number), each with its attempts.
    pub async fn deliveries(
        &self,
        endpoint: &str,
        after: i64,
        limit: i64,
    ) -> Result<(Vec<Value>, bool), BackendError> {
        let rows = sqlx::query(
            "SELECT seq, event_id, event_type, status, attempts, next_attempt_at, delivered_at, last_status, last_error, created_at \
             FROM webhook_deliveries WHERE endpoint_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(endpoint)
        .bind(after)
        .bind(limit + 1)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        let more = rows.len() as i64 > limit;
        let mut page = Vec::new();
        for r in rows.iter().take(usize::try_from(limit).unwrap_or(0)) {
            let seq: i64 = r.try_get(0).map_err(db_error)?;
            let status: String = r.try_get(3).map_err(db_error)?;
            let attempts = sqlx::query(
                "SELECT attempt, at, http_status, error, duration_ms FROM webhook_attempts WHERE delivery_seq = $1 ORDER BY attempt",
            )
            .bind(seq)
            .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
            let mut log = Vec::new();
            for a in &attempts {
                log.push(json!({
                    "attempt": a.try_get::<i64, _>(0).map_err(db_error)?,
                    "at": ms_to_time(Some(a.try_get(1).map_err(db_error)?)),
                    "http_status": a.try_get::<Option<i64>, _>(2).map_err(db_error)?,
                    "error": a.try_get::<Option<String>, _>(3).map_err(db_error)?,
                    "duration_ms": a.try_get::<i64, _>(4).map_err(db_error)?,
                }));
            }
            page.push(json!({
                "id": format!("whd_{seq}"),
                "event_id": r.try_get::<String, _>(1).map_err(db_error)?,
                "event_type": r.try_get::<String, _>(2).map_err(db_error)?,
                "status": status,
                "attempts": r.try_get::<i64, _>(4).map_err(db_error)?,
                "next_attempt_at": (status == "pending").then(|| r.try_get::<i64, _>(5).ok().and_then(|t| ms_to_time(Some(t)))).flatten(),
                "delivered_at": ms_to_time(r.try_get(6).map_err(db_error)?),
                "last_http_status": r.try_get::<Option<i64>, _>(7).map_err(db_error)?,
                "last_error": r.try_get::<Option<String>, _>(8).map_err(db_error)?,
                "created": ms_to_time(Some(r.try_get(9).map_err(db_error)?)),
                "attempt_log": log,
            }));
        }
        Ok((page, more))
    }

    /// Deliveries not yet delivered nor given up, every endpoint (for `/status`).
    pub async fn backlog(&self) -> Result<i64, BackendError> {
        let row = sqlx::query("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'")
            .fetch_one(self.db.pool())
            .await
            .map_err(db_error)?;
        row.try_get(0).map_err(db_error)
    }

    async fn due(&self, limit: i64) -> Result<Vec<Due>, BackendError> {
        sqlx::query_as(
            "SELECT d.seq, d.endpoint_id, d.event_id, d.attempts, d.created_at, w.url, w.secret, p.payload \
             FROM webhook_deliveries d \
             JOIN webhook_endpoints w ON w.endpoint_id = d.endpoint_id \
             JOIN payment_events p ON p.event_id = d.event_id \
             WHERE d.status = 'pending' AND w.status = 'enabled' AND d.next_attempt_at <= $1 \
             AND (d.locked_until IS NULL OR d.locked_until <= $1) \
             AND d.seq = (SELECT MIN(d2.seq) FROM webhook_deliveries d2 WHERE d2.endpoint_id = d.endpoint_id AND d2.status = 'pending') \
             ORDER BY d.seq LIMIT $2",
        )
        .bind(self.now())
        .bind(limit)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)
    }

    /// Claims a delivery for one attempt; answers false when another worker has it, or
    /// tried it since it was read (its attempt count moved on, its next try is later).
    async fn claim(&self, due: &Due) -> Result<bool, BackendError> {
        let now = self.now();
        let r = sqlx::query(
            "UPDATE webhook_deliveries SET locked_until = $1 WHERE seq = $2 AND status = 'pending' \
             AND (locked_until IS NULL OR locked_until <= $3) AND next_attempt_at <= $3 AND attempts = $4",
        )
        .bind(now + millis(self.config.timeout) + 5000)
        .bind(due.seq)
        .bind(now)
        .bind(due.attempts)
        .execute(self.db.pool())
        .await
        .map_err(db_error)?;
        Ok(r.rows_affected() == 1)
    }

    /// Sends one delivery and records the attempt.
    async fn attempt(&self, due: Due) -> Result<bool, BackendError> {
        let t = self.clock.wall().timestamp();
        let signature = sign(&due.secret, t, due.payload.as_bytes());
        let started = Instant::now();
        let sent = self
            .client
            .post(&due.url)
            .header("content-type", "application/json")
            .header("TAI-Signature", signature)
            .header("TAI-Event-Id", &due.event_id)
            .header("TAI-Delivery-Attempt", (due.attempts + 1).to_string())
            .body(due.payload.clone())
            .header("traceparent", tai_core::runtime::trace::outbound())
            .send()
            .await;
        let took = millis(started.elapsed());
        let (ok, status, error) = match sent {
            Ok(r) if r.status().is_success() => (true, Some(i64::from(r.status().as_u16())), None),
            Ok(r) => (
                false,
                Some(i64::from(r.status().as_u16())),
                Some(format!("answered {}", r.status())),
            ),
            Err(e) if e.is_timeout() => (false, None, Some("timed out".to_owned())),
            Err(e) => (false, None, Some(format!("could not connect: {e}"))),
        };
        let now = self.now();
        let attempt = due.attempts + 1;
        let give_up = !ok && now - due.created_at >= millis(self.config.retry_for);
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        // recorded only if no other worker recorded an attempt meanwhile (this one's claim
        // lapsed and it was tried again): theirs stands, so a success is never undone
        let recorded = if ok {
            sqlx::query(
                "UPDATE webhook_deliveries SET status = 'succeeded', attempts = $1, delivered_at = $2, locked_until = NULL, \
                 last_status = $3, last_error = NULL WHERE seq = $4 AND status = 'pending' AND attempts = $5",
            )
            .bind(attempt)
            .bind(now)
            .bind(status)
            .bind(due.seq)
            .bind(due.attempts)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
        } else {
            let wait = self
                .config
                .backoff(u32::try_from(attempt).unwrap_or(u32::MAX));
            sqlx::query(
                "UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = $3, locked_until = NULL, \
                 last_status = $4, last_error = $5 WHERE seq = $6 AND status = 'pending' AND attempts = $7",
            )
            .bind(if give_up { "failed" } else { "pending" })
            .bind(attempt)
            .bind(now + millis(wait))
            .bind(status)
            .bind(error.as_deref())
            .bind(due.seq)
            .bind(due.attempts)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
        };
        if recorded.rows_affected() != 1 {
            tx.rollback().await.map_err(db_error)?;
            return Ok(ok);
        }
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_seq, attempt, at, http_status, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT DO NOTHING",
        )
        .bind(due.seq)
        .bind(attempt)
        .bind(now)
        .bind(status)
        .bind(error.as_deref())
        .bind(took)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if ok {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = NULL WHERE endpoint_id = $1 AND failing_since IS NOT NULL",
            )
            .bind(&due.endpoint_id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        } else {
            sqlx::query(
                "UPDATE webhook_endpoints SET failing_since = $1 WHERE endpoint_id = $2 AND failing_since IS NULL",
            )
            .bind(now)
            .bind(&due.endpoint_id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            let reason = format!(
                "deliveries failed for {} s or more (last: {})",
                self.config.disable_after.as_secs(),
                error.as_deref().unwrap_or("?")
            );
            let disabled = sqlx::query(
                "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $1, updated_at = $2 \
                 WHERE endpoint_id = $3 AND status = 'enabled' AND failing_since <= $4",
            )
            .bind(&reason)
            .bind(now)
            .bind(&due.endpoint_id)
            .bind(now - millis(self.config.disable_after))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            if disabled.rows_affected() == 1 {
                tracing::error!(endpoint_id = %due.endpoint_id, %reason, "webhook endpoint disabled");
            } else {
                tracing::warn!(endpoint_id = %due.endpoint_id, event_id = %due.event_id, attempt, error = error.as_deref().unwrap_or("?"), give_up, "webhook delivery failed");
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(ok)
    }

    /// Sends what is due, one delivery per endpoint at a time; answers how many were sent.
    pub async fn round(&self) -> Result<usize, BackendError> {
        let due = self.due(64).await?;
        let mut claimed = Vec::with_capacity(due.len());
        for d in due {
            if self.claim(&d).await? {
                claimed.push(d);
            }
        }
        let n = claimed.len();
        let results =
            futures_util::future::join_all(claimed.into_iter().map(|d| self.attempt(d))).await;
        for r in results {
            if let Err(e) = r {
                // the claim lapses and the delivery is tried again
                tracing::warn!(error = %e, "could not record a webhook attempt");
            }
        }
        Ok(n)
    }

    /// Delivers until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let wait = match self.round().await {
                Ok(n) if n > 0 => Duration::ZERO,
                Ok(_) => self.config.poll,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook round failed; will try again");
                    self.config.poll.max(Duration::from_secs(1))
                }
            };
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
