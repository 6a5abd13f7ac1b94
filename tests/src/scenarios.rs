//! Test stories written against [`IscsiTarget`], so the same story runs on sva-node (the
//! integration tests) and on tgtd (the harness self-tests, proving the harness itself).
//!
//! Each returns `Err` with a message that includes the tool output and the target's log tail.

use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::process::ToolOutput;
use crate::raw::{self, opcode, Outcome, RawSession};
use crate::tools;
use crate::IscsiTarget;

/// One `write -P` (or `read -P`) of qemu-io.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub offset: u64,
    pub len: u64,
    pub pattern: u8,
}

const fn region(offset: u64, len: u64, pattern: u8) -> Region {
    Region {
        offset,
        len,
        pattern,
    }
}

const MIB: u64 = 1 << 20;

/// Writes chosen to cross the transfer boundaries of a typical negotiation (libiscsi proposes
/// FirstBurstLength 256 KiB / MaxBurstLength 16 MiB, targets often cap them at 64 KiB /
/// 256 KiB; MaxRecvDataSegmentLength 8 KiB..256 KiB): single blocks, one sector past a burst,
/// sizes not a multiple of 4 KiB, a multi-MiB write needing many R2Ts, an unaligned offset,
/// the last sector of a range, and an overwrite in the middle of an earlier write.
/// Needs a volume of at least 64 MiB.
pub const WRITES: [Region; 8] = [
    region(MIB, 4096, 0x11),
    region(8 * MIB, 4 * MIB, 0x22),
    region(20 * MIB, 65536 + 512, 0x33),
    region(24 * MIB, 262144 + 3584, 0x44),
    region(30 * MIB + 512, MIB + 512, 0x55),
    region(40 * MIB - 512, 512, 0x66),
    region(9 * MIB, 8192, 0x77),
    region(48 * MIB, 16 * MIB + 4096, 0x88),
];

/// What [`WRITES`] must read back as, including untouched neighbours (zero): nothing was
/// written twice, short or misplaced.
pub const EXPECTED: [Region; 12] = [
    region(MIB - 4096, 4096, 0),
    region(MIB, 4096, 0x11),
    region(8 * MIB, MIB, 0x22),
    region(9 * MIB, 8192, 0x77),
    region(9 * MIB + 8192, 3 * MIB - 8192, 0x22),
    region(12 * MIB, 4096, 0),
    region(20 * MIB, 65536 + 512, 0x33),
    region(20 * MIB + 65536 + 512, 3584, 0),
    region(24 * MIB, 262144 + 3584, 0x44),
    region(30 * MIB + 512, MIB + 512, 0x55),
    region(40 * MIB - 512, 512, 0x66),
    region(48 * MIB, 16 * MIB + 4096, 0x88),
];

/// Minimum volume size for [`WRITES`].
pub const PATTERN_VOLUME_BYTES_MIN: u64 = 65 * MIB;

fn qemu_io_checked(t: &dyn IscsiTarget, cmds: &[String]) -> Result<ToolOutput> {
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let out = tools::qemu_io(&t.url(), &refs)?;
    if !out.success() || out.stdout.contains("Pattern verification failed") {
        bail!(
            "qemu-io against {} failed:\n{}\n--- target log ---\n{}",
            t.describe(),
            out.describe(),
            t.log_tail(40)
        );
    }
    Ok(out)
}

/// Writes `regions` with qemu-io in one session.
pub fn write_regions(t: &dyn IscsiTarget, regions: &[Region]) -> Result<()> {
    let cmds: Vec<String> = regions
        .iter()
        .map(|r| format!("write -P {:#04x} {} {}", r.pattern, r.offset, r.len))
        .collect();
    let out = qemu_io_checked(t, &cmds)?;
    let wrote = out.stdout.matches("wrote ").count();
    ensure!(
        wrote == regions.len(),
        "qemu-io reported {wrote} writes, expected {}:\n{}",
        regions.len(),
        out.describe()
    );
    Ok(())
}

/// Reads `regions` back in a new session and verifies every byte (`read -P`).
pub fn verify_regions(t: &dyn IscsiTarget, regions: &[Region]) -> Result<()> {
    let cmds: Vec<String> = regions
        .iter()
        .map(|r| format!("read -P {:#04x} {} {}", r.pattern, r.offset, r.len))
        .collect();
    let out = qemu_io_checked(t, &cmds)?;
    let read = out.stdout.matches("read ").count();
    ensure!(
        read == regions.len(),
        "qemu-io reported {read} verified reads, expected {}:\n{}",
        regions.len(),
        out.describe()
    );
    Ok(())
}

/// A long-lived qemu-io session doing write+verify rounds with pauses, run on a thread while
/// a test abuses the target on other connections: a healthy target keeps serving it.
pub struct BackgroundIo {
    handle: JoinHandle<Result<ToolOutput>>,
    rounds: u32,
    describe: String,
}

/// Pause between background rounds.
const BACKGROUND_PAUSE_MS: u64 = 200;

/// Offset of the background session's scratch area (clear of [`WRITES`]).
const BACKGROUND_OFFSET: u64 = 100 * MIB;

impl BackgroundIo {
    /// Starts about `duration` worth of rounds (one qemu-io process = one iSCSI session).
    pub fn start(t: &dyn IscsiTarget, duration: Duration) -> Self {
        let per_round_ms = BACKGROUND_PAUSE_MS + 20;
        let rounds = u32::try_from(duration.as_millis() / u128::from(per_round_ms))
            .unwrap_or(u32::MAX)
            .max(1);
        let mut cmds = Vec::new();
        for i in 0..rounds {
            let pattern = (i % 250) + 1;
            let off = BACKGROUND_OFFSET + u64::from(i % 16) * 65536;
            cmds.push(format!("write -P {pattern} {off} 65536"));
            cmds.push(format!("read -P {pattern} {off} 65536"));
            cmds.push(format!("sleep {BACKGROUND_PAUSE_MS}"));
        }
        let url = t.url();
        let handle = std::thread::spawn(move || {
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            let mut args = vec!["-f", "raw"];
            for c in &refs {
                args.push("-c");
                args.push(c);
            }
            args.push(&url);
            crate::process::run_tool("qemu-io", &args, duration * 4 + Duration::from_secs(30))
        });
        Self {
            handle,
            rounds,
            describe: t.describe(),
        }
    }

    /// Waits for the session to finish and checks every round succeeded.
    pub fn finish(self) -> Result<()> {
        let out = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("background qemu-io thread panicked"))??;
        let reads = out.stdout.matches("read 65536/65536").count();
        if !out.success()
            || out.stdout.contains("Pattern verification failed")
            || reads != self.rounds as usize
        {
            bail!(
                "background qemu-io session on {} broke ({reads}/{} rounds verified):\n{}",
                self.describe,
                self.rounds,
                out.describe()
            );
        }
        Ok(())
    }
}

/// Runs `story` while a [`BackgroundIo`] session works on the same target; fails if either
/// fails. The session gets a head start so it is logged in before the story begins.
pub fn with_background_session(
    t: &dyn IscsiTarget,
    story: impl FnOnce(&dyn IscsiTarget) -> Result<String>,
) -> Result<String> {
    let bg = BackgroundIo::start(t, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1000));
    let story_result = story(t);
    let bg_result = bg.finish();
    let what = story_result?;
    bg_result?;
    Ok(what)
}

/// Wait for the target's reaction to a malformed PDU.
pub const REACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Log in on a raw socket and insist on success.
pub fn raw_login(t: &dyn IscsiTarget) -> Result<(RawSession, raw::LoginResult)> {
    let mut s = RawSession::connect(t.portal())?;
    let login = s.login(t.iqn()).context("raw login")?;
    ensure!(
        login.status_class == 0,
        "raw login to {} refused: class {:#04x} detail {:#04x}",
        t.describe(),
        login.status_class,
        login.status_detail
    );
    s.cmd_sn = login.exp_cmd_sn;
    Ok((s, login))
}

/// Garbage before login (an HTTP request where a Login Request belongs): the target must
/// refuse — a Login Response with a non-zero status class, a Reject, or closing the connection
/// (RFC 7143 §6.1: the first PDU of a connection is a Login Request). Silence is a failure:
/// a target that waits for the megabytes the garbage "announces" can be tied up by anyone.
pub fn garbage_before_login(t: &dyn IscsiTarget) -> Result<String> {
    let mut s = RawSession::connect(t.portal())?;
    let mut garbage =
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: sva-tests\r\n\r\n".to_vec();
    garbage.resize(128, b'x');
    if !s.try_send(&garbage)? {
        return Ok("closed while we were sending".into());
    }
    match s.recv(REACTION_TIMEOUT)? {
        Outcome::Closed => Ok("closed the connection".into()),
        Outcome::Pdu(p) if p.opcode() == opcode::LOGIN_RESPONSE && p.bhs[36] != 0 => {
            Ok(format!("login response class {:#04x}", p.bhs[36]))
        }
        Outcome::Pdu(p) if p.opcode() == opcode::REJECT => {
            Ok(format!("reject reason {:#04x}", p.reject_reason()))
        }
        Outcome::Pdu(p) => bail!(
            "{} answered garbage with opcode {:#04x} (bhs {:02x?})",
            t.describe(),
            p.opcode(),
            p.bhs
        ),
        Outcome::Silence => bail!(
            "{} neither refused nor closed within {REACTION_TIMEOUT:?} after garbage",
            t.describe()
        ),
    }
}

/// A reserved initiator opcode (0x0f; RFC 7143 §11.1.1) after login: Reject (reason
/// 0x04 protocol error or 0x05 command not supported, §11.17.1) and the session stays usable,
/// or the connection is closed.
pub fn bad_opcode(t: &dyn IscsiTarget) -> Result<String> {
    let (mut s, _) = raw_login(t)?;
    let itt = s.next_itt();
    let mut bhs = [0u8; raw::BHS_LEN];
    bhs[0] = raw::IMMEDIATE | 0x0f;
    bhs[1] = 0x80;
    bhs[16..20].copy_from_slice(&itt.to_be_bytes());
    bhs[24..28].copy_from_slice(&s.cmd_sn.to_be_bytes());
    bhs[28..32].copy_from_slice(&s.exp_stat_sn.to_be_bytes());
    if !s.try_send(&raw::encode(bhs, &[]))? {
        return Ok("closed while we were sending".into());
    }
    let (outcome, _) = s.recv_until(REACTION_TIMEOUT, |p| {
        p.opcode() == opcode::REJECT || p.itt() == itt
    })?;
    match outcome {
        Outcome::Closed => Ok("closed the connection".into()),
        Outcome::Pdu(p) if p.opcode() == opcode::REJECT => {
            let reason = p.reject_reason();
            ensure!(
                matches!(reason, 0x04 | 0x05),
                "reject reason {reason:#04x}, expected 0x04 or 0x05"
            );
            ensure!(
                s.ping(REACTION_TIMEOUT)?,
                "{}: session unusable after rejecting a bad opcode",
                t.describe()
            );
            Ok(format!(
                "reject reason {reason:#04x}, session still answers NOP"
            ))
        }
        Outcome::Pdu(p) => bail!("answered a bad opcode with opcode {:#04x}", p.opcode()),
        Outcome::Silence => bail!(
            "{} ignored a bad opcode for {REACTION_TIMEOUT:?} (expected Reject or close)",
            t.describe()
        ),
    }
}

/// A SCSI WRITE whose immediate data segment exceeds the target's declared
/// MaxRecvDataSegmentLength (RFC 7143 §13.12): a protocol error — Reject or close. Executing
/// the write (any SCSI Response) is a failure.
pub fn oversize_data_segment(t: &dyn IscsiTarget) -> Result<String> {
    let (mut s, login) = raw_login(t)?;
    let mrdsl = login.target_max_recv_data_segment_len();
    let len = (mrdsl / 512 + 8) * 512;
    let blocks = u16::try_from(len / 512).context("segment too large for WRITE(10)")?;
    // WRITE(10), LBA 0x30000 (clear of the pattern regions), `blocks` blocks.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&0x30000u32.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let itt = s.next_itt();
    let mut bhs = raw::scsi_command_bhs(itt, s.cmd_sn, s.exp_stat_sn, &cdb, false, true, len);
    // LUN field (single-level, peripheral addressing): sva-node's disk is LUN 0, tgt's LUN 1.
    bhs[9] = u8::try_from(t.lun()).unwrap_or(0);
    s.cmd_sn = s.cmd_sn.wrapping_add(1);
    let data = vec![0xeeu8; len as usize];
    if !s.try_send(&raw::encode(bhs, &data))? {
        return Ok(format!("closed while we sent {len} bytes (limit {mrdsl})"));
    }
    let (outcome, _) = s.recv_until(REACTION_TIMEOUT, |p| {
        p.opcode() == opcode::REJECT || p.itt() == itt
    })?;
    match outcome {
        Outcome::Closed => Ok(format!("closed the connection ({len} > {mrdsl})")),
        Outcome::Pdu(p) if p.opcode() == opcode::REJECT => {
            Ok(format!("reject reason {:#04x}", p.reject_reason()))
        }
        Outcome::Pdu(p) => bail!(
            "{} accepted a {len}-byte data segment (limit {mrdsl}): opcode {:#04x} status {:#04x}",
            t.describe(),
            p.opcode(),
            p.scsi_status()
        ),
        Outcome::Silence => bail!(
            "{} ignored a {len}-byte data segment (limit {mrdsl}) for {REACTION_TIMEOUT:?}",
            t.describe()
        ),
    }
}

/// TEST UNIT READY with a CmdSN far outside [ExpCmdSN, MaxCmdSN]: RFC 7143 §4.2.2.1 — the
/// target silently ignores it (a Reject or closing the connection is tolerated). It must not
/// execute it; afterwards a command with the right CmdSN must still be answered.
pub fn cmdsn_out_of_window(t: &dyn IscsiTarget) -> Result<String> {
    let (mut s, login) = raw_login(t)?;
    let tur = [0u8; 6];
    let lun = u8::try_from(t.lun()).unwrap_or(0);
    let bad_itt = s.next_itt();
    let bad_sn = login.max_cmd_sn.wrapping_add(1000);
    let mut bhs = raw::scsi_command_bhs(bad_itt, bad_sn, s.exp_stat_sn, &tur, false, false, 0);
    bhs[9] = lun;
    if !s.try_send(&raw::encode(bhs, &[]))? {
        return Ok("closed while we were sending".into());
    }
    let (outcome, _) = s.recv_until(Duration::from_secs(2), |p| {
        p.opcode() == opcode::REJECT || p.itt() == bad_itt
    })?;
    let first = match outcome {
        Outcome::Closed => return Ok("closed the connection".into()),
        Outcome::Pdu(p) if p.opcode() == opcode::REJECT => {
            format!("reject reason {:#04x}", p.reject_reason())
        }
        Outcome::Pdu(p) => bail!(
            "{} executed a command with CmdSN {bad_sn} outside [{}, {}]: opcode {:#04x}",
            t.describe(),
            login.exp_cmd_sn,
            login.max_cmd_sn,
            p.opcode()
        ),
        Outcome::Silence => "ignored".to_owned(),
    };
    let good_itt = s.next_itt();
    let mut bhs = raw::scsi_command_bhs(good_itt, s.cmd_sn, s.exp_stat_sn, &tur, false, false, 0);
    bhs[9] = lun;
    if !s.try_send(&raw::encode(bhs, &[]))? {
        return Ok(format!("{first}, then closed"));
    }
    let (outcome, _) = s.recv_until(REACTION_TIMEOUT, |p| p.itt() == good_itt)?;
    match outcome {
        Outcome::Pdu(p) if p.opcode() == opcode::SCSI_RESPONSE => Ok(format!(
            "{first}; in-window TEST UNIT READY answered (status {:#04x})",
            p.scsi_status()
        )),
        Outcome::Closed => Ok(format!("{first}, then closed")),
        other => bail!(
            "{}: in-window command after an out-of-window one not answered: {other:?}",
            t.describe()
        ),
    }
}

/// INQUIRY identity as printed by `iscsi-inq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    pub vendor: String,
    pub product: String,
    /// VPD 0x80 unit serial number, trimmed.
    pub serial: String,
    /// Raw `iscsi-inq` output of the standard page (TPGS etc.).
    pub standard: String,
}

/// Runs `iscsi-inq` for the standard page and VPD 0x80.
pub fn inquiry(t: &dyn IscsiTarget) -> Result<Inquiry> {
    let std_out = tools::iscsi_inq(&t.url(), &[])?;
    ensure!(
        std_out.success(),
        "iscsi-inq failed:\n{}",
        std_out.describe()
    );
    let field = |name: &str| {
        std_out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    let vendor = field("Vendor:").context("no Vendor: in iscsi-inq output")?;
    let product = field("Product:").context("no Product: in iscsi-inq output")?;
    // Page codes in decimal: iscsi-inq does not parse 0x80.
    let vpd = tools::iscsi_inq(&t.url(), &["-e", "1", "-c", "128"])?;
    ensure!(
        vpd.success(),
        "iscsi-inq VPD 0x80 failed:\n{}",
        vpd.describe()
    );
    let serial = vpd
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Unit Serial Number:["))
        .and_then(|v| v.strip_suffix(']'))
        .map(|v| v.trim().to_owned())
        .context(format!("no serial in:\n{}", vpd.describe()))?;
    Ok(Inquiry {
        vendor,
        product,
        serial,
        standard: std_out.stdout,
    })
}

/// `iscsi-ls -s` must list the target's IQN on its portal and the disk LUN as DIRECT_ACCESS.
pub fn discovery_lists_target(t: &dyn IscsiTarget) -> Result<String> {
    let out = tools::iscsi_ls(&t.portal_url())?;
    ensure!(out.success(), "iscsi-ls failed:\n{}", out.describe());
    let target_line = format!("Target:{} Portal:{}", t.iqn(), t.portal());
    ensure!(
        out.stdout.lines().any(|l| l.starts_with(&target_line)),
        "iscsi-ls does not list `{target_line}`:\n{}",
        out.describe()
    );
    let lun_line = format!("Lun:{}", t.lun());
    ensure!(
        out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with(&lun_line) && l.contains("DIRECT_ACCESS")),
        "iscsi-ls does not list {lun_line} as DIRECT_ACCESS:\n{}",
        out.describe()
    );
    Ok(out.stdout)
}
