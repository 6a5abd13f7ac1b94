//! `apply` scenarios against the fake API server (kube tower-test mock service): what the
//! operator writes for a new volume, when a node is lost, and on deletion.

use super::*;
use crate::crd::{MirroredVolumeSpec, PlexPhase, VolumePhase};
use crate::fixtures::{node_report as report, FakeApi};
use serde_json::Value;
use sva_node::witness::PlexState;

const MV: &str = "/apis/sva.io/v1alpha1/namespaces/ns/mirroredvolumes/vol";
const PLEXES: &str = "/apis/sva.io/v1alpha1/namespaces/ns/plexes";
const PODS: &str = "/api/v1/namespaces/ns/pods";
const SECRET: &str = "/api/v1/namespaces/ns/secrets/vol-sva-secrets";
const CONFIG: &str = "/api/v1/namespaces/ns/secrets/vol-sva-config";

/// Calls the operator made to `POST /v1/resync-rate`: (address, token, bytes/s).
type RateCalls = Arc<std::sync::Mutex<Vec<(String, String, u64)>>>;

/// The node config of plex `id` as the pod would read it from the config Secret.
fn node_config(api: &FakeApi, id: u16) -> String {
    let secret: Secret = serde_json::from_value(obj(api, CONFIG)).unwrap();
    let data = secret.data.unwrap();
    String::from_utf8(data[&format!("plex-{id}.yaml")].0.clone()).unwrap()
}

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
    context_with_rates(api, reports, RateCalls::default())
}

fn context_with_rates(
    api: &FakeApi,
    reports: Vec<(String, NodeStatusReport)>,
    calls: RateCalls,
) -> Arc<Context> {
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
    ctx.set_resync_rate = Arc::new(move |addr: String, token: String, rate: u64| {
        calls.lock().unwrap().push((addr, token, rate));
        async { Ok(()) }.boxed()
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

    assert!(
        api.get("/api/v1/namespaces/ns/configmaps/vol-sva-config")
            .is_none(),
        "node configs are never in a ConfigMap"
    );
    let cfg = sva_node::config::Config::parse(&node_config(&api, 1))
        .expect("sva-node accepts the rendered config");
    assert_eq!(
        cfg.control.as_ref().unwrap().token_file,
        Some("/etc/sva/secrets/api-token".into())
    );
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
    let token = secret["stringData"]["api-token"].as_str().unwrap();
    assert_eq!(token.len(), 2 * REPLICATION_SECRET_BYTES);
    assert_ne!(token, replication);
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
    assert_eq!(
        pod["spec"]["volumes"][0]["secret"],
        json!({"secretName": "vol-sva-config", "defaultMode": 0o440,
               "items": [{"key": "plex-2.yaml", "path": "node.yaml"}]})
    );
    assert!(volumes.contains(r#""key":"api-token""#), "{volumes}");
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

fn events_of(api: &FakeApi) -> Vec<Value> {
    api.0
        .lock()
        .unwrap()
        .objects
        .iter()
        .filter(|(k, _)| k.starts_with("/apis/events.k8s.io/v1/namespaces/ns/events/"))
        .map(|(_, v)| v.clone())
        .collect()
}

fn condition(status: &Value, ty: &str) -> Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == ty)
        .cloned()
        .unwrap_or_else(|| panic!("no {ty} condition in {status:#}"))
}

/// CHAP from the user's Secret: missing Secret -> no config Secret, no pods, a False
/// ConfigRendered condition and a Warning Event; once the Secret exists, every node config
/// carries the credentials (in a Secret, never a ConfigMap) and the pods are created.
#[tokio::test]
async fn chap_secret_reaches_node_configs_only_through_secrets() {
    let api = FakeApi::default();
    seed_cluster(&api);
    let mut mv = volume(false);
    mv.spec.chap_secret_ref = Some(crate::crd::SecretRef {
        name: "vol-chap".into(),
    });
    api.seed(MV, serde_json::to_value(&mv).unwrap());
    let ctx = context(&api, vec![]);
    run(&mv, &ctx, false).await.unwrap();
    assert!(api.get(CONFIG).is_none(), "no config without CHAP");
    assert!(
        api.get(&format!("{PODS}/vol-p1")).is_none(),
        "no pod either"
    );
    let status = &obj(&api, MV)["status"];
    let c = condition(status, "ConfigRendered");
    assert_eq!(c["status"], "False");
    assert_eq!(c["message"], "CHAP Secret vol-chap not found");
    assert!(events_of(&api)
        .iter()
        .any(|e| e["reason"] == "ConfigNotRendered" && e["type"] == "Warning"));

    api.seed(
        "/api/v1/namespaces/ns/secrets/vol-chap",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vol-chap"},
               "data": {"username": "YWxpY2U=", "password": "czNjcmV0LTEyMzQ1Ng==",
                        "mutualUsername": "dGFyZ2V0", "mutualPassword": "b3RoZXItMTIzNDU2Nw=="}}),
    );
    let mut mv2 = mv.clone();
    mv2.status = serde_json::from_value(obj(&api, MV)["status"].clone()).unwrap();
    run(&mv2, &ctx, false).await.unwrap();
    for id in [1, 2] {
        let cfg = sva_node::config::Config::parse(&node_config(&api, id)).unwrap();
        let chap = cfg.target.chap.unwrap();
        assert_eq!(
            (chap.username.as_str(), chap.secret.as_str()),
            ("alice", "s3cret-123456")
        );
        assert_eq!(chap.mutual_secret.as_deref(), Some("other-1234567"));
        obj(&api, &format!("{PODS}/vol-p{id}"));
    }
    assert!(
        api.log().iter().all(|l| !l.contains("/configmaps/")),
        "{:?}",
        api.log()
    );
    assert_eq!(
        condition(&obj(&api, MV)["status"], "ConfigRendered")["status"],
        "True"
    );
}

/// spec.resyncRate reaches each node that reports another limit, with the node API token
/// from the volume's Secret, at the node's control port.
#[tokio::test]
async fn resync_rate_is_posted_with_the_volume_api_token() {
    let api = FakeApi::default();
    let mut mv = built_volume(&api).await;
    mv.spec.resync_rate = Some("64Mi".into());
    let members = [(1, PlexState::InSync), (2, PlexState::InSync)];
    let mut r2 = report("w2", 1, &members);
    r2.resync_rate_limit_bytes_per_sec = Some(64 << 20);
    let calls = RateCalls::default();
    let ctx = context_with_rates(
        &api,
        vec![
            ("10.9.0.1:32602".into(), report("w1", 1, &members)),
            ("10.9.0.2:32602".into(), r2),
        ],
        calls.clone(),
    );
    run(&mv, &ctx, false).await.unwrap();
    let token = obj(&api, SECRET)["stringData"]["api-token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        *calls.lock().unwrap(),
        [("10.9.0.1:32602".to_string(), token, 64 << 20)],
        "only w1's limit differs"
    );
}
