//! The Action's dependency: a payment gateway behind a trait.
//!
//! Two implementations: the in-process [`sandbox::Sandbox`] (the embedded default, answering by
//! card number as a card network's test mode does) and [`http::HttpGateway`], a client of any
//! gateway speaking the sandbox's HTTP form at `GATEWAY_URL`, such as the standalone
//! `sandbox-gateway` binary. Every call forwards an idempotency key, so a retried charge is never
//! charged twice; every call goes through the gateway circuit breaker (see `crate::action`).

pub mod http;
pub mod sandbox;

use rust_decimal::Decimal;
use tai_core::backend::BoxFuture;

use crate::card::Card;

/// One charge.
#[derive(Debug, Clone)]
pub struct ChargeRequest {
    /// Exact amount, major units.
    pub amount: Decimal,
    /// ISO 4217 code.
    pub currency: &'static str,
    /// The card, if any.
    pub card: Option<Card>,
    /// Our transaction id.
    pub reference: String,
    /// Sent as `Idempotency-Key`: the same key never charges twice.
    pub idempotency_key: String,
    /// Capture at once (`true`) or authorize only.
    pub capture: bool,
    /// A card token from [`Gateway::tokenize`], in place of the card.
    pub card_token: Option<String>,
}

/// What the gateway decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Charged; the gateway's id.
    Approved {
        /// e.g. `gw_…`.
        gateway_id: String,
    },
    /// Authorized only (the funds are held until captured or voided).
    Authorized {
        /// e.g. `gw_…`.
        gateway_id: String,
    },
    /// The card was declined: the gateway works, the card does not.
    Declined,
    /// The gateway says it did not charge (its processing failed): known, and final.
    NotCharged,
    /// Charged, then reversed (voided or refunded): no money moved in the end.
    Reversed {
        /// The charge's id.
        gateway_id: String,
    },
}

/// How a reversal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reversal {
    /// The charge is reversed (now, or before).
    Reversed,
    /// There was no charge to reverse (declined or failed).
    NothingCharged,
    /// The gateway knows no charge with that key.
    Unknown,
}

/// The gateway failed to decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// It could not be reached.
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    /// It did not answer in time.
    #[error("gateway timed out after {0} ms")]
    Timeout(u64),
    /// It answered with a server error.
    #[error("gateway error {status}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// What it said.
        message: String,
    },
    /// It answered something we could not read.
    #[error("gateway answered unexpectedly: {0}")]
    Protocol(String),
    /// The gateway refused the request as invalid (a 4xx other than a decline): it was not
    /// processed, so nothing was charged.
    #[error("gateway refused the request ({status}): {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// What it said.
        message: String,
    },
}

/// A payment gateway.
pub trait Gateway: Send + Sync + std::fmt::Debug {
    /// `sandbox` or `http`.
    fn kind(&self) -> &'static str;
    /// Charges once per idempotency key.
    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, GatewayError>>;
    /// Reverses (voids or refunds) the charge made with `idempotency_key`, idempotently.
    fn reverse<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Reversal, GatewayError>>;
    /// How the charge with this idempotency key ended; `None` if the gateway never decided one.
    fn lookup<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, GatewayError>>;
    /// Exchanges a card for the gateway's token, so a payment held for review can be charged
    /// later without this service keeping the card.
    fn tokenize<'a>(&'a self, card: &'a Card) -> BoxFuture<'a, Result<String, GatewayError>>;
    /// Captures `amount` (at most what was authorized; the rest is released) of the
    /// authorization made with `idempotency_key`. Idempotent: capturing again the same amount
    /// answers success and moves nothing more.
    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        amount: Decimal,
    ) -> BoxFuture<'a, Result<(), GatewayError>>;
    /// Cancels the authorization made with `idempotency_key`. Idempotent.
    fn void<'a>(&'a self, idempotency_key: &'a str) -> BoxFuture<'a, Result<(), GatewayError>>;
    /// Refunds `amount` of the captured charge made with `idempotency_key`, once per
    /// `refund_key`; answers the gateway's refund id. A refund the gateway refuses (more than
    /// is left, nothing captured) is [`GatewayError::Rejected`].
    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        refund_key: &'a str,
        amount: Decimal,
    ) -> BoxFuture<'a, Result<String, GatewayError>>;
}
