//! tidemark-worker: the stateless role. It takes page tasks from the task
//! queue, runs up to `concurrency` of them at once, and for each follows
//! DESIGN.md's "life of a page" ([`page`]). It needs no config file: feed
//! definitions come from the registry in the state store, secrets from its
//! own environment.
//!
//! Shutdown: when `shutdown` resolves the worker stops taking tasks, lets
//! the pages in flight finish for up to `grace`, then abandons the rest
//! (their tasks go back to the queue unacked, and their leases are released
//! so the coordinator re-issues them at once) and returns.

mod feeds;
mod page;

/// A crash point in the life of a page. With the `failpoints` feature and
/// `FAILPOINTS=<name>=<actions>` in the environment (e.g.
/// `worker::after_publish=5*off->return`), the `return` action ends the
/// process at once, as a SIGKILL would: nothing after this point happens.
/// Without the feature it compiles to nothing.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| $crate::crash($name));
    };
}
pub(crate) use crash_point;

/// Arm the failpoints named in `FAILPOINTS` (`name=actions;name=actions`).
/// Configured point by point rather than with `fail::FailScenario`, whose
/// guard holds a lock across the worker's awaits (and across workers that
/// share a process).
#[cfg(feature = "failpoints")]
fn arm_failpoints() {
    let Ok(all) = std::env::var("FAILPOINTS") else {
        return;
    };
    tracing::warn!(failpoints = %all, "failpoints armed (a test build)");
    for point in all.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((name, actions)) = point.split_once('=') else {
            tracing::error!(point, "FAILPOINTS: expected name=actions");
            continue;
        };
        if let Err(e) = fail::cfg(name.trim(), actions.trim()) {
            tracing::error!(point, error = %e, "FAILPOINTS: cannot arm");
        }
    }
}

/// End the process now, as a crash would (no destructors, no acks).
#[cfg(feature = "failpoints")]
pub(crate) fn crash<T>(name: &str) -> T {
    eprintln!("tidemark worker: failpoint {name}: crashing");
    std::process::exit(86)
}

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use tidemark_bus::{BusError, Downstream, PageTask, TaskDelivery, TaskQueue};
use tidemark_core::checkpoint::JobId;
use tidemark_core::options::parse_duration;
use tidemark_state::{FeedRegistry, Fleet, Leases, SourceLimits};
use tidemark_telemetry::Metrics;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use page::Outcome;

/// How a worker behaves: the flags of `tidemark worker` (and of `tidemark
/// run`, whose worker it configures); `Default` is the flags' defaults.
/// Retries are not here: the source's `retry:` block governs them.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerOptions {
    /// Page tasks worked on at once.
    #[arg(long, env = "TIDEMARK_CONCURRENCY", default_value = "8",
          value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub concurrency: usize,
    /// The processing lease: from when a worker takes a page task, a chain
    /// silent this long is re-issued. A page renews it every third of it
    /// while it works.
    #[arg(long, env = "TIDEMARK_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,
    /// How long a published page task may wait for a worker before its
    /// chain is taken for lost (the broker lost it, or a worker died
    /// between a commit and the next task) and re-issued. A task that only
    /// waited longer is refused when it is finally taken (the re-issue took
    /// a new epoch): a spare task, not a second delivery.
    #[arg(long, env = "TIDEMARK_QUEUE_LEASE", default_value = "2m", value_parser = parse_duration)]
    pub queue_lease: Duration,
    /// After SIGTERM, how long in-flight pages may take to finish before
    /// they are handed back.
    #[arg(long, env = "TIDEMARK_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How often the feed registry's version is checked for a new config.
    #[arg(long, env = "TIDEMARK_REGISTRY_REFRESH", default_value = "2s", value_parser = parse_duration)]
    pub registry_refresh: Duration,
    /// A hot chain: after committing a page, the worker goes on with the
    /// next page itself (fetched ahead while the page was published and
    /// committed) for up to this many pages before it hands the chain back
    /// through the task queue, so other jobs get their turn. 0: every page
    /// goes through the queue, and nothing is fetched ahead.
    #[arg(long, env = "TIDEMARK_HOT_CHAIN_PAGES", default_value = "100")]
    pub hot_chain_pages: u32,
    /// The longest a worker keeps one chain before handing it back through
    /// the task queue (whichever of this and --hot-chain-pages comes first).
    #[arg(long, env = "TIDEMARK_HOT_CHAIN_TIME", default_value = "10s", value_parser = parse_duration)]
    pub hot_chain_time: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        tidemark_core::options::defaults()
    }
}

/// What a worker runs on: of the state store, only the capabilities a page
/// uses (usually one store, handed over by [`WorkerDeps::new`]).
#[derive(Clone)]
pub struct WorkerDeps {
    /// The job's checkpoint, lease and fenced commit (steps 1 and 6,
    /// renewals, failures, cursor recovery).
    pub leases: Arc<dyn Leases>,
    /// The feed definitions the coordinator registered.
    pub registry: Arc<dyn FeedRegistry>,
    /// The source's shared rate limiter and pause (step 2).
    pub limits: Arc<dyn SourceLimits>,
    /// Where the worker's heartbeat tells the coordinator its concurrency.
    pub fleet: Arc<dyn Fleet>,
    pub tasks: Arc<dyn TaskQueue>,
    pub downstream: Arc<dyn Downstream>,
    pub metrics: Metrics,
}

impl WorkerDeps {
    /// A worker's dependencies on one store that has every capability it needs.
    pub fn new<S>(
        store: Arc<S>,
        tasks: Arc<dyn TaskQueue>,
        downstream: Arc<dyn Downstream>,
        metrics: Metrics,
    ) -> Self
    where
        S: Leases + FeedRegistry + SourceLimits + Fleet + 'static,
    {
        Self {
            leases: store.clone(),
            registry: store.clone(),
            limits: store.clone(),
            fleet: store,
            tasks,
            downstream,
            metrics,
        }
    }
}

pub struct Worker {
    leases: Arc<dyn Leases>,
    limits: Arc<dyn SourceLimits>,
    tasks: Arc<dyn TaskQueue>,
    downstream: Arc<dyn Downstream>,
    metrics: Metrics,
    feeds: feeds::Feeds,
    opts: WorkerOptions,
    in_flight: Mutex<HashMap<u64, (JobId, u64)>>,
    next_id: AtomicU64,
    /// Set at shutdown: hot chains are handed back through the queue.
    stopping: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("task queue: {0}")]
    Queue(#[from] BusError),
}

/// Run a worker until `shutdown` resolves.
pub async fn run(
    deps: WorkerDeps,
    opts: WorkerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    let worker = Arc::new(Worker {
        feeds: feeds::Feeds::new(deps.registry, opts.registry_refresh),
        leases: deps.leases,
        limits: deps.limits,
        tasks: deps.tasks,
        downstream: deps.downstream,
        metrics: deps.metrics,
        opts: opts.clone(),
        in_flight: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
    });
    #[cfg(feature = "failpoints")]
    arm_failpoints();
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut running = JoinSet::new();
    tokio::pin!(shutdown);
    let id = format!("worker-{}", uuid::Uuid::new_v4().simple());
    let concurrency = u32::try_from(opts.concurrency).unwrap_or(u32::MAX);
    let beating = tokio::spawn(heartbeat(deps.fleet.clone(), id.clone(), concurrency));
    tracing::info!(concurrency = opts.concurrency, id = %id, "worker started");
    let result = loop {
        while running.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break Ok(()),
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let delivery = tokio::select! {
            () = &mut shutdown => break Ok(()),
            d = worker.tasks.next_delivery() => d,
        };
        match delivery {
            Ok(d) => {
                let w = worker.clone();
                running.spawn(async move {
                    w.handle(d).await;
                    drop(permit);
                });
            }
            Err(BusError::Closed) => break Err(WorkerError::Queue(BusError::Closed)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot receive page tasks; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    worker.stopping.store(true, Ordering::SeqCst);
    tracing::info!(in_flight = running.len(), "worker stopping: no new tasks");
    beating.abort();
    if let Err(e) = deps.fleet.leave(&id, concurrency).await {
        tracing::debug!(error = %e, "cannot leave the fleet; the heartbeat lapses by itself");
    }
    let drained = tokio::time::timeout(opts.grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        running.abort_all();
        while running.join_next().await.is_some() {}
        let left: Vec<(JobId, u64)> = worker
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, v)| v)
            .collect();
        tracing::warn!(
            pages = left.len(),
            "grace period over: releasing unfinished pages"
        );
        for (job, epoch) in left {
            if let Err(e) = worker.leases.release(&job, epoch).await {
                tracing::warn!(job = %job, error = %e, "cannot release the lease");
            }
        }
    }
    result
}

/// How often a worker says it is alive, and how long one heartbeat lasts.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

/// Tell the coordinator, every few seconds, that this worker is alive with
/// `concurrency` slots (its admission control sizes itself by the fleet).
async fn heartbeat(fleet: Arc<dyn Fleet>, id: String, concurrency: u32) {
    let mut every = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        every.tick().await;
        if let Err(e) = fleet.heartbeat(&id, concurrency, HEARTBEAT_TTL).await {
            tracing::warn!(error = %e, "cannot send the worker heartbeat");
        }
    }
}

impl Worker {
    async fn handle(&self, d: TaskDelivery) {
        let task = match d.task() {
            Ok(t) => t,
            Err(e) => return self.reject(d, "malformed", &e).await,
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (task.job.clone(), task.epoch));
        self.metrics.tasks_in_flight.inc();
        let (outcome, at) = self.process(task).await;
        self.metrics.tasks_in_flight.dec();
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.settle(d, &at, outcome).await;
    }

    /// Ack, retry, fail or give back the delivery according to `outcome`
    /// of the page `at` ended on: the delivery's own, or one the worker
    /// carried the chain on to (its task is what is retried, dead-lettered
    /// or handed back then).
    async fn settle(&self, mut d: TaskDelivery, at: &page::Carried, outcome: Outcome) {
        let task = &at.task;
        let job = &task.job;
        match outcome {
            Outcome::Done | Outcome::Recovered => {
                crash_point!("worker::before_ack");
                ack(d).await
            }
            Outcome::Dropped(reason) => self.drop_task(d, task, reason).await,
            Outcome::Rejected { reason, error } => self.reject(d, reason, &error).await,
            Outcome::Retry { delay, error } => {
                tracing::warn!(job = %job, seq = task.seq, attempt = task.attempt + 1, delay_ms = delay.as_millis() as u64, error = %error, "page failed; retrying later");
                // The lease must outlast the wait, or the chain is re-issued
                // meanwhile; a refused renewal means a newer epoch owns the
                // job, and this task has nothing more to do.
                match self
                    .leases
                    .renew(job, task.epoch, delay.saturating_add(self.opts.queue_lease))
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return self.drop_task(d, task, "fenced").await,
                    Err(e) => {
                        tracing::warn!(job = %job, error = %e, "cannot renew the lease for the retry; giving the task back");
                        return self.give_back(d).await;
                    }
                }
                let mut again = task.clone();
                again.attempt += 1;
                match self.tasks.publish_task(&again, Some(delay)).await {
                    Ok(()) => {
                        self.metrics
                            .tasks_retried
                            .get_or_create(&Metrics::feed(&job.feed))
                            .inc();
                        ack(d).await;
                    }
                    Err(e) => {
                        tracing::warn!(job = %job, error = %e, "cannot publish the retry; giving the task back");
                        self.give_back(d).await;
                    }
                }
            }
            Outcome::Fail { error } => {
                if at.carried {
                    // The dead letter holds the page that failed, not the
                    // one the delivery named.
                    match serde_json::to_vec(task) {
                        Ok(body) => d.body = body.into(),
                        Err(e) => {
                            tracing::warn!(job = %job, error = %e, "cannot encode the failed page's task")
                        }
                    }
                }
                self.fail(d, task, &error).await
            }
            Outcome::Requeue { error } => {
                tracing::warn!(job = %job, seq = task.seq, error = %error, "infrastructure error; giving the task back");
                if at.carried {
                    // The delivery names a page already committed: hand on
                    // the carried page's task instead.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match self.tasks.publish_task(task, None).await {
                        Ok(()) => return ack(d).await,
                        Err(e) => {
                            tracing::warn!(job = %job, error = %e, "cannot hand the chain back; the coordinator re-issues it when its lease runs out");
                        }
                    }
                }
                self.give_back(d).await;
            }
        }
    }

    /// Dead-letter a task that is wrong in itself, with `reason` and `error`.
    async fn reject(&self, d: TaskDelivery, reason: &str, error: &str) {
        tracing::error!(reason, error, "invalid page task; dead-lettering it");
        self.metrics
            .tasks_dead_lettered
            .get_or_create(&Metrics::feed(""))
            .inc();
        if let Err(err) = self.tasks.dead_letter(d, reason, error).await {
            tracing::warn!(error = %err, "cannot dead-letter an invalid task");
        }
    }

    /// Ack a task that has nothing (more) to do, counting why.
    async fn drop_task(&self, d: TaskDelivery, task: &PageTask, reason: &'static str) {
        tracing::debug!(job = %task.job, seq = task.seq, epoch = task.epoch, reason, "task dropped");
        self.metrics
            .tasks_dropped
            .get_or_create(&Metrics::reason(reason))
            .inc();
        ack(d).await;
    }

    async fn give_back(&self, d: TaskDelivery) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Err(e) = d.requeue().await {
            tracing::debug!(error = %e, "requeue not delivered; the broker redelivers the task");
        }
    }

    async fn fail(&self, d: TaskDelivery, task: &PageTask, error: &str) {
        let job = &task.job;
        tracing::error!(job = %job, seq = task.seq, error = %error, "job failed");
        match self.leases.fail(job, task.epoch, error).await {
            Ok(true) => {
                self.metrics
                    .jobs_failed
                    .get_or_create(&Metrics::feed(&job.feed))
                    .inc();
            }
            Ok(false) => {
                // A newer epoch owns the job: this task is stale, nothing to report.
                self.drop_task(d, task, "fenced").await;
                return;
            }
            Err(e) => {
                tracing::warn!(job = %job, error = %e, "cannot mark the job failed; giving the task back");
                self.give_back(d).await;
                return;
            }
        }
        self.metrics
            .tasks_dead_lettered
            .get_or_create(&Metrics::feed(&job.feed))
            .inc();
        if let Err(e) = self.tasks.dead_letter(d, "failed", error).await {
            tracing::warn!(job = %job, error = %e, "cannot dead-letter the task");
        }
    }
}

/// Ack a delivery; a lost ack only means the task comes back and is dropped.
async fn ack(d: TaskDelivery) {
    if let Err(e) = d.ack().await {
        tracing::debug!(error = %e, "ack not delivered; the task will come back and be dropped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::WorkerOptions;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: WorkerOptions,
    }

    #[test]
    fn the_library_default_is_the_flags_default() {
        let d = WorkerOptions::default();
        assert_eq!(d.concurrency, 8);
        assert_eq!(d.lease, Duration::from_secs(60));
        assert_eq!(d.queue_lease, Duration::from_secs(120));
        assert_eq!(d.grace, Duration::from_secs(25));
        assert_eq!(d.registry_refresh, Duration::from_secs(2));
        assert_eq!(d.hot_chain_pages, 100);
        assert_eq!(d.hot_chain_time, Duration::from_secs(10));
        let flags = Cli::try_parse_from(["worker", "--concurrency", "3", "--grace", "500ms"])
            .expect("flags parse")
            .opts;
        assert_eq!(
            (flags.concurrency, flags.grace),
            (3, Duration::from_millis(500))
        );
        assert!(Cli::try_parse_from(["worker", "--concurrency", "0"]).is_err());
        assert!(Cli::try_parse_from(["worker", "--lease", "soon"]).is_err());
    }
}
