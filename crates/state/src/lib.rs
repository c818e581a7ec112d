//! tidemark-state: where jobs keep their place.
//!
//! The store is the contract of DESIGN.md's "life of a page", offered as
//! small capabilities so that each caller names what it uses:
//!
//! - [`Jobs`]: the job table. Create and list jobs, and take new epochs: a
//!   lease for the coordinator, a pause, resume or rewind for an operator.
//!   A new epoch fences everything done under the old one.
//! - [`Leases`]: what a lease holder does under its epoch: read the job,
//!   renew or release the lease, fail or recover the job, stamp T0, and the
//!   one atomic commit that advances a cursor
//!   ([`tidemark_core::checkpoint::Checkpoint::apply`] is its
//!   specification). Every write is refused once the epoch is stale.
//! - [`FeedRegistry`]: the config a coordinator registers for workers.
//! - [`Leadership`]: coordinator leader election; [`LeaderGuard`] keeps the
//!   local deadline a leader must stop acting by.
//! - [`SourceLimits`]: a rate limiter and a pause shared by every process
//!   that calls one source.
//!
//! [`StateStore`] is all five, for wiring code that builds one store and
//! hands it to a role. [`RedisStore`] implements them for the distributed
//! deployment, [`EmbeddedStore`] for one process with a local file; both pass
//! the same behavioural tests. Times are unix milliseconds from
//! [`tidemark_core::clock::now_ms`] (Redis uses its server's clock).

mod capabilities;
mod client;
mod conn;
mod embedded;
mod keys;
mod leader;
mod redis_store;
pub mod registry;
pub mod sentinel;

use tidemark_core::checkpoint::{Checkpoint, JobId, Phase};

pub use capabilities::{
    FeedRegistry, Fleet, Jobs, Leadership, Leases, Operate, Schedule, SourceLimits, StateStore,
    TenantRegistry,
};
pub use client::{is_tls, redacted_url, redis_client};
pub use conn::WaitReplicas;
pub use embedded::EmbeddedStore;
pub use keys::{member, partition};
pub use sentinel::{SentinelUrl, is_sentinel_url};

pub use leader::LeaderGuard;
pub use redis_store::{DEFAULT_PREFIX, RedisStore};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A Redis URL that cannot be used (the message quotes no password).
    #[error("Redis URL: {0}")]
    Url(String),
    #[error("state file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("job {0} does not exist")]
    NoSuchJob(JobId),
    #[error("stored state of job {job} is malformed: {reason}")]
    Corrupt { job: String, reason: String },
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is yours under this epoch.
    Granted { epoch: u64 },
    /// Another lease is live until this time (unix ms).
    Busy { until_ms: u64 },
    /// The job is paused by an operator.
    Paused,
    /// The job failed; only a forced acquire (an operator's retry) takes it.
    Failed,
    /// No such job.
    Missing,
}

/// Where a rewind moves a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewind {
    /// The feed's own start point; the high-water mark is forgotten.
    Start,
    /// This cursor (or next URL, page, offset).
    Cursor(String),
    /// A chain from this time (RFC 3339).
    Time(String),
}

/// Operator controls. Each takes a new epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Pause,
    /// Also how a failed job is retried.
    Resume,
    Rewind(Rewind),
}

/// A page of one feed's jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    pub feed: String,
    /// Only partitions that start with this.
    pub prefix: Option<String>,
    /// Continue after this partition (the `next` of the page before).
    pub after: Option<String>,
    pub limit: usize,
}

/// The jobs of a [`JobQuery`], and where the next page starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobPage {
    pub jobs: Vec<(JobId, Checkpoint)>,
    /// The partition to pass as `after` for the next page; `None`: the last page.
    pub next: Option<String>,
}

impl JobPage {
    /// A page of `jobs`; `more`: jobs follow the last one.
    pub fn new(jobs: Vec<(JobId, Checkpoint)>, more: bool) -> Self {
        JobPage {
            next: more
                .then(|| jobs.last().map(|(j, _)| j.partition.clone()))
                .flatten(),
            jobs,
        }
    }
}

/// Every registered job of `feed`, in partition order, read a page at a time.
pub async fn feed_jobs(
    store: &(impl Jobs + ?Sized),
    feed: &str,
) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
    feed_jobs_with_prefix(store, feed, None).await
}

/// The jobs of `feed` whose partition starts with `prefix` (a tenant's:
/// `<tenant>/`), read page by page.
pub async fn feed_jobs_with_prefix(
    store: &(impl Jobs + ?Sized),
    feed: &str,
    prefix: Option<&str>,
) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .page(&JobQuery {
                feed: feed.to_string(),
                prefix: prefix.map(str::to_string),
                after,
                limit: 1000,
            })
            .await?;
        out.extend(page.jobs);
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// One feed's summary, from the store's counters and indexes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedCensus {
    pub feed: String,
    pub idle: u64,
    pub running: u64,
    pub paused: u64,
    pub failed: u64,
    /// Records committed by the feed's jobs.
    pub records: u64,
    /// The oldest time a job's cursor last moved (or the job was created), unix ms.
    pub oldest_progress_ms: Option<u64>,
    /// The lowest high-water mark among jobs whose mark is a time, unix ms.
    pub oldest_high_water_ms: Option<u64>,
}

impl FeedCensus {
    pub fn jobs(&self) -> u64 {
        self.idle + self.running + self.paused + self.failed
    }
    /// The count of one phase.
    pub fn phase(&self, phase: Phase) -> u64 {
        match phase {
            Phase::Idle => self.idle,
            Phase::Running => self.running,
            Phase::Paused => self.paused,
            Phase::Failed => self.failed,
        }
    }
}

/// What a scheduling pass reads, in one round trip: the running chains
/// whose deadline passed, how many chains run, and the feeds with due jobs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    pub expired: Vec<JobId>,
    pub running: u64,
    pub due_feeds: Vec<String>,
    /// [`TenantRegistry::tenants_version`]: moves when an operator adds or
    /// removes a tenant.
    pub tenants_version: u64,
}

/// Where a running tenant comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantOrigin {
    /// The source's `tenants.file`.
    File,
    /// The source's `tenants.list`.
    List,
    /// `tidemark tenants add` or the admin API.
    Added,
}

impl TenantOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantOrigin::File => "file",
            TenantOrigin::List => "list",
            TenantOrigin::Added => "added",
        }
    }
}

/// A tenant the coordinator runs, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActiveTenant {
    pub name: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub vars: std::collections::BTreeMap<String, String>,
    pub origin: TenantOrigin,
}

impl ActiveTenant {
    pub fn tenant(&self) -> tidemark_core::tenant::Tenant {
        tidemark_core::tenant::Tenant {
            name: self.name.clone(),
            vars: self.vars.clone(),
        }
    }
}

/// A worker seen by its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSeen {
    pub id: String,
    pub concurrency: u32,
}

/// The high-water mark as unix ms, when it is a time (a number is a version).
pub fn high_water_ms(high_water: &str) -> Option<u64> {
    if high_water.parse::<f64>().is_ok() {
        return None;
    }
    tidemark_core::timefmt::parse_timestamp(high_water)
        .ok()
        .map(|t| t.timestamp_millis().max(0) as u64)
}

/// The GCRA emission interval of a limit, in microseconds (at least 1).
pub(crate) fn emission_interval_us(per_second: f64) -> u64 {
    ((1_000_000.0 / per_second.max(1e-6)).round() as u64).max(1)
}
