//! Opaque cursors: base64 of a small JSON holding a position and the time
//! the cursor was issued, so expiry can be simulated.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};

use crate::dataset::Pos;

#[derive(Serialize, Deserialize)]
struct Change {
    t: Option<i64>,
    id: Option<String>,
    iat: i64,
}

/// Seed 004's cursor: `last_id` and `last_value`, standard base64.
#[derive(Serialize, Deserialize)]
struct Keyset {
    last_id: Option<String>,
    last_value: Option<i64>,
    iat: i64,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A decoded cursor: where it points and when it was issued.
pub struct Decoded {
    pub after: Option<Pos>,
    pub iat_ms: i64,
}

pub fn encode(after: Option<&Pos>) -> String {
    let c = Change {
        t: after.map(|p| p.0),
        id: after.map(|p| p.1.clone()),
        iat: now_ms(),
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap_or_default())
}

pub fn decode(s: &str) -> Option<Decoded> {
    let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()?;
    let c: Change = serde_json::from_slice(&bytes).ok()?;
    let after = match (c.t, c.id) {
        (Some(t), Some(id)) => Some((t, id)),
        _ => None,
    };
    Some(Decoded {
        after,
        iat_ms: c.iat,
    })
}

pub fn encode_keyset(after: Option<&Pos>) -> String {
    let c = Keyset {
        last_id: after.map(|p| p.1.clone()),
        last_value: after.map(|p| p.0),
        iat: now_ms(),
    };
    STANDARD.encode(serde_json::to_vec(&c).unwrap_or_default())
}

pub fn decode_keyset(s: &str) -> Option<Decoded> {
    let bytes = STANDARD.decode(s).ok()?;
    let c: Keyset = serde_json::from_slice(&bytes).ok()?;
    let after = match (c.last_value, c.last_id) {
        (Some(t), Some(id)) => Some((t, id)),
        _ => None,
    };
    Some(Decoded {
        after,
        iat_ms: c.iat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let p = (5, "x".to_string());
        assert_eq!(decode(&encode(Some(&p))).unwrap().after, Some(p.clone()));
        assert_eq!(decode(&encode(None)).unwrap().after, None);
        assert_eq!(
            decode_keyset(&encode_keyset(Some(&p))).unwrap().after,
            Some(p)
        );
        assert!(decode("!!").is_none());
    }
}
