//! Engine stories: each test feeds a few events and asserts the exact commands emitted.

use bytes::Bytes;

use super::engine::*;
use super::msg::*;
use crate::witness::{Membership, PlexRecord, PlexState, WitnessError};

fn record(epoch: u64, states: &[(u16, PlexState)], sequencer: u16) -> Membership {
    Membership {
        epoch,
        sequencer,
        plexes: states
            .iter()
            .map(|&(id, state)| PlexRecord {
                id,
                node: format!("n{id}"),
                portal: String::new(),
                peer_addr: String::new(),
                state,
            })
            .collect(),
    }
}

fn two_plexes() -> Membership {
    record(1, &[(1, PlexState::InSync), (2, PlexState::InSync)], 1)
}

fn engine(me: u16, m: Membership) -> Engine {
    let mut e = Engine::new(Config::new(me), m, 1_000, Start::Bootstrap);
    assert_eq!(
        drain(&mut e),
        vec![Command::PathState(PathState::ActiveOptimized)]
    );
    e
}

fn drain(e: &mut Engine) -> Vec<Command> {
    std::iter::from_fn(|| e.poll_command()).collect()
}

fn write(lba: u64, blocks: u32) -> OpMeta {
    OpMeta {
        range: OpRange::Blocks(LbaRange { lba, blocks }),
        payload: Bytes::from(format!("write {lba}+{blocks}")),
    }
}

fn hb(epoch: u64, applied_prefix: u64, ts: u64, echo: u64) -> Message {
    Message::Heartbeat {
        epoch,
        applied_prefix,
        seq_high: 0,
        ts,
        echo,
    }
}

/// Plex `me` sends its heartbeat at t=1000 and hears the peer echo it: it holds a lease.
fn with_lease(e: &mut Engine, peer: u16) {
    e.handle_timeout(1_000);
    assert_eq!(
        drain(e),
        vec![Command::Send {
            to: peer,
            msg: hb(1, 0, 1_000, NO_ECHO)
        }]
    );
    assert!(!e.can_serve_reads(1_001), "no lease before the peer echoed");
    e.handle_message(1_005, peer, hb(1, 0, 1_002, 1_000));
    assert_eq!(drain(e), vec![]);
    assert!(e.can_serve_reads(1_005));
}

#[test]
fn sequencer_orders_applies_and_acks_once_every_plex_applied() {
    let mut p1 = engine(1, two_plexes());
    // An initiator writes through plex 1 before any lease: the op waits.
    p1.submit(1_000, OpId(7), write(0, 8));
    assert_eq!(drain(&mut p1), vec![]);
    with_lease_then_expect_order(&mut p1);
    // The local LU applied it: still waiting for plex 2.
    p1.applied(1_010, 1, Bytes::from_static(b"GOOD"));
    assert_eq!(drain(&mut p1), vec![]);
    // Plex 2 applied it: ack with plex 1's own response.
    p1.handle_message(
        1_012,
        2,
        Message::Applied {
            epoch: 1,
            seq: 1,
            applied_prefix: 0,
        },
    );
    assert_eq!(
        drain(&mut p1),
        vec![Command::Complete {
            op: OpId(7),
            outcome: Outcome::Done(Bytes::from_static(b"GOOD"))
        }]
    );
    // Plex 2's heartbeat reports it applied everything up to 1: the activity log may forget.
    p1.handle_message(1_100, 2, hb(1, 1, 1_090, 1_000));
    assert_eq!(drain(&mut p1), vec![Command::Settled { up_to: 1 }]);
}

fn with_lease_then_expect_order(p1: &mut Engine) {
    p1.handle_timeout(1_000);
    assert_eq!(
        drain(p1),
        vec![Command::Send {
            to: 2,
            msg: hb(1, 0, 1_000, NO_ECHO)
        }]
    );
    // The echo grants the lease: the held op is ordered (seq 1), sent to plex 2, applied here.
    p1.handle_message(1_005, 2, hb(1, 0, 1_002, 1_000));
    let entry = Entry {
        seq: 1,
        tag: 1,
        origin: 1,
        fwd: 1,
        meta: write(0, 8),
    };
    assert_eq!(
        drain(p1),
        vec![
            Command::Send {
                to: 2,
                msg: Message::Apply { epoch: 1, entry }
            },
            Command::Apply {
                epoch: 1,
                seq: 1,
                origin: 1,
                op: write(0, 8)
            },
        ]
    );
}

/// A non-sequencer origin submits its first op (at 1_006) and forwards it to plex 1.
fn submit_expect_forward(e: &mut Engine, op: OpId, meta: OpMeta) {
    e.submit(1_006, op, meta.clone());
    assert_eq!(
        drain(e),
        vec![Command::Send {
            to: 1,
            msg: Message::Forward {
                epoch: 1,
                fwd: 1,
                floor: 0,
                meta
            }
        }]
    );
}

/// The sequencer (plex 1) orders that op as seq 1 (at 1_008): `origin` applies it.
fn ordered_expect_apply(e: &mut Engine, origin: PlexId, op: OpMeta) {
    e.handle_message(
        1_008,
        1,
        Message::Ordered {
            epoch: 1,
            seq: 1,
            fwd: 1,
        },
    );
    assert_eq!(
        drain(e),
        vec![Command::Apply {
            epoch: 1,
            seq: 1,
            origin,
            op
        }]
    );
}

#[test]
fn origin_forwards_once_and_acks_after_the_sequencer_applied() {
    let mut p2 = engine(2, two_plexes());
    with_lease(&mut p2, 1);
    submit_expect_forward(&mut p2, OpId(3), write(16, 4));
    // The sequencer answers with the seq only: the payload travelled once.
    ordered_expect_apply(&mut p2, 2, write(16, 4));
    p2.handle_message(
        1_009,
        1,
        Message::Applied {
            epoch: 1,
            seq: 1,
            applied_prefix: 0,
        },
    );
    assert_eq!(drain(&mut p2), vec![]);
    p2.applied(1_010, 1, Bytes::from_static(b"OK"));
    assert_eq!(
        drain(&mut p2),
        vec![Command::Complete {
            op: OpId(3),
            outcome: Outcome::Done(Bytes::from_static(b"OK"))
        }]
    );
}

/// In a 3-way mirror a third plex's ack can overtake the sequencer's `Ordered`: plex 2
/// applies the op the sequencer sent it and acks the origin (plex 3) before plex 3 has
/// heard its seq. The ack still counts once the seq is known, so the op completes at once
/// instead of a heartbeat later (QD1 writes through a non-sequencer path took 7-19 ms on
/// average in a 3-node demo before, 15% of them 50-250 ms).
#[test]
fn an_ack_that_overtakes_the_order_still_counts() {
    let three = record(
        1,
        &[
            (1, PlexState::InSync),
            (2, PlexState::InSync),
            (3, PlexState::InSync),
        ],
        1,
    );
    let mut p3 = engine(3, three);
    p3.handle_timeout(1_000);
    drain(&mut p3);
    for peer in [1, 2] {
        p3.handle_message(1_005, peer, hb(1, 0, 1_002, 1_000));
    }
    drain(&mut p3);
    assert!(p3.can_serve_reads(1_005));
    submit_expect_forward(&mut p3, OpId(9), write(0, 8));
    // Plex 2 applied seq 1 (and everything before it) and says so first.
    let applied = Message::Applied {
        epoch: 1,
        seq: 1,
        applied_prefix: 1,
    };
    p3.handle_message(1_007, 2, applied.clone());
    assert_eq!(drain(&mut p3), vec![]);
    ordered_expect_apply(&mut p3, 3, write(0, 8));
    p3.handle_message(1_009, 1, applied);
    assert_eq!(drain(&mut p3), vec![]);
    p3.applied(1_010, 1, Bytes::from_static(b"OK"));
    assert_eq!(
        drain(&mut p3),
        vec![
            Command::Complete {
                op: OpId(9),
                outcome: Outcome::Done(Bytes::from_static(b"OK"))
            },
            Command::Settled { up_to: 1 }
        ]
    );
}

#[test]
fn overlapping_ops_apply_in_order_and_disjoint_ones_at_once() {
    let mut p1 = engine(1, two_plexes());
    with_lease(&mut p1, 2);
    p1.submit(1_006, OpId(1), write(0, 8));
    p1.submit(1_006, OpId(2), write(4, 8)); // overlaps seq 1
    p1.submit(1_006, OpId(3), write(100, 8)); // disjoint
    let applies: Vec<u64> = drain(&mut p1)
        .into_iter()
        .filter_map(|c| match c {
            Command::Apply { seq, .. } => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(applies, vec![1, 3]);
    p1.applied(1_007, 1, Bytes::new());
    assert_eq!(
        drain(&mut p1),
        vec![Command::Apply {
            epoch: 1,
            seq: 2,
            origin: 1,
            op: write(4, 8)
        }]
    );
}

#[test]
fn a_barrier_waits_for_everything_before_it() {
    let mut p1 = engine(1, two_plexes());
    with_lease(&mut p1, 2);
    p1.submit(1_006, OpId(1), write(0, 1));
    let barrier = OpMeta {
        range: OpRange::Barrier,
        payload: Bytes::from_static(b"PR OUT"),
    };
    p1.submit(1_006, OpId(2), barrier.clone());
    p1.submit(1_006, OpId(3), write(500, 1));
    let applies = |cmds: Vec<Command>| -> Vec<u64> {
        cmds.into_iter()
            .filter_map(|c| match c {
                Command::Apply { seq, .. } => Some(seq),
                _ => None,
            })
            .collect()
    };
    assert_eq!(applies(drain(&mut p1)), vec![1]);
    p1.applied(1_007, 1, Bytes::new());
    assert_eq!(applies(drain(&mut p1)), vec![2]);
    p1.applied(1_008, 2, Bytes::new());
    assert_eq!(applies(drain(&mut p1)), vec![3]);
}

#[test]
fn lost_peer_is_marked_stale_through_the_witness_and_writes_go_dirty() {
    let mut p1 = engine(1, two_plexes());
    with_lease(&mut p1, 2);
    // Plex 2 falls silent. The lease runs out first (no reads), then the peer is suspected.
    assert!(!p1.can_serve_reads(1_005 + READ_LEASE_MS));
    p1.submit(1_600, OpId(9), write(0, 8));
    drain(&mut p1);
    let t = 1_005 + PEER_TIMEOUT_MS;
    p1.handle_timeout(t);
    let cmds = drain(&mut p1);
    let proposed = record(2, &[(1, PlexState::InSync), (2, PlexState::Stale)], 1);
    assert_eq!(
        &cmds[cmds.len() - 2..],
        &[
            Command::PathState(PathState::Transitioning),
            Command::WitnessCas {
                expected_epoch: 1,
                record: proposed.clone()
            }
        ]
    );
    // The CAS won: plex 1 serves alone. The in-flight op (not acked by plex 2) is dirty, and
    // it completes once plex 1 alone applied it.
    p1.witness_result(t + 5, Ok(proposed));
    let cmds = drain(&mut p1);
    assert!(cmds.contains(&Command::MarkDirtyRegions {
        plex: 2,
        regions: vec![0]
    }));
    assert!(cmds.contains(&Command::PathState(PathState::ActiveOptimized)));
    assert_eq!(p1.epoch(), 2);
    p1.applied(t + 6, 1, Bytes::from_static(b"A"));
    let cmds = drain(&mut p1);
    assert!(cmds.contains(&Command::Complete {
        op: OpId(9),
        outcome: Outcome::Done(Bytes::from_static(b"A"))
    }));
    // A new write while plex 2 is stale: marked dirty before it is applied.
    p1.submit(t + 7, OpId(10), write(4096, 1));
    assert_eq!(
        drain(&mut p1),
        vec![
            // 1 MiB regions of 512-byte blocks: block 4096 is in region 2.
            Command::MarkDirtyRegions {
                plex: 2,
                regions: vec![2]
            },
            Command::Apply {
                epoch: 2,
                seq: 2,
                origin: 1,
                op: write(4096, 1)
            },
        ]
    );
    assert!(p1.bitmap(2).is_some_and(|b| b.is_block_dirty(4096)));
}

#[test]
fn a_node_that_loses_the_cas_goes_unavailable_and_fails_held_ops_retryably() {
    let mut p2 = engine(2, two_plexes());
    with_lease(&mut p2, 1);
    let t = 1_005 + PEER_TIMEOUT_MS;
    p2.handle_timeout(t);
    drain(&mut p2);
    p2.submit(t + 1, OpId(5), write(0, 1));
    assert_eq!(drain(&mut p2), vec![], "held, never acked");
    // Plex 1 won the race to the witness and marked plex 2 stale.
    let theirs = record(2, &[(1, PlexState::InSync), (2, PlexState::Stale)], 1);
    p2.witness_result(t + 3, Err(WitnessError::Conflict(Box::new(theirs))));
    assert_eq!(
        drain(&mut p2),
        vec![
            Command::Complete {
                op: OpId(5),
                outcome: Outcome::Retry
            },
            Command::PathState(PathState::Unavailable),
        ]
    );
    assert!(!p2.can_serve_reads(t + 4));
    p2.submit(t + 5, OpId(6), write(0, 1));
    assert_eq!(
        drain(&mut p2),
        vec![Command::Complete {
            op: OpId(6),
            outcome: Outcome::Retry
        }]
    );
}

#[test]
fn a_slow_witness_answer_is_awaited_past_the_hold_timeout() {
    // The witness's disk is slow: the CAS is granted long after the hold timeout. The node
    // must not fence while its own CAS is outstanding, or the volume is left with no server.
    let mut p1 = engine(1, two_plexes());
    with_lease(&mut p1, 2);
    let t = 1_005 + PEER_TIMEOUT_MS;
    p1.handle_timeout(t);
    drain(&mut p1);
    p1.handle_timeout(t + HOLD_TIMEOUT_MS + 500);
    assert_eq!(
        p1.role(),
        RoleKind::Holding,
        "fenced while its CAS was outstanding"
    );
    let granted = record(2, &[(1, PlexState::InSync), (2, PlexState::Stale)], 1);
    p1.witness_result(t + HOLD_TIMEOUT_MS + 600, Ok(granted));
    let cmds = drain(&mut p1);
    assert!(cmds.contains(&Command::PathState(PathState::ActiveOptimized)));
    assert_eq!(p1.epoch(), 2);
}

#[test]
fn a_silent_peer_does_not_keep_the_timer_due() {
    // Regression: once a peer was suspected, its deadline (last heard + PEER_TIMEOUT_MS)
    // stayed in the past and `next_timeout` kept returning it, so the node's timer task spun
    // without yielding and the witness CAS task never ran until the hold timeout fenced it.
    let mut p1 = engine(1, two_plexes());
    with_lease(&mut p1, 2);
    let t = 1_005 + PEER_TIMEOUT_MS;
    assert_eq!(
        p1.next_timeout(),
        Some(1_100),
        "the next heartbeat comes first"
    );
    p1.handle_timeout(1_100);
    drain(&mut p1);
    assert_eq!(p1.next_timeout(), Some(1_200));
    let mut now = 1_200;
    while now < t {
        p1.handle_timeout(now);
        drain(&mut p1);
        now = p1.next_timeout().expect("a timeout while active");
    }
    assert_eq!(now, t, "the suspicion deadline itself is scheduled");
    p1.handle_timeout(t);
    assert!(drain(&mut p1)
        .iter()
        .any(|c| matches!(c, Command::WitnessCas { .. })));
    let next = p1.next_timeout().expect("still holding");
    assert!(
        next > t,
        "next timeout {next} is not after {t}: the timer would spin"
    );
}

#[test]
fn a_node_that_cannot_reach_the_witness_fences() {
    let mut p1 = engine(1, two_plexes());
    with_lease(&mut p1, 2);
    let t = 1_005 + PEER_TIMEOUT_MS;
    p1.handle_timeout(t);
    drain(&mut p1);
    p1.witness_result(t + 1, Err(WitnessError::Unreachable("timeout".into())));
    assert_eq!(
        drain(&mut p1),
        vec![Command::PathState(PathState::Unavailable)]
    );
    assert_eq!(p1.role(), RoleKind::Fenced);
    // A fenced node ignores its peers entirely.
    p1.handle_message(
        t + 2,
        2,
        Message::Applied {
            epoch: 1,
            seq: 1,
            applied_prefix: 0,
        },
    );
    assert_eq!(drain(&mut p1), vec![]);
    assert_eq!(p1.next_timeout(), None);
}

#[test]
fn a_message_from_an_older_epoch_is_refused_and_answered_with_the_new_record() {
    let m = record(3, &[(1, PlexState::InSync), (2, PlexState::InSync)], 1);
    let mut p1 = engine(1, m.clone());
    p1.handle_message(
        1_001,
        2,
        Message::Applied {
            epoch: 2,
            seq: 9,
            applied_prefix: 0,
        },
    );
    assert_eq!(
        drain(&mut p1),
        vec![Command::Send {
            to: 2,
            msg: Message::NewEpoch { membership: m }
        }]
    );
}

#[test]
fn a_restarted_node_stays_out_whatever_the_record_says() {
    let mut e = Engine::new(
        Config::new(2),
        two_plexes(),
        0,
        Start::Restart(Default::default()),
    );
    assert_eq!(
        drain(&mut e),
        vec![Command::PathState(PathState::Unavailable)]
    );
    e.submit(1, OpId(1), write(0, 1));
    assert_eq!(
        drain(&mut e),
        vec![Command::Complete {
            op: OpId(1),
            outcome: Outcome::Retry
        }]
    );
    assert!(!e.can_serve_reads(1));
}

#[test]
fn view_change_reconciles_an_op_only_one_survivor_received() {
    // Three plexes; plex 1 (the sequencer) dies after sending seq 1 to plex 2 only.
    let three = record(
        1,
        &[
            (1, PlexState::InSync),
            (2, PlexState::InSync),
            (3, PlexState::InSync),
        ],
        1,
    );
    let mut p2 = engine(2, three.clone());
    let mut p3 = engine(3, three);
    let entry = Entry {
        seq: 1,
        tag: 1,
        origin: 1,
        fwd: 1,
        meta: write(0, 8),
    };
    p2.handle_message(
        1_001,
        1,
        Message::Apply {
            epoch: 1,
            entry: entry.clone(),
        },
    );
    drain(&mut p2);
    p2.applied(1_002, 1, Bytes::new());
    drain(&mut p2);
    // Both lose plex 1; p2 (lowest survivor) coordinates, p3 keeps hearing p2.
    let t = 1_001 + PEER_TIMEOUT_MS;
    p3.handle_message(t - 1, 2, hb(1, 1, t - 1, NO_ECHO));
    drain(&mut p3);
    p2.handle_message(t - 1, 3, hb(1, 0, t - 1, NO_ECHO));
    drain(&mut p2);
    p2.handle_timeout(t);
    let new = record(
        2,
        &[
            (1, PlexState::Stale),
            (2, PlexState::InSync),
            (3, PlexState::InSync),
        ],
        2,
    );
    assert!(drain(&mut p2).contains(&Command::WitnessCas {
        expected_epoch: 1,
        record: new.clone()
    }));
    p2.witness_result(t + 1, Ok(new.clone()));
    let cmds = drain(&mut p2);
    assert!(cmds.contains(&Command::Send {
        to: 3,
        msg: Message::NewEpoch {
            membership: new.clone()
        }
    }));
    // p3 adopts the epoch and reports its (empty) log.
    p3.handle_message(t + 2, 2, Message::NewEpoch { membership: new });
    let state = drain(&mut p3)
        .into_iter()
        .find_map(|c| match c {
            Command::Send {
                to: 2,
                msg: m @ Message::State { .. },
            } => Some(m),
            _ => None,
        })
        .expect("p3 reports its log to the coordinator");
    p2.handle_message(t + 3, 3, state);
    let cmds = drain(&mut p2);
    let sync = cmds
        .iter()
        .find_map(|c| match c {
            Command::Send {
                to: 3,
                msg: m @ Message::Sync { .. },
            } => Some(m.clone()),
            _ => None,
        })
        .expect("coordinator sends the reconciled log");
    assert_eq!(
        sync,
        Message::Sync {
            epoch: 2,
            base: 0,
            high: 1,
            entries: vec![entry]
        }
    );
    // The coordinator marked it dirty when it entered the epoch (plex 1 never acked it).
    assert!(p2
        .bitmap(1)
        .is_some_and(|b| b.covers(&LbaRange { lba: 0, blocks: 8 })));
    // p3 applies the op it never received before serving epoch 2.
    p3.handle_message(t + 4, 2, sync);
    let cmds = drain(&mut p3);
    assert!(cmds.contains(&Command::MarkDirtyRegions {
        plex: 1,
        regions: vec![0]
    }));
    assert!(cmds.contains(&Command::Apply {
        epoch: 2,
        seq: 1,
        origin: 1,
        op: write(0, 8)
    }));
    assert_eq!(p3.role(), RoleKind::Active);
}

// ----- resync -----

use super::resync::{CopyWhat, Recovered, ResyncRole};
use std::collections::{BTreeMap, BTreeSet};

/// 8-block regions on a 64-block volume: 8 regions.
fn small_cfg(me: u16) -> Config {
    Config {
        me,
        block_size: 512,
        region_bytes: 4096,
        volume_blocks: 64,
        // The stories below were told with 8 copies in flight over 8 regions.
        copy_window: 8,
    }
}

/// Two engines wired by hand: every command is executed at once (applies succeed, copies
/// read `data_of(region)`, the witness grants every CAS) and every message is delivered, in
/// order, until both are quiet. Returns each node's commands (sends included).
struct Pair {
    e: [Engine; 2],
    now: Millis,
    witness: Membership,
    log: [Vec<Command>; 2],
}

impl Pair {
    fn idx(id: u16) -> usize {
        usize::from(id - 1)
    }

    fn exec(&mut self, i: usize, cmds: Vec<Command>) {
        for c in cmds {
            self.exec_one(i, c);
        }
    }

    fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            for i in 0..2 {
                while let Some(c) = self.e[i].poll_command() {
                    self.exec_one(i, c);
                }
            }
            self.now += 1;
            for i in 0..2 {
                if self.e[i].next_timeout().is_some_and(|t| t <= self.now) {
                    self.e[i].handle_timeout(self.now);
                }
            }
        }
    }

    fn exec_one(&mut self, i: usize, c: Command) {
        self.log[i].push(c.clone());
        let now = self.now;
        match c {
            Command::Send { to, msg } => {
                let from = self.e[i].me();
                self.e[Self::idx(to)].handle_message(now, from, msg);
            }
            Command::Apply { seq, .. } => self.e[i].applied(now, seq, Bytes::from_static(b"ok")),
            Command::CopyOut { seq, what } => {
                let data = match what {
                    CopyWhat::Region { index, .. } => Bytes::from(format!("region {index}")),
                    CopyWhat::LuState => Bytes::from_static(b"pr"),
                };
                self.e[i].copied_out(now, seq, data);
            }
            Command::CopyIn { seq, .. } => self.e[i].applied(now, seq, Bytes::new()),
            Command::WitnessCas {
                expected_epoch,
                record,
            } => {
                let r = if self.witness.epoch == expected_epoch {
                    self.witness = record.clone();
                    Ok(record)
                } else {
                    Err(WitnessError::Conflict(Box::new(self.witness.clone())))
                };
                self.e[i].witness_result(now, r);
            }
            _ => {}
        }
    }
}

fn stale_two(epoch: u64) -> Membership {
    record(epoch, &[(1, PlexState::InSync), (2, PlexState::Stale)], 1)
}

/// Plex 1 serves alone in epoch 2 after plex 2 fell silent with write 0+8 unacked: its bitmap
/// for plex 2 holds region 0.
fn survivor_with_dirty_region_0() -> (Engine, Millis) {
    let mut p1 = Engine::new(small_cfg(1), two_plexes(), 1_000, Start::Bootstrap);
    drain(&mut p1);
    with_lease(&mut p1, 2);
    p1.submit(1_006, OpId(1), write(0, 8));
    drain(&mut p1);
    let t = 1_005 + PEER_TIMEOUT_MS;
    p1.handle_timeout(t);
    drain(&mut p1);
    p1.witness_result(t + 1, Ok(stale_two(2)));
    let cmds = drain(&mut p1);
    assert!(cmds.contains(&Command::MarkDirtyRegions {
        plex: 2,
        regions: vec![0]
    }));
    p1.applied(t + 2, 1, Bytes::from_static(b"ok"));
    drain(&mut p1);
    (p1, t + 3)
}

/// Plex 2 restarted with valid data, no bitmaps, and `activity_log` recovered, in the epoch
/// where plex 1 serves alone.
fn restarted_plex_2(t: Millis, activity_log: &[u64]) -> Engine {
    let recovered = Recovered {
        activity_log: activity_log.iter().copied().collect(),
        bitmaps: BTreeMap::new(),
        data_valid: true,
        full_pending: false,
        filled: BTreeSet::new(),
    };
    Engine::new(small_cfg(2), stale_two(2), t, Start::Restart(recovered))
}

#[test]
fn a_restarted_plex_joins_as_learner_gets_its_dirty_regions_copied_and_rejoins_in_sync() {
    let (mut p1, t) = survivor_with_dirty_region_0();
    // Plex 2 restarts; its activity log says it may differ in region 3.
    let mut p2 = restarted_plex_2(t, &[3]);
    assert_eq!(
        drain(&mut p2),
        vec![Command::PathState(PathState::Unavailable)]
    );
    assert_eq!(p2.role(), RoleKind::Out);
    p2.handle_timeout(t);
    let join = Message::JoinRequest {
        epoch: 2,
        activity_log: vec![3],
        full: false,
        fresh: false,
    };
    assert_eq!(
        drain(&mut p2),
        vec![Command::Send {
            to: 1,
            msg: join.clone()
        }]
    );
    // The source persists the learner's activity-log region, accepts it from seq 2 on and
    // orders the LU-state copy first (a barrier), then one copy per dirty region.
    p1.handle_message(t + 1, 2, join);
    let cmds = drain(&mut p1);
    assert_eq!(
        cmds[0],
        Command::MarkDirtyRegions {
            plex: 2,
            regions: vec![3]
        }
    );
    assert_eq!(
        cmds[1],
        Command::Send {
            to: 2,
            msg: Message::JoinAccept {
                membership: stale_two(2),
                start_seq: 2,
                dirty_regions: 2
            }
        }
    );
    assert!(cmds.contains(&Command::CopyOut {
        seq: 2,
        what: CopyWhat::LuState
    }));
    let region_copies: Vec<u64> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Send {
                to: 2,
                msg: Message::Apply { entry, .. },
            } if entry.seq > 2 => match entry.meta.range {
                OpRange::Blocks(r) => Some(r.lba / 8),
                OpRange::Barrier => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(region_copies, vec![0, 3], "ascending, dirty regions only");
    let status = p1.resync_status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].0, ResyncRole::Source);
    assert_eq!(status[0].1.total_bytes, 2 * 4096);
    // Wire them up and let the copies, the rejoin CAS and the view change run.
    let mut pair = Pair {
        e: [p1, p2],
        now: t + 2,
        witness: stale_two(2),
        log: [Vec::new(), Vec::new()],
    };
    pair.exec(0, cmds);
    pair.run(400);
    let [p1, p2] = &pair.e;
    assert_eq!(p2.role(), RoleKind::Active, "back in sync");
    assert_eq!(p1.role(), RoleKind::Active);
    assert_eq!(p1.epoch(), 3);
    assert_eq!(p2.epoch(), 3);
    assert_eq!(
        pair.witness,
        record(3, &[(1, PlexState::InSync), (2, PlexState::InSync)], 1)
    );
    // The learner wrote exactly the LU state and the two dirty regions, as the source read
    // them, and the source cleared and then dropped its bitmap.
    let copy_ins: Vec<(CopyWhat, Bytes)> = pair.log[1]
        .iter()
        .filter_map(|c| match c {
            Command::CopyIn { what, data, .. } => Some((*what, data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(copy_ins.len(), 3);
    assert_eq!(copy_ins[0], (CopyWhat::LuState, Bytes::from_static(b"pr")));
    assert_eq!(copy_ins[1].1, Bytes::from_static(b"region 0"));
    assert_eq!(copy_ins[2].1, Bytes::from_static(b"region 3"));
    assert!(pair.log[0].contains(&Command::ClearDirtyRegions {
        plex: 2,
        regions: vec![0]
    }));
    assert!(pair.log[0].contains(&Command::DropBitmap { plex: 2 }));
    assert!(p1.bitmap(2).is_none());
    assert!(pair.log[1].contains(&Command::ActivityLogAbsorbed));
    assert!(pair.log[1].contains(&Command::PathState(PathState::ActiveOptimized)));
    // A write through the returned plex now needs both plexes again.
    assert!(p1.resync_status().is_empty());
}

#[test]
fn writes_during_the_copy_reach_the_learner_in_order_after_the_copy_of_their_region() {
    let (p1, t) = survivor_with_dirty_region_0();
    let mut p2 = Engine::new(
        small_cfg(2),
        stale_two(2),
        t,
        Start::Restart(Recovered {
            data_valid: true,
            ..Recovered::default()
        }),
    );
    drain(&mut p2);
    let mut pair = Pair {
        e: [p1, p2],
        now: t,
        witness: stale_two(2),
        log: [Vec::new(), Vec::new()],
    };
    pair.e[1].handle_timeout(t);
    // Deliver the request, then write region 0 on the source before anything else runs.
    pair.run(1);
    pair.e[0].submit(pair.now, OpId(2), write(2, 2));
    pair.run(400);
    assert_eq!(pair.e[1].role(), RoleKind::Active);
    let l = &pair.log[1];
    let copy = l
        .iter()
        .position(|c| {
            matches!(
                c,
                Command::CopyIn {
                    what: CopyWhat::Region { index: 0, .. },
                    ..
                }
            )
        })
        .expect("region 0 copied");
    let write_at = l
        .iter()
        .position(|c| matches!(c, Command::Apply { op, .. } if *op == write(2, 2)))
        .expect("the learner applied the write");
    assert!(copy < write_at, "the write was ordered after the copy");
    assert!(pair.log[0].contains(&Command::Complete {
        op: OpId(2),
        outcome: Outcome::Done(Bytes::from_static(b"ok"))
    }));
}

#[test]
fn a_silent_learner_is_dropped_and_ops_it_may_have_missed_are_marked_dirty() {
    let (mut p1, t) = survivor_with_dirty_region_0();
    p1.handle_message(
        t,
        2,
        Message::JoinRequest {
            epoch: 2,
            activity_log: vec![],
            full: false,
            fresh: false,
        },
    );
    drain(&mut p1);
    // A write to region 5 is ordered for the learner, which never answers.
    p1.submit(t + 1, OpId(3), write(40, 1));
    let cmds = drain(&mut p1);
    assert!(
        !cmds
            .iter()
            .any(|c| matches!(c, Command::MarkDirtyRegions { .. })),
        "a learner gets the write itself: not dirty"
    );
    let mut now = t + 1;
    let mut marked = Vec::new();
    while now < t + 2 * PEER_TIMEOUT_MS {
        now += 50;
        p1.handle_timeout(now);
        for c in drain(&mut p1) {
            assert!(
                !matches!(c, Command::WitnessCas { .. }),
                "no CAS for a learner"
            );
            if let Command::MarkDirtyRegions { plex: 2, regions } = c {
                marked.extend(regions);
            }
        }
    }
    assert!(
        marked.contains(&5),
        "unsettled op of the dropped learner: {marked:?}"
    );
    assert_eq!(p1.role(), RoleKind::Active);
    assert!(p1.bitmap(2).is_some_and(|b| b.contains(0) && b.contains(5)));
}

#[test]
fn the_only_in_sync_plex_restarts_as_source_with_persisted_bitmaps_and_its_activity_log() {
    let recovered = Recovered {
        activity_log: BTreeSet::from([1]),
        bitmaps: BTreeMap::from([(2, BTreeSet::from([4]))]),
        data_valid: true,
        full_pending: false,
        filled: BTreeSet::new(),
    };
    let mut p1 = Engine::new(small_cfg(1), stale_two(2), 0, Start::Restart(recovered));
    drain(&mut p1);
    assert_eq!(p1.role(), RoleKind::Recovering);
    p1.handle_timeout(0);
    let cmds = drain(&mut p1);
    let proposed = record(3, &[(1, PlexState::InSync), (2, PlexState::Stale)], 1);
    assert!(cmds.contains(&Command::WitnessCas {
        expected_epoch: 2,
        record: proposed.clone()
    }));
    p1.witness_result(5, Ok(proposed));
    assert_eq!(
        drain(&mut p1),
        vec![
            Command::MarkDirtyRegions {
                plex: 2,
                regions: vec![1, 4]
            },
            Command::ActivityLogAbsorbed,
            Command::PathState(PathState::ActiveOptimized),
        ]
    );
    assert_eq!(p1.role(), RoleKind::Active);
}

#[test]
fn after_every_node_crashed_a_restarted_plex_waits_while_a_peer_serves_then_recovers() {
    let recovered = Recovered {
        activity_log: BTreeSet::from([6]),
        bitmaps: BTreeMap::new(),
        data_valid: true,
        full_pending: false,
        filled: BTreeSet::new(),
    };
    let mut p2 = Engine::new(small_cfg(2), two_plexes(), 0, Start::Restart(recovered));
    drain(&mut p2);
    assert_eq!(p2.role(), RoleKind::Recovering);
    // A heartbeat from plex 1 (still serving epoch 1) at t=3000 restarts the wait.
    p2.handle_message(3_000, 1, hb(1, 0, 2_990, NO_ECHO));
    let mut now = 0;
    let mut cas_at = None;
    while now < 3_000 + RECOVER_WAIT_MS + 10 {
        now = p2
            .next_timeout()
            .expect("a recovering node keeps a timer")
            .max(now + 1);
        p2.handle_timeout(now);
        if drain(&mut p2)
            .iter()
            .any(|c| matches!(c, Command::WitnessCas { .. }))
        {
            cas_at = Some(now);
            break;
        }
    }
    assert_eq!(cas_at, Some(3_000 + RECOVER_WAIT_MS));
    // Plex 1 recovered first: the lost CAS makes plex 2 a stale plex asking to be resynced.
    let theirs = record(2, &[(1, PlexState::InSync), (2, PlexState::Stale)], 1);
    p2.witness_result(now + 1, Err(WitnessError::Conflict(Box::new(theirs))));
    assert_eq!(p2.role(), RoleKind::Out);
    p2.handle_timeout(now + 1);
    assert_eq!(
        drain(&mut p2),
        vec![Command::Send {
            to: 1,
            msg: Message::JoinRequest {
                epoch: 2,
                activity_log: vec![6],
                full: false,
                fresh: false,
            }
        }]
    );
}

#[test]
fn a_wiped_plex_gets_a_full_resync_and_the_throttle_paces_copies() {
    let (mut p1, t) = survivor_with_dirty_region_0();
    p1.set_resync_rate(8192); // two regions per second
    p1.handle_message(
        t,
        2,
        Message::JoinRequest {
            epoch: 2,
            activity_log: vec![],
            full: true,
            fresh: true,
        },
    );
    let cmds = drain(&mut p1);
    assert!(cmds.contains(&Command::MarkDirtyRegions {
        plex: 2,
        regions: vec![1, 2, 3, 4, 5, 6, 7]
    }));
    let copies = |cmds: &[Command]| {
        cmds.iter()
            .filter(|c| matches!(c, Command::Send { to: 2, msg: Message::Apply { entry, .. } } if matches!(entry.meta.range, OpRange::Blocks(_))))
            .count()
    };
    assert_eq!(copies(&cmds), 1, "the bucket holds one region: {cmds:?}");
    let next = p1.next_timeout().expect("timer");
    assert!(
        next > t && next <= t + 501,
        "the throttle's next token is scheduled: {next}"
    );
    p1.handle_timeout(t + 200);
    assert_eq!(copies(&drain(&mut p1)), 0, "no token yet");
    p1.handle_timeout(t + 501);
    assert_eq!(copies(&drain(&mut p1)), 1);
    let s = p1.resync_status();
    assert!(s[0].1.full);
    assert_eq!(s[0].1.total_bytes, 8 * 4096);
}

#[test]
fn online_verify_compares_checksums_of_every_region() {
    verify_with_region_3_differing(false);
}

/// Runs a verify of the 8 regions of `small_cfg` on plex 1, with plex 2's checksum of region
/// 3 differing; returns plex 1 and every command emitted after the last checksum.
fn verify_with_region_3_differing(repair: bool) -> (Engine, Vec<Command>) {
    let mut p1 = Engine::new(small_cfg(1), two_plexes(), 1_000, Start::Bootstrap);
    drain(&mut p1);
    with_lease(&mut p1, 2);
    assert!(p1.start_verify(1_006, repair).is_ok());
    assert!(p1.start_verify(1_006, repair).is_err(), "one at a time");
    let cmds = drain(&mut p1);
    let sums: Vec<(Seq, u64)> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Checksum { seq, region, .. } => Some((*seq, *region)),
            _ => None,
        })
        .collect();
    assert_eq!(sums.len(), 8);
    let mut last = Vec::new();
    for (seq, region) in &sums {
        p1.checksummed(1_007, *seq, [*region as u8; 32]);
        // Plex 2 differs in region 3.
        let theirs = if *region == 3 {
            [0xff; 32]
        } else {
            [*region as u8; 32]
        };
        p1.handle_message(
            1_008,
            2,
            Message::ChecksumIs {
                epoch: 1,
                seq: *seq,
                checksum: theirs,
            },
        );
        last = drain(&mut p1);
    }
    let v = p1.verify_status();
    assert_eq!(v.regions_total, 8);
    assert_eq!(v.regions_done, 8);
    assert_eq!(v.mismatched, vec![3]);
    assert!(!v.running);
    (p1, last)
}

#[test]
fn verify_with_repair_resyncs_only_the_mismatched_regions_of_the_differing_plex() {
    let (mut p1, cmds) = verify_with_region_3_differing(true);
    // Region 3 durably in plex 2's bitmap first, then the CAS that makes plex 2 stale.
    let mark = cmds
        .iter()
        .position(|c| {
            *c == Command::MarkDirtyRegions {
                plex: 2,
                regions: vec![3],
            }
        })
        .expect("region 3 marked for plex 2");
    let (cas, record) = cmds
        .iter()
        .enumerate()
        .find_map(|(i, c)| match c {
            Command::WitnessCas {
                expected_epoch: 1,
                record,
            } => Some((i, record.clone())),
            _ => None,
        })
        .expect("a CAS from epoch 1");
    assert!(
        mark < cas,
        "the bitmap must be durable before the plex is excluded"
    );
    assert_eq!(record.epoch, 2);
    assert_eq!(record.sequencer, 1);
    let state = |id| record.plexes.iter().find(|p| p.id == id).map(|p| p.state);
    assert_eq!(state(1), Some(PlexState::InSync));
    assert_eq!(state(2), Some(PlexState::Stale));
    assert!(cmds.contains(&Command::PathState(PathState::Transitioning)));
    // Granted: plex 1 serves alone and keeps exactly region 3 to copy to plex 2.
    p1.witness_result(1_020, Ok(record));
    drain(&mut p1);
    let bm = p1.bitmap(2).expect("a bitmap for plex 2");
    assert_eq!(bm.regions().collect::<Vec<_>>(), vec![3]);
    assert_eq!(p1.epoch(), 2);
}

#[test]
fn verify_without_repair_changes_no_membership() {
    let (p1, cmds) = verify_with_region_3_differing(false);
    assert!(
        !cmds.iter().any(|c| matches!(
            c,
            Command::WitnessCas { .. } | Command::MarkDirtyRegions { .. }
        )),
        "{cmds:?}"
    );
    assert_eq!(p1.epoch(), 1);
}

#[test]
fn an_interrupted_full_resync_resumes_instead_of_starting_over() {
    let (mut p1, t) = survivor_with_dirty_region_0();
    let full = Message::JoinRequest {
        epoch: 2,
        activity_log: vec![],
        full: true,
        fresh: true,
    };
    p1.handle_message(t, 2, full.clone());
    let cmds = drain(&mut p1);
    assert_eq!(p1.bitmap(2).map(|b| b.len()), Some(8));
    // The source reads every copy in the window; the learner applies them all.
    let mut copied: Vec<Seq> = Vec::new();
    let mut cmds = cmds;
    while !cmds.is_empty() {
        for c in cmds {
            match c {
                Command::CopyOut { seq, what } => {
                    p1.copied_out(t + 1, seq, Bytes::from(format!("{what:?}")))
                }
                Command::Send {
                    to: 2,
                    msg: Message::CopyData { seq, .. },
                } => copied.push(seq),
                _ => {}
            }
        }
        cmds = drain(&mut p1);
    }
    for seq in &copied {
        p1.handle_message(
            t + 2,
            2,
            Message::Applied {
                epoch: 2,
                seq: *seq,
                applied_prefix: 0,
            },
        );
    }
    drain(&mut p1);
    let left = p1.bitmap(2).map_or(0, |b| b.len());
    assert!(left < 8, "copies were acked: {left} regions left");
    // The learner restarts. The driver wrote its marker once it was accepted, so it asks
    // for a partial resync: the source's bitmap says what is left.
    p1.handle_message(
        t + 3,
        2,
        Message::JoinRequest {
            epoch: 2,
            activity_log: vec![],
            full: false,
            fresh: false,
        },
    );
    let cmds = drain(&mut p1);
    assert!(cmds.iter().any(|c| matches!(
        c,
        Command::Send {
            to: 2,
            msg: Message::JoinAccept { .. }
        }
    )));
    assert_eq!(
        p1.bitmap(2).map_or(0, |b| b.len()),
        left,
        "resumed with what is left, not refilled"
    );
}

/// Deliver every command of both engines (messages to the other, applies at once) until
/// neither emits anything; no timer runs. Returns the completed op ids.
fn pump_pair(p1: &mut Engine, p2: &mut Engine, now: Millis) -> Vec<OpId> {
    let mut done = Vec::new();
    loop {
        let mut quiet = true;
        for (me, other_id) in [(1u16, 2u16), (2, 1)] {
            let (e, other) = if me == 1 {
                (&mut *p1, &mut *p2)
            } else {
                (&mut *p2, &mut *p1)
            };
            for c in drain(e) {
                quiet = false;
                match c {
                    Command::Send { to, msg } => {
                        assert_eq!(to, other_id);
                        other.handle_message(now, me, msg);
                    }
                    Command::Apply { seq, .. } => e.applied(now, seq, Bytes::new()),
                    Command::Complete { op, outcome } => {
                        assert_eq!(outcome, Outcome::Done(Bytes::new()));
                        done.push(op);
                    }
                    _ => {}
                }
            }
        }
        if quiet {
            return done;
        }
    }
}

/// Ops from the plex that is not the sequencer: the sequencer gets no `Applied` for them, and
/// before `Progress` it learned the origin applied them only from heartbeats, so its log filled
/// up (`LOG_ENTRIES_MAX`) and writes stalled until the next one (about 10k ops/s at most).
#[test]
fn logs_settle_between_heartbeats_whichever_plex_originates() {
    let mut p1 = engine(1, two_plexes());
    let mut p2 = engine(2, two_plexes());
    for (e, peer) in [(&mut p1, 2), (&mut p2, 1)] {
        with_lease(e, peer);
    }
    let ops = 3 * LOG_ENTRIES_MAX as u64;
    // QD1 through plex 2 only, then through plex 1 only, all within one lease (no timer runs).
    for i in 0..2 * ops {
        let through_p2 = i < ops;
        let origin = if through_p2 { &mut p2 } else { &mut p1 };
        origin.submit(1_010, OpId(i), write(i % 64, 1));
        let done = pump_pair(&mut p1, &mut p2, 1_010);
        assert_eq!(done, vec![OpId(i)], "op {i} did not complete");
    }
    for e in [&p1, &p2] {
        assert!(
            e.unsettled_ops() <= 2 * PROGRESS_STEP as usize,
            "plex {}: {} ops unsettled after {ops} ops",
            e.me(),
            e.unsettled_ops()
        );
    }
}

/// A restarted plex's first `JoinRequest`, and the source's answer with its first copies, go
/// out before the links between them are up and are dropped. The links coming up must send
/// them again at once: before, the resync waited for two retransmission timers (issue 4, about
/// 0.2 s of every full resync's ~1 s).
#[test]
fn links_coming_up_resend_the_join_the_accept_and_the_copies_at_once() {
    let (mut p1, t) = survivor_with_dirty_region_0();
    let mut p2 = restarted_plex_2(t, &[3]);
    drain(&mut p2);
    p2.handle_timeout(t);
    let first = drain(&mut p2);
    assert!(
        matches!(
            first.as_slice(),
            [Command::Send {
                to: 1,
                msg: Message::JoinRequest { .. }
            }]
        ),
        "{first:?}"
    );
    // Dropped: p2's link to p1 is not up yet. It comes up well before the next retry.
    assert!(p2.next_timeout().is_some_and(|n| n >= t + RETRANSMIT_MS));
    p2.link_up(t + 5, 1);
    let again = drain(&mut p2);
    assert_eq!(
        again, first,
        "the join goes out again when the link comes up"
    );

    // p1 accepts and reads the copies, but its link to p2 is still down: every send is lost.
    let Command::Send { msg: join, .. } = again[0].clone() else {
        unreachable!()
    };
    p1.handle_message(t + 6, 2, join);
    let mut lost = Vec::new();
    let mut reads = 0;
    while let Some(c) = p1.poll_command() {
        match c {
            Command::CopyOut { seq, what } => {
                reads += 1;
                let data = match what {
                    CopyWhat::Region { index, .. } => Bytes::from(format!("region {index}")),
                    CopyWhat::LuState => Bytes::from_static(b"pr"),
                };
                p1.copied_out(t + 7, seq, data);
            }
            Command::Send { to: 2, msg } => lost.push(msg),
            _ => {}
        }
    }
    assert_eq!(reads, 3, "the LU state and regions 0 and 3 were read");
    assert!(lost.iter().any(|m| matches!(m, Message::CopyData { .. })));

    // p1's link to p2 comes up: everything p2 needs goes out again, without a timer.
    p1.link_up(t + 8, 2);
    let resent: Vec<Message> = drain(&mut p1)
        .into_iter()
        .filter_map(|c| match c {
            Command::Send { to: 2, msg } => Some(msg),
            _ => None,
        })
        .collect();
    assert!(matches!(
        resent.first(),
        Some(Message::JoinAccept { start_seq: 2, .. })
    ));
    for m in resent {
        p2.handle_message(t + 9, 1, m);
    }
    // The learner writes each copy as it becomes ready (the LU state is a barrier): no
    // timer runs, so everything it writes came with the link-up resend.
    let mut copy_ins = Vec::new();
    while let Some(c) = p2.poll_command() {
        if let Command::CopyIn { seq, what, .. } = c {
            copy_ins.push(what);
            p2.applied(t + 10, seq, Bytes::new());
        }
    }
    assert_eq!(
        copy_ins.len(),
        3,
        "every copy reached the learner: {copy_ins:?}"
    );
    assert_eq!(copy_ins[0], CopyWhat::LuState);
}

/// At a rejoin the source holds new ops and waits for the learner to report that it applied
/// everything ordered. A learner reports ops (not copies) only every `PROGRESS_STEP` or in
/// its heartbeat, so the source asks with a heartbeat of its own, and the learner answers as
/// soon as it applied up to that heartbeat's `seq_high` — not at its next heartbeat, up to
/// `HEARTBEAT_INTERVAL_MS` later (about a tenth of a 1 GiB full resync, issue 4).
#[test]
fn a_learner_reports_its_prefix_once_it_applied_what_the_source_heartbeat_names() {
    let (_, t) = survivor_with_dirty_region_0();
    let mut p2 = restarted_plex_2(t, &[]);
    drain(&mut p2);
    let accept = Message::JoinAccept {
        membership: stale_two(2),
        start_seq: 2,
        dirty_regions: 0,
    };
    p2.handle_message(t, 1, accept);
    assert_eq!(p2.role(), RoleKind::Learning);
    drain(&mut p2);
    // A foreground write ordered at seq 2 reaches the learner; the source's heartbeat names
    // it as its highest seq before the learner applied it.
    let entry = Entry {
        seq: 2,
        tag: 2,
        origin: 1,
        fwd: 1,
        meta: write(16, 8),
    };
    p2.handle_message(t + 1, 1, Message::Apply { epoch: 2, entry });
    let cmds = drain(&mut p2);
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::Apply { seq: 2, .. })),
        "{cmds:?}"
    );
    p2.handle_message(
        t + 2,
        1,
        Message::Heartbeat {
            epoch: 2,
            applied_prefix: 1,
            seq_high: 2,
            ts: t + 2,
            echo: NO_ECHO,
        },
    );
    let before = drain(&mut p2);
    assert!(
        !before.iter().any(|c| matches!(
            c,
            Command::Send {
                msg: Message::Progress { .. },
                ..
            }
        )),
        "nothing to report before the write is applied: {before:?}"
    );
    p2.applied(t + 3, 2, Bytes::new());
    assert_eq!(
        drain(&mut p2),
        vec![Command::Send {
            to: 1,
            msg: Message::Progress {
                epoch: 2,
                applied_prefix: 2
            }
        }],
        "applied up to the heartbeat's seq_high: reported at once"
    );
}
