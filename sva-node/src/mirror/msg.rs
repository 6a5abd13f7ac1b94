//! Peer messages of the replication link and their binary codec.
//!
//! Every message carries the sender's epoch; the engine refuses messages from older epochs.
//! A frame is `u32 body length (big endian) | u8 kind | fields`. Decoding is two-step (check the
//! length, then parse) over `bytes`, bounded by the named limits below, and never panics on
//! garbage: every read checks the remaining length first.
//!
//! Receiving large frames: once [`decode`] has seen the header of a frame of at least
//! [`FRAME_OWN_BUFFER_BYTES`] it makes the receive buffer hold the whole frame in one
//! allocation (no growth copies while it arrives), and a `CopyData` payload starts on a
//! [`COPY_DATA_ALIGN`] boundary there, so the resync target writes it with `O_DIRECT` straight
//! from the receive buffer (`store::file`): the payload is never copied in user space. A
//! `CopyData` frame that fits in a 2 MiB [`HugeBuf`](crate::store::hugebuf::HugeBuf) is
//! received into one instead ([`huge_copy_frame`], [`decode_frame`]): reused memory, no page
//! faults, and one physically contiguous piece for the direct write (no staging copy).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::witness::{Membership, PlexRecord, PlexState};

/// Plex id (1-based, as in the membership record).
pub type PlexId = u16;
/// Membership epoch.
pub type Epoch = u64;
/// Global sequence number of an ordered op (monotonic across epochs).
pub type Seq = u64;

/// Largest frame body accepted (a view-change state message carries un-settled ops).
pub const FRAME_BYTES_MAX: usize = 256 << 20;
/// Largest opaque op payload: an encoded SCSI command with its data-out, so the largest
/// write the LU accepts plus room for the CDB, nexus and framing.
pub const PAYLOAD_BYTES_MAX: usize =
    crate::scsi::sbc::limits::TRANSFER_BLOCKS_MAX as usize * 512 + (64 << 10);
/// Most entries in one view-change message (bounded by the engine's log).
pub const ENTRIES_MAX: usize = 4096;
/// Most plexes in a membership record.
pub const PLEXES_MAX: usize = 16;
/// Longest string (node name, portal, address) in a membership record.
pub const STRING_BYTES_MAX: usize = 1024;
/// Most activity-log regions in one `JoinRequest` (the driver's log holds far fewer).
pub const ACTIVITY_LOG_REGIONS_MAX: usize = 1 << 16;
/// Largest `CopyData` payload (one region; the configured region size is far smaller).
pub const COPY_BYTES_MAX: usize = 64 << 20;

/// A frame body at least this large is received into a buffer sized for it at once.
pub const FRAME_OWN_BUFFER_BYTES: usize = 64 << 10;
/// Alignment of a large `CopyData` payload in the receive buffer: a page, which direct I/O
/// accepts on every device and filesystem.
pub const COPY_DATA_ALIGN: usize = 4096;
/// Where a `CopyData` payload starts in its frame: length, kind, epoch, seq, data length.
const COPY_DATA_PAYLOAD_OFFSET: usize = 4 + 1 + 8 + 8 + 4;

/// A range of logical blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LbaRange {
    pub lba: u64,
    pub blocks: u32,
}

impl LbaRange {
    /// One past the last block (saturating).
    pub fn end(&self) -> u64 {
        self.lba.saturating_add(u64::from(self.blocks))
    }
    pub fn overlaps(&self, o: &LbaRange) -> bool {
        self.lba < o.end() && o.lba < self.end()
    }
}

/// What an op touches, for ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpRange {
    /// Writes (at most) these blocks. UNMAP with many descriptors and XCOPY use a covering range.
    Blocks(LbaRange),
    /// Changes LU metadata only (PR OUT, RESERVE/RELEASE, MODE SELECT): ordered against
    /// every other op, writes no block.
    Barrier,
}

impl OpRange {
    pub fn overlaps(&self, o: &OpRange) -> bool {
        match (self, o) {
            (OpRange::Blocks(a), OpRange::Blocks(b)) => a.overlaps(b),
            _ => true,
        }
    }
}

/// A state-changing op as the engine sees it: its range and an opaque payload (the encoded
/// SCSI command, with nexus and data-out) that the driver decodes when it applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpMeta {
    pub range: OpRange,
    pub payload: Bytes,
}

/// An ordered op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: Seq,
    /// Epoch whose sequencer assigned `seq` (seqs beyond a view change's cut are reused).
    pub tag: Epoch,
    /// Plex whose initiator submitted it (it acks the initiator).
    pub origin: PlexId,
    /// The origin's local id for it (deduplicates retransmitted forwards).
    pub fwd: u64,
    pub meta: OpMeta,
}

/// One plex's view-change report: its un-settled log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochState {
    /// Every op `<= settled` is applied on every plex of the reporter's last epoch.
    pub settled: Seq,
    /// Last epoch in which the reporter was serving, and the seq cut that epoch started from.
    pub active_epoch: Epoch,
    pub active_base: Seq,
    /// Un-settled entries, with whether the reporter applied (or is applying) them.
    pub entries: Vec<(Entry, bool)>,
}

/// Peer message. Authentication and the Hello exchange belong to the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Origin → sequencer: order this op (sent again until `Ordered` arrives).
    Forward {
        epoch: Epoch,
        fwd: u64,
        /// Every fwd id `<= floor` of this origin is known to the origin as ordered.
        floor: u64,
        meta: OpMeta,
    },
    /// Sequencer → plex: apply this op at its place.
    Apply { epoch: Epoch, entry: Entry },
    /// Sequencer → origin: your op `fwd` got `seq` (the origin holds the payload).
    Ordered { epoch: Epoch, seq: Seq, fwd: u64 },
    /// Plex → origin: I applied `seq`; every op `<= applied_prefix` is applied here too
    /// (the origin's log GC needs that promptly, not at the next heartbeat).
    Applied {
        epoch: Epoch,
        seq: Seq,
        applied_prefix: Seq,
    },
    /// Plex → in-sync peer or source: my applied prefix moved (sent every
    /// `PROGRESS_STEP` ops to peers that get no `Applied` from me, so their logs settle).
    Progress { epoch: Epoch, applied_prefix: Seq },
    /// Liveness, cumulative progress and read lease (`ts` is echoed back as `echo`).
    Heartbeat {
        epoch: Epoch,
        applied_prefix: Seq,
        seq_high: Seq,
        ts: u64,
        echo: u64,
    },
    /// Plex → sequencer: send again every op from `from`.
    Resend { epoch: Epoch, from: Seq },
    /// A newer membership record (from the witness): adopt it.
    NewEpoch { membership: Membership },
    /// Member → coordinator of a new epoch: my un-settled log.
    State { epoch: Epoch, state: EpochState },
    /// Coordinator → member: the reconciled ops `(base, high]`, in order; serve from `high`.
    Sync {
        epoch: Epoch,
        base: Seq,
        high: Seq,
        entries: Vec<Entry>,
    },
    /// Non-InSync plex → every peer (re-sent every `RETRANSMIT_MS` until accepted): resync me.
    /// `activity_log`: regions where my plex may differ (from my activity log, or ops I applied
    /// before I was excluded); `full`: my data is not valid (new or wiped plex). An in-sync
    /// peer that is serving and still lists the sender InSync answers `NewEpoch` instead
    /// (RESYNC.md: a restarted node waits while a peer serves).
    JoinRequest {
        epoch: Epoch,
        activity_log: Vec<u64>,
        full: bool,
        /// Full, and no source accepted me since my data was lost: start over (a re-wipe).
        /// A full request that is not fresh resumes where a source that filled me left off.
        fresh: bool,
    },
    /// Sequencer (the resync source) → joining plex: you are a learner; every op from
    /// `start_seq` on reaches you as `Apply` (drop any earlier one: the copies cover it);
    /// `dirty_regions` regions will be copied.
    JoinAccept {
        membership: Membership,
        start_seq: Seq,
        dirty_regions: u64,
    },
    /// Source → learner: the data of copy op `seq` (empty: zeros / a hole).
    CopyData { epoch: Epoch, seq: Seq, data: Bytes },
    /// In-sync plex → sequencer: my checksum of verify op `seq`'s region.
    ChecksumIs {
        epoch: Epoch,
        seq: Seq,
        checksum: [u8; 32],
    },
}

impl Message {
    /// Whether this is an op for the receiver to order or apply, on a write's critical path
    /// (the receiver's link polls for the next one; `link` module doc).
    pub fn carries_op(&self) -> bool {
        matches!(self, Message::Forward { .. } | Message::Apply { .. })
    }

    pub fn epoch(&self) -> Epoch {
        match self {
            Message::Forward { epoch, .. }
            | Message::Apply { epoch, .. }
            | Message::Ordered { epoch, .. }
            | Message::Applied { epoch, .. }
            | Message::Progress { epoch, .. }
            | Message::Heartbeat { epoch, .. }
            | Message::Resend { epoch, .. }
            | Message::State { epoch, .. }
            | Message::Sync { epoch, .. }
            | Message::JoinRequest { epoch, .. }
            | Message::CopyData { epoch, .. }
            | Message::ChecksumIs { epoch, .. } => *epoch,
            Message::NewEpoch { membership } | Message::JoinAccept { membership, .. } => {
                membership.epoch
            }
        }
    }
}

/// Why a frame could not be decoded. Every variant is fatal to the peer connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("frame truncated")]
    Truncated,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes in frame")]
    Trailing(usize),
}

const K_FORWARD: u8 = 1;
const K_APPLY: u8 = 2;
const K_ORDERED: u8 = 3;
const K_APPLIED: u8 = 4;
const K_HEARTBEAT: u8 = 5;
const K_RESEND: u8 = 6;
const K_NEW_EPOCH: u8 = 7;
const K_STATE: u8 = 8;
const K_SYNC: u8 = 9;
const K_JOIN_REQUEST: u8 = 10;
const K_JOIN_ACCEPT: u8 = 11;
const K_COPY_DATA: u8 = 12;
const K_CHECKSUM_IS: u8 = 13;
const K_PROGRESS: u8 = 14;

/// Append one frame for `msg` to `out`.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    let start = out.len();
    out.put_u32(0);
    match msg {
        Message::Forward {
            epoch,
            fwd,
            floor,
            meta,
        } => {
            out.put_u8(K_FORWARD);
            out.put_u64(*epoch);
            out.put_u64(*fwd);
            out.put_u64(*floor);
            put_meta(out, meta);
        }
        Message::Apply { epoch, entry } => {
            out.put_u8(K_APPLY);
            out.put_u64(*epoch);
            put_entry(out, entry);
        }
        Message::Ordered { epoch, seq, fwd } => {
            out.put_u8(K_ORDERED);
            out.put_u64(*epoch);
            out.put_u64(*seq);
            out.put_u64(*fwd);
        }
        Message::Applied {
            epoch,
            seq,
            applied_prefix,
        } => {
            out.put_u8(K_APPLIED);
            out.put_u64(*epoch);
            out.put_u64(*seq);
            out.put_u64(*applied_prefix);
        }
        Message::Progress {
            epoch,
            applied_prefix,
        } => {
            out.put_u8(K_PROGRESS);
            out.put_u64(*epoch);
            out.put_u64(*applied_prefix);
        }
        Message::Heartbeat {
            epoch,
            applied_prefix,
            seq_high,
            ts,
            echo,
        } => {
            out.put_u8(K_HEARTBEAT);
            for v in [*epoch, *applied_prefix, *seq_high, *ts, *echo] {
                out.put_u64(v);
            }
        }
        Message::Resend { epoch, from } => {
            out.put_u8(K_RESEND);
            out.put_u64(*epoch);
            out.put_u64(*from);
        }
        Message::NewEpoch { membership } => {
            out.put_u8(K_NEW_EPOCH);
            put_membership(out, membership);
        }
        Message::State { epoch, state } => {
            out.put_u8(K_STATE);
            out.put_u64(*epoch);
            out.put_u64(state.settled);
            out.put_u64(state.active_epoch);
            out.put_u64(state.active_base);
            out.put_u32(state.entries.len() as u32);
            for (e, applied) in &state.entries {
                put_entry(out, e);
                out.put_u8(u8::from(*applied));
            }
        }
        Message::Sync {
            epoch,
            base,
            high,
            entries,
        } => {
            out.put_u8(K_SYNC);
            out.put_u64(*epoch);
            out.put_u64(*base);
            out.put_u64(*high);
            out.put_u32(entries.len() as u32);
            for e in entries {
                put_entry(out, e);
            }
        }
        Message::JoinRequest {
            epoch,
            activity_log,
            full,
            fresh,
        } => {
            out.put_u8(K_JOIN_REQUEST);
            out.put_u64(*epoch);
            out.put_u8(u8::from(*full) | (u8::from(*fresh) << 1));
            let n = activity_log.len().min(ACTIVITY_LOG_REGIONS_MAX);
            out.put_u32(n as u32);
            for r in activity_log.iter().take(n) {
                out.put_u64(*r);
            }
        }
        Message::JoinAccept {
            membership,
            start_seq,
            dirty_regions,
        } => {
            out.put_u8(K_JOIN_ACCEPT);
            put_membership(out, membership);
            out.put_u64(*start_seq);
            out.put_u64(*dirty_regions);
        }
        Message::CopyData { epoch, seq, data } => {
            out.put_u8(K_COPY_DATA);
            out.put_u64(*epoch);
            out.put_u64(*seq);
            out.put_u32(data.len() as u32);
            out.put_slice(data);
        }
        Message::ChecksumIs {
            epoch,
            seq,
            checksum,
        } => {
            out.put_u8(K_CHECKSUM_IS);
            out.put_u64(*epoch);
            out.put_u64(*seq);
            out.put_slice(checksum);
        }
    }
    let body = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&body.to_be_bytes());
}

/// A `CopyData` payload at least this large is not copied by [`encode_split`].
pub const SPLIT_PAYLOAD_BYTES: usize = 64 << 10;

/// [`encode`], except that a large `CopyData` payload is left out of `out` and returned: the
/// frame is `out`'s new bytes followed by it (the link writes both with one vectored write,
/// so a resync's data is never copied on the sending side).
pub fn encode_split(msg: &Message, out: &mut BytesMut) -> Option<Bytes> {
    match msg {
        Message::CopyData { epoch, seq, data } if data.len() >= SPLIT_PAYLOAD_BYTES => {
            let body = COPY_DATA_PAYLOAD_OFFSET - 4 + data.len();
            out.put_u32(body as u32);
            out.put_u8(K_COPY_DATA);
            out.put_u64(*epoch);
            out.put_u64(*seq);
            out.put_u32(data.len() as u32);
            Some(data.clone())
        }
        _ => {
            encode(msg, out);
            None
        }
    }
}

/// Take one frame off the front of `buf`. `Ok(None)`: not enough bytes yet.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(CodecError::FrameTooLarge(len));
    }
    if buf.len() < 4 + len {
        make_room_for_frame(buf, len);
        return Ok(None);
    }
    buf.advance(4);
    parse_body(buf.split_to(len).freeze()).map(Some)
}

/// If `buf` starts with the header of a large `CopyData` frame that fits in a
/// [`HugeBuf`](crate::store::hugebuf::HugeBuf): the frame's length (prefix included) and
/// the offset in the buffer where it goes so that its payload is [`COPY_DATA_ALIGN`]ed. The
/// link reader then receives it there instead of through [`decode`] (see the module doc).
pub fn huge_copy_frame(buf: &[u8]) -> Option<(usize, usize)> {
    let (Some(len), Some(&kind)) = (buf.get(..4), buf.get(4)) else {
        return None;
    };
    let body = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    // Larger than a huge buffer (beyond FRAME_BYTES_MAX too): `decode`'s to take or refuse.
    if kind != K_COPY_DATA || body < FRAME_OWN_BUFFER_BYTES {
        return None;
    }
    let frame = 4 + body;
    let at = COPY_DATA_PAYLOAD_OFFSET.wrapping_neg() % COPY_DATA_ALIGN;
    (at + frame <= crate::store::hugebuf::HUGE_BYTES).then_some((frame, at))
}

/// Decode one whole frame (length prefix included), as [`decode`] does; its byte fields
/// (a `CopyData` payload) are slices of `frame`.
pub fn decode_frame(mut frame: Bytes) -> Result<Message, CodecError> {
    if frame.len() < 4 {
        return Err(CodecError::Truncated);
    }
    let len = frame.get_u32() as usize;
    if len != frame.len() {
        return Err(CodecError::Invalid("frame length"));
    }
    parse_body(frame)
}

/// One frame's body, wholly: a message with no bytes left over.
fn parse_body(mut body: Bytes) -> Result<Message, CodecError> {
    let msg = parse(&mut body)?;
    if body.has_remaining() {
        return Err(CodecError::Trailing(body.remaining()));
    }
    Ok(msg)
}

/// `buf` holds the start of a frame with a `body`-byte body (already checked against
/// [`FRAME_BYTES_MAX`]): if it is large, give it one buffer that fits the whole frame, with a
/// `CopyData` payload page-aligned (see the module doc). Copies only the part received so far.
fn make_room_for_frame(buf: &mut BytesMut, body: usize) {
    // Beyond the largest copy (a view-change message, rare) the buffer grows as bytes
    // arrive instead: a header alone never commits that much memory.
    if !(FRAME_OWN_BUFFER_BYTES..=COPY_BYTES_MAX + COPY_DATA_PAYLOAD_OFFSET).contains(&body) {
        return;
    }
    let frame = 4 + body;
    // Without the kind byte we cannot tell whether to align: wait for it rather than size a
    // buffer that the next call might have to replace, frame and all.
    let Some(&kind) = buf.get(4) else {
        return;
    };
    let align = if kind == K_COPY_DATA {
        COPY_DATA_ALIGN
    } else {
        1
    };
    let payload_at = buf.as_ptr() as usize + COPY_DATA_PAYLOAD_OFFSET;
    if buf.capacity() >= frame && payload_at.is_multiple_of(align) {
        return;
    }
    let mut fresh = BytesMut::with_capacity(frame + align);
    let pad = (fresh.as_ptr() as usize + COPY_DATA_PAYLOAD_OFFSET).wrapping_neg() % align;
    fresh.put_bytes(0, pad);
    fresh.advance(pad);
    fresh.extend_from_slice(buf);
    *buf = fresh;
}

fn parse(b: &mut Bytes) -> Result<Message, CodecError> {
    let kind = u8_(b)?;
    Ok(match kind {
        K_FORWARD => Message::Forward {
            epoch: u64_(b)?,
            fwd: u64_(b)?,
            floor: u64_(b)?,
            meta: meta(b)?,
        },
        K_APPLY => Message::Apply {
            epoch: u64_(b)?,
            entry: entry(b)?,
        },
        K_ORDERED => Message::Ordered {
            epoch: u64_(b)?,
            seq: u64_(b)?,
            fwd: u64_(b)?,
        },
        K_APPLIED => Message::Applied {
            epoch: u64_(b)?,
            seq: u64_(b)?,
            applied_prefix: u64_(b)?,
        },
        K_PROGRESS => Message::Progress {
            epoch: u64_(b)?,
            applied_prefix: u64_(b)?,
        },
        K_HEARTBEAT => Message::Heartbeat {
            epoch: u64_(b)?,
            applied_prefix: u64_(b)?,
            seq_high: u64_(b)?,
            ts: u64_(b)?,
            echo: u64_(b)?,
        },
        K_RESEND => Message::Resend {
            epoch: u64_(b)?,
            from: u64_(b)?,
        },
        K_NEW_EPOCH => Message::NewEpoch {
            membership: membership(b)?,
        },
        K_STATE => {
            let epoch = u64_(b)?;
            let settled = u64_(b)?;
            let active_epoch = u64_(b)?;
            let active_base = u64_(b)?;
            let n = count(b)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let e = entry(b)?;
                let applied = match u8_(b)? {
                    0 => false,
                    1 => true,
                    _ => return Err(CodecError::Invalid("applied flag")),
                };
                entries.push((e, applied));
            }
            Message::State {
                epoch,
                state: EpochState {
                    settled,
                    active_epoch,
                    active_base,
                    entries,
                },
            }
        }
        K_SYNC => {
            let epoch = u64_(b)?;
            let base = u64_(b)?;
            let high = u64_(b)?;
            let n = count(b)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push(entry(b)?);
            }
            Message::Sync {
                epoch,
                base,
                high,
                entries,
            }
        }
        K_JOIN_REQUEST => {
            let epoch = u64_(b)?;
            let flags = u8_(b)?;
            if flags > 3 {
                return Err(CodecError::Invalid("join flags"));
            }
            let (full, fresh) = (flags & 1 != 0, flags & 2 != 0);
            let n = u32_(b)? as usize;
            if n > ACTIVITY_LOG_REGIONS_MAX {
                return Err(CodecError::Invalid("activity log length"));
            }
            need(b, n * 8)?;
            let activity_log = (0..n).map(|_| b.get_u64()).collect();
            Message::JoinRequest {
                epoch,
                activity_log,
                full,
                fresh,
            }
        }
        K_JOIN_ACCEPT => Message::JoinAccept {
            membership: membership(b)?,
            start_seq: u64_(b)?,
            dirty_regions: u64_(b)?,
        },
        K_COPY_DATA => {
            let epoch = u64_(b)?;
            let seq = u64_(b)?;
            let n = u32_(b)? as usize;
            if n > COPY_BYTES_MAX {
                return Err(CodecError::Invalid("copy length"));
            }
            need(b, n)?;
            Message::CopyData {
                epoch,
                seq,
                data: b.split_to(n),
            }
        }
        K_CHECKSUM_IS => {
            let epoch = u64_(b)?;
            let seq = u64_(b)?;
            need(b, 32)?;
            let mut checksum = [0u8; 32];
            b.copy_to_slice(&mut checksum);
            Message::ChecksumIs {
                epoch,
                seq,
                checksum,
            }
        }
        k => return Err(CodecError::UnknownKind(k)),
    })
}

fn need(b: &Bytes, n: usize) -> Result<(), CodecError> {
    if b.remaining() < n {
        Err(CodecError::Truncated)
    } else {
        Ok(())
    }
}
fn u8_(b: &mut Bytes) -> Result<u8, CodecError> {
    need(b, 1)?;
    Ok(b.get_u8())
}
fn u16_(b: &mut Bytes) -> Result<u16, CodecError> {
    need(b, 2)?;
    Ok(b.get_u16())
}
fn u32_(b: &mut Bytes) -> Result<u32, CodecError> {
    need(b, 4)?;
    Ok(b.get_u32())
}
fn u64_(b: &mut Bytes) -> Result<u64, CodecError> {
    need(b, 8)?;
    Ok(b.get_u64())
}
fn count(b: &mut Bytes) -> Result<usize, CodecError> {
    let n = u32_(b)? as usize;
    if n > ENTRIES_MAX {
        return Err(CodecError::Invalid("entry count"));
    }
    Ok(n)
}

fn put_meta(out: &mut BytesMut, m: &OpMeta) {
    match m.range {
        OpRange::Blocks(r) => {
            out.put_u8(0);
            out.put_u64(r.lba);
            out.put_u32(r.blocks);
        }
        OpRange::Barrier => out.put_u8(1),
    }
    out.put_u32(m.payload.len() as u32);
    out.put_slice(&m.payload);
}
fn meta(b: &mut Bytes) -> Result<OpMeta, CodecError> {
    let range = match u8_(b)? {
        0 => OpRange::Blocks(LbaRange {
            lba: u64_(b)?,
            blocks: u32_(b)?,
        }),
        1 => OpRange::Barrier,
        _ => return Err(CodecError::Invalid("range kind")),
    };
    let n = u32_(b)? as usize;
    if n > PAYLOAD_BYTES_MAX {
        return Err(CodecError::Invalid("payload length"));
    }
    need(b, n)?;
    Ok(OpMeta {
        range,
        payload: b.split_to(n),
    })
}
fn put_entry(out: &mut BytesMut, e: &Entry) {
    out.put_u64(e.seq);
    out.put_u64(e.tag);
    out.put_u16(e.origin);
    out.put_u64(e.fwd);
    put_meta(out, &e.meta);
}
fn entry(b: &mut Bytes) -> Result<Entry, CodecError> {
    Ok(Entry {
        seq: u64_(b)?,
        tag: u64_(b)?,
        origin: u16_(b)?,
        fwd: u64_(b)?,
        meta: meta(b)?,
    })
}
fn put_str(out: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(STRING_BYTES_MAX)];
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}
fn string(b: &mut Bytes) -> Result<String, CodecError> {
    let n = u16_(b)? as usize;
    if n > STRING_BYTES_MAX {
        return Err(CodecError::Invalid("string length"));
    }
    need(b, n)?;
    let raw = b.split_to(n);
    String::from_utf8(raw.to_vec()).map_err(|_| CodecError::Invalid("utf-8"))
}
fn put_membership(out: &mut BytesMut, m: &Membership) {
    out.put_u64(m.epoch);
    out.put_u16(m.sequencer);
    out.put_u8(m.plexes.len().min(PLEXES_MAX) as u8);
    for p in m.plexes.iter().take(PLEXES_MAX) {
        out.put_u16(p.id);
        out.put_u8(match p.state {
            PlexState::InSync => 0,
            PlexState::Stale => 1,
            PlexState::Resyncing => 2,
            PlexState::Removed => 3,
        });
        put_str(out, &p.node);
        put_str(out, &p.portal);
        put_str(out, &p.peer_addr);
    }
}
fn membership(b: &mut Bytes) -> Result<Membership, CodecError> {
    let epoch = u64_(b)?;
    let sequencer = u16_(b)?;
    let n = u8_(b)? as usize;
    if n > PLEXES_MAX {
        return Err(CodecError::Invalid("plex count"));
    }
    let mut plexes = Vec::with_capacity(n);
    for _ in 0..n {
        let id = u16_(b)?;
        let state = match u8_(b)? {
            0 => PlexState::InSync,
            1 => PlexState::Stale,
            2 => PlexState::Resyncing,
            3 => PlexState::Removed,
            _ => return Err(CodecError::Invalid("plex state")),
        };
        plexes.push(PlexRecord {
            id,
            state,
            node: string(b)?,
            portal: string(b)?,
            peer_addr: string(b)?,
        });
    }
    Ok(Membership {
        epoch,
        plexes,
        sequencer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_meta() -> impl Strategy<Value = OpMeta> {
        (
            prop_oneof![
                (any::<u64>(), any::<u32>())
                    .prop_map(|(lba, blocks)| OpRange::Blocks(LbaRange { lba, blocks })),
                Just(OpRange::Barrier)
            ],
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(range, p)| OpMeta {
                range,
                payload: Bytes::from(p),
            })
    }
    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
            any::<u64>(),
            arb_meta(),
        )
            .prop_map(|(seq, tag, origin, fwd, meta)| Entry {
                seq,
                tag,
                origin,
                fwd,
                meta,
            })
    }
    fn arb_membership() -> impl Strategy<Value = Membership> {
        (
            any::<u64>(),
            any::<u16>(),
            proptest::collection::vec(
                (any::<u16>(), 0u8..4, "[a-z0-9:.]{0,12}", "[a-z0-9:.]{0,12}"),
                0..4,
            ),
        )
            .prop_map(|(epoch, sequencer, ps)| Membership {
                epoch,
                sequencer,
                plexes: ps
                    .into_iter()
                    .map(|(id, s, node, portal)| PlexRecord {
                        id,
                        node,
                        peer_addr: portal.clone(),
                        portal,
                        state: [
                            PlexState::InSync,
                            PlexState::Stale,
                            PlexState::Resyncing,
                            PlexState::Removed,
                        ][s as usize],
                    })
                    .collect(),
            })
    }
    fn arb_msg() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<u64>(), arb_meta()).prop_map(
                |(epoch, fwd, floor, meta)| Message::Forward {
                    epoch,
                    fwd,
                    floor,
                    meta
                }
            ),
            (any::<u64>(), arb_entry()).prop_map(|(epoch, entry)| Message::Apply { epoch, entry }),
            (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(epoch, seq, fwd)| Message::Ordered { epoch, seq, fwd }),
            any::<[u64; 3]>().prop_map(|v| Message::Applied {
                epoch: v[0],
                seq: v[1],
                applied_prefix: v[2]
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, applied_prefix)| Message::Progress {
                epoch,
                applied_prefix
            }),
            any::<[u64; 5]>().prop_map(|v| Message::Heartbeat {
                epoch: v[0],
                applied_prefix: v[1],
                seq_high: v[2],
                ts: v[3],
                echo: v[4]
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(epoch, from)| Message::Resend { epoch, from }),
            arb_membership().prop_map(|membership| Message::NewEpoch { membership }),
            (
                any::<[u64; 4]>(),
                proptest::collection::vec((arb_entry(), any::<bool>()), 0..4)
            )
                .prop_map(|(v, entries)| Message::State {
                    epoch: v[0],
                    state: EpochState {
                        settled: v[1],
                        active_epoch: v[2],
                        active_base: v[3],
                        entries
                    }
                }),
            (
                any::<[u64; 3]>(),
                proptest::collection::vec(arb_entry(), 0..4)
            )
                .prop_map(|(v, entries)| Message::Sync {
                    epoch: v[0],
                    base: v[1],
                    high: v[2],
                    entries
                }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..8),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(epoch, activity_log, full, fresh)| Message::JoinRequest {
                    epoch,
                    activity_log,
                    full,
                    fresh
                }),
            (arb_membership(), any::<u64>(), any::<u64>()).prop_map(
                |(membership, start_seq, dirty_regions)| Message::JoinAccept {
                    membership,
                    start_seq,
                    dirty_regions
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(epoch, seq, d)| Message::CopyData {
                    epoch,
                    seq,
                    data: Bytes::from(d)
                }),
            (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(epoch, seq, checksum)| {
                Message::ChecksumIs {
                    epoch,
                    seq,
                    checksum,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msgs in proptest::collection::vec(arb_msg(), 1..4), cut in 0usize..64) {
            let mut buf = BytesMut::new();
            for m in &msgs {
                encode(m, &mut buf);
            }
            // Feed in two pieces: a partial frame is `Ok(None)`, never an error.
            let total = buf.len();
            let mut rx = BytesMut::new();
            rx.extend_from_slice(&buf[..cut.min(total)]);
            let mut out = Vec::new();
            while let Some(m) = decode(&mut rx).unwrap() {
                out.push(m);
            }
            rx.extend_from_slice(&buf[cut.min(total)..]);
            while let Some(m) = decode(&mut rx).unwrap() {
                out.push(m);
            }
            prop_assert_eq!(out, msgs);
            prop_assert!(rx.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut b = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match decode(&mut b) {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }

        #[test]
        fn garbage_body_in_valid_frame_never_panics(body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut b = BytesMut::new();
            b.put_u32(body.len() as u32);
            b.extend_from_slice(&body);
            let _ = decode(&mut b);
        }
    }

    #[test]
    fn resync_messages_refuse_oversized_lengths() {
        // A JoinRequest claiming more activity-log regions than the limit.
        let mut b = BytesMut::new();
        b.put_u32(1 + 8 + 1 + 4);
        b.put_u8(K_JOIN_REQUEST);
        b.put_u64(1);
        b.put_u8(0);
        b.put_u32(ACTIVITY_LOG_REGIONS_MAX as u32 + 1);
        assert_eq!(
            decode(&mut b),
            Err(CodecError::Invalid("activity log length"))
        );
        // A CopyData whose length runs past the frame.
        let mut b = BytesMut::new();
        b.put_u32(1 + 8 + 8 + 4 + 2);
        b.put_u8(K_COPY_DATA);
        b.put_u64(1);
        b.put_u64(2);
        b.put_u32(3);
        b.put_slice(&[1, 2]);
        assert_eq!(decode(&mut b), Err(CodecError::Truncated));
        // A truncated checksum.
        let mut b = BytesMut::new();
        b.put_u32(1 + 8 + 8 + 31);
        b.put_u8(K_CHECKSUM_IS);
        b.put_u64(1);
        b.put_u64(2);
        b.put_slice(&[0; 31]);
        assert_eq!(decode(&mut b), Err(CodecError::Truncated));
    }

    /// Feeds `wire` to `decode` in `chunk`-byte reads into whatever room the buffer has, as
    /// the link's reader does (`read_buf`), and returns every message.
    fn receive(wire: &[u8], chunk: usize) -> Vec<Message> {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut got = Vec::new();
        let mut rest = wire;
        loop {
            while let Some(m) = decode(&mut buf).expect("decode") {
                got.push(m);
            }
            if rest.is_empty() {
                return got;
            }
            // `read_buf` reads into the spare capacity, reserving a little when there is none.
            if buf.capacity() == buf.len() {
                buf.reserve(64);
            }
            let n = chunk.min(rest.len()).min(buf.capacity() - buf.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    #[test]
    fn a_split_frame_is_byte_for_byte_the_whole_frame() {
        for len in [0, 5, SPLIT_PAYLOAD_BYTES - 1, SPLIT_PAYLOAD_BYTES, 1 << 20] {
            let m = Message::CopyData {
                epoch: 9,
                seq: 4,
                data: Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
            };
            let mut whole = BytesMut::new();
            encode(&m, &mut whole);
            let mut split = BytesMut::from(&b"prefix"[..]);
            let payload = encode_split(&m, &mut split);
            assert_eq!(payload.is_some(), len >= SPLIT_PAYLOAD_BYTES);
            let mut joined = split[6..].to_vec();
            joined.extend_from_slice(&payload.unwrap_or_default());
            assert_eq!(joined, whole.to_vec(), "payload of {len} bytes");
        }
    }

    #[test]
    fn large_copy_data_lands_page_aligned_in_one_buffer() {
        let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 249) as u8).collect();
        let mut wire = BytesMut::new();
        let small = Message::Applied {
            epoch: 3,
            seq: 7,
            applied_prefix: 5,
        };
        encode(&small, &mut wire);
        for seq in 1..=3 {
            encode(
                &Message::CopyData {
                    epoch: 3,
                    seq,
                    data: Bytes::from(data.clone()),
                },
                &mut wire,
            );
            encode(&small, &mut wire);
        }
        for chunk in [1, 7, 4096, 65536, 1 << 21] {
            let got = receive(&wire, chunk);
            assert_eq!(got.len(), 7, "chunk {chunk}");
            for (i, m) in got.iter().enumerate() {
                match m {
                    Message::CopyData { seq, data: d, .. } => {
                        assert_eq!(*seq, i as u64 / 2 + 1);
                        assert!(d[..] == data[..], "payload intact (chunk {chunk})");
                        assert_eq!(d.as_ptr() as usize % COPY_DATA_ALIGN, 0, "chunk {chunk}");
                    }
                    other => assert_eq!(other, &small),
                }
            }
        }
    }

    #[test]
    fn large_frames_grow_the_buffer_once() {
        // An Apply with a 1 MiB payload: after its header the buffer fits the whole frame,
        // so receiving the rest never reallocates (the payload is not copied again).
        let meta = OpMeta {
            range: OpRange::Blocks(LbaRange {
                lba: 0,
                blocks: 2048,
            }),
            payload: Bytes::from(vec![0x5a; 1 << 20]),
        };
        let mut wire = BytesMut::new();
        encode(
            &Message::Apply {
                epoch: 1,
                entry: Entry {
                    seq: 9,
                    tag: 1,
                    origin: 1,
                    fwd: 4,
                    meta,
                },
            },
            &mut wire,
        );
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&wire[..64]);
        assert_eq!(decode(&mut buf), Ok(None));
        assert!(buf.capacity() >= wire.len());
        let at = buf.as_ptr();
        buf.extend_from_slice(&wire[64..]);
        assert_eq!(buf.as_ptr(), at, "no reallocation while the frame arrives");
        assert!(matches!(decode(&mut buf), Ok(Some(Message::Apply { .. }))));
    }

    #[test]
    fn oversized_frame_is_refused_before_buffering() {
        let mut b = BytesMut::new();
        b.put_u32(FRAME_BYTES_MAX as u32 + 1);
        assert_eq!(
            decode(&mut b),
            Err(CodecError::FrameTooLarge(FRAME_BYTES_MAX + 1))
        );
    }
}
