//! Process-wide bound on buffered write data ([`Limits::write_buffer_bytes_max`]).
//!
//! A connection may have `cmds_max` (128) commands open, each writing up to
//! `write_bytes_max` (32 MiB) that is buffered in memory until the command runs: 4 GiB per
//! connection, times the connection limit. The target decides when solicited data comes
//! (it sends the R2Ts, RFC 7143 §11.8), so that is where the bound applies: before a
//! command's first R2T, its whole solicited range is reserved here; without room, the R2T
//! waits until another command completes. Reserving all of a command at once (not each
//! R2T) means every command holding a reservation can finish, so commands never wait on
//! each other in a cycle. A reservation is released when its command completes or is
//! dropped (abort, connection loss). Unsolicited data (immediate data and the first burst)
//! is not counted: it is bounded per connection by `cmds_max × FirstBurstLength`.
//!
//! [`Limits::write_buffer_bytes_max`]: super::Limits::write_buffer_bytes_max

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Bytes of R2T-solicited write data reserved by commands not yet completed.
#[derive(Debug)]
pub struct WriteBudget {
    max: u64,
    used: Mutex<u64>,
    /// Bumped on every release, so that connections waiting for room retry.
    released: watch::Sender<u64>,
}

/// Room for one command's solicited data; given back when dropped.
#[derive(Debug)]
pub struct WriteReservation {
    budget: Arc<WriteBudget>,
    bytes: u64,
}

impl WriteBudget {
    pub fn new(max_bytes: u64) -> Arc<WriteBudget> {
        Arc::new(WriteBudget {
            max: max_bytes,
            used: Mutex::new(0),
            released: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserve `bytes` if they fit. A request larger than the whole budget is granted when
    /// nothing else is reserved, so that it cannot wait forever.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<WriteReservation> {
        let mut used = self.lock();
        let fits = used.checked_add(bytes).is_some_and(|u| u <= self.max);
        if !fits && *used != 0 {
            return None;
        }
        *used = used.saturating_add(bytes);
        Some(WriteReservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes reserved right now.
    pub fn used(&self) -> u64 {
        *self.lock()
    }

    /// The configured bound.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// A receiver whose `changed()` fires after each release (for waiting connections).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }
}

impl Drop for WriteReservation {
    fn drop(&mut self) {
        {
            let mut used = self.budget.lock();
            *used = used.saturating_sub(self.bytes);
        }
        self.budget.released.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_bounded_and_released_on_drop() {
        let b = WriteBudget::new(100);
        let r1 = b.try_reserve(60).expect("fits");
        assert!(b.try_reserve(50).is_none(), "60 + 50 > 100");
        let r2 = b.try_reserve(40).expect("exactly fills it");
        assert_eq!(b.used(), 100);
        assert!(b.try_reserve(1).is_none());
        let mut rx = b.subscribe();
        drop(r1);
        assert_eq!(b.used(), 40);
        assert!(rx.has_changed().unwrap(), "a release is announced");
        rx.mark_unchanged();
        assert!(b.try_reserve(61).is_none());
        let r3 = b.try_reserve(60).expect("room again");
        drop((r2, r3));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn oversized_request_is_granted_only_alone() {
        let b = WriteBudget::new(100);
        let small = b.try_reserve(1).unwrap();
        assert!(b.try_reserve(500).is_none());
        drop(small);
        let big = b.try_reserve(500).expect("alone");
        assert_eq!(b.used(), 500);
        assert!(b.try_reserve(1).is_none());
        drop(big);
        assert_eq!(b.used(), 0);
    }
}
