//! The `proc` platform, from outside: the deployment service drives real demo-service processes
//! behind a real HAProxy per region, and the tests count which version answers real requests
//! sent to each region's `listen` address.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tai_blackbox::{Proc, bin_dir, client, eventually, free_port, get_json, log_dir, unique};

use crate::deployment::{get, post};

/// A platform file, its state folder, and the service running on it. Dropping it kills every
/// process whose command line names its folder (HAProxy, instances), pass or fail.
struct Rig {
    dir: PathBuf,
    svc: Proc,
    listen: BTreeMap<String, String>,
}

/// Versions of `api-service` every rig has: v1 (stable) and v2 healthy, v3 answering 500 to
/// `v3_error_rate` of its requests in `v3_fail_regions` (all when empty).
struct Spec<'a> {
    regions: &'a [&'a str],
    scale_down_secs: f64,
    stop_on_exit: bool,
    v3_error_rate: f64,
    v3_fail_regions: &'a str,
    env: &'a [(&'a str, &'a str)],
    max_instances: Option<u32>,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Self {
            regions: &["us-west-2"],
            scale_down_secs: 1.0,
            stop_on_exit: true,
            v3_error_rate: 0.0,
            v3_fail_regions: "",
            env: &[],
            max_instances: None,
        }
    }
}

fn platform_file(dir: &Path, spec: &Spec) -> (String, BTreeMap<String, String>) {
    let bin = bin_dir().join("demo-service");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        bin.display()
    );
    let mut listen = BTreeMap::new();
    let mut text = format!("state_dir = \"{}\"\n", dir.join("state").display());
    for r in spec.regions {
        let addr = format!("127.0.0.1:{}", free_port());
        text.push_str(&format!("[regions.{r}]\nlisten = \"{addr}\"\n"));
        if let Some(m) = spec.max_instances {
            text.push_str(&format!("max_instances = {m}\n"));
        }
        listen.insert((*r).to_owned(), addr);
    }
    text.push_str(&format!(
        "[services.api-service]\nstable = \"v1\"\ninstances = 2\nscale_down_delay_secs = {}\n",
        spec.scale_down_secs
    ));
    for v in ["v1", "v2", "v3"] {
        text.push_str(&format!(
            "[services.api-service.versions.{v}]\ncommand = [\"{}\", \"--port\", \"{{port}}\", \"--app-version\", \"{{version}}\", \"--region\", \"{{region}}\", \"--tag\", \"{}\"]\n",
            bin.display(),
            dir.display()
        ));
        if v == "v3" {
            text.push_str(&format!(
                "env = {{ ERROR_RATE = \"{}\", FAIL_REGIONS = \"{}\" }}\n",
                spec.v3_error_rate, spec.v3_fail_regions
            ));
        }
    }
    (text, listen)
}

impl Rig {
    async fn start(spec: Spec<'_>) -> Self {
        let dir = log_dir().join(unique("platform"));
        std::fs::create_dir_all(&dir).expect("rig dir");
        let (text, listen) = platform_file(&dir, &spec);
        let file = dir.join("platform.toml");
        std::fs::write(&file, text).expect("platform file");
        let file_s = file.display().to_string();
        let stop = spec.stop_on_exit.to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("PLATFORM", "proc"),
            ("PLATFORM_FILE", &file_s),
            ("PLATFORM_STOP_ON_EXIT", &stop),
        ];
        env.extend_from_slice(spec.env);
        let svc = Proc::start("deployment-system", &env)
            .await
            .expect("deployment-system on proc starts");
        let rig = Self { dir, svc, listen };
        rig.wait_ready().await;
        rig
    }

    async fn wait_ready(&self) {
        let http = client();
        eventually(
            Duration::from_secs(20),
            "every region serving its stable version",
            || async {
                let r = http.get(self.svc.url("/ready")).send().await.ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await;
    }

    fn url(&self, region: &str) -> String {
        format!("http://{}/", self.listen[region])
    }

    /// Processes still running whose command line names this rig's folder.
    fn processes(&self) -> Vec<(u32, String)> {
        let needle = self.dir.display().to_string();
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if !alive(pid) {
                continue;
            }
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(&needle) {
                out.push((pid, cmd));
            }
        }
        out
    }

    async fn lane(&self, region: &str) -> Value {
        let http = client();
        get(&http, &self.svc, "/fleet").await["regions"][region]["services"]["api-service"].clone()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.svc.kill();
        for (pid, _) in self.processes() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// One answer through HAProxy: the version and pid that served it, or what went wrong.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    version: String,
    pid: u64,
}

async fn ask(http: &reqwest::Client, url: &str) -> Result<Answer, String> {
    let r = http.get(url).send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Ok(Answer {
        status,
        version: body["version"].as_str().unwrap_or("?").to_owned(),
        pid: body["pid"].as_u64().unwrap_or(0),
    })
}

/// Sends `n` requests one after the other; how many each version served, and the failures.
async fn shares(url: &str, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let http = client();
    let mut by = BTreeMap::new();
    let mut failed = Vec::new();
    for _ in 0..n {
        match ask(&http, url).await {
            Ok(a) if a.status == 200 => *by.entry(a.version).or_insert(0) += 1,
            Ok(a) => failed.push(format!("{} from {}", a.status, a.version)),
            Err(e) => failed.push(e),
        }
    }
    (by, failed)
}

/// Sends `n` requests and asserts every one was answered 200 by `version`.
async fn all_served_by(url: &str, n: usize, version: &str) {
    let (by, failed) = shares(url, n).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(by, BTreeMap::from([(version.to_owned(), n)]));
}

/// Waits until none of `pids` (of `version`) runs.
async fn processes_exit(pids: &[u32], version: &str) {
    eventually(
        Duration::from_secs(15),
        &format!("{version}'s processes to exit"),
        || async { pids.iter().all(|p| !alive(*p)).then_some(()) },
    )
    .await;
}

/// The answers of a load that were not a 200.
fn failures(
    answers: &[(Instant, Result<Answer, String>)],
) -> Vec<&(Instant, Result<Answer, String>)> {
    answers
        .iter()
        .filter(|(_, a)| !matches!(a, Ok(a) if a.status == 200))
        .collect()
}

/// Steady traffic into a region until dropped, every answer kept.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(Instant, Result<Answer, String>)>>,
}

impl Load {
    fn start(url: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let http = client();
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                seen.push((Instant::now(), ask(&http, &url).await));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        });
        Self { stop, task }
    }

    async fn finish(self) -> Vec<(Instant, Result<Answer, String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task")
    }
}

/// The binomial bound: `k` of `n` within four standard deviations (and one) of `p`.
fn within_binomial(k: usize, n: usize, p: f64) -> bool {
    let (n, k) = (n as f64, k as f64);
    let sd = (n * p * (1.0 - p)).sqrt();
    (k - n * p).abs() <= 4.0 * sd + 1.0
}

async fn deploy(rig: &Rig, body: Value) -> String {
    let http = client();
    let (status, d) = post(&http, &rig.svc, "/deploy", &body).await;
    assert_eq!(status, 202, "{d}");
    d["deployment_id"].as_str().expect("id").to_owned()
}

/// Waits until `region` (index) of deployment `id` is in stage `stage` with its weight seen in
/// place at the router.
async fn wait_stage(rig: &Rig, id: &str, region: usize, stage: u64) -> Value {
    let http = client();
    eventually(
        Duration::from_secs(30),
        &format!("stage {stage} observed"),
        || async {
            let d = get(&http, &rig.svc, &format!("/deploy/{id}")).await;
            let r = &d["regions"][region];
            (r["status"] == "IN_PROGRESS" && r["stage_index"] == stage && r["observed"] == true)
                .then_some(d)
        },
    )
    .await
}

async fn still_in_stage(rig: &Rig, id: &str, region: usize, stage: u64) {
    let http = client();
    let d = get(&http, &rig.svc, &format!("/deploy/{id}")).await;
    let r = &d["regions"][region];
    assert!(
        r["status"] == "IN_PROGRESS" && r["stage_index"] == stage,
        "the stage ended while its share was being counted: {r}"
    );
}

async fn wait_end(rig: &Rig, id: &str, within: Duration) -> Value {
    let http = client();
    eventually(within, &format!("{id} to end"), || async {
        let d = get(&http, &rig.svc, &format!("/deploy/{id}")).await;
        let s = d["status"].as_str().unwrap_or("");
        ["SUCCESS", "ROLLED_BACK", "FAILED", "ABORTED", "REJECTED"]
            .contains(&s)
            .then_some(d)
    })
    .await
}

fn pids_of(lane: &Value, version: &str) -> Vec<u32> {
    lane["versions"][version]["processes"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["pid"].as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts `d` was rolled back by a measurement of `provider` that saw v3's 30% error rate;
/// that measurement.
fn rolled_back_on_v3s_error_rate(d: &Value, provider: &str) -> Value {
    assert_eq!(d["status"], "ROLLED_BACK", "{d}");
    let failed = d["regions"][0]["analysis"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["result"] == "fail").cloned())
        .expect("a failed measurement");
    assert_eq!(failed["provider"], provider, "{failed}");
    let rate = failed["error_rate"].as_f64().expect("measured");
    assert!(
        (0.15..=0.5).contains(&rate),
        "the measured error rate {rate} is v3's (0.3)"
    );
    failed
}

fn analysis(stages: Value, interval: f64) -> Value {
    json!({"service": "api-service", "stages": stages,
           "analysis": {"interval_secs": interval, "min_samples": 5, "max_error_rate": 0.05}})
}

#[tokio::test]
async fn a_rollout_moves_real_requests_stage_by_stage() {
    let rig = Rig::start(Spec::default()).await;
    let url = rig.url("us-west-2");
    all_served_by(&url, 100, "v1").await;
    let v1_pids = pids_of(&rig.lane("us-west-2").await, "v1");
    assert_eq!(v1_pids.len(), 2);

    let load = Load::start(url.clone());
    let mut body = analysis(
        json!([{"name": "canary", "weight": 5, "bake_secs": 8},
               {"name": "staging", "weight": 25, "bake_secs": 8},
               {"name": "prod", "weight": 100, "bake_secs": 1}]),
        2.0,
    );
    body["version"] = json!("v2");
    let id = deploy(&rig, body).await;
    for (stage, share) in [(0u64, 0.05), (1, 0.25)] {
        wait_stage(&rig, &id, 0, stage).await;
        let (by, failed) = shares(&url, 400).await;
        still_in_stage(&rig, &id, 0, stage).await;
        assert!(failed.is_empty(), "{failed:?}");
        let canary = by.get("v2").copied().unwrap_or(0);
        assert!(
            within_binomial(canary, 400, share),
            "stage {stage}: v2 served {canary} of 400, expected about {}",
            400.0 * share
        );
    }
    let d = wait_end(&rig, &id, Duration::from_secs(40)).await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    all_served_by(&url, 100, "v2").await;
    // the old version's processes exit once the scale-down delay has passed
    processes_exit(&v1_pids, "v1").await;
    let answers = load.finish().await;
    let errors = failures(&answers);
    assert!(
        errors.is_empty(),
        "requests failed during the rollout: {errors:?}"
    );
}

#[tokio::test]
async fn a_failing_version_is_rolled_back_on_haproxys_figures() {
    let rig = Rig::start(Spec {
        v3_error_rate: 0.3,
        ..Spec::default()
    })
    .await;
    let url = rig.url("us-west-2");
    let load = Load::start(url.clone());
    let mut body = analysis(
        json!([{"name": "canary", "weight": 25, "bake_secs": 15},
               {"name": "prod", "weight": 100, "bake_secs": 1}]),
        1.0,
    );
    body["version"] = json!("v3");
    let id = deploy(&rig, body).await;
    wait_stage(&rig, &id, 0, 0).await;
    let v3_pids = pids_of(&rig.lane("us-west-2").await, "v3");
    assert_eq!(v3_pids.len(), 2);
    let d = wait_end(&rig, &id, Duration::from_secs(30)).await;
    load.finish().await;
    let failed = rolled_back_on_v3s_error_rate(&d, "platform");
    assert!(failed["samples"].as_u64().unwrap_or(0) >= 5, "{failed}");
    // HAProxy sends nothing to v3 any more, and its processes exit
    all_served_by(&url, 200, "v1").await;
    processes_exit(&v3_pids, "v3").await;
}

#[tokio::test]
async fn a_killed_instance_is_restarted_and_no_request_fails() {
    let rig = Rig::start(Spec::default()).await;
    let url = rig.url("us-west-2");
    let mut body = analysis(
        json!([{"name": "canary", "weight": 50, "bake_secs": 120},
               {"name": "prod", "weight": 100, "bake_secs": 1}]),
        1.0,
    );
    body["version"] = json!("v2");
    let id = deploy(&rig, body).await;
    wait_stage(&rig, &id, 0, 0).await;
    let load = Load::start(url.clone());
    let lane = rig.lane("us-west-2").await;
    let victim = pids_of(&lane, "v2")[0];
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status();
    // restarted, healthy, and weighted again at the router
    let fresh = eventually(
        Duration::from_secs(20),
        "the instance to come back",
        || async {
            let lane = rig.lane("us-west-2").await;
            let p = lane["versions"]["v2"]["processes"][0].clone();
            let pid = p["pid"].as_u64()? as u32;
            (pid != victim
                && p["healthy"] == true
                && p["restarts"] == 1
                && p["haproxy"]["up"] == true
                && p["haproxy"]["weight"].as_u64().unwrap_or(0) > 0)
                .then_some(pid)
        },
    )
    .await;
    // and takes requests again
    let http = client();
    eventually(
        Duration::from_secs(10),
        "a request served by the new process",
        || async {
            let a = ask(&http, &url).await.ok()?;
            (a.pid == u64::from(fresh)).then_some(())
        },
    )
    .await;
    let answers = load.finish().await;
    let errors = failures(&answers);
    assert!(answers.len() > 50, "load ran: {} answers", answers.len());
    assert!(
        errors.is_empty(),
        "requests failed around the kill: {errors:?}"
    );
    let (status, _) = post(&http, &rig.svc, &format!("/deploy/{id}/abort"), &json!({})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_controller_killed_mid_stage_adopts_its_instances_and_finishes_once() {
    let mut rig = Rig::start(Spec::default()).await;
    let url = rig.url("us-west-2");
    let load = Load::start(url.clone());
    let mut body = analysis(
        json!([{"name": "canary", "weight": 25, "bake_secs": 8},
               {"name": "staging", "weight": 50, "bake_secs": 3},
               {"name": "prod", "weight": 100, "bake_secs": 1}]),
        1.0,
    );
    body["version"] = json!("v2");
    let id = deploy(&rig, body).await;
    wait_stage(&rig, &id, 0, 0).await;
    let before = rig.lane("us-west-2").await;
    let running = |lane: &Value| {
        let mut all = pids_of(lane, "v1");
        all.extend(pids_of(lane, "v2"));
        all.sort();
        all
    };
    let pids = running(&before);
    assert_eq!(pids.len(), 4, "{before}");

    rig.svc.kill();
    // the router and the instances keep serving while the controller is down
    let (by, failed) = shares(&url, 100).await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(by.contains_key("v1") && by.contains_key("v2"), "{by:?}");
    rig.svc.restart().await.expect("restarts");
    let after = rig.lane("us-west-2").await;
    assert_eq!(
        running(&after),
        pids,
        "the same processes, adopted: {after}"
    );
    assert_eq!(after["weights"], before["weights"], "weights unchanged");
    let demo: Vec<_> = rig
        .processes()
        .into_iter()
        .filter(|(_, c)| c.contains("demo-service"))
        .collect();
    assert_eq!(demo.len(), 4, "no second set started: {demo:?}");

    let d = wait_end(&rig, &id, Duration::from_secs(40)).await;
    load.finish().await;
    assert_eq!(d["status"], "SUCCESS", "{d}");
    assert_eq!(
        d["stages_completed"],
        json!(["validation", "canary", "staging", "prod"])
    );
    let count = |kind: &str| {
        d["events"]
            .as_array()
            .map_or(0, |e| e.iter().filter(|e| e["kind"] == kind).count())
    };
    assert_eq!(
        (
            count("stage_started"),
            count("stage_completed"),
            count("succeeded")
        ),
        (3, 3, 1),
        "each stage once, one end: {}",
        d["events"]
    );
    let (by, _) = shares(&url, 50).await;
    assert_eq!(by, BTreeMap::from([("v2".to_owned(), 50)]));
}

#[tokio::test]
async fn regions_go_one_after_the_other_and_rollback_all_restores_the_first() {
    let rig = Rig::start(Spec {
        regions: &["eu-west-1", "us-west-2"],
        v3_error_rate: 0.5,
        v3_fail_regions: "us-west-2",
        ..Spec::default()
    })
    .await;
    let loads = [
        Load::start(rig.url("eu-west-1")),
        Load::start(rig.url("us-west-2")),
    ];
    let mut body = analysis(
        json!([{"name": "canary", "weight": 50, "bake_secs": 3},
               {"name": "prod", "weight": 100, "bake_secs": 2}]),
        1.0,
    );
    body["version"] = json!("v3");
    body["regions"] = json!(["eu-west-1", "us-west-2"]);
    body["on_region_failure"] = json!("rollback_all");
    let id = deploy(&rig, body).await;
    let d = wait_end(&rig, &id, Duration::from_secs(60)).await;
    for l in loads {
        l.finish().await;
    }
    let (first, second) = (&d["regions"][0], &d["regions"][1]);
    assert_eq!(first["region"], "eu-west-1");
    let at = |kind: &str, region: &str| {
        d["events"]
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|e| e["kind"] == kind && e["region"] == region)
                    .and_then(|e| e["at"].as_str().map(str::to_owned))
            })
            .unwrap_or_else(|| panic!("no {kind} event for {region}: {}", d["events"]))
    };
    // RFC 3339 with 0, 3, 6 or 9 fraction digits: padded to 9, they sort as text
    let norm = |t: String| {
        let t = t.trim_end_matches('Z').to_owned();
        match t.split_once('.') {
            Some((s, f)) => format!("{s}.{f:0<9}"),
            None => format!("{t}.000000000"),
        }
    };
    let done = norm(at("region_succeeded", "eu-west-1"));
    let started = norm(at("region_started", "us-west-2"));
    assert!(
        done <= started,
        "the second region started ({started}) after the first finished ({done})"
    );
    assert_eq!(second["status"], "ROLLED_BACK", "{d}");
    assert_eq!(first["status"], "ROLLED_BACK", "rollback_all: {d}");
    // the first region's router serves the stable version again
    all_served_by(&rig.url("eu-west-1"), 100, "v1").await;
}

#[tokio::test]
async fn workloads_outlive_the_service_unless_asked_to_stop_with_it() {
    let mut rig = Rig::start(Spec {
        stop_on_exit: false,
        ..Spec::default()
    })
    .await;
    let url = rig.url("us-west-2");
    let started = rig.processes();
    assert_eq!(started.len(), 3, "HAProxy and two instances: {started:?}");
    rig.svc.terminate();
    assert_eq!(rig.svc.wait_exit(Duration::from_secs(20)).await, Some(0));
    // still serving with the service down
    all_served_by(&url, 50, "v1").await;
    assert_eq!(rig.processes(), started);

    // a service with PLATFORM_STOP_ON_EXIT adopts them, and takes them down with it
    let file = rig.dir.join("platform.toml").display().to_string();
    let mut svc = Proc::start(
        "deployment-system",
        &[
            ("PLATFORM", "proc"),
            ("PLATFORM_FILE", &file),
            ("PLATFORM_STOP_ON_EXIT", "true"),
        ],
    )
    .await
    .expect("starts");
    let status = get_json(&client(), svc.url("/status")).await;
    let lane = &status["platform"]["regions"]["us-west-2"]["services"]["api-service"];
    let mut adopted = pids_of(lane, "v1");
    adopted.sort();
    let mut before: Vec<u32> = started
        .iter()
        .filter(|(_, c)| c.contains("demo-service"))
        .map(|(p, _)| *p)
        .collect();
    before.sort();
    assert_eq!(adopted, before, "adopted, not restarted: {lane}");
    svc.terminate();
    assert_eq!(svc.wait_exit(Duration::from_secs(20)).await, Some(0));
    let left = rig.processes();
    assert!(left.is_empty(), "still running after the stop: {left:?}");
    assert!(
        reqwest::get(&url).await.is_err(),
        "nothing listens at the region's address"
    );
}

#[tokio::test]
async fn prometheus_scraping_haproxy_judges_the_same_figures() {
    let prom = tai_blackbox::backend("TAI_TEST_PROMETHEUS_URL");
    let targets = tai_blackbox::backend("TAI_TEST_PROMETHEUS_TARGETS");
    let rig = Rig::start(Spec {
        v3_error_rate: 0.3,
        env: &[
            ("PROMETHEUS_URL", prom.as_str()),
            ("PROMETHEUS_FILE_SD_DIR", targets.as_str()),
        ],
        ..Spec::default()
    })
    .await;
    let status = get_json(&client(), rig.svc.url("/status")).await;
    let metrics = status["platform"]["regions"]["us-west-2"]["haproxy"]["metrics"]
        .as_str()
        .expect("the exporter's address")
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    // the platform registered its exporter with Prometheus
    let http = client();
    eventually(
        Duration::from_secs(20),
        "Prometheus scraping HAProxy",
        || async {
            let r = get_json(
                &http,
                format!("{prom}/api/v1/query?query=up{{instance=\"{metrics}\"}}"),
            )
            .await;
            (r["data"]["result"][0]["value"][1] == "1").then_some(())
        },
    )
    .await;
    let sel = format!("instance=\"{metrics}\",proxy=\"{{service}}\",server=~\"{{version}}-i.*\"");
    let load = Load::start(rig.url("us-west-2"));
    let mut body = analysis(
        json!([{"name": "canary", "weight": 25, "bake_secs": 20},
               {"name": "prod", "weight": 100, "bake_secs": 1}]),
        2.0,
    );
    body["version"] = json!("v3");
    body["analysis"]["provider"] = json!("prometheus");
    body["analysis"]["queries"] = json!({
        "error_rate": format!("sum(rate(haproxy_server_http_responses_total{{{sel},code=\"5xx\"}}[10s])) / sum(rate(haproxy_server_http_responses_total{{{sel}}}[10s]))"),
        "requests": format!("sum(increase(haproxy_server_http_responses_total{{{sel}}}[10s]))"),
        "p99_ms": format!("max(haproxy_server_response_time_average_seconds{{{sel}}}) * 1000"),
    });
    let id = deploy(&rig, body).await;
    let d = wait_end(&rig, &id, Duration::from_secs(45)).await;
    load.finish().await;
    rolled_back_on_v3s_error_rate(&d, "prometheus");
}

#[tokio::test]
async fn the_platform_file_decides_what_may_be_deployed() {
    let rig = Rig::start(Spec {
        max_instances: Some(3),
        ..Spec::default()
    })
    .await;
    let http = client();
    let body = |version: &str| {
        let mut b = analysis(
            json!([{"name": "prod", "weight": 100, "bake_secs": 1}]),
            1.0,
        );
        b["version"] = json!(version);
        b
    };
    // a version the file does not list
    let (status, d) = post(&http, &rig.svc, "/deploy", &body("v9")).await;
    assert_eq!(status, 422, "{d}");
    let codes: Vec<&str> = d["reasons"]
        .as_array()
        .map(|r| r.iter().filter_map(|r| r["code"].as_str()).collect())
        .unwrap_or_default();
    assert!(codes.contains(&"image_not_found"), "{d}");
    // two processes run, two more would pass the region's three
    let (status, d) = post(&http, &rig.svc, "/deploy", &body("v2")).await;
    assert_eq!(status, 422, "{d}");
    assert!(d.to_string().contains("insufficient_capacity"), "{d}");
    // nothing was started for either
    let lane = rig.lane("us-west-2").await;
    assert_eq!(
        lane["versions"].as_object().map(|v| v.len()),
        Some(1),
        "{lane}"
    );
    assert_eq!(rig.processes().len(), 3, "HAProxy and v1's two instances");
}
