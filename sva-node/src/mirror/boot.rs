//! Starting a mirrored node from its config: secrets, the witness record, restart detection,
//! the replication listener, and the node's status for the control API.
//!
//! A node that has never served this volume starts as part of a new volume
//! ([`Start::Bootstrap`]); the first node to reach the witness creates the membership record
//! (epoch 1, every plex InSync), the others adopt it. A node that has served before (its
//! `stateDir/mirror-started` marker exists) lost its in-memory state in the restart, so it
//! starts out of sync ([`Start::Restart`]) and stays Unavailable until resynced: it never
//! serves data its peers may have overwritten meanwhile.
//!
//! Its state directory tells the resync what may differ ([`StateFiles::recover`]): the
//! activity log (regions this node may have written that its peers lack), the write-intent
//! bitmap of each plex that was stale, and whether the data is valid at all (the marker).
//! The activity log is created before the marker, so a node with the marker always has one
//! (a missing one is distrusted: every region).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{Config as EngineConfig, PathState, Start};
use super::link::LinkConfig;
use super::node::{shown_state, MirrorNode, MirrorSetup, ResyncView};
use super::persist::{PersistError, StateFiles};
use super::resync::ResyncRole;
use crate::config::{Config, KubernetesLeaseSection, MirrorSection, WitnessSection};
use crate::control::{
    ControlError, NodeStatus, PlexStatus, ResyncProgress, StatusSource, VerifyStatus,
};
use crate::scsi::alua::{AluaState, PortGroups};
use crate::scsi::lu::LogicalUnit;
use crate::witness::{
    load_secret, Membership, PlexRecord, PlexState, RemoteWitness, Witness, WitnessError,
};

/// How long a starting node keeps trying to reach the witness before giving up.
pub const BOOT_WITNESS_WAIT: Duration = Duration::from_secs(30);
/// Marker file (in `stateDir`) of a node that has served its volume before.
pub const STARTED_MARKER: &str = "mirror-started";
/// Marker file (in `stateDir`) of a new or wiped plex whose full resync has not finished:
/// written before [`STARTED_MARKER`], removed once the plex serves. A restart in between
/// asks every source for a full (not fresh) resync (`Recovered::full_pending`), so a source
/// that did not fill its bitmap for it — the first one died — does so first.
pub const FULL_PENDING_MARKER: &str = "full-resync-pending";

/// Why a mirrored node could not start.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("reading {what} secret {path}: {source}")]
    Secret {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("witness {address}: {source}")]
    Witness {
        address: String,
        source: WitnessError,
    },
    /// The config names a witness this binary was built without.
    #[error(
        "mirror.witness.kubernetesLease needs an sva-node built with the `kubernetes` feature \
         (cargo build -p sva-node --features kubernetes); this binary has no Lease witness"
    )]
    FeatureMissing,
    #[error("binding replication listener {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Marker {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the witness record of volume {volume} does not list plex {plex}")]
    NotAMember { volume: String, plex: u16 },
    #[error("resync state in the state directory: {0}")]
    State(#[from] PersistError),
}

/// Start the mirror node of `cfg` (which must have a `mirror` section).
pub async fn start(
    cfg: &Config,
    m: &MirrorSection,
    lu: Arc<LogicalUnit>,
    port_groups: Arc<PortGroups>,
    metrics: Arc<crate::control::Metrics>,
) -> Result<MirrorNode, BootError> {
    let me = cfg.target.relative_target_port_id;
    let secret = |what, path: &PathBuf| {
        load_secret(Some(path)).map_err(|source| BootError::Secret {
            what,
            path: path.clone(),
            source,
        })
    };
    let replication_secret = secret("replication", &m.secret_file)?;
    let witness: Arc<dyn Witness> = match &m.witness {
        WitnessSection::Standalone {
            address,
            secret_file,
        } => Arc::new(RemoteWitness::new(
            address.clone(),
            secret("witness", secret_file)?,
        )),
        WitnessSection::KubernetesLease(lease) => lease_witness(&cfg.volume.name, lease).await?,
    };
    let membership = join_record(cfg, m, witness.as_ref()).await?;
    if !membership.plexes.iter().any(|p| p.id == me) {
        return Err(BootError::NotAMember {
            volume: cfg.volume.name.clone(),
            plex: me,
        });
    }
    let marker = cfg.state_dir.join(STARTED_MARKER);
    let pending = cfg.state_dir.join(FULL_PENDING_MARKER);
    let data_valid = marker.exists();
    let block_size = lu.config().block_size;
    let volume_bytes = lu.block_count() * u64::from(block_size);
    let (state, mut recovered) = StateFiles::recover(
        &cfg.state_dir,
        m.region_bytes(),
        volume_bytes,
        m.activity_log_regions(),
        data_valid,
    )?;
    recovered.full_pending = data_valid && pending.exists();
    let start = if data_valid {
        tracing::warn!(
            "this node served volume {} before and lost its state in the restart: \
             it stays out of sync (Unavailable) until resynced ({} activity-log region(s), \
             bitmaps for plexes {:?})",
            cfg.volume.name,
            recovered.activity_log.len(),
            recovered.bitmaps.keys().collect::<Vec<_>>()
        );
        Start::Restart(recovered)
    } else {
        // The (empty) activity log exists now: only then may the marker say "served". A new
        // volume's plex (InSync in the record) holds valid data at once. A new or wiped plex
        // joining an existing volume holds nothing yet: its marker waits until a source has
        // accepted it (see `mark_valid_once_accepted`), or a crash before that would come back
        // claiming valid data and get a partial resync instead of a full one.
        if in_sync_in(&membership, me) {
            write_marker(&marker)?;
        } else {
            write_marker(&pending)?;
        }
        Start::Bootstrap
    };
    let defer_marker = !marker.exists();
    let full_pending = pending.exists();
    let listener = tokio::net::TcpListener::bind(&m.listen)
        .await
        .map_err(|source| BootError::Listen {
            addr: m.listen.clone(),
            source,
        })?;
    let mut engine = EngineConfig::new(me);
    engine.block_size = block_size;
    engine.region_bytes = m.region_bytes();
    // A full resync and a verify cover the whole volume.
    engine.volume_blocks = lu.block_count();
    let node = MirrorNode::start(MirrorSetup {
        engine,
        membership,
        start,
        lu,
        port_groups,
        witness,
        volume: cfg.volume.name.clone(),
        links: LinkConfig {
            me,
            volume: cfg.volume.name.clone(),
            secret: Arc::new(replication_secret),
            peers: m
                .plexes
                .iter()
                .filter(|p| p.id != me)
                .map(|p| (p.id, p.peer_addr.clone()))
                .collect(),
            op_spin: m.op_spin(super::spin::op_spin_default),
        },
        listener,
        state: Arc::new(state),
        resync_bytes_per_sec: m.resync_bytes_per_sec(),
        ack_spin: m.ack_spin(),
        metrics,
    });
    if defer_marker || full_pending {
        tokio::spawn(mark_valid_once_accepted(
            node.clone(),
            defer_marker.then_some(marker),
            pending,
        ));
    }
    Ok(node)
}

/// Whether plex `me` is InSync in `m`.
fn in_sync_in(m: &Membership, me: u16) -> bool {
    m.plexes
        .iter()
        .any(|p| p.id == me && p.state == PlexState::InSync)
}

/// How often a joining plex checks whether a source accepted it.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// Write the `mirror-started` marker of a new or wiped plex once a source accepted it as a
/// resync target (the source's bitmap then covers every region) or it is serving; remove the
/// `full-resync-pending` marker once it serves (its full resync finished).
async fn mark_valid_once_accepted(node: MirrorNode, mut marker: Option<PathBuf>, pending: PathBuf) {
    loop {
        tokio::time::sleep(ACCEPT_POLL).await;
        let serving = node.status().1 == PathState::ActiveOptimized;
        let target = node
            .resync_views()
            .values()
            .any(|v| v.role == ResyncRole::Target);
        if target || serving {
            if let Some(m) = marker.take() {
                let shown = m.display().to_string();
                if off_async_thread(move || write_marker(&m)).await {
                    tracing::info!("accepted for resync: {shown} written");
                }
            }
        }
        if serving && marker.is_none() {
            off_async_thread(move || remove_marker(&pending)).await;
            return;
        }
    }
}

/// Run a marker write or removal on a blocking thread and log its failure; `true` if it
/// succeeded. Markers are made durable with `fsync`s, which wait behind a resync's own writes
/// and journal commits: on the node's one async thread they would stop its link reads and
/// acks meanwhile (and they run right as a full resync starts).
async fn off_async_thread(f: impl FnOnce() -> Result<(), BootError> + Send + 'static) -> bool {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            false
        }
        Err(e) => {
            tracing::error!("marker update: {e}");
            false
        }
    }
}

/// Remove a marker file durably (a missing one is fine).
fn remove_marker(path: &std::path::Path) -> Result<(), BootError> {
    let err = |source| BootError::Marker {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// The in-cluster witness of `mirror.witness.kubernetesLease`.
#[cfg(feature = "kubernetes")]
async fn lease_witness(
    volume: &str,
    lease: &KubernetesLeaseSection,
) -> Result<Arc<dyn Witness>, BootError> {
    let w =
        crate::witness::LeaseWitness::from_config(volume, lease.namespace.as_deref(), &lease.name)
            .await
            .map_err(|source| BootError::Witness {
                address: format!("lease {}", lease.name),
                source,
            })?;
    Ok(Arc::new(w))
}

/// Without the `kubernetes` feature there is no Lease witness: refuse clearly at boot.
#[cfg(not(feature = "kubernetes"))]
async fn lease_witness(
    _volume: &str,
    _lease: &KubernetesLeaseSection,
) -> Result<Arc<dyn Witness>, BootError> {
    Err(BootError::FeatureMissing)
}

/// The volume's current record, creating it (epoch 1, every plex InSync) if none exists.
async fn join_record(
    cfg: &Config,
    m: &MirrorSection,
    witness: &dyn Witness,
) -> Result<Membership, BootError> {
    let deadline = Instant::now() + BOOT_WITNESS_WAIT;
    let volume = &cfg.volume.name;
    let initial = Membership {
        epoch: 1,
        plexes: m
            .plexes
            .iter()
            .map(|p| PlexRecord {
                id: p.id,
                node: p.node.clone(),
                portal: p.portal.clone(),
                peer_addr: p.peer_addr.clone(),
                state: PlexState::InSync,
            })
            .collect(),
        sequencer: m.plexes.iter().map(|p| p.id).min().unwrap_or(1),
    };
    loop {
        let attempt = match witness.get(volume).await {
            Ok(Some(rec)) => Ok(rec),
            Ok(None) => match witness.cas(volume, None, initial.clone()).await {
                Ok(rec) => {
                    tracing::info!(volume, "created the volume's membership record (epoch 1)");
                    Ok(rec)
                }
                Err(WitnessError::Conflict(rec)) => Ok(*rec),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match attempt {
            Ok(rec) => return Ok(rec),
            Err(e @ (WitnessError::Unreachable(_) | WitnessError::Protocol(_)))
                if Instant::now() < deadline =>
            {
                tracing::warn!("witness {}: {e}; retrying", m.witness.describe());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(source) => {
                return Err(BootError::Witness {
                    address: m.witness.describe(),
                    source,
                })
            }
        }
    }
}

fn write_marker(path: &std::path::Path) -> Result<(), BootError> {
    let err = |source| BootError::Marker {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::create(path).map_err(err)?;
    f.sync_all().map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// `/v1/status` and `/healthz` of a mirrored node.
pub struct MirrorStatus {
    pub node: MirrorNode,
    pub name: String,
    pub volume: String,
    /// Current resync throttle (0: unlimited): the config's at start, then the API's.
    pub resync_rate: std::sync::atomic::AtomicU64,
}

impl MirrorStatus {
    pub fn new(
        node: MirrorNode,
        name: String,
        volume: String,
        resync_bytes_per_sec: u64,
    ) -> MirrorStatus {
        MirrorStatus {
            node,
            name,
            volume,
            resync_rate: std::sync::atomic::AtomicU64::new(resync_bytes_per_sec),
        }
    }
}

/// A resync as `/v1/status` shows it.
pub fn resync_progress(v: &ResyncView) -> ResyncProgress {
    ResyncProgress {
        done_bytes: v.info.done_bytes,
        total_bytes: v.info.total_bytes,
        bytes_per_sec: v.bytes_per_sec,
        copied_bytes: v.info.copied_bytes,
        eta_seconds: v.eta_seconds,
        full: v.info.full,
        role: Some(v.role),
    }
}

impl StatusSource for MirrorStatus {
    fn status(&self) -> NodeStatus {
        let (epoch, path, membership) = self.node.status();
        let alua_state = AluaState::from(path);
        let rate = self.resync_rate.load(std::sync::atomic::Ordering::Relaxed);
        let resyncs = self.node.resync_views();
        let (verify, region_bytes) = self.node.verify_view();
        NodeStatus {
            node: self.name.clone(),
            volume: self.volume.clone(),
            epoch,
            alua_state,
            plexes: membership
                .plexes
                .iter()
                .map(|p| {
                    let view = resyncs.get(&p.id);
                    PlexStatus {
                        id: p.id,
                        node: p.node.clone(),
                        portal: p.portal.clone(),
                        state: shown_state(p.state, view.is_some_and(ResyncView::moving)),
                        resync: view.map(resync_progress).unwrap_or_default(),
                    }
                })
                .collect(),
            resync_rate_limit_bytes_per_sec: (rate > 0).then_some(rate),
            verify: (verify.running || verify.regions_total > 0).then(|| VerifyStatus {
                running: verify.running,
                regions_total: verify.regions_total,
                regions_done: verify.regions_done,
                mismatched_regions: verify.mismatched.clone(),
                region_bytes,
            }),
        }
    }

    fn health(&self) -> Result<(), String> {
        match self.node.status().1 {
            PathState::ActiveOptimized if self.node.serving() => Ok(()),
            PathState::ActiveOptimized => Err("waiting for the read lease from its peers".into()),
            p => Err(format!("path {:?}", AluaState::from(p))),
        }
    }

    fn set_resync_rate(&self, bytes_per_sec: u64) -> Result<(), ControlError> {
        self.resync_rate
            .store(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
        self.node.set_resync_rate(bytes_per_sec);
        Ok(())
    }

    fn start_verify(&self, repair: bool) -> Result<(), ControlError> {
        self.node
            .start_verify(repair)
            .map_err(ControlError::Conflict)
    }
}

#[cfg(all(test, not(feature = "kubernetes")))]
mod tests {
    use super::*;

    /// A binary without the `kubernetes` feature refuses a Lease witness, naming the feature.
    #[tokio::test]
    async fn lease_witness_without_the_feature_names_it() {
        let lease = KubernetesLeaseSection {
            namespace: None,
            name: "vol-sva-witness".into(),
        };
        let e = match lease_witness("vol", &lease).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("no Lease witness without the feature"),
        };
        assert!(e.contains("`kubernetes` feature"), "{e}");
        assert!(e.contains("--features kubernetes"), "{e}");
    }
}
