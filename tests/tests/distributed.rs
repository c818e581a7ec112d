//! The distributed sync end to end: a coordinator, three workers, the mock
//! API, Redis and RabbitMQ as real processes, and a checker on the
//! downstream exchange comparing what arrived with the mock's ground truth.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::time::Duration;

use tidemark_core::checkpoint::Phase;
use tidemark_tests::{Checker, Cluster, versions};

/// Every pagination preset, plus page numbers and offsets, per-page
/// delivery and snapshot mode: 12 feeds, two partitions each.
fn twelve_feeds(page_size: usize) -> String {
    let parts = r#"partitions: { param: account, values: ["a", "b"] }"#;
    let feeds = [
        (
            "tickets",
            "/api/v2/incremental/tickets/cursor.json",
            "records: /tickets\n    pagination: { preset: zendesk_cursor, page_size: PS }\n    version: /updated_at\n    start: { param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }",
        ),
        (
            "tickets_pages",
            "/api/v2/incremental/tickets/cursor.json",
            "records: /tickets\n    pagination: { preset: zendesk_cursor, page_size: PS }\n    version: /updated_at\n    start: { param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }\n    delivery: { per: page }",
        ),
        (
            "inspections",
            "/v2/clients/0b6e4c1a-1111-4c1a-9c1a-0b6e4c1a1111/inspections",
            "pagination: { preset: start_after, page_size: PS }\n    version: /updated_at\n    mode: bulk_then_incremental\n    incremental:\n      params: { paginationMode: PAGE }\n      start: { param: updatedSince, format: iso8601 }\n      pagination: { page_param: page, page_size_param: limit, page_size: PS, total_pages: /meta/totalPages }",
        ),
        (
            "events",
            "/v1/events",
            "pagination: { preset: self_next, page_size: PS }\n    version: /updated_at",
        ),
        (
            "events_snapshot",
            "/v1/events",
            "pagination: { preset: self_next, page_size: PS }\n    version: /updated_at\n    mode: snapshot\n    delivery: { per: page }",
        ),
        (
            "items",
            "/items",
            "pagination: { preset: cursor, page_size: PS }\n    version: /updated_at",
        ),
        (
            "sync",
            "/sync/records",
            "records: /records\n    pagination: { preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: PS }\n    version: /updated_at",
        ),
        (
            "sync_pages",
            "/sync/records",
            "records: /records\n    pagination: { preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: PS }\n    version: /updated_at\n    delivery: { per: page }",
        ),
        (
            "jsonapi",
            "/jsonapi/records",
            "pagination: { preset: next_url, page_size: PS }\n    version: /updated_at",
        ),
        (
            "github",
            "/github/records",
            "pagination: { preset: link_header, page_size: PS }\n    version: /updated_at\n    start: { param: since_ms, format: unix_ms, from: \"2024-01-01\" }",
        ),
        (
            "paged",
            "/paged/records",
            "records: /records\n    pagination: { page_param: page, page_size_param: per_page, page_size: PS, total_pages: /total_pages }",
        ),
        (
            "offset",
            "/offset/records",
            "records: /records\n    pagination: { offset_param: offset, page_size_param: limit, page_size: PS, total_count: /total }",
        ),
    ];
    let mut yaml = String::new();
    for (name, path, rest) in feeds {
        yaml.push_str(&format!(
            "  - name: {name}\n    source: mock\n    path: {path}\n    key: /id\n    every: 1h\n    {parts}\n    {}\n",
            rest.replace("PS", &page_size.to_string())
        ));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twelve_feeds_every_preset_two_partitions_200k_records() {
    const PER_PARTITION: usize = 8334; // 12 feeds x 2 partitions x 8334 = 200,016 records
    let mut c = Cluster::start(
        &twelve_feeds(500),
        &[
            "--records",
            &PER_PARTITION.to_string(),
            "--record-bytes",
            "200",
        ],
    );
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator("coord-1");
    for i in 0..3 {
        c.worker(&format!("worker-{i}"), &["--concurrency", "8"]);
    }
    let truth = c.truth().await;
    let expected: HashSet<_> = truth.records.iter().cloned().collect();
    let total = 24 * PER_PARTITION;
    let done = checker.wait_for(total, Duration::from_secs(400)).await;
    // A moment more, so that a late duplicate would be seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let arrived = checker.arrived();
    assert!(
        done,
        "only {} of {total} records arrived{}",
        arrived.len(),
        c.logs()
    );
    let parts = checker.by_partition();
    assert_eq!(parts.len(), 24, "routing keys: {:?}", parts.keys());
    for (key, recs) in &parts {
        let got = versions(recs);
        assert_eq!(got, expected, "{key}: records differ from the source");
        assert_eq!(recs.len(), PER_PARTITION, "{key}: duplicates");
        // Order within a partition: the source's order (ids rise with updated_at here).
        assert!(
            recs.windows(2).all(|w| w[0].id < w[1].id),
            "{key}: records out of order"
        );
    }
    assert_eq!(arrived.len(), total);
    assert_eq!(checker.duplicate_messages(), 0);
    let jobs = c.jobs().await;
    assert_eq!(jobs.len(), 24);
    for (job, cp) in &jobs {
        assert!(
            cp.phase == Phase::Idle && cp.last_error.is_none(),
            "{job}: {cp:?}"
        );
    }
    // Workers stop cleanly on SIGTERM.
    for p in c.procs.iter_mut() {
        let status = p.term(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} did not exit 0 on SIGTERM: {status:?}",
            p.name
        );
    }
}
