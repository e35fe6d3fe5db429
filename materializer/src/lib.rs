//! The materializer (SPEC §8, issue 4): will consume `USYNC_OPS`, apply ops with
//! `ultrasync_shared::state::apply` into RocksDB, write snapshots in the
//! `ultrasync_shared::snapshot` format and serve reads over NATS request-reply.
//! Nothing is here yet; the crate holds its place in the workspace layout.
