//! Replication messages (DESIGN.md §10): the link's frame decoder (`mirror::msg::decode`)
//! over a byte stream, and the replicated-op and response codecs (`mirror::op`) over the
//! same bytes. Nothing may panic. A frame that decodes must encode back to a frame that
//! decodes to the same message, both through `encode` and through `encode_split` (the
//! resync path that sends a copy's payload from its own buffer). A decoded op must encode
//! to bytes that decode and encode again to the same bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use sva_node::mirror::msg;
use sva_node::mirror::op::{self, ReplicatedOp};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match msg::decode(&mut buf) {
            Ok(Some(m)) => {
                let mut again = BytesMut::new();
                msg::encode(&m, &mut again);
                assert_eq!(msg::decode(&mut again), Ok(Some(m.clone())));
                assert!(again.is_empty());
                let mut split = BytesMut::new();
                if let Some(payload) = msg::encode_split(&m, &mut split) {
                    split.extend_from_slice(&payload);
                }
                assert_eq!(msg::decode(&mut split), Ok(Some(m)));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) must consume nothing");
                break;
            }
            Err(_) => break,
        }
    }
    if let Ok(op) = ReplicatedOp::decode(Bytes::copy_from_slice(data)) {
        let once = op.encode();
        let twice = ReplicatedOp::decode(once.clone()).map(|o| o.encode());
        assert_eq!(twice, Ok(once));
    }
    let _ = op::decode_response(Bytes::copy_from_slice(data));
});
