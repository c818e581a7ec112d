//! The embedded implementation: one process, state in memory, persisted to a
//! JSON file after every change by atomic replace (write a temporary file,
//! fsync it, rename it over the old one), so a crash leaves either the old
//! state or the new one. Same semantics as the Redis scripts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tidemark_core::checkpoint::{
    BatchTriggers, Checkpoint, Commit, CommitOutcome, JobId, NEVER_DUE_MS, Phase, Stage, Trigger,
    next_epoch, trigger_version,
};
use tidemark_core::child::split_batch_slot;
use tidemark_core::clock::now_ms;

use tidemark_core::tenant::Tenant;

use crate::{
    Acquire, ActiveTenant, Control, FeedCensus, FeedRegistry, Fleet, JobPage, JobQuery, Jobs,
    Leadership, Leases, Rewind, Schedule, SourceLimits, StateError, Survey, TenantRegistry,
    WorkerSeen, high_water_ms,
};

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    jobs: BTreeMap<String, (JobId, Checkpoint)>,
    /// Jobs taken out of the indexes (their feed or partition left the config).
    #[serde(default)]
    retired: BTreeSet<String>,
    source_pauses: BTreeMap<String, u64>,
    /// (version, digest, document)
    #[serde(default)]
    registry: Option<(u64, String, String)>,
    /// Tenants added at run time: source -> name -> vars.
    #[serde(default)]
    tenants_added: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    #[serde(default)]
    tenants_version: u64,
    /// The tenants the coordinator runs, by source.
    #[serde(default)]
    tenants_active: BTreeMap<String, Vec<ActiveTenant>>,
    /// Batched child feeds: each parent record's version, by feed and child partition.
    #[serde(default)]
    parent_versions: BTreeMap<String, BTreeMap<String, String>>,
    /// Batched child feeds: the parents waiting for a batch, by
    /// `feed\u{1f}tenant`.
    #[serde(default)]
    pending: BTreeMap<String, Pending>,
    /// Batched child feeds: (size, slots) as the parent's last commit gave them.
    #[serde(default)]
    batch_conf: BTreeMap<String, (u64, usize)>,
}

/// The parents of a batched child feed waiting for a batch: by the time
/// they came, then by name (the order of Redis's zset), and by name.
#[derive(Default, Serialize, Deserialize)]
struct Pending {
    order: BTreeSet<(u64, String)>,
    since: BTreeMap<String, u64>,
}

impl Pending {
    /// Add `partition` unless it waits already (it keeps its place).
    fn add(&mut self, partition: &str, now: u64) {
        if !self.since.contains_key(partition) {
            self.since.insert(partition.to_string(), now);
            self.order.insert((now, partition.to_string()));
        }
    }
    /// Take up to `n`, those that came first first.
    fn take(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n.min(self.order.len()));
        while out.len() < n {
            let Some((_, p)) = self.order.pop_first() else {
                break;
            };
            self.since.remove(&p);
            out.push(p);
        }
        out
    }
    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Where a batched child feed's pending parents of `tenant` ("" for none) are.
fn pending_key(feed: &str, tenant: &str) -> String {
    format!("{feed}\u{1f}{tenant}")
}

impl Persisted {
    /// A batch slot (idle, without a batch) of `feed` (of `tenant`) claims
    /// up to `size` pending parents; true when it got any.
    fn claim(&mut self, feed: &str, tenant: &str, size: u64, cp: &mut Checkpoint) -> bool {
        let Some(q) = self.pending.get_mut(&pending_key(feed, tenant)) else {
            return false;
        };
        cp.batch = q.take(usize::try_from(size).unwrap_or(usize::MAX));
        !cp.batch.is_empty()
    }
}

#[derive(Default)]
struct Inner {
    data: Persisted,
    index: Index,
    leader: Option<(String, u64)>,
    rate_tat_us: HashMap<String, u64>,
    workers: HashMap<String, (u32, u64)>,
}

/// The scheduler's indexes over the registered jobs, as lua/index.lua keeps
/// them in Redis: idle jobs by due time per feed, running chains by
/// deadline, failed jobs per feed, jobs per feed and phase.
#[derive(Default)]
struct Index {
    due: BTreeMap<String, BTreeSet<(u64, String)>>,
    running: BTreeSet<(u64, String)>,
    failed: BTreeMap<String, BTreeSet<(u64, String)>>,
    counts: BTreeMap<String, [u64; 4]>,
}

fn phase_slot(p: Phase) -> usize {
    match p {
        Phase::Idle => 0,
        Phase::Running => 1,
        Phase::Paused => 2,
        Phase::Failed => 3,
    }
}

impl Index {
    fn build(data: &Persisted) -> Index {
        let mut index = Index::default();
        for (k, (job, cp)) in &data.jobs {
            if !data.retired.contains(k) {
                index.enter(k, job, cp, 0);
            }
        }
        index
    }
    fn enter(&mut self, key: &str, job: &JobId, cp: &Checkpoint, now: u64) {
        self.counts.entry(job.feed.clone()).or_default()[phase_slot(cp.phase)] += 1;
        let entry = |t: u64| (t, key.to_string());
        match cp.phase {
            // A child that has run waits for its parent, in no due index.
            Phase::Idle if cp.next_due_ms >= NEVER_DUE_MS => {}
            Phase::Idle => {
                self.due
                    .entry(job.feed.clone())
                    .or_default()
                    .insert(entry(cp.next_due_ms));
            }
            Phase::Running => {
                self.running.insert(entry(cp.lease_until_ms));
            }
            Phase::Failed => {
                self.failed
                    .entry(job.feed.clone())
                    .or_default()
                    .insert(entry(now));
            }
            Phase::Paused => {}
        }
    }
    fn leave(&mut self, key: &str, job: &JobId, cp: &Checkpoint) {
        if let Some(c) = self.counts.get_mut(&job.feed) {
            let slot = &mut c[phase_slot(cp.phase)];
            *slot = slot.saturating_sub(1);
            if c.iter().all(|n| *n == 0) {
                self.counts.remove(&job.feed);
            }
        }
        let entry = |t: u64| (t, key.to_string());
        match cp.phase {
            Phase::Idle => {
                if let Some(d) = self.due.get_mut(&job.feed) {
                    d.remove(&entry(cp.next_due_ms));
                    if d.is_empty() {
                        self.due.remove(&job.feed);
                    }
                }
            }
            Phase::Running => {
                self.running.remove(&entry(cp.lease_until_ms));
            }
            Phase::Failed => {
                if let Some(f) = self.failed.get_mut(&job.feed) {
                    f.retain(|(_, k)| k != key);
                    if f.is_empty() {
                        self.failed.remove(&job.feed);
                    }
                }
            }
            Phase::Paused => {}
        }
    }
}

impl Inner {
    /// Bring job `k` back into the indexes if it was retired; true when it was.
    fn rejoin(&mut self, k: &str, job: &JobId, now: u64) -> bool {
        if !self.data.retired.remove(k) {
            return false;
        }
        if let Some((_, cp)) = self.data.jobs.get(k) {
            self.index.enter(k, job, cp, now);
        }
        true
    }

    /// Apply a parent commit's trigger (`Trigger::apply`) to its child job;
    /// a child retired with its feed comes back when its parent is read.
    fn trigger(&mut self, t: &Trigger, generation: u64, now: u64) {
        let ck = key(&t.job);
        let existing = self.data.jobs.get(&ck).map(|(_, cp)| cp);
        let registered = existing.is_some() && !self.data.retired.contains(&ck);
        if let Some(changed) = t.apply(existing, generation, now) {
            if let (true, Some(old)) = (registered, existing) {
                self.index.leave(&ck, &t.job, old);
            }
            if registered || existing.is_none() {
                self.index.enter(&ck, &t.job, &changed, now);
            }
            self.data.jobs.insert(ck.clone(), (t.job.clone(), changed));
        }
        self.rejoin(&ck, &t.job, now);
    }

    /// A parent commit's records for a batched child feed: each changed one
    /// is pending; then every idle slot without a batch claims some (as
    /// commit.lua does).
    fn enqueue(&mut self, b: &BatchTriggers, generation: u64, now: u64) {
        let tenant = b.tenant.as_deref().unwrap_or("");
        let pending = pending_key(&b.feed, tenant);
        self.data
            .batch_conf
            .insert(b.feed.clone(), (b.size, b.slots.len()));
        for (partition, version) in &b.parents {
            let pv = trigger_version(generation, version);
            let stored = self.data.parent_versions.entry(b.feed.clone()).or_default();
            if stored.get(partition) != Some(&pv) {
                stored.insert(partition.clone(), pv);
                self.data
                    .pending
                    .entry(pending.clone())
                    .or_default()
                    .add(partition, now);
            }
        }
        for slot in &b.slots {
            let sk = key(slot);
            // A slot retired with its tenant (its batch kept) comes back.
            self.rejoin(&sk, slot, now);
            if self
                .data
                .pending
                .get(&pending)
                .is_none_or(Pending::is_empty)
            {
                continue;
            }
            if !self.data.jobs.contains_key(&sk) {
                let cp = Checkpoint {
                    phase: Phase::Idle,
                    next_due_ms: NEVER_DUE_MS,
                    batch_size: b.size,
                    ..Checkpoint::default()
                };
                self.index.enter(&sk, slot, &cp, now);
                self.data.jobs.insert(sk.clone(), (slot.clone(), cp));
            }
            let Some((_, cp)) = self.data.jobs.get(&sk) else {
                continue;
            };
            if cp.phase != Phase::Idle || !cp.batch.is_empty() {
                continue;
            }
            let before = cp.clone();
            let mut next = cp.clone();
            if self.data.claim(&b.feed, tenant, b.size, &mut next) {
                next.next_due_ms = now;
                self.index.leave(&sk, slot, &before);
                self.index.enter(&sk, slot, &next, now);
                self.data.jobs.insert(sk, (slot.clone(), next));
            }
        }
    }
}

/// Job state for one process, optionally kept in a file.
pub struct EmbeddedStore {
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

fn key(job: &JobId) -> String {
    format!("{}\u{1f}{}", job.feed, job.partition)
}

impl EmbeddedStore {
    /// State in memory only.
    pub fn in_memory() -> Self {
        Self {
            path: None,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// State in `path` (created on first write); loads what is there.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let err = |reason: String| StateError::File {
            path: path.display().to_string(),
            reason,
        };
        let data = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| err(format!("cannot parse: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Self {
            path: Some(path.to_path_buf()),
            inner: Mutex::new(Inner {
                index: Index::build(&data),
                data,
                ..Inner::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, inner: &Inner) -> Result<(), StateError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let err = |reason: String| StateError::File {
            path: path.display().to_string(),
            reason,
        };
        let bytes = serde_json::to_vec(&inner.data).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| err(format!("cannot write {}: {e}", tmp.display())))?;
        f.write_all(&bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(format!("cannot replace: {e}")))?;
        Ok(())
    }

    /// Change one job under the lock, keep the indexes, and persist when
    /// `f` says it changed.
    fn with_job<T>(
        &self,
        job: &JobId,
        f: impl FnOnce(&mut Checkpoint, u64) -> (T, bool),
    ) -> Result<Option<T>, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let now = now_ms();
        let k = key(job);
        let Some((_, cp)) = inner.data.jobs.get_mut(&k) else {
            return Ok(None);
        };
        let before = cp.clone();
        let (out, changed) = f(cp, now);
        if changed {
            if !inner.data.retired.contains(&k) {
                inner.index.leave(&k, job, &before);
                inner.index.enter(&k, job, cp, now);
            }
            self.persist(inner)?;
        }
        Ok(Some(out))
    }

    fn jobs_of<'a>(
        inner: &'a Inner,
        feed: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a (JobId, Checkpoint))> + 'a {
        let from = format!("{feed}\u{1f}");
        inner
            .data
            .jobs
            .range(from.clone()..)
            .take_while(move |(k, _)| k.starts_with(&from))
            .filter(|(k, _)| !inner.data.retired.contains(*k))
    }
}

impl EmbeddedStore {
    /// Change a job only under its current epoch while it runs (the lease
    /// script's check): `f` changes it and says whether it wrote anything.
    /// False when the job is missing, not running, or owned by another epoch.
    fn with_lease(
        &self,
        job: &JobId,
        epoch: u64,
        f: impl FnOnce(&mut Checkpoint, u64) -> bool,
    ) -> Result<bool, StateError> {
        let r = self.with_job(job, |cp, now| {
            if cp.epoch != epoch || cp.phase != Phase::Running {
                return (false, false);
            }
            (true, f(cp, now))
        })?;
        Ok(r.unwrap_or(false))
    }
}

#[async_trait]
impl Jobs for EmbeddedStore {
    async fn list(&self) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
        let inner = self.lock();
        let mut v: Vec<(JobId, Checkpoint)> = inner
            .data
            .jobs
            .iter()
            .filter(|(k, _)| !inner.data.retired.contains(*k))
            .map(|(_, v)| v.clone())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    async fn ensure_many(&self, jobs: &[JobId], init: &Checkpoint) -> Result<usize, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let now = now_ms();
        let mut joined = 0;
        for job in jobs {
            let k = key(job);
            if inner.data.jobs.contains_key(&k) {
                if inner.rejoin(&k, job, now) {
                    joined += 1;
                }
            } else {
                inner.index.enter(&k, job, init, now);
                inner.data.jobs.insert(k, (job.clone(), init.clone()));
                joined += 1;
            }
        }
        if joined > 0 {
            self.persist(inner)?;
        }
        Ok(joined)
    }

    async fn retire(&self, job: &JobId) -> Result<bool, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let k = key(job);
        let now = now_ms();
        let Some((_, cp)) = inner.data.jobs.get_mut(&k) else {
            return Ok(false);
        };
        if inner.data.retired.contains(&k) {
            return Ok(false);
        }
        inner.index.leave(&k, job, cp);
        cp.epoch = next_epoch(cp.epoch, now);
        cp.lease_until_ms = 0;
        if cp.phase == Phase::Running {
            cp.phase = Phase::Idle;
            cp.next_due_ms = now;
        }
        inner.data.retired.insert(k);
        self.persist(inner)?;
        Ok(true)
    }

    async fn retired_children(
        &self,
        feed: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<JobId>, StateError> {
        let inner = self.lock();
        let mut out: Vec<JobId> = inner
            .data
            .retired
            .iter()
            .filter_map(|k| inner.data.jobs.get(k))
            .filter(|(job, cp)| {
                job.feed == feed
                    && prefix.is_none_or(|p| job.partition.starts_with(p))
                    && (cp.parent_version.is_some() || cp.batch_size > 0)
            })
            .map(|(job, _)| job.clone())
            .collect();
        out.sort_by_key(|j| crate::member(&j.partition));
        Ok(out)
    }

    async fn purge_parents(&self, feed: &str, tenant: Option<&str>) -> Result<u64, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner
            .data
            .pending
            .remove(&pending_key(feed, tenant.unwrap_or("")));
        let mut forgot = 0u64;
        if let Some(versions) = inner.data.parent_versions.get_mut(feed) {
            let before = versions.len();
            match tenant {
                Some(t) => {
                    let prefix = tidemark_core::tenant::job_partition(t, "");
                    versions.retain(|p, _| !p.starts_with(&prefix));
                }
                None => versions.clear(),
            }
            forgot = (before - versions.len()) as u64;
        }
        self.persist(inner)?;
        Ok(forgot)
    }

    async fn purge(&self, job: &JobId) -> Result<Option<bool>, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let k = key(job);
        if inner.data.jobs.contains_key(&k) && !inner.data.retired.contains(&k) {
            return Ok(None);
        }
        let gone = inner.data.jobs.remove(&k).is_some();
        inner.data.retired.remove(&k);
        if gone {
            self.persist(inner)?;
        }
        Ok(Some(gone))
    }

    async fn feeds(&self) -> Result<Vec<String>, StateError> {
        Ok(self.lock().index.counts.keys().cloned().collect())
    }

    async fn page(&self, q: &JobQuery) -> Result<JobPage, StateError> {
        let inner = self.lock();
        let limit = q.limit.max(1);
        let prefix = q.prefix.as_deref().map(crate::member).unwrap_or_default();
        let after = q.after.as_deref().map(crate::member);
        let mut rows: Vec<(String, (JobId, Checkpoint))> = Self::jobs_of(&inner, &q.feed)
            .map(|(_, v)| (crate::member(&v.0.partition), v.clone()))
            .filter(|(m, _)| m.starts_with(&prefix) && after.as_ref().is_none_or(|a| m > a))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let more = rows.len() > limit;
        rows.truncate(limit);
        let jobs: Vec<(JobId, Checkpoint)> = rows.into_iter().map(|(_, v)| v).collect();
        Ok(JobPage::new(jobs, more))
    }

    async fn census(&self) -> Result<Vec<FeedCensus>, StateError> {
        let inner = self.lock();
        Ok(inner
            .index
            .counts
            .iter()
            .map(|(feed, c)| {
                let jobs: Vec<&Checkpoint> =
                    Self::jobs_of(&inner, feed).map(|(_, (_, cp))| cp).collect();
                // A child job's cursor does not age: it waits for its parent.
                let ageing = || {
                    jobs.iter()
                        .filter(|cp| cp.parent_version.is_none() && cp.batch_size == 0)
                };
                FeedCensus {
                    feed: feed.clone(),
                    idle: c[0],
                    running: c[1],
                    paused: c[2],
                    failed: c[3],
                    records: jobs.iter().map(|cp| cp.records).sum(),
                    oldest_progress_ms: ageing().filter_map(|cp| cp.last_commit_ms).min(),
                    oldest_high_water_ms: ageing()
                        .filter_map(|cp| cp.high_water.as_deref().and_then(high_water_ms))
                        .min(),
                }
            })
            .collect())
    }

    async fn failures(
        &self,
        feed: &str,
        limit: usize,
    ) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
        let inner = self.lock();
        Ok(inner
            .index
            .failed
            .get(feed)
            .into_iter()
            .flatten()
            .filter_map(|(_, k)| inner.data.jobs.get(k).cloned())
            .take(limit)
            .collect())
    }

    async fn acquire(
        &self,
        job: &JobId,
        lease: Duration,
        force: bool,
    ) -> Result<Acquire, StateError> {
        let r = self.with_job(job, |cp, now| {
            match cp.phase {
                Phase::Paused => return (Acquire::Paused, false),
                Phase::Failed if !force => return (Acquire::Failed, false),
                Phase::Running if cp.lease_until_ms > now && !force => {
                    return (
                        Acquire::Busy {
                            until_ms: cp.lease_until_ms,
                        },
                        false,
                    );
                }
                _ => {}
            }
            cp.epoch = next_epoch(cp.epoch, now);
            cp.phase = Phase::Running;
            cp.lease_until_ms = now + lease.as_millis() as u64;
            cp.last_error = None;
            (Acquire::Granted { epoch: cp.epoch }, true)
        })?;
        Ok(r.unwrap_or(Acquire::Missing))
    }

    async fn control(&self, job: &JobId, control: &Control) -> Result<u64, StateError> {
        let r = self.with_job(job, |cp, now| {
            cp.epoch = next_epoch(cp.epoch, now);
            cp.lease_until_ms = 0;
            match control {
                Control::Pause => cp.phase = Phase::Paused,
                Control::Resume => {
                    cp.phase = Phase::Idle;
                    // A child that was waiting for its parent, and whose
                    // parent did not change meanwhile, waits on.
                    if cp.next_due_ms < NEVER_DUE_MS || cp.rerun {
                        cp.next_due_ms = now;
                    }
                    cp.rerun = false;
                    cp.last_error = None;
                }
                Control::Rewind(to) => {
                    // Records read again give their children a new parent version.
                    cp.generation += 1;
                    match to {
                        Rewind::Cursor(c) => {
                            cp.cursor = Some(c.clone());
                            cp.start_from = None;
                        }
                        Rewind::Time(t) => {
                            cp.start_from = Some(t.clone());
                            cp.cursor = None;
                        }
                        Rewind::Start => {
                            cp.cursor = None;
                            cp.start_from = None;
                            cp.high_water = None;
                            cp.t0 = None;
                            cp.last_end_of_stream_ms = None;
                            cp.stage = Stage::Bulk;
                        }
                    }
                    if cp.phase != Phase::Paused {
                        cp.phase = Phase::Idle;
                    }
                    cp.next_due_ms = now;
                    cp.last_error = None;
                }
            }
            (cp.epoch, true)
        })?;
        r.ok_or_else(|| StateError::NoSuchJob(job.clone()))
    }
}

#[async_trait]
impl Schedule for EmbeddedStore {
    async fn due_jobs(
        &self,
        wants: &[(String, usize)],
        now_ms: u64,
    ) -> Result<Vec<JobId>, StateError> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (feed, n) in wants {
            let Some(d) = inner.index.due.get(feed) else {
                continue;
            };
            out.extend(
                d.iter()
                    .take_while(|(t, _)| *t <= now_ms)
                    .take(*n)
                    .filter_map(|(_, k)| inner.data.jobs.get(k).map(|(j, _)| j.clone())),
            );
        }
        Ok(out)
    }

    async fn survey(
        &self,
        now_ms: u64,
        expired_limit: usize,
        feeds_limit: usize,
    ) -> Result<Survey, StateError> {
        let inner = self.lock();
        let index = &inner.index;
        let job = |k: &String| inner.data.jobs.get(k).map(|(j, _)| j.clone());
        let mut feeds: Vec<(u64, &String)> = index
            .due
            .iter()
            .filter_map(|(feed, d)| d.first().map(|(t, _)| (*t, feed)))
            .filter(|(t, _)| *t <= now_ms)
            .collect();
        feeds.sort();
        Ok(Survey {
            expired: index
                .running
                .iter()
                .take_while(|(t, _)| *t <= now_ms)
                .take(expired_limit)
                .filter_map(|(_, k)| job(k))
                .collect(),
            running: index.running.len() as u64,
            due_feeds: feeds
                .into_iter()
                .take(feeds_limit)
                .map(|(_, f)| f.clone())
                .collect(),
            tenants_version: inner.data.tenants_version,
        })
    }

    async fn migrate(&self) -> Result<u64, StateError> {
        // The file has always held every job; the indexes are built on open.
        Ok(0)
    }
}

#[async_trait]
impl Fleet for EmbeddedStore {
    async fn heartbeat(&self, id: &str, concurrency: u32, ttl: Duration) -> Result<(), StateError> {
        let until = now_ms() + ttl.as_millis() as u64;
        self.lock()
            .workers
            .insert(id.to_string(), (concurrency, until));
        Ok(())
    }

    async fn leave(&self, id: &str, _concurrency: u32) -> Result<(), StateError> {
        self.lock().workers.remove(id);
        Ok(())
    }

    async fn fleet(&self) -> Result<Vec<WorkerSeen>, StateError> {
        let now = now_ms();
        let mut inner = self.lock();
        inner.workers.retain(|_, (_, until)| *until > now);
        let mut v: Vec<WorkerSeen> = inner
            .workers
            .iter()
            .map(|(id, (c, _))| WorkerSeen {
                id: id.clone(),
                concurrency: *c,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }
}

#[async_trait]
impl Leases for EmbeddedStore {
    async fn get(&self, job: &JobId) -> Result<Option<Checkpoint>, StateError> {
        Ok(self
            .lock()
            .data
            .jobs
            .get(&key(job))
            .map(|(_, cp)| cp.clone()))
    }

    async fn take(
        &self,
        job: &JobId,
        epoch: u64,
        seq: u64,
        lease: Duration,
    ) -> Result<Option<Checkpoint>, StateError> {
        // A lease deadline is not worth a write of the file: after a crash
        // every running chain is re-issued anyway (tidemark-embedded's engine).
        let mut guard = self.lock();
        let inner = &mut *guard;
        let k = key(job);
        let Some((_, cp)) = inner.data.jobs.get_mut(&k) else {
            return Ok(None);
        };
        if cp.epoch == epoch && cp.seq == seq && cp.phase == Phase::Running {
            let before = cp.clone();
            cp.lease_until_ms = now_ms() + lease.as_millis() as u64;
            if !inner.data.retired.contains(&k) {
                inner.index.leave(&k, job, &before);
                inner.index.enter(&k, job, cp, 0);
            }
        }
        Ok(Some(cp.clone()))
    }

    async fn renew(&self, job: &JobId, epoch: u64, lease: Duration) -> Result<bool, StateError> {
        self.with_lease(job, epoch, |cp, now| {
            cp.lease_until_ms = now + lease.as_millis() as u64;
            true
        })
    }

    async fn release(&self, job: &JobId, epoch: u64) -> Result<bool, StateError> {
        self.with_lease(job, epoch, |cp, _| {
            cp.lease_until_ms = 0;
            true
        })
    }

    async fn commit(&self, job: &JobId, c: &Commit) -> Result<CommitOutcome, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let now = now_ms();
        let k = key(job);
        let Some((_, cp)) = inner.data.jobs.get_mut(&k) else {
            return Ok(CommitOutcome::Fenced);
        };
        let (outcome, next) = cp.apply(c, now);
        let Some(mut next) = next else {
            return Ok(outcome);
        };
        // A batch slot's batch is done: it claims the next, if any is pending.
        // As in Redis: with the feed's size and slot count in force; a slot
        // beyond the count claims no more.
        if c.end_of_stream && next.batch_size > 0 {
            let (size, slots) = inner
                .data
                .batch_conf
                .get(&job.feed)
                .copied()
                .unwrap_or((next.batch_size, 1));
            if let Some((tenant, index)) = split_batch_slot(&job.partition)
                && (index as usize) < slots
                && inner.data.claim(&job.feed, tenant, size, &mut next)
            {
                next.next_due_ms = now;
            }
        }
        let generation = next.generation;
        let Some((_, cp)) = inner.data.jobs.get_mut(&k) else {
            return Ok(CommitOutcome::Fenced);
        };
        let before = std::mem::replace(cp, next);
        if !inner.data.retired.contains(&k) {
            inner.index.leave(&k, job, &before);
            inner.index.enter(&k, job, cp, now);
        }
        // The child jobs of the page's records, in the same step.
        for t in &c.triggers {
            inner.trigger(t, generation, now);
        }
        for b in &c.batches {
            inner.enqueue(b, generation, now);
        }
        self.persist(inner)?;
        Ok(outcome)
    }

    async fn fail(&self, job: &JobId, epoch: u64, error: &str) -> Result<bool, StateError> {
        self.with_lease(job, epoch, |cp, _| {
            cp.phase = Phase::Failed;
            cp.lease_until_ms = 0;
            cp.last_error = Some(error.to_string());
            true
        })
    }

    async fn recover(
        &self,
        job: &JobId,
        epoch: u64,
        start_from: Option<&str>,
    ) -> Result<bool, StateError> {
        self.with_lease(job, epoch, |cp, now| {
            cp.cursor = None;
            cp.start_from = start_from.map(str::to_string);
            cp.phase = Phase::Idle;
            cp.lease_until_ms = 0;
            cp.next_due_ms = now;
            cp.recoveries += 1;
            true
        })
    }

    async fn set_t0(&self, job: &JobId, epoch: u64, t0: &str) -> Result<bool, StateError> {
        self.with_lease(job, epoch, |cp, _| {
            if cp.t0.is_some() {
                return false;
            }
            cp.t0 = Some(t0.to_string());
            true
        })
    }
}

#[async_trait]
impl FeedRegistry for EmbeddedStore {
    async fn put_registry(&self, digest: &str, doc: &str) -> Result<u64, StateError> {
        let mut inner = self.lock();
        if let Some((v, d, _)) = &inner.data.registry
            && d == digest
        {
            return Ok(*v);
        }
        let v = inner.data.registry.as_ref().map_or(0, |r| r.0) + 1;
        inner.data.registry = Some((v, digest.to_string(), doc.to_string()));
        self.persist(&inner)?;
        Ok(v)
    }

    async fn registry(&self) -> Result<Option<(u64, String)>, StateError> {
        Ok(self
            .lock()
            .data
            .registry
            .as_ref()
            .map(|(v, _, d)| (*v, d.clone())))
    }

    async fn registry_version(&self) -> Result<Option<u64>, StateError> {
        Ok(self.lock().data.registry.as_ref().map(|r| r.0))
    }
}

#[async_trait]
impl TenantRegistry for EmbeddedStore {
    async fn added_tenants(&self, source: &str) -> Result<Vec<Tenant>, StateError> {
        let inner = self.lock();
        Ok(inner
            .data
            .tenants_added
            .get(source)
            .map(|m| {
                m.iter()
                    .map(|(name, vars)| Tenant {
                        name: name.clone(),
                        vars: vars.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn add_tenant(&self, source: &str, tenant: &Tenant) -> Result<bool, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let new = inner
            .data
            .tenants_added
            .entry(source.to_string())
            .or_default()
            .insert(tenant.name.clone(), tenant.vars.clone())
            .is_none();
        inner.data.tenants_version += 1;
        self.persist(inner)?;
        Ok(new)
    }

    async fn remove_tenant(&self, source: &str, name: &str) -> Result<bool, StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let removed = inner
            .data
            .tenants_added
            .get_mut(source)
            .is_some_and(|m| m.remove(name).is_some());
        inner.data.tenants_version += 1;
        self.persist(inner)?;
        Ok(removed)
    }

    async fn tenants_version(&self) -> Result<u64, StateError> {
        Ok(self.lock().data.tenants_version)
    }

    async fn active_tenants(&self, source: &str) -> Result<Vec<ActiveTenant>, StateError> {
        let inner = self.lock();
        let mut v = inner
            .data
            .tenants_active
            .get(source)
            .cloned()
            .unwrap_or_default();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    async fn set_active_tenants(
        &self,
        source: &str,
        tenants: &[ActiveTenant],
    ) -> Result<(), StateError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner
            .data
            .tenants_active
            .insert(source.to_string(), tenants.to_vec());
        self.persist(inner)?;
        Ok(())
    }
}

#[async_trait]
impl Leadership for EmbeddedStore {
    async fn try_lead(&self, id: &str, ttl: Duration) -> Result<bool, StateError> {
        let mut inner = self.lock();
        let now = now_ms();
        let until = now + ttl.as_millis() as u64;
        match &inner.leader {
            Some((who, exp)) if *exp > now && who != id => Ok(false),
            _ => {
                inner.leader = Some((id.to_string(), until));
                Ok(true)
            }
        }
    }

    async fn resign(&self, id: &str) -> Result<(), StateError> {
        let mut inner = self.lock();
        if inner.leader.as_ref().is_some_and(|(who, _)| who == id) {
            inner.leader = None;
        }
        Ok(())
    }
}

#[async_trait]
impl SourceLimits for EmbeddedStore {
    async fn rate_acquire(
        &self,
        source: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<Duration>, StateError> {
        let mut inner = self.lock();
        let now = now_ms() * 1000;
        let interval = crate::emission_interval_us(per_second);
        let tat = inner
            .rate_tat_us
            .get(source)
            .copied()
            .unwrap_or(now)
            .max(now);
        let new_tat = tat + interval;
        let allow_at = new_tat.saturating_sub(u64::from(burst.max(1)) * interval);
        if now < allow_at {
            return Ok(Some(Duration::from_micros(allow_at - now)));
        }
        inner.rate_tat_us.insert(source.to_string(), new_tat);
        Ok(None)
    }

    async fn pause_source(&self, source: &str, until_ms: u64) -> Result<(), StateError> {
        let mut inner = self.lock();
        let cur = inner.data.source_pauses.get(source).copied().unwrap_or(0);
        if until_ms > cur {
            inner
                .data
                .source_pauses
                .insert(source.to_string(), until_ms);
            self.persist(&inner)?;
        }
        Ok(())
    }

    async fn source_paused_until(&self, source: &str) -> Result<Option<u64>, StateError> {
        Ok(self
            .lock()
            .data
            .source_pauses
            .get(source)
            .copied()
            .filter(|t| *t > now_ms()))
    }
}
