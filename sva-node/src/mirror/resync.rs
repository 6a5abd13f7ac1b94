//! Resync and verify (DESIGN.md §6): the types shared by the engine and its driver.
//!
//! ```text
//!  stale plex T (Out) ──JoinRequest{its activity log, data valid?}──> sequencer S (source)
//!  S: T becomes a *learner*: every op from now on is applied on T too (T acks it)
//!  S: for each dirty region R of T's bitmap, order a Copy(R) op like any write:
//!       S ──CopyOut(R) at its seq──> driver reads R ──copied_out──> S ──CopyData──> T
//!       T ──CopyIn(R, data) at the same seq──> driver writes R durably ──applied──> T ──Applied──> S
//!     (ordering a copy like a write orders it with every concurrent write to R, on both sides)
//!  bitmap empty ──> S CASes epoch+1 with T InSync ──> view change ──> T's path Active/Optimized
//! ```
//!
//! Persistence (the driver's): one write-intent bitmap per stale plex on every in-sync node
//! (`MarkDirtyRegions` durable before any later data write; `ClearDirtyRegions` lazy), and one activity log
//! per node (regions of ops applied but maybe not everywhere; made durable by the driver
//! before it runs an `Apply`/`CopyIn` on a region not in it). A restarted node hands both to
//! [`Engine::new`](super::Engine::new) through [`Recovered`].
//!
//! Rules the engine follows (RESYNC.md):
//! - The source is the sequencer. Copies are internal log entries (origin 0) ordered like
//!   writes, at most `Config::copy_window` (default `COPY_WINDOW`) per learner, throttled by
//!   a token bucket; the first one is the LU state (a barrier), then dirty regions ascending.
//!   A learner gets every op from its `start_seq` on; a copied region is cleared on the
//!   learner's ack and stays clean.
//! - A learner silent for `PEER_TIMEOUT_MS`, a repeated `JoinRequest` from a learner already
//!   heard (it restarted) or any view change drops it: every unsettled op is marked dirty.
//! - Rejoin: bitmap empty and every copy acked ⇒ hold new ops until everything ordered is
//!   applied on the learner and settled ⇒ CAS epoch+1 with it InSync ⇒ view change. The
//!   source asks for the learner's prefix with a heartbeat, answered once applied.
//! - A link coming up (`Engine::link_up`) re-sends at once what went out while it was down:
//!   the plex's `JoinRequest`, the source's accept, ops and copy data for the learner.
//! - Every in-sync node adds a stale plex's reported activity log (and `full`) to its bitmap,
//!   so any of them can become the source. A node that came back in sync through resync has
//!   no bitmap for plexes that were stale meanwhile: if it must be their source, they get a
//!   full resync.
//! - A restarted node the record lists InSync recovers per `RECOVER_WAIT_MS`; after that
//!   CAS, seqs restart at `epoch << 40` (monotonic while fewer than 2^40 ops run between
//!   recoveries).

use std::collections::{BTreeMap, BTreeSet};

use super::msg::{LbaRange, PlexId};

/// What a restarted node read back from its state directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Regions of the activity log: this plex may differ from its peers there.
    pub activity_log: BTreeSet<u64>,
    /// Persisted write-intent bitmap of each plex that was stale when this node stopped.
    pub bitmaps: BTreeMap<PlexId, BTreeSet<u64>>,
    /// False when the backing store is new or wiped (needs a full resync, never a partial one).
    pub data_valid: bool,
    /// A full resync of this (new or wiped) plex was accepted by a source but has not
    /// finished: the data is valid only where copies landed. Every `JoinRequest` then says
    /// `full` (not `fresh`), so a source that filled its bitmap for it resumes and any other
    /// in-sync node — the next source, if the first one dies — fills its bitmap first.
    /// Without it a restart mid full resync asked a new source for a partial resync.
    pub full_pending: bool,
    /// Plexes of `bitmaps` whose bitmap had every region set at once since it was created
    /// (a full resync's fill): the regions clear now were copied by this node as their
    /// source, so recovering as the source it may resume that full resync. Any other
    /// bitmap may lack regions another source copied (3-way), so a full request refills it.
    pub filled: BTreeSet<PlexId>,
}

/// What one copy op moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyWhat {
    /// Region `index` (blocks `range`, clipped to the volume).
    Region { index: u64, range: LbaRange },
    /// The LU's replicated non-data state (persistent reservations, SCSI-2 reservation).
    LuState,
}

/// This node's part in a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ResyncRole {
    /// Copying to `plex`.
    Source,
    /// Being copied to (this node is a learner, path Unavailable).
    Target,
}

/// Progress of one resync, as the engine counts it. Rate and ETA are the driver's (it has the
/// wall clock); `copied_bytes` counts every byte sent or received, holes included as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncInfo {
    pub plex: PlexId,
    pub full: bool,
    /// Bytes of the regions dirty at the start plus any added since.
    pub total_bytes: u64,
    /// Bytes of those regions copied so far.
    pub done_bytes: u64,
    /// Payload bytes actually moved (a hole region moves none).
    pub copied_bytes: u64,
}

/// An online verify: regions compared so far and those whose checksums differed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyInfo {
    pub running: bool,
    pub regions_total: u64,
    pub regions_done: u64,
    pub mismatched: Vec<u64>,
}
