//! The request dialects against simulated APIs, with no I/O: GraphQL with
//! Relay edges (a POST body cursor), a Notion-style body cursor, an
//! Elasticsearch `search_after` array cursor, a next URL in a `Next-Page`
//! header, Slack's string cursor in the query with errors inside 200
//! answers (`ok: false`), and GraphQL's errors inside 200 answers.
//!
//! Each simulated API serves a dataset split into pages of arbitrary sizes
//! (chosen by proptest). The walk is rebuilt from the stored cursor text
//! before every page, as a worker rebuilds it from a page task, so a cursor
//! that did not survive storage as text would show here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use proptest::prelude::*;
use serde_json::{Value, json};
use tidemark_core::checkpoint::Stage;
use tidemark_core::config::{Config, load_str};
use tidemark_core::pagination::{Method, Next, PageRequest, ReadError};
use tidemark_core::walk::{Walk, WalkError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    GraphQl,
    Notion,
    Search,
    NextPageHeader,
    Slack,
}

const DIALECTS: [Dialect; 5] = [
    Dialect::GraphQl,
    Dialect::Notion,
    Dialect::Search,
    Dialect::NextPageHeader,
    Dialect::Slack,
];

const SOURCE: &str = "sources:\n  s: { base_url: \"http://api.test\" }\nfeeds:\n";

fn feed_yaml(d: Dialect) -> &'static str {
    match d {
        Dialect::GraphQl => {
            r#"  - name: f
    source: s
    path: /graphql
    method: POST
    read_only: true
    body:
      query: "query($first: Int!, $after: String) { records(first: $first, after: $after) { edges { node { id } } } }"
      variables: { first: 3 }
    records: /data/records/edges
    record: /node
    key: /id
    version: /updated_at
    pagination:
      cursor_param: body:/variables/after
      next_cursor: /data/records/pageInfo/endCursor
      has_more: /data/records/pageInfo/hasNextPage
    error_when:
      - { pointer: /errors/0/extensions/code, equals: RATE_LIMITED, transient: true, message: /errors/0/message, retry_after: /errors/0/extensions/retryAfter }
      - { pointer: /errors, not_empty: true, message: /errors/0/message }
"#
        }
        Dialect::Notion => {
            r#"  - name: f
    source: s
    path: /v1/databases/db/query
    method: POST
    read_only: true
    body: {}
    records: /results
    key: /id
    pagination:
      cursor_param: body:/start_cursor
      next_cursor: /next_cursor
      has_more: /has_more
      page_size_param: body:/page_size
      page_size: 3
"#
        }
        Dialect::Search => {
            r#"  - name: f
    source: s
    path: /records/_search
    method: POST
    read_only: true
    body: { sort: [ { updated_at: asc }, { id: asc } ] }
    records: /hits/hits
    record: /_source
    key: /id
    version: /updated_at
    pagination:
      cursor_param: body:/search_after
      next_cursor: last_record:/sort
      stop_on_empty_page: true
      page_size_param: body:/size
      page_size: 3
"#
        }
        Dialect::NextPageHeader => {
            r#"  - name: f
    source: s
    path: /records
    records: /data
    key: /id
    pagination:
      next_url: header:Next-Page
"#
        }
        Dialect::Slack => {
            r#"  - name: f
    source: s
    path: /conversations.history
    params: { channel: C1 }
    records: /messages
    key: /id
    pagination:
      cursor_param: cursor
      next_cursor: /response_metadata/next_cursor
      has_more: /has_more
      page_size_param: limit
      page_size: 3
    error_when:
      - { pointer: /error, equals: ratelimited, transient: true, message: /error }
      - { pointer: /ok, equals: false, message: /error }
"#
        }
    }
}

fn config(d: Dialect) -> Config {
    load_str("t.yaml", &format!("{SOURCE}{}", feed_yaml(d))).unwrap()
}

fn dataset(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"id": format!("id-{i:05}"), "updated_at": 1000 + i, "v": i}))
        .collect()
}

/// A simulated API: the dataset and how many records each successive page holds.
struct Api {
    dialect: Dialect,
    data: Vec<Value>,
    sizes: Vec<usize>,
    /// Answer the first page with an error inside a 200 this many times.
    errors_first: usize,
}

impl Api {
    fn size_at(&self, start: usize) -> usize {
        let mut pos = 0;
        for s in &self.sizes {
            if pos >= start {
                return (*s).max(1);
            }
            pos += (*s).max(1);
        }
        self.sizes.last().copied().unwrap_or(1).max(1)
    }

    fn body_of(req: &PageRequest) -> Value {
        serde_json::from_slice(req.body.as_deref().expect("a body")).expect("a JSON body")
    }

    fn respond(&mut self, req: &PageRequest) -> (Vec<(String, String)>, Vec<u8>) {
        let n = self.data.len();
        let cursor_pos = |c: &Value| -> usize {
            c.as_str()
                .expect("a string cursor")
                .trim_start_matches('c')
                .parse()
                .expect("simulated cursor")
        };
        let start = match self.dialect {
            Dialect::GraphQl => {
                assert_eq!(req.method, Method::Post);
                let b = Self::body_of(req);
                assert!(b["query"].as_str().unwrap().contains("records"));
                assert_eq!(b["variables"]["first"], 3);
                if self.errors_first > 0 {
                    self.errors_first -= 1;
                    let e = json!({"data": null, "errors": [{"message": "API rate limit exceeded", "extensions": {"code": "RATE_LIMITED", "retryAfter": 2}}]});
                    return (vec![], serde_json::to_vec(&e).unwrap());
                }
                b["variables"].get("after").map(cursor_pos).unwrap_or(0)
            }
            Dialect::Slack => {
                assert_eq!(req.method, Method::Get);
                let q: std::collections::HashMap<String, String> =
                    req.url.query_pairs().into_owned().collect();
                assert_eq!(q.get("channel").map(String::as_str), Some("C1"));
                assert_eq!(q.get("limit").map(String::as_str), Some("3"));
                if self.errors_first > 0 {
                    self.errors_first -= 1;
                    let e = json!({"ok": false, "error": "ratelimited"});
                    return (vec![], serde_json::to_vec(&e).unwrap());
                }
                q.get("cursor").map(|c| cursor_pos(&json!(c))).unwrap_or(0)
            }
            Dialect::Notion => {
                let b = Self::body_of(req);
                assert_eq!(b["page_size"], 3);
                b.get("start_cursor").map(cursor_pos).unwrap_or(0)
            }
            Dialect::Search => {
                let b = Self::body_of(req);
                assert_eq!(b["size"], 3);
                assert_eq!(b["sort"][0]["updated_at"], "asc");
                match b.get("search_after") {
                    None => 0,
                    Some(after) => {
                        // A keyset position: the first record after (updated_at, id).
                        let key = (after[0].as_u64().unwrap(), after[1].as_str().unwrap());
                        self.data
                            .iter()
                            .position(|r| {
                                (r["updated_at"].as_u64().unwrap(), r["id"].as_str().unwrap()) > key
                            })
                            .unwrap_or(n)
                    }
                }
            }
            Dialect::NextPageHeader => {
                assert_eq!(req.method, Method::Get);
                assert!(req.body.is_none());
                req.url
                    .query_pairs()
                    .find(|(k, _)| k == "_token")
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0)
            }
        };
        let end = (start + self.size_at(start)).min(n);
        let page: Vec<Value> = self.data[start.min(n)..end].to_vec();
        let more = end < n;
        let mut headers = vec![];
        let body = match self.dialect {
            Dialect::GraphQl => {
                let edges: Vec<Value> = page
                    .iter()
                    .enumerate()
                    .map(|(i, r)| json!({"cursor": format!("c{}", start + i + 1), "node": r}))
                    .collect();
                json!({"data": {"records": {"edges": edges, "pageInfo": {
                    "endCursor": if page.is_empty() { Value::Null } else { json!(format!("c{end}")) },
                    "hasNextPage": more}}}})
            }
            Dialect::Notion => json!({"object": "list", "results": page,
                "next_cursor": if more { json!(format!("c{end}")) } else { Value::Null },
                "has_more": more}),
            Dialect::Search => {
                let hits: Vec<Value> = page
                    .iter()
                    .map(|r| {
                        json!({"_index": "records", "_id": r["id"], "_source": r,
                        "sort": [r["updated_at"], r["id"]]})
                    })
                    .collect();
                json!({"took": 1, "hits": {"total": {"value": n}, "hits": hits}})
            }
            Dialect::NextPageHeader => {
                if more {
                    headers.push((
                        "Next-Page".to_string(),
                        format!("http://api.test/records?_token={end}"),
                    ));
                }
                json!({"data": page})
            }
            // Slack ends with an empty next_cursor, and has_more false.
            Dialect::Slack => json!({"ok": true, "messages": page, "has_more": more,
                "response_metadata": {"next_cursor": if more { format!("c{end}") } else { String::new() }}}),
        };
        (headers, serde_json::to_vec(&body).unwrap())
    }
}

struct Walked {
    records: Vec<Value>,
    /// Where the next walk resumes: the stored text.
    resume: Option<String>,
    /// Every cursor stored between pages.
    cursors: Vec<String>,
    transient_errors: usize,
}

/// Walk the API to its end, rebuilding the walk from the stored cursor
/// text before every page.
fn walk(api: &mut Api) -> Result<Walked, WalkError> {
    let cfg = config(api.dialect);
    let feed = &cfg.feeds[0];
    let source = &cfg.sources["s"];
    let partition = feed.partition("all", chrono::Utc::now()).unwrap().unwrap();
    let mut stored: Option<String> = None;
    let mut out = Walked {
        records: vec![],
        resume: None,
        cursors: vec![],
        transient_errors: 0,
    };
    for _ in 0..10_000 {
        let mut w = Walk::new(feed, source, &partition, Stage::Bulk)
            .unwrap()
            .at(stored.clone())
            .identifying(feed.key.clone(), feed.version.clone());
        let req = w.request()?;
        let (headers, body) = api.respond(&req);
        let step = match w.advance(&req, &headers, &body) {
            Err(WalkError::Read(e)) if e.is_transient() => {
                // GraphQL's rule names a retry_after pointer; Slack's none.
                let wait =
                    (api.dialect == Dialect::GraphQl).then(|| std::time::Duration::from_secs(2));
                assert_eq!(e.retry_after(), wait);
                out.transient_errors += 1;
                continue;
            }
            other => other?,
        };
        for r in &step.records {
            out.records
                .push(serde_json::from_slice(&body[r.clone()]).unwrap());
        }
        match step.next {
            Next::More(c) => {
                out.cursors.push(c.clone());
                stored = Some(c);
            }
            Next::End { resume } => {
                out.resume = resume;
                return Ok(out);
            }
        }
    }
    panic!("the walk did not end");
}

proptest! {
    #[test]
    fn any_split_reassembles(d in 0usize..DIALECTS.len(), n in 0usize..60, sizes in prop::collection::vec(1usize..9, 1..20), errors in 0usize..3) {
        let dialect = DIALECTS[d];
        let errors_first = match dialect {
            Dialect::GraphQl | Dialect::Slack => errors,
            _ => 0,
        };
        let mut api = Api { dialect, data: dataset(n), sizes, errors_first };
        let w = walk(&mut api).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&w.records, &api.data);
        prop_assert_eq!(w.transient_errors, errors_first);
    }
}

#[test]
fn cursors_are_stored_as_the_json_they_are() {
    // search_after: the last hit's sort array, as JSON text, sent back as an array.
    let mut api = Api {
        dialect: Dialect::Search,
        data: dataset(7),
        sizes: vec![3],
        errors_first: 0,
    };
    let w = walk(&mut api).unwrap();
    assert_eq!(w.cursors[0], r#"[1002,"id-00002"]"#);
    // The empty page after the last keeps the last position.
    assert_eq!(w.resume.as_deref(), Some(r#"[1006,"id-00006"]"#));
    // A string cursor in the body is its JSON text: quoted.
    let mut api = Api {
        dialect: Dialect::Notion,
        data: dataset(7),
        sizes: vec![3],
        errors_first: 0,
    };
    let w = walk(&mut api).unwrap();
    assert_eq!(w.cursors[0], r#""c3""#);
    // A next URL from a header: the URL.
    let mut api = Api {
        dialect: Dialect::NextPageHeader,
        data: dataset(7),
        sizes: vec![3],
        errors_first: 0,
    };
    let w = walk(&mut api).unwrap();
    assert_eq!(w.cursors[0], "http://api.test/records?_token=3");
    // Two Next-Page headers are not one URL.
    let cfg = config(Dialect::NextPageHeader);
    let feed = &cfg.feeds[0];
    let partition = feed.partition("all", chrono::Utc::now()).unwrap().unwrap();
    let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let req = w.request().unwrap();
    let two = vec![
        (
            "Next-Page".to_string(),
            "http://api.test/records?_token=3".to_string(),
        ),
        (
            "next-page".to_string(),
            "http://api.test/records?_token=9".to_string(),
        ),
    ];
    let err = w
        .advance(&req, &two, br#"{"data":[{"id":"a"}]}"#)
        .unwrap_err();
    assert!(err.to_string().contains("several"), "{err}");
    // A header's next URL on another origin (host, port or scheme) is
    // refused like a next URL in the body; a relative one is resolved.
    for other in [
        "http://evil.test/records?_token=3",
        "http://api.test:8080/records?_token=3",
        "https://api.test/records?_token=3",
    ] {
        let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
        let header = vec![("Next-Page".to_string(), other.to_string())];
        let err = w
            .advance(&req, &header, br#"{"data":[{"id":"a"}]}"#)
            .unwrap_err();
        assert!(
            matches!(err, WalkError::Read(ReadError::CrossOrigin { .. })),
            "{other}: {err}"
        );
    }
    let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let relative = vec![("Next-Page".to_string(), "/records?_token=3".to_string())];
    let step = w
        .advance(&req, &relative, br#"{"data":[{"id":"a"}]}"#)
        .unwrap();
    assert!(
        matches!(&step.next, Next::More(u) if u == "http://api.test/records?_token=3"),
        "{:?}",
        step.next
    );
}

#[test]
fn records_are_delivered_from_inside_each_element() {
    let mut api = Api {
        dialect: Dialect::GraphQl,
        data: dataset(4),
        sizes: vec![4],
        errors_first: 0,
    };
    let cfg = config(Dialect::GraphQl);
    let feed = &cfg.feeds[0];
    let partition = feed.partition("all", chrono::Utc::now()).unwrap().unwrap();
    let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk)
        .unwrap()
        .identifying(feed.key.clone(), feed.version.clone());
    let req = w.request().unwrap();
    let (h, body) = api.respond(&req);
    let step = w.advance(&req, &h, &body).unwrap();
    // Each record is the node's bytes as sent, never re-encoded.
    let first = std::str::from_utf8(&body[step.records[0].clone()]).unwrap();
    assert_eq!(first, r#"{"id":"id-00000","updated_at":1000,"v":0}"#);
    assert_eq!(step.identities[3].key, "id-00003");
    assert_eq!(step.high_water.as_deref(), Some("1003"));
    // An edge without a node is an error, not a silently dropped record.
    let broken = br#"{"data":{"records":{"edges":[{"cursor":"c1"}],"pageInfo":{"endCursor":"c1","hasNextPage":false}}}}"#;
    let err = w.advance(&req, &h, broken).unwrap_err();
    assert!(
        matches!(err, WalkError::Read(ReadError::RecordPart { index: 0, .. })),
        "{err}"
    );
}

#[test]
fn errors_inside_200_answers() {
    let cfg = config(Dialect::GraphQl);
    let feed = &cfg.feeds[0];
    let partition = feed.partition("all", chrono::Utc::now()).unwrap().unwrap();
    let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let req = w.request().unwrap();
    let h: Vec<(String, String)> = vec![];
    // A permanent one: the message from the body, not retried.
    let body = br#"{"data":null,"errors":[{"message":"Resource not accessible by integration","type":"FORBIDDEN"}]}"#;
    let err = w.advance(&req, &h, body).unwrap_err();
    let WalkError::Read(e) = err else {
        panic!("{err}")
    };
    assert!(!e.is_transient());
    assert!(
        e.to_string()
            .contains("Resource not accessible by integration"),
        "{e}"
    );
    // An empty or null errors list is no error.
    for errors in ["[]", "[ ]", "null", "{}"] {
        let body = format!(
            r#"{{"errors":{errors},"data":{{"records":{{"edges":[],"pageInfo":{{"endCursor":null,"hasNextPage":false}}}}}}}}"#
        );
        assert!(w.advance(&req, &h, body.as_bytes()).is_ok(), "{errors}");
    }
    // Slack: ok false.
    let text = format!(
        "{SOURCE}  - name: f\n    source: s\n    path: /conversations.history\n    records: /messages\n    key: /ts\n    pagination: {{ cursor_param: cursor, next_cursor: /response_metadata/next_cursor }}\n    error_when:\n      - {{ pointer: /error, equals: ratelimited, transient: true }}\n      - {{ pointer: /ok, equals: false, message: /error }}\n"
    );
    let cfg = load_str("t.yaml", &text).unwrap();
    let feed = &cfg.feeds[0];
    let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let req = w.request().unwrap();
    let e = w
        .advance(&req, &h, br#"{"ok":false,"error":"ratelimited"}"#)
        .unwrap_err();
    assert!(
        matches!(e, WalkError::Read(ref r) if r.is_transient()),
        "{e}"
    );
    let e = w
        .advance(&req, &h, br#"{"ok":false,"error":"channel_not_found"}"#)
        .unwrap_err();
    assert!(
        matches!(e, WalkError::Read(ReadError::Api { ref message, transient: false, .. }) if message == "channel_not_found"),
        "{e}"
    );
    // `ok: "false"` (a string) is not `false`.
    assert!(
        w.advance(&req, &h, br#"{"ok":"false","messages":[]}"#)
            .is_ok()
    );
}

#[test]
fn values_go_where_their_names_say() {
    let text = format!(
        "{SOURCE}  - name: f\n    source: s\n    path: /search\n    method: POST\n    read_only: false\n    body: {{ filter: {{ kind: a }} }}\n    params: {{ q: x }}\n    records: /r\n    key: /id\n    start: {{ param: \"body:/filter/since\", format: unix, from: \"2024-01-01T00:00:00Z\" }}\n    partitions: {{ param: \"body:/filter/account\", values: [acme] }}\n    pagination: {{ page_param: \"body:/page\", page_size_param: per_page, page_size: 50 }}\n"
    );
    let cfg = load_str("t.yaml", &text).unwrap();
    let feed = &cfg.feeds[0];
    let partition = feed.partition("acme", chrono::Utc::now()).unwrap().unwrap();
    let w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let req = w.request().unwrap();
    assert_eq!(req.method, Method::Post);
    assert!(!req.retriable(), "a POST not marked read_only");
    assert_eq!(req.url.as_str(), "http://api.test/search?q=x&per_page=50");
    let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"filter": {"kind": "a", "since": 1704067200, "account": "acme"}, "page": 1})
    );
    // Page 2 repeats the start time (page numbers carry no filter).
    let w = w.at(Some("2".into()));
    let body: Value =
        serde_json::from_slice(w.request().unwrap().body.as_deref().unwrap()).unwrap();
    assert_eq!(body["page"], 2);
    assert_eq!(body["filter"]["since"], 1704067200);
}

#[test]
fn a_body_cursor_that_is_not_json_is_refused_not_sent() {
    let cfg = config(Dialect::Search);
    let feed = &cfg.feeds[0];
    let partition = feed.partition("all", chrono::Utc::now()).unwrap().unwrap();
    let w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk)
        .unwrap()
        .at(Some("not json".into()));
    let err = w.request().unwrap_err();
    assert!(matches!(err, ReadError::BadPosition { .. }), "{err}");
    assert!(feed.cursor_is_json());
    assert!(!config(Dialect::NextPageHeader).feeds[0].cursor_is_json());
}

#[test]
fn cursors_go_back_with_the_exact_text_the_api_sent() {
    // Floats and integers beyond 64 bits, as a search API's sort values:
    // never parsed into numbers and written again.
    let cfg = config(Dialect::Search);
    let feed = &cfg.feeds[0];
    let partition = feed.partition("all", chrono::Utc::now()).unwrap().unwrap();
    let mut w = Walk::new(feed, &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let req = w.request().unwrap();
    let h: Vec<(String, String)> = vec![];
    let body = br#"{"hits":{"hits":[{"_source":{"id":"a"},"sort":[1.0715660391465826e-75, 17555555555555555557200, "a\u00e9"]}]}}"#;
    let step = w.advance(&req, &h, body).unwrap();
    let sent = r#"[1.0715660391465826e-75,17555555555555555557200,"a\u00e9"]"#;
    assert_eq!(step.next, Next::More(sent.into()));
    let next = w.request().unwrap();
    let text = String::from_utf8(next.body.unwrap()).unwrap();
    assert!(
        text.contains(&format!(r#""search_after":{sent}"#)),
        "{text}"
    );
    // Given by hand with spaces, the cursor is stored tidied.
    let w = w.at(Some("[1, \"a\"]".into()));
    assert_eq!(w.cursor(), Some(r#"[1,"a"]"#));
    // A number in a query parameter keeps its literal.
    let text = format!(
        "{SOURCE}  - name: f\n    source: s\n    path: /x\n    records: /r\n    key: /id\n    pagination: {{ cursor_param: after, next_cursor: /next }}\n"
    );
    let cfg = load_str("t.yaml", &text).unwrap();
    let mut w = Walk::new(&cfg.feeds[0], &cfg.sources["s"], &partition, Stage::Bulk).unwrap();
    let req = w.request().unwrap();
    let step = w
        .advance(
            &req,
            &h,
            br#"{"r":[{"id":1}],"next":12345678901234567890123.50}"#,
        )
        .unwrap();
    assert_eq!(step.next, Next::More("12345678901234567890123.50".into()));
    assert!(
        w.request()
            .unwrap()
            .url
            .as_str()
            .ends_with("after=12345678901234567890123.50")
    );
}
