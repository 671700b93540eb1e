//! Shapes for the OpenAPI document only (the service parses bodies by hand, see `signal`).

#![allow(dead_code)]

use utoipa::ToSchema;

/// A payment request (docs/API.md).
#[derive(ToSchema)]
pub(crate) struct PaymentRequestDoc {
    /// Positive exact decimal, number or string; no more fraction digits than the currency has.
    #[schema(value_type = String, example = "99.99")]
    amount: String,
    /// ISO 4217, any case.
    #[schema(example = "USD")]
    currency: String,
    /// 1 to 64 of A-Z a-z 0-9 _ -.
    #[schema(example = "cust_123")]
    customer_id: String,
    /// 1 to 64 of A-Z a-z 0-9 _ -.
    #[schema(example = "merc_456")]
    merchant_id: String,
    /// Optional card.
    card: Option<CardDoc>,
    /// ISO 3166-1 alpha-2.
    ip_country: Option<String>,
    /// ISO 3166-1 alpha-2.
    card_country: Option<String>,
    /// Free text, at most 1000 characters.
    description: Option<String>,
    /// Flat map of strings, at most 50 keys.
    #[schema(value_type = Option<Object>)]
    metadata: Option<String>,
}

/// A card; never echoed, logged or traced beyond its first six and last four digits.
#[derive(ToSchema)]
pub(crate) struct CardDoc {
    /// 13 to 19 digits, Luhn-valid.
    #[schema(example = "4242424242424242")]
    number: String,
    /// 1 to 12.
    exp_month: u32,
    /// Four digits, not past.
    exp_year: i32,
    /// 3 or 4 digits.
    cvc: Option<String>,
}
