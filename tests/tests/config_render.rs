//! The harness's node config (`render_config`, the one place that writes it) must be accepted
//! by sva-node's own parser and mean what the harness intended.

use std::net::SocketAddr;
use std::path::PathBuf;

use sva_node::config::{CacheMode as NodeCacheMode, Config};
use sva_tests::sva_node::NodePaths;
use sva_tests::{render_config, CacheMode, SvaNodeOptions};

#[test]
fn rendered_config_parses_with_the_nodes_parser() {
    let opts = SvaNodeOptions {
        cache_mode: CacheMode::WriteThrough,
        allowed_initiators: vec!["iqn.2026-01.io.sva.test:init".into()],
        relative_target_port_id: 3,
        target_port_group_id: 4,
        portal_group_tag: 5,
        ..SvaNodeOptions::default()
    };
    let portal: SocketAddr = "127.0.0.1:13260".parse().expect("addr");
    let paths = NodePaths {
        config: PathBuf::from("/tmp/x/node.yaml"),
        store: PathBuf::from("/tmp/x/volume.img"),
        state_dir: PathBuf::from("/tmp/x/state"),
        log: PathBuf::from("/tmp/x/log"),
    };
    let yaml = render_config(&opts, portal, &paths);
    let cfg = Config::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(cfg.volume.uid, opts.volume_uid);
    assert_eq!(cfg.volume.size_bytes, opts.size_bytes);
    assert_eq!(cfg.volume.cache_mode, NodeCacheMode::WriteThrough);
    assert_eq!(cfg.target.iqn, opts.iqn);
    assert_eq!(cfg.portal_addr().expect("portal"), portal);
    assert_eq!(cfg.target.relative_target_port_id, 3);
    assert_eq!(cfg.target.target_port_group_id, 4);
    assert_eq!(cfg.target.portal_group_tag, 5);
    assert_eq!(cfg.target.allowed_initiators, opts.allowed_initiators);
    assert_eq!(cfg.store.path, paths.store);
    assert!(cfg.store.create);
    assert_eq!(cfg.state_dir, paths.state_dir);
}
