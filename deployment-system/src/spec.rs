//! The shapes a deployment request is made of: stages, the analysis spec with Argo Rollouts'
//! measurement limits, the failure policy, and the defaults for what a request leaves out.

use serde::{Deserialize, Serialize};

/// One step of a progressive rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// `canary`, `staging`, `prod`, or the caller's own names.
    pub name: String,
    /// Share of traffic on the new version, 1..=100; the last stage is 100.
    pub weight: u8,
    /// How long the stage bakes while analysis runs, in seconds (fractions allowed).
    pub bake_secs: f64,
}

/// Where health figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The simulated fleet's own health.
    Sim,
    /// HTTP probes of per-region health URLs.
    Http,
    /// PromQL queries against Prometheus.
    Prometheus,
    /// The platform's own traffic figures: HAProxy's per-version counters on `proc`, the
    /// simulated health on `sim`.
    Platform,
}

/// What a gate does once measurements have been inconclusive more than `inconclusive_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInconclusive {
    /// Fail the stage and roll the region back (the default).
    Rollback,
    /// Pause the deployment for a person to decide.
    Pause,
}

/// PromQL overriding the configured queries for one deployment (`{service}`, `{version}` and
/// `{region}` are filled in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queries {
    /// The error rate, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<String>,
    /// The p99 latency in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<String>,
    /// The number of requests the measurement covers (compared with `min_samples`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<String>,
}

impl Queries {
    /// Each query given, with its parameter name.
    pub fn given(&self) -> Vec<(&'static str, &str)> {
        [
            ("error_rate", self.error_rate.as_deref()),
            ("p99_ms", self.p99_ms.as_deref()),
            ("requests", self.requests.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

fn default_consecutive_error_limit() -> u32 {
    4
}
fn default_inconclusive_limit() -> u32 {
    6
}
fn default_min_samples() -> u64 {
    50
}
fn default_on_inconclusive() -> OnInconclusive {
    OnInconclusive::Rollback
}

/// The health gates, with Argo Rollouts' measurement limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisSpec {
    /// Fail when the error rate is above this (0..=1).
    pub max_error_rate: f64,
    /// Fail when p99 latency is above this many milliseconds.
    pub max_p99_ms: f64,
    /// Seconds between measurements (fractions allowed).
    pub interval_secs: f64,
    /// Where the figures come from.
    pub provider: Provider,
    /// Kept for the default of `inconclusive_limit`: as many measurements as fit in it.
    pub max_inconclusive_secs: f64,
    /// Failed measurements a stage tolerates (0: the first one fails the stage).
    #[serde(default)]
    pub failure_limit: u32,
    /// Measurement errors in a row a stage tolerates (the next one fails it).
    #[serde(default = "default_consecutive_error_limit")]
    pub consecutive_error_limit: u32,
    /// Inconclusive measurements a stage tolerates before `on_inconclusive`.
    #[serde(default = "default_inconclusive_limit")]
    pub inconclusive_limit: u32,
    /// Requests a traffic-derived measurement needs to count (not for probes).
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// What happens past `inconclusive_limit`.
    #[serde(default = "default_on_inconclusive")]
    pub on_inconclusive: OnInconclusive,
    /// PromQL overriding the configured queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queries: Option<Queries>,
}

impl AnalysisSpec {
    /// The default `inconclusive_limit`: as many measurements as fit in `max_inconclusive_secs`.
    pub fn derived_inconclusive_limit(&self) -> u32 {
        (self.max_inconclusive_secs / self.interval_secs)
            .floor()
            .clamp(0.0, 100_000.0) as u32
    }
}

/// What to do when a region fails its gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRegionFailure {
    /// Stop; roll the failing region back (the default).
    Halt,
    /// Roll the failing region back and go on with the next.
    Continue,
    /// Roll back every region this deployment touched.
    RollbackAll,
}

/// Defaults for what a request leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    /// Regions when none are given.
    pub regions: Vec<String>,
    /// The image registry's host, for `<registry>/<service>:<version>`.
    pub registry: String,
    /// The stages.
    pub stages: Vec<StageSpec>,
    /// The gates.
    pub analysis: AnalysisSpec,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            regions: vec!["us-west-2".into()],
            registry: "registry.local".into(),
            // 3 x 15 s: a full rollout takes about 45 s
            stages: vec![
                StageSpec {
                    name: "canary".into(),
                    weight: 5,
                    bake_secs: 15.0,
                },
                StageSpec {
                    name: "staging".into(),
                    weight: 25,
                    bake_secs: 15.0,
                },
                StageSpec {
                    name: "prod".into(),
                    weight: 100,
                    bake_secs: 15.0,
                },
            ],
            analysis: AnalysisSpec {
                max_error_rate: 0.05,
                max_p99_ms: 1000.0,
                interval_secs: 5.0,
                provider: Provider::Sim,
                max_inconclusive_secs: 30.0,
                failure_limit: 0,
                consecutive_error_limit: 4,
                inconclusive_limit: 6,
                min_samples: 50,
                on_inconclusive: OnInconclusive::Rollback,
                queries: None,
            },
        }
    }
}
