//! tidemark-state: where jobs keep their place.
//!
//! [`StateStore`] is the contract of DESIGN.md's "life of a page": a job's
//! checkpoint, fenced leases with strictly increasing epochs, the one atomic
//! commit that advances a cursor ([`tidemark_core::checkpoint::Checkpoint::apply`]
//! is its specification), operator controls that fence in-flight work,
//! coordinator leader election, and a rate limiter and pause shared by every
//! process that calls one source. [`RedisStore`] implements it for the
//! distributed deployment, [`EmbeddedStore`] for one process with a local
//! file; both pass the same behavioural tests.

mod client;
mod embedded;
mod keys;
mod leader;
mod redis_store;
pub mod registry;

use std::time::Duration;

use async_trait::async_trait;
use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId};

pub use client::{is_tls, redis_client};
pub use embedded::EmbeddedStore;
pub use leader::LeaderGuard;
pub use redis_store::{DEFAULT_PREFIX, RedisStore};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
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
    Granted {
        epoch: u64,
    },
    /// Another lease is live until this time (unix ms).
    Busy {
        until_ms: u64,
    },
    /// The job is paused by an operator.
    Paused,
    /// The job failed; only a forced acquire (an operator's retry) takes it.
    Failed,
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

#[async_trait]
pub trait StateStore: Send + Sync {
    async fn get(&self, job: &JobId) -> Result<Option<Checkpoint>, StateError>;
    async fn list(&self) -> Result<Vec<(JobId, Checkpoint)>, StateError>;
    /// Create the job with `init` unless it exists; true when created.
    async fn ensure(&self, job: &JobId, init: &Checkpoint) -> Result<bool, StateError>;
    /// Take the lease under a new epoch.
    async fn acquire(
        &self,
        job: &JobId,
        lease: Duration,
        force: bool,
    ) -> Result<Acquire, StateError>;
    /// Extend the lease; false when `epoch` is no longer current.
    async fn renew(&self, job: &JobId, epoch: u64, lease: Duration) -> Result<bool, StateError>;
    /// Give the lease up (the job stays running, so it is re-issued at once).
    async fn release(&self, job: &JobId, epoch: u64) -> Result<bool, StateError>;
    /// The atomic, fenced cursor step; also renews the lease.
    async fn commit(&self, job: &JobId, commit: &Commit) -> Result<CommitOutcome, StateError>;
    /// Mark the job failed with `error`; false when `epoch` is not current.
    async fn fail(&self, job: &JobId, epoch: u64, error: &str) -> Result<bool, StateError>;
    /// The cursor was rejected or expired: drop it and make the job due at
    /// once, to restart from `start_from` (RFC 3339; `None`: the feed's start)
    /// under a new epoch. False when `epoch` is not current.
    async fn recover(
        &self,
        job: &JobId,
        epoch: u64,
        start_from: Option<&str>,
    ) -> Result<bool, StateError>;
    /// Record T0 (RFC 3339) before a bulk walk, unless one is recorded already.
    async fn set_t0(&self, job: &JobId, epoch: u64, t0: &str) -> Result<bool, StateError>;
    /// Store the feed registry if `digest` differs from the stored one; returns the version in force.
    async fn put_registry(&self, digest: &str, doc: &str) -> Result<u64, StateError>;
    /// The feed registry: (version, document).
    async fn registry(&self) -> Result<Option<(u64, String)>, StateError>;
    /// The version of the feed registry, cheaply.
    async fn registry_version(&self) -> Result<Option<u64>, StateError>;
    /// Pause, resume or rewind; returns the new epoch.
    async fn control(&self, job: &JobId, control: &Control) -> Result<u64, StateError>;
    /// Take or renew the coordinator leadership for `id`; true while `id` leads.
    async fn try_lead(&self, id: &str, ttl: Duration) -> Result<bool, StateError>;
    async fn resign(&self, id: &str) -> Result<(), StateError>;
    /// One permit of `source`'s shared limiter: `None` when granted, else how long to wait.
    async fn rate_acquire(
        &self,
        source: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<Duration>, StateError>;
    /// Pause every request to `source` until `until_ms` (never shortens a pause).
    async fn pause_source(&self, source: &str, until_ms: u64) -> Result<(), StateError>;
    /// The end of `source`'s pause, if one is in force.
    async fn source_paused_until(&self, source: &str) -> Result<Option<u64>, StateError>;
}

/// The GCRA emission interval of a limit, in microseconds (at least 1).
pub(crate) fn emission_interval_us(per_second: f64) -> u64 {
    ((1_000_000.0 / per_second.max(1e-6)).round() as u64).max(1)
}

/// Now, unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
