//! Renders the sva-node configuration of each plex from the volume spec: the one documented
//! path by which the operator configures a node (ConfigMap `<vol>-sva-config`, key
//! `plex-<id>.yaml`, mounted in the pod as `/etc/sva/node.yaml`, read by
//! `sva-node serve --config /etc/sva/node.yaml`).
//!
//! The config is built as sva-node's own [`sva_node::config::Config`] and checked with
//! sva-node's validation ([`Config::parse`] of the YAML) before it leaves the operator, so the
//! two cannot drift: a config sva-node would refuse is a [`RenderError`] here, not a crash loop.
//!
//! ```text
//!  plex N's node (hostNetwork, InternalIP H):
//!    iSCSI portal  H:portalPort      (target.portal, mirror.plexes[].portal)
//!    replication   H:portalPort+1    (mirror.listen, mirror.plexes[].peerAddr)
//!    control API   0.0.0.0:portalPort+2 (control.listen; probes, operator GET /v1/status)
//!    witness       Lease <vol>-sva-witness in the volume's namespace (kubernetesLease)
//!    secrets       Secret <vol>-sva-secrets at /etc/sva/secrets (replication secret)
//!    data          PVC <vol>-p<N>-data at /var/lib/sva/data (store, stateDir)
//! ```

use crate::crd::{CacheMode, MirroredVolumeSpec};
use std::path::PathBuf;
use sva_node::config::{
    Config, ControlConfig, KubernetesLeaseSection, MirrorSection, PlexSection, StoreConfig,
    TargetSection, VolumeConfig, WitnessSection,
};

/// Where the pod mounts its config, PVC and secrets.
pub const CONFIG_PATH: &str = "/etc/sva/node.yaml";
pub const DATA_DIR: &str = "/var/lib/sva/data";
pub const SECRETS_DIR: &str = "/etc/sva/secrets";
/// Key of the replication secret in the volume's Secret (and file name under [`SECRETS_DIR`]).
pub const REPLICATION_SECRET_KEY: &str = "replication-secret";

/// Everything a plex's config needs beyond the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlexEndpoint {
    pub id: u16,
    pub node: String,
    /// Node address initiators and peers use (InternalIP), when known.
    pub address: Option<String>,
}

/// Why a plex's config cannot be rendered (the plan reports it as a Warning event and writes
/// no config, so no pod starts with a config its sva-node would refuse).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    /// sva-node needs IP portals; a node without an address cannot be configured yet.
    #[error("node {node} (plex {id}) has no address yet")]
    NoAddress { id: u16, node: String },
    /// sva-node reads CHAP credentials inline from its config, which lives in a ConfigMap; the
    /// operator does not copy Secret values into ConfigMaps, so CHAP is not wired yet.
    #[error("CHAP (chapSecretRef) is not supported by the operator yet")]
    ChapUnsupported,
    /// sva-node's own validation refused the config (a bug or an unusable spec value).
    #[error("sva-node refuses the config of plex {id}: {reason}")]
    Invalid { id: u16, reason: String },
}

/// Target IQN shared by every node of the volume (DESIGN.md §4).
pub fn target_iqn(namespace: &str, volume: &str) -> String {
    format!("iqn.2024-01.io.sva:{namespace}.{volume}")
}

/// Name of the Lease that is the volume's witness (sva-node's convention).
pub fn lease_name(volume: &str) -> String {
    sva_node::witness::lease::lease_name(volume)
}

/// Name of the volume's Secret (replication secret), created once by the operator.
pub fn secret_name(volume: &str) -> String {
    format!("{volume}-sva-secrets")
}

/// Everything the nodes of one volume share.
#[derive(Debug, Clone, Copy)]
pub struct VolumeInputs<'a> {
    pub namespace: &'a str,
    pub volume: &'a str,
    pub uid: &'a str,
    pub spec: &'a MirroredVolumeSpec,
    pub size_bytes: u64,
    pub portal_port: u16,
}

/// `plex`'s sva-node config. `peers` are all live plexes of the volume (including `plex`).
pub fn config(
    v: &VolumeInputs<'_>,
    plex: &PlexEndpoint,
    peers: &[PlexEndpoint],
) -> Result<Config, RenderError> {
    if v.spec.chap_secret_ref.is_some() {
        return Err(RenderError::ChapUnsupported);
    }
    let host = |p: &PlexEndpoint| {
        p.address.clone().ok_or_else(|| RenderError::NoAddress {
            id: p.id,
            node: p.node.clone(),
        })
    };
    let replication_port = v.portal_port.saturating_add(1);
    let control_port = v.portal_port.saturating_add(2);
    let me = host(plex)?;
    let portal = format!("{me}:{}", v.portal_port);
    let mut plexes = peers
        .iter()
        .map(|p| {
            let h = host(p)?;
            Ok(PlexSection {
                id: p.id,
                node: p.node.clone(),
                portal: format!("{h}:{}", v.portal_port),
                peer_addr: format!("{h}:{replication_port}"),
            })
        })
        .collect::<Result<Vec<_>, RenderError>>()?;
    if !plexes.iter().any(|p| p.id == plex.id) {
        plexes.push(PlexSection {
            id: plex.id,
            node: plex.node.clone(),
            portal: portal.clone(),
            peer_addr: format!("{me}:{replication_port}"),
        });
    }
    plexes.sort_by_key(|p| p.id);
    Ok(Config {
        volume: VolumeConfig {
            name: v.volume.to_string(),
            uid: v.uid.to_string(),
            size_bytes: v.size_bytes,
            cache_mode: match v.spec.cache_mode {
                CacheMode::WriteThrough => sva_node::config::CacheMode::WriteThrough,
                CacheMode::WriteBack => sva_node::config::CacheMode::WriteBack,
            },
        },
        target: TargetSection {
            iqn: target_iqn(v.namespace, v.volume),
            portal,
            // Per-node ids, never shared: Linux merges equal port group ids (DESIGN.md §4).
            portal_group_tag: plex.id,
            relative_target_port_id: plex.id,
            target_port_group_id: plex.id,
            alias: Some(format!("{}/{}", v.namespace, v.volume)),
            chap: None,
            allowed_initiators: v.spec.allowed_initiators.clone(),
            // Default: every plex's portal (sva-node derives it from `mirror.plexes`).
            send_targets: vec![],
        },
        store: StoreConfig {
            path: PathBuf::from(format!("{DATA_DIR}/volume.img")),
            create: true,
        },
        state_dir: PathBuf::from(format!("{DATA_DIR}/state")),
        control: Some(ControlConfig {
            // All addresses: the kubelet probes and the operator may use any node IP.
            listen: format!("0.0.0.0:{control_port}"),
            token_file: None,
        }),
        mirror: Some(MirrorSection {
            listen: format!("{me}:{replication_port}"),
            secret_file: PathBuf::from(format!("{SECRETS_DIR}/{REPLICATION_SECRET_KEY}")),
            plexes,
            witness: WitnessSection::KubernetesLease(KubernetesLeaseSection {
                namespace: Some(v.namespace.to_string()),
                name: lease_name(v.volume),
            }),
            region_bytes: None,
            resync_bytes_per_sec: None,
            activity_log_regions: None,
        }),
    })
}

/// `plex`'s config as the YAML the pod mounts, validated by sva-node's own parser.
pub fn render(
    v: &VolumeInputs<'_>,
    plex: &PlexEndpoint,
    peers: &[PlexEndpoint],
) -> Result<String, RenderError> {
    let cfg = config(v, plex, peers)?;
    let invalid = |reason: String| RenderError::Invalid {
        id: plex.id,
        reason,
    };
    let yaml = serde_yaml::to_string(&cfg).map_err(|e| invalid(e.to_string()))?;
    let parsed = Config::parse(&yaml).map_err(|e| invalid(e.to_string()))?;
    if parsed != cfg {
        return Err(invalid("the YAML does not read back as written".into()));
    }
    Ok(yaml)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cache_mode: CacheMode, initiators: &[&str]) -> MirroredVolumeSpec {
        let mut s: MirroredVolumeSpec = serde_json::from_value(serde_json::json!({
            "size": "1Gi", "plexes": 3, "storageClassName": "sva-local"}))
        .unwrap();
        s.cache_mode = cache_mode;
        s.allowed_initiators = initiators.iter().map(|s| s.to_string()).collect();
        s
    }

    fn endpoints(n: u16) -> Vec<PlexEndpoint> {
        (1..=n)
            .map(|id| PlexEndpoint {
                id,
                node: format!("w{id}"),
                address: Some(format!("10.0.0.{id}")),
            })
            .collect()
    }

    fn inputs(spec: &MirroredVolumeSpec) -> VolumeInputs<'_> {
        VolumeInputs {
            namespace: "storage",
            volume: "vol",
            uid: "uid-1",
            spec,
            size_bytes: 1 << 30,
            portal_port: 32600,
        }
    }

    /// Every config the operator renders is one sva-node accepts, for every plex of 2- and
    /// 3-plex volumes, both cache modes, with and without an initiator ACL.
    #[test]
    fn every_rendered_config_passes_sva_node_parse() {
        for (mode, acl) in [
            (CacheMode::WriteThrough, vec![]),
            (CacheMode::WriteBack, vec!["iqn.1993-08.org.debian:01:abc"]),
        ] {
            let spec = spec(mode, &acl);
            for n in [2, 3] {
                let peers = endpoints(n);
                for p in &peers {
                    let yaml = render(&inputs(&spec), p, &peers).unwrap();
                    let cfg = Config::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
                    assert_eq!(cfg.target.relative_target_port_id, p.id);
                    assert_eq!(cfg.target.allowed_initiators.len(), acl.len());
                    let m = cfg.mirror.unwrap();
                    assert_eq!(m.plexes.len(), usize::from(n));
                }
            }
        }
    }

    #[test]
    fn plex_config_names_ports_lease_and_secrets() {
        let spec = spec(CacheMode::WriteBack, &[]);
        let peers = endpoints(2);
        let cfg = config(&inputs(&spec), &peers[1], &peers).unwrap();
        assert_eq!(cfg.target.portal, "10.0.0.2:32600");
        assert_eq!(cfg.target.iqn, "iqn.2024-01.io.sva:storage.vol");
        assert_eq!(
            (cfg.target.portal_group_tag, cfg.target.target_port_group_id),
            (2, 2)
        );
        assert_eq!(
            cfg.volume.cache_mode,
            sva_node::config::CacheMode::WriteBack
        );
        assert_eq!(cfg.control.unwrap().listen, "0.0.0.0:32602");
        assert_eq!(
            cfg.store.path,
            PathBuf::from("/var/lib/sva/data/volume.img")
        );
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/sva/data/state"));
        let m = cfg.mirror.unwrap();
        assert_eq!(m.listen, "10.0.0.2:32601");
        assert_eq!(
            m.secret_file,
            PathBuf::from("/etc/sva/secrets/replication-secret")
        );
        assert_eq!(
            m.plexes[0],
            PlexSection {
                id: 1,
                node: "w1".into(),
                portal: "10.0.0.1:32600".into(),
                peer_addr: "10.0.0.1:32601".into()
            }
        );
        assert_eq!(
            m.witness,
            WitnessSection::KubernetesLease(KubernetesLeaseSection {
                namespace: Some("storage".into()),
                name: "vol-sva-witness".into()
            })
        );
    }

    #[test]
    fn unrenderable_configs_say_why() {
        let spec_plain = spec(CacheMode::WriteThrough, &[]);
        let mut peers = endpoints(2);
        peers[1].address = None;
        assert_eq!(
            render(&inputs(&spec_plain), &peers[0], &peers),
            Err(RenderError::NoAddress {
                id: 2,
                node: "w2".into()
            })
        );
        let peers = endpoints(2);
        let bad_acl = spec(CacheMode::WriteThrough, &["not-an-iqn"]);
        assert!(matches!(
            render(&inputs(&bad_acl), &peers[0], &peers),
            Err(RenderError::Invalid { id: 1, .. })
        ));
        let mut chap = spec_plain.clone();
        chap.chap_secret_ref = Some(crate::crd::SecretRef {
            name: "chap".into(),
        });
        assert_eq!(
            render(&inputs(&chap), &peers[0], &peers),
            Err(RenderError::ChapUnsupported)
        );
    }
}
