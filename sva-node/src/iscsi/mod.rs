//! iSCSI target transport (RFC 7143).
//!
//! Layers, bottom up (sans-IO cores, one thin tokio driver):
//!
//! ```text
//!  driver.rs  TCP accept loop, per-connection task, spawns ScsiTarget futures
//!     │ bytes in / bytes out, completions, now
//!  session.rs Connection: login phase → full feature phase (CmdSN window, R2T,
//!     │       Data-In/Out, NOP, TMF, logout, SendTargets)
//!  login.rs   login state machine (stages, TSIH, ACL, status class/detail)
//!  nego.rs    key=value text + operational parameter negotiation;  chap.rs: CHAP-MD5
//!  pdu.rs     BHS/AHS/digest codec
//! ```
//!
//! The transport never parses a CDB: it hands [`crate::scsi::ScsiCommand`]s to a
//! [`crate::scsi::ScsiTarget`].

use std::time::Duration;

pub mod budget;
pub mod chap;
pub mod driver;
pub mod login;
pub mod nego;
pub mod pdu;
pub mod session;
pub mod testing;

pub use chap::ChapConfig;
pub use nego::TargetOffer;

/// Errors of the iSCSI layer. Each one ends one connection only; other sessions go on.
#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    /// The byte stream cannot be framed any more (bad header digest, oversized segment).
    #[error("PDU framing: {0}")]
    Pdu(#[from] pdu::PduError),
    /// The initiator broke the protocol in a way that ends the connection.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Socket error.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Named limits of the target. Every queue and timer of the transport is bounded by one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Command window per session (MaxCmdSN - ExpCmdSN + 1 when idle).
    pub cmds_max: u32,
    /// Idle time after which the target sends a NOP-In ping.
    pub nop_in_interval: Duration,
    /// How long the initiator has to answer that ping before the connection is dropped.
    pub nop_in_timeout: Duration,
    /// Time from connect to full feature phase before the connection is dropped.
    pub login_timeout: Duration,
    /// Most bytes of login text accumulated over continued (C bit) login requests.
    pub login_text_bytes_max: usize,
    /// Most concurrent connections the driver accepts.
    pub connections_max: usize,
    /// Largest write (EDTL) buffered for one command; larger ones fail with
    /// INVALID FIELD IN CDB before any data is accepted.
    pub write_bytes_max: u32,
    /// Write data solicited with R2T and not yet executed, over all connections of the
    /// process ([`budget::WriteBudget`]): a command's first R2T waits until its whole
    /// solicited range fits. Bounds buffered write memory, which would otherwise be up to
    /// `cmds_max × write_bytes_max` (4 GiB) per connection.
    pub write_buffer_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cmds_max: 128,
            nop_in_interval: Duration::from_secs(5),
            nop_in_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            login_text_bytes_max: 65_536,
            connections_max: 256,
            // The LU's largest transfer (Block Limits VPD): a larger write could never
            // succeed, so it is refused before its data is buffered.
            write_bytes_max: crate::scsi::sbc::limits::TRANSFER_BLOCKS_MAX * 512,
            // Eight of the largest writes at once: enough to keep any disk busy.
            write_buffer_bytes_max: 256 << 20,
        }
    }
}

/// What the iSCSI layer needs to know about the target it presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Target name, `iqn.YYYY-MM.reverse.domain:name`.
    pub iqn: String,
    pub alias: Option<String>,
    /// TargetPortalGroupTag reported at login (RFC 7143 §13.9).
    pub portal_group_tag: u16,
    /// SCSI relative target port identifier of this node's port (part of the NexusId).
    pub relative_target_port: u16,
    /// CHAP required for Normal sessions when set. Discovery sessions are not authenticated.
    pub chap: Option<ChapConfig>,
    /// Initiator names allowed to log in to a Normal session; empty = everyone.
    pub allowed_initiators: Vec<String>,
    /// Portals reported by SendTargets, `host:port,tpgt` (every node serving the volume).
    pub send_targets: Vec<String>,
    pub offer: TargetOffer,
    pub limits: Limits,
}

impl TargetConfig {
    /// A config with defaults for everything but the name and the portal list.
    pub fn new(iqn: impl Into<String>, portal: impl Into<String>) -> TargetConfig {
        TargetConfig {
            iqn: iqn.into(),
            alias: None,
            portal_group_tag: 1,
            relative_target_port: 1,
            chap: None,
            allowed_initiators: Vec::new(),
            send_targets: vec![portal.into()],
            offer: TargetOffer::default(),
            limits: Limits::default(),
        }
    }
}
