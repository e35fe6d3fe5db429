//! TLS between ultrasync's processes and NATS: a nats-server that requires TLS and
//! verifies client certificates (a test CA made with rcgen), every service
//! connecting with the CA and a client certificate (`nats_tls_ca`, `nats_tls_cert`,
//! `nats_tls_key`), the whole pipeline working over it, and clients without the CA
//! or without a certificate refused.

use std::time::Duration;

use futures::StreamExt as _;
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

/// A 3-node cluster with TLS on client and route ports and route credentials: the
/// pipeline runs on it with R3 streams, and a server that knows the route port but
/// not the credentials cannot join (what it is sent never reaches the cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_tls_routes_runs_the_pipeline_and_admits_no_stranger() {
    use tokio_util::sync::CancellationToken;
    use ultrasync_shared::natsd::{
        ClusterOptions, Natsd, NatsdOptions, find_nats_server, free_ports,
    };
    ultrasync_testkit::init_tracing();
    let cluster = ultrasync_testkit::NatsCluster::start_secure(3);
    let tls = cluster.tls().expect("tls");
    cluster.wait_jetstream().await;
    let secret = ultrasync_testkit::random_secret();
    let mut config = ultrasync_shared::config::Config {
        nats_url: cluster.url(),
        nats_tls_ca: Some(tls.ca.clone()),
        nats_tls_cert: Some(tls.client.cert.clone()),
        nats_tls_key: Some(tls.client.key.clone()),
        replicas: 3,
        ..Default::default()
    };
    config.auth.jwt_secret = Some(secret.clone());
    // `ultrasync setup` first, as a deployment does: R3 streams over TLS.
    let js = async_nats::jetstream::new(
        ultrasync_shared::nats::connect(&config, "setup", Duration::from_secs(10))
            .await
            .expect("connect"),
    );
    ultrasync_shared::nats::ensure_layout(&js, config.layout())
        .await
        .expect("setup");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let state = tempfile::tempdir().expect("tmp");
    let services = [
        tokio::spawn(ultrasync_gateway::run(
            config.clone(),
            listener,
            stop.clone(),
        )),
        tokio::spawn(ultrasync_sequencer::run(config.clone(), stop.clone())),
        tokio::spawn(ultrasync_materializer::run(
            {
                let mut c = config.clone();
                c.materializer.data_dir = state.path().join("m0");
                c
            },
            stop.clone(),
        )),
    ];

    // Writes are acked over TLS, on R3 streams.
    let token = ultrasync_testkit::token_for(&secret, "cleo", "read write");
    let mut c = None;
    let mut services = services;
    for _ in 0..200 {
        for s in &mut services {
            if s.is_finished() {
                panic!("a service stopped while starting: {:?}", s.await);
            }
        }
        if let Ok(conn) =
            ultrasync_client::Connection::connect(&format!("ws://{addr}/v1/sync"), &token).await
        {
            c = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = c.expect("the gateway came up");
    c.hello("acme", "web", "cleo-1", Default::default())
        .await
        .expect("hello");
    for i in 0..5 {
        c.command(&format!("c{i}"), "index", "k", OpType::Set, json!(i))
            .await
            .expect("send");
        match c.recv_timeout(WAIT).await.expect("answer") {
            ServerMessage::Ack { server_seq, .. } => assert_eq!(server_seq, i + 1),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let mut ops = js.get_stream("USYNC_OPS").await.expect("ops");
    assert_eq!(ops.info().await.expect("info").config.num_replicas, 3);
    // Without the CA: refused.
    assert!(!connects(async_nats::ConnectOptions::new(), &cluster.node_url(0)).await);

    // A stranger on the route port without the credentials: its messages never
    // reach a cluster subscriber, while the cluster's own routes carry them.
    let member = ultrasync_shared::nats::connect(&config, "member", Duration::from_secs(10))
        .await
        .expect("member");
    let mut probe = member.subscribe("probe.>").await.expect("subscribe");
    member.flush().await.expect("flush");
    let stranger_dir = tempfile::tempdir().expect("tmp");
    let ports = free_ports(2).expect("ports");
    let stranger = Natsd::spawn(&NatsdOptions {
        bin: find_nats_server(None).expect("nats-server"),
        store_dir: stranger_dir.path().join("store"),
        run_dir: stranger_dir.path().join("run"),
        port: Some(ports[0]),
        cluster: Some(ClusterOptions {
            name: "usync-test".to_owned(),
            server_name: "stranger".to_owned(),
            port: ports[1],
            routes: vec![cluster.route_port(0)],
            route_auth: None,
            route_tls: Some(tls.node.clone()),
        }),
        ..Default::default()
    })
    .expect("start the stranger");
    let outsider = async_nats::connect(&stranger.url).await.expect("outsider");
    // Through another member, the same subject does arrive (the probe works).
    let other = ultrasync_shared::nats::connect(
        &ultrasync_shared::config::Config {
            nats_url: cluster.node_url(2),
            ..config.clone()
        },
        "other member",
        Duration::from_secs(10),
    )
    .await
    .expect("other member");
    other
        .publish("probe.member", "in".into())
        .await
        .expect("publish");
    other.flush().await.expect("flush");
    let got = tokio::time::timeout(WAIT, probe.next())
        .await
        .expect("the member's probe");
    assert_eq!(got.expect("message").subject.as_str(), "probe.member");
    for _ in 0..20 {
        outsider
            .publish("probe.stranger", "out".into())
            .await
            .expect("publish");
        outsider.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other
        .publish("probe.member", "in again".into())
        .await
        .expect("publish");
    other.flush().await.expect("flush");
    let next = tokio::time::timeout(WAIT, probe.next())
        .await
        .expect("the member's second probe")
        .expect("message");
    assert_eq!(
        next.subject.as_str(),
        "probe.member",
        "a server without route credentials joined the cluster"
    );
    drop(stranger);

    stop.cancel();
    for s in services {
        let _ = tokio::time::timeout(Duration::from_secs(15), s).await;
    }
}
