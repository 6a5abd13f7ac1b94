//! Logging setup: `tracing` with `RUST_LOG` (default `info`), JSON-free plain lines so
//! `kubectl logs` reads well.

/// Installs the global subscriber; call once from `main`.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}
