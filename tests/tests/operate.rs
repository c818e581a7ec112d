//! Operating a distributed deployment: `tidemark status | pause | resume |
//! rewind | retry` against Redis while a coordinator and a worker run, the
//! admin API's token check, and the status page in headless Chromium.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tidemark_core::checkpoint::{Checkpoint, JobId};
use tidemark_state::{Acquire, Jobs};
use tidemark_tests::{Checker, Cluster, ctl, eventually};

const FEEDS: &str = r#"  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: { preset: zendesk_cursor, page_size: 20 }
    key: /id
    version: /updated_at
    start: { param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }
    every: 1h
  - name: events
    source: mock
    path: /v1/events
    pagination: { preset: self_next, page_size: 50 }
    key: /id
    version: /updated_at
    every: 1h
  - name: broken
    source: mock
    path: /broken/records
    records: /records
    pagination: { preset: cursor }
    key: /id
"#;

fn status(c: &Cluster) -> HashMap<String, serde_json::Value> {
    let out = ctl(c, &["status", "--json"], 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| (j["feed"].as_str().unwrap().to_string(), j.clone()))
        .collect()
}

/// Tasks a worker dropped or commits it saw fenced: the old epoch's work being refused.
async fn fenced_work(metrics_url: &str) -> u64 {
    let text = reqwest::get(format!("{metrics_url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| {
            l.starts_with(r#"tidemark_commits_total{result="fenced"}"#)
                || l.starts_with(r#"tidemark_tasks_dropped_total{reason="stale_epoch"}"#)
                || l.starts_with(r#"tidemark_tasks_dropped_total{reason="fenced"}"#)
                || l.starts_with(r#"tidemark_tasks_dropped_total{reason="not_running"}"#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_steer_a_distributed_deployment() {
    let tick_ms = 200;
    let mut c = Cluster::start(FEEDS, &["--records", "2000", "--latency-ms", "100"]);
    let checker = Checker::start(&c.exchange()).await;
    c.set_retry("{ max_attempts: 1 }");
    c.coordinator_with("coord", &["--tick", "200ms"]);
    let w = c.worker("w1", &[]);
    let worker_metrics = c.procs[w].addr.clone().expect("worker metrics address");
    assert!(
        eventually(Duration::from_secs(60), async || {
            let st = status(&c);
            st.get("tickets")
                .is_some_and(|j| j["pages"].as_u64() >= Some(3))
                && st.get("broken").is_some_and(|j| j["phase"] == "failed")
        })
        .await,
        "the deployment did not start{}",
        c.logs()
    );

    let table = ctl(&c, &["status"], 0);
    assert!(table.starts_with("FEED"), "{table}");
    for want in ["tickets", "events", "broken", "failed", "HTTP 500"] {
        assert!(table.contains(want), "{want} missing from:\n{table}");
    }
    let only = ctl(&c, &["status", "--feed", "events", "--json"], 0);
    assert!(
        only.contains("\"events\"") && !only.contains("\"tickets\""),
        "{only}"
    );

    // pause: within one tick (plus the page in flight) the API sees no more requests.
    let path = "/api/v2/incremental/tickets/cursor.json";
    let said = ctl(&c, &["pause", "tickets"], 0);
    assert!(said.contains("pause tickets/all: done"), "{said}");
    tokio::time::sleep(Duration::from_millis(tick_ms + 100 + 700)).await;
    let seen = c.requests(path).await;
    let pages = status(&c)["tickets"]["pages"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.requests(path).await, seen, "requests while paused");
    assert_eq!(status(&c)["tickets"]["pages"].as_u64().unwrap(), pages);
    assert_eq!(status(&c)["tickets"]["phase"], "paused");

    // resume: requests and commits start again.
    ctl(&c, &["resume", "tickets"], 0);
    assert!(
        eventually(Duration::from_secs(20), async || {
            status(&c)["tickets"]["pages"].as_u64().unwrap() > pages
        })
        .await,
        "no progress after resume{}",
        c.logs()
    );

    // rewind --start while the chain runs: the old epoch's work is refused,
    // the walk starts over, and every record arrives.
    let before = fenced_work(&worker_metrics).await;
    ctl(&c, &["rewind", "tickets", "--start"], 0);
    assert!(
        eventually(Duration::from_secs(20), async || fenced_work(
            &worker_metrics
        )
        .await
            > before)
        .await,
        "no in-flight task of the old epoch was fenced{}",
        c.logs()
    );
    // (The rewind itself leaves the job idle and due: wait for the records, not the phase.)
    let truth = c.truth().await;
    let tickets = || -> std::collections::HashSet<String> {
        checker
            .arrived()
            .into_iter()
            .filter(|a| a.routing_key == "tickets.all")
            .map(|a| a.id)
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(120), async || tickets().len()
            == truth.records.len())
        .await,
        "the rewound walk did not deliver every ticket ({} of {}){}",
        tickets().len(),
        truth.records.len(),
        c.logs()
    );
    assert!(
        eventually(Duration::from_secs(30), async || {
            let t = &status(&c)["tickets"];
            t["phase"] == "idle" && t["cursor"].is_string()
        })
        .await,
        "the rewound walk did not end{}",
        c.logs()
    );

    // Every committed page observed its latency, from its task's first publish.
    let text = reqwest::get(format!("{worker_metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let observed = text
        .lines()
        .find(|l| l.starts_with(r#"tidemark_page_latency_seconds_count{feed="tickets"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        observed >= 10.0,
        "page latency observations: {observed}\n{text}"
    );

    // rewind --to and --cursor move the stored start point and cursor.
    ctl(&c, &["pause", "events"], 0);
    ctl(&c, &["rewind", "events", "--to", "2024-01-01T00:00:00Z"], 0);
    let ev = &status(&c)["events"];
    assert!(ev["cursor"].is_null(), "{ev}");
    assert_eq!(ev["phase"], "paused", "a rewind keeps a paused job paused");
    ctl(&c, &["rewind", "events", "--cursor", "abc"], 0);
    assert_eq!(status(&c)["events"]["cursor"], "abc");
    let bad = ctl(&c, &["rewind", "events", "--to", "not a time"], 2);
    assert!(bad.contains("not a time"), "{bad}");
    ctl(&c, &["rewind", "events"], 2); // one of --to, --cursor, --start is required

    // retry: the failed job runs again (and fails again: its API is down).
    let failed_epoch = status(&c)["broken"]["epoch"].as_u64().unwrap();
    let hits = c.requests("/broken/records").await;
    let said = ctl(&c, &["retry", "broken"], 0);
    assert!(said.contains("retry broken/all: done"), "{said}");
    assert!(
        eventually(Duration::from_secs(30), async || {
            let b = &status(&c)["broken"];
            b["phase"] == "failed" && b["epoch"].as_u64() > Some(failed_epoch)
        })
        .await,
        "the retried job did not run again{}",
        c.logs()
    );
    assert!(c.requests("/broken/records").await > hits);
    ctl(&c, &["pause", "nope"], 2);

    // A rewind fences the epoch a page is working under: its commit is refused.
    let store = c.store().await;
    let job = JobId::new("manual", "all");
    store.ensure(&job, &Checkpoint::default()).await.unwrap();
    let epoch = match store.acquire(&job, Duration::from_secs(60), false).await {
        Ok(Acquire::Granted { epoch }) => epoch,
        other => panic!("acquire: {other:?}"),
    };
    ctl(&c, &["rewind", "manual", "--cursor", "c2"], 0);
    tidemark_tests::assert_epoch_fenced(&*store, &job, epoch, "c2").await;
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|b| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(b))
                    .find(|p| p.is_file())
            })
        })
}

/// Headless Chromium on `url`, with the flags that keep it off the network.
fn browse(browser: &PathBuf, url: &str, extra: &[&str]) -> std::process::Output {
    let profile = tempfile::tempdir().expect("profile dir");
    std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=8000",
            "--window-size=1280,800",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_and_the_status_page_lists_every_feed() {
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let mut c = Cluster::start(FEEDS, &["--records", "1000"]);
    c.env
        .push(("TIDEMARK_ADMIN_TOKEN".to_string(), token.clone()));
    let _checker = Checker::start(&c.exchange()).await;
    c.set_retry("{ max_attempts: 1 }");
    let coord = c.coordinator("coord");
    c.worker("w1", &[]);
    let admin = c.procs[coord]
        .announced("status page on")
        .expect("the coordinator announces its status page");
    assert!(
        admin.starts_with("http://127.0.0.1:"),
        "bound to loopback: {admin}"
    );
    assert!(
        eventually(Duration::from_secs(60), async || c.jobs().await.len() == 3).await,
        "jobs were not registered{}",
        c.logs()
    );

    // The admin API refuses requests without the token, or with a wrong one.
    let http = reqwest::Client::new();
    let api = format!("{admin}/api/status");
    assert_eq!(http.get(&api).send().await.unwrap().status(), 401);
    let wrong = http
        .get(&api)
        .bearer_auth(format!("{token}x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let pause = http
        .post(format!("{admin}/api/feeds/events/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(pause.status(), 401);
    let ok = http.get(&api).bearer_auth(&token).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let report: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(report["jobs"].as_array().map(Vec::len), Some(3));
    // The same operations as the CLI: pause and resume through the API.
    let paused = http
        .post(format!("{admin}/api/feeds/events/pause"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    let jobs = c.jobs().await;
    let ev = jobs.iter().find(|(j, _)| j.feed == "events").unwrap();
    assert_eq!(ev.1.phase, tidemark_core::checkpoint::Phase::Paused);
    let resumed = http
        .post(format!("{admin}/api/feeds/events/resume"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);

    // The status page, in a real browser.
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("TIDEMARK_SKIP_BROWSER").is_some(),
            "Chromium is needed for the status page test: ./scripts/test installs it \
             (apt-get install chromium); set TIDEMARK_SKIP_BROWSER=1 to skip it"
        );
        eprintln!("status page test skipped: no Chromium and TIDEMARK_SKIP_BROWSER is set");
        return;
    };
    let page = format!("{admin}/#token={token}");
    let dom = browse(&browser, &page, &["--dump-dom"]);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success() && html.contains("<table id=\"jobs\""),
        "chromium failed: {}\n{html}",
        String::from_utf8_lossy(&dom.stderr)
    );
    for feed in ["tickets", "events", "broken"] {
        assert!(
            html.contains(&format!("data-feed=\"{feed}\"")),
            "the status table does not list {feed}:\n{html}"
        );
        assert!(
            html.contains(&format!("class=\"spark\" data-feed=\"{feed}\""))
                || html.contains(&format!("data-feed=\"{feed}\" class=\"spark\"")),
            "no sparkline for {feed}:\n{html}"
        );
    }
    assert!(!html.contains(&token), "the page must not show the token");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = browse(
        &browser,
        &page,
        &[&format!("--screenshot={}", shot.display())],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "no screenshot at {} ({size} bytes): {}",
        shot.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("status page screenshot: {}", shot.display());
}
