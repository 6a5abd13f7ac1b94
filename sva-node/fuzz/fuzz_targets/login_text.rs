//! Fuzz key=value text parsing, operational negotiation, CHAP value decoding and the login
//! state machine (security → operational → full feature, continued requests, CHAP and
//! mutual CHAP) with arbitrary login requests.
//!
//! Input: byte 0 configures the target (bit 0 CHAP required, bit 1 mutual CHAP
//! configured, bit 2 initiator ACL); then up to `REQUESTS_MAX` requests separated by
//! 0xff, each a flags byte (T, C, CSG, NSG) and the login text. The placeholder value
//! `CHAP_R=@` is replaced by the correct CHAP response, so authentication can succeed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sva_node::iscsi::chap::{chap_md5, decode_binary, ChapConfig};
use sva_node::iscsi::login::{Login, LoginStep};
use sva_node::iscsi::nego::{parse_text, Negotiator, TargetOffer};
use sva_node::iscsi::pdu::{self, Bhs, Digests, LoginReq};
use sva_node::iscsi::TargetConfig;

/// Login requests per input.
const REQUESTS_MAX: usize = 16;
const CHAP_ID: u8 = 7;
const CHALLENGE: [u8; 16] = [0x42; 16];
const SECRET: &str = "fuzzsecret12";

/// Replace each `CHAP_R=@` with the response the target expects.
fn fill_chap_response(text: &[u8]) -> Vec<u8> {
    let good = format!(
        "CHAP_R=0x{}",
        hex::encode(chap_md5(CHAP_ID, SECRET.as_bytes(), &CHALLENGE))
    );
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if rest.starts_with(b"CHAP_R=@") {
            out.extend_from_slice(good.as_bytes());
            rest = &rest[8..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    if let Ok(pairs) = parse_text(data) {
        let mut n = Negotiator::new(TargetOffer::default());
        for (k, v) in &pairs {
            let _ = n.negotiate(k, v);
            let _ = decode_binary(v);
        }
        let _ = n.closing_declarations();
        assert!(n.params.first_burst_len <= n.params.max_burst_len);
    }
    let mut cfg = TargetConfig::new("iqn.2024-01.io.sva:fuzz", "127.0.0.1:3260,1");
    if sel & 1 != 0 {
        cfg.chap = Some(ChapConfig {
            username: "user".into(),
            secret: SECRET.into(),
            mutual_username: (sel & 2 != 0).then(|| "tgt".into()),
            mutual_secret: (sel & 2 != 0).then(|| "mutualsecret".into()),
        });
    }
    if sel & 4 != 0 {
        cfg.allowed_initiators = vec!["iqn.2024-01.io.fuzz:i".into()];
    }
    let mut login = Login::new(&cfg, 1, CHAP_ID, CHALLENGE);
    for (i, chunk) in data.split(|b| *b == 0xff).enumerate().take(REQUESTS_MAX) {
        let (flags, text) = chunk.split_first().unwrap_or((&0x87, &[]));
        let req = LoginReq {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 3,
            nsg: flags & 3,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: u16::from(flags & 0x20 != 0),
            itt: 1,
            cid: 0,
            cmd_sn: 1 + u32::from(flags & 0x10 != 0 && i > 0),
            exp_stat_sn: i as u32,
        };
        let step = login.handle(&cfg, &req, &fill_chap_response(text));
        let (LoginStep::Continue(p) | LoginStep::Fail(p) | LoginStep::Complete(p, _)) = &step;
        assert!(matches!(p.bhs, Bhs::LoginResp(_)));
        let mut wire = bytes::BytesMut::new();
        pdu::encode(p, Digests::default(), &mut wire);
        assert_eq!(
            pdu::decode(&mut wire, Digests::default(), 1 << 24),
            Ok(Some(p.clone()))
        );
        match step {
            LoginStep::Fail(_) => break,
            LoginStep::Complete(_, res) => {
                assert!(res.params.first_burst_len <= res.params.max_burst_len);
                break;
            }
            LoginStep::Continue(_) => {}
        }
    }
});
