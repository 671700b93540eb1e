//! `make stress-deployment`: starts many deployments at once against a running
//! deployment-system (`make run` first), follows each to its end, and prints a summary: how
//! each ended, how long it took, and any that did not end.
//!
//! Deployments go round-robin over images the built-in fleet knows (`bad-service v1.0.0`
//! fails its canary gate, so some roll back) and over the regions; stages bake
//! `--bake-secs` each so a run takes seconds, not minutes. Deployments of one service queue
//! behind each other; a queued one replaced by a later deploy ends `SUPERSEDED`.
//! Exits 1 when a deployment did not end within `--timeout-secs` or was not accepted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use deployment_system::rollout::Status;
use serde_json::{Value, json};

/// Start many deployments at once and follow each to its end.
#[derive(Debug, Parser)]
#[command(name = "stress-deployment", version, about)]
struct Args {
    /// The deployment service's base URL.
    #[arg(long, env = "DEPLOYMENT_URL", default_value = "http://127.0.0.1:3002")]
    url: String,
    /// Deployments started at once.
    #[arg(long, env = "STRESS_DEPLOYMENTS", default_value_t = 50)]
    deployments: usize,
    /// Bake of each stage, in seconds.
    #[arg(long, env = "STRESS_BAKE_SECS", default_value_t = 1.0)]
    bake_secs: f64,
    /// Give up on a deployment not ended after this long.
    #[arg(long, env = "STRESS_TIMEOUT_SECS", default_value_t = 300)]
    timeout_secs: u64,
    /// Bearer key, when the service requires one.
    #[arg(long, env = "STRESS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

const IMAGES: [(&str, &str); 7] = [
    ("api-service", "v2.0.0"),
    ("big-service", "v2.0.0"),
    ("edge-service", "v3.1.0"),
    ("api-service", "v2.1.0"),
    ("bad-service", "v1.0.0"),
    ("big-service", "v1.0.0"),
    ("edge-service", "v3.0.0"),
];
const REGIONS: [&str; 3] = ["us-west-2", "us-east-1", "eu-west-1"];

/// Whether `status` is one a deployment ends in.
fn ended(status: &str) -> bool {
    serde_json::from_value::<Status>(json!(status)).is_ok_and(Status::is_terminal)
}

/// How one deployment went.
enum Outcome {
    /// Ended with this status after this long.
    Ended(String, Duration),
    /// Not accepted: the answer.
    Refused(String),
    /// Still going at the timeout: its last status.
    TimedOut(String),
}

async fn one(http: reqwest::Client, args: &Args, i: usize) -> Outcome {
    let (service, version) = IMAGES[i % IMAGES.len()];
    let region = REGIONS[i % REGIONS.len()];
    let stages = json!([
        {"name": "canary", "weight": 5, "bake_secs": args.bake_secs},
        {"name": "staging", "weight": 25, "bake_secs": args.bake_secs},
        {"name": "prod", "weight": 100, "bake_secs": args.bake_secs},
    ]);
    let body =
        json!({"service": service, "version": version, "target_region": region, "stages": stages});
    let started = Instant::now();
    let mut req = http.post(format!("{}/deploy", args.url)).json(&body);
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k);
    }
    let answer = match req.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(format!("no answer: {e}")),
    };
    let status = answer.status();
    let created: Value = answer.json().await.unwrap_or(Value::Null);
    let Some(id) = created["deployment_id"].as_str().map(str::to_owned) else {
        return Outcome::Refused(format!("{status}: {created}"));
    };
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut last = created["status"].as_str().unwrap_or("?").to_owned();
    let mut body = created;
    loop {
        if ended(&last) {
            // why it was refused or rolled back: the first reason's code
            let shown = match body["reasons"][0]["code"].as_str() {
                Some(code) if last != "SUCCESS" => format!("{last} ({code})"),
                _ => last,
            };
            return Outcome::Ended(shown, started.elapsed());
        }
        if Instant::now() > deadline {
            return Outcome::TimedOut(format!("{id} {last}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut req = http.get(format!("{}/deploy/{id}", args.url));
        if let Some(k) = &args.api_key {
            req = req.bearer_auth(k);
        }
        if let Ok(r) = req.send().await
            && let Ok(d) = r.json::<Value>().await
            && let Some(s) = d["status"].as_str()
        {
            last = s.to_owned();
            body = d;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    println!(
        "stress-deployment: {} deployments at once against {}, stages baking {} s",
        args.deployments, args.url, args.bake_secs
    );
    let started = Instant::now();
    let args = std::sync::Arc::new(args);
    let tasks: Vec<_> = (0..args.deployments)
        .map(|i| {
            let (http, args) = (http.clone(), args.clone());
            tokio::spawn(async move { one(http, &args, i).await })
        })
        .collect();
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    let mut took = Vec::new();
    let mut problems = Vec::new();
    // on SIGINT or SIGTERM: stop following, and summarise what ended so far
    let stop = tai_core::runtime::stop_requested();
    tokio::pin!(stop);
    let mut stopped = false;
    for t in tasks {
        let outcome = if stopped {
            t.abort();
            continue;
        } else {
            tokio::select! {
                joined = t => joined?,
                _ = &mut stop => {
                    stopped = true;
                    println!("\nstopped: the deployments already accepted go on in the service");
                    continue;
                }
            }
        };
        match outcome {
            Outcome::Ended(status, d) => {
                *ended.entry(status).or_default() += 1;
                took.push(d);
            }
            Outcome::Refused(why) => problems.push(format!("not accepted: {why}")),
            Outcome::TimedOut(what) => problems.push(format!("did not end in time: {what}")),
        }
    }
    took.sort();
    println!(
        "\n{} of {} deployments ended in {:.1} s",
        took.len(),
        args.deployments,
        started.elapsed().as_secs_f64()
    );
    for (status, n) in &ended {
        println!("  {status:<40} {n}");
    }
    println!(
        "time to end: p50 {:.1} s   p95 {:.1} s   max {:.1} s",
        percentile(&took, 0.50).as_secs_f64(),
        percentile(&took, 0.95).as_secs_f64(),
        took.last().copied().unwrap_or_default().as_secs_f64()
    );
    for p in &problems {
        println!("  problem: {p}");
    }
    if !problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
