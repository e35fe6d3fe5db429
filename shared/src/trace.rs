//! Traces across services: a command's path (gateway → `USYNC_CMDS` → sequencer →
//! `USYNC_OPS` → the answer → gateway) as one OpenTelemetry trace, exported as OTLP
//! over HTTP (protobuf) when `ULTRASYNC_OTLP_ENDPOINT` is set, and off otherwise.
//!
//! - Each service asks for its [`Tracer`] once ([`Tracer::for_service`]); every
//!   service of a process gets its own provider, so spans carry the right
//!   `service.name` even when one process runs them all (`ultrasync dev`).
//! - Context crosses NATS as W3C `traceparent` values ([`Span::traceparent`],
//!   [`Tracer::continue_from`]). A message carrying several commands names each
//!   traced one's context in [`HDR_TRACE`] (`"{line} {traceparent}"`, one value per
//!   command), so every command keeps its own trace.
//! - Traces start at the gateway. A client's own `traceparent` is not followed: a
//!   tenant could otherwise force every command of theirs to be recorded. The
//!   sequencer never starts a trace: it only continues one a gateway sent.
//! - Sampling and batching are the OpenTelemetry SDK's, set with its usual variables
//!   (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.01`,
//!   `OTEL_BSP_SCHEDULE_DELAY`, ...). The default records every command.
//! - With tracing off, a [`Span`] is an empty box: no clock read, no allocation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
pub use opentelemetry::trace::SpanKind;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

/// Where spans go (an OTLP/HTTP endpoint: `http://collector:4318`, or the full
/// `…/v1/traces` URL). Unset: tracing is off.
pub const ENDPOINT_ENV: &str = "ULTRASYNC_OTLP_ENDPOINT";
/// A PEM CA bundle trusted for an `https://` endpoint, besides the system roots.
pub const CA_FILE_ENV: &str = "ULTRASYNC_OTLP_CA_FILE";
/// Header of a message carrying several commands: one value per traced command,
/// `"{line} {traceparent}"` (line = the command's 0-based place in the message).
pub const HDR_TRACE: &str = "Ultrasync-Trace";
/// Deadline of one export request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where spans are exported, once set for the process.
struct Exporting {
    endpoint: String,
    ca_file: Option<PathBuf>,
}

static EXPORTING: OnceLock<Exporting> = OnceLock::new();
/// One provider per service name, made on first use; flushed by [`shutdown`].
static PROVIDERS: Mutex<Vec<(String, SdkTracerProvider)>> = Mutex::new(Vec::new());

/// Turns tracing on for this process when [`ENDPOINT_ENV`] is set (and says whether
/// it did). A malformed endpoint or an unreadable CA file is an error, so a typo does
/// not silently lose every trace.
pub fn init_from_env() -> anyhow::Result<bool> {
    let Some(endpoint) = std::env::var(ENDPOINT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(false);
    };
    let ca_file = std::env::var_os(CA_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    init(endpoint.trim(), ca_file.as_deref())
        .with_context(|| format!("{ENDPOINT_ENV}={endpoint}"))?;
    Ok(true)
}

/// Turns tracing on for this process: spans of every service that starts afterwards
/// go to `endpoint`. Only the first call counts.
pub fn init(endpoint: &str, ca_file: Option<&Path>) -> anyhow::Result<()> {
    let endpoint = traces_url(endpoint)?;
    if let Some(path) = ca_file {
        ultrasync_http_client::Trust::with_ca_file(path)
            .with_context(|| format!("{CA_FILE_ENV}={}", path.display()))?;
    }
    let _ = EXPORTING.set(Exporting {
        endpoint,
        ca_file: ca_file.map(Path::to_path_buf),
    });
    Ok(())
}

/// The export URL for `endpoint`: as given when it names a path, otherwise with the
/// OTLP/HTTP traces path (`/v1/traces`) added.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .filter(|(s, _)| matches!(*s, "http" | "https"))
        .ok_or_else(|| anyhow::anyhow!("not an http:// or https:// URL: {endpoint}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    anyhow::ensure!(!authority.is_empty(), "no host in {endpoint}");
    let path = match path.trim_end_matches('/') {
        "" => "/v1/traces",
        p => p,
    };
    Ok(format!("{scheme}://{authority}{path}"))
}

/// Flushes and stops every service's exporter (spans still queued are sent). Blocks;
/// call it when the services have stopped.
pub fn shutdown() {
    let providers = std::mem::take(&mut *PROVIDERS.lock().unwrap_or_else(|p| p.into_inner()));
    for (service, provider) in providers {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(service, error = %e, "flushing traces failed");
        }
    }
}

/// Sends every span ended so far (each service's exporter), waiting for the answers.
/// Blocks.
pub fn flush() {
    let providers: Vec<SdkTracerProvider> = PROVIDERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(_, p)| p.clone())
        .collect();
    for provider in providers {
        if let Err(e) = provider.force_flush() {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// The provider of `service`, made on first use (none when tracing is off).
fn provider(service: &str) -> Option<SdkTracerProvider> {
    let exporting = EXPORTING.get()?;
    let mut providers = PROVIDERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = providers.iter().find(|(s, _)| s == service) {
        return Some(p.clone());
    }
    match build_provider(exporting, service) {
        Ok(p) => {
            providers.push((service.to_owned(), p.clone()));
            Some(p)
        }
        Err(e) => {
            tracing::warn!(service, error = %format!("{e:#}"), "traces cannot be exported; tracing stays off");
            None
        }
    }
}

fn build_provider(exporting: &Exporting, service: &str) -> anyhow::Result<SdkTracerProvider> {
    let trust = ultrasync_http_client::Trust::from_ca_file(exporting.ca_file.as_deref())?;
    let tls = rustls::ClientConfig::clone(&trust.rustls_config());
    // The blocking client runs its own runtime: it is made (and used, by the SDK's
    // export thread) off the async runtime.
    let client = std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(EXPORT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("making the OTLP client panicked"))??;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(exporting.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let resource = Resource::builder()
        .with_service_name(format!("ultrasync-{service}"))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// A service's tracer: makes [`Span`]s, or nothing when tracing is off.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<SdkTracer>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("on", &self.inner.is_some())
            .finish()
    }
}

impl Tracer {
    /// The tracer of `service` (`gateway`, `sequencer`, ...): spans under the
    /// `service.name` `ultrasync-{service}`. Off unless [`init`] ran first.
    pub fn for_service(service: &str) -> Self {
        Self {
            inner: provider(service).map(|p| p.tracer("ultrasync")),
        }
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// A new trace (the gateway's, for a command that just arrived).
    pub fn root(&self, name: &'static str, kind: SpanKind) -> Span {
        match &self.inner {
            Some(t) => Span::started(t, name, kind, &Context::new(), None),
            None => Span::off(),
        }
    }

    /// A span continuing the trace `traceparent` names (sent by another service),
    /// started at `start`. Off when the value is not a W3C traceparent or the trace
    /// is not sampled.
    pub fn continue_from(
        &self,
        name: &'static str,
        kind: SpanKind,
        traceparent: &str,
        start: SystemTime,
    ) -> Span {
        let (Some(t), Some(remote)) = (&self.inner, parse_traceparent(traceparent)) else {
            return Span::off();
        };
        if !remote.is_sampled() {
            return Span::off();
        }
        let parent = Context::new().with_remote_span_context(remote);
        Span::started(t, name, kind, &parent, Some(start))
    }
}

/// One operation of a trace; ends when dropped (or at [`Span::end`]). Off (and free)
/// when tracing is off or the trace is not recorded.
#[derive(Default)]
pub struct Span {
    on: Option<Box<On>>,
}

struct On {
    tracer: SdkTracer,
    context: SpanContext,
    span: Mutex<opentelemetry_sdk::trace::Span>,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.on {
            Some(on) => write!(f, "Span({})", format_traceparent(&on.context)),
            None => f.write_str("Span(off)"),
        }
    }
}

impl Span {
    pub fn off() -> Self {
        Self { on: None }
    }

    fn started(
        tracer: &SdkTracer,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        start: Option<SystemTime>,
    ) -> Self {
        let mut builder = tracer.span_builder(name).with_kind(kind);
        if let Some(t) = start {
            builder = builder.with_start_time(t);
        }
        let span = builder.start_with_context(tracer, parent);
        if !span.is_recording() {
            return Self::off();
        }
        Self {
            on: Some(Box::new(On {
                tracer: tracer.clone(),
                context: span.span_context().clone(),
                span: Mutex::new(span),
            })),
        }
    }

    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// A span under this one (off when this one is).
    pub fn child(&self, name: &'static str, kind: SpanKind) -> Span {
        match &self.on {
            Some(on) => {
                let parent = Context::new().with_remote_span_context(on.context.clone());
                Span::started(&on.tracer, name, kind, &parent, None)
            }
            None => Span::off(),
        }
    }

    /// This span as a W3C `traceparent` value, for the next service.
    pub fn traceparent(&self) -> Option<String> {
        self.on.as_ref().map(|on| format_traceparent(&on.context))
    }

    /// The trace id (32 hex digits), for logs.
    pub fn trace_id(&self) -> Option<String> {
        self.on.as_ref().map(|on| on.context.trace_id().to_string())
    }

    pub fn set(&self, key: &'static str, value: impl Into<Value>) {
        if let Some(on) = &self.on {
            on.lock().set_attribute(KeyValue::new(key, value.into()));
        }
    }

    /// Marks the span failed with `why`.
    pub fn fail(&self, why: impl Into<String>) {
        if let Some(on) = &self.on {
            on.lock().set_status(Status::error(why.into()));
        }
    }

    pub fn event(&self, name: &'static str) {
        if let Some(on) = &self.on {
            on.lock().add_event(name, Vec::new());
        }
    }

    /// Ends the span now (dropping it does too).
    pub fn end(self) {}
}

impl On {
    fn lock(&self) -> std::sync::MutexGuard<'_, opentelemetry_sdk::trace::Span> {
        self.span.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn format_traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// A W3C `traceparent` (version 00): `00-{32 hex trace id}-{16 hex span id}-{2 hex
/// flags}`, ids not all zero.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if parts.next().is_some()
        || version != "00"
        || !hex(trace, 32)
        || !hex(span, 16)
        || !hex(flags, 2)
    {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// The traced commands of a message: line → traceparent, from its [`HDR_TRACE`]
/// values (malformed ones are skipped; at most `lines` entries are kept).
pub fn lines_of(headers: Option<&async_nats::HeaderMap>, lines: usize) -> HashMap<usize, String> {
    let mut out = HashMap::new();
    let Some(headers) = headers else {
        return out;
    };
    for v in headers.get_all(HDR_TRACE) {
        if out.len() >= lines {
            break;
        }
        if let Some((line, tp)) = v.as_str().split_once(' ')
            && let Ok(line) = line.parse::<usize>()
            && line < lines
        {
            out.insert(line, tp.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_junk_is_refused() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse_traceparent(tp).expect("valid");
        assert!(cx.is_sampled());
        assert_eq!(format_traceparent(&cx), tp);
        for junk in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(junk).is_none(), "{junk}");
        }
    }

    #[test]
    fn endpoints_get_the_traces_path_unless_they_name_one() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").expect("valid"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://c.example/").expect("valid"),
            "https://c.example/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/otlp/v1/traces").expect("valid"),
            "http://c:4318/otlp/v1/traces"
        );
        assert!(traces_url("c:4318").is_err());
        assert!(traces_url("ftp://c").is_err());
        assert!(traces_url("http:///v1").is_err());
    }

    #[test]
    fn trace_lines_are_bounded_by_the_message() {
        let mut h = async_nats::HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.append(HDR_TRACE, format!("0 {tp}").as_str());
        h.append(HDR_TRACE, format!("7 {tp}").as_str());
        h.append(HDR_TRACE, "x y");
        let lines = lines_of(Some(&h), 3);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[&0], tp);
        assert!(lines_of(None, 3).is_empty());
    }

    #[test]
    fn off_spans_cost_nothing_and_say_nothing() {
        let t = Tracer::default();
        let s = t.root("x", SpanKind::Server);
        assert!(!s.is_on());
        assert!(s.traceparent().is_none());
        assert!(!s.child("y", SpanKind::Internal).is_on());
        assert!(
            !t.continue_from(
                "z",
                SpanKind::Consumer,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                SystemTime::now()
            )
            .is_on()
        );
    }
}
