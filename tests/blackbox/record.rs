//! The system of record, from outside: what a payment or a deployment leaves survives a
//! restart on the embedded default (SQLite), replicas on PostgreSQL lose nothing that was
//! answered, and every payment outcome reaches the event stream exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tai_blackbox::{
    OwnNats, Proc, client, eventually, get_json, metrics_text, postgres_database, psql, unique,
};

fn payment(customer: &str, amount: &str) -> Value {
    json!({"amount": amount, "customer_id": customer, "currency": "USD", "merchant_id": "merc_456"})
}

/// POSTs a payment; its status and body, or `None` when no answer came (a killed replica).
async fn pay(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    key: Option<&str>,
) -> Option<(u16, Value, bool)> {
    let mut req = http.post(format!("{base}/payment")).json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.ok()?;
    let status = r.status().as_u16();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let body = r.json().await.ok()?;
    Some((status, body, replayed))
}

#[tokio::test]
async fn payments_and_their_keys_survive_sigterm_and_sigkill_on_the_embedded_default() {
    let http = client();
    let mut svc = Proc::start("payment-system", &[]).await.expect("start");
    let status = get_json(&http, svc.url("/status")).await;
    assert_eq!(
        (
            status["backends"]["database"].as_str(),
            status["backends"]["state"].as_str()
        ),
        (Some("sqlite"), Some("sqlite")),
        "{status}"
    );
    assert!(svc.data_dir.join("payment-system.db").exists());
    let mut answered: Vec<(String, String)> = Vec::new();
    let mut keyed: Vec<(String, Value, String)> = Vec::new();
    for stop in ["SIGTERM", "SIGKILL"] {
        for i in 0..15 {
            let amount = format!("{}.{:02}", i + 1, i * 7 % 100);
            let (status, body, _) = pay(
                &http,
                &svc.url(""),
                &payment(&unique("cust-keep"), &amount),
                None,
            )
            .await
            .expect("answer");
            assert_eq!(status, 200, "{body}");
            answered.push((body["transaction_id"].as_str().expect("id").into(), amount));
        }
        let key = unique("keep-key");
        let body = payment(&unique("cust-keyed"), "42.42");
        let (status, first, _) = pay(&http, &svc.url(""), &body, Some(&key))
            .await
            .expect("answer");
        assert_eq!(status, 200);
        keyed.push((
            key,
            body,
            first["transaction_id"].as_str().expect("id").into(),
        ));
        if stop == "SIGTERM" {
            svc.terminate();
            assert_eq!(svc.wait_exit(Duration::from_secs(15)).await, Some(0));
        } else {
            svc.kill();
        }
        svc.restart().await.expect("restart on the same data");
        for (id, amount) in &answered {
            let r: Value = get_json(&http, svc.url(&format!("/payment/{id}"))).await;
            assert_eq!(r["status"], "SUCCESS", "{id} after {stop}: {r}");
            assert_eq!(r["amount"].to_string(), *amount, "exact amount kept");
        }
        for (key, body, id) in &keyed {
            let (status, again, replayed) = pay(&http, &svc.url(""), body, Some(key))
                .await
                .expect("answer");
            assert!(replayed, "a key used before the {stop} replays after it");
            assert_eq!(
                (status, again["transaction_id"].as_str()),
                (200, Some(id.as_str()))
            );
        }
    }
    assert_eq!(answered.len(), 30);
}

/// Reads every message of `stream` from the start.
async fn read_stream(js: &async_nats::jetstream::Context, stream: &str) -> Vec<Value> {
    let stream = js
        .get_stream(stream)
        .await
        .expect("the events stream exists");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut events = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .expect("fetch");
        let before = events.len();
        while let Some(Ok(m)) = batch.next().await {
            events.push(serde_json::from_slice(&m.payload).expect("a JSON event"));
        }
        if events.len() == before {
            return events;
        }
    }
}

#[tokio::test]
async fn two_replicas_on_postgres_lose_nothing_answered_and_publish_each_outcome_once_across_a_nats_outage()
 {
    let db = postgres_database();
    let redis = tai_blackbox::backend("TAI_TEST_REDIS_URL");
    let prefix = format!("{}:", unique("pay-pg"));
    let mut nats = OwnNats::start().await;
    let nats_url = nats.url();
    let run = unique("ev").replace('-', "_");
    let (stream, subjects) = (format!("PAYEV_{run}"), format!("{run}.payments.events"));
    let gw = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
    let gw_url = gw.url("");
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("NATS_URL", nats_url.as_str()),
        ("EVENTS_STREAM", stream.as_str()),
        ("EVENTS_SUBJECT_PREFIX", subjects.as_str()),
        ("GATEWAY_URL", gw_url.as_str()),
        ("GATEWAY_TIMEOUT_MS", "1000"),
        ("RECONCILE_AFTER_MS", "2000"),
        ("RECONCILE_EVERY_MS", "200"),
        // a charge cut off by the kill before it reached the gateway fails after 3 s, not 2 min
        ("RECONCILE_NOT_FOUND_GRACE_MS", "3000"),
        ("CONFIRM_REQUEUE_AFTER_MS", "2000"),
        ("MERCHANT_RATE_PER_SEC", "100000"),
    ];
    let http = client();
    let a = Proc::start("payment-system", &env)
        .await
        .expect("replica a");
    let mut b = Proc::start("payment-system", &env)
        .await
        .expect("replica b");
    let status = get_json(&http, a.url("/status")).await;
    assert_eq!(
        (
            status["backends"]["database"].as_str(),
            status["backends"]["hot_state"].as_str(),
            status["backends"]["events"].as_str()
        ),
        (Some("postgres"), Some("redis"), Some("jetstream")),
        "{status}"
    );

    // the cross-replica guarantees: velocity counted once, a key replays on the other replica
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (http, base) = (http.clone(), if i % 2 == 0 { a.url("") } else { b.url("") });
            tokio::spawn(async move {
                pay(&http, &base, &payment("cust_pg_shared", "1.00"), None).await
            })
        })
        .collect();
    let mut velocity_passed = 0;
    for t in tasks {
        let (_, body, _) = t.await.expect("task").expect("answer");
        velocity_passed += usize::from(body["status"] == "SUCCESS");
    }
    assert_eq!(velocity_passed, 5, "velocity is exact across replicas");
    let key = unique("pg-key");
    let body = payment("cust_pg_key", "3.00");
    let (_, first, _) = pay(&http, &a.url(""), &body, Some(&key)).await.expect("a");
    let (_, again, replayed) = pay(&http, &b.url(""), &body, Some(&key)).await.expect("b");
    assert!(replayed);
    assert_eq!(again["transaction_id"], first["transaction_id"]);

    // one replica reconciles at a time, on the fenced lease
    let leads = |s: &Value| s["leases"]["reconciler"]["role"] == "leader";
    let b_led = eventually(Duration::from_secs(20), "one reconciler", || {
        let http = http.clone();
        let (sa, sb) = (a.url("/status"), b.url("/status"));
        async move {
            let (sa, sb) = (get_json(&http, sa).await, get_json(&http, sb).await);
            (leads(&sa) != leads(&sb)).then_some(leads(&sb))
        }
    })
    .await;

    // load on both; NATS goes down, replica b is SIGKILLed mid-load, both come back
    let answered: Arc<std::sync::Mutex<Vec<(String, String)>>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let load = |n: usize, bases: Vec<String>| {
        let (http, answered, sent) = (http.clone(), answered.clone(), sent.clone());
        tokio::spawn(async move {
            futures_util::stream::iter(0..n)
                .for_each_concurrent(8, |i| {
                    let (http, answered, sent) = (http.clone(), answered.clone(), sent.clone());
                    let base = bases[i % bases.len()].clone();
                    async move {
                        let answer =
                            pay(&http, &base, &payment(&unique("cust-pg"), "9.99"), None).await;
                        sent.fetch_add(1, Ordering::SeqCst);
                        if let Some((200, body, _)) = answer {
                            answered.lock().expect("lock").push((
                                body["transaction_id"].as_str().unwrap_or("").to_owned(),
                                body["status"].as_str().unwrap_or("").to_owned(),
                            ));
                        }
                    }
                })
                .await
        })
    };
    load(80, vec![a.url(""), b.url("")]).await.expect("phase 1");
    nats.stop();
    let phase2 = load(80, vec![a.url(""), b.url("")]);
    let mark = sent.load(Ordering::SeqCst) + 30;
    eventually(Duration::from_secs(60), "load to be under way", || async {
        (sent.load(Ordering::SeqCst) >= mark).then_some(())
    })
    .await;
    b.kill();
    phase2.await.expect("phase 2");
    nats.restart().await;
    b.restart().await.expect("replica b again");
    load(80, vec![a.url(""), b.url("")]).await.expect("phase 3");
    let answered = answered.lock().expect("lock").clone();
    assert!(
        answered.len() >= 200,
        "most payments answered: {}",
        answered.len()
    );

    // every payment answered 200 is in the system of record as answered
    for (id, status) in &answered {
        let r: Value = get_json(&http, a.url(&format!("/payment/{id}"))).await;
        assert_eq!(r["status"].as_str(), Some(status.as_str()), "{id}: {r}");
    }
    // the reconciler settles what the kill left, and the relay empties the outbox
    eventually(
        Duration::from_secs(60),
        "nothing PROCESSING, nothing unpublished",
        || {
            let db = db.clone();
            async move {
                let left = psql(
                    &db,
                    "SELECT (SELECT count(*) FROM payments WHERE status = 'PROCESSING') + \
                 (SELECT count(*) FROM tai_outbox WHERE published_at IS NULL)",
                );
                (left == "0").then_some(())
            }
        },
    )
    .await;
    // replica a reconciled what b left: it led throughout, or took the lease over from b
    let sa = get_json(&http, a.url("/status")).await;
    assert!(leads(&sa), "{sa}");
    assert_eq!(
        sa["leases"]["reconciler"]["takeovers"],
        u64::from(b_led),
        "{sa}"
    );
    let outcomes: BTreeMap<String, String> = psql(
        &db,
        "SELECT transaction_id || ' ' || status FROM payments ORDER BY transaction_id",
    )
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(id, s)| (id.to_owned(), s.to_owned()))
    .collect();
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let events = read_stream(&js, &stream).await;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for e in &events {
        let id = e["data"]["transaction_id"].as_str().expect("id").to_owned();
        let kind = e["type"].as_str().expect("type").to_owned();
        assert!(
            seen.insert(id.clone(), kind).is_none(),
            "one event per outcome: {id} twice"
        );
    }
    assert_eq!(
        seen.len(),
        outcomes.len(),
        "one event for each of the {} payments, no gaps",
        outcomes.len()
    );
    for (id, status) in &outcomes {
        let expected = match status.as_str() {
            "SUCCESS" => "payment.succeeded",
            "FAILED" => "payment.failed",
            "FRAUD_BLOCKED" => "payment.fraud_blocked",
            other => panic!("{id} left {other}"),
        };
        assert_eq!(seen.get(id).map(String::as_str), Some(expected), "{id}");
    }
    for (id, _) in &answered {
        assert!(outcomes.contains_key(id), "{id} was answered and is stored");
    }
}

#[tokio::test]
async fn prod_refuses_each_embedded_part_and_says_which_setting_to_change() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("DATABASE_URL", "memory")], "refuses the memory store"),
        (&[], "refuses SQLite unless TAI_SINGLE_NODE=true"),
        (
            &[("TAI_SINGLE_NODE", "true")],
            "refuses the in-process sandbox gateway: set GATEWAY_URL",
        ),
        (
            &[
                ("TAI_SINGLE_NODE", "true"),
                ("GATEWAY_URL", "http://127.0.0.1:9"),
            ],
            "refuses the in-process queue payment-confirmations: set NATS_URL",
        ),
    ];
    for (extra, message) in cases {
        let mut env = vec![("TAI_PROFILE", "prod"), ("TAI_API_KEYS", "sk_prod_1")];
        env.extend_from_slice(extra);
        let mut svc = Proc::spawn_only("payment-system", &env).expect("spawn");
        let code = svc.wait_exit(Duration::from_secs(15)).await;
        assert!(
            matches!(code, Some(c) if c != 0),
            "{message}: exit {code:?}"
        );
        assert!(svc.log().contains(message), "{message}:\n{}", svc.log());
    }
}

/// A sample of the service's `/metrics`, 0 when the line is not there.
async fn sample(http: &reqwest::Client, svc: &Proc, line_start: &str) -> f64 {
    let text = metrics_text(http, svc).await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn with_rabbitmq_as_fallback_every_confirmation_is_delivered_once_across_a_nats_outage() {
    let mut nats = OwnNats::start().await;
    let (nats_url, amqp_url) = (nats.url(), tai_blackbox::backend("TAI_TEST_AMQP_URL"));
    let run = unique("cf").replace('-', "_");
    let (stream, subject) = (format!("CF_{run}"), format!("{run}.confirm"));
    let events = format!("EV_{run}");
    let svc = Proc::start(
        "payment-system",
        &[
            ("NATS_URL", nats_url.as_str()),
            ("AMQP_URL", amqp_url.as_str()),
            ("CONFIRM_STREAM", stream.as_str()),
            ("CONFIRM_SUBJECT", subject.as_str()),
            ("EVENTS_STREAM", events.as_str()),
            ("EVENTS_SUBJECT_PREFIX", format!("{run}.events").as_str()),
            // the reconciler must not queue a confirmation again: each one is the queue's own
            ("CONFIRM_REQUEUE_AFTER_MS", "3600000"),
            ("MERCHANT_RATE_PER_SEC", "100000"),
        ],
    )
    .await
    .expect("payment-system");
    let http = client();
    let status = get_json(&http, svc.url("/status")).await;
    assert_eq!(
        status["backends"]["queue"].as_str(),
        Some("jetstream+rabbitmq"),
        "{status}"
    );

    let succeeded: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let load = |n: usize| {
        let (http, succeeded, base) = (http.clone(), succeeded.clone(), svc.url(""));
        async move {
            futures_util::stream::iter(0..n)
                .for_each_concurrent(8, |_| {
                    let (http, succeeded, base) = (http.clone(), succeeded.clone(), base.clone());
                    async move {
                        let answer =
                            pay(&http, &base, &payment(&unique("cust-cf"), "4.20"), None).await;
                        let Some((200, body, _)) = answer else {
                            panic!("every payment is answered 200: {answer:?}")
                        };
                        if body["status"] == "SUCCESS" {
                            let id = body["transaction_id"].as_str().expect("id").to_owned();
                            succeeded.lock().expect("lock").push(id);
                        }
                    }
                })
                .await
        }
    };
    load(30).await;
    nats.stop();
    load(60).await;
    let to_fallback = sample(
        &http,
        &svc,
        "kanban_fallback_total{event=\"to_fallback\",queue=\"payment-confirmations\"}",
    )
    .await;
    assert!(
        to_fallback >= 50.0,
        "confirmations went to RabbitMQ while NATS was down: {to_fallback}"
    );
    nats.restart().await;
    load(30).await;

    let succeeded = succeeded.lock().expect("lock").clone();
    assert!(
        succeeded.len() >= 100,
        "most payments succeed: {}",
        succeeded.len()
    );
    eventually(
        Duration::from_secs(60),
        "every success to be confirmed",
        || {
            let (http, svc, n) = (http.clone(), &svc, succeeded.len() as f64);
            async move {
                let confirmed = sample(
                    &http,
                    svc,
                    "payment_confirmations_total{outcome=\"confirmed\"}",
                )
                .await;
                (confirmed >= n).then_some(())
            }
        },
    )
    .await;
    for id in &succeeded {
        let r: Value = get_json(&http, svc.url(&format!("/payment/{id}"))).await;
        assert!(r["confirmed_at"].is_string(), "{id} confirmed: {r}");
    }
    // exactly once: no delivery found its payment confirmed already, none failed
    assert_eq!(
        (
            sample(
                &http,
                &svc,
                "payment_confirmations_total{outcome=\"confirmed\"}"
            )
            .await,
            sample(
                &http,
                &svc,
                "payment_confirmations_total{outcome=\"nothing_to_confirm\"}"
            )
            .await,
            sample(
                &http,
                &svc,
                "payment_confirmations_total{outcome=\"failed\"}"
            )
            .await,
        ),
        (succeeded.len() as f64, 0.0, 0.0)
    );
}

/// A replica stopped with SIGTERM gives its singleton leases up on the way out: the other
/// replica leads the reconciler at its next try, not once the lease lapses (ten minutes here,
/// so only a release can let it in within the test).
#[tokio::test]
async fn a_replica_stopped_gracefully_hands_the_reconciler_over_at_once() {
    let db = postgres_database();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("RECONCILER_LEASE_MS", "600000"),
    ];
    let http = client();
    let mut replicas = vec![
        Proc::start("payment-system", &env)
            .await
            .expect("replica a"),
        Proc::start("payment-system", &env)
            .await
            .expect("replica b"),
    ];
    let leader = eventually(Duration::from_secs(20), "one reconciler leader", || {
        let (http, urls) = (
            http.clone(),
            replicas
                .iter()
                .map(|r| r.url("/status"))
                .collect::<Vec<_>>(),
        );
        async move {
            let mut leading = Vec::new();
            for (i, url) in urls.iter().enumerate() {
                if get_json(&http, url).await["leases"]["reconciler"]["role"] == "leader" {
                    leading.push(i);
                }
            }
            (leading.len() == 1).then(|| leading[0])
        }
    })
    .await;
    let mut stopped = replicas.remove(leader);
    let standby = &replicas[0];
    stopped.terminate();
    assert_eq!(
        stopped.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "stops cleanly"
    );
    eventually(
        Duration::from_secs(30),
        "the other replica to lead the reconciler",
        || {
            let (http, url) = (http.clone(), standby.url("/status"));
            async move {
                (get_json(&http, url).await["leases"]["reconciler"]["role"] == "leader")
                    .then_some(())
            }
        },
    )
    .await;
    assert!(
        stopped.log().contains("released the reconciler lease"),
        "{}",
        stopped.log()
    );
    // a handover, not a takeover: a rolling restart is not counted as a holder lost
    let status = get_json(&http, standby.url("/status")).await;
    assert_eq!(status["leases"]["reconciler"]["takeovers"], 0, "{status}");
    assert!(
        metrics_text(&http, standby)
            .await
            .contains("lease_takeovers_total{lease=\"reconciler\"} 0")
    );
}
