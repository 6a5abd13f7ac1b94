//! Block storage under a logical unit.
//!
//! [`BlockBackend`] is the one interface the SCSI layer uses to reach the disk. Byte
//! offsets and lengths are always multiples of the block size the LU uses (512 B).
//! Implementations: a file or block device, in memory, and a fault-injecting wrapper.

use std::io;

use bytes::Bytes;

/// Whether a byte range holds data or is a hole (reads back as zeroes, no space used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    Mapped,
    Deallocated,
}

/// Synchronous block I/O. Methods take `&self`: one backend serves many concurrent tasks.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes.
    fn size_bytes(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Read only if that cannot block, i.e. the whole range is in memory (the page cache).
    /// `Ok(true)`: `buf` holds the data, as from [`BlockBackend::read_at`]. `Ok(false)`: it
    /// would have waited for the device (or the backend cannot tell); `buf` is unspecified
    /// and the caller uses `read_at` where blocking is fine. Lets an async caller serve
    /// cached reads on its own thread instead of handing them to a blocking pool.
    fn try_read_at_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let _ = (buf, offset);
        Ok(false)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Read `len` bytes at `offset` into a new buffer, for a bulk transfer that will not be
    /// read again soon (a resync copy-out). Where the backend can, it reads past its cache
    /// and without zero-filling the buffer first. Default: `read_at` into a zeroed buffer.
    fn read_uncached(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }
    /// Whether a [`BlockBackend::write_at`] of whole pages in this range is expected to
    /// finish without waiting for the device: it only copies into a cache, and no page of
    /// the range is being written back right now (a write to such a page waits for that
    /// I/O). A hint, not a guarantee; `true` lets an async caller run a small write-back
    /// write on its own thread. Default `false`: the caller uses a blocking thread.
    fn write_is_cached(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// [`BlockBackend::write_at`] for a large buffer the caller makes durable right after
    /// and does not expect to read back soon (a resync copy-in). Where the backend can, it
    /// bypasses its cache: copying a whole region into the page cache and writing it back
    /// costs more CPU than the device write itself. Durability still needs
    /// [`BlockBackend::flush`]. Default: `write_at`.
    fn write_at_uncached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Make every completed write durable (fdatasync; concurrent callers share one sync).
    fn flush(&self) -> io::Result<()>;
    /// Deallocate a range; it reads back as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Mapping of the range starting at `offset`: the state there and how many bytes from
    /// `offset` (at most `len`) share it.
    fn mapping(&self, offset: u64, len: u64) -> io::Result<(Mapping, u64)>;
}

pub mod fault;
pub mod file;
pub mod hugebuf;
pub mod mem;
pub mod region;

#[cfg(test)]
mod conformance;

pub use fault::FaultBackend;
pub use file::FileBackend;
pub use mem::MemBackend;

/// Range check shared by the backends: `offset + len` must lie within `size`.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} beyond device size {size}"),
        )),
    }
}
