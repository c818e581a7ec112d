//! The resolved pagination spec: how one page leads to the next, as the
//! engine reads it. `config` resolves a feed's `pagination:` block (and its
//! preset) into one of these; the engine knows nothing of config files.

use crate::pointer::JsonPointer;

/// Where the next cursor comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorFrom {
    Body(JsonPointer),
    Header(String),
    LastRecord(JsonPointer),
}

/// Where the next URL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextUrlFrom {
    Body(JsonPointer),
    LinkNext,
    /// A full URL in this response header (Kinto's `Next-Page`).
    Header(String),
}

/// Where a value the chain sends goes: a query parameter, or (a name
/// written `body:/pointer`) a place in the JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Query(String),
    Body(JsonPointer),
}

/// The prefix that places a value in the body.
pub const BODY_PREFIX: &str = "body:";

impl Place {
    /// `name`, or `body:/pointer`.
    pub fn parse(name: &str) -> Result<Place, String> {
        match name.strip_prefix(BODY_PREFIX) {
            Some(ptr) => {
                let ptr: JsonPointer = ptr.parse()?;
                if ptr.is_root() {
                    return Err("body: needs a pointer to a place inside the body (e.g. body:/variables/after)".into());
                }
                Ok(Place::Body(ptr))
            }
            None if name.is_empty() => Err("a query parameter name cannot be empty".into()),
            None => Ok(Place::Query(name.to_string())),
        }
    }

    /// True when `name` places its value in the body.
    pub fn in_body(name: &str) -> bool {
        name.starts_with(BODY_PREFIX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStyle {
    /// `page=1, 2, …` starting at `first`.
    Number { param: String, first: u64 },
    /// `offset=0, n, 2n, …` advancing by the records received.
    Offset { param: String },
}

/// How one page leads to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    Cursor { param: String, from: CursorFrom },
    NextUrl { from: NextUrlFrom },
    Pages(PageStyle),
}

/// A fully resolved pagination block.
#[derive(Debug, Clone, PartialEq)]
pub struct PaginationSpec {
    pub strategy: Strategy,
    pub records: JsonPointer,
    pub self_cursor: Option<JsonPointer>,
    pub has_more: Option<JsonPointer>,
    pub end_of_stream: Option<JsonPointer>,
    pub stop_on_empty_page: bool,
    pub page_size_param: Option<String>,
    pub page_size: Option<u64>,
    pub total_pages: Option<JsonPointer>,
    pub total_count: Option<JsonPointer>,
    /// Fixed parameters the preset sends (e.g. `paginationMode=CURSOR`).
    pub preset_params: Vec<(String, String)>,
}
