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
//! - [`port`]: free loopback ports for listeners bound later (demo, tests), kept out of the
//!   kernel's ephemeral range.
//!
//! ## Where this code refines DESIGN.md
//!
//! - **What is replicated is the SCSI command, not its block effects.** The logical unit is
//!   deterministic (`LogicalUnit::execute_admitted` depends only on LU state and the command),
//!   so every in-sync plex applies the same ordered commands — writes, COMPARE AND WRITE,
//!   persistent reservations, RESERVE/RELEASE, MODE SELECT, LUN resets, I_T nexus loss — and
//!   ends in the same state (media, reservations, unit attentions). Per-node checks (unit
//!   attention delivery, ALUA access) run once, on the node the command arrived at
//!   (`LogicalUnit::admit`). COMPARE AND WRITE is decided at its place in the order on every
//!   plex, so it is atomic across paths without a distributed lock.
//! - **Reads need a lease.** A node serves reads only while every in-sync peer has answered its
//!   heartbeat within `READ_LEASE_MS`, and a survivor excludes a peer only after
//!   `PEER_TIMEOUT_MS > READ_LEASE_MS + 2 heartbeats`, so a partitioned node stops reading before
//!   the other side can acknowledge a write it lacks (DESIGN.md §5 left this implicit).
//! - **A node waits for its own witness CAS** rather than fencing at the hold timeout: a slow
//!   witness disk must not leave a volume with no serving node (nothing is acked meanwhile).
//! - **The dirty map of a stale plex also covers its own activity log** (ops it applied after
//!   the last settled point), which resync must merge, as DRBD does.
//! - **A LUN reset posts its unit attention on every I_T nexus, the issuer's included**
//!   (libiscsi's MultipathIO.Reset checks every path).

pub mod config;
pub mod control;
pub mod iscsi;
pub mod mirror;
pub mod port;
pub mod scsi;
pub mod store;
pub mod witness;
