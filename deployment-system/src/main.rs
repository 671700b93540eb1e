//! Starts the deployment service: read the configuration (flags, environment, TAI_CONFIG), build, serve.

use tai_core::runtime::{Binary, Runtime};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut runtime = Runtime::start(&Binary {
        name: "deployment-system",
        version: env!("CARGO_PKG_VERSION"),
        about: "Deployments: POST /deploy rolls a version out region by region, canary first, \
                and rolls back on its own when the analysis fails",
        default_listen: "127.0.0.1:3002",
        settings: &[deployment_system::settings::SETTINGS],
    })
    .await?;
    let (router, api) = deployment_system::build(&mut runtime).await?;
    runtime.serve(router, api).await?;
    Ok(())
}
