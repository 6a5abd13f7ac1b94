//! `sva-bench`: sva-node (write-back and write-through) against tgtd on this machine, same
//! backing file size on the same filesystem, measured with `qemu-img bench` (DESIGN.md §11).
//!
//! ```text
//! cargo run --release -p sva-tests --bin sva-bench -- --size 1G --targets sva-wb,sva-wt,tgt --runs 3
//! ```
//!
//! Every target is prefilled (so reads hit data, not holes), each case's op count is calibrated
//! per target to last about `--seconds`, then the runs interleave targets case by case so
//! machine noise hits all of them alike. Prints the median IOPS and MB/s per target and case,
//! and the ratio of each sva target to tgt.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use sva_tests::tools::{parse_bench_seconds, qemu_img_bench, BenchCase, BENCH_CASES};
use sva_tests::{have_tools, CacheMode, IscsiTarget, SvaNode, SvaNodeOptions, Tgtd, TgtdOptions};

#[derive(Parser, Debug)]
#[command(about = "Benchmark sva-node against tgtd with qemu-img bench")]
struct Args {
    /// Volume size for every target, e.g. 1G, 512M.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Comma-separated targets: sva-wb, sva-wt, tgt (write-back, tgt's default), tgt-wt, and
    /// base-wb, base-wt: sva-node from `$SVA_BENCH_BASE_BIN` (an older build, to compare a
    /// change side by side in one run).
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
    /// Only cases whose name contains this (e.g. "qd32").
    #[arg(long)]
    cases: Option<String>,
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
    match name {
        "sva-wb" => sva(CacheMode::WriteBack),
        "sva-wt" => sva(CacheMode::WriteThrough),
        "tgt" => tgt(CacheMode::WriteBack),
        "tgt-wt" => tgt(CacheMode::WriteThrough),
        other => bail!("unknown target {other} (sva-wb, sva-wt, tgt, tgt-wt)"),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !have_tools("sva-bench", &["qemu-img"]) {
        bail!("qemu-img (qemu-utils + qemu-block-extra) is required");
    }
    let cases: Vec<BenchCase> = BENCH_CASES
        .iter()
        .filter(|c| args.cases.as_deref().is_none_or(|f| c.name.contains(f)))
        .copied()
        .collect();
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

    // Interleaved runs: run r of every case on every target before run r+1.
    let mut iops = vec![vec![Vec::new(); targets.len()]; cases.len()];
    for run in 0..args.runs {
        for (ci, case) in cases.iter().enumerate() {
            for (ti, (name, t)) in targets.iter().enumerate() {
                let m = measure(t.as_ref(), case, counts[ci][ti])?;
                eprintln!(
                    "run {} {:<14} {:<7} {:>10.0} IOPS",
                    run + 1,
                    case.name,
                    name,
                    m.iops
                );
                iops[ci][ti].push(m.iops);
            }
        }
    }

    print_table(&args, &cases, &targets, &mut iops);
    Ok(())
}

fn print_table(
    args: &Args,
    cases: &[BenchCase],
    targets: &[(String, Box<dyn IscsiTarget>)],
    iops: &mut [Vec<Vec<f64>>],
) {
    let tgt_index = targets.iter().position(|(n, _)| n == "tgt");
    println!(
        "\nqemu-img bench, volume {} MiB, median of {} runs (IOPS / MB/s)",
        args.size >> 20,
        args.runs
    );
    let mut header = format!("{:<14}", "case");
    for (name, _) in targets {
        header.push_str(&format!(" | {:>20}", name));
    }
    if tgt_index.is_some() {
        for (name, _) in targets.iter().filter(|(n, _)| is_sva(n)) {
            header.push_str(&format!(" | {:>10}", format!("{name}/tgt")));
        }
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for (ci, case) in cases.iter().enumerate() {
        let medians: Vec<f64> = iops[ci].iter_mut().map(|v| median(v)).collect();
        let mut row = format!("{:<14}", case.name);
        for m in &medians {
            let mbps = m * case.block_bytes as f64 / 1e6;
            row.push_str(&format!(" | {:>9.0} {:>8.1}MB", m, mbps));
        }
        if let Some(ti) = tgt_index {
            for (i, (name, _)) in targets.iter().enumerate() {
                if is_sva(name) {
                    row.push_str(&format!(" | {:>10.2}", medians[i] / medians[ti]));
                }
            }
        }
        println!("{row}");
    }
}

fn is_sva(name: &str) -> bool {
    name.starts_with("sva") || name.starts_with("base")
}
