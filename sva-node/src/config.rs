//! Node configuration (YAML), as read by `sva-node serve --config FILE`.
//!
//! ```yaml
//! volume: { name: vol1, uid: 6a1c..., sizeBytes: 1073741824, cacheMode: writeThrough }
//! target:
//!   iqn: iqn.2024-01.io.sva:vol1
//!   portal: 127.0.0.1:3260
//!   portalGroupTag: 1
//!   relativeTargetPortId: 1
//!   targetPortGroupId: 1
//!   chap: { username: u, secret: s3cret-12345, mutualUsername: t, mutualSecret: other-12345 }  # optional
//!   allowedInitiators: []          # empty: any initiator
//!   sendTargets: ["127.0.0.1:3260,1", "127.0.0.1:3261,2"]   # optional; default: own portal
//! store: { path: /var/lib/sva/vol1.img, create: true }
//! stateDir: /var/lib/sva/state
//! control: { listen: 127.0.0.1:9100, tokenFile: /etc/sva/token }   # optional
//! mirror:                                 # optional: a mirrored volume (2 or 3 plexes)
//!   listen: 127.0.0.1:4001                # replication link of this node
//!   secretFile: /etc/sva/replication-secret
//!   plexes:                               # all of them; ours has id == relativeTargetPortId
//!     - { id: 1, node: host-a, portal: 127.0.0.1:3260, peerAddr: 127.0.0.1:4001 }
//!     - { id: 2, node: host-b, portal: 127.0.0.1:3261, peerAddr: 127.0.0.1:4002 }
//!   witness: { address: 127.0.0.1:4000, secretFile: /etc/sva/witness-secret }
//!   # or, in a Kubernetes cluster (binary built with `--features kubernetes`):
//!   # witness: { kubernetesLease: { name: vol1-sva-witness, namespace: storage } }
//!   # (namespace defaults to the pod's own, from its service-account namespace file)
//! ```
//! Unknown fields are errors. [`Config::load`] reports YAML errors with the field path and
//! line, and semantic errors with the field name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::iscsi::{ChapConfig, TargetConfig};
use crate::scsi::alua::{AluaState, PortGroup, PortGroups};
use crate::scsi::lu::LuConfig;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax or schema error; the message names the field path and line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A well-formed value that is not acceptable.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    pub volume: VolumeConfig,
    pub target: TargetSection,
    pub store: StoreConfig,
    /// Directory for node state (APTPL persistent reservations, ...).
    pub state_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlConfig>,
    /// Present when the volume is mirrored across nodes; absent for a single-node volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSection>,
}

/// Write cache behaviour of the volume (`writeThrough` | `writeBack`).
pub use crate::scsi::lu::CacheMode;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VolumeConfig {
    pub name: String,
    /// Volume UID; every node of the volume reports the same identity from it.
    pub uid: String,
    pub size_bytes: u64,
    pub cache_mode: CacheMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetSection {
    pub iqn: String,
    /// Listen address, `host:port`.
    pub portal: String,
    pub portal_group_tag: u16,
    pub relative_target_port_id: u16,
    pub target_port_group_id: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap: Option<ChapSection>,
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    /// Portals SendTargets reports (`host:port,tpgt`); default: this node's portal.
    #[serde(default)]
    pub send_targets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChapSection {
    pub username: String,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StoreConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub create: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControlConfig {
    pub listen: String,
    /// File holding the bearer token that mutating control endpoints require. Without it,
    /// mutations are refused (403) and only the read-only endpoints work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// Synchronous mirroring (DESIGN.md §5). This node's plex is the one whose `id` equals
/// `target.relativeTargetPortId` (plex id = relative target port = target port group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSection {
    /// Replication link listen address (ip:port).
    pub listen: String,
    /// File holding the volume's replication secret (at least 16 bytes), shared by its nodes.
    pub secret_file: PathBuf,
    /// Every plex of the volume, this node's included.
    pub plexes: Vec<PlexSection>,
    pub witness: WitnessSection,
    /// Write-intent bitmap and activity-log region size in bytes (default
    /// [`REGION_BYTES_DEFAULT`]; a power of two, at least the block size). Changing it makes
    /// the next restart distrust the old bitmaps (a full resync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_bytes: Option<u64>,
    /// Resync throttle in bytes/s at start (default 0 = unlimited); `POST /v1/resync-rate`
    /// changes it at run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_bytes_per_sec: Option<u64>,
    /// Activity-log capacity in regions (default [`ACTIVITY_LOG_REGIONS_DEFAULT`]). More
    /// regions: fewer log writes under scattered writes, more to resync after a crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_log_regions: Option<u64>,
    /// How long, in microseconds, a node whose only write in flight waits on its peers'
    /// acks by polling the links itself before it sleeps (default [`ACK_SPIN_MICROS_DEFAULT`];
    /// 0: never). Polling saves the wake-up of a sleeping thread, about half a round trip
    /// on a VM, at the price of that much CPU per write; see the README.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_spin_micros: Option<u64>,
    /// How long, in microseconds, a replication link polls for the peer's next op after
    /// one arrived, before it sleeps (default [`OP_SPIN_MICROS_DEFAULT`], or 0 on a VM
    /// guest with halt polling on; 0: never); only while ops lately came within that of
    /// each other. Saves the receiving node's wake-up on every mirrored write under a
    /// steady load, at the price of up to a CPU while that load runs; see the README.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_spin_micros: Option<u64>,
}

/// Default `mirror.regionBytes`: 1 MiB (DESIGN.md §6).
pub const REGION_BYTES_DEFAULT: u64 = 1 << 20;
/// Largest `mirror.regionBytes`: 1 GiB (a copy moves one region in one message).
pub const REGION_BYTES_MAX: u64 = 1 << 30;
/// Default `mirror.activityLogRegions`.
pub const ACTIVITY_LOG_REGIONS_DEFAULT: u64 = 1024;
/// Default `mirror.ackSpinMicros`: above a cross-CPU loopback round trip plus a peer's
/// write on a small VM (about 60 µs; see the README), below a write-through flush.
pub const ACK_SPIN_MICROS_DEFAULT: u64 = 200;
/// Largest `mirror.ackSpinMicros` and `mirror.opSpinMicros`: beyond this a sleep costs
/// less than the CPU spent.
pub const SPIN_MICROS_MAX: u64 = 10_000;
/// Default `mirror.opSpinMicros`: above the time between two ops of one QD1 initiator (the
/// origin's answer and the initiator's next command: about 100 µs on a small VM). Zero on a
/// VM guest whose idle loop polls already (`mirror::spin::op_spin_default`).
pub const OP_SPIN_MICROS_DEFAULT: u64 = 200;
/// Largest `mirror.activityLogRegions` (the log is read whole at start).
pub const ACTIVITY_LOG_REGIONS_MAX: u64 = 1 << 20;

impl MirrorSection {
    /// `regionBytes` or its default.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes.unwrap_or(REGION_BYTES_DEFAULT)
    }
    /// `resyncBytesPerSec` or its default (0 = unlimited).
    pub fn resync_bytes_per_sec(&self) -> u64 {
        self.resync_bytes_per_sec.unwrap_or(0)
    }
    /// `activityLogRegions` or its default.
    pub fn activity_log_regions(&self) -> usize {
        self.activity_log_regions
            .unwrap_or(ACTIVITY_LOG_REGIONS_DEFAULT) as usize
    }
    /// `ackSpinMicros` or its default.
    pub fn ack_spin(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.ack_spin_micros.unwrap_or(ACK_SPIN_MICROS_DEFAULT))
    }
    /// `opSpinMicros`, or `default()` when unset (it depends on the machine, and is only
    /// looked up then: `mirror::spin::op_spin_default`).
    pub fn op_spin(&self, default: impl FnOnce() -> std::time::Duration) -> std::time::Duration {
        self.op_spin_micros
            .map_or_else(default, std::time::Duration::from_micros)
    }
}

/// One plex of a mirrored volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlexSection {
    pub id: u16,
    /// Node name, for people and the operator.
    pub node: String,
    /// iSCSI portal of that node (ip:port).
    pub portal: String,
    /// Replication link address of that node (host:port).
    pub peer_addr: String,
}

/// Where the witness is and how to prove ourselves to it. In YAML, either the standalone form
/// `{address, secretFile}` or the in-cluster form `{kubernetesLease: {namespace?, name}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WitnessYaml", into = "WitnessYaml")]
pub enum WitnessSection {
    /// A standalone `sva-node witness` server.
    Standalone {
        /// `sva-node witness` address (host:port).
        address: String,
        /// File holding the witness secret.
        secret_file: PathBuf,
    },
    /// The volume's `coordination.k8s.io/v1` Lease (DESIGN.md §8), CAS'd by the nodes directly.
    /// Needs a binary built with the `kubernetes` feature.
    KubernetesLease(KubernetesLeaseSection),
}

/// The Lease that is the volume's witness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesLeaseSection {
    /// Namespace of the Lease; default: the pod's own (its service-account namespace file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Lease name.
    pub name: String,
}

/// The YAML shape of [`WitnessSection`]: optional fields, checked by `TryFrom` so a mix of the
/// two forms is an error that names the fields.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WitnessYaml {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kubernetes_lease: Option<KubernetesLeaseSection>,
}

impl TryFrom<WitnessYaml> for WitnessSection {
    type Error = String;

    fn try_from(w: WitnessYaml) -> Result<Self, String> {
        match (w.address, w.secret_file, w.kubernetes_lease) {
            (Some(address), Some(secret_file), None) => Ok(WitnessSection::Standalone {
                address,
                secret_file,
            }),
            (None, None, Some(lease)) => Ok(WitnessSection::KubernetesLease(lease)),
            (None, None, None) => Err(
                "witness needs either `address` and `secretFile` (standalone witness) or \
                 `kubernetesLease: {name}` (in-cluster witness)"
                    .into(),
            ),
            (_, _, Some(_)) => Err(
                "witness: `kubernetesLease` excludes `address` and `secretFile` (one witness per volume)"
                    .into(),
            ),
            (Some(_), None, None) => Err("witness (standalone): missing field `secretFile`".into()),
            (None, Some(_), None) => Err("witness (standalone): missing field `address`".into()),
        }
    }
}

impl From<WitnessSection> for WitnessYaml {
    fn from(w: WitnessSection) -> Self {
        match w {
            WitnessSection::Standalone {
                address,
                secret_file,
            } => WitnessYaml {
                address: Some(address),
                secret_file: Some(secret_file),
                kubernetes_lease: None,
            },
            WitnessSection::KubernetesLease(lease) => WitnessYaml {
                address: None,
                secret_file: None,
                kubernetes_lease: Some(lease),
            },
        }
    }
}

impl WitnessSection {
    /// How logs and errors name this witness (`host:port` or `lease NAMESPACE/NAME`).
    pub fn describe(&self) -> String {
        match self {
            WitnessSection::Standalone { address, .. } => address.clone(),
            WitnessSection::KubernetesLease(l) => format!(
                "lease {}/{}",
                l.namespace.as_deref().unwrap_or("<pod namespace>"),
                l.name
            ),
        }
    }
}

/// Longest Kubernetes object name (DNS subdomain, RFC 1123).
const K8S_NAME_LEN_MAX: usize = 253;
/// Longest Kubernetes namespace name (DNS label).
const K8S_NAMESPACE_LEN_MAX: usize = 63;

/// Whether `s` is a lowercase RFC 1123 name of at most `max` bytes (`.` allowed when `dots`).
fn valid_k8s_name(s: &str, max: usize, dots: bool) -> bool {
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= max
        && s.chars().all(ok_char)
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

/// Most plexes a volume may have.
pub const PLEXES_MAX: usize = 3;

/// Block size every LU uses (bytes).
const BLOCK_BYTES: u64 = 512;
/// iSCSI names are at most 223 bytes (RFC 7143 §4.2.7.1).
const ISCSI_NAME_LEN_MAX: usize = 223;

/// Whether `name` is a well-formed iSCSI name: `iqn.YYYY-MM.reversed.domain[:anything]`,
/// `eui.` + 16 hex digits, or `naa.` + 16/32 hex digits (RFC 7143 §4.2.7).
pub fn valid_iscsi_name(name: &str) -> bool {
    if name.is_empty() || name.len() > ISCSI_NAME_LEN_MAX || name.chars().any(|c| c.is_whitespace())
    {
        return false;
    }
    let hex_of = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    if let Some(r) = name.strip_prefix("eui.") {
        return hex_of(r, &[16]);
    }
    if let Some(r) = name.strip_prefix("naa.") {
        return hex_of(r, &[16, 32]);
    }
    let Some(r) = name.strip_prefix("iqn.") else {
        return false;
    };
    let b = r.as_bytes();
    b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'.'
        && r[8..].split(':').next().is_some_and(|d| !d.is_empty())
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            e => e,
        })
    }

    /// Parse and validate YAML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let v = &self.volume;
        if v.name.is_empty() {
            return Err(invalid("volume.name", "must not be empty"));
        }
        if v.uid.is_empty() {
            return Err(invalid("volume.uid", "must not be empty"));
        }
        if v.size_bytes == 0 || !v.size_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(invalid(
                "volume.sizeBytes",
                format!(
                    "{} is not a positive multiple of {BLOCK_BYTES}",
                    v.size_bytes
                ),
            ));
        }
        let t = &self.target;
        if !valid_iscsi_name(&t.iqn) {
            return Err(invalid(
                "target.iqn",
                format!("{:?} is not an iSCSI name (iqn.YYYY-MM.domain:name)", t.iqn),
            ));
        }
        if t.portal.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "target.portal",
                format!("{:?} is not host:port (IP address)", t.portal),
            ));
        }
        if t.relative_target_port_id == 0 {
            return Err(invalid("target.relativeTargetPortId", "must be at least 1"));
        }
        if let Some(c) = &t.chap {
            if c.username.is_empty() || c.secret.is_empty() {
                return Err(invalid(
                    "target.chap",
                    "username and secret must not be empty",
                ));
            }
            if c.mutual_username.is_some() != c.mutual_secret.is_some() {
                return Err(invalid(
                    "target.chap",
                    "mutualUsername and mutualSecret go together",
                ));
            }
            if c.mutual_secret.as_ref().is_some_and(|m| *m == c.secret) {
                return Err(invalid(
                    "target.chap.mutualSecret",
                    "must differ from secret",
                ));
            }
        }
        if let Some(bad) = t.allowed_initiators.iter().find(|n| !valid_iscsi_name(n)) {
            return Err(invalid(
                "target.allowedInitiators",
                format!("{bad:?} is not an iSCSI name"),
            ));
        }
        for p in &t.send_targets {
            let ok = p.rsplit_once(',').is_some_and(|(addr, tag)| {
                tag.parse::<u16>().is_ok() && addr.parse::<SocketAddr>().is_ok()
            });
            if !ok {
                return Err(invalid(
                    "target.sendTargets",
                    format!("{p:?} is not host:port,tpgt"),
                ));
            }
        }
        if let Some(m) = &self.mirror {
            self.validate_mirror(m)?;
        }
        if let Some(c) = &self.control {
            if c.listen.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "control.listen",
                    format!("{:?} is not host:port", c.listen),
                ));
            }
        }
        Ok(())
    }

    fn validate_mirror(&self, m: &MirrorSection) -> Result<(), ConfigError> {
        let rb = m.region_bytes();
        if !rb.is_power_of_two() || !(BLOCK_BYTES..=REGION_BYTES_MAX).contains(&rb) {
            return Err(invalid(
                "mirror.regionBytes",
                format!(
                    "{rb} must be a power of two between the block size ({BLOCK_BYTES}) and \
                     {REGION_BYTES_MAX}, e.g. 1048576"
                ),
            ));
        }
        if let Some(r) = m.resync_bytes_per_sec {
            if r > crate::control::status::RESYNC_BYTES_PER_SEC_MAX {
                return Err(invalid(
                    "mirror.resyncBytesPerSec",
                    format!(
                        "{r} exceeds {} (0 means unlimited)",
                        crate::control::status::RESYNC_BYTES_PER_SEC_MAX
                    ),
                ));
            }
        }
        if let Some(n) = m.activity_log_regions {
            if n == 0 || n > ACTIVITY_LOG_REGIONS_MAX {
                return Err(invalid(
                    "mirror.activityLogRegions",
                    format!("{n} must be between 1 and {ACTIVITY_LOG_REGIONS_MAX}"),
                ));
            }
        }
        for (key, us) in [
            ("mirror.ackSpinMicros", m.ack_spin_micros),
            ("mirror.opSpinMicros", m.op_spin_micros),
        ] {
            if let Some(us) = us.filter(|us| *us > SPIN_MICROS_MAX) {
                return Err(invalid(
                    key,
                    format!("{us} exceeds {SPIN_MICROS_MAX} (0 turns polling off)"),
                ));
            }
        }
        if m.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "mirror.listen",
                format!("{:?} is not ip:port", m.listen),
            ));
        }
        if m.plexes.len() < 2 || m.plexes.len() > PLEXES_MAX {
            return Err(invalid(
                "mirror.plexes",
                format!(
                    "a mirrored volume has 2 to {PLEXES_MAX} plexes, not {}",
                    m.plexes.len()
                ),
            ));
        }
        let mut ids: Vec<u16> = m.plexes.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != m.plexes.len() || ids.first() == Some(&0) {
            return Err(invalid(
                "mirror.plexes",
                "plex ids must be distinct and at least 1",
            ));
        }
        let me = self.target.relative_target_port_id;
        let Some(mine) = m.plexes.iter().find(|p| p.id == me) else {
            return Err(invalid(
                "mirror.plexes",
                format!("no plex has id {me} (this node's target.relativeTargetPortId)"),
            ));
        };
        if mine.portal != self.target.portal {
            return Err(invalid(
                "mirror.plexes",
                format!(
                    "plex {me}'s portal {:?} differs from target.portal {:?}",
                    mine.portal, self.target.portal
                ),
            ));
        }
        if self.target.target_port_group_id != me {
            return Err(invalid(
                "target.targetPortGroupId",
                "must equal relativeTargetPortId on a mirrored node (one group per plex)",
            ));
        }
        for p in &m.plexes {
            if p.portal.parse::<SocketAddr>().is_err() {
                return Err(invalid(
                    "mirror.plexes",
                    format!("plex {}: portal {:?} is not ip:port", p.id, p.portal),
                ));
            }
            if p.peer_addr.rsplit_once(':').is_none() {
                return Err(invalid(
                    "mirror.plexes",
                    format!("plex {}: peerAddr {:?} is not host:port", p.id, p.peer_addr),
                ));
            }
        }
        match &m.witness {
            WitnessSection::Standalone { address, .. } => {
                if address.rsplit_once(':').is_none() {
                    return Err(invalid(
                        "mirror.witness.address",
                        format!("{address:?} is not host:port"),
                    ));
                }
            }
            WitnessSection::KubernetesLease(l) => {
                if !valid_k8s_name(&l.name, K8S_NAME_LEN_MAX, true) {
                    return Err(invalid(
                        "mirror.witness.kubernetesLease.name",
                        format!("{:?} is not a Kubernetes object name", l.name),
                    ));
                }
                if let Some(ns) = &l.namespace {
                    if !valid_k8s_name(ns, K8S_NAMESPACE_LEN_MAX, false) {
                        return Err(invalid(
                            "mirror.witness.kubernetesLease.namespace",
                            format!("{ns:?} is not a Kubernetes namespace name"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The portal as a socket address (validated by [`Config::load`]).
    pub fn portal_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.target
            .portal
            .parse()
            .map_err(|_| invalid("target.portal", "not host:port"))
    }

    /// What the logical unit needs from this config.
    pub fn lu_config(&self) -> LuConfig {
        let mut c = LuConfig::new(self.volume.uid.clone());
        c.cache_mode = self.volume.cache_mode;
        c.relative_target_port = self.target.relative_target_port_id;
        c.target_port_group = self.target.target_port_group_id;
        c.port_groups = Arc::new(match &self.mirror {
            // Every group of the volume, Unavailable until the mirror engine says otherwise.
            Some(m) => PortGroups::new(
                m.plexes
                    .iter()
                    .map(|p| PortGroup {
                        id: p.id,
                        relative_ports: vec![p.id],
                        state: AluaState::Unavailable,
                        preferred: false,
                    })
                    .collect(),
            ),
            None => PortGroups::single(
                self.target.target_port_group_id,
                self.target.relative_target_port_id,
            ),
        });
        c.pr_state_path = Some(self.state_dir.join("pr-aptpl.json"));
        c
    }

    /// What the iSCSI transport needs from this config.
    pub fn iscsi_target(&self) -> TargetConfig {
        let t = &self.target;
        let mut c = TargetConfig::new(
            t.iqn.clone(),
            format!("{},{}", t.portal, t.portal_group_tag),
        );
        c.alias = t.alias.clone();
        c.portal_group_tag = t.portal_group_tag;
        c.relative_target_port = t.relative_target_port_id;
        c.allowed_initiators = t.allowed_initiators.clone();
        if !t.send_targets.is_empty() {
            c.send_targets = t.send_targets.clone();
        } else if let Some(m) = &self.mirror {
            // SendTargets on any node lists every node's portal (DESIGN.md §4).
            c.send_targets = m
                .plexes
                .iter()
                .map(|p| format!("{},{}", p.portal, p.id))
                .collect();
        }
        c.chap = t.chap.as_ref().map(|c| ChapConfig {
            username: c.username.clone(),
            secret: c.secret.clone(),
            mutual_username: c.mutual_username.clone(),
            mutual_secret: c.mutual_secret.clone(),
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
volume:
  name: vol1
  uid: 6a1c2f00-0000-4000-8000-000000000001
  sizeBytes: 1073741824
  cacheMode: writeBack
target:
  iqn: iqn.2024-01.io.sva:vol1
  portal: 127.0.0.1:3260
  portalGroupTag: 1
  relativeTargetPortId: 1
  targetPortGroupId: 1
  chap:
    username: user
    secret: secret-12345
  allowedInitiators: [iqn.1993-08.org.debian:01:abc]
store:
  path: /tmp/vol1.img
  create: true
stateDir: /tmp/state
"#;

    #[test]
    fn good_config_loads_and_maps() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.volume.cache_mode, CacheMode::WriteBack);
        assert_eq!(c.volume.size_bytes, 1 << 30);
        assert!(c.control.is_none());
        let t = c.iscsi_target();
        assert_eq!(t.send_targets, vec!["127.0.0.1:3260,1".to_string()]);
        assert_eq!(t.chap.unwrap().username, "user");
        assert_eq!(t.allowed_initiators.len(), 1);
    }

    #[test]
    fn load_from_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.yaml");
        std::fs::write(
            &p,
            GOOD.replace("cacheMode: writeBack", "cacheMode: sometimes"),
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("n.yaml") && e.contains("volume.cacheMode"),
            "{e}"
        );
        assert!(matches!(
            Config::load(&dir.path().join("missing.yaml")),
            Err(ConfigError::Io { .. })
        ));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "sizeBytes: 1073741824",
                "sizeBytes: 1000",
                "volume.sizeBytes",
            ),
            ("sizeBytes: 1073741824", "sizeBytes: 0", "volume.sizeBytes"),
            ("iqn: iqn.2024-01.io.sva:vol1", "iqn: vol1", "target.iqn"),
            (
                "portal: 127.0.0.1:3260",
                "portal: localhost",
                "target.portal",
            ),
            (
                "  create: true",
                "  create: true\n  extra: 1",
                "unknown field `extra`",
            ),
            (
                "  portalGroupTag: 1\n",
                "",
                "missing field `portalGroupTag`",
            ),
            (
                "[iqn.1993-08.org.debian:01:abc]",
                "[bob]",
                "target.allowedInitiators",
            ),
            (
                "    secret: secret-12345",
                "    secret: secret-12345\n    mutualSecret: x",
                "target.chap",
            ),
            (
                "relativeTargetPortId: 1",
                "relativeTargetPortId: 0",
                "target.relativeTargetPortId",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "{from}");
            let e = Config::parse(&GOOD.replacen(from, to, 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{to:?}: {e}");
        }
        let e = Config::parse(&GOOD.replace("sizeBytes: 1073741824", "sizeBytes: lots"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume.sizeBytes") && e.contains("line 5"),
            "{e}"
        );
    }

    /// GOOD with plex 1 of a 2-plex mirror, `witness` as given (indented YAML mapping body).
    fn mirrored(witness: &str) -> String {
        format!(
            "{GOOD}mirror:\n  listen: 127.0.0.1:4001\n  secretFile: /tmp/rs\n  plexes:\n    \
             - {{ id: 1, node: a, portal: 127.0.0.1:3260, peerAddr: 127.0.0.1:4001 }}\n    \
             - {{ id: 2, node: b, portal: 127.0.0.1:3261, peerAddr: 127.0.0.1:4002 }}\n  \
             witness:\n{witness}"
        )
    }

    #[test]
    fn witness_standalone_or_kubernetes_lease() {
        let c = Config::parse(&mirrored(
            "    address: 127.0.0.1:4000\n    secretFile: /tmp/ws\n",
        ))
        .unwrap();
        assert_eq!(
            c.mirror.as_ref().unwrap().witness,
            WitnessSection::Standalone {
                address: "127.0.0.1:4000".into(),
                secret_file: PathBuf::from("/tmp/ws")
            }
        );
        // Serializing gives back the same YAML shape.
        assert_eq!(
            Config::parse(&serde_yaml::to_string(&c).unwrap()).unwrap(),
            c
        );

        let c = Config::parse(&mirrored(
            "    kubernetesLease: { name: vol1-sva-witness }\n",
        ))
        .unwrap();
        let lease = KubernetesLeaseSection {
            namespace: None,
            name: "vol1-sva-witness".into(),
        };
        assert_eq!(
            c.mirror.as_ref().unwrap().witness,
            WitnessSection::KubernetesLease(lease)
        );
        assert_eq!(
            Config::parse(&serde_yaml::to_string(&c).unwrap()).unwrap(),
            c
        );
        let yaml = serde_yaml::to_string(&c).unwrap();
        assert!(!yaml.contains("address"), "{yaml}");

        let c = Config::parse(&mirrored(
            "    kubernetesLease: { namespace: storage, name: l }\n",
        ))
        .unwrap();
        assert!(c.mirror.unwrap().witness.describe().contains("storage/l"));
    }

    #[test]
    fn bad_witness_sections_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            (
                "    address: 127.0.0.1:4000\n    kubernetesLease: { name: l }\n",
                "excludes `address`",
            ),
            (
                "    address: 127.0.0.1:4000\n",
                "missing field `secretFile`",
            ),
            ("    secretFile: /tmp/ws\n", "missing field `address`"),
            ("    {}\n", "needs either `address`"),
            ("    kubernetesLease: {}\n", "missing field `name`"),
            (
                "    kubernetesLease: { name: l, ns: x }\n",
                "unknown field `ns`",
            ),
            (
                "    kubernetesLease: { name: Not_A_Name }\n",
                "mirror.witness.kubernetesLease.name",
            ),
            (
                "    kubernetesLease: { name: l, namespace: a.b }\n",
                "mirror.witness.kubernetesLease.namespace",
            ),
            (
                "    address: nowhere\n    secretFile: /tmp/ws\n",
                "mirror.witness.address",
            ),
        ];
        for (witness, want) in cases {
            let e = Config::parse(&mirrored(witness)).unwrap_err().to_string();
            assert!(e.contains(want), "{witness:?}: {e}");
        }
        let e = Config::parse(&mirrored("    address: 127.0.0.1:4000\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mirror: witness") && e.contains("line "),
            "names the section and line: {e}"
        );
    }

    #[test]
    fn resync_settings_default_and_validate() {
        let w = "    address: 127.0.0.1:4000\n    secretFile: /tmp/ws\n";
        let m = Config::parse(&mirrored(w)).unwrap().mirror.unwrap();
        assert_eq!(m.region_bytes(), 1 << 20);
        assert_eq!(m.resync_bytes_per_sec(), 0);
        assert_eq!(m.activity_log_regions(), 1024);
        assert_eq!(m.ack_spin(), std::time::Duration::from_micros(200));
        let unset = std::time::Duration::from_micros(123);
        assert_eq!(m.op_spin(|| unset), unset);
        let with = |extra: &str| Config::parse(&format!("{}{extra}", mirrored(w)));
        let m =
            with("  regionBytes: 65536\n  resyncBytesPerSec: 1000000\n  activityLogRegions: 64\n")
                .unwrap()
                .mirror
                .unwrap();
        assert_eq!(
            (
                m.region_bytes(),
                m.resync_bytes_per_sec(),
                m.activity_log_regions()
            ),
            (65536, 1_000_000, 64)
        );
        let m = with("  ackSpinMicros: 0\n  opSpinMicros: 0\n")
            .unwrap()
            .mirror
            .unwrap();
        assert_eq!(m.ack_spin(), std::time::Duration::ZERO);
        assert_eq!(m.op_spin(|| unset), std::time::Duration::ZERO);
        for (extra, want) in [
            ("  regionBytes: 1000000\n", "mirror.regionBytes"),
            (
                "  regionBytes: 256\n",
                "power of two between the block size",
            ),
            ("  regionBytes: 4294967296\n", "mirror.regionBytes"),
            ("  activityLogRegions: 0\n", "mirror.activityLogRegions"),
            ("  ackSpinMicros: 10001\n", "mirror.ackSpinMicros"),
            ("  opSpinMicros: 10001\n", "mirror.opSpinMicros"),
            (
                "  resyncBytesPerSec: 1000000000000000\n",
                "mirror.resyncBytesPerSec",
            ),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    }

    #[test]
    fn k8s_names() {
        for good in ["a", "vol-1", "vol1-sva-witness", "a.b"] {
            assert!(valid_k8s_name(good, K8S_NAME_LEN_MAX, true), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", &"a".repeat(254)] {
            assert!(!valid_k8s_name(bad, K8S_NAME_LEN_MAX, true), "{bad}");
        }
        assert!(!valid_k8s_name("a.b", K8S_NAMESPACE_LEN_MAX, false));
    }

    #[test]
    fn iscsi_names() {
        for good in [
            "iqn.2024-01.io.sva:vol1",
            "iqn.1993-08.org.debian:01:abc",
            "eui.0123456789ABCDEF",
        ] {
            assert!(valid_iscsi_name(good), "{good}");
        }
        for bad in [
            "",
            "iqn.",
            "iqn.2024-1.io.sva",
            "iqn.2024-01.",
            "eui.123",
            "foo",
            "iqn.2024-01.a b",
        ] {
            assert!(!valid_iscsi_name(bad), "{bad}");
        }
    }
}
