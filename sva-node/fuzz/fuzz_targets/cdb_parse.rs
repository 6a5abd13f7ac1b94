//! CDB decoding and `LogicalUnit::execute` over a small in-memory volume, with a fresh LU
//! per input (so a crash replays from its input alone) and a sequence of commands from
//! three I_T nexuses (so persistent reservations, unit attentions and mode state are
//! exercised across commands).
//!
//! Input: steps of [ctl, cdb_len, cdb.., data_len_hi, data_len_lo, data..]. `ctl` bits
//! 0-1 pick the nexus (3 = a task management function or nexus loss instead of a
//! command), bit 2 makes EDTL differ from the data length.
#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sva_node::scsi::{
    LogicalUnit, LuConfig, NexusId, ScsiCommand, ScsiStatus, TaskAttr, TaskManagement,
};
use sva_node::store::MemBackend;

/// Volume size: small, so that random LBAs are sometimes in range.
const VOLUME_BYTES: u64 = 256 * 512;
/// Largest data-out one command carries (keeps one input cheap).
const DATA_LEN_MAX: usize = 65_536;
/// Commands per input.
const STEPS_MAX: usize = 64;

fn nexus(i: u8) -> NexusId {
    NexusId {
        initiator_port: format!("iqn.2024-01.io.fuzz:i{i},i,0x80000000000{i}"),
        relative_target_port: 1 + u16::from(i & 1),
    }
}

fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (a, b) = input.split_at(n.min(input.len()));
    *input = b;
    a
}

fuzz_target!(|input: &[u8]| {
    let lu = LogicalUnit::new(
        LuConfig::new("fuzz"),
        Arc::new(MemBackend::new(VOLUME_BYTES)),
    );
    for i in 0..3 {
        lu.nexus_added(&nexus(i));
    }
    let mut input = input;
    for _ in 0..STEPS_MAX {
        let [ctl, n] = take(&mut input, 2) else {
            return;
        };
        let (ctl, n) = (*ctl, *n);
        if ctl & 3 == 3 {
            // Task management or the loss of a nexus between commands.
            let who = nexus(n % 3);
            match (n >> 2) % 8 {
                0 => lu.nexus_removed(&who),
                1 => lu.nexus_added(&who),
                2 => drop(lu.task_management(
                    &who,
                    u64::from(n >> 5),
                    &TaskManagement::LogicalUnitReset,
                )),
                3 => drop(lu.task_management(&who, 0, &TaskManagement::TargetWarmReset)),
                4 => drop(lu.task_management(&who, 0, &TaskManagement::ClearTaskSet)),
                _ => drop(lu.task_management(&who, 0, &TaskManagement::AbortTask { tag: 1 })),
            }
            continue;
        }
        let cdb = take(&mut input, usize::from(n % 33));
        let len_bytes = take(&mut input, 2);
        let len = match len_bytes {
            [a, b] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => 0,
        };
        let data = take(&mut input, len.min(DATA_LEN_MAX));
        let edtl = if ctl & 4 != 0 {
            u32::from(ctl) << 9
        } else {
            data.len() as u32
        };
        let cmd = ScsiCommand {
            lun: u64::from(ctl >> 7),
            cdb: Bytes::copy_from_slice(cdb),
            data_out: Bytes::copy_from_slice(data),
            expected_transfer_len: edtl,
            task_attr: TaskAttr::Simple,
            tag: 0,
        };
        let r = lu.execute(&nexus(ctl & 3), &cmd);
        assert_eq!(r.sense.is_some(), r.status == ScsiStatus::CheckCondition);
        let _ = sva_node::scsi::cdb::is_state_changing(cdb);
        let _ = sva_node::scsi::cdb::needs_flush_on_all_plexes(cdb);
        let _ = sva_node::scsi::cdb::data_out_len(cdb, 512);
        let _ = sva_node::scsi::cdb::allocation_len(cdb);
        if let Ok(rw) = sva_node::scsi::cdb::RwCdb::parse(cdb) {
            // Re-encoding a parsed READ/WRITE CDB must parse to the same fields.
            if let Some(&op) = cdb.first() {
                assert_eq!(
                    sva_node::scsi::cdb::RwCdb::parse(&rw.encode(op)).ok(),
                    Some(rw)
                );
            }
        }
    }
});
