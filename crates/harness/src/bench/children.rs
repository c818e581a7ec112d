//! The `children` scenario of `tidemark bench e2e`: parent -> child feeds.
//!
//! One parent feed, `tickets` (the mock's Zendesk-style incremental
//! tickets, `--children-parents` of them, by default 100,000), and one child
//! feed, `ticket_comments` (`/api/v2/tickets/{ticket_id}/comments`, a
//! snapshot walk of one ticket's comments), against a mock that gives every
//! ticket exactly `--children-per-parent` comments in pages of
//! `--children-page-size` (10 in pages of 5: two child pages per parent).
//! Every parent record makes one child job, so the run has as many child
//! jobs ("children") as parents.
//!
//! The run ends when every parent record and every child record has arrived
//! downstream. Besides the usual figures it reads what only this scenario
//! needs:
//!
//! - children/s and child records/s, from the mock's first data request to
//!   the last child record downstream;
//! - the coordinator's CPU (`/proc/<pid>/stat`, user + system, from its
//!   start to the last record) per child;
//! - the Redis memory the child jobs take, two ways, once every chain has
//!   ended: `used_memory` (INFO memory) after the run minus before the
//!   coordinator started, per child; and the sum of `MEMORY USAGE … SAMPLES
//!   0` over every key of the run's prefix, split into the child feed's job
//!   hashes, the child feed's index zsets and the rest (the parent's job and
//!   indexes, the registry, …), per child. The first is what the server
//!   grew by (allocator overhead included, but also whatever anything else
//!   did to the shared Redis meanwhile); the second is what the run's own
//!   keys hold, whoever else uses the server;
//! - duplicates and missing records: the sink keeps every message id and,
//!   per parent (the child's routing key `ticket_comments.<parent key>`),
//!   how many distinct child records arrived; at the end every parent of the
//!   mock's truth must have exactly `--children-per-parent` and no message
//!   may have come twice;
//! - child page requests the mock served against the pages the children
//!   need, and children fetched more than once (a child re-run although its
//!   parent did not change).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tidemark_bus::amqp::SubscribeOptions;
use tidemark_bus::subscriber::Subscription;

use super::e2e::{self, Deployment, E2eBench, opt};
use super::prom::{Buckets, Scrape};
use super::scale;
use super::sink::unix_ms;
use crate::HarnessError;
use crate::proc::{Proc, Spawn, tail};

/// The parent feed.
const PARENT: &str = "tickets";
/// The child feed.
const CHILD: &str = "ticket_comments";

/// One run of the children scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ChildrenRun {
    pub label: String,
    /// Parent records (tickets), so child jobs.
    pub parents: usize,
    /// Child records of each parent, and the child page size.
    pub per_parent: usize,
    pub page_size: usize,
    pub parent_page_size: usize,
    pub workers: usize,
    pub concurrency: usize,
    /// Child jobs in the child feed's `jobs` index at the end (one per
    /// parent expected), and in its `failed` index.
    pub child_jobs: Option<u64>,
    pub child_jobs_failed: Option<u64>,
    /// Parent records downstream (distinct message ids).
    pub parent_records: u64,
    pub parent_duplicates: u64,
    /// Child records downstream: distinct message ids, every message, and
    /// the messages whose id had arrived before.
    pub child_records: u64,
    pub child_messages: u64,
    pub duplicates: u64,
    pub expected_child_records: u64,
    /// Child records the mock's truth has that did not arrive (summed over
    /// parents: `per_parent` minus the distinct records of each), and the
    /// parents short of some.
    pub missing: u64,
    pub parents_short: u64,
    /// Distinct child records beyond `per_parent` of a parent, or of a
    /// routing key that names no parent of the truth.
    pub unexpected: u64,
    /// Messages without a message id (not checked for duplicates).
    pub without_id: u64,
    /// The mock's answers to `/api/v2/tickets/{id}/comments`, the pages the
    /// children need (`ceil(per_parent / page_size)` each), and the tickets
    /// whose comments were requested more often than that.
    pub child_page_requests: u64,
    pub expected_child_page_requests: u64,
    pub children_fetched_again: u64,
    /// Child pages the workers fetched (`tidemark_pages_fetched_total` of
    /// the child feed).
    pub child_pages: u64,
    /// From the mock's first data request to the last child record, to the
    /// last parent record, and to the first child record.
    pub seconds: f64,
    pub parents_seconds: f64,
    pub first_child_seconds: Option<f64>,
    pub children_per_sec: f64,
    pub child_records_per_sec: f64,
    /// The child feed's page latency (task published to commit).
    pub child_page_latency_p50_ms: Option<f64>,
    pub child_page_latency_p99_ms: Option<f64>,
    pub worker_cpu_seconds: Option<f64>,
    pub worker_cpu_us_per_child: Option<f64>,
    pub worker_peak_rss_mib: Vec<f64>,
    pub coordinator_cpu_seconds: Option<f64>,
    pub coordinator_cpu_us_per_child: Option<f64>,
    pub coordinator_peak_rss_mib: Option<f64>,
    pub coordinator_passes: u64,
    pub coordinator_pass_p50_ms: Option<f64>,
    pub coordinator_pass_p99_ms: Option<f64>,
    pub mock_cpu_seconds: Option<f64>,
    pub redis: Option<RedisCost>,
    /// Lines of the roles' logs at WARN or ERROR, per role.
    pub log_warnings: BTreeMap<String, usize>,
}

/// The Redis memory of the run, read once every chain has ended.
#[derive(Debug, Clone, Serialize)]
pub struct RedisCost {
    /// `used_memory` before the coordinator started and after the run.
    pub used_memory_before: u64,
    pub used_memory_after: u64,
    /// (after - before) / children.
    pub used_memory_bytes_per_child: f64,
    /// Keys under the run's prefix, and `MEMORY USAGE` summed over them.
    pub keys: u64,
    pub key_bytes: u64,
    /// The child feed's job hashes (`job:ticket_comments:*`).
    pub child_job_hashes: u64,
    pub child_job_hash_bytes: u64,
    /// The child feed's index zsets (`feed:ticket_comments:*`), in all and
    /// each: (index, bytes, members).
    pub child_index_bytes: u64,
    pub child_indexes: Vec<(String, u64, u64)>,
    /// (child job hashes + child indexes) / children.
    pub child_key_bytes_per_child: f64,
    /// Every key of the run / children.
    pub all_key_bytes_per_child: f64,
    /// The largest keys that are neither: (key without the prefix, bytes).
    pub largest_other_keys: Vec<(String, u64)>,
    /// One child job's hash, fields and value lengths (a sample).
    pub sample_child_job: BTreeMap<String, usize>,
}

/// What the sink saw, per feed.
#[derive(Default)]
struct Tally {
    parent_records: u64,
    parent_duplicates: u64,
    child_messages: u64,
    child_records: u64,
    child_duplicates: u64,
    without_id: u64,
    other: u64,
    first_child_ms: Option<f64>,
    last_child_ms: f64,
    last_parent_ms: f64,
    /// Distinct child records per parent key.
    per_parent: HashMap<String, u32>,
}

/// Counts the parent's and the child's messages on the records exchange.
struct ChildSink {
    tally: Arc<Mutex<Tally>>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn lock(t: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChildSink {
    async fn start(d: &Deployment) -> Result<Self, HarnessError> {
        let exchange = d.exchange();
        let mut sub = Subscription::start(
            &d.amqp_url,
            &exchange,
            "#",
            "tidemark-bench",
            SubscribeOptions {
                queue: None,
                no_ack: true,
                tls_ca_pem: d.tls_ca_pem.as_deref(),
            },
        )
        .await
        .map_err(|e| HarnessError::bench(format!("cannot subscribe to {exchange}: {e}")))?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let t = tally.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let child_prefix = format!("{CHILD}.");
        let parent_prefix = format!("{PARENT}.");
        let task = tokio::spawn(async move {
            let hasher = RandomState::new();
            let mut seen: HashSet<u64> = HashSet::new();
            loop {
                let m = tokio::select! {
                    _ = &mut stopped => break,
                    m = sub.next() => match m {
                        Some(Ok(m)) => m,
                        _ => break,
                    },
                };
                let now = unix_ms();
                let repeated = m
                    .message_id
                    .as_ref()
                    .map(|id| !seen.insert(hasher.hash_one(id.as_str())));
                let records = m.record_count.unwrap_or(1);
                let mut t = lock(&t);
                if repeated.is_none() {
                    t.without_id += 1;
                }
                if let Some(parent) = m.routing_key.strip_prefix(&child_prefix) {
                    t.child_messages += 1;
                    t.first_child_ms.get_or_insert(now);
                    if repeated == Some(true) {
                        t.child_duplicates += 1;
                    } else {
                        t.child_records += records;
                        t.last_child_ms = now;
                        match t.per_parent.get_mut(parent) {
                            Some(n) => *n += records as u32,
                            None => {
                                t.per_parent.insert(parent.to_string(), records as u32);
                            }
                        }
                    }
                } else if m.routing_key.starts_with(&parent_prefix) {
                    if repeated == Some(true) {
                        t.parent_duplicates += 1;
                    } else {
                        t.parent_records += records;
                        t.last_parent_ms = now;
                    }
                } else {
                    t.other += 1;
                }
            }
            sub.close().await;
        });
        Ok(ChildSink { tally, stop, task })
    }

    /// (parent records, child records) so far, distinct.
    fn counts(&self) -> (u64, u64) {
        let t = lock(&self.tally);
        (t.parent_records, t.child_records)
    }

    /// Wait until `parents` parent records and `children` child records
    /// have arrived, checking `alive` every 50 ms and saying how far it got
    /// every 10 s.
    async fn wait_for(
        &self,
        parents: u64,
        children: u64,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), HarnessError>,
    ) -> Result<(), HarnessError> {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let mut said = start;
        loop {
            let (p, c) = self.counts();
            if p >= parents && c >= children {
                return Ok(());
            }
            alive()?;
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(HarnessError::bench(format!(
                    "only {p} of {parents} parent records and {c} of {children} child records arrived within {timeout:?}"
                )));
            }
            if now - said >= Duration::from_secs(10) {
                said = now;
                eprintln!(
                    "bench: children: {c} of {children} child records, {p} of {parents} parent records after {:.0} s",
                    (now - start).as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close(self) -> Tally {
        let _ = self.stop.send(());
        let _ = self.task.await;
        Arc::try_unwrap(self.tally)
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_else(|arc| std::mem::take(&mut *lock(&arc)))
    }
}

/// The run's sizes, from the flags.
struct Plan {
    parents: usize,
    per_parent: usize,
    page_size: usize,
    parent_page_size: usize,
    workers: usize,
    concurrency: usize,
    latency_ms: u64,
}

impl Plan {
    fn from(b: &E2eBench) -> Plan {
        Plan {
            parents: b.children_parents.max(1),
            per_parent: b.children_per_parent,
            page_size: b.children_page_size.max(1),
            parent_page_size: b.children_parent_page_size.max(1),
            workers: b.children_workers.max(1),
            concurrency: b.children_concurrency.max(1),
            latency_ms: b.children_latency_ms,
        }
    }
    /// The pages one child walks (an empty first page when it has none).
    fn pages_per_child(&self) -> u64 {
        self.per_parent.div_ceil(self.page_size).max(1) as u64
    }
    fn expected_child_records(&self) -> u64 {
        (self.parents * self.per_parent) as u64
    }
    fn label(&self) -> String {
        format!(
            "children, {} parents x {} records",
            self.parents, self.per_parent
        )
    }
}

/// The feeds: the parent, then the child.
fn feeds_yaml(plan: &Plan) -> String {
    format!(
        "  - name: {PARENT}\n    source: mock\n    path: /api/v2/incremental/tickets/cursor.json\n    \
         records: /tickets\n    pagination: {{ preset: zendesk_cursor, page_size: {} }}\n    \
         key: /id\n    version: /updated_at\n    \
         start: {{ param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }}\n    every: 24h\n\
         \x20 - name: {CHILD}\n    source: mock\n    \
         parent: {{ feed: {PARENT}, vars: {{ ticket_id: /id }} }}\n    \
         path: /api/v2/tickets/{{ticket_id}}/comments\n    params: {{ \"page[size]\": \"{}\" }}\n    \
         records: /comments\n    pagination: {{ next_url: /links/next }}\n    \
         key: /id\n    version: /updated_at\n    mode: snapshot\n",
        plan.parent_page_size, plan.page_size
    )
}

/// Run the scenario: start, wait for every record, measure, tear down (the
/// run's keys, queues and exchange go also when it fails).
pub(super) async fn run(b: &E2eBench, exe: &Path) -> Result<ChildrenRun, HarnessError> {
    let plan = Plan::from(b);
    let dir = tempfile::Builder::new()
        .prefix("tidemark-bench-")
        .tempdir()
        .map_err(|e| HarnessError::bench(e.to_string()))?;
    let d = Deployment::new(b)?;
    eprintln!(
        "bench: {}: {} child jobs, {} child records expected, {} worker(s) x {} ...",
        plan.label(),
        plan.parents,
        plan.expected_child_records(),
        plan.workers,
        plan.concurrency
    );
    let result = run_in(b, exe, &plan, &d, dir.path()).await;
    d.cleanup().await;
    match &result {
        Err(_) => {
            let kept = dir.keep();
            eprintln!("bench: logs of the failed run are in {}", kept.display());
        }
        // Keep the logs of a run whose roles warned, too.
        Ok(r) if r.log_warnings.values().any(|&n| n > 0) => {
            let kept = dir.keep();
            eprintln!("bench: the roles' logs are in {}", kept.display());
        }
        Ok(_) => {}
    }
    result
}

async fn start_mock(
    b: &E2eBench,
    exe: &Path,
    dir: &Path,
    plan: &Plan,
) -> Result<Proc, HarnessError> {
    let args: Vec<String> = [
        "mock-api".to_string(),
        "--port".into(),
        "0".into(),
        "--records".into(),
        plan.parents.to_string(),
        "--page-size".into(),
        plan.parent_page_size.to_string(),
        "--record-bytes".into(),
        b.record_bytes.to_string(),
        "--latency-ms".into(),
        plan.latency_ms.to_string(),
        "--comments-per-ticket".into(),
        plan.per_parent.to_string(),
        "--comments-page-size".into(),
        plan.page_size.to_string(),
    ]
    .into();
    e2e::start(
        Spawn::new(exe, "mock", dir)
            .args(&args)
            .ready("listening on"),
    )
    .await
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<serde_json::Value, HarnessError> {
    let body = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| HarnessError::bench(format!("{url}: {e}")))?
        .bytes()
        .await
        .map_err(|e| HarnessError::bench(format!("{url}: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| HarnessError::bench(format!("{url}: {e}")))
}

/// A role's `/metrics`, only the child feed's series.
async fn child_metrics(client: &reqwest::Client, role: &Proc) -> Result<Scrape, HarnessError> {
    let url = format!("{}/metrics", role.url()?);
    let text = client
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| HarnessError::bench(format!("{} /metrics: {e}", role.name)))?
        .text()
        .await
        .map_err(|e| HarnessError::bench(format!("{} /metrics: {e}", role.name)))?;
    let label = format!("feed=\"{CHILD}\"");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&label)).collect();
    Ok(Scrape::new(lines.join("\n")))
}

/// Lines at WARN or ERROR in a role's log.
fn warnings(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count()
}

async fn run_in(
    b: &E2eBench,
    exe: &Path,
    plan: &Plan,
    d: &Deployment,
    dir: &Path,
) -> Result<ChildrenRun, HarnessError> {
    let mut mock = start_mock(b, exe, dir, plan).await?;
    let config = dir.join("feeds.yaml");
    std::fs::write(
        &config,
        format!(
            "sources:\n  mock:\n    base_url: {}\n    timeout: 30s\n\nfeeds:\n{}",
            mock.url()?,
            feeds_yaml(plan)
        ),
    )
    .map_err(|e| HarnessError::bench(e.to_string()))?;
    let sink = ChildSink::start(d).await?;
    let env = d.env();
    let mut workers = Vec::new();
    for i in 0..plan.workers {
        let args = vec![
            "worker".to_string(),
            "--concurrency".into(),
            plan.concurrency.to_string(),
        ];
        let wrapper: Vec<String> = b
            .worker_wrapper
            .iter()
            .flat_map(|w| w.split_whitespace())
            .map(|w| {
                w.replace("{i}", &i.to_string())
                    .replace("{run}", &e2e::slug(&plan.label()))
            })
            .collect();
        let worker = Spawn::new(exe, &format!("worker-{i}"), dir)
            .wrapper(wrapper)
            .args(&args)
            .envs(&env)
            .ready("metrics on");
        workers.push(e2e::start(worker).await?);
    }
    let worker_cpu_before: Option<Duration> = workers.iter().map(Proc::cpu).sum();
    let memory_before = scale::redis_used_memory(&d.redis_url, d.tls_ca_pem.as_deref()).await?;
    let coordinator = Spawn::new(exe, "coordinator", dir)
        .args(&[
            "coordinator".to_string(),
            "--config".into(),
            config.display().to_string(),
            "--id".into(),
            "bench-coordinator".into(),
        ])
        .envs(&env)
        .ready("metrics on");
    let mut coordinator = e2e::start(coordinator).await?;
    let coordinator_cpu_before = coordinator.cpu();

    let arrived = sink
        .wait_for(
            plan.parents as u64,
            plan.expected_child_records(),
            b.timeout.std(),
            || {
                mock.check_alive()?;
                coordinator.check_alive()?;
                workers.iter_mut().try_for_each(Proc::check_alive)
            },
        )
        .await;
    if let Err(e) = arrived {
        let t = sink.close().await;
        eprintln!(
            "bench: children: {} distinct child records from {} parents, {} duplicates, {} parent records",
            t.child_records,
            t.per_parent.len(),
            t.child_duplicates,
            t.parent_records
        );
        return Err(e2e::with_logs(e, &plan.label(), &workers, &coordinator));
    }
    // Every record has arrived; the last commits follow within a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let coordinator_cpu_after = coordinator.cpu();
    let worker_cpu_after: Option<Duration> = workers.iter().map(Proc::cpu).sum();

    let client = reqwest::Client::new();
    // Redis once every chain has ended (within a minute).
    let settled = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = e2e::scrape(&client, &coordinator).await?;
        if s.sum("tidemark_chains_running") == 0.0 || std::time::Instant::now() > settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let redis = match redis_cost(d, plan.parents, memory_before).await {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("bench: children: cannot read Redis's memory: {e}");
            None
        }
    };
    let (child_jobs, child_jobs_failed) = match child_counts(d).await {
        Ok((j, f)) => (Some(j), Some(f)),
        Err(e) => {
            eprintln!("bench: children: cannot count the child jobs: {e}");
            (None, None)
        }
    };

    let (mut latency, mut child_pages) = (Buckets::default(), 0.0);
    for w in &workers {
        let s = child_metrics(&client, w).await?;
        latency.merge(&s.buckets("tidemark_page_latency_seconds"));
        child_pages += s.sum("tidemark_pages_fetched_total");
    }
    let passes = e2e::scrape(&client, &coordinator)
        .await?
        .buckets("tidemark_coordinator_pass_seconds");
    let mock_url = mock.url()?.to_string();
    let stats = get_json(&client, &format!("{mock_url}/_stats")).await?;
    let first_ms = stats["first_request_ms"]
        .as_f64()
        .ok_or_else(|| HarnessError::bench("the mock saw no request"))?;
    let child_page_requests = stats["comment_requests"].as_u64().unwrap_or(0);
    let pages_per_child = plan.pages_per_child();
    let children_fetched_again = stats["comment_requests_by_ticket"]
        .as_object()
        .map_or(0, |m| {
            m.values()
                .filter(|n| n.as_u64().unwrap_or(0) > pages_per_child)
                .count() as u64
        });
    let truth = get_json(&client, &format!("{mock_url}/_truth")).await?;
    let parent_ids: Vec<String> = truth["records"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|x| x["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mock_cpu = mock.cpu().map(|c| c.as_secs_f64());
    let coordinator_peak_rss_mib = coordinator.peak_rss_bytes().map(|b| b as f64 / 1048576.0);
    let worker_peak_rss_mib = workers
        .iter()
        .filter_map(Proc::peak_rss_bytes)
        .map(|b| b as f64 / 1048576.0)
        .collect();

    // A duplicate would come within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut t = sink.close().await;
    let mut log_warnings = BTreeMap::new();
    for r in workers.iter().chain([&coordinator, &mock]) {
        let n = warnings(&r.log);
        if n > 0 {
            eprintln!(
                "bench: children: {} logged {n} warning/error line(s); the last:\n{}",
                r.name,
                tail(&r.log, 10)
            );
        }
        log_warnings.insert(r.name.clone(), n);
    }
    let grace = Duration::from_secs(30);
    e2e::stop(workers, grace).await;
    e2e::stop(vec![coordinator, mock], grace).await;

    // Missing: per parent of the truth, what fell short of per_parent.
    let per = plan.per_parent as u64;
    let (mut missing, mut parents_short, mut unexpected) = (0u64, 0u64, 0u64);
    for id in &parent_ids {
        let got = t.per_parent.remove(id).map_or(0, u64::from);
        if got < per {
            missing += per - got;
            parents_short += 1;
        } else {
            unexpected += got - per;
        }
    }
    // What is left is of no parent of the truth.
    unexpected += t.per_parent.values().map(|&n| u64::from(n)).sum::<u64>();
    if parent_ids.len() != plan.parents {
        eprintln!(
            "bench: children: the mock's truth has {} tickets, {} expected",
            parent_ids.len(),
            plan.parents
        );
    }
    if t.other > 0 {
        eprintln!(
            "bench: children: {} message(s) of neither feed arrived",
            t.other
        );
    }

    let seconds = ((t.last_child_ms - first_ms) / 1000.0).max(1e-3);
    let worker_cpu = worker_cpu_after
        .zip(worker_cpu_before)
        .map(|(a, b)| a.saturating_sub(b).as_secs_f64());
    let coordinator_cpu = coordinator_cpu_after
        .zip(coordinator_cpu_before)
        .map(|(a, b)| a.saturating_sub(b).as_secs_f64());
    let children = plan.parents as f64;
    Ok(ChildrenRun {
        label: plan.label(),
        parents: plan.parents,
        per_parent: plan.per_parent,
        page_size: plan.page_size,
        parent_page_size: plan.parent_page_size,
        workers: plan.workers,
        concurrency: plan.concurrency,
        child_jobs,
        child_jobs_failed,
        parent_records: t.parent_records,
        parent_duplicates: t.parent_duplicates,
        child_records: t.child_records,
        child_messages: t.child_messages,
        duplicates: t.child_duplicates,
        expected_child_records: plan.expected_child_records(),
        missing,
        parents_short,
        unexpected,
        without_id: t.without_id,
        child_page_requests,
        expected_child_page_requests: plan.parents as u64 * pages_per_child,
        children_fetched_again,
        child_pages: child_pages as u64,
        seconds,
        parents_seconds: ((t.last_parent_ms - first_ms) / 1000.0).max(0.0),
        first_child_seconds: t.first_child_ms.map(|f| (f - first_ms) / 1000.0),
        children_per_sec: children / seconds,
        child_records_per_sec: t.child_records as f64 / seconds,
        child_page_latency_p50_ms: e2e::ms(latency.quantile(0.5)),
        child_page_latency_p99_ms: e2e::ms(latency.quantile(0.99)),
        worker_cpu_seconds: worker_cpu,
        worker_cpu_us_per_child: worker_cpu.map(|c| c * 1e6 / children),
        worker_peak_rss_mib,
        coordinator_cpu_seconds: coordinator_cpu,
        coordinator_cpu_us_per_child: coordinator_cpu.map(|c| c * 1e6 / children),
        coordinator_peak_rss_mib,
        coordinator_passes: passes.count() as u64,
        coordinator_pass_p50_ms: e2e::ms(passes.quantile(0.5)),
        coordinator_pass_p99_ms: e2e::ms(passes.quantile(0.99)),
        mock_cpu_seconds: mock_cpu,
        redis,
        log_warnings,
    })
}

async fn connect(d: &Deployment) -> Result<redis::aio::MultiplexedConnection, HarnessError> {
    tidemark_state::redis_client(&d.redis_url, d.tls_ca_pem.as_deref())
        .map_err(|e| HarnessError::bench(format!("redis: {e}")))?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| HarnessError::bench(format!("redis: {e}")))
}

fn redis_err(e: redis::RedisError) -> HarnessError {
    HarnessError::bench(format!("redis: {e}"))
}

/// The child feed's jobs, and its failed ones, by its index zsets.
async fn child_counts(d: &Deployment) -> Result<(u64, u64), HarnessError> {
    let mut c = connect(d).await?;
    let p = format!("{}:", d.prefix);
    redis::pipe()
        .cmd("ZCARD")
        .arg(format!("{p}feed:{CHILD}:jobs"))
        .cmd("ZCARD")
        .arg(format!("{p}feed:{CHILD}:failed"))
        .query_async(&mut c)
        .await
        .map_err(redis_err)
}

/// Redis memory of the run: `used_memory` after minus `before`, and
/// `MEMORY USAGE` of every key of the run's prefix, per child.
async fn redis_cost(
    d: &Deployment,
    children: usize,
    before: u64,
) -> Result<RedisCost, HarnessError> {
    let after = scale::redis_used_memory(&d.redis_url, d.tls_ca_pem.as_deref()).await?;
    let mut c = connect(d).await?;
    let prefix = format!("{}:", d.prefix);
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let job_prefix = format!("{prefix}job:{CHILD}:");
    let index_prefix = format!("{prefix}feed:{CHILD}:");
    let (mut key_bytes, mut hashes, mut hash_bytes, mut index_bytes) = (0u64, 0u64, 0u64, 0u64);
    let mut others: Vec<(String, u64)> = Vec::new();
    let mut sample: Option<String> = None;
    let mut indexes: Vec<(String, u64, u64)> = Vec::new();
    for chunk in keys.chunks(500) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(&mut c).await.map_err(redis_err)?;
        for (k, n) in chunk.iter().zip(sizes) {
            let n = n.unwrap_or(0);
            key_bytes += n;
            if k.starts_with(&job_prefix) {
                hashes += 1;
                hash_bytes += n;
                sample.get_or_insert_with(|| k.clone());
            } else if let Some(index) = k.strip_prefix(&index_prefix) {
                index_bytes += n;
                indexes.push((index.to_string(), n, 0));
            } else {
                others.push((k[prefix.len()..].to_string(), n));
            }
        }
    }
    for (index, _, members) in &mut indexes {
        let n: Option<u64> = redis::cmd("ZCARD")
            .arg(format!("{index_prefix}{index}"))
            .query_async(&mut c)
            .await
            .ok();
        *members = n.unwrap_or(0);
    }
    indexes.sort();
    others.sort_by_key(|o| std::cmp::Reverse(o.1));
    others.truncate(8);
    let sample_child_job = match &sample {
        Some(k) => {
            let h: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(k)
                .query_async(&mut c)
                .await
                .map_err(redis_err)?;
            h.into_iter().map(|(f, v)| (f, v.len())).collect()
        }
        None => BTreeMap::new(),
    };
    let n = children.max(1) as f64;
    Ok(RedisCost {
        used_memory_before: before,
        used_memory_after: after,
        used_memory_bytes_per_child: after.saturating_sub(before) as f64 / n,
        keys: keys.len() as u64,
        key_bytes,
        child_job_hashes: hashes,
        child_job_hash_bytes: hash_bytes,
        child_index_bytes: index_bytes,
        child_indexes: indexes,
        child_key_bytes_per_child: (hash_bytes + index_bytes) as f64 / n,
        all_key_bytes_per_child: key_bytes as f64 / n,
        largest_other_keys: others,
        sample_child_job,
    })
}

/// The children runs as a table, and a paragraph each.
pub(super) fn render(runs: &[ChildrenRun]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| children | parents x child records (pages of) | workers x concurrency | seconds | children/s | child records/s | coordinator CPU µs/child | worker CPU µs/child | Redis B/child (used_memory; keys) | child page latency p50 / p99 ms | duplicates | missing |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for x in runs {
        let redis = x.redis.as_ref().map_or_else(
            || "-".to_string(),
            |r| {
                format!(
                    "{:.0}; {:.0}",
                    r.used_memory_bytes_per_child, r.child_key_bytes_per_child
                )
            },
        );
        s.push_str(&format!(
            "| {} | {} x {} ({}) | {} x {} | {:.1} | {:.0} | {:.0} | {} | {} | {} | {} / {} | {} | {} |\n",
            x.label,
            x.parents,
            x.per_parent,
            x.page_size,
            x.workers,
            x.concurrency,
            x.seconds,
            x.children_per_sec,
            x.child_records_per_sec,
            opt(x.coordinator_cpu_us_per_child, 0),
            opt(x.worker_cpu_us_per_child, 0),
            redis,
            opt(x.child_page_latency_p50_ms, 0),
            opt(x.child_page_latency_p99_ms, 0),
            x.duplicates,
            x.missing,
        ));
    }
    for x in runs {
        let rss: Vec<String> = x
            .worker_peak_rss_mib
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect();
        s.push_str(&format!(
            "\n{}: parents in at {:.1} s, first child record at {} s, last at {:.1} s; {} child jobs ({} failed); {} child records ({} messages, {} duplicates, {} missing, {} parents short, {} unexpected); {} parent records ({} duplicates); child page requests {} for {} pages needed ({} children fetched more than once), {} child pages fetched by the workers\n",
            x.label,
            x.parents_seconds,
            opt(x.first_child_seconds, 1),
            x.seconds,
            x.child_jobs.map_or_else(|| "-".into(), |n| n.to_string()),
            x.child_jobs_failed.map_or_else(|| "-".into(), |n| n.to_string()),
            x.child_records,
            x.child_messages,
            x.duplicates,
            x.missing,
            x.parents_short,
            x.unexpected,
            x.parent_records,
            x.parent_duplicates,
            x.child_page_requests,
            x.expected_child_page_requests,
            x.children_fetched_again,
            x.child_pages,
        ));
        s.push_str(&format!(
            "coordinator: CPU {} s ({} µs per child), peak RSS {} MiB, {} passes, pass p50 / p99 {} / {} ms; workers: CPU {} s ({} µs per child), peak RSS {} MiB; mock CPU {} s\n",
            opt(x.coordinator_cpu_seconds, 2),
            opt(x.coordinator_cpu_us_per_child, 1),
            opt(x.coordinator_peak_rss_mib, 0),
            x.coordinator_passes,
            opt(x.coordinator_pass_p50_ms, 1),
            opt(x.coordinator_pass_p99_ms, 1),
            opt(x.worker_cpu_seconds, 2),
            opt(x.worker_cpu_us_per_child, 1),
            rss.join(", "),
            opt(x.mock_cpu_seconds, 2),
        ));
        if let Some(r) = &x.redis {
            let others: Vec<String> = r
                .largest_other_keys
                .iter()
                .map(|(k, n)| format!("{k} {n} B"))
                .collect();
            let indexes: Vec<String> = r
                .child_indexes
                .iter()
                .map(|(i, n, m)| format!("{i} {n} B ({m} members)"))
                .collect();
            let fields: Vec<String> = r
                .sample_child_job
                .iter()
                .map(|(f, n)| format!("{f} ({n} B)"))
                .collect();
            s.push_str(&format!(
                "Redis: used_memory {} -> {} B ({:.0} B per child); the run's {} keys hold {} B ({:.0} B per child): {} child job hashes {} B + child indexes {} B ({}) = {:.0} B per child; largest other keys: {}; a child job's fields: {}\n",
                r.used_memory_before,
                r.used_memory_after,
                r.used_memory_bytes_per_child,
                r.keys,
                r.key_bytes,
                r.all_key_bytes_per_child,
                r.child_job_hashes,
                r.child_job_hash_bytes,
                r.child_index_bytes,
                indexes.join(", "),
                r.child_key_bytes_per_child,
                others.join(", "),
                fields.join(", "),
            ));
        }
        let warned: Vec<String> = x
            .log_warnings
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        if !warned.is_empty() {
            s.push_str(&format!(
                "log lines at WARN or ERROR: {}\n",
                warned.join(", ")
            ));
        }
    }
    s
}

/// The checks for the children runs: (target, measured, met).
pub(super) fn targets(runs: &[ChildrenRun]) -> Vec<(String, String, Option<bool>)> {
    let mut rows = Vec::new();
    for x in runs {
        rows.push((
            format!(
                "children: 0 duplicates without faults, {} parents",
                x.parents
            ),
            x.duplicates.to_string(),
            Some(x.duplicates == 0),
        ));
        rows.push((
            format!("children: 0 child records missing, {} parents", x.parents),
            x.missing.to_string(),
            Some(x.missing == 0),
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_feed_names_its_parent_and_the_pages_are_counted() {
        let plan = Plan {
            parents: 300,
            per_parent: 10,
            page_size: 5,
            parent_page_size: 100,
            workers: 2,
            concurrency: 32,
            latency_ms: 0,
        };
        // The config's own reader takes the feeds as they are.
        let text = format!(
            "sources:\n  mock:\n    base_url: http://127.0.0.1:1\nfeeds:\n{}",
            feeds_yaml(&plan)
        );
        let config = tidemark_core::config::load_str("feeds.yaml", &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let child = config.feed(CHILD).expect("the child feed");
        let parent = child.parent.as_ref().expect("a parent");
        assert_eq!(parent.feed, PARENT);
        assert!(parent.vars.contains_key("ticket_id"));
        assert_eq!(
            child.params.get("page[size]").map(String::as_str),
            Some("5")
        );
        assert!(config.feed(PARENT).is_some_and(|f| f.parent.is_none()));
        assert_eq!(plan.pages_per_child(), 2);
        assert_eq!(plan.expected_child_records(), 3000);
        let none = Plan {
            per_parent: 0,
            ..plan
        };
        assert_eq!(none.pages_per_child(), 1);
    }
}
