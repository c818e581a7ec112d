//! Request dialects end to end: the five feeds of examples/dialects.yaml
//! (GraphQL with Relay edges, Notion's cursor in a POSTed body,
//! Elasticsearch's `search_after` array, Kinto's `Next-Page` header and
//! Slack's errors inside a 200) run by real `tidemark` processes against
//! the mock API, in distributed mode (a coordinator and workers over Redis
//! and RabbitMQ) and in embedded mode (`tidemark run`), with workers and
//! runs killed mid-walk, errors inside 200 answers, a rate-limit budget
//! announced in headers, and a POST that may not be sent twice.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use serde_yaml_ng::{Mapping, Value as Yaml};
use tidemark_core::checkpoint::Phase;
use tidemark_mock::{Truth, TruthRecord};
use tidemark_tests::{Arrived, Checker, Cluster, Proc, spawn, tidemark, versions};

/// The mock's first `updated_at` (2024-01-01T00:00:00Z, unix seconds): its
/// records are one second apart, in id order.
const BASE_TIME: i64 = 1_704_067_200;

/// Every source's retries: fast, so that a retried page costs little.
const RETRY: &str = "{ max_attempts: 5, base_delay: 50ms, max_delay: 500ms, max_retry_after: 5s }";

/// The five dialects, in the order of examples/dialects.yaml.
const DIALECTS: [&str; 5] = ["graphql", "notion", "search", "kinto", "slack"];

/// The feeds of examples/dialects.yaml: one per dialect, named after it.
fn example_feeds() -> Vec<Yaml> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dialects.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let config: Yaml = serde_yaml_ng::from_str(&text).expect("examples/dialects.yaml");
    config["feeds"].as_sequence().expect("feeds").clone()
}

/// The feed `dialect` of examples/dialects.yaml as feed `name` on
/// `source`, `page` records a page, polled hourly (so that only the first
/// walk happens during a test), changed by `edit`: its YAML, an item of
/// the `feeds:` list.
fn feed(
    dialect: &str,
    name: &str,
    source: &str,
    page: usize,
    edit: impl FnOnce(&mut Mapping),
) -> String {
    let mut f = example_feeds()
        .into_iter()
        .find(|f| f["name"].as_str() == Some(dialect))
        .and_then(|f| f.as_mapping().cloned())
        .unwrap_or_else(|| panic!("examples/dialects.yaml has no feed {dialect}"));
    f.insert("name".into(), name.into());
    f.insert("source".into(), source.into());
    f.insert("every".into(), "1h".into());
    f.get_mut("pagination")
        .and_then(Yaml::as_mapping_mut)
        .expect("pagination")
        .insert("page_size".into(), (page as u64).into());
    edit(&mut f);
    serde_yaml_ng::to_string(&[Yaml::Mapping(f)]).expect("feed yaml")
}

/// Set `key` of a feed to `yaml` (a YAML value).
fn set(f: &mut Mapping, key: &str, yaml: &str) {
    f.insert(
        key.into(),
        serde_yaml_ng::from_str(yaml).expect("yaml value"),
    );
}

/// The five dialects, each a feed named after it, on the source `mock`.
fn five_feeds(page: usize) -> String {
    DIALECTS
        .iter()
        .map(|d| feed(d, d, "mock", page, |_| ()))
        .collect()
}

/// A source's lines: `name` at `url`, with [`RETRY`] and `extra` lines
/// (indented four spaces).
fn source(name: &str, url: &str, extra: &str) -> String {
    format!("  {name}:\n    base_url: {url}\n    timeout: 10s\n    retry: {RETRY}\n{extra}")
}

/// Replace the config of `c` (call before the coordinator starts).
fn write_config(c: &Cluster, sources: &str, feeds: &str) {
    std::fs::write(&c.config, format!("sources:\n{sources}feeds:\n{feeds}")).expect("config");
}

/// `tidemark status --json` against the deployment.
fn status(c: &Cluster) -> Value {
    let (code, out, err) = tidemark(&["status", "--json"], &c.role_env());
    assert_eq!(code, 0, "tidemark status --json: exit {code}\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

/// `tidemark status --json --state-dir D` of an embedded run.
fn embedded_status(state: &Path) -> Value {
    let dir = state.display().to_string();
    let (code, out, err) = tidemark(&["status", "--json", "--state-dir", &dir], &[]);
    assert_eq!(code, 0, "tidemark status --json: exit {code}\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

/// The status row of `feed`'s job (partition `all`).
fn job_row(st: &Value, feed: &str) -> Value {
    try_job_row(st, feed).unwrap_or_else(|| panic!("no job of {feed} in the status: {st:#}"))
}

/// [`job_row`], or None while the job does not exist yet.
fn try_job_row(st: &Value, feed: &str) -> Option<Value> {
    st["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["feed"] == feed && j["partition"] == "all")
        .cloned()
}

/// The summary of `feed` in a status report.
fn feed_row(st: &Value, feed: &str) -> Value {
    st["feeds"]
        .as_array()
        .expect("feeds")
        .iter()
        .find(|f| f["feed"] == feed)
        .unwrap_or_else(|| panic!("no feed {feed} in the status: {st:#}"))
        .clone()
}

/// The mock's `/_stats` at `url`.
async fn stats(url: &str) -> Value {
    reqwest::get(format!("{url}/_stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json")
}

/// The sum of the samples of metric `name` with these labels, from a
/// role's `/metrics` at `url`.
async fn metric(url: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait for `check`, polling every 50 ms.
async fn until(timeout: Duration, check: impl AsyncFnMut() -> bool) -> bool {
    tidemark_harness::eventually(timeout, Duration::from_millis(50), check).await
}

/// What is wrong with the record versions that arrived under one routing
/// key (or in one file), against the truth: current versions missing, versions the API never
/// served. Empty when every current record arrived and nothing else.
fn problems(key: &str, got: &HashSet<TruthRecord>, truth: &Truth) -> Vec<String> {
    let served: HashSet<&TruthRecord> = truth.versions.iter().collect();
    let missing: Vec<&TruthRecord> = truth.records.iter().filter(|r| !got.contains(*r)).collect();
    let unknown: Vec<&TruthRecord> = got.iter().filter(|r| !served.contains(r)).collect();
    let mut out = Vec::new();
    if !missing.is_empty() {
        out.push(format!(
            "{key}: {} of {} records missing, e.g. {:?}",
            missing.len(),
            truth.records.len(),
            &missing[..missing.len().min(3)]
        ));
    }
    if !unknown.is_empty() {
        out.push(format!(
            "{key}: {} versions the API never served, e.g. {:?}",
            unknown.len(),
            &unknown[..unknown.len().min(3)]
        ));
    }
    out
}

/// The problems of every key in `keys` (missing keys count as all missing).
fn all_problems(checker: &Checker, keys: &[String], truth: &Truth) -> Vec<String> {
    let parts = checker.by_partition();
    keys.iter()
        .flat_map(|k| {
            let got = versions(parts.get(k).map(Vec::as_slice).unwrap_or_default());
            problems(k, &got, truth)
        })
        .collect()
}

/// Wait until every key in `keys` has every current record of `truth`;
/// panic naming what is missing otherwise, or as soon as a job of one of
/// their feeds failed.
async fn wait_delivered(
    c: &Cluster,
    checker: &Checker,
    keys: &[String],
    truth: &Truth,
    timeout: Duration,
) {
    let feeds: HashSet<&str> = keys
        .iter()
        .map(|k| k.split('.').next().unwrap_or_default())
        .collect();
    let mut failed = Vec::new();
    let ok = until(timeout, async || {
        failed = c
            .jobs()
            .await
            .into_iter()
            .filter(|(j, cp)| feeds.contains(j.feed.as_str()) && cp.phase == Phase::Failed)
            .map(|(j, cp)| format!("{j}: {:?}", cp.last_error))
            .collect();
        !failed.is_empty() || all_problems(checker, keys, truth).is_empty()
    })
    .await;
    assert!(failed.is_empty(), "jobs failed: {failed:#?}{}", c.logs());
    assert!(
        ok,
        "not delivered after {timeout:?}: {:#?}{}",
        all_problems(checker, keys, truth),
        c.logs()
    );
}

/// Wait until every job of `feeds` is idle (its walk committed to its
/// end) without an error.
async fn wait_idle(c: &Cluster, feeds: &[&str], timeout: Duration) {
    let ok = until(timeout, async || {
        let jobs = c.jobs().await;
        feeds.iter().all(|f| {
            let mine: Vec<_> = jobs.iter().filter(|(j, _)| j.feed == *f).collect();
            !mine.is_empty()
                && mine.iter().all(|(_, cp)| {
                    cp.phase == Phase::Idle && cp.last_error.is_none() && cp.pages > 0
                })
        })
    })
    .await;
    if !ok {
        let jobs: Vec<String> = c
            .jobs()
            .await
            .iter()
            .map(|(j, cp)| {
                format!(
                    "{j}: {:?} pages {} error {:?}",
                    cp.phase, cp.pages, cp.last_error
                )
            })
            .collect();
        panic!("jobs not idle after {timeout:?}: {jobs:#?}{}", c.logs());
    }
}

/// Records that arrived more than once under `key` (same id and version).
fn repeats(checker: &Checker, key: &str) -> usize {
    let parts = checker.by_partition();
    let got = parts.get(key).map(Vec::as_slice).unwrap_or_default();
    got.len() - versions(got).len()
}

fn keys(feeds: &[&str]) -> Vec<String> {
    feeds.iter().map(|f| format!("{f}.all")).collect()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Wait (on a blocking thread) up to `within` for `p` to exit by itself.
fn wait_exit(p: &mut Proc, within: Duration) -> Option<std::process::ExitStatus> {
    tokio::task::block_in_place(|| p.wait(within))
}

// ---------------------------------------------------------------- distributed

/// A coordinator and two workers sync the five dialects, several pages
/// each: every current record arrives under each feed, exactly once, and
/// every job ends idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_two_workers_sync_every_dialect() {
    let started = Instant::now();
    let mut c = Cluster::start("", &["--records", "400"]);
    write_config(&c, &source("mock", &c.mock_url, ""), &five_feeds(50));
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    c.worker("w1", &["--concurrency", "2"]);
    c.worker("w2", &["--concurrency", "2"]);
    let truth = c.truth().await;
    assert_eq!(truth.records.len(), 400);
    let all = keys(&DIALECTS);
    wait_delivered(&c, &checker, &all, &truth, Duration::from_secs(40)).await;
    wait_idle(&c, &DIALECTS, Duration::from_secs(20)).await;
    let parts = checker.by_partition();
    assert_eq!(
        parts.keys().cloned().collect::<Vec<_>>(),
        {
            let mut k = all.clone();
            k.sort();
            k
        },
        "one routing key per feed"
    );
    for key in &all {
        assert_eq!(parts[key].len(), 400, "{key}: every record exactly once");
    }
    // Several pages each: 400 records, 50 a page (search ends on an empty page).
    let st = status(&c);
    for d in DIALECTS {
        let row = job_row(&st, d);
        assert!(row["pages"].as_u64() >= Some(8), "{d}: {row}");
        assert_eq!(row["records"].as_u64(), Some(400), "{d}: {row}");
    }
    let by_path = stats(&c.mock_url).await["by_path"].clone();
    for path in [
        "/graphql",
        "/notion/v1/databases/tasks/query",
        "/es/records/_search",
        "/kinto/records",
        "/slack/conversations.history",
    ] {
        assert!(by_path[path].as_u64() >= Some(8), "{path}: {by_path}");
    }
    eprintln!(
        "dialects: five feeds of 400 records in {:?}",
        started.elapsed()
    );
}

/// Workers die in the middle of the JSON-cursor walks (one crashes right
/// after publishing a page, one right after committing one, another is
/// SIGKILLed): the chains go on from their tasks' and their stored cursors
/// and nothing is missing. `status --json` shows the
/// search feed's cursor as the JSON array it is, and `rewind --cursor`
/// takes JSON only for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_resume_the_json_cursors_exactly() {
    const RECORDS: usize = 300;
    const PAGE: usize = 15;
    let started = Instant::now();
    let mut c = Cluster::start(
        "",
        &["--records", &RECORDS.to_string(), "--latency-ms", "60"],
    );
    let feeds = ["search", "graphql", "notion"];
    let yaml: String = feeds
        .iter()
        .map(|d| feed(d, d, "mock", PAGE, |_| ()))
        .collect();
    write_config(&c, &source("mock", &c.mock_url, ""), &yaml);
    // A chain whose worker died is re-issued after its processing lease,
    // or, when it died between its commit and publishing the next page
    // task, after the queue lease: both short here.
    c.env.extend([
        ("TIDEMARK_LEASE".into(), "3s".into()),
        ("TIDEMARK_QUEUE_LEASE".into(), "4s".into()),
    ]);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    let w1 = c.worker("w1", &["--concurrency", "2"]);
    // One crashes at its fourth page after the publish (before the commit:
    // the task comes back), one at its fifth after the commit (before the
    // next page task is published: the chain is re-issued from the stored
    // cursor).
    let armed = [
        c.worker_with_env(
            "w2-after-publish",
            &["--concurrency", "2"],
            &[("FAILPOINTS", "worker::after_publish=3*off->return")],
        ),
        c.worker_with_env(
            "w3-after-commit",
            &["--concurrency", "2"],
            &[("FAILPOINTS", "worker::after_commit=4*off->return")],
        ),
    ];
    let truth = c.truth().await;
    assert_eq!(truth.records[0].updated_at, "2024-01-01T00:00:00Z");
    let all = keys(&feeds);
    let search_count = || checker.by_partition().get("search.all").map_or(0, Vec::len);

    // Mid-walk: the search job's cursor is the last hit's sort values.
    let mut mid = Value::Null;
    let got_mid = until(Duration::from_secs(30), async || {
        let row = try_job_row(&status(&c), "search").unwrap_or_default();
        let ok = row["phase"] == "running" && row["cursor_json"].is_array();
        if ok {
            mid = row;
        }
        ok
    })
    .await;
    assert!(got_mid, "no search cursor mid-walk{}", c.logs());
    let cursor = mid["cursor"].as_str().expect("a cursor string");
    let parsed: Value = serde_json::from_str(cursor).expect("the cursor parses as JSON");
    assert_eq!(
        parsed, mid["cursor_json"],
        "cursor and cursor_json agree: {mid}"
    );
    let arr = mid["cursor_json"].as_array().unwrap();
    assert!(
        arr.len() == 2 && arr[0].is_i64() && arr[1].is_string(),
        "the cursor is [updated_at, id]: {mid}"
    );

    // SIGKILL w1 once a fifth has arrived, while the walks are under way.
    assert!(
        until(Duration::from_secs(30), async || search_count()
            >= RECORDS / 5)
        .await,
        "the walk did not get going{}",
        c.logs()
    );
    c.procs[w1].kill9();
    let at_kill_by_key: BTreeMap<String, usize> = all
        .iter()
        .map(|k| (k.clone(), checker.by_partition().get(k).map_or(0, Vec::len)))
        .collect();
    assert!(
        at_kill_by_key.values().all(|n| *n < RECORDS),
        "a walk was over before the kill, the test proves less: {at_kill_by_key:?}"
    );
    c.worker("w4", &["--concurrency", "2"]);
    for i in armed {
        let crashed = wait_exit(&mut c.procs[i], Duration::from_secs(30));
        assert_eq!(
            crashed.and_then(|s| s.code()),
            Some(86),
            "{} did not crash at its failpoint (is the binary built with the worker's \
             failpoints, by cargo build --workspace?){}",
            c.procs[i].name,
            c.logs()
        );
    }

    wait_delivered(&c, &checker, &all, &truth, Duration::from_secs(40)).await;
    wait_idle(&c, &feeds, Duration::from_secs(20)).await;
    for key in &all {
        // Only a page in flight at each death may come again.
        let r = repeats(&checker, key);
        assert!(r <= 3 * PAGE, "{key}: {r} records repeated");
    }
    // The chain of the worker that died after its commit was re-issued
    // from the stored cursor (no task of it was left to come back).
    let coord = std::fs::read_to_string(&c.procs[0].log).unwrap_or_default();
    let reissued = coord
        .lines()
        .filter(|l| l.contains("chain re-issued from the stored cursor"))
        .count();
    assert!(reissued >= 1, "no chain was re-issued{}", c.logs());
    let st = status(&c);
    eprintln!(
        "dialects: w1 killed at {at_kill_by_key:?} of {RECORDS} records per feed, {reissued} chains re-issued"
    );

    // After the walk: the cursors are JSON text, parsed in cursor_json.
    let search = job_row(&st, "search");
    let text = search["cursor"].as_str().expect("search keeps its cursor");
    let v: Value = serde_json::from_str(text).expect("search's cursor is JSON");
    assert!(v.is_array() && v == search["cursor_json"], "{search}");
    let last = truth.records.last().unwrap();
    assert_eq!(
        v,
        json!([BASE_TIME + RECORDS as i64 - 1, last.id]),
        "the last hit's sort values: {search}"
    );
    // GraphQL's endCursor and Notion's next_cursor: JSON strings, quoted.
    for f in ["graphql", "notion"] {
        let row = job_row(&st, f);
        let text = row["cursor"]
            .as_str()
            .unwrap_or_else(|| panic!("{f} keeps its cursor: {row}"));
        let v: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{f}'s cursor {text:?} is not JSON text: {e}"));
        assert!(v.is_string() && v == row["cursor_json"], "{f}: {row}");
    }

    // rewind --cursor: JSON only, for a feed whose cursor is in the body.
    // Paused first, so that the rewound cursor can be read before it moves.
    let env = c.role_env();
    let run = |args: &[&str]| tidemark(args, &env);
    let (code, out, err) = run(&["pause", "search"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(&["rewind", "search", "--cursor", "not-json"]);
    assert_eq!(code, 2, "a non-JSON cursor is refused: {out}{err}");
    assert!(format!("{out}{err}").contains("JSON"), "{out}{err}");
    assert_eq!(job_row(&status(&c), "search")["cursor"], search["cursor"]);

    let half = &truth.records[RECORDS / 2 - 1];
    let half_t = BASE_TIME + RECORDS as i64 / 2 - 1;
    let given = format!("[ {half_t}, \"{}\" ]", half.id);
    let (code, out, err) = run(&["rewind", "search", "--cursor", &given]);
    assert_eq!(code, 0, "a JSON array cursor is taken: {out}{err}");
    let row = job_row(&status(&c), "search");
    let compact = format!("[{half_t},\"{}\"]", half.id);
    assert_eq!(
        row["cursor"],
        compact.as_str(),
        "stored as compact JSON text: {row}"
    );
    assert_eq!(row["cursor_json"], json!([half_t, half.id]), "{row}");
    let epoch_before = row["epoch"].as_u64().unwrap();
    let requests_before = stats(&c.mock_url).await["by_path"]["/es/records/_search"]
        .as_u64()
        .unwrap_or(0);
    let (code, out, err) = run(&["resume", "search"]);
    assert_eq!(code, 0, "{out}{err}");
    // The walk goes on from the rewound cursor: the mock takes it as an
    // array (a string there would be a 400), and the second half comes again.
    let before = search_count();
    let ok = until(Duration::from_secs(30), async || {
        let row = job_row(&status(&c), "search");
        row["epoch"].as_u64() > Some(epoch_before)
            && row["phase"] == "idle"
            && row["last_error"].is_null()
            && search_count() >= before + RECORDS / 2
    })
    .await;
    let row = job_row(&status(&c), "search");
    assert!(ok, "the rewound walk did not complete: {row}{}", c.logs());
    let requests_after = stats(&c.mock_url).await["by_path"]["/es/records/_search"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        requests_after >= requests_before + (RECORDS / 2 / PAGE) as u64,
        "{requests_before} -> {requests_after} search requests"
    );
    // Exactly the records after the cursor came again.
    let again: Vec<Arrived> = checker.by_partition()["search.all"][before..].to_vec();
    let again_ids: HashSet<String> = again.iter().map(|a| a.id.clone()).collect();
    let after_cursor: HashSet<String> = truth.records[RECORDS / 2..]
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(
        again_ids, after_cursor,
        "the rewound walk starts right after {compact}"
    );
    eprintln!("dialects: kills and rewind in {:?}", started.elapsed());
}

// ---------------------------------------------------------------- embedded

/// Lines of a JSON Lines file as (id, updated_at); every line whole JSON.
fn file_records(path: &Path) -> Vec<TruthRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("{}: not a whole JSON record ({e}): {l:.80}", path.display())
            });
            TruthRecord {
                id: v["id"].as_str().expect("id").to_string(),
                updated_at: v["updated_at"].as_str().expect("updated_at").to_string(),
            }
        })
        .collect()
}

/// Whole lines in a file being written (0 while it does not exist).
fn whole_lines(path: &Path) -> usize {
    std::fs::read(path)
        .unwrap_or_default()
        .iter()
        .filter(|b| **b == b'\n')
        .count()
}

/// What is wrong with a feed's file against the truth (see [`problems`]).
fn file_problems(path: &Path, truth: &Truth) -> Vec<String> {
    let got: HashSet<TruthRecord> = file_records(path).into_iter().collect();
    problems(&path.display().to_string(), &got, truth)
}

/// `tidemark run --once` writes every dialect's records to its file; a run
/// SIGKILLed in the middle of slow walks resumes from the stored JSON
/// cursors and ends with nothing missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_runs_sync_every_dialect_and_resume_after_a_sigkill() {
    const RECORDS: usize = 300;
    let started = Instant::now();
    let c = Cluster::start("", &["--records", &RECORDS.to_string()]);
    write_config(&c, &source("mock", &c.mock_url, ""), &five_feeds(50));
    let truth = c.truth().await;
    let config = s(&c.config);

    // 1. --once: every feed to its end, then exit 0.
    let state = c.dir.path().join("state-once");
    let out = c.dir.path().join("out-once");
    let (code, _, err) = tidemark(
        &[
            "run",
            "--config",
            &config,
            "--state-dir",
            &s(&state),
            "--out",
            &s(&out),
            "--once",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    for d in DIALECTS {
        let file = out.join(format!("{d}.jsonl"));
        let p = file_problems(&file, &truth);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(file_records(&file).len(), RECORDS, "{d}: every record once");
    }
    let st = embedded_status(&state);
    let search = job_row(&st, "search");
    assert!(search["cursor_json"].is_array(), "{search}");
    assert_eq!(
        serde_json::from_str::<Value>(search["cursor"].as_str().unwrap()).unwrap(),
        search["cursor_json"]
    );

    // 2. A slow API, small pages: SIGKILL in the middle of the walks.
    write_config(&c, &source("mock", &c.mock_url, ""), &five_feeds(10));
    c.admin(
        "/_admin/faults",
        Some(json!({"slow_every": 1, "slow_ms": 60})),
    )
    .await;
    let state = c.dir.path().join("state-killed");
    let out = c.dir.path().join("out-killed");
    let args = [
        "run",
        "--config",
        &config,
        "--state-dir",
        &s(&state),
        "--out",
        &s(&out),
        "--once",
    ];
    let mut first = spawn("run1", &args, &[], c.dir.path(), "tidemark run:");
    let search_file = out.join("search.jsonl");
    assert!(
        until(Duration::from_secs(30), async || whole_lines(&search_file)
            >= 60)
        .await,
        "the first run did not get going: {}",
        first.log_tail(30)
    );
    first.kill9();
    let at_kill = embedded_status(&state);
    let search_at_kill = job_row(&at_kill, "search");
    assert!(
        search_at_kill["records"].as_u64() < Some(RECORDS as u64),
        "the search walk was over at the kill: {search_at_kill}"
    );
    assert!(search_at_kill["cursor_json"].is_array(), "{search_at_kill}");
    let lines_at_kill: HashMap<&str, usize> = DIALECTS
        .iter()
        .map(|d| (*d, file_records(&out.join(format!("{d}.jsonl"))).len()))
        .collect();
    assert!(
        ["graphql", "notion", "search"]
            .iter()
            .all(|d| lines_at_kill[d] < RECORDS),
        "a JSON-cursor walk was over at the kill: {lines_at_kill:?}"
    );
    let search_requests = || async {
        stats(&c.mock_url).await["by_path"]["/es/records/_search"]
            .as_u64()
            .unwrap_or(0)
    };
    let requests_at_kill = search_requests().await;
    c.admin("/_admin/faults", Some(json!({}))).await;

    let mut second = spawn("run2", &args, &[], c.dir.path(), "tidemark run:");
    let st = wait_exit(&mut second, Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "the second run did not finish cleanly ({st:?}): {}",
        second.log_tail(40)
    );
    for d in DIALECTS {
        let file = out.join(format!("{d}.jsonl"));
        let p = file_problems(&file, &truth);
        assert!(p.is_empty(), "after the restart: {p:?}");
        let got = file_records(&file);
        let distinct: HashSet<&TruthRecord> = got.iter().collect();
        // Only the page in flight at the kill may have been written twice.
        assert!(
            got.len() - distinct.len() <= 10,
            "{d}: {} records written twice",
            got.len() - distinct.len()
        );
    }
    // The search walk went on from its cursor: about the pages left, not a
    // new walk of 31.
    let search_left = RECORDS - search_at_kill["records"].as_u64().unwrap() as usize;
    let resumed = search_requests().await - requests_at_kill;
    assert!(
        resumed <= (search_left / 10 + 2) as u64,
        "{resumed} search requests after the restart for {search_left} records left"
    );

    // 3. rewind --cursor on the embedded state: JSON only; the next run
    // walks again exactly the records after the given search_after array.
    let search_file = out.join("search.jsonl");
    let dir = s(&state);
    let (code, out, err) = tidemark(
        &[
            "rewind",
            "search",
            "--cursor",
            "not-json",
            "--state-dir",
            &dir,
        ],
        &[],
    );
    assert_eq!(code, 2, "a non-JSON cursor is refused: {out}{err}");
    let half = &truth.records[RECORDS / 2 - 1];
    let half_t = BASE_TIME + RECORDS as i64 / 2 - 1;
    let given = format!("[ {half_t}, \"{}\" ]", half.id);
    let (code, out, err) = tidemark(
        &["rewind", "search", "--cursor", &given, "--state-dir", &dir],
        &[],
    );
    assert_eq!(code, 0, "a JSON array cursor is taken: {out}{err}");
    let row = job_row(&embedded_status(&state), "search");
    assert_eq!(row["cursor_json"], json!([half_t, half.id]), "{row}");
    let before = file_records(&search_file).len();
    let mut third = spawn("run3", &args, &[], c.dir.path(), "tidemark run:");
    let st = wait_exit(&mut third, Duration::from_secs(60));
    assert!(
        st.is_some_and(|s| s.success()),
        "the run after the rewind did not finish cleanly ({st:?}): {}",
        third.log_tail(40)
    );
    let again: Vec<String> = file_records(&search_file)[before..]
        .iter()
        .map(|r| r.id.clone())
        .collect();
    let after_cursor: Vec<String> = truth.records[RECORDS / 2..]
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(
        again, after_cursor,
        "the rewound walk starts right after {given}, in order"
    );
    eprintln!(
        "dialects: embedded, killed with {lines_at_kill:?} lines written; {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------- errors in 200s

/// Errors inside 200 answers: the mock's injected rate-limit errors
/// (GraphQL `RATE_LIMITED`, Slack `ratelimited`) are retried and everything
/// arrives; Slack's `channel_not_found` fails its job with that message,
/// and nothing of it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_inside_200_answers_are_retried_or_fail_the_job() {
    const RECORDS: usize = 300;
    let started = Instant::now();
    let mut c = Cluster::start(
        "",
        &["--records", &RECORDS.to_string(), "--error-200-every", "3"],
    );
    let missing_channel = feed("slack", "slack_missing", "mock", 100, |f| {
        set(f, "params", "{ channel: missing }")
    });
    // Twelve pages each: with every third request answered an error, both
    // feeds meet several.
    let yaml = [
        feed("graphql", "graphql", "mock", 25, |_| ()),
        feed("slack", "slack", "mock", 25, |_| ()),
        missing_channel,
    ]
    .concat();
    // Room for a page that meets the error more than once in a row.
    let retry = source("mock", &c.mock_url, "").replace("max_attempts: 5", "max_attempts: 10");
    write_config(&c, &retry, &yaml);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    let w = c.worker("w1", &["--concurrency", "4"]);
    let truth = c.truth().await;
    wait_delivered(
        &c,
        &checker,
        &keys(&["graphql", "slack"]),
        &truth,
        Duration::from_secs(50),
    )
    .await;
    wait_idle(&c, &["graphql", "slack"], Duration::from_secs(20)).await;
    let st = stats(&c.mock_url).await;
    assert!(
        st["errors_200"].as_u64() > Some(0),
        "no error inside a 200 was served: {st}"
    );
    // Each feed met errors inside 200s and retried them.
    let metrics = c.procs[w].url().unwrap().to_string();
    for f in ["graphql", "slack"] {
        let n = metric(
            &metrics,
            "tidemark_fetch_errors_total",
            &[("feed", f), ("kind", "api_error_transient")],
        )
        .await;
        assert!(
            n > 0.0,
            "{f} met no error inside a 200: the test shows nothing for it"
        );
    }

    let failed = until(Duration::from_secs(20), async || {
        try_job_row(&status(&c), "slack_missing").is_some_and(|r| r["phase"] == "failed")
    })
    .await;
    let report = status(&c);
    let row = job_row(&report, "slack_missing");
    assert!(
        failed,
        "the missing channel's job did not fail: {row}{}",
        c.logs()
    );
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("channel_not_found"), "{row}");
    let summary = feed_row(&report, "slack_missing");
    assert_eq!(summary["failed"], 1, "{summary}");
    assert!(
        summary["failures"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("channel_not_found")),
        "{summary}"
    );
    assert!(
        !checker.by_partition().contains_key("slack_missing.all"),
        "records of a failed page were delivered"
    );
    assert_eq!(row["records"], 0, "{row}");
    eprintln!(
        "dialects: {} errors inside 200s retried in {:?}",
        st["errors_200"],
        started.elapsed()
    );
}

// ---------------------------------------------------------------- rate-limit headers

const RL_RECORDS: usize = 200;
const RL_WORKERS: usize = 2;
// Eight slots against a budget of ten a second: without the headers the
// first second already asks for more than ten, however slow the machine.
const RL_CONCURRENCY: usize = 4;
const RL_PARTITIONS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];

/// One deployment of a Notion feed against a mock with a budget of 10
/// requests a second: eight partitions (a value in the body the API
/// ignores) of five pages, run by two workers of four slots; the source
/// reads the rate-limit headers with `floor` when given. Returns the
/// mock's stats once every partition has every record, and the source
/// pauses the workers counted.
async fn rate_limited_sync(floor: Option<usize>) -> (Value, f64) {
    let records = RL_RECORDS.to_string();
    let mut c = Cluster::start(
        "",
        &[
            "--records",
            &records,
            "--ratelimit-limit",
            "10",
            "--ratelimit-window-ms",
            "1000",
        ],
    );
    let headers = floor.map_or(String::new(), |f| {
        format!("    rate_limit_headers: {{ floor: {f} }}\n")
    });
    let values: Vec<String> = RL_PARTITIONS.iter().map(|p| format!("\"{p}\"")).collect();
    let parts = format!(
        "{{ param: \"body:/filter/account\", values: [{}] }}",
        values.join(", ")
    );
    write_config(
        &c,
        &source("mock", &c.mock_url, &headers),
        &feed("notion", "tasks", "mock", 40, |f| {
            set(f, "partitions", &parts)
        }),
    );
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    let workers: Vec<usize> = (0..RL_WORKERS)
        .map(|i| {
            c.worker(
                &format!("w{i}"),
                &["--concurrency", &RL_CONCURRENCY.to_string()],
            )
        })
        .collect();
    let truth = c.truth().await;
    let all: Vec<String> = RL_PARTITIONS.iter().map(|p| format!("tasks.{p}")).collect();
    wait_delivered(&c, &checker, &all, &truth, Duration::from_secs(40)).await;
    wait_idle(&c, &["tasks"], Duration::from_secs(20)).await;
    for key in &all {
        assert_eq!(
            checker.by_partition()[key].len(),
            RL_RECORDS,
            "{key}: every record once"
        );
    }
    let mut pauses = 0.0;
    for w in workers {
        let url = c.procs[w].url().unwrap().to_string();
        pauses += metric(&url, "tidemark_source_pauses_total", &[("source", "mock")]).await;
    }
    (stats(&c.mock_url).await, pauses)
}

/// The same feed against the same budget (10 requests a second), in two
/// deployments: with `rate_limit_headers` (floor: every request that may
/// be in flight) it pauses before the budget is spent and never meets a
/// 429; without, it meets 429s. Both deliver everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_keep_a_feed_under_the_budget() {
    let started = Instant::now();
    // One after the other: a paused feed's tasks wait in the workers'
    // slots, which would slow the other feed down.
    let (headless, _) = rate_limited_sync(None).await;
    let headless_took = started.elapsed();
    let (headed, pauses) = rate_limited_sync(Some(RL_WORKERS * RL_CONCURRENCY)).await;
    assert!(
        headless["rate_limited_429"].as_u64() > Some(0),
        "the feed without rate_limit_headers never met a 429, so the test shows nothing: {headless}"
    );
    assert!(
        headed["requests"].as_u64() > Some(10),
        "fewer requests than one window's budget: the budget never mattered: {headed}"
    );
    assert_eq!(
        headed["rate_limited_429"], 0,
        "the feed reading the headers met the budget's end: {headed}"
    );
    assert!(pauses > 0.0, "the headers never paused the source");
    eprintln!(
        "dialects: rate-limit headers: {} 429s of {} requests without them ({headless_took:?}), \
         none of {} with them ({pauses} pauses); {:?}",
        headless["rate_limited_429"],
        headless["requests"],
        headed["requests"],
        started.elapsed()
    );
}

// ---------------------------------------------------------------- retry safety

/// A POST not marked `read_only` is sent once: a 500 on its first request
/// fails the job ("not retried") and the mock saw exactly one request. The
/// same feed marked `read_only: true` is retried after the same 500 and
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_not_marked_read_only_is_never_sent_twice() {
    const RECORDS: usize = 100;
    let started = Instant::now();
    let mut c = Cluster::start("", &["--records", &RECORDS.to_string()]);
    let notion = |name: &str, read_only: bool| {
        feed("notion", name, "mock", 25, |f| {
            set(f, "path", &format!("/notion/v1/databases/{name}/query"));
            set(f, "read_only", &read_only.to_string());
        })
    };
    let yaml = [notion("writes", false), notion("reads", true)].concat();
    write_config(&c, &source("mock", &c.mock_url, ""), &yaml);
    let writes = "/notion/v1/databases/writes/query";
    let reads = "/notion/v1/databases/reads/query";
    // Every request fails with a 500 until each feed has sent its first.
    c.admin("/_admin/faults", Some(json!({"fail_500_every": 1})))
        .await;
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    c.worker("w1", &["--concurrency", "2"]);
    let firsts = until(Duration::from_secs(30), async || {
        let by_path = stats(&c.mock_url).await["by_path"].clone();
        by_path[writes].as_u64() >= Some(1) && by_path[reads].as_u64() >= Some(1)
    })
    .await;
    assert!(
        firsts,
        "the feeds did not send their first requests{}",
        c.logs()
    );
    c.admin("/_admin/faults", Some(json!({}))).await;

    let truth = c.truth().await;
    wait_delivered(
        &c,
        &checker,
        &keys(&["reads"]),
        &truth,
        Duration::from_secs(30),
    )
    .await;
    wait_idle(&c, &["reads"], Duration::from_secs(20)).await;
    let failed = until(Duration::from_secs(20), async || {
        try_job_row(&status(&c), "writes").is_some_and(|r| r["phase"] == "failed")
    })
    .await;
    let report = status(&c);
    let row = job_row(&report, "writes");
    assert!(
        failed,
        "the POST that is not read_only did not fail its job: {row}{}",
        c.logs()
    );
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("not retried"), "{row}");
    assert!(error.contains("500"), "the error names the answer: {row}");
    assert_eq!(feed_row(&report, "writes")["failed"], 1);
    let by_path = stats(&c.mock_url).await["by_path"].clone();
    assert_eq!(by_path[writes], 1, "the POST was sent again: {by_path}");
    assert!(
        by_path[reads].as_u64() >= Some(RECORDS as u64 / 25 + 1),
        "the read_only POST was retried after its 500: {by_path}"
    );
    assert!(
        !checker.by_partition().contains_key("writes.all"),
        "the failed feed delivered records"
    );
    let counts: BTreeMap<String, usize> = checker
        .by_partition()
        .into_iter()
        .map(|(k, v)| (k, v.len()))
        .collect();
    eprintln!(
        "dialects: retry safety {counts:?} in {:?}",
        started.elapsed()
    );
}
