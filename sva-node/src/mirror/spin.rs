//! When polling beats sleeping: a moving average of how long recent waits took.
//!
//! A mirrored write can wait twice for another node: the origin for its peers' acks, and
//! each peer for the next op. Either waiter may poll (spin on the socket, yielding) instead
//! of sleeping, which saves the wake-up of an idle vCPU: on a VM that is about half a
//! loopback round trip (README, "Mirrored writes"). Polling pays only when the wait is short;
//! a write-through volume's acks wait for the peer's flush, and a light load's next op comes
//! much later than a poll lasts. So each waiter polls only while its recent waits ended
//! within its poll limit, judged by [`RecentWaits`].
//!
//! A VM guest whose idle loop already polls (the `haltpoll` cpuidle driver with
//! `guest_halt_poll_ns` above 0) wakes cheaply, and there a link that polls for the next op
//! only takes CPU from the initiator and the origin: on the 2-vCPU test VM it added 6–13 µs
//! per QD1 write (2 and 3 plexes). So the op poll's default is off on such a guest ([`op_spin_default`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::OP_SPIN_MICROS_DEFAULT;

/// Moving average of recent waits, shared between threads.
#[derive(Debug, Default)]
pub struct RecentWaits {
    /// In nanoseconds (0: none yet).
    avg_nanos: AtomicU64,
}

impl RecentWaits {
    /// Weight of the newest wait in the average: 1/8.
    const SHIFT: u32 = 3;

    /// Add a wait that took `waited`.
    pub fn record(&self, waited: Duration) {
        let w = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let old = self.avg_nanos.load(Ordering::Relaxed);
        let new = if old == 0 {
            w
        } else {
            old - (old >> Self::SHIFT) + (w >> Self::SHIFT)
        };
        self.avg_nanos.store(new, Ordering::Relaxed);
    }

    /// Whether the next wait should poll, polling at most `limit`: yes when waits lately
    /// ended within it (and before any wait is known). Waits recorded after a poll gave up
    /// keep the average honest, so polling resumes once waits are short again.
    pub fn poll_now(&self, limit: Duration) -> bool {
        !limit.is_zero() && self.avg_nanos.load(Ordering::Relaxed) <= limit.as_nanos() as u64
    }
}

/// Where a VM guest's halt-polling window is set.
const GUEST_HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// `mirror.opSpinMicros` when the config does not say: [`OP_SPIN_MICROS_DEFAULT`], or zero
/// when this guest's idle loop already polls (module doc). Read once at start; the setting
/// is the host admin's and rarely changes.
pub fn op_spin_default() -> Duration {
    let halt_poll_ns = std::fs::read_to_string(GUEST_HALT_POLL_NS)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if halt_poll_ns > 0 {
        tracing::info!(
            halt_poll_ns,
            "guest halt polling is on: replication links sleep between ops \
             (mirror.opSpinMicros defaults to 0 here)"
        );
        Duration::ZERO
    } else {
        Duration::from_micros(OP_SPIN_MICROS_DEFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits that end within the limit keep polling on; a run of slow ones (a write-through
    /// flush on the peer) stops it, and fast ones bring it back.
    #[test]
    fn polling_follows_how_long_waits_take() {
        let limit = Duration::from_micros(200);
        let w = RecentWaits::default();
        assert!(w.poll_now(limit), "polls until it knows better");
        assert!(!w.poll_now(Duration::ZERO), "0 turns polling off");
        for _ in 0..20 {
            w.record(Duration::from_micros(80));
        }
        assert!(w.poll_now(limit));
        for _ in 0..20 {
            w.record(Duration::from_millis(1));
        }
        assert!(!w.poll_now(limit), "waits for a flush are slept through");
        let mut fast = 0;
        while !w.poll_now(limit) {
            w.record(Duration::from_micros(80));
            fast += 1;
            assert!(fast < 100, "polling never came back");
        }
        assert!(fast > 1, "one short wait is not a trend");
    }
}
