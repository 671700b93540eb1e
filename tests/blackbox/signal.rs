//! examples/signal-service: the framework's proof, over HTTP.

use std::time::Duration;

use serde_json::{Value, json};
use tai_blackbox::{Proc, client, eventually, get_json, metrics_text};

async fn send(http: &reqwest::Client, svc: &Proc, body: Value) -> (u16, Value) {
    let r = http
        .post(svc.url("/signal"))
        .json(&body)
        .send()
        .await
        .expect("answer");
    (r.status().as_u16(), r.json().await.expect("json"))
}

async fn settled(http: &reqwest::Client, svc: &Proc, id: &str) -> Value {
    eventually(
        Duration::from_secs(20),
        "the signal to be worked",
        || async {
            let r = get_json(http, svc.url(&format!("/signal/{id}/status"))).await;
            matches!(r["status"].as_str(), Some("done" | "failed")).then_some(r)
        },
    )
    .await
}

#[tokio::test]
async fn signals_are_levelled_across_the_worker_pool_and_each_is_done_once() {
    let svc = Proc::start("signal-service", &[("WORKERS", "4"), ("WORK_MS", "40")])
        .await
        .expect("signal-service");
    let http = client();
    let info = get_json(&http, svc.url("/info")).await;
    assert_eq!(
        (info["workers"].as_u64(), info["queue"]["backend"].as_str()),
        (Some(4), Some("local")),
        "{info}"
    );
    let sends = (0..40).map(|i| {
        let (http, svc) = (http.clone(), &svc);
        async move {
            send(
                &http,
                svc,
                json!({"kind": "order.created", "order": i, "amount": 12.5}),
            )
            .await
        }
    });
    let answers = futures_util::future::join_all(sends).await;
    let mut ids = Vec::new();
    for (code, body) in answers {
        assert_eq!(code, 202, "{body}");
        assert_eq!(
            (body["status"].as_str(), body["priority"].as_u64()),
            (Some("queued"), Some(5)),
            "{body}"
        );
        ids.push(body["id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        let r = settled(&http, &svc, id).await;
        assert_eq!(
            (r["status"].as_str(), r["attempts"].as_u64()),
            (Some("done"), Some(1)),
            "{r}"
        );
        assert_eq!(r["amount"], json!(12.5), "the payload is kept as sent: {r}");
    }
    let status = get_json(&http, svc.url("/status")).await;
    let pool = status["worker_pool"]
        .as_array()
        .expect("worker_pool")
        .clone();
    let handled: Vec<u64> = pool
        .iter()
        .map(|w| w["handled"].as_u64().expect("handled"))
        .collect();
    assert_eq!(
        handled.iter().sum::<u64>(),
        40,
        "each signal handled once: {pool:?}"
    );
    assert!(
        handled.iter().all(|h| *h >= 4),
        "the load levels across the workers: {handled:?}"
    );
    assert_eq!(
        status["backends"]["queue"].as_str(),
        Some("local"),
        "{status}"
    );
    assert_eq!(status["andon"]["level"].as_str(), Some("GREEN"), "{status}");
}

#[tokio::test]
async fn the_policy_rejects_bad_input_is_refused_and_a_failed_signal_can_be_retried() {
    let svc = Proc::start(
        "signal-service",
        &[("WORK_MS", "5"), ("DENY_KINDS", "spam,junk")],
    )
    .await
    .expect("signal-service");
    let http = client();
    let (code, body) = send(&http, &svc, json!({"kind": "junk", "priority": 3})).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (200, Some("rejected")),
        "{body}"
    );
    assert_eq!(
        body["verdict"]["reasons"][0]["rule"].as_str(),
        Some("kind_denied"),
        "{body}"
    );

    for bad in [
        json!({"kind": "Bad Kind"}),
        json!({"kind": "ok", "priority": 12}),
        json!({"priority": 1}),
        json!([1]),
    ] {
        let (code, body) = send(&http, &svc, bad.clone()).await;
        assert_eq!(code, 400, "{bad} -> {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let metrics = metrics_text(&http, &svc).await;
    assert!(
        metrics.contains("signals_total{outcome=\"queued\"} 0"),
        "bad input stored nothing: {metrics}"
    );

    let (code, body) = send(&http, &svc, json!({"kind": "flaky", "fail_times": 1})).await;
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_owned();
    let failed = settled(&http, &svc, &id).await;
    assert_eq!(
        (
            failed["status"].as_str(),
            failed["outcome"]["result"].as_str()
        ),
        (Some("failed"), Some("failed")),
        "{failed}"
    );
    let retried = http
        .post(svc.url(&format!("/signal/{id}/retry")))
        .send()
        .await
        .expect("retry");
    assert_eq!(retried.status().as_u16(), 202);
    let done = settled(&http, &svc, &id).await;
    assert_eq!(
        (done["status"].as_str(), done["attempts"].as_u64()),
        (Some("done"), Some(2)),
        "{done}"
    );
    let again = http
        .post(svc.url(&format!("/signal/{id}/retry")))
        .send()
        .await
        .expect("retry");
    assert_eq!(
        again.status().as_u16(),
        409,
        "only a failed signal is retried"
    );
    let missing = http
        .get(svc.url("/signal/sig_nope/status"))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status().as_u16(), 404);
}
