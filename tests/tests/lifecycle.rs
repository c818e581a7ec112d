//! The distributed sync over time and under trouble: later polls, the
//! bulk→incremental handoff, an expired cursor, killed workers and a killed
//! leader, a rolling restart, and a feed whose API is down.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashSet;
use std::time::Duration;

use tidemark_core::checkpoint::{Phase, Stage};
use tidemark_mock::TruthRecord;
use tidemark_tests::{Checker, Cluster, eventually, versions};

fn feed(name: &str, path: &str, rest: &str) -> String {
    format!(
        "  - name: {name}\n    source: mock\n    path: {path}\n    key: /id\n    version: /updated_at\n    {rest}\n"
    )
}

fn tickets(name: &str, extra: &str) -> String {
    feed(
        name,
        "/api/v2/incremental/tickets/cursor.json",
        &format!(
            "records: /tickets\n    pagination: {{ preset: zendesk_cursor, page_size: 100 }}\n    start: {{ param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }}\n    {extra}"
        ),
    )
}

/// The change-ordered styles, polled every second.
fn polled_feeds() -> String {
    [
        tickets("tickets", "every: 1s"),
        feed("events", "/v1/events", "pagination: { preset: self_next, page_size: 100 }\n    every: 1s"),
        // Seed 001 exactly: the last page has no Next at all.
        feed("events_no_next", "/v1/events", "params: { omit_next: \"1\" }\n    pagination: { preset: self_next, page_size: 100 }\n    every: 1s"),
        feed("items", "/items", "pagination: { preset: cursor, page_size: 100 }\n    every: 1s"),
        feed("sync", "/sync/records", "records: /records\n    pagination: { preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: 100 }\n    every: 1s"),
        feed("jsonapi", "/jsonapi/records", "pagination: { preset: next_url, page_size: 100 }\n    every: 1s"),
        feed("github", "/github/records", "pagination: { preset: link_header, page_size: 100 }\n    start: { param: since_ms, format: unix_ms, from: \"2024-01-01\" }\n    every: 1s"),
    ]
    .concat()
}

fn missing(got: &HashSet<TruthRecord>, want: &[TruthRecord]) -> Vec<TruthRecord> {
    want.iter().filter(|v| !got.contains(v)).cloned().collect()
}

/// Wait up to `timeout` until every routing key in `keys` has received
/// every version in `want`; otherwise fail, naming what is missing where.
async fn assert_all_arrive(
    c: &Cluster,
    checker: &Checker,
    keys: &[&str],
    want: &[TruthRecord],
    timeout: Duration,
    what: &str,
) {
    if eventually(timeout, async || all_arrived(checker, keys, want)).await {
        return;
    }
    let parts = checker.by_partition();
    for k in keys {
        let m = missing(
            &versions(parts.get(*k).map(Vec::as_slice).unwrap_or_default()),
            want,
        );
        assert!(
            m.is_empty(),
            "{what}: {k}: {} versions missing, e.g. {:?}{}",
            m.len(),
            m.first(),
            c.logs()
        );
    }
    panic!(
        "{what}: not everything arrived within {timeout:?}{}",
        c.logs()
    );
}

/// Every routing key has received every version in `want`.
fn all_arrived(checker: &Checker, keys: &[&str], want: &[TruthRecord]) -> bool {
    let parts = checker.by_partition();
    keys.iter().all(|k| {
        parts
            .get(*k)
            .is_some_and(|recs| missing(&versions(recs), want).is_empty())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inserts_and_updates_during_and_after_the_first_walk_arrive_on_later_polls() {
    let mut c = Cluster::start(&polled_feeds(), &["--records", "5000", "--latency-ms", "5"]);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator("coord");
    c.worker("w1", &[]);
    c.worker("w2", &[]);
    let keys = [
        "tickets.all",
        "events.all",
        "events_no_next.all",
        "items.all",
        "sync.all",
        "jsonapi.all",
        "github.all",
    ];

    // During the first walk: new records.
    assert!(checker.wait_for(3001, Duration::from_secs(60)).await);
    c.admin("/_admin/insert?n=25", None).await;
    // After it: inserts and updates, each batch seen before the next, so every version is observable.
    for round in 0..3 {
        let want = c.truth().await.versions;
        let what = format!("round {round}");
        assert_all_arrive(&c, &checker, &keys, &want, Duration::from_secs(120), &what).await;
        c.admin("/_admin/insert?n=10", None).await;
        c.admin("/_admin/update?n=15", None).await;
    }
    let truth = c.truth().await;
    assert!(truth.versions.len() >= 5000 + 25 + 30 + 45);
    assert_all_arrive(
        &c,
        &checker,
        &keys,
        &truth.versions,
        Duration::from_secs(120),
        "after the last round",
    )
    .await;
    // No faults, so no duplicates, except where the API gives nothing to
    // continue from at the end (seed 001's empty Next, a missing next link):
    // each poll starts again at the last page read and re-sends it, with
    // the same message ids.
    let dups = checker.duplicates_by_partition();
    for k in ["tickets.all", "items.all", "sync.all"] {
        assert_eq!(dups.get(k).copied().unwrap_or(0), 0, "{k}: {dups:?}");
    }
    // ... and a re-sent record carries the message id it had the first time:
    // one id per record version, however many polls re-read the last page.
    let parts = checker.by_partition();
    for k in ["events.all", "events_no_next.all"] {
        let arrived = &parts[k];
        let ids: HashSet<&str> = arrived.iter().map(|a| a.message_id.as_str()).collect();
        assert_eq!(
            ids.len(),
            versions(arrived).len(),
            "{k}: message ids per version"
        );
        let polls = c
            .jobs()
            .await
            .into_iter()
            .find(|(j, _)| format!("{}.all", j.feed) == k)
            .map(|(_, cp)| cp.pages)
            .unwrap_or(0);
        assert!(polls >= 50 + 3, "{k}: {polls} pages");
    }
    for (job, cp) in c.jobs().await {
        assert!(cp.pages >= 50 && cp.last_error.is_none(), "{job}: {cp:?}");
    }
}

/// The job of a one-partition feed.
async fn the_job(c: &Cluster) -> tidemark_core::checkpoint::Checkpoint {
    c.jobs().await.pop().expect("one job").1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_then_incremental_delivers_changes_during_and_after_the_bulk_walk_and_keeps_t0() {
    // Seed 002: a keyset bulk walk, then page-based incremental syncs with
    // updatedSince. Small incremental pages, so each sync spans several.
    let yaml = feed(
        "inspections",
        "/v2/clients/0b6e4c1a-1111-4c1a-9c1a-0b6e4c1a1111/inspections",
        "pagination: { preset: start_after, page_size: 100 }\n    mode: bulk_then_incremental\n    lag: 1s\n    every: 2s\n    incremental:\n      params: { paginationMode: PAGE }\n      start: { param: updatedSince, format: iso8601 }\n      pagination: { page_param: page, page_size_param: limit, page_size: 10, total_pages: /meta/totalPages }",
    );
    let mut c = Cluster::start(&yaml, &["--records", "4000", "--latency-ms", "40"]);
    c.env.push(("TIDEMARK_LEASE".into(), "3s".into()));
    c.env.push(("TIDEMARK_QUEUE_LEASE".into(), "6s".into()));
    let checker = Checker::start(&c.exchange()).await;
    let coord = c.coordinator_with("coord", &["--leader-ttl", "2s"]);
    let w1 = c.worker("w1", &[]);
    let keys = ["inspections.all"];
    // Mid-walk: update records the bulk walk has passed (and some it has not), insert new ones.
    assert!(checker.wait_for(1500, Duration::from_secs(60)).await);
    c.admin("/_admin/update?n=40", None).await;
    c.admin("/_admin/insert?n=10", None).await;
    let t0 = the_job(&c)
        .await
        .t0
        .expect("T0 recorded before the bulk walk");
    // Both roles die mid-walk and come back: T0 survives, the walk resumes.
    c.procs[w1].kill9();
    c.procs[coord].kill9();
    c.coordinator_with("coord2", &["--leader-ttl", "2s"]);
    c.worker("w2", &[]);
    let truth = c.truth().await;
    // Current versions: a record updated ahead of the walk never showed its old one.
    assert_all_arrive(
        &c,
        &checker,
        &keys,
        &truth.records,
        Duration::from_secs(120),
        "the bulk walk and the first incremental sync",
    )
    .await;
    let cp = the_job(&c).await;
    assert_eq!(cp.stage, Stage::Incremental, "{cp:?}");
    assert_eq!(
        cp.t0.as_deref(),
        Some(t0.as_str()),
        "T0 changed across the restart"
    );
    // Changes during the walk have versions after T0: only the incremental sync could deliver those the walk had passed.
    let after_t0 = truth
        .records
        .iter()
        .filter(|r| r.updated_at.as_str() >= t0.as_str())
        .count();
    assert!(after_t0 >= 50, "T0 {t0}: {after_t0} changed after it");

    // Two more incremental syncs, each with more changes than one page holds.
    for round in 0..2 {
        // A page walk filtered by updatedSince ends without a page number and
        // restarts from the high-water mark minus lag, never at page N.
        assert!(
            eventually(Duration::from_secs(30), async || {
                let cp = the_job(&c).await;
                cp.phase == Phase::Idle && cp.cursor.is_none() && cp.start_from.is_some()
            })
            .await,
            "round {round}: the incremental sync did not end at the high-water mark: {:?}",
            the_job(&c).await
        );
        c.admin("/_admin/update?n=35", None).await;
        c.admin("/_admin/insert?n=15", None).await;
        let want = c.truth().await.records;
        assert_all_arrive(
            &c,
            &checker,
            &keys,
            &want,
            Duration::from_secs(60),
            &format!("incremental sync {}", round + 2),
        )
        .await;
    }
    let cp = the_job(&c).await;
    assert_eq!(cp.t0.as_deref(), Some(t0.as_str()));
    assert!(cp.last_error.is_none(), "{cp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_cursor_restarts_from_the_high_water_mark_without_gaps() {
    let yaml = tickets("tickets", "every: 1h");
    let mut c = Cluster::start(&yaml, &["--records", "6000", "--latency-ms", "20"]);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator("coord");
    c.worker("w1", &[]);
    assert!(checker.wait_for(1500, Duration::from_secs(60)).await);
    // Every cursor is now refused as expired (400 cursor_expired) for a while.
    c.admin(
        "/_admin/faults",
        Some(serde_json::json!({ "cursor_ttl_secs": 0 })),
    )
    .await;
    let recovered = eventually(Duration::from_secs(30), async || {
        c.jobs().await.iter().any(|(_, cp)| cp.recoveries >= 1)
    })
    .await;
    c.admin("/_admin/faults", Some(serde_json::json!({}))).await;
    assert!(recovered, "no recovery recorded{}", c.logs());
    let truth = c.truth().await;
    assert_all_arrive(
        &c,
        &checker,
        &["tickets.all"],
        &truth.records,
        Duration::from_secs(120),
        "after recovery",
    )
    .await;
    let (_, cp) = c.jobs().await.pop().expect("job");
    assert!(cp.last_error.is_none(), "{cp:?}");
    // Re-sent records carry the same message ids as the first time.
    let arrived = checker.arrived();
    let ids: HashSet<&str> = arrived.iter().map(|a| a.message_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        truth.records.len(),
        "one message id per record version"
    );
}

/// Three styles with two partitions each, polled every 2 s; their routing keys.
fn partitioned_feeds() -> String {
    [
        tickets("tickets", "every: 2s\n    partitions: { param: account, values: [\"a\", \"b\"] }"),
        feed("events", "/v1/events", "pagination: { preset: self_next, page_size: 100 }\n    every: 2s\n    partitions: { param: account, values: [\"a\", \"b\"] }"),
        feed("items", "/items", "pagination: { preset: cursor, page_size: 100 }\n    every: 2s\n    partitions: { param: account, values: [\"a\", \"b\"] }"),
    ]
    .concat()
}
const PARTITIONED_KEYS: [&str; 6] = [
    "tickets.a",
    "tickets.b",
    "events.a",
    "events.b",
    "items.a",
    "items.b",
];

/// Insert records (only a leader starts the polls that find them), then
/// wait until every partition has every record; print what arrived.
async fn insert_and_assert_all_arrive(c: &Cluster, checker: &Checker, what: &str) {
    c.admin("/_admin/insert?n=20", None).await;
    let truth = c.truth().await;
    assert_all_arrive(
        c,
        checker,
        &PARTITIONED_KEYS,
        &truth.records,
        Duration::from_secs(180),
        what,
    )
    .await;
    eprintln!(
        "{what}: {} records arrived for {} distinct, {} duplicate messages",
        checker.count(),
        PARTITIONED_KEYS.len() * truth.records.len(),
        checker.duplicate_messages()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_and_a_killed_leader_lose_nothing() {
    let yaml = partitioned_feeds();
    let mut c = Cluster::start(&yaml, &["--records", "6000", "--latency-ms", "15"]);
    c.env.push(("TIDEMARK_LEASE".into(), "4s".into()));
    c.env.push(("TIDEMARK_QUEUE_LEASE".into(), "8s".into()));
    let checker = Checker::start(&c.exchange()).await;
    let a = c.coordinator_with("coord-a", &["--leader-ttl", "3s"]);
    assert!(
        eventually(Duration::from_secs(20), async || c
            .leader()
            .await
            .as_deref()
            == Some("coord-a"))
        .await
    );
    let _b = c.coordinator_with("coord-b", &["--leader-ttl", "3s"]);
    let w1 = c.worker("w1", &[]);
    c.worker("w2", &[]);

    assert!(checker.wait_for(8000, Duration::from_secs(60)).await);
    c.procs[w1].kill9();
    c.worker("w3", &[]);
    assert!(checker.wait_for(20000, Duration::from_secs(60)).await);
    c.procs[a].kill9();
    let took_over = eventually(Duration::from_secs(30), async || {
        c.leader().await.as_deref() == Some("coord-b")
    })
    .await;
    assert!(took_over, "the standby did not take over{}", c.logs());
    // Only a leader starts the next polls: records inserted now must still arrive.
    insert_and_assert_all_arrive(&c, &checker, "after the kills").await;
}

/// What `kubectl rollout restart` does to the Deployments: a new worker
/// comes up, then an old one gets SIGTERM, one at a time; the leading
/// coordinator gets SIGTERM and the standby takes over. The first worker's
/// grace is shorter than the API's slow pages, so it hands pages back
/// unfinished; the second's is long enough to finish them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_workers_and_coordinators_loses_nothing() {
    let yaml = partitioned_feeds();
    let mut c = Cluster::start(
        &yaml,
        &[
            "--records",
            "5000",
            "--latency-ms",
            "20",
            "--slow-every",
            "2",
            "--slow-ms",
            "1500",
        ],
    );
    let checker = Checker::start(&c.exchange()).await;
    let old_a = c.coordinator("coord-old");
    assert!(
        eventually(Duration::from_secs(20), async || c
            .leader()
            .await
            .as_deref()
            == Some("coord-old"))
        .await
    );
    c.coordinator("coord-standby");
    let old1 = c.worker("old-1", &["--grace", "200ms"]);
    let old2 = c.worker("old-2", &["--grace", "10s"]);
    assert!(
        checker.wait_for(3000, Duration::from_secs(60)).await,
        "{}",
        c.logs()
    );

    for (old, new) in [(old1, "new-1"), (old2, "new-2")] {
        c.worker(new, &[]);
        let status = c.procs[old].term(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} on SIGTERM: {status:?}{}",
            c.procs[old].name,
            c.logs()
        );
    }
    // The leader resigns on SIGTERM: the standby leads well before the
    // old leadership's TTL would have run out.
    let status = c.procs[old_a].term(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "leader on SIGTERM: {status:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), async || c.leader().await.as_deref()
            == Some("coord-standby"))
        .await,
        "the standby did not take over at once{}",
        c.logs()
    );
    c.coordinator("coord-new");
    insert_and_assert_all_arrive(&c, &checker, "after the rolling restart").await;
    let failed: Vec<_> = c
        .jobs()
        .await
        .into_iter()
        .filter(|(_, cp)| cp.phase == Phase::Failed)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let handed_back = std::fs::read_to_string(&c.procs[old1].log)
        .unwrap_or_default()
        .contains("grace period over");
    eprintln!("rolling restart: the short-grace worker handed pages back: {handed_back}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_feed_whose_api_keeps_failing_ends_failed_while_others_flow() {
    let yaml = [
        feed(
            "broken",
            "/broken/records",
            "pagination: { preset: cursor, page_size: 100 }",
        ),
        tickets("tickets", "every: 1h"),
    ]
    .concat();
    let mut c = Cluster::start(&yaml, &["--records", "3000"]);
    let checker = Checker::start(&c.exchange()).await;
    // `tidemark tail`, the subscriber a user starts to watch records arrive.
    let mut tail = std::process::Command::new(tidemark_tests::tidemark_bin())
        .args(["tail", "--feed", "tickets", "--limit", "5", "--dedupe"])
        .env("AMQP_URL", tidemark_tests::amqp_url())
        .env("TIDEMARK_RECORDS_EXCHANGE", c.exchange())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tail");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(tail.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("bound"), "{line}");
    }
    c.set_retry("{ max_attempts: 3, base_delay: 100ms }");
    c.coordinator("coord");
    c.worker("w1", &[]);
    let tailed = tokio::task::spawn_blocking(move || tail.wait_with_output().expect("tail output"))
        .await
        .unwrap();
    assert!(tailed.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(tailed.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect();
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|r| r["id"].is_string()));
    let failed = eventually(Duration::from_secs(60), async || {
        c.jobs()
            .await
            .iter()
            .any(|(j, cp)| j.feed == "broken" && cp.phase == Phase::Failed)
    })
    .await;
    assert!(failed, "the broken feed did not fail{}", c.logs());

    let jobs = c.jobs().await;
    let (_, broken) = jobs.iter().find(|(j, _)| j.feed == "broken").unwrap();
    let err = broken.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("HTTP 500") && err.contains("3 attempts"),
        "{err}"
    );
    // The job is marked failed first, then its task is dead-lettered.
    let dead = eventually(Duration::from_secs(10), async || {
        c.dead_letters().await == 1
    })
    .await;
    assert!(dead, "the task is dead-lettered{}", c.logs());
    assert_eq!(c.dead_letters().await, 1, "one dead letter");
    let truth = c.truth().await;
    assert_all_arrive(
        &c,
        &checker,
        &["tickets.all"],
        &truth.records,
        Duration::from_secs(60),
        "the healthy feed",
    )
    .await;
    // A failed job stays failed: no new chain is started for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let jobs = c.jobs().await;
    let (_, still) = jobs.iter().find(|(j, _)| j.feed == "broken").unwrap();
    assert_eq!((still.phase, still.epoch), (Phase::Failed, broken.epoch));
}
