//! The local-first SDK against a real stack: offline edits that survive a restart of
//! the client and land exactly once, optimistic edits rolled back on reject, and three
//! replicas with random disconnects converging to the server's state.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use automerge::ROOT;
use automerge::transaction::Transactable;
use serde_json::json;
use ultrasync_client::sync::{Change, SyncClient, SyncOptions};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::state;
use ultrasync_shared::{ErrorCode, StreamKey, reads};
use ultrasync_testkit::{Stack, read_subject};

fn options(url: &str, token: &str, client: &str, store: &Path, ns: &[&str]) -> SyncOptions {
    SyncOptions {
        url: url.to_owned(),
        token: token.to_owned(),
        org: "acme".into(),
        project: "web".into(),
        client_id: client.to_owned(),
        namespaces: ns.iter().map(|s| (*s).to_owned()).collect(),
        store: store.to_path_buf(),
        ca_file: None,
    }
}

/// Waits until `client` has no outbox and holds every namespace up to its head.
async fn settled(stack: &Stack, client: &SyncClient, namespaces: &[&str]) {
    let js = stack.jetstream().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = client.outbox_len() == 0;
        for ns in namespaces {
            let key = StreamKey::parse("acme", "web", ns).expect("key");
            let head = read_subject(&js, &ops_subject(&key))
                .await
                .last()
                .map_or(0, |e| e.server_seq);
            done &= client.confirmed(ns).map_or(0, |s| s.last_seq) == head;
        }
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client never settled (outbox {})",
            client.outbox_len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_survive_a_restart_and_land_exactly_once_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("alice");
    // The server is not there: a port nobody listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("ws://{}/v1/sync", unused.local_addr().expect("addr"));
    drop(unused);
    {
        let alice = SyncClient::start(options(&dead_url, "none", "alice-1", &store, &["index"]))
            .expect("start");
        for i in 0..100 {
            match i % 4 {
                0 => alice.patch("index", &format!("k{}", i % 10), json!({"p": i})),
                3 => alice.delete("index", &format!("k{}", (i + 5) % 10)),
                _ => alice.put("index", &format!("k{}", i % 10), json!({"i": i})),
            }
            .expect("edit");
        }
        assert_eq!(alice.outbox_len(), 100);
        // Optimistic: the last write of k1 is visible before any server saw it.
        let v = alice.get("index", "k1").expect("k1");
        assert_eq!((v.value, v.version, v.pending), (json!({"i": 81}), 0, true));
        alice.close().await;
    }

    // The server comes up; the client "restarts" from its store.
    let stack = Stack::start().await;
    let token = stack.token("alice", "read write");
    let alice = SyncClient::start(options(
        &stack.ws_url(),
        &token,
        "alice-1",
        &store,
        &["index"],
    ))
    .expect("restart");
    assert_eq!(
        alice.outbox_len(),
        100,
        "the outbox did not survive the restart"
    );
    settled(&stack, &alice, &["index"]).await;

    let js = stack.jetstream().await;
    let log = read_subject(
        &js,
        &ops_subject(&StreamKey::parse("acme", "web", "index").expect("key")),
    )
    .await;
    assert_eq!(log.len(), 100, "not exactly once");
    let ids: Vec<String> = log.iter().map(|e| e.op().expect("op").command_id).collect();
    let want: Vec<String> = (1..=100).map(|n| format!("alice-1-{n}")).collect();
    assert_eq!(ids, want, "the server's order is not the edit order");

    // A second replica sees the same state in the same order.
    let bob = SyncClient::start(options(
        &stack.ws_url(),
        &stack.token("bob", "read write"),
        "bob-1",
        &dir.path().join("bob"),
        &["index"],
    ))
    .expect("bob");
    settled(&stack, &bob, &["index"]).await;
    let a = alice.confirmed("index").expect("a");
    let b = bob.confirmed("index").expect("b");
    assert_eq!(state::digest(&a), state::digest(&b));
    // Alice's own restart keeps her view too.
    alice.close().await;
    let again = SyncClient::start(options(
        &stack.ws_url(),
        &token,
        "alice-1",
        &store,
        &["index"],
    ))
    .expect("again");
    assert_eq!(
        again.confirmed("index").map(|s| state::digest(&s)),
        Some(state::digest(&a))
    );
    again.close().await;
    bob.close().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_optimistic_edit_is_rolled_back_and_reported() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let start = |who: &str| {
        SyncClient::start(options(
            &stack.ws_url(),
            &stack.token(who, "read write"),
            &format!("{who}-1"),
            &dir.path().join(who),
            &["settings"],
        ))
        .expect("start")
    };
    let ann = start("ann");
    ann.put_if("settings", "theme", json!("dark"), 0)
        .expect("edit");
    settled(&stack, &ann, &["settings"]).await;

    let ben = start("ben");
    let mut changes = ben.changes();
    // Ben has not seen Ann's write yet (he may not even be connected): he creates.
    let id = ben
        .put_if("settings", "theme", json!("light"), 0)
        .expect("edit");
    assert_eq!(
        ben.get("settings", "theme").map(|v| v.value),
        Some(json!("light"))
    );
    let rejected = loop {
        match tokio::time::timeout(Duration::from_secs(20), changes.recv())
            .await
            .expect("a change in time")
            .expect("change")
        {
            Change::Rejected {
                command_id,
                code,
                current_state,
                ..
            } if command_id == id => break (code, current_state),
            _ => {}
        }
    };
    assert_eq!(rejected.0, ErrorCode::PreconditionFailed);
    let current = rejected.1.expect("current_state");
    assert_eq!((current.value, current.version), (json!("dark"), 1));
    settled(&stack, &ben, &["settings"]).await;
    let v = ben.get("settings", "theme").expect("theme");
    assert_eq!((v.value, v.version, v.pending), (json!("dark"), 1, false));
    ann.close().await;
    ben.close().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_random_disconnects_converge_to_the_server() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let namespaces = ["index", "settings", "collab"];
    let clients: Vec<SyncClient> = (0..3)
        .map(|i| {
            SyncClient::start(options(
                &stack.ws_url(),
                &stack.token(&format!("u{i}"), "read write"),
                &format!("c{i}"),
                &dir.path().join(format!("c{i}")),
                &namespaces,
            ))
            .expect("start")
        })
        .collect();
    // A deterministic pseudo-random walk (xorshift).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for round in 0..150 {
        let c = &clients[next(3) as usize];
        match next(4) {
            0 => {
                c.put("index", &format!("k{}", next(8)), json!({"r": round}))
                    .expect("put");
            }
            1 => {
                let key = format!("s{}", next(4));
                let version = c.get("settings", &key).map_or(0, |v| v.version);
                c.put_if("settings", &key, json!(round), version)
                    .expect("cas");
            }
            2 => {
                c.edit_doc("collab", "board", |d| {
                    d.put(ROOT, format!("f{}", round % 5), round as i64)?;
                    Ok(())
                })
                .expect("crdt");
            }
            _ => {
                c.patch("index", &format!("k{}", next(8)), json!({"p": round}))
                    .expect("patch");
            }
        }
        if next(10) == 0 {
            clients[next(3) as usize].reconnect();
        }
        if round % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for c in &clients {
        settled(&stack, c, &namespaces).await;
    }
    let nc = stack.nats_client().await;
    for ns in namespaces {
        let digests: BTreeMap<String, usize> = clients
            .iter()
            .map(|c| state::digest(&c.confirmed(ns).expect("state")))
            .fold(BTreeMap::new(), |mut m, d| {
                *m.entry(d).or_default() += 1;
                m
            });
        assert_eq!(digests.len(), 1, "{ns}: replicas differ");
        let head = clients[0].confirmed(ns).expect("state").last_seq;
        let key = StreamKey::parse("acme", "web", ns).expect("key");
        let server = reads::digest(&nc, &key, Some(head)).await.expect("digest");
        assert_eq!(
            digests.keys().next(),
            Some(&server.digest),
            "{ns}: replicas differ from the server"
        );
    }
    for c in clients {
        c.close().await;
    }
    stack.shutdown().await;
}
