//! Fuzz the response reader: `Walk::advance` (and through it
//! `Paginator::read`, the one-pass extractor `Plan::run`, the RFC 8288
//! `Link` parser `link::find_rel` and record identity) for every pagination
//! style, with the walks built the way `pull` and the worker build them:
//! `config::load_str`, then `Walk::new`.
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
use tidemark_core::checkpoint::Stage;
use tidemark_core::config::{self, Strategy};
use tidemark_core::pagination::{Next, PageRequest};
use tidemark_core::walk::{Step, Walk};
use url::Url;

/// The feeds under test. The first nine are examples/mock.yaml's (one per
/// pagination style, pointed at the mock API on port 18080, where the seeds
/// come from), then one for the mock's /hostile pages; the rest cover the
/// fields no preset uses, a source with a path prefix, a query api key and
/// small limits. Adding or moving a feed changes the meaning of byte 0:
/// keep fuzz/make-seeds' table in step.
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
"#;

struct Case {
    /// A walk at the feed's own start point, as the worker and `pull` build it.
    walk: Walk,
    /// The same walk without a start time.
    walk_without_start: Walk,
    max_cursor: usize,
    max_records: usize,
    secret_params: Vec<String>,
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
                out.push(Case {
                    walk,
                    walk_without_start,
                    max_cursor: source.max_cursor_bytes(),
                    max_records: source.max_records_per_page(),
                    secret_params: source.secret_query_params(),
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
    let Ok(step) = step else {
        // A page that cannot be taken leaves the walk where it was.
        assert_eq!(walk.position(), before.position(), "moved on an error");
        return;
    };
    check(case, &before, &req, body, &step);

    // The API answers the next request with the very same page (a classic
    // loop): read it again at the position it pointed to.
    if let Next::More(_) = &step.next {
        let before2 = walk.clone();
        if let Ok(req2) = walk.request()
            && let Ok(step2) = walk.advance(&req2, &headers, body)
        {
            check(case, &before2, &req2, body, &step2);
        }
    }
});

/// Invariants of a page that the walk took.
fn check(case: &Case, used: &Walk, req: &PageRequest, body: &[u8], step: &Step) {
    let p = used.paginator();
    let strategy = &p.spec().strategy;
    let used_str = used.cursor();

    // The record limit holds, and every record is a range of the body that
    // holds one JSON value: `pull` and the worker deliver these bytes.
    assert!(step.records.len() <= case.max_records);
    for r in &step.records {
        assert!(
            r.start < r.end && r.end <= body.len(),
            "record outside the body"
        );
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
        }
        Strategy::Pages(_) => {
            pos.parse::<u64>().expect("a page number or offset");
        }
    }

    // Where the walk goes next (or resumes) can be requested.
    if let Err(e) = used.clone().at(Some(pos.to_string())).request() {
        panic!("the walk returned position {pos:?} whose request fails: {e}");
    }
}
