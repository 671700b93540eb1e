//! Refunds in the system of record.
//!
//! A refund is written `PENDING` before the gateway is asked (the intent), in a transaction
//! that first takes the payment's row (an update of its version), so refunds of one payment
//! are decided one after another: the sum of its pending and succeeded refunds never passes
//! what was captured, however many race. The gateway refunds once per refund id, so a
//! `PENDING` refund whose answer was lost (a timeout, a crash) is simply asked again by the
//! reconciler until it is `SUCCEEDED` or `FAILED`. Each change is an event
//! (`refund.created`, `refund.succeeded`, `refund.failed`) in the same transaction.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::Row;
use tai_core::backend::BackendError;
use tai_core::db::db_error;

use crate::ledger::Ledger;
use crate::record::{PaymentRecord, PaymentStatus};

/// A refund's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RefundStatus {
    /// Sent to the gateway (or about to be), outcome not known yet.
    Pending,
    /// The gateway refunded it.
    Succeeded,
    /// The gateway refused it; nothing was refunded.
    Failed,
}

impl RefundStatus {
    fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Pending => "PENDING",
            RefundStatus::Succeeded => "SUCCEEDED",
            RefundStatus::Failed => "FAILED",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
    /// The HTTP status a refund in this state is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            RefundStatus::Pending => 202,
            RefundStatus::Succeeded => 200,
            RefundStatus::Failed => 502,
        }
    }
}

/// One refund as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Refund {
    /// `re_…`.
    pub id: String,
    /// The payment refunded.
    pub transaction_id: String,
    /// Whose.
    pub merchant_id: String,
    /// Exact amount.
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    #[schema(value_type = f64, example = 30.0)]
    pub amount: Decimal,
    /// ISO 4217.
    pub currency: String,
    /// Its state.
    pub status: RefundStatus,
    /// Why, as the merchant said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The gateway's id of the refund, once made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_refund_id: Option<String>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// When it was asked for.
    pub created: DateTime<Utc>,
}

/// What creating a refund came to.
#[derive(Debug)]
pub enum Created {
    /// Written `PENDING`; ask the gateway next.
    Made(Refund),
    /// A refund with this idempotency key exists: it, and the fingerprint it was made with.
    Existing(Refund, Option<String>),
    /// The payment is not a success (nothing captured to refund): its status.
    NotRefundable(PaymentStatus),
    /// More than remains: what remains.
    Exceeds(Decimal),
    /// No such payment.
    Unknown,
}

/// A refund to create.
#[derive(Debug, Clone)]
pub struct NewRefund<'a> {
    /// The payment.
    pub transaction_id: &'a str,
    /// The amount; what remains when `None`.
    pub amount: Option<Decimal>,
    /// Why.
    pub reason: Option<&'a str>,
    /// The client's key, if any.
    pub idempotency_key: Option<&'a str>,
    /// The request's fingerprint, when a key was sent.
    pub fingerprint: Option<&'a str>,
}

const COLUMNS: &str = "refund_id, transaction_id, merchant_id, amount, currency, status, reason, \
                       gateway_refund_id, failure, created_at, fingerprint";

fn corrupt(e: impl std::fmt::Display) -> BackendError {
    BackendError::Protocol {
        backend: "database",
        message: format!("refund: {e}"),
    }
}

fn from_row(r: &sqlx::any::AnyRow) -> Result<(Refund, Option<String>), BackendError> {
    let amount: String = r.try_get(3).map_err(db_error)?;
    let status: String = r.try_get(5).map_err(db_error)?;
    let created: i64 = r.try_get(9).map_err(db_error)?;
    Ok((
        Refund {
            id: r.try_get(0).map_err(db_error)?,
            transaction_id: r.try_get(1).map_err(db_error)?,
            merchant_id: r.try_get(2).map_err(db_error)?,
            amount: amount.parse().map_err(corrupt)?,
            currency: r.try_get(4).map_err(db_error)?,
            status: RefundStatus::parse(&status)
                .ok_or_else(|| corrupt(format!("status {status}")))?,
            reason: r.try_get(6).map_err(db_error)?,
            gateway_refund_id: r.try_get(7).map_err(db_error)?,
            failure_reason: r.try_get(8).map_err(db_error)?,
            created: DateTime::from_timestamp_millis(created).unwrap_or_default(),
        },
        r.try_get(10).map_err(db_error)?,
    ))
}

async fn emit(
    conn: &mut sqlx::AnyConnection,
    ledger: &Ledger,
    refund: &Refund,
    kind: &str,
) -> Result<(), BackendError> {
    let data = serde_json::to_value(refund).map_err(corrupt)?;
    ledger
        .event(conn, kind, &refund.id, &refund.merchant_id, data)
        .await
}

/// The refund a merchant made with `key`, and its fingerprint.
pub async fn by_key(
    ledger: &Ledger,
    merchant: &str,
    key: &str,
) -> Result<Option<(Refund, Option<String>)>, BackendError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM refunds WHERE merchant_id = $1 AND idempotency_key = $2"
    ))
    .bind(merchant)
    .bind(key)
    .fetch_optional(ledger.database().pool())
    .await
    .map_err(db_error)?;
    row.as_ref().map(from_row).transpose()
}

/// A payment's refunds, oldest first.
pub async fn for_payment(ledger: &Ledger, txn: &str) -> Result<Vec<Refund>, BackendError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM refunds WHERE transaction_id = $1 ORDER BY created_at, refund_id"
    ))
    .bind(txn)
    .fetch_all(ledger.database().pool())
    .await
    .map_err(db_error)?;
    rows.iter().map(|r| from_row(r).map(|(f, _)| f)).collect()
}

/// Refunds still `PENDING` that have not changed for `age_ms`, oldest first.
pub async fn pending_older_than(
    ledger: &Ledger,
    age_ms: i64,
    limit: i64,
) -> Result<Vec<Refund>, BackendError> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM refunds WHERE status = 'PENDING' AND updated_at <= $1 ORDER BY updated_at LIMIT $2"
    ))
    .bind(ledger.now_ms() - age_ms)
    .bind(limit)
    .fetch_all(ledger.database().pool())
    .await
    .map_err(db_error)?;
    rows.iter().map(|r| from_row(r).map(|(f, _)| f)).collect()
}

/// Notes that a pending refund was looked at (it waits its turn again).
pub async fn touch(ledger: &Ledger, id: &str) -> Result<(), BackendError> {
    sqlx::query("UPDATE refunds SET updated_at = $1 WHERE refund_id = $2 AND status = 'PENDING'")
        .bind(ledger.now_ms())
        .bind(id)
        .execute(ledger.database().pool())
        .await
        .map(|_| ())
        .map_err(db_error)
}

/// Writes a `PENDING` refund of the payment `new.transaction_id` of `merchant`, unless it
/// would pass what was captured; decided one at a time per payment.
pub async fn create(
    ledger: &Ledger,
    merchant: &str,
    new: &NewRefund<'_>,
) -> Result<Created, BackendError> {
    let now = ledger.now_ms();
    let mut tx = ledger.database().pool().begin().await.map_err(db_error)?;
    // take the payment's row first: refunds of one payment queue here
    let locked = sqlx::query(
        "UPDATE payments SET version = version + 1 WHERE transaction_id = $1 AND merchant_id = $2 AND status = 'SUCCESS'",
    )
    .bind(new.transaction_id)
    .bind(merchant)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    if locked.rows_affected() != 1 {
        tx.rollback().await.map_err(db_error)?;
        return Ok(match ledger.get(new.transaction_id).await? {
            Some(v) if v.record.merchant_id == merchant => Created::NotRefundable(v.record.status),
            _ => Created::Unknown,
        });
    }
    if let Some(key) = new.idempotency_key {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM refunds WHERE merchant_id = $1 AND idempotency_key = $2"
        ))
        .bind(merchant)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some(row) = row {
            let (refund, fp) = from_row(&row)?;
            tx.rollback().await.map_err(db_error)?;
            return Ok(Created::Existing(refund, fp));
        }
    }
    let row = sqlx::query("SELECT record FROM payments WHERE transaction_id = $1")
        .bind(new.transaction_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    let json: String = row.try_get(0).map_err(db_error)?;
    let payment: PaymentRecord = serde_json::from_str(&json).map_err(corrupt)?;
    let captured = payment.amount_captured.unwrap_or(payment.amount);
    let taken =
        sqlx::query("SELECT amount FROM refunds WHERE transaction_id = $1 AND status <> 'FAILED'")
            .bind(new.transaction_id)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
    let mut refunded = Decimal::ZERO;
    for r in &taken {
        let a: String = r.try_get(0).map_err(db_error)?;
        refunded += a.parse::<Decimal>().map_err(corrupt)?;
    }
    let remaining = captured - refunded;
    let amount = new.amount.unwrap_or(remaining);
    if amount <= Decimal::ZERO || amount > remaining {
        tx.rollback().await.map_err(db_error)?;
        return Ok(Created::Exceeds(remaining));
    }
    let refund = Refund {
        id: format!("re_{}", uuid::Uuid::new_v4().simple()),
        transaction_id: new.transaction_id.to_owned(),
        merchant_id: merchant.to_owned(),
        amount,
        currency: payment.currency.clone(),
        status: RefundStatus::Pending,
        reason: new.reason.map(str::to_owned),
        gateway_refund_id: None,
        failure_reason: None,
        created: DateTime::from_timestamp_millis(now).unwrap_or_default(),
    };
    sqlx::query(
        "INSERT INTO refunds (refund_id, transaction_id, merchant_id, amount, currency, status, reason, \
         idempotency_key, fingerprint, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'PENDING', $6, $7, $8, $9, $9)",
    )
    .bind(&refund.id)
    .bind(&refund.transaction_id)
    .bind(merchant)
    .bind(amount.to_string())
    .bind(&refund.currency)
    .bind(new.reason)
    .bind(new.idempotency_key)
    .bind(new.fingerprint)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    emit(&mut tx, ledger, &refund, "refund.created").await?;
    tx.commit().await.map_err(db_error)?;
    Ok(Created::Made(refund))
}

/// Moves a `PENDING` refund to its outcome with its event; answers false when it was settled
/// already (by the reconciler or the request).
pub async fn settle(ledger: &Ledger, refund: &Refund) -> Result<bool, BackendError> {
    let kind = match refund.status {
        RefundStatus::Succeeded => "refund.succeeded",
        RefundStatus::Failed => "refund.failed",
        RefundStatus::Pending => return Ok(false),
    };
    let mut tx = ledger.database().pool().begin().await.map_err(db_error)?;
    let moved = sqlx::query(
        "UPDATE refunds SET status = $1, gateway_refund_id = $2, failure = $3, updated_at = $4 \
         WHERE refund_id = $5 AND status = 'PENDING'",
    )
    .bind(refund.status.as_str())
    .bind(refund.gateway_refund_id.as_deref())
    .bind(refund.failure_reason.as_deref())
    .bind(ledger.now_ms())
    .bind(&refund.id)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    if moved.rows_affected() != 1 {
        tx.rollback().await.map_err(db_error)?;
        return Ok(false);
    }
    emit(&mut tx, ledger, refund, kind).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(true)
}
