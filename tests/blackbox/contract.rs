//! Each service against its own OpenAPI document: schemathesis (PyPI) generates requests from
//! `/openapi.json`, schema-valid and not, and checks every answer with all of its checks (the
//! status is documented, the body and headers match the schema, valid data is accepted and
//! invalid data refused, no 5xx). `config/schemathesis/<service>.toml` says only what JSON
//! Schema cannot.

use std::process::Command;

use tai_blackbox::{Proc, backend};

async fn schemathesis_finds_nothing_against(binary: &str, config: &str) {
    let st = backend("TAI_TEST_SCHEMATHESIS");
    let service = Proc::start(binary, &[]).await.expect("service");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf();
    let out = tokio::task::spawn_blocking({
        let url = service.url("/openapi.json");
        let config = root.join("config/schemathesis").join(config);
        move || {
            // its cache of found failures goes in a directory of its own, not the repository
            let cwd = std::env::temp_dir().join(format!("tai-schemathesis-{}", std::process::id()));
            std::fs::create_dir_all(&cwd).expect("schemathesis dir");
            Command::new(format!("{st}/bin/st"))
                .current_dir(&cwd)
                .env("PYTHONPATH", &st)
                .env("SCHEMATHESIS_TELEMETRY", "false")
                .arg("--config-file")
                .arg(config)
                .args([
                    "run",
                    &url,
                    "--checks",
                    "all",
                    "--max-examples",
                    "60",
                    "--no-color",
                    "--workers",
                    "2",
                    // the same cases on every run, so a red run is reproducible
                    "--seed",
                    "20261123",
                ])
                .output()
                .expect("run schemathesis")
        }
    })
    .await
    .expect("schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems with {binary}:\n{text}"
    );
    // it really ran: every operation of the document was tested
    assert!(text.contains("passed"), "{text}");
    assert!(!text.contains(" 0 generated"), "{text}");
}

#[tokio::test]
async fn schemathesis_with_every_check_finds_nothing_against_the_payment_service() {
    schemathesis_finds_nothing_against("payment-system", "payment.toml").await;
}

#[tokio::test]
async fn schemathesis_with_every_check_finds_nothing_against_the_deployment_service() {
    schemathesis_finds_nothing_against("deployment-system", "deployment.toml").await;
}
