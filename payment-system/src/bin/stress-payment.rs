//! `make stress-payment`: load a running payment service and report what it did.
//!
//! Workers send `POST /payment` as fast as they can (or at `--rate` in total) for `--duration`
//! seconds, with payments spread over `--merchants` merchants and `--customers` customers (so
//! velocity and rate limits behave as in production, not as one hot key), and a share of them
//! from the demo blocklist (`--fraud-share`). Latencies go into an HDR histogram; the report
//! gives throughput, percentiles and the count of every status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

/// Load a running payment-system.
#[derive(Debug, Parser)]
#[command(name = "stress-payment", version, about)]
struct Args {
    /// The service's base URL.
    #[arg(long, default_value = "http://127.0.0.1:3001", env = "PAYMENT_URL")]
    url: String,
    /// How long to send, in seconds.
    #[arg(long, env = "STRESS_DURATION", default_value_t = 10.0)]
    duration: f64,
    /// Requests in flight at once.
    #[arg(long, env = "STRESS_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Total requests per second to aim at (0: as fast as the service answers).
    #[arg(long, env = "STRESS_RATE", default_value_t = 0.0)]
    rate: f64,
    /// Distinct merchants.
    #[arg(long, env = "STRESS_MERCHANTS", default_value_t = 1000)]
    merchants: u64,
    /// Distinct customers.
    #[arg(long, env = "STRESS_CUSTOMERS", default_value_t = 100_000)]
    customers: u64,
    /// Share of payments from the blocklisted demo customer (0..1).
    #[arg(long, env = "STRESS_FRAUD_SHARE", default_value_t = 0.0)]
    fraud_share: f64,
    /// Bearer key, when the service requires one.
    #[arg(long, env = "STRESS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// No progress bar (for logs and CI).
    #[arg(long, env = "STRESS_QUIET")]
    quiet: bool,
}

struct Worker {
    latencies: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.duration > 0.0 && args.concurrency > 0,
        "--duration and --concurrency must be positive"
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let health = client.get(format!("{}/health", args.url)).send().await;
    anyhow::ensure!(
        health.is_ok_and(|r| r.status().is_success()),
        "no payment service answers at {}: start it with `make run`",
        args.url
    );

    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let sent = Arc::new(AtomicU64::new(0));
    // SIGINT or SIGTERM ends the run early, with the summary of what was sent
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let stopped = stopped.clone();
        async move {
            tai_core::runtime::stop_requested().await;
            stopped.store(true, Ordering::Relaxed);
        }
    });
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((args.duration * 10.0) as u64)
    };
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {msg}",
    )?);
    // each worker's share of the target rate, as a gap between its requests
    let gap =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|w| {
            let client = client.clone();
            let url = format!("{}/payment", args.url);
            let key = args.api_key.clone();
            let sent = sent.clone();
            let stopped = stopped.clone();
            let (merchants, customers, fraud_share) = (
                args.merchants.max(1),
                args.customers.max(1),
                args.fraud_share,
            );
            tokio::spawn(async move {
                let mut me = Worker {
                    latencies: histogram(),
                    statuses: BTreeMap::new(),
                };
                let mut next = Instant::now();
                let mut i: u64 = 0;
                while Instant::now() < deadline && !stopped.load(Ordering::Relaxed) {
                    if let Some(gap) = gap {
                        tokio::time::sleep_until(next.into()).await;
                        next += gap;
                    }
                    i += 1;
                    let customer = if rand::random::<f64>() < fraud_share {
                        "cust_blacklist".to_owned()
                    } else {
                        format!("cust_{}", rand::random::<u64>() % customers)
                    };
                    let cents = 100 + rand::random::<u64>() % 99_900;
                    let body = json!({
                        "amount": format!("{}.{:02}", cents / 100, cents % 100),
                        "currency": "USD",
                        "customer_id": customer,
                        "merchant_id": format!("merc_{}", (w as u64 * 7919 + i) % merchants),
                    });
                    let mut req = client.post(&url).json(&body);
                    if let Some(k) = &key {
                        req = req.bearer_auth(k);
                    }
                    let t = Instant::now();
                    let outcome = match req.send().await {
                        Ok(r) => {
                            let code = r.status().as_u16();
                            let status = r
                                .json::<serde_json::Value>()
                                .await
                                .ok()
                                .and_then(|v| v["status"].as_str().map(str::to_owned));
                            match status {
                                Some(s) => format!("{code} {s}"),
                                None => format!("{code}"),
                            }
                        }
                        Err(e) if e.is_timeout() => "timeout".to_owned(),
                        Err(_) => "connection error".to_owned(),
                    };
                    me.latencies.saturating_record(
                        u64::try_from(t.elapsed().as_micros())
                            .unwrap_or(u64::MAX)
                            .max(1),
                    );
                    *me.statuses.entry(outcome).or_insert(0) += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                me
            })
        })
        .collect();
    while Instant::now() < deadline && !stopped.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = sent.load(Ordering::Relaxed);
        bar.set_position((started.elapsed().as_secs_f64() * 10.0) as u64);
        bar.set_message(format!(
            "{n} sent, {:.0} req/s",
            n as f64 / started.elapsed().as_secs_f64()
        ));
    }
    let mut latencies = histogram();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for w in workers {
        let w = w.await?;
        latencies.add(&w.latencies)?;
        for (k, v) in w.statuses {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let total = latencies.len();
    let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "stress-payment: {} for {:.1} s, {} in flight",
        args.url, elapsed, args.concurrency
    );
    println!(
        "requests: {total}  throughput: {:.1} req/s",
        total as f64 / elapsed
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        latencies.max() as f64 / 1000.0
    );
    for (status, n) in &statuses {
        println!(
            "  {status}: {n} ({:.1}%)",
            *n as f64 * 100.0 / total.max(1) as f64
        );
    }
    let failures: u64 = statuses
        .iter()
        .filter(|(k, _)| k.starts_with('5') || !k.starts_with(|c: char| c.is_ascii_digit()))
        .map(|(_, v)| v)
        .sum();
    println!("server errors and failed requests: {failures}");
    Ok(())
}
