//! What the mirror replicates: SCSI work that changes LU state, encoded as the engine's opaque
//! op payload, and the LU's response encoded for the origin.
//!
//! Every plex applies the same [`ReplicatedOp`]s in the same order on a deterministic
//! `LogicalUnit`, so media, reservations and unit attentions stay identical (DESIGN.md §5).
//! Besides state-changing CDBs this covers the task-management and nexus events that change
//! replicated state: LUN/target reset (drops the SCSI-2 reservation, posts unit attentions)
//! and I_T nexus loss (drops the SCSI-2 reservation held by it).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::msg::{LbaRange, OpRange};
use crate::scsi::{cdb, NexusId, ScsiCommand, ScsiResponse, ScsiStatus, TaskAttr, TaskManagement};

/// Longest initiator port name we carry (iSCSI names are at most 223 bytes, plus ISID).
const PORT_NAME_BYTES_MAX: usize = 512;
/// Longest CDB we carry (16 in the BHS plus an extended-CDB AHS).
const CDB_BYTES_MAX: usize = 260;

/// One unit of replicated work.
#[derive(Debug, Clone)]
pub enum ReplicatedOp {
    Command {
        nexus: NexusId,
        cmd: ScsiCommand,
    },
    Reset {
        nexus: NexusId,
        lun: u64,
        tmf: TaskManagement,
    },
    NexusLost {
        nexus: NexusId,
    },
}

/// Why a payload could not be decoded (only a bug or a hostile peer produces one; peers are
/// authenticated, so this is logged and the op answered with a hardware error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpDecodeError {
    #[error("op payload truncated")]
    Truncated,
    #[error("op payload has unknown kind {0}")]
    UnknownKind(u8),
    #[error("op payload field too long")]
    TooLong,
}

const K_COMMAND: u8 = 1;
const K_RESET: u8 = 2;
const K_NEXUS_LOST: u8 = 3;

impl ReplicatedOp {
    /// Ordering range: the blocks a write touches, or a barrier for everything else
    /// (metadata changes, multi-range UNMAP, XCOPY, resets, SYNCHRONIZE CACHE).
    pub fn range(&self) -> OpRange {
        let ReplicatedOp::Command { cmd, .. } = self else {
            return OpRange::Barrier;
        };
        command_range(&cmd.cdb)
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        match self {
            ReplicatedOp::Command { nexus, cmd } => {
                b.put_u8(K_COMMAND);
                put_nexus(&mut b, nexus);
                b.put_u64(cmd.lun);
                put_bytes(&mut b, &cmd.cdb);
                put_bytes(&mut b, &cmd.data_out);
                b.put_u32(cmd.expected_transfer_len);
                b.put_u8(match cmd.task_attr {
                    TaskAttr::Simple => 0,
                    TaskAttr::Ordered => 1,
                    TaskAttr::HeadOfQueue => 2,
                    TaskAttr::Aca => 3,
                });
                b.put_u32(cmd.tag);
            }
            ReplicatedOp::Reset { nexus, lun, tmf } => {
                b.put_u8(K_RESET);
                put_nexus(&mut b, nexus);
                b.put_u64(*lun);
                b.put_u8(match tmf {
                    TaskManagement::TargetWarmReset => 1,
                    TaskManagement::TargetColdReset => 2,
                    _ => 0, // LogicalUnitReset; the only other kind we replicate
                });
            }
            ReplicatedOp::NexusLost { nexus } => {
                b.put_u8(K_NEXUS_LOST);
                put_nexus(&mut b, nexus);
            }
        }
        b.freeze()
    }

    pub fn decode(mut b: Bytes) -> Result<ReplicatedOp, OpDecodeError> {
        let kind = get_u8(&mut b)?;
        let nexus = get_nexus(&mut b)?;
        match kind {
            K_COMMAND => {
                let lun = get_u64(&mut b)?;
                let cdb = get_bytes(&mut b, CDB_BYTES_MAX)?;
                let data_out = get_bytes(&mut b, usize::MAX)?;
                let expected_transfer_len = get_u32(&mut b)?;
                let task_attr = match get_u8(&mut b)? {
                    1 => TaskAttr::Ordered,
                    2 => TaskAttr::HeadOfQueue,
                    3 => TaskAttr::Aca,
                    _ => TaskAttr::Simple,
                };
                let tag = get_u32(&mut b)?;
                Ok(ReplicatedOp::Command {
                    nexus,
                    cmd: ScsiCommand {
                        lun,
                        cdb,
                        data_out,
                        expected_transfer_len,
                        task_attr,
                        tag,
                    },
                })
            }
            K_RESET => {
                let lun = get_u64(&mut b)?;
                let tmf = match get_u8(&mut b)? {
                    1 => TaskManagement::TargetWarmReset,
                    2 => TaskManagement::TargetColdReset,
                    _ => TaskManagement::LogicalUnitReset,
                };
                Ok(ReplicatedOp::Reset { nexus, lun, tmf })
            }
            K_NEXUS_LOST => Ok(ReplicatedOp::NexusLost { nexus }),
            k => Err(OpDecodeError::UnknownKind(k)),
        }
    }
}

/// The blocks a state-changing CDB may write. Single-range writes order against overlapping
/// ops only; anything whose range is not in the CDB is a barrier.
pub fn command_range(cdb_bytes: &[u8]) -> OpRange {
    use cdb::Opcode::*;
    let Some(&opcode) = cdb_bytes.first() else {
        return OpRange::Barrier;
    };
    let ranged = matches!(
        cdb::Opcode::from_u8(opcode),
        Write6
            | Write10
            | Write12
            | Write16
            | WriteAndVerify10
            | WriteAndVerify12
            | WriteAndVerify16
            | WriteSame10
            | WriteSame16
            | CompareAndWrite
            | OrWrite
    );
    // FUA writes flush the whole plex, which orders against everything anyway.
    if !ranged || cdb::needs_flush_on_all_plexes(cdb_bytes) {
        return OpRange::Barrier;
    }
    match cdb::RwCdb::parse(cdb_bytes) {
        // A zero-length write touches nothing, but keep it ordered: a barrier is always safe.
        Ok(r) if r.blocks > 0 => OpRange::Blocks(LbaRange {
            lba: r.lba,
            blocks: r.blocks,
        }),
        _ => OpRange::Barrier,
    }
}

/// Encode the LU's response so the origin can answer its initiator with it.
pub fn encode_response(r: &ScsiResponse) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + r.data_in.len());
    b.put_u8(r.status as u8);
    match &r.sense {
        Some(s) => {
            b.put_u8(1);
            put_bytes(&mut b, s);
        }
        None => b.put_u8(0),
    }
    put_bytes(&mut b, &r.data_in);
    match r.data_out_len {
        Some(n) => {
            b.put_u8(1);
            b.put_u32(n);
        }
        None => b.put_u8(0),
    }
    b.freeze()
}

pub fn decode_response(mut b: Bytes) -> Result<ScsiResponse, OpDecodeError> {
    let status = match get_u8(&mut b)? {
        0x00 => ScsiStatus::Good,
        0x02 => ScsiStatus::CheckCondition,
        0x04 => ScsiStatus::ConditionMet,
        0x08 => ScsiStatus::Busy,
        0x18 => ScsiStatus::ReservationConflict,
        0x28 => ScsiStatus::TaskSetFull,
        0x30 => ScsiStatus::AcaActive,
        0x40 => ScsiStatus::TaskAborted,
        k => return Err(OpDecodeError::UnknownKind(k)),
    };
    let sense = match get_u8(&mut b)? {
        0 => None,
        _ => Some(get_bytes(&mut b, 260)?),
    };
    let data_in = get_bytes(&mut b, usize::MAX)?;
    let data_out_len = match get_u8(&mut b)? {
        0 => None,
        _ => Some(get_u32(&mut b)?),
    };
    Ok(ScsiResponse {
        status,
        sense,
        data_in,
        data_out_len,
    })
}

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

fn put_nexus(b: &mut BytesMut, n: &NexusId) {
    put_bytes(b, n.initiator_port.as_bytes());
    b.put_u16(n.relative_target_port);
}

fn get_u8(b: &mut Bytes) -> Result<u8, OpDecodeError> {
    if b.remaining() < 1 {
        return Err(OpDecodeError::Truncated);
    }
    Ok(b.get_u8())
}

fn get_u32(b: &mut Bytes) -> Result<u32, OpDecodeError> {
    if b.remaining() < 4 {
        return Err(OpDecodeError::Truncated);
    }
    Ok(b.get_u32())
}

fn get_u64(b: &mut Bytes) -> Result<u64, OpDecodeError> {
    if b.remaining() < 8 {
        return Err(OpDecodeError::Truncated);
    }
    Ok(b.get_u64())
}

fn get_bytes(b: &mut Bytes, max: usize) -> Result<Bytes, OpDecodeError> {
    let n = get_u32(b)? as usize;
    if n > max {
        return Err(OpDecodeError::TooLong);
    }
    if b.remaining() < n {
        return Err(OpDecodeError::Truncated);
    }
    Ok(b.split_to(n))
}

fn get_nexus(b: &mut Bytes) -> Result<NexusId, OpDecodeError> {
    let name = get_bytes(b, PORT_NAME_BYTES_MAX)?;
    let initiator_port = String::from_utf8_lossy(&name).into_owned();
    if b.remaining() < 2 {
        return Err(OpDecodeError::Truncated);
    }
    Ok(NexusId {
        initiator_port,
        relative_target_port: b.get_u16(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nexus() -> NexusId {
        NexusId {
            initiator_port: "iqn.2026-11.test:init,i,0x230000000001".into(),
            relative_target_port: 2,
        }
    }

    #[test]
    fn write_has_its_range_and_pr_out_is_a_barrier() {
        let w = cdb::RwCdb {
            lba: 100,
            blocks: 8,
            flags: 0,
        }
        .encode(0x2a);
        assert_eq!(
            command_range(&w),
            OpRange::Blocks(LbaRange {
                lba: 100,
                blocks: 8
            })
        );
        let fua = cdb::RwCdb {
            lba: 100,
            blocks: 8,
            flags: 0x08,
        }
        .encode(0x2a);
        assert_eq!(command_range(&fua), OpRange::Barrier);
        assert_eq!(
            command_range(&[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0]),
            OpRange::Barrier
        );
        assert_eq!(command_range(&[]), OpRange::Barrier);
    }

    #[test]
    fn ops_round_trip() {
        let ops = [
            ReplicatedOp::Command {
                nexus: nexus(),
                cmd: ScsiCommand {
                    lun: 0,
                    cdb: Bytes::from_static(&[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0]),
                    data_out: Bytes::from(vec![7u8; 512]),
                    expected_transfer_len: 512,
                    task_attr: TaskAttr::Ordered,
                    tag: 77,
                },
            },
            ReplicatedOp::Reset {
                nexus: nexus(),
                lun: 0,
                tmf: TaskManagement::LogicalUnitReset,
            },
            ReplicatedOp::NexusLost { nexus: nexus() },
        ];
        for op in ops {
            let back = ReplicatedOp::decode(op.encode()).unwrap();
            assert_eq!(format!("{op:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn response_round_trips() {
        let r = ScsiResponse {
            status: ScsiStatus::CheckCondition,
            sense: Some(Bytes::from_static(&[0x70, 0, 5])),
            data_in: Bytes::from_static(b"abc"),
            data_out_len: Some(512),
        };
        let back = decode_response(encode_response(&r)).unwrap();
        assert_eq!(back.status, r.status);
        assert_eq!(back.sense, r.sense);
        assert_eq!(back.data_in, r.data_in);
        assert_eq!(back.data_out_len, r.data_out_len);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ReplicatedOp::decode(Bytes::from(bytes.clone()));
            let _ = decode_response(Bytes::from(bytes));
        }
    }
}
