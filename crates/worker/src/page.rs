//! One page task, following DESIGN.md's "life of a page", one function per
//! step: [`Worker::check`] the task against the checkpoint (1), take a
//! [`Worker::permit`] of the source's shared limiter (2), fetch and read the
//! page (3, 4: [`Worker::fetch_and_read`]), [`Worker::publish`] every record
//! with confirms (5), [`Worker::commit`] with one fenced step (6) and
//! [`Worker::hand_on`] the next task (7). Each step returns
//! `Result<_, Outcome>`: an `Err` ends the page there and says what the
//! caller does with the delivery; acking it (8) is the caller's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use tidemark_bus::{OutPage, OutRecord, PageTask, ParentRecord, Reservation};
use tidemark_core::SourceConfig;
use tidemark_core::checkpoint::{Checkpoint, Commit, CommitOutcome, NEVER_DUE_MS, Phase};
use tidemark_core::child::{self, fill, fill_batch, parent_key};
use tidemark_core::clock::now_ms;
use tidemark_core::config::{DeliveryPer, FeedConfig, OnMissing, Partition, RetryConfig};
use tidemark_core::pagination::{Next, PageRequest, ReadError, redact_query};
use tidemark_core::pointer::JsonPointer;
use tidemark_core::record::{page_message_id, positional_message_id, record_message_id};
use tidemark_core::tenant::{Tenant, job_partition, split_job_partition};
use tidemark_core::walk::{Step, Walk, WalkError, restart_at_end, restart_point};
use tidemark_source::{FetchError, FetchedPage, HttpSource, backoff_delay};
use tidemark_telemetry::Metrics;

use crate::feeds::{Snapshot, TenantView};
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

/// Where a page's feed and source config live: in the snapshot, or (a
/// tenanted feed) in the tenant's view of them.
enum View {
    Plain(usize),
    Tenant(Arc<TenantView>),
}

impl View {
    /// The feed this view is of (a tenant's view: its templates filled).
    fn feed<'a>(&'a self, snap: &'a Snapshot) -> &'a FeedConfig {
        match self {
            View::Plain(i) => &snap.config.feeds[*i],
            View::Tenant(v) => &v.feed,
        }
    }
}

/// A child feed's job: the feed with its templates filled from the parent
/// record, and that record.
struct ChildJob {
    feed: FeedConfig,
    parent: ParentRecord,
    on_missing: OnMissing,
    /// A batch slot's run: many parents at once.
    batch: Option<BatchRun>,
}

/// The parents of one batch, and where each record names its parent.
struct BatchRun {
    parent_key: JsonPointer,
    /// Parent key -> child partition (the identity its records' ids hash).
    by_key: HashMap<String, String>,
}

/// Everything a page needs that comes from the registry: the snapshot it
/// was read from, and where in it the feed and its source are.
struct Resolved {
    snap: Arc<Snapshot>,
    view: View,
    partition: Partition,
    http: HttpSource,
    rate: Option<(f64, u32)>,
    /// The source's `retry:` block: the one retry policy of every fetch.
    retry: RetryConfig,
    /// The tenant of a tenanted feed's job.
    tenant: Option<String>,
    /// Whose rate budget and pause this page shares: the source's, or its tenant's.
    limit_key: String,
    /// The source asks for per-tenant series (`tenants.metrics`).
    tenant_metrics: bool,
    /// A child feed's job.
    child: Option<ChildJob>,
}

impl Resolved {
    fn feed(&self) -> &FeedConfig {
        match &self.child {
            Some(c) => &c.feed,
            None => self.unfilled_feed(),
        }
    }
    /// The feed before a child's templates are filled.
    fn unfilled_feed(&self) -> &FeedConfig {
        self.view.feed(&self.snap)
    }
    fn source_name(&self) -> &str {
        &self.feed().source
    }
    fn source(&self) -> &SourceConfig {
        match &self.view {
            // Present: `resolve` checked it.
            View::Plain(_) => &self.snap.config.sources[self.source_name()],
            View::Tenant(v) => &v.source,
        }
    }
    /// The longest the source may be paused for.
    fn max_pause(&self) -> Duration {
        self.retry.max_retry_after.std()
    }
    /// The per-tenant series' labels, when the source asks for them.
    fn tenant_labels(&self) -> Option<(&str, &str)> {
        match (&self.tenant, self.tenant_metrics) {
            (Some(t), true) => Some((self.feed().name.as_str(), t.as_str())),
            _ => None,
        }
    }
}

/// An end of stream without a request: nothing read, the cursor kept.
fn empty_end(task: &PageTask, walk: Walk, note: Option<String>) -> ReadPage {
    ReadPage {
        body: Bytes::new(),
        step: Step {
            records: vec![],
            identities: vec![],
            high_water: None,
            next: Next::End {
                resume: task.cursor.clone(),
            },
        },
        page_cursor: walk.page_cursor(),
        walk,
        note,
    }
}

/// A page as read (steps 3 and 4), ready to publish and commit.
struct ReadPage {
    body: Bytes,
    step: Step,
    /// The page's own position, for the ids of messages without a version.
    page_cursor: String,
    /// The walk, already at the page after this one.
    walk: Walk,
    /// Kept as the job's last error though the page commits (a child
    /// whose parent is gone).
    note: Option<String>,
}

/// The page a chain is at in this worker: the delivery's own, or one the
/// worker carried the chain on to after committing the page before.
pub(crate) struct Carried {
    pub task: PageTask,
    /// Not the delivery's page: the worker took it on itself.
    pub carried: bool,
}

/// The next page, fetched (and read) while the page before it was
/// published and committed. Used only if the committed page's successor
/// asks for exactly this request under the same feed definitions; thrown
/// away otherwise, and whenever the commit before it does not happen.
struct Ahead {
    /// The registry snapshot and stage the request was built from.
    snap: Arc<Snapshot>,
    stage: tidemark_core::checkpoint::Stage,
    req: PageRequest,
    fetched: Result<FetchedPage, FetchError>,
    /// The page read by the walk of the page before (already at the page
    /// after this one), when it could be read.
    read: Option<(String, Step, Walk)>,
    /// Its room in the unconfirmed-bytes window, until its turn (where its
    /// publish takes room like any page's).
    _room: (Reservation, Option<Reservation>),
}

/// How a page ends: the chain handed on (through the queue, or finished),
/// or carried on by this worker to the next page.
enum Then {
    Settled(Outcome),
    Carry(PageTask, Option<Box<Ahead>>),
}

impl Worker {
    /// Steps 1 to 7 for one task, and for the pages the worker carries the
    /// chain on to (a hot chain): up to `--hot-chain-pages` pages or
    /// `--hot-chain-time`, until the worker stops, or until a page does not
    /// commit. Returns the outcome and the page it is about.
    pub(crate) async fn process(&self, task: PageTask) -> (Outcome, Carried) {
        let started = Instant::now();
        let mut at = Carried {
            task,
            carried: false,
        };
        let mut ahead = None;
        let mut pages = 0u32;
        loop {
            pages += 1;
            let carry_on = pages < self.opts.hot_chain_pages
                && started.elapsed() < self.opts.hot_chain_time
                && !self.stopping.load(std::sync::atomic::Ordering::SeqCst);
            match self.life_of_a_page(&at, ahead.take(), carry_on).await {
                Ok(Then::Carry(next, next_ahead)) => {
                    self.metrics
                        .pages_carried
                        .get_or_create(&Metrics::feed(&next.job.feed))
                        .inc();
                    at = Carried {
                        task: next,
                        carried: true,
                    };
                    ahead = next_ahead;
                }
                Ok(Then::Settled(outcome)) | Err(outcome) => {
                    if ahead.is_some() {
                        self.count_prefetch(&at.task.job.feed, "discarded");
                    }
                    return (outcome, at);
                }
            }
        }
    }

    async fn life_of_a_page(
        &self,
        at: &Carried,
        ahead: Option<Box<Ahead>>,
        carry_on: bool,
    ) -> Result<Then, Outcome> {
        let task = &at.task;
        let cp = self.check(task).await?;
        if at.carried {
            crash_point!("worker::after_local_hand_on");
        }
        let r = self.resolve(task, &cp).await?;
        // The lease outlives slow pages: renew it while this page works; a
        // refused renewal means a newer epoch owns the job, so stop.
        tokio::select! {
            out = self.work(task, &cp, &r, ahead, carry_on) => out,
            () = self.keep_lease(task) => Err(Outcome::Dropped("fenced")),
        }
    }

    async fn work(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        r: &Resolved,
        ahead: Option<Box<Ahead>>,
        carry_on: bool,
    ) -> Result<Then, Outcome> {
        let began = Instant::now();
        let page = self.fetch_and_read(task, cp, r, ahead).await?;
        let read = began.elapsed();
        let carry_on = carry_on && matches!(page.step.next, Next::More(_));
        // Publish and commit this page; meanwhile fetch the next one. A
        // failed publish or commit drops the fetch where it is.
        let (sent, room) = tokio::sync::oneshot::channel();
        let deliver = async {
            self.publish(task, r, &page, sent).await?;
            let published = began.elapsed();
            // A worker told to stop meanwhile hands the chain back now.
            let carry_on = carry_on && !self.stopping.load(std::sync::atomic::Ordering::SeqCst);
            self.commit(task, cp, r, &page, carry_on).await?;
            Ok((published, began.elapsed(), carry_on))
        };
        let fetch_ahead = async {
            let ahead = match carry_on {
                true => self.prefetch(cp, r, &page, room).await,
                false => None,
            };
            Ok((ahead, began.elapsed()))
        };
        let ((published, committed, carry_on), (ahead, fetched_ahead)) =
            tokio::try_join!(deliver, fetch_ahead)?;
        tracing::debug!(
            job = %task.job,
            seq = task.seq,
            read_ms = read.as_secs_f64() * 1e3,
            published_ms = published.as_secs_f64() * 1e3,
            committed_ms = committed.as_secs_f64() * 1e3,
            fetched_ahead_ms = fetched_ahead.as_secs_f64() * 1e3,
            ahead = ahead.is_some(),
            "page timings"
        );
        self.hand_on(task, cp, page, carry_on, ahead).await
    }

    /// Fetch, and read, the page after `page` while `page` is published
    /// and committed: only a request that just reads (GET, QUERY, a POST
    /// marked `read_only`), after a permit of the source's limiter like any
    /// request. A page fetched ahead is counted in the unconfirmed-bytes
    /// window from before it is fetched until its turn: once `page`
    /// has its own room there (`room`), room for one more page of its size
    /// is taken if the window has it free, never waited for (so a page
    /// held ahead cannot keep another page from its room, and a full
    /// window means no fetching ahead); a page that comes back larger
    /// takes the rest the same way, or is thrown away.
    async fn prefetch(
        &self,
        cp: &Checkpoint,
        r: &Resolved,
        page: &ReadPage,
        room: tokio::sync::oneshot::Receiver<()>,
    ) -> Option<Box<Ahead>> {
        let req = page.walk.request().ok()?;
        if !req.retriable() {
            return None;
        }
        let feed = &r.feed().name;
        let began = Instant::now();
        let ms = |at: Instant| at.duration_since(began).as_secs_f64() * 1e3;
        room.await.ok()?;
        let roomed = Instant::now();
        let Some(held) = self.downstream.try_reserve(page.body.len().max(1)) else {
            self.count_prefetch(feed, "no_room");
            return None;
        };
        self.permit(r).await.ok()?;
        let started = Instant::now();
        let fetched = r.http.fetch_once(&req).await;
        let arrived = Instant::now();
        self.metrics
            .fetch_seconds
            .get_or_create(&Metrics::feed(feed))
            .observe(arrived.duration_since(started).as_secs_f64());
        let size = fetched.as_ref().map_or(0, |p| p.body.len());
        let more = match size.checked_sub(held.bytes()) {
            Some(extra) if extra > 0 && held.bytes() > 0 => {
                match self.downstream.try_reserve(extra) {
                    Some(more) => Some(more),
                    None => {
                        self.count_prefetch(feed, "no_room");
                        return None;
                    }
                }
            }
            _ => None,
        };
        let read = fetched.as_ref().ok().and_then(|p| {
            let mut walk = page.walk.clone();
            let page_cursor = walk.page_cursor();
            let step = walk.advance(&req, p, &p.body).ok()?;
            Some((page_cursor, step, walk))
        });
        // Where the time of a page fetched ahead goes, from the start of
        // the page before's publish: waiting for that page's room, the
        // limiter, the fetch, the read.
        tracing::debug!(
            feed = %feed,
            room_ms = ms(roomed),
            permit_ms = ms(started),
            fetched_ms = ms(arrived),
            read_ms = ms(Instant::now()),
            bytes = size,
            "page fetched ahead"
        );
        crash_point!("worker::after_prefetch");
        Some(Box::new(Ahead {
            snap: r.snap.clone(),
            stage: cp.stage,
            req,
            fetched,
            read,
            _room: (held, more),
        }))
    }

    /// Count a page fetched ahead by what became of it.
    fn count_prefetch(&self, feed: &str, result: &str) {
        self.metrics
            .prefetches
            .get_or_create(&Metrics::feed_result(feed, result))
            .inc();
    }

    /// Step 1: take the task: the job's checkpoint, and (when the task is
    /// current) its processing lease, which starts now, not when the task
    /// was published. A stale epoch, an applied or a skipped seq, or a job
    /// that is not running: drop it.
    async fn check(&self, task: &PageTask) -> Result<Checkpoint, Outcome> {
        let job = &task.job;
        let cp = match self
            .leases
            .take(job, task.epoch, task.seq, self.opts.lease)
            .await
        {
            Ok(Some(cp)) => cp,
            Ok(None) => {
                return Err(Outcome::Rejected {
                    reason: "unknown_job",
                    error: format!(
                        "no job {job} in the state store (a task for a removed feed, or not one of ours)"
                    ),
                });
            }
            Err(e) => {
                return Err(Outcome::Requeue {
                    error: format!("reading the checkpoint: {e}"),
                });
            }
        };
        let dropped = if task.epoch != cp.epoch {
            Some("stale_epoch")
        } else if task.seq < cp.seq {
            Some("already_applied")
        } else if task.seq > cp.seq {
            Some("conflict")
        } else if cp.phase != Phase::Running {
            Some("not_running")
        } else {
            None
        };
        match dropped {
            Some(reason) => Err(Outcome::Dropped(reason)),
            None => Ok(cp),
        }
    }

    /// The feed, partition and source client the task names, from the registry.
    async fn resolve(&self, task: &PageTask, cp: &Checkpoint) -> Result<Resolved, Outcome> {
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
        let Some(source) = snap.config.sources.get(&cfg.source) else {
            return Err(Outcome::Fail {
                error: format!("feed {} names an unknown source {}", cfg.name, cfg.source),
            });
        };
        // A tenanted job's partition id is `<tenant>/<partition>`.
        let (tenant, partition_id) = if source.is_tenanted() {
            match split_job_partition(&job.partition) {
                Some((t, p)) => (Some(t), p),
                None => {
                    return Err(Outcome::Fail {
                        error: format!(
                            "feed {} has tenants, but job {job} names none (expected <tenant>/<partition>)",
                            job.feed
                        ),
                    });
                }
            }
        } else {
            (None, job.partition.as_str())
        };
        // A child job's partition is its parent record: no params of its own.
        let partition = match cfg.partition(partition_id, Utc::now()) {
            _ if cfg.parent.is_some() => Partition {
                id: partition_id.to_string(),
                params: vec![],
                from: None,
            },
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(Outcome::Fail {
                    error: format!("feed {} has no partition {partition_id:?}", job.feed),
                });
            }
            Err(e) => return Err(Outcome::Fail { error: e }),
        };
        let (view, http) = match tenant {
            Some(t) => {
                let tenant = Tenant {
                    name: t.to_string(),
                    vars: task.vars.clone(),
                };
                let v = snap
                    .tenant_view(cfg, &tenant)
                    .map_err(|error| Outcome::Fail { error })?;
                let http = v.http.clone();
                (View::Tenant(v), http)
            }
            None => {
                let Some(http) = snap.sources.get(&cfg.source) else {
                    return Err(Outcome::Fail {
                        error: format!("feed {} names an unknown source {}", cfg.name, cfg.source),
                    });
                };
                let http = http.clone().map_err(|error| Outcome::Fail { error })?;
                (View::Plain(feed), http)
            }
        };
        let rate = source.rate_limit.as_ref().map(|r| {
            (
                r.per_second,
                r.burst
                    .unwrap_or_else(|| r.per_second.ceil().max(1.0) as u32),
            )
        });
        let retry = source.retry();
        let limit_key = source.limit_key(&cfg.source, tenant);
        let tenant_metrics = source.tenants.as_ref().is_some_and(|t| t.metrics);
        let child = match &cfg.parent {
            None => None,
            Some(link) => {
                let unfilled = view.feed(&snap);
                let parent_cfg = snap.config.feed(&link.feed);
                let key_of = |p: &'_ str| -> String {
                    match parent_cfg {
                        Some(pc) => parent_key(pc, tenant.is_some(), p).to_string(),
                        None => p.to_string(),
                    }
                };
                match &link.batch {
                    None => Some(ChildJob {
                        feed: fill(unfilled, &cp.vars).map_err(|error| Outcome::Fail { error })?,
                        parent: ParentRecord {
                            feed: link.feed.clone(),
                            key: Some(key_of(&job.partition)),
                        },
                        on_missing: link.on_missing,
                        batch: None,
                    }),
                    Some(b) => {
                        let keys: Vec<String> = cp.batch.iter().map(|p| key_of(p)).collect();
                        let feed = fill_batch(
                            unfilled,
                            &keys.iter().map(String::as_str).collect::<Vec<_>>(),
                        );
                        let by_key: HashMap<String, String> =
                            keys.into_iter().zip(cp.batch.iter().cloned()).collect();
                        Some(ChildJob {
                            feed,
                            parent: ParentRecord {
                                feed: link.feed.clone(),
                                key: None,
                            },
                            on_missing: link.on_missing,
                            batch: Some(BatchRun {
                                parent_key: b.parent_key.clone(),
                                by_key,
                            }),
                        })
                    }
                }
            }
        };
        let tenant = tenant.map(str::to_string);
        Ok(Resolved {
            snap,
            view,
            partition,
            http,
            rate,
            retry,
            tenant,
            limit_key,
            tenant_metrics,
            child,
        })
    }

    /// Renew the lease every third of it; returns only when renewal is refused.
    async fn keep_lease(&self, task: &PageTask) {
        let every = self.opts.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self
                .leases
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

    /// Step 2: a permit of the source's shared limiter, after any
    /// source-wide pause. A pause is honoured for at most the source's
    /// `retry.max_retry_after`, whatever end a store holds (one written
    /// by an older version, or by hand).
    async fn permit(&self, r: &Resolved) -> Result<(), Outcome> {
        let source = r.source_name();
        let key = r.limit_key.as_str();
        let requeue = |e: tidemark_state::StateError| Outcome::Requeue {
            error: e.to_string(),
        };
        let waited_enough = Instant::now() + r.max_pause();
        loop {
            let paused = self
                .limits
                .source_paused_until(key)
                .await
                .map_err(requeue)?;
            let left = waited_enough.saturating_duration_since(Instant::now());
            if let Some(until) = paused
                && !left.is_zero()
            {
                self.metrics
                    .rate_limit_waits
                    .get_or_create(&Metrics::source(source))
                    .inc();
                let wait = Duration::from_millis(until.saturating_sub(now_ms()).max(1));
                tokio::time::sleep(wait.min(left)).await;
                continue;
            }
            let Some((per_second, burst)) = r.rate else {
                return Ok(());
            };
            match self
                .limits
                .rate_acquire(key, per_second, burst)
                .await
                .map_err(requeue)?
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

    /// Steps 3 and 4: fetch the page the task points at and read its
    /// records, their identities and what comes next.
    async fn fetch_and_read(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        r: &Resolved,
        ahead: Option<Box<Ahead>>,
    ) -> Result<ReadPage, Outcome> {
        let feed = r.feed();
        let fail = |error: String| Outcome::Fail { error };
        let mut walk = Walk::new(feed, r.source(), &r.partition, cp.stage)
            .map_err(fail)?
            .starting_from(task.start_from.as_deref())
            .map_err(|e| fail(format!("task {e}")))?
            .at(task.cursor.clone())
            .after_empty_pages(task.empty_run)
            .identifying(feed.key.clone(), feed.version.clone());
        // A batch slot resumed or retried without a batch has nothing to ask.
        if r.child
            .as_ref()
            .and_then(|c| c.batch.as_ref())
            .is_some_and(|b| b.by_key.is_empty())
        {
            return Ok(empty_end(task, walk, None));
        }
        let req = walk
            .request()
            .map_err(|e| fail(format!("cannot build the request: {e}")))?;
        // The page fetched ahead, if it answers this very request under the
        // same feed definitions.
        let ahead = match ahead {
            Some(a) if Arc::ptr_eq(&a.snap, &r.snap) && a.stage == cp.stage && a.req == req => {
                self.count_prefetch(&feed.name, "used");
                Some(a)
            }
            Some(_) => {
                self.count_prefetch(&feed.name, "discarded");
                None
            }
            None => None,
        };
        let (fetched, read) = match ahead {
            Some(a) => {
                let a = *a;
                (a.fetched, a.read)
            }
            None => {
                // Step 2 (the limiter) for a page not fetched ahead.
                self.permit(r).await?;
                let started = Instant::now();
                let fetched = r.http.fetch_once(&req).await;
                self.metrics
                    .fetch_seconds
                    .get_or_create(&Metrics::feed(&feed.name))
                    .observe(started.elapsed().as_secs_f64());
                (fetched, None)
            }
        };
        let page = match fetched {
            Ok(p) => p,
            Err(e) => {
                let at_cursor = walk.cursor().is_some();
                if let Some(note) = self.parent_gone(r, at_cursor, &e) {
                    // The child is done for now, the 404 noted.
                    return Ok(empty_end(task, walk, Some(note)));
                }
                if e.is_transient() && !req.retriable() && !e.surely_unprocessed() {
                    // The API may have acted on it: never sent again on purpose.
                    self.count_fetch_error(r, "permanent");
                    return Err(fail(format!(
                        "page {}: {e}; not retried: the {} request may have been processed, and the feed does not say it only reads (read_only: true)",
                        task.seq,
                        req.method.as_str()
                    )));
                }
                return Err(self.fetch_failed(task, cp, r, at_cursor, e).await);
            }
        };
        if let Some(pause) = page.pause {
            self.pause_for(r, pause).await;
        }
        let (page_cursor, step, walk) = match read {
            Some(read) => read,
            None => {
                let page_cursor = walk.page_cursor();
                let step = match walk.advance(&req, &page, &page.body) {
                    Ok(step) => step,
                    Err(e) => {
                        let error = match &e {
                            WalkError::Read(e @ ReadError::Api { .. }) => {
                                let error = page.scrub(&format!("page {}: {e}", task.seq));
                                if e.is_transient() {
                                    self.count_fetch_error(r, "api_error_transient");
                                    let wait = e.retry_after().map(|d| d.min(r.max_pause()));
                                    if let Some(w) = wait {
                                        self.pause_for(r, w).await;
                                    }
                                    let delay = self.backoff(task, r).max(wait.unwrap_or_default());
                                    return Err(self.retry(task, r, delay, error));
                                }
                                self.count_fetch_error(r, "api_error");
                                error
                            }
                            WalkError::Read(e) => {
                                self.count_fetch_error(r, "unreadable");
                                format!("page {} ({}): {e}", task.seq, redact_query(&req.url))
                            }
                            WalkError::Identity { .. } => format!("page {} {e}", task.seq),
                            WalkError::EmptyRun => format!("page {}: {e}", task.seq),
                        };
                        return Err(fail(error));
                    }
                };
                (page_cursor, step, walk)
            }
        };
        self.metrics
            .pages_fetched
            .get_or_create(&Metrics::feed(&feed.name))
            .inc();
        if let Some((f, t)) = r.tenant_labels() {
            self.metrics
                .tenant_pages_fetched
                .get_or_create(&Metrics::feed_tenant(f, t))
                .inc();
        }
        crash_point!("worker::after_fetch");
        Ok(ReadPage {
            body: page.body,
            step,
            page_cursor,
            walk,
            note: None,
        })
    }

    /// Pause the page's source (or tenant) for `wait`, across every worker:
    /// the pause a 429's Retry-After sets.
    async fn pause_for(&self, r: &Resolved, wait: Duration) {
        let until = now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        if let Err(err) = self.limits.pause_source(&r.limit_key, until).await {
            tracing::warn!(source = r.source_name(), limit = %r.limit_key, error = %err, "cannot set the source pause");
        }
        self.metrics
            .source_pauses
            .get_or_create(&Metrics::source(r.source_name()))
            .inc();
    }

    /// Count a failed fetch of `kind`, per feed (and per tenant when the
    /// source asks for it).
    fn count_fetch_error(&self, r: &Resolved, kind: &str) {
        self.metrics
            .fetch_errors
            .get_or_create(&Metrics::feed_kind(&r.feed().name, kind))
            .inc();
        if let Some((f, t)) = r.tenant_labels() {
            self.metrics
                .tenant_fetch_errors
                .get_or_create(&Metrics::feed_tenant_kind(f, t, kind))
                .inc();
        }
    }

    /// A child's 404 that means its parent is gone (`on_missing: skip`, and
    /// not an expired cursor): the note to keep on the job.
    fn parent_gone(&self, r: &Resolved, at_cursor: bool, e: &FetchError) -> Option<String> {
        // A batch names many parents: a 404 is the request's, not one
        // parent's, and fails the batch like any permanent error.
        let child = r.child.as_ref().filter(|c| c.batch.is_none())?;
        let FetchError::Status {
            status: 404,
            body_snippet,
            ..
        } = e
        else {
            return None;
        };
        if child.on_missing != OnMissing::Skip
            || (at_cursor && r.feed().cursor_expired.matches(404, body_snippet))
        {
            return None;
        }
        self.count_fetch_error(r, "parent_gone");
        tracing::info!(feed = %r.feed().name, parent = child.parent.key.as_deref().unwrap_or("-"), "child answered 404: its parent is gone");
        Some(format!("parent gone: {e}"))
    }

    /// Step 5: every record downstream, each confirmed by the broker.
    async fn publish(
        &self,
        task: &PageTask,
        r: &Resolved,
        page: &ReadPage,
        sent: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(), Outcome> {
        let feed = r.feed();
        let partition = &task.job.partition;
        let batch = r.child.as_ref().and_then(|c| c.batch.as_ref());
        // A page goes out as one message with the page's id: its records'
        // own ids are not sent, so not computed.
        let per_record = feed.delivery.per == DeliveryPer::Record;
        let records: Vec<OutRecord> = page
            .step
            .records
            .iter()
            .zip(&page.step.identities)
            .enumerate()
            .map(|(i, (span, id))| {
                // A batched child's record names its parent, whose child
                // partition its id hashes (as if it had run alone).
                let parent_key = batch.and_then(|b| {
                    child::record_parent_key(&page.body[span.clone()], &b.parent_key)
                });
                let own = match (batch, &parent_key) {
                    (Some(b), Some(k)) => {
                        Some(b.by_key.get(k).cloned().unwrap_or_else(|| match &r.tenant {
                            Some(t) => job_partition(t, k),
                            None => k.clone(),
                        }))
                    }
                    _ => None,
                };
                let partition = own.as_deref().unwrap_or(partition);
                OutRecord {
                    key: id.key.clone(),
                    message_id: match &id.version {
                        _ if !per_record => String::new(),
                        Some(v) => record_message_id(&feed.name, partition, &id.key, v),
                        None => positional_message_id(&feed.name, partition, &page.page_cursor, i),
                    },
                    body: page.body.slice(span.clone()),
                    parent_key,
                }
            })
            .collect();
        let count = records.len() as u64;
        if count == 0 {
            let _ = sent.send(());
            return Ok(());
        }
        let out = OutPage {
            feed: feed.name.clone(),
            tenant: r.tenant.clone(),
            partition: r.partition.id.clone(),
            seq: task.seq,
            per: feed.delivery.per,
            page_message_id: page_message_id(&feed.name, partition, &page.page_cursor),
            records,
            parent: r.child.as_ref().map(|c| c.parent.clone()),
        };
        if let Err(e) = self.downstream.publish_page_then(&out, sent).await {
            return Err(self.retry(
                task,
                r,
                self.backoff(task, r),
                format!("publishing page {} downstream: {e}", task.seq),
            ));
        }
        self.metrics
            .records_published
            .get_or_create(&Metrics::feed(&feed.name))
            .inc_by(count);
        if let Some((f, t)) = r.tenant_labels() {
            self.metrics
                .tenant_records_published
                .get_or_create(&Metrics::feed_tenant(f, t))
                .inc_by(count);
        }
        crash_point!("worker::after_publish");
        Ok(())
    }

    /// Step 6: the one fenced, atomic step that advances the cursor (and
    /// renews the lease). A fenced or conflicting commit ends the chain here.
    async fn commit(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        r: &Resolved,
        page: &ReadPage,
        carry_on: bool,
    ) -> Result<(), Outcome> {
        let feed = r.feed();
        let job = &task.job;
        let (next_cursor, eos) = match &page.step.next {
            Next::More(c) => (Some(c.clone()), false),
            Next::End { resume } => (resume.clone(), true),
        };
        let now = now_ms();
        let (restart, due_now) = if eos {
            restart_at_end(
                feed,
                cp,
                page.step.high_water.as_deref(),
                next_cursor.is_none(),
            )
        } else {
            (None, false)
        };
        let every = u64::try_from(feed.every().as_millis()).unwrap_or(u64::MAX);
        // The child jobs this page's records trigger, committed with it.
        let children: Vec<&FeedConfig> = r.snap.config.children_of(&feed.name).collect();
        let triggers = child::triggers(
            r.unfilled_feed(),
            &children,
            r.tenant.is_some(),
            &job.partition,
            page.step
                .records
                .iter()
                .map(|span| &page.body[span.clone()])
                .zip(&page.step.identities),
        )
        .map_err(|error| Outcome::Fail { error })?;
        let (triggers, batches) = (triggers.jobs, triggers.batches);
        let commit = Commit {
            epoch: task.epoch,
            expected_seq: task.seq,
            new_cursor: next_cursor,
            new_seq: task.seq + 1,
            high_water: page.step.high_water.clone(),
            count: page.step.records.len() as u64,
            end_of_stream: eos,
            next_due_ms: if due_now {
                now
            } else if r.child.is_some() {
                // A child waits for its parent to change.
                NEVER_DUE_MS
            } else {
                now.saturating_add(every)
            },
            // The next task waits in the queue until a worker takes it;
            // a page this worker carries on to is taken at once.
            lease_ms: if carry_on {
                self.opts.lease.as_millis() as u64
            } else {
                self.opts.queue_lease.as_millis() as u64
            },
            restart,
            note: page.note.clone(),
            triggers,
            batches,
        };
        let outcome = self
            .leases
            .commit(job, &commit)
            .await
            .map_err(|e| Outcome::Requeue {
                error: format!("commit: {e}"),
            })?;
        self.metrics
            .commits
            .get_or_create(&Metrics::result(&outcome.as_str().to_ascii_lowercase()))
            .inc();
        tracing::debug!(job = %job, epoch = task.epoch, seq = task.seq, outcome = outcome.as_str(), "commit");
        match outcome {
            CommitOutcome::Ok | CommitOutcome::AlreadyApplied => {}
            CommitOutcome::Fenced => return Err(Outcome::Dropped("fenced")),
            CommitOutcome::Conflict => return Err(Outcome::Dropped("conflict")),
        }
        if outcome == CommitOutcome::Ok && task.published_ms > 0 {
            self.metrics
                .page_latency_seconds
                .get_or_create(&Metrics::feed(&feed.name))
                .observe(now_ms().saturating_sub(task.published_ms) as f64 / 1000.0);
        }
        crash_point!("worker::after_commit");
        Ok(())
    }

    /// Step 7: at the end of the stream the job is idle (the commit said
    /// so); otherwise publish the task of the next page. The commit is in:
    /// if the next task cannot be published the lease runs out and the
    /// coordinator re-issues the chain from the stored cursor.
    async fn hand_on(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        page: ReadPage,
        carry_on: bool,
        ahead: Option<Box<Ahead>>,
    ) -> Result<Then, Outcome> {
        let job = &task.job;
        if !matches!(page.step.next, Next::More(_)) {
            tracing::info!(job = %job, pages = cp.pages + 1, "end of stream");
            return Ok(Then::Settled(Outcome::Done));
        }
        let next = PageTask {
            job: job.clone(),
            epoch: task.epoch,
            seq: task.seq + 1,
            cursor: page.walk.cursor().map(str::to_string),
            start_from: task.start_from.clone(),
            attempt: 0,
            empty_run: page.walk.empty_run(),
            published_ms: now_ms(),
            vars: task.vars.clone(),
        };
        if carry_on {
            // The commit gave this worker the lease for the next page.
            return Ok(Then::Carry(next, ahead));
        }
        if ahead.is_some() {
            // Stopping: the next page goes back through the queue.
            self.count_prefetch(&job.feed, "discarded");
        }
        for attempt in 0..3u32 {
            match self.tasks.publish_task(&next, None).await {
                Ok(()) => return Ok(Then::Settled(Outcome::Done)),
                Err(e) => {
                    tracing::warn!(job = %job, attempt, error = %e, "cannot publish the next page task");
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        Ok(Then::Settled(Outcome::Done))
    }

    /// The source's backoff before attempt `task.attempt + 1`.
    fn backoff(&self, task: &PageTask, r: &Resolved) -> Duration {
        backoff_delay(
            task.attempt + 1,
            r.retry.base_delay.std(),
            r.retry.max_delay.std(),
        )
    }

    /// Try the task again after `delay`, or fail the job when the source's
    /// `retry.max_attempts` are used up.
    fn retry(&self, task: &PageTask, r: &Resolved, delay: Duration, error: String) -> Outcome {
        let max_attempts = r.retry.max_attempts.max(1);
        if task.attempt + 1 >= max_attempts {
            return Outcome::Fail {
                error: format!("gave up after {max_attempts} attempts: {error}"),
            };
        }
        Outcome::Retry { delay, error }
    }

    /// What a failed fetch means: cursor recovery, a rate-limit pause, a
    /// retry with backoff, or a failed job.
    async fn fetch_failed(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        r: &Resolved,
        at_cursor: bool,
        e: FetchError,
    ) -> Outcome {
        let feed = r.feed();
        let kind = |k: &str| self.count_fetch_error(r, k);
        if let FetchError::Status {
            status,
            body_snippet,
            ..
        } = &e
            && at_cursor
            && feed.cursor_expired.matches(*status, body_snippet)
        {
            kind("cursor_expired");
            return self.recover(task, cp, feed, &e).await;
        }
        // The server's Retry-After, within the source's cap.
        let retry_after = e.retry_after().map(|d| d.min(r.max_pause()));
        if e.status() == Some(429) {
            kind("rate_limited");
            let wait = retry_after.unwrap_or_else(|| self.backoff(task, r));
            if retry_after.is_some() {
                self.pause_for(r, wait).await;
            }
            return self.retry(task, r, wait, e.to_string());
        }
        if e.is_transient() {
            kind("transient");
            let delay = self.backoff(task, r).max(retry_after.unwrap_or_default());
            return self.retry(task, r, delay, e.to_string());
        }
        kind("permanent");
        Outcome::Fail {
            error: format!("page {}: {e}", task.seq),
        }
    }

    /// The API rejected or expired the cursor: restart the job from its
    /// high-water mark minus lag, under a new epoch.
    async fn recover(
        &self,
        task: &PageTask,
        cp: &Checkpoint,
        feed: &FeedConfig,
        e: &FetchError,
    ) -> Outcome {
        let from = restart_point(feed, cp.high_water.as_deref(), cp);
        tracing::warn!(job = %task.job, error = %e, from = ?from, "cursor expired or rejected; restarting from the high-water mark");
        match self
            .leases
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
        }
    }
}
