//! What `/v1/status` and `/healthz` report: the [`StatusSource`] trait and a single-node
//! implementation, [`SingleNodeStatus`].
//!
//! The lead's node runtime (later: the mirror engine) implements [`StatusSource`]; the HTTP
//! server only reads it and forwards the few mutations the API offers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use super::ControlError;
use crate::scsi::alua::AluaState;
use crate::witness::PlexState;

/// Highest resync rate `POST /v1/resync-rate` accepts: 100 GiB/s, far above any disk or
/// link, so a typo (an extra few zeros) is caught rather than read as "unthrottled".
pub const RESYNC_BYTES_PER_SEC_MAX: u64 = 100 << 30;

/// Resync progress of one plex (DESIGN.md §6). All zero when no resync runs. The fields after
/// `bytes_per_sec` are optional on the wire so older nodes' reports still parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResyncProgress {
    /// Bytes of the regions to resync that are done.
    pub done_bytes: u64,
    /// Bytes of the regions to resync (dirty at the start plus any added since).
    pub total_bytes: u64,
    /// Recent copy rate.
    pub bytes_per_sec: u64,
    /// Payload bytes actually copied since the resync began (holes copy none).
    #[serde(default)]
    pub copied_bytes: u64,
    /// Seconds left at the recent rate; `None` when idle or no rate is known yet.
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// True for a full resync (new or wiped plex), false for an incremental one.
    #[serde(default)]
    pub full: bool,
    /// This node's part: `None` when it takes no part in this plex's resync.
    #[serde(default)]
    pub role: Option<crate::mirror::resync::ResyncRole>,
}

/// The last (or running) online verify, as `/v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyStatus {
    pub running: bool,
    pub regions_total: u64,
    pub regions_done: u64,
    /// Indices of regions whose checksums differed between plexes.
    pub mismatched_regions: Vec<u64>,
    /// Region size, to turn an index into a byte offset.
    pub region_bytes: u64,
}

/// One plex as `/v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlexStatus {
    pub id: u16,
    pub node: String,
    pub portal: String,
    pub state: PlexState,
    pub resync: ResyncProgress,
}

/// The node's view of its volume. Sessions and I/O counters are added by the server from
/// [`Metrics`]. `Deserialize` is for clients (the operator parses `/v1/status` into this type,
/// ignoring the extra fields), so the two sides cannot drift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    pub volume: String,
    pub epoch: u64,
    /// ALUA state of this node's target port group.
    pub alua_state: AluaState,
    pub plexes: Vec<PlexStatus>,
    /// Resync rate limit set through the API, if any (`null` = the configured default).
    pub resync_rate_limit_bytes_per_sec: Option<u64>,
    /// The last online verify this node ran (only the sequencer runs them).
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
}

/// Source of the node's status, health and the target of API mutations.
pub trait StatusSource: Send + Sync + 'static {
    /// A consistent-enough snapshot for people and the operator (not for decisions).
    fn status(&self) -> NodeStatus;
    /// `Ok` when the node is serving its volume; `Err(reason)` makes `/healthz` answer 503.
    fn health(&self) -> Result<(), String>;
    /// Store a new resync rate limit (already validated to `1..=RESYNC_BYTES_PER_SEC_MAX`).
    fn set_resync_rate(&self, bytes_per_sec: u64) -> Result<(), ControlError>;
    /// Start an online verify of every region across the in-sync plexes (`repair`: mark
    /// mismatched regions for resync). A node without a mirror cannot.
    fn start_verify(&self, repair: bool) -> Result<(), ControlError> {
        let _ = repair;
        Err(ControlError::Conflict(
            "online verify needs a mirrored volume (this node serves it alone)".into(),
        ))
    }
}

/// [`StatusSource`] of a node serving a volume alone: one plex, always InSync. Epoch, ALUA
/// state and the plex's state/resync are read from the [`Metrics`] gauges, so whoever sets
/// those (the mirror engine, later) changes `/metrics` and `/v1/status` together.
///
/// Starts *not serving* ("starting"); call [`set_serving`](Self::set_serving) once the iSCSI
/// portal is bound, so readiness probes do not route initiators to a node still starting.
pub struct SingleNodeStatus {
    node: String,
    volume: String,
    plex_id: u16,
    portal: String,
    metrics: Arc<Metrics>,
    /// 0 = not set through the API.
    resync_rate: AtomicU64,
    /// `None` = serving; `Some(reason)` otherwise.
    not_serving: Mutex<Option<String>>,
}

impl SingleNodeStatus {
    /// Registers plex `plex_id` as InSync in `metrics`. Epoch and ALUA state are left as
    /// `metrics` has them (a new [`Metrics`] is epoch 0, Active/Optimized).
    pub fn new(
        node: impl Into<String>,
        volume: impl Into<String>,
        plex_id: u16,
        portal: impl Into<String>,
        metrics: Arc<Metrics>,
    ) -> Self {
        if let Some(g) = metrics.plex(plex_id, PlexState::InSync) {
            g.set_state(PlexState::InSync);
        }
        SingleNodeStatus {
            node: node.into(),
            volume: volume.into(),
            plex_id,
            portal: portal.into(),
            metrics,
            resync_rate: AtomicU64::new(0),
            not_serving: Mutex::new(Some("starting".to_string())),
        }
    }

    pub fn set_serving(&self) {
        if let Ok(mut g) = self.not_serving.lock() {
            *g = None;
        }
    }

    pub fn set_not_serving(&self, reason: impl Into<String>) {
        if let Ok(mut g) = self.not_serving.lock() {
            *g = Some(reason.into());
        }
    }
}

impl StatusSource for SingleNodeStatus {
    fn status(&self) -> NodeStatus {
        let (state, resync) = match self.metrics.plex(self.plex_id, PlexState::InSync) {
            Some(g) => {
                let (done_bytes, total_bytes, bytes_per_sec) = g.resync();
                let progress = ResyncProgress {
                    done_bytes,
                    total_bytes,
                    bytes_per_sec,
                    ..ResyncProgress::default()
                };
                (g.state(), progress)
            }
            None => (PlexState::InSync, ResyncProgress::default()),
        };
        let rate = self.resync_rate.load(Ordering::Relaxed);
        NodeStatus {
            node: self.node.clone(),
            volume: self.volume.clone(),
            epoch: self.metrics.epoch(),
            alua_state: self.metrics.alua_state(),
            plexes: vec![PlexStatus {
                id: self.plex_id,
                node: self.node.clone(),
                portal: self.portal.clone(),
                state,
                resync,
            }],
            resync_rate_limit_bytes_per_sec: (rate != 0).then_some(rate),
            verify: None,
        }
    }

    fn health(&self) -> Result<(), String> {
        match self.not_serving.lock() {
            Ok(g) => match &*g {
                None => Ok(()),
                Some(reason) => Err(reason.clone()),
            },
            Err(_) => Err("status lock poisoned".to_string()),
        }
    }

    fn set_resync_rate(&self, bytes_per_sec: u64) -> Result<(), ControlError> {
        self.resync_rate.store(bytes_per_sec, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_reads_gauges_and_health() {
        let m = Arc::new(Metrics::new());
        let s = SingleNodeStatus::new("n1", "vol", 1, "127.0.0.1:3260", m.clone());
        assert_eq!(s.health(), Err("starting".to_string()));
        s.set_serving();
        assert_eq!(s.health(), Ok(()));

        let st = s.status();
        assert_eq!((st.epoch, st.alua_state), (0, AluaState::ActiveOptimized));
        assert_eq!(st.plexes.len(), 1);
        assert_eq!(st.plexes[0].state, PlexState::InSync);
        assert_eq!(st.resync_rate_limit_bytes_per_sec, None);

        m.set_epoch(3);
        m.set_alua_state(AluaState::Unavailable);
        s.set_resync_rate(1 << 20).expect("stored");
        s.set_not_serving("fenced");
        let st = s.status();
        assert_eq!((st.epoch, st.alua_state), (3, AluaState::Unavailable));
        assert_eq!(st.resync_rate_limit_bytes_per_sec, Some(1 << 20));
        assert_eq!(s.health(), Err("fenced".to_string()));
    }
}
