//! Simulation invariant: every acknowledged write is on every plex InSync in the current epoch, and a read served after the ack of an overlapping write sees it
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, Invariant};

#[test]
fn sim_acked_writes_on_every_insync_plex() {
    check(
        &[
            Invariant::AckedWritesOnEveryInSyncPlex,
            Invariant::ReadsLinearizable,
        ],
        20,
    );
}
