//! Data integrity through a real initiator (QEMU's libiscsi block driver): pattern writes of
//! many sizes, verified byte for byte, and still there after the node restarts or crashes.

use sva_tests::scenarios::{verify_regions, write_regions, EXPECTED, WRITES};
use sva_tests::{have_tools, CacheMode, SvaNode, SvaNodeOptions};

#[test]
fn patterns_round_trip_and_survive_restart() {
    if !have_tools("patterns_round_trip_and_survive_restart", &["qemu-io"]) {
        return;
    }
    let mut node = SvaNode::start(SvaNodeOptions {
        cache_mode: CacheMode::WriteBack,
        ..SvaNodeOptions::default()
    })
    .expect("start sva-node");
    write_regions(&node, &WRITES).expect("write patterns");
    verify_regions(&node, &EXPECTED).expect("verify before restart");
    node.restart().expect("restart sva-node");
    verify_regions(&node, &EXPECTED).expect("verify after restart");
}

/// Write-through: every acknowledged write is on disk, so SIGKILL right after the initiator
/// disconnects loses nothing.
#[test]
fn patterns_survive_kill9_write_through() {
    if !have_tools("patterns_survive_kill9_write_through", &["qemu-io"]) {
        return;
    }
    let mut node = SvaNode::start(SvaNodeOptions {
        cache_mode: CacheMode::WriteThrough,
        ..SvaNodeOptions::default()
    })
    .expect("start sva-node");
    write_regions(&node, &WRITES).expect("write patterns");
    node.kill9();
    node.start_again().expect("start sva-node after kill -9");
    verify_regions(&node, &EXPECTED).expect("verify after kill -9");
}
