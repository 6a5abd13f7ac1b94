//! `sva-node` binary: `serve`, `demo`, `witness`.
//!
//! `serve --config FILE` wires one node: FileBackend → LogicalUnit → LocalTarget →
//! iSCSI driver, and stops gracefully on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sva_node::config::Config;
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
    /// Start a whole mirrored volume on this machine (not yet implemented).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
    /// Run a witness (not yet implemented).
    Witness {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
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
        Cmd::Demo { .. } | Cmd::Witness { .. } => {
            eprintln!("not yet");
            ExitCode::from(2)
        }
    }
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let cfg = Config::load(&path)?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating stateDir {}", cfg.state_dir.display()))?;
    let backend = FileBackend::open(&cfg.store.path, cfg.volume.size_bytes, cfg.store.create)
        .with_context(|| format!("opening store {}", cfg.store.path.display()))?;
    let backend: Arc<dyn BlockBackend> = Arc::new(backend);
    let lu = Arc::new(LogicalUnit::new(cfg.lu_config(), backend));
    let target: Arc<dyn ScsiTarget> = Arc::new(LocalTarget::new(lu));
    let iscsi_cfg = Arc::new(cfg.iscsi_target());
    let addr = cfg.portal_addr()?;

    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding iSCSI portal {addr}"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; shutting down");
            let _ = stop_tx.send(true);
        });
        sva_node::iscsi::driver::serve(listener, iscsi_cfg, target, stop_rx)
            .await
            .context("iSCSI target")
    })
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
