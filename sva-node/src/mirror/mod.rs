//! Replication engine (DESIGN.md §5–6).
