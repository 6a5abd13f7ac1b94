//! `sva-node demo`: a whole volume on this machine, for trying SVA in one command.
//!
//! ```text
//!  sva-node demo ──spawns──> sva-node serve --config DIR/node-1.yaml   (portal 127.0.0.1:P1)
//!                 ──spawns──> sva-node serve --config DIR/node-2.yaml   (portal 127.0.0.1:P2) ...
//! ```
//!
//! Everything lives in one directory (default `./sva-demo`): each node's YAML config (so a node
//! can be restarted by hand with `sva-node serve --config`), its backing file (sparse), state
//! directory and log. Running the demo again on the same directory keeps the data: the volume
//! UID is stored in `DIR/volume-uid`, and portals are chosen afresh among free loopback ports.
//! Ctrl-C (or SIGTERM) stops every process the demo started.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use sva_node::config::{Config, ControlConfig, StoreConfig, TargetSection, VolumeConfig};
use sva_node::scsi::lu::CacheMode;

/// How many plexes this build can serve as one volume. Mirroring (more than one plex) comes
/// with the replication engine; until then a larger `--plexes` is refused with that reason.
const PLEXES_SUPPORTED_MAX: u8 = 1;
/// How long a node may take to open its portal before the demo gives up.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long stopped nodes get to finish in-flight I/O before they are killed.
const NODE_STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of plexes (one node process each).
    #[arg(long, default_value_t = 1)]
    plexes: u8,
    /// Volume size: bytes, or with a K/M/G/T suffix (binary units), a multiple of 512.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Directory for configs, backing files, state and logs (created if missing).
    #[arg(long, default_value = "sva-demo")]
    dir: PathBuf,
    /// Cache mode of the volume: writeThrough (durable before ack) or writeBack.
    #[arg(long, default_value = "writeThrough", value_parser = parse_cache_mode)]
    cache_mode: CacheMode,
}

/// Parses `1073741824`, `512K`, `64M`, `1G`, `2T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown size suffix {c:?} (use K, M, G or T)"
                    ))
                }
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1G, 512M, 1073741824)"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("{s:?} must be a positive multiple of 512 bytes"));
    }
    Ok(bytes)
}

fn parse_cache_mode(s: &str) -> Result<CacheMode, String> {
    match s {
        "writeThrough" => Ok(CacheMode::WriteThrough),
        "writeBack" => Ok(CacheMode::WriteBack),
        _ => Err(format!("{s:?}: use writeThrough or writeBack")),
    }
}

/// One started node.
struct Node {
    id: u16,
    child: Child,
    portal: SocketAddr,
    control: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.plexes == 0 {
        bail!("--plexes must be at least 1");
    }
    if args.plexes > PLEXES_SUPPORTED_MAX {
        bail!(
            "--plexes {}: this build serves volumes of at most {PLEXES_SUPPORTED_MAX} plex \
             (synchronous mirroring is not in this build yet); use --plexes 1",
            args.plexes
        );
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let uid = volume_uid(&dir)?;
    let exe = std::env::current_exe().context("locating the sva-node binary")?;

    let ids: Vec<u16> = (1..=u16::from(args.plexes)).collect();
    let portals: Vec<SocketAddr> = ids.iter().map(|_| free_port()).collect::<Result<_, _>>()?;
    let send_targets: Vec<String> = ids
        .iter()
        .zip(&portals)
        .map(|(id, p)| format!("{p},{id}"))
        .collect();

    let mut nodes: Vec<Node> = Vec::new();
    let started = start_all(
        &args,
        &dir,
        &uid,
        &exe,
        &ids,
        &portals,
        &send_targets,
        &mut nodes,
    );
    if let Err(e) = started {
        stop_all(&mut nodes);
        return Err(e);
    }
    print_banner(&args, &dir, &nodes);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let exited = rt.block_on(wait_for_stop(&mut nodes));
    if let Some((id, status)) = exited {
        eprintln!(
            "node {id} exited unexpectedly ({status}); see its log: {}",
            nodes
                .iter()
                .find(|n| n.id == id)
                .map(|n| n.log.display().to_string())
                .unwrap_or_default()
        );
    }
    eprintln!("stopping {} node(s)...", nodes.len());
    stop_all(&mut nodes);
    eprintln!("stopped; data kept in {}", dir.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_all(
    args: &DemoArgs,
    dir: &Path,
    uid: &str,
    exe: &Path,
    ids: &[u16],
    portals: &[SocketAddr],
    send_targets: &[String],
    nodes: &mut Vec<Node>,
) -> anyhow::Result<()> {
    for (&id, &portal) in ids.iter().zip(portals) {
        let control = free_port()?;
        let cfg = Config {
            volume: VolumeConfig {
                name: "demo".into(),
                uid: uid.to_string(),
                size_bytes: args.size,
                cache_mode: args.cache_mode,
            },
            target: TargetSection {
                iqn: DEMO_IQN.into(),
                portal: portal.to_string(),
                portal_group_tag: id,
                relative_target_port_id: id,
                target_port_group_id: id,
                alias: Some(format!("sva-demo-node-{id}")),
                chap: None,
                allowed_initiators: Vec::new(),
                send_targets: send_targets.to_vec(),
            },
            store: StoreConfig {
                path: dir.join(format!("plex-{id}.img")),
                create: true,
            },
            state_dir: dir.join(format!("state-{id}")),
            control: Some(ControlConfig {
                listen: control.to_string(),
                token_file: None,
            }),
        };
        let text = serde_yaml::to_string(&cfg).context("rendering node config")?;
        // Parse what we wrote: the demo must only write configs `serve` accepts.
        Config::parse(&text).context("rendered node config is invalid")?;
        let config = dir.join(format!("node-{id}.yaml"));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join(format!("node-{id}.log"));
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("log file")?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        nodes.push(Node {
            id,
            child,
            portal,
            control,
            config,
            log,
        });
    }
    for node in nodes.iter_mut() {
        wait_for_portal(node)?;
    }
    Ok(())
}

/// The target name every node of the demo volume serves (DESIGN.md §4: same IQN on every node).
const DEMO_IQN: &str = "iqn.2026-11.io.sva:demo";

fn print_banner(args: &DemoArgs, dir: &Path, nodes: &[Node]) {
    println!(
        "SVA demo volume: {} bytes, {} plex(es), cacheMode {:?}, files in {}",
        args.size,
        nodes.len(),
        args.cache_mode,
        dir.display()
    );
    for n in nodes {
        println!(
            "  path {}: iscsi://{}/{DEMO_IQN}/0   pid {}   control http://{}/v1/status   config {}",
            n.id,
            n.portal,
            n.child.id(),
            n.control,
            n.config.display()
        );
    }
    if let Some(n) = nodes.first() {
        let url = format!("iscsi://{}/{DEMO_IQN}/0", n.portal);
        println!("Try it:");
        println!("  iscsi-inq {url}");
        println!("  qemu-io -f raw -c 'write -P 0x11 1M 4k' -c 'read -P 0x11 1M 4k' {url}");
        println!("  iscsi-test-cu --dataloss -t ALL {url}");
    }
    println!(
        "Ctrl-C stops every node; the data stays in {}.",
        dir.display()
    );
}

/// Waits for Ctrl-C/SIGTERM, or for a node to exit on its own (returned).
async fn wait_for_stop(nodes: &mut [Node]) -> Option<(u16, std::process::ExitStatus)> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return None,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return None,
            _ = tick.tick() => {
                for n in nodes.iter_mut() {
                    if let Ok(Some(status)) = n.child.try_wait() {
                        return Some((n.id, status));
                    }
                }
            }
        }
    }
}

fn wait_for_portal(node: &mut Node) -> anyhow::Result<()> {
    let deadline = Instant::now() + NODE_START_TIMEOUT;
    loop {
        if let Some(status) = node.child.try_wait().context("checking node")? {
            let tail = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            bail!(
                "node {} exited during start ({status}); last log lines:\n{}",
                node.id,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if TcpStream::connect_timeout(&node.portal, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "node {} did not open its portal {} within {:?}; see {}",
                node.id,
                node.portal,
                NODE_START_TIMEOUT,
                node.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM every node, wait for a graceful exit, then SIGKILL what is left.
fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter() {
        if let Ok(pid) = i32::try_from(n.child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
            // which has not been reaped yet, so it cannot name another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + NODE_STOP_GRACE;
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A free loopback TCP port (bound and released; another process could take it in between,
/// which the node then reports as a bind error).
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    l.local_addr().context("finding a free loopback port")
}

/// The volume's UID, created once per demo directory so identity (NAA, serial) survives restarts.
fn volume_uid(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("volume-uid");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if !s.is_empty() {
            return Ok(s);
        }
    }
    let uid = format!("{:032x}", rand::random::<u128>());
    std::fs::write(&path, format!("{uid}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(uid)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1000").is_err()); // not a multiple of 512
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
