//! `AdminTokens::parse` on any text (bytes that are not UTF-8 are replaced). See
//! `src/admin_tokens_target.rs` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::admin_tokens_target::run(data));
});
