//! Tokio driver: TCP accept loop and one task per connection around the sans-IO
//! [`Connection`]. The only module of the transport that touches sockets, the clock or
//! spawns tasks.
//!
//! ```text
//!  accept ──> connection task ── read_buf ──> pdu::decode ──> Connection::handle_pdu
//!                 │  Event::Execute ──spawn──> ScsiTarget::execute ──completion chan──┐
//!                 │  <──────────────────────── Connection::command_complete <─────────┘
//!                 └─ poll_transmit ──> encode ──> writer task (batched writes, TCP_NODELAY)
//! ```
//! Each connection fails alone: an error ends that connection's task and nothing else.
//! Session reinstatement (same initiator port logging in again) stops the old
//! connection and waits for its `nexus_removed` before announcing the new nexus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::pdu;
use super::session::{Connection, Event};
use super::{IscsiError, TargetConfig};
use crate::scsi::{NexusId, ScsiResponse, ScsiTarget, TmfResponse};

/// Read buffer size per connection (grown on demand up to one PDU).
const READ_BUF_BYTES: usize = 256 * 1024;
/// Encoded batches queued for the writer task per connection.
const WRITE_QUEUE_BATCHES: usize = 64;
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
                let (cfg, target, registry, shutdown) = (cfg.clone(), target.clone(), registry.clone(), shutdown.clone());
                conns.spawn(async move {
                    if let Err(e) = run_connection(stream, cfg, target, registry, shutdown).await {
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

async fn writer(mut w: tokio::net::tcp::OwnedWriteHalf, mut rx: mpsc::Receiver<BytesMut>) {
    while let Some(mut first) = rx.recv().await {
        // Batch whatever else is queued into one write.
        while let Ok(more) = rx.try_recv() {
            first.extend_from_slice(&more);
            if first.len() >= 1 << 20 {
                break;
            }
        }
        if w.write_all(&first).await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

struct ConnTask {
    conn: Connection,
    target: Arc<dyn ScsiTarget>,
    registry: Arc<Registry>,
    conn_id: u64,
    done_tx: mpsc::UnboundedSender<Completion>,
    out: mpsc::Sender<BytesMut>,
    /// Set once this connection announced its nexus (and so must remove it).
    nexus: Option<NexusId>,
    kill_rx: Option<watch::Receiver<bool>>,
    done_signal: Option<watch::Sender<bool>>,
}

impl ConnTask {
    async fn flush(&mut self) -> Result<(), IscsiError> {
        let mut buf = BytesMut::new();
        while let Some((p, d)) = self.conn.poll_transmit() {
            pdu::encode(&p, d, &mut buf);
        }
        if !buf.is_empty() && self.out.send(buf).await.is_err() {
            return Err(IscsiError::Protocol("peer gone (write failed)".into()));
        }
        Ok(())
    }

    async fn run_events(&mut self) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::LoggedIn { nexus, tsih } => self.logged_in(nexus, tsih).await,
                Event::Execute { nexus, itt, cmd } => {
                    // One task per command: the SCSI target runs them concurrently.
                    let fut = self.target.execute(nexus, cmd);
                    let tx = self.done_tx.clone();
                    tokio::spawn(async move {
                        let r = fut.await;
                        let _ = tx.send(Completion::Cmd(itt, r));
                    });
                }
                Event::TaskManagement {
                    nexus,
                    itt,
                    lun,
                    tmf,
                } => {
                    let fut = self.target.task_management(nexus, lun, tmf);
                    let tx = self.done_tx.clone();
                    tokio::spawn(async move {
                        let r = fut.await;
                        let _ = tx.send(Completion::Tmf(itt, r));
                    });
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
) -> Result<(), IscsiError> {
    stream.set_nodelay(true)?;
    let (mut rd, wr) = stream.into_split();
    let (out_tx, out_rx) = mpsc::channel(WRITE_QUEUE_BATCHES);
    let writer = tokio::spawn(writer(wr, out_rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut challenge = [0u8; super::chap::CHALLENGE_LEN];
    rand::Rng::fill(&mut rand::thread_rng(), &mut challenge[..]);
    let conn = Connection::new(
        cfg,
        registry.tsih(),
        rand::random(),
        challenge,
        Instant::now().into_std(),
    );
    let conn_id = registry.next_conn.fetch_add(1, Ordering::Relaxed);
    let mut t = ConnTask {
        conn,
        target,
        registry,
        conn_id,
        done_tx,
        out: out_tx,
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
            t.flush().await?;
            if t.conn.wants_close() {
                return Ok(());
            }
            let deadline = t.conn.poll_timeout().map(Instant::from_std);
            let mut kill = t.kill_rx.clone();
            tokio::select! {
                r = rd.read_buf(&mut buf), if !draining => {
                    if r? == 0 {
                        // The initiator closed the connection (after logout or not).
                        return Ok(());
                    }
                }
                Some(c) = done_rx.recv() => t.complete(c),
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
            match done_rx.recv().await {
                Some(c) => t.complete(c),
                None => break,
            }
        }
    })
    .await;
    let _ = t.flush().await;
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
    let _ = writer.await;
    result
}
