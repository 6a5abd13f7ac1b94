//! `sva-node demo`: a whole mirrored volume on this machine, for trying SVA in one command.
//!
//! ```text
//!  sva-node demo ──spawns──> sva-node witness --listen 127.0.0.1:W --data DIR/witness
//!                 ──spawns──> sva-node serve --config DIR/node-1.yaml   (portal 127.0.0.1:P1)
//!                 ──spawns──> sva-node serve --config DIR/node-2.yaml   (portal 127.0.0.1:P2) ...
//! ```
//!
//! Everything lives in one directory (default `./sva-demo`): the witness's records, the shared
//! secrets (mode 0600), each node's YAML config (so a node can be restarted by hand with
//! `sva-node serve --config`), its backing file (sparse), state directory and log. Ctrl-C (or
//! SIGTERM) stops every process the demo started.
//!
//! Started again on the same directory, the demo keeps the volume: a single-plex volume gets
//! fresh configs over the same backing file; a mirrored one is restarted exactly as it was
//! (witness with its records, every node from its `node-N.yaml`), and since restarted nodes
//! come back out of sync, resync brings them back (DESIGN.md §6) before their paths serve.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use sva_node::config::{
    Config, ControlConfig, MirrorSection, PlexSection, StoreConfig, TargetSection, VolumeConfig,
    WitnessSection,
};
use sva_node::scsi::lu::CacheMode;

/// Plexes a demo volume may have (DESIGN.md §5: 2-way or 3-way mirrors, or a single plex).
const PLEXES_MAX: u8 = 3;
/// How long a node may take to open its portal before the demo gives up.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long restarted mirrored nodes may take to resync and serve before the demo gives up.
const NODE_RESYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long stopped nodes get to finish in-flight I/O before they are killed.
const NODE_STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of plexes (one node process each).
    #[arg(long, default_value_t = 2)]
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

/// One started process: a node (plex `id`) or the witness (`id` 0).
struct Proc {
    id: u16,
    label: String,
    child: Child,
    /// Where it accepts connections once ready.
    ready_addr: SocketAddr,
    portal: SocketAddr,
    control: Option<SocketAddr>,
    config: Option<PathBuf>,
    log: PathBuf,
}

/// Addresses of one node, chosen before anything starts (every config lists every node).
struct NodePlan {
    id: u16,
    portal: SocketAddr,
    control: SocketAddr,
    peer: SocketAddr,
}

/// Set once Ctrl-C or SIGTERM arrived, so the (possibly long) start-up waits stop too.
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn stop_requested() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Watch for Ctrl-C/SIGTERM from now on (a thread with its own small runtime).
fn watch_signals() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        rt.block_on(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let term = signal(SignalKind::terminate());
            let int = signal(SignalKind::interrupt());
            let _ = ready_tx.send(());
            match (term, int) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                _ => std::future::pending::<()>().await,
            }
            STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    });
    let _ = ready_rx.recv();
    Ok(())
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.plexes == 0 || args.plexes > PLEXES_MAX {
        bail!("--plexes must be 1 to {PLEXES_MAX}");
    }
    watch_signals()?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    if dir.join("witness").exists() {
        return restart(&dir);
    }
    let uid = volume_uid(&dir)?;
    let exe = std::env::current_exe().context("locating the sva-node binary")?;
    let plan: Vec<NodePlan> = (1..=u16::from(args.plexes))
        .map(|id| {
            Ok(NodePlan {
                id,
                portal: free_port()?,
                control: free_port()?,
                peer: free_port()?,
            })
        })
        .collect::<anyhow::Result<_>>()?;

    let mut procs: Vec<Proc> = Vec::new();
    if let Err(e) = start_all(&args, &dir, &uid, &exe, &plan, &mut procs) {
        stop_all(&mut procs);
        return Err(e);
    }
    print_banner(args.size, args.cache_mode, &dir, &procs);
    run_until_stopped(&dir, procs)
}

/// Serve until Ctrl-C/SIGTERM or until the witness or the last node exits; then stop all.
fn run_until_stopped(dir: &Path, mut procs: Vec<Proc>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    if let Some((label, status, log)) = rt.block_on(wait_for_stop(&mut procs)) {
        eprintln!("{label} exited ({status}); see its log: {}", log.display());
    }
    eprintln!("stopping {} process(es)...", procs.len());
    stop_all(&mut procs);
    eprintln!("stopped; data kept in {}", dir.display());
    Ok(())
}

fn start_all(
    args: &DemoArgs,
    dir: &Path,
    uid: &str,
    exe: &Path,
    plan: &[NodePlan],
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    // The control API's token (POST /v1/verify, /v1/resync-rate), shared by the nodes.
    let token_file = write_secret(&dir.join("api-token"))?;
    let mirror = if plan.len() > 1 {
        let witness_secret = write_secret(&dir.join("witness-secret"))?;
        let replication_secret = write_secret(&dir.join("replication-secret"))?;
        let witness_addr = free_port()?;
        procs.push(spawn_witness(exe, dir, witness_addr, &witness_secret)?);
        Some(MirrorSection {
            listen: String::new(),
            secret_file: replication_secret,
            plexes: plan
                .iter()
                .map(|n| PlexSection {
                    id: n.id,
                    node: format!("demo-node-{}", n.id),
                    portal: n.portal.to_string(),
                    peer_addr: n.peer.to_string(),
                })
                .collect(),
            witness: WitnessSection::Standalone {
                address: witness_addr.to_string(),
                secret_file: witness_secret,
            },
            region_bytes: None,
            resync_bytes_per_sec: None,
            activity_log_regions: None,
            ack_spin_micros: None,
            op_spin_micros: None,
        })
    } else {
        None
    };
    for n in plan {
        let cfg = Config {
            volume: VolumeConfig {
                name: "demo".into(),
                uid: uid.to_string(),
                size_bytes: args.size,
                cache_mode: args.cache_mode,
            },
            target: TargetSection {
                iqn: DEMO_IQN.into(),
                portal: n.portal.to_string(),
                portal_group_tag: n.id,
                relative_target_port_id: n.id,
                target_port_group_id: n.id,
                alias: Some(format!("sva-demo-node-{}", n.id)),
                chap: None,
                allowed_initiators: Vec::new(),
                send_targets: Vec::new(),
            },
            store: StoreConfig {
                path: dir.join(format!("plex-{}.img", n.id)),
                create: true,
            },
            state_dir: dir.join(format!("state-{}", n.id)),
            control: Some(ControlConfig {
                listen: n.control.to_string(),
                token_file: Some(token_file.clone()),
            }),
            mirror: mirror.clone().map(|mut m| {
                m.listen = n.peer.to_string();
                m
            }),
        };
        let text = serde_yaml::to_string(&cfg).context("rendering node config")?;
        // Parse what we wrote: the demo must only write configs `serve` accepts.
        Config::parse(&text).context("rendered node config is invalid")?;
        let config = dir.join(format!("node-{}.yaml", n.id));
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        procs.push(spawn_node(
            exe,
            dir,
            n.id,
            config,
            n.portal,
            Some(n.control),
        )?);
    }
    for p in procs.iter_mut() {
        wait_until_ready(p, NODE_START_TIMEOUT)?;
    }
    Ok(())
}

/// A mirrored demo volume from an earlier run: start its witness (records kept) and every
/// node from its config, and wait while resync brings the nodes back.
fn restart(dir: &Path) -> anyhow::Result<()> {
    let mut configs = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("node-") && name.ends_with(".yaml") {
            let cfg = Config::load(&path)?;
            configs.push((cfg, path));
        }
    }
    configs.sort_by_key(|(c, _)| c.target.relative_target_port_id);
    let Some((first, _)) = configs.first() else {
        bail!(
            "{} holds a demo witness but no node-N.yaml configs; use a new --dir (or remove \
             this one to start over)",
            dir.display()
        );
    };
    let Some(WitnessSection::Standalone {
        address,
        secret_file,
    }) = first.mirror.as_ref().map(|m| m.witness.clone())
    else {
        bail!(
            "{}: node configs without a standalone witness",
            dir.display()
        );
    };
    let (size, cache_mode) = (first.volume.size_bytes, first.volume.cache_mode);
    println!(
        "{} holds a {}-plex demo volume from an earlier run: restarting its witness (records \
         kept) and nodes from their configs. Restarted nodes come back out of sync; resync \
         copies what changed, then their paths serve again (--plexes/--size/--cache-mode are \
         ignored).",
        dir.display(),
        configs.len()
    );
    let exe = std::env::current_exe().context("locating the sva-node binary")?;
    let witness_addr: SocketAddr = address
        .parse()
        .with_context(|| format!("witness address {address} in the node configs"))?;
    let mut procs = Vec::new();
    let started = (|| -> anyhow::Result<()> {
        procs.push(spawn_witness(&exe, dir, witness_addr, &secret_file)?);
        for (cfg, path) in &configs {
            let id = cfg.target.relative_target_port_id;
            let portal = cfg.portal_addr()?;
            let control = cfg
                .control
                .as_ref()
                .map(|c| c.listen.parse::<SocketAddr>())
                .transpose()
                .with_context(|| format!("control.listen in {}", path.display()))?;
            procs.push(spawn_node(&exe, dir, id, path.clone(), portal, control)?);
        }
        for p in procs.iter_mut() {
            if p.id > 0 {
                println!(
                    "waiting for node {} to resync and serve (status: http://{}/v1/status)...",
                    p.id,
                    p.control.map(|c| c.to_string()).unwrap_or_default()
                );
            }
            wait_until_ready(p, NODE_RESYNC_TIMEOUT)?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        stop_all(&mut procs);
        return Err(e);
    }
    print_banner(size, cache_mode, dir, &procs);
    run_until_stopped(dir, procs)
}

/// Start `sva-node witness` on `addr`, its records under `dir/witness`, logging to
/// `dir/witness.log`.
fn spawn_witness(exe: &Path, dir: &Path, addr: SocketAddr, secret: &Path) -> anyhow::Result<Proc> {
    let log = dir.join("witness.log");
    let child = Command::new(exe)
        .arg("witness")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data")
        .arg(dir.join("witness"))
        .arg("--secret-file")
        .arg(secret)
        .stdin(Stdio::null())
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?)
        .spawn()
        .context("starting the witness")?;
    Ok(Proc {
        id: 0,
        label: "witness".into(),
        child,
        ready_addr: addr,
        portal: addr,
        control: None,
        config: None,
        log,
    })
}

/// Start `sva-node serve --config config` as node `id`, logging to `dir/node-<id>.log`.
fn spawn_node(
    exe: &Path,
    dir: &Path,
    id: u16,
    config: PathBuf,
    portal: SocketAddr,
    control: Option<SocketAddr>,
) -> anyhow::Result<Proc> {
    let log = dir.join(format!("node-{id}.log"));
    let child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file(&log)?)
        .stderr(log_file(&log)?)
        .spawn()
        .with_context(|| format!("starting node {id}"))?;
    Ok(Proc {
        id,
        label: format!("node {id}"),
        child,
        ready_addr: portal,
        portal,
        control,
        config: Some(config),
        log,
    })
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A random 32-byte secret as hex, in a file only the owner can read.
fn write_secret(path: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// The target name every node of the demo volume serves (DESIGN.md §4: same IQN on every node).
const DEMO_IQN: &str = "iqn.2026-11.io.sva:demo";

fn print_banner(size: u64, cache_mode: CacheMode, dir: &Path, procs: &[Proc]) {
    let nodes: Vec<&Proc> = procs.iter().filter(|p| p.id > 0).collect();
    println!(
        "SVA demo volume: {} bytes, {} plex(es), cacheMode {:?}, files in {}",
        size,
        nodes.len(),
        cache_mode,
        dir.display()
    );
    for p in procs.iter().filter(|p| p.id == 0) {
        println!("  witness {}   pid {}", p.portal, p.child.id());
    }
    for n in &nodes {
        println!(
            "  path {}: iscsi://{}/{DEMO_IQN}/0   pid {}   status http://{}/v1/status   config {}",
            n.id,
            n.portal,
            n.child.id(),
            n.control.map(|c| c.to_string()).unwrap_or_default(),
            n.config
                .as_ref()
                .map(|c| c.display().to_string())
                .unwrap_or_default()
        );
    }
    if let Some(n) = nodes.first() {
        let url = format!("iscsi://{}/{DEMO_IQN}/0", n.portal);
        println!("Try it:");
        println!("  iscsi-inq {url}");
        println!("  qemu-io -f raw -c 'write -P 0x11 1M 4k' {url}");
        if let Some(m) = nodes.get(1) {
            let other = format!("iscsi://{}/{DEMO_IQN}/0", m.portal);
            println!("  qemu-io -f raw -c 'read -P 0x11 1M 4k' {other}    # the write, read through path {}", m.id);
            println!(
                "  kill -9 {}    # lose node {}: after about a second, I/O through path {} carries on",
                m.child.id(),
                m.id,
                n.id
            );
            if let Some(cfg) = &m.config {
                println!(
                    "  sva-node serve --config {} >> {} 2>&1 &    # bring it back: resync copies what changed",
                    cfg.display(),
                    m.log.display()
                );
            }
        }
        println!("  iscsi-test-cu --dataloss -t ALL {url}");
        if let Some(c) = n.control {
            println!(
                "  curl -H \"Authorization: Bearer $(cat {})\" -d '{{\"repair\":false}}' http://{c}/v1/verify    # compare the plexes online",
                dir.join("api-token").display()
            );
        }
    }
    println!(
        "Ctrl-C stops everything; the data stays in {}.",
        dir.display()
    );
}

/// Waits for Ctrl-C/SIGTERM (`None`), or for a process to exit on its own: the demo then
/// reports it and stops the rest. A killed node is the failover experiment, so only the
/// witness or the last node exiting ends the demo.
async fn wait_for_stop(procs: &mut [Proc]) -> Option<(String, std::process::ExitStatus, PathBuf)> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut gone: Vec<u16> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return None,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => return None,
            _ = tick.tick() => {
                if stop_requested() {
                    return None;
                }
                let nodes = procs.iter().filter(|p| p.id > 0).count();
                for p in procs.iter_mut() {
                    if gone.contains(&p.id) {
                        continue;
                    }
                    if let Ok(Some(status)) = p.child.try_wait() {
                        gone.push(p.id);
                        let last_node = p.id > 0 && gone.iter().filter(|&&g| g > 0).count() == nodes;
                        if p.id == 0 || last_node {
                            return Some((p.label.clone(), status, p.log.clone()));
                        }
                        eprintln!("{} exited ({status}); the other paths carry on. Its log: {}", p.label, p.log.display());
                    }
                }
            }
        }
    }
}

fn wait_until_ready(node: &mut Proc, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if stop_requested() {
            bail!("interrupted while waiting for {}", node.label);
        }
        if let Some(status) = node.child.try_wait().context("checking node")? {
            let tail = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            bail!(
                "{} exited during start ({status}); last log lines:\n{}",
                node.label,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let portal_open =
            TcpStream::connect_timeout(&node.ready_addr, Duration::from_millis(200)).is_ok();
        // A node is ready when its portal is open and, if it has a control API, it reports
        // itself healthy (a mirrored node first needs its peers' read lease).
        if portal_open && node.control.is_none_or(healthy) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not open {} and report itself healthy within {:?}; see {}",
                node.label,
                node.ready_addr,
                timeout,
                node.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /healthz` answers 200.
fn healthy(control: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&control, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// SIGTERM every node, wait for a graceful exit, then SIGKILL what is left.
fn stop_all(nodes: &mut [Proc]) {
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

/// A free loopback TCP port below the ephemeral range (see `sva_node::port`), so the demo's
/// outgoing connections cannot take it before its node binds it, nor on a later restart.
fn free_port() -> anyhow::Result<SocketAddr> {
    let port = sva_node::port::free_loopback_port().context("finding a free loopback port")?;
    Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
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
