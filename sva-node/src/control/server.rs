//! The control API's HTTP/1.1 server: routes ([`router`]) and a bounded accept loop ([`serve`]).
//!
//! | endpoint | auth | answer |
//! |---|---|---|
//! | `GET /healthz` | none | 200 `ok`, or 503 `not serving: <reason>` |
//! | `GET /metrics` | none | Prometheus text format 0.0.4 |
//! | `GET /v1/status` | none | JSON [`NodeStatus`] + `sessions` + `counters` |
//! | `POST /v1/resync-rate` | bearer | body `{"bytesPerSec": N}` → 200 `{"bytesPerSec": N}` |
//! | `POST /v1/verify` | bearer | body `{"repair": bool}` (or empty) → 202 `{"started": true, "repair": bool}`; 409 if refused (repair: plexes differing from the sequencer are resynced, README "Resync and verify") |
//!
//! Reads are open (probes and Prometheus carry no secrets); every `POST` needs
//! `Authorization: Bearer <token>` (DESIGN.md §9), compared in constant time. Errors are
//! JSON `{"error": "..."}` with the status of [`ControlError::http_status`].
//!
//! Routing is axum's; connections are driven by hyper directly so every resource is bounded:
//! [`CONNECTIONS_MAX`], [`HEADER_READ_TIMEOUT`], [`HEADER_BYTES_MAX`], [`REQUEST_BODY_BYTES_MAX`],
//! [`REQUEST_TIMEOUT`], and shutdown waits at most [`SHUTDOWN_GRACE`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::metrics::{Metrics, OpClass, OpCounters, CONTENT_TYPE};
use super::status::{NodeStatus, StatusSource, RESYNC_BYTES_PER_SEC_MAX};
use super::ControlError;

/// Most concurrent connections; further clients wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 64;
/// A client must send a request's complete header within this time (also bounds idle
/// keep-alive connections waiting for their next request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer of a connection, which bounds a request head (hyper's minimum is 8 KiB).
pub const HEADER_BYTES_MAX: usize = 16 * 1024;
/// Largest request body; the API's bodies are a few bytes of JSON.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// A request (body read and handler) must complete within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, in-flight requests get this long to finish before connections are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ControlState {
    pub metrics: Arc<Metrics>,
    pub status: Arc<dyn StatusSource>,
    /// API token for mutating endpoints; `None` disables them (403).
    pub token: Option<String>,
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        let mut resp = (status, body).into_response();
        if matches!(self, ControlError::Unauthorized) {
            // RFC 6750 §3: a 401 names the scheme the client must use.
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sva-node\""),
            );
        }
        resp
    }
}

/// The routes, with body-size and time limits. [`serve`] drives it; tests may too.
pub fn router(state: ControlState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/resync-rate", post(resync_rate))
        .route("/v1/verify", post(verify))
        .fallback(|| async { ControlError::NotFound })
        .layer(middleware::from_fn(request_timeout))
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .with_state(state)
}

async fn request_timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ControlError::Timeout.into_response(),
    }
}

async fn healthz(State(s): State<ControlState>) -> Response {
    match s.status.health() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not serving: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<ControlState>) -> Response {
    let mut resp = Response::new(Body::from(s.metrics.render()));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// I/O counters by op class, for `/v1/status`.
#[derive(Serialize)]
struct Counters {
    read: OpCounters,
    write: OpCounters,
    other: OpCounters,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusDoc {
    #[serde(flatten)]
    node: NodeStatus,
    sessions: u64,
    counters: Counters,
}

async fn status(State(s): State<ControlState>) -> Json<StatusDoc> {
    let m = &s.metrics;
    Json(StatusDoc {
        node: s.status.status(),
        sessions: m.sessions(),
        counters: Counters {
            read: m.counters(OpClass::Read),
            write: m.counters(OpClass::Write),
            other: m.counters(OpClass::Other),
        },
    })
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ResyncRate {
    bytes_per_sec: u64,
}

async fn resync_rate(
    State(s): State<ControlState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ResyncRate>, ControlError> {
    authorize(&s, &headers)?;
    let req: ResyncRate = parse_json(&body)?;
    if req.bytes_per_sec == 0 || req.bytes_per_sec > RESYNC_BYTES_PER_SEC_MAX {
        return Err(ControlError::BadRequest(format!(
            "bytesPerSec must be between 1 and {RESYNC_BYTES_PER_SEC_MAX}, got {}",
            req.bytes_per_sec
        )));
    }
    s.status.set_resync_rate(req.bytes_per_sec)?;
    Ok(Json(req))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VerifyRequest {
    #[serde(default)]
    repair: bool,
}

/// Start an online verify (DESIGN.md §6): 202 once the engine accepted it; progress shows in
/// `/v1/status` `verify`. 409 when it refuses (not the sequencer, one already runs).
async fn verify(
    State(s): State<ControlState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ControlError> {
    authorize(&s, &headers)?;
    let req: VerifyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        VerifyRequest::default()
    } else {
        parse_json(&body)?
    };
    s.status.start_verify(req.repair)?;
    let body = Json(serde_json::json!({ "started": true, "repair": req.repair }));
    Ok((StatusCode::ACCEPTED, body).into_response())
}

/// Parse a JSON body regardless of its Content-Type (so `curl -d` works), with serde's
/// message (field, line, column) as the 400 text.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body)
        .map_err(|e| ControlError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Check `Authorization: Bearer <token>` against the node's token.
fn authorize(s: &ControlState, headers: &HeaderMap) -> Result<(), ControlError> {
    let Some(expected) = s.token.as_deref() else {
        return Err(ControlError::MutationsDisabled);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            // RFC 9110 §11.1: the auth scheme is case-insensitive.
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim_start())
        })
        .ok_or(ControlError::Unauthorized)?;
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ControlError::Unauthorized)
    }
}

/// Equality whose time depends only on the longer input's length, never on where the
/// inputs first differ, so the token cannot be guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // Keep the optimiser from turning the loop into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Serve the control API on `listener` until `shutdown` completes, then stop accepting,
/// let in-flight requests finish (at most [`SHUTDOWN_GRACE`]) and return.
///
/// Accept errors (a reset before accept, running out of file descriptors) are logged and
/// retried, never fatal: the control API must outlive a transient resource shortage.
pub async fn serve(
    listener: TcpListener,
    state: ControlState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "control API listening");
    }
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "control API accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(HEADER_BYTES_MAX);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            // Drop the watch guard at once: it is not Send. A dropped sender also means stop.
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await.map(|_| ());
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped => {
                    // Finish the request in flight, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "control API connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("control API: connections still open after the grace period; dropping them");
        conns.abort_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b""));
        // A prefix padded with NULs must not match (length is part of the comparison).
        assert!(!constant_time_eq(b"ab\0", b"ab"));
    }
}
