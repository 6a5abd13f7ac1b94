//! Concurrent overlapping writes through both paths must not make the plexes diverge
//! (DESIGN.md §5 "Ordering": overlapping ops apply in one sequence order on every plex).
//!
//! Two `qemu-img bench -w` processes (queue depth 16, different patterns, one through each
//! node) hammer the same small volume — 4 KiB writes on both paths, then 12 KiB writes on one
//! path against 8 KiB writes on the other, so writes straddle each other's boundaries — while two qemu-io sessions write
//! unaligned runs of sectors at pseudo-random offsets through each path. Then every node is
//! stopped (SIGTERM) and the backing files must be identical byte for byte.

use std::time::Duration;

use sva_tests::mirror::first_difference;
use sva_tests::tools::QemuIoSession;
use sva_tests::{have_tools, run_tool, CacheMode, MirroredVolume, MirroredVolumeOptions};

/// Small, so every block is written many times from both sides; a multiple of 24 KiB so both
/// 12 KiB and 8 KiB bench writes wrap at the end without crossing it.
const VOLUME_BYTES: u64 = 42 * 24 * 1024;
/// Writes per bench process and case.
const BENCH_COUNT: u64 = 4000;
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Small writes per qemu-io session.
const SMALL_WRITES: u64 = 300;

fn bench(url: &str, size: u64, step: u64, pattern: u8) -> sva_tests::ToolOutput {
    let args = [
        "bench".to_string(),
        "-f".into(),
        "raw".into(),
        "-t".into(),
        "none".into(),
        "-w".into(),
        "-c".into(),
        BENCH_COUNT.to_string(),
        "-d".into(),
        "16".into(),
        "-s".into(),
        size.to_string(),
        "-S".into(),
        step.to_string(),
        format!("--pattern={pattern}"),
        url.to_string(),
    ];
    run_tool("qemu-img", &args, BENCH_TIMEOUT).expect("run qemu-img bench")
}

/// `write -P PAT OFF LEN` commands with offsets and lengths in sectors from a small LCG.
fn small_writes(seed: u64, pattern: u8) -> Vec<String> {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 33
    };
    let sectors = VOLUME_BYTES / 512;
    (0..SMALL_WRITES)
        .map(|_| {
            let len = 1 + next() % 24;
            let off = next() % (sectors - len);
            format!("write -P {pattern:#x} {} {}", off * 512, len * 512)
        })
        .collect()
}

#[test]
fn overlapping_writes_through_both_paths_leave_identical_plexes() {
    if !have_tools(
        "overlapping_writes_through_both_paths_leave_identical_plexes",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let mut v = MirroredVolume::start(MirroredVolumeOptions {
        cache_mode: CacheMode::WriteBack,
        size_bytes: VOLUME_BYTES,
        ..MirroredVolumeOptions::default()
    })
    .expect("start mirrored volume");
    let (url1, url2) = (v.url(1), v.url(2));

    for (size1, size2) in [(4096u64, 4096u64), (12288, 8192)] {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| bench(&url1, size1, size1, 0xa1));
            let b = s.spawn(|| bench(&url2, size2, size2, 0xb2));
            (a.join().expect("bench 1"), b.join().expect("bench 2"))
        });
        assert!(a.success(), "bench via plex 1: {}", a.describe());
        assert!(b.success(), "bench via plex 2: {}", b.describe());
        eprintln!(
            "{size1}/{size2}-byte writes: {BENCH_COUNT} through each path in {:?} / {:?}",
            a.elapsed, b.elapsed
        );
    }

    fn run(url: &str, seed: u64, pattern: u8) {
        {
            let mut q = QemuIoSession::open(url, Duration::from_secs(20)).expect("qemu-io");
            for cmd in small_writes(seed, pattern) {
                let r = q.run(&cmd, Duration::from_secs(20)).expect("qemu-io write");
                assert!(r.ok(), "{cmd} via {url}: {}", r.output);
            }
        }
    }
    std::thread::scope(|s| {
        let a = s.spawn(|| run(&url1, 1, 0x5a));
        let b = s.spawn(|| run(&url2, 2, 0xc3));
        a.join().expect("qemu-io via plex 1");
        b.join().expect("qemu-io via plex 2");
    });

    v.stop_all();
    let (p1, p2) = (v.plex_path(1), v.plex_path(2));
    let data = std::fs::read(&p1).expect("read plex 1");
    assert_eq!(data.len() as u64, VOLUME_BYTES);
    assert!(
        data.iter().all(|&b| [0xa1, 0xb2, 0x5a, 0xc3].contains(&b)),
        "plex 1 holds bytes no writer wrote (or unwritten zeros)"
    );
    if let Some(off) = first_difference(&p1, &p2).expect("compare plexes") {
        let other = std::fs::read(&p2).expect("read plex 2");
        panic!(
            "plexes diverge at byte {off} (sector {}): plex 1 has {:#x}, plex 2 has {:#x}",
            off / 512,
            data.get(off as usize).copied().unwrap_or(0),
            other.get(off as usize).copied().unwrap_or(0)
        );
    }
}
