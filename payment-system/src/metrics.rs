//! Kaizen for payments: docs/API.md's metric names, and a rolling window Andon reads.

use std::time::Duration;

use prometheus::{Histogram, IntCounterVec, IntGauge};
use tai_core::clock::SharedClock;
use tai_core::kaizen::{Kaizen, LATENCY_BUCKETS, RollingWindow};

use crate::record::PaymentStatus;

/// The outcomes `payment_confirmations_total` counts.
pub const CONFIRMATION_OUTCOMES: &[&str] = &["confirmed", "nothing_to_confirm", "failed"];

/// The payment metrics.
#[derive(Debug)]
pub struct PaymentMetrics {
    transactions: IntCounterVec,
    fraud: IntCounterVec,
    duration: Histogram,
    reconciled: IntCounterVec,
    confirmations: IntCounterVec,
    /// `payment_gateway_circuit_breaker_state`: 0 closed, 1 open, 2 half-open.
    pub breaker_state: IntGauge,
    /// `payment_processing_backlog`: payments left `PROCESSING` past the reconciler's wait
    /// that its last pass could not settle (at most one batch).
    pub processing_backlog: IntGauge,
    window: RollingWindow,
}

impl PaymentMetrics {
    /// Registers the metrics in `kaizen`'s registry.
    pub fn new(kaizen: &Kaizen, clock: SharedClock) -> Self {
        // every known label exported at 0 from the start: a dashboard shows 0, not no data
        let statuses: Vec<&str> = PaymentStatus::ALL.iter().map(|s| s.as_str()).collect();
        Self {
            transactions: kaizen.counter_vec(
                "payment_transaction_total",
                "Payments by outcome",
                "status",
                &statuses,
            ),
            fraud: kaizen.counter_vec(
                "payment_fraud_detected_total",
                "Fraud rules fired, by rule",
                "rule",
                crate::fraud::RULES,
            ),
            duration: kaizen.histogram(
                "payment_processing_duration_seconds",
                "Time to answer a payment",
                LATENCY_BUCKETS,
            ),
            breaker_state: kaizen.gauge(
                "payment_gateway_circuit_breaker_state",
                "Gateway breaker: 0 closed, 1 open, 2 half-open",
            ),
            processing_backlog: kaizen.gauge(
                "payment_processing_backlog",
                "Payments left PROCESSING that the reconciler's last pass could not settle",
            ),
            reconciled: kaizen.counter_vec(
                "payment_reconciled_total",
                "Payments finished by the reconciler, by final status",
                "status",
                &statuses,
            ),
            confirmations: kaizen.counter_vec(
                "payment_confirmations_total",
                "Confirmation deliveries by outcome: confirmed, nothing_to_confirm (a copy, or \
                 not a success) or failed (handed back)",
                "outcome",
                CONFIRMATION_OUTCOMES,
            ),
            window: RollingWindow::new(Duration::from_secs(60), 12, clock),
        }
    }

    /// Records one answered payment.
    pub fn record(
        &self,
        status: PaymentStatus,
        http_status: u16,
        fired_rules: &[&str],
        took: Duration,
    ) {
        self.transactions
            .with_label_values(&[status.as_str()])
            .inc();
        for rule in fired_rules {
            self.fraud.with_label_values(&[*rule]).inc();
        }
        self.duration.observe(took.as_secs_f64());
        self.window.record(took, http_status >= 500);
        if status == PaymentStatus::FraudBlocked {
            self.window.tag("fraud_blocked");
        }
    }

    /// Counts a payment the reconciler finished.
    pub fn reconciled(&self, status: PaymentStatus) {
        self.reconciled.with_label_values(&[status.as_str()]).inc();
    }

    /// Counts one confirmation delivery by its outcome (one of [`CONFIRMATION_OUTCOMES`]).
    pub fn confirmation(&self, outcome: &'static str) {
        self.confirmations.with_label_values(&[outcome]).inc();
    }

    /// The share of recent payments blocked for fraud.
    pub fn fraud_rate(&self) -> f64 {
        self.window.stats().tag_rate("fraud_blocked")
    }

    /// Recent payments.
    pub fn window(&self) -> &RollingWindow {
        &self.window
    }
}
