//! Logs and traces.
//!
//! Logs go to stderr through `tracing` (pretty or JSON, filtered by `RUST_LOG`). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, every span is also exported over OTLP/HTTP (protobuf)
//! to that collector (Jaeger, Tempo, an OpenTelemetry Collector), so a request's spans, from
//! the edge through the policy to the gateway call, form one trace under the trace id the
//! response carries.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::config::{LogFormat, RuntimeConfig};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The OTLP/HTTP traces URL for a collector base address.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

fn provider(service: &str, endpoint: &str) -> Result<SdkTracerProvider, String> {
    let url = traces_url(endpoint);
    let service = service.to_owned();
    // The exporter's blocking HTTP client must be made (and later dropped) outside the async
    // runtime; the batch processor exports from its own thread.
    std::thread::spawn(move || {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .map_err(|e| e.to_string())?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    })
    .join()
    .map_err(|_| "the exporter set-up thread panicked".to_owned())?
}

/// Starts logging (and trace export when configured). A second call does nothing.
pub fn init_tracing(config: &RuntimeConfig) {
    let filter = config
        .setting("RUST_LOG")
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut export_error = None;
    let otel = match &config.otlp_endpoint {
        Some(endpoint) => match provider(&config.service, endpoint) {
            Ok(p) => {
                let tracer = p.tracer(config.service.clone());
                let _ = PROVIDER.set(p);
                Some(tracing_opentelemetry::layer().with_tracer(tracer))
            }
            Err(e) => {
                export_error = Some(e);
                None
            }
        },
        None => None,
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok()
        && let Some(e) = export_error
    {
        tracing::error!(error = %e, "trace export is off: the OTLP exporter could not be set up");
    }
}

/// Exports what is buffered and stops the exporter (at shutdown).
pub fn shutdown_tracing() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        // shutting down blocks on the last export: keep it off the async runtime
        let _ = std::thread::spawn(move || p.shutdown()).join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://jaeger:4318"),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://jaeger:4318/"),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
