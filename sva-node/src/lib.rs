//! # sva-node: the SVA data plane
//!
//! One `sva-node` process serves one volume over iSCSI from local storage and (with the
//! `mirror` layer) mirrors it synchronously to sibling nodes. The crate is layered; each
//! layer owns one concern and meets the next at one type:
//!
//! ```text
//!  TCP ──> iscsi (PDUs, login, session) ──ScsiCommand──> ScsiTarget ──> scsi::LogicalUnit ──> store::BlockBackend
//!                                                      (local or mirror)
//! ```
//!
//! - [`iscsi`]: RFC 7143 transport. Sans-IO codec/login/session cores and a tokio driver.
//!   Never parses a CDB.
//! - [`scsi`]: a transport-independent logical unit (SPC-4/SBC-3): `ScsiCommand` in,
//!   `ScsiResponse` out. Never sees a PDU or a socket.
//! - [`store`]: the `BlockBackend` trait and its file/memory/fault-injecting implementations.
//! - [`mirror`]: replication engine (membership, ordering, resync).
//! - [`witness`]: compare-and-swap of a volume's membership record.
//! - [`control`]: HTTP control API, `/metrics`, `/healthz`.
//! - [`config`]: the YAML node configuration (`sva-node serve --config FILE`).

pub mod config;
pub mod control;
pub mod iscsi;
pub mod mirror;
pub mod scsi;
pub mod store;
pub mod witness;
