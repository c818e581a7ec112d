//! The embedded implementation: one process, state in memory, persisted to a
//! JSON file after every change by atomic replace (write a temporary file,
//! fsync it, rename it over the old one), so a crash leaves either the old
//! state or the new one. Same semantics as the Redis scripts.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tidemark_core::checkpoint::{
    Checkpoint, Commit, CommitOutcome, JobId, Phase, Stage, next_epoch,
};
use tidemark_core::clock::now_ms;

use crate::{
    Acquire, Control, FeedRegistry, Jobs, Leadership, Leases, Rewind, SourceLimits, StateError,
};

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    jobs: BTreeMap<String, (JobId, Checkpoint)>,
    source_pauses: BTreeMap<String, u64>,
    /// (version, digest, document)
    #[serde(default)]
    registry: Option<(u64, String, String)>,
}

#[derive(Default)]
struct Inner {
    data: Persisted,
    leader: Option<(String, u64)>,
    rate_tat_us: HashMap<String, u64>,
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

    /// Change one job under the lock and persist when `f` says it changed.
    fn with_job<T>(
        &self,
        job: &JobId,
        f: impl FnOnce(&mut Checkpoint, u64) -> (T, bool),
    ) -> Result<Option<T>, StateError> {
        let mut inner = self.lock();
        let now = now_ms();
        let Some((_, cp)) = inner.data.jobs.get_mut(&key(job)) else {
            return Ok(None);
        };
        let (out, changed) = f(cp, now);
        if changed {
            self.persist(&inner)?;
        }
        Ok(Some(out))
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
        let mut v: Vec<(JobId, Checkpoint)> = inner.data.jobs.values().cloned().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    async fn ensure(&self, job: &JobId, init: &Checkpoint) -> Result<bool, StateError> {
        let mut inner = self.lock();
        if inner.data.jobs.contains_key(&key(job)) {
            return Ok(false);
        }
        inner
            .data
            .jobs
            .insert(key(job), (job.clone(), init.clone()));
        self.persist(&inner)?;
        Ok(true)
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
                    cp.next_due_ms = now;
                    cp.last_error = None;
                }
                Control::Rewind(to) => {
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
impl Leases for EmbeddedStore {
    async fn get(&self, job: &JobId) -> Result<Option<Checkpoint>, StateError> {
        Ok(self
            .lock()
            .data
            .jobs
            .get(&key(job))
            .map(|(_, cp)| cp.clone()))
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
        let r = self.with_job(job, |cp, now| {
            let (outcome, next) = cp.apply(c, now);
            match next {
                Some(n) => {
                    *cp = n;
                    (outcome, true)
                }
                None => (outcome, false),
            }
        })?;
        Ok(r.unwrap_or(CommitOutcome::Fenced))
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
