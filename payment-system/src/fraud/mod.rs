//! The Policy: the fraud rules of docs/API.md, as data, giving an explained verdict.
//!
//! Facts are gathered first ([`FraudFactSource`]: the customer's velocity count, blocklist
//! membership, currencies paid in recently) and then [`FraudPolicy::evaluate`] decides over them
//! without I/O. Each rule that fires adds its weight and a reason naming the value that fired it;
//! the score is the exact decimal sum capped at `score_cap`, and at `block_threshold` or more the
//! payment is blocked before the gateway is called.

mod facts;

use std::time::Duration;

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;
use tai_core::policy::{Policy, Reason, Verdict};

pub use facts::{FraudFactSource, FraudFacts};

use crate::PaymentAttempt;

/// Every rule's name, as `fraud_reasons[].rule` and the `rule` label of
/// `payment_fraud_detected_total` show it.
pub const RULES: &[&str] = &["blocklist", "velocity", "amount_anomaly", "geo_anomaly"];

/// The default rules file, compiled in so the binary runs from any directory.
pub const DEFAULT_RULES: &str = include_str!("../../../config/fraud_rules.toml");

/// The fraud rules, as loaded from TOML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FraudRules {
    /// Score at or above which a payment is blocked.
    pub block_threshold: Decimal,
    /// Score at or above which (and below the block threshold) a payment is held for review
    /// (`REQUIRES_REVIEW`); the block threshold when not set, so nothing is held.
    #[serde(default)]
    pub review_threshold: Option<Decimal>,
    /// The highest score.
    pub score_cap: Decimal,
    /// Customers blocked outright for every merchant (seeded into the store at start).
    #[serde(default)]
    pub blocklist: Vec<String>,
    /// Whether an entry a merchant adds to the blocklist applies to every merchant (a network's
    /// shared list); by default it is that merchant's own.
    #[serde(default)]
    pub network_blocklist: bool,
    /// The currency amount thresholds are given in.
    #[serde(default = "usd")]
    pub reference_currency: String,
    /// Units of each currency worth one unit of the reference currency (for thresholds only).
    #[serde(default)]
    pub rates: BTreeMap<String, Decimal>,
    /// The rules.
    pub rules: Rules,
}

/// Each rule's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Rules {
    /// Blocklisted customer.
    pub blocklist: Weighted,
    /// Too many attempts.
    pub velocity: Velocity,
    /// Unusually large amount.
    pub amount_anomaly: AmountAnomaly,
    /// Country or currency mismatch.
    pub geo_anomaly: GeoAnomaly,
}

/// A rule with only a weight.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Weighted {
    /// What it adds.
    pub weight: Decimal,
}

/// The velocity rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Velocity {
    /// What it adds.
    pub weight: Decimal,
    /// Attempts allowed in the window.
    pub max_attempts: u64,
    /// The window.
    pub window_secs: u64,
}

/// The amount rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AmountAnomaly {
    /// What it adds.
    pub weight: Decimal,
    /// Fires above this amount (the reference currency's major units).
    pub above: Decimal,
    /// Thresholds of their own for some currencies (their major units).
    #[serde(default)]
    pub above_in: BTreeMap<String, Decimal>,
}

fn usd() -> String {
    "USD".into()
}

impl FraudRules {
    /// `amount` (major units of the reference currency) in `currency`'s major units, and how it
    /// was found, for reasons: e.g. `750000 JPY (5000 USD at 150)`.
    pub fn in_currency(&self, amount: Decimal, currency: &str) -> (Decimal, String) {
        if currency == self.reference_currency {
            return (amount, format!("{amount} {currency}"));
        }
        match self.rates.get(currency) {
            Some(rate) => {
                let converted = (amount * rate).normalize();
                (
                    converted,
                    format!(
                        "{converted} {currency} ({amount} {} at {rate})",
                        self.reference_currency
                    ),
                )
            }
            None => (
                amount,
                format!("{amount} {currency} (no rate: compared as is)"),
            ),
        }
    }

    /// The amount anomaly threshold for `currency`, with its description.
    pub fn amount_threshold(&self, currency: &str) -> (Decimal, String) {
        match self.rules.amount_anomaly.above_in.get(currency) {
            Some(own) => (*own, format!("{own} {currency}")),
            None => self.in_currency(self.rules.amount_anomaly.above, currency),
        }
    }
}

/// The geography rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GeoAnomaly {
    /// What it adds.
    pub weight: Decimal,
    /// How long a currency paid in is remembered.
    pub currency_window_secs: u64,
}

impl FraudRules {
    /// Parses a rules file.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let rules: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(review) = rules.review_threshold
            && (review > rules.block_threshold || review <= Decimal::ZERO)
        {
            return Err(format!(
                "review_threshold {review} must be above 0 and at most block_threshold {}",
                rules.block_threshold
            ));
        }
        Ok(rules)
    }

    /// The velocity window.
    pub fn velocity_window(&self) -> Duration {
        Duration::from_secs(self.rules.velocity.window_secs)
    }

    /// How long a currency is remembered for the geo rule.
    pub fn currency_window(&self) -> Duration {
        Duration::from_secs(self.rules.geo_anomaly.currency_window_secs)
    }
}

/// The fraud policy over [`FraudRules`].
#[derive(Debug, Clone)]
pub struct FraudPolicy {
    rules: FraudRules,
}

impl FraudPolicy {
    /// A policy with `rules`.
    pub fn new(rules: FraudRules) -> Self {
        Self { rules }
    }

    /// The rules.
    pub fn rules(&self) -> &FraudRules {
        &self.rules
    }
}

impl Policy<PaymentAttempt, FraudFacts> for FraudPolicy {
    fn evaluate(&self, attempt: &PaymentAttempt, facts: &FraudFacts) -> Verdict {
        let r = &self.rules.rules;
        let req = &attempt.request;
        let mut reasons = Vec::new();
        if facts.blocklisted {
            reasons.push(Reason::new(
                "blocklist",
                format!("customer {} is on the blocklist", req.customer_id),
                "on the blocklist",
                r.blocklist.weight,
            ));
        }
        if facts.velocity_count > r.velocity.max_attempts {
            reasons.push(Reason::new(
                "velocity",
                format!(
                    "{} attempts in {}s",
                    facts.velocity_count, r.velocity.window_secs
                ),
                format!("> {}", r.velocity.max_attempts),
                r.velocity.weight,
            ));
        }
        let (above, described) = self.rules.amount_threshold(req.currency.code());
        if req.amount > above {
            reasons.push(Reason::new(
                "amount_anomaly",
                format!("{} {}", req.amount, req.currency.code()),
                format!("> {described}"),
                r.amount_anomaly.weight,
            ));
        }
        let geo = match (
            &req.ip_country,
            &req.card_country,
            &facts.other_recent_currency,
        ) {
            (Some(ip), Some(card), _) if ip != card => Some((
                format!("ip_country {ip} but card_country {card}"),
                "countries match".to_owned(),
            )),
            (_, _, Some(other)) => Some((
                format!(
                    "paid in {other} within {}s, now {}",
                    r.geo_anomaly.currency_window_secs,
                    req.currency.code()
                ),
                "one currency per hour".to_owned(),
            )),
            _ => None,
        };
        if let Some((observed, threshold)) = geo {
            reasons.push(Reason::new(
                "geo_anomaly",
                observed,
                threshold,
                r.geo_anomaly.weight,
            ));
        }
        let mut verdict = Verdict::scored(
            reasons,
            self.rules.score_cap,
            self.rules
                .review_threshold
                .unwrap_or(self.rules.block_threshold),
            self.rules.block_threshold,
        );
        // show at least one decimal (0.0, 1.0) as docs/API.md's examples do
        if verdict.score.scale() == 0 {
            verdict.score.rescale(1);
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;
    use tai_core::policy::Decision;

    use super::*;
    use crate::signal::{Limits, parse};

    fn attempt(body: serde_json::Value) -> PaymentAttempt {
        PaymentAttempt::new(
            parse(&body, Utc::now(), &Limits::default()).expect("valid"),
            "t".into(),
            None,
        )
    }

    fn policy() -> FraudPolicy {
        FraudPolicy::new(FraudRules::from_toml(DEFAULT_RULES).expect("rules"))
    }

    fn facts(velocity_count: u64) -> FraudFacts {
        FraudFacts {
            velocity_count,
            blocklisted: false,
            other_recent_currency: None,
            currencies_seen: Default::default(),
        }
    }

    #[test]
    fn amount_thresholds_mean_the_same_in_every_currency() {
        let rules = FraudRules::from_toml(DEFAULT_RULES).expect("rules");
        let p = FraudPolicy::new(rules.clone());
        let limits = Limits {
            max_amount: Decimal::from(1_000_000),
            rates: std::sync::Arc::new(rules.rates.clone()),
        };
        let pay = |amount: &str, currency: &str| {
            let body = json!({"amount": amount, "currency": currency, "customer_id": "c", "merchant_id": "m", "ip_country": "DE", "card_country": "US"});
            PaymentAttempt::new(
                parse(&body, Utc::now(), &limits).expect("within the cap"),
                "t".into(),
                None,
            )
        };
        // about 40 USD: only the country mismatch fires
        let v = p.evaluate(&pay("6000", "JPY"), &facts(1));
        assert_eq!(v.score.to_string(), "0.2");
        assert_eq!(v.decision, Decision::Allow);
        // about 6,000 USD: the amount rule fires, and its reason names the converted threshold
        let v = p.evaluate(&pay("900000", "JPY"), &facts(1));
        let amount = v
            .reasons
            .iter()
            .find(|r| r.rule == "amount_anomaly")
            .expect("fired");
        assert_eq!(amount.threshold, "> 750000 JPY (5000 USD at 150)");
        // 50,000,000 VND (about 2,000 USD) is within the cap and not an anomaly
        let v = p.evaluate(&pay("50000000", "VND"), &facts(1));
        assert!(v.reasons.iter().all(|r| r.rule != "amount_anomaly"));
        assert_eq!(limits.max_for("VND").to_string(), "25000000000");
        assert!(parse(&json!({"amount": "2000000", "currency": "USD", "customer_id": "c", "merchant_id": "m"}), Utc::now(), &limits).is_err());
    }

    #[test]
    fn default_rules_as_api_md_says() {
        let p = policy();
        let plain = attempt(
            json!({"amount": 99.99, "currency": "USD", "customer_id": "c", "merchant_id": "m"}),
        );
        let v = p.evaluate(&plain, &facts(1));
        assert_eq!(
            (v.decision, v.score.to_string().as_str()),
            (Decision::Allow, "0.0")
        );

        let big = attempt(
            json!({"amount": "10000.00", "currency": "USD", "customer_id": "c", "merchant_id": "m"}),
        );
        let v = p.evaluate(&big, &facts(1));
        assert_eq!(
            (v.decision, v.score.to_string().as_str()),
            (Decision::Allow, "0.3")
        );
        assert_eq!(v.reasons[0].rule, "amount_anomaly");
        assert_eq!(v.reasons[0].observed, "10000.00 USD");

        let v = p.evaluate(&plain, &facts(5));
        assert_eq!(v.decision, Decision::Allow, "the 5th attempt passes");
        let v = p.evaluate(&plain, &facts(6));
        assert_eq!(
            (v.decision, v.reasons[0].observed.as_str()),
            (Decision::Deny, "6 attempts in 60s")
        );

        let v = p.evaluate(
            &plain,
            &FraudFacts {
                blocklisted: true,
                ..facts(6)
            },
        );
        assert_eq!(v.score.to_string(), "1.0", "capped");
        assert_eq!(v.reasons.len(), 2);

        let geo = attempt(
            json!({"amount": 6000, "currency": "USD", "customer_id": "c", "merchant_id": "m", "ip_country": "DE", "card_country": "US"}),
        );
        let v = p.evaluate(&geo, &facts(1));
        assert_eq!(
            (v.decision, v.score.to_string().as_str()),
            (Decision::Deny, "0.5"),
            "0.3 + 0.2 reaches the threshold exactly"
        );
        let v = p.evaluate(
            &plain,
            &FraudFacts {
                other_recent_currency: Some("EUR".into()),
                ..facts(1)
            },
        );
        assert_eq!(v.reasons[0].rule, "geo_anomaly");
        assert_eq!(v.decision, Decision::Allow);
    }
}
