//! Starts the payment service: read the configuration (flags, environment, TAI_CONFIG), build, serve.

use tai_core::runtime::{Binary, Runtime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::start(&Binary {
        name: "payment-system",
        version: env!("CARGO_PKG_VERSION"),
        about: "Payments: POST /payment turns a request into a fraud decision and a charge, \
                exactly once, with refunds, reviews and webhooks",
        default_listen: "127.0.0.1:3001",
        settings: &[
            payment_system::settings::SETTINGS,
            payment_system::settings::SANDBOX_SETTINGS,
        ],
    })
    .await?;
    let (router, api) = payment_system::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
