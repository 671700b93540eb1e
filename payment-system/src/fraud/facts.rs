//! Gathering the facts the fraud policy decides over: the only I/O before the decision.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::heijunka::WindowCounter;
use tai_core::pipeline::FactSource;
use tai_core::store::StateStore;

use crate::PaymentAttempt;
use crate::keys;

/// What the policy needs to know about an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FraudFacts {
    /// Attempts by this customer in the velocity window, this one included.
    pub velocity_count: u64,
    /// Whether the customer is on the blocklist.
    pub blocklisted: bool,
    /// Another currency this customer paid in within the currency window, if any.
    pub other_recent_currency: Option<String>,
    /// Every currency the customer paid in within the window, with when (kept so that a
    /// successful charge can add to it without reading it again).
    pub currencies_seen: BTreeMap<String, DateTime<Utc>>,
}

/// Reads the facts from the velocity counter and the state store.
#[derive(Debug, Clone)]
pub struct FraudFactSource {
    velocity: Arc<dyn WindowCounter>,
    store: Arc<dyn StateStore>,
    /// Where recent currencies live: Redis when configured (hot, shared, short-lived), else
    /// the state store (on disk, so a flood of customers does not grow the process).
    recent: Arc<dyn StateStore>,
    clock: SharedClock,
    currency_window: chrono::Duration,
}

impl FraudFactSource {
    /// Facts from `velocity`, the blocklist in `store`, and recent currencies in `recent`.
    pub fn new(
        velocity: Arc<dyn WindowCounter>,
        store: Arc<dyn StateStore>,
        recent: Arc<dyn StateStore>,
        clock: SharedClock,
        currency_window: std::time::Duration,
    ) -> Self {
        Self {
            velocity,
            store,
            recent,
            clock,
            currency_window: chrono::Duration::from_std(currency_window)
                .unwrap_or(chrono::Duration::hours(1)),
        }
    }

    /// Remembers that `customer` paid in `currency` now (after a successful charge), adding to
    /// the currencies the facts saw.
    pub async fn remember_currency(
        &self,
        merchant: &str,
        customer: &str,
        currency: &str,
        seen: &BTreeMap<String, DateTime<Utc>>,
    ) -> Result<(), BackendError> {
        let mut seen = seen.clone();
        seen.insert(currency.to_owned(), self.clock.wall());
        let bytes = serde_json::to_vec(&seen).unwrap_or_default();
        let ttl = self.currency_window.to_std().ok();
        self.recent
            .put(&keys::currencies(merchant, customer), bytes, ttl)
            .await
    }

    async fn recent_currencies(
        &self,
        merchant: &str,
        customer: &str,
    ) -> Result<BTreeMap<String, DateTime<Utc>>, BackendError> {
        let now = self.clock.wall();
        let raw = self
            .recent
            .get(&keys::currencies(merchant, customer))
            .await?;
        let mut seen: BTreeMap<String, DateTime<Utc>> = raw
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        seen.retain(|_, at| now - *at < self.currency_window);
        Ok(seen)
    }
}

impl FactSource<PaymentAttempt> for FraudFactSource {
    type Facts = FraudFacts;
    type Error = BackendError;

    async fn gather(&self, attempt: &PaymentAttempt) -> Result<FraudFacts, BackendError> {
        let req = &attempt.request;
        // Velocity, currencies and the blocklist are the merchant's own: one merchant's
        // customers never count against another's. Independent reads, waited for together.
        let scope = format!("{}:{}", req.merchant_id, req.customer_id);
        let network_entry = keys::blocklist(&req.customer_id);
        let merchant_entry = keys::merchant_blocklist(&req.merchant_id, &req.customer_id);
        let (velocity, network, merchant, recent) = tokio::join!(
            self.velocity.hit(&scope),
            self.store.get(&network_entry),
            self.store.get(&merchant_entry),
            self.recent_currencies(&req.merchant_id, &req.customer_id),
        );
        let blocklisted = network?.is_some() || merchant?.is_some();
        let velocity = velocity?;
        let currencies_seen = recent?;
        let other_recent_currency = currencies_seen
            .keys()
            .find(|c| *c != req.currency.code())
            .cloned();
        Ok(FraudFacts {
            velocity_count: velocity.count,
            blocklisted,
            other_recent_currency,
            currencies_seen,
        })
    }
}
