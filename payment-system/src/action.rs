//! The Action: charge through the breaker, store the record, queue the confirmation.
//!
//! A denied verdict is recorded as `FRAUD_BLOCKED` without calling the gateway. Otherwise the
//! gateway circuit breaker is asked first: when open, the payment fails at once with
//! `gateway_unavailable` and the time until the breaker admits a trial. A charge that goes
//! through is classified for the breaker: approvals and declines show a working gateway;
//! errors, refused connections and answers slower than the gateway timeout are failures.
//! Every outcome is stored in the system of record ([`crate::ledger`]) before it is answered,
//! with its idempotent answer and its event in the same transaction; successes are queued for
//! confirmation. Before the gateway is called, the payment is stored as `PROCESSING` (the
//! write-ahead intent), so that a crash mid-charge, or a gateway that does not answer in time,
//! leaves something for the reconciler (`crate::reconcile`) to finish by asking the gateway
//! how the charge ended.

use std::sync::Arc;
use std::time::Duration;

use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::jidoka::{CircuitBreaker, Outcome};
use tai_core::kanban::{SharedQueue, Worked};
use tai_core::pipeline::{Action, Decided};
use tai_core::policy::{Decision, Verdict};
use tracing::Instrument;

use crate::PaymentAttempt;
use crate::card::CardSummary;
use crate::fraud::{FraudFactSource, FraudFacts};
use crate::gateway::{ChargeOutcome, ChargeRequest, Gateway, GatewayError};
use crate::ledger::Ledger;
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
    pub ledger: Ledger,
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

/// How a gateway call ended, as far as this process knows.
#[derive(Debug)]
pub(crate) struct Charged {
    pub(crate) status: PaymentStatus,
    pub(crate) http_status: u16,
    pub(crate) gateway_id: Option<String>,
    pub(crate) error: Option<FailureInfo>,
}

impl Charged {
    /// The final answer for a gateway decision (a lookup's or a charge's).
    pub(crate) fn decided(outcome: ChargeOutcome) -> Self {
        match outcome {
            ChargeOutcome::Approved { gateway_id } => Self {
                status: PaymentStatus::Success,
                http_status: 200,
                gateway_id: Some(gateway_id),
                error: None,
            },
            ChargeOutcome::Authorized { gateway_id } => Self {
                status: PaymentStatus::Authorized,
                http_status: 200,
                gateway_id: Some(gateway_id),
                error: None,
            },
            ChargeOutcome::Declined => Self {
                status: PaymentStatus::Failed,
                http_status: 402,
                gateway_id: None,
                error: failure("card_error", "card_declined", "The card was declined."),
            },
            // a charge reversed before it was settled here: no money moved in the end
            ChargeOutcome::Reversed { gateway_id } => Self {
                status: PaymentStatus::Reversed,
                http_status: 502,
                gateway_id: Some(gateway_id),
                error: failure(
                    "api_error",
                    "charge_reversed",
                    "The charge was made and then reversed at the gateway; no money moved.",
                ),
            },
            ChargeOutcome::NotCharged => Self {
                status: PaymentStatus::Failed,
                http_status: 502,
                gateway_id: None,
                error: failure(
                    "api_error",
                    "gateway_error",
                    "The payment gateway failed to process the charge; it reports that nothing was charged.",
                ),
            },
        }
    }

    /// Sent, and the outcome is not known (a timeout, a 5xx, an unreadable answer): the gateway
    /// may have charged. `PROCESSING` (202) until a lookup settles it; never "nothing charged".
    fn unknown(transaction_id: &str, e: &GatewayError) -> Self {
        Self {
            status: PaymentStatus::Processing,
            http_status: 202,
            gateway_id: None,
            error: failure(
                "api_error",
                "gateway_outcome_unknown",
                format!(
                    "The payment gateway did not give a clear answer ({e}); whether it charged is not known yet. The payment is being reconciled with the gateway: read it at GET /payment/{transaction_id} or retry with the same Idempotency-Key."
                ),
            ),
        }
    }
}

/// The key the gateway deduplicates a charge by: unique to this payment (the transaction id,
/// with the merchant and client key when there is one, for whoever reads the gateway's books).
/// A retry with the client's key resumes this payment and never calls the gateway again, and a
/// key reused after its idempotency entry expired makes a new payment with a new gateway key,
/// so no key ever replays another payment's approval.
pub fn gateway_key(attempt: &PaymentAttempt) -> String {
    match &attempt.idempotency_key {
        Some(k) => format!(
            "{}:{k}:{}",
            attempt.request.merchant_id, attempt.transaction_id
        ),
        None => attempt.transaction_id.clone(),
    }
}

impl PaymentAction {
    /// Calls the gateway under a breaker permit. A decline or a gateway error is final; a
    /// timeout is not (the gateway may have charged): the payment stays `PROCESSING` and the
    /// reconciler asks the gateway how it ended.
    async fn charge(&self, attempt: &PaymentAttempt, permit: tai_core::jidoka::Permit) -> Charged {
        let req = &attempt.request;
        let charge = ChargeRequest {
            amount: req.amount,
            currency: req.currency.code(),
            card: req.card.clone(),
            reference: attempt.transaction_id.clone(),
            idempotency_key: gateway_key(attempt),
            capture: req.capture,
            card_token: None,
        };
        self.send(&charge, permit).await
    }

    /// Sends `charge` to the gateway under a breaker permit and classifies the answer.
    pub(crate) async fn send(
        &self,
        charge: &ChargeRequest,
        permit: tai_core::jidoka::Permit,
    ) -> Charged {
        let transaction_id = &charge.reference;
        let span = tracing::info_span!(
            "gateway_called",
            gateway = self.gateway.kind(),
            outcome = tracing::field::Empty
        );
        let timeout_ms = u64::try_from(self.gateway_timeout.as_millis()).unwrap_or(u64::MAX);
        let result = match tokio::time::timeout(self.gateway_timeout, self.gateway.charge(charge))
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(timeout_ms)),
        };
        // the breaker counts what shows a working gateway (approved, declined, refused as
        // invalid) as success, and everything else as failure
        permit.record(match &result {
            Ok(ChargeOutcome::NotCharged) => Outcome::Failure,
            Ok(_) | Err(GatewayError::Rejected { .. }) => Outcome::Success,
            Err(_) => Outcome::Failure,
        });
        match result {
            Ok(outcome) => {
                span.record(
                    "outcome",
                    match outcome {
                        ChargeOutcome::Approved { .. } => "approved",
                        ChargeOutcome::Authorized { .. } => "authorized",
                        ChargeOutcome::Declined => "declined",
                        ChargeOutcome::NotCharged => "failed",
                        ChargeOutcome::Reversed { .. } => "reversed",
                    },
                );
                Charged::decided(outcome)
            }
            // never sent, or refused unprocessed: nothing was charged, and that is known
            Err(e @ (GatewayError::Unreachable(_) | GatewayError::Rejected { .. })) => {
                span.record("outcome", "not_sent");
                tracing::warn!(transaction_id = %transaction_id, error = %e, "gateway call failed before processing");
                Charged {
                    status: PaymentStatus::Failed,
                    http_status: 502,
                    gateway_id: None,
                    error: failure(
                        "api_error",
                        "gateway_error",
                        format!(
                            "The payment gateway did not process the charge: {e}. Nothing was charged."
                        ),
                    ),
                }
            }
            Err(e) => {
                span.record("outcome", "unknown");
                tracing::warn!(transaction_id = %transaction_id, error = %e, "gateway outcome unknown; left for the reconciler");
                Charged::unknown(transaction_id, &e)
            }
        }
    }

    fn record(
        &self,
        attempt: &PaymentAttempt,
        verdict: &Verdict,
        charged: &Charged,
    ) -> PaymentRecord {
        let req = &attempt.request;
        let mut record = PaymentRecord {
            transaction_id: attempt.transaction_id.clone(),
            status: charged.status,
            amount: req.amount,
            currency: req.currency.code().to_owned(),
            customer_id: req.customer_id.clone(),
            merchant_id: req.merchant_id.clone(),
            timestamp: attempt.received_at,
            processing_time_ms: u64::try_from(attempt.received.elapsed().as_millis())
                .unwrap_or(u64::MAX),
            fraud_score: verdict.score,
            fraud_reasons: verdict.reasons.clone(),
            gateway_response: charged.gateway_id.clone(),
            trace_id: attempt.trace_id.clone(),
            error: charged.error.clone(),
            card: req.card.as_ref().map(CardSummary::from),
            description: req.description.clone(),
            metadata: req.metadata.clone(),
            confirmed_at: None,
            http_status: charged.http_status,
            gateway_key: Some(gateway_key(attempt)),
            idempotency_key: attempt.idempotency_key.clone(),
            fingerprint: attempt.fingerprint.clone(),
            claim_token: attempt.claim_token.clone(),
            capture: req.capture,
            amount_captured: None,
            expires_at: None,
            void_reason: None,
            review: None,
            pending: None,
            card_token: None,
        };
        self.ledger.stamp(&mut record);
        record
    }
}

/// A payment attempt the fraud policy decided on.
type Attempted<'a> = Decided<'a, PaymentAttempt, FraudFacts>;

impl Action<PaymentAttempt, FraudFacts> for PaymentAction {
    type Output = Answer;
    type Error = BackendError;

    async fn act(&self, decided: Attempted<'_>) -> Result<Answer, BackendError> {
        let Decided {
            signal: attempt,
            facts,
            verdict,
        } = decided;
        let req = &attempt.request;
        let mut retry_after = None;
        let mut card_token = None;
        let decided_here = |charged: Charged| (charged, None::<i64>);
        let (charged, intent_version) = if verdict.decision == Decision::Deny {
            let rules: Vec<&str> = verdict.reasons.iter().map(|r| r.rule.as_str()).collect();
            decided_here(Charged {
                status: PaymentStatus::FraudBlocked,
                http_status: 402,
                gateway_id: None,
                error: failure(
                    "card_error",
                    "fraud_blocked",
                    format!(
                        "Blocked by the fraud policy (score {}): {}.",
                        verdict.score,
                        rules.join(", ")
                    ),
                ),
            })
        } else if verdict.decision == Decision::Review {
            // Held for a person: nothing is charged now. The card is exchanged for the
            // gateway's token, so approval can charge it without this service keeping it.
            let token = match &req.card {
                None => Ok(None),
                Some(card) => {
                    match tokio::time::timeout(self.gateway_timeout, self.gateway.tokenize(card))
                        .instrument(tracing::info_span!("card_tokenized"))
                        .await
                    {
                        Ok(Ok(t)) => Ok(Some(t)),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("the gateway did not answer in time".to_owned()),
                    }
                }
            };
            match token {
                Ok(t) => {
                    card_token = t;
                    decided_here(Charged {
                        status: PaymentStatus::RequiresReview,
                        http_status: 202,
                        gateway_id: None,
                        error: None,
                    })
                }
                Err(e) => {
                    tracing::warn!(transaction_id = %attempt.transaction_id, error = %e, "could not hold the card for review");
                    decided_here(Charged {
                        status: PaymentStatus::Failed,
                        http_status: 502,
                        gateway_id: None,
                        error: failure(
                            "api_error",
                            "gateway_error",
                            format!(
                                "The payment needs a review, and the payment gateway could not hold the card for it ({e}). Nothing was charged."
                            ),
                        ),
                    })
                }
            }
        } else {
            match tracing::info_span!("breaker_checked", breaker = self.breaker.name())
                .in_scope(|| self.breaker.try_acquire())
            {
                Err(rejected) => {
                    tracing::warn!(transaction_id = %attempt.transaction_id, "gateway breaker open; not calling the gateway");
                    retry_after = Some(rejected.retry_after);
                    decided_here(Charged {
                        status: PaymentStatus::Failed,
                        http_status: 503,
                        gateway_id: None,
                        error: failure(
                            "api_error",
                            "gateway_unavailable",
                            "The payment gateway is unavailable (circuit breaker open); nothing was charged. Retry later.",
                        ),
                    })
                }
                Ok(permit) => {
                    // Write-ahead: the intent is stored (and the idempotency key moved to
                    // charge_started) before the gateway is called, so a crash in between
                    // leaves a PROCESSING record that the reconciler finishes.
                    let intent = Charged {
                        status: PaymentStatus::Processing,
                        http_status: 0,
                        gateway_id: None,
                        error: None,
                    };
                    let version = self
                        .ledger
                        .begin_charge(&self.record(attempt, verdict, &intent))
                        .instrument(tracing::info_span!("intent_recorded"))
                        .await?;
                    (self.charge(attempt, permit).await, Some(version))
                }
            }
        };
        let mut record = self.record(attempt, verdict, &charged);
        record.card_token = card_token;
        match (intent_version, record.status) {
            // not known yet: the record stays PROCESSING for the reconciler
            (Some(_), PaymentStatus::Processing) => {}
            (Some(version), _) => {
                let settled = self
                    .ledger
                    .settle(&record, version)
                    .instrument(tracing::info_span!(
                        "recorded",
                        status = record.status.as_str()
                    ))
                    .await;
                match settled {
                    Ok(true) => {}
                    Ok(false) => {
                        // the reconciler got there first (this request outlived its
                        // patience): answer with what the system of record says
                        if let Ok(Some(stored)) = self.ledger.get(&record.transaction_id).await {
                            return Ok(Answer {
                                record: stored.record,
                                retry_after,
                            });
                        }
                    }
                    Err(e) => {
                        // The gateway has answered but the answer could not be stored: the
                        // payment stays PROCESSING in the system of record and the reconciler
                        // settles it from the gateway. Never "nothing happened, retry".
                        tracing::error!(transaction_id = %record.transaction_id, error = %e, "could not store the gateway's answer; left PROCESSING for the reconciler");
                        let mut unknown = self.record(
                            attempt,
                            verdict,
                            &Charged {
                                status: PaymentStatus::Processing,
                                http_status: 202,
                                gateway_id: None,
                                error: failure(
                                    "api_error",
                                    "outcome_not_recorded",
                                    format!(
                                        "The payment gateway answered but the answer could not be recorded ({e}); the payment is being reconciled: read it at GET /payment/{}.",
                                        attempt.transaction_id
                                    ),
                                ),
                            },
                        );
                        unknown.processing_time_ms = record.processing_time_ms;
                        return Ok(Answer {
                            record: unknown,
                            retry_after: None,
                        });
                    }
                }
            }
            (None, _) => {
                self.ledger
                    .record_final(&record)
                    .instrument(tracing::info_span!(
                        "recorded",
                        status = record.status.as_str()
                    ))
                    .await?
            }
        }
        if record.status == PaymentStatus::Success {
            let (remembered, queued) = tokio::join!(
                self.facts.remember_currency(
                    &req.merchant_id,
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
                // the reconciler queues unconfirmed successes again
                tracing::error!(transaction_id = %record.transaction_id, error = %e, "could not queue the confirmation");
            }
        }
        let rules: Vec<&str> = verdict.reasons.iter().map(|r| r.rule.as_str()).collect();
        self.metrics.record(
            record.status,
            record.http_status,
            &rules,
            attempt.received.elapsed(),
        );
        tracing::info!(
            transaction_id = %record.transaction_id,
            status = record.status.as_str(),
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

/// Confirms one queued successful charge: marks the record confirmed (only a `SUCCESS` record,
/// once). An error hands it back to the queue, to be tried again.
pub async fn confirm(
    ledger: &Ledger,
    metrics: &PaymentMetrics,
    transaction_id: &str,
) -> Result<Worked, BackendError> {
    match ledger.confirm(transaction_id).await {
        Ok(true) => {
            metrics.confirmation("confirmed");
            Ok(Worked::Done)
        }
        Ok(false) => {
            metrics.confirmation("nothing_to_confirm");
            tracing::debug!(
                transaction_id,
                "nothing to confirm (confirmed already, or not a success)"
            );
            Ok(Worked::Done)
        }
        Err(e) => {
            metrics.confirmation("failed");
            Err(e)
        }
    }
}
