//! The op log reader (`ultrasync_shared::log::read_from`) starts over without
//! deleting anything: logged in as the shipped `gateway` user (who may not delete
//! consumers on `USYNC_OPS`), it keeps reading one subject in order, with no gap and
//! no duplicate, after its consumer was deleted under it and after the nats-server
//! restarted, each time on a new consumer, and the server logs no permission
//! violation. Range reads at a tenant's pace (`read_range_direct`, and
//! `continue_range_direct` for the pages after the first) make no consumer at all.

use std::time::Duration;

use async_nats::jetstream;
use futures::{StreamExt as _, TryStreamExt as _};
use ultrasync_shared::log::{
    LogEntry, LogError, continue_range_direct, read_from, read_range, read_range_direct,
};
use ultrasync_shared::nats::{
    HDR_OP_ID, HDR_SEQ, LayoutOptions, MAX_MSG_SIZE, OPS_STREAM, PULL_MAX_BYTES, ensure_layout,
};
use ultrasync_shared::natsd::{Natsd, NatsdOptions, find_nats_server, free_ports};
use ultrasync_testkit::{NatsUsers, shipped_users_conf};

const SUBJECT: &str = "usync.ops.acme.web.index";

/// Appends op `seq` to `SUBJECT` as admin, waiting out a server that is still
/// starting (JetStream answers no responders until it is up).
async fn append(js: &jetstream::Context, seq: u64) {
    append_body(js, seq, format!("{{\"n\":{seq}}}")).await;
}

/// [`append`] with `body` as the op's JSON.
async fn append_body(js: &jetstream::Context, seq: u64, body: String) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(HDR_SEQ, seq.to_string().as_str());
    headers.insert(HDR_OP_ID, format!("op-{seq}").as_str());
    let body = bytes::Bytes::from(body);
    for _ in 0..300 {
        if let Ok(ack) = js
            .publish_with_headers(SUBJECT, headers.clone(), body.clone())
            .await
            && ack.await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("op {seq} could not be appended");
}

/// The next `n` ops from `entries`, which must be `from..from + n` in order.
async fn expect_next<S>(entries: &mut S, from: u64, n: u64) -> Vec<LogEntry>
where
    S: futures::Stream<Item = Result<LogEntry, LogError>> + Unpin,
{
    let mut read = Vec::new();
    for want in from..from + n {
        let e = entries
            .next()
            .await
            .expect("the reader does not end")
            .expect("the reader reads on");
        assert_eq!(e.server_seq, want, "a gap or a duplicate");
        assert_eq!(e.op_id, format!("op-{want}"));
        read.push(e);
    }
    read
}

/// The names of the consumers on `USYNC_OPS` reading `SUBJECT`.
async fn readers(js: &jetstream::Context) -> Vec<String> {
    let ops = js.get_stream(OPS_STREAM).await.expect("ops stream");
    ops.consumers()
        .try_filter(|c| futures::future::ready(c.config.filter_subject == SUBJECT))
        .map_ok(|c| c.name)
        .try_collect()
        .await
        .expect("consumer list")
}

fn violations(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

/// A nats-server in `dir` with the shipped users and `users`' passwords.
fn with_users(dir: &std::path::Path, users: &NatsUsers) -> NatsdOptions {
    NatsdOptions {
        bin: find_nats_server(None).expect("nats-server (run ./scripts/setup.sh)"),
        store_dir: dir.join("store"),
        run_dir: dir.join("run"),
        users_conf: Some(shipped_users_conf()),
        env: users.server_env(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_starts_over_in_order_without_deleting_a_consumer() {
    ultrasync_testkit::init_tracing();
    let users = NatsUsers::random();
    let tmp = tempfile::tempdir().expect("tmp");
    // A fixed port, so that the restarted server is found at the same address.
    let opts = NatsdOptions {
        port: Some(free_ports(1).expect("port")[0]),
        ..with_users(tmp.path(), &users)
    };
    let mut nats = Natsd::spawn(&opts).expect("nats-server");
    let url = nats.url.clone();
    let admin = jetstream::new(users.connect(&url, "admin").await);
    ensure_layout(&admin, LayoutOptions::default())
        .await
        .expect("layout");
    for seq in 1..=20 {
        append(&admin, seq).await;
    }

    let gateway = jetstream::new(users.connect(&url, "gateway").await);
    let ops = gateway
        .get_stream(OPS_STREAM)
        .await
        .expect("ops as gateway");
    let mut entries = Box::pin(read_from(&ops, SUBJECT, 1).await.expect("read"));
    expect_next(&mut entries, 1, 20).await;

    // Its consumer deleted under it (as admin): it goes on from op 21 on a new one.
    let first = readers(&admin).await;
    assert_eq!(first.len(), 1, "one consumer reads the subject: {first:?}");
    admin
        .delete_consumer_from_stream(&first[0], OPS_STREAM)
        .await
        .expect("delete as admin");
    for seq in 21..=40 {
        append(&admin, seq).await;
    }
    expect_next(&mut entries, 21, 20).await;
    let second = readers(&admin).await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first, "the reader made a new consumer");

    // The server restarts (its memory consumers are gone, the log is not): the
    // reader goes on from op 41.
    nats.terminate(Duration::from_secs(10));
    nats = Natsd::spawn(&opts).expect("nats-server again");
    let admin = jetstream::new(users.connect(&url, "admin").await);
    for seq in 41..=60 {
        append(&admin, seq).await;
    }
    expect_next(&mut entries, 41, 20).await;
    let third = readers(&admin).await;
    assert!(
        !third.is_empty() && third.iter().all(|c| !second.contains(c)),
        "the reader made a new consumer after the restart: {third:?} (before: {second:?})"
    );

    let refused = violations(&nats.log_file);
    assert!(
        refused.is_empty(),
        "the reader hit permission violations:\n{}",
        refused.join("\n")
    );
}

/// Pulls ask for at most `PULL_MAX_BYTES`: ops of nearly the largest message size
/// the log takes, more of them than one pull's bytes hold, still come through in
/// order (a message over a pull's bytes would never be delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_reads_the_largest_messages_over_several_pulls() {
    ultrasync_testkit::init_tracing();
    let tmp = tempfile::tempdir().expect("tmp");
    let opts = NatsdOptions {
        bin: find_nats_server(None).expect("nats-server (run ./scripts/setup.sh)"),
        store_dir: tmp.path().join("store"),
        run_dir: tmp.path().join("run"),
        ..Default::default()
    };
    let nats = Natsd::spawn(&opts).expect("nats-server");
    let js = jetstream::new(async_nats::connect(&nats.url).await.expect("connect"));
    ensure_layout(&js, LayoutOptions::default())
        .await
        .expect("layout");
    let size = MAX_MSG_SIZE as usize - 4096;
    let count = (PULL_MAX_BYTES / size + 2) as u64;
    for seq in 1..=count {
        append_body(&js, seq, format!("{{\"v\":\"{}\"}}", "x".repeat(size - 8))).await;
    }
    let ops = js.get_stream(OPS_STREAM).await.expect("ops");
    let mut entries = Box::pin(read_from(&ops, SUBJECT, 1).await.expect("read"));
    let read = tokio::time::timeout(Duration::from_secs(60), expect_next(&mut entries, 1, count))
        .await
        .expect("every large op read within a minute");
    assert!(read.iter().all(|e| e.payload.len() == size));
}

/// Range reads with batched direct gets, as the shipped `gateway` user: the same ops
/// as a consumer's read for every range (ops several to a message, ranges starting
/// and ending inside a message, past the head, over many batches), bounded in bytes,
/// and a thousand of them leave no consumer behind (a stream holds at most 1,000 by
/// nats-server's default, and every reader of the log shares them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads_make_no_consumer() {
    ultrasync_testkit::init_tracing();
    let users = NatsUsers::random();
    let tmp = tempfile::tempdir().expect("tmp");
    let nats = Natsd::spawn(&with_users(tmp.path(), &users)).expect("nats-server");
    let admin = jetstream::new(users.connect(&nats.url, "admin").await);
    ensure_layout(&admin, LayoutOptions::default())
        .await
        .expect("layout");
    // 600 ops: singles, then messages of 3 ops (as the sequencer stores a batch).
    for seq in 1..=300 {
        append(&admin, seq).await;
    }
    for first in (301..=600).step_by(3) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(HDR_SEQ, first.to_string().as_str());
        headers.insert(HDR_OP_ID, format!("op-{first}").as_str());
        headers.insert(ultrasync_shared::nats::HDR_BATCH, "3");
        let body: Vec<String> = (first..first + 3)
            .map(|s| format!("{{\"n\":{s}}}"))
            .collect();
        admin
            .publish_with_headers(SUBJECT, headers, body.join("\n").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let client = users.connect(&nats.url, "gateway").await;
    let gateway = jetstream::new(client.clone());
    let ops = gateway
        .get_stream(OPS_STREAM)
        .await
        .expect("ops as gateway");
    let before = readers(&admin).await;
    for (from, to) in [
        (1, 1),
        (1, 8),
        (5, 300),
        (299, 302),
        (302, 302),
        (303, 600),
        (1, 600),
        (590, 900),
    ] {
        let direct = read_range_direct(&client, &ops, SUBJECT, from, to, usize::MAX)
            .await
            .expect("direct read");
        let seqs: Vec<u64> = direct.iter().map(|e| e.server_seq).collect();
        let want: Vec<u64> = (from..=to.min(600)).collect();
        assert_eq!(seqs, want, "{from}..={to}");
        assert!(
            direct
                .iter()
                .all(|e| e.payload == format!("{{\"n\":{}}}", e.server_seq))
        );
    }
    // Bounded in bytes: at least one op, then no more once the budget is reached.
    let page = read_range_direct(&client, &ops, SUBJECT, 1, 600, 100)
        .await
        .expect("direct read");
    let bytes: usize = page.iter().map(|e| e.payload.len()).sum();
    assert!(
        !page.is_empty() && (100..100 + 16).contains(&bytes),
        "{bytes} bytes"
    );
    assert_eq!(page[0].server_seq, 1);
    // Pages going on from the last op of the one before (inside a message or at its
    // end): every op once, in order, with no search for where a page starts.
    let mut all = page.clone();
    while let Some(last) = all.last().map(|e| (e.server_seq, e.stream_seq)) {
        let next = continue_range_direct(&client, &ops, SUBJECT, last, 600, 100)
            .await
            .expect("continued read");
        if next.is_empty() {
            break;
        }
        all.extend(next);
    }
    let seqs: Vec<u64> = all.iter().map(|e| e.server_seq).collect();
    assert_eq!(seqs, (1..=600).collect::<Vec<u64>>());
    assert!(
        continue_range_direct(&client, &ops, SUBJECT, (600, 500), 600, 100)
            .await
            .expect("past the end")
            .is_empty()
    );
    let mut reads = futures::stream::iter(0..1000)
        .map(|i| {
            let (client, ops) = (client.clone(), ops.clone());
            async move {
                let from = 1 + (i % 500) as u64;
                read_range_direct(&client, &ops, SUBJECT, from, from + 50, usize::MAX)
                    .await
                    .map(|e| e.len())
            }
        })
        .buffer_unordered(32);
    while let Some(read) = reads.next().await {
        assert_eq!(read.expect("direct read"), 51);
    }
    assert_eq!(
        readers(&admin).await,
        before,
        "a range read made a consumer"
    );
    // The consumer read it is measured against does make one.
    read_range(&ops, SUBJECT, 1, 600)
        .await
        .expect("consumer read");
    assert_eq!(readers(&admin).await.len(), before.len() + 1);
    let refused = violations(&nats.log_file);
    assert!(
        refused.is_empty(),
        "permission violations:\n{}",
        refused.join("\n")
    );
}
