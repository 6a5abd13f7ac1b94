//! The sans-IO replication engine of one plex (openraft-style: events in, [`Command`]s out).
//!
//! ```text
//!  initiator ─submit─> origin ──Forward──> sequencer ──Apply──> every other in-sync plex
//!                        ^  <──Ordered────┘  (origin already holds the payload)
//!                        └──────── Applied <── each plex, once its LU applied the op
//!  origin acks (Complete::Done with its own LU response) once every in-sync plex applied it.
//! ```
//!
//! Failure: a peer silent for [`PEER_TIMEOUT_MS`] is suspected; new ops are held; the lowest
//! unsuspected in-sync plex (the *coordinator*) CASes epoch+1 with the suspects Stale, then
//! collects every member's un-settled log, cuts the union at its first gap and sends the
//! result (`Sync`) so every member applies the same ops in the same order before the new epoch
//! serves. A node that loses the CAS or cannot reach the witness fences (terminal here).
//!
//! Resync (RESYNC.md, `resync.rs`): a non-InSync plex asks every peer to `JoinRequest` it (on
//! a timer, and at once when the driver reports a link up: [`Engine::link_up`]); the
//! sequencer adds it as a *learner* (it receives and applies every op from `start_seq` on, its
//! acks count for log GC only) and orders one copy op per dirty region of its write-intent
//! bitmap, ordered like a write; when the bitmap is empty it CASes the learner InSync and runs a
//! normal view change with it. A restarted node that the record still lists InSync recovers
//! per [`RECOVER_WAIT_MS`]. Online verify orders one checksum op per region the same way; with
//! `repair`, plexes whose checksums differ from the sequencer's are CASed Stale with just those
//! regions in their bitmaps, and rejoin by the normal resync.
//!
//! Read lease: a heartbeat echoes the sender's last received timestamp of the peer; a node
//! serves reads (and acks, and orders ops) only while every in-sync peer echoed a timestamp
//! younger than [`READ_LEASE_MS`]. A peer is excluded only [`PEER_TIMEOUT_MS`] after it was
//! last heard, by when that lease has surely expired.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::dirty::{DirtyMap, REGION_BYTES_DEFAULT};
use super::msg::{Entry, Epoch, EpochState, LbaRange, Message, OpMeta, OpRange, PlexId, Seq};
use super::resync::{CopyWhat, Recovered, ResyncInfo, ResyncRole, VerifyInfo};
use crate::witness::{Membership, PlexState, WitnessError};

/// Milliseconds on the driver's monotonic clock (any origin).
pub type Millis = u64;

/// Interval between heartbeats to every in-sync peer.
pub const HEARTBEAT_INTERVAL_MS: Millis = 100;
/// A read lease lasts this long from the timestamp the peer echoed.
pub const READ_LEASE_MS: Millis = 500;
/// A peer silent this long is suspected. Must exceed `READ_LEASE_MS` plus clock drift and
/// scheduling margin: the CAS that excludes a peer follows its lease expiry.
pub const PEER_TIMEOUT_MS: Millis = 800;
/// A forward not ordered after this long is sent again; a coordinator re-sends `NewEpoch`.
pub const RETRANSMIT_MS: Millis = 200;
/// A node holding ops (or waiting for a new epoch's `Sync`) this long fences itself, unless
/// its own witness CAS is still outstanding (the driver bounds that call).
pub const HOLD_TIMEOUT_MS: Millis = 4 * PEER_TIMEOUT_MS;
/// Ops ordered but not settled, per node; beyond, new ops wait (bounds memory and `State`).
pub const LOG_ENTRIES_MAX: usize = 1024;
/// Ops held (waiting for a lease, a new epoch or log room); beyond, `Retry` at once.
pub const HELD_OPS_MAX: usize = 1024;

/// A node tells a peer its applied prefix (`Progress`) once it moved this far past what the
/// peer last heard (in an `Applied`, a heartbeat or a `Progress`): a peer that gets no
/// `Applied` from this node (it did not originate the ops) would otherwise settle its log
/// only at heartbeats, and a log full of `LOG_ENTRIES_MAX` unsettled ops stalls new ones.
pub const PROGRESS_STEP: Seq = 64;

/// Copy (and verify) ops a source keeps outstanding per learner by default
/// ([`Config::copy_window`]). With 1 MiB regions, 16 in flight (16 MiB, half of the link's
/// `SEND_BUFFER_MAX`) keep the learner's disk writes overlapping: a full resync of 1 GiB
/// on the project's 2-core machine ran at ~780 MiB/s with 8 and ~930 MiB/s with 16 (32 and
/// 64 gave no more).
pub const COPY_WINDOW: usize = 16;
/// A restarted node that the record lists InSync waits this long without hearing a serving
/// in-sync peer before it CASes itself sole source: longer than a serving peer takes to
/// exclude it (`PEER_TIMEOUT_MS`) or to fence itself without the witness (`HOLD_TIMEOUT_MS`).
pub const RECOVER_WAIT_MS: Millis = HOLD_TIMEOUT_MS + PEER_TIMEOUT_MS + 2 * HEARTBEAT_INTERVAL_MS;
/// A source whose learner does not catch up within this long after the last copy resumes
/// ordering and tries the rejoin again later.
pub const REJOIN_DRAIN_MS: Millis = PEER_TIMEOUT_MS;

/// After a recovery CAS to epoch `e`, seqs restart at `e << RECOVERY_SEQ_SHIFT` (monotonic as
/// long as fewer than 2^40 ops are ordered between recoveries).
const RECOVERY_SEQ_SHIFT: u32 = 40;

/// Origin of the engine's own ops (copies, verifies): plex ids are 1-based.
const INTERNAL_ORIGIN: PlexId = 0;

/// `Heartbeat::echo` when the sender has not heard the peer's timestamp yet.
pub const NO_ECHO: Millis = Millis::MAX;

const _: () = assert!(PEER_TIMEOUT_MS > READ_LEASE_MS + 2 * HEARTBEAT_INTERVAL_MS);
const _: () = assert!(LOG_ENTRIES_MAX <= super::msg::ENTRIES_MAX);

/// The driver's id for an op submitted on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// How a submitted op ends for its initiator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied on every in-sync plex; the local LU's response.
    Done(Bytes),
    /// Not acknowledged (fenced, out of sync, or transitioning): fail with a retryable sense
    /// so the initiator retries, possibly on another path. The op may or may not be applied.
    Retry,
}

/// ALUA state of this node's path (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    ActiveOptimized,
    Transitioning,
    Unavailable,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Send {
        to: PlexId,
        msg: Message,
    },
    /// Run `LogicalUnit::execute_admitted` on the op, then call [`Engine::applied`].
    Apply {
        epoch: Epoch,
        seq: Seq,
        origin: PlexId,
        op: OpMeta,
    },
    /// Answer the initiator.
    Complete {
        op: OpId,
        outcome: Outcome,
    },
    /// CAS the membership record, then call [`Engine::witness_result`].
    WitnessCas {
        expected_epoch: Epoch,
        record: Membership,
    },
    PathState(PathState),
    /// Every op `<= up_to` is applied on every in-sync plex: the activity log may drop it.
    Settled {
        up_to: Seq,
    },
    // ----- resync and verify (see `resync.rs`) -----
    /// Source side of copy `seq`: read `what` from the local plex (at this point of the order:
    /// every earlier overlapping op is applied, no later one is) and call
    /// [`Engine::copied_out`]. An all-zero or unmapped region may be returned as empty data.
    CopyOut {
        seq: Seq,
        what: CopyWhat,
    },
    /// Target side of copy `seq`: write `data` (empty: zeros/hole) durably, then call
    /// [`Engine::applied`] with an empty response.
    CopyIn {
        seq: Seq,
        what: CopyWhat,
        data: Bytes,
    },
    /// Verify: checksum `range` of the local plex and call [`Engine::checksummed`].
    Checksum {
        seq: Seq,
        region: u64,
        range: LbaRange,
    },
    /// Persist these regions in `plex`'s write-intent bitmap before any later data write.
    MarkDirtyRegions {
        plex: PlexId,
        regions: Vec<u64>,
    },
    /// These regions of `plex`'s bitmap are resynced; persist lazily.
    ClearDirtyRegions {
        plex: PlexId,
        regions: Vec<u64>,
    },
    /// `plex` is in sync again (or removed): delete its bitmap.
    DropBitmap {
        plex: PlexId,
    },
    /// The activity log regions handed in through `Recovered` are now covered by bitmaps or
    /// resynced: the driver may shrink the log to the regions of unsettled ops.
    ActivityLogAbsorbed,
    /// This plex left the in-sync set with these regions written by ops its peers may lack
    /// (they are in the log now, pinned by those ops): keep them, like the `Recovered` ones,
    /// until `ActivityLogAbsorbed`. Once it learns or recovers, the ops count as settled
    /// here and the log would drop them; a crash before the resync then forgot them, and a
    /// source that never got this plex's `JoinRequest` had them nowhere (sim seed 44401).
    KeepInActivityLog {
        regions: Vec<u64>,
    },
}

/// How the engine starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new volume whose in-sync plexes are identical (all start together at seq 0).
    Bootstrap,
    /// A restarted node: it lost its in-memory state, so it stays out (Unavailable) until
    /// resync brings it back, whatever the record says; its peers exclude it. What it read
    /// back from its state directory tells the resync what may differ.
    Restart(Recovered),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub me: PlexId,
    pub block_size: u32,
    /// Write-intent bitmap region size.
    pub region_bytes: u64,
    /// Volume size in blocks (the driver sets it): a full resync and a verify cover
    /// `0..volume_blocks`. 0: unknown (full resyncs and verify refuse to run).
    pub volume_blocks: u64,
    /// Copy (and verify) ops outstanding per learner (at least 1).
    pub copy_window: usize,
}

impl Config {
    pub fn new(me: PlexId) -> Config {
        Config {
            me,
            block_size: 512,
            region_bytes: REGION_BYTES_DEFAULT,
            volume_blocks: 0,
            copy_window: COPY_WINDOW,
        }
    }
}

/// Coarse role, for status and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    Active,
    Holding,
    Collecting,
    Joining,
    Fenced,
    Out,
    /// Restarted while the record lists it InSync: waiting for serving peers (RESYNC.md).
    Recovering,
    /// Being resynced by the sequencer (path Unavailable).
    Learning,
}

#[derive(Debug)]
enum Role {
    /// In sync in the current epoch, serving.
    Active,
    /// Suspects a peer: new ops held; a CAS may be outstanding.
    Holding { since: Millis },
    /// Coordinator of a new epoch, collecting members' logs.
    Collecting {
        since: Millis,
        states: BTreeMap<PlexId, EpochState>,
        last_sent: Millis,
    },
    /// Member of a new epoch, waiting for the coordinator's `Sync`.
    Joining { since: Millis },
    /// Lost the CAS or the witness: never acks again (terminal in this issue).
    Fenced,
    /// Not in sync (stale, removed, or restarted): Unavailable; asks to be resynced.
    Out,
    /// Restarted while the record lists it InSync; `since`: start or the last sign of a
    /// serving in-sync peer.
    Recovering { since: Millis },
    /// A learner of `source` (the sequencer), from `start_seq` on.
    Learning { source: PlexId, start_seq: Seq },
}

/// An engine-internal op (origin [`INTERNAL_ORIGIN`]), encoded in its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Internal {
    Copy { target: PlexId, what: CopyWhat },
    Verify { region: u64, range: LbaRange },
}

const I_COPY_REGION: u8 = 1;
const I_COPY_LU: u8 = 2;
const I_VERIFY: u8 = 3;

impl Internal {
    fn meta(self) -> OpMeta {
        let mut b = BytesMut::new();
        let range = match self {
            Internal::Copy {
                target,
                what: CopyWhat::Region { index, range },
            } => {
                b.put_u8(I_COPY_REGION);
                b.put_u16(target);
                b.put_u64(index);
                b.put_u64(range.lba);
                b.put_u32(range.blocks);
                OpRange::Blocks(range)
            }
            Internal::Copy {
                target,
                what: CopyWhat::LuState,
            } => {
                b.put_u8(I_COPY_LU);
                b.put_u16(target);
                OpRange::Barrier
            }
            Internal::Verify { region, range } => {
                b.put_u8(I_VERIFY);
                b.put_u64(region);
                b.put_u64(range.lba);
                b.put_u32(range.blocks);
                OpRange::Blocks(range)
            }
        };
        OpMeta {
            range,
            payload: b.freeze(),
        }
    }

    /// `None`: not an internal op or garbage (applied as a no-op).
    fn of(e: &Entry) -> Option<Internal> {
        if e.origin != INTERNAL_ORIGIN {
            return None;
        }
        let mut b = e.meta.payload.clone();
        if b.remaining() < 1 {
            return None;
        }
        match b.get_u8() {
            I_COPY_REGION if b.remaining() >= 22 => Some(Internal::Copy {
                target: b.get_u16(),
                what: CopyWhat::Region {
                    index: b.get_u64(),
                    range: LbaRange {
                        lba: b.get_u64(),
                        blocks: b.get_u32(),
                    },
                },
            }),
            I_COPY_LU if b.remaining() >= 2 => Some(Internal::Copy {
                target: b.get_u16(),
                what: CopyWhat::LuState,
            }),
            I_VERIFY if b.remaining() >= 20 => Some(Internal::Verify {
                region: b.get_u64(),
                range: LbaRange {
                    lba: b.get_u64(),
                    blocks: b.get_u32(),
                },
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LuCopy {
    Todo,
    Ordered,
    Done,
}

/// A copy ordered for a learner and not yet acknowledged by it.
#[derive(Debug)]
struct CopyOut {
    region: Option<u64>,
    /// The data once read (kept for retransmission until the learner applied it).
    data: Option<Bytes>,
    sent_at: Millis,
}

/// Source side of one learner.
#[derive(Debug)]
struct Learner {
    start_seq: Seq,
    last_heard: Millis,
    /// Heard from since it was accepted (a later `JoinRequest` then means it restarted).
    heard: bool,
    applied_prefix: Seq,
    /// The settled prefix last sent to it (see [`PROGRESS_STEP`]).
    told: Seq,
    lu: LuCopy,
    cursor: u64,
    copies: BTreeMap<Seq, CopyOut>,
    full: bool,
    done_bytes: u64,
    copied_bytes: u64,
}

/// A verify in progress (sequencer side).
#[derive(Debug, Default)]
struct Verify {
    next_region: u64,
    members: Vec<PlexId>,
    outstanding: BTreeMap<Seq, (u64, BTreeMap<PlexId, [u8; 32]>)>,
    /// Mark mismatched regions for resync when done (see `repair_mismatches`).
    repair: bool,
    /// Per member: the regions whose checksum differs from the sequencer's.
    differs: BTreeMap<PlexId, BTreeSet<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Pending,
    Issued,
    Applied,
}

#[derive(Debug)]
struct LogEntry {
    entry: Entry,
    state: EntryState,
}

#[derive(Debug, Default)]
struct Peer {
    last_heard: Millis,
    /// My timestamp this peer echoed most recently (start of my lease from it).
    lease_from: Option<Millis>,
    /// The peer's latest timestamp, to echo.
    their_ts: Option<Millis>,
    applied_prefix: Seq,
    /// My applied prefix as last sent to this peer (see [`PROGRESS_STEP`]).
    told: Seq,
}

#[derive(Debug)]
struct Pending {
    op: OpId,
    meta: OpMeta,
    seq: Option<Seq>,
    acks: BTreeSet<PlexId>,
    response: Option<Bytes>,
    last_sent: Millis,
}

impl Pending {
    /// This plex's op got `seq`. A peer's ack can come before that (in a 3-way mirror, a
    /// third plex applies the sequencer's `Apply` and acks this origin before the
    /// sequencer's `Ordered` arrives here), and `ack_from` could not match it then: count
    /// every peer whose applied prefix already covers `seq`, as a heartbeat would a moment
    /// later.
    fn seq_known(&mut self, seq: Seq, peers: &BTreeMap<PlexId, Peer>) {
        self.seq = Some(seq);
        for (id, peer) in peers {
            if peer.applied_prefix >= seq {
                self.acks.insert(*id);
            }
        }
    }
}

#[derive(Debug, Default)]
struct FwdSeen {
    floor: u64,
    seqs: BTreeMap<u64, Seq>,
}

/// The replication engine of one plex.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    membership: Membership,
    role: Role,
    path: Option<PathState>,
    cmds: VecDeque<Command>,
    peers: BTreeMap<PlexId, Peer>,
    next_heartbeat: Millis,
    /// `now` of the last `handle_timeout`: suspicion deadlines at or before it were acted on.
    last_timeout: Option<Millis>,
    cas_outstanding: bool,
    // ordering
    next_seq: Seq,
    seq_high: Seq,
    fwd_seen: BTreeMap<PlexId, FwdSeen>,
    log: BTreeMap<Seq, LogEntry>,
    settled: Seq,
    applied_prefix: Seq,
    active_epoch: Epoch,
    active_base: Seq,
    // origin side
    next_fwd: u64,
    pending: BTreeMap<u64, Pending>,
    held: VecDeque<(OpId, OpMeta)>,
    // resync
    /// Write-intent bitmap per non-InSync plex (kept by in-sync nodes).
    bitmaps: BTreeMap<PlexId, DirtyMap>,
    learners: BTreeMap<PlexId, Learner>,
    /// Writes issued to the local plex and not yet reported applied (survives going out: a
    /// new resync session waits for them, so no copy races an old write).
    io_inflight: BTreeSet<Seq>,
    /// Regions where this plex may differ from its peers (recovered activity log, ops
    /// applied before it was excluded): sent with every `JoinRequest`.
    own_dirty: BTreeSet<u64>,
    data_valid: bool,
    recovered_bitmaps: BTreeMap<PlexId, BTreeSet<u64>>,
    /// Of those, the ones filled at once since created (`Recovered::filled`).
    recovered_filled: BTreeSet<PlexId>,
    next_join: Millis,
    /// The record of an outstanding recovery CAS.
    proposed: Option<Membership>,
    /// Learner side: data of copy ops received ahead of their turn.
    copy_data: BTreeMap<Seq, Bytes>,
    target: Option<ResyncInfo>,
    /// Source side: a learner caught up; new ops are held until it applied everything.
    rejoin: Option<(PlexId, Millis)>,
    /// Learner side: the source's `seq_high` in its last heartbeat; once applied up to it,
    /// say so at once (`Progress`) instead of at the next heartbeat. The source sends one
    /// as it starts a rejoin: its CAS waits for exactly this report.
    prefix_wanted: Option<Seq>,
    rejoin_retry_at: Millis,
    rate: u64,
    tokens: i64,
    tokens_at: Millis,
    verify: Option<Verify>,
    verify_info: VerifyInfo,
    /// Stale plexes whose bitmap here was set to every region since they went stale (or that
    /// this node recovered a bitmap for): a full request that is not fresh resumes.
    filled: BTreeSet<PlexId>,
    /// Accepted by a source in this life (a full request is no longer fresh).
    accepted: bool,
    /// The `Sync` this coordinator sent for the current epoch (re-sent to a member whose
    /// copy was lost).
    last_sync: Option<Message>,
}

impl Engine {
    /// Start from the witness's current record.
    pub fn new(cfg: Config, membership: Membership, now: Millis, start: Start) -> Engine {
        let mut e = Engine {
            active_epoch: membership.epoch,
            membership,
            role: Role::Out,
            path: None,
            cmds: VecDeque::new(),
            peers: BTreeMap::new(),
            next_heartbeat: now,
            last_timeout: None,
            cas_outstanding: false,
            next_seq: 1,
            seq_high: 0,
            fwd_seen: BTreeMap::new(),
            log: BTreeMap::new(),
            settled: 0,
            applied_prefix: 0,
            active_base: 0,
            next_fwd: 1,
            pending: BTreeMap::new(),
            held: VecDeque::new(),
            bitmaps: BTreeMap::new(),
            learners: BTreeMap::new(),
            io_inflight: BTreeSet::new(),
            own_dirty: BTreeSet::new(),
            data_valid: true,
            recovered_bitmaps: BTreeMap::new(),
            recovered_filled: BTreeSet::new(),
            next_join: now,
            proposed: None,
            copy_data: BTreeMap::new(),
            target: None,
            rejoin: None,
            rejoin_retry_at: now,
            prefix_wanted: None,
            rate: 0,
            tokens: 0,
            tokens_at: now,
            verify: None,
            verify_info: VerifyInfo::default(),
            last_sync: None,
            filled: BTreeSet::new(),
            accepted: false,
            cfg,
        };
        let me = e.cfg.me;
        match start {
            Start::Bootstrap if e.is_in_sync(me) => {
                e.role = Role::Active;
                e.reset_peers(now);
                e.set_path(PathState::ActiveOptimized);
                // A plex that is not InSync at bootstrap is new to us: copy all of it.
                for p in e.stale_ids() {
                    e.ensure_bitmap(p, false);
                }
                return e;
            }
            // A new or replacement plex the record does not list InSync: a full resync.
            Start::Bootstrap => e.data_valid = false,
            Start::Restart(rec) => {
                let Recovered {
                    activity_log,
                    bitmaps,
                    data_valid,
                    full_pending,
                    filled,
                } = rec;
                e.own_dirty = activity_log;
                e.recovered_bitmaps = bitmaps;
                e.recovered_filled = filled;
                e.data_valid = data_valid && !full_pending;
                // Mid full resync: ask full but not fresh, so a source that filled its
                // bitmap for us resumes and one that did not (the first source died) fills.
                e.accepted = data_valid && full_pending;
                // It lost its memory: it never claims to have served an epoch.
                e.active_epoch = 0;
                if data_valid && e.is_in_sync(me) {
                    e.role = Role::Recovering { since: now };
                }
            }
        }
        e.set_path(PathState::Unavailable);
        e
    }

    // ----- accessors -----

    pub fn me(&self) -> PlexId {
        self.cfg.me
    }
    pub fn epoch(&self) -> Epoch {
        self.membership.epoch
    }
    pub fn membership(&self) -> &Membership {
        &self.membership
    }
    pub fn role(&self) -> RoleKind {
        match self.role {
            Role::Active => RoleKind::Active,
            Role::Holding { .. } => RoleKind::Holding,
            Role::Collecting { .. } => RoleKind::Collecting,
            Role::Joining { .. } => RoleKind::Joining,
            Role::Fenced => RoleKind::Fenced,
            Role::Out => RoleKind::Out,
            Role::Recovering { .. } => RoleKind::Recovering,
            Role::Learning { .. } => RoleKind::Learning,
        }
    }
    /// The write-intent bitmap this node keeps for `plex` (regions it may hold differently).
    pub fn bitmap(&self, plex: PlexId) -> Option<&DirtyMap> {
        self.bitmaps.get(&plex)
    }
    /// Ops submitted here and not yet completed.
    pub fn ops_in_flight(&self) -> usize {
        self.pending.len() + self.held.len()
    }

    /// Ordered ops not yet settled (applied on every in-sync plex) that this node keeps.
    pub fn unsettled_ops(&self) -> usize {
        self.log.len()
    }

    /// May this node serve a read from its local plex now? Only while in sync and holding a
    /// lease from every in-sync peer, so no other epoch can have acked a write it lacks.
    pub fn can_serve_reads(&self, now: Millis) -> bool {
        matches!(self.role, Role::Active | Role::Holding { .. }) && self.lease_valid(now)
    }

    /// Until when (exclusive) [`Engine::can_serve_reads`] holds if no input reaches the
    /// engine before: `can_serve_reads(now) == (now < reads_allowed_until())`. Lets the
    /// driver check the read lease without locking the engine per read.
    pub fn reads_allowed_until(&self) -> Millis {
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            return 0;
        }
        self.peers
            .values()
            .map(|p| p.lease_from.map_or(0, |l| l.saturating_add(READ_LEASE_MS)))
            .min()
            .unwrap_or(Millis::MAX)
    }

    /// Next time `handle_timeout` must be called.
    pub fn next_timeout(&self) -> Option<Millis> {
        match self.role {
            Role::Fenced => None,
            Role::Out => self.io_inflight.is_empty().then_some(self.next_join),
            Role::Recovering { since } => {
                if self.cas_outstanding {
                    Some(self.next_join)
                } else {
                    Some(self.next_join.min(self.recover_deadline(since)))
                }
            }
            _ => {
                // A suspicion deadline already handled must not come back: it would stay in
                // the past while the peer is silent, and a driver timer that fires "now"
                // would spin instead of sleeping (starving the witness CAS it waits for).
                let suspect = self
                    .peers
                    .values()
                    .map(|p| p.last_heard + PEER_TIMEOUT_MS)
                    .chain(
                        self.learners
                            .values()
                            .map(|l| l.last_heard + PEER_TIMEOUT_MS),
                    )
                    .filter(|&d| self.last_timeout.is_none_or(|t| d > t))
                    .min();
                let mut t = suspect.map_or(self.next_heartbeat, |s| s.min(self.next_heartbeat));
                if let Some(tok) = self.throttle_ready_at() {
                    t = t.min(tok);
                }
                Some(t)
            }
        }
    }

    /// Next command for the driver.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.cmds.pop_front()
    }

    // ----- inputs -----

    /// A state-changing op from a local initiator (already admitted by the local LU).
    pub fn submit(&mut self, now: Millis, op: OpId, meta: OpMeta) {
        match self.role {
            Role::Fenced | Role::Out | Role::Recovering { .. } | Role::Learning { .. } => {
                self.complete(op, Outcome::Retry)
            }
            _ => {
                if self.held.len() >= HELD_OPS_MAX {
                    self.complete(op, Outcome::Retry);
                } else {
                    self.held.push_back((op, meta));
                    self.start_held(now);
                }
            }
        }
    }

    /// The local LU applied `seq` (an `Apply` or a `CopyIn`); `response` is its encoded
    /// response (returned to the initiator if the op originated here).
    pub fn applied(&mut self, now: Millis, seq: Seq, response: Bytes) {
        self.io_inflight.remove(&seq);
        if matches!(
            self.role,
            Role::Fenced | Role::Out | Role::Recovering { .. }
        ) {
            if matches!(self.role, Role::Out) && self.io_inflight.is_empty() {
                self.next_join = self.next_join.min(now);
            }
            return;
        }
        let Some(le) = self.log.get_mut(&seq) else {
            return;
        };
        if le.state != EntryState::Issued {
            return;
        }
        le.state = EntryState::Applied;
        let origin = le.entry.origin;
        let fwd = le.entry.fwd;
        let internal = Internal::of(&le.entry);
        if let (Role::Learning { source, .. }, Some(Internal::Copy { target, what })) =
            (&self.role, internal)
        {
            let source = *source;
            if target == self.cfg.me {
                if let Some(t) = self.target.as_mut() {
                    if let CopyWhat::Region { range, .. } = what {
                        t.done_bytes += u64::from(range.blocks) * u64::from(self.cfg.block_size);
                    }
                }
                let epoch = self.epoch();
                self.advance_applied_prefix();
                let applied_prefix = self.applied_prefix;
                self.send(
                    source,
                    Message::Applied {
                        epoch,
                        seq,
                        applied_prefix,
                    },
                );
            }
        } else if origin == self.cfg.me {
            if let Some(p) = self.pending.get_mut(&fwd) {
                if p.seq == Some(seq) {
                    p.response = Some(response);
                    p.acks.insert(self.cfg.me);
                }
            }
        } else if self.is_in_sync(origin)
            && matches!(self.role, Role::Active | Role::Holding { .. })
        {
            self.advance_applied_prefix();
            self.send(
                origin,
                Message::Applied {
                    epoch: self.epoch(),
                    seq,
                    applied_prefix: self.applied_prefix,
                },
            );
        }
        self.advance_applied_prefix();
        self.progress(now);
    }

    /// The result of the last `WitnessCas`.
    pub fn witness_result(&mut self, now: Millis, result: Result<Membership, WitnessError>) {
        if !self.cas_outstanding {
            return;
        }
        self.cas_outstanding = false;
        // A recovery CAS is answered whatever we learned meanwhile: a granted one makes us
        // the only serving plex.
        if self.proposed.is_some() && !matches!(self.role, Role::Fenced) {
            self.recovery_result(now, result);
            return;
        }
        if matches!(self.role, Role::Fenced | Role::Out | Role::Learning { .. }) {
            return;
        }
        self.rejoin = None;
        match result {
            Ok(m) if m.sequencer == self.cfg.me && m.epoch > self.epoch() => {
                self.switch_epoch(now, m);
                let mine = self.my_state();
                let mut states = BTreeMap::new();
                states.insert(self.cfg.me, mine);
                self.role = Role::Collecting {
                    since: now,
                    states,
                    last_sent: now,
                };
                self.set_path(PathState::Transitioning);
                self.broadcast_new_epoch();
                self.try_finish_collect(now);
            }
            Ok(m) => self.adopt(now, m),
            Err(WitnessError::Conflict(m)) => self.adopt(now, *m),
            Err(_) => self.fence(),
        }
    }

    /// A message from peer `from` (authenticated by the driver).
    pub fn handle_message(&mut self, now: Millis, from: PlexId, msg: Message) {
        if matches!(self.role, Role::Fenced) || from == self.cfg.me {
            return;
        }
        if matches!(self.role, Role::Out | Role::Recovering { .. }) {
            self.on_message_out(now, from, msg);
            return;
        }
        if let Message::JoinRequest {
            activity_log,
            full,
            fresh,
            ..
        } = msg
        {
            self.on_join_request(now, from, activity_log, full, fresh);
            return;
        }
        if let Some(p) = self.peers.get_mut(&from) {
            p.last_heard = p.last_heard.max(now);
        }
        let epoch = msg.epoch();
        if let Message::NewEpoch { membership } = msg {
            if membership.epoch > self.epoch() {
                self.adopt(now, membership);
            } else if membership.epoch == self.epoch() {
                if let Role::Joining { .. } = self.role {
                    self.send_state();
                }
            }
            return;
        }
        if epoch < self.epoch() {
            // Tell a lagging peer what it missed; it adopts or goes out.
            self.send(
                from,
                Message::NewEpoch {
                    membership: self.membership.clone(),
                },
            );
            return;
        }
        if epoch > self.epoch() {
            return; // NewEpoch will follow (the coordinator re-sends it)
        }
        if !self.peers.contains_key(&from) {
            if self.learners.contains_key(&from) {
                self.on_learner_message(now, from, msg);
            }
            return;
        }
        match msg {
            Message::Heartbeat {
                applied_prefix,
                seq_high,
                ts,
                echo,
                ..
            } => self.on_heartbeat(now, from, applied_prefix, seq_high, ts, echo),
            Message::Forward {
                fwd, floor, meta, ..
            } => self.on_forward(now, from, fwd, floor, meta),
            Message::Apply { entry, .. } => self.on_apply(now, entry),
            Message::Ordered { seq, fwd, .. } => self.on_ordered(now, seq, fwd),
            Message::Applied {
                seq,
                applied_prefix,
                ..
            } => {
                self.peer_prefix(from, applied_prefix);
                self.ack_from(from, |s| s == seq || s <= applied_prefix);
                self.progress(now);
            }
            Message::Progress { applied_prefix, .. } => {
                self.peer_prefix(from, applied_prefix);
                self.ack_from(from, |s| s <= applied_prefix);
                self.progress(now);
            }
            Message::Resend { from: start, .. } => self.on_resend(from, start),
            Message::State { state, .. } => {
                if let Role::Collecting { states, .. } = &mut self.role {
                    states.insert(from, state);
                    self.try_finish_collect(now);
                } else if let Some(sync) = self.last_sync.clone() {
                    // Our `Sync` to it was lost: the same again.
                    self.send(from, sync);
                }
            }
            Message::Sync {
                base,
                high,
                entries,
                ..
            } => {
                if let Role::Joining { .. } = self.role {
                    self.apply_sync(now, base, high, entries);
                }
            }
            Message::CopyData { seq, data, .. } => {
                if let Role::Learning { source, .. } = self.role {
                    if from == source && seq > self.applied_prefix {
                        let pending = self
                            .log
                            .get(&seq)
                            .is_none_or(|le| le.state == EntryState::Pending);
                        if pending {
                            self.copy_data.insert(seq, data);
                            self.progress(now);
                        }
                    }
                }
            }
            Message::ChecksumIs { seq, checksum, .. } => self.on_checksum(now, from, seq, checksum),
            Message::JoinAccept {
                membership,
                start_seq,
                dirty_regions,
            } => {
                // The source restarted our session (it took a duplicate or late request
                // for a restart): follow it. An accept older than ours is stale.
                if let Role::Learning {
                    source,
                    start_seq: mine,
                } = self.role
                {
                    if from == source && start_seq > mine && membership.epoch == self.epoch() {
                        self.rebase_learner(now, source, start_seq, dirty_regions);
                    }
                }
            }
            Message::NewEpoch { .. } | Message::JoinRequest { .. } => {}
        }
    }

    /// The driver's link to `peer` is connected (again): whatever was sent to it before was
    /// dropped. A node out of the volume asks to join now rather than at its next
    /// retransmission, and a source sends a learner again what it sent since the learner's
    /// applied prefix (the accept, if unanswered; ops; copy data). A restarted node's first
    /// `JoinRequest` goes out before its links are up, and the source accepts it (and reads
    /// and sends its first window of copies) before its own link back is: waiting for the
    /// timers cost a returning plex up to two `RETRANSMIT_MS` before its resync began
    /// (issue 4).
    pub fn link_up(&mut self, now: Millis, peer: PlexId) {
        match self.role {
            Role::Fenced => {}
            Role::Out | Role::Recovering { .. } => {
                self.next_join = self.next_join.min(now);
                self.timeout_out(now);
            }
            Role::Active => {
                let Some(l) = self.learners.get(&peer) else {
                    return;
                };
                let (heard, start_seq, from) = (l.heard, l.start_seq, l.applied_prefix + 1);
                if !heard {
                    self.send_accept(peer, start_seq);
                }
                // Its ops and copy data sent meanwhile were dropped too: send them again
                // now, not after a gap report or `RETRANSMIT_MS` (the copy window stalls
                // until then).
                self.on_resend(peer, from);
                self.resend_copy_data(now, Some(peer), 0);
            }
            _ => {}
        }
    }

    /// Timers: heartbeats, failure detection, retransmission, hold timeouts.
    pub fn handle_timeout(&mut self, now: Millis) {
        match self.role {
            Role::Fenced => return,
            Role::Out | Role::Recovering { .. } => {
                self.timeout_out(now);
                return;
            }
            _ => {}
        }
        self.last_timeout = Some(self.last_timeout.map_or(now, |t| t.max(now)));
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + HEARTBEAT_INTERVAL_MS;
            let ids: Vec<PlexId> = self.peers.keys().copied().collect();
            for id in ids {
                let ts_echo = self.peers.get(&id).and_then(|p| p.their_ts);
                let prefix = self.applied_prefix;
                self.send(
                    id,
                    Message::Heartbeat {
                        epoch: self.epoch(),
                        applied_prefix: prefix,
                        seq_high: self.seq_high,
                        ts: now,
                        echo: ts_echo.unwrap_or(NO_ECHO),
                    },
                );
            }
            let ids: Vec<PlexId> = self.learners.keys().copied().collect();
            for id in ids {
                self.heartbeat_learner(now, id);
            }
        }
        self.resend_copy_data(now, None, RETRANSMIT_MS);
        // Retransmit forwards not yet ordered.
        if matches!(self.role, Role::Active) && !self.i_am_sequencer() {
            let seqr = self.membership.sequencer;
            let floor = self.fwd_floor();
            let epoch = self.epoch();
            let mut out = Vec::new();
            for (fwd, p) in self.pending.iter_mut() {
                if p.seq.is_none() && now >= p.last_sent + RETRANSMIT_MS {
                    p.last_sent = now;
                    out.push(Message::Forward {
                        epoch,
                        fwd: *fwd,
                        floor,
                        meta: p.meta.clone(),
                    });
                }
            }
            for m in out {
                self.send(seqr, m);
            }
        }
        if let Role::Collecting { last_sent, .. } = &mut self.role {
            if now >= *last_sent + RETRANSMIT_MS {
                *last_sent = now;
                self.broadcast_new_epoch();
            }
        }
        let since = match self.role {
            Role::Holding { since } | Role::Joining { since } | Role::Collecting { since, .. } => {
                Some(since)
            }
            _ => None,
        };
        // While our CAS is outstanding, wait for its answer instead: the driver bounds every
        // witness call, and fencing now would throw away a CAS the witness may have granted
        // (a slow witness disk, not a partition), leaving the volume with no serving node.
        // Holding longer is safe: nothing is acknowledged while holding.
        if since.is_some_and(|s| now >= s + HOLD_TIMEOUT_MS) && !self.cas_outstanding {
            self.fence();
            return;
        }
        self.progress(now);
    }

    /// Source side of copy `seq`: the data `CopyOut` read (empty: zeros).
    pub fn copied_out(&mut self, now: Millis, seq: Seq, data: Bytes) {
        // Like `applied`: a read that finishes during a view change (Collecting, Joining)
        // still completes its log entry, which the view change keeps Issued; dropping it
        // would stall this plex's applied prefix forever (sim seed 421, a verify's read).
        if matches!(
            self.role,
            Role::Fenced | Role::Out | Role::Recovering { .. }
        ) {
            return;
        }
        let Some(le) = self.log.get_mut(&seq) else {
            return;
        };
        let Some(Internal::Copy { target, .. }) = Internal::of(&le.entry) else {
            return;
        };
        if le.state != EntryState::Issued {
            return;
        }
        le.state = EntryState::Applied;
        let epoch = self.epoch();
        let region_cost = self.region_cost();
        let mut send = false;
        if let Some(l) = self.learners.get_mut(&target) {
            if let Some(c) = l.copies.get_mut(&seq) {
                c.data = Some(data.clone());
                c.sent_at = now;
                l.copied_bytes += data.len() as u64;
                send = true;
                // A hole costs no tokens (RESYNC.md).
                if data.is_empty() && c.region.is_some() && self.rate > 0 {
                    self.tokens += region_cost;
                }
            }
        }
        if send {
            self.send(target, Message::CopyData { epoch, seq, data });
        }
        self.advance_applied_prefix();
        self.progress(now);
    }

    /// Verify: the local checksum of verify op `seq`'s region.
    pub fn checksummed(&mut self, now: Millis, seq: Seq, checksum: [u8; 32]) {
        // See `copied_out`: complete the entry in any role that keeps a log.
        if matches!(
            self.role,
            Role::Fenced | Role::Out | Role::Recovering { .. }
        ) {
            return;
        }
        let Some(le) = self.log.get_mut(&seq) else {
            return;
        };
        if le.state != EntryState::Issued
            || !matches!(Internal::of(&le.entry), Some(Internal::Verify { .. }))
        {
            return;
        }
        le.state = EntryState::Applied;
        let me = self.cfg.me;
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            // Mid view change: the verify was dropped with the old epoch; nothing to report.
        } else if self.i_am_sequencer() {
            self.on_checksum(now, me, seq, checksum);
        } else {
            let epoch = self.epoch();
            let seqr = self.membership.sequencer;
            self.send(
                seqr,
                Message::ChecksumIs {
                    epoch,
                    seq,
                    checksum,
                },
            );
        }
        self.advance_applied_prefix();
        self.progress(now);
    }

    /// Resync throttle in bytes/s (0: unthrottled), changeable at run time.
    pub fn set_resync_rate(&mut self, bytes_per_sec: u64) {
        if self.rate == 0 {
            // From unthrottled: start with a full bucket.
            self.tokens = self.burst();
        }
        self.rate = bytes_per_sec;
        self.tokens = self.tokens.min(self.burst());
    }

    /// Start an online verify of every region across the in-sync plexes (sequencer only).
    /// `repair` is accepted but only logged by the driver: with every plex InSync there is
    /// no authoritative copy to repair from.
    pub fn start_verify(&mut self, now: Millis, repair: bool) -> Result<(), &'static str> {
        if !matches!(self.role, Role::Active) || !self.i_am_sequencer() {
            return Err("not the serving sequencer");
        }
        if self.verify.is_some() {
            return Err("a verify is running");
        }
        if self.cfg.volume_blocks == 0 {
            return Err("volume size unknown");
        }
        let total = self.region_map().regions_of_volume(self.cfg.volume_blocks);
        self.verify = Some(Verify {
            next_region: 0,
            members: self.in_sync_ids(),
            outstanding: BTreeMap::new(),
            repair,
            differs: BTreeMap::new(),
        });
        self.verify_info = VerifyInfo {
            running: true,
            regions_total: total,
            regions_done: 0,
            mismatched: Vec::new(),
        };
        self.progress(now);
        Ok(())
    }

    /// Resyncs this node takes part in: as the source, one per stale plex it keeps a bitmap
    /// for (progress of the running copy, if any); as a learner, its own counts.
    pub fn resync_status(&self) -> Vec<(ResyncRole, ResyncInfo)> {
        if let Some(t) = self.target {
            return vec![(ResyncRole::Target, t)];
        }
        if !self.i_am_sequencer() || !self.is_in_sync(self.cfg.me) {
            return Vec::new();
        }
        let rb = self.cfg.region_bytes;
        self.bitmaps
            .iter()
            .map(|(p, bm)| {
                let l = self.learners.get(p);
                let (done, copied, full) =
                    l.map_or((0, 0, false), |l| (l.done_bytes, l.copied_bytes, l.full));
                let remaining = bm.len() as u64 * rb;
                (
                    ResyncRole::Source,
                    ResyncInfo {
                        plex: *p,
                        full,
                        total_bytes: done + remaining,
                        done_bytes: done,
                        copied_bytes: copied,
                    },
                )
            })
            .collect()
    }

    /// The last (or running) verify.
    pub fn verify_status(&self) -> VerifyInfo {
        self.verify_info.clone()
    }

    // ----- internals -----

    fn progress(&mut self, now: Millis) {
        self.check_suspects(now);
        if matches!(self.role, Role::Out) {
            return;
        }
        self.check_learners(now);
        self.try_apply();
        self.check_commits(now);
        self.gc();
        self.start_held(now);
        if self.schedule_resync(now) {
            self.try_apply();
        }
        self.maybe_rejoin(now);
        self.report_progress();
    }

    fn heartbeat_learner(&mut self, now: Millis, t: PlexId) {
        // To a learner the source reports its *settled* prefix: the learner's log GC (and
        // the activity log behind it) must not pass what every in-sync plex applied, or a
        // copy of an op only the source applied could go unrecorded.
        let m = Message::Heartbeat {
            epoch: self.epoch(),
            applied_prefix: self.settled,
            seq_high: self.seq_high,
            ts: now,
            echo: NO_ECHO,
        };
        self.send(t, m);
    }

    /// Send `Progress` to every peer (and learner) that is [`PROGRESS_STEP`] behind on my
    /// applied (to a learner: settled) prefix.
    fn report_progress(&mut self) {
        if !matches!(
            self.role,
            Role::Active | Role::Holding { .. } | Role::Learning { .. }
        ) {
            return;
        }
        let epoch = self.epoch();
        let mine = self.applied_prefix;
        // A learner applied what its source's last heartbeat asked for (see `prefix_wanted`).
        let wanted = matches!(self.role, Role::Learning { .. })
            && self.prefix_wanted.is_some_and(|w| mine >= w);
        if wanted {
            self.prefix_wanted = None;
        }
        let behind: Vec<PlexId> = self
            .peers
            .iter()
            .filter(|(_, p)| mine >= p.told + PROGRESS_STEP || (wanted && mine > p.told))
            .map(|(id, _)| *id)
            .collect();
        for id in behind {
            self.send(
                id,
                Message::Progress {
                    epoch,
                    applied_prefix: mine,
                },
            );
        }
        // A learner settles at the source's settled prefix (see the heartbeat to it).
        let settled = self.settled;
        let behind: Vec<PlexId> = self
            .learners
            .iter_mut()
            .filter(|(_, l)| settled >= l.told + PROGRESS_STEP)
            .map(|(id, l)| {
                l.told = settled;
                *id
            })
            .collect();
        for id in behind {
            self.send(
                id,
                Message::Progress {
                    epoch,
                    applied_prefix: settled,
                },
            );
        }
    }

    /// A peer reported its applied prefix.
    fn peer_prefix(&mut self, from: PlexId, prefix: Seq) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.applied_prefix = p.applied_prefix.max(prefix);
        }
    }

    fn suspects(&self, now: Millis) -> BTreeSet<PlexId> {
        self.peers
            .iter()
            .filter(|(_, p)| now >= p.last_heard + PEER_TIMEOUT_MS)
            .map(|(id, _)| *id)
            .collect()
    }

    fn check_suspects(&mut self, now: Millis) {
        let suspects = self.suspects(now);
        if let Role::Learning { .. } = self.role {
            // The source went silent (or dropped us): ask again.
            if !suspects.is_empty() {
                self.go_out(Role::Out);
                self.next_join = now;
            }
            return;
        }
        match self.role {
            Role::Active if !suspects.is_empty() => {
                self.role = Role::Holding { since: now };
                self.set_path(PathState::Transitioning);
            }
            Role::Holding { .. } if suspects.is_empty() && !self.cas_outstanding => {
                self.role = Role::Active;
                self.set_path(PathState::ActiveOptimized);
            }
            _ => {}
        }
        if suspects.is_empty() || self.cas_outstanding {
            return;
        }
        if !matches!(
            self.role,
            Role::Holding { .. } | Role::Collecting { .. } | Role::Joining { .. }
        ) {
            return;
        }
        // The coordinator is the lowest in-sync plex nobody here suspects.
        let coordinator = self
            .in_sync_ids()
            .into_iter()
            .find(|id| !suspects.contains(id));
        if coordinator != Some(self.cfg.me) {
            return;
        }
        let mut record = self.membership.clone();
        record.epoch += 1;
        for p in record.plexes.iter_mut() {
            if suspects.contains(&p.id) && p.state == PlexState::InSync {
                p.state = PlexState::Stale;
            }
        }
        record.sequencer = self.cfg.me;
        self.cas_outstanding = true;
        self.cmds.push_back(Command::WitnessCas {
            expected_epoch: self.epoch(),
            record,
        });
    }

    fn on_heartbeat(
        &mut self,
        now: Millis,
        from: PlexId,
        prefix: Seq,
        seq_high: Seq,
        ts: Millis,
        echo: Millis,
    ) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.their_ts = Some(p.their_ts.map_or(ts, |t| t.max(ts)));
            if echo != NO_ECHO {
                // A timestamp from the future (a confused peer) must not stretch the lease.
                let echo = echo.min(now);
                p.lease_from = Some(p.lease_from.map_or(echo, |l| l.max(echo)));
            }
        }
        self.peer_prefix(from, prefix);
        self.ack_from(from, |s| s <= prefix);
        if from == self.membership.sequencer && matches!(self.role, Role::Joining { .. }) {
            // Still waiting for the coordinator's `Sync` while it serves: it was lost.
            self.send_state();
        }
        if from == self.membership.sequencer && matches!(self.role, Role::Learning { .. }) {
            self.prefix_wanted = Some(self.prefix_wanted.unwrap_or(0).max(seq_high));
        }
        if from == self.membership.sequencer
            && matches!(
                self.role,
                Role::Active | Role::Holding { .. } | Role::Learning { .. }
            )
        {
            let known = self.known_prefix();
            if seq_high > known {
                self.send(
                    from,
                    Message::Resend {
                        epoch: self.epoch(),
                        from: known + 1,
                    },
                );
            }
        }
        self.progress(now);
    }

    fn on_forward(&mut self, now: Millis, from: PlexId, fwd: u64, floor: u64, meta: OpMeta) {
        if !matches!(self.role, Role::Active)
            || !self.i_am_sequencer()
            || !self.lease_valid(now)
            || self.rejoin.is_some()
        {
            return; // the origin retransmits
        }
        let seen = self.fwd_seen.entry(from).or_default();
        seen.floor = seen.floor.max(floor);
        let f = seen.floor;
        seen.seqs.retain(|k, _| *k > f);
        if fwd <= seen.floor {
            return;
        }
        if let Some(&seq) = seen.seqs.get(&fwd) {
            let epoch = self.epoch();
            self.send(from, Message::Ordered { epoch, seq, fwd });
            return;
        }
        if self.log.len() >= LOG_ENTRIES_MAX {
            return;
        }
        self.sequence(from, fwd, meta);
        self.progress(now);
    }

    fn sequence(&mut self, origin: PlexId, fwd: u64, meta: OpMeta) -> Seq {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.seq_high = seq;
        let entry = Entry {
            seq,
            tag: self.epoch(),
            origin,
            fwd,
            meta,
        };
        if origin != INTERNAL_ORIGIN {
            self.fwd_seen
                .entry(origin)
                .or_default()
                .seqs
                .insert(fwd, seq);
        }
        let epoch = self.epoch();
        let ids: Vec<PlexId> = self
            .peers
            .keys()
            .chain(self.learners.keys())
            .copied()
            .collect();
        for id in ids {
            let msg = if id == origin {
                Message::Ordered { epoch, seq, fwd }
            } else {
                Message::Apply {
                    epoch,
                    entry: entry.clone(),
                }
            };
            self.send(id, msg);
        }
        self.log.insert(
            seq,
            LogEntry {
                entry,
                state: EntryState::Pending,
            },
        );
        seq
    }

    fn on_apply(&mut self, now: Millis, entry: Entry) {
        if !matches!(
            self.role,
            Role::Active | Role::Holding { .. } | Role::Learning { .. }
        ) {
            return;
        }
        if entry.seq <= self.settled || self.log.contains_key(&entry.seq) {
            return;
        }
        if entry.origin == self.cfg.me {
            if let Some(p) = self.pending.get_mut(&entry.fwd) {
                p.seq_known(entry.seq, &self.peers);
            }
        }
        self.log.insert(
            entry.seq,
            LogEntry {
                entry,
                state: EntryState::Pending,
            },
        );
        self.progress(now);
    }

    fn on_ordered(&mut self, now: Millis, seq: Seq, fwd: u64) {
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            return;
        }
        if seq <= self.settled || self.log.contains_key(&seq) {
            return;
        }
        let Some(p) = self.pending.get_mut(&fwd) else {
            return;
        };
        if p.seq.is_some() {
            return;
        }
        p.seq_known(seq, &self.peers);
        let entry = Entry {
            seq,
            tag: self.membership.epoch,
            origin: self.cfg.me,
            fwd,
            meta: p.meta.clone(),
        };
        self.log.insert(
            seq,
            LogEntry {
                entry,
                state: EntryState::Pending,
            },
        );
        self.progress(now);
    }

    fn on_resend(&mut self, to: PlexId, start: Seq) {
        if !self.i_am_sequencer() {
            return;
        }
        let mut start = start;
        if let Some(session) = self.learners.get(&to).map(|l| l.start_seq) {
            if start < session {
                // It asks for a seq of an older session: it never got the accept that
                // restarted its session (after a late or duplicated `JoinRequest`), so it
                // would wait for copies that session retired. The same accept again; a
                // learner already in this session ignores it. (Sim seed 11422, copy window
                // 16: the re-accept was lost and the learner asked for its old seqs forever.)
                self.send_accept(to, session);
                // A learner never gets ops before its start (the copies cover them).
                start = session;
            }
        }
        let epoch = self.epoch();
        let out: Vec<Message> = self
            .log
            .range(start..)
            .map(|(_, le)| Message::Apply {
                epoch,
                entry: le.entry.clone(),
            })
            .collect();
        for m in out {
            self.send(to, m);
        }
    }

    /// Highest seq such that every seq up to it is known (settled or in the log).
    fn known_prefix(&self) -> Seq {
        let mut k = self.settled;
        for s in self.log.keys() {
            if *s == k + 1 {
                k += 1;
            } else if *s > k + 1 {
                break;
            }
        }
        k
    }

    /// Emit `Apply` (or the copy / checksum command of an internal op) for every op whose
    /// predecessors are all known and none of the earlier overlapping ones is still unapplied.
    fn try_apply(&mut self) {
        let learning = matches!(self.role, Role::Learning { .. });
        if !matches!(self.role, Role::Active | Role::Holding { .. }) && !learning {
            return;
        }
        let me = self.cfg.me;
        let source = self.i_am_sequencer() && self.is_in_sync(me) && !learning;
        let in_sync = self.is_in_sync(me) && !learning;
        let mut busy: Vec<OpRange> = Vec::new();
        let mut issue: Vec<Seq> = Vec::new();
        let mut noop: Vec<Seq> = Vec::new();
        // Only the contiguous known prefix: an unknown earlier op might overlap.
        for (expect, (s, le)) in (self.settled + 1..).zip(self.log.iter()) {
            if *s != expect {
                break;
            }
            let r = le.entry.meta.range;
            match le.state {
                EntryState::Applied => {}
                EntryState::Issued => busy.push(r),
                EntryState::Pending => {
                    let free = !busy.iter().any(|b| b.overlaps(&r));
                    let does_io = match Internal::of(&le.entry) {
                        None if le.entry.origin == INTERNAL_ORIGIN => false,
                        None => true,
                        Some(Internal::Copy { target, .. }) => {
                            (source
                                && self
                                    .learners
                                    .get(&target)
                                    .is_some_and(|l| l.copies.contains_key(s)))
                                || (learning && target == me)
                        }
                        Some(Internal::Verify { .. }) => in_sync,
                    };
                    if !does_io {
                        // Copies for another plex, verifies on a learner: no local effect.
                        if free {
                            noop.push(*s);
                        } else {
                            busy.push(r);
                        }
                        continue;
                    }
                    let waiting_data = learning
                        && matches!(Internal::of(&le.entry), Some(Internal::Copy { .. }))
                        && !self.copy_data.contains_key(s);
                    if free && !waiting_data {
                        issue.push(*s);
                    }
                    busy.push(r);
                }
            }
        }
        for s in noop {
            if let Some(le) = self.log.get_mut(&s) {
                le.state = EntryState::Applied;
            }
        }
        for s in issue {
            let Some(le) = self.log.get_mut(&s) else {
                continue;
            };
            le.state = EntryState::Issued;
            let range = le.entry.meta.range;
            let cmd = match Internal::of(&le.entry) {
                Some(Internal::Copy { what, .. }) if learning => {
                    let data = self.copy_data.remove(&s).unwrap_or_default();
                    self.io_inflight.insert(s);
                    Command::CopyIn { seq: s, what, data }
                }
                Some(Internal::Copy { what, .. }) => Command::CopyOut { seq: s, what },
                Some(Internal::Verify { region, range }) => Command::Checksum {
                    seq: s,
                    region,
                    range,
                },
                None => {
                    self.io_inflight.insert(s);
                    let cmd = Command::Apply {
                        epoch: self.membership.epoch,
                        seq: s,
                        origin: le.entry.origin,
                        op: le.entry.meta.clone(),
                    };
                    self.mark_dirty(Some(s), range);
                    cmd
                }
            };
            self.cmds.push_back(cmd);
        }
        self.advance_applied_prefix();
    }

    /// Before an op a stale plex misses is applied here, set its regions in that plex's
    /// bitmap (persisted by the driver first). A learner gets ops from its start on.
    fn mark_dirty(&mut self, seq: Option<Seq>, r: OpRange) {
        let OpRange::Blocks(r) = r else {
            return;
        };
        if !self.is_in_sync(self.cfg.me) || matches!(self.role, Role::Learning { .. }) {
            return;
        }
        for p in self.stale_ids() {
            if let (Some(l), Some(s)) = (self.learners.get(&p), seq) {
                if s >= l.start_seq {
                    continue;
                }
            }
            self.ensure_bitmap(p, true);
            let Some(bm) = self.bitmaps.get_mut(&p) else {
                continue;
            };
            let regions = bm.mark_new(&r);
            if !regions.is_empty() {
                self.cmds
                    .push_back(Command::MarkDirtyRegions { plex: p, regions });
            }
        }
    }

    fn advance_applied_prefix(&mut self) {
        let mut p = self.applied_prefix.max(self.settled);
        while self
            .log
            .get(&(p + 1))
            .is_some_and(|le| le.state == EntryState::Applied)
        {
            p += 1;
        }
        self.applied_prefix = p;
    }

    fn ack_from(&mut self, from: PlexId, applies: impl Fn(Seq) -> bool) {
        for p in self.pending.values_mut() {
            if p.seq.is_some_and(&applies) {
                p.acks.insert(from);
            }
        }
    }

    fn check_commits(&mut self, now: Millis) {
        if !matches!(self.role, Role::Active | Role::Holding { .. }) || !self.lease_valid(now) {
            return;
        }
        let need: Vec<PlexId> = self.in_sync_ids();
        let done: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.response.is_some() && need.iter().all(|id| p.acks.contains(id)))
            .map(|(f, _)| *f)
            .collect();
        for f in done {
            if let Some(p) = self.pending.remove(&f) {
                let resp = p.response.unwrap_or_default();
                self.complete(p.op, Outcome::Done(resp));
            }
        }
    }

    fn gc(&mut self) {
        if !matches!(
            self.role,
            Role::Active | Role::Holding { .. } | Role::Learning { .. }
        ) {
            return;
        }
        let stable = self
            .peers
            .values()
            .map(|p| p.applied_prefix)
            .chain(self.learners.values().map(|l| l.applied_prefix))
            .chain(std::iter::once(self.applied_prefix))
            .min()
            .unwrap_or(self.applied_prefix);
        if stable > self.settled {
            self.log = self.log.split_off(&(stable + 1));
            self.settled = stable;
            self.cmds.push_back(Command::Settled { up_to: stable });
        }
    }

    fn start_held(&mut self, now: Millis) {
        if !matches!(self.role, Role::Active) || !self.lease_valid(now) || self.rejoin.is_some() {
            return;
        }
        while self.log.len() + self.pending.len() < LOG_ENTRIES_MAX {
            let Some((op, meta)) = self.held.pop_front() else {
                break;
            };
            let fwd = self.next_fwd;
            self.next_fwd += 1;
            self.pending.insert(
                fwd,
                Pending {
                    op,
                    meta: meta.clone(),
                    seq: None,
                    acks: BTreeSet::new(),
                    response: None,
                    last_sent: now,
                },
            );
            self.dispatch(fwd, meta);
        }
        self.try_apply();
    }

    /// Order a pending op: locally if I am the sequencer, else forward it.
    fn dispatch(&mut self, fwd: u64, meta: OpMeta) {
        if self.i_am_sequencer() {
            let seq = self.sequence(self.cfg.me, fwd, meta);
            if let Some(p) = self.pending.get_mut(&fwd) {
                p.seq = Some(seq);
            }
        } else {
            let floor = self.fwd_floor();
            let m = Message::Forward {
                epoch: self.epoch(),
                fwd,
                floor,
                meta,
            };
            self.send(self.membership.sequencer, m);
        }
    }

    fn fwd_floor(&self) -> u64 {
        self.pending
            .iter()
            .find(|(_, p)| p.seq.is_none())
            .map_or(self.next_fwd - 1, |(f, _)| f - 1)
    }

    // ----- view change -----

    fn my_state(&self) -> EpochState {
        EpochState {
            settled: self.settled,
            active_epoch: self.active_epoch,
            active_base: self.active_base,
            entries: self
                .log
                .values()
                .map(|le| (le.entry.clone(), le.state != EntryState::Pending))
                .collect(),
        }
    }

    fn send_state(&mut self) {
        let m = Message::State {
            epoch: self.epoch(),
            state: self.my_state(),
        };
        self.send(self.membership.sequencer, m);
    }

    fn broadcast_new_epoch(&mut self) {
        let missing: Vec<PlexId> = match &self.role {
            Role::Collecting { states, .. } => self
                .peers
                .keys()
                .filter(|id| !states.contains_key(id))
                .copied()
                .collect(),
            _ => return,
        };
        for id in missing {
            self.send(
                id,
                Message::NewEpoch {
                    membership: self.membership.clone(),
                },
            );
        }
    }

    /// Adopt a newer record learned from a peer or a lost CAS.
    fn adopt(&mut self, now: Millis, m: Membership) {
        if m.epoch <= self.epoch() {
            return;
        }
        let in_sync = m
            .plexes
            .iter()
            .any(|p| p.id == self.cfg.me && p.state == PlexState::InSync);
        if !in_sync || m.sequencer == self.cfg.me {
            // Out of the new epoch (or named its coordinator without knowing it): stay out.
            self.membership = m;
            self.go_out(Role::Out);
            return;
        }
        self.switch_epoch(now, m);
        self.role = Role::Joining { since: now };
        self.set_path(PathState::Transitioning);
        self.send_state();
    }

    /// Enter a new epoch: freeze, keep liveness and leases, forget acks of the old epoch.
    fn switch_epoch(&mut self, now: Millis, m: Membership) {
        let me = self.cfg.me;
        let was_in_sync =
            self.is_in_sync(me) && !matches!(self.role, Role::Learning { .. } | Role::Out);
        let old = std::mem::replace(&mut self.membership, m);
        self.last_sync = None;
        let keep: BTreeSet<PlexId> = self.in_sync_ids().into_iter().collect();
        self.peers.retain(|id, _| keep.contains(id));
        for id in keep {
            if id != self.cfg.me {
                self.peers.entry(id).or_insert_with(|| Peer {
                    last_heard: now,
                    ..Peer::default()
                });
            }
        }
        for p in self.peers.values_mut() {
            p.applied_prefix = 0;
        }
        for p in self.pending.values_mut() {
            p.acks.retain(|id| *id == me);
        }
        self.fwd_seen.clear();
        // Learners: one made InSync (the rejoin) is a member now; the others may have missed
        // any unsettled op and ask again later.
        let ls: Vec<PlexId> = self.learners.keys().copied().collect();
        for t in ls {
            if self.is_in_sync(t) {
                self.learners.remove(&t);
            } else {
                self.drop_learner(t);
            }
        }
        self.rejoin = None;
        if self.verify.take().is_some() {
            self.verify_info.running = false;
        }
        if self.is_in_sync(me) {
            // A plex that goes stale now starts with the unsettled log (below); one that was
            // stale while this node was not in sync is unknown to it: copy all of it.
            for p in self.stale_ids() {
                let was_in_sync_too = was_in_sync
                    && old
                        .plexes
                        .iter()
                        .any(|r| r.id == p && r.state == PlexState::InSync);
                self.ensure_bitmap(p, was_in_sync_too);
            }
        }
        let gone: Vec<PlexId> = self
            .bitmaps
            .keys()
            .filter(|p| !self.stale_ids().contains(p) && !self.is_in_sync(**p))
            .copied()
            .collect();
        for p in gone {
            self.bitmaps.remove(&p);
            self.filled.remove(&p);
            self.cmds.push_back(Command::DropBitmap { plex: p });
        }
        let ranges = self.write_ranges();
        for r in ranges {
            self.mark_dirty(None, r);
        }
    }

    fn try_finish_collect(&mut self, now: Millis) {
        let Role::Collecting { states, .. } = &self.role else {
            return;
        };
        if self.peers.keys().any(|id| !states.contains_key(id)) {
            return;
        }
        // The newest serving epoch among members and the cut it started from: entries of
        // older epochs beyond that cut were discarded by it and must not come back.
        let (a_star, h_star) = states
            .values()
            .map(|s| (s.active_epoch, s.active_base))
            .max()
            .unwrap_or((0, 0));
        let base = states.values().map(|s| s.settled).max().unwrap_or(0);
        let mut union: BTreeMap<Seq, Entry> = BTreeMap::new();
        for s in states.values() {
            for (e, _) in &s.entries {
                if e.seq <= base || (e.tag < a_star && e.seq > h_star) {
                    continue;
                }
                match union.get(&e.seq) {
                    Some(old) if old.tag >= e.tag => {}
                    _ => {
                        union.insert(e.seq, e.clone());
                    }
                }
            }
        }
        let mut cut = Vec::new();
        let mut expect = base + 1;
        for (s, e) in union {
            if s != expect {
                break;
            }
            expect += 1;
            cut.push(e);
        }
        let high = expect - 1;
        let epoch = self.epoch();
        let sync = Message::Sync {
            epoch,
            base,
            high,
            entries: cut.clone(),
        };
        let ids: Vec<PlexId> = self.peers.keys().copied().collect();
        for id in ids {
            self.send(id, sync.clone());
        }
        self.last_sync = Some(sync);
        self.next_seq = high + 1;
        self.seq_high = high;
        self.apply_sync(now, base, high, cut);
    }

    /// Take the reconciled log `(base, high]` and start serving the new epoch.
    fn apply_sync(&mut self, now: Millis, base: Seq, high: Seq, cut: Vec<Entry>) {
        let mut old = std::mem::take(&mut self.log);
        let mut new = BTreeMap::new();
        for e in cut {
            let state = match old.remove(&e.seq) {
                Some(le) if le.entry.tag == e.tag && le.state != EntryState::Pending => le.state,
                _ => EntryState::Pending,
            };
            new.insert(e.seq, LogEntry { entry: e, state });
        }
        self.log = new;
        self.settled = self.settled.max(base);
        self.applied_prefix = self.applied_prefix.min(high).max(self.settled);
        self.advance_applied_prefix();
        if self.i_am_sequencer() {
            for le in self.log.values() {
                self.fwd_seen
                    .entry(le.entry.origin)
                    .or_default()
                    .seqs
                    .insert(le.entry.fwd, le.entry.seq);
            }
        }
        // Rebind my ops: in the cut they keep their seq; the rest are ordered again.
        let me = self.cfg.me;
        let in_cut: BTreeMap<u64, Seq> = self
            .log
            .values()
            .filter(|le| le.entry.origin == me)
            .map(|le| (le.entry.fwd, le.entry.seq))
            .collect();
        let mut redo = Vec::new();
        let settled = self.settled;
        for (fwd, p) in self.pending.iter_mut() {
            match in_cut.get(fwd) {
                Some(&s) => p.seq = Some(s),
                // Settled before the view change: applied everywhere, heartbeats will ack it.
                None if p.seq.is_some_and(|s| s <= settled) => {}
                None => {
                    p.seq = None;
                    p.response = None;
                    p.acks.clear();
                    p.last_sent = now;
                    redo.push((*fwd, p.meta.clone()));
                }
            }
        }
        // Report ops I already applied to their origins under the new epoch.
        let epoch = self.epoch();
        let applied: Vec<(PlexId, Seq)> = self
            .log
            .values()
            .filter(|le| le.state == EntryState::Applied && le.entry.origin != me)
            .map(|le| (le.entry.origin, le.entry.seq))
            .collect();
        let applied_prefix = self.applied_prefix;
        for (origin, seq) in applied {
            if self.peers.contains_key(&origin) {
                self.send(
                    origin,
                    Message::Applied {
                        epoch,
                        seq,
                        applied_prefix,
                    },
                );
            }
        }
        let ranges = self.write_ranges();
        for r in ranges {
            self.mark_dirty(None, r);
        }
        self.active_epoch = epoch;
        self.active_base = high;
        self.role = Role::Active;
        self.set_path(PathState::ActiveOptimized);
        // The new epoch serves: bitmaps of plexes in sync again are done with.
        let synced: Vec<PlexId> = self
            .bitmaps
            .keys()
            .filter(|p| self.is_in_sync(**p))
            .copied()
            .collect();
        for p in synced {
            self.bitmaps.remove(&p);
            self.filled.remove(&p);
            self.cmds.push_back(Command::DropBitmap { plex: p });
        }
        self.data_valid = true;
        // Back in sync through a resync: what the activity log covered was copied.
        if self.target.take().is_some() || !self.own_dirty.is_empty() {
            self.own_dirty.clear();
            self.cmds.push_back(Command::ActivityLogAbsorbed);
        }
        self.copy_data.clear();
        for (fwd, meta) in redo {
            self.dispatch(fwd, meta);
        }
        self.progress(now);
    }

    fn fence(&mut self) {
        self.go_out(Role::Fenced);
    }

    fn go_out(&mut self, role: Role) {
        // Ops this plex applied (or is applying) may be missing elsewhere: report them when
        // it asks to be resynced.
        let rm = self.region_map();
        let mut new = Vec::new();
        for le in self.log.values() {
            // Copies it wrote count too: they may carry ops only the source applied.
            let writes = match Internal::of(&le.entry) {
                Some(Internal::Verify { .. }) => false,
                Some(Internal::Copy { target, .. }) => target == self.cfg.me,
                None => true,
            };
            if let (OpRange::Blocks(r), EntryState::Issued | EntryState::Applied, true) =
                (le.entry.meta.range, le.state, writes)
            {
                new.extend(rm.regions_of(&r).filter(|g| self.own_dirty.insert(*g)));
            }
        }
        // Those already in `own_dirty` are kept already (by an earlier `go_out`, or loaded at
        // restart).
        if !new.is_empty() {
            self.cmds
                .push_back(Command::KeepInActivityLog { regions: new });
        }
        // A bitmap is only valid while this node stays in sync (a fenced node keeps its
        // persisted ones: they were complete when it stopped).
        if matches!(role, Role::Out) {
            let bms: Vec<PlexId> = self.bitmaps.keys().copied().collect();
            for p in bms {
                self.cmds.push_back(Command::DropBitmap { plex: p });
            }
            self.bitmaps.clear();
            self.filled.clear();
            self.next_join = 0;
        }
        self.learners.clear();
        self.rejoin = None;
        if self.verify.take().is_some() {
            self.verify_info.running = false;
        }
        self.copy_data.clear();
        self.role = role;
        self.cas_outstanding = false;
        let pending = std::mem::take(&mut self.pending);
        for p in pending.into_values() {
            self.complete(p.op, Outcome::Retry);
        }
        let held = std::mem::take(&mut self.held);
        for (op, _) in held {
            self.complete(op, Outcome::Retry);
        }
        self.log.clear();
        self.peers.clear();
        self.set_path(PathState::Unavailable);
    }

    // ----- resync: the joining side -----

    /// Out or Recovering: only the resync handshake matters.
    fn on_message_out(&mut self, now: Millis, from: PlexId, msg: Message) {
        let me = self.cfg.me;
        match msg {
            Message::JoinAccept {
                membership,
                start_seq,
                dirty_regions,
            } => {
                let listed_in_sync = membership
                    .plexes
                    .iter()
                    .any(|p| p.id == me && p.state == PlexState::InSync);
                if membership.epoch < self.epoch()
                    || membership.sequencer != from
                    || listed_in_sync
                    || !self.io_inflight.is_empty()
                    || self.cas_outstanding
                {
                    return;
                }
                self.become_learner(now, from, membership, start_seq, dirty_regions);
            }
            Message::JoinRequest { .. } => {}
            msg => {
                let m = match &msg {
                    Message::NewEpoch { membership } => Some(membership.clone()),
                    _ => None,
                };
                if let Some(m) = m {
                    if m.epoch > self.epoch() {
                        let in_sync = m
                            .plexes
                            .iter()
                            .any(|p| p.id == me && p.state == PlexState::InSync);
                        self.membership = m;
                        self.role = if in_sync && self.data_valid && self.membership.sequencer != me
                        {
                            Role::Recovering { since: now }
                        } else {
                            Role::Out
                        };
                        return;
                    }
                }
                // Any message from a peer listed InSync (a heartbeat of an epoch it still
                // serves, its answer to our JoinRequest) shows it alive: it will exclude us
                // (RESYNC.md), so a recovering node keeps waiting.
                if let Role::Recovering { since } = &mut self.role {
                    if msg.epoch() >= self.membership.epoch
                        && self
                            .membership
                            .plexes
                            .iter()
                            .any(|p| p.id == from && p.state == PlexState::InSync)
                    {
                        *since = (*since).max(now);
                    }
                }
            }
        }
    }

    fn timeout_out(&mut self, now: Millis) {
        if matches!(self.role, Role::Out) {
            self.drop_recovered_bitmaps();
        }
        if !self.io_inflight.is_empty() {
            return;
        }
        if now >= self.next_join {
            self.next_join = now + RETRANSMIT_MS;
            let me = self.cfg.me;
            let to: Vec<PlexId> = self
                .membership
                .plexes
                .iter()
                .filter(|p| p.id != me && p.state != PlexState::Removed)
                .map(|p| p.id)
                .collect();
            let activity_log: Vec<u64> = self
                .own_dirty
                .iter()
                .copied()
                .take(super::msg::ACTIVITY_LOG_REGIONS_MAX)
                .collect();
            for id in to {
                self.send(
                    id,
                    Message::JoinRequest {
                        epoch: self.epoch(),
                        activity_log: activity_log.clone(),
                        full: !self.data_valid,
                        fresh: !self.data_valid && !self.accepted,
                    },
                );
            }
        }
        if let Role::Recovering { since } = self.role {
            if !self.cas_outstanding && now >= self.recover_deadline(since) {
                // No in-sync peer serves: become the sole source (a lost CAS adopts).
                let mut record = self.membership.clone();
                record.epoch += 1;
                record.sequencer = self.cfg.me;
                for p in record.plexes.iter_mut() {
                    if p.id != self.cfg.me && p.state == PlexState::InSync {
                        p.state = PlexState::Stale;
                    }
                }
                self.cas_outstanding = true;
                self.proposed = Some(record.clone());
                self.cmds.push_back(Command::WitnessCas {
                    expected_epoch: self.epoch(),
                    record,
                });
            }
        }
    }

    fn recover_deadline(&self, since: Millis) -> Millis {
        if self.in_sync_ids() == [self.cfg.me] {
            since
        } else {
            since + RECOVER_WAIT_MS
        }
    }

    fn recovery_result(&mut self, now: Millis, result: Result<Membership, WitnessError>) {
        let proposed = self.proposed.take();
        let m = match result {
            Ok(m) => m,
            Err(WitnessError::Conflict(m)) => *m,
            // Unknown outcome: ask again later; a granted CAS comes back as a conflict that
            // equals our proposal.
            // Out meanwhile: a newer record exists, so that CAS cannot have been granted.
            Err(_) => {
                if let Role::Recovering { since } = &mut self.role {
                    *since = now.saturating_sub(RECOVER_WAIT_MS) + RETRANSMIT_MS;
                    self.proposed = proposed;
                }
                return;
            }
        };
        if proposed.as_ref() == Some(&m) {
            self.recover_win(now, m);
            return;
        }
        if m.epoch > self.epoch() {
            let me = self.cfg.me;
            let in_sync = m
                .plexes
                .iter()
                .any(|p| p.id == me && p.state == PlexState::InSync);
            self.membership = m;
            self.role = if in_sync {
                Role::Recovering { since: now }
            } else {
                Role::Out
            };
            self.next_join = now;
        }
    }

    /// Sole source after every node crashed: bitmaps = persisted ∪ own activity log.
    fn recover_win(&mut self, now: Millis, m: Membership) {
        let old = std::mem::replace(&mut self.membership, m);
        let me = self.cfg.me;
        let mut recovered = std::mem::take(&mut self.recovered_bitmaps);
        let recovered_filled = std::mem::take(&mut self.recovered_filled);
        for p in self.stale_ids() {
            let mut bm = self.region_map();
            // Whether a full request from `p` may resume from this bitmap (see below).
            let mut complete = recovered_filled.contains(&p);
            match recovered.remove(&p) {
                Some(regions) => regions.into_iter().for_each(|r| {
                    bm.set(r);
                }),
                None => {
                    let was_in_sync = old
                        .plexes
                        .iter()
                        .any(|r| r.id == p && r.state == PlexState::InSync);
                    if !was_in_sync {
                        bm.fill(bm.regions_of_volume(self.cfg.volume_blocks));
                        complete = true;
                    }
                }
            }
            for r in &self.own_dirty {
                bm.set(*r);
            }
            let regions: Vec<u64> = bm.regions().collect();
            self.cmds
                .push_back(Command::MarkDirtyRegions { plex: p, regions });
            self.bitmaps.insert(p, bm);
            // A full request resumes only from a bitmap this node filled (then the regions
            // clear in it were copied by this node). One it kept without filling may lack
            // regions a wiped plex never got from the source that died (3-way): the plex's
            // next full request refills it (sim wipe-heavy seed 775).
            if complete {
                self.filled.insert(p);
            }
        }
        for p in recovered.into_keys() {
            if p != me {
                self.cmds.push_back(Command::DropBitmap { plex: p });
            }
        }
        self.own_dirty.clear();
        self.cmds.push_back(Command::ActivityLogAbsorbed);
        // Seqs stay monotonic across a recovery (the old ones are unknown): epoch-major.
        let base = (self.epoch() << RECOVERY_SEQ_SHIFT).max(self.next_seq);
        self.log.clear();
        self.settled = base - 1;
        self.applied_prefix = base - 1;
        self.next_seq = base;
        self.seq_high = base - 1;
        self.active_epoch = self.epoch();
        self.active_base = base - 1;
        self.role = Role::Active;
        self.reset_peers(now);
        self.set_path(PathState::ActiveOptimized);
        self.progress(now);
    }

    /// Bitmaps persisted by an earlier life are only valid if this node recovers as the
    /// source: a stale node must delete them, or a later recovery would trust them.
    fn drop_recovered_bitmaps(&mut self) {
        let old = std::mem::take(&mut self.recovered_bitmaps);
        for p in old.into_keys() {
            self.cmds.push_back(Command::DropBitmap { plex: p });
        }
    }

    fn become_learner(
        &mut self,
        now: Millis,
        source: PlexId,
        m: Membership,
        start_seq: Seq,
        dirty_regions: u64,
    ) {
        self.drop_recovered_bitmaps();
        self.membership = m;
        self.role = Role::Learning { source, start_seq };
        self.prefix_wanted = None;
        self.log.clear();
        self.copy_data.clear();
        self.settled = start_seq.saturating_sub(1);
        self.applied_prefix = self.settled;
        self.seq_high = self.settled;
        self.active_epoch = 0;
        self.active_base = 0;
        self.peers.clear();
        self.peers.insert(
            source,
            Peer {
                last_heard: now,
                ..Peer::default()
            },
        );
        self.next_heartbeat = now;
        self.target = Some(ResyncInfo {
            plex: self.cfg.me,
            full: !self.data_valid,
            total_bytes: dirty_regions.saturating_mul(self.cfg.region_bytes),
            done_bytes: 0,
            copied_bytes: 0,
        });
        // The source holds a (full) bitmap for us now: asking again (after a drop) must not
        // start over, but must still say full (another source may not know). The driver
        // writes its `mirror-started` marker now (RESYNC.md).
        self.accepted = true;
        self.handle_timeout(now);
    }

    /// The source restarted this learner's session at `start_seq` (same source, same epoch:
    /// the same ordered ops). Keep what is at or after it — applied copies among them were
    /// acked into the new session already and the source will not send their data again
    /// (sim seed 3807: a learner that cleared its log waited forever for such a copy) — and
    /// drop the rest (the source marked it dirty when it dropped the old session).
    fn rebase_learner(&mut self, now: Millis, source: PlexId, start_seq: Seq, dirty_regions: u64) {
        let older_in_flight = self
            .log
            .range(..start_seq)
            .any(|(_, le)| le.state == EntryState::Issued);
        if older_in_flight {
            // A write of the old session is still landing and a copy of the new one may
            // overlap it: go out and ask again once it landed.
            self.go_out(Role::Out);
            return;
        }
        self.log = self.log.split_off(&start_seq);
        self.copy_data = self.copy_data.split_off(&start_seq);
        self.settled = self.settled.max(start_seq.saturating_sub(1));
        self.applied_prefix = self.applied_prefix.max(self.settled);
        self.seq_high = self.seq_high.max(self.settled);
        self.role = Role::Learning { source, start_seq };
        self.target = Some(ResyncInfo {
            plex: self.cfg.me,
            full: !self.data_valid,
            total_bytes: dirty_regions.saturating_mul(self.cfg.region_bytes),
            done_bytes: 0,
            copied_bytes: 0,
        });
        self.advance_applied_prefix();
        self.progress(now);
    }

    // ----- resync: the source side -----

    fn on_join_request(
        &mut self,
        now: Millis,
        from: PlexId,
        al: Vec<u64>,
        full: bool,
        fresh: bool,
    ) {
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            return;
        }
        let Some(rec) = self.membership.plexes.iter().find(|p| p.id == from) else {
            return;
        };
        if rec.state == PlexState::Removed {
            return;
        }
        if rec.state == PlexState::InSync {
            // I serve and still count it in: it will be excluded (then it joins).
            let m = Message::NewEpoch {
                membership: self.membership.clone(),
            };
            self.send(from, m);
            return;
        }
        // Every in-sync node adds what the plex reports, so any of them can be its source.
        self.ensure_bitmap(from, false);
        let n = self.region_map().regions_of_volume(self.cfg.volume_blocks);
        if let Some(bm) = self.bitmaps.get_mut(&from) {
            let mut regions: Vec<u64> = al.into_iter().filter(|&r| bm.set(r)).collect();
            // Fill once per spell (a later full request resumes), again after a re-wipe.
            if full && (fresh || !self.filled.contains(&from)) {
                self.filled.insert(from);
                regions.extend(bm.fill(n));
            }
            if !regions.is_empty() {
                self.cmds.push_back(Command::MarkDirtyRegions {
                    plex: from,
                    regions,
                });
            }
        }
        if !matches!(self.role, Role::Active) || !self.i_am_sequencer() {
            return;
        }
        if self.rejoin.is_some_and(|(t, _)| t == from) {
            return;
        }
        if let Some(l) = self.learners.get(&from) {
            if !l.heard {
                // Our accept may be lost: the same answer again.
                let start_seq = l.start_seq;
                self.send_accept(from, start_seq);
                return;
            }
            // It restarted: it lost what it applied as a learner.
            self.drop_learner(from);
        }
        self.accept_learner(now, from, full);
    }

    fn accept_learner(&mut self, now: Millis, t: PlexId, full: bool) {
        // Ops ordered before its start may still be applying here: the copies (ordered after
        // them) carry them, and their regions are dirty.
        let ranges = self.write_ranges();
        for r in ranges {
            self.mark_dirty(None, r);
        }
        let start_seq = self.next_seq;
        self.learners.insert(
            t,
            Learner {
                start_seq,
                last_heard: now,
                heard: false,
                applied_prefix: start_seq - 1,
                told: self.settled,
                lu: LuCopy::Todo,
                cursor: 0,
                copies: BTreeMap::new(),
                full,
                done_bytes: 0,
                copied_bytes: 0,
            },
        );
        self.send_accept(t, start_seq);
        self.progress(now);
    }

    /// Tell learner `t` that its session starts at `start_seq`, with its dirty region count.
    fn send_accept(&mut self, t: PlexId, start_seq: Seq) {
        let m = Message::JoinAccept {
            membership: self.membership.clone(),
            start_seq,
            dirty_regions: self.bitmaps.get(&t).map_or(0, |b| b.len() as u64),
        };
        self.send(t, m);
    }

    /// The learner may have missed any unsettled op: mark them all, stop its copies.
    fn drop_learner(&mut self, t: PlexId) {
        if self.learners.remove(&t).is_none() {
            return;
        }
        if self.rejoin.is_some_and(|(r, _)| r == t) {
            self.rejoin = None;
        }
        let ranges = self.write_ranges();
        for r in ranges {
            self.mark_dirty(None, r);
        }
    }

    fn check_learners(&mut self, now: Millis) {
        let silent: Vec<PlexId> = self
            .learners
            .iter()
            .filter(|(_, l)| now >= l.last_heard + PEER_TIMEOUT_MS)
            .map(|(t, _)| *t)
            .collect();
        for t in silent {
            self.drop_learner(t);
        }
    }

    fn on_learner_message(&mut self, now: Millis, t: PlexId, msg: Message) {
        if let Some(l) = self.learners.get_mut(&t) {
            l.last_heard = l.last_heard.max(now);
            l.heard = true;
        }
        match msg {
            Message::Heartbeat { applied_prefix, .. }
            | Message::Progress { applied_prefix, .. } => {
                if let Some(l) = self.learners.get_mut(&t) {
                    l.applied_prefix = l.applied_prefix.max(applied_prefix);
                }
                self.learner_acked(t, |s| s <= applied_prefix);
            }
            Message::Applied {
                seq,
                applied_prefix,
                ..
            } => {
                if let Some(l) = self.learners.get_mut(&t) {
                    l.applied_prefix = l.applied_prefix.max(applied_prefix);
                }
                self.learner_acked(t, |s| s == seq || s <= applied_prefix);
            }
            Message::Resend { from, .. } => self.on_resend(t, from),
            _ => {}
        }
        self.progress(now);
    }

    /// The learner applied these copies: their regions are in sync (later writes reach it
    /// as a learner).
    fn learner_acked(&mut self, t: PlexId, applies: impl Fn(Seq) -> bool) {
        let Some(l) = self.learners.get_mut(&t) else {
            return;
        };
        let done: Vec<Seq> = l
            .copies
            .iter()
            .filter(|(s, c)| applies(**s) && c.data.is_some())
            .map(|(s, _)| *s)
            .collect();
        let mut cleared = Vec::new();
        let rb = self.cfg.region_bytes;
        for s in done {
            let Some(c) = l.copies.remove(&s) else {
                continue;
            };
            match c.region {
                Some(r) => {
                    if self.bitmaps.get_mut(&t).is_some_and(|bm| bm.clear(r)) {
                        l.done_bytes += rb;
                        cleared.push(r);
                    }
                }
                None => l.lu = LuCopy::Done,
            }
        }
        if !cleared.is_empty() {
            self.cmds.push_back(Command::ClearDirtyRegions {
                plex: t,
                regions: cleared,
            });
        }
    }

    /// Send again the copy data the learners (or just `only`) have not applied, where it was
    /// last sent at least `min_age` ago.
    fn resend_copy_data(&mut self, now: Millis, only: Option<PlexId>, min_age: Millis) {
        let epoch = self.epoch();
        let mut out = Vec::new();
        for (t, l) in self.learners.iter_mut() {
            if only.is_some_and(|o| o != *t) {
                continue;
            }
            for (s, c) in l.copies.iter_mut() {
                if let Some(d) = &c.data {
                    if now >= c.sent_at + min_age && *s > l.applied_prefix {
                        c.sent_at = now;
                        out.push((
                            *t,
                            Message::CopyData {
                                epoch,
                                seq: *s,
                                data: d.clone(),
                            },
                        ));
                    }
                }
            }
        }
        for (t, m) in out {
            self.send(t, m);
        }
    }

    /// Copies (and verifies) outstanding per learner: the configured window, at least 1.
    fn copy_window(&self) -> usize {
        self.cfg.copy_window.max(1)
    }

    /// Order copies (and verifies) within the window and the throttle; true if any.
    fn schedule_resync(&mut self, now: Millis) -> bool {
        if !matches!(self.role, Role::Active)
            || !self.i_am_sequencer()
            || self.rejoin.is_some()
            || self.cas_outstanding
        {
            return false;
        }
        self.refill(now);
        let mut ordered = false;
        let ts: Vec<PlexId> = self.learners.keys().copied().collect();
        let volume = self.cfg.volume_blocks;
        let rm = self.region_map();
        for t in ts {
            if self.learners.get(&t).is_some_and(|l| l.lu == LuCopy::Todo) {
                // First the LU state: a barrier, so every earlier op is in it.
                let meta = Internal::Copy {
                    target: t,
                    what: CopyWhat::LuState,
                }
                .meta();
                let seq = self.sequence(INTERNAL_ORIGIN, 0, meta);
                if let Some(l) = self.learners.get_mut(&t) {
                    l.lu = LuCopy::Ordered;
                    l.copies.insert(
                        seq,
                        CopyOut {
                            region: None,
                            data: None,
                            sent_at: now,
                        },
                    );
                }
                ordered = true;
            }
            while let Some(l) = self.learners.get(&t) {
                if l.copies.len() >= self.copy_window()
                    || self.log.len() >= LOG_ENTRIES_MAX
                    || (self.rate > 0 && self.tokens < self.region_cost())
                {
                    break;
                }
                let Some(bm) = self.bitmaps.get(&t) else {
                    break;
                };
                let busy: BTreeSet<u64> = l.copies.values().filter_map(|c| c.region).collect();
                let next = |from: u64| {
                    let mut r = bm.next_set(from);
                    while let Some(x) = r {
                        if !busy.contains(&x) {
                            break;
                        }
                        r = bm.next_set(x + 1);
                    }
                    r
                };
                let Some(region) = next(l.cursor).or_else(|| next(0)) else {
                    break;
                };
                let range = rm.region_range(region, volume);
                let meta = Internal::Copy {
                    target: t,
                    what: CopyWhat::Region {
                        index: region,
                        range,
                    },
                }
                .meta();
                let seq = self.sequence(INTERNAL_ORIGIN, 0, meta);
                if self.rate > 0 {
                    self.tokens -= self.region_cost();
                }
                if let Some(l) = self.learners.get_mut(&t) {
                    l.cursor = region + 1;
                    l.copies.insert(
                        seq,
                        CopyOut {
                            region: Some(region),
                            data: None,
                            sent_at: now,
                        },
                    );
                }
                ordered = true;
            }
        }
        ordered |= self.schedule_verify();
        ordered
    }

    fn schedule_verify(&mut self) -> bool {
        let total = self.verify_info.regions_total;
        let volume = self.cfg.volume_blocks;
        let rm = self.region_map();
        let mut ordered = false;
        while let Some(v) = self.verify.as_ref() {
            if v.outstanding.len() >= self.copy_window()
                || v.next_region >= total
                || self.log.len() >= LOG_ENTRIES_MAX
                || (self.rate > 0 && self.tokens < self.region_cost())
            {
                break;
            }
            let region = v.next_region;
            let range = rm.region_range(region, volume);
            let seq = self.sequence(
                INTERNAL_ORIGIN,
                0,
                Internal::Verify { region, range }.meta(),
            );
            if self.rate > 0 {
                self.tokens -= self.region_cost();
            }
            if let Some(v) = self.verify.as_mut() {
                v.next_region += 1;
                v.outstanding.insert(seq, (region, BTreeMap::new()));
            }
            ordered = true;
        }
        ordered
    }

    fn on_checksum(&mut self, now: Millis, from: PlexId, seq: Seq, sum: [u8; 32]) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let Some((region, sums)) = v.outstanding.get_mut(&seq) else {
            return;
        };
        sums.insert(from, sum);
        if !v.members.iter().all(|m| sums.contains_key(m)) {
            return;
        }
        let region = *region;
        let differ = sums.values().any(|s| *s != sum);
        if let Some(mine) = sums.get(&self.cfg.me).copied() {
            for (p, theirs) in sums.iter() {
                if *theirs != mine {
                    v.differs.entry(*p).or_default().insert(region);
                }
            }
        }
        v.outstanding.remove(&seq);
        let finished = v.outstanding.is_empty() && v.next_region >= self.verify_info.regions_total;
        self.verify_info.regions_done += 1;
        if differ {
            self.verify_info.mismatched.push(region);
        }
        if finished {
            if let Some(v) = self.verify.take() {
                if v.repair && !v.differs.is_empty() {
                    self.repair_mismatches(now, v.members, v.differs);
                }
            }
            self.verify_info.running = false;
        }
        self.progress(now);
    }

    /// Verify with `repair`: the sequencer's plex is the reference (it is the one every write
    /// is ordered through; with two plexes nothing else could break a tie). Every member whose
    /// checksum differed gets those regions in its write-intent bitmap (durably, first) and is
    /// CASed Stale, exactly as a lost peer is: it rejoins through the normal incremental
    /// resync, which copies only the marked regions (plus whatever is written meanwhile).
    /// Skipped if the membership changed during the verify.
    fn repair_mismatches(
        &mut self,
        now: Millis,
        members: Vec<PlexId>,
        differs: BTreeMap<PlexId, BTreeSet<u64>>,
    ) {
        if members != self.in_sync_ids()
            || !matches!(self.role, Role::Active)
            || !self.i_am_sequencer()
            || self.cas_outstanding
        {
            tracing::warn!("verify repair skipped: the membership changed during the verify");
            return;
        }
        let rm = self.region_map();
        let volume = self.cfg.volume_blocks;
        let mut record = self.membership.clone();
        record.epoch += 1;
        for (p, regions) in &differs {
            if *p == self.cfg.me {
                continue;
            }
            self.ensure_bitmap(*p, true);
            let mut marked = Vec::new();
            if let Some(bm) = self.bitmaps.get_mut(p) {
                for r in regions {
                    marked.extend(bm.mark_new(&rm.region_range(*r, volume)));
                }
            }
            if !marked.is_empty() {
                self.cmds.push_back(Command::MarkDirtyRegions {
                    plex: *p,
                    regions: marked,
                });
            }
            if let Some(rec) = record.plexes.iter_mut().find(|r| r.id == *p) {
                rec.state = PlexState::Stale;
            }
            tracing::warn!(
                plex = *p,
                regions = regions.len(),
                "verify repair: marking the plex stale to resync its mismatched regions"
            );
        }
        record.sequencer = self.cfg.me;
        // Hold new ops until the CAS is answered, as for a lost peer.
        self.role = Role::Holding { since: now };
        self.set_path(PathState::Transitioning);
        self.cas_outstanding = true;
        self.cmds.push_back(Command::WitnessCas {
            expected_epoch: self.epoch(),
            record,
        });
    }

    /// A learner with nothing left to copy: hold new ops until it applied everything, then
    /// CAS it InSync (a view change with it as a member follows).
    fn maybe_rejoin(&mut self, now: Millis) {
        if !matches!(self.role, Role::Active)
            || !self.i_am_sequencer()
            || self.cas_outstanding
            || !self.suspects(now).is_empty()
        {
            return;
        }
        if let Some((t, since)) = self.rejoin {
            let caught_up = self
                .learners
                .get(&t)
                .is_some_and(|l| l.applied_prefix >= self.seq_high)
                && self.applied_prefix >= self.seq_high
                // Settled everywhere: no op is left that another in-sync plex may lack and
                // the learner (whose log starts at its start seq) could not report.
                && self.settled >= self.seq_high;
            if caught_up {
                let mut record = self.membership.clone();
                record.epoch += 1;
                record.sequencer = self.cfg.me;
                for p in record.plexes.iter_mut() {
                    if p.id == t {
                        p.state = PlexState::InSync;
                    }
                }
                self.cas_outstanding = true;
                self.role = Role::Holding { since: now };
                self.cmds.push_back(Command::WitnessCas {
                    expected_epoch: self.epoch(),
                    record,
                });
            } else if now >= since + REJOIN_DRAIN_MS {
                self.rejoin = None;
                self.rejoin_retry_at = now + REJOIN_DRAIN_MS;
                self.start_held(now);
            }
            return;
        }
        if now < self.rejoin_retry_at {
            return;
        }
        let ready = self.learners.iter().find(|(t, l)| {
            l.lu == LuCopy::Done
                && l.copies.is_empty()
                && self.bitmaps.get(t).is_none_or(|b| b.is_empty())
        });
        if let Some((t, _)) = ready {
            let t = *t;
            self.rejoin = Some((t, now));
            // New ops are held from now on: ask the learner to report as soon as it applied
            // everything ordered so far, or the CAS waits for its next heartbeat (up to
            // HEARTBEAT_INTERVAL_MS, a tenth of a 1 GiB full resync).
            self.heartbeat_learner(now, t);
            self.maybe_rejoin(now);
        }
    }

    fn region_map(&self) -> DirtyMap {
        DirtyMap::new(self.cfg.block_size, self.cfg.region_bytes)
    }

    fn region_cost(&self) -> i64 {
        i64::try_from(self.cfg.region_bytes).unwrap_or(i64::MAX)
    }

    fn burst(&self) -> i64 {
        self.region_cost()
    }

    fn refill(&mut self, now: Millis) {
        if self.rate == 0 {
            self.tokens = 0;
            self.tokens_at = now;
            return;
        }
        let dt = now.saturating_sub(self.tokens_at);
        let add = i64::try_from(u128::from(dt) * u128::from(self.rate) / 1000).unwrap_or(i64::MAX);
        // A slow rate refilled every millisecond must not lose its fractions.
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.burst());
            self.tokens_at = now;
        }
    }

    /// When the throttle allows the next copy, if copies wait for it.
    fn throttle_ready_at(&self) -> Option<Millis> {
        if self.rate == 0 || self.tokens >= self.region_cost() || !matches!(self.role, Role::Active)
        {
            return None;
        }
        let waiting = self.learners.iter().any(|(t, l)| {
            l.copies.len() < self.copy_window()
                && self.bitmaps.get(t).is_some_and(|b| !b.is_empty())
        }) || self.verify.is_some();
        if !waiting {
            return None;
        }
        let need = u64::try_from(self.region_cost() - self.tokens).unwrap_or(u64::MAX);
        let ms = u128::from(need) * 1000 / u128::from(self.rate) + 1;
        Some(self.tokens_at + u64::try_from(ms).unwrap_or(u64::MAX / 2))
    }

    /// Create `p`'s bitmap if missing: empty when this node has followed `p` since it went
    /// stale (`known`), else every region (a full resync) — persisted either way.
    fn ensure_bitmap(&mut self, p: PlexId, known: bool) {
        if self.bitmaps.contains_key(&p) {
            return;
        }
        let mut bm = self.region_map();
        if !known {
            let regions = bm.fill(bm.regions_of_volume(self.cfg.volume_blocks));
            self.cmds
                .push_back(Command::MarkDirtyRegions { plex: p, regions });
            self.filled.insert(p);
        }
        self.bitmaps.insert(p, bm);
    }

    /// Ranges of the logged ops that write data (copies and verifies change nothing on an
    /// in-sync plex; a copy the learner did not ack is still dirty).
    fn write_ranges(&self) -> Vec<OpRange> {
        self.log
            .values()
            .filter(|le| le.entry.origin != INTERNAL_ORIGIN)
            .map(|le| le.entry.meta.range)
            .collect()
    }

    /// Stale (or resyncing) plexes of the current record, ascending.
    fn stale_ids(&self) -> Vec<PlexId> {
        let mut v: Vec<PlexId> = self
            .membership
            .plexes
            .iter()
            .filter(|p| matches!(p.state, PlexState::Stale | PlexState::Resyncing))
            .map(|p| p.id)
            .collect();
        v.sort_unstable();
        v
    }

    // ----- helpers -----

    fn lease_valid(&self, now: Millis) -> bool {
        self.peers.values().all(|p| {
            p.lease_from
                .is_some_and(|l| now < l.saturating_add(READ_LEASE_MS))
        })
    }

    fn reset_peers(&mut self, now: Millis) {
        self.peers.clear();
        for id in self.in_sync_ids() {
            if id != self.cfg.me {
                self.peers.insert(
                    id,
                    Peer {
                        last_heard: now,
                        ..Peer::default()
                    },
                );
            }
        }
    }

    /// In-sync plex ids of the current record, ascending.
    fn in_sync_ids(&self) -> Vec<PlexId> {
        let mut v: Vec<PlexId> = self
            .membership
            .plexes
            .iter()
            .filter(|p| p.state == PlexState::InSync)
            .map(|p| p.id)
            .collect();
        v.sort_unstable();
        v
    }

    fn is_in_sync(&self, id: PlexId) -> bool {
        self.membership
            .plexes
            .iter()
            .any(|p| p.id == id && p.state == PlexState::InSync)
    }

    fn i_am_sequencer(&self) -> bool {
        self.membership.sequencer == self.cfg.me
    }

    fn send(&mut self, to: PlexId, msg: Message) {
        // Whatever carries my applied prefix to a peer resets its `Progress` countdown.
        if let Message::Applied { applied_prefix, .. }
        | Message::Progress { applied_prefix, .. }
        | Message::Heartbeat { applied_prefix, .. } = &msg
        {
            if let Some(p) = self.peers.get_mut(&to) {
                p.told = p.told.max(*applied_prefix);
            }
        }
        self.cmds.push_back(Command::Send { to, msg });
    }

    fn complete(&mut self, op: OpId, outcome: Outcome) {
        self.cmds.push_back(Command::Complete { op, outcome });
    }

    fn set_path(&mut self, s: PathState) {
        if self.path != Some(s) {
            self.path = Some(s);
            self.cmds.push_back(Command::PathState(s));
        }
    }
}
