//! SVA operator: reconciles `MirroredVolume` and `Plex` custom resources into sva-node pods
//! (DESIGN.md §8).
//!
//! ```text
//!   crd        MirroredVolume / Plex types, schema rules (crdgen writes crds/)
//!   plan       pure: Observed -> Vec<Step> (placement, node loss, replacement, deletion)
//!   nodeconfig renders each plex's sva-node YAML config (a Secret: it carries CHAP)
//!   node_api   GET /v1/status of an sva-node (the data-plane signal), POST /v1/resync-rate
//!   lease_witness  sva_node::witness::Witness on a coordination.k8s.io Lease
//! ```
pub mod crd;
pub mod lease_witness;
pub mod node_api;
pub mod nodeconfig;
pub mod plan;
pub mod telemetry;

pub mod controller;
#[cfg(test)]
pub mod fixtures;
pub mod metrics;
