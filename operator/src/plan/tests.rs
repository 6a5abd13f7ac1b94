//! Table tests of `plan`: one story per row (create, scale, node lost, node back, replacement,
//! deletion, not enough hosts).

use super::*;
use crate::crd::{CacheMode, MirroredVolumeSpec};
use crate::fixtures::node_report as report;
use crate::node_api::ResyncReport;
use sva_node::scsi::alua::AluaState as NodeAlua;

const NOW: i64 = 1_700_000_000;

fn spec(plexes: u8) -> MirroredVolumeSpec {
    MirroredVolumeSpec {
        size: "1Gi".into(),
        plexes,
        storage_class_name: "sva-local".into(),
        host_topology_key: "sva.io/physical-host".into(),
        cache_mode: CacheMode::WriteThrough,
        chap_secret_ref: None,
        allowed_initiators: vec![],
        resync_rate: None,
        replacement_timeout_seconds: 600,
        portal_port: None,
        image: None,
        resources: None,
    }
}

fn node(name: &str, host: &str) -> NodeView {
    NodeView {
        name: name.into(),
        host: Some(host.into()),
        ready: true,
        schedulable: true,
        address: Some(format!("10.0.0.{}", name.trim_start_matches('w'))),
    }
}

/// Three workers on three physical hosts, plus w4 on the same host as w1.
fn cluster(plexes: u8) -> Observed {
    Observed {
        now: NOW,
        namespace: "ns".into(),
        name: "vol".into(),
        uid: "uid-1".into(),
        generation: Some(1),
        deleting: false,
        spec: spec(plexes),
        status: MirroredVolumeStatus::default(),
        portal_port: 32600,
        nodes: vec![
            node("w1", "h1"),
            node("w2", "h2"),
            node("w3", "h3"),
            node("w4", "h1"),
        ],
        plexes: vec![],
        reports: BTreeMap::new(),
        chap: None,
    }
}

fn plex(id: u16, node: &str, host: &str, state: PlexPhase) -> PlexView {
    PlexView {
        id,
        node: node.into(),
        host: host.into(),
        replaces: None,
        status: PlexStatus {
            state,
            ..Default::default()
        },
        pod_ready: Some(true),
        pvc_exists: true,
    }
}

/// A 2-plex volume on w1/w2, both in sync, both nodes reporting epoch 1.
fn healthy_two() -> Observed {
    let mut o = cluster(2);
    o.plexes = vec![
        plex(1, "w1", "h1", PlexPhase::InSync),
        plex(2, "w2", "h2", PlexPhase::InSync),
    ];
    let members = [(1, PlexState::InSync), (2, PlexState::InSync)];
    o.reports.insert(1, report("w1", 1, &members));
    o.reports.insert(2, report("w2", 1, &members));
    let snapshot = o.clone();
    for p in &mut o.plexes {
        p.status = plex_status(&snapshot, p, authoritative_report(&snapshot.reports));
    }
    o.status = volume_status(
        &o,
        &o.plexes.iter().collect::<Vec<_>>(),
        &o.plexes.iter().map(|p| (p.id, p.status.clone())).collect(),
        authoritative_report(&o.reports),
        0,
        None,
    );
    o
}

fn created(steps: &[Step]) -> Vec<(u16, String, Option<u16>)> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::CreatePlex {
                id, node, replaces, ..
            } => Some((*id, node.clone(), *replaces)),
            _ => None,
        })
        .collect()
}

fn events(steps: &[Step]) -> Vec<&'static str> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Event { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn deleted_plexes(steps: &[Step]) -> Vec<u16> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::DeletePlex { id } => Some(*id),
            _ => None,
        })
        .collect()
}

fn volume_status_of(steps: &[Step]) -> Option<&MirroredVolumeStatus> {
    steps.iter().find_map(|s| match s {
        Step::VolumeStatus(st) => Some(&**st),
        _ => None,
    })
}

fn plex_state_of(steps: &[Step], id: u16) -> Option<PlexPhase> {
    steps.iter().find_map(|s| match s {
        Step::PlexStatus { id: i, status } if *i == id => Some(status.state),
        _ => None,
    })
}

fn cond(st: &MirroredVolumeStatus, ty: &str) -> (String, String) {
    let c = st.conditions.iter().find(|c| c.type_ == ty).unwrap();
    (c.status.clone(), c.reason.clone())
}

#[test]
fn create_places_plexes_on_distinct_hosts_with_config_first() {
    let steps = plan(&cluster(2));
    assert_eq!(steps[0], Step::EnsureLease);
    let Step::EnsureConfig { data } = &steps[1] else {
        panic!("config must come second")
    };
    assert_eq!(
        data.keys().cloned().collect::<Vec<_>>(),
        ["plex-1.yaml", "plex-2.yaml"]
    );
    assert!(
        data["plex-1.yaml"].contains("10.0.0.2:32601"),
        "peer address of plex 2"
    );
    assert_eq!(
        created(&steps),
        [(1, "w1".into(), None), (2, "w2".into(), None)]
    );
    assert!(steps.contains(&Step::EnsurePod {
        id: 2,
        node: "w2".into()
    }));
    assert!(steps.contains(&Step::EnsurePvc {
        id: 1,
        node: "w1".into()
    }));
    let st = volume_status_of(&steps).unwrap();
    assert_eq!(st.phase, VolumePhase::Pending);
    assert_eq!(cond(st, "Ready").0, "False");
    assert_eq!(st.target_iqn.as_deref(), Some("iqn.2024-01.io.sva:ns.vol"));
    assert!(steps.contains(&Step::Requeue {
        after_secs: REQUEUE_BUSY_SECS
    }));
}

#[test]
fn healthy_volume_plans_no_changes() {
    let o = healthy_two();
    let steps = plan(&o);
    assert!(created(&steps).is_empty());
    assert!(events(&steps).is_empty(), "{steps:?}");
    assert!(
        volume_status_of(&steps).is_none(),
        "status unchanged, no write"
    );
    assert_eq!(o.status.phase, VolumePhase::Healthy);
    assert_eq!(o.status.paths.len(), 2);
    assert_eq!(o.status.paths[1].portal, "10.0.0.2:32600");
    assert!(steps.contains(&Step::Requeue {
        after_secs: REQUEUE_IDLE_SECS
    }));
}

#[test]
fn scale_two_to_three_adds_plex_three_on_the_free_host() {
    let mut o = healthy_two();
    o.spec.plexes = 3;
    let steps = plan(&o);
    // w4 shares host h1 with w1: only w3 is eligible.
    assert_eq!(created(&steps), [(3, "w3".into(), None)]);
    let st = volume_status_of(&steps).unwrap();
    assert_eq!(st.phase, VolumePhase::Degraded);
    assert_eq!(cond(st, "Synced").0, "False");
}

#[test]
fn not_enough_hosts_sets_condition_and_event_once() {
    let mut o = cluster(3);
    o.nodes.retain(|n| n.name != "w3"); // hosts h1 (w1, w4) and h2 only
    let steps = plan(&o);
    assert_eq!(created(&steps).len(), 2);
    assert_eq!(events(&steps), [REASON_NOT_ENOUGH_HOSTS]);
    let st = volume_status_of(&steps).unwrap().clone();
    assert_eq!(
        cond(&st, "Synced"),
        ("False".into(), REASON_NOT_ENOUGH_HOSTS.into())
    );
    // Next reconcile: condition already says so, no second Event.
    o.status = st;
    assert!(!events(&plan(&o)).contains(&REASON_NOT_ENOUGH_HOSTS));
}

#[test]
fn no_hosts_at_all_fails_the_volume() {
    let mut o = cluster(2);
    for n in &mut o.nodes {
        n.host = None;
    }
    let steps = plan(&o);
    assert!(created(&steps).is_empty());
    assert_eq!(volume_status_of(&steps).unwrap().phase, VolumePhase::Failed);
}

#[test]
fn node_lost_data_plane_first_goes_degraded() {
    let mut o = healthy_two();
    // w2 stops answering; w1 moved to epoch 2 with plex 2 Stale. Node w2 still looks Ready:
    // the data plane decides, the Node condition is only corroboration.
    o.reports.remove(&2);
    o.reports.insert(
        1,
        report("w1", 2, &[(1, PlexState::InSync), (2, PlexState::Stale)]),
    );
    let steps = plan(&o);
    assert_eq!(plex_state_of(&steps, 2), Some(PlexPhase::Lost));
    assert_eq!(events(&steps), ["PlexLost"]);
    let st = volume_status_of(&steps).unwrap();
    assert_eq!(st.phase, VolumePhase::Degraded);
    assert_eq!(st.epoch, Some(2));
    assert_eq!(cond(st, "Degraded"), ("True".into(), "PlexLost".into()));
    assert_eq!(cond(st, "Ready").0, "True", "plex 1 still serves");
    let lost = st.paths.iter().find(|p| p.target_port_group == 2).unwrap();
    assert_eq!(lost.alua_state, AluaState::Offline);
    assert!(
        created(&steps).is_empty(),
        "no replacement before the timeout"
    );
}

#[test]
fn node_lost_without_any_report_uses_node_condition() {
    let mut o = healthy_two();
    o.reports.clear();
    o.nodes[1].ready = false;
    let steps = plan(&o);
    assert_eq!(plex_state_of(&steps, 2), Some(PlexPhase::Lost));
    assert_eq!(plex_state_of(&steps, 1), Some(PlexPhase::Pending));
}

#[test]
fn node_back_shows_resync_progress_then_in_sync() {
    let mut o = healthy_two();
    o.plexes[1].status = PlexStatus {
        state: PlexPhase::Lost,
        lost_since: Some(NOW - 60),
        ..Default::default()
    };
    let mut r = report(
        "w1",
        3,
        &[(1, PlexState::InSync), (2, PlexState::Resyncing)],
    );
    r.plexes[1].resync = ResyncReport {
        done_bytes: 1 << 29,
        total_bytes: 1 << 30,
        bytes_per_sec: 1 << 20,
        ..ResyncReport::default()
    };
    o.reports.insert(1, r.clone());
    o.reports.insert(
        2,
        NodeStatusReport {
            node: "w2".into(),
            alua_state: NodeAlua::Unavailable,
            ..r
        },
    );
    let steps = plan(&o);
    assert_eq!(events(&steps), ["PlexReturned"]);
    assert_eq!(plex_state_of(&steps, 2), Some(PlexPhase::Resyncing));
    let st = volume_status_of(&steps).unwrap();
    assert_eq!(st.phase, VolumePhase::Resyncing);
    let resync = st.resync.as_ref().unwrap();
    assert_eq!(
        (resync.percent.as_str(), resync.eta_seconds),
        ("50%", Some(512))
    );
    // Resync done: plex 2 InSync again, volume Healthy.
    o.plexes[1].status.state = PlexPhase::Resyncing;
    let members = [(1, PlexState::InSync), (2, PlexState::InSync)];
    o.reports.insert(1, report("w1", 4, &members));
    o.reports.insert(2, report("w2", 4, &members));
    let steps = plan(&o);
    assert_eq!(events(&steps), ["PlexInSync"]);
    assert_eq!(
        volume_status_of(&steps).unwrap().phase,
        VolumePhase::Healthy
    );
}

#[test]
fn replacement_after_timeout_then_old_plex_removed_once_in_sync() {
    let mut o = healthy_two();
    o.reports.remove(&2);
    o.reports.insert(
        1,
        report("w1", 2, &[(1, PlexState::InSync), (2, PlexState::Stale)]),
    );
    o.plexes[1].status = PlexStatus {
        state: PlexPhase::Lost,
        lost_since: Some(NOW - 599),
        ..Default::default()
    };
    assert!(created(&plan(&o)).is_empty(), "599s < 600s timeout");
    o.now = NOW + 1;
    let steps = plan(&o);
    assert_eq!(created(&steps), [(3, "w3".into(), Some(2))]);
    assert!(events(&steps).contains(&"ReplacingPlex"));
    let Step::EnsureConfig { data } = &steps[1] else {
        panic!()
    };
    assert!(data.contains_key("plex-3.yaml"));
    // The replacement exists and resyncs: no second replacement, old plex kept.
    let mut p3 = plex(3, "w3", "h3", PlexPhase::Resyncing);
    p3.replaces = Some(2);
    o.plexes.push(p3);
    o.reports.insert(
        1,
        report(
            "w1",
            3,
            &[
                (1, PlexState::InSync),
                (2, PlexState::Stale),
                (3, PlexState::Resyncing),
            ],
        ),
    );
    let steps = plan(&o);
    assert!(created(&steps).is_empty());
    assert!(deleted_plexes(&steps).is_empty());
    // In sync: plex 2, its pod and PVC go.
    let members = [
        (1, PlexState::InSync),
        (2, PlexState::Removed),
        (3, PlexState::InSync),
    ];
    o.reports.insert(1, report("w1", 4, &members));
    o.reports.insert(3, report("w3", 4, &members));
    let steps = plan(&o);
    assert_eq!(deleted_plexes(&steps), [2]);
    assert!(steps.contains(&Step::DeletePvc { id: 2 }));
    assert!(events(&steps).contains(&"PlexReplaced"));
    assert!(
        created(&steps).is_empty(),
        "removed plex 2 is not re-created"
    );
    assert_eq!(
        volume_status_of(&steps).unwrap().phase,
        VolumePhase::Healthy
    );
}

#[test]
fn replacement_timeout_without_free_host_reports_not_enough_hosts() {
    let mut o = healthy_two();
    o.nodes.retain(|n| n.name != "w3");
    o.reports.remove(&2);
    o.reports.insert(
        1,
        report("w1", 2, &[(1, PlexState::InSync), (2, PlexState::Stale)]),
    );
    o.plexes[1].status = PlexStatus {
        state: PlexPhase::Lost,
        lost_since: Some(NOW - 3600),
        ..Default::default()
    };
    let steps = plan(&o);
    assert!(created(&steps).is_empty());
    assert!(events(&steps).contains(&REASON_NOT_ENOUGH_HOSTS));
}

#[test]
fn missing_pod_and_pvc_are_recreated_on_the_same_node() {
    let mut o = healthy_two();
    o.plexes[0].pod_ready = None;
    o.plexes[0].pvc_exists = false;
    let steps = plan(&o);
    assert!(steps.contains(&Step::EnsurePod {
        id: 1,
        node: "w1".into()
    }));
    assert!(steps.contains(&Step::EnsurePvc {
        id: 1,
        node: "w1".into()
    }));
    assert!(created(&steps).is_empty());
}

#[test]
fn deletion_removes_everything_and_nothing_else() {
    let mut o = healthy_two();
    o.deleting = true;
    let steps = plan(&o);
    assert_eq!(deleted_plexes(&steps), [1, 2]);
    assert!(steps.contains(&Step::DeletePod { id: 1 }));
    assert!(steps.contains(&Step::DeletePvc { id: 2 }));
    assert!(steps.contains(&Step::DeleteLease));
    assert!(steps.contains(&Step::DeleteConfig));
    assert!(created(&steps).is_empty());
    assert!(!steps
        .iter()
        .any(|s| matches!(s, Step::EnsurePod { .. } | Step::VolumeStatus(_))));
}

#[test]
fn portal_ports_skip_used_slots() {
    assert_eq!(allocate_portal_port(&BTreeSet::new()), Some(32600));
    assert_eq!(allocate_portal_port(&[32600].into()), Some(32603));
    assert_eq!(allocate_portal_port(&[32604].into()), Some(32600));
    assert_eq!(allocate_portal_port(&[32602, 32603].into()), Some(32606));
}

#[test]
fn node_without_address_gets_no_config_and_a_warning() {
    let mut o = cluster(2);
    o.nodes[1].address = None;
    let steps = plan(&o);
    // Every config lists every plex, so none can be rendered without w2's address: no config
    // Secret at all (never an empty or partial one), and no pod that would mount it.
    assert!(
        !steps.iter().any(|s| matches!(s, Step::EnsureConfig { .. })),
        "{steps:?}"
    );
    assert!(!steps.iter().any(|s| matches!(s, Step::EnsurePod { .. })));
    assert_eq!(steps[1], Step::EnsureSecret);
    assert!(events(&steps).contains(&REASON_CONFIG_NOT_RENDERED));
    let st = volume_status_of(&steps).unwrap();
    assert_eq!(
        cond(st, CONDITION_CONFIG_RENDERED),
        ("False".into(), REASON_CONFIG_NOT_RENDERED.into())
    );
    let o = cluster(2);
    let steps = plan(&o);
    assert!(!events(&steps).contains(&REASON_CONFIG_NOT_RENDERED));
    assert_eq!(
        cond(volume_status_of(&steps).unwrap(), CONDITION_CONFIG_RENDERED).0,
        "True"
    );
}

#[test]
fn chap_secret_problem_keeps_the_running_config_and_pods_and_says_why_once() {
    let mut o = healthy_two();
    o.plexes[0].pod_ready = None; // a pod to re-create: it must wait for a good config
    o.spec.chap_secret_ref = Some(crate::crd::SecretRef {
        name: "vol-chap".into(),
    });
    o.chap = Some(Err("CHAP Secret vol-chap not found".into()));
    let steps = plan(&o);
    assert!(!steps
        .iter()
        .any(|s| matches!(s, Step::EnsureConfig { .. } | Step::EnsurePod { .. })));
    assert!(!steps.iter().any(|s| matches!(s, Step::DeletePod { .. })));
    let note = steps.iter().find_map(|s| match s {
        Step::Event {
            kind: EventKind::Warning,
            reason: REASON_CONFIG_NOT_RENDERED,
            note,
        } => Some(note.clone()),
        _ => None,
    });
    assert_eq!(note.as_deref(), Some("CHAP Secret vol-chap not found"));
    let st = volume_status_of(&steps).unwrap().clone();
    assert_eq!(
        st.phase,
        VolumePhase::Healthy,
        "the data plane still serves"
    );
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_CONFIG_RENDERED)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.message.as_str()),
        ("False", "CHAP Secret vol-chap not found")
    );
    // Next round: the condition already says so, no second Event.
    o.status = st;
    assert!(!events(&plan(&o)).contains(&REASON_CONFIG_NOT_RENDERED));
    // The Secret appears: configs (with CHAP) and the missing pod are written again.
    o.chap = Some(Ok(nodeconfig::ChapCredentials {
        username: "alice".into(),
        secret: "s3cret-123456".into(),
        mutual: None,
    }));
    let steps = plan(&o);
    let Step::EnsureConfig { data } = &steps[1] else {
        panic!("config second: {steps:?}")
    };
    assert!(data["plex-1.yaml"].contains("username: alice"));
    let logged = format!("{steps:?}");
    assert!(
        logged.contains("plex-1.yaml") && !logged.contains("s3cret-123456"),
        "plans are logged: no secrets in Debug: {logged}"
    );
    assert!(steps.contains(&Step::EnsurePod {
        id: 1,
        node: "w1".into()
    }));
    assert_eq!(
        cond(volume_status_of(&steps).unwrap(), CONDITION_CONFIG_RENDERED).0,
        "True"
    );
}

#[test]
fn resync_rate_is_posted_to_nodes_whose_limit_differs() {
    let mut o = healthy_two();
    assert!(!plan(&o)
        .iter()
        .any(|s| matches!(s, Step::SetResyncRate { .. })));
    o.spec.resync_rate = Some("100Mi".into());
    if let Some(r) = o.reports.get_mut(&2) {
        r.resync_rate_limit_bytes_per_sec = Some(100 << 20);
    }
    let steps = plan(&o);
    let posts: Vec<&Step> = steps
        .iter()
        .filter(|s| matches!(s, Step::SetResyncRate { .. }))
        .collect();
    assert_eq!(
        posts,
        [&Step::SetResyncRate {
            id: 1,
            bytes_per_sec: 100 << 20
        }],
        "plex 2 already runs at the spec's rate"
    );
    // An unreachable node gets nothing (it is told when it answers again).
    o.reports.remove(&1);
    assert!(!plan(&o)
        .iter()
        .any(|s| matches!(s, Step::SetResyncRate { .. })));
}

#[test]
fn full_resync_of_a_replacement_shows_node_eta_and_copied_bytes() {
    let mut o = healthy_two();
    let mut p3 = plex(3, "w3", "h3", PlexPhase::Pending);
    p3.replaces = Some(2);
    o.plexes.push(p3);
    let mut r = report(
        "w1",
        3,
        &[
            (1, PlexState::InSync),
            (2, PlexState::Stale),
            (3, PlexState::Resyncing),
        ],
    );
    r.plexes[2].resync = ResyncReport {
        done_bytes: 3 << 28,
        total_bytes: 1 << 30,
        bytes_per_sec: 1 << 20,
        copied_bytes: 1 << 20,
        eta_seconds: Some(300),
        full: true,
        ..ResyncReport::default()
    };
    o.reports.insert(1, r);
    let steps = plan(&o);
    let p3 = steps
        .iter()
        .find_map(|s| match s {
            Step::PlexStatus { id: 3, status } => Some(status.clone()),
            _ => None,
        })
        .unwrap();
    let progress = p3.resync.unwrap();
    assert_eq!(
        (
            progress.percent.as_str(),
            progress.eta_seconds,
            progress.copied_bytes,
            progress.full
        ),
        ("75%", Some(300), 1 << 20, true)
    );
    let vol = volume_status_of(&steps).unwrap().resync.clone().unwrap();
    assert_eq!((vol.percent.as_str(), vol.eta_seconds), ("75%", Some(300)));
}
