//! A backend's response to a forwarded request: its head, its body's framing, the body decoded piece by
//! piece; and wsgate's chunked encoding decoded back. See `src/response_target.rs` for the input layout
//! and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::response_target::backend_response(data));
});
