//! Renders the sva-node configuration of each plex from the volume spec: the one documented
//! path by which the operator configures a node (ConfigMap `<vol>-sva-config`, key
//! `plex-<id>.yaml`, mounted in the pod as `/etc/sva/node.yaml`, read by
//! `sva-node serve --config /etc/sva/node.yaml`).
//!
//! The sva-node config format (sva-node/src/config.rs) was not defined on main when this was
//! written, so this renders the fields agreed in the operator issue; keep the two in step.

use crate::crd::{CacheMode, MirroredVolumeSpec};
use serde::Serialize;

/// Where the pod mounts its config, PVC and CHAP secret.
pub const CONFIG_PATH: &str = "/etc/sva/node.yaml";
pub const DATA_DIR: &str = "/var/lib/sva/data";
pub const CHAP_DIR: &str = "/etc/sva/chap";

/// Everything a plex's config needs beyond the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlexEndpoint {
    pub id: u16,
    pub node: String,
    /// Node address initiators and peers use (InternalIP), when known.
    pub address: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeConfig<'a> {
    plex_id: u16,
    node: &'a str,
    volume: VolumeCfg<'a>,
    target: TargetCfg<'a>,
    replication: ReplicationCfg,
    store: StoreCfg,
    state_dir: String,
    control: ControlCfg,
    witness: WitnessCfg,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct VolumeCfg<'a> {
    name: &'a str,
    uid: &'a str,
    size_bytes: u64,
    cache_mode: CacheMode,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TargetCfg<'a> {
    iqn: String,
    portal: String,
    portal_group_tag: u16,
    relative_target_port_id: u16,
    target_port_group_id: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    chap: Option<ChapCfg>,
    allowed_initiators: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ChapCfg {
    /// Directory holding the Secret's keys as files (username, password, mutualUsername, ...).
    secret_dir: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReplicationCfg {
    listen: String,
    peers: Vec<PeerCfg>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resync_bytes_per_sec: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerCfg {
    id: u16,
    node: String,
    addr: String,
    portal: String,
}

#[derive(Serialize)]
struct StoreCfg {
    path: String,
    create: bool,
}

#[derive(Serialize)]
struct ControlCfg {
    listen: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WitnessCfg {
    kind: &'static str,
    lease_name: String,
    namespace: String,
}

/// Target IQN shared by every node of the volume (DESIGN.md §4).
pub fn target_iqn(namespace: &str, volume: &str) -> String {
    format!("iqn.2024-01.io.sva:{namespace}.{volume}")
}

/// Name of the Lease that is the volume's witness.
pub fn lease_name(volume: &str) -> String {
    format!("{volume}-sva-witness")
}

/// Renders `plex`'s YAML config. `peers` are all live plexes of the volume (including `plex`).
#[allow(clippy::too_many_arguments)]
pub fn render(
    namespace: &str,
    volume: &str,
    uid: &str,
    spec: &MirroredVolumeSpec,
    size_bytes: u64,
    portal_port: u16,
    plex: &PlexEndpoint,
    peers: &[PlexEndpoint],
) -> String {
    let host = |p: &PlexEndpoint| p.address.clone().unwrap_or_else(|| p.node.clone());
    let cfg = NodeConfig {
        plex_id: plex.id,
        node: &plex.node,
        volume: VolumeCfg {
            name: volume,
            uid,
            size_bytes,
            cache_mode: spec.cache_mode,
        },
        target: TargetCfg {
            iqn: target_iqn(namespace, volume),
            portal: format!("{}:{portal_port}", host(plex)),
            // Per-node ids, never shared: Linux merges equal port group ids (DESIGN.md §4).
            portal_group_tag: plex.id,
            relative_target_port_id: plex.id,
            target_port_group_id: plex.id,
            chap: spec.chap_secret_ref.as_ref().map(|_| ChapCfg {
                secret_dir: CHAP_DIR,
            }),
            allowed_initiators: &spec.allowed_initiators,
        },
        replication: ReplicationCfg {
            listen: format!("0.0.0.0:{}", portal_port.saturating_add(1)),
            peers: peers
                .iter()
                .filter(|p| p.id != plex.id)
                .map(|p| PeerCfg {
                    id: p.id,
                    node: p.node.clone(),
                    addr: format!("{}:{}", host(p), portal_port.saturating_add(1)),
                    portal: format!("{}:{portal_port}", host(p)),
                })
                .collect(),
            resync_bytes_per_sec: spec
                .resync_rate
                .as_deref()
                .and_then(crate::crd::parse_bytes),
        },
        store: StoreCfg {
            path: format!("{DATA_DIR}/volume.img"),
            create: true,
        },
        state_dir: format!("{DATA_DIR}/state"),
        control: ControlCfg {
            listen: format!("0.0.0.0:{}", portal_port.saturating_add(2)),
        },
        witness: WitnessCfg {
            kind: "kubernetesLease",
            lease_name: lease_name(volume),
            namespace: namespace.to_string(),
        },
    };
    // Serializing plain structs of strings and numbers cannot fail.
    serde_yaml::to_string(&cfg).unwrap_or_default()
}
