//! The operator's stack: the compose file, Prometheus config and alert rules, and the Grafana
//! dashboards' queries against the real Prometheus scraping the real services.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tai_blackbox::{Proc, backend, client, eventually, unique};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn make_help_is_the_default_and_lists_every_target_with_a_line() {
    let (ok, listed) = run("make", &["-s"]);
    assert!(ok, "{listed}");
    let makefile = std::fs::read_to_string(root().join("Makefile")).expect("Makefile");
    let targets: Vec<&str> = makefile
        .lines()
        .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .filter_map(|l| l.split_once(':').map(|(t, _)| t))
        .filter(|t| !t.contains(' ') && !t.contains('='))
        .collect();
    for target in &targets {
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(*target))
            .unwrap_or_else(|| panic!("make help does not list {target}:\n{listed}"));
        assert!(
            line.split_whitespace().count() > 3,
            "{target} has no description: {line}"
        );
    }
    for wanted in [
        "build",
        "run",
        "up",
        "down",
        "restart",
        "clean",
        "logs",
        "logs-payment",
        "logs-deployment",
        "test",
        "test-unit",
        "lint",
        "fmt",
        "bench",
        "stress-payment",
        "load",
        "spike",
        "chaos",
        "health",
        "status",
        "metrics",
        "view-grafana",
        "view-prometheus",
        "view-jaeger",
        "demo-deploy",
        "check",
    ] {
        assert!(targets.contains(&wanted), "no make {wanted}");
    }
    // check does what it says: lint, then the unit tests
    let (ok, plan) = run("make", &["-n", "check"]);
    assert!(
        ok && plan.contains("clippy") && plan.contains("cargo test"),
        "{plan}"
    );
}

#[test]
fn the_compose_stack_is_valid_and_complete() {
    let (ok, out) = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
    );
    assert!(ok, "{out}");
    let (ok, out) = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "--services"],
    );
    assert!(ok, "{out}");
    let mut services: Vec<&str> = out.lines().collect();
    services.sort();
    assert_eq!(
        services,
        vec![
            "deployment-system",
            "grafana",
            "jaeger",
            "loki",
            "nats",
            "payment-system",
            "postgres",
            "prometheus",
            "promtail",
            "redis",
            "sandbox-gateway",
            "vault",
            "vault-init"
        ]
    );
}

#[test]
fn prometheus_config_and_alert_rules_check_and_their_unit_tests_pass() {
    let (ok, out) = run("promtool", &["check", "config", "config/prometheus.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = run("promtool", &["check", "rules", "config/alerts.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = run("promtool", &["test", "rules", "config/alerts_test.yml"]);
    assert!(ok, "{out}");
}

fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in ["payment.json", "deployment.json"] {
        let text = std::fs::read_to_string(root().join("config/grafana/dashboards").join(name))
            .expect("dashboard");
        let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
        assert!(d["uid"].is_string() && d["title"].is_string(), "{name}");
        for panel in d["panels"].as_array().expect("panels") {
            assert_eq!(
                panel["datasource"]["uid"], "prometheus",
                "{name}: {}",
                panel["title"]
            );
            for t in panel["targets"].as_array().expect("targets") {
                out.push((
                    format!("{name}: {}", panel["title"].as_str().unwrap_or("")),
                    t["expr"].as_str().expect("expr").to_owned(),
                ));
            }
        }
    }
    out
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_the_real_prometheus() {
    let prom = backend("TAI_TEST_PROMETHEUS_URL");
    let http = client();
    let pay = Proc::start("payment-system", &[]).await.expect("payment");
    let dep = Proc::start("deployment-system", &[])
        .await
        .expect("deployment");
    let run_id = unique("dashboards");
    let targets = json!([
        {"targets": [pay.addr()], "labels": {"service": "payment-system", "tai_test": run_id}},
        {"targets": [dep.addr()], "labels": {"service": "deployment-system", "tai_test": run_id}},
    ]);
    let _registered = tai_blackbox::ScrapeTargets::register(&run_id, &targets);

    // something for every panel to show: payments of each kind, a success and a rollback
    for (i, customer) in ["cust_a", "cust_b", "cust_blacklist"].iter().enumerate() {
        let body = json!({"amount": 10 + i, "currency": "USD", "customer_id": customer, "merchant_id": "m"});
        http.post(pay.url("/payment"))
            .json(&body)
            .send()
            .await
            .expect("pay");
    }
    let stages = json!([{"name": "canary", "weight": 5, "bake_secs": 0.05}, {"name": "prod", "weight": 100, "bake_secs": 0.05}]);
    for (service, version) in [("api-service", "v2.0.0"), ("bad-service", "v1.0.0")] {
        let body = json!({"service": service, "version": version, "stages": stages, "analysis": {"interval_secs": 0.02}});
        let r = http
            .post(dep.url("/deploy?wait=true"))
            .json(&body)
            .send()
            .await
            .expect("deploy");
        assert_eq!(r.status(), 200);
    }
    // the exposition of both services, to check every metric a dashboard names exists
    let exposition = format!(
        "{}{}",
        http.get(pay.url("/metrics"))
            .send()
            .await
            .expect("m")
            .text()
            .await
            .expect("t"),
        http.get(dep.url("/metrics"))
            .send()
            .await
            .expect("m")
            .text()
            .await
            .expect("t")
    );
    let metric_name = regex_lite_metric_names;
    for (panel, expr) in dashboard_queries() {
        for name in metric_name(&expr) {
            assert!(
                exposition.contains(&format!("\n{name}"))
                    || exposition.contains(&format!("# TYPE {name} ")),
                "{panel}: {name} is not exported by either service"
            );
        }
        let url = format!("{prom}/api/v1/query");
        let result = eventually(Duration::from_secs(30), &format!("{panel}: {expr}"), || {
            let http = http.clone();
            let url = url.clone();
            let expr = expr.clone();
            async move {
                let body: Value = http
                    .get(&url)
                    .query(&[("query", expr.as_str())])
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                assert_eq!(body["status"], "success", "{expr}: {body}");
                let result = body["data"]["result"].as_array()?.clone();
                (!result.is_empty()).then_some(result)
            }
        })
        .await;
        assert!(!result.is_empty());
    }
}

/// The metric names in a PromQL expression: identifiers followed by `{`, `[` or `)` that are
/// not functions, aggregations or label names.
fn regex_lite_metric_names(expr: &str) -> Vec<String> {
    const WORDS: &[&str] = &[
        "sum",
        "by",
        "rate",
        "increase",
        "histogram_quantile",
        "max",
        "le",
        "status",
        "service",
        "rule",
        "route",
        "stage",
        "state",
        "queue",
    ];
    let mut names = Vec::new();
    let mut current = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            current.push(c);
            continue;
        }
        let word = std::mem::take(&mut current);
        let is_name = !word.is_empty()
            && word.contains('_')
            && !WORDS.contains(&word.as_str())
            && !word.chars().next().is_some_and(|f| f.is_ascii_digit());
        if is_name && matches!(c, '{' | '[' | ')') {
            let base = word.strip_suffix("_bucket").unwrap_or(&word).to_owned();
            if !names.contains(&base) {
                names.push(base);
            }
        }
    }
    names
}
