//! One command, one trace across services: a gateway (in this process, tracing
//! turned on with `trace::init`) and a sequencer (its own process, turned on by
//! `ULTRASYNC_OTLP_ENDPOINT`) export their spans to a small OTLP/HTTP collector on
//! loopback. The spans of a WebSocket command and of an HTTP command each share one
//! trace id across both services, and each hop is the child of the one before.
//! The same holds inside one `ultrasync serve` process, where the command goes
//! from the gateway to the sequencer without NATS.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_shared::trace;
use ultrasync_testkit::{SequencerProcess, Stack, StackOptions, recv_until};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    failed: bool,
}

type Spans = Arc<Mutex<Vec<Received>>>;

async fn collect(
    State(spans): State<Spans>,
    body: Bytes,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain")],
            b"not OTLP".to_vec(),
        );
    };
    let mut got = spans.lock().expect("spans");
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(text)
            .unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            got.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                attributes: span
                    .attributes
                    .iter()
                    .filter_map(|kv| {
                        Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)))
                    })
                    .collect(),
                failed: span.status.is_some_and(|s| s.code == 2),
            });
        }
    }
    // An empty ExportTraceServiceResponse.
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        Vec::new(),
    )
}

fn text(v: &AnyValue) -> String {
    match v {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

/// The spans of `command_id` once all four hops have arrived (the gateway's are
/// flushed from here; the sequencer's exporter sends every 100 ms).
async fn spans_of(spans: &Spans, command_id: &str) -> Vec<Received> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::task::spawn_blocking(trace::flush)
            .await
            .expect("flush");
        let got = spans.lock().expect("spans").clone();
        let ours: Vec<Received> = got
            .iter()
            .filter(|s| {
                s.attributes.get("ultrasync.command_id").map(String::as_str) == Some(command_id)
            })
            .cloned()
            .collect();
        let trace_ids: Vec<&String> = ours.iter().map(|s| &s.trace_id).collect();
        let mut all: Vec<Received> = got
            .iter()
            .filter(|s| trace_ids.contains(&&s.trace_id))
            .cloned()
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        if [
            "gateway.command",
            "gateway.publish",
            "sequencer.command",
            "sequencer.write",
        ]
        .iter()
        .all(|n| names.contains(n))
        {
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spans of {command_id} never all arrived; got {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A loopback OTLP/HTTP collector: the spans it receives, its address, its task.
async fn start_collector() -> (
    Spans,
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let spans: Spans = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/v1/traces", post(collect))
        .with_state(spans.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    (spans, collector, server)
}

/// Sends command `command_id` over `ws` and returns the `server_seq` of its ack.
async fn set_over_ws(ws: &mut ultrasync_client::Connection, command_id: &str) -> u64 {
    ws.command(command_id, "index", "k", OpType::Set, json!({"v": 1}))
        .await
        .expect("send");
    let frames = recv_until(ws, Duration::from_secs(30), |m| {
        matches!(m, ServerMessage::Ack { command_id: c, .. } | ServerMessage::Reject { command_id: c, .. } if c == command_id)
    })
    .await
    .expect("answer");
    match frames.last() {
        Some(ServerMessage::Ack { server_seq, .. }) => *server_seq,
        _ => panic!("not acked: {frames:?}"),
    }
}

/// One trace id; each hop the child of the one before; each span from its service.
fn check_path(spans: &[Received], transport: &str, server_seq: u64) {
    let one = |name: &str| {
        let found: Vec<&Received> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {spans:#?}");
        found[0].clone()
    };
    let command = one("gateway.command");
    let publish = one("gateway.publish");
    let sequenced = one("sequencer.command");
    let write = one("sequencer.write");
    let trace_id = &command.trace_id;
    assert!(spans.iter().all(|s| &s.trace_id == trace_id), "{spans:#?}");
    assert_eq!(command.parent_span_id, "", "the gateway starts the trace");
    assert_eq!(publish.parent_span_id, command.span_id);
    assert_eq!(sequenced.parent_span_id, publish.span_id);
    assert_eq!(write.parent_span_id, sequenced.span_id);
    assert_eq!(
        [&command, &publish, &sequenced, &write].map(|s| s.service.as_str()),
        [
            "ultrasync-gateway",
            "ultrasync-gateway",
            "ultrasync-sequencer",
            "ultrasync-sequencer"
        ]
    );
    assert_eq!(command.attributes["ultrasync.transport"], transport);
    assert_eq!(command.attributes["ultrasync.org"], "acme");
    let seq = server_seq.to_string();
    assert_eq!(command.attributes["ultrasync.server_seq"], seq);
    assert_eq!(sequenced.attributes["ultrasync.server_seq"], seq);
    assert_eq!(
        sequenced.attributes["ultrasync.stream_key"],
        "acme/web/index"
    );
    assert!(spans.iter().all(|s| !s.failed), "{spans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_is_one_trace_across_gateway_and_sequencer() {
    let (spans, collector, server) = start_collector().await;
    let endpoint = format!("http://{collector}");
    trace::init(&endpoint, None).expect("tracing on");

    let stack = Stack::start_with(StackOptions {
        sequencers: 0,
        ..Default::default()
    })
    .await;
    let _sequencer = SequencerProcess::spawn_with_env(
        &bin(),
        "sequencer",
        stack.nats.url(),
        &[],
        &[
            (trace::ENDPOINT_ENV.into(), endpoint.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
    );

    // Over WebSocket.
    let mut ws = stack
        .client("alice", "web", "alice-1", &[("index", Some(0))])
        .await;
    let server_seq = set_over_ws(&mut ws, "traced-ws").await;
    check_path(&spans_of(&spans, "traced-ws").await, "ws", server_seq);

    // Over HTTP.
    let token = stack.token("alice", "read write");
    let r = stack
        .http(
            "POST",
            "/v1/acme/web/index/commands",
            &token,
            r#"{"client_id":"alice-http","commands":[{"command_id":"traced-http","key":"k","op_type":"set","payload":{"v":2}}]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let seq = answer["results"][0]["server_seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("not acked: {}", r.body));
    check_path(&spans_of(&spans, "traced-http").await, "http", seq);

    // A refused command ends its span failed, with the code.
    ws.command("traced-bad", "nope", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    recv_until(
        &mut ws,
        Duration::from_secs(30),
        |m| matches!(m, ServerMessage::Reject { command_id, .. } if command_id == "traced-bad"),
    )
    .await
    .expect("reject");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let refused = loop {
        tokio::task::spawn_blocking(trace::flush)
            .await
            .expect("flush");
        let got = spans.lock().expect("spans").clone();
        if let Some(s) = got.into_iter().find(|s| {
            s.attributes.get("ultrasync.command_id").map(String::as_str) == Some("traced-bad")
        }) {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no span for a refused command"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.failed, "{refused:?}");
    assert!(
        refused.attributes.contains_key("ultrasync.reject"),
        "{refused:?}"
    );

    ws.close().await;
    stack.shutdown().await;
    server.abort();
}

/// `ultrasync serve`: the command goes from the gateway to the sequencer of the same
/// process without NATS, and its trace is still one path across both services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_is_one_trace_inside_one_serve_process() {
    let (spans, collector, server) = start_collector().await;

    let nats = ultrasync_testkit::NatsServer::start();
    let secret = ultrasync_testkit::random_secret();
    let data = tempfile::tempdir().expect("tmp");
    let serve = ultrasync_testkit::GatewayProcess::start_as(
        &bin(),
        "serve",
        &["--data-dir", &data.path().to_string_lossy()],
        nats.url(),
        &[
            ("ULTRASYNC_JWT_SECRET".into(), secret.clone()),
            (trace::ENDPOINT_ENV.into(), format!("http://{collector}")),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
    )
    .await;
    let token = ultrasync_testkit::token_for(&secret, "alice", "read write");
    let mut ws = ultrasync_client::Connection::connect(&serve.ws_url(), &token)
        .await
        .expect("connect");
    ws.hello("acme", "web", "alice-1", Default::default())
        .await
        .expect("hello");
    let server_seq = set_over_ws(&mut ws, "traced-serve").await;
    check_path(&spans_of(&spans, "traced-serve").await, "ws", server_seq);
    ws.close().await;
    drop(serve);
    server.abort();
}
