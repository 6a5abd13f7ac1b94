//! Persistent reservations (SPC-4 §5.9, PERSISTENT RESERVE IN §6.15, PERSISTENT RESERVE OUT
//! §6.16) and SCSI-2 RESERVE/RELEASE (SPC-2 §5.5.1, §7.21, §7.22) as one pure state machine.
//!
//! No I/O, no clock, no randomness: in the mirrored product every node applies the same ordered
//! PR OUT / RESERVE / RELEASE commands to its own [`Reservations`] and must end in the same state
//! (DESIGN.md §5, invariant 5). Every mutating entry point is atomic: on error the state is
//! exactly what it was before the command.
//!
//! ```text
//!   SCSI layer ──conflicts(nexus, cdb)──> bool (RESERVATION CONFLICT before executing)
//!              ──persistent_reserve_out──> PrOutcome { unit attentions, persist, abort }
//!              ──persistent_reserve_in───> parameter data
//!              ──reserve / release / nexus_lost / reset (SCSI-2)
//! ```
//!
//! Registrations are kept per I_T nexus, except that a registration made with ALL_TG_PT=1
//! covers the initiator port on every relative target port, and one made through a TransportID
//! of format 00b (SPC-4 §7.6.4.6) covers every initiator port (ISID) of that iSCSI name. No two
//! registrations ever cover the same I_T nexus. Where an outcome names such a registration, the
//! [`NexusId`] is a *pattern*: `relative_target_port == 0` means every target port, and an
//! `initiator_port` without `",i,0x"` means every ISID; [`nexus_matches`] expands it.
//!
//! Compatible Reservation Handling (CRH=1, SPC-4 §5.9.3 / SPC-3 §5.6.3) governs RESERVE/RELEASE
//! while registrations exist; while a SCSI-2 reservation exists every PERSISTENT RESERVE IN/OUT
//! conflicts, whatever its initiator (SPC-2 §5.5.1).

use serde::{Deserialize, Serialize};

use super::sense::{asc, Asc};
use super::{NexusId, ScsiError};

/// Most registrations the logical unit holds. A registration beyond it fails with ILLEGAL
/// REQUEST, INSUFFICIENT REGISTRATION RESOURCES (SPC-4 §5.9.7). Bounds memory and the size of
/// READ FULL STATUS data.
pub const REGISTRATIONS_MAX: usize = 256;
/// Longest iSCSI name accepted in a TransportID (RFC 7143 §4.2.7.1: 223 bytes).
pub const ISCSI_NAME_LEN_MAX: usize = 223;

/// Separator between iSCSI name and ISID in an initiator port name (RFC 7143 §4.2.7.1).
const PORT_SEP: &str = ",i,0x";
/// SPC-4 §7.6.2 protocol identifier for iSCSI.
const PROTOCOL_ISCSI: u8 = 0x5;
/// PERSISTENT RESERVE OUT basic parameter list length (SPC-4 §6.16.3).
const PROUT_BASIC_LEN: usize = 24;

mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ6: u8 = 0x08;
    pub const INQUIRY: u8 = 0x12;
    pub const RESERVE6: u8 = 0x16;
    pub const RELEASE6: u8 = 0x17;
    pub const MODE_SENSE6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const RECEIVE_DIAGNOSTIC: u8 = 0x1c;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY10: u8 = 0x25;
    pub const READ10: u8 = 0x28;
    pub const VERIFY10: u8 = 0x2f;
    pub const PRE_FETCH10: u8 = 0x34;
    pub const READ_DEFECT_DATA10: u8 = 0x37;
    pub const READ_BUFFER: u8 = 0x3c;
    pub const READ_LONG10: u8 = 0x3e;
    pub const LOG_SENSE: u8 = 0x4d;
    pub const RESERVE10: u8 = 0x56;
    pub const RELEASE10: u8 = 0x57;
    pub const MODE_SENSE10: u8 = 0x5a;
    pub const PR_IN: u8 = 0x5e;
    pub const PR_OUT: u8 = 0x5f;
    pub const VARIABLE_LENGTH: u8 = 0x7f;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const ACCESS_CONTROL_IN: u8 = 0x86;
    pub const ACCESS_CONTROL_OUT: u8 = 0x87;
    pub const READ16: u8 = 0x88;
    pub const READ_ATTRIBUTE: u8 = 0x8c;
    pub const VERIFY16: u8 = 0x8f;
    pub const PRE_FETCH16: u8 = 0x90;
    pub const SERVICE_ACTION_IN16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const SECURITY_PROTOCOL_IN: u8 = 0xa2;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ12: u8 = 0xa8;
    pub const SERVICE_ACTION_IN12: u8 = 0xab;
    pub const VERIFY12: u8 = 0xaf;
    pub const READ_DEFECT_DATA12: u8 = 0xb7;
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2, table 223).
mod sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;
}

/// Persistent reservation types (SPC-4 §6.16.2, table 222).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    pub const ALL: [PrType; 6] = [
        PrType::WriteExclusive,
        PrType::ExclusiveAccess,
        PrType::WriteExclusiveRegistrantsOnly,
        PrType::ExclusiveAccessRegistrantsOnly,
        PrType::WriteExclusiveAllRegistrants,
        PrType::ExclusiveAccessAllRegistrants,
    ];

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            0x7 => PrType::WriteExclusiveAllRegistrants,
            0x8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 0x1,
            PrType::ExclusiveAccess => 0x3,
            PrType::WriteExclusiveRegistrantsOnly => 0x5,
            PrType::ExclusiveAccessRegistrantsOnly => 0x6,
            PrType::WriteExclusiveAllRegistrants => 0x7,
            PrType::ExclusiveAccessAllRegistrants => 0x8,
        }
    }

    /// Reads by non-holders are allowed (the Write Exclusive family).
    pub fn write_exclusive(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusive
                | PrType::WriteExclusiveRegistrantsOnly
                | PrType::WriteExclusiveAllRegistrants
        )
    }

    /// Every registrant is a reservation holder (SPC-4 §5.9.10).
    pub fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    pub fn registrants_only(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveRegistrantsOnly | PrType::ExclusiveAccessRegistrantsOnly
        )
    }

    /// Registrants-only or all-registrants: every registered I_T nexus has access.
    fn registrant_access(self) -> bool {
        self.registrants_only() || self.all_registrants()
    }
}

/// One registration (SPC-4 §5.9.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Initiator port name (`"<iSCSI name>,i,0x<ISID>"`), or a bare iSCSI name when registered
    /// through a TransportID of format 00b (covers every ISID of that initiator).
    pub initiator: String,
    /// Relative target port, or `None` when registered with ALL_TG_PT=1 (every target port).
    pub target_port: Option<u16>,
    pub key: u64,
}

/// The persistent reservation. Its holder is the registration with the same identity
/// (initiator, target port); for all-registrants types every registration is a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub holder_initiator: String,
    pub holder_target_port: Option<u16>,
    pub rtype: PrType,
}

/// Serializable image of the whole state (for APTPL persistence and for handing the state to a
/// joining mirror node). `restore(snapshot())` is the identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrSnapshot {
    pub generation: u32,
    pub aptpl: bool,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// SCSI-2 reservation holder: (initiator port, relative target port).
    pub scsi2_holder: Option<(String, u16)>,
}

impl PrSnapshot {
    /// What survives a power loss: SPC-4 §5.9.5 keeps registrations and the reservation only if
    /// the last APTPL bit was one; SCSI-2 reservations never survive (SPC-2 §5.5.1); PRgeneration
    /// restarts at zero (SPC-4 §6.15.2).
    pub fn after_power_loss(&self) -> PrSnapshot {
        if !self.aptpl {
            return PrSnapshot::default();
        }
        PrSnapshot {
            generation: 0,
            aptpl: true,
            registrations: self.registrations.clone(),
            reservation: self.reservation.clone(),
            scsi2_holder: None,
        }
    }
}

/// Side effects of a PERSISTENT RESERVE OUT command for the caller to carry out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrOutcome {
    /// Unit attentions to establish on other I_T nexuses (e.g. RESERVATIONS PREEMPTED 2A/03,
    /// RESERVATIONS RELEASED 2A/04, REGISTRATIONS PREEMPTED 2A/05) per SPC-4.
    /// Entries may be patterns (see [`nexus_matches`]); the caller expands them against its
    /// live nexuses and never posts them to the nexus that sent the command.
    pub unit_attentions: Vec<(NexusId, Asc)>,
    /// The APTPL state changed and must be saved before the command completes: the state
    /// changed while APTPL was (or became) active. Save [`Reservations::snapshot`].
    pub persist: bool,
    /// PREEMPT AND ABORT: nexuses whose tasks must be aborted (patterns as above; never the
    /// sender).
    pub abort_tasks_of: Vec<NexusId>,
}

/// Whether `nexus` is covered by `pattern` as used in [`PrOutcome`]: a relative target port of
/// 0 matches every port, and an initiator without `",i,0x"` matches every ISID of that name.
pub fn nexus_matches(pattern: &NexusId, nexus: &NexusId) -> bool {
    initiator_matches(&pattern.initiator_port, &nexus.initiator_port)
        && (pattern.relative_target_port == 0
            || pattern.relative_target_port == nexus.relative_target_port)
}

/// Byte index of `",i,0x"` in an initiator port name, case-insensitively.
fn sep_index(s: &str) -> Option<usize> {
    // ASCII lowercasing keeps byte offsets, so the index is valid in `s`.
    s.to_ascii_lowercase().find(PORT_SEP)
}

/// The iSCSI name part of an initiator port name (all of it for a bare name).
fn name_part(s: &str) -> &str {
    match sep_index(s) {
        Some(i) => s.get(..i).unwrap_or(s),
        None => s,
    }
}

/// `reg` (port name or bare name) covers initiator port `port`. iSCSI names compare
/// case-insensitively (RFC 3722 normalises them to lower case).
fn initiator_matches(reg: &str, port: &str) -> bool {
    if sep_index(reg).is_some() {
        reg.eq_ignore_ascii_case(port)
    } else {
        name_part(port).eq_ignore_ascii_case(reg)
    }
}

/// Some initiator port is covered by both `a` and `b`.
fn initiators_overlap(a: &str, b: &str) -> bool {
    match (sep_index(a).is_some(), sep_index(b).is_some()) {
        (true, true) | (false, false) => a.eq_ignore_ascii_case(b),
        (true, false) => name_part(a).eq_ignore_ascii_case(b),
        (false, true) => name_part(b).eq_ignore_ascii_case(a),
    }
}

fn ports_overlap(a: Option<u16>, b: Option<u16>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

impl Registration {
    fn matches(&self, n: &NexusId) -> bool {
        initiator_matches(&self.initiator, &n.initiator_port)
            && self.target_port.is_none_or(|p| p == n.relative_target_port)
    }

    fn overlaps(&self, initiator: &str, target_port: Option<u16>) -> bool {
        initiators_overlap(&self.initiator, initiator)
            && ports_overlap(self.target_port, target_port)
    }

    fn is_identity(&self, initiator: &str, target_port: Option<u16>) -> bool {
        self.initiator.eq_ignore_ascii_case(initiator) && self.target_port == target_port
    }

    /// Covers exactly one I_T nexus.
    fn is_exact(&self) -> bool {
        self.target_port.is_some() && sep_index(&self.initiator).is_some()
    }

    fn pattern(&self) -> NexusId {
        NexusId {
            initiator_port: self.initiator.clone(),
            relative_target_port: self.target_port.unwrap_or(0),
        }
    }
}

fn conflict() -> ScsiError {
    ScsiError::ReservationConflict
}
fn bad_cdb() -> ScsiError {
    ScsiError::invalid_field_in_cdb()
}
fn bad_param() -> ScsiError {
    ScsiError::invalid_field_in_param()
}
fn param_len_err() -> ScsiError {
    ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}
fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_be_bytes(v)
}
fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Parses one iSCSI TransportID (SPC-4 §7.6.4.6) at the start of `buf`. Returns the canonical
/// initiator (bare name for format 00b, `"name,i,0x<12 hex>"` for 01b) and its length.
fn parse_transport_id(buf: &[u8]) -> Result<(String, usize), ScsiError> {
    if buf.len() < 4 {
        return Err(param_len_err());
    }
    let format = buf[0] >> 6;
    if buf[0] & 0x0f != PROTOCOL_ISCSI || format > 1 {
        return Err(bad_param());
    }
    let additional = usize::from(be_u16(buf, 2));
    // The ADDITIONAL LENGTH is a multiple of four (the name is NUL-padded).
    if additional == 0 || additional & 3 != 0 {
        return Err(bad_param());
    }
    let total = 4 + additional;
    let field = buf.get(4..total).ok_or_else(param_len_err)?;
    let nul = field.iter().position(|&c| c == 0).ok_or_else(bad_param)?;
    let text = std::str::from_utf8(&field[..nul]).map_err(|_| bad_param())?;
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad_param());
    }
    let canonical = match (format, sep_index(text)) {
        (0, None) => text.to_string(),
        (1, Some(i)) => {
            let isid = &text[i + PORT_SEP.len()..];
            if isid.is_empty() || isid.len() > 12 || !isid.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad_param());
            }
            let isid = u64::from_str_radix(isid, 16).map_err(|_| bad_param())?;
            format!("{}{PORT_SEP}{isid:012x}", &text[..i])
        }
        _ => return Err(bad_param()),
    };
    let name = name_part(&canonical);
    if name.is_empty() || name.len() > ISCSI_NAME_LEN_MAX {
        return Err(bad_param());
    }
    Ok((canonical, total))
}

/// An iSCSI TransportID for READ FULL STATUS: format 01b for an initiator port, 00b for a bare
/// name; NUL-terminated and padded to a multiple of four, at least 20 bytes (SPC-4 §7.6.4.6).
fn encode_transport_id(initiator: &str) -> Vec<u8> {
    let format: u8 = if sep_index(initiator).is_some() { 1 } else { 0 };
    let mut name = initiator.as_bytes().to_vec();
    name.push(0);
    while name.len() & 3 != 0 || name.len() < 16 {
        name.push(0);
    }
    let mut t = Vec::with_capacity(4 + name.len());
    t.push((format << 6) | PROTOCOL_ISCSI);
    t.push(0);
    // Bounded by ISCSI_NAME_LEN_MAX for parsed names; clamp defensively for restored ones.
    t.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    t.extend_from_slice(&name);
    t
}

/// Access class of a command under a persistent reservation (SPC-4 §5.9.1 table 63, SBC-3
/// §4.17 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed from every I_T nexus under every type.
    Always,
    /// Allowed from non-holders under Write Exclusive types only.
    Read,
    /// Only holders (and registrants for registrants-only types).
    Write,
    /// PERSISTENT RESERVE IN/OUT: decided by the command itself.
    Pr,
    /// RESERVE / RELEASE: decided by CRH rules.
    Scsi2 { reserve: bool },
}

fn classify(cdb: &[u8]) -> Access {
    let Some(&opcode) = cdb.first() else {
        return Access::Write;
    };
    let sa1 = byte(cdb, 1) & 0x1f;
    match opcode {
        op::INQUIRY
        | op::REQUEST_SENSE
        | op::REPORT_LUNS
        | op::LOG_SENSE
        | op::ACCESS_CONTROL_IN
        | op::ACCESS_CONTROL_OUT
        | op::TEST_UNIT_READY
        | op::READ_CAPACITY10 => Access::Always,
        op::PR_IN | op::PR_OUT => Access::Pr,
        op::RESERVE6 | op::RESERVE10 => Access::Scsi2 { reserve: true },
        op::RELEASE6 | op::RELEASE10 => Access::Scsi2 { reserve: false },
        // PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0 is allowed (SBC-3 table 13).
        op::PREVENT_ALLOW if byte(cdb, 4) & 0x03 == 0 => Access::Always,
        // START STOP UNIT with START=1 and POWER CONDITION=0 is allowed (SBC-3 table 13).
        op::START_STOP_UNIT if byte(cdb, 4) & 0xf1 == 0x01 => Access::Always,
        op::MAINTENANCE_IN => match sa1 {
            // REPORT IDENTIFYING INFORMATION, REPORT TARGET PORT GROUPS, REPORT ALIASES,
            // REPORT PRIORITY, REPORT TIMESTAMP.
            0x05 | 0x0a | 0x0b | 0x0e | 0x0f => Access::Always,
            // REPORT SUPPORTED OPERATION CODES / TASK MANAGEMENT FUNCTIONS, MANAGEMENT
            // PROTOCOL IN.
            0x0c | 0x0d | 0x10 => Access::Read,
            _ => Access::Write,
        },
        op::SERVICE_ACTION_IN16 => match sa1 {
            0x10 => Access::Always,      // READ CAPACITY (16)
            0x11..=0x13 => Access::Read, // READ LONG (16), GET LBA STATUS, REPORT REFERRALS
            _ => Access::Write,
        },
        op::SERVICE_ACTION_IN12 if sa1 == 0x01 => Access::Always, // READ MEDIA SERIAL NUMBER
        op::VARIABLE_LENGTH => match be_u16(cdb, 8) {
            0x0009 | 0x000a => Access::Read, // READ (32), VERIFY (32)
            _ => Access::Write,
        },
        op::READ6
        | op::READ10
        | op::READ12
        | op::READ16
        | op::VERIFY10
        | op::VERIFY12
        | op::VERIFY16
        | op::PRE_FETCH10
        | op::PRE_FETCH16
        | op::READ_LONG10
        | op::READ_DEFECT_DATA10
        | op::READ_DEFECT_DATA12
        | op::MODE_SENSE6
        | op::MODE_SENSE10
        | op::READ_ATTRIBUTE
        | op::READ_BUFFER
        | op::RECEIVE_COPY_RESULTS
        | op::RECEIVE_DIAGNOSTIC
        | op::SECURITY_PROTOCOL_IN => Access::Read,
        // Writes, MODE SELECT, SYNCHRONIZE CACHE, UNMAP, EXTENDED COPY, FORMAT, SANITIZE,
        // LOG SELECT, and anything unknown (which fails later anyway).
        _ => Access::Write,
    }
}

/// Commands another initiator may still send while a SCSI-2 reservation is held (SPC-2
/// §5.5.1): INQUIRY, REQUEST SENSE, REPORT LUNS, RELEASE (a no-op), PREVENT ALLOW MEDIUM
/// REMOVAL with PREVENT=0, LOG SENSE, and REPORT TARGET PORT GROUPS (multipath path probing).
fn scsi2_allowed(cdb: &[u8]) -> bool {
    match cdb.first().copied() {
        Some(op::INQUIRY | op::REQUEST_SENSE | op::REPORT_LUNS | op::LOG_SENSE) => true,
        Some(op::RELEASE6 | op::RELEASE10) => true,
        Some(op::PREVENT_ALLOW) => byte(cdb, 4) & 0x03 == 0,
        Some(op::MAINTENANCE_IN) => byte(cdb, 1) & 0x1f == 0x0a,
        _ => false,
    }
}

fn same_nexus(a: &NexusId, b: &NexusId) -> bool {
    a.relative_target_port == b.relative_target_port
        && a.initiator_port.eq_ignore_ascii_case(&b.initiator_port)
}

/// Basic PERSISTENT RESERVE OUT parameter list (SPC-4 §6.16.3).
struct BasicParams {
    rk: u64,
    sark: u64,
    spec_i_pt: bool,
    all_tg_pt: bool,
    aptpl: bool,
    transport_ids: Vec<String>,
}

/// REGISTER AND MOVE parameter list (SPC-4 §6.16.4).
struct MoveParams {
    rk: u64,
    sark: u64,
    unreg: bool,
    aptpl: bool,
    target_port: u16,
    initiator: String,
}

fn parse_basic(sa_code: u8, p: &[u8]) -> Result<BasicParams, ScsiError> {
    if p.len() < PROUT_BASIC_LEN {
        return Err(param_len_err());
    }
    let flags = p[20];
    let spec_i_pt = flags & 0x08 != 0;
    let mut transport_ids = Vec::new();
    if spec_i_pt {
        // SPEC_I_PT is valid only for REGISTER (SPC-4 §6.16.3, table 224).
        if sa_code != sa::REGISTER {
            return Err(bad_param());
        }
        if p.len() < PROUT_BASIC_LEN + 4 {
            return Err(param_len_err());
        }
        let tid_len = usize::try_from(be_u32(p, PROUT_BASIC_LEN)).map_err(|_| param_len_err())?;
        let start = PROUT_BASIC_LEN + 4;
        let mut tids = p
            .get(start..start.saturating_add(tid_len))
            .ok_or_else(param_len_err)?;
        while !tids.is_empty() {
            if transport_ids.len() >= REGISTRATIONS_MAX {
                return Err(ScsiError::illegal(asc::INSUFFICIENT_REGISTRATION_RESOURCES));
            }
            let (initiator, used) = parse_transport_id(tids)?;
            transport_ids.push(initiator);
            tids = &tids[used..];
        }
    } else if p.len() != PROUT_BASIC_LEN {
        return Err(param_len_err());
    }
    Ok(BasicParams {
        rk: be_u64(p, 0),
        sark: be_u64(p, 8),
        spec_i_pt,
        all_tg_pt: flags & 0x04 != 0,
        aptpl: flags & 0x01 != 0,
        transport_ids,
    })
}

fn parse_move(p: &[u8]) -> Result<MoveParams, ScsiError> {
    if p.len() < PROUT_BASIC_LEN {
        return Err(param_len_err());
    }
    let tid_len = usize::try_from(be_u32(p, 20)).map_err(|_| param_len_err())?;
    let tid = p
        .get(PROUT_BASIC_LEN..PROUT_BASIC_LEN.saturating_add(tid_len))
        .ok_or_else(param_len_err)?;
    let (initiator, used) = parse_transport_id(tid)?;
    // Exactly one TransportID.
    if used != tid.len() {
        return Err(bad_param());
    }
    Ok(MoveParams {
        rk: be_u64(p, 0),
        sark: be_u64(p, 8),
        unreg: p[17] & 0x02 != 0,
        aptpl: p[17] & 0x01 != 0,
        target_port: be_u16(p, 18),
        initiator,
    })
}

/// Validates SCOPE (LU_SCOPE only) and TYPE from PR OUT CDB byte 2.
fn scope_type(cdb: &[u8]) -> Result<PrType, ScsiError> {
    let b = byte(cdb, 2);
    if b >> 4 != 0 {
        return Err(bad_cdb());
    }
    PrType::from_code(b & 0x0f).ok_or_else(bad_cdb)
}

/// Reservation state of one logical unit: registrations, the persistent reservation, the
/// SCSI-2 reservation, PRgeneration and APTPL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reservations {
    /// In registration order (READ KEYS and READ FULL STATUS report this order).
    regs: Vec<Registration>,
    res: Option<Reservation>,
    generation: u32,
    aptpl: bool,
    scsi2: Option<NexusId>,
}

impl Reservations {
    pub fn new() -> Self {
        Self::default()
    }

    /// PRgeneration (SPC-4 §6.15.2).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Registered reservation keys in registration order.
    pub fn keys(&self) -> Vec<u64> {
        self.regs.iter().map(|r| r.key).collect()
    }

    /// The current persistent reservation, if any.
    pub fn reservation(&self) -> Option<&Reservation> {
        self.res.as_ref()
    }

    /// The holder of the SCSI-2 reservation, if any.
    pub fn scsi2_holder(&self) -> Option<&NexusId> {
        self.scsi2.as_ref()
    }

    fn reg_index(&self, n: &NexusId) -> Option<usize> {
        self.regs.iter().position(|r| r.matches(n))
    }

    fn holder_index(&self) -> Option<usize> {
        let r = self.res.as_ref()?;
        self.regs
            .iter()
            .position(|g| g.is_identity(&r.holder_initiator, r.holder_target_port))
    }

    fn is_holder(&self, n: &NexusId) -> bool {
        match (&self.res, self.reg_index(n)) {
            (Some(r), Some(i)) => {
                r.rtype.all_registrants()
                    || self.regs[i].is_identity(&r.holder_initiator, r.holder_target_port)
            }
            _ => false,
        }
    }

    /// UA targets: every registration accepted by `keep`, except the sender's own exact one.
    fn ua_targets(&self, sender: &NexusId, keep: impl Fn(&Registration) -> bool) -> Vec<NexusId> {
        self.regs
            .iter()
            .filter(|r| keep(r) && !(r.is_exact() && r.matches(sender)))
            .map(Registration::pattern)
            .collect()
    }

    /// Restores the invariant that a reservation has a holder: an all-registrants reservation
    /// ends with its last registrant, any other with its holder's registration (SPC-4 §5.9.11).
    fn drop_orphan_reservation(&mut self) {
        let orphan = match &self.res {
            Some(r) if r.rtype.all_registrants() => self.regs.is_empty(),
            Some(_) => self.holder_index().is_none(),
            None => false,
        };
        if orphan {
            self.res = None;
        }
    }

    /// true if this command from `nexus` must get RESERVATION CONFLICT: SPC-4 §5.9.1 / table 63
    /// (which commands are allowed for each reservation type, registered vs unregistered), and
    /// for SCSI-2 reservations held by another nexus (SPC-2 §5.5.1). PERSISTENT RESERVE IN/OUT
    /// conflict while any SCSI-2 reservation exists; otherwise PR OUT decides for itself.
    pub fn conflicts(&self, nexus: &NexusId, cdb: &[u8]) -> bool {
        let access = classify(cdb);
        if let Some(holder) = &self.scsi2 {
            // SPC-2 §5.5.1: PR IN/OUT conflict regardless of initiator.
            if access == Access::Pr {
                return true;
            }
            if !same_nexus(holder, nexus) {
                return !scsi2_allowed(cdb);
            }
            return false;
        }
        match access {
            Access::Pr => false,
            Access::Scsi2 { reserve } => self.scsi2_gate(nexus, reserve).is_err(),
            Access::Always => false,
            Access::Read | Access::Write => {
                let Some(r) = &self.res else {
                    return false;
                };
                if self.is_holder(nexus)
                    || (r.rtype.registrant_access() && self.reg_index(nexus).is_some())
                {
                    return false;
                }
                access == Access::Write || !r.rtype.write_exclusive()
            }
        }
    }

    /// PERSISTENT RESERVE IN: READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL
    /// STATUS. Returns the full parameter data; the caller truncates to the allocation length.
    pub fn persistent_reserve_in(
        &self,
        _nexus: &NexusId,
        cdb: &[u8],
    ) -> Result<Vec<u8>, ScsiError> {
        if self.scsi2.is_some() {
            return Err(conflict()); // SPC-2 §5.5.1
        }
        if cdb.len() < 10 {
            return Err(bad_cdb());
        }
        match cdb[1] & 0x1f {
            sa::READ_KEYS => Ok(self.read_keys()),
            sa::READ_RESERVATION => Ok(self.read_reservation()),
            sa::REPORT_CAPABILITIES => Ok(self.report_capabilities()),
            sa::READ_FULL_STATUS => Ok(self.read_full_status()),
            _ => Err(bad_cdb()),
        }
    }

    /// SPC-4 §6.15.2.
    fn read_keys(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(8 + 8 * self.regs.len());
        d.extend_from_slice(&self.generation.to_be_bytes());
        let len = u32::try_from(8 * self.regs.len()).unwrap_or(u32::MAX);
        d.extend_from_slice(&len.to_be_bytes());
        for r in &self.regs {
            d.extend_from_slice(&r.key.to_be_bytes());
        }
        d
    }

    /// SPC-4 §6.15.3.
    fn read_reservation(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&self.generation.to_be_bytes());
        match &self.res {
            None => d.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                d.extend_from_slice(&16u32.to_be_bytes());
                // All-registrants reservations report key zero (SPC-4 §6.15.3.3).
                let key = if r.rtype.all_registrants() {
                    0
                } else {
                    self.holder_index().map_or(0, |i| self.regs[i].key)
                };
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&[0; 4]); // obsolete
                d.push(0);
                d.push(r.rtype.code()); // SCOPE = LU_SCOPE (0)
                d.extend_from_slice(&[0; 2]); // obsolete
            }
        }
        d
    }

    /// SPC-4 §6.15.4: what this module implements, exactly.
    fn report_capabilities(&self) -> Vec<u8> {
        let mut d = vec![0u8; 8];
        d[1] = 8; // LENGTH
                  // CRH (SPC-3 §5.6.3 rules for RESERVE/RELEASE), SIP_C, ATP_C, PTPL_C. RLR_C=0.
        d[2] = 0x10 | 0x08 | 0x04 | 0x01;
        // TMV; ALLOW COMMANDS 011b: TEST UNIT READY through WE and EA, and MODE SENSE, READ
        // ATTRIBUTE, READ BUFFER, RECEIVE COPY RESULTS, RECEIVE DIAGNOSTIC RESULTS, REPORT
        // SUPPORTED OPERATION CODES/TMFs and READ DEFECT DATA through WE; PTPL_A.
        d[3] = 0x80 | (0b011 << 4) | u8::from(self.aptpl);
        // PERSISTENT RESERVATION TYPE MASK: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
        d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
        d[5] = 0x01;
        d
    }

    /// SPC-4 §6.15.5.
    fn read_full_status(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for g in &self.regs {
            let holder = match &self.res {
                Some(r) if r.rtype.all_registrants() => Some(r.rtype),
                Some(r) if g.is_identity(&r.holder_initiator, r.holder_target_port) => {
                    Some(r.rtype)
                }
                _ => None,
            };
            let tid = encode_transport_id(&g.initiator);
            body.extend_from_slice(&g.key.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            body.push(u8::from(g.target_port.is_none()) << 1 | u8::from(holder.is_some()));
            body.push(holder.map_or(0, PrType::code));
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&g.target_port.unwrap_or(0).to_be_bytes());
            body.extend_from_slice(&u32::try_from(tid.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(&tid);
        }
        let mut d = Vec::with_capacity(8 + body.len());
        d.extend_from_slice(&self.generation.to_be_bytes());
        d.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&body);
        d
    }

    /// PERSISTENT RESERVE OUT: REGISTER, REGISTER AND IGNORE EXISTING KEY, RESERVE, RELEASE,
    /// CLEAR, PREEMPT, PREEMPT AND ABORT, REGISTER AND MOVE; all types (WE, EA, WE-RO, EA-RO,
    /// WE-AR, EA-AR); APTPL, ALL_TG_PT, SPEC_I_PT with iSCSI TransportIDs (SPC-4 §7.6.4.6,
    /// formats 00b and 01b). Atomic: on error nothing changed.
    pub fn persistent_reserve_out(
        &mut self,
        nexus: &NexusId,
        cdb: &[u8],
        params: &[u8],
    ) -> Result<PrOutcome, ScsiError> {
        if self.scsi2.is_some() {
            return Err(conflict()); // SPC-2 §5.5.1
        }
        if cdb.len() < 10 {
            return Err(bad_cdb());
        }
        let service_action = cdb[1] & 0x1f;
        if service_action > sa::REGISTER_AND_MOVE {
            return Err(bad_cdb());
        }
        let plen = usize::try_from(be_u32(cdb, 5)).map_err(|_| param_len_err())?;
        // Fewer bytes than the CDB announces cannot be a valid parameter list.
        let p = params.get(..plen).ok_or_else(param_len_err)?;

        let before = self.clone();
        let mut out = PrOutcome::default();
        let result = if service_action == sa::REGISTER_AND_MOVE {
            parse_move(p).and_then(|m| self.register_and_move(nexus, cdb, m))
        } else {
            parse_basic(service_action, p).and_then(|b| match service_action {
                sa::REGISTER => self.register(nexus, b, false, &mut out),
                sa::REGISTER_AND_IGNORE => self.register(nexus, b, true, &mut out),
                sa::RESERVE => self.reserve_pr(nexus, cdb, b),
                sa::RELEASE => self.release_pr(nexus, cdb, b, &mut out),
                sa::CLEAR => self.clear(nexus, b, &mut out),
                sa::PREEMPT => self.preempt(nexus, cdb, b, false, &mut out),
                sa::PREEMPT_AND_ABORT => self.preempt(nexus, cdb, b, true, &mut out),
                _ => Err(bad_cdb()),
            })
        };
        if let Err(e) = result {
            *self = before;
            return Err(e);
        }
        out.persist = *self != before && (before.aptpl || self.aptpl);
        Ok(out)
    }

    /// The sender's registration index after checking RESERVATION KEY (SPC-4 §5.9.7: an
    /// unregistered sender or a wrong key is a RESERVATION CONFLICT).
    fn check_key(&self, n: &NexusId, rk: u64) -> Result<usize, ScsiError> {
        match self.reg_index(n) {
            Some(i) if self.regs[i].key == rk => Ok(i),
            _ => Err(conflict()),
        }
    }

    /// REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.9.7, §5.9.11.3).
    fn register(
        &mut self,
        n: &NexusId,
        p: BasicParams,
        ignore_key: bool,
        out: &mut PrOutcome,
    ) -> Result<(), ScsiError> {
        match self.reg_index(n) {
            None => {
                if !ignore_key && p.rk != 0 {
                    return Err(conflict());
                }
                if p.sark != 0 {
                    let port = if p.all_tg_pt {
                        None
                    } else {
                        Some(n.relative_target_port)
                    };
                    let mut new = vec![Registration {
                        initiator: n.initiator_port.clone(),
                        target_port: port,
                        key: p.sark,
                    }];
                    for tid in p.transport_ids {
                        new.push(Registration {
                            initiator: tid,
                            target_port: port,
                            key: p.sark,
                        });
                    }
                    // A named I_T nexus that is already registered (or named twice) is an
                    // invalid parameter list; an ALL_TG_PT registration must not swallow a
                    // registration the initiator holds on another port.
                    for (i, g) in new.iter().enumerate() {
                        let clash = self
                            .regs
                            .iter()
                            .chain(&new[..i])
                            .any(|o| o.overlaps(&g.initiator, g.target_port));
                        if clash {
                            return Err(bad_param());
                        }
                    }
                    if self.regs.len() + new.len() > REGISTRATIONS_MAX {
                        return Err(ScsiError::illegal(asc::INSUFFICIENT_REGISTRATION_RESOURCES));
                    }
                    self.regs.extend(new);
                }
                // SARK zero from an unregistered nexus: nothing to do, GOOD (SPC-4 §5.9.7.2).
            }
            Some(i) => {
                if !ignore_key && p.rk != self.regs[i].key {
                    return Err(conflict());
                }
                if p.spec_i_pt {
                    return Err(bad_param());
                }
                if p.sark == 0 {
                    self.unregister(i, n, out);
                } else {
                    self.regs[i].key = p.sark;
                }
            }
        }
        self.aptpl = p.aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// Removes registration `i` (SPC-4 §5.9.11.3): the holder's reservation goes with it, and
    /// for registrants-only types the other registrants learn RESERVATIONS RELEASED.
    fn unregister(&mut self, i: usize, n: &NexusId, out: &mut PrOutcome) {
        let gone = self.regs.remove(i);
        let Some(r) = self.res.clone() else {
            return;
        };
        if r.rtype.all_registrants() {
            self.drop_orphan_reservation();
        } else if gone.is_identity(&r.holder_initiator, r.holder_target_port) {
            self.res = None;
            if r.rtype.registrants_only() {
                for t in self.ua_targets(n, |_| true) {
                    out.unit_attentions.push((t, asc::RESERVATIONS_RELEASED));
                }
            }
        }
    }

    /// RESERVE (SPC-4 §5.9.9).
    fn reserve_pr(&mut self, n: &NexusId, cdb: &[u8], p: BasicParams) -> Result<(), ScsiError> {
        let rtype = scope_type(cdb)?;
        let i = self.check_key(n, p.rk)?;
        match &self.res {
            None => {
                self.res = Some(Reservation {
                    holder_initiator: self.regs[i].initiator.clone(),
                    holder_target_port: self.regs[i].target_port,
                    rtype,
                });
                Ok(())
            }
            // The holder may repeat its reservation; anything else conflicts.
            Some(r) if r.rtype == rtype && self.is_holder(n) => Ok(()),
            Some(_) => Err(conflict()),
        }
    }

    /// RELEASE (SPC-4 §5.9.11.2).
    fn release_pr(
        &mut self,
        n: &NexusId,
        cdb: &[u8],
        p: BasicParams,
        out: &mut PrOutcome,
    ) -> Result<(), ScsiError> {
        self.check_key(n, p.rk)?;
        let Some(r) = self.res.clone() else {
            return Ok(());
        };
        if !self.is_holder(n) {
            return Ok(()); // not the holder: GOOD, nothing released
        }
        if byte(cdb, 2) != r.rtype.code() {
            return Err(ScsiError::illegal(
                asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
            ));
        }
        self.res = None;
        if r.rtype.registrant_access() {
            for t in self.ua_targets(n, |_| true) {
                out.unit_attentions.push((t, asc::RESERVATIONS_RELEASED));
            }
        }
        Ok(())
    }

    /// CLEAR (SPC-4 §5.9.11.6).
    fn clear(&mut self, n: &NexusId, p: BasicParams, out: &mut PrOutcome) -> Result<(), ScsiError> {
        self.check_key(n, p.rk)?;
        for t in self.ua_targets(n, |_| true) {
            out.unit_attentions.push((t, asc::RESERVATIONS_PREEMPTED));
        }
        self.regs.clear();
        self.res = None;
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// Removes every registration accepted by `remove`, reporting REGISTRATIONS PREEMPTED to
    /// each (and, for PREEMPT AND ABORT, their tasks). Returns how many were removed.
    fn remove_registrations(
        &mut self,
        n: &NexusId,
        remove: impl Fn(&Registration) -> bool,
        abort: bool,
        out: &mut PrOutcome,
    ) -> usize {
        let targets = self.ua_targets(n, &remove);
        let count = self.regs.iter().filter(|g| remove(g)).count();
        self.regs.retain(|g| !remove(g));
        for t in targets {
            if abort {
                out.abort_tasks_of.push(t.clone());
            }
            out.unit_attentions.push((t, asc::REGISTRATIONS_PREEMPTED));
        }
        count
    }

    /// PREEMPT / PREEMPT AND ABORT (SPC-4 §5.9.11.4, §5.9.11.5).
    fn preempt(
        &mut self,
        n: &NexusId,
        cdb: &[u8],
        p: BasicParams,
        abort: bool,
        out: &mut PrOutcome,
    ) -> Result<(), ScsiError> {
        let rtype = scope_type(cdb)?;
        let me = self.check_key(n, p.rk)?;
        let me_id = (self.regs[me].initiator.clone(), self.regs[me].target_port);
        let is_me = |g: &Registration| g.is_identity(&me_id.0, me_id.1);
        let sark = p.sark;
        // Preempting the reservation itself: the SARK names the holder (non-AR), or is zero
        // under an all-registrants reservation.
        let preempts_reservation = match &self.res {
            Some(r) if r.rtype.all_registrants() => sark == 0,
            Some(_) => {
                if sark == 0 {
                    return Err(bad_param());
                }
                self.holder_index().map(|h| self.regs[h].key) == Some(sark)
            }
            None => {
                if sark == 0 {
                    return Err(bad_param());
                }
                false
            }
        };
        if preempts_reservation {
            let old = self.res.clone();
            let all_reg = old.as_ref().is_some_and(|r| r.rtype.all_registrants());
            self.remove_registrations(n, |g| !is_me(g) && (all_reg || g.key == sark), abort, out);
            self.res = Some(Reservation {
                holder_initiator: me_id.0.clone(),
                holder_target_port: me_id.1,
                rtype,
            });
            // A changed type releases the old reservation for the remaining registrants.
            if old.is_some_and(|r| r.rtype != rtype) {
                for t in self.ua_targets(n, |g| !is_me(g)) {
                    out.unit_attentions.push((t, asc::RESERVATIONS_RELEASED));
                }
            }
        } else {
            // Removing registrations only (SPC-4 §5.9.11.4.3); SCOPE and TYPE are ignored.
            if self.remove_registrations(n, |g| g.key == sark, abort, out) == 0 {
                return Err(conflict());
            }
            self.drop_orphan_reservation();
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// REGISTER AND MOVE (SPC-4 §5.9.8).
    fn register_and_move(
        &mut self,
        n: &NexusId,
        cdb: &[u8],
        m: MoveParams,
    ) -> Result<(), ScsiError> {
        let rtype = scope_type(cdb)?;
        let me = self.check_key(n, m.rk)?;
        if m.sark == 0 {
            return Err(bad_param());
        }
        match &self.res {
            Some(r) if !r.rtype.all_registrants() && self.is_holder(n) => {}
            _ => return Err(conflict()),
        }
        if m.target_port == 0 {
            return Err(bad_param());
        }
        let dest_port = Some(m.target_port);
        // The destination must be another I_T nexus than the source.
        if self.regs[me].overlaps(&m.initiator, dest_port) {
            return Err(bad_param());
        }
        let me_id = (self.regs[me].initiator.clone(), self.regs[me].target_port);
        let holder = match self
            .regs
            .iter()
            .position(|g| g.overlaps(&m.initiator, dest_port))
        {
            // Already registered: keeps its key and becomes the holder.
            Some(d) => (self.regs[d].initiator.clone(), self.regs[d].target_port),
            None => {
                if self.regs.len() >= REGISTRATIONS_MAX {
                    return Err(ScsiError::illegal(asc::INSUFFICIENT_REGISTRATION_RESOURCES));
                }
                self.regs.push(Registration {
                    initiator: m.initiator.clone(),
                    target_port: dest_port,
                    key: m.sark,
                });
                (m.initiator, dest_port)
            }
        };
        self.res = Some(Reservation {
            holder_initiator: holder.0,
            holder_target_port: holder.1,
            rtype,
        });
        if m.unreg {
            self.regs.retain(|g| !g.is_identity(&me_id.0, me_id.1));
        }
        self.aptpl = m.aptpl;
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// CRH=1 gate for RESERVE/RELEASE (SPC-3 §5.6.3) and the SCSI-2 rules (SPC-2 §5.5.1).
    /// `Ok(true)`: the command takes effect; `Ok(false)`: GOOD without effect.
    fn scsi2_gate(&self, n: &NexusId, reserve: bool) -> Result<bool, ScsiError> {
        if !self.regs.is_empty() {
            let registered_with_access = self.reg_index(n).is_some()
                && self
                    .res
                    .as_ref()
                    .is_some_and(|r| r.rtype.registrant_access());
            let ok = self.is_holder(n) || (!reserve && registered_with_access);
            return if ok { Ok(false) } else { Err(conflict()) };
        }
        match &self.scsi2 {
            Some(h) if !same_nexus(h, n) => {
                if reserve {
                    Err(conflict())
                } else {
                    Ok(false) // RELEASE by a non-holder is a no-op (SPC-2 §7.22)
                }
            }
            _ => Ok(true),
        }
    }

    /// RESERVE(6)/(10) (SPC-2 §7.21). Third-party and extent reservations are not supported.
    pub fn reserve(&mut self, nexus: &NexusId, cdb: &[u8]) -> Result<(), ScsiError> {
        check_scsi2_cdb(cdb, op::RESERVE6, op::RESERVE10)?;
        if self.scsi2_gate(nexus, true)? {
            self.scsi2 = Some(nexus.clone());
        }
        Ok(())
    }

    /// RELEASE(6)/(10) (SPC-2 §7.22).
    pub fn release(&mut self, nexus: &NexusId, cdb: &[u8]) -> Result<(), ScsiError> {
        check_scsi2_cdb(cdb, op::RELEASE6, op::RELEASE10)?;
        if self.scsi2_gate(nexus, false)? {
            self.scsi2 = None;
        }
        Ok(())
    }

    /// The I_T nexus is gone: drops a SCSI-2 reservation held by it (SPC-2 §5.5.1).
    /// Persistent reservations are unaffected.
    pub fn nexus_lost(&mut self, nexus: &NexusId) {
        if self.scsi2.as_ref().is_some_and(|h| same_nexus(h, nexus)) {
            self.scsi2 = None;
        }
    }

    /// LOGICAL UNIT RESET / target reset: drops the SCSI-2 reservation, keeps PRs (SPC-4
    /// §5.9.5: persistent reservations survive resets).
    pub fn reset(&mut self) {
        self.scsi2 = None;
    }

    pub fn snapshot(&self) -> PrSnapshot {
        PrSnapshot {
            generation: self.generation,
            aptpl: self.aptpl,
            registrations: self.regs.clone(),
            reservation: self.res.clone(),
            scsi2_holder: self
                .scsi2
                .as_ref()
                .map(|n| (n.initiator_port.clone(), n.relative_target_port)),
        }
    }

    /// Rebuilds the state from a snapshot. Input from disk may be damaged: registrations past
    /// [`REGISTRATIONS_MAX`] or covering an already covered I_T nexus are dropped, and so is a
    /// reservation without a holder.
    pub fn restore(s: PrSnapshot) -> Self {
        let mut regs: Vec<Registration> = Vec::with_capacity(s.registrations.len());
        for g in s.registrations {
            if regs.len() < REGISTRATIONS_MAX
                && g.key != 0
                && !regs.iter().any(|o| o.overlaps(&g.initiator, g.target_port))
            {
                regs.push(g);
            }
        }
        let mut r = Reservations {
            regs,
            res: s.reservation,
            generation: s.generation,
            aptpl: s.aptpl,
            scsi2: s
                .scsi2_holder
                .map(|(initiator_port, relative_target_port)| NexusId {
                    initiator_port,
                    relative_target_port,
                }),
        };
        r.drop_orphan_reservation();
        r
    }
}

fn check_scsi2_cdb(cdb: &[u8], op6: u8, op10: u8) -> Result<(), ScsiError> {
    match cdb.first().copied() {
        // RESERVE(6)/RELEASE(6): EXTENT (byte 1 bit 0) and third-party bits are obsolete and
        // must be zero here.
        Some(o) if o == op6 && cdb.len() >= 6 && byte(cdb, 1) & 0x1f == 0 => Ok(()),
        // RESERVE(10)/RELEASE(10): 3RDPTY (bit 4) and LONGID (bit 1) are not supported.
        Some(o) if o == op10 && cdb.len() >= 10 && byte(cdb, 1) & 0x13 == 0 => Ok(()),
        _ => Err(bad_cdb()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WE: PrType = PrType::WriteExclusive;
    const EA: PrType = PrType::ExclusiveAccess;
    const WE_RO: PrType = PrType::WriteExclusiveRegistrantsOnly;
    const EA_RO: PrType = PrType::ExclusiveAccessRegistrantsOnly;
    const WE_AR: PrType = PrType::WriteExclusiveAllRegistrants;
    const EA_AR: PrType = PrType::ExclusiveAccessAllRegistrants;

    const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const WRITE10: [u8; 10] = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const RESERVE6: [u8; 6] = [0x16, 0, 0, 0, 0, 0];
    const RELEASE6: [u8; 6] = [0x17, 0, 0, 0, 0, 0];
    const RESERVE10: [u8; 10] = [0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    const SPEC_I_PT: u8 = 0x08;
    const ALL_TG_PT: u8 = 0x04;
    const APTPL: u8 = 0x01;

    fn port_name(name: &str, isid: u64) -> String {
        format!("iqn.2024-01.test:{name},i,0x{isid:012x}")
    }
    fn nx(name: &str, isid: u64, port: u16) -> NexusId {
        NexusId {
            initiator_port: port_name(name, isid),
            relative_target_port: port,
        }
    }
    fn a() -> NexusId {
        nx("a", 0x23d000000001, 1)
    }
    fn b() -> NexusId {
        nx("b", 0x23d000000002, 2)
    }
    fn c() -> NexusId {
        nx("c", 0x23d000000003, 1)
    }

    fn prout_cdb(sa: u8, scope_type: u8, plen: u32) -> Vec<u8> {
        let mut c = vec![0x5f, sa, scope_type, 0, 0, 0, 0, 0, 0, 0];
        c[5..9].copy_from_slice(&plen.to_be_bytes());
        c
    }
    fn basic(rk: u64, sark: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[20] = flags;
        p
    }
    fn tid(text: &str, format: u8) -> Vec<u8> {
        let mut name = text.as_bytes().to_vec();
        name.push(0);
        while name.len() & 3 != 0 {
            name.push(0);
        }
        let mut t = vec![(format << 6) | 5, 0];
        t.extend_from_slice(&(name.len() as u16).to_be_bytes());
        t.extend_from_slice(&name);
        t
    }
    fn prin_cdb(sa: u8) -> Vec<u8> {
        vec![0x5e, sa, 0, 0, 0, 0, 0, 0x40, 0, 0]
    }
    fn illegal(e: &ScsiError) -> Option<Asc> {
        match e {
            ScsiError::Check {
                key: super::super::SenseKey::IllegalRequest,
                asc,
                ..
            } => Some(*asc),
            _ => None,
        }
    }

    /// A logical unit's reservation state driven by the commands an initiator would send.
    #[derive(Default)]
    struct Lu {
        r: Reservations,
    }

    type Out = Result<PrOutcome, ScsiError>;

    impl Lu {
        fn out(&mut self, n: &NexusId, sa: u8, t: u8, p: &[u8]) -> Out {
            let cdb = prout_cdb(sa, t, p.len() as u32);
            self.r.persistent_reserve_out(n, &cdb, p)
        }
        fn register(&mut self, n: &NexusId, rk: u64, sark: u64) -> Out {
            self.out(n, 0, 0, &basic(rk, sark, 0))
        }
        fn raiek(&mut self, n: &NexusId, sark: u64) -> Out {
            self.out(n, 6, 0, &basic(0, sark, 0))
        }
        fn reserve(&mut self, n: &NexusId, key: u64, t: PrType) -> Out {
            self.out(n, 1, t.code(), &basic(key, 0, 0))
        }
        fn release(&mut self, n: &NexusId, key: u64, t: PrType) -> Out {
            self.out(n, 2, t.code(), &basic(key, 0, 0))
        }
        fn clear(&mut self, n: &NexusId, key: u64) -> Out {
            self.out(n, 3, 0, &basic(key, 0, 0))
        }
        fn preempt(&mut self, n: &NexusId, rk: u64, sark: u64, t: PrType, abort: bool) -> Out {
            self.out(n, if abort { 5 } else { 4 }, t.code(), &basic(rk, sark, 0))
        }
        fn read_keys(&self, n: &NexusId) -> (u32, Vec<u64>) {
            let d = self.r.persistent_reserve_in(n, &prin_cdb(0)).unwrap();
            let len = be_u32(&d, 4) as usize;
            assert_eq!(d.len(), 8 + len);
            let keys = d[8..].chunks(8).map(|k| be_u64(k, 0)).collect();
            (be_u32(&d, 0), keys)
        }
        /// (reservation key, type code) from READ RESERVATION.
        fn read_reservation(&self, n: &NexusId) -> Option<(u64, u8)> {
            let d = self.r.persistent_reserve_in(n, &prin_cdb(1)).unwrap();
            match be_u32(&d, 4) {
                0 => {
                    assert_eq!(d.len(), 8);
                    None
                }
                16 => {
                    assert_eq!(d.len(), 24);
                    Some((be_u64(&d, 8), d[21]))
                }
                l => panic!("bad additional length {l}"),
            }
        }
        fn can_read(&self, n: &NexusId) -> bool {
            !self.r.conflicts(n, &READ10)
        }
        fn can_write(&self, n: &NexusId) -> bool {
            !self.r.conflicts(n, &WRITE10)
        }
    }

    fn uas(o: &PrOutcome) -> Vec<(String, Asc)> {
        o.unit_attentions
            .iter()
            .map(|(n, a)| (n.initiator_port.clone(), *a))
            .collect()
    }

    /// libiscsi test_prout_reserve_access: (type, registered B read, write, unregistered B
    /// read, write). A registers, B registers, A reserves; B's access follows SPC-4 table 63.
    #[test]
    fn access_by_type_registered_and_unregistered() {
        let table = [
            (EA, false, false, false, false),
            (WE, true, false, true, false),
            (EA_RO, true, true, false, false),
            (WE_RO, true, true, true, false),
            (EA_AR, true, true, false, false),
            (WE_AR, true, true, true, false),
        ];
        for (t, reg_r, reg_w, unreg_r, unreg_w) in table {
            let mut lu = Lu::default();
            lu.raiek(&a(), 0xa1).unwrap();
            lu.raiek(&b(), 0xb2).unwrap();
            lu.reserve(&a(), 0xa1, t).unwrap();
            let key = if t.all_registrants() { 0 } else { 0xa1 };
            assert_eq!(lu.read_reservation(&b()), Some((key, t.code())), "{t:?}");
            assert!(lu.can_read(&a()) && lu.can_write(&a()), "{t:?}");
            assert_eq!(
                (lu.can_read(&b()), lu.can_write(&b())),
                (reg_r, reg_w),
                "{t:?}"
            );
            lu.register(&b(), 0xb2, 0).unwrap();
            assert_eq!(
                (lu.can_read(&b()), lu.can_write(&b())),
                (unreg_r, unreg_w),
                "{t:?} unregistered"
            );
            // Commands allowed whatever the reservation (SPC-4 table 63).
            for cdb in [
                &[0x12u8, 0, 0, 0, 36, 0][..],
                &[0, 0, 0, 0, 0, 0],
                &prin_cdb(0),
            ] {
                assert!(!lu.r.conflicts(&b(), cdb), "{t:?} {cdb:02x?}");
            }
            // MODE SENSE is a read-type command: allowed through Write Exclusive only.
            let mode_sense = [0x1a, 0, 0x3f, 0, 0xff, 0];
            assert_eq!(!lu.r.conflicts(&b(), &mode_sense), t.write_exclusive());
            // SYNCHRONIZE CACHE is write-type.
            assert!(lu.r.conflicts(&b(), &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
            lu.release(&a(), 0xa1, t).unwrap();
            assert!(lu.can_read(&b()) && lu.can_write(&b()));
            lu.register(&a(), 0xa1, 0).unwrap();
            assert_eq!(lu.read_keys(&a()).1, Vec::<u64>::new());
        }
    }

    /// libiscsi test_prout_reserve_ownership: when the holder unregisters, a non-AR
    /// reservation is released (registrants-only: others learn 2A/04); an AR reservation stays
    /// and the remaining registrant may release it.
    #[test]
    fn holder_unregistering() {
        for t in PrType::ALL {
            let mut lu = Lu::default();
            lu.raiek(&a(), 1).unwrap();
            lu.raiek(&b(), 2).unwrap();
            lu.reserve(&a(), 1, t).unwrap();
            let out = lu.register(&a(), 1, 0).unwrap();
            if t.all_registrants() {
                assert_eq!(lu.read_reservation(&a()), Some((0, t.code())));
                assert!(out.unit_attentions.is_empty());
                let out = lu.release(&b(), 2, t).unwrap();
                assert!(out.unit_attentions.is_empty(), "nobody else is registered");
            } else if t.registrants_only() {
                assert_eq!(
                    uas(&out),
                    vec![(b().initiator_port, asc::RESERVATIONS_RELEASED)]
                );
            } else {
                assert!(out.unit_attentions.is_empty(), "{t:?}");
            }
            assert_eq!(lu.read_reservation(&a()), None, "{t:?}");
            lu.register(&b(), 2, 0).unwrap();
        }
    }

    /// libiscsi test_prout_register_simple plus the REGISTER rules of SPC-4 §5.9.7.
    #[test]
    fn register_rules() {
        let mut lu = Lu::default();
        // Unregistered nexus naming a non-zero RESERVATION KEY: conflict.
        assert_eq!(lu.register(&a(), 5, 7), Err(ScsiError::ReservationConflict));
        assert_eq!(lu.r.generation(), 0, "failed commands do not count");
        lu.register(&a(), 0, 7).unwrap();
        assert_eq!(lu.read_keys(&a()), (1, vec![7]));
        // Re-registering with the wrong key conflicts; the right one replaces it.
        assert_eq!(lu.register(&a(), 8, 9), Err(ScsiError::ReservationConflict));
        lu.register(&a(), 7, 9).unwrap();
        assert_eq!(lu.read_keys(&a()), (2, vec![9]));
        // REGISTER AND IGNORE EXISTING KEY ignores the key.
        lu.out(&a(), 6, 0, &basic(0xdead, 10, 0)).unwrap();
        assert_eq!(lu.read_keys(&a()), (3, vec![10]));
        // SARK zero from an unregistered nexus: GOOD, nothing registered, generation counts.
        lu.register(&b(), 0, 0).unwrap();
        assert_eq!(lu.read_keys(&a()), (4, vec![10]));
        // Unregister.
        lu.register(&a(), 10, 0).unwrap();
        assert_eq!(lu.read_keys(&a()), (5, vec![]));
        // Same initiator port through another target port is another I_T nexus.
        lu.raiek(&a(), 1).unwrap();
        let a2 = nx("a", 0x23d000000001, 2);
        assert_eq!(lu.register(&a2, 1, 2), Err(ScsiError::ReservationConflict));
        lu.register(&a2, 0, 2).unwrap();
        assert_eq!(lu.read_keys(&a()).1, vec![1, 2]);
    }

    #[test]
    fn cdb_and_parameter_list_errors() {
        let mut lu = Lu::default();
        // Parameter list length must be 24 without SPEC_I_PT (SPC-4 §6.16.3).
        for plen in [0u32, 23, 25, 28] {
            let p = vec![0u8; plen as usize];
            let e =
                lu.r.persistent_reserve_out(&a(), &prout_cdb(6, 0, plen), &p)
                    .unwrap_err();
            assert_eq!(
                illegal(&e),
                Some(asc::PARAMETER_LIST_LENGTH_ERROR),
                "{plen}"
            );
        }
        // Fewer bytes delivered than the CDB announces.
        let e =
            lu.r.persistent_reserve_out(&a(), &prout_cdb(6, 0, 24), &[0; 10])
                .unwrap_err();
        assert_eq!(illegal(&e), Some(asc::PARAMETER_LIST_LENGTH_ERROR));
        // Unknown service actions (libiscsi test_prin_serviceaction_range for PR IN).
        for sa in 8..0x20 {
            let e = lu.out(&a(), sa, 0, &basic(0, 1, 0)).unwrap_err();
            assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_CDB), "PR OUT {sa}");
        }
        for sa in 0..4 {
            assert!(lu.r.persistent_reserve_in(&a(), &prin_cdb(sa)).is_ok());
        }
        for sa in 4..0x20 {
            let e = lu.r.persistent_reserve_in(&a(), &prin_cdb(sa)).unwrap_err();
            assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_CDB), "PR IN {sa}");
        }
        // Short CDBs.
        assert!(lu.r.persistent_reserve_in(&a(), &[0x5e, 0]).is_err());
        assert!(lu.r.persistent_reserve_out(&a(), &[0x5f], &[]).is_err());
        // SPEC_I_PT is only valid for REGISTER.
        let e = lu.out(&a(), 6, 0, &basic(0, 1, SPEC_I_PT)).unwrap_err();
        assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        assert_eq!(lu.r, Reservations::new(), "errors change nothing");
    }

    #[test]
    fn reserve_rules() {
        let mut lu = Lu::default();
        assert_eq!(lu.reserve(&a(), 0, WE), Err(ScsiError::ReservationConflict));
        lu.raiek(&a(), 1).unwrap();
        lu.raiek(&b(), 2).unwrap();
        let gen = lu.r.generation();
        assert_eq!(lu.reserve(&a(), 3, WE), Err(ScsiError::ReservationConflict));
        // Invalid type codes and non-LU scope: INVALID FIELD IN CDB.
        for st in [0x00, 0x02, 0x04, 0x09, 0x0f, 0x11, 0x21] {
            let e = lu.out(&a(), 1, st, &basic(1, 0, 0)).unwrap_err();
            assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_CDB), "{st:#x}");
        }
        lu.reserve(&a(), 1, WE).unwrap();
        // The holder may repeat the same reservation, not change its type.
        lu.reserve(&a(), 1, WE).unwrap();
        assert_eq!(lu.reserve(&a(), 1, EA), Err(ScsiError::ReservationConflict));
        assert_eq!(lu.reserve(&b(), 2, WE), Err(ScsiError::ReservationConflict));
        assert_eq!(lu.r.generation(), gen, "RESERVE does not bump PRgeneration");
        assert_eq!(lu.read_reservation(&c()), Some((1, WE.code())));
        // All-registrants: every registrant is a holder and may re-reserve.
        lu.release(&a(), 1, WE).unwrap();
        lu.reserve(&a(), 1, EA_AR).unwrap();
        lu.reserve(&b(), 2, EA_AR).unwrap();
        assert_eq!(
            lu.reserve(&b(), 2, WE_AR),
            Err(ScsiError::ReservationConflict)
        );
    }

    #[test]
    fn release_rules() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 1).unwrap();
        lu.raiek(&b(), 2).unwrap();
        lu.raiek(&c(), 3).unwrap();
        // No reservation: GOOD.
        lu.release(&a(), 1, WE).unwrap();
        assert_eq!(
            lu.release(&nx("z", 9, 1), 0, WE),
            Err(ScsiError::ReservationConflict)
        );
        lu.reserve(&a(), 1, WE_RO).unwrap();
        // Wrong key conflicts; a registered non-holder's RELEASE is a GOOD no-op.
        assert_eq!(
            lu.release(&a(), 2, WE_RO),
            Err(ScsiError::ReservationConflict)
        );
        lu.release(&b(), 2, WE_RO).unwrap();
        assert!(lu.read_reservation(&a()).is_some());
        // The holder naming another type: INVALID RELEASE OF PERSISTENT RESERVATION.
        let e = lu.release(&a(), 1, EA_RO).unwrap_err();
        assert_eq!(
            illegal(&e),
            Some(asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        );
        let e = lu.out(&a(), 2, 0x15, &basic(1, 0, 0)).unwrap_err();
        assert_eq!(
            illegal(&e),
            Some(asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        );
        // Releasing a registrants-only reservation tells the other registrants.
        let out = lu.release(&a(), 1, WE_RO).unwrap();
        assert_eq!(
            uas(&out),
            vec![
                (b().initiator_port, asc::RESERVATIONS_RELEASED),
                (c().initiator_port, asc::RESERVATIONS_RELEASED)
            ]
        );
        // ... a Write Exclusive one does not.
        lu.reserve(&a(), 1, WE).unwrap();
        assert!(lu.release(&a(), 1, WE).unwrap().unit_attentions.is_empty());
    }

    /// libiscsi test_prout_clear_simple.
    #[test]
    fn clear_drops_everything_once() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 1).unwrap();
        lu.raiek(&b(), 2).unwrap();
        let (gen, _) = lu.read_keys(&a());
        lu.reserve(&a(), 1, EA).unwrap();
        assert_eq!(lu.clear(&c(), 0), Err(ScsiError::ReservationConflict));
        assert_eq!(lu.clear(&b(), 1), Err(ScsiError::ReservationConflict));
        let out = lu.clear(&a(), 1).unwrap();
        assert_eq!(
            uas(&out),
            vec![(b().initiator_port, asc::RESERVATIONS_PREEMPTED)]
        );
        assert_eq!(lu.read_reservation(&a()), None);
        assert_eq!(lu.read_keys(&a()), (gen + 1, vec![]));
        assert!(lu.can_write(&c()));
    }

    /// libiscsi test_prout_preempt_rm_reg: no reservation, B preempts A's key.
    #[test]
    fn preempt_removes_registration() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 0x11).unwrap();
        lu.clear(&a(), 0x11).unwrap();
        lu.raiek(&a(), 0x11).unwrap();
        lu.raiek(&b(), 0x22).unwrap();
        let (gen, keys) = lu.read_keys(&a());
        assert_eq!(keys, vec![0x11, 0x22]);
        let out = lu.preempt(&b(), 0x22, 0x11, EA, false).unwrap();
        assert_eq!(
            uas(&out),
            vec![(a().initiator_port, asc::REGISTRATIONS_PREEMPTED)]
        );
        assert!(out.abort_tasks_of.is_empty());
        assert_eq!(lu.read_keys(&a()), (gen + 1, vec![0x22]));
        assert_eq!(
            lu.read_reservation(&a()),
            None,
            "no reservation was created"
        );
        // A key nobody holds: conflict. Zero without a reservation: invalid parameter.
        assert_eq!(
            lu.preempt(&b(), 0x22, 0x99, EA, false),
            Err(ScsiError::ReservationConflict)
        );
        let e = lu.preempt(&b(), 0x22, 0, EA, false).unwrap_err();
        assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        // Unregistered A cannot preempt.
        assert_eq!(
            lu.preempt(&a(), 0x11, 0x22, EA, false),
            Err(ScsiError::ReservationConflict)
        );
    }

    #[test]
    fn preempt_and_abort_takes_the_reservation() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 1).unwrap();
        lu.raiek(&b(), 2).unwrap();
        lu.raiek(&c(), 3).unwrap();
        lu.reserve(&a(), 1, WE).unwrap();
        // SARK zero under a non-AR reservation: INVALID FIELD IN PARAMETER LIST.
        let e = lu.preempt(&c(), 3, 0, EA, true).unwrap_err();
        assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        let out = lu.preempt(&c(), 3, 1, EA, true).unwrap();
        assert_eq!(lu.read_reservation(&a()), Some((3, EA.code())));
        assert_eq!(lu.read_keys(&a()).1, vec![2, 3]);
        assert_eq!(out.abort_tasks_of, vec![a()]);
        // A lost its registration; B kept its own but the old reservation was released.
        assert_eq!(
            uas(&out),
            vec![
                (a().initiator_port, asc::REGISTRATIONS_PREEMPTED),
                (b().initiator_port, asc::RESERVATIONS_RELEASED)
            ]
        );
        assert!(!lu.can_read(&b()) && lu.can_write(&c()));
        // The holder may preempt itself to change type; same type: no RESERVATIONS RELEASED.
        let out = lu.preempt(&c(), 3, 3, EA, false).unwrap();
        assert!(out.unit_attentions.is_empty());
        assert_eq!(lu.read_keys(&a()).1, vec![2, 3]);
    }

    #[test]
    fn preempt_all_registrants() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 1).unwrap();
        lu.raiek(&b(), 2).unwrap();
        lu.raiek(&c(), 3).unwrap();
        lu.reserve(&a(), 1, WE_AR).unwrap();
        // Non-zero SARK under AR: only removes that registration.
        lu.preempt(&b(), 2, 3, EA, false).unwrap();
        assert_eq!(lu.read_reservation(&a()), Some((0, WE_AR.code())));
        assert_eq!(lu.read_keys(&a()).1, vec![1, 2]);
        lu.raiek(&c(), 3).unwrap();
        // Zero SARK under AR: B takes over alone with the new type.
        let out = lu.preempt(&b(), 2, 0, EA, false).unwrap();
        assert_eq!(lu.read_keys(&a()).1, vec![2]);
        assert_eq!(lu.read_reservation(&a()), Some((2, EA.code())));
        assert_eq!(
            uas(&out),
            vec![
                (a().initiator_port, asc::REGISTRATIONS_PREEMPTED),
                (c().initiator_port, asc::REGISTRATIONS_PREEMPTED)
            ]
        );
    }

    fn move_params(rk: u64, sark: u64, flags: u8, rtp: u16, t: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&rk.to_be_bytes());
        p[8..16].copy_from_slice(&sark.to_be_bytes());
        p[17] = flags;
        p[18..20].copy_from_slice(&rtp.to_be_bytes());
        p[20..24].copy_from_slice(&(t.len() as u32).to_be_bytes());
        p.extend_from_slice(t);
        p
    }

    #[test]
    fn register_and_move() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 1).unwrap();
        let to_b = tid(&b().initiator_port, 1);
        // Not a holder: conflict.
        assert_eq!(
            lu.out(&a(), 7, WE.code(), &move_params(1, 5, 0, 2, &to_b)),
            Err(ScsiError::ReservationConflict)
        );
        lu.reserve(&a(), 1, WE).unwrap();
        // To itself: invalid parameter; SARK zero: invalid parameter; wrong key: conflict.
        let to_a = tid(&a().initiator_port, 1);
        for (p, want) in [
            (
                move_params(1, 5, 0, 1, &to_a),
                Some(asc::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                move_params(1, 0, 0, 2, &to_b),
                Some(asc::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                move_params(1, 5, 0, 0, &to_b),
                Some(asc::INVALID_FIELD_IN_PARAMETER_LIST),
            ),
            (
                move_params(1, 5, 0, 2, &to_b[..8]),
                Some(asc::PARAMETER_LIST_LENGTH_ERROR),
            ),
            (move_params(9, 5, 0, 2, &to_b), None),
        ] {
            let e = lu.out(&a(), 7, WE.code(), &p).unwrap_err();
            assert_eq!(illegal(&e), want);
        }
        let gen = lu.r.generation();
        let out = lu
            .out(&a(), 7, EA.code(), &move_params(1, 5, 0x02, 2, &to_b))
            .unwrap();
        assert_eq!(out, PrOutcome::default());
        assert_eq!(lu.read_reservation(&a()), Some((5, EA.code())));
        assert_eq!(lu.read_keys(&a()), (gen + 1, vec![5]), "UNREG dropped A");
        assert!(lu.can_write(&b()) && !lu.can_read(&a()));
        // All-registrants reservations cannot be moved.
        lu.release(&b(), 5, EA).unwrap();
        lu.reserve(&b(), 5, WE_AR).unwrap();
        assert_eq!(
            lu.out(&b(), 7, WE.code(), &move_params(5, 6, 0, 1, &to_a)),
            Err(ScsiError::ReservationConflict)
        );
    }

    #[test]
    fn spec_i_pt_registers_named_initiators() {
        let mut lu = Lu::default();
        let mut p = basic(0, 7, SPEC_I_PT);
        let tids = [tid(&b().initiator_port, 1), tid("iqn.2024-01.test:c", 0)].concat();
        p.extend_from_slice(&(tids.len() as u32).to_be_bytes());
        p.extend_from_slice(&tids);
        // Truncated TransportID list: PARAMETER LIST LENGTH ERROR, nothing registered.
        let mut short = p.clone();
        short.truncate(p.len() - 4);
        let e = lu.out(&a(), 0, 0, &short).unwrap_err();
        assert_eq!(illegal(&e), Some(asc::PARAMETER_LIST_LENGTH_ERROR));
        assert_eq!(lu.r, Reservations::new());
        lu.out(&a(), 0, 0, &p).unwrap();
        assert_eq!(lu.read_keys(&a()).1, vec![7, 7, 7]);
        // B through the port the command came in on (1), not port 2.
        let b1 = NexusId {
            relative_target_port: 1,
            ..b()
        };
        assert_eq!(lu.register(&b1, 7, 8).map(|_| ()), Ok(()));
        assert_eq!(lu.register(&b(), 7, 8), Err(ScsiError::ReservationConflict));
        // Format 00b covers every ISID of initiator c.
        lu.register(&nx("c", 0x999, 1), 7, 9).unwrap();
        assert_eq!(lu.read_keys(&a()).1, vec![7, 8, 9]);
        // Naming an already registered initiator: INVALID FIELD IN PARAMETER LIST.
        let mut again = basic(0, 7, SPEC_I_PT);
        let t = tid(
            &a().initiator_port.to_uppercase().replace(",I,0X", ",i,0x"),
            1,
        );
        again.extend_from_slice(&(t.len() as u32).to_be_bytes());
        again.extend_from_slice(&t);
        let e = lu.out(&nx("d", 1, 1), 0, 0, &again).unwrap_err();
        assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        // A registered sender may not use SPEC_I_PT.
        let mut own = basic(7, 7, SPEC_I_PT);
        own.extend_from_slice(&0u32.to_be_bytes());
        let e = lu.out(&a(), 0, 0, &own).unwrap_err();
        assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        // Bad TransportIDs: wrong protocol, bad format, missing ISID.
        for bad in [
            {
                let mut t = tid("iqn.x", 0);
                t[0] = 0x01;
                t
            },
            {
                let mut t = tid("iqn.x", 0);
                t[0] = 0x85;
                t
            },
            tid("iqn.x", 1),
            tid("iqn.x,i,0xzz", 1),
        ] {
            let mut p = basic(0, 1, SPEC_I_PT);
            p.extend_from_slice(&(bad.len() as u32).to_be_bytes());
            p.extend_from_slice(&bad);
            let e = lu.out(&nx("e", 1, 1), 0, 0, &p).unwrap_err();
            assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        }
    }

    #[test]
    fn all_target_ports_and_full_status() {
        let mut lu = Lu::default();
        lu.out(&a(), 6, 0, &basic(0, 0xaa, ALL_TG_PT)).unwrap();
        let a2 = nx("a", 0x23d000000001, 2);
        // Registered on every target port: may reserve through port 2.
        lu.reserve(&a2, 0xaa, EA).unwrap();
        assert!(lu.can_write(&a()) && lu.can_write(&a2));
        lu.raiek(&b(), 0xbb).unwrap();
        let d = lu.r.persistent_reserve_in(&b(), &prin_cdb(3)).unwrap();
        assert_eq!(be_u32(&d, 0), lu.r.generation());
        assert_eq!(be_u32(&d, 4) as usize, d.len() - 8);
        // First descriptor: A, ALL_TG_PT and R_HOLDER, type EA, port 0, TransportID 01b.
        let desc = &d[8..];
        assert_eq!(be_u64(desc, 0), 0xaa);
        assert_eq!(desc[12], 0x03);
        assert_eq!(desc[13], EA.code());
        assert_eq!(be_u16(desc, 18), 0);
        let tlen = be_u32(desc, 20) as usize;
        let (name, used) = parse_transport_id(&desc[24..24 + tlen]).unwrap();
        assert_eq!((name.as_str(), used), (a().initiator_port.as_str(), tlen));
        // Second descriptor: B, port 2, not a holder.
        let desc = &desc[24 + tlen..];
        assert_eq!(be_u64(desc, 0), 0xbb);
        assert_eq!(desc[12], 0);
        assert_eq!(be_u16(desc, 18), 2);
        // A's registration is one object: unregistering through port 2 releases.
        lu.register(&a2, 0xaa, 0).unwrap();
        assert_eq!(lu.read_reservation(&a()), None);
        assert_eq!(lu.read_keys(&a()).1, vec![0xbb]);
    }

    #[test]
    fn report_capabilities_describe_this_module() {
        let lu = Lu::default();
        let d = lu.r.persistent_reserve_in(&a(), &prin_cdb(2)).unwrap();
        assert_eq!(d, vec![0, 8, 0x1d, 0xb0, 0xea, 0x01, 0, 0]);
    }

    #[test]
    fn aptpl_persistence() {
        let mut lu = Lu::default();
        let out = lu.raiek(&a(), 1).unwrap();
        assert!(!out.persist, "APTPL never active");
        let out = lu.out(&a(), 6, 0, &basic(0, 1, APTPL)).unwrap();
        assert!(out.persist);
        let caps = lu.r.persistent_reserve_in(&a(), &prin_cdb(2)).unwrap();
        assert_eq!(caps[3] & 0x01, 1, "PTPL_A");
        assert!(lu.reserve(&a(), 1, WE).unwrap().persist);
        assert!(!lu.reserve(&a(), 1, WE).unwrap().persist, "nothing changed");
        let snap = lu.r.snapshot();
        let after = snap.after_power_loss();
        assert_eq!(after.generation, 0);
        let back = Reservations::restore(after);
        assert_eq!(back.keys(), vec![1]);
        assert_eq!(back.reservation().map(|r| r.rtype), Some(WE));
        // Turning APTPL off must be saved too; afterwards nothing is.
        assert!(lu.raiek(&a(), 1).unwrap().persist);
        assert!(!lu.release(&a(), 1, WE).unwrap().persist);
        assert_eq!(lu.r.snapshot().after_power_loss(), PrSnapshot::default());
    }

    /// libiscsi test_reserve6_2initiators and friends.
    #[test]
    fn scsi2_reserve_release() {
        let mut r = Reservations::new();
        r.reserve(&a(), &RESERVE6).unwrap();
        r.reserve(&a(), &RESERVE6).unwrap();
        assert_eq!(
            r.reserve(&b(), &RESERVE6),
            Err(ScsiError::ReservationConflict)
        );
        assert!(r.conflicts(&b(), &RESERVE10));
        r.release(&b(), &RELEASE6).unwrap();
        assert_eq!(r.scsi2_holder(), Some(&a()));
        let mode_sense = [0x1a, 0, 0x3f, 0, 0xff, 0];
        assert!(!r.conflicts(&a(), &mode_sense));
        assert!(r.conflicts(&b(), &mode_sense));
        assert!(r.conflicts(&b(), &READ10) && r.conflicts(&b(), &[0u8; 6]));
        for ok in [
            &[0x12u8, 0, 0, 0, 36, 0][..],
            &[0xa0; 12],
            &RELEASE6,
            &[3, 0, 0, 0, 18, 0],
        ] {
            assert!(!r.conflicts(&b(), ok), "{ok:02x?}");
        }
        // SPC-2 §5.5.1: PR IN/OUT conflict whoever sends them.
        assert!(r.conflicts(&a(), &prin_cdb(0)));
        assert_eq!(
            r.persistent_reserve_in(&a(), &prin_cdb(0)),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(
            r.persistent_reserve_out(&a(), &prout_cdb(6, 0, 24), &basic(0, 1, 0)),
            Err(ScsiError::ReservationConflict)
        );
        r.release(&a(), &RELEASE6).unwrap();
        r.reserve(&b(), &RESERVE10).unwrap();
        r.nexus_lost(&a());
        assert_eq!(r.scsi2_holder(), Some(&b()));
        r.nexus_lost(&b());
        assert_eq!(r.scsi2_holder(), None);
        r.reserve(&b(), &RESERVE6).unwrap();
        r.reset();
        assert_eq!(r.scsi2_holder(), None);
        // Third-party / extent reservations are not supported.
        let e = r
            .reserve(&a(), &[0x56, 0x10, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err();
        assert_eq!(illegal(&e), Some(asc::INVALID_FIELD_IN_CDB));
        assert!(r.reserve(&a(), &[0x16, 0x01, 0, 0, 0, 0]).is_err());
        assert!(r.reserve(&a(), &RELEASE6).is_err());
    }

    /// CRH=1: RESERVE/RELEASE while registrations exist (SPC-3 §5.6.3).
    #[test]
    fn scsi2_commands_under_persistent_reservations() {
        let mut lu = Lu::default();
        lu.raiek(&a(), 1).unwrap();
        lu.raiek(&b(), 2).unwrap();
        // Registered, no reservation: RESERVE/RELEASE conflict.
        assert_eq!(
            lu.r.reserve(&a(), &RESERVE6),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(
            lu.r.release(&a(), &RELEASE6),
            Err(ScsiError::ReservationConflict)
        );
        lu.reserve(&a(), 1, WE).unwrap();
        // The holder: GOOD without effect.
        lu.r.reserve(&a(), &RESERVE6).unwrap();
        lu.r.release(&a(), &RELEASE6).unwrap();
        assert_eq!(lu.r.scsi2_holder(), None);
        assert_eq!(lu.read_reservation(&a()), Some((1, WE.code())));
        // A registrant under WE: conflict; under WE_RO its RELEASE is a GOOD no-op.
        assert_eq!(
            lu.r.release(&b(), &RELEASE6),
            Err(ScsiError::ReservationConflict)
        );
        assert!(lu.r.conflicts(&b(), &RELEASE6));
        lu.release(&a(), 1, WE).unwrap();
        lu.reserve(&a(), 1, WE_RO).unwrap();
        lu.r.release(&b(), &RELEASE6).unwrap();
        assert!(!lu.r.conflicts(&b(), &RELEASE6));
        assert_eq!(
            lu.r.reserve(&b(), &RESERVE6),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(
            lu.r.release(&c(), &RELEASE6),
            Err(ScsiError::ReservationConflict)
        );
        assert_eq!(lu.read_reservation(&a()), Some((1, WE_RO.code())));
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let mut lu = Lu::default();
        lu.out(&a(), 6, 0, &basic(0, 1, ALL_TG_PT | APTPL)).unwrap();
        lu.raiek(&b(), 2).unwrap();
        lu.reserve(&b(), 2, EA_RO).unwrap();
        let snap = lu.r.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: PrSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(Reservations::restore(back), lu.r);
        // A damaged snapshot: overlapping registration and orphan reservation are dropped.
        let mut bad = snap.clone();
        bad.registrations.push(bad.registrations[0].clone());
        bad.reservation = Some(Reservation {
            holder_initiator: "nobody".into(),
            holder_target_port: Some(1),
            rtype: WE,
        });
        let r = Reservations::restore(bad);
        assert_eq!(r.keys(), vec![1, 2]);
        assert_eq!(r.reservation(), None);
    }

    #[test]
    fn patterns_match_nexuses() {
        let any_port = NexusId {
            relative_target_port: 0,
            ..a()
        };
        assert!(nexus_matches(&any_port, &nx("a", 0x23d000000001, 7)));
        assert!(!nexus_matches(&any_port, &nx("a", 0x23d000000002, 7)));
        let any_isid = NexusId {
            initiator_port: "IQN.2024-01.test:a".into(),
            relative_target_port: 1,
        };
        assert!(nexus_matches(&any_isid, &nx("a", 5, 1)));
        assert!(!nexus_matches(&any_isid, &nx("a", 5, 2)));
        assert!(!nexus_matches(&any_isid, &nx("ab", 5, 1)));
    }

    // ---- property tests ----

    fn nexuses() -> Vec<NexusId> {
        vec![
            nx("a", 1, 1),
            nx("a", 1, 2),
            nx("a", 2, 1),
            nx("b", 1, 1),
            nx("b", 1, 2),
            nx("c", 7, 2),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Out {
            who: usize,
            sa: u8,
            scope_type: u8,
            rk: usize,
            sark: usize,
            flags: u8,
            tids: Vec<(usize, bool)>,
            rtp: u16,
            /// Send from a reservation holder when there is one.
            as_holder: bool,
        },
        Reserve(usize, bool),
        Release(usize, bool),
        Lost(usize),
        Reset,
    }

    const KEYS: [u64; 5] = [0, 1, 2, 3, 0xdead_beef];
    /// Key index meaning "the sender's registered key" (0 when unregistered).
    const OWN_KEY: usize = 5;
    /// Key index meaning "the key of the first registration that is not the sender's".
    const OTHER_KEY: usize = 6;

    fn key_for(r: &Reservations, n: &NexusId, idx: usize) -> u64 {
        match idx {
            OWN_KEY => r.reg_index(n).map_or(0, |i| r.regs[i].key),
            OTHER_KEY => r.regs.iter().find(|g| !g.matches(n)).map_or(3, |g| g.key),
            i => KEYS[i],
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        let out = (
            0..6usize,
            prop_oneof![8 => 0u8..8, 1 => 0u8..0x20],
            prop_oneof![8 => prop::sample::select(vec![1u8, 3, 5, 6, 7, 8]), 1 => any::<u8>()],
            prop_oneof![3 => Just(OWN_KEY), 1 => 0..5usize],
            prop_oneof![1 => Just(OTHER_KEY), 2 => 0..5usize],
            prop_oneof![4 => Just(0u8), 1 => 0u8..16],
            prop::collection::vec((0..6usize, any::<bool>()), 1..3),
            prop_oneof![1 => Just(0u16), 4 => 1u16..3],
            any::<bool>(),
        )
            .prop_map(
                |(who, sa, scope_type, rk, sark, flags, tids, rtp, as_holder)| Op::Out {
                    who,
                    sa,
                    scope_type,
                    rk,
                    sark,
                    flags,
                    tids,
                    rtp,
                    as_holder,
                },
            );
        prop_oneof![
            24 => out,
            1 => (0..6usize, any::<bool>()).prop_map(|(w, s)| Op::Reserve(w, s)),
            1 => (0..6usize, any::<bool>()).prop_map(|(w, s)| Op::Release(w, s)),
            1 => (0..6usize).prop_map(Op::Lost),
            4 => Just(Op::Reset),
        ]
    }

    fn apply(r: &mut Reservations, op: &Op) -> String {
        let ns = nexuses();
        match op {
            Op::Out {
                who,
                sa,
                scope_type,
                rk,
                sark,
                flags,
                tids,
                rtp,
                as_holder,
            } => {
                let holder = ns.iter().position(|n| r.is_holder(n));
                let who = &match holder {
                    Some(h) if *as_holder => h,
                    _ => *who,
                };
                let mut tid_bytes = Vec::new();
                for (i, full) in tids {
                    let port = &ns[*i].initiator_port;
                    if *full {
                        tid_bytes.extend(tid(port, 1));
                    } else {
                        tid_bytes.extend(tid(name_part(port), 0));
                    }
                }
                let (rk, sark) = (key_for(r, &ns[*who], *rk), key_for(r, &ns[*who], *sark));
                let p = if *sa == 7 {
                    let one = tid_bytes.get(..tid(&ns[tids[0].0].initiator_port, 1).len());
                    let t = if tids[0].1 {
                        one.unwrap_or(&tid_bytes)
                    } else {
                        &tid_bytes
                    };
                    move_params(rk, sark, *flags & 3, *rtp, t)
                } else {
                    let mut p = basic(rk, sark, *flags);
                    if flags & SPEC_I_PT != 0 {
                        p.extend((tid_bytes.len() as u32).to_be_bytes());
                        p.extend(&tid_bytes);
                    }
                    p
                };
                let cdb = prout_cdb(*sa, *scope_type, p.len() as u32);
                format!("{:?}", r.persistent_reserve_out(&ns[*who], &cdb, &p))
            }
            Op::Reserve(w, six) => {
                let cdb: &[u8] = if *six { &RESERVE6 } else { &RESERVE10 };
                format!("{:?}", r.reserve(&ns[*w], cdb))
            }
            Op::Release(w, six) => {
                let cdb: &[u8] = if *six {
                    &RELEASE6
                } else {
                    &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0]
                };
                format!("{:?}", r.release(&ns[*w], cdb))
            }
            Op::Lost(w) => {
                r.nexus_lost(&ns[*w]);
                String::new()
            }
            Op::Reset => {
                r.reset();
                String::new()
            }
        }
    }

    fn check_invariants(r: &Reservations) {
        assert!(r.regs.len() <= REGISTRATIONS_MAX);
        for (i, g) in r.regs.iter().enumerate() {
            assert_ne!(g.key, 0);
            for o in &r.regs[..i] {
                assert!(!o.overlaps(&g.initiator, g.target_port), "{r:?}");
            }
        }
        match &r.res {
            Some(res) if res.rtype.all_registrants() => assert!(!r.regs.is_empty()),
            Some(_) => assert!(r.holder_index().is_some(), "{r:?}"),
            None => {}
        }
        assert!(r.scsi2.is_none() || r.regs.is_empty(), "{r:?}");
        // The holder never conflicts with itself.
        for n in nexuses() {
            if r.is_holder(&n) {
                assert!(!r.conflicts(&n, &WRITE10));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Same ordered commands on two nodes → same state and results (invariant 5); never a
        /// panic; snapshot → restore is the identity.
        #[test]
        fn deterministic_and_round_trips(ops in prop::collection::vec(op(), 0..60)) {
            let mut x = Reservations::new();
            let mut y = Reservations::new();
            for op in &ops {
                let rx = apply(&mut x, op);
                let ry = apply(&mut y, op);
                prop_assert_eq!(rx, ry);
                prop_assert_eq!(&x, &y);
                check_invariants(&x);
                for n in nexuses() {
                    for sa in 0..4 {
                        let _ = x.persistent_reserve_in(&n, &prin_cdb(sa));
                    }
                }
                let snap = x.snapshot();
                let json = serde_json::to_string(&snap).unwrap();
                let back: PrSnapshot = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(&Reservations::restore(back), &x);
            }
        }

        /// Arbitrary bytes into every entry point never panic, and errors change nothing.
        #[test]
        fn random_bytes_never_panic(
            ops in prop::collection::vec(op(), 0..10),
            cdb in prop::collection::vec(any::<u8>(), 0..20),
            params in prop::collection::vec(any::<u8>(), 0..120),
            opcode in prop::sample::select(vec![0x5eu8, 0x5f, 0x16, 0x17, 0x56, 0x57, 0x28, 0xa3]),
            who in 0..6usize,
        ) {
            let mut r = Reservations::new();
            for op in &ops {
                apply(&mut r, op);
            }
            let n = &nexuses()[who];
            let mut cdbs = vec![cdb.clone()];
            let mut fixed = cdb.clone();
            if let Some(b0) = fixed.first_mut() {
                *b0 = opcode;
            }
            cdbs.push(fixed);
            for cdb in &cdbs {
                let _ = r.conflicts(n, cdb);
                let _ = r.persistent_reserve_in(n, cdb);
                let before = r.clone();
                if r.persistent_reserve_out(n, cdb, &params).is_err() {
                    prop_assert_eq!(&r, &before);
                }
                let before = r.clone();
                if r.reserve(n, cdb).is_err() {
                    prop_assert_eq!(&r, &before);
                }
                let before = r.clone();
                if r.release(n, cdb).is_err() {
                    prop_assert_eq!(&r, &before);
                }
                check_invariants(&r);
            }
            // Random TransportIDs.
            let _ = parse_transport_id(&params);
            let snap: Result<PrSnapshot, _> = serde_json::from_slice(&params);
            if let Ok(s) = snap {
                check_invariants(&Reservations::restore(s));
            }
        }
    }
}
