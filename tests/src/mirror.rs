//! `MirroredVolume`: one mirrored volume on this machine — a `sva-node witness` process and
//! N `sva-node serve --config` nodes (2 or 3 plexes), as `sva-node demo` assembles it.
//!
//! ```text
//!  MirroredVolume ──spawn──> sva-node witness --listen W --data DIR/witness --secret-file ..
//!                 ──spawn──> SvaNode plex 1 (portal P1, control C1, replication R1) ─┐
//!                 ──spawn──> SvaNode plex 2 (portal P2, control C2, replication R2) ─┤ each
//!                                                                   config lists every plex
//! ```
//!
//! Every address is chosen before anything starts, because every node's config lists every
//! plex. The configs are rendered by [`crate::render_config`] (the one place that knows the
//! format) from [`SvaNodeOptions::mirror`]. Nodes are addressed by **plex id** (1-based; plex 1
//! is the initial sequencer, the lowest id). A node may run in a network namespace
//! ([`NodePlacement`]) for partition tests. Everything is killed on drop, and the logs of
//! every process are printed when a test panics with the volume alive.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{free_port, TargetProcess, PORTAL_READY_TIMEOUT};
use crate::sva_node::{sva_node_bin, MirrorOptions, MirrorPlex, MirrorTuning};
use crate::{CacheMode, IscsiTarget, SvaNode, SvaNodeOptions};

/// How long a fresh volume may take until every node reports ActiveOptimized.
pub const VOLUME_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of one control API request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest `/v1/status` response read (it is a few hundred bytes).
const HTTP_RESPONSE_MAX: u64 = 1 << 20;
/// The node's read lease (sva-node `READ_LEASE_MS`), for waiting without an initiator.
const READ_LEASE_MS: u64 = 500;

/// Where one node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlacement {
    /// Address its portal, control API and replication listener bind.
    pub ip: IpAddr,
    /// Network namespace to run it in (`None`: this one).
    pub netns: Option<String>,
}

impl Default for NodePlacement {
    fn default() -> Self {
        Self {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: None,
        }
    }
}

/// What a test chooses about a mirrored volume.
#[derive(Debug, Clone)]
pub struct MirroredVolumeOptions {
    /// 2 or 3.
    pub plexes: u16,
    pub cache_mode: CacheMode,
    pub size_bytes: u64,
    pub volume_name: String,
    pub volume_uid: String,
    pub iqn: String,
    /// Address the witness listens on.
    pub witness_ip: IpAddr,
    /// Per plex, index 0 = plex 1; missing entries: [`NodePlacement::default`].
    pub placement: Vec<NodePlacement>,
    /// Directory the volume's own temporary directory (configs, backing files, logs) is
    /// created in (`None`: `$TMPDIR`); the benchmark puts every target on one filesystem.
    pub base_dir: Option<PathBuf>,
    /// Optional resync tuning rendered into every node's `mirror:` section.
    pub tuning: MirrorTuning,
}

impl Default for MirroredVolumeOptions {
    fn default() -> Self {
        Self {
            plexes: 2,
            cache_mode: CacheMode::WriteThrough,
            size_bytes: 64 << 20,
            volume_name: "mvol".into(),
            volume_uid: "0d5e7a1c-9b2f-4e3d-8c7a-6b5e4d3c2b1a".into(),
            iqn: "iqn.2026-01.io.sva:mvol".into(),
            witness_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            placement: Vec::new(),
            base_dir: None,
            tuning: MirrorTuning::default(),
        }
    }
}

/// The parts of `GET /v1/status` the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorStatus {
    pub epoch: u64,
    /// `ActiveOptimized`, `Transitioning`, `Unavailable`, ...
    pub alua_state: String,
    /// `(plex id, state)`, state `InSync` | `Stale` | `Resyncing` | `Removed`.
    pub plexes: Vec<(u16, String)>,
    /// The whole document.
    pub raw: serde_json::Value,
}

impl MirrorStatus {
    /// State of plex `id` in this node's view.
    pub fn plex_state(&self, id: u16) -> Option<&str> {
        self.plexes
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, s)| s.as_str())
    }
}

/// A running mirrored volume. Drop kills every process, then removes the files.
pub struct MirroredVolume {
    nodes: Vec<SvaNode>,
    witness: Option<TargetProcess>,
    witness_addr: SocketAddr,
    controls: Vec<SocketAddr>,
    /// The bearer token of every node's control API (`control.tokenFile`).
    control_token: String,
    // Dropped last: the processes die before their files go away.
    dir: tempfile::TempDir,
}

impl MirroredVolume {
    /// Writes the secrets and configs, starts the witness and every node, and waits until
    /// every node reports its path ActiveOptimized.
    pub fn start(opts: MirroredVolumeOptions) -> Result<Self> {
        let v = Self::start_unready(opts)?;
        for plex in 1..=v.plexes() {
            let ok = wait_until(
                || {
                    v.status(plex)
                        .is_ok_and(|s| s.alua_state == "ActiveOptimized")
                },
                VOLUME_READY_TIMEOUT,
            );
            if ok.is_none() {
                bail!(
                    "plex {plex} not ActiveOptimized within {VOLUME_READY_TIMEOUT:?}: {:?}\n{}",
                    v.status(plex),
                    v.logs(30)
                );
            }
        }
        // ActiveOptimized is reported before the first heartbeat round gives the node its
        // read lease; until then commands get 02/04/0A (which qemu does not retry at open).
        // Wait until a read succeeds through every path.
        for plex in 1..=v.plexes() {
            v.wait_readable(plex, VOLUME_READY_TIMEOUT)?;
        }
        Ok(v)
    }

    /// Waits until a 512-byte read through plex `plex` succeeds (qemu-io; without qemu-io,
    /// waits one read lease instead).
    pub fn wait_readable(&self, plex: u16, timeout: Duration) -> Result<Duration> {
        if !crate::process::tool_available("qemu-io") {
            std::thread::sleep(Duration::from_millis(2 * READ_LEASE_MS));
            return Ok(Duration::from_millis(2 * READ_LEASE_MS));
        }
        let url = self.url(plex);
        let mut last = String::new();
        wait_until(
            || match crate::tools::qemu_io(&url, &["read 0 512"]) {
                Ok(o) if o.success() => true,
                Ok(o) => {
                    last = o.describe();
                    false
                }
                Err(e) => {
                    last = format!("{e:#}");
                    false
                }
            },
            timeout,
        )
        .with_context(|| format!("plex {plex} not readable within {timeout:?}: {last}"))
    }

    /// Like [`start`](Self::start) without waiting for the paths to become active.
    pub fn start_unready(opts: MirroredVolumeOptions) -> Result<Self> {
        if !(2..=3).contains(&opts.plexes) {
            bail!("a mirrored volume has 2 or 3 plexes, not {}", opts.plexes);
        }
        let mut builder = tempfile::Builder::new();
        builder.prefix("sva-mirror-");
        let dir = match &opts.base_dir {
            Some(base) => builder
                .tempdir_in(base)
                .with_context(|| format!("creating a directory in {}", base.display()))?,
            None => builder.tempdir()?,
        };
        let witness_secret = write_secret(&dir.path().join("witness-secret"))?;
        let replication_secret = write_secret(&dir.path().join("replication-secret"))?;
        let control_token_file = write_secret(&dir.path().join("control-token"))?;
        let control_token = std::fs::read_to_string(&control_token_file)?;
        let witness_addr = SocketAddr::new(opts.witness_ip, free_port()?);
        let place = |id: u16| {
            opts.placement
                .get(usize::from(id - 1))
                .cloned()
                .unwrap_or_default()
        };
        let mut plexes = Vec::new();
        let mut controls = Vec::new();
        for id in 1..=opts.plexes {
            let ip = place(id).ip;
            plexes.push(MirrorPlex {
                id,
                node: format!("node-{id}"),
                portal: SocketAddr::new(ip, free_port()?),
                peer_addr: SocketAddr::new(ip, free_port()?),
            });
            controls.push(SocketAddr::new(ip, free_port()?));
        }

        let log = dir.path().join("witness.log");
        let mut cmd = Command::new(sva_node_bin()?);
        cmd.arg("witness")
            .arg("--listen")
            .arg(witness_addr.to_string())
            .arg("--data")
            .arg(dir.path().join("witness"))
            .arg("--secret-file")
            .arg(&witness_secret);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut witness = TargetProcess::spawn("sva-node witness", cmd, &log)?;
        witness.wait_for_port(witness_addr, PORTAL_READY_TIMEOUT)?;

        let mut v = MirroredVolume {
            nodes: Vec::new(),
            witness: Some(witness),
            witness_addr,
            controls: controls.clone(),
            control_token,
            dir,
        };
        for p in &plexes {
            let placement = place(p.id);
            let node_opts = SvaNodeOptions {
                volume_name: opts.volume_name.clone(),
                volume_uid: opts.volume_uid.clone(),
                size_bytes: opts.size_bytes,
                cache_mode: opts.cache_mode,
                iqn: opts.iqn.clone(),
                // Plex id = relative target port = target port group = TPGT (DESIGN.md §4).
                portal_group_tag: p.id,
                relative_target_port_id: p.id,
                target_port_group_id: p.id,
                allowed_initiators: Vec::new(),
                base_dir: Some(v.dir.path().to_owned()),
                portal: Some(p.portal),
                control: controls.get(usize::from(p.id - 1)).copied(),
                control_token_file: Some(control_token_file.clone()),
                mirror: Some(MirrorOptions {
                    listen: p.peer_addr,
                    secret_file: replication_secret.clone(),
                    plexes: plexes.clone(),
                    witness: witness_addr,
                    witness_secret_file: witness_secret.clone(),
                    tuning: opts.tuning,
                }),
                netns: placement.netns,
            };
            let node = SvaNode::start(node_opts)
                .with_context(|| format!("starting plex {}\n{}", p.id, v.logs(30)))?;
            v.nodes.push(node);
        }
        Ok(v)
    }

    /// Number of plexes (nodes).
    pub fn plexes(&self) -> u16 {
        self.nodes.len() as u16
    }

    fn node(&self, plex: u16) -> &SvaNode {
        plex.checked_sub(1)
            .and_then(|i| self.nodes.get(usize::from(i)))
            .unwrap_or_else(|| panic!("no plex {plex}"))
    }

    fn node_mut(&mut self, plex: u16) -> &mut SvaNode {
        plex.checked_sub(1)
            .and_then(|i| self.nodes.get_mut(usize::from(i)))
            .unwrap_or_else(|| panic!("no plex {plex}"))
    }

    /// `iscsi://PORTAL/IQN/0` of plex `plex`'s node.
    pub fn url(&self, plex: u16) -> String {
        self.node(plex).url()
    }

    /// The node of plex `plex` as an [`IscsiTarget`].
    pub fn target(&self, plex: u16) -> &SvaNode {
        self.node(plex)
    }

    /// Backing file of plex `plex`.
    pub fn plex_path(&self, plex: u16) -> PathBuf {
        self.node(plex).paths().store.clone()
    }

    /// Address of the witness.
    pub fn witness_addr(&self) -> SocketAddr {
        self.witness_addr
    }

    /// Crash plex `plex`'s node (SIGKILL).
    pub fn kill9(&mut self, plex: u16) {
        self.node_mut(plex).kill9();
    }

    /// Orderly stop of plex `plex`'s node (SIGTERM, SIGKILL after a grace period).
    pub fn stop(&mut self, plex: u16) {
        self.node_mut(plex).stop();
    }

    /// Orderly stop of every node, then the witness.
    pub fn stop_all(&mut self) {
        for n in &mut self.nodes {
            n.stop();
        }
        if let Some(mut w) = self.witness.take() {
            w.terminate();
        }
    }

    /// Start plex `plex`'s node again with its config (stopping it first if it runs).
    pub fn restart(&mut self, plex: u16) -> Result<()> {
        let n = self.node_mut(plex);
        if n.is_running() {
            n.restart()
        } else {
            n.stop(); // reap an exited process
            n.start_again()
        }
    }

    /// Whether plex `plex`'s node process is alive.
    pub fn is_running(&mut self, plex: u16) -> bool {
        self.node_mut(plex).is_running()
    }

    /// Control API address of plex `plex`'s node.
    pub fn control_addr(&self, plex: u16) -> Result<SocketAddr> {
        self.controls
            .get(usize::from(plex.saturating_sub(1)))
            .copied()
            .with_context(|| format!("no plex {plex}"))
    }

    /// The bearer token every node's control API accepts.
    pub fn control_token(&self) -> &str {
        &self.control_token
    }

    /// `POST http://CONTROL{path}` with a JSON `body` to plex `plex`'s node, with the volume's
    /// bearer token when `authorized`; returns the HTTP status code and the body.
    pub fn post(
        &self,
        plex: u16,
        path: &str,
        body: &str,
        authorized: bool,
    ) -> Result<(u16, String)> {
        let token = authorized.then_some(self.control_token.as_str());
        http_request(self.control_addr(plex)?, "POST", path, body, token)
    }

    /// `GET http://CONTROL/metrics` of plex `plex`'s node (Prometheus text).
    pub fn metrics(&self, plex: u16) -> Result<String> {
        http_get(self.control_addr(plex)?, "/metrics")
    }

    /// State directory of plex `plex`'s node.
    pub fn state_dir(&self, plex: u16) -> PathBuf {
        self.node(plex).paths().state_dir.clone()
    }

    /// Turns plex `plex` into a new, empty plex (a replaced disk): its backing file becomes a
    /// sparse file of the same size and its state directory is emptied. The node must not run.
    pub fn wipe_plex(&mut self, plex: u16) -> Result<()> {
        if self.node_mut(plex).is_running() {
            bail!("plex {plex}'s node still runs; stop or kill it before wiping its plex");
        }
        let store = self.plex_path(plex);
        let size = std::fs::metadata(&store)
            .with_context(|| format!("stat {}", store.display()))?
            .len();
        std::fs::remove_file(&store).with_context(|| format!("rm {}", store.display()))?;
        let f = std::fs::File::create(&store)?;
        f.set_len(size)?;
        f.sync_all()?;
        let state = self.state_dir(plex);
        for e in std::fs::read_dir(&state).with_context(|| format!("ls {}", state.display()))? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// `GET http://CONTROL/v1/status` of plex `plex`'s node.
    pub fn status(&self, plex: u16) -> Result<MirrorStatus> {
        fetch_status(self.control_addr(plex)?)
    }

    /// The last `lines` lines of the witness's and every node's log, labelled.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        if let Some(w) = &self.witness {
            out.push_str(&format!("--- witness log ---\n{}\n", w.log_tail(lines)));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            out.push_str(&format!(
                "--- plex {} log ---\n{}\n",
                i + 1,
                n.log_tail(lines)
            ));
        }
        out
    }

    /// The volume's directory (configs, secrets, backing files, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MirroredVolume {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(60));
        }
        for n in &mut self.nodes {
            n.kill9();
        }
        if let Some(keep) = std::env::var_os(KEEP_LOGS_ENV) {
            keep_logs(self.dir.path(), Path::new(&keep));
        }
    }
}

/// `SVA_KEEP_LOGS=DIR`: every process log of a volume is copied into `DIR/<volume dir name>/`
/// when the volume is dropped (its temporary directory goes with it), to read a slow or
/// failed run's node logs in full.
pub const KEEP_LOGS_ENV: &str = "SVA_KEEP_LOGS";

fn keep_logs(dir: &Path, keep: &Path) {
    let name = dir.file_name().unwrap_or(dir.as_os_str());
    let to = keep.join(name);
    let mut stack = vec![dir.to_owned()];
    let mut copied = 0;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "log") {
                let rel = p.strip_prefix(dir).unwrap_or(&p);
                let dst = to.join(rel);
                let made = dst.parent().map_or(Ok(()), std::fs::create_dir_all);
                match made.and_then(|()| std::fs::copy(&p, &dst)) {
                    Ok(_) => copied += 1,
                    Err(e) => eprintln!("{KEEP_LOGS_ENV}: copying {}: {e}", p.display()),
                }
            }
        }
    }
    eprintln!("{KEEP_LOGS_ENV}: {copied} logs kept in {}", to.display());
}

/// `GET http://ADDR/v1/status` of a node's control API, parsed (usable from any thread).
pub fn fetch_status(addr: SocketAddr) -> Result<MirrorStatus> {
    let body = http_get(addr, "/v1/status")?;
    let raw: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("/v1/status is not JSON: {body}"))?;
    let epoch = raw["epoch"]
        .as_u64()
        .with_context(|| format!("/v1/status without epoch: {body}"))?;
    let alua_state = raw["aluaState"]
        .as_str()
        .with_context(|| format!("/v1/status without aluaState: {body}"))?
        .to_owned();
    let plexes = raw["plexes"]
        .as_array()
        .with_context(|| format!("/v1/status without plexes: {body}"))?
        .iter()
        .map(|p| {
            let id = p["id"].as_u64().and_then(|i| u16::try_from(i).ok());
            let state = p["state"].as_str();
            match (id, state) {
                (Some(id), Some(s)) => Ok((id, s.to_owned())),
                _ => Err(anyhow!("bad plex entry {p} in {body}")),
            }
        })
        .collect::<Result<_>>()?;
    Ok(MirrorStatus {
        epoch,
        alua_state,
        plexes,
        raw,
    })
}

/// Polls `pred` every 20 ms until it holds (returns how long that took) or `timeout` passes.
pub fn wait_until(mut pred: impl FnMut() -> bool, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if pred() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Compares two files byte for byte: `Ok(None)` when identical, else the first differing
/// offset (or the shorter length when one is a prefix of the other).
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<u64>> {
    let mut fa = std::fs::File::open(a).with_context(|| format!("open {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("open {}", b.display()))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(offset + i as u64));
        }
        if na != nb {
            return Ok(Some(offset + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A random 32-byte secret as hex, in a file only the owner can read.
fn write_secret(path: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("reading /dev/urandom")?;
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(hex.as_bytes())?;
    Ok(path.to_owned())
}

/// A minimal HTTP/1.1 GET (`Connection: close`) returning the body of a 200 response.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let (code, body) = http_request(addr, "GET", path, "", None)?;
    if code != 200 {
        bail!("GET {path} from {addr}: HTTP {code}\n{body}");
    }
    Ok(body)
}

/// A minimal HTTP/1.1 request (`Connection: close`) with an optional JSON body and bearer
/// token; returns the status code and the (de-chunked) body, whatever the status.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    bearer: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = if body.is_empty() && method == "GET" {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}{content}Connection: close\r\n\r\n{body}"
    )?;
    let mut raw = Vec::new();
    s.take(HTTP_RESPONSE_MAX)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading {method} {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in response from {addr}: {text}"))?;
    let status = head.lines().next().unwrap_or_default();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("bad status line from {addr}: {status}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("truncated chunk header")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        body = rest.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap(),
            "hello world"
        );
        assert!(dechunk("5\r\nhel").is_err());
    }

    #[test]
    fn finds_first_difference() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let mut x = vec![7u8; 3 << 20];
        std::fs::write(&a, &x).unwrap();
        std::fs::write(&b, &x).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), None);
        x[(2 << 20) + 5] = 8;
        std::fs::write(&b, &x).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), Some((2 << 20) + 5));
        std::fs::write(&b, &x[..100]).unwrap();
        assert_eq!(first_difference(&a, &b).unwrap(), Some(100));
    }
}
