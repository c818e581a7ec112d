//! Record identity: the key and version of a record, and the stable message
//! id that lets a downstream consumer recognise a repeat.
//!
//! message_id = hex(sha256(feed, partition, key, version)) truncated to 32
//! hex digits; for a feed without a version: (feed, partition, page cursor,
//! index in the page), so an update is never mistaken for a duplicate. Each
//! part is length-prefixed so no two tuples hash the same bytes.

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::pagination::extract::PointsPlan;
use crate::pointer::JsonPointer;

/// Why a record's identity could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("record is not valid JSON: {0}")]
    NotJson(String),
    #[error("record has no key at {0}")]
    NoKey(String),
    #[error("record key at {ptr} is {kind}, expected a string or number")]
    BadKey { ptr: String, kind: &'static str },
}

/// A record's key and (optional) version, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key: String,
    pub version: Option<String>,
}

/// Read the key and version of one record.
pub fn identity(
    record: &RawValue,
    key: &JsonPointer,
    version: Option<&JsonPointer>,
) -> Result<Identity, IdentityError> {
    let v: serde_json::Value =
        serde_json::from_str(record.get()).map_err(|e| IdentityError::NotJson(e.to_string()))?;
    let text = |ptr: &JsonPointer| -> Result<Option<String>, IdentityError> {
        match ptr.get(&v) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
            Some(serde_json::Value::Bool(_)) => Err(IdentityError::BadKey {
                ptr: ptr.to_string(),
                kind: "a boolean",
            }),
            Some(serde_json::Value::Array(_)) => Err(IdentityError::BadKey {
                ptr: ptr.to_string(),
                kind: "an array",
            }),
            Some(serde_json::Value::Object(_)) => Err(IdentityError::BadKey {
                ptr: ptr.to_string(),
                kind: "an object",
            }),
        }
    };
    let k = text(key)?.ok_or_else(|| IdentityError::NoKey(key.to_string()))?;
    let version = match version {
        Some(p) => text(p)?,
        None => None,
    };
    Ok(Identity { key: k, version })
}

/// Reads records' keys and versions as [`identity`] does, without building
/// a tree of each record: one borrowed pass per record, guided by a plan of
/// the two pointers built once (a walk keeps one per feed).
#[derive(Clone)]
pub struct IdentityPlan {
    key: JsonPointer,
    version: Option<JsonPointer>,
    plan: PointsPlan,
}

impl IdentityPlan {
    pub fn new(key: JsonPointer, version: Option<JsonPointer>) -> Self {
        let mut ptrs = vec![&key];
        ptrs.extend(version.as_ref());
        let plan = PointsPlan::new(&ptrs);
        IdentityPlan { key, version, plan }
    }

    pub fn key(&self) -> &JsonPointer {
        &self.key
    }

    /// The key and version of one record.
    pub fn read(&self, record: &RawValue) -> Result<Identity, IdentityError> {
        let found = self
            .plan
            .run(record.get())
            .map_err(|e| IdentityError::NotJson(e.to_string()))?;
        let key = raw_text(found.first().copied().flatten(), &self.key)?
            .ok_or_else(|| IdentityError::NoKey(self.key.to_string()))?;
        let version = match &self.version {
            Some(p) => raw_text(found.get(1).copied().flatten(), p)?,
            None => None,
        };
        Ok(Identity { key, version })
    }
}

/// A key or version as text: a string's value, a number as serde_json
/// writes it (what [`identity`] gives), nothing for null or absent.
fn raw_text(raw: Option<&RawValue>, ptr: &JsonPointer) -> Result<Option<String>, IdentityError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let text = raw.get();
    let bad = |kind| IdentityError::BadKey {
        ptr: ptr.to_string(),
        kind,
    };
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(Some)
            .map_err(|e| IdentityError::NotJson(e.to_string())),
        Some(b'n') => Ok(None),
        Some(b't' | b'f') => Err(bad("a boolean")),
        Some(b'[') => Err(bad("an array")),
        Some(b'{') => Err(bad("an object")),
        _ => serde_json::from_str::<serde_json::Number>(text)
            .map(|n| Some(n.to_string()))
            .map_err(|e| IdentityError::NotJson(e.to_string())),
    }
}

fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The message id of one record version.
pub fn record_message_id(feed: &str, partition: &str, key: &str, version: &str) -> String {
    digest(&["r", feed, partition, key, version])
}

/// The message id of a record of a feed without versions: its place in a page.
pub fn positional_message_id(
    feed: &str,
    partition: &str,
    page_cursor: &str,
    index: usize,
) -> String {
    digest(&["p", feed, partition, page_cursor, &index.to_string()])
}

/// The message id of a whole page (per-page delivery).
pub fn page_message_id(feed: &str, partition: &str, page_cursor: &str) -> String {
    digest(&["P", feed, partition, page_cursor])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn reads_key_and_version() {
        let r = raw(r#"{"id": 42, "meta": {"updated_at": "2024-01-01T00:00:00Z"}}"#);
        let id = identity(
            &r,
            &"/id".parse().unwrap(),
            Some(&"/meta/updated_at".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(
            id,
            Identity {
                key: "42".into(),
                version: Some("2024-01-01T00:00:00Z".into())
            }
        );
        assert!(matches!(
            identity(&r, &"/nope".parse().unwrap(), None),
            Err(IdentityError::NoKey(_))
        ));
        assert!(matches!(
            identity(&r, &"/meta".parse().unwrap(), None),
            Err(IdentityError::BadKey { .. })
        ));
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = record_message_id("f", "p", "k", "v1");
        assert_eq!(a, record_message_id("f", "p", "k", "v1"));
        assert_ne!(a, record_message_id("f", "p", "k", "v2"));
        // Length prefixes: moving a boundary changes the id.
        assert_ne!(
            record_message_id("fp", "", "k", "v"),
            record_message_id("f", "p", "k", "v")
        );
        assert_ne!(
            positional_message_id("f", "p", "c", 0),
            positional_message_id("f", "p", "c", 1)
        );
        assert_eq!(a.len(), 32);
    }
}
