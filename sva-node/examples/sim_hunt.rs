//! Seed hunt over every simulation invariant at once: `cargo run --release -p sva-node
//! --example sim_hunt -- A B` runs seeds A..B and prints each seed that violates anything
//! (first violation per invariant), then a summary. Replay one with the matching
//! `tests/sim_*.rs` and `SVA_SIM_SEED=n`. `SVA_SIM_WIPE_HEAVY=1`: [`SimConfig::wipe_heavy`].
//! `SVA_SIM_COPY_WINDOW=n`: the engines' resync copy window (default 8, the pinned seeds';
//! the product's is `COPY_WINDOW`).

use std::collections::BTreeMap;

use sva_node::mirror::sim::{Sim, SimConfig};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (a, b) = match args.as_slice() {
        [a, b, ..] => (*a, *b),
        [b] => (0, *b),
        _ => (0, 100),
    };
    let wipe_heavy = std::env::var("SVA_SIM_WIPE_HEAVY").is_ok();
    let mut bad: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for seed in a..b {
        let cfg = if wipe_heavy {
            SimConfig::wipe_heavy(seed)
        } else {
            SimConfig::from_seed(seed)
        };
        let nodes = cfg.nodes;
        let report = Sim::new(cfg).run();
        let mut seen = Vec::new();
        for v in &report.violations {
            let k = format!("{:?}", v.invariant);
            if seen.contains(&k) {
                continue;
            }
            println!(
                "seed {seed} ({nodes}-way): {k} at t={}: {}",
                v.time,
                v.what.chars().take(400).collect::<String>()
            );
            bad.entry(k.clone()).or_default().push(seed);
            seen.push(k);
        }
    }
    println!("seeds {a}..{b}: {} invariant(s) violated", bad.len());
    for (k, seeds) in &bad {
        println!("  {k}: {seeds:?}");
    }
}
