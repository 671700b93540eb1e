//! The standalone sandbox gateway: `POST /v1/charges`, `GET /v1/charges[/{key}]`,
//! `POST /v1/charges/{key}/reverse`, `GET /v1/stats`.
//!
//! `LISTEN_ADDR` (default 127.0.0.1:3901), and the behaviour settings of
//! `payment_system::settings::SANDBOX_SETTINGS` (`--help` lists them), each a flag or an
//! environment variable. Stops on SIGINT or SIGTERM.

use std::sync::Arc;

use payment_system::gateway::sandbox::{Sandbox, config_from, router};
use payment_system::settings::SANDBOX_SETTINGS;
use tai_core::runtime::cli::{self, Setting};

const LISTEN: &[Setting] = &[Setting::new(
    "LISTEN_ADDR",
    "",
    "Address to listen on, host:port",
)];

/// One line per request on stderr, with the caller's `traceparent`: a card network's request
/// log, where a payment's trace can be followed into the gateway.
async fn request_log(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let line = format!(
        "{} {} traceparent={}",
        req.method(),
        req.uri().path(),
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    );
    let response = next.run(req).await;
    eprintln!("{line} -> {}", response.status().as_u16());
    response
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let flags = cli::parse(
        "sandbox-gateway",
        env!("CARGO_PKG_VERSION"),
        "A card network for tests and demos: charges, captures, voids and refunds decided by \
         card number, with the latency and failures you ask for",
        "127.0.0.1:3901",
        &[LISTEN, SANDBOX_SETTINGS],
    );
    let get = |name: &str| {
        flags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
            .filter(|v| !v.is_empty())
    };
    let addr = get("LISTEN_ADDR").unwrap_or_else(|| "127.0.0.1:3901".to_owned());
    let config = config_from(get)?;
    eprintln!("sandbox-gateway listening on {addr} ({config:?})");
    let sandbox = Arc::new(Sandbox::with_config(config));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(
        listener,
        router(sandbox).layer(axum::middleware::from_fn(request_log)),
    )
    .with_graceful_shutdown(tai_core::runtime::stop_requested())
    .await?;
    Ok(())
}
