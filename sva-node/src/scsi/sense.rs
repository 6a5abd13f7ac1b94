//! Sense data and the SCSI layer's error type (SPC-4 §4.5).
//!
//! Every failure of a command is a [`ScsiError`]: it knows the status it is reported with and,
//! for CHECK CONDITION, its sense key and additional sense code/qualifier.

use bytes::Bytes;

use super::{ScsiResponse, ScsiStatus};

/// Sense keys (SPC-4 §4.5.6, table 44).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    CopyAborted = 0xa,
    AbortedCommand = 0xb,
    Miscompare = 0xe,
}

/// Additional sense code and qualifier, `(ASC, ASCQ)`.
pub type Asc = (u8, u8);

/// Well-known ASC/ASCQ pairs (SPC-4 Annex D) used across the layer.
pub mod asc {
    use super::Asc;
    pub const INVALID_COMMAND_OPCODE: Asc = (0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = (0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = (0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Asc = (0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = (0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = (0x1a, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = (0x26, 0x04);
    pub const WRITE_PROTECTED: Asc = (0x27, 0x00);
    pub const POWER_ON_OCCURRED: Asc = (0x29, 0x00);
    pub const POWER_ON_RESET_OR_BUS_DEVICE_RESET: Asc = (0x29, 0x00);
    pub const BUS_DEVICE_RESET_OCCURRED: Asc = (0x29, 0x03);
    pub const I_T_NEXUS_LOSS_OCCURRED: Asc = (0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Asc = (0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = (0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = (0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = (0x2a, 0x05);
    pub const ASYMMETRIC_ACCESS_STATE_CHANGED: Asc = (0x2a, 0x06);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Asc = (0x2f, 0x00);
    pub const REPORTED_LUNS_DATA_CHANGED: Asc = (0x3f, 0x0e);
    pub const MISCOMPARE_DURING_VERIFY: Asc = (0x1d, 0x00);
    pub const UNRECOVERED_READ_ERROR: Asc = (0x11, 0x00);
    pub const WRITE_ERROR: Asc = (0x0c, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Asc = (0x44, 0x00);
    pub const MEDIUM_NOT_PRESENT: Asc = (0x3a, 0x00);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = (0x55, 0x04);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = (0x39, 0x00);
    pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Asc = (0x0d, 0x02);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Asc = (0x26, 0x06);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Asc = (0x26, 0x08);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE: Asc = (0x26, 0x07);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE: Asc = (0x26, 0x09);
    /// ALUA: LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION (SPC-4 §5.15.2.4)
    pub const ALUA_TRANSITIONING: Asc = (0x04, 0x0a);
    /// ALUA: LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE
    pub const ALUA_UNAVAILABLE: Asc = (0x04, 0x0c);
    /// ALUA: LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE
    pub const ALUA_STANDBY: Asc = (0x04, 0x0b);
    pub const NO_ADDITIONAL_SENSE: Asc = (0x00, 0x00);
    pub const SCSI_BUS_RESET_OCCURRED: Asc = (0x29, 0x02);
    pub const INVALID_FIELD_IN_INFORMATION_UNIT: Asc = (0x0e, 0x03);
    pub const INVALID_MESSAGE_ERROR: Asc = (0x49, 0x00);
    pub const COPY_SEGMENT_GRANULARITY_VIOLATION: Asc = (0x26, 0x0a);
}

/// Where in the CDB or parameter list an ILLEGAL REQUEST points (sense-key specific field,
/// SPC-4 §4.5.2.4.2). Optional: conformance does not require it, initiators find it useful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// A failed command, as the wire will report it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScsiError {
    /// CHECK CONDITION with sense data.
    #[error("check condition: key {key:?} asc/ascq {:02x}/{:02x}", asc.0, asc.1)]
    Check {
        key: SenseKey,
        asc: Asc,
        field: Option<FieldPointer>,
        /// INFORMATION field (e.g. the offset of the first miscompare for COMPARE AND WRITE).
        info: Option<u64>,
    },
    #[error("reservation conflict")]
    ReservationConflict,
    #[error("busy")]
    Busy,
    #[error("task set full")]
    TaskSetFull,
    #[error("task aborted")]
    TaskAborted,
}

impl ScsiError {
    pub const fn check(key: SenseKey, asc: Asc) -> Self {
        ScsiError::Check {
            key,
            asc,
            field: None,
            info: None,
        }
    }
    pub const fn illegal(asc: Asc) -> Self {
        Self::check(SenseKey::IllegalRequest, asc)
    }
    pub const fn invalid_opcode() -> Self {
        Self::illegal(asc::INVALID_COMMAND_OPCODE)
    }
    pub const fn invalid_field_in_cdb() -> Self {
        Self::illegal(asc::INVALID_FIELD_IN_CDB)
    }
    pub const fn invalid_field_in_param() -> Self {
        Self::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST)
    }
    pub const fn lba_out_of_range() -> Self {
        Self::illegal(asc::LBA_OUT_OF_RANGE)
    }
    pub const fn unit_attention(asc: Asc) -> Self {
        Self::check(SenseKey::UnitAttention, asc)
    }
    pub const fn medium_error(asc: Asc) -> Self {
        Self::check(SenseKey::MediumError, asc)
    }

    /// The status this error is reported with.
    pub fn status(&self) -> ScsiStatus {
        match self {
            ScsiError::Check { .. } => ScsiStatus::CheckCondition,
            ScsiError::ReservationConflict => ScsiStatus::ReservationConflict,
            ScsiError::Busy => ScsiStatus::Busy,
            ScsiError::TaskSetFull => ScsiStatus::TaskSetFull,
            ScsiError::TaskAborted => ScsiStatus::TaskAborted,
        }
    }

    /// Fixed-format sense data (SPC-4 §4.5.3), or `None` for statuses without sense.
    pub fn sense_fixed(&self) -> Option<Bytes> {
        let ScsiError::Check {
            key,
            asc,
            field,
            info,
        } = self
        else {
            return None;
        };
        let mut s = [0u8; 18];
        s[0] = 0x70; // current error, fixed format
        s[2] = *key as u8;
        if let Some(info) = info {
            s[0] |= 0x80; // VALID: the INFORMATION field is meaningful
                          // Fixed format carries 4 bytes of INFORMATION; larger values are truncated by design.
            s[3..7].copy_from_slice(&(*info as u32).to_be_bytes());
        }
        s[7] = 10; // additional sense length
        s[12] = asc.0;
        s[13] = asc.1;
        if let Some(f) = field {
            s[15] = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = f.bit {
                s[15] |= 0x08 | (bit & 0x07);
            }
            s[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        Some(Bytes::copy_from_slice(&s))
    }

    /// Descriptor-format sense data (SPC-4 §4.5.2), used when the control mode page has
    /// D_SENSE=1 or REQUEST SENSE asks for DESC=1.
    pub fn sense_descriptor(&self) -> Option<Bytes> {
        let ScsiError::Check {
            key,
            asc,
            field,
            info,
        } = self
        else {
            return None;
        };
        let mut s = vec![0x72, *key as u8, asc.0, asc.1, 0, 0, 0, 0];
        if let Some(info) = info {
            // Information descriptor (SPC-4 §4.5.2.2): type 0, length 0x0a, VALID=1.
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            s.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(f) = field {
            // Sense key specific descriptor (SPC-4 §4.5.2.3): type 2, length 6.
            let mut b = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = f.bit {
                b |= 0x08 | (bit & 0x07);
            }
            let fb = f.byte.to_be_bytes();
            s.extend_from_slice(&[0x02, 0x06, 0, 0, b, fb[0], fb[1], 0]);
        }
        s[7] = (s.len() - 8) as u8;
        Some(Bytes::from(s))
    }

    /// Sense data in the requested format.
    pub fn sense(&self, descriptor: bool) -> Option<Bytes> {
        if descriptor {
            self.sense_descriptor()
        } else {
            self.sense_fixed()
        }
    }

    /// With an INFORMATION field.
    pub fn with_info(mut self, value: u64) -> Self {
        if let ScsiError::Check { info, .. } = &mut self {
            *info = Some(value);
        }
        self
    }

    /// With a sense-key specific field pointer into the CDB.
    pub fn at_cdb(mut self, byte: u16, bit: Option<u8>) -> Self {
        if let ScsiError::Check { field, .. } = &mut self {
            *field = Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            });
        }
        self
    }

    /// This error as a complete response.
    pub fn to_response(&self) -> ScsiResponse {
        ScsiResponse {
            status: self.status(),
            sense: self.sense_fixed(),
            data_in: Bytes::new(),
            data_out_len: None,
        }
    }
}

impl From<ScsiError> for ScsiResponse {
    fn from(e: ScsiError) -> Self {
        e.to_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_layout() {
        let e = ScsiError::illegal(asc::LBA_OUT_OF_RANGE);
        let s = e.sense_fixed().unwrap();
        assert_eq!(s.len(), 18);
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!((s[12], s[13]), (0x21, 0x00));
        assert!(ScsiError::ReservationConflict.sense_fixed().is_none());
        assert_eq!(
            ScsiError::ReservationConflict.status(),
            ScsiStatus::ReservationConflict
        );
    }

    #[test]
    fn descriptor_sense_layout() {
        let e = ScsiError::check(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY).with_info(7);
        let s = e.sense_descriptor().unwrap();
        assert_eq!(&s[..4], &[0x72, 0x0e, 0x1d, 0x00]);
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(&s[8..12], &[0x00, 0x0a, 0x80, 0x00]);
        assert_eq!(&s[12..20], &7u64.to_be_bytes());
        let f = e.sense_fixed().unwrap();
        assert_eq!(f[0], 0xf0);
        assert_eq!(&f[3..7], &[0, 0, 0, 7]);
    }
}
