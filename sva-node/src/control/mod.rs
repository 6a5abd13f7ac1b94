//! HTTP control API, Prometheus `/metrics` and `/healthz` (DESIGN.md §7).
