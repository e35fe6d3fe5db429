//! The shared core of ultrasync: wire types, the op envelope, validated ids, error
//! codes, the NATS layout (subjects, streams, headers), auth, configuration and
//! tracing set-up. Nothing in here knows about WebSockets or HTTP; everything that
//! two services must agree on lives here and only here.

pub mod admission;
pub mod apikeys;
pub mod auth;
pub mod config;
pub mod cursors;
pub mod error;
pub mod ids;
pub mod local;
pub mod log;
pub mod namespaces;
pub mod nats;
pub mod natsd;
pub mod op;
pub mod protocol;
pub mod reads;
pub mod snapshot;
pub mod state;
pub mod telemetry;
pub mod trace;

pub use error::ErrorCode;
pub use ids::{Id, IdError, StreamKey, validate_key};
pub use op::{CommandEnvelope, Op, OpType, Precondition};
