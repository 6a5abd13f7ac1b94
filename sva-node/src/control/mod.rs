//! HTTP control API, Prometheus `/metrics` and `/healthz` (DESIGN.md §7).
//!
//! ```text
//!  iscsi ──> InstrumentedTarget ──> ScsiTarget        Prometheus / kubelet / operator / CLI
//!                 │ record                                        │ HTTP/1.1
//!                 v                                               v
//!           Arc<Metrics> <──────── render ─────────── server (axum on hyper, bounded)
//!                 ^                                               │ status, health, mutations
//!  mirror ── set gauges (epoch, ALUA, resync)          Arc<dyn StatusSource>
//! ```
//!
//! - [`metrics`]: the registry (atomics, no global state) and its text exposition.
//! - [`instrument`]: [`InstrumentedTarget`], the `ScsiTarget` decorator that feeds it.
//! - [`status`]: the [`StatusSource`] trait and [`SingleNodeStatus`].
//! - [`server`]: the endpoints, bearer-token auth for mutations, and [`serve`].

pub mod instrument;
pub mod metrics;
pub mod server;
pub mod status;

pub use instrument::InstrumentedTarget;
pub use metrics::{Metrics, OpClass};
pub use server::{router, serve, ControlState};
pub use status::{
    NodeStatus, PlexStatus, ResyncProgress, SingleNodeStatus, StatusSource, VerifyStatus,
};

/// Errors of the control API, each mapped to an HTTP status by [`ControlError::http_status`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Missing or wrong bearer token (401).
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// The node has no API token configured, so mutations are off (403).
    #[error("mutating endpoints are disabled: this node has no API token configured")]
    MutationsDisabled,
    /// The request is malformed; the text says how (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The node cannot do this now (503), e.g. the mirror engine is not running.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request conflicts with the node's state (409), e.g. a verify already runs or
    /// this node is not the sequencer; the text says which.
    #[error("conflict: {0}")]
    Conflict(String),
    /// No such endpoint (404).
    #[error("not found")]
    NotFound,
    /// The request took longer than the server allows (408).
    #[error("request timed out")]
    Timeout,
}

impl ControlError {
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::Unauthorized => 401,
            ControlError::MutationsDisabled => 403,
            ControlError::BadRequest(_) => 400,
            ControlError::Unavailable(_) => 503,
            ControlError::Conflict(_) => 409,
            ControlError::NotFound => 404,
            ControlError::Timeout => 408,
        }
    }
}
