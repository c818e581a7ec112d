//! Start points as API parameters: RFC 3339 / ISO 8601, unix seconds or unix
//! milliseconds.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a timestamp is written into a request parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// `2024-01-01T00:00:00Z`
    #[default]
    Iso8601,
    /// `1704067200`
    Unix,
    /// `1704067200000`
    UnixMs,
}

impl TimeFormat {
    pub fn format(self, t: DateTime<Utc>) -> String {
        match self {
            TimeFormat::Iso8601 => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            TimeFormat::Unix => t.timestamp().to_string(),
            TimeFormat::UnixMs => t.timestamp_millis().to_string(),
        }
    }
}

/// Parse a timestamp written by a person or an API: RFC 3339, a date
/// (`2024-01-01`, midnight UTC), unix seconds or unix milliseconds (a number
/// above 10^11 is taken as milliseconds).
pub fn parse_timestamp(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(Utc.from_utc_datetime(&t));
    }
    if let Ok(n) = s.parse::<i64>() {
        let t = if n.abs() >= 100_000_000_000 {
            Utc.timestamp_millis_opt(n).single()
        } else {
            Utc.timestamp_opt(n, 0).single()
        };
        return t.ok_or_else(|| format!("timestamp {s:?} is out of range"));
    }
    Err(format!(
        "invalid timestamp {s:?}: write RFC 3339 (2024-01-01T00:00:00Z), a date (2024-01-01) or unix seconds"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_each_way() {
        let t = parse_timestamp("2024-01-01T00:00:00Z").unwrap();
        assert_eq!(TimeFormat::Iso8601.format(t), "2024-01-01T00:00:00Z");
        assert_eq!(TimeFormat::Unix.format(t), "1704067200");
        assert_eq!(TimeFormat::UnixMs.format(t), "1704067200000");
    }

    #[test]
    fn parses_each_way() {
        let t = parse_timestamp("2024-01-01T00:00:00Z").unwrap();
        assert_eq!(parse_timestamp("2024-01-01").unwrap(), t);
        assert_eq!(parse_timestamp("1704067200").unwrap(), t);
        assert_eq!(parse_timestamp("1704067200000").unwrap(), t);
        assert_eq!(parse_timestamp("2024-01-01T01:00:00+01:00").unwrap(), t);
        assert!(parse_timestamp("yesterday").is_err());
    }
}
