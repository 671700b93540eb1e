//! The standalone sandbox gateway (API.md): `POST /v1/charges`, `GET /v1/stats`.
//!
//! `LISTEN_ADDR` (default 127.0.0.1:3901), `SANDBOX_LATENCY_MS`, `SANDBOX_FAILURE_RATE`.

use std::sync::Arc;
use std::time::Duration;

use payment_system::gateway::sandbox::{Sandbox, router};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is invalid")),
        _ => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: String = env_or("LISTEN_ADDR", "127.0.0.1:3901".to_owned())?;
    let latency = Duration::from_millis(env_or("SANDBOX_LATENCY_MS", 0u64)?);
    let failure_rate: f64 = env_or("SANDBOX_FAILURE_RATE", 0.0)?;
    let sandbox = Arc::new(Sandbox::new(latency, failure_rate));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!(
        "sandbox-gateway listening on {addr} (latency {latency:?}, failure rate {failure_rate})"
    );
    axum::serve(listener, router(sandbox))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
