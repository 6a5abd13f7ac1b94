//! Simulation invariant: the dirty bitmap (with the stale plex's own activity log) covers every region where a Stale plex may differ
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, check_seeds, Invariant};

#[test]
fn sim_dirty_map_covers_divergence() {
    check(&[Invariant::DirtyMapCoversDivergence], 20);
}

/// Pinned 3-way seed. 44401: plex 1, cut off as sequencer with an op applied only by itself,
/// learned from plex 2; as a learner its activity log let that op's region go (the op counted
/// as settled there), and plex 3, which never got plex 1's `JoinRequest`, took over as the
/// only source without the region in its bitmap. The engine now has the driver keep such
/// regions until the plex is back in sync (`Command::KeepInActivityLog`).
#[test]
fn sim_dirty_map_covers_divergence_pinned() {
    check_seeds(&[Invariant::DirtyMapCoversDivergence], &[44401]);
}
