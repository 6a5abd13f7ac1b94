//! Logical-unit tests told as stories against a `MemBackend` (or a real file where
//! durability matters). Expectations follow SPC-4/SBC-3 and libiscsi's test-tool.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::alua::{AluaState, PortGroup, PortGroups};
use super::cdb::RwCdb;
use super::lu::{CacheMode, LogicalUnit, LuConfig};
use super::{NexusId, ScsiCommand, ScsiResponse, ScsiStatus, TaskAttr, TaskManagement};
use crate::store::fault::{FaultBackend, FaultOps};
use crate::store::{BlockBackend, FileBackend, Mapping, MemBackend};

const BLOCKS: u64 = 2048; // 1 MiB

fn nexus(i: u8) -> NexusId {
    NexusId {
        initiator_port: format!("iqn.2026-01.test:init{i},i,0x23d00000000{i}"),
        relative_target_port: 1,
    }
}

fn cmd(lun: u64, cdb: &[u8], data: &[u8]) -> ScsiCommand {
    ScsiCommand {
        lun,
        cdb: Bytes::copy_from_slice(cdb),
        data_out: Bytes::copy_from_slice(data),
        expected_transfer_len: data.len().max(65536) as u32,
        task_attr: TaskAttr::Simple,
        tag: 1,
    }
}

fn sense_of(r: &ScsiResponse) -> (u8, u8, u8) {
    let s = r.sense.as_ref().expect("sense data");
    if s[0] & 0x7f >= 0x72 {
        (s[1] & 0x0f, s[2], s[3])
    } else {
        (s[2] & 0x0f, s[12], s[13])
    }
}

struct Lu {
    lu: Arc<LogicalUnit>,
    backend: Arc<dyn BlockBackend>,
}

impl Lu {
    fn with(cfg: LuConfig, backend: Arc<dyn BlockBackend>) -> Lu {
        let lu = Arc::new(LogicalUnit::new(cfg, backend.clone()));
        let t = Lu { lu, backend };
        // Every new nexus first sees POWER ON OCCURRED; consume it for nexus 1.
        assert_eq!(t.check(&nexus(1), &[0; 6], &[]), (6, 0x29, 0x00));
        t
    }

    fn new() -> Lu {
        Lu::with(
            LuConfig::new("vol-1"),
            Arc::new(MemBackend::new(BLOCKS * 512)),
        )
    }

    fn run(&self, nx: &NexusId, cdb: &[u8], data: &[u8]) -> ScsiResponse {
        self.lu.execute(nx, &cmd(0, cdb, data))
    }

    /// Run on nexus 1 and expect GOOD.
    fn ok(&self, cdb: &[u8], data: &[u8]) -> Bytes {
        let r = self.run(&nexus(1), cdb, data);
        assert_eq!(r.status, ScsiStatus::Good, "cdb {cdb:02x?}: {:?}", r.sense);
        r.data_in
    }

    /// Expect CHECK CONDITION; return (key, asc, ascq).
    fn check(&self, nx: &NexusId, cdb: &[u8], data: &[u8]) -> (u8, u8, u8) {
        let r = self.run(nx, cdb, data);
        assert_eq!(r.status, ScsiStatus::CheckCondition, "cdb {cdb:02x?}");
        sense_of(&r)
    }

    fn err(&self, cdb: &[u8], data: &[u8]) -> (u8, u8, u8) {
        self.check(&nexus(1), cdb, data)
    }

    fn write10(&self, lba: u32, data: &[u8]) {
        let c = RwCdb {
            lba: u64::from(lba),
            blocks: (data.len() / 512) as u32,
            flags: 0,
        }
        .encode(0x2a);
        self.ok(&c, data);
    }

    fn read10(&self, lba: u32, blocks: u32) -> Bytes {
        self.ok(
            &RwCdb {
                lba: u64::from(lba),
                blocks,
                flags: 0,
            }
            .encode(0x28),
            &[],
        )
    }
}

const ILLEGAL: u8 = 0x05;

fn caw_cdb(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

// ---- unit attentions, LUNs ----

#[test]
fn power_on_ua_once_per_nexus_but_not_for_inquiry() {
    let t = Lu::new();
    // INQUIRY neither reports nor clears the UA (SAM-5 §5.14).
    t.ok(&[0x12, 0, 0, 0, 96, 0], &[]);
    let n2 = nexus(2);
    assert_eq!(
        t.run(&n2, &[0x12, 0, 0, 0, 96, 0], &[]).status,
        ScsiStatus::Good
    );
    assert_eq!(t.check(&n2, &[0; 6], &[]), (6, 0x29, 0x00));
    assert_eq!(t.run(&n2, &[0; 6], &[]).status, ScsiStatus::Good);
}

#[test]
fn request_sense_returns_and_clears_the_ua() {
    let t = Lu::new();
    let n2 = nexus(2);
    let r = t.run(&n2, &[0x03, 0, 0, 0, 252, 0], &[]);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!((r.data_in[2], r.data_in[12]), (0x06, 0x29));
    // Now NO SENSE, in descriptor format when DESC=1.
    let r = t.run(&n2, &[0x03, 1, 0, 0, 252, 0], &[]);
    assert_eq!(&r.data_in[..4], &[0x72, 0x00, 0x00, 0x00]);
}

#[test]
fn other_luns_do_not_exist() {
    let t = Lu::new();
    let n = nexus(1);
    let r = t.lu.execute(&n, &cmd(1, &[0; 6], &[]));
    assert_eq!(sense_of(&r), (ILLEGAL, 0x25, 0x00));
    let r = t.lu.execute(&n, &cmd(1, &[0x12, 0, 0, 0, 36, 0], &[]));
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(r.data_in[0], 0x7f, "peripheral qualifier 011b, type 1Fh");
    let r = t.lu.execute(
        &n,
        &cmd(3, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[]),
    );
    assert_eq!(r.status, ScsiStatus::Good);
}

#[test]
fn report_luns_lists_lun0_and_rejects_tiny_allocation() {
    let t = Lu::new();
    let d = t.ok(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(&d[..], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        t.err(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0], &[]),
        (ILLEGAL, 0x24, 0)
    );
    assert_eq!(
        t.err(&[0xa0, 0, 3, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]),
        (ILLEGAL, 0x24, 0)
    );
}

#[test]
fn lun_reset_posts_ua_to_every_nexus_the_issuer_included() {
    let t = Lu::new();
    let n2 = nexus(2);
    t.lu.nexus_added(&n2);
    t.check(&n2, &[0; 6], &[]); // power on
    let resp =
        t.lu.task_management(&nexus(1), 0, &TaskManagement::LogicalUnitReset);
    assert_eq!(resp, super::TmfResponse::Complete);
    assert_eq!(t.check(&n2, &[0; 6], &[]), (6, 0x29, 0x03));
    // SAM-5 §6.3.4 and libiscsi MultipathIO.Reset: the issuing nexus gets one too.
    assert_eq!(t.check(&nexus(1), &[0; 6], &[]), (6, 0x29, 0x03));
    t.ok(&[0; 6], &[]);
}

#[test]
fn unsupported_opcode_and_short_cdb() {
    let t = Lu::new();
    assert_eq!(t.err(&[0xc5, 0, 0, 0, 0, 0], &[]), (ILLEGAL, 0x20, 0));
    assert_eq!(t.err(&[0x28, 0, 0], &[]), (ILLEGAL, 0x24, 0));
}

// ---- INQUIRY / VPD ----

#[test]
fn standard_inquiry() {
    let t = Lu::new();
    let d = t.ok(&[0x12, 0, 0, 0, 255, 0], &[]);
    assert_eq!(d.len(), 96);
    assert_eq!(d[0], 0);
    assert_eq!(d[2], 6, "SPC-4");
    assert_eq!(d[3] & 0x0f, 2);
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(d[5] & 0x30, 0x10, "TPGS = implicit ALUA");
    assert_eq!(&d[8..11], b"SVA");
    assert_eq!(&d[60..62], &[0x04, 0x60], "SPC-4 version descriptor");
    // Allocation length truncates.
    assert_eq!(t.ok(&[0x12, 0, 0, 0, 5, 0], &[]).len(), 5);
    // Page code without EVPD is invalid.
    assert_eq!(t.err(&[0x12, 0, 0x80, 0, 255, 0], &[]), (ILLEGAL, 0x24, 0));
}

#[test]
fn every_listed_vpd_page_is_readable() {
    let t = Lu::new();
    let list = t.ok(&[0x12, 1, 0, 0, 255, 0], &[]);
    let n = u16::from_be_bytes([list[2], list[3]]) as usize;
    assert!(n >= 7);
    for &p in &list[4..4 + n] {
        let d = t.ok(&[0x12, 1, p, 0, 255, 0], &[]);
        assert_eq!(d[1], p);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]) as usize, d.len() - 4);
    }
    assert_eq!(t.err(&[0x12, 1, 0xc7, 0, 255, 0], &[]), (ILLEGAL, 0x24, 0));
    let bl = t.ok(&[0x12, 1, 0xb0, 0, 255, 0], &[]);
    assert_eq!(bl.len(), 64);
    assert_eq!(bl[5], 255, "max CAW length");
    let lbp = t.ok(&[0x12, 1, 0xb2, 0, 255, 0], &[]);
    assert_eq!(lbp[5] & 0xe0, 0xe0, "LBPU, LBPWS, LBPWS10");
    assert_eq!(lbp[6] & 0x07, 0x02, "thin");
    let rot = t.ok(&[0x12, 1, 0xb1, 0, 255, 0], &[]);
    assert_eq!(&rot[4..6], &[0, 1]);
}

fn designators(vpd83: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 4;
    while at + 4 <= vpd83.len() {
        let len = vpd83[at + 3] as usize;
        out.push((
            vpd83[at + 1] & 0x30,
            vpd83[at + 1] & 0x0f,
            vpd83[at + 4..at + 4 + len].to_vec(),
        ));
        at += 4 + len;
    }
    out
}

#[test]
fn identity_is_shared_across_nodes_ports_are_not() {
    let groups = Arc::new(PortGroups::new(vec![
        PortGroup {
            id: 1,
            relative_ports: vec![1],
            state: AluaState::ActiveOptimized,
            preferred: false,
        },
        PortGroup {
            id: 2,
            relative_ports: vec![2],
            state: AluaState::ActiveOptimized,
            preferred: false,
        },
    ]));
    let mut a = LuConfig::new("uid-x");
    a.port_groups = groups.clone();
    let mut b = a.clone();
    b.relative_target_port = 2;
    b.target_port_group = 2;
    let na = Lu::with(a, Arc::new(MemBackend::new(1 << 20)));
    let nb = Lu::with(b, Arc::new(MemBackend::new(1 << 20)));
    let da = designators(&na.ok(&[0x12, 1, 0x83, 0x01, 0, 0], &[]));
    let db = designators(&nb.ok(&[0x12, 1, 0x83, 0x01, 0, 0], &[]));
    let naa_a = da.iter().find(|d| d.0 == 0 && d.1 == 3).unwrap();
    let naa_b = db.iter().find(|d| d.0 == 0 && d.1 == 3).unwrap();
    assert_eq!(naa_a, naa_b);
    assert_eq!(naa_a.2[0] >> 4, 6, "NAA 6");
    let rp = |d: &Vec<(u8, u8, Vec<u8>)>| d.iter().find(|x| x.1 == 4).unwrap().2.clone();
    assert_eq!(rp(&da), vec![0, 0, 0, 1]);
    assert_eq!(rp(&db), vec![0, 0, 0, 2]);
    assert_eq!(
        na.ok(&[0x12, 1, 0x80, 0, 255, 0], &[]),
        nb.ok(&[0x12, 1, 0x80, 0, 255, 0], &[])
    );
}

// ---- MODE SENSE / SELECT ----

#[test]
fn mode_sense_pages_and_wce_per_cache_mode() {
    let t = Lu::new();
    let d = t.ok(&[0x1a, 0, 0x3f, 0, 255, 0], &[]);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[3], 8, "block descriptor");
    let pages = &d[12..];
    assert_eq!(pages[0], 0x08);
    assert_eq!(pages[2] & 0x04, 0, "write-through: WCE=0");
    let mut cfg = LuConfig::new("wb");
    cfg.cache_mode = CacheMode::WriteBack;
    let wb = Lu::with(cfg, Arc::new(MemBackend::new(1 << 20)));
    let d = wb.ok(&[0x5a, 0x08, 0x08, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 0, "DBD");
    assert_eq!(d[8], 0x08);
    assert_eq!(d[10] & 0x04, 0x04, "write-back: WCE=1");
    // Saved values are not supported; unknown pages are invalid.
    assert_eq!(t.err(&[0x1a, 0, 0xc8, 0, 255, 0], &[]), (ILLEGAL, 0x39, 0));
    assert_eq!(t.err(&[0x1a, 0, 0x19, 0, 255, 0], &[]), (ILLEGAL, 0x24, 0));
    // LLBAA gives a 16-byte block descriptor.
    let d = t.ok(&[0x5a, 0x10, 0x0a, 0, 0, 0, 0, 0, 255, 0], &[]);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
    assert_eq!(&d[8..16], &BLOCKS.to_be_bytes());
}

fn control_page(lu: &Lu) -> Vec<u8> {
    let d = lu.ok(&[0x1a, 0x08, 0x0a, 0, 255, 0], &[]);
    d[4..].to_vec()
}

#[test]
fn mode_select_swp_protects_the_medium_and_tells_other_nexuses() {
    let t = Lu::new();
    let n2 = nexus(2);
    t.lu.nexus_added(&n2);
    t.check(&n2, &[0; 6], &[]);
    let mut page = control_page(&t);
    page[4] |= 0x08; // SWP
    let mut param = vec![0, 0, 0, 0];
    param.extend_from_slice(&page);
    t.ok(&[0x15, 0x10, 0, 0, param.len() as u8, 0], &param);
    let w = RwCdb {
        lba: 0,
        blocks: 1,
        flags: 0,
    }
    .encode(0x2a);
    assert_eq!(t.err(&w, &[0u8; 512]), (0x07, 0x27, 0x00));
    assert_eq!(t.check(&n2, &[0; 6], &[]), (6, 0x2a, 0x01));
    // WP shows in the device-specific parameter.
    assert_eq!(t.ok(&[0x1a, 0x08, 0x0a, 0, 255, 0], &[])[2] & 0x80, 0x80);
    // Changing a non-changeable field is refused.
    let mut bad = param.clone();
    bad[4 + 3] ^= 0x10;
    assert_eq!(
        t.err(&[0x15, 0x10, 0, 0, bad.len() as u8, 0], &bad),
        (ILLEGAL, 0x26, 0)
    );
    // A LUN reset restores defaults (after its unit attention).
    t.lu.task_management(&nexus(1), 0, &TaskManagement::LogicalUnitReset);
    assert_eq!(t.check(&nexus(1), &[0; 6], &[]), (6, 0x29, 0x03));
    t.ok(&w, &[0u8; 512]);
}

#[test]
fn d_sense_switches_to_descriptor_sense() {
    let t = Lu::new();
    let mut page = control_page(&t);
    page[2] |= 0x04;
    let mut param = vec![0, 0, 0, 0];
    param.extend_from_slice(&page);
    t.ok(&[0x15, 0x10, 0, 0, param.len() as u8, 0], &param);
    let r = t.run(&nexus(1), &[0xc5, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.sense.as_ref().unwrap()[0], 0x72);
    assert_eq!(sense_of(&r), (ILLEGAL, 0x20, 0));
}

// ---- READ / WRITE ----

#[test]
fn read_write_all_sizes_round_trip() {
    let t = Lu::new();
    for (i, (w, r)) in [(0x0a, 0x08), (0x2a, 0x28), (0xaa, 0xa8), (0x8a, 0x88)]
        .into_iter()
        .enumerate()
    {
        let data = vec![0x11 * (i as u8 + 1); 1024];
        let lba = 100 + 10 * i as u64;
        t.ok(
            &RwCdb {
                lba,
                blocks: 2,
                flags: 0,
            }
            .encode(w),
            &data,
        );
        let got = t.ok(
            &RwCdb {
                lba,
                blocks: 2,
                flags: 0,
            }
            .encode(r),
            &[],
        );
        assert_eq!(&got[..], &data[..]);
    }
    // FUA / DPO accepted.
    t.ok(
        &RwCdb {
            lba: 5,
            blocks: 1,
            flags: 0x18,
        }
        .encode(0x2a),
        &[1u8; 512],
    );
    t.ok(
        &RwCdb {
            lba: 5,
            blocks: 1,
            flags: 0x18,
        }
        .encode(0x28),
        &[],
    );
}

#[test]
fn ranges_are_checked_even_for_zero_blocks() {
    let t = Lu::new();
    let oob = (ILLEGAL, 0x21, 0x00);
    assert_eq!(
        t.ok(
            &RwCdb {
                lba: 0,
                blocks: 0,
                flags: 0
            }
            .encode(0x28),
            &[]
        )
        .len(),
        0
    );
    assert_eq!(
        t.err(
            &RwCdb {
                lba: BLOCKS + 1,
                blocks: 0,
                flags: 0
            }
            .encode(0x28),
            &[]
        ),
        oob
    );
    assert_eq!(
        t.err(
            &RwCdb {
                lba: BLOCKS - 1,
                blocks: 2,
                flags: 0
            }
            .encode(0x88),
            &[]
        ),
        oob
    );
    assert_eq!(
        t.err(
            &RwCdb {
                lba: u64::MAX,
                blocks: 1,
                flags: 0
            }
            .encode(0x88),
            &[]
        ),
        oob
    );
    assert_eq!(
        t.err(
            &RwCdb {
                lba: 0xffff_ffff,
                blocks: 1,
                flags: 0
            }
            .encode(0x28),
            &[]
        ),
        oob
    );
    t.ok(
        &RwCdb {
            lba: BLOCKS - 1,
            blocks: 1,
            flags: 0,
        }
        .encode(0x28),
        &[],
    );
    // RDPROTECT without protection information.
    assert_eq!(
        t.err(
            &RwCdb {
                lba: 0,
                blocks: 1,
                flags: 0x20
            }
            .encode(0x28),
            &[]
        ),
        (ILLEGAL, 0x24, 0)
    );
}

#[test]
fn write_with_short_data_writes_only_whole_blocks_received() {
    // libiscsi test_write10_residuals: EDTL < transfer length writes EDTL's worth.
    let t = Lu::new();
    t.write10(0, &[b'a'; 1024]);
    let r = t.run(
        &nexus(1),
        &RwCdb {
            lba: 0,
            blocks: 2,
            flags: 0,
        }
        .encode(0x2a),
        &[b'b'; 512],
    );
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(r.data_out_len, Some(1024), "transport reports the overflow");
    let d = t.read10(0, 2);
    assert!(d[..512].iter().all(|&x| x == b'b'));
    assert!(d[512..].iter().all(|&x| x == b'a'));
    // EDTL = 0: nothing written, GOOD.
    let r = t.run(
        &nexus(1),
        &RwCdb {
            lba: 0,
            blocks: 1,
            flags: 0,
        }
        .encode(0x2a),
        &[],
    );
    assert_eq!(r.status, ScsiStatus::Good);
}

#[test]
fn read_capacity() {
    let t = Lu::new();
    let d = t.ok(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
    assert_eq!(&d[..], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x10;
    c[13] = 32;
    let d = t.ok(&c, &[]);
    assert_eq!(d.len(), 32);
    assert_eq!(&d[0..8], &(BLOCKS - 1).to_be_bytes());
    assert_eq!(d[14] & 0xc0, 0xc0, "LBPME, LBPRZ");
    c[13] = 8;
    assert_eq!(t.ok(&c, &[]).len(), 8, "allocation length");
}

// ---- VERIFY / WRITE AND VERIFY ----

#[test]
fn verify_compares_with_bytchk() {
    let t = Lu::new();
    t.write10(10, &[7u8; 1024]);
    let mut v = RwCdb {
        lba: 10,
        blocks: 2,
        flags: 0x02,
    }
    .encode(0x2f);
    t.ok(&v, &[7u8; 1024]);
    let mut bad = vec![7u8; 1024];
    bad[600] = 8;
    let r = t.run(&nexus(1), &v, &bad);
    assert_eq!(sense_of(&r), (0x0e, 0x1d, 0x00));
    assert_eq!(&r.sense.unwrap()[3..7], &600u32.to_be_bytes());
    v[1] = 0x06; // BYTCHK 11b: one block for all
    t.ok(&v, &[7u8; 512]);
    v[1] = 0x00;
    t.ok(&v, &[]);
    v[1] = 0x04; // BYTCHK 10b reserved
    assert_eq!(t.err(&v, &[]), (ILLEGAL, 0x24, 0));
    t.ok(
        &RwCdb {
            lba: 20,
            blocks: 1,
            flags: 0x02,
        }
        .encode(0x2e),
        &[3u8; 512],
    );
    assert!(t.read10(20, 1).iter().all(|&x| x == 3));
}

// ---- COMPARE AND WRITE / ORWRITE ----

#[test]
fn compare_and_write_matches_and_miscompares() {
    let t = Lu::new();
    t.write10(50, &[1u8; 512]);
    let mut data = vec![1u8; 512];
    data.extend_from_slice(&[2u8; 512]);
    t.ok(&caw_cdb(50, 1), &data);
    assert!(t.read10(50, 1).iter().all(|&x| x == 2));
    // Now the compare half no longer matches at byte 0.
    let r = t.run(&nexus(1), &caw_cdb(50, 1), &data);
    assert_eq!(sense_of(&r), (0x0e, 0x1d, 0x00));
    assert_eq!(
        r.sense.as_ref().unwrap()[0] & 0x80,
        0x80,
        "INFORMATION valid"
    );
    assert!(t.read10(50, 1).iter().all(|&x| x == 2), "unchanged");
    assert_eq!(t.err(&caw_cdb(BLOCKS, 1), &data), (ILLEGAL, 0x21, 0));
    t.ok(&caw_cdb(0, 0), &[]);
}

#[test]
fn compare_and_write_is_atomic_under_contention() {
    let t = Arc::new(Lu::new());
    t.write10(7, &[0u8; 512]);
    let threads: Vec<_> = (0..4u8)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                let nx = nexus(10 + i);
                t.lu.nexus_added(&nx);
                let _ = t.run(&nx, &[0; 6], &[]);
                let mut done = 0;
                while done < 25 {
                    let cur = t.run(
                        &nx,
                        &RwCdb {
                            lba: 7,
                            blocks: 1,
                            flags: 0,
                        }
                        .encode(0x28),
                        &[],
                    );
                    let n = u32::from_be_bytes([
                        cur.data_in[0],
                        cur.data_in[1],
                        cur.data_in[2],
                        cur.data_in[3],
                    ]);
                    let mut data = cur.data_in.to_vec();
                    let mut new = vec![0u8; 512];
                    new[..4].copy_from_slice(&(n + 1).to_be_bytes());
                    data.extend_from_slice(&new);
                    // A concurrent plain write to the same block must not break CAW.
                    if t.run(&nx, &caw_cdb(7, 1), &data).status == ScsiStatus::Good {
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let d = t.read10(7, 1);
    assert_eq!(u32::from_be_bytes([d[0], d[1], d[2], d[3]]), 100);
}

#[test]
fn orwrite_ors_into_the_medium() {
    let t = Lu::new();
    t.write10(30, &[0x0f; 512]);
    let c = RwCdb {
        lba: 30,
        blocks: 1,
        flags: 0,
    }
    .encode(0x8b);
    t.ok(&c, &[0xf0; 512]);
    assert!(t.read10(30, 1).iter().all(|&x| x == 0xff));
}

// ---- thin provisioning ----

fn ws_cdb(op: u8, lba: u64, blocks: u32, flags: u8) -> Vec<u8> {
    RwCdb { lba, blocks, flags }.encode(op)
}

fn lba_status(t: &Lu, lba: u64) -> (u64, u32, u8) {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = 24;
    let d = t.ok(&c, &[]);
    assert_eq!(d.len(), 24);
    (
        u64::from_be_bytes(d[8..16].try_into().unwrap()),
        u32::from_be_bytes(d[16..20].try_into().unwrap()),
        d[20] & 0x0f,
    )
}

#[test]
fn write_same_unmap_deallocates_and_reads_zero() {
    let t = Lu::new();
    t.write10(100, &[9u8; 8 * 512]);
    assert_eq!(lba_status(&t, 100).2, 0);
    t.ok(&ws_cdb(0x41, 100, 4, 0x08), &[0u8; 512]);
    assert_eq!(lba_status(&t, 100), (100, 4, 1));
    assert_eq!(lba_status(&t, 104).2, 0);
    assert!(t.read10(100, 4).iter().all(|&x| x == 0));
    // UNMAP=1 deallocates even with a non-zero pattern (libiscsi expects zeroes back).
    t.write10(300, &[9u8; 2 * 512]);
    t.ok(&ws_cdb(0x41, 300, 2, 0x08), &[0xffu8; 512]);
    assert!(t.read10(300, 2).iter().all(|&x| x == 0));
    // Plain WRITE SAME fills the pattern.
    t.ok(&ws_cdb(0x93, 200, 3, 0), &[5u8; 512]);
    assert!(t.read10(200, 3).iter().all(|&x| x == 5));
    // NDOB writes zeroes without a data-out buffer.
    t.ok(&ws_cdb(0x93, 200, 3, 0x09), &[]);
    assert_eq!(lba_status(&t, 200).2, 1);
    // ANCHOR, 0 blocks (WSNZ), out of range.
    assert_eq!(
        t.err(&ws_cdb(0x41, 0, 1, 0x18), &[0u8; 512]),
        (ILLEGAL, 0x24, 0)
    );
    assert_eq!(
        t.err(&ws_cdb(0x41, 0, 0, 0), &[0u8; 512]),
        (ILLEGAL, 0x24, 0)
    );
    assert_eq!(
        t.err(&ws_cdb(0x93, BLOCKS, 1, 0), &[0u8; 512]),
        (ILLEGAL, 0x21, 0)
    );
}

fn unmap_param(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for (l, n) in ranges {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

#[test]
fn unmap_descriptors() {
    let t = Lu::new();
    t.write10(0, &[1u8; 16 * 512]);
    let p = unmap_param(&[(0, 2), (8, 1), (12, 0)]);
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&(p.len() as u16).to_be_bytes());
    t.ok(&c, &p);
    assert_eq!(lba_status(&t, 0), (0, 2, 1));
    assert_eq!(lba_status(&t, 2).2, 0);
    assert_eq!(lba_status(&t, 8), (8, 1, 1));
    let edge = unmap_param(&[(BLOCKS, 0)]);
    c[7..9].copy_from_slice(&(edge.len() as u16).to_be_bytes());
    t.ok(&c, &edge);
    let bad = unmap_param(&[(BLOCKS - 1, 2)]);
    c[7..9].copy_from_slice(&(bad.len() as u16).to_be_bytes());
    assert_eq!(t.err(&c, &bad), (ILLEGAL, 0x21, 0));
    c[7..9].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(t.err(&c, &bad[..4]), (ILLEGAL, 0x1a, 0));
    c[7..9].copy_from_slice(&0u16.to_be_bytes());
    t.ok(&c, &[]);
}

// ---- SYNCHRONIZE CACHE, durability ----

#[test]
fn write_through_flushes_each_write_write_back_only_on_fua_and_sync() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, after_write, after_fua) in [
        (CacheMode::WriteThrough, 1, 2),
        (CacheMode::WriteBack, 0, 1),
    ] {
        let f = Arc::new(
            FileBackend::open(&dir.path().join(format!("{mode:?}")), 1 << 20, true).unwrap(),
        );
        let mut cfg = LuConfig::new("durable");
        cfg.cache_mode = mode;
        let t = Lu::with(cfg, f.clone());
        t.write10(0, &[1u8; 512]);
        assert_eq!(f.sync_count(), after_write, "{mode:?}");
        t.ok(
            &RwCdb {
                lba: 0,
                blocks: 1,
                flags: 0x08,
            }
            .encode(0x2a),
            &[2u8; 512],
        );
        assert_eq!(f.sync_count(), after_fua, "{mode:?}");
        t.ok(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        assert_eq!(f.sync_count(), after_fua + 1, "{mode:?}");
    }
}

#[test]
fn backend_errors_become_medium_errors() {
    let f = Arc::new(FaultBackend::new(Arc::new(MemBackend::new(1 << 20))));
    let t = Lu::with(LuConfig::new("faulty"), f.clone());
    f.fail_range(512 * 10, 512, FaultOps::READ);
    assert_eq!(
        t.err(
            &RwCdb {
                lba: 10,
                blocks: 1,
                flags: 0
            }
            .encode(0x28),
            &[]
        ),
        (0x03, 0x11, 0x00)
    );
    f.fail_range(512 * 20, 512, FaultOps::WRITE);
    assert_eq!(
        t.err(
            &RwCdb {
                lba: 20,
                blocks: 1,
                flags: 0
            }
            .encode(0x2a),
            &[0u8; 512]
        ),
        (0x03, 0x0c, 0x00)
    );
    t.read10(11, 1);
    let _ = &t.backend;
}

// ---- ALUA ----

#[test]
fn rtpg_reports_all_groups_and_state_changes_post_ua() {
    let groups = Arc::new(PortGroups::new(vec![
        PortGroup {
            id: 1,
            relative_ports: vec![1],
            state: AluaState::ActiveOptimized,
            preferred: false,
        },
        PortGroup {
            id: 2,
            relative_ports: vec![2],
            state: AluaState::ActiveOptimized,
            preferred: false,
        },
    ]));
    let mut cfg = LuConfig::new("alua");
    cfg.port_groups = groups.clone();
    let t = Lu::with(cfg, Arc::new(MemBackend::new(1 << 20)));
    let rtpg = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
    let d = t.ok(&rtpg, &[]);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 24);
    assert_eq!(&d[4 + 2..4 + 4], &[0, 1]);
    assert_eq!(&d[18..20], &[0, 2], "second group's id");
    assert_eq!(&d[24..28], &[0, 0, 0, 2], "second group's port");
    let mut ext = rtpg;
    ext[1] |= 0x20;
    let d = t.ok(&ext, &[]);
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 28);
    assert_eq!(d[4], 0x10);

    groups.set_state(1, AluaState::Unavailable);
    let rd = RwCdb {
        lba: 0,
        blocks: 1,
        flags: 0,
    }
    .encode(0x28);
    assert_eq!(t.err(&rd, &[]), (6, 0x2a, 0x06));
    assert_eq!(t.err(&rd, &[]), (0x02, 0x04, 0x0c));
    let d = t.ok(&rtpg, &[]);
    assert_eq!(d[4] & 0x0f, 0x03);
    t.ok(&[0x12, 0, 0, 0, 36, 0], &[]);
    groups.set_state(1, AluaState::Transitioning);
    assert_eq!(t.err(&rd, &[]), (6, 0x2a, 0x06));
    assert_eq!(t.err(&rd, &[]), (0x02, 0x04, 0x0a));
    groups.set_state(1, AluaState::ActiveOptimized);
    assert_eq!(t.err(&rd, &[]), (6, 0x2a, 0x06));
    t.ok(&rd, &[]);
}

// ---- REPORT SUPPORTED OPERATION CODES ----

fn rsoc(options: u8, rctd: bool, op: u8, sa: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = 0xa3;
    c[1] = 0x0c;
    c[2] = options | if rctd { 0x80 } else { 0 };
    c[3] = op;
    c[4..6].copy_from_slice(&sa.to_be_bytes());
    c[6..10].copy_from_slice(&65535u32.to_be_bytes());
    c
}

#[test]
fn report_supported_opcodes_all_forms() {
    let t = Lu::new();
    let d = t.ok(&rsoc(0, false, 0, 0), &[]);
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len % 8, 0);
    assert_eq!(len + 4, d.len());
    let d = t.ok(&rsoc(0, true, 0, 0), &[]);
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(len % 20, 0, "descriptors carry 12-byte timeouts");
    // Each listed command, asked for alone.
    let all = t.ok(&rsoc(0, false, 0, 0), &[]);
    for desc in all[4..].chunks(8) {
        let (op, sa, servactv) = (desc[0], u16::from_be_bytes([desc[2], desc[3]]), desc[5] & 1);
        if servactv == 1 {
            assert_eq!(t.err(&rsoc(1, false, op, sa), &[]), (ILLEGAL, 0x24, 0));
            let one = t.ok(&rsoc(2, false, op, sa), &[]);
            assert_eq!(one[1] & 0x07, 0x03);
            assert_eq!(one[4], op);
        } else {
            let one = t.ok(&rsoc(1, true, op, 0), &[]);
            assert_eq!(one[1] & 0x07, 0x03);
            assert_eq!(one[4], op);
            let cdb_len = u16::from_be_bytes([one[2], one[3]]) as usize;
            assert_eq!(one.len(), 4 + cdb_len + 12);
            assert_eq!(t.err(&rsoc(2, false, op, 0), &[]), (ILLEGAL, 0x24, 0));
        }
    }
    // An opcode we do not implement.
    let d = t.ok(&rsoc(1, false, 0xc5, 0), &[]);
    assert_eq!(d[1] & 0x07, 0x01);
}

#[test]
fn every_reported_opcode_is_implemented() {
    let t = Lu::new();
    for op in 0..=255u8 {
        let mut c = vec![0u8; 16];
        c[0] = op;
        let r = t.run(&nexus(1), &c, &[]);
        let unsupported =
            r.status == ScsiStatus::CheckCondition && sense_of(&r) == (ILLEGAL, 0x20, 0);
        assert_eq!(
            super::spc::is_reported(op),
            !unsupported,
            "opcode {op:#04x}"
        );
    }
}

// ---- EXTENDED COPY ----

fn xcopy_param(t: &Lu, list_id: u8, naa: &[u8], segs: &[(u16, u64, u64)]) -> Vec<u8> {
    let _ = t;
    let mut p = vec![0u8; 16];
    p[0] = list_id;
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8..12].copy_from_slice(&((28 * segs.len()) as u32).to_be_bytes());
    let mut td = [0u8; 32];
    td[0] = 0xe4;
    td[4] = 0x01;
    td[5] = 0x03;
    td[7] = naa.len() as u8;
    td[8..8 + naa.len()].copy_from_slice(naa);
    td[29..32].copy_from_slice(&[0, 2, 0]);
    p.extend_from_slice(&td);
    for &(n, src, dst) in segs {
        let mut s = [0u8; 28];
        s[0] = 0x02;
        s[2..4].copy_from_slice(&0x18u16.to_be_bytes());
        s[10..12].copy_from_slice(&n.to_be_bytes());
        s[12..20].copy_from_slice(&src.to_be_bytes());
        s[20..28].copy_from_slice(&dst.to_be_bytes());
        p.extend_from_slice(&s);
    }
    p
}

fn xcopy_cdb(len: usize) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

#[test]
fn extended_copy_within_the_lu_and_copy_results() {
    let t = Lu::new();
    let naa = super::lu::naa6_from_uid("vol-1");
    t.write10(0, &[0xab; 4 * 512]);
    let p = xcopy_param(&t, 5, &naa, &[(4, 0, 1000), (2, 0, 1500)]);
    t.ok(&xcopy_cdb(p.len()), &p);
    assert!(t.read10(1000, 4).iter().all(|&x| x == 0xab));
    assert!(t.read10(1500, 2).iter().all(|&x| x == 0xab));
    let mut rcr = [0u8; 16];
    rcr[0] = 0x84;
    rcr[2] = 5;
    rcr[13] = 255;
    let d = t.ok(&rcr, &[]);
    assert_eq!(d[4], 0x01);
    assert_eq!(u16::from_be_bytes([d[5], d[6]]), 2);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 6);
    rcr[1] = 0x03;
    let d = t.ok(&rcr, &[]);
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize,
        d.len() - 4
    );
    assert_eq!(&d[44..46], &[0x02, 0xe4]);
    // Another LU's designator: copy aborted. Beyond end of medium: copy aborted.
    let p = xcopy_param(&t, 6, &super::lu::naa6_from_uid("other"), &[(1, 0, 1)]);
    assert_eq!(t.err(&xcopy_cdb(p.len()), &p).0, 0x0a);
    let p = xcopy_param(&t, 7, &naa, &[(2048, 0, BLOCKS - 1)]);
    assert_eq!(t.err(&xcopy_cdb(p.len()), &p).0, 0x0a);
    // Unsupported segment type.
    let mut p = xcopy_param(&t, 8, &naa, &[(1, 0, 1)]);
    p[48] = 0x0a;
    assert_eq!(t.err(&xcopy_cdb(p.len()), &p), (ILLEGAL, 0x26, 0x09));
}

// ---- robustness ----

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// No CDB, data or LUN makes `execute` panic; every response is well-formed.
    #[test]
    fn random_cdbs_never_panic(
        op in prop_oneof![any::<u8>(), prop::sample::select(vec![
            0x00u8, 0x03, 0x08, 0x0a, 0x12, 0x15, 0x1a, 0x25, 0x28, 0x2a, 0x2e, 0x2f, 0x34, 0x35,
            0x41, 0x42, 0x55, 0x5a, 0x83, 0x84, 0x88, 0x89, 0x8a, 0x8b, 0x8e, 0x8f, 0x90, 0x91,
            0x93, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae, 0xaf])],
        rest in prop::collection::vec(any::<u8>(), 0..32),
        data in prop::collection::vec(any::<u8>(), 0..2048),
        lun in prop_oneof![Just(0u64), any::<u64>()],
        small_lba in any::<bool>(),
    ) {
        let lu = LogicalUnit::new(LuConfig::new("fuzz"), Arc::new(MemBackend::new(64 * 512)));
        let mut cdb = vec![op];
        cdb.extend_from_slice(&rest);
        if small_lba && cdb.len() >= 10 {
            // Steer some cases into the valid LBA range so the I/O paths run.
            for b in cdb.iter_mut().take(6).skip(2) { *b = 0; }
            if cdb.len() >= 16 { for b in cdb.iter_mut().take(10).skip(6) { *b = 0; } cdb[10] = 0; cdb[11] = 0; cdb[12] = 0; }
        }
        let n = nexus(1);
        let _ = lu.execute(&n, &cmd(lun, &cdb, &data));
        let r = lu.execute(&n, &cmd(lun, &cdb, &data));
        prop_assert_eq!(r.sense.is_some(), r.status == ScsiStatus::CheckCondition);
    }
}

#[test]
fn mapping_reported_for_fresh_lu_is_deallocated() {
    let t = Lu::new();
    assert_eq!(lba_status(&t, 0), (0, BLOCKS as u32, 1));
    assert_eq!(
        t.backend.mapping(0, 512).unwrap(),
        (Mapping::Deallocated, 512)
    );
}

// ---- edge cases from libiscsi's test-tool ----

#[test]
fn data_out_must_match_exactly_for_caw_and_write_same() {
    let t = Lu::new();
    // CAW: 4 blocks sent for a 1-block CAW (needs 2), and 4 for a 3-block one (needs 6).
    assert_eq!(t.err(&caw_cdb(0, 1), &[0u8; 2048]).0, ILLEGAL);
    assert_eq!(t.err(&caw_cdb(0, 3), &[0u8; 2048]).0, ILLEGAL);
    // WRITE SAME with half a block or two blocks of data.
    assert_eq!(t.err(&ws_cdb(0x41, 0, 1, 0x08), &[0u8; 256]).0, ILLEGAL);
    assert_eq!(t.err(&ws_cdb(0x41, 0, 1, 0x08), &[0u8; 1024]).0, ILLEGAL);
}

#[test]
fn start_stop_unit_cannot_eject_a_fixed_medium() {
    let t = Lu::new();
    assert_eq!(t.err(&[0x1b, 1, 0, 0, 0x02, 0], &[]), (ILLEGAL, 0x24, 0));
    t.ok(&[0x1b, 1, 0, 0, 0x01, 0], &[]);
    t.ok(&[0x1e, 0, 0, 0, 1, 0], &[]);
}

#[test]
fn extended_copy_target_descriptor_checks_and_results_reported_once() {
    let t = Lu::new();
    let naa = super::lu::naa6_from_uid("vol-1");
    let mut p = xcopy_param(&t, 1, &naa, &[(1, 0, 1)]);
    // SPC-4: LU ID TYPE is ignored and NUL is obsolete, so both copy normally.
    p[17] = 0xc0; // LU ID TYPE 11b
    t.ok(&xcopy_cdb(p.len()), &p);
    p[17] = 0x20; // NUL
    t.ok(&xcopy_cdb(p.len()), &p);
    // A segment naming a target descriptor that does not exist: COPY ABORTED 0D/02.
    let mut bad = xcopy_param(&t, 1, &naa, &[(1, 0, 1)]);
    let seg = bad.len() - 28;
    bad[seg + 7] = 1; // destination index 1 of 1 descriptor
    assert_eq!(t.err(&xcopy_cdb(bad.len()), &bad), (0x0a, 0x0d, 0x02));
    let p = xcopy_param(&t, 1, &naa, &[(1, 0, 1)]);
    t.ok(&xcopy_cdb(p.len()), &p);
    // Truncated parameter list.
    assert_eq!(
        t.err(&xcopy_cdb(p.len() - 1), &p[..p.len() - 1]),
        (ILLEGAL, 0x1a, 0)
    );
    let mut rcr = [0u8; 16];
    rcr[0] = 0x84;
    rcr[2] = 1;
    rcr[13] = 255;
    t.ok(&rcr, &[]);
    assert_eq!(t.err(&rcr, &[]), (ILLEGAL, 0x24, 0));
    // Third-party Copy VPD lists RECEIVE COPY RESULTS / COPY STATUS.
    let d = t.ok(&[0x12, 1, 0x8f, 0, 255, 0], &[]);
    assert_eq!(&d[4..6], &[0x00, 0x01]);
    assert!(d.windows(4).any(|w| w == [0x84, 0x02, 0x00, 0x03]));
    assert_eq!(d.len() % 4, 0);
}

// ---- persistent reservations through the LU ----

fn prout(sa: u8, rtype: u8, key: u64, sark: u64, aptpl: bool) -> ([u8; 10], Vec<u8>) {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    p[20] = u8::from(aptpl);
    let mut c = [0u8; 10];
    c[0] = 0x5f;
    c[1] = sa;
    c[2] = rtype;
    c[5..9].copy_from_slice(&24u32.to_be_bytes());
    (c, p)
}

#[test]
fn persistent_reservation_conflicts_uas_and_aptpl_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pr.json");
    let backend: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(1 << 20));
    let mut cfg = LuConfig::new("pr");
    cfg.pr_state_path = Some(path.clone());
    let t = Lu::with(cfg.clone(), backend.clone());
    let n2 = nexus(2);
    t.lu.nexus_added(&n2);
    t.check(&n2, &[0; 6], &[]);

    let (c, p) = prout(0x00, 0, 0, 0x11, true); // REGISTER, APTPL
    t.ok(&c, &p);
    assert!(path.exists(), "APTPL state saved");
    let (c, p) = prout(0x01, 0x01, 0x11, 0, false); // RESERVE, Write Exclusive
    t.ok(&c, &p);
    let w = RwCdb {
        lba: 0,
        blocks: 1,
        flags: 0,
    }
    .encode(0x2a);
    let r = t.run(&n2, &w, &[0u8; 512]);
    assert_eq!(r.status, ScsiStatus::ReservationConflict);
    assert!(r.sense.is_none());
    let rd = RwCdb {
        lba: 0,
        blocks: 1,
        flags: 0,
    }
    .encode(0x28);
    assert_eq!(t.run(&n2, &rd, &[]).status, ScsiStatus::Good);
    t.ok(&w, &[0u8; 512]);

    // A restart (new LU from the same state file) keeps the APTPL reservation.
    let t2 = Lu::with(cfg, backend);
    t2.lu.nexus_added(&n2);
    t2.check(&n2, &[0; 6], &[]);
    assert_eq!(
        t2.run(&n2, &w, &[0u8; 512]).status,
        ScsiStatus::ReservationConflict
    );

    // Nexus 2 registers and preempts nexus 1: nexus 1 hears about it.
    let (c, p) = prout(0x00, 0, 0, 0x22, false);
    assert_eq!(t2.run(&n2, &c, &p).status, ScsiStatus::Good);
    let (c, p) = prout(0x04, 0x01, 0x22, 0x11, false); // PREEMPT
    assert_eq!(t2.run(&n2, &c, &p).status, ScsiStatus::Good);
    let (key, asc_, _) = t2.err(&[0; 6], &[]);
    assert_eq!((key, asc_), (6, 0x2a));
    assert_eq!(t2.run(&n2, &w, &[0u8; 512]).status, ScsiStatus::Good);
}

#[test]
fn admit_then_apply_on_every_plex() {
    // The mirror engine's split: admission on the receiving node, then the ordered apply on
    // every plex (here two LUs standing for two nodes).
    let a = Lu::new();
    let b = Lu::new();
    let n3 = nexus(3);
    let w = RwCdb {
        lba: 9,
        blocks: 1,
        flags: 0,
    }
    .encode(0x2a);
    let c = cmd(0, &w, &[0x5a; 512]);
    // First contact on node A: the power-on UA is the answer, nothing is applied.
    let r = a.lu.admit(&n3, &c).expect("UA ends the command");
    assert_eq!(sense_of(&r), (6, 0x29, 0x00));
    assert!(a.lu.admit(&n3, &c).is_none());
    for plex in [&a, &b] {
        assert_eq!(plex.lu.execute_admitted(&n3, &c).status, ScsiStatus::Good);
    }
    assert!(a.read10(9, 1).iter().all(|&x| x == 0x5a));
    assert!(b.read10(9, 1).iter().all(|&x| x == 0x5a));
    // Node B never saw n3 log in: applying did not register it, so its first own
    // command there still gets the power-on UA.
    assert_eq!(b.check(&n3, &[0; 6], &[]), (6, 0x29, 0x00));
}

#[test]
fn compare_and_write_zero_blocks_is_a_no_op_only_without_data() {
    let t = Lu::new();
    t.ok(&caw_cdb(0, 0), &[]);
    // 256 blocks wraps the one-byte NUMBER OF LOGICAL BLOCKS to 0: the data must not be dropped.
    assert_eq!(t.err(&caw_cdb(0, 0), &[0u8; 1024]), (ILLEGAL, 0x24, 0));
}

/// A READ served from the page cache gives exactly what `execute` gives: the data, and the
/// same UA / LBA-range answers; commands other than small READs are not taken.
#[test]
fn cached_read_matches_execute() {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn BlockBackend> =
        Arc::new(FileBackend::open(&dir.path().join("v"), BLOCKS * 512, true).unwrap());
    let t = Lu::with(LuConfig::new("vol-1"), backend);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    t.write10(16, &data);
    let read = |lba: u64, blocks: u32| {
        cmd(
            0,
            &RwCdb {
                lba,
                blocks,
                flags: 0,
            }
            .encode(0x28),
            &[],
        )
    };
    let r =
        t.lu.try_execute_cached(&nexus(1), &read(16, 16))
            .expect("just written, so cached");
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(&r.data_in[..], &data[..]);

    let r =
        t.lu.try_execute_admitted_cached(&nexus(1), &read(16, 16))
            .unwrap();
    assert_eq!(&r.data_in[..], &data[..]);

    // A nexus the LU has not seen gets its POWER ON UA first, as with `execute`.
    let r = t.lu.try_execute_cached(&nexus(2), &read(16, 16)).unwrap();
    assert_eq!(r.status, ScsiStatus::CheckCondition);
    assert_eq!(sense_of(&r), (6, 0x29, 0x00));

    // Out of range, too large, or not a READ: the normal path decides.
    assert!(t
        .lu
        .try_execute_cached(&nexus(1), &read(BLOCKS, 1))
        .is_none());
    let big = (super::lu::CACHED_READ_BYTES_MAX / 512 + 1) as u32;
    assert!(t.lu.try_execute_cached(&nexus(1), &read(0, big)).is_none());
    let w = cmd(
        0,
        &RwCdb {
            lba: 0,
            blocks: 1,
            flags: 0,
        }
        .encode(0x2a),
        &[1; 512],
    );
    assert!(t.lu.try_execute_cached(&nexus(1), &w).is_none());
    // A MemBackend cannot tell, so nothing is served inline there.
    let m = Lu::new();
    assert!(m.lu.try_execute_cached(&nexus(1), &read(0, 1)).is_none());
}

// ---- replicated non-data state (resync `CopyWhat::LuState`) ----

#[test]
fn replicated_state_round_trips_to_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let src = Lu::new();
    let n2 = nexus(2);
    let (c, p) = prout(0x00, 0, 0, 0x11, true); // REGISTER with APTPL
    src.ok(&c, &p);
    let (c, p) = prout(0x01, 0x01, 0x11, 0, false); // RESERVE Write Exclusive
    src.ok(&c, &p);
    let mut page = control_page(&src);
    page[4] |= 0x08; // SWP
    let mut param = vec![0, 0, 0, 0];
    param.extend_from_slice(&page);
    src.ok(&[0x15, 0x10, 0, 0, param.len() as u8, 0], &param);
    let image = src.lu.replicated_state();

    // A replacement node: its own APTPL file, nothing registered.
    let mut cfg = LuConfig::new("vol-1");
    cfg.pr_state_path = Some(dir.path().join("pr.json"));
    let dst = Lu::with(cfg, Arc::new(MemBackend::new(BLOCKS * 512)));
    dst.lu.nexus_added(&n2);
    dst.check(&n2, &[0; 6], &[]);
    dst.lu.install_replicated_state(&image).expect("install");
    assert_eq!(dst.lu.replicated_state(), image, "identical image");
    {
        let st = dst.lu.lock_state();
        assert_eq!(st.pr.keys(), vec![0x11]);
        assert_eq!(st.pr.generation(), src.lu.lock_state().pr.generation());
        assert!(st.pr.reservation().is_some());
        assert!(st.mode.swp);
    }
    assert!(dir.path().join("pr.json").exists(), "APTPL image saved");
    // Behaviour follows: nexus 2 is not the holder, so its write conflicts.
    let w = RwCdb {
        lba: 0,
        blocks: 1,
        flags: 0,
    }
    .encode(0x2a);
    let r = dst.run(&n2, &w, &[0u8; 512]);
    assert_eq!(r.status, ScsiStatus::ReservationConflict);

    // SCSI-2 reservation travels too.
    let t = Lu::new();
    t.ok(&[0x16, 0, 0, 0, 0, 0], &[]); // RESERVE(6) by nexus 1
    let other = Lu::new();
    other
        .lu
        .install_replicated_state(&t.lu.replicated_state())
        .expect("install");
    assert_eq!(other.lu.lock_state().pr.scsi2_holder(), Some(&nexus(1)));

    // Garbage and other versions are refused, the state untouched.
    assert!(other.lu.install_replicated_state(b"{not json").is_err());
    let v2 = String::from_utf8(image.to_vec())
        .unwrap()
        .replace("\"version\":1", "\"version\":2");
    assert!(other.lu.install_replicated_state(v2.as_bytes()).is_err());
    assert_eq!(other.lu.lock_state().pr.scsi2_holder(), Some(&nexus(1)));
}

/// A small, page-aligned write-back WRITE runs inline with exactly `execute`'s outcome
/// (data written, UA first for a new nexus, no sync); anything that may wait or needs more
/// than a page-cache copy is left to the normal path.
#[test]
fn inline_write_matches_execute_and_declines_what_may_wait() {
    use super::lu::{INLINE_WRITE_BYTES_MAX, INLINE_WRITE_SLOW};
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        Arc::new(FileBackend::open(&dir.path().join(name), BLOCKS * 512, true).unwrap())
    };
    let wb = open("wb");
    let mut cfg = LuConfig::new("vol-1");
    cfg.cache_mode = CacheMode::WriteBack;
    let t = Lu::with(cfg, wb.clone());
    let write = |op: u8, lba: u64, blocks: u32, flags: u8, fill: u8| {
        cmd(
            0,
            &RwCdb { lba, blocks, flags }.encode(op),
            &vec![fill; blocks as usize * 512],
        )
    };

    let r =
        t.lu.try_execute_inline_write(&nexus(1), &write(0x2a, 8, 8, 0, 0x5a));
    assert_eq!(r.map(|r| r.status), Some(ScsiStatus::Good));
    assert_eq!(&t.read10(8, 8)[..], &[0x5a; 4096][..]);
    assert_eq!(wb.sync_count(), 0, "write-back: no sync");
    // WRITE(16) and WRITE(6) are taken too.
    let r =
        t.lu.try_execute_inline_write(&nexus(1), &write(0x8a, 16, 8, 0, 0x16));
    assert_eq!(r.map(|r| r.status), Some(ScsiStatus::Good));
    assert_eq!(&t.read10(16, 8)[..], &[0x16; 4096][..]);

    // A nexus the LU has not seen gets its POWER ON UA and the medium is untouched.
    let r =
        t.lu.try_execute_inline_write(&nexus(2), &write(0x2a, 8, 8, 0, 0x77))
            .expect("eligible write");
    assert_eq!(sense_of(&r), (6, 0x29, 0x00));
    assert_eq!(&t.read10(8, 8)[..], &[0x5a; 4096][..]);

    // Declined: FUA, not page-aligned, partial page, too large, WRITE AND VERIFY, a READ,
    // out of range.
    let big = (INLINE_WRITE_BYTES_MAX / 512) as u32 + 8;
    for c in [
        write(0x2a, 8, 8, 0x08, 1),
        write(0x2a, 9, 8, 0, 1),
        write(0x2a, 8, 1, 0, 1),
        write(0x2a, 0, big, 0, 1),
        write(0x2e, 8, 8, 0, 1),
        cmd(
            0,
            &RwCdb {
                lba: 8,
                blocks: 8,
                flags: 0,
            }
            .encode(0x28),
            &[],
        ),
        write(0x2a, BLOCKS, 8, 0, 1),
    ] {
        assert!(
            t.lu.try_execute_inline_write(&nexus(1), &c).is_none(),
            "cdb {:02x?}",
            &c.cdb[..]
        );
    }
    assert_eq!(&t.read10(8, 8)[..], &[0x5a; 4096][..], "nothing written");

    // Another command holds an overlapping range: declined, not waited for.
    {
        let _held = t.lu.ranges.try_lock(12, 1).expect("free");
        assert!(t.lu.ranges.try_lock(10, 4).is_none(), "overlaps");
        assert!(t.lu.ranges.try_lock(13, 4).is_some(), "adjacent");
        assert!(t
            .lu
            .try_execute_inline_write(&nexus(1), &write(0x2a, 8, 8, 0, 1))
            .is_none());
    }
    assert!(t
        .lu
        .try_execute_inline_write(&nexus(1), &write(0x2a, 8, 8, 0, 0x33))
        .is_some());

    // After a slow inline write, writes go to the blocking pool for a while.
    let now = std::time::Instant::now();
    t.lu.inline_writes.record(now, now + INLINE_WRITE_SLOW / 2);
    assert_eq!(t.lu.inline_write_backoffs(), 0, "fast enough");
    t.lu.inline_writes.record(now, now + INLINE_WRITE_SLOW * 2);
    assert_eq!(t.lu.inline_write_backoffs(), 1);
    assert!(t
        .lu
        .try_execute_inline_write(&nexus(1), &write(0x2a, 8, 8, 0, 1))
        .is_none());
    assert_eq!(&t.read10(8, 8)[..], &[0x33; 4096][..]);

    // Write-through: every write waits for fdatasync, so never inline.
    let t = Lu::with(LuConfig::new("vol-1"), open("wt"));
    assert!(t
        .lu
        .try_execute_inline_write(&nexus(1), &write(0x2a, 8, 8, 0, 1))
        .is_none());
}

/// The back-off after a slow inline write lasts at least INLINE_WRITE_BACKOFF and at least
/// INLINE_WRITE_BACKOFF_FACTOR times the slow write, so sustained throttling cannot keep
/// the async thread blocked for more than a small share of the time.
#[test]
fn inline_write_gate_backs_off_in_proportion() {
    use super::lu::{
        InlineWriteGate, INLINE_WRITE_BACKOFF, INLINE_WRITE_BACKOFF_FACTOR, INLINE_WRITE_SLOW,
    };
    use std::time::Duration;
    let base = std::time::Instant::now();
    let g = InlineWriteGate::new(base);
    assert!(g.open(base));
    let end = base + INLINE_WRITE_SLOW * 2;
    g.record(base, end);
    assert!(!g.open(end));
    assert!(!g.open(end + INLINE_WRITE_BACKOFF - Duration::from_millis(1)));
    assert!(g.open(end + INLINE_WRITE_BACKOFF));

    let start = end + INLINE_WRITE_BACKOFF;
    let took = Duration::from_millis(100);
    g.record(start, start + took);
    let backoff = took * INLINE_WRITE_BACKOFF_FACTOR;
    assert!(backoff > INLINE_WRITE_BACKOFF);
    assert!(!g.open(start + took + backoff - Duration::from_millis(1)));
    assert!(g.open(start + took + backoff));
    assert_eq!(g.slow_writes(), 2);
}
