//! The pagination engine: pure functions from a position to the request for
//! the next page, and from a response to records, the next position and
//! end of stream.
//!
//! A chain starts at [`Position::Start`] (the start parameter carries a time,
//! if the feed has one) and moves through [`Position::At`] values, whose
//! meaning depends on the strategy: a cursor token, the URL of the next page,
//! or a page number / offset. [`Paginator::read`] never spins: a next
//! position equal to the one just used while the API claims more is a
//! [`ReadError::Loop`], and every malformed response is a [`ReadError`] that
//! leaves the caller's position where it was.

pub(crate) mod extract;
#[cfg(test)]
mod fuzz_regressions;
pub mod link;
pub mod spec;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use url::Url;

use serde_json::Value;

use crate::config::ErrorWhen;
use crate::jsonbytes::nested_deeper_than;
use crate::pointer::JsonPointer;
use crate::timefmt::TimeFormat;

pub use crate::config::Method;
pub use extract::raw_at;
use extract::{Plan, ValuePlan};
pub use spec::{BODY_PREFIX, CursorFrom, NextUrlFrom, PageStyle, PaginationSpec, Place, Strategy};

/// Default longest cursor accepted from an API.
pub const DEFAULT_MAX_CURSOR_LEN: usize = 8 * 1024;

/// The deepest nesting of arrays and objects a response may have, records
/// included: deeper JSON is refused before it is parsed (and before a
/// consumer downstream, whose parser may recurse, ever sees it).
pub const MAX_JSON_DEPTH: usize = 128;

/// Where a chain is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The beginning: no cursor yet. `from` goes into the start parameter.
    Start { from: Option<DateTime<Utc>> },
    /// A cursor, next URL, page number or offset, as the strategy reads it.
    At(String),
}

/// The request for one page (auth is added by the source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub method: Method,
    pub url: Url,
    /// The JSON body, serialized.
    pub body: Option<Vec<u8>>,
    /// A `POST` marked `read_only`: it only reads.
    pub read_only: bool,
}

impl PageRequest {
    /// A GET of `url`.
    pub fn get(url: Url) -> PageRequest {
        PageRequest {
            method: Method::Get,
            url,
            body: None,
            read_only: true,
        }
    }

    /// True when sending it twice is harmless: a `GET`, a `QUERY`, or a
    /// `POST` marked `read_only`. Only such a request is retried after a
    /// response may have been produced.
    pub fn retriable(&self) -> bool {
        self.method != Method::Post || self.read_only
    }
}

/// Response headers as the engine sees them. Repeated headers are joined
/// with ", ".
pub trait Headers {
    fn header(&self, name: &str) -> Option<String> {
        let vals = self.header_values(name);
        (!vals.is_empty()).then(|| vals.join(", "))
    }
    /// Each value of the header, in order.
    fn header_values(&self, name: &str) -> Vec<String>;
}

impl Headers for [(String, String)] {
    fn header_values(&self, name: &str) -> Vec<String> {
        self.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

impl Headers for Vec<(String, String)> {
    fn header_values(&self, name: &str) -> Vec<String> {
        self.as_slice().header_values(name)
    }
}

/// What comes after a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Fetch this position next.
    More(String),
    /// End of stream. `resume` is where the next poll starts (`None`: from
    /// the start point again, because the API gave nothing to continue from).
    End { resume: Option<String> },
}

/// One page as read.
#[derive(Debug)]
pub struct Page<'b> {
    /// The records, each exactly as the API sent it.
    pub records: Vec<&'b RawValue>,
    pub next: Next,
}

/// Why a response could not be read. Each is permanent for this response:
/// retrying the same request will not help, except where noted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("response is not valid JSON: {0}")]
    NotJson(String),
    #[error("records not found at {0} in the response")]
    RecordsMissing(String),
    #[error("records at {ptr} is {kind}, expected an array")]
    RecordsNotArray { ptr: String, kind: &'static str },
    #[error("{field} at {ptr} is {kind}, expected {expected}")]
    WrongType {
        field: &'static str,
        ptr: String,
        kind: &'static str,
        expected: &'static str,
    },
    #[error(
        "pagination loop: the API returned the cursor it was given ({cursor:?}) and claims more pages"
    )]
    Loop { cursor: String },
    #[error("the API claims more pages but gives no next cursor ({field})")]
    MoreWithoutNext { field: &'static str },
    #[error("the API returned an empty page but claims more pages")]
    EmptyClaimsMore,
    #[error("next cursor is {len} bytes, over the limit of {limit} (max_cursor_bytes)")]
    CursorTooLong { len: usize, limit: usize },
    #[error("the response is nested deeper than {limit} levels of arrays and objects")]
    TooDeep { limit: usize },
    #[error("the page holds {count} records, over the limit of {limit} (max_records_per_page)")]
    TooManyRecords { count: usize, limit: usize },
    #[error(
        "next URL {url} is on another origin than the source ({origin}); refusing to follow it"
    )]
    CrossOrigin { url: String, origin: String },
    #[error("next URL {url:?} is not a valid URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{field}: {reason}")]
    BadPosition { field: &'static str, reason: String },
    /// A 2xx answer that `error_when` takes for an error.
    #[error("the API answered an error{}: {message}", if *transient { " (transient)" } else { "" })]
    Api {
        message: String,
        transient: bool,
        /// Seconds to wait, from the rule's `retry_after` pointer.
        retry_after: Option<u64>,
    },
    #[error("record {index} has no value at {ptr} (record:)")]
    RecordPart { index: usize, ptr: String },
}

impl ReadError {
    /// True for an answer that may read differently later: an `error_when`
    /// rule marked transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ReadError::Api {
                transient: true,
                ..
            }
        )
    }

    /// The seconds an `error_when` rule asked to wait.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ReadError::Api {
                retry_after: Some(s),
                ..
            } => Some(std::time::Duration::from_secs(*s)),
            _ => None,
        }
    }
}

/// The longest message taken from an error answer.
const MAX_API_MESSAGE_CHARS: usize = 300;

/// What every strategy reads from a response before deciding what comes next.
struct Seen<'b> {
    /// The position the page was fetched at (`None`: the start).
    used: Option<&'b str>,
    /// The API said this is the last page (`has_more: false`, `end_of_stream: true`).
    declared_end: bool,
    /// The API said more pages follow.
    declared_more: bool,
    empty: bool,
    count: u64,
    /// The raw value at the next-cursor / next-URL pointer, if the strategy reads one.
    next: Option<&'b RawValue>,
}

/// Builds requests and reads responses for one feed (and partition).
#[derive(Clone)]
pub struct Paginator {
    base: Url,
    spec: PaginationSpec,
    /// Fixed parameters: preset's, feed's and partition's, in that order.
    params: Vec<(String, String)>,
    start: Option<(String, TimeFormat)>,
    plan: Plan,
    slots: Slots,
    max_cursor_len: usize,
    max_records: usize,
    /// Query parameters that carry a credential (an `api_key` in the
    /// query): removed from next URLs the API hands out, so a URL that
    /// echoes the key is never stored; the client adds the key to each request.
    secret_params: Vec<String>,
    /// `page_size_param` and `page_size`.
    page_size: Option<(String, u64)>,
    method: Method,
    /// The body template.
    body: Option<Value>,
    read_only: bool,
    /// What each element of the records array delivers, and its plan.
    record: Option<(JsonPointer, ValuePlan)>,
    /// `error_when`, each with the plan slots of its pointer, message and retry_after.
    errors: Vec<(ErrorWhen, usize, Option<usize>, Option<usize>)>,
    /// The cursor is a JSON value written into the body.
    cursor_in_body: bool,
}

#[derive(Default, Clone)]
struct Slots {
    next: Option<usize>,
    self_cursor: Option<usize>,
    has_more: Option<usize>,
    end_of_stream: Option<usize>,
    total_pages: Option<usize>,
    total_count: Option<usize>,
}

impl Paginator {
    /// `base_url` is the source's; `path` is appended to its path. `params`
    /// are the feed's and partition's fixed parameters.
    pub fn new(
        base_url: &Url,
        path: &str,
        spec: PaginationSpec,
        params: Vec<(String, String)>,
        start: Option<(String, TimeFormat)>,
    ) -> Self {
        let mut base = base_url.clone();
        let joined = format!(
            "{}/{}",
            base_url.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        let (p, q) = match joined.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (joined, None),
        };
        base.set_path(&p);
        base.set_query(q.as_deref());
        base.set_fragment(None);

        let mut all = spec.preset_params.clone();
        all.extend(params);
        let page_size = match (&spec.page_size_param, spec.page_size) {
            (Some(name), Some(size)) => Some((name.clone(), size)),
            _ => None,
        };
        let cursor_in_body =
            matches!(&spec.strategy, Strategy::Cursor { param, .. } if Place::in_body(param));
        let mut p = Paginator {
            base,
            params: all,
            start,
            plan: Plan::new(&spec.records, &[]),
            slots: Slots::default(),
            spec,
            max_cursor_len: DEFAULT_MAX_CURSOR_LEN,
            max_records: usize::MAX,
            secret_params: Vec::new(),
            page_size,
            method: Method::Get,
            body: None,
            read_only: true,
            record: None,
            errors: Vec::new(),
            cursor_in_body,
        };
        p.plan_reads();
        p
    }

    /// The one-pass plan of every body value the paginator reads.
    fn plan_reads(&mut self) {
        let spec = &self.spec;
        let mut ptrs: Vec<&JsonPointer> = Vec::new();
        let mut slots = Slots::default();
        fn add<'p>(
            ptrs: &mut Vec<&'p JsonPointer>,
            p: Option<&'p JsonPointer>,
            slot: &mut Option<usize>,
        ) {
            if let Some(p) = p {
                // One slot per pointer: the plan keeps one value per place.
                *slot = Some(match ptrs.iter().position(|q| *q == p) {
                    Some(i) => i,
                    None => {
                        ptrs.push(p);
                        ptrs.len() - 1
                    }
                });
            }
        }
        let next_ptr = match &spec.strategy {
            Strategy::Cursor {
                from: CursorFrom::Body(p),
                ..
            } => Some(p),
            Strategy::NextUrl {
                from: NextUrlFrom::Body(p),
            } => Some(p),
            _ => None,
        };
        add(&mut ptrs, next_ptr, &mut slots.next);
        add(&mut ptrs, spec.self_cursor.as_ref(), &mut slots.self_cursor);
        add(&mut ptrs, spec.has_more.as_ref(), &mut slots.has_more);
        add(
            &mut ptrs,
            spec.end_of_stream.as_ref(),
            &mut slots.end_of_stream,
        );
        add(&mut ptrs, spec.total_pages.as_ref(), &mut slots.total_pages);
        add(&mut ptrs, spec.total_count.as_ref(), &mut slots.total_count);
        let mut errors = Vec::with_capacity(self.errors.len());
        for (rule, ..) in &self.errors {
            let mut at = None;
            add(&mut ptrs, Some(&rule.pointer), &mut at);
            let (mut message, mut retry_after) = (None, None);
            add(&mut ptrs, rule.message.as_ref(), &mut message);
            add(&mut ptrs, rule.retry_after.as_ref(), &mut retry_after);
            errors.push((rule.clone(), at.unwrap_or_default(), message, retry_after));
        }
        self.plan = Plan::new(&spec.records, &ptrs);
        self.slots = slots;
        self.errors = errors;
    }

    /// Send `method` with `body` (a template the chain's `body:/` values
    /// are written into); `read_only` marks a POST that only reads.
    pub fn with_request(mut self, method: Method, body: Option<Value>, read_only: bool) -> Self {
        self.method = method;
        self.body = body;
        self.read_only = read_only;
        self
    }

    /// Deliver the value at `ptr` of each element of the records array.
    pub fn with_record(mut self, ptr: Option<JsonPointer>) -> Self {
        self.record = ptr.map(|p| {
            let plan = ValuePlan::new(&p);
            (p, plan)
        });
        self
    }

    /// Take a 2xx answer for an error when one of `rules` holds.
    pub fn with_errors(mut self, rules: Vec<ErrorWhen>) -> Self {
        self.errors = rules.into_iter().map(|r| (r, 0, None, None)).collect();
        self.plan_reads();
        self
    }

    /// True when the cursor is a JSON value in the body (stored as its JSON text).
    pub fn cursor_in_body(&self) -> bool {
        self.cursor_in_body
    }

    pub fn with_max_cursor_len(mut self, n: usize) -> Self {
        self.max_cursor_len = n;
        self
    }

    /// Remove these query parameters from next URLs (see `secret_params`).
    pub fn with_secret_params(mut self, names: Vec<String>) -> Self {
        self.secret_params = names;
        self
    }

    /// Refuse pages with more than `n` records.
    pub fn with_max_records(mut self, n: usize) -> Self {
        self.max_records = n;
        self
    }

    pub fn spec(&self) -> &PaginationSpec {
        &self.spec
    }

    /// The URL of the first page without parameters: the source origin and path.
    pub fn endpoint(&self) -> &Url {
        &self.base
    }

    /// The request that fetches the page at `pos`, in a chain that did not
    /// start from a time (or whose API keeps its filter in the cursor).
    pub fn request(&self, pos: &Position) -> Result<PageRequest, ReadError> {
        self.request_in_chain(pos, None)
    }

    /// The request that fetches the page at `pos` in a chain that started
    /// from `chain_from`. A cursor or next URL carries the API's own filter,
    /// so the start parameter goes only with the first request; page numbers
    /// and offsets carry nothing, so every page of a chain repeats the start
    /// parameter (seed 002's `updatedSince=…&page=N`), or page 2 would list
    /// the whole dataset.
    pub fn request_in_chain(
        &self,
        pos: &Position,
        chain_from: Option<DateTime<Utc>>,
    ) -> Result<PageRequest, ReadError> {
        let mut out = Values::new(self.body.clone());
        if let (Strategy::NextUrl { .. }, Position::At(u)) = (&self.spec.strategy, pos) {
            // The URL carries the query; the body is sent again with the
            // values placed in it.
            for (k, v) in &self.params {
                if Place::in_body(k) {
                    out.put(k, Value::String(v.clone()))?;
                }
            }
            if let Some((k, n)) = &self.page_size
                && Place::in_body(k)
            {
                out.put(k, Value::from(*n))?;
            }
            let url = self.same_origin(u, &self.base)?;
            return Ok(self.finish(url, &out));
        }
        for (k, v) in &self.params {
            out.put(k, Value::String(v.clone()))?;
        }
        if let Some((k, n)) = &self.page_size {
            out.put(k, Value::from(*n))?;
        }
        match (pos, &self.spec.strategy) {
            (Position::Start { from }, strategy) => {
                if let (Some(from), Some((param, fmt))) = (from, &self.start) {
                    out.put(param, time_value(*fmt, *from))?;
                }
                if let Strategy::Pages(style) = strategy {
                    match style {
                        PageStyle::Number { param, first } => {
                            out.put(param, Value::from(*first))?
                        }
                        PageStyle::Offset { param } => out.put(param, Value::from(0u64))?,
                    };
                }
            }
            (Position::At(c), Strategy::Cursor { param, .. }) => {
                if self.cursor_in_body {
                    serde_json::from_str::<&RawValue>(c).map_err(|e| ReadError::BadPosition {
                        field: "cursor",
                        reason: format!("{c:?} is not JSON ({e}); a cursor placed in the body is stored as JSON text"),
                    })?;
                    out.put(param, Value::String(CURSOR_MARK.to_string()))?;
                    out.cursor = Some(c.trim().to_string());
                } else {
                    out.put(param, Value::String(c.clone()))?;
                }
            }
            (Position::At(n), Strategy::Pages(style)) => {
                let (param, field) = match style {
                    PageStyle::Number { param, .. } => (param, "page"),
                    PageStyle::Offset { param } => (param, "offset"),
                };
                let n = n.parse::<u64>().map_err(|_| ReadError::BadPosition {
                    field,
                    reason: format!("{n:?} is not a {field} number"),
                })?;
                if let (Some(from), Some((start, fmt))) = (chain_from, &self.start) {
                    out.put(start, time_value(*fmt, from))?;
                }
                out.put(param, Value::from(n))?;
            }
            (Position::At(_), Strategy::NextUrl { .. }) => unreachable_next_url(),
        }
        let mut url = self.base.clone();
        if !out.query.is_empty() {
            url.query_pairs_mut().extend_pairs(&out.query);
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        Ok(self.finish(url, &out))
    }

    fn finish(&self, url: Url, values: &Values) -> PageRequest {
        PageRequest {
            method: self.method,
            url,
            body: values.body_bytes(),
            read_only: self.read_only,
        }
    }

    fn same_origin(&self, candidate: &str, relative_to: &Url) -> Result<Url, ReadError> {
        let url = relative_to.join(candidate).map_err(|e| ReadError::BadUrl {
            url: candidate.to_string(),
            reason: e.to_string(),
        })?;
        if url.origin() != self.base.origin() {
            return Err(ReadError::CrossOrigin {
                url: redact_query(&url),
                origin: self.base.origin().ascii_serialization(),
            });
        }
        Ok(url)
    }

    /// Read the response to `req`, which fetched the page at `used`: the
    /// parts every strategy shares (depth, records, the API's own verdict),
    /// then the strategy's own rule for what comes next.
    pub fn read<'b>(
        &self,
        used: &Position,
        req: &PageRequest,
        headers: &dyn Headers,
        body: &'b [u8],
    ) -> Result<Page<'b>, ReadError> {
        if nested_deeper_than(body, MAX_JSON_DEPTH) {
            return Err(ReadError::TooDeep {
                limit: MAX_JSON_DEPTH,
            });
        }
        let got = self
            .plan
            .run(body)
            .map_err(|e| ReadError::NotJson(e.to_string()))?;
        let value = |slot: Option<usize>| slot.and_then(|i| got.values[i]);
        // An error answer first: its body has no records to speak of.
        for (rule, at, message, retry_after) in &self.errors {
            if rule_holds(rule, got.values[*at]) {
                return Err(api_error(rule, value(*message), value(*retry_after)));
            }
        }
        let ptr = self.spec.records.to_string();
        let elements = match (got.records, got.records_wrong_kind) {
            (Some(r), _) => r,
            (None, Some(kind)) => return Err(ReadError::RecordsNotArray { ptr, kind }),
            (None, None) => return Err(ReadError::RecordsMissing(ptr)),
        };
        if elements.len() > self.max_records {
            return Err(ReadError::TooManyRecords {
                count: elements.len(),
                limit: self.max_records,
            });
        }
        let last_element = elements.last().copied();
        let records = match &self.record {
            None => elements,
            Some((part, plan)) => elements
                .iter()
                .enumerate()
                .map(|(index, e)| match plan.run(e.get()) {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => Err(ReadError::RecordPart {
                        index,
                        ptr: part.to_string(),
                    }),
                    Err(err) => Err(ReadError::NotJson(err.to_string())),
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let has_more = self.bool_at(
            "has_more",
            self.spec.has_more.as_ref(),
            value(self.slots.has_more),
        )?;
        let eos = self.bool_at(
            "end_of_stream",
            self.spec.end_of_stream.as_ref(),
            value(self.slots.end_of_stream),
        )?;
        let seen = Seen {
            used: match used {
                Position::At(s) => Some(s.as_str()),
                Position::Start { .. } => None,
            },
            declared_end: eos == Some(true) || has_more == Some(false),
            declared_more: eos == Some(false) || has_more == Some(true),
            empty: records.is_empty(),
            count: records.len() as u64,
            next: value(self.slots.next),
        };
        let next = match &self.spec.strategy {
            Strategy::Cursor { from, .. } => {
                let self_cursor = value(self.slots.self_cursor);
                self.next_cursor(from, &seen, headers, last_element, self_cursor)?
            }
            Strategy::NextUrl { from } => self.next_url(from, &seen, headers, req)?,
            Strategy::Pages(style) => self.next_page(
                style,
                &seen,
                value(self.slots.total_pages),
                value(self.slots.total_count),
            )?,
        };
        Ok(Page { records, next })
    }

    /// A cursor walk: the next cursor from the body, a header or the last
    /// record; the `Self` cursor (or the one used) is where a finished walk
    /// resumes.
    fn next_cursor(
        &self,
        from: &CursorFrom,
        seen: &Seen,
        headers: &dyn Headers,
        last: Option<&RawValue>,
        self_raw: Option<&RawValue>,
    ) -> Result<Next, ReadError> {
        let json = self.cursor_in_body;
        let next = match from {
            CursorFrom::Body(p) => self.cursor_at("next_cursor", p, seen.next)?,
            CursorFrom::Header(name) => headers.header(name).filter(|s| !s.is_empty()).map(|h| {
                if json {
                    Value::String(h).to_string()
                } else {
                    h
                }
            }),
            CursorFrom::LastRecord(p) => match last {
                Some(r) => record_cursor(r, p, json)?,
                None => None,
            },
        };
        if let Some(n) = &next {
            self.check_len(n)?;
        }
        let self_cursor = match &self.spec.self_cursor {
            Some(p) => self.cursor_at("self_cursor", p, self_raw)?,
            None => None,
        };
        // It may become the stored resume point: the same limit.
        if let Some(s) = &self_cursor {
            self.check_len(s)?;
        }
        let resume = |n: Option<String>| {
            n.or(self_cursor.clone())
                .or_else(|| seen.used.map(str::to_string))
        };
        if seen.declared_end || (seen.empty && self.spec.stop_on_empty_page) {
            return Ok(Next::End {
                resume: resume(next),
            });
        }
        Ok(match next {
            None if seen.declared_more => {
                return Err(ReadError::MoreWithoutNext {
                    field: "next_cursor",
                });
            }
            None => Next::End {
                resume: resume(None),
            },
            Some(n) if Some(n.as_str()) == seen.used => {
                if seen.declared_more || !seen.empty {
                    return Err(ReadError::Loop { cursor: n });
                }
                // An empty page that hands back the same cursor: caught up (seed 004).
                Next::End { resume: Some(n) }
            }
            Some(n) => Next::More(n),
        })
    }

    /// A next-URL walk: the URL from the body or the `Link` header, on the
    /// source's origin; a finished walk resumes at the URL just fetched.
    fn next_url(
        &self,
        from: &NextUrlFrom,
        seen: &Seen,
        headers: &dyn Headers,
        req: &PageRequest,
    ) -> Result<Next, ReadError> {
        let next = match from {
            NextUrlFrom::Body(p) => self.string_at("next_url", p, seen.next)?,
            NextUrlFrom::LinkNext => headers
                .header("link")
                .and_then(|h| link::find_rel(&h, "next").map(str::to_string)),
            NextUrlFrom::Header(name) => {
                let mut values = headers.header_values(name);
                if values.len() > 1 {
                    return Err(ReadError::BadUrl {
                        url: format!("{} {name} headers", values.len()),
                        reason: "one next URL is expected, the API sent several".into(),
                    });
                }
                values
                    .pop()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            }
        };
        let here = req.url.to_string();
        if seen.declared_end || (seen.empty && self.spec.stop_on_empty_page) {
            return Ok(Next::End { resume: Some(here) });
        }
        Ok(match next {
            None if seen.declared_more => {
                return Err(ReadError::MoreWithoutNext { field: "next_url" });
            }
            None => Next::End { resume: Some(here) },
            Some(n) => {
                let mut url = self.same_origin(&n, &req.url)?;
                remove_query_params(&mut url, &self.secret_params);
                self.check_len(url.as_str())?;
                if url == req.url {
                    return Err(ReadError::Loop {
                        cursor: redact_query(&url),
                    });
                }
                Next::More(url.to_string())
            }
        })
    }

    /// Page numbers or offsets: the next position is arithmetic; an empty
    /// page, the API's verdict or its totals end the walk.
    fn next_page(
        &self,
        style: &PageStyle,
        seen: &Seen,
        total_pages_raw: Option<&RawValue>,
        total_count_raw: Option<&RawValue>,
    ) -> Result<Next, ReadError> {
        let total_pages = self.u64_at(
            "total_pages",
            self.spec.total_pages.as_ref(),
            total_pages_raw,
        )?;
        let total_count = self.u64_at(
            "total_count",
            self.spec.total_count.as_ref(),
            total_count_raw,
        )?;
        let n = seen.count;
        // Positions come from checkpoints and `pull --cursor` too: the
        // arithmetic is checked (found by fuzz/, see fuzz_regressions.rs).
        let (this, next, field) = match (style, seen.used) {
            (PageStyle::Number { first, .. }, None) => (*first, first.checked_add(1), "page"),
            (PageStyle::Number { .. }, Some(s)) => {
                let p = parse_num(s, "page")?;
                (p, p.checked_add(1), "page")
            }
            (PageStyle::Offset { .. }, None) => (0, Some(n), "offset"),
            (PageStyle::Offset { .. }, Some(s)) => {
                let o = parse_num(s, "offset")?;
                (o, o.checked_add(n), "offset")
            }
        };
        let next = next.ok_or_else(|| ReadError::BadPosition {
            field,
            reason: format!("{field} {this} is too large to advance"),
        })?;
        let past_total = match style {
            PageStyle::Number { first, .. } => {
                // Pages of this walk read so far; none for a page number
                // below first_page.
                let pages = next.saturating_sub(*first);
                total_pages.is_some_and(|t| pages >= t)
                    || total_count.is_some_and(|c| {
                        self.spec
                            .page_size
                            .is_some_and(|size| pages.saturating_mul(size) >= c)
                    })
            }
            PageStyle::Offset { .. } => total_count.is_some_and(|c| next >= c),
        };
        if seen.empty && seen.declared_more {
            return Err(ReadError::EmptyClaimsMore);
        }
        let resume = match style {
            PageStyle::Number { .. } => this,
            PageStyle::Offset { .. } => next,
        };
        if seen.empty || seen.declared_end || (past_total && !seen.declared_more) {
            // A walk filtered by a start time ends without a position: the
            // next one starts from the high-water mark (minus lag) with page
            // 1, not at page N of a list whose pages have shifted (seed
            // 002's incremental syncs). An unfiltered list resumes at its
            // last page.
            return Ok(Next::End {
                resume: match self.start {
                    Some(_) => None,
                    None => Some(resume.to_string()),
                },
            });
        }
        Ok(Next::More(next.to_string()))
    }

    fn check_len(&self, s: &str) -> Result<(), ReadError> {
        if s.len() > self.max_cursor_len {
            return Err(ReadError::CursorTooLong {
                len: s.len(),
                limit: self.max_cursor_len,
            });
        }
        Ok(())
    }

    fn bool_at(
        &self,
        field: &'static str,
        ptr: Option<&JsonPointer>,
        raw: Option<&RawValue>,
    ) -> Result<Option<bool>, ReadError> {
        let (Some(ptr), Some(raw)) = (ptr, raw) else {
            return Ok(None);
        };
        match raw.get() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            "null" => Ok(None),
            other => Err(ReadError::WrongType {
                field,
                ptr: ptr.to_string(),
                kind: kind_of(other),
                expected: "a boolean",
            }),
        }
    }

    fn u64_at(
        &self,
        field: &'static str,
        ptr: Option<&JsonPointer>,
        raw: Option<&RawValue>,
    ) -> Result<Option<u64>, ReadError> {
        let (Some(ptr), Some(raw)) = (ptr, raw) else {
            return Ok(None);
        };
        if raw.get() == "null" {
            return Ok(None);
        }
        raw.get()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ReadError::WrongType {
                field,
                ptr: ptr.to_string(),
                kind: kind_of(raw.get()),
                expected: "a non-negative integer",
            })
    }

    fn string_at(
        &self,
        field: &'static str,
        ptr: &JsonPointer,
        raw: Option<&RawValue>,
    ) -> Result<Option<String>, ReadError> {
        match raw {
            None => Ok(None),
            Some(raw) => raw_to_string(raw).map_err(|kind| ReadError::WrongType {
                field,
                ptr: ptr.to_string(),
                kind,
                expected: "a string",
            }),
        }
    }
}

impl Paginator {
    /// A cursor at `ptr` of the body: its text, or its JSON text when the
    /// cursor goes into the body.
    fn cursor_at(
        &self,
        field: &'static str,
        ptr: &JsonPointer,
        raw: Option<&RawValue>,
    ) -> Result<Option<String>, ReadError> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let wrong = |kind| ReadError::WrongType {
            field,
            ptr: ptr.to_string(),
            kind,
            expected: if self.cursor_in_body {
                "a JSON value other than a boolean"
            } else {
                "a string or number (an array or object needs cursor_param: body:/…)"
            },
        };
        cursor_text(raw, self.cursor_in_body).map_err(wrong)
    }
}

/// A cursor value as the chain stores it, from the exact text the API
/// sent (never parsed into numbers and written again, which can change a
/// float's last digit or an integer beyond 64 bits). Null and `""` mean
/// none. Placed in the body (`json`), it is its JSON text without the
/// whitespace outside strings, so a string, a number, an array or an
/// object goes back exactly as it came (`[]` and `{}` mean none); in a
/// query parameter a string is its text and a number its literal.
fn cursor_text(raw: &RawValue, json: bool) -> Result<Option<String>, &'static str> {
    let text = raw.get().trim();
    Ok(match text.as_bytes().first() {
        None => None,
        Some(b'n') => None,
        Some(b't' | b'f') => return Err("a boolean"),
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(|_| "a broken string")?;
            match (s.is_empty(), json) {
                (true, _) => None,
                (false, true) => Some(text.to_string()),
                (false, false) => Some(s),
            }
        }
        // In a query parameter only text goes back as it came: an array or
        // an object needs `cursor_param: body:/…`.
        Some(b'[') if !json => return Err("an array"),
        Some(b'{') if !json => return Err("an object"),
        Some(b'[' | b'{') => {
            let compact = compact_text(text);
            (compact != "[]" && compact != "{}").then_some(compact)
        }
        _ => Some(text.to_string()),
    })
}

/// `text` (JSON) without the whitespace outside its strings.
pub fn compact_text(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    crate::jsonbytes::compact_json(text.as_bytes(), &mut out);
    // Only ASCII whitespace was taken out of valid UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| text.to_string())
}

/// A JSON text used as a cursor in the body, tidied as the chain stores
/// it (`[1, "a"]` becomes `[1,"a"]`); `None` when it is not JSON.
pub fn tidy_json_cursor(text: &str) -> Option<String> {
    serde_json::from_str::<&RawValue>(text).ok()?;
    Some(compact_text(text.trim()))
}

/// Stands in a request body for a cursor, whose exact text replaces it once
/// the body is written (a cursor is never parsed into numbers).
const CURSOR_MARK: &str = "\u{0}tidemark:cursor\u{0}";

/// The value of one request: query parameters and the body, each value
/// put where its name says (`name` or `body:/pointer`).
struct Values {
    query: Vec<(String, String)>,
    body: Option<Value>,
    /// The cursor's JSON text, written where [`CURSOR_MARK`] stands.
    cursor: Option<String>,
}

impl Values {
    fn new(body: Option<Value>) -> Values {
        Values {
            query: Vec::new(),
            body,
            cursor: None,
        }
    }

    /// The body as sent: the template with every value in place, the
    /// cursor's text written as it is.
    fn body_bytes(&self) -> Option<Vec<u8>> {
        let body = self.body.as_ref()?;
        // A Value serializes without fail (its keys are strings).
        let text = serde_json::to_string(body).unwrap_or_default();
        Some(match &self.cursor {
            Some(c) => {
                let mark = Value::String(CURSOR_MARK.to_string()).to_string();
                text.replacen(&mark, c, 1).into_bytes()
            }
            None => text.into_bytes(),
        })
    }

    fn put(&mut self, name: &str, v: Value) -> Result<(), ReadError> {
        match Place::parse(name).map_err(|reason| ReadError::BadPosition {
            field: "parameter",
            reason,
        })? {
            Place::Query(k) => {
                let text = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                self.query.push((k, text));
                Ok(())
            }
            Place::Body(ptr) => {
                let root = self
                    .body
                    .get_or_insert_with(|| Value::Object(Default::default()));
                set_at(root, &ptr, v).map_err(|reason| ReadError::BadPosition {
                    field: "body",
                    reason,
                })
            }
        }
    }
}

/// Write `v` at `ptr` inside `root`, making objects on the way (a `null`
/// on the way becomes one); an array index must exist or be the next one.
pub fn set_at(root: &mut Value, ptr: &JsonPointer, v: Value) -> Result<(), String> {
    let mut cur = root;
    let segs = ptr.segments();
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        if cur.is_null() {
            *cur = Value::Object(Default::default());
        }
        cur = match cur {
            Value::Object(m) => {
                if last {
                    m.insert(seg.clone(), v);
                    return Ok(());
                }
                m.entry(seg.clone()).or_insert(Value::Null)
            }
            Value::Array(a) => {
                // RFC 6901: digits, no leading zero (so not `+1` or `01`).
                let canonical = seg == "0"
                    || (!seg.starts_with('0')
                        && !seg.is_empty()
                        && seg.bytes().all(|b| b.is_ascii_digit()));
                let idx: usize =
                    seg.parse().ok().filter(|_| canonical).ok_or_else(|| {
                        format!("{ptr}: {seg:?} is not an index of the array there")
                    })?;
                if idx == a.len() {
                    a.push(Value::Null);
                }
                let Some(slot) = a.get_mut(idx) else {
                    return Err(format!(
                        "{ptr}: index {idx} is past the end of the array there"
                    ));
                };
                if last {
                    *slot = v;
                    return Ok(());
                }
                slot
            }
            _ => {
                return Err(format!(
                    "{ptr} passes through a value that is not an object or array"
                ));
            }
        };
    }
    *cur = v;
    Ok(())
}

/// A time as a request value: RFC 3339 text, or a number of (milli)seconds.
fn time_value(fmt: TimeFormat, t: DateTime<Utc>) -> Value {
    match fmt {
        TimeFormat::Iso8601 => Value::String(fmt.format(t)),
        TimeFormat::Unix => Value::from(t.timestamp()),
        TimeFormat::UnixMs => Value::from(t.timestamp_millis()),
    }
}

/// True when an `error_when` rule holds for the value at its pointer.
fn rule_holds(rule: &ErrorWhen, raw: Option<&RawValue>) -> bool {
    let Some(raw) = raw else {
        return false;
    };
    if let Some(want) = &rule.equals {
        return serde_json::from_str::<Value>(raw.get()).is_ok_and(|v| &v == want);
    }
    rule.not_empty && !is_empty_json(raw.get())
}

/// `null`, `""`, or an array or object with nothing inside (whitespace aside).
fn is_empty_json(s: &str) -> bool {
    let s = s.trim();
    let blank_inside = |open: char, close: char| {
        s.len() >= 2
            && s.starts_with(open)
            && s.ends_with(close)
            && s[1..s.len() - 1].trim().is_empty()
    };
    s == "null" || s == "\"\"" || blank_inside('[', ']') || blank_inside('{', '}')
}

/// The error a rule that holds makes of the answer.
fn api_error(
    rule: &ErrorWhen,
    message: Option<&RawValue>,
    retry_after: Option<&RawValue>,
) -> ReadError {
    let text = match message.map(|m| serde_json::from_str::<Value>(m.get())) {
        Some(Ok(Value::String(s))) => s,
        Some(Ok(Value::Null)) | None => match &rule.equals {
            Some(v) => format!("{} is {v}", rule.pointer),
            None => format!("{} is present", rule.pointer),
        },
        Some(Ok(other)) => other.to_string(),
        Some(Err(_)) => "an unreadable message".into(),
    };
    let mut message: String = text.chars().take(MAX_API_MESSAGE_CHARS).collect();
    if text.chars().count() > MAX_API_MESSAGE_CHARS {
        message.push('…');
    }
    let retry_after = retry_after.and_then(|r| match serde_json::from_str::<Value>(r.get()) {
        Ok(Value::Number(n)) => n.as_f64().filter(|s| *s >= 0.0).map(|s| s.ceil() as u64),
        Ok(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s >= 0.0)
            .map(|s| s.ceil() as u64),
        _ => None,
    });
    ReadError::Api {
        message,
        transient: rule.transient,
        retry_after: if rule.transient { retry_after } else { None },
    }
}

fn unreachable_next_url() {
    // `request` returns early for NextUrl positions; nothing to add here.
}

fn parse_num(s: &str, field: &'static str) -> Result<u64, ReadError> {
    s.parse().map_err(|_| ReadError::BadPosition {
        field,
        reason: format!("{s:?} is not a {field} number"),
    })
}

/// A cursor-like value: a string, or a number written as text. Null and ""
/// mean "none".
fn raw_to_string(raw: &RawValue) -> Result<Option<String>, &'static str> {
    let s = raw.get();
    match s.as_bytes().first() {
        Some(b'"') => {
            let v: String = serde_json::from_str(s).map_err(|_| "a broken string")?;
            Ok((!v.is_empty()).then_some(v))
        }
        Some(b'-' | b'0'..=b'9') => Ok(Some(s.to_string())),
        _ if s == "null" => Ok(None),
        _ => Err(kind_of(s)),
    }
}

fn record_cursor(
    record: &RawValue,
    ptr: &JsonPointer,
    json: bool,
) -> Result<Option<String>, ReadError> {
    let raw = raw_at(record.get(), ptr).map_err(|e| ReadError::NotJson(e.to_string()))?;
    match raw {
        None => Ok(None),
        Some(c) => cursor_text(c, json).map_err(|kind| ReadError::WrongType {
            field: "next_cursor",
            ptr: format!("last_record:{ptr}"),
            kind,
            expected: if json {
                "a JSON value other than a boolean"
            } else {
                "a string or number (an array or object needs cursor_param: body:/…)"
            },
        }),
    }
}

fn kind_of(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Empty pages in a row, each with a new cursor and more claimed, after
/// which a cursor walk is taken for a loop whose cursor changes. (An API may
/// skip a filtered-out page with an empty one, but not forever.)
pub const MAX_EMPTY_PAGES_IN_A_ROW: u32 = 100;

/// The error of a walk stopped by [`MAX_EMPTY_PAGES_IN_A_ROW`].
pub fn empty_run_error() -> String {
    format!(
        "the API answered {MAX_EMPTY_PAGES_IN_A_ROW} empty pages in a row, each with a new cursor and more claimed: stopped as a pagination loop"
    )
}

/// Remove the query parameters named in `names` from `url`. A URL without
/// any of them is left exactly as it is (not re-encoded).
pub fn remove_query_params(url: &mut Url, names: &[impl AsRef<str>]) {
    let named = |k: &str| names.iter().any(|n| n.as_ref() == k);
    if !url.query_pairs().any(|(k, _)| named(&k)) {
        return;
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !named(k))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
}

/// A URL for messages: the query is dropped (it may carry an api key).
pub fn redact_query(url: &Url) -> String {
    let mut u = url.clone();
    let had_query = u.query().is_some();
    u.set_query(None);
    u.set_fragment(None);
    u.set_password(None).ok();
    let mut s = u.to_string();
    if had_query {
        // Appended as text: inside the URL it would be percent-encoded.
        s.push_str("?…");
    }
    s
}
