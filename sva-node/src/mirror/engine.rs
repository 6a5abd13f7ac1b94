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
//! Read lease: a heartbeat echoes the sender's last received timestamp of the peer; a node
//! serves reads (and acks, and orders ops) only while every in-sync peer echoed a timestamp
//! younger than [`READ_LEASE_MS`]. A peer is excluded only [`PEER_TIMEOUT_MS`] after it was
//! last heard, by when that lease has surely expired.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::dirty::{DirtyMap, REGION_BYTES_DEFAULT};
use super::msg::{Entry, Epoch, EpochState, LbaRange, Message, OpMeta, OpRange, PlexId, Seq};
use super::resync::{CopyWhat, Recovered, ResyncInfo, VerifyInfo};
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
    /// Persist this range in the write-intent bitmap before any later `Apply` runs.
    MarkDirty(LbaRange),
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
}

impl Config {
    pub fn new(me: PlexId) -> Config {
        Config {
            me,
            block_size: 512,
            region_bytes: REGION_BYTES_DEFAULT,
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
    /// Not in sync (stale, removed, or restarted): Unavailable until resync.
    Out,
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
    dirty: DirtyMap,
}

impl Engine {
    /// Start from the witness's current record.
    pub fn new(cfg: Config, membership: Membership, now: Millis, start: Start) -> Engine {
        let dirty = DirtyMap::new(cfg.block_size, cfg.region_bytes);
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
            dirty,
            cfg,
        };
        if matches!(start, Start::Bootstrap) && e.is_in_sync(e.cfg.me) {
            e.role = Role::Active;
            e.reset_peers(now);
            e.set_path(PathState::ActiveOptimized);
        } else {
            e.set_path(PathState::Unavailable);
        }
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
        }
    }
    /// The write-intent bitmap (regions a Stale plex may hold differently).
    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }
    /// Ops submitted here and not yet completed.
    pub fn ops_in_flight(&self) -> usize {
        self.pending.len() + self.held.len()
    }

    /// May this node serve a read from its local plex now? Only while in sync and holding a
    /// lease from every in-sync peer, so no other epoch can have acked a write it lacks.
    pub fn can_serve_reads(&self, now: Millis) -> bool {
        matches!(self.role, Role::Active | Role::Holding { .. }) && self.lease_valid(now)
    }

    /// Next time `handle_timeout` must be called.
    pub fn next_timeout(&self) -> Option<Millis> {
        match self.role {
            Role::Fenced | Role::Out => None,
            _ => {
                // A suspicion deadline already handled must not come back: it would stay in
                // the past while the peer is silent, and a driver timer that fires "now"
                // would spin instead of sleeping (starving the witness CAS it waits for).
                let suspect = self
                    .peers
                    .values()
                    .map(|p| p.last_heard + PEER_TIMEOUT_MS)
                    .filter(|&d| self.last_timeout.is_none_or(|t| d > t))
                    .min();
                Some(suspect.map_or(self.next_heartbeat, |s| s.min(self.next_heartbeat)))
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
            Role::Fenced | Role::Out => self.complete(op, Outcome::Retry),
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

    /// The local LU applied `seq`; `response` is its encoded response (returned to the
    /// initiator if the op originated here).
    pub fn applied(&mut self, now: Millis, seq: Seq, response: Bytes) {
        if matches!(self.role, Role::Fenced | Role::Out) {
            return;
        }
        let Some(le) = self.log.get_mut(&seq) else {
            return;
        };
        le.state = EntryState::Applied;
        let origin = le.entry.origin;
        let fwd = le.entry.fwd;
        if origin == self.cfg.me {
            if let Some(p) = self.pending.get_mut(&fwd) {
                if p.seq == Some(seq) {
                    p.response = Some(response);
                    p.acks.insert(self.cfg.me);
                }
            }
        } else if self.is_in_sync(origin)
            && matches!(self.role, Role::Active | Role::Holding { .. })
        {
            self.send(
                origin,
                Message::Applied {
                    epoch: self.epoch(),
                    seq,
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
        if matches!(self.role, Role::Fenced | Role::Out) {
            return;
        }
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
        if matches!(self.role, Role::Fenced | Role::Out) || from == self.cfg.me {
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
        if epoch > self.epoch() || !self.peers.contains_key(&from) {
            return; // NewEpoch will follow (the coordinator re-sends it)
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
            Message::Applied { seq, .. } => {
                self.ack_from(from, |s| s == seq);
                self.progress(now);
            }
            Message::Resend { from: start, .. } => self.on_resend(from, start),
            Message::State { state, .. } => {
                if let Role::Collecting { states, .. } = &mut self.role {
                    states.insert(from, state);
                    self.try_finish_collect(now);
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
            Message::NewEpoch { .. } => {}
        }
    }

    /// Timers: heartbeats, failure detection, retransmission, hold timeouts.
    pub fn handle_timeout(&mut self, now: Millis) {
        if matches!(self.role, Role::Fenced | Role::Out) {
            return;
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
        }
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
        let _ = (now, seq, data); // resync issue: send CopyData to the target
    }

    /// Verify: the local checksum of copy `seq`'s region.
    pub fn checksummed(&mut self, now: Millis, seq: Seq, checksum: [u8; 32]) {
        let _ = (now, seq, checksum); // resync issue
    }

    /// Resync throttle in bytes/s (0: unthrottled), changeable at run time.
    pub fn set_resync_rate(&mut self, bytes_per_sec: u64) {
        let _ = bytes_per_sec; // resync issue
    }

    /// Start an online verify of every region across the in-sync plexes (sequencer only);
    /// `repair`: mark mismatched regions for resync.
    pub fn start_verify(&mut self, now: Millis, repair: bool) -> Result<(), &'static str> {
        let _ = (now, repair);
        Err("verify is not implemented yet")
    }

    /// Resyncs this node takes part in.
    pub fn resync_status(&self) -> Vec<(super::resync::ResyncRole, ResyncInfo)> {
        Vec::new()
    }

    /// The last (or running) verify.
    pub fn verify_status(&self) -> VerifyInfo {
        VerifyInfo::default()
    }

    // ----- internals -----

    fn progress(&mut self, now: Millis) {
        self.check_suspects(now);
        self.try_apply();
        self.check_commits(now);
        self.gc();
        self.start_held(now);
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
            p.applied_prefix = p.applied_prefix.max(prefix);
        }
        self.ack_from(from, |s| s <= prefix);
        if from == self.membership.sequencer
            && matches!(self.role, Role::Active | Role::Holding { .. })
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
        if !matches!(self.role, Role::Active) || !self.i_am_sequencer() || !self.lease_valid(now) {
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
        self.fwd_seen
            .entry(origin)
            .or_default()
            .seqs
            .insert(fwd, seq);
        let epoch = self.epoch();
        let ids: Vec<PlexId> = self.peers.keys().copied().collect();
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
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            return;
        }
        if entry.seq <= self.settled || self.log.contains_key(&entry.seq) {
            return;
        }
        if entry.origin == self.cfg.me {
            if let Some(p) = self.pending.get_mut(&entry.fwd) {
                p.seq = Some(entry.seq);
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
        p.seq = Some(seq);
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

    /// Emit `Apply` for every op whose predecessors are all known and none of the earlier
    /// overlapping ones is still unapplied.
    fn try_apply(&mut self) {
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            return;
        }
        let stale = self.has_stale();
        let mut busy: Vec<OpRange> = Vec::new();
        let mut issue: Vec<Seq> = Vec::new();
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
                    if !busy.iter().any(|b| b.overlaps(&r)) {
                        issue.push(*s);
                    }
                    busy.push(r);
                }
            }
        }
        for s in issue {
            let Some(le) = self.log.get_mut(&s) else {
                continue;
            };
            le.state = EntryState::Issued;
            let cmd = Command::Apply {
                epoch: self.membership.epoch,
                seq: s,
                origin: le.entry.origin,
                op: le.entry.meta.clone(),
            };
            let range = le.entry.meta.range;
            if stale {
                self.mark_dirty(range);
            }
            self.cmds.push_back(cmd);
        }
    }

    fn mark_dirty(&mut self, r: OpRange) {
        if let OpRange::Blocks(r) = r {
            if self.dirty.mark(&r) {
                self.cmds.push_back(Command::MarkDirty(r));
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
        if !matches!(self.role, Role::Active | Role::Holding { .. }) {
            return;
        }
        let stable = self
            .peers
            .values()
            .map(|p| p.applied_prefix)
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
        if !matches!(self.role, Role::Active) || !self.lease_valid(now) {
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
        self.membership = m;
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
        let me = self.cfg.me;
        for p in self.pending.values_mut() {
            p.acks.retain(|id| *id == me);
        }
        self.fwd_seen.clear();
        if self.has_stale() {
            let ranges: Vec<OpRange> = self.log.values().map(|le| le.entry.meta.range).collect();
            for r in ranges {
                self.mark_dirty(r);
            }
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
        let ids: Vec<PlexId> = self.peers.keys().copied().collect();
        for id in ids {
            self.send(
                id,
                Message::Sync {
                    epoch,
                    base,
                    high,
                    entries: cut.clone(),
                },
            );
        }
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
        for (origin, seq) in applied {
            if self.peers.contains_key(&origin) {
                self.send(origin, Message::Applied { epoch, seq });
            }
        }
        if self.has_stale() {
            let ranges: Vec<OpRange> = self.log.values().map(|le| le.entry.meta.range).collect();
            for r in ranges {
                self.mark_dirty(r);
            }
        }
        self.active_epoch = epoch;
        self.active_base = high;
        self.role = Role::Active;
        self.set_path(PathState::ActiveOptimized);
        for (fwd, meta) in redo {
            self.dispatch(fwd, meta);
        }
        self.progress(now);
    }

    fn fence(&mut self) {
        self.go_out(Role::Fenced);
    }

    fn go_out(&mut self, role: Role) {
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

    fn has_stale(&self) -> bool {
        self.membership
            .plexes
            .iter()
            .any(|p| p.state != PlexState::InSync)
    }

    fn i_am_sequencer(&self) -> bool {
        self.membership.sequencer == self.cfg.me
    }

    fn send(&mut self, to: PlexId, msg: Message) {
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
