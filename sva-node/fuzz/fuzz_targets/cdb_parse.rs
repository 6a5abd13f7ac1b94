//! Arbitrary CDB + data-out into `LogicalUnit::execute` over a small in-memory volume.
//! Input layout: byte 0 = CDB length (mod 33), then the CDB, then data-out.
#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sva_node::scsi::{LogicalUnit, LuConfig, NexusId, ScsiCommand, ScsiStatus, TaskAttr};
use sva_node::store::MemBackend;

fn lu() -> &'static LogicalUnit {
    static LU: OnceLock<LogicalUnit> = OnceLock::new();
    LU.get_or_init(|| LogicalUnit::new(LuConfig::new("fuzz"), Arc::new(MemBackend::new(256 * 512))))
}

fuzz_target!(|input: &[u8]| {
    let Some((&n, rest)) = input.split_first() else { return };
    let n = (n as usize % 33).min(rest.len());
    let (cdb, data) = rest.split_at(n);
    let nexus = NexusId { initiator_port: "iqn.fuzz,i,0x1".into(), relative_target_port: 1 };
    let cmd = ScsiCommand {
        lun: 0,
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::copy_from_slice(data),
        expected_transfer_len: data.len() as u32,
        task_attr: TaskAttr::Simple,
        tag: 0,
    };
    let r = lu().execute(&nexus, &cmd);
    assert_eq!(r.sense.is_some(), r.status == ScsiStatus::CheckCondition);
    let _ = sva_node::scsi::cdb::is_state_changing(cdb);
    let _ = sva_node::scsi::cdb::RwCdb::parse(cdb);
});
