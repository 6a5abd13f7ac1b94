//! Wrappers for the real initiators (libiscsi-bin, qemu-utils + qemu-block-extra): each runs
//! the tool with a timeout and returns its captured output.
//!
//! Callers check [`crate::have_tools`] first so a machine without a tool skips with a message.

use std::time::Duration;

use anyhow::Result;

use crate::cunit::CunitSummary;
use crate::process::{run_tool, ToolOutput};

/// Timeout for a short qemu-io session (a few MiB of I/O).
pub const QEMU_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Timeout for `iscsi-inq` / `iscsi-ls`.
pub const INQUIRY_TIMEOUT: Duration = Duration::from_secs(20);

/// Timeout for the whole `iscsi-test-cu -t ALL` suite. tgt needs ~20 s on this machine; a
/// target that stalls in some tests (each libiscsi wait is bounded) still finishes well within.
pub const CONFORMANCE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// `qemu-io -f raw -c CMD.. URL`. qemu-io exits non-zero when a command fails, including a
/// `read -P` pattern mismatch ("Pattern verification failed").
pub fn qemu_io(url: &str, commands: &[&str]) -> Result<ToolOutput> {
    let mut args = vec!["-f".to_owned(), "raw".to_owned()];
    for c in commands {
        args.push("-c".into());
        args.push((*c).to_owned());
    }
    args.push(url.to_owned());
    run_tool("qemu-io", &args, QEMU_IO_TIMEOUT)
}

/// One `qemu-img bench` case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchCase {
    pub name: &'static str,
    pub block_bytes: u64,
    pub depth: u32,
    pub write: bool,
}

/// The six cases of DESIGN.md §11.
pub const BENCH_CASES: [BenchCase; 6] = [
    BenchCase {
        name: "4k-qd1-read",
        block_bytes: 4096,
        depth: 1,
        write: false,
    },
    BenchCase {
        name: "4k-qd1-write",
        block_bytes: 4096,
        depth: 1,
        write: true,
    },
    BenchCase {
        name: "4k-qd32-read",
        block_bytes: 4096,
        depth: 32,
        write: false,
    },
    BenchCase {
        name: "4k-qd32-write",
        block_bytes: 4096,
        depth: 32,
        write: true,
    },
    BenchCase {
        name: "1m-qd8-read",
        block_bytes: 1 << 20,
        depth: 8,
        write: false,
    },
    BenchCase {
        name: "1m-qd8-write",
        block_bytes: 1 << 20,
        depth: 8,
        write: true,
    },
];

/// `qemu-img bench -f raw -t none -c COUNT -d DEPTH -s SIZE [-w] URL`.
///
/// `-t none` bypasses qemu's own cache (O_DIRECT semantics for file, no-op for iscsi);
/// offsets advance by the block size and wrap at the end of the image.
pub fn qemu_img_bench(
    url: &str,
    case: &BenchCase,
    count: u64,
    timeout: Duration,
) -> Result<ToolOutput> {
    let mut args = vec![
        "bench".to_owned(),
        "-f".into(),
        "raw".into(),
        "-t".into(),
        "none".into(),
        "-c".into(),
        count.to_string(),
        "-d".into(),
        case.depth.to_string(),
        "-s".into(),
        case.block_bytes.to_string(),
    ];
    if case.write {
        args.push("-w".into());
    }
    args.push(url.to_owned());
    run_tool("qemu-img", &args, timeout)
}

/// Parses "Run completed in 2.684 seconds." from `qemu-img bench` output.
pub fn parse_bench_seconds(stdout: &str) -> Option<f64> {
    let rest = stdout.split("Run completed in ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `iscsi-inq [ARGS..] URL` (e.g. `["-e", "1", "-c", "0x80"]` for the serial number VPD page).
pub fn iscsi_inq(url: &str, args: &[&str]) -> Result<ToolOutput> {
    let mut all: Vec<&str> = args.to_vec();
    all.push(url);
    run_tool("iscsi-inq", &all, INQUIRY_TIMEOUT)
}

/// `iscsi-ls -s iscsi://HOST:PORT` (SendTargets discovery, then LUN listing with sizes).
pub fn iscsi_ls(portal_url: &str) -> Result<ToolOutput> {
    run_tool("iscsi-ls", &["-s", portal_url], INQUIRY_TIMEOUT)
}

/// `iscsi-test-cu --dataloss -t FILTER URL [URL2]`, parsed.
pub fn iscsi_test_cu(urls: &[&str], filter: &str) -> Result<(ToolOutput, CunitSummary)> {
    let mut args = vec!["--dataloss", "-t", filter];
    args.extend_from_slice(urls);
    let out = run_tool("iscsi-test-cu", &args, CONFORMANCE_TIMEOUT)?;
    let summary = CunitSummary::parse(&out.stdout);
    Ok((out, summary))
}
