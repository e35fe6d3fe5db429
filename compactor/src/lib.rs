//! The compactor (SPEC §8, issue 5): will purge each `usync.ops.…` subject below
//! `min(min acked cursor, latest snapshot seq) - retention floor`, never a subject's
//! newest op and never past a snapshot. Nothing is here yet; the crate holds its
//! place in the workspace layout.
