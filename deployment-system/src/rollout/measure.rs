//! Measurements, off the controller's loop: each runs in its own task, behind a Jidoka breaker
//! per provider and a timeout, and reports back on a channel. A slow or dead provider delays only
//! the rollouts it measures; the loop and the operator's commands never wait for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tai_core::clock::SharedClock;
use tai_core::jidoka::{BreakerConfig, CircuitBreaker, Outcome};
use tokio::sync::mpsc;

use crate::analysis::{AnalysisProvider, Measurement, Target};
use crate::signal::Provider;

/// One measurement to take.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The lease term (fencing token) it was started under.
    pub term: u64,
    /// The deployment.
    pub deployment_id: String,
    /// Its region being measured (index).
    pub region_idx: usize,
    /// Its stage being measured (index).
    pub stage_idx: usize,
    /// Where the figures come from.
    pub provider: Provider,
    /// What to measure.
    pub target: Target,
}

/// A measurement taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// What was asked.
    pub job: Job,
    /// The provider's name.
    pub provider: &'static str,
    /// What it saw.
    pub measurement: Measurement,
}

/// A provider and its breaker.
type Guarded = (Arc<dyn AnalysisProvider>, CircuitBreaker);

/// Runs measurements.
#[derive(Debug, Clone)]
pub struct Measurer {
    providers: Arc<HashMap<Provider, Guarded>>,
    timeout: Duration,
    tx: mpsc::Sender<Done>,
}

impl Measurer {
    /// Measures with `providers`, each call given up after `timeout`; results come out of the
    /// returned receiver.
    pub fn new(
        providers: HashMap<Provider, Arc<dyn AnalysisProvider>>,
        timeout: Duration,
        clock: SharedClock,
    ) -> (Self, mpsc::Receiver<Done>) {
        let config = BreakerConfig {
            consecutive_failures: 5,
            slow_call: None,
            open_for: Duration::from_secs(10),
            ..BreakerConfig::default()
        };
        let providers = providers
            .into_iter()
            .map(|(k, p)| {
                let breaker = CircuitBreaker::new(
                    format!("analysis_{}", p.name()),
                    config.clone(),
                    clock.clone(),
                );
                (k, (p, breaker))
            })
            .collect();
        let (tx, rx) = mpsc::channel(1024);
        (
            Self {
                providers: Arc::new(providers),
                timeout,
                tx,
            },
            rx,
        )
    }

    /// The breakers, one per provider (for `/status`).
    pub fn breakers(&self) -> Vec<CircuitBreaker> {
        self.providers.values().map(|(_, b)| b.clone()).collect()
    }

    /// Starts `job` in its own task; its result is always reported, a panic included.
    pub fn spawn(&self, job: Job) {
        let me = self.clone();
        tokio::spawn(async move {
            let inner = {
                let (me, job) = (me.clone(), job.clone());
                tokio::spawn(async move { me.measure(&job).await })
            };
            let (provider, measurement) = inner.await.unwrap_or_else(|e| {
                (
                    "none",
                    Measurement::Error(format!("the measurement failed: {e}")),
                )
            });
            let _ = me
                .tx
                .send(Done {
                    job,
                    provider,
                    measurement,
                })
                .await;
        });
    }

    async fn measure(&self, job: &Job) -> (&'static str, Measurement) {
        let Some((provider, breaker)) = self.providers.get(&job.provider) else {
            return (
                "none",
                Measurement::Misconfigured(format!(
                    "analysis provider {:?} is not configured on this service",
                    job.provider
                )),
            );
        };
        let name = provider.name();
        let call = async {
            match tokio::time::timeout(self.timeout, provider.measure(&job.target)).await {
                Ok(m) => Ok(m),
                Err(_) => Err(format!(
                    "{name} gave no answer within {} ms",
                    self.timeout.as_millis()
                )),
            }
        };
        let result = breaker
            .call(call, |r| match r {
                Ok(Measurement::Error(_)) | Err(_) => Outcome::Failure,
                Ok(_) => Outcome::Success,
            })
            .await;
        let m = match result {
            Ok(Ok(m)) => m,
            Ok(Err(why)) => Measurement::Error(why),
            Err(rejected) => Measurement::Error(format!(
                "{name} is failing; its breaker refuses calls for {} ms",
                rejected.retry_after.as_millis()
            )),
        };
        (name, m)
    }
}
