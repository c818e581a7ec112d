//! Fuzz the response reader: `Walk::request` (the request builder, values
//! placed in the query or the JSON body) and `Walk::advance` (and through
//! it `Paginator::read`, the one-pass extractor `Plan::run`, `record:`'s
//! `ValuePlan::run`, `error_when`, the RFC 8288 `Link` parser
//! `link::find_rel` and record identity) for every pagination style and
//! request dialect, with the walks built the way `pull` and the worker
//! build them: `config::load_str`, then `Walk::new`.
//!
//! The input looks like an HTTP response, so seeds are real responses of
//! the mock API (see `fuzz/make-seeds`) and mutations stay readable:
//!
//! ```text
//! byte 0     which paginator: PAGINATORS[byte % len]
//! byte 1     bits 0-1: the position the page was fetched at
//!              0: Start { from: the feed's start }   1: Start { from: None }
//!              2: At(:pos)                           3: At(:pos), the chain
//!                                                       started at the feed's start
//! then       header lines `Name: value`, and `:pos VALUE` for the position,
//!            ended by an empty line ("\n\n" or "\r\n\r\n")
//! then       the body (without an empty line, everything after byte 1 is the body)
//! ```
//!
//! Beyond "no panic", only cheap invariants that must hold whatever the API
//! sends are checked (see `check`).
#![no_main]

use std::sync::OnceLock;

use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use tidemark_core::JsonPointer;
use tidemark_core::checkpoint::Stage;
use tidemark_core::config::{self, ErrorWhen, Strategy};
use tidemark_core::pagination::{
    CursorFrom, Headers, Method, Next, PageRequest, Paginator, Place, ReadError, raw_at,
};
use tidemark_core::walk::{Step, Walk, WalkError};
use url::Url;

/// The feeds under test. The first nine are examples/mock.yaml's (one per
/// pagination style, pointed at the mock API on port 18080, where the seeds
/// come from), then one for the mock's /hostile pages; then the fields no
/// preset uses, on a source with a path prefix, a query api key and small
/// limits; then the request dialects of examples/dialects.yaml (GraphQL,
/// Notion, search_after, Next-Page, Slack) on the mock, and three more
/// dialect feeds on the small source (page numbers and a start time in a
/// POST body, JSON cursors in the body from the body and from a header).
/// Adding or moving a feed changes the meaning of byte 0: keep
/// fuzz/make-seeds' table in step.
const CONFIG: &str = r#"
sources:
  mock:
    base_url: http://127.0.0.1:18080
  small:
    base_url: https://api.example.com/prefix/
    auth: { api_key: { query: api_key, value: "${FUZZ_KEY}" } }
    max_cursor_bytes: 64
    max_records_per_page: 5
feeds:
  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: { preset: zendesk_cursor, page_size: 100 }
    key: /id
    start: { param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }
  - name: inspections
    source: mock
    path: /v2/clients/0b6e4c1a-1111-4c1a-9c1a-0b6e4c1a1111/inspections
    pagination: { preset: start_after, page_size: 100 }
    key: /id
    # Its incremental syncs are page-based (seed 002's updatedSince=...&page=N).
    mode: bulk_then_incremental
    incremental:
      start: { param: updatedSince, format: iso8601 }
      pagination: { page_param: page, page_size_param: limit, page_size: 100 }
  - name: events
    source: mock
    path: /v1/events
    pagination: { preset: self_next, page_size: 100 }
    key: /id
  - name: items
    source: mock
    path: /items
    pagination: { preset: cursor, page_size: 100 }
    key: /id
  - name: sync
    source: mock
    path: /sync/records
    records: /records
    pagination: { preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: 100 }
    key: /id
  - name: jsonapi
    source: mock
    path: /jsonapi/records
    pagination: { preset: next_url, page_size: 100 }
    key: /id
  - name: github
    source: mock
    path: /github/records
    pagination: { preset: link_header, page_size: 100 }
    key: /id
    start: { param: since_ms, format: unix_ms, from: "2024-01-01" }
  - name: paged
    source: mock
    path: /paged/records
    records: /records
    pagination: { page_param: page, page_size_param: per_page, page_size: 100, total_pages: /total_pages }
    key: /id
  - name: offset
    source: mock
    path: /offset/records
    records: /records
    pagination: { offset_param: offset, page_size_param: limit, page_size: 100, total_count: /total }
    key: /id
  - name: hostile
    source: mock
    path: /hostile/loop
    records: /records
    pagination: { cursor_param: cursor, next_cursor: /next, has_more: /has_more }
    key: /id
  - name: header_cursor
    source: small
    path: /h
    records: /data
    pagination: { cursor_param: cursor, next_cursor: "header:X-Next-Cursor", has_more: /has_more }
    key: /id
  - name: last_record
    source: small
    path: /lr?fixed=1
    records: /results
    pagination: { cursor_param: after, next_cursor: "last_record:/id", stop_on_empty_page: true }
    key: /id
  - name: every_field
    source: small
    path: /all
    records: /page/items
    pagination:
      cursor_param: c
      next_cursor: /meta/next
      self_cursor: /meta/self
      has_more: /meta/more
      end_of_stream: /page/0
    key: /id
  - name: small_next_url
    source: small
    path: /n
    records: /data
    pagination: { next_url: /next, has_more: /more, end_of_stream: /eos }
    key: /id
  - name: small_link
    source: small
    path: /l
    pagination: { preset: link_header, stop_on_empty_page: false }
    key: /id
  - name: small_offset
    source: small
    path: /o
    records: /rows
    pagination: { offset_param: offset, total_count: /total, has_more: /more }
    key: /id
    start: { param: since, format: unix_ms, from: "2024-01-01" }
  - name: small_pages
    source: small
    path: /p
    records: /r
    pagination: { page_param: p, first_page: 5, page_size: 7, total_count: /count, total_pages: /pages, end_of_stream: /done }
    key: /id
    start: { param: since, format: iso8601 }
  # Request dialects (examples/dialects.yaml's, on the mock: seeds from its
  # /graphql, /notion, /es, /kinto and /slack endpoints).
  - name: graphql
    source: mock
    path: /graphql
    method: POST
    read_only: true
    body:
      query: "query($first: Int!, $after: String, $since: String) { records(first: $first, after: $after, since: $since) { edges { cursor node } pageInfo { endCursor hasNextPage } } }"
      variables: {}
    records: /data/records/edges
    record: /node
    key: /id
    version: /updated_at
    start: { param: "body:/variables/since", format: iso8601, from: "2024-01-01T00:00:00Z" }
    pagination:
      cursor_param: body:/variables/after
      next_cursor: /data/records/pageInfo/endCursor
      has_more: /data/records/pageInfo/hasNextPage
      page_size_param: body:/variables/first
      page_size: 100
    error_when:
      - { pointer: /errors/0/extensions/code, equals: RATE_LIMITED, transient: true, message: /errors/0/message, retry_after: /errors/0/extensions/retryAfter }
      - { pointer: /errors/0/extensions/code, equals: CURSOR_EXPIRED, transient: false, message: /errors/0/message }
      - { pointer: /errors, not_empty: true, message: /errors/0/message }
  - name: notion
    source: mock
    path: /notion/v1/databases/x/query
    method: POST
    read_only: true
    body:
      sorts: [ { timestamp: last_edited_time, direction: ascending } ]
    records: /results
    key: /id
    version: /updated_at
    pagination:
      cursor_param: body:/start_cursor
      next_cursor: /next_cursor
      has_more: /has_more
      page_size_param: body:/page_size
      page_size: 100
  - name: search
    source: mock
    path: /es/records/_search
    method: POST
    read_only: true
    body:
      sort: [ { updated_at: asc }, { id: asc } ]
    records: /hits/hits
    record: /_source
    key: /id
    version: /updated_at
    start: { param: "body:/query/range/updated_at/gte", format: unix, from: "2024-01-01" }
    pagination:
      cursor_param: body:/search_after
      next_cursor: last_record:/sort
      stop_on_empty_page: true
      page_size_param: body:/size
      page_size: 100
  - name: kinto
    source: mock
    path: /kinto/records
    records: /data
    key: /id
    version: /updated_at
    pagination:
      next_url: "header:Next-Page"
      page_size_param: _limit
      page_size: 100
  - name: slack
    source: mock
    path: /slack/conversations.history
    params: { channel: general }
    records: /messages
    key: /id
    version: /updated_at
    pagination:
      cursor_param: cursor
      next_cursor: /response_metadata/next_cursor
      has_more: /has_more
      page_size_param: limit
      page_size: 100
    error_when:
      - { pointer: /error, equals: ratelimited, transient: true, message: /error }
      - { pointer: /ok, equals: false, message: /error }
  # Page numbers and a unix start time in the body of a POST that is not
  # only a read.
  - name: small_body_pages
    source: small
    path: /bp
    method: POST
    read_only: false
    body: { filter: { kind: all }, sort: [ id ] }
    records: /items
    key: /id
    start: { param: "body:/filter/since", format: unix, from: "2024-01-01" }
    pagination: { page_param: "body:/page", page_size_param: "body:/per_page", page_size: 3, total_pages: /pages }
  # A JSON cursor in the body on the small limits: appended to an array of
  # the template, a Self cursor, a record inside each element, an error
  # rule on an object value with a message that is not a string.
  - name: small_json
    source: small
    path: /j
    method: QUERY
    body: { q: { filters: [ { f: a } ] } }
    records: /page/rows
    record: /r
    key: /id
    pagination: { cursor_param: "body:/q/filters/1", next_cursor: /page/next, self_cursor: /self, end_of_stream: /eos }
    error_when:
      - { pointer: /err, equals: { code: 7 }, transient: true, message: /err, retry_after: /wait }
      - { pointer: /warnings, not_empty: true }
  # A JSON cursor in the body from a header, sent with a GET.
  - name: small_json_header
    source: small
    path: /jh
    method: GET
    body: {}
    records: /data
    key: /id
    pagination: { cursor_param: "body:/cursor", next_cursor: "header:X-Cursor", has_more: /more }
"#;

struct Case {
    /// A walk at the feed's own start point, as the worker and `pull` build it.
    walk: Walk,
    /// The same walk without a start time.
    walk_without_start: Walk,
    max_cursor: usize,
    max_records: usize,
    secret_params: Vec<String>,
    /// The feed's method and `read_only`, as every request must carry them.
    method: Method,
    read_only: bool,
    /// Where a cursor placed in the body goes (`cursor_param: body:/…`).
    cursor_place: Option<JsonPointer>,
    /// The feed's `error_when` rules.
    rules: Vec<ErrorWhen>,
}

fn cases() -> &'static [Case] {
    static CASES: OnceLock<Vec<Case>> = OnceLock::new();
    CASES.get_or_init(|| {
        let cfg = config::load_str("fuzz.yaml", CONFIG).expect("the fuzz config is valid");
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let mut out = Vec::new();
        for feed in &cfg.feeds {
            let source = cfg.source_of(feed).expect("source");
            let partition = feed.partitions(now).expect("partitions").remove(0);
            let mut stages = vec![Stage::Bulk];
            if feed.incremental.is_some() {
                stages.push(Stage::Incremental);
            }
            for stage in stages {
                let walk = Walk::new(feed, source, &partition, stage)
                    .expect("walk")
                    .identifying(feed.key.clone(), feed.version.clone());
                let walk_without_start = Walk::from_paginator(walk.paginator().clone(), None)
                    .identifying(feed.key.clone(), feed.version.clone());
                let p = walk.paginator();
                let cursor_place = match &p.spec().strategy {
                    Strategy::Cursor { param, .. } if p.cursor_in_body() => {
                        match Place::parse(param).expect("a valid place") {
                            Place::Body(ptr) => Some(ptr),
                            Place::Query(_) => unreachable!("cursor_in_body with a query place"),
                        }
                    }
                    _ => None,
                };
                assert_eq!(cursor_place.is_some(), feed.cursor_is_json());
                out.push(Case {
                    walk,
                    walk_without_start,
                    max_cursor: source.max_cursor_bytes(),
                    max_records: source.max_records_per_page(),
                    secret_params: source.secret_query_params(),
                    method: feed.method(),
                    read_only: feed.read_only(),
                    cursor_place,
                    rules: feed.error_when.clone(),
                });
            }
        }
        out
    })
}

/// Splits the input into (paginator, flags, headers, position, body).
fn parse(data: &[u8]) -> Option<(u8, u8, Vec<(String, String)>, Option<String>, &[u8])> {
    let (&sel, rest) = data.split_first()?;
    let (&flags, rest) = rest.split_first()?;
    let split = find(rest, b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| find(rest, b"\n\n").map(|i| (i, 2)));
    let (head, body) = match split {
        Some((i, n)) => (&rest[..i], &rest[i + n..]),
        None => (&[][..], rest),
    };
    let mut headers = Vec::new();
    let mut pos = None;
    for line in String::from_utf8_lossy(head).lines() {
        if let Some(p) = line.strip_prefix(":pos ") {
            pos = Some(p.to_string());
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim_start().to_string()));
        }
    }
    Some((sel, flags, headers, pos, body))
}

fn debug() -> bool {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("TIDEMARK_FUZZ_DEBUG").is_some())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Some((sel, flags, headers, pos, body)) = parse(data) else {
        return;
    };
    let cases = cases();
    let case = &cases[sel as usize % cases.len()];
    let mut walk = match flags & 3 {
        0 => case.walk.clone(),
        1 => case.walk_without_start.clone(),
        2 => case
            .walk_without_start
            .clone()
            .at(Some(pos.unwrap_or_default())),
        _ => case.walk.clone().at(Some(pos.unwrap_or_default())),
    };
    // As the worker and `pull` do: a position whose request cannot be built
    // is an error before anything is fetched.
    let Ok(req) = walk.request() else {
        return;
    };
    check_request(case, walk.cursor(), &req);
    let before = walk.clone();
    let step = walk.advance(&req, &headers, body);
    if debug() {
        // TIDEMARK_FUZZ_DEBUG=1 with -runs=0: what each seed reads as.
        eprintln!(
            "case {} at {:?}: {:?}",
            sel as usize % cases.len(),
            before.position(),
            step.as_ref().map(|s| (s.records.len(), &s.next))
        );
    }
    check_error_rules(case, body, &step);
    let Ok(step) = step else {
        // A page that cannot be taken (an `error_when` answer included)
        // leaves the walk where it was.
        assert_eq!(walk.position(), before.position(), "moved on an error");
        assert_eq!(
            walk.empty_run(),
            before.empty_run(),
            "counted a failed page"
        );
        return;
    };
    check(case, &before, &req, &headers, body, &step);

    // The API answers the next request with the very same page (a classic
    // loop): read it again at the position it pointed to.
    if let Next::More(_) = &step.next {
        let before2 = walk.clone();
        if let Ok(req2) = walk.request()
            && let Ok(step2) = walk.advance(&req2, &headers, body)
        {
            check(case, &before2, &req2, &headers, body, &step2);
        }
    }
});

/// Invariants of a request: the feed's method and `read_only`, a body that
/// is JSON, and a cursor placed in the body there as the JSON it is.
fn check_request(case: &Case, cursor: Option<&str>, req: &PageRequest) {
    assert_eq!(req.method, case.method, "not the feed's method");
    assert_eq!(req.read_only, case.read_only, "not the feed's read_only");
    let body = req.body.as_deref().map(|b| match strict_json(b) {
        Ok(v) => v,
        Err(e) => panic!(
            "the request body is not JSON ({e}): {}",
            String::from_utf8_lossy(b)
        ),
    });
    if let (Some(place), Some(c)) = (&case.cursor_place, cursor) {
        let want: Value = serde_json::from_str(c).unwrap_or_else(|e| {
            panic!("a request was built at the body cursor {c:?}, not JSON ({e})")
        });
        let body = body.expect("a request with a body cursor has a body");
        assert_eq!(
            place.get(&body),
            Some(&want),
            "the body does not hold the cursor {c} at {place}"
        );
    }
}

/// `error_when`, checked against an independent reading of the body (a
/// `serde_json::Value`): an `Api` error exactly when a rule holds, the
/// first that holds deciding whether it is transient, and a bounded message.
fn check_error_rules(case: &Case, body: &[u8], step: &Result<Step, WalkError>) {
    if let Err(WalkError::Read(ReadError::Api {
        message,
        transient,
        retry_after,
    })) = step
    {
        assert!(
            !case.rules.is_empty(),
            "an API error from a feed without error_when"
        );
        assert!(
            message.chars().count() <= 301,
            "a message of {} chars",
            message.chars().count()
        );
        assert!(
            *transient || retry_after.is_none(),
            "retry_after on a permanent error"
        );
    }
    if case.rules.is_empty()
        || matches!(
            step,
            Err(WalkError::Read(
                ReadError::TooDeep { .. } | ReadError::NotJson(_)
            ))
        )
    {
        return;
    }
    // Bodies with duplicate keys (which one counts is up to the reader) or
    // strings serde_json's Value refuses (lone surrogates) are left out.
    let Ok(v) = strict_json(body) else { return };
    let holds = case.rules.iter().find(|r| {
        r.pointer.get(&v).is_some_and(|x| match &r.equals {
            Some(want) => x == want,
            None => {
                r.not_empty
                    && !(x.is_null()
                        || x.as_str() == Some("")
                        || x.as_array().is_some_and(Vec::is_empty)
                        || x.as_object().is_some_and(|o| o.is_empty()))
            }
        })
    });
    match (holds, step) {
        (Some(rule), Err(WalkError::Read(ReadError::Api { transient, .. }))) => {
            assert_eq!(*transient, rule.transient, "not the first rule that holds")
        }
        (Some(rule), other) => panic!("error_when {rule:?} holds but the page read as {other:?}"),
        (None, Err(WalkError::Read(e @ ReadError::Api { .. }))) => {
            panic!("no error_when rule holds but the page read as {e:?}")
        }
        (None, _) => {}
    }
}

/// Invariants of a page that the walk took.
fn check(
    case: &Case,
    used: &Walk,
    req: &PageRequest,
    headers: &[(String, String)],
    body: &[u8],
    step: &Step,
) {
    let p = used.paginator();
    let strategy = &p.spec().strategy;
    let used_str = used.cursor();

    // The record limit holds, and every record is a range of the body that
    // holds one JSON value (with `record:`, the value inside its element):
    // `pull` and the worker deliver these bytes.
    assert!(step.records.len() <= case.max_records);
    for r in &step.records {
        assert!(
            r.start < r.end && r.end <= body.len(),
            "record outside the body"
        );
        let bytes = &body[r.clone()];
        assert!(
            !bytes[0].is_ascii_whitespace() && !bytes[bytes.len() - 1].is_ascii_whitespace(),
            "record with whitespace around it"
        );
        if let Err(e) = serde_json::from_slice::<&RawValue>(bytes) {
            panic!(
                "record {:?} is not one JSON value: {e}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    assert!(step.identities.is_empty() || step.identities.len() == step.records.len());

    let (pos, more) = match &step.next {
        Next::More(n) => (Some(n.as_str()), true),
        Next::End { resume } => (resume.as_deref(), false),
    };
    let Some(pos) = pos else { return };

    match strategy {
        Strategy::NextUrl { .. } => {
            // A URL to follow or resume at is on the source's origin, and
            // never carries a query credential the API echoed.
            let url = Url::parse(pos).expect("a next/resume URL parses");
            assert_eq!(url.origin(), p.endpoint().origin(), "cross-origin {pos}");
            if more {
                assert!(pos.len() <= case.max_cursor, "next URL over the limit");
                assert_ne!(url, req.url, "More with the URL just fetched");
                for (k, _) in url.query_pairs() {
                    assert!(
                        !case.secret_params.iter().any(|s| *s == k),
                        "secret in {pos}"
                    );
                }
            }
        }
        Strategy::Cursor { .. } => {
            // A cursor the API handed out (not the one we came with) is
            // within max_cursor_bytes, whether it is followed or stored.
            if Some(pos) != used_str {
                assert!(
                    pos.len() <= case.max_cursor,
                    "cursor of {} bytes over the limit of {}",
                    pos.len(),
                    case.max_cursor
                );
                assert!(!pos.is_empty(), "an empty cursor");
            } else {
                assert!(!more, "More with the cursor just used");
            }
            // A cursor placed in the body is kept as JSON text.
            if p.cursor_in_body()
                && let Err(e) = serde_json::from_str::<Value>(pos)
            {
                panic!("the body cursor {pos:?} handed out is not JSON: {e}");
            }
            // The next cursor goes back as the API sent it.
            if more {
                check_cursor_as_sent(p, headers, body, pos);
            }
        }
        Strategy::Pages(_) => {
            pos.parse::<u64>().expect("a page number or offset");
        }
    }

    // Where the walk goes next (or resumes) can be requested, and the
    // request carries it.
    let at = used.clone().at(Some(pos.to_string()));
    match at.request() {
        Ok(next_req) => check_request(case, at.cursor(), &next_req),
        Err(e) => panic!("the walk returned position {pos:?} whose request fails: {e}"),
    }
}

/// `pos`, the next cursor a page handed out, is the value the API sent: in
/// the body (`cursor_param: body:/…`) the same JSON value (DESIGN.md: "it
/// goes back exactly as it came"), in a query parameter a string's text or
/// a number's text as written (CONFIGURATION.md: "a string or a number
/// (its text)").
fn check_cursor_as_sent(p: &Paginator, headers: &[(String, String)], body: &[u8], pos: &str) {
    let Strategy::Cursor { from, .. } = &p.spec().strategy else {
        return;
    };
    let json = p.cursor_in_body();
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    let raw = match from {
        CursorFrom::Header(name) => {
            let h = headers
                .header(name)
                .expect("More from a header cursor without the header");
            if json {
                assert_eq!(
                    serde_json::from_str::<Value>(pos).ok(),
                    Some(Value::String(h.clone())),
                    "the body cursor {pos} is not the header's text {h:?}"
                );
            } else {
                assert_eq!(pos, h, "the cursor is not the header's text");
            }
            return;
        }
        CursorFrom::Body(ptr) => raw_at(text, ptr),
        CursorFrom::LastRecord(ptr) => {
            let Ok(Some(array)) = raw_at(text, &p.spec().records) else {
                return;
            };
            let Ok(elements) = serde_json::from_str::<Vec<&RawValue>>(array.get()) else {
                return;
            };
            let Some(last) = elements.last() else {
                return;
            };
            raw_at(last.get(), ptr)
        }
    };
    let Ok(Some(raw)) = raw else {
        panic!("More({pos}) without a cursor in the answer");
    };
    let sent = raw.get();
    if json {
        let Ok(want) = serde_json::from_str::<Value>(sent) else {
            return;
        };
        let got: Value = serde_json::from_str(pos).expect("a body cursor is JSON");
        assert_eq!(
            got, want,
            "the body cursor handed out, {pos}, is not the value the API sent, {sent}"
        );
    } else if sent.starts_with('"') {
        let want: String = serde_json::from_str(sent).expect("a string cursor");
        assert_eq!(pos, want, "the cursor is not the string the API sent");
    } else {
        assert_eq!(
            pos, sent,
            "the query cursor handed out, {pos}, is not the number the API sent, {sent}"
        );
    }
}

/// `bytes` as a `serde_json::Value`, refusing duplicate object keys, with
/// no depth limit (a request body nests a JSON cursor below its place).
fn strict_json(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let Strict(v) = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// A `Value` that refuses duplicate keys.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_string())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Strict(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
            out.insert(k, v);
        }
        Ok(Strict(Value::Object(out)))
    }
}
