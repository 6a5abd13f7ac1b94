//! The in-cluster witness, `sva_node::witness::lease::LeaseWitness` (DESIGN.md §8): the
//! sva-nodes CAS their volume's Lease directly, so failover never waits for the operator. The
//! implementation lives in sva-node (feature `kubernetes`, which this crate enables) so the
//! nodes and the operator share one; this module re-exports it and runs its conformance and
//! Lease-specific tests against the fake API server of `fixtures`.

pub use sva_node::witness::lease::{
    lease_name, LeaseWitness, CAS_ATTEMPTS_MAX, MEMBERSHIP_ANNOTATION, VOLUME_ANNOTATION,
};

#[cfg(test)]
mod tests {
    //! Witness conformance (the contract in sva-node/src/witness/mod.rs) against the fake API
    //! server of `fixtures` (no real kube-apiserver can run on the build machines).
    use super::*;
    use crate::fixtures::FakeApi;
    use sva_node::witness::{Membership, PlexRecord, PlexState, Witness, WitnessError};

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

    /// What an sva-node uses (`mirror.witness.kubernetesLease`): the configured Lease, for its
    /// own volume only.
    #[tokio::test]
    async fn node_witness_uses_the_configured_lease_for_its_volume_only() {
        let api = FakeApi::default();
        let w = LeaseWitness::for_volume(api.client(), "ns", "vol", "custom-lease");
        w.cas("vol", None, rec(1, PlexState::InSync)).await.unwrap();
        let lease = api
            .get("/apis/coordination.k8s.io/v1/namespaces/ns/leases/custom-lease")
            .unwrap();
        assert_eq!(lease["metadata"]["annotations"][VOLUME_ANNOTATION], "vol");
        assert!(api.get(LEASE).is_none(), "the default name is not used");
        assert_eq!(w.get("vol").await.unwrap(), Some(rec(1, PlexState::InSync)));
        assert!(matches!(
            w.get("other").await,
            Err(WitnessError::Protocol(_))
        ));
        assert!(matches!(
            w.cas("other", None, rec(1, PlexState::InSync)).await,
            Err(WitnessError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn lease_holding_another_volume_is_refused() {
        let api = FakeApi::default();
        LeaseWitness::for_volume(api.client(), "ns", "a", "shared")
            .cas("a", None, rec(1, PlexState::InSync))
            .await
            .unwrap();
        let b = LeaseWitness::for_volume(api.client(), "ns", "b", "shared");
        assert!(matches!(b.get("b").await, Err(WitnessError::Protocol(_))));
        assert!(matches!(
            b.cas("b", None, rec(1, PlexState::InSync)).await,
            Err(WitnessError::Protocol(_))
        ));
    }
}
