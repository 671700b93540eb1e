//! The OpenAPI shapes of what the service parses by hand (see `signal` and `routes`), built
//! from the same constants and functions the parsers use, so the document states every
//! constraint the server enforces and cannot drift from it.
//!
//! Two constraints of a payment cannot be written in JSON Schema: an amount's fraction digits
//! depend on its currency, and its cap is converted into the currency by the fraud rules'
//! rates. Both are in the amount's description; a request that breaks them is a 400 naming
//! `amount`. A card number of the right shape that fails its check digit, and an expired card,
//! are declined with 402 (`incorrect_number`, `expired_card`), as a card network would.

use serde_json::json;
use utoipa::openapi::path::{Parameter, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::openapi::{OpenApi, RefOr};
use utoipa::{PartialSchema, ToSchema};

use tai_core::runtime::openapi::{integer, nullable};

use crate::signal;

/// The largest page a listing returns (`limit`).
pub(crate) const PAGE_MAX: i64 = 100;
/// The longest refund reason.
pub(crate) const REASON_MAX: usize = 200;

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn id(description: &str) -> Object {
    string()
        .pattern(Some(signal::id_pattern()))
        .min_length(Some(1))
        .max_length(Some(signal::ID_MAX))
        .description(Some(description))
        .build()
}

/// An amount: a positive exact decimal as a JSON string or number.
fn amount(description: &str, nullable_: bool) -> Schema {
    let text = string()
        // a digit other than 0 in the whole part or in the fraction: greater than zero
        .pattern(Some(
            r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)$",
        ))
        .max_length(Some(40));
    let number = ObjectBuilder::new()
        .schema_type(Type::Number)
        .exclusive_minimum(Some(0))
        .maximum(Some(1e15));
    let mut one_of = OneOfBuilder::new().item(text).item(number);
    if nullable_ {
        one_of = one_of.item(ObjectBuilder::new().schema_type(Type::Null));
    }
    one_of
        .description(Some(description))
        .examples([json!("99.99")])
        .build()
        .into()
}

fn countries(description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(nullable(Type::String))
        .enum_values(Some(
            signal::COUNTRIES
                .split(' ')
                .flat_map(|c| [c.to_owned(), c.to_ascii_lowercase()])
                .map(serde_json::Value::from)
                .chain([serde_json::Value::Null]),
        ))
        .description(Some(description))
        .build()
}

/// A payment request (`POST /payment`).
pub(crate) struct PaymentRequestDoc;

impl PartialSchema for PaymentRequestDoc {
    fn schema() -> RefOr<Schema> {
        let known = signal::KNOWN;
        debug_assert!(known.contains(&"card") && known.contains(&"metadata"));
        let currencies = crate::money::currency_codes()
            .flat_map(|c| [c.to_owned(), c.to_ascii_lowercase()])
            .map(serde_json::Value::from);
        let metadata = ObjectBuilder::new()
            .schema_type(nullable(Type::Object))
            .max_properties(Some(signal::MAX_METADATA_KEYS))
            .property_names(Some(
                string()
                    .min_length(Some(1))
                    .max_length(Some(signal::MAX_METADATA_KEY_LEN)),
            ))
            .additional_properties(Some(
                string().max_length(Some(signal::MAX_METADATA_VALUE_LEN)),
            ))
            .description(Some("A flat map of strings"));
        ObjectBuilder::new()
            .property(
                "amount",
                amount(
                    "Greater than zero, with no more fraction digits than the currency has (0 for JPY, 3 for KWD), and at most MAX_AMOUNT USD converted at the fraud rules' rates; otherwise 400 naming amount",
                    false,
                ),
            )
            .required("amount")
            .property(
                "currency",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(currencies))
                    .description(Some("ISO 4217"))
                    .examples([json!("USD")]),
            )
            .required("currency")
            .property("customer_id", id("Who pays"))
            .required("customer_id")
            .property("merchant_id", id("Who is paid"))
            .required("merchant_id")
            .property("card", CardDoc::schema())
            .property("ip_country", countries("ISO 3166-1 alpha-2"))
            .property("card_country", countries("ISO 3166-1 alpha-2"))
            .property(
                "description",
                ObjectBuilder::new()
                    .schema_type(nullable(Type::String))
                    .max_length(Some(signal::MAX_DESCRIPTION_LEN)),
            )
            .property("metadata", metadata)
            .property(
                "capture",
                ObjectBuilder::new()
                    .schema_type(nullable(Type::Boolean))
                    .description(Some("false: authorize only (AUTHORIZED), capture later")),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for PaymentRequestDoc {}

/// A card; never echoed, logged or traced beyond its first six and last four digits.
pub(crate) struct CardDoc;

impl PartialSchema for CardDoc {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(nullable(Type::Object))
            .property(
                "number",
                string()
                    .pattern(Some("^[0-9]{13,19}$"))
                    .description(Some(
                        "13 to 19 digits; one that fails the check digit is declined (402 incorrect_number)",
                    ))
                    .examples([json!("4242424242424242")]),
            )
            .required("number")
            .property(
                "exp_month",
                integer(1, 12),
            )
            .required("exp_month")
            .property(
                "exp_year",
                integer(1000, 9999)
                    .description(Some("A card past its month is declined (402 expired_card)")),
            )
            .required("exp_year")
            .property(
                "cvc",
                ObjectBuilder::new()
                    .schema_type(nullable(Type::String))
                    .pattern(Some("^[0-9]{3,4}$"))
                    .description(Some("Sent to the gateway, never stored")),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for CardDoc {}

/// `POST /payment/{id}/capture`.
pub(crate) struct CaptureDoc;

impl PartialSchema for CaptureDoc {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property(
                "amount",
                amount(
                    "What to capture, at most what was authorized (default: all of it; the rest is released)",
                    true,
                ),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for CaptureDoc {}

/// `POST /payment/{id}/refunds`.
pub(crate) struct RefundDoc;

impl PartialSchema for RefundDoc {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property(
                "amount",
                amount(
                    "What to refund, at most what is left (default: all that is left)",
                    true,
                ),
            )
            .property(
                "reason",
                ObjectBuilder::new()
                    .schema_type(nullable(Type::String))
                    .min_length(Some(1))
                    .max_length(Some(REASON_MAX)),
            )
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for RefundDoc {}

/// `POST /admin/blocklist`.
pub(crate) struct BlocklistDoc;

impl PartialSchema for BlocklistDoc {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .property("customer_id", id("Who to block"))
            .required("customer_id")
            .property(
                "merchant_id",
                id("This merchant's own entry; without it, network-wide (admin keys only)"),
            )
            .into()
    }
}

impl ToSchema for BlocklistDoc {}

/// `POST /webhook_endpoints`.
pub(crate) struct EndpointDoc;

impl PartialSchema for EndpointDoc {
    fn schema() -> RefOr<Schema> {
        let types = std::iter::once("*")
            .chain(crate::events::TYPES.iter().copied())
            .map(serde_json::Value::from);
        ObjectBuilder::new()
            .property(
                "url",
                string()
                    .format(Some(utoipa::openapi::SchemaFormat::Custom("uri".into())))
                    .pattern(Some(
                        "^https?://[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?){0,4}(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~/-]{0,200})?$",
                    ))
                    .max_length(Some(2048))
                    .description(Some("An absolute http:// or https:// URL"))
                    .examples([json!("https://example.com/hooks")]),
            )
            .required("url")
            .property(
                "enabled_events",
                ArrayBuilder::new()
                    .schema_type(nullable(Type::Array))
                    .items(string().enum_values(Some(types)))
                    .min_items(Some(1))
                    .description(Some("Default [\"*\"]: every event")),
            )
            .property(
                "merchant_id",
                id("Whose events (required unless the key is bound to a merchant)"),
            )
            .required("merchant_id")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for EndpointDoc {}

/// The schema of a query, path or header parameter that several routes share, from the
/// function that checks it.
fn shared_parameter(path: &str, p: &Parameter) -> Option<Schema> {
    let schema: Schema = match (p.name.as_str(), &p.parameter_in) {
        ("merchant_id" | "customer_id", _) => id("1 to 64 of A-Z a-z 0-9 _ -").into(),
        ("Idempotency-Key", ParameterIn::Header) => string()
            .pattern(Some(crate::idempotency::key_pattern()))
            .max_length(Some(crate::idempotency::KEY_MAX))
            .into(),
        ("limit", ParameterIn::Query) => integer(1, PAGE_MAX).into(),
        ("status", ParameterIn::Query) => ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(crate::record::PaymentStatus::ALL.iter().flat_map(
                |s| [s.as_str().to_owned(), s.as_str().to_ascii_lowercase()],
            )))
            .into(),
        ("type", ParameterIn::Query) => string()
            .enum_values(Some(crate::events::TYPES.iter().copied()))
            .into(),
        ("created_gte" | "created_lt", ParameterIn::Query) => OneOfBuilder::new()
            .item(integer(i64::MIN / 1000 + 1, i64::MAX / 1000))
            .item(
                string().format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::DateTime,
                ))),
            )
            .description(Some("Unix seconds or an RFC 3339 time"))
            .into(),
        ("starting_after", ParameterIn::Query) if path.ends_with("/deliveries") => string()
            .pattern(Some("^whd_[0-9]{1,18}$"))
            .description(Some("The last delivery id of the previous page"))
            .into(),
        ("starting_after", ParameterIn::Query) => string()
            .min_length(Some(1))
            .description(Some(
                "The last id of the previous page (404 if there is none such)",
            ))
            .into(),
        _ => return None,
    };
    Some(schema)
}

/// Puts the shared parameters' schemas into every operation of `doc`.
pub(crate) fn complete(doc: &mut OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        for op in tai_core::runtime::openapi::operations_mut(item) {
            let mut paged = false;
            for p in op.parameters.iter_mut().flatten() {
                if let Some(schema) = shared_parameter(path, p) {
                    p.schema = Some(RefOr::T(schema));
                }
                paged |= p.name == "starting_after";
            }
            if paged {
                op.responses
                    .responses
                    .entry("404".to_owned())
                    .or_insert_with(|| {
                        RefOr::T(
                            utoipa::openapi::ResponseBuilder::new()
                                .description("starting_after names nothing of this merchant")
                                .build(),
                        )
                    });
            }
            // a refusal documented with a record (a payment FAILED, FRAUD_BLOCKED...) can also
            // be an error before any record exists: a declined card, an overload, a timeout
            for (_, refusal) in op
                .responses
                .responses
                .iter_mut()
                .filter(|(status, _)| status.parse::<u16>().is_ok_and(|s| s >= 400))
            {
                let RefOr::T(refusal) = refusal else { continue };
                for content in refusal.content.values_mut() {
                    if let Some(record) = content.schema.take() {
                        content.schema = Some(
                            utoipa::openapi::schema::AnyOfBuilder::new()
                                .item(record)
                                .item(utoipa::openapi::Ref::from_schema_name("Error"))
                                .into(),
                        );
                    }
                }
            }
        }
    }
}
