//! Placeholder replaced by the scanner micro-benchmark.
fn main() {}
