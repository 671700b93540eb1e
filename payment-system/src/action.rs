//! The Action: charge through the breaker, store the record, queue the confirmation.
//!
//! A denied verdict is recorded as `FRAUD_BLOCKED` without calling the gateway. Otherwise the
//! gateway circuit breaker is asked first: when open, the payment fails at once with
//! `gateway_unavailable` and the time until the breaker admits a trial. A charge that goes
//! through is classified for the breaker: approvals and declines show a working gateway;
//! errors, refused connections and answers slower than the gateway timeout are failures.
//! Every outcome is stored before it is answered; successes are queued for confirmation.

use std::sync::Arc;
use std::time::Duration;

use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::jidoka::{CircuitBreaker, Outcome};
use tai_core::kanban::SharedQueue;
use tai_core::pipeline::Action;
use tai_core::policy::{Decision, Verdict};
use tai_core::store::StateStore;
use tracing::Instrument;

use crate::PaymentAttempt;
use crate::card::CardSummary;
use crate::fraud::{FraudFactSource, FraudFacts};
use crate::gateway::{ChargeOutcome, ChargeRequest, Gateway, GatewayError};
use crate::keys;
use crate::metrics::PaymentMetrics;
use crate::record::{FailureInfo, PaymentRecord, PaymentStatus};

/// What the action produced.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The stored record.
    pub record: PaymentRecord,
    /// `Retry-After` to send, when known.
    pub retry_after: Option<Duration>,
}

/// Charges, records and queues.
#[derive(Debug, Clone)]
pub struct PaymentAction {
    /// The gateway.
    pub gateway: Arc<dyn Gateway>,
    /// Its breaker.
    pub breaker: CircuitBreaker,
    /// Where records live.
    pub store: Arc<dyn StateStore>,
    /// Successful charges to confirm.
    pub confirmations: SharedQueue<String>,
    /// Payment metrics.
    pub metrics: Arc<PaymentMetrics>,
    /// To remember currencies paid in.
    pub facts: FraudFactSource,
    /// Time.
    pub clock: SharedClock,
    /// A charge slower than this is abandoned and counted as a gateway failure.
    pub gateway_timeout: Duration,
}

fn failure(kind: &str, code: &str, message: impl Into<String>) -> Option<FailureInfo> {
    Some(FailureInfo {
        kind: kind.into(),
        code: code.into(),
        message: message.into(),
    })
}

impl PaymentAction {
    async fn charge(
        &self,
        attempt: &PaymentAttempt,
    ) -> (
        PaymentStatus,
        u16,
        Option<String>,
        Option<FailureInfo>,
        Option<Duration>,
    ) {
        let permit = match tracing::info_span!("breaker_checked", breaker = self.breaker.name())
            .in_scope(|| self.breaker.try_acquire())
        {
            Ok(p) => p,
            Err(rejected) => {
                tracing::warn!(transaction_id = %attempt.transaction_id, "gateway breaker open; not calling the gateway");
                return (
                    PaymentStatus::Failed,
                    503,
                    None,
                    failure(
                        "api_error",
                        "gateway_unavailable",
                        "The payment gateway is unavailable (circuit breaker open); nothing was charged. Retry later.",
                    ),
                    Some(rejected.retry_after),
                );
            }
        };
        let req = &attempt.request;
        let charge = ChargeRequest {
            amount: req.amount,
            currency: req.currency.code(),
            card: req.card.clone(),
            reference: attempt.transaction_id.clone(),
            // the client's key when there is one, so a retried request dedupes at the gateway too
            idempotency_key: attempt
                .idempotency_key
                .clone()
                .map(|k| format!("{}:{k}", req.merchant_id))
                .unwrap_or_else(|| attempt.transaction_id.clone()),
        };
        let span = tracing::info_span!(
            "gateway_called",
            gateway = self.gateway.kind(),
            outcome = tracing::field::Empty
        );
        let result = match tokio::time::timeout(self.gateway_timeout, self.gateway.charge(&charge))
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(
                u64::try_from(self.gateway_timeout.as_millis()).unwrap_or(u64::MAX),
            )),
        };
        let outcome = if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        permit.record(outcome);
        match result {
            Ok(ChargeOutcome::Approved { gateway_id }) => {
                span.record("outcome", "approved");
                (PaymentStatus::Success, 200, Some(gateway_id), None, None)
            }
            Ok(ChargeOutcome::Declined) => {
                span.record("outcome", "declined");
                (
                    PaymentStatus::Failed,
                    402,
                    None,
                    failure("card_error", "card_declined", "The card was declined."),
                    None,
                )
            }
            Err(e) => {
                span.record("outcome", "error");
                tracing::warn!(transaction_id = %attempt.transaction_id, error = %e, "gateway call failed");
                (
                    PaymentStatus::Failed,
                    502,
                    None,
                    failure(
                        "api_error",
                        "gateway_error",
                        format!("The payment gateway failed: {e}. Nothing was charged."),
                    ),
                    None,
                )
            }
        }
    }
}

impl Action<PaymentAttempt, FraudFacts> for PaymentAction {
    type Output = Answer;
    type Error = BackendError;

    async fn act(
        &self,
        attempt: &PaymentAttempt,
        facts: &FraudFacts,
        verdict: &Verdict,
    ) -> Result<Answer, BackendError> {
        let req = &attempt.request;
        let (status, http_status, gateway_id, error, retry_after) =
            if verdict.decision == Decision::Deny {
                let rules: Vec<&str> = verdict.reasons.iter().map(|r| r.rule.as_str()).collect();
                (
                    PaymentStatus::FraudBlocked,
                    402,
                    None,
                    failure(
                        "card_error",
                        "fraud_blocked",
                        format!(
                            "Blocked by the fraud policy (score {}): {}.",
                            verdict.score,
                            rules.join(", ")
                        ),
                    ),
                    None,
                )
            } else {
                self.charge(attempt).await
            };
        let took = attempt.received.elapsed();
        let record = PaymentRecord {
            transaction_id: attempt.transaction_id.clone(),
            status,
            amount: req.amount,
            currency: req.currency.code().to_owned(),
            customer_id: req.customer_id.clone(),
            merchant_id: req.merchant_id.clone(),
            timestamp: attempt.received_at,
            processing_time_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            fraud_score: verdict.score,
            fraud_reasons: verdict.reasons.clone(),
            gateway_response: gateway_id,
            trace_id: attempt.trace_id.clone(),
            error,
            card: req.card.as_ref().map(CardSummary::from),
            description: req.description.clone(),
            metadata: req.metadata.clone(),
            confirmed_at: None,
            http_status,
        };
        async {
            let bytes = serde_json::to_vec(&record).unwrap_or_default();
            self.store
                .put(&keys::transaction(&record.transaction_id), bytes, None)
                .await
        }
        .instrument(tracing::info_span!("recorded", status = status.as_str()))
        .await?;
        if status == PaymentStatus::Success {
            let (remembered, queued) = tokio::join!(
                self.facts.remember_currency(
                    &req.customer_id,
                    req.currency.code(),
                    &facts.currencies_seen
                ),
                self.confirmations
                    .push(record.transaction_id.clone())
                    .instrument(tracing::info_span!(
                        "queued",
                        queue = "payment-confirmations"
                    )),
            );
            if let Err(e) = remembered {
                tracing::warn!(error = %e, "could not remember the currency for the geo rule");
            }
            if let Err(e) = queued {
                // the charge stands; the record stays unconfirmed until a reconciliation
                tracing::error!(transaction_id = %record.transaction_id, error = %e, "could not queue the confirmation");
            }
        }
        let rules: Vec<&str> = verdict.reasons.iter().map(|r| r.rule.as_str()).collect();
        self.metrics.record(status, http_status, &rules, took);
        tracing::info!(
            transaction_id = %record.transaction_id,
            status = status.as_str(),
            amount = %record.amount,
            currency = %record.currency,
            merchant_id = %record.merchant_id,
            card = record.card.as_ref().map(|c| c.masked.as_str()).unwrap_or("-"),
            fraud_score = %record.fraud_score,
            "payment answered"
        );
        Ok(Answer {
            record,
            retry_after,
        })
    }
}

/// Confirms queued successful charges: sets `confirmed_at` on the record, then acks.
pub async fn confirmation_worker(
    queue: SharedQueue<String>,
    store: Arc<dyn StateStore>,
    clock: SharedClock,
) {
    loop {
        let delivery = match queue.pull().await {
            Ok(Some(d)) => d,
            Ok(None) => return, // closed and drained
            Err(e) => {
                tracing::error!(error = %e, "confirmation queue failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let key = keys::transaction(&delivery.item);
        let confirmed = async {
            let Some(bytes) = store.get(&key).await? else {
                return Ok::<bool, BackendError>(false);
            };
            let Ok(mut record) = serde_json::from_slice::<PaymentRecord>(&bytes) else {
                return Ok(false);
            };
            if record.confirmed_at.is_none() {
                record.confirmed_at = Some(clock.wall());
                store
                    .put(&key, serde_json::to_vec(&record).unwrap_or_default(), None)
                    .await?;
            }
            Ok(true)
        }
        .await;
        let settled = match confirmed {
            Ok(true) => delivery.ack().await,
            Ok(false) => {
                tracing::error!(transaction_id = %delivery.item, "confirmation for an unknown transaction; dropped");
                delivery.ack().await
            }
            Err(e) => {
                tracing::warn!(error = %e, "confirmation failed; will be redelivered");
                delivery.nack().await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(error = %e, "could not settle a confirmation delivery");
        }
    }
}
