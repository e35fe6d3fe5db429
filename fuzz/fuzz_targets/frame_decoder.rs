//! The WebSocket frame decoder: any text decodes to a frame or an error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = ultrasync_shared::protocol::ClientMessage::decode(text);
});
