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
    #[error("op payload has an initiator port name that is not UTF-8")]
    NotUtf8,
}

const K_COMMAND: u8 = 1;
const K_RESET: u8 = 2;
const K_NEXUS_LOST: u8 = 3;

impl ReplicatedOp {
    /// Ordering range: the blocks the op may write (the engine marks them dirty while a plex is
    /// stale, so the range must cover every block written), or a barrier for ops that write no
    /// block (metadata changes, resets, SYNCHRONIZE CACHE).
    pub fn range(&self) -> Option<OpRange> {
        let ReplicatedOp::Command { cmd, .. } = self else {
            return Some(OpRange::Barrier);
        };
        command_range(&cmd.cdb, &cmd.data_out)
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

/// The blocks a state-changing command may write: from the CDB for single-range writes, from
/// the parameter data for UNMAP and EXTENDED COPY (a covering range). Commands that write no
/// block are barriers. A command the LU will reject anyway (unparseable) is a barrier too: it
/// writes nothing. `None`: the covering range is too long to express (see below).
pub fn command_range(cdb_bytes: &[u8], data_out: &[u8]) -> Option<OpRange> {
    use cdb::Opcode::*;
    let Some(&opcode) = cdb_bytes.first() else {
        return Some(OpRange::Barrier);
    };
    let covering = match cdb::Opcode::from_u8(opcode) {
        Write6 | Write10 | Write12 | Write16 | WriteAndVerify10 | WriteAndVerify12
        | WriteAndVerify16 | WriteSame10 | WriteSame16 | CompareAndWrite | OrWrite => {
            cdb::RwCdb::parse(cdb_bytes)
                .ok()
                .map(|r| (r.lba, r.lba.saturating_add(u64::from(r.blocks))))
        }
        // SBC-3 §5.28: 8-byte header, then 16-byte descriptors (LBA 8, count 4).
        Unmap => cover(
            data_out
                .get(8..)
                .unwrap_or(&[])
                .chunks_exact(16)
                .map(|d| (be(&d[0..8]), u64::from(be(&d[8..12]) as u32))),
        ),
        // SPC-4 §6.4: segment descriptors follow the target descriptors; block→block (0x02)
        // segments carry the destination LBA at 20..28 and the block count at 10..12.
        ExtendedCopy => xcopy_destinations(data_out),
        _ => None,
    };
    match covering {
        // The engine's ranges count at most u32::MAX blocks (2 TiB at 512 B); a covering range
        // that does not fit cannot be marked dirty, so the op is refused (`None`).
        Some((start, end)) if end > start => u32::try_from(end - start)
            .ok()
            .map(|blocks| OpRange::Blocks(LbaRange { lba: start, blocks })),
        _ => Some(OpRange::Barrier),
    }
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

fn cover(ranges: impl Iterator<Item = (u64, u64)>) -> Option<(u64, u64)> {
    ranges
        .filter(|&(_, n)| n > 0)
        .map(|(lba, n)| (lba, lba.saturating_add(n)))
        .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)))
}

fn xcopy_destinations(p: &[u8]) -> Option<(u64, u64)> {
    let hdr = p.get(0..16)?;
    let tdl = be(&hdr[2..4]) as usize;
    let sdl = be(&hdr[8..12]) as usize;
    let segs = p.get(16 + tdl..16usize.checked_add(tdl)?.checked_add(sdl)?)?;
    let mut at = 0;
    let mut out = Vec::new();
    while let Some(h) = segs.get(at..at + 4) {
        let len = 4 + be(&h[2..4]) as usize;
        let seg = segs.get(at..at + len)?;
        if seg[0] == 0x02 && seg.len() >= 28 {
            out.push((be(&seg[20..28]), be(&seg[10..12])));
        }
        at += len;
    }
    cover(out.into_iter())
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
    // Strict, not lossy: the name is a reservation holder's identity, and a lossy decode
    // could give two names one identity (found by the `peer_message` fuzz target, where
    // the replacement characters also made the name too long to encode again).
    let initiator_port = String::from_utf8(name.to_vec()).map_err(|_| OpDecodeError::NotUtf8)?;
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
            command_range(&w, &[]),
            Some(OpRange::Blocks(LbaRange {
                lba: 100,
                blocks: 8
            }))
        );
        let fua = cdb::RwCdb {
            lba: 100,
            blocks: 8,
            flags: 0x08,
        }
        .encode(0x2a);
        // FUA flushes every plex, but the blocks it writes are still just its range.
        assert_eq!(
            command_range(&fua, &[]),
            Some(OpRange::Blocks(LbaRange {
                lba: 100,
                blocks: 8
            }))
        );
        assert_eq!(
            command_range(&[0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]),
            Some(OpRange::Barrier)
        );
        assert_eq!(command_range(&[], &[]), Some(OpRange::Barrier));
        // UNMAP of [10, 14) and [100, 101): one covering range.
        let mut unmap = vec![0u8; 8];
        for (lba, n) in [(10u64, 4u32), (100, 1)] {
            unmap.extend_from_slice(&lba.to_be_bytes());
            unmap.extend_from_slice(&n.to_be_bytes());
            unmap.extend_from_slice(&[0; 4]);
        }
        let unmap_cdb = [0x42, 0, 0, 0, 0, 0, 0, 0, 40, 0];
        assert_eq!(
            command_range(&unmap_cdb, &unmap),
            Some(OpRange::Blocks(LbaRange {
                lba: 10,
                blocks: 91
            }))
        );
        // Descriptors 2^33 blocks apart cannot be covered by one range: refused.
        let mut far = vec![0u8; 8];
        for lba in [0u64, 1 << 33] {
            far.extend_from_slice(&lba.to_be_bytes());
            far.extend_from_slice(&1u32.to_be_bytes());
            far.extend_from_slice(&[0; 4]);
        }
        assert_eq!(command_range(&unmap_cdb, &far), None);
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
    fn an_initiator_name_that_is_not_utf8_is_refused() {
        let op = ReplicatedOp::NexusLost { nexus: nexus() };
        let mut raw = op.encode().to_vec();
        // Kind (1 byte), name length (4), then the name: break its first byte.
        raw[5] = 0xff;
        assert_eq!(
            ReplicatedOp::decode(Bytes::from(raw)).err(),
            Some(OpDecodeError::NotUtf8)
        );
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
