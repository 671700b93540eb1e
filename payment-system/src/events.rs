//! Events: every state change of a payment or a refund, as merchants read them.
//!
//! An event is written by [`emit`] inside the transaction that makes the change, three times
//! over: a row of `payment_events` (the merchant's readable log, `GET /events`), a row of the
//! outbox (relayed to the `PAYMENTS_EVENTS` stream when NATS is configured) and one webhook
//! delivery per endpoint of the merchant that asked for its type ([`crate::webhooks`]). So an
//! event exists exactly when its change does, and a receiver gets every one.
//!
//! Ids are derived from the object and the event type (`evt_<object>_<type>`): a change that
//! is announced twice (a retried transaction) is refused by the unique index instead of
//! doubling the event, and duplicates a receiver sees (a delivery retried after a crash) carry
//! the same id.

use sqlx::Row;
use tai_core::backend::BackendError;
use tai_core::db::{Database, db_error};

/// The payment-events tables (`payment_events` and the webhook tables are created together,
/// version 1005 of the payment schema; see [`crate::ledger::SCHEMA`]).
pub(crate) const SQLITE: &str = "
    CREATE TABLE IF NOT EXISTS payment_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        merchant_id TEXT NOT NULL,
        type TEXT NOT NULL,
        object_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS webhook_deliveries (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        endpoint_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_attempt_at BIGINT NOT NULL,
        locked_until BIGINT,
        created_at BIGINT NOT NULL,
        delivered_at BIGINT,
        last_status BIGINT,
        last_error TEXT,
        UNIQUE (endpoint_id, event_id)
    );
";

/// The same for PostgreSQL.
pub(crate) const POSTGRES: &str = "
    CREATE TABLE IF NOT EXISTS payment_events (
        seq BIGSERIAL PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        merchant_id TEXT NOT NULL,
        type TEXT NOT NULL,
        object_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS webhook_deliveries (
        seq BIGSERIAL PRIMARY KEY,
        endpoint_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_attempt_at BIGINT NOT NULL,
        locked_until BIGINT,
        created_at BIGINT NOT NULL,
        delivered_at BIGINT,
        last_status BIGINT,
        last_error TEXT,
        UNIQUE (endpoint_id, event_id)
    );
";

/// Indexes and the tables both engines write alike.
pub(crate) const COMMON: &str = "
    CREATE INDEX IF NOT EXISTS payment_events_merchant ON payment_events (merchant_id, seq);
    CREATE INDEX IF NOT EXISTS payment_events_object ON payment_events (object_id, seq);
    CREATE TABLE IF NOT EXISTS webhook_endpoints (
        endpoint_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event_types TEXT NOT NULL,
        all_events BIGINT NOT NULL,
        secret TEXT NOT NULL,
        status TEXT NOT NULL,
        disabled_reason TEXT,
        failing_since BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS webhook_endpoints_merchant ON webhook_endpoints (merchant_id, created_at);
    CREATE TABLE IF NOT EXISTS webhook_endpoint_events (
        endpoint_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        PRIMARY KEY (endpoint_id, event_type)
    );
    CREATE INDEX IF NOT EXISTS webhook_deliveries_pending ON webhook_deliveries (endpoint_id, seq)
        WHERE status = 'pending';
    CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq);
    CREATE TABLE IF NOT EXISTS webhook_attempts (
        delivery_seq BIGINT NOT NULL,
        attempt BIGINT NOT NULL,
        at BIGINT NOT NULL,
        http_status BIGINT,
        error TEXT,
        duration_ms BIGINT NOT NULL,
        PRIMARY KEY (delivery_seq, attempt)
    );
";

/// Every event type, for `POST /webhook_endpoints` to check names against.
pub const TYPES: &[&str] = &[
    "payment.succeeded",
    "payment.failed",
    "payment.fraud_blocked",
    "payment.reversed",
    "payment.authorized",
    "payment.captured",
    "payment.voided",
    "payment.requires_review",
    "refund.created",
    "refund.succeeded",
    "refund.failed",
];

/// What [`emit`] writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewEvent<'a> {
    /// e.g. `payment.captured`.
    pub kind: &'a str,
    /// The payment or refund it is about.
    pub object_id: &'a str,
    /// Whose.
    pub merchant_id: &'a str,
    /// The stream subject prefix.
    pub subject_prefix: &'a str,
    /// Now, unix ms.
    pub now: i64,
}

/// The id of the `kind` event of `object`.
pub fn event_id(object: &str, kind: &str) -> String {
    format!("evt_{object}_{}", kind.replace('.', "_"))
}

/// Writes an event inside the caller's transaction: the merchant's log, the outbox, and one
/// webhook delivery per endpoint that asked for it (a disabled endpoint's wait until it is
/// enabled again).
pub(crate) async fn emit(
    conn: &mut sqlx::AnyConnection,
    e: NewEvent<'_>,
    data: serde_json::Value,
) -> Result<(), BackendError> {
    emit_many(conn, &[(e, data)]).await
}

/// [`emit`] for several events at once, in three statements whatever their number (a group of
/// payments settled in one transaction; see [`crate::ledger`]).
pub(crate) async fn emit_many(
    conn: &mut sqlx::AnyConnection,
    events: &[(NewEvent<'_>, serde_json::Value)],
) -> Result<(), BackendError> {
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<(String, String, String)> = events
        .iter()
        .map(|(e, data)| {
            let id = event_id(e.object_id, e.kind);
            let payload = serde_json::json!({
                "id": id,
                "type": e.kind,
                "created": e.now,
                "data": data,
            })
            .to_string();
            let subject = format!("{}.{}", e.subject_prefix, e.kind);
            (id, payload, subject)
        })
        .collect();
    let one = events.len() == 1;
    let sql = format!(
        "INSERT INTO payment_events (event_id, merchant_id, type, object_id, created_at, payload) VALUES {}",
        tai_core::db::values_rows(events.len(), 6)
    );
    let mut q = sqlx::query(&sql);
    for ((e, _), (id, payload, _)) in events.iter().zip(&rows) {
        q = q
            .bind(id.as_str())
            .bind(e.merchant_id)
            .bind(e.kind)
            .bind(e.object_id)
            .bind(e.now)
            .bind(payload.as_str());
    }
    q.persistent(one)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    let outgoing: Vec<tai_core::outbox::Outgoing<'_>> = events
        .iter()
        .zip(&rows)
        .map(
            |((e, _), (id, payload, subject))| tai_core::outbox::Outgoing {
                event_id: id,
                subject,
                payload: payload.as_bytes(),
                created_at: e.now,
            },
        )
        .collect();
    tai_core::outbox::enqueue_many(conn, &outgoing).await?;
    // the events just written, joined with the endpoints that asked for them, in event order
    let ids: Vec<String> = (1..=rows.len()).map(|n| format!("${n}")).collect();
    let sql = format!(
        "INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, status, attempts, next_attempt_at, created_at) \
         SELECT w.endpoint_id, e.event_id, e.type, 'pending', 0, e.created_at, e.created_at \
         FROM payment_events e JOIN webhook_endpoints w ON w.merchant_id = e.merchant_id \
         WHERE e.event_id IN ({}) AND (w.all_events = 1 OR EXISTS \
         (SELECT 1 FROM webhook_endpoint_events t WHERE t.endpoint_id = w.endpoint_id AND t.event_type = e.type)) \
         ORDER BY e.seq, w.endpoint_id",
        ids.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for (id, _, _) in &rows {
        q = q.bind(id.as_str());
    }
    q.persistent(one)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(db_error)
}

/// One page of a merchant's events, oldest first, after the event `starting_after` (an id);
/// answers the events and whether more follow.
pub async fn list(
    db: &Database,
    merchant: &str,
    kind: Option<&str>,
    object: Option<&str>,
    starting_after: Option<&str>,
    limit: i64,
) -> Result<Option<(Vec<serde_json::Value>, bool)>, BackendError> {
    let after = match starting_after {
        None => 0,
        Some(id) => {
            let row = sqlx::query(
                "SELECT seq FROM payment_events WHERE event_id = $1 AND merchant_id = $2",
            )
            .bind(id)
            .bind(merchant)
            .fetch_optional(db.pool())
            .await
            .map_err(db_error)?;
            match row {
                Some(r) => r.try_get::<i64, _>(0).map_err(db_error)?,
                None => return Ok(None),
            }
        }
    };
    let mut sql =
        String::from("SELECT payload FROM payment_events WHERE merchant_id = $1 AND seq > $2");
    let mut n = 2;
    if kind.is_some() {
        n += 1;
        sql.push_str(&format!(" AND type = ${n}"));
    }
    if object.is_some() {
        n += 1;
        sql.push_str(&format!(" AND object_id = ${n}"));
    }
    sql.push_str(&format!(" ORDER BY seq LIMIT ${}", n + 1));
    let mut q = sqlx::query(&sql).bind(merchant).bind(after);
    if let Some(k) = kind {
        q = q.bind(k);
    }
    if let Some(o) = object {
        q = q.bind(o);
    }
    let rows = q
        .bind(limit + 1)
        .fetch_all(db.pool())
        .await
        .map_err(db_error)?;
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        let text: String = r.try_get(0).map_err(db_error)?;
        events.push(
            serde_json::from_str(&text).map_err(|e| BackendError::Protocol {
                backend: "database",
                message: format!("event payload: {e}"),
            })?,
        );
    }
    let more = events.len() as i64 > limit;
    events.truncate(usize::try_from(limit).unwrap_or(0));
    Ok(Some((events, more)))
}
