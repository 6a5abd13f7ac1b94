//! Wire format of the standalone witness (`sva-node witness`), shared by server and client.
//!
//! Every message is one frame: a 4-byte big-endian length, then that many bytes of JSON
//! (`1 ..= FRAME_LEN_MAX`). One connection carries one request at a time:
//!
//! ```text
//!  client                                   server
//!    <── Hello { version, nonce: Ns } ──────   (random 32 bytes)
//!    ─── Auth { clientNonce: Nc,              HMAC-SHA256(secret, "sva-witness client" ‖ Ns ‖ Nc)
//!               mac: Mc } ─────────────────>  checked in constant time
//!    <── Welcome { mac: Ms } | Refused ─────  Ms = HMAC-SHA256(secret, "sva-witness server" ‖ Ns ‖ Nc)
//!    ─── Request (Get | Cas) ──────────────>
//!    <── Response (Record | Conflict | Invalid | Failed)
//!    ...
//! ```
//!
//! Both sides prove knowledge of the shared secret over fresh nonces (DESIGN.md §9: an
//! unauthenticated witness port would let anyone move a volume's epoch). The two MACs carry
//! different labels so one side's proof can never be reflected as the other's.

use super::Membership;
use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use std::io;
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version sent in `Hello`; a client refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame body in bytes. A membership record is a few hundred bytes; this bounds what
/// an unauthenticated peer can make the server buffer.
pub const FRAME_LEN_MAX: usize = 64 * 1024;
/// Length of each side's nonce in bytes.
pub const NONCE_LEN: usize = 32;
/// Shortest accepted shared secret in bytes (128 bits).
pub const SECRET_LEN_MIN: usize = 16;
/// Longest volume name (fits a Kubernetes object name with the Lease suffix).
pub const VOLUME_NAME_LEN_MAX: usize = 200;

const CLIENT_LABEL: &[u8] = b"sva-witness client";
const SERVER_LABEL: &[u8] = b"sva-witness server";

/// Server → client, first frame of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
    /// Hex of `NONCE_LEN` random bytes.
    pub nonce: String,
}

/// Client → server: the client's proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Auth {
    pub client_nonce: String,
    pub mac: String,
}

/// Server → client: outcome of authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum AuthOutcome {
    /// Accepted; `mac` is the server's proof.
    Welcome { mac: String },
    /// Wrong secret; the server closes the connection.
    Refused,
}

/// Client → server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    Get {
        volume: String,
    },
    #[serde(rename_all = "camelCase")]
    Cas {
        volume: String,
        expected_epoch: Option<u64>,
        record: Membership,
    },
}

/// Server → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Response {
    /// `Get`: the record (or none); `Cas`: the installed record.
    Record { record: Option<Membership> },
    /// The CAS lost; nothing changed.
    Conflict { current: Membership },
    /// The request breaks the contract (bad volume name, epoch not moving forward, ...).
    Invalid { message: String },
    /// The witness could not do it (storage failure, too many volumes); nothing is promised.
    Failed { message: String },
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame length {0} outside 1..={FRAME_LEN_MAX}")]
    Length(usize),
    #[error("undecodable frame: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Writes `msg` as one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(msg)?;
    if body.is_empty() || body.len() > FRAME_LEN_MAX {
        return Err(FrameError::Length(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::Length(body.len()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame and decodes it as `T`. The length is checked before anything is buffered.
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; 4];
    r.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > FRAME_LEN_MAX {
        return Err(FrameError::Length(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

/// `Ok(())` if `volume` may name a record: 1..=`VOLUME_NAME_LEN_MAX` of `[a-z0-9-_.]`, not
/// starting with `.` (so it is never `.`/`..` and never collides with a temp file).
pub fn validate_volume_name(volume: &str) -> Result<(), String> {
    if volume.is_empty() || volume.len() > VOLUME_NAME_LEN_MAX {
        return Err(format!(
            "volume name length {} outside 1..={VOLUME_NAME_LEN_MAX}",
            volume.len()
        ));
    }
    if volume.starts_with('.') {
        return Err("volume name must not start with '.'".into());
    }
    if let Some(c) = volume
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
    {
        return Err(format!("volume name contains {c:?}; allowed: [a-z0-9-_.]"));
    }
    Ok(())
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    use rand::RngCore;
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn mac_for(secret: &[u8], label: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    mac.update(server_nonce);
    mac.update(client_nonce);
    mac
}

/// The client's proof over both nonces.
pub fn client_mac(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
    mac_for(secret, CLIENT_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// The server's proof over both nonces.
pub fn server_mac(secret: &[u8], server_nonce: &[u8], client_nonce: &[u8]) -> Vec<u8> {
    mac_for(secret, SERVER_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Constant-time check of the client's proof (`hmac`'s `verify_slice` compares with `subtle`).
pub fn verify_client_mac(
    secret: &[u8],
    server_nonce: &[u8],
    client_nonce: &[u8],
    mac: &[u8],
) -> bool {
    mac_for(secret, CLIENT_LABEL, server_nonce, client_nonce)
        .verify_slice(mac)
        .is_ok()
}

/// Constant-time check of the server's proof.
pub fn verify_server_mac(
    secret: &[u8],
    server_nonce: &[u8],
    client_nonce: &[u8],
    mac: &[u8],
) -> bool {
    mac_for(secret, SERVER_LABEL, server_nonce, client_nonce)
        .verify_slice(mac)
        .is_ok()
}

/// Decodes a hex nonce, requiring exactly `NONCE_LEN` bytes.
pub fn decode_nonce(hex_nonce: &str) -> Option<Vec<u8>> {
    hex::decode(hex_nonce).ok().filter(|n| n.len() == NONCE_LEN)
}

/// Checks a shared secret's length.
pub fn check_secret(secret: &[u8]) -> io::Result<()> {
    if secret.len() < SECRET_LEN_MIN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("witness secret must be at least {SECRET_LEN_MIN} bytes"),
        ));
    }
    Ok(())
}

/// Environment variable holding the shared secret when no secret file is given.
pub const SECRET_ENV: &str = "SVA_WITNESS_SECRET";

/// The shared secret for `sva-node witness` and for a node's `RemoteWitness`: from `file` if
/// given (preferred: a mounted Kubernetes Secret, never visible in `ps` or `/proc/*/environ`),
/// else from the `SVA_WITNESS_SECRET` environment variable. At least `SECRET_LEN_MIN` bytes.
pub fn load_secret(file: Option<&Path>) -> io::Result<Vec<u8>> {
    if let Some(path) = file {
        return read_secret_file(path);
    }
    match std::env::var_os(SECRET_ENV) {
        Some(v) => {
            let secret = v.into_encoded_bytes();
            check_secret(&secret)?;
            Ok(secret)
        }
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no witness secret: give a secret file or set {SECRET_ENV}"),
        )),
    }
}

/// Reads a shared secret from a file (e.g. a mounted Kubernetes Secret): the file's bytes with
/// trailing `\r`/`\n` removed, so `echo $S > file` and `printf %s $S > file` agree.
pub fn read_secret_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut secret = std::fs::read(path)?;
    while matches!(secret.last(), Some(b'\n' | b'\r')) {
        secret.pop();
    }
    check_secret(&secret)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::conformance::record;

    #[tokio::test]
    async fn frames_round_trip() {
        let msgs = vec![
            Request::Get { volume: "v".into() },
            Request::Cas {
                volume: "vol-1".into(),
                expected_epoch: Some(3),
                record: record(4, 2),
            },
            Request::Cas {
                volume: "vol-1".into(),
                expected_epoch: None,
                record: record(1, 1),
            },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_frame(&mut buf, m).await.unwrap();
        }
        let mut rd = &buf[..];
        for m in &msgs {
            let got: Request = read_frame(&mut rd).await.unwrap();
            assert_eq!(&got, m);
        }
        assert!(rd.is_empty());
    }

    #[tokio::test]
    async fn oversized_and_empty_frames_are_refused_before_buffering() {
        let mut big = ((FRAME_LEN_MAX + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(b"{}");
        let r: Result<Request, _> = read_frame(&mut &big[..]).await;
        assert!(matches!(r, Err(FrameError::Length(n)) if n == FRAME_LEN_MAX + 1));
        let r: Result<Request, _> = read_frame(&mut &[0u8, 0, 0, 0][..]).await;
        assert!(matches!(r, Err(FrameError::Length(0))));
        let r: Result<Request, _> = read_frame(&mut &[0u8, 0, 0, 5, b'{'][..]).await;
        assert!(matches!(r, Err(FrameError::Io(_))), "truncated body");
        let mut junk = 3u32.to_be_bytes().to_vec();
        junk.extend_from_slice(b"xyz");
        let r: Result<Request, _> = read_frame(&mut &junk[..]).await;
        assert!(matches!(r, Err(FrameError::Decode(_))));
    }

    #[test]
    fn volume_names() {
        for ok in ["a", "vol-1", "x_y.z", &"a".repeat(VOLUME_NAME_LEN_MAX)] {
            assert_eq!(validate_volume_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../etc",
            "Vol",
            "a b",
            "é",
            "a\0",
            &"a".repeat(VOLUME_NAME_LEN_MAX + 1),
        ] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs_bind_secret_nonces_and_direction() {
        let (s, ns, nc) = (b"0123456789abcdef".as_slice(), nonce(), nonce());
        let m = client_mac(s, &ns, &nc);
        assert!(verify_client_mac(s, &ns, &nc, &m));
        assert!(!verify_client_mac(b"0123456789abcdeX", &ns, &nc, &m));
        assert!(!verify_client_mac(s, &nc, &ns, &m), "nonces are ordered");
        assert!(
            !verify_server_mac(s, &ns, &nc, &m),
            "a client proof is no server proof"
        );
        assert!(!verify_client_mac(s, &ns, &nc, &m[..31]), "truncated MAC");
        assert!(verify_server_mac(s, &ns, &nc, &server_mac(s, &ns, &nc)));
        assert_ne!(ns, nc);
    }

    #[test]
    fn secret_file_trims_newline_and_needs_min_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, b"0123456789abcdef\n").unwrap();
        assert_eq!(read_secret_file(&p).unwrap(), b"0123456789abcdef");
        std::fs::write(&p, b"short\n").unwrap();
        assert!(read_secret_file(&p).is_err());
    }
}
