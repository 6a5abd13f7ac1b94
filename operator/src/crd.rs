//! Custom resources: `MirroredVolume` (what the user asks for) and `Plex` (one replica, owned by
//! its volume). DESIGN.md §8.
//!
//! ```text
//!   MirroredVolume (spec: size, plexes, hostTopologyKey, ...)
//!        | owns
//!        +-- Plex <vol>-p1 --> Pod <vol>-p1 (hostNetwork, pinned to node A) + PVC <vol>-p1-data
//!        +-- Plex <vol>-p2 --> Pod <vol>-p2 (node B, other physical host)   + PVC <vol>-p2-data
//! ```
//!
//! Status is `phase` for people, `conditions` (Ready, Synced, Degraded) as the contract. Schema
//! rules the apiserver enforces: plexes in 2..=3 and never fewer than before, size > 0 (pattern),
//! size / storageClassName / hostTopologyKey / cacheMode immutable (`self == oldSelf`).

// kube's derive repeats `printcolumn` attributes on the generated type.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of both kinds.
pub const GROUP: &str = "sva.io";
/// Default label naming a physical host (each hypervisor host labels its VMs' Nodes with it).
pub const DEFAULT_HOST_TOPOLOGY_KEY: &str = "sva.io/physical-host";
/// Default time a lost plex may stay lost before it is replaced on another host.
pub const DEFAULT_REPLACEMENT_TIMEOUT_SECONDS: u32 = 900;
/// Smallest and largest number of plexes (DESIGN.md §1: 2 or 3 physical hosts).
pub const PLEXES_MIN: u8 = 2;
pub const PLEXES_MAX: u8 = 3;

/// A block volume mirrored synchronously across `plexes` physical hosts, served over iSCSI.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sva.io",
    version = "v1alpha1",
    kind = "MirroredVolume",
    namespaced,
    shortname = "mv",
    status = "MirroredVolumeStatus",
    derive = "PartialEq",
    printcolumn(name = "Size", type_ = "string", json_path = ".spec.size"),
    printcolumn(name = "Plexes", type_ = "integer", json_path = ".spec.plexes"),
    printcolumn(name = "InSync", type_ = "integer", json_path = ".status.inSyncPlexes"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Resync",
        type_ = "string",
        json_path = ".status.resync.percent"
    ),
    printcolumn(
        name = "ETA(s)",
        type_ = "integer",
        json_path = ".status.resync.etaSeconds",
        priority = 1
    ),
    printcolumn(name = "Portal", type_ = "integer", json_path = ".status.portalPort"),
    printcolumn(
        name = "IQN",
        type_ = "string",
        json_path = ".status.targetIqn",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MirroredVolumeSpec {
    /// Capacity, bytes with an optional binary suffix (Ki, Mi, Gi, Ti), e.g. `10Gi`. Immutable.
    #[schemars(regex(pattern = r"^[1-9][0-9]*(Ki|Mi|Gi|Ti)?$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("size is immutable"))]
    pub size: String,
    /// Number of plexes (replicas), each on its own physical host. May grow 2 → 3, never shrink.
    #[serde(default = "default_plexes")]
    #[schemars(range(min = 2, max = 3))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("plexes can grow but not shrink"))]
    pub plexes: u8,
    /// StorageClass of the local PVs backing each plex (WaitForFirstConsumer). Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("storageClassName is immutable"))]
    pub storage_class_name: String,
    /// Node label whose value names the physical host; plexes go to distinct values. Immutable.
    #[serde(default = "default_host_topology_key")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("hostTopologyKey is immutable"))]
    pub host_topology_key: String,
    /// `writeThrough` (default, WCE=0) or `writeBack` (WCE=1). DESIGN.md §5 Durability. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("cacheMode is immutable"))]
    pub cache_mode: CacheMode,
    /// Secret with keys `username`, `password` (and `mutualUsername`, `mutualPassword` for
    /// mutual CHAP). No CHAP when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_secret_ref: Option<SecretRef>,
    /// Initiator IQNs allowed to log in; empty allows every initiator (with CHAP if set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_initiators: Vec<String>,
    /// Resync throttle, bytes per second with an optional binary suffix (e.g. `200Mi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(Ki|Mi|Gi|Ti)?$"))]
    pub resync_rate: Option<String>,
    /// How long a lost plex may stay lost before a replacement is built on another host.
    #[serde(default = "default_replacement_timeout")]
    #[schemars(range(min = 30))]
    pub replacement_timeout_seconds: u32,
    /// iSCSI portal port on every host (host networking); allocated by the operator when unset.
    /// The replication link uses `portalPort + 1`, the control API `portalPort + 2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65530))]
    pub portal_port: Option<u16>,
    /// sva-node image override (default: the operator's `--node-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// sva-node container resources override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

fn default_plexes() -> u8 {
    PLEXES_MIN
}
fn default_host_topology_key() -> String {
    DEFAULT_HOST_TOPOLOGY_KEY.to_string()
}
fn default_replacement_timeout() -> u32 {
    DEFAULT_REPLACEMENT_TIMEOUT_SECONDS
}

/// Write cache mode (DESIGN.md §5).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CacheMode {
    #[default]
    WriteThrough,
    WriteBack,
}

/// Reference to a Secret in the volume's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

/// Volume phase, for people; automation reads the conditions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum VolumePhase {
    #[default]
    Pending,
    Healthy,
    Degraded,
    Resyncing,
    Failed,
    Deleting,
}

/// One iSCSI path the initiator sees (one per plex whose node serves the volume).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathStatus {
    pub plex: String,
    pub node: String,
    /// `host:port` to add as an iSCSI send-targets / static target address.
    pub portal: String,
    /// Target port group id (= plex id).
    pub target_port_group: u16,
    pub alua_state: AluaState,
}

/// ALUA access state of a path (SPC-4 §6.37, as in REPORT TARGET PORT GROUPS).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AluaState {
    ActiveOptimized,
    Transitioning,
    #[default]
    Unavailable,
    Offline,
}

/// Resync progress of a plex (or the sum over a volume), as the sva-nodes report it in
/// `/v1/status` (DESIGN.md §6, §7).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResyncProgress {
    /// Bytes of the regions to resync that are done.
    pub done_bytes: u64,
    /// Bytes of the regions to resync.
    pub total_bytes: u64,
    /// Recent copy rate.
    pub bytes_per_sec: u64,
    /// `done/total` as a percentage string for the printer column, e.g. `42%`.
    #[serde(default)]
    pub percent: String,
    /// Seconds left: the node's own estimate when it gives one, else derived from the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Payload bytes actually copied (holes copy none, so this may stay below `doneBytes`).
    #[serde(default)]
    pub copied_bytes: u64,
    /// True for a full resync (new or replacement plex), false for an incremental one.
    #[serde(default)]
    pub full: bool,
}

impl ResyncProgress {
    /// Builds progress with the derived percent and ETA (`left / rate`, rounded up).
    pub fn new(done_bytes: u64, total_bytes: u64, bytes_per_sec: u64) -> Self {
        let pct = done_bytes
            .min(total_bytes)
            .saturating_mul(100)
            .checked_div(total_bytes);
        let percent = format!("{}%", pct.unwrap_or(100));
        let left = total_bytes.saturating_sub(done_bytes);
        let eta_seconds = left
            .checked_div(bytes_per_sec)
            .map(|s| s + u64::from(!left.is_multiple_of(bytes_per_sec.max(1))));
        Self {
            done_bytes,
            total_bytes,
            bytes_per_sec,
            percent,
            eta_seconds,
            copied_bytes: 0,
            full: false,
        }
    }

    /// Progress of one plex from a node's report; `None` when the node has no figures (all
    /// zero: no resync running, or not started yet). The node's ETA wins over the derived one.
    pub fn from_node(r: &sva_node::control::ResyncProgress) -> Option<Self> {
        (r.total_bytes > 0).then(|| {
            let derived = Self::new(r.done_bytes, r.total_bytes, r.bytes_per_sec);
            Self {
                copied_bytes: r.copied_bytes,
                full: r.full,
                eta_seconds: r.eta_seconds.or(derived.eta_seconds),
                ..derived
            }
        })
    }

    /// The sum over several plexes (volume status): bytes and rates add up, the ETA is the
    /// longest one (the volume is in sync when its slowest plex is).
    pub fn sum<'a>(parts: impl IntoIterator<Item = &'a ResyncProgress>) -> Option<Self> {
        let parts: Vec<&ResyncProgress> = parts.into_iter().collect();
        if parts.is_empty() {
            return None;
        }
        let add = |f: fn(&ResyncProgress) -> u64| parts.iter().map(|p| f(p)).sum::<u64>();
        let mut total = Self::new(
            add(|r| r.done_bytes),
            add(|r| r.total_bytes),
            add(|r| r.bytes_per_sec),
        );
        total.copied_bytes = add(|r| r.copied_bytes);
        total.full = parts.iter().any(|p| p.full);
        total.eta_seconds = parts
            .iter()
            .map(|p| p.eta_seconds)
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().max());
        Some(total)
    }
}

/// Observed state of a MirroredVolume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirroredVolumeStatus {
    #[serde(default)]
    pub phase: VolumePhase,
    /// Ready, Synced, Degraded (one entry per type).
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Portal port allocated to this volume on every host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_iqn: Option<String>,
    /// Membership epoch last reported by the data plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default)]
    pub in_sync_plexes: u8,
    #[serde(default)]
    pub paths: Vec<PathStatus>,
    /// Sum of the resync progress of every resyncing plex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncProgress>,
}

/// One replica of a volume on one physical host. Created and owned by the operator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sva.io",
    version = "v1alpha1",
    kind = "Plex",
    namespaced,
    shortname = "plex",
    status = "PlexStatus",
    derive = "PartialEq",
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volume"),
    printcolumn(name = "Id", type_ = "integer", json_path = ".spec.id"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "ALUA", type_ = "string", json_path = ".status.aluaState"),
    printcolumn(
        name = "Resync",
        type_ = "string",
        json_path = ".status.resync.percent"
    ),
    printcolumn(
        name = "ETA(s)",
        type_ = "integer",
        json_path = ".status.resync.etaSeconds",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PlexSpec {
    /// Name of the owning MirroredVolume. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("volume is immutable"))]
    pub volume: String,
    /// Plex id (1-based): the node's relative target port id and target port group id. Immutable.
    #[schemars(range(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("id is immutable"))]
    pub id: u16,
    /// Node the plex is pinned to. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("node is immutable"))]
    pub node: String,
    /// Value of the volume's hostTopologyKey on that node (the physical host).
    pub host: String,
    /// Id of the lost plex this one replaces (full resync, then the old one is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u16>,
}

/// Life cycle of a plex as the operator reports it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PlexPhase {
    /// Pod or PVC not ready yet.
    #[default]
    Pending,
    /// Being (re)synchronised from an in-sync plex.
    Resyncing,
    InSync,
    /// Behind the current epoch (its node is back or reachable, not resyncing yet).
    Stale,
    /// Node unreachable / plex out of the membership: counting towards the replacement timeout.
    Lost,
    /// Replaced or being deleted.
    Removed,
}

/// Observed state of a Plex.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlexStatus {
    #[serde(default)]
    pub state: PlexPhase,
    #[serde(default)]
    pub alua_state: AluaState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncProgress>,
    /// Unix seconds when the plex was first seen lost; cleared when it returns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_since: Option<i64>,
    /// Human-readable reason for the current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Schema of `conditions`: a list of meta/v1 Conditions merged by `type`
/// (`x-kubernetes-list-type: map`), so server-side apply and `kubectl wait` work per condition.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

/// Parses a size quantity (`1024`, `10Gi`, ...) into bytes; `None` if malformed or zero.
pub fn parse_bytes(quantity: &str) -> Option<u64> {
    let (digits, shift) = match quantity {
        q if q.ends_with("Ki") => (&q[..q.len() - 2], 10),
        q if q.ends_with("Mi") => (&q[..q.len() - 2], 20),
        q if q.ends_with("Gi") => (&q[..q.len() - 2], 30),
        q if q.ends_with("Ti") => (&q[..q.len() - 2], 40),
        q => (q, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let bytes = n.checked_mul(1u64 << shift)?;
    (bytes > 0).then_some(bytes)
}

/// Both CRDs as one multi-document YAML (what `crdgen` prints).
pub fn crds_yaml() -> String {
    use kube::CustomResourceExt;
    let docs = [
        serde_yaml::to_string(&MirroredVolume::crd()),
        serde_yaml::to_string(&Plex::crd()),
    ];
    docs.into_iter()
        .map(|d| format!("---\n{}", d.unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn parse_bytes_accepts_binary_suffixes_and_rejects_zero() {
        assert_eq!(parse_bytes("1Gi"), Some(1 << 30));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("3Ti"), Some(3 << 40));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("Gi"), None);
        assert_eq!(parse_bytes("1G"), None);
        assert_eq!(parse_bytes("99999999999Ti"), None);
    }

    #[test]
    fn crd_schema_carries_validation_and_list_map() {
        let crd = serde_json::to_string(&MirroredVolume::crd()).unwrap();
        assert!(crd.contains(r#""x-kubernetes-list-type":"map""#));
        assert!(crd.contains(r#""rule":"self == oldSelf""#));
        assert!(crd.contains(r#""rule":"self >= oldSelf""#));
        assert!(crd.contains(r#""minimum":2"#));
        assert!(crd.contains(r#""maximum":3"#));
        assert!(crd.contains(r#""shortNames":["mv"]"#));
        let plex = serde_json::to_string(&Plex::crd()).unwrap();
        assert!(plex.contains(r#""shortNames":["plex"]"#));
        // Resync progress reads in `kubectl get mv` / `kubectl get plex` (ETA with -o wide).
        for c in [&crd, &plex] {
            assert!(c.contains(r#""jsonPath":".status.resync.percent""#), "{c}");
            assert!(
                c.contains(r#""jsonPath":".status.resync.etaSeconds""#),
                "{c}"
            );
        }
    }

    #[test]
    fn resync_progress_derives_percent_and_eta() {
        let p = ResyncProgress::new(25, 100, 5);
        assert_eq!(p.percent, "25%");
        assert_eq!(p.eta_seconds, Some(15));
        assert_eq!(ResyncProgress::new(0, 0, 0).percent, "100%");
    }

    #[test]
    fn resync_progress_from_node_prefers_the_node_eta_and_sums_to_the_slowest() {
        let idle = sva_node::control::ResyncProgress::default();
        assert_eq!(ResyncProgress::from_node(&idle), None);
        let mut r = sva_node::control::ResyncProgress {
            done_bytes: 1 << 20,
            total_bytes: 4 << 20,
            bytes_per_sec: 1 << 20,
            copied_bytes: 512 << 10,
            full: true,
            ..Default::default()
        };
        let derived = ResyncProgress::from_node(&r).unwrap();
        assert_eq!(
            (
                derived.percent.as_str(),
                derived.eta_seconds,
                derived.copied_bytes,
                derived.full
            ),
            ("25%", Some(3), 512 << 10, true)
        );
        r.eta_seconds = Some(40);
        let a = ResyncProgress::from_node(&r).unwrap();
        assert_eq!(a.eta_seconds, Some(40));
        let b = ResyncProgress::new(3, 4, 1);
        let sum = ResyncProgress::sum([&a, &b]).unwrap();
        assert_eq!(sum.done_bytes, (1 << 20) + 3);
        assert_eq!(sum.eta_seconds, Some(40), "the slowest plex decides");
        assert!(sum.full);
        assert_eq!(ResyncProgress::sum([]), None);
    }

    #[test]
    fn checked_in_crds_match_crdgen_output() {
        let generated = crds_yaml();
        assert!(
            generated == include_str!("../../crds/sva.io.yaml"),
            "crds/ is stale: run crdgen"
        );
        assert!(
            generated == include_str!("../../charts/sva-operator/crds/sva.io.yaml"),
            "chart CRDs differ from crdgen"
        );
    }

    #[test]
    fn example_manifest_parses_into_the_typed_spec() {
        let mv: MirroredVolume =
            serde_yaml::from_str(include_str!("../../kind/mirroredvolume.yaml")).unwrap();
        assert_eq!(mv.spec.plexes, 2);
        assert_eq!(parse_bytes(&mv.spec.size), Some(1 << 30));
        assert_eq!(mv.spec.cache_mode, CacheMode::WriteThrough);
        assert!((PLEXES_MIN..=PLEXES_MAX).contains(&mv.spec.plexes));
    }
}
