//! One iSCSI connection (and, with MaxConnections=1, its session) as a sans-IO state
//! machine: PDUs, SCSI completions and the clock go in; PDUs to send and [`Event`]s for
//! the driver come out (`poll_transmit`, `poll_event`, `poll_timeout`).
//!
//! ```text
//!  handle_pdu ──> login.rs ──Complete──> full feature phase
//!                                         │ SCSI Command: task (collect immediate,
//!                                         │   unsolicited and R2T-solicited Data-Out)
//!                                         │ CmdSN order + data complete ──> Event::Execute
//!  command_complete(itt, ScsiResponse) ──>│ Data-In PDUs / SCSI Response (residuals, sense)
//!  tmf_complete(itt, TmfResponse) ───────>│ TMF Response once the aborted tasks are gone
//! ```
//! Errors never panic: a bad PDU is rejected (RFC 7143 §11.17) or ends this connection.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use super::budget::{WriteBudget, WriteReservation};
use super::chap::CHALLENGE_LEN;
use super::login::{Login, LoginResult, LoginStep, SessionType};
use super::nego::{encode_text, parse_text};
use super::pdu::{
    reject_reason, Bhs, DataIn, DataOut, Digests, LogoutReq, LogoutResp, NopIn, NopOut, Pdu,
    PduError, R2t, Reject, ScsiCmd, ScsiResp, TextReq, TextResp, TmfReq, TmfResp, BHS_LEN,
    RESERVED_TAG,
};
use super::TargetConfig;
use crate::scsi::{
    NexusId, ScsiCommand, ScsiError, ScsiResponse, ScsiStatus, TaskAttr, TaskManagement,
    TmfResponse,
};

/// MaxRecvDataSegmentLength during login (RFC 7143 §13.12: the default until declared).
pub const LOGIN_MAX_RECV_DSL: u32 = 8192;

/// Something the driver must do.
#[derive(Debug, Clone)]
pub enum Event {
    /// A Normal session reached full feature phase. The driver reinstates any older
    /// session of the same initiator port (RFC 7143 §6.3.5) and then calls
    /// `ScsiTarget::nexus_added`.
    LoggedIn { nexus: NexusId, tsih: u16 },
    /// Run this command on the SCSI target and report back with `command_complete`.
    Execute {
        nexus: NexusId,
        itt: u32,
        cmd: ScsiCommand,
    },
    /// Run this task management function and report back with `tmf_complete`.
    TaskManagement {
        nexus: NexusId,
        itt: u32,
        lun: u64,
        tmf: TaskManagement,
    },
}

/// RFC 1982 serial number comparison, as RFC 7143 §4.2.2.1 requires for sequence numbers.
pub fn serial_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

#[derive(Debug)]
enum TaskState {
    /// Waiting for Data-Out and/or for its turn in CmdSN order.
    Collecting,
    /// Handed to the SCSI target.
    Executing,
}

#[derive(Debug)]
struct R2tState {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: u32,
}

#[derive(Debug)]
struct Task {
    lun: u64,
    read: bool,
    write: bool,
    attr: TaskAttr,
    edtl: u32,
    cdb: Bytes,
    state: TaskState,
    /// Released by CmdSN ordering (immediate commands are at once).
    ordered: bool,
    /// Suppress the response (aborted by a TMF).
    aborted: bool,
    data: BytesMut,
    /// End of the unsolicited range (immediate data + unsolicited Data-Out).
    unsolicited_end: u32,
    unsolicited_data_sn: u32,
    /// Start of data not yet asked for with an R2T.
    next_r2t_offset: u32,
    r2t_sn: u32,
    r2ts: Vec<R2tState>,
    /// Room for the solicited data in the process-wide write budget, taken before the
    /// first R2T and held until the task is gone.
    reservation: Option<WriteReservation>,
    /// The first R2T waits for room in the write budget.
    awaiting_budget: bool,
}

impl Task {
    fn received(&self) -> u32 {
        self.data.len() as u32
    }
    fn data_complete(&self) -> bool {
        !self.write || self.received() >= self.edtl
    }
}

#[derive(Debug)]
struct PendingTmf {
    itt: u32,
    waiting: HashSet<u32>,
    result: Option<TmfResponse>,
    /// Answer at once, without asking the target (e.g. only collecting tasks were hit).
    local: bool,
}

/// Non-immediate PDUs held back until their CmdSN is next (RFC 7143 §3.2.2.1).
#[derive(Debug)]
enum Deferred {
    Scsi(u32),
    Pdu(Pdu),
    /// A CmdSN an ABORT TASK declared received (RFC 7143 §11.5.1 b): nothing to run.
    Skip,
}

#[derive(Debug)]
struct FullFeature {
    login: LoginResult,
    nexus: NexusId,
    exp_cmd_sn: u32,
    /// Highest MaxCmdSN advertised so far.
    max_cmd_sn: Cell<u32>,
    deferred: HashMap<u32, Deferred>,
    tasks: HashMap<u32, Task>,
    tmfs: Vec<PendingTmf>,
    logout: Option<LogoutReq>,
}

impl FullFeature {
    /// (ExpCmdSN, MaxCmdSN). The window shrinks with the number of open tasks, but
    /// MaxCmdSN never moves back: an initiator ignores a smaller MaxCmdSN (RFC 7143
    /// §4.2.2.1), so a command it then sends inside the old window must still be taken.
    fn window(&self, cmds_max: u32) -> (u32, u32) {
        let open = (self.tasks.len() + self.deferred.len()) as u32;
        let room = cmds_max.saturating_sub(open);
        let want = self.exp_cmd_sn.wrapping_add(room).wrapping_sub(1);
        let adv = self.max_cmd_sn.get();
        let max = if serial_lt(adv, want) { want } else { adv };
        self.max_cmd_sn.set(max);
        (self.exp_cmd_sn, max)
    }
}

#[derive(Debug)]
enum Phase {
    Login(Box<Login>),
    Full(Box<FullFeature>),
    Closed,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    cfg: Arc<TargetConfig>,
    phase: Phase,
    digests: Digests,
    max_recv_dsl: u32,
    stat_sn: u32,
    next_ttt: u32,
    out: VecDeque<(Pdu, Digests)>,
    events: VecDeque<Event>,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    close_after_flush: bool,
    draining: bool,
    login_deadline: Instant,
    /// Process-wide bound on solicited write data; `None`: unbounded.
    write_budget: Option<Arc<WriteBudget>>,
}

impl Connection {
    /// A new connection in the login phase. `tsih`, `chap_id` and `challenge` come from the
    /// driver (TSIH allocator and RNG).
    pub fn new(
        cfg: Arc<TargetConfig>,
        tsih: u16,
        chap_id: u8,
        challenge: [u8; CHALLENGE_LEN],
        now: Instant,
    ) -> Self {
        let login = Login::new(&cfg, tsih, chap_id, challenge);
        let cfg_login_timeout = cfg.limits.login_timeout;
        Connection {
            cfg,
            phase: Phase::Login(Box::new(login)),
            digests: Digests::default(),
            max_recv_dsl: LOGIN_MAX_RECV_DSL,
            stat_sn: 0,
            next_ttt: 1,
            out: VecDeque::new(),
            events: VecDeque::new(),
            last_rx: now,
            ping: None,
            close_after_flush: false,
            draining: false,
            login_deadline: now + cfg_login_timeout,
            write_budget: None,
        }
    }

    /// Share the process-wide write budget (see [`WriteBudget`]); without one, R2Ts are
    /// sent without waiting.
    pub fn set_write_budget(&mut self, budget: Arc<WriteBudget>) {
        self.write_budget = Some(budget);
    }

    /// Some command's first R2T waits for room in the write budget: call
    /// [`Connection::retry_write_budget`] after a release.
    pub fn awaiting_write_budget(&self) -> bool {
        match &self.phase {
            Phase::Full(f) => f.tasks.values().any(|t| t.awaiting_budget),
            _ => false,
        }
    }

    /// Try again to send the R2Ts that waited for room in the write budget (in ITT order).
    pub fn retry_write_budget(&mut self) {
        let mut waiting: Vec<u32> = match &self.phase {
            Phase::Full(f) => f
                .tasks
                .iter()
                .filter(|(_, t)| t.awaiting_budget)
                .map(|(itt, _)| *itt)
                .collect(),
            _ => return,
        };
        waiting.sort_unstable();
        for itt in waiting {
            self.issue_r2ts(itt);
        }
    }

    /// Digests to decode the next incoming PDU with.
    pub fn digests(&self) -> Digests {
        self.digests
    }
    /// Largest data segment we accept (our declared MaxRecvDataSegmentLength).
    pub fn max_recv_data_segment_len(&self) -> u32 {
        self.max_recv_dsl
    }
    /// The next PDU to send and the digests to encode it with.
    pub fn poll_transmit(&mut self) -> Option<(Pdu, Digests)> {
        self.out.pop_front()
    }
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// The connection should be closed once everything from `poll_transmit` is sent.
    pub fn wants_close(&self) -> bool {
        self.close_after_flush || matches!(self.phase, Phase::Closed)
    }
    /// Tasks handed to the SCSI target and not completed yet.
    pub fn executing(&self) -> usize {
        match &self.phase {
            Phase::Full(f) => f
                .tasks
                .values()
                .filter(|t| matches!(t.state, TaskState::Executing))
                .count(),
            _ => 0,
        }
    }
    /// The I_T nexus, once in full feature phase of a Normal session.
    pub fn nexus(&self) -> Option<&NexusId> {
        match &self.phase {
            Phase::Full(f) if f.login.session_type == SessionType::Normal => Some(&f.nexus),
            _ => None,
        }
    }
    /// Stop taking new commands (graceful shutdown); close once executing tasks complete.
    pub fn begin_shutdown(&mut self) {
        self.draining = true;
        if self.executing() == 0 {
            self.close_after_flush = true;
        }
    }

    /// When `handle_timeout` should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Login(_) => return Some(self.login_deadline),
            Phase::Closed => return None,
            Phase::Full(_) => {}
        }
        Some(match self.ping {
            Some((_, sent)) => sent + self.cfg.limits.nop_in_timeout,
            None => self.last_rx + self.cfg.limits.nop_in_interval,
        })
    }

    /// Keepalive: ping an idle initiator with a NOP-In, drop it if it does not answer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Login(_)) && now >= self.login_deadline {
            tracing::info!("login not completed in time; closing connection");
            self.phase = Phase::Closed;
            return;
        }
        let Phase::Full(f) = &self.phase else { return };
        match self.ping {
            Some((_, sent)) if now.duration_since(sent) >= self.cfg.limits.nop_in_timeout => {
                tracing::warn!(initiator = %f.nexus.initiator_port, "NOP-In ping not answered; closing connection");
                self.phase = Phase::Closed;
            }
            None if now.duration_since(self.last_rx) >= self.cfg.limits.nop_in_interval => {
                let (exp, max) = self.window(f);
                let ttt = self.alloc_ttt();
                // RFC 7143 §11.19: a NOP-In with ITT reserved does not advance StatSN.
                let pdu = Pdu::new(
                    Bhs::NopIn(NopIn {
                        lun: 0,
                        itt: RESERVED_TAG,
                        ttt,
                        stat_sn: self.stat_sn,
                        exp_cmd_sn: exp,
                        max_cmd_sn: max,
                    }),
                    Bytes::new(),
                );
                self.send(pdu);
                self.ping = Some((ttt, now));
            }
            _ => {}
        }
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    fn send(&mut self, pdu: Pdu) {
        self.out.push_back((pdu, self.digests));
    }

    fn next_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    /// (ExpCmdSN, MaxCmdSN): the window shrinks with the number of open tasks, so the
    /// initiator never has more than `cmds_max` commands with us.
    fn window(&self, f: &FullFeature) -> (u32, u32) {
        f.window(self.cfg.limits.cmds_max)
    }

    fn reject(&mut self, reason: u8, bhs: &Bhs) {
        let raw: [u8; BHS_LEN] = bhs.to_bytes();
        let (exp, max) = match &self.phase {
            Phase::Full(f) => self.window(f),
            _ => (0, 0),
        };
        // RFC 7143 §11.17: Reject carries the next StatSN without advancing it.
        let pdu = Pdu::new(
            Bhs::Reject(Reject {
                reason,
                stat_sn: self.stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                data_sn: 0,
            }),
            Bytes::copy_from_slice(&raw),
        );
        self.send(pdu);
    }

    /// A framing error from the decoder. A data digest error is rejected and the PDU
    /// dropped (RFC 7143 §7.8); anything else ends the connection.
    pub fn handle_decode_error(&mut self, err: PduError) {
        match err {
            PduError::DataDigest { bhs } if matches!(self.phase, Phase::Full(_)) => {
                self.reject(reject_reason::DATA_DIGEST_ERROR, &Bhs::parse(&bhs));
            }
            e => {
                tracing::info!(error = %e, "closing connection on framing error");
                self.phase = Phase::Closed;
            }
        }
    }

    /// Feed one received PDU.
    pub fn handle_pdu(&mut self, pdu: Pdu, now: Instant) {
        self.last_rx = now;
        match &mut self.phase {
            Phase::Closed => {}
            Phase::Login(login) => {
                let Bhs::LoginReq(req) = &pdu.bhs else {
                    // RFC 7143 §6.3: anything but a Login Request before full feature
                    // phase is a protocol error; the connection is dropped.
                    tracing::info!("non-login PDU during login; closing connection");
                    self.phase = Phase::Closed;
                    return;
                };
                let req = req.clone();
                match login.handle(&self.cfg, &req, &pdu.data) {
                    LoginStep::Continue(p) => self.send(p),
                    LoginStep::Fail(p) => {
                        self.send(p);
                        self.close_after_flush = true;
                    }
                    LoginStep::Complete(p, res) => {
                        self.send(p);
                        self.enter_full_feature(res);
                    }
                }
            }
            Phase::Full(_) => self.handle_full(pdu),
        }
    }

    fn enter_full_feature(&mut self, res: LoginResult) {
        self.digests = Digests {
            header: res.params.header_digest,
            data: res.params.data_digest,
        };
        self.max_recv_dsl = res.params.target_max_recv_dsl;
        self.stat_sn = res.stat_sn;
        // SPC-4 TransportID for iSCSI: "<name>,i,0x<ISID>" (RFC 7143 §10.1 / SPC-4 §7.6.4.6).
        let nexus = NexusId {
            initiator_port: format!("{},i,0x{}", res.initiator_name, hex::encode(res.isid)),
            relative_target_port: self.cfg.relative_target_port,
        };
        if res.session_type == SessionType::Normal {
            self.events.push_back(Event::LoggedIn {
                nexus: nexus.clone(),
                tsih: res.tsih,
            });
        }
        tracing::info!(initiator = %nexus.initiator_port, tsih = res.tsih, kind = ?res.session_type, "login complete");
        self.phase = Phase::Full(Box::new(FullFeature {
            exp_cmd_sn: res.exp_cmd_sn,
            max_cmd_sn: Cell::new(
                res.exp_cmd_sn
                    .wrapping_add(self.cfg.limits.cmds_max)
                    .wrapping_sub(1),
            ),
            login: res,
            nexus,
            deferred: HashMap::new(),
            tasks: HashMap::new(),
            tmfs: Vec::new(),
            logout: None,
        }));
    }

    fn full(&mut self) -> Option<&mut FullFeature> {
        match &mut self.phase {
            Phase::Full(f) => Some(f),
            _ => None,
        }
    }

    /// CmdSN and immediate bit of the PDUs that carry one.
    fn cmd_sn_of(pdu: &Pdu) -> Option<(u32, bool)> {
        match &pdu.bhs {
            Bhs::ScsiCmd(h) => Some((h.cmd_sn, h.immediate)),
            Bhs::TmfReq(h) => Some((h.cmd_sn, h.immediate)),
            Bhs::TextReq(h) => Some((h.cmd_sn, h.immediate)),
            Bhs::LogoutReq(h) => Some((h.cmd_sn, h.immediate)),
            // A NOP-Out with reserved ITT carries no CmdSN of its own (§11.18).
            Bhs::NopOut(h) if h.itt != RESERVED_TAG => Some((h.cmd_sn, h.immediate)),
            _ => None,
        }
    }

    fn handle_full(&mut self, pdu: Pdu) {
        if self.draining {
            return;
        }
        let Some(f) = self.full() else { return };
        if f.logout.is_some() {
            self.reject(reject_reason::WAITING_FOR_LOGOUT, &pdu.bhs);
            return;
        }
        match &pdu.bhs {
            Bhs::DataOut(h) => {
                let h = h.clone();
                return self.data_out(&h, pdu.data);
            }
            Bhs::Snack(_) => return self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &pdu.bhs),
            Bhs::NopOut(h) if h.itt == RESERVED_TAG => {
                // An answer to our ping (TTT echoed), or a one-way ping: no reply (§11.18).
                if matches!(self.ping, Some((ttt, _)) if ttt == h.ttt) {
                    self.ping = None;
                }
                return;
            }
            Bhs::NopOut(_)
            | Bhs::ScsiCmd(_)
            | Bhs::TmfReq(_)
            | Bhs::TextReq(_)
            | Bhs::LogoutReq(_) => {}
            Bhs::LoginReq(_) => return self.reject(reject_reason::PROTOCOL_ERROR, &pdu.bhs),
            _ => return self.reject(reject_reason::COMMAND_NOT_SUPPORTED, &pdu.bhs),
        }
        let Some((cmd_sn, immediate)) = Self::cmd_sn_of(&pdu) else {
            return;
        };
        let cmds_max = self.cfg.limits.cmds_max;
        let Some(f) = self.full() else { return };
        let discovery = f.login.session_type == SessionType::Discovery;
        if discovery && matches!(pdu.bhs, Bhs::ScsiCmd(_) | Bhs::TmfReq(_)) {
            // RFC 7143 §6.3: a Discovery session carries only Text, NOP and Logout.
            return self.reject(reject_reason::PROTOCOL_ERROR, &pdu.bhs);
        }
        if immediate {
            // Immediate commands take no CmdSN; bound them separately (§11.17.1 reason 6).
            if f.tasks.len() >= 2 * cmds_max as usize {
                return self.reject(reject_reason::IMMEDIATE_COMMAND_REJECT, &pdu.bhs);
            }
            return self.dispatch(pdu, true);
        }
        let (exp, max) = f.window(cmds_max);
        if serial_lt(cmd_sn, exp) || serial_lt(max, cmd_sn) {
            // RFC 7143 §3.2.2.1: out-of-window non-immediate commands are silently ignored.
            tracing::debug!(cmd_sn, exp, max, "CmdSN outside the window; dropped");
            return;
        }
        if f.deferred.contains_key(&cmd_sn) {
            return;
        }
        if cmd_sn != exp {
            let d = match &pdu.bhs {
                Bhs::ScsiCmd(h) => Deferred::Scsi(h.itt),
                _ => Deferred::Pdu(pdu.clone()),
            };
            if let Bhs::ScsiCmd(_) = pdu.bhs {
                // The task exists now so that its unsolicited data can be collected.
                self.dispatch(pdu, false);
            }
            if let Some(f) = self.full() {
                f.deferred.insert(cmd_sn, d);
            }
            return;
        }
        if let Some(f) = self.full() {
            f.exp_cmd_sn = f.exp_cmd_sn.wrapping_add(1);
        }
        self.dispatch(pdu, true);
        self.drain_deferred();
    }

    fn drain_deferred(&mut self) {
        loop {
            let Some(f) = self.full() else { return };
            let Some(d) = f.deferred.remove(&f.exp_cmd_sn) else {
                return;
            };
            f.exp_cmd_sn = f.exp_cmd_sn.wrapping_add(1);
            match d {
                Deferred::Scsi(itt) => {
                    if let Some(t) = f.tasks.get_mut(&itt) {
                        t.ordered = true;
                    }
                    self.maybe_execute(itt);
                }
                Deferred::Pdu(p) => self.dispatch(p, true),
                Deferred::Skip => {}
            }
        }
    }

    /// Act on a PDU. `ordered`: its turn in CmdSN order has come (or it is immediate).
    fn dispatch(&mut self, pdu: Pdu, ordered: bool) {
        match pdu.bhs {
            Bhs::ScsiCmd(h) => self.scsi_command(h, pdu.ahs, pdu.data, ordered),
            Bhs::NopOut(h) => self.nop_out(h, pdu.data),
            Bhs::TmfReq(h) => self.tmf_request(h),
            Bhs::TextReq(h) => self.text_request(h, &pdu.data),
            Bhs::LogoutReq(h) => self.logout_request(h),
            _ => {}
        }
    }

    fn nop_out(&mut self, h: NopOut, data: Bytes) {
        let stat_sn = self.next_stat_sn();
        let Some(f) = self.full_ref() else { return };
        let (exp, max) = self.window(f);
        self.send(Pdu::new(
            Bhs::NopIn(NopIn {
                lun: h.lun,
                itt: h.itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
            }),
            data,
        ));
    }

    fn full_ref(&self) -> Option<&FullFeature> {
        match &self.phase {
            Phase::Full(f) => Some(f),
            _ => None,
        }
    }

    fn scsi_command(&mut self, h: ScsiCmd, ahs: Bytes, data: Bytes, ordered: bool) {
        let params_imm = self.full_ref().map(|f| f.login.params.clone());
        let Some(params) = params_imm else { return };
        let Some(f) = self.full() else { return };
        if f.tasks.contains_key(&h.itt) || h.itt == RESERVED_TAG {
            return self.reject(reject_reason::TASK_IN_PROGRESS, &Bhs::ScsiCmd(h));
        }
        let mut cdb = BytesMut::from(&h.cdb[..]);
        // RFC 7143 §11.3.6 / §10.2.2.3: extended CDB AHS (type 1): length, type, reserved, CDB bytes.
        let mut rest = &ahs[..];
        while rest.len() >= 4 {
            let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            let ty = rest[2];
            let total = (3 + len).div_ceil(4) * 4;
            let Some(body) = rest.get(3..3 + len) else {
                break;
            };
            if ty == 1 && len > 1 {
                cdb.extend_from_slice(&body[1..]);
            }
            rest = rest.get(total..).unwrap_or(&[]);
        }
        let attr = match h.attr {
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            _ => TaskAttr::Simple,
        };
        let write = h.write && h.edtl > 0;
        if (!data.is_empty() && (!write || !params.immediate_data))
            || data.len() as u32 > params.first_burst_len.min(h.edtl.max(1))
        {
            // Immediate data not negotiated, or more than FirstBurstLength / EDTL.
            return self.reject(reject_reason::PROTOCOL_ERROR, &Bhs::ScsiCmd(h));
        }
        let unsolicited_end = if write && !h.final_ && !params.initial_r2t {
            params.first_burst_len.min(h.edtl)
        } else {
            data.len() as u32
        };
        let task = Task {
            lun: h.lun,
            read: h.read,
            write,
            attr,
            edtl: h.edtl,
            cdb: cdb.freeze(),
            state: TaskState::Collecting,
            ordered,
            aborted: false,
            data: BytesMut::from(&data[..]),
            unsolicited_end,
            unsolicited_data_sn: 0,
            next_r2t_offset: unsolicited_end,
            r2t_sn: 0,
            r2ts: Vec::new(),
            reservation: None,
            awaiting_budget: false,
        };
        let Some(f) = self.full() else { return };
        f.tasks.insert(h.itt, task);
        if write && h.edtl > self.cfg.limits.write_bytes_max {
            // Refuse before buffering: report it as an invalid CDB length (SPC-4 §4.5).
            if let Some(t) = self.full().and_then(|f| f.tasks.get_mut(&h.itt)) {
                t.write = false;
                t.state = TaskState::Executing;
            }
            return self.command_complete(h.itt, ScsiError::invalid_field_in_cdb().to_response());
        }
        self.issue_r2ts(h.itt);
        self.maybe_execute(h.itt);
    }

    /// Solicit more Data-Out, up to MaxOutstandingR2T sequences of MaxBurstLength.
    fn issue_r2ts(&mut self, itt: u32) {
        loop {
            let Some(f) = self.full_ref() else { return };
            let p = &f.login.params;
            let (max_out, burst) = (p.max_outstanding_r2t as usize, p.max_burst_len);
            let Some(t) = f.tasks.get(&itt) else { return };
            // Solicited data follows the unsolicited burst, once that burst is in.
            if !t.write
                || t.next_r2t_offset >= t.edtl
                || t.r2ts.len() >= max_out
                || t.received() < t.unsolicited_end
            {
                return;
            }
            if t.reservation.is_none() {
                if let Some(budget) = &self.write_budget {
                    let budget = budget.clone();
                    let Some(t) = self.full().and_then(|f| f.tasks.get_mut(&itt)) else {
                        return;
                    };
                    let bytes = u64::from(t.edtl - t.next_r2t_offset);
                    match budget.try_reserve(bytes) {
                        Some(r) => {
                            t.reservation = Some(r);
                            t.awaiting_budget = false;
                        }
                        None => {
                            t.awaiting_budget = true;
                            return;
                        }
                    }
                    continue;
                }
            }
            let (exp, max) = self.window(f);
            let ttt = self.alloc_ttt();
            let stat_sn = self.stat_sn;
            let Some(t) = self.full().and_then(|f| f.tasks.get_mut(&itt)) else {
                return;
            };
            let offset = t.next_r2t_offset;
            let len = burst.min(t.edtl - offset);
            t.next_r2t_offset += len;
            let r2t_sn = t.r2t_sn;
            t.r2t_sn = t.r2t_sn.wrapping_add(1);
            t.r2ts.push(R2tState {
                ttt,
                offset,
                len,
                received: 0,
                next_data_sn: 0,
            });
            let lun = t.lun;
            self.send(Pdu::new(
                Bhs::R2t(R2t {
                    lun,
                    itt,
                    ttt,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: max,
                    r2t_sn,
                    buffer_offset: offset,
                    desired_len: len,
                }),
                Bytes::new(),
            ));
        }
    }

    fn data_out(&mut self, h: &DataOut, data: Bytes) {
        let Some(f) = self.full() else { return };
        let Some(t) = f.tasks.get_mut(&h.itt) else {
            // Late data of an aborted task: drop it (RFC 7143 §4.2.3.3).
            tracing::debug!(itt = h.itt, "Data-Out for unknown task dropped");
            return;
        };
        let len = data.len() as u32;
        // DataPDUInOrder=Yes and DataSequenceInOrder=Yes: data arrives at increasing offsets.
        let ok = matches!(t.state, TaskState::Collecting)
            && t.write
            && h.buffer_offset == t.received()
            && u64::from(h.buffer_offset) + u64::from(len) <= u64::from(t.edtl);
        let ok = ok
            && if h.ttt == RESERVED_TAG {
                let good = h.data_sn == t.unsolicited_data_sn
                    && h.buffer_offset + len <= t.unsolicited_end;
                t.unsolicited_data_sn = t.unsolicited_data_sn.wrapping_add(1);
                good
            } else {
                match t.r2ts.iter_mut().find(|r| r.ttt == h.ttt) {
                    Some(r)
                        if r.next_data_sn == h.data_sn
                            && h.buffer_offset + len <= r.offset + r.len =>
                    {
                        r.received += len;
                        r.next_data_sn += 1;
                        true
                    }
                    _ => false,
                }
            };
        if !ok {
            // RFC 7143 §7.12 (ERL 0): a sequence error in Data-Out is not recoverable here;
            // reject it so the initiator aborts the task.
            tracing::info!(
                itt = h.itt,
                offset = h.buffer_offset,
                data_sn = h.data_sn,
                "bad Data-Out rejected"
            );
            return self.reject(reject_reason::PROTOCOL_ERROR, &Bhs::DataOut(h.clone()));
        }
        t.data.extend_from_slice(&data);
        t.r2ts.retain(|r| r.received < r.len);
        self.issue_r2ts(h.itt);
        self.maybe_execute(h.itt);
    }

    fn maybe_execute(&mut self, itt: u32) {
        let Some(f) = self.full() else { return };
        let nexus = f.nexus.clone();
        let Some(t) = f.tasks.get_mut(&itt) else {
            return;
        };
        if !t.ordered || !matches!(t.state, TaskState::Collecting) || !t.data_complete() {
            return;
        }
        t.state = TaskState::Executing;
        let cmd = ScsiCommand {
            lun: t.lun,
            cdb: t.cdb.clone(),
            data_out: std::mem::take(&mut t.data).freeze(),
            expected_transfer_len: t.edtl,
            task_attr: t.attr,
            tag: itt,
        };
        self.events.push_back(Event::Execute { nexus, itt, cmd });
    }

    /// A command handed out with [`Event::Execute`] finished.
    pub fn command_complete(&mut self, itt: u32, resp: ScsiResponse) {
        let Some(f) = self.full() else { return };
        let Some(t) = f.tasks.remove(&itt) else {
            return;
        };
        if t.aborted {
            self.tmf_progress(Some(itt));
        } else {
            self.send_response(itt, &t, resp);
        }
        if self.draining && self.executing() == 0 {
            self.close_after_flush = true;
        }
        self.maybe_logout();
    }

    fn send_response(&mut self, itt: u32, t: &Task, resp: ScsiResponse) {
        let Some(f) = self.full_ref() else { return };
        let p = &f.login.params;
        let (pdu_max, burst) = (
            p.initiator_max_recv_dsl.max(512) as usize,
            p.max_burst_len.max(512) as usize,
        );
        let edtl = t.edtl as usize;
        // Residuals (RFC 7143 §11.4.5): against what the command wanted to transfer.
        // The LU tells how much a data-out command wanted (even when EDTL is 0 and the
        // task carries no write flag); otherwise compare the data-in produced.
        let want = match resp.data_out_len {
            Some(n) => Some(n as usize),
            None if t.write => None,
            None if t.read || edtl > 0 => Some(resp.data_in.len()),
            None => None,
        };
        let (over, under, residual) = match want {
            Some(w) if w > edtl => (true, false, (w - edtl).min(u32::MAX as usize) as u32),
            Some(w) if w < edtl => (false, true, (edtl - w) as u32),
            _ => (false, false, 0),
        };
        let data = resp.data_in.slice(..resp.data_in.len().min(edtl));
        let collapse = resp.sense.is_none() && !data.is_empty() && !t.write;
        let mut data_sn = 0u32;
        let mut offset = 0usize;
        while offset < data.len() {
            let burst_end = (offset / burst + 1) * burst;
            let end = (offset + pdu_max).min(data.len()).min(burst_end);
            let last = end == data.len();
            let with_status = last && collapse;
            let stat_sn = if with_status { self.next_stat_sn() } else { 0 };
            let Some(f) = self.full_ref() else { return };
            let (exp, max) = self.window(f);
            self.send(Pdu::new(
                Bhs::DataIn(DataIn {
                    final_: last || end == burst_end,
                    ack: false,
                    overflow: with_status && over,
                    underflow: with_status && under,
                    has_status: with_status,
                    status: if with_status { resp.status as u8 } else { 0 },
                    lun: t.lun,
                    itt,
                    ttt: RESERVED_TAG,
                    stat_sn,
                    exp_cmd_sn: exp,
                    max_cmd_sn: max,
                    data_sn,
                    buffer_offset: offset as u32,
                    residual: if with_status { residual } else { 0 },
                }),
                data.slice(offset..end),
            ));
            data_sn += 1;
            offset = end;
        }
        if collapse {
            return;
        }
        let sense = match &resp.sense {
            Some(s) if resp.status == ScsiStatus::CheckCondition => {
                // RFC 7143 §11.4.7.2: SenseLength (2 bytes) then the sense data.
                let mut b = BytesMut::with_capacity(2 + s.len());
                b.put_u16(s.len().min(u16::MAX as usize) as u16);
                b.put_slice(s);
                b.freeze()
            }
            _ => Bytes::new(),
        };
        let stat_sn = self.next_stat_sn();
        let Some(f) = self.full_ref() else { return };
        let (exp, max) = self.window(f);
        self.send(Pdu::new(
            Bhs::ScsiResp(ScsiResp {
                bidi_overflow: false,
                bidi_underflow: false,
                overflow: over,
                underflow: under,
                response: 0,
                status: resp.status as u8,
                itt,
                snack_tag: 0,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                exp_data_sn: data_sn,
                bidi_residual: 0,
                residual,
            }),
            sense,
        ));
    }

    fn tmf_request(&mut self, h: TmfReq) {
        let Some(f) = self.full() else { return };
        let nexus = f.nexus.clone();
        let (tmf, affected): (Option<TaskManagement>, Vec<u32>) = match h.function {
            1 => (
                Some(TaskManagement::AbortTask { tag: h.rtt }),
                f.tasks
                    .contains_key(&h.rtt)
                    .then_some(h.rtt)
                    .into_iter()
                    .collect(),
            ),
            2 | 4 | 5 => {
                let tmf = match h.function {
                    2 => TaskManagement::AbortTaskSet,
                    4 => TaskManagement::ClearTaskSet,
                    _ => TaskManagement::LogicalUnitReset,
                };
                (
                    Some(tmf),
                    f.tasks
                        .iter()
                        .filter(|(_, t)| t.lun == h.lun)
                        .map(|(k, _)| *k)
                        .collect(),
                )
            }
            3 => (Some(TaskManagement::ClearAca), Vec::new()),
            6 | 7 => (
                Some(if h.function == 6 {
                    TaskManagement::TargetWarmReset
                } else {
                    TaskManagement::TargetColdReset
                }),
                f.tasks.keys().copied().collect(),
            ),
            _ => (None, Vec::new()),
        };
        let Some(tmf) = tmf else {
            // 8 TASK REASSIGN needs ErrorRecoveryLevel 2: "not supported" (§11.6.1).
            let code = if h.function == 8 { 4 } else { 5 };
            return self.send_tmf_response(h.itt, code);
        };
        let mut waiting = HashSet::new();
        let mut executing_hit = false;
        for itt in &affected {
            if let Some(t) = f.tasks.get_mut(itt) {
                match t.state {
                    TaskState::Collecting => {
                        f.tasks.remove(itt);
                    }
                    TaskState::Executing => {
                        t.aborted = true;
                        executing_hit = true;
                        waiting.insert(*itt);
                    }
                }
            }
        }
        let local = match &tmf {
            TaskManagement::AbortTask { .. } if !executing_hit => {
                let code = if !affected.is_empty() {
                    TmfResponse::Complete
                } else if !serial_lt(h.ref_cmd_sn, f.exp_cmd_sn)
                    && !serial_lt(f.max_cmd_sn.get(), h.ref_cmd_sn)
                    && serial_lt(h.ref_cmd_sn, h.cmd_sn)
                    && !f.deferred.contains_key(&h.ref_cmd_sn)
                {
                    // RFC 7143 §11.5.1 b): the referenced command is in the valid CmdSN
                    // window [ExpCmdSN, MaxCmdSN] and before the TMF, but has not arrived
                    // (lost or still in flight): consider its CmdSN received, so that the
                    // command is dropped if it turns up, and report "Function complete".
                    f.deferred.insert(h.ref_cmd_sn, Deferred::Skip);
                    TmfResponse::Complete
                } else {
                    // §11.5.1 c): a command below ExpCmdSN was received and has already
                    // completed (its response is sent): "Task does not exist". Answering
                    // "Function complete" here would claim the task was aborted after the
                    // initiator already got its status (libiscsi AbortTaskSimpleAsync).
                    TmfResponse::TaskDoesNotExist
                };
                Some(code)
            }
            _ => None,
        };
        f.tmfs.push(PendingTmf {
            itt: h.itt,
            waiting,
            result: local,
            local: local.is_some(),
        });
        if local.is_none() {
            self.events.push_back(Event::TaskManagement {
                nexus,
                itt: h.itt,
                lun: h.lun,
                tmf,
            });
        }
        self.tmf_progress(None);
        // A CmdSN declared received above may be the next one expected.
        self.drain_deferred();
    }

    /// A task management function handed out with [`Event::TaskManagement`] finished.
    pub fn tmf_complete(&mut self, itt: u32, resp: TmfResponse) {
        let Some(f) = self.full() else { return };
        if let Some(t) = f.tmfs.iter_mut().find(|t| t.itt == itt && !t.local) {
            t.result = Some(resp);
        }
        self.tmf_progress(None);
    }

    /// Answer every TMF whose target result is in and whose affected tasks are gone
    /// (SAM-5 §7.1: the function completes after the tasks it aborts).
    fn tmf_progress(&mut self, finished_task: Option<u32>) {
        let Some(f) = self.full() else { return };
        if let Some(itt) = finished_task {
            for t in &mut f.tmfs {
                t.waiting.remove(&itt);
            }
        }
        let mut done = Vec::new();
        f.tmfs.retain(|t| match t.result {
            Some(r) if t.waiting.is_empty() => {
                done.push((t.itt, r));
                false
            }
            _ => true,
        });
        for (itt, r) in done {
            let code = match r {
                TmfResponse::Complete => 0,
                TmfResponse::TaskDoesNotExist => 1,
                TmfResponse::LunDoesNotExist => 2,
                TmfResponse::NotSupported => 5,
                TmfResponse::Rejected => 255,
            };
            self.send_tmf_response(itt, code);
        }
        self.maybe_logout();
    }

    fn send_tmf_response(&mut self, itt: u32, response: u8) {
        let stat_sn = self.next_stat_sn();
        let Some(f) = self.full_ref() else { return };
        let (exp, max) = self.window(f);
        self.send(Pdu::new(
            Bhs::TmfResp(TmfResp {
                response,
                itt,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
            }),
            Bytes::new(),
        ));
    }

    fn text_request(&mut self, h: TextReq, data: &[u8]) {
        let mut reply = Vec::new();
        match parse_text(data) {
            Ok(pairs) => {
                for (k, v) in pairs {
                    if k == "SendTargets" {
                        // RFC 7143 §13.3 / Appendix C: "All", our name, or empty (this target).
                        if v == "All" || v == self.cfg.iqn || v.is_empty() {
                            reply.push(("TargetName".to_string(), self.cfg.iqn.clone()));
                            for p in &self.cfg.send_targets {
                                reply.push(("TargetAddress".to_string(), p.clone()));
                            }
                        }
                    } else {
                        reply.push((k, "NotUnderstood".to_string()));
                    }
                }
            }
            Err(_) => return self.reject(reject_reason::PROTOCOL_ERROR, &Bhs::TextReq(h)),
        }
        let mut text = encode_text(&reply);
        let max = self
            .full_ref()
            .map(|f| f.login.params.initiator_max_recv_dsl)
            .unwrap_or(8192) as usize;
        // Text response continuation is not implemented; cut at the initiator's limit
        // on a pair boundary rather than send an oversized PDU.
        if text.len() > max {
            let cut = text[..max]
                .iter()
                .rposition(|b| *b == 0)
                .map(|i| i + 1)
                .unwrap_or(0);
            text = text.slice(..cut);
        }
        let stat_sn = self.next_stat_sn();
        let Some(f) = self.full_ref() else { return };
        let (exp, maxsn) = self.window(f);
        self.send(Pdu::new(
            Bhs::TextResp(TextResp {
                final_: true,
                cont: false,
                lun: h.lun,
                itt: h.itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: maxsn,
            }),
            text,
        ));
    }

    fn logout_request(&mut self, h: LogoutReq) {
        let Some(f) = self.full() else { return };
        if h.reason == 2 {
            // Connection recovery needs ErrorRecoveryLevel 2 (§11.15.1: response 2).
            return self.send_logout_response(h.itt, 2, false);
        }
        // Tasks still collecting data will never run; executing ones finish first.
        f.tasks
            .retain(|_, t| matches!(t.state, TaskState::Executing));
        f.logout = Some(h);
        self.maybe_logout();
    }

    fn maybe_logout(&mut self) {
        let Some(f) = self.full() else { return };
        if !f.tasks.is_empty() || !f.tmfs.is_empty() {
            return;
        }
        let Some(h) = f.logout.take() else { return };
        self.send_logout_response(h.itt, 0, true);
    }

    fn send_logout_response(&mut self, itt: u32, response: u8, close: bool) {
        let stat_sn = self.next_stat_sn();
        let Some(f) = self.full_ref() else { return };
        let (exp, max) = self.window(f);
        self.send(Pdu::new(
            Bhs::LogoutResp(LogoutResp {
                response,
                itt,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                time2wait: 0,
                time2retain: 0,
            }),
            Bytes::new(),
        ));
        if close {
            self.close_after_flush = true;
        }
    }
}

#[cfg(test)]
mod tests;
