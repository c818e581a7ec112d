//! `tidemark pull` against every fault knob of the mock API: retried then
//! complete, or a clear error; never a record printed twice.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use common::*;
use tidemark_mock::Faults;

const N: usize = 60;

/// The example config with quick retries and a short timeout.
fn config_for(base: &str) -> TempConfig {
    let text = example_config(base, 7)
        .replace("timeout: 10s", "timeout: 400ms")
        .replace("base_delay: 50ms", "base_delay: 10ms")
        .replace("max_attempts: 5", "max_attempts: 6");
    write_config(&text)
}

async fn complete_despite(faults: Faults, feed: &str) -> Run {
    let server = mock(N, faults).await;
    let base = server.base_url();
    let run = pull(&config_for(&base), feed, &[]).await;
    assert_eq!(run.code, 0, "{feed}: {}", run.stderr);
    assert_eq!(
        run.ids(),
        truth_ids(&base).await,
        "{feed}: every record exactly once, in order"
    );
    server.shutdown().await;
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limited_429_with_retry_after_is_waited_out() {
    let started = std::time::Instant::now();
    complete_despite(
        Faults {
            fail_429_every: Some(4),
            retry_after_secs: 1,
            ..Faults::default()
        },
        "events",
    )
    .await;
    // 9 pages and their retries: at least two 429s, each waited for a full second.
    assert!(
        started.elapsed().as_secs_f64() >= 2.0,
        "Retry-After was not honoured"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried() {
    for feed in ["tickets", "jsonapi", "paged"] {
        complete_despite(
            Faults {
                fail_500_every: Some(3),
                ..Faults::default()
            },
            feed,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_responses_time_out_and_are_retried() {
    complete_despite(
        Faults {
            slow_every: Some(3),
            slow_ms: 1500,
            ..Faults::default()
        },
        "items",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_bodies_are_retried() {
    for feed in ["github", "inspections"] {
        complete_despite(
            Faults {
                truncate_every: Some(3),
                ..Faults::default()
            },
            feed,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_is_not_json_stops_with_a_clear_error() {
    let server = mock(
        N,
        Faults {
            corrupt_every: Some(3),
            ..Faults::default()
        },
    )
    .await;
    let base = server.base_url();
    let run = pull(&config_for(&base), "events", &[]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("not valid JSON"), "{}", run.stderr);
    assert!(run.stderr.contains("page 3"), "{}", run.stderr);
    assert!(
        run.stderr.contains("retry from: --cursor"),
        "{}",
        run.stderr
    );
    // The two good pages were printed once; the bad page not at all.
    let ids = run.ids();
    assert_eq!(ids, truth_ids(&base).await[..14].to_vec());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_cursor_is_a_clear_error() {
    let server = mock(
        N,
        Faults {
            cursor_ttl_secs: Some(1),
            ..Faults::default()
        },
    )
    .await;
    let base = server.base_url();
    let config = config_for(&base);
    let stats = config.dir.path().join("s.json");
    let first = pull(
        &config,
        "tickets",
        &["--max-pages", "1", "--stats-json", stats.to_str().unwrap()],
    )
    .await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let cursor = summary["resume"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let run = pull(&config, "tickets", &["--cursor", &cursor]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("400") && run.stderr.contains("cursor_expired"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inserts_and_updates_during_the_walk_are_not_lost_nor_repeated() {
    let server = mock(
        N,
        Faults {
            mutate_every: Some(2),
            mutate_count: 2,
            ..Faults::default()
        },
    )
    .await;
    let base = server.base_url();
    let initial = truth_ids(&base).await;
    let run = pull(&config_for(&base), "events", &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let records = run.records();
    assert!(
        repeated_versions(&records).is_empty(),
        "a record version printed twice"
    );
    let printed: std::collections::HashSet<String> = run.ids().into_iter().collect();
    for id in &initial {
        assert!(
            printed.contains(id),
            "record {id} of the initial dataset was never printed"
        );
    }
    assert!(
        records.len() > N,
        "updates during the walk should arrive as new versions"
    );
    server.shutdown().await;
}
