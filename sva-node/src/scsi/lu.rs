//! The logical unit: one volume as LUN 0, shared by every I_T nexus.
//!
//! ```text
//!  ScsiCommand ─> execute ─┬─ LUN check ─ UA check ─ ALUA access ─ reservation conflict
//!                          └─> spc.rs (INQUIRY, MODE, REPORT LUNS, RTPG, PR routing ...)
//!                          └─> sbc.rs (READ/WRITE/.../XCOPY) ─> store::BlockBackend
//! ```
//!
//! `execute` is synchronous and takes `&self`: many threads run commands at once. Reads
//! and writes go to the backend concurrently; metadata (unit attentions, mode pages,
//! reservations, copy results) sits behind one short-held `Mutex`. Every command that
//! writes the medium holds an LBA-range lock for its range so that COMPARE AND WRITE,
//! ORWRITE and XCOPY segments are atomic against overlapping writes.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use md5::{Digest, Md5};

use super::alua::PortGroups;
use super::cdb::{self, Opcode};
use super::pr::{PrSnapshot, Reservations};
use super::sense::{asc, Asc, ScsiError, SenseKey};
use super::{
    NexusId, ScsiCommand, ScsiResponse, ScsiStatus, ScsiTarget, TaskManagement, TmfResponse,
};
use crate::store::BlockBackend;

/// Pending unit attentions kept per I_T nexus; older ones are kept, newer dropped
/// (SAM-5 §5.14: a device server may discard UAs it cannot queue).
pub const UNIT_ATTENTIONS_PER_NEXUS_MAX: usize = 16;
/// Completed EXTENDED COPY results remembered for RECEIVE COPY RESULTS.
pub const COPY_RESULTS_MAX: usize = 64;
/// Largest READ that [`LogicalUnit::try_execute_cached`] serves on the caller's thread.
/// Larger reads go to the blocking pool: there the copy runs beside the connection's
/// socket writes instead of delaying them.
pub const CACHED_READ_BYTES_MAX: u64 = 128 * 1024;
/// Largest WRITE that [`LogicalUnit::try_execute_inline_write`] runs on the caller's thread
/// (write-back only). Copying this much into the page cache takes a few microseconds, far
/// less than the two cross-thread wakeups of a blocking-pool round trip.
pub const INLINE_WRITE_BYTES_MAX: u64 = 64 * 1024;
/// Inline writes must cover whole pages (offset and length multiples of this): a partial
/// page not in the page cache would make the kernel read it from the device first.
pub const INLINE_WRITE_ALIGN: u64 = 4096;
/// An inline write that took longer than this (the kernel throttled dirty pages or waited
/// for the journal) sends writes back to the blocking pool for a while. A 4 KiB page-cache
/// write takes microseconds; the margin is for the thread being preempted on a busy host,
/// which is no reason to back off.
pub const INLINE_WRITE_SLOW: Duration = Duration::from_millis(2);
/// Shortest time writes go back to the blocking pool after a slow inline write.
pub const INLINE_WRITE_BACKOFF: Duration = Duration::from_millis(200);
/// The back-off is at least this many times the slow write's duration, so that under
/// sustained throttling the async thread spends at most about 1/this of its time blocked.
pub const INLINE_WRITE_BACKOFF_FACTOR: u32 = 20;

/// Write cache behaviour (DESIGN.md §5, Durability).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CacheMode {
    /// WCE=0: every write is durable (fdatasync) before it is acknowledged.
    #[default]
    WriteThrough,
    /// WCE=1: writes are acknowledged from the page cache; FUA and SYNCHRONIZE CACHE flush.
    WriteBack,
}

/// Static identity and behaviour of the LU on this node.
#[derive(Debug, Clone)]
pub struct LuConfig {
    /// Volume UID: the NAA-6 designator and the serial number derive from it, so every node
    /// reports the same identity (DESIGN.md §4).
    pub volume_uid: String,
    /// T10 vendor identification (at most 8 ASCII characters are used).
    pub vendor: String,
    /// Product identification (at most 16).
    pub product: String,
    /// Product revision level (at most 4).
    pub revision: String,
    /// Logical block length in bytes (512).
    pub block_size: u32,
    pub cache_mode: CacheMode,
    /// This node's relative target port identifier (1-based, unique per volume).
    pub relative_target_port: u16,
    /// This node's target port group id (unique per volume).
    pub target_port_group: u16,
    /// All port groups of the volume and their ALUA states (shared, updatable).
    pub port_groups: Arc<PortGroups>,
    /// Where APTPL persistent-reservation state is kept, if anywhere.
    pub pr_state_path: Option<PathBuf>,
}

impl LuConfig {
    /// Defaults for everything but the volume UID.
    pub fn new(volume_uid: impl Into<String>) -> Self {
        LuConfig {
            volume_uid: volume_uid.into(),
            vendor: "SVA".into(),
            product: "MirroredVolume".into(),
            revision: "0001".into(),
            block_size: 512,
            cache_mode: CacheMode::WriteThrough,
            relative_target_port: 1,
            target_port_group: 1,
            port_groups: Arc::new(PortGroups::default()),
            pr_state_path: None,
        }
    }
}

/// Changeable mode parameters (SPC-4 §7.5): the current values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ModeState {
    /// Control page D_SENSE: report descriptor-format sense.
    pub d_sense: bool,
    /// Control page SWP: software write protect.
    pub swp: bool,
}

#[derive(Debug, Default)]
pub(crate) struct NexusState {
    pub ua: VecDeque<Asc>,
}

/// Result of one EXTENDED COPY, for RECEIVE COPY RESULTS (COPY STATUS).
#[derive(Debug, Clone)]
pub(crate) struct CopyResult {
    pub nexus: NexusId,
    pub list_id: u8,
    pub ok: bool,
    pub segments: u16,
    pub blocks: u32,
}

#[derive(Debug)]
pub(crate) struct LuState {
    pub nexuses: HashMap<NexusId, NexusState>,
    pub pr: Reservations,
    pub mode: ModeState,
    pub alua_generation: u64,
    pub copies: VecDeque<CopyResult>,
}

impl LuState {
    /// Queue a unit attention for one nexus (deduplicated, bounded).
    pub fn post_ua(&mut self, nexus: &NexusId, a: Asc) {
        let n = self.nexuses.entry(nexus.clone()).or_default();
        if !n.ua.contains(&a) && n.ua.len() < UNIT_ATTENTIONS_PER_NEXUS_MAX {
            n.ua.push_back(a);
        }
    }

    /// Queue a unit attention for every nexus except `except`.
    pub fn post_ua_all(&mut self, except: Option<&NexusId>, a: Asc) {
        let all: Vec<NexusId> = self
            .nexuses
            .keys()
            .filter(|n| Some(*n) != except)
            .cloned()
            .collect();
        for n in all {
            self.post_ua(&n, a);
        }
    }
}

/// What a handler produced on success.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: ScsiStatus,
    pub data: Vec<u8>,
}

impl Reply {
    pub fn good() -> Self {
        Reply {
            status: ScsiStatus::Good,
            data: Vec::new(),
        }
    }
    pub fn data(data: Vec<u8>) -> Self {
        Reply {
            status: ScsiStatus::Good,
            data,
        }
    }
}

pub(crate) type CmdResult = Result<Reply, ScsiError>;

/// Serialises commands that write overlapping LBA ranges.
#[derive(Debug, Default)]
pub(crate) struct RangeLock {
    held: Mutex<HeldRanges>,
    released: Condvar,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct HeldRanges {
    /// `(start, end, id)` of every held range.
    active: Vec<(u64, u64, u64)>,
    /// Threads waiting in [`RangeLock::lock`]. A release wakes the condvar only if there
    /// are any: `notify_all` is a futex system call even with nobody waiting, once per
    /// write otherwise.
    waiters: usize,
}

pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    /// Wait until no held range overlaps `[lba, lba+blocks)`, then hold it.
    pub fn lock(&self, lba: u64, blocks: u64) -> RangeGuard<'_> {
        let end = lba.saturating_add(blocks.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut held = lock_or_recover(&self.held);
        while held.active.iter().any(|&(s, e, _)| s < end && lba < e) {
            held.waiters += 1;
            held = match self.released.wait(held) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            held.waiters -= 1;
        }
        held.active.push((lba, end, id));
        RangeGuard { lock: self, id }
    }

    /// Hold `[lba, lba+blocks)` if nothing overlapping is held; never waits.
    pub fn try_lock(&self, lba: u64, blocks: u64) -> Option<RangeGuard<'_>> {
        let end = lba.saturating_add(blocks.max(1));
        let mut held = lock_or_recover(&self.held);
        if held.active.iter().any(|&(s, e, _)| s < end && lba < e) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        held.active.push((lba, end, id));
        Some(RangeGuard { lock: self, id })
    }
}

/// Work an inline (async-thread) caller did before the command's checks ran.
pub(crate) enum Prepared<'a> {
    Nothing,
    /// A READ's data, read ahead by `try_execute_cached`.
    ReadData(Vec<u8>),
    /// A WRITE's LBA range, taken without waiting by `try_execute_inline_write`.
    WriteRange(RangeGuard<'a>),
}

/// Whether writes may run inline: off for a while after a slow one ([`INLINE_WRITE_SLOW`],
/// [`INLINE_WRITE_BACKOFF`], [`INLINE_WRITE_BACKOFF_FACTOR`]).
#[derive(Debug)]
pub(crate) struct InlineWriteGate {
    base: Instant,
    /// Nanoseconds after `base` before which inline writes are off.
    off_until_ns: AtomicU64,
    /// Slow inline writes seen (each started a back-off).
    slow: AtomicU64,
}

impl InlineWriteGate {
    pub(crate) fn new(base: Instant) -> Self {
        InlineWriteGate {
            base,
            off_until_ns: AtomicU64::new(0),
            slow: AtomicU64::new(0),
        }
    }

    fn since_base(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn open(&self, now: Instant) -> bool {
        self.since_base(now) >= self.off_until_ns.load(Ordering::Relaxed)
    }

    /// An inline write ran from `start` to `end`.
    pub(crate) fn record(&self, start: Instant, end: Instant) {
        let took = end.saturating_duration_since(start);
        if took > INLINE_WRITE_SLOW {
            let backoff =
                INLINE_WRITE_BACKOFF.max(took.saturating_mul(INLINE_WRITE_BACKOFF_FACTOR));
            let until = self
                .since_base(end)
                .saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX));
            self.off_until_ns.fetch_max(until, Ordering::Relaxed);
            self.slow.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                ?took,
                ?backoff,
                "slow inline write; writes go to the blocking pool"
            );
        }
    }

    pub(crate) fn slow_writes(&self) -> u64 {
        self.slow.load(Ordering::Relaxed)
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = lock_or_recover(&self.lock.held);
        held.active.retain(|&(_, _, id)| id != self.id);
        if held.waiters > 0 {
            self.lock.released.notify_all();
        }
    }
}

fn lock_or_recover<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Version of [`LogicalUnit::replicated_state`]'s image.
pub const REPLICATED_STATE_VERSION: u32 = 1;

/// The image of [`LogicalUnit::replicated_state`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplicatedState {
    version: u32,
    pr: PrSnapshot,
    d_sense: bool,
    swp: bool,
}

/// Why a replicated-state image was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatedStateError {
    #[error("undecodable LU state image: {0}")]
    Decode(String),
    #[error("LU state image version {0} is not supported")]
    Version(u32),
    #[error("saving the APTPL state failed")]
    Persist,
}

/// One logical unit (LUN 0) over a block backend.
pub struct LogicalUnit {
    pub(crate) cfg: LuConfig,
    pub(crate) backend: Arc<dyn BlockBackend>,
    pub(crate) state: Mutex<LuState>,
    pub(crate) ranges: RangeLock,
    pub(crate) inline_writes: InlineWriteGate,
    /// NAA-6 designator (16 bytes), from the volume UID.
    pub(crate) naa: [u8; 16],
    /// Unit serial number (VPD 0x80), from the volume UID.
    pub(crate) serial: String,
    pub(crate) block_count: u64,
}

impl std::fmt::Debug for LogicalUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalUnit")
            .field("volume_uid", &self.cfg.volume_uid)
            .field("block_count", &self.block_count)
            .finish()
    }
}

/// NAA-6 (IEEE Registered Extended) designator from a volume UID: the same UID gives the
/// same designator on every node (SPC-4 §7.8.6.6.5). The company id is a fixed locally
/// chosen value; the 100 vendor-specific bits are an MD5 of the UID.
pub fn naa6_from_uid(uid: &str) -> [u8; 16] {
    /// IEEE company id placed in the designator (24 bits).
    const COMPANY_ID: u32 = 0x00_1405; // the Linux-IO OUI range used by software targets
    let h = Md5::digest(uid.as_bytes());
    let mut d = [0u8; 16];
    d[0] = 0x60 | ((COMPANY_ID >> 20) & 0x0f) as u8;
    d[1] = (COMPANY_ID >> 12) as u8;
    d[2] = (COMPANY_ID >> 4) as u8;
    d[3] = ((COMPANY_ID & 0x0f) << 4) as u8 | (h[0] & 0x0f);
    d[4..16].copy_from_slice(&h[1..13]);
    d
}

/// Unit serial number from a volume UID: 32 hex digits.
pub fn serial_from_uid(uid: &str) -> String {
    hex::encode(Md5::digest(format!("serial:{uid}").as_bytes()))
}

impl LogicalUnit {
    pub fn new(cfg: LuConfig, backend: Arc<dyn BlockBackend>) -> Self {
        let bs = u64::from(cfg.block_size.max(1));
        let block_count = backend.size_bytes() / bs;
        let pr = cfg
            .pr_state_path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<PrSnapshot>(&b).ok())
            // Loading from disk is a power cycle: only APTPL state survives (SPC-4 §5.9.5).
            .map(|s| Reservations::restore(s.after_power_loss()))
            .unwrap_or_default();
        let alua_generation = cfg.port_groups.generation();
        LogicalUnit {
            naa: naa6_from_uid(&cfg.volume_uid),
            serial: serial_from_uid(&cfg.volume_uid),
            backend,
            state: Mutex::new(LuState {
                nexuses: HashMap::new(),
                pr,
                mode: ModeState::default(),
                alua_generation,
                copies: VecDeque::new(),
            }),
            ranges: RangeLock::default(),
            inline_writes: InlineWriteGate::new(Instant::now()),
            block_count,
            cfg,
        }
    }

    pub fn config(&self) -> &LuConfig {
        &self.cfg
    }

    /// Number of logical blocks.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, LuState> {
        lock_or_recover(&self.state)
    }

    /// Run one command to completion.
    pub fn execute(&self, nexus: &NexusId, cmd: &ScsiCommand) -> ScsiResponse {
        self.execute_with(nexus, cmd, Prepared::Nothing)
    }

    /// Run a READ at once if the backend can read its data without blocking (page cache),
    /// so that an async caller need not hand it to a blocking thread. `None`: not such a
    /// READ, larger than [`CACHED_READ_BYTES_MAX`], or not cached — use
    /// [`LogicalUnit::execute`] where blocking is fine. The data is read before the usual
    /// checks (unit attention, ALUA, reservations) and dropped if they fail; the response is
    /// exactly what `execute` would have produced.
    pub fn try_execute_cached(&self, nexus: &NexusId, cmd: &ScsiCommand) -> Option<ScsiResponse> {
        let data = self.read_ahead_cached(cmd)?;
        Some(self.execute_with(nexus, cmd, Prepared::ReadData(data)))
    }

    /// How many inline writes were slow enough to send writes back to the blocking pool for
    /// a while (see [`LogicalUnit::try_execute_inline_write`]).
    pub fn inline_write_backoffs(&self) -> u64 {
        self.inline_writes.slow_writes()
    }

    /// Run a small write-back WRITE at once on the caller's thread, so that an async caller
    /// need not hand it to a blocking thread. A buffered write of whole pages only copies
    /// into the page cache, unless the kernel throttles dirty pages or the journal is
    /// busy; the kernel has no non-blocking buffered write here (`pwritev2(RWF_NOWAIT)` is
    /// EOPNOTSUPP on ext4), so a write that turns out slow sends the following ones back to
    /// the blocking pool for a while ([`INLINE_WRITE_SLOW`], [`INLINE_WRITE_BACKOFF`]).
    /// `None`: not such a WRITE (write-through, FUA, WRITE AND VERIFY, larger than
    /// [`INLINE_WRITE_BYTES_MAX`], not page-aligned), the backend expects the write to wait
    /// ([`BlockBackend::write_is_cached`]: a page under writeback), its range is locked by
    /// another command, or inline writes are backed off — use [`LogicalUnit::execute`].
    pub fn try_execute_inline_write(
        &self,
        nexus: &NexusId,
        cmd: &ScsiCommand,
    ) -> Option<ScsiResponse> {
        self.inline_write(cmd, |prep| self.execute_with(nexus, cmd, prep))
    }

    /// [`LogicalUnit::execute_admitted`] for a small write-back WRITE, on the caller's
    /// thread; `None` as for [`LogicalUnit::try_execute_inline_write`]. For the mirror
    /// engine's ordered applies, so that neither plex hands a 4 KiB write to the blocking
    /// pool.
    pub fn try_execute_admitted_inline_write(
        &self,
        nexus: &NexusId,
        cmd: &ScsiCommand,
    ) -> Option<ScsiResponse> {
        self.inline_write(cmd, |prep| self.execute_admitted_with(nexus, cmd, prep))
    }

    /// Run `execute` on `cmd`'s range if it may be written inline, timing it for the
    /// back-off (see [`LogicalUnit::try_execute_inline_write`]).
    fn inline_write(
        &self,
        cmd: &ScsiCommand,
        execute: impl FnOnce(Prepared<'_>) -> ScsiResponse,
    ) -> Option<ScsiResponse> {
        let (start, range) = self.inline_write_range(cmd)?;
        let response = execute(Prepared::WriteRange(range));
        self.inline_writes.record(start, Instant::now());
        Some(response)
    }

    /// Whether `cmd` is a WRITE that may run inline (see `try_execute_inline_write`), and
    /// if so its start time and its LBA range, locked without waiting.
    fn inline_write_range(&self, cmd: &ScsiCommand) -> Option<(Instant, RangeGuard<'_>)> {
        if self.cfg.cache_mode != CacheMode::WriteBack {
            // WCE=0: every write waits for fdatasync (SBC-3 §4.16), never inline.
            return None;
        }
        let op = Self::check_cdb(&cmd.cdb).ok()?;
        if !matches!(
            op,
            Opcode::Write6 | Opcode::Write10 | Opcode::Write12 | Opcode::Write16
        ) {
            return None;
        }
        let r = cdb::RwCdb::parse(&cmd.cdb).ok()?;
        let bs = u64::from(self.cfg.block_size);
        let bytes = u64::from(r.blocks) * bs;
        let offset = r.lba.checked_mul(bs)?;
        // WRITE(6) has no FUA bit; the others have it in byte 1 (SBC-3 §5.32).
        let fua = op != Opcode::Write6 && r.flags & 0x08 != 0;
        if fua
            || r.blocks == 0
            || bytes > INLINE_WRITE_BYTES_MAX
            || bytes % INLINE_WRITE_ALIGN != 0
            || offset % INLINE_WRITE_ALIGN != 0
            || cmd.data_out.len() as u64 != bytes
            || self.check_lba(r.lba, u64::from(r.blocks)).is_err()
        {
            return None;
        }
        let start = Instant::now();
        if !self.inline_writes.open(start) || !self.backend.write_is_cached(offset, bytes) {
            return None;
        }
        let range = self.ranges.try_lock(r.lba, u64::from(r.blocks))?;
        Some((start, range))
    }

    /// [`LogicalUnit::execute_admitted`] for a READ whose data is in the page cache, on the
    /// caller's thread; `None` as for [`LogicalUnit::try_execute_cached`]. For the mirror
    /// engine's local (not replicated) reads.
    pub fn try_execute_admitted_cached(
        &self,
        nexus: &NexusId,
        cmd: &ScsiCommand,
    ) -> Option<ScsiResponse> {
        let data = self.read_ahead_cached(cmd)?;
        Some(self.execute_admitted_with(nexus, cmd, Prepared::ReadData(data)))
    }

    /// The medium data of a small READ, if the backend has it without blocking.
    fn read_ahead_cached(&self, cmd: &ScsiCommand) -> Option<Vec<u8>> {
        let op = Self::check_cdb(&cmd.cdb).ok()?;
        if !matches!(
            op,
            Opcode::Read6 | Opcode::Read10 | Opcode::Read12 | Opcode::Read16
        ) {
            return None;
        }
        // Anything unusual (bad CDB, range, size) takes the normal path to its error.
        let r = cdb::RwCdb::parse(&cmd.cdb).ok()?;
        let bytes = u64::from(r.blocks) * u64::from(self.cfg.block_size);
        if r.blocks == 0
            || bytes > CACHED_READ_BYTES_MAX
            || self.check_lba(r.lba, u64::from(r.blocks)).is_err()
        {
            return None;
        }
        let mut buf = vec![0u8; bytes as usize];
        let offset = r.lba * u64::from(self.cfg.block_size);
        match self.backend.try_read_at_cached(&mut buf, offset) {
            Ok(true) => Some(buf),
            _ => None,
        }
    }

    /// `execute`, with the inline caller's preparation (`prep`).
    fn execute_with(&self, nexus: &NexusId, cmd: &ScsiCommand, prep: Prepared<'_>) -> ScsiResponse {
        match self.admission(nexus, cmd) {
            Err((result, descriptor)) => self.respond(cmd, result, descriptor),
            Ok(descriptor) => self.respond(cmd, self.ordered(nexus, cmd, prep), descriptor),
        }
    }

    /// The per-node half of `execute`, for the mirror engine: CDB length, LUN, unit
    /// attention and ALUA access, checked on the node the command arrived at. `Some` is the
    /// final response (the command must not run); `None` means it may be ordered and then
    /// applied on every plex with [`LogicalUnit::execute_admitted`].
    pub fn admit(&self, nexus: &NexusId, cmd: &ScsiCommand) -> Option<ScsiResponse> {
        match self.admission(nexus, cmd) {
            Err((result, descriptor)) => Some(self.respond(cmd, result, descriptor)),
            Ok(_) => None,
        }
    }

    /// Apply a command admitted by [`LogicalUnit::admit`] (possibly on another node) at its
    /// place in the volume's order. Reservation conflicts are decided here, so every plex
    /// decides them on the same reservation state. Reports no unit attention and does not
    /// register the nexus.
    pub fn execute_admitted(&self, nexus: &NexusId, cmd: &ScsiCommand) -> ScsiResponse {
        self.execute_admitted_with(nexus, cmd, Prepared::Nothing)
    }

    /// `execute_admitted`, with the inline caller's preparation (`prep`).
    fn execute_admitted_with(
        &self,
        nexus: &NexusId,
        cmd: &ScsiCommand,
        prep: Prepared<'_>,
    ) -> ScsiResponse {
        let descriptor = self.lock_state().mode.d_sense;
        self.respond(cmd, self.ordered(nexus, cmd, prep), descriptor)
    }

    /// Build the wire response: data cut to the allocation length, sense in the format
    /// D_SENSE asks for.
    fn respond(&self, cmd: &ScsiCommand, result: CmdResult, descriptor: bool) -> ScsiResponse {
        let cdb: &[u8] = &cmd.cdb;
        let data_out_len = cdb::data_out_len(cdb, self.cfg.block_size);
        match result {
            Ok(mut r) => {
                let alloc = cdb::allocation_len(cdb).unwrap_or(u32::MAX) as usize;
                r.data.truncate(alloc);
                ScsiResponse {
                    status: r.status,
                    sense: None,
                    data_in: Bytes::from(r.data),
                    data_out_len,
                }
            }
            Err(e) => ScsiResponse {
                status: e.status(),
                sense: e.sense(descriptor),
                data_in: Bytes::new(),
                data_out_len,
            },
        }
    }

    /// Two-step decode: every handler may index its CDB up to the group's length.
    fn check_cdb(cdb: &[u8]) -> Result<Opcode, ScsiError> {
        let Some(&opb) = cdb.first() else {
            return Err(ScsiError::invalid_opcode());
        };
        let op = Opcode::from_u8(opb);
        if let Some(need) = cdb::cdb_len(opb) {
            if cdb.len() < need && !matches!(op, Opcode::Unsupported(_)) {
                return Err(ScsiError::invalid_field_in_cdb());
            }
        }
        Ok(op)
    }

    /// Per-node checks. `Ok(descriptor)`: go on; `Err`: the command's final result (a UA,
    /// an ALUA refusal, or the answer for a LUN that does not exist), with the sense format.
    fn admission(&self, nexus: &NexusId, cmd: &ScsiCommand) -> Result<bool, (CmdResult, bool)> {
        let cdb: &[u8] = &cmd.cdb;
        let op = Self::check_cdb(cdb).map_err(|e| (Err(e), false))?;
        let descriptor;
        {
            let mut st = self.lock_state();
            if !st.nexuses.contains_key(nexus) {
                // A nexus we have never seen: report power-on, as after a reset.
                st.post_ua(nexus, asc::POWER_ON_OCCURRED);
            }
            let generation = self.cfg.port_groups.generation();
            if generation != st.alua_generation {
                st.alua_generation = generation;
                st.post_ua_all(None, asc::ASYMMETRIC_ACCESS_STATE_CHANGED);
            }
            descriptor = st.mode.d_sense;

            if cmd.lun != 0 {
                drop(st);
                return Err((self.bad_lun(nexus, cdb, op), descriptor));
            }

            // SAM-5 §5.14: INQUIRY, REPORT LUNS and REQUEST SENSE do not report a UA.
            let reports_ua = !matches!(
                op,
                Opcode::Inquiry | Opcode::ReportLuns | Opcode::RequestSense
            );
            if reports_ua {
                if let Some(ua) = st.nexuses.get_mut(nexus).and_then(|n| n.ua.pop_front()) {
                    return Err((Err(ScsiError::unit_attention(ua)), descriptor));
                }
            }
        }
        if let Err(e) = self
            .cfg
            .port_groups
            .check_access(self.cfg.target_port_group, cdb)
        {
            return Err((Err(e), descriptor));
        }
        Ok(descriptor)
    }

    /// The ordered half: reservation conflict, then the command itself.
    fn ordered(&self, nexus: &NexusId, cmd: &ScsiCommand, prep: Prepared<'_>) -> CmdResult {
        let op = Self::check_cdb(&cmd.cdb)?;
        if cmd.lun != 0 {
            return Err(ScsiError::illegal(asc::LUN_NOT_SUPPORTED));
        }
        if self.lock_state().pr.conflicts(nexus, &cmd.cdb) {
            return Err(ScsiError::ReservationConflict);
        }
        self.dispatch(nexus, cmd, op, prep)
    }

    /// Commands to a LUN that does not exist (SPC-4 §4.7? / SAM-5 §5.8.4).
    fn bad_lun(&self, nexus: &NexusId, cdb: &[u8], op: Opcode) -> CmdResult {
        match op {
            // Peripheral qualifier 011b: not capable of supporting a device on this LUN.
            Opcode::Inquiry if cdb.get(1).is_some_and(|b| b & 0x01 == 0) => {
                let mut d = super::spc::standard_inquiry(self);
                if let Some(b) = d.first_mut() {
                    *b = 0x7f;
                }
                Ok(Reply::data(d))
            }
            Opcode::ReportLuns => super::spc::report_luns(self, cdb),
            Opcode::RequestSense => {
                let _ = nexus;
                let desc = cdb.get(1).is_some_and(|b| b & 0x01 != 0);
                let e = ScsiError::illegal(asc::LUN_NOT_SUPPORTED);
                Ok(Reply::data(
                    e.sense(desc).map(|b| b.to_vec()).unwrap_or_default(),
                ))
            }
            _ => Err(ScsiError::illegal(asc::LUN_NOT_SUPPORTED)),
        }
    }

    /// `prep`: what an inline caller did ahead (a READ's data, a WRITE's range lock).
    fn dispatch(
        &self,
        nexus: &NexusId,
        cmd: &ScsiCommand,
        op: Opcode,
        prep: Prepared<'_>,
    ) -> CmdResult {
        use super::{sbc, spc};
        let cdb: &[u8] = &cmd.cdb;
        let data: &[u8] = &cmd.data_out;
        match op {
            Opcode::TestUnitReady => Ok(Reply::good()),
            Opcode::RequestSense => spc::request_sense(self, nexus, cdb),
            Opcode::Inquiry => spc::inquiry(self, cdb),
            Opcode::ModeSense6 | Opcode::ModeSense10 => spc::mode_sense(self, cdb),
            Opcode::ModeSelect6 | Opcode::ModeSelect10 => spc::mode_select(self, nexus, cdb, data),
            Opcode::StartStopUnit => spc::start_stop_unit(cdb),
            Opcode::PreventAllowMediumRemoval => spc::prevent_allow(cdb),
            Opcode::ReportLuns => spc::report_luns(self, cdb),
            Opcode::Reserve6 | Opcode::Reserve10 => self
                .lock_state()
                .pr
                .reserve(nexus, cdb)
                .map(|_| Reply::good()),
            Opcode::Release6 | Opcode::Release10 => self
                .lock_state()
                .pr
                .release(nexus, cdb)
                .map(|_| Reply::good()),
            Opcode::PersistentReserveIn => spc::persistent_reserve_in(self, nexus, cdb),
            Opcode::PersistentReserveOut => spc::persistent_reserve_out(self, nexus, cdb, data),
            Opcode::MaintenanceIn => match cdb::service_action(cdb) {
                cdb::maint_in::REPORT_TARGET_PORT_GROUPS => {
                    spc::report_target_port_groups(self, cdb)
                }
                cdb::maint_in::REPORT_SUPPORTED_OPCODES => spc::report_supported_opcodes(cdb),
                _ => Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(4))),
            },
            Opcode::ReadCapacity10 => sbc::read_capacity10(self, cdb),
            Opcode::ServiceActionIn16 => match cdb::service_action(cdb) {
                cdb::sai16::READ_CAPACITY_16 => sbc::read_capacity16(self),
                cdb::sai16::GET_LBA_STATUS => sbc::get_lba_status(self, cdb),
                _ => Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(4))),
            },
            Opcode::Read6 | Opcode::Read10 | Opcode::Read12 | Opcode::Read16 => {
                let cached = match prep {
                    Prepared::ReadData(d) => Some(d),
                    _ => None,
                };
                sbc::read(self, cdb, cached)
            }
            Opcode::Write6 | Opcode::Write10 | Opcode::Write12 | Opcode::Write16 => {
                let held = match prep {
                    Prepared::WriteRange(g) => Some(g),
                    _ => None,
                };
                sbc::write(self, cdb, data, false, held)
            }
            Opcode::WriteAndVerify10 | Opcode::WriteAndVerify12 | Opcode::WriteAndVerify16 => {
                sbc::write(self, cdb, data, true, None)
            }
            Opcode::Verify10 | Opcode::Verify12 | Opcode::Verify16 => sbc::verify(self, cdb, data),
            Opcode::WriteSame10 | Opcode::WriteSame16 => sbc::write_same(self, cdb, data),
            Opcode::Unmap => sbc::unmap(self, cdb, data),
            Opcode::CompareAndWrite => sbc::compare_and_write(self, cdb, data),
            Opcode::OrWrite => sbc::orwrite(self, cdb, data),
            Opcode::ExtendedCopy => sbc::extended_copy(self, nexus, cdb, data),
            Opcode::ReceiveCopyResults => sbc::receive_copy_results(self, nexus, cdb),
            Opcode::PreFetch10 | Opcode::PreFetch16 => sbc::pre_fetch(self, cdb),
            Opcode::SynchronizeCache10 | Opcode::SynchronizeCache16 => {
                sbc::synchronize_cache(self, cdb)
            }
            Opcode::MaintenanceOut | Opcode::Unsupported(_) => Err(ScsiError::invalid_opcode()),
        }
    }

    /// Task management for LUN `lun`. Commands run to completion synchronously, so there is
    /// never a task left to abort; the reset functions reset LU state (SAM-5 §7.11).
    pub fn task_management(&self, _nexus: &NexusId, lun: u64, tmf: &TaskManagement) -> TmfResponse {
        let reset_asc = match tmf {
            TaskManagement::AbortTask { .. }
            | TaskManagement::AbortTaskSet
            | TaskManagement::ClearTaskSet => return TmfResponse::Complete,
            TaskManagement::ClearAca => return TmfResponse::NotSupported,
            TaskManagement::LogicalUnitReset => asc::BUS_DEVICE_RESET_OCCURRED,
            TaskManagement::TargetWarmReset | TaskManagement::TargetColdReset => {
                asc::SCSI_BUS_RESET_OCCURRED
            }
        };
        if lun != 0 && *tmf == TaskManagement::LogicalUnitReset {
            return TmfResponse::LunDoesNotExist;
        }
        let mut st = self.lock_state();
        st.pr.reset();
        st.mode = ModeState::default();
        // SAM-5 §6.3.4: a unit attention on every I_T nexus, the issuer's included
        // (libiscsi MultipathIO.Reset checks every path, the resetting one too).
        st.post_ua_all(None, reset_asc);
        TmfResponse::Complete
    }

    pub fn nexus_added(&self, nexus: &NexusId) {
        let mut st = self.lock_state();
        if !st.nexuses.contains_key(nexus) {
            st.post_ua(nexus, asc::POWER_ON_OCCURRED);
        }
    }

    /// The nexus is gone: forget its UAs, release a SCSI-2 reservation it held.
    pub fn nexus_removed(&self, nexus: &NexusId) {
        let mut st = self.lock_state();
        st.nexuses.remove(nexus);
        st.copies.retain(|c| c.nexus != *nexus);
        st.pr.nexus_lost(nexus);
    }

    /// The LU's replicated non-data state (DESIGN.md §6, resync `CopyWhat::LuState`): the
    /// persistent-reservation image (registrations, reservation, PRgeneration, APTPL), the
    /// SCSI-2 reservation and the changeable mode parameters, as versioned JSON.
    pub fn replicated_state(&self) -> Bytes {
        let st = self.lock_state();
        let image = ReplicatedState {
            version: REPLICATED_STATE_VERSION,
            pr: st.pr.snapshot(),
            d_sense: st.mode.d_sense,
            swp: st.mode.swp,
        };
        drop(st);
        // Serializing plain structs of strings and integers cannot fail.
        Bytes::from(serde_json::to_vec(&image).unwrap_or_default())
    }

    /// Replace the replicated non-data state with `image` from [`replicated_state`] of a
    /// peer (the APTPL file is rewritten to match). Per-nexus state (unit attentions) stays.
    ///
    /// [`replicated_state`]: LogicalUnit::replicated_state
    pub fn install_replicated_state(&self, image: &[u8]) -> Result<(), ReplicatedStateError> {
        let image: ReplicatedState = serde_json::from_slice(image)
            .map_err(|e| ReplicatedStateError::Decode(e.to_string()))?;
        if image.version != REPLICATED_STATE_VERSION {
            return Err(ReplicatedStateError::Version(image.version));
        }
        let mut st = self.lock_state();
        st.pr = Reservations::restore(image.pr);
        st.mode = ModeState {
            d_sense: image.d_sense,
            swp: image.swp,
        };
        let snapshot = st.pr.snapshot();
        self.persist_pr(&snapshot)
            .map_err(|_| ReplicatedStateError::Persist)?;
        Ok(())
    }

    /// Resync: blocks `lba..lba+blocks` as [`store::region::read_region`] returns them
    /// (empty when they read back as zeroes).
    ///
    /// [`store::region::read_region`]: crate::store::region::read_region
    pub fn read_blocks_for_copy(&self, lba: u64, blocks: u64) -> std::io::Result<Bytes> {
        let (off, len) = self.byte_range(lba, blocks)?;
        crate::store::region::read_region(self.backend.as_ref(), off, len)
    }

    /// Resync: write what [`read_blocks_for_copy`](Self::read_blocks_for_copy) returned on a
    /// peer, durably (empty: deallocate).
    pub fn write_blocks_for_copy(&self, lba: u64, blocks: u64, data: &[u8]) -> std::io::Result<()> {
        let (off, len) = self.byte_range(lba, blocks)?;
        let _guard = self.ranges.lock(lba, blocks);
        crate::store::region::write_region(self.backend.as_ref(), off, len, data)
    }

    /// Verify: BLAKE3 of blocks `lba..lba+blocks` (holes read as zeroes).
    pub fn checksum_blocks(&self, lba: u64, blocks: u64) -> std::io::Result<[u8; 32]> {
        let (off, len) = self.byte_range(lba, blocks)?;
        crate::store::region::checksum_region(self.backend.as_ref(), off, len)
    }

    fn byte_range(&self, lba: u64, blocks: u64) -> std::io::Result<(u64, u64)> {
        let bs = u64::from(self.cfg.block_size);
        match (lba.checked_mul(bs), blocks.checked_mul(bs)) {
            (Some(o), Some(l)) if lba.saturating_add(blocks) <= self.block_count => Ok((o, l)),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "blocks {lba}+{blocks} beyond the volume's {}",
                    self.block_count
                ),
            )),
        }
    }

    /// Save the APTPL state atomically (temp file, fsync, rename, fsync dir).
    pub(crate) fn persist_pr(&self, snapshot: &PrSnapshot) -> Result<(), ScsiError> {
        let Some(path) = &self.cfg.pr_state_path else {
            return Ok(());
        };
        let fail = |_e: std::io::Error| {
            ScsiError::check(SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE)
        };
        let json = serde_json::to_vec(snapshot)
            .map_err(|_| ScsiError::check(SenseKey::HardwareError, asc::INTERNAL_TARGET_FAILURE))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&json).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// [`ScsiTarget`] over a local [`LogicalUnit`]: commands run on tokio's blocking pool,
/// except READs whose data is in the page cache and small page-aligned write-back WRITEs,
/// which run at once on the caller's thread (`try_execute_cached`,
/// `try_execute_inline_write`). A blocking-pool round trip is two cross-thread wakeups,
/// several times the cost of a cached 4 KiB read or a 4 KiB copy into the page cache. The
/// backend guarantees the inline read does not wait for the device (`preadv2(RWF_NOWAIT)`);
/// a buffered write can block (dirty-page throttling, journal) and the kernel offers no
/// non-blocking buffered write here, so writes go back to the pool for a while after an
/// inline one was slow.
#[derive(Debug, Clone)]
pub struct LocalTarget {
    lu: Arc<LogicalUnit>,
}

impl LocalTarget {
    pub fn new(lu: Arc<LogicalUnit>) -> Self {
        LocalTarget { lu }
    }
    pub fn lu(&self) -> &Arc<LogicalUnit> {
        &self.lu
    }
}

/// Whether [`run_off_thread`] runs the per-node admission checks too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// `LogicalUnit::execute`: admission, then the command.
    Check,
    /// `LogicalUnit::execute_admitted`: the caller already admitted it.
    Done,
}

/// Run a command without blocking the async thread: a read the page cache can answer runs
/// inline, anything else (it may wait on the disk) on the blocking pool. Shared by the local
/// and the mirrored target so both take the same I/O path.
pub async fn run_off_thread(
    lu: Arc<LogicalUnit>,
    nexus: NexusId,
    cmd: ScsiCommand,
    admission: Admission,
) -> ScsiResponse {
    let cached = match admission {
        Admission::Check => lu
            .try_execute_cached(&nexus, &cmd)
            .or_else(|| lu.try_execute_inline_write(&nexus, &cmd)),
        // The mirror engine replicates writes; only its local reads come here.
        Admission::Done => lu.try_execute_admitted_cached(&nexus, &cmd),
    };
    if let Some(r) = cached {
        return r;
    }
    let run = move || match admission {
        Admission::Check => lu.execute(&nexus, &cmd),
        Admission::Done => lu.execute_admitted(&nexus, &cmd),
    };
    tokio::task::spawn_blocking(run)
        .await
        .unwrap_or_else(|_| ScsiResponse::target_failure())
}

impl ScsiTarget for LocalTarget {
    fn execute(&self, nexus: NexusId, cmd: ScsiCommand) -> BoxFuture<'static, ScsiResponse> {
        Box::pin(run_off_thread(
            self.lu.clone(),
            nexus,
            cmd,
            Admission::Check,
        ))
    }

    fn task_management(
        &self,
        nexus: NexusId,
        lun: u64,
        tmf: TaskManagement,
    ) -> BoxFuture<'static, TmfResponse> {
        let lu = self.lu.clone();
        Box::pin(async move { lu.task_management(&nexus, lun, &tmf) })
    }

    fn nexus_added(&self, nexus: NexusId) {
        self.lu.nexus_added(&nexus);
    }

    fn nexus_removed(&self, nexus: NexusId) {
        self.lu.nexus_removed(&nexus);
    }
}
