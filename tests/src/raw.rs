//! A minimal raw iSCSI initiator for malformed-input tests: build PDUs byte by byte (RFC 7143
//! §11), log in on a plain TCP socket, send anything, and classify what the target does.
//!
//! Deliberately independent of sva-node's own codec, so a bug there cannot hide itself.
//! No digests, no AHS, one connection per session.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Basic Header Segment length (RFC 7143 §11.2.1).
pub const BHS_LEN: usize = 48;

/// Largest data segment this client accepts from a target (its MaxRecvDataSegmentLength is
/// 8192, but a broken target might send more; 16 MiB bounds the allocation).
pub const DATA_SEGMENT_MAX: usize = 16 << 20;

/// Initiator opcodes (RFC 7143 §11.1.1).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const REJECT: u8 = 0x3f;
}

/// The immediate-delivery bit in byte 0 (RFC 7143 §11.2.1.2).
pub const IMMEDIATE: u8 = 0x40;

/// A raw PDU as received: 48-byte BHS plus data segment (padding stripped).
#[derive(Debug, Clone)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn itt(&self) -> u32 {
        be32(&self.bhs, 16)
    }
    pub fn stat_sn(&self) -> u32 {
        be32(&self.bhs, 24)
    }
    pub fn exp_cmd_sn(&self) -> u32 {
        be32(&self.bhs, 28)
    }
    pub fn max_cmd_sn(&self) -> u32 {
        be32(&self.bhs, 32)
    }
    /// Reject reason (RFC 7143 §11.17.1), for a Reject PDU.
    pub fn reject_reason(&self) -> u8 {
        self.bhs[2]
    }
    /// SCSI status, for a SCSI Response PDU (RFC 7143 §11.4.2).
    pub fn scsi_status(&self) -> u8 {
        self.bhs[3]
    }
    /// Text keys of a Login/Text response data segment.
    pub fn text_keys(&self) -> Vec<(String, String)> {
        parse_text_keys(&self.data)
    }
}

fn be32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Encodes `key=value\0` pairs (RFC 7143 §6.1).
pub fn text_data(keys: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in keys {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes `key=value\0` pairs; ignores malformed entries.
pub fn parse_text_keys(data: &[u8]) -> Vec<(String, String)> {
    data.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Serialises a BHS and data segment with the DataSegmentLength field filled in and the data
/// padded to a 4-byte boundary (RFC 7143 §11.2.1.3, §11.2.3).
pub fn encode(mut bhs: [u8; BHS_LEN], data: &[u8]) -> Vec<u8> {
    let len = data.len() as u32;
    bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..4]);
    let mut out = bhs.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len() + (4 - data.len() % 4) % 4, 0);
    out
}

/// Login Request BHS (RFC 7143 §11.12): transit from `csg` to `nsg` if `transit`.
pub fn login_request_bhs(
    isid: [u8; 6],
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    csg: u8,
    nsg: u8,
    transit: bool,
) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    // Login requests are always immediate (§11.12: the I bit is 1).
    b[0] = IMMEDIATE | opcode::LOGIN_REQUEST;
    b[1] = (if transit { 0x80 } else { 0 }) | ((csg & 3) << 2) | (nsg & 3);
    b[2] = 0; // Version-max
    b[3] = 0; // Version-min
    b[8..14].copy_from_slice(&isid);
    // TSIH 0: a new session. CID 0.
    put32(&mut b, 16, itt);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b
}

/// SCSI Command BHS (RFC 7143 §11.3). `expected_len` is the Expected Data Transfer Length.
pub fn scsi_command_bhs(
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
    cdb: &[u8],
    read: bool,
    write: bool,
    expected_len: u32,
) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = opcode::SCSI_COMMAND;
    // F=1 (no unsolicited Data-Out follows), R/W, ATTR=1 simple.
    b[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 0x01;
    // LUN 0 in bytes 8..16 (single-level flat addressing, §11.3 / SAM).
    put32(&mut b, 16, itt);
    put32(&mut b, 20, expected_len);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    let n = cdb.len().min(16);
    b[32..32 + n].copy_from_slice(&cdb[..n]);
    b
}

/// NOP-Out ping (RFC 7143 §11.18): immediate, asks for a NOP-In (TTT 0xffffffff).
pub fn nop_out_bhs(itt: u32, cmd_sn: u32, exp_stat_sn: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = IMMEDIATE | opcode::NOP_OUT;
    b[1] = 0x80;
    put32(&mut b, 16, itt);
    put32(&mut b, 20, 0xffff_ffff);
    put32(&mut b, 24, cmd_sn);
    put32(&mut b, 28, exp_stat_sn);
    b
}

/// What the target did after we sent something.
#[derive(Debug)]
pub enum Outcome {
    /// A PDU arrived.
    Pdu(Pdu),
    /// The target closed (or reset) the connection.
    Closed,
    /// Nothing within the wait.
    Silence,
}

/// Result of [`RawSession::login`].
#[derive(Debug, Clone)]
pub struct LoginResult {
    pub status_class: u8,
    pub status_detail: u8,
    /// All keys the target sent during login.
    pub keys: Vec<(String, String)>,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub stat_sn: u32,
}

impl LoginResult {
    pub fn key(&self, name: &str) -> Option<&str> {
        self.keys
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The target's declared MaxRecvDataSegmentLength (default 8192, RFC 7143 §13.12).
    pub fn target_max_recv_data_segment_len(&self) -> u32 {
        self.key("MaxRecvDataSegmentLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192)
    }
}

/// Initiator name used by raw sessions.
pub const RAW_INITIATOR: &str = "iqn.2026-01.io.sva.test:raw";

/// A raw TCP connection to a portal.
#[derive(Debug)]
pub struct RawSession {
    stream: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    next_itt: u32,
}

/// How long to wait for a single login response.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on login round trips (a target that answers T=0 forever is broken).
const LOGIN_ROUNDS_MAX: usize = 8;

impl RawSession {
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
        })
    }

    pub fn next_itt(&mut self) -> u32 {
        let itt = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        itt
    }

    /// Normal-session login straight into the operational stage (CSG=1 → NSG=3, no security
    /// negotiation; RFC 7143 §6.3) with the mandatory keys of the first login PDU (§11.12,
    /// §13: InitiatorName, TargetName, SessionType) plus our operational proposals.
    pub fn login(&mut self, target_iqn: &str) -> Result<LoginResult> {
        let isid = [0x80, 0x00, 0x5a, 0x5a, 0x00, 0x01];
        let itt = self.next_itt();
        let keys = text_data(&[
            ("InitiatorName", RAW_INITIATOR),
            ("TargetName", target_iqn),
            ("SessionType", "Normal"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "8192"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
        ]);
        let mut all_keys = Vec::new();
        let mut data = keys;
        for _ in 0..LOGIN_ROUNDS_MAX {
            let bhs = login_request_bhs(isid, itt, self.cmd_sn, self.exp_stat_sn, 1, 3, true);
            self.send(&encode(bhs, &data))?;
            let resp = match self.recv(LOGIN_TIMEOUT)? {
                Outcome::Pdu(p) => p,
                other => bail!("no login response: {other:?}"),
            };
            if resp.opcode() != opcode::LOGIN_RESPONSE {
                bail!("expected Login Response, got opcode {:#04x}", resp.opcode());
            }
            all_keys.extend(resp.text_keys());
            let (class, detail) = (resp.bhs[36], resp.bhs[37]);
            self.exp_stat_sn = resp.stat_sn().wrapping_add(1);
            let transit = resp.bhs[1] & 0x80 != 0;
            let nsg = resp.bhs[1] & 3;
            if class != 0 || (transit && nsg == 3) {
                return Ok(LoginResult {
                    status_class: class,
                    status_detail: detail,
                    keys: all_keys,
                    exp_cmd_sn: resp.exp_cmd_sn(),
                    max_cmd_sn: resp.max_cmd_sn(),
                    stat_sn: resp.stat_sn(),
                });
            }
            // Target wants another round in this stage: send an empty request (§6.2).
            data = Vec::new();
        }
        bail!("login did not complete in {LOGIN_ROUNDS_MAX} rounds")
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("send")?;
        Ok(())
    }

    /// Writes raw bytes, reporting a reset/closed connection as `Ok(false)`.
    pub fn try_send(&mut self, bytes: &[u8]) -> Result<bool> {
        match self.stream.write_all(bytes) {
            Ok(()) => Ok(true),
            Err(e) if is_closed(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads one PDU, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Outcome> {
        let deadline = Instant::now() + timeout;
        let mut bhs = [0u8; BHS_LEN];
        match self.read_full(&mut bhs, deadline)? {
            ReadResult::Done => {}
            ReadResult::Closed => return Ok(Outcome::Closed),
            ReadResult::Timeout => return Ok(Outcome::Silence),
        }
        let ahs_len = usize::from(bhs[4]) * 4;
        let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
        if data_len > DATA_SEGMENT_MAX {
            bail!("target sent a {data_len}-byte data segment");
        }
        let padded = data_len + (4 - data_len % 4) % 4;
        let mut rest = vec![0u8; ahs_len + padded];
        // Once a BHS has arrived, the rest must follow; give it the full timeout again.
        match self.read_full(&mut rest, Instant::now() + timeout)? {
            ReadResult::Done => {}
            ReadResult::Closed => return Ok(Outcome::Closed),
            ReadResult::Timeout => bail!("truncated PDU from target"),
        }
        let data = rest[ahs_len..ahs_len + data_len].to_vec();
        Ok(Outcome::Pdu(Pdu { bhs, data }))
    }

    /// Reads PDUs until one matches `pred`, the connection closes, or `timeout` passes.
    /// Non-matching PDUs (e.g. target NOP-In pings) are collected in the returned list.
    pub fn recv_until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Pdu) -> bool,
    ) -> Result<(Outcome, Vec<Pdu>)> {
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok((Outcome::Silence, others));
            }
            match self.recv(left)? {
                Outcome::Pdu(p) if pred(&p) => return Ok((Outcome::Pdu(p), others)),
                Outcome::Pdu(p) => {
                    if p.opcode() != opcode::REJECT {
                        self.exp_stat_sn = self.exp_stat_sn.max(p.stat_sn().wrapping_add(1));
                    }
                    others.push(p)
                }
                other => return Ok((other, others)),
            }
        }
    }

    fn read_full(&mut self, buf: &mut [u8], deadline: Instant) -> Result<ReadResult> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(ReadResult::Timeout);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Ok(ReadResult::Closed),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(ReadResult::Timeout)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_closed(&e) => return Ok(ReadResult::Closed),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(ReadResult::Done)
    }

    /// Sends a NOP-Out ping and waits for the matching NOP-In: proves the connection (and the
    /// target's session state) is still usable.
    pub fn ping(&mut self, timeout: Duration) -> Result<bool> {
        let itt = self.next_itt();
        let bhs = nop_out_bhs(itt, self.cmd_sn, self.exp_stat_sn);
        if !self.try_send(&encode(bhs, &[]))? {
            return Ok(false);
        }
        let (outcome, _) =
            self.recv_until(timeout, |p| p.opcode() == opcode::NOP_IN && p.itt() == itt)?;
        Ok(matches!(outcome, Outcome::Pdu(_)))
    }
}

enum ReadResult {
    Done,
    Closed,
    Timeout,
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_bhs_layout() {
        let b = login_request_bhs([1, 2, 3, 4, 5, 6], 7, 8, 9, 1, 3, true);
        assert_eq!(b[0], 0x43);
        assert_eq!(b[1], 0x87);
        assert_eq!(&b[8..14], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&b[16..20], &7u32.to_be_bytes());
        assert_eq!(&b[24..28], &8u32.to_be_bytes());
        assert_eq!(&b[28..32], &9u32.to_be_bytes());
    }

    #[test]
    fn encode_sets_length_and_pads() {
        let pdu = encode([0u8; BHS_LEN], b"abcde");
        assert_eq!(pdu.len(), BHS_LEN + 8);
        assert_eq!(&pdu[5..8], &[0, 0, 5]);
        assert_eq!(&pdu[BHS_LEN + 5..], &[0, 0, 0]);
    }

    #[test]
    fn text_keys_round_trip() {
        let d = text_data(&[("A", "1"), ("TargetName", "iqn.x:y")]);
        assert_eq!(
            parse_text_keys(&d),
            [
                ("A".into(), "1".into()),
                ("TargetName".into(), "iqn.x:y".into())
            ]
        );
    }
}
