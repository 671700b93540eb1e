//! Starts the payment service: read the configuration, build, serve.

use tai_core::runtime::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::from_env(
        "payment-system",
        env!("CARGO_PKG_VERSION"),
        "127.0.0.1:3001",
    )?;
    let (router, api) = payment_system::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
