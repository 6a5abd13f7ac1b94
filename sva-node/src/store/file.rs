//! File or block-device backend: positional I/O (`pread`/`pwrite`), sparse-aware.
//!
//! - `discard` punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), falling back to
//!   writing zeroes where the filesystem or device cannot punch.
//! - `mapping` asks the filesystem with `SEEK_DATA` / `SEEK_HOLE`.
//! - `try_read_at_cached` is `preadv2(RWF_NOWAIT)`: the kernel reads from the page cache
//!   or answers EAGAIN instead of waiting for the device (Linux ≥ 4.14).
//! - `write_is_cached` asks `cachestat(2)` (Linux ≥ 6.5) whether a page of the range is
//!   under writeback, which a buffered write would wait for; without `cachestat` it says yes
//!   (the caller's own slow-write back-off is then the only guard).
//! - `write_at_uncached` / `read_uncached` (resync copy-in / copy-out) go through a second
//!   descriptor opened with `O_DIRECT`: the device moves the data to or from the buffer
//!   itself, so the CPU neither copies a whole region through the page cache nor writes it
//!   back, and the read buffer is not zero-filled first. A read of a range wholly in the page
//!   cache (`cachestat`) copies it from there instead: a direct read would write it back and
//!   read it from the device. A direct write is copied first into a per-thread staging
//!   buffer backed by a transparent huge page (a [`HugeBuf`]: the device then gets one
//!   physically contiguous piece), unless it already lies in one (a resync copy received
//!   into one, [`hugebuf::holds`]); unaligned ranges, or a filesystem that refuses direct
//!   I/O, take the buffered path.
//! - `flush` is a group commit: concurrent callers share one `fdatasync`. A caller needs a
//!   sync that *started after* it called (earlier syncs may miss its writes); whoever finds
//!   no sync running starts one, the others wait on a condvar for it.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Condvar, Mutex};

use bytes::Bytes;

use super::hugebuf::{self, HugeBuf, HUGE_BYTES};
use super::{check_range, BlockBackend, Mapping};

/// Largest zero buffer written at once when punching holes is not supported.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Alignment of direct-I/O buffers, offsets and lengths: a page covers every logical block
/// size (512 B, 4 KiB) and the memory alignment any filesystem asks for (`STATX_DIOALIGN`).
const DIRECT_ALIGN: usize = 4096;
/// Page size for `cachestat` counts (x86-64, aarch64 4K kernels; a larger page only makes
/// `all_cached` answer no more often, which costs a direct read, never correctness).
const PAGE_BYTES: u64 = 4096;
thread_local! {
    /// This thread's staging buffer for `write_at_uncached` (taken on first use; the threads
    /// that write resync copies are the blocking pool's, few, and give it back when they exit).
    static STAGE: RefCell<Option<HugeBuf>> = const { RefCell::new(None) };
}

/// `cachestat(2)`'s number; since Linux 5.x new system calls have one number on every
/// architecture (the libc crate does not name it for x86_64 glibc yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` (include/uapi/linux/mman.h).
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` (include/uapi/linux/mman.h): page counts of the range.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Syncs started so far (including one in progress).
    started: u64,
    /// Highest sync index that has completed.
    done: u64,
    in_progress: bool,
    /// Highest sync index that failed (0 = none).
    failed: u64,
}

#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// The same file opened `O_DIRECT`, for `write_at_uncached` (None: could not be opened).
    direct: Option<File>,
    /// A direct write was refused (`EINVAL`: alignment or filesystem); not tried again.
    direct_unsupported: std::sync::atomic::AtomicBool,
    size: u64,
    sync: Mutex<SyncState>,
    synced: Condvar,
    /// Count of fdatasync calls actually made (for tests and metrics).
    syncs: std::sync::atomic::AtomicU64,
    /// `preadv2(RWF_NOWAIT)` was refused once; cached reads are not tried again.
    nowait_unsupported: std::sync::atomic::AtomicBool,
    /// `cachestat(2)` was refused once; not asked again.
    cachestat_unsupported: std::sync::atomic::AtomicBool,
}

impl FileBackend {
    /// Open `path`. A regular file shorter than `size_bytes` is extended (sparse) when
    /// `create` is set, else refused; `create` also creates a missing file. A block
    /// device must be at least `size_bytes`. `size_bytes == 0` means "use the actual size".
    pub fn open(path: &Path, size_bytes: u64, create: bool) -> io::Result<FileBackend> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        let meta = file.metadata()?;
        let actual = if meta.file_type().is_block_device() {
            // SAFETY: lseek on a valid fd owned by `file`; no memory is touched.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(io::Error::last_os_error());
            }
            end as u64
        } else {
            meta.len()
        };
        let size = if size_bytes == 0 { actual } else { size_bytes };
        if actual < size {
            if create && meta.is_file() {
                file.set_len(size)?;
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is {actual} bytes, need {size}", path.display()),
                ));
            }
        }
        let direct = open_direct(path, &meta);
        Ok(FileBackend {
            file,
            direct,
            direct_unsupported: std::sync::atomic::AtomicBool::new(false),
            size: size - size % 512,
            sync: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
            syncs: std::sync::atomic::AtomicU64::new(0),
            nowait_unsupported: std::sync::atomic::AtomicBool::new(false),
            cachestat_unsupported: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// How many fdatasync calls were made.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        match self.sync.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn write_zeroes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zero = vec![0u8; ZERO_CHUNK_BYTES.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zero.len() as u64) as usize;
            self.file.write_all_at(&zero[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// `cachestat(2)` of the range. `None`: the kernel has no `cachestat` (not asked again);
    /// `Some(Err)`: it failed for this range.
    fn cachestat(&self, offset: u64, len: u64) -> Option<Result<Cachestat, ()>> {
        if self
            .cachestat_unsupported
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return None;
        }
        let range = CachestatRange { off: offset, len };
        let mut cs = Cachestat::default();
        // SAFETY: cachestat(fd, range, cstat, flags) reads `range` and writes one `struct
        // cachestat` into `cs`; both are live, correctly laid out (#[repr(C)]) locals.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut cs as *mut Cachestat,
                0u32,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::EPERM)
            ) {
                self.cachestat_unsupported
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return None;
            }
            return Some(Err(()));
        }
        Some(Ok(cs))
    }

    /// Is every page of the range in the page cache (a buffered read costs no device I/O)?
    fn all_cached(&self, offset: u64, len: usize) -> bool {
        let pages = (len as u64).div_ceil(PAGE_BYTES);
        matches!(self.cachestat(offset, len as u64), Some(Ok(cs)) if cs.nr_cache >= pages && pages > 0)
    }

    /// The `O_DIRECT` descriptor, if direct I/O of this range may be tried.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&File> {
        let aligned =
            offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN);
        self.direct.as_ref().filter(|_| {
            aligned
                && !self
                    .direct_unsupported
                    .load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn direct_refused(&self) {
        tracing::info!(
            "direct I/O refused on this backing store; resync I/O goes through the page cache"
        );
        self.direct_unsupported
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Write `buf` (aligned offset and length) through the `O_DIRECT` descriptor, copied
    /// through this thread's staging [`HugeBuf`] (`HUGE_BYTES` at a time) unless it lies in
    /// one already. `Ok(false)`: direct I/O was refused; nothing is known about the range,
    /// rewrite it.
    fn write_direct(&self, direct: &File, buf: &[u8], offset: u64) -> io::Result<bool> {
        // Received straight into a huge buffer (a resync copy): one contiguous piece already.
        if hugebuf::holds(buf) && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
            return refused_is_false(direct.write_all_at(buf, offset));
        }
        STAGE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let stage = match slot.as_mut() {
                Some(stage) => stage,
                None => slot.insert(HugeBuf::take()?),
            };
            let mut done = 0usize;
            while done < buf.len() {
                let n = (buf.len() - done).min(HUGE_BYTES);
                let (Some(staged), Some(src)) =
                    (stage.as_mut_slice().get_mut(..n), buf.get(done..done + n))
                else {
                    return Ok(false);
                };
                staged.copy_from_slice(src);
                if !refused_is_false(direct.write_all_at(staged, offset + done as u64))? {
                    return Ok(false);
                }
                done += n;
            }
            Ok(true)
        })
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a valid fd; positional I/O elsewhere ignores the file position.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn try_read_at_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        check_range(self.size, offset, buf.len() as u64)?;
        if self
            .nowait_unsupported
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(false);
        }
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec describing `buf`, valid and exclusively borrowed for the call;
        // the fd is owned by `self.file`.
        let r = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(false),
                // Kernel or file without RWF_NOWAIT: stop trying.
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    self.nowait_unsupported
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    Ok(false)
                }
                _ => Err(e),
            };
        }
        // A short read means part of the range was not cached (or EOF, which the range
        // check rules out for regular files): let the blocking path do it all.
        Ok(r as usize == buf.len())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn read_uncached(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        check_range(self.size, offset, len as u64)?;
        // A region wholly in the page cache (recently written, e.g. dirty) is copied from
        // there: a direct read would first write it back and then read it from the device.
        if self.all_cached(offset, len) {
            if let Some(data) = read_fresh(&self.file, offset, len)? {
                return Ok(data);
            }
        } else if let Some(direct) = self.direct_for(offset, len) {
            if let Some(data) = read_fresh(direct, offset, len)? {
                return Ok(data);
            }
            self.direct_refused();
        }
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }

    fn write_at_uncached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        if let Some(direct) = self.direct_for(offset, buf.len()) {
            if self.write_direct(direct, buf, offset)? {
                return Ok(());
            }
            self.direct_refused();
        }
        self.write_at(buf, offset)
    }

    fn write_is_cached(&self, offset: u64, len: u64) -> bool {
        if check_range(self.size, offset, len).is_err() || len == 0 {
            return false;
        }
        match self.cachestat(offset, len) {
            // A page under writeback makes a buffered write to it wait for the device
            // (folio_wait_writeback / stable pages).
            Some(Ok(cs)) => cs.nr_writeback == 0,
            Some(Err(())) => false,
            None => true,
        }
    }

    fn flush(&self) -> io::Result<()> {
        let mut st = self.lock();
        // A sync already running may have started before our writes completed.
        let target = st.started + 1;
        while st.done < target {
            if st.in_progress {
                st = match self.synced.wait(st) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                continue;
            }
            st.in_progress = true;
            st.started += 1;
            let me = st.started;
            drop(st);
            let r = self.file.sync_data();
            self.syncs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            st = self.lock();
            st.in_progress = false;
            st.done = me;
            if r.is_err() {
                st.failed = me;
            }
            self.synced.notify_all();
        }
        if st.failed >= target {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid fd with in-range arguments; no memory is touched.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                self.write_zeroes(offset, len)
            }
            _ => Err(e),
        }
    }

    fn mapping(&self, offset: u64, len: u64) -> io::Result<(Mapping, u64)> {
        check_range(self.size, offset, len)?;
        let end = offset + len;
        let data = match self.seek(offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // No SEEK_DATA support (e.g. a block device): everything is mapped.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok((Mapping::Mapped, len)),
            Err(e) => return Err(e),
        };
        match data {
            None => Ok((Mapping::Deallocated, len)),
            Some(d) if d > offset => Ok((Mapping::Deallocated, d.min(end) - offset)),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(end);
                Ok((Mapping::Mapped, hole.min(end).max(offset + 1) - offset))
            }
        }
    }
}

/// Open `path` again with `O_DIRECT`, if the filesystem allows it and it is still the file
/// `meta` describes (not replaced in between).
fn open_direct(path: &Path, meta: &std::fs::Metadata) -> Option<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let m = f.metadata().ok()?;
    (m.dev() == meta.dev() && m.ino() == meta.ino()).then_some(f)
}

/// Read `len` bytes at `offset` from `file` into a fresh page-aligned buffer that is never
/// zero-filled: the kernel fills it. With the `O_DIRECT` descriptor, offset and length must be
/// aligned; `Ok(None)`: direct I/O was refused (`EINVAL`).
fn read_fresh(direct: &File, offset: u64, len: usize) -> io::Result<Option<Bytes>> {
    let mut v: Vec<u8> = Vec::with_capacity(len + DIRECT_ALIGN);
    let skew = v.as_ptr().align_offset(DIRECT_ALIGN);
    if skew >= DIRECT_ALIGN {
        return Ok(None);
    }
    // The slack before the aligned start is initialized (zeroed) like any Vec content; only
    // the data part is left for the kernel to fill.
    v.resize(skew, 0);
    let mut done = 0usize;
    while done < len {
        let want = len - done;
        let spare = v.spare_capacity_mut();
        if spare.len() < want {
            return Ok(None);
        }
        // SAFETY: `spare` is this Vec's unused capacity, at least `want` bytes (checked);
        // pread writes at most `want` bytes there and nothing else; the fd is owned by
        // `direct`, which outlives the call.
        let r = unsafe {
            libc::pread(
                direct.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                (offset + done as u64) as libc::off_t,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) => return Ok(None),
                _ => return Err(e),
            }
        }
        if r == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let n = (r as usize).min(want);
        // SAFETY: the kernel initialized these `n` bytes right past the current length,
        // within the capacity (n <= want <= spare.len()).
        unsafe { v.set_len(v.len() + n) };
        done += n;
    }
    Ok(Some(Bytes::from(v).slice(skew..)))
}

/// A direct write's `EINVAL` (misaligned for this device, or no direct I/O here) is a
/// refusal the caller falls back from, not a failure.
fn refused_is_false(r: io::Result<()>) -> io::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn concurrent_flushes_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(FileBackend::open(&dir.path().join("v"), 1 << 20, true).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let b = b.clone();
                std::thread::spawn(move || {
                    b.write_at(&[i as u8; 512], i * 512).unwrap();
                    b.flush().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every caller needs at least one sync; sharing means far fewer than 16.
        assert!(b.sync_count() >= 1);
        assert!(b.sync_count() <= 16);
    }

    #[test]
    fn cached_read_returns_page_cache_data() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(&dir.path().join("v"), 1 << 20, true).unwrap();
        b.write_at(&[0x5a; 4096], 8192).unwrap();
        // Just written: in the page cache, so the non-blocking read succeeds.
        let mut buf = [0u8; 4096];
        assert!(b.try_read_at_cached(&mut buf, 8192).unwrap());
        assert_eq!(buf, [0x5a; 4096]);
        assert!(
            b.try_read_at_cached(&mut buf, 1 << 20).is_err(),
            "range checked"
        );
    }

    #[test]
    fn write_is_cached_for_page_cache_writes_and_checks_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(&dir.path().join("v"), 1 << 20, true).unwrap();
        b.write_at(&[1; 4096], 0).unwrap();
        // Nothing is being written back (no sync, far from the dirty thresholds).
        assert!(b.write_is_cached(0, 4096));
        assert!(
            b.write_is_cached(8192, 4096),
            "a hole: still only a page-cache copy"
        );
        assert!(!b.write_is_cached(1 << 20, 4096), "out of range");
        assert!(!b.write_is_cached(0, 0));
    }

    /// Is `path` on tmpfs (which takes `O_DIRECT` but still caches)?
    fn on_tmpfs(path: &Path) -> bool {
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs reads the NUL-terminated path and fills the zeroed struct we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
        r == 0 && st.f_type == libc::TMPFS_MAGIC
    }

    #[test]
    fn uncached_writes_larger_than_the_stage_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(&dir.path().join("v"), 8 << 20, true).unwrap();
        // Two whole stages and a page: three direct writes from one staging buffer, each
        // refilled, so a stale stage would show as a repeated 2 MiB piece.
        let len = 2 * HUGE_BYTES + DIRECT_ALIGN;
        let data: Vec<u8> = (0..len)
            .map(|i| (i / 4096 % 251) as u8 ^ (i as u8))
            .collect();
        b.write_at_uncached(&data, 1 << 20).unwrap();
        b.flush().unwrap();
        let mut got = vec![0u8; len];
        b.read_at(&mut got, 1 << 20).unwrap();
        assert!(got == data, "a write spanning three stages reads back");
    }

    #[test]
    fn uncached_writes_from_a_huge_buffer_land_without_staging() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(&dir.path().join("v"), 4 << 20, true).unwrap();
        let mut hb = HugeBuf::take().unwrap();
        let data = &mut hb.as_mut_slice()[DIRECT_ALIGN..DIRECT_ALIGN + (1 << 20)];
        for (i, x) in data.iter_mut().enumerate() {
            *x = (i % 241) as u8;
        }
        let data = &hb.as_slice()[DIRECT_ALIGN..DIRECT_ALIGN + (1 << 20)];
        assert!(hugebuf::holds(data));
        b.write_at_uncached(data, 2 << 20).unwrap();
        b.flush().unwrap();
        let mut got = vec![0u8; 1 << 20];
        b.read_at(&mut got, 2 << 20).unwrap();
        assert!(
            got[..] == data[..],
            "a write straight from a huge buffer reads back"
        );
    }

    #[test]
    fn uncached_writes_round_trip_past_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBackend::open(&dir.path().join("v"), 4 << 20, true).unwrap();
        // A dirty buffered write first: the direct write must replace it, not be shadowed.
        b.write_at(&[1; 8192], 1 << 20).unwrap();
        let data: Vec<u8> = (0..(1usize << 20) + 1).map(|i| (i % 253) as u8).collect();
        // Unaligned in memory, then page-aligned: both are staged, both land.
        let unaligned = &data[1..];
        b.write_at_uncached(unaligned, 1 << 20).unwrap();
        let mut page = vec![0u8; 2 * DIRECT_ALIGN];
        let skew = page.as_ptr().align_offset(DIRECT_ALIGN);
        page[skew..skew + DIRECT_ALIGN].fill(9);
        b.write_at_uncached(&page[skew..skew + DIRECT_ALIGN], 3 << 20)
            .unwrap();
        // An unaligned range takes the buffered path and still lands.
        b.write_at_uncached(&[5; 512], (3 << 20) + 8192 + 512)
            .unwrap();
        b.flush().unwrap();

        if b.direct.is_some() && !on_tmpfs(dir.path()) {
            // Written past the cache: a non-blocking (cache-only) read cannot serve it.
            let mut probe = vec![0u8; 4096];
            assert!(!b.try_read_at_cached(&mut probe, 1 << 20).unwrap());
        }
        let mut got = vec![0u8; 1 << 20];
        b.read_at(&mut got, 1 << 20).unwrap();
        assert!(got == unaligned, "uncached region reads back");
        let mut got = vec![0u8; 8192 + 1024];
        b.read_at(&mut got, 3 << 20).unwrap();
        assert!(got[..4096].iter().all(|&x| x == 9));
        assert!(got[4096..8192 + 512].iter().all(|&x| x == 0));
        assert!(got[8192 + 512..].iter().all(|&x| x == 5));
        assert!(
            b.write_at_uncached(&[0; 4096], 4 << 20).is_err(),
            "range checked"
        );

        // Uncached reads see all of it, whatever path they take, and are range checked.
        b.write_at(&[3; 4096], 2 << 20).unwrap(); // dirty in the page cache, not flushed
        assert!(b.read_uncached(1 << 20, 1 << 20).unwrap() == unaligned);
        let r = b.read_uncached(2 << 20, 8192).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 3) && r[4096..].iter().all(|&x| x == 0));
        let r = b.read_uncached((3 << 20) + 8192, 1024).unwrap();
        assert!(r[..512].iter().all(|&x| x == 0) && r[512..].iter().all(|&x| x == 5));
        assert!(b.read_uncached((4 << 20) - 4096, 8192).is_err());

        // A range wholly in the page cache is copied from there: its dirty pages are not
        // written back first (as a direct read would).
        let at = (2 << 20) + 65536;
        b.write_at(&[4; 8192], at).unwrap();
        assert!(b.read_uncached(at, 8192).unwrap().iter().all(|&x| x == 4));
        if let Some(Ok(cs)) = b.cachestat(at, 8192) {
            assert_eq!(cs.nr_dirty, 2, "read from the cache, not past it");
        }
    }

    #[test]
    fn refuses_short_file_without_create() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        std::fs::write(&p, [0u8; 512]).unwrap();
        assert!(FileBackend::open(&p, 4096, false).is_err());
        assert_eq!(FileBackend::open(&p, 0, false).unwrap().size_bytes(), 512);
    }
}
