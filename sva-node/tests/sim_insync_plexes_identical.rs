//! Simulation invariant: plexes InSync in the same epoch are identical once quiescent, and every op completes
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, check_seeds, Invariant};

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
