//! Traces: W3C Trace Context carried through the queue, and OTLP export.
//!
//! The gateway reads `traceparent` from `POST /tasks` (or starts a trace), and the task's
//! message carries it in its headers; the worker continues that trace: a span for the wait in
//! the queue (from the submission to the start), and one per attempt. Retries and moves to
//! the dead-letter queue copy the headers, so every attempt belongs to the request's trace;
//! each attempt after the first also links to the first attempt's span (header
//! `x-offload-first-attempt`). Calls to HTTP targets carry the attempt's `traceparent`.
//!
//! Spans are exported with OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, with the standard `OTEL_*` variables for the
//! rest; otherwise no span is recorded and nothing is sent anywhere, and a `traceparent` a
//! client sent still travels with its task, unchanged.

use std::{collections::HashMap, sync::OnceLock, time::SystemTime};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendors' trace state.
pub const TRACESTATE: &str = "tracestate";
/// The `traceparent` of a task's first attempt, which later attempts link to.
pub const FIRST_ATTEMPT_HEADER: &str = "x-offload-first-attempt";

/// The tracer for spans made outside `tracing` (the wait in the queue); set once, at start,
/// when spans are exported.
static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();

/// Whether spans are recorded and exported.
pub fn exporting() -> bool {
    TRACER.get().is_some()
}

/// Whether the environment asks for OTLP export.
pub fn export_wanted() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// The OTLP pipeline: a tracer provider exporting in batches on the tokio runtime, named
/// `service` unless `OTEL_SERVICE_NAME` says otherwise. Call from within the runtime.
pub fn provider(service: &'static str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|error| format!("cannot set up OTLP export: {error}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build())
        .with_resource(resource.build())
        .build();
    let _ = TRACER.set(provider.tracer("offload"));
    Ok(provider)
}

/// A `tracing` layer recording spans into `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("offload"))
}

struct Headers<'a>(&'a FieldTable);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .inner()
            .keys()
            .map(lapin::types::ShortString::as_str)
            .collect()
    }
}

struct HeadersMut<'a>(&'a mut FieldTable);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0
            .insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }
}

/// The trace context of W3C headers (`traceparent`, `tracestate`); empty when they are
/// missing or malformed.
pub fn from_w3c(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let mut carrier = HashMap::new();
    if let Some(parent) = traceparent {
        carrier.insert(TRACEPARENT.to_owned(), parent.to_owned());
    }
    if let Some(state) = tracestate {
        carrier.insert(TRACESTATE.to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The W3C headers of `context` (none for an empty one).
pub fn to_w3c(context: &Context) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(context, &mut carrier);
    carrier
}

/// The trace context a message carries.
pub fn from_message(properties: &BasicProperties) -> Context {
    properties
        .headers()
        .as_ref()
        .map_or_else(Context::new, |headers| {
            TraceContextPropagator::new().extract(&Headers(headers))
        })
}

/// Writes `context` into message headers.
pub fn into_message(context: &Context, headers: &mut FieldTable) {
    TraceContextPropagator::new().inject_context(context, &mut HeadersMut(headers));
}

/// The context to carry on from `span`: its own when spans are exported, else `fallback`
/// (what came in, passed on unchanged).
pub fn context_of(span: &tracing::Span, fallback: Context) -> Context {
    if exporting() {
        span.context()
    } else {
        fallback
    }
}

/// Makes `span` (a worker's attempt at a task) continue the trace its message carries:
/// records the wait in the queue from `submitted_at` until now as a span of its own, makes
/// `span` a child of the request, and, from the second attempt on, links it to the first.
/// Does nothing unless spans are exported.
pub fn continue_in_worker(
    span: &tracing::Span,
    properties: &BasicProperties,
    submitted_at: SystemTime,
    attempt: u32,
) {
    let Some(tracer) = TRACER.get() else {
        return;
    };
    let parent = from_message(properties);
    let mut waited = tracer
        .span_builder("wait in queue")
        .with_kind(SpanKind::Consumer)
        .with_start_time(submitted_at)
        .with_attributes([KeyValue::new("offload.attempt", i64::from(attempt))])
        .start_with_context(tracer, &parent);
    waited.end();
    let _ = span.set_parent(parent);
    if attempt > 1
        && let Some(first) = properties.headers().as_ref().and_then(|headers| {
            Headers(headers)
                .get(FIRST_ATTEMPT_HEADER)
                .map(str::to_owned)
        })
    {
        let first = from_w3c(Some(&first), None);
        span.add_link(first.span().span_context().clone());
    }
}

/// For a task about to wait for its next attempt: the first attempt's `traceparent`, which
/// later attempts link to; `None` when the message has it already or spans are not exported.
pub fn first_attempt_link(span: &tracing::Span, properties: &BasicProperties) -> Option<String> {
    if !exporting() {
        return None;
    }
    let known = properties
        .headers()
        .as_ref()
        .is_some_and(|headers| headers.inner().contains_key(FIRST_ATTEMPT_HEADER));
    if known {
        return None;
    }
    to_w3c(&span.context()).remove(TRACEPARENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_travels_through_message_headers_unchanged() {
        let incoming = from_w3c(Some(PARENT), Some("vendor=1"));
        let mut headers = FieldTable::default();
        into_message(&incoming, &mut headers);
        let properties = BasicProperties::default().with_headers(headers);
        let outgoing = to_w3c(&from_message(&properties));
        assert_eq!(outgoing.get(TRACEPARENT).map(String::as_str), Some(PARENT));
        assert_eq!(
            outgoing.get(TRACESTATE).map(String::as_str),
            Some("vendor=1")
        );
    }

    #[test]
    fn a_malformed_traceparent_is_no_trace() {
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(to_w3c(&from_w3c(Some(bad), None)).is_empty(), "{bad}");
        }
        assert!(to_w3c(&from_message(&BasicProperties::default())).is_empty());
    }
}
