//! Embedded mode end to end: `tidemark run` and `tidemark demo` as real
//! processes, SIGKILLed and restarted, and steered by `tidemark status |
//! pause | resume | rewind | retry --state-dir` while running and stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tidemark_core::checkpoint::{JobId, Phase};
use tidemark_state::{Acquire, EmbeddedStore, Jobs, Leases};
use tidemark_tests::{Cluster, eventually, spawn, tidemark};

/// Lines of a JSON Lines file (0 when it does not exist yet).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Record ids of a JSON Lines file; every line must be whole JSON.
fn ids(path: &Path) -> Vec<String> {
    lines(path)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{}:{}: not a whole JSON record ({e}): {l:.80}",
                    path.display(),
                    i + 1
                )
            });
            v["id"].as_str().expect("record id").to_string()
        })
        .collect()
}

async fn job_state(state_dir: &Path, feed: &str) -> tidemark_core::checkpoint::Checkpoint {
    let store = EmbeddedStore::open(&state_dir.join("state.json")).expect("state file");
    store
        .get(&JobId::new(feed, "all"))
        .await
        .expect("read")
        .unwrap_or_default()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

const BIG_FEEDS: &str = r#"  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: { preset: zendesk_cursor, page_size: 1000 }
    key: /id
    version: /updated_at
    start: { param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }
  - name: events
    source: mock
    path: /v1/events
    pagination: { preset: self_next, page_size: 500 }
    key: /id
    version: /updated_at
"#;

/// Page numbers and offsets: their checkpoint's cursor is the page or offset.
const PAGE_FEEDS: &str = r#"  - name: paged
    source: mock
    path: /paged/records
    records: /records
    pagination: { page_param: page, page_size_param: per_page, page_size: 1000, total_pages: /total_pages }
    key: /id
  - name: offset
    source: mock
    path: /offset/records
    records: /records
    pagination: { offset_param: offset, page_size_param: limit, page_size: 1000, total_count: /total }
    key: /id
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_run_resumes_and_loses_nothing() {
    let feeds = format!("{BIG_FEEDS}{PAGE_FEEDS}");
    let c = Cluster::start(&feeds, &["--records", "100000", "--latency-ms", "40"]);
    let state = c.dir.path().join("state");
    let out = c.dir.path().join("out");
    let args = [
        "run",
        "--config",
        &s(&c.config),
        "--state-dir",
        &s(&state),
        "--out",
        &s(&out),
        "--once",
    ];
    let mut first = spawn("run1", &args, &[], c.dir.path(), "tidemark run:");
    let tickets = out.join("tickets.jsonl");
    let events = out.join("events.jsonl");
    assert!(
        eventually(Duration::from_secs(90), async || lines(&tickets).len()
            >= 20_000)
        .await,
        "the first run did not get going: {}",
        first.log_tail(30)
    );
    first.kill9();
    let at_kill = job_state(&state, "tickets").await;
    let paged_at_kill = job_state(&state, "paged").await;
    assert!(
        paged_at_kill.records < 100_000 && paged_at_kill.cursor.is_some(),
        "the paged job was not mid-walk at the kill: {paged_at_kill:?}"
    );
    assert!(
        at_kill.records < 100_000,
        "the kill came after the sync finished; nothing was tested"
    );
    assert!(at_kill.records > 0, "nothing was committed before the kill");

    let mut second = spawn("run2", &args, &[], c.dir.path(), "tidemark run:");
    let status = second.wait(Duration::from_secs(240));
    assert!(
        status.is_some_and(|s| s.success()),
        "the second run did not finish cleanly ({status:?}): {}",
        second.log_tail(40)
    );

    let truth: HashSet<String> = c.truth().await.records.into_iter().map(|r| r.id).collect();
    assert_eq!(truth.len(), 100_000);
    let paged = out.join("paged.jsonl");
    let offset = out.join("offset.jsonl");
    for (file, page) in [
        (&tickets, 1000),
        (&events, 500),
        (&paged, 1000),
        (&offset, 1000),
    ] {
        let got = ids(file);
        let distinct: HashSet<String> = got.iter().cloned().collect();
        let missing = truth.difference(&distinct).count();
        assert_eq!(missing, 0, "{}: {missing} records lost", file.display());
        assert_eq!(
            distinct.len(),
            truth.len(),
            "{}: unknown records",
            file.display()
        );
        // Only the page in flight at the kill may have been written twice.
        let dups = got.len() - distinct.len();
        assert!(
            dups <= page,
            "{}: {dups} duplicates, more than one page ({page})",
            file.display()
        );
    }
    let done = job_state(&state, "tickets").await;
    assert_eq!(done.phase, Phase::Idle);
    assert!(done.seq > at_kill.seq);
}

const STEERED_FEEDS: &str = r#"  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: { preset: zendesk_cursor, page_size: 20 }
    key: /id
    version: /updated_at
    start: { param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }
  - name: broken
    source: mock
    path: /broken/records
    records: /records
    pagination: { preset: cursor }
    key: /id
"#;

/// Run `tidemark <args> --state-dir D`; panics unless it exits with `code`.
fn ctl(state: &Path, args: &[&str], code: i32) -> String {
    let mut all: Vec<&str> = args.to_vec();
    let dir = s(state);
    all.extend(["--state-dir", &dir]);
    let (got, out, err) = tidemark(&all, &[]);
    assert_eq!(got, code, "tidemark {all:?}: exit {got}\n{out}\n{err}");
    out + &err
}

fn status_json(state: &Path) -> HashMap<String, serde_json::Value> {
    let st = try_status_json(state);
    assert!(!st.is_empty(), "tidemark status --json found no jobs");
    st
}

/// The status, or nothing while the run has not written its state yet.
fn try_status_json(state: &Path) -> HashMap<String, serde_json::Value> {
    let (code, out, _) = tidemark(&["status", "--json", "--state-dir", &s(state)], &[]);
    if code != 0 {
        return HashMap::new();
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    v["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| (j["feed"].as_str().expect("feed").to_string(), j.clone()))
        .collect()
}

fn pages(state: &Path, feed: &str) -> u64 {
    status_json(state)[feed]["pages"].as_u64().expect("pages")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_steer_an_embedded_run_while_it_runs_and_after_it_stopped() {
    let c = Cluster::start(STEERED_FEEDS, &["--records", "3000", "--latency-ms", "100"]);
    c.set_retry("{ max_attempts: 1 }");
    let state = c.dir.path().join("state");
    let out = c.dir.path().join("out");
    let tick = "200ms";
    let args = [
        "run",
        "--config",
        &s(&c.config),
        "--state-dir",
        &s(&state),
        "--out",
        &s(&out),
        "--tick",
        tick,
    ];
    let mut run = spawn("run", &args, &[], c.dir.path(), "tidemark run:");
    assert!(
        eventually(Duration::from_secs(60), async || {
            let st = try_status_json(&state);
            st.get("tickets")
                .is_some_and(|j| j["pages"].as_u64() >= Some(3))
                && st.get("broken").is_some_and(|j| j["phase"] == "failed")
        })
        .await,
        "the run did not start: {}",
        run.log_tail(30)
    );

    // status: a table with every feed, the failure visible.
    let table = ctl(&state, &["status"], 0);
    assert!(table.starts_with("FEED"), "{table}");
    assert!(
        table.contains("tickets") && table.contains("running"),
        "{table}"
    );
    assert!(
        table.contains("broken") && table.contains("failed"),
        "{table}"
    );
    assert!(table.contains("500"), "the last error is shown: {table}");

    // pause: no page is fetched after one tick (plus the page in flight).
    let said = ctl(&state, &["pause", "tickets"], 0);
    assert!(said.contains("pause tickets/all: done"), "{said}");
    tokio::time::sleep(Duration::from_millis(200 + 100 + 700)).await;
    let paused_at = pages(&state, "tickets");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pages(&state, "tickets"),
        paused_at,
        "pages committed while paused"
    );
    assert_eq!(status_json(&state)["tickets"]["phase"], "paused");
    let again = ctl(&state, &["pause", "tickets"], 0);
    assert!(again.contains("skipped (already paused)"), "{again}");

    // resume: the chain goes on.
    ctl(&state, &["resume", "tickets"], 0);
    assert!(
        eventually(Duration::from_secs(20), async || pages(&state, "tickets")
            > paused_at)
        .await,
        "no progress after resume"
    );

    // rewind to a time while it runs: new epoch, new start point.
    let before = status_json(&state)["tickets"]["epoch"].as_u64().unwrap();
    ctl(&state, &["rewind", "tickets", "--to", "2024-01-01"], 0);
    let after = status_json(&state)["tickets"]["epoch"].as_u64().unwrap();
    assert!(after > before, "rewind takes a new epoch");

    // retry: the failed job runs again (and fails again: its API is broken).
    let failed_epoch = status_json(&state)["broken"]["epoch"].as_u64().unwrap();
    let said = ctl(&state, &["retry", "broken"], 0);
    assert!(said.contains("retry broken/all: done"), "{said}");
    assert!(
        eventually(Duration::from_secs(30), async || {
            let b = &status_json(&state)["broken"];
            b["phase"] == "failed" && b["epoch"].as_u64() > Some(failed_epoch)
        })
        .await,
        "the retried job did not run again"
    );
    let nothing = ctl(&state, &["retry", "tickets"], 0);
    assert!(nothing.contains("skipped (not failed)"), "{nothing}");

    // Bad names are usage errors.
    ctl(&state, &["pause", "nope"], 2);
    ctl(&state, &["pause", "tickets", "--partition", "nope"], 2);

    // A second run on the same directory is refused while the first holds it.
    let (code, _, err) = tidemark(&args, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another tidemark run holds"), "{err}");

    // SIGTERM: a clean stop.
    let st = run.term(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        run.log_tail(20)
    );

    // Stopped: the commands change the state file directly.
    ctl(&state, &["rewind", "tickets", "--cursor", "from-here"], 0);
    assert_eq!(status_json(&state)["tickets"]["cursor"], "from-here");
    ctl(&state, &["rewind", "tickets", "--start"], 0);
    let st = status_json(&state);
    assert!(st["tickets"]["cursor"].is_null() && st["tickets"]["high_water"].is_null());
    ctl(&state, &["pause", "tickets"], 0);
    assert_eq!(status_json(&state)["tickets"]["phase"], "paused");
    ctl(&state, &["resume", "tickets"], 0);
    assert_eq!(status_json(&state)["tickets"]["phase"], "idle");

    // A rewind fences the epoch a page was working under.
    let file = state.join("state.json");
    let job = JobId::new("tickets", "all");
    let epoch = {
        let store = EmbeddedStore::open(&file).expect("open");
        match store.acquire(&job, Duration::from_secs(60), true).await {
            Ok(Acquire::Granted { epoch }) => epoch,
            other => panic!("acquire: {other:?}"),
        }
    };
    ctl(&state, &["rewind", "tickets", "--cursor", "c2"], 0);
    let store = EmbeddedStore::open(&file).expect("open");
    tidemark_tests::assert_epoch_fenced(&store, &job, epoch, "c2").await;
}

fn demo_out(dir: &Path) -> [PathBuf; 4] {
    ["tickets", "events", "items", "graphql"].map(|f| dir.join("out").join(format!("{f}.jsonl")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_syncs_its_four_feeds_stops_cleanly_and_resumes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("demo");
    let args = [
        "demo",
        "--dir",
        &s(&dir),
        "--port",
        "0",
        "--records",
        "2000",
    ];
    let mut first = spawn("demo1", &args, &[], tmp.path(), "tidemark demo:");
    let files = demo_out(&dir);
    assert!(
        eventually(Duration::from_secs(90), async || files
            .iter()
            .all(|f| lines(f).len() >= 2000))
        .await,
        "the demo did not sync its feeds: {}",
        first.log_tail(30)
    );
    for f in &files {
        let got: HashSet<String> = ids(f).into_iter().collect();
        assert!(got.len() >= 2000, "{}", f.display());
    }
    let st = first.term(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        first.log_tail(20)
    );
    let log = std::fs::read_to_string(&first.log).unwrap();
    assert!(log.contains("run `tidemark demo` again to resume"), "{log}");
    let seq_before = job_state(&dir.join("state"), "tickets").await.seq;
    let lines_before = lines(&files[0]).len();

    let mut second = spawn("demo2", &args, &[], tmp.path(), "tidemark demo:");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st = second.term(Duration::from_secs(30));
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let log = std::fs::read_to_string(&second.log).unwrap();
    assert!(log.contains("resuming"), "{log}");
    // It continued from its cursors: no second full walk.
    assert!(job_state(&dir.join("state"), "tickets").await.seq >= seq_before);
    let lines_after = lines(&files[0]).len();
    assert!(
        lines_after < lines_before + 1000,
        "the second demo run synced everything again ({lines_before} -> {lines_after} lines)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_writes_to_stdout_and_exits_when_every_feed_is_done() {
    let c = Cluster::start(BIG_FEEDS, &["--records", "1500"]);
    let state = c.dir.path().join("state");
    let (code, out, err) = tidemark(
        &[
            "run",
            "--config",
            &s(&c.config),
            "--state-dir",
            &s(&state),
            "--out",
            "-",
            "--once",
            "--log-format",
            "json",
            "--log",
            "info",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3000, "two feeds of 1500 records on stdout");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).expect("a whole record per line");
        assert!(v["id"].is_string());
    }
    // --log-format json: every log line on stderr is a JSON object.
    let logs: Vec<&str> = err.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!logs.is_empty(), "{err}");
    for l in logs {
        let v: serde_json::Value = serde_json::from_str(l).expect("a JSON log line");
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    // Run again with --once: nothing new, so nothing is written twice.
    let (code, out, err) = tidemark(
        &[
            "run",
            "--config",
            &s(&c.config),
            "--state-dir",
            &s(&state),
            "--out",
            "-",
            "--once",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let again = out.lines().count();
    // events (seed 001) restarts at its last page's Self cursor: that page comes again.
    assert!(again <= 500, "{again} records written again");
}
