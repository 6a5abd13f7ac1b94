//! Discovery and identity as real initiators see them: SendTargets via `iscsi-ls`, standard
//! INQUIRY and the VPD 0x80 serial via `iscsi-inq` (DESIGN.md §4: identity derives from the
//! volume UID, so every node of a volume reports the same serial).

use sva_tests::scenarios::{discovery_lists_target, inquiry};
use sva_tests::{have_tools, SvaNode, SvaNodeOptions};

#[test]
fn iscsi_ls_lists_target_and_lun() {
    if !have_tools("iscsi_ls_lists_target_and_lun", &["iscsi-ls"]) {
        return;
    }
    let node = SvaNode::start(SvaNodeOptions::default()).expect("start sva-node");
    discovery_lists_target(&node).expect("discovery");
}

#[test]
fn inquiry_identity_derives_from_volume_uid() {
    if !have_tools("inquiry_identity_derives_from_volume_uid", &["iscsi-inq"]) {
        return;
    }
    let uid = "0d9e8f7a-1111-4222-8333-944455556666";
    let opts = |port_id: u16| SvaNodeOptions {
        volume_uid: uid.into(),
        relative_target_port_id: port_id,
        target_port_group_id: port_id,
        portal_group_tag: port_id,
        ..SvaNodeOptions::default()
    };
    let a = SvaNode::start(opts(1)).expect("start node a");
    let b = SvaNode::start(opts(2)).expect("start node b");
    let other = SvaNode::start(SvaNodeOptions {
        volume_uid: "ffffffff-0000-4000-8000-000000000001".into(),
        ..SvaNodeOptions::default()
    })
    .expect("start node with another uid");
    let ia = inquiry(&a).expect("inquiry a");
    let ib = inquiry(&b).expect("inquiry b");
    let io = inquiry(&other).expect("inquiry other");
    assert_eq!(ia.vendor, "SVA", "T10 vendor id");
    assert!(!ia.product.is_empty(), "product id empty");
    // DESIGN.md §4: implicit ALUA.
    assert!(
        ia.standard.lines().any(|l| l.trim() == "TPGS:1"),
        "TPGS is not 01b:\n{}",
        ia.standard
    );
    assert!(!ia.serial.is_empty(), "empty unit serial number");
    assert_eq!(
        ia.serial, ib.serial,
        "two nodes of one volume differ in serial"
    );
    assert_ne!(
        ia.serial, io.serial,
        "serial does not depend on the volume uid"
    );
}
