//! The PROXY protocol header at the start of a connection, read by `proxy_protocol::parse`. See
//! `src/proxy_header_target.rs` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::proxy_header_target::run(data));
});
