//! Text key=value parsing and operational parameter negotiation (RFC 7143 §6, §13).
//!
//! [`parse_text`] splits a data segment of `key=value\0` pairs under named limits.
//! [`Negotiator`] answers each operational key the initiator offers and records the
//! outcome in [`SessionParams`]. Login-only keys (InitiatorName, AuthMethod, CHAP_*)
//! belong to `login.rs` / `chap.rs`.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};

/// Most key=value pairs accepted in one (possibly continued) text/login request.
pub const TEXT_PAIRS_MAX: usize = 256;
/// Longest key name (RFC 7143 §6.1: at most 63 bytes).
pub const KEY_LEN_MAX: usize = 63;
/// Longest value (RFC 7143 §6.1: 8192 bytes unless a key says otherwise).
pub const VALUE_LEN_MAX: usize = 8192;

/// Malformed text; reported as a login failure 02/00 or a Reject (protocol error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegoError {
    #[error("text pair without '=': {0:?}")]
    Malformed(String),
    #[error("more than {TEXT_PAIRS_MAX} text pairs")]
    TooManyPairs,
    #[error("key longer than {KEY_LEN_MAX} bytes")]
    KeyTooLong,
    #[error("value of {0} longer than {VALUE_LEN_MAX} bytes")]
    ValueTooLong(String),
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("key {0} offered twice")]
    Duplicate(String),
}

/// Parse `key=value\0key=value\0...`. Empty strings between NULs (padding) are skipped.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, NegoError> {
    let mut out = Vec::new();
    for item in data.split(|b| *b == 0) {
        if item.is_empty() {
            continue;
        }
        if out.len() == TEXT_PAIRS_MAX {
            return Err(NegoError::TooManyPairs);
        }
        let s = std::str::from_utf8(item).map_err(|_| NegoError::NotUtf8)?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| NegoError::Malformed(s.chars().take(64).collect()))?;
        if k.is_empty() {
            return Err(NegoError::Malformed(s.chars().take(64).collect()));
        }
        if k.len() > KEY_LEN_MAX {
            return Err(NegoError::KeyTooLong);
        }
        if v.len() > VALUE_LEN_MAX {
            return Err(NegoError::ValueTooLong(k.to_string()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encode pairs as `key=value\0...`.
pub fn encode_text(pairs: &[(String, String)]) -> Bytes {
    let mut b = BytesMut::new();
    for (k, v) in pairs {
        b.put_slice(k.as_bytes());
        b.put_u8(b'=');
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.freeze()
}

/// Negotiated session and connection parameters. Defaults are RFC 7143 §13 defaults,
/// except where noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// The initiator's declared MaxRecvDataSegmentLength: the most we may put in one PDU.
    pub initiator_max_recv_dsl: u32,
    /// Our declared MaxRecvDataSegmentLength: the most the initiator may send us.
    pub target_max_recv_dsl: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            initiator_max_recv_dsl: 8192,
            target_max_recv_dsl: 8192,
            max_burst_len: 262_144,
            first_burst_len: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// What the target is willing to do: the values it answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOffer {
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_dsl: u32,
    pub max_burst_len: u32,
    pub first_burst_len: u32,
    pub max_outstanding_r2t: u32,
    /// Whether we accept unsolicited Data-Out (InitialR2T=No).
    pub allow_unsolicited: bool,
    pub allow_immediate_data: bool,
}

impl Default for TargetOffer {
    fn default() -> Self {
        TargetOffer {
            max_recv_dsl: 262_144,
            max_burst_len: 1 << 20,
            first_burst_len: 262_144,
            max_outstanding_r2t: 16,
            allow_unsolicited: true,
            allow_immediate_data: true,
        }
    }
}

/// Negotiates operational keys over the login (or text) exchange.
#[derive(Debug)]
pub struct Negotiator {
    pub params: SessionParams,
    offer: TargetOffer,
    seen: HashSet<String>,
    declared_mrdsl: bool,
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}
fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}
fn num(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u64 = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        v.parse().ok()?
    };
    let n = u32::try_from(n).ok()?;
    (lo..=hi).contains(&n).then_some(n)
}

/// Keys that belong to the login exchange; [`Negotiator::negotiate`] does not answer them.
pub fn is_login_key(key: &str) -> bool {
    matches!(
        key,
        "InitiatorName"
            | "InitiatorAlias"
            | "TargetName"
            | "SessionType"
            | "AuthMethod"
            | "TargetAlias"
            | "TargetAddress"
            | "TargetPortalGroupTag"
    ) || key.starts_with("CHAP_")
}

impl Negotiator {
    pub fn new(offer: TargetOffer) -> Negotiator {
        let params = SessionParams {
            target_max_recv_dsl: offer.max_recv_dsl,
            ..SessionParams::default()
        };
        Negotiator {
            params,
            offer,
            seen: HashSet::new(),
            declared_mrdsl: false,
        }
    }

    /// Answer one offered key (RFC 7143 §6.2 and §13). Returns the reply pair, or None
    /// when no reply is due (a declaration). Duplicate offers are an error.
    pub fn negotiate(
        &mut self,
        key: &str,
        value: &str,
    ) -> Result<Option<(String, String)>, NegoError> {
        if !self.seen.insert(key.to_string()) && !key.starts_with("X-") {
            return Err(NegoError::Duplicate(key.to_string()));
        }
        let p = &mut self.params;
        let reply = |v: String| Ok(Some((key.to_string(), v)));
        let reject = || Ok(Some((key.to_string(), "Reject".to_string())));
        match key {
            "HeaderDigest" | "DataDigest" => {
                // List; first choice of the initiator we support (§13.1).
                let pick = value.split(',').find(|x| *x == "CRC32C" || *x == "None");
                match pick {
                    Some(c) => {
                        let on = c == "CRC32C";
                        if key == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        reply(c.to_string())
                    }
                    None => reject(),
                }
            }
            "MaxConnections" => match num(value, 1, 65535) {
                // We run one connection per session.
                Some(_) => {
                    p.max_connections = 1;
                    reply("1".into())
                }
                None => reject(),
            },
            "InitialR2T" => match yes_no(value) {
                // Result is OR (§13.10).
                Some(v) => {
                    p.initial_r2t = v || !self.offer.allow_unsolicited;
                    reply(yn(p.initial_r2t))
                }
                None => reject(),
            },
            "ImmediateData" => match yes_no(value) {
                // Result is AND (§13.11).
                Some(v) => {
                    p.immediate_data = v && self.offer.allow_immediate_data;
                    reply(yn(p.immediate_data))
                }
                None => reject(),
            },
            "MaxRecvDataSegmentLength" => match num(value, 512, 16_777_215) {
                // Declarative (§13.12): theirs limits what we send; we declare ours.
                Some(v) => {
                    p.initiator_max_recv_dsl = v;
                    self.declared_mrdsl = true;
                    reply(self.offer.max_recv_dsl.to_string())
                }
                None => reject(),
            },
            "MaxBurstLength" => match num(value, 512, 16_777_215) {
                Some(v) => {
                    p.max_burst_len = v.min(self.offer.max_burst_len);
                    p.first_burst_len = p.first_burst_len.min(p.max_burst_len);
                    reply(p.max_burst_len.to_string())
                }
                None => reject(),
            },
            "FirstBurstLength" => match num(value, 512, 16_777_215) {
                Some(v) => {
                    p.first_burst_len = v.min(self.offer.first_burst_len).min(p.max_burst_len);
                    reply(p.first_burst_len.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Wait" => match num(value, 0, 3600) {
                // Result is max (§13.15); we need no wait beyond the initiator's.
                Some(v) => {
                    p.default_time2wait = v;
                    reply(v.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Retain" => match num(value, 0, 3600) {
                // Result is min; with ErrorRecoveryLevel 0 nothing is retained.
                Some(_) => {
                    p.default_time2retain = 0;
                    reply("0".into())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match num(value, 1, 65535) {
                Some(v) => {
                    p.max_outstanding_r2t = v.min(self.offer.max_outstanding_r2t);
                    reply(p.max_outstanding_r2t.to_string())
                }
                None => reject(),
            },
            "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no(value) {
                // Result is OR; we want in-order delivery.
                Some(_) => {
                    if key == "DataPDUInOrder" {
                        p.data_pdu_in_order = true;
                    } else {
                        p.data_sequence_in_order = true;
                    }
                    reply("Yes".into())
                }
                None => reject(),
            },
            "ErrorRecoveryLevel" => match num(value, 0, 2) {
                // Result is min; we implement level 0 only.
                Some(_) => {
                    p.error_recovery_level = 0;
                    reply("0".into())
                }
                None => reject(),
            },
            "IFMarker" | "OFMarker" => match yes_no(value) {
                Some(_) => reply("No".into()),
                None => reject(),
            },
            "IFMarkInt" | "OFMarkInt" => reply("Irrelevant".into()),
            // Declarative keys that need no answer.
            "InitiatorAlias" => Ok(None),
            _ => reply("NotUnderstood".into()),
        }
    }

    /// Pairs the target must add to its final operational reply: its own
    /// MaxRecvDataSegmentLength if not yet declared (§13.12: declared by both sides).
    pub fn closing_declarations(&mut self) -> Vec<(String, String)> {
        if self.declared_mrdsl {
            return Vec::new();
        }
        self.declared_mrdsl = true;
        vec![(
            "MaxRecvDataSegmentLength".to_string(),
            self.offer.max_recv_dsl.to_string(),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_rejects_text() {
        assert_eq!(
            parse_text(b"A=1\0B=x=y\0\0").unwrap(),
            pairs(&[("A", "1"), ("B", "x=y")])
        );
        assert!(matches!(
            parse_text(b"novalue\0"),
            Err(NegoError::Malformed(_))
        ));
        assert!(matches!(parse_text(b"=v\0"), Err(NegoError::Malformed(_))));
        let long = format!("{}=1\0", "k".repeat(64));
        assert_eq!(parse_text(long.as_bytes()), Err(NegoError::KeyTooLong));
        let many = "a=1\0".repeat(TEXT_PAIRS_MAX + 1);
        assert_eq!(parse_text(many.as_bytes()), Err(NegoError::TooManyPairs));
    }

    #[test]
    fn negotiates_like_libiscsi_offers() {
        let mut n = Negotiator::new(TargetOffer::default());
        let offers = [
            ("HeaderDigest", "None,CRC32C", "None"),
            ("DataDigest", "CRC32C,None", "CRC32C"),
            ("InitialR2T", "No", "No"),
            ("ImmediateData", "Yes", "Yes"),
            ("MaxBurstLength", "16776192", "1048576"),
            ("FirstBurstLength", "16776192", "262144"),
            ("MaxRecvDataSegmentLength", "65536", "262144"),
            ("MaxOutstandingR2T", "1", "1"),
            ("ErrorRecoveryLevel", "2", "0"),
            ("MaxConnections", "8", "1"),
            ("IFMarker", "Yes", "No"),
            ("X-com.example.Foo", "1", "NotUnderstood"),
            ("Frobnicate", "1", "NotUnderstood"),
            ("DefaultTime2Wait", "abc", "Reject"),
        ];
        for (k, v, want) in offers {
            let got = n.negotiate(k, v).unwrap();
            assert_eq!(got, Some((k.to_string(), want.to_string())), "{k}");
        }
        assert!(!n.params.header_digest && n.params.data_digest);
        assert!(!n.params.initial_r2t);
        assert_eq!(n.params.initiator_max_recv_dsl, 65536);
        assert_eq!(n.params.max_burst_len, 1 << 20);
        assert_eq!(n.params.first_burst_len, 262_144);
        assert!(n.closing_declarations().is_empty());
        assert_eq!(
            n.negotiate("InitialR2T", "Yes"),
            Err(NegoError::Duplicate("InitialR2T".into()))
        );
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let mut n = Negotiator::new(TargetOffer::default());
        n.negotiate("FirstBurstLength", "262144").unwrap();
        n.negotiate("MaxBurstLength", "65536").unwrap();
        assert_eq!(n.params.first_burst_len, 65536);
        assert_eq!(
            n.closing_declarations(),
            pairs(&[("MaxRecvDataSegmentLength", "262144")])
        );
    }

    proptest! {
        #[test]
        fn text_round_trip(kv in proptest::collection::vec(("[A-Za-z][A-Za-z0-9.-]{0,20}", "[ -~]{0,40}"), 0..20)) {
            let p: Vec<(String, String)> = kv;
            prop_assert_eq!(parse_text(&encode_text(&p)).unwrap(), p);
        }
    }
}
