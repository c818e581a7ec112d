//! Hostile cursor APIs, for proving that bad input ends in a clear error
//! and never in a panic, a spin or a silent skip.
//!
//! `GET /hostile/{kind}?cursor=` answers like a plain cursor API
//! (`{"records": [...], "next": "<cursor>"}`). Without a cursor it serves a
//! good first page of three records (`h1`, `h2`, `h3`) with `"next": "p2"`.
//! With any cursor (the first page hands out `p2`) it serves the bad page of
//! `kind`:
//!
//! | kind | the bad page |
//! |---|---|
//! | `loop` | records, `"has_more": true` and `"next"` the cursor it was given |
//! | `huge` | a valid JSON body of about 100 MiB, streamed in 1 MiB chunks |
//! | `utf8` | a 200 whose body has invalid UTF-8 bytes inside a JSON string |
//! | `types` | `"records"` is an object, not an array |
//! | `empty_more` | no records, `"has_more": true` and `"next": "p3"` (so `p3` pages to itself) |
//! | `empty_forever` | no records, `"has_more": true` and a new cursor every time (`pN` leads to `pN+1`) |
//! | `deep` | a record nested 10,000 arrays deep |
//! | `long_cursor` | a good record and a 20,000-byte next cursor |
//!
//! An unknown kind is a 404.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// The kinds served.
pub const KINDS: [&str; 8] = [
    "loop",
    "huge",
    "utf8",
    "types",
    "empty_more",
    "empty_forever",
    "deep",
    "long_cursor",
];

/// Bytes in the `huge` body, at least.
pub const HUGE_BYTES: usize = 100 * 1024 * 1024;
const HUGE_CHUNK: usize = 1024 * 1024;

const FIRST_PAGE: &str = concat!(
    r#"{"records":["#,
    r#"{"id":"h1","updated_at":"2024-01-01T00:00:00Z"},"#,
    r#"{"id":"h2","updated_at":"2024-01-01T00:00:01Z"},"#,
    r#"{"id":"h3","updated_at":"2024-01-01T00:00:02Z"}"#,
    r#"],"has_more":true,"next":"p2"}"#
);

/// The response for `kind` at `cursor` (`None` or empty: the first page).
pub fn serve(kind: &str, cursor: Option<&str>) -> Response {
    if !KINDS.contains(&kind) {
        let body = serde_json::json!({
            "error": "not_found",
            "description": format!("no hostile kind {kind:?}; kinds: {}", KINDS.join(", ")),
        });
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    let Some(cursor) = cursor.filter(|c| !c.is_empty()) else {
        return json(Body::from(FIRST_PAGE));
    };
    let body = match kind {
        "loop" => Body::from(format!(
            r#"{{"records":[{{"id":"h4","updated_at":"2024-01-01T00:00:03Z"}}],"has_more":true,"next":{}}}"#,
            serde_json::to_string(cursor).unwrap_or_else(|_| "\"p2\"".into())
        )),
        "huge" => huge(),
        "utf8" => Body::from(Bytes::from_static(
            b"{\"records\":[{\"id\":\"h4\",\"updated_at\":\"2024-01-01T00:00:03Z\",\"name\":\"caf\xc3\xa9 \xff\xfe\xc0\xaf\"}],\"next\":\"p3\"}",
        )),
        "types" => Body::from(r#"{"records":{"id":"h4","updated_at":"2024-01-01T00:00:03Z"},"next":"p3"}"#),
        "empty_forever" => {
            let n = cursor
                .trim_start_matches('p')
                .parse::<u64>()
                .unwrap_or(2);
            Body::from(format!(r#"{{"records":[],"has_more":true,"next":"p{}"}}"#, n + 1))
        }
        "deep" => Body::from(format!(
            r#"{{"records":[{{"id":"h4","updated_at":"2024-01-01T00:00:03Z","x":{}{}}}],"next":"p3"}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        )),
        "long_cursor" => Body::from(format!(
            r#"{{"records":[{{"id":"h4","updated_at":"2024-01-01T00:00:03Z"}}],"has_more":true,"next":"{}"}}"#,
            "c".repeat(20_000)
        )),
        _ => Body::from(r#"{"records":[],"has_more":true,"next":"p3"}"#), // empty_more
    };
    json(body)
}

fn json(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// About 100 MiB of valid JSON: one shared 1 MiB chunk of whole records,
/// repeated, so the server never holds more than that chunk. No
/// Content-Length: the client only learns the size by reading.
fn huge() -> Body {
    const RECORD: &str = concat!(
        r#"{"id":"hx","updated_at":"2024-01-01T00:00:03Z","pad":""#,
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        r#""},"#
    );
    let chunk = Bytes::from(RECORD.repeat(HUGE_CHUNK / RECORD.len()));
    let n = HUGE_BYTES.div_ceil(chunk.len());
    let head = Bytes::from_static(br#"{"records":["#);
    let tail = Bytes::from_static(
        br#"{"id":"hz","updated_at":"2024-01-01T00:00:04Z"}],"has_more":true,"next":"p3"}"#,
    );
    let parts = std::iter::once(head)
        .chain(std::iter::repeat_n(chunk, n))
        .chain(std::iter::once(tail))
        .map(Ok::<_, Infallible>);
    Body::from_stream(futures::stream::iter(parts))
}
