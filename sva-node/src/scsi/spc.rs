//! Primary commands (SPC-4): INQUIRY and VPD pages, MODE SENSE/SELECT, REQUEST SENSE,
//! REPORT LUNS, REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT GROUPS, START STOP
//! UNIT, PREVENT ALLOW MEDIUM REMOVAL, and the routing of PERSISTENT RESERVE IN/OUT to
//! `pr.rs`. Responses are built untruncated; the LU cuts them to the allocation length.

use super::cdb::be;
use super::lu::{CacheMode, CmdResult, LogicalUnit, ModeState, Reply};
use super::sbc::limits;
use super::sense::{asc, ScsiError, SenseKey};
use super::NexusId;

/// SPC-4 version descriptors (SPC-4 §6.4.2, table 142) reported in standard INQUIRY.
const VERSION_DESCRIPTORS: [u16; 4] = [
    0x00a0, // SAM-5
    0x0460, // SPC-4
    0x04c0, // SBC-3
    0x0960, // iSCSI
];

/// VPD pages we implement, in ascending order (VPD 0x00 lists them).
const VPD_PAGES: [u8; 8] = [0x00, 0x80, 0x83, 0x86, 0x8f, 0xb0, 0xb1, 0xb2];

fn padded(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// Standard INQUIRY data (SPC-4 §6.4.2), 96 bytes.
pub(crate) fn standard_inquiry(lu: &LogicalUnit) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // peripheral qualifier 000b, direct access block device
    d[2] = 0x06; // VERSION: SPC-4
    d[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x10 | 0x08; // TPGS 01b (implicit ALUA), 3PC (EXTENDED COPY)
    d[6] = 0x10; // MULTIP: one LU reachable through several target ports
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&padded(&lu.cfg.vendor, 8));
    d[16..32].copy_from_slice(&padded(&lu.cfg.product, 16));
    d[32..36].copy_from_slice(&padded(&lu.cfg.revision, 4));
    for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// INQUIRY (SPC-4 §6.4).
pub(crate) fn inquiry(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    if cdb[1] & 0x02 != 0 {
        // CMDDT is obsolete; SPC-4 says reject it.
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(1)));
    }
    if !evpd {
        if page != 0 {
            return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, None));
        }
        return Ok(Reply::data(standard_inquiry(lu)));
    }
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => lu.serial.as_bytes().to_vec(),
        0x83 => device_identification(lu),
        0x86 => extended_inquiry(lu),
        0x8f => third_party_copy(),
        0xb0 => block_limits(),
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            b
        }
        0xb2 => {
            // SBC-3 §6.5.4: LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type thin (010b).
            vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
        }
        _ => return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, None)),
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(Reply::data(d))
}

fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, value: &[u8]) {
    out.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, value.len() as u8]);
    out.extend_from_slice(value);
}

/// VPD 0x83 (SPC-4 §7.8.6): the LU's NAA-6 and T10 designators (same on every node), and
/// this node's relative target port and target port group (different on every node).
fn device_identification(lu: &LogicalUnit) -> Vec<u8> {
    let mut d = Vec::new();
    // Binary code set, association LU, designator type 3 (NAA).
    designator(&mut d, 0x01, 0x03, &lu.naa);
    // ASCII code set, association LU, type 1 (T10 vendor id): vendor + serial.
    let mut t10 = padded(&lu.cfg.vendor, 8);
    t10.extend_from_slice(lu.serial.as_bytes());
    designator(&mut d, 0x02, 0x01, &t10);
    // Protocol iSCSI (5), binary; PIV, association target port, type 4 (relative port).
    let mut rp = vec![0, 0];
    rp.extend_from_slice(&lu.cfg.relative_target_port.to_be_bytes());
    designator(&mut d, 0x51, 0x80 | 0x10 | 0x04, &rp);
    // Type 5: target port group.
    let mut tpg = vec![0, 0];
    tpg.extend_from_slice(&lu.cfg.target_port_group.to_be_bytes());
    designator(&mut d, 0x51, 0x80 | 0x10 | 0x05, &tpg);
    d
}

/// VPD 0x86 (SPC-4 §7.8.7).
fn extended_inquiry(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    b[1] = 0x07; // HEADSUP, ORDSUP, SIMPSUP
    if lu.cfg.cache_mode == CacheMode::WriteBack {
        b[2] = 0x01; // V_SUP: volatile cache
    }
    b
}

/// VPD 0x8F Third-party Copy (SPC-4 §7.8.16): one Supported Commands descriptor listing
/// EXTENDED COPY(LID1) and RECEIVE COPY RESULTS (COPY STATUS, OPERATING PARAMETERS).
fn third_party_copy() -> Vec<u8> {
    let commands: &[(u8, &[u8])] = &[(0x83, &[0x00]), (0x84, &[0x00, 0x03])];
    let mut list = Vec::new();
    for (op, sas) in commands {
        list.push(*op);
        list.push(sas.len() as u8);
        list.extend_from_slice(sas);
    }
    let mut data = vec![list.len() as u8];
    data.extend(list);
    // Descriptors are padded to a multiple of 4 bytes.
    while (data.len() + 4) % 4 != 0 {
        data.push(0);
    }
    let mut d = vec![0x00, 0x01];
    d.extend_from_slice(&(data.len() as u16).to_be_bytes());
    d.extend(data);
    d
}

/// VPD 0xB0 (SBC-3 §6.5.3).
fn block_limits() -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    b[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is rejected
    b[1] = limits::CAW_BLOCKS_MAX as u8;
    b[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer granularity
    b[4..8].copy_from_slice(&limits::TRANSFER_BLOCKS_MAX.to_be_bytes());
    b[8..12].copy_from_slice(&limits::OPTIMAL_TRANSFER_BLOCKS.to_be_bytes());
    b[12..16].copy_from_slice(&limits::TRANSFER_BLOCKS_MAX.to_be_bytes()); // max prefetch
    b[16..20].copy_from_slice(&limits::UNMAP_BLOCKS_MAX.to_be_bytes());
    b[20..24].copy_from_slice(&limits::UNMAP_DESCRIPTORS_MAX.to_be_bytes());
    b[24..28].copy_from_slice(&1u32.to_be_bytes()); // optimal unmap granularity
    b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
    b[32..40].copy_from_slice(&limits::WRITE_SAME_BLOCKS_MAX.to_be_bytes());
    b
}

/// REQUEST SENSE (SPC-4 §6.29): the pending unit attention, if any (and clear it), else
/// NO SENSE.
pub(crate) fn request_sense(lu: &LogicalUnit, nexus: &NexusId, cdb: &[u8]) -> CmdResult {
    let desc = cdb[1] & 0x01 != 0;
    let ua = lu
        .lock_state()
        .nexuses
        .get_mut(nexus)
        .and_then(|n| n.ua.pop_front());
    let e = match ua {
        Some(a) => ScsiError::unit_attention(a),
        None => ScsiError::check(SenseKey::NoSense, asc::NO_ADDITIONAL_SENSE),
    };
    Ok(Reply::data(
        e.sense(desc).map(|b| b.to_vec()).unwrap_or_default(),
    ))
}

/// START STOP UNIT (SBC-3 §5.25): the medium is not removable and always ready. LOEJ
/// (eject/load) on a non-removable medium is INVALID FIELD IN CDB (libiscsi
/// test_startstopunit_simple); START/STOP and power conditions are accepted and ignored.
pub(crate) fn start_stop_unit(cdb: &[u8]) -> CmdResult {
    if cdb[4] & 0x02 != 0 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(4, Some(1)));
    }
    Ok(Reply::good())
}

/// PREVENT ALLOW MEDIUM REMOVAL (SBC-3 §5.11): nothing to lock on a non-removable medium.
pub(crate) fn prevent_allow(cdb: &[u8]) -> CmdResult {
    let _ = cdb;
    Ok(Reply::good())
}

/// REPORT LUNS (SPC-4 §6.33): LUN 0 only.
pub(crate) fn report_luns(_lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let select = cdb[2];
    if !matches!(select, 0x00..=0x02) {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, None));
    }
    // SPC-4 §6.33: an allocation length below 16 is INVALID FIELD IN CDB.
    if be(cdb, 6, 4)? < 16 {
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(6, None));
    }
    let mut d = vec![0u8; 8];
    if select != 0x01 {
        // select 01b: well-known LUs only; we have none.
        d[0..4].copy_from_slice(&8u32.to_be_bytes());
        d.extend_from_slice(&[0u8; 8]);
    }
    Ok(Reply::data(d))
}

// ---- Mode pages (SPC-4 §7.5, SBC-3 §6.4) ----

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const PAGE_INFO_EXCEPTIONS: u8 = 0x1c;
const PAGE_ALL: u8 = 0x3f;
const MODE_PAGES: [u8; 3] = [PAGE_CACHING, PAGE_CONTROL, PAGE_INFO_EXCEPTIONS];

/// Page control: which values MODE SENSE returns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

fn mode_page(lu: &LogicalUnit, page: u8, pc: PageControl, mode: &ModeState) -> Vec<u8> {
    let m = match pc {
        PageControl::Default => ModeState::default(),
        _ => *mode,
    };
    let changeable = pc == PageControl::Changeable;
    match page {
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            p[0] = PAGE_CACHING;
            p[1] = 0x12;
            if !changeable && lu.cfg.cache_mode == CacheMode::WriteBack {
                p[2] = 0x04; // WCE
            }
            p
        }
        PAGE_CONTROL => {
            let mut p = vec![0u8; 12];
            p[0] = PAGE_CONTROL;
            p[1] = 0x0a;
            if changeable {
                p[2] = 0x04; // D_SENSE
                p[4] = 0x08; // SWP
            } else {
                p[2] = if m.d_sense { 0x04 } else { 0 };
                p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
                p[4] = if m.swp { 0x08 } else { 0 };
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
            }
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = PAGE_INFO_EXCEPTIONS;
            p[1] = 0x0a;
            if !changeable {
                p[2] = 0x08; // DEXCPT: no informational exception reporting
            }
            p
        }
    }
}

/// MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12).
pub(crate) fn mode_sense(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let ten = cdb[0] == 0x5a;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = match cdb[2] >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        // Saved values are not supported (SPC-4 §6.11: SAVING PARAMETERS NOT SUPPORTED).
        _ => return Err(ScsiError::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED)),
    };
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let mode = lu.lock_state().mode;
    let mut pages = Vec::new();
    match (page, subpage) {
        (PAGE_ALL, 0x00 | 0xff) => {
            for p in MODE_PAGES {
                pages.extend(mode_page(lu, p, pc, &mode));
            }
        }
        (p, 0x00) if MODE_PAGES.contains(&p) => pages = mode_page(lu, p, pc, &mode),
        (p, _) if MODE_PAGES.contains(&p) || p == PAGE_ALL => {
            return Err(ScsiError::invalid_field_in_cdb().at_cdb(3, None))
        }
        _ => return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, Some(5))),
    }

    let blocks = lu.block_count;
    let bs = lu.cfg.block_size;
    let bd: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut b = vec![0u8; 16];
        b[0..8].copy_from_slice(&blocks.to_be_bytes());
        b[12..16].copy_from_slice(&bs.to_be_bytes());
        b
    } else {
        let mut b = vec![0u8; 8];
        b[0..4].copy_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
        b[5..8].copy_from_slice(&bs.to_be_bytes()[1..4]);
        b
    };
    // Device-specific parameter (SBC-3 §6.4.1): WP, DPOFUA.
    let dsp = if mode.swp { 0x80 } else { 0 } | 0x10;
    let mut d = Vec::new();
    if ten {
        let total = 8 + bd.len() + pages.len();
        d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        d.extend_from_slice(&[0, dsp, if llbaa && !dbd { 0x01 } else { 0 }, 0]);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let total = 4 + bd.len() + pages.len();
        d.extend_from_slice(&[(total - 1).min(255) as u8, 0, dsp, bd.len() as u8]);
    }
    d.extend(bd);
    d.extend(pages);
    Ok(Reply::data(d))
}

/// MODE SELECT(6)/(10) (SPC-4 §6.9, §6.10). Only D_SENSE and SWP of the control page are
/// changeable; any other difference from the current value is INVALID FIELD IN PARAMETER
/// LIST. A change posts MODE PARAMETERS CHANGED to the other I_T nexuses (SPC-4 §7.5.1).
pub(crate) fn mode_select(lu: &LogicalUnit, nexus: &NexusId, cdb: &[u8], data: &[u8]) -> CmdResult {
    let ten = cdb[0] == 0x55;
    if cdb[1] & 0x01 != 0 {
        // SP: saving pages is not supported.
        return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(0)));
    }
    let plen = if ten { be(cdb, 7, 2)? } else { be(cdb, 4, 1)? } as usize;
    if plen == 0 {
        return Ok(Reply::good());
    }
    let hdr = if ten { 8 } else { 4 };
    if plen < hdr || data.len() < plen {
        return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let p = &data[..plen];
    let bdl = if ten {
        be(p, 6, 2)? as usize
    } else {
        be(p, 3, 1)? as usize
    };
    let mut at = hdr + bdl;
    if at > p.len() {
        return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let mut st = lu.lock_state();
    let mut new = st.mode;
    while at < p.len() {
        let Some(&[code, len]) = p.get(at..at + 2).and_then(|s| <&[u8; 2]>::try_from(s).ok())
        else {
            return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        };
        if code & 0x40 != 0 {
            // SPF: no subpages implemented.
            return Err(ScsiError::invalid_field_in_param());
        }
        let page = code & 0x3f;
        let end = at + 2 + len as usize;
        let Some(got) = p.get(at..end) else {
            return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        };
        if !MODE_PAGES.contains(&page) {
            return Err(ScsiError::invalid_field_in_param());
        }
        let cur = mode_page(lu, page, PageControl::Current, &st.mode);
        let mask = mode_page(lu, page, PageControl::Changeable, &st.mode);
        if got.len() != cur.len() {
            return Err(ScsiError::invalid_field_in_param());
        }
        // Byte 0 carries PS (ignored on select); compare the rest under the mask.
        for i in 1..cur.len() {
            if (got[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(ScsiError::invalid_field_in_param());
            }
        }
        if page == PAGE_CONTROL {
            new.d_sense = got[2] & 0x04 != 0;
            new.swp = got[4] & 0x08 != 0;
        }
        at = end;
    }
    if new != st.mode {
        st.mode = new;
        st.post_ua_all(Some(nexus), asc::MODE_PARAMETERS_CHANGED);
    }
    Ok(Reply::good())
}

// ---- REPORT TARGET PORT GROUPS (SPC-4 §6.36) ----

pub(crate) fn report_target_port_groups(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let extended = match cdb[1] >> 5 {
        0 => false,
        1 => true,
        _ => return Err(ScsiError::invalid_field_in_cdb().at_cdb(1, Some(7))),
    };
    let mut body = Vec::new();
    for g in lu.cfg.port_groups.groups() {
        let mut b0 = g.state.code();
        if g.preferred {
            b0 |= 0x80;
        }
        // Supported states: T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP.
        body.extend_from_slice(&[b0, 0x80 | 0x08 | 0x04 | 0x02 | 0x01]);
        body.extend_from_slice(&g.id.to_be_bytes());
        // Status code 02h would be "implicit change"; we report none (00h).
        body.extend_from_slice(&[0, 0, 0, g.relative_ports.len().min(255) as u8]);
        for p in g.relative_ports.iter().take(255) {
            body.extend_from_slice(&[0, 0]);
            body.extend_from_slice(&p.to_be_bytes());
        }
    }
    let mut d = Vec::new();
    d.extend_from_slice(&(body.len() as u32 + if extended { 4 } else { 0 }).to_be_bytes());
    if extended {
        // FORMAT TYPE 001b, IMPLICIT TRANSITION TIME (seconds).
        d.extend_from_slice(&[0x10, limits::IMPLICIT_TRANSITION_SECS, 0, 0]);
    }
    d.extend(body);
    Ok(Reply::data(d))
}

// ---- REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) ----

/// One implemented command: opcode, service action (if the opcode has them), CDB length,
/// and the nominal command timeout in seconds for the timeouts descriptor.
struct OpInfo {
    op: u8,
    sa: Option<u8>,
    len: u8,
    timeout_secs: u32,
}

const fn op(op: u8, len: u8) -> OpInfo {
    OpInfo {
        op,
        sa: None,
        len,
        timeout_secs: 30,
    }
}
const fn op_sa(op: u8, sa: u8, len: u8) -> OpInfo {
    OpInfo {
        op,
        sa: Some(sa),
        len,
        timeout_secs: 30,
    }
}

/// Every command `LogicalUnit::execute` implements, ascending by opcode.
const SUPPORTED: &[OpInfo] = &[
    op(0x00, 6),
    op(0x03, 6),
    op(0x08, 6),
    op(0x0a, 6),
    op(0x12, 6),
    op(0x15, 6),
    op(0x16, 6),
    op(0x17, 6),
    op(0x1a, 6),
    op(0x1b, 6),
    op(0x1e, 6),
    op(0x25, 10),
    op(0x28, 10),
    op(0x2a, 10),
    op(0x2e, 10),
    op(0x2f, 10),
    op(0x34, 10),
    op(0x35, 10),
    op(0x41, 10),
    op(0x42, 10),
    op(0x55, 10),
    op(0x56, 10),
    op(0x57, 10),
    op(0x5a, 10),
    op_sa(0x5e, 0x00, 10),
    op_sa(0x5e, 0x01, 10),
    op_sa(0x5e, 0x02, 10),
    op_sa(0x5e, 0x03, 10),
    op_sa(0x5f, 0x00, 10),
    op_sa(0x5f, 0x01, 10),
    op_sa(0x5f, 0x02, 10),
    op_sa(0x5f, 0x03, 10),
    op_sa(0x5f, 0x04, 10),
    op_sa(0x5f, 0x05, 10),
    op_sa(0x5f, 0x06, 10),
    op_sa(0x5f, 0x07, 10),
    op_sa(0x83, 0x00, 16),
    op_sa(0x84, 0x00, 16),
    op_sa(0x84, 0x03, 16),
    op(0x88, 16),
    op(0x89, 16),
    op(0x8a, 16),
    op(0x8b, 16),
    op(0x8e, 16),
    op(0x8f, 16),
    op(0x90, 16),
    op(0x91, 16),
    op(0x93, 16),
    op_sa(0x9e, 0x10, 16),
    op_sa(0x9e, 0x12, 16),
    op(0xa0, 12),
    op_sa(0xa3, 0x0a, 12),
    op_sa(0xa3, 0x0c, 12),
    op(0xa8, 12),
    op(0xaa, 12),
    op(0xae, 12),
    op(0xaf, 12),
];

/// CDB USAGE DATA: which bits of each CDB byte the device server looks at. Byte 0 is the
/// opcode, byte 1 of a service-action command carries the service action; we report every
/// other field bit as used except the control byte's reserved/vendor bits.
fn usage_data(o: &OpInfo) -> Vec<u8> {
    let mut u = vec![0xffu8; o.len as usize];
    u[0] = o.op;
    if let Some(sa) = o.sa {
        u[1] = 0xe0 | sa;
    }
    if let Some(last) = u.last_mut() {
        *last = 0x00;
    }
    u
}

fn timeouts_descriptor(o: &OpInfo) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[0..2].copy_from_slice(&10u16.to_be_bytes()); // descriptor length
    t[4..8].copy_from_slice(&o.timeout_secs.to_be_bytes()); // nominal
    t[8..12].copy_from_slice(&o.timeout_secs.to_be_bytes()); // recommended
    t
}

pub(crate) fn report_supported_opcodes(cdb: &[u8]) -> CmdResult {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = be(cdb, 4, 2)? as u8;
    match options {
        0 => {
            let mut body = Vec::new();
            for o in SUPPORTED {
                body.push(o.op);
                body.push(0);
                body.extend_from_slice(&u16::from(o.sa.unwrap_or(0)).to_be_bytes());
                body.push(0);
                // SERVACTV, CTDP
                body.push(if o.sa.is_some() { 0x01 } else { 0 } | if rctd { 0x02 } else { 0 });
                body.extend_from_slice(&u16::from(o.len).to_be_bytes());
                if rctd {
                    body.extend_from_slice(&timeouts_descriptor(o));
                }
            }
            let mut d = (body.len() as u32).to_be_bytes().to_vec();
            d.extend(body);
            Ok(Reply::data(d))
        }
        1..=3 => {
            let has_sa = SUPPORTED.iter().any(|o| o.op == req_op && o.sa.is_some());
            let found = match options {
                // 001b: opcode without service actions; INVALID FIELD if it has them.
                1 if has_sa => return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, Some(0))),
                1 => SUPPORTED.iter().find(|o| o.op == req_op),
                // 010b: opcode + service action; INVALID FIELD if it has none.
                2 if !has_sa && SUPPORTED.iter().any(|o| o.op == req_op) => {
                    return Err(ScsiError::invalid_field_in_cdb().at_cdb(2, Some(0)))
                }
                _ => SUPPORTED
                    .iter()
                    .find(|o| o.op == req_op && (o.sa.is_none() || o.sa == Some(req_sa))),
            };
            let mut d = vec![0u8; 4];
            match found {
                Some(o) => {
                    d[1] = 0x03 | if rctd { 0x80 } else { 0 }; // SUPPORT 011b, CTDP
                    let u = usage_data(o);
                    d[2..4].copy_from_slice(&(u.len() as u16).to_be_bytes());
                    d.extend(u);
                    if rctd {
                        d.extend_from_slice(&timeouts_descriptor(o));
                    }
                }
                None => d[1] = 0x01, // SUPPORT 001b: not supported
            }
            Ok(Reply::data(d))
        }
        _ => Err(ScsiError::invalid_field_in_cdb().at_cdb(2, Some(2))),
    }
}

/// Is `op` listed by REPORT SUPPORTED OPERATION CODES? (Kept in sync with `dispatch` by a
/// test.)
#[cfg(test)]
pub(crate) fn is_reported(opcode: u8) -> bool {
    SUPPORTED.iter().any(|o| o.op == opcode)
}

// ---- Persistent reservations: routed to pr.rs ----

pub(crate) fn persistent_reserve_in(lu: &LogicalUnit, nexus: &NexusId, cdb: &[u8]) -> CmdResult {
    lu.lock_state()
        .pr
        .persistent_reserve_in(nexus, cdb)
        .map(Reply::data)
}

pub(crate) fn persistent_reserve_out(
    lu: &LogicalUnit,
    nexus: &NexusId,
    cdb: &[u8],
    data: &[u8],
) -> CmdResult {
    let plen = be(cdb, 5, 4)? as usize;
    if data.len() < plen {
        return Err(ScsiError::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let params = &data[..plen];
    let mut st = lu.lock_state();
    let outcome = st.pr.persistent_reserve_out(nexus, cdb, params)?;
    // Outcome UAs may be patterns (every target port / every ISID): expand them against the
    // nexuses this LU knows, never the sender. PREEMPT AND ABORT's `abort_tasks_of` needs
    // nothing here: commands run to completion synchronously, none is queued to abort.
    for (pattern, a) in &outcome.unit_attentions {
        let targets: Vec<NexusId> = st
            .nexuses
            .keys()
            .filter(|n| *n != nexus && super::pr::nexus_matches(pattern, n))
            .cloned()
            .collect();
        for n in targets {
            st.post_ua(&n, *a);
        }
    }
    if outcome.persist {
        // Saved under the metadata lock so concurrent PR OUTs persist in apply order.
        lu.persist_pr(&st.pr.snapshot())?;
    }
    Ok(Reply::good())
}
