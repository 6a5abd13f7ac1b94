//! `apply` scenarios against the fake API server (kube tower-test mock service): what the
//! operator writes for a new volume, when a node is lost, and on deletion.

use super::*;
use crate::crd::{MirroredVolumeSpec, PlexPhase, VolumePhase};
use crate::fixtures::FakeApi;
use crate::node_api::{PlexReport, ResyncReport};
use serde_json::Value;
use sva_node::scsi::alua::AluaState as NodeAlua;
use sva_node::witness::PlexState;

const MV: &str = "/apis/sva.io/v1alpha1/namespaces/ns/mirroredvolumes/vol";
const PLEXES: &str = "/apis/sva.io/v1alpha1/namespaces/ns/plexes";
const PODS: &str = "/api/v1/namespaces/ns/pods";
const SECRET: &str = "/api/v1/namespaces/ns/secrets/vol-sva-secrets";

fn seed_cluster(api: &FakeApi) {
    for (i, host) in [(1, "host-a"), (2, "host-b"), (3, "host-c")] {
        api.seed(
            &format!("/api/v1/nodes/w{i}"),
            json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("w{i}"), "labels": {"sva.io/physical-host": host}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "addresses": [{"type": "InternalIP", "address": format!("10.9.0.{i}")}]}}),
        );
    }
}

fn volume(deleting: bool) -> MirroredVolume {
    let spec: MirroredVolumeSpec = serde_json::from_value(json!({
        "size": "1Gi", "plexes": 2, "storageClassName": "sva-local"}))
    .unwrap();
    let mut mv = MirroredVolume::new("vol", spec);
    mv.metadata.namespace = Some("ns".into());
    mv.metadata.uid = Some("uid-1".into());
    mv.metadata.generation = Some(1);
    mv.metadata.finalizers = Some(vec![FINALIZER.into()]);
    if deleting {
        mv.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
            ));
    }
    mv
}

fn context(api: &FakeApi, reports: Vec<(String, NodeStatusReport)>) -> Arc<Context> {
    let mut ctx = Context::new(
        api.client(),
        Arc::new(Metrics::new()),
        Settings {
            node_image: "sva-node:test".into(),
        },
    );
    let reports: BTreeMap<String, NodeStatusReport> = reports.into_iter().collect();
    ctx.fetch_status = Arc::new(move |addr: String| {
        let r = reports.get(&addr).cloned();
        async move { r }.boxed()
    });
    Arc::new(ctx)
}

fn obj(api: &FakeApi, path: &str) -> Value {
    api.get(path)
        .unwrap_or_else(|| panic!("{path} missing; log: {:#?}", api.log()))
}

#[tokio::test]
async fn new_volume_gets_config_lease_rbac_plexes_pvcs_and_pinned_host_network_pods() {
    let api = FakeApi::default();
    seed_cluster(&api);
    let mv = volume(false);
    api.seed(MV, serde_json::to_value(&mv).unwrap());
    let ctx = context(&api, vec![]);
    let action = run(&mv, &ctx, false).await.unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(plan::REQUEUE_BUSY_SECS))
    );

    let cm = obj(&api, "/api/v1/namespaces/ns/configmaps/vol-sva-config");
    let cfg = sva_node::config::Config::parse(cm["data"]["plex-1.yaml"].as_str().unwrap())
        .expect("sva-node accepts the rendered config");
    assert_eq!(cfg.target.portal, "10.9.0.1:32600");
    let mirror = cfg.mirror.unwrap();
    assert_eq!(
        mirror.witness,
        sva_node::config::WitnessSection::KubernetesLease(
            sva_node::config::KubernetesLeaseSection {
                namespace: Some("ns".into()),
                name: "vol-sva-witness".into()
            }
        )
    );
    assert_eq!(mirror.plexes[1].peer_addr, "10.9.0.2:32601");
    let secret = obj(&api, SECRET);
    let replication = secret["stringData"]["replication-secret"].as_str().unwrap();
    assert_eq!(replication.len(), 2 * REPLICATION_SECRET_BYTES);
    obj(
        &api,
        "/apis/coordination.k8s.io/v1/namespaces/ns/leases/vol-sva-witness",
    );
    let role = obj(
        &api,
        "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/roles/vol-sva-node",
    );
    assert_eq!(
        role["rules"][0]["resourceNames"],
        json!(["vol-sva-witness"])
    );
    assert_eq!(role["rules"][0]["verbs"], json!(["get", "update"]));

    let hosts: Vec<Value> = [1, 2]
        .iter()
        .map(|i| obj(&api, &format!("{PLEXES}/vol-p{i}"))["spec"]["host"].clone())
        .collect();
    assert_eq!(hosts, [json!("host-a"), json!("host-b")]);
    let pod = obj(&api, &format!("{PODS}/vol-p2"));
    assert_eq!(pod["spec"]["hostNetwork"], true);
    assert_eq!(
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["values"],
        json!(["w2"])
    );
    let tolerations = pod["spec"]["tolerations"].to_string();
    assert!(
        tolerations.contains("node.kubernetes.io/unreachable") && tolerations.contains("not-ready")
    );
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], 32602);
    assert_eq!(container["livenessProbe"]["tcpSocket"]["port"], 32602);
    assert_eq!(
        container["args"],
        json!(["serve", "--config", "/etc/sva/node.yaml"])
    );
    let mounts = container["volumeMounts"].to_string();
    assert!(
        mounts.contains(r#""mountPath":"/etc/sva/secrets""#),
        "{mounts}"
    );
    let volumes = pod["spec"]["volumes"].to_string();
    assert!(
        volumes.contains(r#""secretName":"vol-sva-secrets""#),
        "{volumes}"
    );
    assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    let pvc = obj(
        &api,
        "/api/v1/namespaces/ns/persistentvolumeclaims/vol-p1-data",
    );
    assert_eq!(pvc["spec"]["storageClassName"], "sva-local");

    let status = &obj(&api, MV)["status"];
    assert_eq!(status["phase"], "Pending");
    assert_eq!(status["portalPort"], 32600);

    // Second round (objects exist now): no new plex, pod or PVC is written.
    let mut mv2 = mv.clone();
    mv2.status = serde_json::from_value(status.clone()).unwrap();
    let before = api.log().len();
    run(&mv2, &ctx, false).await.unwrap();
    let writes: Vec<String> = api.log()[before..]
        .iter()
        .filter(|l| {
            !l.starts_with("GET")
                && (l.contains("/plexes/vol-p3")
                    || l.contains("/pods/")
                    || l.contains("persistentvolumeclaims/"))
        })
        .cloned()
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
    // The replication secret is created once and never regenerated.
    assert_eq!(
        obj(&api, SECRET)["stringData"]["replication-secret"],
        replication
    );
}

fn report(node: &str, epoch: u64, members: &[(u16, PlexState)]) -> NodeStatusReport {
    NodeStatusReport {
        node: node.into(),
        volume: "vol".into(),
        epoch,
        alua_state: NodeAlua::ActiveOptimized,
        plexes: members
            .iter()
            .map(|&(id, state)| PlexReport {
                id,
                node: format!("w{id}"),
                portal: format!("10.0.0.{id}:32600"),
                state,
                resync: ResyncReport::default(),
            })
            .collect(),
        resync_rate_limit_bytes_per_sec: None,
        verify: None,
    }
}

async fn built_volume(api: &FakeApi) -> MirroredVolume {
    seed_cluster(api);
    let mv = volume(false);
    api.seed(MV, serde_json::to_value(&mv).unwrap());
    let members = [(1, PlexState::InSync), (2, PlexState::InSync)];
    let ctx = context(
        api,
        vec![
            ("10.9.0.1:32602".into(), report("w1", 1, &members)),
            ("10.9.0.2:32602".into(), report("w2", 1, &members)),
        ],
    );
    run(&mv, &ctx, false).await.unwrap(); // creates
    for i in [1, 2] {
        api.touch(&format!("{PODS}/vol-p{i}"), |p| {
            p["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]})
        });
    }
    run(&mv, &ctx, false).await.unwrap(); // statuses from the data plane
    let mut mv: MirroredVolume = serde_json::from_value(obj(api, MV)).unwrap();
    mv.metadata.finalizers = Some(vec![FINALIZER.into()]);
    assert_eq!(
        mv.status.as_ref().unwrap().phase,
        VolumePhase::Healthy,
        "{:?}",
        mv.status
    );
    mv
}

#[tokio::test]
async fn node_lost_marks_plex_lost_volume_degraded_and_posts_event() {
    let api = FakeApi::default();
    let mv = built_volume(&api).await;
    // w2's sva-node stops answering; w1 reports epoch 2 with plex 2 Stale.
    let ctx = context(
        &api,
        vec![(
            "10.9.0.1:32602".into(),
            report("w1", 2, &[(1, PlexState::InSync), (2, PlexState::Stale)]),
        )],
    );
    run(&mv, &ctx, false).await.unwrap();
    let plex2 = obj(&api, &format!("{PLEXES}/vol-p2"));
    assert_eq!(plex2["status"]["state"], "Lost");
    assert!(plex2["status"]["lostSince"].is_i64());
    let status = &obj(&api, MV)["status"];
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(status["epoch"], 2);
    let events: Vec<Value> = api
        .0
        .lock()
        .unwrap()
        .objects
        .iter()
        .filter(|(k, _)| k.starts_with("/apis/events.k8s.io/v1/namespaces/ns/events/"))
        .map(|(_, v)| v.clone())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "PlexLost" && e["type"] == "Warning"),
        "{events:#?}"
    );
    let _ = PlexPhase::Lost;
}

#[tokio::test]
async fn deletion_removes_children_then_the_finalizer() {
    let api = FakeApi::default();
    let mut mv = built_volume(&api).await;
    mv.metadata.deletion_timestamp = volume(true).metadata.deletion_timestamp;
    api.seed(MV, serde_json::to_value(&mv).unwrap());
    let ctx = context(&api, vec![]);
    reconcile(Arc::new(mv), ctx).await.unwrap();
    for path in [
        format!("{PODS}/vol-p1"),
        format!("{PLEXES}/vol-p2"),
        "/api/v1/namespaces/ns/persistentvolumeclaims/vol-p2-data".into(),
        "/apis/coordination.k8s.io/v1/namespaces/ns/leases/vol-sva-witness".into(),
    ] {
        assert!(api.get(&path).is_none(), "{path} still there");
    }
    assert_eq!(obj(&api, MV)["metadata"]["finalizers"], json!([]));
}
