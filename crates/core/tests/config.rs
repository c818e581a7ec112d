//! Config validation: every kind of mistake is reported with its file, line,
//! column, field path and a reason a person can act on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use tidemark_core::config::{ConfigError, DeliveryPer, Mode, load_str};

const GOOD: &str = r#"sources:
  helpdesk:
    base_url: https://example.test
    auth: { bearer: "${HELPDESK_TOKEN}" }
    rate_limit: { per_second: 10, burst: 20 }
    timeout: 30s
feeds:
  - name: tickets
    source: helpdesk
    path: /api/v2/incremental/tickets/cursor.json
    params: { per_page: 1000 }
    records: /tickets
    pagination:
      preset: zendesk_cursor
    key: /id
    version: /updated_at
    start: { param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }
    mode: incremental
    every: 5m
    lag: 1m
    partitions: { param: account_id, values: ["1", "2"] }
    delivery: { per: record }
"#;

/// Replace the line holding `needle` with `with` (which may span lines).
fn edit(needle: &str, with: &str) -> String {
    let mut found = false;
    let out: Vec<String> = GOOD
        .lines()
        .map(|l| {
            if !found && l.contains(needle) {
                found = true;
                with.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "fixture has no line with {needle:?}");
    out.join("\n") + "\n"
}

fn errors(text: &str) -> Vec<ConfigError> {
    load_str("feeds.yaml", text)
        .expect_err("config must be rejected")
        .0
}

fn one(text: &str) -> String {
    let e = errors(text);
    assert_eq!(e.len(), 1, "expected one error, got {e:#?}");
    e[0].to_string()
}

#[test]
fn the_design_example_is_valid() {
    let c = load_str("feeds.yaml", GOOD).unwrap();
    let f = c.feed("tickets").unwrap();
    assert_eq!(f.params["per_page"], "1000");
    assert_eq!(f.mode, Mode::Incremental);
    assert_eq!(f.delivery.per, DeliveryPer::Record);
    assert_eq!(f.every.unwrap().std().as_secs(), 300);
    assert_eq!(f.partitions(chrono::Utc::now()).unwrap().len(), 2);
}

#[test]
fn unknown_field() {
    let msg = one(&edit("timeout: 30s", "    timeout: 30s\n    timeuot: 10s"));
    assert!(
        msg.starts_with("feeds.yaml:7:5: sources.helpdesk.timeuot: unknown field `timeuot`"),
        "{msg}"
    );
}

#[test]
fn missing_required_field() {
    let msg = one(&edit("key: /id", ""));
    assert!(
        msg.starts_with("feeds.yaml:8:5: feeds[0]: missing field `key`"),
        "{msg}"
    );
}

#[test]
fn wrong_type() {
    let msg = one(&edit("timeout: 30s", "    timeout: [30]"));
    assert!(
        msg.starts_with(
            "feeds.yaml:6:5: sources.helpdesk.timeout: invalid type: sequence, expected a string"
        ),
        "{msg}"
    );
    let msg = one(&edit("rate_limit:", "    rate_limit: { per_second: fast }"));
    assert!(
        msg.starts_with("feeds.yaml:5:") && msg.contains("rate_limit.per_second: invalid type"),
        "{msg}"
    );
}

#[test]
fn malformed_json_pointer() {
    let msg = one(&edit("version: /updated_at", "    version: updated_at"));
    assert_eq!(
        msg,
        "feeds.yaml:16:14: feeds[0].version: malformed JSON pointer \"updated_at\": it must be empty or start with '/' (e.g. /data or /meta/next)"
    );
    let msg = one(&edit(
        "preset: zendesk_cursor",
        "      preset: zendesk_cursor\n      has_more: /meta/~2",
    ));
    assert!(
        msg.starts_with("feeds.yaml:15:17: feeds[0].pagination.has_more: malformed JSON pointer"),
        "{msg}"
    );
    let msg = one(&edit(
        "preset: zendesk_cursor",
        "      preset: zendesk_cursor\n      next_cursor: after_cursor",
    ));
    assert!(
        msg.starts_with(
            "feeds.yaml:15:20: feeds[0].pagination.next_cursor: malformed JSON pointer"
        ),
        "{msg}"
    );
}

#[test]
fn unknown_preset() {
    let msg = one(&edit("preset: zendesk_cursor", "      preset: zendesk"));
    assert_eq!(
        msg,
        "feeds.yaml:14:15: feeds[0].pagination.preset: unknown preset \"zendesk\"; expected one of: zendesk_cursor, start_after, self_next, cursor, next_url, link_header"
    );
}

#[test]
fn feed_naming_an_unknown_source() {
    let msg = one(&edit("source: helpdesk", "    source: helpdesc"));
    assert_eq!(
        msg,
        "feeds.yaml:9:13: feeds[0].source: unknown source \"helpdesc\"; defined sources: helpdesk"
    );
}

#[test]
fn two_feeds_with_one_name() {
    let text = format!(
        "{GOOD}  - name: tickets\n    source: helpdesk\n    path: /other\n    records: /items\n    key: /id\n    pagination: {{ preset: cursor }}\n"
    );
    let msg = one(&text);
    assert!(
        msg.starts_with("feeds.yaml:23:11: feeds[1].name: two feeds are named \"tickets\""),
        "{msg}"
    );
}

#[test]
fn bad_duration() {
    let msg = one(&edit("every: 5m", "    every: soon"));
    assert!(
        msg.starts_with("feeds.yaml:19:12: feeds[0].every: invalid duration \"soon\""),
        "{msg}"
    );
    let msg = one(&edit("timeout: 30s", "    timeout: 30"));
    assert!(
        msg.starts_with("feeds.yaml:6:14: sources.helpdesk.timeout: invalid duration"),
        "{msg}"
    );
}

#[test]
fn pagination_mistakes() {
    let msg = one(&edit(
        "preset: zendesk_cursor",
        "      page_param: page\n      cursor_param: c\n      next_cursor: /n",
    ));
    assert!(
        msg.starts_with("feeds.yaml:13:5: feeds[0].pagination: mixes page-based fields"),
        "{msg}"
    );
    let msg = one(&edit("preset: zendesk_cursor", "      next_cursor: /next"));
    assert!(
        msg.contains("feeds[0].pagination.cursor_param: missing"),
        "{msg}"
    );
    let msg = one(&edit(
        "preset: zendesk_cursor",
        "      stop_on_empty_page: true",
    ));
    assert!(
        msg.contains("feeds[0].pagination: no way to reach the next page"),
        "{msg}"
    );
    let e = errors(&edit("records: /tickets", "    records: \"\""));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].to_string()
            .contains("feeds[0].pagination.next_cursor: records is \"\""),
        "{}",
        e[0]
    );
    assert!(
        e[1].to_string()
            .contains("feeds[0].pagination.end_of_stream: records is \"\""),
        "{}",
        e[1]
    );
}

#[test]
fn modes_partitions_and_timestamps() {
    let msg = one(&edit(
        "mode: incremental",
        "    mode: incremental\n    incremental: { params: { a: b } }",
    ));
    assert!(msg.starts_with("feeds.yaml:19:5: feeds[0].incremental: an incremental block only applies to mode: bulk_then_incremental"), "{msg}");
    let msg = one(&edit("mode: incremental", "    mode: fast"));
    assert!(
        msg.starts_with("feeds.yaml:18:11: feeds[0].mode: unknown variant `fast`"),
        "{msg}"
    );
    let msg = one(&edit(
        "partitions:",
        "    partitions: { param: account_id }",
    ));
    assert!(
        msg.contains("feeds[0].partitions: set exactly one of values"),
        "{msg}"
    );
    let msg = one(&edit(
        "start:",
        "    start: { param: start_time, format: unix, from: last tuesday }",
    ));
    assert!(
        msg.contains("feeds[0].start.from: invalid timestamp \"last tuesday\""),
        "{msg}"
    );
}

#[test]
fn several_errors_are_all_reported_in_file_order() {
    let text = edit("source: helpdesk", "    source: nope")
        .replace("every: 5m", "every: soonish")
        .replace("key: /id", "key: id");
    let e = errors(&text);
    // serde stops at the first structural error; semantic checks run only on a parsed file.
    assert_eq!(e.len(), 1, "{e:#?}");
    let text = edit("source: helpdesk", "    source: nope")
        .replace("preset: zendesk_cursor", "preset: nope");
    let e = errors(&text);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(e[0].line < e[1].line);
}

#[test]
fn secrets_never_appear_in_errors() {
    let text = edit(
        "auth:",
        "    auth: { bearer: hunter2-literal, basic: { username: u, password: pw-literal } }",
    );
    let msg = one(&text);
    assert!(
        msg.contains("sources.helpdesk.auth: set exactly one of bearer, basic, api_key or oauth2_client_credentials"),
        "{msg}"
    );
    assert!(
        !msg.contains("hunter2") && !msg.contains("pw-literal"),
        "{msg}"
    );
    let c = load_str("f.yaml", GOOD).unwrap();
    let dbg = format!("{c:?}");
    assert!(dbg.contains("${HELPDESK_TOKEN}"));
}

/// A bulk_then_incremental feed whose incremental block is `block`.
fn bulk_feed(block: &str) -> String {
    format!(
        r#"sources:
  api:
    base_url: https://example.test
feeds:
  - name: inspections
    source: api
    path: /v2/clients/c/inspections
    pagination: {{ preset: start_after, page_size: 500 }}
    key: /id
    version: /updated_at
    mode: bulk_then_incremental
    lag: 1m
    incremental:
{block}"#
    )
}

#[test]
fn page_and_cursor_fields_never_mix_in_any_pagination_block() {
    // In the incremental block, with its line and column.
    let text = bulk_feed(
        "      start: { param: updatedSince }\n      pagination:\n        page_param: page\n        next_cursor: /meta/next\n        cursor_param: c\n",
    );
    let e = load_str("feeds.yaml", &text).unwrap_err().to_string();
    assert!(
        e.contains("feeds.yaml:15:7: feeds[0].incremental.pagination: mixes page-based fields"),
        "{e}"
    );
    // Page numbers beside a preset; totals beside a cursor preset.
    let msg = one(&edit(
        "preset: zendesk_cursor",
        "      preset: zendesk_cursor\n      page_param: page",
    ));
    assert!(
        msg.contains("feeds[0].pagination: mixes page-based fields"),
        "{msg}"
    );
    let msg = one(&edit(
        "preset: zendesk_cursor",
        "      preset: zendesk_cursor\n      total_count: /count",
    ));
    assert!(
        msg.contains("feeds[0].pagination: mixes page-based fields"),
        "{msg}"
    );
    // An incremental block under a snapshot feed, too, is refused where it stands.
    let msg = one(&edit(
        "mode: incremental",
        "    mode: snapshot\n    incremental: { params: { a: b } }",
    ));
    assert!(msg.starts_with("feeds.yaml:19:5: feeds[0].incremental: an incremental block only applies to mode: bulk_then_incremental"), "{msg}");
}

#[test]
fn the_incremental_block_replaces_the_bulk_walks_params_start_and_pagination() {
    use chrono::TimeZone;
    use tidemark_core::checkpoint::Stage;
    use tidemark_core::pagination::Position;
    let text = bulk_feed(
        "      params: { sort: updated }\n      start: { param: updatedSince, format: iso8601 }\n      pagination: { page_param: page, page_size_param: limit, page_size: 100 }\n",
    );
    let config = load_str("feeds.yaml", &text).unwrap();
    let feed = &config.feeds[0];
    let source = &config.sources["api"];
    let part = feed.partitions(chrono::Utc::now()).unwrap().remove(0);
    let from = chrono::Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).unwrap();
    let bulk = feed.paginator_for(source, &part, Stage::Bulk).unwrap();
    let url = bulk.request(&Position::Start { from: None }).unwrap().url;
    assert!(url.as_str().contains("paginationMode=CURSOR"), "{url}");
    let inc = feed
        .paginator_for(source, &part, Stage::Incremental)
        .unwrap();
    let url = inc
        .request_in_chain(&Position::Start { from: Some(from) }, Some(from))
        .unwrap()
        .url;
    assert_eq!(
        url.as_str(),
        "https://example.test/v2/clients/c/inspections?sort=updated&limit=100&updatedSince=2024-05-01T00%3A00%3A00Z&page=1"
    );
    let url = inc
        .request_in_chain(&Position::At("2".into()), Some(from))
        .unwrap()
        .url;
    assert!(!url.as_str().contains("paginationMode"), "{url}");
    assert!(
        url.as_str().contains("updatedSince=2024-05-01") && url.as_str().ends_with("page=2"),
        "{url}"
    );
}

/// Time windows from long ago every second would be hundreds of millions
/// of jobs, built in memory by validate, pull and the coordinator: refused
/// with the count and what to change (found while writing fuzz/).
#[test]
fn too_many_time_windows_are_refused() {
    let windows = |from: &str, to: &str, every: &str| {
        edit(
            "partitions:",
            &format!(
                "    partitions: {{ windows: {{ from: \"{from}\",{to} every: {every}, end_param: end_time }} }}"
            ),
        )
    };
    let msg = one(&windows("2000-01-01T00:00:00Z", "", "1s"));
    assert!(msg.contains("feeds[0].partitions.windows"), "{msg}");
    assert!(
        msg.contains("over the limit of 100000 jobs per feed"),
        "{msg}"
    );
    assert!(msg.contains("to now every 1s"), "{msg}");

    let bounded = windows(
        "2024-01-01T00:00:00Z",
        " to: \"2024-01-03T00:00:00Z\",",
        "1s",
    );
    let msg = one(&bounded);
    assert!(msg.contains("172800 windows"), "{msg}");

    // Fewer load, and the last window ends at `to`.
    let hourly = windows(
        "2024-01-01T00:00:00Z",
        " to: \"2024-01-02T00:00:00Z\",",
        "1h",
    );
    let c = load_str("feeds.yaml", &hourly).unwrap();
    let parts = c
        .feed("tickets")
        .unwrap()
        .partitions(chrono::Utc::now())
        .unwrap();
    assert_eq!(parts.len(), 24);
    assert_eq!(
        parts[23].params,
        vec![("end_time".to_string(), "1704153600".to_string())]
    );
}

/// A worker finds a page's partition by its id without listing the feed's
/// partitions: the same answer as the list, for values, windows and the
/// one default partition, and `None` for an id the feed does not have.
#[test]
fn a_partition_is_found_by_id_as_the_list_has_it() {
    let yaml = r#"sources:
  api: { base_url: "https://api.example.com" }
feeds:
  - name: accounts
    source: api
    path: /records
    key: /id
    pagination: { preset: next_url }
    partitions: { param: account, values: ["a", "b/c", "ü"] }
  - name: history
    source: api
    path: /records
    key: /id
    pagination: { preset: next_url }
    start: { param: since, format: unix }
    partitions: { windows: { from: "2024-01-01", to: "2024-01-03T12:00:00Z", every: 1d, end_param: until } }
  - name: plain
    source: api
    path: /records
    key: /id
    pagination: { preset: next_url }
"#;
    let config = tidemark_core::config::load_str("feeds.yaml", yaml).expect("valid");
    let now = chrono::Utc::now();
    for feed in &config.feeds {
        let all = feed.partitions(now).expect("partitions");
        assert!(!all.is_empty());
        for p in &all {
            assert_eq!(
                feed.partition(&p.id, now).expect("lookup").as_ref(),
                Some(p),
                "{}",
                feed.name
            );
        }
        for missing in [
            "zz",
            "2024-01-01T06:00:00Z",
            "2024-01-04T00:00:00Z",
            "2024-01-01T00:00:00+00:00",
        ] {
            assert_eq!(
                feed.partition(missing, now).expect("lookup"),
                None,
                "{} {missing}",
                feed.name
            );
        }
    }
    let windows = config
        .feed("history")
        .expect("feed")
        .partitions(now)
        .expect("windows");
    assert_eq!(windows.len(), 3, "the last window is cut at `to`");
}

#[test]
fn request_dialect_mistakes() {
    // A body without a method.
    let msg = one(&edit(
        "    path: /api/v2",
        "    path: /api/v2/search\n    body: { query: x }",
    ));
    assert!(
        msg.starts_with("feeds.yaml:11:5: feeds[0].body: sends a body: write the method too"),
        "{msg}"
    );
    // A POST that does not say whether it only reads.
    let msg = one(&edit(
        "    path: /api/v2",
        "    path: /api/v2/search\n    method: POST",
    ));
    assert!(
        msg.starts_with("feeds.yaml:11:13: feeds[0].method: say whether this POST only reads"),
        "{msg}"
    );
    // read_only on a GET.
    let msg = one(&edit(
        "    path: /api/v2",
        "    path: /x\n    read_only: true",
    ));
    assert!(
        msg.starts_with("feeds.yaml:11:16: feeds[0].read_only: only for method: POST"),
        "{msg}"
    );
    // A body that is not a mapping; a method that does not exist.
    let msg = one(&edit(
        "    path: /api/v2",
        "    path: /x\n    method: GET\n    body: [1, 2]",
    ));
    assert!(
        msg.starts_with("feeds.yaml:12:5: feeds[0].body: must be a mapping"),
        "{msg}"
    );
    let msg = one(&edit(
        "    path: /api/v2",
        "    path: /x\n    method: DELETE",
    ));
    assert!(
        msg.starts_with("feeds.yaml:11:13: feeds[0].method: unknown variant `DELETE`"),
        "{msg}"
    );
    // A body place with a broken pointer; a body value in params.
    let msg = one(&edit(
        "      preset: zendesk_cursor",
        "      preset: zendesk_cursor\n      cursor_param: \"body:variables\"",
    ));
    assert!(
        msg.starts_with("feeds.yaml:15:21: feeds[0].pagination.cursor_param: malformed JSON pointer \"variables\""),
        "{msg}"
    );
    let msg = one(&edit(
        "    params: { per_page: 1000 }",
        "    params: { \"body:/x\": 1 }",
    ));
    assert!(
        msg.contains("feeds[0].params.body:/x: params are query parameters"),
        "{msg}"
    );
    // A header next URL with a bad name.
    let msg = one(&edit(
        "      preset: zendesk_cursor",
        "      next_url: \"header:Next Page\"",
    ));
    assert!(
        msg.starts_with(
            "feeds.yaml:14:17: feeds[0].pagination.next_url: header:NAME needs a valid header name"
        ),
        "{msg}"
    );
    // Rate-limit headers with a name that is no header name.
    let msg = one(&edit(
        "    timeout: 30s",
        "    timeout: 30s\n    rate_limit_headers: { remaining: \"Budget Left\" }",
    ));
    assert!(
        msg.starts_with("feeds.yaml:7:38: sources.helpdesk.rate_limit_headers.remaining: \"Budget Left\" is not a header name"),
        "{msg}"
    );
    // error_when: neither condition, retry_after on a permanent rule, a
    // pointer into the records.
    let e = errors(&edit(
        "    delivery: { per: record }",
        "    delivery: { per: record }\n    error_when:\n      - { pointer: /error }\n      - { pointer: /ok, equals: false, retry_after: /wait }\n      - { pointer: /tickets/0/error, not_empty: true }",
    ));
    let all: Vec<String> = e.iter().map(ToString::to_string).collect();
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(
        all[0].contains(
            "feeds.yaml:24:11: feeds[0].error_when[0]: set equals (a value) or not_empty: true"
        ),
        "{all:#?}"
    );
    assert!(
        all[1].contains(
            "feeds.yaml:25:53: feeds[0].error_when[1].retry_after: only for transient: true"
        ),
        "{all:#?}"
    );
    assert!(all[2].contains("feeds.yaml:26:20: feeds[0].error_when[2].pointer: /tickets/0/error lies inside the records array"), "{all:#?}");
    // record: "" is the element itself.
    let msg = one(&edit("    key: /id", "    key: /id\n    record: \"\""));
    assert!(
        msg.contains("feeds[0].record: \"\" is the element itself"),
        "{msg}"
    );
}

#[test]
fn body_places_must_fit_the_template_and_each_other() {
    let base = "sources:\n  s: { base_url: \"http://api.test\" }\nfeeds:\n  - name: f\n    source: s\n    path: /q\n    method: POST\n    read_only: true\n    records: /r\n    key: /id\n";
    // The page size's place holds the cursor's.
    let text = format!(
        "{base}    pagination: {{ cursor_param: \"body:/variables/after\", next_cursor: /n, page_size_param: \"body:/variables\", page_size: 5 }}\n"
    );
    let e = errors(&text);
    assert!(
        e.iter().any(|e| e.to_string().contains(
            "feeds[0].pagination.page_size_param: body:/variables and pagination.cursor_param's body:/variables/after overlap"
        )),
        "{e:#?}"
    );
    // A template value on the way that is a string.
    let text = format!(
        "{base}    body: {{ variables: none }}\n    pagination: {{ cursor_param: \"body:/variables/after\", next_cursor: /n }}\n"
    );
    let msg = one(&text);
    assert!(
        msg.contains("feeds[0].pagination.cursor_param: the body template has no place for it"),
        "{msg}"
    );
    // `equals: null` is a condition on null, not a missing one.
    let text = format!(
        "{base}    body: {{}}\n    pagination: {{ cursor_param: \"body:/after\", next_cursor: /n }}\n    error_when:\n      - {{ pointer: /data, equals: null, message: /errors/0/message }}\n"
    );
    let cfg = load_str("feeds.yaml", &text).unwrap();
    assert_eq!(
        cfg.feeds[0].error_when[0].equals,
        Some(serde_json::Value::Null)
    );
}
