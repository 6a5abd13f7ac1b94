//! `sva-node` binary: `serve`, `demo`, `witness`.
fn main() {}
