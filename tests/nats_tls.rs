//! TLS between ultrasync's processes and NATS: a nats-server that requires TLS and
//! verifies client certificates (a test CA made with rcgen), every service
//! connecting with the CA and a client certificate (`nats_tls_ca`, `nats_tls_cert`,
//! `nats_tls_key`), the whole pipeline working over it, and clients without the CA
//! or without a certificate refused.

use std::time::Duration;

use serde_json::json;
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_testkit::{Stack, StackOptions, recv_until};

const WAIT: Duration = Duration::from_secs(20);

async fn connects(opts: async_nats::ConnectOptions, url: &str) -> bool {
    let attempt = async {
        let client = opts
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await?;
        client.flush().await?;
        anyhow::Ok(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(()))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_mutual_tls_and_clients_without_the_ca_are_refused() {
    let stack = Stack::start_with(StackOptions {
        nats_tls: true,
        ..Default::default()
    })
    .await;
    let cfg = &stack.config;
    let ca = cfg.nats_tls_ca.clone().expect("ca");
    let (cert, key) = (
        cfg.nats_tls_cert.clone().expect("cert"),
        cfg.nats_tls_key.clone().expect("key"),
    );

    // Gateway, sequencer and materializer all talk to NATS over TLS: a write is
    // acked, fanned out and materialized.
    let mut reader = stack
        .client("tess", "web", "tess-2", &[("index", Some(0))])
        .await;
    let mut writer = stack.client("tess", "web", "tess-1", &[]).await;
    writer
        .command("t1", "index", "k", OpType::Set, json!("over tls"))
        .await
        .expect("send");
    let seq = match writer.recv_timeout(WAIT).await.expect("answer") {
        ServerMessage::Ack { server_seq, .. } => server_seq,
        other => panic!("expected an ack, got {other:?}"),
    };
    recv_until(
        &mut reader,
        WAIT,
        |m| matches!(m, ServerMessage::Ops { ops, .. } if ops.iter().any(|o| o.server_seq == seq)),
    )
    .await
    .expect("the op fanned out");
    let token = stack.token("tess", "read");
    let r = stack
        .get(&format!("/v1/acme/web/index/keys/k?min_seq={seq}"), &token)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("over tls"), "{}", r.body);

    let url = stack.nats.url();
    // Without the CA: the server's certificate is not trusted.
    assert!(
        !connects(async_nats::ConnectOptions::new(), url).await,
        "a client without the CA connected"
    );
    // With the CA but no client certificate: the server refuses the client.
    assert!(
        !connects(
            async_nats::ConnectOptions::new()
                .add_root_certificates(ca.clone())
                .require_tls(true),
            url
        )
        .await,
        "a client without a certificate connected"
    );
    // With both: in.
    assert!(
        connects(
            async_nats::ConnectOptions::new()
                .add_root_certificates(ca)
                .add_client_certificate(cert, key)
                .require_tls(true),
            url
        )
        .await,
        "a client with the CA and a certificate was refused"
    );
    stack.shutdown().await;
}
