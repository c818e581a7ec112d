//! The state store's capabilities, one trait per thing a caller does with
//! it, each documenting what it guarantees. [`StateStore`] is all of them,
//! for the wiring code that hands one store to every role.

use std::time::Duration;

use async_trait::async_trait;
use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, JobId};
use tidemark_core::tenant::Tenant;

use crate::{
    Acquire, ActiveTenant, Control, FeedCensus, JobPage, JobQuery, StateError, Survey, WorkerSeen,
};

/// The job table: create, retire and read jobs, and hand out epochs.
///
/// Each job's epoch only grows, across restarts of the store too
/// ([`tidemark_core::checkpoint::next_epoch`]). [`Jobs::acquire`] and
/// [`Jobs::control`] each take a new epoch atomically, and taking one fences
/// every earlier holder: from then on their [`Leases`] calls change nothing.
/// The coordinator starts chains with it, operators steer jobs with it.
#[async_trait]
pub trait Jobs: Send + Sync {
    /// Every registered job and its checkpoint, sorted by job: a read of
    /// the whole table, page by page, not a snapshot. For small stores,
    /// tests and tools; the scheduler and status read [`Schedule`] and
    /// [`Jobs::census`] instead.
    async fn list(&self) -> Result<Vec<(JobId, Checkpoint)>, StateError>;
    /// Create each job with `init` unless it exists (never overwrites) and
    /// register it in the scheduler's indexes; a job that exists but is not
    /// registered (retired, or stored by a version without indexes) joins
    /// them with its state as it is. Returns how many were created or joined.
    async fn ensure_many(&self, jobs: &[JobId], init: &Checkpoint) -> Result<usize, StateError>;
    /// [`Jobs::ensure_many`] for one job; true when created or joined.
    async fn ensure(&self, job: &JobId, init: &Checkpoint) -> Result<bool, StateError> {
        Ok(self.ensure_many(std::slice::from_ref(job), init).await? == 1)
    }
    /// Take a job out of every index (its feed or partition left the
    /// config): it is no longer listed, counted or scheduled, and a new
    /// epoch fences its chain in flight. Its state stays; ensuring it again
    /// brings it back where it was. False when it was not registered.
    async fn retire(&self, job: &JobId) -> Result<bool, StateError>;
    /// Delete a retired job's state for good (`tidemark tenants remove
    /// --purge`). Refused (`Err` not raised: `Ok(None)`) while the job is
    /// registered; `Ok(Some(false))` when there was nothing to delete.
    async fn purge(&self, job: &JobId) -> Result<Option<bool>, StateError>;
    /// The retired child jobs and batch slots of `feed` whose partition
    /// starts with `prefix` (made by parents' commits, not by the config,
    /// they are found here to come back or to be purged), sorted.
    async fn retired_children(
        &self,
        feed: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<JobId>, StateError>;
    /// Forget the parent versions and the pending parents of batched child
    /// feed `feed` of `tenant` (`None`: a feed without tenants), for
    /// `tenants remove --purge`; returns how many parents it forgot.
    async fn purge_parents(&self, feed: &str, tenant: Option<&str>) -> Result<u64, StateError>;
    /// The feeds that have registered jobs, sorted.
    async fn feeds(&self) -> Result<Vec<String>, StateError>;
    /// One page of a feed's jobs in partition order (of the encoded
    /// partitions: see [`crate::member`]).
    async fn page(&self, query: &JobQuery) -> Result<JobPage, StateError>;
    /// Per feed: jobs by phase, the oldest progress and high-water mark;
    /// from counters and indexes the store keeps, never a scan of the jobs.
    async fn census(&self) -> Result<Vec<FeedCensus>, StateError>;
    /// Up to `limit` of a feed's failed jobs, those that failed first first.
    async fn failures(
        &self,
        feed: &str,
        limit: usize,
    ) -> Result<Vec<(JobId, Checkpoint)>, StateError>;
    /// Take the job's lease for `lease` under a new epoch. Refused while
    /// another lease is live, the job is paused, or (unless `force`, an
    /// operator's retry) it failed.
    async fn acquire(
        &self,
        job: &JobId,
        lease: Duration,
        force: bool,
    ) -> Result<Acquire, StateError>;
    /// Pause, resume or rewind under a new epoch, which fences the chain in
    /// flight so an operator wins over work in progress; returns the epoch.
    async fn control(&self, job: &JobId, control: &Control) -> Result<u64, StateError>;
}

/// What the holder of a job's lease does: read the job and change it under
/// its epoch.
///
/// Every change names the caller's epoch and is one atomic check-then-write:
/// nothing is written unless that epoch is still the job's current one and
/// the job is running. A holder that lost its lease
/// (it expired and was re-issued, or an operator acted) is fenced: `false`,
/// or [`CommitOutcome::Fenced`], and the stored state is untouched.
#[async_trait]
pub trait Leases: Send + Sync {
    /// The job's checkpoint, if the job exists.
    async fn get(&self, job: &JobId) -> Result<Option<Checkpoint>, StateError>;
    /// A worker takes a page task: when `epoch` and `seq` are the job's and
    /// it runs, its lease becomes a processing lease of `lease` from now
    /// (until then it was the task's wait in the queue). Returns the
    /// checkpoint either way, for the caller's check; `None`: no such job.
    async fn take(
        &self,
        job: &JobId,
        epoch: u64,
        seq: u64,
        lease: Duration,
    ) -> Result<Option<Checkpoint>, StateError>;
    /// Extend the lease by `lease` from now; false when fenced.
    async fn renew(&self, job: &JobId, epoch: u64, lease: Duration) -> Result<bool, StateError>;
    /// Give the lease up (the job stays running, so it is re-issued at once);
    /// false when fenced.
    async fn release(&self, job: &JobId, epoch: u64) -> Result<bool, StateError>;
    /// The cursor step of DESIGN.md's life of a page, applied atomically
    /// exactly as [`Checkpoint::apply`] specifies (applied once; a retry of
    /// an applied commit answers `AlreadyApplied`); also renews the lease.
    async fn commit(&self, job: &JobId, commit: &Commit) -> Result<CommitOutcome, StateError>;
    /// Mark the job failed with `error`; false when fenced.
    async fn fail(&self, job: &JobId, epoch: u64, error: &str) -> Result<bool, StateError>;
    /// The cursor was rejected or expired: drop it and make the job due at
    /// once, so the coordinator restarts it under a new epoch from
    /// `start_from` (RFC 3339; `None`: the feed's start). False when fenced.
    async fn recover(
        &self,
        job: &JobId,
        epoch: u64,
        start_from: Option<&str>,
    ) -> Result<bool, StateError>;
    /// Record T0 (RFC 3339) before a bulk walk, unless one is recorded
    /// already (the first T0 stays); false when fenced.
    async fn set_t0(&self, job: &JobId, epoch: u64, t0: &str) -> Result<bool, StateError>;
}

/// The scheduler's indexes: what is due, what ran out of lease, and how
/// many chains run. Every script that changes a job keeps them, atomically
/// with the change, so a pass reads what is due and never lists all jobs.
#[async_trait]
pub trait Schedule: Send + Sync {
    /// For each (feed, n): up to n of its idle jobs due at `now_ms`, oldest
    /// first. One round trip for all of them.
    async fn due_jobs(
        &self,
        wants: &[(String, usize)],
        now_ms: u64,
    ) -> Result<Vec<JobId>, StateError>;
    /// The running chains whose deadline passed (up to `expired_limit`,
    /// oldest first), how many chains run (queued, in a worker, or waiting
    /// to retry), and the feeds with an idle job due at `now_ms` (up to
    /// `feeds_limit`, those with the oldest due job first): all an idle pass
    /// reads, in one round trip.
    async fn survey(
        &self,
        now_ms: u64,
        expired_limit: usize,
        feeds_limit: usize,
    ) -> Result<Survey, StateError>;
    /// Up to `limit` running chains whose lease deadline is past, oldest first.
    async fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<JobId>, StateError> {
        Ok(self.survey(now_ms, limit, 0).await?.expired)
    }
    /// How many chains run.
    async fn running(&self) -> Result<u64, StateError> {
        Ok(self.survey(0, 0, 0).await?.running)
    }
    /// Feeds with an idle job due at `now_ms`, those with the oldest due
    /// job first, at most `limit`.
    async fn due_feeds(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StateError> {
        Ok(self.survey(now_ms, 0, limit).await?.due_feeds)
    }
    /// Index the jobs of an earlier layout (without indexes), once; returns
    /// how many joined. Idempotent, and a no-op on a current layout.
    async fn migrate(&self) -> Result<u64, StateError>;
}

/// The workers the coordinator can see: each beats with its concurrency,
/// and admission control sizes itself by them.
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Say that worker `id` is alive with `concurrency` slots, for `ttl`.
    async fn heartbeat(&self, id: &str, concurrency: u32, ttl: Duration) -> Result<(), StateError>;
    /// Worker `id` stops: forget it now.
    async fn leave(&self, id: &str, concurrency: u32) -> Result<(), StateError>;
    /// The workers whose last heartbeat has not lapsed.
    async fn fleet(&self) -> Result<Vec<WorkerSeen>, StateError>;
}

/// The feed registry: the config a coordinator registered, for workers that
/// have no config file.
///
/// Its version changes exactly when the stored document does, so a reader
/// polls [`FeedRegistry::registry_version`] and fetches the document only
/// when the version moved. A version and its document are written and read
/// together.
#[async_trait]
pub trait FeedRegistry: Send + Sync {
    /// Store `doc` unless `digest` equals the stored document's digest;
    /// returns the version in force.
    async fn put_registry(&self, digest: &str, doc: &str) -> Result<u64, StateError>;
    /// The registered document and its version.
    async fn registry(&self) -> Result<Option<(u64, String)>, StateError>;
    /// The registered version alone, cheaply.
    async fn registry_version(&self) -> Result<Option<u64>, StateError>;
}

/// Coordinator leader election: at most one id holds the leadership at a
/// time, for `ttl` after its last successful [`Leadership::try_lead`].
///
/// The store's clock decides when a lease lapses; [`crate::LeaderGuard`]
/// adds the local deadline a leader needs to stop acting in time.
#[async_trait]
pub trait Leadership: Send + Sync {
    /// Take or renew the leadership for `id`; true while `id` leads.
    async fn try_lead(&self, id: &str, ttl: Duration) -> Result<bool, StateError>;
    /// Give the leadership up if `id` holds it (a no-op otherwise).
    async fn resign(&self, id: &str) -> Result<(), StateError>;
}

/// Limits shared by every process that calls one source: a rate limiter and
/// a source-wide pause.
///
/// The limiter is one GCRA budget per source, checked and spent atomically,
/// so all workers together stay within it. A pause only ever grows: a
/// shorter pause never cuts a longer one short.
#[async_trait]
pub trait SourceLimits: Send + Sync {
    /// One permit of `source`'s limiter (`per_second`, bursts of `burst`):
    /// `None` when granted, else how long to wait before asking again.
    async fn rate_acquire(
        &self,
        source: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<Duration>, StateError>;
    /// Pause every request to `source` until `until_ms` (unix ms); never
    /// shortens a pause in force.
    async fn pause_source(&self, source: &str, until_ms: u64) -> Result<(), StateError>;
    /// The end of `source`'s pause (unix ms), if one is in force now.
    async fn source_paused_until(&self, source: &str) -> Result<Option<u64>, StateError>;
}

/// The tenants of tenanted sources: those operators add and remove at run
/// time (`tidemark tenants add|remove`, the admin API), and the set the
/// coordinator runs (the config's file and list and the added ones together).
///
/// The version moves with every add and remove, and the coordinator reads
/// it in its survey: a tenant added is running within one tick.
#[async_trait]
pub trait TenantRegistry: Send + Sync {
    /// The tenants added to `source` at run time, by name.
    async fn added_tenants(&self, source: &str) -> Result<Vec<Tenant>, StateError>;
    /// Add a tenant to `source` (or replace its vars); true when it is new.
    async fn add_tenant(&self, source: &str, tenant: &Tenant) -> Result<bool, StateError>;
    /// Remove a tenant added at run time; false when it was not added.
    async fn remove_tenant(&self, source: &str, name: &str) -> Result<bool, StateError>;
    /// Moves with every add and remove.
    async fn tenants_version(&self) -> Result<u64, StateError>;
    /// The tenants the coordinator runs for `source`, by name.
    async fn active_tenants(&self, source: &str) -> Result<Vec<ActiveTenant>, StateError>;
    /// Replace the tenants running for `source` (the coordinator, after it
    /// applied them).
    async fn set_active_tenants(
        &self,
        source: &str,
        tenants: &[ActiveTenant],
    ) -> Result<(), StateError>;
}

/// What operator commands and the admin API use: the job table, the
/// tenants, and the registered config (to know a source's feeds).
pub trait Operate: Jobs + TenantRegistry + FeedRegistry {}

impl<T> Operate for T where T: Jobs + TenantRegistry + FeedRegistry + ?Sized {}

/// Every capability of a store, for wiring code that builds one store and
/// hands it to a role. Functions take the narrow traits they use.
pub trait StateStore: Operate + Schedule + Fleet + Leases + Leadership + SourceLimits {}

impl<T> StateStore for T where
    T: Operate + Schedule + Fleet + Leases + Leadership + SourceLimits + ?Sized
{
}
