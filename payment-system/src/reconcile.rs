//! The reconciler: nothing is lost when the service stops mid-charge.
//!
//! Before the gateway is called, a payment is stored as `PROCESSING` (the write-ahead intent).
//! Normally the answer settles it within the gateway timeout. When that does not happen (the
//! process was killed mid-call, or the gateway did not answer in time), the reconciler, on any
//! replica, finishes it: it asks the gateway how the charge with the payment's idempotency key
//! ended (approved, declined, failed at the gateway, or not found) and settles the
//! payment with a compare-and-swap on its version, with the answer a retry with the client's
//! `Idempotency-Key` will replay and the outcome's event, in one transaction. Replicas may
//! look at the same payment at once: the lookup is harmless and only one settlement wins.
//!
//! "Not found" is not "never charged" at once: a real acquirer's lookup can lag its charges by
//! seconds. The payment stays `PROCESSING` until it has been unknown for `not_found_grace`
//! (`RECONCILE_NOT_FOUND_GRACE_MS`, two minutes) counted from its intent, and only then fails.
//! Even then it is looked up again every `recheck_every` for `recheck_for`: a charge that turns
//! up for a payment already failed is reversed at the gateway (voided or refunded) and the
//! payment becomes `REVERSED`, so no customer pays for a payment its merchant was told failed.
//!
//! It also queues again the confirmation of successes that stayed unconfirmed (the queue was
//! down when they succeeded), and sweeps idempotency keys whose time is up. Both lists are
//! read through partial indexes of the system of record, never by scanning every payment.

use std::sync::Arc;
use std::time::Duration;

use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::kanban::SharedQueue;
use tai_core::runtime::Leadership;
use tokio::sync::watch;

use crate::action::Charged;
use crate::gateway::{ChargeOutcome, Gateway, Reversal};
use crate::ledger::{Ledger, Versioned};
use crate::metrics::PaymentMetrics;
use crate::record::{FailureInfo, PaymentStatus};

/// What a pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Payments settled.
    pub finished: usize,
    /// Payments old enough that are still unsettled (the gateway did not answer, or another
    /// replica settled them first).
    pub waiting: usize,
    /// Confirmations queued again.
    pub requeued: usize,
    /// Late charges of failed payments reversed.
    pub reversed: usize,
}

/// Finishes payments left `PROCESSING`.
#[derive(Debug, Clone)]
pub struct Reconciler {
    /// The lifecycle's share of the work (lapsed holds, lost captures and voids, pending
    /// refunds), when the service has one.
    pub lifecycle: Option<crate::lifecycle::Lifecycle>,
    /// The system of record.
    pub ledger: Ledger,
    /// The gateway asked how charges ended.
    pub gateway: Arc<dyn Gateway>,
    /// Successful charges to confirm.
    pub confirmations: SharedQueue<String>,
    /// Metrics.
    pub metrics: Arc<PaymentMetrics>,
    /// Time.
    pub clock: SharedClock,
    /// A payment is reconciled once its intent is this old (past the gateway timeout, so a
    /// request still in flight is left alone).
    pub after: Duration,
    /// A success unconfirmed this long has its confirmation queued again.
    pub confirm_after: Duration,
    /// How long a charge the gateway does not know of stays `PROCESSING` (from its intent)
    /// before it is failed as never received.
    pub not_found_grace: Duration,
    /// How long a payment failed as not found is looked up again.
    pub recheck_for: Duration,
    /// How often it is looked up again.
    pub recheck_every: Duration,
    /// How long a `PROCESSING` payment that could not be settled waits before its next lookup
    /// (the others behind it get their turn meanwhile).
    pub look_again: Duration,
    /// How many payments one pass looks at, per kind of work.
    pub batch: i64,
}

impl Reconciler {
    /// Runs until shutdown: while this replica holds the lease `leadership` tells of, a pass every `every` (each an
    /// indexed query that finds nothing when nothing is left over) and a sweep of expired
    /// idempotency keys every minute; otherwise it stands by and takes the lease over when its
    /// holder stops renewing it. (Every write of a pass is a compare-and-swap on the record, so
    /// a holder that overran its lease and a new one cannot both settle a payment.)
    pub async fn run(
        self,
        every: Duration,
        leadership: Leadership,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_sweep = std::time::Instant::now();
        loop {
            // one replica reconciles at a time; the others stand by to take over
            if leadership.is_leader() {
                match self.pass().await {
                    Ok(pass) => self
                        .metrics
                        .processing_backlog
                        .set(i64::try_from(pass.waiting).unwrap_or(i64::MAX)),
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciliation pass failed; will try again")
                    }
                }
                if last_sweep.elapsed() >= Duration::from_secs(60) {
                    last_sweep = std::time::Instant::now();
                    match self.ledger.idempotency().sweep().await {
                        Ok(n) if n > 0 => {
                            tracing::debug!(keys = n, "expired idempotency keys swept")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "could not sweep idempotency keys"),
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass over the payments left `PROCESSING` and the successes left unconfirmed.
    pub async fn pass(&self) -> Result<Pass, BackendError> {
        let mut pass = Pass {
            finished: 0,
            waiting: 0,
            requeued: 0,
            reversed: 0,
        };
        for payment in self
            .ledger
            .processing_older_than(self.after, self.batch)
            .await?
        {
            if self.finish(payment).await? {
                pass.finished += 1;
            } else {
                pass.waiting += 1;
            }
        }
        for id in self
            .ledger
            .unconfirmed_older_than(self.confirm_after, self.batch)
            .await?
        {
            if self.confirmations.push(id).await.is_ok() {
                pass.requeued += 1;
            }
        }
        for payment in self
            .ledger
            .recheck_due(self.recheck_every, self.batch)
            .await?
        {
            if self.recheck(payment).await? {
                pass.reversed += 1;
            }
        }
        if let Some(lifecycle) = &self.lifecycle {
            pass.finished += lifecycle.pass(self.after, self.batch).await?;
        }
        Ok(pass)
    }

    /// Looks up a payment failed as not found; reverses a charge that turned up since.
    async fn recheck(&self, payment: Versioned) -> Result<bool, BackendError> {
        let Versioned {
            mut record,
            version,
            ..
        } = payment;
        let id = record.transaction_id.clone();
        let Some(key) = record.gateway_key.clone() else {
            return Ok(false);
        };
        // Whatever happens below, this payment's next look is `recheck_every` away (a row that
        // keeps failing must not hold the others up), except once it is reversed.
        let gateway_id = match self.gateway.lookup(&key).await {
            Ok(Some(ChargeOutcome::Approved { gateway_id }))
            | Ok(Some(ChargeOutcome::Authorized { gateway_id }))
            | Ok(Some(ChargeOutcome::Reversed { gateway_id })) => gateway_id,
            Ok(_) => {
                self.ledger.rechecked(&id, version).await?;
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(transaction_id = %id, error = %e, "recheck lookup failed; will try again");
                self.ledger.rechecked(&id, version).await?;
                return Ok(false);
            }
        };
        tracing::error!(transaction_id = %id, "a charge turned up for a failed payment; reversing it");
        match self.gateway.reverse(&key).await {
            Ok(Reversal::Reversed) => {}
            Ok(other) => {
                tracing::error!(transaction_id = %id, ?other, "the gateway would not reverse the late charge; left for a person");
                self.ledger.rechecked(&id, version).await?;
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(transaction_id = %id, error = %e, "reversal failed; will try again");
                self.ledger.rechecked(&id, version).await?;
                return Ok(false);
            }
        }
        record.status = PaymentStatus::Reversed;
        record.gateway_response = Some(gateway_id);
        record.error = Some(FailureInfo {
            kind: "api_error".into(),
            code: "charge_reversed".into(),
            message: "The charge reached the payment gateway after the payment had been failed; it was reversed there, so no money moved.".into(),
        });
        // The charge is reversed at the gateway: record it, even if another replica bumped the
        // row's version meanwhile (a recheck of its own).
        let mut version = version;
        for _ in 0..3 {
            if self.ledger.reverse(&record, version).await? {
                self.metrics.reconciled(record.status);
                return Ok(true);
            }
            match self.ledger.get(&id).await? {
                Some(current) if current.record.status == PaymentStatus::Failed => {
                    version = current.version;
                }
                // reversed by another replica, or no longer ours to change
                _ => return Ok(false),
            }
        }
        Ok(false)
    }

    async fn finish(&self, payment: Versioned) -> Result<bool, BackendError> {
        let Versioned {
            mut record,
            version,
            updated_at,
        } = payment;
        let id = record.transaction_id.clone();
        let Some(key) = record.gateway_key.clone() else {
            tracing::error!(transaction_id = %id, "PROCESSING payment without a gateway key; left for a person");
            return Ok(false);
        };
        let charged = match self.gateway.lookup(&key).await {
            Ok(Some(outcome)) => Charged::decided(outcome),
            Ok(None) => {
                let unknown_for = self.clock.wall().timestamp_millis() - updated_at;
                if unknown_for < i64::try_from(self.not_found_grace.as_millis()).unwrap_or(i64::MAX)
                {
                    // the gateway's books may lag its charges: ask again later
                    self.ledger.postpone(&id, self.look_again).await?;
                    return Ok(false);
                }
                let unfound = Charged {
                    status: PaymentStatus::Failed,
                    http_status: 502,
                    gateway_id: None,
                    error: Some(FailureInfo {
                        kind: "api_error".into(),
                        code: "charge_not_found".into(),
                        message: format!(
                            "The payment gateway has no charge for this payment {} s after it was sent (the service stopped or the request was lost on the way). Should a charge still turn up, it is reversed at the gateway and the payment shows REVERSED.",
                            unknown_for / 1000
                        ),
                    }),
                };
                record.status = unfound.status;
                record.http_status = unfound.http_status;
                record.gateway_response = None;
                record.error = unfound.error;
                let until = self.clock.wall().timestamp_millis()
                    + i64::try_from(self.recheck_for.as_millis()).unwrap_or(i64::MAX / 4);
                if !self.ledger.settle_unfound(&record, version, until).await? {
                    return Ok(false);
                }
                self.metrics.reconciled(record.status);
                tracing::warn!(transaction_id = %id, "payment failed: the gateway has no charge for it (looked up again for a while)");
                return Ok(true);
            }
            Err(e) => {
                tracing::warn!(transaction_id = %id, error = %e, "gateway lookup failed; will try again");
                self.ledger.postpone(&id, self.look_again).await?;
                return Ok(false);
            }
        };
        record.status = charged.status;
        record.http_status = charged.http_status;
        record.gateway_response = charged.gateway_id;
        record.error = charged.error;
        // an authorization settled here expires like any other; a success shows its capture
        self.ledger.stamp(&mut record);
        if !self.ledger.settle(&record, version).await? {
            // settled meanwhile by the live request or another replica
            return Ok(false);
        }
        self.metrics.reconciled(record.status);
        tracing::warn!(transaction_id = %id, status = record.status.as_str(), "payment reconciled");
        if record.status == PaymentStatus::Success
            && let Err(e) = self.confirmations.push(id.clone()).await
        {
            // a later pass queues it again
            tracing::warn!(transaction_id = %id, error = %e, "could not queue the confirmation");
        }
        Ok(true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rust_decimal::Decimal;
    use tai_core::clock::ManualClock;
    use tai_core::kanban::{MemoryQueue, QueueConfig, QueueStatus};

    use super::*;
    use crate::gateway::sandbox::Sandbox;
    use crate::idempotency::Claim;
    use crate::record::PaymentRecord;

    /// A reconciler over `ledger` and `sandbox` with the tests' usual settings.
    fn reconciler(
        ledger: &Ledger,
        sandbox: Arc<Sandbox>,
        queue: &MemoryQueue<String>,
        clock: &ManualClock,
    ) -> Reconciler {
        let kaizen = tai_core::kaizen::Kaizen::new("t", clock.shared());
        Reconciler {
            lifecycle: None,
            ledger: ledger.clone(),
            gateway: sandbox,
            confirmations: Arc::new(queue.clone()),
            metrics: Arc::new(PaymentMetrics::new(&kaizen, clock.shared())),
            clock: clock.shared(),
            after: Duration::from_secs(10),
            confirm_after: Duration::from_secs(60),
            not_found_grace: Duration::from_secs(30),
            recheck_for: Duration::from_secs(3600),
            recheck_every: Duration::from_secs(10),
            look_again: Duration::from_secs(1),
            batch: 100,
        }
    }

    pub(crate) fn processing(id: &str, key: &str, clock: &ManualClock) -> PaymentRecord {
        PaymentRecord {
            transaction_id: id.into(),
            status: PaymentStatus::Processing,
            amount: Decimal::new(1250, 2),
            currency: "USD".into(),
            customer_id: "c".into(),
            merchant_id: "m".into(),
            timestamp: tai_core::clock::Clock::wall(clock),
            processing_time_ms: 0,
            fraud_score: Decimal::ZERO,
            fraud_reasons: Vec::new(),
            gateway_response: None,
            trace_id: "t".into(),
            error: None,
            card: None,
            description: None,
            metadata: Default::default(),
            confirmed_at: None,
            http_status: 0,
            gateway_key: Some(key.into()),
            idempotency_key: Some("client-key".into()),
            fingerprint: Some("fp".into()),
            claim_token: None,
            capture: true,
            amount_captured: None,
            expires_at: None,
            void_reason: None,
            review: None,
            pending: None,
            card_token: None,
        }
    }

    #[tokio::test]
    async fn an_authorization_the_reconciler_settles_still_expires() {
        let clock = ManualClock::new();
        let ledger = crate::ledger::tests::ledger(&clock).await;
        let sandbox = Arc::new(Sandbox::new(Duration::ZERO, 0.0));
        let ask = crate::gateway::sandbox::ChargeAsk {
            reference: "txn_auth",
            amount: Decimal::new(1250, 2),
            currency: "USD",
            capture: false,
            ..Default::default()
        };
        sandbox.charge_with("m:auth", &ask).await;
        let queue = MemoryQueue::<String>::new(QueueConfig::new("c", 10), clock.shared());
        let r = reconciler(&ledger, sandbox, &queue, &clock);
        let mut rec = processing("txn_auth", "m:auth", &clock);
        rec.capture = false;
        rec.idempotency_key = None;
        rec.fingerprint = None;
        ledger.begin_charge(&rec).await.expect("intent");
        clock.advance(Duration::from_secs(10));
        assert_eq!(r.pass().await.expect("pass").finished, 1);
        let settled = ledger.get("txn_auth").await.expect("db").expect("stored");
        assert_eq!(settled.record.status, PaymentStatus::Authorized);
        assert!(
            settled.record.expires_at.is_some(),
            "an authorization settled by lookup lapses like any other"
        );
        // a week later it is among the lapsed holds
        clock.advance(Duration::from_secs(7 * 86_400 + 1));
        let lapsed = ledger.lapsed_holds(10).await.expect("db");
        assert_eq!(lapsed.len(), 1);
    }

    #[tokio::test]
    async fn finishes_what_the_gateway_decided_and_fails_what_it_never_saw() {
        let clock = ManualClock::new();
        let ledger = crate::ledger::tests::ledger(&clock).await;
        let sandbox = Arc::new(Sandbox::new(Duration::ZERO, 0.0));
        // the gateway approved one charge; the other never reached it
        let crate::gateway::sandbox::SandboxAnswer::Approved(gw_id) =
            sandbox.decide("m:charged", None).await
        else {
            panic!("approved")
        };
        let queue = MemoryQueue::<String>::new(QueueConfig::new("c", 10), clock.shared());
        let Ok(Claim::Proceed { token }) =
            ledger.idempotency().claim("m", "client-key", "fp").await
        else {
            panic!("a fresh key")
        };
        let r = reconciler(&ledger, sandbox, &queue, &clock);
        for (id, key) in [("txn_a", "m:charged"), ("txn_b", "m:lost")] {
            let mut rec = processing(id, key, &clock);
            rec.claim_token = Some(token.clone());
            if id == "txn_b" {
                // only the first came with a client key
                rec.idempotency_key = None;
                rec.fingerprint = None;
            }
            ledger.begin_charge(&rec).await.expect("intent");
        }
        assert_eq!(
            r.pass().await.expect("pass"),
            Pass {
                finished: 0,
                waiting: 0,
                requeued: 0,
                reversed: 0
            },
            "too young: a request may still be in flight"
        );
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            r.pass().await.expect("pass"),
            Pass {
                finished: 1,
                waiting: 1,
                requeued: 0,
                reversed: 0
            },
            "the charged one settles; the unknown one waits: lookups can lag charges"
        );
        assert_eq!(
            ledger
                .get("txn_b")
                .await
                .expect("db")
                .expect("b")
                .record
                .status,
            PaymentStatus::Processing
        );
        clock.advance(Duration::from_secs(20));
        assert_eq!(
            r.pass().await.expect("pass"),
            Pass {
                finished: 1,
                waiting: 0,
                requeued: 0,
                reversed: 0
            },
            "failed once unknown for the grace period"
        );
        let a = ledger.get("txn_a").await.expect("db").expect("a").record;
        assert_eq!(
            (a.status, a.gateway_response.as_deref()),
            (PaymentStatus::Success, Some(gw_id.as_str()))
        );
        let b = ledger.get("txn_b").await.expect("db").expect("b").record;
        assert_eq!((b.status, b.http_status), (PaymentStatus::Failed, 502));
        assert_eq!(b.error.expect("why").code, "charge_not_found");
        assert_eq!(
            queue.depth().ready,
            1,
            "the success is queued for confirmation"
        );
        // the client's retry replays the reconciled answer
        match ledger.idempotency().claim("m", "client-key", "fp").await {
            Ok(Claim::Replay { status, body }) => {
                assert_eq!((status, body["status"].as_str()), (200, Some("SUCCESS")))
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        // a success whose confirmation was lost is queued again once it is old enough
        clock.advance(Duration::from_secs(40));
        assert_eq!(r.pass().await.expect("pass").requeued, 1);
        assert!(ledger.confirm("txn_a").await.expect("db"));
        assert_eq!(r.pass().await.expect("pass").requeued, 0);
    }

    #[tokio::test]
    async fn a_charge_that_turns_up_after_the_payment_failed_is_reversed() {
        let clock = ManualClock::new();
        let ledger = crate::ledger::tests::ledger(&clock).await;
        let sandbox = Arc::new(Sandbox::new(Duration::ZERO, 0.0));
        let queue = MemoryQueue::<String>::new(QueueConfig::new("c", 10), clock.shared());
        let r = Reconciler {
            lifecycle: None,
            after: Duration::from_secs(1),
            not_found_grace: Duration::from_secs(5),
            ..reconciler(&ledger, sandbox.clone(), &queue, &clock)
        };
        let mut rec = processing("txn_late", "m:late", &clock);
        rec.idempotency_key = None;
        rec.fingerprint = None;
        ledger.begin_charge(&rec).await.expect("intent");
        clock.advance(Duration::from_secs(5));
        assert_eq!(r.pass().await.expect("pass").finished, 1);
        let failed = ledger
            .get("txn_late")
            .await
            .expect("db")
            .expect("rec")
            .record;
        assert_eq!(failed.status, PaymentStatus::Failed);
        // the charge reaches the gateway late
        assert!(matches!(
            sandbox.decide("m:late", None).await,
            crate::gateway::sandbox::SandboxAnswer::Approved(_)
        ));
        assert_eq!(r.pass().await.expect("pass").reversed, 0, "not due yet");
        clock.advance(Duration::from_secs(10));
        assert_eq!(r.pass().await.expect("pass").reversed, 1);
        let reversed = ledger
            .get("txn_late")
            .await
            .expect("db")
            .expect("rec")
            .record;
        assert_eq!(reversed.status, PaymentStatus::Reversed);
        assert_eq!((sandbox.charges(), sandbox.reversed()), (1, 1));
        clock.advance(Duration::from_secs(10));
        assert_eq!(r.pass().await.expect("pass").reversed, 0, "once");
        let kinds: Vec<String> = tai_core::outbox::read(ledger.database(), 0, 10)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.subject)
            .collect();
        assert_eq!(
            kinds,
            vec![
                "payments.events.payment.failed",
                "payments.events.payment.reversed"
            ]
        );
    }

    #[tokio::test]
    async fn a_payment_the_gateway_cannot_settle_yet_does_not_hold_up_the_ones_behind_it() {
        let clock = ManualClock::new();
        let ledger = crate::ledger::tests::ledger(&clock).await;
        let sandbox = Arc::new(Sandbox::new(Duration::ZERO, 0.0));
        let queue = MemoryQueue::<String>::new(QueueConfig::new("c", 10), clock.shared());
        let r = Reconciler {
            lifecycle: None,
            after: Duration::from_secs(1),
            not_found_grace: Duration::from_secs(600),
            look_again: Duration::from_secs(5),
            batch: 1,
            ..reconciler(&ledger, sandbox.clone(), &queue, &clock)
        };
        // the older payment's charge is unknown to the gateway (for now); the newer one's is
        // approved, and one pass only looks at one payment
        for (id, key) in [("txn_unknown", "m:unknown"), ("txn_known", "m:known")] {
            let mut rec = processing(id, key, &clock);
            rec.idempotency_key = None;
            rec.fingerprint = None;
            ledger.begin_charge(&rec).await.expect("intent");
            clock.advance(Duration::from_millis(10));
        }
        assert!(matches!(
            sandbox.decide("m:known", None).await,
            crate::gateway::sandbox::SandboxAnswer::Approved(_)
        ));
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            r.pass().await.expect("pass").waiting,
            1,
            "the unknown one, postponed"
        );
        assert_eq!(
            r.pass().await.expect("pass").finished,
            1,
            "the known one's turn"
        );
        let known = ledger
            .get("txn_known")
            .await
            .expect("db")
            .expect("rec")
            .record;
        assert_eq!(known.status, PaymentStatus::Success);
        clock.advance(Duration::from_secs(5));
        assert_eq!(
            r.pass().await.expect("pass").waiting,
            1,
            "looked at again later"
        );
    }
}
