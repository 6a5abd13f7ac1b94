//! Simulation invariant: plexes InSync in the same epoch are identical once quiescent, and every op completes
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, Invariant};

#[test]
fn sim_insync_plexes_identical() {
    check(&[Invariant::InSyncPlexesIdentical, Invariant::Liveness], 20);
}
