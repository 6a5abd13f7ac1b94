//! Simulation invariant: once quiescent, resync brought every plex back — stale, crashed
//! (alone or all at once, with torn writes), wiped or fenced plexes are InSync and serving
//! again (the byte-identity of those plexes is `sim_insync_plexes_identical`). Replay a failing
//! seed with `SVA_SIM_SEED=n`, trace it with `SVA_SIM_TRACE=1`; run longer with
//! `SVA_SIM_SEEDS=n` (see `sva_node::mirror`).

use sva_node::mirror::sim::{check, check_configs, check_seeds, Invariant, SimConfig};

#[test]
fn sim_resync_completes() {
    check(&[Invariant::ResyncCompletes], 20);
}

/// Pinned 3-way seeds. 3807: a duplicated `JoinRequest` made the source restart a learner's
/// session while the learner, still in the old one, applied (and acked) the new session's
/// first copies; on the late `JoinAccept` the learner cleared its log and waited forever for
/// copy data the source had already retired (`Engine::rebase_learner` keeps them).
/// 421: a verify read issued while the sequencer held for a CAS finished during the view
/// change and was dropped (`checksummed` only took Active/Holding); the entry stayed Issued
/// and the sequencer's applied prefix, hence every learner, stalled for good.
#[test]
fn sim_resync_completes_pinned() {
    check_seeds(
        &[Invariant::ResyncCompletes, Invariant::Liveness],
        &[3807, 421],
    );
}

/// Pinned seeds with the product's copy window (`engine::COPY_WINDOW`, 16). 11422: a late
/// `JoinRequest` made the source restart a learner's session, the new `JoinAccept` was lost,
/// and the learner asked for seqs of its old session forever; the source now answers such a
/// `Resend` with the accept again (`Engine::on_resend`).
#[test]
fn sim_resync_completes_pinned_product_window() {
    let configs = [11422].map(|seed| SimConfig::from_seed(seed).with_product_copy_window());
    check_configs(&[Invariant::ResyncCompletes, Invariant::Liveness], configs);
}
