//! Session-level stories: a scripted initiator drives the sans-IO [`Connection`] with PDUs
//! and asserts on the PDUs and events that come out. No sockets, no clock.

use std::time::{Duration, Instant};

use super::*;
use crate::iscsi::nego::parse_text;
use crate::iscsi::pdu::{LoginReq, LoginResp};
use crate::iscsi::TargetConfig;
use crate::scsi::SenseKey;

const IQN: &str = "iqn.2024-01.io.sva:vol1";

struct Ini {
    c: Connection,
    now: Instant,
    cmd_sn: u32,
    stat_sn_seen: Vec<u32>,
}

fn cfg() -> TargetConfig {
    TargetConfig::new(IQN, "127.0.0.1:3260,1")
}

impl Ini {
    fn new(cfg: TargetConfig) -> Ini {
        let now = Instant::now();
        Ini {
            c: Connection::new(Arc::new(cfg), 1, 1, [3; 16], now),
            now,
            cmd_sn: 1,
            stat_sn_seen: Vec::new(),
        }
    }

    fn out(&mut self) -> Vec<Pdu> {
        let mut v = Vec::new();
        while let Some((p, _)) = self.c.poll_transmit() {
            v.push(p);
        }
        v
    }

    fn events(&mut self) -> Vec<Event> {
        let mut v = Vec::new();
        while let Some(e) = self.c.poll_event() {
            v.push(e);
        }
        v
    }

    fn login(&mut self, session: &str, ops: &str) -> LoginResp {
        let text = format!("InitiatorName=iqn.x:i\0TargetName={IQN}\0SessionType={session}\0{ops}");
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
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
        };
        self.c
            .handle_pdu(Pdu::new(Bhs::LoginReq(req), Bytes::from(text)), self.now);
        let out = self.out();
        assert_eq!(out.len(), 1);
        match &out[0].bhs {
            Bhs::LoginResp(r) => r.clone(),
            b => panic!("expected login response, got {b:?}"),
        }
    }

    fn normal(ops: &str) -> Ini {
        let mut i = Ini::new(cfg());
        let r = i.login("Normal", ops);
        assert_eq!((r.status_class, r.nsg, r.transit), (0, 3, true));
        assert!(matches!(i.events().as_slice(), [Event::LoggedIn { .. }]));
        i
    }

    fn cmd(&mut self, itt: u32, cdb: &[u8], edtl: u32, write: bool, final_: bool, data: &[u8]) {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let h = ScsiCmd {
            immediate: false,
            final_,
            read: !write && edtl > 0,
            write,
            attr: 1,
            lun: 0,
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
            cdb: c,
        };
        self.cmd_sn += 1;
        self.c.handle_pdu(
            Pdu::new(Bhs::ScsiCmd(h), Bytes::copy_from_slice(data)),
            self.now,
        );
    }

    fn data_out(
        &mut self,
        itt: u32,
        ttt: u32,
        data_sn: u32,
        offset: u32,
        len: usize,
        final_: bool,
    ) {
        let h = DataOut {
            final_,
            lun: 0,
            itt,
            ttt,
            exp_stat_sn: 0,
            data_sn,
            buffer_offset: offset,
        };
        self.c.handle_pdu(
            Pdu::new(Bhs::DataOut(h), Bytes::from(vec![0xab; len])),
            self.now,
        );
    }

    fn executed(&mut self) -> Vec<(u32, ScsiCommand)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Execute { itt, cmd, .. } => Some((itt, cmd)),
                _ => None,
            })
            .collect()
    }

    fn record_stat_sn(&mut self, pdus: &[Pdu]) {
        for p in pdus {
            match &p.bhs {
                Bhs::ScsiResp(r) => self.stat_sn_seen.push(r.stat_sn),
                Bhs::DataIn(d) if d.has_status => self.stat_sn_seen.push(d.stat_sn),
                Bhs::LogoutResp(r) => self.stat_sn_seen.push(r.stat_sn),
                Bhs::NopIn(n) if n.itt != RESERVED_TAG => self.stat_sn_seen.push(n.stat_sn),
                _ => {}
            }
        }
    }
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}
fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}

#[test]
fn login_write_with_r2t_read_logout() {
    let mut i = Ini::normal(
        "MaxRecvDataSegmentLength=4096\0MaxBurstLength=8192\0InitialR2T=Yes\0ImmediateData=No\0",
    );
    // WRITE of 16 KiB: two R2Ts of MaxBurstLength (8 KiB) with MaxOutstandingR2T=1.
    i.cmd(0x10, &write10(0, 32), 16384, true, true, &[]);
    let out = i.out();
    let [Pdu {
        bhs: Bhs::R2t(r1), ..
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!((r1.buffer_offset, r1.desired_len, r1.r2t_sn), (0, 8192, 0));
    i.data_out(0x10, r1.ttt, 0, 0, 4096, false);
    i.data_out(0x10, r1.ttt, 1, 4096, 4096, true);
    let out = i.out();
    let [Pdu {
        bhs: Bhs::R2t(r2), ..
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        (r2.buffer_offset, r2.desired_len, r2.r2t_sn),
        (8192, 8192, 1)
    );
    assert!(
        i.executed().is_empty(),
        "must not execute before all data is in"
    );
    i.data_out(0x10, r2.ttt, 0, 8192, 8192, true);
    let ex = i.executed();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].1.data_out.len(), 16384);
    assert_eq!(ex[0].1.expected_transfer_len, 16384);
    i.c.command_complete(
        0x10,
        ScsiResponse {
            data_out_len: Some(16384),
            ..ScsiResponse::good()
        },
    );
    let out = i.out();
    i.record_stat_sn(&out);
    let [Pdu {
        bhs: Bhs::ScsiResp(r),
        ..
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        (r.status, r.underflow, r.overflow, r.residual),
        (0, false, false, 0)
    );

    // READ of 10000 bytes: split at the initiator's 4096, status in the last Data-In.
    i.cmd(0x11, &read10(0, 20), 10240, false, true, &[]);
    assert_eq!(i.executed().len(), 1);
    i.c.command_complete(
        0x11,
        ScsiResponse {
            data_in: Bytes::from(vec![7; 10240]),
            ..ScsiResponse::good()
        },
    );
    let out = i.out();
    i.record_stat_sn(&out);
    let dins: Vec<&DataIn> = out
        .iter()
        .filter_map(|p| {
            if let Bhs::DataIn(d) = &p.bhs {
                Some(d)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(dins.len(), 3);
    assert_eq!(
        dins.iter()
            .map(|d| (d.data_sn, d.buffer_offset))
            .collect::<Vec<_>>(),
        vec![(0, 0), (1, 4096), (2, 8192)]
    );
    assert!(dins[2].has_status && dins[2].final_ && !dins[0].has_status);
    assert_eq!(out[2].data.len(), 2048);

    // Logout closes after the response.
    let lo = LogoutReq {
        immediate: true,
        reason: 0,
        itt: 0x12,
        cid: 0,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
    };
    i.c.handle_pdu(Pdu::new(Bhs::LogoutReq(lo), Bytes::new()), i.now);
    let out = i.out();
    i.record_stat_sn(&out);
    assert!(matches!(
        out.as_slice(),
        [Pdu {
            bhs: Bhs::LogoutResp(LogoutResp {
                response: 0,
                itt: 0x12,
                ..
            }),
            ..
        }]
    ));
    assert!(i.c.wants_close());
    // StatSN advances by one per status-bearing PDU.
    let s = &i.stat_sn_seen;
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "{s:?}");
}

#[test]
fn immediate_and_unsolicited_data_then_r2t() {
    let mut i = Ini::normal(
        "InitialR2T=No\0ImmediateData=Yes\0FirstBurstLength=8192\0MaxBurstLength=65536\0",
    );
    // 4 KiB immediate + 4 KiB unsolicited Data-Out = FirstBurstLength; the rest by R2T.
    i.cmd(1, &write10(0, 48), 24576, true, false, &[1; 4096]);
    assert!(
        i.out().is_empty(),
        "no R2T before the unsolicited burst is in"
    );
    i.data_out(1, RESERVED_TAG, 0, 4096, 4096, true);
    let out = i.out();
    let [Pdu {
        bhs: Bhs::R2t(r), ..
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!((r.buffer_offset, r.desired_len), (8192, 16384));
    i.data_out(1, r.ttt, 0, 8192, 16384, true);
    let ex = i.executed();
    assert_eq!(ex[0].1.data_out.len(), 24576);
    assert_eq!(&ex[0].1.data_out[..4], &[1, 1, 1, 1]);
}

#[test]
fn bad_data_out_offset_is_rejected() {
    let mut i = Ini::normal("");
    i.cmd(1, &write10(0, 2), 1024, true, true, &[]);
    let out = i.out();
    let [Pdu {
        bhs: Bhs::R2t(r), ..
    }] = out.as_slice()
    else {
        panic!()
    };
    i.data_out(1, r.ttt, 0, 512, 512, true);
    let out = i.out();
    assert!(matches!(
        out.as_slice(),
        [Pdu {
            bhs: Bhs::Reject(Reject {
                reason: reject_reason::PROTOCOL_ERROR,
                ..
            }),
            ..
        }]
    ));
    assert!(!i.c.wants_close());
}

#[test]
fn commands_are_delivered_in_cmd_sn_order() {
    let mut i = Ini::normal("");
    let first = i.cmd_sn;
    i.cmd_sn = first + 1;
    i.cmd(2, &[0x00], 0, false, true, &[]);
    assert!(i.executed().is_empty(), "CmdSN gap: held back");
    i.cmd_sn = first;
    i.cmd(1, &[0x00], 0, false, true, &[]);
    let order: Vec<u32> = i.executed().into_iter().map(|(itt, _)| itt).collect();
    assert_eq!(order, vec![1, 2]);
    // Far outside the window: silently ignored.
    i.cmd_sn = first + 100_000;
    i.cmd(3, &[0x00], 0, false, true, &[]);
    assert!(i.executed().is_empty() && i.out().is_empty());
    // MaxCmdSN shrinks while tasks are open.
    i.c.command_complete(1, ScsiResponse::good());
    let out = i.out();
    let Bhs::ScsiResp(r) = &out[0].bhs else {
        panic!()
    };
    assert_eq!(r.exp_cmd_sn, first + 2);
    assert_eq!(r.max_cmd_sn, first + 2 + 128 - 1 - 1);
}

#[test]
fn residuals_and_sense() {
    let mut i = Ini::normal("");
    // Underflow: LU produced 36 bytes, initiator expected 255.
    i.cmd(1, &[0x12, 0, 0, 0, 0xff, 0], 255, false, true, &[]);
    i.executed();
    i.c.command_complete(
        1,
        ScsiResponse {
            data_in: Bytes::from(vec![0; 36]),
            ..ScsiResponse::good()
        },
    );
    let out = i.out();
    let Bhs::DataIn(d) = &out[0].bhs else {
        panic!()
    };
    assert!(d.has_status && d.underflow && d.residual == 219);
    // Overflow: LU produced 512, EDTL 200 -> 200 sent, residual 312.
    i.cmd(2, &read10(0, 1), 200, false, true, &[]);
    i.executed();
    i.c.command_complete(
        2,
        ScsiResponse {
            data_in: Bytes::from(vec![0; 512]),
            ..ScsiResponse::good()
        },
    );
    let out = i.out();
    assert_eq!(out[0].data.len(), 200);
    let Bhs::DataIn(d) = &out[0].bhs else {
        panic!()
    };
    assert!(d.overflow && d.residual == 312);
    // CHECK CONDITION: sense in a SCSI Response with a 2-byte length prefix.
    i.cmd(3, &[0xff], 0, false, true, &[]);
    i.executed();
    i.c.command_complete(3, ScsiError::invalid_opcode().to_response());
    let out = i.out();
    let [Pdu {
        bhs: Bhs::ScsiResp(r),
        data,
        ..
    }] = out.as_slice()
    else {
        panic!("{out:?}")
    };
    assert_eq!(r.status, ScsiStatus::CheckCondition as u8);
    let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
    assert_eq!(len, data.len() - 2);
    assert_eq!(data[2 + 2] & 0x0f, SenseKey::IllegalRequest as u8);
}

#[test]
fn nop_ping_and_keepalive() {
    let mut i = Ini::normal("");
    let nop = NopOut {
        immediate: true,
        lun: 0,
        itt: 9,
        ttt: RESERVED_TAG,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
    };
    i.c.handle_pdu(
        Pdu::new(Bhs::NopOut(nop), Bytes::from_static(b"ping")),
        i.now,
    );
    let out = i.out();
    let [Pdu {
        bhs: Bhs::NopIn(n),
        data,
        ..
    }] = out.as_slice()
    else {
        panic!()
    };
    assert_eq!((n.itt, n.ttt, &data[..]), (9, RESERVED_TAG, &b"ping"[..]));

    // Idle: the target pings; an answer keeps the connection, silence ends it.
    let t = i.c.poll_timeout().unwrap();
    assert_eq!(t, i.now + Duration::from_secs(5));
    i.c.handle_timeout(t);
    let out = i.out();
    let [Pdu {
        bhs: Bhs::NopIn(p), ..
    }] = out.as_slice()
    else {
        panic!()
    };
    assert_eq!(p.itt, RESERVED_TAG);
    let answer = NopOut {
        immediate: true,
        lun: 0,
        itt: RESERVED_TAG,
        ttt: p.ttt,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
    };
    i.c.handle_pdu(Pdu::new(Bhs::NopOut(answer), Bytes::new()), t);
    assert!(i.out().is_empty());
    let t2 = i.c.poll_timeout().unwrap();
    i.c.handle_timeout(t2);
    assert_eq!(i.out().len(), 1);
    i.c.handle_timeout(t2 + Duration::from_secs(31));
    assert!(i.c.wants_close());
}

#[test]
fn abort_task_completes_after_the_task() {
    let mut i = Ini::normal("");
    i.cmd(5, &read10(0, 1), 512, false, true, &[]);
    assert_eq!(i.executed().len(), 1);
    let tmf = TmfReq {
        immediate: true,
        function: 1,
        lun: 0,
        itt: 6,
        rtt: 5,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: i.cmd_sn - 1,
        exp_data_sn: 0,
    };
    i.c.handle_pdu(Pdu::new(Bhs::TmfReq(tmf), Bytes::new()), i.now);
    let ev = i.events();
    assert!(matches!(
        ev.as_slice(),
        [Event::TaskManagement {
            itt: 6,
            tmf: TaskManagement::AbortTask { tag: 5 },
            ..
        }]
    ));
    i.c.tmf_complete(6, TmfResponse::Complete);
    assert!(
        i.out().is_empty(),
        "TMF response waits for the aborted task"
    );
    i.c.command_complete(
        5,
        ScsiResponse {
            status: ScsiStatus::TaskAborted,
            ..ScsiResponse::good()
        },
    );
    let out = i.out();
    assert!(
        matches!(
            out.as_slice(),
            [Pdu {
                bhs: Bhs::TmfResp(TmfResp {
                    response: 0,
                    itt: 6,
                    ..
                }),
                ..
            }]
        ),
        "{out:?}"
    );
    // Abort of an unknown task outside the window: "task does not exist".
    let tmf = TmfReq {
        immediate: true,
        function: 1,
        lun: 0,
        itt: 7,
        rtt: 99,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn: i.cmd_sn + 5,
        exp_data_sn: 0,
    };
    i.c.handle_pdu(Pdu::new(Bhs::TmfReq(tmf), Bytes::new()), i.now);
    let out = i.out();
    assert!(matches!(
        out.as_slice(),
        [Pdu {
            bhs: Bhs::TmfResp(TmfResp { response: 1, .. }),
            ..
        }]
    ));
}

fn abort_task(i: &mut Ini, itt: u32, rtt: u32, cmd_sn: u32, ref_cmd_sn: u32) -> Vec<Pdu> {
    let tmf = TmfReq {
        immediate: true,
        function: 1,
        lun: 0,
        itt,
        rtt,
        cmd_sn,
        exp_stat_sn: 0,
        ref_cmd_sn,
        exp_data_sn: 0,
    };
    i.c.handle_pdu(Pdu::new(Bhs::TmfReq(tmf), Bytes::new()), i.now);
    i.out()
}

fn tmf_response_code(out: &[Pdu]) -> Option<u8> {
    match out {
        [Pdu {
            bhs: Bhs::TmfResp(r),
            ..
        }] => Some(r.response),
        _ => None,
    }
}

/// libiscsi AbortTaskSimpleAsync: an ABORT TASK that arrives after the task's SCSI Response
/// was sent must say "Task does not exist", never "Function complete" (RFC 7143 §11.5.1 c).
#[test]
fn abort_of_a_completed_task_says_task_does_not_exist() {
    let mut i = Ini::normal("");
    i.cmd(5, &write10(0, 1), 512, true, true, &[0xaa; 512]);
    assert_eq!(i.executed().len(), 1);
    i.c.command_complete(5, ScsiResponse::good());
    let out = i.out();
    assert!(
        matches!(
            out.as_slice(),
            [Pdu {
                bhs: Bhs::ScsiResp(_),
                ..
            }]
        ),
        "{out:?}"
    );
    let sn = i.cmd_sn;
    let out = abort_task(&mut i, 6, 5, sn, sn - 1);
    assert_eq!(tmf_response_code(&out), Some(1), "{out:?}");
    assert!(i.events().is_empty(), "nothing for the target to do");
}

/// RFC 7143 §11.5.1 b): a referenced CmdSN in the window that has not arrived is taken as
/// received: "Function complete", the late command is dropped, later commands go on.
#[test]
fn abort_of_a_command_not_yet_arrived_skips_its_cmd_sn() {
    let mut i = Ini::normal("");
    let missing = i.cmd_sn;
    let out = abort_task(&mut i, 6, 5, missing + 1, missing);
    assert_eq!(tmf_response_code(&out), Some(0), "{out:?}");
    // The aborted command turns up late: not executed.
    i.cmd(5, &read10(0, 1), 512, false, true, &[]);
    assert!(i.executed().is_empty());
    // The next command is in order again.
    i.cmd(7, &read10(0, 1), 512, false, true, &[]);
    let ex = i.executed();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].0, 7);
}

#[test]
fn garbage_before_login_closes() {
    let mut i = Ini::new(cfg());
    i.cmd(1, &[0], 0, false, true, &[]);
    assert!(i.c.wants_close());
    assert!(i.out().is_empty());
}

#[test]
fn unknown_opcode_and_snack_are_rejected() {
    let mut i = Ini::normal("");
    let mut raw = [0u8; 48];
    raw[0] = 0x1e;
    i.c.handle_pdu(Pdu::new(Bhs::parse(&raw), Bytes::new()), i.now);
    let out = i.out();
    let [Pdu {
        bhs: Bhs::Reject(r),
        data,
        ..
    }] = out.as_slice()
    else {
        panic!()
    };
    assert_eq!(r.reason, reject_reason::COMMAND_NOT_SUPPORTED);
    assert_eq!(data.len(), 48);
    assert_eq!(data[0], 0x1e);
    assert!(!i.c.wants_close());
}

#[test]
fn discovery_send_targets() {
    let mut c = cfg();
    c.send_targets = vec!["127.0.0.1:3260,1".into(), "127.0.0.2:3260,2".into()];
    let mut i = Ini::new(c);
    let r = i.login("Discovery", "");
    assert_eq!(r.status_class, 0);
    assert!(
        i.events().is_empty(),
        "discovery sessions announce no nexus"
    );
    let tr = TextReq {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt: 4,
        ttt: RESERVED_TAG,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
    };
    i.c.handle_pdu(
        Pdu::new(Bhs::TextReq(tr), Bytes::from_static(b"SendTargets=All\0")),
        i.now,
    );
    let out = i.out();
    let kv = parse_text(&out[0].data).unwrap();
    let want: Vec<(String, String)> = [
        ("TargetName", IQN),
        ("TargetAddress", "127.0.0.1:3260,1"),
        ("TargetAddress", "127.0.0.2:3260,2"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(kv, want);
    // SCSI commands are not allowed in a discovery session.
    i.cmd(1, &[0], 0, false, true, &[]);
    assert!(matches!(
        i.out().as_slice(),
        [Pdu {
            bhs: Bhs::Reject(_),
            ..
        }]
    ));
}

#[test]
fn digests_switch_on_after_login() {
    let mut i = Ini::new(cfg());
    let r = i.login("Normal", "HeaderDigest=CRC32C\0DataDigest=CRC32C,None\0");
    assert_eq!(r.status_class, 0);
    assert_eq!(
        i.c.digests(),
        Digests {
            header: true,
            data: true
        }
    );
    assert_eq!(i.c.max_recv_data_segment_len(), 262_144);
}

#[test]
fn max_cmd_sn_never_moves_back() {
    let mut i = Ini::normal("");
    let nop = |itt| NopOut {
        immediate: true,
        lun: 0,
        itt,
        ttt: RESERVED_TAG,
        cmd_sn: 0,
        exp_stat_sn: 0,
    };
    i.c.handle_pdu(Pdu::new(Bhs::NopOut(nop(1)), Bytes::new()), i.now);
    let out = i.out();
    let Bhs::NopIn(n) = &out[0].bhs else { panic!() };
    let before = n.max_cmd_sn;
    // An immediate command opens a task without advancing ExpCmdSN.
    let mut c = [0u8; 16];
    c[0] = 0x00;
    let h = ScsiCmd {
        immediate: true,
        final_: true,
        read: false,
        write: false,
        attr: 1,
        lun: 0,
        itt: 2,
        edtl: 0,
        cmd_sn: i.cmd_sn,
        exp_stat_sn: 0,
        cdb: c,
    };
    i.c.handle_pdu(Pdu::new(Bhs::ScsiCmd(h), Bytes::new()), i.now);
    assert_eq!(i.executed().len(), 1);
    i.c.handle_pdu(Pdu::new(Bhs::NopOut(nop(3)), Bytes::new()), i.now);
    let out = i.out();
    let Bhs::NopIn(n) = &out[0].bhs else { panic!() };
    assert_eq!(n.max_cmd_sn, before);
    // A command at the advertised MaxCmdSN is still taken.
    i.cmd_sn = before;
    i.cmd(4, &[0x00], 0, false, true, &[]);
    assert!(i.out().is_empty(), "held for CmdSN order, not dropped");
    i.c.command_complete(2, ScsiResponse::good());
    let out = i.out();
    let Bhs::ScsiResp(r) = &out[0].bhs else {
        panic!()
    };
    assert!(!serial_lt(r.max_cmd_sn, before));
}

/// Two connections share a write budget of 16 KiB: the second one's R2T waits until the
/// first command completes; immediate data needs no budget; a dropped connection gives
/// its reservation back.
#[test]
fn write_budget_holds_r2ts_until_room() {
    use crate::iscsi::budget::WriteBudget;
    let budget = WriteBudget::new(16384);
    let ops = "InitialR2T=Yes\0ImmediateData=Yes\0MaxBurstLength=16384\0FirstBurstLength=4096\0";
    let mut a = Ini::normal(ops);
    let mut b = Ini::normal(ops);
    a.c.set_write_budget(budget.clone());
    b.c.set_write_budget(budget.clone());
    let r2t = |out: &[Pdu]| match out {
        [Pdu {
            bhs: Bhs::R2t(r), ..
        }] => Some(r.clone()),
        _ => None,
    };

    // A 4 KiB write with immediate data: no R2T, no budget.
    a.cmd(1, &write10(0, 8), 4096, true, true, &[7; 4096]);
    assert_eq!(a.executed().len(), 1);
    assert_eq!(budget.used(), 0);
    a.c.command_complete(1, ScsiResponse::good());
    a.out();

    // 4 KiB immediate + 12 KiB solicited on A: reserves 12 KiB.
    a.cmd(2, &write10(0, 32), 16384, true, true, &[1; 4096]);
    let ra = r2t(&a.out()).expect("room: R2T at once");
    assert_eq!((ra.buffer_offset, ra.desired_len), (4096, 12288));
    assert_eq!(budget.used(), 12288);

    // 16 KiB solicited on B does not fit beside it: no R2T yet.
    b.cmd(1, &write10(64, 32), 16384, true, true, &[]);
    assert!(b.out().is_empty());
    assert!(b.c.awaiting_write_budget());
    b.c.retry_write_budget();
    assert!(b.out().is_empty(), "still no room");

    // A's data comes and its command completes: the budget is released and B's R2T goes.
    a.data_out(2, ra.ttt, 0, 4096, 12288, true);
    assert_eq!(a.executed().len(), 1);
    assert_eq!(budget.used(), 12288, "held while the command runs");
    a.c.command_complete(2, ScsiResponse::good());
    assert_eq!(budget.used(), 0);
    b.c.retry_write_budget();
    let rb = r2t(&b.out()).expect("room now");
    assert_eq!((rb.buffer_offset, rb.desired_len), (0, 16384));
    assert!(!b.c.awaiting_write_budget());
    assert_eq!(budget.used(), 16384);

    // The connection goes away mid-transfer: its reservation is given back.
    drop(b);
    assert_eq!(budget.used(), 0);
}
