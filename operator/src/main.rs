//! `sva-operator`: waits to be elected leader (one active replica, kube-lease-manager on a
//! Lease in `--lease-namespace`), then runs the MirroredVolume controller; serves `/metrics`
//! and `/healthz` all along. Losing leadership exits the process so Kubernetes restarts it as a
//! standby (never two active reconcilers).
use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};
use std::sync::Arc;
use sva_operator::controller::{self, Context, Settings, VOLUME_LABEL};
use sva_operator::crd::{MirroredVolume, Plex};
use sva_operator::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "SVA operator: reconciles MirroredVolume and Plex resources"
)]
struct Args {
    /// sva-node image for volumes that do not override it.
    #[arg(long, default_value = "sva-node:0.1.0")]
    node_image: String,
    /// First portal port handed to volumes without spec.portalPort (3 ports per volume).
    #[arg(long, default_value_t = sva_operator::plan::PORTAL_PORT_BASE)]
    portal_port_base: u16,
    /// Address of /metrics and /healthz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_listen: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "sva-system")]
    lease_namespace: String,
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    #[arg(long, default_value_t = 5)]
    lease_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sva_operator::telemetry::init();
    let args = Args::parse();
    if args.portal_port_base != sva_operator::plan::PORTAL_PORT_BASE {
        tracing::warn!(
            "--portal-port-base other than the default is not implemented yet; using {}",
            sva_operator::plan::PORTAL_PORT_BASE
        );
    }
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("bind {}", args.metrics_listen))?;
    tokio::spawn(serve_metrics(listener, metrics.clone()));

    let client = Client::try_default().await.context("kube client")?;
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("sva-operator-{}", std::process::id()));
    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "sva-operator-leader")
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(args.lease_duration_seconds)
            .with_grace(args.lease_grace_seconds)
            .build()
            .await
            .context("leader election")?;
    let (mut leader, _task) = manager.watch().await;
    tracing::info!(%identity, "waiting for leadership");
    while !*leader.borrow_and_update() {
        leader.changed().await.context("leader election stopped")?;
    }
    tracing::info!(%identity, "leader: starting controller");

    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics,
        Settings {
            node_image: args.node_image,
        },
    ));
    let owned = watcher::Config::default().labels(VOLUME_LABEL);
    let controller = Controller::new(
        Api::<MirroredVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Plex>::all(client.clone()), owned.clone())
    .owns(Api::<Pod>::all(client.clone()), owned)
    .shutdown_on_signal()
    .run(controller::reconcile, controller::error_policy, ctx)
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "reconcile");
        }
    });
    tokio::select! {
        _ = controller => tracing::info!("controller stopped"),
        _ = async { while leader.changed().await.is_ok() { if !*leader.borrow() { break; } } } => {
            anyhow::bail!("lost leadership; exiting so a standby takes over");
        }
    }
    Ok(())
}

/// Minimal HTTP server: `/metrics` (Prometheus text) and `/healthz`.
async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let req = String::from_utf8_lossy(buf.get(..n).unwrap_or_default());
            let (code, body) = if req.starts_with("GET /metrics") {
                ("200 OK", metrics.render())
            } else if req.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}
