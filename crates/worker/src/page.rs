//! One page task, following DESIGN.md's "life of a page": check the task
//! against the checkpoint, take a rate-limit permit, fetch, read, publish
//! every record with confirms, commit with one fenced step, hand on the next
//! task. The outcome says what the caller does with the delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use tidemark_bus::{OutPage, OutRecord, PageTask};
use tidemark_core::SourceConfig;
use tidemark_core::checkpoint::{
    Checkpoint, Commit, CommitOutcome, Phase, Restart, Stage, compare_versions, max_version,
};
use tidemark_core::clock::now_ms;
use tidemark_core::config::{FeedConfig, Mode, Partition};
use tidemark_core::pagination::{
    MAX_EMPTY_PAGES_IN_A_ROW, Next, Position, empty_run_error, redact_query,
};
use tidemark_core::record::{identity, page_message_id, positional_message_id, record_message_id};
use tidemark_core::timefmt::parse_timestamp;
use tidemark_source::{FetchError, HttpSource, backoff_delay};
use tidemark_telemetry::Metrics;

use crate::feeds::Snapshot;
use crate::{Worker, crash_point};

/// What became of a task.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The page is committed (and the next task published).
    Done,
    /// Nothing to do; ack. The reason is a metric label.
    Dropped(&'static str),
    /// The task itself is wrong (it names no job): dead-letter it with the
    /// reason, fail no job.
    Rejected { reason: &'static str, error: String },
    /// A transient failure: try again after `delay` as attempt + 1.
    Retry { delay: Duration, error: String },
    /// Cannot succeed: mark the job failed and dead-letter the task.
    Fail { error: String },
    /// The cursor expired; the job restarts from its high-water mark.
    Recovered,
    /// Our infrastructure (Redis, the broker) failed: give the task back.
    Requeue { error: String },
}

/// Everything a page needs that comes from the registry: the snapshot it
/// was read from, and where in it the feed and its source are.
struct Resolved {
    snap: Arc<Snapshot>,
    feed: usize,
    partition: Partition,
    http: HttpSource,
    rate: Option<(f64, u32)>,
}

impl Resolved {
    fn feed(&self) -> &FeedConfig {
        &self.snap.config.feeds[self.feed]
    }
    fn source_name(&self) -> &str {
        &self.feed().source
    }
    fn source(&self) -> &SourceConfig {
        // Present: `resolve` checked it.
        &self.snap.config.sources[self.source_name()]
    }
}

/// `t` (a time or a time-valued version) minus the feed's `lag`, as RFC 3339.
fn minus_lag(feed: &FeedConfig, t: &str) -> Option<String> {
    let lag = chrono::Duration::from_std(feed.lag()).unwrap_or_default();
    parse_timestamp(t)
        .ok()
        .map(|t| (t - lag).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

/// Where a chain restarts without a cursor: the high-water mark minus lag,
/// else the start point it had.
fn restart_point(feed: &FeedConfig, high: Option<&str>, cp: &Checkpoint) -> Option<String> {
    high.and_then(|h| minus_lag(feed, h))
        .or_else(|| cp.start_from.clone())
}

impl Worker {
    pub(crate) async fn process(&self, task: &PageTask) -> Outcome {
        let job = &task.job;
        let cp = match self.store.get(job).await {
            Ok(Some(cp)) => cp,
            Ok(None) => {
                return Outcome::Rejected {
                    reason: "unknown_job",
                    error: format!(
                        "no job {job} in the state store (a task for a removed feed, or not one of ours)"
                    ),
                };
            }
            Err(e) => {
                return Outcome::Requeue {
                    error: format!("reading the checkpoint: {e}"),
                };
            }
        };
        if task.epoch != cp.epoch {
            return Outcome::Dropped("stale_epoch");
        }
        if task.seq < cp.seq {
            return Outcome::Dropped("already_applied");
        }
        if task.seq > cp.seq {
            return Outcome::Dropped("conflict");
        }
        if cp.phase != Phase::Running {
            return Outcome::Dropped("not_running");
        }
        let r = match self.resolve(task).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };

        // The lease outlives slow pages: renew it while this page works; a
        // refused renewal means a newer epoch owns the job, so stop.
        let renew = self.keep_lease(task);
        tokio::select! {
            out = self.page(task, &cp, &r) => out,
            () = renew => Outcome::Dropped("fenced"),
        }
    }

    async fn resolve(&self, task: &PageTask) -> Result<Resolved, Outcome> {
        let job = &task.job;
        let mut snap = self
            .feeds
            .current(false)
            .await
            .map_err(|error| Outcome::Requeue { error })?;
        if snap
            .as_ref()
            .is_none_or(|s| s.config.feed(&job.feed).is_none())
        {
            snap = self
                .feeds
                .current(true)
                .await
                .map_err(|error| Outcome::Requeue { error })?;
        }
        let Some(snap) = snap else {
            return Err(Outcome::Requeue {
                error: "no feed registry yet: is a coordinator running?".into(),
            });
        };
        let Some(feed) = snap.config.feeds.iter().position(|f| f.name == job.feed) else {
            return Err(Outcome::Fail {
                error: format!("feed {} is not in the feed registry", job.feed),
            });
        };
        let cfg = &snap.config.feeds[feed];
        let partition = match cfg.partition(&job.partition, Utc::now()) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(Outcome::Fail {
                    error: format!("feed {} has no partition {:?}", job.feed, job.partition),
                });
            }
            Err(e) => return Err(Outcome::Fail { error: e }),
        };
        let (Some(source), Some(http)) = (
            snap.config.sources.get(&cfg.source),
            snap.sources.get(&cfg.source),
        ) else {
            return Err(Outcome::Fail {
                error: format!("feed {} names an unknown source {}", cfg.name, cfg.source),
            });
        };
        let http = http.clone().map_err(|error| Outcome::Fail { error })?;
        let rate = source.rate_limit.as_ref().map(|r| {
            (
                r.per_second,
                r.burst
                    .unwrap_or_else(|| r.per_second.ceil().max(1.0) as u32),
            )
        });
        Ok(Resolved {
            snap,
            feed,
            partition,
            http,
            rate,
        })
    }

    /// Renew the lease every third of it; returns only when renewal is refused.
    async fn keep_lease(&self, task: &PageTask) {
        let every = self.opts.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self
                .store
                .renew(&task.job, task.epoch, self.opts.lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(job = %task.job, epoch = task.epoch, "lease lost to a newer epoch; stopping this page");
                    return;
                }
                // Redis unreachable: keep working; the commit will tell.
                Err(e) => tracing::warn!(job = %task.job, error = %e, "cannot renew the lease"),
            }
        }
    }

    /// Wait for a permit of the source's shared limiter and for any source-wide pause.
    async fn permit(&self, r: &Resolved) -> Result<(), String> {
        let source = r.source_name();
        loop {
            let paused = self
                .store
                .source_paused_until(source)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(until) = paused {
                self.metrics
                    .rate_limit_waits
                    .get_or_create(&Metrics::source(source))
                    .inc();
                let wait = until.saturating_sub(now_ms()).max(1);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            let Some((per_second, burst)) = r.rate else {
                return Ok(());
            };
            match self
                .store
                .rate_acquire(source, per_second, burst)
                .await
                .map_err(|e| e.to_string())?
            {
                None => return Ok(()),
                Some(wait) => {
                    self.metrics
                        .rate_limit_waits
                        .get_or_create(&Metrics::source(source))
                        .inc();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn page(&self, task: &PageTask, cp: &Checkpoint, r: &Resolved) -> Outcome {
        let feed = r.feed();
        let job = &task.job;
        if let Err(error) = self.permit(r).await {
            return Outcome::Requeue { error };
        }
        // Where the chain started: the task's start time, else the feed's.
        // A page-number or offset walk repeats it on every page.
        let chain_from = match &task.start_from {
            Some(t) => match parse_timestamp(t) {
                Ok(from) => Some(from),
                Err(e) => {
                    return Outcome::Fail {
                        error: format!("task start {t:?}: {e}"),
                    };
                }
            },
            None => match feed.start_position(&r.partition) {
                Ok(Position::Start { from }) => from,
                Ok(Position::At(_)) => None,
                Err(error) => return Outcome::Fail { error },
            },
        };
        let pos = match &task.cursor {
            Some(c) => Position::At(c.clone()),
            None => Position::Start { from: chain_from },
        };
        let paginator = match feed.paginator_for(r.source(), &r.partition, cp.stage) {
            Ok(p) => p,
            Err(error) => return Outcome::Fail { error },
        };
        let req = match paginator.request_in_chain(&pos, chain_from) {
            Ok(req) => req,
            Err(e) => {
                return Outcome::Fail {
                    error: format!("cannot build the request: {e}"),
                };
            }
        };
        let started = Instant::now();
        let fetched = r.http.fetch_once(&req).await;
        self.metrics
            .fetch_seconds
            .get_or_create(&Metrics::feed(&feed.name))
            .observe(started.elapsed().as_secs_f64());
        let page = match fetched {
            Ok(p) => p,
            Err(e) => return self.fetch_failed(task, cp, r, &pos, e).await,
        };
        let body: Bytes = page.body.clone();
        let read = match paginator.read(&pos, &req, &page, &body) {
            Ok(read) => read,
            Err(e) => {
                self.metrics
                    .fetch_errors
                    .get_or_create(&Metrics::feed_kind(&feed.name, "unreadable"))
                    .inc();
                return Outcome::Fail {
                    error: format!("page {} ({}): {e}", task.seq, redact_query(&req.url)),
                };
            }
        };
        self.metrics
            .pages_fetched
            .get_or_create(&Metrics::feed(&feed.name))
            .inc();
        crash_point!("worker::after_fetch");

        // Identity of every record, and the page's high-water mark.
        let page_cursor = match &pos {
            Position::At(c) => c.clone(),
            Position::Start { from } => {
                format!("start:{}", from.map(|t| t.to_rfc3339()).unwrap_or_default())
            }
        };
        let base = body.as_ptr() as usize;
        let mut records = Vec::with_capacity(read.records.len());
        let mut high: Option<String> = None;
        for (i, rec) in read.records.iter().enumerate() {
            let id = match identity(rec, &feed.key, feed.version.as_ref()) {
                Ok(id) => id,
                Err(e) => {
                    return Outcome::Fail {
                        error: format!("page {} record {i}: {e}", task.seq),
                    };
                }
            };
            let message_id = match &id.version {
                Some(v) => {
                    if high
                        .as_deref()
                        .is_none_or(|h| compare_versions(h, v).is_lt())
                    {
                        high = Some(v.clone());
                    }
                    record_message_id(&feed.name, &job.partition, &id.key, v)
                }
                None => positional_message_id(&feed.name, &job.partition, &page_cursor, i),
            };
            let start = rec.get().as_ptr() as usize - base;
            records.push(OutRecord {
                key: id.key,
                message_id,
                body: body.slice(start..start + rec.get().len()),
            });
        }
        let count = records.len() as u64;
        let out = OutPage {
            feed: feed.name.clone(),
            partition: job.partition.clone(),
            seq: task.seq,
            per: feed.delivery.per,
            page_message_id: page_message_id(&feed.name, &job.partition, &page_cursor),
            records,
        };
        if count > 0
            && let Err(e) = self.downstream.publish_page(&out).await
        {
            return Outcome::Retry {
                delay: self.backoff(task.attempt),
                error: format!("publishing page {} downstream: {e}", task.seq),
            };
        }
        self.metrics
            .records_published
            .get_or_create(&Metrics::feed(&feed.name))
            .inc_by(count);
        if count > 0 {
            crash_point!("worker::after_publish");
        }

        // An API may skip a filtered-out page with an empty one and a new
        // cursor, but not forever: a run of them is a loop whose cursor
        // changes. Stop before committing, so the cursor stays where it was.
        if count == 0
            && matches!(read.next, Next::More(_))
            && task.empty_run + 1 >= MAX_EMPTY_PAGES_IN_A_ROW
        {
            return Outcome::Fail {
                error: format!("page {}: {}", task.seq, empty_run_error()),
            };
        }

        // The one fenced step.
        let (next_cursor, eos) = match read.next {
            Next::More(c) => (Some(c), false),
            Next::End { resume } => (resume, true),
        };
        let now = now_ms();
        let mut next_due_ms = now + feed.every().as_millis() as u64;
        let restart = if eos {
            self.restart_after(
                feed,
                cp,
                high.as_deref(),
                next_cursor.is_none(),
                &mut next_due_ms,
                now,
            )
        } else {
            None
        };
        let commit = Commit {
            epoch: task.epoch,
            expected_seq: task.seq,
            new_cursor: next_cursor.clone(),
            new_seq: task.seq + 1,
            high_water: high,
            count,
            end_of_stream: eos,
            next_due_ms,
            lease_ms: self.opts.lease.as_millis() as u64,
            restart,
        };
        let outcome = match self.store.commit(job, &commit).await {
            Ok(o) => o,
            Err(e) => {
                return Outcome::Requeue {
                    error: format!("commit: {e}"),
                };
            }
        };
        self.metrics
            .commits
            .get_or_create(&Metrics::result(&outcome.as_str().to_ascii_lowercase()))
            .inc();
        tracing::debug!(job = %job, epoch = task.epoch, seq = task.seq, outcome = outcome.as_str(), "commit");
        match outcome {
            CommitOutcome::Ok | CommitOutcome::AlreadyApplied => {}
            CommitOutcome::Fenced => return Outcome::Dropped("fenced"),
            CommitOutcome::Conflict => return Outcome::Dropped("conflict"),
        }
        if outcome == CommitOutcome::Ok && task.published_ms > 0 {
            self.metrics
                .page_latency_seconds
                .get_or_create(&Metrics::feed(&feed.name))
                .observe(now_ms().saturating_sub(task.published_ms) as f64 / 1000.0);
        }
        crash_point!("worker::after_commit");
        if eos {
            tracing::info!(job = %job, pages = cp.pages + 1, "end of stream");
            return Outcome::Done;
        }
        let next = PageTask {
            job: job.clone(),
            epoch: task.epoch,
            seq: task.seq + 1,
            cursor: next_cursor,
            start_from: task.start_from.clone(),
            attempt: 0,
            empty_run: if count == 0 { task.empty_run + 1 } else { 0 },
            published_ms: now_ms(),
        };
        // The commit is in; if the next task cannot be published the lease
        // runs out and the coordinator re-issues the chain from the cursor.
        for attempt in 0..3u32 {
            match self.tasks.publish_task(&next, None).await {
                Ok(()) => return Outcome::Done,
                Err(e) => {
                    tracing::warn!(job = %job, attempt, error = %e, "cannot publish the next page task");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        Outcome::Done
    }

    /// At end of stream: where the next chain starts, if not from the cursor.
    fn restart_after(
        &self,
        feed: &FeedConfig,
        cp: &Checkpoint,
        page_high: Option<&str>,
        no_cursor: bool,
        next_due_ms: &mut u64,
        now: u64,
    ) -> Option<Restart> {
        match (feed.mode, cp.stage) {
            (Mode::Snapshot, stage) => Some(Restart {
                stage,
                start_from: None,
            }),
            (Mode::BulkThenIncremental, Stage::Bulk) => {
                // Seed 002: incremental syncs start at T0 (recorded before the bulk walk) minus lag, at once.
                *next_due_ms = now;
                Some(Restart {
                    stage: Stage::Incremental,
                    start_from: cp.t0.as_deref().and_then(|t0| minus_lag(feed, t0)),
                })
            }
            // No cursor to continue from (page numbers, an API that gives
            // none): the next poll starts at the high-water mark minus lag.
            (_, stage) if no_cursor && feed.start_for(stage).is_some() => Some(Restart {
                stage,
                start_from: restart_point(
                    feed,
                    max_version(cp.high_water.as_deref(), page_high),
                    cp,
                ),
            }),
            _ => None,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        backoff_delay(attempt, self.opts.retry_base, self.opts.retry_max)
    }

    async fn fetch_failed(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        r: &Resolved,
        pos: &Position,
        e: FetchError,
    ) -> Outcome {
        let feed = r.feed();
        let source = r.source_name();
        let kind = |k: &str| {
            self.metrics
                .fetch_errors
                .get_or_create(&Metrics::feed_kind(&feed.name, k))
                .inc();
        };
        if let (
            Position::At(_),
            FetchError::Status {
                status,
                body_snippet,
                ..
            },
        ) = (pos, &e)
            && feed.cursor_expired.matches(*status, body_snippet)
        {
            kind("cursor_expired");
            let from = restart_point(feed, cp.high_water.as_deref(), cp);
            tracing::warn!(job = %task.job, error = %e, from = ?from, "cursor expired or rejected; restarting from the high-water mark");
            return match self
                .store
                .recover(&task.job, task.epoch, from.as_deref())
                .await
            {
                Ok(true) => {
                    self.metrics
                        .cursor_recoveries
                        .get_or_create(&Metrics::feed(&feed.name))
                        .inc();
                    Outcome::Recovered
                }
                Ok(false) => Outcome::Dropped("fenced"),
                Err(err) => Outcome::Requeue {
                    error: format!("recovery: {err}"),
                },
            };
        }
        if e.status() == Some(429) {
            kind("rate_limited");
            let wait = e
                .retry_after()
                .unwrap_or_else(|| self.backoff(task.attempt));
            if e.retry_after().is_some() {
                if let Err(err) = self
                    .store
                    .pause_source(source, now_ms() + wait.as_millis() as u64)
                    .await
                {
                    tracing::warn!(source, error = %err, "cannot set the source pause");
                }
                self.metrics
                    .source_pauses
                    .get_or_create(&Metrics::source(source))
                    .inc();
            }
            return Outcome::Retry {
                delay: wait,
                error: e.to_string(),
            };
        }
        if e.is_transient() {
            kind("transient");
            return Outcome::Retry {
                delay: self
                    .backoff(task.attempt)
                    .max(e.retry_after().unwrap_or_default()),
                error: e.to_string(),
            };
        }
        kind("permanent");
        Outcome::Fail {
            error: format!("page {}: {e}", task.seq),
        }
    }
}
