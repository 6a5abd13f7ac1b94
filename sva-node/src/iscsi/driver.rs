//! Tokio driver: TCP accept loop and one task per connection around the sans-IO
//! [`Connection`]. The only module of the transport that touches sockets, the clock or
//! spawns tasks.
//!
//! ```text
//!  accept ──> connection task ── try_read ──> pdu::decode ──> Connection::handle_pdu
//!                 │  Event::Execute ──> ScsiTarget::execute future ──> in-flight set ──┐
//!                 │  <──────────────────────── Connection::command_complete <──────────┘
//!                 └─ poll_transmit ──> Outbox ──> try_write_vectored (TCP_NODELAY)
//! ```
//! One task owns the socket and the command futures: a command's completion wakes the
//! connection task directly and its response is written by that same task, with no
//! channel or task hop in between (each hop is a cross-thread wakeup, which dominated
//! latency at queue depth 1). Writes never block reading: what the socket does not take
//! stays in the [`Outbox`] and is sent when the socket is writable, while reading
//! continues up to [`OUTBOX_BYTES_MAX`] of backlog. Large data segments (Data-In) go to
//! the socket straight from the LU's buffer (vectored writes), not copied.
//!
//! Each connection fails alone: an error ends that connection's task and nothing else.
//! Session reinstatement (same initiator port logging in again) stops the old
//! connection and waits for its `nexus_removed` before announcing the new nexus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::budget::WriteBudget;
use super::pdu::{self, Digests, Pdu};
use super::session::{Connection, Event};
use super::{IscsiError, TargetConfig};
use crate::scsi::{NexusId, ScsiResponse, ScsiTarget, TmfResponse};

/// Read buffer size per connection (grown on demand up to one PDU).
const READ_BUF_BYTES: usize = 256 * 1024;
/// Free space below which the read buffer is grown before the next read.
const READ_SPACE_MIN: usize = 16 * 1024;
/// Encoded output a connection may hold for a slow reader; above it, it stops reading
/// (and so stops taking new commands) until the socket drains.
pub const OUTBOX_BYTES_MAX: usize = 8 << 20;
/// Data segments at least this long are written from their own buffer; shorter ones are
/// copied next to their header (one copy is cheaper than another iovec).
const ZERO_COPY_MIN: usize = 16 * 1024;
/// Buffers handed to one `writev` (well below IOV_MAX, 1024 on Linux).
const IOVECS_MAX: usize = 64;
/// How long a closing connection waits for its in-flight SCSI commands.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reinstating login waits for the old session to go away.
const REINSTATE_TIMEOUT: Duration = Duration::from_secs(10);

enum Completion {
    Cmd(u32, ScsiResponse),
    Tmf(u32, TmfResponse),
}

struct SessionHandle {
    conn_id: u64,
    kill: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// Sessions by initiator port, for reinstatement (RFC 7143 §6.3.5), and the TSIH counter.
#[derive(Default)]
struct Registry {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_tsih: AtomicU16,
    next_conn: AtomicU64,
}

impl Registry {
    fn tsih(&self) -> u16 {
        loop {
            let t = self
                .next_tsih
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1);
            if t != 0 {
                return t;
            }
        }
    }
}

/// Serve iSCSI on `listener` until `shutdown` becomes true; then stop accepting, let
/// every connection finish its in-flight commands, and return.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<TargetConfig>,
    target: Arc<dyn ScsiTarget>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IscsiError> {
    let registry = Arc::new(Registry::default());
    let budget = WriteBudget::new(cfg.limits.write_buffer_bytes_max);
    let mut conns = JoinSet::new();
    tracing::info!(addr = ?listener.local_addr().ok(), iqn = %cfg.iqn, "iSCSI target listening");
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                while conns.try_join_next().is_some() {}
                if conns.len() >= cfg.limits.connections_max {
                    tracing::warn!(%peer, "connection limit reached; refusing");
                    continue;
                }
                let (cfg, target, registry, shutdown, budget) = (cfg.clone(), target.clone(), registry.clone(), shutdown.clone(), budget.clone());
                conns.spawn(async move {
                    if let Err(e) = run_connection(stream, cfg, target, registry, shutdown, budget).await {
                        tracing::info!(%peer, error = %e, "connection ended");
                    }
                });
            }
            _ = shutdown.changed() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    tracing::info!("iSCSI target stopped");
    Ok(())
}

/// Encoded PDUs waiting for the socket, in order.
#[derive(Default)]
struct Outbox {
    /// Sealed parts, written front to back.
    chunks: VecDeque<Bytes>,
    /// Small parts being packed together (headers, short data); sealed before writing.
    staging: BytesMut,
    /// Bytes in `chunks` and `staging`.
    len: usize,
}

impl Outbox {
    fn push(&mut self, p: &Pdu, d: Digests) {
        let before = self.staging.len();
        if p.data.len() < ZERO_COPY_MIN {
            pdu::encode(p, d, &mut self.staging);
        } else {
            pdu::encode_header(p, d, &mut self.staging);
            self.len += self.staging.len() - before;
            self.seal();
            self.chunks.push_back(p.data.clone());
            self.len += p.data.len();
            let before = self.staging.len();
            pdu::encode_trailer(p, d, &mut self.staging);
            self.len += self.staging.len() - before;
            return;
        }
        self.len += self.staging.len() - before;
    }

    fn seal(&mut self) {
        if !self.staging.is_empty() {
            self.chunks.push_back(self.staging.split().freeze());
        }
    }

    /// Write as much as the socket takes without blocking. `Ok(true)`: all sent.
    fn write_some(&mut self, s: &TcpStream) -> std::io::Result<bool> {
        self.seal();
        while !self.chunks.is_empty() {
            let iov: Vec<IoSlice<'_>> = self
                .chunks
                .iter()
                .take(IOVECS_MAX)
                .map(|c| IoSlice::new(c))
                .collect();
            let mut n = match s.try_write_vectored(&iov) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.len -= n;
            while n > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if n >= front.len() {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Ok(true)
    }

    /// Write everything, waiting for the socket as needed.
    async fn write_all(&mut self, s: &TcpStream) -> std::io::Result<()> {
        while !self.write_some(s)? {
            s.writable().await?;
        }
        Ok(())
    }
}

/// Read what the socket has into `buf`. `Ok(Some(0))`: the peer closed; `Ok(None)`: a
/// spurious wakeup, nothing to read. A read shorter than the free space emptied the socket,
/// so the socket's readiness is cleared at once (as tokio's own `poll_read` does) instead of
/// by one more `recvfrom` answering EAGAIN before the next wait — a system call per
/// command at queue depth 1.
fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<Option<usize>> {
    let space = buf.capacity() - buf.len();
    let mut got = 0;
    let r = stream.try_io(tokio::io::Interest::READABLE, || {
        got = stream.try_read_buf(buf)?;
        if got > 0 && got < space {
            // Not an error: tells tokio the socket is drained (readiness cleared).
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(got)
    });
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok((got > 0).then_some(got)),
        Err(e) => Err(e),
    }
}

/// A command or task management function handed to the SCSI target, resolving to its
/// result; polled by the connection task.
type InFlight = BoxFuture<'static, Completion>;

struct ConnTask {
    conn: Connection,
    target: Arc<dyn ScsiTarget>,
    registry: Arc<Registry>,
    conn_id: u64,
    inflight: FuturesUnordered<InFlight>,
    outbox: Outbox,
    /// Set once this connection announced its nexus (and so must remove it).
    nexus: Option<NexusId>,
    kill_rx: Option<watch::Receiver<bool>>,
    done_signal: Option<watch::Sender<bool>>,
}

impl ConnTask {
    /// Move the connection's output into the outbox.
    fn collect_output(&mut self) {
        while let Some((p, d)) = self.conn.poll_transmit() {
            self.outbox.push(&p, d);
        }
    }

    async fn run_events(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::LoggedIn { nexus, tsih } => self.logged_in(nexus, tsih).await,
                Event::Execute { nexus, itt, cmd } => {
                    // The SCSI target runs commands concurrently; their futures live in
                    // this task so that a completion wakes it directly.
                    let fut = self.target.execute(nexus, cmd);
                    self.inflight
                        .push(Box::pin(fut.map(move |r| Completion::Cmd(itt, r))));
                }
                Event::TaskManagement {
                    nexus,
                    itt,
                    lun,
                    tmf,
                } => {
                    let fut = self.target.task_management(nexus, lun, tmf);
                    self.inflight
                        .push(Box::pin(fut.map(move |r| Completion::Tmf(itt, r))));
                }
            }
        }
    }

    async fn logged_in(&mut self, nexus: NexusId, tsih: u16) {
        let (kill_tx, kill_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let old = {
            let mut s = self
                .registry
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            s.insert(
                nexus.initiator_port.clone(),
                SessionHandle {
                    conn_id: self.conn_id,
                    kill: kill_tx,
                    done: done_rx,
                },
            )
        };
        if let Some(mut old) = old {
            // RFC 7143 §6.3.5: a login with the ISID of an existing session and TSIH 0
            // reinstates it; the old one is closed first.
            tracing::info!(initiator = %nexus.initiator_port, "session reinstatement");
            let _ = old.kill.send(true);
            let _ = tokio::time::timeout(REINSTATE_TIMEOUT, old.done.wait_for(|d| *d)).await;
        }
        tracing::debug!(initiator = %nexus.initiator_port, tsih, "nexus added");
        self.target.nexus_added(nexus.clone());
        self.nexus = Some(nexus);
        self.kill_rx = Some(kill_rx);
        self.done_signal = Some(done_tx);
    }

    fn complete(&mut self, c: Completion) {
        match c {
            Completion::Cmd(itt, r) => self.conn.command_complete(itt, r),
            Completion::Tmf(itt, r) => self.conn.tmf_complete(itt, r),
        }
    }
}

async fn run_connection(
    stream: TcpStream,
    cfg: Arc<TargetConfig>,
    target: Arc<dyn ScsiTarget>,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
    budget: Arc<WriteBudget>,
) -> Result<(), IscsiError> {
    stream.set_nodelay(true)?;
    let mut challenge = [0u8; super::chap::CHALLENGE_LEN];
    rand::Rng::fill(&mut rand::thread_rng(), &mut challenge[..]);
    let mut conn = Connection::new(
        cfg,
        registry.tsih(),
        rand::random(),
        challenge,
        Instant::now().into_std(),
    );
    conn.set_write_budget(budget.clone());
    let mut budget_released = budget.subscribe();
    let conn_id = registry.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut t = ConnTask {
        conn,
        target,
        registry,
        conn_id,
        inflight: FuturesUnordered::new(),
        outbox: Outbox::default(),
        nexus: None,
        kill_rx: None,
        done_signal: None,
    };
    let mut buf = BytesMut::with_capacity(READ_BUF_BYTES);
    let mut draining = *shutdown.borrow();
    if draining {
        t.conn.begin_shutdown();
    }
    let result: Result<(), IscsiError> = async {
        loop {
            // Parse everything buffered, then act on what it produced.
            loop {
                let now = Instant::now().into_std();
                match pdu::decode(&mut buf, t.conn.digests(), t.conn.max_recv_data_segment_len()) {
                    Ok(Some(p)) => t.conn.handle_pdu(p, now),
                    Ok(None) => break,
                    Err(e) => {
                        t.conn.handle_decode_error(e);
                        if t.conn.wants_close() {
                            break;
                        }
                    }
                }
                t.run_events().await;
                if t.conn.wants_close() {
                    break;
                }
            }
            t.run_events().await;
            t.collect_output();
            if t.conn.wants_close() {
                // The output (a Logout Response, a Reject) is written below.
                return Ok(());
            }
            let sent = t.outbox.write_some(&stream)?;
            // Backpressure: a peer that does not read its responses gets no new commands.
            let may_read = !draining && t.outbox.len < OUTBOX_BYTES_MAX;
            let deadline = t.conn.poll_timeout().map(Instant::from_std);
            let mut kill = t.kill_rx.clone();
            tokio::select! {
                r = stream.readable(), if may_read => {
                    r?;
                    if buf.capacity() - buf.len() < READ_SPACE_MIN {
                        buf.reserve(READ_BUF_BYTES);
                    }
                    match read_some(&stream, &mut buf) {
                        // The initiator closed the connection (after logout or not).
                        Ok(Some(0)) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                r = stream.writable(), if !sent => r?,
                // Another command gave back write budget: send the R2Ts that waited for it.
                r = budget_released.changed(), if t.conn.awaiting_write_budget() => {
                    if r.is_ok() {
                        t.conn.retry_write_budget();
                    }
                }
                Some(c) = t.inflight.next(), if !t.inflight.is_empty() => {
                    t.complete(c);
                    // Whatever else has finished goes out in the same write.
                    while let Some(Some(c)) = t.inflight.next().now_or_never() {
                        t.complete(c);
                    }
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    t.conn.handle_timeout(Instant::now().into_std());
                }
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    t.conn.begin_shutdown();
                }
                _ = async { match kill.as_mut() { Some(k) => { let _ = k.wait_for(|x| *x).await; } None => std::future::pending().await } } => {
                    return Err(IscsiError::Protocol("session reinstated by a new login".into()));
                }
            }
        }
    }
    .await;

    // Let in-flight commands finish before the nexus goes away (their responses are
    // sent if the socket still works).
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while t.conn.executing() > 0 {
            match t.inflight.next().await {
                Some(c) => t.complete(c),
                None => break,
            }
        }
        t.collect_output();
        let _ = t.outbox.write_all(&stream).await;
    })
    .await;
    if let Some(nexus) = t.nexus.take() {
        t.target.nexus_removed(nexus.clone());
        let mut s = t
            .registry
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if s.get(&nexus.initiator_port)
            .is_some_and(|h| h.conn_id == t.conn_id)
        {
            s.remove(&nexus.initiator_port);
        }
    }
    if let Some(d) = t.done_signal.take() {
        let _ = d.send(true);
    }
    drop(t);
    // Orderly close (FIN after everything written); errors do not matter any more.
    let mut stream = stream;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
    result
}
