//! Tests of the standalone witness: `RemoteWitness` against a real `serve` on 127.0.0.1.

use super::client::RemoteWitness;
use super::conformance::{record, run_conformance};
use super::wire::{self, read_frame, write_frame, Auth, AuthOutcome, Hello, Request, Response};
use super::{serve, store, Witness, WitnessError};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const SECRET: &[u8] = b"witness-test-secret-0123456789";

struct Server {
    addr: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
    stop: oneshot::Sender<()>,
}

async fn start_on(listener: TcpListener, dir: &Path) -> Server {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, dir.to_path_buf(), SECRET.to_vec(), async {
        let _ = stopped.await;
    }));
    Server { addr, task, stop }
}

async fn start(dir: &Path) -> Server {
    start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), dir).await
}

fn client(addr: SocketAddr) -> RemoteWitness {
    RemoteWitness::new(addr.to_string(), SECRET.to_vec())
}

/// A connection authenticated by hand, for sending what `RemoteWitness` never would.
async fn raw_authenticated(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello: Hello = read_frame(&mut s).await.unwrap();
    let ns = wire::decode_nonce(&hello.nonce).unwrap();
    let nc = wire::nonce();
    let auth = Auth {
        client_nonce: hex::encode(nc),
        mac: hex::encode(wire::client_mac(SECRET, &ns, &nc)),
    };
    write_frame(&mut s, &auth).await.unwrap();
    let outcome: AuthOutcome = read_frame(&mut s).await.unwrap();
    assert!(matches!(outcome, AuthOutcome::Welcome { .. }));
    s
}

/// True if the peer closes `s` (EOF or reset) within a second.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // e.g. the Hello frame sent before our garbage
        }
    }
}

#[tokio::test]
async fn conformance_over_remote() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    run_conformance(|| client(srv.addr)).await;
    // Every acknowledged record is on disk, not just in memory.
    let on_disk = store::load_all(dir.path()).unwrap();
    assert_eq!(on_disk["conformance-right-epoch"], record(10, 1));
}

#[tokio::test]
async fn records_survive_a_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let w = client(srv.addr);
    w.cas("a", None, record(1, 1)).await.unwrap();
    w.cas("a", Some(1), record(2, 2)).await.unwrap();
    w.cas("b", None, record(7, 1)).await.unwrap();
    srv.task.abort(); // a crash, not a graceful stop
    assert!(srv.task.await.unwrap_err().is_cancelled());

    let srv = start(dir.path()).await;
    let w = client(srv.addr);
    assert_eq!(w.get("a").await.unwrap(), Some(record(2, 2)));
    assert_eq!(w.get("b").await.unwrap(), Some(record(7, 1)));
    match w.cas("a", Some(1), record(3, 1)).await {
        Err(WitnessError::Conflict(cur)) => assert_eq!(*cur, record(2, 2)),
        other => panic!("expected Conflict, got {other:?}"),
    }
    w.cas("a", Some(2), record(3, 1)).await.unwrap();
    drop(srv.stop);
    srv.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn client_reconnects_after_a_restart_on_the_same_address() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let addr = srv.addr;
    let w = client(addr);
    w.cas("v", None, record(1, 1)).await.unwrap();
    srv.task.abort();
    let _ = srv.task.await;
    // The client's cached connection is now dead; the next call must reconnect transparently.
    let srv = start_on(TcpListener::bind(addr).await.unwrap(), dir.path()).await;
    assert_eq!(
        w.cas("v", Some(1), record(2, 2)).await.unwrap(),
        record(2, 2)
    );
    assert_eq!(w.get("v").await.unwrap(), Some(record(2, 2)));
    drop(srv.stop);
}

#[tokio::test]
async fn wrong_secret_is_unauthorized_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    client(srv.addr).cas("v", None, record(1, 1)).await.unwrap();
    let bad = RemoteWitness::new(srv.addr.to_string(), b"not-the-secret-0123456789".to_vec());
    assert!(matches!(
        bad.get("v").await,
        Err(WitnessError::Unauthorized)
    ));
    assert!(matches!(
        bad.cas("v", Some(1), record(2, 2)).await,
        Err(WitnessError::Unauthorized)
    ));
    assert_eq!(client(srv.addr).get("v").await.unwrap(), Some(record(1, 1)));
}

#[tokio::test]
async fn impostor_server_is_unauthorized() {
    // A "witness" that does not know the secret cannot forge its proof.
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        dir.path().to_path_buf(),
        b"impostor-secret-0123456789".to_vec(),
        async {
            let _ = stopped.await;
        },
    ));
    // The impostor refuses us (different secret) — and even a Welcome would not verify.
    assert!(matches!(
        client(addr).get("v").await,
        Err(WitnessError::Unauthorized)
    ));
}

#[tokio::test]
async fn garbage_closes_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let good = client(srv.addr);
    good.cas("v", None, record(1, 1)).await.unwrap(); // connection established before

    // Before authentication: an absurd length, then plain junk.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(&[0xff; 64]).await.unwrap();
    assert!(closed_by_peer(&mut s).await, "huge length prefix");
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"\x00\x00\x00\x05hello world").await.unwrap();
    assert!(closed_by_peer(&mut s).await, "non-JSON auth");
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let auth = serde_json::json!({"clientNonce": "zz", "mac": "00"});
    let _: Hello = read_frame(&mut s).await.unwrap();
    write_frame(&mut s, &auth).await.unwrap();
    assert!(closed_by_peer(&mut s).await, "bad nonce");

    // After authentication: a frame that is not a request.
    let mut s = raw_authenticated(srv.addr).await;
    s.write_all(b"\x00\x00\x00\x03{{{").await.unwrap();
    assert!(closed_by_peer(&mut s).await, "bad request frame");
    let mut s = raw_authenticated(srv.addr).await;
    write_frame(&mut s, &serde_json::json!({"type": "cas", "volume": "v"}))
        .await
        .unwrap();
    assert!(closed_by_peer(&mut s).await, "request missing fields");

    // The established client and new ones are still served.
    assert_eq!(
        good.cas("v", Some(1), record(2, 2)).await.unwrap(),
        record(2, 2)
    );
    assert_eq!(client(srv.addr).get("v").await.unwrap(), Some(record(2, 2)));
}

#[tokio::test]
async fn server_refuses_invalid_requests_and_keeps_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let mut s = raw_authenticated(srv.addr).await;
    for volume in ["../escape", "", "UPPER", ".hidden", "a/b"] {
        write_frame(
            &mut s,
            &Request::Get {
                volume: volume.into(),
            },
        )
        .await
        .unwrap();
        let resp: Response = read_frame(&mut s).await.unwrap();
        assert!(
            matches!(resp, Response::Invalid { .. }),
            "{volume:?}: {resp:?}"
        );
        let req = Request::Cas {
            volume: volume.into(),
            expected_epoch: None,
            record: record(1, 1),
        };
        write_frame(&mut s, &req).await.unwrap();
        let resp: Response = read_frame(&mut s).await.unwrap();
        assert!(
            matches!(resp, Response::Invalid { .. }),
            "{volume:?}: {resp:?}"
        );
    }
    // Nothing escaped the data directory or got created.
    assert!(store::load_all(dir.path()).unwrap().is_empty());
    assert!(!dir.path().parent().unwrap().join("escape.json").exists());
    // The same connection still works.
    write_frame(
        &mut s,
        &Request::Get {
            volume: "ok".into(),
        },
    )
    .await
    .unwrap();
    let resp: Response = read_frame(&mut s).await.unwrap();
    assert_eq!(resp, Response::Record { record: None });
    // The client checks names before sending.
    assert!(matches!(
        client(srv.addr).get("../x").await,
        Err(WitnessError::Protocol(_))
    ));
}

#[tokio::test]
async fn leftover_temp_file_does_not_corrupt_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    client(srv.addr).cas("v", None, record(3, 1)).await.unwrap();
    srv.task.abort();
    let _ = srv.task.await;
    // A crash in the middle of persisting epoch 4 (before its rename).
    std::fs::write(
        store::temp_path(dir.path(), "v"),
        b"{\"epoch\":4,\"plexes\":[{\"id\"",
    )
    .unwrap();
    std::fs::write(store::temp_path(dir.path(), "new"), b"").unwrap();
    let srv = start(dir.path()).await;
    let w = client(srv.addr);
    assert_eq!(w.get("v").await.unwrap(), Some(record(3, 1)));
    assert_eq!(w.get("new").await.unwrap(), None);
    assert!(!store::temp_path(dir.path(), "v").exists());
    w.cas("v", Some(3), record(4, 2)).await.unwrap();
    assert_eq!(store::load_all(dir.path()).unwrap()["v"], record(4, 2));
}

#[tokio::test]
async fn corrupt_record_stops_the_server_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(store::record_path(dir.path(), "v"), b"{torn").unwrap();
    let srv = start(dir.path()).await;
    let err = srv.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn short_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = serve(
        listener,
        dir.path().to_path_buf(),
        b"short".to_vec(),
        async {},
    )
    .await;
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn silent_witness_is_unreachable_within_the_timeout() {
    // Accepts connections but never speaks.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let w = client(addr).with_timeout(Duration::from_millis(200));
    let t0 = Instant::now();
    assert!(matches!(
        w.cas("v", None, record(1, 1)).await,
        Err(WitnessError::Unreachable(_))
    ));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn refused_connection_is_unreachable() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    assert!(matches!(
        client(addr).get("v").await,
        Err(WitnessError::Unreachable(_))
    ));
}

#[tokio::test]
async fn graceful_shutdown_with_idle_clients_connected() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let w = client(srv.addr);
    w.cas("v", None, record(1, 1)).await.unwrap(); // leaves an idle connection open
    let _raw = raw_authenticated(srv.addr).await;
    let mut silent = TcpStream::connect(srv.addr).await.unwrap(); // never answers the Hello
    let _: Hello = read_frame(&mut silent).await.unwrap();
    srv.stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(2), srv.task)
        .await
        .expect("serve returns promptly after shutdown")
        .unwrap()
        .unwrap();
    assert!(matches!(
        w.get("v").await,
        Err(WitnessError::Unreachable(_))
    ));
}

#[tokio::test]
async fn many_clients_many_volumes_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let w = client(srv.addr);
            tokio::spawn(async move {
                let v = format!("vol-{i}");
                w.cas(&v, None, record(1, 1)).await.unwrap();
                for e in 1..=10 {
                    w.cas(&v, Some(e), record(e + 1, (e % 3) as u16))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let on_disk = store::load_all(dir.path()).unwrap();
    assert_eq!(on_disk.len(), 16);
    assert!(on_disk.values().all(|r| *r == record(11, 1)));
}

#[tokio::test]
async fn storage_failure_fails_the_cas_and_fences_the_volume_until_restart() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let srv = start(&dir).await;
    let w = client(srv.addr);
    w.cas("v", None, record(1, 1)).await.unwrap();
    w.cas("u", None, record(1, 1)).await.unwrap();
    // The disk goes away under the witness.
    let moved = root.path().join("moved");
    std::fs::rename(&dir, &moved).unwrap();
    assert!(matches!(
        w.cas("v", Some(1), record(2, 2)).await,
        Err(WitnessError::Unreachable(_))
    ));
    // In doubt: neither read nor written until a restart reloads it from disk.
    assert!(matches!(
        w.get("v").await,
        Err(WitnessError::Unreachable(_))
    ));
    assert!(w.cas("v", Some(1), record(2, 2)).await.is_err());
    // Other volumes are still readable.
    assert_eq!(w.get("u").await.unwrap(), Some(record(1, 1)));
    srv.task.abort();
    let _ = srv.task.await;
    std::fs::rename(&moved, &dir).unwrap();
    let srv = start(&dir).await;
    assert_eq!(client(srv.addr).get("v").await.unwrap(), Some(record(1, 1)));
}
