//! `sva_node::witness::Witness` on a `coordination.k8s.io/v1` Lease per volume (DESIGN.md §8):
//! the in-cluster witness the sva-nodes use directly, so failover never waits for the operator.
//!
//! The membership record is JSON in the Lease annotation `sva.io/membership`; compare-and-swap
//! is a read (epoch check) followed by a replace carrying the read `resourceVersion`, which the
//! apiserver refuses with 409 if anyone wrote in between. A lost race re-reads and answers
//! `Conflict` with the current record if the epoch moved, or retries if only the Lease changed.
//! The operator pre-creates the Lease (empty) so the nodes' Role needs only get/update on it.

use crate::nodeconfig::lease_name;
use futures::future::BoxFuture;
use futures::FutureExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use sva_node::witness::{Membership, Witness, WitnessError};

/// Annotation holding the membership record (JSON).
pub const MEMBERSHIP_ANNOTATION: &str = "sva.io/membership";
/// Attempts of one CAS when the Lease changed under us without an epoch change.
pub const CAS_ATTEMPTS_MAX: usize = 4;

/// Witness backed by one Lease per volume in `namespace`.
#[derive(Clone)]
pub struct LeaseWitness {
    api: Api<Lease>,
}

impl LeaseWitness {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }

    async fn read(
        &self,
        volume: &str,
    ) -> Result<Option<(Lease, Option<Membership>)>, WitnessError> {
        let Some(lease) = self
            .api
            .get_opt(&lease_name(volume))
            .await
            .map_err(map_err)?
        else {
            return Ok(None);
        };
        let record =
            match lease
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(MEMBERSHIP_ANNOTATION))
            {
                Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                    WitnessError::Protocol(format!("bad membership annotation: {e}"))
                })?),
                None => None,
            };
        Ok(Some((lease, record)))
    }

    async fn cas_inner(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> Result<Membership, WitnessError> {
        if let Some(e) = expected_epoch {
            if record.epoch <= e {
                return Err(WitnessError::Protocol(format!(
                    "new epoch {} must exceed expected epoch {e}",
                    record.epoch
                )));
            }
        }
        let json =
            serde_json::to_string(&record).map_err(|e| WitnessError::Protocol(e.to_string()))?;
        for _ in 0..CAS_ATTEMPTS_MAX {
            let result = match (self.read(volume).await?, expected_epoch) {
                (None, None) => {
                    let lease = lease_with(Lease::default(), volume, &json, &record);
                    self.api.create(&PostParams::default(), &lease).await
                }
                (Some((lease, None)), None) => {
                    let lease = lease_with(lease, volume, &json, &record);
                    self.api
                        .replace(&lease_name(volume), &PostParams::default(), &lease)
                        .await
                }
                (Some((_, Some(current))), None) => {
                    return Err(WitnessError::Conflict(Box::new(current)))
                }
                (Some((_, Some(current))), Some(e)) if current.epoch != e => {
                    return Err(WitnessError::Conflict(Box::new(current)))
                }
                (Some((lease, Some(_))), Some(_)) => {
                    let lease = lease_with(lease, volume, &json, &record);
                    self.api
                        .replace(&lease_name(volume), &PostParams::default(), &lease)
                        .await
                }
                (_, Some(e)) => {
                    return Err(WitnessError::Protocol(format!(
                        "no record for volume {volume}, expected epoch {e}"
                    )))
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
            "lease {} kept changing; gave up",
            lease_name(volume)
        )))
    }
}

/// The Lease carrying `record`, holder = the sequencer's node (so `kubectl get lease` tells).
fn lease_with(mut lease: Lease, volume: &str, json: &str, record: &Membership) -> Lease {
    let meta: &mut ObjectMeta = &mut lease.metadata;
    meta.name = Some(lease_name(volume));
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(MEMBERSHIP_ANNOTATION.into(), json.into());
    let holder = record
        .plexes
        .iter()
        .find(|p| p.id == record.sequencer)
        .map(|p| p.node.clone());
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = holder;
    lease
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
        async move { Ok(self.read(&volume).await?.and_then(|(_, m)| m)) }.boxed()
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
    //! Witness conformance (the contract in sva-node/src/witness/mod.rs) against the fake API
    //! server of `fixtures` (no real kube-apiserver can run on the build machines).
    use super::*;
    use crate::fixtures::FakeApi;
    use sva_node::witness::{PlexRecord, PlexState};

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/vol-sva-witness";

    fn rec(epoch: u64, p2: PlexState) -> Membership {
        let plex = |id: u16, node: &str, state| PlexRecord {
            id,
            node: node.into(),
            portal: format!("10.0.0.{id}:32600"),
            peer_addr: format!("10.0.0.{id}:32601"),
            state,
        };
        Membership {
            epoch,
            plexes: vec![plex(1, "w1", PlexState::InSync), plex(2, "w2", p2)],
            sequencer: 1,
        }
    }

    /// The shared suite every `Witness` runs (sva-node/src/witness/conformance.rs); the tests
    /// below add what is specific to Leases.
    #[tokio::test]
    async fn conformance() {
        let api = FakeApi::default();
        sva_node::witness::conformance::run_conformance(|| LeaseWitness::new(api.client(), "ns"))
            .await;
    }

    #[tokio::test]
    async fn get_unknown_volume_is_none() {
        let w = LeaseWitness::new(FakeApi::default().client(), "ns");
        assert_eq!(w.get("vol").await.unwrap(), None);
    }

    #[tokio::test]
    async fn create_if_absent_then_conflict_with_current() {
        let api = FakeApi::default();
        let w = LeaseWitness::new(api.client(), "ns");
        assert_eq!(
            w.cas("vol", None, rec(1, PlexState::InSync))
                .await
                .unwrap()
                .epoch,
            1
        );
        assert_eq!(w.get("vol").await.unwrap(), Some(rec(1, PlexState::InSync)));
        let lease = api.get(LEASE).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "w1");
        match w.cas("vol", None, rec(1, PlexState::Stale)).await {
            Err(WitnessError::Conflict(cur)) => assert_eq!(*cur, rec(1, PlexState::InSync)),
            other => panic!("expected Conflict, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn precreated_empty_lease_counts_as_absent() {
        let api = FakeApi::default();
        api.seed(
            LEASE,
            serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "vol-sva-witness", "namespace": "ns"}, "spec": {}}),
        );
        let w = LeaseWitness::new(api.client(), "ns");
        assert_eq!(w.get("vol").await.unwrap(), None);
        w.cas("vol", None, rec(1, PlexState::InSync)).await.unwrap();
        assert_eq!(w.get("vol").await.unwrap().map(|m| m.epoch), Some(1));
        assert!(
            api.log().iter().any(|l| l.starts_with("PUT ")),
            "replaced, not created"
        );
    }

    #[tokio::test]
    async fn cas_wrong_epoch_conflicts_and_changes_nothing() {
        let w = LeaseWitness::new(FakeApi::default().client(), "ns");
        w.cas("vol", None, rec(1, PlexState::InSync)).await.unwrap();
        w.cas("vol", Some(1), rec(2, PlexState::Stale))
            .await
            .unwrap();
        match w.cas("vol", Some(1), rec(3, PlexState::Resyncing)).await {
            Err(WitnessError::Conflict(cur)) => assert_eq!(*cur, rec(2, PlexState::Stale)),
            other => panic!("expected Conflict, got {other:?}"),
        }
        assert_eq!(w.get("vol").await.unwrap(), Some(rec(2, PlexState::Stale)));
    }

    #[tokio::test]
    async fn cas_right_epoch_installs_new_record() {
        let w = LeaseWitness::new(FakeApi::default().client(), "ns");
        w.cas("vol", None, rec(1, PlexState::InSync)).await.unwrap();
        let got = w
            .cas("vol", Some(1), rec(2, PlexState::Stale))
            .await
            .unwrap();
        assert_eq!(got, rec(2, PlexState::Stale));
        assert_eq!(w.get("vol").await.unwrap(), Some(rec(2, PlexState::Stale)));
        // Epoch must move forward.
        assert!(matches!(
            w.cas("vol", Some(2), rec(2, PlexState::InSync)).await,
            Err(WitnessError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn racing_writer_between_read_and_replace_is_detected() {
        // Two witnesses on the same API: both read epoch 1; the first wins, the second gets
        // Conflict with the winner's record (resourceVersion check), never a silent overwrite.
        let api = FakeApi::default();
        let a = LeaseWitness::new(api.client(), "ns");
        let b = LeaseWitness::new(api.client(), "ns");
        a.cas("vol", None, rec(1, PlexState::InSync)).await.unwrap();
        let (ra, rb) = tokio::join!(
            a.cas("vol", Some(1), rec(2, PlexState::Stale)),
            b.cas("vol", Some(1), rec(2, PlexState::Resyncing))
        );
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "exactly one CAS wins: {ra:?} {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        let winner_record = a.get("vol").await.unwrap().unwrap();
        match loser {
            Err(WitnessError::Conflict(cur)) => assert_eq!(*cur, winner_record),
            other => panic!("expected Conflict, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn annotation_change_without_epoch_change_is_retried() {
        let api = FakeApi::default();
        let w = LeaseWitness::new(api.client(), "ns");
        w.cas("vol", None, rec(1, PlexState::InSync)).await.unwrap();
        // Another writer (e.g. kubectl annotate) bumps the resourceVersion only.
        api.touch(LEASE, |o| {
            o["metadata"]["labels"] = serde_json::json!({"x": "y"})
        });
        w.cas("vol", Some(1), rec(2, PlexState::Stale))
            .await
            .unwrap();
        assert_eq!(w.get("vol").await.unwrap().map(|m| m.epoch), Some(2));
    }
}
