//! Shared setup of the coordinator's in-process tests: an embedded store in
//! a temp dir, the in-process task queue (read by the test in place of
//! workers), a feed config, and coordinators running on them.
//!
//! The coordinator never calls the feeds' API, so no mock API runs here: the
//! source's URL is never contacted. Every call on the store goes through
//! this module, so the tests read as the duties they check.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tidemark_bus::memory::MemoryQueue;
use tidemark_bus::{PageTask, TaskQueue};
use tidemark_coordinator::ops::{self, Action, ActionReport};
use tidemark_coordinator::{CoordinatorDeps, CoordinatorOptions};
use tidemark_core::Config;
use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId};
use tidemark_core::config::load_str;
use tidemark_state::{EmbeddedStore, Jobs, Leases, StateError};
use tidemark_telemetry::Metrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long a test waits for something that takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

/// Time between two passes of every coordinator here.
pub const TICK: Duration = Duration::from_millis(10);

/// Now, unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A feed of seed 003's style with two partitions, `a` and `b`.
pub fn tickets(name: &str) -> String {
    format!(
        "  - name: {name}\n    source: api\n    path: /api/v2/incremental/tickets/cursor.json\n    \
         records: /tickets\n    pagination: {{ preset: zendesk_cursor, page_size: 10 }}\n    \
         start: {{ param: start_time, format: unix, from: \"2024-01-01T00:00:00Z\" }}\n    \
         key: /id\n    version: /updated_at\n    every: 1h\n    \
         partitions: {{ param: account, values: [\"a\", \"b\"] }}\n"
    )
}

/// A feed like [`tickets`] with `n` partitions, `p0` to `p{n-1}`.
pub fn partitioned(name: &str, n: usize) -> String {
    let values: Vec<String> = (0..n).map(|i| format!("\"p{i}\"")).collect();
    tickets(name).replace(
        "values: [\"a\", \"b\"]",
        &format!("values: [{}]", values.join(", ")),
    )
}

/// A feed of seed 002's style: a bulk walk, then incremental syncs.
pub fn inspections(name: &str) -> String {
    format!(
        "  - name: {name}\n    source: api\n    path: /v2/clients/x/inspections\n    \
         pagination: {{ preset: start_after, page_size: 10 }}\n    \
         key: /id\n    version: /updated_at\n    mode: bulk_then_incremental\n    every: 1h\n    \
         incremental:\n      params: {{ paginationMode: PAGE }}\n      \
         start: {{ param: updatedSince, format: iso8601 }}\n      \
         pagination: {{ page_param: page, page_size_param: limit, page_size: 10 }}\n"
    )
}

/// The store, the queue and the config the coordinators share.
pub struct World {
    pub store: Arc<EmbeddedStore>,
    pub tasks: Arc<MemoryQueue>,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// One running coordinator.
pub struct Running {
    pub metrics: Metrics,
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<(), StateError>>,
}

impl Running {
    /// Stop it as on SIGTERM (it resigns the leadership); it must stop cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(PATIENCE, self.join)
            .await
            .expect("the coordinator stops")
            .expect("the coordinator task");
        assert!(result.is_ok(), "the coordinator failed: {result:?}");
    }

    /// End it as a crash would: no resignation, nothing more written.
    pub async fn crash(self) {
        self.join.abort();
        let _ = self.join.await;
    }

    /// True while it says it leads (`tidemark_coordinator_leader`).
    pub fn leads(&self) -> bool {
        self.metric("tidemark_coordinator_leader", &[]) == 1
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        metric(&self.metrics, name, labels)
    }

    /// Wait until a metric reaches `value` (a chain is counted just after
    /// its task is published), then check it does not go past it.
    pub async fn metric_is(&self, name: &str, labels: &[(&str, &str)], value: u64) {
        eventually(&format!("{name}{labels:?} reaches {value}"), async || {
            self.metric(name, labels) >= value
        })
        .await;
        assert_eq!(self.metric(name, labels), value, "{name}{labels:?}");
    }
}

impl World {
    pub fn new(feeds: &[String]) -> World {
        Self::with_source("", feeds)
    }

    /// A world whose source `api` has these extra lines (each indented by
    /// four spaces, e.g. a `tenants:` block); `{dir}` in them is the
    /// world's temp dir.
    pub fn with_source(extra: &str, feeds: &[String]) -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.json")).expect("open the store"));
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        // Port 9 (discard): the coordinator never calls the API.
        let yaml = format!(
            "sources:\n  api:\n    base_url: http://127.0.0.1:9/t/{{tenant}}\n{extra}feeds:\n{}",
            feeds.concat()
        )
        .replace("/t/{tenant}\nfeeds", "\nfeeds");
        let config = load_str("test.yaml", &yaml)
            .unwrap_or_else(|e| panic!("the test config is invalid: {e}"));
        World {
            store,
            tasks: MemoryQueue::new(),
            config,
            dir,
        }
    }

    /// Start a coordinator named `id` whose chains' first tasks may wait `lease`
    /// and whose leadership lapses `leader_ttl` after its last renewal.
    pub fn coordinator(&self, id: &str, lease: Duration, leader_ttl: Duration) -> Running {
        self.coordinator_with(CoordinatorOptions {
            id: id.to_string(),
            tick: TICK,
            queue_lease: lease,
            leader_ttl,
            ..Default::default()
        })
    }

    /// Start a coordinator with these options.
    pub fn coordinator_with(&self, opts: CoordinatorOptions) -> Running {
        let metrics = Metrics::new();
        let deps = CoordinatorDeps {
            store: self.store.clone(),
            tasks: self.tasks.clone(),
            metrics: metrics.clone(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tidemark_coordinator::run(deps, self.config.clone(), opts, async {
            let _ = stopped.await;
        });
        Running {
            metrics,
            stop,
            join: tokio::spawn(run),
        }
    }

    /// The next page task on the queue, taken as a worker takes it.
    pub async fn next_task(&self) -> PageTask {
        let delivery = tokio::time::timeout(PATIENCE, self.tasks.next_delivery())
            .await
            .expect("a page task within the patience")
            .expect("the queue is open");
        let task = delivery.task().expect("a well-formed page task");
        delivery.ack().await.expect("ack");
        task
    }

    /// The next page task of `job`, taking (and dropping) those of other jobs.
    pub async fn next_task_of(&self, job: &JobId) -> PageTask {
        loop {
            let task = self.next_task().await;
            if &task.job == job {
                return task;
            }
        }
    }

    /// Assert that no page task is published for a while (many passes).
    pub async fn no_task(&self, why: &str) {
        let waited = tokio::time::timeout(TICK * 10, self.tasks.next_delivery()).await;
        if let Ok(Ok(d)) = waited {
            panic!("{why}, yet a task was published: {:?}", d.task());
        }
    }

    /// Create a job as it stands, before a coordinator does.
    pub async fn seed(&self, job: &JobId, cp: Checkpoint) {
        assert!(self.store.ensure(job, &cp).await.expect("ensure"));
    }

    pub async fn checkpoint(&self, job: &JobId) -> Checkpoint {
        self.store
            .get(job)
            .await
            .expect("read the checkpoint")
            .expect("the job exists")
    }

    /// A worker's commit of page `seq` of `job` under `epoch`: the cursor
    /// moves to `cursor`, more to come, the lease lasts `lease` from now.
    pub async fn commit(
        &self,
        job: &JobId,
        epoch: u64,
        seq: u64,
        cursor: &str,
        lease: Duration,
    ) -> CommitOutcome {
        let c = Commit {
            epoch,
            expected_seq: seq,
            new_cursor: Some(cursor.to_string()),
            new_seq: seq + 1,
            high_water: None,
            count: 10,
            end_of_stream: false,
            next_due_ms: 0,
            lease_ms: lease.as_millis() as u64,
            restart: None,
            note: None,
            triggers: Vec::new(),
            batches: Vec::new(),
        };
        self.store.commit(job, &c).await.expect("commit")
    }

    /// An operator's action on every job of `feed` (or one partition of it).
    pub async fn operator(
        &self,
        feed: &str,
        partition: Option<&str>,
        action: Action,
    ) -> ActionReport {
        ops::apply(
            &*self.store,
            &ops::Selection::partition(feed, partition),
            &action,
        )
        .await
        .unwrap_or_else(|e| panic!("{action:?}: {e}"))
    }

    /// The feed registry the workers read, if registered.
    pub async fn registry(&self) -> Option<(u64, Config)> {
        tidemark_state::registry::load_config(&*self.store)
            .await
            .expect("read the registry")
    }
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
