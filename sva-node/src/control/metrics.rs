//! The node's metrics registry, rendered in the Prometheus text exposition format 0.0.4.
//!
//! No global state: one [`Metrics`] is created at start-up and shared as `Arc<Metrics>` with
//! whoever records (the [`InstrumentedTarget`](super::instrument::InstrumentedTarget) on the
//! I/O path, the mirror engine for epoch/ALUA/resync gauges) and with the HTTP server that
//! renders it. Every hot-path update is a relaxed atomic add; nothing on the I/O path takes a
//! lock. Per-plex gauges live behind a lock that is taken only to register a plex or render.
//!
//! Names follow the Prometheus conventions: prefix `sva_`, base units, unit last
//! (`sva_io_latency_seconds`, `sva_io_bytes_total`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::scsi::alua::AluaState;
use crate::scsi::cdb::Opcode;
use crate::scsi::ScsiStatus;
use crate::witness::PlexState;

/// Content type of the text exposition format this module renders.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (inclusive, seconds) of the latency histogram buckets; `+Inf` is implicit.
/// From 50 µs (a page-cache hit) to 10 s (an initiator's command timeout is ~30 s, so
/// anything past 10 s is already a problem and needs no finer resolution).
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The same bounds in nanoseconds, so observing compares integers.
const LATENCY_BUCKETS_NANOS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Most plexes the registry tracks gauges for. A volume has 2 or 3 plexes (DESIGN.md §8);
/// plex replacement briefly adds one. The bound keeps a buggy caller from growing
/// `/metrics` without limit.
pub const PLEXES_MAX: usize = 16;

/// Class of a SCSI command, by CDB opcode, for per-class I/O metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// READ (6), (10), (12), (16).
    Read,
    /// Everything that changes the medium: WRITE*, WRITE AND VERIFY, WRITE SAME, UNMAP,
    /// COMPARE AND WRITE, ORWRITE.
    Write,
    /// Everything else (INQUIRY, TEST UNIT READY, SYNCHRONIZE CACHE, PR, ...).
    Other,
}

impl OpClass {
    pub const ALL: [OpClass; 3] = [OpClass::Read, OpClass::Write, OpClass::Other];

    /// Classify a CDB by its opcode (byte 0). An empty CDB is `Other`.
    pub fn of_cdb(cdb: &[u8]) -> OpClass {
        let Some(&op) = cdb.first() else {
            return OpClass::Other;
        };
        use Opcode::*;
        match Opcode::from_u8(op) {
            Read6 | Read10 | Read12 | Read16 => OpClass::Read,
            Write6 | Write10 | Write12 | Write16 | WriteAndVerify10 | WriteAndVerify12
            | WriteAndVerify16 | WriteSame10 | WriteSame16 | Unmap | CompareAndWrite | OrWrite => {
                OpClass::Write
            }
            _ => OpClass::Other,
        }
    }

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Other => "other",
        }
    }

    fn index(self) -> usize {
        match self {
            OpClass::Read => 0,
            OpClass::Write => 1,
            OpClass::Other => 2,
        }
    }
}

/// Non-GOOD SAM statuses counted as errors, with their `status` label.
/// CONDITION MET is a success (SAM-5 §5.3.1: PRE-FETCH found the range fits the cache)
/// and is not counted.
const ERROR_STATUSES: [(ScsiStatus, &str); 6] = [
    (ScsiStatus::CheckCondition, "check_condition"),
    (ScsiStatus::Busy, "busy"),
    (ScsiStatus::ReservationConflict, "reservation_conflict"),
    (ScsiStatus::TaskSetFull, "task_set_full"),
    (ScsiStatus::AcaActive, "aca_active"),
    (ScsiStatus::TaskAborted, "task_aborted"),
];

fn error_index(status: ScsiStatus) -> Option<usize> {
    ERROR_STATUSES.iter().position(|(s, _)| *s == status)
}

/// A fixed-bucket histogram of durations. Buckets are stored non-cumulative (one add per
/// observation) and summed when rendered; the count is the sum of all buckets, so the
/// `+Inf` bucket always equals `_count` even while observations race with a scrape.
#[derive(Debug, Default)]
pub struct Histogram {
    /// `buckets[i]` counts observations in `(bound[i-1], bound[i]]`; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NANOS
            .iter()
            .position(|&b| nanos <= b)
            .unwrap_or(LATENCY_BUCKETS_NANOS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Cumulative bucket counts (one per bound plus `+Inf`), sum in seconds, count.
    pub fn snapshot(&self) -> (Vec<u64>, f64, u64) {
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        let mut acc = 0u64;
        for b in &self.buckets {
            acc = acc.saturating_add(b.load(Ordering::Relaxed));
            cumulative.push(acc);
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (cumulative, sum, acc)
    }
}

/// Counters of one op class.
#[derive(Debug, Default)]
pub struct OpStats {
    commands: AtomicU64,
    bytes: AtomicU64,
    errors: [AtomicU64; ERROR_STATUSES.len()],
    latency: Histogram,
}

/// A plain copy of one op class's counters, for `/v1/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpCounters {
    pub commands: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// Gauges of one plex, set by the mirror engine (resync progress, state).
#[derive(Debug)]
pub struct PlexGauges {
    state: AtomicU8,
    resync_done_bytes: AtomicU64,
    resync_total_bytes: AtomicU64,
    resync_bytes_per_sec: AtomicU64,
    /// Payload bytes copied in every resync of this plex since the node started (counter).
    resync_copied_bytes_total: AtomicU64,
}

const PLEX_STATES: [(PlexState, &str); 4] = [
    (PlexState::InSync, "InSync"),
    (PlexState::Stale, "Stale"),
    (PlexState::Resyncing, "Resyncing"),
    (PlexState::Removed, "Removed"),
];

fn plex_state_code(s: PlexState) -> u8 {
    match s {
        PlexState::InSync => 0,
        PlexState::Stale => 1,
        PlexState::Resyncing => 2,
        PlexState::Removed => 3,
    }
}

fn plex_state_of(code: u8) -> PlexState {
    match code {
        0 => PlexState::InSync,
        1 => PlexState::Stale,
        2 => PlexState::Resyncing,
        _ => PlexState::Removed,
    }
}

impl PlexGauges {
    fn new(state: PlexState) -> Self {
        PlexGauges {
            state: AtomicU8::new(plex_state_code(state)),
            resync_done_bytes: AtomicU64::new(0),
            resync_total_bytes: AtomicU64::new(0),
            resync_bytes_per_sec: AtomicU64::new(0),
            resync_copied_bytes_total: AtomicU64::new(0),
        }
    }
    /// Count `bytes` more payload copied for this plex's resync.
    pub fn add_resync_copied(&self, bytes: u64) {
        self.resync_copied_bytes_total
            .fetch_add(bytes, Ordering::Relaxed);
    }
    /// Payload bytes copied in every resync of this plex so far.
    pub fn resync_copied_total(&self) -> u64 {
        self.resync_copied_bytes_total.load(Ordering::Relaxed)
    }
    pub fn set_state(&self, s: PlexState) {
        self.state.store(plex_state_code(s), Ordering::Relaxed);
    }
    pub fn state(&self) -> PlexState {
        plex_state_of(self.state.load(Ordering::Relaxed))
    }
    /// Resync progress: bytes copied so far, bytes to copy in total, current rate.
    pub fn set_resync(&self, done_bytes: u64, total_bytes: u64, bytes_per_sec: u64) {
        self.resync_done_bytes.store(done_bytes, Ordering::Relaxed);
        self.resync_total_bytes
            .store(total_bytes, Ordering::Relaxed);
        self.resync_bytes_per_sec
            .store(bytes_per_sec, Ordering::Relaxed);
    }
    /// `(done_bytes, total_bytes, bytes_per_sec)`.
    pub fn resync(&self) -> (u64, u64, u64) {
        (
            self.resync_done_bytes.load(Ordering::Relaxed),
            self.resync_total_bytes.load(Ordering::Relaxed),
            self.resync_bytes_per_sec.load(Ordering::Relaxed),
        )
    }
}

const ALUA_STATES: [(AluaState, &str); 5] = [
    (AluaState::ActiveOptimized, "ActiveOptimized"),
    (AluaState::ActiveNonOptimized, "ActiveNonOptimized"),
    (AluaState::Standby, "Standby"),
    (AluaState::Unavailable, "Unavailable"),
    (AluaState::Transitioning, "Transitioning"),
];

/// The node's metrics. Create one, share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    ops: [OpStats; 3],
    sessions: AtomicU64,
    epoch: AtomicU64,
    /// `AluaState::code()` of this node's target port group.
    alua_state: AtomicU8,
    plexes: RwLock<BTreeMap<u16, Arc<PlexGauges>>>,
    /// Online verify of the last (or running) pass: regions compared, regions that differed.
    verify_regions_done: AtomicU64,
    verify_mismatched_regions: AtomicU64,
    /// Lone mirrored ops whose submitter polled for the acks (`mirror.ackSpinMicros`).
    ack_polls: PollCounts,
    /// Ops a replication link's reader waited for (`mirror.opSpinMicros`).
    op_polls: PollCounts,
}

/// Waits that could poll instead of sleeping (`mirror::spin`): how many ended while
/// polling, and how many slept (the poll gave up, or was not tried).
#[derive(Debug, Default)]
struct PollCounts {
    polled: AtomicU64,
    slept: AtomicU64,
}

impl PollCounts {
    fn add(&self, polled: bool) {
        let c = if polled { &self.polled } else { &self.slept };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty registry: no I/O, no sessions, epoch 0, this node Active/Optimized, no plexes.
    pub fn new() -> Self {
        Metrics {
            ops: Default::default(),
            sessions: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            alua_state: AtomicU8::new(AluaState::ActiveOptimized.code()),
            plexes: RwLock::new(BTreeMap::new()),
            verify_regions_done: AtomicU64::new(0),
            verify_mismatched_regions: AtomicU64::new(0),
            ack_polls: PollCounts::default(),
            op_polls: PollCounts::default(),
        }
    }

    /// Online verify progress of the last (or running) pass.
    pub fn set_verify(&self, regions_done: u64, mismatched_regions: u64) {
        self.verify_regions_done
            .store(regions_done, Ordering::Relaxed);
        self.verify_mismatched_regions
            .store(mismatched_regions, Ordering::Relaxed);
    }

    /// A lone op's submitter polled for its acks: `acked` if they came while it polled.
    pub fn ack_polled(&self, acked: bool) {
        self.ack_polls.add(acked);
    }

    /// A replication link delivered an op its reader waited for: `received` if it was
    /// polling then, not sleeping.
    pub fn op_polled(&self, received: bool) {
        self.op_polls.add(received);
    }

    fn op(&self, class: OpClass) -> &OpStats {
        // `index()` is 0..3 by construction, and `ops` has 3 entries.
        &self.ops[class.index()]
    }

    /// Record one completed SCSI command.
    pub fn record_command(
        &self,
        class: OpClass,
        bytes: u64,
        status: ScsiStatus,
        latency: Duration,
    ) {
        let op = self.op(class);
        op.commands.fetch_add(1, Ordering::Relaxed);
        op.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(e) = error_index(status).and_then(|i| op.errors.get(i)) {
            e.fetch_add(1, Ordering::Relaxed);
        }
        op.latency.observe(latency);
    }

    /// Counters of one op class (errors summed over all non-GOOD statuses).
    pub fn counters(&self, class: OpClass) -> OpCounters {
        let op = self.op(class);
        OpCounters {
            commands: op.commands.load(Ordering::Relaxed),
            bytes: op.bytes.load(Ordering::Relaxed),
            errors: op
                .errors
                .iter()
                .map(|e| e.load(Ordering::Relaxed))
                .fold(0u64, u64::saturating_add),
        }
    }

    pub fn session_opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// Saturates at 0: a transport that reports a nexus gone twice must not wrap the gauge.
    pub fn session_closed(&self) {
        let _ = self
            .sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    pub fn set_alua_state(&self, s: AluaState) {
        self.alua_state.store(s.code(), Ordering::Relaxed);
    }

    pub fn alua_state(&self) -> AluaState {
        let code = self.alua_state.load(Ordering::Relaxed);
        ALUA_STATES
            .iter()
            .map(|(s, _)| *s)
            .find(|s| s.code() == code)
            .unwrap_or(AluaState::Unavailable)
    }

    /// The gauges of plex `id`, registering it (with `state`) if new. Returns `None` when
    /// [`PLEXES_MAX`] plexes are already registered. Keep the handle: updates through it
    /// take no lock.
    pub fn plex(&self, id: u16, state: PlexState) -> Option<Arc<PlexGauges>> {
        if let Ok(map) = self.plexes.read() {
            if let Some(g) = map.get(&id) {
                return Some(g.clone());
            }
        }
        let mut map = self.plexes.write().ok()?;
        if let Some(g) = map.get(&id) {
            return Some(g.clone());
        }
        if map.len() >= PLEXES_MAX {
            return None;
        }
        let g = Arc::new(PlexGauges::new(state));
        map.insert(id, g.clone());
        Some(g)
    }

    /// Forget plex `id` (removed from the volume) so its series disappear.
    pub fn remove_plex(&self, id: u16) {
        if let Ok(mut map) = self.plexes.write() {
            map.remove(&id);
        }
    }

    /// The registered plexes, by id.
    pub fn plexes(&self) -> Vec<(u16, Arc<PlexGauges>)> {
        self.plexes
            .read()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    /// Render every metric in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // `write!` into a String cannot fail; the results are ignored for that reason.
        let w = &mut out;

        header(
            w,
            "sva_build_info",
            "gauge",
            "Build of this sva-node; the value is always 1.",
        );
        let _ = writeln!(
            w,
            "sva_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        header(
            w,
            "sva_io_commands_total",
            "counter",
            "SCSI commands completed, by op class (read, write, other).",
        );
        for c in OpClass::ALL {
            let _ = writeln!(
                w,
                "sva_io_commands_total{{op=\"{}\"}} {}",
                c.label(),
                self.op(c).commands.load(Ordering::Relaxed)
            );
        }

        header(
            w,
            "sva_io_bytes_total",
            "counter",
            "Data bytes transferred (data-out for writes, data-in for reads), by op class.",
        );
        for c in OpClass::ALL {
            let _ = writeln!(
                w,
                "sva_io_bytes_total{{op=\"{}\"}} {}",
                c.label(),
                self.op(c).bytes.load(Ordering::Relaxed)
            );
        }

        header(
            w,
            "sva_io_errors_total",
            "counter",
            "SCSI commands completed with a status other than GOOD or CONDITION MET, by op class and status.",
        );
        for c in OpClass::ALL {
            for (i, (_, status)) in ERROR_STATUSES.iter().enumerate() {
                let v = self
                    .op(c)
                    .errors
                    .get(i)
                    .map_or(0, |e| e.load(Ordering::Relaxed));
                let _ = writeln!(
                    w,
                    "sva_io_errors_total{{op=\"{}\",status=\"{}\"}} {}",
                    c.label(),
                    status,
                    v
                );
            }
        }

        header(
            w,
            "sva_io_latency_seconds",
            "histogram",
            "SCSI command latency from hand-over by the transport to response, by op class.",
        );
        for c in OpClass::ALL {
            let (cumulative, sum, count) = self.op(c).latency.snapshot();
            for (i, n) in cumulative.iter().enumerate() {
                let le = match LATENCY_BUCKETS_SECONDS.get(i) {
                    Some(b) => format_float(*b),
                    None => "+Inf".to_string(),
                };
                let _ = writeln!(
                    w,
                    "sva_io_latency_seconds_bucket{{op=\"{}\",le=\"{}\"}} {}",
                    c.label(),
                    le,
                    n
                );
            }
            let _ = writeln!(
                w,
                "sva_io_latency_seconds_sum{{op=\"{}\"}} {}",
                c.label(),
                format_float(sum)
            );
            let _ = writeln!(
                w,
                "sva_io_latency_seconds_count{{op=\"{}\"}} {}",
                c.label(),
                count
            );
        }

        header(
            w,
            "sva_sessions",
            "gauge",
            "Live I_T nexuses (iSCSI sessions in full feature phase) on this node.",
        );
        let _ = writeln!(w, "sva_sessions {}", self.sessions());

        header(
            w,
            "sva_membership_epoch",
            "gauge",
            "Epoch of the volume's membership record as this node last saw it.",
        );
        let _ = writeln!(w, "sva_membership_epoch {}", self.epoch());

        header(
            w,
            "sva_alua_state",
            "gauge",
            "ALUA access state of this node's target port group: 1 for the current state, 0 otherwise.",
        );
        let current = self.alua_state();
        for (s, name) in ALUA_STATES {
            let _ = writeln!(
                w,
                "sva_alua_state{{state=\"{}\"}} {}",
                name,
                u8::from(s == current)
            );
        }

        let plexes = self.plexes();
        header(
            w,
            "sva_plex_state",
            "gauge",
            "State of each plex in the membership record: 1 for the current state, 0 otherwise.",
        );
        for (id, g) in &plexes {
            let current = g.state();
            for (s, name) in PLEX_STATES {
                let _ = writeln!(
                    w,
                    "sva_plex_state{{plex=\"{}\",state=\"{}\"}} {}",
                    id,
                    name,
                    u8::from(s == current)
                );
            }
        }
        let resync: [ResyncGauge; 3] = [
            (
                "sva_resync_done_bytes",
                "Bytes resynchronised so far in the plex's current resync.",
                |g| g.resync().0,
            ),
            (
                "sva_resync_total_bytes",
                "Bytes to resynchronise in the plex's current resync.",
                |g| g.resync().1,
            ),
            (
                "sva_resync_bytes_per_second",
                "Current resync copy rate of the plex (bytes of regions done per second).",
                |g| g.resync().2,
            ),
        ];
        for (name, help, get) in resync {
            header(w, name, "gauge", help);
            for (id, g) in &plexes {
                let _ = writeln!(w, "{}{{plex=\"{}\"}} {}", name, id, get(g));
            }
        }
        header(
            w,
            "sva_resync_copied_bytes_total",
            "counter",
            "Payload bytes copied by resyncs of the plex since this node started (holes copy none).",
        );
        for (id, g) in &plexes {
            let _ = writeln!(
                w,
                "sva_resync_copied_bytes_total{{plex=\"{}\"}} {}",
                id,
                g.resync_copied_total()
            );
        }
        header(
            w,
            "sva_verify_regions_done",
            "gauge",
            "Regions compared by the last (or running) online verify.",
        );
        let _ = writeln!(
            w,
            "sva_verify_regions_done {}",
            self.verify_regions_done.load(Ordering::Relaxed)
        );
        header(
            w,
            "sva_verify_mismatched_regions",
            "gauge",
            "Regions whose checksums differed between plexes in the last (or running) online verify.",
        );
        let _ = writeln!(
            w,
            "sva_verify_mismatched_regions {}",
            self.verify_mismatched_regions.load(Ordering::Relaxed)
        );
        let polls = [
            (
                "sva_mirror_ack_polls_total",
                "Lone mirrored ops whose node polled the links for their acks: acked while polling, or slept after mirror.ackSpinMicros.",
                "acked",
                &self.ack_polls,
            ),
            (
                "sva_mirror_op_polls_total",
                "Ops received from a peer after the link waited for them: received while polling (mirror.opSpinMicros), or slept.",
                "received",
                &self.op_polls,
            ),
        ];
        for (name, help, polled, c) in polls {
            header(w, name, "counter", help);
            for (result, n) in [(polled, &c.polled), ("slept", &c.slept)] {
                let _ = writeln!(
                    w,
                    "{name}{{result=\"{result}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

/// A per-plex resync gauge family: name, help, how to read it.
type ResyncGauge = (&'static str, &'static str, fn(&PlexGauges) -> u64);

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {kind}");
}

/// A float as Prometheus expects it: shortest round-trip form (`0.00005`, `1`, `2.5`).
fn format_float(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.to_string();
    }
    if v.is_nan() {
        return "NaN".to_string();
    }
    format!("{v}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A strict parser of the subset of format 0.0.4 we emit: `# HELP`/`# TYPE` comments and
    /// `name{k="v",...} value` samples. Panics (fails the test) on anything else.
    fn parse(text: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        let mut helped = std::collections::BTreeSet::new();
        assert!(text.ends_with('\n'), "exposition must end with a newline");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has text");
                assert!(!help.is_empty());
                assert!(helped.insert(name.to_string()), "duplicate HELP for {name}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                assert!(
                    ["counter", "gauge", "histogram"].contains(&kind),
                    "bad type {kind}"
                );
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "duplicate TYPE for {name}"
                );
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line}");
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels close with }");
                    let mut labels = BTreeMap::new();
                    for pair in body.split(',') {
                        let (k, v) = pair.split_once('=').expect("label k=v");
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .expect("label value quoted");
                        assert!(labels.insert(k.to_string(), v.to_string()).is_none());
                    }
                    (name.to_string(), labels)
                }
            };
            assert!(
                name.starts_with("sva_")
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad metric name {name}"
            );
            // Every sample belongs to a declared family (histograms: base name).
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| types.get(*b).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(&name)
                .to_string();
            assert!(types.contains_key(&family), "sample {name} has no TYPE");
            samples.push(Sample {
                name,
                labels,
                value,
            });
        }
        (samples, types)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }

    #[test]
    fn classifies_opcodes() {
        for op in [0x08u8, 0x28, 0xa8, 0x88] {
            assert_eq!(OpClass::of_cdb(&[op]), OpClass::Read, "{op:#x}");
        }
        for op in [
            0x0au8, 0x2a, 0xaa, 0x8a, 0x2e, 0xae, 0x8e, 0x41, 0x93, 0x42, 0x89, 0x8b,
        ] {
            assert_eq!(OpClass::of_cdb(&[op]), OpClass::Write, "{op:#x}");
        }
        // TUR, INQUIRY, SYNC CACHE, VERIFY, PR OUT, unknown, empty.
        for cdb in [
            &[0x00u8][..],
            &[0x12],
            &[0x35],
            &[0x2f],
            &[0x5f],
            &[0xc0],
            &[],
        ] {
            assert_eq!(OpClass::of_cdb(cdb), OpClass::Other, "{cdb:?}");
        }
    }

    #[test]
    fn render_parses_back_and_histograms_are_consistent() {
        let m = Metrics::new();
        let ms = Duration::from_millis;
        m.record_command(
            OpClass::Read,
            4096,
            ScsiStatus::Good,
            Duration::from_micros(30),
        );
        m.record_command(OpClass::Read, 8192, ScsiStatus::Good, ms(3));
        m.record_command(OpClass::Write, 512, ScsiStatus::CheckCondition, ms(20));
        m.record_command(OpClass::Write, 512, ScsiStatus::ReservationConflict, ms(1));
        m.record_command(OpClass::Other, 0, ScsiStatus::ConditionMet, ms(0));
        // Past the largest bound: only +Inf counts it.
        m.record_command(OpClass::Other, 0, ScsiStatus::Good, Duration::from_secs(30));
        m.session_opened();
        m.session_opened();
        m.session_closed();
        m.set_epoch(7);
        m.set_alua_state(AluaState::Transitioning);
        let p2 = m.plex(2, PlexState::Resyncing).expect("room for plex");
        p2.set_resync(1 << 20, 1 << 30, 50 << 20);
        p2.add_resync_copied(4096);
        p2.add_resync_copied(8192);
        m.set_verify(12, 2);
        m.ack_polled(true);
        m.ack_polled(true);
        m.ack_polled(false);
        m.op_polled(false);
        m.op_polled(true);
        m.op_polled(true);
        m.op_polled(true);
        m.plex(1, PlexState::InSync).expect("room for plex");

        let text = m.render();
        let (s, types) = parse(&text);
        assert_eq!(types["sva_io_latency_seconds"], "histogram");
        assert_eq!(types["sva_io_bytes_total"], "counter");

        assert_eq!(value(&s, "sva_io_commands_total", &[("op", "read")]), 2.0);
        assert_eq!(value(&s, "sva_io_bytes_total", &[("op", "read")]), 12288.0);
        assert_eq!(value(&s, "sva_io_bytes_total", &[("op", "write")]), 1024.0);
        let err = |op, st| value(&s, "sva_io_errors_total", &[("op", op), ("status", st)]);
        assert_eq!(err("write", "check_condition"), 1.0);
        assert_eq!(err("write", "reservation_conflict"), 1.0);
        assert_eq!(err("read", "check_condition"), 0.0);
        assert_eq!(
            m.counters(OpClass::Other).errors,
            0,
            "CONDITION MET is no error"
        );
        assert_eq!(value(&s, "sva_sessions", &[]), 1.0);
        assert_eq!(value(&s, "sva_membership_epoch", &[]), 7.0);
        assert_eq!(
            value(&s, "sva_alua_state", &[("state", "Transitioning")]),
            1.0
        );
        assert_eq!(
            value(&s, "sva_alua_state", &[("state", "ActiveOptimized")]),
            0.0
        );
        let plex = |st| value(&s, "sva_plex_state", &[("plex", "2"), ("state", st)]);
        assert_eq!((plex("Resyncing"), plex("InSync")), (1.0, 0.0));
        assert_eq!(
            value(&s, "sva_resync_done_bytes", &[("plex", "2")]),
            1048576.0
        );
        assert_eq!(
            value(&s, "sva_resync_total_bytes", &[("plex", "2")]),
            1073741824.0
        );
        assert_eq!(value(&s, "sva_resync_total_bytes", &[("plex", "1")]), 0.0);
        assert_eq!(
            value(&s, "sva_resync_bytes_per_second", &[("plex", "2")]),
            (50u64 << 20) as f64
        );
        assert_eq!(types["sva_resync_copied_bytes_total"], "counter");
        assert_eq!(
            value(&s, "sva_resync_copied_bytes_total", &[("plex", "2")]),
            12288.0
        );
        assert_eq!(value(&s, "sva_verify_regions_done", &[]), 12.0);
        assert_eq!(value(&s, "sva_verify_mismatched_regions", &[]), 2.0);
        assert_eq!(types["sva_mirror_ack_polls_total"], "counter");
        assert_eq!(
            value(&s, "sva_mirror_ack_polls_total", &[("result", "acked")]),
            2.0
        );
        assert_eq!(
            value(&s, "sva_mirror_ack_polls_total", &[("result", "slept")]),
            1.0
        );
        let op_polls = |r| value(&s, "sva_mirror_op_polls_total", &[("result", r)]);
        assert_eq!((op_polls("received"), op_polls("slept")), (3.0, 1.0));

        for op in ["read", "write", "other"] {
            let buckets: Vec<(f64, f64)> = s
                .iter()
                .filter(|x| x.name == "sva_io_latency_seconds_bucket" && x.labels["op"] == op)
                .map(|x| {
                    let le = match x.labels["le"].as_str() {
                        "+Inf" => f64::INFINITY,
                        v => v.parse().expect("le is a float"),
                    };
                    (le, x.value)
                })
                .collect();
            assert_eq!(buckets.len(), LATENCY_BUCKETS_SECONDS.len() + 1);
            for pair in buckets.windows(2) {
                assert!(pair[0].0 < pair[1].0, "le increasing");
                assert!(pair[0].1 <= pair[1].1, "counts monotone for {op}");
            }
            let (le, inf) = buckets[buckets.len() - 1];
            assert!(le.is_infinite());
            assert_eq!(
                inf,
                value(&s, "sva_io_latency_seconds_count", &[("op", op)])
            );
            assert_eq!(inf, 2.0, "two commands per class were recorded");
        }
        // Bucket placement: 30 µs read lands in le=0.00005, 3 ms read first in le=0.005.
        let b = |op, le| {
            value(
                &s,
                "sva_io_latency_seconds_bucket",
                &[("op", op), ("le", le)],
            )
        };
        assert_eq!(b("read", "0.00005"), 1.0);
        assert_eq!(b("read", "0.0025"), 1.0);
        assert_eq!(b("read", "0.005"), 2.0);
        assert_eq!(b("other", "10"), 1.0, "the 30 s command is only in +Inf");
        let sum = value(&s, "sva_io_latency_seconds_sum", &[("op", "read")]);
        assert!((sum - 0.00303).abs() < 1e-9, "sum {sum}");
    }

    #[test]
    fn sessions_gauge_saturates_and_plexes_are_bounded() {
        let m = Metrics::new();
        m.session_closed();
        assert_eq!(m.sessions(), 0);
        for id in 0..PLEXES_MAX as u16 {
            assert!(m.plex(id, PlexState::InSync).is_some());
        }
        assert!(m.plex(999, PlexState::InSync).is_none());
        // An existing plex is still reachable at the limit.
        assert!(m.plex(3, PlexState::Stale).is_some());
        m.remove_plex(3);
        assert!(m.plex(999, PlexState::InSync).is_some());
    }

    #[test]
    fn empty_registry_renders_valid_text() {
        let (s, _) = parse(&Metrics::new().render());
        assert_eq!(
            value(&s, "sva_io_latency_seconds_count", &[("op", "write")]),
            0.0
        );
        assert_eq!(
            value(&s, "sva_alua_state", &[("state", "ActiveOptimized")]),
            1.0
        );
    }
}
