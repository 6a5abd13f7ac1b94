//! CDB decoding (SPC-4 §4.2): operation codes, CDB length per group code, and the common
//! LBA / transfer-length layouts of the 6/10/12/16/32-byte CDBs.
//!
//! Decoding is two-step, as everywhere in this crate: [`cdb_len`] says how many bytes the
//! opcode needs, the caller checks it has them, then the field helpers read them. Helpers
//! never index past the slice they are given; a short CDB is `INVALID FIELD IN CDB`.
//!
//! [`is_state_changing`] is what the mirror engine uses to decide which commands must be
//! ordered and replicated to every in-sync plex.

use super::sense::ScsiError;

/// Operation codes this LU knows about (SPC-4 Annex E, SBC-3 §5). Anything else is
/// `Unsupported(op)` and answered with `ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    TestUnitReady,
    RequestSense,
    Read6,
    Write6,
    Inquiry,
    ModeSelect6,
    Reserve6,
    Release6,
    ModeSense6,
    StartStopUnit,
    PreventAllowMediumRemoval,
    ReadCapacity10,
    Read10,
    Write10,
    WriteAndVerify10,
    Verify10,
    PreFetch10,
    SynchronizeCache10,
    WriteSame10,
    Unmap,
    ModeSelect10,
    Reserve10,
    Release10,
    ModeSense10,
    PersistentReserveIn,
    PersistentReserveOut,
    ExtendedCopy,
    ReceiveCopyResults,
    Read16,
    CompareAndWrite,
    Write16,
    OrWrite,
    WriteAndVerify16,
    Verify16,
    PreFetch16,
    SynchronizeCache16,
    WriteSame16,
    /// SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS.
    ServiceActionIn16,
    ReportLuns,
    /// MAINTENANCE IN: REPORT TARGET PORT GROUPS, REPORT SUPPORTED OPERATION CODES.
    MaintenanceIn,
    /// MAINTENANCE OUT: SET TARGET PORT GROUPS (not supported: implicit ALUA only).
    MaintenanceOut,
    Read12,
    Write12,
    WriteAndVerify12,
    Verify12,
    Unsupported(u8),
}

impl Opcode {
    pub fn from_u8(op: u8) -> Opcode {
        use Opcode::*;
        match op {
            0x00 => TestUnitReady,
            0x03 => RequestSense,
            0x08 => Read6,
            0x0a => Write6,
            0x12 => Inquiry,
            0x15 => ModeSelect6,
            0x16 => Reserve6,
            0x17 => Release6,
            0x1a => ModeSense6,
            0x1b => StartStopUnit,
            0x1e => PreventAllowMediumRemoval,
            0x25 => ReadCapacity10,
            0x28 => Read10,
            0x2a => Write10,
            0x2e => WriteAndVerify10,
            0x2f => Verify10,
            0x34 => PreFetch10,
            0x35 => SynchronizeCache10,
            0x41 => WriteSame10,
            0x42 => Unmap,
            0x55 => ModeSelect10,
            0x56 => Reserve10,
            0x57 => Release10,
            0x5a => ModeSense10,
            0x5e => PersistentReserveIn,
            0x5f => PersistentReserveOut,
            0x83 => ExtendedCopy,
            0x84 => ReceiveCopyResults,
            0x88 => Read16,
            0x89 => CompareAndWrite,
            0x8a => Write16,
            0x8b => OrWrite,
            0x8e => WriteAndVerify16,
            0x8f => Verify16,
            0x90 => PreFetch16,
            0x91 => SynchronizeCache16,
            0x93 => WriteSame16,
            0x9e => ServiceActionIn16,
            0xa0 => ReportLuns,
            0xa3 => MaintenanceIn,
            0xa4 => MaintenanceOut,
            0xa8 => Read12,
            0xaa => Write12,
            0xae => WriteAndVerify12,
            0xaf => Verify12,
            other => Unsupported(other),
        }
    }
}

/// SERVICE ACTION IN(16) service actions (SBC-3 §5.16, §5.13).
pub mod sai16 {
    pub const READ_CAPACITY_16: u8 = 0x10;
    pub const GET_LBA_STATUS: u8 = 0x12;
}

/// MAINTENANCE IN service actions (SPC-4 §6.27, §6.35).
pub mod maint_in {
    pub const REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
    pub const REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// RECEIVE COPY RESULTS service actions (SPC-4 §6.18).
pub mod rcr {
    pub const COPY_STATUS: u8 = 0x00;
    pub const OPERATING_PARAMETERS: u8 = 0x03;
}

/// Length of the CDB for `op` from its group code (SPC-4 §4.2.5.1), or `None` for the
/// reserved / vendor-specific groups. The variable-length group (0x7f) is 8 + byte 7.
pub fn cdb_len(op: u8) -> Option<usize> {
    match op >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        3 if op == 0x7f => Some(32),
        _ => None,
    }
}

/// Service action field (low 5 bits of byte 1) for the opcodes that have one.
pub fn service_action(cdb: &[u8]) -> u8 {
    cdb.get(1).copied().unwrap_or(0) & 0x1f
}

/// Big-endian field of `N` bytes at `at`, or `INVALID FIELD IN CDB` if the CDB is short.
pub fn be(cdb: &[u8], at: usize, n: usize) -> Result<u64, ScsiError> {
    let bytes = cdb
        .get(at..at + n)
        .ok_or_else(ScsiError::invalid_field_in_cdb)?;
    Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// Allocation length of a command that returns data (SPC-4 §4.2.5.6), by opcode layout.
pub fn allocation_len(cdb: &[u8]) -> Result<u32, ScsiError> {
    let op = cdb.first().copied().unwrap_or(0);
    let v = match Opcode::from_u8(op) {
        Opcode::Inquiry => be(cdb, 3, 2)?,
        Opcode::ModeSense6 | Opcode::RequestSense => be(cdb, 4, 1)?,
        Opcode::ModeSense10 | Opcode::PersistentReserveIn => be(cdb, 7, 2)?,
        Opcode::ReportLuns | Opcode::ServiceActionIn16 => {
            if op == 0xa0 {
                be(cdb, 6, 4)?
            } else {
                be(cdb, 10, 4)?
            }
        }
        Opcode::MaintenanceIn | Opcode::ReceiveCopyResults => {
            if op == 0x84 {
                be(cdb, 10, 4)?
            } else {
                be(cdb, 6, 4)?
            }
        }
        _ => u64::from(u32::MAX),
    };
    Ok(v as u32)
}

/// The LBA / block-count layout shared by READ, WRITE, VERIFY, WRITE AND VERIFY,
/// PRE-FETCH, SYNCHRONIZE CACHE, WRITE SAME, ORWRITE and COMPARE AND WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwCdb {
    pub lba: u64,
    /// Number of logical blocks as it is to be used: READ(6)/WRITE(6) 0 already means 256.
    pub blocks: u32,
    /// Byte 1 (flags: RDPROTECT/WRPROTECT, DPO, FUA, BYTCHK, UNMAP, ANCHOR, NDOB, ...).
    pub flags: u8,
}

impl RwCdb {
    /// Decode for a known opcode. Short CDBs are `INVALID FIELD IN CDB`.
    pub fn parse(cdb: &[u8]) -> Result<RwCdb, ScsiError> {
        let op = *cdb.first().ok_or_else(ScsiError::invalid_field_in_cdb)?;
        let need = cdb_len(op).ok_or_else(ScsiError::invalid_opcode)?;
        if cdb.len() < need {
            return Err(ScsiError::invalid_field_in_cdb());
        }
        let mut flags = cdb[1];
        let (lba, blocks) = match op {
            // SBC-3 §5.8 / §5.26: 21-bit LBA; TRANSFER LENGTH 0 means 256 blocks.
            0x08 | 0x0a => {
                let lba = be(cdb, 1, 3)? & 0x1f_ffff;
                let n = be(cdb, 4, 1)? as u32;
                flags &= 0xe0; // the low bits of byte 1 are LBA
                (lba, if n == 0 { 256 } else { n })
            }
            // COMPARE AND WRITE: NUMBER OF LOGICAL BLOCKS is one byte (SBC-3 §5.2).
            0x89 => (be(cdb, 2, 8)?, be(cdb, 13, 1)? as u32),
            _ => match need {
                10 => (be(cdb, 2, 4)?, be(cdb, 7, 2)? as u32),
                12 => (be(cdb, 2, 4)?, be(cdb, 6, 4)? as u32),
                16 => (be(cdb, 2, 8)?, be(cdb, 10, 4)? as u32),
                32 => (be(cdb, 12, 8)?, be(cdb, 28, 4)? as u32),
                _ => return Err(ScsiError::invalid_opcode()),
            },
        };
        Ok(RwCdb { lba, blocks, flags })
    }

    /// Encode into a CDB of `op`'s size (for tests and for the mirror engine, which may
    /// re-issue commands). Values that do not fit the field are truncated.
    pub fn encode(&self, op: u8) -> Vec<u8> {
        let len = cdb_len(op).unwrap_or(16);
        let mut c = vec![0u8; len];
        c[0] = op;
        c[1] = self.flags;
        match op {
            0x08 | 0x0a => {
                let l = (self.lba as u32 & 0x1f_ffff).to_be_bytes();
                c[1] = (self.flags & 0xe0) | l[1];
                c[2] = l[2];
                c[3] = l[3];
                c[4] = if self.blocks >= 256 {
                    0
                } else {
                    self.blocks as u8
                };
            }
            0x89 => {
                c[2..10].copy_from_slice(&self.lba.to_be_bytes());
                c[13] = self.blocks as u8;
            }
            _ => match len {
                10 => {
                    c[2..6].copy_from_slice(&(self.lba as u32).to_be_bytes());
                    c[7..9].copy_from_slice(&(self.blocks as u16).to_be_bytes());
                }
                12 => {
                    c[2..6].copy_from_slice(&(self.lba as u32).to_be_bytes());
                    c[6..10].copy_from_slice(&self.blocks.to_be_bytes());
                }
                16 => {
                    c[2..10].copy_from_slice(&self.lba.to_be_bytes());
                    c[10..14].copy_from_slice(&self.blocks.to_be_bytes());
                }
                _ => {
                    c[12..20].copy_from_slice(&self.lba.to_be_bytes());
                    c[28..32].copy_from_slice(&self.blocks.to_be_bytes());
                }
            },
        }
        c
    }
}

/// Does this command change the medium or LU state, so that every in-sync plex must apply
/// it in the same order? (DESIGN.md §5: writes, WRITE SAME, UNMAP, CAW, ORWRITE, XCOPY,
/// PR OUT, RESERVE/RELEASE, MODE SELECT.) SYNCHRONIZE CACHE is not state-changing but must
/// reach every plex in write-back mode; see [`needs_flush_on_all_plexes`].
pub fn is_state_changing(cdb: &[u8]) -> bool {
    let Some(&op) = cdb.first() else {
        return false;
    };
    use Opcode::*;
    match Opcode::from_u8(op) {
        Write6 | Write10 | Write12 | Write16 | WriteAndVerify10 | WriteAndVerify12
        | WriteAndVerify16 | WriteSame10 | WriteSame16 | Unmap | CompareAndWrite | OrWrite
        | ExtendedCopy | PersistentReserveOut | Reserve6 | Reserve10 | Release6 | Release10
        | ModeSelect6 | ModeSelect10 | MaintenanceOut => true,
        // FORMAT UNIT (0x04), WRITE LONG (0x3f / 0x9f), WRITE ATOMIC(16) (0x9c), and the
        // 32-byte WRITE family: not implemented here, but state-changing if they ever are.
        Unsupported(0x04 | 0x3f | 0x9c) => true,
        Unsupported(0x9f) => service_action(cdb) == 0x11,
        Unsupported(0x7f) => matches!(cdb.get(8..10), Some([0x00, 0x0b..=0x0e])),
        _ => false,
    }
}

/// Commands that must flush every in-sync plex before completing in write-back mode:
/// SYNCHRONIZE CACHE, and any write with FUA=1.
pub fn needs_flush_on_all_plexes(cdb: &[u8]) -> bool {
    let Some(&op) = cdb.first() else {
        return false;
    };
    match Opcode::from_u8(op) {
        Opcode::SynchronizeCache10 | Opcode::SynchronizeCache16 => true,
        Opcode::Write10
        | Opcode::Write12
        | Opcode::Write16
        | Opcode::CompareAndWrite
        | Opcode::OrWrite => cdb.get(1).is_some_and(|f| f & 0x08 != 0),
        Opcode::WriteAndVerify10 | Opcode::WriteAndVerify12 | Opcode::WriteAndVerify16 => true,
        _ => false,
    }
}

/// Number of data-out bytes the CDB asks for, given the block size, for commands that
/// carry data-out (so the transport can report residuals). `None` for no data-out.
pub fn data_out_len(cdb: &[u8], block_size: u32) -> Option<u32> {
    let op = *cdb.first()?;
    let bs = u64::from(block_size);
    use Opcode::*;
    let v: u64 = match Opcode::from_u8(op) {
        Write6 | Write10 | Write12 | Write16 | WriteAndVerify10 | WriteAndVerify12
        | WriteAndVerify16 | OrWrite => u64::from(RwCdb::parse(cdb).ok()?.blocks) * bs,
        Verify10 | Verify12 | Verify16 => {
            let r = RwCdb::parse(cdb).ok()?;
            match (r.flags >> 1) & 0x03 {
                0b01 => u64::from(r.blocks) * bs,
                0b11 => bs,
                _ => return None,
            }
        }
        CompareAndWrite => 2 * u64::from(RwCdb::parse(cdb).ok()?.blocks) * bs,
        WriteSame10 => bs,
        WriteSame16 => {
            if cdb.get(1)? & 0x01 != 0 {
                0 // NDOB: no data-out buffer
            } else {
                bs
            }
        }
        ModeSelect6 => be(cdb, 4, 1).ok()?,
        Unmap | ModeSelect10 => be(cdb, 7, 2).ok()?,
        PersistentReserveOut => be(cdb, 5, 4).ok()?,
        ExtendedCopy => be(cdb, 10, 4).ok()?,
        _ => return None,
    };
    Some(u32::try_from(v).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn group_lengths() {
        assert_eq!(cdb_len(0x28), Some(10));
        assert_eq!(cdb_len(0x08), Some(6));
        assert_eq!(cdb_len(0x88), Some(16));
        assert_eq!(cdb_len(0xa8), Some(12));
        assert_eq!(cdb_len(0x7f), Some(32));
        assert_eq!(cdb_len(0xc0), None);
        assert_eq!(cdb_len(0x60), None);
    }

    #[test]
    fn read6_zero_means_256() {
        let r = RwCdb::parse(&[0x08, 0x01, 0x02, 0x03, 0x00, 0x00]).unwrap();
        assert_eq!(r.lba, 0x010203);
        assert_eq!(r.blocks, 256);
    }

    #[test]
    fn caw_layout() {
        let mut c = [0u8; 16];
        c[0] = 0x89;
        c[9] = 5;
        c[13] = 3;
        let r = RwCdb::parse(&c).unwrap();
        assert_eq!((r.lba, r.blocks), (5, 3));
        assert_eq!(data_out_len(&c, 512), Some(3 * 1024));
    }

    #[test]
    fn short_cdb_is_invalid_field() {
        assert_eq!(
            RwCdb::parse(&[0x28, 0, 0]),
            Err(ScsiError::invalid_field_in_cdb())
        );
    }

    #[test]
    fn state_changing_classification() {
        for op in [
            0x0a, 0x2a, 0xaa, 0x8a, 0x41, 0x93, 0x42, 0x89, 0x8b, 0x83, 0x5f, 0x16, 0x57, 0x15,
            0x55,
        ] {
            assert!(
                is_state_changing(&[op, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                "{op:#x}"
            );
        }
        for op in [
            0x00, 0x12, 0x28, 0x88, 0x25, 0x9e, 0x5e, 0x1a, 0x35, 0x2f, 0xa0, 0x84,
        ] {
            assert!(
                !is_state_changing(&[op, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                "{op:#x}"
            );
        }
        assert!(!is_state_changing(&[]));
    }

    #[test]
    fn data_out_lengths() {
        let w = RwCdb {
            lba: 0,
            blocks: 4,
            flags: 0,
        }
        .encode(0x2a);
        assert_eq!(data_out_len(&w, 512), Some(2048));
        assert_eq!(data_out_len(&[0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0], 512), None);
        let mut ws16 = [0u8; 16];
        ws16[0] = 0x93;
        ws16[1] = 0x01;
        assert_eq!(data_out_len(&ws16, 512), Some(0));
    }

    proptest! {
        #[test]
        fn rw_roundtrip(op in prop::sample::select(vec![0x08u8, 0x0a, 0x28, 0x2a, 0xa8, 0xaa, 0x88, 0x8a, 0x89]),
                        lba in any::<u64>(), blocks in any::<u32>(), flags in any::<u8>()) {
            // Constrain to what each layout can carry.
            let (lba, blocks, flags) = match cdb_len(op) {
                Some(6) => (lba & 0x1f_ffff, (blocks % 256) + 1, flags & 0xe0),
                Some(10) => (lba & 0xffff_ffff, blocks & 0xffff, flags),
                Some(12) => (lba & 0xffff_ffff, blocks, flags),
                _ if op == 0x89 => (lba, blocks & 0xff, flags),
                _ => (lba, blocks, flags),
            };
            let r = RwCdb { lba, blocks, flags };
            let back = RwCdb::parse(&r.encode(op)).unwrap();
            prop_assert_eq!(back, r);
        }

        #[test]
        fn helpers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            let _ = RwCdb::parse(&bytes);
            let _ = is_state_changing(&bytes);
            let _ = data_out_len(&bytes, 512);
            let _ = allocation_len(&bytes);
            let _ = needs_flush_on_all_plexes(&bytes);
        }
    }
}
