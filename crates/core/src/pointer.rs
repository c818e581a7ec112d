//! JSON pointers (RFC 6901) as they appear in config: `/meta/nextStartAfter`,
//! `/Cursors/Next`, `""` for the whole document.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A parsed, validated JSON pointer. Segments are unescaped (`~1` → `/`,
/// `~0` → `~`).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct JsonPointer {
    text: String,
    segments: Vec<String>,
}

impl JsonPointer {
    /// The pointer to the whole document.
    pub fn root() -> Self {
        Self::default()
    }

    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Look the pointer up in a parsed value.
    pub fn get<'v>(&self, v: &'v serde_json::Value) -> Option<&'v serde_json::Value> {
        v.pointer(&self.text)
    }
}

impl FromStr for JsonPointer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::root());
        }
        if !s.starts_with('/') {
            return Err(format!(
                "malformed JSON pointer {s:?}: it must be empty or start with '/' (e.g. /data or /meta/next)"
            ));
        }
        let mut segments = Vec::new();
        for raw in s[1..].split('/') {
            let mut seg = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => seg.push('~'),
                        Some('1') => seg.push('/'),
                        _ => {
                            return Err(format!(
                                "malformed JSON pointer {s:?}: '~' must be followed by 0 or 1 (~0 is '~', ~1 is '/')"
                            ));
                        }
                    }
                } else {
                    seg.push(c);
                }
            }
            segments.push(seg);
        }
        Ok(Self {
            text: s.to_string(),
            segments,
        })
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str(&self.text)
        }
    }
}

impl fmt::Debug for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonPointer({:?})", self.text)
    }
}

impl Serialize for JsonPointer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for JsonPointer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A non-empty pointer as an ECMA-262 regex (no anchors): `/` segments in
/// which every `~` is followed by `0` or `1`.
pub(crate) const NON_EMPTY_PATTERN: &str = "(?:/(?:[^~/]|~[01])*)+";

impl JsonSchema for JsonPointer {
    fn schema_name() -> Cow<'static, str> {
        "JsonPointer".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A JSON pointer (RFC 6901): \"\" for the whole document, or /segments (/data, /meta/next); ~1 stands for / and ~0 for ~ inside a segment.",
            "type": "string",
            "pattern": format!("^(?:{NON_EMPTY_PATTERN})?$"),
            "examples": ["/data", "/meta/next", ""]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes() {
        let p: JsonPointer = "/a~1b/c~0d/0".parse().unwrap();
        assert_eq!(p.segments(), ["a/b", "c~d", "0"]);
        assert!("".parse::<JsonPointer>().unwrap().is_root());
        let v = serde_json::json!({"a/b": {"c~d": [7]}});
        assert_eq!(p.get(&v), Some(&serde_json::json!(7)));
    }

    #[test]
    fn rejects_malformed() {
        assert!(
            "data"
                .parse::<JsonPointer>()
                .unwrap_err()
                .contains("start with '/'")
        );
        assert!("/a~2".parse::<JsonPointer>().is_err());
        assert!("/a~".parse::<JsonPointer>().is_err());
    }
}
