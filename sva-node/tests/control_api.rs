//! The control API over real loopback HTTP/1.1: every endpoint, auth and error paths, limits,
//! and graceful shutdown. The client is a few lines over a TcpStream so the test sees the
//! exact bytes on the wire.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sva_node::control::{
    serve, ControlState, InstrumentedTarget, Metrics, SingleNodeStatus, StatusSource,
};
use sva_node::scsi::{
    NexusId, ScsiCommand, ScsiResponse, ScsiTarget, TaskAttr, TaskManagement, TmfResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "s3cr3t-token";

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn send_raw(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("server answers and closes in time")
        .expect("read");
    let text = String::from_utf8(buf).expect("utf-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("head/body separator");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line}"));
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Reply {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(a) = auth {
        raw.push_str(&format!("Authorization: {a}\r\n"));
    }
    if method == "POST" {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    send_raw(addr, raw.as_bytes()).await
}

/// Answers every command GOOD; READ with 4 KiB of data-in.
struct Fake;

impl ScsiTarget for Fake {
    fn execute(
        &self,
        _n: NexusId,
        cmd: ScsiCommand,
    ) -> futures::future::BoxFuture<'static, ScsiResponse> {
        let mut r = ScsiResponse::good();
        if cmd.cdb.first() == Some(&0x28) {
            r.data_in = Bytes::from(vec![0u8; 4096]);
        }
        Box::pin(async move { r })
    }
    fn task_management(
        &self,
        _n: NexusId,
        _lun: u64,
        _t: TaskManagement,
    ) -> futures::future::BoxFuture<'static, TmfResponse> {
        Box::pin(async { TmfResponse::Complete })
    }
    fn nexus_added(&self, _n: NexusId) {}
    fn nexus_removed(&self, _n: NexusId) {}
}

struct Node {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    status: Arc<SingleNodeStatus>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(token: Option<&str>) -> Node {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let metrics = Arc::new(Metrics::new());
    let status = Arc::new(SingleNodeStatus::new(
        "node-a",
        "vol1",
        1,
        "127.0.0.1:3260",
        metrics.clone(),
    ));
    let state = ControlState {
        metrics: metrics.clone(),
        status: status.clone() as Arc<dyn StatusSource>,
        token: token.map(str::to_string),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));
    Node {
        addr,
        metrics,
        status,
        stop,
        server,
    }
}

#[tokio::test]
async fn endpoints_auth_errors_and_shutdown() {
    let node = start(Some(TOKEN)).await;
    let a = node.addr;

    // Health follows the status source.
    let r = request(a, "GET", "/healthz", None, "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "not serving: starting\n")
    );
    node.status.set_serving();
    let r = request(a, "GET", "/healthz", None, "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    // Drive one read and one write through the instrumented target.
    let target = InstrumentedTarget::new(Arc::new(Fake), node.metrics.clone());
    let nexus = NexusId {
        initiator_port: "iqn.test,i,0x1".into(),
        relative_target_port: 1,
    };
    target.nexus_added(nexus.clone());
    for (op, data_out) in [(0x28u8, 0usize), (0x2a, 4096)] {
        let mut cdb = vec![0u8; 16];
        cdb[0] = op;
        target
            .execute(
                nexus.clone(),
                ScsiCommand {
                    lun: 0,
                    cdb: cdb.into(),
                    data_out: vec![1u8; data_out].into(),
                    expected_transfer_len: 4096,
                    task_attr: TaskAttr::Simple,
                    tag: 1,
                },
            )
            .await;
    }

    let r = request(a, "GET", "/metrics", None, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(r.body.contains("# TYPE sva_io_latency_seconds histogram\n"));
    assert!(r.body.contains("sva_io_commands_total{op=\"write\"} 1\n"));
    assert!(r.body.contains("sva_io_bytes_total{op=\"read\"} 4096\n"));
    assert!(r.body.contains("sva_sessions 1\n"));
    assert!(r
        .body
        .contains("sva_plex_state{plex=\"1\",state=\"InSync\"} 1\n"));

    let r = request(a, "GET", "/v1/status", None, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["node"], "node-a");
    assert_eq!(j["volume"], "vol1");
    assert_eq!(j["epoch"], 0);
    assert_eq!(j["aluaState"], "ActiveOptimized");
    assert_eq!(j["sessions"], 1);
    assert_eq!(j["plexes"][0]["id"], 1);
    assert_eq!(j["plexes"][0]["portal"], "127.0.0.1:3260");
    assert_eq!(j["plexes"][0]["state"], "InSync");
    assert_eq!(j["plexes"][0]["resync"]["doneBytes"], 0);
    assert_eq!(j["plexes"][0]["resync"]["totalBytes"], 0);
    assert_eq!(j["plexes"][0]["resync"]["bytesPerSec"], 0);
    assert_eq!(j["counters"]["read"]["commands"], 1);
    assert_eq!(j["counters"]["write"]["bytes"], 4096);
    assert_eq!(j["counters"]["other"]["errors"], 0);
    assert!(j["resyncRateLimitBytesPerSec"].is_null());

    // Mutations: token required, compared exactly.
    let body = r#"{"bytesPerSec": 1048576}"#;
    let r = request(a, "POST", "/v1/resync-rate", None, body).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"sva-node\"")
    );
    assert!(r.json()["error"].as_str().is_some());
    let r = request(a, "POST", "/v1/resync-rate", Some("Bearer wrong"), body).await;
    assert_eq!(r.status, 401);
    let r = request(
        a,
        "POST",
        "/v1/resync-rate",
        Some(&format!("Basic {TOKEN}")),
        body,
    )
    .await;
    assert_eq!(r.status, 401, "only the Bearer scheme is accepted");
    let prefix = &TOKEN[..TOKEN.len() - 1];
    let r = request(
        a,
        "POST",
        "/v1/resync-rate",
        Some(&format!("Bearer {prefix}")),
        body,
    )
    .await;
    assert_eq!(r.status, 401, "a prefix of the token is not the token");
    // The rate was not changed by any refused request.
    assert_eq!(node.status.status().resync_rate_limit_bytes_per_sec, None);

    let auth = format!("Bearer {TOKEN}");
    let auth = Some(auth.as_str());
    let r = request(a, "POST", "/v1/resync-rate", auth, "{not json").await;
    assert_eq!(r.status, 400);
    let err = r.json()["error"].as_str().expect("error text").to_string();
    assert!(err.contains("invalid JSON body"), "{err}");
    let r = request(a, "POST", "/v1/resync-rate", auth, r#"{"rate": 5}"#).await;
    assert_eq!(r.status, 400);
    let err = r.json()["error"].as_str().expect("error text").to_string();
    assert!(err.contains("rate"), "names the unknown field: {err}");
    let r = request(a, "POST", "/v1/resync-rate", auth, r#"{"bytesPerSec": 0}"#).await;
    assert_eq!(r.status, 400);
    let r = request(a, "POST", "/v1/resync-rate", auth, r#"{"bytesPerSec": -1}"#).await;
    assert_eq!(r.status, 400);

    let r = request(a, "POST", "/v1/resync-rate", auth, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["bytesPerSec"], 1048576);
    let j = request(a, "GET", "/v1/status", None, "").await.json();
    assert_eq!(j["resyncRateLimitBytesPerSec"], 1048576);

    // Unknown path, wrong method.
    let r = request(a, "GET", "/v1/nope", None, "").await;
    assert_eq!(r.status, 404);
    let r = request(a, "GET", "/v1/resync-rate", None, "").await;
    assert_eq!(r.status, 405);

    // Limits: a huge header and a huge body are refused, and the server keeps serving.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = send_raw(a, big.as_bytes()).await;
    assert_eq!(r.status, 431);
    let huge = format!(
        "{{\"bytesPerSec\": 1, \"pad\": \"{}\"}}",
        "x".repeat(100_000)
    );
    let r = request(a, "POST", "/v1/resync-rate", auth, &huge).await;
    assert_eq!(r.status, 413);
    let r = request(a, "GET", "/healthz", None, "").await;
    assert_eq!(r.status, 200);

    // Graceful shutdown: serve returns and the port stops accepting.
    node.stop.send(()).expect("server alive");
    let res = tokio::time::timeout(Duration::from_secs(10), node.server)
        .await
        .expect("serve returns after shutdown")
        .expect("task not panicked");
    assert!(res.is_ok());
    assert!(TcpStream::connect(a).await.is_err(), "listener closed");
}

#[tokio::test]
async fn without_a_token_mutations_are_disabled() {
    let node = start(None).await;
    let r = request(
        node.addr,
        "POST",
        "/v1/resync-rate",
        Some("Bearer anything"),
        r#"{"bytesPerSec": 1}"#,
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("no API token")));
    // Reads still work.
    let r = request(node.addr, "GET", "/v1/status", None, "").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_and_shutdown_waits_for_idle_clients() {
    let node = start(Some(TOKEN)).await;
    let mut s = TcpStream::connect(node.addr).await.expect("connect");
    // Two pipelined requests on one connection.
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("sva_plex_state") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    // The idle keep-alive connection must not hold shutdown past the grace period.
    node.stop.send(()).expect("server alive");
    let res = tokio::time::timeout(Duration::from_secs(8), node.server)
        .await
        .expect("serve returns despite an idle client")
        .expect("task not panicked");
    assert!(res.is_ok());
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the idle connection was closed");
}

/// A mirrored node's status source as the engine would feed it: plex 2 resyncing from this
/// node, a verify that ran; records the mutations it receives.
struct FakeMirror {
    rate: std::sync::Mutex<Vec<u64>>,
    verifies: std::sync::Mutex<Vec<bool>>,
}

impl StatusSource for FakeMirror {
    fn status(&self) -> sva_node::control::NodeStatus {
        use sva_node::control::{NodeStatus, PlexStatus, ResyncProgress, VerifyStatus};
        use sva_node::mirror::resync::ResyncRole;
        use sva_node::witness::PlexState;
        let plex = |id: u16, state, resync| PlexStatus {
            id,
            node: format!("n{id}"),
            portal: format!("127.0.0.1:326{id}"),
            state,
            resync,
        };
        NodeStatus {
            node: "n1".into(),
            volume: "vol".into(),
            epoch: 4,
            alua_state: sva_node::scsi::alua::AluaState::ActiveOptimized,
            plexes: vec![
                plex(1, PlexState::InSync, ResyncProgress::default()),
                plex(
                    2,
                    PlexState::Stale,
                    ResyncProgress {
                        done_bytes: 400 << 20,
                        total_bytes: 1 << 30,
                        bytes_per_sec: 100 << 20,
                        copied_bytes: 300 << 20,
                        eta_seconds: Some(7),
                        full: false,
                        role: Some(ResyncRole::Source),
                    },
                ),
            ],
            resync_rate_limit_bytes_per_sec: self.rate.lock().unwrap().last().copied(),
            verify: Some(VerifyStatus {
                running: false,
                regions_total: 1024,
                regions_done: 1024,
                mismatched_regions: vec![17],
                region_bytes: 1 << 20,
            }),
        }
    }
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    fn set_resync_rate(&self, bytes_per_sec: u64) -> Result<(), sva_node::control::ControlError> {
        self.rate.lock().unwrap().push(bytes_per_sec);
        Ok(())
    }
    fn start_verify(&self, repair: bool) -> Result<(), sva_node::control::ControlError> {
        let mut v = self.verifies.lock().unwrap();
        if !v.is_empty() {
            return Err(sva_node::control::ControlError::Conflict(
                "a verify is already running".into(),
            ));
        }
        v.push(repair);
        Ok(())
    }
}

#[tokio::test]
async fn mirrored_status_shows_resync_and_verify_and_verify_can_be_started() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = listener.local_addr().expect("addr");
    let fake = Arc::new(FakeMirror {
        rate: Default::default(),
        verifies: Default::default(),
    });
    let state = ControlState {
        metrics: Arc::new(Metrics::new()),
        status: fake.clone() as Arc<dyn StatusSource>,
        token: Some(TOKEN.into()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let j = request(a, "GET", "/v1/status", None, "").await.json();
    let r = &j["plexes"][1]["resync"];
    assert_eq!(r["doneBytes"], 400 << 20);
    assert_eq!(r["totalBytes"], 1 << 30);
    assert_eq!(r["bytesPerSec"], 100 << 20);
    assert_eq!(r["copiedBytes"], 300 << 20);
    assert_eq!(r["etaSeconds"], 7);
    assert_eq!(r["full"], false);
    assert_eq!(r["role"], "source");
    assert!(j["plexes"][0]["resync"]["role"].is_null());
    assert!(j["plexes"][0]["resync"]["etaSeconds"].is_null());
    assert_eq!(j["verify"]["regionsTotal"], 1024);
    assert_eq!(j["verify"]["mismatchedRegions"][0], 17);
    assert_eq!(j["verify"]["regionBytes"], 1 << 20);
    assert_eq!(j["verify"]["running"], false);

    let auth = Some(format!("Bearer {TOKEN}"));
    let auth = auth.as_deref();
    // Verify needs the token.
    let r = request(a, "POST", "/v1/verify", None, r#"{"repair":false}"#).await;
    assert_eq!(r.status, 401);
    let r = request(a, "POST", "/v1/verify", auth, r#"{"fix":true}"#).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(fake.verifies.lock().unwrap().is_empty());
    let r = request(a, "POST", "/v1/verify", auth, r#"{"repair":true}"#).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["repair"], true);
    assert_eq!(*fake.verifies.lock().unwrap(), vec![true]);
    // The engine refuses a second one: 409 with its reason.
    let r = request(a, "POST", "/v1/verify", auth, "").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("already running")));

    // The resync rate reaches the source and shows in the status.
    let r = request(
        a,
        "POST",
        "/v1/resync-rate",
        auth,
        r#"{"bytesPerSec": 5000000}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(*fake.rate.lock().unwrap(), vec![5_000_000]);
    let j = request(a, "GET", "/v1/status", None, "").await.json();
    assert_eq!(j["resyncRateLimitBytesPerSec"], 5_000_000);

    let _ = stop.send(());
    assert!(server.await.expect("not panicked").is_ok());
}

#[tokio::test]
async fn a_single_node_refuses_verify_with_409() {
    let node = start(Some(TOKEN)).await;
    let auth = format!("Bearer {TOKEN}");
    let r = request(node.addr, "POST", "/v1/verify", Some(&auth), "{}").await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("mirrored")));
}
