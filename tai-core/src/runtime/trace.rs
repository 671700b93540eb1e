//! W3C trace context: continue an incoming `traceparent`, or start a trace.
//!
//! Each request gets a [`TraceContext`] in its extensions: the trace id it belongs to (the
//! caller's, when the caller sent a valid `traceparent`) and a span id of its own. The response
//! carries `traceparent` back, so a client can find the trace of any answer; services also put
//! the trace id in response bodies (the payment response's `trace_id`).

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The trace position of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lower-case hex digits.
    pub trace_id: String,
    /// This request's span: 16 lower-case hex digits.
    pub span_id: String,
    /// The caller's span, when the trace was continued.
    pub parent_span_id: Option<String>,
    /// The sampled flag.
    pub sampled: bool,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn new_span_id() -> String {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return format!("{id:016x}");
        }
    }
}

impl TraceContext {
    /// A new trace.
    pub fn root() -> Self {
        let trace: u128 = loop {
            let t: u128 = rand::random();
            if t != 0 {
                break t;
            }
        };
        Self {
            trace_id: format!("{trace:032x}"),
            span_id: new_span_id(),
            parent_span_id: None,
            sampled: true,
        }
    }

    /// Continues a valid `traceparent` (version 00 or a later one read as 00); `None` if invalid.
    pub fn continue_from(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !is_hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
            return None;
        }
        if !is_hex(parent, 16) || parent.bytes().all(|b| b == b'0') || !is_hex(flags, 2) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace.to_owned(),
            span_id: new_span_id(),
            parent_span_id: Some(parent.to_owned()),
            sampled: flags & 1 == 1,
        })
    }

    /// This context as a `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

tokio::task_local! {
    /// The trace of the request this task serves.
    static CURRENT: TraceContext;
}

/// The `traceparent` to send on a call this service makes (to the gateway, a webhook endpoint,
/// a registry, Prometheus, a health probe), so one trace spans the services: a child of the
/// span being run when spans are exported, else of the request being served, else (a
/// background worker outside any request) the start of a new trace.
pub fn outbound() -> String {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let otel = tracing::Span::current().context();
    let exported = otel.span().span_context().clone();
    if exported.is_valid() {
        return format!(
            "00-{}-{}-{:02x}",
            exported.trace_id(),
            exported.span_id(),
            u8::from(exported.is_sampled())
        );
    }
    CURRENT
        .try_with(TraceContext::traceparent)
        .unwrap_or_else(|_| TraceContext::root().traceparent())
}

/// Runs `fut` as part of the trace `ctx` (for work a request hands to another task), so the
/// calls it makes carry the request's trace.
pub async fn within<F: std::future::Future>(ctx: TraceContext, fut: F) -> F::Output {
    CURRENT.scope(ctx, fut).await
}

/// Middleware: reads or starts the trace, runs the request in a span carrying the trace and
/// request ids, and answers with `traceparent`.
pub(crate) async fn trace_context(mut req: Request, next: Next) -> Response {
    let ctx = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::continue_from)
        .unwrap_or_else(TraceContext::root);
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        trace_id = %ctx.trace_id,
        span_id = %ctx.span_id,
        request_id = %request_id,
    );
    let mut ctx = ctx;
    adopt_otel_ids(&span, &mut ctx);
    let header = HeaderValue::from_str(&ctx.traceparent()).ok();
    req.extensions_mut().insert(ctx.clone());
    let mut response = CURRENT.scope(ctx, next.run(req).instrument(span)).await;
    if let Some(h) = header {
        response.headers_mut().insert("traceparent", h);
    }
    response
}

/// When spans are exported, the exported request span must carry the same ids the response
/// names: continue the caller's trace under its span, and take the ids the exporter assigned.
fn adopt_otel_ids(span: &tracing::Span, ctx: &mut TraceContext) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let (Some(parent), Ok(trace_id)) = (&ctx.parent_span_id, TraceId::from_hex(&ctx.trace_id))
        && let Ok(parent_id) = SpanId::from_hex(parent)
    {
        let flags = if ctx.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let remote = SpanContext::new(trace_id, parent_id, flags, true, TraceState::default());
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let otel = span.context();
    let exported = otel.span().span_context().clone();
    if exported.is_valid() {
        ctx.trace_id = exported.trace_id().to_string();
        ctx.span_id = exported.span_id().to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_valid_and_refuses_invalid_traceparents() {
        let c =
            TraceContext::continue_from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .expect("valid");
        assert_eq!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(c.span_id, "00f067aa0ba902b7");
        assert!(
            c.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceContext::continue_from(bad).is_none(), "{bad}");
        }
        let root = TraceContext::root();
        assert!(is_hex(&root.trace_id, 32) && is_hex(&root.span_id, 16));
    }
}
