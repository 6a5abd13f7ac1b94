//! `sva-bench`: sva-node (write-back and write-through, single node or a 2-plex mirrored
//! volume) against tgtd on this machine, same backing file size on the same filesystem,
//! measured with `qemu-img bench` (DESIGN.md §11).
//!
//! ```text
//! cargo run --release -p sva-tests --bin sva-bench -- --size 1G --targets sva-wb,sva-wt,tgt --runs 3
//! cargo run --release -p sva-tests --bin sva-bench -- --size 1G --runs 3 \
//!     --targets sva-wb,sva-wt,tgt,mirror-wb,mirror-wt,mirror-wb-p2
//! ```
//!
//! Every target is prefilled (so reads hit data, not holes), each case's op count is calibrated
//! per target to last about `--seconds`, then the runs interleave targets case by case so
//! machine noise hits all of them alike. Prints the median IOPS and MB/s per target and case,
//! the ratio of each sva target to tgt and of each mirrored target to the single node of its
//! cache mode, and the QD1 write latency a mirror adds beside a loopback round trip plus the
//! peer's local write (what a synchronous mirror must add at least, DESIGN.md §11).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use sva_tests::tools::{parse_bench_seconds, qemu_img_bench, BenchCase, BENCH_CASES};
use sva_tests::{
    have_tools, CacheMode, IscsiTarget, MirrorTuning, MirroredVolume, MirroredVolumeOptions,
    SvaNode, SvaNodeOptions, Tgtd, TgtdOptions,
};

#[derive(Parser, Debug)]
#[command(about = "Benchmark sva-node against tgtd with qemu-img bench")]
struct Args {
    /// Volume size for every target, e.g. 1G, 512M.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Comma-separated targets: sva-wb, sva-wt, tgt (write-back, tgt's default), tgt-wt;
    /// base-wb, base-wt: sva-node from `$SVA_BENCH_BASE_BIN` (an older build, to compare a
    /// change side by side in one run); mirror-wb, mirror-wt: a 2-plex mirrored volume
    /// through path 1 (the sequencer), mirror-wb-p2, mirror-wt-p2: its own such volume
    /// through path 2 (writes forwarded to the sequencer); any of these with `-ackpoll`: the
    /// same with `mirror.opSpinMicros: 0` (the peer sleeps between ops; only a lone write's
    /// origin polls, for its acks), or with `-nopoll`: both 0 (nothing polls); `mirror3-*`:
    /// the same on a 3-plex volume (`mirror3-wb-p3`: through plex 3).
    #[arg(long, default_value = "sva-wb,sva-wt,tgt", value_delimiter = ',')]
    targets: Vec<String>,
    /// Runs per case and target; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Target duration of one measurement, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Directory for backing files (all targets on the same filesystem). Default: $TMPDIR.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Comma-separated filters: only cases whose name contains one of them (e.g. "qd32" or
    /// "qd1,qd32"; the case names are 4k-qd1-read, 4k-qd1-write, 4k-qd32-read,
    /// 4k-qd32-write, 1m-qd8-read, 1m-qd8-write). Default: every case.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("bad size {s}: {e}"))
}

/// Upper bound on a single measurement, however slow the target.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(300);

/// Ops in the calibration probe of a case.
fn probe_count(case: &BenchCase) -> u64 {
    if case.block_bytes >= 1 << 20 {
        32
    } else {
        512
    }
}

struct Measured {
    iops: f64,
}

fn measure(t: &dyn IscsiTarget, case: &BenchCase, count: u64) -> Result<Measured> {
    let out = qemu_img_bench(&t.url(), case, count, MEASURE_TIMEOUT)?;
    if !out.success() {
        bail!(
            "qemu-img bench on {} failed:\n{}",
            t.describe(),
            out.describe()
        );
    }
    let secs = parse_bench_seconds(&out.stdout)
        .with_context(|| format!("no 'Run completed' in:\n{}", out.describe()))?;
    Ok(Measured {
        iops: count as f64 / secs.max(1e-6),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Environment variable naming the sva-node binary of the `base-*` targets.
const BASE_BIN_ENV: &str = "SVA_BENCH_BASE_BIN";

/// Plexes of a `mirror-*` target's volume; `mirror3-*` targets have 3.
const MIRROR_PLEXES: u16 = 2;

/// How many plexes target `name`'s mirrored volume has.
fn plexes_of(name: &str) -> u16 {
    if name.starts_with("mirror3-") {
        3
    } else {
        MIRROR_PLEXES
    }
}

/// One path of a mirrored volume as a benchmark target; the volume (witness and every node)
/// lives as long as the target.
struct MirrorPath {
    volume: MirroredVolume,
    /// Plex whose node's portal the initiator uses.
    plex: u16,
    mode: CacheMode,
}

impl IscsiTarget for MirrorPath {
    fn portal(&self) -> SocketAddr {
        self.volume.target(self.plex).portal()
    }
    fn iqn(&self) -> &str {
        self.volume.target(self.plex).iqn()
    }
    fn lun(&self) -> u32 {
        self.volume.target(self.plex).lun()
    }
    fn describe(&self) -> String {
        format!(
            "{}-plex mirrored sva-node ({}) through plex {}",
            self.volume.plexes(),
            self.mode.as_config(),
            self.plex
        )
    }
    fn log_tail(&self, lines: usize) -> String {
        self.volume.logs(lines)
    }
}

/// `mirror-MODE[-pN]` or `mirror3-MODE[-pN]` (MODE `wb` | `wt`, N a plex id, default 1):
/// cache mode and the plex whose path is benchmarked.
fn parse_mirror(name: &str) -> Option<(CacheMode, u16)> {
    let rest = name
        .strip_prefix("mirror-")
        .or_else(|| name.strip_prefix("mirror3-"))?;
    let rest = rest.strip_suffix(polling_suffix(name)).unwrap_or(rest);
    let (mode, plex) = match rest.split_once("-p") {
        Some((mode, plex)) => (mode, plex.parse::<u16>().ok()?),
        None => (rest, 1),
    };
    let mode = match mode {
        "wb" => CacheMode::WriteBack,
        "wt" => CacheMode::WriteThrough,
        _ => return None,
    };
    (1..=plexes_of(name))
        .contains(&plex)
        .then_some((mode, plex))
}

/// A mirror target name's polling suffix: "", "-ackpoll" or "-nopoll".
fn polling_suffix(name: &str) -> &'static str {
    ["-ackpoll", "-nopoll"]
        .into_iter()
        .find(|s| name.ends_with(s))
        .unwrap_or("")
}

/// The single-node target a mirrored one is compared with: `sva-wb` for `mirror-wb-p2`.
fn single_for(name: &str) -> Option<&'static str> {
    match parse_mirror(name)?.0 {
        CacheMode::WriteBack => Some("sva-wb"),
        CacheMode::WriteThrough => Some("sva-wt"),
    }
}

/// The one place that starts a benchmark target by name.
fn start_target(name: &str, args: &Args) -> Result<Box<dyn IscsiTarget>> {
    if let Some(mode) = name.strip_prefix("base-") {
        // SvaNode takes its binary from $SVA_NODE_BIN when it starts; point that at the base
        // build for this one start (main is single-threaded here).
        let base = std::env::var_os(BASE_BIN_ENV)
            .with_context(|| format!("{name} needs {BASE_BIN_ENV}"))?;
        let saved = std::env::var_os(sva_tests::sva_node::SVA_NODE_BIN_ENV);
        std::env::set_var(sva_tests::sva_node::SVA_NODE_BIN_ENV, base);
        let r = start_target(&format!("sva-{mode}"), args);
        match saved {
            Some(v) => std::env::set_var(sva_tests::sva_node::SVA_NODE_BIN_ENV, v),
            None => std::env::remove_var(sva_tests::sva_node::SVA_NODE_BIN_ENV),
        }
        return r;
    }
    let sva = |mode| -> Result<Box<dyn IscsiTarget>> {
        Ok(Box::new(SvaNode::start(SvaNodeOptions {
            size_bytes: args.size,
            cache_mode: mode,
            base_dir: args.dir.clone(),
            ..SvaNodeOptions::default()
        })?))
    };
    let tgt = |mode| -> Result<Box<dyn IscsiTarget>> {
        Ok(Box::new(Tgtd::start(TgtdOptions {
            size_bytes: args.size,
            cache_mode: mode,
            base_dir: args.dir.clone(),
            ..TgtdOptions::default()
        })?))
    };
    let mirror = |mode, plex| -> Result<Box<dyn IscsiTarget>> {
        // start() returns once every path is ActiveOptimized and readable.
        let volume = MirroredVolume::start(MirroredVolumeOptions {
            plexes: plexes_of(name),
            cache_mode: mode,
            size_bytes: args.size,
            base_dir: args.dir.clone(),
            tuning: MirrorTuning {
                ack_spin_micros: (polling_suffix(name) == "-nopoll").then_some(0),
                op_spin_micros: (!polling_suffix(name).is_empty()).then_some(0),
                ..MirrorTuning::default()
            },
            ..MirroredVolumeOptions::default()
        })?;
        Ok(Box::new(MirrorPath { volume, plex, mode }))
    };
    match name {
        "sva-wb" => sva(CacheMode::WriteBack),
        "sva-wt" => sva(CacheMode::WriteThrough),
        "tgt" => tgt(CacheMode::WriteBack),
        "tgt-wt" => tgt(CacheMode::WriteThrough),
        other => match parse_mirror(other) {
            Some((mode, plex)) => mirror(mode, plex),
            None => bail!(
                "unknown target {other} (sva-wb, sva-wt, tgt, tgt-wt, base-wb, base-wt, \
                 mirror-wb, mirror-wt, mirror-wb-p2, mirror-wt-p2, mirror3-* alike, each with -ackpoll or \
                 -nopoll)"
            ),
        },
    }
}

/// Untimed ping-pongs before the timed ones (connection and scheduler warm-up).
const RTT_WARMUP: u32 = 100;
/// Ping-pongs timed per loopback round-trip measurement.
const RTT_PINGS: u32 = 1000;
/// Bound on one ping-pong, so a wedged echo thread fails the run instead of hanging it.
const RTT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pin the calling thread to `cpu`; false if the machine refuses (fewer CPUs, a cgroup).
fn pin_to_cpu(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays inside it for
    // cpu < CPU_SETSIZE (checked), and sched_setaffinity only reads it.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return false;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Mean round trip of a 1-byte ping-pong over TCP on 127.0.0.1 (Nagle off both ways) between
/// two threads of this process: the network part of what a synchronous mirror adds to a
/// write (the request to the peer, its ack back). `cpus`: pin the client and the echo
/// thread to these CPUs. Left free, the scheduler soon puts both on one CPU and a wake-up
/// costs little; two sva-node processes busy beside an initiator run on different CPUs, and
/// on a VM a wake-up across CPUs (an inter-processor interrupt) costs several times more.
/// `None` if pinning was refused.
fn loopback_rtt(cpus: Option<(usize, usize)>) -> Result<Option<Duration>> {
    let cpus_here = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus.is_some_and(|(c, e)| c.max(e) >= cpus_here) {
        return Ok(None);
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let echo_cpu = cpus.map(|(_, e)| e);
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(cpu) = echo_cpu {
            pin_to_cpu(cpu);
        }
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(RTT_TIMEOUT))?;
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b)? {
                0 => return Ok(()),
                _ => s.write_all(&b)?,
            }
        }
    });
    // The client runs on a thread of its own so that pinning it leaves the caller free.
    let client = std::thread::spawn(move || -> std::io::Result<Option<Duration>> {
        if let Some((cpu, _)) = cpus {
            if !pin_to_cpu(cpu) {
                let _ = TcpStream::connect(addr); // let the echo thread's accept return
                return Ok(None);
            }
        }
        let mut c = TcpStream::connect(addr)?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(RTT_TIMEOUT))?;
        let mut b = [0u8; 1];
        let mut ping = |c: &mut TcpStream| -> std::io::Result<()> {
            c.write_all(&[1])?;
            c.read_exact(&mut b)
        };
        for _ in 0..RTT_WARMUP {
            ping(&mut c)?;
        }
        let start = Instant::now();
        for _ in 0..RTT_PINGS {
            ping(&mut c)?;
        }
        Ok(Some(start.elapsed() / RTT_PINGS))
    });
    let rtt = client
        .join()
        .map_err(|_| anyhow!("loopback client thread panicked"))??;
    echo.join()
        .map_err(|_| anyhow!("loopback echo thread panicked"))??;
    Ok(rtt)
}

/// 4 KiB page-cache writes timed per write-back local-write measurement.
const LOCAL_WRITES_WB: u32 = 2000;
/// 4 KiB write + fdatasync pairs timed per write-through measurement (each is a disk flush).
const LOCAL_WRITES_WT: u32 = 200;
/// Scratch file the local writes cycle over; written in full first, so they overwrite
/// allocated blocks as the prefilled peer store does.
const LOCAL_WRITE_FILE: u64 = 16 << 20;

/// Mean time of one 4 KiB pwrite (write-back) or pwrite + fdatasync (write-through) on a
/// file in `dir`: what the peer's store does for one replicated write of that cache mode,
/// without the iSCSI and network around it.
fn local_write(dir: Option<&Path>, mode: CacheMode) -> Result<Duration> {
    let f = match dir {
        Some(d) => tempfile::tempfile_in(d)?,
        None => tempfile::tempfile()?,
    };
    f.write_all_at(&vec![0xa5; LOCAL_WRITE_FILE as usize], 0)?;
    f.sync_all()?;
    let buf = [0x5au8; 4096];
    let n = match mode {
        CacheMode::WriteBack => LOCAL_WRITES_WB,
        CacheMode::WriteThrough => LOCAL_WRITES_WT,
    };
    let start = Instant::now();
    for i in 0..n {
        f.write_all_at(&buf, (u64::from(i) * 4096) % LOCAL_WRITE_FILE)?;
        if mode == CacheMode::WriteThrough {
            f.sync_data()?;
        }
    }
    Ok(start.elapsed() / n)
}

/// Reference latencies measured in-process once per run, in µs.
#[derive(Default)]
struct Reference {
    rtt: Vec<f64>,
    /// Ends pinned to CPUs 0 and 1 (empty on a one-CPU machine).
    rtt_cross: Vec<f64>,
    local_wb: Vec<f64>,
    local_wt: Vec<f64>,
}

impl Reference {
    /// Measures the loopback RTT and the local write of every cache mode some mirrored
    /// target uses.
    fn measure(&mut self, args: &Args) -> Result<()> {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        if let Some(rtt) = loopback_rtt(None)? {
            self.rtt.push(us(rtt));
        }
        if let Some(rtt) = loopback_rtt(Some((0, 1)))? {
            self.rtt_cross.push(us(rtt));
        }
        let modes: Vec<CacheMode> = args
            .targets
            .iter()
            .filter_map(|t| parse_mirror(t).map(|(m, _)| m))
            .collect();
        let dir = args.dir.as_deref();
        if modes.contains(&CacheMode::WriteBack) {
            self.local_wb
                .push(us(local_write(dir, CacheMode::WriteBack)?));
        }
        if modes.contains(&CacheMode::WriteThrough) {
            self.local_wt
                .push(us(local_write(dir, CacheMode::WriteThrough)?));
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !have_tools("sva-bench", &["qemu-img"]) {
        bail!("qemu-img (qemu-utils + qemu-block-extra) is required");
    }
    let cases: Vec<BenchCase> = BENCH_CASES
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|f| c.name.contains(f)))
        .copied()
        .collect();
    if cases.is_empty() {
        bail!("no case matches --cases {}", args.cases.join(","));
    }
    let mut targets = Vec::new();
    for name in &args.targets {
        let t = start_target(name, &args).with_context(|| format!("start {name}"))?;
        eprintln!("started {name}: {}", t.url());
        targets.push((name.clone(), t));
    }

    // Prefill: 1 MiB QD8 writes over the whole volume, so reads hit allocated data.
    let fill = BenchCase {
        name: "prefill",
        block_bytes: 1 << 20,
        depth: 8,
        write: true,
    };
    for (name, t) in &targets {
        let m = measure(t.as_ref(), &fill, (args.size >> 20).max(1))?;
        eprintln!("prefilled {name}: {:.0} MB/s", m.iops * 1.048576);
    }

    // Calibrate the op count of each (case, target) to about `seconds`.
    let mut counts = vec![vec![0u64; targets.len()]; cases.len()];
    for (ci, case) in cases.iter().enumerate() {
        for (ti, (_, t)) in targets.iter().enumerate() {
            let probe = measure(t.as_ref(), case, probe_count(case))?;
            counts[ci][ti] = ((probe.iops * args.seconds) as u64).max(probe_count(case));
        }
    }

    // Interleaved runs: run r of every case on every target before run r+1; the in-process
    // reference latencies are taken once per run too, under the same load.
    let mut reference = Reference::default();
    let mut iops = vec![vec![Vec::new(); targets.len()]; cases.len()];
    for run in 0..args.runs {
        for (ci, case) in cases.iter().enumerate() {
            for (ti, (name, t)) in targets.iter().enumerate() {
                let m = measure(t.as_ref(), case, counts[ci][ti])?;
                eprintln!(
                    "run {} {:<14} {:<14} {:>10.0} IOPS",
                    run + 1,
                    case.name,
                    name,
                    m.iops
                );
                iops[ci][ti].push(m.iops);
            }
        }
        reference.measure(&args)?;
    }

    let medians: Vec<Vec<f64>> = iops
        .iter_mut()
        .map(|per_target| per_target.iter_mut().map(|v| median(v)).collect())
        .collect();
    print_table(&args, &cases, &targets, &medians);
    print_latency(&cases, &targets, &medians, &mut reference);
    Ok(())
}

/// Width of a ratio column: its header, at least 10.
fn ratio_width(header: &str) -> usize {
    header.len().max(10)
}

fn print_table(
    args: &Args,
    cases: &[BenchCase],
    targets: &[(String, Box<dyn IscsiTarget>)],
    medians: &[Vec<f64>],
) {
    let index = |name: &str| targets.iter().position(|(n, _)| n == name);
    // (column header, numerator target, denominator target): every sva target against tgt,
    // then every mirrored target against the single node of its cache mode.
    let mut ratios: Vec<(String, usize, usize)> = Vec::new();
    if let Some(tgt) = index("tgt") {
        for (i, (name, _)) in targets.iter().enumerate() {
            if is_sva(name) {
                ratios.push((format!("{name}/tgt"), i, tgt));
            }
        }
    }
    for (i, (name, _)) in targets.iter().enumerate() {
        if let Some((single, j)) = single_for(name).and_then(|s| Some((s, index(s)?))) {
            ratios.push((format!("{name}/{single}"), i, j));
        }
    }
    println!(
        "\nqemu-img bench, volume {} MiB, median of {} runs (IOPS / MB/s)",
        args.size >> 20,
        args.runs
    );
    let mut header = format!("{:<14}", "case");
    for (name, _) in targets {
        header.push_str(&format!(" | {:>20}", name));
    }
    for (h, _, _) in &ratios {
        header.push_str(&format!(" | {:>w$}", h, w = ratio_width(h)));
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for (ci, case) in cases.iter().enumerate() {
        let m = &medians[ci];
        let mut row = format!("{:<14}", case.name);
        for v in m {
            let mbps = v * case.block_bytes as f64 / 1e6;
            row.push_str(&format!(" | {:>9.0} {:>8.1}MB", v, mbps));
        }
        for (h, i, j) in &ratios {
            row.push_str(&format!(" | {:>w$.2}", m[*i] / m[*j], w = ratio_width(h)));
        }
        println!("{row}");
    }
}

/// The case whose mean latency the latency table shows: 4 KiB writes at QD1.
fn is_qd1_write(c: &BenchCase) -> bool {
    c.depth == 1 && c.block_bytes == 4096 && c.write
}

/// QD1 4 KiB write mean latency (1e6 / median IOPS, µs) per target; for each mirrored target
/// the growth over the single node of its cache mode, beside the budget "one loopback round
/// trip plus the peer's write" (the peer's write measured locally in-process), taken with
/// the round trip measured two ways: both ends free (the scheduler puts them on one CPU) and
/// both ends pinned to different CPUs (as the two node processes run; see [`loopback_rtt`]).
fn print_latency(
    cases: &[BenchCase],
    targets: &[(String, Box<dyn IscsiTarget>)],
    medians: &[Vec<f64>],
    reference: &mut Reference,
) {
    let Some(ci) = cases.iter().position(is_qd1_write) else {
        return;
    };
    let lat: Vec<f64> = medians[ci].iter().map(|iops| 1e6 / iops).collect();
    let rtt = median(&mut reference.rtt);
    let rtt_cross = median(&mut reference.rtt_cross);
    let local_wb = median(&mut reference.local_wb);
    let local_wt = median(&mut reference.local_wt);
    // Only the modes some mirrored target uses were measured (the others are NaN).
    let mut local = String::new();
    for (mode, v) in [("wb", local_wb), ("wt", local_wt)] {
        if !v.is_nan() {
            local.push_str(&format!("; local 4 KiB write ({mode}) {v:.1} µs"));
        }
    }
    println!(
        "\nQD1 4 KiB write mean latency, µs (1e6 / median IOPS); loopback RTT {rtt:.1} µs, \
         across CPUs {rtt_cross:.1} µs{local}"
    );
    if let Some(ns) = guest_halt_poll_ns() {
        println!(
            "guest halt polling: {ns} ns (0: off; every wake-up of an idle vCPU exits to the \
             host, see the README's mirrored-write notes)"
        );
    }
    let header = format!(
        "{:<14} | {:>9} | {:>16} | {:>9} | {:>20} | {:>24}",
        "target", "latency", "single", "growth", "RTT+local write", "xCPU RTT+local write"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let verdict = |growth: f64, budget: f64| {
        if budget.is_nan() {
            return "n/a".to_string();
        }
        format!(
            "{budget:.1} {}",
            if growth <= budget { "ok" } else { "over" }
        )
    };
    for (ti, (name, _)) in targets.iter().enumerate() {
        let mut row = format!("{:<14} | {:>9.1}", name, lat[ti]);
        let single =
            single_for(name).and_then(|s| Some((s, targets.iter().position(|(n, _)| n == s)?)));
        if let (Some((single, si)), Some((mode, _))) = (single, parse_mirror(name)) {
            let growth = lat[ti] - lat[si];
            let local = match mode {
                CacheMode::WriteBack => local_wb,
                CacheMode::WriteThrough => local_wt,
            };
            row.push_str(&format!(
                " | {:>16} | {:>+9.1} | {:>20} | {:>24}",
                format!("{single} {:.1}", lat[si]),
                growth,
                verdict(growth, rtt + local),
                verdict(growth, rtt_cross + local),
            ));
        }
        println!("{row}");
    }
}

/// The VM guest's halt-polling window (`haltpoll` cpuidle driver), if this kernel has one: it
/// sets what a wake-up costs, and so every QD1 latency this tool prints.
fn guest_halt_poll_ns() -> Option<u64> {
    std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_sva(name: &str) -> bool {
    name.starts_with("sva") || name.starts_with("base") || name.starts_with("mirror")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mirror_target_names() {
        assert_eq!(parse_mirror("mirror-wb"), Some((CacheMode::WriteBack, 1)));
        assert_eq!(
            parse_mirror("mirror-wt-p2"),
            Some((CacheMode::WriteThrough, 2))
        );
        assert_eq!(
            parse_mirror("mirror-wb-p2-nopoll"),
            Some((CacheMode::WriteBack, 2))
        );
        assert_eq!(
            parse_mirror("mirror-wt-ackpoll"),
            Some((CacheMode::WriteThrough, 1))
        );
        assert_eq!(polling_suffix("mirror-wt-ackpoll"), "-ackpoll");
        assert_eq!(polling_suffix("mirror-wb"), "");
        assert_eq!(parse_mirror("mirror-wb-p3"), None);
        assert_eq!(
            parse_mirror("mirror3-wb-p3"),
            Some((CacheMode::WriteBack, 3))
        );
        assert_eq!(plexes_of("mirror3-wt"), 3);
        assert_eq!(parse_mirror("mirror3-wb-p4"), None);
        assert_eq!(parse_mirror("mirror-wb-p0"), None);
        assert_eq!(parse_mirror("mirror-xx"), None);
        assert_eq!(parse_mirror("sva-wb"), None);
        assert_eq!(single_for("mirror-wb-p2"), Some("sva-wb"));
        assert_eq!(single_for("mirror-wt"), Some("sva-wt"));
        assert_eq!(single_for("tgt"), None);
        assert!(is_sva("mirror-wb") && !is_sva("tgt-wt"));
    }

    #[test]
    fn measures_loopback_round_trip() {
        let rtt = loopback_rtt(None)
            .unwrap()
            .expect("unpinned always measures");
        assert!(
            rtt > Duration::ZERO && rtt < Duration::from_millis(100),
            "{rtt:?}"
        );
        // Pinned to CPUs 0 and 1 where the machine has them (`None`: pinning refused).
        if let Some(rtt) = loopback_rtt(Some((0, 1))).unwrap() {
            assert!(
                rtt > Duration::ZERO && rtt < Duration::from_millis(100),
                "{rtt:?}"
            );
        }
    }

    #[test]
    fn times_local_writes() {
        for mode in [CacheMode::WriteBack, CacheMode::WriteThrough] {
            let t = local_write(None, mode).unwrap();
            assert!(
                t > Duration::ZERO && t < Duration::from_secs(1),
                "{mode:?} {t:?}"
            );
        }
    }
}
