//! The pure heart of the operator: `plan(observed) -> Vec<Step>` (DESIGN.md §8, STYLE.md 9).
//!
//! ```text
//!   controller::observe (API reads + GET /v1/status of each node)
//!        -> Observed ──plan()──> Vec<Step> ──> controller::apply (API writes, Events)
//! ```
//!
//! No I/O and no clock here: `Observed::now` is injected, so every decision (placement on
//! distinct physical hosts, node lost / back, replacement after the timeout, deletion) is a row
//! in the table tests below.
//!
//! Node loss: the data plane decides first. The highest-epoch `/v1/status` report any node
//! returned is the membership; a plex it marks Stale whose own node does not answer is Lost.
//! Node conditions only corroborate: with no data-plane report at all, a plex whose Node is
//! NotReady (or gone) is Lost.

use crate::crd::{
    AluaState, MirroredVolumeSpec, MirroredVolumeStatus, PathStatus, PlexPhase, PlexStatus,
    ResyncProgress, VolumePhase,
};
use crate::node_api::{NodeStatusReport, ResyncReport};
use crate::nodeconfig::{self, PlexEndpoint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::collections::{BTreeMap, BTreeSet};
use sva_node::witness::PlexState;

/// Largest plex id (ids are relative target port ids and port group ids).
pub const PLEX_ID_MAX: u16 = 255;
/// Requeue interval while anything is not Healthy: the data plane is polled this often.
pub const REQUEUE_BUSY_SECS: u64 = 10;
/// Requeue interval of a Healthy volume.
pub const REQUEUE_IDLE_SECS: u64 = 60;
/// Portal ports are allocated in slots of 3 (portal, replication, control) from this base.
pub const PORTAL_PORT_BASE: u16 = 32600;
/// Number of slots (volumes with an operator-allocated port).
pub const PORTAL_SLOTS_MAX: u16 = 900;

/// A Node as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Value of the volume's `hostTopologyKey` label (the physical host).
    pub host: Option<String>,
    pub ready: bool,
    pub schedulable: bool,
    pub address: Option<String>,
}

/// A plex with its pod and PVC.
#[derive(Debug, Clone, PartialEq)]
pub struct PlexView {
    pub id: u16,
    pub node: String,
    pub host: String,
    pub replaces: Option<u16>,
    pub status: PlexStatus,
    /// `Some(ready)` when the pod exists.
    pub pod_ready: Option<bool>,
    pub pvc_exists: bool,
}

/// Everything `plan` looks at.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Unix seconds.
    pub now: i64,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    pub deleting: bool,
    pub spec: MirroredVolumeSpec,
    pub status: MirroredVolumeStatus,
    pub portal_port: u16,
    pub nodes: Vec<NodeView>,
    pub plexes: Vec<PlexView>,
    /// `/v1/status` of the node of each plex that answered, by plex id.
    pub reports: BTreeMap<u16, NodeStatusReport>,
    /// CHAP credentials from `spec.chapSecretRef`, or why they could not be read; `None` when
    /// the spec names no CHAP Secret.
    pub chap: Option<Result<nodeconfig::ChapCredentials, String>>,
}

/// Rendered node configs by Secret key (`plex-<id>.yaml`). Its `Debug` prints only the keys:
/// plans are logged, and the configs carry CHAP credentials.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct NodeConfigs(pub BTreeMap<String, String>);

impl std::ops::Deref for NodeConfigs {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for NodeConfigs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Event severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// One action for `apply`. Steps are idempotent: applying a plan twice does no harm.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Create the volume's witness Lease if absent (the sva-nodes then only need get/update).
    EnsureLease,
    /// Server-side apply the Secret of node configs (key `plex-<id>.yaml`; a Secret because
    /// the configs carry CHAP credentials). Only planned when every config rendered.
    EnsureConfig {
        data: NodeConfigs,
    },
    /// Create the volume's Secret (random replication secret and node API token) if absent;
    /// never rewritten, since every node of the volume must hold the same secret.
    EnsureSecret,
    /// `POST /v1/resync-rate` to plex `id`'s node (its reported limit differs from the spec).
    SetResyncRate {
        id: u16,
        bytes_per_sec: u64,
    },
    CreatePlex {
        id: u16,
        node: String,
        host: String,
        replaces: Option<u16>,
    },
    EnsurePvc {
        id: u16,
        node: String,
    },
    EnsurePod {
        id: u16,
        node: String,
    },
    DeletePod {
        id: u16,
    },
    DeletePvc {
        id: u16,
    },
    DeletePlex {
        id: u16,
    },
    DeleteConfig,
    DeleteSecret,
    DeleteLease,
    PlexStatus {
        id: u16,
        status: PlexStatus,
    },
    VolumeStatus(Box<MirroredVolumeStatus>),
    Event {
        kind: EventKind,
        reason: &'static str,
        note: String,
    },
    Requeue {
        after_secs: u64,
    },
}

/// Condition types (the status contract).
pub const CONDITION_READY: &str = "Ready";
pub const CONDITION_SYNCED: &str = "Synced";
pub const CONDITION_DEGRADED: &str = "Degraded";
/// False while some plex's node config cannot be rendered (no config or pod is written then).
pub const CONDITION_CONFIG_RENDERED: &str = "ConfigRendered";
/// Reason (and Event reason) of a config that cannot be rendered.
pub const REASON_CONFIG_NOT_RENDERED: &str = "ConfigNotRendered";
/// Reason used when placement cannot find enough distinct physical hosts.
pub const REASON_NOT_ENOUGH_HOSTS: &str = "NotEnoughHosts";

/// Picks the lowest free portal port slot not used by another volume.
pub fn allocate_portal_port(used: &BTreeSet<u16>) -> Option<u16> {
    (0..PORTAL_SLOTS_MAX)
        .map(|slot| PORTAL_PORT_BASE + slot * 3)
        .find(|p| !(0..3).any(|d| used.contains(&(p + d))))
}

/// Plans the next steps for one volume.
pub fn plan(obs: &Observed) -> Vec<Step> {
    if obs.deleting {
        return plan_deletion(obs);
    }
    let mut steps = vec![Step::EnsureLease];
    let desired = usize::from(obs.spec.plexes);
    let timeout = i64::from(obs.spec.replacement_timeout_seconds);
    let membership = authoritative_report(&obs.reports);

    // 1. Per-plex state from the data plane (then Node conditions).
    let mut states: BTreeMap<u16, PlexStatus> = BTreeMap::new();
    for p in &obs.plexes {
        let status = plex_status(obs, p, membership);
        if let Some(ev) = transition_event(p, &status) {
            steps.push(ev);
        }
        if status != p.status {
            steps.push(Step::PlexStatus {
                id: p.id,
                status: status.clone(),
            });
        }
        states.insert(p.id, status);
    }
    let phase_of = |id: u16| states.get(&id).map(|s| s.state).unwrap_or_default();
    let live: Vec<&PlexView> = obs
        .plexes
        .iter()
        .filter(|p| phase_of(p.id) != PlexPhase::Removed)
        .collect();
    let replaced: BTreeSet<u16> = live.iter().filter_map(|p| p.replaces).collect();

    // 2. Placement: hosts already used by live plexes are not eligible.
    let used_hosts: BTreeSet<&str> = live.iter().map(|p| p.host.as_str()).collect();
    let mut eligible: Vec<&NodeView> = Vec::new();
    let mut seen_hosts = BTreeSet::new();
    let mut candidates: Vec<&NodeView> = obs
        .nodes
        .iter()
        .filter(|n| n.ready && n.schedulable && n.host.is_some())
        .collect();
    candidates.sort_by(|a, b| (&a.host, &a.name).cmp(&(&b.host, &b.name)));
    for n in candidates {
        let host = n.host.as_deref().unwrap_or_default();
        if !used_hosts.contains(host) && seen_hosts.insert(host) {
            eligible.push(n);
        }
    }
    let mut eligible = eligible.into_iter();
    let mut next_id = obs.plexes.iter().map(|p| p.id).max().unwrap_or(0) + 1;
    let mut short_of_hosts = 0usize;
    let mut new_plexes: Vec<PlexEndpoint> = Vec::new();
    let mut create = |replaces: Option<u16>, steps: &mut Vec<Step>| -> bool {
        match eligible.next() {
            Some(n) if next_id <= PLEX_ID_MAX => {
                let host = n.host.clone().unwrap_or_default();
                steps.push(Step::CreatePlex {
                    id: next_id,
                    node: n.name.clone(),
                    host,
                    replaces,
                });
                steps.push(Step::EnsurePvc {
                    id: next_id,
                    node: n.name.clone(),
                });
                steps.push(Step::EnsurePod {
                    id: next_id,
                    node: n.name.clone(),
                });
                new_plexes.push(PlexEndpoint {
                    id: next_id,
                    node: n.name.clone(),
                    address: n.address.clone(),
                });
                next_id += 1;
                true
            }
            _ => false,
        }
    };

    // 2a. Replace plexes lost for longer than the timeout (once).
    for p in &live {
        let st = states.get(&p.id).cloned().unwrap_or_default();
        let expired = st.lost_since.is_some_and(|t| obs.now - t >= timeout);
        if st.state == PlexPhase::Lost && expired && !replaced.contains(&p.id) {
            if create(Some(p.id), &mut steps) {
                steps.push(Step::Event {
                    kind: EventKind::Warning,
                    reason: "ReplacingPlex",
                    note: format!(
                        "plex {} on node {} lost for over {}s; building a replacement (full resync)",
                        p.id, p.node, timeout
                    ),
                });
            } else {
                short_of_hosts += 1;
            }
        }
    }
    // 2b. Grow to the desired count (creation, or scale 2 -> 3).
    let counted = live.iter().filter(|p| !replaced.contains(&p.id)).count();
    for _ in counted..desired {
        if !create(None, &mut steps) {
            short_of_hosts += 1;
        }
    }

    // 3. Pods and PVCs of existing live plexes.
    for p in &live {
        if !p.pvc_exists {
            steps.push(Step::EnsurePvc {
                id: p.id,
                node: p.node.clone(),
            });
        }
        if p.pod_ready.is_none() {
            steps.push(Step::EnsurePod {
                id: p.id,
                node: p.node.clone(),
            });
        }
    }

    // 4. A replacement in sync retires the plex it replaced.
    for p in &live {
        if let Some(old) = p.replaces {
            let old_present = obs.plexes.iter().any(|o| o.id == old);
            if phase_of(p.id) == PlexPhase::InSync && old_present {
                steps.push(Step::DeletePod { id: old });
                steps.push(Step::DeletePvc { id: old });
                steps.push(Step::DeletePlex { id: old });
                steps.push(Step::Event {
                    kind: EventKind::Normal,
                    reason: "PlexReplaced",
                    note: format!("plex {} is in sync; removed plex {old} it replaced", p.id),
                });
            }
        }
    }

    // 5. Node configs for every live plex (peers change when plexes come and go).
    let mut endpoints: Vec<PlexEndpoint> = live
        .iter()
        .map(|p| PlexEndpoint {
            id: p.id,
            node: p.node.clone(),
            address: node_address(obs, &p.node),
        })
        .collect();
    endpoints.extend(new_plexes);
    let inputs = nodeconfig::VolumeInputs {
        namespace: &obs.namespace,
        volume: &obs.name,
        uid: &obs.uid,
        spec: &obs.spec,
        size_bytes: crate::crd::parse_bytes(&obs.spec.size).unwrap_or(0),
        portal_port: obs.portal_port,
        chap: obs.chap.as_ref(),
    };
    let mut data = BTreeMap::new();
    let mut render_errors = BTreeSet::new();
    for e in &endpoints {
        match nodeconfig::render(&inputs, e, &endpoints) {
            Ok(cfg) => {
                data.insert(format!("plex-{}.yaml", e.id), cfg);
            }
            Err(err) => {
                render_errors.insert(err.to_string());
            }
        }
    }
    // The config and the secrets must exist before the pods that mount them. When any config
    // cannot be rendered, none is written (a partial Secret would change the peers of the
    // plexes that did render) and no pod is created or re-created: running pods keep their
    // last good config, a condition and an Event say why.
    let render_error = (!render_errors.is_empty())
        .then(|| render_errors.into_iter().collect::<Vec<_>>().join("; "));
    steps.insert(1, Step::EnsureSecret);
    if render_error.is_none() {
        if !data.is_empty() {
            steps.insert(
                1,
                Step::EnsureConfig {
                    data: NodeConfigs(data),
                },
            );
        }
    } else {
        steps.retain(|s| !matches!(s, Step::EnsurePod { .. }));
        if condition_reason(&obs.status, CONDITION_CONFIG_RENDERED)
            != Some(REASON_CONFIG_NOT_RENDERED)
        {
            steps.push(Step::Event {
                kind: EventKind::Warning,
                reason: REASON_CONFIG_NOT_RENDERED,
                note: render_error.clone().unwrap_or_default(),
            });
        }
    }

    // 5b. The spec's resync rate, live on every node that reports a different limit (a node
    // restart forgets an API-set limit; the config carries it where sva-node knows the field).
    if let Ok(Some(rate)) = nodeconfig::resync_bytes_per_sec(&obs.spec) {
        for (id, r) in &obs.reports {
            let alive = live.iter().any(|p| p.id == *id);
            if alive && r.resync_rate_limit_bytes_per_sec != Some(rate) {
                steps.push(Step::SetResyncRate {
                    id: *id,
                    bytes_per_sec: rate,
                });
            }
        }
    }

    // 6. Volume status, conditions, events.
    let status = volume_status(
        obs,
        &live,
        &states,
        membership,
        short_of_hosts,
        render_error.as_deref(),
    );
    let was_short = condition_reason(&obs.status, CONDITION_READY) == Some(REASON_NOT_ENOUGH_HOSTS)
        || condition_reason(&obs.status, CONDITION_SYNCED) == Some(REASON_NOT_ENOUGH_HOSTS);
    if short_of_hosts > 0 && !was_short {
        steps.push(Step::Event {
            kind: EventKind::Warning,
            reason: REASON_NOT_ENOUGH_HOSTS,
            note: format!(
                "need {short_of_hosts} more ready node(s) on distinct `{}` values",
                obs.spec.host_topology_key
            ),
        });
    }
    let healthy = status.phase == VolumePhase::Healthy;
    if status != obs.status {
        steps.push(Step::VolumeStatus(Box::new(status)));
    }
    steps.push(Step::Requeue {
        after_secs: if healthy {
            REQUEUE_IDLE_SECS
        } else {
            REQUEUE_BUSY_SECS
        },
    });
    steps
}

fn plan_deletion(obs: &Observed) -> Vec<Step> {
    let mut steps = vec![Step::Event {
        kind: EventKind::Normal,
        reason: "Deleting",
        note: format!(
            "deleting {} plex(es), their pods and PVCs",
            obs.plexes.len()
        ),
    }];
    for p in &obs.plexes {
        steps.push(Step::DeletePod { id: p.id });
        steps.push(Step::DeletePvc { id: p.id });
        steps.push(Step::DeletePlex { id: p.id });
    }
    steps.push(Step::DeleteConfig);
    steps.push(Step::DeleteSecret);
    steps.push(Step::DeleteLease);
    steps
}

/// The membership as the data plane knows it: the report with the highest epoch.
fn authoritative_report(reports: &BTreeMap<u16, NodeStatusReport>) -> Option<&NodeStatusReport> {
    reports.values().max_by_key(|r| r.epoch)
}

fn node_address(obs: &Observed, node: &str) -> Option<String> {
    obs.nodes
        .iter()
        .find(|n| n.name == node)
        .and_then(|n| n.address.clone())
}

fn plex_status(obs: &Observed, p: &PlexView, membership: Option<&NodeStatusReport>) -> PlexStatus {
    let node = obs.nodes.iter().find(|n| n.name == p.node);
    let node_ready = node.is_some_and(|n| n.ready);
    let own = obs.reports.get(&p.id);
    let dp = membership.and_then(|m| m.plexes.iter().find(|x| x.id == p.id));
    // A node reports zeros when it has no resync figures (yet): no progress to show.
    let resync = |r: Option<ResyncReport>| r.as_ref().and_then(ResyncProgress::from_node);
    let (state, message) = match (dp.map(|d| d.state), own.is_some()) {
        (Some(PlexState::Removed), _) => (PlexPhase::Removed, "removed from the membership"),
        (Some(PlexState::InSync), true) => (PlexPhase::InSync, "in sync"),
        (Some(PlexState::InSync), false) if !node_ready => (
            PlexPhase::Lost,
            "node NotReady and its sva-node does not answer",
        ),
        (Some(PlexState::InSync), false) => (PlexPhase::InSync, "in sync (status not reachable)"),
        (Some(PlexState::Resyncing), _) => (PlexPhase::Resyncing, "resynchronising"),
        (Some(PlexState::Stale), true) => (PlexPhase::Stale, "back; waiting for resync"),
        (Some(PlexState::Stale), false) => (
            PlexPhase::Lost,
            "stale in the membership and its sva-node does not answer",
        ),
        (None, _) if !node_ready && p.pod_ready.is_some() || node.is_none() => (
            PlexPhase::Lost,
            "node NotReady or gone (no data-plane report)",
        ),
        (None, _) if p.status.state == PlexPhase::Lost && !node_ready => {
            (PlexPhase::Lost, "node NotReady (no data-plane report)")
        }
        (None, _) => (PlexPhase::Pending, "waiting for the sva-node to report"),
    };
    let resync = match state {
        PlexPhase::Resyncing => resync(dp.map(|d| d.resync)).or_else(|| {
            resync(own.and_then(|o| Some(o.plexes.iter().find(|x| x.id == p.id)?.resync)))
        }),
        _ => None,
    };
    let alua_state = match (state, own) {
        (PlexPhase::Lost, _) => AluaState::Offline,
        (_, Some(r)) => alua_of(r.alua_state),
        (_, None) => AluaState::Unavailable,
    };
    let lost_since = (state == PlexPhase::Lost).then(|| p.status.lost_since.unwrap_or(obs.now));
    PlexStatus {
        state,
        alua_state,
        portal: node_address(obs, &p.node).map(|a| format!("{a}:{}", obs.portal_port)),
        resync,
        lost_since,
        message: Some(message.to_string()),
    }
}

/// The CRD's ALUA state of what the node reports (SPC-4 §6.27 states the CRD does not list
/// read as Unavailable: the path does not serve the volume).
fn alua_of(s: sva_node::scsi::alua::AluaState) -> AluaState {
    use sva_node::scsi::alua::AluaState as Node;
    match s {
        Node::ActiveOptimized => AluaState::ActiveOptimized,
        Node::Transitioning => AluaState::Transitioning,
        Node::ActiveNonOptimized | Node::Standby | Node::Unavailable => AluaState::Unavailable,
    }
}

fn transition_event(p: &PlexView, new: &PlexStatus) -> Option<Step> {
    let (old, now) = (p.status.state, new.state);
    if old == now {
        return None;
    }
    let (kind, reason, note) = match now {
        PlexPhase::Lost => (
            EventKind::Warning,
            "PlexLost",
            format!(
                "plex {} on node {}: {}",
                p.id,
                p.node,
                new.message.as_deref().unwrap_or("")
            ),
        ),
        PlexPhase::Stale | PlexPhase::Resyncing if old == PlexPhase::Lost => (
            EventKind::Normal,
            "PlexReturned",
            format!("plex {} on node {} is back; resynchronising", p.id, p.node),
        ),
        PlexPhase::InSync => (
            EventKind::Normal,
            "PlexInSync",
            format!("plex {} on node {} is in sync", p.id, p.node),
        ),
        _ => return None,
    };
    Some(Step::Event { kind, reason, note })
}

fn condition_reason<'a>(status: &'a MirroredVolumeStatus, ty: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == ty)
        .map(|c| c.reason.as_str())
}

fn volume_status(
    obs: &Observed,
    live: &[&PlexView],
    states: &BTreeMap<u16, PlexStatus>,
    membership: Option<&NodeStatusReport>,
    short_of_hosts: usize,
    render_error: Option<&str>,
) -> MirroredVolumeStatus {
    let desired = usize::from(obs.spec.plexes);
    let st = |id: u16| states.get(&id).cloned().unwrap_or_default();
    let in_sync = live
        .iter()
        .filter(|p| st(p.id).state == PlexPhase::InSync)
        .count();
    let lost = live
        .iter()
        .filter(|p| st(p.id).state == PlexPhase::Lost)
        .count();
    let resyncing: Vec<ResyncProgress> = live.iter().filter_map(|p| st(p.id).resync).collect();
    let resync = ResyncProgress::sum(&resyncing);
    let phase = if in_sync >= desired && lost == 0 {
        VolumePhase::Healthy
    } else if in_sync == 0 && short_of_hosts > 0 && live.is_empty() {
        VolumePhase::Failed
    } else if in_sync == 0 && lost == 0 {
        VolumePhase::Pending
    } else if resync.is_some() {
        VolumePhase::Resyncing
    } else {
        VolumePhase::Degraded
    };
    let paths = live
        .iter()
        .filter_map(|p| {
            let s = st(p.id);
            Some(PathStatus {
                plex: format!("{}-p{}", obs.name, p.id),
                node: p.node.clone(),
                portal: s.portal.clone()?,
                target_port_group: p.id,
                alua_state: s.alua_state,
            })
        })
        .collect();
    let short_reason = (short_of_hosts > 0).then_some(REASON_NOT_ENOUGH_HOSTS);
    let ready = if in_sync > 0 {
        (
            true,
            "Serving",
            format!("{in_sync} plex(es) in sync serve I/O"),
        )
    } else {
        (
            false,
            short_reason.unwrap_or("NoPlexInSync"),
            "no plex in sync yet".to_string(),
        )
    };
    let synced = if in_sync >= desired {
        (
            true,
            "AllPlexesInSync",
            format!("{in_sync}/{desired} plexes in sync"),
        )
    } else {
        (
            false,
            short_reason.unwrap_or(if resync.is_some() {
                "Resyncing"
            } else {
                "PlexesNotInSync"
            }),
            format!("{in_sync}/{desired} plexes in sync"),
        )
    };
    let degraded = if in_sync < desired && in_sync > 0 || lost > 0 {
        (
            true,
            if lost > 0 {
                "PlexLost"
            } else {
                "PlexesNotInSync"
            },
            format!("{lost} plex(es) lost"),
        )
    } else {
        (false, "AsDesired", "no plex missing".to_string())
    };
    let config = match render_error {
        None => (
            true,
            "Rendered",
            "every plex's node config is written".to_string(),
        ),
        Some(why) => (false, REASON_CONFIG_NOT_RENDERED, why.to_string()),
    };
    let conditions = [
        (CONDITION_READY, ready),
        (CONDITION_SYNCED, synced),
        (CONDITION_DEGRADED, degraded),
        (CONDITION_CONFIG_RENDERED, config),
    ]
    .into_iter()
    .map(|(ty, (ok, reason, message))| condition(obs, ty, ok, reason, message))
    .collect();
    MirroredVolumeStatus {
        phase,
        conditions,
        observed_generation: obs.generation,
        portal_port: Some(obs.portal_port),
        target_iqn: Some(nodeconfig::target_iqn(&obs.namespace, &obs.name)),
        epoch: membership.map(|m| m.epoch).or(obs.status.epoch),
        in_sync_plexes: u8::try_from(in_sync).unwrap_or(u8::MAX),
        paths,
        resync,
    }
}

/// A condition whose lastTransitionTime only moves when its status does.
fn condition(obs: &Observed, ty: &str, ok: bool, reason: &str, message: String) -> Condition {
    let status = if ok { "True" } else { "False" }.to_string();
    let prev = obs.status.conditions.iter().find(|c| c.type_ == ty);
    let last_transition_time = match prev {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::from_second(obs.now).unwrap_or_default()),
    };
    Condition {
        type_: ty.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: obs.generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests;
