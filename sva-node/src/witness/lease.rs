//! [`Witness`] on a `coordination.k8s.io/v1` Lease per volume (DESIGN.md §8): the in-cluster
//! witness the sva-nodes CAS directly, so failover never waits for the operator. Built only with
//! the `kubernetes` feature.
//!
//! The membership record is JSON in the Lease annotation `sva.io/membership`; compare-and-swap
//! is a read (epoch check, [`decide_cas`]) followed by a create or a replace carrying the read
//! `resourceVersion`, which the apiserver refuses with 409 if anyone wrote in between. A lost
//! race re-reads and decides again: `Conflict` with the current record if the epoch moved, a
//! retry if only the Lease changed. The operator pre-creates the Lease (empty, no record) so the
//! nodes' Role needs only `get`/`update` on that one Lease.
//!
//! ```text
//!  mirror engine ──Witness──> LeaseWitness ──GET / PUT (resourceVersion)──> kube-apiserver
//!                                  Lease <name>: annotations {sva.io/membership, sva.io/volume}
//! ```

use std::path::Path;

use futures::future::BoxFuture;
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

use super::{decide_cas, Membership, Witness, WitnessError};

/// Annotation holding the membership record (JSON).
pub const MEMBERSHIP_ANNOTATION: &str = "sva.io/membership";
/// Annotation naming the volume whose record the Lease holds: a Lease shared by mistake between
/// two volumes is refused instead of mixing their records.
pub const VOLUME_ANNOTATION: &str = "sva.io/volume";
/// Attempts of one CAS when the Lease changed under us without an epoch change.
pub const CAS_ATTEMPTS_MAX: usize = 4;
/// Where a pod finds its own namespace (the service-account token mount).
pub const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Name of the Lease that is `volume`'s witness when nothing else names it (the operator's
/// convention, `<volume>-sva-witness`).
pub fn lease_name(volume: &str) -> String {
    format!("{volume}-sva-witness")
}

/// Which Lease holds which volume's record.
#[derive(Clone, Debug)]
enum Naming {
    /// `<volume>-sva-witness` for every volume (the operator; tests).
    PerVolume,
    /// One configured Lease for the one volume this node serves (`mirror.witness`).
    Fixed { volume: String, lease: String },
}

/// Witness backed by one Lease per volume in one namespace.
#[derive(Clone)]
pub struct LeaseWitness {
    api: Api<Lease>,
    naming: Naming,
}

impl LeaseWitness {
    /// Every volume's record in the Lease [`lease_name`]`(volume)` of `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            naming: Naming::PerVolume,
        }
    }

    /// `volume`'s record in the Lease `lease` of `namespace`; any other volume is refused
    /// (`Protocol`), so a node can only ever touch the Lease its config names.
    pub fn for_volume(client: Client, namespace: &str, volume: &str, lease: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            naming: Naming::Fixed {
                volume: volume.into(),
                lease: lease.into(),
            },
        }
    }

    /// The witness `mirror.witness.kubernetesLease` describes, with the in-cluster client
    /// (service-account token) or, outside a cluster, the kubeconfig. `namespace: None` reads
    /// the pod's namespace from [`POD_NAMESPACE_FILE`].
    pub async fn from_config(
        volume: &str,
        namespace: Option<&str>,
        lease: &str,
    ) -> Result<Self, WitnessError> {
        let namespace = resolve_namespace(namespace, Path::new(POD_NAMESPACE_FILE))?;
        let client = Client::try_default()
            .await
            .map_err(|e| WitnessError::Unreachable(format!("Kubernetes client: {e}")))?;
        Ok(Self::for_volume(client, &namespace, volume, lease))
    }

    fn lease_for(&self, volume: &str) -> Result<String, WitnessError> {
        match &self.naming {
            Naming::PerVolume => Ok(lease_name(volume)),
            Naming::Fixed { volume: v, lease } if v == volume => Ok(lease.clone()),
            Naming::Fixed { volume: v, lease } => Err(WitnessError::Protocol(format!(
                "lease {lease} holds volume {v}'s record, not volume {volume}'s"
            ))),
        }
    }

    /// The Lease (if it exists) and the record it holds (if any).
    async fn read(
        &self,
        volume: &str,
        lease: &str,
    ) -> Result<Option<(Lease, Option<Membership>)>, WitnessError> {
        let Some(obj) = self.api.get_opt(lease).await.map_err(map_err)? else {
            return Ok(None);
        };
        let annotations = obj.metadata.annotations.as_ref();
        if let Some(other) = annotations.and_then(|a| a.get(VOLUME_ANNOTATION)) {
            if other != volume {
                return Err(WitnessError::Protocol(format!(
                    "lease {lease} holds volume {other}'s record, not volume {volume}'s"
                )));
            }
        }
        let record = match annotations.and_then(|a| a.get(MEMBERSHIP_ANNOTATION)) {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                WitnessError::Protocol(format!("lease {lease}: bad membership annotation: {e}"))
            })?),
            None => None,
        };
        Ok(Some((obj, record)))
    }

    async fn cas_inner(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> Result<Membership, WitnessError> {
        let lease = self.lease_for(volume)?;
        let json =
            serde_json::to_string(&record).map_err(|e| WitnessError::Protocol(e.to_string()))?;
        for _ in 0..CAS_ATTEMPTS_MAX {
            let current = self.read(volume, &lease).await?;
            decide_cas(
                current.as_ref().and_then(|(_, m)| m.as_ref()),
                expected_epoch,
                &record,
            )?;
            let result = match current {
                None => {
                    let obj = lease_with(Lease::default(), &lease, volume, &json, &record);
                    self.api.create(&PostParams::default(), &obj).await
                }
                // Replace carries the read resourceVersion: the apiserver's compare-and-swap.
                Some((obj, _)) => {
                    let obj = lease_with(obj, &lease, volume, &json, &record);
                    self.api.replace(&lease, &PostParams::default(), &obj).await
                }
            };
            match result {
                Ok(_) => return Ok(record),
                // Someone wrote between our read and write: re-read and decide again.
                Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => continue,
                Err(e) => return Err(map_err(e)),
            }
        }
        Err(WitnessError::Unreachable(format!(
            "lease {lease} kept changing; gave up after {CAS_ATTEMPTS_MAX} attempts"
        )))
    }
}

/// The namespace to use: the configured one, else the pod's own from `file`.
pub fn resolve_namespace(configured: Option<&str>, file: &Path) -> Result<String, WitnessError> {
    if let Some(ns) = configured {
        return Ok(ns.to_string());
    }
    let ns = std::fs::read_to_string(file).map_err(|e| {
        WitnessError::Protocol(format!(
            "mirror.witness.kubernetesLease.namespace is unset and the pod namespace file {} \
             cannot be read ({e}); set the namespace",
            file.display()
        ))
    })?;
    let ns = ns.trim();
    if ns.is_empty() {
        return Err(WitnessError::Protocol(format!(
            "pod namespace file {} is empty",
            file.display()
        )));
    }
    Ok(ns.to_string())
}

/// `lease` carrying `record`, holder = the sequencer's node (so `kubectl get lease` tells).
fn lease_with(mut obj: Lease, lease: &str, volume: &str, json: &str, record: &Membership) -> Lease {
    let meta: &mut ObjectMeta = &mut obj.metadata;
    meta.name = Some(lease.to_string());
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(MEMBERSHIP_ANNOTATION.into(), json.into());
    annotations.insert(VOLUME_ANNOTATION.into(), volume.into());
    let holder = record
        .plexes
        .iter()
        .find(|p| p.id == record.sequencer)
        .map(|p| p.node.clone());
    let spec = obj.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = holder;
    obj
}

fn map_err(e: kube::Error) -> WitnessError {
    match e {
        kube::Error::Api(s) if s.code == 401 || s.is_forbidden() => WitnessError::Unauthorized,
        e => WitnessError::Unreachable(e.to_string()),
    }
}

impl Witness for LeaseWitness {
    fn get(&self, volume: &str) -> BoxFuture<'_, Result<Option<Membership>, WitnessError>> {
        let volume = volume.to_string();
        async move {
            let lease = self.lease_for(&volume)?;
            Ok(self.read(&volume, &lease).await?.and_then(|(_, m)| m))
        }
        .boxed()
    }

    fn cas(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> BoxFuture<'_, Result<Membership, WitnessError>> {
        let volume = volume.to_string();
        async move { self.cas_inner(&volume, expected_epoch, record).await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_configured_wins_else_pod_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("namespace");
        assert_eq!(resolve_namespace(Some("a"), &f).unwrap(), "a");
        let e = resolve_namespace(None, &f).unwrap_err().to_string();
        assert!(e.contains("set the namespace"), "{e}");
        std::fs::write(&f, "storage\n").unwrap();
        assert_eq!(resolve_namespace(None, &f).unwrap(), "storage");
        std::fs::write(&f, "  \n").unwrap();
        assert!(resolve_namespace(None, &f).is_err());
    }
}
