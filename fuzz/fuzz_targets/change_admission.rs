//! Automerge change admission: size, bounded inflate, op count, decode.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = ultrasync_shared::admission::fuzz_change(bytes);
});
