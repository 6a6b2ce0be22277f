//! The frame scanner on the client → backend direction (frames must be masked). See
//! `src/scanner_target.rs` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsgate_fuzz::known::guard(|| wsgate_fuzz::scanner_target::run(true, data));
});
