//! libiscsi's conformance suite through two nodes of one mirrored volume (DESIGN.md §10):
//! `iscsi-test-cu --dataloss -t ALL URL_A URL_B`, both orders. With two URLs the reservation
//! tests log their second initiator in through the other node and the MultipathIO suite
//! writes on one path and reads / compares-and-writes on the other.
//!
//! Bar: at least as many tests pass as on one node (`conformance.rs`'s `PASS_BAR`), and every
//! MultipathIO test runs and passes. A 3-plex volume runs the suite once more (paths 1 and 3).

use sva_tests::{have_tools, tools, CunitSummary, MirroredVolume, MirroredVolumeOptions};

/// The single-node bar (`conformance.rs`): the mirrored volume must do at least as well.
const PASS_BAR: u32 = 228;
/// Tests libiscsi 1.19 runs with two URLs.
const TESTS_RUN: u32 = 230;
/// The MultipathIO suite, which only runs with two URLs.
const MULTIPATH_TESTS: [&str; 4] = [
    "MultipathIO.Simple",
    "MultipathIO.Reset",
    "MultipathIO.CompareAndWrite",
    "MultipathIO.CompareAndWriteAsync",
];
/// Big enough for the suite's largest transfers, small enough to be quick.
const VOLUME_BYTES: u64 = 256 << 20;

/// Names of the tests CUnit ran (`Suite.Test`), from its per-test lines.
fn tests_ran(stdout: &str) -> Vec<String> {
    let mut suite = String::new();
    let mut out = Vec::new();
    for line in stdout.lines() {
        let t = line.trim();
        if let Some(s) = t.strip_prefix("Suite: ") {
            suite = s.trim().to_owned();
        } else if let Some(rest) = t.strip_prefix("Test: ") {
            let name = rest.split_once(" ...").map_or(rest, |(n, _)| n);
            out.push(format!("{suite}.{}", name.trim()));
        }
    }
    out
}

/// The suites run one at a time: each is CPU-heavy, and a node starved of CPU for longer than
/// the peer timeout is (correctly) voted out, which ends the run for its path.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(v: &MirroredVolume, a: u16, b: u16) -> CunitSummary {
    let (ua, ub) = (v.url(a), v.url(b));
    let (out, summary) = tools::iscsi_test_cu(&[&ua, &ub], "ALL").expect("run iscsi-test-cu");
    eprintln!(
        "iscsi-test-cu through plex {a} then plex {b}: {}",
        summary.line()
    );
    for name in &summary.failed_tests {
        eprintln!("  FAILED {name}");
        // libiscsi's own account of the failure: the lines after the test's header.
        let test = name.rsplit('.').next().unwrap_or(name);
        let lines: Vec<&str> = out.stdout.lines().collect();
        if let Some(i) = lines
            .iter()
            .position(|l| l.trim().starts_with(&format!("Test: {test} ")))
        {
            for l in lines.iter().skip(i).take(25) {
                eprintln!("    | {l}");
            }
        }
    }
    assert!(
        summary.complete,
        "iscsi-test-cu did not finish:\n{}\n{}",
        out.describe(),
        v.logs(40)
    );
    let ran = tests_ran(&out.stdout);
    for t in MULTIPATH_TESTS {
        assert!(
            ran.iter().any(|r| r == t),
            "{t} did not run (paths {a},{b}); ran: {ran:?}"
        );
        assert!(
            !summary.failed_tests.iter().any(|f| f == t),
            "{t} failed through plex {a} then plex {b}"
        );
    }
    assert!(
        summary.run >= TESTS_RUN && summary.passed >= PASS_BAR,
        "passed {} of {} (bar {PASS_BAR} of {TESTS_RUN}) through plex {a} then {b}; failed: {:?}",
        summary.passed,
        summary.run,
        summary.failed_tests
    );
    summary
}

#[test]
fn two_plexes_both_orders() {
    if !have_tools("two_plexes_both_orders", &["iscsi-test-cu", "qemu-io"]) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let v = MirroredVolume::start(MirroredVolumeOptions {
        size_bytes: VOLUME_BYTES,
        ..MirroredVolumeOptions::default()
    })
    .expect("start mirrored volume");
    run(&v, 1, 2);
    run(&v, 2, 1);
}

#[test]
fn three_plexes() {
    if !have_tools("three_plexes", &["iscsi-test-cu", "qemu-io"]) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let v = MirroredVolume::start(MirroredVolumeOptions {
        plexes: 3,
        size_bytes: VOLUME_BYTES,
        ..MirroredVolumeOptions::default()
    })
    .expect("start mirrored volume");
    run(&v, 3, 1);
}
