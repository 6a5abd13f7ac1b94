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

#[test]
fn rendered_mirror_config_parses_with_the_nodes_parser() {
    use sva_tests::{MirrorOptions, MirrorPlex};
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    let plexes = vec![
        MirrorPlex {
            id: 1,
            node: "node-1".into(),
            portal: addr("127.0.0.1:13261"),
            peer_addr: addr("127.0.0.1:14001"),
        },
        MirrorPlex {
            id: 2,
            node: "node-2".into(),
            portal: addr("10.200.0.2:13262"),
            peer_addr: addr("10.200.0.2:14002"),
        },
    ];
    let opts = SvaNodeOptions {
        relative_target_port_id: 2,
        target_port_group_id: 2,
        portal_group_tag: 2,
        control: Some(addr("10.200.0.2:19100")),
        control_token_file: Some(PathBuf::from("/tmp/x/control-token")),
        mirror: Some(MirrorOptions {
            listen: addr("10.200.0.2:14002"),
            secret_file: PathBuf::from("/tmp/x/replication-secret"),
            plexes: plexes.clone(),
            witness: addr("10.200.0.1:14000"),
            witness_secret_file: PathBuf::from("/tmp/x/witness-secret"),
            tuning: Default::default(),
        }),
        ..SvaNodeOptions::default()
    };
    let portal = addr("10.200.0.2:13262");
    let paths = NodePaths {
        config: PathBuf::from("/tmp/x/node.yaml"),
        store: PathBuf::from("/tmp/x/volume.img"),
        state_dir: PathBuf::from("/tmp/x/state"),
        log: PathBuf::from("/tmp/x/log"),
    };
    let yaml = render_config(&opts, portal, &paths);
    let cfg = Config::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(
        cfg.control.as_ref().map(|c| c.listen.as_str()),
        Some("10.200.0.2:19100")
    );
    assert_eq!(
        cfg.control.as_ref().and_then(|c| c.token_file.clone()),
        Some(PathBuf::from("/tmp/x/control-token"))
    );
    let m = cfg.mirror.expect("mirror section");
    assert_eq!(m.listen, "10.200.0.2:14002");
    assert_eq!(m.secret_file, PathBuf::from("/tmp/x/replication-secret"));
    assert_eq!(
        m.witness,
        sva_node::config::WitnessSection::Standalone {
            address: "10.200.0.1:14000".into(),
            secret_file: PathBuf::from("/tmp/x/witness-secret"),
        }
    );
    let got: Vec<(u16, String, String, String)> = m
        .plexes
        .iter()
        .map(|p| (p.id, p.node.clone(), p.portal.clone(), p.peer_addr.clone()))
        .collect();
    let want: Vec<(u16, String, String, String)> = plexes
        .iter()
        .map(|p| {
            (
                p.id,
                p.node.clone(),
                p.portal.to_string(),
                p.peer_addr.to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);
}
