//! The sandbox gateway: in process, and as the standalone `sandbox-gateway` HTTP server.
//!
//! It answers by card number, as a card network's test mode does: no card or `4242424242424242`
//! is approved, `4000000000000002` is declined, `4000000000000119` is a processing error (a
//! gateway failure: HTTP 500, nothing charged). A repeated idempotency key returns the first
//! decision and charges nothing more; after a processing error a retry with the key is decided
//! anew, and a lookup of the key meanwhile answers `failed` (the gateway knows it charged
//! nothing).
//!
//! It can misbehave the way real acquirers do ([`SandboxConfig`]): `latency` slows every
//! answer; `failure_rate` turns that share of charges into processing errors; `decide_late`
//! decides at the end of the latency instead of the start, and the charge happens even when
//! the caller has hung up meanwhile; `charge_then_fail_rate` charges and then answers 500 anyway;
//! `lookup_lag` hides a decision from lookups until it is that old. A charge can be reversed
//! (voided or refunded) by its key, idempotently.
//!
//! It keeps the money of each charge as a card network would: a charge with `"capture": false`
//! is only authorized, then captured (all or part; the rest released) or voided, by its key;
//! a captured charge is refunded in parts, once per refund key, never beyond what was captured.
//! Cards can be exchanged for tokens (`POST /v1/tokens`) and charged by token later. `/v1/stats`
//! sums what was captured, voided and refunded, per currency.
//!
//! Decisions are remembered for the last `remember` keys only (`SANDBOX_REMEMBER`; 100,000 for
//! the standalone server, 20,000 in process): the sandbox lives in process memory, and memory
//! must not grow with every payment ever made. The reconciler asks within seconds of a charge;
//! the in-process sandbox's decisions die with the process anyway.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::sync::Arc;
use tai_core::backend::BoxFuture;

use super::{ChargeOutcome, ChargeRequest, Gateway, GatewayError, Reversal};

/// Test card: approved.
pub const CARD_APPROVED: &str = "4242424242424242";
/// Test card: declined.
pub const CARD_DECLINED: &str = "4000000000000002";
/// Test card: processing error.
pub const CARD_PROCESSING_ERROR: &str = "4000000000000119";

/// How many decisions the standalone sandbox remembers by default (oldest forgotten first).
pub const REMEMBERED: usize = 100_000;

/// What the sandbox decided for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxAnswer {
    /// Charged with this id.
    Approved(String),
    /// Authorized with this id (not captured yet).
    Authorized(String),
    /// Declined.
    Declined,
    /// Processing error: nothing charged.
    Error,
    /// Charged with this id, then reversed (voided or refunded).
    Reversed(String),
}

/// What a charge request is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeReply {
    /// The decision (for a repeated key, the first one).
    Decided(SandboxAnswer),
    /// Charged, and answered with a server error anyway (`charge_then_fail_rate`).
    ChargedThenFailed,
    /// A request with this key is being decided right now (`decide_late`).
    InProgress,
}

/// How the sandbox behaves.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// How many decisions it remembers (`SANDBOX_REMEMBER`).
    pub remember: usize,
    /// Every answer waits this long.
    pub latency: Duration,
    /// Share of charges that are processing errors (0..=1).
    pub failure_rate: f64,
    /// Decide at the end of the latency, not the start (`SANDBOX_DECIDE=late`).
    pub decide_late: bool,
    /// Share of approvals answered 500 after charging (`SANDBOX_CHARGE_THEN_FAIL_RATE`).
    pub charge_then_fail_rate: f64,
    /// Lookups see a decision only once it is this old (`SANDBOX_LOOKUP_LAG_MS`).
    pub lookup_lag: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            remember: REMEMBERED,
            latency: Duration::ZERO,
            failure_rate: 0.0,
            decide_late: false,
            charge_then_fail_rate: 0.0,
            lookup_lag: Duration::ZERO,
        }
    }
}

/// Reads a [`SandboxConfig`] through `get` (a setting by its environment name):
/// `SANDBOX_LATENCY_MS`, `SANDBOX_FAILURE_RATE`, `SANDBOX_DECIDE` (`early` or `late`),
/// `SANDBOX_CHARGE_THEN_FAIL_RATE`, `SANDBOX_LOOKUP_LAG_MS`.
pub fn config_from(
    get: impl Fn(&str) -> Option<String>,
) -> Result<SandboxConfig, tai_core::runtime::ConfigError> {
    fn parse<T: std::str::FromStr>(
        get: &impl Fn(&str) -> Option<String>,
        name: &str,
        default: T,
        expected: &str,
    ) -> Result<T, tai_core::runtime::ConfigError> {
        match get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| tai_core::runtime::ConfigError::Invalid {
                    name: name.into(),
                    value: v,
                    expected: expected.into(),
                }),
        }
    }
    let decide_late = match get("SANDBOX_DECIDE").as_deref() {
        None | Some("early") => false,
        Some("late") => true,
        Some(other) => {
            return Err(tai_core::runtime::ConfigError::Invalid {
                name: "SANDBOX_DECIDE".into(),
                value: other.into(),
                expected: "early or late".into(),
            });
        }
    };
    Ok(SandboxConfig {
        remember: parse(
            &get,
            "SANDBOX_REMEMBER",
            REMEMBERED,
            "a number of decisions",
        )?
        .max(1),
        latency: Duration::from_millis(parse(&get, "SANDBOX_LATENCY_MS", 0u64, "milliseconds")?),
        failure_rate: parse(&get, "SANDBOX_FAILURE_RATE", 0.0f64, "a share from 0 to 1")?,
        decide_late,
        charge_then_fail_rate: parse(
            &get,
            "SANDBOX_CHARGE_THEN_FAIL_RATE",
            0.0f64,
            "a share from 0 to 1",
        )?,
        lookup_lag: Duration::from_millis(parse(
            &get,
            "SANDBOX_LOOKUP_LAG_MS",
            0u64,
            "milliseconds",
        )?),
    })
}

/// The money of one charge.
#[derive(Debug, Clone, Default)]
struct Funds {
    amount: Decimal,
    currency: String,
    captured: Decimal,
    /// Refunds by refund key: the refund's id and amount.
    refunds: HashMap<String, (String, Decimal)>,
}

impl Funds {
    fn refunded(&self) -> Decimal {
        self.refunds.values().map(|(_, a)| *a).sum()
    }
}

#[derive(Debug, Clone)]
enum Slot {
    Pending,
    Decided {
        answer: SandboxAnswer,
        at: Instant,
        reference: String,
        funds: Funds,
    },
}

/// What a charge is asked for.
#[derive(Debug, Clone, Default)]
pub struct ChargeAsk<'a> {
    /// The card number, if any (a token is resolved to its number first).
    pub card_number: Option<&'a str>,
    /// The caller's reference.
    pub reference: &'a str,
    /// The amount.
    pub amount: Decimal,
    /// The currency.
    pub currency: &'a str,
    /// Capture at once, or authorize only.
    pub capture: bool,
}

/// Why a capture, void or refund was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoneyError {
    /// No charge with that key.
    Unknown,
    /// The charge is in a state that does not allow it (HTTP 409), with why.
    Conflict(&'static str),
    /// The amount is more than allowed (HTTP 422), with why.
    TooMuch(&'static str),
}

/// Decisions by key, and the keys in the order they were first seen; tokens likewise; and
/// the money moved, per currency.
#[derive(Debug, Default)]
struct Book {
    by_key: HashMap<String, Slot>,
    order: VecDeque<String>,
    tokens: HashMap<String, String>,
    token_order: VecDeque<String>,
    captured: BTreeMap<String, Decimal>,
    voided: BTreeMap<String, Decimal>,
    refunded: BTreeMap<String, Decimal>,
}

fn add(totals: &mut BTreeMap<String, Decimal>, currency: &str, amount: Decimal) {
    *totals.entry(currency.to_owned()).or_default() += amount;
}

fn totals_json(totals: &BTreeMap<String, Decimal>) -> Value {
    Value::Object(
        totals
            .iter()
            .map(|(c, a)| (c.clone(), Value::String(a.to_string())))
            .collect(),
    )
}

impl Book {
    fn put(&mut self, key: &str, slot: Slot, remember: usize) {
        if self.by_key.insert(key.to_owned(), slot).is_none() {
            self.order.push_back(key.to_owned());
            if self.order.len() > remember
                && let Some(oldest) = self.order.pop_front()
            {
                self.by_key.remove(&oldest);
            }
        }
    }
}

/// The sandbox's state; share it through an `Arc`.
#[derive(Debug)]
pub struct Sandbox {
    config: SandboxConfig,
    book: Arc<Mutex<Book>>,
    charges: Arc<AtomicU64>,
    reversed: AtomicU64,
    requests: AtomicU64,
}

/// A charge decided for the first time: by card, then the random failure share.
fn fresh(config: &SandboxConfig, card_number: Option<&str>, capture: bool) -> SandboxAnswer {
    let random_failure = config.failure_rate > 0.0 && rand::random::<f64>() < config.failure_rate;
    let id = || format!("gw_{}", uuid::Uuid::new_v4().simple());
    match card_number {
        Some(CARD_PROCESSING_ERROR) => SandboxAnswer::Error,
        _ if random_failure => SandboxAnswer::Error,
        Some(CARD_DECLINED) => SandboxAnswer::Declined,
        _ if capture => SandboxAnswer::Approved(id()),
        _ => SandboxAnswer::Authorized(id()),
    }
}

impl Sandbox {
    /// A sandbox with the given latency and random failure share (0.0..=1.0), deciding early.
    pub fn new(latency: Duration, failure_rate: f64) -> Self {
        Self::with_config(SandboxConfig {
            latency,
            failure_rate,
            ..SandboxConfig::default()
        })
    }

    /// A sandbox that behaves as `config` says.
    pub fn with_config(mut config: SandboxConfig) -> Self {
        config.failure_rate = config.failure_rate.clamp(0.0, 1.0);
        config.charge_then_fail_rate = config.charge_then_fail_rate.clamp(0.0, 1.0);
        Self {
            config,
            book: Arc::default(),
            charges: Arc::default(),
            reversed: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    fn lock(book: &Mutex<Book>) -> std::sync::MutexGuard<'_, Book> {
        book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides `key` now unless it is decided already (a processing error is decided anew);
    /// answers the decision that stands.
    fn settle(
        book: &Mutex<Book>,
        charges: &AtomicU64,
        config: &SandboxConfig,
        key: &str,
        ask: &ChargeAsk<'_>,
    ) -> SandboxAnswer {
        let mut book = Self::lock(book);
        if let Some(Slot::Decided { answer, .. }) = book.by_key.get(key)
            && *answer != SandboxAnswer::Error
        {
            return answer.clone();
        }
        let answer = fresh(config, ask.card_number, ask.capture);
        let mut funds = Funds {
            amount: ask.amount,
            currency: ask.currency.to_owned(),
            ..Funds::default()
        };
        match answer {
            SandboxAnswer::Approved(_) => {
                charges.fetch_add(1, Ordering::SeqCst);
                funds.captured = ask.amount;
                add(&mut book.captured, ask.currency, ask.amount);
            }
            SandboxAnswer::Authorized(_) => {
                charges.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        book.put(
            key,
            Slot::Decided {
                answer: answer.clone(),
                at: Instant::now(),
                reference: ask.reference.to_owned(),
                funds,
            },
            config.remember,
        );
        answer
    }

    /// Decides a charge for `key` and `card_number`, once per key, as configured (captured at
    /// once, no amount: the form older callers and tests use).
    pub async fn charge_key(
        &self,
        key: &str,
        card_number: Option<&str>,
        reference: &str,
    ) -> ChargeReply {
        self.charge_with(
            key,
            &ChargeAsk {
                card_number,
                reference,
                capture: true,
                ..ChargeAsk::default()
            },
        )
        .await
    }

    /// Decides a charge for `key`, once per key, as configured.
    pub async fn charge_with(&self, key: &str, ask: &ChargeAsk<'_>) -> ChargeReply {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let answer = if self.config.decide_late {
            // look and mark under the lock; wait only after letting it go
            let standing: Option<Option<SandboxAnswer>> = {
                let mut book = Self::lock(&self.book);
                match book.by_key.get(key) {
                    Some(Slot::Pending) => Some(None),
                    Some(Slot::Decided { answer, .. }) if *answer != SandboxAnswer::Error => {
                        Some(Some(answer.clone()))
                    }
                    _ => {
                        book.put(key, Slot::Pending, self.config.remember);
                        None
                    }
                }
            };
            match standing {
                Some(None) => return ChargeReply::InProgress,
                Some(Some(answer)) => {
                    tokio::time::sleep(self.config.latency).await;
                    return ChargeReply::Decided(answer);
                }
                None => {}
            }
            // its own task: the charge happens even if the caller hangs up meanwhile
            let (book, charges, config) =
                (self.book.clone(), self.charges.clone(), self.config.clone());
            let (key, card, reference, currency) = (
                key.to_owned(),
                ask.card_number.map(str::to_owned),
                ask.reference.to_owned(),
                ask.currency.to_owned(),
            );
            let (amount, capture) = (ask.amount, ask.capture);
            let decided = tokio::spawn(async move {
                tokio::time::sleep(config.latency).await;
                let ask = ChargeAsk {
                    card_number: card.as_deref(),
                    reference: &reference,
                    amount,
                    currency: &currency,
                    capture,
                };
                Self::settle(&book, &charges, &config, &key, &ask)
            });
            match decided.await {
                Ok(a) => a,
                Err(_) => SandboxAnswer::Error,
            }
        } else {
            let answer = Self::settle(&self.book, &self.charges, &self.config, key, ask);
            if !self.config.latency.is_zero() {
                tokio::time::sleep(self.config.latency).await;
            }
            answer
        };
        if matches!(
            answer,
            SandboxAnswer::Approved(_) | SandboxAnswer::Authorized(_)
        ) && self.config.charge_then_fail_rate > 0.0
            && rand::random::<f64>() < self.config.charge_then_fail_rate
        {
            return ChargeReply::ChargedThenFailed;
        }
        ChargeReply::Decided(answer)
    }

    /// Decides a charge for `key` (the in-process form: no reference, no failure modes but
    /// latency and the failure share).
    pub async fn decide(&self, key: &str, card_number: Option<&str>) -> SandboxAnswer {
        match self.charge_key(key, card_number, key).await {
            ChargeReply::Decided(a) => a,
            ChargeReply::ChargedThenFailed | ChargeReply::InProgress => SandboxAnswer::Error,
        }
    }

    /// The decision made for `key`, as a lookup sees it (not before it is `lookup_lag` old).
    pub fn decision(&self, key: &str) -> Option<SandboxAnswer> {
        match Self::lock(&self.book).by_key.get(key) {
            Some(Slot::Decided { answer, at, .. }) if at.elapsed() >= self.config.lookup_lag => {
                Some(answer.clone())
            }
            _ => None,
        }
    }

    /// Reverses (voids or refunds) the charge with `key`: `Ok(true)` once reversed (again or
    /// now), `Ok(false)` when there was no charge to reverse (declined or failed); `Err(404)`
    /// for an unknown key, `Err(409)` for one not decided yet.
    pub fn reverse_key(&self, key: &str) -> Result<bool, u16> {
        let mut book = Self::lock(&self.book);
        match book.by_key.get_mut(key) {
            None => Err(404),
            Some(Slot::Pending) => Err(409),
            Some(Slot::Decided { answer, .. }) => match answer.clone() {
                SandboxAnswer::Approved(id) | SandboxAnswer::Authorized(id) => {
                    *answer = SandboxAnswer::Reversed(id);
                    self.reversed.fetch_add(1, Ordering::SeqCst);
                    Ok(true)
                }
                SandboxAnswer::Reversed(_) => Ok(true),
                SandboxAnswer::Declined | SandboxAnswer::Error => Ok(false),
            },
        }
    }

    /// Exchanges a card number for a token (`tok_…`), remembered like decisions.
    pub fn tokenize_number(&self, number: &str) -> String {
        let token = format!("tok_{}", uuid::Uuid::new_v4().simple());
        let mut book = Self::lock(&self.book);
        book.tokens.insert(token.clone(), number.to_owned());
        book.token_order.push_back(token.clone());
        if book.token_order.len() > self.config.remember
            && let Some(oldest) = book.token_order.pop_front()
        {
            book.tokens.remove(&oldest);
        }
        token
    }

    /// The card number a token stands for.
    pub fn detokenize(&self, token: &str) -> Option<String> {
        Self::lock(&self.book).tokens.get(token).cloned()
    }

    /// Captures `amount` of the authorization with `key` (the rest is released). Capturing
    /// again the amount captured answers `Ok` and moves nothing.
    pub fn capture_key(&self, key: &str, amount: Decimal) -> Result<(), MoneyError> {
        let mut guard = Self::lock(&self.book);
        let book = &mut *guard;
        let Some(Slot::Decided { answer, funds, .. }) = book.by_key.get_mut(key) else {
            return Err(MoneyError::Unknown);
        };
        match answer.clone() {
            SandboxAnswer::Authorized(id) => {
                if amount <= Decimal::ZERO || amount > funds.amount {
                    return Err(MoneyError::TooMuch("more than was authorized"));
                }
                funds.captured = amount;
                *answer = SandboxAnswer::Approved(id);
                add(&mut book.captured, &funds.currency, amount);
                Ok(())
            }
            SandboxAnswer::Approved(_) if funds.captured == amount => Ok(()),
            SandboxAnswer::Approved(_) => Err(MoneyError::Conflict("captured already")),
            SandboxAnswer::Reversed(_) => Err(MoneyError::Conflict("voided")),
            SandboxAnswer::Declined | SandboxAnswer::Error => {
                Err(MoneyError::Conflict("nothing was authorized"))
            }
        }
    }

    /// Voids the authorization with `key`; voiding again answers `Ok`.
    pub fn void_key(&self, key: &str) -> Result<(), MoneyError> {
        let mut guard = Self::lock(&self.book);
        let book = &mut *guard;
        let Some(Slot::Decided { answer, funds, .. }) = book.by_key.get_mut(key) else {
            return Err(MoneyError::Unknown);
        };
        match answer.clone() {
            SandboxAnswer::Authorized(id) => {
                *answer = SandboxAnswer::Reversed(id);
                add(&mut book.voided, &funds.currency, funds.amount);
                Ok(())
            }
            SandboxAnswer::Reversed(_) => Ok(()),
            SandboxAnswer::Approved(_) => Err(MoneyError::Conflict("captured already")),
            SandboxAnswer::Declined | SandboxAnswer::Error => {
                Err(MoneyError::Conflict("nothing was authorized"))
            }
        }
    }

    /// Refunds `amount` of the captured charge with `key`, once per `refund_key`: answers the
    /// refund's id (the first one's, for a repeated refund key).
    pub fn refund_key(
        &self,
        key: &str,
        refund_key: &str,
        amount: Decimal,
    ) -> Result<String, MoneyError> {
        let mut guard = Self::lock(&self.book);
        let book = &mut *guard;
        let Some(Slot::Decided { answer, funds, .. }) = book.by_key.get_mut(key) else {
            return Err(MoneyError::Unknown);
        };
        if let Some((id, _)) = funds.refunds.get(refund_key) {
            return Ok(id.clone());
        }
        if !matches!(answer, SandboxAnswer::Approved(_)) {
            return Err(MoneyError::Conflict("nothing was captured"));
        }
        if amount <= Decimal::ZERO || funds.refunded() + amount > funds.captured {
            return Err(MoneyError::TooMuch("more than is left of the capture"));
        }
        let id = format!("gre_{}", uuid::Uuid::new_v4().simple());
        funds
            .refunds
            .insert(refund_key.to_owned(), (id.clone(), amount));
        add(&mut book.refunded, &funds.currency, amount);
        Ok(id)
    }

    /// What was captured, voided and refunded, per currency.
    pub fn money(&self) -> (Value, Value, Value) {
        let book = Self::lock(&self.book);
        (
            totals_json(&book.captured),
            totals_json(&book.voided),
            totals_json(&book.refunded),
        )
    }

    /// Every decision remembered: key, the caller's reference, status.
    pub fn book(&self) -> Vec<(String, String, &'static str)> {
        let book = Self::lock(&self.book);
        book.order
            .iter()
            .filter_map(|k| match book.by_key.get(k) {
                Some(Slot::Decided {
                    answer, reference, ..
                }) => Some((k.clone(), reference.clone(), status_word(answer))),
                _ => None,
            })
            .collect()
    }

    /// Distinct approved charges (reversed ones included).
    pub fn charges(&self) -> u64 {
        self.charges.load(Ordering::SeqCst)
    }

    /// Charges reversed.
    pub fn reversed(&self) -> u64 {
        self.reversed.load(Ordering::SeqCst)
    }

    /// Charge requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn status_word(answer: &SandboxAnswer) -> &'static str {
    match answer {
        SandboxAnswer::Approved(_) => "approved",
        SandboxAnswer::Authorized(_) => "authorized",
        SandboxAnswer::Declined => "declined",
        SandboxAnswer::Error => "failed",
        SandboxAnswer::Reversed(_) => "reversed",
    }
}

fn outcome(answer: SandboxAnswer) -> ChargeOutcome {
    match answer {
        SandboxAnswer::Approved(id) => ChargeOutcome::Approved { gateway_id: id },
        SandboxAnswer::Authorized(id) => ChargeOutcome::Authorized { gateway_id: id },
        SandboxAnswer::Declined => ChargeOutcome::Declined,
        SandboxAnswer::Error => ChargeOutcome::NotCharged,
        SandboxAnswer::Reversed(id) => ChargeOutcome::Reversed { gateway_id: id },
    }
}

impl Gateway for Sandbox {
    fn kind(&self) -> &'static str {
        "sandbox"
    }
    fn lookup<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, GatewayError>> {
        let found = self.decision(idempotency_key).map(outcome);
        Box::pin(std::future::ready(Ok(found)))
    }
    fn tokenize<'a>(
        &'a self,
        card: &'a crate::card::Card,
    ) -> BoxFuture<'a, Result<String, GatewayError>> {
        Box::pin(std::future::ready(Ok(
            self.tokenize_number(card.number.expose())
        )))
    }
    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        amount: Decimal,
    ) -> BoxFuture<'a, Result<(), GatewayError>> {
        let r = self
            .capture_key(idempotency_key, amount)
            .map_err(money_error);
        Box::pin(std::future::ready(r))
    }
    fn void<'a>(&'a self, idempotency_key: &'a str) -> BoxFuture<'a, Result<(), GatewayError>> {
        Box::pin(std::future::ready(
            self.void_key(idempotency_key).map_err(money_error),
        ))
    }
    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        refund_key: &'a str,
        amount: Decimal,
    ) -> BoxFuture<'a, Result<String, GatewayError>> {
        let r = self
            .refund_key(idempotency_key, refund_key, amount)
            .map_err(money_error);
        Box::pin(std::future::ready(r))
    }
    fn reverse<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Reversal, GatewayError>> {
        let r = match self.reverse_key(idempotency_key) {
            Ok(true) => Ok(Reversal::Reversed),
            Ok(false) => Ok(Reversal::NothingCharged),
            Err(404) => Ok(Reversal::Unknown),
            Err(status) => Err(GatewayError::Server {
                status,
                message: "charge not decided yet".into(),
            }),
        };
        Box::pin(std::future::ready(r))
    }
    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, GatewayError>> {
        Box::pin(async move {
            let from_token = request
                .card_token
                .as_deref()
                .and_then(|t| self.detokenize(t));
            if request.card_token.is_some() && from_token.is_none() {
                return Err(GatewayError::Rejected {
                    status: 400,
                    message: "unknown card token".into(),
                });
            }
            let card = from_token
                .as_deref()
                .or_else(|| request.card.as_ref().map(|c| c.number.expose()));
            let ask = ChargeAsk {
                card_number: card,
                reference: &request.reference,
                amount: request.amount,
                currency: request.currency,
                capture: request.capture,
            };
            match self.charge_with(&request.idempotency_key, &ask).await {
                ChargeReply::Decided(SandboxAnswer::Error)
                | ChargeReply::ChargedThenFailed
                | ChargeReply::InProgress => Err(GatewayError::Server {
                    status: 500,
                    message: "processing error".into(),
                }),
                ChargeReply::Decided(a) => Ok(outcome(a)),
            }
        })
    }
}

fn money_error(e: MoneyError) -> GatewayError {
    match e {
        MoneyError::Unknown => GatewayError::Rejected {
            status: 404,
            message: "no charge with this idempotency key".into(),
        },
        MoneyError::Conflict(why) => GatewayError::Rejected {
            status: 409,
            message: why.into(),
        },
        MoneyError::TooMuch(why) => GatewayError::Rejected {
            status: 422,
            message: why.into(),
        },
    }
}

fn money_reply(e: MoneyError) -> Response {
    let (status, why) = match e {
        MoneyError::Unknown => (StatusCode::NOT_FOUND, "no charge with this idempotency key"),
        MoneyError::Conflict(why) => (StatusCode::CONFLICT, why),
        MoneyError::TooMuch(why) => (StatusCode::UNPROCESSABLE_ENTITY, why),
    };
    (status, Json(json!({"error": why}))).into_response()
}

/// An amount sent as a JSON string or number, exactly.
fn amount_of(v: &Value) -> Option<Decimal> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.to_string().parse().ok(),
        _ => None,
    }
}

/// The sandbox's HTTP form: `POST /v1/charges` (`"capture": false` authorizes only),
/// `GET /v1/charges` (every decision, for tests and drills), `GET /v1/charges/{idempotency_key}`,
/// `POST /v1/charges/{idempotency_key}/reverse`, `/capture`, `/void`, `/refunds`,
/// `POST /v1/tokens`, `GET /v1/stats`, `GET /health`.
pub fn router(sandbox: Arc<Sandbox>) -> Router {
    Router::new()
        .route("/v1/charges", post(charge).get(list))
        .route("/v1/charges/{key}", get(lookup))
        .route("/v1/charges/{key}/reverse", post(reverse))
        .route("/v1/charges/{key}/capture", post(capture))
        .route("/v1/charges/{key}/void", post(void))
        .route("/v1/charges/{key}/refunds", post(refund))
        .route("/v1/tokens", post(tokenize))
        .route("/v1/stats", get(stats))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(sandbox)
}

async fn charge(
    State(sandbox): State<Arc<Sandbox>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "body must be JSON"})),
        )
            .into_response();
    };
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| body["reference"].as_str().map(str::to_owned));
    let Some(key) = key else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Idempotency-Key header or reference required"})),
        )
            .into_response();
    };
    let (Some(amount), Some(currency)) = (amount_of(&body["amount"]), body["currency"].as_str())
    else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "amount and currency are required"})),
        )
            .into_response();
    };
    let from_token = match body["card"]["token"].as_str() {
        Some(t) => match sandbox.detokenize(t) {
            Some(number) => Some(number),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "unknown card token"})),
                )
                    .into_response();
            }
        },
        None => None,
    };
    let card = from_token
        .as_deref()
        .or_else(|| body["card"]["number"].as_str());
    let ask = ChargeAsk {
        card_number: card,
        reference: body["reference"].as_str().unwrap_or(""),
        amount,
        currency,
        capture: body["capture"].as_bool().unwrap_or(true),
    };
    match sandbox.charge_with(&key, &ask).await {
        ChargeReply::Decided(SandboxAnswer::Approved(id) | SandboxAnswer::Reversed(id)) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "approved"})),
        )
            .into_response(),
        ChargeReply::Decided(SandboxAnswer::Authorized(id)) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "authorized"})),
        )
            .into_response(),
        ChargeReply::Decided(SandboxAnswer::Declined) => (
            StatusCode::PAYMENT_REQUIRED,
            Json(json!({"status": "declined"})),
        )
            .into_response(),
        ChargeReply::Decided(SandboxAnswer::Error) | ChargeReply::ChargedThenFailed => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"status": "error", "error": "processing error"})),
        )
            .into_response(),
        ChargeReply::InProgress => (
            StatusCode::CONFLICT,
            Json(json!({"status": "error", "error": "a charge with this key is in progress"})),
        )
            .into_response(),
    }
}

async fn lookup(
    State(sandbox): State<Arc<Sandbox>>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    match sandbox.decision(&key) {
        Some(SandboxAnswer::Approved(id)) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "approved"})),
        )
            .into_response(),
        Some(SandboxAnswer::Reversed(id)) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "reversed"})),
        )
            .into_response(),
        Some(SandboxAnswer::Authorized(id)) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "authorized"})),
        )
            .into_response(),
        Some(SandboxAnswer::Declined) => {
            (StatusCode::OK, Json(json!({"status": "declined"}))).into_response()
        }
        Some(SandboxAnswer::Error) => {
            (StatusCode::OK, Json(json!({"status": "failed"}))).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no charge with this idempotency key"})),
        )
            .into_response(),
    }
}

async fn reverse(
    State(sandbox): State<Arc<Sandbox>>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    match sandbox.reverse_key(&key) {
        Ok(true) => (StatusCode::OK, Json(json!({"status": "reversed"}))).into_response(),
        Ok(false) => (StatusCode::OK, Json(json!({"status": "not_charged"}))).into_response(),
        Err(409) => (
            StatusCode::CONFLICT,
            Json(json!({"error": "the charge is not decided yet"})),
        )
            .into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no charge with this idempotency key"})),
        )
            .into_response(),
    }
}

async fn capture(
    State(sandbox): State<Arc<Sandbox>>,
    axum::extract::Path(key): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(amount) = amount_of(&body["amount"]) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "amount is required"})),
        )
            .into_response();
    };
    match sandbox.capture_key(&key, amount) {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"status": "captured", "amount_captured": amount.to_string()})),
        )
            .into_response(),
        Err(e) => money_reply(e),
    }
}

async fn void(
    State(sandbox): State<Arc<Sandbox>>,
    axum::extract::Path(key): axum::extract::Path<String>,
) -> Response {
    match sandbox.void_key(&key) {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "voided"}))).into_response(),
        Err(e) => money_reply(e),
    }
}

async fn refund(
    State(sandbox): State<Arc<Sandbox>>,
    axum::extract::Path(key): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (Some(refund_key), Some(amount)) = (
        headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
        amount_of(&body["amount"]),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "Idempotency-Key and amount are required"})),
        )
            .into_response();
    };
    match sandbox.refund_key(&key, refund_key, amount) {
        Ok(id) => (
            StatusCode::OK,
            Json(json!({"id": id, "status": "succeeded"})),
        )
            .into_response(),
        Err(e) => money_reply(e),
    }
}

async fn tokenize(State(sandbox): State<Arc<Sandbox>>, body: axum::body::Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match body["card"]["number"].as_str() {
        Some(number) => (
            StatusCode::OK,
            Json(json!({"id": sandbox.tokenize_number(number)})),
        )
            .into_response(),
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "card.number is required"})),
        )
            .into_response(),
    }
}

async fn list(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    let charges: Vec<Value> = sandbox
        .book()
        .into_iter()
        .map(|(key, reference, status)| json!({"key": key, "reference": reference, "status": status}))
        .collect();
    Json(json!({"charges": charges}))
}

async fn stats(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    let (captured, voided, refunded) = sandbox.money();
    Json(json!({
        "charges": sandbox.charges(),
        "reversed": sandbox.reversed(),
        "requests": sandbox.requests(),
        "captured": captured,
        "voided": voided,
        "refunded": refunded,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_by_card_and_once_per_key() {
        let s = Sandbox::new(Duration::ZERO, 0.0);
        assert!(matches!(
            s.decide("k1", None).await,
            SandboxAnswer::Approved(_)
        ));
        let first = s.decide("k2", Some(CARD_APPROVED)).await;
        assert_eq!(s.decide("k2", Some(CARD_APPROVED)).await, first, "replayed");
        assert_eq!(
            s.decide("k3", Some(CARD_DECLINED)).await,
            SandboxAnswer::Declined
        );
        assert_eq!(
            s.decide("k4", Some(CARD_PROCESSING_ERROR)).await,
            SandboxAnswer::Error
        );
        assert_eq!((s.charges(), s.requests()), (2, 5));
        let always = Sandbox::new(Duration::ZERO, 1.0);
        assert_eq!(always.decide("k", None).await, SandboxAnswer::Error);
    }
}
