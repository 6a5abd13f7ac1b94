//! Replication links: authenticated TCP connections that carry engine [`Message`]s between
//! the nodes of a volume.
//!
//! ```text
//!  node A                                   node B
//!   send (inline) / writer task ──connect, handshake──> reader task ──frames──> Inbound (from = A)
//!   Inbound <──frames── reader task <──connect, handshake── send (inline) / writer task
//! ```
//!
//! Each direction has its own connection: a node sends on the connection it dialled and
//! receives on the ones it accepted, so no connection is ever shared between a reader and a
//! writer. A writer redials a lost peer every [`RECONNECT_DELAY`], and at once when that peer
//! connects to us (it is back); once its connection is up it tells the node
//! ([`Inbound::link_up`]), which says again what the peer missed (a restarted plex's resync
//! starts without waiting for retransmission timers).
//!
//! Latency (issue 3: a mirrored write's ack waits for one round trip to the peer) decides the
//! shape of both ends; a hop through another task costs a thread wake-up, which on a small VM
//! is worth several loopback round trips:
//! - **Send**: the caller (the engine's thread, holding the engine lock) appends the encoded
//!   frame to the peer's buffer and, if nothing was waiting in it and the frame is small,
//!   writes it to the socket at once (`try_write_vectored`, never blocking). Only what the
//!   socket does not take, and every large frame (above [`INLINE_FRAME_BYTES_MAX`]: a resync
//!   copy, a large write), is left to the peer's writer task, woken for that. The writer
//!   takes the queued bytes out and writes them *without* the buffer's lock, so a sender
//!   never waits behind a megabyte going into the socket (a resync copy's payload is written
//!   from its own buffer, not copied). Sends never block the engine: a frame that does not
//!   fit in [`SEND_BUFFER_MAX`], or is sent while the peer is unreachable, is dropped; the
//!   engine retransmits what matters and treats silence as peer loss.
//! - **Receive**: the reader task of an accepted connection decodes every whole frame it has
//!   and hands them, in order, to the [`Inbound`] sink on its own thread (the node feeds its
//!   engine there), instead of queueing them for another task.
//! - **Wait for the next op by polling**: after the reader delivers an op (a write to order
//!   or apply: [`Message::carries_op`]), it polls the socket for the next one for up to
//!   [`LinkConfig::op_spin`] (`mirror.opSpinMicros`), yielding the CPU and then to the
//!   node's other tasks between polls, while ops lately came within that of each other
//!   ([`RecentWaits`]).
//!   Under a steady load the peer's reader is then never asleep when the origin's write
//!   arrives, which saves the one wake-up of an idle vCPU a mirrored write would add; an
//!   idle or lightly loaded link sleeps as before. The price is CPU on the receiving node
//!   for as long as such a load runs (README, "Mirrored writes").
//! - **Receive while waiting**: a node whose only write in flight waits for its peers' acks
//!   receives on their connections itself ([`Links::poll_received`], polled by the node for
//!   at most `mirror.ackSpinMicros`). It does not sleep, so the ack needs no wake-up: on a
//!   VM, waking an idle vCPU costs about half a loopback round trip. The connection's
//!   receive buffer sits behind a lock that whoever reads holds while it decodes and
//!   delivers, so frames still arrive whole, once and in order.
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

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::msg::{self, Message, PlexId};
use super::spin::RecentWaits;
use crate::store::hugebuf::HugeBuf;

/// Encoded bytes buffered per peer (not yet taken by its socket) before new frames are
/// dropped: a few resync windows of 1 MiB copies.
pub const SEND_BUFFER_MAX: usize = 32 << 20;
/// Largest encoded frame a sender writes to the socket itself; larger ones go to the
/// writer task. Above this a frame's copy into the socket takes longer than the writer
/// task's wake-up, and it would be taken with the engine lock held.
pub const INLINE_FRAME_BYTES_MAX: usize = 64 << 10;
/// Receive buffer of a connection, grown by this much when it runs low.
const RX_BUFFER_BYTES: usize = 64 << 10;
/// Least free space in the receive buffer before a read.
const RX_READ_BYTES_MIN: usize = 16 << 10;
/// Delay between connection attempts to an unreachable peer.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// A handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

const MAGIC: &[u8; 4] = b"SVAP";
/// Wire version of the handshake and the frames after it (2: `Applied` carries the applied
/// prefix, `Progress`).
const VERSION: u8 = 2;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
const DIALER_LABEL: &[u8] = b"sva-peer dialer";
const ACCEPTOR_LABEL: &[u8] = b"sva-peer acceptor";

/// Where received messages go: called on the connection's reader task with every frame
/// decoded from one read, in the order the peer sent them.
pub trait Inbound: Send + Sync + 'static {
    fn deliver(&self, from: PlexId, msgs: Vec<Message>);
    /// This node's connection to `peer` is up (after its handshake): what was sent to it
    /// before was dropped, and the receiver may want to say it again now.
    fn link_up(&self, _peer: PlexId) {}
    /// The receiver is gone (the node shut down): stop reading.
    fn closed(&self) -> bool {
        false
    }
    /// An op arrived that the reader waited for: `polled` if it was polling, not asleep.
    fn op_polled(&self, _polled: bool) {}
}

/// The sending side of one peer's link.
#[derive(Default)]
struct PeerTx {
    state: std::sync::Mutex<TxState>,
    /// Wakes the writer task: bytes were left queued.
    wake: Notify,
    /// Cuts a writer's wait between two dials short: the peer just connected to us, so it
    /// is up (a restarted peer's link came up [`RECONNECT_DELAY`] late without it, and
    /// whatever was sent to the peer meanwhile was dropped).
    redial: Notify,
    /// The connection this peer dialled to us, while it is up.
    rx: std::sync::Mutex<Option<Arc<RxConn>>>,
}

#[derive(Default)]
struct TxState {
    /// The connected, authenticated stream (None while the peer is unreachable).
    stream: Option<Arc<TcpStream>>,
    /// Bytes the socket has not taken yet, in order: `chunks`, then `open` (small frames are
    /// encoded into `open`; a large copy's payload is its own chunk, never copied).
    chunks: VecDeque<Bytes>,
    open: BytesMut,
    /// Total bytes in `chunks` and `open`, plus those the writer task took and is writing.
    queued: usize,
    /// The writer task holds bytes taken out of this queue that are not all written yet:
    /// nothing may be written ahead of them.
    writing: bool,
}

/// Buffers handed to one vectored write.
const IOVECS_MAX: usize = 64;

impl TxState {
    /// Queue `msg`; returns its encoded size.
    fn append(&mut self, msg: &Message) -> usize {
        let before = self.open.len();
        let n = match msg::encode_split(msg, &mut self.open) {
            Some(payload) => {
                let n = self.open.len() - before + payload.len();
                self.chunks.push_back(self.open.split().freeze());
                self.chunks.push_back(payload);
                n
            }
            None => self.open.len() - before,
        };
        self.queued += n;
        n
    }

    fn clear(&mut self) {
        self.chunks.clear();
        self.open.clear();
        self.queued = 0;
        self.writing = false;
    }

    /// Nothing queued and nothing being written: a sender may write to the socket itself.
    fn idle(&self) -> bool {
        !self.writing && self.chunks.is_empty() && self.open.is_empty()
    }

    /// For the writer task: take every queued byte out (to be written without the lock) and
    /// mark the queue as being written; `None` (and not writing) when nothing is queued.
    fn take(&mut self) -> Option<VecDeque<Bytes>> {
        if self.chunks.is_empty() && self.open.is_empty() {
            self.writing = false;
            return None;
        }
        self.writing = true;
        let mut batch = std::mem::take(&mut self.chunks);
        if !self.open.is_empty() {
            batch.push_back(self.open.split().freeze());
        }
        Some(batch)
    }

    /// Drop the first `n` queued bytes (written).
    fn consume(&mut self, n: usize) {
        self.queued = self.queued.saturating_sub(n);
        let rest = drop_written(&mut self.chunks, n);
        self.open.advance(rest);
    }

    /// Write as much as the socket takes now. `Ok(true)`: all of it.
    fn flush(&mut self) -> std::io::Result<bool> {
        let Some(stream) = self.stream.clone() else {
            self.clear();
            return Ok(true);
        };
        while !self.chunks.is_empty() || !self.open.is_empty() {
            match try_write(&stream, &self.chunks, &self.open) {
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// The sending side of every link of this node.
#[derive(Clone)]
pub struct Links {
    peers: Arc<HashMap<PlexId, Arc<PeerTx>>>,
}

impl Links {
    /// The sending side for `cfg`'s peers; nothing is sent until [`start`] connects them.
    pub fn new(cfg: &LinkConfig) -> Links {
        Links {
            peers: Arc::new(
                cfg.peers
                    .iter()
                    .map(|(id, _)| (*id, Arc::new(PeerTx::default())))
                    .collect(),
            ),
        }
    }

    /// Send `msg` to `to` now if its socket takes it, else leave it to the writer task;
    /// dropped if the peer is unreachable or too far behind (see module doc).
    pub fn send(&self, to: PlexId, msg: Message) {
        let Some(tx) = self.peers.get(&to) else {
            return;
        };
        let mut st = lock(&tx.state);
        if st.stream.is_none() || st.queued >= SEND_BUFFER_MAX {
            tracing::trace!(to, "replication link down or full; message dropped");
            return;
        }
        let was_idle = st.idle();
        let size = st.append(&msg);
        if !was_idle {
            return; // the writer task is on it, and order must be kept
        }
        if size > INLINE_FRAME_BYTES_MAX {
            tx.wake.notify_one();
            return;
        }
        match st.flush() {
            Ok(true) => {}
            // Leftovers, or an error the writer task handles (it reconnects).
            Ok(false) | Err(_) => tx.wake.notify_one(),
        }
    }

    /// Receive on this thread what the peers sent so far and deliver it to `inbound`
    /// without waiting: for a sender whose reply is due within a round trip, so that it
    /// need not sleep and be woken for it (see the module doc). A connection whose reader
    /// task is busy is left to it.
    pub fn poll_received(&self, inbound: &dyn Inbound) {
        for tx in self.peers.values() {
            let Some(conn) = lock(&tx.rx).clone() else {
                continue;
            };
            let Ok(mut buf) = conn.buf.try_lock() else {
                continue;
            };
            // An error or a closed connection is the reader task's to handle: it finds the
            // same when it reads next.
            let _ = pump(&conn, &mut buf, inbound, Read::Direct);
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a send queue leaves bytes of a half-encoded frame at worst (the
    // writer task's next write error resets the connection); the receive slot holds no
    // half-done state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Who we are and whom we talk to.
#[derive(Clone)]
pub struct LinkConfig {
    pub me: PlexId,
    pub volume: String,
    pub secret: Arc<Vec<u8>>,
    pub peers: Vec<(PlexId, String)>,
    /// Longest a reader polls for a peer's next op before it sleeps (`mirror.opSpinMicros`;
    /// zero: never).
    pub op_spin: Duration,
}

/// Start the accept loop on `listener` (received messages go to `inbound`) and one writer per
/// peer of `links`. The tasks end when `inbound` reports closed or the runtime stops.
pub fn start(cfg: LinkConfig, links: &Links, listener: TcpListener, inbound: Arc<dyn Inbound>) {
    for (id, addr) in &cfg.peers {
        if let Some(tx) = links.peers.get(id) {
            let up = inbound.clone();
            tokio::spawn(writer(cfg.clone(), *id, addr.clone(), tx.clone(), up));
        }
    }
    tokio::spawn(accept_loop(cfg, listener, inbound, links.peers.clone()));
}

/// Keep the link to `peer` connected and write what [`Links::send`] could not.
async fn writer(
    cfg: LinkConfig,
    peer: PlexId,
    addr: String,
    tx: Arc<PeerTx>,
    inbound: Arc<dyn Inbound>,
) {
    loop {
        let stream = match dial(&cfg, &addr).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::debug!(peer, %addr, "replication link: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    _ = tx.redial.notified() => {}
                }
                continue;
            }
        };
        tracing::info!(peer, %addr, "replication link up");
        {
            let mut st = lock(&tx.state);
            st.clear();
            st.stream = Some(stream.clone());
        }
        // Without the buffer's lock: the receiver may send right away.
        inbound.link_up(peer);
        let err = loop {
            // Take the queue out and write it without the lock: senders keep appending
            // meanwhile, and `writing` keeps them from writing ahead of it.
            let batch = lock(&tx.state).take();
            let Some(batch) = batch else {
                tx.wake.notified().await;
                continue;
            };
            let written: usize = batch.iter().map(Bytes::len).sum();
            if let Err(e) = write_all(&stream, batch).await {
                break e;
            }
            let mut st = lock(&tx.state);
            st.queued = st.queued.saturating_sub(written);
        };
        tracing::warn!(peer, %addr, "replication link down: {err}");
        let mut st = lock(&tx.state);
        st.stream = None;
        st.clear();
    }
}

/// Drop the first `n` bytes of `chunks` (written), and any chunk left empty at the front;
/// returns how many of `n` lay beyond them.
fn drop_written(chunks: &mut VecDeque<Bytes>, mut n: usize) -> usize {
    while let Some(c) = chunks.front_mut() {
        if n < c.len() {
            c.advance(n);
            return 0;
        }
        n -= c.len();
        chunks.pop_front();
    }
    n
}

/// One non-blocking vectored write of `chunks`, then `tail` once every chunk is in it (at
/// most [`IOVECS_MAX`] buffers); returns the bytes written. Writing none is an error.
fn try_write(stream: &TcpStream, chunks: &VecDeque<Bytes>, tail: &[u8]) -> std::io::Result<usize> {
    let mut iov: Vec<IoSlice<'_>> = chunks
        .iter()
        .take(IOVECS_MAX - 1)
        .map(|c| IoSlice::new(c))
        .collect();
    if chunks.len() < IOVECS_MAX {
        iov.push(IoSlice::new(tail));
    }
    match stream.try_write_vectored(&iov)? {
        0 => Err(std::io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// Write `bufs` in order, waiting for the socket as needed.
async fn write_all(stream: &TcpStream, mut bufs: VecDeque<Bytes>) -> std::io::Result<()> {
    while !bufs.is_empty() {
        match try_write(stream, &bufs, &[]) {
            Ok(n) => {
                drop_written(&mut bufs, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

async fn accept_loop(
    cfg: LinkConfig,
    listener: TcpListener,
    inbound: Arc<dyn Inbound>,
    peers: Arc<HashMap<PlexId, Arc<PeerTx>>>,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication accept: {e}");
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        if inbound.closed() {
            return;
        }
        let cfg = cfg.clone();
        let inbound = inbound.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_peer(&cfg, stream, &inbound, &peers).await {
                tracing::info!(%from, "replication connection closed: {e}");
            }
        });
    }
}

async fn serve_peer(
    cfg: &LinkConfig,
    mut s: TcpStream,
    inbound: &Arc<dyn Inbound>,
    peers: &HashMap<PlexId, Arc<PeerTx>>,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let peer = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor_handshake(cfg, &mut s))
        .await
        .map_err(|_| bad("handshake timed out"))??;
    let conn = Arc::new(RxConn {
        stream: s,
        peer,
        buf: tokio::sync::Mutex::new(BytesMut::with_capacity(RX_BUFFER_BYTES)),
    });
    let tx = peers.get(&peer);
    if let Some(tx) = tx {
        // A writer between two dials (it is not waiting otherwise) dials now; a stored
        // permit makes its next wait return at once, which costs one early dial at most.
        tx.redial.notify_one();
        *lock(&tx.rx) = Some(conn.clone());
    }
    let result = receive(&conn, inbound, cfg.op_spin).await;
    if let Some(tx) = tx {
        let mut rx = lock(&tx.rx);
        if rx.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
            *rx = None;
        }
    }
    result
}

/// The reader task of one accepted connection: deliver what arrives until it closes. A
/// sender waiting for a reply may receive on the connection meanwhile
/// ([`Links::poll_received`]); the buffer's lock keeps frames whole and in order. After an
/// op, the reader polls for the next one for up to `op_spin` while ops lately came within
/// that of each other (module doc).
async fn receive(
    conn: &RxConn,
    inbound: &Arc<dyn Inbound>,
    op_spin: Duration,
) -> std::io::Result<()> {
    let gaps = RecentWaits::default();
    // Since when the reader waits for the peer's next op (the socket ran dry after one);
    // never set when `op_spin` is zero.
    let mut awaiting_op: Option<Instant> = None;
    let mut polling = false;
    loop {
        let mut buf = conn.buf.lock().await;
        let read_at = Instant::now();
        // Tokio sees the socket readable only when its driver runs; a polling reader reads
        // the kernel's socket itself (see `Read`).
        let read = if polling { Read::Direct } else { Read::Tokio };
        let pumped = pump(conn, &mut buf, inbound.as_ref(), read)?;
        if pumped.delivered_ops() {
            if let Some(since) = awaiting_op.take() {
                // An idle spell counts as twice the limit, so that polling resumes a few
                // ops into the next burst rather than dozens.
                gaps.record(read_at.saturating_duration_since(since).min(2 * op_spin));
                inbound.op_polled(polling);
            }
        }
        match pumped {
            Pumped::Drained { ops } => {
                drop(buf);
                if ops && !op_spin.is_zero() {
                    awaiting_op = Some(Instant::now());
                }
                polling = awaiting_op.is_some_and(|since| since.elapsed() < op_spin)
                    && gaps.poll_now(op_spin);
                if polling {
                    // Lets a process that shares this CPU run (an initiator, another node
                    // on one machine), then the node's other tasks and its I/O driver.
                    std::thread::yield_now();
                    tokio::task::yield_now().await;
                } else {
                    conn.stream.readable().await?;
                }
            }
            Pumped::Huge { frame, at, .. } => {
                polling = false;
                let m = read_huge_frame(&conn.stream, &mut buf, frame, at, conn.peer).await?;
                if inbound.closed() {
                    return Ok(());
                }
                inbound.deliver(conn.peer, vec![m]);
            }
            Pumped::Closed => return Ok(()),
        }
    }
}

/// One accepted connection's receiving side.
struct RxConn {
    stream: TcpStream,
    peer: PlexId,
    /// Bytes read and not yet decoded. Whoever holds it reads the socket and delivers.
    buf: tokio::sync::Mutex<BytesMut>,
}

/// How [`pump`] reads the socket.
#[derive(Clone, Copy)]
enum Read {
    /// Through tokio, which clears the socket's readiness when it runs dry: for the reader
    /// task, which then waits for it.
    Tokio,
    /// Straight from the kernel. Tokio answers a read with "would block" until its driver
    /// has seen the socket readable, which it cannot while this thread spins; the extra
    /// wake-up of the reader task this leaves behind comes after the reply, not before.
    /// Tokio's stale readiness is cleared at the reader's next `Tokio` read.
    Direct,
}

/// One non-blocking `recv` into `buf`'s spare capacity.
fn recv_now(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most `spare.len()` bytes into the spare capacity, and
    // exactly the `n` it reports are then marked initialised.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: see above.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// How [`pump`] stopped; `ops`: it delivered an op ([`Message::carries_op`]).
enum Pumped {
    /// The socket has nothing more now.
    Drained { ops: bool },
    /// A resync copy's frame of `frame` bytes starts the buffer, not all of it read: it is
    /// to be received into a huge buffer at `at` (the reader task's job).
    Huge { frame: usize, at: usize, ops: bool },
    /// The receiver is gone.
    Closed,
}

impl Pumped {
    fn delivered_ops(&self) -> bool {
        match self {
            Pumped::Drained { ops } | Pumped::Huge { ops, .. } => *ops,
            Pumped::Closed => false,
        }
    }
}

/// Deliver every whole frame in `buf`, read what the socket has (never blocking), and
/// repeat until it has nothing more or a resync copy is to be received whole.
fn pump(
    conn: &RxConn,
    buf: &mut BytesMut,
    inbound: &dyn Inbound,
    read: Read,
) -> std::io::Result<Pumped> {
    let mut ops = false;
    loop {
        let mut msgs = Vec::new();
        let mut huge = None;
        loop {
            if let Some((frame, at)) = msg::huge_copy_frame(buf) {
                if buf.len() < frame {
                    huge = Some((frame, at));
                    break;
                }
            }
            match msg::decode(buf) {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => break,
                Err(e) => return Err(bad(&format!("peer {} sent a bad frame: {e}", conn.peer))),
            }
        }
        if inbound.closed() {
            return Ok(Pumped::Closed);
        }
        if !msgs.is_empty() {
            ops |= msgs.iter().any(Message::carries_op);
            inbound.deliver(conn.peer, msgs);
        }
        if let Some((frame, at)) = huge {
            return Ok(Pumped::Huge { frame, at, ops });
        }
        if buf.capacity() - buf.len() < RX_READ_BYTES_MIN {
            buf.reserve(RX_BUFFER_BYTES);
        }
        let got = match read {
            Read::Tokio => conn.stream.try_read_buf(buf),
            Read::Direct => recv_now(&conn.stream, buf),
        };
        match got {
            Ok(0) => return Err(bad("peer closed the connection")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Ok(Pumped::Drained { ops })
            }
            Err(e) => return Err(e),
        }
    }
}

/// A received frame in a [`HugeBuf`]: `len` bytes at `at`.
struct HugeFrame {
    buf: HugeBuf,
    at: usize,
    len: usize,
}

impl AsRef<[u8]> for HugeFrame {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_slice()[self.at..self.at + self.len]
    }
}

/// Receive the `frame`-byte frame that `buf` starts with into a [`HugeBuf`] at `at` (what
/// `buf` holds of it first, then straight from the socket, never past the frame's end) and
/// decode it. The buffer goes back to its pool when the last slice of the frame is dropped.
async fn read_huge_frame(
    s: &TcpStream,
    buf: &mut BytesMut,
    frame: usize,
    at: usize,
    peer: PlexId,
) -> std::io::Result<Message> {
    let mut hb = HugeBuf::take()?;
    let have = buf.len().min(frame);
    let Some(dst) = hb.as_mut_slice().get_mut(at..at + frame) else {
        return Err(bad("frame does not fit a huge buffer"));
    };
    dst[..have].copy_from_slice(&buf[..have]);
    buf.advance(have);
    let mut filled = have;
    while filled < frame {
        match s.try_read(&mut dst[filled..]) {
            Ok(0) => return Err(bad("peer closed the connection")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s.readable().await?,
            Err(e) => return Err(e),
        }
    }
    let bytes = Bytes::from_owner(HugeFrame {
        buf: hb,
        at,
        len: frame,
    });
    msg::decode_frame(bytes).map_err(|e| bad(&format!("peer {peer} sent a bad frame: {e}")))
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

    use std::sync::atomic::{AtomicU64, Ordering};

    fn cfg(me: PlexId, peers: Vec<(PlexId, String)>, secret: &[u8]) -> LinkConfig {
        LinkConfig {
            me,
            volume: "vol1".into(),
            secret: Arc::new(secret.to_vec()),
            peers,
            op_spin: Duration::ZERO,
        }
    }

    type Received = tokio::sync::mpsc::UnboundedReceiver<(PlexId, Message)>;

    /// Ops a reader waited for: received while polling, and after sleeping.
    #[derive(Default)]
    struct Polls {
        polled: AtomicU64,
        slept: AtomicU64,
    }

    impl Polls {
        fn get(&self) -> (u64, u64) {
            let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
            (n(&self.polled), n(&self.slept))
        }
    }

    struct Sink {
        tx: tokio::sync::mpsc::UnboundedSender<(PlexId, Message)>,
        polls: Arc<Polls>,
    }

    impl Inbound for Sink {
        fn deliver(&self, from: PlexId, msgs: Vec<Message>) {
            for m in msgs {
                let _ = self.tx.send((from, m));
            }
        }

        fn op_polled(&self, polled: bool) {
            let p = &self.polls;
            let c = if polled { &p.polled } else { &p.slept };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sink() -> (Arc<dyn Inbound>, Received) {
        let (s, rx, _) = sink_counting();
        (s, rx)
    }

    fn sink_counting() -> (Arc<dyn Inbound>, Received, Arc<Polls>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let polls = Arc::new(Polls::default());
        let s = Sink {
            tx,
            polls: polls.clone(),
        };
        (Arc::new(s), rx, polls)
    }

    async fn pair(secret_b: &[u8]) -> (Links, Received, Received) {
        let p = pair_of(secret_b).await;
        (p.a, p.ra, p.rb)
    }

    /// Node 1 (`a`) and node 2 (`b`), with what each received, node 2's sink and the ops
    /// node 2 waited for.
    struct Pair {
        a: Links,
        b: Links,
        ra: Received,
        rb: Received,
        tb: Arc<dyn Inbound>,
        polls_b: Arc<Polls>,
    }

    async fn pair_of(secret_b: &[u8]) -> Pair {
        pair_polling(secret_b, Duration::ZERO).await
    }

    /// As [`pair_of`], node 2 polling `op_spin_b` for node 1's next op.
    async fn pair_polling(secret_b: &[u8], op_spin_b: Duration) -> Pair {
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let (ta, ra) = sink();
        let (tb, rb, polls_b) = sink_counting();
        let ca = cfg(1, vec![(2, ab.to_string())], b"secret-0123456789");
        let a = Links::new(&ca);
        start(ca, &a, la, ta);
        let cb = LinkConfig {
            op_spin: op_spin_b,
            ..cfg(2, vec![(1, aa.to_string())], secret_b)
        };
        let b = Links::new(&cb);
        start(cb, &b, lb, tb.clone());
        Pair {
            a,
            b,
            ra,
            rb,
            tb,
            polls_b,
        }
    }

    /// Resend `m` until it arrives (the link comes up asynchronously, as the engine copes).
    async fn first_through(a: &Links, rb: &mut Received, m: Message) -> (PlexId, Message) {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                a.send(2, m.clone());
                if let Ok(Some(got)) =
                    tokio::time::timeout(Duration::from_millis(100), rb.recv()).await
                {
                    return got;
                }
            }
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn messages_flow_between_authenticated_peers() {
        let (a, _ra, mut rb) = pair(b"secret-0123456789").await;
        let hb = Message::Resend { epoch: 3, from: 9 };
        assert_eq!(first_through(&a, &mut rb, hb.clone()).await, (1, hb));
    }

    /// Small frames written inline and big ones the socket only takes in part (the writer
    /// task finishes those) arrive whole and in the order sent; the big copies arrive in
    /// huge buffers (`read_huge_frame`), page-aligned, while the small frames around them
    /// go through the ordinary receive buffer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_small_and_large_frames_arrives_in_order() {
        burst(false).await;
    }

    /// The same while another thread keeps receiving on the connection as well (as a
    /// sender waiting for its acks does): every frame arrives once, whole, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_arrives_in_order_while_a_waiting_sender_receives_too() {
        burst(true).await;
    }

    async fn burst(poll_beside: bool) {
        let Pair {
            a, b, mut rb, tb, ..
        } = pair_of(b"secret-0123456789").await;
        first_through(&a, &mut rb, Message::Resend { epoch: 0, from: 0 }).await;
        while tokio::time::timeout(Duration::from_millis(200), rb.recv())
            .await
            .is_ok()
        {}
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = poll_beside.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut polls = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    b.poll_received(tb.as_ref());
                    polls += 1;
                }
                polls
            })
        });
        let n = 200u64;
        for i in 0..n {
            let m = if i % 10 == 0 {
                Message::CopyData {
                    epoch: 1,
                    seq: i,
                    data: bytes::Bytes::from(vec![i as u8; 1 << 20]),
                }
            } else {
                Message::Resend { epoch: 1, from: i }
            };
            a.send(2, m);
        }
        for i in 0..n {
            let (from, m) = tokio::time::timeout(Duration::from_secs(10), rb.recv())
                .await
                .expect("the burst stalled")
                .expect("sink open");
            assert_eq!(from, 1);
            match m {
                Message::CopyData { seq, data, .. } => {
                    assert_eq!(seq, i);
                    assert!(data.len() == 1 << 20 && data.iter().all(|&b| b == i as u8));
                    if !poll_beside {
                        // Received into a huge buffer, ready for a direct write as it is
                        // (a poller may have read a copy whole into the ordinary buffer).
                        assert!(
                            crate::store::hugebuf::holds(&data),
                            "copy {i} in a huge buffer"
                        );
                        assert_eq!(data.as_ptr() as usize % msg::COPY_DATA_ALIGN, 0);
                    }
                }
                Message::Resend { from, .. } => assert_eq!(from, i),
                other => panic!("unexpected {other:?}"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(p) = poller {
            assert!(p.join().unwrap() > 0);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(200), rb.recv())
                .await
                .is_err(),
            "a frame arrived twice"
        );
    }

    /// A sender waiting for its ack receives it on its own thread: the reader task cannot
    /// run here (one thread, never yielded to), so only `poll_received` can deliver it. It
    /// reads the socket itself: tokio would answer "would block" until its driver, which
    /// runs on this same thread, has seen the socket readable.
    #[tokio::test]
    async fn a_waiting_sender_receives_its_reply_on_its_own_thread() {
        let Pair { a, b, mut rb, .. } = pair_of(b"secret-0123456789").await;
        first_through(&a, &mut rb, Message::Resend { epoch: 0, from: 0 }).await;
        let (probe, mut got) = sink();
        let reply = Message::Resend { epoch: 7, from: 42 };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut received = None;
        while received.is_none() && std::time::Instant::now() < deadline {
            a.send(2, reply.clone());
            for _ in 0..1000 {
                b.poll_received(probe.as_ref());
                if let Ok(m) = got.try_recv() {
                    received = Some(m);
                    break;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        assert_eq!(received, Some((1, reply)));
    }

    /// While ops come closer together than `op_spin`, the receiving reader polls for the
    /// next one and each arrives while it polls, whole and in order; once they come further
    /// apart, the reader sleeps for them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_polls_for_the_next_op_while_ops_come_close_together() {
        let spin = Duration::from_millis(20);
        let Pair {
            a, mut rb, polls_b, ..
        } = pair_polling(b"secret-0123456789", spin).await;
        first_through(&a, &mut rb, Message::Resend { epoch: 0, from: 0 }).await;
        let op = |fwd| Message::Forward {
            epoch: 1,
            fwd,
            floor: 0,
            meta: msg::OpMeta {
                range: msg::OpRange::Barrier,
                payload: Bytes::from(vec![fwd as u8; 4096]),
            },
        };
        let mut send_apart = async |ops: std::ops::Range<u64>, gap: Duration| {
            for i in ops {
                a.send(2, op(i));
                let got = tokio::time::timeout(Duration::from_secs(5), rb.recv()).await;
                assert_eq!(got.ok().flatten(), Some((1, op(i))));
                tokio::time::sleep(gap).await;
            }
        };
        let close = 50;
        send_apart(0..close, Duration::from_millis(2)).await;
        let (polled, slept) = polls_b.get();
        assert_eq!(
            polled + slept,
            close - 1,
            "every op after the first was waited for"
        );
        assert!(
            polled >= close - 3,
            "{polled} of {} ops 2 ms apart arrived while the reader polled",
            close - 1
        );
        let far = 8;
        send_apart(close..close + far, 3 * spin).await;
        let (_, slept_far) = polls_b.get();
        assert!(
            slept_far - slept >= far - 1,
            "{} of {} ops {:?} apart arrived while the reader slept",
            slept_far - slept,
            far - 1,
            3 * spin
        );
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
