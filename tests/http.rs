//! The HTTP API of SPEC §5 over a real socket: keys with ETag / If-Match, command
//! batches, history, ops paging, and the same state as a WebSocket client sees.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::ServerMessage;
use ultrasync_shared::Op;
use ultrasync_shared::state::{self, KeyEntry, NamespaceState};
use ultrasync_testkit::{Stack, recv_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_push_pull_and_bootstrap_match_the_websocket_view() {
    let stack = Stack::start().await;
    let token = stack.token("hank", "read write");
    let keys = "/v1/acme/web/index/keys";

    // PUT creates (ETag = version), If-Match guards, DELETE removes.
    let r = stack
        .http("PUT", &format!("{keys}/title"), &token, r#"{"t":"one"}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("etag"), Some("\"1\""));
    let r = stack.get(&format!("{keys}/title?min_seq=1"), &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("etag"), Some("\"1\""));
    let body: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(body["value"], json!({"t": "one"}));
    let guarded = |etag: &'static str, body: &'static str| {
        let token = token.clone();
        let stack = &stack;
        async move {
            let url = format!("http://{}{keys}/title", stack.http);
            ultrasync_testkit::http_exchange(
                "PUT",
                &url,
                &[
                    ("Authorization", &format!("Bearer {token}")),
                    ("Content-Type", "application/json"),
                    ("If-Match", etag),
                ],
                body,
            )
            .await
            .expect("http")
        }
    };
    let r = guarded("\"1\"", r#"{"t":"two"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("etag"), Some("\"2\""));
    let r = guarded("\"1\"", r#"{"t":"stale"}"#).await;
    assert_eq!(r.status, 409, "{}", r.body);
    let body: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(body["error"]["code"], json!("precondition_failed"));
    assert_eq!(body["current_state"]["version"], json!(2));
    assert_eq!(body["current_state"]["value"], json!({"t": "two"}));
    let r = guarded("nope", "1").await;
    assert_eq!(r.status, 400, "{}", r.body);

    // A batch: answered in order, a bad command rejected alone.
    let r = stack
        .http(
            "POST",
            "/v1/acme/web/index/commands",
            &token,
            &json!({"client_id": "cli-1", "commands": [
                {"command_id": "b1", "key": "n", "op_type": "set", "payload": {"a": 1}},
                {"command_id": "b2", "key": "n", "op_type": "patch", "payload": {"b": 2}},
                {"command_id": "b3", "key": "", "op_type": "set", "payload": 1},
                {"command_id": "b4", "key": "gone", "op_type": "set", "payload": 1},
            ]})
            .to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results: Value = serde_json::from_str(&r.body).expect("json");
    let kinds: Vec<&str> = results["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|m| m["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["ack", "ack", "reject", "ack"], "{}", r.body);
    assert_eq!(results["results"][2]["code"], json!("invalid_key"));
    assert_eq!(results["results"][1]["server_seq"], json!(4));
    let r = stack
        .http("DELETE", &format!("{keys}/gone"), &token, "")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = stack.get(&format!("{keys}/gone?min_seq=6"), &token).await;
    assert_eq!(r.status, 404, "{}", r.body);

    // History: the key's ops, newest first.
    let r = stack.get(&format!("{keys}/title/history"), &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let h: Value = serde_json::from_str(&r.body).expect("json");
    let seqs: Vec<u64> = h["ops"]
        .as_array()
        .expect("ops")
        .iter()
        .filter_map(|o| o["server_seq"].as_u64())
        .collect();
    assert_eq!(seqs, [2, 1]);

    // A read token cannot write, and nothing is written.
    let reader = stack.token("rita", "read");
    let r = stack
        .http("PUT", &format!("{keys}/title"), &reader, "1")
        .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // Pull the log over HTTP, bootstrap over WebSocket, read the snapshot over HTTP:
    // one state.
    let r = stack
        .get("/v1/acme/web/index/ops?since=0&limit=1000", &token)
        .await;
    let page: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(
        (page["last_server_seq"].clone(), page["more"].clone()),
        (json!(6), json!(false))
    );
    let mut pulled = NamespaceState::default();
    for op in page["ops"].as_array().expect("ops") {
        let op: Op = serde_json::from_value(op.clone()).expect("op");
        state::apply(&mut pulled, &op).expect("apply");
    }
    let mut ws = stack
        .client("wes", "web", "wes-1", &[("index", None)])
        .await;
    let frames = recv_until(&mut ws, Duration::from_secs(10), |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("sync");
    let mut seen = NamespaceState::default();
    for f in frames {
        match f {
            ServerMessage::Snapshot {
                last_server_seq,
                state,
                ..
            } => {
                seen.last_seq = last_server_seq;
                seen.keys = state
                    .into_iter()
                    .map(|(k, ks)| {
                        (
                            k,
                            KeyEntry {
                                value: ks.value,
                                version: ks.version,
                                doc: None,
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>();
            }
            ServerMessage::Ops { ops, .. } => {
                for op in ops {
                    state::apply(&mut seen, &op).expect("apply");
                }
            }
            _ => {}
        }
    }
    assert_eq!(seen, pulled);
    let r = stack
        .get("/v1/acme/web/index/snapshot?min_seq=6", &token)
        .await;
    let snap: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(snap["digest"], json!(state::digest(&pulled)));
    assert_eq!(snap["last_server_seq"], json!(6));
    // /v1/status: the followed stream key with its head and lag, for an admin of
    // the org (anyone else sees gateway-wide figures only).
    let public: Value =
        serde_json::from_str(&stack.get("/v1/status", "").await.body).expect("json");
    assert!(public.get("stream_keys").is_none());
    assert_eq!(stack.get("/v1/status", &token).await.status, 403);
    let admin = stack.token("ops", "read write admin");
    let status: Value =
        serde_json::from_str(&stack.get("/v1/status", &admin).await.body).expect("json");
    let row = status["stream_keys"]
        .as_array()
        .expect("stream keys")
        .iter()
        .find(|r| r["stream_key"] == json!("acme/web/index"))
        .cloned()
        .expect("index is followed");
    assert_eq!(row["head"], json!(6));
    assert!(row["lag"].as_u64().is_some());
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route() {
    let stack = Stack::start_with(ultrasync_testkit::StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let r = stack.get("/v1/openapi.json", "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let doc: Value = serde_json::from_str(&r.body).expect("json");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let mut listed: Vec<String> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            listed.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    listed.sort();
    // Every route the gateway serves (gateway/src/lib.rs `router`).
    let mut served = vec![
        "GET /v1/sync",
        "GET /v1/automerge/{org}/{project}/{ns}",
        "GET /v1/status",
        "GET /v1/openapi.json",
        "GET /v1/{org}/{project}/{ns}/snapshot",
        "GET /v1/{org}/{project}/{ns}/ops",
        "GET /v1/{org}/{project}/{ns}/keys/{key}",
        "PUT /v1/{org}/{project}/{ns}/keys/{key}",
        "DELETE /v1/{org}/{project}/{ns}/keys/{key}",
        "GET /v1/{org}/{project}/{ns}/keys/{key}/history",
        "POST /v1/{org}/{project}/{ns}/commands",
        "POST /v1/{org}/{project}/cursors",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    ];
    served.sort();
    assert_eq!(listed, served);
    // And each documented route answers (not 404 for the route itself).
    let token = stack.token("olga", "read");
    for route in &served {
        let (method, path) = route.split_once(' ').expect("route");
        if path == "/v1/sync" {
            continue;
        }
        let path = path
            .replace("{org}", "acme")
            .replace("{project}", "web")
            .replace("{ns}", "index")
            .replace("{key}", "k");
        let r = stack.http(method, &path, &token, "{}").await;
        assert_ne!(r.status, 405, "{route}: method not routed");
        assert!(
            r.status != 404 || r.body.contains("\"error\""),
            "{route}: not routed ({})",
            r.status
        );
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_allowed_origins_only() {
    let stack = Stack::start_with(ultrasync_testkit::StackOptions {
        materializers: 0,
        configure: |c| c.gateway.cors_origins = vec!["https://app.example".into()],
        ..Default::default()
    })
    .await;
    let url = format!("http://{}/v1/acme/web/index/keys/k", stack.http);
    let preflight = |origin: &'static str| {
        let url = url.clone();
        async move {
            ultrasync_testkit::http_exchange(
                "OPTIONS",
                &url,
                &[
                    ("Origin", origin),
                    ("Access-Control-Request-Method", "PUT"),
                    ("Access-Control-Request-Headers", "authorization, if-match"),
                ],
                "",
            )
            .await
            .expect("http")
        }
    };
    let ok = preflight("https://app.example").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(
        ok.header("access-control-allow-methods")
            .is_some_and(|m| m.contains("PUT"))
    );
    let other = preflight("https://evil.example").await;
    assert_eq!(other.header("access-control-allow-origin"), None);
    let r = ultrasync_testkit::http_exchange(
        "GET",
        &format!("http://{}/v1/status", stack.http),
        &[("Origin", "https://app.example")],
        "",
    )
    .await
    .expect("http");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(
        r.header("access-control-expose-headers")
            .is_some_and(|h| h.to_ascii_lowercase().contains("etag"))
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_limits_answer_413_and_429_in_the_error_envelope() {
    let stack = Stack::start_with(ultrasync_testkit::StackOptions {
        materializers: 0,
        configure: |c| {
            c.gateway.max_frame_bytes = 4096;
            c.gateway.max_messages_per_sec = 5;
        },
        ..Default::default()
    })
    .await;
    let token = stack.token("lim", "read write");
    let big = format!("\"{}\"", "x".repeat(8192));
    let r = stack
        .http("PUT", "/v1/acme/web/index/keys/big", &token, &big)
        .await;
    assert_eq!(r.status, 413, "{}", r.body);
    let e: Value = serde_json::from_str(&r.body).expect("envelope");
    assert_eq!(e["error"]["code"], json!("payload_too_large"));
    // Burst 10, 5/s: a quick run of 30 requests meets 429.
    let mut limited = 0;
    for _ in 0..30 {
        let r = stack.get("/v1/acme/web/index/ops", &token).await;
        if r.status == 429 {
            let e: Value = serde_json::from_str(&r.body).expect("envelope");
            assert_eq!(e["error"]["code"], json!("rate_limited"));
            limited += 1;
        }
    }
    assert!(limited > 0, "no 429 in a burst of 30");
    stack.shutdown().await;
}
