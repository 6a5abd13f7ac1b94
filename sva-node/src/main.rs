//! `sva-node` binary: `serve`, `demo`, `witness`.
//!
//! `serve --config FILE` wires one node: FileBackend → LogicalUnit → LocalTarget →
//! InstrumentedTarget (metrics) → iSCSI driver, plus the control API when configured, and
//! stops gracefully on SIGTERM/SIGINT. `demo` starts whole volumes of such processes
//! (see `demo.rs`).

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sva_node::config::Config;
use sva_node::control::{
    ControlState, InstrumentedTarget, Metrics, SingleNodeStatus, StatusSource,
};
use sva_node::mirror::boot::MirrorStatus;
use sva_node::mirror::node::MirroredTarget;
use sva_node::scsi::lu::{LocalTarget, LogicalUnit};
use sva_node::scsi::ScsiTarget;
use sva_node::store::file::FileBackend;
use sva_node::store::BlockBackend;

#[derive(Parser)]
#[command(
    name = "sva-node",
    version,
    about = "SVA data plane: a mirrored iSCSI volume node"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one volume over iSCSI as described by a YAML config.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a whole volume on this machine: one `serve` process per plex, configs in DIR,
    /// each path's iscsi:// URL printed; Ctrl-C stops everything it started.
    Demo(demo::DemoArgs),
    /// Run a standalone witness: the compare-and-swap store of volumes' membership records
    /// (DESIGN.md §5). Records persist under DIR; peers authenticate with a shared secret.
    Witness {
        /// Address to listen on, host:port.
        #[arg(long)]
        listen: String,
        /// Directory for the records (created if missing).
        #[arg(long)]
        data: PathBuf,
        /// File holding the shared secret (at least 16 bytes); default: env SVA_WITNESS_SECRET.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { config } => match serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sva-node: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Demo(args) => match demo::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sva-node demo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Witness {
            listen,
            data,
            secret_file,
        } => match witness(&listen, data, secret_file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sva-node witness: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating stateDir {}", cfg.state_dir.display()))?;
    let backend = FileBackend::open(&cfg.store.path, cfg.volume.size_bytes, cfg.store.create)
        .with_context(|| format!("opening store {}", cfg.store.path.display()))?;
    let backend: Arc<dyn BlockBackend> = Arc::new(backend);
    let lu_cfg = cfg.lu_config();
    let port_groups = lu_cfg.port_groups.clone();
    let lu = Arc::new(LogicalUnit::new(lu_cfg, backend));
    let metrics = Arc::new(Metrics::new());
    let node_name = format!("{}-{}", cfg.volume.name, cfg.target.relative_target_port_id);
    let token = match cfg.control.as_ref().and_then(|c| c.token_file.as_ref()) {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading control.tokenFile {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let iscsi_cfg = Arc::new(cfg.iscsi_target());
    let addr = cfg.portal_addr()?;

    let rt = serve_runtime()?;
    rt.block_on(async move {
        let mut mirror_node = None;
        let (local, status): (Arc<dyn ScsiTarget>, Arc<dyn StatusSource>) = match &cfg.mirror {
            None => {
                let status = Arc::new(SingleNodeStatus::new(
                    node_name,
                    &cfg.volume.name,
                    cfg.target.relative_target_port_id,
                    &cfg.target.portal,
                    metrics.clone(),
                ));
                status.set_serving();
                (Arc::new(LocalTarget::new(lu)), status)
            }
            Some(m) => {
                let node = sva_node::mirror::boot::start(&cfg, m, lu, port_groups, metrics.clone())
                    .await
                    .context("starting the mirror")?;
                mirror_node = Some(node.clone());
                let status = Arc::new(MirrorStatus::new(
                    node.clone(),
                    node_name,
                    cfg.volume.name.clone(),
                    m.resync_bytes_per_sec(),
                ));
                (Arc::new(MirroredTarget::new(node)), status)
            }
        };
        let target: Arc<dyn ScsiTarget> = Arc::new(InstrumentedTarget::new(local, metrics.clone()));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding iSCSI portal {addr}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        if let Some(c) = &cfg.control {
            let ctl = tokio::net::TcpListener::bind(&c.listen)
                .await
                .with_context(|| format!("binding control API {}", c.listen))?;
            let state = ControlState {
                metrics,
                status: status.clone(),
                token,
            };
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = sva_node::control::serve(ctl, state, shutdown).await {
                    tracing::error!("control API: {e}");
                }
            });
        }
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; shutting down");
            let _ = stop_tx.send(true);
        });
        tracing::info!(portal = %addr, iqn = %iscsi_cfg.iqn, "serving");
        let served = sva_node::iscsi::driver::serve(listener, iscsi_cfg, target, stop_rx)
            .await
            .context("iSCSI target");
        if let Some(node) = mirror_node {
            // Lazy bitmap clears: persist them so a restart resyncs no more than needed.
            let _ = tokio::task::spawn_blocking(move || node.flush_state()).await;
        }
        served
    })
}

/// Async worker threads of a serving node. One: the async side only moves PDUs and messages
/// (disk I/O runs on the blocking pool), and on the 2-core machines we measure on, a second
/// worker added cross-thread wake-ups: `sva-bench` 4 KiB write-back write IOPS vs tgt went
/// from 0.92 to 0.94–1.00 at QD1 and from 1.17 to 1.51–1.69 at QD32 with one worker (same
/// runs, 2026-11-25), reads unchanged.
/// `TOKIO_WORKER_THREADS` overrides it.
const SERVE_WORKER_THREADS: usize = 1;

/// Most threads in a serving node's blocking pool (disk I/O: applies, off-thread commands,
/// resync copies), against tokio's default of 512. The pool starts a thread whenever none is
/// idle at a spawn, so a burst of work grows it: in about one full resync in ten on the 2-vCPU
/// test VM the learner reached 224–514 threads, each copy thread with its own 2 MiB staging
/// buffer (up to 980 MiB resident). Those were most likely the runs whose first copies were
/// dropped on a link not yet up and came back in one retransmitted burst (fixed since by
/// `Engine::link_up`; README, "Resync and verify"); the cap bounds any such burst. Above it,
/// blocking work queues; 64 covers a QD32 initiator on each of two paths plus the resync
/// window.
const SERVE_BLOCKING_THREADS_MAX: usize = 64;

fn serve_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        b.worker_threads(SERVE_WORKER_THREADS);
    }
    b.max_blocking_threads(SERVE_BLOCKING_THREADS_MAX);
    b.enable_all().build().context("starting tokio")
}

fn witness(listen: &str, data: PathBuf, secret_file: Option<PathBuf>) -> anyhow::Result<()> {
    let secret = sva_node::witness::load_secret(secret_file.as_deref())
        .context("loading the witness secret (--secret-file or SVA_WITNESS_SECRET)")?;
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(sva_node::witness::run(listen, data, secret))
        .with_context(|| format!("witness on {listen}"))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
