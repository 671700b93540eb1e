//! Health analysis providers: where a gate's figures come from.
//!
//! A provider measures the new version of a service in a region and returns an error rate and a
//! p99 latency, or says it cannot tell (inconclusive): a provider that cannot answer must not
//! roll a healthy release back, so the controller holds the stage for a bounded time instead.

use std::time::{Duration, Instant};

use tai_core::backend::BoxFuture;

use crate::fleet::{HealthSample, SimFleet};

/// A source of health figures.
pub trait AnalysisProvider: Send + Sync + std::fmt::Debug {
    /// `sim`, `http` or `prometheus`.
    fn name(&self) -> &'static str;
    /// Measures `version` of `service` in `region`; `Err` is inconclusive, with why.
    fn measure<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        region: &'a str,
    ) -> BoxFuture<'a, Result<HealthSample, String>>;
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
    fn measure<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        region: &'a str,
    ) -> BoxFuture<'a, Result<HealthSample, String>> {
        let sample = self
            .fleet
            .health(service, version, region)
            .ok_or_else(|| format!("the simulated fleet has no health data for {service}"));
        Box::pin(std::future::ready(sample))
    }
}

/// An HTTP client whose every request gives up after `timeout`.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())
}

fn fill(template: &str, service: &str, version: &str, region: &str) -> String {
    template
        .replace("{service}", service)
        .replace("{version}", version)
        .replace("{region}", region)
}

/// HTTP probes of a per-region health URL (`{service}`, `{version}`, `{region}` are filled in):
/// a 2xx answer is healthy with its response time as latency, any other status is a failure,
/// no answer is inconclusive.
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
    fn measure<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        region: &'a str,
    ) -> BoxFuture<'a, Result<HealthSample, String>> {
        Box::pin(async move {
            let url = fill(&self.template, service, version, region);
            let started = Instant::now();
            let r = self
                .client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("probe of {url} got no answer: {e}"))?;
            let p99_ms = started.elapsed().as_secs_f64() * 1000.0;
            let error_rate = if r.status().is_success() { 0.0 } else { 1.0 };
            Ok(HealthSample { error_rate, p99_ms })
        })
    }
}

/// PromQL queries against Prometheus: one for the error rate, one for p99 latency in seconds,
/// each templated with `{service}`, `{version}` and `{region}`. An empty result is inconclusive.
#[derive(Debug, Clone)]
pub struct PrometheusAnalysis {
    base: String,
    error_rate_query: String,
    p99_seconds_query: String,
    client: reqwest::Client,
}

/// The default error-rate query.
pub const DEFAULT_ERROR_RATE_QUERY: &str = r#"sum(rate(http_requests_total{service="{service}",version="{version}",region="{region}",status=~"5.."}[1m])) / sum(rate(http_requests_total{service="{service}",version="{version}",region="{region}"}[1m]))"#;
/// The default p99 query (seconds).
pub const DEFAULT_P99_QUERY: &str = r#"histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{service="{service}",version="{version}",region="{region}"}[1m])))"#;

impl PrometheusAnalysis {
    /// Queries Prometheus at `base` (e.g. `http://127.0.0.1:9090`).
    pub fn new(
        base: &str,
        error_rate_query: &str,
        p99_seconds_query: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = http_client(timeout)?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            error_rate_query: error_rate_query.to_owned(),
            p99_seconds_query: p99_seconds_query.to_owned(),
            client,
        })
    }

    async fn scalar(&self, query: &str) -> Result<f64, String> {
        let r = self
            .client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", query)])
            .send()
            .await
            .map_err(|e| format!("Prometheus did not answer: {e}"))?;
        let body: serde_json::Value = r
            .json()
            .await
            .map_err(|e| format!("Prometheus answered unreadably: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "Prometheus refused the query: {}",
                body["error"].as_str().unwrap_or("unknown error")
            ));
        }
        let value = body["data"]["result"][0]["value"][1]
            .as_str()
            .ok_or_else(|| format!("no data for {query}"))?;
        let v: f64 = value
            .parse()
            .map_err(|_| format!("not a number: {value}"))?;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(format!("no usable value ({value}) for {query}"))
        }
    }
}

impl AnalysisProvider for PrometheusAnalysis {
    fn name(&self) -> &'static str {
        "prometheus"
    }
    fn measure<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        region: &'a str,
    ) -> BoxFuture<'a, Result<HealthSample, String>> {
        Box::pin(async move {
            let error_rate = self
                .scalar(&fill(&self.error_rate_query, service, version, region))
                .await?;
            let p99 = self
                .scalar(&fill(&self.p99_seconds_query, service, version, region))
                .await?;
            Ok(HealthSample {
                error_rate,
                p99_ms: p99 * 1000.0,
            })
        })
    }
}
