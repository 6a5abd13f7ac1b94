//! Login phase state machine (RFC 7143 §6.3, §11.12, §11.13).
//!
//! ```text
//!  SecurityNegotiation (0) ──T=1,NSG=1──> LoginOperationalNegotiation (1) ──T=1,NSG=3──> FullFeature
//!            └──────────────────────────T=1,NSG=3─────────────────────────────────┘
//! ```
//! Each Login Request is answered by exactly one Login Response. A failure answers with
//! a status class/detail (§11.13.5) and the connection is closed afterwards. The TSIH of a
//! new session is chosen by the driver and given to [`Login::new`]; session reinstatement
//! (same InitiatorName + ISID, TSIH 0) is done by the driver when login completes.

use bytes::{Bytes, BytesMut};

use super::chap::{ChapError, ChapTarget, CHALLENGE_LEN};
use super::nego::{encode_text, is_login_key, parse_text, Negotiator, SessionParams};
use super::pdu::{Bhs, LoginReq, LoginResp, Pdu};
use super::TargetConfig;

/// Login status (class, detail), RFC 7143 §11.13.5.
pub mod status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTH_FAILURE: (u8, u8) = (2, 1);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (2, 9);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 0x0b);
}

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

/// Discovery or Normal session (RFC 7143 §13.21).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Everything the full feature phase needs from a completed login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub session_type: SessionType,
    pub params: SessionParams,
    /// ExpCmdSN at the start of the full feature phase (the login's CmdSN).
    pub exp_cmd_sn: u32,
    /// Next StatSN to send.
    pub stat_sn: u32,
}

/// What one Login Request led to.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this response and wait for the next request.
    Continue(Pdu),
    /// Send this response; the connection is now in full feature phase.
    Complete(Pdu, LoginResult),
    /// Send this (failure) response and close the connection.
    Fail(Pdu),
}

#[derive(Debug)]
enum Auth {
    /// No AuthMethod chosen yet.
    Start,
    /// CHAP chosen; waiting for CHAP_A.
    ChapChosen,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapChallenged,
    /// Authenticated (or no authentication needed).
    Done,
}

/// One connection's login.
#[derive(Debug)]
pub struct Login {
    tsih: u16,
    chap: ChapTarget,
    started: bool,
    stage: u8,
    isid: [u8; 6],
    initiator_name: Option<String>,
    target_name: Option<String>,
    session_type: SessionType,
    auth: Auth,
    nego: Negotiator,
    stat_sn: u32,
    exp_cmd_sn: u32,
    pending_text: BytesMut,
    tpgt_sent: bool,
    declared_in_operational: bool,
}

#[derive(Debug)]
struct Failure((u8, u8), String);

impl Login {
    /// `tsih` is the identifying handle this connection's new session gets; `chap_id` and
    /// `challenge` come from the driver's RNG (kept out of the sans-IO core).
    pub fn new(
        cfg: &TargetConfig,
        tsih: u16,
        chap_id: u8,
        challenge: [u8; CHALLENGE_LEN],
    ) -> Login {
        Login {
            tsih,
            chap: ChapTarget::new(chap_id, challenge),
            started: false,
            stage: STAGE_SECURITY,
            isid: [0; 6],
            initiator_name: None,
            target_name: None,
            session_type: SessionType::Normal,
            auth: Auth::Start,
            nego: Negotiator::new(cfg.offer.clone()),
            stat_sn: 0,
            exp_cmd_sn: 0,
            pending_text: BytesMut::new(),
            tpgt_sent: false,
            declared_in_operational: false,
        }
    }

    fn response(
        &mut self,
        req: &LoginReq,
        cfg: &TargetConfig,
        st: (u8, u8),
        transit: Option<u8>,
        data: Bytes,
    ) -> Pdu {
        let stat_sn = self.stat_sn;
        if st == status::SUCCESS {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        let final_ = transit == Some(STAGE_FULL_FEATURE);
        Pdu::new(
            Bhs::LoginResp(LoginResp {
                transit: transit.is_some(),
                cont: false,
                csg: if st == status::SUCCESS {
                    self.stage
                } else {
                    req.csg & 3
                },
                nsg: transit.unwrap_or(0),
                version_max: 0,
                version_active: 0,
                isid: req.isid,
                tsih: if final_ { self.tsih } else { req.tsih },
                itt: req.itt,
                stat_sn,
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self
                    .exp_cmd_sn
                    .wrapping_add(cfg.limits.cmds_max.saturating_sub(1)),
                status_class: st.0,
                status_detail: st.1,
            }),
            data,
        )
    }

    /// Handle one Login Request.
    pub fn handle(&mut self, cfg: &TargetConfig, req: &LoginReq, data: &[u8]) -> LoginStep {
        if !self.started {
            self.started = true;
            self.isid = req.isid;
            self.stat_sn = req.exp_stat_sn;
            self.exp_cmd_sn = req.cmd_sn;
        }
        match self.step(cfg, req, data) {
            Ok(step) => step,
            Err(Failure(st, why)) => {
                tracing::info!(initiator = ?self.initiator_name, %why, "login failed {:02x}/{:02x}", st.0, st.1);
                LoginStep::Fail(self.response(req, cfg, st, None, Bytes::new()))
            }
        }
    }

    fn step(
        &mut self,
        cfg: &TargetConfig,
        req: &LoginReq,
        data: &[u8],
    ) -> Result<LoginStep, Failure> {
        let fail = |st, why: &str| Err(Failure(st, why.to_string()));
        // RFC 7143 §11.12.4: we speak version 0 only.
        if req.version_min > 0 {
            return fail(status::UNSUPPORTED_VERSION, "version");
        }
        if req.isid != self.isid {
            return fail(status::INITIATOR_ERROR, "ISID changed during login");
        }
        if req.tsih != 0 {
            // Adding a connection to an existing session needs MaxConnections > 1.
            return fail(
                status::SESSION_DOES_NOT_EXIST,
                "TSIH given: multiple connections unsupported",
            );
        }
        if req.csg == STAGE_FULL_FEATURE || req.csg == 2 || req.csg < self.stage {
            return fail(status::INITIATOR_ERROR, "bad CSG");
        }
        let skipped_security = req.csg == STAGE_OPERATIONAL && self.stage == STAGE_SECURITY;
        if skipped_security {
            self.stage = STAGE_OPERATIONAL;
        }
        if self.pending_text.len() + data.len() > cfg.limits.login_text_bytes_max {
            return fail(status::INITIATOR_ERROR, "login text too long");
        }
        self.pending_text.extend_from_slice(data);
        if req.cont {
            // RFC 7143 §6.3: answer a continued request with an empty response.
            let r = self.response(req, cfg, status::SUCCESS, None, Bytes::new());
            return Ok(LoginStep::Continue(r));
        }
        let text = std::mem::take(&mut self.pending_text);
        let pairs =
            parse_text(&text).map_err(|e| Failure(status::INITIATOR_ERROR, e.to_string()))?;

        let mut reply: Vec<(String, String)> = Vec::new();
        let mut chap_keys: Vec<(String, String)> = Vec::new();
        let mut auth_method: Option<String> = None;
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" => self.initiator_name = Some(v.clone()),
                "TargetName" => self.target_name = Some(v.clone()),
                "SessionType" => {
                    self.session_type = match v.as_str() {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return fail(status::SESSION_TYPE_NOT_SUPPORTED, "SessionType"),
                    }
                }
                "InitiatorAlias" => {}
                "AuthMethod" => {
                    if self.stage != STAGE_SECURITY {
                        return fail(status::INITIATOR_ERROR, "AuthMethod outside security stage");
                    }
                    auth_method = Some(v.clone());
                }
                _ if k.starts_with("CHAP_") => chap_keys.push((k.clone(), v.clone())),
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                    // Target-declared keys the initiator must not send (§13.7-§13.9).
                    reply.push((k.clone(), "Irrelevant".into()));
                }
                _ => {
                    debug_assert!(!is_login_key(k));
                    let r = self
                        .nego
                        .negotiate(k, v)
                        .map_err(|e| Failure(status::INITIATOR_ERROR, e.to_string()))?;
                    reply.extend(r);
                }
            }
        }

        // The first request names the initiator and the target (§6.3: first Login Request).
        let Some(initiator) = self.initiator_name.clone() else {
            return fail(status::MISSING_PARAMETER, "InitiatorName");
        };
        if self.session_type == SessionType::Normal {
            match &self.target_name {
                None => return fail(status::MISSING_PARAMETER, "TargetName"),
                Some(t) if *t != cfg.iqn => return fail(status::NOT_FOUND, "unknown TargetName"),
                Some(_) => {}
            }
            if !cfg.allowed_initiators.is_empty() && !cfg.allowed_initiators.contains(&initiator) {
                return fail(
                    status::AUTHORIZATION_FAILURE,
                    "initiator not in allowedInitiators",
                );
            }
            if !self.tpgt_sent {
                // §13.9: the target returns its TPGT in the first Login Response.
                self.tpgt_sent = true;
                reply.push((
                    "TargetPortalGroupTag".into(),
                    cfg.portal_group_tag.to_string(),
                ));
                if let Some(a) = &cfg.alias {
                    reply.push(("TargetAlias".into(), a.clone()));
                }
            }
        }

        let auth_required = self.started_normal_auth_required(cfg);
        if skipped_security && auth_required && !matches!(self.auth, Auth::Done) {
            // Skipping security is allowed only when no authentication is required.
            return fail(status::AUTH_FAILURE, "security stage skipped");
        }
        if let Some(m) = auth_method {
            let offered: Vec<&str> = m.split(',').collect();
            if auth_required {
                if !offered.contains(&"CHAP") {
                    return fail(status::AUTH_FAILURE, "CHAP required but not offered");
                }
                reply.push(("AuthMethod".into(), "CHAP".into()));
                self.auth = Auth::ChapChosen;
            } else if offered.contains(&"None") {
                reply.push(("AuthMethod".into(), "None".into()));
                self.auth = Auth::Done;
            } else {
                return fail(status::AUTH_FAILURE, "no acceptable AuthMethod");
            }
        }
        if !chap_keys.is_empty() {
            let get = |k: &str| {
                chap_keys
                    .iter()
                    .find(|(x, _)| x == k)
                    .map(|(_, v)| v.as_str())
            };
            let auth_err = |e: ChapError| Failure(status::AUTH_FAILURE, e.to_string());
            match self.auth {
                Auth::ChapChosen => {
                    let a = get("CHAP_A")
                        .ok_or(Failure(status::AUTH_FAILURE, "CHAP_A missing".into()))?;
                    reply.extend(self.chap.on_algorithms(a).map_err(auth_err)?);
                    self.auth = Auth::ChapChallenged;
                }
                Auth::ChapChallenged => {
                    let Some(c) = &cfg.chap else {
                        return fail(status::AUTH_FAILURE, "CHAP not configured");
                    };
                    let r = self
                        .chap
                        .on_response(
                            c,
                            get("CHAP_N"),
                            get("CHAP_R"),
                            get("CHAP_I"),
                            get("CHAP_C"),
                        )
                        .map_err(auth_err)?;
                    reply.extend(r);
                    self.auth = Auth::Done;
                }
                _ => return fail(status::AUTH_FAILURE, "unexpected CHAP keys"),
            }
        }
        if !auth_required && matches!(self.auth, Auth::Start) {
            self.auth = Auth::Done;
        }

        // Transit (§6.3): only when asked, and only when our side is done.
        let mut transit = None;
        if req.transit {
            let nsg = req.nsg;
            if (nsg != STAGE_OPERATIONAL && nsg != STAGE_FULL_FEATURE) || nsg <= self.stage {
                return fail(status::INITIATOR_ERROR, "bad NSG");
            }
            if self.stage == STAGE_SECURITY && !matches!(self.auth, Auth::Done) {
                if matches!(self.auth, Auth::Start) {
                    return fail(status::AUTH_FAILURE, "authentication required");
                }
                // Authentication in progress: stay in the security stage (T=0).
            } else {
                transit = Some(nsg);
            }
        }
        if self.stage == STAGE_OPERATIONAL && transit == Some(STAGE_FULL_FEATURE) {
            reply.extend(self.nego.closing_declarations());
            self.declared_in_operational = true;
        }
        let data = encode_text(&reply);
        match transit {
            Some(STAGE_FULL_FEATURE) => {
                let resp = self.response(req, cfg, status::SUCCESS, transit, data);
                let mut params = self.nego.params.clone();
                if !self.declared_in_operational {
                    // We never declared ours, so the initiator assumes the default (§13.12).
                    params.target_max_recv_dsl = 8192;
                }
                Ok(LoginStep::Complete(
                    resp,
                    LoginResult {
                        initiator_name: initiator,
                        isid: self.isid,
                        tsih: self.tsih,
                        session_type: self.session_type,
                        params,
                        exp_cmd_sn: self.exp_cmd_sn,
                        stat_sn: self.stat_sn,
                    },
                ))
            }
            Some(nsg) => {
                let resp = self.response(req, cfg, status::SUCCESS, transit, data);
                self.stage = nsg;
                Ok(LoginStep::Continue(resp))
            }
            None => Ok(LoginStep::Continue(self.response(
                req,
                cfg,
                status::SUCCESS,
                None,
                data,
            ))),
        }
    }

    fn started_normal_auth_required(&self, cfg: &TargetConfig) -> bool {
        cfg.chap.is_some() && self.session_type == SessionType::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::chap::{chap_md5, ChapConfig};

    const IQN: &str = "iqn.2024-01.io.sva:vol1";

    fn req(csg: u8, nsg: u8, transit: bool) -> LoginReq {
        LoginReq {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 10,
            exp_stat_sn: 100,
        }
    }

    fn resp_of(step: &LoginStep) -> (&LoginResp, Vec<(String, String)>) {
        let pdu = match step {
            LoginStep::Continue(p) | LoginStep::Complete(p, _) | LoginStep::Fail(p) => p,
        };
        let Bhs::LoginResp(r) = &pdu.bhs else {
            panic!("not a login response")
        };
        (r, parse_text(&pdu.data).unwrap())
    }

    fn get<'a>(kv: &'a [(String, String)], k: &str) -> Option<&'a str> {
        kv.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn no_auth_login_straight_to_full_feature() {
        let cfg = TargetConfig::new(IQN, "127.0.0.1:3260,1");
        let mut l = Login::new(&cfg, 5, 1, [0; 16]);
        let s = l.handle(
            &cfg,
            &req(0, 1, true),
            b"InitiatorName=iqn.x:i\0TargetName=iqn.2024-01.io.sva:vol1\0SessionType=Normal\0AuthMethod=None\0",
        );
        let (r, kv) = resp_of(&s);
        assert!(r.transit && r.csg == 0 && r.nsg == 1 && r.status_class == 0 && r.stat_sn == 100);
        assert_eq!(get(&kv, "AuthMethod"), Some("None"));
        assert_eq!(get(&kv, "TargetPortalGroupTag"), Some("1"));
        let s = l.handle(
            &cfg,
            &req(1, 3, true),
            b"MaxRecvDataSegmentLength=65536\0ImmediateData=Yes\0",
        );
        let LoginStep::Complete(p, res) = s else {
            panic!("expected completion")
        };
        let Bhs::LoginResp(r) = &p.bhs else { panic!() };
        assert_eq!((r.tsih, r.stat_sn, r.exp_cmd_sn, r.nsg), (5, 101, 10, 3));
        assert_eq!(res.params.initiator_max_recv_dsl, 65536);
        assert_eq!(res.params.target_max_recv_dsl, 262_144);
        assert_eq!(res.stat_sn, 102);
    }

    #[test]
    fn failures_carry_status_detail() {
        let cfg = TargetConfig {
            allowed_initiators: vec!["iqn.ok:i".into()],
            ..TargetConfig::new(IQN, "127.0.0.1:3260,1")
        };
        let cases: [(&[u8], (u8, u8)); 4] = [
            (
                b"TargetName=iqn.2024-01.io.sva:vol1\0",
                status::MISSING_PARAMETER,
            ),
            (
                b"InitiatorName=iqn.ok:i\0TargetName=iqn.other:t\0",
                status::NOT_FOUND,
            ),
            (b"InitiatorName=iqn.ok:i\0", status::MISSING_PARAMETER),
            (
                b"InitiatorName=iqn.bad:i\0TargetName=iqn.2024-01.io.sva:vol1\0",
                status::AUTHORIZATION_FAILURE,
            ),
        ];
        for (text, st) in cases {
            let mut l = Login::new(&cfg, 5, 1, [0; 16]);
            let s = l.handle(&cfg, &req(0, 1, true), text);
            assert!(matches!(s, LoginStep::Fail(_)));
            let (r, _) = resp_of(&s);
            assert_eq!((r.status_class, r.status_detail), st);
        }
        // Discovery needs no TargetName and ignores the ACL.
        let mut l = Login::new(&cfg, 5, 1, [0; 16]);
        let s = l.handle(
            &cfg,
            &req(1, 3, true),
            b"InitiatorName=iqn.bad:i\0SessionType=Discovery\0",
        );
        assert!(
            matches!(s, LoginStep::Complete(_, ref r) if r.session_type == SessionType::Discovery)
        );
    }

    #[test]
    fn mutual_chap_login() {
        let cfg = TargetConfig {
            chap: Some(ChapConfig {
                username: "u".into(),
                secret: "0123456789ab".into(),
                mutual_username: Some("t".into()),
                mutual_secret: Some("ba9876543210".into()),
            }),
            ..TargetConfig::new(IQN, "127.0.0.1:3260,1")
        };
        let mut l = Login::new(&cfg, 9, 42, [7; 16]);
        let s = l.handle(
            &cfg,
            &req(0, 1, true),
            b"InitiatorName=iqn.x:i\0TargetName=iqn.2024-01.io.sva:vol1\0AuthMethod=CHAP,None\0",
        );
        let (r, kv) = resp_of(&s);
        assert!(
            !r.transit,
            "must stay in security stage while authenticating"
        );
        assert_eq!(get(&kv, "AuthMethod"), Some("CHAP"));
        let s = l.handle(&cfg, &req(0, 1, true), b"CHAP_A=5\0");
        let (_, kv) = resp_of(&s);
        assert_eq!(get(&kv, "CHAP_I"), Some("42"));
        let c = crate::iscsi::chap::decode_binary(get(&kv, "CHAP_C").unwrap()).unwrap();
        let resp = hex::encode(chap_md5(42, b"0123456789ab", &c));
        let text = format!("CHAP_N=u\0CHAP_R=0x{resp}\0CHAP_I=3\0CHAP_C=0x0a0b0c\0");
        let s = l.handle(&cfg, &req(0, 1, true), text.as_bytes());
        let (r, kv) = resp_of(&s);
        assert!(r.transit && r.status_class == 0);
        let want = hex::encode(chap_md5(3, b"ba9876543210", &[10, 11, 12]));
        assert_eq!(get(&kv, "CHAP_R"), Some(format!("0x{want}").as_str()));

        // A wrong response fails 02/01; skipping security fails too.
        let mut l = Login::new(&cfg, 9, 42, [7; 16]);
        l.handle(
            &cfg,
            &req(0, 1, true),
            b"InitiatorName=iqn.x:i\0TargetName=iqn.2024-01.io.sva:vol1\0AuthMethod=CHAP\0",
        );
        l.handle(&cfg, &req(0, 1, true), b"CHAP_A=5\0");
        let s = l.handle(&cfg, &req(0, 1, true), b"CHAP_N=u\0CHAP_R=0x00\0");
        assert_eq!(resp_of(&s).0.status_detail, 1);
        let mut l = Login::new(&cfg, 9, 42, [7; 16]);
        let s = l.handle(
            &cfg,
            &req(1, 3, true),
            b"InitiatorName=iqn.x:i\0TargetName=iqn.2024-01.io.sva:vol1\0",
        );
        assert!(matches!(s, LoginStep::Fail(_)));
        assert_eq!(resp_of(&s).0.status_detail, 1);
    }
}
