//! Request dialects: the same records in change order, asked for in the
//! ways other APIs are asked — a POSTed GraphQL query with Relay edges, a
//! Notion-style cursor in a POSTed body, Elasticsearch's `search_after`
//! array, a next URL in a `Next-Page` header (Kinto) and Slack's errors
//! inside a 200.
//!
//! Every dialect serves the records exactly as `records()` renders them
//! (their `Rec.json`), so a full walk delivers every current record and
//! the ground truth applies.

use serde_json::{Map, Value, json};

use crate::cursor::{self, Decoded};
use crate::dataset::{Dataset, Pos};
use crate::endpoints::{
    ApiError, Ctx, Query, Reply, bad, expired, js, limit, num, pos, records, upper,
};

pub(crate) const GRAPHQL_PATH: &str = "/graphql";
pub(crate) const SEARCH_PATH: &str = "/es/records/_search";
pub(crate) const KINTO_PATH: &str = "/kinto/records";
pub(crate) const SLACK_PATH: &str = "/slack/conversations.history";
const NOTION_PREFIX: &str = "/notion/v1/databases/";
const NOTION_SUFFIX: &str = "/query";

/// `/notion/v1/databases/{id}/query`, any non-empty id.
pub(crate) fn is_notion_path(path: &str) -> bool {
    path.strip_prefix(NOTION_PREFIX)
        .and_then(|p| p.strip_suffix(NOTION_SUFFIX))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Whether the `error_200_every` fault applies to `path` (without its
/// tenant prefix), and the 200 body it answers there.
pub(crate) fn error_200_body(path: &str, retry_after_secs: u64) -> Option<String> {
    if path == GRAPHQL_PATH {
        Some(
            json!({"data": null, "errors": [{
                "message": "API rate limit exceeded",
                "extensions": {"code": "RATE_LIMITED", "retryAfter": retry_after_secs},
            }]})
            .to_string(),
        )
    } else if path.starts_with("/slack/") {
        Some(r#"{"ok":false,"error":"ratelimited"}"#.to_string())
    } else {
        None
    }
}

/// The body as a JSON object: an empty body is an empty object; anything
/// but an object is `Err(())`.
fn body_object<'a>(
    ctx: &Ctx<'a>,
    empty: &'a Map<String, Value>,
) -> Result<&'a Map<String, Value>, ()> {
    match ctx.body {
        None => Ok(empty),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(()),
    }
}

/// The page size in a JSON body: absent or null is the default; otherwise
/// a whole number, at least `min`, capped by the maximum page size.
fn json_size(v: Option<&Value>, min: u64, ctx: &Ctx) -> Option<usize> {
    match v {
        None | Some(Value::Null) => Some(ctx.default_page_size),
        Some(v) => v.as_u64().filter(|&n| n >= min).map(|n| {
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(ctx.max_page_size)
        }),
    }
}

/// An RFC 3339 time as the first whole second at or after it (so
/// `updated_at >= since` holds for whole-second times).
fn rfc3339_ceil(s: &str) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(t.timestamp() + i64::from(t.timestamp_subsec_nanos() > 0))
}

/// A cursor the client sent, decoded, for dialects that answer their own
/// error shape.
enum CursorError {
    Invalid,
    Expired,
}

fn decode_checked(
    c: &str,
    decode: fn(&str) -> Option<Decoded>,
    ctx: &Ctx,
) -> Result<Option<Pos>, CursorError> {
    let d = decode(c).ok_or(CursorError::Invalid)?;
    if expired(&d, ctx) {
        return Err(CursorError::Expired);
    }
    Ok(d.after)
}

// --- GraphQL with Relay edges -------------------------------------------

fn graphql_error(code: &str, message: &str) -> Reply {
    Reply::json(
        json!({"data": null, "errors": [{"message": message, "extensions": {"code": code}}]})
            .to_string(),
    )
}

fn graphql_parse_failed(message: &str) -> Reply {
    Reply::json(
        json!({"errors": [{"message": message, "extensions": {"code": "GRAPHQL_PARSE_FAILED"}}]})
            .to_string(),
    )
}

/// `POST /graphql` `{"query": "…records…", "variables": {"first", "after", "since"}}`:
/// `{"data":{"records":{"edges":[{"cursor","node"}],"pageInfo":{"endCursor","hasNextPage"}}}}`.
/// Errors are 200s with `errors` (GraphQL style).
pub fn graphql(ds: &Dataset, ctx: &Ctx) -> Result<Reply, ApiError> {
    let body = ctx.body.and_then(Value::as_object);
    let query = body
        .and_then(|b| b.get("query"))
        .and_then(Value::as_str)
        .filter(|q| !q.trim().is_empty());
    match query {
        None => {
            return Ok(graphql_parse_failed(
                "the body must be {\"query\": \"<a non-empty query>\", \"variables\": {...}}",
            ));
        }
        Some(q) if !q.contains("records") => {
            return Ok(graphql_parse_failed(
                "the query must select the `records` field",
            ));
        }
        Some(_) => {}
    }
    let empty = Map::new();
    let vars = match body.and_then(|b| b.get("variables")) {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Ok(graphql_error(
                "BAD_USER_INPUT",
                "variables must be an object",
            ));
        }
    };
    let Some(first) = json_size(vars.get("first"), 1, ctx) else {
        return Ok(graphql_error(
            "BAD_USER_INPUT",
            "first must be a whole number, at least 1",
        ));
    };
    let since = match vars.get("since") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_str().and_then(rfc3339_ceil) {
            Some(t) => Some(t),
            None => {
                return Ok(graphql_error(
                    "BAD_USER_INPUT",
                    "since must be an RFC 3339 time",
                ));
            }
        },
    };
    let given = match vars.get("after") {
        None | Some(Value::Null) => None,
        Some(Value::String(c)) => Some(c.as_str()),
        Some(_) => return Ok(graphql_error("INVALID_CURSOR", "invalid cursor")),
    };
    let after = match given.map(|c| decode_checked(c, cursor::decode_keyset, ctx)) {
        None => None,
        Some(Ok(after)) => after,
        Some(Err(CursorError::Invalid)) => {
            return Ok(graphql_error("INVALID_CURSOR", "invalid cursor"));
        }
        Some(Err(CursorError::Expired)) => {
            return Ok(graphql_error("CURSOR_EXPIRED", "cursor expired"));
        }
    };
    let (page, more) = ds.changes(after.as_ref(), since, upper(None, ctx), first);
    let mut edges = String::with_capacity(page.iter().map(|r| r.json.len() + 120).sum());
    let mut end = given.map_or_else(|| "null".to_string(), js);
    for (i, r) in page.iter().enumerate() {
        if i > 0 {
            edges.push(',');
        }
        end = js(&cursor::encode_keyset(Some(&pos(r))));
        edges.push_str(&format!(r#"{{"cursor":{end},"node":{}}}"#, r.json));
    }
    Ok(Reply::json(format!(
        r#"{{"data":{{"records":{{"edges":[{edges}],"pageInfo":{{"endCursor":{end},"hasNextPage":{more}}}}}}}}}"#
    )))
}

// --- Notion: the cursor in a POSTed body --------------------------------

fn notion_error(code: &str, message: &str) -> ApiError {
    ApiError::raw(
        400,
        "validation_error",
        &json!({"object": "error", "status": 400, "code": code, "message": message}),
    )
}

/// `POST /notion/v1/databases/{id}/query` `{"page_size", "start_cursor"}`:
/// `{"object":"list","results":[…],"next_cursor","has_more","type":"page_or_database"}`.
pub fn notion(ds: &Dataset, ctx: &Ctx) -> Result<Reply, ApiError> {
    let empty = Map::new();
    let body = body_object(ctx, &empty)
        .map_err(|()| notion_error("validation_error", "body should be an object"))?;
    let n = json_size(body.get("page_size"), 1, ctx).ok_or_else(|| {
        notion_error(
            "validation_error",
            "body.page_size should be a number, at least 1",
        )
    })?;
    let after = match body.get("start_cursor") {
        None => None,
        Some(Value::String(c)) => match decode_checked(c, cursor::decode, ctx) {
            Ok(after) => after,
            Err(CursorError::Invalid) => {
                return Err(notion_error(
                    "validation_error",
                    "body.start_cursor should be a valid cursor",
                ));
            }
            Err(CursorError::Expired) => {
                return Err(notion_error(
                    "cursor_expired",
                    "cursor expired; start again without start_cursor",
                ));
            }
        },
        Some(_) => {
            return Err(notion_error(
                "validation_error",
                "body.start_cursor should be a string",
            ));
        }
    };
    let (page, more) = ds.changes(after.as_ref(), None, upper(None, ctx), n);
    let next = page
        .last()
        .filter(|_| more)
        .map(|r| cursor::encode(Some(&pos(r))));
    Ok(Reply::json(format!(
        r#"{{"object":"list","results":{},"next_cursor":{},"has_more":{},"type":"page_or_database"}}"#,
        records(&page),
        next.as_deref().map_or_else(|| "null".to_string(), js),
        next.is_some()
    )))
}

// --- Elasticsearch search_after -----------------------------------------

fn es_error(reason: &str) -> ApiError {
    ApiError::raw(
        400,
        "illegal_argument_exception",
        &json!({"error": {"type": "illegal_argument_exception", "reason": reason}, "status": 400}),
    )
}

/// A time in an ES query: integer unix seconds, or a string of them, or an
/// RFC 3339 string.
fn es_time(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok().or_else(|| rfc3339_ceil(s)),
        _ => None,
    }
}

/// `POST /es/records/_search` `{"size", "sort", "search_after": [t, id],
/// "query": {"range": {"updated_at": {"gte": t}}}}`: the hits after
/// `search_after` in change order, each with `"sort": [updated_at, id]`.
pub fn search(ds: &Dataset, ctx: &Ctx) -> Result<Reply, ApiError> {
    let empty = Map::new();
    let body =
        body_object(ctx, &empty).map_err(|()| es_error("request body must be a JSON object"))?;
    let n = json_size(body.get("size"), 0, ctx)
        .ok_or_else(|| es_error("[size] must be a non-negative integer"))?;
    let after = match body.get("search_after") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::Number(t), Value::String(id)] if t.as_i64().is_some() => {
                t.as_i64().map(|t| (t, id.clone()))
            }
            _ => {
                return Err(es_error(
                    "search_after must be [<updated_at as integer unix seconds>, \"<id>\"], \
                     matching the sort [updated_at, id]",
                ));
            }
        },
        Some(_) => return Err(es_error("[search_after] must be an array")),
    };
    let since = match body
        .get("query")
        .and_then(|q| q.get("range"))
        .and_then(|r| r.get("updated_at"))
        .and_then(|u| u.get("gte"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(es_time(v).ok_or_else(|| {
            es_error("[range][updated_at][gte] must be unix seconds (an integer)")
        })?),
    };
    let (page, _) = ds.changes(after.as_ref(), since, upper(None, ctx), n);
    let mut hits = String::with_capacity(page.iter().map(|r| r.json.len() + 200).sum());
    for (i, r) in page.iter().enumerate() {
        if i > 0 {
            hits.push(',');
        }
        let id = js(&r.id);
        hits.push_str(&format!(
            r#"{{"_index":"records","_id":{id},"_score":null,"_source":{},"sort":[{},{id}]}}"#,
            r.json, r.updated_at
        ));
    }
    Ok(Reply::json(format!(
        r#"{{"took":1,"timed_out":false,"hits":{{"total":{{"value":{},"relation":"eq"}},"hits":[{hits}]}}}}"#,
        ds.len()
    )))
}

// --- Kinto: the next URL in a Next-Page header --------------------------

/// `GET /kinto/records?_limit=&_since=&_token=`: `{"data":[…]}` and, while
/// more follow, `Next-Page: <base>/kinto/records?_limit=N&_token=…`.
pub fn kinto(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    let n = limit(q, "_limit", ctx)?;
    let since: Option<i64> = num(q, "_since")?;
    let after = match q.get("_token").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let d = cursor::decode(c).ok_or_else(|| bad("_token is not a valid token"))?;
            if expired(&d, ctx) {
                return Err(ApiError::new(
                    400,
                    "cursor_expired",
                    "cursor expired: start again from _since",
                ));
            }
            d.after
        }
    };
    let (page, more) = ds.changes(after.as_ref(), since, upper(None, ctx), n);
    let mut headers = vec![];
    if more && let Some(r) = page.last() {
        headers.push((
            "next-page",
            format!(
                "{}{KINTO_PATH}?_limit={n}&_token={}",
                ctx.base,
                cursor::encode(Some(&pos(r)))
            ),
        ));
    }
    Ok(Reply {
        body: format!(r#"{{"data":{}}}"#, records(&page)),
        headers,
    })
}

// --- Slack: errors inside a 200 -----------------------------------------

fn slack_error(error: &str) -> Reply {
    Reply::json(json!({"ok": false, "error": error}).to_string())
}

/// `GET /slack/conversations.history?channel=&limit=&cursor=&oldest=`:
/// `{"ok":true,"messages":[…],"has_more","response_metadata":{"next_cursor"}}`;
/// every error is a 200 `{"ok":false,"error":"…"}`.
pub fn slack(ds: &Dataset, q: &Query, ctx: &Ctx) -> Result<Reply, ApiError> {
    if q.get("channel")
        .is_none_or(|c| c.is_empty() || c == "missing")
    {
        return Ok(slack_error("channel_not_found"));
    }
    let Ok(n) = limit(q, "limit", ctx) else {
        return Ok(slack_error("invalid_limit"));
    };
    let oldest = match q.get("oldest").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(t) if t.is_finite() => Some(t.ceil() as i64),
            _ => return Ok(slack_error("invalid_ts_oldest")),
        },
    };
    let after = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match decode_checked(c, cursor::decode, ctx) {
            Ok(after) => after,
            Err(CursorError::Invalid) => return Ok(slack_error("invalid_cursor")),
            Err(CursorError::Expired) => return Ok(slack_error("cursor_expired")),
        },
    };
    let (page, more) = ds.changes(after.as_ref(), oldest, upper(None, ctx), n);
    let next = match (more, page.last()) {
        (true, Some(r)) => cursor::encode(Some(&pos(r))),
        _ => String::new(),
    };
    Ok(Reply::json(format!(
        r#"{{"ok":true,"messages":{},"has_more":{},"response_metadata":{{"next_cursor":{}}}}}"#,
        records(&page),
        !next.is_empty(),
        js(&next)
    )))
}
