//! Seeded deterministic simulation of N mirror engines (tigerbeetle VOPR style).
//!
//! Everything the engines touch is simulated and driven by one PRNG seeded from the run's
//! seed: the clock (1 ms steps), the network (per-message delay, loss, duplication, reorder,
//! one- and two-way partitions that start and heal; every message goes through the codec),
//! the disks (per block: the seq and unique value of the last op written, plus the history of
//! values; a replicated "reservation" word changed by barrier ops), the witness (an in-memory
//! CAS that a partitioned node may not reach), crashes (the engine's memory is lost; the disk,
//! the write-intent bitmap and the activity log survive; the node restarts as a returning
//! node) and clients (overlapping writes and barriers through random nodes, reads through
//! nodes that hold a read lease).
//!
//! A run has a chaos phase, then a settle phase (faults healed, no new ops) after which the
//! volume must be quiescent. Invariant checks (DESIGN.md §5) run during the run (at acks,
//! reads and CAS) and at the end; each violation names its [`Invariant`].

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::dirty::DirtyMap;
use super::engine::{Command, Config, Engine, Millis, OpId, Outcome, PathState, RoleKind, Start};
use super::msg::{self, LbaRange, OpMeta, OpRange, PlexId, Seq};
use crate::witness::{Membership, PlexRecord, PlexState, WitnessError};

/// The invariants of DESIGN.md §5 (plus read linearizability and liveness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// 1. Every acknowledged write is on every plex InSync in the current epoch.
    AckedWritesOnEveryInSyncPlex,
    /// 1b. A read served after the ack of an overlapping write sees it (or a later one).
    ReadsLinearizable,
    /// 2. Plexes InSync in the same epoch are identical once quiescent.
    InSyncPlexesIdentical,
    /// 3. At most one epoch accepts writes at any time; a fenced node acks nothing.
    SingleWriterEpoch,
    /// 4. The dirty bitmap (with the stale plex's own activity log) covers every divergence.
    DirtyMapCoversDivergence,
    /// 5. Reservation state is identical on every in-sync plex after each ordered op.
    ReservationStateIdentical,
    /// Every op submitted is completed (Done or Retry) once the volume is quiescent.
    Liveness,
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub invariant: Invariant,
    pub time: Millis,
    pub what: String,
}

/// Knobs of one run (derived from the seed by [`SimConfig::from_seed`]).
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: u16,
    pub blocks: u64,
    pub chaos_ms: Millis,
    pub settle_ms: Millis,
    pub delay_ms_max: Millis,
    pub loss: f64,
    pub duplicate: f64,
    /// Per-ms probability that a partition starts.
    pub partition: f64,
    /// Per-ms probability that a node crashes.
    pub crash: f64,
    /// Per-ms probability that a client submits an op / a read.
    pub submit: f64,
    pub read: f64,
}

impl SimConfig {
    /// Swarm testing: each seed picks its own mix of faults.
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut r = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
        let faulty = r.gen_bool(0.85);
        SimConfig {
            seed,
            nodes: if r.gen_bool(0.5) { 2 } else { 3 },
            blocks: 1024,
            chaos_ms: 6_000,
            settle_ms: 6_000,
            delay_ms_max: [2, 10, 40][r.gen_range(0..3)],
            loss: if faulty {
                [0.0, 0.01, 0.05][r.gen_range(0..3)]
            } else {
                0.0
            },
            duplicate: if faulty { 0.01 } else { 0.0 },
            partition: if faulty {
                [0.0, 0.0005, 0.002][r.gen_range(0..3)]
            } else {
                0.0
            },
            crash: if faulty {
                [0.0, 0.0002, 0.001][r.gen_range(0..3)]
            } else {
                0.0
            },
            submit: [0.05, 0.2, 0.5][r.gen_range(0..3)],
            read: 0.2,
        }
    }
}

/// What a run saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub submitted: u64,
    pub acked: u64,
    pub retried: u64,
    pub reads_served: u64,
    pub epochs: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub messages: u64,
    /// Blocks where a Stale plex differed from the in-sync ones at the end.
    pub divergent_blocks: u64,
    /// `Sync` messages delivered that carried reconciled ops (view changes mid-flight).
    pub syncs_with_ops: u64,
    /// The final record had a serving in-sync plex (else invariant 2 was vacuous).
    pub served_at_end: bool,
}

#[derive(Debug)]
pub struct Report {
    pub config: SimConfig,
    pub stats: Stats,
    pub violations: Vec<Violation>,
}

const BLOCK_SIZE: u32 = 512;
/// 4 KiB regions = 8 blocks: small enough that coverage gaps show.
const REGION_BYTES: u64 = 4096;
const T0: Millis = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Barrier,
}

#[derive(Debug, Clone)]
struct OpInfo {
    range: OpRange,
    kind: Kind,
    node: PlexId,
    done: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Block {
    seq: Seq,
    value: u64,
}

struct Node {
    id: PlexId,
    engine: Option<Engine>,
    incarnation: u32,
    disk: Vec<Block>,
    history: Vec<std::collections::BTreeSet<u64>>,
    resv: u64,
    resv_log: BTreeMap<Seq, u64>,
    /// Persistent write-intent bitmap and activity log (survive crashes).
    dirty: DirtyMap,
    al: BTreeMap<Seq, OpRange>,
    /// Op value -> the seq it was applied under here.
    applied_seqs: BTreeMap<u64, Seq>,
    /// This incarnation went Unavailable after fencing / going out.
    unavailable: bool,
    restart_at: Option<Millis>,
}

enum Event {
    Deliver {
        from: PlexId,
        to: PlexId,
        frame: Bytes,
    },
    ApplyDone {
        node: PlexId,
        incarnation: u32,
        seq: Seq,
        value: u64,
        kind: Kind,
        range: OpRange,
    },
    WitnessReply {
        node: PlexId,
        incarnation: u32,
        result: Result<Membership, String>,
        conflict: bool,
    },
}

/// The simulated world.
pub struct Sim {
    cfg: SimConfig,
    rng: StdRng,
    now: Millis,
    nodes: Vec<Node>,
    record: Membership,
    events: BTreeMap<(Millis, u64), Event>,
    event_no: u64,
    /// Directed links that are down, until the given time.
    down: BTreeMap<(PlexId, PlexId), Millis>,
    witness_cut: BTreeMap<PlexId, Millis>,
    ops: BTreeMap<u64, OpInfo>,
    next_value: u64,
    /// Acked writes: value -> seq; per block the latest acked (seq, value).
    acked: BTreeMap<u64, Seq>,
    last_acked: Vec<Option<(Seq, u64)>>,
    max_ack_epoch: u64,
    stats: Stats,
    violations: Vec<Violation>,
}

fn encode_payload(value: u64, kind: Kind) -> Bytes {
    let mut b = value.to_be_bytes().to_vec();
    b.push(kind as u8);
    Bytes::from(b)
}

fn decode_payload(p: &[u8]) -> (u64, Kind) {
    let mut v = [0u8; 8];
    v.copy_from_slice(&p[..8]);
    let kind = if p[8] == Kind::Barrier as u8 {
        Kind::Barrier
    } else {
        Kind::Write
    };
    (u64::from_be_bytes(v), kind)
}

fn blocks_of(r: &OpRange) -> std::ops::Range<u64> {
    match r {
        OpRange::Blocks(r) => r.lba..r.end(),
        OpRange::Barrier => 0..0,
    }
}

fn mix(state: u64, value: u64) -> u64 {
    (state ^ value)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(17)
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let record = Membership {
            epoch: 1,
            sequencer: 1,
            plexes: (1..=cfg.nodes)
                .map(|id| PlexRecord {
                    id,
                    node: format!("node-{id}"),
                    portal: format!("127.0.0.1:{}", 3260 + id),
                    peer_addr: format!("127.0.0.1:{}", 4260 + id),
                    state: PlexState::InSync,
                })
                .collect(),
        };
        let nodes = (1..=cfg.nodes)
            .map(|id| Node {
                id,
                engine: Some(Engine::new(
                    engine_cfg(id),
                    record.clone(),
                    T0,
                    Start::Bootstrap,
                )),
                incarnation: 0,
                disk: vec![Block::default(); cfg.blocks as usize],
                history: vec![Default::default(); cfg.blocks as usize],
                resv: 0,
                resv_log: BTreeMap::new(),
                dirty: DirtyMap::new(BLOCK_SIZE, REGION_BYTES),
                al: BTreeMap::new(),
                applied_seqs: BTreeMap::new(),
                unavailable: false,
                restart_at: None,
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(cfg.seed),
            now: T0,
            nodes,
            record,
            events: BTreeMap::new(),
            event_no: 0,
            down: BTreeMap::new(),
            witness_cut: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_value: 1,
            acked: BTreeMap::new(),
            last_acked: vec![None; cfg.blocks as usize],
            max_ack_epoch: 0,
            stats: Stats::default(),
            violations: Vec::new(),
            cfg,
        }
    }

    /// Run the whole scenario and check the end-state invariants.
    pub fn run(mut self) -> Report {
        for n in 0..self.nodes.len() {
            self.drain(n);
        }
        let chaos_end = T0 + self.cfg.chaos_ms;
        let end = chaos_end + self.cfg.settle_ms;
        while self.now < end {
            self.now += 1;
            let chaos = self.now < chaos_end;
            if self.now == chaos_end {
                self.heal_all();
            }
            self.deliver_due();
            self.restarts();
            for n in 0..self.nodes.len() {
                let due = self.nodes[n]
                    .engine
                    .as_ref()
                    .and_then(|e| e.next_timeout())
                    .is_some_and(|t| t <= self.now);
                if due {
                    if let Some(e) = self.nodes[n].engine.as_mut() {
                        e.handle_timeout(self.now);
                    }
                    self.drain(n);
                }
            }
            if chaos {
                self.faults();
                if self.rng.gen_bool(self.cfg.submit) {
                    self.client_submit();
                }
            }
            if self.rng.gen_bool(self.cfg.read) {
                self.client_read();
            }
        }
        self.final_checks();
        Report {
            config: self.cfg,
            stats: self.stats,
            violations: self.violations,
        }
    }

    fn violate(&mut self, invariant: Invariant, what: String) {
        self.violations.push(Violation {
            invariant,
            time: self.now,
            what,
        });
    }

    fn schedule(&mut self, at: Millis, ev: Event) {
        self.event_no += 1;
        self.events.insert((at, self.event_no), ev);
    }

    fn link_up(&self, from: PlexId, to: PlexId) -> bool {
        self.down.get(&(from, to)).is_none_or(|t| *t <= self.now)
    }

    fn witness_reachable(&self, node: PlexId) -> bool {
        self.witness_cut.get(&node).is_none_or(|t| *t <= self.now)
    }

    // ----- faults -----

    fn faults(&mut self) {
        let n = self.cfg.nodes;
        if self.cfg.partition > 0.0 && self.rng.gen_bool(self.cfg.partition) {
            self.stats.partitions += 1;
            let victim = self.rng.gen_range(1..=n);
            let until = self.now + self.rng.gen_range(100..3_000);
            let mode = self.rng.gen_range(0..3); // both ways, in only, out only
            for other in 1..=n {
                if other == victim {
                    continue;
                }
                if mode != 1 {
                    self.down.insert((victim, other), until);
                }
                if mode != 2 {
                    self.down.insert((other, victim), until);
                }
            }
            if self.rng.gen_bool(0.5) {
                self.witness_cut.insert(victim, until);
            }
        }
        if self.cfg.crash > 0.0 && self.rng.gen_bool(self.cfg.crash) {
            let victim = self.rng.gen_range(0..n as usize);
            if self.nodes[victim].engine.is_some() {
                self.stats.crashes += 1;
                let node = &mut self.nodes[victim];
                node.engine = None;
                node.incarnation += 1;
                node.unavailable = false;
                node.restart_at = Some(self.now + self.rng.gen_range(200..2_000));
                // Ops in flight on the crashed node die with its sessions.
                let id = node.id;
                for op in self.ops.values_mut() {
                    if op.node == id && op.done.is_none() {
                        op.done = Some(Outcome::Retry);
                    }
                }
            }
        }
    }

    fn heal_all(&mut self) {
        self.down.clear();
        self.witness_cut.clear();
        for n in &mut self.nodes {
            if n.engine.is_none() {
                n.restart_at = Some(self.now);
            }
        }
    }

    fn restarts(&mut self) {
        for n in 0..self.nodes.len() {
            if self.nodes[n].restart_at.is_some_and(|t| t <= self.now) {
                self.nodes[n].restart_at = None;
                let id = self.nodes[n].id;
                self.nodes[n].engine = Some(Engine::new(
                    engine_cfg(id),
                    self.record.clone(),
                    self.now,
                    Start::Restart(Default::default()),
                ));
                self.drain(n);
            }
        }
    }

    // ----- clients -----

    fn client_submit(&mut self) {
        let n = self.rng.gen_range(0..self.nodes.len());
        if self.nodes[n].engine.is_none() {
            return;
        }
        let value = self.next_value;
        self.next_value += 1;
        let (kind, range) = if self.rng.gen_bool(0.15) {
            (Kind::Barrier, OpRange::Barrier)
        } else {
            let blocks = self.rng.gen_range(1..=8u32);
            // A hot zone (overlaps, ordering) and a cold rest (divergence that no later write
            // hides).
            let top = if self.rng.gen_bool(0.7) {
                64
            } else {
                self.cfg.blocks
            };
            let lba = self.rng.gen_range(0..=top - u64::from(blocks));
            (Kind::Write, OpRange::Blocks(LbaRange { lba, blocks }))
        };
        let id = self.nodes[n].id;
        self.ops.insert(
            value,
            OpInfo {
                range,
                kind,
                node: id,
                done: None,
            },
        );
        self.stats.submitted += 1;
        let meta = OpMeta {
            range,
            payload: encode_payload(value, kind),
        };
        if let Some(e) = self.nodes[n].engine.as_mut() {
            e.submit(self.now, OpId(value), meta);
        }
        self.drain(n);
    }

    fn client_read(&mut self) {
        let n = self.rng.gen_range(0..self.nodes.len());
        let b = self.rng.gen_range(0..self.cfg.blocks) as usize;
        let Some(e) = self.nodes[n].engine.as_ref() else {
            return;
        };
        if !e.can_serve_reads(self.now) {
            return;
        }
        self.stats.reads_served += 1;
        let got = self.nodes[n].disk[b];
        if let Some((seq, value)) = self.last_acked[b] {
            if got.seq < seq || (got.seq == seq && got.value != value) {
                let id = self.nodes[n].id;
                self.violate(
                    Invariant::ReadsLinearizable,
                    format!(
                        "read of block {b} on plex {id} (epoch {}) returned op {} (seq {}) \
                         but op {value} (seq {seq}) was acked before",
                        e.epoch(),
                        got.value,
                        got.seq
                    ),
                );
            }
        }
    }

    // ----- driver -----

    fn deliver_due(&mut self) {
        while let Some(entry) = self.events.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let ev = entry.remove();
            match ev {
                Event::Deliver { from, to, frame } => {
                    if !self.link_up(from, to) {
                        continue;
                    }
                    let n = (to - 1) as usize;
                    let mut buf = BytesMut::from(&frame[..]);
                    let msg = match msg::decode(&mut buf) {
                        Ok(Some(m)) => m,
                        other => panic!("codec failed on its own frame: {other:?}"),
                    };
                    if matches!(&msg, msg::Message::Sync { entries, .. } if !entries.is_empty()) {
                        self.stats.syncs_with_ops += 1;
                    }
                    if let Some(e) = self.nodes[n].engine.as_mut() {
                        e.handle_message(self.now, from, msg);
                        self.drain(n);
                    }
                }
                Event::ApplyDone {
                    node,
                    incarnation,
                    seq,
                    value,
                    kind,
                    range,
                } => {
                    let n = (node - 1) as usize;
                    if self.nodes[n].incarnation != incarnation || self.nodes[n].engine.is_none() {
                        continue;
                    }
                    let nd = &mut self.nodes[n];
                    nd.applied_seqs.insert(value, seq);
                    let response = match kind {
                        Kind::Write => {
                            for b in blocks_of(&range) {
                                nd.disk[b as usize] = Block { seq, value };
                                nd.history[b as usize].insert(value);
                            }
                            value
                        }
                        Kind::Barrier => {
                            nd.resv = mix(nd.resv, value);
                            nd.resv_log.insert(seq, nd.resv);
                            nd.resv
                        }
                    };
                    if let Some(e) = nd.engine.as_mut() {
                        e.applied(self.now, seq, Bytes::from(response.to_be_bytes().to_vec()));
                    }
                    self.drain(n);
                }
                Event::WitnessReply {
                    node,
                    incarnation,
                    result,
                    conflict,
                } => {
                    let n = (node - 1) as usize;
                    if self.nodes[n].incarnation != incarnation {
                        continue;
                    }
                    let r = match (result, conflict) {
                        (Ok(m), false) => Ok(m),
                        (Ok(m), true) => Err(WitnessError::Conflict(Box::new(m))),
                        (Err(s), _) => Err(WitnessError::Unreachable(s)),
                    };
                    if let Some(e) = self.nodes[n].engine.as_mut() {
                        e.witness_result(self.now, r);
                        self.drain(n);
                    }
                }
            }
        }
    }

    /// Execute every command node `n`'s engine emitted.
    fn drain(&mut self, n: usize) {
        loop {
            let Some(e) = self.nodes[n].engine.as_mut() else {
                return;
            };
            let Some(cmd) = e.poll_command() else {
                return;
            };
            let epoch = e.epoch();
            let role = e.role();
            let id = self.nodes[n].id;
            match cmd {
                Command::Send { to, msg } => {
                    self.stats.messages += 1;
                    if !self.link_up(id, to) || self.rng.gen_bool(self.cfg.loss) {
                        continue;
                    }
                    let mut buf = BytesMut::new();
                    msg::encode(&msg, &mut buf);
                    let frame = buf.freeze();
                    let copies = if self.rng.gen_bool(self.cfg.duplicate) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let at = self.now + self.rng.gen_range(1..=self.cfg.delay_ms_max);
                        self.schedule(
                            at,
                            Event::Deliver {
                                from: id,
                                to,
                                frame: frame.clone(),
                            },
                        );
                    }
                }
                Command::Apply { seq, op, .. } => {
                    self.nodes[n].al.insert(seq, op.range);
                    let (value, kind) = decode_payload(&op.payload);
                    let at = self.now + self.rng.gen_range(1..=4);
                    let incarnation = self.nodes[n].incarnation;
                    self.schedule(
                        at,
                        Event::ApplyDone {
                            node: id,
                            incarnation,
                            seq,
                            value,
                            kind,
                            range: op.range,
                        },
                    );
                }
                Command::MarkDirty(r) => {
                    self.nodes[n].dirty.mark(&r);
                }
                Command::Settled { up_to } => {
                    let al = &mut self.nodes[n].al;
                    *al = al.split_off(&(up_to + 1));
                }
                Command::PathState(s) => {
                    if s == PathState::Unavailable
                        && matches!(role, RoleKind::Fenced | RoleKind::Out)
                    {
                        self.nodes[n].unavailable = true;
                    }
                }
                Command::WitnessCas {
                    expected_epoch,
                    record,
                } => {
                    let incarnation = self.nodes[n].incarnation;
                    let at = self.now + self.rng.gen_range(1..=10);
                    let (result, conflict) = if !self.witness_reachable(id) {
                        (Err("partitioned from the witness".to_string()), false)
                    } else if self.record.epoch != expected_epoch || record.epoch <= expected_epoch
                    {
                        (Ok(self.record.clone()), true)
                    } else {
                        self.record = record.clone();
                        self.stats.epochs += 1;
                        self.check_acked_on_in_sync("at CAS", None);
                        (Ok(record), false)
                    };
                    self.schedule(
                        at,
                        Event::WitnessReply {
                            node: id,
                            incarnation,
                            result,
                            conflict,
                        },
                    );
                }
                Command::Complete { op, outcome } => self.on_complete(n, epoch, op, outcome),
                // Resync: simulated by the resync issue.
                Command::CopyOut { .. }
                | Command::CopyIn { .. }
                | Command::Checksum { .. }
                | Command::MarkDirtyRegions { .. }
                | Command::ClearDirtyRegions { .. }
                | Command::DropBitmap { .. }
                | Command::ActivityLogAbsorbed => {}
            }
        }
    }

    fn on_complete(&mut self, n: usize, epoch: u64, op: OpId, outcome: Outcome) {
        let id = self.nodes[n].id;
        let Some(info) = self.ops.get_mut(&op.0) else {
            return;
        };
        if info.done.is_some() {
            let what = format!("op {} completed twice", op.0);
            self.violate(Invariant::Liveness, what);
            return;
        }
        info.done = Some(outcome.clone());
        let info = info.clone();
        let Outcome::Done(resp) = outcome else {
            self.stats.retried += 1;
            return;
        };
        self.stats.acked += 1;
        // Invariant 3: acks never go back in epoch; nothing after fencing.
        if self.nodes[n].unavailable {
            self.violate(
                Invariant::SingleWriterEpoch,
                format!("plex {id} acked op {} after going unavailable", op.0),
            );
        }
        if epoch < self.max_ack_epoch {
            self.violate(
                Invariant::SingleWriterEpoch,
                format!(
                    "plex {id} acked op {} in epoch {epoch} after an ack in epoch {}",
                    op.0, self.max_ack_epoch
                ),
            );
        }
        if epoch > self.record.epoch {
            self.violate(
                Invariant::SingleWriterEpoch,
                format!("plex {id} acked in epoch {epoch} the witness never reached"),
            );
        }
        self.max_ack_epoch = self.max_ack_epoch.max(epoch);
        let Some(&seq) = self.nodes[n].applied_seqs.get(&op.0) else {
            self.violate(
                Invariant::AckedWritesOnEveryInSyncPlex,
                format!("plex {id} acked op {} it never applied", op.0),
            );
            return;
        };
        match info.kind {
            Kind::Write => {
                self.acked.insert(op.0, seq);
                for b in blocks_of(&info.range) {
                    let slot = &mut self.last_acked[b as usize];
                    if slot.is_none_or(|(s, _)| s < seq) {
                        *slot = Some((seq, op.0));
                    }
                }
            }
            Kind::Barrier => {
                // Invariant 5: the response (the state after the op) is the same everywhere.
                let in_sync = self.in_sync_nodes();
                for m in in_sync {
                    let got = self.nodes[m].resv_log.get(&seq).copied();
                    if got.map(|v| v.to_be_bytes().to_vec()) != Some(resp.to_vec()) {
                        let what = format!(
                            "barrier op {} (seq {seq}) acked with state {:?}, plex {} has {:?}",
                            op.0,
                            resp.to_vec(),
                            self.nodes[m].id,
                            got
                        );
                        self.violate(Invariant::ReservationStateIdentical, what);
                    }
                }
                self.acked.insert(op.0, seq);
            }
        }
        self.check_acked_on_in_sync("at ack", Some(op.0));
    }

    fn in_sync_nodes(&self) -> Vec<usize> {
        self.record
            .plexes
            .iter()
            .filter(|p| p.state == PlexState::InSync)
            .map(|p| (p.id - 1) as usize)
            .collect()
    }

    /// Invariant 1: every acked op is on every plex InSync in the witness's record.
    fn check_acked_on_in_sync(&mut self, when: &str, only: Option<u64>) {
        let mut bad = Vec::new();
        for m in self.in_sync_nodes() {
            let node = &self.nodes[m];
            let ops: Vec<(u64, Seq)> = match only {
                Some(v) => self.acked.get(&v).map(|s| (v, *s)).into_iter().collect(),
                None => self.acked.iter().map(|(v, s)| (*v, *s)).collect(),
            };
            for (value, seq) in ops {
                let info = &self.ops[&value];
                let present = match info.kind {
                    Kind::Write => {
                        blocks_of(&info.range).all(|b| node.history[b as usize].contains(&value))
                    }
                    Kind::Barrier => node.resv_log.contains_key(&seq),
                };
                if !present {
                    bad.push(format!(
                        "{when}: acked op {value} (seq {seq}) missing on in-sync plex {} (epoch {})",
                        node.id, self.record.epoch
                    ));
                }
            }
        }
        for b in bad {
            self.violate(Invariant::AckedWritesOnEveryInSyncPlex, b);
        }
    }

    fn final_checks(&mut self) {
        // Liveness: every op completed (crashes complete theirs with Retry).
        let open: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.done.is_none())
            .map(|(v, _)| *v)
            .collect();
        if !open.is_empty() {
            let what = format!(
                "{} ops never completed, e.g. {:?}",
                open.len(),
                &open[..open.len().min(5)]
            );
            self.violate(Invariant::Liveness, what);
        }
        let in_sync = self.in_sync_nodes();
        let epoch = self.record.epoch;
        let serving: Vec<usize> = in_sync
            .iter()
            .copied()
            .filter(|&m| {
                self.nodes[m]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.role() == RoleKind::Active && e.epoch() == epoch)
            })
            .collect();
        self.stats.served_at_end = !serving.is_empty();
        if serving.is_empty() {
            return;
        }
        if serving.len() != in_sync.len() {
            let what = format!(
                "record epoch {epoch}: in-sync plexes {:?} but only {:?} serve",
                in_sync.iter().map(|m| m + 1).collect::<Vec<_>>(),
                serving.iter().map(|m| m + 1).collect::<Vec<_>>()
            );
            self.violate(Invariant::Liveness, what);
        }
        self.check_acked_on_in_sync("at end", None);
        // Invariant 2 and 5: identical blocks and reservation state.
        let r = serving[0];
        let mut found = Vec::new();
        for &m in &serving[1..] {
            let (a, b) = (&self.nodes[r], &self.nodes[m]);
            let diff: Vec<usize> = (0..a.disk.len())
                .filter(|&i| a.disk[i] != b.disk[i])
                .collect();
            if !diff.is_empty() {
                let what = format!(
                    "epoch {epoch}: plexes {} and {} differ at blocks {:?} ({:?} vs {:?})",
                    a.id, b.id, diff, a.disk[diff[0]], b.disk[diff[0]]
                );
                found.push((Invariant::InSyncPlexesIdentical, what));
            }
            if a.resv != b.resv {
                let what = format!(
                    "plexes {} and {} hold different reservation state",
                    a.id, b.id
                );
                found.push((Invariant::ReservationStateIdentical, what));
            }
            let common: Vec<Seq> = a
                .resv_log
                .keys()
                .filter(|s| b.resv_log.contains_key(s))
                .copied()
                .collect();
            for s in common {
                if a.resv_log[&s] != b.resv_log[&s] {
                    let what = format!(
                        "after barrier seq {s}: plexes {} and {} hold different reservation state",
                        a.id, b.id
                    );
                    found.push((Invariant::ReservationStateIdentical, what));
                    break;
                }
            }
        }
        for (i, w) in found {
            self.violate(i, w);
        }
        // Invariant 4: every block where a Stale plex differs is dirty on the in-sync side
        // or in the stale plex's own activity log.
        let stale: Vec<usize> = self
            .record
            .plexes
            .iter()
            .filter(|p| p.state == PlexState::Stale)
            .map(|p| (p.id - 1) as usize)
            .collect();
        let mut bad = Vec::new();
        for &s in &stale {
            let sn = &self.nodes[s];
            let rn = &self.nodes[r];
            for b in 0..rn.disk.len() {
                if sn.disk[b].value == rn.disk[b].value {
                    continue;
                }
                let lba = b as u64;
                self.stats.divergent_blocks += 1;
                let covered = serving
                    .iter()
                    .any(|&m| self.nodes[m].dirty.is_block_dirty(lba))
                    || sn.al.values().any(|r| blocks_of(r).contains(&lba));
                if !covered {
                    bad.push(format!(
                        "stale plex {} differs from in-sync plex {} at block {b} ({:?} vs {:?}) \
                         outside every dirty region and its activity log",
                        sn.id, rn.id, sn.disk[b], rn.disk[b]
                    ));
                }
            }
        }
        for b in bad {
            self.violate(Invariant::DirtyMapCoversDivergence, b);
        }
    }
}

fn engine_cfg(id: PlexId) -> Config {
    Config {
        me: id,
        block_size: BLOCK_SIZE,
        region_bytes: REGION_BYTES,
    }
}

/// Run the seeds the environment asks for (`SVA_SIM_SEED=n`: that one seed;
/// `SVA_SIM_SEEDS=n`: seeds 0..n; else `0..default_seeds`) and panic, naming the seed, at the
/// first violation of `invariant`.
pub fn check(invariants: &[Invariant], default_seeds: u64) {
    let seeds: Vec<u64> = match (
        std::env::var("SVA_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok()),
        std::env::var("SVA_SIM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok()),
    ) {
        (Some(seed), _) => vec![seed],
        (None, Some(n)) => (0..n).collect(),
        (None, None) => (0..default_seeds).collect(),
    };
    let mut total = Stats::default();
    for seed in seeds {
        let report = Sim::new(SimConfig::from_seed(seed)).run();
        let s = &report.stats;
        total.submitted += s.submitted;
        total.acked += s.acked;
        total.retried += s.retried;
        total.reads_served += s.reads_served;
        total.epochs += s.epochs;
        total.crashes += s.crashes;
        total.partitions += s.partitions;
        total.served_at_end |= s.served_at_end;
        total.divergent_blocks += s.divergent_blocks;
        total.messages += s.messages;
        total.syncs_with_ops += s.syncs_with_ops;
        if let Some(v) = report
            .violations
            .iter()
            .find(|v| invariants.contains(&v.invariant))
        {
            panic!(
                "{:?} violated at t={} ms with seed {seed}: {}\n  config: {:?}\n  stats: {:?}\n  \
                 replay: SVA_SIM_SEED={seed} cargo test -p sva-node --test <this file> -- --nocapture",
                v.invariant, v.time, v.what, report.config, report.stats
            );
        }
    }
    eprintln!("{invariants:?}: ok; totals {total:?}");
    assert!(
        total.acked > 0,
        "the simulation acked nothing: the check would be vacuous"
    );
}
