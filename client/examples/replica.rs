//! A local-first replica of one namespace: edits apply at once, survive restarts, and
//! sync when the server is reachable.
//!
//! With `./scripts/dev` running (it prints a dev token):
//!
//! ```sh
//! ULTRASYNC_TOKEN=<dev token> cargo run -p ultrasync-client --example replica -- note "buy milk"
//! ```
//!
//! Run it again (even with the server stopped): earlier notes are still there, and
//! the ones written offline are sent when the server is back.

use std::time::Duration;

use ultrasync_client::sync::{Change, SyncClient, SyncOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let key = args.next().unwrap_or_else(|| "note".to_owned());
    let text = args
        .next()
        .unwrap_or_else(|| "hello from the replica".to_owned());
    let client = SyncClient::start(SyncOptions {
        url: std::env::var("ULTRASYNC_WS_URL")
            .unwrap_or_else(|_| "ws://127.0.0.1:8080/v1/sync".to_owned()),
        token: std::env::var("ULTRASYNC_TOKEN")?,
        org: std::env::var("ULTRASYNC_ORG").unwrap_or_else(|_| "dev".to_owned()),
        project: std::env::var("ULTRASYNC_PROJECT").unwrap_or_else(|_| "demo".to_owned()),
        client_id: "example-replica".to_owned(),
        namespaces: vec!["index".to_owned()],
        store: "./.replica".into(),
        ca_file: std::env::var_os("ULTRASYNC_CA_FILE").map(Into::into),
    })?;
    let mut changes = client.changes();
    client.put("index", &key, serde_json::json!(text))?;
    println!("local view of {key}: {:?}", client.get("index", &key));
    // Watch for a few seconds: confirmations, other writers' ops, rejections.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Ok(change)) = tokio::time::timeout_at(until, changes.recv()).await {
        match change {
            Change::Op { op, .. } => {
                println!("committed #{}: {} = {}", op.server_seq, op.key, op.payload)
            }
            Change::Rejected { code, reason, .. } => println!("rejected ({code}): {reason}"),
            Change::Disconnected { reason } => println!("offline: {reason} (edits are kept)"),
            other => println!("{other:?}"),
        }
    }
    println!("unsent edits: {}", client.outbox_len());
    client.close().await;
    Ok(())
}
