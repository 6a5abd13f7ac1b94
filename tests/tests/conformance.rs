//! libiscsi's conformance suite (`iscsi-test-cu --dataloss -t ALL`) against one sva-node.
//!
//! With `SVA_COMPARE_TGT=1` the same suite also runs against tgtd and prints its count, as a
//! reference point (tgt 1.0.85 passes 222 of 230 on Debian 12 with libiscsi 1.19).

use sva_tests::{have_tools, tools, IscsiTarget, SvaNode, SvaNodeOptions, Tgtd, TgtdOptions};

/// Minimum number of `iscsi-test-cu -t ALL` tests sva-node must pass (CUnit's "Passed",
/// which includes tests the suite skips because an optional feature is absent). Of the 230
/// tests libiscsi 1.19 runs against a single URL, the two allowed failures leave room for
/// tests whose expectations disagree with SPC-4/SBC-3 or need a second path. Raise it as
/// sva-node improves; never lower it.
const PASS_BAR: u32 = 228;

/// Volume size for the suite: big enough for its largest transfers, small enough to be quick.
const VOLUME_BYTES: u64 = 256 << 20;

fn run_suite(t: &dyn IscsiTarget) -> sva_tests::CunitSummary {
    let url = t.url();
    let (out, summary) = tools::iscsi_test_cu(&[&url], "ALL").expect("run iscsi-test-cu");
    eprintln!("iscsi-test-cu on {}: {}", t.describe(), summary.line());
    for name in &summary.failed_tests {
        eprintln!("  FAILED {name}");
    }
    assert!(
        summary.complete,
        "iscsi-test-cu did not finish (no Run Summary):\n{}\n--- target log ---\n{}",
        out.describe(),
        t.log_tail(60)
    );
    summary
}

#[test]
fn sva_node_passes_iscsi_test_cu() {
    if !have_tools("sva_node_passes_iscsi_test_cu", &["iscsi-test-cu"]) {
        return;
    }
    let node = SvaNode::start(SvaNodeOptions {
        size_bytes: VOLUME_BYTES,
        ..SvaNodeOptions::default()
    })
    .expect("start sva-node");
    let summary = run_suite(&node);
    assert!(
        summary.passed >= PASS_BAR,
        "sva-node passed {} of {} iscsi-test-cu tests, the bar is {PASS_BAR}; failed: {:?}",
        summary.passed,
        summary.run,
        summary.failed_tests
    );
}

#[test]
fn tgt_reference_count() {
    if std::env::var_os("SVA_COMPARE_TGT").is_none() {
        eprintln!("SKIP tgt_reference_count: set SVA_COMPARE_TGT=1 to run the suite on tgtd");
        return;
    }
    if !have_tools("tgt_reference_count", &["iscsi-test-cu", "tgtd", "tgtadm"]) {
        return;
    }
    let tgt = Tgtd::start(TgtdOptions {
        size_bytes: VOLUME_BYTES,
        ..TgtdOptions::default()
    })
    .expect("start tgtd");
    let summary = run_suite(&tgt);
    assert!(summary.run > 0, "no tests ran against tgtd");
}
