//! Shared setup of the worker's in-process tests: the mock API on a free
//! port, an embedded store in a temp dir holding the feed registry and the
//! jobs (as a coordinator would leave them), the in-process task queue, a
//! downstream that remembers every page it confirms, and a running worker.
//!
//! Every call on the store goes through this module, so the tests read as
//! the steps of DESIGN.md's life of a page they check.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemark_bus::memory::{MemoryDownstream, MemoryQueue};
use tidemark_bus::{DeadLetter, OutPage, PageTask, TaskQueue};
use tidemark_core::Config;
use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId, Phase, Stage};
use tidemark_core::config::{DEFAULT_PARTITION, Mode, load_str};
use tidemark_mock::{Faults, MockConfig, MockServer, MockState};
use tidemark_state::registry::publish_config;
use tidemark_state::{Acquire, EmbeddedStore, Jobs, Leases, SourceLimits};
use tidemark_telemetry::Metrics;
use tidemark_worker::{WorkerDeps, WorkerError, WorkerOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The lease a chain holds. Long enough that the worker's own renewal
/// (every third of it) never fires inside a test: fencing is then seen by
/// the commit, the step under test.
pub const LEASE: Duration = Duration::from_secs(30);

/// How long a test waits for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

/// Now, unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The one source every test feed reads: the mock, with retries and the
/// Retry-After cap kept small so a retried page costs milliseconds.
fn config_yaml(base_url: &str, feeds: &str) -> String {
    format!(
        "sources:\n  mock:\n    base_url: {base_url}\n    timeout: 5s\n    \
         retry: {{ max_attempts: 3, base_delay: 10ms, max_delay: 50ms, max_retry_after: 300ms }}\n\
         feeds:\n{feeds}"
    )
}

/// A feed of seed 003's style (Zendesk cursor export), 10 records a page,
/// from 2024-01-01 (the mock's first record), polled hourly, lag 5 s.
pub fn tickets(name: &str) -> String {
    format!(
        "  - name: {name}\n    source: mock\n    path: /api/v2/incremental/tickets/cursor.json\n    \
         records: /tickets\n    pagination: {{ preset: zendesk_cursor, page_size: 10 }}\n    \
         start: {{ param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }}\n    \
         key: /id\n    version: /updated_at\n    every: 1h\n    lag: 5s\n"
    )
}

/// A feed of seed 002's style: a keyset bulk walk, then page-numbered
/// incremental syncs with `updatedSince`, lag 2 s.
pub fn inspections(name: &str) -> String {
    format!(
        "  - name: {name}\n    source: mock\n    \
         path: /v2/clients/0b6e4c1a-1111-4c1a-9c1a-0b6e4c1a1111/inspections\n    \
         pagination: {{ preset: start_after, page_size: 10 }}\n    \
         key: /id\n    version: /updated_at\n    mode: bulk_then_incremental\n    lag: 2s\n    every: 1h\n    \
         incremental:\n      params: {{ paginationMode: PAGE }}\n      \
         start: {{ param: updatedSince, format: iso8601 }}\n      \
         pagination: {{ page_param: page, page_size_param: limit, page_size: 10, total_pages: /meta/totalPages }}\n"
    )
}

/// A feed on the mock's hostile API of `kind` (a good page, then a bad one).
pub fn hostile(name: &str, kind: &str) -> String {
    format!(
        "  - name: {name}\n    source: mock\n    path: /hostile/{kind}\n    records: /records\n    \
         pagination: {{ cursor_param: cursor, next_cursor: /next, has_more: /has_more }}\n    \
         key: /id\n    version: /updated_at\n    every: 1h\n"
    )
}

/// The job of a feed without partitions.
pub fn job(feed: &str) -> JobId {
    JobId::new(feed, DEFAULT_PARTITION)
}

/// One record as the downstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: String,
    pub updated_at: String,
    pub message_id: String,
}

/// One page as the downstream confirmed it.
#[derive(Debug, Clone)]
pub struct Page {
    pub feed: String,
    pub tenant: Option<String>,
    pub partition: String,
    pub seq: u64,
    pub records: Vec<Record>,
    /// When it was confirmed, unix ms.
    pub at_ms: u64,
}

/// Runs once, inside the downstream's publish of the next page: what
/// happens elsewhere while a page is in flight (after its fetch, before its
/// commit).
pub type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What the downstream confirmed, in order.
#[derive(Clone, Default)]
pub struct Received {
    pages: Arc<Mutex<Vec<Page>>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl Received {
    pub fn pages(&self) -> Vec<Page> {
        self.pages.lock().unwrap().clone()
    }

    /// Every record of every page, in arrival order.
    pub fn records(&self) -> Vec<Record> {
        self.pages().into_iter().flat_map(|p| p.records).collect()
    }

    pub fn keys(&self) -> Vec<String> {
        self.records().into_iter().map(|r| r.key).collect()
    }

    /// Run `hook` while the next page is being published.
    pub fn during_next_page(&self, hook: Hook) {
        *self.hook.lock().unwrap() = Some(hook);
    }

    fn take(&self, page: &OutPage) -> Result<(), String> {
        let records = page
            .records
            .iter()
            .map(|r| {
                let v: serde_json::Value =
                    serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                Ok(Record {
                    key: r.key.clone(),
                    updated_at: v["updated_at"].as_str().unwrap_or_default().to_string(),
                    message_id: r.message_id.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.pages.lock().unwrap().push(Page {
            feed: page.feed.clone(),
            tenant: page.tenant.clone(),
            partition: page.partition.clone(),
            seq: page.seq,
            records,
            at_ms: now_ms(),
        });
        let hook = self.hook.lock().unwrap().take();
        if let Some(hook) = hook {
            // The sink is synchronous; the hook drives the store, which is async.
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(hook()));
        }
        Ok(())
    }
}

/// A worker's stop signal and its task.
struct RunningWorker {
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<(), WorkerError>>,
}

/// The mock API (`records` records), a store with the feed registry and a
/// job per feed, the queue, the downstream, and (once started) a worker.
pub struct World {
    pub mock: MockServer,
    pub store: Arc<EmbeddedStore>,
    pub tasks: Arc<MemoryQueue>,
    pub metrics: Metrics,
    pub received: Received,
    config: Config,
    worker: Option<RunningWorker>,
    /// `--hot-chain-pages` of the worker [`World::start_worker`] starts.
    pub hot_chain_pages: u32,
    _dir: tempfile::TempDir,
}

impl World {
    /// Everything but the worker, which [`World::start_worker`] starts.
    pub async fn new(mock: MockConfig, feeds: &[String]) -> World {
        let mock = MockServer::start(mock, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("start the mock API");
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.json")).expect("open the store"));
        let config = load_str("test.yaml", &config_yaml(&mock.base_url(), &feeds.concat()))
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}"));
        // What a coordinator does when it registers feeds: the registry for
        // the workers, and one idle job per feed, due at once.
        publish_config(&*store, &config)
            .await
            .expect("publish the registry");
        for feed in &config.feeds {
            let init = Checkpoint {
                phase: Phase::Idle,
                stage: Stage::Bulk,
                ..Checkpoint::default()
            };
            store.ensure(&job(&feed.name), &init).await.expect("ensure");
        }
        World {
            mock,
            store,
            tasks: MemoryQueue::new(),
            metrics: Metrics::new(),
            received: Received::default(),
            config,
            worker: None,
            hot_chain_pages: WorkerOptions::default().hot_chain_pages,
            _dir: dir,
        }
    }

    /// A world whose source `mock` serves each tenant of `tenants` under
    /// `/t/{tenant}` with its own token (`tok-{tenant}`), with the source
    /// lines `extra` (indented four spaces); one job per feed and tenant.
    pub async fn tenanted(
        mock: MockConfig,
        extra: &str,
        tenants: &[&str],
        feeds: &[String],
    ) -> World {
        let mut w = World::new(mock, &[]).await;
        let yaml = config_yaml(&format!("{}/t/{{tenant}}", w.mock.base_url()), &feeds.concat())
            .replace(
                "    timeout: 5s\n",
                &format!(
                    "    timeout: 5s\n    auth: {{ bearer: \"tok-{{tenant}}\" }}\n    tenants: {{ list: [{}], metrics: true }}\n{extra}",
                    tenants.join(", ")
                ),
            );
        w.config = load_str("test.yaml", &yaml)
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}"));
        publish_config(&*w.store, &w.config)
            .await
            .expect("publish the registry");
        for feed in &w.config.feeds {
            for t in tenants {
                w.store
                    .ensure(
                        &JobId::new(&feed.name, format!("{t}/{DEFAULT_PARTITION}")),
                        &Checkpoint::default(),
                    )
                    .await
                    .expect("ensure");
            }
        }
        w
    }

    /// A world with a running worker.
    pub async fn start(mock: MockConfig, feeds: &[String]) -> World {
        let mut w = World::new(mock, feeds).await;
        w.start_worker();
        w
    }

    pub fn start_worker(&mut self) {
        let received = self.received.clone();
        let deps = WorkerDeps::new(
            self.store.clone(),
            self.tasks.clone(),
            Arc::new(MemoryDownstream::new(move |p| received.take(p))),
            self.metrics.clone(),
        );
        let opts = WorkerOptions {
            concurrency: 4,
            lease: LEASE,
            queue_lease: LEASE,
            grace: Duration::from_millis(200),
            registry_refresh: Duration::from_millis(10),
            hot_chain_pages: self.hot_chain_pages,
            hot_chain_time: Duration::from_secs(10),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tidemark_worker::run(deps, opts, async {
            let _ = stopped.await;
        });
        self.worker = Some(RunningWorker {
            stop,
            join: tokio::spawn(run),
        });
    }

    /// Stop the worker (not the world); it must stop within its grace.
    pub async fn stop_worker(&mut self) {
        if let Some(RunningWorker { stop, join }) = self.worker.take() {
            let _ = stop.send(());
            let result = tokio::time::timeout(PATIENCE, join)
                .await
                .expect("the worker stops within its grace")
                .expect("the worker task");
            assert!(result.is_ok(), "the worker failed: {result:?}");
        }
    }

    /// Stop the worker, then the mock; the worker must stop cleanly.
    pub async fn stop(mut self) {
        self.stop_worker().await;
        self.mock.shutdown().await;
    }

    pub fn mock_state(&self) -> MockState {
        self.mock.state()
    }

    /// Data requests the mock served.
    pub fn requests(&self) -> u64 {
        self.mock.state().stats().requests
    }

    pub fn set_faults(&self, f: Faults) {
        self.mock.state().set_faults(f);
    }

    pub async fn checkpoint(&self, job: &JobId) -> Checkpoint {
        self.store
            .get(job)
            .await
            .expect("read the checkpoint")
            .expect("the job exists")
    }

    /// Take the job's lease under a new epoch, as a coordinator starting a chain does.
    pub async fn take(&self, job: &JobId) -> u64 {
        match self
            .store
            .acquire(job, LEASE, false)
            .await
            .expect("acquire")
        {
            Acquire::Granted { epoch } => epoch,
            other => panic!("cannot take the lease of {job}: {other:?}"),
        }
    }

    /// Take the job's lease under a new epoch even while another is live
    /// (an operator's action, a re-issued chain).
    pub async fn take_over(&self, job: &JobId) -> u64 {
        take_over(&self.store, job).await
    }

    /// The first task of a chain under `epoch`, from the stored checkpoint.
    pub async fn first_task(&self, job: &JobId, epoch: u64) -> PageTask {
        let cp = self.checkpoint(job).await;
        PageTask {
            job: job.clone(),
            epoch,
            seq: cp.seq,
            cursor: cp.cursor,
            start_from: cp.start_from,
            attempt: 0,
            empty_run: 0,
            published_ms: now_ms(),
            vars: Default::default(),
        }
    }

    pub async fn publish(&self, task: &PageTask) {
        self.tasks
            .publish_task(task, None)
            .await
            .expect("publish a task");
    }

    /// Start a chain as the coordinator does: a new epoch, T0 stamped
    /// before the bulk walk of a `bulk_then_incremental` feed, the first
    /// task from the stored cursor. Returns the task.
    pub async fn start_chain(&self, job: &JobId) -> PageTask {
        let epoch = self.take(job).await;
        let cp = self.checkpoint(job).await;
        let bulk = self
            .config
            .feed(&job.feed)
            .is_some_and(|f| f.mode == Mode::BulkThenIncremental);
        if bulk && cp.stage == Stage::Bulk && cp.t0.is_none() {
            let t0 = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            assert!(self.store.set_t0(job, epoch, &t0).await.expect("set T0"));
        }
        let task = self.first_task(job, epoch).await;
        self.publish(&task).await;
        task
    }

    /// Wait until the job's chain has ended (idle again) or failed.
    pub async fn chain_ended(&self, job: &JobId) -> Checkpoint {
        eventually(&format!("the chain of {job} ends"), async || {
            matches!(
                self.checkpoint(job).await.phase,
                Phase::Idle | Phase::Failed
            )
        })
        .await;
        self.checkpoint(job).await
    }

    /// Wait until `source` is paused; the end of the pause (unix ms).
    pub async fn paused_until(&self, source: &str) -> u64 {
        eventually(&format!("the source {source} is paused"), async || {
            self.source_paused_until(source).await.is_some()
        })
        .await;
        self.source_paused_until(source).await.expect("paused")
    }

    pub async fn source_paused_until(&self, source: &str) -> Option<u64> {
        self.store
            .source_paused_until(source)
            .await
            .expect("read the source pause")
    }

    /// The next dead-lettered task, waiting for it.
    pub async fn dead_letter(&self) -> DeadLetter {
        let mut got = None;
        eventually("a task is dead-lettered", async || {
            got = self.tasks.take_dead_letter().await.expect("dead letters");
            got.is_some()
        })
        .await;
        got.expect("a dead letter")
    }

    /// The value of a metric as `/metrics` shows it (0 when absent).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        metric(&self.metrics, name, labels)
    }

    /// Wait until a metric reaches `at_least`.
    pub async fn metric_reaches(&self, name: &str, labels: &[(&str, &str)], at_least: u64) {
        eventually(
            &format!("{name}{labels:?} reaches {at_least}"),
            async || self.metric(name, labels) >= at_least,
        )
        .await;
    }
}

/// See [`World::take_over`]; a free function so a hook can own the store.
pub async fn take_over(store: &EmbeddedStore, job: &JobId) -> u64 {
    match store.acquire(job, LEASE, true).await.expect("acquire") {
        Acquire::Granted { epoch } => epoch,
        other => panic!("cannot take over the lease of {job}: {other:?}"),
    }
}

/// A commit of page `seq` of `job` under `epoch`, as another worker would
/// send it: the cursor moves to `cursor`, more to come.
pub async fn commit(
    store: &EmbeddedStore,
    job: &JobId,
    epoch: u64,
    seq: u64,
    cursor: &str,
) -> CommitOutcome {
    let c = Commit {
        epoch,
        expected_seq: seq,
        new_cursor: Some(cursor.to_string()),
        new_seq: seq + 1,
        high_water: None,
        count: 0,
        end_of_stream: false,
        next_due_ms: 0,
        lease_ms: LEASE.as_millis() as u64,
        restart: None,
        note: None,
        triggers: Vec::new(),
        batches: Vec::new(),
    };
    store.commit(job, &c).await.expect("commit")
}

/// The value of `name{labels}` in `metrics`, 0 when absent.
pub fn metric(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    metrics.value(name, labels) as u64
}

/// Wait until `cond` holds; panic, saying `what`, after a few seconds.
pub async fn eventually(what: &str, cond: impl AsyncFnMut() -> bool) {
    assert!(
        tidemark_harness::eventually(PATIENCE, Duration::from_millis(2), cond).await,
        "timed out waiting until {what}"
    );
}

/// Let the worker run on for a moment, before checking that something did
/// not happen (a step that would have happened takes a few milliseconds).
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A mock of `records` records served 10 a page.
pub fn mock(records: usize) -> MockConfig {
    MockConfig {
        records,
        page_size: 10,
        record_bytes: 120,
        ..MockConfig::default()
    }
}
