//! Simulation invariant: reservation state (barrier ops standing for PR OUT) is identical on every in-sync plex after each ordered op
//! (DESIGN.md §5). Replay a failing seed with `SVA_SIM_SEED=n`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, Invariant};

#[test]
fn sim_reservation_state_identical() {
    check(&[Invariant::ReservationStateIdentical], 20);
}
