//! `tidemark bench e2e`: the whole distributed system on loopback.
//!
//! Every run starts, as separate processes of this binary, the mock API, one
//! coordinator and W workers against the real Redis and RabbitMQ, under a
//! throwaway key prefix, queue prefix and records exchange; a sink in this
//! process counts what arrives downstream. A run ends when every expected
//! record has arrived; then the workers' and the coordinator's `/metrics`
//! and `/proc` are read, the roles get SIGTERM, and the run's keys, queues
//! and exchange are deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::prom::{Buckets, Scrape};
use super::sink::{self, Ceiling, Sink};
use super::{children, one_chain, scale, tenants};
use crate::HarnessError;
use crate::proc::{Proc, Spawn, tail};
use crate::services::{self, Service};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// 1000-record pages, no API latency, per-record and per-page delivery,
    /// with the broker ceiling measured in the same run.
    Throughput,
    /// 200 feeds behind 100 ms of API latency, 1, 2 and 4 workers.
    ScaleOut,
    /// 2,000 small jobs: the coordinator's scheduling cost.
    ManyJobs,
    /// 2,000, 20,000 and 100,000 small jobs over many feeds: the scheduler
    /// at scale, Redis memory per job and the cost of an idle pass.
    Scale,
    /// 1,000 tenants of one source x 3 feeds (3,000 jobs) synced once, then
    /// tenants added to the tenants file one at a time: how soon a new
    /// tenant's first record arrives.
    Tenants,
    /// 100,000 parent records, each with a child job of two pages (a
    /// parent feed and a child feed): children/s, coordinator CPU and
    /// Redis memory per child, duplicates and missing child records.
    Children,
    /// One feed of one partition, 200,000 records in 1000-record pages, per
    /// page and per record, one and two workers, and the same through the
    /// task queue alone; beside `pull` on the same pages and the broker's
    /// ceiling for one page at a time.
    OneChain,
}

#[derive(clap::Args, Debug, Clone)]
pub struct E2eBench {
    /// Scenarios to run, comma-separated (default: throughput, scale-out,
    /// many-jobs and one-chain; `scale`, `tenants` and `children` run only
    /// when named).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Scenario>,
    /// Redis URL (default: REDIS_URL, else the local server).
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// RabbitMQ URL (default: AMQP_URL, else the local broker).
    #[arg(long, value_name = "URL")]
    pub amqp_url: Option<String>,
    /// PEM file of CA certificates to trust for rediss:// and amqps://
    /// (handed to the roles, which check it).
    #[arg(long, env = "TIDEMARK_TLS_CA_FILE", value_name = "PATH")]
    pub tls_ca_file: Option<PathBuf>,
    /// Approximate JSON size of one record.
    #[arg(long, default_value_t = 330)]
    pub record_bytes: usize,

    /// Throughput: jobs (partitions of one feed), each walking the dataset.
    #[arg(long, default_value_t = 64)]
    pub throughput_jobs: usize,
    /// Throughput: records in the dataset, per job, for per-record delivery.
    #[arg(long, default_value_t = 5_000)]
    pub throughput_records: usize,
    /// Throughput: records in the dataset, per job, for per-page delivery.
    #[arg(long, default_value_t = 20_000)]
    pub throughput_page_records: usize,
    #[arg(long, default_value_t = 1000)]
    pub throughput_page_size: usize,
    #[arg(long, default_value_t = 1)]
    pub throughput_workers: usize,
    #[arg(long, default_value_t = 64)]
    pub throughput_concurrency: usize,
    /// Throughput: record-sized messages the ceiling publishes (default: as
    /// many as the per-record run delivers, so both run about as long).
    #[arg(long)]
    pub ceiling_messages: Option<u64>,

    /// Scale-out: feeds (every pagination style in turn), each walking the dataset.
    #[arg(long, default_value_t = 200)]
    pub scale_feeds: usize,
    #[arg(long, default_value_t = 1_000)]
    pub scale_records: usize,
    #[arg(long, default_value_t = 100)]
    pub scale_page_size: usize,
    /// Scale-out: the API's latency per page, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub scale_latency_ms: u64,
    /// Scale-out: worker process counts, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub scale_workers: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub scale_concurrency: usize,

    /// Many jobs: partitions of one feed, each a small job.
    #[arg(long, default_value_t = 2_000)]
    pub many_jobs: usize,
    #[arg(long, default_value_t = 20)]
    pub many_records: usize,
    #[arg(long, default_value_t = 10)]
    pub many_page_size: usize,
    #[arg(long, default_value_t = 2)]
    pub many_workers: usize,
    #[arg(long, default_value_t = 32)]
    pub many_concurrency: usize,

    /// Scale: job counts, one run each.
    #[arg(long, value_delimiter = ',', default_value = "2000,20000,100000")]
    pub jobs: Vec<usize>,
    /// Scale: partitions per feed (the jobs are spread over as many feeds as it takes).
    #[arg(long, default_value_t = 100)]
    pub jobs_per_feed: usize,
    /// Scale: records per job.
    #[arg(long, default_value_t = 15)]
    pub jobs_records: usize,
    #[arg(long, default_value_t = 10)]
    pub jobs_page_size: usize,
    #[arg(long, default_value_t = 2)]
    pub jobs_workers: usize,
    #[arg(long, default_value_t = 32)]
    pub jobs_concurrency: usize,
    /// Scale: how long the coordinator is watched once every job is idle.
    #[arg(long, default_value = "15s")]
    pub jobs_idle_window: tidemark_core::Duration,

    /// Tenants: tenants in the tenants file of the one tenanted source.
    #[arg(long, default_value_t = 1_000)]
    pub tenants: usize,
    /// Tenants: feeds of that source (every pagination style in turn), each
    /// run once per tenant.
    #[arg(long, default_value_t = 3)]
    pub tenants_feeds: usize,
    /// Tenants: records in each tenant's dataset (every feed walks them all).
    #[arg(long, default_value_t = 10)]
    pub tenants_records: usize,
    #[arg(long, default_value_t = 5)]
    pub tenants_page_size: usize,
    #[arg(long, default_value_t = 2)]
    pub tenants_workers: usize,
    #[arg(long, default_value_t = 32)]
    pub tenants_concurrency: usize,
    /// Tenants: tenants appended to the tenants file once every tenant is
    /// synced, one after another, each timed to its first record.
    #[arg(long, default_value_t = 5)]
    pub tenants_adds: usize,
    /// Tenants: the coordinator's --tick, how often it looks at the file.
    #[arg(long, default_value = "1s")]
    pub tenants_tick: tidemark_core::Duration,

    /// Children: parent records (tickets of the parent feed), each making
    /// one child job (its comments, the child feed).
    #[arg(long, default_value_t = 100_000)]
    pub children_parents: usize,
    /// Children: child records of every parent (the mock's
    /// --comments-per-ticket).
    #[arg(long, default_value_t = 10)]
    pub children_per_parent: usize,
    /// Children: the child feed's page size (10 records in pages of 5: two
    /// pages a child).
    #[arg(long, default_value_t = 5)]
    pub children_page_size: usize,
    /// Children: the parent feed's page size (the parent records one commit
    /// triggers children for).
    #[arg(long, default_value_t = 100)]
    pub children_parent_page_size: usize,
    #[arg(long, default_value_t = 2)]
    pub children_workers: usize,
    #[arg(long, default_value_t = 32)]
    pub children_concurrency: usize,
    /// Children: the API's latency per request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub children_latency_ms: u64,

    /// One chain: records of the one feed.
    #[arg(long, default_value_t = 200_000)]
    pub one_chain_records: usize,
    #[arg(long, default_value_t = 1000)]
    pub one_chain_page_size: usize,
    /// One chain: worker process counts, one run each (per page and per record).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub one_chain_workers: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub one_chain_concurrency: usize,

    /// Also run bench/compare.py (dlt's RESTClient, a Singer SDK tap) over
    /// the throughput scenario's pages; needs bench/setup-python.sh.
    #[arg(long)]
    pub compare: bool,
    #[arg(long, default_value = "bench/compare.py")]
    pub compare_script: PathBuf,
    /// Python for the comparison (default: target/bench-venv/bin/python if
    /// bench/setup-python.sh made it, else python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Records the comparison walks (1000-record pages).
    #[arg(long, default_value_t = 200_000)]
    pub compare_records: usize,

    /// Run every worker under this command, for profiling (e.g. `perf
    /// record -g -o perf-{run}-{i}.data --` or `heaptrack -o heap-{run}-{i}`;
    /// `{run}` is the run's name, `{i}` the worker's number); the CPU and RSS
    /// columns are then the wrapper's.
    #[arg(long, allow_hyphen_values = true)]
    pub worker_wrapper: Option<String>,
    /// Environment for every worker of every run, `NAME=VALUE`, repeatable
    /// (e.g. `--worker-env TIDEMARK_HOT_CHAIN_PAGES=0` to measure without
    /// hot chains).
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_env)]
    pub worker_env: Vec<(String, String)>,
    /// Give up on a run after this long.
    #[arg(long, default_value = "10m")]
    pub timeout: tidemark_core::Duration,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// What one run of the system is.
pub(super) struct Spec {
    pub label: String,
    pub feeds_yaml: String,
    pub records: usize,
    pub page_size: usize,
    pub latency_ms: u64,
    pub workers: usize,
    pub concurrency: usize,
    pub jobs: usize,
    pub expected_records: u64,
    pub feeds: usize,
    /// Measure Redis memory per job, then watch the idle coordinator this long.
    pub idle_window: Option<Duration>,
    /// A tenanted source: its tenants file, and the tenants to add to it
    /// once the initial sync is in.
    pub tenants: Option<tenants::Plan>,
    /// Environment of this run's workers, beyond the deployment's and
    /// `--worker-env`.
    pub worker_env: Vec<(String, String)>,
    /// Serve the feeds from this server instead of the mock (which then
    /// idles): its base URL, and when it saw its first request (unix ms,
    /// 0 before; reset by the caller before the run).
    pub external: Option<External>,
}

/// A page server the bench runs itself (the one-chain scenario's static pages).
pub(super) struct External {
    pub url: String,
    pub first_request_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub label: String,
    pub workers: usize,
    pub concurrency: usize,
    pub jobs: usize,
    pub records: u64,
    pub messages: u64,
    /// Messages whose id had arrived before (0 unless a page was retried).
    pub duplicates: u64,
    pub pages: u64,
    /// First fetch (the mock's first data request) to the last downstream receipt.
    pub seconds: f64,
    pub records_per_sec: f64,
    pub pages_per_sec: f64,
    /// Task published to commit, read off the workers' histograms.
    pub page_latency_p50_ms: Option<f64>,
    pub page_latency_p99_ms: Option<f64>,
    /// All workers' CPU time over the run, per record delivered.
    pub worker_cpu_us_per_record: Option<f64>,
    pub worker_cpu_seconds: Option<f64>,
    /// Peak resident set size of each worker.
    pub worker_peak_rss_mib: Vec<f64>,
    pub coordinator_cpu_seconds: Option<f64>,
    /// Leader passes over all jobs (list them, start the due chains).
    pub coordinator_passes: u64,
    pub coordinator_pass_p50_ms: Option<f64>,
    pub coordinator_pass_p99_ms: Option<f64>,
    pub mock_cpu_seconds: Option<f64>,
    pub feeds: usize,
    /// Redis `used_memory` the run added, per job (scale runs).
    pub redis_bytes_per_job: Option<f64>,
    /// Coordinator CPU per pass, and the pass p50, once every job is idle
    /// and none is due (scale runs).
    pub idle_pass_cpu_ms: Option<f64>,
    pub idle_pass_p50_ms: Option<f64>,
    /// Tenants in the tenants file at the start (tenants runs).
    pub tenants: Option<usize>,
    /// Tenants added to the file once every tenant was synced, one at a
    /// time (tenants runs).
    pub tenant_adds: Vec<tenants::TenantAdd>,
    /// From the file's write to the new tenant's first record downstream,
    /// over `tenant_adds`.
    pub tenant_add_first_record_median_ms: Option<f64>,
    pub tenant_add_first_record_max_ms: Option<f64>,
    /// The coordinator's tick (tenants runs: it bounds how soon a change
    /// to the tenants file is read).
    pub coordinator_tick_ms: Option<f64>,
}

/// A comparison tool's walk over the same pages (bench/compare.py).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ToolResult {
    pub tool: String,
    #[serde(default)]
    pub version: Option<String>,
    pub records: u64,
    pub seconds: f64,
    #[serde(default)]
    pub records_per_sec: f64,
    #[serde(default)]
    pub peak_rss_kib: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub ceiling: Vec<Ceiling>,
    pub throughput: Vec<RunResult>,
    pub scale_out: Vec<RunResult>,
    pub many_jobs: Vec<RunResult>,
    pub scale: Vec<RunResult>,
    pub tenants: Vec<RunResult>,
    pub children: Vec<children::ChildrenRun>,
    pub one_chain: Option<one_chain::OneChain>,
    pub compare: Vec<ToolResult>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: Option<String>,
    pub tidemark_version: String,
    pub release_build: bool,
}

impl Machine {
    fn read() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        });
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            tidemark_version: env!("CARGO_PKG_VERSION").into(),
            release_build: !cfg!(debug_assertions),
        }
    }
}

pub async fn run(
    b: &E2eBench,
    exe: &Path,
    out: &mut dyn std::io::Write,
) -> Result<(), HarnessError> {
    let all = [
        Scenario::Throughput,
        Scenario::ScaleOut,
        Scenario::ManyJobs,
        Scenario::OneChain,
        Scenario::Scale,
        Scenario::Tenants,
        Scenario::Children,
    ];
    let scenarios: Vec<Scenario> = if b.scenario.is_empty() {
        all[..4].to_vec()
    } else {
        all.into_iter().filter(|s| b.scenario.contains(s)).collect()
    };
    let mut report = Report {
        machine: Machine::read(),
        ..Report::default()
    };
    if !report.machine.release_build {
        tracing::warn!("a debug build: build with --release for figures worth publishing");
    }
    for s in scenarios {
        match s {
            Scenario::Throughput => throughput(b, exe, &mut report).await?,
            Scenario::ScaleOut => {
                for &w in &b.scale_workers {
                    report
                        .scale_out
                        .push(run_system(b, exe, &scale_out_spec(b, w)).await?);
                }
            }
            Scenario::ManyJobs => report
                .many_jobs
                .push(run_system(b, exe, &many_jobs_spec(b)).await?),
            Scenario::Scale => {
                for &jobs in &b.jobs {
                    report
                        .scale
                        .push(run_system(b, exe, &scale::spec(b, jobs)).await?);
                }
            }
            Scenario::Tenants => report
                .tenants
                .push(run_system(b, exe, &tenants::spec(b)).await?),
            Scenario::Children => report.children.push(children::run(b, exe).await?),
            Scenario::OneChain => report.one_chain = Some(one_chain::run(b, exe).await?),
        }
    }
    if b.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| HarnessError::bench(e.to_string()))?;
        let _ = writeln!(out, "{text}");
    } else {
        let _ = write!(out, "{}", render(&report));
    }
    Ok(())
}

async fn throughput(b: &E2eBench, exe: &Path, report: &mut Report) -> Result<(), HarnessError> {
    report.ceiling = measure_ceiling(b).await?;
    for per in ["record", "page"] {
        report
            .throughput
            .push(run_system(b, exe, &throughput_spec(b, per)).await?);
    }
    if b.compare {
        report.compare = compare(b, exe).await?;
    }
    Ok(())
}

/// A `partitions:` line of `n` values, `"0"` to `"n-1"`, in param `shard`.
pub(super) fn partitions(n: usize) -> String {
    let values: Vec<String> = (0..n).map(|i| format!("\"{i}\"")).collect();
    format!(
        "partitions: {{ param: shard, values: [{}] }}",
        values.join(", ")
    )
}

fn throughput_spec(b: &E2eBench, per: &str) -> Spec {
    let records = if per == "page" {
        b.throughput_page_records
    } else {
        b.throughput_records
    };
    let feeds_yaml = format!(
        "  - name: bench\n    source: mock\n    path: /jsonapi/records\n    \
         pagination: {{ preset: next_url, page_size: {} }}\n    key: /id\n    version: /updated_at\n    \
         mode: snapshot\n    every: 24h\n    delivery: {{ per: {per} }}\n    {}\n",
        b.throughput_page_size,
        partitions(b.throughput_jobs)
    );
    Spec {
        label: format!("throughput, per {per}"),
        feeds_yaml,
        records,
        page_size: b.throughput_page_size,
        latency_ms: 0,
        workers: b.throughput_workers,
        concurrency: b.throughput_concurrency,
        jobs: b.throughput_jobs,
        expected_records: (records * b.throughput_jobs) as u64,
        feeds: 1,
        idle_window: None,
        tenants: None,
        worker_env: Vec::new(),
        external: None,
    }
}

/// The mock's styles, as feed fields: each scale-out feed takes the next.
pub(super) const STYLES: [(&str, &str); 6] = [
    (
        "/api/v2/incremental/tickets/cursor.json",
        "records: /tickets\n    pagination: { preset: zendesk_cursor, page_size: PS }\n    start: { param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }",
    ),
    (
        "/v1/events",
        "pagination: { preset: self_next, page_size: PS }",
    ),
    ("/items", "pagination: { preset: cursor, page_size: PS }"),
    (
        "/sync/records",
        "records: /records\n    pagination: { preset: cursor, cursor_param: cursor, next_cursor: /cursor, page_size: PS }",
    ),
    (
        "/jsonapi/records",
        "pagination: { preset: next_url, page_size: PS }",
    ),
    (
        "/github/records",
        "pagination: { preset: link_header, page_size: PS }\n    start: { param: since_ms, format: unix_ms, from: \"2024-01-01\" }",
    ),
];

fn scale_out_spec(b: &E2eBench, workers: usize) -> Spec {
    let mut feeds_yaml = String::new();
    for i in 0..b.scale_feeds {
        let (path, fields) = STYLES[i % STYLES.len()];
        feeds_yaml.push_str(&format!(
            "  - name: f{i:03}\n    source: mock\n    path: {path}\n    {}\n    key: /id\n    \
             version: /updated_at\n    mode: snapshot\n    every: 24h\n    delivery: {{ per: page }}\n",
            fields.replace("PS", &b.scale_page_size.to_string())
        ));
    }
    Spec {
        label: format!(
            "scale-out, {workers} worker{}",
            if workers == 1 { "" } else { "s" }
        ),
        feeds_yaml,
        records: b.scale_records,
        page_size: b.scale_page_size,
        latency_ms: b.scale_latency_ms,
        workers,
        concurrency: b.scale_concurrency,
        jobs: b.scale_feeds,
        expected_records: (b.scale_records * b.scale_feeds) as u64,
        feeds: b.scale_feeds,
        idle_window: None,
        tenants: None,
        worker_env: Vec::new(),
        external: None,
    }
}

fn many_jobs_spec(b: &E2eBench) -> Spec {
    let feeds_yaml = format!(
        "  - name: many\n    source: mock\n    path: /jsonapi/records\n    \
         pagination: {{ preset: next_url, page_size: {} }}\n    key: /id\n    version: /updated_at\n    \
         mode: snapshot\n    every: 24h\n    {}\n",
        b.many_page_size,
        partitions(b.many_jobs)
    );
    Spec {
        label: format!("many jobs, {}", b.many_jobs),
        feeds_yaml,
        records: b.many_records,
        page_size: b.many_page_size,
        latency_ms: 0,
        workers: b.many_workers,
        concurrency: b.many_concurrency,
        jobs: b.many_jobs,
        expected_records: (b.many_records * b.many_jobs) as u64,
        feeds: 1,
        idle_window: None,
        tenants: None,
        worker_env: Vec::new(),
        external: None,
    }
}

/// Names and environment of one run's deployment.
pub(super) struct Deployment {
    pub prefix: String,
    pub amqp_url: String,
    pub redis_url: String,
    /// `--tls-ca-file`: handed to the processes, and its checked bundle.
    tls_ca_file: Option<std::path::PathBuf>,
    pub tls_ca_pem: Option<String>,
}

impl Deployment {
    pub(super) fn new(b: &E2eBench) -> Result<Self, HarnessError> {
        Ok(Deployment {
            prefix: format!(
                "tmbench{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
            amqp_url: services::url(Service::RabbitMq, b.amqp_url.as_deref())?,
            redis_url: services::url(Service::Redis, b.redis_url.as_deref())?,
            tls_ca_file: b.tls_ca_file.clone(),
            tls_ca_pem: b
                .tls_ca_file
                .as_deref()
                .map(|f| {
                    std::fs::read_to_string(f).map_err(|source| HarnessError::Io {
                        what: "cannot read --tls-ca-file",
                        path: f.to_path_buf(),
                        source,
                    })
                })
                .transpose()?,
        })
    }
    pub(super) fn exchange(&self) -> String {
        format!("{}.records", self.prefix)
    }
    pub(super) fn env(&self) -> Vec<(String, String)> {
        [
            ("REDIS_URL", self.redis_url.clone()),
            ("AMQP_URL", self.amqp_url.clone()),
            ("TIDEMARK_REDIS_PREFIX", format!("{}:", self.prefix)),
            ("TIDEMARK_QUEUE_PREFIX", self.prefix.clone()),
            ("TIDEMARK_RECORDS_EXCHANGE", self.exchange()),
            ("TIDEMARK_LISTEN", "127.0.0.1:0".into()),
            ("TIDEMARK_ADMIN_LISTEN", "127.0.0.1:0".into()),
            ("TIDEMARK_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            self.tls_ca_file
                .iter()
                .map(|f| ("TIDEMARK_TLS_CA_FILE".to_string(), f.display().to_string())),
        )
        .collect()
    }

    /// Delete the run's Redis keys, queues and exchange.
    pub(super) async fn cleanup(&self) {
        if let Ok(store) = tidemark_state::RedisStore::connect_with_ca(
            &self.redis_url,
            &format!("{}:", self.prefix),
            self.tls_ca_pem.as_deref(),
        )
        .await
        {
            let _ = store.delete_all().await;
        }
        let mut cfg = tidemark_bus::amqp::BusConfig::new(&self.amqp_url);
        cfg.tls_ca_pem = self.tls_ca_pem.clone();
        cfg.prefix = self.prefix.clone();
        cfg.records_exchange = self.exchange();
        let _ = tidemark_bus::amqp::delete_topology(&cfg).await;
    }
}

/// Start a child on a blocking thread: its start-up waits for a ready line.
pub(super) async fn start(spawn: Spawn) -> Result<Proc, HarnessError> {
    tokio::task::spawn_blocking(move || spawn.start())
        .await
        .map_err(|e| HarnessError::bench(format!("a start-up task failed: {e}")))?
}

/// Stop children on blocking threads, all at once.
pub(super) async fn stop(procs: Vec<Proc>, within: Duration) {
    let stopping = procs
        .into_iter()
        .map(|p| tokio::task::spawn_blocking(move || p.stop(within)));
    futures::future::join_all(stopping).await;
}

pub(super) async fn start_mock(
    exe: &Path,
    dir: &Path,
    records: usize,
    page_size: usize,
    record_bytes: usize,
    latency_ms: u64,
    tenant_records: Option<usize>,
) -> Result<Proc, HarnessError> {
    let mut args: Vec<String> = [
        "mock-api",
        "--port",
        "0",
        "--records",
        &records.to_string(),
        "--page-size",
        &page_size.to_string(),
        "--record-bytes",
        &record_bytes.to_string(),
        "--latency-ms",
        &latency_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(n) = tenant_records {
        args.extend(["--tenant-records".into(), n.to_string()]);
    }
    start(
        Spawn::new(exe, "mock", dir)
            .args(&args)
            .ready("listening on"),
    )
    .await
}

pub(super) async fn scrape(client: &reqwest::Client, role: &Proc) -> Result<Scrape, HarnessError> {
    let text = client
        .get(format!("{}/metrics", role.url()?))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| HarnessError::bench(format!("{} /metrics: {e}", role.name)))?
        .text()
        .await
        .map_err(|e| HarnessError::bench(format!("{} /metrics: {e}", role.name)))?;
    Ok(Scrape::new(text))
}

/// A run's label as a file-name part: "throughput, per page" -> "throughput-per-page".
pub(super) fn slug(label: &str) -> String {
    label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

pub(super) fn ms(s: Option<f64>) -> Option<f64> {
    s.map(|s| s * 1000.0)
}

/// Start the system for `spec`, wait for every record, measure, tear down.
pub(super) async fn run_system(
    b: &E2eBench,
    exe: &Path,
    spec: &Spec,
) -> Result<RunResult, HarnessError> {
    let dir = tempfile::Builder::new()
        .prefix("tidemark-bench-")
        .tempdir()
        .map_err(|e| HarnessError::bench(e.to_string()))?;
    let d = Deployment::new(b)?;
    eprintln!(
        "bench: {}: {} jobs, {} records expected, {} worker(s) x {} ...",
        spec.label, spec.jobs, spec.expected_records, spec.workers, spec.concurrency
    );
    let result = run_in(b, exe, spec, &d, dir.path()).await;
    d.cleanup().await;
    if result.is_err() {
        // Keep the logs of a failed run.
        let kept = dir.keep();
        eprintln!("bench: logs of the failed run are in {}", kept.display());
    }
    result
}

async fn run_in(
    b: &E2eBench,
    exe: &Path,
    spec: &Spec,
    d: &Deployment,
    dir: &Path,
) -> Result<RunResult, HarnessError> {
    let mut mock = start_mock(
        exe,
        dir,
        spec.records,
        spec.page_size,
        b.record_bytes,
        spec.latency_ms,
        spec.tenants.as_ref().map(|t| t.records),
    )
    .await?;
    let config = dir.join("feeds.yaml");
    let source = match &spec.tenants {
        Some(plan) => tenants::source(plan, mock.url()?, dir)?,
        None => format!(
            "  mock:\n    base_url: {}\n    timeout: 30s\n",
            match &spec.external {
                Some(e) => e.url.as_str(),
                None => mock.url()?,
            }
        ),
    };
    std::fs::write(
        &config,
        format!("sources:\n{source}\nfeeds:\n{}", spec.feeds_yaml),
    )
    .map_err(|e| HarnessError::bench(e.to_string()))?;
    let sink = match spec.tenants {
        Some(_) => Sink::by_tenant(&d.amqp_url, d.tls_ca_pem.as_deref(), &d.exchange()).await?,
        None => Sink::start(&d.amqp_url, d.tls_ca_pem.as_deref(), &d.exchange()).await?,
    };
    let env = d.env();
    let worker_env: Vec<(String, String)> = env
        .iter()
        .chain(&b.worker_env)
        .chain(&spec.worker_env)
        .cloned()
        .collect();
    let mut workers = Vec::new();
    for i in 0..spec.workers {
        let args = vec![
            "worker".to_string(),
            "--concurrency".into(),
            spec.concurrency.to_string(),
        ];
        let wrapper: Vec<String> = b
            .worker_wrapper
            .iter()
            .flat_map(|w| w.split_whitespace())
            .map(|w| {
                w.replace("{i}", &i.to_string())
                    .replace("{run}", &slug(&spec.label))
            })
            .collect();
        let worker = Spawn::new(exe, &format!("worker-{i}"), dir)
            .wrapper(wrapper)
            .args(&args)
            .envs(&worker_env)
            .ready("metrics on");
        workers.push(start(worker).await?);
    }
    let worker_cpu_before: Option<Duration> = workers.iter().map(Proc::cpu).sum();
    let memory_before = match spec.idle_window {
        Some(_) => Some(scale::redis_used_memory(&d.redis_url, d.tls_ca_pem.as_deref()).await?),
        None => None,
    };
    let mut coordinator_args = vec![
        "coordinator".to_string(),
        "--config".into(),
        config.display().to_string(),
        "--id".into(),
        "bench-coordinator".into(),
    ];
    if let Some(plan) = &spec.tenants {
        coordinator_args.extend(["--tick".into(), format!("{}ms", plan.tick.as_millis())]);
    }
    let coordinator = Spawn::new(exe, "coordinator", dir)
        .args(&coordinator_args)
        .envs(&env)
        .ready("metrics on");
    let mut coordinator = start(coordinator).await?;
    let coordinator_cpu_before = coordinator.cpu();

    let arrived = sink
        .wait_for(spec.expected_records, b.timeout.std(), || {
            mock.check_alive()?;
            coordinator.check_alive()?;
            workers.iter_mut().try_for_each(Proc::check_alive)
        })
        .await;
    let arrived = match arrived {
        Ok(a) => a,
        Err(e) => {
            sink.close().await;
            return Err(with_logs(e, &spec.label, &workers, &coordinator));
        }
    };
    // Every record has arrived; the last commits follow within a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The run's CPU ends here: what the idle window costs is measured apart.
    let coordinator_cpu_after = coordinator.cpu();
    let worker_cpu_after: Option<Duration> = workers.iter().map(Proc::cpu).sum();
    let client = reqwest::Client::new();
    let idle = match spec.idle_window {
        Some(window) => {
            Some(idle_costs(&client, &coordinator, window, spec, d, memory_before).await?)
        }
        None => None,
    };
    let (mut latency, mut pages) = (Buckets::default(), 0.0);
    for w in &workers {
        let s = scrape(&client, w).await?;
        latency.merge(&s.buckets("tidemark_page_latency_seconds"));
        pages += s.sum("tidemark_pages_fetched_total");
    }
    let cs = scrape(&client, &coordinator).await?;
    let passes = cs.buckets("tidemark_coordinator_pass_seconds");
    let worker_cpu = worker_cpu_after
        .zip(worker_cpu_before)
        .map(|(after, before)| after.saturating_sub(before).as_secs_f64());
    let coordinator_cpu = coordinator_cpu_after
        .zip(coordinator_cpu_before)
        .map(|(a, b)| a.saturating_sub(b).as_secs_f64());
    let worker_peak_rss_mib = workers
        .iter()
        .filter_map(Proc::peak_rss_bytes)
        .map(|b| b as f64 / 1048576.0)
        .collect();
    let stats_body = client
        .get(format!("{}/_stats", mock.url()?))
        .send()
        .await
        .map_err(|e| HarnessError::bench(format!("mock /_stats: {e}")))?
        .bytes()
        .await
        .map_err(|e| HarnessError::bench(format!("mock /_stats: {e}")))?;
    let mock_stats: serde_json::Value = serde_json::from_slice(&stats_body)
        .map_err(|e| HarnessError::bench(format!("mock /_stats: {e}")))?;
    let (mock_cpu, first_ms) = match &spec.external {
        None => (
            mock.cpu().map(|c| c.as_secs_f64()),
            mock_stats["first_request_ms"]
                .as_f64()
                .ok_or_else(|| HarnessError::bench("the mock saw no request"))?,
        ),
        Some(e) => match e.first_request_ms.load(std::sync::atomic::Ordering::SeqCst) {
            0 => return Err(HarnessError::bench("the page server saw no request")),
            ms => (None, ms as f64),
        },
    };
    // The run's figures are read: now tenants join the synced ones.
    let adds = match &spec.tenants {
        Some(plan) => {
            let probe = tenants::Probe {
                redis_url: &d.redis_url,
                ca_pem: d.tls_ca_pem.as_deref(),
                prefix: format!("{}:", d.prefix),
            };
            let added = tenants::add(plan, dir, &sink, &probe, b.timeout.std(), || {
                mock.check_alive()?;
                coordinator.check_alive()?;
                workers.iter_mut().try_for_each(Proc::check_alive)
            })
            .await;
            let added = match added {
                Ok(a) => a,
                Err(e) => {
                    sink.close().await;
                    return Err(with_logs(e, &spec.label, &workers, &coordinator));
                }
            };
            // A duplicate or a stray record would come within a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Err(e) = tenants::check_every_tenant(plan, &sink) {
                sink.close().await;
                return Err(e);
            }
            added
        }
        None => Vec::new(),
    };
    // Duplicates that came after the last expected record count too.
    let duplicates = sink.snapshot().duplicates;
    sink.close().await;
    let grace = Duration::from_secs(30);
    stop(workers, grace).await;
    stop(vec![coordinator, mock], grace).await;

    let seconds = ((arrived.last_ms - first_ms) / 1000.0).max(1e-3);
    let records = arrived.records;
    Ok(RunResult {
        label: spec.label.clone(),
        workers: spec.workers,
        concurrency: spec.concurrency,
        jobs: spec.jobs,
        records,
        messages: arrived.messages,
        duplicates,
        pages: pages as u64,
        seconds,
        records_per_sec: records as f64 / seconds,
        pages_per_sec: pages / seconds,
        page_latency_p50_ms: ms(latency.quantile(0.5)),
        page_latency_p99_ms: ms(latency.quantile(0.99)),
        worker_cpu_us_per_record: worker_cpu.map(|c| c * 1e6 / records.max(1) as f64),
        worker_cpu_seconds: worker_cpu,
        worker_peak_rss_mib,
        coordinator_cpu_seconds: coordinator_cpu,
        coordinator_passes: passes.count() as u64,
        coordinator_pass_p50_ms: ms(passes.quantile(0.5)),
        coordinator_pass_p99_ms: ms(passes.quantile(0.99)),
        mock_cpu_seconds: mock_cpu,
        feeds: spec.feeds,
        redis_bytes_per_job: idle.as_ref().and_then(|i| i.redis_bytes_per_job),
        idle_pass_cpu_ms: idle.as_ref().and_then(|i| i.pass_cpu_ms),
        idle_pass_p50_ms: idle.as_ref().and_then(|i| i.pass_p50_ms),
        tenants: spec.tenants.as_ref().map(|t| t.tenants),
        tenant_add_first_record_median_ms: tenants::median(
            &adds.iter().map(|a| a.first_record_ms).collect::<Vec<_>>(),
        ),
        tenant_add_first_record_max_ms: adds.iter().map(|a| a.first_record_ms).reduce(f64::max),
        tenant_adds: adds,
        coordinator_tick_ms: spec.tenants.as_ref().map(|t| t.tick.as_secs_f64() * 1000.0),
    })
}

/// A run's error with the tails of its roles' logs.
pub(super) fn with_logs(
    e: HarnessError,
    label: &str,
    workers: &[Proc],
    coordinator: &Proc,
) -> HarnessError {
    let logs: String = workers
        .iter()
        .chain([coordinator])
        .map(|r| format!("\n----- {} -----\n{}", r.name, tail(&r.log, 15)))
        .collect();
    HarnessError::bench(format!("{label}: {e}{logs}"))
}

/// What the jobs cost at rest: Redis memory, and coordinator passes.
struct IdleCosts {
    redis_bytes_per_job: Option<f64>,
    pass_cpu_ms: Option<f64>,
    pass_p50_ms: Option<f64>,
}

/// Once the last chains have ended (every job idle, none due for a day):
/// the Redis memory the run added per job, then the coordinator's CPU per
/// pass and its pass p50 over `window`.
async fn idle_costs(
    client: &reqwest::Client,
    coordinator: &Proc,
    window: Duration,
    spec: &Spec,
    d: &Deployment,
    memory_before: Option<u64>,
) -> Result<IdleCosts, HarnessError> {
    let settled = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(client, coordinator).await?;
        if s.sum("tidemark_chains_running") == 0.0 || std::time::Instant::now() > settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = scale::redis_used_memory(&d.redis_url, d.tls_ca_pem.as_deref()).await?;
    let redis_bytes_per_job =
        memory_before.map(|b| after.saturating_sub(b) as f64 / spec.jobs.max(1) as f64);
    let before = scrape(client, coordinator)
        .await?
        .buckets("tidemark_coordinator_pass_seconds");
    // A quiet coordinator uses less than /proc/<pid>/stat's 10 ms tick in
    // a short window: read its threads' CPU to the nanosecond.
    let cpu_before = coordinator.thread_cpu();
    tokio::time::sleep(window).await;
    let cpu_after = coordinator.thread_cpu();
    let passes = scrape(client, coordinator)
        .await?
        .buckets("tidemark_coordinator_pass_seconds")
        .minus(&before);
    let cpu = cpu_after
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b).as_secs_f64());
    Ok(IdleCosts {
        redis_bytes_per_job,
        pass_cpu_ms: cpu
            .filter(|_| passes.count() > 0.0)
            .map(|c| c * 1000.0 / passes.count()),
        pass_p50_ms: ms(passes.quantile(0.5)),
    })
}

/// The broker's ceiling through the same sink: record-sized and page-sized
/// messages from a minimal confirmed publisher.
async fn measure_ceiling(b: &E2eBench) -> Result<Vec<Ceiling>, HarnessError> {
    let d = Deployment::new(b)?;
    let sink = Sink::start(&d.amqp_url, d.tls_ca_pem.as_deref(), &d.exchange()).await?;
    eprintln!("bench: the broker ceiling ...");
    let count = b
        .ceiling_messages
        .unwrap_or((b.throughput_jobs * b.throughput_records) as u64);
    let small = sink::ceiling(
        &d.amqp_url,
        d.tls_ca_pem.as_deref(),
        &d.exchange(),
        &sink,
        b.record_bytes,
        count,
        1000,
    )
    .await;
    let page_bytes = b.record_bytes * b.throughput_page_size + 16;
    let large_count = (count / 100).max(100);
    let large = match &small {
        Ok(_) => Some(
            sink::ceiling(
                &d.amqp_url,
                d.tls_ca_pem.as_deref(),
                &d.exchange(),
                &sink,
                page_bytes,
                large_count,
                10,
            )
            .await,
        ),
        Err(_) => None,
    };
    sink.close().await;
    d.cleanup().await;
    let mut out = vec![small?];
    if let Some(l) = large {
        out.push(l?);
    }
    Ok(out)
}

/// bench/compare.py over the throughput scenario's pages: the same mock, the
/// same next-URL style and 1000-record pages.
async fn compare(b: &E2eBench, exe: &Path) -> Result<Vec<ToolResult>, HarnessError> {
    let dir = tempfile::tempdir().map_err(|e| HarnessError::bench(e.to_string()))?;
    let mut mock = start_mock(
        exe,
        dir.path(),
        b.compare_records,
        b.throughput_page_size,
        b.record_bytes,
        0,
        None,
    )
    .await?;
    let url = format!(
        "{}/jsonapi/records?limit={}",
        mock.url()?,
        b.throughput_page_size
    );
    let mut results = Vec::new();
    for tool in ["dlt", "singer"] {
        eprintln!("bench: {tool} over {} records ...", b.compare_records);
        let r = compare_tool(b, tool, &url, &[], b.compare_records as u64).await;
        mock.check_alive()?;
        results.push(r?);
    }
    stop(vec![mock], Duration::from_secs(5)).await;
    Ok(results)
}

/// bench/compare.py's `tool` walking `url` (with `args`), which must count
/// `records` records.
pub(super) async fn compare_tool(
    b: &E2eBench,
    tool: &str,
    url: &str,
    args: &[&str],
    records: u64,
) -> Result<ToolResult, HarnessError> {
    let py = super::python(b.python.as_deref());
    let output = tokio::process::Command::new(&py)
        .arg(&b.compare_script)
        .args(["--tool", tool, "--url", url])
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .map_err(|e| HarnessError::bench(format!("cannot run {}: {e}", py.display())))?;
    if !output.status.success() {
        return Err(HarnessError::bench(format!(
            "{} --tool {tool} failed ({}); run bench/setup-python.sh first",
            b.compare_script.display(),
            output.status
        )));
    }
    let mut r: ToolResult = serde_json::from_slice(&output.stdout).map_err(|e| {
        HarnessError::bench(format!(
            "{} printed no JSON summary: {e}",
            b.compare_script.display()
        ))
    })?;
    if r.records != records {
        return Err(HarnessError::bench(format!(
            "{} walked {} records, expected {records}",
            r.tool, r.records
        )));
    }
    r.records_per_sec = r.records as f64 / r.seconds.max(1e-6);
    Ok(r)
}

pub(super) fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// The report as Markdown tables (docs/BENCHMARKS.md shows them).
pub fn render(r: &Report) -> String {
    let mut s = format!(
        "tidemark bench e2e: {} CPUs ({}), tidemark {}{}\n",
        r.machine.cpus,
        r.machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
        r.machine.tidemark_version,
        if r.machine.release_build {
            ""
        } else {
            ", DEBUG BUILD"
        }
    );
    let runs: Vec<&RunResult> = r
        .throughput
        .iter()
        .chain(&r.scale_out)
        .chain(&r.many_jobs)
        .chain(r.one_chain.iter().flat_map(|c| &c.runs))
        .collect();
    if !runs.is_empty() {
        s.push_str(
            "\n| run | workers x concurrency | jobs | records | seconds | records/s | pages/s | page latency p50 / p99 ms | worker CPU µs/record | worker peak RSS MiB | duplicates |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for x in &runs {
            let rss: Vec<String> = x
                .worker_peak_rss_mib
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect();
            s.push_str(&format!(
                "| {} | {} x {} | {} | {} | {:.2} | {:.0} | {:.0} | {} / {} | {} | {} | {} |\n",
                x.label,
                x.workers,
                x.concurrency,
                x.jobs,
                x.records,
                x.seconds,
                x.records_per_sec,
                x.pages_per_sec,
                opt(x.page_latency_p50_ms, 0),
                opt(x.page_latency_p99_ms, 0),
                opt(x.worker_cpu_us_per_record, 2),
                rss.join(", "),
                x.duplicates
            ));
        }
    }
    if !r.ceiling.is_empty() {
        s.push_str("\n| broker ceiling (minimal confirmed publisher, same sink) | messages/s | MB/s |\n|---|---:|---:|\n");
        for c in &r.ceiling {
            s.push_str(&format!(
                "| {} B messages | {:.0} | {:.1} |\n",
                c.message_bytes, c.messages_per_sec, c.mb_per_sec
            ));
        }
    }
    s.push_str(&one_chain::render(r.one_chain.as_ref()));
    s.push_str(&scale::render(&r.scale));
    s.push_str(&tenants::render(&r.tenants));
    s.push_str(&children::render(&r.children));
    s.push_str(&targets(r));
    for x in &r.many_jobs {
        s.push_str(&format!(
            "\nmany jobs: {} jobs in {:.2} s ({:.0} jobs/s); coordinator CPU {} s ({} µs per job), {} passes, pass p50 / p99 {} / {} ms\n",
            x.jobs,
            x.seconds,
            x.jobs as f64 / x.seconds,
            opt(x.coordinator_cpu_seconds, 2),
            opt(x.coordinator_cpu_seconds.map(|c| c * 1e6 / x.jobs as f64), 0),
            x.coordinator_passes,
            opt(x.coordinator_pass_p50_ms, 1),
            opt(x.coordinator_pass_p99_ms, 1),
        ));
    }
    s
}

/// The targets, each with its measured value and whether it is met
/// (`None`: a figure for comparison, not a target).
fn targets(r: &Report) -> String {
    let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
    let per = |p: &str| r.throughput.iter().find(|x| x.label.ends_with(p));
    if let (Some(rec), Some(c)) = (per("per record"), r.ceiling.first()) {
        let ratio = rec.records_per_sec / c.messages_per_sec;
        rows.push((
            "per-record delivery ≥ 80% of the broker ceiling".into(),
            format!("{:.0}%", ratio * 100.0),
            Some(ratio >= 0.8),
        ));
    }
    if let Some(page) = per("per page") {
        for t in &r.compare {
            let ratio = page.records_per_sec / t.records_per_sec;
            let singer = t.tool.contains("Singer");
            rows.push((
                format!(
                    "per-page delivery{} {} {} ({:.0} records/s)",
                    if singer { " ≥ 10x" } else { " vs" },
                    t.tool,
                    t.version.as_deref().unwrap_or(""),
                    t.records_per_sec
                ),
                format!("{ratio:.1}x"),
                singer.then_some(ratio >= 10.0),
            ));
        }
    }
    let one = r.scale_out.iter().find(|x| x.workers == 1);
    let four = r.scale_out.iter().find(|x| x.workers == 4);
    if let (Some(one), Some(four)) = (one, four) {
        let ratio = four.records_per_sec / one.records_per_sec;
        rows.push((
            "scale-out: 4 workers ≥ 3.2x 1 worker".into(),
            format!("{ratio:.2}x"),
            Some(ratio >= 3.2),
        ));
    }
    for x in r.throughput.iter().filter(|x| x.concurrency >= 64) {
        let peak = x.worker_peak_rss_mib.iter().copied().fold(0.0, f64::max);
        rows.push((
            format!(
                "a worker at concurrency {} < 100 MB resident ({})",
                x.concurrency, x.label
            ),
            format!("{peak:.0} MiB"),
            Some(peak * 1.048576 < 100.0),
        ));
    }
    rows.extend(one_chain::targets(r.one_chain.as_ref()));
    rows.extend(scale::targets(&r.scale));
    rows.extend(tenants::targets(&r.tenants));
    rows.extend(children::targets(&r.children));
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n| target | measured | met |\n|---|---:|---|\n");
    for (t, m, ok) in rows {
        let met = match ok {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        s.push_str(&format!("| {t} | {m} | {met} |\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, workers: usize, concurrency: usize, rps: f64, rss: f64) -> RunResult {
        RunResult {
            label: label.into(),
            workers,
            concurrency,
            jobs: 64,
            records: 1000,
            messages: 1000,
            duplicates: 0,
            pages: 1,
            seconds: 1000.0 / rps,
            records_per_sec: rps,
            pages_per_sec: 1.0,
            page_latency_p50_ms: Some(10.0),
            page_latency_p99_ms: Some(20.0),
            worker_cpu_us_per_record: Some(5.0),
            worker_cpu_seconds: Some(0.005),
            worker_peak_rss_mib: vec![rss],
            coordinator_cpu_seconds: Some(0.1),
            coordinator_passes: 1,
            coordinator_pass_p50_ms: Some(1.0),
            coordinator_pass_p99_ms: Some(2.0),
            mock_cpu_seconds: None,
            feeds: 1,
            redis_bytes_per_job: None,
            idle_pass_cpu_ms: None,
            idle_pass_p50_ms: None,
            tenants: None,
            tenant_adds: Vec::new(),
            tenant_add_first_record_median_ms: None,
            tenant_add_first_record_max_ms: None,
            coordinator_tick_ms: None,
        }
    }

    /// A scale run of `jobs` jobs: `jps` jobs/s, `cpu_us` coordinator µs per job.
    fn scale_run(jobs: usize, jps: f64, cpu_us: f64, duplicates: u64) -> RunResult {
        RunResult {
            label: format!("scale, {jobs} jobs"),
            jobs,
            duplicates,
            seconds: jobs as f64 / jps,
            coordinator_cpu_seconds: Some(cpu_us * jobs as f64 / 1e6),
            feeds: jobs / 100,
            redis_bytes_per_job: Some(700.0),
            idle_pass_cpu_ms: Some(0.4),
            idle_pass_p50_ms: Some(0.3),
            ..run("scale", 2, 32, 1.0, 30.0)
        }
    }

    #[test]
    fn the_scale_targets_are_checked_against_the_smallest_and_the_largest_run() {
        let mut r = Report {
            scale: vec![
                scale_run(2_000, 400.0, 300.0, 0),
                scale_run(20_000, 420.0, 320.0, 0),
                scale_run(100_000, 390.0, 700.0, 3),
            ],
            ..Report::default()
        };
        let text = render(&r);
        assert!(text.contains("| 100000 jobs | 1000 |"), "{text}");
        assert!(
            row(&text, "scale: 0 duplicates without faults, 100000 jobs")
                .ends_with("| 3 | **no** |"),
            "{text}"
        );
        assert!(row(&text, "scale: 0 duplicates without faults, 2000 jobs").ends_with("| yes |"));
        assert!(
            row(&text, "scale: coordinator CPU per job at 100000 jobs")
                .ends_with("| 2.33x | **no** |"),
            "{text}"
        );
        assert!(
            row(&text, "scale: 100000 jobs finish").contains("**no**"),
            "{text}"
        );
        assert!(row(&text, "scale: an idle pass at 100000").ends_with("| 0.40 ms | yes |"));
        assert!(row(&text, "scale: Redis memory per job").ends_with("| 700 B | yes |"));
        r.scale[2] = scale_run(100_000, 500.0, 400.0, 0);
        let text = render(&r);
        assert!(!text.contains("**no**"), "{text}");
    }

    /// A tenants run of 1,000 tenants whose additions took `first_ms` to
    /// their first record.
    fn tenants_run(first_ms: &[f64], duplicates: u64) -> RunResult {
        let adds: Vec<tenants::TenantAdd> = first_ms
            .iter()
            .enumerate()
            .map(|(k, &ms)| tenants::TenantAdd {
                tenant: format!("added-{k:02}"),
                registered_ms: Some(ms - 6.0),
                started_ms: Some(ms - 5.0),
                first_record_ms: ms,
                all_records_ms: ms + 10.0,
                records: 30,
            })
            .collect();
        RunResult {
            label: "tenants, 1000 x 3 feeds".into(),
            jobs: 3000,
            feeds: 3,
            duplicates,
            seconds: 4.0,
            tenants: Some(1000),
            tenant_add_first_record_median_ms: tenants::median(first_ms),
            tenant_add_first_record_max_ms: first_ms.iter().copied().reduce(f64::max),
            tenant_adds: adds,
            coordinator_tick_ms: Some(1000.0),
            ..run("tenants", 2, 32, 7_000.0, 30.0)
        }
    }

    #[test]
    fn a_new_tenant_slower_than_two_seconds_and_a_tick_misses_the_target() {
        let mut r = Report {
            tenants: vec![tenants_run(&[250.0, 900.0, 3100.0], 2)],
            ..Report::default()
        };
        let text = render(&r);
        assert!(text.contains("| 1000 | 3 | 3000 |"), "{text}");
        assert!(
            row(&text, "added-02").contains("| 3100 | 3110 | 30 |"),
            "{text}"
        );
        assert!(
            text.contains("median 900 ms, max 3100 ms over 3 additions"),
            "{text}"
        );
        assert!(
            row(
                &text,
                "tenants: a new tenant's first record < 2 s + one tick (3000 ms)"
            )
            .ends_with("| 3100 ms (median 900) | **no** |"),
            "{text}"
        );
        assert!(
            row(&text, "tenants: 0 duplicates without faults, 1000 tenants")
                .ends_with("| 2 | **no** |"),
            "{text}"
        );
        r.tenants = vec![tenants_run(&[250.0, 900.0, 2900.0], 0)];
        let text = render(&r);
        assert!(!text.contains("**no**"), "{text}");
    }

    fn report() -> Report {
        Report {
            ceiling: vec![Ceiling {
                message_bytes: 330,
                messages: 1000,
                seconds: 0.1,
                messages_per_sec: 10_000.0,
                mb_per_sec: 3.3,
            }],
            throughput: vec![
                run("throughput, per record", 1, 64, 7_000.0, 40.0),
                run("throughput, per page", 1, 64, 500_000.0, 120.0),
            ],
            scale_out: vec![
                run("scale-out, 1 worker", 1, 8, 1_000.0, 20.0),
                run("scale-out, 4 workers", 4, 8, 3_500.0, 20.0),
            ],
            compare: vec![ToolResult {
                tool: "Singer SDK tap".into(),
                version: Some("0.54.9".into()),
                records: 1000,
                seconds: 0.025,
                records_per_sec: 40_000.0,
                peak_rss_kib: None,
            }],
            ..Report::default()
        }
    }

    fn row<'a>(text: &'a str, starts: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(&format!("| {starts}")))
            .unwrap_or_else(|| panic!("no row {starts:?} in\n{text}"))
    }

    #[test]
    fn a_missed_target_is_reported_as_missed() {
        let t = targets(&report());
        assert!(row(&t, "per-record delivery").ends_with("| 70% | **no** |"));
        assert!(row(&t, "per-page delivery ≥ 10x Singer").ends_with("| 12.5x | yes |"));
        assert!(row(&t, "scale-out").ends_with("| 3.50x | yes |"));
        assert!(
            row(
                &t,
                "a worker at concurrency 64 < 100 MB resident (throughput, per record)"
            )
            .ends_with("| 40 MiB | yes |")
        );
        // 120 MiB is 126 MB.
        assert!(
            row(
                &t,
                "a worker at concurrency 64 < 100 MB resident (throughput, per page)"
            )
            .ends_with("| 120 MiB | **no** |")
        );
    }

    #[test]
    fn a_comparison_without_a_target_is_not_marked_met() {
        let mut r = report();
        r.compare[0].tool = "dlt RESTClient".into();
        let t = targets(&r);
        assert!(
            row(&t, "per-page delivery vs dlt").ends_with("| 12.5x | - |"),
            "{t}"
        );
        assert!(!t.contains("Singer"));
    }

    #[test]
    fn the_table_has_a_row_per_run_and_flags_a_debug_build() {
        let mut r = report();
        r.machine.release_build = false;
        let text = render(&r);
        assert!(text.contains("DEBUG BUILD"));
        for label in [
            "throughput, per record",
            "throughput, per page",
            "scale-out, 4 workers",
        ] {
            assert!(row(&text, label).contains("| 10 / 20 |"), "{text}");
        }
    }
}
