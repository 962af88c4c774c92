#![no_main]
//! Feeds arbitrary bytes, split into client and server pieces, to the redis parser: from
//! the start, and again from a byte offset with capture gaps (watched mid-stream).
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openbox_agent::protocol::fuzz_one(openbox_agent::protocol::Protocol::Redis, data);
    openbox_agent::protocol::fuzz_resync(openbox_agent::protocol::Protocol::Redis, data);
});
