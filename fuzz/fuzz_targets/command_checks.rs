//! The gateway's command checks over a decoded frame (value depth and size, the
//! shape and sizes of an Automerge change, bounded inflating).
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = ultrasync_shared::admission::fuzz_command_frame(text);
});
