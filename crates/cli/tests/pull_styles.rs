//! `tidemark pull` through every pagination style of the mock API: every
//! record exactly once, in order, for page sizes 1, 7 and 1000, for datasets
//! that are and are not a multiple of the page size, and for an empty one.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use common::*;
use tidemark_mock::Faults;

async fn check_style(feed: &str) {
    for size in [1usize, 7, 1000] {
        for n in [0, 3 * size, 3 * size + 2] {
            let server = mock(n, Faults::default()).await;
            let base = server.base_url();
            let config = write_config(&example_config(&base, size));
            let run = pull(&config, feed, &[]).await;
            assert_eq!(run.code, 0, "{feed} size={size} n={n}: {}", run.stderr);
            let want = truth_ids(&base).await;
            assert_eq!(want.len(), n);
            let got = run.ids();
            assert!(
                got == want,
                "{feed} size={size} n={n}: got {} records, want {}; first difference at {:?}",
                got.len(),
                want.len(),
                got.iter().zip(&want).position(|(a, b)| a != b)
            );
            assert!(
                run.stderr.contains("end of stream"),
                "{feed}: {}",
                run.stderr
            );
            assert!(
                run.stderr.contains(&format!("{n} records")),
                "{feed}: {}",
                run.stderr
            );
            server.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zendesk_cursor() {
    check_style("tickets").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_after() {
    check_style("inspections").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn self_next() {
    check_style("events").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn base64_cursor() {
    check_style("items").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn opaque_cursor_seed_000() {
    check_style("sync").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn next_url() {
    check_style("jsonapi").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn link_header() {
    check_style("github").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn page_numbers() {
    check_style("paged").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets() {
    check_style("offset").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_pages_then_resume_from_the_printed_cursor() {
    for feed in STYLES {
        let server = mock(50, Faults::default()).await;
        let base = server.base_url();
        let config = write_config(&example_config(&base, 7));
        let first = pull(&config, feed, &["--max-pages", "3"]).await;
        assert_eq!(first.code, 0, "{feed}: {}", first.stderr);
        assert_eq!(first.ids().len(), 21, "{feed}");
        assert!(
            first.stderr.contains("stopped at --max-pages"),
            "{}",
            first.stderr
        );
        let stats = config.dir.path().join("s.json");
        let first = pull(
            &config,
            feed,
            &["--max-pages", "3", "--stats-json", stats.to_str().unwrap()],
        )
        .await;
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        let cursor = summary["resume"]
            .as_str()
            .unwrap_or_else(|| panic!("{feed}: no resume cursor in {summary}"));
        let rest = pull(&config, feed, &["--cursor", cursor]).await;
        assert_eq!(rest.code, 0, "{feed}: {}", rest.stderr);
        let mut all = first.ids();
        all.extend(rest.ids());
        assert_eq!(all, truth_ids(&base).await, "{feed}");
        server.shutdown().await;
    }
}
