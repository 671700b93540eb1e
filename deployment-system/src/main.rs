//! Starts the deployment service: read the configuration, build, serve.

use tai_core::runtime::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::start(
        "deployment-system",
        env!("CARGO_PKG_VERSION"),
        "127.0.0.1:3002",
    )
    .await?;
    let (router, api) = deployment_system::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
