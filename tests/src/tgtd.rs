//! `Tgtd`: the reference userspace target (tgt 1.0.x) run in the foreground on a loopback port,
//! configured with `tgtadm`, so every harness piece can be proven before sva-node works and so
//! benchmarks have a baseline.
//!
//! Several instances run side by side: each gets its own iSCSI portal
//! (`--iscsi portal=127.0.0.1:PORT`) and its own management socket (`-C N` →
//! `/var/run/tgtd/socket.N`, N ≤ 32767); the harness derives N from the portal port.
//!
//! tgt specifics worth knowing:
//! - LUN 0 is always tgt's own "controller" LU (peripheral type 0x0c); the disk is LUN 1.
//! - Write cache: by default tgt reports WCE=1 (caching mode page 08h) and the `rdwr` backing
//!   store writes with pwrite(2) into the page cache; SYNCHRONIZE CACHE → fdatasync(2). That is
//!   [`CacheMode::WriteBack`]. [`CacheMode::WriteThrough`] adds `--bsoflags sync` (O_SYNC).
//! - Needs root (it adjusts rlimits and creates `/var/run/tgtd`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::{find_tool, free_port, run_tool, TargetProcess, PORTAL_READY_TIMEOUT};
use crate::sva_node::CacheMode;
use crate::IscsiTarget;

/// Timeout of one `tgtadm` call.
const TGTADM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to retry the first `tgtadm` call while tgtd creates its management socket.
const CONTROL_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// tgtd rejects `-C` values above 32767.
const CONTROL_PORT_MAX: u16 = 32767;

/// Attempts to start tgtd (a derived control port may collide with another instance's).
const START_ATTEMPTS: u32 = 5;

/// Options for one tgtd instance.
#[derive(Debug, Clone)]
pub struct TgtdOptions {
    pub iqn: String,
    pub size_bytes: u64,
    pub cache_mode: CacheMode,
    /// Where the temp dir with the backing file goes; `None`: the system temp dir.
    pub base_dir: Option<PathBuf>,
}

impl Default for TgtdOptions {
    fn default() -> Self {
        Self {
            iqn: "iqn.2026-01.io.sva.test:tgt".into(),
            size_bytes: 256 << 20,
            cache_mode: CacheMode::WriteBack,
            base_dir: None,
        }
    }
}

/// A running tgtd with one target (tid 1) and one disk LUN (1) backed by a sparse file.
#[derive(Debug)]
pub struct Tgtd {
    opts: TgtdOptions,
    portal: SocketAddr,
    control_port: u16,
    backing: PathBuf,
    process: Option<TargetProcess>,
    _dir: tempfile::TempDir,
}

impl Tgtd {
    /// Starts tgtd and configures the target. Fails if tgtd/tgtadm are missing or tgtd cannot
    /// start (e.g. not root); callers that only prove the harness may skip on that error.
    pub fn start(opts: TgtdOptions) -> Result<Self> {
        let tgtd = find_tool("tgtd").context("tgtd not installed (apt-get install tgt)")?;
        find_tool("tgtadm").context("tgtadm not installed (apt-get install tgt)")?;
        let dir = match &opts.base_dir {
            Some(base) => tempfile::Builder::new().prefix("tgtd-").tempdir_in(base)?,
            None => tempfile::Builder::new().prefix("tgtd-").tempdir()?,
        };
        let backing = dir.path().join("volume.img");
        std::fs::File::create(&backing)?.set_len(opts.size_bytes)?;
        let log = dir.path().join("tgtd.log");
        let mut attempt = 0;
        let (process, portal, control_port) = loop {
            attempt += 1;
            let port = free_port()?;
            let portal = SocketAddr::from(([127, 0, 0, 1], port));
            // tgtd accepts control ports 0..32767 only; derive one from the (unique) portal
            // port and retry on the rare collision (tgtd exits if the socket lock is taken).
            let control_port = 1 + port % CONTROL_PORT_MAX;
            let mut cmd = Command::new(&tgtd);
            cmd.arg("-f")
                .arg("-C")
                .arg(control_port.to_string())
                .arg("--iscsi")
                .arg(format!("portal={portal}"));
            let mut process = TargetProcess::spawn("tgtd", cmd, &log)?;
            match process.wait_for_port(portal, PORTAL_READY_TIMEOUT) {
                Ok(()) => break (process, portal, control_port),
                Err(e) if attempt >= START_ATTEMPTS => return Err(e),
                Err(_) => continue,
            }
        };
        let mut me = Self {
            opts,
            portal,
            control_port,
            backing,
            process: Some(process),
            _dir: dir,
        };
        me.configure()?;
        Ok(me)
    }

    fn configure(&mut self) -> Result<()> {
        let deadline = Instant::now() + CONTROL_READY_TIMEOUT;
        let iqn = self.opts.iqn.clone();
        loop {
            match self.tgtadm(&[
                "--mode",
                "target",
                "--op",
                "new",
                "--tid",
                "1",
                "--targetname",
                &iqn,
            ]) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let backing = self.backing.to_string_lossy().into_owned();
        let mut lu = vec![
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            "1",
            "--lun",
            "1",
            "--backing-store",
            &backing,
        ];
        if self.opts.cache_mode == CacheMode::WriteThrough {
            lu.extend(["--bsoflags", "sync"]);
        }
        self.tgtadm(&lu)?;
        self.tgtadm(&[
            "--mode",
            "target",
            "--op",
            "bind",
            "--tid",
            "1",
            "--initiator-address",
            "ALL",
        ])
    }

    /// Runs `tgtadm -C <port> --lld iscsi ARGS`.
    pub fn tgtadm(&self, args: &[&str]) -> Result<()> {
        let control = self.control_port.to_string();
        let mut full = vec!["-C", control.as_str(), "--lld", "iscsi"];
        full.extend_from_slice(args);
        let out = run_tool("tgtadm", &full, TGTADM_TIMEOUT)?;
        if !out.success() {
            bail!("tgtadm failed:\n{}", out.describe());
        }
        Ok(())
    }

    /// `tgtadm --mode target --op show` output.
    pub fn show(&self) -> Result<String> {
        let control = self.control_port.to_string();
        let out = run_tool(
            "tgtadm",
            &[
                "-C", &control, "--lld", "iscsi", "--mode", "target", "--op", "show",
            ],
            TGTADM_TIMEOUT,
        )?;
        Ok(out.stdout)
    }

    /// Crash tgtd (SIGKILL).
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
        self.remove_control_socket();
    }

    pub fn backing_file(&self) -> &std::path::Path {
        &self.backing
    }

    fn remove_control_socket(&self) {
        let sock = format!("/var/run/tgtd/socket.{}", self.control_port);
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(format!("{sock}.lock"));
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl IscsiTarget for Tgtd {
    fn portal(&self) -> SocketAddr {
        self.portal
    }
    fn iqn(&self) -> &str {
        &self.opts.iqn
    }
    fn lun(&self) -> u32 {
        1
    }
    fn describe(&self) -> String {
        format!("tgtd ({})", self.opts.cache_mode.as_config())
    }
    fn log_tail(&self, lines: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }
}
