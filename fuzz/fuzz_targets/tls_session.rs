//! A client's TLS session (`tls_accept`, then reads and writes), fed what a client sends in reads the input
//! cuts. See `src/tls_session_target.rs` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::tls_session_target::run(data));
});
