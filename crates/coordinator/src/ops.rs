//! Operator actions on feeds: the status table, pause, resume, rewind and
//! retry. The CLI (`tidemark status|pause|…`), the coordinator's admin API
//! and an embedded run's control requests all call these, against any
//! store's job table ([`Jobs`]), so the three ways of steering a feed cannot
//! disagree.
//!
//! Every change goes through [`Jobs::control`], which takes a new
//! epoch: page tasks already in flight for the job are fenced (their commit
//! answers `FENCED`), so an operator's action wins over work in progress.

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tidemark_core::checkpoint::{Checkpoint, JobId, NEVER_DUE_MS, Phase, Stage};
use tidemark_core::clock::now_ms;
use tidemark_core::tenant::{self, Tenant, split_job_partition};
use tidemark_core::timefmt::parse_timestamp;
use tidemark_core::{Config, config::tenant_vars_used};
use tidemark_state::registry::load_config;
use tidemark_state::{
    ActiveTenant, Control, FeedCensus, JobQuery, Operate, Rewind, StateError, TenantOrigin,
    feed_jobs, feed_jobs_with_prefix, high_water_ms,
};

/// One row of the status table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub feed: String,
    pub partition: String,
    pub phase: String,
    pub stage: String,
    /// Where the chain continues (query strings of next URLs redacted).
    pub cursor: Option<String>,
    /// The cursor as the JSON value it is, for a feed whose cursor goes
    /// into the request body (`cursor_param: body:/…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor_json: Option<serde_json::Value>,
    /// Seconds since a commit last moved the cursor.
    pub cursor_age_secs: Option<f64>,
    pub high_water: Option<String>,
    /// Now minus the high-water mark, when it is a time.
    pub lag_secs: Option<f64>,
    pub pages: u64,
    pub records: u64,
    pub last_error: Option<String>,
    /// Seconds until an idle job's next poll (0 when due).
    pub next_due_in_secs: Option<f64>,
    pub epoch: u64,
    pub recoveries: u64,
    /// A child job: the parent record's version it last ran for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<String>,
}

/// One feed at a glance, from the store's counters and indexes (never a
/// scan of its jobs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedSummary {
    pub feed: String,
    pub jobs: u64,
    pub idle: u64,
    pub running: u64,
    pub paused: u64,
    pub failed: u64,
    /// Records committed by the feed's jobs.
    pub records: u64,
    /// Seconds since the least recently advanced cursor of the feed moved.
    pub oldest_cursor_age_secs: Option<f64>,
    /// Now minus the lowest high-water mark, when the feed's versions are times.
    pub worst_lag_secs: Option<f64>,
    /// The first failed jobs (at most [`FAILURES_SHOWN`]) with their errors.
    pub failures: Vec<Failure>,
    /// A child feed: its parent feed (its jobs' partitions are parent keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// A failed job and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub partition: String,
    pub error: Option<String>,
}

/// Failed jobs listed per feed in a status report.
pub const FAILURES_SHOWN: usize = 3;

/// What `tidemark status` and `/api/status` show: every feed's summary,
/// and one page of jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub now_ms: u64,
    pub feeds: Vec<FeedSummary>,
    /// With a feed: a page of its jobs. Without: every job when there are
    /// at most `limit` of them in all, else none (summaries only).
    pub jobs: Vec<JobStatus>,
    /// More jobs match: pass this partition as `after` for the next page.
    pub next: Option<String>,
    /// Per tenant (with `tenant`, or every tenant with `tenants`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tenants: Vec<TenantSummary>,
}

/// One tenant at a glance, over every feed of its source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantSummary {
    pub tenant: String,
    pub jobs: u64,
    pub idle: u64,
    pub running: u64,
    pub paused: u64,
    pub failed: u64,
    pub records: u64,
    /// Now minus the lowest high-water mark of its jobs, when they are times.
    pub worst_lag_secs: Option<f64>,
    /// The failed jobs (at most [`FAILURES_SHOWN`]) with their errors.
    pub failures: Vec<TenantFailure>,
}

/// A tenant's failed job and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantFailure {
    pub feed: String,
    pub partition: String,
    pub error: Option<String>,
}

impl TenantSummary {
    fn add(&mut self, job: &JobId, partition: &str, cp: &Checkpoint, now: u64) {
        self.jobs += 1;
        match cp.phase {
            Phase::Idle => self.idle += 1,
            Phase::Running => self.running += 1,
            Phase::Paused => self.paused += 1,
            Phase::Failed => {
                self.failed += 1;
                if self.failures.len() < FAILURES_SHOWN {
                    self.failures.push(TenantFailure {
                        feed: job.feed.clone(),
                        partition: partition.to_string(),
                        error: cp.last_error.clone(),
                    });
                }
            }
        }
        self.records += cp.records;
        if let Some(t) = cp.high_water.as_deref().and_then(high_water_ms) {
            let lag = secs_between(now, t);
            self.worst_lag_secs = Some(self.worst_lag_secs.map_or(lag, |w: f64| w.max(lag)));
        }
    }
}

/// Which jobs a status report lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusQuery {
    pub feed: Option<String>,
    /// One tenant: its summary, and its jobs (of `feed`, or of every feed).
    #[serde(default)]
    pub tenant: Option<String>,
    /// A summary of every tenant (reads every job of every feed: for a
    /// deployment of many jobs, prefer `tenant`).
    #[serde(default)]
    pub tenants: bool,
    /// Only partitions that start with this (with a feed).
    pub partition_prefix: Option<String>,
    /// The page after this partition (the `next` of the page before).
    pub after: Option<String>,
    /// Jobs per page.
    pub limit: usize,
}

/// Jobs a status page lists unless asked otherwise.
pub const STATUS_LIMIT: usize = 100;

impl Default for StatusQuery {
    fn default() -> Self {
        StatusQuery {
            feed: None,
            tenant: None,
            tenants: false,
            partition_prefix: None,
            after: None,
            limit: STATUS_LIMIT,
        }
    }
}

impl StatusQuery {
    pub fn feed(feed: &str) -> Self {
        StatusQuery {
            feed: Some(feed.to_string()),
            ..StatusQuery::default()
        }
    }
}

fn secs_between(later_ms: u64, earlier_ms: u64) -> f64 {
    later_ms.saturating_sub(earlier_ms) as f64 / 1000.0
}

/// A cursor for display: a next URL loses its query string (it may carry
/// an API key); an opaque cursor is shown as it is.
fn display_cursor(c: &str) -> String {
    match url::Url::parse(c) {
        Ok(u) if u.has_host() => tidemark_core::pagination::redact_query(&u),
        _ => c.to_string(),
    }
}

impl JobStatus {
    pub fn new(job: &JobId, cp: &Checkpoint, now: u64) -> Self {
        JobStatus {
            feed: job.feed.clone(),
            partition: job.partition.clone(),
            phase: cp.phase.as_str().to_string(),
            stage: match cp.stage {
                Stage::Bulk => "bulk".into(),
                Stage::Incremental => "incremental".into(),
            },
            cursor: cp.cursor.as_deref().map(display_cursor),
            cursor_json: None,
            cursor_age_secs: cp.last_commit_ms.map(|t| secs_between(now, t)),
            high_water: cp.high_water.clone(),
            lag_secs: cp
                .high_water
                .as_deref()
                .and_then(high_water_ms)
                .map(|t| secs_between(now, t)),
            pages: cp.pages,
            records: cp.records,
            last_error: cp.last_error.clone(),
            // A child that has run is due only when its parent changes.
            next_due_in_secs: (cp.phase == Phase::Idle && cp.next_due_ms < NEVER_DUE_MS)
                .then(|| secs_between(cp.next_due_ms, now)),
            epoch: cp.epoch,
            recoveries: cp.recoveries,
            parent_version: cp.parent_version.clone(),
        }
    }
}

/// The feeds of tenanted sources, from the registered config (`None`
/// without one: then every feed is taken to be one).
fn tenanted_feeds(config: Option<&Config>) -> Option<std::collections::HashSet<String>> {
    config.map(|config| {
        config
            .feeds
            .iter()
            .filter(|f| {
                config
                    .sources
                    .get(&f.source)
                    .is_some_and(|s| s.is_tenanted())
            })
            .map(|f| f.name.clone())
            .collect()
    })
}

/// Every feed's summary (or one feed's) and the page of jobs `q` asks for.
pub async fn status(store: &dyn Operate, q: &StatusQuery) -> Result<StatusReport, StateError> {
    let now = now_ms();
    let census: Vec<FeedCensus> = store
        .census()
        .await?
        .into_iter()
        .filter(|c| q.feed.as_ref().is_none_or(|f| *f == c.feed))
        .collect();
    let config = load_config(store).await?.map(|(_, c)| c);
    let parent_of = |feed: &str| {
        config
            .as_ref()
            .and_then(|c| c.feed(feed))
            .and_then(|f| f.parent.as_ref())
            .map(|p| p.feed.clone())
    };
    let mut feeds = Vec::with_capacity(census.len());
    for c in &census {
        let failures = if c.failed > 0 {
            store
                .failures(&c.feed, FAILURES_SHOWN)
                .await?
                .into_iter()
                .map(|(j, cp)| Failure {
                    partition: j.partition,
                    error: cp.last_error,
                })
                .collect()
        } else {
            Vec::new()
        };
        feeds.push(FeedSummary {
            feed: c.feed.clone(),
            jobs: c.jobs(),
            idle: c.idle,
            running: c.running,
            paused: c.paused,
            failed: c.failed,
            records: c.records,
            oldest_cursor_age_secs: c.oldest_progress_ms.map(|t| secs_between(now, t)),
            worst_lag_secs: c.oldest_high_water_ms.map(|t| secs_between(now, t)),
            failures,
            parent: parent_of(&c.feed),
        });
    }
    let limit = q.limit.max(1);
    // A tenant's jobs: partitions under `<tenant>/`.
    let prefix = match (&q.tenant, &q.partition_prefix) {
        (Some(t), Some(p)) => Some(tenant::job_partition(t, p)),
        (Some(t), None) => Some(tenant::job_partition(t, "")),
        (None, p) => p.clone(),
    };
    // A tenant's jobs (or every tenant's, with `tenants`) in the feeds of
    // tenanted sources, read once: the summaries come from them, and
    // without a feed so does the list of jobs.
    let tenant_jobs = if q.tenant.is_some() || q.tenants {
        let tenanted = tenanted_feeds(config.as_ref());
        let tenant_prefix = q.tenant.as_deref().map(|t| tenant::job_partition(t, ""));
        let mut all = Vec::new();
        for c in census
            .iter()
            .filter(|c| tenanted.as_ref().is_none_or(|t| t.contains(&c.feed)))
        {
            all.extend(feed_jobs_with_prefix(store, &c.feed, tenant_prefix.as_deref()).await?);
        }
        Some(all)
    } else {
        None
    };
    let (jobs, next) = match &q.feed {
        Some(feed) if !census.is_empty() => {
            let page = store
                .page(&JobQuery {
                    feed: feed.clone(),
                    prefix: prefix.clone(),
                    after: q.after.clone(),
                    limit,
                })
                .await?;
            (page.jobs, page.next)
        }
        Some(_) => (Vec::new(), None),
        None if q.tenant.is_some() => (
            tenant_jobs
                .iter()
                .flatten()
                .filter(|(j, _)| prefix.as_ref().is_none_or(|p| j.partition.starts_with(p)))
                .take(limit)
                .cloned()
                .collect(),
            None,
        ),
        None if census.iter().map(FeedCensus::jobs).sum::<u64>() <= limit as u64 => {
            let mut all = Vec::new();
            for c in &census {
                all.extend(feed_jobs(store, &c.feed).await?);
            }
            (all, None)
        }
        None => (Vec::new(), None),
    };
    let tenants = tenant_jobs
        .as_deref()
        .map(|all| tenant_summaries(all, now))
        .unwrap_or_default();
    // Resolved once per feed, not once per job listed.
    let json_feeds: std::collections::HashSet<&str> = config
        .iter()
        .flat_map(|c| &c.feeds)
        .filter(|f| f.cursor_is_json())
        .map(|f| f.name.as_str())
        .collect();
    Ok(StatusReport {
        now_ms: now,
        feeds,
        jobs: jobs
            .iter()
            .map(|(j, cp)| {
                let mut s = JobStatus::new(j, cp, now);
                if json_feeds.contains(j.feed.as_str()) {
                    s.cursor_json = cp
                        .cursor
                        .as_deref()
                        .and_then(|c| serde_json::from_str(c).ok());
                }
                s
            })
            .collect(),
        next,
        tenants,
    })
}

/// Each tenant's summary over `jobs` (jobs of tenanted feeds).
fn tenant_summaries(jobs: &[(JobId, Checkpoint)], now: u64) -> Vec<TenantSummary> {
    let mut by: std::collections::BTreeMap<String, TenantSummary> = Default::default();
    for (job, cp) in jobs {
        let Some((t, p)) = split_job_partition(&job.partition) else {
            continue;
        };
        by.entry(t.to_string())
            .or_insert_with(|| TenantSummary {
                tenant: t.to_string(),
                ..TenantSummary::default()
            })
            .add(job, p, cp, now);
    }
    by.into_values().collect()
}

/// What an operator asks of a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Action {
    /// Stop starting chains; fence the one in flight.
    Pause,
    /// Let a paused (or failed) job run again, due at once.
    Resume,
    /// Resume only the jobs that failed.
    Retry,
    /// Move the cursor: to the feed's start, to a cursor, or to a time.
    Rewind { to: RewindTo },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewindTo {
    Start,
    Cursor(String),
    /// A time as a person writes it (RFC 3339, a date, unix seconds).
    Time(String),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Retry => "retry",
            Action::Rewind { .. } => "rewind",
        }
    }

    /// The store's control for this action; a time is checked and normalised here.
    fn control(&self) -> Result<Control, OpError> {
        Ok(match self {
            Action::Pause => Control::Pause,
            Action::Resume | Action::Retry => Control::Resume,
            Action::Rewind { to } => Control::Rewind(match to {
                RewindTo::Start => Rewind::Start,
                RewindTo::Cursor(c) if c.is_empty() => {
                    return Err(OpError::Invalid("the cursor is empty".into()));
                }
                RewindTo::Cursor(c) => Rewind::Cursor(c.clone()),
                RewindTo::Time(t) => {
                    let t = parse_timestamp(t)
                        .map_err(|e| OpError::Invalid(format!("--to {t:?}: {e}")))?;
                    if t > Utc::now() {
                        return Err(OpError::Invalid(
                            "--to is in the future: nothing would be synced".into(),
                        ));
                    }
                    Rewind::Time(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
                }
            }),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no feed named {feed:?} has jobs (is the coordinator running with it in its config?)")]
    UnknownFeed { feed: String },
    #[error("feed {feed:?} has no partition {partition:?}")]
    UnknownPartition { feed: String, partition: String },
    #[error("no jobs of tenant {tenant:?}{}", feed.as_ref().map(|f| format!(" in feed {f:?}")).unwrap_or_default())]
    UnknownTenant {
        tenant: String,
        feed: Option<String>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("state store: {0}")]
    State(#[from] StateError),
}

impl OpError {
    /// True when the request was wrong (exit 2, HTTP 4xx), not the system.
    pub fn is_usage(&self) -> bool {
        !matches!(self, OpError::State(_))
    }
}

/// What an action did, job by job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReport {
    pub action: String,
    /// Jobs changed, with their new epoch.
    pub applied: Vec<Applied>,
    /// Jobs left alone, with why (e.g. retry of a job that did not fail).
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub feed: String,
    pub partition: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub feed: String,
    pub partition: String,
    pub reason: String,
}

/// Which jobs an action applies to: a feed's, a tenant's (of one feed or
/// of every feed), or one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// A feed; without it, every feed with jobs of `tenant`.
    #[serde(default)]
    pub feed: Option<String>,
    /// A tenant of a tenanted feed.
    #[serde(default)]
    pub tenant: Option<String>,
    /// One partition (of the tenant, for a tenanted feed).
    #[serde(default)]
    pub partition: Option<String>,
}

impl Selection {
    /// Every job of `feed`.
    pub fn feed(feed: &str) -> Self {
        Selection {
            feed: Some(feed.to_string()),
            ..Selection::default()
        }
    }
    /// One partition of `feed`.
    pub fn partition(feed: &str, partition: Option<&str>) -> Self {
        Selection {
            feed: Some(feed.to_string()),
            tenant: None,
            partition: partition.map(str::to_string),
        }
    }
}

/// Apply `action` to the jobs `sel` names.
pub async fn apply(
    store: &dyn Operate,
    sel: &Selection,
    action: &Action,
) -> Result<ActionReport, OpError> {
    let mut control = action.control()?;
    if let Some(t) = &sel.tenant {
        tenant::check_name(t).map_err(OpError::Invalid)?;
    }
    if let Control::Rewind(Rewind::Cursor(c)) = &mut control
        && let Some(feed) = &sel.feed
        && let Some((_, config)) = load_config(store).await?
        && config.feed(feed).is_some_and(|f| f.cursor_is_json())
    {
        // Kept as JSON text: checked, and written the way the chain writes it.
        *c = tidemark_core::pagination::tidy_json_cursor(c).ok_or_else(|| {
            OpError::Invalid(format!(
                "feed {feed:?} sends its cursor in the request body, as JSON: give --cursor as JSON, e.g. '\"abc\"' or '[1704067200,\"r-1\"]'"
            ))
        })?;
    }
    let tenanted = match &sel.tenant {
        Some(_) => tenanted_feeds(load_config(store).await?.map(|(_, c)| c).as_ref()),
        None => None,
    };
    let feeds = match (&sel.feed, &sel.tenant) {
        (Some(f), Some(_)) if tenanted.as_ref().is_some_and(|t| !t.contains(f)) => {
            return Err(OpError::Invalid(format!(
                "feed {f:?} has no tenants: drop --tenant"
            )));
        }
        (Some(f), _) => vec![f.clone()],
        // A tenant's jobs are in the feeds of tenanted sources only.
        (None, Some(_)) => store
            .feeds()
            .await?
            .into_iter()
            .filter(|f| tenanted.as_ref().is_none_or(|t| t.contains(f)))
            .collect(),
        (None, None) => return Err(OpError::Invalid("name a feed or a tenant".into())),
    };
    let prefix = sel.tenant.as_deref().map(|t| tenant::job_partition(t, ""));
    let wanted = match (&sel.tenant, &sel.partition) {
        (Some(t), Some(p)) => Some(tenant::job_partition(t, p)),
        (None, p) => p.clone(),
        (Some(_), None) => None,
    };
    let mut targets = Vec::new();
    for feed in &feeds {
        let jobs = feed_jobs_with_prefix(store, feed, prefix.as_deref()).await?;
        if jobs.is_empty() && sel.feed.is_some() && sel.tenant.is_none() {
            return Err(OpError::UnknownFeed { feed: feed.clone() });
        }
        targets.extend(
            jobs.into_iter()
                .filter(|(j, _)| wanted.as_ref().is_none_or(|p| j.partition == *p)),
        );
    }
    if targets.is_empty() {
        return Err(match (&sel.tenant, &sel.partition, &sel.feed) {
            (_, Some(p), Some(f)) => OpError::UnknownPartition {
                feed: f.clone(),
                partition: wanted.unwrap_or_else(|| p.clone()),
            },
            (Some(t), _, f) => OpError::UnknownTenant {
                tenant: t.clone(),
                feed: f.clone(),
            },
            (None, _, f) => OpError::UnknownFeed {
                feed: f.clone().unwrap_or_default(),
            },
        });
    }
    let mut report = ActionReport {
        action: action.name().into(),
        applied: Vec::new(),
        skipped: Vec::new(),
    };
    for (job, cp) in targets {
        let skip = match action {
            Action::Retry if cp.phase != Phase::Failed => Some("not failed"),
            Action::Resume if !matches!(cp.phase, Phase::Paused | Phase::Failed) => {
                Some("not paused")
            }
            Action::Pause if cp.phase == Phase::Paused => Some("already paused"),
            _ => None,
        };
        if let Some(reason) = skip {
            report.skipped.push(Skipped {
                feed: job.feed.clone(),
                partition: job.partition.clone(),
                reason: reason.into(),
            });
            continue;
        }
        let epoch = store.control(&job, &control).await?;
        tracing::info!(job = %job, action = action.name(), epoch, "operator action applied");
        report.applied.push(Applied {
            feed: job.feed.clone(),
            partition: job.partition.clone(),
            epoch,
        });
    }
    Ok(report)
}

/// The tenants of a source: those running, and those added but not yet
/// applied by a coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantsReport {
    pub source: String,
    pub active: Vec<ActiveTenant>,
    /// Added (`tenants add`) but not yet running: no coordinator has
    /// applied them yet.
    pub pending: Vec<Tenant>,
}

/// What removing a tenant did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRemoval {
    pub source: String,
    pub tenant: String,
    /// It was an added tenant and is removed (its jobs stop within a tick).
    pub removed: bool,
    /// Jobs whose state was deleted (with `purge`).
    pub purged: usize,
}

/// The registered config and the named source in it, which must have tenants.
async fn tenanted_source(store: &dyn Operate, source: &str) -> Result<Config, OpError> {
    let Some((_, config)) = load_config(store).await? else {
        return Err(OpError::Invalid(
            "no feed registry yet: start a coordinator (or a run) with the config first".into(),
        ));
    };
    match config.sources.get(source) {
        Some(s) if s.is_tenanted() => Ok(config),
        Some(_) => Err(OpError::Invalid(format!(
            "source {source:?} has no tenants block"
        ))),
        None => Err(OpError::Invalid(format!(
            "no source named {source:?} in the registered config"
        ))),
    }
}

/// Retire and delete every job of tenant `name` of `source`: the jobs of
/// each of the source's feeds, one per partition (a retired job is in no
/// index, so they are found by name, from the config).
async fn purge_tenant(
    store: &dyn Operate,
    config: &Config,
    source: &str,
    name: &str,
) -> Result<usize, OpError> {
    let mut purged = 0;
    for feed in config.feeds.iter().filter(|f| f.source == source) {
        let jobs: Vec<JobId> = if let Some(link) = &feed.parent {
            // A child feed's jobs are its parents' records: the tenant's
            // registered ones and those retired already.
            let prefix = tenant::job_partition(name, "");
            let mut jobs: Vec<JobId> =
                tidemark_state::feed_jobs_with_prefix(store, &feed.name, Some(&prefix))
                    .await?
                    .into_iter()
                    .map(|(job, _)| job)
                    .collect();
            jobs.extend(store.retired_children(&feed.name, Some(&prefix)).await?);
            // A batched feed's parents: their versions and those pending.
            if link.batch.is_some() {
                store.purge_parents(&feed.name, Some(name)).await?;
            }
            jobs
        } else {
            let parts = feed.partitions(Utc::now()).map_err(OpError::Invalid)?;
            parts
                .iter()
                .map(|p| JobId::new(&feed.name, tenant::job_partition(name, &p.id)))
                .collect()
        };
        for job in jobs {
            store.retire(&job).await?;
            if store.purge(&job).await? == Some(true) {
                purged += 1;
            }
        }
    }
    Ok(purged)
}

/// The tenants of `source`.
pub async fn tenants(store: &dyn Operate, source: &str) -> Result<TenantsReport, OpError> {
    tenanted_source(store, source).await?;
    let active = store.active_tenants(source).await?;
    let running: std::collections::HashSet<&str> = active.iter().map(|t| t.name.as_str()).collect();
    let pending = store
        .added_tenants(source)
        .await?
        .into_iter()
        .filter(|t| !running.contains(t.name.as_str()))
        .collect();
    Ok(TenantsReport {
        source: source.to_string(),
        active,
        pending,
    })
}

/// Add a tenant to `source` (or change its vars): a coordinator creates
/// and starts its jobs within one tick. True when it is new.
pub async fn add_tenant(store: &dyn Operate, source: &str, t: &Tenant) -> Result<bool, OpError> {
    tenant::check_name(&t.name).map_err(OpError::Invalid)?;
    for (v, value) in &t.vars {
        tenant::check_var_name(v)
            .and_then(|()| tenant::check_var_value(v, value))
            .map_err(OpError::Invalid)?;
    }
    let config = tenanted_source(store, source).await?;
    let missing: Vec<String> = tenant_vars_used(&config, source)
        .into_iter()
        .filter(|(v, _)| !t.vars.contains_key(v))
        .map(|(v, at)| format!("vars.{v} (used by {at})"))
        .collect();
    if !missing.is_empty() {
        return Err(OpError::Invalid(format!(
            "tenant {} lacks {}: pass --var NAME=VALUE",
            t.name,
            missing.join(", ")
        )));
    }
    let new = store.add_tenant(source, t).await?;
    tracing::info!(source, tenant = %t.name, new, "tenant added");
    Ok(new)
}

/// Remove a tenant added at run time: a coordinator retires its jobs
/// within one tick (a page in flight is fenced); their state stays unless
/// `purge`, which also deletes the state of a tenant already gone (say,
/// from the tenants file).
pub async fn remove_tenant(
    store: &dyn Operate,
    source: &str,
    name: &str,
    purge: bool,
) -> Result<TenantRemoval, OpError> {
    tenant::check_name(name).map_err(OpError::Invalid)?;
    let config = tenanted_source(store, source).await?;
    let active = store.active_tenants(source).await?;
    if let Some(t) = active
        .iter()
        .find(|t| t.name == name && t.origin != TenantOrigin::Added)
    {
        let from = match t.origin {
            TenantOrigin::File => format!(
                "the tenants file {}",
                config.sources[source]
                    .tenants
                    .as_ref()
                    .and_then(|x| x.file.clone())
                    .unwrap_or_default()
            ),
            _ => format!("sources.{source}.tenants.list in the config"),
        };
        return Err(OpError::Invalid(format!(
            "tenant {name} is listed in {from}: remove it there (then `tenants remove --purge` deletes its state)"
        )));
    }
    let removed = store.remove_tenant(source, name).await?;
    if !removed && !purge && !active.iter().any(|t| t.name == name) {
        return Err(OpError::UnknownTenant {
            tenant: name.to_string(),
            feed: None,
        });
    }
    let mut purged = 0;
    if purge {
        purged = purge_tenant(store, &config, source, name).await?;
    }
    tracing::info!(source, tenant = name, removed, purged, "tenant removed");
    Ok(TenantRemoval {
        source: source.to_string(),
        tenant: name.to_string(),
        removed,
        purged,
    })
}

/// `3s`, `4m10s`, `2h5m`, `3d4h`.
pub fn human_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn cell(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// Columns aligned under their headers (the last one ragged).
fn aligned(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = *w));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn clipped(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() > max {
        one_line.chars().take(max - 1).collect::<String>() + "…"
    } else {
        one_line
    }
}

/// The status table: one line per job, columns aligned.
pub fn table(jobs: &[JobStatus]) -> String {
    let header = [
        "FEED",
        "PARTITION",
        "PHASE",
        "CURSOR AGE",
        "HIGH-WATER",
        "LAG",
        "PAGES",
        "RECORDS",
        "LAST ERROR",
    ];
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let phase = match (j.phase.as_str(), j.next_due_in_secs) {
                ("idle", Some(d)) if d > 0.0 => format!("idle (next in {})", human_secs(d)),
                ("idle", None) if j.parent_version.is_some() => {
                    "idle (waits for its parent)".into()
                }
                (p, _) => p.to_string(),
            };
            vec![
                j.feed.clone(),
                j.partition.clone(),
                phase,
                cell(j.cursor_age_secs.map(human_secs)),
                cell(j.high_water.clone()),
                cell(j.lag_secs.map(human_secs)),
                j.pages.to_string(),
                j.records.to_string(),
                clipped(j.last_error.as_deref().unwrap_or_default(), 80),
            ]
        })
        .collect();
    aligned(&header, &rows)
}

/// The feed summaries: one line per feed, then the failures they list.
pub fn feeds_table(feeds: &[FeedSummary]) -> String {
    let header = [
        "FEED",
        "JOBS",
        "IDLE",
        "RUNNING",
        "PAUSED",
        "FAILED",
        "RECORDS",
        "OLDEST CURSOR",
        "WORST LAG",
    ];
    let rows: Vec<Vec<String>> = feeds
        .iter()
        .map(|f| {
            vec![
                match &f.parent {
                    Some(p) => format!("{} < {p}", f.feed),
                    None => f.feed.clone(),
                },
                f.jobs.to_string(),
                f.idle.to_string(),
                f.running.to_string(),
                f.paused.to_string(),
                f.failed.to_string(),
                f.records.to_string(),
                cell(f.oldest_cursor_age_secs.map(human_secs)),
                cell(f.worst_lag_secs.map(human_secs)),
            ]
        })
        .collect();
    let mut out = aligned(&header, &rows);
    for f in feeds {
        for x in &f.failures {
            let whose = if f.parent.is_some() {
                " (parent key)"
            } else {
                ""
            };
            out.push_str(&format!(
                "failed {}/{}{whose}: {}\n",
                f.feed,
                x.partition,
                clipped(x.error.as_deref().unwrap_or("(no error recorded)"), 100)
            ));
        }
        if f.failed > f.failures.len() as u64 {
            out.push_str(&format!(
                "failed {}: {} more (tidemark status --feed {} lists its jobs)\n",
                f.feed,
                f.failed - f.failures.len() as u64,
                f.feed
            ));
        }
    }
    out
}

/// The tenant summaries: one line per tenant, then their failures.
pub fn tenants_table(tenants: &[TenantSummary]) -> String {
    let header = [
        "TENANT",
        "JOBS",
        "IDLE",
        "RUNNING",
        "PAUSED",
        "FAILED",
        "RECORDS",
        "WORST LAG",
    ];
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant.clone(),
                t.jobs.to_string(),
                t.idle.to_string(),
                t.running.to_string(),
                t.paused.to_string(),
                t.failed.to_string(),
                t.records.to_string(),
                cell(t.worst_lag_secs.map(human_secs)),
            ]
        })
        .collect();
    let mut out = aligned(&header, &rows);
    for t in tenants {
        for x in &t.failures {
            out.push_str(&format!(
                "failed {}/{} ({}): {}\n",
                x.feed,
                x.partition,
                t.tenant,
                clipped(x.error.as_deref().unwrap_or("(no error recorded)"), 100)
            ));
        }
    }
    out
}

/// A status report as `tidemark status` prints it: the feeds, then the
/// page of jobs and how to get the next one.
pub fn render(report: &StatusReport, q: &StatusQuery) -> String {
    if report.feeds.is_empty() {
        return "(no jobs yet: has a coordinator or run registered the feeds?)\n".into();
    }
    let mut out = feeds_table(&report.feeds);
    if !report.tenants.is_empty() {
        out.push('\n');
        out.push_str(&tenants_table(&report.tenants));
    } else if q.tenant.is_some() {
        out.push_str("\n(no jobs of this tenant)\n");
    }
    let total: u64 = report.feeds.iter().map(|f| f.jobs).sum();
    if !report.jobs.is_empty() {
        out.push('\n');
        out.push_str(&table(&report.jobs));
    } else if q.feed.is_none() && q.tenant.is_none() {
        out.push_str(&format!(
            "\n{total} jobs: tidemark status --feed FEED [--partition-prefix P] lists a feed's jobs, {} at a time\n",
            q.limit
        ));
    }
    if let (Some(next), Some(feed)) = (&report.next, &q.feed) {
        out.push_str(&format!(
            "more: tidemark status --feed {feed}{} --after {next:?}{}\n",
            q.tenant
                .as_ref()
                .map(|t| format!(" --tenant {t}"))
                .unwrap_or_default(),
            q.partition_prefix
                .as_ref()
                .map(|p| format!(" --partition-prefix {p:?}"))
                .unwrap_or_default()
        ));
    }
    if let (Some(t), None) = (&q.tenant, &q.feed)
        && report.jobs.len() >= q.limit.max(1)
    {
        out.push_str(&format!(
            "more: the first {} jobs of tenant {t} are listed; tidemark status --tenant {t} --feed FEED lists a feed's, a page at a time\n",
            report.jobs.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_state::{EmbeddedStore, Jobs, Leases};

    async fn store_with(jobs: &[(&str, &str, Phase)]) -> EmbeddedStore {
        let s = EmbeddedStore::in_memory();
        for (f, p, phase) in jobs {
            let cp = Checkpoint {
                phase: *phase,
                ..Checkpoint::default()
            };
            s.ensure(&JobId::new(*f, *p), &cp).await.expect("ensure");
        }
        s
    }

    #[tokio::test]
    async fn retry_touches_only_failed_jobs_and_unknown_names_are_errors() {
        let s = store_with(&[
            ("a", "1", Phase::Failed),
            ("a", "2", Phase::Idle),
            ("b", "1", Phase::Running),
        ])
        .await;
        let r = apply(&s, &Selection::feed("a"), &Action::Retry)
            .await
            .expect("retry");
        assert_eq!(r.applied.len(), 1);
        assert_eq!(r.applied[0].partition, "1");
        assert_eq!(r.skipped[0].reason, "not failed");
        let cp = s
            .get(&JobId::new("a", "1"))
            .await
            .expect("get")
            .expect("job");
        assert_eq!(cp.phase, Phase::Idle);
        assert!(matches!(
            apply(&s, &Selection::feed("nope"), &Action::Pause).await,
            Err(OpError::UnknownFeed { .. })
        ));
        assert!(matches!(
            apply(&s, &Selection::partition("a", Some("9")), &Action::Pause).await,
            Err(OpError::UnknownPartition { .. })
        ));
        let bad = Action::Rewind {
            to: RewindTo::Time("yesterday-ish".into()),
        };
        assert!(matches!(
            apply(&s, &Selection::feed("a"), &bad).await,
            Err(OpError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn rewind_to_a_time_normalises_it_and_status_reports_it() {
        let s = store_with(&[("a", "1", Phase::Idle)]).await;
        let to = Action::Rewind {
            to: RewindTo::Time("2024-03-01".into()),
        };
        apply(&s, &Selection::feed("a"), &to).await.expect("rewind");
        let cp = s
            .get(&JobId::new("a", "1"))
            .await
            .expect("get")
            .expect("job");
        assert_eq!(cp.start_from.as_deref(), Some("2024-03-01T00:00:00Z"));
        let st = status(&s, &StatusQuery::default()).await.expect("status");
        assert_eq!(st.jobs.len(), 1);
        assert_eq!(st.jobs[0].phase, "idle");
    }

    /// Many jobs: the report summarises each feed (counts, failures with
    /// their errors) and lists jobs only a page at a time.
    #[tokio::test]
    async fn status_summarises_feeds_and_pages_through_jobs() {
        let s = EmbeddedStore::in_memory();
        let big: Vec<JobId> = (0..250)
            .map(|i| JobId::new("big", format!("p{i:03}")))
            .collect();
        s.ensure_many(&big, &Checkpoint::default())
            .await
            .expect("ensure");
        let small = JobId::new("small", "only");
        s.ensure(&small, &Checkpoint::default())
            .await
            .expect("ensure");
        let e = match tidemark_state::Jobs::acquire(
            &s,
            &small,
            std::time::Duration::from_secs(9),
            false,
        )
        .await
        .expect("acquire")
        {
            tidemark_state::Acquire::Granted { epoch } => epoch,
            other => panic!("{other:?}"),
        };
        assert!(
            s.fail(&small, e, "HTTP 401: token revoked")
                .await
                .expect("fail")
        );

        let all = status(&s, &StatusQuery::default()).await.expect("status");
        assert!(all.jobs.is_empty(), "251 jobs are more than a page");
        let sum: Vec<(&str, u64, u64, u64)> = all
            .feeds
            .iter()
            .map(|f| (f.feed.as_str(), f.jobs, f.idle, f.failed))
            .collect();
        assert_eq!(sum, vec![("big", 250, 250, 0), ("small", 1, 0, 1)]);
        let failure = &all.feeds[1].failures[0];
        assert_eq!(
            (failure.partition.as_str(), failure.error.as_deref()),
            ("only", Some("HTTP 401: token revoked"))
        );
        let text = render(&all, &StatusQuery::default());
        assert!(
            text.contains("failed small/only: HTTP 401: token revoked"),
            "{text}"
        );
        assert!(
            text.contains("251 jobs: tidemark status --feed FEED"),
            "{text}"
        );

        // A feed, page by page, and a prefix.
        let mut q = StatusQuery::feed("big");
        let mut seen = 0;
        loop {
            let page = status(&s, &q).await.expect("page");
            assert!(page.jobs.len() <= STATUS_LIMIT);
            seen += page.jobs.len();
            match page.next.clone() {
                Some(n) => {
                    assert!(render(&page, &q).contains(&format!("--after {n:?}")));
                    q.after = Some(n);
                }
                None => break,
            }
        }
        assert_eq!(seen, 250);
        let q = StatusQuery {
            partition_prefix: Some("p20".into()),
            ..StatusQuery::feed("big")
        };
        let page = status(&s, &q).await.expect("prefix");
        assert_eq!(page.jobs.len(), 10);
        assert!(page.jobs.iter().all(|j| j.partition.starts_with("p20")));
    }

    /// `--tenant` acts on that tenant's jobs only, of one feed or of all;
    /// its status sums up its jobs over every feed.
    #[tokio::test]
    async fn a_tenant_is_selected_across_feeds_and_summarised() {
        let s = store_with(&[
            ("tickets", "acme/all", Phase::Idle),
            ("tickets", "globex/all", Phase::Idle),
            ("users", "acme/all", Phase::Failed),
            ("users", "globex/all", Phase::Idle),
            ("plain", "all", Phase::Idle),
        ])
        .await;
        let sel = Selection {
            tenant: Some("acme".into()),
            ..Selection::default()
        };
        let r = apply(&s, &sel, &Action::Pause).await.expect("pause acme");
        let mut done: Vec<(String, String)> = r
            .applied
            .iter()
            .map(|a| (a.feed.clone(), a.partition.clone()))
            .collect();
        done.sort();
        assert_eq!(
            done,
            vec![
                ("tickets".to_string(), "acme/all".to_string()),
                ("users".to_string(), "acme/all".to_string())
            ]
        );
        let one = Selection {
            feed: Some("tickets".into()),
            tenant: Some("globex".into()),
            partition: Some("all".into()),
        };
        let r = apply(&s, &one, &Action::Pause).await.expect("pause one");
        assert_eq!(r.applied[0].partition, "globex/all");
        let nobody = Selection {
            tenant: Some("nobody".into()),
            ..Selection::default()
        };
        assert!(matches!(
            apply(&s, &nobody, &Action::Pause).await,
            Err(OpError::UnknownTenant { .. })
        ));
        let q = StatusQuery {
            tenant: Some("acme".into()),
            ..StatusQuery::default()
        };
        let st = status(&s, &q).await.expect("status");
        assert_eq!(st.tenants.len(), 1);
        let acme = &st.tenants[0];
        assert_eq!((acme.jobs, acme.paused), (2, 2));
        assert_eq!(st.jobs.len(), 2);
        assert!(st.jobs.iter().all(|j| j.partition.starts_with("acme/")));
        let all = status(
            &s,
            &StatusQuery {
                tenants: true,
                ..StatusQuery::default()
            },
        )
        .await
        .expect("status");
        let names: Vec<&str> = all.tenants.iter().map(|t| t.tenant.as_str()).collect();
        assert_eq!(
            names,
            vec!["acme", "globex"],
            "`all` of a plain feed is no tenant"
        );
        assert!(render(&all, &StatusQuery::default()).contains("TENANT"));
    }

    #[test]
    fn a_next_url_cursor_is_shown_without_its_query() {
        let shown = display_cursor("https://api.test/x?api_key=SECRET&after=5");
        assert!(shown.starts_with("https://api.test/x?"), "{shown}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("after"),
            "{shown}"
        );
        assert_eq!(display_cursor("eyJhIjoxfQ=="), "eyJhIjoxfQ==");
    }
}
