//! The HTTP routes: `POST /payment`, `GET /payment/{id}`, and the blocklist admin routes.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tai_core::runtime::auth::may_act_for;
use tai_core::runtime::{ApiError, ApiJson, ErrorType, Principal, TraceContext};
use tracing::Instrument;

use crate::idempotency::{Claim, key_header};
use crate::record::{PaymentRecord, PaymentStatus};
use crate::{App, PaymentAttempt, keys, signal};

fn respond(status: u16, body: Value, extra: Vec<(HeaderName, HeaderValue)>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (code, Json(body)).into_response();
    for (k, v) in extra {
        r.headers_mut().insert(k, v);
    }
    r
}

/// Create a payment.
#[utoipa::path(post, path = "/payment", tag = "payments",
    request_body(content = crate::docs::PaymentRequestDoc, description = "A payment request"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first answer for the same body; 422 for another body; 409 while in flight")),
    responses(
        (status = 200, description = "SUCCESS: the gateway approved the charge", body = PaymentRecord),
        (status = 202, description = "PROCESSING: sent to the gateway, outcome not known yet (a timeout or a 5xx); GET /payment/{id} shows it once the reconciler settles it. A retry with the same Idempotency-Key resumes this payment.", body = PaymentRecord),
        (status = 400, description = "Invalid request, naming the parameter"),
        (status = 402, description = "FRAUD_BLOCKED, or FAILED with card_declined (a record); or a card declined before anything was stored: incorrect_number, expired_card (an error)", body = PaymentRecord),
        (status = 403, description = "A key bound to another merchant (merchant_forbidden)"),
        (status = 409, description = "Idempotency key in flight"),
        (status = 422, description = "Idempotency key reused with another body"),
        (status = 429, description = "Merchant rate limit, with Retry-After and RateLimit-* headers"),
        (status = 502, description = "FAILED: gateway_error (the gateway was not reached, refused the request, or reports it charged nothing)", body = PaymentRecord),
        (status = 503, description = "FAILED: gateway_unavailable (breaker open), with Retry-After", body = PaymentRecord),
    ))]
pub(crate) async fn create_payment(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    trace: Option<axum::Extension<TraceContext>>,
    principal: Option<axum::Extension<Principal>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let key = key_header(&headers)?;
    let request = tracing::info_span!("signal_received")
        .in_scope(|| signal::parse_declinable(&body, app.clock.wall(), &app.limits))?;
    let (request, declined) = request;
    if !may_act_for(principal.as_deref(), &request.merchant_id) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorType::AuthenticationError,
            "merchant_forbidden",
            "This API key is bound to another merchant; it may only create payments for its own.",
        )
        .with_param("merchant_id"));
    }
    // a card the network would decline: nothing is stored and no key is claimed
    if let Some(declined) = declined {
        tracing::info!(merchant_id = %request.merchant_id, code = %declined.code, "card declined before the gateway");
        return Err(declined);
    }
    let fp = app.fingerprints.fingerprint(&body);
    let mut claim_token = None;
    if let Some(k) = &key {
        match app.ledger.claim(&request.merchant_id, k, &fp).await? {
            Claim::Proceed { token } => claim_token = Some(token),
            Claim::Replay { status, body } => {
                let extra = vec![(
                    HeaderName::from_static("idempotent-replayed"),
                    HeaderValue::from_static("true"),
                )];
                return Ok(respond(status, body, extra));
            }
            Claim::InProgress { transaction_id } => {
                // the first request's charge was sent and is not settled: resume it
                let extra = vec![(
                    HeaderName::from_static("idempotent-replayed"),
                    HeaderValue::from_static("true"),
                )];
                return Ok(match read_record(&app, &transaction_id).await? {
                    // settled since the claim was read: its own answer
                    Some(record) if record.status != PaymentStatus::Processing => {
                        respond(record.http_status, record.answer_body(), extra)
                    }
                    Some(record) => respond(202, record.answer_body(), extra),
                    None => respond(
                        202,
                        json!({"transaction_id": transaction_id, "status": "PROCESSING"}),
                        extra,
                    ),
                });
            }
        }
    }
    let trace = trace.map(|t| t.0).unwrap_or_else(TraceContext::root);
    let trace_id = trace.trace_id.clone();
    let mut attempt = PaymentAttempt::new(request, trace_id, key.clone());
    attempt.fingerprint = key.as_ref().map(|_| fp.clone());
    attempt.claim_token = claim_token;
    let transaction_id = attempt.transaction_id.clone();
    // Run in its own task: a client that hangs up must not cancel a charge half-way.
    let worker = {
        let app = app.clone();
        let span = tracing::Span::current();
        // the calls it makes (the gateway's) carry the request's trace
        tokio::spawn(tai_core::runtime::trace::within(
            trace,
            async move {
                let outcome = app.pipeline.run(&attempt).await;
                let answer = match outcome {
                    Ok(o) => o.output,
                    Err(e) => {
                        // Once the intent is written the charge may have been sent: that
                        // payment stands, PROCESSING until the reconciler settles it, and the
                        // client must not be told "nothing happened, retry".
                        if let Ok(Some(stored)) = app.ledger.get(&attempt.transaction_id).await {
                            tracing::error!(transaction_id = %attempt.transaction_id, error = %e, "payment left PROCESSING for the reconciler");
                            let mut record = stored.record;
                            if record.status == crate::record::PaymentStatus::Processing {
                                record.http_status = 202;
                            }
                            let body = record.answer_body();
                            return Ok((
                                crate::action::Answer {
                                    record,
                                    retry_after: None,
                                },
                                body,
                            ));
                        }
                        // nothing was written: the key is released (only a claim on which no
                        // charge was started can be), and the client may retry
                        if let (Some(k), Some(token)) =
                            (&attempt.idempotency_key, &attempt.claim_token)
                        {
                            let _ = app
                                .ledger
                                .idempotency()
                                .release(&attempt.request.merchant_id, k, token)
                                .await;
                        }
                        return Err(ApiError::unavailable(
                            "store_unavailable",
                            format!("{e}"),
                            Some(Duration::from_secs(1)),
                        ));
                    }
                };
                // the idempotent answer was stored with the payment, in one transaction
                let body = answer.record.answer_body();
                Ok((answer, body))
            }
            .instrument(span),
        ))
    };
    // Answer before the request timeout cuts the connection: a payment still being worked on
    // then is PROCESSING (its task goes on), never a bare timeout a client might read as
    // "nothing happened".
    let (answer, body) = match tokio::time::timeout(app.answer_within, worker).await {
        Ok(joined) => joined.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorType::ApiError,
                "internal_error",
                format!("payment task failed: {e}"),
            )
        })??,
        Err(_) => {
            tracing::warn!(transaction_id = %transaction_id, "payment still in progress at the answer deadline; answered PROCESSING");
            return Ok(respond(
                202,
                json!({
                    "transaction_id": transaction_id,
                    "status": "PROCESSING",
                    "error": {
                        "type": "api_error",
                        "code": "still_processing",
                        "message": format!("The payment is still being processed; read it at GET /payment/{transaction_id}."),
                    },
                }),
                Vec::new(),
            ));
        }
    };
    let mut extra = Vec::new();
    if let Some(after) = answer.retry_after {
        extra.push((
            header::RETRY_AFTER,
            HeaderValue::from(after.as_secs_f64().ceil().max(1.0) as u64),
        ));
    }
    Ok(respond(answer.record.http_status, body, extra))
}

async fn read_record(app: &App, id: &str) -> Result<Option<PaymentRecord>, ApiError> {
    app.ledger
        .get(id)
        .await
        .map(|v| v.map(|v| v.record))
        .map_err(ApiError::from)
}

/// Read a payment.
#[utoipa::path(get, path = "/payment/{transaction_id}", tag = "payments",
    params(("transaction_id" = String, Path, description = "txn_…")),
    responses((status = 200, description = "The stored record, with amount_refunded and its refunds", body = PaymentRecord), (status = 401, description = "Keys are configured and none valid was sent"), (status = 404, description = "Unknown id, or another merchant's payment")))]
pub(crate) async fn get_payment(
    State(app): State<Arc<App>>,
    principal: Option<axum::Extension<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    // another merchant's payment is "no such payment" (not 403), so ids do not leak
    let record = app
        .lifecycle
        .find(&id, |m| may_act_for(principal.as_deref(), m))
        .await?
        .record;
    let mut body = crate::routes::with_refunds(&app, &record).await?;
    if let Value::Object(m) = &mut body {
        m.insert("confirmed".into(), json!(record.confirmed_at.is_some()));
    }
    Ok(Json(body))
}

/// The admin routes: an admin key acts for any merchant, a bound key for its own only.
fn authorize_admin(
    app: &App,
    principal: Option<&Principal>,
    merchant: Option<&str>,
) -> Result<(), ApiError> {
    if !app.keys_configured {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorType::AuthenticationError,
            "admin_disabled",
            "Admin routes need API keys: start the service with TAI_API_KEYS (or Vault) set.",
        ));
    }
    match (principal.and_then(|p| p.merchant.as_deref()), merchant) {
        (None, _) => Ok(()),
        (Some(own), Some(m)) if own == m => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorType::AuthenticationError,
            "merchant_forbidden",
            "This API key is bound to a merchant: name it as merchant_id; only an admin key edits the network-wide list.",
        )),
    }
}

/// The blocklist entry for `customer`: the merchant's own, or network-wide when no merchant is
/// named or the rules make every entry network-wide.
fn blocklist_entry(app: &App, merchant: Option<&str>, customer: &str) -> (String, &'static str) {
    match merchant {
        Some(m) if !app.network_blocklist => (keys::merchant_blocklist(m, customer), "merchant"),
        _ => (keys::blocklist(customer), "network"),
    }
}

pub(crate) fn merchant_param(v: Option<&str>) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(m) => {
            if crate::signal::is_id(m) {
                Ok(Some(m.to_owned()))
            } else {
                Err(ApiError::invalid(
                    "parameter_invalid",
                    "merchant_id",
                    "Invalid merchant_id: 1 to 64 characters of A-Z a-z 0-9 _ -.",
                ))
            }
        }
    }
}

/// `?merchant_id=` on the blocklist routes.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct MerchantQuery {
    merchant_id: Option<String>,
}

pub(crate) fn customer_param(id: &str) -> Result<String, ApiError> {
    if crate::signal::is_id(id) {
        Ok(id.to_owned())
    } else {
        Err(ApiError::invalid(
            "parameter_invalid",
            "customer_id",
            "Invalid customer_id: 1 to 64 characters of A-Z a-z 0-9 _ -.",
        ))
    }
}

/// Add a customer to the blocklist.
#[utoipa::path(post, path = "/admin/blocklist", tag = "admin",
    request_body(content = inline(crate::docs::BlocklistDoc), description = "Who to block, and for which merchant"),
    responses((status = 201, description = "Added"), (status = 400, description = "Invalid customer_id or merchant_id"), (status = 401, description = "No valid key"), (status = 403, description = "No keys configured, or a key bound to another merchant")))]
pub(crate) async fn add_blocklist(
    State(app): State<Arc<App>>,
    principal: Option<axum::Extension<Principal>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let merchant = match body.get("merchant_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => merchant_param(Some(m))?,
        Some(_) => merchant_param(Some(""))?,
    };
    authorize_admin(&app, principal.as_deref(), merchant.as_deref())?;
    let id = match body.get("customer_id") {
        Some(Value::String(s)) => customer_param(s)?,
        _ => {
            return Err(ApiError::invalid(
                "parameter_missing",
                "customer_id",
                "Missing required parameter: customer_id.",
            ));
        }
    };
    let (entry, scope) = blocklist_entry(&app, merchant.as_deref(), &id);
    app.store
        .put(&entry, b"1".to_vec(), None)
        .await
        .map_err(ApiError::from)?;
    tracing::warn!(customer_id = %id, merchant_id = merchant.as_deref().unwrap_or("-"), scope, "customer added to the blocklist");
    Ok((
        StatusCode::CREATED,
        Json(json!({"customer_id": id, "merchant_id": merchant, "scope": scope, "blocklisted": true})),
    )
        .into_response())
}

/// Remove a customer from the blocklist.
#[utoipa::path(delete, path = "/admin/blocklist/{customer_id}", tag = "admin",
    params(("customer_id" = String, Path), ("merchant_id" = Option<String>, Query, description = "The merchant's own entry; without it, the network-wide one")),
    responses((status = 200, description = "Removed"), (status = 401, description = "No valid key"), (status = 403, description = "No keys configured, or a key bound to another merchant"), (status = 404, description = "Not on the blocklist")))]
pub(crate) async fn remove_blocklist(
    State(app): State<Arc<App>>,
    principal: Option<axum::Extension<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<MerchantQuery>,
) -> Result<Json<Value>, ApiError> {
    let merchant = merchant_param(q.merchant_id.as_deref())?;
    authorize_admin(&app, principal.as_deref(), merchant.as_deref())?;
    let id = customer_param(&id)?;
    let (entry, _) = blocklist_entry(&app, merchant.as_deref(), &id);
    let existed = app.store.delete(&entry).await.map_err(ApiError::from)?;
    if !existed {
        return Err(
            ApiError::not_found(format!("{id} is not on the blocklist")).with_param("customer_id")
        );
    }
    tracing::warn!(customer_id = %id, "customer removed from the blocklist");
    Ok(Json(json!({"customer_id": id, "blocklisted": false})))
}

/// List the blocklist.
#[utoipa::path(get, path = "/admin/blocklist", tag = "admin",
    params(("merchant_id" = Option<String>, Query, description = "Also list this merchant's own entries")),
    responses((status = 200, description = "Blocklisted customers: network-wide, and the merchant's own"), (status = 401, description = "No valid key"), (status = 403, description = "No keys configured, or a key bound to another merchant")))]
pub(crate) async fn list_blocklist(
    State(app): State<Arc<App>>,
    principal: Option<axum::Extension<Principal>>,
    Query(q): Query<MerchantQuery>,
) -> Result<Json<Value>, ApiError> {
    let merchant = merchant_param(q.merchant_id.as_deref())?;
    authorize_admin(&app, principal.as_deref(), merchant.as_deref())?;
    let unavailable = |e: tai_core::backend::BackendError| {
        ApiError::unavailable("store_unavailable", e.to_string(), None)
    };
    let prefix = keys::blocklist("");
    let ids: Vec<String> = app
        .store
        .keys(&prefix)
        .await
        .map_err(unavailable)?
        .into_iter()
        .map(|k| k[prefix.len()..].to_owned())
        .collect();
    let own: Vec<String> = match &merchant {
        Some(m) => {
            let prefix = keys::merchant_blocklist(m, "");
            app.store
                .keys(&prefix)
                .await
                .map_err(unavailable)?
                .into_iter()
                .map(|k| k[prefix.len()..].to_owned())
                .collect()
        }
        None => Vec::new(),
    };
    Ok(Json(
        json!({"customers": ids, "merchant_id": merchant, "merchant_customers": own}),
    ))
}
