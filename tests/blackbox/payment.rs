//! payment-system, from outside: docs/API.md's contract over HTTP, with the standalone sandbox gateway.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tai_blackbox::{Proc, client, eventually, get_json, metrics_text, unique};

struct Answer {
    status: u16,
    headers: HeaderMap,
    json: Value,
    text: String,
}

async fn pay(http: &reqwest::Client, svc: &Proc, body: &Value, key: Option<&str>) -> Answer {
    let mut req = http
        .post(svc.url("/payment"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.expect("payment request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
        text,
    }
}

fn payment(customer: &str, amount: Value) -> Value {
    json!({"amount": amount, "customer_id": customer, "currency": "USD", "merchant_id": "merc_456"})
}

fn with_card(customer: &str, number: &str) -> Value {
    let mut p = payment(customer, json!("25.00"));
    p["card"] = json!({"number": number, "exp_month": 12, "exp_year": 2099, "cvc": "123"});
    p
}

async fn gateway_stats(http: &reqwest::Client, gw: &Proc) -> (u64, u64) {
    let s: Value = get_json(http, gw.url("/v1/stats")).await;
    (
        s["charges"].as_u64().expect("charges"),
        s["requests"].as_u64().expect("requests"),
    )
}

async fn status_of(http: &reqwest::Client, svc: &Proc) -> Value {
    get_json(http, svc.url("/status")).await
}

/// Sends `n` payments by `customer` at once, spread over `services`; counts the SUCCESSes.
async fn concurrent_successes(
    http: &reqwest::Client,
    services: &[&Proc],
    customer: &str,
    n: usize,
) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let http = http.clone();
            let url = services[i % services.len()].url("/payment");
            let body = payment(customer, json!("1.00"));
            tokio::spawn(async move {
                let r = http.post(url).json(&body).send().await.expect("send");
                r.json::<Value>().await.expect("json")["status"]
                    .as_str()
                    .expect("status")
                    .to_owned()
            })
        })
        .collect();
    let mut success = 0;
    for t in tasks {
        if t.await.expect("task") == "SUCCESS" {
            success += 1;
        }
    }
    success
}

const CARDS: [&str; 3] = ["4242424242424242", "4000000000000002", "4000000000000119"];

fn assert_no_card_numbers(logs: &[String]) {
    for log in logs {
        for card in CARDS {
            assert!(!log.contains(card), "a full card number reached a log");
        }
    }
}

#[tokio::test]
async fn quick_start_scenarios_hold_as_written() {
    let http = client();
    let svc = Proc::start("payment-system", &[]).await.expect("start");

    let a = pay(
        &http,
        &svc,
        &json!({"amount":99.99,"customer_id":"cust_123","currency":"USD","merchant_id":"merc_456"}),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    for field in [
        "transaction_id",
        "status",
        "amount",
        "currency",
        "customer_id",
        "merchant_id",
        "timestamp",
        "processing_time_ms",
        "fraud_score",
        "fraud_reasons",
        "gateway_response",
        "trace_id",
    ] {
        assert!(a.json.get(field).is_some(), "missing {field}: {}", a.text);
    }
    assert_eq!(a.json["status"], "SUCCESS");
    assert!(
        a.text.contains(r#""amount":99.99,"#),
        "amount echoed exactly: {}",
        a.text
    );
    assert!(a.text.contains(r#""fraud_score":0.0"#), "{}", a.text);
    assert!(
        a.json["transaction_id"]
            .as_str()
            .expect("id")
            .starts_with("txn_")
    );
    assert!(
        a.json["gateway_response"]
            .as_str()
            .expect("gw")
            .starts_with("gw_")
    );
    let traceparent = a.headers["traceparent"].to_str().expect("tp");
    assert_eq!(
        traceparent.split('-').nth(1),
        a.json["trace_id"].as_str(),
        "the trace id in the body is the response's trace"
    );

    let b = pay(&http, &svc, &payment("cust_blacklist", json!(99.99)), None).await;
    assert_eq!(
        (b.status, b.json["status"].as_str()),
        (402, Some("FRAUD_BLOCKED"))
    );
    assert!(b.text.contains(r#""fraud_score":1.0"#), "{}", b.text);
    assert_eq!(b.json["fraud_reasons"][0]["rule"], "blocklist");
    assert!(
        b.json["gateway_response"].is_null(),
        "the gateway was not called"
    );

    // parsed from text: with arbitrary precision the number keeps its written digits
    let big: Value = serde_json::from_str(
        r#"{"amount":10000.00,"customer_id":"cust_big","currency":"USD","merchant_id":"merc_456"}"#,
    )
    .expect("json");
    let c = pay(&http, &svc, &big, None).await;
    assert_eq!(
        (c.status, c.json["status"].as_str()),
        (200, Some("SUCCESS"))
    );
    assert!(c.text.contains(r#""fraud_score":0.3"#), "{}", c.text);
    assert_eq!(c.json["fraud_reasons"][0]["rule"], "amount_anomaly");
    assert_eq!(c.json["fraud_reasons"][0]["observed"], "10000.00 USD");

    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = pay(&http, &svc, &payment("cust_rapid", json!(5)), None).await;
        if r.json["status"] == "FRAUD_BLOCKED" {
            assert_eq!(r.json["fraud_reasons"][0]["rule"], "velocity", "{}", r.text);
        }
        statuses.push(r.json["status"].as_str().expect("status").to_owned());
    }
    assert_eq!(
        statuses.iter().filter(|s| *s == "SUCCESS").count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| *s == "FRAUD_BLOCKED").count(),
        5,
        "{statuses:?}"
    );
    assert!(
        statuses[..5].iter().all(|s| s == "SUCCESS"),
        "the first five pass: {statuses:?}"
    );

    // every attempt is stored, blocked ones too
    let id = b.json["transaction_id"].as_str().expect("id");
    let stored: Value = get_json(&http, svc.url(&format!("/payment/{id}"))).await;
    assert_eq!(stored["status"], "FRAUD_BLOCKED");
    let metrics = metrics_text(&http, &svc).await;
    assert!(
        metrics.contains(r#"payment_transaction_total{status="FRAUD_BLOCKED"} 6"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"payment_fraud_detected_total{rule="velocity"} 5"#));
    assert!(metrics.contains("payment_processing_duration_seconds_count 13"));
    // 6 of 13 blocked is far over 2%
    let andon: Value = get_json(&http, svc.url("/andon")).await;
    assert_eq!(andon["level"], "RED");
    assert!(
        andon["reasons"]
            .as_array()
            .expect("r")
            .iter()
            .any(|r| r["rule"] == "fraud_rate_high")
    );
}

#[tokio::test]
async fn twenty_concurrent_payments_by_one_customer_pass_velocity_exactly_five_times() {
    let http = client();
    let svc = Proc::start("payment-system", &[]).await.expect("start");
    let success = concurrent_successes(&http, &[&svc], "cust_burst", 20).await;
    assert_eq!(success, 5);
}

#[tokio::test]
async fn amounts_are_exact_end_to_end_and_confirmations_arrive() {
    let http = client();
    let svc = Proc::start("payment-system", &[]).await.expect("start");
    let cases = [
        (json!(0.01), "USD", "0.01"),
        (json!("0.10"), "usd", "0.10"),
        (json!(999999.99), "USD", "999999.99"),
        // the cap (MAX_AMOUNT, 1,000,000 USD) in euros at the rules' rate
        (json!("920000"), "EUR", "920000"),
        (json!(500), "JPY", "500"),
        (json!("1.234"), "KWD", "1.234"),
        (json!(19.9), "GBP", "19.9"),
    ];
    for (i, (amount, currency, exact)) in cases.into_iter().enumerate() {
        let body = json!({"amount": amount, "currency": currency, "customer_id": format!("cust_exact_{i}"), "merchant_id": "m"});
        let a = pay(&http, &svc, &body, None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(
            a.text.contains(&format!(r#""amount":{exact},"#)),
            "{exact}: {}",
            a.text
        );
        assert_eq!(a.json["currency"], currency.to_uppercase());
        let id = a.json["transaction_id"].as_str().expect("id").to_owned();
        let url = svc.url(&format!("/payment/{id}"));
        let text = eventually(Duration::from_secs(10), "the confirmation worker", || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let text = http.get(&url).send().await.ok()?.text().await.ok()?;
                text.contains("\"confirmed_at\"").then_some(text)
            }
        })
        .await;
        assert!(
            text.contains(&format!(r#""amount":{exact},"#)),
            "stored exactly: {text}"
        );
    }
    let r = http
        .get(svc.url("/payment/txn_00000000000000000000000000000000"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "resource_missing"
    );
}

#[tokio::test]
async fn idempotency_replays_refuses_other_bodies_and_charges_once() {
    let http = client();
    let gw = Proc::start("sandbox-gateway", &[("SANDBOX_LATENCY_MS", "150")])
        .await
        .expect("gateway");
    let gw_url = gw.url("");
    let svc = Proc::start("payment-system", &[("GATEWAY_URL", gw_url.as_str())])
        .await
        .expect("start");
    let status = status_of(&http, &svc).await;
    assert_eq!(status["backends"]["gateway"], "http gateway");

    let key = unique("idem");
    let body = with_card("cust_idem", "4242424242424242");
    let first = pay(&http, &svc, &body, Some(&key)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let charges = gateway_stats(&http, &gw).await.0;
    assert_eq!(charges, 1);

    let again = pay(&http, &svc, &body, Some(&key)).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.json["transaction_id"], first.json["transaction_id"]);
    assert_eq!(again.text, first.text, "the first answer, byte for byte");
    assert_eq!(
        gateway_stats(&http, &gw).await,
        (1, 1),
        "the replay never reached the gateway"
    );

    let mut other = body.clone();
    other["amount"] = json!("26.00");
    let conflict = pay(&http, &svc, &other, Some(&key)).await;
    assert_eq!(conflict.status, 422, "{}", conflict.text);
    assert_eq!(conflict.json["error"]["code"], "idempotency_key_reused");
    // keys belong to a merchant: another merchant may use the same key for its own payment
    let mut elsewhere = with_card("cust_idem_other", "4242424242424242");
    elsewhere["merchant_id"] = json!("merc_other");
    let theirs = pay(&http, &svc, &elsewhere, Some(&key)).await;
    assert_eq!(theirs.status, 200, "{}", theirs.text);
    assert!(theirs.headers.get("idempotent-replayed").is_none());
    assert_ne!(theirs.json["transaction_id"], first.json["transaction_id"]);
    assert_eq!(
        gateway_stats(&http, &gw).await.0,
        2,
        "their charge is their own"
    );

    // 8 concurrent duplicates: one charge; the rest replay it or are told it is in flight
    let key = unique("idem-burst");
    let body = with_card("cust_idem_burst", "4242424242424242");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let http = http.clone();
            let url = svc.url("/payment");
            let key = key.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .header("Idempotency-Key", key)
                    .json(&body)
                    .send()
                    .await
                    .expect("send");
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.expect("json"))
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        match status {
            200 => {
                ids.insert(body["transaction_id"].as_str().expect("id").to_owned());
            }
            // the first request's charge is under way: the same payment, resumed
            202 => {
                assert_eq!(body["status"], "PROCESSING");
                ids.insert(body["transaction_id"].as_str().expect("id").to_owned());
            }
            409 => assert_eq!(body["error"]["code"], "idempotency_key_in_use"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(ids.len(), 1, "one transaction");
    assert_eq!(
        gateway_stats(&http, &gw).await.0,
        3,
        "exactly one more charge"
    );
    assert_no_card_numbers(&[svc.log()]);
}

/// After the open duration the breaker turns half-open; three good payments close it.
async fn trials_close_the_breaker(http: &reqwest::Client, svc: &Proc) {
    eventually(
        Duration::from_secs(10),
        "the breaker to turn half-open",
        || async {
            (status_of(http, svc).await["breakers"][0]["state"] == "half_open").then_some(())
        },
    )
    .await;
    for _ in 0..3 {
        let a = pay(
            http,
            svc,
            &with_card(&unique("cust_trial"), "4242424242424242"),
            None,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    assert_eq!(status_of(http, svc).await["breakers"][0]["state"], "closed");
}

#[tokio::test]
async fn the_gateway_breaker_opens_refuses_without_calling_and_closes_again() {
    let http = client();
    let mut gw = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
    let gw_url = gw.url("");
    let svc = Proc::start(
        "payment-system",
        &[
            ("GATEWAY_URL", gw_url.as_str()),
            ("GATEWAY_BREAKER_OPEN_SECS", "1.5"),
            ("GATEWAY_TIMEOUT_MS", "2000"),
            ("RECONCILE_AFTER_MS", "300"),
            ("RECONCILE_EVERY_MS", "100"),
        ],
    )
    .await
    .expect("start");
    let n = std::sync::atomic::AtomicU32::new(0);
    let customer = || {
        format!(
            "cust_brk_{}",
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        )
    };

    for i in 0..5 {
        let a = pay(
            &http,
            &svc,
            &with_card(&customer(), "4000000000000119"),
            None,
        )
        .await;
        // a gateway 500 does not say whether it charged: PROCESSING, never "nothing charged"
        assert_eq!(
            (
                a.status,
                a.json["status"].as_str(),
                a.json["error"]["code"].as_str()
            ),
            (202, Some("PROCESSING"), Some("gateway_outcome_unknown")),
            "failure {i}: {}",
            a.text
        );
        if i == 0 {
            // the reconciler asks the gateway, which reports it charged nothing
            let url = svc.url(&format!(
                "/payment/{}",
                a.json["transaction_id"].as_str().expect("id")
            ));
            let settled = eventually(Duration::from_secs(15), "the lookup to settle it", || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                    (v["status"] != "PROCESSING").then_some(v)
                }
            })
            .await;
            assert_eq!(
                (
                    settled["status"].as_str(),
                    settled["error"]["code"].as_str()
                ),
                (Some("FAILED"), Some("gateway_error")),
                "{settled}"
            );
        }
    }
    let (_, requests) = gateway_stats(&http, &gw).await;
    assert_eq!(requests, 5);
    let refused = pay(
        &http,
        &svc,
        &with_card(&customer(), "4242424242424242"),
        None,
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.json["status"], "FAILED");
    assert_eq!(refused.json["error"]["code"], "gateway_unavailable");
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .expect("ra")
        .parse()
        .expect("secs");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(
        gateway_stats(&http, &gw).await.1,
        5,
        "refused without reaching the gateway"
    );
    let andon: Value = get_json(&http, svc.url("/andon")).await;
    assert_eq!(andon["level"], "RED");
    assert!(
        andon["reasons"]
            .as_array()
            .expect("r")
            .iter()
            .any(|r| r["rule"] == "breaker_open"),
        "{andon}"
    );
    let metrics = metrics_text(&http, &svc).await;
    assert!(metrics.contains("payment_gateway_circuit_breaker_state 1"));

    // after the open duration the breaker admits trials; three good ones close it
    trials_close_the_breaker(&http, &svc).await;

    // a dead gateway opens it the same way; a restarted one lets it close
    gw.kill();
    for _ in 0..5 {
        let a = pay(
            &http,
            &svc,
            &with_card(&customer(), "4242424242424242"),
            None,
        )
        .await;
        assert_eq!(a.status, 502, "{}", a.text);
    }
    let refused = pay(
        &http,
        &svc,
        &with_card(&customer(), "4242424242424242"),
        None,
    )
    .await;
    assert_eq!(refused.json["error"]["code"], "gateway_unavailable");
    let andon: Value = get_json(&http, svc.url("/andon")).await;
    assert_eq!(andon["level"], "RED");
    gw.restart().await.expect("restart gateway");
    trials_close_the_breaker(&http, &svc).await;
    assert_no_card_numbers(&[svc.log(), gw.log()]);
}

#[tokio::test]
async fn card_numbers_never_reach_the_logs_even_at_trace_level() {
    let http = client();
    let gw = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
    let gw_url = gw.url("");
    let svc = Proc::start(
        "payment-system",
        &[("GATEWAY_URL", gw_url.as_str()), ("RUST_LOG", "trace")],
    )
    .await
    .expect("start");
    for (i, card) in CARDS.iter().enumerate() {
        let a = pay(
            &http,
            &svc,
            &with_card(&format!("cust_log_{i}"), card),
            Some(&unique("log")),
        )
        .await;
        assert!(a.status < 600);
        assert!(!a.text.contains(card), "never echoed");
        if a.json["status"] == "SUCCESS" {
            let id = a.json["transaction_id"].as_str().expect("id");
            let stored = http
                .get(svc.url(&format!("/payment/{id}")))
                .send()
                .await
                .expect("g")
                .text()
                .await
                .expect("t");
            assert!(stored.contains("424242******4242"), "{stored}");
            assert!(!stored.contains(card));
        }
    }
    // a bad card number is not echoed in the error either
    let bad = pay(
        &http,
        &svc,
        &with_card("cust_log_bad", "4242424242424241"),
        None,
    )
    .await;
    // (a number that fails its check digit is declined: 402 incorrect_number)
    assert_eq!(bad.status, 402);
    assert!(bad.text.contains("incorrect_number"), "{}", bad.text);
    assert!(!bad.text.contains("4242424242424241"));
    let log = svc.log();
    assert!(
        log.contains("payment answered"),
        "the log was written at all"
    );
    assert!(!log.contains("4242424242424241"));
    assert_no_card_numbers(&[log]);
}

#[tokio::test]
async fn merchants_are_rate_limited_and_overload_is_shed() {
    let http = client();
    // a burst of 2, then one a second: the third request within a second is refused
    let svc = Proc::start(
        "payment-system",
        &[("MERCHANT_RATE_PER_SEC", "1"), ("MERCHANT_BURST", "2")],
    )
    .await
    .expect("start");
    let mut statuses = Vec::new();
    let mut limited = None;
    for i in 0..3 {
        let a = pay(
            &http,
            &svc,
            &payment(&format!("cust_rl_{i}"), json!(1)),
            None,
        )
        .await;
        statuses.push(a.status);
        if a.status == 429 {
            limited = Some(a);
        }
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    let limited = limited.expect("a 429");
    assert_eq!(limited.json["error"]["type"], "rate_limit_error");
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(limited.headers["ratelimit-limit"], "2");
    assert_eq!(limited.headers["ratelimit-remaining"], "0");
    // another merchant has its own budget
    let mut other = payment("cust_rl_other", json!(1));
    other["merchant_id"] = json!("merc_other");
    assert_eq!(pay(&http, &svc, &other, None).await.status, 200);

    let slow = Proc::start(
        "payment-system",
        &[
            ("PAYMENT_MAX_CONCURRENCY", "2"),
            ("SANDBOX_LATENCY_MS", "400"),
        ],
    )
    .await
    .expect("start");
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let http = http.clone();
            let url = slow.url("/payment");
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .json(&payment(&format!("cust_shed_{i}"), json!(1)))
                    .send()
                    .await
                    .expect("send");
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.expect("json"))
            })
        })
        .collect();
    let mut shed = 0;
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, _) => ok += 1,
            (503, body) => {
                assert_eq!(body["error"]["code"], "overloaded");
                shed += 1;
            }
            (s, body) => panic!("unexpected {s}: {body}"),
        }
    }
    assert!(ok >= 2 && shed >= 1, "ok {ok}, shed {shed}");
}

#[tokio::test]
async fn the_blocklist_is_edited_at_runtime_through_an_authenticated_admin_route() {
    let http = client();
    let open = Proc::start("payment-system", &[]).await.expect("start");
    let r = http
        .get(open.url("/admin/blocklist"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403, "no keys configured: admin is off");

    let svc = Proc::start("payment-system", &[("TAI_API_KEYS", "sk_admin")])
        .await
        .expect("start");
    let add = |id: &str, key: Option<&str>| {
        let mut r = http
            .post(svc.url("/admin/blocklist"))
            .json(&json!({"customer_id": id}));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    assert_eq!(add("cust_late", None).await.expect("post").status(), 401);
    assert_eq!(
        add("cust_late", Some("sk_admin"))
            .await
            .expect("post")
            .status(),
        201
    );
    let list: Value = http
        .get(svc.url("/admin/blocklist"))
        .bearer_auth("sk_admin")
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("j");
    assert_eq!(list["customers"], json!(["cust_blacklist", "cust_late"]));

    let paid = |customer: &'static str| {
        http.post(svc.url("/payment"))
            .bearer_auth("sk_admin")
            .json(&payment(customer, json!(3)))
            .send()
    };
    let r: Value = paid("cust_late")
        .await
        .expect("pay")
        .json()
        .await
        .expect("j");
    assert_eq!(
        (r["status"].as_str(), r["fraud_reasons"][0]["rule"].as_str()),
        (Some("FRAUD_BLOCKED"), Some("blocklist"))
    );
    let del = http
        .delete(svc.url("/admin/blocklist/cust_late"))
        .bearer_auth("sk_admin")
        .send()
        .await
        .expect("del");
    assert_eq!(del.status(), 200);
    let del = http
        .delete(svc.url("/admin/blocklist/cust_late"))
        .bearer_auth("sk_admin")
        .send()
        .await
        .expect("del");
    assert_eq!(del.status(), 404);
    let r: Value = paid("cust_late")
        .await
        .expect("pay")
        .json()
        .await
        .expect("j");
    assert_eq!(r["status"], "SUCCESS");
}

#[tokio::test]
async fn malformed_requests_get_4xx_json_errors_and_change_nothing() {
    let http = client();
    let svc = Proc::start("payment-system", &[]).await.expect("start");
    let good = pay(&http, &svc, &payment("cust_before", json!("12.34")), None).await;
    assert_eq!(good.status, 200);
    let id = good.json["transaction_id"].as_str().expect("id").to_owned();
    let url = svc.url(&format!("/payment/{id}"));
    // wait for the confirmation, which is the last change the record gets
    let record_before = eventually(Duration::from_secs(10), "the confirmation", || {
        let http = http.clone();
        let url = url.clone();
        async move {
            let text = http.get(&url).send().await.ok()?.text().await.ok()?;
            text.contains("\"confirmed_at\"").then_some(text)
        }
    })
    .await;
    let metrics_count = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("payment_transaction_total"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let before = metrics_count(&metrics_text(&http, &svc).await);

    let base = json!({"amount": "10.00", "currency": "USD", "customer_id": "cust_before", "merchant_id": "merc_456"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b.to_string()
    };
    let without = |k: &str| {
        let mut b = base.clone();
        b.as_object_mut().expect("obj").remove(k);
        b.to_string()
    };
    let card = |c: Value| with("card", c);
    let mut cases: Vec<String> = vec![
        with("amount", json!(true)),
        with("amount", json!(null)),
        with("amount", json!([1])),
        with("amount", json!({"value": 1})),
        with("amount", json!("ten")),
        with("amount", json!("")),
        with("amount", json!(0)),
        with("amount", json!("0.00")),
        with("amount", json!(-5)),
        with("amount", json!("-0")),
        r#"{"amount": -0.0, "currency": "USD", "customer_id": "c", "merchant_id": "m"}"#.to_owned(),
        with("amount", json!("10.001")),
        with("amount", json!(1e300)),
        r#"{"amount": 1e400, "currency": "USD", "customer_id": "c", "merchant_id": "m"}"#
            .to_owned(),
        r#"{"amount": 1e-400, "currency": "USD", "customer_id": "c", "merchant_id": "m"}"#
            .to_owned(),
        with("amount", json!("1000000.01")),
        with(
            "amount",
            json!("99999999999999999999999999999999999999999999"),
        ),
        with("amount", json!("NaN")),
        r#"{"amount": "12.5", "currency": "JPY", "customer_id": "c", "merchant_id": "m"}"#
            .to_owned(),
        with("currency", json!("XYZ")),
        with("currency", json!("US")),
        with("currency", json!(840)),
        with("customer_id", json!("")),
        with("customer_id", json!("has space")),
        with("customer_id", json!("ünïcödé")),
        with("customer_id", json!("x".repeat(65))),
        with("merchant_id", json!(123)),
        with("merchant_id", json!("m/../etc")),
        without("amount"),
        without("currency"),
        without("customer_id"),
        without("merchant_id"),
        card(json!({"number": "4242424242424241", "exp_month": 12, "exp_year": 2099})),
        card(json!({"number": "4242", "exp_month": 12, "exp_year": 2099})),
        card(json!({"number": 4242424242424242u64, "exp_month": 12, "exp_year": 2099})),
        card(json!({"number": "4242424242424242", "exp_month": 12, "exp_year": 2001})),
        card(json!({"number": "4242424242424242", "exp_month": 13, "exp_year": 2099})),
        card(json!({"number": "4242424242424242", "exp_month": 12, "exp_year": 2099, "cvc": "12"})),
        card(json!("4242424242424242")),
        with("ip_country", json!("ZZ")),
        with("card_country", json!("usa")),
        with(
            "metadata",
            json!({"nested": {"junk": [1, 2, {"deeper": true}]}}),
        ),
        with("metadata", json!([1, 2])),
        with("description", json!("d".repeat(1001))),
        with("unexpected", json!(1)),
        "[]".to_owned(),
        "\"just a string\"".to_owned(),
        "null".to_owned(),
        "{}".to_owned(),
        "".to_owned(),
        "{".to_owned(),
    ];
    cases.push(format!(
        "{{\"amount\": 1, \"nest\": {}}}",
        "[".repeat(200) + &"]".repeat(200)
    ));
    assert!(cases.len() >= 40);
    for body in &cases {
        let r = http
            .post(svc.url("/payment"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let text = r.text().await.expect("text");
        assert!((400..500).contains(&status), "{status} for {body}: {text}");
        let json: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON for {body}: {text}"));
        assert!(
            json["error"]["code"].is_string() && json["error"]["message"].is_string(),
            "{body}: {text}"
        );
        assert!(!text.contains("4242424242424242"), "card echoed");
    }
    // a malformed Idempotency-Key is refused too
    let r = http
        .post(svc.url("/payment"))
        .header("Idempotency-Key", "x".repeat(256))
        .json(&base)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);

    let record_after = http
        .get(svc.url(&format!("/payment/{id}")))
        .send()
        .await
        .expect("g")
        .text()
        .await
        .expect("t");
    assert_eq!(record_before, record_after);
    let after = metrics_count(&metrics_text(&http, &svc).await);
    assert_eq!(before, after, "no payment was counted, so none was stored");
    let status = status_of(&http, &svc).await;
    assert_eq!(status["kaizen"]["errors"], 0, "no 5xx");
}

#[tokio::test]
async fn replicas_sharing_redis_share_velocity_rate_limits_and_idempotency() {
    let redis = tai_blackbox::backend("TAI_TEST_REDIS_URL");
    let db = tai_blackbox::postgres_database();
    let prefix = format!("{}:", unique("pay-ha"));
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("REDIS_URL", redis.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
    ];
    let http = client();
    let a = Proc::start("payment-system", &env)
        .await
        .expect("replica a");
    let b = Proc::start("payment-system", &env)
        .await
        .expect("replica b");
    let status = status_of(&http, &a).await;
    assert_eq!(
        (
            status["backends"]["state"].as_str(),
            status["backends"]["velocity"].as_str(),
            status["backends"]["rate_limits"].as_str()
        ),
        (Some("postgres"), Some("redis"), Some("redis"))
    );

    // 20 concurrent attempts by one customer, spread over both replicas: exactly 5 pass velocity
    let success = concurrent_successes(&http, &[&a, &b], "cust_shared", 20).await;
    assert_eq!(success, 5, "velocity is counted once across replicas");

    // a key used on one replica replays on the other
    let key = unique("idem-ha");
    let body = payment("cust_idem_ha", json!("3.00"));
    let first = pay(&http, &a, &body, Some(&key)).await;
    let again = pay(&http, &b, &body, Some(&key)).await;
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.json["transaction_id"], first.json["transaction_id"]);
    let id = first.json["transaction_id"].as_str().expect("id");
    let stored = http
        .get(b.url(&format!("/payment/{id}")))
        .send()
        .await
        .expect("get");
    assert_eq!(
        stored.status(),
        200,
        "the record is readable from any replica"
    );
}

#[tokio::test]
async fn confirmations_go_through_jetstream_when_nats_is_configured() {
    let nats = tai_blackbox::backend("TAI_TEST_NATS_URL");
    let run = unique("confirm");
    let stream = format!("CONFIRM_{run}");
    let subject = format!("{run}.confirmations");
    let http = client();
    let svc = Proc::start(
        "payment-system",
        &[
            ("NATS_URL", nats.as_str()),
            ("CONFIRM_STREAM", stream.as_str()),
            ("CONFIRM_SUBJECT", subject.as_str()),
        ],
    )
    .await
    .expect("start");
    let status = status_of(&http, &svc).await;
    assert_eq!(status["backends"]["queue"], "jetstream");
    assert_eq!(status["queues"][0]["backend"], "jetstream");
    let a = pay(&http, &svc, &payment("cust_js", json!("4.20")), None).await;
    assert_eq!(a.status, 200);
    let url = svc.url(&format!(
        "/payment/{}",
        a.json["transaction_id"].as_str().expect("id")
    ));
    eventually(
        Duration::from_secs(10),
        "the confirmation through JetStream",
        || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                (v["confirmed"] == true).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn stress_payment_loads_a_running_service_and_reports_every_status() {
    let svc = Proc::start("payment-system", &[]).await.expect("start");
    let bin = tai_blackbox::bin_dir().join("stress-payment");
    let url = svc.url("");
    let out = tokio::process::Command::new(bin)
        .args([
            "--url",
            url.as_str(),
            "--duration",
            "1",
            "--concurrency",
            "4",
            "--fraud-share",
            "0.3",
            "--quiet",
        ])
        .output()
        .await
        .expect("run stress-payment");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("throughput:") && text.contains("p99"),
        "{text}"
    );
    assert!(text.contains("200 SUCCESS"), "{text}");
    assert!(text.contains("402 FRAUD_BLOCKED"), "{text}");
    assert!(
        text.contains("server errors and failed requests: 0"),
        "{text}"
    );
    // what it reports is what the service counted
    let requests: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("request count");
    let metrics = metrics_text(&client(), &svc).await;
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("payment_transaction_total{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()))
        .sum();
    assert_eq!(counted, requests);
    // nothing listening: a clear refusal, not a hang
    let dead = format!("http://127.0.0.1:{}", tai_blackbox::free_port());
    let out = tokio::process::Command::new(tai_blackbox::bin_dir().join("stress-payment"))
        .args(["--url", dead.as_str(), "--quiet"])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("make run"));
}

#[tokio::test]
async fn geography_and_currency_changes_are_explained() {
    let http = client();
    let svc = Proc::start("payment-system", &[]).await.expect("start");
    let usd = pay(&http, &svc, &payment("cust_geo", json!("20.00")), None).await;
    assert_eq!(
        (
            usd.status,
            usd.json["fraud_reasons"].as_array().map(Vec::len)
        ),
        (200, Some(0))
    );
    let mut eur = payment("cust_geo", json!("20.00"));
    eur["currency"] = json!("EUR");
    let eur = pay(&http, &svc, &eur, None).await;
    assert_eq!(eur.status, 200, "0.2 alone does not block");
    assert_eq!(eur.json["fraud_reasons"][0]["rule"], "geo_anomaly");
    assert!(
        eur.json["fraud_reasons"][0]["observed"]
            .as_str()
            .expect("o")
            .contains("paid in USD"),
        "{}",
        eur.text
    );
    assert!(eur.text.contains(r#""fraud_score":0.2"#), "{}", eur.text);
    // a country mismatch on a large amount: 0.3 + 0.2 reaches the block threshold exactly
    let mut big = payment("cust_geo_2", json!("6000.00"));
    big["ip_country"] = json!("de");
    big["card_country"] = json!("US");
    let big = pay(&http, &svc, &big, None).await;
    assert_eq!(
        (big.status, big.json["status"].as_str()),
        (402, Some("FRAUD_BLOCKED"))
    );
    assert!(big.text.contains(r#""fraud_score":0.5"#), "{}", big.text);
    let rules: Vec<&str> = big.json["fraud_reasons"]
        .as_array()
        .expect("r")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert_eq!(rules, vec!["amount_anomaly", "geo_anomaly"]);
}

#[tokio::test]
async fn a_payment_cut_off_by_a_crash_is_finished_after_restart_and_charged_once() {
    let redis = tai_blackbox::backend("TAI_TEST_REDIS_URL");
    let prefix = format!("{}:", unique("pay-crash"));
    let http = client();
    // the gateway decides at once and answers after 1.5 s: the charge is made while we wait
    let gw = Proc::start("sandbox-gateway", &[("SANDBOX_LATENCY_MS", "1500")])
        .await
        .expect("gateway");
    let gw_url = gw.url("");
    let env = [
        ("REDIS_URL", redis.as_str()),
        ("REDIS_KEY_PREFIX", prefix.as_str()),
        ("GATEWAY_URL", gw_url.as_str()),
        ("GATEWAY_TIMEOUT_MS", "3000"),
        ("RECONCILE_AFTER_MS", "3500"),
        ("RECONCILE_EVERY_MS", "200"),
    ];
    let mut svc = Proc::start("payment-system", &env).await.expect("start");
    let key = unique("crash");
    let body = with_card("cust_crash", "4242424242424242");
    let in_flight = {
        let (http, url, key, body) = (http.clone(), svc.url("/payment"), key.clone(), body.clone());
        tokio::spawn(async move {
            http.post(url)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
        })
    };
    eventually(
        Duration::from_secs(10),
        "the charge to reach the gateway",
        || async { (gateway_stats(&http, &gw).await.1 == 1).then_some(()) },
    )
    .await;
    svc.kill(); // mid-charge: the gateway charged, the service never heard back
    assert!(
        in_flight.await.expect("task").is_err(),
        "the client got no answer"
    );
    svc.restart().await.expect("restart");

    // the client retries with its key: 202 PROCESSING (the same payment) until reconciled, then
    // the real answer
    let replay = eventually(Duration::from_secs(20), "the reconciled answer", || {
        let (http, svc_ref, key, body) = (http.clone(), &svc, key.clone(), body.clone());
        async move {
            let a = pay(&http, svc_ref, &body, Some(&key)).await;
            match a.status {
                // the same payment, resumed: still PROCESSING (never a second charge)
                202 => {
                    assert_eq!(a.json["status"], "PROCESSING", "{}", a.text);
                    None
                }
                _ => Some(a),
            }
        }
    })
    .await;
    assert_eq!(
        (replay.status, replay.json["status"].as_str()),
        (200, Some("SUCCESS")),
        "{}",
        replay.text
    );
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(gateway_stats(&http, &gw).await.0, 1, "charged exactly once");
    let id = replay.json["transaction_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let stored: Value = get_json(&http, svc.url(&format!("/payment/{id}"))).await;
    assert_eq!(stored["status"], "SUCCESS");
    assert_eq!(stored["gateway_response"], replay.json["gateway_response"]);
    let metrics = metrics_text(&http, &svc).await;
    assert!(
        metrics.contains(r#"payment_reconciled_total{status="SUCCESS"} 1"#),
        "{metrics}"
    );
    assert!(svc.log().contains("payment reconciled"));
}

#[tokio::test]
async fn a_gateway_timeout_is_not_reported_as_nothing_charged() {
    let http = client();
    let gw = Proc::start("sandbox-gateway", &[("SANDBOX_LATENCY_MS", "1200")])
        .await
        .expect("gateway");
    let gw_url = gw.url("");
    let svc = Proc::start(
        "payment-system",
        &[
            ("GATEWAY_URL", gw_url.as_str()),
            ("GATEWAY_TIMEOUT_MS", "300"),
            ("RECONCILE_AFTER_MS", "500"),
            ("RECONCILE_EVERY_MS", "200"),
        ],
    )
    .await
    .expect("start");
    let a = pay(
        &http,
        &svc,
        &with_card("cust_slow", "4242424242424242"),
        None,
    )
    .await;
    assert_eq!(
        (
            a.status,
            a.json["status"].as_str(),
            a.json["error"]["code"].as_str()
        ),
        (202, Some("PROCESSING"), Some("gateway_outcome_unknown")),
        "{}",
        a.text
    );
    let id = a.json["transaction_id"].as_str().expect("id").to_owned();
    let url = svc.url(&format!("/payment/{id}"));
    // the gateway did charge (it decides on arrival): the reconciler finds out and says so
    let done = eventually(
        Duration::from_secs(15),
        "the reconciler to finish it",
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                (v["status"] != "PROCESSING").then_some(v)
            }
        },
    )
    .await;
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert!(
        done["gateway_response"]
            .as_str()
            .expect("gw")
            .starts_with("gw_")
    );
    assert_eq!(gateway_stats(&http, &gw).await.0, 1);
}

#[tokio::test]
async fn sigterm_finishes_payments_in_flight_before_exiting() {
    let http = client();
    let mut svc = Proc::start("payment-system", &[("SANDBOX_LATENCY_MS", "800")])
        .await
        .expect("start");
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let (http, url) = (http.clone(), svc.url("/payment"));
            tokio::spawn(async move {
                http.post(url)
                    .json(&payment(&format!("cust_term_{i}"), json!("5.00")))
                    .send()
                    .await
            })
        })
        .collect();
    // wait until all three are inside the service (the sandbox holds each for 800 ms)
    eventually(Duration::from_secs(5), "three payments in flight", || async {
        let metrics = http.get(svc.url("/metrics")).send().await.ok()?.text().await.ok()?;
        let started = metrics.lines().find(|l| l.starts_with(r#"tai_pipeline_step_duration_seconds_count{pipeline="payment",step="policy"}"#))?.rsplit(' ').next()?.parse::<u64>().ok()?;
        (started == 3).then_some(())
    })
    .await;
    svc.terminate();
    for t in in_flight {
        let r = t
            .await
            .expect("task")
            .expect("an answer, not a dropped connection");
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.expect("json")["status"], "SUCCESS");
    }
    assert_eq!(
        svc.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        svc.log()
    );
    let log = svc.log();
    assert!(log.contains("queue drained"), "{log}");
}
