//! Fuzz the PDU framing/decoder and feed whatever decodes into a logged-in session.
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sva_node::iscsi::pdu::{self, Digests};
use sva_node::iscsi::session::Connection;
use sva_node::iscsi::TargetConfig;

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let digests = Digests { header: flags & 1 != 0, data: flags & 2 != 0 };
    let mut buf = BytesMut::from(rest);
    let cfg = Arc::new(TargetConfig::new("iqn.2024-01.io.sva:fuzz", "127.0.0.1:3260,1"));
    let mut conn = Connection::new(cfg, 1, 1, [0; 16], Instant::now());
    loop {
        match pdu::decode(&mut buf, digests, 65536) {
            Ok(Some(p)) => {
                // Re-encoding a decoded PDU must decode to the same PDU.
                let mut again = BytesMut::new();
                pdu::encode(&p, digests, &mut again);
                let back = pdu::decode(&mut again, digests, 1 << 24).ok().flatten();
                assert_eq!(back.as_ref(), Some(&p));
                conn.handle_pdu(p, Instant::now());
                while conn.poll_transmit().is_some() {}
                while conn.poll_event().is_some() {}
            }
            Ok(None) | Err(_) => break,
        }
    }
});
