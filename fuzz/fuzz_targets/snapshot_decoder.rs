//! The snapshot blob decoder (header, checksum, bounded zstd, JSON, Automerge docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = ultrasync_shared::snapshot::fuzz_decode(bytes);
});
