//! Two paths to one mirrored volume: a write through either node reads back through the
//! other (DESIGN.md §5: a write is acknowledged only after every in-sync plex applied it),
//! for a write-through and a write-back volume.

use sva_tests::mirror::first_difference;
use sva_tests::{
    have_tools, tools, CacheMode, MirrorTuning, MirroredVolume, MirroredVolumeOptions,
};

/// `(offset, length, pattern)`: aligned and unaligned, one sector to several bursts, an
/// overwrite inside an earlier write.
const WRITES: [(u64, u64, u8); 6] = [
    (0, 512, 0x11),
    (1 << 20, 4096, 0x22),
    (3 * 512, 12 * 512 + 512, 0x33),
    (2 << 20, 3 << 20, 0x44),
    ((2 << 20) + 4096, 8192, 0x55),
    ((16 << 20) - 512, 512, 0x66),
];

fn write_on_one_path_read_on_the_other(cache_mode: CacheMode) {
    let mut v = MirroredVolume::start(MirroredVolumeOptions {
        cache_mode,
        size_bytes: 16 << 20,
        ..MirroredVolumeOptions::default()
    })
    .expect("start mirrored volume");
    for (i, (off, len, pat)) in WRITES.iter().enumerate() {
        // Alternate the writing path; read through the other one, then the writing one.
        let (w, r) = if i % 2 == 0 { (1, 2) } else { (2, 1) };
        let out = tools::qemu_io(&v.url(w), &[&format!("write -P {pat:#x} {off} {len}")])
            .expect("qemu-io write");
        assert!(out.success(), "write via plex {w}: {}", out.describe());
        let out = tools::qemu_io(&v.url(r), &[&format!("read -P {pat:#x} {off} {len}")])
            .expect("qemu-io read");
        assert!(
            out.success(),
            "write {i} via plex {w} not visible via plex {r}: {}",
            out.describe()
        );
    }
    // The final picture through both paths: later writes win where they overlap.
    for p in [1, 2] {
        let cmds: Vec<String> = [
            "read -P 0x11 0 512",
            "read -P 0 512 1024",
            "read -P 0x33 1536 6656",
            "read -P 0x22 1M 4k",
            "read -P 0x44 2M 4k",
            "read -P 0x55 2101248 8k",
            "read -P 0x44 2109440 3133440",
            "read -P 0 5M 1M",
            "read -P 0x66 16776704 512",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let out = tools::qemu_io(&v.url(p), &refs).expect("qemu-io read");
        assert!(
            out.success(),
            "final picture via plex {p}: {}",
            out.describe()
        );
        assert!(!out.stdout.contains("failed"), "{}", out.describe());
    }
    // Orderly stop: the backing files are the same bytes.
    v.stop_all();
    assert_eq!(
        first_difference(&v.plex_path(1), &v.plex_path(2)).expect("compare"),
        None,
        "plex files differ"
    );
}

#[test]
fn cross_path_write_through() {
    if !have_tools("cross_path_write_through", &["qemu-io"]) {
        return;
    }
    write_on_one_path_read_on_the_other(CacheMode::WriteThrough);
}

#[test]
fn cross_path_write_back() {
    if !have_tools("cross_path_write_back", &["qemu-io"]) {
        return;
    }
    write_on_one_path_read_on_the_other(CacheMode::WriteBack);
}

/// Lone write-back writes get their acks while the origin polls the links for them
/// (`mirror.ackSpinMicros`, README "Mirrored writes"), and what they wrote is on the other
/// plex: a QD1 run through path 1, read back through path 2. Polling only pays if the ack is
/// read without the link's reader task; with tokio's own read the ack was never seen while
/// polling (every poll slept), which the counter catches. The peer's link polls for the
/// next op meanwhile (`mirror.opSpinMicros`), so that the ops of a steady QD1 run arrive
/// while it polls rather than after it slept.
#[test]
fn lone_writes_are_acked_while_the_origin_polls() {
    if !have_tools("lone_writes_are_acked_while_the_origin_polls", &["qemu-io"]) {
        return;
    }
    let v = MirroredVolume::start(MirroredVolumeOptions {
        cache_mode: CacheMode::WriteBack,
        size_bytes: 16 << 20,
        // Longer than the default 200 µs, so that acks slowed by the tests running beside
        // this one still come within it.
        tuning: MirrorTuning {
            ack_spin_micros: Some(5_000),
            op_spin_micros: Some(5_000),
            ..MirrorTuning::default()
        },
        ..MirroredVolumeOptions::default()
    })
    .expect("start mirrored volume");
    const WRITES: u64 = 300;
    // 4 KiB block i, each with its own pattern: `VERB -P PATTERN OFFSET 4k`.
    let run = |plex: u16, verb: &str| {
        let cmds: Vec<String> = (0..WRITES)
            .map(|i| format!("{verb} -P {:#x} {} 4k", 1 + (i % 250), i * 4096))
            .collect();
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let out = tools::qemu_io(&v.url(plex), &refs).expect("qemu-io");
        assert!(out.success(), "{verb}s via plex {plex}: {}", out.describe());
        assert!(!out.stdout.contains("failed"), "{}", out.describe());
    };
    run(1, "write");
    run(2, "read");

    let polls = |plex: u16, counter: &str, result: &str| -> u64 {
        let text = v.metrics(plex).expect("metrics");
        let key = format!("{counter}{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in plex {plex}'s metrics:\n{text}"))
    };
    let acks = "sva_mirror_ack_polls_total";
    let (acked, slept) = (polls(1, acks, "acked"), polls(1, acks, "slept"));
    eprintln!("{WRITES} QD1 writes: {acked} acked while polling, {slept} slept after polling");
    // Polling stops while acks take longer than the limit (a loaded machine), so not every
    // write polls; but a run of lone writes on a fresh volume starts polling, and an ack
    // that can arrive at all arrives within 200 µs here at least some of the time.
    assert!(
        acked > 0,
        "no write was acked while polling ({slept} slept)"
    );
    let ops = "sva_mirror_op_polls_total";
    let (received, op_slept) = (polls(2, ops, "received"), polls(2, ops, "slept"));
    eprintln!("plex 2 received {received} ops while polling, {op_slept} after sleeping");
    // As above: a loaded machine can stretch the gaps past the limit, but not all of them.
    assert!(
        received > 0,
        "no op reached plex 2 while its link polled ({op_slept} slept)"
    );
}
