//! `wsgate::Config::from_toml` on any text (bytes that are not UTF-8 are replaced). See
//! `src/config_target.rs` for the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::config_target::run(data));
});
