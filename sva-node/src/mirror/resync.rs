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
//! (`MarkDirty` durable before any later data write; `ClearDirty` lazy), and one activity log
//! per node (regions of ops applied but maybe not everywhere; made durable by the driver
//! before it runs an `Apply`/`CopyIn` on a region not in it). A restarted node hands both to
//! [`Engine::new`](super::Engine::new) through [`Recovered`].

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
