//! The Signal: a payment request, parsed and validated exactly as docs/API.md says.
//!
//! Validation happens once, here, before any policy or action runs; a request that passes is a
//! [`PaymentRequest`] whose every field is known good (an exact amount within its currency's
//! minor units, ids of the allowed shape, a Luhn-valid unexpired card, real country codes). A
//! request that fails gets a 400 naming the parameter, and nothing is stored or counted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use tai_core::runtime::ApiError;
use tai_core::runtime::error::{describe, optional_bool, refuse_unknown};

use crate::card::{Card, CardError, CardNumber, Cvc, check_expiry};
use crate::money::{AmountError, Currency, parse_amount};

/// A validated payment request.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentRequest {
    /// Exact amount in major units.
    pub amount: Decimal,
    /// The currency.
    pub currency: Currency,
    /// Who pays.
    pub customer_id: String,
    /// Who is paid.
    pub merchant_id: String,
    /// The card, if one was sent.
    pub card: Option<Card>,
    /// Country of the client's IP address (ISO 3166-1 alpha-2, upper case).
    pub ip_country: Option<String>,
    /// Country that issued the card.
    pub card_country: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Flat string map.
    pub metadata: BTreeMap<String, String>,
    /// Capture at once (`true`, the default) or authorize only.
    pub capture: bool,
}

/// Limits on what a request may carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The largest amount, in the reference currency's major units (`MAX_AMOUNT`).
    pub max_amount: Decimal,
    /// Units of each currency worth one unit of the reference currency (the rules file's
    /// rates), so the cap means the same in every currency.
    pub rates: std::sync::Arc<BTreeMap<String, Decimal>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_amount: Decimal::from(1_000_000),
            rates: std::sync::Arc::default(),
        }
    }
}

impl Limits {
    /// The largest amount in `currency`'s major units.
    pub fn max_for(&self, currency: &str) -> Decimal {
        match self.rates.get(currency) {
            Some(rate) => self
                .max_amount
                .checked_mul(*rate)
                .unwrap_or(Decimal::MAX)
                .trunc(),
            None => self.max_amount,
        }
    }
}

pub(crate) const KNOWN: &[&str] = &[
    "capture",
    "amount",
    "currency",
    "customer_id",
    "merchant_id",
    "card",
    "ip_country",
    "card_country",
    "description",
    "metadata",
];
pub(crate) const MAX_METADATA_KEYS: usize = 50;
pub(crate) const MAX_METADATA_KEY_LEN: usize = 40;
pub(crate) const MAX_METADATA_VALUE_LEN: usize = 500;
pub(crate) const MAX_DESCRIPTION_LEN: usize = 1000;

/// ISO 3166-1 alpha-2 codes.
pub(crate) const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

fn invalid(code: &str, param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(code, param, message)
}

fn declined(code: &str, param: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::PAYMENT_REQUIRED,
        tai_core::runtime::error::ErrorType::CardError,
        code,
        message,
    )
    .with_param(param)
}

fn missing(param: &str) -> ApiError {
    invalid(
        "parameter_missing",
        param,
        format!("Missing required parameter: {param}."),
    )
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    required: bool,
) -> Result<Option<&'a str>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) if required => Err(missing(name)),
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(
            "parameter_invalid_string",
            name,
            format!(
                "Invalid {name}: expected a string, got {}.",
                describe(other)
            ),
        )),
    }
}

/// The longest id (`customer_id`, `merchant_id`).
pub(crate) const ID_MAX: usize = 64;

/// The `merchant_id` of a payment body when it is a valid id, read without parsing the rest:
/// the key of the merchant's rate limit.
pub(crate) fn merchant_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Merchant {
        merchant_id: String,
    }
    let m: Merchant = serde_json::from_slice(body).ok()?;
    is_id(&m.merchant_id).then_some(m.merchant_id)
}

/// Whether `value` is an id: 1 to [`ID_MAX`] of A-Z a-z 0-9 _ - (the OpenAPI pattern is
/// [`id_pattern`]).
pub(crate) fn is_id(value: &str) -> bool {
    (1..=ID_MAX).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// [`is_id`] as a regular expression, for the OpenAPI document.
pub(crate) fn id_pattern() -> String {
    format!("^[A-Za-z0-9_-]{{1,{ID_MAX}}}$")
}

fn id_field(obj: &Map<String, Value>, name: &str) -> Result<String, ApiError> {
    let value = string_field(obj, name, true)?.unwrap_or_default();
    if !is_id(value) {
        return Err(invalid(
            "parameter_invalid",
            name,
            format!("Invalid {name}: 1 to 64 characters of A-Z a-z 0-9 _ -."),
        ));
    }
    Ok(value.to_owned())
}

fn country_field(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    let Some(value) = string_field(obj, name, false)? else {
        return Ok(None);
    };
    let upper = value.to_ascii_uppercase();
    if upper.len() != 2
        || !upper.bytes().all(|b| b.is_ascii_uppercase())
        || !COUNTRIES.split(' ').any(|c| c == upper)
    {
        return Err(invalid(
            "country_invalid",
            name,
            format!("Invalid {name}: expected an ISO 3166-1 alpha-2 code such as US."),
        ));
    }
    Ok(Some(upper))
}

fn integer(obj: &Map<String, Value>, name: &str, param: &str) -> Result<i64, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(missing(param)),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
            invalid(
                "parameter_invalid_integer",
                param,
                format!("Invalid {param}: expected a whole number."),
            )
        }),
        Some(Value::String(s)) => s.parse::<i64>().map_err(|_| {
            invalid(
                "parameter_invalid_integer",
                param,
                format!("Invalid {param}: expected a whole number."),
            )
        }),
        Some(other) => Err(invalid(
            "parameter_invalid_integer",
            param,
            format!(
                "Invalid {param}: expected a whole number, got {}.",
                describe(other)
            ),
        )),
    }
}

/// The card, or the decline a card network would answer for it (a failed check digit, an
/// expired card). The decline is returned only once the whole request is known well-formed, so
/// a malformed request is a 400 whatever its card.
type CardOutcome = Result<Option<Card>, ApiError>;

fn card_field(obj: &Map<String, Value>, now: DateTime<Utc>) -> Result<CardOutcome, ApiError> {
    let card = match obj.get("card") {
        None | Some(Value::Null) => return Ok(Ok(None)),
        Some(Value::Object(card)) => card,
        Some(other) => {
            return Err(invalid(
                "parameter_invalid",
                "card",
                format!("Invalid card: expected an object, got {}.", describe(other)),
            ));
        }
    };
    if let Some(unknown) = card
        .keys()
        .find(|k| !["number", "exp_month", "exp_year", "cvc"].contains(&k.as_str()))
    {
        return Err(invalid(
            "parameter_unknown",
            &format!("card[{unknown}]"),
            format!("Received unknown parameter: card[{unknown}]."),
        ));
    }
    let number = match card.get("number") {
        None | Some(Value::Null) => return Err(missing("card[number]")),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(invalid(
                "parameter_invalid_string",
                "card[number]",
                format!(
                    "Invalid card[number]: expected a string, got {}.",
                    describe(other)
                ),
            ));
        }
    };
    // A number of the wrong shape is a malformed request (400); one of the right shape that
    // fails its check digit, like an expired card, is a card the network would decline: a
    // card_error (402), as Stripe answers, so every body the schema allows is accepted or declined.
    let number = match CardNumber::parse(number) {
        Ok(number) => Ok(number),
        Err(e @ CardError::Luhn) => Err(declined(
            "incorrect_number",
            "card[number]",
            format!("{e}."),
        )),
        Err(e) => return Err(invalid("invalid_number", "card[number]", format!("{e}."))),
    };
    let month = integer(card, "exp_month", "card[exp_month]")?;
    let year = integer(card, "exp_year", "card[exp_year]")?;
    let expiry = match check_expiry(month, year, now) {
        Ok(expiry) => Ok(expiry),
        Err(e @ CardError::Month) => {
            return Err(invalid(
                "invalid_expiry_month",
                "card[exp_month]",
                format!("{e}."),
            ));
        }
        Err(e @ CardError::Year) => {
            return Err(invalid(
                "invalid_expiry_year",
                "card[exp_year]",
                format!("{e}."),
            ));
        }
        Err(e) => Err(declined("expired_card", "card[exp_year]", format!("{e}."))),
    };
    let cvc = match card.get("cvc") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(Cvc::parse(s).map_err(|e| invalid("invalid_cvc", "card[cvc]", format!("{e}.")))?)
        }
        Some(_) => {
            return Err(invalid(
                "invalid_cvc",
                "card[cvc]",
                "cvc must be a string of 3 or 4 digits.",
            ));
        }
    };
    Ok(number.and_then(|number| {
        let (exp_month, exp_year) = expiry?;
        Ok(Some(Card {
            number,
            exp_month,
            exp_year,
            cvc,
        }))
    }))
}

fn metadata_field(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let map = match obj.get("metadata") {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(invalid(
                "parameter_invalid",
                "metadata",
                format!(
                    "Invalid metadata: expected an object of strings, got {}.",
                    describe(other)
                ),
            ));
        }
    };
    if map.len() > MAX_METADATA_KEYS {
        return Err(invalid(
            "metadata_too_large",
            "metadata",
            format!("metadata holds at most {MAX_METADATA_KEYS} keys."),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let param = format!("metadata[{k}]");
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY_LEN {
            return Err(invalid(
                "parameter_invalid",
                "metadata",
                format!("metadata keys are 1 to {MAX_METADATA_KEY_LEN} characters."),
            ));
        }
        match v {
            Value::String(s) if s.chars().count() <= MAX_METADATA_VALUE_LEN => {
                out.insert(k.clone(), s.clone());
            }
            Value::String(_) => {
                return Err(invalid(
                    "parameter_invalid",
                    &param,
                    format!("metadata values are at most {MAX_METADATA_VALUE_LEN} characters."),
                ));
            }
            other => {
                return Err(invalid(
                    "parameter_invalid_string",
                    &param,
                    format!(
                        "Invalid {param}: metadata is a flat map of strings, got {}.",
                        describe(other)
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Parses and validates a payment request body; a card the network would decline is an error
/// too (402).
pub fn parse(
    body: &Value,
    now: DateTime<Utc>,
    limits: &Limits,
) -> Result<PaymentRequest, ApiError> {
    match parse_declinable(body, now, limits)? {
        (_, Some(declined)) => Err(declined),
        (request, None) => Ok(request),
    }
}

/// Parses and validates a payment request body. A malformed request is an error (400); a
/// well-formed one comes with the decline its card would get (a failed check digit, an expired
/// card: 402), which the caller answers once it has checked who may pay and how often, so card
/// testing is refused for the wrong merchant (403) and counts against the rate limit (429).
/// The request's `card` is `None` when it is declined.
pub fn parse_declinable(
    body: &Value,
    now: DateTime<Utc>,
    limits: &Limits,
) -> Result<(PaymentRequest, Option<ApiError>), ApiError> {
    let Value::Object(obj) = body else {
        return Err(ApiError::invalid(
            "invalid_body",
            "body",
            format!("The body must be a JSON object, got {}.", describe(body)),
        ));
    };
    refuse_unknown(obj, KNOWN)?;
    // currency first: the amount's precision depends on it
    let currency_text = string_field(obj, "currency", true)?.unwrap_or_default();
    let currency = Currency::parse(currency_text).ok_or_else(|| {
        let shown: String = currency_text.chars().take(16).collect();
        invalid(
            "invalid_currency",
            "currency",
            format!("Invalid currency: {shown:?} is not a supported ISO 4217 code."),
        )
    })?;
    let amount_text = match obj.get("amount") {
        None | Some(Value::Null) => return Err(missing("amount")),
        // with serde_json's arbitrary_precision the number's text is exactly what was sent
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(invalid(
                "parameter_invalid",
                "amount",
                format!(
                    "Invalid amount: expected a number or a string, got {}.",
                    describe(other)
                ),
            ));
        }
    };
    let amount =
        parse_amount(&amount_text, currency, limits.max_for(currency.code())).map_err(|e| {
            let code = match e {
                AmountError::NotANumber(_) => "amount_invalid",
                AmountError::NotPositive(_) => "amount_too_small",
                AmountError::TooPrecise { .. } => "amount_invalid_precision",
                AmountError::TooLarge { .. } => "amount_too_large",
            };
            invalid(code, "amount", format!("{e}."))
        })?;
    let customer_id = id_field(obj, "customer_id")?;
    let merchant_id = id_field(obj, "merchant_id")?;
    let card = card_field(obj, now)?;
    let ip_country = country_field(obj, "ip_country")?;
    let card_country = country_field(obj, "card_country")?;
    let description = string_field(obj, "description", false)?.map(str::to_owned);
    if description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION_LEN)
    {
        return Err(invalid(
            "parameter_invalid",
            "description",
            format!("description is at most {MAX_DESCRIPTION_LEN} characters."),
        ));
    }
    let metadata = metadata_field(obj)?;
    let capture = optional_bool(obj, "capture", true)?;
    // a well-formed request whose card the network would decline
    let (card, declined) = match card {
        Ok(card) => (card, None),
        Err(declined) => (None, Some(declined)),
    };
    let request = PaymentRequest {
        capture,
        amount,
        currency,
        customer_id,
        merchant_id,
        card,
        ip_country,
        card_country,
        description,
        metadata,
    };
    Ok((request, declined))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0)
            .single()
            .expect("date")
    }

    fn body(text: &str) -> Value {
        serde_json::from_str(text).expect("json")
    }

    #[test]
    fn parses_the_quick_start_request_exactly() {
        let r = parse(&body(r#"{"amount":99.99,"customer_id":"cust_123","currency":"usd","merchant_id":"merc_456"}"#), now(), &Limits::default()).expect("valid");
        assert_eq!(r.amount.to_string(), "99.99");
        assert_eq!(r.currency.code(), "USD");
        let r = parse(&body(r#"{"amount":"0.10","customer_id":"c","currency":"EUR","merchant_id":"m","ip_country":"de","card_country":"FR","card":{"number":"4242424242424242","exp_month":12,"exp_year":2030,"cvc":"123"},"metadata":{"order":"42"}}"#), now(), &Limits::default()).expect("valid");
        assert_eq!(r.amount.to_string(), "0.10");
        assert_eq!(r.ip_country.as_deref(), Some("DE"));
        assert_eq!(
            r.card.as_ref().map(|c| c.number.masked()),
            Some("424242******4242".into())
        );
        // 0.1 + 0.2 as written stays exact: no float anywhere
        let r = parse(
            &body(
                r#"{"amount":0.30000000000000004,"customer_id":"c","currency":"USD","merchant_id":"m"}"#,
            ),
            now(),
            &Limits::default(),
        );
        assert_eq!(r.expect_err("too precise").code, "amount_invalid_precision");
    }

    #[test]
    fn refusals_name_the_parameter() {
        let base = json!({"amount": 10, "currency": "USD", "customer_id": "c", "merchant_id": "m"});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        let cases = vec![
            (with("amount", json!(true)), "amount"),
            (with("customer_id", json!("bad id")), "customer_id"),
            (with("customer_id", json!("ü")), "customer_id"),
            (with("merchant_id", json!("m".repeat(65))), "merchant_id"),
            (with("currency", json!("XYZ")), "currency"),
            (with("ip_country", json!("XX")), "ip_country"),
            (
                with(
                    "card",
                    json!({"number": "4242424242424241", "exp_month": 1, "exp_year": 2030}),
                ),
                "card[number]",
            ),
            (
                with(
                    "card",
                    json!({"number": "4242424242424242", "exp_month": 1, "exp_year": 2020}),
                ),
                "card[exp_year]",
            ),
            (
                with(
                    "card",
                    json!({"number": "4242424242424242", "exp_month": 1, "exp_year": 2030, "pin": "1"}),
                ),
                "card[pin]",
            ),
            (with("metadata", json!({"a": {"b": "c"}})), "metadata[a]"),
            (with("extra", json!(1)), "extra"),
            (
                json!({"currency": "USD", "customer_id": "c", "merchant_id": "m"}),
                "amount",
            ),
            (json!([1, 2]), "body"),
        ];
        for (b, param) in cases {
            let e = parse(&b, now(), &Limits::default()).expect_err(&b.to_string());
            // a card of the right shape that fails its check digit or has expired is declined
            // (402, card_error), as a card network answers; everything else is malformed (400)
            let declined =
                b["card"]["number"] == "4242424242424241" || b["card"]["exp_year"] == 2020;
            assert_eq!(e.status.as_u16(), if declined { 402 } else { 400 }, "{b}");
            assert_eq!(e.param.as_deref(), Some(param), "{b}: {}", e.message);
        }
    }

    #[test]
    fn a_declined_card_is_reported_only_once_the_rest_of_the_request_is_well_formed() {
        let body = json!({"amount": 10, "currency": "USD", "customer_id": "c", "merchant_id": "m",
            "card": {"number": "4242424242424241", "exp_month": 1, "exp_year": 2020},
            "metadata": {"a": 1}});
        let e = parse(&body, now(), &Limits::default()).expect_err("malformed");
        assert_eq!(e.status.as_u16(), 400);
        assert_eq!(e.param.as_deref(), Some("metadata[a]"));
        let mut body = body;
        body["metadata"] = json!({"a": "1"});
        let e = parse(&body, now(), &Limits::default()).expect_err("declined");
        assert_eq!(
            (e.status.as_u16(), e.code.as_str()),
            (402, "incorrect_number")
        );
    }
}
