//! Reused 2 MiB buffers, each aligned to 2 MiB in its own anonymous mapping that the kernel
//! is asked to back with one transparent huge page (`MADV_HUGEPAGE`).
//!
//! Why: a resync copy (1 MiB by default) is received from the replication link and written
//! with `O_DIRECT`. Received into fresh heap memory it costs twice more than the copy itself:
//! glibc hands freed buffers back to the kernel and faults them in again (with THP `always`,
//! a huge-page clear per copy: 9.5% of all CPU samples during a full resync on the test VM,
//! 2026-12-07), and the scattered 4 KiB pages must be copied into a contiguous stage before
//! the direct write (the block layer splits a 256-page buffer at the device's segment limit).
//! A copy received straight into one of these buffers needs neither: the pool keeps the
//! pages mapped, and [`holds`] tells the writer that the data already lies in one buffer.
//!
//! Buffers go back to the pool when dropped; at most [`POOL_MAX`] are kept (the rest are
//! unmapped). Without huge pages (THP off) they are still reused aligned buffers.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Bytes of one buffer: one x86-64 / aarch64-4K transparent huge page.
pub const HUGE_BYTES: usize = 2 << 20;
/// Buffers kept for reuse: a resync window (16) on each of a few links, and the staging
/// buffers of the threads that write copies.
pub const POOL_MAX: usize = 32;

/// Free buffers (their addresses) and every live buffer's address, for [`holds`].
struct Pool {
    free: Vec<usize>,
    live: BTreeSet<usize>,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    live: BTreeSet::new(),
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // The pool holds plain addresses: a panic while holding it leaves them consistent.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// One buffer of [`HUGE_BYTES`], 2 MiB-aligned; returned to the pool when dropped.
pub struct HugeBuf {
    buf: *mut u8,
}

// SAFETY: the buffer is plain memory owned by this value alone (no thread affinity).
unsafe impl Send for HugeBuf {}
// SAFETY: `&HugeBuf` only gives out `&[u8]`; mutation needs `&mut`.
unsafe impl Sync for HugeBuf {}

impl HugeBuf {
    /// A buffer from the pool, or a new mapping. Its contents are unspecified.
    pub fn take() -> std::io::Result<HugeBuf> {
        if let Some(addr) = pool().free.pop() {
            return Ok(HugeBuf {
                buf: addr as *mut u8,
            });
        }
        let buf = map_aligned()?;
        pool().live.insert(buf as usize);
        Ok(HugeBuf { buf })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: buf..buf+HUGE_BYTES is mapped read-write for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.buf, HUGE_BYTES) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.buf, HUGE_BYTES) }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        let addr = self.buf as usize;
        let mut p = pool();
        if p.free.len() < POOL_MAX {
            p.free.push(addr);
            return;
        }
        p.live.remove(&addr);
        drop(p);
        // SAFETY: unmaps exactly the aligned range `map_aligned` kept mapped; it is no
        // longer reachable (not live, not free).
        unsafe { libc::munmap(self.buf.cast(), HUGE_BYTES) };
    }
}

/// Whether `data` lies wholly inside one live [`HugeBuf`] (then it is physically contiguous
/// if the kernel granted the huge page, and needs no staging for a direct write).
pub fn holds(data: &[u8]) -> bool {
    let start = data.as_ptr() as usize;
    let base = start & !(HUGE_BYTES - 1);
    start + data.len() <= base + HUGE_BYTES && pool().live.contains(&base)
}

/// A fresh `HUGE_BYTES` mapping aligned to `HUGE_BYTES`, advised to be one huge page.
fn map_aligned() -> std::io::Result<*mut u8> {
    // Twice the size, then unmap the unaligned head and tail.
    let len = 2 * HUGE_BYTES;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = map as usize;
    let aligned = (start + HUGE_BYTES - 1) & !(HUGE_BYTES - 1);
    let head = aligned - start;
    let tail = len - head - HUGE_BYTES;
    // SAFETY: both ranges lie inside the mapping just made and outside the kept one.
    unsafe {
        if head > 0 {
            libc::munmap(map, head);
        }
        if tail > 0 {
            libc::munmap((aligned + HUGE_BYTES) as *mut libc::c_void, tail);
        }
        // Failure (THP off or unsupported) only means small pages: still correct.
        libc::madvise(
            aligned as *mut libc::c_void,
            HUGE_BYTES,
            libc::MADV_HUGEPAGE,
        );
    }
    Ok(aligned as *mut u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_recognised() {
        let mut a = HugeBuf::take().expect("map");
        assert_eq!(a.as_slice().as_ptr() as usize % HUGE_BYTES, 0);
        a.as_mut_slice()[HUGE_BYTES - 1] = 7;
        let inside = &a.as_slice()[4096..4096 + (1 << 20)];
        assert!(holds(inside));
        assert!(holds(a.as_slice()));
        let heap = vec![0u8; 1 << 20];
        assert!(!holds(&heap), "heap memory is not a huge buffer");
        let addr = a.as_slice().as_ptr() as usize;
        drop(a);
        // Other tests may take buffers concurrently: ours is in the pool or reused.
        let b = HugeBuf::take().expect("map");
        let reused = b.as_slice().as_ptr() as usize == addr || pool().free.contains(&addr);
        assert!(reused, "a dropped buffer goes back to the pool");
    }
}
