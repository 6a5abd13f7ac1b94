//! Malformed input on raw TCP connections, while a real qemu-io session keeps doing verified
//! I/O on the same node: the node must refuse the bad connection (Reject or close) and never
//! let it disturb the good one.

use sva_tests::scenarios::{
    bad_opcode, cmdsn_out_of_window, garbage_before_login, oversize_data_segment,
    with_background_session,
};
use sva_tests::{have_tools, IscsiTarget, SvaNode, SvaNodeOptions};

fn run(name: &str, story: fn(&dyn IscsiTarget) -> anyhow::Result<String>) {
    if !have_tools(name, &["qemu-io"]) {
        return;
    }
    let node = SvaNode::start(SvaNodeOptions::default()).expect("start sva-node");
    match with_background_session(&node, story) {
        Ok(what) => eprintln!("{name}: sva-node {what}"),
        Err(e) => panic!("{name}: {e:#}\n--- sva-node log ---\n{}", node.log_tail(40)),
    }
}

#[test]
fn garbage_before_login_is_refused() {
    run("garbage_before_login_is_refused", garbage_before_login);
}

#[test]
fn reserved_opcode_is_rejected() {
    run("reserved_opcode_is_rejected", bad_opcode);
}

#[test]
fn oversize_data_segment_is_refused() {
    run("oversize_data_segment_is_refused", oversize_data_segment);
}

#[test]
fn cmdsn_outside_window_is_not_executed() {
    run("cmdsn_outside_window_is_not_executed", cmdsn_out_of_window);
}
