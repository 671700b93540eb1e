//! Health analysis providers: where a gate's figures come from.
//!
//! A provider measures the new version of a service in a region and says what it saw: figures
//! (an error rate, a p99 latency, and for traffic-derived metrics how many requests they cover),
//! a measurement error (the provider could not be reached, a probe answered non-2xx or not at
//! all), or a configuration error (a query Prometheus refuses). Judging the figures is the gate
//! policy's job ([`crate::rollout::gate`]), never the provider's.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tai_core::backend::BoxFuture;

use crate::fleet::SimFleet;
use crate::signal::Queries;

/// What one measurement saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Measurement {
    /// Figures; a missing one is "no data".
    Figures(Figures),
    /// The provider could not measure (unreachable, timed out).
    Error(String),
    /// A probe reached its target and got a non-2xx answer: a measurement error for the gate
    /// (Argo's web metric), but the provider itself worked (its breaker counts a success).
    BadAnswer(String),
    /// The provider can never measure this as configured (a refused query, no provider).
    Misconfigured(String),
}

/// The figures of one measurement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Share of failed requests, if measured.
    pub error_rate: Option<f64>,
    /// p99 latency in ms, if measured.
    pub p99_ms: Option<f64>,
    /// Requests the figures cover, for traffic-derived metrics (`None` for probes).
    pub samples: Option<u64>,
}

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The service.
    pub service: String,
    /// The version under test.
    pub version: String,
    /// The region.
    pub region: String,
    /// Per-deployment PromQL, if any.
    pub queries: Option<Queries>,
    /// The span a traffic-derived measurement covers: the analysis interval.
    pub window: Duration,
}

/// A source of health figures.
pub trait AnalysisProvider: Send + Sync + std::fmt::Debug {
    /// `sim`, `http` or `prometheus`.
    fn name(&self) -> &'static str;
    /// Measures `target`.
    fn measure<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Measurement>;
}

/// The simulated fleet's health.
#[derive(Debug, Clone)]
pub struct SimAnalysis {
    fleet: SimFleet,
}

impl SimAnalysis {
    /// Health from `fleet`.
    pub fn new(fleet: SimFleet) -> Self {
        Self { fleet }
    }
}

impl AnalysisProvider for SimAnalysis {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn measure<'a>(&'a self, t: &'a Target) -> BoxFuture<'a, Measurement> {
        let m = match self.fleet.health(&t.service, &t.version, &t.region) {
            Some(h) => Measurement::Figures(Figures {
                error_rate: Some(h.error_rate),
                p99_ms: Some(h.p99_ms),
                samples: None,
            }),
            None => Measurement::Misconfigured(format!(
                "the simulated fleet has no health data for {}",
                t.service
            )),
        };
        Box::pin(std::future::ready(m))
    }
}

/// An HTTP client whose every request gives up after `timeout`.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())
}

fn fill(template: &str, t: &Target) -> String {
    template
        .replace("{service}", &t.service)
        .replace("{version}", &t.version)
        .replace("{region}", &t.region)
}

/// HTTP probes of a per-region health URL (`{service}`, `{version}`, `{region}` are filled in):
/// a 2xx answer is healthy with its response time as latency; any other answer, or none, is a
/// measurement error (Argo Rollouts' web metric counts them against `consecutiveErrorLimit`).
#[derive(Debug, Clone)]
pub struct HttpProbe {
    template: String,
    client: reqwest::Client,
}

impl HttpProbe {
    /// Probes URLs made from `template`, each with `timeout`.
    pub fn new(template: &str, timeout: Duration) -> Result<Self, String> {
        let client = http_client(timeout)?;
        Ok(Self {
            template: template.to_owned(),
            client,
        })
    }
}

impl AnalysisProvider for HttpProbe {
    fn name(&self) -> &'static str {
        "http"
    }
    fn measure<'a>(&'a self, t: &'a Target) -> BoxFuture<'a, Measurement> {
        Box::pin(async move {
            let url = fill(&self.template, t);
            let started = Instant::now();
            match self
                .client
                .get(&url)
                .header("traceparent", tai_core::runtime::trace::outbound())
                .send()
                .await
            {
                Err(e) => Measurement::Error(format!("probe of {url} got no answer: {e}")),
                Ok(r) if !r.status().is_success() => Measurement::BadAnswer(format!(
                    "probe of {url} answered {}",
                    r.status().as_u16()
                )),
                Ok(_) => Measurement::Figures(Figures {
                    error_rate: Some(0.0),
                    p99_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
                    samples: None,
                }),
            }
        })
    }
}

/// PromQL queries against Prometheus, templated with `{service}`, `{version}` and `{region}`:
/// the error rate, the p99 latency in milliseconds, and the number of requests they cover.
#[derive(Debug, Clone)]
pub struct PrometheusAnalysis {
    base: String,
    error_rate_query: String,
    p99_ms_query: String,
    requests_query: String,
    client: reqwest::Client,
}

/// The default error-rate query: 5xx over all requests in the last minute. The numerator falls
/// back to 0 when no 5xx series exists, so a version without errors measures 0, not "no data";
/// without any request the denominator is empty and the result is "no data".
pub const DEFAULT_ERROR_RATE_QUERY: &str = r#"(sum(rate(http_requests_total{service="{service}",version="{version}",region="{region}",status=~"5.."}[1m])) or vector(0)) / sum(rate(http_requests_total{service="{service}",version="{version}",region="{region}"}[1m]))"#;
/// The default p99 query, in seconds (`PROMQL_P99_SECONDS`; multiplied by 1000).
pub const DEFAULT_P99_QUERY: &str = r#"histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{service="{service}",version="{version}",region="{region}"}[1m])))"#;
/// The default request-count query: requests in the last minute.
pub const DEFAULT_REQUESTS_QUERY: &str = r#"sum(increase(http_requests_total{service="{service}",version="{version}",region="{region}"}[1m]))"#;

/// A query's answer.
enum Answer {
    Value(f64),
    Empty,
}

impl PrometheusAnalysis {
    /// Queries Prometheus at `base` (e.g. `http://127.0.0.1:9090`); `p99_seconds_query` answers
    /// in seconds.
    pub fn new(
        base: &str,
        error_rate_query: &str,
        p99_seconds_query: &str,
        requests_query: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = http_client(timeout)?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            error_rate_query: error_rate_query.to_owned(),
            p99_ms_query: format!("({p99_seconds_query}) * 1000"),
            requests_query: requests_query.to_owned(),
            client,
        })
    }

    /// Runs `query`: `Err(Ok(why))` is a measurement error, `Err(Err(why))` a refused query.
    async fn scalar(&self, query: &str) -> Result<Answer, Result<String, String>> {
        let r = self
            .client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", query)])
            .header("traceparent", tai_core::runtime::trace::outbound())
            .send()
            .await
            .map_err(|e| Ok(format!("Prometheus did not answer: {e}")))?;
        let body: serde_json::Value = r
            .json()
            .await
            .map_err(|e| Ok(format!("Prometheus answered unreadably: {e}")))?;
        if body["status"] != "success" {
            let why = format!(
                "Prometheus refused {query}: {}",
                body["error"].as_str().unwrap_or("unknown error")
            );
            return Err(if body["errorType"] == "bad_data" {
                Err(why)
            } else {
                Ok(why)
            });
        }
        let Some(value) = body["data"]["result"][0]["value"][1].as_str() else {
            return Ok(Answer::Empty);
        };
        match value.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(Answer::Value(v)),
            _ => Ok(Answer::Empty),
        }
    }

    fn queries<'a>(&'a self, t: &'a Target) -> [String; 3] {
        let q = t.queries.as_ref();
        [
            fill(
                q.and_then(|q| q.error_rate.as_deref())
                    .unwrap_or(&self.error_rate_query),
                t,
            ),
            fill(
                q.and_then(|q| q.p99_ms.as_deref())
                    .unwrap_or(&self.p99_ms_query),
                t,
            ),
            fill(
                q.and_then(|q| q.requests.as_deref())
                    .unwrap_or(&self.requests_query),
                t,
            ),
        ]
    }

    /// Checks a deployment's queries at admission: `Err((param, why))` names the first query
    /// Prometheus refuses as malformed. An unreachable Prometheus is not the request's fault and
    /// passes (measurements will count it as errors).
    pub async fn validate(&self, t: &Target) -> Result<(), (String, String)> {
        let Some(queries) = &t.queries else {
            return Ok(());
        };
        for (name, q) in queries.given() {
            if let Err(Err(why)) = self.scalar(&fill(q, t)).await {
                return Err((format!("analysis[queries][{name}]"), why));
            }
        }
        Ok(())
    }
}

impl AnalysisProvider for PrometheusAnalysis {
    fn name(&self) -> &'static str {
        "prometheus"
    }
    fn measure<'a>(&'a self, t: &'a Target) -> BoxFuture<'a, Measurement> {
        Box::pin(async move {
            let [e, p, n] = self.queries(t);
            let (e, p, n) = tokio::join!(self.scalar(&e), self.scalar(&p), self.scalar(&n));
            let mut figures = Figures::default();
            for (answer, slot) in [(e, 0), (p, 1), (n, 2)] {
                let v = match answer {
                    Ok(Answer::Value(v)) => Some(v),
                    Ok(Answer::Empty) => None,
                    Err(Ok(why)) => return Measurement::Error(why),
                    Err(Err(why)) => return Measurement::Misconfigured(why),
                };
                match slot {
                    0 => figures.error_rate = v,
                    1 => figures.p99_ms = v,
                    // no series at all: no request was counted
                    _ => figures.samples = Some(v.map(|v| v.max(0.0).round() as u64).unwrap_or(0)),
                }
            }
            Measurement::Figures(figures)
        })
    }
}
