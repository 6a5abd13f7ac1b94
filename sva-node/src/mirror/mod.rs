//! Replication engine (DESIGN.md §5–6): synchronous mirroring of one volume across plexes.
//!
//! ```text
//!  driver (tokio, the lead's) ──submit/handle_message/handle_timeout/applied/witness_result──> Engine
//!  Engine ──poll_command──> Send | Apply | Complete | WitnessCas | PathState | Settled
//!                           | MarkDirtyRegions | ClearDirtyRegions | DropBitmap | ActivityLogAbsorbed
//!                           | KeepInActivityLog
//!                           | CopyOut | CopyIn | Checksum
//! ```
//!
//! - [`engine`]: the sans-IO engine of one plex (ordering, acks, failure detection, read lease,
//!   view change with reconciliation, fencing).
//! - [`msg`]: peer messages and their length-prefixed binary codec.
//! - [`dirty`]: the write-intent bitmap (a bitset) kept per stale plex.
//! - [`resync`]: the types of resync and online verify.
//! - [`boot`]: starting a mirrored node from its config (witness record, restart detection).
//! - [`op`]: what is replicated (state-changing commands, resets, nexus loss) and its codec.
//! - [`link`]: authenticated TCP replication links between nodes.
//! - [`spin`]: when a waiter polls instead of sleeping (the moving average of its waits).
//! - [`node`]: the tokio driver of the engine and [`node::MirroredTarget`], the `ScsiTarget`
//!   of a mirrored node.
//! - [`sim`]: a seeded deterministic simulation (tigerbeetle VOPR style) of N engines with a
//!   simulated network, disks, witness, clock and crashes, and the invariant checks of
//!   DESIGN.md §5. The tests `sva-node/tests/sim_*.rs` run it, one file per invariant:
//!
//! ```text
//! cargo test -p sva-node --test sim_insync_plexes_identical            # the default seed set,
//!                                 # with copy window 8 (the pinned seeds') and 16 (the product's)
//! SVA_SIM_SEED=1234 cargo test -p sva-node --test sim_insync_plexes_identical -- --nocapture
//!                                                                      # replay one seed exactly
//! SVA_SIM_SEEDS=5000 cargo test -p sva-node --test sim_ -- --nocapture # a longer run
//! SVA_SIM_COPY_WINDOW=16 cargo run --release -p sva-node --example sim_hunt -- 0 500
//!                                 # every invariant, resync copy window 16 (default 8)
//! ```
//!
//! # Driver contract
//!
//! - After every input, drain [`Engine::poll_command`] until `None` and execute the commands
//!   in order. `MarkDirtyRegions` must be durable before the data write of any later `Apply`
//!   or `CopyIn` (and before a later `Send`: a `JoinAccept` promises the regions are kept);
//!   `ClearDirtyRegions` may be persisted lazily; `DropBitmap` deletes `bitmap-<plex>`.
//! - Activity log: before running an `Apply`/`CopyIn` whose regions are not all in the log,
//!   add them durably; evict a region only when no op above the last `Settled` touches it; the
//!   regions handed in through `Recovered::activity_log`, and those `KeepInActivityLog` names,
//!   stay until `ActivityLogAbsorbed`.
//!   (`node.rs` logs `Apply`s only: a `CopyIn` region stays dirty in the source's bitmap until
//!   its durable write is acked, so logging it would only make a restart re-copy it.)
//! - `CopyOut`: read the region (or the LU's reservation state) and call
//!   [`Engine::copied_out`] (empty data for a hole). `CopyIn`: write it durably (empty: zeros),
//!   then [`Engine::applied`] with an empty response. `Checksum`: hash the range, then
//!   [`Engine::checksummed`]. Set `Config::volume_blocks`.
//! - `Apply` commands may run concurrently (the engine only emits ops that do not overlap an
//!   unapplied earlier one); call [`Engine::applied`] with the LU's encoded response for each.
//! - Call [`Engine::handle_timeout`] at [`Engine::next_timeout`] (or earlier; it is idempotent).
//! - Peer links may lose, duplicate and reorder messages; the engine retransmits forwards,
//!   asks the sequencer to resend gaps (`Resend`) and acks cumulatively in heartbeats.
//! - `WitnessCas`: run the CAS and feed the outcome to [`Engine::witness_result`]; a lost CAS
//!   must be `WitnessError::Conflict` carrying the current record.
//! - Reads: serve locally only while [`Engine::can_serve_reads`] is true; otherwise answer
//!   with the ALUA state the last `PathState` command gave.
//! - Times are the driver's monotonic milliseconds ([`Millis`]), never wall-clock time.
//!
//! A failing run prints its seed; replaying it with `SVA_SIM_SEED` is bit-for-bit identical
//! (no real clock, no hash-map iteration order, one PRNG).

pub mod boot;
pub mod dirty;
pub mod engine;
pub mod link;
pub mod msg;
pub mod node;
pub mod op;
pub mod persist;
pub mod resync;
pub mod sim;
pub mod spin;

pub use dirty::DirtyMap;
pub use engine::{
    Command, Config, Engine, Millis, OpId, Outcome, PathState, RoleKind, Start,
    HEARTBEAT_INTERVAL_MS, PEER_TIMEOUT_MS, READ_LEASE_MS,
};
pub use msg::{Entry, Epoch, LbaRange, Message, OpMeta, OpRange, PlexId, Seq};

#[cfg(test)]
mod tests;
