//! Simulation invariant: the dirty bitmap (with the stale plex's own activity log) covers every region where a Stale plex may differ
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, Invariant};

#[test]
fn sim_dirty_map_covers_divergence() {
    check(&[Invariant::DirtyMapCoversDivergence], 20);
}
