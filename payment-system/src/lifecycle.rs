//! What happens to a payment after its first answer: capture and void of an authorization,
//! refunds, and the review of a held payment; also the reconciler's side of each (expiry of
//! holds, captures and voids whose answer was lost, refunds left `PENDING`).
//!
//! Every change is a compare-and-swap on the payment's version in the system of record, with
//! its event in the same transaction, so two requests (or a request and the reconciler) never
//! both make it. A change that calls the gateway first writes its intent (the `pending`
//! operation, or the `PROCESSING` state of an approved payment, or a `PENDING` refund), then
//! calls the gateway with a key that makes a repeat harmless, then records the answer; an
//! answer lost to a timeout or a crash is asked for again by the reconciler.

use std::time::Duration;

use axum::http::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tai_core::backend::BackendError;
use tai_core::runtime::{ApiError, ErrorType};
use tracing::Instrument;

use crate::action::PaymentAction;
use crate::gateway::{ChargeRequest, GatewayError};
use crate::ledger::Versioned;
use crate::record::{FailureInfo, PaymentRecord, PaymentStatus, PendingOp, ReviewInfo};
use crate::refunds::{self, Created, NewRefund, Refund, RefundStatus};

/// The payment lifecycle's operations.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// The charge path (gateway, breaker, ledger, confirmations, metrics).
    pub action: PaymentAction,
}

/// A payment whose change was sent and whose outcome is not recorded yet (202).
fn unknown_outcome(record: &PaymentRecord, op: &str, why: &str) -> Value {
    let mut body = shown(record);
    body["error"] = json!({
        "type": "api_error",
        "code": format!("{op}_outcome_unknown"),
        "message": format!("The {op} was sent to the payment gateway and its outcome is not recorded yet ({why}); it is being finished: read the payment at GET /payment/{}.", record.transaction_id),
    });
    body
}

/// The body of a payment as answered by the lifecycle routes.
pub fn shown(record: &PaymentRecord) -> Value {
    let mut body = record.public();
    if let (Value::Object(m), Some(p)) = (&mut body, &record.pending) {
        // an operation under way is shown, not its internals
        m.insert("pending_operation".into(), json!(p.op));
    }
    body
}

impl Lifecycle {
    fn ledger(&self) -> &crate::ledger::Ledger {
        &self.action.ledger
    }

    /// A payment `may_see` allows (another merchant's is "no such payment").
    pub async fn find(
        &self,
        id: &str,
        may_see: impl Fn(&str) -> bool,
    ) -> Result<Versioned, ApiError> {
        let unknown = || {
            ApiError::not_found(format!(
                "No such payment: {}",
                id.chars().take(64).collect::<String>()
            ))
            .with_param("transaction_id")
        };
        let well_formed = id.len() == 36
            && id.starts_with("txn_")
            && id[4..].bytes().all(|b| b.is_ascii_hexdigit());
        if !well_formed {
            return Err(unknown());
        }
        self.ledger()
            .get(id)
            .await
            .map_err(ApiError::from)?
            .filter(|v| may_see(&v.record.merchant_id))
            .ok_or_else(unknown)
    }

    async fn gateway_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, GatewayError>>,
    ) -> Result<T, GatewayError> {
        let limit = self.action.gateway_timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(
                u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
            )),
        }
    }

    /// Captures `amount` (all when `None`) of an `AUTHORIZED` payment.
    pub async fn capture(
        &self,
        payment: Versioned,
        amount: Option<Decimal>,
    ) -> Result<(u16, Value), ApiError> {
        let record = &payment.record;
        self.check_authorized(record, "captured")?;
        let amount = amount.unwrap_or(record.amount);
        if amount > record.amount {
            return Err(ApiError::invalid(
                "amount_too_large",
                "amount",
                format!(
                    "At most the authorized {} {} can be captured.",
                    record.amount, record.currency
                ),
            ));
        }
        let mut intent = record.clone();
        intent.pending = Some(PendingOp {
            op: "capture".into(),
            amount: Some(amount),
            reason: None,
        });
        self.start(&intent, payment.version).await?;
        self.finish_op(intent, payment.version + 1).await
    }

    /// Voids an `AUTHORIZED` payment (`reason`: `requested` or `expired`).
    pub async fn void(&self, payment: Versioned, reason: &str) -> Result<(u16, Value), ApiError> {
        let record = &payment.record;
        if reason == "requested" {
            self.check_authorized(record, "voided")?;
        }
        let mut intent = record.clone();
        intent.pending = Some(PendingOp {
            op: "void".into(),
            amount: None,
            reason: Some(reason.into()),
        });
        self.start(&intent, payment.version).await?;
        self.finish_op(intent, payment.version + 1).await
    }

    fn check_authorized(&self, record: &PaymentRecord, verb: &str) -> Result<(), ApiError> {
        if record.status != PaymentStatus::Authorized {
            return Err(ApiError::conflict(
                "payment_not_authorized",
                format!(
                    "Only an AUTHORIZED payment can be {verb}; this one is {}.",
                    record.status.as_str()
                ),
            ));
        }
        if let Some(p) = &record.pending {
            return Err(ApiError::conflict(
                "operation_in_progress",
                format!(
                    "A {} of this payment is under way; read it again shortly.",
                    p.op
                ),
            ));
        }
        if record
            .expires_at
            .is_some_and(|at| at <= self.action.clock.wall())
        {
            return Err(ApiError::conflict(
                "authorization_expired",
                "The authorization has expired; it is being voided.",
            ));
        }
        Ok(())
    }

    async fn start(&self, intent: &PaymentRecord, version: i64) -> Result<(), ApiError> {
        let moved = self
            .ledger()
            .change(intent, version, PaymentStatus::Authorized, None)
            .await
            .map_err(ApiError::from)?;
        if moved {
            Ok(())
        } else {
            Err(ApiError::conflict(
                "payment_changed",
                "The payment changed while this request was made; read it and try again.",
            ))
        }
    }

    /// Carries out the capture or void `record.pending` names, at `version` (the intent is
    /// written): asks the gateway, then records the answer. A lost answer leaves the intent for
    /// the reconciler.
    pub async fn finish_op(
        &self,
        record: PaymentRecord,
        version: i64,
    ) -> Result<(u16, Value), ApiError> {
        let Some(op) = record.pending.clone() else {
            return Ok((200, shown(&record)));
        };
        let key = record.gateway_key.clone().unwrap_or_default();
        let gateway = &self.action.gateway;
        let result = match (op.op.as_str(), op.amount) {
            ("capture", Some(amount)) => {
                self.gateway_call(gateway.capture(&key, amount))
                    .instrument(tracing::info_span!("gateway_capture"))
                    .await
            }
            _ => {
                self.gateway_call(gateway.void(&key))
                    .instrument(tracing::info_span!("gateway_void"))
                    .await
            }
        };
        let id = record.transaction_id.clone();
        match result {
            Ok(()) => {
                let mut done = record.clone();
                done.pending = None;
                let event = if op.op == "capture" {
                    done.status = PaymentStatus::Success;
                    done.amount_captured = op.amount;
                    "payment.captured"
                } else {
                    done.status = PaymentStatus::Voided;
                    done.void_reason = op.reason.clone();
                    "payment.voided"
                };
                self.ledger().stamp(&mut done);
                let moved = match self
                    .ledger()
                    .change(&done, version, PaymentStatus::Authorized, Some(event))
                    .await
                {
                    Ok(moved) => moved,
                    Err(e) => {
                        // the gateway did it; the intent stays and the reconciler records it
                        // (asking again is harmless): never "retry, nothing happened"
                        tracing::error!(transaction_id = %id, op = %op.op, error = %e, "could not record the gateway's answer; left for the reconciler");
                        return Ok((202, unknown_outcome(&record, &op.op, &e.to_string())));
                    }
                };
                if !moved {
                    // the reconciler recorded it first
                    let now = self.find(&id, |_| true).await?;
                    return Ok((200, shown(&now.record)));
                }
                tracing::info!(transaction_id = %id, op = %op.op, "payment {}", if op.op == "capture" { "captured" } else { "voided" });
                if done.status == PaymentStatus::Success
                    && let Err(e) = self.action.confirmations.push(id.clone()).await
                {
                    tracing::warn!(transaction_id = %id, error = %e, "could not queue the confirmation; the reconciler will");
                }
                Ok((200, shown(&done)))
            }
            Err(GatewayError::Rejected { status, message }) => {
                // the gateway refused: nothing moved; the payment is as it was
                let mut back = record.clone();
                back.pending = None;
                let moved = self
                    .ledger()
                    .change(&back, version, PaymentStatus::Authorized, None)
                    .await
                    .map_err(ApiError::from)?;
                if !moved {
                    // recorded meanwhile (another try got the gateway's yes): that stands
                    let now = self.find(&id, |_| true).await?;
                    return Ok((200, shown(&now.record)));
                }
                tracing::warn!(transaction_id = %id, op = %op.op, status, message = %message, "the gateway refused");
                Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorType::ApiError,
                    format!("{}_refused", op.op),
                    format!(
                        "The payment gateway refused the {} ({status}: {message}); nothing changed.",
                        op.op
                    ),
                ))
            }
            Err(e) => {
                tracing::warn!(transaction_id = %id, op = %op.op, error = %e, "outcome unknown; left for the reconciler");
                Ok((202, unknown_outcome(&record, &op.op, &e.to_string())))
            }
        }
    }

    /// Approves a payment held for review: charges it (once, however many approve at once).
    pub async fn approve(&self, payment: Versioned) -> Result<(u16, Value), ApiError> {
        let record = &payment.record;
        self.check_review(record)?;
        let permit = self.action.breaker.try_acquire().map_err(|rejected| {
            ApiError::unavailable(
                "gateway_unavailable",
                "The payment gateway is unavailable (circuit breaker open); the payment stays in review. Retry later.",
                Some(rejected.retry_after),
            )
        })?;
        let mut intent = record.clone();
        intent.status = PaymentStatus::Processing;
        intent.http_status = 0;
        intent.review = Some(ReviewInfo {
            outcome: "approved".into(),
            at: self.action.clock.wall(),
        });
        intent.expires_at = None;
        let moved = self
            .ledger()
            .change(
                &intent,
                payment.version,
                PaymentStatus::RequiresReview,
                None,
            )
            .await
            .map_err(ApiError::from)?;
        if !moved {
            return Err(ApiError::conflict(
                "review_decided",
                "The review of this payment was decided meanwhile; read it again.",
            ));
        }
        let currency = crate::money::Currency::parse(&record.currency)
            .map(|c| c.code())
            .unwrap_or("USD");
        let charge = ChargeRequest {
            amount: record.amount,
            currency,
            card: None,
            reference: record.transaction_id.clone(),
            idempotency_key: record.gateway_key.clone().unwrap_or_default(),
            capture: record.capture,
            card_token: record.card_token.clone(),
        };
        let charged = self.action.send(&charge, permit).await;
        let mut done = intent.clone();
        done.status = charged.status;
        done.http_status = charged.http_status;
        done.gateway_response = charged.gateway_id;
        done.error = charged.error;
        done.card_token = None;
        self.ledger().stamp(&mut done);
        if done.status == PaymentStatus::Processing {
            // the reconciler asks the gateway how it ended
            return Ok((202, shown(&done)));
        }
        let settled = match self.ledger().settle(&done, payment.version + 1).await {
            Ok(settled) => settled,
            Err(e) => {
                // charged (or declined) and not recorded: PROCESSING stays, and the reconciler
                // settles it from the gateway's books
                tracing::error!(transaction_id = %done.transaction_id, error = %e, "could not record the approval's charge; left for the reconciler");
                return Ok((202, unknown_outcome(&intent, "charge", &e.to_string())));
            }
        };
        if !settled {
            let now = self.find(&done.transaction_id, |_| true).await?;
            return Ok((now.record.http_status.max(200), shown(&now.record)));
        }
        tracing::info!(transaction_id = %done.transaction_id, status = done.status.as_str(), "payment approved in review");
        if done.status == PaymentStatus::Success
            && let Err(e) = self
                .action
                .confirmations
                .push(done.transaction_id.clone())
                .await
        {
            tracing::warn!(error = %e, "could not queue the confirmation; the reconciler will");
        }
        Ok((done.http_status, shown(&done)))
    }

    /// Rejects a payment held for review (`outcome`: `rejected`, or `expired` when its hold
    /// lapsed): it is blocked and never charged.
    pub async fn reject(
        &self,
        payment: Versioned,
        outcome: &str,
    ) -> Result<(u16, Value), ApiError> {
        let record = &payment.record;
        self.check_review(record)?;
        let mut done = record.clone();
        done.status = PaymentStatus::FraudBlocked;
        done.http_status = 402;
        done.card_token = None;
        done.review = Some(ReviewInfo {
            outcome: outcome.into(),
            at: self.action.clock.wall(),
        });
        done.error = Some(FailureInfo {
            kind: "card_error".into(),
            code: format!("review_{outcome}"),
            message: if outcome == "expired" {
                "Held for review and not reviewed in time; nothing was charged.".into()
            } else {
                "Rejected in review; nothing was charged.".into()
            },
        });
        self.ledger().stamp(&mut done);
        let moved = self
            .ledger()
            .change(
                &done,
                payment.version,
                PaymentStatus::RequiresReview,
                Some("payment.fraud_blocked"),
            )
            .await
            .map_err(ApiError::from)?;
        if !moved {
            return Err(ApiError::conflict(
                "review_decided",
                "The review of this payment was decided meanwhile; read it again.",
            ));
        }
        tracing::warn!(transaction_id = %done.transaction_id, outcome, "payment rejected in review");
        Ok((402, shown(&done)))
    }

    fn check_review(&self, record: &PaymentRecord) -> Result<(), ApiError> {
        if record.status == PaymentStatus::RequiresReview {
            Ok(())
        } else {
            Err(ApiError::conflict(
                "payment_not_in_review",
                format!(
                    "Only a payment in REQUIRES_REVIEW can be approved or rejected; this one is {}.",
                    record.status.as_str()
                ),
            ))
        }
    }

    /// Refunds (part of) a successful payment. `key` and `fingerprint` give the request
    /// idempotency: the same key replays the refund it made, another body under it is a 422.
    pub async fn refund(
        &self,
        payment: Versioned,
        new: NewRefund<'_>,
    ) -> Result<(u16, Refund, bool), ApiError> {
        let merchant = payment.record.merchant_id.clone();
        let replay = |refund: Refund, fp: Option<String>| {
            if fp.as_deref() != new.fingerprint {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorType::IdempotencyError,
                    "idempotency_key_reused",
                    "This Idempotency-Key was used for another refund request.",
                ));
            }
            Ok((refund.status.http_status(), refund, true))
        };
        if let Some(key) = new.idempotency_key
            && let Some((refund, fp)) = refunds::by_key(self.ledger(), &merchant, key)
                .await
                .map_err(ApiError::from)?
        {
            return replay(refund, fp);
        }
        let created = match refunds::create(self.ledger(), &merchant, &new).await {
            Ok(c) => c,
            Err(e) => {
                // the same key racing on another payment loses to the unique index: its refund
                // is the answer
                if let Some(key) = new.idempotency_key
                    && let Ok(Some((refund, fp))) =
                        refunds::by_key(self.ledger(), &merchant, key).await
                {
                    return replay(refund, fp);
                }
                return Err(ApiError::from(e));
            }
        };
        let refund = match created {
            Created::Made(r) => r,
            Created::Existing(r, fp) => return replay(r, fp),
            Created::Unknown => {
                return Err(ApiError::not_found(format!(
                    "No such payment: {}",
                    new.transaction_id
                )));
            }
            Created::NotRefundable(status) => {
                return Err(ApiError::conflict(
                    "payment_not_refundable",
                    format!(
                        "Only a SUCCESS payment can be refunded; this one is {}.",
                        status.as_str()
                    ),
                ));
            }
            Created::Exceeds(remaining) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorType::InvalidRequestError,
                    "amount_exceeds_refundable",
                    format!(
                        "Only {remaining} {} of this payment is left to refund.",
                        payment.record.currency
                    ),
                )
                .with_param("amount"));
            }
        };
        // the refund is written: from here on the answer is never "nothing happened, retry"
        let pending = refund.clone();
        match self
            .finish_refund(refund, payment.record.gateway_key.as_deref())
            .await
        {
            Ok(refund) => Ok((refund.status.http_status(), refund, false)),
            Err(e) => {
                tracing::error!(refund_id = %pending.id, error = %e, "could not record the refund's outcome; the reconciler asks the gateway again");
                Ok((202, pending, false))
            }
        }
    }

    /// Asks the gateway for a `PENDING` refund (again, harmlessly: once per refund id) and
    /// records the answer; a lost answer leaves it `PENDING` for the next try.
    pub async fn finish_refund(
        &self,
        mut refund: Refund,
        charge_key: Option<&str>,
    ) -> Result<Refund, BackendError> {
        let key = charge_key.unwrap_or_default();
        let answer = self
            .gateway_call(self.action.gateway.refund(key, &refund.id, refund.amount))
            .instrument(tracing::info_span!("gateway_refund"))
            .await;
        match answer {
            Ok(gateway_id) => {
                refund.status = RefundStatus::Succeeded;
                refund.gateway_refund_id = Some(gateway_id);
            }
            Err(GatewayError::Rejected { status, message }) => {
                refund.status = RefundStatus::Failed;
                refund.failure_reason =
                    Some(format!("refused by the gateway ({status}): {message}"));
            }
            Err(e) => {
                tracing::warn!(refund_id = %refund.id, error = %e, "refund outcome unknown; will ask again");
                refunds::touch(self.ledger(), &refund.id).await?;
                return Ok(refund);
            }
        }
        if !refunds::settle(self.ledger(), &refund).await? {
            // settled by another try meanwhile: what is stored stands
            if let Some(stored) = refunds::for_payment(self.ledger(), &refund.transaction_id)
                .await?
                .into_iter()
                .find(|r| r.id == refund.id)
            {
                return Ok(stored);
            }
        }
        tracing::info!(refund_id = %refund.id, transaction_id = %refund.transaction_id, status = ?refund.status, "refund settled");
        Ok(refund)
    }

    /// The reconciler's share: lapsed holds, lost captures and voids, pending refunds.
    /// Answers how many it finished.
    pub async fn pass(&self, after: Duration, batch: i64) -> Result<usize, BackendError> {
        let mut done = 0;
        for payment in self.ledger().lapsed_holds(batch).await? {
            let id = payment.record.transaction_id.clone();
            let result = match payment.record.status {
                PaymentStatus::Authorized => self.void(payment, "expired").await,
                PaymentStatus::RequiresReview => self.reject(payment, "expired").await,
                _ => continue,
            };
            match result {
                Ok(_) => done += 1,
                Err(e) => {
                    // looked at again later, so one that cannot be ended does not hold up the rest
                    tracing::error!(transaction_id = %id, error = %e.body(), "could not end a lapsed hold; will try again in 5 minutes");
                    self.ledger()
                        .postpone(&id, Duration::from_secs(300))
                        .await?;
                }
            }
        }
        for payment in self.ledger().ops_older_than(after, batch).await? {
            let id = payment.record.transaction_id.clone();
            match self.finish_op(payment.record, payment.version).await {
                Ok((200, _)) => done += 1,
                Ok(_) => {
                    self.ledger().postpone(&id, after).await?;
                }
                Err(e) => {
                    tracing::warn!(transaction_id = %id, error = %e.body(), "could not finish a capture or void; will try again")
                }
            }
        }
        let age = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        for refund in refunds::pending_older_than(self.ledger(), age, batch).await? {
            let key = self
                .ledger()
                .get(&refund.transaction_id)
                .await?
                .and_then(|p| p.record.gateway_key);
            let settled = self.finish_refund(refund, key.as_deref()).await?;
            if settled.status != RefundStatus::Pending {
                done += 1;
            }
        }
        Ok(done)
    }
}
