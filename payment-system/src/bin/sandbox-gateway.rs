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
