//! CHAP authentication for iSCSI login (RFC 7143 §12.1.3, RFC 1994), MD5 only (CHAP_A=5).
//!
//! ```text
//!  I: AuthMethod=CHAP,None      T: AuthMethod=CHAP
//!  I: CHAP_A=5                  T: CHAP_A=5 CHAP_I=<id> CHAP_C=0x<challenge>
//!  I: CHAP_N CHAP_R [CHAP_I CHAP_C]   T: [CHAP_N CHAP_R]   (mutual when I sent a challenge)
//! ```
//! The response is `MD5(id || secret || challenge)`. Binary values are `0x` hex or `0b`
//! base64 (RFC 7143 §6.1).

use md5::{Digest, Md5};

/// Length of the challenge we send.
pub const CHALLENGE_LEN: usize = 16;
/// Longest binary value (response or challenge) we accept from the initiator.
pub const BINARY_LEN_MAX: usize = 1024;

/// CHAP credentials of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapConfig {
    /// Name and secret the initiator must authenticate with.
    pub username: String,
    pub secret: String,
    /// For mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual_username: Option<String>,
    pub mutual_secret: Option<String>,
}

/// Why authentication failed (login status 02/01).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChapError {
    #[error("CHAP_A offers no supported algorithm (want 5 = MD5)")]
    NoAlgorithm,
    #[error("missing CHAP key {0}")]
    Missing(&'static str),
    #[error("malformed CHAP value for {0}")]
    Malformed(&'static str),
    #[error("unknown CHAP user")]
    UnknownUser,
    #[error("CHAP response does not match")]
    BadResponse,
    #[error("initiator asked for mutual CHAP but no mutual secret is configured")]
    MutualNotConfigured,
    #[error("initiator reflected our own challenge")]
    ReflectedChallenge,
}

/// Compute the CHAP MD5 response.
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Decode a binary value: `0x`/`0X` hex or `0b`/`0B` base64.
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let out = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_string()
        };
        hex::decode(h).ok()?
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)?
    } else {
        return None;
    };
    (!out.is_empty() && out.len() <= BINARY_LEN_MAX).then_some(out)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Target side of one CHAP exchange.
#[derive(Debug, Clone)]
pub struct ChapTarget {
    id: u8,
    challenge: [u8; CHALLENGE_LEN],
}

impl ChapTarget {
    /// Start an exchange with a fresh identifier and challenge (from the caller's RNG).
    pub fn new(id: u8, challenge: [u8; CHALLENGE_LEN]) -> ChapTarget {
        ChapTarget { id, challenge }
    }

    /// Answer `CHAP_A`: pick MD5 and send identifier and challenge.
    pub fn on_algorithms(&self, chap_a: &str) -> Result<Vec<(String, String)>, ChapError> {
        if !chap_a.split(',').any(|a| a.trim() == "5") {
            return Err(ChapError::NoAlgorithm);
        }
        Ok(vec![
            ("CHAP_A".into(), "5".into()),
            ("CHAP_I".into(), self.id.to_string()),
            (
                "CHAP_C".into(),
                format!("0x{}", hex::encode(self.challenge)),
            ),
        ])
    }

    /// Verify CHAP_N/CHAP_R and, for mutual CHAP (CHAP_I + CHAP_C present), answer the
    /// initiator's challenge.
    pub fn on_response(
        &self,
        cfg: &ChapConfig,
        name: Option<&str>,
        response: Option<&str>,
        their_id: Option<&str>,
        their_challenge: Option<&str>,
    ) -> Result<Vec<(String, String)>, ChapError> {
        let name = name.ok_or(ChapError::Missing("CHAP_N"))?;
        let response = response.ok_or(ChapError::Missing("CHAP_R"))?;
        let response = decode_binary(response).ok_or(ChapError::Malformed("CHAP_R"))?;
        if name != cfg.username {
            return Err(ChapError::UnknownUser);
        }
        let want = chap_md5(self.id, cfg.secret.as_bytes(), &self.challenge);
        if response.as_slice() != want.as_slice() {
            return Err(ChapError::BadResponse);
        }
        match (their_id, their_challenge) {
            (None, None) => Ok(Vec::new()),
            (Some(i), Some(c)) => {
                let id: u8 = i.parse().map_err(|_| ChapError::Malformed("CHAP_I"))?;
                let c = decode_binary(c).ok_or(ChapError::Malformed("CHAP_C"))?;
                // RFC 7143 §12.1.3: a target must not answer its own challenge.
                if c.as_slice() == self.challenge.as_slice() {
                    return Err(ChapError::ReflectedChallenge);
                }
                let (Some(mu), Some(ms)) = (&cfg.mutual_username, &cfg.mutual_secret) else {
                    return Err(ChapError::MutualNotConfigured);
                };
                let r = chap_md5(id, ms.as_bytes(), &c);
                Ok(vec![
                    ("CHAP_N".into(), mu.clone()),
                    ("CHAP_R".into(), format!("0x{}", hex::encode(r))),
                ])
            }
            (None, Some(_)) => Err(ChapError::Missing("CHAP_I")),
            (Some(_), None) => Err(ChapError::Missing("CHAP_C")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ChapConfig {
        ChapConfig {
            username: "user".into(),
            secret: "secretsecret".into(),
            mutual_username: Some("tgt".into()),
            mutual_secret: Some("mutualsecret".into()),
        }
    }

    #[test]
    fn md5_matches_rfc1994_construction() {
        // MD5 of 0x01 || "a" || 0x02, computed independently.
        let r = chap_md5(1, b"a", &[2]);
        let mut h = Md5::new();
        h.update([1u8, b'a', 2]);
        assert_eq!(r.as_slice(), h.finalize().as_slice());
    }

    #[test]
    fn one_way_and_mutual() {
        let t = ChapTarget::new(7, [9; 16]);
        let a = t.on_algorithms("7,5").unwrap();
        assert_eq!(a[0], ("CHAP_A".to_string(), "5".to_string()));
        assert_eq!(t.on_algorithms("7"), Err(ChapError::NoAlgorithm));
        let good = format!("0x{}", hex::encode(chap_md5(7, b"secretsecret", &[9; 16])));
        assert_eq!(
            t.on_response(&cfg(), Some("user"), Some(&good), None, None),
            Ok(vec![])
        );
        assert_eq!(
            t.on_response(&cfg(), Some("user"), Some("0x00112233"), None, None),
            Err(ChapError::BadResponse)
        );
        assert_eq!(
            t.on_response(&cfg(), Some("bob"), Some(&good), None, None),
            Err(ChapError::UnknownUser)
        );
        let m = t
            .on_response(&cfg(), Some("user"), Some(&good), Some("3"), Some("0x0102"))
            .unwrap();
        let want = format!("0x{}", hex::encode(chap_md5(3, b"mutualsecret", &[1, 2])));
        assert_eq!(
            m,
            vec![("CHAP_N".into(), "tgt".into()), ("CHAP_R".into(), want)]
        );
        let own = format!("0x{}", hex::encode([9u8; 16]));
        assert_eq!(
            t.on_response(&cfg(), Some("user"), Some(&good), Some("3"), Some(&own)),
            Err(ChapError::ReflectedChallenge)
        );
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0xA0b1"), Some(vec![0xa0, 0xb1]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary("0x"), None);
    }
}
