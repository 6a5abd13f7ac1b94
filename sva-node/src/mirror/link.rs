//! Replication links: authenticated TCP connections that carry engine [`Message`]s between
//! the nodes of a volume.
//!
//! ```text
//!  node A                                   node B
//!   outbound task ──connect, handshake──> accept loop ──frames──> engine inbox (from = A)
//!   engine inbox  <──frames── accept loop <──connect, handshake── outbound task
//! ```
//!
//! Each direction has its own connection: a node sends on the connection it dialled and
//! receives on the ones it accepted, so no connection is ever shared between a reader and a
//! writer. Sends never block the engine: each peer has a bounded queue, and a message that
//! does not fit (or is queued while the peer is unreachable) is dropped — the engine
//! retransmits what matters and treats silence as peer loss.
//!
//! Handshake (DESIGN.md §9: an unauthenticated replication port would let anyone write the
//! volume). Both sides prove knowledge of the volume's replication secret over fresh nonces:
//!
//! ```text
//!  dialer                                              acceptor
//!    <── "SVAP" v1 ‖ Ns(32) ─────────────────────────
//!    ─── plex(2) ‖ Nc(32) ‖ HMAC(k, "sva-peer dialer" ‖ volume ‖ Ns ‖ Nc ‖ plex) ──>
//!    <── HMAC(k, "sva-peer acceptor" ‖ volume ‖ Ns ‖ Nc ‖ plex) ─────
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::msg::{self, Message, PlexId};

/// Messages queued per peer before new ones are dropped.
pub const SEND_QUEUE_MAX: usize = 8192;
/// Delay between connection attempts to an unreachable peer.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// A handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes gathered into one write when several messages are queued.
const WRITE_BATCH_BYTES: usize = 1 << 20;

const MAGIC: &[u8; 4] = b"SVAP";
/// Wire version of the handshake and the frames after it (2: `Applied` carries the applied
/// prefix, `Progress`).
const VERSION: u8 = 2;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const DIALER_LABEL: &[u8] = b"sva-peer dialer";
const ACCEPTOR_LABEL: &[u8] = b"sva-peer acceptor";

/// A message received from a peer.
pub type Inbound = (PlexId, Message);

/// The sending side of every link of this node.
#[derive(Clone)]
pub struct Links {
    queues: Arc<HashMap<PlexId, mpsc::Sender<Message>>>,
}

impl Links {
    /// Queue `msg` for `to`; dropped if the queue is full or the peer unknown (see module doc).
    pub fn send(&self, to: PlexId, msg: Message) {
        if let Some(q) = self.queues.get(&to) {
            if q.try_send(msg).is_err() {
                tracing::trace!(to, "replication queue full; message dropped");
            }
        }
    }
}

/// Who we are and whom we talk to.
#[derive(Clone)]
pub struct LinkConfig {
    pub me: PlexId,
    pub volume: String,
    pub secret: Arc<Vec<u8>>,
    pub peers: Vec<(PlexId, String)>,
}

/// Start the accept loop on `listener` and one dialer per peer. Received messages go to
/// `inbound`. The tasks end when `inbound`'s receiver is dropped or the runtime stops.
pub fn start(cfg: LinkConfig, listener: TcpListener, inbound: mpsc::Sender<Inbound>) -> Links {
    let mut queues = HashMap::new();
    for (id, addr) in &cfg.peers {
        let (tx, rx) = mpsc::channel(SEND_QUEUE_MAX);
        queues.insert(*id, tx);
        tokio::spawn(dial_loop(cfg.clone(), *id, addr.clone(), rx));
    }
    tokio::spawn(accept_loop(cfg, listener, inbound));
    Links {
        queues: Arc::new(queues),
    }
}

async fn dial_loop(cfg: LinkConfig, peer: PlexId, addr: String, mut rx: mpsc::Receiver<Message>) {
    let mut buf = BytesMut::new();
    loop {
        let mut stream = match dial(&cfg, &addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer, %addr, "replication link: {e}");
                // Drop what queued up while the peer was unreachable: it is stale, and the
                // engine resends what still matters.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        tracing::info!(peer, %addr, "replication link up");
        loop {
            let Some(first) = rx.recv().await else {
                return; // the node is shutting down
            };
            buf.clear();
            msg::encode(&first, &mut buf);
            while buf.len() < WRITE_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(m) => msg::encode(&m, &mut buf),
                    Err(_) => break,
                }
            }
            if let Err(e) = stream.write_all(&buf).await {
                tracing::warn!(peer, %addr, "replication link down: {e}");
                break;
            }
        }
    }
}

async fn dial(cfg: &LinkConfig, addr: &str) -> std::io::Result<TcpStream> {
    let mut s = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, dialer_handshake(cfg, &mut s))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))??;
    Ok(s)
}

async fn dialer_handshake(cfg: &LinkConfig, s: &mut TcpStream) -> std::io::Result<()> {
    let mut hello = [0u8; 5 + NONCE_LEN];
    s.read_exact(&mut hello).await?;
    if &hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(bad(
            "peer is not an sva-node replication port of this version",
        ));
    }
    let ns = &hello[5..];
    let nc: [u8; NONCE_LEN] = rand::random();
    let mut out = Vec::with_capacity(2 + NONCE_LEN + MAC_LEN);
    out.extend_from_slice(&cfg.me.to_be_bytes());
    out.extend_from_slice(&nc);
    out.extend_from_slice(&mac(cfg, DIALER_LABEL, ns, &nc, cfg.me));
    s.write_all(&out).await?;
    let mut proof = [0u8; MAC_LEN];
    s.read_exact(&mut proof).await?;
    if !verify(cfg, ACCEPTOR_LABEL, ns, &nc, cfg.me, &proof) {
        return Err(bad("peer failed to prove the replication secret"));
    }
    Ok(())
}

async fn accept_loop(cfg: LinkConfig, listener: TcpListener, inbound: mpsc::Sender<Inbound>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        if inbound.is_closed() {
            return;
        }
        let cfg = cfg.clone();
        let inbound = inbound.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_peer(&cfg, stream, &inbound).await {
                tracing::info!(%from, "replication connection closed: {e}");
            }
        });
    }
}

async fn serve_peer(
    cfg: &LinkConfig,
    mut s: TcpStream,
    inbound: &mpsc::Sender<Inbound>,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let peer = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor_handshake(cfg, &mut s))
        .await
        .map_err(|_| bad("handshake timed out"))??;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            match msg::decode(&mut buf) {
                Ok(Some(m)) => {
                    if inbound.send((peer, m)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(bad(&format!("peer {peer} sent a bad frame: {e}"))),
            }
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Err(bad("peer closed the connection"));
        }
    }
}

async fn acceptor_handshake(cfg: &LinkConfig, s: &mut TcpStream) -> std::io::Result<PlexId> {
    let ns: [u8; NONCE_LEN] = rand::random();
    let mut hello = Vec::with_capacity(5 + NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&ns);
    s.write_all(&hello).await?;
    let mut auth = [0u8; 2 + NONCE_LEN + MAC_LEN];
    s.read_exact(&mut auth).await?;
    let peer = PlexId::from_be_bytes([auth[0], auth[1]]);
    let nc = &auth[2..2 + NONCE_LEN];
    if peer == cfg.me || !cfg.peers.iter().any(|(id, _)| *id == peer) {
        return Err(bad(&format!("plex {peer} is not a peer of this volume")));
    }
    if !verify(cfg, DIALER_LABEL, &ns, nc, peer, &auth[2 + NONCE_LEN..]) {
        return Err(bad(&format!(
            "plex {peer} failed to prove the replication secret"
        )));
    }
    s.write_all(&mac(cfg, ACCEPTOR_LABEL, &ns, nc, peer))
        .await?;
    Ok(peer)
}

fn hmac_for(cfg: &LinkConfig, label: &[u8], ns: &[u8], nc: &[u8], plex: PlexId) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so new_from_slice cannot fail here.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&cfg.secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(label);
    m.update(&(cfg.volume.len() as u32).to_be_bytes());
    m.update(cfg.volume.as_bytes());
    m.update(ns);
    m.update(nc);
    m.update(&plex.to_be_bytes());
    m
}

fn mac(cfg: &LinkConfig, label: &[u8], ns: &[u8], nc: &[u8], plex: PlexId) -> Vec<u8> {
    hmac_for(cfg, label, ns, nc, plex)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Constant-time check of a peer's MAC.
fn verify(cfg: &LinkConfig, label: &[u8], ns: &[u8], nc: &[u8], plex: PlexId, got: &[u8]) -> bool {
    hmac_for(cfg, label, ns, nc, plex).verify_slice(got).is_ok()
}

fn bad(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string())
}

/// Bind helper for tests and the node: the address a link listener is bound to.
pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::msg::Message;

    fn cfg(me: PlexId, peers: Vec<(PlexId, String)>, secret: &[u8]) -> LinkConfig {
        LinkConfig {
            me,
            volume: "vol1".into(),
            secret: Arc::new(secret.to_vec()),
            peers,
        }
    }

    async fn pair(secret_b: &[u8]) -> (Links, mpsc::Receiver<Inbound>, mpsc::Receiver<Inbound>) {
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let (ta, ra) = mpsc::channel(16);
        let (tb, rb) = mpsc::channel(16);
        let a = start(
            cfg(1, vec![(2, ab.to_string())], b"secret-0123456789"),
            la,
            ta,
        );
        let _b = start(cfg(2, vec![(1, aa.to_string())], secret_b), lb, tb);
        (a, ra, rb)
    }

    #[tokio::test]
    async fn messages_flow_between_authenticated_peers() {
        let (a, _ra, mut rb) = pair(b"secret-0123456789").await;
        let hb = Message::Resend { epoch: 3, from: 9 };
        // The link comes up asynchronously; resend until the peer has it, as the engine does.
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                a.send(2, hb.clone());
                if let Ok(Some(m)) =
                    tokio::time::timeout(Duration::from_millis(100), rb.recv()).await
                {
                    return m;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, (1, hb));
    }

    #[tokio::test]
    async fn a_peer_with_the_wrong_secret_gets_nothing_through() {
        let (a, _ra, mut rb) = pair(b"another-secret-xyz").await;
        for _ in 0..10 {
            a.send(2, Message::Resend { epoch: 1, from: 1 });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rb.recv())
                .await
                .is_err(),
            "a message crossed a link whose peers do not share the secret"
        );
    }
}
