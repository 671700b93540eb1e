//! Kaizen: measure everything, so improvement has numbers to start from.
//!
//! [`Kaizen`] owns the Prometheus registry a service exposes on `/metrics`, the RED metrics every
//! route gets (`http_requests_total{route,method,status}`, `http_request_duration_seconds{route,method}`),
//! the pipeline's per-step histograms and verdict counters, the Kanban depth gauges, and a
//! [`RollingWindow`] over recent requests from which Andon reads rates and percentiles. Services
//! register their own metrics in [`Kaizen::registry`].

mod window;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

pub use window::{RollingWindow, WindowStats};

use crate::clock::SharedClock;

/// Latency buckets (seconds) fit for request handling: 1 ms to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metrics of one service; clones share them.
#[derive(Debug, Clone)]
pub struct Kaizen {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service: String,
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    step_duration: HistogramVec,
    verdicts: IntCounterVec,
    queue_depth: IntGaugeVec,
    http_window: RollingWindow,
}

impl Kaizen {
    /// A fresh registry with the common metrics for `service`; the rolling window covers 60 s.
    pub fn new(service: &str, clock: SharedClock) -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        );
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route and method",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method"],
        );
        let step_duration = HistogramVec::new(
            HistogramOpts::new(
                "tai_pipeline_step_duration_seconds",
                "Time spent in each Signal -> Policy -> Action step",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["pipeline", "step"],
        );
        let verdicts = IntCounterVec::new(
            Opts::new("tai_policy_verdicts_total", "Policy verdicts by decision"),
            &["pipeline", "decision"],
        );
        let queue_depth = IntGaugeVec::new(
            Opts::new("kanban_queue_depth", "Items in a Kanban queue by state"),
            &["queue", "state"],
        );
        // Names and label sets are constants, so construction and registration cannot fail
        // except through a programming error caught by the tests below.
        let (http_requests, http_duration, step_duration, verdicts, queue_depth) = match (
            http_requests,
            http_duration,
            step_duration,
            verdicts,
            queue_depth,
        ) {
            (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
            _ => unreachable!("constant metric definitions are valid"),
        };
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(step_duration.clone()),
            Box::new(verdicts.clone()),
            Box::new(queue_depth.clone()),
        ] {
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "registering a common metric failed");
            }
        }
        // process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        // (the prometheus crate reads them from /proc: Linux only)
        #[cfg(target_os = "linux")]
        if let Err(e) = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::error!(error = %e, "registering the process collector failed");
        }
        Self {
            inner: Arc::new(Inner {
                service: service.to_owned(),
                registry,
                http_requests,
                http_duration,
                step_duration,
                verdicts,
                queue_depth,
                http_window: RollingWindow::new(Duration::from_secs(60), 12, clock),
            }),
        }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The registry served on `/metrics`; register service metrics here.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Registers a counter named `name`.
    ///
    /// # Panics
    /// If `name` or `help` is not a valid Prometheus definition (empty help, a name outside
    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`): a programming error that the first test building the
    /// metrics shows. A name registered twice is logged, not fatal.
    pub fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.define(IntCounter::new(name, help), name)
    }

    /// Registers a counter family with one `label`, each of `values` exported at 0 from the
    /// start so that a dashboard shows 0 rather than no data. Panics as [`Kaizen::counter`].
    pub fn counter_vec(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> IntCounterVec {
        let family = self.counter_family(name, help, &[label]);
        for value in values {
            family.with_label_values(&[*value]);
        }
        family
    }

    /// Registers a counter family with several `labels`. Panics as [`Kaizen::counter`].
    pub fn counter_family(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.define(IntCounterVec::new(Opts::new(name, help), labels), name)
    }

    /// Registers a gauge. Panics as [`Kaizen::counter`].
    pub fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.define(IntGauge::new(name, help), name)
    }

    /// Registers a histogram with `buckets` (seconds, ascending). Panics as [`Kaizen::counter`].
    pub fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        self.define(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())),
            name,
        )
    }

    /// Registers a histogram family with one `label`. Panics as [`Kaizen::counter`].
    pub fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        label: &str,
    ) -> HistogramVec {
        self.define(
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &[label],
            ),
            name,
        )
    }

    fn define<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        made: prometheus::Result<M>,
        name: &str,
    ) -> M {
        match made {
            Ok(metric) => register(&self.inner.registry, metric),
            Err(e) => panic!("metric {name} is not a valid definition: {e}"),
        }
    }

    /// Records one HTTP request (RED metrics and the rolling window).
    pub fn record_http(&self, route: &str, method: &str, status: u16, latency: Duration) {
        let status_s = status.to_string();
        self.inner
            .http_requests
            .with_label_values(&[route, method, status_s.as_str()])
            .inc();
        self.inner
            .http_duration
            .with_label_values(&[route, method])
            .observe(latency.as_secs_f64());
        // 5xx is the service's fault; 4xx is the caller's and is not an error rate signal
        self.inner.http_window.record(latency, status >= 500);
    }

    /// Records how long a pipeline step took.
    pub fn record_step(&self, pipeline: &str, step: &str, took: Duration) {
        self.inner
            .step_duration
            .with_label_values(&[pipeline, step])
            .observe(took.as_secs_f64());
    }

    /// Counts a verdict.
    pub fn record_verdict(&self, pipeline: &str, decision: &str) {
        self.count_verdicts(pipeline, decision, 1);
    }

    /// Adds `n` verdicts (0 creates the series, exported at zero).
    pub fn count_verdicts(&self, pipeline: &str, decision: &str, n: u64) {
        self.inner
            .verdicts
            .with_label_values(&[pipeline, decision])
            .inc_by(n);
    }

    /// The gauge family Kanban queues report their depth through.
    pub fn queue_depth(&self) -> &IntGaugeVec {
        &self.inner.queue_depth
    }

    /// Recent HTTP traffic: rate, error rate, percentiles.
    pub fn http_window(&self) -> &RollingWindow {
        &self.inner.http_window
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        encode(&self.inner.registry)
    }
}

/// Encodes a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Registers a metric in `registry`, logging (not failing) on a duplicate name: metrics must
/// never take a service down.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "registering a metric failed");
    }
    metric
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn red_metrics_carry_route_method_status() {
        let kaizen = Kaizen::new("svc", ManualClock::new().shared());
        kaizen.record_http("/payment", "POST", 200, Duration::from_millis(3));
        kaizen.record_http("/payment", "POST", 503, Duration::from_millis(4));
        let text = kaizen.encode();
        assert!(
            text.contains(r#"http_requests_total{method="POST",route="/payment",status="200"} 1"#)
        );
        assert!(
            text.contains(
                r#"http_request_duration_seconds_count{method="POST",route="/payment"} 2"#
            )
        );
        let stats = kaizen.http_window().stats();
        assert_eq!((stats.count, stats.errors), (2, 1));
    }

    #[test]
    fn service_metrics_are_registered_and_known_labels_start_at_zero() {
        let kaizen = Kaizen::new("svc", ManualClock::new().shared());
        let outcomes = kaizen.counter_vec(
            "svc_outcomes_total",
            "Outcomes",
            "outcome",
            &["ok", "failed"],
        );
        kaizen.counter("svc_things_total", "Things").inc_by(3);
        kaizen.gauge("svc_backlog", "Backlog").set(7);
        kaizen
            .histogram("svc_seconds", "Time", LATENCY_BUCKETS)
            .observe(0.002);
        kaizen
            .histogram_vec("svc_stage_seconds", "Stages", &[1.0], "stage")
            .with_label_values(&["bake"])
            .observe(0.5);
        outcomes.with_label_values(&["ok"]).inc();
        let text = kaizen.encode();
        for line in [
            r#"svc_outcomes_total{outcome="ok"} 1"#,
            r#"svc_outcomes_total{outcome="failed"} 0"#,
            "svc_things_total 3",
            "svc_backlog 7",
            "svc_seconds_count 1",
            r#"svc_stage_seconds_bucket{stage="bake",le="1"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // a second registration of a name is logged, and the first keeps counting
        kaizen.counter("svc_things_total", "Things again").inc();
        assert!(kaizen.encode().contains("svc_things_total 3"));
    }
}
