//! Durations as written in config files: `30s`, `5m`, `1h30m`, `250ms`, `30d`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration parsed from a human string with [`humantime`]; serialises back
/// to the same kind of string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    pub fn std(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Debug for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration; write e.g. 30s, 5m, 1h".into());
        }
        humantime::parse_duration(s)
            .map(Duration)
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 250ms, 30s, 5m, 1h, 7d"))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The units [`humantime::parse_duration`] knows (humantime 2.4; a test in
/// `config::schema` parses every one, so a unit dropped upstream fails it).
pub(crate) const UNITS: &str = "nanos|nsec|ns|usec|us|µs|millis|msec|ms|seconds|second|secs|sec|s\
|minutes|minute|mins|min|m|hours|hour|hrs|hr|h|days|day|d|weeks|week|wks|wk|w\
|months|month|M|years|year|yrs|yr|y";

/// The text [`Duration::from_str`] accepts, as an ECMA-262 regex: after the
/// trim, `0` alone, or spans of an integer (optionally with a fraction) and
/// a unit. humantime skips whitespace inside a number and between a number
/// and its unit; a unit ends at whitespace, at the next digit or at the end.
pub(crate) fn pattern() -> String {
    let number = r"[0-9][0-9\s]*(?:\.\s*[0-9][0-9\s]*)?";
    format!(r"^\s*(?:0\s*|(?:{number}(?:{UNITS})\s*)+)$")
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A duration: a number and a unit, several in a row for a sum: 250ms, 30s, 5m, 1h30m, 7d, 1.5h. Units: ns, us, ms, s (sec), m (min), h (hr), d, w, M (months), y. 0 alone is zero. A fraction must come out in whole nanoseconds.",
            "oneOf": [
                { "type": "string", "pattern": pattern() },
                // YAML reads a bare `0` as a number; the loader takes its text.
                { "type": "integer", "const": 0 }
            ],
            "examples": ["30s", "5m", "1h30m", "250ms", "7d"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!("30s".parse::<Duration>().unwrap(), Duration::from_secs(30));
        assert_eq!("5m".parse::<Duration>().unwrap(), Duration::from_secs(300));
        assert_eq!(
            "1h30m".parse::<Duration>().unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            "250ms".parse::<Duration>().unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            "30d".parse::<Duration>().unwrap(),
            Duration::from_secs(30 * 86400)
        );
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        let e = "5 minutes-ish".parse::<Duration>().unwrap_err();
        assert!(e.contains("invalid duration"), "{e}");
        assert!("".parse::<Duration>().is_err());
        assert!("10".parse::<Duration>().is_err());
    }
}
