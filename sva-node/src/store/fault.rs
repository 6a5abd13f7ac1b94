//! Fault-injecting wrapper for tests: fails chosen operations with EIO, on chosen byte
//! ranges or after a number of successful operations.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{BlockBackend, Mapping};

/// Which operations a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultOps {
    pub read: bool,
    pub write: bool,
    pub flush: bool,
    pub discard: bool,
}

impl FaultOps {
    pub const ALL: FaultOps = FaultOps {
        read: true,
        write: true,
        flush: true,
        discard: true,
    };
    pub const READ: FaultOps = FaultOps {
        read: true,
        write: false,
        flush: false,
        discard: false,
    };
    pub const WRITE: FaultOps = FaultOps {
        read: false,
        write: true,
        flush: false,
        discard: false,
    };
}

#[derive(Debug, Clone)]
enum Fault {
    /// Fail `ops` touching `[offset, offset+len)`.
    Range {
        offset: u64,
        len: u64,
        ops: FaultOps,
    },
    /// Fail every `ops` operation once `n` operations (of any kind) have succeeded.
    After { n: u64, ops: FaultOps },
}

/// Wraps any backend; with no faults configured it is transparent.
pub struct FaultBackend {
    inner: Arc<dyn BlockBackend>,
    faults: Mutex<Vec<Fault>>,
    ops_done: AtomicU64,
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn BlockBackend>) -> Self {
        FaultBackend {
            inner,
            faults: Mutex::new(Vec::new()),
            ops_done: AtomicU64::new(0),
        }
    }

    /// Fail `ops` that overlap the byte range with EIO.
    pub fn fail_range(&self, offset: u64, len: u64, ops: FaultOps) {
        self.lock().push(Fault::Range { offset, len, ops });
    }

    /// Fail `ops` after `n` more successful operations.
    pub fn fail_after(&self, n: u64, ops: FaultOps) {
        let n = self.ops_done.load(Ordering::SeqCst) + n;
        self.lock().push(Fault::After { n, ops });
    }

    /// Remove every fault.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        match self.faults.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> io::Result<()> {
        let applies = |o: &FaultOps| match op {
            Op::Read => o.read,
            Op::Write => o.write,
            Op::Flush => o.flush,
            Op::Discard => o.discard,
        };
        let done = self.ops_done.load(Ordering::SeqCst);
        let hit = self.lock().iter().any(|f| match f {
            Fault::Range {
                offset: fo,
                len: fl,
                ops,
            } => {
                applies(ops)
                    && (matches!(op, Op::Flush)
                        || (offset < fo.saturating_add(*fl) && *fo < offset.saturating_add(len)))
            }
            Fault::After { n, ops } => applies(ops) && done >= *n,
        });
        if hit {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.ops_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl BlockBackend for FaultBackend {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(Op::Write, offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn read_uncached(&self, offset: u64, len: usize) -> io::Result<bytes::Bytes> {
        self.check(Op::Read, offset, len as u64)?;
        self.inner.read_uncached(offset, len)
    }
    fn write_at_uncached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(Op::Write, offset, buf.len() as u64)?;
        self.inner.write_at_uncached(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.check(Op::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(Op::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn mapping(&self, offset: u64, len: u64) -> io::Result<(Mapping, u64)> {
        self.inner.mapping(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemBackend;

    #[test]
    fn range_and_after_faults() {
        let f = FaultBackend::new(Arc::new(MemBackend::new(1 << 20)));
        let mut buf = [0u8; 512];
        f.fail_range(4096, 512, FaultOps::READ);
        assert!(f.read_at(&mut buf, 4096).is_err());
        assert!(f.read_at(&mut buf, 0).is_ok());
        assert!(f.write_at(&buf, 4096).is_ok());
        f.clear();
        f.fail_after(2, FaultOps::WRITE);
        assert!(f.write_at(&buf, 0).is_ok());
        assert!(f.write_at(&buf, 0).is_ok());
        let e = f.write_at(&buf, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(f.read_at(&mut buf, 0).is_ok());
    }
}
