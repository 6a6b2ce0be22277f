//! Fuzzing on past a bug that is already reported and not fixed yet.
//!
//! libFuzzer stops at the first crash, so a bug the fuzzer hits every few hundred inputs would keep every
//! run from getting anywhere else. With `WSGATE_FUZZ_TOLERATE` set to a comma-separated list of source
//! files (suffixes of the paths in panic messages, e.g. `src/config/key_path.rs`), a panic raised in one
//! of those files skips the input instead of crashing; every other panic (the harnesses' own assertions
//! included) still crashes. Unset, nothing is tolerated: CI-like and reproduction runs see every crash.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

thread_local! {
    static TOLERATED: Cell<bool> = const { Cell::new(false) };
}

fn tolerated_files() -> &'static [String] {
    static FILES: OnceLock<Vec<String>> = OnceLock::new();
    FILES.get_or_init(|| {
        let files: Vec<String> = std::env::var("WSGATE_FUZZ_TOLERATE")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if !files.is_empty() {
            eprintln!("WSGATE_FUZZ_TOLERATE: panics in {files:?} skip the input");
            // Wraps the hook libFuzzer's harness installed (print, then abort).
            let previous = panic::take_hook();
            let suffixes = files.clone();
            panic::set_hook(Box::new(move |info| {
                let known = info
                    .location()
                    .is_some_and(|l| suffixes.iter().any(|s| l.file().ends_with(s.as_str())));
                if known {
                    TOLERATED.with(|t| t.set(true));
                } else {
                    previous(info);
                }
            }));
        }
        files
    })
}

/// Runs `f`; a panic in a tolerated file makes it return `None`.
pub fn guard<T>(f: impl FnOnce() -> T) -> Option<T> {
    if tolerated_files().is_empty() {
        return Some(f());
    }
    TOLERATED.with(|t| t.set(false));
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Some(value),
        Err(payload) if TOLERATED.with(|t| t.get()) => {
            drop(payload);
            None
        }
        Err(payload) => panic::resume_unwind(payload),
    }
}
