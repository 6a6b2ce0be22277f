//! The first request head a client sends, read by wsgate itself. See `src/http_target.rs` for the input
//! layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::http_target::first_request(data));
});
