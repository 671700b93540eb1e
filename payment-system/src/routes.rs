//! The lifecycle routes: capture, void, refunds, review, listing, events and webhook endpoints.
//!
//! Every route acts for one merchant: a key bound to a merchant sees and changes its own
//! payments only (another merchant's payment is "no such payment"), an admin key any; with no
//! keys configured (the embedded default) the service is open, as `POST /payment` is.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tai_core::runtime::auth::may_act_for;
use tai_core::runtime::{ApiError, ErrorType, Principal};

use crate::App;
use crate::ledger::ListQuery;
use crate::lifecycle::shown;
use crate::money::{AmountError, Currency, parse_amount};
use crate::record::PaymentStatus;
use crate::refunds::NewRefund;

type Caller = Option<axum::Extension<Principal>>;

fn respond(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(body)).into_response()
}

/// A body that may be empty (`{}` then), with only the `known` fields.
fn optional_body(bytes: &[u8], known: &[&str]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let body: Map<String, Value> = tai_core::runtime::error::parse_json(bytes)?;
    tai_core::runtime::error::refuse_unknown(&body, known)?;
    Ok(body)
}

/// The optional `amount` of a capture or refund, exact, in the payment's currency.
fn amount_field(body: &Map<String, Value>, currency: &str) -> Result<Option<Decimal>, ApiError> {
    let text = match body.get("amount") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "parameter_invalid",
                "amount",
                "Invalid amount: expected a number or a string.",
            ));
        }
    };
    let currency = Currency::parse(currency).ok_or_else(|| {
        ApiError::invalid(
            "invalid_currency",
            "amount",
            "The payment's currency is unknown.",
        )
    })?;
    parse_amount(&text, currency, Decimal::MAX)
        .map(Some)
        .map_err(|e| {
            let code = match e {
                AmountError::NotANumber(_) => "amount_invalid",
                AmountError::NotPositive(_) => "amount_too_small",
                AmountError::TooPrecise { .. } => "amount_invalid_precision",
                AmountError::TooLarge { .. } => "amount_too_large",
            };
            ApiError::invalid(code, "amount", format!("{e}."))
        })
}

/// The merchant a listing is for: a bound key's own (naming another is a 403); for an admin
/// key or an open service, the one named.
fn scope(caller: Option<&Principal>, asked: Option<&str>) -> Result<Option<String>, ApiError> {
    let asked = crate::api::merchant_param(asked)?;
    match (caller.and_then(|p| p.merchant.clone()), asked) {
        (Some(own), None) => Ok(Some(own)),
        (Some(own), Some(a)) if a == own => Ok(Some(own)),
        (Some(_), Some(_)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorType::AuthenticationError,
            "merchant_forbidden",
            "This API key is bound to another merchant.",
        )
        .with_param("merchant_id")),
        (None, a) => Ok(a),
    }
}

fn required(merchant: Option<String>) -> Result<String, ApiError> {
    merchant.ok_or_else(|| {
        ApiError::invalid(
            "parameter_missing",
            "merchant_id",
            "Missing required parameter: merchant_id (a key bound to a merchant names it itself).",
        )
    })
}

fn limit_param(v: Option<&str>, default: i64, max: i64) -> Result<i64, ApiError> {
    match v {
        None => Ok(default),
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "parameter_invalid",
                    "limit",
                    format!("limit must be a whole number from 1 to {max}."),
                )
            }),
    }
}

fn time_param(name: &str, v: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(t) = v else { return Ok(None) };
    if let Ok(secs) = t.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .map(Some)
            .ok_or_else(|| ApiError::invalid("parameter_invalid", name, "Out of range."));
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| Some(d.with_timezone(&Utc).timestamp_millis()))
        .map_err(|_| {
            ApiError::invalid(
                "parameter_invalid",
                name,
                format!("{name} must be unix seconds or an RFC 3339 time."),
            )
        })
}

async fn payment_for(
    app: &App,
    caller: Option<&Principal>,
    id: &str,
) -> Result<crate::ledger::Versioned, ApiError> {
    app.lifecycle.find(id, |m| may_act_for(caller, m)).await
}

/// Capture an authorization.
#[utoipa::path(post, path = "/payment/{transaction_id}/capture", tag = "payments",
    params(("transaction_id" = String, Path, description = "txn_…")),
    request_body(content = inline(crate::docs::CaptureDoc), description = "Optional: without amount, all that was authorized is captured"),
    responses(
        (status = 200, description = "SUCCESS, with amount_captured", body = crate::record::PaymentRecord),
        (status = 202, description = "Sent to the gateway, answer not known yet: the capture is finished by the reconciler"),
        (status = 400, description = "Invalid amount, or more than was authorized"),
        (status = 404, description = "No such payment (or another merchant's)"),
        (status = 409, description = "Not AUTHORIZED (captured already, voided, expired), or a capture or void under way"),
        (status = 502, description = "The gateway refused the capture; nothing changed"),
    ))]
pub(crate) async fn capture(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = optional_body(&body, &["amount"])?;
    let payment = payment_for(&app, caller.as_deref(), &id).await?;
    let amount = amount_field(&body, &payment.record.currency)?;
    let (status, body) = app.lifecycle.capture(payment, amount).await?;
    Ok(respond(status, body))
}

/// Void an authorization.
#[utoipa::path(post, path = "/payment/{transaction_id}/void", tag = "payments",
    params(("transaction_id" = String, Path, description = "txn_…")),
    responses(
        (status = 200, description = "VOIDED: the authorization is released", body = crate::record::PaymentRecord),
        (status = 202, description = "Sent to the gateway, answer not known yet"),
        (status = 404, description = "No such payment"),
        (status = 409, description = "Not AUTHORIZED, or a capture or void under way"),
        (status = 502, description = "The gateway refused the void"),
    ))]
pub(crate) async fn void(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body(&body, &[])?;
    let payment = payment_for(&app, caller.as_deref(), &id).await?;
    let (status, body) = app.lifecycle.void(payment, "requested").await?;
    Ok(respond(status, body))
}

/// Refund a payment.
#[utoipa::path(post, path = "/payment/{transaction_id}/refunds", tag = "refunds",
    params(
        ("transaction_id" = String, Path, description = "txn_…"),
        ("Idempotency-Key" = Option<String>, Header, description = "Replays the refund made with this key; 422 for another body"),
    ),
    request_body(content = inline(crate::docs::RefundDoc), description = "Optional: without amount, all that is left is refunded"),
    responses(
        (status = 200, description = "SUCCEEDED", body = crate::refunds::Refund),
        (status = 202, description = "PENDING: the gateway's answer is not known yet; it is asked again until it is", body = crate::refunds::Refund),
        (status = 400, description = "Invalid amount or reason"),
        (status = 404, description = "No such payment"),
        (status = 409, description = "Not a SUCCESS payment"),
        (status = 422, description = "More than is left to refund, or an Idempotency-Key reused with another body"),
        (status = 502, description = "FAILED: the gateway refused it; nothing was refunded", body = crate::refunds::Refund),
    ))]
pub(crate) async fn refund(
    State(app): State<Arc<App>>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let fields = optional_body(&body, &["amount", "reason"])?;
    let key = crate::idempotency::key_header(&headers)?;
    let reason = match fields.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if (1..=200).contains(&r.chars().count()) => Some(r.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "parameter_invalid",
                "reason",
                "reason is text of 1 to 200 characters.",
            ));
        }
    };
    let payment = payment_for(&app, caller.as_deref(), &id).await?;
    let amount = amount_field(&fields, &payment.record.currency)?;
    let fingerprint = key.as_ref().map(|_| {
        app.fingerprints
            .fingerprint(&json!({"refund_of": id, "body": Value::Object(fields.clone())}))
    });
    let (status, refund, replayed) = app
        .lifecycle
        .refund(
            payment,
            NewRefund {
                transaction_id: &id,
                amount,
                reason: reason.as_deref(),
                idempotency_key: key.as_deref(),
                fingerprint: fingerprint.as_deref(),
            },
        )
        .await?;
    let mut r = respond(status, serde_json::to_value(&refund).unwrap_or(Value::Null));
    if replayed {
        r.headers_mut().insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
    }
    Ok(r)
}

/// Approve a payment held for review.
#[utoipa::path(post, path = "/payment/{transaction_id}/approve", tag = "reviews",
    params(("transaction_id" = String, Path, description = "txn_…")),
    responses(
        (status = 200, description = "Charged: SUCCESS (or AUTHORIZED for capture: false)", body = crate::record::PaymentRecord),
        (status = 202, description = "Sent to the gateway, outcome not known yet (PROCESSING)"),
        (status = 402, description = "The card was declined"),
        (status = 404, description = "No such payment"),
        (status = 409, description = "Not in REQUIRES_REVIEW (decided already, or meanwhile)"),
        (status = 502, description = "FAILED: the gateway refused or could not be reached", body = crate::record::PaymentRecord),
        (status = 503, description = "Gateway breaker open; the payment stays in review"),
    ))]
pub(crate) async fn approve(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let payment = payment_for(&app, caller.as_deref(), &id).await?;
    let (status, body) = app.lifecycle.approve(payment).await?;
    Ok(respond(status, body))
}

/// Reject a payment held for review.
#[utoipa::path(post, path = "/payment/{transaction_id}/reject", tag = "reviews",
    params(("transaction_id" = String, Path, description = "txn_…")),
    responses(
        (status = 402, description = "FRAUD_BLOCKED (review_rejected): never charged", body = crate::record::PaymentRecord),
        (status = 404, description = "No such payment"),
        (status = 409, description = "Not in REQUIRES_REVIEW"),
    ))]
pub(crate) async fn reject(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let payment = payment_for(&app, caller.as_deref(), &id).await?;
    let (status, body) = app.lifecycle.reject(payment, "rejected").await?;
    Ok(respond(status, body))
}

/// `GET /payments` and `GET /reviews` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    merchant_id: Option<String>,
    status: Option<String>,
    customer_id: Option<String>,
    created_gte: Option<String>,
    created_lt: Option<String>,
    limit: Option<String>,
    starting_after: Option<String>,
}

fn page(data: Vec<Value>, more: bool, id_field: &str) -> Value {
    let last = data
        .last()
        .and_then(|d| d[id_field].as_str())
        .map(str::to_owned);
    json!({"object": "list", "data": data, "has_more": more, "next_starting_after": if more { last } else { None }})
}

/// List payments.
#[utoipa::path(get, path = "/payments", tag = "payments",
    params(
        ("merchant_id" = String, Query, description = "Whose payments (a key bound to a merchant may leave it out)"),
        ("status" = Option<String>, Query, description = "SUCCESS, AUTHORIZED, ..."),
        ("customer_id" = Option<String>, Query),
        ("created_gte" = Option<String>, Query, description = "Unix seconds or RFC 3339"),
        ("created_lt" = Option<String>, Query, description = "Unix seconds or RFC 3339"),
        ("limit" = Option<i64>, Query, description = "1 to 100, default 10"),
        ("starting_after" = Option<String>, Query, description = "The last transaction_id of the previous page"),
    ),
    responses(
        (status = 200, description = r#"{"object": "list", "data": [payments in creation order], "has_more", "next_starting_after"}"#),
        (status = 400, description = "An invalid parameter, named"),
        (status = 403, description = "A key bound to another merchant"),
    ))]
pub(crate) async fn list_payments(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let merchant = required(scope(caller.as_deref(), q.merchant_id.as_deref())?)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            PaymentStatus::parse(&s.to_ascii_uppercase()).ok_or_else(|| {
                ApiError::invalid(
                    "parameter_invalid",
                    "status",
                    "Unknown status; one of SUCCESS, FAILED, FRAUD_BLOCKED, PROCESSING, REVERSED, AUTHORIZED, VOIDED, REQUIRES_REVIEW.",
                )
            })?,
        ),
    };
    let customer_id = match q.customer_id.as_deref() {
        None => None,
        Some(c) => Some(crate::api::customer_param(c)?),
    };
    let query = ListQuery {
        merchant_id: merchant.clone(),
        status,
        customer_id,
        created_gte: time_param("created_gte", q.created_gte.as_deref())?,
        created_lt: time_param("created_lt", q.created_lt.as_deref())?,
        limit: limit_param(q.limit.as_deref(), 10, 100)?,
    };
    let after = cursor(&app, Some(&merchant), q.starting_after.as_deref()).await?;
    let (records, more) = app
        .ledger
        .list(&query, after)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(page(
        records.iter().map(|r| r.public()).collect(),
        more,
        "transaction_id",
    )))
}

async fn cursor(
    app: &App,
    merchant: Option<&str>,
    after: Option<&str>,
) -> Result<Option<(i64, String)>, ApiError> {
    let Some(id) = after else { return Ok(None) };
    app.ledger
        .cursor(merchant, id)
        .await
        .map_err(ApiError::from)?
        .map(Some)
        .ok_or_else(|| {
            ApiError::not_found("starting_after names no payment of this merchant.")
                .with_param("starting_after")
        })
}

/// List payments held for review.
#[utoipa::path(get, path = "/reviews", tag = "reviews",
    params(
        ("merchant_id" = Option<String>, Query, description = "Only this merchant's (a bound key: its own)"),
        ("limit" = Option<i64>, Query, description = "1 to 100, default 10"),
        ("starting_after" = Option<String>, Query),
    ),
    responses((status = 200, description = "Payments in REQUIRES_REVIEW, oldest first"), (status = 400, description = "An invalid parameter"), (status = 403, description = "A key bound to another merchant")))]
pub(crate) async fn list_reviews(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let merchant = scope(caller.as_deref(), q.merchant_id.as_deref())?;
    let limit = limit_param(q.limit.as_deref(), 10, 100)?;
    let after = cursor(&app, merchant.as_deref(), q.starting_after.as_deref()).await?;
    let (records, more) = app
        .ledger
        .reviews(merchant.as_deref(), after, limit)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(page(
        records.iter().map(|r| r.public()).collect(),
        more,
        "transaction_id",
    )))
}

/// `GET /events` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct EventParams {
    merchant_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    object_id: Option<String>,
    limit: Option<String>,
    starting_after: Option<String>,
}

/// List events.
#[utoipa::path(get, path = "/events", tag = "events",
    params(
        ("merchant_id" = String, Query, description = "Whose events (a key bound to a merchant may leave it out)"),
        ("type" = Option<String>, Query, description = "e.g. payment.captured"),
        ("object_id" = Option<String>, Query, description = "Only those of this payment or refund"),
        ("limit" = Option<i64>, Query, description = "1 to 100, default 10"),
        ("starting_after" = Option<String>, Query, description = "The last event id of the previous page"),
    ),
    responses((status = 200, description = "Events in the order they happened"), (status = 400, description = "An invalid parameter"), (status = 403, description = "A key bound to another merchant")))]
pub(crate) async fn list_events(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<EventParams>,
) -> Result<Json<Value>, ApiError> {
    let merchant = required(scope(caller.as_deref(), q.merchant_id.as_deref())?)?;
    if let Some(k) = &q.kind
        && !crate::events::TYPES.contains(&k.as_str())
    {
        return Err(ApiError::invalid(
            "parameter_invalid",
            "type",
            format!(
                "Unknown event type; one of {}.",
                crate::events::TYPES.join(", ")
            ),
        ));
    }
    let limit = limit_param(q.limit.as_deref(), 10, 100)?;
    let listed = crate::events::list(
        app.ledger.database(),
        &merchant,
        q.kind.as_deref(),
        q.object_id.as_deref(),
        q.starting_after.as_deref(),
        limit,
    )
    .await
    .map_err(ApiError::from)?
    .ok_or_else(|| {
        ApiError::not_found("starting_after names no event of this merchant.")
            .with_param("starting_after")
    })?;
    Ok(Json(page(listed.0, listed.1, "id")))
}

/// Register a webhook endpoint.
#[utoipa::path(post, path = "/webhook_endpoints", tag = "webhooks",
    request_body(content = inline(crate::docs::EndpointDoc), description = "The endpoint to register"),
    responses(
        (status = 201, description = "The endpoint, with its signing secret (shown this once)", body = crate::webhooks::Endpoint),
        (status = 400, description = "Invalid url or event type"),
        (status = 403, description = "A key bound to another merchant"),
    ))]
pub(crate) async fn create_endpoint(
    State(app): State<Arc<App>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body = optional_body(&body, &["url", "enabled_events", "merchant_id"])?;
    let asked = match body.get("merchant_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.as_str()),
        Some(_) => Some(""),
    };
    let merchant = required(scope(caller.as_deref(), asked)?)?;
    let url = match body.get("url") {
        Some(Value::String(u)) => u.clone(),
        _ => {
            return Err(ApiError::invalid(
                "parameter_missing",
                "url",
                "Missing required parameter: url.",
            ));
        }
    };
    let parsed = reqwest::Url::parse(&url).ok().filter(|u| {
        matches!(u.scheme(), "http" | "https") && u.host().is_some() && url.len() <= 2048
    });
    if parsed.is_none() {
        return Err(ApiError::invalid(
            "url_invalid",
            "url",
            "url must be an absolute http:// or https:// URL of at most 2048 characters.",
        ));
    }
    let types: Vec<String> = match body.get("enabled_events") {
        None | Some(Value::Null) => vec!["*".into()],
        Some(Value::Array(list)) if !list.is_empty() => {
            let mut types = Vec::new();
            for t in list {
                match t.as_str() {
                    Some(name) if name == "*" || crate::events::TYPES.contains(&name) => {
                        types.push(name.to_owned())
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            "parameter_invalid",
                            "enabled_events",
                            format!(
                                "Unknown event type {t}; one of *, {}.",
                                crate::events::TYPES.join(", ")
                            ),
                        ));
                    }
                }
            }
            types
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "parameter_invalid",
                "enabled_events",
                "enabled_events is a non-empty list of event types.",
            ));
        }
    };
    let (endpoint, secret) = app
        .webhooks
        .create(&merchant, &url, &types)
        .await
        .map_err(ApiError::from)?;
    tracing::info!(endpoint_id = %endpoint.id, merchant_id = %merchant, "webhook endpoint registered");
    let mut shown = serde_json::to_value(&endpoint).unwrap_or(Value::Null);
    shown["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

async fn endpoint_for(
    app: &App,
    caller: Option<&Principal>,
    id: &str,
) -> Result<crate::webhooks::Endpoint, ApiError> {
    app.webhooks
        .get(id)
        .await
        .map_err(ApiError::from)?
        .filter(|e| may_act_for(caller, &e.merchant_id))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "No such webhook endpoint: {}",
                id.chars().take(64).collect::<String>()
            ))
        })
}

/// `GET /webhook_endpoints` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct EndpointParams {
    merchant_id: Option<String>,
}

/// List webhook endpoints.
#[utoipa::path(get, path = "/webhook_endpoints", tag = "webhooks",
    params(("merchant_id" = Option<String>, Query, description = "Whose (a bound key: its own)")),
    responses((status = 200, description = "Endpoints, without their secrets"), (status = 403, description = "A key bound to another merchant")))]
pub(crate) async fn list_endpoints(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(q): Query<EndpointParams>,
) -> Result<Json<Value>, ApiError> {
    let merchant = scope(caller.as_deref(), q.merchant_id.as_deref())?;
    let list = app
        .webhooks
        .list(merchant.as_deref())
        .await
        .map_err(ApiError::from)?;
    Ok(Json(
        json!({"object": "list", "data": list, "has_more": false}),
    ))
}

/// Read a webhook endpoint.
#[utoipa::path(get, path = "/webhook_endpoints/{endpoint_id}", tag = "webhooks",
    params(("endpoint_id" = String, Path)),
    responses((status = 200, description = "The endpoint (status, disabled_reason, failing_since)", body = crate::webhooks::Endpoint), (status = 404, description = "No such endpoint")))]
pub(crate) async fn get_endpoint(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<crate::webhooks::Endpoint>, ApiError> {
    endpoint_for(&app, caller.as_deref(), &id).await.map(Json)
}

/// Delete a webhook endpoint.
#[utoipa::path(delete, path = "/webhook_endpoints/{endpoint_id}", tag = "webhooks",
    params(("endpoint_id" = String, Path)),
    responses((status = 200, description = "Deleted, with its deliveries"), (status = 404, description = "No such endpoint")))]
pub(crate) async fn delete_endpoint(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let endpoint = endpoint_for(&app, caller.as_deref(), &id).await?;
    app.webhooks
        .delete(&endpoint.id)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(json!({"id": endpoint.id, "deleted": true})))
}

/// Enable a disabled webhook endpoint again.
#[utoipa::path(post, path = "/webhook_endpoints/{endpoint_id}/enable", tag = "webhooks",
    params(("endpoint_id" = String, Path)),
    responses((status = 200, description = "Enabled; pending deliveries resume", body = crate::webhooks::Endpoint), (status = 404, description = "No such endpoint")))]
pub(crate) async fn enable_endpoint(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<crate::webhooks::Endpoint>, ApiError> {
    let endpoint = endpoint_for(&app, caller.as_deref(), &id).await?;
    app.webhooks
        .enable(&endpoint.id)
        .await
        .map_err(ApiError::from)?;
    endpoint_for(&app, caller.as_deref(), &id).await.map(Json)
}

/// `GET /webhook_endpoints/{id}/deliveries` parameters.
#[derive(Debug, Deserialize)]
pub(crate) struct DeliveryParams {
    limit: Option<String>,
    starting_after: Option<String>,
}

/// List an endpoint's deliveries, each with its attempts.
#[utoipa::path(get, path = "/webhook_endpoints/{endpoint_id}/deliveries", tag = "webhooks",
    params(
        ("endpoint_id" = String, Path),
        ("limit" = Option<i64>, Query, description = "1 to 100, default 50"),
        ("starting_after" = Option<String>, Query, description = "The last delivery id (whd_…) of the previous page"),
    ),
    responses((status = 200, description = "Deliveries oldest first: event, status (pending, succeeded, failed), attempts with their time, HTTP status and error"), (status = 404, description = "No such endpoint")))]
pub(crate) async fn list_deliveries(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DeliveryParams>,
) -> Result<Json<Value>, ApiError> {
    let endpoint = endpoint_for(&app, caller.as_deref(), &id).await?;
    let limit = limit_param(q.limit.as_deref(), 50, 100)?;
    let after = match q.starting_after.as_deref() {
        None => 0,
        Some(t) => t
            .strip_prefix("whd_")
            .and_then(|n| n.parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::invalid(
                    "parameter_invalid",
                    "starting_after",
                    "starting_after is a delivery id (whd_…).",
                )
            })?,
    };
    let (data, more) = app
        .webhooks
        .deliveries(&endpoint.id, after, limit)
        .await
        .map_err(ApiError::from)?;
    Ok(Json(page(data, more, "id")))
}

/// The payment as `GET /payment/{id}` shows it: with what was refunded and each refund.
pub(crate) async fn with_refunds(
    app: &App,
    record: &crate::record::PaymentRecord,
) -> Result<Value, ApiError> {
    let mut body = shown(record);
    let refunds = crate::refunds::for_payment(&app.ledger, &record.transaction_id)
        .await
        .map_err(ApiError::from)?;
    let refunded: Decimal = refunds
        .iter()
        .filter(|r| r.status == crate::refunds::RefundStatus::Succeeded)
        .map(|r| r.amount)
        .sum();
    if let Value::Object(m) = &mut body {
        m.insert(
            "amount_refunded".into(),
            rust_decimal::serde::arbitrary_precision::serialize(
                &refunded,
                serde_json::value::Serializer,
            )
            .unwrap_or(Value::Null),
        );
        m.insert(
            "refunds".into(),
            serde_json::to_value(&refunds).unwrap_or(Value::Null),
        );
    }
    Ok(body)
}
