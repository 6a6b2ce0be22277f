//! `allowed_origins` patterns and a request's `Origin` fields, checked the way an upgrade is. See
//! `src/origin_target.rs` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::origin_target::run(data));
});
