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

/// qemu-io's prompt; it precedes every command's output in interactive mode.
const QEMU_IO_PROMPT: &str = "qemu-io> ";

/// One long-lived interactive `qemu-io -f raw URL` (one iSCSI session): commands go to its
/// stdin one at a time, and each command's output is everything up to the next prompt. Much
/// cheaper per command than a process per command, so write loops can time each write.
pub struct QemuIoSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::sync::mpsc::Receiver<Vec<u8>>,
    pending: String,
}

/// The result of one command in a [`QemuIoSession`].
#[derive(Debug, Clone)]
pub struct QemuIoReply {
    pub output: String,
    pub elapsed: Duration,
}

impl QemuIoReply {
    /// The command completed: `wrote N/N bytes` / `read N/N bytes`, with no `failed`
    /// message (`write failed: ...`, `Pattern verification failed ...`).
    pub fn ok(&self) -> bool {
        (self.output.contains("wrote ") || self.output.contains("read "))
            && !self.output.contains("failed")
    }
}

impl QemuIoSession {
    /// Starts qemu-io on `url` and waits for its first prompt (the image is open then).
    pub fn open(url: &str, timeout: Duration) -> Result<Self> {
        Self::open_in(None, url, timeout)
    }

    /// Like [`open`](Self::open), with qemu-io inside network namespace `netns`.
    pub fn open_in(netns: Option<&str>, url: &str, timeout: Duration) -> Result<Self> {
        use std::process::{Command, Stdio};
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-io"]);
                c
            }
            None => Command::new("qemu-io"),
        };
        let mut child = cmd
            .args(["-f", "raw", url])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        // stdout and stderr both feed the reply stream (qemu-io reports errors on either).
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
        }
        let mut s = Self {
            child,
            stdin,
            out: rx,
            pending: String::new(),
        };
        match s.until_prompt(timeout) {
            Ok(_) => Ok(s),
            Err(e) => {
                let _ = s.child.kill();
                let _ = s.child.wait();
                Err(e.context(format!("qemu-io could not open {url}")))
            }
        }
    }

    fn until_prompt(&mut self, timeout: Duration) -> Result<String> {
        use std::sync::mpsc::RecvTimeoutError;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.pending.find(QEMU_IO_PROMPT) {
                let reply = self.pending[..i].to_owned();
                self.pending.drain(..i + QEMU_IO_PROMPT.len());
                return Ok(reply);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.out.recv_timeout(left) {
                Ok(bytes) => self.pending.push_str(&String::from_utf8_lossy(&bytes)),
                Err(RecvTimeoutError::Timeout) => {
                    anyhow::bail!(
                        "qemu-io: no prompt within {timeout:?}; output: {}",
                        self.pending
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("qemu-io exited; output: {}", self.pending)
                }
            }
        }
    }

    /// Runs one command (e.g. `write -P 0x11 1M 4k`) and returns its output.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<QemuIoReply> {
        use std::io::Write;
        let start = std::time::Instant::now();
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let output = self.until_prompt(timeout)?;
        Ok(QemuIoReply {
            output,
            elapsed: start.elapsed(),
        })
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
