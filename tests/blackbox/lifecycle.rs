//! The payment lifecycle from outside, on the embedded default and on PostgreSQL + Redis +
//! JetStream + the standalone sandbox: authorize and capture, void, expiry, refunds (partial,
//! racing, replayed), listing while payments arrive, review holds, and webhooks delivered in
//! order, signed, retried with backoff, and across a SIGKILL.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tai_blackbox::{Proc, client, eventually, get_json, postgres_database, unique};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stack {
    Embedded,
    Postgres,
}

/// The payment service on `stack` (the PostgreSQL stack with its standalone sandbox), the
/// review threshold at 0.3.
struct Rig {
    svc: Proc,
    gw: Option<Proc>,
    http: reqwest::Client,
    _rules: std::path::PathBuf,
}

fn rules_file() -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/fraud_rules.toml"
    ))
    .expect("rules");
    let text = text.replacen(
        "block_threshold = \"0.5\"",
        "block_threshold = \"0.5\"\nreview_threshold = \"0.3\"",
        1,
    );
    assert!(text.contains("review_threshold = \"0.3\""));
    let path = tai_blackbox::log_dir().join(format!("{}.toml", unique("rules")));
    std::fs::write(&path, text).expect("write rules");
    path
}

async fn rig(stack: Stack, extra: &[(&str, &str)]) -> Rig {
    let rules = rules_file();
    let rules_path = rules.display().to_string();
    let mut env: Vec<(String, String)> = vec![
        ("FRAUD_RULES_PATH".into(), rules_path),
        ("RECONCILE_EVERY_MS".into(), "200".into()),
        ("RECONCILE_AFTER_MS".into(), "2000".into()),
        ("MERCHANT_RATE_PER_SEC".into(), "100000".into()),
    ];
    let mut gw = None;
    if stack == Stack::Postgres {
        let run = unique("lc").replace('-', "_");
        let g = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
        env.extend([
            ("DATABASE_URL".into(), postgres_database()),
            (
                "REDIS_URL".into(),
                tai_blackbox::backend("TAI_TEST_REDIS_URL"),
            ),
            ("REDIS_KEY_PREFIX".into(), format!("{run}:")),
            (
                "NATS_URL".into(),
                tai_blackbox::backend("TAI_TEST_NATS_URL"),
            ),
            ("EVENTS_STREAM".into(), format!("EV_{run}")),
            ("EVENTS_SUBJECT_PREFIX".into(), format!("{run}.events")),
            ("CONFIRM_STREAM".into(), format!("CF_{run}")),
            ("CONFIRM_SUBJECT".into(), format!("{run}.confirm")),
            ("GATEWAY_URL".into(), g.url("")),
        ]);
        gw = Some(g);
    }
    for (k, v) in extra {
        env.push(((*k).into(), (*v).into()));
    }
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let svc = Proc::start("payment-system", &pairs).await.expect("start");
    let status = get_json(&client(), svc.url("/status")).await;
    let expected = if stack == Stack::Postgres {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(status["backends"]["database"], expected, "{status}");
    Rig {
        svc,
        gw,
        http: client(),
        _rules: rules,
    }
}

impl Rig {
    async fn post(&self, path: &str, body: Value, key: Option<&str>) -> (u16, Value, bool) {
        let mut req = self.http.post(self.svc.url(path)).json(&body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let replayed = r.headers().get("idempotent-replayed").is_some();
        (status, r.json().await.unwrap_or(Value::Null), replayed)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.svc.url(path)).send().await.expect("get");
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// The sandbox's figures (the PostgreSQL stack's standalone sandbox only).
    async fn sandbox(&self) -> Option<Value> {
        match &self.gw {
            Some(gw) => Some(get_json(&self.http, gw.url("/v1/stats")).await),
            None => None,
        }
    }

    async fn pay(&self, merchant: &str, amount: &str, capture: bool) -> Value {
        let body = json!({
            "amount": amount, "currency": "USD", "merchant_id": merchant,
            "customer_id": unique("cust"), "capture": capture,
            "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2099, "cvc": "123"},
        });
        let (status, body, _) = self.post("/payment", body, None).await;
        let want = match (capture, amount) {
            (_, "6000.00") => 202,
            _ => 200,
        };
        assert_eq!(status, want, "{body}");
        body
    }
}

fn id(v: &Value) -> String {
    v["transaction_id"]
        .as_str()
        .expect("transaction_id")
        .to_owned()
}

fn money(v: &Value) -> String {
    // exact amounts are JSON numbers written as sent; compare their text
    v.to_string().trim_matches('"').to_owned()
}

async fn lifecycle(stack: Stack) {
    let rig = rig(stack, &[("AUTHORIZATION_TTL_SECS", "3")]).await;
    let m = unique("merc_lc").replace('-', "_");
    let mut mine: Vec<String> = Vec::new();

    // authorize 100.00, capture 60.00; capturing again is a 409
    let auth = rig.pay(&m, "100.00", false).await;
    assert_eq!(auth["status"], "AUTHORIZED", "{auth}");
    assert!(auth["expires_at"].is_string(), "{auth}");
    let a = id(&auth);
    mine.push(a.clone());
    let (s, captured, _) = rig
        .post(
            &format!("/payment/{a}/capture"),
            json!({"amount": "60.00"}),
            None,
        )
        .await;
    assert_eq!(
        (s, captured["status"].as_str()),
        (200, Some("SUCCESS")),
        "{captured}"
    );
    assert_eq!(money(&captured["amount_captured"]), "60.00");
    assert_eq!(money(&captured["amount"]), "100.00");
    let (s, again, _) = rig
        .post(&format!("/payment/{a}/capture"), json!({}), None)
        .await;
    assert_eq!(
        (s, again["error"]["code"].as_str()),
        (409, Some("payment_not_authorized")),
        "{again}"
    );
    if let Some(stats) = rig.sandbox().await {
        assert_eq!(stats["captured"]["USD"], "60.00", "{stats}");
    }
    // over the authorization, bad amounts: 4xx, nothing changes
    let other = rig.pay(&m, "10.00", false).await;
    let o = id(&other);
    mine.push(o.clone());
    for (body, code) in [
        (json!({"amount": "10.01"}), 400),
        (json!({"amount": "-1"}), 400),
        (json!({"amount": "1.001"}), 400),
        (json!({"amount": "5", "extra": 1}), 400),
    ] {
        let (s, e, _) = rig
            .post(&format!("/payment/{o}/capture"), body.clone(), None)
            .await;
        assert_eq!(s, code, "{body} -> {e}");
    }
    assert_eq!(
        rig.get(&format!("/payment/{o}")).await.1["status"],
        "AUTHORIZED"
    );

    // voiding releases the authorization; a voided payment cannot be captured
    let (s, voided, _) = rig
        .post(&format!("/payment/{o}/void"), json!({}), None)
        .await;
    assert_eq!(
        (s, voided["status"].as_str()),
        (200, Some("VOIDED")),
        "{voided}"
    );
    assert_eq!(voided["void_reason"], "requested");
    let (s, _, _) = rig
        .post(&format!("/payment/{o}/capture"), json!({}), None)
        .await;
    assert_eq!(s, 409);
    if let Some(stats) = rig.sandbox().await {
        assert_eq!(stats["voided"]["USD"], "10.00", "{stats}");
    }

    // an authorization not captured in time expires (voided) and cannot be captured
    let late = rig.pay(&m, "15.00", false).await;
    let l = id(&late);
    mine.push(l.clone());
    let expired = eventually(
        Duration::from_secs(20),
        "the authorization to expire",
        || {
            let rig = &rig;
            let l = l.clone();
            async move {
                let (_, p) = rig.get(&format!("/payment/{l}")).await;
                (p["status"] == "VOIDED").then_some(p)
            }
        },
    )
    .await;
    assert_eq!(expired["void_reason"], "expired", "{expired}");
    let (s, e, _) = rig
        .post(&format!("/payment/{l}/capture"), json!({}), None)
        .await;
    assert_eq!(s, 409, "{e}");

    // refunds: 30 + 30 of the 60.00 captured; a third of 0.01 is refused
    for _ in 0..2 {
        let (s, r, _) = rig
            .post(
                &format!("/payment/{a}/refunds"),
                json!({"amount": "30.00", "reason": "requested_by_customer"}),
                None,
            )
            .await;
        assert_eq!((s, r["status"].as_str()), (200, Some("SUCCEEDED")), "{r}");
    }
    let (s, r, _) = rig
        .post(
            &format!("/payment/{a}/refunds"),
            json!({"amount": "0.01"}),
            None,
        )
        .await;
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (422, Some("amount_exceeds_refundable")),
        "{r}"
    );
    let (_, p) = rig.get(&format!("/payment/{a}")).await;
    assert_eq!(money(&p["amount_refunded"]), "60.00", "{p}");
    assert_eq!(p["refunds"].as_array().map(Vec::len), Some(2), "{p}");

    // ten refunds of 10.00 racing on a 50.00 capture: exactly five succeed
    let fifty = rig.pay(&m, "50.00", true).await;
    let f = id(&fifty);
    mine.push(f.clone());
    let racing: Vec<_> = (0..10)
        .map(|_| {
            let (http, url) = (
                rig.http.clone(),
                rig.svc.url(&format!("/payment/{f}/refunds")),
            );
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .json(&json!({"amount": "10.00"}))
                    .send()
                    .await
                    .expect("refund");
                r.status().as_u16()
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in racing {
        codes.push(t.await.expect("task"));
    }
    codes.sort_unstable();
    assert_eq!(
        codes,
        vec![200, 200, 200, 200, 200, 422, 422, 422, 422, 422]
    );
    let (_, p) = rig.get(&format!("/payment/{f}")).await;
    assert_eq!(money(&p["amount_refunded"]), "50.00", "{p}");

    // a refund replayed with its key refunds once; the key with another body is a 422
    let twenty = rig.pay(&m, "20.00", true).await;
    let t = id(&twenty);
    mine.push(t.clone());
    let key = unique("refund-key");
    let (s1, r1, replayed1) = rig
        .post(
            &format!("/payment/{t}/refunds"),
            json!({"amount": "5.00"}),
            Some(&key),
        )
        .await;
    let (s2, r2, replayed2) = rig
        .post(
            &format!("/payment/{t}/refunds"),
            json!({"amount": "5.00"}),
            Some(&key),
        )
        .await;
    assert_eq!((s1, s2, replayed1, replayed2), (200, 200, false, true));
    assert_eq!(r1["id"], r2["id"]);
    let (s3, e3, _) = rig
        .post(
            &format!("/payment/{t}/refunds"),
            json!({"amount": "6.00"}),
            Some(&key),
        )
        .await;
    assert_eq!(s3, 422, "{e3}");
    let (_, p) = rig.get(&format!("/payment/{t}")).await;
    assert_eq!(money(&p["amount_refunded"]), "5.00", "{p}");
    if let Some(stats) = rig.sandbox().await {
        assert_eq!(stats["refunded"]["USD"], "115.00", "60 + 50 + 5: {stats}");
    }
    // a failed or unfinished payment is not refundable; an unknown one is a 404
    let (s, _, _) = rig
        .post(&format!("/payment/{l}/refunds"), json!({}), None)
        .await;
    assert_eq!(s, 409);
    let (s, _, _) = rig
        .post(
            "/payment/txn_00000000000000000000000000000000/refunds",
            json!({}),
            None,
        )
        .await;
    assert_eq!(s, 404);

    // review: 6,000.00 USD scores 0.3 (amount_anomaly): held, not charged
    let charges_before = rig.sandbox().await.map(|s| s["charges"].clone());
    let held = rig.pay(&m, "6000.00", true).await;
    assert_eq!(held["status"], "REQUIRES_REVIEW", "{held}");
    let h = id(&held);
    mine.push(h.clone());
    assert_eq!(
        rig.sandbox().await.map(|s| s["charges"].clone()),
        charges_before,
        "nothing charged"
    );
    let (_, reviews) = rig.get(&format!("/reviews?merchant_id={m}")).await;
    let open: Vec<&str> = reviews["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|p| p["transaction_id"].as_str())
        .collect();
    assert_eq!(open, vec![h.as_str()], "{reviews}");
    // approved twice at once: charged once
    let approvals: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (
                rig.http.clone(),
                rig.svc.url(&format!("/payment/{h}/approve")),
            );
            tokio::spawn(async move {
                http.post(url)
                    .send()
                    .await
                    .expect("approve")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut codes = Vec::new();
    for t in approvals {
        codes.push(t.await.expect("task"));
    }
    codes.sort_unstable();
    assert_eq!(codes, vec![200, 409]);
    let (_, approved) = rig.get(&format!("/payment/{h}")).await;
    assert_eq!(approved["status"], "SUCCESS", "{approved}");
    assert_eq!(approved["review"]["outcome"], "approved");
    if let (Some(before), Some(after)) = (charges_before, rig.sandbox().await) {
        assert_eq!(
            after["charges"].as_u64(),
            before.as_u64().map(|n| n + 1),
            "charged once"
        );
    }
    // rejected: never charged
    let charges_before = rig.sandbox().await.map(|s| s["charges"].clone());
    let held = rig.pay(&m, "6000.00", true).await;
    let h2 = id(&held);
    mine.push(h2.clone());
    let (s, rejected, _) = rig
        .post(&format!("/payment/{h2}/reject"), json!({}), None)
        .await;
    assert_eq!(
        (s, rejected["status"].as_str()),
        (402, Some("FRAUD_BLOCKED")),
        "{rejected}"
    );
    assert_eq!(rejected["error"]["code"], "review_rejected");
    let (s, _, _) = rig
        .post(&format!("/payment/{h2}/approve"), json!({}), None)
        .await;
    assert_eq!(s, 409);
    assert_eq!(
        rig.sandbox().await.map(|s| s["charges"].clone()),
        charges_before,
        "never charged"
    );
    let (_, reviews) = rig.get(&format!("/reviews?merchant_id={m}")).await;
    assert_eq!(
        reviews["data"].as_array().map(Vec::len),
        Some(0),
        "{reviews}"
    );

    // listing: every payment of the merchant exactly once across pages while new ones arrive,
    // and none of another merchant's
    let other_merchant = unique("merc_other").replace('-', "_");
    let mut theirs = Vec::new();
    for _ in 0..3 {
        theirs.push(id(&rig.pay(&other_merchant, "1.00", true).await));
    }
    for _ in 0..12 {
        mine.push(id(&rig.pay(&m, "2.00", true).await));
    }
    let stop = Arc::new(AtomicUsize::new(0));
    let arriving = {
        let (http, url, m, stop) = (
            rig.http.clone(),
            rig.svc.url("/payment"),
            m.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut made = 0;
            while stop.load(Ordering::SeqCst) == 0 {
                let body = json!({"amount": "3.00", "currency": "USD", "merchant_id": m, "customer_id": unique("cust")});
                if http.post(&url).json(&body).send().await.is_ok() {
                    made += 1;
                }
            }
            made
        })
    };
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            None => format!("/payments?merchant_id={m}&limit=7"),
            Some(a) => format!("/payments?merchant_id={m}&limit=7&starting_after={a}"),
        };
        let (s, page) = rig.get(&path).await;
        assert_eq!(s, 200, "{page}");
        pages += 1;
        for p in page["data"].as_array().expect("data") {
            assert_eq!(p["merchant_id"], m.as_str(), "{p}");
            seen.push(id(p));
        }
        if page["has_more"] != true || pages > 200 {
            break;
        }
        after = page["next_starting_after"].as_str().map(str::to_owned);
    }
    stop.store(1, Ordering::SeqCst);
    let made = arriving.await.expect("arriving");
    assert!(made > 0, "payments arrived during the listing");
    let mut unique_seen = seen.clone();
    unique_seen.sort();
    unique_seen.dedup();
    assert_eq!(unique_seen.len(), seen.len(), "no payment twice");
    for p in &mine {
        assert_eq!(
            seen.iter().filter(|s| *s == p).count(),
            1,
            "{p} listed once"
        );
    }
    for p in &theirs {
        assert!(!seen.contains(p), "another merchant's payment listed");
    }
    let (_, voided) = rig
        .get(&format!(
            "/payments?merchant_id={m}&status=VOIDED&limit=100"
        ))
        .await;
    let mut ids: Vec<String> = voided["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(id)
        .collect();
    ids.sort();
    let mut want = vec![o.clone(), l.clone()];
    want.sort();
    assert_eq!(ids, want, "{voided}");
    for bad in [
        format!("/payments?merchant_id={m}&limit=0"),
        format!("/payments?merchant_id={m}&status=NOPE"),
        format!("/payments?merchant_id={m}&created_gte=yesterday"),
        "/payments".to_owned(),
    ] {
        let (s, e) = rig.get(&bad).await;
        assert_eq!(s, 400, "{bad}: {e}");
    }
    // a cursor naming another merchant's payment names nothing of this one's
    let other = format!("/payments?merchant_id={m}&starting_after={}", theirs[0]);
    let (s, e) = rig.get(&other).await;
    assert_eq!(s, 404, "{other}: {e}");
    assert_eq!(e["error"]["param"], "starting_after", "{e}");
}

#[tokio::test]
async fn the_lifecycle_on_the_embedded_default() {
    lifecycle(Stack::Embedded).await;
}

#[tokio::test]
async fn the_lifecycle_on_postgres_redis_jetstream_and_the_standalone_sandbox() {
    lifecycle(Stack::Postgres).await;
}

/// What the test's webhook receiver got.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    signature: String,
    body: String,
    answered: u16,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Received>>,
    /// Requests still to answer 500.
    fail_next: AtomicUsize,
    /// Milliseconds each request waits before answering.
    slow_ms: AtomicUsize,
}

async fn receiver() -> (Arc<Receiver>, String) {
    let state = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    let slow = r.slow_ms.load(Ordering::SeqCst);
                    if slow > 0 {
                        tokio::time::sleep(Duration::from_millis(slow as u64)).await;
                    }
                    let fail = r
                        .fail_next
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    let answered = if fail { 500 } else { 200 };
                    r.got.lock().expect("lock").push(Received {
                        at: Instant::now(),
                        signature: headers
                            .get("tai-signature")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned(),
                        body,
                        answered,
                    });
                    axum::http::StatusCode::from_u16(answered).unwrap_or(axum::http::StatusCode::OK)
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (state, format!("http://{addr}/hook"))
}

fn verifies(secret: &str, r: &Received) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in r.signature.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_owned()),
            Some(("v1", x)) => v1 = Some(x.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{t}.{}", r.body).as_bytes());
    hex::encode(mac.finalize().into_bytes()) == v1
}

fn event_of(r: &Received) -> (String, String, String) {
    let v: Value = serde_json::from_str(&r.body).expect("event json");
    (
        v["id"].as_str().unwrap_or("").to_owned(),
        v["type"].as_str().unwrap_or("").to_owned(),
        v["data"]["transaction_id"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
    )
}

async fn webhooks(stack: Stack) {
    let mut rig = rig(
        stack,
        &[
            ("WEBHOOK_RETRY_BASE_MS", "300"),
            ("WEBHOOK_RETRY_MAX_MS", "2000"),
            ("WEBHOOK_TIMEOUT_MS", "2000"),
            ("WEBHOOK_POLL_MS", "50"),
        ],
    )
    .await;
    let (hook, url) = receiver().await;
    let m = unique("merc_wh").replace('-', "_");
    let (s, endpoint, _) = rig
        .post(
            "/webhook_endpoints",
            json!({"url": url, "merchant_id": m}),
            None,
        )
        .await;
    assert_eq!(s, 201, "{endpoint}");
    let secret = endpoint["secret"].as_str().expect("secret").to_owned();
    let ep = endpoint["id"].as_str().expect("id").to_owned();
    let (_, shown) = rig.get(&format!("/webhook_endpoints/{ep}")).await;
    assert!(
        shown.get("secret").is_none(),
        "the secret is shown once: {shown}"
    );
    for bad in [
        json!({"url": "ftp://x", "merchant_id": m}),
        json!({"url": url, "merchant_id": m, "enabled_events": ["payment.nope"]}),
        json!({"merchant_id": m}),
    ] {
        let (s, e, _) = rig.post("/webhook_endpoints", bad.clone(), None).await;
        assert_eq!(s, 400, "{bad}: {e}");
    }

    // the receiver fails its first three attempts
    hook.fail_next.store(3, Ordering::SeqCst);
    let auth = rig.pay(&m, "100.00", false).await;
    let a = id(&auth);
    let (s, _, _) = rig
        .post(
            &format!("/payment/{a}/capture"),
            json!({"amount": "60.00"}),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let (s, _, _) = rig
        .post(
            &format!("/payment/{a}/refunds"),
            json!({"amount": "20.00"}),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let life = [
        "payment.authorized",
        "payment.captured",
        "refund.created",
        "refund.succeeded",
    ];
    let got = eventually(
        Duration::from_secs(30),
        "every event of the payment's life",
        || {
            let hook = hook.clone();
            async move {
                let got = hook.got.lock().expect("lock").clone();
                (got.iter().filter(|r| r.answered == 200).count() >= life.len()).then_some(got)
            }
        },
    )
    .await;
    assert!(
        got.iter().all(|r| verifies(&secret, r)),
        "every signature verifies"
    );
    let delivered: Vec<String> = got
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| event_of(r).1)
        .collect();
    assert_eq!(delivered, life, "in order of occurrence");
    // the first event: three 500s, then delivered, same id, waits doubling from 300 ms
    let first: Vec<&Received> = got.iter().take(4).collect();
    assert_eq!(
        first.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 500, 500, 200]
    );
    let first_id = event_of(first[0]).0;
    assert!(
        first.iter().all(|r| event_of(r).0 == first_id),
        "the same event each time"
    );
    for (i, pair) in first.windows(2).enumerate() {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(300 << i),
            "attempt {} came {gap:?} after the one before",
            i + 2
        );
    }
    let (_, deliveries) = rig
        .get(&format!("/webhook_endpoints/{ep}/deliveries"))
        .await;
    let d0 = &deliveries["data"][0];
    assert_eq!(
        (
            d0["event_id"].as_str(),
            d0["status"].as_str(),
            d0["attempts"].as_i64()
        ),
        (Some(first_id.as_str()), Some("succeeded"), Some(4)),
        "{deliveries}"
    );
    let codes: Vec<i64> = d0["attempt_log"]
        .as_array()
        .expect("log")
        .iter()
        .filter_map(|x| x["http_status"].as_i64())
        .collect();
    assert_eq!(codes, vec![500, 500, 500, 200]);
    // the same events are readable at GET /events, in the same order
    let (_, events) = rig.get(&format!("/events?merchant_id={m}&limit=100")).await;
    let types: Vec<&str> = events["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, life, "{events}");

    // SIGKILL in the middle of deliveries: everything is delivered after the restart
    hook.slow_ms.store(400, Ordering::SeqCst);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(id(&rig.pay(&m, "7.00", true).await));
    }
    let before = hook.got.lock().expect("lock").len();
    eventually(
        Duration::from_secs(20),
        "deliveries to be under way",
        || {
            let hook = hook.clone();
            async move { (hook.got.lock().expect("lock").len() > before).then_some(()) }
        },
    )
    .await;
    rig.svc.kill();
    hook.slow_ms.store(0, Ordering::SeqCst);
    rig.svc.restart().await.expect("restart");
    let got = eventually(
        Duration::from_secs(40),
        "every payment's event after the restart",
        || {
            let (hook, ids) = (hook.clone(), ids.clone());
            async move {
                let got = hook.got.lock().expect("lock").clone();
                let done = ids
                    .iter()
                    .all(|p| got.iter().any(|r| r.answered == 200 && event_of(r).2 == *p));
                done.then_some(got)
            }
        },
    )
    .await;
    // first receipt of each event in the order the payments were made; a repeat keeps its id
    let mut order: Vec<String> = Vec::new();
    for r in got.iter().skip(before) {
        let (eid, kind, txn) = event_of(r);
        assert_eq!(kind, "payment.succeeded");
        assert!(eid.contains(&txn), "{eid} names {txn}");
        if !order.contains(&txn) {
            order.push(txn);
        }
    }
    assert_eq!(order, ids, "delivered in order across the restart");
}

#[tokio::test]
async fn webhooks_on_the_embedded_default() {
    webhooks(Stack::Embedded).await;
}

#[tokio::test]
async fn webhooks_on_postgres_redis_jetstream_and_the_standalone_sandbox() {
    webhooks(Stack::Postgres).await;
}

#[tokio::test]
async fn merchants_act_on_their_own_payments_only_and_a_failing_endpoint_is_disabled() {
    let rules = rules_file();
    let rules_path = rules.display().to_string();
    let svc = Proc::start(
        "payment-system",
        &[
            ("TAI_API_KEYS", "sk_a:merc_a,sk_b:merc_b,sk_admin"),
            ("FRAUD_RULES_PATH", rules_path.as_str()),
            ("WEBHOOK_RETRY_BASE_MS", "100"),
            ("WEBHOOK_RETRY_MAX_MS", "200"),
            ("WEBHOOK_DISABLE_AFTER_SECS", "1"),
            ("WEBHOOK_POLL_MS", "50"),
        ],
    )
    .await
    .expect("start");
    let http = client();
    let call = |method: reqwest::Method, path: &str, key: &str, body: Option<Value>| {
        let mut req = http
            .request(method, svc.url(path))
            .header("Authorization", format!("Bearer {key}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let r = req.send().await.expect("request");
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let pay = |amount: &str, capture: bool| json!({"amount": amount, "currency": "USD", "merchant_id": "merc_a", "customer_id": unique("cust"), "capture": capture});
    let (s, auth) = call(
        reqwest::Method::POST,
        "/payment",
        "sk_a",
        Some(pay("10.00", false)),
    )
    .await;
    assert_eq!(
        (s, auth["status"].as_str()),
        (200, Some("AUTHORIZED")),
        "{auth}"
    );
    let a = id(&auth);
    let (s, held) = call(
        reqwest::Method::POST,
        "/payment",
        "sk_a",
        Some(pay("6000.00", true)),
    )
    .await;
    assert_eq!(s, 202, "{held}");
    let h = id(&held);
    // merchant b sees none of it and changes nothing
    for (path, body) in [
        (format!("/payment/{a}/capture"), json!({})),
        (format!("/payment/{a}/void"), json!({})),
        (format!("/payment/{a}/refunds"), json!({})),
        (format!("/payment/{h}/approve"), json!({})),
        (format!("/payment/{h}/reject"), json!({})),
    ] {
        let (s, e) = call(reqwest::Method::POST, &path, "sk_b", Some(body)).await;
        assert_eq!(s, 404, "{path}: {e}");
    }
    let (s, _) = call(
        reqwest::Method::GET,
        "/payments?merchant_id=merc_a",
        "sk_b",
        None,
    )
    .await;
    assert_eq!(s, 403);
    let (s, own) = call(reqwest::Method::GET, "/payments", "sk_b", None).await;
    assert_eq!(
        (s, own["data"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{own}"
    );
    let (_, reviews) = call(reqwest::Method::GET, "/reviews", "sk_b", None).await;
    assert_eq!(
        reviews["data"].as_array().map(Vec::len),
        Some(0),
        "{reviews}"
    );
    let (_, p) = call(reqwest::Method::GET, &format!("/payment/{a}"), "sk_a", None).await;
    assert_eq!(p["status"], "AUTHORIZED");
    // the merchant's own key and an admin key may act
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("/payment/{h}/approve"),
        "sk_admin",
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        reqwest::Method::POST,
        &format!("/payment/{a}/capture"),
        "sk_a",
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200);

    // an endpoint nobody answers at is disabled, and says why
    let dead = format!("http://127.0.0.1:{}/hook", tai_blackbox::free_port());
    let (s, ep) = call(
        reqwest::Method::POST,
        "/webhook_endpoints",
        "sk_a",
        Some(json!({"url": dead, "enabled_events": ["payment.succeeded"]})),
    )
    .await;
    assert_eq!(
        (s, ep["merchant_id"].as_str()),
        (201, Some("merc_a")),
        "{ep}"
    );
    let ep_id = ep["id"].as_str().expect("id").to_owned();
    let (s, _) = call(
        reqwest::Method::POST,
        "/payment",
        "sk_a",
        Some(pay("3.00", true)),
    )
    .await;
    assert_eq!(s, 200);
    let disabled = eventually(
        Duration::from_secs(20),
        "the endpoint to be disabled",
        || {
            let call = &call;
            let path = format!("/webhook_endpoints/{ep_id}");
            async move {
                let (_, e) = call(reqwest::Method::GET, &path, "sk_a", None).await;
                (e["status"] == "disabled").then_some(e)
            }
        },
    )
    .await;
    assert!(
        disabled["disabled_reason"]
            .as_str()
            .is_some_and(|r| r.contains("could not connect")),
        "{disabled}"
    );
    let (_, deliveries) = call(
        reqwest::Method::GET,
        &format!("/webhook_endpoints/{ep_id}/deliveries"),
        "sk_a",
        None,
    )
    .await;
    assert!(
        deliveries["data"][0]["attempts"].as_i64() >= Some(2),
        "{deliveries}"
    );
    let (s, _) = call(
        reqwest::Method::GET,
        &format!("/webhook_endpoints/{ep_id}"),
        "sk_b",
        None,
    )
    .await;
    assert_eq!(s, 404, "another merchant's endpoint is not found");
}
