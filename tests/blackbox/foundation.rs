//! The runtime every service shares, seen from outside.

use std::time::Duration;

use serde_json::{Value, json};
use tai_blackbox::{Proc, backend, client, eventually, get_json, metrics_text, unique};

const SERVICES: [&str; 2] = ["payment-system", "deployment-system"];
const DOMAIN_ROUTE: [&str; 2] = ["/payment", "/deploy"];

#[tokio::test]
async fn both_services_serve_the_common_routes() {
    let http = client();
    for name in SERVICES {
        let svc = Proc::start(name, &[]).await.expect("start");
        let r = http.get(svc.url("/health")).send().await.expect("health");
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));
        assert!(r.headers().contains_key("traceparent"));
        assert_eq!(
            r.json::<Value>().await.expect("json"),
            serde_json::json!({"status":"ok"})
        );

        let status: Value = get_json(&http, svc.url("/status")).await;
        assert_eq!(status["service"], name);
        assert_eq!(status["profile"], "dev");
        assert_eq!(
            status["backends"]["state"], "sqlite",
            "the embedded default keeps its records on disk"
        );
        assert!(status["uptime_secs"].as_f64().is_some());

        let andon: Value = get_json(&http, svc.url("/andon")).await;
        assert_eq!(andon["level"], "GREEN");
        assert!(andon["history"].is_array());

        let page = http.get(svc.url("/")).send().await.expect("page");
        assert!(
            page.headers()["content-type"]
                .to_str()
                .expect("ct")
                .starts_with("text/html")
        );
        assert!(page.text().await.expect("html").contains("/andon"));

        let api: Value = get_json(&http, svc.url("/openapi.json")).await;
        assert_eq!(api["info"]["title"], name);
        assert!(api["paths"]["/status"]["get"].is_object());

        let metrics = metrics_text(&http, &svc).await;
        assert!(
            metrics.contains(r#"http_requests_total{method="GET",route="/status",status="200"} 1"#),
            "{metrics}"
        );
        assert!(metrics.contains("andon_level 0"));
    }
}

#[tokio::test]
async fn rejections_are_json_errors_with_the_right_status_never_5xx() {
    let http = client();
    for (name, route) in SERVICES.into_iter().zip(DOMAIN_ROUTE) {
        let svc = Proc::start(name, &[]).await.expect("start");
        let url = svc.url(route);
        let cases = vec![
            (
                "malformed JSON",
                http.post(&url)
                    .header("content-type", "application/json")
                    .body("{\"a\":"),
                400,
            ),
            (
                "not JSON",
                http.post(&url)
                    .header("content-type", "text/plain")
                    .body("{}"),
                415,
            ),
            ("no content type", http.post(&url).body("{}"), 415),
            (
                "over 64 KiB",
                http.post(&url)
                    .header("content-type", "application/json")
                    .body(vec![b' '; 65 * 1024 + 1]),
                413,
            ),
            ("unknown route", http.get(svc.url("/no/such/route")), 404),
            ("wrong method", http.delete(svc.url("/health")), 405),
        ];
        for (what, req, status) in cases {
            let r = req.send().await.expect(what);
            assert_eq!(r.status().as_u16(), status, "{name}: {what}");
            assert!(
                r.headers()["content-type"]
                    .to_str()
                    .expect("ct")
                    .starts_with("application/json"),
                "{name}: {what}"
            );
            let body: Value = r.json().await.expect("json body");
            assert!(body["error"]["code"].is_string(), "{name}: {what}: {body}");
            assert!(
                body["error"]["message"].is_string(),
                "{name}: {what}: {body}"
            );
        }
        let status: Value = get_json(&http, svc.url("/status")).await;
        assert_eq!(status["kaizen"]["errors"], 0, "none of these was a 5xx");
    }
}

#[tokio::test]
async fn api_keys_guard_mutating_routes_and_prod_refuses_to_start_without_them() {
    let http = client();
    let svc = Proc::start(
        "payment-system",
        &[(
            "TAI_API_KEYS",
            "sk_test_one,sk_test_two,sk_test_ro:merc_ro:read",
        )],
    )
    .await
    .expect("start");
    let r = http
        .post(svc.url("/payment"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = http
        .post(svc.url("/payment"))
        .bearer_auth("sk_wrong")
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    let r = http.get(svc.url("/status")).send().await.expect("get");
    assert_eq!(r.status(), 200, "the common routes need no key");
    // a read-only key reads its merchant's payments and may not create one
    let r = http
        .post(svc.url("/payment"))
        .bearer_auth("sk_test_ro")
        .json(&serde_json::json!({"amount": 10, "currency": "USD", "customer_id": "c_ro", "merchant_id": "merc_ro"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "insufficient_scope", "{body}");
    let r = http
        .get(svc.url("/payments?merchant_id=merc_ro"))
        .bearer_auth("sk_test_ro")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert!(!svc.log().contains("sk_test_one"), "keys are never logged");
    assert!(
        svc.log()
            .contains("3 key(s) (1 bound to a merchant), masked")
    );

    let mut prod =
        Proc::spawn_only("deployment-system", &[("TAI_PROFILE", "prod")]).expect("spawn");
    let code = prod.wait_exit(Duration::from_secs(10)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "prod without keys must refuse to start, got {code:?}"
    );
    assert!(
        prod.log().contains("refuses to start without API keys"),
        "{}",
        prod.log()
    );
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let mut svc = Proc::start("deployment-system", &[]).await.expect("start");
    svc.terminate();
    let code = svc.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "{}", svc.log());
    let log = svc.log();
    assert!(
        log.contains("SIGTERM received") && log.contains("shut down"),
        "{log}"
    );
}

#[tokio::test]
async fn prometheus_scrapes_both_services() {
    let prom = backend("TAI_TEST_PROMETHEUS_URL");
    let pay = Proc::start("payment-system", &[]).await.expect("start");
    let dep = Proc::start("deployment-system", &[]).await.expect("start");
    let run = unique("scrape");
    let targets = serde_json::json!([
        {"targets": [pay.addr()], "labels": {"service": "payment-system", "tai_test": run}},
        {"targets": [dep.addr()], "labels": {"service": "deployment-system", "tai_test": run}},
    ]);
    let _registered = tai_blackbox::ScrapeTargets::register(&run, &targets);

    let http = client();
    let query =
        format!("sum by (service) (http_requests_total{{tai_test=\"{run}\",route=\"/metrics\"}})");
    let services = eventually(
        Duration::from_secs(40),
        "Prometheus to scrape both services",
        || {
            let http = http.clone();
            let url = format!("{prom}/api/v1/query");
            let query = query.clone();
            async move {
                let body: Value = http
                    .get(&url)
                    .query(&[("query", query.as_str())])
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let result = body["data"]["result"].as_array()?;
                let mut names: Vec<String> = result
                    .iter()
                    .filter_map(|r| r["metric"]["service"].as_str().map(str::to_owned))
                    .collect();
                names.sort();
                (names.len() == 2).then_some(names)
            }
        },
    )
    .await;
    assert_eq!(services, vec!["deployment-system", "payment-system"]);
}

#[tokio::test]
async fn spans_are_exported_over_otlp_under_the_trace_id_the_response_names() {
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::routing::post;

    // a collector: accepts OTLP/HTTP protobuf exports and keeps what arrives
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let collector = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                |State(seen): State<Arc<Mutex<Vec<Vec<u8>>>>>, body: axum::body::Bytes| async move {
                    seen.lock().expect("lock").push(body.to_vec());
                    axum::http::StatusCode::OK
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let svc = Proc::start(
        "payment-system",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
    .expect("start");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = client()
        .post(svc.url("/payment"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"amount": "12.00", "currency": "USD", "customer_id": "cust_otlp", "merchant_id": "m"}))
        .send()
        .await
        .expect("pay");
    assert!(
        r.headers()["traceparent"]
            .to_str()
            .expect("tp")
            .starts_with(&format!("00-{trace_id}-"))
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(
        body["trace_id"], trace_id,
        "the caller's trace is continued"
    );

    let raw_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[i * 2..i * 2 + 2], 16).expect("hex"))
        .collect();
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    eventually(
        Duration::from_secs(20),
        "the payment's spans at the collector",
        || {
            let received = received.clone();
            let raw_id = raw_id.clone();
            async move {
                let all: Vec<u8> = received.lock().expect("lock").concat();
                let found = contains(&all, &raw_id)
                    && [
                        b"payment-system".as_slice(),
                        b"signal_received",
                        b"policy",
                        b"breaker_checked",
                        b"gateway_called",
                        b"recorded",
                        b"queued",
                    ]
                    .iter()
                    .all(|n| contains(&all, n));
                found.then_some(())
            }
        },
    )
    .await;
    let all: Vec<u8> = received.lock().expect("lock").concat();
    assert!(!contains(&all, b"4242424242424242"));
}

/// A stand-in for Vault's KV v2 read endpoint (Vault itself cannot be installed here): it
/// answers `GET /v1/<mount>/data/<path>` as Vault does, for one token.
async fn kv2_server(token: &'static str, path: &'static str, fields: Value) -> String {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new()
        .route(
            path,
            axum::routing::get(move |State(fields): State<Value>, headers: HeaderMap| async move {
                if headers.get("x-vault-token").and_then(|v| v.to_str().ok()) != Some(token) {
                    return (StatusCode::FORBIDDEN, axum::Json(serde_json::json!({"errors": ["permission denied"]})));
                }
                let body = serde_json::json!({
                    "request_id": "req-1", "lease_id": "", "renewable": false, "lease_duration": 0,
                    "data": {"data": fields, "metadata": {"created_time": "2026-01-01T00:00:00.000000Z", "custom_metadata": null, "deletion_time": "", "destroyed": false, "version": 3}},
                    "wrap_info": null, "warnings": null, "auth": null
                });
                (StatusCode::OK, axum::Json(body))
            }),
        )
        .with_state(fields);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn api_keys_come_from_vault_when_it_is_configured() {
    let vault = kv2_server(
        "s.root-token",
        "/v1/secret/data/tai/payment-system",
        serde_json::json!({"api_keys": "sk_vault_one, sk_vault_two"}),
    )
    .await;
    let http = client();
    // prod takes no embedded part: a real gateway and queue, SQLite only on one node
    let gw = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
    let (gw_url, nats) = (gw.url(""), tai_blackbox::backend("TAI_TEST_NATS_URL"));
    let svc = Proc::start(
        "payment-system",
        &[
            ("TAI_PROFILE", "prod"),
            ("VAULT_ADDR", vault.as_str()),
            ("VAULT_TOKEN", "s.root-token"),
            ("TAI_SINGLE_NODE", "true"),
            ("GATEWAY_URL", gw_url.as_str()),
            ("NATS_URL", nats.as_str()),
        ],
    )
    .await
    .expect("start");
    let status: Value = get_json(&http, svc.url("/status")).await;
    assert_eq!(status["backends"]["secrets"], "vault");
    let ready: Value = get_json(&http, svc.url("/ready")).await;
    assert_eq!(ready["checks"]["vault"], "ok");
    let body = serde_json::json!({"amount": "1.00", "currency": "USD", "customer_id": "cust_v", "merchant_id": "m"});
    assert_eq!(
        http.post(svc.url("/payment"))
            .json(&body)
            .send()
            .await
            .expect("p")
            .status(),
        401
    );
    let r = http
        .post(svc.url("/payment"))
        .bearer_auth("sk_vault_two")
        .json(&body)
        .send()
        .await
        .expect("p");
    assert_eq!(r.status(), 200);
    let log = svc.log();
    assert!(
        !log.contains("sk_vault_one")
            && !log.contains("sk_vault_two")
            && !log.contains("s.root-token"),
        "secrets never reach a log"
    );
    assert!(log.contains("API keys read from Vault"));

    // a wrong token: the service says why it cannot start
    let mut wrong = Proc::spawn_only(
        "payment-system",
        &[
            ("TAI_PROFILE", "prod"),
            ("VAULT_ADDR", vault.as_str()),
            ("VAULT_TOKEN", "s.wrong"),
            ("TAI_SINGLE_NODE", "true"),
            ("GATEWAY_URL", gw_url.as_str()),
            ("NATS_URL", nats.as_str()),
        ],
    )
    .expect("spawn");
    let code = wrong.wait_exit(Duration::from_secs(15)).await;
    assert!(matches!(code, Some(c) if c != 0), "{code:?}");
    assert!(
        wrong.log().contains("cannot read secrets from Vault"),
        "{}",
        wrong.log()
    );
    assert!(!wrong.log().contains("s.wrong"));
}

/// The page as a person's browser shows it: headless Chromium runs its script, then the DOM.
async fn rendered(url: &str) -> String {
    let profile = std::env::temp_dir().join(unique("chromium-profile"));
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ])
        .output()
        .await
        .expect("chromium (make test installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_andon_page_shows_the_level_and_its_reasons_in_a_browser() {
    let pay = Proc::start("payment-system", &[]).await.expect("start");
    let dom = rendered(&pay.url("/")).await;
    assert!(
        dom.contains(r#"<header id="level" class="GREEN">payment-system: GREEN</header>"#),
        "{dom}"
    );
    assert!(dom.contains("payment-gateway: closed"), "{dom}");
    assert!(dom.contains("payment-confirmations (local)"), "{dom}");

    // one blocked payment of one: the fraud share is far over 2%
    let body = serde_json::json!({"amount": 1, "currency": "USD", "customer_id": "cust_blacklist", "merchant_id": "m"});
    client()
        .post(pay.url("/payment"))
        .json(&body)
        .send()
        .await
        .expect("pay");
    let dom = rendered(&pay.url("/")).await;
    assert!(
        dom.contains(r#"<header id="level" class="RED">payment-system: RED</header>"#),
        "{dom}"
    );
    assert!(
        dom.contains("share of recent payments blocked for fraud"),
        "{dom}"
    );
    assert!(
        dom.contains("GREEN → RED"),
        "the history shows the change: {dom}"
    );
    assert!(dom.contains("fraud_rate: 1"), "{dom}");
}

#[tokio::test]
async fn the_contract_document_and_the_openapi_documents_name_the_same_routes() {
    // docs/API.md is the contract: every route a service documents in /openapi.json is in it,
    // and every route it names for the services (not the sandbox gateway's /v1) is served
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
        .expect("docs/API.md");
    let shape = |path: &str| -> String {
        let mut out = String::new();
        let mut in_param = false;
        for c in path.chars() {
            match c {
                '{' => {
                    in_param = true;
                    out.push_str("{}");
                }
                '}' => in_param = false,
                c if !in_param => out.push(c),
                _ => {}
            }
        }
        out
    };
    let mut documented = std::collections::BTreeSet::new();
    for method in ["GET", "POST", "DELETE", "PUT", "PATCH"] {
        for (i, _) in docs.match_indices(&format!("`{method} /")) {
            let rest = &docs[i + method.len() + 2..];
            let end = rest.find(['`', ' ', '?']).unwrap_or(rest.len());
            let path = &rest[..end];
            if !path.starts_with("/v1/") {
                documented.insert((method.to_ascii_lowercase(), shape(path)));
            }
        }
    }
    let http = client();
    let mut served = std::collections::BTreeSet::new();
    for name in ["payment-system", "deployment-system"] {
        let svc = Proc::start(name, &[]).await.expect("start");
        let api: Value = get_json(&http, svc.url("/openapi.json")).await;
        for (path, ops) in api["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                let route = (method.clone(), shape(path));
                assert!(
                    documented.contains(&route),
                    "{name}: {} {path} is served but not in docs/API.md",
                    method.to_ascii_uppercase()
                );
                served.insert(route);
            }
        }
    }
    for (method, path) in &documented {
        assert!(
            served.contains(&(method.clone(), path.clone())),
            "docs/API.md names {} {path}, which no service serves",
            method.to_ascii_uppercase()
        );
    }
}

#[tokio::test]
async fn the_openapi_documents_name_every_route_each_service_serves() {
    let http = client();
    for (name, routes) in [
        (
            "payment-system",
            vec![
                ("/payment", "post"),
                ("/payment/{transaction_id}", "get"),
                ("/admin/blocklist", "post"),
                ("/admin/blocklist", "get"),
                ("/admin/blocklist/{customer_id}", "delete"),
                ("/payment/{transaction_id}/capture", "post"),
                ("/payment/{transaction_id}/void", "post"),
                ("/payment/{transaction_id}/refunds", "post"),
                ("/payment/{transaction_id}/approve", "post"),
                ("/payment/{transaction_id}/reject", "post"),
                ("/payments", "get"),
                ("/reviews", "get"),
                ("/events", "get"),
                ("/webhook_endpoints", "post"),
                ("/webhook_endpoints", "get"),
                ("/webhook_endpoints/{endpoint_id}", "get"),
                ("/webhook_endpoints/{endpoint_id}", "delete"),
                ("/webhook_endpoints/{endpoint_id}/enable", "post"),
                ("/webhook_endpoints/{endpoint_id}/deliveries", "get"),
            ],
        ),
        (
            "deployment-system",
            vec![
                ("/deploy", "post"),
                ("/deploy/{deployment_id}", "get"),
                ("/deploy/{deployment_id}/abort", "post"),
                ("/deploy/{deployment_id}/promote", "post"),
                ("/deploy/{deployment_id}/pause", "post"),
                ("/deploy/{deployment_id}/resume", "post"),
                ("/deployments", "get"),
                ("/fleet", "get"),
            ],
        ),
    ] {
        let svc = Proc::start(name, &[]).await.expect("start");
        let api: Value = get_json(&http, svc.url("/openapi.json")).await;
        for (path, method) in routes.iter().chain(
            [
                ("/health", "get"),
                ("/ready", "get"),
                ("/metrics", "get"),
                ("/status", "get"),
                ("/andon", "get"),
                ("/", "get"),
                ("/openapi.json", "get"),
            ]
            .iter(),
        ) {
            let op = &api["paths"][*path][*method];
            assert!(op.is_object(), "{name}: {method} {path} is not documented");
            assert!(
                op["responses"].is_object(),
                "{name}: {method} {path} documents no responses"
            );
        }
    }
}

/// Supervision: a background worker that panics (made to, through the test hook) is started
/// again, shows its restarts on `/status` and in the metrics, keeps doing its job, and turns
/// Andon YELLOW when it restarts too often; a handler that panics answers a JSON 500.
#[tokio::test]
async fn a_worker_that_panics_is_restarted_and_keeps_working_and_a_handler_panic_is_a_json_500() {
    let svc = Proc::start(
        "payment-system",
        &[
            ("TAI_TEST_HOOKS", "true"),
            ("AUTHORIZATION_TTL_SECS", "2"),
            ("RECONCILE_EVERY_MS", "200"),
        ],
    )
    .await
    .expect("payment-system");
    let http = client();
    let status: Value = get_json(&http, svc.url("/status")).await;
    let reconciler = &status["workers"]["reconciler"];
    assert_eq!(reconciler["state"], "running", "{status}");
    assert_eq!(reconciler["restarts"], 0);
    for worker in [
        "confirmations-0",
        "confirmations-7",
        "webhook_deliveries",
        "webhook_backlog",
        "state_sweep",
    ] {
        assert_eq!(
            status["workers"][worker]["state"], "running",
            "{worker}: {status}"
        );
    }
    let metrics = metrics_text(&http, &svc).await;
    assert!(
        metrics.contains("tai_worker_restarts_total{worker=\"reconciler\"} 0"),
        "restarts are exported at 0 from the start"
    );

    let poison = |worker: &str| {
        let (http, url) = (
            http.clone(),
            svc.url(&format!("/debug/workers/{worker}/panic")),
        );
        async move { http.post(url).send().await.expect("hook").status().as_u16() }
    };
    assert_eq!(poison("nobody").await, 404);
    assert_eq!(poison("reconciler").await, 202);
    let after = eventually(Duration::from_secs(10), "the reconciler restarted", || {
        let http = http.clone();
        let url = svc.url("/status");
        async move {
            let s: Value = get_json(&http, url).await;
            let r = s["workers"]["reconciler"].clone();
            (r["restarts"] == 1 && r["state"] == "running").then_some(r)
        }
    })
    .await;
    assert!(
        after["last_exit"]
            .as_str()
            .is_some_and(|e| e.starts_with("panicked")),
        "{after}"
    );
    let metrics = metrics_text(&http, &svc).await;
    assert!(metrics.contains("tai_worker_restarts_total{worker=\"reconciler\"} 1"));
    assert_eq!(
        get_json(&http, svc.url("/andon")).await["level"],
        "GREEN",
        "one restart is not trouble"
    );

    // the restarted reconciler still does its job: an authorization left past its TTL is voided
    let body = json!({"amount": "10.00", "currency": "USD", "merchant_id": "m_sup",
        "customer_id": unique("cust"), "capture": false});
    let auth: Value = http
        .post(svc.url("/payment"))
        .json(&body)
        .send()
        .await
        .expect("authorize")
        .json()
        .await
        .expect("json");
    assert_eq!(auth["status"], "AUTHORIZED", "{auth}");
    let id = auth["transaction_id"].as_str().expect("id").to_owned();
    let voided = eventually(
        Duration::from_secs(15),
        "the lapsed authorization voided",
        || {
            let http = http.clone();
            let url = svc.url(&format!("/payment/{id}"));
            async move {
                let p: Value = get_json(&http, url).await;
                (p["status"] == "VOIDED").then_some(p)
            }
        },
    )
    .await;
    assert_eq!(voided["void_reason"], "expired");

    // restarting over and over is trouble: Andon YELLOW, naming the rule
    for n in 2..=3 {
        assert_eq!(poison("reconciler").await, 202);
        eventually(
            Duration::from_secs(10),
            "the reconciler restarted again",
            || {
                let http = http.clone();
                let url = svc.url("/status");
                async move {
                    let s: Value = get_json(&http, url).await;
                    (s["workers"]["reconciler"]["restarts"] == n).then_some(())
                }
            },
        )
        .await;
    }
    let andon = eventually(Duration::from_secs(5), "Andon YELLOW", || {
        let http = http.clone();
        let url = svc.url("/andon");
        async move {
            let a: Value = get_json(&http, url).await;
            (a["level"] == "YELLOW").then_some(a)
        }
    })
    .await;
    assert!(andon.to_string().contains("worker_restarting"), "{andon}");

    // a handler that panics: a JSON 500, and the service goes on
    let r = http
        .post(svc.url("/debug/panic"))
        .send()
        .await
        .expect("the connection is answered, not dropped");
    assert_eq!(r.status().as_u16(), 500);
    let err: Value = r.json().await.expect("a JSON body");
    assert_eq!(err["error"]["code"], "internal_error", "{err}");
    assert_eq!(
        http.get(svc.url("/health"))
            .send()
            .await
            .expect("health")
            .status()
            .as_u16(),
        200
    );
}

/// A payment's trace continues into the gateway: the charge the payment service sends carries
/// a `traceparent` of the caller's trace, so one trace spans both services.
#[tokio::test]
async fn the_gateway_call_carries_the_callers_trace() {
    let http = client();
    let gw = Proc::start("sandbox-gateway", &[]).await.expect("gateway");
    let gw_url = gw.url("");
    let svc = Proc::start("payment-system", &[("GATEWAY_URL", gw_url.as_str())])
        .await
        .expect("start");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = http
        .post(svc.url("/payment"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"amount": "1.00", "currency": "USD",
            "customer_id": "cust_trace", "merchant_id": "m",
            "card": {"number": "4242424242424242", "exp_month": 12, "exp_year": 2099}}))
        .send()
        .await
        .expect("pay");
    assert_eq!(r.status(), 200);
    let log = gw.log();
    let charge = log
        .lines()
        .find(|l| l.starts_with("POST /v1/charges "))
        .unwrap_or_else(|| panic!("no charge in the gateway's log:\n{log}"));
    assert!(
        charge.contains(&format!("traceparent=00-{trace}-")),
        "{charge}"
    );
    // and the answer names the same trace
    assert!(
        r.headers()["traceparent"]
            .to_str()
            .is_ok_and(|t| t.contains(trace))
    );
}

/// A card the network would decline is answered only after the caller's right to pay for the
/// merchant: a key bound to another merchant gets 403, not a 402 that would tell card testers
/// which numbers are wrong.
#[tokio::test]
async fn a_declined_card_for_another_merchant_is_forbidden_first() {
    let http = client();
    let svc = Proc::start("payment-system", &[("TAI_API_KEYS", "sk_a:merc_a")])
        .await
        .expect("start");
    let body = |merchant: &str| {
        serde_json::json!({"amount": "1.00", "currency": "USD", "customer_id": "cust_d",
            "merchant_id": merchant,
            "card": {"number": "4242424242424241", "exp_month": 12, "exp_year": 2099}})
    };
    let status = |merchant: &'static str| {
        let http = http.clone();
        let url = svc.url("/payment");
        async move {
            let r = http
                .post(url)
                .bearer_auth("sk_a")
                .json(&body(merchant))
                .send()
                .await
                .expect("pay");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, e) = status("merc_b").await;
    assert_eq!(s, 403, "{e}");
    let (s, e) = status("merc_a").await;
    assert_eq!(s, 402, "{e}");
    assert_eq!(e["error"]["code"], "incorrect_number", "{e}");
    // nothing was stored for it
    let listed: Value = http
        .get(svc.url("/payments?merchant_id=merc_a"))
        .bearer_auth("sk_a")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["data"], serde_json::json!([]), "{listed}");
}
