//! deployment-system, from outside: progressive delivery over HTTP against the built binary.

use std::time::Duration;

use serde_json::{Value, json};
use tai_blackbox::{Proc, backend, client, eventually, get_json, metrics_text, unique};

fn stages(bake: f64) -> Value {
    json!([
        {"name": "canary", "weight": 5, "bake_secs": bake},
        {"name": "staging", "weight": 25, "bake_secs": bake},
        {"name": "prod", "weight": 100, "bake_secs": bake},
    ])
}

fn request(service: &str, version: &str, bake: f64) -> Value {
    json!({"service": service, "version": version, "stages": stages(bake), "analysis": {"interval_secs": 0.05}})
}

pub(crate) async fn post(
    http: &reqwest::Client,
    svc: &Proc,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let r = http
        .post(svc.url(path))
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

pub(crate) async fn get(http: &reqwest::Client, svc: &Proc, path: &str) -> Value {
    get_json(http, svc.url(path)).await
}

/// The statuses a deployment ends in.
pub(crate) const TERMINAL: [&str; 6] = [
    "SUCCESS",
    "ROLLED_BACK",
    "FAILED",
    "ABORTED",
    "REJECTED",
    "SUPERSEDED",
];

async fn wait_terminal(http: &reqwest::Client, svc: &Proc, id: &str, within: Duration) -> Value {
    eventually(within, &format!("{id} to end"), || async {
        let d = get(http, svc, &format!("/deploy/{id}")).await;
        let s = d["status"].as_str().unwrap_or("");
        TERMINAL.contains(&s).then_some(d)
    })
    .await
}

async fn traffic(http: &reqwest::Client, svc: &Proc, region: &str, service: &str) -> Value {
    get(http, svc, "/fleet").await["regions"][region][service].clone()
}

#[tokio::test]
async fn a_healthy_release_rolls_out_through_every_stage() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let mut body = request("api-service", "v2.0.0", 0.2);
    body["target_region"] = json!("us-west-2");
    let (status, d) = post(&http, &svc, "/deploy?wait=true", &body).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], "SUCCESS");
    assert_eq!(
        d["stages_completed"],
        json!(["validation", "canary", "staging", "prod"])
    );
    assert_eq!(d["regions"][0]["status"], "SUCCESS");
    let passes = d["regions"][0]["analysis"].as_array().expect("analysis");
    assert!(
        passes.len() >= 3 && passes.iter().all(|a| a["result"] == "pass"),
        "{d}"
    );
    let t = traffic(&http, &svc, "us-west-2", "api-service").await;
    assert_eq!(
        (t["stable"].as_str(), t["canary"].is_null()),
        (Some("v2.0.0"), true),
        "the fleet runs v2.0.0 at 100%"
    );
    assert_eq!(
        traffic(&http, &svc, "us-east-1", "api-service").await["stable"],
        "v1.9.0",
        "other regions untouched"
    );
    let metrics = metrics_text(&http, &svc).await;
    assert!(metrics.contains("deployment_success_total 1"), "{metrics}");
    assert!(metrics.contains("deployment_duration_seconds_count 1"));
    assert!(metrics.contains(r#"deployment_stage_duration_seconds_count{stage="canary"} 1"#));

    // without wait: 202, Location, then it ends by itself
    let (status, d) = post(
        &http,
        &svc,
        "/deploy",
        &request("api-service", "v2.1.0", 0.1),
    )
    .await;
    assert_eq!(status, 202);
    assert!(["PENDING", "IN_PROGRESS"].contains(&d["status"].as_str().unwrap_or("")));
    let id = d["deployment_id"].as_str().expect("id");
    assert_eq!(
        wait_terminal(&http, &svc, id, Duration::from_secs(20)).await["status"],
        "SUCCESS"
    );
}

#[tokio::test]
async fn a_failing_canary_is_rolled_back_with_the_measured_gate_in_the_events() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let (status, d) = post(
        &http,
        &svc,
        "/deploy?wait=true",
        &request("bad-service", "v1.0.0", 0.3),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], "ROLLED_BACK");
    assert_eq!(d["regions"][0]["status"], "ROLLED_BACK");
    assert_eq!(
        d["regions"][0]["stages_completed"],
        json!([]),
        "it never left canary"
    );
    assert_eq!(d["stages_completed"], json!(["validation"]));
    let failed = d["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["kind"] == "gate_failed")
        .expect("a gate_failed event")
        .clone();
    assert_eq!(failed["stage"], "canary");
    assert_eq!(failed["detail"]["error_rate"], 0.12);
    assert_eq!(failed["detail"]["max_error_rate"], 0.05);
    assert_eq!(
        failed["detail"]["decision"], "deny",
        "the gate policy denied the stage"
    );
    assert_eq!(failed["detail"]["result"], "fail");
    assert!(
        d["events"]
            .as_array()
            .expect("events")
            .iter()
            .any(|e| e["kind"] == "rolled_back")
    );
    let t = traffic(&http, &svc, "us-west-2", "bad-service").await;
    assert_eq!(
        (t["stable"].as_str(), t["canary"].is_null()),
        (Some("v0.9.0"), true)
    );
    let metrics = metrics_text(&http, &svc).await;
    assert!(
        metrics.contains(r#"deployment_rollback_total{cause="gate"} 1"#),
        "counted once the platform serves stable, labelled by cause"
    );
    assert!(metrics.contains("deployment_rollback_duration_seconds_count 1"));
    let andon = get(&http, &svc, "/andon").await;
    assert_eq!(andon["level"], "RED");
}

#[tokio::test]
async fn safety_checks_and_malformed_requests_are_refused() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let codes = |d: &Value| {
        d["reasons"]
            .as_array()
            .map(|r| {
                r.iter()
                    .map(|x| x["code"].as_str().unwrap_or("").to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let (status, d) = post(
        &http,
        &svc,
        "/deploy",
        &json!({"service": "api-service", "version": "v9.9.9"}),
    )
    .await;
    assert_eq!((status, d["status"].as_str()), (422, Some("REJECTED")));
    assert_eq!(codes(&d), vec!["image_not_found"]);
    let (status, d) = post(
        &http,
        &svc,
        "/deploy",
        &json!({"service": "api-service", "version": "v2.0.0", "target_region": "mars-1"}),
    )
    .await;
    assert_eq!(
        (status, codes(&d)),
        (422, vec!["unknown_region".to_owned()])
    );
    let (status, d) = post(
        &http,
        &svc,
        "/deploy",
        &json!({"service": "big-service", "version": "v2.0.0"}),
    )
    .await;
    assert_eq!(
        (status, codes(&d)),
        (422, vec!["insufficient_capacity".to_owned()])
    );
    let (status, d) = post(
        &http,
        &svc,
        "/deploy",
        &json!({"service": "new-service", "version": "v1.0.0"}),
    )
    .await;
    assert_eq!(
        (status, codes(&d)),
        (422, vec!["no_rollback_target".to_owned()])
    );
    let (status, d) = post(
        &http,
        &svc,
        "/deploy",
        &json!({"service": "ghost", "version": "v1", "regions": ["us-west-2", "mars-1"]}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        codes(&d),
        vec!["image_not_found", "no_rollback_target", "unknown_region"],
        "every failed check is named"
    );

    let malformed = [
        (json!({"version": "v2.0.0"}), 400, "service"),
        (json!({"service": "api-service"}), 400, "version"),
        (
            json!({"service": "api-service", "version": "v2.0.0", "regions": []}),
            400,
            "regions",
        ),
        (
            json!({"service": "api-service", "version": "v2.0.0", "stages": [{"name": "c", "weight": 150, "bake_secs": 1}]}),
            400,
            "stages[0][weight]",
        ),
        (
            json!({"service": "api-service", "version": "v2.0.0", "stages": [{"name": "c", "weight": 100, "bake_secs": -1}]}),
            400,
            "stages[0][bake_secs]",
        ),
        (
            json!({"service": "api-service", "version": "v2.0.0", "rollout_strategy": "blue_green"}),
            422,
            "rollout_strategy",
        ),
        (json!({"service": 7, "version": "v2.0.0"}), 400, "service"),
        (
            json!({"service": "api-service", "version": "v2.0.0", "on_region_failure": "explode"}),
            400,
            "on_region_failure",
        ),
        (
            json!({"service": "api-service", "version": "v2.0.0", "analysis": {"interval_secs": 0}}),
            400,
            "analysis[interval_secs]",
        ),
        (json!(["not", "an", "object"]), 400, "body"),
    ];
    for (body, status, param) in malformed {
        let (s, d) = post(&http, &svc, "/deploy", &body).await;
        assert_eq!(s, status, "{body}: {d}");
        assert_eq!(d["error"]["param"], param, "{body}: {d}");
    }
    let (s, d) = post(
        &http,
        &svc,
        "/deploy",
        &json!({"service": "api-service", "version": "v2.0.0", "rollout_strategy": "blue_green"}),
    )
    .await;
    assert_eq!(s, 422);
    assert!(
        d["error"]["message"]
            .as_str()
            .expect("m")
            .contains("supported: canary")
    );
    let list = get(&http, &svc, "/deployments").await;
    assert!(
        list["deployments"]
            .as_array()
            .expect("list")
            .iter()
            .all(|d| d["status"] == "REJECTED"),
        "nothing rolled out"
    );
    assert_eq!(
        traffic(&http, &svc, "us-west-2", "api-service").await["stable"],
        "v1.9.0"
    );
}

#[tokio::test]
async fn regions_roll_out_one_after_another_and_a_busy_region_queues() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let mut body = request("api-service", "v2.0.0", 0.15);
    body["regions"] = json!(["us-west-2", "us-east-1", "eu-west-1"]);
    let (status, d) = post(&http, &svc, "/deploy?wait=true", &body).await;
    assert_eq!(
        (status, d["status"].as_str()),
        (200, Some("SUCCESS")),
        "{d}"
    );
    let regions = d["regions"].as_array().expect("regions");
    assert_eq!(
        regions
            .iter()
            .map(|r| r["region"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        vec!["us-west-2", "us-east-1", "eu-west-1"]
    );
    for pair in regions.windows(2) {
        let (a, b) = (
            pair[0]["finished_at"].as_str().expect("f"),
            pair[1]["started_at"].as_str().expect("s"),
        );
        let (a, b) = (chrono_like(a), chrono_like(b));
        assert!(
            b >= a,
            "{} started before {} finished",
            pair[1]["region"],
            pair[0]["region"]
        );
    }
    for r in ["us-west-2", "us-east-1", "eu-west-1"] {
        assert_eq!(
            traffic(&http, &svc, r, "api-service").await["stable"],
            "v2.0.0"
        );
    }

    // two deployments to one region: the second waits, PENDING, first in line
    // the first fails its gate on its first measurement, 0.8 s in
    let mut slow = request("bad-service", "v1.1.0", 1.0);
    slow["analysis"]["interval_secs"] = json!(0.8);
    let (_, first) = post(&http, &svc, "/deploy", &slow).await;
    let (_, second) = post(
        &http,
        &svc,
        "/deploy",
        &request("bad-service", "v1.0.0", 0.1),
    )
    .await;
    let (a, b) = (
        first["deployment_id"].as_str().expect("id").to_owned(),
        second["deployment_id"].as_str().expect("id").to_owned(),
    );
    let waiting = eventually(
        Duration::from_secs(5),
        "the second to show its queue position",
        || async {
            let d = get(&http, &svc, &format!("/deploy/{b}")).await;
            (d["regions"][0]["queue_position"] == 1).then_some(d)
        },
    )
    .await;
    assert_eq!(waiting["status"], "PENDING");
    let da = wait_terminal(&http, &svc, &a, Duration::from_secs(20)).await;
    let db = wait_terminal(&http, &svc, &b, Duration::from_secs(20)).await;
    let a_end = chrono_like(da["regions"][0]["finished_at"].as_str().expect("f"));
    let b_start = chrono_like(db["regions"][0]["started_at"].as_str().expect("s"));
    assert!(
        b_start >= a_end,
        "the second started before the first ended"
    );
}

/// RFC 3339 timestamps with the same offset compare as text once their fractions are padded.
fn chrono_like(s: &str) -> String {
    let (main, rest) = s.split_once('.').unwrap_or((s.trim_end_matches('Z'), "0Z"));
    let frac: String = rest
        .trim_end_matches('Z')
        .chars()
        .chain(std::iter::repeat('0'))
        .take(9)
        .collect();
    format!("{main}.{frac}")
}

#[tokio::test]
async fn operators_can_pause_resume_promote_and_abort() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let (_, d) = post(
        &http,
        &svc,
        "/deploy",
        &request("api-service", "v2.0.0", 30.0),
    )
    .await;
    let id = d["deployment_id"].as_str().expect("id").to_owned();
    eventually(Duration::from_secs(5), "the canary to start", || async {
        (get(&http, &svc, &format!("/deploy/{id}")).await["status"] == "IN_PROGRESS").then_some(())
    })
    .await;
    assert_eq!(
        traffic(&http, &svc, "us-west-2", "api-service").await["canary_weight"],
        5
    );
    let (s, d) = post(&http, &svc, &format!("/deploy/{id}/pause"), &json!({})).await;
    assert_eq!((s, d["paused"].as_bool()), (200, Some(true)));
    assert_eq!(
        post(&http, &svc, &format!("/deploy/{id}/pause"), &json!({}))
            .await
            .0,
        409
    );
    let (s, d) = post(&http, &svc, &format!("/deploy/{id}/resume"), &json!({})).await;
    assert_eq!((s, d["paused"].as_bool()), (200, Some(false)));
    // promote skips the rest of the canary's 30 s bake
    let (s, _) = post(&http, &svc, &format!("/deploy/{id}/promote"), &json!({})).await;
    assert_eq!(s, 200);
    eventually(Duration::from_secs(5), "staging to start", || async {
        (traffic(&http, &svc, "us-west-2", "api-service").await["canary_weight"] == 25)
            .then_some(())
    })
    .await;
    let (s, d) = post(&http, &svc, &format!("/deploy/{id}/abort"), &json!({})).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("ABORTED")));
    let t = traffic(&http, &svc, "us-west-2", "api-service").await;
    assert_eq!(
        (t["stable"].as_str(), t["canary"].is_null()),
        (Some("v1.9.0"), true),
        "aborting rolls back"
    );
    let (s, d) = post(&http, &svc, &format!("/deploy/{id}/abort"), &json!({})).await;
    assert_eq!(
        (s, d["error"]["code"].as_str()),
        (409, Some("deployment_state_conflict"))
    );
    assert_eq!(
        post(&http, &svc, "/deploy/dpl_nope/abort", &json!({}))
            .await
            .0,
        404
    );

    let mut dry = request("api-service", "v2.0.0", 2.0);
    dry["dry_run"] = json!(true);
    dry["regions"] = json!(["us-west-2", "eu-west-1"]);
    let (s, plan) = post(&http, &svc, "/deploy", &dry).await;
    assert_eq!(s, 200, "{plan}");
    assert_eq!(plan["plan"]["expected_duration_secs"], 12.0);
    assert_eq!(
        plan["plan"]["timeline"].as_array().expect("timeline").len(),
        6
    );
    assert_eq!(
        get(&http, &svc, "/deployments").await["deployments"]
            .as_array()
            .expect("l")
            .len(),
        1,
        "a dry run changes nothing"
    );
}

#[tokio::test]
async fn measurement_errors_hold_the_stage_then_fail_it() {
    let http = client();
    let dead = format!("http://127.0.0.1:{}", tai_blackbox::free_port());
    let svc = Proc::start(
        "deployment-system",
        &[
            ("PROMETHEUS_URL", dead.as_str()),
            ("ANALYSIS_TIMEOUT_MS", "200"),
        ],
    )
    .await
    .expect("start");
    let mut body = request("api-service", "v2.0.0", 0.1);
    body["analysis"] =
        json!({"provider": "prometheus", "interval_secs": 0.2, "max_inconclusive_secs": 3});
    let (_, d) = post(&http, &svc, "/deploy", &body).await;
    let id = d["deployment_id"].as_str().expect("id").to_owned();
    let andon = eventually(
        Duration::from_secs(5),
        "Andon YELLOW while the gate cannot tell",
        || async {
            let a = get(&http, &svc, "/andon").await;
            (a["level"] == "YELLOW").then_some(a)
        },
    )
    .await;
    assert!(
        andon["reasons"][0]["message"]
            .as_str()
            .expect("m")
            .contains("inconclusive")
    );
    assert_eq!(
        get(&http, &svc, &format!("/deploy/{id}")).await["status"],
        "IN_PROGRESS",
        "held, not rolled back at once"
    );
    let d = wait_terminal(&http, &svc, &id, Duration::from_secs(10)).await;
    assert_eq!(d["status"], "ROLLED_BACK");
    // an unreachable provider is a measurement error; the fifth in a row fails the stage
    let errors = d["regions"][0]["analysis"]
        .as_array()
        .expect("a")
        .iter()
        .filter(|a| a["result"] == "error")
        .count();
    assert_eq!(errors, 5, "held through 4 errors, failed on the 5th: {d}");
}

#[tokio::test]
async fn http_probes_gate_a_rollout() {
    let http = client();
    let target = Proc::start("payment-system", &[])
        .await
        .expect("probe target");
    let ok_template = target.url("/health?service={service}&region={region}");
    let svc = Proc::start(
        "deployment-system",
        &[("HEALTH_URL_TEMPLATE", ok_template.as_str())],
    )
    .await
    .expect("start");
    let mut body = request("api-service", "v2.0.0", 0.1);
    body["analysis"] = json!({"provider": "http", "interval_secs": 0.05});
    let (s, d) = post(&http, &svc, "/deploy?wait=true", &body).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("SUCCESS")), "{d}");
    assert_eq!(d["regions"][0]["analysis"][0]["provider"], "http");

    let bad_template = target.url("/no-such-health/{service}");
    let svc = Proc::start(
        "deployment-system",
        &[("HEALTH_URL_TEMPLATE", bad_template.as_str())],
    )
    .await
    .expect("start");
    let (s, d) = post(&http, &svc, "/deploy?wait=true", &body).await;
    assert_eq!(
        (s, d["status"].as_str()),
        (200, Some("ROLLED_BACK")),
        "a failing probe rolls back: {d}"
    );
}

#[tokio::test]
async fn prometheus_queries_gate_a_rollout() {
    let prom = backend("TAI_TEST_PROMETHEUS_URL");
    let http = client();
    // a healthy "v2.0.0" and a failing "v2.1.0" of api-service in us-west-2: two real services
    // scraped by the real Prometheus, labelled as those versions
    let healthy = Proc::start("payment-system", &[]).await.expect("healthy");
    let dead_gateway = format!("http://127.0.0.1:{}", tai_blackbox::free_port());
    let failing = Proc::start(
        "payment-system",
        &[
            ("GATEWAY_URL", dead_gateway.as_str()),
            ("GATEWAY_TIMEOUT_MS", "200"),
        ],
    )
    .await
    .expect("failing");
    let run = unique("promgate");
    let targets = json!([
        {"targets": [healthy.addr()], "labels": {"service": "api-service", "version": "v2.0.0", "region": "us-west-2", "tai_test": run}},
        {"targets": [failing.addr()], "labels": {"service": "api-service", "version": "v2.1.0", "region": "us-west-2", "tai_test": run}},
    ]);
    let _registered = tai_blackbox::ScrapeTargets::register(&run, &targets);
    // traffic: successes on one, 502s on the other
    let load = {
        let http = http.clone();
        let (ok_url, bad_url) = (healthy.url("/payment"), failing.url("/payment"));
        tokio::spawn(async move {
            for i in 0..400 {
                let body = json!({"amount": 1, "currency": "USD", "customer_id": format!("c{i}"), "merchant_id": "m"});
                let _ = http.post(&ok_url).json(&body).send().await;
                let _ = http.post(&bad_url).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let error_q = r#"(sum(rate(http_requests_total{service="{service}",version="{version}",region="{region}",route="/payment",status=~"5.."}[15s])) or vector(0)) / sum(rate(http_requests_total{service="{service}",version="{version}",region="{region}",route="/payment"}[15s]))"#;
    let p99_q = r#"histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{service="{service}",version="{version}",region="{region}",route="/payment"}[15s])))"#;
    let svc = Proc::start(
        "deployment-system",
        &[
            ("PROMETHEUS_URL", prom.as_str()),
            ("PROMQL_ERROR_RATE", error_q),
            ("PROMQL_P99_SECONDS", p99_q),
        ],
    )
    .await
    .expect("start");
    let analysis =
        json!({"provider": "prometheus", "interval_secs": 0.5, "max_inconclusive_secs": 30});
    let mut good = request("api-service", "v2.0.0", 0.5);
    good["analysis"] = analysis.clone();
    let (_, d) = post(&http, &svc, "/deploy", &good).await;
    let d = wait_terminal(
        &http,
        &svc,
        d["deployment_id"].as_str().expect("id"),
        Duration::from_secs(45),
    )
    .await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    let measured = d["regions"][0]["analysis"]
        .as_array()
        .expect("a")
        .iter()
        .find(|a| a["result"] == "pass")
        .expect("a pass")
        .clone();
    assert_eq!(measured["provider"], "prometheus");
    assert_eq!(measured["error_rate"], 0.0);

    let mut bad = request("api-service", "v2.1.0", 0.5);
    bad["analysis"] = analysis;
    let (_, d) = post(&http, &svc, "/deploy", &bad).await;
    let d = wait_terminal(
        &http,
        &svc,
        d["deployment_id"].as_str().expect("id"),
        Duration::from_secs(45),
    )
    .await;
    assert_eq!(d["status"], "ROLLED_BACK", "{d}");
    let failed = d["events"]
        .as_array()
        .expect("e")
        .iter()
        .find(|e| e["kind"] == "gate_failed")
        .expect("gate_failed")
        .clone();
    assert!(
        failed["detail"]["error_rate"].as_f64().expect("rate") > 0.05,
        "{failed}"
    );
    load.abort();
}

#[tokio::test]
async fn a_controller_killed_mid_rollout_finishes_it_after_restart() {
    // on the embedded default: the rollout is in the SQLite file the restart opens again
    let http = client();
    let mut svc = Proc::start("deployment-system", &[]).await.expect("start");
    assert_eq!(
        get(&http, &svc, "/status").await["backends"]["state"],
        "sqlite"
    );
    assert_eq!(
        http.get(svc.url("/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        200
    );
    let (_, d) = post(
        &http,
        &svc,
        "/deploy",
        &request("api-service", "v2.0.0", 1.0),
    )
    .await;
    let id = d["deployment_id"].as_str().expect("id").to_owned();
    eventually(
        Duration::from_secs(10),
        "the canary stage to complete",
        || async {
            let d = get(&http, &svc, &format!("/deploy/{id}")).await;
            (d["regions"][0]["stages_completed"] == json!(["canary"])).then_some(())
        },
    )
    .await;
    assert_eq!(
        traffic(&http, &svc, "us-west-2", "api-service").await["canary_weight"],
        25
    );
    svc.kill(); // SIGKILL: no goodbye
    svc.restart().await.expect("restart");
    let d = wait_terminal(&http, &svc, &id, Duration::from_secs(20)).await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    assert_eq!(
        d["stages_completed"],
        json!(["validation", "canary", "staging", "prod"])
    );
    let starts = d["events"]
        .as_array()
        .expect("e")
        .iter()
        .filter(|e| e["kind"] == "stage_started" && e["stage"] == "canary")
        .count();
    assert_eq!(starts, 1, "resumed where it stood, not started over");
    assert_eq!(
        traffic(&http, &svc, "us-west-2", "api-service").await["stable"],
        "v2.0.0"
    );
    assert!(svc.log().contains("resuming deployment"));
}

#[tokio::test]
async fn fifty_concurrent_deployments_all_end() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let regions = ["us-west-2", "us-east-1", "eu-west-1"];
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let http = http.clone();
            let url = svc.url("/deploy");
            let (service, version) = if i % 5 == 0 { ("bad-service", "v1.0.0") } else { ("api-service", if i % 2 == 0 { "v2.0.0" } else { "v2.1.0" }) };
            let body = json!({"service": service, "version": version, "target_region": regions[i % 3],
                "stages": [{"name": "canary", "weight": 5, "bake_secs": 0.02}, {"name": "prod", "weight": 100, "bake_secs": 0.02}],
                "analysis": {"interval_secs": 0.01}});
            tokio::spawn(async move {
                let r = http.post(url).json(&body).send().await.expect("post");
                assert_eq!(r.status(), 202);
                r.json::<Value>().await.expect("json")["deployment_id"].as_str().expect("id").to_owned()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    // each lane (region, service) runs one at a time; a deploy still queued when a later one of
    // its service arrives is superseded by it, so every deploy ends, and the last of each lane
    // runs to its verdict
    let mut statuses = std::collections::BTreeMap::new();
    let mut ended = Vec::new();
    for id in &ids {
        let d = wait_terminal(&http, &svc, id, Duration::from_secs(60)).await;
        *statuses
            .entry((
                d["service"].as_str().unwrap_or("").to_owned(),
                d["status"].as_str().unwrap_or("").to_owned(),
            ))
            .or_insert(0) += 1;
        ended.push(d);
    }
    let count = |service: &str, status: &str| {
        statuses
            .get(&(service.to_owned(), status.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(statuses.values().sum::<i32>(), 50);
    assert_eq!(
        count("bad-service", "ROLLED_BACK") + count("bad-service", "SUPERSEDED"),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        count("api-service", "SUCCESS") + count("api-service", "SUPERSEDED"),
        40,
        "{statuses:?}"
    );
    assert!(count("bad-service", "ROLLED_BACK") >= 1 && count("api-service", "SUCCESS") >= 3);
    for d in ended.iter().filter(|d| d["status"] == "SUPERSEDED") {
        let by = d["superseded_by"].as_str().expect("superseded_by");
        let later = ended
            .iter()
            .find(|e| e["deployment_id"] == by)
            .expect("the superseding deployment is one of ours");
        assert!(
            later["seq"].as_u64() > d["seq"].as_u64(),
            "by a later deploy"
        );
        assert_eq!(later["service"], d["service"]);
        assert_eq!(
            d["regions"][0]["stages_completed"],
            json!([]),
            "never started"
        );
    }
    let listed = get(&http, &svc, "/deployments").await["deployments"]
        .as_array()
        .expect("l")
        .len();
    assert_eq!(listed, 50, "none lost");
}

/// Pushes `name:tag` to an OCI registry: one layer blob, one config blob, one manifest.
async fn push_image(http: &reqwest::Client, registry: &str, name: &str, tag: &str) {
    use sha2::{Digest, Sha256};
    let upload = |bytes: Vec<u8>| {
        let http = http.clone();
        let registry = registry.to_owned();
        let name = name.to_owned();
        async move {
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            let r = http
                .post(format!("{registry}/v2/{name}/blobs/uploads/"))
                .send()
                .await
                .expect("start upload");
            assert_eq!(r.status(), 202, "start upload");
            let location = r.headers()["location"]
                .to_str()
                .expect("location")
                .to_owned();
            let url = if location.starts_with("http") {
                location
            } else {
                format!("{registry}{location}")
            };
            let sep = if url.contains('?') { '&' } else { '?' };
            let r = http
                .put(format!("{url}{sep}digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(bytes.clone())
                .send()
                .await
                .expect("upload");
            assert_eq!(r.status(), 201, "blob upload");
            (digest, bytes.len())
        }
    };
    let (layer, layer_size) = upload(format!("layer of {name}:{tag}").into_bytes()).await;
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer]}});
    let (config_digest, config_size) = upload(config.to_string().into_bytes()).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer, "size": layer_size}],
    });
    let r = http
        .put(format!("{registry}/v2/{name}/manifests/{tag}"))
        .header(
            "content-type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .body(manifest.to_string())
        .send()
        .await
        .expect("manifest");
    assert_eq!(
        r.status(),
        201,
        "manifest push: {}",
        r.text().await.unwrap_or_default()
    );
}

#[tokio::test]
async fn the_image_check_asks_a_real_oci_registry() {
    let registry = backend("TAI_TEST_REGISTRY_URL");
    let http = client();
    let tag = unique("v3").replace('-', ".");
    push_image(&http, &registry, "api-service", &tag).await;
    let svc = Proc::start(
        "deployment-system",
        &[("IMAGE_REGISTRY_URL", registry.as_str())],
    )
    .await
    .expect("start");
    assert_eq!(
        get(&http, &svc, "/status").await["backends"]["registry"],
        "oci"
    );
    let (s, d) = post(
        &http,
        &svc,
        "/deploy?wait=true",
        &request("api-service", &tag, 0.05),
    )
    .await;
    assert_eq!((s, d["status"].as_str()), (200, Some("SUCCESS")), "{d}");
    assert!(
        d["image"]
            .as_str()
            .expect("image")
            .ends_with(&format!("/api-service:{tag}"))
    );
    let (s, d) = post(
        &http,
        &svc,
        "/deploy",
        &request("api-service", "v0.0.404", 0.05),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(d["reasons"][0]["code"], "image_not_found");
    // an explicit image on another repository is looked up as given
    let mut explicit = request("api-service", "v9.0.0", 0.05);
    explicit["image"] = json!(format!(
        "{}/api-service:{tag}",
        registry.trim_start_matches("http://")
    ));
    let (s, d) = post(&http, &svc, "/deploy?wait=true", &explicit).await;
    assert_eq!((s, d["status"].as_str()), (200, Some("SUCCESS")), "{d}");
}

#[tokio::test]
async fn every_transition_is_published_to_a_jetstream_stream() {
    use futures_util::StreamExt;
    let nats = backend("TAI_TEST_NATS_URL");
    let run = unique("audit");
    let stream_name = format!("DEPLOY_EVENTS_{run}");
    let prefix = format!("{run}.deploy.events");
    let http = client();
    let svc = Proc::start(
        "deployment-system",
        &[
            ("NATS_URL", nats.as_str()),
            ("AUDIT_STREAM", stream_name.as_str()),
            ("AUDIT_SUBJECT_PREFIX", prefix.as_str()),
        ],
    )
    .await
    .expect("start");
    let status = get(&http, &svc, "/status").await;
    assert_eq!(status["backends"]["audit"], "jetstream");
    let ready = get(&http, &svc, "/ready").await;
    assert_eq!(ready["checks"]["nats"], "ok", "{ready}");
    let (_, d) = post(
        &http,
        &svc,
        "/deploy?wait=true",
        &request("bad-service", "v1.0.0", 0.1),
    )
    .await;
    assert_eq!(d["status"], "ROLLED_BACK");
    let id = d["deployment_id"].as_str().expect("id");
    let kinds: Vec<String> = d["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect();

    let client = async_nats::connect(nats.as_str()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(&stream_name)
        .await
        .expect("the stream exists");
    // the controller publishes right after it stores: read until every event has arrived
    let published = eventually(Duration::from_secs(15), "every event in the stream", || {
        let (stream, subject, kinds) = (stream.clone(), format!("{prefix}.{id}"), kinds.clone());
        async move {
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::pull::Config {
                    filter_subject: subject,
                    ..Default::default()
                })
                .await
                .ok()?;
            let mut messages = consumer
                .fetch()
                .max_messages(200)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .ok()?;
            let mut published = Vec::new();
            while let Some(Ok(m)) = messages.next().await {
                let v: Value = serde_json::from_slice(&m.payload).expect("json event");
                assert_eq!(v["deployment_id"], id);
                published.push(v["event"]["kind"].as_str().unwrap_or("").to_owned());
            }
            (published.len() >= kinds.len()).then_some(published)
        }
    })
    .await;
    assert_eq!(published, kinds, "every event, in order, once");
    assert!(published.contains(&"gate_failed".to_owned()));
}

#[tokio::test]
async fn two_replicas_never_drive_one_rollout_and_a_standby_takes_over() {
    let redis = backend("TAI_TEST_REDIS_URL");
    let db = tai_blackbox::postgres_database();
    let prefix = format!("{}:", unique("dep-ha"));
    let http = client();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("CONTROLLER_LEASE_MS", "1000"),
    ];
    let mut first = Proc::start("deployment-system", &env)
        .await
        .expect("first replica");
    eventually(
        Duration::from_secs(5),
        "the first replica to take the lease",
        || async {
            first
                .log()
                .contains("took the controller lease")
                .then_some(())
        },
    )
    .await;
    let second = Proc::start("deployment-system", &env)
        .await
        .expect("second replica");
    // accepted by the standby, driven by the leader
    let (s, d) = post(
        &http,
        &second,
        "/deploy",
        &request("api-service", "v2.0.0", 0.8),
    )
    .await;
    assert_eq!(s, 202, "{d}");
    let id = d["deployment_id"].as_str().expect("id").to_owned();
    eventually(Duration::from_secs(10), "canary to complete", || async {
        let d = get(&http, &first, &format!("/deploy/{id}")).await;
        (d["regions"][0]["stages_completed"] == json!(["canary"])).then_some(())
    })
    .await;
    // an operator command sent to the standby is carried out by the lease holder
    let (s, body) = post(&http, &second, &format!("/deploy/{id}/pause"), &json!({})).await;
    assert_eq!((s, body["paused"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(
        get(&http, &first, &format!("/deploy/{id}")).await["paused"],
        true,
        "the leader holds it paused"
    );
    let (s, body) = post(&http, &second, &format!("/deploy/{id}/pause"), &json!({})).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("deployment_state_conflict")),
        "its refusals too"
    );
    let (s, _) = post(&http, &second, &format!("/deploy/{id}/resume"), &json!({})).await;
    assert_eq!(s, 200);
    first.kill(); // the leader dies mid-rollout; the standby takes the lease after it lapses
    let d = wait_terminal(&http, &second, &id, Duration::from_secs(20)).await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    let events = d["events"].as_array().expect("events");
    for stage in ["canary", "staging", "prod"] {
        let starts = events
            .iter()
            .filter(|e| e["kind"] == "stage_started" && e["stage"] == stage)
            .count();
        assert_eq!(starts, 1, "{stage} started once: one driver at a time");
    }
    assert!(second.log().contains("took the controller lease"));
}

#[tokio::test]
async fn a_failing_region_halts_continues_or_rolls_back_all_as_asked() {
    let http = client();
    let regions = ["us-west-2", "eu-west-1", "us-east-1"];
    // edge-service's new versions fail only in eu-west-1, the second region
    for (policy, want_status, want_regions, want_stable) in [
        (
            "halt",
            "ROLLED_BACK",
            ["SUCCESS", "ROLLED_BACK", "SKIPPED"],
            ["v3.1.0", "v3.0.0", "v3.0.0"],
        ),
        (
            "continue",
            "FAILED",
            ["SUCCESS", "ROLLED_BACK", "SUCCESS"],
            ["v3.1.0", "v3.0.0", "v3.1.0"],
        ),
        (
            "rollback_all",
            "ROLLED_BACK",
            ["ROLLED_BACK", "ROLLED_BACK", "SKIPPED"],
            ["v3.0.0", "v3.0.0", "v3.0.0"],
        ),
    ] {
        let svc = Proc::start("deployment-system", &[]).await.expect("start");
        let mut body = request("edge-service", "v3.1.0", 0.05);
        body["regions"] = json!(regions);
        body["on_region_failure"] = json!(policy);
        let (s, d) = post(&http, &svc, "/deploy?wait=true", &body).await;
        assert_eq!(
            (s, d["status"].as_str()),
            (200, Some(want_status)),
            "{policy}: {d}"
        );
        let got: Vec<&str> = d["regions"]
            .as_array()
            .expect("regions")
            .iter()
            .map(|r| r["status"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(got, want_regions, "{policy}");
        for (region, stable) in regions.iter().zip(want_stable) {
            let t = traffic(&http, &svc, region, "edge-service").await;
            assert_eq!(
                (t["stable"].as_str(), t["canary"].is_null()),
                (Some(stable), true),
                "{policy}: {region}"
            );
        }
    }
}
