#![no_main]
//! Feeds arbitrary bytes, split into client and server pieces, to the HTTP/2 parser.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    openbox_agent::protocol::fuzz_one(openbox_agent::protocol::Protocol::Http2, data);
});
