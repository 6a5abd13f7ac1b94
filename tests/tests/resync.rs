//! Resync and online verify (RESYNC.md "Must-shows", DESIGN.md §6) with real processes: a
//! witness and two `sva-node serve --config` nodes, qemu-io / qemu-img as initiators, the
//! control API (`GET /v1/status`, `POST /v1/resync-rate`, `POST /v1/verify`) for progress.
//!
//! | test | must-show | asserted |
//! |---|---|---|
//! | [`incremental_resync_copies_only_written_regions`] | 1 | `copiedBytes` ≤ 1.5 × regions written; plex 2 InSync, its path ActiveOptimized; data reads back through it; backing files identical |
//! | [`full_resync_rate_against_local_sequential_writes`] | 2 | full resync rate vs `dd` rate measured in the same run (printed; ≥ 0.6 asserted with `SVA_ASSERT_RATES=1`); 4 KiB QD1 writes complete during it; identical files |
//! | [`resume_after_target_killed_half_way`], [`resume_after_source_killed_half_way`] | 3 | the second attempt starts with ≤ 65% of the work left; total copied < 1.5 × one full copy; identical files |
//! | [`both_nodes_killed_during_writes`] | 4 | both back InSync; every acknowledged write reads back through both paths; only the written zone is resynced; identical files |
//! | [`verify_finds_a_corrupted_region`] | 5 | clean verify: no mismatch; after flipping bytes in plex 2's file: exactly that region; a verify with `repair` resyncs that region (≤ 2 regions copied), plex 2 comes back InSync, files identical |
//!
//! Progress comes from a [`Watcher`] thread polling every node's `/v1/status` every
//! [`POLL`]; each failure message carries the last status documents (and, through
//! `MirroredVolume`'s drop, the node logs). The rate test wants the release build:
//! `SVA_NODE_BIN=$CARGO_TARGET_DIR/release/sva-node`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sva_tests::mirror::first_difference;
use sva_tests::tools::QemuIoSession;
use sva_tests::{
    fetch_status, have_tools, run_tool, MirrorStatus, MirrorTuning, MirroredVolume,
    MirroredVolumeOptions,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The node's default `mirror.regionBytes` (RESYNC.md "Config"); the tests leave it unset.
const REGION: u64 = MIB;
const BLOCK: u64 = 4 * KIB;
/// Status poll period of the [`Watcher`].
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for one resync to finish (1 GiB at a few tens of MiB/s plus restarts).
const RESYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a node to notice a dead peer / become ActiveOptimized again.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one qemu-io command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
/// Filling a volume through iSCSI (1 GiB mirrored).
const FILL_TIMEOUT: Duration = Duration::from_secs(600);

/// Heavy and timing-sensitive: one test of this file at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Status parsing and watching

/// `plexes[id].resync` of one status document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Progress {
    done: u64,
    total: u64,
    copied: u64,
    bytes_per_sec: u64,
    full: bool,
    role: Option<String>,
}

fn progress(st: &MirrorStatus, plex: u16) -> Option<Progress> {
    let p = st
        .raw
        .get("plexes")?
        .as_array()?
        .iter()
        .find(|p| p["id"].as_u64() == Some(u64::from(plex)))?;
    let r = p.get("resync")?;
    let n = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    Some(Progress {
        done: n("doneBytes"),
        total: n("totalBytes"),
        copied: n("copiedBytes"),
        bytes_per_sec: n("bytesPerSec"),
        full: r.get("full").and_then(|v| v.as_bool()).unwrap_or(false),
        role: r.get("role").and_then(|v| v.as_str()).map(str::to_owned),
    })
}

/// One status document from one node.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    node: u16,
    st: MirrorStatus,
}

/// Polls `/v1/status` of every node every [`POLL`] on its own thread (so nothing is missed
/// while the test restarts a node) and keeps every answer.
struct Watcher {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(v: &MirroredVolume) -> Self {
        let addrs: Vec<(u16, SocketAddr)> = (1..=v.plexes())
            .map(|p| (p, v.control_addr(p).expect("control address")))
            .collect();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let samples = samples.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for &(node, addr) in &addrs {
                        if let Ok(st) = fetch_status(addr) {
                            let s = Sample {
                                at: Instant::now(),
                                node,
                                st,
                            };
                            samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                        }
                    }
                    std::thread::sleep(POLL);
                }
            })
        };
        Watcher {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    fn all(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest sample of `node` taken at or after `since`.
    fn latest(&self, node: u16, since: Instant) -> Option<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|s| s.node == node && s.at >= since)
            .cloned()
    }

    /// Waits until `pred` holds for the newest sample of `node` (taken after this call), or
    /// panics after `timeout` with the last document of every node.
    fn wait(
        &self,
        node: u16,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&MirrorStatus) -> bool,
    ) -> Sample {
        let since = Instant::now();
        loop {
            if let Some(s) = self.latest(node, since) {
                if pred(&s.st) {
                    return s;
                }
            }
            if since.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for node {node}: {what}\n{}",
                    self.last_docs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The newest status document of every node, for failure messages.
    fn last_docs(&self) -> String {
        let all = self.all();
        let mut out = String::new();
        for node in 1..=3u16 {
            if let Some(s) = all.iter().rev().find(|s| s.node == node) {
                out.push_str(&format!(
                    "last /v1/status of node {node} ({:?} ago): {}\n",
                    s.at.elapsed(),
                    s.st.raw
                ));
            }
        }
        out
    }

    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.all()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn all_in_sync(st: &MirrorStatus) -> bool {
    !st.plexes.is_empty() && st.plexes.iter().all(|(_, s)| s == "InSync")
}

fn short(st: &MirrorStatus, plex: u16) -> String {
    format!(
        "epoch {} alua {} plexes {:?} resync[{plex}] {:?}",
        st.epoch,
        st.alua_state,
        st.plexes,
        progress(st, plex)
    )
}

/// `NAME{...plex="P"...} VALUE` from Prometheus text, if the node exports it.
fn metric(text: &str, name: &str, plex: u16) -> Option<u64> {
    let label = format!("plex=\"{plex}\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&label))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

fn copied_metric(v: &MirroredVolume, node: u16, plex: u16) -> Option<u64> {
    v.metrics(node)
        .ok()
        .and_then(|t| metric(&t, "sva_resync_copied_bytes_total", plex))
}

// ---------------------------------------------------------------------------------------------
// Volume setup and I/O helpers

fn start_volume(size_bytes: u64, tuning: MirrorTuning) -> MirroredVolume {
    MirroredVolume::start(MirroredVolumeOptions {
        size_bytes,
        volume_name: "rvol".into(),
        iqn: "iqn.2026-01.io.sva:rvol".into(),
        tuning,
        ..MirroredVolumeOptions::default()
    })
    .expect("start mirrored volume")
}

/// Kills plex `victim`'s node and waits until the survivor serves alone (victim Stale, itself
/// ActiveOptimized).
fn kill_and_wait_alone(v: &mut MirroredVolume, victim: u16) {
    let survivor = 3 - victim;
    v.kill9(victim);
    let ok = sva_tests::wait_until(
        || {
            v.status(survivor).is_ok_and(|s| {
                s.plex_state(victim) == Some("Stale") && s.alua_state == "ActiveOptimized"
            })
        },
        STATE_TIMEOUT,
    );
    assert!(
        ok.is_some(),
        "plex {survivor} did not take over after plex {victim} was killed: {:?}",
        v.status(survivor).map(|s| s.raw)
    );
}

/// Fills `[0, bytes)` through plex `plex` with one byte `pattern` (qemu-img bench, 1 MiB QD8).
fn fill(v: &MirroredVolume, plex: u16, bytes: u64, pattern: u8) -> Duration {
    let start = Instant::now();
    let count = (bytes / MIB).to_string();
    let pat = format!("--pattern={pattern}");
    let url = v.url(plex);
    let out = run_tool(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-t", "none", "-w", "-s", "1M", "-d", "8", "-c", &count, &pat,
            &url,
        ],
        FILL_TIMEOUT,
    )
    .expect("qemu-img bench");
    assert!(out.success(), "fill failed: {}", out.describe());
    let took = start.elapsed();
    eprintln!(
        "filled {} MiB through plex {plex} with {pattern:#x} in {took:.1?} ({:.0} MiB/s)",
        bytes / MIB,
        bytes as f64 / MIB as f64 / took.as_secs_f64()
    );
    took
}

/// Waits until plex `plex`'s node reports its path ActiveOptimized and a read through it works.
fn wait_serving(v: &MirroredVolume, w: &Watcher, plex: u16) {
    w.wait(plex, "own path ActiveOptimized", STATE_TIMEOUT, |s| {
        s.alua_state == "ActiveOptimized" && all_in_sync(s)
    });
    v.wait_readable(plex, STATE_TIMEOUT)
        .expect("path readable again");
}

/// Orderly stop of everything, then the two backing files must be byte-identical.
fn assert_plexes_identical(v: &mut MirroredVolume) {
    v.stop_all();
    let (a, b) = (v.plex_path(1), v.plex_path(2));
    let diff = first_difference(&a, &b).expect("compare backing files");
    assert_eq!(
        diff,
        None,
        "backing files differ at byte {diff:?} (region {:?})",
        diff.map(|d| d / REGION)
    );
    eprintln!(
        "backing files identical ({} bytes)",
        a.metadata().map(|m| m.len()).unwrap_or(0)
    );
}

/// Runs `commands` in one qemu-io session on `url`; each must succeed.
fn qemu_io_all(url: &str, commands: &[String]) {
    let mut s = QemuIoSession::open(url, COMMAND_TIMEOUT).expect("qemu-io");
    for c in commands {
        let r = s.run(c, COMMAND_TIMEOUT).expect("qemu-io command");
        assert!(r.ok(), "`{c}` through {url}: {}", r.output.trim());
    }
}

fn regions_of(off: u64, len: u64) -> impl Iterator<Item = u64> {
    (off / REGION)..(off + len).div_ceil(REGION)
}

/// One 4 KiB write of a write loop.
#[derive(Debug, Clone)]
struct WriteRec {
    block: u64,
    pattern: u8,
    started: Instant,
    latency: Duration,
    ok: bool,
    output: String,
}

fn pattern_of(index: u64) -> u8 {
    // 1..=250: never 0, so an unwritten block cannot pass for a written one.
    (index % 250) as u8 + 1
}

/// A thread writing 4 KiB QD1 through `url`: write `i` goes to block
/// `first_block + (offset + i * step) % blocks` with [`pattern_of`]`(i + salt)`, until `stop`
/// or the session fails (a command timing out when every node is dead ends the loop).
fn spawn_writer(
    url: String,
    first_block: u64,
    blocks: u64,
    offset: u64,
    step: u64,
    salt: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<WriteRec>> {
    std::thread::spawn(move || {
        let mut log = Vec::new();
        let Ok(mut s) = QemuIoSession::open(&url, COMMAND_TIMEOUT) else {
            return log;
        };
        for i in 0u64.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let block = first_block + (offset + i * step) % blocks;
            let pattern = pattern_of(i + salt);
            let cmd = format!("write -P {pattern:#x} {} {BLOCK}", block * BLOCK);
            let started = Instant::now();
            match s.run(&cmd, COMMAND_TIMEOUT) {
                Ok(r) => log.push(WriteRec {
                    block,
                    pattern,
                    started,
                    latency: started.elapsed(),
                    ok: r.ok(),
                    output: r.output,
                }),
                Err(e) => {
                    log.push(WriteRec {
                        block,
                        pattern,
                        started,
                        latency: started.elapsed(),
                        ok: false,
                        output: format!("{e:#}"),
                    });
                    break;
                }
            }
        }
        log
    })
}

/// Per block, the patterns it may hold: that of its last acknowledged write, plus those of
/// later writes that were not acknowledged (they may or may not have landed). Blocks with no
/// acknowledged write are left out.
fn expected_blocks(logs: &[&[WriteRec]]) -> BTreeMap<u64, Vec<u8>> {
    let mut per_block: BTreeMap<u64, Vec<&WriteRec>> = BTreeMap::new();
    for log in logs {
        for r in log.iter() {
            per_block.entry(r.block).or_default().push(r);
        }
    }
    let mut out = BTreeMap::new();
    for (block, mut recs) in per_block {
        recs.sort_by_key(|r| r.started);
        if let Some(last_ok) = recs.iter().rposition(|r| r.ok) {
            let mut pats = vec![recs[last_ok].pattern];
            pats.extend(recs[last_ok + 1..].iter().map(|r| r.pattern));
            out.insert(block, pats);
        }
    }
    out
}

/// Every block of `expected` reads back with one of its allowed patterns through `url`.
fn verify_blocks(url: &str, expected: &BTreeMap<u64, Vec<u8>>) {
    let mut s = QemuIoSession::open(url, COMMAND_TIMEOUT).expect("qemu-io");
    for (block, pats) in expected {
        let found = pats.iter().any(|p| {
            let cmd = format!("read -P {p:#x} {} {BLOCK}", block * BLOCK);
            s.run(&cmd, COMMAND_TIMEOUT).expect("qemu-io read").ok()
        });
        if !found {
            let dump = s
                .run(&format!("read -v {} 32", block * BLOCK), COMMAND_TIMEOUT)
                .map(|r| r.output)
                .unwrap_or_default();
            panic!(
                "acknowledged write lost through {url}: block {block} (offset {}) holds none of \
                 {pats:#x?}; it starts with:\n{dump}",
                block * BLOCK
            );
        }
    }
    eprintln!(
        "{} acknowledged blocks read back through {url}",
        expected.len()
    );
}

fn percentiles(lat: &[Duration]) -> String {
    if lat.is_empty() {
        return "no samples".into();
    }
    let mut v: Vec<Duration> = lat.to_vec();
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "n={} p50={:.2?} p90={:.2?} p99={:.2?} max={:.2?}",
        v.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        v[v.len() - 1]
    )
}

/// The machine's sequential write rate on the volume's filesystem, bytes/s:
/// `dd if=/dev/zero bs=1M count=N conv=fdatasync` into a new file there (the page cache
/// takes the writes, one flush at the end), or with `direct`, `oflag=direct` (each 1 MiB
/// write goes to the device, as a resync's copies do).
fn local_sequential_write_rate(dir: &std::path::Path, bytes: u64, direct: bool) -> f64 {
    let file = dir.join("dd-rate-probe");
    let of = format!("of={}", file.display());
    let count = format!("count={}", bytes / MIB);
    let how = if direct {
        "oflag=direct"
    } else {
        "conv=fdatasync"
    };
    let start = Instant::now();
    let out = run_tool(
        "dd",
        &["if=/dev/zero", &of, "bs=1M", &count, how, "status=none"],
        Duration::from_secs(300),
    )
    .expect("dd");
    let took = start.elapsed();
    let _ = std::fs::remove_file(&file);
    settle_filesystem(dir);
    assert!(out.success(), "dd failed: {}", out.describe());
    bytes as f64 / took.as_secs_f64()
}

/// Commit `dir`'s filesystem now (`sync -f`), so that deleting a 1 GiB file (a dd probe, a
/// wiped plex) is finished before the next measurement: its blocks are freed at the next
/// journal commit, and on a filesystem mounted with `discard` (this VM's root) that commit
/// also discards them. Left to the periodic commit, that work lands in whatever runs next.
fn settle_filesystem(dir: &std::path::Path) {
    let dir = dir.display().to_string();
    if let Err(e) = run_tool("sync", &["-f", &dir], Duration::from_secs(120)) {
        eprintln!("sync -f {dir}: {e}");
    }
}

/// `at` in seconds of CLOCK_MONOTONIC (what `Instant` reads on Linux), so a slow run can be
/// found in a system trace taken beside the test.
fn monotonic_secs(at: Instant) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the place we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = Instant::now();
    let now_secs = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
    now_secs - now.saturating_duration_since(at).as_secs_f64()
}

/// `at` as UTC time of day (`HH:MM:SS.mmm`), to find it in the node logs.
fn utc(at: Instant) -> String {
    let ago = Instant::now().saturating_duration_since(at);
    let wall = std::time::SystemTime::now() - ago;
    let ms = wall
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn mib_s(bytes_per_sec: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_sec / MIB as f64)
}

fn set_resync_rate(v: &MirroredVolume, node: u16, bytes_per_sec: u64) {
    let body = format!("{{\"bytesPerSec\": {bytes_per_sec}}}");
    let mut last = None;
    let ok = sva_tests::wait_until(
        || {
            let r = v.post(node, "/v1/resync-rate", &body, true);
            let done = matches!(r, Ok((200, _)));
            last = Some(r);
            done
        },
        STATE_TIMEOUT,
    );
    assert!(
        ok.is_some(),
        "POST /v1/resync-rate to node {node}: {last:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 1. Incremental resync

/// Resync rate limit of the incremental test: 27 MiB take ~1 s.
const INCREMENTAL_RATE: u64 = 32 * MIB;

/// Must-show 1: kill -9 plex 2, write ~1% of a 1 GiB volume through plex 1 (contiguous 1 MiB
/// chunks, one unaligned 2 MiB run, scattered 4 KiB writes), restart plex 2 with its config.
/// Plex 1 must copy at most 1.5 × the regions written (`copiedBytes` of its status, or the
/// `sva_resync_copied_bytes_total` counter), plex 2 must come back InSync with its path
/// ActiveOptimized and serve the new data, and the backing files must be identical.
#[test]
fn incremental_resync_copies_only_written_regions() {
    if !have_tools("incremental_resync", &["qemu-io"]) {
        return;
    }
    let _serial = serial();
    let mut v = start_volume(GIB, MirrorTuning::default());
    kill_and_wait_alone(&mut v, 2);

    // (offset, length, pattern): ~10 MiB of 1 GiB in 27 distinct regions.
    let mut writes: Vec<(u64, u64, u8)> = Vec::new();
    for (i, mib) in [10u64, 100, 200, 300, 450, 600, 750, 900]
        .iter()
        .enumerate()
    {
        writes.push((mib * MIB, MIB, 0x10 + i as u8));
    }
    writes.push((500 * MIB + 512 * KIB, 2 * MIB, 0x30)); // regions 500, 501, 502
    for i in 0..16u64 {
        let region = 20 + 61 * i; // 20, 81, ... 935: none of the above
        writes.push((region * MIB + (i * 3 * BLOCK) % MIB, BLOCK, 0x40 + i as u8));
    }
    let regions: BTreeSet<u64> = writes
        .iter()
        .flat_map(|&(o, l, _)| regions_of(o, l))
        .collect();
    let written: u64 = writes.iter().map(|w| w.1).sum();
    assert_eq!(regions.len(), 27, "test plan: regions {regions:?}");
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    qemu_io_all(&v.url(1), &cmds);
    eprintln!(
        "wrote {written} bytes ({:.2}% of the volume) in {} regions through plex 1 while plex 2 \
         was down",
        written as f64 * 100.0 / GIB as f64,
        regions.len()
    );
    let metric_before = copied_metric(&v, 1, 2).unwrap_or(0);
    // Throttled so the copy lasts ~1 s and the status polls see copiedBytes grow, even if
    // the counter is cleared once the plex is InSync (the throttle changes no byte counts).
    set_resync_rate(&v, 1, INCREMENTAL_RATE);

    let w = Watcher::start(&v);
    let restarted = Instant::now();
    v.restart(2).expect("restart plex 2 with its config");
    let done = w.wait(1, "plex 2 InSync in plex 1's view", RESYNC_TIMEOUT, |s| {
        s.plex_state(2) == Some("InSync")
    });
    eprintln!(
        "plex 2 InSync {:?} after its restart: {}",
        done.at.duration_since(restarted),
        short(&done.st, 2)
    );
    wait_serving(&v, &w, 2);
    let samples = w.finish();
    let src: Vec<&Sample> = samples.iter().filter(|s| s.node == 1).collect();
    let max_copied = src
        .iter()
        .filter_map(|s| progress(&s.st, 2))
        .map(|p| p.copied)
        .max()
        .unwrap_or(0);
    let max_total = src
        .iter()
        .filter_map(|s| progress(&s.st, 2))
        .map(|p| p.total)
        .max()
        .unwrap_or(0);
    let roles: BTreeSet<String> = src
        .iter()
        .filter_map(|s| progress(&s.st, 2).and_then(|p| p.role))
        .collect();
    let metric_copied = copied_metric(&v, 1, 2).map(|m| m - metric_before.min(m));
    let copied = max_copied.max(metric_copied.unwrap_or(0));
    let bound = regions.len() as u64 * REGION * 3 / 2;
    eprintln!(
        "incremental resync: copiedBytes max {max_copied} (status), {metric_copied:?} (metric), \
         totalBytes max {max_total}, roles seen {roles:?}; bound 1.5 x {} regions = {bound}; \
         {} status samples from plex 1",
        regions.len(),
        src.len()
    );
    assert!(
        copied > 0,
        "no copy was observed: copiedBytes stayed 0 in {} samples and the metric says \
         {metric_copied:?} — yet plex 2 missed {written} bytes",
        src.len()
    );
    assert!(
        copied <= bound,
        "incremental resync copied {copied} bytes; the regions written are {} x {REGION} = {} \
         bytes (bound {bound})",
        regions.len(),
        regions.len() as u64 * REGION
    );
    // The count must be the copy's, not a sample of it: plex 2 missed `written` bytes of
    // data that only a copy can bring (holes copy none, data never less than itself).
    assert!(
        copied >= written,
        "copiedBytes {copied} is below the {written} bytes of data plex 2 missed (yet its data \
         arrived, see below): the reported count undercounts the copy"
    );

    // Plex 2 serves the writes it missed (reads through its own path).
    let reads: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    qemu_io_all(&v.url(2), &reads);
    let st2 = v.status(2).expect("status of plex 2");
    assert_eq!(st2.alua_state, "ActiveOptimized", "{}", st2.raw);
    assert_plexes_identical(&mut v);
}

// ---------------------------------------------------------------------------------------------
// 2. Full resync rate

/// Must-show 2: a 1 GiB volume filled with data through both plexes; plex 2 is killed and
/// replaced by an empty sparse file with an empty state dir, then restarted. The full resync's
/// rate (totalBytes over the time from the first progress report to InSync) is compared with
/// the median of three `dd oflag=direct` rates measured on the same filesystem in this run,
/// two before the resync and one after (the bar is 0.6, asserted only with
/// `SVA_ASSERT_RATES=1`: a rate is a measurement); a 4 KiB QD1 write loop through plex 1 must
/// keep completing during the resync (latency percentiles before vs during are printed, not
/// asserted).
#[test]
fn full_resync_rate_against_local_sequential_writes() {
    if !have_tools("full_resync", &["qemu-io", "qemu-img", "dd"]) {
        return;
    }
    let _serial = serial();
    let mut v = start_volume(GIB, MirrorTuning::default());
    fill(&v, 1, GIB, 0x5c);
    kill_and_wait_alone(&mut v, 2);
    v.wipe_plex(2).expect("wipe plex 2");
    settle_filesystem(v.dir());

    // The bar's rate is `dd oflag=direct`, like the resync's own writes: past the page
    // cache, so it measures the disk. A buffered `dd conv=fdatasync` on this VM measures the
    // guest's memory as much: right after another large write it reuses the freed pages and
    // reaches 1.7-2.1 GB/s, after a few idle seconds (free pages handed back to the host) it
    // gets 350-430 MB/s (2026-12-04). It is printed, not used. One direct dd still varies
    // from 1.2 to 2.5 GB/s between runs, so the bar's rate is the median of three: two now,
    // one after the resync.
    let mut dd_rates = vec![
        local_sequential_write_rate(v.dir(), GIB, true),
        local_sequential_write_rate(v.dir(), GIB, true),
    ];
    let dd_buffered_rate = local_sequential_write_rate(v.dir(), GIB, false);
    eprintln!(
        "local sequential write (dd 1 GiB): oflag=direct {} and {}; conv=fdatasync {}",
        mib_s(dd_rates[0]),
        mib_s(dd_rates[1]),
        mib_s(dd_buffered_rate)
    );

    // Foreground 4 KiB QD1 writes through plex 1 into the first 64 MiB.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(v.url(1), 0, 64 * MIB / BLOCK, 0, 1, 0, stop.clone());
    std::thread::sleep(Duration::from_secs(3));

    let w = Watcher::start(&v);
    let restarted = Instant::now();
    v.restart(2).expect("restart the wiped plex 2");
    let started = w.wait(1, "a resync of plex 2 under way", RESYNC_TIMEOUT, |s| {
        s.plex_state(2) == Some("InSync") || progress(s, 2).is_some_and(|p| p.total > 0)
    });
    let done = w.wait(1, "plex 2 InSync", RESYNC_TIMEOUT, |s| {
        s.plex_state(2) == Some("InSync")
    });
    let in_sync_at = done.at;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().expect("writer thread");
    wait_serving(&v, &w, 2);
    let samples = w.finish();
    dd_rates.push(local_sequential_write_rate(v.dir(), GIB, true));
    dd_rates.sort_by(f64::total_cmp);
    let dd_rate = dd_rates[1];

    let prog: Vec<Progress> = samples
        .iter()
        .filter(|s| s.node == 1)
        .filter_map(|s| progress(&s.st, 2))
        .collect();
    let total = prog.iter().map(|p| p.total).max().unwrap_or(0);
    let copied = prog.iter().map(|p| p.copied).max().unwrap_or(0);
    let engine_rate = prog.iter().map(|p| p.bytes_per_sec).max().unwrap_or(0);
    let full_seen = prog.iter().any(|p| p.full);
    // The copy phase starts at the first report of copied data after the restart (plex 1 may
    // report a pending total for plex 2 while it is down; that is not copying).
    let (first_progress, done0) = samples
        .iter()
        .filter(|s| s.node == 1 && s.at >= restarted)
        .find_map(|s| {
            progress(&s.st, 2)
                .filter(|p| p.done > 0 || p.copied > 0)
                .map(|p| (s.at, p.done))
        })
        .unwrap_or((started.at, 0));
    let copy_secs = in_sync_at.duration_since(first_progress).as_secs_f64();
    let e2e_secs = in_sync_at.duration_since(restarted).as_secs_f64();
    let moved = total.saturating_sub(done0);
    let rate = moved as f64 / copy_secs.max(1e-3);
    let e2e_rate = total.max(copied) as f64 / e2e_secs.max(1e-3);
    let ratio = rate / dd_rate;

    let before: Vec<Duration> = log
        .iter()
        .filter(|r| r.started < restarted)
        .map(|r| r.latency)
        .collect();
    let during: Vec<&WriteRec> = log
        .iter()
        .filter(|r| r.started >= first_progress && r.started < in_sync_at)
        .collect();
    let failed: Vec<&WriteRec> = log.iter().filter(|r| !r.ok).collect();
    eprintln!(
        "full resync: totalBytes {total}, copiedBytes max {copied}, full flag seen {full_seen}, \
         engine bytesPerSec max {}\n  copy phase {copy_secs:.2} s -> {} ; restart->InSync \
         {e2e_secs:.2} s -> {}\n  dd oflag=direct median {} (of {}) ; ratio (copy phase / dd \
         median) = {ratio:.2} (bar 0.60), against the fastest dd {:.2}, end-to-end ratio {:.2}; \
         copy phase / dd conv=fdatasync {:.2}\n  4 KiB QD1 writes before: {}\n  4 KiB QD1 \
         writes during: {}\n  failed writes: {}",
        mib_s(engine_rate as f64),
        mib_s(rate),
        mib_s(e2e_rate),
        mib_s(dd_rate),
        dd_rates
            .iter()
            .map(|r| mib_s(*r))
            .collect::<Vec<_>>()
            .join(", "),
        rate / dd_rates[2],
        e2e_rate / dd_rate,
        rate / dd_buffered_rate,
        percentiles(&before),
        percentiles(&during.iter().map(|r| r.latency).collect::<Vec<_>>()),
        failed.len()
    );
    for r in failed.iter().take(5) {
        eprintln!("  failed write to block {}: {}", r.block, r.output.trim());
    }
    let (from, to) = (monotonic_secs(first_progress), monotonic_secs(in_sync_at));
    eprintln!(
        "  copy phase on CLOCK_MONOTONIC {from:.3}..{to:.3} s (`perf record -k CLOCK_MONOTONIC` \
         times); restart at {}, copy phase {} .. {} (UTC, as in the node logs)",
        utc(restarted),
        utc(first_progress),
        utc(in_sync_at)
    );
    assert!(
        full_seen,
        "no status sample of plex 1 reported full: true for plex 2's resync"
    );
    // copiedBytes is a sampled count (checked exactly by the incremental test); here it only
    // has to show that data moved, totalBytes that the whole volume was covered.
    assert!(
        total >= GIB * 9 / 10 && copied >= GIB / 2,
        "a full resync of a filled 1 GiB volume must move ~1 GiB: totalBytes {total}, copiedBytes \
         {copied}"
    );
    assert!(
        failed.is_empty(),
        "foreground writes failed: {:?}",
        failed.first()
    );
    assert!(
        during.len() >= 10,
        "only {} foreground writes completed during the {copy_secs:.2} s resync",
        during.len()
    );

    let expected = expected_blocks(&[&log]);
    verify_blocks(&v.url(2), &expected);
    assert_plexes_identical(&mut v);
    // Speed is a measurement, not a pass/fail gate on a shared machine (the project's rule:
    // speed goes in benchmarks, ratios side by side): the ratio is printed above and asserted
    // only when asked for, on a quiet machine. Last, so a slow resync still has its data checked.
    if std::env::var_os("SVA_ASSERT_RATES").is_some() {
        assert!(
            ratio >= 0.6,
            "full resync at {} is {ratio:.2} x the median local sequential write rate {} (bar 0.6)",
            mib_s(rate),
            mib_s(dd_rate)
        );
    } else {
        eprintln!(
            "rate ratio {ratio:.2} (bar 0.6) not asserted: set SVA_ASSERT_RATES=1 on a quiet \
             machine to make it a gate"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Interrupted resync resumes

/// Fraction of the first attempt's work done before the kill.
const KILL_AT: f64 = 0.45;
/// Throttle so the first attempt lasts long enough to be interrupted (512 MiB → ~10 s).
const RESUME_RATE: u64 = 50 * MIB;

/// Must-show 3 (both variants): a full resync of a filled 512 MiB volume throttled to
/// [`RESUME_RATE`]; `victim` is kill -9'd once `doneBytes` ≥ [`KILL_AT`] of `totalBytes`, then
/// restarted with its config. The resync must finish; after the restart the work left
/// (`totalBytes - doneBytes` in plex 1's status) never exceeds 65% of the first attempt's
/// total (it resumed instead of starting over), the bytes copied over both attempts are below
/// 1.5 × the first attempt's total, and the backing files end identical.
fn interrupted_resync(victim: u16) {
    let size = 512 * MIB;
    let mut v = start_volume(size, MirrorTuning::default());
    fill(&v, 1, size, 0x6d);
    kill_and_wait_alone(&mut v, 2);
    v.wipe_plex(2).expect("wipe plex 2");
    set_resync_rate(&v, 1, RESUME_RATE);
    let st = v.status(1).expect("status");
    assert_eq!(
        st.raw["resyncRateLimitBytesPerSec"].as_u64(),
        Some(RESUME_RATE),
        "rate limit not reported: {}",
        st.raw
    );
    let metric_before = copied_metric(&v, 1, 2).unwrap_or(0);

    let w = Watcher::start(&v);
    v.restart(2).expect("restart the wiped plex 2");
    let first = w.wait(1, "first attempt half way", RESYNC_TIMEOUT, |s| {
        s.plex_state(2) == Some("InSync")
            || progress(s, 2)
                .is_some_and(|p| p.total > 0 && p.done as f64 >= KILL_AT * p.total as f64)
    });
    assert_ne!(
        first.st.plex_state(2),
        Some("InSync"),
        "the throttled resync finished before it could be interrupted: {}",
        first.st.raw
    );
    let p1 = progress(&first.st, 2).expect("progress");
    let copied1 = w
        .all()
        .iter()
        .filter(|s| s.node == 1)
        .filter_map(|s| progress(&s.st, 2))
        .map(|p| p.copied)
        .max()
        .unwrap_or(0);
    let metric_at_kill = (victim == 2).then(|| copied_metric(&v, 1, 2)).flatten();
    let which = if victim == 1 { "source" } else { "target" };
    eprintln!(
        "first attempt at kill of the {which} (plex {victim}): {p1:?}, copied so far {copied1}"
    );
    v.kill9(victim);
    let restarted = Instant::now();
    v.restart(victim).expect("restart the killed node");
    if victim == 1 {
        // The rate set through the API lives in the process; set it again on the new one.
        set_resync_rate(&v, 1, RESUME_RATE);
    }
    let done = w.wait(
        1,
        "plex 2 InSync after the interruption",
        RESYNC_TIMEOUT,
        |s| s.plex_state(2) == Some("InSync") && s.alua_state == "ActiveOptimized",
    );
    wait_serving(&v, &w, 2);
    let samples = w.finish();
    let after: Vec<Progress> = samples
        .iter()
        .filter(|s| s.node == 1 && s.at >= restarted && s.st.plex_state(2) != Some("InSync"))
        .filter_map(|s| progress(&s.st, 2))
        .filter(|p| p.total > 0)
        .collect();
    let max_left = after.iter().map(|p| p.total - p.done.min(p.total)).max();
    let mut distinct: Vec<&Progress> = Vec::new();
    for p in &after {
        if distinct.last() != Some(&p) {
            distinct.push(p);
        }
    }
    eprintln!(
        "progress reports after the restart (distinct, first 8): {:#?}",
        &distinct[..distinct.len().min(8)]
    );
    let copied_after = after.iter().map(|p| p.copied).max().unwrap_or(0);
    // copiedBytes restarts at 0 with each new resync (a re-joined learner, a restarted
    // source): sum the peaks of the runs between drops over plex 1's whole series.
    let series: Vec<u64> = samples
        .iter()
        .filter(|s| s.node == 1)
        .filter_map(|s| progress(&s.st, 2))
        .filter(|p| p.total > 0)
        .map(|p| p.copied)
        .collect();
    let (mut copied_status, mut peak, mut runs) = (0u64, 0u64, 1u32);
    for &c in &series {
        if c < peak {
            copied_status += peak;
            runs += 1;
        }
        peak = c;
    }
    copied_status += peak;
    let metric_total = (victim == 2)
        .then(|| copied_metric(&v, 1, 2).map(|m| m - metric_before.min(m)))
        .flatten();
    // The counter may miss re-copied bytes (it only adds what exceeds an earlier peak); take
    // the larger of the two.
    let copied_total = copied_status.max(metric_total.unwrap_or(0));
    let reset = runs > 1;
    eprintln!(
        "resume after killing the {which}: InSync {:?} after the restart; {} progress samples \
         after it, first {:?}, last {:?}; most work left after restart {max_left:?} of first \
         total {}; copied: attempt 1 {copied1}, peak after restart {copied_after}, {runs} \
         count runs (reset: {reset}) => {copied_status} by status, metric {metric_total:?} (at \
         kill {metric_at_kill:?})",
        done.at.duration_since(restarted),
        after.len(),
        after.first(),
        after.last(),
        p1.total
    );
    // Data of the fill reads back through plex 2 (start, middle, end).
    qemu_io_all(
        &v.url(2),
        &[
            "read -P 0x6d 0 1M".to_owned(),
            format!("read -P 0x6d {} 1M", size / 2),
            format!("read -P 0x6d {} 1M", size - MIB),
        ],
    );
    assert_plexes_identical(&mut v);
    // Last, so a resync that starts over still has its data checked.
    let left_bar = (p1.total as f64 * 0.65) as u64;
    match max_left {
        Some(left) => assert!(
            left <= left_bar,
            "the resync started over: {left} bytes left after the restart, the first attempt had \
             done {} of {} (bar: at most {left_bar} left)",
            p1.done,
            p1.total
        ),
        // Finished between two polls: the rest (≤ 55%) at the throttled rate takes seconds,
        // so this means it did not need to redo much either; the copy bound below decides.
        None => eprintln!("no progress sample after the restart (finished between polls)"),
    }
    assert!(
        (copied_total as f64) < 1.5 * p1.total as f64,
        "copied {copied_total} bytes over both attempts; one full copy is {} (bar < 1.5 x)",
        p1.total
    );
    assert!(
        copied_total >= p1.total / 2,
        "copied only {copied_total} bytes over both attempts, but {} bytes had to move",
        p1.total
    );
}

#[test]
fn resume_after_target_killed_half_way() {
    if !have_tools("resume_target", &["qemu-io", "qemu-img"]) {
        return;
    }
    let _serial = serial();
    interrupted_resync(2);
}

/// The source (plex 1, the only InSync plex) dies half way; restarted, it recovers alone
/// (RESYNC.md "Restart": it is the only InSync plex) from its persisted bitmap of plex 2
/// plus its activity log, and the resync resumes.
#[test]
fn resume_after_source_killed_half_way() {
    if !have_tools("resume_source", &["qemu-io", "qemu-img"]) {
        return;
    }
    let _serial = serial();
    interrupted_resync(1);
}

// ---------------------------------------------------------------------------------------------
// 4. Every node crashes

/// The load's zone: 32 MiB at 256 MiB (32 regions of 1 GiB).
const ZONE_START: u64 = 256 * MIB;
const ZONE_BYTES: u64 = 32 * MIB;
/// Bytes a resync may copy besides regions: the LU state image (`CopyWhat::LuState`).
const LU_STATE_ALLOWANCE: u64 = 64 * KIB;
/// Resync rate limit after the crash: the zone takes ≥ 4 s, so the polls see it.
const CRASH_RATE: u64 = 8 * MIB;

/// Must-show 4: two 4 KiB QD1 writers (one per path, interleaved blocks of one 32 MiB zone of a
/// 1 GiB volume); both nodes kill -9'd during the load, both restarted with their configs. Both
/// must come back InSync and ActiveOptimized; every acknowledged write reads back through both
/// paths; the backing files end identical; and no resync copied or planned more than the
/// zone's regions (activity-log bound, not a full resync).
#[test]
fn both_nodes_killed_during_writes() {
    if !have_tools("both_nodes_killed", &["qemu-io"]) {
        return;
    }
    let _serial = serial();
    let mut v = start_volume(GIB, MirrorTuning::default());
    let epoch_before = v.status(1).expect("status").epoch;
    let first = ZONE_START / BLOCK;
    let blocks = ZONE_BYTES / BLOCK;
    let stop = Arc::new(AtomicBool::new(false));
    // Stride 2 x 257 blocks (~2 MiB): consecutive writes land in different regions, so the
    // load touches every region of the zone at once; 257 is odd, so each writer's first
    // `blocks / 2` writes hit distinct blocks (plex 1 the even ones, plex 2 the odd ones).
    let stride = 2 * 257;
    let wa = spawn_writer(v.url(1), first, blocks, 0, stride, 0, stop.clone());
    let wb = spawn_writer(v.url(2), first, blocks, 1, stride, 125, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    v.kill9(1);
    v.kill9(2);
    eprintln!("killed both nodes within {:?}", killed.elapsed());
    stop.store(true, Ordering::Relaxed);
    let la = wa.join().expect("writer via plex 1");
    let lb = wb.join().expect("writer via plex 2");
    let acked = |l: &[WriteRec]| l.iter().filter(|r| r.ok).count();
    eprintln!(
        "load: {} acknowledged via plex 1, {} via plex 2 ({} / {} attempted)",
        acked(&la),
        acked(&lb),
        la.len(),
        lb.len()
    );
    assert!(
        acked(&la) > 20 && acked(&lb) > 20,
        "too few writes before the crash: {} via plex 1, {} via plex 2; first failure: {:?}",
        acked(&la),
        acked(&lb),
        la.iter().chain(&lb).find(|r| !r.ok)
    );
    let expected = expected_blocks(&[&la, &lb]);

    let w = Watcher::start(&v);
    let restarted = Instant::now();
    v.restart(1).expect("restart plex 1");
    v.restart(2).expect("restart plex 2");
    // Best effort: throttle whichever node becomes the source so the status polls see the
    // resync (recovery waits RECOVER_WAIT_MS first); not asserted, the bound holds anyway.
    for node in [1u16, 2] {
        let body = format!("{{\"bytesPerSec\": {CRASH_RATE}}}");
        let r = v.post(node, "/v1/resync-rate", &body, true);
        eprintln!("POST /v1/resync-rate {CRASH_RATE} to node {node}: {r:?}");
    }
    for node in [1u16, 2] {
        let s = w.wait(
            node,
            "both plexes InSync, own path ActiveOptimized",
            RESYNC_TIMEOUT,
            |s| {
                all_in_sync(s)
                    && s.plex_state(1).is_some()
                    && s.plex_state(2).is_some()
                    && s.alua_state == "ActiveOptimized"
            },
        );
        eprintln!(
            "node {node} back {:?} after the restarts: {}",
            s.at.duration_since(restarted),
            short(&s.st, 3 - node)
        );
    }
    for node in [1u16, 2] {
        v.wait_readable(node, STATE_TIMEOUT).expect("readable");
    }
    let samples = w.finish();
    let mut max_copied = 0;
    let mut max_total = 0;
    let mut full = false;
    for s in &samples {
        for plex in [1u16, 2] {
            if let Some(p) = progress(&s.st, plex) {
                max_copied = max_copied.max(p.copied);
                max_total = max_total.max(p.total);
                full |= p.full;
            }
        }
    }
    let metrics: Vec<Option<u64>> = [(1u16, 2u16), (2, 1)]
        .iter()
        .map(|&(n, p)| copied_metric(&v, n, p))
        .collect();
    let copied = max_copied.max(metrics.iter().flatten().copied().max().unwrap_or(0));
    // Every resync also copies the LU's non-data state image (reservations) once, a few
    // hundred bytes; allow it on top of the zone's regions.
    let bound = ZONE_BYTES.div_ceil(REGION) * REGION + LU_STATE_ALLOWANCE;
    let epochs: BTreeSet<u64> = samples.iter().map(|s| s.st.epoch).collect();
    eprintln!(
        "after the crash: copiedBytes max {max_copied} (status), metrics {metrics:?}, totalBytes \
         max {max_total}, full seen {full}, epochs seen {epochs:?}; bound {bound} (the zone's \
         regions); {} samples",
        samples.len()
    );
    if max_total == 0 && copied == 0 {
        eprintln!("note: no resync progress was observed (finished between polls, or none ran)");
    }
    assert!(
        !full,
        "a full resync ran after a crash of every node:\n{}",
        short(&samples[samples.len() - 1].st, 2)
    );
    assert!(
        copied <= bound && max_total <= ZONE_BYTES.div_ceil(REGION) * REGION,
        "resynced more than the written zone: copied {copied}, totalBytes {max_total}, zone \
         regions + LU state {bound} bytes"
    );
    let epoch_after = v.status(1).expect("status").epoch;
    assert!(
        epoch_after > epoch_before,
        "recovery must move to a new epoch: {epoch_before} -> {epoch_after}"
    );
    verify_blocks(&v.url(1), &expected);
    verify_blocks(&v.url(2), &expected);
    assert_plexes_identical(&mut v);
}

// ---------------------------------------------------------------------------------------------
// 5. Online verify

/// Starts a verify on `node` (202 expected) and waits until it has finished; returns
/// `status.verify`.
fn run_verify(v: &MirroredVolume, node: u16) -> serde_json::Value {
    let before = v.status(node).expect("status").raw["verify"].clone();
    let (code, body) = v
        .post(node, "/v1/verify", "{\"repair\": false}", true)
        .expect("POST /v1/verify");
    assert_eq!(code, 202, "POST /v1/verify to node {node}: {body}");
    let start = Instant::now();
    let mut seen_running = false;
    loop {
        let st = v.status(node).expect("status");
        let vs = st.raw["verify"].clone();
        if vs["running"].as_bool() == Some(true) {
            seen_running = true;
        }
        let finished = vs["running"].as_bool() == Some(false)
            && vs["regionsTotal"].as_u64().is_some_and(|t| t > 0)
            && vs["regionsDone"] == vs["regionsTotal"];
        if finished && (seen_running || vs != before) {
            eprintln!("verify on node {node} done in {:?}: {vs}", start.elapsed());
            return vs;
        }
        if start.elapsed() > RESYNC_TIMEOUT {
            panic!(
                "verify did not finish within {RESYNC_TIMEOUT:?} (seen running: {seen_running}; \
                 before the POST: {before}); last status: {}",
                st.raw
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Must-show 5: on a quiesced 2-plex 64 MiB volume with data, a verify started on the
/// sequencer reports no mismatch; after flipping 64 bytes inside one region of plex 2's
/// backing file (pwrite by the test), a second verify reports exactly that region. Also: a
/// POST without the token is refused (401), one to the non-sequencer is refused (409).
#[test]
fn verify_finds_a_corrupted_region() {
    if !have_tools("verify", &["qemu-img"]) {
        return;
    }
    let _serial = serial();
    let size = 64 * MIB;
    let v = start_volume(size, MirrorTuning::default());
    fill(&v, 1, size, 0x3c);
    std::thread::sleep(Duration::from_millis(500)); // quiesced

    let (code, body) = v
        .post(1, "/v1/verify", "{\"repair\": false}", false)
        .expect("POST without token");
    assert_eq!(code, 401, "POST /v1/verify without a token: {body}");
    let (code, body) = v
        .post(2, "/v1/verify", "{\"repair\": false}", true)
        .expect("POST to plex 2");
    assert_eq!(
        code, 409,
        "POST /v1/verify to the non-sequencer (plex 2): {body}"
    );

    let clean = run_verify(&v, 1);
    let region_bytes = clean["regionBytes"].as_u64().expect("verify.regionBytes");
    assert!(region_bytes.is_power_of_two(), "regionBytes {region_bytes}");
    assert_eq!(
        clean["regionsTotal"].as_u64(),
        Some(size.div_ceil(region_bytes)),
        "regionsTotal of a {size}-byte volume: {clean}"
    );
    assert_eq!(
        clean["mismatchedRegions"],
        serde_json::json!([]),
        "a clean mirror reported mismatches: {clean}"
    );

    // Flip 64 bytes in plex 2's backing file, 37 MiB + 12345 in.
    let offset = 37 * MIB + 12345;
    let region = offset / region_bytes;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(v.plex_path(2))
            .expect("open plex 2's backing file");
        let mut buf = [0u8; 64];
        f.read_exact_at(&mut buf, offset).expect("read");
        assert!(
            buf.iter().all(|&b| b == 0x3c),
            "unexpected content {buf:x?}"
        );
        for b in &mut buf {
            *b ^= 0xff;
        }
        f.write_all_at(&buf, offset).expect("write");
        f.sync_data().expect("fdatasync");
    }
    eprintln!("corrupted 64 bytes at {offset} of plex 2 (region {region})");

    let found = run_verify(&v, 1);
    assert_eq!(
        found["mismatchedRegions"],
        serde_json::json!([region]),
        "verify after corrupting region {region} of plex 2: {found}"
    );

    // Repair: plex 2 (it differs from the sequencer, plex 1) goes stale with that one region
    // marked, is resynced, and comes back; the files are identical again.
    let epoch_before = v.status(1).expect("status").epoch;
    let copied_before = copied_metric(&v, 1, 2).unwrap_or(0);
    let w = Watcher::start(&v);
    // (Its result document equals the last one, so the epoch is what shows it ran.)
    let (code, body) = v
        .post(1, "/v1/verify", "{\"repair\": true}", true)
        .expect("POST /v1/verify");
    assert_eq!(code, 202, "POST /v1/verify with repair: {body}");
    let back = w.wait(1, "plex 2 resynced and InSync again", RESYNC_TIMEOUT, |s| {
        s.epoch > epoch_before + 1 && s.plex_state(2) == Some("InSync")
    });
    eprintln!("after repair: {}", short(&back.st, 2));
    wait_serving(&v, &w, 2);
    drop(w.finish());
    let copied = copied_metric(&v, 1, 2).unwrap_or(0) - copied_before;
    eprintln!("the repair copied {copied} bytes (sva_resync_copied_bytes_total)");
    assert!(
        copied > 0,
        "the repair copied nothing, yet the files differed"
    );
    assert!(
        copied <= 2 * region_bytes,
        "the repair copied {copied} bytes; only region {region} ({region_bytes} bytes) differed"
    );
    let clean = run_verify(&v, 1);
    assert_eq!(
        clean["mismatchedRegions"],
        serde_json::json!([]),
        "verify after the repair: {clean}"
    );
    let mut v = v;
    assert_plexes_identical(&mut v);
}
