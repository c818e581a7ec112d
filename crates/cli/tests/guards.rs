//! What `tidemark pull` and `tidemark validate` refuse: loops, other origins,
//! unset secrets, bad config; with the exit codes the README promises.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::routing::get;
use common::*;
use tidemark_mock::Faults;

/// A tiny API that answers every request with `body`, counting requests.
async fn fixed_api(body: String) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(get(move || {
        h.fetch_add(1, Ordering::SeqCst);
        let body = body.clone();
        async move { ([("content-type", "application/json")], body) }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

fn one_feed(base: &str, pagination: &str, records: &str, auth: &str) -> String {
    format!(
        "sources:\n  api:\n    base_url: {base}\n{auth}feeds:\n  - name: f\n    source: api\n    path: /x\n    records: {records}\n    pagination: {pagination}\n    key: /id\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cursor_loop_is_an_error_not_a_spin() {
    let (url, hits) = fixed_api(
        r#"{"data":[{"id":"a"}],"meta":{"hasMore":true,"nextStartAfter":"same"}}"#.into(),
    )
    .await;
    let config = write_config(&one_feed(&url, "{ preset: start_after }", "/data", ""));
    let run = pull(&config, "f", &[]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("pagination loop"), "{}", run.stderr);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "the loop must be caught on the first repeat"
    );
    assert_eq!(run.ids().len(), 1, "the looping page is not printed again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_next_url_on_another_origin_is_refused_and_never_requested() {
    let other = mock(10, Faults::default()).await;
    let body = format!(
        r#"{{"data":[{{"id":"a"}}],"links":{{"next":"{}/jsonapi/records?limit=5"}}}}"#,
        other.base_url()
    );
    let (url, _) = fixed_api(body).await;
    let auth = "    auth: { bearer: \"${TIDEMARK_TEST_TOKEN}\" }\n";
    let config = write_config(&one_feed(&url, "{ preset: next_url }", "/data", auth));
    let run = tidemark(
        &[
            "pull",
            "--no-progress",
            "--config",
            config.path.to_str().unwrap(),
            "--feed",
            "f",
        ],
        &[("TIDEMARK_TEST_TOKEN", "canary-secret-value")],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("another origin"), "{}", run.stderr);
    assert!(!run.stderr.contains("canary-secret-value"));
    assert_eq!(
        data_requests(&other.base_url()).await,
        0,
        "the other origin received a request"
    );
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unset_secret_names_the_variable_and_sends_nothing() {
    let server = mock(10, Faults::default()).await;
    let auth = "    auth: { bearer: \"${TIDEMARK_TEST_UNSET_TOKEN}\" }\n";
    let config = write_config(
        &one_feed(&server.base_url(), "{ preset: self_next }", "/Data", auth)
            .replace("/x", "/v1/events"),
    );
    let run = pull(&config, "f", &[]).await;
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("TIDEMARK_TEST_UNSET_TOKEN"),
        "{}",
        run.stderr
    );
    assert_eq!(data_requests(&server.base_url()).await, 0);
    let v = tidemark(
        &["validate", "--config", config.path.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert!(
        v.stdout
            .contains("warning: ${TIDEMARK_TEST_UNSET_TOKEN} is not set"),
        "{}",
        v.stdout
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_exit_codes_and_error_format() {
    let good = write_config(&example_config("http://127.0.0.1:8080", 100));
    let run = tidemark(&["validate", "--config", good.path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("ok: 1 source(s), 9 feed(s), 9 job(s)"),
        "{}",
        run.stdout
    );

    let bad = write_config(
        &example_config("http://127.0.0.1:8080", 100)
            .replace("preset: self_next", "preset: self_nxt"),
    );
    let run = tidemark(&["validate", "--config", bad.path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 2);
    let want = format!("error: {}:35:", bad.path.display());
    assert!(run.stderr.starts_with(&want), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("feeds[2].pagination.preset: unknown preset \"self_nxt\""),
        "{}",
        run.stderr
    );

    let run = tidemark(
        &[
            "pull",
            "--config",
            good.path.to_str().unwrap(),
            "--feed",
            "nope",
        ],
        &[],
    )
    .await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("no feed named \"nope\""),
        "{}",
        run.stderr
    );
    let run = tidemark(&["pull", "--bogus-flag"], &[]).await;
    assert_eq!(run.code, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn endless_empty_pages_with_new_cursors_stop_as_a_loop() {
    // Each empty page claims more and hands out a new cursor: p2, p3, p4, ...
    let server = mock(10, Faults::default()).await;
    let cfg = write_config(&format!(
        "sources:\n  api:\n    base_url: {}\nfeeds:\n  - name: f\n    source: api\n    path: /hostile/empty_forever\n    records: /records\n    pagination: {{ cursor_param: cursor, next_cursor: /next, has_more: /has_more }}\n    key: /id\n",
        server.base_url()
    ));
    let run = pull(&cfg, "f", &[]).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("100 empty pages in a row"),
        "{}",
        run.stderr
    );
    // The good first page was printed; nothing else.
    assert_eq!(run.stdout.lines().count(), 3, "{}", run.stdout);
    server.shutdown().await;
}
