//! `RemoteWitness`: the [`Witness`] client of the standalone witness server (wire.rs protocol).
//!
//! One authenticated TCP connection is kept and reused; requests on one client are serialized
//! (witness traffic is a few CASes per failover). Every call, connecting and handshake
//! included, is bounded by the client's timeout ([`REQUEST_TIMEOUT`] by default): the mirror
//! engine holds writes while it waits, so a witness that does not answer in time is
//! `Unreachable` and the node fences itself.
//!
//! A CAS that ends `Unreachable` may or may not have been applied. A caller that retries it
//! and gets `Conflict` whose current record equals the one it proposed has in fact won.
//! This client does that itself for its one automatic retry (a reused connection found dead,
//! e.g. after a witness restart).

use super::wire::{
    self, read_frame, validate_volume_name, write_frame, Auth, AuthOutcome, FrameError, Hello,
    Request, Response, PROTOCOL_VERSION,
};
use super::{Membership, Witness, WitnessError};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Default bound on one call (connect + handshake + request + answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Client of a remote `sva-node witness`.
pub struct RemoteWitness {
    addr: String,
    secret: Arc<[u8]>,
    timeout: Duration,
    conn: Mutex<Option<TcpStream>>,
}

impl RemoteWitness {
    /// A client of the witness at `addr` (`host:port`, resolved at each connect) sharing
    /// `secret` with it. Connects lazily.
    pub fn new(addr: impl Into<String>, secret: Vec<u8>) -> Self {
        Self {
            addr: addr.into(),
            secret: secret.into(),
            timeout: REQUEST_TIMEOUT,
            conn: Mutex::new(None),
        }
    }

    /// Replaces the per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `req` and returns the answer and whether it was a retry on a fresh connection.
    async fn call(&self, req: &Request) -> Result<(Response, bool), WitnessError> {
        match tokio::time::timeout(self.timeout, self.call_untimed(req)).await {
            Ok(r) => r,
            Err(_) => Err(WitnessError::Unreachable(format!(
                "witness {} did not answer within {:?}",
                self.addr, self.timeout
            ))),
        }
    }

    async fn call_untimed(&self, req: &Request) -> Result<(Response, bool), WitnessError> {
        let mut guard = self.conn.lock().await;
        // Taken out while in use: if this future is dropped (timeout) mid-request, the stream
        // is dropped with it rather than reused with an answer still in flight.
        if let Some(mut stream) = guard.take() {
            match exchange(&mut stream, req).await {
                Ok(resp) => {
                    *guard = Some(stream);
                    return Ok((resp, false));
                }
                Err(FrameError::Io(e)) => {
                    tracing::debug!(addr = %self.addr, error = %e, "witness connection lost; reconnecting");
                }
                Err(e) => return Err(WitnessError::Protocol(e.to_string())),
            }
            let mut stream = self.connect().await?;
            let resp = exchange(&mut stream, req).await.map_err(frame_err)?;
            *guard = Some(stream);
            return Ok((resp, true));
        }
        let mut stream = self.connect().await?;
        let resp = exchange(&mut stream, req).await.map_err(frame_err)?;
        *guard = Some(stream);
        Ok((resp, false))
    }

    async fn connect(&self) -> Result<TcpStream, WitnessError> {
        let mut stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| WitnessError::Unreachable(format!("connect {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let hello: Hello = read_frame(&mut stream).await.map_err(frame_err)?;
        if hello.version != PROTOCOL_VERSION {
            return Err(WitnessError::Protocol(format!(
                "witness speaks protocol {}, we speak {PROTOCOL_VERSION}",
                hello.version
            )));
        }
        let server_nonce = wire::decode_nonce(&hello.nonce)
            .ok_or_else(|| WitnessError::Protocol("bad server nonce".into()))?;
        let client_nonce = wire::nonce();
        let auth = Auth {
            client_nonce: hex::encode(client_nonce),
            mac: hex::encode(wire::client_mac(&self.secret, &server_nonce, &client_nonce)),
        };
        write_frame(&mut stream, &auth).await.map_err(frame_err)?;
        match read_frame(&mut stream).await {
            Ok(AuthOutcome::Welcome { mac }) => {
                let mac = hex::decode(mac).unwrap_or_default();
                if wire::verify_server_mac(&self.secret, &server_nonce, &client_nonce, &mac) {
                    Ok(stream)
                } else {
                    // Not our witness (or a different secret): trust nothing it says.
                    Err(WitnessError::Unauthorized)
                }
            }
            Ok(AuthOutcome::Refused) => Err(WitnessError::Unauthorized),
            // The server may close right after refusing; an early close here means the same.
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(WitnessError::Unauthorized)
            }
            Err(e) => Err(frame_err(e)),
        }
    }
}

async fn exchange(stream: &mut TcpStream, req: &Request) -> Result<Response, FrameError> {
    write_frame(stream, req).await?;
    read_frame(stream).await
}

fn frame_err(e: FrameError) -> WitnessError {
    match e {
        FrameError::Io(e) => WitnessError::Unreachable(e.to_string()),
        e => WitnessError::Protocol(e.to_string()),
    }
}

fn unexpected(resp: Response) -> WitnessError {
    match resp {
        Response::Invalid { message } => WitnessError::Protocol(message),
        Response::Failed { message } => {
            WitnessError::Unreachable(format!("witness failed: {message}"))
        }
        other => WitnessError::Protocol(format!("unexpected answer {other:?}")),
    }
}

impl Witness for RemoteWitness {
    fn get(&self, volume: &str) -> BoxFuture<'_, Result<Option<Membership>, WitnessError>> {
        let volume = volume.to_string();
        async move {
            validate_volume_name(&volume).map_err(WitnessError::Protocol)?;
            let req = Request::Get { volume };
            match self.call(&req).await?.0 {
                Response::Record { record } => Ok(record),
                other => Err(unexpected(other)),
            }
        }
        .boxed()
    }

    fn cas(
        &self,
        volume: &str,
        expected_epoch: Option<u64>,
        record: Membership,
    ) -> BoxFuture<'_, Result<Membership, WitnessError>> {
        let volume = volume.to_string();
        async move {
            validate_volume_name(&volume).map_err(WitnessError::Protocol)?;
            let req = Request::Cas {
                volume,
                expected_epoch,
                record: record.clone(),
            };
            match self.call(&req).await? {
                (Response::Record { record: Some(r) }, _) => Ok(r),
                // Our first attempt may have been applied before the connection died.
                (Response::Conflict { current }, true) if current == record => Ok(current),
                (Response::Conflict { current }, _) => {
                    Err(WitnessError::Conflict(Box::new(current)))
                }
                (other, _) => Err(unexpected(other)),
            }
        }
        .boxed()
    }
}
