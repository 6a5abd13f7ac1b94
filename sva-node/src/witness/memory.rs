//! In-memory witness for tests and the deterministic simulation.
//!
//! Clones share one store, so several "nodes" can hold their own handle. A fault switch
//! simulates a partition from the witness ([`MemoryFault::Unreachable`]) or a CAS whose answer
//! is lost after it was applied ([`MemoryFault::LostReply`], the ambiguous outcome a real
//! network produces). Futures complete immediately, so the simulation stays deterministic.

use super::{decide_cas, Membership, Witness, WitnessError};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Fault injected into every call of a [`MemoryWitness`] handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFault {
    /// Answer normally.
    #[default]
    None,
    /// Every call fails with `Unreachable` and changes nothing (partition from the witness).
    Unreachable,
    /// A CAS is applied (if it wins) but the caller gets `Unreachable`; `get` is unreachable.
    LostReply,
}

/// Witness kept in memory. Cheap to clone; clones share the records *and* the fault switch
/// unless made with [`MemoryWitness::handle`].
#[derive(Clone, Default)]
pub struct MemoryWitness {
    records: Arc<Mutex<HashMap<String, Membership>>>,
    fault: Arc<Mutex<MemoryFault>>,
}

impl MemoryWitness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Another handle on the same records with its own fault switch (one per simulated node,
    /// so one node can be cut off from the witness while the other still reaches it).
    pub fn handle(&self) -> Self {
        Self {
            records: self.records.clone(),
            fault: Arc::new(Mutex::new(MemoryFault::None)),
        }
    }

    /// Sets the fault of this handle (and of its clones).
    pub fn set_fault(&self, fault: MemoryFault) {
        *lock(&self.fault) = fault;
    }

    /// Shorthand: `set_fault(Unreachable)` or `set_fault(None)`.
    pub fn set_reachable(&self, reachable: bool) {
        self.set_fault(if reachable {
            MemoryFault::None
        } else {
            MemoryFault::Unreachable
        });
    }

    /// The record as stored, bypassing the fault switch (for assertions).
    pub fn peek(&self, volume: &str) -> Option<Membership> {
        lock(&self.records).get(volume).cloned()
    }

    fn fault(&self) -> MemoryFault {
        *lock(&self.fault)
    }

    fn cas_now(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> Result<Membership, WitnessError> {
        let fault = self.fault();
        if fault == MemoryFault::Unreachable {
            return Err(unreachable());
        }
        let mut records = lock(&self.records);
        let outcome = decide_cas(records.get(volume), expected_epoch, &record);
        if outcome.is_ok() {
            records.insert(volume.to_string(), record.clone());
        }
        if fault == MemoryFault::LostReply {
            return Err(WitnessError::Unreachable(
                "memory witness: reply lost".into(),
            ));
        }
        outcome.map(|()| record)
    }
}

/// A poisoned lock only means a test panicked while holding it; the map is still consistent
/// (every mutation is a single insert).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unreachable() -> WitnessError {
    WitnessError::Unreachable("memory witness: partitioned".into())
}

impl Witness for MemoryWitness {
    fn get(&self, volume: &str) -> BoxFuture<'_, Result<Option<Membership>, WitnessError>> {
        let result = match self.fault() {
            MemoryFault::None => Ok(self.peek(volume)),
            MemoryFault::Unreachable | MemoryFault::LostReply => Err(unreachable()),
        };
        futures::future::ready(result).boxed()
    }

    fn cas(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> BoxFuture<'_, Result<Membership, WitnessError>> {
        futures::future::ready(self.cas_now(volume, expected_epoch, record)).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::conformance::{record, run_conformance};

    #[tokio::test]
    async fn conformance() {
        let w = MemoryWitness::new();
        run_conformance(|| w.clone()).await;
    }

    #[tokio::test]
    async fn unreachable_changes_nothing_and_heals() {
        let w = MemoryWitness::new();
        w.cas("v", None, record(1, 1)).await.unwrap();
        w.set_reachable(false);
        assert!(matches!(
            w.cas("v", Some(1), record(2, 2)).await,
            Err(WitnessError::Unreachable(_))
        ));
        assert!(matches!(
            w.get("v").await,
            Err(WitnessError::Unreachable(_))
        ));
        assert_eq!(w.peek("v"), Some(record(1, 1)));
        w.set_reachable(true);
        assert_eq!(w.get("v").await.unwrap(), Some(record(1, 1)));
    }

    #[tokio::test]
    async fn partition_of_one_handle_leaves_the_other_reaching_the_witness() {
        let a = MemoryWitness::new();
        let b = a.handle();
        a.cas("v", None, record(1, 1)).await.unwrap();
        a.set_reachable(false);
        assert!(a.cas("v", Some(1), record(2, 1)).await.is_err());
        assert_eq!(
            b.cas("v", Some(1), record(2, 2)).await.unwrap(),
            record(2, 2)
        );
        a.set_reachable(true);
        match a.cas("v", Some(1), record(2, 1)).await {
            Err(WitnessError::Conflict(cur)) => assert_eq!(*cur, record(2, 2)),
            other => panic!("expected Conflict, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn lost_reply_applies_the_cas_but_reports_unreachable() {
        let w = MemoryWitness::new();
        w.cas("v", None, record(1, 1)).await.unwrap();
        w.set_fault(MemoryFault::LostReply);
        assert!(matches!(
            w.cas("v", Some(1), record(2, 2)).await,
            Err(WitnessError::Unreachable(_))
        ));
        assert_eq!(w.peek("v"), Some(record(2, 2)));
        // A losing CAS under LostReply changes nothing either.
        assert!(w.cas("v", Some(1), record(3, 1)).await.is_err());
        assert_eq!(w.peek("v"), Some(record(2, 2)));
    }
}
