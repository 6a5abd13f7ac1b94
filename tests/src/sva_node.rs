//! `SvaNode`: one `sva-node serve --config FILE` process on a loopback port, with its config,
//! backing file and state dir in a temp dir that lives as long as the guard.
//!
//! The YAML config is produced by exactly one function, [`render_config`]; when the node's
//! config format changes, only that function changes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::process::{free_port, TargetProcess, PORTAL_READY_TIMEOUT};
use crate::IscsiTarget;

/// Env var naming the `sva-node` binary to test (run-all.sh points it at the release build).
pub const SVA_NODE_BIN_ENV: &str = "SVA_NODE_BIN";

/// The node's write-cache policy (`volume.cacheMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Every WRITE is durable before its status is returned (WCE=0).
    WriteThrough,
    /// WRITEs may be acknowledged from cache; SYNCHRONIZE CACHE / FUA make them durable.
    WriteBack,
}

impl CacheMode {
    /// The spelling in the YAML config.
    pub fn as_config(self) -> &'static str {
        match self {
            CacheMode::WriteThrough => "writeThrough",
            CacheMode::WriteBack => "writeBack",
        }
    }
}

/// What a test chooses about a node; everything else is derived.
#[derive(Debug, Clone)]
pub struct SvaNodeOptions {
    pub volume_name: String,
    /// Volume UID: the VPD 0x80 serial and the NAA designator derive from it.
    pub volume_uid: String,
    pub size_bytes: u64,
    pub cache_mode: CacheMode,
    pub iqn: String,
    pub portal_group_tag: u16,
    pub relative_target_port_id: u16,
    pub target_port_group_id: u16,
    /// Empty: any initiator may log in.
    pub allowed_initiators: Vec<String>,
    /// Where the temp dir (config, backing file, state) is created; `None`: the system temp dir.
    /// The benchmark puts every target's backing file on the same filesystem this way.
    pub base_dir: Option<PathBuf>,
    /// Portal address; `None`: a free port on 127.0.0.1. A mirrored volume fixes every
    /// node's addresses up front (each config lists every plex).
    pub portal: Option<SocketAddr>,
    /// Control API listen address (`GET /v1/status`); `None`: no control API.
    pub control: Option<SocketAddr>,
    /// `control.tokenFile`: the bearer token mutating endpoints (`POST /v1/...`) require;
    /// `None`: mutations are disabled (403).
    pub control_token_file: Option<PathBuf>,
    /// The `mirror:` section; `None`: a single-node volume.
    pub mirror: Option<MirrorOptions>,
    /// Run the node inside this network namespace (`ip netns exec NS sva-node ...`).
    pub netns: Option<String>,
}

/// One plex as every node's `mirror.plexes` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorPlex {
    pub id: u16,
    pub node: String,
    pub portal: SocketAddr,
    pub peer_addr: SocketAddr,
}

/// The `mirror:` section of one node's config (the node's own plex id is its
/// `relative_target_port_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorOptions {
    /// This node's replication listener.
    pub listen: SocketAddr,
    pub secret_file: PathBuf,
    pub plexes: Vec<MirrorPlex>,
    pub witness: SocketAddr,
    pub witness_secret_file: PathBuf,
    /// Resync/verify tuning; each field is only rendered when set (node defaults otherwise).
    pub tuning: MirrorTuning,
}

/// Optional `mirror:` fields of the resync design (RESYNC.md "Config"); `None` = not rendered,
/// so the node's default applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorTuning {
    /// `mirror.regionBytes`: bitmap/copy/verify region (node default 1 MiB).
    pub region_bytes: Option<u64>,
    /// `mirror.resyncBytesPerSec`: resync rate limit (node default 0 = unlimited).
    pub resync_bytes_per_sec: Option<u64>,
    /// `mirror.activityLogRegions`: activity log capacity (node default 1024).
    pub activity_log_regions: Option<u64>,
    /// `mirror.ackSpinMicros`: how long a lone write polls for its acks (node default 200).
    pub ack_spin_micros: Option<u64>,
    /// `mirror.opSpinMicros`: how long a link polls for the peer's next op (node default 200).
    pub op_spin_micros: Option<u64>,
}

impl Default for SvaNodeOptions {
    fn default() -> Self {
        Self {
            volume_name: "vol1".into(),
            volume_uid: "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f".into(),
            size_bytes: 256 << 20,
            cache_mode: CacheMode::WriteBack,
            iqn: "iqn.2026-01.io.sva:vol1".into(),
            portal_group_tag: 1,
            relative_target_port_id: 1,
            target_port_group_id: 1,
            allowed_initiators: Vec::new(),
            base_dir: None,
            portal: None,
            control: None,
            control_token_file: None,
            mirror: None,
            netns: None,
        }
    }
}

/// Paths of one node's files, decided by the harness.
#[derive(Debug, Clone)]
pub struct NodePaths {
    pub config: PathBuf,
    pub store: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

/// Renders the node's YAML config. THE one place that knows the config format
/// (`sva-node/src/config.rs`); adjust here when it changes.
pub fn render_config(opts: &SvaNodeOptions, portal: SocketAddr, paths: &NodePaths) -> String {
    let mut value = serde_json::json!({
        "volume": {
            "name": opts.volume_name,
            "uid": opts.volume_uid,
            "sizeBytes": opts.size_bytes,
            "cacheMode": opts.cache_mode.as_config(),
        },
        "target": {
            "iqn": opts.iqn,
            "portal": portal.to_string(),
            "portalGroupTag": opts.portal_group_tag,
            "relativeTargetPortId": opts.relative_target_port_id,
            "targetPortGroupId": opts.target_port_group_id,
            "allowedInitiators": opts.allowed_initiators,
        },
        "store": {
            "path": paths.store,
            "create": true,
        },
        "stateDir": paths.state_dir,
    });
    if let Some(c) = opts.control {
        value["control"] = serde_json::json!({ "listen": c.to_string() });
        if let Some(t) = &opts.control_token_file {
            value["control"]["tokenFile"] = serde_json::json!(t);
        }
    }
    if let Some(m) = &opts.mirror {
        value["mirror"] = serde_json::json!({
            "listen": m.listen.to_string(),
            "secretFile": m.secret_file,
            "plexes": m.plexes.iter().map(|p| serde_json::json!({
                "id": p.id,
                "node": p.node,
                "portal": p.portal.to_string(),
                "peerAddr": p.peer_addr.to_string(),
            })).collect::<Vec<_>>(),
            "witness": {
                "address": m.witness.to_string(),
                "secretFile": m.witness_secret_file,
            },
        });
        let t = &m.tuning;
        for (key, v) in [
            ("regionBytes", t.region_bytes),
            ("resyncBytesPerSec", t.resync_bytes_per_sec),
            ("activityLogRegions", t.activity_log_regions),
            ("ackSpinMicros", t.ack_spin_micros),
            ("opSpinMicros", t.op_spin_micros),
        ] {
            if let Some(v) = v {
                value["mirror"][key] = serde_json::json!(v);
            }
        }
    }
    // serde_yaml renders a serde_json::Value faithfully; JSON would parse too, YAML reads better.
    serde_yaml::to_string(&value).unwrap_or_else(|_| value.to_string())
}

/// A running sva-node; SIGKILLed when dropped.
#[derive(Debug)]
pub struct SvaNode {
    opts: SvaNodeOptions,
    portal: SocketAddr,
    paths: NodePaths,
    process: Option<TargetProcess>,
    // Dropped last: the process must die before its files go away.
    _dir: tempfile::TempDir,
}

impl SvaNode {
    /// Writes the config into a fresh temp dir, starts the node on a free loopback port and
    /// waits until the portal accepts TCP.
    pub fn start(opts: SvaNodeOptions) -> Result<Self> {
        let dir = match &opts.base_dir {
            Some(base) => tempfile::Builder::new()
                .prefix("sva-node-")
                .tempdir_in(base)?,
            None => tempfile::Builder::new().prefix("sva-node-").tempdir()?,
        };
        let paths = NodePaths {
            config: dir.path().join("node.yaml"),
            store: dir.path().join("volume.img"),
            state_dir: dir.path().join("state"),
            log: dir.path().join("sva-node.log"),
        };
        std::fs::create_dir_all(&paths.state_dir)?;
        let portal = match opts.portal {
            Some(p) => p,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        std::fs::write(&paths.config, render_config(&opts, portal, &paths))?;
        let mut node = Self {
            opts,
            portal,
            paths,
            process: None,
            _dir: dir,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = sva_node_bin()?;
        let mut cmd = match &self.opts.netns {
            Some(ns) => {
                // `ip netns exec` execs the program: the pid stays the node's own.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("serve").arg("--config").arg(&self.paths.config);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut process = TargetProcess::spawn("sva-node", cmd, &self.paths.log)?;
        process.wait_for_port(self.portal, PORTAL_READY_TIMEOUT)?;
        if let Some(c) = self.opts.control {
            // Bound right after the portal; wait so status() works at once.
            process.wait_for_port(c, PORTAL_READY_TIMEOUT)?;
        }
        self.process = Some(process);
        Ok(())
    }

    /// Orderly stop (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate();
        }
    }

    /// Crash the node: SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Stops (gracefully) and starts the node again: same config, port and backing file.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// Starts a node that was stopped or killed.
    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("sva-node is still running");
        }
        self.spawn()
    }

    pub fn options(&self) -> &SvaNodeOptions {
        &self.opts
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(TargetProcess::pid)
    }

    /// Whether the node process is running (not stopped, killed or exited by itself).
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => p.try_exit_status().is_none(),
            None => false,
        }
    }

    pub fn paths(&self) -> &NodePaths {
        &self.paths
    }

    /// Last lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.paths.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl IscsiTarget for SvaNode {
    fn portal(&self) -> SocketAddr {
        self.portal
    }
    fn iqn(&self) -> &str {
        &self.opts.iqn
    }
    fn lun(&self) -> u32 {
        0
    }
    fn describe(&self) -> String {
        format!("sva-node ({})", self.opts.cache_mode.as_config())
    }
    fn log_tail(&self, lines: usize) -> String {
        SvaNode::log_tail(self, lines)
    }
}

/// Locates the `sva-node` binary: `$SVA_NODE_BIN` (run-all.sh points it at the release build),
/// else builds it once per test process (`cargo build -p sva-node`, in the profile of the
/// running test binary) and uses that. Building every time, rather than taking whatever binary
/// lies in the target dir, matters: `cargo test -p sva-tests` does not rebuild the node binary,
/// so a stale one would silently test old code. If cargo cannot run, falls back to an existing
/// binary with a warning.
pub fn sva_node_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate_or_build() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(SVA_NODE_BIN_ENV) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{SVA_NODE_BIN_ENV}={} does not exist", p.display());
        }
        return Ok(p);
    }
    let release = running_profile_is_release();
    let workspace = workspace_root();
    let mut args = vec!["build", "-q", "-p", "sva-node"];
    if release {
        args.push("--release");
    }
    let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .current_dir(&workspace)
        .status();
    let candidates = candidate_bins();
    match built {
        Ok(status) if status.success() => {
            let profile = if release { "release" } else { "debug" };
            candidates
                .into_iter()
                .find(|p| p.is_file() && p.parent().is_some_and(|d| d.ends_with(profile)))
                .context("sva-node binary not found after cargo build")
        }
        other => {
            let existing = candidates.into_iter().find(|p| p.is_file());
            match existing {
                Some(p) => {
                    eprintln!(
                        "warning: cargo build -p sva-node did not succeed ({other:?}); testing \
                         the existing {} (may be stale)",
                        p.display()
                    );
                    Ok(p)
                }
                None => bail!("cargo build -p sva-node failed ({other:?}) and no binary exists"),
            }
        }
    }
}

/// Whether the running binary is a release build (the benchmark runs as one).
fn running_profile_is_release() -> bool {
    std::env::current_exe().ok().is_some_and(|exe| {
        exe.ancestors()
            .skip(1)
            .take(2)
            .any(|d| d.file_name().is_some_and(|n| n == "release"))
    })
}

fn candidate_bins() -> Vec<PathBuf> {
    let mut out = Vec::new();
    // Test binaries live in <target>/<profile>/deps/, the node binary in <target>/<profile>/.
    if let Ok(exe) = std::env::current_exe() {
        // The benchmark binary lives in <target>/<profile>/ itself.
        if let Some(dir) = exe.parent() {
            out.push(dir.join("sva-node"));
            if let Some(profile_dir) = dir.parent() {
                out.push(profile_dir.join("sva-node"));
            }
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    out.push(target.join("debug").join("sva-node"));
    out.push(target.join("release").join("sva-node"));
    out
}

/// The workspace root (parent of this package's manifest dir).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_owned).unwrap_or(manifest)
}
