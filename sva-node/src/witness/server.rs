//! The standalone witness server behind `sva-node witness --listen ADDR --data DIR`.
//!
//! ```text
//!  accept ──> connection task: handshake (wire.rs) ──> loop { Request ──> volume slot ──> Response }
//!                                                                 │ tokio Mutex per volume
//!                                                                 └─> decide_cas ─> store::persist ─> answer
//! ```
//!
//! One mutex per volume serializes CASes on that volume (so they are linearizable) while
//! different volumes proceed in parallel. A CAS is answered only after its record is durable.
//! Any bad frame, failed handshake or I/O error closes that connection only; the server never
//! panics on input. Shutdown stops accepting, lets each connection finish the request it is
//! serving, and returns.

use super::wire::{
    self, check_secret, read_frame, validate_volume_name, write_frame, Auth, AuthOutcome,
    FrameError, Hello, Request, Response, PROTOCOL_VERSION,
};
use super::{decide_cas, store, Membership, WitnessError};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;

/// Concurrent connections; more are closed at once (each node keeps one per volume it serves).
pub const CONNECTIONS_MAX: usize = 1024;
/// Volumes one witness keeps records for.
pub const VOLUMES_MAX: usize = 10_000;
/// Time a peer has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// An authenticated connection idle this long is closed (the client reconnects on demand).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// State of one volume, guarded by its own mutex.
#[derive(Default)]
struct Slot {
    record: Option<Membership>,
    /// A persist failed after the rename may or may not have reached the disk: memory and disk
    /// may disagree, so refuse this volume until a restart reloads it from disk.
    poisoned: bool,
}

struct Shared {
    dir: PathBuf,
    secret: Vec<u8>,
    volumes: StdMutex<HashMap<String, Arc<Mutex<Slot>>>>,
}

/// `sva-node witness --listen ADDR --data DIR`: binds `listen` and serves until SIGINT or
/// SIGTERM. The secret comes from [`wire::load_secret`].
pub async fn run(listen: &str, data_dir: PathBuf, secret: Vec<u8>) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    serve(listener, data_dir, secret, shutdown_signal()).await
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and systemd send).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves the witness protocol on `listener`, keeping records under `data_dir`, until
/// `shutdown` completes. Fails at once if the secret is shorter than `wire::SECRET_LEN_MIN`
/// or a record under `data_dir` cannot be loaded.
pub async fn serve(
    listener: TcpListener,
    data_dir: PathBuf,
    secret: Vec<u8>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    check_secret(&secret)?;
    let dir = data_dir.clone();
    let records = tokio::task::spawn_blocking(move || store::load_all(&dir))
        .await
        .map_err(io::Error::other)??;
    tracing::info!(
        dir = %data_dir.display(),
        volumes = records.len(),
        addr = ?listener.local_addr().ok(),
        "witness serving"
    );
    let volumes = records
        .into_iter()
        .map(|(v, r)| {
            let slot = Slot {
                record: Some(r),
                poisoned: false,
            };
            (v, Arc::new(Mutex::new(slot)))
        })
        .collect();
    let shared = Arc::new(Shared {
        dir: data_dir,
        secret,
        volumes: StdMutex::new(volumes),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Per-connection accept errors (EMFILE, aborted handshakes): keep going.
                        tracing::warn!(error = %e, "witness accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "witness connection limit reached; closing");
                    continue;
                };
                let shared = shared.clone();
                let stop = stop_rx.clone();
                conns.spawn(async move {
                    if let Err(e) = connection(stream, &shared, stop).await {
                        tracing::debug!(%peer, error = %e, "witness connection closed");
                    }
                    drop(permit);
                });
            }
            // Reap finished connection tasks so the set stays bounded by live connections.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    tracing::info!("witness stopped");
    Ok(())
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("bad handshake: {0}")]
    BadHandshake(&'static str),
    #[error("authentication failed")]
    Refused,
}

async fn connection(
    mut stream: TcpStream,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    tokio::select! {
        _ = stop.wait_for(|s| *s) => return Ok(()),
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &shared.secret)) => {
            r.map_err(|_| ConnError::HandshakeTimeout)??
        }
    }
    loop {
        let req: Request = tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            r = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut stream)) => match r {
                Err(_) => return Ok(()),
                Ok(Err(FrameError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Ok(r) => r?,
            },
        };
        // Not raced with `stop`: the request completes (and is answered) once started.
        let resp = handle(shared, req).await;
        write_frame(&mut stream, &resp).await?;
    }
}

async fn handshake(stream: &mut TcpStream, secret: &[u8]) -> Result<(), ConnError> {
    let server_nonce = wire::nonce();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        nonce: hex::encode(server_nonce),
    };
    write_frame(stream, &hello).await?;
    let auth: Auth = read_frame(stream).await?;
    let client_nonce =
        wire::decode_nonce(&auth.client_nonce).ok_or(ConnError::BadHandshake("client nonce"))?;
    let mac = hex::decode(&auth.mac).map_err(|_| ConnError::BadHandshake("mac"))?;
    if !wire::verify_client_mac(secret, &server_nonce, &client_nonce, &mac) {
        let _ = write_frame(stream, &AuthOutcome::Refused).await;
        return Err(ConnError::Refused);
    }
    let mac = wire::server_mac(secret, &server_nonce, &client_nonce);
    write_frame(
        stream,
        &AuthOutcome::Welcome {
            mac: hex::encode(mac),
        },
    )
    .await?;
    Ok(())
}

fn lock_map(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Mutex<Slot>>>> {
    // Only inserts happen under this lock, so a poisoned map is still consistent.
    shared.volumes.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers one request.
async fn handle(shared: &Shared, req: Request) -> Response {
    match req {
        Request::Get { volume } => {
            if let Err(message) = validate_volume_name(&volume) {
                return Response::Invalid { message };
            }
            let slot = lock_map(shared).get(&volume).cloned();
            let Some(slot) = slot else {
                return Response::Record { record: None };
            };
            // Taking the volume's lock orders this read after any CAS in progress.
            let slot = slot.lock().await;
            if slot.poisoned {
                return poisoned(&volume);
            }
            Response::Record {
                record: slot.record.clone(),
            }
        }
        Request::Cas {
            volume,
            expected_epoch,
            record,
        } => cas(shared, volume, expected_epoch, record).await,
    }
}

async fn cas(
    shared: &Shared,
    volume: String,
    expected_epoch: Option<u64>,
    record: Membership,
) -> Response {
    if let Err(message) = validate_volume_name(&volume) {
        return Response::Invalid { message };
    }
    let slot = {
        let mut map = lock_map(shared);
        if let Some(slot) = map.get(&volume) {
            slot.clone()
        } else if map.len() >= VOLUMES_MAX {
            return Response::Failed {
                message: format!("witness holds {VOLUMES_MAX} volumes already"),
            };
        } else {
            map.entry(volume.clone()).or_default().clone()
        }
    };
    let mut slot = slot.lock().await;
    if slot.poisoned {
        return poisoned(&volume);
    }
    match decide_cas(slot.record.as_ref(), expected_epoch, &record) {
        Ok(()) => {}
        Err(WitnessError::Conflict(current)) => return Response::Conflict { current: *current },
        Err(e) => {
            return Response::Invalid {
                message: e.to_string(),
            }
        }
    }
    let dir = shared.dir.clone();
    let (v, r) = (volume.clone(), record.clone());
    let persisted = tokio::task::spawn_blocking(move || store::persist(&dir, &v, &r))
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
    match persisted {
        Ok(()) => {
            tracing::info!(%volume, epoch = record.epoch, sequencer = record.sequencer, "witness CAS");
            slot.record = Some(record.clone());
            Response::Record {
                record: Some(record),
            }
        }
        Err(e) => {
            tracing::error!(%volume, error = %e, "witness could not persist a record");
            slot.poisoned = true;
            Response::Failed {
                message: format!("persisting the record failed: {e}"),
            }
        }
    }
}

fn poisoned(volume: &str) -> Response {
    Response::Failed {
        message: format!(
            "record of {volume} is in doubt after a storage failure; restart the witness"
        ),
    }
}
