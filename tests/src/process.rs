//! Child processes for tests: free loopback ports, a guard that kills its process on drop,
//! waiting until a portal accepts TCP, and running external tools with a timeout.
//!
//! Every target process writes stdout+stderr to a log file so a failing test can print the
//! target's own account of what happened ([`TargetProcess::log_tail`]).

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a target may take from spawn until its portal accepts TCP connections.
pub const PORTAL_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a graceful stop (SIGTERM) may take before the guard escalates to SIGKILL.
pub const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns a TCP port on 127.0.0.1 that had no listener a moment ago.
///
/// The port lies below the kernel's ephemeral range ([`sva_node::port`]): a port-0 port can
/// be taken as the source port of any outgoing connection (a replication link, a witness
/// client) before the target binds it, which failed a CI run with "Address already in use".
pub fn free_port() -> Result<u16> {
    sva_node::port::free_loopback_port().context("finding a free loopback port")
}

/// A running target process (sva-node, tgtd). Killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct TargetProcess {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl TargetProcess {
    /// Spawns `cmd` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Result<Self> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("open log {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        })
    }

    /// Process id, if still running under this guard.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns the exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until `addr` accepts a TCP connection, failing early if the process exits.
    pub fn wait_for_port(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                bail!(
                    "{} exited with {status} before {addr} accepted connections; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept connections on {addr} within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Crash: SIGKILL, then reap. The process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // std's kill() is SIGKILL on unix
            let _ = child.wait();
        }
    }

    /// Orderly stop: SIGTERM, wait up to [`GRACEFUL_STOP_TIMEOUT`], then SIGKILL.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + GRACEFUL_STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// The last `lines` lines of the process log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        all[start..].join("\n")
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Output of an external tool run by [`run_tool`].
#[derive(Debug, Clone)]
pub struct ToolOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status; `None` when the tool was killed on timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl ToolOutput {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// A message with the command, status and both streams, for assertion failures.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {:?} (timed out: {}, {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.timed_out, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `program args..` with stdin closed, captures both streams, kills it after `timeout`.
pub fn run_tool<S: AsRef<std::ffi::OsStr>>(
    program: &str,
    args: &[S],
    timeout: Duration,
) -> Result<ToolOutput> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawn {command}"))?;
    // Drain both pipes on threads so a chatty tool cannot block on a full pipe.
    let out_reader = child.stdout.take().map(drain);
    let err_reader = child.stderr.take().map(drain);
    let deadline = start + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(ToolOutput {
        command,
        status,
        stdout,
        stderr,
        timed_out,
        elapsed: start.elapsed(),
    })
}

fn drain<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Is `name` an executable on `PATH` (or an absolute path that exists)?
pub fn tool_available(name: &str) -> bool {
    find_tool(name).is_some()
}

/// Full path of `name` found on `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let candidate = Path::new(name);
    if candidate.is_absolute() {
        return candidate.exists().then(|| candidate.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    // tgtd/tgtadm live in /usr/sbin, which a non-login PATH may lack.
    let extra = [PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")];
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Env var set by `tests/run-all.sh`: missing tools are then a failure, not a skip.
pub const REQUIRE_TOOLS_ENV: &str = "SVA_REQUIRE_TOOLS";

/// True when all `tools` exist. Otherwise prints a SKIP line and returns false — or panics
/// when [`REQUIRE_TOOLS_ENV`] is set (the test command installs them, so CI must have them).
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !tool_available(t))
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "SKIP {test}: external tool(s) not installed: {} (tests/run-all.sh installs them)",
        missing.join(", ")
    );
    if std::env::var_os(REQUIRE_TOOLS_ENV).is_some() {
        panic!("{msg} — and {REQUIRE_TOOLS_ENV} is set");
    }
    eprintln!("{msg}");
    false
}
