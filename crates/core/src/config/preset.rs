//! Presets, and how a `pagination:` block resolves into the engine's
//! [`PaginationSpec`].
//!
//! A preset fills the pagination fields its seed fixes; any field set by hand
//! wins. [`PaginationSpec::resolve`] turns the block as written into one
//! [`Strategy`] plus end-of-stream rules, or explains what is wrong.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;

use crate::pointer::JsonPointer;
use crate::timefmt::TimeFormat;

use super::{PaginationConfig, StartConfig};
pub use crate::pagination::spec::{CursorFrom, NextUrlFrom, PageStyle, PaginationSpec, Strategy};

/// The named pagination styles, one per seed.
// The schema names them by `rename_all`; a test in config::schema holds
// those names equal to `NAMES`, which the loader parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[schemars(rename_all = "snake_case")]
pub enum Preset {
    /// Seed 003: `start_time`, then `cursor` = `/after_cursor` until `/end_of_stream`.
    ZendeskCursor,
    /// Seed 002: `paginationMode=CURSOR`, `startAfter` = `/meta/nextStartAfter` while `/meta/hasMore`.
    StartAfter,
    /// Seed 001: `cursor` = `/Cursors/Next`; an empty Next ends; `/Cursors/Self` is the resume point.
    SelfNext,
    /// Seeds 000 and 004: an opaque (often base64) cursor, `starting_at` = `/cursor/starting_at`;
    /// an empty page ends the stream and keeps the cursor it carries.
    Cursor,
    /// A full next URL in the body (`/links/next`, JSON:API style).
    NextUrl,
    /// RFC 8288 `Link: <...>; rel="next"`; the body is the array of records.
    LinkHeader,
}

impl Preset {
    pub const NAMES: [&'static str; 6] = [
        "zendesk_cursor",
        "start_after",
        "self_next",
        "cursor",
        "next_url",
        "link_header",
    ];

    /// The fields this preset fills, written as a user would write them.
    fn defaults(
        self,
    ) -> (
        PaginationConfig,
        Option<&'static str>,
        &'static [(&'static str, &'static str)],
    ) {
        let s = |v: &str| Some(v.to_string());
        let p = |v: &str| v.parse::<JsonPointer>().ok();
        match self {
            Preset::ZendeskCursor => (
                PaginationConfig {
                    cursor_param: s("cursor"),
                    next_cursor: s("/after_cursor"),
                    end_of_stream: p("/end_of_stream"),
                    page_size_param: s("per_page"),
                    ..Default::default()
                },
                None,
                &[],
            ),
            Preset::StartAfter => (
                PaginationConfig {
                    cursor_param: s("startAfter"),
                    next_cursor: s("/meta/nextStartAfter"),
                    has_more: p("/meta/hasMore"),
                    page_size_param: s("limit"),
                    ..Default::default()
                },
                Some("/data"),
                &[("paginationMode", "CURSOR")],
            ),
            Preset::SelfNext => (
                PaginationConfig {
                    cursor_param: s("cursor"),
                    next_cursor: s("/Cursors/Next"),
                    self_cursor: p("/Cursors/Self"),
                    page_size_param: s("limit"),
                    ..Default::default()
                },
                Some("/Data"),
                &[],
            ),
            Preset::Cursor => (
                PaginationConfig {
                    cursor_param: s("starting_at"),
                    next_cursor: s("/cursor/starting_at"),
                    stop_on_empty_page: Some(true),
                    page_size_param: s("limit"),
                    ..Default::default()
                },
                Some("/items"),
                &[],
            ),
            Preset::NextUrl => (
                PaginationConfig {
                    next_url: s("/links/next"),
                    page_size_param: s("limit"),
                    ..Default::default()
                },
                Some("/data"),
                &[],
            ),
            Preset::LinkHeader => (
                PaginationConfig {
                    next_url: s("link:next"),
                    page_size_param: s("per_page"),
                    ..Default::default()
                },
                Some(""),
                &[],
            ),
        }
    }

    /// The start block a preset implies when the feed gives none.
    pub fn default_start(self) -> Option<StartConfig> {
        match self {
            Preset::ZendeskCursor => Some(StartConfig {
                param: "start_time".into(),
                format: TimeFormat::Unix,
                from: Some("1970-01-01T00:00:00Z".into()),
            }),
            _ => None,
        }
    }
}

impl PaginationConfig {
    /// The preset named by `preset:`, if it names a known one.
    pub fn preset(&self) -> Option<Preset> {
        self.preset.as_deref().and_then(|p| p.parse().ok())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "zendesk_cursor" => Preset::ZendeskCursor,
            "start_after" => Preset::StartAfter,
            "self_next" => Preset::SelfNext,
            "cursor" => Preset::Cursor,
            "next_url" => Preset::NextUrl,
            "link_header" => Preset::LinkHeader,
            other => {
                return Err(format!(
                    "unknown preset {other:?}; expected one of: {}",
                    Preset::NAMES.join(", ")
                ));
            }
        })
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = match self {
            Preset::ZendeskCursor => 0,
            Preset::StartAfter => 1,
            Preset::SelfNext => 2,
            Preset::Cursor => 3,
            Preset::NextUrl => 4,
            Preset::LinkHeader => 5,
        };
        f.write_str(Preset::NAMES[i])
    }
}

/// A problem found while resolving: the field (relative to the pagination
/// block's parent) and the reason.
pub type Problem = (String, String);

impl PaginationSpec {
    /// Resolve `p` (with `records` from the feed) into a spec. `at` is the
    /// path prefix of the block for error messages (e.g. `feeds[0]`).
    pub fn resolve(
        p: &PaginationConfig,
        records: Option<&JsonPointer>,
    ) -> Result<Self, Vec<Problem>> {
        let mut problems = Vec::new();
        let preset = match p.preset.as_deref().map(Preset::from_str).transpose() {
            Ok(pr) => pr,
            Err(e) => {
                problems.push(("pagination.preset".to_string(), e));
                None
            }
        };
        let (defaults, default_records, preset_params) = match preset {
            Some(pr) => pr.defaults(),
            None => (PaginationConfig::default(), None, &[][..]),
        };
        // Fields set by hand win over the preset's.
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let pickp =
            |a: &Option<JsonPointer>, b: &Option<JsonPointer>| a.clone().or_else(|| b.clone());
        let page_fields = p.page_param.is_some()
            || p.offset_param.is_some()
            || p.first_page.is_some()
            || p.total_pages.is_some()
            || p.total_count.is_some();
        let cursor_fields_by_hand = p.cursor_param.is_some()
            || p.next_cursor.is_some()
            || p.next_url.is_some()
            || p.self_cursor.is_some();
        if page_fields && (cursor_fields_by_hand || preset.is_some()) {
            problems.push((
                "pagination".to_string(),
                "mixes page-based fields (page_param/offset_param/first_page/total_pages/total_count) with cursor fields or a preset; use one style per pagination block".to_string(),
            ));
        }
        if p.page_param.is_some() && p.offset_param.is_some() {
            problems.push((
                "pagination.offset_param".to_string(),
                "page_param and offset_param exclude each other".to_string(),
            ));
        }
        let (cursor_param, next_cursor, next_url) =
            if p.next_url.is_some() && p.next_cursor.is_none() {
                // A hand-written next_url replaces the preset's cursor.
                (p.cursor_param.clone(), None, p.next_url.clone())
            } else if p.next_cursor.is_some() && p.next_url.is_none() {
                (
                    pick(&p.cursor_param, &defaults.cursor_param),
                    p.next_cursor.clone(),
                    None,
                )
            } else {
                (
                    pick(&p.cursor_param, &defaults.cursor_param),
                    pick(&p.next_cursor, &defaults.next_cursor),
                    pick(&p.next_url, &defaults.next_url),
                )
            };
        if next_cursor.is_some() && next_url.is_some() {
            problems.push((
                "pagination.next_url".to_string(),
                "next_cursor and next_url exclude each other: a page leads to the next either by a cursor or by a URL".to_string(),
            ));
        }

        let strategy = if let Some(param) = &p.page_param {
            Some(Strategy::Pages(PageStyle::Number {
                param: param.clone(),
                first: p.first_page.unwrap_or(1),
            }))
        } else if let Some(param) = &p.offset_param {
            Some(Strategy::Pages(PageStyle::Offset {
                param: param.clone(),
            }))
        } else if let Some(nc) = &next_cursor {
            match parse_cursor_source(nc) {
                Ok(Source::Url) => Some(Strategy::NextUrl {
                    from: NextUrlFrom::LinkNext,
                }),
                Ok(Source::Cursor(from)) => match &cursor_param {
                    Some(param) => Some(Strategy::Cursor {
                        param: param.clone(),
                        from,
                    }),
                    None => {
                        problems.push((
                            "pagination.cursor_param".to_string(),
                            "missing: next_cursor needs cursor_param, the query parameter that carries the cursor".to_string(),
                        ));
                        None
                    }
                },
                Err(e) => {
                    problems.push(("pagination.next_cursor".to_string(), e));
                    None
                }
            }
        } else if let Some(nu) = &next_url {
            if nu == "link:next" {
                Some(Strategy::NextUrl {
                    from: NextUrlFrom::LinkNext,
                })
            } else if let Some(name) = nu.strip_prefix("header:") {
                match header_name(name) {
                    Ok(name) => Some(Strategy::NextUrl {
                        from: NextUrlFrom::Header(name),
                    }),
                    Err(e) => {
                        problems.push(("pagination.next_url".to_string(), e));
                        None
                    }
                }
            } else {
                match nu.parse::<JsonPointer>() {
                    Ok(ptr) => Some(Strategy::NextUrl {
                        from: NextUrlFrom::Body(ptr),
                    }),
                    Err(e) => {
                        problems.push((
                            "pagination.next_url".to_string(),
                            format!("{e}, or \"link:next\", or header:NAME"),
                        ));
                        None
                    }
                }
            }
        } else {
            if problems.is_empty() {
                problems.push((
                    "pagination".to_string(),
                    format!(
                        "no way to reach the next page: set preset ({}) or one of next_cursor, next_url, page_param, offset_param",
                        Preset::NAMES.join(", ")
                    ),
                ));
            }
            None
        };

        let records = match records
            .cloned()
            .or_else(|| default_records.and_then(|r| r.parse().ok()))
        {
            Some(r) => Some(r),
            // An unknown preset is the one problem to report; it would have supplied records.
            None if p.preset.is_some() && preset.is_none() => None,
            None => {
                problems.push((
                    "records".to_string(),
                    "missing: the JSON pointer to the array of records (\"\" when the body is the array)".to_string(),
                ));
                None
            }
        };

        let spec = match (strategy, records, problems.is_empty()) {
            (Some(strategy), Some(records), true) => PaginationSpec {
                strategy,
                records,
                self_cursor: pickp(&p.self_cursor, &defaults.self_cursor),
                has_more: pickp(&p.has_more, &defaults.has_more),
                end_of_stream: pickp(&p.end_of_stream, &defaults.end_of_stream),
                stop_on_empty_page: p
                    .stop_on_empty_page
                    .or(defaults.stop_on_empty_page)
                    .unwrap_or(false),
                page_size_param: pick(&p.page_size_param, &defaults.page_size_param),
                page_size: p.page_size,
                total_pages: p.total_pages.clone(),
                total_count: p.total_count.clone(),
                preset_params: preset_params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            _ => return Err(problems),
        };
        spec.check_body_pointers()?;
        Ok(spec)
    }

    /// The body pointers this spec reads besides the records.
    pub fn body_pointers(&self) -> Vec<(&'static str, &JsonPointer)> {
        let mut v = Vec::new();
        match &self.strategy {
            Strategy::Cursor {
                from: CursorFrom::Body(p),
                ..
            } => v.push(("pagination.next_cursor", p)),
            Strategy::NextUrl {
                from: NextUrlFrom::Body(p),
            } => v.push(("pagination.next_url", p)),
            _ => {}
        }
        for (name, p) in [
            ("pagination.self_cursor", &self.self_cursor),
            ("pagination.has_more", &self.has_more),
            ("pagination.end_of_stream", &self.end_of_stream),
            ("pagination.total_pages", &self.total_pages),
            ("pagination.total_count", &self.total_count),
        ] {
            if let Some(p) = p {
                v.push((name, p));
            }
        }
        v
    }

    fn check_body_pointers(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        for (field, p) in self.body_pointers() {
            if p.is_root() {
                problems.push((
                    field.to_string(),
                    "must point inside the body, not at the whole body (\"\")".to_string(),
                ));
            } else if self.records.is_root() {
                problems.push((
                    field.to_string(),
                    format!("records is \"\" (the body is the array of records), so {p} cannot be read from the body"),
                ));
            } else if p.segments().starts_with(self.records.segments()) {
                problems.push((
                    field.to_string(),
                    format!("{p} lies inside the records array at {}", self.records),
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

enum Source {
    Cursor(CursorFrom),
    Url,
}

fn parse_cursor_source(s: &str) -> Result<Source, String> {
    if s == "link:next" {
        return Ok(Source::Url);
    }
    if let Some(name) = s.strip_prefix("header:") {
        return header_name(name).map(|n| Source::Cursor(CursorFrom::Header(n)));
    }
    if let Some(ptr) = s.strip_prefix("last_record:") {
        return ptr
            .parse::<JsonPointer>()
            .map(|p| Source::Cursor(CursorFrom::LastRecord(p)))
            .map_err(|e| format!("last_record: {e}"));
    }
    s.parse::<JsonPointer>()
        .map(|p| Source::Cursor(CursorFrom::Body(p)))
        .map_err(|e| format!("{e}, or one of link:next, header:NAME, last_record:/pointer"))
}

/// Whether `name` is a header name as a config may write one: letters,
/// digits, `-` and `_`, not empty.
pub(super) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The NAME of `header:NAME`, if it is a header name.
fn header_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if !is_header_name(name) {
        return Err(format!(
            "header:NAME needs a valid header name, got {:?}",
            format!("header:{name}")
        ));
    }
    Ok(name.to_string())
}
