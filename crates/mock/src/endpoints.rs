//! The data endpoints, one function per API style. Each reads its query,
//! asks the dataset for a page and renders that style's wire format.

use std::collections::HashMap;

use crate::CommentsConfig;
use crate::comments;
use crate::cursor::{self, Decoded};
use crate::dataset::{Dataset, Pos, Rec};
use crate::dialects;

pub type Query = HashMap<String, String>;

/// Settings every endpoint needs.
pub struct Ctx<'a> {
    /// `http://host:port`, from the request's Host header, followed by
    /// `/t/{tenant}` for a tenant's request, so next URLs keep the prefix.
    pub base: &'a str,
    pub default_page_size: usize,
    pub max_page_size: usize,
    /// Records updated after this (unix seconds) are hidden; None: none hidden.
    pub visible_until: Option<i64>,
    pub cursor_ttl_ms: Option<i64>,
    /// Comment counts and their default page size.
    pub comments: &'a CommentsConfig,
    /// The request's method, upper case (`GET`, `POST`, ...).
    pub method: &'a str,
    /// The request body parsed as JSON; None when the body was empty.
    pub body: Option<&'a serde_json::Value>,
}

pub struct Reply {
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    /// A 200 with this JSON body and no extra headers.
    pub fn json(body: String) -> Self {
        Reply {
            body,
            headers: vec![],
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
    /// The exact JSON body to answer instead of
    /// `{"error":…,"description":…}` (for dialects with their own error shape).
    pub body: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            description: description.into(),
            body: None,
        }
    }

    /// An error answered with exactly `body`.
    pub fn raw(status: u16, error: &'static str, body: &serde_json::Value) -> Self {
        ApiError {
            status,
            error,
            description: String::new(),
            body: Some(body.to_string()),
        }
    }
}

pub(crate) fn bad(description: impl Into<String>) -> ApiError {
    ApiError::new(400, "invalid_request", description)
}

pub(crate) fn records(recs: &[Rec]) -> String {
    let mut s = String::with_capacity(recs.iter().map(|r| r.json.len() + 1).sum::<usize>() + 2);
    s.push('[');
    for (i, r) in recs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&r.json);
    }
    s.push(']');
    s
}

pub(crate) fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

pub(crate) fn pos(r: &Rec) -> Pos {
    (r.updated_at, r.id.clone())
}

pub(crate) fn num<T: std::str::FromStr>(q: &Query, name: &str) -> Result<Option<T>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("{name} must be a number, got {v:?}"))),
    }
}

fn time(q: &Query, name: &str) -> Result<Option<i64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| Some(t.timestamp()))
            .map_err(|_| bad(format!("{name} must be an RFC 3339 time, got {v:?}"))),
    }
}

pub(crate) fn limit(q: &Query, name: &str, ctx: &Ctx) -> Result<usize, ApiError> {
    let n: usize = num(q, name)?.unwrap_or(ctx.default_page_size);
    if n == 0 {
        return Err(bad(format!("{name} must be at least 1")));
    }
    Ok(n.min(ctx.max_page_size))
}

/// Whether the cursor TTL fault refuses `d`.
pub(crate) fn expired(d: &Decoded, ctx: &Ctx) -> bool {
    ctx.cursor_ttl_ms
        .is_some_and(|ttl| cursor::now_ms() - d.iat_ms > ttl)
}

pub(crate) fn check_age(d: &Decoded, ctx: &Ctx) -> Result<(), ApiError> {
    if expired(d, ctx) {
        return Err(ApiError::new(
            400,
            "cursor_expired",
            "the cursor has expired; start again from a time",
        ));
    }
    Ok(())
}

fn opaque(q: &Query, name: &str, ctx: &Ctx) -> Result<Option<Option<Pos>>, ApiError> {
    match q.get(name).filter(|c| !c.is_empty()) {
        None => Ok(None),
        Some(c) => {
            let d =
                cursor::decode(c).ok_or_else(|| bad(format!("{name} is not a valid cursor")))?;
            check_age(&d, ctx)?;
            Ok(Some(d.after))
        }
    }
}

/// The upper bound of a time-ordered walk: the end filter and the hidden newest records.
pub(crate) fn upper(end: Option<i64>, ctx: &Ctx) -> Option<i64> {
    match (end, ctx.visible_until.map(|t| t + 1)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Where a time-ordered walk is: after a cursor, or from a start time.
fn start_pos(cursor: Option<Option<Pos>>, since: Option<i64>) -> (Option<Pos>, Option<i64>) {
    match cursor {
        Some(after) => (after, None),
        None => (None, since),
    }
}

/// The position just before `since`, so a cursor can stand for "from since".
fn before(since: Option<i64>) -> Option<Pos> {
    since.map(|s| (s - 1, "~".to_string()))
}

/// Seed 003: Zendesk's cursor-based incremental export.
pub fn zendesk(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let cursor = opaque(q, "cursor", ctx)?;
    let start: Option<i64> = num(q, "start_time")?;
    if cursor.is_none() && start.is_none() {
        return Err(bad("start_time or cursor is required"));
    }
    let n = limit(q, "per_page", ctx)?;
    let (after, min) = start_pos(cursor, start);
    let (page, more) = ds.changes(after.as_ref(), min, upper(num(q, "end_time")?, ctx), n);
    let last = page.last().map(pos).or(after).or_else(|| before(min));
    let c = cursor::encode(last.as_ref());
    let body = format!(
        r#"{{"tickets":{},"after_url":{},"after_cursor":{},"before_cursor":null,"end_of_stream":{}}}"#,
        records(&page),
        js(&format!(
            "{}/api/v2/incremental/tickets/cursor.json?per_page={n}&cursor={c}",
            ctx.base
        )),
        js(&c),
        !more
    );
    Ok(Reply {
        body,
        headers: vec![],
    })
}

/// Seed 002: keyset bulk walk, or traditional pages with updatedSince.
pub fn inspections(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "limit", ctx)?;
    match q.get("paginationMode").map(String::as_str) {
        Some("CURSOR") => {
            let (page, more) = ds.created_after(
                q.get("startAfter")
                    .map(String::as_str)
                    .filter(|s| !s.is_empty()),
                n,
            );
            let next = page
                .last()
                .map(|r| js(&r.id))
                .unwrap_or_else(|| "null".into());
            let body = format!(
                r#"{{"data":{},"meta":{{"limit":{n},"hasMore":{more},"nextStartAfter":{next}}}}}"#,
                records(&page)
            );
            Ok(Reply {
                body,
                headers: vec![],
            })
        }
        None | Some("PAGE") => {
            let page_no: usize = num(q, "page")?.unwrap_or(1);
            if page_no == 0 {
                return Err(bad("page starts at 1"));
            }
            let (page, total) = ds.changed_since_page(time(q, "updatedSince")?, page_no, n);
            let body = format!(
                r#"{{"data":{},"meta":{{"page":{page_no},"limit":{n},"total":{total},"totalPages":{}}}}}"#,
                records(&page),
                total.div_ceil(n)
            );
            Ok(Reply {
                body,
                headers: vec![],
            })
        }
        Some(other) => Err(bad(format!(
            "paginationMode must be CURSOR or PAGE, got {other:?}"
        ))),
    }
}

/// Seed 001: `Cursors.Next` / `Cursors.Self`.
pub fn events(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "limit", ctx)?;
    let (after, min) = start_pos(opaque(q, "cursor", ctx)?, time(q, "updated_since")?);
    let (page, more) = ds.changes(
        after.as_ref(),
        min,
        upper(time(q, "updated_before")?, ctx),
        n,
    );
    let this = cursor::encode(after.or_else(|| before(min)).as_ref());
    let next = if more {
        page.last()
            .map(|r| cursor::encode(Some(&pos(r))))
            .unwrap_or_default()
    } else {
        String::new()
    };
    let link = |c: &str| js(&format!("{}/v1/events?limit={n}&cursor={c}", ctx.base));
    let omit = q.get("omit_next").is_some_and(|v| v == "1" || v == "true");
    let (cursor_next, link_next) = if omit && next.is_empty() {
        (String::new(), String::new())
    } else {
        (
            format!(r#","Next":{}"#, js(&next)),
            format!(
                r#","Next":{}"#,
                if next.is_empty() { js("") } else { link(&next) }
            ),
        )
    };
    let body = format!(
        r#"{{"Data":{},"Cursors":{{"Self":{}{cursor_next}}},"Links":{{"Self":{}{link_next}}}}}"#,
        records(&page),
        js(&this),
        link(&this)
    );
    Ok(Reply {
        body,
        headers: vec![],
    })
}

/// Seed 004: a base64 keyset cursor; an empty page echoes the cursor it was given.
pub fn items(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "limit", ctx)?;
    let given = q.get("starting_at").filter(|c| !c.is_empty());
    let cursor = match given {
        None => None,
        Some(c) => {
            let d =
                cursor::decode_keyset(c).ok_or_else(|| bad("starting_at is not a valid cursor"))?;
            check_age(&d, ctx)?;
            Some(d.after)
        }
    };
    let (after, min) = start_pos(cursor, time(q, "updated_since")?);
    let (page, _) = ds.changes(
        after.as_ref(),
        min,
        upper(time(q, "updated_before")?, ctx),
        n,
    );
    let starting_at = match (page.last(), given) {
        (Some(r), _) => cursor::encode_keyset(Some(&pos(r))),
        (None, Some(g)) => g.clone(),
        (None, None) => cursor::encode_keyset(after.or_else(|| before(min)).as_ref()),
    };
    let previous = given.map(|g| js(g)).unwrap_or_else(|| "null".into());
    let body = format!(
        r#"{{"items":{},"cursor":{{"starting_at":{},"previous":{previous}}}}}"#,
        records(&page),
        js(&starting_at)
    );
    Ok(Reply {
        body,
        headers: vec![],
    })
}

/// Seed 000: an opaque cursor, returned even when there is nothing new.
pub fn sync(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "limit", ctx)?;
    let (after, min) = start_pos(opaque(q, "cursor", ctx)?, time(q, "updated_since")?);
    let (page, _) = ds.changes(after.as_ref(), min, upper(None, ctx), n);
    let c = cursor::encode(
        page.last()
            .map(pos)
            .or(after)
            .or_else(|| before(min))
            .as_ref(),
    );
    Ok(Reply {
        body: format!(r#"{{"records":{},"cursor":{}}}"#, records(&page), js(&c)),
        headers: vec![],
    })
}

fn keep(q: &Query, names: &[&str]) -> String {
    let mut s = String::new();
    for n in names {
        if let Some(v) = q.get(*n) {
            s.push('&');
            s.push_str(
                &url::form_urlencoded::Serializer::new(String::new())
                    .append_pair(n, v)
                    .finish(),
            );
        }
    }
    s
}

/// A full next URL in the body (JSON:API `links.next`).
pub fn jsonapi(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "limit", ctx)?;
    let (after, min) = start_pos(opaque(q, "after", ctx)?, time(q, "updated_since")?);
    let (page, more) = ds.changes(
        after.as_ref(),
        min,
        upper(time(q, "updated_before")?, ctx),
        n,
    );
    let url = |c: &str| {
        format!(
            "{}/jsonapi/records?after={c}&limit={n}{}",
            ctx.base,
            keep(q, &["updated_before"])
        )
    };
    let this = url(&cursor::encode(after.or_else(|| before(min)).as_ref()));
    let next = match (more, page.last()) {
        (true, Some(r)) => js(&url(&cursor::encode(Some(&pos(r))))),
        _ => "null".into(),
    };
    Ok(Reply {
        body: format!(
            r#"{{"data":{},"links":{{"self":{},"next":{next}}}}}"#,
            records(&page),
            js(&this)
        ),
        headers: vec![],
    })
}

/// RFC 8288 Link header; the body is the array.
pub fn github(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "per_page", ctx)?;
    let ms_to_s =
        |ms: Option<i64>| ms.map(|m: i64| m.div_euclid(1000) + i64::from(m.rem_euclid(1000) != 0));
    let (after, min) = start_pos(opaque(q, "after", ctx)?, ms_to_s(num(q, "since_ms")?));
    let (page, more) = ds.changes(
        after.as_ref(),
        min,
        upper(ms_to_s(num(q, "until_ms")?), ctx),
        n,
    );
    let mut links = Vec::new();
    if more && let Some(r) = page.last() {
        let c = cursor::encode(Some(&pos(r)));
        links.push(format!(
            "<{}/github/records?after={c}&per_page={n}{}>; rel=\"next\"",
            ctx.base,
            keep(q, &["until_ms"])
        ));
    }
    links.push(format!(
        "<{}/github/records?per_page={n}>; rel=\"first\"",
        ctx.base
    ));
    Ok(Reply {
        body: records(&page),
        headers: vec![("link", links.join(", "))],
    })
}

/// Page numbers over creation order.
pub fn paged(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "per_page", ctx)?;
    let page_no: usize = num(q, "page")?.unwrap_or(1);
    if page_no == 0 {
        return Err(bad("page starts at 1"));
    }
    let (page, total) = ds.slice((page_no - 1).saturating_mul(n), n);
    let body = format!(
        r#"{{"records":{},"page":{page_no},"total_pages":{},"total_count":{total}}}"#,
        records(&page),
        total.div_ceil(n)
    );
    Ok(Reply {
        body,
        headers: vec![],
    })
}

/// Offsets over creation order.
pub fn offset(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "limit", ctx)?;
    let off: usize = num(q, "offset")?.unwrap_or(0);
    let (page, total) = ds.slice(off, n);
    Ok(Reply {
        body: format!(
            r#"{{"records":{},"offset":{off},"total":{total}}}"#,
            records(&page)
        ),
        headers: vec![],
    })
}

/// The data endpoints, by path.
enum Endpoint<'p> {
    Zendesk,
    Events,
    Items,
    Sync,
    JsonApi,
    Github,
    Paged,
    Offset,
    TicketComments(&'p str),
    BatchComments,
    Broken,
    Inspections,
    GraphQl,
    Notion,
    Search,
    Kinto,
    Slack,
}

impl Endpoint<'_> {
    fn of(path: &str) -> Option<Endpoint<'_>> {
        if let Some(id) = comments::ticket_of_path(path) {
            return Some(Endpoint::TicketComments(id));
        }
        Some(match path {
            "/api/v2/incremental/tickets/cursor.json" => Endpoint::Zendesk,
            "/v1/events" => Endpoint::Events,
            "/items" => Endpoint::Items,
            "/sync/records" => Endpoint::Sync,
            "/jsonapi/records" => Endpoint::JsonApi,
            "/github/records" => Endpoint::Github,
            "/paged/records" => Endpoint::Paged,
            "/offset/records" => Endpoint::Offset,
            comments::BATCH_PATH => Endpoint::BatchComments,
            "/broken/records" => Endpoint::Broken,
            dialects::GRAPHQL_PATH => Endpoint::GraphQl,
            dialects::SEARCH_PATH => Endpoint::Search,
            dialects::KINTO_PATH => Endpoint::Kinto,
            dialects::SLACK_PATH => Endpoint::Slack,
            p if p.starts_with("/v2/clients/") && p.ends_with("/inspections") => {
                Endpoint::Inspections
            }
            p if dialects::is_notion_path(p) => Endpoint::Notion,
            _ => return None,
        })
    }

    /// Whether the endpoint is read with POST (else GET).
    fn is_post(&self) -> bool {
        matches!(
            self,
            Endpoint::GraphQl | Endpoint::Notion | Endpoint::Search
        )
    }
}

/// Route a data request to its endpoint: 404 for an unknown path, 405 for
/// a method the endpoint does not take (GET endpoints also take HEAD).
pub fn serve(ds: &Dataset, path: &str, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let Some(endpoint) = Endpoint::of(path) else {
        return Err(ApiError::new(
            404,
            "not_found",
            format!("no endpoint {path}; GET / lists them"),
        ));
    };
    let allowed = if endpoint.is_post() {
        ctx.method == "POST"
    } else {
        matches!(ctx.method, "GET" | "HEAD")
    };
    if !allowed {
        let want = if endpoint.is_post() { "POST" } else { "GET" };
        return Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{path} takes {want}, not {}", ctx.method),
        ));
    }
    match endpoint {
        Endpoint::Zendesk => zendesk(ds, q, ctx),
        Endpoint::Events => events(ds, q, ctx),
        Endpoint::Items => items(ds, q, ctx),
        Endpoint::Sync => sync(ds, q, ctx),
        Endpoint::JsonApi => jsonapi(ds, q, ctx),
        Endpoint::Github => github(ds, q, ctx),
        Endpoint::Paged => paged(ds, q, ctx),
        Endpoint::Offset => offset(ds, q, ctx),
        Endpoint::TicketComments(id) => comments::ticket_comments(ds, id, q, ctx),
        Endpoint::BatchComments => comments::batch(ds, q, ctx),
        // An endpoint that is always down, for failure tests.
        Endpoint::Broken => Err(ApiError::new(
            500,
            "internal_error",
            "this endpoint always fails",
        )),
        Endpoint::Inspections => inspections(ds, q, ctx),
        Endpoint::GraphQl => dialects::graphql(ds, ctx),
        Endpoint::Notion => dialects::notion(ds, ctx),
        Endpoint::Search => dialects::search(ds, ctx),
        Endpoint::Kinto => dialects::kinto(ds, q, ctx),
        Endpoint::Slack => dialects::slack(ds, q, ctx),
    }
}
