//! The reconciler: nothing is lost when the service stops mid-charge.
//!
//! Before the gateway is called, a payment is stored as `PROCESSING` with a marker. Normally
//! the answer replaces it within the gateway timeout and the marker is cleared. When that does
//! not happen (the process was killed mid-call, or the gateway did not answer in time), the
//! marker stays, and the reconciler, on any replica, finishes the payment: it asks the gateway
//! how the charge with the payment's idempotency key ended (approved, declined, or never
//! received, so nothing was charged), stores the final record, stores the answer a retry with
//! the client's `Idempotency-Key` will replay, and queues the confirmation of a success.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::kanban::SharedQueue;
use tai_core::store::StateStore;
use tokio::sync::watch;

use crate::action::Charged;
use crate::gateway::Gateway;
use crate::idempotency::Idempotency;
use crate::keys;
use crate::metrics::PaymentMetrics;
use crate::record::{FailureInfo, PaymentRecord, PaymentStatus};

/// What a pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Payments finished.
    pub finished: usize,
    /// Marked payments left for a later pass (too young, or the gateway did not answer).
    pub waiting: usize,
}

/// Finishes payments left `PROCESSING`.
#[derive(Debug, Clone)]
pub struct Reconciler {
    /// Records and markers.
    pub store: Arc<dyn StateStore>,
    /// The gateway asked how charges ended.
    pub gateway: Arc<dyn Gateway>,
    /// To store the answers retries replay.
    pub idempotency: Idempotency,
    /// Successful charges to confirm.
    pub confirmations: SharedQueue<String>,
    /// Metrics.
    pub metrics: Arc<PaymentMetrics>,
    /// Time.
    pub clock: SharedClock,
    /// A payment is reconciled once it has been `PROCESSING` this long (past the gateway timeout,
    /// so a request still in flight is left alone).
    pub after: Duration,
}

impl Reconciler {
    /// Runs until shutdown: a pass at start (what a crash left), then every `every` while this
    /// process knows of unfinished payments (`hint`, set by the action) or the last pass left
    /// some waiting, and in any case every `sweep` (what another replica's crash left). Listing
    /// the markers scans the store's keys, so it is not done more often than that.
    pub async fn run(
        self,
        every: Duration,
        sweep: Duration,
        hint: Arc<AtomicBool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_sweep: Option<std::time::Instant> = None;
        loop {
            let due = hint.swap(false, Ordering::SeqCst)
                || last_sweep.is_none_or(|t| t.elapsed() >= sweep);
            if due {
                last_sweep = Some(std::time::Instant::now());
                match self.pass().await {
                    Ok(p) if p.waiting > 0 => hint.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciliation pass failed; will try again");
                        hint.store(true, Ordering::SeqCst);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One pass over the marked payments.
    pub async fn pass(&self) -> Result<Pass, BackendError> {
        let prefix = keys::processing("");
        let mut finished = 0;
        let markers = self.store.keys(&prefix).await?;
        let seen = markers.len();
        for marker in markers {
            let id = marker[prefix.len()..].to_owned();
            // one replica at a time per payment
            let lock = format!("pay:reconciling:{id}");
            if !self
                .store
                .put_if_absent(&lock, Vec::new(), Some(Duration::from_secs(30)))
                .await?
            {
                continue;
            }
            let result = self.finish(&id, &marker).await;
            let _ = self.store.delete(&lock).await;
            if result? {
                finished += 1;
            }
        }
        Ok(Pass {
            finished,
            waiting: seen - finished,
        })
    }

    async fn finish(&self, id: &str, marker: &str) -> Result<bool, BackendError> {
        let Some(bytes) = self.store.get(&keys::transaction(id)).await? else {
            self.store.delete(marker).await?;
            return Ok(false);
        };
        let Ok(mut record) = serde_json::from_slice::<PaymentRecord>(&bytes) else {
            tracing::error!(transaction_id = %id, "unreadable payment record; left for a person");
            return Ok(false);
        };
        match record.status {
            PaymentStatus::Processing => {
                let age = (self.clock.wall() - record.timestamp)
                    .to_std()
                    .unwrap_or_default();
                if age < self.after {
                    return Ok(false);
                }
                let Some(key) = record.gateway_key.clone() else {
                    return Ok(false);
                };
                let charged = match self.gateway.lookup(&key).await {
                    Ok(Some(outcome)) => Charged::decided(outcome),
                    Ok(None) => Charged {
                        status: PaymentStatus::Failed,
                        http_status: 502,
                        gateway_id: None,
                        error: Some(FailureInfo {
                            kind: "api_error".into(),
                            code: "gateway_error".into(),
                            message: "The charge never reached the payment gateway (the service stopped or timed out mid-request); nothing was charged.".into(),
                        }),
                    },
                    Err(e) => {
                        tracing::warn!(transaction_id = %id, error = %e, "gateway lookup failed; will try again");
                        return Ok(false);
                    }
                };
                record.status = charged.status;
                record.http_status = charged.http_status;
                record.gateway_response = charged.gateway_id;
                record.error = charged.error;
                self.store
                    .put(
                        &keys::transaction(id),
                        serde_json::to_vec(&record).unwrap_or_default(),
                        None,
                    )
                    .await?;
                if let (Some(k), Some(fp)) = (&record.idempotency_key, &record.fingerprint) {
                    self.idempotency
                        .complete(
                            &record.merchant_id,
                            k,
                            fp,
                            record.http_status,
                            &record.answer_body(),
                        )
                        .await?;
                }
                self.metrics.reconciled(record.status);
                tracing::warn!(transaction_id = %id, status = record.status.as_str(), "payment reconciled");
                if record.status == PaymentStatus::Success
                    && self.confirmations.push(id.to_owned()).await.is_err()
                {
                    // keep the marker: the next pass queues it
                    return Ok(true);
                }
            }
            PaymentStatus::Success => {
                // answered, but its confirmation was never queued
                if self.confirmations.push(id.to_owned()).await.is_err() {
                    return Ok(false);
                }
            }
            PaymentStatus::Failed | PaymentStatus::FraudBlocked => {}
        }
        self.store.delete(marker).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;
    use tai_core::clock::ManualClock;
    use tai_core::kanban::{MemoryQueue, QueueConfig, QueueStatus};
    use tai_core::store::MemoryStore;

    use super::*;
    use crate::gateway::sandbox::Sandbox;

    fn processing(id: &str, key: &str, clock: &ManualClock) -> PaymentRecord {
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
        }
    }

    #[tokio::test]
    async fn finishes_what_the_gateway_decided_and_fails_what_it_never_saw() {
        let clock = ManualClock::new();
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new(clock.shared()));
        let sandbox = Arc::new(Sandbox::new(Duration::ZERO, 0.0));
        // the gateway approved one charge; the other never reached it
        let crate::gateway::sandbox::SandboxAnswer::Approved(gw_id) =
            sandbox.decide("m:charged", None).await
        else {
            panic!("approved")
        };
        let queue = MemoryQueue::<String>::new(QueueConfig::new("c", 10), clock.shared());
        let idem = Idempotency::new(store.clone(), Duration::from_secs(60));
        assert!(matches!(
            idem.claim("m", "client-key", "fp").await,
            Ok(crate::idempotency::Claim::Proceed)
        ));
        let kaizen = tai_core::kaizen::Kaizen::new("t", clock.shared());
        let r = Reconciler {
            store: store.clone(),
            gateway: sandbox,
            idempotency: idem.clone(),
            confirmations: Arc::new(queue.clone()),
            metrics: Arc::new(PaymentMetrics::new(&kaizen, clock.shared())),
            clock: clock.shared(),
            after: Duration::from_secs(10),
        };
        for (id, key) in [("txn_a", "m:charged"), ("txn_b", "m:lost")] {
            let mut rec = processing(id, key, &clock);
            if id == "txn_b" {
                // only the first came with a client key
                rec.idempotency_key = None;
                rec.fingerprint = None;
            }
            store
                .put(
                    &keys::transaction(id),
                    serde_json::to_vec(&rec).expect("json"),
                    None,
                )
                .await
                .expect("mem");
            store
                .put(&keys::processing(id), Vec::new(), None)
                .await
                .expect("mem");
        }
        assert_eq!(
            r.pass().await.expect("pass"),
            Pass {
                finished: 0,
                waiting: 2
            },
            "too young: a request may still be in flight"
        );
        clock.advance(Duration::from_secs(10));
        assert_eq!(
            r.pass().await.expect("pass"),
            Pass {
                finished: 2,
                waiting: 0
            }
        );
        let a: PaymentRecord = serde_json::from_slice(
            &store
                .get(&keys::transaction("txn_a"))
                .await
                .expect("mem")
                .expect("a"),
        )
        .expect("json");
        assert_eq!(
            (a.status, a.gateway_response.as_deref()),
            (PaymentStatus::Success, Some(gw_id.as_str()))
        );
        let b: PaymentRecord = serde_json::from_slice(
            &store
                .get(&keys::transaction("txn_b"))
                .await
                .expect("mem")
                .expect("b"),
        )
        .expect("json");
        assert_eq!((b.status, b.http_status), (PaymentStatus::Failed, 502));
        assert!(
            store
                .keys(&keys::processing(""))
                .await
                .expect("mem")
                .is_empty(),
            "markers cleared"
        );
        assert_eq!(
            queue.depth().ready,
            1,
            "the success is queued for confirmation"
        );
        // the client's retry replays the reconciled answer
        match idem.claim("m", "client-key", "fp").await {
            Ok(crate::idempotency::Claim::Replay { status, body }) => {
                assert_eq!((status, body["status"].as_str()), (200, Some("SUCCESS")))
            }
            other => panic!("expected a replay, got {other:?}"),
        }
    }
}
