//! iSCSI PDU codec (RFC 7143 §11).
//!
//! A PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments
//! (AHS), an optional header digest, a data segment padded to 4 bytes and an optional data
//! digest (CRC32C, RFC 7143 §12.1). Decoding is done in two steps: [`frame_len`] checks
//! that a whole PDU is buffered (`Ok(None)` = "not enough bytes yet"), then [`decode`]
//! splits it off and parses the BHS into a typed [`Bhs`]. Lengths are checked before any
//! allocation: a data segment longer than our declared MaxRecvDataSegmentLength is an error.
//!
//! ```text
//!  | BHS 48 | AHS (4n) | HD 4? | data (DSL) | pad 0..3 | DD 4? |
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the Basic Header Segment (RFC 7143 §11.2.1).
pub const BHS_LEN: usize = 48;
/// Size of a CRC32C digest.
pub const DIGEST_LEN: usize = 4;
/// Reserved tag value ("no task", RFC 7143 §11.2.1.8).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Which digests are in use on a connection (negotiated HeaderDigest / DataDigest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Codec errors. All of them are fatal to the connection except [`PduError::DataDigest`],
/// which is answered with a Reject (RFC 7143 §7.8).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// The data segment is larger than the MaxRecvDataSegmentLength we declared.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    /// Header digest mismatch: the header cannot be trusted, so the connection is closed.
    #[error("header digest mismatch")]
    HeaderDigest,
    /// Data digest mismatch; the header is carried so it can be rejected.
    #[error("data digest mismatch")]
    DataDigest { bhs: Box<[u8; BHS_LEN]> },
}

/// Initiator opcodes (RFC 7143 §11.2.1.2).
pub mod opcode {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK_REQ: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MSG: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

fn be16(b: &[u8; BHS_LEN], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8; BHS_LEN], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8; BHS_LEN], o: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(x)
}
fn put16(b: &mut [u8; BHS_LEN], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8; BHS_LEN], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8; BHS_LEN], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// NOP-Out (RFC 7143 §11.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// NOP-In (RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Command (RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCmd {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    /// Task attribute, 3 bits (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub edtl: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResp {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// iSCSI response code (0 = command completed at target).
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
}

/// Task Management Function Request (RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfReq {
    pub immediate: bool,
    /// Function code, 7 bits (1 ABORT TASK .. 8 TASK REASSIGN).
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub rtt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmfResp {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Request (RFC 7143 §11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginReq {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Login Response (RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResp {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Request (RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextReq {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Response (RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResp {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// SCSI Data-In (RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S bit: the PDU carries the status (phase collapse).
    pub has_status: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutReq {
    pub immediate: bool,
    /// 0 close session, 1 close connection, 2 remove connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResp {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMsg {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

/// Reject (RFC 7143 §11.17); the data segment carries the rejected header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

/// SNACK Request (RFC 7143 §11.16). Parsed only so it can be rejected (ErrorRecoveryLevel 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snack {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// A typed Basic Header Segment. `Unknown` keeps the raw header of an opcode we do not
/// know so it can be rejected with the original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    NopIn(NopIn),
    ScsiCmd(ScsiCmd),
    ScsiResp(ScsiResp),
    TmfReq(TmfReq),
    TmfResp(TmfResp),
    LoginReq(LoginReq),
    LoginResp(LoginResp),
    TextReq(TextReq),
    TextResp(TextResp),
    DataOut(DataOut),
    DataIn(DataIn),
    LogoutReq(LogoutReq),
    LogoutResp(LogoutResp),
    R2t(R2t),
    AsyncMsg(AsyncMsg),
    Reject(Reject),
    Snack(Snack),
    Unknown(Box<[u8; BHS_LEN]>),
}

/// One PDU: typed header, raw AHS bytes and the (unpadded) data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: Bhs,
    pub ahs: Bytes,
    pub data: Bytes,
}

impl Pdu {
    pub fn new(bhs: Bhs, data: Bytes) -> Pdu {
        Pdu {
            bhs,
            ahs: Bytes::new(),
            data,
        }
    }
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

impl Bhs {
    /// Parse a BHS. Never fails: unknown opcodes become [`Bhs::Unknown`].
    pub fn parse(b: &[u8; BHS_LEN]) -> Bhs {
        let imm = b[0] & 0x40 != 0;
        let f = b[1] & 0x80 != 0;
        let lun = be64(b, 8);
        let itt = be32(b, 16);
        match b[0] & 0x3f {
            opcode::NOP_OUT => Bhs::NopOut(NopOut {
                immediate: imm,
                lun,
                itt,
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::NOP_IN => Bhs::NopIn(NopIn {
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            opcode::SCSI_CMD => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                Bhs::ScsiCmd(ScsiCmd {
                    immediate: imm,
                    final_: f,
                    read: b[1] & 0x40 != 0,
                    write: b[1] & 0x20 != 0,
                    attr: b[1] & 0x07,
                    lun,
                    itt,
                    edtl: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    cdb,
                })
            }
            opcode::SCSI_RESP => Bhs::ScsiResp(ScsiResp {
                bidi_overflow: b[1] & 0x10 != 0,
                bidi_underflow: b[1] & 0x08 != 0,
                overflow: b[1] & 0x04 != 0,
                underflow: b[1] & 0x02 != 0,
                response: b[2],
                status: b[3],
                itt,
                snack_tag: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
                bidi_residual: be32(b, 40),
                residual: be32(b, 44),
            }),
            opcode::TMF_REQ => Bhs::TmfReq(TmfReq {
                immediate: imm,
                function: b[1] & 0x7f,
                lun,
                itt,
                rtt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                ref_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
            }),
            opcode::TMF_RESP => Bhs::TmfResp(TmfResp {
                response: b[2],
                itt,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            opcode::LOGIN_REQ => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Bhs::LoginReq(LoginReq {
                    transit: f,
                    cont: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 3,
                    nsg: b[1] & 3,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                })
            }
            opcode::LOGIN_RESP => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Bhs::LoginResp(LoginResp {
                    transit: f,
                    cont: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 3,
                    nsg: b[1] & 3,
                    version_max: b[2],
                    version_active: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt,
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            opcode::TEXT_REQ => Bhs::TextReq(TextReq {
                immediate: imm,
                final_: f,
                cont: b[1] & 0x40 != 0,
                lun,
                itt,
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::TEXT_RESP => Bhs::TextResp(TextResp {
                final_: f,
                cont: b[1] & 0x40 != 0,
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            opcode::DATA_OUT => Bhs::DataOut(DataOut {
                final_: f,
                lun,
                itt,
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
            }),
            opcode::DATA_IN => Bhs::DataIn(DataIn {
                final_: f,
                ack: b[1] & 0x40 != 0,
                overflow: b[1] & 0x04 != 0,
                underflow: b[1] & 0x02 != 0,
                has_status: b[1] & 0x01 != 0,
                status: b[3],
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                residual: be32(b, 44),
            }),
            opcode::LOGOUT_REQ => Bhs::LogoutReq(LogoutReq {
                immediate: imm,
                reason: b[1] & 0x7f,
                itt,
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            opcode::LOGOUT_RESP => Bhs::LogoutResp(LogoutResp {
                response: b[2],
                itt,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            }),
            opcode::R2T => Bhs::R2t(R2t {
                lun,
                itt,
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                r2t_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                desired_len: be32(b, 44),
            }),
            opcode::ASYNC_MSG => Bhs::AsyncMsg(AsyncMsg {
                lun,
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                event: b[36],
                vcode: b[37],
                param1: be16(b, 38),
                param2: be16(b, 40),
                param3: be16(b, 42),
            }),
            opcode::REJECT => Bhs::Reject(Reject {
                reason: b[2],
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
            }),
            opcode::SNACK_REQ => Bhs::Snack(Snack {
                snack_type: b[1] & 0x0f,
                lun,
                itt,
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                beg_run: be32(b, 40),
                run_length: be32(b, 44),
            }),
            _ => {
                // Lengths belong to the frame, not the header; `encode` recomputes them.
                let mut raw = *b;
                raw[4..8].fill(0);
                Bhs::Unknown(Box::new(raw))
            }
        }
    }

    /// Serialise the header. TotalAHSLength and DataSegmentLength are filled in by
    /// [`encode`] from the PDU's AHS and data.
    pub fn to_bytes(&self) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        let imm = |i: bool| if i { 0x40 } else { 0 };
        let fl = |x: bool, bit: u8| if x { bit } else { 0 };
        match self {
            Bhs::NopOut(h) => {
                b[0] = opcode::NOP_OUT | imm(h.immediate);
                b[1] = 0x80;
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 24, h.cmd_sn);
                put32(&mut b, 28, h.exp_stat_sn);
            }
            Bhs::NopIn(h) => {
                b[0] = opcode::NOP_IN;
                b[1] = 0x80;
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
            }
            Bhs::ScsiCmd(h) => {
                b[0] = opcode::SCSI_CMD | imm(h.immediate);
                b[1] = fl(h.final_, 0x80) | fl(h.read, 0x40) | fl(h.write, 0x20) | (h.attr & 7);
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.edtl);
                put32(&mut b, 24, h.cmd_sn);
                put32(&mut b, 28, h.exp_stat_sn);
                b[32..48].copy_from_slice(&h.cdb);
            }
            Bhs::ScsiResp(h) => {
                b[0] = opcode::SCSI_RESP;
                b[1] = 0x80
                    | fl(h.bidi_overflow, 0x10)
                    | fl(h.bidi_underflow, 0x08)
                    | fl(h.overflow, 0x04)
                    | fl(h.underflow, 0x02);
                b[2] = h.response;
                b[3] = h.status;
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.snack_tag);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                put32(&mut b, 36, h.exp_data_sn);
                put32(&mut b, 40, h.bidi_residual);
                put32(&mut b, 44, h.residual);
            }
            Bhs::TmfReq(h) => {
                b[0] = opcode::TMF_REQ | imm(h.immediate);
                b[1] = 0x80 | (h.function & 0x7f);
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.rtt);
                put32(&mut b, 24, h.cmd_sn);
                put32(&mut b, 28, h.exp_stat_sn);
                put32(&mut b, 32, h.ref_cmd_sn);
                put32(&mut b, 36, h.exp_data_sn);
            }
            Bhs::TmfResp(h) => {
                b[0] = opcode::TMF_RESP;
                b[1] = 0x80;
                b[2] = h.response;
                put32(&mut b, 16, h.itt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
            }
            Bhs::LoginReq(h) => {
                b[0] = opcode::LOGIN_REQ | 0x40;
                b[1] = fl(h.transit, 0x80) | fl(h.cont, 0x40) | ((h.csg & 3) << 2) | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_min;
                b[8..14].copy_from_slice(&h.isid);
                put16(&mut b, 14, h.tsih);
                put32(&mut b, 16, h.itt);
                put16(&mut b, 20, h.cid);
                put32(&mut b, 24, h.cmd_sn);
                put32(&mut b, 28, h.exp_stat_sn);
            }
            Bhs::LoginResp(h) => {
                b[0] = opcode::LOGIN_RESP;
                b[1] = fl(h.transit, 0x80) | fl(h.cont, 0x40) | ((h.csg & 3) << 2) | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_active;
                b[8..14].copy_from_slice(&h.isid);
                put16(&mut b, 14, h.tsih);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Bhs::TextReq(h) => {
                b[0] = opcode::TEXT_REQ | imm(h.immediate);
                b[1] = fl(h.final_, 0x80) | fl(h.cont, 0x40);
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 24, h.cmd_sn);
                put32(&mut b, 28, h.exp_stat_sn);
            }
            Bhs::TextResp(h) => {
                b[0] = opcode::TEXT_RESP;
                b[1] = fl(h.final_, 0x80) | fl(h.cont, 0x40);
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
            }
            Bhs::DataOut(h) => {
                b[0] = opcode::DATA_OUT;
                b[1] = fl(h.final_, 0x80);
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 28, h.exp_stat_sn);
                put32(&mut b, 36, h.data_sn);
                put32(&mut b, 40, h.buffer_offset);
            }
            Bhs::DataIn(h) => {
                b[0] = opcode::DATA_IN;
                b[1] = fl(h.final_, 0x80)
                    | fl(h.ack, 0x40)
                    | fl(h.overflow, 0x04)
                    | fl(h.underflow, 0x02)
                    | fl(h.has_status, 0x01);
                b[3] = h.status;
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                put32(&mut b, 36, h.data_sn);
                put32(&mut b, 40, h.buffer_offset);
                put32(&mut b, 44, h.residual);
            }
            Bhs::LogoutReq(h) => {
                b[0] = opcode::LOGOUT_REQ | imm(h.immediate);
                b[1] = 0x80 | (h.reason & 0x7f);
                put32(&mut b, 16, h.itt);
                put16(&mut b, 20, h.cid);
                put32(&mut b, 24, h.cmd_sn);
                put32(&mut b, 28, h.exp_stat_sn);
            }
            Bhs::LogoutResp(h) => {
                b[0] = opcode::LOGOUT_RESP;
                b[1] = 0x80;
                b[2] = h.response;
                put32(&mut b, 16, h.itt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                put16(&mut b, 40, h.time2wait);
                put16(&mut b, 42, h.time2retain);
            }
            Bhs::R2t(h) => {
                b[0] = opcode::R2T;
                b[1] = 0x80;
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                put32(&mut b, 36, h.r2t_sn);
                put32(&mut b, 40, h.buffer_offset);
                put32(&mut b, 44, h.desired_len);
            }
            Bhs::AsyncMsg(h) => {
                b[0] = opcode::ASYNC_MSG;
                b[1] = 0x80;
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                b[36] = h.event;
                b[37] = h.vcode;
                put16(&mut b, 38, h.param1);
                put16(&mut b, 40, h.param2);
                put16(&mut b, 42, h.param3);
            }
            Bhs::Reject(h) => {
                b[0] = opcode::REJECT;
                b[1] = 0x80;
                b[2] = h.reason;
                put32(&mut b, 16, RESERVED_TAG);
                put32(&mut b, 24, h.stat_sn);
                put32(&mut b, 28, h.exp_cmd_sn);
                put32(&mut b, 32, h.max_cmd_sn);
                put32(&mut b, 36, h.data_sn);
            }
            Bhs::Snack(h) => {
                b[0] = opcode::SNACK_REQ;
                b[1] = 0x80 | (h.snack_type & 0x0f);
                put64(&mut b, 8, h.lun);
                put32(&mut b, 16, h.itt);
                put32(&mut b, 20, h.ttt);
                put32(&mut b, 28, h.exp_stat_sn);
                put32(&mut b, 40, h.beg_run);
                put32(&mut b, 44, h.run_length);
            }
            Bhs::Unknown(raw) => {
                b = **raw;
                // Lengths are recomputed from the PDU by `encode`.
                b[4..8].fill(0);
            }
        }
        b
    }
}

/// How many bytes the PDU at the start of `buf` occupies, or `Ok(None)` if not even its
/// header is buffered yet. Checks the data segment length against `max_data_len`.
pub fn frame_len(
    buf: &[u8],
    digests: Digests,
    max_data_len: u32,
) -> Result<Option<usize>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let ahs_len = usize::from(buf[4]) * 4;
    let dsl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]);
    if dsl > max_data_len {
        return Err(PduError::DataSegmentTooLong {
            len: dsl,
            max: max_data_len,
        });
    }
    let dsl = dsl as usize;
    let mut total = BHS_LEN + ahs_len + dsl + pad4(dsl);
    if digests.header {
        total += DIGEST_LEN;
    }
    if digests.data && dsl > 0 {
        total += DIGEST_LEN;
    }
    Ok(Some(total))
}

/// Decode one PDU from the front of `buf`, consuming it. `Ok(None)`: not enough bytes yet
/// (nothing is consumed). Digests are verified when negotiated.
pub fn decode(
    buf: &mut BytesMut,
    digests: Digests,
    max_data_len: u32,
) -> Result<Option<Pdu>, PduError> {
    let Some(total) = frame_len(buf, digests, max_data_len)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    let ahs_len = usize::from(frame[4]) * 4;
    let dsl = u32::from_be_bytes([0, frame[5], frame[6], frame[7]]) as usize;
    let header = frame.split_to(BHS_LEN + ahs_len);
    if digests.header {
        let want = frame.get_u32_le();
        if crc32c::crc32c(&header) != want {
            return Err(PduError::HeaderDigest);
        }
    }
    let mut bhs_raw = [0u8; BHS_LEN];
    bhs_raw.copy_from_slice(&header[..BHS_LEN]);
    let ahs = header.slice(BHS_LEN..);
    let data = frame.split_to(dsl);
    if digests.data && dsl > 0 {
        frame.advance(pad4(dsl));
        let want = frame.get_u32_le();
        let mut padded = crc32c::crc32c(&data);
        padded = crc32c::crc32c_append(padded, &[0u8; 3][..pad4(dsl)]);
        if padded != want {
            return Err(PduError::DataDigest {
                bhs: Box::new(bhs_raw),
            });
        }
    }
    Ok(Some(Pdu {
        bhs: Bhs::parse(&bhs_raw),
        ahs,
        data,
    }))
}

/// Append the encoded PDU to `out`. The AHS must be a multiple of 4 bytes and at most
/// 1020 bytes, the data segment below 16 MiB; callers build PDUs within those bounds.
pub fn encode(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    out.reserve(BHS_LEN + pdu.ahs.len() + pdu.data.len() + 3 + 2 * DIGEST_LEN);
    encode_header(pdu, digests, out);
    out.put_slice(&pdu.data);
    encode_trailer(pdu, digests, out);
}

/// The part of an encoded PDU before its data segment: BHS, AHS and header digest. With
/// [`encode_trailer`] it lets a sender pass a large data segment to the socket without
/// copying it: `header | pdu.data | trailer` is the encoded PDU.
pub fn encode_header(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    debug_assert!(pdu.ahs.len().is_multiple_of(4) && pdu.ahs.len() <= 1020);
    debug_assert!(pdu.data.len() < (1 << 24));
    let mut b = pdu.bhs.to_bytes();
    b[4] = (pdu.ahs.len() / 4) as u8;
    let dsl = pdu.data.len() as u32;
    b[5..8].copy_from_slice(&dsl.to_be_bytes()[1..]);
    out.reserve(BHS_LEN + pdu.ahs.len() + DIGEST_LEN);
    let start = out.len();
    out.put_slice(&b);
    out.put_slice(&pdu.ahs);
    if digests.header {
        let crc = crc32c::crc32c(&out[start..]);
        out.put_u32_le(crc);
    }
}

/// The part of an encoded PDU after its data segment: padding and data digest.
pub fn encode_trailer(pdu: &Pdu, digests: Digests, out: &mut BytesMut) {
    if pdu.data.is_empty() {
        return;
    }
    let pad = pad4(pdu.data.len());
    out.put_bytes(0, pad);
    if digests.data {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&pdu.data), &[0u8; 3][..pad]);
        out.put_u32_le(crc);
    }
}

const _: () = assert!(BHS_LEN == 48);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(pdu: &Pdu, d: Digests) -> BytesMut {
        let mut out = BytesMut::new();
        encode(pdu, d, &mut out);
        out
    }

    #[test]
    fn partial_input_is_not_an_error() {
        let pdu = Pdu::new(
            Bhs::NopIn(NopIn {
                lun: 0,
                itt: 1,
                ttt: RESERVED_TAG,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
            }),
            Bytes::from_static(b"hello"),
        );
        let full = enc(
            &pdu,
            Digests {
                header: true,
                data: true,
            },
        );
        assert_eq!(full.len(), 48 + 4 + 8 + 4);
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(
                decode(
                    &mut b,
                    Digests {
                        header: true,
                        data: true
                    },
                    8192
                ),
                Ok(None)
            );
            assert_eq!(b.len(), cut);
        }
        let mut b = full.clone();
        let got = decode(
            &mut b,
            Digests {
                header: true,
                data: true,
            },
            8192,
        );
        assert_eq!(got, Ok(Some(pdu)));
        assert!(b.is_empty());
    }

    #[test]
    fn oversized_data_segment_is_refused_before_buffering() {
        let mut raw = [0u8; 48];
        raw[5..8].copy_from_slice(&[0x01, 0x00, 0x01]);
        let mut b = BytesMut::from(&raw[..]);
        assert!(matches!(
            decode(&mut b, Digests::default(), 65536),
            Err(PduError::DataSegmentTooLong {
                len: 65537,
                max: 65536
            })
        ));
    }

    #[test]
    fn digest_errors_are_detected() {
        let pdu = Pdu::new(
            Bhs::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt: 7,
                ttt: RESERVED_TAG,
                cmd_sn: 1,
                exp_stat_sn: 1,
            }),
            Bytes::from_static(b"abc"),
        );
        let d = Digests {
            header: true,
            data: true,
        };
        let mut bad_hd = enc(&pdu, d);
        bad_hd[20] ^= 1;
        assert_eq!(decode(&mut bad_hd, d, 8192), Err(PduError::HeaderDigest));
        let mut bad_dd = enc(&pdu, d);
        bad_dd[53] ^= 1;
        assert!(matches!(
            decode(&mut bad_dd, d, 8192),
            Err(PduError::DataDigest { .. })
        ));
    }

    #[test]
    fn unknown_opcode_is_kept_raw() {
        let mut raw = [0u8; 48];
        raw[0] = 0x1c;
        raw[16] = 9;
        let mut b = BytesMut::from(&raw[..]);
        let pdu = decode(&mut b, Digests::default(), 8192).unwrap().unwrap();
        assert!(matches!(pdu.bhs, Bhs::Unknown(ref r) if r[0] == 0x1c && r[16] == 9));
    }

    proptest! {
        /// Decoding canonicalises a header (drops reserved bits); a second round trip
        /// must then be the identity, for every opcode.
        #[test]
        fn bhs_round_trip(raw in proptest::collection::vec(any::<u8>(), 48),
                          data in proptest::collection::vec(any::<u8>(), 0..600),
                          ahs_words in 0usize..4, hd in any::<bool>(), dd in any::<bool>()) {
            let mut r = [0u8; 48];
            r.copy_from_slice(&raw);
            let pdu = Pdu { bhs: Bhs::parse(&r), ahs: Bytes::from(vec![0xa5; ahs_words * 4]), data: Bytes::from(data) };
            let d = Digests { header: hd, data: dd };
            let mut wire = enc(&pdu, d);
            let back = decode(&mut wire, d, 8192).unwrap().unwrap();
            prop_assert!(wire.is_empty());
            prop_assert_eq!(&back, &pdu);
            prop_assert_eq!(Bhs::parse(&back.bhs.to_bytes()), back.bhs);
        }

        #[test]
        fn decode_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&raw[..]);
            let _ = decode(&mut b, Digests { header: true, data: true }, 1024);
        }
    }
}
