//! Whole-region I/O for resync and verify (DESIGN.md §6), over any [`BlockBackend`].
//!
//! - [`read_region`]: the region's bytes (past the cache where the backend can:
//!   [`BlockBackend::read_uncached`]), or *empty* when it reads back as zeroes (all holes,
//!   or all zero bytes), so a sparse region costs nothing on the link.
//! - [`write_region`]: write the bytes (empty: deallocate) past the cache where the backend can
//!   ([`BlockBackend::write_at_uncached`]) and make them durable.
//! - [`checksum_region`]: BLAKE3 of the region's logical content (holes hash as zeroes, so
//!   plexes with different allocation but the same data agree).

use std::io;

use bytes::Bytes;

use super::{BlockBackend, Mapping};

/// Largest region these helpers move at once (one buffer of this size per call).
pub const REGION_IO_BYTES_MAX: u64 = 64 << 20;

/// Zeroes fed to the hasher for holes, a chunk at a time.
static ZEROES: [u8; 64 * 1024] = [0u8; 64 * 1024];

fn check_len(len: u64) -> io::Result<usize> {
    if len > REGION_IO_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("region of {len} bytes exceeds {REGION_IO_BYTES_MAX}"),
        ));
    }
    Ok(len as usize)
}

/// Is `[offset, offset+len)` one hole?
fn all_hole(b: &dyn BlockBackend, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let (m, n) = b.mapping(offset, len)?;
    Ok(m == Mapping::Deallocated && n >= len)
}

/// Read `len` bytes at `offset`; empty when they all read back as zero.
pub fn read_region(b: &dyn BlockBackend, offset: u64, len: u64) -> io::Result<Bytes> {
    let n = check_len(len)?;
    super::check_range(b.size_bytes(), offset, len)?;
    if all_hole(b, offset, len)? {
        return Ok(Bytes::new());
    }
    // Uncached: a resync reads each region once (DESIGN.md §6).
    let buf = b.read_uncached(offset, n)?;
    if buf.iter().all(|&x| x == 0) {
        return Ok(Bytes::new());
    }
    Ok(buf)
}

/// Write a region read by [`read_region`] (`data` empty: zeroes, deallocated) durably.
pub fn write_region(b: &dyn BlockBackend, offset: u64, len: u64, data: &[u8]) -> io::Result<()> {
    check_len(len)?;
    if data.is_empty() {
        b.discard(offset, len)?;
    } else if data.len() as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "region data of {} bytes for a {len}-byte region",
                data.len()
            ),
        ));
    } else {
        // Uncached: the region is made durable at once and not read back soon (DESIGN.md §6).
        b.write_at_uncached(data, offset)?;
    }
    b.flush()
}

/// BLAKE3 of the `len` bytes at `offset` (holes read as zeroes).
pub fn checksum_region(b: &dyn BlockBackend, offset: u64, len: u64) -> io::Result<[u8; 32]> {
    let n = check_len(len)?;
    super::check_range(b.size_bytes(), offset, len)?;
    let mut h = blake3::Hasher::new();
    if all_hole(b, offset, len)? {
        let mut left = n;
        while left > 0 {
            let k = left.min(ZEROES.len());
            h.update(&ZEROES[..k]);
            left -= k;
        }
    } else {
        // Uncached, like a copy-out: a verify reads each region once.
        h.update(&b.read_uncached(offset, n)?);
    }
    Ok(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FileBackend, MemBackend};

    const R: u64 = 1 << 20;

    fn suite(b: &dyn BlockBackend) {
        // Never written: empty, and its checksum is that of zeroes.
        assert!(read_region(b, 0, R).expect("read").is_empty());
        let zero_sum = checksum_region(b, 0, R).expect("sum");
        assert_eq!(zero_sum, *blake3::hash(&vec![0u8; R as usize]).as_bytes());

        // Data round-trips through another region and checksums agree.
        b.write_at(&[0xab; 4096], R + 8192).expect("write");
        let d = read_region(b, R, R).expect("read");
        assert_eq!(d.len() as u64, R);
        assert_eq!(&d[8192..8192 + 4096], &[0xab; 4096][..]);
        write_region(b, 2 * R, R, &d).expect("write region");
        assert_eq!(
            checksum_region(b, R, R).expect("sum"),
            checksum_region(b, 2 * R, R).expect("sum")
        );
        assert_ne!(checksum_region(b, R, R).expect("sum"), zero_sum);

        // Written zeroes read back as empty; an empty copy zeroes the target.
        b.write_at(&[0u8; 4096], 3 * R).expect("write");
        assert!(read_region(b, 3 * R, R).expect("read").is_empty());
        write_region(b, 2 * R, R, &[]).expect("write empty");
        assert!(read_region(b, 2 * R, R).expect("read").is_empty());
        assert_eq!(checksum_region(b, 2 * R, R).expect("sum"), zero_sum);

        // Wrong-sized data and out-of-range regions are errors, not panics.
        assert!(write_region(b, 0, R, &[1u8; 512]).is_err());
        assert!(read_region(b, 4 * R, R).is_err());
        assert!(checksum_region(b, 4 * R - 512, R).is_err());
    }

    #[test]
    fn mem_backend() {
        suite(&MemBackend::new(4 * R));
    }

    #[test]
    fn file_backend() {
        let d = tempfile::tempdir().expect("tempdir");
        suite(&FileBackend::open(&d.path().join("v"), 4 * R, true).expect("open"));
    }
}
