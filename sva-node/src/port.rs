//! Picking a free loopback TCP port for a listener that some *other* process binds later
//! (`sva-node demo` writes them into node configs; the test harness passes them on the command
//! line).
//!
//! Binding port 0 and releasing it is not enough: the kernel hands port 0 out of its ephemeral
//! range (`net.ipv4.ip_local_port_range`, 32768–60999 by default), the same range every outgoing
//! connection takes its source port from. Between the release and the node's own bind, a
//! replication link or witness client connecting elsewhere can take that port as its source,
//! and the node then fails with "Address already in use" (CI saw exactly this on 2026-12-06).
//! Ports below the ephemeral range are never handed out implicitly, so only another explicit
//! listener can take one; a bind test catches those.
//!
//! Callers in one process never get the same port twice (a shared counter), and processes
//! start at different places in the range (seeded by pid and clock), so concurrent test
//! binaries or demos rarely even try the same port.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lowest port handed out: above the well-known and most registered service ports.
pub const PICK_PORT_MIN: u16 = 10_000;

/// The Linux default low end of the ephemeral range, used when /proc cannot be read.
const EPHEMERAL_LOW_DEFAULT: u16 = 32_768;

/// Candidates tried before giving up (each is one bind test).
const PICK_ATTEMPTS_MAX: u32 = 2_000;

/// Next candidate offset in this process, or `u32::MAX` before the first pick.
static NEXT_OFFSET: AtomicU32 = AtomicU32::new(u32::MAX);

/// Returns a port on 127.0.0.1 that is outside the ephemeral range and had no listener a moment
/// ago. Falls back to a port-0 bind if the ephemeral range leaves no room below it.
pub fn free_loopback_port() -> io::Result<u16> {
    let low = ephemeral_low();
    if low <= PICK_PORT_MIN + 1_000 {
        // An unusual sysctl left (almost) nothing below the ephemeral range: take the old way.
        return TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()
            .map(|a| a.port());
    }
    let span = u32::from(low - PICK_PORT_MIN);
    let mut last_err = None;
    for _ in 0..PICK_ATTEMPTS_MAX {
        let offset = next_offset(span);
        // `offset < span <= u16::MAX`, so the sum stays below `low`.
        let port = PICK_PORT_MIN + u16::try_from(offset).unwrap_or(0);
        // std sets SO_REUSEADDR, as tokio's listeners do, so a port whose last connection is
        // in TIME_WAIT counts as free here exactly when the node could bind it.
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => return Ok(port),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no free loopback port found")))
}

/// The next offset in `0..span` for this process: a random start, then one step per call.
fn next_offset(span: u32) -> u32 {
    let seed = seed() % span;
    let mut cur = NEXT_OFFSET.load(Ordering::Relaxed);
    loop {
        let this = if cur == u32::MAX { seed } else { cur % span };
        let next = (this + 1) % span;
        match NEXT_OFFSET.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return this,
            Err(seen) => cur = seen,
        }
    }
}

fn seed() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    // Spread neighbouring pids far apart: consecutive test binaries have close pids.
    std::process::id().wrapping_mul(2_654_435_761) ^ nanos
}

/// Low end of the kernel's ephemeral port range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(EPHEMERAL_LOW_DEFAULT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn picks_distinct_ports_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let p = free_loopback_port().expect("a free port");
            assert!(
                p >= PICK_PORT_MIN && p < low,
                "{p} not in {PICK_PORT_MIN}..{low}"
            );
            assert!(seen.insert(p), "port {p} handed out twice");
        }
    }

    #[test]
    fn skips_a_port_with_a_listener() {
        // Occupy the next candidate, then check the pick moves past it.
        let span = u32::from(ephemeral_low() - PICK_PORT_MIN);
        let peek = NEXT_OFFSET.load(Ordering::Relaxed);
        if peek == u32::MAX {
            free_loopback_port().expect("first pick");
        }
        let next =
            PICK_PORT_MIN + u16::try_from(NEXT_OFFSET.load(Ordering::Relaxed) % span).unwrap();
        let Ok(_held) = TcpListener::bind((Ipv4Addr::LOCALHOST, next)) else {
            return; // someone else holds it already, which is the case under test anyway
        };
        let p = free_loopback_port().expect("a free port");
        assert_ne!(p, next, "handed out a port with a live listener");
    }
}
