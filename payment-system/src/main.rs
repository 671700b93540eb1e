//! Starts the payment service: read the configuration, build, serve.

use tai_core::runtime::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::start(
        "payment-system",
        env!("CARGO_PKG_VERSION"),
        "127.0.0.1:3001",
    )
    .await?;
    let (router, api) = payment_system::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
