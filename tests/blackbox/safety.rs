//! Payment safety, from outside: merchants isolated by their keys, amounts judged in their own
//! currency, a reused key after its entry expired never replays an old approval, and no card
//! data at rest.

use std::time::Duration;

use serde_json::{Value, json};
use tai_blackbox::{Proc, client, eventually, get_json, unique};

async fn post(
    http: &reqwest::Client,
    svc: &Proc,
    key: Option<&str>,
    idem: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut r = http.post(svc.url("/payment")).json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(i) = idem {
        r = r.header("Idempotency-Key", i);
    }
    let r = r.send().await.expect("send");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn get(http: &reqwest::Client, svc: &Proc, key: Option<&str>, path: &str) -> u16 {
    let mut r = http.get(svc.url(path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.expect("get").status().as_u16()
}

fn pay(merchant: &str, customer: &str) -> Value {
    json!({"amount": "5.00", "currency": "USD", "customer_id": customer, "merchant_id": merchant})
}

#[tokio::test]
async fn merchants_with_bound_keys_cannot_create_for_read_or_count_against_each_other() {
    let http = client();
    let svc = Proc::start(
        "payment-system",
        &[("TAI_API_KEYS", "sk_a:merc_a,sk_b:merc_b,sk_admin")],
    )
    .await
    .expect("start");
    // no key: refused, reads included
    assert_eq!(
        post(&http, &svc, None, None, &pay("merc_a", "c1")).await.0,
        401
    );
    // a key bound to merc_a may not create for merc_b
    let (s, e) = post(&http, &svc, Some("sk_a"), None, &pay("merc_b", "c1")).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (403, Some("merchant_forbidden"))
    );
    let (s, a) = post(&http, &svc, Some("sk_a"), None, &pay("merc_a", "c1")).await;
    assert_eq!(s, 200, "{a}");
    let (s, b) = post(&http, &svc, Some("sk_b"), None, &pay("merc_b", "c1")).await;
    assert_eq!(s, 200, "{b}");
    let path_a = format!("/payment/{}", a["transaction_id"].as_str().expect("id"));
    let path_b = format!("/payment/{}", b["transaction_id"].as_str().expect("id"));
    assert_eq!(
        get(&http, &svc, None, &path_a).await,
        401,
        "reads need a key"
    );
    assert_eq!(get(&http, &svc, Some("sk_a"), &path_a).await, 200);
    assert_eq!(
        get(&http, &svc, Some("sk_b"), &path_a).await,
        404,
        "another's is not found"
    );
    assert_eq!(get(&http, &svc, Some("sk_a"), &path_b).await, 404);
    assert_eq!(
        get(&http, &svc, Some("sk_admin"), &path_a).await,
        200,
        "admin reads both"
    );
    assert_eq!(get(&http, &svc, Some("sk_admin"), &path_b).await, 200);
    assert_eq!(
        get(&http, &svc, None, "/status").await,
        200,
        "the common routes stay open"
    );

    // velocity is per merchant: merc_a's five attempts (c1 made one above) leave merc_b's alone
    for _ in 0..4 {
        let (_, r) = post(&http, &svc, Some("sk_a"), None, &pay("merc_a", "c1")).await;
        assert_eq!(r["status"], "SUCCESS", "{r}");
    }
    let (_, r) = post(&http, &svc, Some("sk_a"), None, &pay("merc_a", "c1")).await;
    assert_eq!(
        (r["status"].as_str(), r["fraud_reasons"][0]["rule"].as_str()),
        (Some("FRAUD_BLOCKED"), Some("velocity")),
        "{r}"
    );
    let (_, r) = post(&http, &svc, Some("sk_b"), None, &pay("merc_b", "c1")).await;
    assert_eq!(r["status"], "SUCCESS", "merc_b's count is its own: {r}");

    // a merchant's blocklist is its own; a bound key edits only its own merchant's
    let block = |key: &'static str, merchant: &'static str| {
        http.post(svc.url("/admin/blocklist"))
            .bearer_auth(key)
            .json(&json!({"customer_id": "c_fraudster", "merchant_id": merchant}))
            .send()
    };
    assert_eq!(block("sk_b", "merc_a").await.expect("post").status(), 403);
    assert_eq!(block("sk_a", "merc_a").await.expect("post").status(), 201);
    let (_, r) = post(
        &http,
        &svc,
        Some("sk_a"),
        None,
        &pay("merc_a", "c_fraudster"),
    )
    .await;
    assert_eq!(r["status"], "FRAUD_BLOCKED", "{r}");
    let (_, r) = post(
        &http,
        &svc,
        Some("sk_b"),
        None,
        &pay("merc_b", "c_fraudster"),
    )
    .await;
    assert_eq!(r["status"], "SUCCESS", "{r}");
    // the network-wide list (admin only) applies to everyone
    let r = http
        .post(svc.url("/admin/blocklist"))
        .bearer_auth("sk_a")
        .json(&json!({"customer_id": "c_everywhere"}))
        .send()
        .await
        .expect("post");
    assert_eq!(
        r.status(),
        403,
        "a bound key cannot edit the network-wide list"
    );
    let r = http
        .post(svc.url("/admin/blocklist"))
        .bearer_auth("sk_admin")
        .json(&json!({"customer_id": "c_everywhere"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    for (key, merchant) in [("sk_a", "merc_a"), ("sk_b", "merc_b")] {
        let (_, r) = post(&http, &svc, Some(key), None, &pay(merchant, "c_everywhere")).await;
        assert_eq!(r["status"], "FRAUD_BLOCKED", "{merchant}: {r}");
    }
}

#[tokio::test]
async fn amounts_are_judged_in_their_own_currency() {
    let http = client();
    let svc = Proc::start("payment-system", &[]).await.expect("start");
    let body = |amount: &str, currency: &str, customer: &str| {
        json!({"amount": amount, "currency": currency, "customer_id": customer,
               "merchant_id": "merc_fx", "ip_country": "DE", "card_country": "US"})
    };
    // 6,000 JPY is about 40 USD: only the country mismatch (0.2) counts
    let (s, r) = post(&http, &svc, None, None, &body("6000", "JPY", "c_jpy_small")).await;
    assert_eq!((s, r["status"].as_str()), (200, Some("SUCCESS")), "{r}");
    assert_eq!(r["fraud_score"], json!(0.2));
    // 900,000 JPY is about 6,000 USD: the amount rule fires and says against what
    let (_, r) = post(&http, &svc, None, None, &body("900000", "JPY", "c_jpy_big")).await;
    let reason = r["fraud_reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .find(|x| x["rule"] == "amount_anomaly")
        .cloned()
        .unwrap_or_else(|| panic!("amount_anomaly fires: {r}"));
    assert_eq!(reason["threshold"], "> 750000 JPY (5000 USD at 150)");
    // 50,000,000 VND is about 2,000 USD: within the cap, no anomaly
    let (s, r) = post(&http, &svc, None, None, &body("50000000", "VND", "c_vnd")).await;
    assert_eq!((s, r["status"].as_str()), (200, Some("SUCCESS")), "{r}");
    assert!(
        r["fraud_reasons"]
            .as_array()
            .expect("reasons")
            .iter()
            .all(|x| x["rule"] != "amount_anomaly")
    );
}

#[tokio::test]
async fn a_key_reused_after_its_entry_expired_makes_a_new_charge_never_a_replay() {
    let http = client();
    let gw = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
    let gw_url = gw.url("");
    let svc = Proc::start(
        "payment-system",
        &[
            ("GATEWAY_URL", gw_url.as_str()),
            ("IDEMPOTENCY_TTL_SECS", "1"),
        ],
    )
    .await
    .expect("start");
    let key = unique("expiring");
    let body = pay("merc_ttl", "c_ttl");
    let (s, first) = post(&http, &svc, None, Some(&key), &body).await;
    assert_eq!(s, 200, "{first}");
    let second = eventually(Duration::from_secs(10), "the entry to expire", || {
        let (http, svc, key, body) = (http.clone(), &svc, key.clone(), body.clone());
        let first_id = first["transaction_id"].clone();
        async move {
            let (_, r) = post(&http, svc, None, Some(&key), &body).await;
            (r["transaction_id"] != first_id).then_some(r)
        }
    })
    .await;
    assert_eq!(second["status"], "SUCCESS");
    assert_ne!(
        second["gateway_response"], first["gateway_response"],
        "a new approval"
    );
    let stats: Value = get_json(&http, gw.url("/v1/stats")).await;
    assert_eq!(
        stats["charges"], 2,
        "two payments, two charges at the gateway"
    );
}

/// Every file under `dir`, as bytes.
fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        let path = entry.path();
        if path.is_file() {
            out.push((
                path.display().to_string(),
                std::fs::read(&path).expect("read"),
            ));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn no_card_number_cvc_or_unkeyed_hash_of_them_is_kept_anywhere() {
    use sha2::{Digest, Sha256};
    let http = client();
    let mut svc = Proc::start("payment-system", &[("RUST_LOG", "trace")])
        .await
        .expect("start");
    let pan = "4242424242424242";
    let cvc = "7319";
    let body = json!({"amount": "12.00", "currency": "USD", "customer_id": "c_card", "merchant_id": "merc_card",
        "card": {"number": pan, "exp_month": 11, "exp_year": 2099, "cvc": cvc}});
    for i in 0..3 {
        let key = format!("card-key-{i}-{}", unique("k"));
        let (s, r) = post(&http, &svc, None, Some(&key), &body).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(
            r["card"],
            Value::Null,
            "the answer shows no card beyond the record's summary"
        );
    }
    svc.terminate();
    assert_eq!(svc.wait_exit(Duration::from_secs(15)).await, Some(0));
    let forbidden = [
        pan.to_owned(),
        hex::encode(Sha256::digest(body.to_string().as_bytes())),
        hex::encode(Sha256::digest(pan.as_bytes())),
        hex::encode(Sha256::digest(cvc.as_bytes())),
        "\"cvc\"".to_owned(),
        "cvc=".to_owned(),
    ];
    let mut scanned = files(&svc.data_dir);
    scanned.push(("log".into(), svc.log().into_bytes()));
    assert!(scanned.len() >= 2, "the database and the log were scanned");
    for (name, bytes) in &scanned {
        for needle in &forbidden {
            assert!(!contains(bytes, needle), "{name} holds {needle}");
        }
    }
    // what is kept of the card is first 6 + last 4
    assert!(scanned.iter().any(|(_, b)| contains(b, "424242******4242")));
}

#[tokio::test]
async fn no_card_data_in_postgres_redis_or_the_event_stream_either() {
    use futures_util::StreamExt;
    use sha2::{Digest, Sha256};
    let http = client();
    let db = tai_blackbox::postgres_database();
    let redis = tai_blackbox::OwnRedis::start(tai_blackbox::free_port()).await;
    let nats = tai_blackbox::OwnNats::start().await;
    let (redis_url, nats_url) = (redis.url(), nats.url());
    let svc = Proc::start(
        "payment-system",
        &[
            ("DATABASE_URL", db.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("NATS_URL", nats_url.as_str()),
            ("RUST_LOG", "trace"),
        ],
    )
    .await
    .expect("start");
    let (pan, cvc) = ("4000056655665556", "4821");
    let body = json!({"amount": "19.00", "currency": "EUR", "customer_id": "c_card_pg", "merchant_id": "merc_card",
        "ip_country": "DE", "card_country": "DE",
        "card": {"number": pan, "exp_month": 10, "exp_year": 2099, "cvc": cvc}});
    for i in 0..3 {
        let key = format!("pg-card-{i}-{}", unique("k"));
        let (s, r) = post(&http, &svc, None, Some(&key), &body).await;
        assert_eq!(s, 200, "{r}");
    }
    // every event published (the outbox empties), then read them all
    let js =
        async_nats::jetstream::new(async_nats::connect(nats_url.as_str()).await.expect("nats"));
    let events = eventually(
        Duration::from_secs(20),
        "three events in the stream",
        || {
            let js = js.clone();
            async move {
                let stream = js.get_stream("PAYMENTS_EVENTS").await.ok()?;
                let consumer = stream
                    .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
                    .await
                    .ok()?;
                let mut batch = consumer
                    .fetch()
                    .max_messages(100)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                    .ok()?;
                let mut all = Vec::new();
                while let Some(Ok(m)) = batch.next().await {
                    all.extend_from_slice(&m.payload);
                    all.push(b'\n');
                }
                (all.windows(b"payment.succeeded".len())
                    .filter(|w| *w == b"payment.succeeded")
                    .count()
                    >= 3)
                    .then_some(all)
            }
        },
    )
    .await;
    let tables = tai_blackbox::psql(
        &db,
        "SELECT string_agg(t::text, E'\\n') FROM (SELECT * FROM payments) t \
         UNION ALL SELECT string_agg(t::text, E'\\n') FROM (SELECT * FROM idempotency_keys) t \
         UNION ALL SELECT string_agg(t::text, E'\\n') FROM (SELECT seq, event_id, subject, convert_from(payload, 'UTF8') FROM tai_outbox) t \
         UNION ALL SELECT string_agg(t::text, E'\\n') FROM (SELECT key, encode(value, 'escape'), num FROM tai_kv) t",
    );
    let scanned = [
        ("postgres", tables.into_bytes()),
        ("redis", redis.dump()),
        ("events", events),
        ("log", svc.log().into_bytes()),
    ];
    let forbidden = [
        pan.to_owned(),
        hex::encode(Sha256::digest(body.to_string().as_bytes())),
        hex::encode(Sha256::digest(pan.as_bytes())),
        hex::encode(Sha256::digest(cvc.as_bytes())),
        "\"cvc\"".to_owned(),
        "cvc=".to_owned(),
    ];
    for (name, bytes) in &scanned {
        for needle in &forbidden {
            assert!(!contains(bytes, needle), "{name} holds {needle}");
        }
    }
    for name in ["postgres", "events"] {
        let (_, bytes) = scanned.iter().find(|(n, _)| *n == name).expect("scanned");
        assert!(
            contains(bytes, "400005******5556"),
            "{name} keeps first 6 + last 4"
        );
    }
    assert!(
        contains(&scanned[1].1, "merc_card"),
        "the Redis dump was read: it holds the merchant's velocity keys"
    );
}
