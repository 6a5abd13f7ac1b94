//! Seeded deterministic simulation of N mirror engines (tigerbeetle VOPR style).
//!
//! Everything the engines touch is simulated and driven by one PRNG seeded from the run's
//! seed: the clock (1 ms steps), the network (per-message delay, loss, duplication, reorder,
//! one- and two-way partitions that start and heal; every message goes through the codec),
//! the disks (per block: the seq and unique value of the last op written, plus the history of
//! values; a replicated "reservation" word changed by barrier ops), the witness (an in-memory
//! CAS that a partitioned node may not reach), crashes of one node or of every node at once
//! (the engine's memory is lost; a write in flight may land torn — any subset of its blocks —
//! or not at all; the persisted write-intent bitmaps and activity log survive; the node
//! restarts with `Start::Restart(Recovered)` built from them, sometimes with a wiped disk),
//! fenced nodes restarted by their supervisor, resync (`CopyOut`/`CopyIn` on the simulated
//! disks, `Checksum` for an online verify started now and then) and clients (overlapping writes
//! and barriers through random nodes, reads through nodes that hold a read lease).
//!
//! A run has a chaos phase, then a settle phase (faults healed, no new ops) after which the
//! volume must be quiescent. Invariant checks (DESIGN.md §5) run during the run (at acks,
//! reads and CAS) and at the end; each violation names its [`Invariant`].

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::engine::{Command, Config, Engine, Millis, OpId, Outcome, PathState, RoleKind, Start};
use super::msg::{self, LbaRange, OpMeta, OpRange, PlexId, Seq};
use super::resync::{CopyWhat, Recovered};
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
    /// 6. Once quiescent, resync brought back every stale, crashed, wiped or fenced plex:
    ///    each is InSync and serving again.
    ResyncCompletes,
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
    /// Per-ms probability that every node crashes at once.
    pub crash_all: f64,
    /// Probability that a crashed node comes back with a wiped disk (a full resync).
    pub wipe: f64,
    /// Per-ms probability that the sequencer starts an online verify.
    pub verify: f64,
    /// Per-ms probability that a client submits an op / a read.
    pub submit: f64,
    pub read: f64,
    /// The engines' `Config::copy_window`: 8, the window the pinned seeds were found with,
    /// unless `SVA_SIM_COPY_WINDOW` says otherwise (to hunt with the product's default).
    pub copy_window: usize,
}

/// `SVA_SIM_COPY_WINDOW`, else 8.
fn copy_window_from_env() -> usize {
    std::env::var("SVA_SIM_COPY_WINDOW")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
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
            settle_ms: 10_000,
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
            crash_all: if faulty {
                [0.0, 0.0, 0.0002][r.gen_range(0..3)]
            } else {
                0.0
            },
            wipe: [0.0, 0.2][r.gen_range(0..2)],
            verify: 0.0005,
            submit: [0.05, 0.2, 0.5][r.gen_range(0..3)],
            read: 0.2,
            copy_window: copy_window_from_env(),
        }
    }
}

impl SimConfig {
    /// This configuration with the product's copy window ([`super::engine::COPY_WINDOW`]).
    pub fn with_product_copy_window(self) -> SimConfig {
        SimConfig {
            copy_window: super::engine::COPY_WINDOW,
            ..self
        }
    }

    /// A 3-way swarm tilted towards wiped plexes whose resync source changes: frequent
    /// crashes (a wiped disk in one restart of two), lossy links and partitions, so a
    /// wiped learner's `JoinRequest` often reaches only some in-sync peers.
    pub fn wipe_heavy(seed: u64) -> SimConfig {
        let mut c = SimConfig::from_seed(seed);
        c.nodes = 3;
        c.wipe = 0.5;
        c.crash = c.crash.max(0.0005);
        c.loss = c.loss.max(0.05);
        c.partition = c.partition.max(0.001);
        c
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
    /// Crashes of every node at once.
    pub crashes_all: u64,
    /// Apply / CopyIn writes torn by a crash.
    pub torn_writes: u64,
    /// Copies applied on a learner, and those of them that were holes.
    pub copies: u64,
    /// Learners that came back InSync (a `DropBitmap` after the rejoin view change).
    pub rejoins: u64,
    /// Recovery CASes won by a restarted node the record listed InSync.
    pub recoveries: u64,
    /// Restarts with a wiped disk.
    pub wipes: u64,
    /// Verify regions compared (and mismatches, which fail invariant 6).
    pub verified_regions: u64,
    /// Divergence-coverage checks made while a plex was stale.
    pub coverage_checks: u64,
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
const BLOCKS_PER_REGION: u64 = REGION_BYTES / BLOCK_SIZE as u64;
/// Invariant 4 is also checked this often while a plex is stale.
const COVERAGE_EVERY_MS: Millis = 50;
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
    /// Persisted write-intent bitmaps (one per stale plex; survive crashes).
    bitmaps: BTreeMap<PlexId, BTreeSet<u64>>,
    /// Like the driver's bitmap `FILLED` flag: every region was set at once since created.
    bitmaps_filled: BTreeSet<PlexId>,
    /// Persisted activity log: regions of the ops this incarnation applies and has not seen
    /// settled, plus what a previous incarnation left or `KeepInActivityLog` named, until
    /// `ActivityLogAbsorbed`.
    al_ops: BTreeMap<Seq, BTreeSet<u64>>,
    al_recovered: BTreeSet<u64>,
    /// The disk was wiped and no source accepted the plex yet: it asks every peer for a full
    /// resync (its divergence is everywhere; invariant 4 skips it, 2 and 6 check the result).
    /// Like the driver's `mirror-started` marker, cleared once a source accepted it.
    wiped: bool,
    /// Like the driver's `full-resync-pending` marker: set with a wipe, cleared once the
    /// plex serves again (its full resync finished).
    full_pending: bool,
    /// Seq of the last LU-state copy applied here (it carries every earlier barrier).
    lu_copy_seq: Seq,
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
    CopyOutDone {
        node: PlexId,
        incarnation: u32,
        seq: Seq,
        what: CopyWhat,
    },
    CopyInDone {
        node: PlexId,
        incarnation: u32,
        seq: Seq,
        what: CopyWhat,
        data: Bytes,
    },
    ChecksumDone {
        node: PlexId,
        incarnation: u32,
        seq: Seq,
        range: LbaRange,
    },
}

fn region_of(block: u64) -> u64 {
    block / BLOCKS_PER_REGION
}

fn regions_of(r: &OpRange) -> BTreeSet<u64> {
    match r {
        OpRange::Blocks(r) if r.blocks > 0 => (region_of(r.lba)..=region_of(r.end() - 1)).collect(),
        _ => BTreeSet::new(),
    }
}

fn lba_blocks(r: &LbaRange) -> std::ops::Range<u64> {
    r.lba..r.end()
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
    trace: bool,
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
                    engine_cfg(id, &cfg),
                    record.clone(),
                    T0,
                    Start::Bootstrap,
                )),
                incarnation: 0,
                disk: vec![Block::default(); cfg.blocks as usize],
                history: vec![Default::default(); cfg.blocks as usize],
                resv: 0,
                resv_log: BTreeMap::new(),
                bitmaps: BTreeMap::new(),
                bitmaps_filled: BTreeSet::new(),
                al_ops: BTreeMap::new(),
                al_recovered: BTreeSet::new(),
                wiped: false,
                full_pending: false,
                lu_copy_seq: 0,
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
            trace: std::env::var("SVA_SIM_TRACE").is_ok(),
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
            self.links_healed();
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
            self.maintenance();
            for nd in &mut self.nodes {
                if nd.wiped
                    && nd
                        .engine
                        .as_ref()
                        .is_some_and(|e| matches!(e.role(), RoleKind::Learning | RoleKind::Active))
                {
                    nd.wiped = false;
                }
            }
            if self.now.is_multiple_of(COVERAGE_EVERY_MS) {
                self.check_coverage(false);
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

    /// `SVA_SIM_TRACE=1`: print the run's notable events (with `SVA_SIM_SEED`).
    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{:>6}] {}", self.now, what());
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
                let at = self.now + self.rng.gen_range(200..2_000);
                self.crash(victim, at);
            }
        }
        if self.cfg.crash_all > 0.0 && self.rng.gen_bool(self.cfg.crash_all) {
            self.stats.crashes_all += 1;
            for victim in 0..n as usize {
                if self.nodes[victim].engine.is_some() {
                    let at = self.now + self.rng.gen_range(200..2_000);
                    self.crash(victim, at);
                }
            }
        }
    }

    /// A fenced node is restarted by its supervisor; a volume serving may start a verify.
    fn maintenance(&mut self) {
        for v in 0..self.nodes.len() {
            let fenced = self.nodes[v]
                .engine
                .as_ref()
                .is_some_and(|e| e.role() == RoleKind::Fenced);
            if fenced {
                let at = self.now + self.rng.gen_range(100..1_000);
                self.crash(v, at);
            }
        }
        if self.rng.gen_bool(self.cfg.verify) {
            let s = (self.record.sequencer - 1) as usize;
            self.check_verify();
            if let Some(e) = self.nodes[s].engine.as_mut() {
                let before = e.verify_status();
                if e.start_verify(self.now, false).is_ok() {
                    self.stats.verified_regions += before.regions_done;
                }
            }
            self.drain(s);
        }
    }

    /// Node `victim` loses its memory; writes in flight land torn (any subset of their
    /// blocks, possibly none) since nothing reported them durable; it restarts at `at`.
    fn crash(&mut self, victim: usize, at: Millis) {
        self.stats.crashes += 1;
        self.trace(|| format!("CRASH plex {} (restart at {at})", victim + 1));
        let id = self.nodes[victim].id;
        let inc = self.nodes[victim].incarnation;
        let mut torn: Vec<(Seq, u64, Kind, OpRange)> = Vec::new();
        let mut torn_copies: Vec<(CopyWhat, Bytes)> = Vec::new();
        for ev in self.events.values() {
            match ev {
                Event::ApplyDone {
                    node,
                    incarnation,
                    seq,
                    value,
                    kind,
                    range,
                } if *node == id && *incarnation == inc => {
                    torn.push((*seq, *value, *kind, *range));
                }
                Event::CopyInDone {
                    node,
                    incarnation,
                    what,
                    data,
                    ..
                } if *node == id && *incarnation == inc => {
                    torn_copies.push((*what, data.clone()));
                }
                _ => {}
            }
        }
        for (seq, value, kind, range) in torn {
            self.stats.torn_writes += 1;
            match kind {
                Kind::Write => {
                    for b in blocks_of(&range) {
                        if self.rng.gen_bool(0.5) {
                            let nd = &mut self.nodes[victim];
                            nd.disk[b as usize] = Block { seq, value };
                            nd.history[b as usize].insert(value);
                        }
                    }
                }
                Kind::Barrier => {
                    if self.rng.gen_bool(0.5) {
                        let nd = &mut self.nodes[victim];
                        nd.resv = mix(nd.resv, value);
                    }
                }
            }
        }
        for (what, data) in torn_copies {
            self.stats.torn_writes += 1;
            if let CopyWhat::Region { range, .. } = what {
                let blocks = decode_region(&data, range.blocks);
                for (i, b) in lba_blocks(&range).enumerate() {
                    if self.rng.gen_bool(0.5) {
                        let nd = &mut self.nodes[victim];
                        nd.disk[b as usize] = blocks[i];
                        nd.history[b as usize].insert(blocks[i].value);
                    }
                }
            }
        }
        let node = &mut self.nodes[victim];
        node.engine = None;
        node.incarnation += 1;
        node.unavailable = false;
        node.restart_at = Some(at);
        // The activity log survives; what this incarnation logged is "recovered" now.
        let ops = std::mem::take(&mut node.al_ops);
        for r in ops.into_values() {
            node.al_recovered.extend(r);
        }
        // Ops in flight on the crashed node die with its sessions.
        for op in self.ops.values_mut() {
            if op.node == id && op.done.is_none() {
                op.done = Some(Outcome::Retry);
            }
        }
    }

    /// Partitions that ended: the dialer of each healed direction reconnects, and its
    /// driver reports the link up (`Engine::link_up`).
    fn links_healed(&mut self) {
        let now = self.now;
        let healed: Vec<(PlexId, PlexId)> = self
            .down
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| *k)
            .collect();
        for (from, to) in healed {
            self.down.remove(&(from, to));
            self.report_link_up(from, to);
        }
    }

    /// The driver of `from` reports its link to `to` up (if `from` runs).
    fn report_link_up(&mut self, from: PlexId, to: PlexId) {
        let running = |nd: &Node| nd.id == from && nd.engine.is_some();
        let Some(n) = self.nodes.iter().position(running) else {
            return;
        };
        self.trace(|| format!("LINK UP {from} -> {to}"));
        let now = self.now;
        if let Some(e) = self.nodes[n].engine.as_mut() {
            e.link_up(now, to);
        }
        self.drain(n);
    }

    fn heal_all(&mut self) {
        let now = self.now;
        for until in self.down.values_mut() {
            *until = now;
        }
        self.links_healed();
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
                let wipe = self.cfg.wipe > 0.0 && self.rng.gen_bool(self.cfg.wipe);
                self.trace(|| format!("RESTART plex {id} wiped={wipe}"));
                let nd = &mut self.nodes[n];
                if wipe {
                    // A replaced disk: no data, no state directory.
                    self.stats.wipes += 1;
                    nd.disk = vec![Block::default(); self.cfg.blocks as usize];
                    nd.history = vec![Default::default(); self.cfg.blocks as usize];
                    nd.resv = 0;
                    nd.resv_log.clear();
                    nd.lu_copy_seq = 0;
                    nd.bitmaps.clear();
                    nd.bitmaps_filled.clear();
                    nd.al_recovered.clear();
                    nd.wiped = true;
                    nd.full_pending = true;
                }
                let recovered = Recovered {
                    activity_log: nd.al_recovered.clone(),
                    bitmaps: nd.bitmaps.clone(),
                    // The driver's `mirror-started` marker: absent on a wiped plex until a
                    // source accepted it (and holds a full bitmap for it).
                    data_valid: !nd.wiped,
                    full_pending: nd.full_pending,
                    filled: nd.bitmaps_filled.clone(),
                };
                nd.engine = Some(Engine::new(
                    engine_cfg(id, &self.cfg),
                    self.record.clone(),
                    self.now,
                    Start::Restart(recovered),
                ));
                self.drain(n);
                // Its links to the running peers, and theirs to it, connect (where no
                // partition cuts them), after its first messages went out unconnected.
                let peers: Vec<PlexId> = self
                    .nodes
                    .iter()
                    .filter(|p| p.id != id && p.engine.is_some())
                    .map(|p| p.id)
                    .collect();
                for p in peers {
                    if self.link_up(id, p) {
                        self.report_link_up(id, p);
                    }
                    if self.link_up(p, id) {
                        self.report_link_up(p, id);
                    }
                }
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
                Event::CopyOutDone {
                    node,
                    incarnation,
                    seq,
                    what,
                } => {
                    let n = (node - 1) as usize;
                    if self.nodes[n].incarnation != incarnation {
                        continue;
                    }
                    let nd = &self.nodes[n];
                    let data = match what {
                        CopyWhat::Region { range, .. } => {
                            let blocks: Vec<Block> =
                                lba_blocks(&range).map(|b| nd.disk[b as usize]).collect();
                            encode_region(&blocks)
                        }
                        CopyWhat::LuState => Bytes::from(nd.resv.to_be_bytes().to_vec()),
                    };
                    if let Some(e) = self.nodes[n].engine.as_mut() {
                        e.copied_out(self.now, seq, data);
                        self.drain(n);
                    }
                }
                Event::CopyInDone {
                    node,
                    incarnation,
                    seq,
                    what,
                    data,
                } => {
                    let n = (node - 1) as usize;
                    if self.nodes[n].incarnation != incarnation || self.nodes[n].engine.is_none() {
                        continue;
                    }
                    self.stats.copies += 1;
                    let nd = &mut self.nodes[n];
                    match what {
                        CopyWhat::Region { range, .. } => {
                            let blocks = decode_region(&data, range.blocks);
                            for (i, b) in lba_blocks(&range).enumerate() {
                                nd.disk[b as usize] = blocks[i];
                                nd.history[b as usize].insert(blocks[i].value);
                            }
                        }
                        CopyWhat::LuState => {
                            let mut v = [0u8; 8];
                            if let Some(d) = data.get(..8) {
                                v.copy_from_slice(d);
                            }
                            nd.resv = u64::from_be_bytes(v);
                            nd.lu_copy_seq = nd.lu_copy_seq.max(seq);
                            // Barriers it applied before (maybe of a discarded history) are
                            // superseded by the copied state.
                            nd.resv_log.clear();
                        }
                    }
                    if let Some(e) = nd.engine.as_mut() {
                        e.applied(self.now, seq, Bytes::new());
                    }
                    self.drain(n);
                }
                Event::ChecksumDone {
                    node,
                    incarnation,
                    seq,
                    range,
                } => {
                    let n = (node - 1) as usize;
                    if self.nodes[n].incarnation != incarnation {
                        continue;
                    }
                    let nd = &self.nodes[n];
                    let mut h = [0u8; 32];
                    for b in lba_blocks(&range) {
                        let x = mix(nd.disk[b as usize].value, b);
                        for (i, byte) in x.to_be_bytes().iter().enumerate() {
                            h[(b as usize * 8 + i) % 32] ^= byte;
                        }
                    }
                    if let Some(e) = self.nodes[n].engine.as_mut() {
                        e.checksummed(self.now, seq, h);
                        self.drain(n);
                    }
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
            if !matches!(
                cmd,
                Command::Send { .. }
                    | Command::Apply { .. }
                    | Command::Complete { .. }
                    | Command::Settled { .. }
            ) {
                self.trace(|| format!("plex {id} ({role:?} e{epoch}): {cmd:?}"));
            } else if let Command::Send { to, msg } = &cmd {
                if std::env::var("SVA_SIM_TRACE").as_deref() == Ok("all")
                    || !matches!(
                        msg,
                        msg::Message::Heartbeat { .. }
                            | msg::Message::Apply { .. }
                            | msg::Message::Applied { .. }
                    )
                {
                    self.trace(|| format!("plex {id} ({role:?} e{epoch}) -> {to}: {msg:?}"));
                }
            }
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
                    // Activity log: durable before the write starts.
                    self.nodes[n]
                        .al_ops
                        .entry(seq)
                        .or_default()
                        .extend(regions_of(&op.range));
                    let (value, kind) = decode_payload(&op.payload);
                    // Up to 10 ms per write: a crash often finds some in flight (torn).
                    let at = self.now + self.rng.gen_range(1..=10);
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
                Command::Settled { up_to } => {
                    let al = &mut self.nodes[n].al_ops;
                    *al = al.split_off(&(up_to + 1));
                }
                Command::MarkDirtyRegions { plex, regions } => {
                    let regions_total = self.cfg.blocks.div_ceil(BLOCKS_PER_REGION) as usize;
                    let nd = &mut self.nodes[n];
                    let bm = nd.bitmaps.entry(plex).or_default();
                    bm.extend(regions);
                    if bm.len() >= regions_total {
                        nd.bitmaps_filled.insert(plex);
                    }
                }
                Command::ClearDirtyRegions { plex, regions } => {
                    if let Some(b) = self.nodes[n].bitmaps.get_mut(&plex) {
                        for r in regions {
                            b.remove(&r);
                        }
                    }
                }
                Command::DropBitmap { plex } => {
                    self.nodes[n].bitmaps_filled.remove(&plex);
                    if self.nodes[n].bitmaps.remove(&plex).is_some()
                        && self
                            .record
                            .plexes
                            .iter()
                            .any(|p| p.id == plex && p.state == PlexState::InSync)
                        && n + 1 == self.record.sequencer as usize
                    {
                        self.stats.rejoins += 1;
                    }
                }
                Command::ActivityLogAbsorbed => {
                    self.nodes[n].al_recovered.clear();
                }
                Command::KeepInActivityLog { regions } => {
                    self.nodes[n].al_recovered.extend(regions);
                }
                Command::CopyOut { seq, what } => {
                    let at = self.now + self.rng.gen_range(1..=4);
                    let incarnation = self.nodes[n].incarnation;
                    self.schedule(
                        at,
                        Event::CopyOutDone {
                            node: id,
                            incarnation,
                            seq,
                            what,
                        },
                    );
                }
                Command::CopyIn { seq, what, data } => {
                    // Like the driver: a copy is logged until it settles (it may carry ops
                    // only its source applied). Without it, seed 4139 (3-way) diverges: the
                    // node that recovers as the next source never applied such an op and
                    // its bitmap lacks the region (`tests/sim_insync_plexes_identical.rs`).
                    if let CopyWhat::Region { range, .. } = what {
                        self.nodes[n]
                            .al_ops
                            .entry(seq)
                            .or_default()
                            .extend(regions_of(&OpRange::Blocks(range)));
                    }
                    let at = self.now + self.rng.gen_range(1..=4);
                    let incarnation = self.nodes[n].incarnation;
                    self.schedule(
                        at,
                        Event::CopyInDone {
                            node: id,
                            incarnation,
                            seq,
                            what,
                            data,
                        },
                    );
                }
                Command::Checksum { seq, range, .. } => {
                    let at = self.now + self.rng.gen_range(1..=4);
                    let incarnation = self.nodes[n].incarnation;
                    self.schedule(
                        at,
                        Event::ChecksumDone {
                            node: id,
                            incarnation,
                            seq,
                            range,
                        },
                    );
                }
                Command::PathState(s) => {
                    if s == PathState::Unavailable
                        && matches!(role, RoleKind::Fenced | RoleKind::Out)
                    {
                        self.nodes[n].unavailable = true;
                    }
                    // Back in sync through a resync, in a newer epoch: it may ack again.
                    if s == PathState::ActiveOptimized {
                        self.nodes[n].unavailable = false;
                        self.nodes[n].wiped = false;
                        self.nodes[n].full_pending = false;
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
                        if record.sequencer == id && role == RoleKind::Recovering {
                            self.stats.recoveries += 1;
                        }
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
                    // A plex resynced after this op holds its state through the LU-state copy;
                    // a wiped disk holds nothing (see `check_acked_on_in_sync`; seed 5592).
                    if self.nodes[m].lu_copy_seq > seq || self.nodes[m].wiped {
                        continue;
                    }
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

    /// In-sync nodes serving the record's epoch (Active in it).
    fn serving_nodes(&self) -> Vec<usize> {
        let epoch = self.record.epoch;
        self.in_sync_nodes()
            .into_iter()
            .filter(|&m| {
                self.nodes[m]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.role() == RoleKind::Active && e.epoch() == epoch)
            })
            .collect()
    }

    /// Invariant 1: every acked op is on every plex InSync in the witness's record.
    fn check_acked_on_in_sync(&mut self, when: &str, only: Option<u64>) {
        let mut bad = Vec::new();
        for m in self.in_sync_nodes() {
            let node = &self.nodes[m];
            // A replaced (wiped) disk the record still lists InSync holds nothing until a
            // source accepts it (then `wiped` clears and it is checked again): no protocol
            // can keep data on it, and it never serves meanwhile (a wiped node starts Out;
            // reads and the end checks would see it). Seeds 527, 1738, 2173, 2595, 2939,
            // 4194, 4508 (3-way) flagged such a disk at a CAS excluding another plex.
            if node.wiped {
                continue;
            }
            let ops: Vec<(u64, Seq)> = match only {
                Some(v) => self.acked.get(&v).map(|s| (v, *s)).into_iter().collect(),
                None => self.acked.iter().map(|(v, s)| (*v, *s)).collect(),
            };
            for (value, seq) in ops {
                let info = &self.ops[&value];
                let present = match info.kind {
                    // A resync copies a block's latest value only: a later write there counts.
                    Kind::Write => blocks_of(&info.range).all(|b| {
                        node.history[b as usize].contains(&value) || node.disk[b as usize].seq > seq
                    }),
                    Kind::Barrier => node.resv_log.contains_key(&seq) || node.lu_copy_seq > seq,
                };
                if !present {
                    let first = blocks_of(&info.range).find(|&b| {
                        !node.history[b as usize].contains(&value)
                            && node.disk[b as usize].seq <= seq
                    });
                    bad.push(format!(
                        "{when}: acked op {value} (seq {seq}) missing on in-sync plex {} (epoch {}) \
                         at block {first:?} holding {:?}",
                        node.id,
                        self.record.epoch,
                        first.map(|b| node.disk[b as usize])
                    ));
                }
            }
        }
        for b in bad {
            self.violate(Invariant::AckedWritesOnEveryInSyncPlex, b);
        }
    }

    fn final_checks(&mut self) {
        if std::env::var("SVA_SIM_DUMP").is_ok() {
            for nd in &self.nodes {
                eprintln!("DUMP plex {}: {:#?}", nd.id, nd.engine);
            }
        }
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
        let serving = self.serving_nodes();
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
        self.check_coverage(true);
        // Invariant 6: resync brought every plex back.
        let mut behind = Vec::new();
        for nd in &self.nodes {
            let state = self
                .record
                .plexes
                .iter()
                .find(|p| p.id == nd.id)
                .map(|p| p.state);
            let role = nd.engine.as_ref().map(|e| (e.role(), e.epoch()));
            if state != Some(PlexState::InSync) || role != Some((RoleKind::Active, epoch)) {
                behind.push(format!(
                    "plex {} is {:?} with engine {:?}",
                    nd.id, state, role
                ));
            }
        }
        if !behind.is_empty() {
            let what = format!("record epoch {epoch}: {}", behind.join("; "));
            self.violate(Invariant::ResyncCompletes, what);
        }
        self.check_verify();
    }

    /// Invariant 4: every block where a non-InSync plex differs from a serving in-sync plex
    /// lies in a region of a persisted bitmap some serving plex keeps for it, or in the stale
    /// plex's own persisted activity log. While ops may be in flight (`end` false) the
    /// serving plexes' activity logs count too: what a learner has not applied yet is
    /// unsettled there (and a recovery merges that log into its bitmaps).
    fn check_coverage(&mut self, end: bool) {
        let serving = self.serving_nodes();
        let Some(&r) = serving.first() else {
            return;
        };
        let stale: Vec<usize> = self
            .record
            .plexes
            .iter()
            .filter(|p| matches!(p.state, PlexState::Stale | PlexState::Resyncing))
            .map(|p| (p.id - 1) as usize)
            .collect();
        let mut bad = Vec::new();
        for &s in &stale {
            let sn = &self.nodes[s];
            // A wiped plex, or one whose full resync has not finished, differs everywhere not
            // copied yet: its every `JoinRequest` says `full`, and each source fills its
            // bitmap before accepting it (or resumes from a bitmap it filled itself). The end
            // checks (identity, acked writes) judge the result.
            if sn.wiped || sn.full_pending {
                continue;
            }
            self.stats.coverage_checks += 1;
            let rn = &self.nodes[r];
            let sid = sn.id;
            let in_al = |n: &Node, g: u64| {
                n.al_recovered.contains(&g) || n.al_ops.values().any(|x| x.contains(&g))
            };
            for b in 0..rn.disk.len() {
                if sn.disk[b].value == rn.disk[b].value {
                    continue;
                }
                if end {
                    self.stats.divergent_blocks += 1;
                }
                let g = region_of(b as u64);
                let covered = serving.iter().any(|&m| {
                    self.nodes[m]
                        .bitmaps
                        .get(&sid)
                        .is_some_and(|x| x.contains(&g))
                }) || in_al(sn, g)
                    || (!end && serving.iter().any(|&m| in_al(&self.nodes[m], g)));
                if !covered {
                    bad.push(format!(
                        "stale plex {} differs from in-sync plex {} at block {b} ({:?} vs {:?}) \
                         outside every persisted dirty region and its activity log{}",
                        sn.id,
                        rn.id,
                        sn.disk[b],
                        rn.disk[b],
                        if end { " (at end)" } else { "" }
                    ));
                    break;
                }
            }
        }
        for b in bad {
            self.violate(Invariant::DirtyMapCoversDivergence, b);
        }
    }

    /// An online verify compares in-sync plexes at one point of the order: any mismatch
    /// means they differ (invariant 2).
    fn check_verify(&mut self) {
        let s = (self.record.sequencer - 1) as usize;
        let Some(e) = self.nodes[s].engine.as_ref() else {
            return;
        };
        let v = e.verify_status();
        if !v.mismatched.is_empty() {
            let what = format!(
                "online verify on plex {} found mismatched regions {:?}",
                s + 1,
                v.mismatched
            );
            self.violate(Invariant::InSyncPlexesIdentical, what);
        }
    }
}

fn engine_cfg(id: PlexId, cfg: &SimConfig) -> Config {
    Config {
        me: id,
        block_size: BLOCK_SIZE,
        region_bytes: REGION_BYTES,
        volume_blocks: cfg.blocks,
        copy_window: cfg.copy_window,
    }
}

/// A region as `CopyOut` returns it: per block its seq and value; all-zero: a hole (empty).
fn encode_region(blocks: &[Block]) -> Bytes {
    if blocks.iter().all(|b| *b == Block::default()) {
        return Bytes::new();
    }
    let mut v = Vec::with_capacity(blocks.len() * 16);
    for b in blocks {
        v.extend_from_slice(&b.seq.to_be_bytes());
        v.extend_from_slice(&b.value.to_be_bytes());
    }
    Bytes::from(v)
}

fn decode_region(data: &[u8], blocks: u32) -> Vec<Block> {
    (0..blocks as usize)
        .map(|i| {
            let Some(c) = data.get(i * 16..i * 16 + 16) else {
                return Block::default();
            };
            let mut s = [0u8; 8];
            let mut v = [0u8; 8];
            s.copy_from_slice(&c[..8]);
            v.copy_from_slice(&c[8..]);
            Block {
                seq: u64::from_be_bytes(s),
                value: u64::from_be_bytes(v),
            }
        })
        .collect()
}

/// Run the seeds the environment asks for (`SVA_SIM_SEED=n`: that one seed;
/// `SVA_SIM_SEEDS=n`: seeds 0..n, `SVA_SIM_SEEDS=a..b`: seeds a..b; else `0..default_seeds`,
/// twice: with the configured copy window, then with the product's
/// [`super::engine::COPY_WINDOW`], which found seed 11422) and panic, naming the seed, at the
/// first violation of `invariant`.
pub fn check(invariants: &[Invariant], default_seeds: u64) {
    let (seeds, both_windows): (Vec<u64>, bool) = match (
        std::env::var("SVA_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok()),
        std::env::var("SVA_SIM_SEEDS")
            .ok()
            .and_then(|s| match s.split_once("..") {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => Some((0, s.parse().ok()?)),
            }),
    ) {
        (Some(seed), _) => (vec![seed], false),
        (None, Some((a, b))) => ((a..b).collect(), false),
        (None, None) => ((0..default_seeds).collect(), true),
    };
    // `SVA_SIM_WIPE_HEAVY=1`: the seeds' `SimConfig::wipe_heavy` runs (to replay those).
    let wipe_heavy = std::env::var("SVA_SIM_WIPE_HEAVY").is_ok();
    let config = |seed| {
        if wipe_heavy {
            SimConfig::wipe_heavy(seed)
        } else {
            SimConfig::from_seed(seed)
        }
    };
    check_configs(invariants, seeds.iter().map(|&s| config(s)));
    if both_windows {
        check_configs(
            invariants,
            seeds.iter().map(|&s| config(s).with_product_copy_window()),
        );
    }
}

/// Run exactly `seeds` (pinned regressions: each once found a violation) and panic, naming the
/// seed, at the first violation of `invariant`.
pub fn check_seeds(invariants: &[Invariant], seeds: &[u64]) {
    check_configs(invariants, seeds.iter().map(|&s| SimConfig::from_seed(s)));
}

/// Run these configurations and panic, naming the seed, at the first violation of `invariant`.
pub fn check_configs(invariants: &[Invariant], configs: impl IntoIterator<Item = SimConfig>) {
    let mut total = Stats::default();
    for cfg in configs {
        let seed = cfg.seed;
        let report = Sim::new(cfg).run();
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
        total.crashes_all += s.crashes_all;
        total.torn_writes += s.torn_writes;
        total.copies += s.copies;
        total.rejoins += s.rejoins;
        total.recoveries += s.recoveries;
        total.wipes += s.wipes;
        total.verified_regions += s.verified_regions;
        total.coverage_checks += s.coverage_checks;
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
