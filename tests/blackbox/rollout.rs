//! deployment-system, from outside: rollbacks that end only when the platform serves stable,
//! fencing across replicas, the analysis contract (limits, errors, inconclusive, default
//! queries), measurements off the controller's loop, lanes, supersede, idempotency keys.
//!
//! Choices made where the contract leaves room (each is repeated where it matters):
//! - a deployment's `seq` is in every answer of `POST /deploy`, including a standby's;
//! - an HTTP probe is one GET per measurement;
//! - the top level of `GET /fleet` is what the controller last asked for, whether or not the
//!   platform accepted it (so during a traffic fault it already shows stable);
//! - "a paused deployment that has not started a region steps out of the line" is read per
//!   lane: a paused deployment waiting for a region it has not started leaves that region's line.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::deployment::{TERMINAL, get, post};
use tai_blackbox::{Proc, backend, client, eventually, postgres_database, unique};

fn two_stages(canary_bake: f64, prod_bake: f64) -> Value {
    json!([
        {"name": "canary", "weight": 5, "bake_secs": canary_bake},
        {"name": "prod", "weight": 100, "bake_secs": prod_bake},
    ])
}

fn three_stages(bake: f64) -> Value {
    json!([
        {"name": "canary", "weight": 5, "bake_secs": bake},
        {"name": "staging", "weight": 25, "bake_secs": bake},
        {"name": "prod", "weight": 100, "bake_secs": bake},
    ])
}

fn body(service: &str, version: &str, region: &str, stages: Value, analysis: Value) -> Value {
    json!({"service": service, "version": version, "target_region": region, "stages": stages, "analysis": analysis})
}

async fn post_keyed(http: &reqwest::Client, svc: &Proc, key: &str, body: &Value) -> (u16, Value) {
    let r = http
        .post(svc.url("/deploy"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// Starts a deployment (202); its id and the answer.
async fn deploy(http: &reqwest::Client, svc: &Proc, body: &Value) -> (String, Value) {
    let (s, d) = post(http, svc, "/deploy", body).await;
    assert_eq!(s, 202, "{body}: {d}");
    let id = d["deployment_id"]
        .as_str()
        .expect("deployment_id")
        .to_owned();
    (id, d)
}

async fn deployment(http: &reqwest::Client, svc: &Proc, id: &str) -> Value {
    get(http, svc, &format!("/deploy/{id}")).await
}

async fn wait_terminal(http: &reqwest::Client, svc: &Proc, id: &str, within: Duration) -> Value {
    eventually(within, &format!("{id} to end"), || async {
        let d = deployment(http, svc, id).await;
        TERMINAL
            .contains(&d["status"].as_str().unwrap_or(""))
            .then_some(d)
    })
    .await
}

async fn wait_status(
    http: &reqwest::Client,
    svc: &Proc,
    id: &str,
    status: &str,
    within: Duration,
) -> Value {
    eventually(within, &format!("{id} to be {status}"), || async {
        let d = deployment(http, svc, id).await;
        (d["status"] == status).then_some(d)
    })
    .await
}

/// `GET /fleet`'s entry for `service` in `region`: the asked-for traffic, with `observed`.
async fn traffic(http: &reqwest::Client, svc: &Proc, region: &str, service: &str) -> Value {
    get(http, svc, "/fleet").await["regions"][region][service].clone()
}

/// `t` (the top level or `observed`) sends all traffic to `stable`, none to a canary.
fn serves_only(t: &Value, stable: &str) -> bool {
    t["stable"] == stable && t["canary"].is_null() && t["canary_weight"] == 0
}

fn weight(t: &Value) -> u64 {
    t["canary_weight"].as_u64().unwrap_or(0)
}

/// Makes the simulated fleet's traffic changes fail for `secs` seconds.
async fn fault(http: &reqwest::Client, svc: &Proc, secs: u64) {
    let (s, d) = post(
        http,
        svc,
        "/fleet/faults",
        &json!({"fail_set_traffic_secs": secs}),
    )
    .await;
    assert_eq!(s, 200, "POST /fleet/faults: {d}");
}

/// `GET /status`'s `leases.controller`.
async fn lease(http: &reqwest::Client, svc: &Proc) -> Value {
    get(http, svc, "/status").await["leases"]["controller"].clone()
}

async fn role(http: &reqwest::Client, svc: &Proc) -> String {
    lease(http, svc).await["role"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Two replicas sharing PostgreSQL and Redis (lease 1 s): the first leads, the second stands by.
async fn two_replicas(http: &reqwest::Client, name: &str) -> (Proc, Proc) {
    let redis = backend("TAI_TEST_REDIS_URL");
    let db = postgres_database();
    let prefix = format!("{}:", unique(name));
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("CONTROLLER_LEASE_MS", "1000"),
    ];
    let a = Proc::start("deployment-system", &env)
        .await
        .expect("first replica");
    eventually(
        Duration::from_secs(10),
        "the first replica to lead",
        || async { (role(http, &a).await == "leader").then_some(()) },
    )
    .await;
    let b = Proc::start("deployment-system", &env)
        .await
        .expect("second replica");
    eventually(
        Duration::from_secs(10),
        "the second replica to stand by, naming the holder",
        || async {
            let l = lease(http, &b).await;
            (l["role"] == "standby" && l["holder"].is_string()).then_some(())
        },
    )
    .await;
    (a, b)
}

/// Sends a signal (`-STOP`, `-CONT`) to a running replica.
fn signal(p: &Proc, sig: &str) {
    let pid = p.pid().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, pid.as_str()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

fn events<'a>(d: &'a Value, kind: &str) -> Vec<&'a Value> {
    d["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// The results (`pass`, `fail`, `inconclusive`, `error`) of region `i`'s measurements, in order.
fn results(d: &Value, i: usize) -> Vec<String> {
    d["regions"][i]["analysis"]
        .as_array()
        .expect("analysis records")
        .iter()
        .map(|a| a["result"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn count(results: &[String], what: &str) -> usize {
    results.iter().filter(|r| *r == what).count()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// An RFC 3339 timestamp (`2026-01-25T10:30:00.123456Z`, or with a `+hh:mm` offset) as Unix ms.
fn unix_ms(s: &str) -> i64 {
    let (date, rest) = s.split_once('T').expect("an RFC 3339 timestamp");
    let ymd: Vec<i64> = date.split('-').map(|p| p.parse().expect("date")).collect();
    let (y, m, d) = (ymd[0], ymd[1], ymd[2]);
    let (time, offset_min) = match rest.strip_suffix('Z') {
        Some(t) => (t, 0),
        None => {
            let at = rest.rfind(['+', '-']).expect("a UTC offset");
            let (t, o) = rest.split_at(at);
            let (oh, om) = o[1..].split_once(':').expect("hh:mm");
            let minutes = oh.parse::<i64>().expect("hh") * 60 + om.parse::<i64>().expect("mm");
            (
                t,
                if o.starts_with('-') {
                    -minutes
                } else {
                    minutes
                },
            )
        }
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let hms: Vec<i64> = hms.split(':').map(|p| p.parse().expect("time")).collect();
    let millis: i64 = format!("{:0<3}", &frac[..frac.len().min(3)])
        .parse()
        .expect("fraction");
    // days from the civil date (H. Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    (days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2] - offset_min * 60) * 1000 + millis
}

/// Serves `app` on a free local port; the port.
async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A `/{service}/{region}/health` template for a server on `port`.
fn health_template(port: u16) -> String {
    format!("http://127.0.0.1:{port}/{{service}}/{{region}}/health")
}

/// Asserts `check` holds at every look over `window` (a "stays true" check, not a wait).
async fn holds_for<F, Fut>(window: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = Instant::now() + window;
    loop {
        if let Err(why) = check().await {
            panic!("{what} stopped holding: {why}");
        }
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One instant-query value from the test Prometheus, when it has a finite one.
async fn prom_scalar(http: &reqwest::Client, prom: &str, query: &str) -> Option<f64> {
    let body: Value = http
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["data"]["result"][0]["value"][1]
        .as_str()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

// ---- rollbacks end when the platform serves stable -----------------------------------------

/// bad-service's new versions fail their gate in the simulated fleet (config/fleet.toml): starts
/// one, waits until the platform serves its canary, makes traffic changes fail for `fault_secs`,
/// and waits until the deployment is ROLLING_BACK while the platform still serves the canary.
/// Its id and when (Unix ms, just before asking) the fault was set.
async fn a_rollback_held_up_by_a_fault(
    http: &reqwest::Client,
    svc: &Proc,
    fault_secs: u64,
) -> (String, i64) {
    // failure_limit 2 at 0.4 s: the gate fails at the third failed measurement, about 1.2 s
    // into the canary, which leaves time to set the fault first; the canary's bake is long, so
    // the failure limit is what ends it
    let (id, _) = deploy(
        http,
        svc,
        &body(
            "bad-service",
            "v1.0.0",
            "us-west-2",
            two_stages(10.0, 1.0),
            json!({"interval_secs": 0.4, "failure_limit": 2}),
        ),
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the platform to serve the canary",
        || async {
            let d = deployment(http, svc, &id).await;
            let t = traffic(http, svc, "us-west-2", "bad-service").await;
            (d["status"] == "IN_PROGRESS"
                && d["regions"][0]["status"] == "IN_PROGRESS"
                && t["observed"]["canary"] == "v1.0.0"
                && weight(&t["observed"]) > 0)
                .then_some(())
        },
    )
    .await;
    let fault_set = now_ms();
    fault(http, svc, fault_secs).await;

    let d = wait_status(http, svc, &id, "ROLLING_BACK", Duration::from_secs(5)).await;
    let t = traffic(http, svc, "us-west-2", "bad-service").await;
    assert_eq!(d["regions"][0]["status"], "ROLLING_BACK", "{d}");
    assert!(
        events(&d, "rolled_back").is_empty(),
        "not rolled back while the platform still serves the canary: {d}"
    );
    assert_eq!(events(&d, "gate_failed").len(), 1, "{d}");
    assert!(
        t["observed"]["canary"] == "v1.0.0" && weight(&t["observed"]) > 0,
        "the fault keeps the canary serving: {t}"
    );
    // assumption: the top level is what the controller asked for, even though the platform
    // refused it for now
    assert!(
        serves_only(&t, "v0.9.0"),
        "the controller asks for stable only: {t}"
    );
    (id, fault_set)
}

/// The deployment ended ROLLED_BACK with the platform serving only stable, its `rolled_back`
/// event no earlier than the fault's end.
async fn assert_rolled_back_after(
    http: &reqwest::Client,
    svc: &Proc,
    d: &Value,
    fault_set: i64,
    fault_secs: u64,
) {
    assert_eq!(d["status"], "ROLLED_BACK", "{d}");
    assert_eq!(d["regions"][0]["status"], "ROLLED_BACK", "{d}");
    let t = traffic(http, svc, "us-west-2", "bad-service").await;
    assert!(serves_only(&t["observed"], "v0.9.0"), "observed: {t}");
    assert!(serves_only(&t, "v0.9.0"), "asked for: {t}");
    let back = events(d, "rolled_back");
    assert_eq!(back.len(), 1, "{d}");
    let back_at = unix_ms(back[0]["at"].as_str().expect("at"));
    assert!(back_at > fault_set, "rolled back after the fault was set");
    // 250 ms of slack for how finely the store keeps the fault's deadline
    assert!(
        back_at >= fault_set + fault_secs as i64 * 1000 - 250,
        "rolled_back at {} came {} ms after the fault was set, before it lapsed",
        back[0]["at"],
        back_at - fault_set
    );
    let gate = events(d, "gate_failed");
    assert_eq!(gate.len(), 1, "{d}");
    let gate_at = unix_ms(gate[0]["at"].as_str().expect("at"));
    let secs = back[0]["detail"]["seconds_from_failed_gate"]
        .as_f64()
        .expect("seconds_from_failed_gate");
    assert!(
        secs >= (back_at - gate_at) as f64 / 1000.0 - 0.25,
        "seconds_from_failed_gate ({secs}) runs to when the platform served stable ({} ms)",
        back_at - gate_at
    );
}

#[tokio::test]
async fn a_rollback_ends_only_once_the_platform_serves_stable() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let (id, fault_set) = a_rollback_held_up_by_a_fault(&http, &svc, 3).await;
    let d = wait_terminal(&http, &svc, &id, Duration::from_secs(15)).await;
    assert_rolled_back_after(&http, &svc, &d, fault_set, 3).await;
    // failure_limit 2: the third failed measurement failed the stage, and measuring stopped
    assert_eq!(count(&results(&d, 0), "fail"), 3, "{d}");
}

#[tokio::test]
async fn a_controller_killed_mid_rollback_finishes_it_after_restart() {
    let http = client();
    let mut svc = Proc::start("deployment-system", &[]).await.expect("start");
    let (id, fault_set) = a_rollback_held_up_by_a_fault(&http, &svc, 4).await;
    svc.kill(); // SIGKILL mid-rollback: the fault is in the store and outlives the process
    svc.restart().await.expect("restart");
    let d = wait_terminal(&http, &svc, &id, Duration::from_secs(20)).await;
    assert_rolled_back_after(&http, &svc, &d, fault_set, 4).await;
}

// ---- fencing ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_deposed_leader_cannot_undo_the_new_leaders_abort() {
    let http = client();
    let (a, b) = two_replicas(&http, "dep-fence").await;
    let (old, new) = if role(&http, &a).await == "leader" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let old_lease = lease(&http, old).await;
    assert_eq!(old_lease["role"], "leader", "{old_lease}");
    assert_eq!(
        lease(&http, new).await["holder"],
        old_lease["holder"],
        "both replicas name one holder"
    );
    let old_token = old_lease["token"].as_u64().expect("a fencing token");

    let (id, _) = deploy(
        &http,
        old,
        &body(
            "api-service",
            "v2.0.0",
            "us-west-2",
            two_stages(30.0, 30.0),
            json!({"interval_secs": 0.3}),
        ),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the platform to serve the canary",
        || async {
            let t = traffic(&http, new, "us-west-2", "api-service").await;
            (t["observed"]["canary"] == "v2.0.0" && weight(&t["observed"]) == 5).then_some(())
        },
    )
    .await;

    // the leader freezes (a long GC pause, a stopped VM): its lease lapses, the other takes it
    signal(old, "-STOP");
    let new_lease = eventually(
        Duration::from_secs(15),
        "the other replica to take the lease",
        || async {
            let l = lease(&http, new).await;
            (l["role"] == "leader").then_some(l)
        },
    )
    .await;
    assert!(
        new_lease["token"].as_u64().expect("token") > old_token,
        "a new holder gets a higher fencing token: {old_lease} then {new_lease}"
    );
    assert_ne!(new_lease["holder"], old_lease["holder"]);

    let (s, d) = post(&http, new, &format!("/deploy/{id}/abort"), &json!({})).await;
    assert_eq!(s, 200, "{d}");
    assert!(
        ["ABORTING", "ABORTED"].contains(&d["status"].as_str().unwrap_or("")),
        "{d}"
    );
    let d = wait_terminal(&http, new, &id, Duration::from_secs(15)).await;
    assert_eq!(d["status"], "ABORTED", "{d}");
    assert_eq!(d["regions"][0]["status"], "ABORTED", "{d}");
    let t = traffic(&http, new, "us-west-2", "api-service").await;
    assert!(serves_only(&t["observed"], "v1.9.0"), "{t}");

    // the old leader wakes up believing it still leads, with the canary stage in its memory
    signal(old, "-CONT");
    eventually(
        Duration::from_secs(10),
        "the deposed leader to stand by",
        || async { (role(&http, old).await == "standby").then_some(()) },
    )
    .await;
    holds_for(
        Duration::from_secs(2),
        "the abort, on both replicas",
        || async {
            for (name, replica) in [("deposed", old), ("new", new)] {
                let t = traffic(&http, replica, "us-west-2", "api-service").await;
                if !serves_only(&t["observed"], "v1.9.0") || !serves_only(&t, "v1.9.0") {
                    return Err(format!("the {name} leader's /fleet shows {t}"));
                }
            }
            Ok(())
        },
    )
    .await;
    for replica in [old, new] {
        let t = traffic(&http, replica, "us-west-2", "api-service").await;
        assert!(serves_only(&t["observed"], "v1.9.0"), "{t}");
        let d = deployment(&http, replica, &id).await;
        assert_eq!(d["status"], "ABORTED", "{d}");
        let all = d["events"].as_array().expect("events");
        let aborted = all
            .iter()
            .position(|e| e["kind"] == "aborted")
            .expect("an aborted event");
        assert!(
            all[aborted..].iter().all(|e| ![
                "region_started",
                "stage_started",
                "stage_completed",
                "region_succeeded",
                "succeeded"
            ]
            .contains(&e["kind"].as_str().unwrap_or(""))),
            "nothing drove the rollout after the abort: {d}"
        );
    }
}

// ---- analysis: Prometheus --------------------------------------------------------------------

#[tokio::test]
async fn a_healthy_canary_with_zero_errors_passes_the_default_queries() {
    let prom = backend("TAI_TEST_PROMETHEUS_URL");
    let http = client();
    // a tiny exporter standing in for api-service v2.1.0 in eu-west-1 (labels no other test
    // uses): 500 requests a second, all 2xx (no 5xx series at all), 90% under 50 ms, all under
    // 100 ms; the counters grow, so increase() and rate() see traffic
    let started = Instant::now();
    let exporter = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            let n = 1000 + started.elapsed().as_millis() as u64 / 2;
            let fast = n * 9 / 10;
            let sum = n as f64 * 0.04;
            let labels = r#"route="/api",method="GET""#;
            let text = format!(
                "# HELP http_requests_total Requests served.\n\
                 # TYPE http_requests_total counter\n\
                 http_requests_total{{{labels},status=\"200\"}} {n}\n\
                 # HELP http_request_duration_seconds Request latency.\n\
                 # TYPE http_request_duration_seconds histogram\n\
                 http_request_duration_seconds_bucket{{{labels},le=\"0.05\"}} {fast}\n\
                 http_request_duration_seconds_bucket{{{labels},le=\"0.1\"}} {n}\n\
                 http_request_duration_seconds_bucket{{{labels},le=\"0.25\"}} {n}\n\
                 http_request_duration_seconds_bucket{{{labels},le=\"1\"}} {n}\n\
                 http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {n}\n\
                 http_request_duration_seconds_sum{{{labels}}} {sum}\n\
                 http_request_duration_seconds_count{{{labels}}} {n}\n"
            );
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                text,
            )
        }),
    );
    let port = serve(exporter).await;
    let run = unique("promdefault");
    let targets = json!([
        {"targets": [format!("127.0.0.1:{port}")], "labels": {"service": "api-service", "version": "v2.1.0", "region": "eu-west-1", "tai_test": run}},
    ]);
    let _registered = tai_blackbox::ScrapeTargets::register(&run, &targets);
    // wait until Prometheus has scraped enough for the default queries to see the traffic
    let sel = r#"service="api-service",version="v2.1.0",region="eu-west-1""#;
    let requests_q = format!("sum(increase(http_requests_total{{{sel}}}[1m]))");
    let p99_q = format!(
        "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{{sel}}}[1m])))"
    );
    eventually(
        Duration::from_secs(30),
        "Prometheus to scrape the exporter",
        || async {
            let requests = prom_scalar(&http, &prom, &requests_q).await?;
            let p99 = prom_scalar(&http, &prom, &p99_q).await?;
            (requests >= 200.0 && p99 > 0.0).then_some(())
        },
    )
    .await;

    let svc = Proc::start("deployment-system", &[("PROMETHEUS_URL", prom.as_str())])
        .await
        .expect("start");
    // no `queries`: the defaults
    let (id, _) = deploy(
        &http,
        &svc,
        &body(
            "api-service",
            "v2.1.0",
            "eu-west-1",
            three_stages(1.0),
            json!({"provider": "prometheus", "interval_secs": 0.5}),
        ),
    )
    .await;
    let d = wait_terminal(&http, &svc, &id, Duration::from_secs(30)).await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    let records = d["regions"][0]["analysis"].as_array().expect("analysis");
    assert!(records.len() >= 3, "{d}");
    for a in records {
        assert_eq!(a["result"], "pass", "{a}");
        assert_eq!(a["provider"], "prometheus", "{a}");
        assert_eq!(
            a["error_rate"].as_f64(),
            Some(0.0),
            "no 5xx series is a 0 error rate, not no data: {a}"
        );
        assert!(
            a["samples"].as_f64().expect("samples") >= 50.0,
            "the default requests query counts the traffic: {a}"
        );
        let p99 = a["p99_ms"].as_f64().expect("p99_ms");
        assert!(
            p99 > 50.0 && p99 <= 100.0,
            "p99 in milliseconds (about 95): {a}"
        );
    }
}

#[tokio::test]
async fn a_canary_with_no_traffic_is_inconclusive_not_passed() {
    let prom = backend("TAI_TEST_PROMETHEUS_URL");
    let http = client();
    // nothing in Prometheus for these versions: no test registers them
    for (service, version) in [("edge-service", "v3.1.0"), ("bad-service", "v1.1.0")] {
        let q = format!(
            "count(http_requests_total{{service=\"{service}\",version=\"{version}\",region=\"us-east-1\"}})"
        );
        assert_eq!(prom_scalar(&http, &prom, &q).await, None, "{q}");
    }
    let svc = Proc::start("deployment-system", &[("PROMETHEUS_URL", prom.as_str())])
        .await
        .expect("start");
    // two services, so two lanes: they run side by side
    let (rolled, _) = deploy(
        &http,
        &svc,
        &body(
            "edge-service",
            "v3.1.0",
            "us-east-1",
            two_stages(10.0, 0.5),
            json!({"provider": "prometheus", "interval_secs": 0.2, "inconclusive_limit": 3, "on_inconclusive": "rollback"}),
        ),
    )
    .await;
    let (paused, _) = deploy(
        &http,
        &svc,
        &body(
            "bad-service",
            "v1.1.0",
            "us-east-1",
            two_stages(10.0, 0.5),
            json!({"provider": "prometheus", "interval_secs": 0.2, "inconclusive_limit": 3, "on_inconclusive": "pause"}),
        ),
    )
    .await;

    let d = wait_terminal(&http, &svc, &rolled, Duration::from_secs(15)).await;
    assert_eq!(
        d["status"], "ROLLED_BACK",
        "no traffic is never a pass: {d}"
    );
    let r = results(&d, 0);
    assert!(
        r.len() > 3 && r.iter().all(|x| x == "inconclusive"),
        "more than inconclusive_limit inconclusive measurements, nothing else: {r:?}"
    );
    for a in d["regions"][0]["analysis"].as_array().expect("analysis") {
        // assumption: no series at all counts as 0 samples
        assert!(
            a["detail"]
                .as_str()
                .unwrap_or("")
                .contains("too few samples (0 < 50)"),
            "{a}"
        );
    }
    let gate = events(&d, "gate_failed");
    assert_eq!(gate.len(), 1, "{d}");
    assert!(
        gate[0]["detail"].to_string().contains("too few samples"),
        "{}",
        gate[0]
    );
    let t = traffic(&http, &svc, "us-east-1", "edge-service").await;
    assert!(serves_only(&t["observed"], "v3.0.0"), "{t}");

    let d = eventually(
        Duration::from_secs(15),
        "the gate to pause the other deployment",
        || async {
            let d = deployment(&http, &svc, &paused).await;
            (d["paused"] == true).then_some(d)
        },
    )
    .await;
    assert_eq!(d["status"], "IN_PROGRESS", "paused, not ended: {d}");
    assert_eq!(d["regions"][0]["status"], "IN_PROGRESS", "{d}");
    let by_gate = events(&d, "paused");
    assert_eq!(by_gate.len(), 1, "{d}");
    assert_eq!(by_gate[0]["detail"]["by"], "gate", "{d}");
    assert!(events(&d, "gate_failed").is_empty(), "{d}");
    let r = results(&d, 0);
    assert!(
        r.len() > 3 && r.iter().all(|x| x == "inconclusive"),
        "{r:?}"
    );
    let t = traffic(&http, &svc, "us-east-1", "bad-service").await;
    assert_eq!(
        t["observed"]["canary"], "v1.1.0",
        "a paused canary keeps its traffic: {t}"
    );
}

#[tokio::test]
async fn a_query_prometheus_cannot_parse_is_refused_naming_it() {
    let prom = backend("TAI_TEST_PROMETHEUS_URL");
    let http = client();
    let svc = Proc::start("deployment-system", &[("PROMETHEUS_URL", prom.as_str())])
        .await
        .expect("start");
    let unbalanced = r#"sum(rate(http_requests_total{service="{service}"}[1m])"#;
    for (which, dry_run) in [
        ("error_rate", false),
        ("error_rate", true),
        ("p99_ms", false),
        ("requests", true),
    ] {
        let mut queries = serde_json::Map::new();
        queries.insert(which.to_owned(), json!(unbalanced));
        let mut b = body(
            "api-service",
            "v2.0.0",
            "us-west-2",
            two_stages(0.5, 0.5),
            json!({"provider": "prometheus", "interval_secs": 0.5, "queries": queries}),
        );
        b["dry_run"] = json!(dry_run);
        let (s, d) = post(&http, &svc, "/deploy", &b).await;
        assert_eq!(s, 422, "{which} (dry_run {dry_run}): {d}");
        assert_eq!(
            d["error"]["param"],
            format!("analysis[queries][{which}]"),
            "{d}"
        );
    }
    let list = get(&http, &svc, "/deployments").await;
    assert!(
        list["deployments"]
            .as_array()
            .expect("list")
            .iter()
            .all(|d| d["status"] == "REJECTED"),
        "nothing rolled out: {list}"
    );
}

// ---- analysis: HTTP probes -------------------------------------------------------------------

#[tokio::test]
async fn a_probe_that_fails_three_times_then_recovers_is_not_rolled_back() {
    let http = client();
    // api-service's probe answers 500 three times, then 200; edge-service's always 500
    let flaky = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/{service}/{region}/health",
            axum::routing::get(
                |State((flaky, down)): State<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
                 Path((service, _region)): Path<(String, String)>| async move {
                    if service == "api-service" {
                        if flaky.fetch_add(1, Ordering::SeqCst) < 3 {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            StatusCode::OK
                        }
                    } else {
                        down.fetch_add(1, Ordering::SeqCst);
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                },
            ),
        )
        .with_state((flaky.clone(), down.clone()));
    let template = health_template(serve(app).await);
    let svc = Proc::start(
        "deployment-system",
        &[("HEALTH_URL_TEMPLATE", template.as_str())],
    )
    .await
    .expect("start");
    let analysis = json!({"provider": "http", "interval_secs": 0.2});
    // the canary bakes long enough for three errors and then passes (or five errors)
    let (recovers, _) = deploy(
        &http,
        &svc,
        &body(
            "api-service",
            "v2.0.0",
            "us-west-2",
            two_stages(1.5, 0.5),
            analysis.clone(),
        ),
    )
    .await;
    let (never, _) = deploy(
        &http,
        &svc,
        &body(
            "edge-service",
            "v3.1.0",
            "us-east-1",
            two_stages(5.0, 0.5),
            analysis,
        ),
    )
    .await;

    let d = wait_terminal(&http, &svc, &recovers, Duration::from_secs(20)).await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    let r = results(&d, 0);
    // assumption: one GET per measurement, so the three 500s are the first three records
    assert_eq!(count(&r, "error"), 3, "{r:?}");
    assert_eq!(r[..3], ["error", "error", "error"], "{r:?}");
    assert!(r[3..].iter().all(|x| x == "pass"), "{r:?}");
    assert_eq!(d["regions"][0]["analysis"][0]["provider"], "http");
    assert!(events(&d, "gate_failed").is_empty(), "{d}");

    let d = wait_terminal(&http, &svc, &never, Duration::from_secs(20)).await;
    assert_eq!(d["status"], "ROLLED_BACK", "{d}");
    let r = results(&d, 0);
    assert_eq!(
        r,
        vec!["error"; 5],
        "consecutive_error_limit 4: the fifth error in a row fails the stage"
    );
    assert_eq!(events(&d, "gate_failed").len(), 1, "{d}");
    assert_eq!(down.load(Ordering::SeqCst), 5, "one probe per measurement");
    let t = traffic(&http, &svc, "us-east-1", "edge-service").await;
    assert!(serves_only(&t["observed"], "v3.0.0"), "{t}");
}

#[tokio::test]
async fn a_hanging_provider_delays_nothing_else() {
    let http = client();
    // the health endpoint takes the request and never answers
    let hung = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/{service}/{region}/health",
            axum::routing::get(|State(seen): State<Arc<AtomicUsize>>| async move {
                seen.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
                StatusCode::OK
            }),
        )
        .with_state(hung.clone());
    let template = health_template(serve(app).await);
    let svc = Proc::start(
        "deployment-system",
        &[
            ("HEALTH_URL_TEMPLATE", template.as_str()),
            ("ANALYSIS_TIMEOUT_MS", "20000"),
        ],
    )
    .await
    .expect("start");
    let (a, _) = deploy(
        &http,
        &svc,
        &body(
            "api-service",
            "v2.0.0",
            "us-west-2",
            two_stages(1.0, 0.5),
            json!({"provider": "http", "interval_secs": 0.2}),
        ),
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "A's first probe to hang",
        || async { (hung.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;

    let posted = Instant::now();
    let (b, _) = deploy(
        &http,
        &svc,
        &body(
            "edge-service",
            "v3.1.0",
            "us-east-1",
            two_stages(0.3, 0.3),
            json!({"provider": "sim", "interval_secs": 0.1}),
        ),
    )
    .await;
    let d = wait_terminal(&http, &svc, &b, Duration::from_secs(10)).await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    assert!(
        posted.elapsed() < Duration::from_secs(10),
        "B took {:?}, waiting on A's 20 s probe",
        posted.elapsed()
    );
    assert_eq!(
        deployment(&http, &svc, &a).await["status"],
        "IN_PROGRESS",
        "A is still waiting for its measurement"
    );

    let asked = Instant::now();
    let (s, d) = post(&http, &svc, &format!("/deploy/{a}/abort"), &json!({})).await;
    let took = asked.elapsed();
    assert_eq!(s, 200, "{d}");
    assert!(
        took < Duration::from_secs(1),
        "abort answered in {took:?} while A's probe hangs"
    );
    let d = wait_terminal(&http, &svc, &a, Duration::from_secs(10)).await;
    assert_eq!(d["status"], "ABORTED", "{d}");
    let t = traffic(&http, &svc, "us-west-2", "api-service").await;
    assert!(serves_only(&t["observed"], "v1.9.0"), "{t}");
}

// ---- lanes -----------------------------------------------------------------------------------

#[tokio::test]
async fn lanes_keep_one_order_across_replicas_and_step_aside_when_paused() {
    let http = client();
    let (a, b) = two_replicas(&http, "dep-lanes").await;
    // requests alternate between the replicas; reads go to `a`
    let long = two_stages(30.0, 0.3);
    let short = two_stages(0.3, 0.3);
    let sim = json!({"interval_secs": 0.1});
    let queue_position = |d: &Value, i: usize| d["regions"][i]["queue_position"].clone();
    let mut seqs = Vec::new();

    // 1. supersede, in the lane (eu-west-1, api-service): d1 runs, d2 waits; d3 replaces d2,
    //    d4 replaces d3; each time the newcomer is first in line
    let (d1, doc) = deploy(
        &http,
        &a,
        &body(
            "api-service",
            "v2.0.0",
            "eu-west-1",
            long.clone(),
            sim.clone(),
        ),
    )
    .await;
    seqs.push(doc["seq"].clone());
    wait_status(&http, &a, &d1, "IN_PROGRESS", Duration::from_secs(10)).await;
    let mut queued: Vec<String> = Vec::new();
    for (i, (replica, version)) in [(&b, "v2.1.0"), (&a, "v2.0.0"), (&b, "v2.1.0")]
        .into_iter()
        .enumerate()
    {
        let (id, doc) = deploy(
            &http,
            replica,
            &body(
                "api-service",
                version,
                "eu-west-1",
                short.clone(),
                sim.clone(),
            ),
        )
        .await;
        seqs.push(doc["seq"].clone());
        eventually(
            Duration::from_secs(10),
            "the newest to be first in line",
            || async {
                let d = deployment(&http, &a, &id).await;
                (d["status"] == "PENDING" && queue_position(&d, 0) == 1).then_some(())
            },
        )
        .await;
        if i > 0 {
            let before = queued[i - 1].as_str();
            let d = wait_status(&http, &a, before, "SUPERSEDED", Duration::from_secs(10)).await;
            let by = events(&d, "superseded");
            assert_eq!(by.len(), 1, "{d}");
            assert_eq!(by[0]["detail"]["by"], id.as_str(), "{d}");
            assert!(queue_position(&d, 0).is_null(), "out of the line: {d}");
        }
        queued.push(id);
    }
    assert_eq!(
        deployment(&http, &a, &d1).await["status"],
        "IN_PROGRESS",
        "a running deployment is never superseded"
    );

    // 2. a paused deployment waiting for a region steps out of that region's line. It must have
    //    started another region first: a later deploy of the service in the same region would
    //    supersede a deployment that never started, so only one that has started can have
    //    someone behind it. x runs in us-west-2; p finishes us-east-1, then waits for us-west-2;
    //    q (later, us-west-2 only) waits behind p and does not supersede it (p has started).
    let (x, doc) = deploy(
        &http,
        &b,
        &body(
            "api-service",
            "v2.0.0",
            "us-west-2",
            long.clone(),
            sim.clone(),
        ),
    )
    .await;
    seqs.push(doc["seq"].clone());
    wait_status(&http, &a, &x, "IN_PROGRESS", Duration::from_secs(10)).await;
    let (p, doc) = deploy(
        &http,
        &a,
        &json!({"service": "api-service", "version": "v2.1.0", "regions": ["us-east-1", "us-west-2"],
                "stages": short, "analysis": sim}),
    )
    .await;
    seqs.push(doc["seq"].clone());
    eventually(
        Duration::from_secs(10),
        "p to finish us-east-1 and wait for us-west-2",
        || async {
            let d = deployment(&http, &a, &p).await;
            (d["regions"][0]["status"] == "SUCCESS" && queue_position(&d, 1) == 1).then_some(())
        },
    )
    .await;
    let (q, doc) = deploy(
        &http,
        &b,
        &body(
            "api-service",
            "v2.0.0",
            "us-west-2",
            short.clone(),
            sim.clone(),
        ),
    )
    .await;
    seqs.push(doc["seq"].clone());
    eventually(Duration::from_secs(10), "q to wait behind p", || async {
        let d = deployment(&http, &a, &q).await;
        (d["status"] == "PENDING" && queue_position(&d, 0) == 2).then_some(())
    })
    .await;
    let dp = deployment(&http, &a, &p).await;
    assert!(
        !TERMINAL.contains(&dp["status"].as_str().unwrap_or("")),
        "p has started a region, so q does not supersede it: {dp}"
    );
    let (s, dp) = post(&http, &b, &format!("/deploy/{p}/pause"), &json!({})).await;
    assert_eq!((s, dp["paused"].as_bool()), (200, Some(true)), "{dp}");
    eventually(
        Duration::from_secs(10),
        "paused p to step out of us-west-2's line",
        || async {
            let (dp, dq) = (
                deployment(&http, &a, &p).await,
                deployment(&http, &a, &q).await,
            );
            (queue_position(&dp, 1).is_null() && queue_position(&dq, 0) == 1).then_some(())
        },
    )
    .await;
    let (s, d) = post(&http, &a, &format!("/deploy/{x}/abort"), &json!({})).await;
    assert_eq!(s, 200, "{d}");
    let dq = wait_terminal(&http, &a, &q, Duration::from_secs(15)).await;
    assert_eq!(dq["status"], "SUCCESS", "q went ahead of paused p: {dq}");
    let dp = deployment(&http, &a, &p).await;
    assert_eq!(dp["paused"], true, "{dp}");
    assert_eq!(dp["regions"][1]["status"], "PENDING", "{dp}");
    assert!(dp["regions"][1]["started_at"].is_null(), "{dp}");
    let (s, d) = post(&http, &a, &format!("/deploy/{p}/resume"), &json!({})).await;
    assert_eq!(s, 200, "{d}");
    let dp = wait_terminal(&http, &a, &p, Duration::from_secs(15)).await;
    assert_eq!(dp["status"], "SUCCESS", "{dp}");
    assert!(
        unix_ms(dp["regions"][1]["started_at"].as_str().expect("started"))
            >= unix_ms(dq["regions"][0]["finished_at"].as_str().expect("finished")),
        "one rollout at a time in the lane"
    );

    // 3. one order across both replicas: seq strictly increasing in submission order
    let seqs: Vec<u64> = seqs
        .iter()
        .map(|s| s.as_u64().expect("every answer has its seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq follows submission order across replicas: {seqs:?}"
    );
}

// ---- idempotency -----------------------------------------------------------------------------

#[tokio::test]
async fn deploy_takes_an_idempotency_key() {
    let http = client();
    let svc = Proc::start("deployment-system", &[]).await.expect("start");
    let key = unique("deploy-key");
    let first = body(
        "api-service",
        "v2.0.0",
        "us-west-2",
        two_stages(5.0, 0.5),
        json!({"interval_secs": 0.5}),
    );
    let (s, d) = post_keyed(&http, &svc, &key, &first).await;
    assert_eq!(s, 202, "{d}");
    let id = d["deployment_id"].as_str().expect("id").to_owned();

    let (s, again) = post_keyed(&http, &svc, &key, &first).await;
    assert!(s == 200 || s == 202, "{s}: {again}");
    assert_eq!(again["deployment_id"], id.as_str(), "the same deployment");

    let mut other = first.clone();
    other["version"] = json!("v2.1.0");
    let (s, refused) = post_keyed(&http, &svc, &key, &other).await;
    assert_eq!(
        (s, refused["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{refused}"
    );

    let list = get(&http, &svc, "/deployments").await;
    let all = list["deployments"].as_array().expect("list");
    assert_eq!(all.len(), 1, "one deployment: {list}");
    assert_eq!(all[0]["deployment_id"], id.as_str());
}
