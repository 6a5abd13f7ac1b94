//! In-memory backend for tests and the fuzz target. Sparse: only written 512-byte
//! sectors take memory, and discarded sectors become holes again, so `mapping` is exact.

use std::collections::HashMap;
use std::io;
use std::sync::RwLock;

use super::{check_range, BlockBackend, Mapping};

/// Granularity of hole tracking.
const SECTOR_BYTES: u64 = 512;

#[derive(Debug)]
pub struct MemBackend {
    size: u64,
    sectors: RwLock<HashMap<u64, Box<[u8; SECTOR_BYTES as usize]>>>,
}

impl MemBackend {
    /// `size_bytes` is rounded down to a multiple of 512.
    pub fn new(size_bytes: u64) -> Self {
        MemBackend {
            size: size_bytes - size_bytes % SECTOR_BYTES,
            sectors: RwLock::new(HashMap::new()),
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if !offset.is_multiple_of(SECTOR_BYTES) || !len.is_multiple_of(SECTOR_BYTES) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unaligned access to MemBackend",
            ));
        }
        Ok(())
    }
}

impl BlockBackend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let map = self
            .sectors
            .read()
            .map_err(|_| io::Error::other("poisoned"))?;
        for (i, chunk) in buf.chunks_mut(SECTOR_BYTES as usize).enumerate() {
            match map.get(&(offset / SECTOR_BYTES + i as u64)) {
                Some(s) => chunk.copy_from_slice(&s[..chunk.len()]),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut map = self
            .sectors
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        for (i, chunk) in buf.chunks(SECTOR_BYTES as usize).enumerate() {
            let mut s = Box::new([0u8; SECTOR_BYTES as usize]);
            s[..chunk.len()].copy_from_slice(chunk);
            map.insert(offset / SECTOR_BYTES + i as u64, s);
        }
        Ok(())
    }

    fn write_is_cached(&self, _offset: u64, _len: u64) -> bool {
        // Memory only: a write never waits for a device.
        true
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let mut map = self
            .sectors
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        for s in offset / SECTOR_BYTES..(offset + len) / SECTOR_BYTES {
            map.remove(&s);
        }
        Ok(())
    }

    fn mapping(&self, offset: u64, len: u64) -> io::Result<(Mapping, u64)> {
        self.check(offset, len)?;
        let map = self
            .sectors
            .read()
            .map_err(|_| io::Error::other("poisoned"))?;
        let state = |s: u64| {
            if map.contains_key(&s) {
                Mapping::Mapped
            } else {
                Mapping::Deallocated
            }
        };
        let first = offset / SECTOR_BYTES;
        let end = (offset + len) / SECTOR_BYTES;
        let m = state(first);
        let mut s = first;
        while s < end && state(s) == m {
            s += 1;
        }
        Ok((m, (s - first) * SECTOR_BYTES))
    }
}
