//! The run: the coordinator and the worker over the in-process queue, the
//! directory's store and the JSON Lines sink, until shutdown (or, with
//! `once`, until every job has reached its end of stream).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tidemark_bus::TaskQueue;
use tidemark_bus::memory::MemoryQueue;
use tidemark_coordinator::{CoordinatorDeps, CoordinatorOptions};
use tidemark_core::Config;
use tidemark_core::checkpoint::{NEVER_DUE_MS, Phase};
use tidemark_core::clock::now_ms;
use tidemark_state::StateStore;
use tidemark_telemetry::Metrics;
use tidemark_worker::{WorkerDeps, WorkerOptions};
use tokio::sync::watch;

use crate::{EmbeddedError, JsonlSink, Owned};

/// How an embedded run behaves: its worker's options (the flags of
/// `tidemark worker`, with the same defaults), the scheduler's tick, and
/// whether to stop after one walk of every job.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub worker: WorkerOptions,
    /// Time between two passes of the scheduler.
    pub tick: Duration,
    /// Stop once every job has walked to the end of its stream (and is
    /// waiting for its schedule), or failed or is paused.
    pub once: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            worker: WorkerOptions::default(),
            tick: Duration::from_millis(500),
            once: false,
        }
    }
}

/// Run the sync in this process until `shutdown` resolves (or, with
/// `once`, until every job has reached its end of stream). Returns the
/// failed jobs' errors when `once` ends with failures.
pub async fn sync(
    config: Config,
    owned: &Owned,
    sink: Arc<JsonlSink>,
    metrics: Metrics,
    opts: &EngineOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), EmbeddedError> {
    let store: Arc<dyn StateStore> = owned.store.clone();
    let started_ms = now_ms();
    owned.clear_requests();
    // Chains that were running when the last process died: re-issue them now
    // from their stored cursors instead of waiting for their leases to expire.
    // A failed write here is an error of the run: a chain not released
    // waits for its lease, and a job not made due never walks, so `--once`
    // would wait for it forever.
    for (job, cp) in store.list().await? {
        if cp.phase == Phase::Running {
            // False: the lease was no longer this epoch's; nothing to release.
            store.release(&job, cp.epoch).await?;
            tracing::info!(job = %job, seq = cp.seq, "resuming a chain left running by the last run");
        }
        // A child waiting for its parent stays waiting: its parent's walk
        // makes it due if the parent changed.
        let waits = cp.next_due_ms >= NEVER_DUE_MS;
        if opts.once && cp.phase == Phase::Idle && cp.next_due_ms > started_ms && !waits {
            // --once: every job walks now, whatever its schedule says.
            store
                .control(&job, &tidemark_state::Control::Resume)
                .await?;
        }
    }
    let queue = MemoryQueue::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let coordinator = tidemark_coordinator::run(
        CoordinatorDeps {
            store: store.clone(),
            tasks: queue.clone() as Arc<dyn TaskQueue>,
            metrics: metrics.clone(),
        },
        config.clone(),
        CoordinatorOptions {
            id: format!("embedded-{}", std::process::id()),
            tick: opts.tick,
            queue_lease: opts.worker.queue_lease,
            leader_ttl: Duration::from_secs(3600),
            ..CoordinatorOptions::default()
        },
        stopped(stop_rx.clone()),
    );
    let worker = tidemark_worker::run(
        WorkerDeps::new(owned.store.clone(), queue.clone(), sink, metrics),
        opts.worker.clone(),
        stopped(stop_rx.clone()),
    );
    let feeds: Vec<String> = config.feeds.iter().map(|f| f.name.clone()).collect();
    // --once waits for a job of every feed that has partitions now (a
    // backfill whose windows have not begun has none yet).
    let feeds_with_jobs: Vec<String> = config
        .feeds
        .iter()
        .filter(|f| {
            // A child feed's jobs come from its parents' records, if any.
            f.parent.is_none()
                && f.partitions(chrono::Utc::now())
                    .is_ok_and(|p| !p.is_empty())
        })
        .map(|f| f.name.clone())
        .collect();
    let watcher = async {
        tokio::pin!(shutdown);
        let mut every = tokio::time::interval(opts.tick.min(Duration::from_millis(250)));
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = every.tick() => {}
            }
            owned.serve_requests().await;
            if opts.once && all_done(&*store, &feeds_with_jobs, started_ms).await {
                tracing::info!("--once: every job reached its end of stream");
                break;
            }
        }
        let _ = stop_tx.send(true);
    };
    let (c, w, ()) = tokio::join!(coordinator, worker, watcher);
    c?;
    w?;
    if opts.once {
        let failed: Vec<String> = store
            .list()
            .await?
            .into_iter()
            .filter(|(j, cp)| cp.phase == Phase::Failed && feeds.contains(&j.feed))
            .map(|(j, cp)| format!("{j}: {}", cp.last_error.unwrap_or_default()))
            .collect();
        if !failed.is_empty() {
            return Err(EmbeddedError::JobsFailed(failed));
        }
    }
    Ok(())
}

/// True when every job of `feeds` exists and has finished a walk since
/// `since_ms` and waits for its schedule, or is failed or paused.
async fn all_done(store: &dyn StateStore, feeds: &[String], since_ms: u64) -> bool {
    let Ok(jobs) = store.list().await else {
        return false;
    };
    let now = now_ms();
    let mut seen: Vec<&str> = Vec::new();
    for (job, cp) in &jobs {
        // A child job (or batch slot) is done when nothing makes it due:
        // it may not have run in this walk, its parent unchanged.
        if cp.phase == Phase::Running
            || (cp.phase == Phase::Idle
                && cp.next_due_ms <= now
                && (cp.parent_version.is_some() || cp.batch_size > 0))
        {
            return false;
        }
        let Some(f) = feeds.iter().find(|f| **f == job.feed) else {
            continue;
        };
        seen.push(f);
        let done = match cp.phase {
            Phase::Failed | Phase::Paused => true,
            Phase::Idle => {
                cp.last_end_of_stream_ms.is_some_and(|t| t >= since_ms) && cp.next_due_ms > now
            }
            Phase::Running => false,
        };
        if !done {
            return false;
        }
    }
    feeds.iter().all(|f| seen.contains(&f.as_str()))
}
