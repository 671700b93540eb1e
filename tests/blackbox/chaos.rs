//! Payments stay correct when the outcome is unknown: a gateway that misbehaves the way real
//! acquirers do, clients that retry (carefully with their key, or carelessly without), and the
//! service, its database and Redis failing mid-load. Once the reconciler has settled, the
//! gateway's books and the system of record agree: every charge the gateway holds belongs to
//! exactly one SUCCESS payment (or, reversed, one REVERSED payment), no payment is left
//! PROCESSING, and none says FAILED for a charge the gateway holds unreversed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Row;
use tai_blackbox::{OwnPostgres, OwnRedis, Proc, eventually, get_json, log_dir, unique};
use tai_core::db::Database;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    PostgresRedis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillService,
    RestartDatabase,
    RestartRedis,
}

/// What a run left, for the note (printed whole through `Debug`).
#[derive(Debug, Default)]
#[allow(dead_code)]
struct Counts {
    charges: usize,
    success: usize,
    reversed: usize,
    failed: usize,
    blocked_or_other: usize,
    processing_left: usize,
    answered: usize,
}

const PAYMENTS: usize = 200;

/// One payment by a careful client: retries with its key on 5xx, 409, 429 and no answer; stops
/// at an answer that says what happened (200, 202, 402, 502). Answers the status it ended on.
async fn careful(http: reqwest::Client, base: String, customer: String) -> Option<u16> {
    let key = unique("careful");
    let body = json!({"amount": "7.50", "currency": "USD", "customer_id": customer, "merchant_id": "merc_chaos"});
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline {
        let r = http
            .post(format!("{base}/payment"))
            .header("Idempotency-Key", &key)
            .json(&body)
            .send()
            .await;
        match r.map(|r| r.status().as_u16()) {
            Ok(s @ (200 | 202 | 402 | 502)) => return Some(s),
            Ok(s @ (400 | 401 | 403 | 404 | 422)) => panic!("a careful client got {s}"),
            _ => tokio::time::sleep(Duration::from_millis(150)).await,
        }
    }
    None
}

/// One payment by a careless client: no key; on a 503 or no answer it simply pays again.
async fn careless(http: reqwest::Client, base: String, customer: String) -> Option<u16> {
    let body = json!({"amount": "3.25", "currency": "USD", "customer_id": customer, "merchant_id": "merc_chaos"});
    for _ in 0..4 {
        match http
            .post(format!("{base}/payment"))
            .json(&body)
            .send()
            .await
            .map(|r| r.status().as_u16())
        {
            Ok(503) | Err(_) => tokio::time::sleep(Duration::from_millis(150)).await,
            Ok(s) => return Some(s),
        }
    }
    None
}

async fn payments(db: &Database) -> Option<Vec<(String, String)>> {
    let rows = sqlx::query("SELECT transaction_id, status FROM payments")
        .fetch_all(db.pool())
        .await
        .ok()?;
    rows.iter()
        .map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
        .collect()
}

async fn run(name: &str, backend: Backend, sandbox: &[(&str, &str)], faults: &[Fault]) -> Counts {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let gw = Proc::start("sandbox-gateway", sandbox)
        .await
        .expect("gateway");
    let gw_url = gw.url("");
    let mut pg = None;
    let mut redis = None;
    let mut env: Vec<(String, String)> = [
        ("GATEWAY_URL", gw_url.as_str()),
        ("GATEWAY_TIMEOUT_MS", "250"),
        ("GATEWAY_BREAKER_OPEN_SECS", "0.2"),
        ("RECONCILE_AFTER_MS", "600"),
        ("RECONCILE_EVERY_MS", "200"),
        ("RECONCILE_NOT_FOUND_GRACE_MS", "3000"),
        ("RECONCILE_RECHECK_EVERY_MS", "500"),
        ("RECONCILE_RECHECK_SECS", "600"),
        ("MERCHANT_RATE_PER_SEC", "100000"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    if backend == Backend::PostgresRedis {
        let p = OwnPostgres::start().await;
        let r = OwnRedis::start(tai_blackbox::free_port()).await;
        env.push(("DATABASE_URL".into(), p.url()));
        env.push(("DATABASE_MAX_CONNECTIONS".into(), "6".into()));
        env.push(("REDIS_URL".into(), r.url()));
        pg = Some(p);
        redis = Some(r);
    }
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut svc = Proc::start("payment-system", &env_refs)
        .await
        .expect("service");
    let base = svc.url("");

    // the load: careful and careless clients in turn, twelve at a time
    let done = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let load = {
        let (http, base, done, answered) =
            (http.clone(), base.clone(), done.clone(), answered.clone());
        tokio::spawn(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(0..PAYMENTS)
                .for_each_concurrent(12, |i| {
                    let (http, base, done, answered) =
                        (http.clone(), base.clone(), done.clone(), answered.clone());
                    async move {
                        let customer = unique("cust-chaos");
                        let status = if i % 2 == 0 {
                            careful(http, base, customer).await
                        } else {
                            careless(http, base, customer).await
                        };
                        if status.is_some() {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await
        })
    };
    // faults, each once the load is under way
    for (n, fault) in faults.iter().enumerate() {
        let at = (n + 1) * PAYMENTS / (faults.len() + 2);
        eventually(
            Duration::from_secs(120),
            "the load to reach the fault",
            || {
                let done = done.clone();
                async move { (done.load(Ordering::SeqCst) >= at).then_some(()) }
            },
        )
        .await;
        let resume_at = done.load(Ordering::SeqCst) + 10;
        let outage_over = || {
            let done = done.clone();
            async move {
                eventually(
                    Duration::from_secs(60),
                    "load to go on during the outage",
                    || {
                        let done = done.clone();
                        async move { (done.load(Ordering::SeqCst) >= resume_at).then_some(()) }
                    },
                )
                .await
            }
        };
        match fault {
            Fault::KillService => {
                svc.kill();
                svc.restart().await.expect("service back");
            }
            Fault::RestartDatabase => {
                let p = pg.as_mut().expect("postgres");
                p.stop();
                outage_over().await;
                p.restart().await;
            }
            Fault::RestartRedis => {
                let r = redis.as_mut().expect("redis");
                r.kill();
                outage_over().await;
                r.restart().await;
            }
        }
    }
    load.await.expect("load");

    // once settled, the gateway's books and the system of record agree
    let db_url = match &pg {
        Some(p) => p.url(),
        None => format!("sqlite://{}/payment-system.db", svc.data_dir.display()),
    };
    let db = Database::connect(&db_url, 2)
        .await
        .expect("read the system of record");
    let counts = eventually(Duration::from_secs(90), "the books to agree", || {
        let (http, db, gw_url) = (http.clone(), db.clone(), gw_url.clone());
        let answered = answered.load(Ordering::SeqCst);
        async move {
            let records = payments(&db).await?;
            let book: Value = http
                .get(format!("{gw_url}/v1/charges"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let of = |status: &str| -> BTreeSet<String> {
                records
                    .iter()
                    .filter(|(_, s)| s == status)
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            let charged = |status: &str| -> BTreeSet<String> {
                book["charges"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["status"] == status)
                    .filter_map(|c| c["reference"].as_str().map(str::to_owned))
                    .collect()
            };
            let (success, reversed, failed) = (of("SUCCESS"), of("REVERSED"), of("FAILED"));
            let (approved, undone) = (charged("approved"), charged("reversed"));
            let processing = of("PROCESSING").len();
            let stats: Value = get_json(&http, format!("{gw_url}/v1/stats")).await;
            let agree = processing == 0
                && approved == success
                && undone == reversed
                && approved.is_disjoint(&failed)
                && stats["charges"].as_u64() == Some((success.len() + reversed.len()) as u64);
            agree.then(|| Counts {
                charges: approved.len() + undone.len(),
                success: success.len(),
                reversed: reversed.len(),
                failed: failed.len(),
                blocked_or_other: records.len() - success.len() - reversed.len() - failed.len(),
                processing_left: processing,
                answered,
            })
        }
    })
    .await;
    let line = format!("chaos {name}: {counts:?}\n");
    print!("{line}");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir().join("chaos-counts.txt"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    assert!(
        counts.success > 0,
        "{name}: some payments went through: {counts:?}"
    );
    drop(redis);
    counts
}

#[tokio::test]
async fn embedded_late_deciding_gateway_timeouts_and_a_killed_service() {
    let c = run(
        "embedded, SANDBOX_DECIDE=late 300 ms vs a 250 ms timeout, SIGKILL",
        Backend::Embedded,
        &[("SANDBOX_DECIDE", "late"), ("SANDBOX_LATENCY_MS", "300")],
        &[Fault::KillService],
    )
    .await;
    assert!(c.charges > 0);
}

#[tokio::test]
async fn embedded_charge_then_fail_lagging_lookups_and_a_killed_service() {
    run(
        "embedded, SANDBOX_CHARGE_THEN_FAIL_RATE=0.3, SANDBOX_LOOKUP_LAG_MS=1000, SIGKILL",
        Backend::Embedded,
        &[
            ("SANDBOX_CHARGE_THEN_FAIL_RATE", "0.3"),
            ("SANDBOX_LOOKUP_LAG_MS", "1000"),
        ],
        &[Fault::KillService],
    )
    .await;
}

#[tokio::test]
async fn postgres_lookups_lagging_past_the_grace_are_reversed_across_database_and_redis_restarts() {
    let c = run(
        "postgres+redis, SANDBOX_CHARGE_THEN_FAIL_RATE=0.3, SANDBOX_LOOKUP_LAG_MS=4000 (> 3 s grace), database and Redis restarted",
        Backend::PostgresRedis,
        &[
            ("SANDBOX_CHARGE_THEN_FAIL_RATE", "0.3"),
            ("SANDBOX_LOOKUP_LAG_MS", "4000"),
        ],
        &[Fault::RestartDatabase, Fault::RestartRedis],
    )
    .await;
    assert!(
        c.reversed > 0,
        "charges seen only after the grace were reversed: {c:?}"
    );
}

#[tokio::test]
async fn postgres_late_deciding_gateway_and_a_killed_service() {
    run(
        "postgres+redis, SANDBOX_DECIDE=late 300 ms, SIGKILL",
        Backend::PostgresRedis,
        &[("SANDBOX_DECIDE", "late"), ("SANDBOX_LATENCY_MS", "300")],
        &[Fault::KillService],
    )
    .await;
}
