//! Block commands (SBC-3): READ CAPACITY, READ/WRITE and their VERIFY variants, WRITE
//! SAME, UNMAP, GET LBA STATUS, COMPARE AND WRITE, ORWRITE, PRE-FETCH, SYNCHRONIZE CACHE,
//! and EXTENDED COPY / RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18) within this LU.
//!
//! Every handler validates the CDB fully (protection fields, range, limits) before it
//! touches the backend. Commands that write hold the LU's LBA-range lock over their range;
//! COMPARE AND WRITE and ORWRITE hold it across read-modify-write, which makes them atomic
//! against every other write. Durability: in write-through mode every write is flushed
//! before it is acknowledged; in write-back mode only FUA writes and SYNCHRONIZE CACHE are.

use super::cdb::{be, rcr, service_action, RwCdb};
use super::lu::{CacheMode, CmdResult, CopyResult, LogicalUnit, RangeGuard, Reply};
use super::sense::{asc, ScsiError, SenseKey};
use super::NexusId;
use crate::store::Mapping;

/// Limits reported in the Block Limits VPD page and enforced here.
pub mod limits {
    /// Largest READ/WRITE/VERIFY transfer, in blocks (32 MiB at 512 B; libiscsi WriteSame16.Unmap
    /// writes 65536 blocks in one WRITE(16)).
    pub const TRANSFER_BLOCKS_MAX: u32 = 65536;
    /// Preferred transfer size, in blocks (1 MiB).
    pub const OPTIMAL_TRANSFER_BLOCKS: u32 = 2048;
    /// MAXIMUM COMPARE AND WRITE LENGTH, in blocks.
    pub const CAW_BLOCKS_MAX: u32 = 255;
    /// MAXIMUM UNMAP LBA COUNT (512 MiB at 512 B), per UNMAP command. libiscsi's
    /// test_inquiry_block_limits calls anything above 2^20 "insanely big".
    pub const UNMAP_BLOCKS_MAX: u32 = 1 << 20;
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;
    /// MAXIMUM WRITE SAME LENGTH, in blocks.
    pub const WRITE_SAME_BLOCKS_MAX: u64 = 1 << 22;
    /// Bytes written per backend call while expanding a WRITE SAME pattern.
    pub const WRITE_SAME_CHUNK_BYTES: usize = 1 << 20;
    /// EXTENDED COPY: target descriptors per parameter list.
    pub const XCOPY_TARGET_DESCRIPTORS_MAX: u16 = 8;
    /// EXTENDED COPY: segment descriptors per parameter list.
    pub const XCOPY_SEGMENT_DESCRIPTORS_MAX: u16 = 64;
    /// EXTENDED COPY: total parameter bytes for descriptors.
    pub const XCOPY_DESCRIPTOR_LIST_BYTES_MAX: u32 = 8 * 32 + 64 * 28;
    /// EXTENDED COPY: bytes per segment (a block→block segment is at most 65535 blocks).
    pub const XCOPY_SEGMENT_BYTES_MAX: u32 = 65535 * 512;
    /// Bytes moved per read/write step while copying a segment.
    pub const XCOPY_CHUNK_BYTES: usize = 1 << 20;
    /// IMPLICIT TRANSITION TIME reported in RTPG's extended header, seconds.
    pub const IMPLICIT_TRANSITION_SECS: u8 = 30;
    /// GET LBA STATUS descriptors returned at most.
    pub const LBA_STATUS_DESCRIPTORS_MAX: u32 = 64;
}

const FUA: u8 = 0x08;

fn read_error(_e: std::io::Error) -> ScsiError {
    ScsiError::medium_error(asc::UNRECOVERED_READ_ERROR)
}

fn write_error(_e: std::io::Error) -> ScsiError {
    ScsiError::medium_error(asc::WRITE_ERROR)
}

impl LogicalUnit {
    fn bs(&self) -> u64 {
        u64::from(self.cfg.block_size)
    }

    /// SBC-3 §4.5: an LBA past the last one, or a range running past it, is LBA OUT OF
    /// RANGE (also with a transfer length of 0).
    pub(crate) fn check_lba(&self, lba: u64, blocks: u64) -> Result<(), ScsiError> {
        match lba.checked_add(blocks) {
            Some(end) if lba < self.block_count && end <= self.block_count => Ok(()),
            _ => Err(ScsiError::lba_out_of_range()),
        }
    }

    fn check_writable(&self) -> Result<(), ScsiError> {
        if self.lock_state().mode.swp {
            // SPC-4 §7.5.8: SWP=1 makes the medium write protected.
            return Err(ScsiError::check(
                SenseKey::DataProtect,
                asc::WRITE_PROTECTED,
            ));
        }
        Ok(())
    }

    /// After a write: make it durable if the cache mode or FUA requires it.
    fn complete_write(&self, fua: bool) -> Result<(), ScsiError> {
        if fua || self.cfg.cache_mode == CacheMode::WriteThrough {
            self.backend.flush().map_err(write_error)?;
        }
        Ok(())
    }

    fn read_blocks(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, ScsiError> {
        let mut buf = vec![0u8; (blocks * self.bs()) as usize];
        self.backend
            .read_at(&mut buf, lba * self.bs())
            .map_err(read_error)?;
        Ok(buf)
    }
}

/// No protection information: RDPROTECT / WRPROTECT / VRPROTECT must be 0 (SBC-3 §5.x).
fn check_no_protect(cdb: &[u8], flags: u8) -> Result<(), ScsiError> {
    // READ(6)/WRITE(6) have no protect field (byte 1 high bits are reserved/LBA).
    if !matches!(cdb.first(), Some(0x08 | 0x0a)) && flags & 0xe0 != 0 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(7)));
    }
    Ok(())
}

fn check_transfer(blocks: u32) -> Result<(), ScsiError> {
    if blocks > limits::TRANSFER_BLOCKS_MAX {
        return Err(ScsiError::invalid_field_in_cdb());
    }
    Ok(())
}

/// READ CAPACITY(10) (SBC-3 §5.15).
pub(crate) fn read_capacity10(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    // PMI=0 with a nonzero LOGICAL BLOCK ADDRESS is invalid (SBC-3 §5.15.1).
    if cdb[8] & 0x01 == 0 && be(cdb, 2, 4)? != 0 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, None));
    }
    let last = lu.block_count.saturating_sub(1);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d.extend_from_slice(&lu.cfg.block_size.to_be_bytes());
    Ok(Reply::data(d))
}

/// READ CAPACITY(16) (SBC-3 §5.16): LBPME=1 (thin), LBPRZ=1 (unmapped reads as zero).
pub(crate) fn read_capacity16(lu: &LogicalUnit) -> CmdResult {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lu.block_count.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lu.cfg.block_size.to_be_bytes());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0: libiscsi's GET LBA STATUS tests assume
    // single-block unmap granularity.
    d[14] = 0x80 | 0x40;
    Ok(Reply::data(d))
}

/// READ(6/10/12/16) (SBC-3 §5.8–5.11). `cached`: the data, already read (by
/// `LogicalUnit::try_execute_cached`, for exactly this CDB's range).
pub(crate) fn read(lu: &LogicalUnit, cdb: &[u8], cached: Option<Vec<u8>>) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    check_no_protect(cdb, r.flags)?;
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    check_transfer(r.blocks)?;
    if r.blocks == 0 {
        return Ok(Reply::good());
    }
    match cached {
        Some(data) if data.len() as u64 == u64::from(r.blocks) * lu.bs() => Ok(Reply::data(data)),
        _ => Ok(Reply::data(lu.read_blocks(r.lba, u64::from(r.blocks))?)),
    }
}

/// WRITE(6/10/12/16) and WRITE AND VERIFY(10/12/16) (SBC-3 §5.32–5.38).
///
/// When the transport delivered less data than the CDB asks for (EDTL below the transfer
/// length), only the whole blocks received are written and the command succeeds; the
/// transport reports the overflow residual (libiscsi `test_write10_residuals`).
///
/// `held`: the command's range, already locked by an inline caller (it covers at least the
/// blocks written here).
pub(crate) fn write(
    lu: &LogicalUnit,
    cdb: &[u8],
    data: &[u8],
    verify: bool,
    held: Option<RangeGuard<'_>>,
) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    check_no_protect(cdb, r.flags)?;
    if verify && (r.flags >> 1) & 0x03 == 0b10 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(2)));
    }
    let blocks = writable_blocks(lu, &r, data)?;
    if blocks == 0 {
        return Ok(Reply::good());
    }
    let bs = lu.bs();
    let payload = &data[..(blocks * bs) as usize];
    let _g = match held {
        Some(g) => g,
        None => lu.ranges.lock(r.lba, blocks),
    };
    lu.backend
        .write_at(payload, r.lba * bs)
        .map_err(write_error)?;
    let fua = !matches!(cdb[0], 0x0a) && r.flags & FUA != 0;
    lu.complete_write(fua || verify)?;
    if verify {
        // Read back what we wrote: the medium check WRITE AND VERIFY asks for.
        let back = lu.read_blocks(r.lba, blocks)?;
        if back != payload {
            return Err(ScsiError::medium_error(asc::MISCOMPARE_DURING_VERIFY));
        }
    }
    Ok(Reply::good())
}

/// Offset of the first differing byte.
fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn miscompare(offset: usize) -> ScsiError {
    ScsiError::check(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY).with_info(offset as u64)
}

/// VERIFY(10/12/16) (SBC-3 §5.27–5.29). BYTCHK 00b: check the medium is readable;
/// 01b: compare with the data-out buffer; 11b: compare every block with one block.
pub(crate) fn verify(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    check_no_protect(cdb, r.flags)?;
    let bytchk = (r.flags >> 1) & 0x03;
    if bytchk == 0b10 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(2)));
    }
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    check_transfer(r.blocks)?;
    if r.blocks == 0 {
        return Ok(Reply::good());
    }
    let bs = lu.bs() as usize;
    let medium = lu.read_blocks(r.lba, u64::from(r.blocks))?;
    match bytchk {
        0b01 => {
            let n = medium.len().min(data.len() / bs * bs);
            if let Some(off) = first_mismatch(&medium[..n], &data[..n]) {
                return Err(miscompare(off));
            }
        }
        0b11 => {
            let Some(one) = data.get(..bs) else {
                return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
            };
            for (i, blk) in medium.chunks(bs).enumerate() {
                if let Some(off) = first_mismatch(blk, one) {
                    return Err(miscompare(i * bs + off));
                }
            }
        }
        _ => {}
    }
    Ok(Reply::good())
}

/// WRITE SAME(10/16) (SBC-3 §5.41, §5.42). UNMAP=1 deallocates, which reads back as
/// zeroes (LBPRZ=1); NDOB writes zeroes; ANCHOR is not supported.
pub(crate) fn write_same(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    let sixteen = cdb[0] == 0x93;
    check_no_protect(cdb, r.flags)?;
    if r.flags & 0x10 != 0 {
        // ANCHOR: we report ANC_SUP=0.
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(4)));
    }
    if r.flags & 0x06 != 0 {
        // PBDATA / LBDATA are obsolete and unsupported.
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(1)));
    }
    let ndob = sixteen && r.flags & 0x01 != 0;
    let unmap = r.flags & 0x08 != 0;
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    // WSNZ=1 in the Block Limits page: 0 blocks is not "to the end of the medium".
    if r.blocks == 0 || u64::from(r.blocks) > limits::WRITE_SAME_BLOCKS_MAX {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(if sixteen { 10 } else { 7 }, None));
    }
    lu.check_writable()?;
    let bs = lu.bs() as usize;
    let zero_block = vec![0u8; bs];
    // Exactly one block of data-out, or none with NDOB (libiscsi
    // test_writesame10_invalid_dataout_size: too little and too much both fail).
    let pattern: &[u8] = match (ndob, data.len() == bs) {
        (true, _) if data.is_empty() => &zero_block,
        (false, true) => data,
        _ => return Err(ScsiError::invalid_field_in_cdb()),
    };
    let blocks = u64::from(r.blocks);
    let _g = lu.ranges.lock(r.lba, blocks);
    // UNMAP=1 deallocates whatever the pattern (as Linux-IO does): libiscsi
    // test_writesame10_unmap_until_end sends 0xFF blocks with UNMAP=1 and, since we report
    // LBPRZ=1, expects zeroes back.
    if unmap {
        lu.backend
            .discard(r.lba * lu.bs(), blocks * lu.bs())
            .map_err(write_error)?;
    } else {
        let per_chunk = (limits::WRITE_SAME_CHUNK_BYTES / bs).max(1);
        let chunk: Vec<u8> = pattern.repeat(per_chunk.min(blocks as usize));
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(per_chunk as u64) as usize;
            lu.backend
                .write_at(&chunk[..n * bs], (r.lba + done) * lu.bs())
                .map_err(write_error)?;
            done += n as u64;
        }
    }
    lu.complete_write(false)?;
    Ok(Reply::good())
}

/// UNMAP (SBC-3 §5.28).
pub(crate) fn unmap(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> CmdResult {
    if cdb[1] & 0x01 != 0 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(0)));
    }
    let plen = be(cdb, 7, 2)? as usize;
    if plen == 0 {
        return Ok(Reply::good());
    }
    if plen < 8 || data.len() < 8 {
        return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let p = &data[..plen.min(data.len())];
    let bdl = be(p, 2, 2)? as usize;
    let n = bdl.min(p.len() - 8) / 16;
    if n as u32 > limits::UNMAP_DESCRIPTORS_MAX {
        return Err(ScsiError::invalid_field_in_param());
    }
    let mut ranges = Vec::with_capacity(n);
    let mut total = 0u64;
    for i in 0..n {
        let d = &p[8 + 16 * i..8 + 16 * (i + 1)];
        let lba = be(d, 0, 8)?;
        let count = be(d, 8, 4)?;
        // A 0-block descriptor right at the end of the medium is fine (libiscsi
        // test_unmap_0blocks); anything running past it is not.
        if lba.checked_add(count).is_none_or(|e| e > lu.block_count) {
            return Err(ScsiError::lba_out_of_range());
        }
        total += count;
        if total > u64::from(limits::UNMAP_BLOCKS_MAX) {
            return Err(ScsiError::invalid_field_in_param());
        }
        if count > 0 {
            ranges.push((lba, count));
        }
    }
    lu.check_writable()?;
    for (lba, count) in ranges {
        let _g = lu.ranges.lock(lba, count);
        lu.backend
            .discard(lba * lu.bs(), count * lu.bs())
            .map_err(write_error)?;
    }
    lu.complete_write(false)?;
    Ok(Reply::good())
}

/// GET LBA STATUS (SBC-3 §5.6): descriptors from the starting LBA onward.
pub(crate) fn get_lba_status(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let lba = be(cdb, 2, 8)?;
    let alloc = be(cdb, 10, 4)? as u32;
    if lba >= lu.block_count {
        return Err(ScsiError::lba_out_of_range());
    }
    let want = (alloc.saturating_sub(8) / 16).clamp(1, limits::LBA_STATUS_DESCRIPTORS_MAX);
    let bs = lu.bs();
    let mut descs = Vec::new();
    let mut at = lba;
    while at < lu.block_count && (descs.len() as u32) < want {
        // A descriptor's NUMBER OF LOGICAL BLOCKS is 32 bits.
        let span = (lu.block_count - at).min(u64::from(u32::MAX));
        let (m, len) = lu.backend.mapping(at * bs, span * bs).map_err(read_error)?;
        let blocks = (len / bs).max(1);
        descs.push((at, blocks as u32, m));
        at += blocks;
    }
    let mut d = vec![0u8; 8];
    d[0..4].copy_from_slice(&(4 + 16 * descs.len() as u32).to_be_bytes());
    for (l, n, m) in descs {
        d.extend_from_slice(&l.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.push(match m {
            Mapping::Mapped => 0,
            Mapping::Deallocated => 1,
        });
        d.extend_from_slice(&[0, 0, 0]);
    }
    Ok(Reply::data(d))
}

/// COMPARE AND WRITE (SBC-3 §5.2): atomic against all other writes to the range.
pub(crate) fn compare_and_write(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    check_no_protect(cdb, r.flags)?;
    if r.blocks > limits::CAW_BLOCKS_MAX {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(13, None));
    }
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    if r.blocks == 0 {
        // SBC-3 §5.2: zero blocks is a no-op, but only with an empty Data-Out buffer. With data
        // attached the CDB contradicts the transfer (an initiator that asked for 256 blocks
        // wraps the one-byte field to 0), so refuse it rather than drop the data silently.
        if !data.is_empty() {
            return Err(ScsiError::invalid_field_in_cdb().at_cdb(13, None));
        }
        return Ok(Reply::good());
    }
    lu.check_writable()?;
    let len = (u64::from(r.blocks) * lu.bs()) as usize;
    // The data-out buffer must be exactly verify + write data (libiscsi
    // test_compareandwrite_invalid_dataout_size): more or less is an error.
    if data.len() != 2 * len {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(13, None));
    }
    let (verify, write) = data.split_at(len);
    let _g = lu.ranges.lock(r.lba, u64::from(r.blocks));
    let medium = lu.read_blocks(r.lba, u64::from(r.blocks))?;
    if let Some(off) = first_mismatch(&medium, verify) {
        return Err(miscompare(off));
    }
    lu.backend
        .write_at(write, r.lba * lu.bs())
        .map_err(write_error)?;
    lu.complete_write(r.flags & FUA != 0)?;
    Ok(Reply::good())
}

/// The checks every data-out write makes on its range (LBA, transfer length, write
/// protection), and the number of whole blocks of `data` to write: fewer than the CDB asks
/// for when the transport delivered less (see [`write`]).
fn writable_blocks(lu: &LogicalUnit, r: &RwCdb, data: &[u8]) -> Result<u64, ScsiError> {
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    check_transfer(r.blocks)?;
    lu.check_writable()?;
    Ok(u64::from(r.blocks).min(data.len() as u64 / lu.bs()))
}

/// ORWRITE(16) (SBC-3 §5.7): medium = medium OR data, atomically.
pub(crate) fn orwrite(lu: &LogicalUnit, cdb: &[u8], data: &[u8]) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    check_no_protect(cdb, r.flags)?;
    let blocks = writable_blocks(lu, &r, data)?;
    if blocks == 0 {
        return Ok(Reply::good());
    }
    let bs = lu.bs();
    let _g = lu.ranges.lock(r.lba, blocks);
    let mut medium = lu.read_blocks(r.lba, blocks)?;
    for (m, d) in medium.iter_mut().zip(data) {
        *m |= *d;
    }
    lu.backend
        .write_at(&medium, r.lba * bs)
        .map_err(write_error)?;
    lu.complete_write(r.flags & FUA != 0)?;
    Ok(Reply::good())
}

/// PRE-FETCH(10/16) (SBC-3 §5.9, §5.10): the page cache does this for us; GOOD means
/// "not necessarily cached", which is always true.
pub(crate) fn pre_fetch(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    Ok(Reply::good())
}

/// SYNCHRONIZE CACHE(10/16) (SBC-3 §5.22, §5.23): flush everything (a sync of the whole
/// file costs the same as of a range).
pub(crate) fn synchronize_cache(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let r = RwCdb::parse(cdb)?;
    lu.check_lba(r.lba, u64::from(r.blocks))?;
    lu.backend.flush().map_err(write_error)?;
    Ok(Reply::good())
}

// ---- EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.18) ----

fn copy_aborted(a: super::sense::Asc) -> ScsiError {
    ScsiError::check(SenseKey::CopyAborted, a)
}

/// One validated block→block segment.
struct Segment {
    blocks: u64,
    src: u64,
    dst: u64,
}

/// EXTENDED COPY(LID1): block→block segments (type 02h) between identification
/// descriptors (type E4h) that all name this LU.
pub(crate) fn extended_copy(
    lu: &LogicalUnit,
    nexus: &NexusId,
    cdb: &[u8],
    data: &[u8],
) -> CmdResult {
    if service_action(cdb) != 0x00 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(4)));
    }
    let plen = be(cdb, 10, 4)? as usize;
    if plen == 0 {
        return Ok(Reply::good());
    }
    if plen < 16 || data.len() < plen {
        return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let p = &data[..plen];
    let list_id = p[0];
    let tdl = be(p, 2, 2)? as usize;
    let sdl = be(p, 8, 4)? as usize;
    let inline = be(p, 12, 4)? as usize;
    if inline != 0 {
        return Err(ScsiError::invalid_field_in_param());
    }
    // Truncated descriptors, or more descriptor bytes than MAXIMUM DESCRIPTOR LIST LENGTH
    // (checked before the per-kind counts, as libiscsi test_extendedcopy_descr_limits wants).
    if 16 + tdl + sdl > plen || tdl + sdl > limits::XCOPY_DESCRIPTOR_LIST_BYTES_MAX as usize {
        return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    if !tdl.is_multiple_of(32) {
        return Err(ScsiError::invalid_field_in_param());
    }
    let ntargets = tdl / 32;
    if ntargets > usize::from(limits::XCOPY_TARGET_DESCRIPTORS_MAX) {
        return Err(ScsiError::illegal(asc::TOO_MANY_TARGET_DESCRIPTORS));
    }
    // Target descriptors: each must identify this LU.
    for i in 0..ntargets {
        let t = &p[16 + 32 * i..16 + 32 * (i + 1)];
        if t[0] != 0xe4 {
            return Err(ScsiError::illegal(asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE));
        }
        // Byte 1 (LU ID TYPE, NUL) is ignored: SPC-4 §6.4.5.6 made LU ID TYPE "ignored" for the
        // identification descriptor and the NUL bit obsolete, and we report SPC-4 in INQUIRY.
        let dtype = t[5] & 0x0f;
        let dlen = usize::from(t[7]).min(20);
        let designator = &t[8..8 + dlen];
        let ours = (dtype == 0x03 && designator == lu.naa)
            || (dtype == 0x01 && {
                let mut t10 = lu.cfg.vendor.as_bytes().to_vec();
                t10.resize(8, b' ');
                t10.truncate(8);
                t10.extend_from_slice(lu.serial.as_bytes());
                designator == &t10[..designator.len().min(t10.len())] && dlen == t10.len().min(20)
            });
        if !ours {
            return Err(copy_aborted(asc::COPY_TARGET_DEVICE_NOT_REACHABLE));
        }
        let target_bs = be(t, 29, 3)?;
        if target_bs != 0 && target_bs != lu.bs() {
            return Err(copy_aborted(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        }
    }
    // Segment descriptors.
    let mut segs = Vec::new();
    let mut at = 16 + tdl;
    let end = 16 + tdl + sdl;
    while at < end {
        let Some(hdr) = p.get(at..at + 4) else {
            return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        };
        if segs.len() >= usize::from(limits::XCOPY_SEGMENT_DESCRIPTORS_MAX) {
            return Err(ScsiError::illegal(asc::TOO_MANY_SEGMENT_DESCRIPTORS));
        }
        if hdr[0] != 0x02 {
            return Err(ScsiError::illegal(asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE));
        }
        let dlen = be(hdr, 2, 2)? as usize;
        if dlen != 0x18 {
            return Err(ScsiError::invalid_field_in_param());
        }
        let Some(s) = p.get(at..at + 4 + dlen) else {
            return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        };
        let (si, di) = (be(s, 4, 2)? as usize, be(s, 6, 2)? as usize);
        // A segment naming a target descriptor that does not exist names an unreachable
        // copy target (SPC-4 §6.4.6.1).
        if si >= ntargets || di >= ntargets {
            return Err(copy_aborted(asc::COPY_TARGET_DEVICE_NOT_REACHABLE));
        }
        let blocks = be(s, 10, 2)?;
        let (src, dst) = (be(s, 12, 8)?, be(s, 20, 8)?);
        if lu.check_lba(src, blocks).is_err() || lu.check_lba(dst, blocks).is_err() {
            // Segment processing failed before any data moved: COPY ABORTED with no further
            // ASC, one of the three outcomes SPC-4 §6.4.3 and libiscsi accept.
            return Err(copy_aborted(asc::NO_ADDITIONAL_SENSE));
        }
        segs.push(Segment { blocks, src, dst });
        at += 4 + dlen;
    }
    if !segs.is_empty() {
        lu.check_writable()?;
    }
    let bs = lu.bs();
    let mut copied = 0u64;
    let mut done_segs = 0u16;
    let mut result = Ok(());
    'segments: for s in &segs {
        let step = (limits::XCOPY_CHUNK_BYTES as u64 / bs).max(1);
        let mut off = 0;
        while off < s.blocks {
            let n = (s.blocks - off).min(step);
            let _g = lu.ranges.lock(s.dst + off, n);
            let r = lu.read_blocks(s.src + off, n).and_then(|buf| {
                lu.backend
                    .write_at(&buf, (s.dst + off) * bs)
                    .map_err(write_error)
            });
            if let Err(e) = r {
                result = Err(e);
                break 'segments;
            }
            off += n;
            copied += n;
        }
        done_segs += 1;
    }
    if result.is_ok() {
        result = lu.complete_write(false);
    }
    {
        let mut st = lu.lock_state();
        st.copies
            .retain(|c| !(c.nexus == *nexus && c.list_id == list_id));
        if st.copies.len() >= super::lu::COPY_RESULTS_MAX {
            st.copies.pop_front();
        }
        st.copies.push_back(CopyResult {
            nexus: nexus.clone(),
            list_id,
            ok: result.is_ok(),
            segments: done_segs,
            blocks: u32::try_from(copied).unwrap_or(u32::MAX),
        });
    }
    result.map(|_| Reply::good())
}

/// RECEIVE COPY RESULTS (SPC-4 §6.18): OPERATING PARAMETERS and COPY STATUS.
pub(crate) fn receive_copy_results(lu: &LogicalUnit, nexus: &NexusId, cdb: &[u8]) -> CmdResult {
    match service_action(cdb) {
        rcr::OPERATING_PARAMETERS => {
            let mut d = vec![0u8; 44];
            d[4] = 0x01; // SNLID: list identifiers are meaningful
            d[8..10].copy_from_slice(&limits::XCOPY_TARGET_DESCRIPTORS_MAX.to_be_bytes());
            d[10..12].copy_from_slice(&limits::XCOPY_SEGMENT_DESCRIPTORS_MAX.to_be_bytes());
            d[12..16].copy_from_slice(&limits::XCOPY_DESCRIPTOR_LIST_BYTES_MAX.to_be_bytes());
            d[16..20].copy_from_slice(&limits::XCOPY_SEGMENT_BYTES_MAX.to_be_bytes());
            // Inline data, held data, stream transfer size: none.
            d[36..38].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
            d[38] = 1; // maximum concurrent copies
            d[39] = 9; // data segment granularity: 2^9 = one block
            d[43] = 2; // implemented descriptor codes follow
            d.extend_from_slice(&[0x02, 0xe4]);
            let len = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&len.to_be_bytes());
            Ok(Reply::data(d))
        }
        rcr::COPY_STATUS => {
            let list_id = cdb[2];
            let mut st = lu.lock_state();
            // A result is reported once, then forgotten (the list id may be reused).
            let Some(pos) = st
                .copies
                .iter()
                .position(|c| c.nexus == *nexus && c.list_id == list_id)
            else {
                return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, None));
            };
            let Some(c) = st.copies.remove(pos) else {
                return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, None));
            };
            let mut d = vec![0u8; 12];
            d[0..4].copy_from_slice(&8u32.to_be_bytes());
            // COPY MANAGER STATUS: HDD=0, 01h completed without errors, 02h with errors.
            d[4] = if c.ok { 0x01 } else { 0x02 };
            d[5..7].copy_from_slice(&c.segments.to_be_bytes());
            d[7] = 0xf1; // TRANSFER COUNT UNITS: logical blocks
            d[8..12].copy_from_slice(&c.blocks.to_be_bytes());
            Ok(Reply::data(d))
        }
        _ => Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(4))),
    }
}
