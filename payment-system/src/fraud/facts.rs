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

    /// The currencies a customer paid in within the window, from their stored entry.
    fn recent_currencies(&self, raw: Option<Vec<u8>>) -> BTreeMap<String, DateTime<Utc>> {
        let now = self.clock.wall();
        let mut seen: BTreeMap<String, DateTime<Utc>> = raw
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        seen.retain(|_, at| now - *at < self.currency_window);
        seen
    }

    /// The two blocklist entries and the recent currencies, in one read when they live in one
    /// store (the embedded default), else one read per store, both at once.
    async fn entries(
        &self,
        network: &str,
        merchant: &str,
        currencies: &str,
    ) -> Result<[Option<Vec<u8>>; 3], BackendError> {
        if Arc::ptr_eq(&self.store, &self.recent) {
            let keys = [network, merchant, currencies];
            let mut read = self.store.get_many(&keys).await?.into_iter();
            return Ok([read.next(), read.next(), read.next()].map(Option::flatten));
        }
        let blocklist = [network, merchant];
        let (listed, recent) =
            tokio::join!(self.store.get_many(&blocklist), self.recent.get(currencies));
        let mut listed = listed?.into_iter();
        Ok([listed.next().flatten(), listed.next().flatten(), recent?])
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
        let currencies_entry = keys::currencies(&req.merchant_id, &req.customer_id);
        let (velocity, entries) = tokio::join!(
            self.velocity.hit(&scope),
            self.entries(&network_entry, &merchant_entry, &currencies_entry),
        );
        let [network, merchant, recent] = entries?;
        let blocklisted = network.is_some() || merchant.is_some();
        let velocity = velocity?;
        let currencies_seen = self.recent_currencies(recent);
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
