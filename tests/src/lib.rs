//! Test harness shared by the integration tests (`tests/tests/*.rs`) and the benchmark
//! (`src/bin/bench.rs`): real target processes, real initiators, no mocks.
//!
//! ```text
//!  test ──> SvaNode / Tgtd ─(spawn, guard kills on drop)─> target process on 127.0.0.1:PORT
//!     └──> tools (qemu-io, qemu-img bench, iscsi-inq, iscsi-ls, iscsi-test-cu) ──iSCSI──┘
//!     └──> raw::RawSession (hand-built PDUs for malformed-input tests) ──────────────────┘
//! ```
//!
//! - [`process`]: free ports, the kill-on-drop process guard, tool runner with timeouts.
//! - [`sva_node`]: `SvaNode` and [`sva_node::render_config`], the one place that knows the
//!   node's YAML config format.
//! - [`tgtd`]: `Tgtd`, the reference target (tgt), configured with `tgtadm`.
//! - [`tools`]: wrappers for the initiator tools.
//! - [`mirror`]: `MirroredVolume`, a witness and 2-3 mirrored nodes, with status, kill and
//!   restart per plex.
//! - [`cunit`]: parser for `iscsi-test-cu` output.
//! - [`raw`]: a minimal raw iSCSI initiator (login + PDU builders).
//! - [`scenarios`]: test stories written against [`IscsiTarget`], run on sva-node by the
//!   integration tests and on tgtd by the harness self-tests.

pub mod cunit;
pub mod mirror;
pub mod process;
pub mod raw;
pub mod scenarios;
pub mod sva_node;
pub mod tgtd;
pub mod tools;

use std::net::SocketAddr;

pub use cunit::CunitSummary;
pub use mirror::{
    fetch_status, wait_until, MirrorStatus, MirroredVolume, MirroredVolumeOptions, NodePlacement,
};
pub use process::{free_port, have_tools, run_tool, TargetProcess, ToolOutput};
pub use sva_node::{
    render_config, CacheMode, MirrorOptions, MirrorPlex, MirrorTuning, SvaNode, SvaNodeOptions,
};
pub use tgtd::{Tgtd, TgtdOptions};

/// A running iSCSI target under test, whatever implements it.
pub trait IscsiTarget {
    /// The portal (always on 127.0.0.0/8).
    fn portal(&self) -> SocketAddr;
    /// Target IQN.
    fn iqn(&self) -> &str;
    /// LUN of the disk (0 for sva-node; 1 for tgt, whose LUN 0 is a controller).
    fn lun(&self) -> u32;
    /// Name for messages and tables.
    fn describe(&self) -> String;
    /// The last lines of the target's own log, for failure messages.
    fn log_tail(&self, lines: usize) -> String;

    /// `iscsi://127.0.0.1:PORT/IQN/LUN`
    fn url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal(), self.iqn(), self.lun())
    }
    /// `iscsi://127.0.0.1:PORT` (for discovery).
    fn portal_url(&self) -> String {
        format!("iscsi://{}", self.portal())
    }
}
