//! `make demo-deploy`: the deployment service on the `proc` platform, moving real traffic.
//!
//! Starts the deployment service (from the same build) with two regions, each behind its own
//! HAProxy, and `demo-service` under three versions: v1 (stable), v2 (healthy) and v3 (answers
//! 500 to 30% of requests). Sends steady traffic through both regions, rolls out v2 and then
//! v3, and prints what the traffic saw at each stage and how v3 was rolled back. Everything it
//! started stops when it ends (`PLATFORM_STOP_ON_EXIT`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const REGIONS: [&str; 2] = ["eu-west-1", "us-west-2"];

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the traffic saw: per region, every answer's version and status, in order.
type Seen = Arc<Mutex<BTreeMap<String, Vec<(String, u16)>>>>;

struct Service {
    child: Child,
    base: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        // a graceful stop: with PLATFORM_STOP_ON_EXIT the platform takes its processes down
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn platform_file(dir: &Path, bin: &Path, listen: &BTreeMap<&str, u16>) -> String {
    let demo = bin.join("demo-service");
    let mut text = format!("state_dir = \"{}\"\n", dir.join("platform").display());
    for (r, port) in listen {
        text.push_str(&format!("[regions.{r}]\nlisten = \"127.0.0.1:{port}\"\n"));
    }
    text.push_str(
        "[services.api-service]\nstable = \"v1\"\ninstances = 2\nscale_down_delay_secs = 3\n",
    );
    for v in ["v1", "v2", "v3"] {
        text.push_str(&format!(
            "[services.api-service.versions.{v}]\ncommand = [\"{}\", \"--port\", \"{{port}}\", \"--app-version\", \"{{version}}\", \"--region\", \"{{region}}\"]\n",
            demo.display()
        ));
    }
    text.push_str("env = { ERROR_RATE = \"0.3\" }\n");
    text
}

async fn traffic(region: String, url: String, seen: Seen) {
    let http = reqwest::Client::new();
    loop {
        let answer = match http.get(&url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                (v["version"].as_str().unwrap_or("?").to_owned(), status)
            }
            Err(_) => ("(no answer)".to_owned(), 0),
        };
        if let Ok(mut s) = seen.lock() {
            s.entry(region.clone()).or_default().push(answer);
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

fn seen_len(seen: &Seen, region: &str) -> usize {
    seen.lock()
        .map(|s| s.get(region).map_or(0, Vec::len))
        .unwrap_or(0)
}

/// "v2 served 12 of 240 requests (5.0%)" for the answers in `region` from `from` on.
fn summary(seen: &Seen, region: &str, from: usize, version: &str) -> String {
    let Ok(s) = seen.lock() else {
        return String::new();
    };
    let answers = s
        .get(region)
        .map(|v| &v[from.min(v.len())..])
        .unwrap_or(&[]);
    let total = answers.len();
    let of_version = answers.iter().filter(|(v, _)| v == version).count();
    let errors = answers
        .iter()
        .filter(|(v, st)| v == version && *st >= 500)
        .count();
    let failed = answers.iter().filter(|(_, st)| *st == 0).count();
    let pct = if total > 0 {
        100.0 * of_version as f64 / total as f64
    } else {
        0.0
    };
    let mut line = format!("{version} served {of_version:>3} of {total:>3} requests ({pct:.1}%)");
    if errors > 0 {
        line.push_str(&format!(", {errors} of them 500"));
    }
    if failed > 0 {
        line.push_str(&format!(", {failed} got no answer"));
    }
    line
}

/// "v2 100.0% of 172 requests" for every version that answered in `region` from `from` on.
fn mix(seen: &Seen, region: &str, from: usize) -> String {
    let Ok(s) = seen.lock() else {
        return String::new();
    };
    let answers = s
        .get(region)
        .map(|v| &v[from.min(v.len())..])
        .unwrap_or(&[]);
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for (v, _) in answers {
        *by.entry(v.as_str()).or_insert(0) += 1;
    }
    let total = answers.len().max(1) as f64;
    let parts: Vec<String> = by
        .iter()
        .map(|(v, n)| format!("{v} {:.1}%", 100.0 * *n as f64 / total))
        .collect();
    format!("{} of {} requests", parts.join(", "), answers.len())
}

async fn get(http: &reqwest::Client, url: &str) -> anyhow::Result<Value> {
    Ok(http.get(url).send().await?.json().await?)
}

/// Runs one rollout and narrates it; its final state.
async fn rollout(
    http: &reqwest::Client,
    svc: &Service,
    seen: &Seen,
    version: &str,
    stages: Value,
) -> anyhow::Result<Value> {
    let body = json!({
        "service": "api-service", "version": version, "regions": REGIONS, "stages": stages,
        "analysis": {"interval_secs": 2, "min_samples": 10, "max_error_rate": 0.05},
    });
    let d: Value = http
        .post(format!("{}/deploy", svc.base))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let id = d["deployment_id"]
        .as_str()
        .with_context(|| format!("the deploy was refused: {d}"))?
        .to_owned();
    let started = Instant::now();
    // per region: the stage being counted, and where its answers begin
    let mut counting: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    loop {
        let d = get(http, &format!("{}/deploy/{id}", svc.base)).await?;
        let names: Vec<String> = d["stages"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|x| format!("{} {:>3}%", x["name"].as_str().unwrap_or("?"), x["weight"]))
                    .collect()
            })
            .unwrap_or_default();
        for r in d["regions"].as_array().into_iter().flatten() {
            let region = r["region"].as_str().unwrap_or("?").to_owned();
            let live = r["status"] == "IN_PROGRESS" && r["observed"] == true;
            let stage = r["stage_index"].as_u64().unwrap_or(0);
            let previous = counting.get(&region).copied();
            if previous.is_some_and(|(s, _)| !live || s != stage)
                && let Some((s, from)) = counting.remove(&region)
            {
                let name = names.get(s as usize).cloned().unwrap_or_default();
                println!(
                    "  {region:<10} {name:<14} {}",
                    summary(seen, &region, from, version)
                );
            }
            if live && !counting.contains_key(&region) {
                counting.insert(region.clone(), (stage, seen_len(seen, &region)));
            }
        }
        let status = d["status"].as_str().unwrap_or("");
        if ["SUCCESS", "ROLLED_BACK", "FAILED", "ABORTED", "REJECTED"].contains(&status) {
            println!("  {status} after {:.1} s", started.elapsed().as_secs_f64());
            return Ok(d);
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the rollout did not end within 3 minutes: {d}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `make demo-deploy`: real traffic through HAProxy while v2 rolls out and v3 rolls back.
#[derive(Debug, clap::Parser)]
#[command(name = "demo-deploy", version, about)]
struct Args {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _args = <Args as clap::Parser>::parse();
    // on SIGINT or SIGTERM the demo stops where it is: dropping it stops the deployment service,
    // whose platform takes down every HAProxy and instance it started
    tokio::select! {
        done = demo() => done,
        _ = tai_core::runtime::stop_requested() => {
            println!("\nstopped: the deployment service and everything its platform started are down");
            Ok(())
        }
    }
}

async fn demo() -> anyhow::Result<()> {
    let bin: PathBuf = std::env::current_exe()?
        .parent()
        .context("the binary's folder")?
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("tai-demo-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut listen = BTreeMap::new();
    for r in REGIONS {
        listen.insert(r, free_port()?);
    }
    let file = dir.join("platform.toml");
    std::fs::write(&file, platform_file(&dir, &bin, &listen))?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("deployment-system.log"))?;
    let child = Command::new(bin.join("deployment-system"))
        .env("PLATFORM", "proc")
        .env("PLATFORM_FILE", &file)
        .env("PLATFORM_STOP_ON_EXIT", "true")
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("TAI_DATA_DIR", dir.join("data"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting deployment-system (build it first: cargo build --bins)")?;
    let svc = Service {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{}/ready", svc.base))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!(
                "the deployment service did not get ready; its log is {}",
                dir.join("deployment-system.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "deployment service on the proc platform at {} (log: {})",
        svc.base,
        dir.join("deployment-system.log").display()
    );
    for (r, p) in &listen {
        println!(
            "  {r:<10} traffic enters HAProxy at 127.0.0.1:{p}; 2 demo-service processes per version"
        );
    }

    let seen: Seen = Arc::default();
    let mut load = Vec::new();
    for (r, p) in &listen {
        // a few clients per region: enough requests for the gate's minimum at 5%
        for _ in 0..4 {
            load.push(tokio::spawn(traffic(
                (*r).to_owned(),
                format!("http://127.0.0.1:{p}/"),
                seen.clone(),
            )));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in REGIONS {
        println!("  {r:<10} before any deploy  {}", mix(&seen, r, 0));
    }

    println!("\nrollout 1: api-service v1 -> v2 (healthy), one region after the other");
    rollout(
        &http,
        &svc,
        &seen,
        "v2",
        json!([{"name": "canary", "weight": 5, "bake_secs": 8},
               {"name": "staging", "weight": 25, "bake_secs": 6},
               {"name": "prod", "weight": 100, "bake_secs": 3}]),
    )
    .await?;

    println!("\nrollout 2: api-service v2 -> v3 (answers 500 to 30% of requests)");
    let d = rollout(
        &http,
        &svc,
        &seen,
        "v3",
        json!([{"name": "canary", "weight": 25, "bake_secs": 20},
               {"name": "prod", "weight": 100, "bake_secs": 3}]),
    )
    .await?;
    if let Some(failed) = d["regions"][0]["analysis"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["result"] == "fail"))
    {
        println!(
            "  the gate failed on HAProxy's figures: {} over {} requests",
            failed["detail"].as_str().unwrap_or("?"),
            failed["samples"]
        );
    }
    let from: BTreeMap<&str, usize> = REGIONS.iter().map(|r| (*r, seen_len(&seen, r))).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for r in REGIONS {
        println!("  {r:<10} after the rollback  {}", mix(&seen, r, from[r]));
    }
    for l in load {
        l.abort();
    }
    drop(svc);
    println!("\nstopped the deployment service and everything its platform started");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
