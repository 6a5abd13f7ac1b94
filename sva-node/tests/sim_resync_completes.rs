//! Simulation invariant: once quiescent, resync brought every plex back — stale, crashed
//! (alone or all at once, with torn writes), wiped or fenced plexes are InSync and serving
//! again (the byte-identity of those plexes is `sim_insync_plexes_identical`). Replay a failing
//! seed with `SVA_SIM_SEED=n`, trace it with `SVA_SIM_TRACE=1`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, Invariant};

#[test]
fn sim_resync_completes() {
    check(&[Invariant::ResyncCompletes], 20);
}
