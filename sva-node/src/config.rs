//! Node configuration (YAML), as read by `sva-node serve --config FILE`.
