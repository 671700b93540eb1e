use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::clock::ManualClock;
use crate::runtime::config::Sources;

#[derive(serde::Deserialize)]
struct Echo {
    name: String,
}

async fn echo(ApiJson(body): ApiJson<Echo>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "name": body.name }))
}

fn app(env: &[(&str, &str)]) -> Router {
    let sources = Sources::from_parts(env, "").expect("sources");
    let config = RuntimeConfig::from_sources("test-svc", "127.0.0.1:0", sources).expect("config");
    let runtime = Runtime::new(config, "0.0.0", ManualClock::new().shared());
    runtime.into_router(
        Router::new().route("/echo", post(echo)),
        utoipa::openapi::OpenApiBuilder::new().build(),
    )
}

async fn send(
    app: &Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
    let response = app.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, headers, json)
}

fn post_json(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .expect("request")
}

#[tokio::test]
async fn every_rejection_is_a_json_error_with_its_status() {
    let app = app(&[]);
    let cases: Vec<(Request<Body>, u16, &str)> = vec![
        (post_json("/echo", "{not json"), 400, "invalid_json"),
        (
            post_json("/echo", r#"{"name": 5}"#),
            400,
            "parameter_invalid",
        ),
        (post_json("/echo", ""), 400, "empty_body"),
        (
            Request::post("/echo")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .expect("req"),
            415,
            "unsupported_media_type",
        ),
        (
            post_json("/echo", vec![b' '; 70 * 1024]),
            413,
            "body_too_large",
        ),
        (
            Request::get("/nope").body(Body::empty()).expect("req"),
            404,
            "route_not_found",
        ),
        (
            Request::get("/echo").body(Body::empty()).expect("req"),
            405,
            "method_not_allowed",
        ),
    ];
    for (req, status, code) in cases {
        let (s, headers, body) = send(&app, req).await;
        assert_eq!(s.as_u16(), status, "{code}: {body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(headers.get("x-request-id").is_some());
        assert!(headers.get("traceparent").is_some());
    }
    let (s, _, body) = send(&app, post_json("/echo", r#"{"name":"ok"}"#)).await;
    assert_eq!((s.as_u16(), body["name"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn request_ids_and_trace_context_are_continued() {
    let app = app(&[]);
    let req = Request::get("/health")
        .header("x-request-id", "req-123")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Body::empty())
        .expect("req");
    let (s, headers, body) = send(&app, req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"status":"ok"}));
    assert_eq!(headers["x-request-id"], "req-123");
    let tp = headers["traceparent"].to_str().expect("ascii");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
}

#[tokio::test]
async fn mutating_routes_need_a_key_when_keys_are_configured() {
    let app = app(&[("TAI_API_KEYS", "k_one,k_two")]);
    let (s, headers, body) = send(&app, post_json("/echo", r#"{"name":"a"}"#)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let mut req = post_json("/echo", r#"{"name":"a"}"#);
    req.headers_mut()
        .insert("authorization", "Bearer k_wrong".parse().expect("hv"));
    assert_eq!(send(&app, req).await.0, StatusCode::UNAUTHORIZED);
    let mut req = post_json("/echo", r#"{"name":"a"}"#);
    req.headers_mut()
        .insert("authorization", "Bearer k_two".parse().expect("hv"));
    assert_eq!(send(&app, req).await.0, StatusCode::OK);
    // a read-only key reads, and is refused a change
    let scoped = self::app(&[("TAI_API_KEYS", "k_one,k_ro::read")]);
    let mut req = post_json("/echo", r#"{"name":"a"}"#);
    req.headers_mut()
        .insert("authorization", "Bearer k_ro".parse().expect("hv"));
    let (s, _, body) = send(&scoped, req).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "insufficient_scope");
    let mut req = Request::get("/echo").body(Body::empty()).expect("req");
    req.headers_mut()
        .insert("authorization", "Bearer k_ro".parse().expect("hv"));
    assert_eq!(
        send(&scoped, req).await.0,
        StatusCode::METHOD_NOT_ALLOWED,
        "past authentication: the route only takes POST"
    );
    // the common routes stay open
    let (s, _, _) = send(
        &app,
        Request::get("/status").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn common_routes_answer() {
    let app = app(&[]);
    let _ = send(
        &app,
        Request::get("/nope").body(Body::empty()).expect("req"),
    )
    .await;
    let (s, _, status) = send(
        &app,
        Request::get("/status").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(status["service"], "test-svc");
    assert_eq!(status["andon"]["level"], "GREEN");
    let (_, _, andon) = send(
        &app,
        Request::get("/andon").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(andon["level"], "GREEN");
    assert!(andon["since"].is_string());
    let (_, _, api) = send(
        &app,
        Request::get("/openapi.json")
            .body(Body::empty())
            .expect("req"),
    )
    .await;
    assert!(api["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert!(api["paths"]["/health"].is_object());
    let response = app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).expect("req"))
        .await
        .expect("infallible");
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .expect("b")
            .to_bytes()
            .to_vec(),
    )
    .expect("utf8");
    assert!(
        text.contains(r#"http_requests_total{method="GET",route="unmatched",status="404"} 1"#),
        "{text}"
    );
    assert!(text.contains("andon_level 0"));
    let response = app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).expect("req"))
        .await
        .expect("infallible");
    assert_eq!(
        response.headers()["content-type"],
        "text/html; charset=utf-8",
        "the Andon board is a page for people"
    );
    let page = response.into_body().collect().await.expect("b").to_bytes();
    assert!(page.starts_with(b"<!doctype html>"));
    assert!(String::from_utf8_lossy(&page).contains("<title>Andon</title>"));
}
