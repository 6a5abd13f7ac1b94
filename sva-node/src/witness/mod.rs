//! Witness: compare-and-swap of a volume's membership record (DESIGN.md §5).
//!
//! Every change of membership (a plex going Stale, Resyncing, InSync, a new sequencer) is a
//! CAS on the record kept by the witness, so at most one side of a partition can move the
//! epoch forward. Implementations: the standalone `sva-node witness` server, an in-memory
//! witness for tests, and (feature `kubernetes`) a Kubernetes Lease per volume.
//!
//! ```text
//!  mirror engine ──Witness──> RemoteWitness (client.rs) ──TCP, wire.rs──> server.rs ──> store.rs (DIR/<volume>.json)
//!                         └─> MemoryWitness (memory.rs, tests and simulation)
//!                         └─> LeaseWitness (lease.rs, feature `kubernetes`) ──> kube-apiserver
//! ```
//!
//! Every implementation runs the same [`conformance`] suite; the CAS rule itself lives in one
//! place, [`decide_cas`].

pub mod client;
pub mod conformance;
#[cfg(feature = "kubernetes")]
pub mod lease;
pub mod memory;
#[cfg(test)]
mod remote_tests;
pub mod server;
pub mod store;
pub mod wire;

pub use client::RemoteWitness;
#[cfg(feature = "kubernetes")]
pub use lease::LeaseWitness;
pub use memory::{MemoryFault, MemoryWitness};
pub use server::{run, serve};
pub use wire::load_secret;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// State of one plex in the membership record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum PlexState {
    InSync,
    Stale,
    Resyncing,
    Removed,
}

/// One plex (replica) of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlexRecord {
    /// Stable plex id (1-based); also the node's relative target port and port group id.
    pub id: u16,
    /// Node name (for people and the operator).
    pub node: String,
    /// iSCSI portal `host:port` served by this plex's node.
    pub portal: String,
    /// Replication link address `host:port`.
    pub peer_addr: String,
    pub state: PlexState,
}

/// The membership record of one volume. Changed only by compare-and-swap on `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    pub epoch: u64,
    pub plexes: Vec<PlexRecord>,
    /// Plex id of the sequencer of this epoch.
    pub sequencer: u16,
}

/// Why a witness operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The record's current epoch is not the one the caller expected; carries the current record.
    #[error("compare-and-swap lost: the record is at epoch {}", .0.epoch)]
    Conflict(Box<Membership>),
    /// The witness could not be reached or did not answer in time.
    #[error("witness unreachable: {0}")]
    Unreachable(String),
    /// The witness refused our credentials.
    #[error("witness refused authentication")]
    Unauthorized,
    #[error("witness protocol error: {0}")]
    Protocol(String),
}

/// Compare-and-swap store of membership records, one per volume.
///
/// Contract (checked by the shared conformance tests every implementation runs):
/// - `get` of an unknown volume returns `Ok(None)`;
/// - `cas(volume, None, rec)` creates the record only if none exists;
/// - `cas(volume, Some(e), rec)` replaces it only if its epoch is `e` and `rec.epoch > e`;
/// - a lost CAS returns `Conflict` with the current record and changes nothing.
pub trait Witness: Send + Sync + 'static {
    fn get(&self, volume: &str) -> BoxFuture<'_, Result<Option<Membership>, WitnessError>>;
    fn cas(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> BoxFuture<'_, Result<Membership, WitnessError>>;
}

/// The compare-and-swap rule every implementation applies (the contract of [`Witness`]):
/// `Ok(())` when `record` may replace `current`, otherwise the error to answer.
pub fn decide_cas(
    current: Option<&Membership>,
    expected_epoch: Option<u64>,
    record: &Membership,
) -> Result<(), WitnessError> {
    if let Some(e) = expected_epoch {
        // Checked before the current record so a malformed request never reads as a lost race.
        if record.epoch <= e {
            return Err(WitnessError::Protocol(format!(
                "new epoch {} must exceed expected epoch {e}",
                record.epoch
            )));
        }
    }
    match (current, expected_epoch) {
        (None, None) => Ok(()),
        (Some(cur), None) => Err(WitnessError::Conflict(Box::new(cur.clone()))),
        (Some(cur), Some(e)) if cur.epoch == e => Ok(()),
        (Some(cur), Some(_)) => Err(WitnessError::Conflict(Box::new(cur.clone()))),
        (None, Some(e)) => Err(WitnessError::Protocol(format!(
            "no record exists, expected epoch {e}"
        ))),
    }
}
