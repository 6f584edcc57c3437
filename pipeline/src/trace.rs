//! Trace context across the streams. A producer may send a W3C `traceparent` field; ingest
//! starts an `ingest.event` span under it and carries that span's traceparent in the frame
//! (field `traceparents`); batch-writer starts its `batch_writer.copy` span under each, so one
//! trace shows XADD → ingest → COPY. Only entries that carry a traceparent get per-event
//! spans (at most `[tracing] max_event_spans_per_batch` per batch); batches themselves get one
//! span each, sampled at `[tracing] sample_ratio`.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Field of a frame entry listing the traceparents of the traced events it carries.
pub const TRACEPARENTS_FIELD: &str = "traceparents";

/// Whether an OpenTelemetry exporter is installed in this process.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Marks OpenTelemetry as installed (by the binary, when `OTEL_EXPORTER_OTLP_*` is set).
pub fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Parses `00-<trace id>-<span id>-<flags>`.
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// Makes `span` a child of the remote span `traceparent` (ignored if malformed).
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = parse_traceparent(traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(sc));
    }
}

/// The traceparent of `span`, if it is recorded by OpenTelemetry and sampled.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn traceparents_parse_and_reject_garbage() {
        let sc =
            super::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(super::parse_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        )
        .is_none());
        assert!(super::parse_traceparent("not a traceparent").is_none());
    }
}
