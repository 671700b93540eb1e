//! A small HTTP service for the `proc` platform's demo and tests: one instance of one version.
//!
//! `GET /health` answers 200. Any other request answers `{"version", "region", "pid"}` with an
//! `X-Version` header, so a client can count which version served it. With `ERROR_RATE` (0 to
//! 1), that share of requests answers 500 instead, exactly (every n-th), in every region or
//! only in `FAIL_REGIONS` (comma-separated). `LATENCY_MS` delays every answer. It stops on
//! SIGINT or SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Parser;

/// One instance of the demo service.
#[derive(Debug, Parser)]
#[command(name = "demo-service", version)]
struct Args {
    /// The port to listen on (127.0.0.1).
    #[arg(long, env = "PORT")]
    port: u16,
    /// The version it reports (the application's, not this binary's: that is `--version`).
    #[arg(long, env = "APP_VERSION", default_value = "v0")]
    app_version: String,
    /// The region it reports.
    #[arg(long, env = "REGION", default_value = "local")]
    region: String,
    /// Share of requests answered with a 500.
    #[arg(long, env = "ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// Regions where `error_rate` applies (all when empty).
    #[arg(long, env = "FAIL_REGIONS", default_value = "")]
    fail_regions: String,
    /// Delay before every answer, in ms.
    #[arg(long, env = "LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// A label for finding the process (tests put their folder here); not used otherwise.
    #[arg(long, default_value = "")]
    tag: String,
}

struct App {
    version: String,
    region: String,
    error_rate: f64,
    latency: Duration,
    served: AtomicU64,
}

async fn serve(State(app): State<Arc<App>>) -> Response {
    if !app.latency.is_zero() {
        tokio::time::sleep(app.latency).await;
    }
    let n = app.served.fetch_add(1, Ordering::Relaxed);
    // exactly error_rate of the requests fail: the n-th fails when the count of failures due
    // by n+1 grows
    let due = |k: u64| (k as f64 * app.error_rate).floor();
    let status = if due(n + 1) > due(n) {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let body = serde_json::json!({
        "version": app.version, "region": app.region, "pid": std::process::id(),
        "status": status.as_u16(),
    });
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&app.version) {
        resp.headers_mut().insert("x-version", v);
    }
    resp
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let failing_here = args.fail_regions.trim().is_empty()
        || args
            .fail_regions
            .split(',')
            .any(|r| r.trim() == args.region);
    let app = Arc::new(App {
        version: args.app_version.clone(),
        region: args.region.clone(),
        error_rate: if failing_here {
            args.error_rate.clamp(0.0, 1.0)
        } else {
            0.0
        },
        latency: Duration::from_millis(args.latency_ms),
        served: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/health", get(|| async { "ok" }))
        .fallback(serve)
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    eprintln!(
        "demo-service {} in {} on port {} (error rate {})",
        args.app_version, args.region, args.port, app.error_rate
    );
    axum::serve(listener, router)
        .with_graceful_shutdown(tai_core::runtime::stop_requested())
        .await?;
    Ok(())
}
