//! Fuzz the PDU framing/decoder (BHS, AHS, header and data digests) and feed whatever
//! decodes, and any decode error, into a fresh connection (login phase).
//! Input: byte 0 bit 0 = HeaderDigest, bit 1 = DataDigest; the rest is the byte stream.
#![no_main]

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sva_node::iscsi::pdu::{self, Digests};
use sva_node::iscsi::session::Connection;
use sva_node::iscsi::TargetConfig;

/// MaxRecvDataSegmentLength the decoder enforces here.
const DATA_LEN_MAX: u32 = 65_536;

fuzz_target!(|data: &[u8]| {
    let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let digests = Digests {
        header: flags & 1 != 0,
        data: flags & 2 != 0,
    };
    let mut buf = BytesMut::from(rest);
    let cfg = Arc::new(TargetConfig::new(
        "iqn.2024-01.io.sva:fuzz",
        "127.0.0.1:3260,1",
    ));
    let mut conn = Connection::new(cfg, 1, 1, [0; 16], Instant::now());
    loop {
        let before = buf.len();
        let frame = pdu::frame_len(&buf, digests, DATA_LEN_MAX);
        match pdu::decode(&mut buf, digests, DATA_LEN_MAX) {
            Ok(Some(p)) => {
                assert_eq!(frame, Ok(Some(before - buf.len())), "frame_len disagrees");
                // Re-encoding a decoded PDU must decode to the same PDU.
                let mut again = BytesMut::new();
                pdu::encode(&p, digests, &mut again);
                let back = pdu::decode(&mut again, digests, 1 << 24);
                assert_eq!(back, Ok(Some(p.clone())));
                assert!(again.is_empty());
                conn.handle_pdu(p, Instant::now());
                while conn.poll_transmit().is_some() {}
                while conn.poll_event().is_some() {}
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) must consume nothing");
                break;
            }
            Err(e) => {
                conn.handle_decode_error(e);
                break;
            }
        }
    }
});
