//! The pagination engine against simulated APIs, one per style, with no I/O.
//!
//! Each simulated API serves a dataset split into pages of arbitrary sizes
//! (chosen by proptest) through one wire format; walking it with the engine
//! must give back exactly the dataset, in order, and end where the style says.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use proptest::prelude::*;
use serde_json::{Value, json};
use tidemark_core::config::{PaginationConfig, PaginationSpec};
use tidemark_core::pagination::{Next, Paginator, Position, ReadError};
use tidemark_core::walk::{Walk, WalkError};
use url::Url;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Zendesk,
    StartAfter,
    SelfNext,
    Cursor,
    NextUrl,
    LinkHeader,
    Offset,
}

const STYLES: [Style; 7] = [
    Style::Zendesk,
    Style::StartAfter,
    Style::SelfNext,
    Style::Cursor,
    Style::NextUrl,
    Style::LinkHeader,
    Style::Offset,
];

fn dataset(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"id": format!("id-{i:05}"), "updated_at": 1000 + i, "v": i}))
        .collect()
}

/// A simulated API: the dataset and how many records each successive page holds.
struct Api {
    style: Style,
    data: Vec<Value>,
    sizes: Vec<usize>,
}

impl Api {
    fn size_at(&self, start: usize) -> usize {
        // The k-th page by position: walk the sizes until reaching `start`.
        let mut pos = 0;
        for s in &self.sizes {
            if pos >= start {
                return (*s).max(1);
            }
            pos += (*s).max(1);
        }
        self.sizes.last().copied().unwrap_or(1).max(1)
    }

    fn query(url: &Url, name: &str) -> Option<String> {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    fn respond(&self, url: &Url) -> (Vec<(String, String)>, Vec<u8>) {
        let n = self.data.len();
        let pos_of = |c: Option<String>| -> usize {
            c.map(|c| c.trim_start_matches('c').parse().expect("simulated cursor"))
                .unwrap_or(0)
        };
        let start = match self.style {
            Style::Zendesk | Style::SelfNext | Style::Cursor => {
                pos_of(Self::query(url, self.param()))
            }
            Style::NextUrl | Style::LinkHeader => pos_of(Self::query(url, "after")),
            Style::StartAfter => match Self::query(url, "startAfter") {
                None => 0,
                Some(id) => {
                    self.data
                        .iter()
                        .position(|r| r["id"] == id.as_str())
                        .expect("known id")
                        + 1
                }
            },
            Style::Offset => Self::query(url, "offset")
                .expect("offset")
                .parse()
                .expect("number"),
        };
        let end = (start + self.size_at(start)).min(n);
        let page: Vec<Value> = self.data[start.min(n)..end].to_vec();
        let more = end < n;
        let mut headers = vec![];
        let body = match self.style {
            Style::Zendesk => {
                json!({"tickets": page, "after_cursor": format!("c{end}"), "end_of_stream": !more})
            }
            Style::StartAfter => json!({"data": page, "meta": {"hasMore": more,
                "nextStartAfter": page.last().map(|r| r["id"].clone()).unwrap_or(Value::Null)}}),
            Style::SelfNext => json!({"Data": page, "Cursors": {
                "Next": if more { format!("c{end}") } else { String::new() }, "Self": format!("c{start}")}}),
            Style::Cursor => {
                json!({"items": page, "cursor": {"starting_at": format!("c{end}"), "previous": null}})
            }
            Style::NextUrl => json!({"data": page, "links": {"next":
                if more { Value::String(format!("/x?after=c{end}")) } else { Value::Null }}}),
            Style::LinkHeader => {
                if more {
                    headers.push((
                        "Link".to_string(),
                        format!("<http://api.test/x?after=c{end}>; rel=\"next\", <http://api.test/x>; rel=\"first\""),
                    ));
                }
                Value::Array(page)
            }
            Style::Offset => json!({"records": page, "total": n}),
        };
        (headers, serde_json::to_vec(&body).expect("json"))
    }

    fn param(&self) -> &'static str {
        match self.style {
            Style::Cursor => "starting_at",
            _ => "cursor",
        }
    }

    fn pagination(&self) -> (PaginationConfig, Option<&'static str>) {
        let mut p = PaginationConfig::default();
        let records = match self.style {
            Style::Zendesk => {
                p.preset = Some("zendesk_cursor".into());
                Some("/tickets")
            }
            Style::StartAfter => {
                p.preset = Some("start_after".into());
                None
            }
            Style::SelfNext => {
                p.preset = Some("self_next".into());
                None
            }
            Style::Cursor => {
                p.preset = Some("cursor".into());
                None
            }
            Style::NextUrl => {
                p.preset = Some("next_url".into());
                None
            }
            Style::LinkHeader => {
                p.preset = Some("link_header".into());
                None
            }
            Style::Offset => {
                p.offset_param = Some("offset".into());
                p.total_count = Some("/total".parse().unwrap());
                Some("/records")
            }
        };
        (p, records)
    }
}

struct Walked {
    records: Vec<Value>,
    pages: usize,
    resume: Option<String>,
}

/// Walk the whole dataset with the engine's `Walk`, as the worker and
/// `pull` do, reassembling the records from their byte ranges.
fn walk(api: &Api) -> Result<Walked, ReadError> {
    let (p, records) = api.pagination();
    let records = records.map(|r| r.parse().unwrap());
    let spec = PaginationSpec::resolve(&p, records.as_ref()).expect("valid spec");
    let base = Url::parse("http://api.test").unwrap();
    let mut w = Walk::from_paginator(Paginator::new(&base, "/x", spec, vec![], None), None);
    let mut out = Walked {
        records: vec![],
        pages: 0,
        resume: None,
    };
    for _ in 0..10_000 {
        let req = w.request()?;
        let (headers, body) = api.respond(&req.url);
        let step = w.advance(&req, &headers, &body).map_err(|e| match e {
            WalkError::Read(e) => e,
            other => panic!("not a read error: {other}"),
        })?;
        out.pages += 1;
        out.records.extend(
            step.records
                .iter()
                .map(|r| serde_json::from_slice::<Value>(&body[r.clone()]).unwrap()),
        );
        match step.next {
            Next::More(c) => assert_eq!(w.cursor(), Some(c.as_str())),
            Next::End { resume } => {
                out.resume = resume;
                return Ok(out);
            }
        }
    }
    panic!("walk did not end");
}

fn uniform(style: Style, n: usize, size: usize) -> Api {
    Api {
        style,
        data: dataset(n),
        sizes: vec![size; n / size + 2],
    }
}

#[test]
fn every_style_reassembles_for_page_sizes_1_7_1000() {
    for style in STYLES {
        for size in [1usize, 7, 1000] {
            for n in [0, size, 3 * size, 3 * size + 1, 2 * size - 1] {
                let api = uniform(style, n, size);
                let w = walk(&api).unwrap_or_else(|e| panic!("{style:?} n={n} size={size}: {e}"));
                assert_eq!(w.records, api.data, "{style:?} n={n} size={size}");
                // Styles that end on an empty page need one extra request.
                let full = n.div_ceil(size).max(1);
                let extra = matches!(style, Style::Cursor)
                    || (style == Style::Offset && n % size == 0 && n == 0);
                assert!(
                    w.pages == full
                        || (extra && w.pages == full + 1)
                        || (n > 0 && n % size == 0 && w.pages == full + 1),
                    "{style:?} n={n} size={size}: {} pages",
                    w.pages
                );
            }
        }
    }
}

proptest! {
    #[test]
    fn any_split_reassembles(style_i in 0usize..STYLES.len(), n in 0usize..120, sizes in prop::collection::vec(1usize..25, 1..40)) {
        let api = Api { style: STYLES[style_i], data: dataset(n), sizes };
        let w = walk(&api).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(w.records, api.data);
    }
}

#[test]
fn resume_points_follow_the_seeds() {
    // Seed 003: at end_of_stream keep after_cursor.
    let w = walk(&uniform(Style::Zendesk, 10, 4)).unwrap();
    assert_eq!(w.resume.as_deref(), Some("c10"));
    // Seed 001: the last page has an empty Next; keep its Self.
    let w = walk(&uniform(Style::SelfNext, 10, 4)).unwrap();
    assert_eq!(w.resume.as_deref(), Some("c8"));
    // Seed 004: the empty page echoes the cursor it was given; keep it.
    let w = walk(&uniform(Style::Cursor, 10, 4)).unwrap();
    assert_eq!(w.resume.as_deref(), Some("c10"));
    // Seed 002: hasMore=false; keep nextStartAfter.
    let w = walk(&uniform(Style::StartAfter, 10, 4)).unwrap();
    assert_eq!(w.resume.as_deref(), Some("id-00009"));
    // A next URL: keep the URL of the last page fetched.
    let w = walk(&uniform(Style::NextUrl, 10, 4)).unwrap();
    assert_eq!(w.resume.as_deref(), Some("http://api.test/x?after=c8"));
    // Offset: continue after the last record received.
    let w = walk(&uniform(Style::Offset, 10, 4)).unwrap();
    assert_eq!(w.resume.as_deref(), Some("10"));
}

fn paginator(yaml_pagination: Value, records: &str) -> Paginator {
    let p: PaginationConfig = serde_json::from_value(yaml_pagination).unwrap();
    let spec = PaginationSpec::resolve(&p, Some(&records.parse().unwrap())).unwrap();
    Paginator::new(
        &Url::parse("https://api.test/base/").unwrap(),
        "/v1/items",
        spec,
        vec![("a".into(), "1".into())],
        None,
    )
}

fn read_one(
    pag: &Paginator,
    pos: Position,
    headers: Vec<(String, String)>,
    body: &str,
) -> Result<Next, ReadError> {
    let req = pag.request(&pos)?;
    pag.read(&pos, &req, &headers, body.as_bytes())
        .map(|p| p.next)
}

#[test]
fn a_cursor_handed_back_with_more_claimed_is_a_loop() {
    let pag = paginator(json!({"preset": "start_after"}), "/data");
    let body = r#"{"data":[{"id":"x"}],"meta":{"hasMore":true,"nextStartAfter":"x"}}"#;
    let err = read_one(&pag, Position::At("x".into()), vec![], body).unwrap_err();
    assert!(matches!(err, ReadError::Loop { .. }), "{err}");
    // Empty page, same cursor, more claimed: also a loop, never a spin.
    let body = r#"{"data":[],"meta":{"hasMore":true,"nextStartAfter":"x"}}"#;
    assert!(matches!(
        read_one(&pag, Position::At("x".into()), vec![], body),
        Err(ReadError::Loop { .. })
    ));
    // A next URL pointing at itself is a loop too.
    let pag = paginator(json!({"preset": "next_url"}), "/data");
    let here = "https://api.test/base/v1/items?a=1&after=5";
    let body = format!(r#"{{"data":[1],"links":{{"next":"{here}"}}}}"#);
    let pos = Position::At(here.into());
    assert!(matches!(
        read_one(&pag, pos, vec![], &body),
        Err(ReadError::Loop { .. })
    ));
}

#[test]
fn cross_origin_next_urls_are_refused_and_relative_ones_resolved() {
    let pag = paginator(json!({"preset": "next_url"}), "/data");
    let body = r#"{"data":[1],"links":{"next":"https://evil.test/steal?key=s3cret"}}"#;
    let err = read_one(&pag, Position::Start { from: None }, vec![], body).unwrap_err();
    assert!(matches!(err, ReadError::CrossOrigin { .. }), "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    // Same host, other port or scheme: another origin.
    let body = r#"{"data":[1],"links":{"next":"http://api.test/base/v1/items?after=2"}}"#;
    assert!(matches!(
        read_one(&pag, Position::Start { from: None }, vec![], body),
        Err(ReadError::CrossOrigin { .. })
    ));
    // A stored position on another origin is refused before any request is built.
    assert!(matches!(
        pag.request(&Position::At("https://evil.test/x".into())),
        Err(ReadError::CrossOrigin { .. })
    ));
    let body = r#"{"data":[1],"links":{"next":"?after=2"}}"#;
    let next = read_one(&pag, Position::Start { from: None }, vec![], body).unwrap();
    assert_eq!(
        next,
        Next::More("https://api.test/base/v1/items?after=2".into())
    );
}

#[test]
fn requests_carry_params_cursor_and_start_in_each_format() {
    use tidemark_core::config::StartConfig;
    use tidemark_core::timefmt::{TimeFormat, parse_timestamp};
    let p: PaginationConfig =
        serde_json::from_value(json!({"preset": "zendesk_cursor", "page_size": 1000})).unwrap();
    let spec = PaginationSpec::resolve(&p, Some(&"/tickets".parse().unwrap())).unwrap();
    let from = parse_timestamp("2024-01-01T00:00:00Z").unwrap();
    for (fmt, text) in [
        (TimeFormat::Unix, "1704067200"),
        (TimeFormat::UnixMs, "1704067200000"),
        (TimeFormat::Iso8601, "2024-01-01T00%3A00%3A00Z"),
    ] {
        let start = StartConfig {
            param: "start_time".into(),
            format: fmt,
            from: None,
        };
        let pag = Paginator::new(
            &Url::parse("https://h.test").unwrap(),
            "/api/x.json",
            spec.clone(),
            vec![("k".into(), "v".into())],
            Some((start.param.clone(), start.format)),
        );
        let req = pag.request(&Position::Start { from: Some(from) }).unwrap();
        assert_eq!(
            req.url.as_str(),
            format!("https://h.test/api/x.json?k=v&per_page=1000&start_time={text}")
        );
    }
    let pag = Paginator::new(
        &Url::parse("https://h.test").unwrap(),
        "/api/x.json",
        spec,
        vec![],
        None,
    );
    // A cursor wins over the start point and is encoded (base64 has + / =).
    let req = pag.request(&Position::At("a+b/c=".into())).unwrap();
    assert_eq!(
        req.url.as_str(),
        "https://h.test/api/x.json?per_page=1000&cursor=a%2Bb%2Fc%3D"
    );
}

#[test]
fn malformed_responses_are_clear_errors() {
    let pag = paginator(json!({"preset": "start_after"}), "/data");
    let start = || Position::Start { from: None };
    let cases: [(&str, &str); 7] = [
        (r#"{"data":[1,2"#, "not valid JSON"),
        (
            r#"{"meta":{"hasMore":false}}"#,
            "records not found at /data",
        ),
        (
            r#"{"data":{"id":1},"meta":{}}"#,
            "records at /data is an object, expected an array",
        ),
        (
            r#"{"data":[1],"meta":{"hasMore":"yes","nextStartAfter":"a"}}"#,
            "has_more at /meta/hasMore is a string, expected a boolean",
        ),
        (
            r#"{"data":[1],"meta":{"hasMore":true,"nextStartAfter":{"x":1}}}"#,
            "next_cursor at /meta/nextStartAfter is an object",
        ),
        (
            r#"{"data":[1],"meta":{"hasMore":true}}"#,
            "claims more pages but gives no next cursor",
        ),
        ("{\"data\":[\"\u{0}\"]}", "not valid JSON"),
    ];
    for (body, want) in cases {
        let err = read_one(&pag, start(), vec![], body)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{body}: got {err:?}, want {want:?}");
    }
    let bad_utf8 = b"{\"data\":[\"\xff\xfe\"],\"meta\":{\"hasMore\":false}}";
    let req = pag.request(&start()).unwrap();
    assert!(matches!(
        pag.read(&start(), &req, &Vec::new(), bad_utf8),
        Err(ReadError::NotJson(_))
    ));
    // An over-long cursor is refused.
    let long = "x".repeat(9000);
    let body = format!(r#"{{"data":[1],"meta":{{"hasMore":true,"nextStartAfter":"{long}"}}}}"#);
    assert!(matches!(
        read_one(&pag, start(), vec![], &body),
        Err(ReadError::CursorTooLong { .. })
    ));
}

#[test]
fn header_and_last_record_cursors() {
    let pag = paginator(
        json!({"cursor_param": "after", "next_cursor": "header:X-Next-Cursor"}),
        "/items",
    );
    let next = read_one(
        &pag,
        Position::Start { from: None },
        vec![("x-next-cursor".into(), "abc".into())],
        r#"{"items":[1]}"#,
    )
    .unwrap();
    assert_eq!(next, Next::More("abc".into()));
    let next = read_one(&pag, Position::At("abc".into()), vec![], r#"{"items":[1]}"#).unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("abc".into())
        }
    );

    let pag = paginator(
        json!({"cursor_param": "since_id", "next_cursor": "last_record:/id", "stop_on_empty_page": true}),
        "/items",
    );
    let next = read_one(
        &pag,
        Position::Start { from: None },
        vec![],
        r#"{"items":[{"id":3},{"id":9}]}"#,
    )
    .unwrap();
    assert_eq!(next, Next::More("9".into()));
    let next = read_one(&pag, Position::At("9".into()), vec![], r#"{"items":[]}"#).unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("9".into())
        }
    );
}

#[test]
fn page_numbers_end_at_an_empty_page_or_the_total() {
    let pag = paginator(
        json!({"page_param": "page", "page_size_param": "per_page", "page_size": 2, "total_pages": "/pages"}),
        "/r",
    );
    let req = pag.request(&Position::Start { from: None }).unwrap();
    assert_eq!(
        req.url.as_str(),
        "https://api.test/base/v1/items?a=1&per_page=2&page=1"
    );
    let next = read_one(
        &pag,
        Position::Start { from: None },
        vec![],
        r#"{"r":[1,2],"pages":2}"#,
    )
    .unwrap();
    assert_eq!(next, Next::More("2".into()));
    let next = read_one(
        &pag,
        Position::At("2".into()),
        vec![],
        r#"{"r":[3],"pages":2}"#,
    )
    .unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("2".into())
        }
    );
    let next = read_one(&pag, Position::At("3".into()), vec![], r#"{"r":[]}"#).unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("3".into())
        }
    );
    // An empty page that claims more is refused, not followed forever.
    let pag = paginator(json!({"offset_param": "offset", "has_more": "/more"}), "/r");
    let err = read_one(
        &pag,
        Position::At("4".into()),
        vec![],
        r#"{"r":[],"more":true}"#,
    )
    .unwrap_err();
    assert_eq!(err, ReadError::EmptyClaimsMore);
}

/// A page walk filtered by a start time (seed 002's `updatedSince`).
fn filtered_pages(pagination: Value) -> Paginator {
    let p: PaginationConfig = serde_json::from_value(pagination).unwrap();
    let spec = PaginationSpec::resolve(&p, Some(&"/r".parse().unwrap())).unwrap();
    let start: tidemark_core::config::StartConfig =
        serde_json::from_value(json!({"param": "updatedSince", "format": "iso8601"})).unwrap();
    Paginator::new(
        &Url::parse("https://api.test/").unwrap(),
        "/v2/inspections",
        spec,
        vec![],
        Some((start.param, start.format)),
    )
}

#[test]
fn every_page_of_a_filtered_page_walk_repeats_the_start_time() {
    let pag =
        filtered_pages(json!({"page_param": "page", "page_size_param": "limit", "page_size": 2}));
    let from = chrono::DateTime::parse_from_rfc3339("2024-05-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let first = pag
        .request_in_chain(&Position::Start { from: Some(from) }, Some(from))
        .unwrap();
    assert_eq!(
        first.url.as_str(),
        "https://api.test/v2/inspections?limit=2&updatedSince=2024-05-01T00%3A00%3A00Z&page=1"
    );
    let second = pag
        .request_in_chain(&Position::At("2".into()), Some(from))
        .unwrap();
    assert_eq!(
        second.url.as_str(),
        "https://api.test/v2/inspections?limit=2&updatedSince=2024-05-01T00%3A00%3A00Z&page=2"
    );
    // A cursor carries the API's own filter: never a start parameter with it.
    let cur = filtered_pages(json!({"preset": "start_after"}));
    let req = cur
        .request_in_chain(&Position::At("k".into()), Some(from))
        .unwrap();
    assert!(!req.url.as_str().contains("updatedSince"), "{}", req.url);
}

#[test]
fn a_filtered_page_walk_ends_without_a_position_and_an_unfiltered_one_keeps_its_page() {
    // Filtered: the next sync starts from the high-water mark, at page 1.
    let pag = filtered_pages(json!({"page_param": "page", "total_pages": "/pages"}));
    let next = read_one(
        &pag,
        Position::At("3".into()),
        vec![],
        r#"{"r":[1],"pages":3}"#,
    )
    .unwrap();
    assert_eq!(next, Next::End { resume: None });
    let next = read_one(&pag, Position::At("4".into()), vec![], r#"{"r":[]}"#).unwrap();
    assert_eq!(next, Next::End { resume: None });
    // Unfiltered: the next poll reads the last page again (new records land there).
    let pag = paginator(json!({"page_param": "page", "total_pages": "/pages"}), "/r");
    let next = read_one(
        &pag,
        Position::At("3".into()),
        vec![],
        r#"{"r":[1],"pages":3}"#,
    )
    .unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("3".into())
        }
    );
}

#[test]
fn page_walks_end_every_way_the_api_can_say_so() {
    // A configured first page of 0.
    let pag = paginator(json!({"page_param": "p", "first_page": 0}), "/r");
    let req = pag.request(&Position::Start { from: None }).unwrap();
    assert!(req.url.as_str().ends_with("&p=0"), "{}", req.url);
    let next = read_one(&pag, Position::Start { from: None }, vec![], r#"{"r":[1]}"#).unwrap();
    assert_eq!(next, Next::More("1".into()));
    // has_more: false ends a page walk although the page is full.
    let pag = paginator(json!({"page_param": "page", "has_more": "/more"}), "/r");
    let next = read_one(
        &pag,
        Position::At("5".into()),
        vec![],
        r#"{"r":[1,2],"more":false}"#,
    )
    .unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("5".into())
        }
    );
    let next = read_one(
        &pag,
        Position::At("5".into()),
        vec![],
        r#"{"r":[1,2],"more":true}"#,
    )
    .unwrap();
    assert_eq!(next, Next::More("6".into()));
    // Page numbers with a total count and a page size: 5 records in pages of 2 is 3 pages.
    let pag = paginator(
        json!({"page_param": "page", "page_size_param": "n", "page_size": 2, "total_count": "/total"}),
        "/r",
    );
    let next = read_one(
        &pag,
        Position::At("2".into()),
        vec![],
        r#"{"r":[3,4],"total":5}"#,
    )
    .unwrap();
    assert_eq!(next, Next::More("3".into()));
    let next = read_one(
        &pag,
        Position::At("3".into()),
        vec![],
        r#"{"r":[5],"total":5}"#,
    )
    .unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("3".into())
        }
    );
    // An offset walk with no total ends at its first empty page, keeping the offset.
    let pag = paginator(json!({"offset_param": "offset"}), "/r");
    let next = read_one(&pag, Position::At("4".into()), vec![], r#"{"r":[5,6]}"#).unwrap();
    assert_eq!(next, Next::More("6".into()));
    let next = read_one(&pag, Position::At("6".into()), vec![], r#"{"r":[]}"#).unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("6".into())
        }
    );
}

#[test]
fn an_empty_page_handing_back_its_cursor_ends_the_stream_without_a_preset() {
    // Seed 004 described by hand: the cursor comes back unchanged on an empty page.
    let pag = paginator(
        json!({"cursor_param": "starting_at", "next_cursor": "/cursor/starting_at"}),
        "/items",
    );
    let body = r#"{"items":[],"cursor":{"starting_at":"abc","previous":null}}"#;
    let next = read_one(&pag, Position::At("abc".into()), vec![], body).unwrap();
    assert_eq!(
        next,
        Next::End {
            resume: Some("abc".into())
        }
    );
    // With records, the same cursor is a loop, not the end.
    let body = r#"{"items":[{"id":1}],"cursor":{"starting_at":"abc"}}"#;
    assert!(matches!(
        read_one(&pag, Position::At("abc".into()), vec![], body),
        Err(ReadError::Loop { .. })
    ));
}

#[test]
fn limits_refuse_deep_json_long_cursors_and_crowded_pages_with_clear_errors() {
    let start = Position::Start { from: None };
    // Nesting: in the envelope and inside a record.
    let pag = paginator(json!({"preset": "start_after"}), "/data");
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let body = format!(r#"{{"data": [], "meta": {{"x": {}}}}}"#, deep(5000));
    let e = read_one(&pag, start.clone(), vec![], &body).unwrap_err();
    assert!(e.to_string().contains("nested deeper than 128"), "{e}");
    let body = format!(
        r#"{{"data": [{{"id": 1, "x": {}}}], "meta": {{"hasMore": false}}}}"#,
        deep(5000)
    );
    let e = read_one(&pag, start.clone(), vec![], &body).unwrap_err();
    assert!(e.to_string().contains("nested deeper than 128"), "{e}");
    // 100 levels are fine.
    let body = format!(
        r#"{{"data": [{{"id": 1, "x": {}}}], "meta": {{"hasMore": false}}}}"#,
        deep(100)
    );
    read_one(&pag, start.clone(), vec![], &body).unwrap();

    // Records per page.
    let pag = paginator(json!({"preset": "start_after"}), "/data").with_max_records(2);
    let body = r#"{"data": [{"id": 1}, {"id": 2}, {"id": 3}], "meta": {"hasMore": false}}"#;
    let e = read_one(&pag, start.clone(), vec![], body).unwrap_err();
    assert!(
        matches!(e, ReadError::TooManyRecords { count: 3, limit: 2 }),
        "{e}"
    );
    assert!(e.to_string().contains("max_records_per_page"), "{e}");

    // Cursor length.
    let pag = paginator(json!({"preset": "start_after"}), "/data").with_max_cursor_len(16);
    let body = format!(
        r#"{{"data": [{{"id": 1}}], "meta": {{"hasMore": true, "nextStartAfter": "{}"}}}}"#,
        "c".repeat(17)
    );
    let e = read_one(&pag, start, vec![], &body).unwrap_err();
    assert!(
        matches!(e, ReadError::CursorTooLong { len: 17, limit: 16 }),
        "{e}"
    );
}

#[test]
fn a_next_url_that_echoes_the_api_key_is_stored_without_it() {
    let pag = paginator(json!({"preset": "next_url"}), "/data")
        .with_secret_params(vec!["api_key".into()]);
    let body = r#"{"data": [{"id": 1}], "links": {"next": "https://api.test/base/v1/items?after=2&api_key=SECRET&a=1"}}"#;
    let next = read_one(&pag, Position::Start { from: None }, vec![], body).unwrap();
    match next {
        Next::More(url) => {
            assert!(!url.contains("SECRET"), "{url}");
            assert!(url.contains("after=2") && url.contains("a=1"), "{url}");
        }
        other => panic!("{other:?}"),
    }
}
