//! tidemark-coordinator: the role that keeps every chain going.
//!
//! One coordinator leads at a time (a lease in the state store, renewed every
//! tick; standbys wait and take over when it lapses). The leader registers
//! the feeds (the config, secrets still as `${VAR}` references) with a
//! version, creates a job for every partition (and retires the jobs of feeds
//! and partitions the config no longer has), and on every pass:
//!
//! - re-issues, under a new epoch, every running chain whose deadline passed
//!   (its worker went silent past the processing lease, or its next task was
//!   lost past the queue lease): the stored cursor is the truth, so nothing
//!   is skipped;
//! - admits due jobs while fewer chains run than the admission bound (from
//!   the workers it sees, or configured), fairly across feeds and oldest
//!   first within a feed: a new epoch, T0 stamped before the bulk walk of a
//!   `bulk_then_incremental` feed, and the first page task;
//! - keeps the per-feed gauges from the store's counters.
//!
//! A pass reads the store's indexes (what is due, what ran out of lease),
//! never the whole job table, so an idle pass costs the same at ten jobs
//! and at a hundred thousand. The bulk→incremental handoff, snapshot
//! restarts and cursor recovery are written by workers in their last commit
//! (or recovery step) and picked up here as an idle job that is due.

pub mod admin;
pub mod ops;
mod tenants;

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
use tidemark_core::config::{DEFAULT_PARTITION, Mode};
use tidemark_core::options::parse_duration;
use tidemark_core::tenant::{job_partition, split_job_partition};
use tidemark_state::registry::publish_config;
use tidemark_state::{Acquire, LeaderGuard, StateError, StateStore, Survey, feed_jobs_with_prefix};
use tidemark_telemetry::{FloatGauge, IntGauge, Metrics};

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
    /// How long a chain's first page task may wait for a worker before the
    /// chain is taken for lost and re-issued (workers apply the same bound
    /// to the tasks they publish: set both roles alike).
    #[arg(long, env = "TIDEMARK_QUEUE_LEASE", default_value = "2m", value_parser = parse_duration)]
    pub queue_lease: Duration,
    /// Chains that may run at once (admission control); 0: four per worker
    /// slot seen in the workers' heartbeats, at least 64.
    #[arg(long, env = "TIDEMARK_MAX_RUNNING", default_value_t = 0)]
    pub max_running: u64,
    /// The leadership lease: how soon a standby takes over from a dead leader.
    #[arg(long, env = "TIDEMARK_LEADER_TTL", default_value = "10s", value_parser = parse_duration)]
    pub leader_ttl: Duration,
    /// How often the registry is written again and new partitions (time
    /// windows grow) get their jobs.
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
        tenants: tenants::Tenants::new(&config),
        config,
        opts,
        registered: None,
        known: HashSet::new(),
        registry_version: None,
        rotation: None,
        fleet: None,
        gauges: None,
        gauged: HashMap::new(),
    };
    tokio::pin!(shutdown);
    let tick = c.opts.tick.min(c.opts.leader_ttl / 3);
    let busy_tick = tick.min(BUSY_TICK);
    let mut was_leader = false;
    let mut next = tick;
    let renew_every = c.opts.leader_ttl / 3;
    let mut renewed: Option<Instant> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(next) => {}
        }
        next = tick;
        // The leadership is renewed every third of its TTL, not every
        // pass: busy passes come every 50 ms.
        let renew = !was_leader || renewed.is_none_or(|t: Instant| t.elapsed() >= renew_every);
        let leads = if renew {
            renewed = Some(Instant::now());
            match leader.tick().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reach the state store for the leadership");
                    false
                }
            }
        } else {
            leader.is_leader()
        };
        if leads != was_leader {
            tracing::info!(id = %c.opts.id, leader = leads, "leadership changed");
            // A new term registers everything again: another leader may
            // have run another config meanwhile.
            c.registered = None;
            c.known.clear();
            c.registry_version = None;
            c.tenants.reset();
            was_leader = leads;
        }
        c.deps.metrics.leader.set(i64::from(leads));
        if !leads {
            continue;
        }
        let started = Instant::now();
        match c.pass(&leader).await {
            Ok(Pass::Busy) => next = busy_tick,
            Ok(Pass::Done) => {}
            Err(e) => tracing::warn!(error = %e, "coordinator pass failed; trying again next tick"),
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
/// Expired chains one pass re-issues at most (the next pass takes the rest).
const REISSUE_BATCH: usize = 1000;
/// Feeds with due jobs one pass considers at most.
const DUE_FEEDS: usize = 10_000;
/// The next pass comes this soon when the last one left work it could not
/// start (admission full, or more due than it took).
const BUSY_TICK: Duration = Duration::from_millis(50);
/// The derived admission bound: chains per worker slot, and its floor
/// (also the bound while no worker has been seen).
const CHAINS_PER_SLOT: u64 = 4;
const MIN_ADMISSION: u64 = 64;
/// How often the fleet is read and the per-feed gauges are refreshed.
const FLEET_EVERY: Duration = Duration::from_secs(5);
const GAUGES_EVERY: Duration = Duration::from_secs(30);

/// Why a chain is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// An idle job reached its next due time.
    Due,
    /// A running chain's deadline passed: re-issue it under a new epoch.
    LeaseExpired,
}

/// What a pass left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Nothing it could do now: the next pass comes at the tick.
    Done,
    /// Work it could not start yet: come back soon.
    Busy,
}

struct Coordinator {
    deps: CoordinatorDeps,
    config: Config,
    /// The tenants of each tenanted source.
    tenants: tenants::Tenants,
    opts: CoordinatorOptions,
    registered: Option<Instant>,
    /// The jobs this leader has registered: only new partitions are
    /// written on the periodic registration.
    known: HashSet<JobId>,
    /// The registry version this leader stored: written again only when
    /// the store holds another (or none).
    registry_version: Option<u64>,
    /// The feed after which the next pass starts sharing out admission.
    rotation: Option<String>,
    /// The admission bound, and when it was read from the fleet.
    fleet: Option<(Instant, u64)>,
    gauges: Option<Instant>,
    /// The per-feed gauges, by feed.
    gauged: HashMap<String, FeedGauges>,
}

impl Coordinator {
    /// Register the feeds and the jobs of their partitions. The first time
    /// (on taking the leadership) every job is ensured, state of an older
    /// layout is migrated, and the jobs of feeds and partitions no longer
    /// configured are retired; after that only new partitions are written.
    async fn register(&mut self) -> Result<(), StateError> {
        let store = &*self.deps.store;
        // The first registration of this leadership term (the term resets `registered`).
        let first = self.registered.is_none();
        let stored = store.registry_version().await?;
        let version = match (stored, self.registry_version) {
            (Some(s), Some(ours)) if s == ours && !first => s,
            _ => publish_config(store, &self.config).await?,
        };
        self.registry_version = Some(version);
        if first {
            let migrated = store.migrate().await?;
            if migrated > 0 {
                tracing::info!(jobs = migrated, "jobs of the earlier state layout indexed");
            }
        }
        let mut wanted: HashMap<String, Vec<JobId>> = HashMap::new();
        // After the first registration only growing feeds (time windows
        // without an end) can have new partitions.
        // A child feed's jobs are made by its parent's commits, not here.
        for feed in self
            .config
            .feeds
            .iter()
            .filter(|f| f.parent.is_none() && (first || f.partitions_grow()))
        {
            let parts = match feed.partitions(Utc::now()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(feed = %feed.name, error = %e, "cannot split the feed into jobs");
                    continue;
                }
            };
            wanted.insert(feed.name.clone(), self.jobs_of(feed, &parts, None));
        }
        let fresh: Vec<JobId> = wanted
            .values()
            .flatten()
            .filter(|j| !self.known.contains(*j))
            .cloned()
            .collect();
        // The store writes them in batches of its own.
        let created = store.ensure_many(&fresh, &fresh_checkpoint()).await?;
        self.known.extend(fresh);
        let retired = if first {
            self.retire_unwanted(&wanted).await? + self.register_children().await?
        } else {
            0
        };
        if first || created > 0 {
            tracing::info!(
                version,
                created,
                retired,
                jobs = self.known.len(),
                "feeds registered"
            );
        }
        self.registered = Some(Instant::now());
        Ok(())
    }

    /// The jobs of `feed` for its `parts`: one per partition, or for a
    /// tenanted feed one per tenant (only `tenant`, when given) and partition.
    fn jobs_of(
        &self,
        feed: &tidemark_core::FeedConfig,
        parts: &[tidemark_core::config::Partition],
        tenant: Option<&str>,
    ) -> Vec<JobId> {
        if !self.tenants.is_tenanted(&feed.source) {
            return parts
                .iter()
                .map(|p| JobId::new(&feed.name, &p.id))
                .collect();
        }
        let tenants: Vec<&str> = match tenant {
            Some(t) => vec![t],
            None => self.tenants.active(&feed.source).collect(),
        };
        tenants
            .iter()
            .flat_map(|t| {
                parts
                    .iter()
                    .map(move |p| JobId::new(&feed.name, job_partition(t, &p.id)))
            })
            .collect()
    }

    /// Create the jobs of the tenants that came and retire those of the
    /// tenants that went (a page in flight is fenced; their state stays).
    async fn apply_tenant_changes(
        &mut self,
        changes: Vec<tenants::Change>,
    ) -> Result<usize, StateError> {
        let store = self.deps.store.clone();
        let mut created = 0;
        for change in changes {
            for feed in self
                .config
                .feeds
                .iter()
                .filter(|f| f.source == change.source)
            {
                if !change.came.is_empty() && feed.parent.is_some() {
                    // A child feed's jobs come from its parents' records;
                    // those retired with the tenant come back with it.
                    for t in &change.came {
                        let back = store
                            .retired_children(&feed.name, Some(&job_partition(t, "")))
                            .await?;
                        created += store.ensure_many(&back, &fresh_checkpoint()).await?;
                    }
                } else if !change.came.is_empty() {
                    let parts = match feed.partitions(Utc::now()) {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::error!(feed = %feed.name, error = %e, "cannot split the feed into jobs");
                            continue;
                        }
                    };
                    let fresh: Vec<JobId> = change
                        .came
                        .iter()
                        .flat_map(|t| self.jobs_of(feed, &parts, Some(t)))
                        .collect();
                    created += store.ensure_many(&fresh, &fresh_checkpoint()).await?;
                    self.known.extend(fresh);
                }
                for t in &change.went {
                    let prefix = job_partition(t, "");
                    for (job, _) in
                        feed_jobs_with_prefix(&*store, &feed.name, Some(&prefix)).await?
                    {
                        if store.retire(&job).await? {
                            tracing::info!(job = %job, "job retired: its tenant was removed");
                        }
                        self.known.remove(&job);
                    }
                }
            }
        }
        Ok(created)
    }

    /// The child feeds on taking the leadership: their retired child jobs
    /// and batch slots of running tenants rejoin (a child feed back in the
    /// config, a tenant back while its children waited), with their state
    /// and their pending runs; and a feed that became a child feed retires
    /// the jobs it had as an ordinary feed (a child job has a parent
    /// version, a slot a batch size). Returns how many it retired.
    async fn register_children(&mut self) -> Result<usize, StateError> {
        let store = self.deps.store.clone();
        let mut retired = 0;
        for feed in self.config.feeds.iter().filter(|f| f.parent.is_some()) {
            let tenanted = self.tenants.is_tenanted(&feed.source);
            let back: Vec<JobId> = store
                .retired_children(&feed.name, None)
                .await?
                .into_iter()
                .filter(|j| {
                    !tenanted
                        || split_job_partition(&j.partition)
                            .is_some_and(|(t, _)| self.tenants.get(&feed.source, t).is_some())
                })
                .collect();
            if !back.is_empty() {
                let n = store.ensure_many(&back, &fresh_checkpoint()).await?;
                tracing::info!(feed = %feed.name, jobs = n, "retired child jobs joined again");
            }
            let ordinary: Vec<JobId> = match tenanted {
                false => vec![JobId::new(&feed.name, DEFAULT_PARTITION)],
                true => self
                    .tenants
                    .active(&feed.source)
                    .map(|t| JobId::new(&feed.name, job_partition(t, DEFAULT_PARTITION)))
                    .collect(),
            };
            for job in ordinary {
                let was_ordinary = store
                    .get(&job)
                    .await?
                    .is_some_and(|cp| cp.parent_version.is_none() && cp.batch_size == 0);
                if was_ordinary && store.retire(&job).await? {
                    tracing::info!(job = %job, "job retired: its feed is a child feed now");
                    retired += 1;
                }
            }
        }
        Ok(retired)
    }

    /// Retire the jobs the config no longer has: every job of a feed that
    /// is gone, and a feed's jobs beyond its partitions (read only for a
    /// feed that has more jobs than partitions).
    async fn retire_unwanted(
        &self,
        wanted: &HashMap<String, Vec<JobId>>,
    ) -> Result<usize, StateError> {
        let store = &*self.deps.store;
        let census = store.census().await?;
        let mut retired = 0;
        for c in census {
            // A child feed's jobs come from its parent's records: it keeps
            // them while it is configured.
            if self
                .config
                .feed(&c.feed)
                .is_some_and(|f| f.parent.is_some())
            {
                continue;
            }
            let keep: HashSet<&JobId> = match wanted.get(&c.feed) {
                Some(jobs) if jobs.len() as u64 >= c.jobs() => continue,
                Some(jobs) => jobs.iter().collect(),
                None => HashSet::new(),
            };
            for (job, _) in tidemark_state::feed_jobs(store, &c.feed).await? {
                if !keep.contains(&job) && store.retire(&job).await? {
                    tracing::info!(job = %job, "job retired: its feed or partition left the config");
                    retired += 1;
                }
            }
        }
        Ok(retired)
    }

    async fn pass(&mut self, leader: &LeaderGuard) -> Result<Pass, StateError> {
        let store = self.deps.store.clone();
        // One round trip: all an idle pass reads.
        let mut survey = store.survey(now_ms(), REISSUE_BATCH, DUE_FEEDS).await?;
        if self.tenants.any() {
            let changes = self
                .tenants
                .refresh(&*store, survey.tenants_version, &self.deps.metrics)
                .await?;
            // Before the first registration, that registration makes every
            // job. A failure here leaves the change unapplied: the next
            // pass computes it again.
            let mut created = 0;
            if self.registered.is_some()
                && changes
                    .iter()
                    .any(|c| !c.came.is_empty() || !c.went.is_empty())
            {
                created = self.apply_tenant_changes(changes).await?;
            }
            self.tenants.applied();
            if created > 0 {
                // Their jobs are due now: start them in this pass.
                survey = store.survey(now_ms(), REISSUE_BATCH, DUE_FEEDS).await?;
            }
        }
        if self
            .registered
            .is_none_or(|t| t.elapsed() >= self.opts.register_every)
        {
            self.register().await?;
            if self.registered.is_some() {
                survey = store.survey(now_ms(), REISSUE_BATCH, DUE_FEEDS).await?;
            }
        }
        let pass = self.schedule(leader, survey).await?;
        if self.gauges.is_none_or(|t| t.elapsed() >= GAUGES_EVERY) {
            self.refresh_gauges().await?;
        }
        Ok(pass)
    }

    /// Re-issue what expired, then admit what is due while there is room.
    async fn schedule(&mut self, leader: &LeaderGuard, survey: Survey) -> Result<Pass, StateError> {
        let store = self.deps.store.clone();
        let now = now_ms();
        let mut pass = Pass::Done;
        if survey.expired.len() == REISSUE_BATCH {
            pass = Pass::Busy;
        }
        if !leader.is_leader() {
            return Ok(Pass::Done);
        }
        self.start_all(survey.expired, Why::LeaseExpired).await;
        // Re-issued chains were running already: the count holds.
        let running = survey.running;
        self.deps.metrics.chains_running.set(running as i64);
        let mut feeds = survey.due_feeds;
        if feeds.is_empty() {
            return Ok(pass);
        }
        let bound = self.admission_bound().await;
        let free = bound.saturating_sub(running) as usize;
        if free == 0 {
            // Due jobs wait in the due index until a chain ends.
            return Ok(Pass::Busy);
        }
        feeds.sort();
        let wants = shares(&feeds, free, self.rotation.as_deref());
        if let Some((last, _)) = wants.last() {
            self.rotation = Some(last.clone());
        }
        let due = store.due_jobs(&wants, now).await?;
        // A feed that filled its share may have more due: come back soon.
        let mut per_feed: HashMap<&str, usize> = HashMap::new();
        for j in &due {
            *per_feed.entry(j.feed.as_str()).or_default() += 1;
        }
        if feeds.len() > wants.len()
            || wants
                .iter()
                .any(|(f, n)| per_feed.get(f.as_str()).copied().unwrap_or(0) >= *n)
        {
            pass = Pass::Busy;
        }
        if leader.is_leader() {
            self.start_all(due, Why::Due).await;
        }
        Ok(pass)
    }

    /// Start (or re-issue) these chains, a few at a time.
    async fn start_all(&self, jobs: Vec<JobId>, why: Why) {
        // Each start is a few round trips (lease, checkpoint, confirmed
        // publish); running them side by side keeps a pass short.
        futures::stream::iter(jobs)
            .for_each_concurrent(CHAIN_STARTS_AT_ONCE, |job| async move {
                if let Err(e) = self.start_chain(&job, why).await {
                    tracing::warn!(job = %job, error = %e, "cannot start the chain; trying again next pass");
                }
            })
            .await;
    }

    /// How many chains may run: configured, or four per worker slot seen
    /// (at least [`MIN_ADMISSION`]).
    async fn admission_bound(&mut self) -> u64 {
        if self.opts.max_running > 0 {
            self.deps
                .metrics
                .admission_limit
                .set(self.opts.max_running as i64);
            return self.opts.max_running;
        }
        if let Some((at, bound)) = self.fleet
            && at.elapsed() < FLEET_EVERY
        {
            return bound;
        }
        let bound = match self.deps.store.fleet().await {
            Ok(workers) => {
                self.deps.metrics.workers_seen.set(workers.len() as i64);
                let slots: u64 = workers.iter().map(|w| u64::from(w.concurrency)).sum();
                (slots * CHAINS_PER_SLOT).max(MIN_ADMISSION)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the workers' heartbeats");
                self.fleet.map_or(MIN_ADMISSION, |(_, b)| b)
            }
        };
        self.deps.metrics.admission_limit.set(bound as i64);
        self.fleet = Some((Instant::now(), bound));
        bound
    }

    /// The per-feed gauges, from the store's counters and indexes.
    async fn refresh_gauges(&mut self) -> Result<(), StateError> {
        let census = self.deps.store.census().await?;
        let m = &self.deps.metrics;
        let now = now_ms();
        let present: HashSet<&str> = census.iter().map(|c| c.feed.as_str()).collect();
        self.gauged.retain(|feed, _| {
            let keep = present.contains(feed.as_str());
            if !keep {
                for phase in PHASES {
                    m.jobs.remove(&Metrics::feed_phase(feed, phase.as_str()));
                }
                m.feed_lag_seconds.remove(&Metrics::feed(feed));
                m.feed_cursor_age_seconds.remove(&Metrics::feed(feed));
            }
            keep
        });
        let age = |t: Option<u64>| t.map(|t| now.saturating_sub(t) as f64 / 1000.0);
        for c in &census {
            // The series of a feed are looked up once and kept: a refresh
            // of a thousand feeds is then a few thousand atomic stores.
            let g = self
                .gauged
                .entry(c.feed.clone())
                .or_insert_with(|| FeedGauges {
                    phases: PHASES.map(|p| {
                        m.jobs
                            .get_or_create(&Metrics::feed_phase(&c.feed, p.as_str()))
                            .clone()
                    }),
                    lag: None,
                    age: m
                        .feed_cursor_age_seconds
                        .get_or_create(&Metrics::feed(&c.feed))
                        .clone(),
                });
            for (gauge, phase) in g.phases.iter().zip(PHASES) {
                gauge.set(c.phase(phase) as i64);
            }
            match age(c.oldest_high_water_ms) {
                Some(lag) => g
                    .lag
                    .get_or_insert_with(|| {
                        m.feed_lag_seconds
                            .get_or_create(&Metrics::feed(&c.feed))
                            .clone()
                    })
                    .set(lag),
                None => {
                    if g.lag.take().is_some() {
                        m.feed_lag_seconds.remove(&Metrics::feed(&c.feed));
                    }
                    0.0
                }
            };
            if let Some(a) = age(c.oldest_progress_ms) {
                g.age.set(a);
            }
        }
        self.gauges = Some(Instant::now());
        Ok(())
    }

    /// Take a new epoch and publish the chain's first task.
    async fn start_chain(&self, job: &JobId, why: Why) -> Result<(), StateError> {
        let store = &*self.deps.store;
        // A tenanted job carries its tenant's vars; a job of a tenant no
        // longer running is retired, not started.
        let source = self.config.feed(&job.feed).map(|f| f.source.as_str());
        let vars = match source.filter(|s| self.tenants.is_tenanted(s)) {
            None => None,
            Some(source) => {
                let tenant = split_job_partition(&job.partition)
                    .and_then(|(t, _)| self.tenants.get(source, t));
                match tenant {
                    Some(t) => Some(t.vars.clone()),
                    None => {
                        if store.retire(job).await? {
                            tracing::info!(job = %job, "job retired: its tenant is not running");
                        }
                        return Ok(());
                    }
                }
            }
        };
        let epoch = match store.acquire(job, self.opts.queue_lease, false).await? {
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
            vars: vars.unwrap_or_default(),
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

/// A job as it is first created: idle, due at once.
fn fresh_checkpoint() -> Checkpoint {
    Checkpoint {
        phase: Phase::Idle,
        stage: Stage::Bulk,
        next_due_ms: 0,
        ..Checkpoint::default()
    }
}

const PHASES: [Phase; 4] = [Phase::Idle, Phase::Running, Phase::Paused, Phase::Failed];

/// A feed's series (handles onto the same values the registry exports).
struct FeedGauges {
    phases: [IntGauge; 4],
    lag: Option<FloatGauge>,
    age: FloatGauge,
}

/// Share `free` admissions among `feeds` (sorted) fairly: each feed gets as
/// many as the others, give or take one, taking turns from the feed after
/// `after` (the last one served by the pass before); when there are more
/// feeds than admissions, the next pass serves the feeds this one did not.
fn shares(feeds: &[String], free: usize, after: Option<&str>) -> Vec<(String, usize)> {
    if feeds.is_empty() || free == 0 {
        return Vec::new();
    }
    let start = after.map_or(0, |a| feeds.partition_point(|f| f.as_str() <= a)) % feeds.len();
    let n = feeds.len().min(free);
    let (each, extra) = (free / n, free % n);
    (0..n)
        .map(|i| {
            let feed = feeds[(start + i) % feeds.len()].clone();
            (feed, each + usize::from(i < extra))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::shares;

    fn feeds(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("f{i:03}")).collect()
    }

    #[test]
    fn admissions_are_shared_evenly_and_every_feed_takes_its_turn() {
        let three = feeds(3);
        let s = shares(&three, 10, None);
        assert_eq!(s.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![4, 3, 3]);
        // More feeds than admissions: turns rotate, so all are served.
        let many = feeds(10);
        let mut served = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..5 {
            let s = shares(&many, 3, after.as_deref());
            assert_eq!(s.len(), 3);
            assert!(s.iter().all(|(_, n)| *n == 1));
            after = s.last().map(|(f, _)| f.clone());
            served.extend(s.into_iter().map(|(f, _)| f));
        }
        let mut distinct = served.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 10, "{served:?}");
        // A feed that vanished from the due list does not break the turn.
        let s = shares(&many, 2, Some("f0045"));
        assert_eq!(s[0].0, "f005");
        assert!(shares(&many, 0, None).is_empty());
    }
}
