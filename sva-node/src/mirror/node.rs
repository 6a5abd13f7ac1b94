//! The tokio driver of the mirror engine, and [`MirroredTarget`]: the `ScsiTarget` a mirrored
//! node hands to the iSCSI layer.
//!
//! ```text
//!  iSCSI ──ScsiCommand──> MirroredTarget ── admit (UA, ALUA) ── LogicalUnit
//!                           │ read: read lease held? ──> execute locally
//!                           │ state-changing: submit ──> Engine ──Send──> links ──> peers
//!                           │                              │ Apply ──> spawn_blocking(execute_admitted) ──> applied
//!                           │ <── Complete(response) ──────┘ WitnessCas ──> Witness ──> witness_result
//!                                                            PathState ──> PortGroups (RTPG, 2A/06)
//! ```
//!
//! The engine lives behind one mutex. Every input (a submitted op, a peer message, an applied
//! op, a witness answer, a timer tick) locks it, feeds it, and runs the commands it emits in
//! order while still holding the lock; each of those is non-blocking (queue a message, spawn
//! the apply or the CAS, answer a waiting initiator), so the lock is held for microseconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, Notify};

use super::engine::{Command, Config as EngineConfig, Engine, Millis, OpId, Outcome, PathState};
use super::link::{self, Inbound, LinkConfig, Links};
use super::msg::{OpMeta, PAYLOAD_BYTES_MAX};
use super::op::{self, ReplicatedOp};
use crate::scsi::alua::{AluaState, PortGroup, PortGroups};
use crate::scsi::lu::{run_off_thread, Admission, LogicalUnit};
use crate::scsi::sense::asc;
use crate::scsi::{
    cdb, NexusId, ScsiCommand, ScsiError, ScsiResponse, ScsiTarget, SenseKey, TaskManagement,
    TmfResponse,
};
use crate::witness::{Membership, PlexState, Witness};

/// Peer messages waiting for the engine before the links stop reading.
const INBOUND_QUEUE_MAX: usize = 16 * 1024;
/// Shortest pause between two timer runs of the engine.
const TIMER_TICK_MIN: Duration = Duration::from_millis(5);
/// Longest a witness call may take before the engine is told the witness is unreachable.
const WITNESS_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything the driver shares between tasks.
struct Shared {
    engine: Mutex<Engine>,
    lu: Arc<LogicalUnit>,
    port_groups: Arc<PortGroups>,
    links: Links,
    witness: Arc<dyn Witness>,
    volume: String,
    started: Instant,
    waiting: Mutex<HashMap<OpId, oneshot::Sender<Outcome>>>,
    next_op: std::sync::atomic::AtomicU64,
    timer: Notify,
    path: Mutex<PathState>,
}

/// A running mirror node; clone-cheap handle.
#[derive(Clone)]
pub struct MirrorNode {
    shared: Arc<Shared>,
}

/// What [`MirrorNode::start`] needs.
pub struct MirrorSetup {
    pub engine: EngineConfig,
    pub membership: Membership,
    pub start: super::engine::Start,
    pub lu: Arc<LogicalUnit>,
    pub port_groups: Arc<PortGroups>,
    pub witness: Arc<dyn Witness>,
    pub volume: String,
    pub links: LinkConfig,
    pub listener: tokio::net::TcpListener,
}

impl MirrorNode {
    /// Start the links, the engine's timer and its inbox. Must run inside a tokio runtime.
    pub fn start(s: MirrorSetup) -> MirrorNode {
        let (in_tx, in_rx) = mpsc::channel::<Inbound>(INBOUND_QUEUE_MAX);
        let links = link::start(s.links, s.listener, in_tx);
        let started = Instant::now();
        let engine = Engine::new(s.engine, s.membership, 0, s.start);
        let node = MirrorNode {
            shared: Arc::new(Shared {
                engine: Mutex::new(engine),
                lu: s.lu,
                port_groups: s.port_groups,
                links,
                witness: s.witness,
                volume: s.volume,
                started,
                waiting: Mutex::new(HashMap::new()),
                next_op: std::sync::atomic::AtomicU64::new(1),
                timer: Notify::new(),
                path: Mutex::new(PathState::Unavailable),
            }),
        };
        // Run what the engine emitted at construction (its first path state).
        node.with_engine(|_, _| {});
        tokio::spawn(node.clone().inbox(in_rx));
        tokio::spawn(node.clone().timer());
        node
    }

    fn now(&self) -> Millis {
        self.shared.started.elapsed().as_millis() as Millis
    }

    /// Lock the engine, feed it, and run every command it emits.
    fn with_engine<R>(&self, f: impl FnOnce(&mut Engine, Millis) -> R) -> R {
        let now = self.now();
        let mut e = lock(&self.shared.engine);
        let r = f(&mut e, now);
        let mut timer_changed = false;
        while let Some(cmd) = e.poll_command() {
            timer_changed = true;
            self.dispatch(&e, cmd);
        }
        drop(e);
        if timer_changed {
            self.shared.timer.notify_one();
        }
        r
    }

    fn dispatch(&self, e: &Engine, cmd: Command) {
        match cmd {
            Command::Send { to, msg } => self.shared.links.send(to, msg),
            Command::Apply { seq, op, .. } => {
                let node = self.clone();
                tokio::task::spawn_blocking(move || {
                    let response = node.apply(op);
                    node.with_engine(|e, now| e.applied(now, seq, response));
                });
            }
            Command::Complete { op, outcome } => {
                if let Some(tx) = lock(&self.shared.waiting).remove(&op) {
                    let _ = tx.send(outcome);
                }
            }
            Command::WitnessCas {
                expected_epoch,
                record,
            } => {
                let node = self.clone();
                tokio::spawn(async move {
                    let volume = node.shared.volume.clone();
                    let call = node
                        .shared
                        .witness
                        .cas(&volume, Some(expected_epoch), record);
                    let result = match tokio::time::timeout(WITNESS_CALL_TIMEOUT, call).await {
                        Ok(r) => r,
                        Err(_) => Err(crate::witness::WitnessError::Unreachable(
                            "witness call timed out".into(),
                        )),
                    };
                    if let Err(err) = &result {
                        tracing::warn!("witness CAS from epoch {expected_epoch}: {err}");
                    }
                    node.with_engine(|e, now| e.witness_result(now, result));
                });
            }
            Command::PathState(p) => {
                tracing::info!(epoch = e.epoch(), path = ?p, "path state");
                *lock(&self.shared.path) = p;
                self.publish_port_groups(e.membership(), e.me(), p);
            }
            Command::Settled { .. } => {}
            // Resync and verify: the resync issue's driver work.
            Command::CopyOut { .. }
            | Command::CopyIn { .. }
            | Command::Checksum { .. }
            | Command::MarkDirtyRegions { .. }
            | Command::ClearDirtyRegions { .. }
            | Command::DropBitmap { .. }
            | Command::ActivityLogAbsorbed => {
                tracing::debug!("resync command not handled yet");
            }
        }
    }

    /// Every node reports every group of the volume (DESIGN.md §4): ours from the engine's path
    /// state, the others from the membership record.
    fn publish_port_groups(&self, m: &Membership, me: u16, mine: PathState) {
        let groups = m
            .plexes
            .iter()
            .map(|p| PortGroup {
                id: p.id,
                relative_ports: vec![p.id],
                state: if p.id == me {
                    mine.into()
                } else if p.state == PlexState::InSync {
                    AluaState::ActiveOptimized
                } else {
                    AluaState::Unavailable
                },
                preferred: false,
            })
            .collect();
        self.shared.port_groups.set_groups(groups);
    }

    /// Apply one ordered op on the local LU (runs on a blocking thread).
    fn apply(&self, meta: OpMeta) -> Bytes {
        let lu = &self.shared.lu;
        let response = match ReplicatedOp::decode(meta.payload) {
            Ok(ReplicatedOp::Command { nexus, cmd }) => lu.execute_admitted(&nexus, &cmd),
            Ok(ReplicatedOp::Reset { nexus, lun, tmf }) => {
                let r = lu.task_management(&nexus, lun, &tmf);
                tracing::debug!(?tmf, ?r, "replicated reset applied");
                ScsiResponse::good()
            }
            Ok(ReplicatedOp::NexusLost { nexus }) => {
                lu.nexus_removed(&nexus);
                ScsiResponse::good()
            }
            Err(e) => {
                tracing::error!("undecodable replicated op: {e}");
                ScsiResponse::target_failure()
            }
        };
        op::encode_response(&response)
    }

    /// Order `op` across the volume and wait for it to be applied on every in-sync plex.
    async fn replicate(&self, op: ReplicatedOp) -> Outcome {
        let Some(range) = op.range() else {
            // An UNMAP/XCOPY spread over more than 2^32 blocks: its covering range cannot be
            // recorded in the dirty map, so it is refused rather than risk a missed resync.
            return Outcome::Done(op::encode_response(
                &ScsiError::invalid_field_in_param().to_response(),
            ));
        };
        let meta = OpMeta {
            range,
            payload: op.encode(),
        };
        if meta.payload.len() > PAYLOAD_BYTES_MAX {
            // The transport already refuses writes this large; never put one on the link.
            return Outcome::Done(op::encode_response(
                &ScsiError::invalid_field_in_cdb().to_response(),
            ));
        }
        let id = OpId(
            self.shared
                .next_op
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.waiting).insert(id, tx);
        self.with_engine(|e, now| e.submit(now, id, meta));
        rx.await.unwrap_or(Outcome::Retry)
    }

    /// The sense for a command this node cannot complete now: Transitioning makes the
    /// initiator retry the same path; Unavailable makes it fail over (DESIGN.md §4).
    fn retry_response(&self) -> ScsiResponse {
        let a = match *lock(&self.shared.path) {
            PathState::Unavailable => asc::ALUA_UNAVAILABLE,
            _ => asc::ALUA_TRANSITIONING,
        };
        ScsiError::check(SenseKey::NotReady, a).to_response()
    }

    /// Current engine facts for status reporting.
    /// Whether the node serves I/O right now: its path is Active/Optimized and it holds the
    /// read lease (right after start the lease needs one heartbeat round trip).
    pub fn serving(&self) -> bool {
        let now = self.now();
        let e = lock(&self.shared.engine);
        *lock(&self.shared.path) == PathState::ActiveOptimized && e.can_serve_reads(now)
    }

    pub fn status(&self) -> (u64, PathState, Membership) {
        let e = lock(&self.shared.engine);
        let path = *lock(&self.shared.path);
        (e.epoch(), path, e.membership().clone())
    }

    async fn inbox(self, mut rx: mpsc::Receiver<Inbound>) {
        while let Some((from, msg)) = rx.recv().await {
            self.with_engine(|e, now| e.handle_message(now, from, msg));
        }
    }

    async fn timer(self) {
        loop {
            let next = lock(&self.shared.engine).next_timeout();
            let now = self.now();
            match next {
                Some(t) if t <= now => {
                    self.with_engine(|e, now| e.handle_timeout(now));
                    // A deadline can stay in the past (a peer stays suspected while the CAS is
                    // out): never spin on it. Spinning without an await also starved the tasks
                    // this worker had queued, the witness call among them.
                    tokio::time::sleep(TIMER_TICK_MIN).await;
                }
                Some(t) => {
                    let wait = Duration::from_millis(t - now);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shared.timer.notified() => {}
                    }
                }
                None => self.shared.timer.notified().await,
            }
        }
    }
}

impl From<PathState> for AluaState {
    fn from(p: PathState) -> AluaState {
        match p {
            PathState::ActiveOptimized => AluaState::ActiveOptimized,
            PathState::Transitioning => AluaState::Transitioning,
            PathState::Unavailable => AluaState::Unavailable,
        }
    }
}

/// The `ScsiTarget` of a mirrored node.
pub struct MirroredTarget {
    node: MirrorNode,
}

impl MirroredTarget {
    pub fn new(node: MirrorNode) -> Self {
        MirroredTarget { node }
    }
}

impl ScsiTarget for MirroredTarget {
    fn execute(&self, nexus: NexusId, cmd: ScsiCommand) -> BoxFuture<'static, ScsiResponse> {
        let node = self.node.clone();
        async move {
            let lu = node.shared.lu.clone();
            if let Some(r) = lu.admit(&nexus, &cmd) {
                return r;
            }
            let replicated =
                cdb::is_state_changing(&cmd.cdb) || cdb::needs_flush_on_all_plexes(&cmd.cdb);
            if !replicated {
                let now = node.now();
                if !lock(&node.shared.engine).can_serve_reads(now) {
                    return node.retry_response();
                }
                return run_off_thread(lu, nexus, cmd, Admission::Done).await;
            }
            match node.replicate(ReplicatedOp::Command { nexus, cmd }).await {
                Outcome::Done(bytes) => op::decode_response(bytes).unwrap_or_else(|e| {
                    tracing::error!("undecodable local response: {e}");
                    ScsiResponse::target_failure()
                }),
                Outcome::Retry => node.retry_response(),
            }
        }
        .boxed()
    }

    fn task_management(
        &self,
        nexus: NexusId,
        lun: u64,
        tmf: TaskManagement,
    ) -> BoxFuture<'static, TmfResponse> {
        let node = self.node.clone();
        async move {
            match tmf {
                // Resets change replicated state (SCSI-2 reservation, mode pages, UAs on
                // every node): order them like any other state change.
                TaskManagement::LogicalUnitReset
                | TaskManagement::TargetWarmReset
                | TaskManagement::TargetColdReset => {
                    if lun != 0 && tmf == TaskManagement::LogicalUnitReset {
                        return TmfResponse::LunDoesNotExist;
                    }
                    match node
                        .replicate(ReplicatedOp::Reset { nexus, lun, tmf })
                        .await
                    {
                        Outcome::Done(_) => TmfResponse::Complete,
                        Outcome::Retry => TmfResponse::Rejected,
                    }
                }
                _ => node.shared.lu.task_management(&nexus, lun, &tmf),
            }
        }
        .boxed()
    }

    fn nexus_added(&self, nexus: NexusId) {
        self.node.shared.lu.nexus_added(&nexus);
    }

    fn nexus_removed(&self, nexus: NexusId) {
        // Releasing a SCSI-2 reservation is a replicated state change; nobody waits for it.
        let node = self.node.clone();
        tokio::spawn(async move {
            if let Outcome::Retry = node.replicate(ReplicatedOp::NexusLost { nexus }).await {
                tracing::debug!("nexus loss not replicated (node not serving)");
            }
        });
    }
}

/// The engine mutex is never held across a panic-prone call, but recover anyway.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
