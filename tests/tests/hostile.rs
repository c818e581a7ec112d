//! Hostile APIs through the real distributed system: bad input from an API
//! ends in a failed job with a clear `last_error` and its cursor where the
//! last good page left it; never a panic, a spin or a silent skip. A
//! healthy feed next to them, on the same worker, delivers everything.
//!
//! Each hostile feed reads the mock's `/hostile/{kind}`: a good first page
//! of three records (`h1`..`h3`) that hands out cursor `p2`, then the bad
//! page of its kind at `p2`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tidemark_core::checkpoint::Phase;
use tidemark_tests::{Checker, Cluster, eventually, versions};

/// What one hostile feed must end with.
struct Expect {
    feed: &'static str,
    kind: &'static str,
    /// Every one of these is in `last_error`.
    error: &'static [&'static str],
    /// The stored cursor, pages and records committed.
    cursor: &'static str,
    pages: u64,
    /// Requests to `/hostile/{kind}`: the good page, then each bad page once.
    requests: u64,
}

const EXPECT: &[Expect] = &[
    Expect {
        feed: "h_loop",
        kind: "loop",
        error: &["pagination loop", "\"p2\"", "claims more pages"],
        cursor: "p2",
        pages: 1,
        requests: 2,
    },
    Expect {
        feed: "h_huge",
        kind: "huge",
        // The source's default max_body_bytes (64 MiB): the 100 MiB body is cut off there.
        error: &["exceeds the limit of 67108864 bytes", "max_body_bytes"],
        cursor: "p2",
        pages: 1,
        requests: 2,
    },
    Expect {
        feed: "h_utf8",
        kind: "utf8",
        error: &["response is not valid JSON", "invalid unicode code point"],
        cursor: "p2",
        pages: 1,
        requests: 2,
    },
    Expect {
        feed: "h_deep",
        kind: "deep",
        error: &["nested deeper than 128 levels"],
        cursor: "p2",
        pages: 1,
        requests: 2,
    },
    Expect {
        feed: "h_long_cursor",
        kind: "long_cursor",
        error: &[
            "next cursor is 20000 bytes",
            "limit of 8192",
            "max_cursor_bytes",
        ],
        cursor: "p2",
        pages: 1,
        requests: 2,
    },
    Expect {
        feed: "h_types",
        kind: "types",
        error: &["records at /records is an object, expected an array"],
        cursor: "p2",
        pages: 1,
        requests: 2,
    },
    // A cursor walk follows an empty page that claims more when it hands
    // out a new cursor (APIs do this when a page's records were all filtered
    // out; only a page-number walk treats it as an error, see README
    // "Pagination"). So the empty page at p2 is committed (cursor p3); the
    // mock's p3 is the same empty page claiming more with cursor p3 again,
    // which is a loop: the job fails there, without spinning.
    Expect {
        feed: "h_empty_more",
        kind: "empty_more",
        error: &["pagination loop", "\"p3\"", "claims more pages"],
        cursor: "p3",
        pages: 2,
        requests: 3,
    },
];

fn feeds_yaml() -> String {
    let mut yaml = String::new();
    for e in EXPECT {
        yaml.push_str(&format!(
            "  - name: {}\n    source: mock\n    path: /hostile/{}\n    records: /records\n    \
             pagination: {{ cursor_param: cursor, next_cursor: /next, has_more: /has_more }}\n    \
             key: /id\n    version: /updated_at\n    every: 1h\n",
            e.feed, e.kind
        ));
    }
    yaml.push_str(
        "  - name: items\n    source: mock\n    path: /items\n    \
         pagination: { preset: cursor, page_size: 100 }\n    key: /id\n    version: /updated_at\n    every: 1h\n",
    );
    yaml
}

/// Every process log in full (the mock's too), for panics.
fn full_logs(c: &Cluster) -> Vec<(String, String)> {
    std::iter::once(&c.mock)
        .chain(c.procs.iter())
        .map(|p| {
            (
                p.name.clone(),
                std::fs::read_to_string(&p.log).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_pages_fail_their_job_with_a_clear_error_and_keep_the_cursor() {
    let mut c = Cluster::start(&feeds_yaml(), &["--records", "500"]);
    let checker = Checker::start(&c.exchange()).await;
    c.set_retry("{ max_attempts: 2, base_delay: 100ms }");
    c.coordinator("coord");
    let w = c.worker("w1", &[]);
    let started = Instant::now();

    // Every hostile job fails, and the healthy feed delivers everything.
    let hostile: BTreeSet<&str> = EXPECT.iter().map(|e| e.feed).collect();
    let all_failed = eventually(Duration::from_secs(60), async || {
        let jobs = c.jobs().await;
        hostile.iter().all(|f| {
            jobs.iter()
                .any(|(j, cp)| j.feed == *f && cp.phase == Phase::Failed)
        })
    })
    .await;
    let failed_after = started.elapsed();
    let jobs = c.jobs().await;
    assert!(
        all_failed,
        "not every hostile job failed within 60 s: {:#?}{}",
        jobs.iter()
            .map(|(j, cp)| (j.feed.clone(), cp.phase, cp.last_error.clone()))
            .collect::<Vec<_>>(),
        c.logs()
    );
    eprintln!("every hostile job failed after {failed_after:?}");

    let truth = c.truth().await;
    let healthy = checker
        .wait_for(
            EXPECT.len() * 3 + truth.records.len(),
            Duration::from_secs(60),
        )
        .await;
    // A moment more, so that a late duplicate or a record of a bad page would be seen.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        healthy,
        "only {} records arrived{}",
        checker.count(),
        c.logs()
    );

    // The checkpoint of each hostile job: failed, a clear error, the good
    // page committed and the bad one not.
    for e in EXPECT {
        let (_, cp) = jobs
            .iter()
            .find(|(j, _)| j.feed == e.feed)
            .unwrap_or_else(|| panic!("no job for {}", e.feed));
        let err = cp.last_error.as_deref().unwrap_or_default();
        eprintln!("{}: {err}", e.feed);
        assert_eq!(cp.phase, Phase::Failed, "{}: {cp:?}", e.feed);
        for want in e.error {
            assert!(err.contains(want), "{}: {want:?} not in {err:?}", e.feed);
        }
        assert!(
            !err.contains("cursor=p"),
            "{}: the query string is redacted: {err}",
            e.feed
        );
        assert_eq!(cp.cursor.as_deref(), Some(e.cursor), "{}: {cp:?}", e.feed);
        assert_eq!(
            (cp.pages, cp.records),
            (e.pages, 3),
            "{}: pages and records committed: {cp:?}",
            e.feed
        );
        // The newest good record (h3), as the store normalizes times.
        assert!(
            cp.high_water
                .as_deref()
                .is_some_and(|h| h.starts_with("2024-01-01T00:00:02")),
            "{}: {cp:?}",
            e.feed
        );
        // A bad page is read once: never retried (it cannot get better), never spun on.
        let path = format!("/hostile/{}", e.kind);
        assert_eq!(c.requests(&path).await, e.requests, "requests to {path}");
    }
    assert_eq!(
        c.dead_letters().await,
        EXPECT.len() as u32,
        "one dead-lettered task per failed job"
    );

    // Downstream: the three good records of each hostile feed, exactly once,
    // and nothing of any bad page.
    let parts = checker.by_partition();
    for e in EXPECT {
        let key = format!("{}.all", e.feed);
        let ids: Vec<&str> = parts
            .get(&key)
            .map(|a| a.iter().map(|a| a.id.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(ids, ["h1", "h2", "h3"], "{key}");
    }
    // The healthy feed on the same worker: every record of the mock.
    let items = parts.get("items.all").cloned().unwrap_or_default();
    assert_eq!(items.len(), truth.records.len(), "items.all");
    assert_eq!(
        versions(&items),
        truth.records.iter().cloned().collect(),
        "items.all"
    );
    assert_eq!(checker.duplicate_messages(), 0);
    let routed: BTreeSet<&str> = parts.keys().map(String::as_str).collect();
    let mut want: BTreeSet<String> = EXPECT.iter().map(|e| format!("{}.all", e.feed)).collect();
    want.insert("items.all".into());
    assert_eq!(routed, want.iter().map(String::as_str).collect());

    // No process panicked, and the worker is alive and healthy.
    for (name, log) in full_logs(&c) {
        assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
    }
    assert!(
        c.procs[w].wait(Duration::from_millis(200)).is_none(),
        "the worker exited{}",
        c.logs()
    );
    let metrics = c.procs[w].addr.clone().expect("worker metrics address");
    let health = reqwest::get(format!("{metrics}/healthz")).await.unwrap();
    assert!(health.status().is_success(), "{}", health.status());

    // A failed job stays failed: no new chain reads its API again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for e in EXPECT {
        let path = format!("/hostile/{}", e.kind);
        assert_eq!(c.requests(&path).await, e.requests, "{path} after failing");
    }
    let again = c.jobs().await;
    for e in EXPECT {
        let (_, before) = jobs.iter().find(|(j, _)| j.feed == e.feed).unwrap();
        let (_, now) = again.iter().find(|(j, _)| j.feed == e.feed).unwrap();
        assert_eq!(
            (now.phase, now.epoch, now.cursor.as_deref()),
            (Phase::Failed, before.epoch, Some(e.cursor)),
            "{}",
            e.feed
        );
    }
    eprintln!("hostile suite took {:?}", started.elapsed());
}

/// Page tasks that are not ours: a body that is not JSON, JSON of the wrong
/// shape, a task for a job that does not exist. Each goes to the
/// dead-letter queue with its reason; the worker keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_page_tasks_are_dead_lettered_with_their_reason() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let mut c = Cluster::start(
        "  - name: items\n    source: mock\n    path: /items\n    pagination: { preset: cursor, page_size: 100 }\n    key: /id\n    version: /updated_at\n    every: 1h\n",
        &["--records", "300"],
    );
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator("coord");
    let w = c.worker("w1", &[]);
    assert!(
        checker.wait_for(300, Duration::from_secs(60)).await,
        "{}",
        c.logs()
    );

    let conn = Connection::connect(&tidemark_tests::amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let tasks = format!("{}.tasks", c.prefix);
    let bodies: [&[u8]; 4] = [
        b"not json at all",
        br#"{"job": 5, "epoch": "one", "seq": -1}"#,
        br#"{"job": {"feed": "ghost", "partition": "all"}, "epoch": 1, "seq": 0}"#,
        b"\xff\xfe\x00 binary",
    ];
    for body in bodies {
        ch.basic_publish(
            "".into(),
            tasks.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(30), async || c.dead_letters().await
            >= 4)
        .await,
        "dead letters: {}{}",
        c.dead_letters().await,
        c.logs()
    );
    let dead = format!("{}.dead", c.prefix);
    let mut reasons = Vec::new();
    while let Some(m) = ch
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let header = |name: &str| {
            m.delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
                .map(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default()
        };
        reasons.push((header("x-reason"), header("x-last-error")));
    }
    reasons.sort();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    let count = |r: &str| reasons.iter().filter(|(x, _)| x == r).count();
    assert_eq!(
        (count("malformed"), count("unknown_job")),
        (3, 1),
        "{reasons:?}"
    );
    for (reason, error) in &reasons {
        match reason.as_str() {
            "malformed" => assert!(error.contains("malformed page task"), "{error}"),
            _ => assert!(
                error.contains("ghost") && error.contains("no job"),
                "{error}"
            ),
        }
    }
    // The worker is still running, and never panicked.
    assert!(
        c.procs[w].wait(Duration::from_millis(300)).is_none(),
        "the worker exited"
    );
    let log = std::fs::read_to_string(&c.procs[w].log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    let _ = conn.close(200, "bye".into()).await;
}

/// One feed of 300 records behind an API whose first answer is
/// `429 Retry-After: 99999999999` (about 3,000 years), with the source's
/// `retry.max_retry_after` at 2 s: the pause it sets is capped.
fn absurd_retry_after() -> Cluster {
    let c = Cluster::start(
        "  - name: items\n    source: mock\n    path: /items\n    \
         pagination: { preset: cursor, page_size: 100 }\n    key: /id\n    version: /updated_at\n    every: 1h\n",
        &[
            "--records",
            "300",
            "--fail-429-first",
            "1",
            "--retry-after-secs",
            "99999999999",
        ],
    );
    c.set_retry("{ max_retry_after: 2s }");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_three_thousand_years_waits_max_retry_after_distributed() {
    let mut c = absurd_retry_after();
    let checker = Checker::start(&c.exchange()).await;
    let started = Instant::now();
    c.coordinator("coord");
    c.worker("w1", &[]);
    assert!(
        checker.wait_for(300, Duration::from_secs(30)).await,
        "not every record arrived: {}",
        c.logs()
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_three_thousand_years_waits_max_retry_after_embedded() {
    let c = absurd_retry_after();
    let config = c.config.display().to_string();
    let state = c.dir.path().join("state").display().to_string();
    let started = Instant::now();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        tidemark_tests::tidemark(
            &[
                "run",
                "--once",
                "--config",
                &config,
                "--state-dir",
                &state,
                "--out",
                "-",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 300, "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
}
