//! Fuzz key=value text parsing and the login state machine with arbitrary login text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sva_node::iscsi::login::{Login, LoginStep};
use sva_node::iscsi::nego::{parse_text, Negotiator, TargetOffer};
use sva_node::iscsi::pdu::LoginReq;
use sva_node::iscsi::TargetConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = parse_text(data) {
        let mut n = Negotiator::new(TargetOffer::default());
        for (k, v) in &pairs {
            let _ = n.negotiate(k, v);
        }
        assert!(n.params.first_burst_len <= n.params.max_burst_len);
    }
    let cfg = TargetConfig::new("iqn.2024-01.io.sva:fuzz", "127.0.0.1:3260,1");
    let mut login = Login::new(&cfg, 1, 1, [0; 16]);
    for (i, chunk) in data.split(|b| *b == 0xff).enumerate().take(8) {
        let req = LoginReq {
            transit: i % 2 == 0,
            cont: false,
            csg: (i % 2) as u8,
            nsg: if i % 2 == 0 { 1 } else { 3 },
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        if let LoginStep::Fail(_) | LoginStep::Complete(..) = login.handle(&cfg, &req, chunk) {
            break;
        }
    }
});
