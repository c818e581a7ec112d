//! The Redis implementation: one hash per job, every state change a
//! server-side Lua script that checks before it writes (loaded with EVALSHA,
//! reloaded on NOSCRIPT by `redis::Script`: a new master after a Sentinel
//! failover, whose script cache is empty, gets them on first use), times
//! from the server's clock (so epochs stay above every earlier one across a
//! failover: tidemark_core::checkpoint::next_epoch).
//! The scripts that change a job also keep the scheduler's indexes
//! (lua/index.lua describes them) in the same atomic step.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, FromRedisValue, Script, ScriptInvocation};
use tidemark_core::checkpoint::{
    Checkpoint, Commit, CommitOutcome, JobId, Phase, Stage, normalize_version,
};
use tidemark_core::clock::now_ms;
use tidemark_core::tenant::Tenant;

use crate::conn::{Conn, Durable, WaitReplicas};
use crate::keys::{Keys, member, running_job};
use crate::{
    Acquire, ActiveTenant, Control, FeedCensus, FeedRegistry, Fleet, JobPage, JobQuery, Jobs,
    Leadership, Leases, Rewind, Schedule, SourceLimits, StateError, Survey, TenantRegistry,
    WorkerSeen, high_water_ms,
};

/// The layout of the keys this version writes: 2 has the scheduler's indexes.
const LAYOUT: u64 = 2;
/// Jobs per script call or pipeline when many are read or written.
const BATCH: usize = 500;

pub const DEFAULT_PREFIX: &str = "tidemark:";

struct Scripts {
    commit: Script,
    acquire: Script,
    lease: Script,
    control: Script,
    leader: Script,
    ratelimit: Script,
    source_pause: Script,
    ensure: Script,
    retire: Script,
    read: Script,
    census: Script,
    fleet: Script,
    registry: Script,
    purge: Script,
}

/// A script that changes jobs: the index prelude, then its own text.
fn job_script(body: &str) -> Script {
    Script::new(&format!("{}\n{body}", include_str!("lua/index.lua")))
}

/// Job state in Redis. Cheap to clone; the connection reconnects by itself
/// (to the same server, or, for a Sentinel URL, to the master the
/// sentinels name after a failure).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    keys: Keys,
    scripts: std::sync::Arc<Scripts>,
    /// With [`RedisStore::with_wait`]: the writes that wait for replicas.
    durable: Option<std::sync::Arc<Durable>>,
}

impl RedisStore {
    /// Connect to `url` (`redis://` or `rediss://`, trusting the system's
    /// roots, or `redis+sentinel://` / `rediss+sentinel://`: see
    /// [`crate::sentinel`]) and keep every key under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StateError> {
        Self::connect_with_ca(url, prefix, None).await
    }

    /// [`RedisStore::connect`], a `rediss://` server's certificate also
    /// trusted when it chains to a CA in `ca_pem` (PEM certificates).
    pub async fn connect_with_ca(
        url: &str,
        prefix: &str,
        ca_pem: Option<&str>,
    ) -> Result<Self, StateError> {
        let conn = crate::client::open(url, ca_pem).await?;
        Ok(RedisStore {
            conn,
            keys: Keys::new(prefix),
            scripts: std::sync::Arc::new(Scripts {
                commit: job_script(include_str!("lua/commit.lua")),
                acquire: job_script(include_str!("lua/acquire.lua")),
                lease: job_script(include_str!("lua/lease.lua")),
                control: job_script(include_str!("lua/control.lua")),
                ensure: job_script(include_str!("lua/ensure.lua")),
                retire: job_script(include_str!("lua/retire.lua")),
                read: job_script(include_str!("lua/read.lua")),
                census: job_script(include_str!("lua/census.lua")),
                fleet: Script::new(include_str!("lua/fleet.lua")),
                leader: Script::new(include_str!("lua/leader.lua")),
                ratelimit: Script::new(include_str!("lua/ratelimit.lua")),
                source_pause: Script::new(include_str!("lua/source_pause.lua")),
                registry: Script::new(include_str!("lua/registry.lua")),
                purge: job_script(include_str!("lua/purge.lua")),
            }),
            durable: None,
        })
    }

    /// This store, its writes that matter followed by `WAIT` for
    /// `wait.replicas` replicas (at most `wait.timeout`): commits, new
    /// epochs (acquire, pause, resume, rewind, retire) and lease changes
    /// (renew, release, fail, recover, T0; not a page's take, which only
    /// lengthens the lease before that page's commit). A write acknowledged by
    /// fewer replicas in time is still done; it is logged (at most one
    /// warning per 10 s) and counted ([`RedisStore::wait_shortfalls`]).
    /// `None` or 0 replicas: no waiting.
    pub fn with_wait(mut self, wait: Option<WaitReplicas>) -> Self {
        self.durable = wait
            .filter(|w| w.replicas > 0)
            .map(|w| std::sync::Arc::new(Durable::new(self.conn.clone(), w)));
        self
    }

    /// What [`RedisStore::with_wait`] set.
    pub fn wait_replicas(&self) -> Option<WaitReplicas> {
        self.durable.as_ref().map(|d| d.wait())
    }

    /// Writes acknowledged by fewer replicas than [`RedisStore::with_wait`]
    /// asked for, since the store was made.
    pub fn wait_shortfalls(&self) -> u64 {
        self.durable.as_ref().map_or(0, |d| d.shortfalls())
    }

    /// Call `f` at each write acknowledged by fewer replicas than
    /// [`RedisStore::with_wait`] asked for (a role counts them in
    /// `tidemark_redis_wait_shortfalls_total`). Without waiting, never.
    pub fn on_wait_shortfall(&self, f: impl Fn() + Send + Sync + 'static) {
        if let Some(d) = &self.durable {
            d.on_shortfall(Box::new(f));
        }
    }

    /// Run a script that writes what a failover must not lose: with
    /// [`RedisStore::with_wait`], then wait for the replicas.
    async fn write<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, StateError> {
        Ok(match &self.durable {
            Some(d) => d.invoke(inv).await?,
            None => inv.invoke_async(&mut self.conn.clone()).await?,
        })
    }

    pub fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// PING, for readiness probes.
    pub async fn ping(&self) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Delete every key under this store's prefix (tests and `tidemark reset`).
    pub async fn delete_all(&self) -> Result<(), StateError> {
        let mut c = self.conn.clone();
        let pattern = format!("{}*", self.keys.prefix());
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if !keys.is_empty() {
            let _: () = c.del(keys).await?;
        }
        Ok(())
    }
}

/// A child job's vars as stored: a JSON object of strings.
fn vars_json(vars: &std::collections::BTreeMap<String, String>) -> String {
    serde_json::to_string(vars).unwrap_or_else(|_| "{}".into())
}

fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

/// The hash fields of a checkpoint; `None` fields are left out.
fn to_fields(job: &JobId, cp: &Checkpoint) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("feed", job.feed.clone()),
        ("partition", job.partition.clone()),
        ("seq", cp.seq.to_string()),
        ("epoch", cp.epoch.to_string()),
        ("lease_until_ms", cp.lease_until_ms.to_string()),
        ("phase", cp.phase.as_str().to_string()),
        (
            "stage",
            match cp.stage {
                Stage::Bulk => "bulk".into(),
                Stage::Incremental => "incremental".into(),
            },
        ),
        ("pages", cp.pages.to_string()),
        ("records", cp.records.to_string()),
        ("next_due_ms", cp.next_due_ms.to_string()),
        ("recoveries", cp.recoveries.to_string()),
    ];
    for (name, v) in [
        ("cursor", &cp.cursor),
        ("start_from", &cp.start_from),
        ("high_water", &cp.high_water),
        ("t0", &cp.t0),
        ("last_error", &cp.last_error),
        ("pv", &cp.parent_version),
    ] {
        if v.is_some() {
            f.push((name, opt(v)));
        }
    }
    if !cp.vars.is_empty() {
        f.push(("vars", vars_json(&cp.vars)));
    }
    if cp.rerun {
        f.push(("rerun", "1".into()));
    }
    if cp.generation > 0 {
        f.push(("gen", cp.generation.to_string()));
    }
    if cp.batch_size > 0 {
        f.push(("bsize", cp.batch_size.to_string()));
    }
    if !cp.batch.is_empty() {
        f.push((
            "batch",
            serde_json::to_string(&cp.batch).unwrap_or_else(|_| "[]".into()),
        ));
    }
    if let Some(t) = cp.last_end_of_stream_ms {
        f.push(("last_eos_ms", t.to_string()));
    }
    if let Some(t) = cp.last_commit_ms {
        f.push(("last_commit_ms", t.to_string()));
    }
    f
}

fn from_fields(key: &str, h: &HashMap<String, String>) -> Result<(JobId, Checkpoint), StateError> {
    let corrupt = |reason: String| StateError::Corrupt {
        job: key.to_string(),
        reason,
    };
    let num = |name: &str| -> Result<u64, StateError> {
        match h.get(name) {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|_| corrupt(format!("field {name} is not a number: {v:?}"))),
        }
    };
    let s = |name: &str| h.get(name).cloned();
    let phase = match h.get("phase") {
        None => Phase::Idle,
        Some(p) => Phase::parse(p).ok_or_else(|| corrupt(format!("unknown phase {p:?}")))?,
    };
    let stage = match h.get("stage").map(String::as_str) {
        None | Some("bulk") => Stage::Bulk,
        Some("incremental") => Stage::Incremental,
        Some(other) => return Err(corrupt(format!("unknown stage {other:?}"))),
    };
    let job = JobId {
        feed: s("feed").ok_or_else(|| corrupt("no feed field".into()))?,
        partition: s("partition").ok_or_else(|| corrupt("no partition field".into()))?,
    };
    let cp = Checkpoint {
        cursor: s("cursor"),
        start_from: s("start_from"),
        seq: num("seq")?,
        epoch: num("epoch")?,
        lease_until_ms: num("lease_until_ms")?,
        high_water: s("high_water"),
        phase,
        stage,
        t0: s("t0"),
        pages: num("pages")?,
        records: num("records")?,
        last_error: s("last_error"),
        last_end_of_stream_ms: h
            .get("last_eos_ms")
            .map(|_| num("last_eos_ms"))
            .transpose()?,
        next_due_ms: num("next_due_ms")?,
        recoveries: num("recoveries")?,
        last_commit_ms: h
            .get("last_commit_ms")
            .map(|_| num("last_commit_ms"))
            .transpose()?,
        parent_version: s("pv"),
        vars: match h.get("vars") {
            None => Default::default(),
            Some(v) => serde_json::from_str(v)
                .map_err(|e| corrupt(format!("field vars is not a JSON object of strings: {e}")))?,
        },
        rerun: h.get("rerun").is_some_and(|v| v == "1"),
        generation: num("gen")?,
        batch_size: num("bsize")?,
        batch: match h.get("batch") {
            None => Vec::new(),
            Some(v) => serde_json::from_str(v)
                .map_err(|e| corrupt(format!("field batch is not a JSON list of strings: {e}")))?,
        },
    };
    Ok((job, cp))
}

#[async_trait]
impl Jobs for RedisStore {
    async fn list(&self) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
        let mut out = Vec::new();
        for feed in self.feeds().await? {
            out.extend(crate::feed_jobs(self, &feed).await?);
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn ensure_many(&self, jobs: &[JobId], init: &Checkpoint) -> Result<usize, StateError> {
        let common: Vec<(&'static str, String)> = to_fields(&JobId::new("", ""), init)
            .into_iter()
            .filter(|(k, _)| !matches!(*k, "feed" | "partition"))
            .collect();
        let mut joined = 0;
        for chunk in jobs.chunks(BATCH) {
            let mut inv = self.scripts.ensure.prepare_invoke();
            inv.arg(self.keys.prefix()).arg(common.len());
            for (k, v) in &common {
                inv.arg(*k).arg(v);
            }
            for job in chunk {
                inv.key(self.keys.job(job));
                inv.arg(&job.feed)
                    .arg(member(&job.partition))
                    .arg(&job.partition);
            }
            let n: usize = inv.invoke_async(&mut self.conn.clone()).await?;
            joined += n;
        }
        Ok(joined)
    }

    async fn retire(&self, job: &JobId) -> Result<bool, StateError> {
        let r: i64 = self
            .write(&self.job_call(&self.scripts.retire, job))
            .await?;
        Ok(r == 1)
    }

    async fn retired_children(
        &self,
        feed: &str,
        prefix: Option<&str>,
    ) -> Result<Vec<JobId>, StateError> {
        let (min, max) = match prefix.map(member) {
            Some(p) => (format!("[{p}"), format!("[{p}\u{7f}")),
            None => ("-".to_string(), "+".to_string()),
        };
        let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.feed_index(feed, "retired"))
            .arg(&min)
            .arg(&max)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(members
            .iter()
            .map(|m| JobId::new(feed, crate::keys::partition(m)))
            .collect())
    }

    async fn purge_parents(&self, feed: &str, tenant: Option<&str>) -> Result<u64, StateError> {
        let mut c = self.conn.clone();
        let versions = self.keys.feed_index(feed, "pv");
        let pending = self
            .keys
            .feed_index(feed, &format!("pending:{}", tenant.unwrap_or("")));
        let _: i64 = redis::cmd("DEL").arg(&pending).query_async(&mut c).await?;
        let Some(t) = tenant else {
            let n: u64 = redis::cmd("HLEN")
                .arg(&versions)
                .query_async(&mut c)
                .await?;
            let _: i64 = redis::cmd("DEL").arg(&versions).query_async(&mut c).await?;
            return Ok(n);
        };
        // A tenant's parents are the fields under `<tenant>/`.
        let pattern = format!("{}*", tidemark_core::tenant::job_partition(t, ""));
        let mut cursor = 0u64;
        let mut forgot = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("HSCAN")
                .arg(&versions)
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            let fields: Vec<&String> = page.iter().step_by(2).collect();
            if !fields.is_empty() {
                let n: u64 = redis::cmd("HDEL")
                    .arg(&versions)
                    .arg(&fields)
                    .query_async(&mut c)
                    .await?;
                forgot += n;
            }
            if next == 0 {
                return Ok(forgot);
            }
            cursor = next;
        }
    }

    async fn purge(&self, job: &JobId) -> Result<Option<bool>, StateError> {
        let r: i64 = self
            .job_call(&self.scripts.purge, job)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((r >= 0).then_some(r == 1))
    }

    async fn acquire(
        &self,
        job: &JobId,
        lease: Duration,
        force: bool,
    ) -> Result<Acquire, StateError> {
        let (status, value): (String, String) = self
            .write(
                self.job_call(&self.scripts.acquire, job)
                    .arg(lease.as_millis() as u64)
                    .arg(if force { "1" } else { "0" }),
            )
            .await?;
        let parse = |v: &str| {
            v.parse::<u64>().map_err(|_| StateError::Corrupt {
                job: job.to_string(),
                reason: format!("bad number {v:?}"),
            })
        };
        Ok(match status.as_str() {
            "GRANTED" => Acquire::Granted {
                epoch: parse(&value)?,
            },
            "BUSY" => Acquire::Busy {
                until_ms: parse(&value)?,
            },
            "PAUSED" => Acquire::Paused,
            "FAILED" => Acquire::Failed,
            _ => Acquire::Missing,
        })
    }

    async fn control(&self, job: &JobId, control: &Control) -> Result<u64, StateError> {
        let (op, target, value) = match control {
            Control::Pause => ("pause", "", String::new()),
            Control::Resume => ("resume", "", String::new()),
            Control::Rewind(Rewind::Start) => ("rewind", "start", String::new()),
            Control::Rewind(Rewind::Cursor(c)) => ("rewind", "cursor", c.clone()),
            Control::Rewind(Rewind::Time(t)) => ("rewind", "time", t.clone()),
        };
        let e: String = self
            .write(
                self.job_call(&self.scripts.control, job)
                    .arg(op)
                    .arg(target)
                    .arg(value),
            )
            .await?;
        if e.is_empty() {
            return Err(StateError::NoSuchJob(job.clone()));
        }
        e.parse().map_err(|_| StateError::Corrupt {
            job: job.to_string(),
            reason: format!("epoch {e:?}"),
        })
    }

    async fn feeds(&self) -> Result<Vec<String>, StateError> {
        let mut feeds: Vec<String> = self.conn.clone().smembers(self.keys.feeds()).await?;
        feeds.sort();
        Ok(feeds)
    }

    async fn page(&self, q: &JobQuery) -> Result<JobPage, StateError> {
        let prefix = q.prefix.as_deref().map(member);
        let after = q.after.as_deref().map(member);
        let min = match (&after, &prefix) {
            (Some(a), Some(p)) if a < p => format!("[{p}"),
            (Some(a), _) => format!("({a}"),
            (None, Some(p)) => format!("[{p}"),
            (None, None) => "-".to_string(),
        };
        // Members are percent-encoded ASCII: 0x7f sorts after all of them.
        let max = match &prefix {
            Some(p) => format!("[{p}\u{7f}"),
            None => "+".to_string(),
        };
        let limit = q.limit.max(1);
        let mut c = self.conn.clone();
        let members: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(self.keys.feed_index(&q.feed, "jobs"))
            .arg(&min)
            .arg(&max)
            .arg("LIMIT")
            .arg(0)
            .arg(limit + 1)
            .query_async(&mut c)
            .await?;
        let more = members.len() > limit;
        let members = &members[..members.len().min(limit)];
        let jobs = self.read_jobs(&q.feed, members).await?;
        Ok(JobPage::new(jobs, more))
    }

    async fn census(&self) -> Result<Vec<FeedCensus>, StateError> {
        type Rows = (HashMap<String, u64>, Vec<(String, String, String)>);
        let (counts, feeds): Rows = self
            .scripts
            .census
            .arg(self.keys.prefix())
            .invoke_async(&mut self.conn.clone())
            .await?;
        let count =
            |feed: &str, what: &str| counts.get(&format!("{feed}|{what}")).copied().unwrap_or(0);
        let ms = |score: &str| score.parse::<f64>().ok().map(|s| s as u64);
        let mut out: Vec<FeedCensus> = feeds
            .into_iter()
            .map(|(feed, progress, hw)| FeedCensus {
                idle: count(&feed, "idle"),
                running: count(&feed, "running"),
                paused: count(&feed, "paused"),
                failed: count(&feed, "failed"),
                records: count(&feed, "records"),
                oldest_progress_ms: ms(&progress),
                oldest_high_water_ms: ms(&hw),
                feed,
            })
            .collect();
        out.sort_by(|a, b| a.feed.cmp(&b.feed));
        Ok(out)
    }

    async fn failures(
        &self,
        feed: &str,
        limit: usize,
    ) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let members: Vec<String> = self
            .conn
            .clone()
            .zrange(self.keys.feed_index(feed, "failed"), 0, limit as isize - 1)
            .await?;
        self.read_jobs(feed, &members).await
    }
}

#[async_trait]
impl Schedule for RedisStore {
    async fn due_jobs(
        &self,
        wants: &[(String, usize)],
        now_ms: u64,
    ) -> Result<Vec<JobId>, StateError> {
        let mut pipe = redis::pipe();
        for (feed, n) in wants {
            pipe.zrangebyscore_limit(
                self.keys.feed_index(feed, "due"),
                "-inf",
                now_ms,
                0,
                *n as isize,
            );
        }
        let found: Vec<Vec<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(wants
            .iter()
            .zip(found)
            .flat_map(|((feed, _), members)| {
                members
                    .into_iter()
                    .map(move |m| JobId::new(feed.clone(), crate::partition(&m)))
            })
            .collect())
    }

    async fn survey(
        &self,
        now_ms: u64,
        expired_limit: usize,
        feeds_limit: usize,
    ) -> Result<Survey, StateError> {
        let (expired, running, due_feeds, tenants_version): (
            Vec<String>,
            u64,
            Vec<String>,
            Option<u64>,
        ) = redis::pipe()
            .zrangebyscore_limit(
                self.keys.running(),
                "-inf",
                now_ms,
                0,
                expired_limit as isize,
            )
            .zcard(self.keys.running())
            .zrangebyscore_limit(
                self.keys.due_feeds(),
                "-inf",
                now_ms,
                0,
                feeds_limit as isize,
            )
            .get(self.keys.tenants_version())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(Survey {
            expired: expired.iter().filter_map(|e| running_job(e)).collect(),
            running,
            due_feeds,
            tenants_version: tenants_version.unwrap_or(0),
        })
    }

    async fn migrate(&self) -> Result<u64, StateError> {
        let mut c = self.conn.clone();
        let layout: Option<u64> = c.get(self.keys.layout()).await?;
        if layout.is_some_and(|l| l >= LAYOUT) {
            return Ok(0);
        }
        // Layout 1 kept a set of every job hash key; each job joins the
        // indexes by what its hash says (ensure's join path), in batches.
        let legacy = self.keys.legacy_jobs();
        let mut joined = 0u64;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(&legacy)
                .arg(cursor)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut c)
                .await?;
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.hget(k, &["feed", "partition"]);
            }
            let names: Vec<(Option<String>, Option<String>)> = pipe.query_async(&mut c).await?;
            let jobs: Vec<JobId> = names
                .into_iter()
                .filter_map(|(f, p)| Some(JobId::new(f?, p?)))
                .collect();
            joined += self.ensure_many(&jobs, &Checkpoint::default()).await? as u64;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let _: () = redis::pipe()
            .atomic()
            .del(&legacy)
            .set(self.keys.layout(), LAYOUT)
            .query_async(&mut c)
            .await?;
        if joined > 0 {
            tracing::info!(jobs = joined, "state migrated to the indexed layout");
        }
        Ok(joined)
    }
}

#[async_trait]
impl Fleet for RedisStore {
    async fn heartbeat(&self, id: &str, concurrency: u32, ttl: Duration) -> Result<(), StateError> {
        self.fleet_op("beat", &format!("{id}|{concurrency}"), ttl)
            .await
            .map(drop)
    }

    async fn leave(&self, id: &str, concurrency: u32) -> Result<(), StateError> {
        self.fleet_op("leave", &format!("{id}|{concurrency}"), Duration::ZERO)
            .await
            .map(drop)
    }

    async fn fleet(&self) -> Result<Vec<WorkerSeen>, StateError> {
        let v = self.fleet_op("list", "", Duration::ZERO).await?;
        let members: Vec<String> = redis::from_redis_value(&v)?;
        Ok(members
            .iter()
            .filter_map(|m| {
                let (id, c) = m.rsplit_once('|')?;
                Some(WorkerSeen {
                    id: id.to_string(),
                    concurrency: c.parse().ok()?,
                })
            })
            .collect())
    }
}

#[async_trait]
impl Leases for RedisStore {
    async fn get(&self, job: &JobId) -> Result<Option<Checkpoint>, StateError> {
        let found = self
            .read_jobs(&job.feed, std::slice::from_ref(&member(&job.partition)))
            .await?;
        Ok(found.into_iter().next().map(|(_, cp)| cp))
    }

    async fn take(
        &self,
        job: &JobId,
        epoch: u64,
        seq: u64,
        lease: Duration,
    ) -> Result<Option<Checkpoint>, StateError> {
        // Not waited for: a page's take only lengthens the lease, and the
        // page's commit (waited for) follows it on the same job.
        let h: HashMap<String, String> = self
            .job_call(&self.scripts.lease, job)
            .arg("take")
            .arg(epoch)
            .arg(lease.as_millis() as u64)
            .arg(seq)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        from_fields(&self.keys.job(job), &h).map(|(_, cp)| Some(cp))
    }

    async fn renew(&self, job: &JobId, epoch: u64, lease: Duration) -> Result<bool, StateError> {
        self.lease_op(job, "renew", epoch, (lease.as_millis() as u64).to_string())
            .await
    }

    async fn release(&self, job: &JobId, epoch: u64) -> Result<bool, StateError> {
        self.lease_op(job, "release", epoch, String::new()).await
    }

    async fn commit(&self, job: &JobId, c: &Commit) -> Result<CommitOutcome, StateError> {
        let hw = c.high_water.as_deref().map(normalize_version);
        let hw_ms = hw.as_deref().and_then(high_water_ms);
        let mut inv = self.job_call(&self.scripts.commit, job);
        inv.arg(c.epoch)
            .arg(c.expected_seq)
            .arg(if c.new_cursor.is_some() { "1" } else { "0" })
            .arg(c.new_cursor.clone().unwrap_or_default())
            .arg(c.new_seq)
            .arg(if hw.is_some() { "1" } else { "0" })
            .arg(hw.unwrap_or_default())
            .arg(c.count)
            .arg(if c.end_of_stream { "1" } else { "0" })
            .arg(c.next_due_ms)
            .arg(c.lease_ms)
            .arg(if c.restart.is_some() { "1" } else { "0" })
            .arg(match c.restart.as_ref().map(|r| r.stage) {
                Some(Stage::Incremental) => "incremental",
                _ => "bulk",
            })
            .arg(
                match c.restart.as_ref().and_then(|r| r.start_from.as_ref()) {
                    Some(_) => "1",
                    None => "0",
                },
            )
            .arg(
                c.restart
                    .as_ref()
                    .and_then(|r| r.start_from.clone())
                    .unwrap_or_default(),
            )
            .arg(hw_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(c.note.clone().unwrap_or_default());
        // Then the triggers: how many, and per trigger: child feed, member,
        // partition, parent version, vars.
        inv.arg(c.triggers.len());
        for t in &c.triggers {
            inv.arg(&t.job.feed)
                .arg(member(&t.job.partition))
                .arg(&t.job.partition)
                .arg(&t.version)
                .arg(vars_json(&t.vars));
        }
        // Then per batched child feed: feed, tenant, size, its slots, its parents.
        for b in &c.batches {
            inv.arg(&b.feed)
                .arg(b.tenant.as_deref().unwrap_or(""))
                .arg(b.size)
                .arg(b.slots.len());
            for slot in &b.slots {
                inv.arg(member(&slot.partition)).arg(&slot.partition);
            }
            inv.arg(b.parents.len());
            for (partition, version) in &b.parents {
                inv.arg(partition).arg(version);
            }
        }
        let out: String = self.write(&inv).await?;
        CommitOutcome::parse(&out).ok_or_else(|| StateError::Corrupt {
            job: job.to_string(),
            reason: format!("commit answered {out:?}"),
        })
    }

    async fn fail(&self, job: &JobId, epoch: u64, error: &str) -> Result<bool, StateError> {
        self.lease_op(job, "fail", epoch, error.to_string()).await
    }

    async fn recover(
        &self,
        job: &JobId,
        epoch: u64,
        start_from: Option<&str>,
    ) -> Result<bool, StateError> {
        self.lease_op(job, "recover", epoch, start_from.unwrap_or("").to_string())
            .await
    }

    async fn set_t0(&self, job: &JobId, epoch: u64, t0: &str) -> Result<bool, StateError> {
        self.lease_op(job, "t0", epoch, t0.to_string()).await
    }
}

#[async_trait]
impl FeedRegistry for RedisStore {
    async fn put_registry(&self, digest: &str, doc: &str) -> Result<u64, StateError> {
        let v: u64 = self
            .scripts
            .registry
            .key(self.keys.registry())
            .arg(digest)
            .arg(doc)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(v)
    }

    async fn registry(&self) -> Result<Option<(u64, String)>, StateError> {
        let (v, doc): (Option<u64>, Option<String>) = self
            .conn
            .clone()
            .hget(self.keys.registry(), &["version", "doc"])
            .await?;
        Ok(v.zip(doc))
    }

    async fn registry_version(&self) -> Result<Option<u64>, StateError> {
        Ok(self
            .conn
            .clone()
            .hget(self.keys.registry(), "version")
            .await?)
    }
}

#[async_trait]
impl TenantRegistry for RedisStore {
    async fn added_tenants(&self, source: &str) -> Result<Vec<Tenant>, StateError> {
        let all: Vec<(String, String)> = self
            .conn
            .clone()
            .hgetall(self.keys.tenants_added(source))
            .await?;
        let mut out = Vec::with_capacity(all.len());
        for (name, vars) in all {
            let vars = serde_json::from_str(&vars).map_err(|e| StateError::Corrupt {
                job: format!("tenant {source}/{name}"),
                reason: e.to_string(),
            })?;
            out.push(Tenant { name, vars });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn add_tenant(&self, source: &str, tenant: &Tenant) -> Result<bool, StateError> {
        let vars = serde_json::to_string(&tenant.vars).unwrap_or_else(|_| "{}".into());
        let (added, _): (u64, u64) = redis::pipe()
            .atomic()
            .hset(self.keys.tenants_added(source), &tenant.name, vars)
            .incr(self.keys.tenants_version(), 1)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(added == 1)
    }

    async fn remove_tenant(&self, source: &str, name: &str) -> Result<bool, StateError> {
        let (removed, _): (u64, u64) = redis::pipe()
            .atomic()
            .hdel(self.keys.tenants_added(source), name)
            .incr(self.keys.tenants_version(), 1)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(removed == 1)
    }

    async fn tenants_version(&self) -> Result<u64, StateError> {
        let v: Option<u64> = self.conn.clone().get(self.keys.tenants_version()).await?;
        Ok(v.unwrap_or(0))
    }

    async fn active_tenants(&self, source: &str) -> Result<Vec<ActiveTenant>, StateError> {
        let all: Vec<(String, String)> = self
            .conn
            .clone()
            .hgetall(self.keys.tenants_active(source))
            .await?;
        let mut out = Vec::with_capacity(all.len());
        for (name, doc) in all {
            out.push(serde_json::from_str(&doc).map_err(|e| StateError::Corrupt {
                job: format!("tenant {source}/{name}"),
                reason: e.to_string(),
            })?);
        }
        out.sort_by(|a: &ActiveTenant, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn set_active_tenants(
        &self,
        source: &str,
        tenants: &[ActiveTenant],
    ) -> Result<(), StateError> {
        let key = self.keys.tenants_active(source);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key);
        for chunk in tenants.chunks(1000) {
            let fields: Vec<(String, String)> = chunk
                .iter()
                .map(|t| {
                    (
                        t.name.clone(),
                        serde_json::to_string(t).unwrap_or_else(|_| "{}".into()),
                    )
                })
                .collect();
            pipe.hset_multiple(&key, &fields);
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }
}

#[async_trait]
impl Leadership for RedisStore {
    async fn try_lead(&self, id: &str, ttl: Duration) -> Result<bool, StateError> {
        let r: i64 = self
            .scripts
            .leader
            .key(self.keys.leader())
            .arg("lead")
            .arg(id)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(r == 1)
    }

    async fn resign(&self, id: &str) -> Result<(), StateError> {
        let _: i64 = self
            .scripts
            .leader
            .key(self.keys.leader())
            .arg("resign")
            .arg(id)
            .arg(0)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

#[async_trait]
impl SourceLimits for RedisStore {
    async fn rate_acquire(
        &self,
        source: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<Duration>, StateError> {
        let interval_us = crate::emission_interval_us(per_second);
        let (granted, wait_us): (i64, i64) = self
            .scripts
            .ratelimit
            .key(self.keys.rate(source))
            .arg(interval_us)
            .arg(burst.max(1))
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((granted != 1).then(|| Duration::from_micros(wait_us.max(1) as u64)))
    }

    async fn pause_source(&self, source: &str, until_ms: u64) -> Result<(), StateError> {
        let _: i64 = self
            .scripts
            .source_pause
            .key(self.keys.source_pause(source))
            .arg(until_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn source_paused_until(&self, source: &str) -> Result<Option<u64>, StateError> {
        let v: Option<u64> = self
            .conn
            .clone()
            .get(self.keys.source_pause(source))
            .await?;
        Ok(v.filter(|t| *t > now_ms()))
    }
}

impl RedisStore {
    /// An invocation of a job script: the prefix, the job's feed and
    /// member first (lua/index.lua), its hash as the declared key.
    fn job_call<'a>(&self, script: &'a Script, job: &JobId) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.job(job))
            .arg(self.keys.prefix())
            .arg(&job.feed)
            .arg(member(&job.partition));
        inv
    }

    async fn lease_op(
        &self,
        job: &JobId,
        op: &str,
        epoch: u64,
        arg: String,
    ) -> Result<bool, StateError> {
        let r: i64 = self
            .write(
                self.job_call(&self.scripts.lease, job)
                    .arg(op)
                    .arg(epoch)
                    .arg(arg),
            )
            .await?;
        Ok(r == 1)
    }

    async fn fleet_op(
        &self,
        op: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<redis::Value, StateError> {
        Ok(self
            .scripts
            .fleet
            .key(self.keys.workers())
            .arg(op)
            .arg(member)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await?)
    }

    /// The checkpoints of a feed's jobs named by member, in that order
    /// (each its hash and the long values beside it: lua/index.lua); a
    /// member whose hash is gone is left out.
    async fn read_jobs(
        &self,
        feed: &str,
        members: &[String],
    ) -> Result<Vec<(JobId, Checkpoint)>, StateError> {
        let mut out = Vec::with_capacity(members.len());
        let mut c = self.conn.clone();
        for chunk in members.chunks(BATCH) {
            let mut inv = self.scripts.read.prepare_invoke();
            inv.arg(self.keys.prefix());
            for m in chunk {
                inv.key(self.keys.job_member(feed, m)).arg(feed).arg(m);
            }
            let jobs: Vec<HashMap<String, String>> = inv.invoke_async(&mut c).await?;
            for (m, h) in chunk.iter().zip(jobs) {
                if !h.is_empty() {
                    out.push(from_fields(&self.keys.job_member(feed, m), &h)?);
                }
            }
        }
        Ok(out)
    }
}
