//! Simulation invariant: plexes InSync in the same epoch are identical once quiescent, and every op completes
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, check_configs, check_seeds, Invariant, SimConfig};

#[test]
fn sim_insync_plexes_identical() {
    check(&[Invariant::InSyncPlexesIdentical, Invariant::Liveness], 20);
}

/// Pinned 3-way seeds. 4139: a learner got a copy carrying an op only its source had applied;
/// source and learner crashed, the other in-sync node (which never applied the op) recovered
/// as the next source, and nothing reported the region unless copies go in the learner's
/// activity log until they settle (`CopyIn` in `node.rs`, modelled by the sim).
#[test]
fn sim_insync_plexes_identical_pinned() {
    check_seeds(
        &[Invariant::InSyncPlexesIdentical, Invariant::Liveness],
        &[4139],
    );
}

/// Gap 2, wiped plexes whose full resync changes source (`SimConfig::wipe_heavy` seeds; replay
/// with `SVA_SIM_WIPE_HEAVY=1 SVA_SIM_SEED=n`). 549: the wiped learner restarted after its
/// source accepted it and asked the next source (which never saw its full request) for a
/// partial resync — fixed by `Recovered::full_pending`. 775, 294: the other in-sync node
/// recovered as sole source from a bitmap it never filled and resumed the full resync from
/// it — fixed by resuming only from a bitmap it filled (`Recovered::filled`). Each ended with
/// a plex back InSync missing acknowledged writes.
#[test]
fn sim_insync_plexes_identical_wipe_heavy_pinned() {
    check_configs(
        &[Invariant::InSyncPlexesIdentical, Invariant::Liveness],
        [549, 775, 294].map(SimConfig::wipe_heavy),
    );
}
