//! The frame scanner on the backend → client direction (frames must not be masked). See
//! `src/scanner_target.rs` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::scanner_target::run(false, data));
});
