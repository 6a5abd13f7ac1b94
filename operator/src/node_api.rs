//! Client of the sva-node control API (DESIGN.md §7): `GET /v1/status`, the data-plane signal
//! the operator trusts first when deciding whether a plex is lost, and
//! `POST /v1/resync-rate` (bearer token), which applies a volume's `spec.resyncRate` live.
//!
//! A deliberately tiny HTTP/1.1 client over a `TcpStream` (one request, `Connection: close`,
//! bounded response size and time) so the operator does not pull in a second HTTP stack.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest status response accepted; a node's status is a few KiB.
pub const STATUS_RESPONSE_BYTES_MAX: usize = 256 * 1024;
/// Whole-request time limit: an unresponsive node counts as unreachable.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /v1/status` body of one sva-node: sva-node's own type (`sva_node::control::NodeStatus`),
/// so the operator parses exactly what the node serializes. The extra fields the server adds
/// (`sessions`, `counters`) are ignored.
pub type NodeStatusReport = sva_node::control::NodeStatus;
/// One plex as a node sees it in the current membership.
pub type PlexReport = sva_node::control::PlexStatus;
/// Resync counters as the node reports them (all zero when no resync runs).
pub type ResyncReport = sva_node::control::ResyncProgress;

/// Why a status fetch failed (all mean "unreachable" to the planner; kept apart for logs).
#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error("connect/read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("bad response: {0}")]
    BadResponse(String),
}

/// Fetches `GET /v1/status` from `addr` (`host:port`).
pub async fn fetch_status(addr: &str) -> Result<NodeStatusReport, NodeApiError> {
    let raw = request(addr, "GET", "/v1/status", None, None).await?;
    parse_response(&raw)
}

/// Sets the node's resync throttle: `POST /v1/resync-rate` `{"bytesPerSec": N}` with the
/// node's API token; `Ok` once the node answers 200 with the same rate.
pub async fn post_resync_rate(
    addr: &str,
    token: &str,
    bytes_per_sec: u64,
) -> Result<(), NodeApiError> {
    let body = serde_json::json!({ "bytesPerSec": bytes_per_sec }).to_string();
    let raw = request(addr, "POST", "/v1/resync-rate", Some(token), Some(&body)).await?;
    let echoed: serde_json::Value = parse_body(&raw)?;
    if echoed["bytesPerSec"].as_u64() != Some(bytes_per_sec) {
        return Err(NodeApiError::BadResponse(format!("node answered {echoed}")));
    }
    Ok(())
}

/// One request, `Connection: close`, the whole response read within [`STATUS_TIMEOUT`] and
/// [`STATUS_RESPONSE_BYTES_MAX`].
async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<Vec<u8>, NodeApiError> {
    tokio::time::timeout(
        STATUS_TIMEOUT,
        request_inner(addr, method, path, token, body),
    )
    .await
    .map_err(|_| NodeApiError::Timeout)?
}

async fn request_inner(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<Vec<u8>, NodeApiError> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(t) = token {
        request.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    let mut limited = stream.take(STATUS_RESPONSE_BYTES_MAX as u64 + 1);
    limited.read_to_end(&mut raw).await?;
    if raw.len() > STATUS_RESPONSE_BYTES_MAX {
        return Err(NodeApiError::BadResponse("response too large".into()));
    }
    Ok(raw)
}

/// Parses an HTTP/1.1 response carrying a status JSON body (no chunked encoding expected:
/// the node answers with Content-Length and closes).
pub fn parse_response(raw: &[u8]) -> Result<NodeStatusReport, NodeApiError> {
    parse_body(raw)
}

/// The JSON body of a 200 response (no chunked encoding expected: the node answers with
/// Content-Length and closes).
fn parse_body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, NodeApiError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| NodeApiError::BadResponse("no header end".into()))?;
    let head = std::str::from_utf8(raw.get(..split).unwrap_or_default())
        .map_err(|_| NodeApiError::BadResponse("header not UTF-8".into()))?;
    let status_line = head.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(NodeApiError::BadResponse(format!(
            "status line {status_line:?}"
        )));
    }
    let body = raw.get(split + 4..).unwrap_or_default();
    serde_json::from_slice(body).map_err(|e| NodeApiError::BadResponse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sva_node::control::{Metrics, SingleNodeStatus, StatusSource};
    use sva_node::scsi::alua::AluaState;
    use sva_node::witness::PlexState;

    #[test]
    fn parses_status_json_in_http_response() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"node\":\"w1\",\"volume\":\"v\",\"epoch\":4,\"aluaState\":\"ActiveOptimized\",\"plexes\":[{\"id\":1,\"node\":\"w1\",\"portal\":\"10.0.0.1:3260\",\"state\":\"InSync\",\"resync\":{\"doneBytes\":0,\"totalBytes\":0,\"bytesPerSec\":0}},{\"id\":2,\"node\":\"w2\",\"portal\":\"10.0.0.2:3260\",\"state\":\"Resyncing\",\"resync\":{\"doneBytes\":5,\"totalBytes\":10,\"bytesPerSec\":1}}],\"resyncRateLimitBytesPerSec\":null,\"sessions\":2,\"counters\":{}}";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.epoch, 4);
        assert_eq!(r.alua_state, AluaState::ActiveOptimized);
        assert_eq!(r.plexes[1].state, PlexState::Resyncing);
        assert_eq!(r.plexes[1].resync.done_bytes, 5);
    }

    /// What sva-node's real control server answers (its router, its `StatusDoc` with sessions
    /// and counters) parses into the operator's view, field for field.
    #[tokio::test]
    async fn parses_what_the_real_sva_node_control_api_serves() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let source = std::sync::Arc::new(SingleNodeStatus::new(
            "vol-1",
            "vol",
            1,
            "10.0.0.1:32600",
            metrics.clone(),
        ));
        source.set_serving();
        metrics.set_epoch(7);
        metrics.set_alua_state(AluaState::Unavailable);
        let expected = source.status();
        let state = sva_node::control::ControlState {
            metrics,
            status: source,
            token: None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            sva_node::control::serve(listener, state, shutdown).await
        });
        let got = fetch_status(&addr).await.unwrap();
        assert_eq!(got, expected);
        assert_eq!((got.epoch, got.alua_state), (7, AluaState::Unavailable));
    }

    /// The operator's POST reaches sva-node's real control server: refused without the right
    /// token (the limit stays unset), applied with it, and visible in the next `/v1/status`.
    #[tokio::test]
    async fn resync_rate_post_needs_the_token_and_changes_the_reported_limit() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let source = std::sync::Arc::new(SingleNodeStatus::new(
            "vol-1",
            "vol",
            1,
            "10.0.0.1:32600",
            metrics.clone(),
        ));
        source.set_serving();
        let state = sva_node::control::ControlState {
            metrics,
            status: source,
            token: Some("tok-0123456789abcdef".into()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            sva_node::control::serve(listener, state, shutdown).await
        });
        let wrong = post_resync_rate(&addr, "wrong-token", 50 << 20).await;
        assert!(
            matches!(&wrong, Err(NodeApiError::BadResponse(m)) if m.contains("401")),
            "{wrong:?}"
        );
        assert_eq!(
            fetch_status(&addr)
                .await
                .unwrap()
                .resync_rate_limit_bytes_per_sec,
            None
        );
        post_resync_rate(&addr, "tok-0123456789abcdef", 50 << 20)
            .await
            .unwrap();
        assert_eq!(
            fetch_status(&addr)
                .await
                .unwrap()
                .resync_rate_limit_bytes_per_sec,
            Some(50 << 20)
        );
    }

    #[test]
    fn rejects_non_200_and_garbage() {
        assert!(parse_response(b"HTTP/1.1 503 Busy\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
    }
}
