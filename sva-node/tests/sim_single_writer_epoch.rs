//! Simulation invariant: at most one epoch accepts writes at any time; a fenced node acknowledges nothing
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, Invariant};

#[test]
fn sim_single_writer_epoch() {
    check(&[Invariant::SingleWriterEpoch], 20);
}
