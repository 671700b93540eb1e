//! The system of record for payments: payments, their idempotency keys and their events, in
//! one database (SQLite by default, PostgreSQL for replicas).
//!
//! Every change of a payment is one transaction that also moves its idempotency key and, for
//! an outcome, adds its event to the outbox (`tai_core::outbox`), so a crash at any point leaves
//! a state that a retry or the reconciler can finish, and the event stream never misses or
//! invents an outcome:
//!
//! - [`Ledger::record_final`]: an outcome decided without the gateway (fraud block, breaker
//!   open): the payment, the key's answer and the event together;
//! - [`Ledger::begin_charge`]: the intent, before the gateway is called: the `PROCESSING`
//!   payment and the key's `charge_started` recovery point together;
//! - [`Ledger::settle`]: the outcome of a charge: a compare-and-swap on the payment's version
//!   (so the live request and the reconciler cannot both settle it), the key's answer and the
//!   event together.
//!
//! Under load, intents and settlements from concurrent requests are written in groups: one
//! transaction and a handful of multi-row statements for up to [`group::MAX`] payments
//! ([`group`]), each payment's guarantees as if it were written alone.

use std::time::Duration;

use tokio::sync::mpsc;

use sqlx::Row;
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::db::{Database, SchemaChange, db_error};

use crate::idempotency::{Guard, Idempotency};
use crate::record::{PaymentRecord, PaymentStatus};

mod group;

/// The payment service's tables (versions 1001 and up; tai-core's own are below 1000).
pub const SCHEMA: &[SchemaChange] = &[
    SchemaChange {
        version: 1001,
        description: "payments, idempotency keys",
        sqlite: SCHEMA_V1,
        postgres: SCHEMA_V1,
    },
    SchemaChange {
        version: 1002,
        description: "payments failed as not found are looked up again until recheck_until",
        sqlite: SCHEMA_V2,
        postgres: SCHEMA_V2,
    },
    SchemaChange {
        version: 1003,
        description: "idempotency claims carry the token of the request holding them",
        sqlite: "ALTER TABLE idempotency_keys ADD COLUMN claim_token TEXT;",
        postgres: "ALTER TABLE idempotency_keys ADD COLUMN claim_token TEXT;",
    },
    SchemaChange {
        version: 1004,
        description: "a PROCESSING payment looked at without result waits its turn",
        sqlite: "ALTER TABLE payments ADD COLUMN next_check_at BIGINT;",
        postgres: "ALTER TABLE payments ADD COLUMN next_check_at BIGINT;",
    },
    SchemaChange {
        version: 1005,
        description: "payment events, webhook deliveries",
        sqlite: crate::events::SQLITE,
        postgres: crate::events::POSTGRES,
    },
    SchemaChange {
        version: 1006,
        description: "event and webhook indexes, webhook endpoints and attempts",
        sqlite: crate::events::COMMON,
        postgres: crate::events::COMMON,
    },
    SchemaChange {
        version: 1007,
        description: "the payment lifecycle: expiring holds, captures and voids under way, refunds, listing",
        sqlite: SCHEMA_LIFECYCLE,
        postgres: SCHEMA_LIFECYCLE,
    },
];

const SCHEMA_LIFECYCLE: &str = "
    ALTER TABLE payments ADD COLUMN expires_at BIGINT;
    ALTER TABLE payments ADD COLUMN op TEXT;
    CREATE INDEX IF NOT EXISTS payments_expiring ON payments (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX IF NOT EXISTS payments_op ON payments (updated_at) WHERE op IS NOT NULL;
    CREATE INDEX IF NOT EXISTS payments_review ON payments (created_at, transaction_id)
        WHERE status = 'REQUIRES_REVIEW';
    CREATE INDEX IF NOT EXISTS payments_merchant_list ON payments (merchant_id, created_at, transaction_id);
    CREATE INDEX IF NOT EXISTS payments_merchant_customer ON payments (merchant_id, customer_id, created_at);
    CREATE TABLE IF NOT EXISTS refunds (
        refund_id TEXT PRIMARY KEY,
        transaction_id TEXT NOT NULL,
        merchant_id TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        idempotency_key TEXT,
        fingerprint TEXT,
        gateway_refund_id TEXT,
        failure TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS refunds_payment ON refunds (transaction_id, created_at);
    CREATE UNIQUE INDEX IF NOT EXISTS refunds_key ON refunds (merchant_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX IF NOT EXISTS refunds_pending ON refunds (updated_at) WHERE status = 'PENDING';
";

const SCHEMA_V2: &str = "
    ALTER TABLE payments ADD COLUMN recheck_until BIGINT;
    CREATE INDEX IF NOT EXISTS payments_recheck ON payments (updated_at) WHERE recheck_until IS NOT NULL;
";

const SCHEMA_V1: &str = "
    CREATE TABLE IF NOT EXISTS payments (
        transaction_id TEXT PRIMARY KEY,
        merchant_id TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        status TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        version BIGINT NOT NULL,
        confirmed_at BIGINT,
        record TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS payments_merchant_created ON payments (merchant_id, created_at);
    CREATE INDEX IF NOT EXISTS payments_processing ON payments (updated_at) WHERE status = 'PROCESSING';
    CREATE INDEX IF NOT EXISTS payments_unconfirmed ON payments (updated_at)
        WHERE status = 'SUCCESS' AND confirmed_at IS NULL;
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        merchant_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        recovery_point TEXT NOT NULL,
        locked_at BIGINT,
        transaction_id TEXT,
        response_status BIGINT,
        response_body TEXT,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (merchant_id, idempotency_key)
    );
    CREATE INDEX IF NOT EXISTS idempotency_keys_expires ON idempotency_keys (expires_at);
";

/// The default subject prefix of payment events on the stream
/// (`payments.events.payment.succeeded`); `EVENTS_SUBJECT_PREFIX` changes it.
pub const EVENT_SUBJECT_PREFIX: &str = "payments.events";

/// The event a final status announces.
pub fn event_type(status: PaymentStatus) -> Option<&'static str> {
    match status {
        PaymentStatus::Success => Some("payment.succeeded"),
        PaymentStatus::Failed => Some("payment.failed"),
        PaymentStatus::FraudBlocked => Some("payment.fraud_blocked"),
        PaymentStatus::Reversed => Some("payment.reversed"),
        PaymentStatus::Authorized => Some("payment.authorized"),
        PaymentStatus::Voided => Some("payment.voided"),
        PaymentStatus::RequiresReview => Some("payment.requires_review"),
        PaymentStatus::Processing => None,
    }
}

/// What a transition announces.
#[derive(Debug, Clone, Copy)]
enum Announce<'a> {
    /// The outcome of a payment request: its idempotent answer and its status's event.
    Outcome,
    /// A later change (capture, void, review): this event, if any; the key's answer stays.
    Event(Option<&'a str>),
}

/// What `GET /payments` asks for.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Whose payments.
    pub merchant_id: String,
    /// Only this status.
    pub status: Option<PaymentStatus>,
    /// Only this customer's.
    pub customer_id: Option<String>,
    /// Created at or after (unix ms).
    pub created_gte: Option<i64>,
    /// Created before (unix ms).
    pub created_lt: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// Payments in the system of record.
#[derive(Debug, Clone)]
pub struct Ledger {
    db: Database,
    clock: SharedClock,
    idempotency: Idempotency,
    subject_prefix: String,
    authorization_ttl: chrono::Duration,
    review_ttl: chrono::Duration,
    /// To the task writing intents and settlements in groups; `None` in that task itself.
    group: Option<mpsc::Sender<group::Job>>,
    /// The most payments one group has written so far.
    largest_group: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn corrupt(id: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Protocol {
        backend: "database",
        message: format!("payment {id}: {e}"),
    }
}

/// `INSERT INTO payments` of `rows` payments (bound by [`Ledger::bind_payments`]), then `tail`.
fn payment_rows(rows: usize, tail: &str) -> String {
    format!(
        "INSERT INTO payments (transaction_id, merchant_id, customer_id, status, amount, currency, \
         created_at, updated_at, version, record, expires_at, op) VALUES {} {tail}",
        tai_core::db::values_rows(rows, 12)
    )
}

/// When a payment's hold lapses, as stored: a capture or void under way has its own expiry
/// (the reconciler finishes it first).
fn hold_expiry(record: &PaymentRecord) -> Option<i64> {
    record
        .expires_at
        .filter(|_| record.pending.is_none())
        .map(|t| t.timestamp_millis())
}

fn status_from(s: &str) -> Option<PaymentStatus> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// A payment as read, with the version a transition must name.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The record (status and confirmation from their columns).
    pub record: PaymentRecord,
    /// Its version.
    pub version: i64,
    /// When it last changed (unix ms): for a `PROCESSING` payment, when its intent was written.
    pub updated_at: i64,
}

impl Ledger {
    /// The ledger in `db`, applying the payment tables if missing; events go out under
    /// `subject_prefix`.
    pub async fn open(
        db: Database,
        clock: SharedClock,
        idempotency: Idempotency,
        subject_prefix: &str,
    ) -> Result<Self, BackendError> {
        db.migrate(SCHEMA).await?;
        let mut ledger = Self {
            db,
            clock,
            idempotency,
            subject_prefix: subject_prefix.to_owned(),
            authorization_ttl: chrono::Duration::days(7),
            review_ttl: chrono::Duration::days(3),
            group: None,
            largest_group: Default::default(),
        };
        // the writer keeps what it writes with (database, clock, keys, subject prefix), none of
        // which changes after this; it ends when the last handle to it is dropped
        let (tx, rx) = mpsc::channel(group::MAX * 4);
        tokio::spawn(group::write(ledger.clone(), rx));
        ledger.group = Some(tx);
        Ok(ledger)
    }

    /// How long an authorization and a review hold last (`AUTHORIZATION_TTL_SECS`,
    /// `REVIEW_TTL_SECS`).
    pub fn with_holds(mut self, authorization: Duration, review: Duration) -> Self {
        self.authorization_ttl =
            chrono::Duration::from_std(authorization).unwrap_or(chrono::Duration::days(7));
        self.review_ttl = chrono::Duration::from_std(review).unwrap_or(chrono::Duration::days(3));
        self
    }

    /// Fills what a status implies: when an authorization or a review hold lapses, and what a
    /// success captured.
    pub fn stamp(&self, record: &mut PaymentRecord) {
        let now = self.clock.wall();
        match record.status {
            PaymentStatus::Authorized => {
                record
                    .expires_at
                    .get_or_insert(now + self.authorization_ttl);
            }
            PaymentStatus::RequiresReview => {
                record.expires_at.get_or_insert(now + self.review_ttl);
            }
            PaymentStatus::Success => {
                record.expires_at = None;
                record.amount_captured.get_or_insert(record.amount);
            }
            _ => record.expires_at = None,
        }
    }

    /// The clock's now, unix ms.
    pub fn now_ms(&self) -> i64 {
        self.now()
    }

    /// The idempotency keys kept with the payments.
    pub fn idempotency(&self) -> &Idempotency {
        &self.idempotency
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn now(&self) -> i64 {
        self.clock.wall().timestamp_millis()
    }

    async fn insert(
        &self,
        conn: &mut sqlx::AnyConnection,
        record: &PaymentRecord,
    ) -> Result<(), BackendError> {
        self.insert_many(conn, &[record]).await
    }

    /// New payments (version 1), in one statement.
    async fn insert_many(
        &self,
        conn: &mut sqlx::AnyConnection,
        records: &[&PaymentRecord],
    ) -> Result<(), BackendError> {
        let rows: Vec<(&PaymentRecord, i64)> = records.iter().map(|r| (*r, 1)).collect();
        let sql = payment_rows(rows.len(), "");
        self.bind_payments(sqlx::query(&sql), &rows)?
            .persistent(rows.len() == 1)
            .execute(&mut *conn)
            .await
            .map(|_| ())
            .map_err(db_error)
    }

    /// Binds the parameters of [`payment_rows`]: each record as it is to be stored, at the
    /// version given.
    fn bind_payments<'q>(
        &self,
        mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        rows: &'q [(&'q PaymentRecord, i64)],
    ) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>, BackendError> {
        let now = self.now();
        for (record, version) in rows {
            q = q
                .bind(record.transaction_id.as_str())
                .bind(record.merchant_id.as_str())
                .bind(record.customer_id.as_str())
                .bind(record.status.as_str())
                .bind(record.amount.to_string())
                .bind(record.currency.as_str())
                .bind(record.timestamp.timestamp_millis())
                .bind(now)
                .bind(*version)
                .bind(
                    serde_json::to_string(record)
                        .map_err(|e| corrupt(&record.transaction_id, e))?,
                )
                .bind(hold_expiry(record))
                .bind(record.pending.as_ref().map(|p| p.op.clone()));
        }
        Ok(q)
    }

    /// The answer, in the same transaction: the key's stored answer and the outcome's event.
    /// `settled` says the payment was sent to the gateway (its key guards its transaction).
    async fn announce(
        &self,
        conn: &mut sqlx::AnyConnection,
        record: &PaymentRecord,
        settled: bool,
    ) -> Result<(), BackendError> {
        self.answer(conn, record, settled).await?;
        if let Some(kind) = event_type(record.status) {
            self.emit(conn, record, kind).await?;
        }
        Ok(())
    }

    /// The key's stored answer, in the caller's transaction (see [`Ledger::announce`]).
    async fn answer(
        &self,
        conn: &mut sqlx::AnyConnection,
        record: &PaymentRecord,
        settled: bool,
    ) -> Result<(), BackendError> {
        let body = record.answer_body();
        if let Some(key) = &record.idempotency_key {
            // an outcome decided before any charge answers the claim this request holds; a
            // settled charge answers the claim guarding its transaction
            let guard = match (&record.claim_token, settled) {
                (_, true) => Some(Guard::Payment(&record.transaction_id)),
                (Some(token), false) => Some(Guard::Claim(token)),
                (None, false) => None,
            };
            match guard {
                // refused without calling the gateway (breaker open): "retry later" must not
                // be what a retry with the key replays for a day
                Some(Guard::Claim(token)) if record.http_status == 503 => {
                    self.idempotency
                        .forget(conn, &record.merchant_id, key, token)
                        .await?
                }
                Some(guard) => {
                    self.idempotency
                        .finish(
                            conn,
                            &record.merchant_id,
                            key,
                            guard,
                            record.http_status,
                            &body,
                        )
                        .await?
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Writes the `kind` event of a payment in the caller's transaction.
    async fn emit(
        &self,
        conn: &mut sqlx::AnyConnection,
        record: &PaymentRecord,
        kind: &str,
    ) -> Result<(), BackendError> {
        // one event of each kind per payment, so its id is derived, not random: a second
        // attempt to announce it is refused by the unique index instead of doubling the event
        self.event(
            conn,
            kind,
            &record.transaction_id,
            &record.merchant_id,
            record.public(),
        )
        .await
    }

    /// Writes the `kind` event of `object_id` (a payment or a refund) in the caller's
    /// transaction, under this ledger's subject prefix and clock.
    pub(crate) async fn event(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: &str,
        object_id: &str,
        merchant_id: &str,
        data: serde_json::Value,
    ) -> Result<(), BackendError> {
        crate::events::emit(conn, self.new_event(kind, object_id, merchant_id), data).await
    }

    fn new_event<'a>(
        &'a self,
        kind: &'a str,
        object_id: &'a str,
        merchant_id: &'a str,
    ) -> crate::events::NewEvent<'a> {
        crate::events::NewEvent {
            kind,
            object_id,
            merchant_id,
            subject_prefix: &self.subject_prefix,
            now: self.now(),
        }
    }

    /// Stores an outcome decided without calling the gateway, with its answer and event.
    pub async fn record_final(&self, record: &PaymentRecord) -> Result<(), BackendError> {
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        self.insert(&mut tx, record).await?;
        self.announce(&mut tx, record, false).await?;
        tx.commit().await.map_err(db_error)
    }

    /// Stores the intent to charge (`PROCESSING`) and moves the key to `charge_started`, before
    /// the gateway is called; answers the version [`Ledger::settle`] must name.
    pub async fn begin_charge(&self, record: &PaymentRecord) -> Result<i64, BackendError> {
        group::Job::intent(self, record).await
    }

    /// [`Ledger::begin_charge`] in a transaction of its own.
    async fn begin_charge_alone(&self, record: &PaymentRecord) -> Result<i64, BackendError> {
        if record.idempotency_key.is_none() {
            // one statement is its own transaction: no round trips for BEGIN and COMMIT
            let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
            self.insert(&mut conn, record).await?;
            return Ok(1);
        }
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        self.insert(&mut tx, record).await?;
        self.charge_started(&mut tx, record).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(1)
    }

    /// In the intent's transaction: the key, if one, now guards this payment's charge (fails if
    /// the request's claim lapsed, so nothing is charged under a lost claim).
    async fn charge_started(
        &self,
        conn: &mut sqlx::AnyConnection,
        record: &PaymentRecord,
    ) -> Result<(), BackendError> {
        let Some(key) = &record.idempotency_key else {
            return Ok(());
        };
        let token = record.claim_token.as_deref().unwrap_or("");
        self.idempotency
            .charge_started(
                conn,
                &record.merchant_id,
                key,
                token,
                &record.transaction_id,
            )
            .await
    }

    /// Moves a payment from `PROCESSING` at `version` to `record`'s final state, with its
    /// answer and event; answers false (and changes nothing) when someone else settled it first.
    pub async fn settle(&self, record: &PaymentRecord, version: i64) -> Result<bool, BackendError> {
        group::Job::settle(self, record, version).await
    }

    /// [`Ledger::settle`] in a transaction of its own.
    async fn settle_alone(
        &self,
        record: &PaymentRecord,
        version: i64,
    ) -> Result<bool, BackendError> {
        self.transition(
            record,
            version,
            PaymentStatus::Processing,
            None,
            Announce::Outcome,
        )
        .await
    }

    /// Moves a payment from `from` at `version` to `record` (a capture, a void, a review's
    /// decision, or an intent to do one of those), announcing `event`; answers false (and
    /// changes nothing) when the payment changed meanwhile.
    pub async fn change(
        &self,
        record: &PaymentRecord,
        version: i64,
        from: PaymentStatus,
        event: Option<&str>,
    ) -> Result<bool, BackendError> {
        self.transition(record, version, from, None, Announce::Event(event))
            .await
    }

    /// [`Ledger::settle`] for a payment failed because the gateway had no record of its charge:
    /// it is looked up again until `recheck_until` (unix ms), in case the charge turns up late.
    pub async fn settle_unfound(
        &self,
        record: &PaymentRecord,
        version: i64,
        recheck_until: i64,
    ) -> Result<bool, BackendError> {
        self.transition(
            record,
            version,
            PaymentStatus::Processing,
            Some(recheck_until),
            Announce::Outcome,
        )
        .await
    }

    /// Moves a payment failed as not found to `REVERSED`, once its late charge was reversed at
    /// the gateway, with its event.
    pub async fn reverse(
        &self,
        record: &PaymentRecord,
        version: i64,
    ) -> Result<bool, BackendError> {
        self.transition(
            record,
            version,
            PaymentStatus::Failed,
            None,
            Announce::Outcome,
        )
        .await
    }

    /// Payments failed as not found whose recheck is due (last looked at `every` ago or more).
    pub async fn recheck_due(
        &self,
        every: Duration,
        limit: i64,
    ) -> Result<Vec<Versioned>, BackendError> {
        self.idle("recheck_until IS NOT NULL", every, limit).await
    }

    /// Notes a recheck: looked at now; stops rechecking once `recheck_until` has passed.
    pub async fn rechecked(&self, id: &str, version: i64) -> Result<(), BackendError> {
        let now = self.now();
        sqlx::query(
            "UPDATE payments SET updated_at = $1, version = version + 1, \
             recheck_until = CASE WHEN recheck_until <= $1 THEN NULL ELSE recheck_until END \
             WHERE transaction_id = $2 AND version = $3",
        )
        .bind(now)
        .bind(id)
        .bind(version)
        .execute(self.db.pool())
        .await
        .map(|_| ())
        .map_err(db_error)
    }

    async fn transition(
        &self,
        record: &PaymentRecord,
        version: i64,
        from: PaymentStatus,
        recheck_until: Option<i64>,
        announce: Announce<'_>,
    ) -> Result<bool, BackendError> {
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        let moved = sqlx::query(
            "UPDATE payments SET status = $1, record = $2, updated_at = $3, version = version + 1, \
             recheck_until = $4, expires_at = $8, op = $9, next_check_at = NULL \
             WHERE transaction_id = $5 AND version = $6 AND status = $7",
        )
        .bind(record.status.as_str())
        .bind(serde_json::to_string(record).map_err(|e| corrupt(&record.transaction_id, e))?)
        .bind(self.now())
        .bind(recheck_until)
        .bind(&record.transaction_id)
        .bind(version)
        .bind(from.as_str())
        .bind(hold_expiry(record))
        .bind(record.pending.as_ref().map(|p| p.op.clone()))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if moved.rows_affected() != 1 {
            tx.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        match announce {
            Announce::Outcome => self.announce(&mut tx, record, true).await?,
            Announce::Event(Some(kind)) => self.emit(&mut tx, record, kind).await?,
            Announce::Event(None) => {}
        }
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    fn versioned(row: &sqlx::any::AnyRow) -> Result<Versioned, BackendError> {
        let id: String = row.try_get(0).map_err(db_error)?;
        let json: String = row.try_get(1).map_err(db_error)?;
        let status: String = row.try_get(2).map_err(db_error)?;
        let confirmed: Option<i64> = row.try_get(3).map_err(db_error)?;
        let version: i64 = row.try_get(4).map_err(db_error)?;
        let updated_at: i64 = row.try_get(5).map_err(db_error)?;
        let mut record: PaymentRecord = serde_json::from_str(&json).map_err(|e| corrupt(&id, e))?;
        record.status =
            status_from(&status).ok_or_else(|| corrupt(&id, format!("status {status}")))?;
        record.confirmed_at = confirmed.and_then(chrono::DateTime::from_timestamp_millis);
        Ok(Versioned {
            record,
            version,
            updated_at,
        })
    }

    /// A payment by id.
    pub async fn get(&self, id: &str) -> Result<Option<Versioned>, BackendError> {
        let row = sqlx::query(
            "SELECT transaction_id, record, status, confirmed_at, version, updated_at FROM payments WHERE transaction_id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.readers())
        .await
        .map_err(db_error)?;
        row.as_ref().map(Self::versioned).transpose()
    }

    /// Payments matching `filter` (a fixed SQL condition, so its partial index serves it) that
    /// have not changed for `age`, oldest first, at most `limit`.
    async fn idle(
        &self,
        filter: &str,
        age: Duration,
        limit: i64,
    ) -> Result<Vec<Versioned>, BackendError> {
        let now = self.now();
        let cutoff = now - i64::try_from(age.as_millis()).unwrap_or(0);
        // rows postponed by `postpone` wait their turn, so ones that cannot be settled yet do
        // not keep the others out of the batch
        let sql = format!(
            "SELECT transaction_id, record, status, confirmed_at, version, updated_at FROM payments \
             WHERE {filter} AND updated_at <= $1 AND (next_check_at IS NULL OR next_check_at <= $3) \
             ORDER BY updated_at LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(cutoff)
            .bind(limit)
            .bind(now)
            .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
        rows.iter().map(Self::versioned).collect()
    }

    /// Leaves a `PROCESSING` payment out of the reconciler's batches for `wait` (its lookup
    /// failed, or found nothing yet), so the payments behind it get their turn.
    pub async fn postpone(&self, id: &str, wait: Duration) -> Result<(), BackendError> {
        sqlx::query("UPDATE payments SET next_check_at = $1 WHERE transaction_id = $2")
            .bind(self.now() + i64::try_from(wait.as_millis()).unwrap_or(0))
            .bind(id)
            .execute(self.db.pool())
            .await
            .map(|_| ())
            .map_err(db_error)
    }

    /// Payments still `PROCESSING` whose intent was written at least `age` ago, oldest first.
    pub async fn processing_older_than(
        &self,
        age: Duration,
        limit: i64,
    ) -> Result<Vec<Versioned>, BackendError> {
        self.idle("status = 'PROCESSING'", age, limit).await
    }

    /// Successful payments not confirmed at least `age` after they succeeded (their queued
    /// confirmation was lost or never queued), oldest first.
    pub async fn unconfirmed_older_than(
        &self,
        age: Duration,
        limit: i64,
    ) -> Result<Vec<String>, BackendError> {
        Ok(self
            .idle("status = 'SUCCESS' AND confirmed_at IS NULL", age, limit)
            .await?
            .into_iter()
            .map(|v| v.record.transaction_id)
            .collect())
    }

    /// `AUTHORIZED` and `REQUIRES_REVIEW` payments whose hold has lapsed (no capture or void
    /// under way), soonest first.
    pub async fn lapsed_holds(&self, limit: i64) -> Result<Vec<Versioned>, BackendError> {
        let rows = sqlx::query(
            "SELECT transaction_id, record, status, confirmed_at, version, updated_at FROM payments \
             WHERE expires_at IS NOT NULL AND expires_at <= $1 \
             AND (next_check_at IS NULL OR next_check_at <= $1) ORDER BY expires_at LIMIT $2",
        )
        .bind(self.now())
        .bind(limit)
        .fetch_all(self.db.pool())
        .await
        .map_err(db_error)?;
        rows.iter().map(Self::versioned).collect()
    }

    /// Payments with a capture or void under way that has not changed for `age`.
    pub async fn ops_older_than(
        &self,
        age: Duration,
        limit: i64,
    ) -> Result<Vec<Versioned>, BackendError> {
        self.idle("op IS NOT NULL", age, limit).await
    }

    /// One page of a merchant's payments in creation order (ties by id), after `after`
    /// (`(created_at ms, transaction_id)` of the last one seen); answers the page and whether
    /// more follow.
    pub async fn list(
        &self,
        q: &ListQuery,
        after: Option<(i64, String)>,
    ) -> Result<(Vec<PaymentRecord>, bool), BackendError> {
        let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let mut sql = String::from(
            "SELECT transaction_id, record, status, confirmed_at, version, updated_at FROM payments \
             WHERE merchant_id = $1 AND (created_at > $2 OR (created_at = $2 AND transaction_id > $3))",
        );
        let mut n = 3;
        for (wanted, cond) in [
            (q.status.is_some(), "status ="),
            (q.customer_id.is_some(), "customer_id ="),
            (q.created_gte.is_some(), "created_at >="),
            (q.created_lt.is_some(), "created_at <"),
        ] {
            if wanted {
                n += 1;
                sql.push_str(&format!(" AND {cond} ${n}"));
            }
        }
        sql.push_str(&format!(
            " ORDER BY created_at, transaction_id LIMIT ${}",
            n + 1
        ));
        let mut query = sqlx::query(&sql)
            .bind(&q.merchant_id)
            .bind(after_at)
            .bind(after_id);
        if let Some(st) = q.status {
            query = query.bind(st.as_str());
        }
        if let Some(c) = &q.customer_id {
            query = query.bind(c.clone());
        }
        if let Some(t) = q.created_gte {
            query = query.bind(t);
        }
        if let Some(t) = q.created_lt {
            query = query.bind(t);
        }
        let rows = query
            .bind(q.limit + 1)
            .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
        let mut page: Vec<PaymentRecord> = rows
            .iter()
            .map(|r| Self::versioned(r).map(|v| v.record))
            .collect::<Result<_, _>>()?;
        let more = page.len() as i64 > q.limit;
        page.truncate(usize::try_from(q.limit).unwrap_or(0));
        Ok((page, more))
    }

    /// Payments held for review, oldest first (a merchant's only, when named), after the
    /// payment `after` (`(created_at ms, transaction_id)`).
    pub async fn reviews(
        &self,
        merchant: Option<&str>,
        after: Option<(i64, String)>,
        limit: i64,
    ) -> Result<(Vec<PaymentRecord>, bool), BackendError> {
        let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let sql = format!(
            "SELECT transaction_id, record, status, confirmed_at, version, updated_at FROM payments \
             WHERE status = 'REQUIRES_REVIEW' AND (created_at > $1 OR (created_at = $1 AND transaction_id > $2)) {} \
             ORDER BY created_at, transaction_id LIMIT $3",
            if merchant.is_some() {
                "AND merchant_id = $4"
            } else {
                ""
            }
        );
        let mut query = sqlx::query(&sql)
            .bind(after_at)
            .bind(after_id)
            .bind(limit + 1);
        if let Some(m) = merchant {
            query = query.bind(m);
        }
        let rows = query.fetch_all(self.db.pool()).await.map_err(db_error)?;
        let mut page: Vec<PaymentRecord> = rows
            .iter()
            .map(|r| Self::versioned(r).map(|v| v.record))
            .collect::<Result<_, _>>()?;
        let more = page.len() as i64 > limit;
        page.truncate(usize::try_from(limit).unwrap_or(0));
        Ok((page, more))
    }

    /// Where a listing resumes after payment `id` (its creation time and id), if it is the
    /// merchant's.
    pub async fn cursor(
        &self,
        merchant: Option<&str>,
        id: &str,
    ) -> Result<Option<(i64, String)>, BackendError> {
        let row =
            sqlx::query("SELECT created_at, merchant_id FROM payments WHERE transaction_id = $1")
                .bind(id)
                .fetch_optional(self.db.pool())
                .await
                .map_err(db_error)?;
        let Some(row) = row else { return Ok(None) };
        let at: i64 = row.try_get(0).map_err(db_error)?;
        let owner: String = row.try_get(1).map_err(db_error)?;
        Ok(merchant
            .is_none_or(|m| m == owner)
            .then(|| (at, id.to_owned())))
    }

    /// Marks a successful payment confirmed; answers false for an unknown id, a payment that is
    /// not `SUCCESS`, or one confirmed already.
    pub async fn confirm(&self, id: &str) -> Result<bool, BackendError> {
        group::Job::confirm(self, id).await
    }

    /// Claims `merchant`'s idempotency `key` for a body with `fingerprint`
    /// ([`Idempotency::claim`]); a key's first use is claimed with the next group.
    pub async fn claim(
        &self,
        merchant: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<crate::idempotency::Claim, crate::idempotency::ClaimError> {
        let first = self.idempotency.first_use(merchant, key, fingerprint);
        let token = first.token.clone();
        if group::Job::claim(self, first).await? {
            return Ok(crate::idempotency::Claim::Proceed { token });
        }
        self.idempotency.claim(merchant, key, fingerprint).await
    }

    /// A key's first use claimed in a statement of its own; answers whether it was claimed.
    async fn claim_alone(
        &self,
        first: &crate::idempotency::FirstUse,
    ) -> Result<bool, BackendError> {
        let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
        let claimed = self.idempotency.insert_claims(&mut conn, &[first]).await?;
        Ok(!claimed.is_empty())
    }

    /// [`Ledger::confirm`] in a statement of its own.
    async fn confirm_alone(&self, id: &str) -> Result<bool, BackendError> {
        sqlx::query(
            "UPDATE payments SET confirmed_at = $1, version = version + 1 \
             WHERE transaction_id = $2 AND status = 'SUCCESS' AND confirmed_at IS NULL",
        )
        .bind(self.now())
        .bind(id)
        .execute(self.db.pool())
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(db_error)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use tai_core::clock::ManualClock;

    use super::*;

    /// A fresh in-memory database with tai-core's and the payment tables.
    pub(crate) async fn memory_db() -> Database {
        let db = Database::connect("memory", 1)
            .await
            .expect("sqlite in memory");
        db.migrate_core().await.expect("core schema");
        db.migrate(SCHEMA).await.expect("payment schema");
        db
    }

    pub(crate) async fn ledger(clock: &ManualClock) -> Ledger {
        let db = memory_db().await;
        let idem = Idempotency::new(
            db.clone(),
            clock.shared(),
            Duration::from_secs(30),
            crate::idempotency::KEEP_FOR,
        );
        Ledger::open(db, clock.shared(), idem, EVENT_SUBJECT_PREFIX)
            .await
            .expect("ledger")
    }

    #[tokio::test]
    async fn only_one_settlement_wins_and_each_outcome_is_one_event() {
        let clock = ManualClock::new();
        let ledger = ledger(&clock).await;
        let mut rec = crate::reconcile::tests::processing("txn_a", "m:k", &clock);
        rec.idempotency_key = None;
        rec.fingerprint = None;
        let v = ledger.begin_charge(&rec).await.expect("intent");
        let mut success = rec.clone();
        success.status = PaymentStatus::Success;
        success.http_status = 200;
        let mut failed = rec.clone();
        failed.status = PaymentStatus::Failed;
        failed.http_status = 502;
        assert!(ledger.settle(&success, v).await.expect("settle"));
        assert!(
            !ledger.settle(&failed, v).await.expect("settle"),
            "a stale version cannot overwrite the outcome"
        );
        let read = ledger.get("txn_a").await.expect("get").expect("stored");
        assert_eq!(read.record.status, PaymentStatus::Success);
        assert!(ledger.confirm("txn_a").await.expect("confirm"));
        assert!(!ledger.confirm("txn_a").await.expect("confirm"), "once");
        let events = tai_core::outbox::read(ledger.database(), 0, 10)
            .await
            .expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].subject, "payments.events.payment.succeeded");
    }
}
