//! Tracing set-up shared by the binary and the test harness.

use tracing_subscriber::EnvFilter;

/// Installs a global subscriber: filter from `ULTRASYNC_LOG` (then `RUST_LOG`, then
/// `info`), text or JSON lines on stderr. Calling it twice is harmless.
pub fn init(json: bool) {
    let filter = std::env::var("ULTRASYNC_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,async_nats=warn".to_owned());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
