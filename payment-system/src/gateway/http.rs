//! A client of an HTTP gateway speaking the sandbox's form (`POST /v1/charges`).

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use tai_core::backend::BoxFuture;

use super::{ChargeOutcome, ChargeRequest, Gateway, GatewayError, Reversal};

/// An HTTP gateway at a base URL, with a per-call timeout.
#[derive(Debug, Clone)]
pub struct HttpGateway {
    base: String,
    timeout: Duration,
    client: reqwest::Client,
}

impl HttpGateway {
    /// A client of the gateway at `base` (e.g. `http://127.0.0.1:3901`).
    pub fn new(base: &str, timeout: Duration) -> Result<Self, GatewayError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .build()
            .map_err(|e| GatewayError::Unreachable(e.to_string()))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            timeout,
            client,
        })
    }

    /// Answers whether the gateway's `/health` responds (for `/ready`).
    pub async fn ping(&self) -> Result<(), GatewayError> {
        let r = self
            .client
            .get(format!("{}/health", self.base))
            .header("traceparent", tai_core::runtime::trace::outbound())
            .send()
            .await
            .map_err(|e| self.map_err(e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(GatewayError::Server {
                status: r.status().as_u16(),
                message: "health check failed".into(),
            })
        }
    }

    /// `{base}/v1/charges/{key}/{action}`, the key as one path segment.
    fn charge_url(&self, key: &str, action: Option<&str>) -> Result<reqwest::Url, GatewayError> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/charges", self.base))
            .map_err(|e| GatewayError::Protocol(e.to_string()))?;
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|_| GatewayError::Protocol("gateway URL cannot take a path".into()))?;
            segments.push(key);
            if let Some(a) = action {
                segments.push(a);
            }
        }
        Ok(url)
    }

    /// POSTs `body` and reads the answer: 2xx is the body; a 4xx the gateway refused (nothing
    /// moved); anything else is an unknown outcome.
    async fn money_call(
        &self,
        url: reqwest::Url,
        key: Option<&str>,
        body: Value,
    ) -> Result<Value, GatewayError> {
        let mut req = self.client.post(url).json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let response = req
            .header("traceparent", tai_core::runtime::trace::outbound())
            .send()
            .await
            .map_err(|e| self.map_err(e))?;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.map_err(|e| self.map_err(e))?;
        let said = || answer["error"].as_str().unwrap_or("refused").to_owned();
        match status {
            200..=299 => Ok(answer),
            // refusals that say the request was not carried out; a 408, 425 or 429 says
            // nothing of the kind, so it is an unknown outcome like a 5xx
            400 | 401 | 403 | 404 | 409 | 422 => Err(GatewayError::Rejected {
                status,
                message: said(),
            }),
            s if s >= 400 => Err(GatewayError::Server {
                status: s,
                message: said(),
            }),
            s => Err(GatewayError::Protocol(format!("unexpected status {s}"))),
        }
    }

    fn map_err(&self, e: reqwest::Error) -> GatewayError {
        if e.is_timeout() {
            GatewayError::Timeout(u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX))
        } else if e.is_connect() {
            GatewayError::Unreachable(e.to_string())
        } else {
            GatewayError::Protocol(e.to_string())
        }
    }
}

impl Gateway for HttpGateway {
    fn kind(&self) -> &'static str {
        "http"
    }
    fn lookup<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<ChargeOutcome>, GatewayError>> {
        Box::pin(async move {
            let mut url = reqwest::Url::parse(&format!("{}/v1/charges", self.base))
                .map_err(|e| GatewayError::Protocol(e.to_string()))?;
            url.path_segments_mut()
                .map_err(|_| GatewayError::Protocol("gateway URL cannot take a path".into()))?
                .push(idempotency_key);
            let response = self
                .client
                .get(url)
                .header("traceparent", tai_core::runtime::trace::outbound())
                .send()
                .await
                .map_err(|e| self.map_err(e))?;
            let status = response.status().as_u16();
            if status == 404 {
                return Ok(None);
            }
            let answer: Value = response.json().await.map_err(|e| self.map_err(e))?;
            match (status, answer["status"].as_str()) {
                (200, Some("approved")) => answer["id"]
                    .as_str()
                    .map(|id| {
                        Some(ChargeOutcome::Approved {
                            gateway_id: id.to_owned(),
                        })
                    })
                    .ok_or_else(|| GatewayError::Protocol("approved charge without an id".into())),
                (200, Some("authorized")) => answer["id"]
                    .as_str()
                    .map(|id| {
                        Some(ChargeOutcome::Authorized {
                            gateway_id: id.to_owned(),
                        })
                    })
                    .ok_or_else(|| {
                        GatewayError::Protocol("authorized charge without an id".into())
                    }),
                (200, Some("declined")) => Ok(Some(ChargeOutcome::Declined)),
                (200, Some("failed")) => Ok(Some(ChargeOutcome::NotCharged)),
                (200, Some("reversed")) => Ok(Some(ChargeOutcome::Reversed {
                    gateway_id: answer["id"].as_str().unwrap_or("").to_owned(),
                })),
                (s, _) if s >= 500 => Err(GatewayError::Server {
                    status: s,
                    message: "lookup failed".into(),
                }),
                (s, _) => Err(GatewayError::Protocol(format!(
                    "unexpected lookup answer {s}"
                ))),
            }
        })
    }
    fn tokenize<'a>(
        &'a self,
        card: &'a crate::card::Card,
    ) -> BoxFuture<'a, Result<String, GatewayError>> {
        Box::pin(async move {
            let url = reqwest::Url::parse(&format!("{}/v1/tokens", self.base))
                .map_err(|e| GatewayError::Protocol(e.to_string()))?;
            let answer = self
                .money_call(
                    url,
                    None,
                    json!({"card": {"number": card.number.expose(), "exp_month": card.exp_month, "exp_year": card.exp_year}}),
                )
                .await?;
            answer["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| GatewayError::Protocol("token without an id".into()))
        })
    }
    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        amount: Decimal,
    ) -> BoxFuture<'a, Result<(), GatewayError>> {
        Box::pin(async move {
            let url = self.charge_url(idempotency_key, Some("capture"))?;
            self.money_call(url, None, json!({"amount": amount.to_string()}))
                .await
                .map(|_| ())
        })
    }
    fn void<'a>(&'a self, idempotency_key: &'a str) -> BoxFuture<'a, Result<(), GatewayError>> {
        Box::pin(async move {
            let url = self.charge_url(idempotency_key, Some("void"))?;
            self.money_call(url, None, json!({})).await.map(|_| ())
        })
    }
    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        refund_key: &'a str,
        amount: Decimal,
    ) -> BoxFuture<'a, Result<String, GatewayError>> {
        Box::pin(async move {
            let url = self.charge_url(idempotency_key, Some("refunds"))?;
            let answer = self
                .money_call(url, Some(refund_key), json!({"amount": amount.to_string()}))
                .await?;
            answer["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| GatewayError::Protocol("refund without an id".into()))
        })
    }
    fn reverse<'a>(
        &'a self,
        idempotency_key: &'a str,
    ) -> BoxFuture<'a, Result<Reversal, GatewayError>> {
        Box::pin(async move {
            let mut url = reqwest::Url::parse(&format!("{}/v1/charges", self.base))
                .map_err(|e| GatewayError::Protocol(e.to_string()))?;
            url.path_segments_mut()
                .map_err(|_| GatewayError::Protocol("gateway URL cannot take a path".into()))?
                .push(idempotency_key)
                .push("reverse");
            let response = self
                .client
                .post(url)
                .header("traceparent", tai_core::runtime::trace::outbound())
                .send()
                .await
                .map_err(|e| self.map_err(e))?;
            let status = response.status().as_u16();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            match (status, answer["status"].as_str()) {
                (200, Some("reversed")) => Ok(Reversal::Reversed),
                (200, _) => Ok(Reversal::NothingCharged),
                (404, _) => Ok(Reversal::Unknown),
                (s, _) => Err(GatewayError::Server {
                    status: s,
                    message: "reversal refused".into(),
                }),
            }
        })
    }
    fn charge<'a>(
        &'a self,
        request: &'a ChargeRequest,
    ) -> BoxFuture<'a, Result<ChargeOutcome, GatewayError>> {
        Box::pin(async move {
            let mut body = json!({
                // a string, so the amount crosses the wire exactly
                "amount": request.amount.to_string(),
                "currency": request.currency,
                "reference": request.reference,
                "capture": request.capture,
            });
            if let Some(token) = &request.card_token {
                body["card"] = json!({"token": token});
            } else if let Some(card) = &request.card {
                let mut c = json!({"number": card.number.expose(), "exp_month": card.exp_month, "exp_year": card.exp_year});
                if let Some(cvc) = &card.cvc {
                    c["cvc"] = json!(cvc.expose());
                }
                body["card"] = c;
            }
            let response = self
                .client
                .post(format!("{}/v1/charges", self.base))
                .header("Idempotency-Key", &request.idempotency_key)
                .json(&body)
                .header("traceparent", tai_core::runtime::trace::outbound())
                .send()
                .await
                .map_err(|e| self.map_err(e))?;
            let status = response.status().as_u16();
            let answer: Value = response.json().await.map_err(|e| self.map_err(e))?;
            match status {
                200 => match (answer["id"].as_str(), answer["status"].as_str()) {
                    (Some(id), Some("authorized")) => Ok(ChargeOutcome::Authorized {
                        gateway_id: id.to_owned(),
                    }),
                    (Some(id), _) => Ok(ChargeOutcome::Approved {
                        gateway_id: id.to_owned(),
                    }),
                    (None, _) => Err(GatewayError::Protocol(
                        "approved charge without an id".into(),
                    )),
                },
                402 => Ok(ChargeOutcome::Declined),
                s @ (400 | 401 | 403 | 404 | 422) => Err(GatewayError::Rejected {
                    status: s,
                    message: answer["error"]
                        .as_str()
                        .unwrap_or("request refused")
                        .to_owned(),
                }),
                s if s >= 500 => Err(GatewayError::Server {
                    status: s,
                    message: answer["error"]
                        .as_str()
                        .unwrap_or("server error")
                        .to_owned(),
                }),
                s => Err(GatewayError::Protocol(format!("unexpected status {s}"))),
            }
        })
    }
}
