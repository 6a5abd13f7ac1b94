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
//! Resync (DESIGN.md §6, `resync.rs`): `MarkDirtyRegions` is made durable synchronously while
//! the engine lock is held, so it is on disk before any later `Apply`/`CopyIn` is even spawned.
//! Each `Apply` first puts its regions in the activity log (durably, on its blocking thread),
//! then writes; `Settled` lets them leave the log (lazily: at capacity, or after
//! [`ACTIVITY_LOG_IDLE`] untouched). A `CopyIn` is logged the same way, but leaves at the
//! first trim after it settled (see there). `CopyOut`, `CopyIn` and `Checksum`
//! run on blocking threads and feed `copied_out`/`applied`/`checksummed`. Bitmap clears are
//! flushed every [`BITMAP_FLUSH_INTERVAL`] and at shutdown. A monitor samples the engine's
//! resync and verify progress every [`MONITOR_INTERVAL`] for rates, logs and metrics.
//!
//! The engine lives behind one mutex. Every input (a submitted op, peer messages on the link's
//! reader task, an applied op, a witness answer, a timer tick) locks it, feeds it, and runs the
//! commands it emits in order while still holding the lock; each of those is non-blocking
//! (write or buffer a message, spawn the apply or the CAS, answer a waiting initiator), so the
//! lock is held for microseconds. No input hops through another task on its way in or out:
//! each hop is a thread wake-up on the write's critical path. An op that is the node's only
//! one in flight goes further: its submitter polls the links for the acks itself (up to
//! `mirror.ackSpinMicros`, and only while acks lately came within that), so the thread
//! never sleeps between sending the op and answering the initiator (`receive_acks_until`).
//! On the peer, the link's reader task polls for the next op the same way
//! (`mirror.opSpinMicros`; `link` module doc), so under a steady load no thread on either
//! node sleeps on a mirrored write's path.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, Notify};

use super::engine::{Command, Config as EngineConfig, Engine, Millis, OpId, Outcome, PathState};
use super::link::{self, Inbound, LinkConfig, Links};
use super::msg::{Message, OpMeta, OpRange, PlexId, PAYLOAD_BYTES_MAX};
use super::op::{self, ReplicatedOp};
use super::persist::StateFiles;
use super::resync::{CopyWhat, ResyncInfo, ResyncRole, VerifyInfo};
use super::spin::RecentWaits;
use crate::control::Metrics;
use crate::scsi::alua::{AluaState, PortGroup, PortGroups};
use crate::scsi::cdb::Opcode;
use crate::scsi::lu::{run_off_thread, Admission, LogicalUnit};
use crate::scsi::sense::asc;
use crate::scsi::{
    cdb, NexusId, ScsiCommand, ScsiError, ScsiResponse, ScsiTarget, SenseKey, TaskManagement,
    TmfResponse,
};
use crate::witness::{Membership, PlexState, Witness};

/// Shortest pause between two timer runs of the engine.
const TIMER_TICK_MIN: Duration = Duration::from_millis(5);
/// Longest a witness call may take before the engine is told the witness is unreachable.
const WITNESS_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Lazy bitmap clears reach the disk at least this often.
pub const BITMAP_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the monitor samples resync/verify progress (often enough that a short resync is
/// seen at all; a sample is one lock of the engine and a few small copies).
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(200);
/// A resync progress line is logged this often while a resync runs.
pub const RESYNC_LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Activity-log regions whose ops all settled leave the log after this long untouched.
pub const ACTIVITY_LOG_IDLE: Duration = Duration::from_secs(5);
/// The resync rate is the progress over this last stretch of time.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// One resync as status shows it: the engine's counts plus the driver's rate and ETA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncView {
    pub role: ResyncRole,
    pub info: ResyncInfo,
    pub bytes_per_sec: u64,
    pub eta_seconds: Option<u64>,
}

impl ResyncView {
    /// Data is moving (as opposed to the source waiting for the plex to come back): a target
    /// is copied to from the start, a source once anything was copied.
    pub fn moving(&self) -> bool {
        self.role == ResyncRole::Target || self.info.done_bytes > 0 || self.info.copied_bytes > 0
    }
}

/// The state `/v1/status` and `/metrics` show for a plex: the record's, except that a Stale
/// plex being copied to shows as Resyncing.
pub fn shown_state(recorded: PlexState, copying: bool) -> PlexState {
    match recorded {
        PlexState::Stale if copying => PlexState::Resyncing,
        s => s,
    }
}

/// Rate and log bookkeeping of one running resync.
#[derive(Debug)]
struct ResyncTrack {
    started: Instant,
    samples: VecDeque<(Instant, u64)>,
    last_log: Instant,
    /// `copied_bytes` already added to the metrics counter.
    counted: u64,
    /// Data moves (rather than the plex being away with regions marked).
    copying: bool,
    view: ResyncView,
}

#[derive(Debug, Default)]
struct Monitor {
    resyncs: BTreeMap<PlexId, ResyncTrack>,
    verify: VerifyInfo,
}

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
    state: Arc<StateFiles>,
    block_size: u32,
    metrics: Arc<Metrics>,
    monitor: Mutex<Monitor>,
    /// `Engine::reads_allowed_until` as of the last engine call (see `publish_lease`).
    read_lease_until: AtomicU64,
    /// Longest a lone op's submitter polls for its acks (`mirror.ackSpinMicros`).
    ack_spin: Duration,
    ack_wait: RecentWaits,
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
    /// Bitmaps and activity log (already recovered into `start`).
    pub state: Arc<StateFiles>,
    /// Resync throttle at start (0: unlimited).
    pub resync_bytes_per_sec: u64,
    /// Longest a lone op's submitter polls the links for its acks (0: never).
    pub ack_spin: Duration,
    pub metrics: Arc<Metrics>,
}

impl MirrorNode {
    /// Start the links (their readers feed the engine), the engine's timer and the background
    /// tasks. Must run inside a tokio runtime.
    pub fn start(s: MirrorSetup) -> MirrorNode {
        let links = Links::new(&s.links);
        let started = Instant::now();
        let block_size = s.engine.block_size;
        let mut engine = Engine::new(s.engine, s.membership, 0, s.start);
        engine.set_resync_rate(s.resync_bytes_per_sec);
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
                state: s.state,
                block_size,
                metrics: s.metrics,
                monitor: Mutex::new(Monitor::default()),
                read_lease_until: AtomicU64::new(0),
                ack_spin: s.ack_spin,
                ack_wait: RecentWaits::default(),
            }),
        };
        // Run what the engine emitted at construction (its first path state).
        node.with_engine(|_, _| {});
        let inbound = Arc::new(EngineInbound(Arc::downgrade(&node.shared)));
        link::start(s.links, &node.shared.links, s.listener, inbound);
        tokio::spawn(node.clone().timer());
        tokio::spawn(node.clone().flusher());
        tokio::spawn(node.clone().monitor());
        node
    }

    fn now(&self) -> Millis {
        self.shared.started.elapsed().as_millis() as Millis
    }

    /// Lock the engine, feed it, and run every command it emits.
    ///
    /// The `Apply`s it emits run after the lock is dropped (never inside it: an inline
    /// apply feeds `applied`, which locks the engine again): small write-back WRITEs at once
    /// on this thread, the rest on blocking threads. The engine only emits `Apply`s that do
    /// not overlap any op still being applied, so running them in any order is safe.
    fn with_engine<R>(&self, f: impl FnOnce(&mut Engine, Millis) -> R) -> R {
        let (r, applies) = self.engine_step(f);
        self.run_applies(applies);
        r
    }

    /// Lock the engine, feed it, run every command it emits but `Apply`, which it returns.
    fn engine_step<R>(&self, f: impl FnOnce(&mut Engine, Millis) -> R) -> (R, Vec<(u64, OpMeta)>) {
        let now = self.now();
        let mut applies = Vec::new();
        let mut e = lock(&self.shared.engine);
        let r = f(&mut e, now);
        let mut timer_changed = false;
        while let Some(cmd) = e.poll_command() {
            timer_changed = true;
            self.dispatch(&e, cmd, &mut applies);
        }
        self.publish_lease(&e);
        drop(e);
        if timer_changed {
            self.shared.timer.notify_one();
        }
        (r, applies)
    }

    /// Run `Apply`s the engine emitted: inline when they qualify (see [`Self::apply_inline`]),
    /// else on a blocking thread. Inline ones are reported to the engine together, and what
    /// it emits then is run the same way.
    fn run_applies(&self, mut applies: Vec<(u64, OpMeta)>) {
        while !applies.is_empty() {
            let mut done = Vec::new();
            for (seq, meta) in applies.drain(..) {
                let op = ReplicatedOp::decode(meta.payload);
                match self.apply_inline(seq, &op) {
                    Some(response) => done.push((seq, response)),
                    None => {
                        let node = self.clone();
                        tokio::task::spawn_blocking(move || {
                            node.before_write(seq);
                            let response = node.apply(op);
                            node.with_engine(|e, now| e.applied(now, seq, response));
                        });
                    }
                }
            }
            if done.is_empty() {
                break;
            }
            applies = self
                .engine_step(|e, now| {
                    for (seq, response) in done {
                        e.applied(now, seq, response);
                    }
                })
                .1;
        }
    }

    /// Apply op `seq` on this thread if it is a small write-back WRITE that will not wait:
    /// its activity-log regions are in the log already (no sync needed) and the LU takes
    /// it inline (`LogicalUnit::try_execute_admitted_inline_write`). `None`: run it on a
    /// blocking thread.
    fn apply_inline(
        &self,
        seq: u64,
        op: &Result<ReplicatedOp, op::OpDecodeError>,
    ) -> Option<Bytes> {
        let Ok(ReplicatedOp::Command { nexus, cmd }) = op else {
            return None;
        };
        // Only a WRITE can run inline (the LU checks the rest); spare the others the
        // activity-log lookup.
        let opcode = cmd.cdb.first().map(|&op| Opcode::from_u8(op));
        if !matches!(
            opcode,
            Some(Opcode::Write6 | Opcode::Write10 | Opcode::Write12 | Opcode::Write16)
        ) {
            return None;
        }
        // The activity log first (DESIGN.md §6): an op may only write once its regions are
        // durably logged.
        if !self.shared.state.op_before_write_without_io(seq) {
            return None;
        }
        let response = self
            .shared
            .lu
            .try_execute_admitted_inline_write(nexus, cmd)?;
        Some(op::encode_response(&response))
    }

    /// Publish the engine's read lease after an engine call, still under its lock: the
    /// lease only changes when the engine is fed, and it expires by time, which each read
    /// checks itself (`reads_allowed`).
    fn publish_lease(&self, e: &Engine) {
        self.shared
            .read_lease_until
            .store(e.reads_allowed_until(), Ordering::Release);
    }

    /// `Engine::can_serve_reads` without locking the engine.
    fn reads_allowed(&self) -> bool {
        self.now() < self.shared.read_lease_until.load(Ordering::Acquire)
    }

    fn dispatch(&self, e: &Engine, cmd: Command, applies: &mut Vec<(u64, OpMeta)>) {
        match cmd {
            Command::Send { to, msg } => self.shared.links.send(to, msg),
            Command::Apply { seq, op, .. } => {
                let regions = match op.range {
                    OpRange::Blocks(r) => self.shared.state.regions_of(
                        r.lba,
                        u64::from(r.blocks),
                        self.shared.block_size,
                    ),
                    OpRange::Barrier => Vec::new(),
                };
                self.shared.state.op_dispatched(seq, regions);
                applies.push((seq, op));
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
                tracing::debug!(expected_epoch, "witness CAS");
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
            Command::Settled { up_to } => self.shared.state.settled(up_to),
            Command::CopyOut { seq, what } => {
                let node = self.clone();
                tokio::task::spawn_blocking(move || {
                    let lu = &node.shared.lu;
                    let data = match what {
                        CopyWhat::Region { range, .. } => {
                            lu.read_blocks_for_copy(range.lba, u64::from(range.blocks))
                        }
                        CopyWhat::LuState => Ok(lu.replicated_state()),
                    };
                    match data {
                        Ok(data) => node.feed_copy(|e, now| e.copied_out(now, seq, data)),
                        // Sending anything else would corrupt the target; the copy stalls
                        // until the target is dropped and rejoins.
                        Err(err) => tracing::error!("resync copy {seq} ({what:?}): read: {err}"),
                    }
                });
            }
            Command::CopyIn { seq, what, data } => {
                // Logged like an op until it settles (DESIGN.md §6): the copied data may
                // carry ops only the source applied so far. If the source and this node
                // crash before those reach the other in-sync plexes, one of those may recover
                // as the next source, and its bitmap for this plex lacks the region (it never
                // applied them): only this log reports it (sim seed 4139). Settled copies
                // leave the log at the next trim, so a restart re-copies few of them.
                if let CopyWhat::Region { range, .. } = what {
                    let regions = self.shared.state.regions_of(
                        range.lba,
                        u64::from(range.blocks),
                        self.shared.block_size,
                    );
                    self.shared.state.copy_dispatched(seq, regions);
                }
                let node = self.clone();
                tokio::task::spawn_blocking(move || {
                    let lu = &node.shared.lu;
                    let result = match what {
                        CopyWhat::Region { range, .. } => {
                            node.before_write(seq);
                            lu.write_blocks_for_copy(range.lba, u64::from(range.blocks), &data)
                        }
                        CopyWhat::LuState => lu
                            .install_replicated_state(&data)
                            .map_err(std::io::Error::other),
                    };
                    match result {
                        Ok(()) => {
                            tracing::debug!(seq, "resync copy written");
                            node.feed_copy(|e, now| e.applied(now, seq, Bytes::new()))
                        }
                        // Never claim a copy that is not on disk: the copy stays unapplied and
                        // the source keeps the region dirty.
                        Err(err) => tracing::error!("resync copy {seq} ({what:?}): write: {err}"),
                    }
                });
            }
            Command::Checksum { seq, region, range } => {
                let node = self.clone();
                tokio::task::spawn_blocking(move || {
                    let sum = match node
                        .shared
                        .lu
                        .checksum_blocks(range.lba, u64::from(range.blocks))
                    {
                        Ok(sum) => sum,
                        Err(err) => {
                            // An unreadable region is a mismatch: a value no other plex sends.
                            tracing::error!("verify of region {region}: read: {err}");
                            let mut h = blake3::Hasher::new();
                            h.update(b"sva verify: unreadable region on plex ");
                            h.update(&node.shared.lu.config().relative_target_port.to_le_bytes());
                            *h.finalize().as_bytes()
                        }
                    };
                    node.with_engine(|e, now| e.checksummed(now, seq, sum));
                });
            }
            Command::MarkDirtyRegions { plex, regions } => {
                // Synchronous (rare): durable before any later Apply/CopyIn is spawned.
                if let Err(err) = self.shared.state.mark_dirty(plex, &regions) {
                    tracing::error!(
                        "write-intent bitmap of plex {plex}: {err}; a crash now may leave \
                         regions {:?}.. unresynced",
                        regions.first()
                    );
                }
            }
            Command::ClearDirtyRegions { plex, regions } => {
                self.shared.state.clear_dirty(plex, &regions)
            }
            Command::DropBitmap { plex } => {
                if let Err(err) = self.shared.state.drop_bitmap(plex) {
                    tracing::warn!("removing the bitmap of plex {plex}: {err}");
                }
            }
            Command::ActivityLogAbsorbed => {
                if let Err(err) = self.shared.state.absorbed() {
                    tracing::warn!("activity log: {err}");
                }
            }
            Command::KeepInActivityLog { regions } => {
                if let Err(err) = self.shared.state.keep_in_activity_log(&regions) {
                    // The regions are still in this process's resync requests; only a crash
                    // before the resync would forget them.
                    tracing::error!("activity log: keeping {} regions: {err}", regions.len());
                }
            }
        }
    }

    /// On an op's blocking thread, before its data write: its regions in the activity log.
    fn before_write(&self, seq: u64) {
        if let Err(err) = self.shared.state.op_before_write(seq) {
            // Refusing the write would make this plex silently differ from its peers; a
            // missing log entry only matters if this node crashes before the op settles.
            tracing::error!("activity log before op {seq}: {err}");
        }
    }

    /// Persist lazy bitmap clears and let idle settled regions leave the activity log (also
    /// called at shutdown).
    pub fn flush_state(&self) {
        if let Err(err) = self.shared.state.flush_bitmaps() {
            tracing::warn!("flushing write-intent bitmaps: {err}");
        }
        if let Err(err) = self.shared.state.trim_activity_log(ACTIVITY_LOG_IDLE) {
            tracing::warn!("trimming the activity log: {err}");
        }
    }

    async fn flusher(self) {
        let mut tick = tokio::time::interval(BITMAP_FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let node = self.clone();
            let _ = tokio::task::spawn_blocking(move || node.flush_state()).await;
        }
    }

    /// Change the resync throttle (0: unlimited).
    pub fn set_resync_rate(&self, bytes_per_sec: u64) {
        self.with_engine(|e, _| e.set_resync_rate(bytes_per_sec));
    }

    /// Start an online verify (sequencer only); the engine's refusal otherwise.
    pub fn start_verify(&self, repair: bool) -> Result<(), String> {
        self.with_engine(|e, now| e.start_verify(now, repair))
            .map_err(str::to_string)
    }

    /// Resyncs this node takes part in, by plex, with rate and ETA.
    pub fn resync_views(&self) -> BTreeMap<PlexId, ResyncView> {
        lock(&self.shared.monitor)
            .resyncs
            .iter()
            .map(|(p, t)| (*p, t.view))
            .collect()
    }

    /// The last (or running) verify, and the region size.
    pub fn verify_view(&self) -> (VerifyInfo, u64) {
        (
            lock(&self.shared.monitor).verify.clone(),
            self.shared.state.region_bytes(),
        )
    }

    /// Feed a finished copy (`f`) to the engine and refresh the resync counts at once.
    fn feed_copy(&self, f: impl FnOnce(&mut Engine, Millis)) {
        let progress = self.with_engine(|e, now| {
            f(e, now);
            e.resync_status()
        });
        self.note_progress(progress);
    }

    /// Fresher counts right after a copy moved, between monitor samples: the last copies of a
    /// resync are counted even when it ends before the next sample.
    fn note_progress(&self, progress: Vec<(ResyncRole, ResyncInfo)>) {
        // A resync that starts and ends between two monitor samples (a repair of one region)
        // must still be counted: start tracking it now.
        let untracked = {
            let mon = lock(&self.shared.monitor);
            progress
                .iter()
                .any(|(_, info)| !mon.resyncs.contains_key(&info.plex))
        };
        if untracked {
            self.sample(Instant::now());
        }
        let mut mon = lock(&self.shared.monitor);
        for (_, info) in progress {
            if let Some(t) = mon.resyncs.get_mut(&info.plex) {
                if info.copied_bytes >= t.view.info.copied_bytes {
                    t.view.info = info;
                }
                if let Some(g) = self.shared.metrics.plex(info.plex, PlexState::Resyncing) {
                    count_copied(t, &g);
                }
            }
        }
    }

    async fn monitor(self) {
        let mut tick = tokio::time::interval(MONITOR_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample(Instant::now());
        }
    }

    /// Sample the engine's progress: rates, ETAs, log lines and metrics.
    fn sample(&self, now: Instant) {
        let (resyncs, verify, membership, epoch) = {
            let e = lock(&self.shared.engine);
            (
                e.resync_status(),
                e.verify_status(),
                e.membership().clone(),
                e.epoch(),
            )
        };
        let metrics = &self.shared.metrics;
        metrics.set_epoch(epoch);
        metrics.set_alua_state(AluaState::from(*lock(&self.shared.path)));
        metrics.set_verify(verify.regions_done, verify.mismatched.len() as u64);
        let mut mon = lock(&self.shared.monitor);
        let mut seen = Vec::new();
        for (role, info) in resyncs {
            seen.push(info.plex);
            let t = mon.resyncs.entry(info.plex).or_insert_with(|| {
                if role == ResyncRole::Source {
                    tracing::info!(
                        "plex {} is out of sync: {} marked to resync from here when it returns",
                        info.plex,
                        human_bytes(info.total_bytes)
                    );
                }
                ResyncTrack {
                    started: now,
                    samples: VecDeque::new(),
                    last_log: now,
                    counted: 0,
                    copying: false,
                    view: ResyncView {
                        role,
                        info,
                        bytes_per_sec: 0,
                        eta_seconds: None,
                    },
                }
            });
            update_track(t, role, info, now);
            // Copying (as opposed to waiting for the plex to come back) once anything moved;
            // a target is copying from the start.
            if t.view.moving() && !t.copying {
                t.copying = true;
                t.started = now;
                t.last_log = now;
                // The rate counts from the first copy, not from when the plex went away.
                t.samples.clear();
                t.samples.push_back((now, info.done_bytes));
                tracing::info!(
                    "resync of plex {} started ({}, this node is the {:?}): {} to copy",
                    info.plex,
                    if info.full { "full" } else { "incremental" },
                    role,
                    human_bytes(info.total_bytes)
                );
            }
            if let Some(g) = metrics.plex(info.plex, PlexState::Resyncing) {
                let v = &t.view;
                g.set_resync(v.info.done_bytes, v.info.total_bytes, v.bytes_per_sec);
                count_copied(t, &g);
            }
            if t.copying && now.duration_since(t.last_log) >= RESYNC_LOG_INTERVAL {
                t.last_log = now;
                tracing::info!("{}", progress_line(&t.view));
            }
        }
        let ended: Vec<PlexId> = mon
            .resyncs
            .keys()
            .copied()
            .filter(|p| !seen.contains(p))
            .collect();
        for p in ended {
            if let Some(t) = mon.resyncs.remove(&p) {
                let secs = now.duration_since(t.started).as_secs_f64();
                let v = &t.view.info;
                let in_sync = membership
                    .plexes
                    .iter()
                    .any(|r| r.id == p && r.state == PlexState::InSync);
                if in_sync {
                    tracing::info!(
                        "resync of plex {p} finished after {secs:.1} s: plex {p} is in sync \
                         again ({} to copy, {} copied)",
                        human_bytes(v.total_bytes),
                        human_bytes(v.copied_bytes)
                    );
                } else {
                    tracing::info!(
                        "resync of plex {p} stopped after {secs:.1} s: {} of {} done, {} copied",
                        human_bytes(v.done_bytes),
                        human_bytes(v.total_bytes),
                        human_bytes(v.copied_bytes)
                    );
                }
                if let Some(g) = metrics.plex(p, PlexState::InSync) {
                    g.set_resync(0, 0, 0);
                }
            }
        }
        for p in &membership.plexes {
            let copying = mon.resyncs.get(&p.id).is_some_and(|t| t.copying);
            let state = shown_state(p.state, copying);
            if let Some(g) = metrics.plex(p.id, state) {
                g.set_state(state);
            }
        }
        mon.verify = verify;
    }

    /// Every node reports every group of the volume    /// Every node reports every group of the volume (DESIGN.md §4): ours from the engine's path
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
    fn apply(&self, op: Result<ReplicatedOp, op::OpDecodeError>) -> Bytes {
        let lu = &self.shared.lu;
        let response = match op {
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
        let (tx, mut rx) = oneshot::channel();
        let alone = {
            let mut waiting = lock(&self.shared.waiting);
            waiting.insert(id, tx);
            waiting.len() == 1
        };
        let started = Instant::now();
        self.with_engine(|e, now| e.submit(now, id, meta));
        let mut polled = None;
        if alone && self.shared.ack_wait.poll_now(self.shared.ack_spin) {
            polled = self.receive_acks_until(&mut rx, started + self.shared.ack_spin);
            self.shared.metrics.ack_polled(polled.is_some());
        }
        let outcome = match polled {
            Some(outcome) => outcome,
            None => rx.await.unwrap_or(Outcome::Retry),
        };
        if alone {
            self.shared.ack_wait.record(started.elapsed());
        }
        outcome
    }

    /// Receive the peers' messages on this thread until op `rx` is complete or `until`
    /// passes (`None`). The node's only write in flight would otherwise sleep until the
    /// link's reader task is woken for the ack: on a VM that wake-up of an idle vCPU is
    /// about half a loopback round trip (README, "Mirrored writes"). Yielding between polls
    /// lets a peer or initiator that shares this CPU run.
    fn receive_acks_until(
        &self,
        rx: &mut oneshot::Receiver<Outcome>,
        until: Instant,
    ) -> Option<Outcome> {
        let inbound = EngineInbound(Arc::downgrade(&self.shared));
        loop {
            match rx.try_recv() {
                Ok(outcome) => return Some(outcome),
                Err(oneshot::error::TryRecvError::Closed) => return Some(Outcome::Retry),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if Instant::now() >= until {
                return None;
            }
            self.shared.links.poll_received(&inbound);
            std::thread::yield_now();
        }
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

/// Feeds peer messages to the engine on the link's reader task (see `link`'s module doc);
/// weak, so the links do not keep a stopped node alive.
struct EngineInbound(std::sync::Weak<Shared>);

impl Inbound for EngineInbound {
    fn deliver(&self, from: PlexId, msgs: Vec<Message>) {
        if let Some(shared) = self.0.upgrade() {
            MirrorNode { shared }.with_engine(|e, now| {
                for m in msgs {
                    e.handle_message(now, from, m);
                }
            });
        }
    }

    fn link_up(&self, peer: PlexId) {
        if let Some(shared) = self.0.upgrade() {
            MirrorNode { shared }.with_engine(|e, now| e.link_up(now, peer));
        }
    }

    fn closed(&self) -> bool {
        self.0.strong_count() == 0
    }

    fn op_polled(&self, polled: bool) {
        if let Some(shared) = self.0.upgrade() {
            shared.metrics.op_polled(polled);
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
                if !node.reads_allowed() {
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

/// Add the payload bytes `t` copied since last counted to the plex's counter.
fn count_copied(t: &mut ResyncTrack, g: &crate::control::metrics::PlexGauges) {
    let copied = t.view.info.copied_bytes;
    if copied < t.counted {
        t.counted = 0; // a new resync of this plex
    }
    g.add_resync_copied(copied - t.counted);
    t.counted = copied;
}

/// Add a sample of `info` to `t` and recompute its rate (progress over the last
/// [`RATE_WINDOW`]) and ETA.
fn update_track(t: &mut ResyncTrack, role: ResyncRole, info: ResyncInfo, now: Instant) {
    if info.done_bytes < t.view.info.done_bytes {
        // A new resync of the same plex (the target rejoined): start the window afresh.
        t.samples.clear();
    }
    t.samples.push_back((now, info.done_bytes));
    while t
        .samples
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
    {
        t.samples.pop_front();
    }
    let rate = match (t.samples.front(), t.samples.back()) {
        (Some((t0, d0)), Some((t1, d1))) if t1 > t0 => {
            let secs = t1.duration_since(*t0).as_secs_f64();
            (d1.saturating_sub(*d0) as f64 / secs) as u64
        }
        _ => 0,
    };
    let left = info.total_bytes.saturating_sub(info.done_bytes);
    t.view = ResyncView {
        role,
        info,
        bytes_per_sec: rate,
        eta_seconds: (rate > 0).then(|| left.div_ceil(rate)),
    };
}

/// "resync of plex 2: 412 MiB of 1.0 GiB (40%), 180 MiB/s, about 3 s left"
pub fn progress_line(v: &ResyncView) -> String {
    let i = &v.info;
    let pct = (i.done_bytes as u128 * 100)
        .checked_div(i.total_bytes as u128)
        .unwrap_or(100);
    let eta = match v.eta_seconds {
        Some(s) => format!("about {s} s left"),
        None => "time left unknown".to_string(),
    };
    format!(
        "resync of plex {}: {} of {} ({pct}%), {}/s, {eta}",
        i.plex,
        human_bytes(i.done_bytes),
        human_bytes(i.total_bytes),
        human_bytes(v.bytes_per_sec)
    )
}

/// Bytes for people: `512 B`, `412 MiB`, `1.0 GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    match u {
        0 => format!("{b} B"),
        _ if v < 10.0 => format!("{v:.1} {}", UNITS[u]),
        _ => format!("{v:.0} {}", UNITS[u]),
    }
}

/// The engine mutex is never held across a panic-prone call, but recover anyway.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_reads_like_the_design() {
        let v = ResyncView {
            role: ResyncRole::Source,
            info: ResyncInfo {
                plex: 2,
                full: false,
                total_bytes: 1 << 30,
                done_bytes: 412 << 20,
                copied_bytes: 0,
            },
            bytes_per_sec: 180 << 20,
            eta_seconds: Some(4),
        };
        assert_eq!(
            progress_line(&v),
            "resync of plex 2: 412 MiB of 1.0 GiB (40%), 180 MiB/s, about 4 s left"
        );
        assert_eq!(human_bytes(512), "512 B");
    }

    #[test]
    fn rate_is_the_progress_over_the_window() {
        let t0 = Instant::now();
        let info = |done| ResyncInfo {
            plex: 2,
            full: true,
            total_bytes: 1000 << 20,
            done_bytes: done,
            copied_bytes: done,
        };
        let mut t = ResyncTrack {
            started: t0,
            samples: VecDeque::new(),
            last_log: t0,
            counted: 0,
            copying: false,
            view: ResyncView {
                role: ResyncRole::Source,
                info: info(0),
                bytes_per_sec: 0,
                eta_seconds: None,
            },
        };
        update_track(&mut t, ResyncRole::Source, info(0), t0);
        assert_eq!((t.view.bytes_per_sec, t.view.eta_seconds), (0, None));
        for s in 1..=20u64 {
            update_track(
                &mut t,
                ResyncRole::Source,
                info(s * (10 << 20)),
                t0 + Duration::from_secs(s),
            );
        }
        // 10 MiB/s throughout; 800 MiB left.
        assert_eq!(t.view.bytes_per_sec, 10 << 20);
        assert_eq!(t.view.eta_seconds, Some(80));
        assert!(t.samples.len() <= 11, "window bounded: {}", t.samples.len());
    }
}
