//! `tidemark bench e2e` at a small scale: every scenario runs the real
//! distributed system, every expected record is counted downstream, the
//! figures are filled in, and the run leaves no keys or queues behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tidemark_tests::{amqp_url, redis_url, tidemark};

/// The tests look at every `tmbench*` key, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn bench_keys() -> Vec<String> {
    let client = redis::Client::open(redis_url().as_str()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg("tmbench*")
        .query_async(&mut c)
        .await
        .unwrap()
}

/// Run `tidemark bench e2e --json --scenario <scenario>` with `args`; the
/// report's one run of that scenario.
async fn one_run(scenario: &'static str, args: &[&str]) -> serde_json::Value {
    let env = vec![
        ("REDIS_URL".to_string(), redis_url()),
        ("AMQP_URL".to_string(), amqp_url()),
    ];
    let mut all: Vec<String> = ["bench", "e2e", "--json", "--scenario", scenario]
        .iter()
        .map(|a| a.to_string())
        .collect();
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--timeout".to_string(), "120s".to_string()]);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        tidemark(&args, &env)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "bench failed:\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let runs = r[scenario].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{r}");
    runs[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_counts_every_record_and_cleans_up() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = vec![
        ("REDIS_URL".to_string(), redis_url()),
        ("AMQP_URL".to_string(), amqp_url()),
    ];
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        tidemark(
            &[
                "bench",
                "e2e",
                "--json",
                "--throughput-jobs",
                "4",
                "--throughput-records",
                "1500",
                "--throughput-page-records",
                "2500",
                "--ceiling-messages",
                "3000",
                "--scale-feeds",
                "12",
                "--scale-records",
                "150",
                "--scale-page-size",
                "50",
                "--scale-latency-ms",
                "20",
                "--scale-workers",
                "1,2",
                "--many-jobs",
                "40",
                "--many-records",
                "15",
                "--one-chain-records",
                "3000",
                "--one-chain-page-size",
                "500",
                "--one-chain-workers",
                "1",
                "--timeout",
                "120s",
            ],
            &env,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "bench failed:\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");

    let ceiling = r["ceiling"].as_array().unwrap();
    assert_eq!(ceiling.len(), 2, "record- and page-sized ceilings");
    assert_eq!(ceiling[0]["messages"], 3000);
    assert!(ceiling[0]["messages_per_sec"].as_f64().unwrap() > 0.0);

    let check = |run: &serde_json::Value, records: u64, pages_at_least: u64, workers: usize| {
        let label = run["label"].as_str().unwrap();
        assert_eq!(run["records"], records, "{label}");
        assert_eq!(run["duplicates"], 0, "{label}");
        assert!(
            run["pages"].as_u64().unwrap() >= pages_at_least,
            "{label}: {run}"
        );
        assert!(run["seconds"].as_f64().unwrap() > 0.0, "{label}");
        assert!(run["records_per_sec"].as_f64().unwrap() > 0.0, "{label}");
        let p50 = run["page_latency_p50_ms"].as_f64().unwrap();
        let p99 = run["page_latency_p99_ms"].as_f64().unwrap();
        assert!(p50 > 0.0 && p50 <= p99, "{label}: {p50} / {p99}");
        assert!(
            run["worker_cpu_us_per_record"].as_f64().unwrap() > 0.0,
            "{label}"
        );
        let rss = run["worker_peak_rss_mib"].as_array().unwrap();
        assert_eq!(rss.len(), workers, "{label}: one peak RSS per worker");
        assert!(rss.iter().all(|m| m.as_f64().unwrap() > 1.0), "{label}");
        assert!(run["coordinator_passes"].as_u64().unwrap() >= 1, "{label}");
    };
    let t = r["throughput"].as_array().unwrap();
    assert_eq!(t.len(), 2);
    // Per record: one message per record.
    check(&t[0], 4 * 1500, 4 * 2, 1);
    assert_eq!(t[0]["messages"], 4 * 1500);
    // Per page: one message per page, its records counted from x-record-count.
    check(&t[1], 4 * 2500, 4 * 3, 1);
    assert!(t[1]["messages"].as_u64().unwrap() <= 4 * 3);

    let s = r["scale_out"].as_array().unwrap();
    assert_eq!(s.len(), 2);
    check(&s[0], 12 * 150, 12 * 3, 1);
    check(&s[1], 12 * 150, 12 * 3, 2);
    // Every chain's first page waits 20 ms for the API after its task is
    // published (the pages a hot chain carries on were fetched ahead);
    // quantiles read off buckets, so only the bucket's lower bound (10 ms)
    // is certain.
    assert!(s[0]["page_latency_p99_ms"].as_f64().unwrap() >= 10.0);

    let m = r["many_jobs"].as_array().unwrap();
    assert_eq!(m.len(), 1);
    check(&m[0], 40 * 15, 40 * 2, 2);
    assert!(m[0]["coordinator_cpu_seconds"].as_f64().is_some());

    // One chain: hot and through the queue alone, per page and per record,
    // every record once; beside pull on the same pages and the ceilings.
    let one = &r["one_chain"];
    let runs = one["runs"].as_array().unwrap();
    let labels: Vec<&str> = runs.iter().map(|r| r["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        [
            "one chain, per page, 1 worker",
            "one chain, per page, 1 worker, every page through the queue",
            "one chain, per record, 1 worker",
            "one chain, per record, 1 worker, every page through the queue",
        ]
    );
    for run in runs {
        check(run, 3000, 6, 1);
        assert_eq!(run["jobs"], 1);
    }
    assert!(one["pull_records_per_sec"].as_f64().unwrap() > 0.0);
    let ceiling = one["ceiling"].as_array().unwrap();
    assert_eq!(ceiling.len(), 2, "record- and page-sized ceilings");
    assert_eq!(ceiling[0]["messages"], 3000);
    assert_eq!(ceiling[1]["messages"], 6);

    assert_eq!(bench_keys().await, Vec::<String>::new(), "keys left behind");
}

/// The `scale` scenario, small: many feeds of many small jobs, with the
/// Redis memory per job and the cost of an idle pass filled in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scale_scenario_measures_memory_and_idle_passes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = vec![
        ("REDIS_URL".to_string(), redis_url()),
        ("AMQP_URL".to_string(), amqp_url()),
    ];
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        tidemark(
            &[
                "bench",
                "e2e",
                "--json",
                "--scenario",
                "scale",
                "--jobs",
                "60,150",
                "--jobs-per-feed",
                "20",
                "--jobs-idle-window",
                "2s",
                "--timeout",
                "120s",
            ],
            &env,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "bench failed:\n{err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let runs = r["scale"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (run, (jobs, feeds)) in runs.iter().zip([(60, 3), (150, 8)]) {
        let label = run["label"].as_str().unwrap();
        assert_eq!(
            (run["jobs"].as_u64(), run["feeds"].as_u64()),
            (Some(jobs), Some(feeds)),
            "{label}"
        );
        assert_eq!(run["records"], jobs * 15, "{label}");
        assert_eq!(run["duplicates"], 0, "{label}");
        assert!(
            run["redis_bytes_per_job"].as_f64().is_some(),
            "{label}: {run}"
        );
        let idle = run["idle_pass_cpu_ms"].as_f64().expect("idle pass CPU");
        assert!(
            idle > 0.0 && idle < 1000.0,
            "{label}: {idle} ms per idle pass"
        );
        assert!(run["coordinator_cpu_seconds"].as_f64().is_some(), "{label}");
    }
    assert_eq!(bench_keys().await, Vec::<String>::new(), "keys left behind");
}

/// The `tenants` scenario, small: a tenanted source of 40 tenants x 3
/// feeds synced once, then two tenants appended to the tenants file, each
/// timed to its first record (the time itself is the bench's to judge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenants_scenario_times_a_new_tenants_first_record() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let run = &one_run(
        "tenants",
        &[
            "--tenants",
            "40",
            "--tenants-feeds",
            "3",
            "--tenants-records",
            "10",
            "--tenants-adds",
            "2",
        ],
    )
    .await;
    assert_eq!(
        (
            run["tenants"].as_u64(),
            run["feeds"].as_u64(),
            run["jobs"].as_u64()
        ),
        (Some(40), Some(3), Some(120)),
        "{run}"
    );
    // Every tenant's dataset once per feed (the bench also checks each
    // tenant's count, the added ones' included, and fails otherwise).
    assert_eq!(run["records"], 40 * 3 * 10, "{run}");
    assert_eq!(run["duplicates"], 0, "{run}");
    assert!(run["seconds"].as_f64().unwrap() > 0.0, "{run}");
    assert!(run["records_per_sec"].as_f64().unwrap() > 0.0, "{run}");
    let adds = run["tenant_adds"].as_array().unwrap();
    assert_eq!(adds.len(), 2, "{run}");
    for (a, name) in adds.iter().zip(["added-00", "added-01"]) {
        assert_eq!(a["tenant"], name, "{a}");
        assert_eq!(a["records"], 3 * 10, "{a}");
        let first = a["first_record_ms"].as_f64().expect("first record");
        let all = a["all_records_ms"].as_f64().expect("all records");
        assert!(first > 0.0 && first <= all, "{a}");
        let started = a["started_ms"].as_f64().expect("the first chain's start");
        assert!(started <= first, "{a}");
    }
    let median = run["tenant_add_first_record_median_ms"].as_f64().unwrap();
    let max = run["tenant_add_first_record_max_ms"].as_f64().unwrap();
    assert!(median > 0.0 && median <= max, "{run}");
    assert_eq!(run["coordinator_tick_ms"], 1000.0, "{run}");
    assert_eq!(bench_keys().await, Vec::<String>::new(), "keys left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scenario_that_cannot_finish_fails_with_the_logs() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = vec![
        ("REDIS_URL".to_string(), redis_url()),
        ("AMQP_URL".to_string(), amqp_url()),
    ];
    // The API answers 15 records per job, but 1 s of latency per page and a
    // 2 s limit leave the run unfinished: an error, not a figure.
    let (code, _out, err) = tokio::task::spawn_blocking(move || {
        tidemark(
            &[
                "bench",
                "e2e",
                "--scenario",
                "scale-out",
                "--scale-feeds",
                "2",
                "--scale-records",
                "30",
                "--scale-page-size",
                "10",
                "--scale-latency-ms",
                "1000",
                "--scale-workers",
                "1",
                "--timeout",
                "2s",
            ],
            &env,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("records arrived within"), "{err}");
    assert!(err.contains("----- coordinator -----"), "{err}");
    assert_eq!(bench_keys().await, Vec::<String>::new(), "keys left behind");
}

/// The `children` scenario, small: 300 parent records, each making a child
/// job of two pages, every child record counted once, the child jobs'
/// Redis memory and the coordinator's CPU per child filled in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_children_scenario_counts_every_child_record_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let run = &one_run("children", &["--children-parents", "300"]).await;
    assert_eq!(
        (
            run["parents"].as_u64(),
            run["per_parent"].as_u64(),
            run["workers"].as_u64()
        ),
        (Some(300), Some(10), Some(2)),
        "{run}"
    );
    assert_eq!(run["parent_records"], 300, "{run}");
    assert_eq!(run["child_records"], 300 * 10, "{run}");
    assert_eq!(run["duplicates"], 0, "{run}");
    assert_eq!(run["missing"], 0, "{run}");
    assert_eq!(run["unexpected"], 0, "{run}");
    assert_eq!(run["child_jobs"], 300, "{run}");
    assert_eq!(run["child_jobs_failed"], 0, "{run}");
    // Two pages a child, each fetched once.
    assert_eq!(run["expected_child_page_requests"], 600, "{run}");
    assert!(run["child_page_requests"].as_u64().unwrap() >= 600, "{run}");
    assert!(run["children_per_sec"].as_f64().unwrap() > 0.0, "{run}");
    assert!(
        run["child_records_per_sec"].as_f64().unwrap() > 0.0,
        "{run}"
    );
    assert!(
        run["coordinator_cpu_us_per_child"].as_f64().is_some(),
        "{run}"
    );
    let redis = &run["redis"];
    assert_eq!(redis["child_job_hashes"], 300, "{run}");
    assert!(
        redis["child_key_bytes_per_child"].as_f64().unwrap() > 0.0,
        "{run}"
    );
    assert_eq!(bench_keys().await, Vec::<String>::new(), "keys left behind");
}
