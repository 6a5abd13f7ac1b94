//! Client of the sva-node control API (DESIGN.md §7): `GET /v1/status`, the data-plane signal
//! the operator trusts first when deciding whether a plex is lost.
//!
//! A deliberately tiny HTTP/1.1 client over a `TcpStream` (one request, `Connection: close`,
//! bounded response size and time) so the operator does not pull in a second HTTP stack.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use sva_node::witness::PlexState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest status response accepted; a node's status is a few KiB.
pub const STATUS_RESPONSE_BYTES_MAX: usize = 256 * 1024;
/// Whole-request time limit: an unresponsive node counts as unreachable.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /v1/status` body of one sva-node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatusReport {
    pub node: String,
    pub volume: String,
    pub epoch: u64,
    /// This node's ALUA state, e.g. `ActiveOptimized`, `Unavailable`, `Transitioning`.
    pub alua_state: String,
    pub plexes: Vec<PlexReport>,
}

/// One plex as a node sees it in the current membership.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlexReport {
    pub id: u16,
    pub state: PlexState,
    #[serde(default)]
    pub resync: Option<ResyncReport>,
}

/// Resync counters as the node reports them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResyncReport {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
}

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
    tokio::time::timeout(STATUS_TIMEOUT, fetch_status_inner(addr))
        .await
        .map_err(|_| NodeApiError::Timeout)?
}

async fn fetch_status_inner(addr: &str) -> Result<NodeStatusReport, NodeApiError> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request =
        format!("GET /v1/status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut body = Vec::new();
    let mut limited = stream.take(STATUS_RESPONSE_BYTES_MAX as u64 + 1);
    limited.read_to_end(&mut body).await?;
    if body.len() > STATUS_RESPONSE_BYTES_MAX {
        return Err(NodeApiError::BadResponse("response too large".into()));
    }
    parse_response(&body)
}

/// Parses an HTTP/1.1 response carrying a status JSON body (no chunked encoding expected:
/// the node answers with Content-Length and closes).
pub fn parse_response(raw: &[u8]) -> Result<NodeStatusReport, NodeApiError> {
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

    #[test]
    fn parses_status_json_in_http_response() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"node\":\"w1\",\"volume\":\"v\",\"epoch\":4,\"aluaState\":\"ActiveOptimized\",\"plexes\":[{\"id\":1,\"state\":\"InSync\"},{\"id\":2,\"state\":\"Resyncing\",\"resync\":{\"doneBytes\":5,\"totalBytes\":10,\"bytesPerSec\":1}}]}";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.epoch, 4);
        assert_eq!(r.plexes[1].state, PlexState::Resyncing);
        assert_eq!(r.plexes[1].resync.unwrap().done_bytes, 5);
    }

    #[test]
    fn rejects_non_200_and_garbage() {
        assert!(parse_response(b"HTTP/1.1 503 Busy\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
    }

    #[tokio::test]
    async fn fetch_from_a_local_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            let body =
                r#"{"node":"w2","volume":"v","epoch":1,"aluaState":"Unavailable","plexes":[]}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        let r = fetch_status(&addr).await.unwrap();
        assert_eq!(r.node, "w2");
    }
}
