//! Transport-independent SCSI logical unit (SPC-4, SBC-3).
//!
//! The iSCSI layer hands a [`ScsiCommand`] to a [`ScsiTarget`] and sends back the
//! [`ScsiResponse`]. The SCSI layer knows an initiator only by its [`NexusId`], which is
//! globally unique across nodes, so reservations and unit attentions work across paths.

use bytes::Bytes;

pub mod alua;
pub mod cdb;
pub mod lu;
pub mod pr;
pub mod sbc;
pub mod sense;
pub mod spc;

#[cfg(test)]
mod tests;

use futures::future::BoxFuture;
pub use lu::{CacheMode, LocalTarget, LogicalUnit, LuConfig};
pub use sense::{ScsiError, SenseKey};

/// An I_T nexus: initiator port name plus the relative target port it came in through.
/// `initiator_port` is the iSCSI initiator port name, `"<InitiatorName>,i,0x<ISID hex>"`
/// (RFC 7143 §10.1 / SPC-4 TransportID format 01b).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NexusId {
    /// `"iqn.1993-08.org.debian:01:abc,i,0x23d000000001"`
    pub initiator_port: String,
    /// Relative target port identifier of the node the command arrived at (1-based).
    pub relative_target_port: u16,
}

/// SAM-5 task attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskAttr {
    #[default]
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
}

/// One SCSI command as the transport delivers it. Data-out is fully collected by the
/// transport (immediate, unsolicited and solicited data) before the command is executed.
#[derive(Debug, Clone)]
pub struct ScsiCommand {
    pub lun: u64,
    /// The CDB (16 bytes from the BHS, longer with an extended-CDB AHS). May carry trailing
    /// zero padding past the opcode's CDB length.
    pub cdb: Bytes,
    /// Data-out bytes actually received (length = what the initiator sent, at most EDTL).
    pub data_out: Bytes,
    /// Expected data transfer length from the transport (iSCSI EDTL). For reads the LU may
    /// produce more or fewer bytes; the transport truncates and reports residuals.
    pub expected_transfer_len: u32,
    pub task_attr: TaskAttr,
    /// Transport task tag (for logging and task management).
    pub tag: u32,
}

/// SAM status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

/// What a command produced. `sense` is the fixed-format sense data (SPC-4 §4.5.3) and is
/// present exactly when `status` is CHECK CONDITION.
#[derive(Debug, Clone)]
pub struct ScsiResponse {
    pub status: ScsiStatus,
    pub sense: Option<Bytes>,
    /// Data-in as the LU would send it (already limited by the CDB's allocation length).
    /// The transport truncates it to EDTL and reports the residual.
    pub data_in: Bytes,
    /// For commands with data-out: how many bytes the CDB asked to transfer, so the
    /// transport can report an overflow/underflow residual against EDTL.
    pub data_out_len: Option<u32>,
}

impl ScsiResponse {
    /// HARDWARE ERROR / INTERNAL TARGET FAILURE: the target itself failed (a worker died, a
    /// peer sent an undecodable op), not the command.
    pub fn target_failure() -> Self {
        ScsiError::check(SenseKey::HardwareError, sense::asc::INTERNAL_TARGET_FAILURE).to_response()
    }

    pub fn good() -> Self {
        ScsiResponse {
            status: ScsiStatus::Good,
            sense: None,
            data_in: Bytes::new(),
            data_out_len: None,
        }
    }
}

/// SAM-5 task management functions the transport forwards to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskManagement {
    AbortTask { tag: u32 },
    AbortTaskSet,
    ClearTaskSet,
    ClearAca,
    LogicalUnitReset,
    TargetWarmReset,
    TargetColdReset,
}

/// SAM-5 task management response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TmfResponse {
    Complete,
    TaskDoesNotExist,
    LunDoesNotExist,
    NotSupported,
    Rejected,
}

/// What a transport hands SCSI commands to: a local logical unit, or the mirror engine
/// that orders state-changing commands across nodes before applying them.
///
/// Commands of one nexus arrive in the transport's command order; the target may run
/// SIMPLE tasks concurrently.
pub trait ScsiTarget: Send + Sync + 'static {
    fn execute(&self, nexus: NexusId, cmd: ScsiCommand) -> BoxFuture<'static, ScsiResponse>;
    fn task_management(
        &self,
        nexus: NexusId,
        lun: u64,
        tmf: TaskManagement,
    ) -> BoxFuture<'static, TmfResponse>;
    /// A new I_T nexus exists (iSCSI login to full feature phase).
    fn nexus_added(&self, nexus: NexusId);
    /// The I_T nexus is gone (logout, connection loss). SCSI-2 reservations held by it are
    /// released (SPC-2 §5.5.1); persistent reservations are not.
    fn nexus_removed(&self, nexus: NexusId);
}
