//! The fault-injection suite: the distributed system syncs while faults are
//! injected one after another (crashes at every window of the life of a
//! page, killed and frozen workers, cut, stalled and slow links to RabbitMQ,
//! Redis and the API, a Redis restart, API error storms), and after each the
//! suite waits until every current record version has arrived downstream.
//!
//! Throughout, a monitor samples every checkpoint (a cursor's `seq` or
//! high-water mark going back is a regression) and, at the end, the workers'
//! commit log lines are checked: no two commits of one page applied, and no
//! commit applied under an epoch older than one already applied.
//!
//! It prints a report (and writes it to `TIDEMARK_RELIABILITY_OUT` when set,
//! e.g. docs/RELIABILITY.md) with the seed, so a run can be repeated:
//!
//! ```sh
//! TIDEMARK_CHAOS_SEED=42 cargo test -p tidemark-tests --test reliability -- --nocapture
//! TIDEMARK_SOAK=1 TIDEMARK_RELIABILITY_OUT=$PWD/docs/RELIABILITY.md \
//!     cargo test -p tidemark-tests --test reliability -- --nocapture
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tidemark_mock::TruthRecord;
use tidemark_tests::monitor::Monitor;
use tidemark_tests::proxy::FaultProxy;
use tidemark_tests::redis_server::RedisServer;
use tidemark_tests::{Checker, Cluster, amqp_url, eventually, host_port, missing_by_key, versions};

/// xorshift64*: a small deterministic generator, so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    CrashAfterFetch,
    CrashAfterPrefetch,
    CrashAfterPublish,
    CrashAfterCommit,
    CrashAfterLocalHandOn,
    CrashBeforeAck,
    KillWorker,
    FreezeWorkerPastLease,
    ConnectionResets,
    StalledLinks,
    SlowLinks,
    RedisRestart,
    BrokerUnreachable,
    Api429Storm,
    Api5xxBurst,
    ApiTimeouts,
    ApiTruncatedBodies,
    ApiExpiredCursors,
}

const ALL: [Fault; 18] = [
    Fault::CrashAfterFetch,
    Fault::CrashAfterPrefetch,
    Fault::CrashAfterPublish,
    Fault::CrashAfterCommit,
    Fault::CrashAfterLocalHandOn,
    Fault::CrashBeforeAck,
    Fault::KillWorker,
    Fault::FreezeWorkerPastLease,
    Fault::ConnectionResets,
    Fault::StalledLinks,
    Fault::SlowLinks,
    Fault::RedisRestart,
    Fault::BrokerUnreachable,
    Fault::Api429Storm,
    Fault::Api5xxBurst,
    Fault::ApiTimeouts,
    Fault::ApiTruncatedBodies,
    Fault::ApiExpiredCursors,
];

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::CrashAfterFetch => "worker crash after the fetch (failpoint)",
            Fault::CrashAfterPrefetch => {
                "worker crash after fetching the next page ahead, before the page before it is committed (failpoint)"
            }
            Fault::CrashAfterLocalHandOn => {
                "worker crash after carrying a hot chain on to its next page, before that page's commit (failpoint)"
            }
            Fault::CrashAfterPublish => {
                "worker crash after publishing, before the commit (failpoint)"
            }
            Fault::CrashAfterCommit => {
                "worker crash after the commit, before the next task (failpoint)"
            }
            Fault::CrashBeforeAck => "worker crash before the ack (failpoint)",
            Fault::KillWorker => "SIGKILL of a worker",
            Fault::FreezeWorkerPastLease => "SIGSTOP of a worker past its lease, then SIGCONT",
            Fault::ConnectionResets => {
                "connection resets to RabbitMQ, Redis and the API (3 rounds)"
            }
            Fault::StalledLinks => "links to RabbitMQ, Redis and the API stalled for 3 s",
            Fault::SlowLinks => "links throttled to 100 kB/s for 5 s",
            Fault::RedisRestart => "Redis (AOF, everysec) SIGKILLed and restarted",
            Fault::BrokerUnreachable => "RabbitMQ connections dropped and refused for 2 s",
            Fault::Api429Storm => "API: every 2nd request 429 with Retry-After: 1, for 4 s",
            Fault::Api5xxBurst => "API: every 2nd request 500, for 4 s",
            Fault::ApiTimeouts => "API: every 3rd request slower than the 2 s timeout, for 5 s",
            Fault::ApiTruncatedBodies => "API: every 3rd body cut off mid-way, for 4 s",
            Fault::ApiExpiredCursors => "API: every cursor refused as expired, for 3 s",
        }
    }
    /// The mock's fault knobs for an API fault, and how long they stay on.
    fn api_knobs(self) -> Option<(serde_json::Value, u64)> {
        let (knobs, secs) = match self {
            Fault::Api429Storm => (
                serde_json::json!({"fail_429_every": 2, "retry_after_secs": 1}),
                4,
            ),
            Fault::Api5xxBurst => (serde_json::json!({"fail_500_every": 2}), 4),
            Fault::ApiTimeouts => (serde_json::json!({"slow_every": 3, "slow_ms": 3000}), 5),
            Fault::ApiTruncatedBodies => (serde_json::json!({"truncate_every": 3}), 4),
            Fault::ApiExpiredCursors => (serde_json::json!({"cursor_ttl_secs": 0}), 3),
            _ => return None,
        };
        Some((knobs, secs))
    }

    fn failpoint(self) -> Option<&'static str> {
        match self {
            Fault::CrashAfterFetch => Some("worker::after_fetch"),
            Fault::CrashAfterPrefetch => Some("worker::after_prefetch"),
            Fault::CrashAfterLocalHandOn => Some("worker::after_local_hand_on"),
            Fault::CrashAfterPublish => Some("worker::after_publish"),
            Fault::CrashAfterCommit => Some("worker::after_commit"),
            Fault::CrashBeforeAck => Some("worker::before_ack"),
            _ => None,
        }
    }
}

/// Change-ordered, versioned feeds, two partitions each, polled every second.
fn feeds() -> String {
    let parts = r#"partitions: { param: account, values: ["a", "b"] }"#;
    format!(
        r#"  - name: tickets
    source: mock
    path: /api/v2/incremental/tickets/cursor.json
    records: /tickets
    pagination: {{ preset: zendesk_cursor, page_size: 50 }}
    key: /id
    version: /updated_at
    start: {{ param: start_time, format: unix, from: "2024-01-01T00:00:00Z" }}
    every: 1s
    {parts}
  - name: items
    source: mock
    path: /items
    pagination: {{ preset: cursor, page_size: 50 }}
    key: /id
    version: /updated_at
    start: {{ param: updated_since, format: iso8601 }}
    every: 1s
    {parts}
  - name: sync
    source: mock
    path: /sync/records
    records: /records
    pagination: {{ preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: 50 }}
    key: /id
    version: /updated_at
    start: {{ param: updated_since, format: iso8601 }}
    every: 1s
    {parts}
"#
    )
}

/// Bad input from the API (crates/mock/src/hostile.rs): each feed's first
/// page is good, the next is broken in one way.
const HOSTILE: [(&str, &str, &str); 6] = [
    (
        "loop",
        "a cursor loop (the same cursor back, more claimed)",
        "p2",
    ),
    ("huge", "a 100 MB page", "p2"),
    ("utf8", "invalid UTF-8 in the JSON", "p2"),
    (
        "types",
        "records of the wrong type (an object, not an array)",
        "p2",
    ),
    (
        "empty_more",
        "an empty page that claims more (twice with the same cursor)",
        "p3",
    ),
    (
        "empty_forever",
        "empty pages that claim more, each with a new cursor",
        "p101",
    ),
];

fn hostile_feeds() -> String {
    HOSTILE
        .iter()
        .map(|(kind, _, _)| {
            format!(
                "  - name: bad_{kind}\n    source: mock\n    path: /hostile/{kind}\n    records: /records\n    pagination: {{ cursor_param: cursor, next_cursor: /next, has_more: /has_more }}\n    key: /id\n    every: 1h\n"
            )
        })
        .collect()
}

const KEYS: [&str; 6] = [
    "tickets.a",
    "tickets.b",
    "items.a",
    "items.b",
    "sync.a",
    "sync.b",
];

/// What the workers' `commit` log lines show.
#[derive(Default, Debug)]
struct CommitAudit {
    applied: u64,
    already_applied: u64,
    fenced: u64,
    conflict: u64,
    /// Tasks of an old epoch dropped before doing anything (stale_epoch, fenced lease).
    stale_dropped: u64,
    /// A page committed twice, or a commit applied under an epoch older than one applied before.
    stale_applied: Vec<String>,
}

fn audit_commits(logs: &[std::path::PathBuf]) -> CommitAudit {
    let mut a = CommitAudit::default();
    // job -> (seq -> epoch) of the applied commits
    let mut applied: HashMap<String, BTreeMap<u64, u64>> = HashMap::new();
    for path in logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with('{')) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] == "task dropped" {
                if matches!(f["reason"].as_str(), Some("stale_epoch" | "fenced")) {
                    a.stale_dropped += 1;
                }
                continue;
            }
            if f["message"] != "commit" {
                continue;
            }
            let (Some(job), Some(epoch), Some(seq), Some(outcome)) = (
                f["job"].as_str(),
                f["epoch"].as_u64(),
                f["seq"].as_u64(),
                f["outcome"].as_str(),
            ) else {
                continue;
            };
            match outcome {
                "OK" => {
                    a.applied += 1;
                    if let Some(prev) = applied.entry(job.into()).or_default().insert(seq, epoch) {
                        a.stale_applied.push(format!(
                            "{job}: page {seq} applied twice (epochs {prev} and {epoch})"
                        ));
                    }
                }
                "ALREADY_APPLIED" => a.already_applied += 1,
                "FENCED" => a.fenced += 1,
                _ => a.conflict += 1,
            }
        }
    }
    for (job, pages) in &applied {
        let mut max_epoch = 0;
        for (seq, epoch) in pages {
            if *epoch < max_epoch {
                a.stale_applied.push(format!(
                    "{job}: page {seq} applied under epoch {epoch} after epoch {max_epoch}"
                ));
            }
            max_epoch = max_epoch.max(*epoch);
        }
    }
    a
}

struct Row {
    fault: Fault,
    injected: String,
    lasted: Duration,
    duplicates: u64,
    recovered: Duration,
}

fn all_arrived(checker: &Checker, want: &[TruthRecord]) -> bool {
    let parts = checker.by_partition();
    KEYS.iter().all(|k| {
        let got = versions(parts.get(*k).map(Vec::as_slice).unwrap_or_default());
        want.iter().all(|v| got.contains(v))
    })
}

fn missing(checker: &Checker, want: &[TruthRecord]) -> BTreeMap<String, usize> {
    let parts = checker.by_partition();
    KEYS.iter()
        .map(|k| {
            let got = versions(parts.get(*k).map(Vec::as_slice).unwrap_or_default());
            (
                k.to_string(),
                want.iter().filter(|v| !got.contains(v)).count(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The cluster and everything the faults act on.
struct Rig {
    c: Cluster,
    redis: RedisServer,
    redis_proxy: FaultProxy,
    amqp_proxy: FaultProxy,
    api_proxy: FaultProxy,
    workers: Vec<usize>,
    next_worker: usize,
}

/// Retries of the sources under test: enough to outlast every fault.
const RETRY: &str = "{ max_attempts: 30, base_delay: 200ms }";

impl Rig {
    fn links(&self) -> [&FaultProxy; 3] {
        [&self.redis_proxy, &self.amqp_proxy, &self.api_proxy]
    }

    fn add_worker(&mut self) -> usize {
        self.next_worker += 1;
        let i = self.c.worker(&format!("w{}", self.next_worker), &[]);
        self.workers.push(i);
        i
    }

    async fn faults(&self, json: serde_json::Value, hold: Duration) {
        self.c.admin("/_admin/faults", Some(json)).await;
        tokio::time::sleep(hold).await;
        self.c
            .admin("/_admin/faults", Some(serde_json::json!({})))
            .await;
    }

    /// Inject `fault`; returns what was done (for the report).
    async fn inject(&mut self, fault: Fault, rng: &mut Rng) -> String {
        let lease = Duration::from_secs(4);
        if let Some(point) = fault.failpoint() {
            // A worker armed to crash at the k-th time it reaches the point.
            let k = 1 + rng.below(4);
            self.next_worker += 1;
            let spec = format!("{point}={k}*off->return");
            let name = format!("w{}-{point}", self.next_worker);
            let i = self
                .c
                .worker_with_env(&name, &[], &[("FAILPOINTS", spec.as_str())]);
            // Keep the API changing, so the armed worker meets pages with records.
            let mut status = None;
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                status = tokio::task::block_in_place(|| {
                    self.c.procs[i].wait(Duration::from_millis(300))
                });
                if status.is_some() {
                    break;
                }
                // A hot chain's points need chains of more than one page
                // (pages of 50).
                let n = match fault {
                    Fault::CrashAfterPrefetch | Fault::CrashAfterLocalHandOn => 60,
                    _ => 2,
                };
                self.c.admin(&format!("/_admin/insert?n={n}"), None).await;
                self.c.admin("/_admin/update?n=2", None).await;
            }
            assert_eq!(
                status.and_then(|s| s.code()),
                Some(86),
                "{name} did not crash at {point} (is the binary built with the worker's failpoints, by cargo test --workspace?){}",
                self.c.logs()
            );
            return format!("crashed at hit {}", k + 1);
        }
        if let Some((knobs, secs)) = fault.api_knobs() {
            self.faults(knobs, Duration::from_secs(secs)).await;
            return format!("{secs} s");
        }
        match fault {
            Fault::KillWorker => {
                let victim = self
                    .workers
                    .remove(rng.below(self.workers.len() as u64) as usize);
                self.c.procs[victim].kill9();
                self.add_worker();
                format!("{} killed, a new worker started", self.c.procs[victim].name)
            }
            Fault::FreezeWorkerPastLease => {
                // A slow API keeps every worker in the middle of a page.
                self.c
                    .admin(
                        "/_admin/faults",
                        Some(serde_json::json!({"slow_every": 1, "slow_ms": 800})),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let victim = self.workers[rng.below(self.workers.len() as u64) as usize];
                self.c.procs[victim].signal("STOP");
                tokio::time::sleep(lease + Duration::from_secs(2)).await;
                self.c.procs[victim].signal("CONT");
                self.c
                    .admin("/_admin/faults", Some(serde_json::json!({})))
                    .await;
                format!(
                    "{} frozen {:?}",
                    self.c.procs[victim].name,
                    lease + Duration::from_secs(2)
                )
            }
            Fault::ConnectionResets => {
                for _ in 0..3 {
                    self.links().iter().for_each(|p| p.reset_all());
                    tokio::time::sleep(Duration::from_millis(700)).await;
                }
                let resets: u64 = self.links().iter().map(|p| p.counters().resets).sum();
                format!("{resets} connections reset so far")
            }
            Fault::StalledLinks => {
                self.links()
                    .iter()
                    .for_each(|p| p.stall(Duration::from_secs(3)));
                tokio::time::sleep(Duration::from_secs(3)).await;
                "3 s".into()
            }
            Fault::SlowLinks => {
                self.links().iter().for_each(|p| p.slow(Some(100_000)));
                tokio::time::sleep(Duration::from_secs(5)).await;
                self.links().iter().for_each(|p| p.slow(None));
                "5 s".into()
            }
            Fault::RedisRestart => {
                self.redis.kill9();
                tokio::time::sleep(Duration::from_secs(1)).await;
                tokio::task::block_in_place(|| self.redis.restart());
                "down about 1 s".into()
            }
            Fault::BrokerUnreachable => {
                self.amqp_proxy.refuse(true);
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.amqp_proxy.refuse(false);
                "2 s".into()
            }
            _ => unreachable!("failpoints and API faults are handled above"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_while_syncing_lose_nothing() {
    let seed: u64 = std::env::var("TIDEMARK_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000
        });
    let soak = std::env::var_os("TIDEMARK_SOAK").is_some();
    let (records, rounds, churn) = if soak {
        (20_000, 3, 40)
    } else {
        (3_000, 1, 15)
    };
    eprintln!(
        "reliability: seed {seed}, {}",
        if soak { "soak" } else { "CI" }
    );
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let started = Instant::now();

    let redis = tokio::task::block_in_place(RedisServer::start_aof);
    let mut c = Cluster::start(
        &format!("{}{}", feeds(), hostile_feeds()),
        &["--records", &records.to_string(), "--latency-ms", "5"],
    );
    let text = std::fs::read_to_string(&c.config)
        .unwrap()
        .replace("timeout: 10s", "timeout: 2s");
    std::fs::write(&c.config, text).unwrap();
    let redis_proxy = FaultProxy::start(host_port(&redis.url())).await.unwrap();
    let amqp_proxy = FaultProxy::start(host_port(&amqp_url())).await.unwrap();
    let api_proxy = FaultProxy::start(host_port(&c.mock_url)).await.unwrap();
    c.set_base_url(&api_proxy.url_for(&c.mock_url));
    c.set_retry(RETRY);
    c.redis = redis.url();
    c.env.extend([
        ("REDIS_URL".into(), redis_proxy.url_for(&redis.url())),
        ("AMQP_URL".into(), amqp_proxy.url_for(&amqp_url())),
        ("TIDEMARK_LEASE".into(), "4s".into()),
        ("TIDEMARK_QUEUE_LEASE".into(), "8s".into()),
        ("TIDEMARK_LOG_FORMAT".into(), "json".into()),
        (
            "TIDEMARK_LOG".into(),
            "info,tidemark_worker=debug,lapin=warn,tidemark_bus=warn".into(),
        ),
    ]);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms", "--leader-ttl", "3s"]);
    let mut rig = Rig {
        c,
        redis,
        redis_proxy,
        amqp_proxy,
        api_proxy,
        workers: Vec::new(),
        next_worker: 0,
    };
    for _ in 0..3 {
        rig.add_worker();
    }
    let monitor = Monitor::start(&rig.c).await;
    let first = rig.c.truth().await.records;
    assert!(
        eventually(Duration::from_secs(180), async || all_arrived(
            &checker, &first
        ))
        .await,
        "the first walk did not complete: missing {:?}{}",
        missing(&checker, &first),
        rig.c.logs()
    );

    let mut plan: Vec<Fault> = Vec::new();
    for _ in 0..rounds {
        let mut round = ALL.to_vec();
        rng.shuffle(&mut round);
        plan.extend(round);
    }
    let mut rows: Vec<Row> = Vec::new();
    for fault in plan {
        rig.c
            .admin(&format!("/_admin/insert?n={churn}"), None)
            .await;
        rig.c
            .admin(&format!("/_admin/update?n={churn}"), None)
            .await;
        let dups_before = checker.duplicate_messages();
        eprintln!("reliability: {}", fault.describe());
        let began = Instant::now();
        let injected = rig.inject(fault, &mut rng).await;
        let healed = Instant::now();
        let want = rig.c.truth().await.records;
        let ok = eventually(Duration::from_secs(120), async || {
            all_arrived(&checker, &want)
        })
        .await;
        assert!(
            ok,
            "after {}: missing {:?}{}",
            fault.describe(),
            missing(&checker, &want),
            rig.c.logs()
        );
        rows.push(Row {
            fault,
            injected,
            lasted: healed - began,
            duplicates: checker.duplicate_messages() - dups_before,
            recovered: healed.elapsed(),
        });
    }

    // Settle: one more round of changes, everything arrives, then stop looking.
    rig.c.admin("/_admin/insert?n=5", None).await;
    let truth = rig.c.truth().await;
    let settled = eventually(Duration::from_secs(60), async || {
        all_arrived(&checker, &truth.records)
    })
    .await;
    let watch = monitor.finish().await;
    let regressions: Vec<String> = watch
        .regressions
        .iter()
        .map(|g| format!("{}: {}", g.job, g.what))
        .collect();
    let samples = watch.samples;
    let logs: Vec<std::path::PathBuf> = rig
        .c
        .procs
        .iter()
        .filter(|p| p.name.starts_with('w'))
        .map(|p| p.log.clone())
        .collect();
    let audit = audit_commits(&logs);

    // Bad input: each job failed with a clear error, its cursor on the last good page.
    let jobs = rig.c.jobs().await;
    let mut bad_input = Vec::new();
    for (kind, what, keep) in HOSTILE {
        let (_, cp) = jobs
            .iter()
            .find(|(j, _)| j.feed == format!("bad_{kind}"))
            .expect("hostile job");
        bad_input.push((
            what,
            keep,
            cp.phase.as_str().to_string(),
            cp.cursor.clone().unwrap_or_default(),
            cp.last_error.clone().unwrap_or_default(),
        ));
    }
    let lost: usize = missing(&checker, &truth.records).values().sum();
    let delivered: HashSet<(String, TruthRecord)> = checker
        .arrived()
        .iter()
        .map(|a| {
            (
                a.routing_key.clone(),
                TruthRecord {
                    id: a.id.clone(),
                    updated_at: a.updated_at.clone(),
                },
            )
        })
        .collect();
    let report = render(&Summary {
        seed,
        soak,
        rounds,
        source_records: truth.records.len(),
        source_versions: truth.versions.len(),
        delivered: delivered.len(),
        messages: checker.count(),
        lost,
        duplicates: checker.duplicate_messages(),
        regressions: &regressions,
        samples,
        audit: &audit,
        rows: &rows,
        bad_input: &bad_input,
        took: started.elapsed(),
    });
    eprintln!("{report}");
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reliability.md");
    std::fs::write(&out, &report).unwrap();
    if let Ok(path) = std::env::var("TIDEMARK_RELIABILITY_OUT") {
        // Replace what follows the marker (the last run), keeping the text above it.
        const MARK: &str = "<!-- last run: written by the reliability suite -->";
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let head = match old.find(MARK) {
            Some(i) => old[..i].to_string(),
            None => old,
        };
        std::fs::write(&path, format!("{head}{MARK}\n\n{report}")).unwrap();
    }

    assert!(
        settled,
        "not everything arrived at the end: {:?}",
        missing(&checker, &truth.records)
    );
    assert_eq!(lost, 0, "records lost");
    assert!(
        regressions.is_empty(),
        "cursor regressions: {regressions:?}"
    );
    assert!(samples > 50, "the monitor barely ran ({samples} samples)");
    assert!(
        watch.epoch_violations.is_empty(),
        "new epochs not above every earlier one: {:?}",
        watch.epoch_violations
    );
    assert!(audit.stale_applied.is_empty(), "{:?}", audit.stale_applied);
    assert!(
        audit.applied > 100,
        "too few commits seen in the logs: {audit:?}"
    );
    for (what, keep, phase, cursor, error) in &bad_input {
        assert_eq!(phase, "failed", "{what}: {error}");
        assert_eq!(
            cursor, keep,
            "{what}: the cursor is not on the last good page"
        );
        assert!(
            !error.is_empty() && !error.contains("panicked"),
            "{what}: {error}"
        );
    }
    assert!(
        audit.fenced + audit.stale_dropped > 0,
        "the frozen worker's work was not fenced: {audit:?}"
    );
}

struct Summary<'a> {
    seed: u64,
    soak: bool,
    rounds: usize,
    source_records: usize,
    source_versions: usize,
    delivered: usize,
    messages: usize,
    lost: usize,
    duplicates: u64,
    regressions: &'a [String],
    samples: u64,
    audit: &'a CommitAudit,
    rows: &'a [Row],
    /// (what, expected cursor, phase, cursor, last error) per hostile feed.
    bad_input: &'a [(&'a str, &'a str, String, String, String)],
    took: Duration,
}

fn render(s: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "### Run: seed {}, {} ({} round{} of {} faults), {:.0} s\n\n",
        s.seed,
        if s.soak { "soak" } else { "CI configuration" },
        s.rounds,
        if s.rounds == 1 { "" } else { "s" },
        ALL.len(),
        s.took.as_secs_f64()
    ));
    out.push_str("| measure | value |\n|---|---|\n");
    for (k, v) in [
        ("feeds × partitions (routing keys)", KEYS.len().to_string()),
        (
            "records in the source (current versions, per routing key)",
            s.source_records.to_string(),
        ),
        (
            "record versions the source ever held",
            s.source_versions.to_string(),
        ),
        (
            "distinct record versions delivered (all routing keys)",
            s.delivered.to_string(),
        ),
        ("messages delivered", s.messages.to_string()),
        (
            "**lost** (current versions missing downstream; must be 0)",
            s.lost.to_string(),
        ),
        (
            "duplicate messages (same message id again)",
            s.duplicates.to_string(),
        ),
        (
            "**cursor regressions** (seq or high-water going back; must be 0)",
            s.regressions.len().to_string(),
        ),
        ("checkpoint samples taken", s.samples.to_string()),
        ("commits applied", s.audit.applied.to_string()),
        (
            "commits answered ALREADY_APPLIED",
            s.audit.already_applied.to_string(),
        ),
        (
            "commits refused as FENCED (stale epoch)",
            s.audit.fenced.to_string(),
        ),
        ("commits refused as CONFLICT", s.audit.conflict.to_string()),
        (
            "tasks of a stale epoch dropped before any work",
            s.audit.stale_dropped.to_string(),
        ),
        (
            "**commits applied under a stale epoch** (must be 0)",
            s.audit.stale_applied.len().to_string(),
        ),
    ] {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    out.push_str(
        "\n| fault | injected | fault lasted | duplicates during it | time to recover |\n|---|---|---|---|---|\n",
    );
    for r in s.rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} s | {} | {:.1} s |\n",
            r.fault.describe(),
            r.injected,
            r.lasted.as_secs_f64(),
            r.duplicates,
            r.recovered.as_secs_f64()
        ));
    }
    out.push_str(
        "\n| bad input from the API | job | cursor kept | error on the job |\n|---|---|---|---|\n",
    );
    for (what, _, phase, cursor, error) in s.bad_input {
        let error = error.replace('|', "\\|");
        out.push_str(&format!("| {what} | {phase} | `{cursor}` | {error} |\n"));
    }
    out.push_str(
        "\n*Time to recover*: from the end of the fault until every current record version \
         (including the changes made just before it) had arrived on every routing key.\n",
    );
    out
}

/// A backlog deeper than the admission bound, and a worker SIGKILLed in the
/// middle of it. Admission holds the running chains at `--max-running`
/// while due jobs wait in the due index; the feed of one job is served
/// beside the feed of hundreds (fair across feeds); the killed worker's
/// chains are re-issued and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_beyond_the_admission_bound_survives_a_killed_worker() {
    let soak = std::env::var_os("TIDEMARK_SOAK").is_some();
    let big: usize = if soak { 2_000 } else { 240 };
    const BOUND: u64 = 8;
    const RECORDS: usize = 30;
    let values: Vec<String> = (0..big).map(|i| format!("\"{i}\"")).collect();
    let feed = |name: &str, values: &str| {
        format!(
            "  - name: {name}\n    source: mock\n    path: /jsonapi/records\n    \
             pagination: {{ preset: next_url, page_size: 10 }}\n    key: /id\n    version: /updated_at\n    \
             mode: snapshot\n    every: 24h\n    partitions: {{ param: shard, values: [{values}] }}\n"
        )
    };
    let yaml = format!(
        "{}{}",
        feed("big", &values.join(", ")),
        feed("small", "\"only\"")
    );
    let mut c = Cluster::start(
        &yaml,
        &["--records", &RECORDS.to_string(), "--latency-ms", "20"],
    );
    c.env.extend([
        ("TIDEMARK_LEASE".into(), "4s".into()),
        ("TIDEMARK_QUEUE_LEASE".into(), "8s".into()),
    ]);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with(
        "coord",
        &["--tick", "250ms", "--max-running", &BOUND.to_string()],
    );
    let victim = c.worker("w1", &["--concurrency", "4"]);
    c.worker("w2", &["--concurrency", "4"]);

    // Sample the running index the whole time: it never exceeds the bound.
    let store = c.store().await;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (store, stop, peak) = (store.clone(), stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = tidemark_state::Schedule::running(&*store).await {
                    peak.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let total = (big + 1) * RECORDS;
    let distinct = |checker: &Checker| {
        checker
            .arrived()
            .iter()
            .map(|a| a.message_id.clone())
            .collect::<HashSet<_>>()
            .len()
    };
    assert!(
        eventually(Duration::from_secs(120), async || distinct(&checker)
            >= total / 4)
        .await,
        "a quarter of the records did not arrive{}",
        c.logs()
    );
    // The backlog: more jobs are due than may run.
    let waiting = tidemark_state::Schedule::due_jobs(
        &*store,
        &[("big".into(), big)],
        tidemark_core::clock::now_ms(),
    )
    .await
    .unwrap()
    .len();
    assert!(
        waiting as u64 > BOUND,
        "only {waiting} jobs wait: the backlog is not deeper than the bound"
    );
    let small_done = checker
        .arrived()
        .iter()
        .filter(|a| a.routing_key.starts_with("small."))
        .map(|a| a.message_id.clone())
        .collect::<HashSet<_>>()
        .len();
    c.procs[victim].kill9();
    c.worker("w3", &["--concurrency", "4"]);
    eprintln!("backlog: {waiting} jobs due beyond {BOUND} running; w1 SIGKILLed, w3 started");

    assert!(
        eventually(Duration::from_secs(240), async || distinct(&checker)
            >= total)
        .await,
        "{} of {total} records arrived after the kill{}",
        distinct(&checker),
        c.logs()
    );
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak <= BOUND,
        "{peak} chains ran at once, beyond --max-running {BOUND}"
    );
    assert!(
        peak >= BOUND / 2,
        "only {peak} chains ever ran: admission was not the limit"
    );
    assert_eq!(
        small_done, RECORDS,
        "the one-job feed waited behind the {big}-job feed (fairness across feeds)"
    );
    eprintln!(
        "backlog: all {total} records arrived, peak {peak} running, {} duplicates after the kill",
        checker.duplicate_messages()
    );
}

/// Tenants added while a worker is killed and the broker link is reset.
/// 30 tenants sync (slow pages, so chains are mid-way); then, at once, the
/// tenants file gains 20 tenants, a worker is SIGKILLed and every
/// connection to RabbitMQ (coordinator's and workers') is reset, twice.
/// Every record version of all 50 tenants arrives, under its own tenant's
/// routing key; a version that arrived twice came with the same message id
/// both times (a redelivery, never a second identity); no job failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_added_while_a_worker_is_killed_and_the_broker_link_is_reset() {
    const RECORDS: usize = 60;
    let started = Instant::now();
    let tenant = |i: usize| format!("r{i:03}");
    let key = |t: &str| format!("tickets.{t}.all");
    let first: Vec<String> = (0..30).map(tenant).collect();
    let all: Vec<String> = (0..50).map(tenant).collect();
    let feed = tidemark_tests::TENANT_FEED;
    let mut c = Cluster::start_tenanted(
        feed,
        &[
            "--tenant-records",
            &RECORDS.to_string(),
            "--latency-ms",
            "100",
        ],
        &first,
        "",
    );
    c.set_retry(RETRY);
    let amqp_proxy = FaultProxy::start(host_port(&amqp_url())).await.unwrap();
    c.env.extend([
        ("AMQP_URL".into(), amqp_proxy.url_for(&amqp_url())),
        ("TIDEMARK_LEASE".into(), "4s".into()),
        ("TIDEMARK_QUEUE_LEASE".into(), "8s".into()),
    ]);
    let checker = Checker::start(&c.exchange()).await;
    c.coordinator_with("coord", &["--tick", "250ms"]);
    let victim = c.worker("w1", &["--concurrency", "4"]);
    c.worker("w2", &["--concurrency", "4"]);

    assert!(
        checker
            .wait_for(first.len() * RECORDS / 4, Duration::from_secs(60))
            .await,
        "a quarter of the first records did not arrive ({}){}",
        checker.count(),
        c.logs()
    );
    let before_fault = checker.count();
    c.procs[victim].kill9();
    amqp_proxy.reset_all();
    c.write_tenants(&all);
    tokio::time::sleep(Duration::from_millis(700)).await;
    amqp_proxy.reset_all();
    c.worker("w3", &["--concurrency", "4"]);
    // More versions for some tenants, old and new, after the fault.
    for t in [&all[0], &all[29], &all[30], &all[49]] {
        c.admin_tenant(t, "insert?n=3").await;
        c.admin_tenant(t, "update?n=2").await;
    }
    eprintln!(
        "tenants under faults: w1 SIGKILLed, {} broker links reset, 20 tenants added, after {before_fault} records",
        amqp_proxy.counters().resets
    );

    let mut want = BTreeMap::new();
    let mut truths = BTreeMap::new();
    for t in &all {
        let truth = c.tenant_truth(t).await;
        want.insert(key(t), truth.records.clone());
        truths.insert(key(t), truth);
    }
    assert!(
        eventually(Duration::from_secs(120), async || missing_by_key(
            &checker, &want
        )
        .is_empty())
        .await,
        "lost: {:?}{}",
        missing_by_key(&checker, &want),
        c.logs()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Nothing foreign, nothing under another tenant's key.
    let parts = checker.by_partition();
    let keys: HashSet<String> = all.iter().map(|t| key(t)).collect();
    let strays: Vec<&String> = parts.keys().filter(|k| !keys.contains(*k)).collect();
    assert!(strays.is_empty(), "unexpected routing keys: {strays:?}");
    for (k, recs) in &parts {
        let known: HashSet<TruthRecord> = truths[k].versions.iter().cloned().collect();
        let foreign: Vec<_> = versions(recs).difference(&known).cloned().collect();
        assert!(
            foreign.is_empty(),
            "{k}: versions the source never had: {foreign:?}"
        );
        for a in recs {
            assert_eq!(
                Some(&key(a.record_tenant.as_deref().unwrap_or_default())),
                Some(k),
                "{a:?}"
            );
        }
    }
    // A repeat is a redelivery: one message id per record version.
    let mut ids: HashMap<(String, String, String), HashSet<String>> = HashMap::new();
    for a in checker.arrived() {
        ids.entry((a.routing_key.clone(), a.id.clone(), a.updated_at.clone()))
            .or_default()
            .insert(a.message_id.clone());
    }
    let two_ids: Vec<_> = ids.iter().filter(|(_, m)| m.len() > 1).collect();
    assert!(
        two_ids.is_empty(),
        "record versions delivered under two message ids: {two_ids:?}"
    );
    // Every job of the 50 tenants exists and none failed.
    let jobs = c.jobs().await;
    assert_eq!(
        jobs.len(),
        all.len(),
        "{:?}",
        jobs.iter().map(|(j, _)| j.to_string()).collect::<Vec<_>>()
    );
    let failed: Vec<String> = jobs
        .iter()
        .filter(|(_, cp)| cp.phase == tidemark_core::checkpoint::Phase::Failed)
        .map(|(j, cp)| format!("{j}: {:?}", cp.last_error))
        .collect();
    assert!(failed.is_empty(), "failed jobs: {failed:?}");
    assert!(amqp_proxy.counters().resets > 0, "no broker link was reset");
    eprintln!(
        "tenants under faults: all {} tenants' records arrived, {} messages, {} duplicates (same message id), {:?}",
        all.len(),
        checker.count(),
        checker.duplicate_messages(),
        started.elapsed()
    );
}
