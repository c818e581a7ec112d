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

/// An upgrade: the state an earlier version left in Redis (one hash per job
/// and a set of every job key, no indexes), mid-sync. The new coordinator
/// indexes it once and carries on from it: the idle job runs, the chain
/// left running with an expired lease is re-issued from its stored cursor,
/// the paused job stays paused, the job of a feed the config no longer has
/// is retired, and the old set is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_takes_over_state_of_the_layout_without_indexes() {
    const RECORDS: usize = 120;
    let feed = "  - name: docs\n    source: mock\n    path: /jsonapi/records\n    \
                pagination: { preset: next_url, page_size: 20 }\n    key: /id\n    version: /updated_at\n    \
                every: 1h\n    partitions: { param: shard, values: [\"idle\", \"mid\", \"held\"] }\n";
    let mut c = Cluster::start(feed, &["--records", &RECORDS.to_string()]);
    let prefix = c.redis_prefix();
    let client = redis::Client::open(c.redis.as_str()).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    // "mid" is two pages in: its cursor is the third page's URL, as the
    // API gave it.
    let mut third = format!("{}/jsonapi/records?limit=20&shard=mid", c.mock_url);
    for _ in 0..2 {
        let page: serde_json::Value = reqwest::get(&third).await.unwrap().json().await.unwrap();
        third = page["links"]["next"]
            .as_str()
            .expect("a next link")
            .to_string();
    }
    type OldJob<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);
    let old: [OldJob; 4] = [
        (
            "docs",
            "idle",
            vec![("phase", "idle".into()), ("next_due_ms", "0".into())],
        ),
        (
            "docs",
            "mid",
            vec![
                ("phase", "running".into()),
                ("epoch", "5".into()),
                ("seq", "2".into()),
                ("lease_until_ms", "1".into()),
                ("cursor", third),
                ("pages", "2".into()),
                ("records", "40".into()),
            ],
        ),
        ("docs", "held", vec![("phase", "paused".into())]),
        (
            "gone",
            "all",
            vec![("phase", "idle".into()), ("next_due_ms", "0".into())],
        ),
    ];
    for (feed, part, fields) in &old {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        tidemark_harness::legacy::write_job(&mut r, &prefix, feed, part, &fields)
            .await
            .unwrap();
    }

    let checker = Checker::start(&c.exchange()).await;
    c.coordinator("coord");
    c.worker("w1", &[]);
    // idle: every record; mid: the records from its cursor on.
    let want = RECORDS + (RECORDS - 40);
    assert!(
        checker.wait_for(want, Duration::from_secs(60)).await,
        "{} of {want} records arrived{}",
        checker.count(),
        c.logs()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let parts = checker.by_partition();
    assert_eq!(parts.get("docs.idle").map(Vec::len), Some(RECORDS));
    let mid = &parts["docs.mid"];
    assert_eq!(
        mid.len(),
        RECORDS - 40,
        "mid carried on from its stored cursor"
    );
    assert!(
        !parts.contains_key("docs.held"),
        "a paused job stays paused"
    );
    assert!(
        !parts.contains_key("gone.all"),
        "a job of a removed feed is not run"
    );

    let store = c.store().await;
    let jobs = c.jobs().await;
    let names: Vec<String> = jobs.iter().map(|(j, _)| j.to_string()).collect();
    assert_eq!(
        names,
        vec!["docs/held", "docs/idle", "docs/mid"],
        "the removed feed's job is retired"
    );
    let mid_cp = jobs
        .iter()
        .find(|(j, _)| j.partition == "mid")
        .unwrap()
        .1
        .clone();
    assert!(
        mid_cp.epoch > 5 && mid_cp.records == RECORDS as u64,
        "{mid_cp:?}"
    );
    let legacy: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}jobs"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(!legacy, "the old set of job keys is gone");
    let layout: Option<u64> = redis::cmd("GET")
        .arg(format!("{prefix}layout"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(layout, Some(2));
    let census = tidemark_state::Jobs::census(&*store).await.unwrap();
    assert_eq!(census.len(), 1);
    assert_eq!((census[0].idle, census[0].paused), (2, 1));
}
