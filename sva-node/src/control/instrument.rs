//! [`InstrumentedTarget`]: a [`ScsiTarget`] decorator that records I/O metrics.
//!
//! ```text
//!  iscsi ──ScsiCommand──> InstrumentedTarget ──> inner ScsiTarget (LocalTarget or mirror)
//!                              │ count, bytes, status, latency
//!                              └──> Arc<Metrics>
//! ```
//!
//! It wraps whatever target the transport would otherwise call, so the SCSI and mirror layers
//! stay free of metrics code. Latency is measured from hand-over to response, which is what
//! the initiator sees minus the network.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::future::BoxFuture;

use super::metrics::{Metrics, OpClass};
use crate::scsi::{NexusId, ScsiCommand, ScsiResponse, ScsiTarget, TaskManagement, TmfResponse};

/// Decorates a [`ScsiTarget`] with metrics. Hand this to the iSCSI layer instead of `inner`.
pub struct InstrumentedTarget {
    inner: Arc<dyn ScsiTarget>,
    metrics: Arc<Metrics>,
    /// Live nexuses, so the sessions gauge counts each once even if the transport reports
    /// an add or a remove twice (session reinstatement, a race between logout and loss).
    /// Bounded by the transport's session limit; touched only at login and logout.
    live: Mutex<HashSet<NexusId>>,
}

impl InstrumentedTarget {
    pub fn new(inner: Arc<dyn ScsiTarget>, metrics: Arc<Metrics>) -> Self {
        InstrumentedTarget {
            inner,
            metrics,
            live: Mutex::new(HashSet::new()),
        }
    }
}

impl ScsiTarget for InstrumentedTarget {
    fn execute(&self, nexus: NexusId, cmd: ScsiCommand) -> BoxFuture<'static, ScsiResponse> {
        let class = OpClass::of_cdb(&cmd.cdb);
        let data_out = cmd.data_out.len() as u64;
        let edtl = u64::from(cmd.expected_transfer_len);
        let metrics = self.metrics.clone();
        let start = Instant::now();
        let fut = self.inner.execute(nexus, cmd);
        Box::pin(async move {
            let resp = fut.await;
            // The transport truncates data-in to EDTL (ScsiResponse::data_in), so count only
            // what goes on the wire.
            let data_in = (resp.data_in.len() as u64).min(edtl);
            metrics.record_command(class, data_out + data_in, resp.status, start.elapsed());
            resp
        })
    }

    fn task_management(
        &self,
        nexus: NexusId,
        lun: u64,
        tmf: TaskManagement,
    ) -> BoxFuture<'static, TmfResponse> {
        self.inner.task_management(nexus, lun, tmf)
    }

    fn nexus_added(&self, nexus: NexusId) {
        let new = self
            .live
            .lock()
            .map(|mut l| l.insert(nexus.clone()))
            .unwrap_or(false);
        if new {
            self.metrics.session_opened();
        }
        self.inner.nexus_added(nexus);
    }

    fn nexus_removed(&self, nexus: NexusId) {
        let was_live = self
            .live
            .lock()
            .map(|mut l| l.remove(&nexus))
            .unwrap_or(false);
        if was_live {
            self.metrics.session_closed();
        }
        self.inner.nexus_removed(nexus);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::scsi::{ScsiStatus, TaskAttr};

    /// Answers READ with `len` bytes of data-in, WRITE with GOOD, anything else with
    /// CHECK CONDITION; records what it was called with.
    #[derive(Default)]
    struct FakeTarget {
        calls: Mutex<Vec<String>>,
    }

    impl ScsiTarget for FakeTarget {
        fn execute(&self, _n: NexusId, cmd: ScsiCommand) -> BoxFuture<'static, ScsiResponse> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("exec {:#x}", cmd.cdb[0]));
            let mut r = ScsiResponse::good();
            match cmd.cdb[0] {
                0x28 => r.data_in = Bytes::from(vec![0u8; 8192]),
                0x2a => {}
                _ => r.status = ScsiStatus::CheckCondition,
            }
            Box::pin(async move { r })
        }
        fn task_management(
            &self,
            _n: NexusId,
            lun: u64,
            tmf: TaskManagement,
        ) -> BoxFuture<'static, TmfResponse> {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("tmf {lun} {tmf:?}"));
            Box::pin(async { TmfResponse::TaskDoesNotExist })
        }
        fn nexus_added(&self, n: NexusId) {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("add {}", n.initiator_port));
        }
        fn nexus_removed(&self, n: NexusId) {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("remove {}", n.initiator_port));
        }
    }

    fn cmd(op: u8, data_out: usize, edtl: u32) -> ScsiCommand {
        let mut cdb = vec![0u8; 16];
        cdb[0] = op;
        ScsiCommand {
            lun: 0,
            cdb: Bytes::from(cdb),
            data_out: Bytes::from(vec![0xa5; data_out]),
            expected_transfer_len: edtl,
            task_attr: TaskAttr::Simple,
            tag: 1,
        }
    }

    #[tokio::test]
    async fn counts_reads_writes_errors_and_sessions() {
        let fake = Arc::new(FakeTarget::default());
        let metrics = Arc::new(Metrics::new());
        let t = InstrumentedTarget::new(fake.clone(), metrics.clone());
        let nexus = NexusId {
            initiator_port: "iqn.x,i,0x1".into(),
            relative_target_port: 1,
        };

        let other_nexus = NexusId {
            initiator_port: "iqn.x,i,0x1".into(),
            relative_target_port: 2,
        };
        t.nexus_added(nexus.clone());
        t.nexus_added(nexus.clone());
        assert_eq!(
            metrics.sessions(),
            1,
            "a nexus reported twice is one session"
        );
        t.nexus_added(other_nexus.clone());
        assert_eq!(
            metrics.sessions(),
            2,
            "another target port is another nexus"
        );
        t.nexus_removed(other_nexus.clone());
        t.nexus_removed(other_nexus.clone());
        assert_eq!(metrics.sessions(), 1);
        // READ (10) asking for 4 KiB: the LU produced 8 KiB, only 4 KiB reach the wire.
        let r = t.execute(nexus.clone(), cmd(0x28, 0, 4096)).await;
        assert_eq!(r.status, ScsiStatus::Good);
        assert_eq!(
            r.data_in.len(),
            8192,
            "the response is passed through untouched"
        );
        let r = t.execute(nexus.clone(), cmd(0x2a, 512, 512)).await;
        assert_eq!(r.status, ScsiStatus::Good);
        let r = t.execute(nexus.clone(), cmd(0x12, 0, 96)).await;
        assert_eq!(r.status, ScsiStatus::CheckCondition);
        let tmf = t
            .task_management(nexus.clone(), 0, TaskManagement::AbortTask { tag: 9 })
            .await;
        assert_eq!(tmf, TmfResponse::TaskDoesNotExist);
        t.nexus_removed(nexus.clone());
        assert_eq!(metrics.sessions(), 0);

        let read = metrics.counters(OpClass::Read);
        let write = metrics.counters(OpClass::Write);
        let other = metrics.counters(OpClass::Other);
        assert_eq!((read.commands, read.bytes, read.errors), (1, 4096, 0));
        assert_eq!((write.commands, write.bytes, write.errors), (1, 512, 0));
        assert_eq!((other.commands, other.bytes, other.errors), (1, 0, 1));
        let text = metrics.render();
        assert!(text.contains("sva_io_latency_seconds_count{op=\"read\"} 1\n"));
        assert!(text.contains("sva_io_latency_seconds_count{op=\"write\"} 1\n"));

        let calls = fake.calls.lock().expect("lock").clone();
        assert_eq!(
            calls,
            [
                "add iqn.x,i,0x1",
                "add iqn.x,i,0x1",
                "add iqn.x,i,0x1",
                "remove iqn.x,i,0x1",
                "remove iqn.x,i,0x1",
                "exec 0x28",
                "exec 0x2a",
                "exec 0x12",
                "tmf 0 AbortTask { tag: 9 }",
                "remove iqn.x,i,0x1",
            ]
        );
    }
}
