//! The standalone sandbox gateway: `POST /v1/charges`, `GET /v1/charges[/{key}]`,
//! `POST /v1/charges/{key}/reverse`, `GET /v1/stats`.
//!
//! `LISTEN_ADDR` (default 127.0.0.1:3901), and the behaviour settings of
//! `payment_system::gateway::sandbox::config_from`: `SANDBOX_LATENCY_MS`,
//! `SANDBOX_FAILURE_RATE`, `SANDBOX_DECIDE` (`early` | `late`), `SANDBOX_CHARGE_THEN_FAIL_RATE`,
//! `SANDBOX_LOOKUP_LAG_MS`. Stops on SIGINT or SIGTERM.

use std::sync::Arc;

use payment_system::gateway::sandbox::{Sandbox, config_from, router};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let get = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let addr = get("LISTEN_ADDR").unwrap_or_else(|| "127.0.0.1:3901".to_owned());
    let config = config_from(get)?;
    eprintln!("sandbox-gateway listening on {addr} ({config:?})");
    let sandbox = Arc::new(Sandbox::with_config(config));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, router(sandbox))
        .with_graceful_shutdown(async {
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async {
                        match term.as_mut() {
                            Some(t) => { t.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
