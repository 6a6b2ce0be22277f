//! Micro-benchmark of `Scanner::scan`, the per-read cost of the tunnel: one 32 KiB read buffer filled with
//! client frames (masked) of 64 bytes, 1 KiB and 16 KiB. Reported twice: as bytes per second, and as
//! frames per second (the per-frame cost is its inverse).
//!
//! `cargo bench --bench frame_scan -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wsgate::internals::BUFFER_SIZE;
use wsgate::internals::frame::{MAX_HEADER_LEN, OP_BINARY, apply_mask, write_header};
use wsgate::internals::scanner::Scanner;

/// A read buffer holding as many whole masked frames of `payload` bytes as fit; returns it, the bytes
/// used and the number of frames.
fn buffer_of_frames(payload: usize) -> (Vec<u8>, usize, u64) {
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut used = 0;
    let mut frames = 0;
    let mut key = 0x1234_5678u32;
    loop {
        let mut header = [0u8; MAX_HEADER_LEN];
        let mask = key.to_be_bytes();
        let n = write_header(&mut header, true, OP_BINARY, Some(mask), payload as u64);
        if used + n + payload > buf.len() {
            break;
        }
        buf[used..used + n].copy_from_slice(&header[..n]);
        let body = &mut buf[used + n..used + n + payload];
        body.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        apply_mask(body, mask, 0);
        used += n + payload;
        frames += 1;
        key = key.wrapping_mul(2_654_435_761).wrapping_add(1);
    }
    (buf, used, frames)
}

const CASES: [(&str, usize); 3] = [
    ("64B_frames", 64 - 6),
    ("1KiB_frames", 1024),
    ("16KiB_frame", 16 * 1024),
];

fn scan_32k(c: &mut Criterion) {
    for (unit, per_frame) in [("bytes", false), ("frames", true)] {
        let mut group = c.benchmark_group(format!("scan_32KiB_{unit}"));
        for (name, payload) in CASES {
            let (mut buf, used, frames) = buffer_of_frames(payload);
            group.throughput(if per_frame {
                Throughput::Elements(frames)
            } else {
                Throughput::Bytes(used as u64)
            });
            // Whole frames only: the scanner ends every pass between frames, so one scanner serves all passes.
            let mut scanner = Scanner::new(true, 0, u64::MAX);
            group.bench_function(name, |b| {
                b.iter(|| {
                    let scan = scanner.scan(black_box(&mut buf), black_box(used));
                    assert_eq!(scan.out_len, used);
                    assert_eq!(u64::from(scan.frames), frames);
                    scan
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, scan_32k);
criterion_main!(benches);
