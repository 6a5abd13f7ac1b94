//! TEST DOUBLE: an in-memory [`ScsiTarget`] with just enough SCSI (INQUIRY, TEST UNIT
//! READY, READ CAPACITY 10/16, READ/WRITE 10/16, REPORT LUNS, SYNCHRONIZE CACHE) to drive
//! the iSCSI transport in tests and with iscsi-inq / iscsi-ls / qemu-io. It is not the
//! product's logical unit (`scsi::lu`); it exists so the transport can be tested alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;

use crate::scsi::{
    NexusId, ScsiCommand, ScsiError, ScsiResponse, ScsiTarget, TaskManagement, TmfResponse,
};

const BLOCK: u64 = 512;

/// In-memory LU 0 of `blocks` 512-byte blocks.
#[derive(Debug)]
pub struct MemTarget {
    data: Mutex<Vec<u8>>,
    blocks: u64,
    /// Commands executed so far (tests assert on it).
    pub executed: AtomicUsize,
    /// Nexus add/remove notifications, in order (`+name` / `-name`).
    pub nexus_log: Mutex<Vec<String>>,
    /// Delay each command by this long (to keep tasks in flight for TMF tests).
    pub delay: Mutex<Option<std::time::Duration>>,
}

impl MemTarget {
    pub fn new(blocks: u64) -> Arc<MemTarget> {
        Arc::new(MemTarget {
            data: Mutex::new(vec![0; (blocks * BLOCK) as usize]),
            blocks,
            executed: AtomicUsize::new(0),
            nexus_log: Mutex::new(Vec::new()),
            delay: Mutex::new(None),
        })
    }

    fn run(&self, cmd: &ScsiCommand) -> Result<ScsiResponse, ScsiError> {
        let cdb = &cmd.cdb[..];
        let op = *cdb.first().ok_or_else(ScsiError::invalid_opcode)?;
        let be = |r: std::ops::Range<usize>| {
            cdb.get(r)
                .map(|b| b.iter().fold(0u64, |a, x| (a << 8) | u64::from(*x)))
                .unwrap_or(0)
        };
        let data_in = |b: Bytes, alloc: u64| ScsiResponse {
            data_in: b.slice(..b.len().min(alloc as usize)),
            ..ScsiResponse::good()
        };
        match op {
            0x00 | 0x35 | 0x91 => Ok(ScsiResponse::good()),
            0x12 => {
                let mut b = BytesMut::new();
                if be(1..2) & 1 == 1 {
                    // VPD page 0x00: supported pages (only itself).
                    b.put_slice(&[0, 0, 0, 1, 0]);
                } else {
                    b.put_slice(&[0x00, 0x00, 0x06, 0x02, 31, 0, 0, 0x02]);
                    b.put_slice(b"SVA-TEST");
                    b.put_slice(b"MemTarget       ");
                    b.put_slice(b"0001");
                }
                Ok(data_in(b.freeze(), be(3..5)))
            }
            0x25 => {
                let mut b = BytesMut::new();
                b.put_u32((self.blocks - 1).min(u64::from(u32::MAX)) as u32);
                b.put_u32(BLOCK as u32);
                Ok(data_in(b.freeze(), 8))
            }
            0x9e if be(1..2) & 0x1f == 0x10 => {
                let mut b = BytesMut::new();
                b.put_u64(self.blocks - 1);
                b.put_u32(BLOCK as u32);
                b.put_bytes(0, 20);
                Ok(data_in(b.freeze(), be(10..14)))
            }
            0xa0 => {
                let mut b = BytesMut::new();
                b.put_u32(8);
                b.put_u32(0);
                b.put_u64(0);
                Ok(data_in(b.freeze(), be(6..10)))
            }
            0x28 | 0x88 | 0x2a | 0x8a => {
                let (lba, n) = if op == 0x28 || op == 0x2a {
                    (be(2..6), be(7..9))
                } else {
                    (be(2..10), be(10..14))
                };
                if lba + n > self.blocks {
                    return Err(ScsiError::lba_out_of_range());
                }
                let (off, len) = ((lba * BLOCK) as usize, (n * BLOCK) as usize);
                let mut d = self.data.lock().map_err(|_| ScsiError::Busy)?;
                if op == 0x28 || op == 0x88 {
                    Ok(data_in(
                        Bytes::copy_from_slice(&d[off..off + len]),
                        u64::MAX,
                    ))
                } else {
                    let take = len.min(cmd.data_out.len());
                    d[off..off + take].copy_from_slice(&cmd.data_out[..take]);
                    Ok(ScsiResponse {
                        data_out_len: Some(len as u32),
                        ..ScsiResponse::good()
                    })
                }
            }
            _ => Err(ScsiError::invalid_opcode()),
        }
    }
}

impl ScsiTarget for MemTarget {
    fn execute(&self, _nexus: NexusId, cmd: ScsiCommand) -> BoxFuture<'static, ScsiResponse> {
        self.executed.fetch_add(1, Ordering::Relaxed);
        let r = self.run(&cmd).unwrap_or_else(|e| e.to_response());
        let delay = self.delay.lock().ok().and_then(|d| *d);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            r
        })
    }
    fn task_management(
        &self,
        _nexus: NexusId,
        _lun: u64,
        _tmf: TaskManagement,
    ) -> BoxFuture<'static, TmfResponse> {
        Box::pin(async { TmfResponse::Complete })
    }
    fn nexus_added(&self, nexus: NexusId) {
        if let Ok(mut l) = self.nexus_log.lock() {
            l.push(format!("+{}", nexus.initiator_port));
        }
    }
    fn nexus_removed(&self, nexus: NexusId) {
        if let Ok(mut l) = self.nexus_log.lock() {
            l.push(format!("-{}", nexus.initiator_port));
        }
    }
}
