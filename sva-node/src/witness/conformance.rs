//! The one conformance suite every [`Witness`] implementation runs (STYLE.md principle 6).
//!
//! It checks the contract written on the trait: unknown → `None`, create-if-absent, a lost CAS
//! answers `Conflict` with the current record and changes nothing, the epoch only moves
//! forward, racing CASes have exactly one winner per epoch, and volumes are independent.
//! Public (not `cfg(test)`) so other crates (the operator's Lease witness) run it too.
//!
//! `make()` must return a new handle (client) on **one shared store** each time it is called;
//! the racing checks call it once per task so the race crosses clients/connections. The store
//! must not hold volumes whose names start with `conformance-` (each check uses its own).

use super::{Membership, PlexRecord, PlexState, Witness, WitnessError};
use std::collections::HashSet;

/// Concurrent CASes in each round of the racing check.
pub const RACERS: usize = 8;
/// Rounds (epochs) of the racing check.
pub const RACE_ROUNDS: u64 = 4;
/// Volumes of the independence check.
pub const VOLUMES: usize = 12;

/// A two-plex record at `epoch` whose content depends on `sequencer`, so records written by
/// different racers differ (the loser's `Conflict` must carry the *winner's* record).
pub fn record(epoch: u64, sequencer: u16) -> Membership {
    let plex = |id: u16, state| PlexRecord {
        id,
        node: format!("node-{id}"),
        portal: format!("127.0.0.{id}:3260"),
        peer_addr: format!("127.0.0.{id}:3261"),
        state,
    };
    Membership {
        epoch,
        plexes: vec![
            plex(1, PlexState::InSync),
            plex(2, PlexState::Stale),
            plex(3, PlexState::Resyncing),
            plex(4, PlexState::Removed),
        ],
        sequencer,
    }
}

/// Runs every check; panics (with the check's name) on the first violation.
pub async fn run_conformance<W: Witness>(make: impl Fn() -> W) {
    get_unknown_is_none(&make()).await;
    create_if_absent_then_conflict(&make()).await;
    cas_wrong_epoch_conflicts_and_changes_nothing(&make()).await;
    cas_right_epoch_installs_record(&make()).await;
    epoch_must_move_forward(&make()).await;
    cas_on_absent_record_with_expected_epoch_fails(&make()).await;
    racing_creates_have_one_winner(&make).await;
    racing_cas_one_winner_per_epoch(&make).await;
    volumes_are_independent(&make()).await;
}

async fn create<W: Witness>(w: &W, volume: &str, rec: Membership) {
    if let Err(e) = w.cas(volume, None, rec).await {
        panic!("create {volume} failed: {e:?}");
    }
}

async fn get<W: Witness>(w: &W, volume: &str) -> Option<Membership> {
    match w.get(volume).await {
        Ok(r) => r,
        Err(e) => panic!("get({volume}) failed: {e:?}"),
    }
}

fn expect_conflict(check: &str, result: Result<Membership, WitnessError>, current: &Membership) {
    match result {
        Err(WitnessError::Conflict(cur)) => {
            assert_eq!(
                *cur, *current,
                "{check}: Conflict must carry the current record"
            )
        }
        other => panic!("{check}: expected Conflict, got {other:?}"),
    }
}

async fn get_unknown_is_none<W: Witness>(w: &W) {
    assert_eq!(
        get(w, "conformance-unknown").await,
        None,
        "get_unknown_is_none"
    );
}

async fn create_if_absent_then_conflict<W: Witness>(w: &W) {
    let v = "conformance-create";
    let got = w.cas(v, None, record(1, 1)).await;
    assert_eq!(
        got.map_err(|e| format!("{e:?}")),
        Ok(record(1, 1)),
        "create_if_absent returns the record"
    );
    assert_eq!(
        get(w, v).await,
        Some(record(1, 1)),
        "created record reads back"
    );
    expect_conflict(
        "second create",
        w.cas(v, None, record(1, 2)).await,
        &record(1, 1),
    );
    expect_conflict(
        "second create, higher epoch",
        w.cas(v, None, record(7, 2)).await,
        &record(1, 1),
    );
    assert_eq!(
        get(w, v).await,
        Some(record(1, 1)),
        "second create changed nothing"
    );
}

async fn cas_wrong_epoch_conflicts_and_changes_nothing<W: Witness>(w: &W) {
    let v = "conformance-wrong-epoch";
    create(w, v, record(3, 1)).await;
    for stale in [0, 1, 2, 4, 100] {
        expect_conflict(
            "cas with wrong epoch",
            w.cas(v, Some(stale), record(stale + 200, 2)).await,
            &record(3, 1),
        );
    }
    assert_eq!(
        get(w, v).await,
        Some(record(3, 1)),
        "lost CAS changed nothing"
    );
}

async fn cas_right_epoch_installs_record<W: Witness>(w: &W) {
    let v = "conformance-right-epoch";
    create(w, v, record(1, 1)).await;
    let got = w.cas(v, Some(1), record(2, 2)).await;
    assert_eq!(
        got.map_err(|e| format!("{e:?}")),
        Ok(record(2, 2)),
        "winning CAS returns the new record"
    );
    assert_eq!(get(w, v).await, Some(record(2, 2)));
    // Epochs may jump (a node that saw several failed attempts).
    let got = w.cas(v, Some(2), record(10, 1)).await;
    assert_eq!(
        got.map_err(|e| format!("{e:?}")),
        Ok(record(10, 1)),
        "epoch may jump forward"
    );
    assert_eq!(get(w, v).await, Some(record(10, 1)));
}

async fn epoch_must_move_forward<W: Witness>(w: &W) {
    let v = "conformance-forward";
    create(w, v, record(5, 1)).await;
    for new_epoch in [5, 4, 0] {
        match w.cas(v, Some(5), record(new_epoch, 2)).await {
            Err(WitnessError::Protocol(_)) => {}
            other => panic!("epoch {new_epoch} after 5: expected Protocol error, got {other:?}"),
        }
    }
    assert_eq!(
        get(w, v).await,
        Some(record(5, 1)),
        "refused CAS changed nothing"
    );
}

async fn cas_on_absent_record_with_expected_epoch_fails<W: Witness>(w: &W) {
    let v = "conformance-absent";
    match w.cas(v, Some(1), record(2, 1)).await {
        Err(WitnessError::Protocol(_)) => {}
        other => panic!("CAS from epoch 1 on an absent record: expected Protocol, got {other:?}"),
    }
    assert_eq!(get(w, v).await, None, "refused CAS created nothing");
}

/// Spawns one CAS per racer (each on its own handle) and returns the index of the single
/// winner, after checking every loser got `Conflict` with the winner's record.
async fn race<W: Witness>(
    make: &impl Fn() -> W,
    v: &'static str,
    expected: Option<u64>,
    epoch: u64,
) -> u16 {
    let tasks: Vec<_> = (0..RACERS)
        .map(|i| {
            let w = make();
            let seq = i as u16 + 1;
            tokio::spawn(async move { (seq, w.cas(v, expected, record(epoch, seq)).await) })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => results.push(r),
            Err(e) => panic!("racer task failed: {e}"),
        }
    }
    let winners: Vec<u16> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "epoch {epoch}: exactly one winner: {results:?}"
    );
    let winner = winners[0];
    for (_, r) in results {
        match r {
            Ok(m) => assert_eq!(m, record(epoch, winner)),
            Err(e) => expect_conflict("racing loser", Err(e), &record(epoch, winner)),
        }
    }
    winner
}

async fn racing_creates_have_one_winner<W: Witness>(make: &impl Fn() -> W) {
    let v = "conformance-race-create";
    let winner = race(make, v, None, 1).await;
    assert_eq!(get(&make(), v).await, Some(record(1, winner)));
}

async fn racing_cas_one_winner_per_epoch<W: Witness>(make: &impl Fn() -> W) {
    let v = "conformance-race-cas";
    create(&make(), v, record(1, 1)).await;
    for epoch in 2..2 + RACE_ROUNDS {
        let winner = race(make, v, Some(epoch - 1), epoch).await;
        assert_eq!(get(&make(), v).await, Some(record(epoch, winner)));
    }
}

async fn volumes_are_independent<W: Witness>(w: &W) {
    let names: Vec<String> = (0..VOLUMES)
        .map(|i| format!("conformance-many-{i}"))
        .collect();
    assert_eq!(names.iter().collect::<HashSet<_>>().len(), VOLUMES);
    for (i, v) in names.iter().enumerate() {
        let e = i as u64 + 1;
        create(w, v, record(e, 1)).await;
    }
    // Advance the even ones; make the odd ones lose a CAS.
    for (i, v) in names.iter().enumerate() {
        let e = i as u64 + 1;
        if i % 2 == 0 {
            assert!(
                w.cas(v, Some(e), record(e + 1, 2)).await.is_ok(),
                "advance {v}"
            );
        } else {
            expect_conflict(
                "independent",
                w.cas(v, Some(e + 1), record(e + 2, 2)).await,
                &record(e, 1),
            );
        }
    }
    for (i, v) in names.iter().enumerate() {
        let e = i as u64 + 1;
        let want = if i % 2 == 0 {
            record(e + 1, 2)
        } else {
            record(e, 1)
        };
        assert_eq!(
            get(w, v).await,
            Some(want),
            "volume {v} kept its own record"
        );
    }
}
