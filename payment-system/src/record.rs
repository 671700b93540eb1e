//! The stored payment record: every attempt, whatever its outcome, and the answer it got.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tai_core::policy::Reason;

use crate::card::CardSummary;

/// A payment's outcome (docs/API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentStatus {
    /// The gateway approved the charge.
    Success,
    /// The fraud score reached the block threshold; the gateway was not called.
    FraudBlocked,
    /// Declined, gateway error, or gateway unavailable.
    Failed,
    /// Charged at the gateway after the payment had been failed (its charge turned up late),
    /// and reversed there (voided or refunded): no money moved in the end.
    Reversed,
    /// Sent to the gateway, outcome not known yet (it timed out, or the service stopped
    /// mid-charge); the reconciler finishes it.
    Processing,
    /// Authorized only (`"capture": false`): the funds are held until captured, voided, or the
    /// authorization expires.
    Authorized,
    /// An authorization cancelled (by the merchant, or because it expired): nothing was charged.
    Voided,
    /// Held for a person to look at (a fraud score at or above the review threshold): nothing
    /// was charged; approval charges it, rejection blocks it.
    RequiresReview,
}

impl PaymentStatus {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Success => "SUCCESS",
            PaymentStatus::FraudBlocked => "FRAUD_BLOCKED",
            PaymentStatus::Failed => "FAILED",
            PaymentStatus::Processing => "PROCESSING",
            PaymentStatus::Reversed => "REVERSED",
            PaymentStatus::Authorized => "AUTHORIZED",
            PaymentStatus::Voided => "VOIDED",
            PaymentStatus::RequiresReview => "REQUIRES_REVIEW",
        }
    }

    /// Every status, for labels exported at zero and for parsing query parameters.
    pub const ALL: [PaymentStatus; 8] = [
        PaymentStatus::Success,
        PaymentStatus::FraudBlocked,
        PaymentStatus::Failed,
        PaymentStatus::Reversed,
        PaymentStatus::Processing,
        PaymentStatus::Authorized,
        PaymentStatus::Voided,
        PaymentStatus::RequiresReview,
    ];

    /// The status named `s` (`SUCCESS`, `AUTHORIZED`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A capture or void sent to the gateway and not settled yet (internal): the reconciler
/// finishes it if the request that started it did not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOp {
    /// `capture` or `void`.
    pub op: String,
    /// The amount to capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Decimal>,
    /// Why it is voided: `requested` or `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a person decided about a payment held for review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReviewInfo {
    /// `approved`, `rejected` or `expired`.
    pub outcome: String,
    /// When.
    pub at: DateTime<Utc>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Why a payment failed, in Stripe's error shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FailureInfo {
    /// e.g. `card_error`, `api_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// e.g. `card_declined`, `gateway_error`, `gateway_unavailable`, `fraud_blocked`.
    pub code: String,
    /// For people.
    pub message: String,
}

/// One payment attempt as stored and returned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PaymentRecord {
    /// `txn_…`.
    pub transaction_id: String,
    /// The outcome.
    pub status: PaymentStatus,
    /// Exact amount, as sent.
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    #[schema(value_type = f64, example = 99.99)]
    pub amount: Decimal,
    /// Upper-case ISO 4217.
    pub currency: String,
    /// Who paid.
    pub customer_id: String,
    /// Who was paid.
    pub merchant_id: String,
    /// When the attempt was received.
    pub timestamp: DateTime<Utc>,
    /// Time from receipt to answer.
    pub processing_time_ms: u64,
    /// The fraud score, exact.
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    #[schema(value_type = f64, example = 0.0)]
    pub fraud_score: Decimal,
    /// Every fraud rule that fired, with the value that fired it.
    #[schema(value_type = Vec<Object>)]
    pub fraud_reasons: Vec<Reason>,
    /// The gateway's charge id, when it charged.
    pub gateway_response: Option<String>,
    /// The trace of this attempt.
    pub trace_id: String,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureInfo>,
    /// First six and last four of the card, when one was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub card: Option<CardSummary>,
    /// Free text from the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The request's metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// When the confirmation worker confirmed a successful charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<DateTime<Utc>>,
    /// The HTTP status the attempt was answered with.
    #[serde(default)]
    pub http_status: u16,
    /// The key the gateway deduplicates this charge by (internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_key: Option<String>,
    /// The client's idempotency key (internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The request body's fingerprint, when a key was sent (internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The token of the idempotency claim this payment's request held (internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_token: Option<String>,
    /// Whether the charge is captured at once (`true`, the default) or only authorized.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub capture: bool,
    /// What was captured: the amount, or less for a partial capture (the rest released).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::arbitrary_precision_option"
    )]
    #[schema(value_type = Option<f64>)]
    pub amount_captured: Option<Decimal>,
    /// When an `AUTHORIZED` payment's authorization, or a `REQUIRES_REVIEW` payment's hold,
    /// lapses (voided, or rejected, then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Why a `VOIDED` payment was voided: `requested` or `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub void_reason: Option<String>,
    /// The review's outcome, for a payment that was held for review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewInfo>,
    /// A capture or void under way (internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub pending: Option<PendingOp>,
    /// The gateway's token for the card of a payment held for review, so approval can charge
    /// it without this service keeping the card (internal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_token: Option<String>,
}

impl PaymentRecord {
    /// The body `POST /payment` answers with (docs/API.md's response shape, and `error` when failed).
    pub fn answer_body(&self) -> serde_json::Value {
        let mut body = self.public();
        if let serde_json::Value::Object(map) = &mut body {
            for field in ["card", "metadata", "description", "confirmed_at"] {
                map.remove(field);
            }
        }
        body
    }

    /// What a client sees of the record: no internal fields.
    pub fn public(&self) -> serde_json::Value {
        let mut body = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = &mut body {
            for internal in [
                "http_status",
                "gateway_key",
                "idempotency_key",
                "fingerprint",
                "claim_token",
                "pending",
                "card_token",
            ] {
                map.remove(internal);
            }
        }
        body
    }
}
