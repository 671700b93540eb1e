//! Starts the deployment service: read the configuration, build, serve.

use tai_core::runtime::Runtime;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::from_env(
        "deployment-system",
        env!("CARGO_PKG_VERSION"),
        "127.0.0.1:3002",
    )?;
    let (router, api) = deployment_system::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
