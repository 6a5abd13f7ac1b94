//! A whole sans-IO iSCSI `Connection` driven by a script of arbitrary steps: raw PDUs,
//! Data-Out answering the last R2T, SCSI completions from a real `LogicalUnit` over a
//! `MemBackend`, TMF completions, clock ticks, shutdown and decode errors.
//!
//! Input: byte 0 picks the login (Normal/Discovery, ImmediateData, InitialR2T, burst
//! sizes, digests, or no scripted login at all), byte 1 the target's limits and offer;
//! then steps, each an op byte and its
//! operands (see `Op`). Invariants checked on every PDU the target sends: it encodes and
//! decodes back to itself, and Data-In / Text Response segments fit the initiator's
//! MaxRecvDataSegmentLength.
#![no_main]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use sva_node::iscsi::pdu::{self, Bhs, DataOut, LoginReq, Pdu, PduError, BHS_LEN, RESERVED_TAG};
use sva_node::iscsi::session::{serial_lt, Connection, Event};
use sva_node::iscsi::TargetConfig;
use sva_node::scsi::{LogicalUnit, LuConfig, NexusId, ScsiCommand, TaskManagement, TmfResponse};
use sva_node::store::MemBackend;

const IQN: &str = "iqn.2024-01.io.sva:fuzz";
/// Largest data segment a scripted PDU carries (keeps one input cheap).
const DATA_LEN_MAX: usize = 16_384;
/// Volume size: small, so that random LBAs are sometimes in range.
const VOLUME_BYTES: u64 = 64 * 512;

/// Byte-at-a-time reader over the fuzz input; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

struct R2tProgress {
    itt: u32,
    ttt: u32,
    offset: u32,
    len: u32,
    sent: u32,
    data_sn: u32,
}

struct Harness {
    conn: Connection,
    lu: LogicalUnit,
    now: Instant,
    /// MaxRecvDataSegmentLength we declared as the initiator.
    ini_mrdsl: usize,
    /// Commands handed out and not completed yet, oldest first.
    executing: VecDeque<(NexusId, u32, ScsiCommand)>,
    tmfs: VecDeque<(NexusId, u32, u64, TaskManagement)>,
    /// The last R2T the target sent and how much of it the script has answered.
    last_r2t: Option<R2tProgress>,
    cmd_sn: u32,
    /// StatSN the next status-carrying response must have (once login succeeded).
    next_stat_sn: Option<u32>,
    /// Last (ExpCmdSN, MaxCmdSN) the target sent in full feature phase.
    window: Option<(u32, u32)>,
}

impl Harness {
    fn feed(&mut self, p: Pdu) {
        self.conn.handle_pdu(p, self.now);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some((p, d)) = self.conn.poll_transmit() {
            let mut wire = BytesMut::new();
            pdu::encode(&p, d, &mut wire);
            let back = pdu::decode(&mut wire, d, 1 << 24);
            assert_eq!(back, Ok(Some(p.clone())), "sent PDU does not round-trip");
            if matches!(p.bhs, Bhs::DataIn(_) | Bhs::TextResp(_)) {
                assert!(
                    p.data.len() <= self.ini_mrdsl,
                    "data segment {} over the initiator's MaxRecvDataSegmentLength",
                    p.data.len()
                );
            }
            self.check_numbering(&p.bhs);
            if let Bhs::R2t(r) = &p.bhs {
                self.last_r2t = Some(R2tProgress {
                    itt: r.itt,
                    ttt: r.ttt,
                    offset: r.buffer_offset,
                    len: r.desired_len,
                    sent: 0,
                    data_sn: 0,
                });
            }
        }
        while let Some(e) = self.conn.poll_event() {
            match e {
                Event::LoggedIn { nexus, .. } => self.lu.nexus_added(&nexus),
                Event::Execute { nexus, itt, cmd } => self.executing.push_back((nexus, itt, cmd)),
                Event::TaskManagement {
                    nexus,
                    itt,
                    lun,
                    tmf,
                } => self.tmfs.push_back((nexus, itt, lun, tmf)),
            }
        }
    }

    /// RFC 7143 §4.2.2: StatSN advances by one per status-carrying response and is
    /// echoed unchanged by R2T, Reject and unsolicited NOP-In; ExpCmdSN and MaxCmdSN
    /// never move back, and the window is never below empty (MaxCmdSN = ExpCmdSN - 1).
    fn check_numbering(&mut self, bhs: &Bhs) {
        let (stat_sn, exp, max, advances) = match bhs {
            Bhs::LoginResp(r) => {
                if r.status_class == 0 {
                    self.next_stat_sn = Some(r.stat_sn.wrapping_add(1));
                }
                return;
            }
            Bhs::ScsiResp(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::DataIn(d) if d.has_status => (d.stat_sn, d.exp_cmd_sn, d.max_cmd_sn, true),
            Bhs::DataIn(d) => (0, d.exp_cmd_sn, d.max_cmd_sn, false),
            Bhs::NopIn(n) => (n.stat_sn, n.exp_cmd_sn, n.max_cmd_sn, n.itt != RESERVED_TAG),
            Bhs::TmfResp(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::TextResp(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::LogoutResp(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, true),
            Bhs::R2t(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, false),
            Bhs::Reject(r) => (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn, false),
            _ => return,
        };
        let Some(next) = self.next_stat_sn else {
            return;
        };
        if !matches!(bhs, Bhs::DataIn(d) if !d.has_status) {
            assert_eq!(stat_sn, next, "StatSN out of sequence in {bhs:?}");
        }
        if advances {
            self.next_stat_sn = Some(next.wrapping_add(1));
        }
        if let Some((e, m)) = self.window {
            assert!(!serial_lt(exp, e), "ExpCmdSN moved back: {e} -> {exp}");
            assert!(!serial_lt(max, m), "MaxCmdSN moved back: {m} -> {max}");
        }
        assert!(
            !serial_lt(max.wrapping_add(1), exp),
            "window below empty: ExpCmdSN {exp}, MaxCmdSN {max}"
        );
        self.window = Some((exp, max));
    }

    fn login(&mut self, sel: u8) {
        let session = if sel & 0x02 != 0 {
            "Discovery"
        } else {
            "Normal"
        };
        let yn = |b: bool| if b { "Yes" } else { "No" };
        let digest = if sel & 0x40 != 0 { "CRC32C" } else { "None" };
        let text = format!(
            "InitiatorName=iqn.2024-01.io.fuzz:i\0TargetName={IQN}\0SessionType={session}\0\
             ImmediateData={}\0InitialR2T={}\0MaxRecvDataSegmentLength={}\0\
             MaxBurstLength={}\0FirstBurstLength={}\0MaxOutstandingR2T={}\0\
             HeaderDigest={digest}\0DataDigest={digest}\0",
            yn(sel & 0x04 != 0),
            yn(sel & 0x08 != 0),
            self.ini_mrdsl,
            if sel & 0x10 != 0 { 4096 } else { 262_144 },
            if sel & 0x10 != 0 { 1024 } else { 65_536 },
            if sel & 0x20 != 0 { 1 } else { 4 },
        );
        let req = LoginReq {
            transit: true,
            cont: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        self.feed(Pdu::new(Bhs::LoginReq(req), Bytes::from(text)));
    }

    fn step(&mut self, inp: &mut Input) {
        let op = inp.byte();
        match op % 8 {
            // A raw PDU: 48 BHS bytes, AHS as its TotalAHSLength says, a data segment.
            0..=2 => {
                let mut raw = [0u8; BHS_LEN];
                let got = inp.take(BHS_LEN);
                raw[..got.len()].copy_from_slice(got);
                if op & 0x08 != 0 {
                    // Put the next CmdSN in (bytes 24..28 in every initiator PDU that has
                    // one), so that commands land inside the window.
                    raw[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
                    if raw[0] & 0x40 == 0 {
                        self.cmd_sn = self.cmd_sn.wrapping_add(1);
                    }
                }
                let ahs = Bytes::copy_from_slice(inp.take(usize::from(raw[4]) * 4));
                // The decoder refuses segments over our declared limit; so does the script.
                let max = self.conn.max_recv_data_segment_len() as usize;
                let len = usize::from(inp.u16()).min(DATA_LEN_MAX).min(max);
                let data = Bytes::copy_from_slice(inp.take(len));
                self.feed(Pdu {
                    bhs: Bhs::parse(&raw),
                    ahs,
                    data,
                });
            }
            // The next Data-Out for the last R2T (in order unless the skew byte says not).
            3 => {
                let Some(r) = self.last_r2t.as_mut() else {
                    return;
                };
                let skew = inp.byte();
                let max = self.conn.max_recv_data_segment_len();
                let remaining = r.len.saturating_sub(r.sent);
                let mut len = remaining.min(max);
                if skew & 1 != 0 {
                    len /= 2;
                }
                let h = DataOut {
                    final_: len == remaining && skew & 2 == 0,
                    lun: 0,
                    itt: r.itt,
                    ttt: r.ttt,
                    exp_stat_sn: 0,
                    data_sn: r.data_sn.wrapping_add(u32::from(skew >> 6)),
                    buffer_offset: r
                        .offset
                        .wrapping_add(r.sent)
                        .wrapping_add(u32::from(skew & 4)),
                };
                r.sent = r.sent.saturating_add(len);
                r.data_sn = r.data_sn.wrapping_add(1);
                self.feed(Pdu::new(
                    Bhs::DataOut(h),
                    Bytes::from(vec![0x5a; len as usize]),
                ));
            }
            // Complete one executing command through the real logical unit.
            4 => {
                let i = usize::from(inp.byte());
                if self.executing.is_empty() {
                    return;
                }
                let Some((nexus, itt, cmd)) = self.executing.remove(i % self.executing.len())
                else {
                    return;
                };
                let resp = self.lu.execute(&nexus, &cmd);
                self.conn.command_complete(itt, resp);
                self.drain();
            }
            // Complete one TMF.
            5 => {
                let r = inp.byte();
                let Some((nexus, itt, lun, tmf)) = self.tmfs.pop_front() else {
                    return;
                };
                let resp = if r & 1 == 0 {
                    self.lu.task_management(&nexus, lun, &tmf)
                } else {
                    TmfResponse::Rejected
                };
                self.conn.tmf_complete(itt, resp);
                self.drain();
            }
            // The clock moves.
            6 => {
                self.now += Duration::from_secs(u64::from(inp.byte()));
                if self.conn.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.conn.handle_timeout(self.now);
                }
                self.drain();
            }
            // Shutdown or a framing error from the decoder.
            _ => {
                match inp.byte() % 3 {
                    0 => self.conn.begin_shutdown(),
                    1 => self.conn.handle_decode_error(PduError::HeaderDigest),
                    _ => {
                        let mut raw = [0u8; BHS_LEN];
                        let got = inp.take(BHS_LEN);
                        raw[..got.len()].copy_from_slice(got);
                        self.conn
                            .handle_decode_error(PduError::DataDigest { bhs: Box::new(raw) });
                    }
                }
                self.drain();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let sel = inp.byte();
    let tsel = inp.byte();
    let now = Instant::now();
    let mut cfg = TargetConfig::new(IQN, "127.0.0.1:3260,1");
    // Tight limits and a restrictive offer reach the edges of the window / R2T logic.
    if tsel & 0x01 != 0 {
        cfg.limits.cmds_max = 4;
    }
    if tsel & 0x02 != 0 {
        cfg.limits.write_bytes_max = 65_536;
    }
    if tsel & 0x04 != 0 {
        cfg.offer.allow_immediate_data = false;
    }
    if tsel & 0x08 != 0 {
        cfg.offer.allow_unsolicited = false;
    }
    if tsel & 0x10 != 0 {
        cfg.offer.max_recv_dsl = 4096;
    }
    if tsel & 0x20 != 0 {
        cfg.offer.max_outstanding_r2t = 1;
    }
    if tsel & 0x40 != 0 {
        cfg.offer.max_burst_len = 8192;
        cfg.offer.first_burst_len = 4096;
    }
    let cfg = Arc::new(cfg);
    let mut h = Harness {
        conn: Connection::new(cfg, 1, 1, [7; 16], now),
        lu: LogicalUnit::new(
            LuConfig::new("fuzz"),
            Arc::new(MemBackend::new(VOLUME_BYTES)),
        ),
        now,
        ini_mrdsl: if sel & 0x80 != 0 { 512 } else { 8192 },
        executing: VecDeque::new(),
        tmfs: VecDeque::new(),
        last_r2t: None,
        cmd_sn: 1,
        next_stat_sn: None,
        window: None,
    };
    if sel & 0x01 == 0 {
        h.login(sel);
    }
    let mut steps = 0;
    while !inp.is_empty() && !h.conn.wants_close() && steps < 256 {
        h.step(&mut inp);
        steps += 1;
    }
});
