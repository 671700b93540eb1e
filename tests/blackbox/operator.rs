//! The operator's stack: the compose file, Prometheus config and alert rules, and the Grafana
//! dashboards' queries against the real Prometheus scraping the real services.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tai_blackbox::{Proc, backend, client, eventually, metrics_text, unique};

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

/// The compose file as docker-compose resolves it, parsed by the YAML library docker-compose
/// itself runs on (Debian's python3-yaml, beside it).
fn compose_config() -> Value {
    let (ok, yaml) = run("docker-compose", &["-f", "docker-compose.yml", "config"]);
    assert!(ok, "{yaml}");
    let mut child = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with yaml, as docker-compose has");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("parse");
    serde_json::from_slice(&out.stdout).expect("compose config as JSON")
}

#[test]
fn the_compose_stack_is_valid_complete_and_hardened() {
    let (ok, out) = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
    );
    assert!(ok, "{out}");
    let config = compose_config();
    let services = config["services"].as_object().expect("services");
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "alert-sink",
            "alertmanager",
            "alloy",
            "deployment-system",
            "grafana",
            "jaeger",
            "loki",
            "nats",
            "payment-system",
            "postgres",
            "prometheus",
            "redis",
            "sandbox-gateway",
            "vault",
            "vault-init"
        ]
    );
    let mut built = Vec::new();
    for (name, service) in services {
        // the one-shot job that writes the keys is the only service that is not kept running
        if name == "vault-init" {
            assert_eq!(service["restart"], "no", "{name}");
        } else {
            assert_eq!(service["restart"], "unless-stopped", "{name}");
            let test = &service["healthcheck"]["test"];
            assert!(
                test.as_array().is_some_and(|t| t.len() > 1),
                "{name} has no health check"
            );
        }
        // nothing is published beyond this machine
        for port in service["ports"].as_array().into_iter().flatten() {
            let published = match port {
                Value::String(p) => p.starts_with("127.0.0.1:"),
                other => other["host_ip"] == "127.0.0.1",
            };
            assert!(published, "{name} publishes {port} on every interface");
        }
        if service.get("build").is_some() {
            built.push(name.as_str());
        }
        let image = service["image"].as_str().unwrap_or_default();
        assert!(
            !image.contains("promtail"),
            "{name}: promtail is end-of-life"
        );
        assert!(
            !image.starts_with("jaegertracing/all-in-one"),
            "{name}: Jaeger v1 is end-of-life"
        );
    }
    // one image for every binary, built once
    assert_eq!(
        built,
        vec!["sandbox-gateway"],
        "only one service builds the image"
    );
    for name in ["sandbox-gateway", "payment-system", "deployment-system"] {
        assert_eq!(services[name]["image"], "tai:local", "{name}");
    }
    assert!(
        services["jaeger"]["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("jaegertracing/jaeger:2.")),
        "Jaeger v2"
    );
    assert!(
        services["alloy"]["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("grafana/alloy:")),
        "Grafana Alloy ships the logs"
    );
    // alerts reach someone: Prometheus sends to Alertmanager, which routes by severity to a
    // receiver that is part of the stack
    let prometheus = std::fs::read_to_string(root().join("config/prometheus.yml")).expect("p");
    assert!(prometheus.contains("alertmanager:9093"), "{prometheus}");
    let alertmanager = std::fs::read_to_string(root().join("config/alertmanager.yml")).expect("am");
    assert!(alertmanager.contains("severity"), "routes by severity");
    assert!(
        alertmanager.contains("http://alert-sink:"),
        "{alertmanager}"
    );
    // the image: a cached dependency layer, locked builds, the binary as PID 1 taking SIGTERM
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("cargo chef cook"),
        "no cached dependency layer"
    );
    for line in dockerfile.lines().filter(|l| {
        !l.trim_start().starts_with('#')
            && (l.contains("cargo build")
                || l.contains("cargo install")
                || l.contains("cargo chef cook"))
    }) {
        assert!(line.contains("--locked"), "not --locked: {line}");
    }
    assert!(dockerfile.contains("STOPSIGNAL SIGTERM"));
    assert!(
        !dockerfile
            .lines()
            .any(|l| l.starts_with("ENTRYPOINT") && !l.contains('[')),
        "a shell-form entrypoint would not pass SIGTERM on"
    );
}

/// Every server binary exits on SIGTERM, promptly and with status 0, as `docker stop` needs.
#[tokio::test]
async fn every_server_binary_exits_cleanly_on_sigterm() {
    for binary in ["sandbox-gateway", "payment-system", "deployment-system"] {
        let mut service = Proc::start(binary, &[]).await.expect(binary);
        service.terminate();
        let code = service.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(code, Some(0), "{binary} on SIGTERM:\n{}", service.log());
    }
}

#[test]
fn prometheus_config_and_alert_rules_check_and_their_unit_tests_pass() {
    let (ok, out) = run("promtool", &["check", "config", "config/prometheus.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = run("promtool", &["check", "rules", "config/alerts.yml"]);
    assert!(ok, "{out}");
    let (ok, out) = run("promtool", &["test", "rules", "config/alerts_test.yml"]);
    assert!(ok, "{out}");

    // every alert: a runbook section it links to, and a case that fires and one that does not
    let rules = std::fs::read_to_string(root().join("config/alerts.yml")).expect("alerts.yml");
    let cases = std::fs::read_to_string(root().join("config/alerts_test.yml")).expect("tests");
    let runbook = std::fs::read_to_string(root().join("docs/RUNBOOK.md")).expect("docs/RUNBOOK.md");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 11, "{alerts:?}");
    for wanted in [
        "ServiceDown",
        "BackendDown",
        "QueueStuck",
        "ReconcilerBacklog",
    ] {
        assert!(alerts.contains(&wanted), "no {wanted} alert");
    }
    let lines: Vec<&str> = cases.lines().map(str::trim).collect();
    for alert in &alerts {
        let link = format!("runbook_url: \"docs/RUNBOOK.md#{}\"", alert.to_lowercase());
        let block = rules
            .split("- alert: ")
            .find(|b| b.starts_with(&format!("{alert}\n")))
            .expect("the alert's block");
        assert!(
            block.contains(&link),
            "{alert} does not link its runbook section"
        );
        assert!(
            runbook.lines().any(|l| l.trim() == format!("## {alert}")),
            "docs/RUNBOOK.md has no section ## {alert}"
        );
        let outcomes: Vec<bool> = lines
            .windows(2)
            .filter(|w| w[0] == format!("alertname: {alert}"))
            .map(|w| w[1] != "exp_alerts: []")
            .collect();
        assert!(
            outcomes.contains(&true),
            "{alert} has no case where it fires"
        );
        assert!(
            outcomes.contains(&false),
            "{alert} has no case where it does not fire"
        );
    }
}

/// Every dashboard's queries, with Grafana's variables replaced as the test evaluates them:
/// every instance, and one minute for the rate windows.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut links = Vec::new();
    let names = [
        "overview.json",
        "payment.json",
        "deployment.json",
        "system.json",
    ];
    let mut uids = Vec::new();
    for name in names {
        let text = std::fs::read_to_string(root().join("config/grafana/dashboards").join(name))
            .expect("dashboard");
        let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
        assert!(d["uid"].is_string() && d["title"].is_string(), "{name}");
        uids.push(d["uid"].as_str().unwrap_or_default().to_owned());
        // an instance variable on every dashboard
        let vars = d["templating"]["list"].as_array().expect("templating");
        assert!(
            vars.iter().any(|v| v["name"] == "instance"),
            "{name} has no instance variable"
        );
        links.push(d["links"].to_string());
        for panel in d["panels"].as_array().expect("panels") {
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if matches!(panel["type"].as_str(), Some("row" | "text")) && targets.is_empty() {
                continue;
            }
            assert_eq!(
                panel["datasource"]["uid"], "prometheus",
                "{name}: {}",
                panel["title"]
            );
            assert!(
                !targets.is_empty(),
                "{name}: {} has no query",
                panel["title"]
            );
            for t in targets {
                let expr = t["expr"]
                    .as_str()
                    .expect("expr")
                    .replace("$instance", ".*")
                    .replace("$__rate_interval", "1m")
                    .replace("$__interval", "1m")
                    .replace("$__range", "5m");
                assert!(!expr.contains('$'), "{name}: unknown variable in {expr}");
                out.push((
                    format!("{name}: {}", panel["title"].as_str().unwrap_or("")),
                    expr,
                ));
            }
        }
    }
    // the overview links to the three others, each of them back to it
    for (i, uid) in uids.iter().enumerate().skip(1) {
        assert!(
            links[0].contains(&format!("/d/{uid}")),
            "the overview does not link {uid}"
        );
        assert!(
            !links[i].is_empty() && links[i] != "null",
            "{} has no links",
            names[i]
        );
    }
    out
}

/// The breaker panel maps the gauge's 0, 1 and 2 to closed (green), open (red) and half-open.
#[test]
fn the_breaker_panel_names_and_colours_each_state() {
    let text = std::fs::read_to_string(root().join("config/grafana/dashboards/payment.json"))
        .expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let panel = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .find(|p| {
            p["targets"].as_array().is_some_and(|t| {
                t.iter().any(|t| {
                    t["expr"]
                        .as_str()
                        .is_some_and(|e| e.contains("payment_gateway_circuit_breaker_state"))
                })
            })
        })
        .expect("a breaker panel");
    let options: Vec<&Value> = panel["fieldConfig"]["defaults"]["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| &m["options"])
        .collect();
    for (value, text, colours) in [
        ("0", "closed", &["green"][..]),
        ("1", "open", &["red"][..]),
        ("2", "half-open", &["orange", "yellow"][..]),
    ] {
        let entry = options
            .iter()
            .map(|o| &o[value])
            .find(|e| !e.is_null())
            .unwrap_or_else(|| panic!("no mapping for {value}"));
        assert_eq!(entry["text"], text, "{value}: {entry}");
        assert!(
            colours.iter().any(|c| entry["color"] == *c),
            "{value}: {entry}"
        );
    }
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
        metrics_text(&http, &pay).await,
        metrics_text(&http, &dep).await
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

/// The settings a binary's `--help` shows: its environment name and its default ("" when
/// unset).
fn help_settings(binary: &str) -> Vec<(String, String)> {
    let out = Command::new(tai_blackbox::bin_dir().join(binary))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{binary} --help: {e}"));
    assert!(out.status.success(), "{binary} --help failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut blocks: Vec<String> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("--") || (t.starts_with('-') && t.get(2..4) == Some(", ")) {
            blocks.push(t.to_owned());
        } else if let Some(b) = blocks.last_mut() {
            b.push(' ');
            b.push_str(t);
        }
    }
    let between = |b: &str, open: &str| {
        b.split_once(open)
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(v, _)| v.trim().trim_matches('"').to_owned())
    };
    blocks
        .iter()
        .filter_map(|b| {
            let name = between(b, "[env: ")?;
            let name = name.split('=').next().unwrap_or(&name).to_owned();
            Some((name, between(b, "[default: ").unwrap_or_default()))
        })
        .collect()
}

/// docs/CONFIGURATION.md's tables: section -> setting -> default ("" when unset).
fn reference_tables()
-> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let doc = std::fs::read_to_string(root().join("docs/CONFIGURATION.md"))
        .expect("docs/CONFIGURATION.md");
    let mut tables = std::collections::BTreeMap::new();
    let mut section = String::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_owned();
            continue;
        }
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches(|c| c == '|' || c == ' '))
            .collect();
        if cells.len() >= 4 && cells[0].starts_with('`') {
            let name = cells[0].trim_matches('`').to_owned();
            let default = if cells[2] == "(unset)" {
                String::new()
            } else {
                cells[2].trim_matches('`').to_owned()
            };
            tables
                .entry(section.clone())
                .or_insert_with(std::collections::BTreeMap::new)
                .insert(name, default);
        }
    }
    tables
}

const BINARIES: [&str; 8] = [
    "payment-system",
    "deployment-system",
    "sandbox-gateway",
    "stress-payment",
    "stress-deployment",
    "demo-service",
    "demo-deploy",
    "signal-service",
];

#[test]
fn the_configuration_reference_names_every_setting_of_every_binary() {
    let tables = reference_tables();
    let common = tables
        .get("Common settings (both services)")
        .cloned()
        .unwrap_or_default();
    assert!(
        common.contains_key("DATABASE_URL"),
        "no common settings table"
    );
    for binary in BINARIES {
        let version = Command::new(tai_blackbox::bin_dir().join(binary))
            .arg("--version")
            .output()
            .expect("--version");
        let shown = String::from_utf8_lossy(&version.stdout).into_owned();
        assert!(
            version.status.success() && shown.starts_with(&format!("{binary} ")),
            "{binary} --version: {shown}"
        );
        let own = tables.get(binary).cloned().unwrap_or_default();
        let settings = help_settings(binary);
        assert!(
            !settings.is_empty() || binary == "demo-deploy",
            "{binary} shows no settings"
        );
        for (name, default) in settings {
            let documented = own.get(&name).or_else(|| {
                ((binary.ends_with("-system") || binary == "signal-service")
                    && name != "LISTEN_ADDR")
                    .then(|| common.get(&name))
                    .flatten()
            });
            let documented = documented.unwrap_or_else(|| {
                panic!("docs/CONFIGURATION.md does not list {name} under {binary} (python3 scripts/config-reference.py writes it)")
            });
            assert_eq!(
                documented, &default,
                "{binary} {name}: the page's default is not --help's"
            );
        }
    }
}

/// Every setting the code reads by name is one `--help` shows: tai-core's in both services,
/// each service's in its own.
#[test]
fn every_setting_the_code_reads_is_a_flag_of_its_binary() {
    fn read_names(dir: &std::path::Path, found: &mut std::collections::BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("source folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                if !path.ends_with("bin") {
                    read_names(&path, found);
                }
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") || path.ends_with("tests.rs")
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            let bytes = text.as_bytes();
            let mut at = 0;
            while let Some(i) = text[at..].find('"') {
                let start = at + i + 1;
                let Some(len) = text[start..].find('"') else {
                    break;
                };
                let lit = &text[start..start + len];
                at = start + len + 1;
                let setting_like = lit.len() > 3
                    && lit
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                    && bytes[start].is_ascii_uppercase();
                if !setting_like {
                    continue;
                }
                let before: String = text[..start - 1]
                    .chars()
                    .rev()
                    .filter(|c| !c.is_whitespace())
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                let read = [
                    "setting(",
                    "setting_or(",
                    "sources.get(",
                    "parse_or(&sources,",
                    "&get,",
                ]
                .iter()
                .any(|p| before.ends_with(p))
                    || (before.ends_with("get(") && lit.starts_with("SANDBOX_"));
                if read {
                    found.insert(lit.to_owned());
                }
            }
        }
    }
    let help = |b: &str| -> std::collections::BTreeSet<String> {
        help_settings(b).into_iter().map(|(n, _)| n).collect()
    };
    let (pay, dep) = (help("payment-system"), help("deployment-system"));
    for (crate_dir, binaries) in [
        ("tai-core/src", vec![&pay, &dep]),
        ("payment-system/src", vec![&pay]),
        ("deployment-system/src", vec![&dep]),
    ] {
        let mut found = std::collections::BTreeSet::new();
        read_names(&root().join(crate_dir), &mut found);
        assert!(
            found.len() > 5,
            "{crate_dir}: the scan found only {found:?}"
        );
        for name in &found {
            for shown in &binaries {
                assert!(
                    shown.contains(name),
                    "{crate_dir} reads {name}, which --help does not show"
                );
            }
        }
    }
}
