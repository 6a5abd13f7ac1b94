//! Renders the sva-node configuration of each plex from the volume spec: the one documented
//! path by which the operator configures a node (Secret `<vol>-sva-config`, key
//! `plex-<id>.yaml`, mounted in the pod as `/etc/sva/node.yaml`, read by
//! `sva-node serve --config /etc/sva/node.yaml`). The configs live in a Secret, not a
//! ConfigMap, because sva-node reads CHAP credentials inline from its config (`target.chap`).
//!
//! The config is built as sva-node's own [`sva_node::config::Config`] and checked with
//! sva-node's validation ([`Config::parse`] of the YAML) before it leaves the operator, so the
//! two cannot drift: a config sva-node would refuse is a [`RenderError`] here, not a crash loop.
//!
//! ```text
//!  plex N's node (hostNetwork, InternalIP H):
//!    iSCSI portal  H:portalPort      (target.portal, mirror.plexes[].portal)
//!    replication   H:portalPort+1    (mirror.listen, mirror.plexes[].peerAddr)
//!    control API   0.0.0.0:portalPort+2 (control.listen; probes, operator GET /v1/status,
//!                  POST /v1/resync-rate with the token in control.tokenFile)
//!    witness       Lease <vol>-sva-witness in the volume's namespace (kubernetesLease)
//!    secrets       Secret <vol>-sva-secrets at /etc/sva/secrets (replication-secret, api-token)
//!    CHAP          user's Secret spec.chapSecretRef (username, password[, mutualUsername,
//!                  mutualPassword]) copied into target.chap of the config Secret
//!    data          PVC <vol>-p<N>-data at /var/lib/sva/data (store, stateDir)
//! ```

use crate::crd::{CacheMode, MirroredVolumeSpec};
use std::path::PathBuf;
use sva_node::config::{
    ChapSection, Config, ControlConfig, KubernetesLeaseSection, MirrorSection, PlexSection,
    StoreConfig, TargetSection, VolumeConfig, WitnessSection,
};

/// Where the pod mounts its config, PVC and secrets.
pub const CONFIG_PATH: &str = "/etc/sva/node.yaml";
pub const DATA_DIR: &str = "/var/lib/sva/data";
pub const SECRETS_DIR: &str = "/etc/sva/secrets";
/// Key of the replication secret in the volume's Secret (and file name under [`SECRETS_DIR`]).
pub const REPLICATION_SECRET_KEY: &str = "replication-secret";
/// Key of the node API token (bearer token of mutating control endpoints) in the same Secret.
pub const API_TOKEN_KEY: &str = "api-token";
/// Keys of the user's CHAP Secret (`spec.chapSecretRef`).
pub const CHAP_USERNAME_KEY: &str = "username";
pub const CHAP_PASSWORD_KEY: &str = "password";
pub const CHAP_MUTUAL_USERNAME_KEY: &str = "mutualUsername";
pub const CHAP_MUTUAL_PASSWORD_KEY: &str = "mutualPassword";

/// CHAP credentials read from the user's Secret (DESIGN.md §9).
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub username: String,
    pub secret: String,
    /// Mutual CHAP: the name and secret the target answers with.
    pub mutual: Option<(String, String)>,
}

impl std::fmt::Debug for ChapCredentials {
    // Never print secrets (plans are logged at debug level).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("username", &self.username)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// Reads CHAP credentials from a Secret's `data`, naming what is wrong (the message reaches an
/// Event and a condition; it never contains a secret value).
pub fn chap_from_secret(
    name: &str,
    data: &std::collections::BTreeMap<String, Vec<u8>>,
) -> Result<ChapCredentials, String> {
    let get = |key: &str| -> Result<Option<String>, String> {
        match data.get(key) {
            None => Ok(None),
            Some(v) => String::from_utf8(v.clone())
                .map(|s| Some(s.trim_end_matches(['\r', '\n']).to_string()))
                .map_err(|_| format!("CHAP Secret {name}: key {key} is not UTF-8")),
        }
    };
    let need = |key: &str| -> Result<String, String> {
        get(key)?
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("CHAP Secret {name}: key {key} is missing or empty"))
    };
    let username = need(CHAP_USERNAME_KEY)?;
    let secret = need(CHAP_PASSWORD_KEY)?;
    let mutual = match (
        get(CHAP_MUTUAL_USERNAME_KEY)?.filter(|v| !v.is_empty()),
        get(CHAP_MUTUAL_PASSWORD_KEY)?.filter(|v| !v.is_empty()),
    ) {
        (None, None) => None,
        (Some(u), Some(p)) => Some((u, p)),
        _ => {
            return Err(format!(
                "CHAP Secret {name}: {CHAP_MUTUAL_USERNAME_KEY} and {CHAP_MUTUAL_PASSWORD_KEY} go together"
            ))
        }
    };
    Ok(ChapCredentials {
        username,
        secret,
        mutual,
    })
}

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
    /// `spec.chapSecretRef` names a Secret that is missing, unreadable or lacks its keys.
    #[error("{0}")]
    Chap(String),
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
    /// CHAP credentials read from `spec.chapSecretRef` (`None` when not read: no ref, or the
    /// controller has not looked yet), or why they could not be read.
    pub chap: Option<&'a Result<ChapCredentials, String>>,
}

/// `plex`'s sva-node config. `peers` are all live plexes of the volume (including `plex`).
pub fn config(
    v: &VolumeInputs<'_>,
    plex: &PlexEndpoint,
    peers: &[PlexEndpoint],
) -> Result<Config, RenderError> {
    let chap = match (&v.spec.chap_secret_ref, v.chap) {
        (None, _) => None,
        (Some(r), None) => {
            return Err(RenderError::Chap(format!(
                "CHAP Secret {} has not been read",
                r.name
            )))
        }
        (Some(_), Some(Err(why))) => return Err(RenderError::Chap(why.clone())),
        (Some(_), Some(Ok(c))) => Some(ChapSection {
            username: c.username.clone(),
            secret: c.secret.clone(),
            mutual_username: c.mutual.as_ref().map(|(u, _)| u.clone()),
            mutual_secret: c.mutual.as_ref().map(|(_, p)| p.clone()),
        }),
    };
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
            chap,
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
            token_file: Some(PathBuf::from(format!("{SECRETS_DIR}/{API_TOKEN_KEY}"))),
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
            ack_spin_micros: None,
            op_spin_micros: None,
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
    let Some(rate) = resync_bytes_per_sec(v.spec).map_err(invalid)? else {
        return Ok(yaml);
    };
    // `mirror.resyncBytesPerSec` is added to the YAML rather than to the typed `Config`, so the
    // operator builds against sva-node versions with and without the field: a node config type
    // that does not know it (deny_unknown_fields) gets the rate only through
    // `POST /v1/resync-rate` (plan::Step::SetResyncRate), which every version serves.
    let mut value = serde_yaml::to_value(&cfg).map_err(|e| invalid(e.to_string()))?;
    if let Some(m) = value.get_mut("mirror").and_then(|m| m.as_mapping_mut()) {
        m.insert(RESYNC_RATE_FIELD.into(), rate.into());
    }
    let with_rate = serde_yaml::to_string(&value).map_err(|e| invalid(e.to_string()))?;
    match Config::parse(&with_rate) {
        Ok(_) => Ok(with_rate),
        Err(e)
            if e.to_string()
                .contains(&format!("unknown field `{RESYNC_RATE_FIELD}`")) =>
        {
            Ok(yaml)
        }
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// Name of the node config field carrying the volume's resync throttle (DESIGN.md §6).
pub const RESYNC_RATE_FIELD: &str = "resyncBytesPerSec";

/// The spec's resync rate in bytes per second, checked against the most the node accepts
/// ([`sva_node::control::status::RESYNC_BYTES_PER_SEC_MAX`]); `Ok(None)` when unset.
pub fn resync_bytes_per_sec(spec: &MirroredVolumeSpec) -> Result<Option<u64>, String> {
    let Some(q) = spec.resync_rate.as_deref() else {
        return Ok(None);
    };
    let max = sva_node::control::status::RESYNC_BYTES_PER_SEC_MAX;
    match crate::crd::parse_bytes(q) {
        Some(b) if b <= max => Ok(Some(b)),
        Some(_) => Err(format!(
            "resyncRate {q} is above the node's maximum of {max} bytes/s"
        )),
        None => Err(format!("resyncRate {q:?} is not a byte quantity")),
    }
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
            chap: None,
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
            Err(RenderError::Chap(
                "CHAP Secret chap has not been read".into()
            ))
        );
        let missing = Err("CHAP Secret chap not found".to_string());
        let v = VolumeInputs {
            chap: Some(&missing),
            ..inputs(&chap)
        };
        assert_eq!(
            render(&v, &peers[0], &peers),
            Err(RenderError::Chap("CHAP Secret chap not found".into()))
        );
        let mut fast = spec_plain.clone();
        fast.resync_rate = Some("200Gi".into());
        assert!(matches!(
            render(&inputs(&fast), &peers[0], &peers),
            Err(RenderError::Invalid { id: 1, reason }) if reason.contains("maximum")
        ));
    }

    fn secret_data(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// One-way and mutual CHAP from the user's Secret land in `target.chap`, the form
    /// sva-node's login reads (config.rs `ChapSection`).
    #[test]
    fn chap_secret_is_rendered_into_target_chap() {
        let mut spec = spec(CacheMode::WriteThrough, &[]);
        spec.chap_secret_ref = Some(crate::crd::SecretRef {
            name: "vol-chap".into(),
        });
        let peers = endpoints(2);
        let one_way = chap_from_secret(
            "vol-chap",
            &secret_data(&[("username", "alice"), ("password", "s3cret-123456\n")]),
        );
        let v = VolumeInputs {
            chap: Some(&one_way),
            ..inputs(&spec)
        };
        let cfg = Config::parse(&render(&v, &peers[0], &peers).unwrap()).unwrap();
        assert_eq!(
            cfg.target.chap,
            Some(ChapSection {
                username: "alice".into(),
                secret: "s3cret-123456".into(),
                mutual_username: None,
                mutual_secret: None
            })
        );
        assert_eq!(
            cfg.iscsi_target().chap.map(|c| c.username),
            Some("alice".into())
        );
        let mutual = chap_from_secret(
            "vol-chap",
            &secret_data(&[
                ("username", "alice"),
                ("password", "s3cret-123456"),
                ("mutualUsername", "target"),
                ("mutualPassword", "other-1234567"),
            ]),
        );
        let v = VolumeInputs {
            chap: Some(&mutual),
            ..inputs(&spec)
        };
        let cfg = Config::parse(&render(&v, &peers[1], &peers).unwrap()).unwrap();
        let chap = cfg.target.chap.unwrap();
        assert_eq!(
            (chap.mutual_username, chap.mutual_secret),
            (Some("target".into()), Some("other-1234567".into()))
        );
        // sva-node refuses a mutual secret equal to the initiator's: a render error, no config.
        let same = chap_from_secret(
            "vol-chap",
            &secret_data(&[
                ("username", "a"),
                ("password", "same-secret-1234"),
                ("mutualUsername", "t"),
                ("mutualPassword", "same-secret-1234"),
            ]),
        );
        let v = VolumeInputs {
            chap: Some(&same),
            ..inputs(&spec)
        };
        assert!(matches!(
            render(&v, &peers[0], &peers),
            Err(RenderError::Invalid { .. })
        ));
    }

    #[test]
    fn chap_secret_problems_are_named_without_values() {
        let err = chap_from_secret("c", &secret_data(&[("username", "alice")])).unwrap_err();
        assert_eq!(err, "CHAP Secret c: key password is missing or empty");
        let err = chap_from_secret(
            "c",
            &secret_data(&[
                ("username", "u"),
                ("password", "p"),
                ("mutualUsername", "t"),
            ]),
        )
        .unwrap_err();
        assert!(err.contains("go together"), "{err}");
        let mut bad = secret_data(&[("password", "p")]);
        bad.insert("username".into(), vec![0xff]);
        assert!(chap_from_secret("c", &bad)
            .unwrap_err()
            .contains("not UTF-8"));
        let ok = chap_from_secret("c", &secret_data(&[("username", "u"), ("password", "pw")]));
        assert!(
            !format!("{ok:?}").contains("pw"),
            "Debug must not print secrets"
        );
    }

    /// The node gets the API token file (so the operator's POST /v1/resync-rate is accepted)
    /// and, when sva-node's config knows `mirror.resyncBytesPerSec`, the spec's rate.
    #[test]
    fn token_file_and_resync_rate_reach_the_node_config() {
        let mut spec = spec(CacheMode::WriteThrough, &[]);
        spec.resync_rate = Some("200Mi".into());
        let peers = endpoints(2);
        let yaml = render(&inputs(&spec), &peers[0], &peers).unwrap();
        let cfg = Config::parse(&yaml).unwrap();
        assert_eq!(
            cfg.control.clone().unwrap().token_file,
            Some(PathBuf::from("/etc/sva/secrets/api-token"))
        );
        assert_eq!(resync_bytes_per_sec(&spec), Ok(Some(200 << 20)));
        // Does this sva-node build know the field? Probe with the unconditional YAML.
        let mut value = serde_yaml::to_value(&cfg).unwrap();
        value["mirror"]
            .as_mapping_mut()
            .unwrap()
            .insert(RESYNC_RATE_FIELD.into(), 1u64.into());
        let known = Config::parse(&serde_yaml::to_string(&value).unwrap()).is_ok();
        assert_eq!(
            yaml.contains("resyncBytesPerSec: 209715200"),
            known,
            "rendered iff sva-node's Config has the field:\n{yaml}"
        );
    }
}
