//! Reconciler of `MirroredVolume`: observe → `plan::plan` → apply, behind a finalizer.
//!
//! ```text
//!   watch MirroredVolume (+ owned Plex, Pod) ──> reconcile(mv)
//!       finalizer Apply   -> observe(): Nodes, Plexes, Pods, PVCs, the CHAP Secret,
//!                                      GET /v1/status of each node
//!                            plan()   -> Vec<Step>
//!                            apply()  -> server-side apply / create / delete / status / Events,
//!                                        POST /v1/resync-rate to nodes (API token)
//!       finalizer Cleanup -> the same with `deleting = true` (pods, PVCs, plexes, Lease go)
//! ```
//!
//! Every object is owned by its volume (ownerReferences), labelled `sva.io/volume=<name>`, and
//! written with server-side apply (field manager `sva-operator`), so applying a plan twice is
//! harmless. Node changes are not watched: a non-Healthy volume is requeued every
//! `plan::REQUEUE_BUSY_SECS`, which also polls the data plane.

use crate::crd::{MirroredVolume, Plex, PlexSpec};
use crate::metrics::{ErrorLabels, Metrics, VolumeLabels};
use crate::node_api::{self, NodeStatusReport};
use crate::nodeconfig::{self, lease_name, secret_name};
use crate::plan::{self, EventKind, NodeView, Observed, PlexView, Step};
use futures::future::BoxFuture;
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Finalizer on every MirroredVolume the operator has started building.
pub const FINALIZER: &str = "sva.io/cleanup";
/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "sva-operator";
/// Label tying objects to their volume.
pub const VOLUME_LABEL: &str = "sva.io/volume";
pub const PLEX_LABEL: &str = "sva.io/plex";

/// Errors of one reconcile; `metric_label` names them in `sva_operator_reconcile_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("no free portal port slot")]
    NoPortalPort,
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::MissingField(_) => "missing_field",
            Error::NoPortalPort => "no_portal_port",
        }
    }
}

/// Fetches a node's `/v1/status` (`None` = unreachable). Injected so tests send no traffic.
pub type StatusFetcher =
    Arc<dyn Fn(String) -> BoxFuture<'static, Option<NodeStatusReport>> + Send + Sync>;
/// `POST /v1/resync-rate` to a node: `(control address, API token, bytes/s)`; `Err` says why.
/// Injected so tests send no traffic.
pub type RateSetter =
    Arc<dyn Fn(String, String, u64) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Operator-wide settings (from the command line).
#[derive(Clone, Debug)]
pub struct Settings {
    pub node_image: String,
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub fetch_status: StatusFetcher,
    pub set_resync_rate: RateSetter,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let fetch_status: StatusFetcher = Arc::new(|addr: String| {
            async move {
                match node_api::fetch_status(&addr).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "node status unreachable");
                        None
                    }
                }
            }
            .boxed()
        });
        let set_resync_rate: RateSetter = Arc::new(|addr: String, token: String, rate: u64| {
            async move {
                node_api::post_resync_rate(&addr, &token, rate)
                    .await
                    .map_err(|e| e.to_string())
            }
            .boxed()
        });
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            fetch_status,
            set_resync_rate,
        }
    }
}

/// Reconciles one volume (entry point for `kube::runtime::Controller`).
pub async fn reconcile(mv: Arc<MirroredVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = mv.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<MirroredVolume> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, mv, |event| async {
        match event {
            Finalizer::Apply(mv) => run(&mv, &ctx, false).await,
            Finalizer::Cleanup(mv) => run(&mv, &ctx, true).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Requeues failed reconciles with a short delay and counts the error kind.
pub fn error_policy(mv: Arc<MirroredVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(volume = %mv.name_any(), %error, "reconcile failed");
    ctx.metrics
        .errors
        .get_or_create(&ErrorLabels {
            error: error.metric_label().into(),
        })
        .inc();
    Action::requeue(Duration::from_secs(15))
}

/// Observe, plan and apply once.
pub async fn run(mv: &MirroredVolume, ctx: &Context, deleting: bool) -> Result<Action, Error> {
    let obs = observe(mv, ctx, deleting).await?;
    let steps = plan::plan(&obs);
    tracing::debug!(volume = %obs.name, ?steps, "plan");
    let labels = VolumeLabels {
        namespace: obs.namespace.clone(),
        volume: obs.name.clone(),
    };
    let action = apply(mv, &obs, ctx, &steps).await?;
    if let Some(Step::VolumeStatus(st)) = steps.iter().find(|s| matches!(s, Step::VolumeStatus(_)))
    {
        let healthy = i64::from(st.phase == crate::crd::VolumePhase::Healthy);
        ctx.metrics
            .volume_healthy
            .get_or_create(&labels)
            .set(healthy);
        ctx.metrics
            .volume_plexes_in_sync
            .get_or_create(&labels)
            .set(i64::from(st.in_sync_plexes));
    }
    if deleting {
        ctx.metrics.volume_healthy.remove(&labels);
        ctx.metrics.volume_plexes_in_sync.remove(&labels);
    }
    Ok(action)
}

fn selector(name: &str) -> ListParams {
    ListParams::default().labels(&format!("{VOLUME_LABEL}={name}"))
}

/// Reads everything `plan` needs.
pub async fn observe(
    mv: &MirroredVolume,
    ctx: &Context,
    deleting: bool,
) -> Result<Observed, Error> {
    let ns = mv.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = mv.name_any();
    let uid = mv.uid().ok_or(Error::MissingField("uid"))?;
    let client = ctx.client.clone();
    let status = mv.status.clone().unwrap_or_default();
    let key = &mv.spec.host_topology_key;

    let nodes: Vec<NodeView> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|n| node_view(&n, key))
        .collect();
    let pods: BTreeMap<String, Pod> = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&selector(&name))
        .await?
        .items
        .into_iter()
        .map(|p| (p.name_any(), p))
        .collect();
    let pvcs: BTreeSet<String> = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .list(&selector(&name))
        .await?
        .items
        .into_iter()
        .map(|p| p.name_any())
        .collect();
    let plexes: Vec<PlexView> = Api::<Plex>::namespaced(client.clone(), &ns)
        .list(&selector(&name))
        .await?
        .items
        .into_iter()
        .filter(|p| p.spec.volume == name)
        .map(|p| {
            let id = p.spec.id;
            let pod_ready = pods.get(&pod_name(&name, id)).map(pod_is_ready);
            PlexView {
                id,
                node: p.spec.node.clone(),
                host: p.spec.host.clone(),
                replaces: p.spec.replaces,
                status: p.status.clone().unwrap_or_default(),
                pod_ready,
                pvc_exists: pvcs.contains(&pvc_name(&name, id)),
            }
        })
        .collect();

    let portal_port = match mv.spec.portal_port.or(status.portal_port) {
        Some(p) => p,
        None => {
            let used: BTreeSet<u16> = Api::<MirroredVolume>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|o| o.uid() != mv.uid())
                .filter_map(|o| o.spec.portal_port.or(o.status.as_ref()?.portal_port))
                .flat_map(|p| [p, p.saturating_add(1), p.saturating_add(2)])
                .collect();
            plan::allocate_portal_port(&used).ok_or(Error::NoPortalPort)?
        }
    };

    // The data-plane signal: every plex's node control API, concurrently.
    let fetches = plexes.iter().filter_map(|p| {
        let addr = nodes.iter().find(|n| n.name == p.node)?.address.clone()?;
        let control = format!("{addr}:{}", portal_port.saturating_add(2));
        let fetch = ctx.fetch_status.clone();
        let id = p.id;
        Some(async move { (id, fetch(control).await) })
    });
    let reports = futures::future::join_all(fetches)
        .await
        .into_iter()
        .filter_map(|(id, r)| Some((id, r?)))
        .filter(|(_, r)| r.volume == name)
        .collect();

    // CHAP credentials: read on every reconcile (no watch on user Secrets), so a fixed or
    // rotated Secret reaches the configs within one requeue interval.
    let chap = match &mv.spec.chap_secret_ref {
        None => None,
        Some(r) => Some(
            match Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&r.name)
                .await
            {
                Ok(Some(secret)) => nodeconfig::chap_from_secret(&r.name, &secret_bytes(&secret)),
                Ok(None) => Err(format!("CHAP Secret {} not found", r.name)),
                Err(kube::Error::Api(s)) => {
                    Err(format!("CHAP Secret {}: {} ({})", r.name, s.reason, s.code))
                }
                Err(e) => return Err(e.into()),
            },
        ),
    };

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Ok(Observed {
        now,
        namespace: ns,
        name,
        uid,
        generation: mv.metadata.generation,
        deleting,
        spec: mv.spec.clone(),
        status,
        portal_port,
        nodes,
        plexes,
        reports,
        chap,
    })
}

/// A Secret's values as bytes (`data`, overlaid by `stringData` as the apiserver would).
fn secret_bytes(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

fn node_view(n: &Node, host_key: &str) -> NodeView {
    let status = n.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let address = status.and_then(|s| s.addresses.as_ref()).and_then(|a| {
        a.iter()
            .find(|a| a.type_ == "InternalIP")
            .or_else(|| a.first())
            .map(|a| a.address.clone())
    });
    NodeView {
        name: n.name_any(),
        host: n.labels().get(host_key).cloned(),
        ready,
        schedulable: !n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        address,
    }
}

fn pod_is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

pub fn plex_name(volume: &str, id: u16) -> String {
    format!("{volume}-p{id}")
}
pub fn pod_name(volume: &str, id: u16) -> String {
    format!("{volume}-p{id}")
}
pub fn pvc_name(volume: &str, id: u16) -> String {
    format!("{volume}-p{id}-data")
}
pub fn config_name(volume: &str) -> String {
    format!("{volume}-sva-config")
}
pub fn node_account_name(volume: &str) -> String {
    format!("{volume}-sva-node")
}

/// Executes the plan's steps in order.
pub async fn apply(
    mv: &MirroredVolume,
    obs: &Observed,
    ctx: &Context,
    steps: &[Step],
) -> Result<Action, Error> {
    let client = ctx.client.clone();
    let ns = obs.namespace.as_str();
    let vol = obs.name.as_str();
    let owner = mv
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("uid"))?;
    let meta = |name: String, extra: Option<(&str, String)>| {
        let mut labels = BTreeMap::from([
            (VOLUME_LABEL.to_string(), vol.to_string()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                FIELD_MANAGER.to_string(),
            ),
        ]);
        if let Some((k, v)) = extra {
            labels.insert(k.to_string(), v);
        }
        json!({"name": name, "namespace": ns, "labels": labels, "ownerReferences": [owner]})
    };
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let mut action = Action::await_change();
    // The node API token, read from the volume's Secret when a step first needs it.
    let mut token: Option<String> = None;
    for step in steps {
        match step {
            Step::EnsureLease => {
                let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
                let lease: Lease = serde_json::from_value(
                    json!({"metadata": meta(lease_name(vol), None), "spec": {}}),
                )
                .map_err(|_| Error::MissingField("lease"))?;
                match leases.create(&PostParams::default(), &lease).await {
                    Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                    r => {
                        r?;
                    }
                }
                // The sva-nodes may only get/update their own volume's Lease.
                let sa = node_account_name(vol);
                let sa_obj = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(sa.clone(), None)});
                Api::<ServiceAccount>::namespaced(client.clone(), ns)
                    .patch(&sa, &ssa, &Patch::Apply(sa_obj))
                    .await?;
                let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": meta(sa.clone(), None),
                    "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "resourceNames": [lease_name(vol)], "verbs": ["get", "update"]}]});
                Api::<Role>::namespaced(client.clone(), ns)
                    .patch(&sa, &ssa, &Patch::Apply(role))
                    .await?;
                let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": meta(sa.clone(), None),
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
                    "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]});
                Api::<RoleBinding>::namespaced(client.clone(), ns)
                    .patch(&sa, &ssa, &Patch::Apply(binding))
                    .await?;
            }
            Step::EnsureConfig { data } => {
                // A Secret, not a ConfigMap: the configs carry CHAP credentials.
                let data: BTreeMap<&String, ByteString> = data
                    .iter()
                    .map(|(k, v)| (k, ByteString(v.clone().into_bytes())))
                    .collect();
                let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": meta(config_name(vol), None), "data": data});
                Api::<Secret>::namespaced(client.clone(), ns)
                    .patch(&config_name(vol), &ssa, &Patch::Apply(secret))
                    .await?;
            }
            Step::EnsureSecret => {
                // Created once with a fresh random replication secret and API token; an
                // existing Secret is left alone so the nodes' shared secret never changes under
                // them (only a missing API token is added, for volumes made before it existed).
                let secrets = Api::<Secret>::namespaced(client.clone(), ns);
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": meta(secret_name(vol), None),
                    "type": "Opaque",
                    "stringData": {nodeconfig::REPLICATION_SECRET_KEY: random_secret(),
                                   nodeconfig::API_TOKEN_KEY: random_secret()}}))
                .map_err(|_| Error::MissingField("secret"))?;
                match secrets.create(&PostParams::default(), &secret).await {
                    Err(kube::Error::Api(s)) if s.is_already_exists() => {
                        let current = secrets.get(&secret_name(vol)).await?;
                        if !secret_bytes(&current).contains_key(nodeconfig::API_TOKEN_KEY) {
                            let patch = json!({"data": {nodeconfig::API_TOKEN_KEY:
                                ByteString(random_secret().into_bytes())}});
                            secrets
                                .patch(
                                    &secret_name(vol),
                                    &PatchParams::default(),
                                    &Patch::Merge(patch),
                                )
                                .await?;
                        }
                    }
                    r => {
                        r?;
                    }
                }
            }
            Step::SetResyncRate { id, bytes_per_sec } => {
                // Best effort: the plan asks again on the next round while the node's reported
                // limit differs, so a failure is logged and counted, not fatal.
                if token.is_none() {
                    token = Api::<Secret>::namespaced(client.clone(), ns)
                        .get_opt(&secret_name(vol))
                        .await?
                        .and_then(|s| {
                            let t = secret_bytes(&s).remove(nodeconfig::API_TOKEN_KEY)?;
                            String::from_utf8(t).ok().map(|t| t.trim().to_string())
                        });
                }
                let addr = obs
                    .plexes
                    .iter()
                    .find(|p| p.id == *id)
                    .and_then(|p| obs.nodes.iter().find(|n| n.name == p.node))
                    .and_then(|n| n.address.clone())
                    .map(|a| format!("{a}:{}", obs.portal_port.saturating_add(2)));
                let result = match (addr, token.clone()) {
                    (Some(addr), Some(t)) => (ctx.set_resync_rate)(addr, t, *bytes_per_sec).await,
                    (None, _) => Err("node has no address".into()),
                    (_, None) => Err(format!("Secret {} has no API token", secret_name(vol))),
                };
                match result {
                    Ok(()) => {
                        tracing::info!(volume = vol, plex = id, bytes_per_sec, "resync rate set")
                    }
                    Err(e) => {
                        tracing::warn!(volume = vol, plex = id, error = %e, "could not set resync rate");
                        ctx.metrics
                            .errors
                            .get_or_create(&ErrorLabels {
                                error: "resync_rate".into(),
                            })
                            .inc();
                    }
                }
            }
            Step::CreatePlex {
                id,
                node,
                host,
                replaces,
            } => {
                let spec = PlexSpec {
                    volume: vol.into(),
                    id: *id,
                    node: node.clone(),
                    host: host.clone(),
                    replaces: *replaces,
                };
                let plex = json!({"apiVersion": "sva.io/v1alpha1", "kind": "Plex",
                    "metadata": meta(plex_name(vol, *id), Some((PLEX_LABEL, id.to_string()))), "spec": spec});
                Api::<Plex>::namespaced(client.clone(), ns)
                    .patch(&plex_name(vol, *id), &ssa, &Patch::Apply(plex))
                    .await?;
            }
            Step::EnsurePvc { id, .. } => {
                let size = crate::crd::parse_bytes(&obs.spec.size).unwrap_or(0);
                // Room for the volume plus the sva-node state (bitmap, activity log): 1/64 + 64 MiB.
                let request = size.saturating_add(size / 64).saturating_add(64 << 20);
                let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": meta(pvc_name(vol, *id), Some((PLEX_LABEL, id.to_string()))),
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": obs.spec.storage_class_name,
                             "resources": {"requests": {"storage": request.to_string()}}}});
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
                    .patch(&pvc_name(vol, *id), &ssa, &Patch::Apply(pvc))
                    .await?;
            }
            Step::EnsurePod { id, node } => {
                let pod = pod_manifest(
                    obs,
                    &ctx.settings,
                    *id,
                    node,
                    meta(pod_name(vol, *id), Some((PLEX_LABEL, id.to_string()))),
                );
                Api::<Pod>::namespaced(client.clone(), ns)
                    .patch(&pod_name(vol, *id), &ssa, &Patch::Apply(pod))
                    .await?;
            }
            Step::DeletePod { id } => delete::<Pod>(&client, ns, &pod_name(vol, *id)).await?,
            Step::DeletePvc { id } => {
                delete::<PersistentVolumeClaim>(&client, ns, &pvc_name(vol, *id)).await?
            }
            Step::DeletePlex { id } => delete::<Plex>(&client, ns, &plex_name(vol, *id)).await?,
            Step::DeleteConfig => delete::<Secret>(&client, ns, &config_name(vol)).await?,
            Step::DeleteSecret => delete::<Secret>(&client, ns, &secret_name(vol)).await?,
            Step::DeleteLease => delete::<Lease>(&client, ns, &lease_name(vol)).await?,
            Step::PlexStatus { id, status } => {
                let patch = Patch::Merge(json!({"status": status}));
                match Api::<Plex>::namespaced(client.clone(), ns)
                    .patch_status(&plex_name(vol, *id), &PatchParams::default(), &patch)
                    .await
                {
                    // A plex created in this same plan may not be visible yet; next round.
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    r => {
                        r?;
                    }
                }
            }
            Step::VolumeStatus(status) => {
                let patch = Patch::Merge(json!({"status": status}));
                Api::<MirroredVolume>::namespaced(client.clone(), ns)
                    .patch_status(vol, &PatchParams::default(), &patch)
                    .await?;
            }
            Step::Event { kind, reason, note } => {
                let ev = Event {
                    type_: match kind {
                        EventKind::Normal => EventType::Normal,
                        EventKind::Warning => EventType::Warning,
                    },
                    reason: (*reason).into(),
                    note: Some(note.clone()),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                // Events are best effort: losing one must not fail the reconcile.
                if let Err(e) = ctx.recorder.publish(&ev, &mv.object_ref(&())).await {
                    tracing::warn!(error = %e, reason, "could not publish event");
                }
            }
            Step::Requeue { after_secs } => {
                action = Action::requeue(Duration::from_secs(*after_secs))
            }
        }
    }
    Ok(action)
}

/// Bytes of randomness in a volume's replication secret (sva-node needs at least 16).
pub const REPLICATION_SECRET_BYTES: usize = 32;

/// A fresh replication secret: [`REPLICATION_SECRET_BYTES`] random bytes, hex (text-safe in a
/// Secret and in the file sva-node reads).
fn random_secret() -> String {
    let mut bytes = [0u8; REPLICATION_SECRET_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    hex::encode(bytes)
}

async fn delete<K>(client: &Client, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    match Api::<K>::namespaced(client.clone(), ns)
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The sva-node pod of plex `id`: pinned to `node` by node affinity (so the scheduler still binds
/// the WaitForFirstConsumer PVC), host networking (initiators outside the cluster reach the
/// portal), tolerating NotReady/Unreachable forever (a partitioned node's plex must not be
/// evicted: the data plane decides), probes on the control API's `/healthz`.
pub fn pod_manifest(
    obs: &Observed,
    settings: &Settings,
    id: u16,
    node: &str,
    metadata: serde_json::Value,
) -> serde_json::Value {
    let vol = obs.name.as_str();
    let port = obs.portal_port;
    let image = obs
        .spec
        .image
        .clone()
        .unwrap_or_else(|| settings.node_image.clone());
    let mut volumes = vec![
        json!({"name": "config", "secret": {"secretName": config_name(vol), "defaultMode": 0o440,
               "items": [{"key": format!("plex-{id}.yaml"), "path": "node.yaml"}]}}),
        json!({"name": "data", "persistentVolumeClaim": {"claimName": pvc_name(vol, id)}}),
    ];
    volumes.push(
        json!({"name": "secrets", "secret": {"secretName": secret_name(vol),
        "defaultMode": 0o440, "items": [
            {"key": nodeconfig::REPLICATION_SECRET_KEY, "path": nodeconfig::REPLICATION_SECRET_KEY},
            {"key": nodeconfig::API_TOKEN_KEY, "path": nodeconfig::API_TOKEN_KEY}]}}),
    );
    let mounts = vec![
        json!({"name": "config", "mountPath": nodeconfig::CONFIG_PATH, "subPath": "node.yaml", "readOnly": true}),
        json!({"name": "data", "mountPath": nodeconfig::DATA_DIR}),
        json!({"name": "secrets", "mountPath": nodeconfig::SECRETS_DIR, "readOnly": true}),
    ];
    let control = port.saturating_add(2);
    // Readiness = serving the volume (`/healthz`, 503 while Unavailable or resyncing), so only
    // ready paths count. Liveness only asks whether the process answers at all: a node that is
    // out of sync must stay up to be resynced, not be restarted by the kubelet.
    let readiness = json!({"httpGet": {"path": "/healthz", "port": control}, "periodSeconds": 5});
    let liveness = json!({"tcpSocket": {"port": control}, "periodSeconds": 10,
                          "initialDelaySeconds": 60, "failureThreshold": 6});
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {
            "hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "serviceAccountName": node_account_name(vol),
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}],
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "sva-node",
                "image": image,
                "args": ["serve", "--config", nodeconfig::CONFIG_PATH],
                "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                "ports": [
                    {"name": "iscsi", "containerPort": port, "protocol": "TCP"},
                    {"name": "replication", "containerPort": port.saturating_add(1), "protocol": "TCP"},
                    {"name": "control", "containerPort": port.saturating_add(2), "protocol": "TCP"}],
                "readinessProbe": readiness,
                "livenessProbe": liveness,
                "resources": obs.spec.resources.clone().map(|r| serde_json::to_value(r).unwrap_or_default()).unwrap_or(json!({})),
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    })
}

#[cfg(test)]
mod tests;
