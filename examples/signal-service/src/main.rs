//! Starts the signal service: configuration, build, serve.

use tai_core::runtime::{Binary, Runtime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::start(&Binary {
        name: "signal-service",
        version: env!("CARGO_PKG_VERSION"),
        about: "Signals: POST /signal is decided by a policy and carried out by a worker pool",
        default_listen: "127.0.0.1:3003",
        settings: &[signal_service::SETTINGS],
    })
    .await?;
    let (router, api) = signal_service::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
