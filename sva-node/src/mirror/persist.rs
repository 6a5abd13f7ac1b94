//! The driver's persistent resync state (DESIGN.md §6): one write-intent bitmap per stale plex
//! ([`RegionBitmap`], `stateDir/bitmap-<plex>`) and one activity log per node
//! ([`ActivityLog`], `stateDir/activity-log`).
//!
//! ```text
//!  file = page 0 (header) | page 1 | page 2 | ...          every page is PAGE_BYTES (4096)
//!  page = payload (4088 bytes) | crc32c(page index u64 LE ‖ payload) u32 LE | 0u32
//!  header payload = magic[8] | version u32 | flags u32 | region_bytes u64 | count u64 | 0…
//!  bitmap body   = bit r of the volume's regions at page 1 + r / 32704, LSB first
//!  activity body = slots of u64 LE (region + 1; 0 = empty), 511 per page
//! ```
//!
//! Durability: a page is rewritten in place and `fdatasync`ed before the data write it guards
//! (`mark_durable`, `ensure`). A crash during that write can tear the page; its checksum then
//! fails and the loader distrusts the whole file, answering with *every* region (a full resync
//! is always safe, a missed region never is). A distrusted file is rewritten at once to say so
//! durably (a bitmap with every bit set, an activity log with the `FULL` flag), so a second
//! crash cannot forget it. Files are created through a temporary file, `fsync` and `rename`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of every page of a state file.
pub const PAGE_BYTES: usize = 4096;
/// Payload of a page (the rest is its checksum trailer).
pub const PAGE_PAYLOAD_BYTES: usize = PAGE_BYTES - 8;
/// Regions per bitmap page.
pub const BITMAP_REGIONS_PER_PAGE: u64 = (PAGE_PAYLOAD_BYTES * 8) as u64;
/// Activity-log slots per page.
pub const AL_SLOTS_PER_PAGE: usize = PAGE_PAYLOAD_BYTES / 8;
/// Default activity-log capacity (`mirror.activityLogRegions`).
pub const AL_REGIONS_DEFAULT: usize = 1024;
/// Regions after a copied one that its activity-log write logs too (see
/// [`ActivityLog::ensure_copy`]).
pub const COPY_LOG_AHEAD_REGIONS: u64 = 32;
/// Largest volume a bitmap describes: 2^32 regions (4 PiB at 1 MiB regions, 512 MiB of
/// bitmap). Beyond, refuse rather than allocate without bound.
pub const BITMAP_REGIONS_MAX: u64 = 1 << 32;

const BITMAP_MAGIC: &[u8; 8] = b"SVABMAP\x01";
const AL_MAGIC: &[u8; 8] = b"SVAACTL\x01";
const VERSION: u32 = 1;
/// Activity-log header flag: the log stands for every region (it was found corrupt and not
/// yet absorbed).
const AL_FLAG_FULL: u32 = 1;
/// Bitmap header flag: every region was set at once since the file was created (a full
/// resync's fill): regions clear now were copied by this node as the source, so after a
/// restart it may resume that full resync instead of starting it over.
const BITMAP_FLAG_FILLED: u32 = 1;
/// File name of the activity log in `stateDir`.
pub const AL_FILE: &str = "activity-log";
/// File name prefix of a plex's bitmap in `stateDir` (`bitmap-<plex id>`).
pub const BITMAP_PREFIX: &str = "bitmap-";

/// Errors of the persistent state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("region {region} is beyond the volume's {count} regions")]
    OutOfRange { region: u64, count: u64 },
    #[error("a volume of {0} regions is too large for a write-intent bitmap")]
    TooLarge(u64),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a loader found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Regions the file stands for (every region when `distrusted`).
    pub regions: BTreeSet<u64>,
    /// `Some(reason)` when the file was missing, corrupt or for another geometry, and
    /// `regions` is therefore every region.
    pub distrusted: Option<String>,
}

// ----- pages -----

fn seal_page(index: u64, payload: &[u8]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_BYTES];
    let n = payload.len().min(PAGE_PAYLOAD_BYTES);
    page[..n].copy_from_slice(&payload[..n]);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&index.to_le_bytes()),
        &page[..PAGE_PAYLOAD_BYTES],
    );
    page[PAGE_PAYLOAD_BYTES..PAGE_PAYLOAD_BYTES + 4].copy_from_slice(&crc.to_le_bytes());
    page
}

/// The payload of page `index` of `file`, if its checksum holds.
fn open_page(file: &[u8], index: u64) -> Result<&[u8], String> {
    let start = usize::try_from(index)
        .ok()
        .and_then(|i| i.checked_mul(PAGE_BYTES))
        .ok_or("page index overflow")?;
    let page = file
        .get(start..start + PAGE_BYTES)
        .ok_or_else(|| format!("truncated at page {index}"))?;
    let (payload, trailer) = page.split_at(PAGE_PAYLOAD_BYTES);
    let want = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let got = crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), payload);
    if got != want {
        return Err(format!("checksum mismatch in page {index}"));
    }
    Ok(payload)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    magic: [u8; 8],
    version: u32,
    flags: u32,
    region_bytes: u64,
    count: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(32);
        p.extend_from_slice(&self.magic);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.extend_from_slice(&self.flags.to_le_bytes());
        p.extend_from_slice(&self.region_bytes.to_le_bytes());
        p.extend_from_slice(&self.count.to_le_bytes());
        seal_page(0, &p)
    }

    fn decode(file: &[u8]) -> Result<Header, String> {
        let p = open_page(file, 0)?;
        let u32_at = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&p[..8]);
        Ok(Header {
            magic,
            version: u32_at(8),
            flags: u32_at(12),
            region_bytes: u64_at(16),
            count: u64_at(24),
        })
    }
}

/// Read a whole state file; `None` if it does not exist.
fn read_file(path: &Path) -> Result<Option<Vec<u8>>, PersistError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Make `path`'s directory entry durable.
fn sync_dir(path: &Path) -> Result<(), PersistError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Create `path` holding `pages` atomically (temp file, fsync, rename, fsync dir) and open it.
fn create_atomic(path: &Path, pages: &[Vec<u8>]) -> Result<File, PersistError> {
    let tmp = path.with_extension("tmp");
    {
        let f = File::create(&tmp).map_err(io_err(&tmp))?;
        let mut all = Vec::with_capacity(pages.len() * PAGE_BYTES);
        for p in pages {
            all.extend_from_slice(p);
        }
        f.write_all_at(&all, 0).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(path)?;
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

fn write_pages<'a>(
    file: &File,
    path: &Path,
    pages: impl Iterator<Item = (u64, &'a [u8])>,
) -> Result<bool, PersistError> {
    let mut any = false;
    for (index, payload) in pages {
        let page = seal_page(index, payload);
        file.write_all_at(&page, index * PAGE_BYTES as u64)
            .map_err(io_err(path))?;
        any = true;
    }
    Ok(any)
}

// ----- write-intent bitmap -----

/// The persistent write-intent bitmap of one stale plex.
#[derive(Debug)]
pub struct RegionBitmap {
    path: PathBuf,
    file: File,
    region_bytes: u64,
    region_count: u64,
    /// Bits of every body page, concatenated (`PAGE_PAYLOAD_BYTES` per page).
    bits: Vec<u8>,
    /// Body pages changed in memory and not yet written (clears are lazy).
    unflushed: BTreeSet<u64>,
    /// Regions set now.
    set_count: u64,
    /// [`BITMAP_FLAG_FILLED`] (durable once true).
    filled: bool,
}

impl RegionBitmap {
    /// Path of `plex`'s bitmap in `state_dir`.
    pub fn path(state_dir: &Path, plex: u16) -> PathBuf {
        state_dir.join(format!("{BITMAP_PREFIX}{plex}"))
    }

    fn pages_for(region_count: u64) -> u64 {
        region_count.div_ceil(BITMAP_REGIONS_PER_PAGE).max(1)
    }

    /// Create (or replace) the bitmap with `initial` set, durably.
    pub fn create(
        path: &Path,
        region_bytes: u64,
        region_count: u64,
        initial: &[u64],
    ) -> Result<RegionBitmap, PersistError> {
        if region_count > BITMAP_REGIONS_MAX {
            return Err(PersistError::TooLarge(region_count));
        }
        let mut bits = vec![0u8; Self::pages_for(region_count) as usize * PAGE_PAYLOAD_BYTES];
        let mut set_count = 0;
        for &r in initial {
            if set_bit(&mut bits, region_count, r, true)? {
                set_count += 1;
            }
        }
        let filled = set_count == region_count;
        let file = create_atomic(
            path,
            &bitmap_pages(region_bytes, region_count, &bits, filled),
        )?;
        Ok(RegionBitmap {
            path: path.to_path_buf(),
            file,
            region_bytes,
            region_count,
            bits,
            unflushed: BTreeSet::new(),
            set_count,
            filled,
        })
    }

    /// Open an existing bitmap. A corrupt one, or one of another geometry (the region size
    /// changed in the config), is replaced by one with every region set, and reported so.
    /// `Ok(None)`: there is no such file.
    pub fn open(
        path: &Path,
        region_bytes: u64,
        region_count: u64,
    ) -> Result<Option<(RegionBitmap, Loaded)>, PersistError> {
        let Some(raw) = read_file(path)? else {
            return Ok(None);
        };
        match Self::parse(&raw, region_bytes, region_count) {
            Ok((bits, filled)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io_err(path))?;
                let bm = RegionBitmap {
                    path: path.to_path_buf(),
                    file,
                    region_bytes,
                    region_count,
                    bits,
                    unflushed: BTreeSet::new(),
                    set_count: 0,
                    filled,
                };
                let regions = bm.regions();
                let bm = RegionBitmap {
                    set_count: regions.len() as u64,
                    ..bm
                };
                Ok(Some((
                    bm,
                    Loaded {
                        regions,
                        distrusted: None,
                    },
                )))
            }
            Err(reason) => {
                let all: Vec<u64> = (0..region_count).collect();
                let bm = Self::create(path, region_bytes, region_count, &all)?;
                Ok(Some((
                    bm,
                    Loaded {
                        regions: all.into_iter().collect(),
                        distrusted: Some(reason),
                    },
                )))
            }
        }
    }

    /// The bits and the [`BITMAP_FLAG_FILLED`] flag of a bitmap file.
    fn parse(raw: &[u8], region_bytes: u64, region_count: u64) -> Result<(Vec<u8>, bool), String> {
        let h = Header::decode(raw)?;
        if &h.magic != BITMAP_MAGIC || h.version != VERSION {
            return Err("not a version-1 bitmap file".into());
        }
        if h.region_bytes != region_bytes || h.count != region_count {
            return Err(format!(
                "written for {} regions of {} bytes, the volume now has {} of {}",
                h.count, h.region_bytes, region_count, region_bytes
            ));
        }
        let pages = Self::pages_for(region_count);
        if raw.len() as u64 != (pages + 1) * PAGE_BYTES as u64 {
            return Err(format!(
                "{} bytes long, expected {}",
                raw.len(),
                (pages + 1) * PAGE_BYTES as u64
            ));
        }
        let mut bits = Vec::with_capacity(pages as usize * PAGE_PAYLOAD_BYTES);
        for i in 1..=pages {
            bits.extend_from_slice(open_page(raw, i)?);
        }
        Ok((bits, h.flags & BITMAP_FLAG_FILLED != 0))
    }

    /// Set or clear `region` in memory; records its page as unflushed when it changed.
    fn set(&mut self, region: u64, on: bool) -> Result<(), PersistError> {
        if set_bit(&mut self.bits, self.region_count, region, on)? {
            self.unflushed.insert(1 + region / BITMAP_REGIONS_PER_PAGE);
            if on {
                self.set_count += 1;
            } else {
                self.set_count = self.set_count.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Set `regions` and make them durable (the changed pages written, then `fdatasync`)
    /// before returning. Regions already set cost no I/O. The first time every region is
    /// set, the header says so durably ([`BITMAP_FLAG_FILLED`]).
    pub fn mark_durable(&mut self, regions: &[u64]) -> Result<(), PersistError> {
        for &r in regions {
            self.set(r, true)?;
        }
        self.flush()?;
        if !self.filled && self.set_count == self.region_count {
            let h = bitmap_header(self.region_bytes, self.region_count, true);
            self.file
                .write_all_at(&h.encode(), 0)
                .and_then(|()| self.file.sync_data())
                .map_err(io_err(&self.path))?;
            self.filled = true;
        }
        Ok(())
    }

    /// Whether every region was set at once since the file was created.
    pub fn filled(&self) -> bool {
        self.filled
    }

    /// Clear `regions` in memory; [`flush`](Self::flush) persists them later.
    pub fn clear(&mut self, regions: &[u64]) {
        for &r in regions {
            if let Err(e) = self.set(r, false) {
                tracing::warn!("bitmap {}: clear: {e}", self.path.display());
            }
        }
    }

    /// Region size the bitmap was written for.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Are there changes (clears) not yet on disk?
    pub fn needs_flush(&self) -> bool {
        !self.unflushed.is_empty()
    }

    /// Write every changed page and `fdatasync`.
    pub fn flush(&mut self) -> Result<(), PersistError> {
        let pages = std::mem::take(&mut self.unflushed);
        let bits = &self.bits;
        let iter = pages.iter().filter_map(|&p| {
            let start = (p as usize - 1) * PAGE_PAYLOAD_BYTES;
            bits.get(start..start + PAGE_PAYLOAD_BYTES).map(|s| (p, s))
        });
        let result = write_pages(&self.file, &self.path, iter).and_then(|any| match any {
            true => self.file.sync_data().map_err(io_err(&self.path)),
            false => Ok(()),
        });
        if result.is_err() {
            // Keep them for the next attempt.
            self.unflushed.extend(pages);
        }
        result
    }

    /// Set regions, ascending.
    pub fn regions(&self) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for (i, &b) in self.bits.iter().enumerate() {
            if b == 0 {
                continue;
            }
            for bit in 0..8 {
                let r = i as u64 * 8 + bit;
                if b & (1 << bit) != 0 && r < self.region_count {
                    out.insert(r);
                }
            }
        }
        out
    }

    /// Delete the file (the plex is in sync again), durably.
    pub fn remove(self) -> Result<(), PersistError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&self.path)(e)),
        }
        sync_dir(&self.path)
    }
}

/// Set or clear bit `region`; true if it changed.
fn set_bit(
    bits: &mut [u8],
    region_count: u64,
    region: u64,
    on: bool,
) -> Result<bool, PersistError> {
    let out = PersistError::OutOfRange {
        region,
        count: region_count,
    };
    if region >= region_count {
        return Err(out);
    }
    let mask = 1u8 << (region % 8);
    let Some(b) = bits.get_mut((region / 8) as usize) else {
        return Err(out);
    };
    let was = *b & mask != 0;
    if on {
        *b |= mask;
    } else {
        *b &= !mask;
    }
    Ok(was != on)
}

fn bitmap_header(region_bytes: u64, region_count: u64, filled: bool) -> Header {
    Header {
        magic: *BITMAP_MAGIC,
        version: VERSION,
        flags: if filled { BITMAP_FLAG_FILLED } else { 0 },
        region_bytes,
        count: region_count,
    }
}

/// Every page of a bitmap file.
fn bitmap_pages(region_bytes: u64, region_count: u64, bits: &[u8], filled: bool) -> Vec<Vec<u8>> {
    let h = bitmap_header(region_bytes, region_count, filled);
    let mut pages = vec![h.encode()];
    for (i, chunk) in bits.chunks(PAGE_PAYLOAD_BYTES).enumerate() {
        pages.push(seal_page(i as u64 + 1, chunk));
    }
    pages
}

/// Every `bitmap-<plex>` file in `state_dir`, by plex.
pub fn bitmap_files(state_dir: &Path) -> Result<BTreeMap<u16, PathBuf>, PersistError> {
    let mut out = BTreeMap::new();
    let rd = match std::fs::read_dir(state_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(state_dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(io_err(state_dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_prefix(BITMAP_PREFIX)
            .and_then(|s| s.parse::<u16>().ok())
        {
            out.insert(id, entry.path());
        }
    }
    Ok(out)
}

// ----- activity log -----

/// The activity log of this node: regions where this plex may differ from its peers because
/// an op touching them was (maybe) applied here and not yet everywhere.
#[derive(Debug)]
pub struct ActivityLog {
    path: PathBuf,
    /// `None` only while [`ActivityLog::build`] creates it.
    file: Option<File>,
    region_bytes: u64,
    region_count: u64,
    capacity: usize,
    /// One per slot of the file (`AL_SLOTS_PER_PAGE` per body page).
    slots: Vec<Option<u64>>,
    index: BTreeMap<u64, usize>,
    /// Ops in flight per region (ensured, not yet released).
    pins: BTreeMap<u64, u32>,
    /// Recency for eviction: region -> last ensure stamp, and the reverse.
    stamp_of: BTreeMap<u64, u64>,
    by_stamp: BTreeMap<u64, u64>,
    next_stamp: u64,
    /// When each region was last ensured (for [`ActivityLog::trim_idle`]).
    used_at: BTreeMap<u64, std::time::Instant>,
    /// Regions handed to the engine at restart: kept until it absorbed them.
    recovered: BTreeSet<u64>,
    /// Regions logged only for resync copies written here since they entered the log: they
    /// leave at the next trim once their copies settled, however recently written (a copy
    /// writes a region once; keeping it for the idle time would only make a restarted
    /// learner have it copied again).
    copied_only: BTreeSet<u64>,
    /// The file stands for every region (found corrupt; cleared once absorbed).
    full: bool,
}

impl ActivityLog {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(AL_FILE)
    }

    /// Create an empty log (replacing any), durably.
    pub fn create(
        path: &Path,
        region_bytes: u64,
        region_count: u64,
        capacity: usize,
    ) -> Result<ActivityLog, PersistError> {
        Self::build(path, region_bytes, region_count, capacity, &[], false)
    }

    /// Create the file holding `regions` (and the `FULL` flag) in one atomic step, so no
    /// crash leaves a log that covers less than the one it replaces.
    fn build(
        path: &Path,
        region_bytes: u64,
        region_count: u64,
        capacity: usize,
        regions: &[u64],
        full: bool,
    ) -> Result<ActivityLog, PersistError> {
        let capacity = capacity.max(1);
        let slots_needed = capacity.max(regions.len());
        let pages = slots_needed.div_ceil(AL_SLOTS_PER_PAGE);
        let mut al = ActivityLog {
            path: path.to_path_buf(),
            file: None,
            region_bytes,
            region_count,
            capacity,
            slots: vec![None; pages * AL_SLOTS_PER_PAGE],
            index: BTreeMap::new(),
            pins: BTreeMap::new(),
            stamp_of: BTreeMap::new(),
            by_stamp: BTreeMap::new(),
            next_stamp: 0,
            used_at: BTreeMap::new(),
            recovered: BTreeSet::new(),
            copied_only: BTreeSet::new(),
            full,
        };
        for (slot, &r) in regions.iter().enumerate() {
            if let Some(x) = al.slots.get_mut(slot) {
                *x = Some(r);
            }
            al.index.insert(r, slot);
            al.touch(r);
        }
        al.file = Some(create_atomic(path, &al.all_pages())?);
        Ok(al)
    }

    /// Load the log at `path`. Missing, corrupt, or written for another region size: every
    /// region is reported (and the file rewritten with the `FULL` flag so a second crash
    /// does not forget it). The regions loaded stay in the log until [`absorbed`](Self::absorbed).
    pub fn load(
        path: &Path,
        region_bytes: u64,
        region_count: u64,
        capacity: usize,
    ) -> Result<(ActivityLog, Loaded), PersistError> {
        let parsed = match read_file(path)? {
            None => Err("the file is missing".to_string()),
            Some(raw) => Self::parse(&raw, region_bytes),
        };
        match parsed {
            Ok((false, regions)) => {
                let list: BTreeSet<u64> =
                    regions.into_iter().filter(|&r| r < region_count).collect();
                let v: Vec<u64> = list.iter().copied().collect();
                let mut al = Self::build(path, region_bytes, region_count, capacity, &v, false)?;
                al.recovered = list.clone();
                Ok((
                    al,
                    Loaded {
                        regions: list,
                        distrusted: None,
                    },
                ))
            }
            other => {
                let reason = match other {
                    Err(r) => r,
                    Ok(_) => "an earlier load found it corrupt and it was not absorbed yet".into(),
                };
                let al = Self::build(path, region_bytes, region_count, capacity, &[], true)?;
                Ok((
                    al,
                    Loaded {
                        regions: (0..region_count).collect(),
                        distrusted: Some(reason),
                    },
                ))
            }
        }
    }

    /// `(full flag, regions)` of a log file.
    fn parse(raw: &[u8], region_bytes: u64) -> Result<(bool, Vec<u64>), String> {
        let h = Header::decode(raw)?;
        if &h.magic != AL_MAGIC || h.version != VERSION {
            return Err("not a version-1 activity log".into());
        }
        if h.region_bytes != region_bytes {
            return Err(format!(
                "written for {}-byte regions, the config now says {region_bytes}",
                h.region_bytes
            ));
        }
        if !raw.len().is_multiple_of(PAGE_BYTES) {
            return Err(format!(
                "{} bytes is not a whole number of pages",
                raw.len()
            ));
        }
        let pages = raw.len() / PAGE_BYTES;
        let mut regions = Vec::new();
        for i in 1..pages {
            let p = open_page(raw, i as u64)?;
            for s in p.chunks_exact(8).take(AL_SLOTS_PER_PAGE) {
                let mut b = [0u8; 8];
                b.copy_from_slice(s);
                let v = u64::from_le_bytes(b);
                if v != 0 {
                    regions.push(v - 1);
                }
            }
        }
        Ok((h.flags & AL_FLAG_FULL != 0, regions))
    }

    fn header(&self) -> Header {
        Header {
            magic: *AL_MAGIC,
            version: VERSION,
            flags: if self.full { AL_FLAG_FULL } else { 0 },
            region_bytes: self.region_bytes,
            count: self.capacity as u64,
        }
    }

    fn file(&self) -> Result<&File, PersistError> {
        self.file.as_ref().ok_or_else(|| PersistError::Io {
            path: self.path.clone(),
            source: io::Error::other("activity log not open"),
        })
    }

    fn write_header(&self) -> Result<(), PersistError> {
        self.file()?
            .write_all_at(&self.header().encode(), 0)
            .map_err(io_err(&self.path))
    }

    fn sync(&self) -> Result<(), PersistError> {
        self.file()?.sync_data().map_err(io_err(&self.path))
    }

    /// Rewrite the slot pages `pages` from memory and make them durable.
    fn write_slot_pages(&self, pages: impl IntoIterator<Item = usize>) -> Result<(), PersistError> {
        let payloads: Vec<(u64, Vec<u8>)> = pages
            .into_iter()
            .map(|p| (p as u64, self.page_payload(p)))
            .collect();
        write_pages(
            self.file()?,
            &self.path,
            payloads.iter().map(|(i, p)| (*i, p.as_slice())),
        )?;
        self.sync()
    }

    fn page_payload(&self, page: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(PAGE_PAYLOAD_BYTES);
        let start = (page - 1) * AL_SLOTS_PER_PAGE;
        for s in self.slots.iter().skip(start).take(AL_SLOTS_PER_PAGE) {
            p.extend_from_slice(&s.map_or(0, |r| r + 1).to_le_bytes());
        }
        p
    }

    fn all_pages(&self) -> Vec<Vec<u8>> {
        let mut pages = vec![self.header().encode()];
        for page in 1..=self.slots.len() / AL_SLOTS_PER_PAGE {
            pages.push(seal_page(page as u64, &self.page_payload(page)));
        }
        pages
    }

    /// Regions in the log, ascending (every region while the `FULL` flag is set).
    pub fn regions(&self) -> BTreeSet<u64> {
        if self.full {
            return (0..self.region_count).collect();
        }
        self.index.keys().copied().collect()
    }

    /// Number of regions in the log.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn touch(&mut self, region: u64) {
        if let Some(old) = self.stamp_of.insert(region, self.next_stamp) {
            self.by_stamp.remove(&old);
        }
        self.by_stamp.insert(self.next_stamp, region);
        self.next_stamp += 1;
        self.used_at.insert(region, std::time::Instant::now());
    }

    /// The least recently used region no op in flight touches (and not awaiting absorption).
    fn evictable(&self) -> Option<u64> {
        self.by_stamp
            .values()
            .copied()
            .find(|r| self.pins.get(r).copied().unwrap_or(0) == 0 && !self.recovered.contains(r))
    }

    /// Put the missing `regions` in the log and make them durable; no pinning.
    fn add_durable(&mut self, regions: impl IntoIterator<Item = u64>) -> Result<(), PersistError> {
        let mut changed_pages = BTreeSet::new();
        let mut grew = false;
        for r in regions {
            if r >= self.region_count {
                return Err(PersistError::OutOfRange {
                    region: r,
                    count: self.region_count,
                });
            }
            if self.index.contains_key(&r) {
                self.touch(r);
                continue;
            }
            let free = self.slots.iter().position(Option::is_none);
            let slot = match free {
                Some(s) if self.index.len() < self.capacity => s,
                _ => match self.evictable() {
                    // Full: reuse the slot of a region whose ops are all settled.
                    Some(victim) => {
                        let s = self.index.remove(&victim).unwrap_or(0);
                        if let Some(st) = self.stamp_of.remove(&victim) {
                            self.by_stamp.remove(&st);
                        }
                        self.used_at.remove(&victim);
                        self.copied_only.remove(&victim);
                        s
                    }
                    // Nothing evictable: grow rather than lose coverage.
                    None => match free {
                        Some(s) => s,
                        None => {
                            let s = self.slots.len();
                            self.slots.resize(s + AL_SLOTS_PER_PAGE, None);
                            grew = true;
                            s
                        }
                    },
                },
            };
            if let Some(x) = self.slots.get_mut(slot) {
                *x = Some(r);
            }
            self.index.insert(r, slot);
            self.touch(r);
            changed_pages.insert(1 + slot / AL_SLOTS_PER_PAGE);
        }
        if changed_pages.is_empty() {
            return Ok(());
        }
        if grew {
            tracing::warn!(
                "activity log {}: every one of its {} regions has an op in flight; grown to {} slots",
                self.path.display(),
                self.capacity,
                self.slots.len()
            );
        }
        self.write_slot_pages(changed_pages)
    }

    /// Whether every one of `regions` is in the log already (so `ensure` does no I/O).
    pub fn covers(&self, regions: &[u64]) -> bool {
        regions.iter().all(|r| self.index.contains_key(r))
    }

    /// Before an op touching `regions` is applied: add the missing ones durably (evicting
    /// only regions no op in flight touches; growing when none can go) and count the op as
    /// in flight on each until [`release`](Self::release).
    pub fn ensure(&mut self, regions: &[u64]) -> Result<(), PersistError> {
        for g in regions {
            self.copied_only.remove(g);
        }
        self.pin(regions, &[])
    }

    /// [`ensure`](Self::ensure) for a resync copy written here (DESIGN.md §6): the copy may
    /// carry ops only its source applied, so its regions are logged like an op's until it
    /// settles; then, unless an op touched them meanwhile, the next trim drops them at once.
    ///
    /// A resync copies regions in ascending order, each after the last, so when a copied
    /// region is missing from the log the next [`COPY_LOG_AHEAD_REGIONS`] go in with it, in
    /// the same page write and `fdatasync`: the copies that follow then find their region
    /// logged and do no log I/O (one log sync per region was most of a full resync's time).
    /// Logging a region early only widens what a restart resyncs; it is unpinned and
    /// copied-only, so the next trim drops it unless its copy or an op pinned it meanwhile.
    pub fn ensure_copy(&mut self, regions: &[u64]) -> Result<(), PersistError> {
        let mut ahead = Vec::new();
        if !self.covers(regions) {
            if let Some(&last) = regions.iter().max() {
                let end = last
                    .saturating_add(1 + COPY_LOG_AHEAD_REGIONS)
                    .min(self.region_count);
                // Only into free slots: never evict or grow for a guess.
                let room = self
                    .capacity
                    .saturating_sub(self.index.len() + regions.len());
                ahead.extend(
                    (last + 1..end)
                        .filter(|g| !self.index.contains_key(g))
                        .take(room),
                );
            }
        }
        for &g in regions.iter().chain(&ahead) {
            // A region already logged for an op stays an op's; copied-only ones stay so.
            if !self.index.contains_key(&g) {
                self.copied_only.insert(g);
            }
        }
        self.pin(regions, &ahead)
    }

    /// Add `regions` and `unpinned` durably (one write), and pin `regions`.
    fn pin(&mut self, regions: &[u64], unpinned: &[u64]) -> Result<(), PersistError> {
        let r = self.add_durable(regions.iter().chain(unpinned).copied());
        for &g in regions {
            *self.pins.entry(g).or_insert(0) += 1;
        }
        r
    }

    /// Drop regions whose ops all settled and that no op touched for `idle` (by `now`), with
    /// one write and `fdatasync`; returns how many left. Keeps the log to the regions being
    /// written *now*, so a restart resyncs those rather than every region written since the
    /// log last filled up. Safe at any time: a settled region is identical on every in-sync
    /// plex, and an op dispatched meanwhile adds its region again before its write.
    pub fn trim_idle(
        &mut self,
        idle: std::time::Duration,
        now: std::time::Instant,
    ) -> Result<usize, PersistError> {
        let victims: Vec<u64> = self
            .used_at
            .iter()
            .filter(|(r, at)| {
                (now.saturating_duration_since(**at) >= idle || self.copied_only.contains(r))
                    && self.pins.get(r).copied().unwrap_or(0) == 0
                    && !self.recovered.contains(r)
            })
            .map(|(r, _)| *r)
            .collect();
        let mut pages = BTreeSet::new();
        for r in &victims {
            if let Some(slot) = self.index.remove(r) {
                if let Some(x) = self.slots.get_mut(slot) {
                    *x = None;
                }
                pages.insert(1 + slot / AL_SLOTS_PER_PAGE);
            }
            if let Some(st) = self.stamp_of.remove(r) {
                self.by_stamp.remove(&st);
            }
            self.used_at.remove(r);
            self.copied_only.remove(r);
        }
        if pages.is_empty() {
            return Ok(0);
        }
        self.write_slot_pages(pages)?;
        Ok(victims.len())
    }

    /// The ops that touched `regions` settled (applied on every in-sync plex).
    pub fn release(&mut self, regions: &[u64]) {
        for g in regions {
            if let Some(n) = self.pins.get_mut(g) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.pins.remove(g);
                }
            }
        }
    }

    /// Keep `regions` until [`absorbed`](Self::absorbed), as if loaded at restart (the
    /// engine's `KeepInActivityLog`): adds any that are missing, durably.
    pub fn keep(&mut self, regions: &[u64]) -> Result<(), PersistError> {
        self.add_durable(regions.iter().copied())?;
        self.recovered.extend(regions.iter().copied());
        Ok(())
    }

    /// The engine took over the regions loaded at restart (they are in bitmaps now, or
    /// resynced): they may be evicted, and a `FULL` log becomes an ordinary one.
    pub fn absorbed(&mut self) -> Result<(), PersistError> {
        self.recovered.clear();
        if self.full {
            self.full = false;
            self.write_header()?;
            self.sync()?;
        }
        Ok(())
    }
}

// ----- the node's state directory -----

/// Everything the driver persists for resync, shared by its tasks.
#[derive(Debug)]
pub struct StateFiles {
    dir: PathBuf,
    region_bytes: u64,
    region_count: u64,
    bitmaps: std::sync::Mutex<BTreeMap<u16, RegionBitmap>>,
    al: std::sync::Mutex<AlState>,
}

#[derive(Debug)]
struct AlState {
    log: ActivityLog,
    /// Regions of each op (or resync copy) handed to the LU by seq, and whether `ensure`
    /// ran for it yet.
    in_flight: BTreeMap<u64, InFlight>,
}

#[derive(Debug)]
struct InFlight {
    regions: Vec<u64>,
    ensured: bool,
    /// A resync copy written here (`ActivityLog::ensure_copy`), not an op.
    copy: bool,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StateFiles {
    /// Read back the state directory of a restarted node (or set it up for a new one):
    /// the activity log, every plex's bitmap, and `data_valid`. Distrusted files are logged
    /// and stand for every region. `volume_bytes` sizes the bitmaps.
    pub fn recover(
        dir: &Path,
        region_bytes: u64,
        volume_bytes: u64,
        al_capacity: usize,
        data_valid: bool,
    ) -> Result<(StateFiles, super::resync::Recovered), PersistError> {
        let region_count = volume_bytes.div_ceil(region_bytes.max(1));
        let al_path = ActivityLog::path(dir);
        let (log, al_loaded) = if data_valid {
            ActivityLog::load(&al_path, region_bytes, region_count, al_capacity)?
        } else {
            // A new or wiped plex: whatever log is there describes other data.
            let log = ActivityLog::create(&al_path, region_bytes, region_count, al_capacity)?;
            (
                log,
                Loaded {
                    regions: BTreeSet::new(),
                    distrusted: None,
                },
            )
        };
        if let Some(why) = &al_loaded.distrusted {
            tracing::error!(
                "activity log {} cannot be trusted ({why}): every region of this plex will be \
                 resynced",
                al_path.display()
            );
        } else if !al_loaded.regions.is_empty() {
            tracing::info!(
                "activity log: {} region(s) may differ from the peers",
                al_loaded.regions.len()
            );
        }
        let mut bitmaps = BTreeMap::new();
        let mut recovered_bitmaps = BTreeMap::new();
        let mut filled = BTreeSet::new();
        for (plex, path) in bitmap_files(dir)? {
            if let Some((bm, loaded)) = RegionBitmap::open(&path, region_bytes, region_count)? {
                if let Some(why) = &loaded.distrusted {
                    tracing::error!(
                        "write-intent bitmap {} cannot be trusted ({why}): plex {plex} will get \
                         a full resync",
                        path.display()
                    );
                }
                recovered_bitmaps.insert(plex, loaded.regions);
                if bm.filled() {
                    filled.insert(plex);
                }
                bitmaps.insert(plex, bm);
            }
        }
        let files = StateFiles {
            dir: dir.to_path_buf(),
            region_bytes,
            region_count,
            bitmaps: std::sync::Mutex::new(bitmaps),
            al: std::sync::Mutex::new(AlState {
                log,
                in_flight: BTreeMap::new(),
            }),
        };
        let recovered = super::resync::Recovered {
            activity_log: al_loaded.regions,
            bitmaps: recovered_bitmaps,
            data_valid,
            // The driver's `full-resync-pending` marker (boot.rs) sets it.
            full_pending: false,
            filled,
        };
        Ok((files, recovered))
    }

    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    pub fn region_count(&self) -> u64 {
        self.region_count
    }

    /// Regions covering `blocks` blocks from `lba` of `block_size` bytes (clipped to the volume).
    pub fn regions_of(&self, lba: u64, blocks: u64, block_size: u32) -> Vec<u64> {
        if blocks == 0 || self.region_count == 0 {
            return Vec::new();
        }
        let bs = u64::from(block_size.max(1));
        let first = lba.saturating_mul(bs) / self.region_bytes;
        let last = lba.saturating_add(blocks - 1).saturating_mul(bs) / self.region_bytes;
        let last = last.min(self.region_count - 1);
        if first > last {
            return Vec::new();
        }
        (first..=last).collect()
    }

    /// `MarkDirtyRegions`: durable before returning (creates the plex's bitmap if needed).
    pub fn mark_dirty(&self, plex: u16, regions: &[u64]) -> Result<(), PersistError> {
        let mut bms = lock(&self.bitmaps);
        let regions: Vec<u64> = regions
            .iter()
            .copied()
            .filter(|&r| r < self.region_count)
            .collect();
        match bms.get_mut(&plex) {
            Some(bm) => bm.mark_durable(&regions),
            None => {
                let path = RegionBitmap::path(&self.dir, plex);
                let bm =
                    RegionBitmap::create(&path, self.region_bytes, self.region_count, &regions)?;
                bms.insert(plex, bm);
                Ok(())
            }
        }
    }

    /// `ClearDirtyRegions`: in memory; [`flush_bitmaps`](Self::flush_bitmaps) persists it.
    pub fn clear_dirty(&self, plex: u16, regions: &[u64]) {
        if let Some(bm) = lock(&self.bitmaps).get_mut(&plex) {
            bm.clear(regions);
        }
    }

    /// `DropBitmap`: delete the plex's bitmap file.
    pub fn drop_bitmap(&self, plex: u16) -> Result<(), PersistError> {
        match lock(&self.bitmaps).remove(&plex) {
            Some(bm) => bm.remove(),
            None => Ok(()),
        }
    }

    /// Persist lazy clears of every bitmap.
    pub fn flush_bitmaps(&self) -> Result<(), PersistError> {
        let mut bms = lock(&self.bitmaps);
        let mut first_err = None;
        for bm in bms.values_mut().filter(|b| b.needs_flush()) {
            if let Err(e) = bm.flush() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Regions of each persisted bitmap (for status and tests).
    pub fn bitmap_regions(&self) -> BTreeMap<u16, BTreeSet<u64>> {
        lock(&self.bitmaps)
            .iter()
            .map(|(p, b)| (*p, b.regions()))
            .collect()
    }

    /// An op (`seq`) touching `regions` is about to be handed to a blocking thread.
    pub fn op_dispatched(&self, seq: u64, regions: Vec<u64>) {
        self.dispatched(seq, regions, false);
    }

    /// A resync copy (`CopyIn` of seq `seq`) writing `regions` is about to be handed to a
    /// blocking thread: logged like an op (it may carry ops only its source applied), but
    /// dropped from the log at the first trim after it settled.
    pub fn copy_dispatched(&self, seq: u64, regions: Vec<u64>) {
        self.dispatched(seq, regions, true);
    }

    fn dispatched(&self, seq: u64, regions: Vec<u64>, copy: bool) {
        if regions.is_empty() {
            return;
        }
        lock(&self.al).in_flight.insert(
            seq,
            InFlight {
                regions,
                ensured: false,
                copy,
            },
        );
    }

    /// On the blocking thread, before the data write of op `seq`: its regions are in the
    /// activity log, durably.
    pub fn op_before_write(&self, seq: u64) -> Result<(), PersistError> {
        let mut st = lock(&self.al);
        let st = &mut *st;
        let Some(op) = st.in_flight.get_mut(&seq) else {
            return Ok(());
        };
        if op.ensured {
            // Already done by `op_before_write_without_io` (the op then fell back to a
            // blocking thread): pinning twice would keep its regions in the log forever.
            return Ok(());
        }
        op.ensured = true;
        if op.copy {
            st.log.ensure_copy(&op.regions)
        } else {
            st.log.ensure(&op.regions)
        }
    }

    /// `op_before_write` for an async thread: `true` if op `seq`'s regions are in the log
    /// now, done without any I/O (they already were in it, or it touches none) and without
    /// waiting for the log's lock; `false`: call `op_before_write` on a blocking thread.
    pub fn op_before_write_without_io(&self, seq: u64) -> bool {
        let Ok(mut st) = self.al.try_lock() else {
            return false;
        };
        let st = &mut *st;
        let Some(op) = st.in_flight.get_mut(&seq) else {
            return true;
        };
        if op.ensured {
            return true;
        }
        if op.copy || !st.log.covers(&op.regions) {
            return false;
        }
        op.ensured = true;
        // Every region is in the log, so `ensure` only pins and touches: no write, no sync.
        st.log.ensure(&op.regions).is_ok()
    }

    /// `Settled{up_to}`: ops up to `up_to` are applied everywhere; their regions may leave
    /// the activity log.
    pub fn settled(&self, up_to: u64) {
        let mut st = lock(&self.al);
        let keep = st.in_flight.split_off(&(up_to.saturating_add(1)));
        let done = std::mem::replace(&mut st.in_flight, keep);
        for op in done.into_values() {
            if op.ensured {
                st.log.release(&op.regions);
            }
        }
    }

    /// Drop activity-log regions idle for `idle` whose ops all settled (see
    /// [`ActivityLog::trim_idle`]).
    pub fn trim_activity_log(&self, idle: std::time::Duration) -> Result<usize, PersistError> {
        lock(&self.al)
            .log
            .trim_idle(idle, std::time::Instant::now())
    }

    /// `KeepInActivityLog`.
    pub fn keep_in_activity_log(&self, regions: &[u64]) -> Result<(), PersistError> {
        lock(&self.al).log.keep(regions)
    }

    /// `ActivityLogAbsorbed`.
    pub fn absorbed(&self) -> Result<(), PersistError> {
        lock(&self.al).log.absorbed()
    }

    /// Regions currently in the activity log.
    pub fn activity_log(&self) -> BTreeSet<u64> {
        lock(&self.al).log.regions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn bitmap_marks_survive_reopen_and_clears_need_flush() {
        let d = dir();
        let p = RegionBitmap::path(d.path(), 2);
        let count = BITMAP_REGIONS_PER_PAGE * 2 + 10; // three body pages
        let mut bm = RegionBitmap::create(&p, 1 << 20, count, &[3]).expect("create");
        bm.mark_durable(&[0, 7, BITMAP_REGIONS_PER_PAGE + 1, count - 1])
            .expect("mark");
        bm.clear(&[7]);
        assert!(bm.needs_flush());
        // Reopen without flushing: marks durable, the clear not yet (either is safe).
        let (bm2, l) = RegionBitmap::open(&p, 1 << 20, count)
            .expect("open")
            .expect("exists");
        assert_eq!(l.distrusted, None);
        assert_eq!(
            l.regions,
            [0, 3, 7, BITMAP_REGIONS_PER_PAGE + 1, count - 1].into()
        );
        drop(bm2);
        bm.flush().expect("flush");
        assert!(!bm.needs_flush());
        let (_, l) = RegionBitmap::open(&p, 1 << 20, count)
            .expect("open")
            .expect("exists");
        assert_eq!(
            l.regions,
            [0, 3, BITMAP_REGIONS_PER_PAGE + 1, count - 1].into()
        );
        assert!(matches!(
            bm.mark_durable(&[count]),
            Err(PersistError::OutOfRange { .. })
        ));
        bm.remove().expect("remove");
        assert!(RegionBitmap::open(&p, 1 << 20, count)
            .expect("open")
            .is_none());
    }

    #[test]
    fn corrupt_or_truncated_bitmap_means_every_region_durably() {
        let d = dir();
        let p = RegionBitmap::path(d.path(), 1);
        let count = 100;
        for damage in 0..4 {
            let mut bm = RegionBitmap::create(&p, 4096, count, &[]).expect("create");
            bm.mark_durable(&[5]).expect("mark");
            let mut raw = std::fs::read(&p).expect("read");
            match damage {
                0 => raw.truncate(PAGE_BYTES + 100), // torn append
                1 => raw[PAGE_BYTES + 2] ^= 0x40,    // bad checksum in the body
                2 => raw[20] ^= 1,                   // bad header
                _ => raw.truncate(10),               // truncated header
            }
            std::fs::write(&p, &raw).expect("write");
            let (_, l) = RegionBitmap::open(&p, 4096, count)
                .expect("open")
                .expect("exists");
            assert!(l.distrusted.is_some(), "damage {damage}");
            assert_eq!(l.regions.len() as u64, count, "damage {damage}");
            // Rewritten: the next load trusts it and still says every region.
            let (_, l) = RegionBitmap::open(&p, 4096, count)
                .expect("open")
                .expect("exists");
            assert_eq!(l.distrusted, None);
            assert_eq!(l.regions.len() as u64, count);
        }
    }

    #[test]
    fn bitmap_of_another_geometry_is_distrusted() {
        let d = dir();
        let p = RegionBitmap::path(d.path(), 1);
        RegionBitmap::create(&p, 4096, 100, &[1]).expect("create");
        let (_, l) = RegionBitmap::open(&p, 8192, 50)
            .expect("open")
            .expect("exists");
        assert!(l.distrusted.expect("distrusted").contains("regions"));
        assert_eq!(l.regions.len(), 50);
    }

    #[test]
    fn activity_log_reopens_with_its_regions_and_evicts_only_settled_ones() {
        let d = dir();
        let p = ActivityLog::path(d.path());
        let mut al = ActivityLog::create(&p, 1 << 20, 10_000, 3).expect("create");
        al.ensure(&[1, 2]).expect("ensure");
        al.ensure(&[3]).expect("ensure");
        // Full, every region in flight: grows instead of dropping one.
        al.ensure(&[4]).expect("ensure");
        assert_eq!(al.regions(), [1, 2, 3, 4].into());
        al.release(&[1, 2]);
        al.release(&[3]);
        al.release(&[4]);
        // Over capacity and all settled: the least recently used go first.
        al.ensure(&[5]).expect("ensure");
        assert_eq!(al.len(), 4);
        assert!(!al.regions().contains(&1), "{:?}", al.regions());
        assert!(al.regions().contains(&5));
        let (al2, l) = ActivityLog::load(&p, 1 << 20, 10_000, 3).expect("load");
        assert_eq!(l.distrusted, None);
        assert_eq!(l.regions, [2, 3, 4, 5].into());
        // Loaded regions stay until absorbed, whatever else comes.
        let mut al2 = al2;
        al2.ensure(&[6, 7]).expect("ensure");
        al2.release(&[6, 7]);
        assert!(al2.regions().is_superset(&[2, 3, 4, 5].into()));
        al2.absorbed().expect("absorbed");
        al2.ensure(&[8]).expect("ensure");
        assert!(al2.len() <= 6);
    }

    #[test]
    fn a_copy_logs_the_regions_after_it_in_the_same_write() {
        let d = dir();
        let p = ActivityLog::path(d.path());
        let count = 100;
        let mut al = ActivityLog::create(&p, 1 << 20, count, 1024).expect("create");
        al.ensure_copy(&[10]).expect("ensure");
        let ahead: BTreeSet<u64> = (10..=10 + COPY_LOG_AHEAD_REGIONS).collect();
        assert_eq!(al.regions(), ahead);
        // Durable: a crash now resyncs them all.
        let (_, l) = ActivityLog::load(&p, 1 << 20, count, 1024).expect("load");
        assert_eq!(l.regions, ahead);
        // The next copies find their region logged: nothing to write.
        assert!(al.covers(&[11, 10 + COPY_LOG_AHEAD_REGIONS]));
        al.ensure_copy(&[11]).expect("ensure");
        // Near the end of the volume: only regions that exist.
        al.ensure_copy(&[count - 2]).expect("ensure");
        assert!(al.regions().contains(&(count - 1)));
        assert!(!al.regions().contains(&count));
        // Settled copies and unused look-ahead leave at the next trim; a pinned one stays.
        al.release(&[10]);
        al.release(&[count - 2]);
        al.trim_idle(
            std::time::Duration::from_secs(3600),
            std::time::Instant::now(),
        )
        .expect("trim");
        assert_eq!(al.regions(), [11].into());
    }

    #[test]
    fn a_copy_looks_ahead_only_into_free_slots() {
        let d = dir();
        let p = ActivityLog::path(d.path());
        let mut al = ActivityLog::create(&p, 1 << 20, 1000, 4).expect("create");
        al.ensure(&[500, 600]).expect("ensure");
        al.ensure_copy(&[10]).expect("ensure");
        // Capacity 4: one look-ahead slot, nothing evicted, nothing grown.
        assert_eq!(al.regions(), [10, 11, 500, 600].into());
    }

    #[test]
    fn state_files_recover_what_was_persisted() {
        let d = dir();
        let (sf, rec) = StateFiles::recover(d.path(), 1 << 20, 10 << 20, 4, true).expect("recover");
        // First start of a node that has served before but has no log: distrust it.
        assert_eq!(rec.activity_log.len(), 10);
        sf.absorbed().expect("absorbed");
        assert_eq!(sf.regions_of(0, 1, 512), vec![0]);
        assert_eq!(sf.regions_of(2047, 2, 512), vec![0, 1]);
        assert_eq!(
            sf.regions_of(20479, 100, 512),
            vec![9],
            "clipped to the volume"
        );
        sf.op_dispatched(1, sf.regions_of(2048 * 3, 8, 512));
        sf.op_before_write(1).expect("ensure");
        sf.op_dispatched(2, vec![5]);
        sf.op_before_write(2).expect("ensure");
        sf.settled(1);
        sf.mark_dirty(2, &[7, 8]).expect("mark");
        sf.mark_dirty(2, &[9]).expect("mark");
        sf.clear_dirty(2, &[8]);
        sf.flush_bitmaps().expect("flush");
        sf.mark_dirty(3, &[1]).expect("mark");
        sf.drop_bitmap(3).expect("drop");
        drop(sf);
        let (_, rec) = StateFiles::recover(d.path(), 1 << 20, 10 << 20, 4, true).expect("recover");
        assert_eq!(rec.activity_log, [3, 5].into());
        assert_eq!(rec.bitmaps.len(), 1);
        assert_eq!(rec.bitmaps[&2], [7, 9].into());
        assert!(rec.data_valid);
        // A wiped plex: no activity log carried over.
        let (_, rec) = StateFiles::recover(d.path(), 1 << 20, 10 << 20, 4, false).expect("recover");
        assert!(rec.activity_log.is_empty() && !rec.data_valid);
    }

    #[test]
    fn idle_settled_regions_leave_the_log() {
        use std::time::{Duration, Instant};
        let d = dir();
        let p = ActivityLog::path(d.path());
        let mut al = ActivityLog::create(&p, 1 << 20, 100, 16).expect("create");
        al.ensure(&[1, 2, 3]).expect("ensure");
        al.release(&[1, 2]);
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            al.trim_idle(Duration::from_secs(60), later).expect("trim"),
            0
        );
        // 1 and 2 settled and idle; 3 still has an op in flight.
        assert_eq!(
            al.trim_idle(Duration::from_secs(5), later).expect("trim"),
            2
        );
        assert_eq!(al.regions(), [3].into());
        let (_, l) = ActivityLog::load(&p, 1 << 20, 100, 16).expect("load");
        assert_eq!(l.regions, [3].into(), "trimmed durably");
    }

    /// `KeepInActivityLog` (sim seed 44401): kept regions outlive their ops' settling, idle
    /// trims and a reopen, until the engine absorbed them.
    #[test]
    fn kept_regions_stay_until_absorbed() {
        use std::time::{Duration, Instant};
        let d = dir();
        let p = ActivityLog::path(d.path());
        let mut al = ActivityLog::create(&p, 1 << 20, 100, 16).expect("create");
        al.ensure(&[1, 2]).expect("ensure");
        // 7 was never logged here (a copy's region): kept means logged, durably.
        al.keep(&[2, 7]).expect("keep");
        al.release(&[1, 2]);
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            al.trim_idle(Duration::from_secs(5), later).expect("trim"),
            1
        );
        assert_eq!(al.regions(), [2, 7].into());
        let (mut al, l) = ActivityLog::load(&p, 1 << 20, 100, 16).expect("load");
        assert_eq!(l.regions, [2, 7].into(), "kept durably");
        al.absorbed().expect("absorbed");
        assert_eq!(
            al.trim_idle(Duration::from_secs(5), later).expect("trim"),
            2
        );
        assert!(al.regions().is_empty());
    }

    #[test]
    fn a_bitmap_filled_at_once_says_so_after_clears_and_reopen() {
        let d = dir();
        let (sf, _) = StateFiles::recover(d.path(), 1 << 20, 8 << 20, 16, false).expect("recover");
        // Plex 2: marked by writes only, never every region: not filled.
        sf.mark_dirty(2, &[1, 2]).expect("mark");
        // Plex 3: filled for a full resync, then two regions copied (cleared).
        sf.mark_dirty(3, &[0, 1, 2, 3]).expect("mark");
        sf.mark_dirty(3, &[4, 5, 6, 7]).expect("mark");
        sf.clear_dirty(3, &[0, 1]);
        sf.flush_bitmaps().expect("flush");
        drop(sf);
        let (sf, rec) = StateFiles::recover(d.path(), 1 << 20, 8 << 20, 16, true).expect("recover");
        assert_eq!(rec.bitmaps[&3], (2..8).collect());
        assert_eq!(
            rec.filled,
            [3].into(),
            "only the bitmap that was full at once"
        );
        // Dropped (in sync) and marked again: a new spell, not filled.
        sf.drop_bitmap(3).expect("drop");
        sf.mark_dirty(3, &[5]).expect("mark");
        drop(sf);
        let (_, rec) = StateFiles::recover(d.path(), 1 << 20, 8 << 20, 16, true).expect("recover");
        assert!(rec.filled.is_empty(), "{:?}", rec.filled);
    }

    #[test]
    fn copied_regions_stay_until_settled_then_leave_at_the_next_trim() {
        use std::time::Duration;
        let d = dir();
        let (sf, _) = StateFiles::recover(d.path(), 1 << 20, 16 << 20, 64, false).expect("recover");
        // A learner writes copies of regions 13 and 14 (seqs 10, 11) and applies an op on 15
        // (seq 12), then a copy of 15 (seq 13). The last regions of the volume: the copy of
        // 13 logs 14 and 15 ahead (`ensure_copy`), which are this story's next regions.
        sf.copy_dispatched(10, vec![13]);
        sf.copy_dispatched(11, vec![14]);
        sf.op_dispatched(12, vec![15]);
        sf.copy_dispatched(13, vec![15]);
        assert!(
            !sf.op_before_write_without_io(10),
            "a copy is logged on its blocking thread"
        );
        for seq in 10..=13 {
            sf.op_before_write(seq).expect("ensure");
        }
        // On disk before the copy writes: a crash now reports them.
        assert_eq!(sf.activity_log(), [13, 14, 15].into());
        // Unsettled copies stay whatever the idle time.
        assert_eq!(sf.trim_activity_log(Duration::ZERO).expect("trim"), 0);
        sf.settled(11);
        // Settled copies leave at once, well before the idle time; region 15 has an op.
        assert_eq!(
            sf.trim_activity_log(Duration::from_secs(3600))
                .expect("trim"),
            2
        );
        sf.settled(13);
        assert_eq!(
            sf.trim_activity_log(Duration::from_secs(3600))
                .expect("trim"),
            0
        );
        assert_eq!(
            sf.activity_log(),
            [15].into(),
            "an op's region keeps the idle time"
        );
        drop(sf);
        let (_, rec) = StateFiles::recover(d.path(), 1 << 20, 16 << 20, 64, true).expect("recover");
        assert_eq!(rec.activity_log, [15].into(), "trimmed durably");
    }

    #[test]
    fn many_regions_span_pages() {
        let d = dir();
        let p = ActivityLog::path(d.path());
        let mut al = ActivityLog::create(&p, 1 << 20, 1 << 20, 1024).expect("create");
        let regions: Vec<u64> = (0..1000).map(|i| i * 7).collect();
        al.ensure(&regions).expect("ensure");
        let (_, l) = ActivityLog::load(&p, 1 << 20, 1 << 20, 1024).expect("load");
        assert_eq!(l.regions, regions.iter().copied().collect());
    }

    #[test]
    fn corrupt_or_missing_activity_log_means_every_region_until_absorbed() {
        let d = dir();
        let p = ActivityLog::path(d.path());
        let (_, l) = ActivityLog::load(&p, 4096, 64, 16).expect("load missing");
        assert!(l.distrusted.expect("missing").contains("missing"));
        assert_eq!(l.regions.len(), 64);
        for damage in 0..3 {
            let mut al = ActivityLog::create(&p, 4096, 64, 16).expect("create");
            al.ensure(&[9]).expect("ensure");
            let mut raw = std::fs::read(&p).expect("read");
            match damage {
                0 => raw[PAGE_BYTES] ^= 1,
                1 => raw.truncate(PAGE_BYTES + 7),
                _ => raw[0] = b'X',
            }
            std::fs::write(&p, &raw).expect("write");
            let (al, l) = ActivityLog::load(&p, 4096, 64, 16).expect("load");
            assert!(l.distrusted.is_some(), "damage {damage}");
            assert_eq!(l.regions.len(), 64);
            drop(al);
            // A crash before absorption: still every region.
            let (mut al, l) = ActivityLog::load(&p, 4096, 64, 16).expect("load");
            assert_eq!(l.regions.len(), 64, "damage {damage}");
            al.absorbed().expect("absorbed");
            let (_, l) = ActivityLog::load(&p, 4096, 64, 16).expect("load");
            assert_eq!(l.distrusted, None);
            assert!(l.regions.is_empty());
        }
        // Another region size: distrusted.
        ActivityLog::create(&p, 4096, 64, 16).expect("create");
        let (_, l) = ActivityLog::load(&p, 8192, 32, 16).expect("load");
        assert!(l.distrusted.is_some());
    }
}
