//! tidemark-coordinator: the role that keeps every chain going.
//!
//! One coordinator leads at a time (a lease in the state store, renewed every
//! tick; standbys wait and take over when it lapses). The leader registers
//! the feeds (the config, secrets still as `${VAR}` references) with a
//! version, creates a job for every partition, and on every tick:
//!
//! - starts a chain for every idle job that is due: a new epoch, T0 stamped
//!   before the bulk walk of a `bulk_then_incremental` feed, and the first
//!   page task from the stored cursor (or start point);
//! - re-issues, under a new epoch, every running chain whose lease expired
//!   (its worker died, or its next task was lost): the stored cursor is the
//!   truth, so nothing is skipped;
//! - leaves paused and failed jobs alone, and reports phases and lag.
//!
//! The bulk→incremental handoff, snapshot restarts and cursor recovery are
//! written by workers in their last commit (or recovery step) and picked up
//! here as an idle job that is due.

pub mod admin;
pub mod ops;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use tidemark_bus::{PageTask, TaskQueue};
use tidemark_core::Config;
use tidemark_core::checkpoint::{Checkpoint, JobId, Phase, Stage};
use tidemark_core::clock::now_ms;
use tidemark_core::config::Mode;
use tidemark_core::options::parse_duration;
use tidemark_core::timefmt::parse_timestamp;
use tidemark_state::registry::publish_config;
use tidemark_state::{Acquire, LeaderGuard, StateError, StateStore};
use tidemark_telemetry::Metrics;

/// How a coordinator behaves: the flags of `tidemark coordinator`;
/// `Default` is the flags' defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorOptions {
    /// This replica's name in the leader election (default: a random one).
    #[arg(long, env = "TIDEMARK_ID", default_value_t = default_id())]
    pub id: String,
    /// Time between two passes over the jobs.
    #[arg(long, env = "TIDEMARK_TICK", default_value = "1s", value_parser = parse_duration)]
    pub tick: Duration,
    /// The lease of a chain: a chain silent this long is re-issued.
    #[arg(long, env = "TIDEMARK_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lease: Duration,
    /// The leadership lease: how soon a standby takes over from a dead leader.
    #[arg(long, env = "TIDEMARK_LEADER_TTL", default_value = "10s", value_parser = parse_duration)]
    pub leader_ttl: Duration,
    /// How often the registry and the job list are written again (time windows grow).
    #[arg(long, env = "TIDEMARK_REGISTER_EVERY", default_value = "60s", value_parser = parse_duration)]
    pub register_every: Duration,
}

/// A leader-election name no other replica has.
fn default_id() -> String {
    format!("coordinator-{}", uuid::Uuid::new_v4().simple())
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        tidemark_core::options::defaults()
    }
}

#[derive(Clone)]
pub struct CoordinatorDeps {
    /// Used for its job table and leases (to start chains), the feed
    /// registry and leadership: every capability but the source limits.
    pub store: Arc<dyn StateStore>,
    pub tasks: Arc<dyn TaskQueue>,
    pub metrics: Metrics,
}

/// Run a coordinator until `shutdown` resolves; it then resigns the leadership.
pub async fn run(
    deps: CoordinatorDeps,
    config: Config,
    opts: CoordinatorOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StateError> {
    let leader = LeaderGuard::new(deps.store.clone(), opts.id.clone(), opts.leader_ttl);
    let mut c = Coordinator {
        deps,
        config,
        opts,
        registered: None,
    };
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(c.opts.tick.min(c.opts.leader_ttl / 3));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        let leads = match leader.tick().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the state store for the leadership");
                false
            }
        };
        if leads != was_leader {
            tracing::info!(id = %c.opts.id, leader = leads, "leadership changed");
            c.registered = None;
            was_leader = leads;
        }
        c.deps.metrics.leader.set(i64::from(leads));
        if !leads {
            continue;
        }
        let started = Instant::now();
        if let Err(e) = c.pass(&leader).await {
            tracing::warn!(error = %e, "coordinator pass failed; trying again next tick");
        }
        c.deps
            .metrics
            .coordinator_pass_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    c.deps.metrics.leader.set(0);
    if let Err(e) = leader.resign().await {
        tracing::warn!(error = %e, "cannot resign the leadership; it lapses by itself");
    }
    tracing::info!(id = %c.opts.id, "coordinator stopped");
    Ok(())
}

/// Chains a pass starts concurrently.
const CHAIN_STARTS_AT_ONCE: usize = 32;

/// Why a chain is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// An idle job reached its next due time.
    Due,
    /// A running chain's lease expired: re-issue it under a new epoch.
    LeaseExpired,
}

struct Coordinator {
    deps: CoordinatorDeps,
    config: Config,
    opts: CoordinatorOptions,
    registered: Option<Instant>,
}

impl Coordinator {
    /// Register the feeds and create their jobs.
    async fn register(&mut self) -> Result<(), StateError> {
        let store = &*self.deps.store;
        let version = publish_config(store, &self.config).await?;
        let mut created = 0;
        for feed in &self.config.feeds {
            let parts = match feed.partitions(Utc::now()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(feed = %feed.name, error = %e, "cannot split the feed into jobs");
                    continue;
                }
            };
            for p in parts {
                let job = JobId::new(&feed.name, &p.id);
                let init = Checkpoint {
                    phase: Phase::Idle,
                    stage: Stage::Bulk,
                    next_due_ms: 0,
                    ..Checkpoint::default()
                };
                if store.ensure(&job, &init).await? {
                    created += 1;
                }
            }
        }
        tracing::info!(version, created, "feeds registered");
        self.registered = Some(Instant::now());
        Ok(())
    }

    async fn pass(&mut self, leader: &LeaderGuard) -> Result<(), StateError> {
        if self
            .registered
            .is_none_or(|t| t.elapsed() >= self.opts.register_every)
        {
            self.register().await?;
        }
        let feeds: HashSet<&str> = self.config.feeds.iter().map(|f| f.name.as_str()).collect();
        let jobs = self.deps.store.list().await?;
        let now = now_ms();
        let m = &self.deps.metrics;
        let mut phases: HashMap<&'static str, i64> = HashMap::new();
        let mut due: Vec<(JobId, Why)> = Vec::new();
        for (job, cp) in jobs {
            if !feeds.contains(job.feed.as_str()) {
                continue;
            }
            *phases.entry(cp.phase.as_str()).or_default() += 1;
            if let Some(lag) = cp
                .high_water
                .as_deref()
                .and_then(|h| parse_timestamp(h).ok())
                .map(|t| (Utc::now() - t).num_milliseconds() as f64 / 1000.0)
            {
                m.job_lag_seconds
                    .get_or_create(&Metrics::job(&job.feed, &job.partition))
                    .set(lag);
            }
            if !leader.is_leader() {
                continue;
            }
            let why = match cp.phase {
                Phase::Idle if cp.next_due_ms <= now => Why::Due,
                Phase::Running if cp.lease_until_ms <= now => Why::LeaseExpired,
                _ => continue,
            };
            due.push((job, why));
        }
        // Each start is a few round trips (lease, checkpoint, confirmed
        // publish); running them side by side keeps a pass over thousands
        // of due jobs well inside a tick and the leader's lease.
        let this = &*self;
        futures::stream::iter(due)
            .for_each_concurrent(CHAIN_STARTS_AT_ONCE, |(job, why)| async move {
                if let Err(e) = this.start_chain(&job, why).await {
                    tracing::warn!(job = %job, error = %e, "cannot start the chain; trying again next tick");
                }
            })
            .await;
        for phase in [Phase::Idle, Phase::Running, Phase::Paused, Phase::Failed] {
            m.jobs
                .get_or_create(&Metrics::phase(phase.as_str()))
                .set(phases.get(phase.as_str()).copied().unwrap_or(0));
        }
        Ok(())
    }

    /// Take a new epoch and publish the chain's first task.
    async fn start_chain(&self, job: &JobId, why: Why) -> Result<(), StateError> {
        let store = &*self.deps.store;
        let epoch = match store.acquire(job, self.opts.lease, false).await? {
            Acquire::Granted { epoch } => epoch,
            _ => return Ok(()),
        };
        let Some(cp) = store.get(job).await? else {
            return Ok(());
        };
        if cp.epoch != epoch {
            return Ok(()); // an operator acted meanwhile; their epoch wins
        }
        let bulk_start = self
            .config
            .feed(&job.feed)
            .is_some_and(|f| f.mode == Mode::BulkThenIncremental)
            && cp.stage == Stage::Bulk
            && cp.t0.is_none();
        if bulk_start {
            // Seed 002: record T0 before the bulk walk starts.
            let t0 = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            store.set_t0(job, epoch, &t0).await?;
        }
        let task = PageTask {
            job: job.clone(),
            epoch,
            seq: cp.seq,
            cursor: cp.cursor.clone(),
            start_from: cp.start_from.clone(),
            attempt: 0,
            empty_run: 0,
            published_ms: now_ms(),
        };
        if let Err(e) = self.deps.tasks.publish_task(&task, None).await {
            let _ = store.release(job, epoch).await;
            tracing::warn!(job = %job, error = %e, "cannot publish the first page task");
            return Ok(());
        }
        let labels = Metrics::feed(&job.feed);
        if why == Why::LeaseExpired {
            self.deps
                .metrics
                .chains_reissued
                .get_or_create(&labels)
                .inc();
            tracing::warn!(job = %job, epoch, seq = cp.seq, "lease expired; chain re-issued from the stored cursor");
        } else {
            self.deps
                .metrics
                .chains_started
                .get_or_create(&labels)
                .inc();
            tracing::info!(job = %job, epoch, seq = cp.seq, stage = ?cp.stage, "chain started");
        }
        Ok(())
    }
}
