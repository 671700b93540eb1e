//! Property tests: money, cards, the request parser and the fraud policy over generated input.

use chrono::TimeZone;
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tai_core::policy::{Decision, Policy};

use crate::card::CardNumber;
use crate::fraud::{DEFAULT_RULES, FraudFacts, FraudPolicy, FraudRules};
use crate::money::{Currency, parse_amount};
use crate::signal::{Limits, parse};

fn usd() -> Currency {
    Currency::parse("USD").expect("USD")
}

fn max() -> Decimal {
    Decimal::from(1_000_000)
}

fn luhn_check_digit(body: &[u8]) -> u8 {
    // the digit that makes body + digit pass: double every second digit from the right of the full number
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(*d);
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    ((10 - sum % 10) % 10) as u8
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("amount".to_owned()),
                    Just("currency".to_owned()),
                    Just("customer_id".to_owned()),
                    Just("merchant_id".to_owned()),
                    Just("card".to_owned()),
                    "[a-z_]{1,12}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn every_cent_amount_parses_to_exactly_itself(cents in 1u64..=100_000_000) {
        let text = format!("{}.{:02}", cents / 100, cents % 100);
        let parsed = parse_amount(&text, usd(), max()).expect("a valid amount");
        prop_assert_eq!(parsed, Decimal::new(i64::try_from(cents).expect("fits"), 2));
        prop_assert_eq!(parsed.to_string(), text);
    }

    #[test]
    fn three_fraction_digits_are_refused_for_usd(whole in 0u64..1_000_000, mills in 1u64..1000) {
        prop_assume!(mills % 10 != 0);
        let text = format!("{whole}.{mills:03}");
        prop_assert!(parse_amount(&text, usd(), max()).is_err());
    }

    #[test]
    fn no_string_makes_the_amount_parser_panic(text in ".{0,64}") {
        let _ = parse_amount(&text, usd(), max());
    }

    #[test]
    fn luhn_accepts_valid_numbers_and_catches_every_single_digit_error(
        body in prop::collection::vec(0u8..10, 12..=18),
        position in any::<prop::sample::Index>(),
        replacement in 0u8..10,
    ) {
        let mut digits = body.clone();
        digits.push(luhn_check_digit(&body));
        let number: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
        prop_assert!(CardNumber::parse(&number).is_ok(), "{}", number);
        let i = position.index(digits.len());
        prop_assume!(digits[i] != replacement);
        digits[i] = replacement;
        let typo: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
        prop_assert!(CardNumber::parse(&typo).is_err(), "{}", typo);
    }

    #[test]
    fn any_json_body_is_a_valid_payment_a_400_naming_a_parameter_or_a_declined_card(body in any_json()) {
        let now = chrono::Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0).single().expect("date");
        match parse(&body, now, &Limits::default()) {
            Ok(req) => {
                prop_assert!(req.amount > Decimal::ZERO && req.amount <= max());
            }
            Err(e) => {
                // 402 only for a well-formed request whose card fails its check digit or expired
                let declined = e.status.as_u16() == 402
                    && ["incorrect_number", "expired_card"].contains(&e.code.as_str());
                prop_assert!(e.status.as_u16() == 400 || declined, "{}", e);
                prop_assert!(e.param.is_some(), "{}", e.message);
            }
        }
    }

    #[test]
    fn the_fraud_score_is_the_capped_exact_sum_and_decides_at_the_threshold(
        velocity in 0u64..20,
        blocklisted in any::<bool>(),
        cents in 1u64..100_000_000,
        other_currency in any::<bool>(),
        countries in prop_oneof![Just(None), Just(Some(("US", "US"))), Just(Some(("DE", "US")))],
    ) {
        let policy = FraudPolicy::new(FraudRules::from_toml(DEFAULT_RULES).expect("rules"));
        let mut body = json!({"amount": format!("{}.{:02}", cents / 100, cents % 100), "currency": "USD", "customer_id": "c", "merchant_id": "m"});
        if let Some((ip, card)) = countries {
            body["ip_country"] = json!(ip);
            body["card_country"] = json!(card);
        }
        let now = chrono::Utc::now();
        let attempt = crate::PaymentAttempt::new(parse(&body, now, &Limits::default()).expect("valid"), "t".into(), None);
        let facts = FraudFacts {
            velocity_count: velocity,
            blocklisted,
            other_recent_currency: other_currency.then(|| "EUR".to_owned()),
            currencies_seen: Default::default(),
        };
        let v = policy.evaluate(&attempt, &facts);
        let sum: Decimal = v.reasons.iter().map(|r| r.weight).sum();
        prop_assert_eq!(v.score, sum.min(Decimal::ONE));
        prop_assert_eq!(v.decision == Decision::Deny, v.score >= Decimal::new(5, 1));
        prop_assert_eq!(v.reasons.iter().any(|r| r.rule == "velocity"), velocity > 5);
        prop_assert_eq!(v.reasons.iter().any(|r| r.rule == "blocklist"), blocklisted);
        prop_assert_eq!(v.reasons.iter().any(|r| r.rule == "amount_anomaly"), cents > 500_000);
    }
}
